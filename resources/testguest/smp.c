#include "cmdline.h"
#include "guest.h"
int wl_smp(const struct cmdline *cl) { (void)cl; print("smp: not implemented yet\n"); return EXIT_FAIL; }
void ap_main(unsigned cpu) { (void)cpu; for (;;) cpu_relax(); }
