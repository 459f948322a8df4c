/*
 * mirrorvm test guest: the `mix` workload, for checkpoint and failover
 * tests: memory and disk at once.  cpu 1 dirties memory (the `dirty`
 * engine, checking every page still holds its previous write) while the
 * BSP rewrites the disk records round after round (as `disk rounds=`,
 * checking each record holds the previous round first).  Both remember what
 * they wrote in memory a checkpoint captures, so a restore or a failover
 * that loses a page, or brings back a disk that disagrees with memory, is
 * caught.
 */
#include "cmdline.h"
#include "dirty.h"
#include "guest.h"
#include "record.h"
#include "virtio_blk.h"

static struct dirty mem;
static volatile int stop;          /* BSP -> cpu 1 */
static volatile int mem_state;     /* cpu 1: 0 running, 1 failed, 2 stopped */

static void mix_job(unsigned cpu)
{
    uint64_t next, tick = ms_to_ticks(1), ms = 0;
    if (cpu != 1)
        for (;;)
            smp_tick(cpu);
    next = rdtsc() + tick;
    while (!stop) {
        uint64_t now;
        if (dirty_step(&mem)) {
            print("mix: FAILED: memory: %llu page(s) lost their last write\n",
                  (unsigned long long)mem.bad);
            mem_state = 1;
            for (;;)
                smp_tick(cpu);
        }
        smp_tick(cpu);
        ms++;
        now = spin_until(&next);
        next += tick;
        if (now > next + 10 * tick)
            next = now + tick;
        if (ms % 1000 == 0)
            print("mix: memory: %llu s, %llu pages dirtied\n", (unsigned long long)(ms / 1000),
                  (unsigned long long)mem.total);
    }
    mem_state = 2;
    for (;;)
        smp_tick(cpu);
}

int wl_mix(const struct cmdline *cl_in)
{
    static const char *const keys[] = { "seconds", "records", "seed", "pages_per_ms", "mb",
                                        NULL };
    static struct vblk dev;
    struct cmdline *cl = (struct cmdline *)cl_in;
    struct vblk *d = &dev;
    uint64_t seconds, n, seed, ppm, mb, base, r;
    struct timeout run, rep, t;
    uint64_t secs = 0;
    int cpus;

    if (cmdline_check_keys(cl, keys) || cmdline_u64(cl, "seconds", 10, 0, 1000000, &seconds) ||
        cmdline_u64(cl, "records", 16, 1, 0xffffffffu, &n) ||
        cmdline_u64(cl, "seed", 1, 0, UINT64_MAX, &seed) ||
        cmdline_u64(cl, "pages_per_ms", 100, 1, 1000000, &ppm) ||
        cmdline_u64(cl, "mb", 16, 1, 1 << 20, &mb)) {
        print("mix: error: %s\n", cl->err);
        return EXIT_USAGE;
    }
    if (disk_open(cl, d, "mix"))
        return EXIT_FAIL;
    if (n > record_slots(d->capacity) || (d->features & (1ull << VIRTIO_BLK_F_RO))) {
        print("mix: error: records=%llu do not fit the disk, or it is read-only\n",
              (unsigned long long)n);
        return EXIT_USAGE;
    }
    base = ((uint64_t)(uintptr_t)_end + (1 << 20) - 1) & ~(uint64_t)((1 << 20) - 1);
    if (dirty_setup(&mem, base, mb, ppm, 1, "mix"))
        return EXIT_FAIL;
    cpus = smp_start(mix_job, "mix");
    if (cpus < 0)
        return EXIT_FAIL;
    if (cpus < 2) {
        print("mix: error: needs 2 or more cpus (--cpus 2)\n");
        return EXIT_USAGE;
    }
    print("mix: cpu 1 dirties %llu pages/ms over %llu MiB; cpu 0 rewrites %llu disk records; "
          "%s%llu s\n",
          (unsigned long long)mem.ppm, (unsigned long long)(mem.npages >> 8),
          (unsigned long long)n, seconds ? "" : "forever, ",
          (unsigned long long)(seconds ? seconds : 0));

    timeout_start_wall(&run, seconds * 1000);
    timeout_start_wall(&rep, 1000);
    for (r = 0;; r++) {
        if (disk_round(d, (uint32_t)n, seed, r, "mix"))
            return EXIT_FAIL;
        if (timeout_expired(&rep)) {
            print("mix: disk: %llu s, %llu rounds of %llu records checked and rewritten\n",
                  (unsigned long long)++secs, (unsigned long long)r + 1,
                  (unsigned long long)n);
            timeout_start_wall(&rep, 1000);
        }
        if (mem_state == 1)
            return EXIT_FAIL;
        if (seconds && timeout_expired(&run))
            break;
    }
    stop = 1;
    timeout_start(&t, 1000);
    while (mem_state == 0 && !timeout_expired(&t))
        cpu_relax();
    if (mem_state != 2) {
        print("mix: FAILED: memory: cpu 1 %s\n", mem_state == 1 ? "found lost writes"
                                                                : "did not stop");
        return EXIT_FAIL;
    }
    if (disk_verify(d, (uint32_t)n, seed + r, "mix"))
        return EXIT_FAIL;
    print("mix: %llu disk rounds and %llu pages dirtied, all verified\n",
          (unsigned long long)r + 1, (unsigned long long)mem.total);
    return EXIT_OK;
}
