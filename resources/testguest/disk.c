#include "cmdline.h"
#include "guest.h"
int wl_disk(const struct cmdline *cl) { (void)cl; print("disk: not implemented yet\n"); return EXIT_FAIL; }
int wl_hostile(const struct cmdline *cl) { (void)cl; print("hostile: not implemented yet\n"); return EXIT_FAIL; }
