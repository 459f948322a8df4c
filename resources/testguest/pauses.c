/*
 * mirrorvm test guest: the `pauses` workload.  Spins on rdtsc at CPL3 and
 * records every gap between two consecutive reads longer than a threshold:
 * the times the vCPU did not run (checkpoint cuts, host preemption, exits).
 * Reports once a second and a histogram at the end, so the epoch engine's
 * pause time can be measured from inside the guest.
 */
#include "cmdline.h"
#include "guest.h"

#define NBUCKETS 12   /* threshold * 2^k, k = 0..10, and beyond */

struct gaps {
    uint64_t count, total, max;   /* in ticks */
    uint64_t bucket[NBUCKETS];
};

static void gaps_add(struct gaps *g, uint64_t gap, uint64_t threshold)
{
    int b = 0;
    g->count++;
    g->total += gap;
    if (gap > g->max)
        g->max = gap;
    while (b < NBUCKETS - 1 && gap >= threshold << (b + 1))
        b++;
    g->bucket[b]++;
}

static uint64_t ticks_to_us(uint64_t t)
{
    return t * 1000 / tsc_khz;
}

int wl_pauses(const struct cmdline *cl_in)
{
    static const char *const keys[] = { "seconds", "threshold_us", NULL };
    struct cmdline *cl = (struct cmdline *)cl_in;
    struct gaps sec, all;
    uint64_t seconds, thr_us, thr, second, prev, next_report, t0, secs = 0;
    int b;

    if (cmdline_check_keys(cl, keys) || cmdline_u64(cl, "seconds", 0, 0, 1000000, &seconds) ||
        cmdline_u64(cl, "threshold_us", 100, 1, 1000000, &thr_us)) {
        print("pauses: error: %s\n", cl->err);
        return EXIT_USAGE;
    }
    thr = us_to_ticks(thr_us);
    second = ms_to_ticks(1000);
    mem_fill(&sec, 0, sizeof sec);
    mem_fill(&all, 0, sizeof all);
    print("pauses: recording gaps of %llu us or more between two rdtsc at CPL3, %s%llu s\n",
          (unsigned long long)thr_us, seconds ? "" : "forever; report every ",
          (unsigned long long)(seconds ? seconds : 1));

    t0 = prev = rdtsc();
    next_report = t0 + second;
    for (;;) {
        uint64_t now = rdtsc();
        if (now < prev) {              /* TSC went backwards (restored elsewhere) */
            next_report -= (prev - now) < next_report ? prev - now : 0;
            prev = now;
            continue;
        }
        if (now - prev >= thr) {
            gaps_add(&sec, now - prev, thr);
            gaps_add(&all, now - prev, thr);
        }
        prev = now;
        if (now >= next_report) {
            secs++;
            /* the report itself (SYS_WRITE) shows up as a gap in the next second */
            print("pauses: %llu s: %llu gaps, max %llu us, total %llu us\n",
                  (unsigned long long)secs, (unsigned long long)sec.count,
                  (unsigned long long)ticks_to_us(sec.max),
                  (unsigned long long)ticks_to_us(sec.total));
            mem_fill(&sec, 0, sizeof sec);
            next_report += second;
            if (now > next_report)
                next_report = now + second;
            if (seconds && secs >= seconds)
                break;
            prev = rdtsc();
        }
    }
    print("pauses: %llu gaps in %llu s, max %llu us, total %llu us (%llu.%02llu%% of the time)\n",
          (unsigned long long)all.count, (unsigned long long)secs,
          (unsigned long long)ticks_to_us(all.max), (unsigned long long)ticks_to_us(all.total),
          (unsigned long long)(all.total * 100 / (rdtsc() - t0)),
          (unsigned long long)(all.total * 10000 / (rdtsc() - t0) % 100));
    for (b = 0; b < NBUCKETS; b++) {
        if (!all.bucket[b])
            continue;
        if (b < NBUCKETS - 1)
            print("pauses:   [%llu us, %llu us): %llu\n",
                  (unsigned long long)(thr_us << b), (unsigned long long)(thr_us << (b + 1)),
                  (unsigned long long)all.bucket[b]);
        else
            print("pauses:   >= %llu us: %llu\n", (unsigned long long)(thr_us << b),
                  (unsigned long long)all.bucket[b]);
    }
    return EXIT_OK;
}
