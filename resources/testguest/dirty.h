/*
 * mirrorvm test guest: the memory-dirtying engine of `dirty` and `mix`.
 *
 * Write number w (from 1) goes to page (w-1) % npages of the region, into
 * u64 word pass % 512 with pass = (w-1) / npages, and stores w ^ DIRTY_SALT.
 * With verify, the word of the previous pass must still hold write
 * w - npages: memory lost or stale after a checkpoint restore or a failover
 * shows up as a mismatch.
 */
#ifndef TESTGUEST_DIRTY_H
#define TESTGUEST_DIRTY_H

#include <stdint.h>

#define DIRTY_SALT 0x6469727479000000ull   /* "dirty" */

struct dirty {
    uint64_t start;     /* region base */
    uint64_t npages;    /* region size in 4 KiB pages */
    uint64_t ppm;       /* writes per step */
    uint64_t page, pass, total, bad;
    int verify;
    const char *who;
};

/*
 * Place a region of mb MiB at base (capped to the RAM there; ppm capped to
 * the region's pages).  Returns 0, or -1 after printing why.
 */
int dirty_setup(struct dirty *g, uint64_t base, uint64_t mb, uint64_t ppm, int verify,
                const char *who);

/* ppm writes; returns the number of mismatches found so far (g->bad). */
uint64_t dirty_step(struct dirty *g);

#endif
