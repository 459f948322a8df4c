/*
 * mirrorvm test guest: memory-dirtying engine (see dirty.h).
 */
#include "dirty.h"
#include "guest.h"

int dirty_setup(struct dirty *g, uint64_t base, uint64_t mb, uint64_t ppm, int verify,
                const char *who)
{
    uint64_t ram_end = machine_ram_end(base);
    uint64_t avail_mb = ram_end > base ? (ram_end - base) >> 20 : 0;

    mem_fill(g, 0, sizeof *g);
    g->who = who;
    if (avail_mb == 0) {
        print("%s: FAILED: no RAM at 0x%llx\n", who, (unsigned long long)base);
        return -1;
    }
    if (mb > avail_mb) {
        print("%s: warning: mb=%llu capped to %llu (RAM ends at 0x%llx)\n", who,
              (unsigned long long)mb, (unsigned long long)avail_mb,
              (unsigned long long)ram_end);
        mb = avail_mb;
    }
    g->start = base;
    g->npages = mb << 8;
    if (ppm > g->npages) {
        print("%s: warning: pages_per_ms=%llu capped to the region's %llu pages\n", who,
              (unsigned long long)ppm, (unsigned long long)g->npages);
        ppm = g->npages;
    }
    g->ppm = ppm;
    g->verify = verify;
    return 0;
}

uint64_t dirty_step(struct dirty *g)
{
    uint64_t i;
    for (i = 0; i < g->ppm; i++) {
        volatile uint64_t *pg = (volatile uint64_t *)(uintptr_t)(g->start + (g->page << 12));
        uint64_t w = g->total + i + 1;
        if (g->verify && g->pass > 0) {
            uint64_t want = (w - g->npages) ^ DIRTY_SALT, got = pg[(g->pass - 1) % 512];
            if (got != want && g->bad++ < 10)
                print("%s: page 0x%llx word %llu holds 0x%llx, expected 0x%llx"
                      " (write %llu)\n",
                      g->who, (unsigned long long)(uintptr_t)pg,
                      (unsigned long long)((g->pass - 1) % 512), (unsigned long long)got,
                      (unsigned long long)want, (unsigned long long)(w - g->npages));
        }
        pg[g->pass % 512] = w ^ DIRTY_SALT;
        if (++g->page == g->npages) {
            g->page = 0;
            g->pass++;
        }
    }
    g->total += g->ppm;
    return g->bad;
}
