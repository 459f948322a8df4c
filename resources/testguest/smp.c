/*
 * mirrorvm test guest: the `smp` workload.  Finds the CPUs in the MP table,
 * starts every secondary one with INIT/SIPI/SIPI (LAPIC ICR writes through
 * the SYS_APIC_WRITE system call) into the real-mode trampoline copied to
 * TRAMP_ADDR, and waits until each runs at CPL3 and counts.
 */
#include "cmdline.h"
#include "guest.h"

#define APIC_ID        0x020
#define APIC_ICR_LOW   0x300
#define APIC_ICR_HIGH  0x310
#define ICR_INIT       0x00004500   /* INIT, level assert */
#define ICR_STARTUP    0x00004600   /* start-up, vector in bits 0..7 */
#define ICR_PENDING    0x00001000

#define SMP_TIMEOUT_MS 5000    /* per cpu: with many vCPUs on few host cores,
                                  the spinning APs slow the next ones down */
#define SMP_MOVE_MS    2000    /* for every started cpu's counter to move */

struct percpu {
    volatile uint64_t counter;
    volatile uint32_t alive;
} __attribute__((aligned(64)));

static struct percpu pcpu[MAX_CPUS];
static void (*volatile ap_job)(unsigned cpu);

void smp_tick(unsigned cpu)
{
    pcpu[cpu].counter++;
}

void ap_main(unsigned cpu)
{
    struct percpu *p = &pcpu[cpu < MAX_CPUS ? cpu : 0];
    void (*job)(unsigned) = ap_job;
    p->alive = 1;
    if (job)
        job(cpu);       /* calls smp_tick() as it goes */
    for (;;)
        p->counter++;
}

static int checksum_ok(const uint8_t *p, uint32_t len)
{
    uint8_t sum = 0;
    while (len--)
        sum = (uint8_t)(sum + *p++);
    return sum == 0;
}

/* The MP floating pointer structure: "_MP_", 16 bytes, on a 16-byte
 * boundary, in the EBDA's first KiB or the BIOS area (0xf0000..0xfffff). */
static const uint8_t *find_mp(void)
{
    static const uint64_t ranges[][2] = { { 0x9fc00, 0xa0000 }, { 0xf0000, 0x100000 } };
    unsigned r;
    for (r = 0; r < 2; r++) {
        uint64_t a;
        for (a = ranges[r][0]; a < ranges[r][1]; a += 16) {
            const uint8_t *p = (const uint8_t *)(uintptr_t)a;
            if (p[0] == '_' && p[1] == 'M' && p[2] == 'P' && p[3] == '_' && p[8] == 1 &&
                checksum_ok(p, 16))
                return p;
        }
    }
    return NULL;
}

struct mp_cpu {
    uint8_t apic_id;
    uint8_t flags;
};

/* Processor entries of the MP configuration table; -1 on a bad table. */
static int mp_cpus(struct mp_cpu *out, int max)
{
    const uint8_t *fp = find_mp(), *t, *e, *end;
    uint32_t addr;
    uint16_t len;
    int n = 0;

    if (!fp) {
        print("smp: FAILED: no MP floating pointer (\"_MP_\") at 0x9fc00 or 0xf0000\n");
        return -1;
    }
    mem_copy(&addr, fp + 4, 4);
    if (fp[11] != 0 || addr == 0) {
        print("smp: FAILED: MP default configuration %u / no table pointer\n", fp[11]);
        return -1;
    }
    t = (const uint8_t *)(uintptr_t)addr;
    mem_copy(&len, t + 4, 2);
    if (!(t[0] == 'P' && t[1] == 'C' && t[2] == 'M' && t[3] == 'P') || len < 44 ||
        !checksum_ok(t, len)) {
        print("smp: FAILED: bad MP configuration table at 0x%x\n", addr);
        return -1;
    }
    e = t + 44;
    end = t + len;
    /* Walk the entries by the table's length, as Linux does (the entry count
     * at offset 34 is not trusted: QEMU's qboot leaves it at 0). */
    while (e < end) {
        if (e[0] == 0) {            /* processor: 20 bytes */
            if (e + 20 > end)
                break;
            if (n < max) {
                out[n].apic_id = e[1];
                out[n].flags = e[3];
            }
            n++;
            e += 20;
        } else if (e[0] <= 4) {     /* bus, I/O APIC, I/O and local interrupt: 8 */
            e += 8;
        } else {
            print("smp: FAILED: unknown MP table entry type %u\n", e[0]);
            return -1;
        }
    }
    return n;
}

static void ipi(uint8_t apic_id, uint32_t icr)
{
    struct timeout t;
    timeout_start(&t, 10);
    sys_apic_write(APIC_ICR_HIGH, (uint32_t)apic_id << 24);
    sys_apic_write(APIC_ICR_LOW, icr);
    while ((sys_apic_read(APIC_ICR_LOW) & ICR_PENDING) && !timeout_expired(&t))
        cpu_relax();
}

static int wait_alive(unsigned idx, uint64_t ms)
{
    struct timeout t;
    timeout_start(&t, ms);
    while (!pcpu[idx].alive) {
        if (timeout_expired(&t))
            return 0;
        cpu_relax();
    }
    return 1;
}

/*
 * Start every other cpu of the MP table with job (NULL: just count) and
 * wait until each cpu's counter moves.  Returns the number of cpus running,
 * the BSP included, or -1 after printing why.
 */
static uint64_t start_delay_ms;   /* smp delay_ms=: pause before each AP */

int smp_start(void (*job)(unsigned cpu), const char *who)
{
    struct mp_cpu cpus[64];
    uint8_t ids[MAX_CPUS];
    uint64_t snap[MAX_CPUS], t0;
    struct timeout t;
    uint8_t self;
    int n, i, started = 1, failed = 0;

    n = mp_cpus(cpus, 64);
    if (n < 0)
        return -1;
    if (n == 0) {
        print("%s: FAILED: the MP table lists no processor\n", who);
        return -1;
    }
    self = (uint8_t)(sys_apic_read(APIC_ID) >> 24);
    print("%s: MP table lists %d cpu(s); this is apic id %u\n", who, n, self);
    if (n > 64)
        n = 64;

    ap_job = job;
    mem_copy((void *)(uintptr_t)TRAMP_ADDR, tramp_start, (size_t)(tramp_end - tramp_start));
    ids[0] = self;
    t0 = rdtsc();
    for (i = 0; i < n; i++) {
        unsigned idx = (unsigned)started;
        if (cpus[i].apic_id == self)
            continue;
        if (!(cpus[i].flags & 1)) {
            print("%s: apic id %u is disabled in the MP table, skipped\n", who,
                  cpus[i].apic_id);
            continue;
        }
        if (idx >= MAX_CPUS) {
            print("%s: FAILED: more than %d cpus\n", who, MAX_CPUS);
            return -1;
        }
        ids[idx] = cpus[i].apic_id;
        if (start_delay_ms)
            delay_us(start_delay_ms * 1000);
        BOOTINFO->ap_index = idx;
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        ipi(cpus[i].apic_id, ICR_INIT);
        delay_us(10000);
        ipi(cpus[i].apic_id, ICR_STARTUP | (TRAMP_ADDR >> 12));
        if (!wait_alive(idx, 1)) {
            ipi(cpus[i].apic_id, ICR_STARTUP | (TRAMP_ADDR >> 12));
            if (!wait_alive(idx, SMP_TIMEOUT_MS)) {
                print("%s: FAILED: cpu %u (apic id %u) did not start within %u ms\n", who,
                      idx, cpus[i].apic_id, SMP_TIMEOUT_MS);
                return -1;
            }
        }
        started++;
    }

    /* every AP's counter must keep moving */
    for (i = 1; i < started; i++)
        snap[i] = pcpu[i].counter;
    timeout_start(&t, SMP_MOVE_MS);
    for (i = 1; i < started; i++) {
        while (pcpu[i].counter == snap[i] && !timeout_expired(&t))
            cpu_relax();
        if (pcpu[i].counter == snap[i]) {
            print("%s: cpu %d (apic id %u) started but its counter is stuck at %llu\n", who,
                  i, ids[i], (unsigned long long)snap[i]);
            failed++;
        }
    }
    if (failed) {
        print("%s: FAILED: %d cpu(s) not running\n", who, failed);
        return -1;
    }
    print("%s: all started in %llu ms\n", who, (unsigned long long)ticks_to_ms(rdtsc() - t0));
    return started;
}

int wl_smp(const struct cmdline *cl_in)
{
    static const char *const keys[] = { "seconds", "delay_ms", NULL };
    struct cmdline *cl = (struct cmdline *)cl_in;
    uint64_t seconds, s, snap[MAX_CPUS];
    struct timeout t;
    int n, i;

    if (cmdline_check_keys(cl, keys) || cmdline_u64(cl, "seconds", 0, 0, 1000000, &seconds) ||
        cmdline_u64(cl, "delay_ms", 0, 0, 60000, &start_delay_ms)) {
        print("smp: error: %s\n", cl->err);
        return EXIT_USAGE;
    }
    n = smp_start(NULL, "smp");
    if (n < 0)
        return EXIT_FAIL;
    print("smp: %d cpus running\n", n);
    /* seconds=T: keep them all counting at CPL3 for T s (checkpoint tests),
     * checking every second that every cpu's counter moved */
    for (s = 1; s <= seconds; s++) {
        for (i = 1; i < n; i++)
            snap[i] = pcpu[i].counter;
        timeout_start_wall(&t, 1000);
        while (!timeout_expired(&t))
            cpu_relax();
        for (i = 1; i < n; i++)
            if (pcpu[i].counter == snap[i]) {
                print("smp: FAILED: cpu %d stopped counting (at %llu)\n", i,
                      (unsigned long long)snap[i]);
                return EXIT_FAIL;
            }
        print("smp: %llu s, all %d cpus counting\n", (unsigned long long)s, n);
    }
    if (seconds)
        print("smp: %d cpus ran for %llu s\n", n, (unsigned long long)seconds);
    return EXIT_OK;
}
