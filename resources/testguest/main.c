/*
 * mirrorvm test guest: CPL3 entry, console, time, machine information and
 * the simple workloads (hello, counter, dirty).
 */
#include "cmdline.h"
#include "dirty.h"
#include "guest.h"

uint64_t tsc_khz;

uint64_t ms_to_ticks(uint64_t ms) { return ms * tsc_khz; }
uint64_t us_to_ticks(uint64_t us) { return us * tsc_khz / 1000; }
uint64_t ticks_to_ms(uint64_t ticks) { return ticks / tsc_khz; }

void timeout_start(struct timeout *t, uint64_t ms)
{
    t->last = rdtsc();
    t->left = ms_to_ticks(ms);
    t->cap = ms_to_ticks(TIMEOUT_MAX_GAP_MS);
}

void timeout_start_wall(struct timeout *t, uint64_t ms)
{
    timeout_start(t, ms);
    t->cap = UINT64_MAX;
}

int timeout_expired(struct timeout *t)
{
    uint64_t now = rdtsc(), ran = 0;
    if (now > t->last)
        ran = now - t->last < t->cap ? now - t->last : t->cap;
    t->last = now;
    if (ran >= t->left) {
        t->left = 0;
        return 1;
    }
    t->left -= ran;
    return 0;
}

void delay_us(uint64_t us)
{
    struct timeout t;
    timeout_start(&t, 0);
    t.left = us_to_ticks(us);
    while (!timeout_expired(&t))
        cpu_relax();
}

static int idle;

int set_idle(int on)
{
    if (on && !(BOOTINFO->cpuid1_ecx & (1u << 24)))
        return -1;
    idle = on;
    return 0;
}

uint64_t spin_until(uint64_t *deadline)
{
    uint64_t prev = rdtsc(), now;
    while ((now = rdtsc()) < *deadline) {
        if (now < prev) {
            uint64_t back = prev - now;
            *deadline = *deadline > back ? *deadline - back : 0;
        }
        prev = now;
        if (idle) {
            /* at most 10 ms per sleep: a TSC that jumps back on a restore
             * elsewhere must not leave the timer armed far in the future */
            uint64_t cap = now + ms_to_ticks(10);
            sys_sleep(*deadline < cap ? *deadline : cap);
        } else {
            cpu_relax();
        }
    }
    return now;
}

static int print_lock;

void print(const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    size_t n;
    va_start(ap, fmt);
    n = fmt_vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    /* one line at a time, whichever cpu prints */
    while (__atomic_exchange_n(&print_lock, 1, __ATOMIC_ACQUIRE))
        cpu_relax();
    sys_write(buf, n);
    __atomic_store_n(&print_lock, 0, __ATOMIC_RELEASE);
}

void guest_exit(int code)
{
    sys_exit(code);
}

/* ---- machine: Linux boot_params (zero page) ---- */
#define BP_E820_ENTRIES 0x1e8
#define BP_CMD_LINE_PTR 0x228
#define BP_E820_TABLE   0x2d0
#define E820_MAX        128

static const uint8_t *zero_page(void)
{
    return (const uint8_t *)(uintptr_t)BOOTINFO->zero_page;
}

/* PVH boot: struct hvm_start_info */
#define PVH_MAGIC           0x336ec578u
#define PVH_VERSION         4
#define PVH_CMDLINE_PADDR   24
#define PVH_MEMMAP_PADDR    40
#define PVH_MEMMAP_ENTRIES  48

static const uint8_t *pvh_info(void)
{
    const uint8_t *p = (const uint8_t *)(uintptr_t)BOOTINFO->pvh_info;
    uint32_t magic;
    if (!p)
        return NULL;
    mem_copy(&magic, p, 4);
    return magic == PVH_MAGIC ? p : NULL;
}

int machine_e820(struct e820_entry *out, int max)
{
    const uint8_t *zp = zero_page(), *pvh = pvh_info();
    int n, i;

    if (pvh) {
        /* hvm_memmap_table_entry: u64 addr, u64 size, u32 type, u32 reserved */
        uint32_t version, count;
        uint64_t table;
        mem_copy(&version, pvh + PVH_VERSION, 4);
        mem_copy(&table, pvh + PVH_MEMMAP_PADDR, 8);
        mem_copy(&count, pvh + PVH_MEMMAP_ENTRIES, 4);
        if (version < 1 || !table)
            return 0;
        n = count > E820_MAX ? E820_MAX : (int)count;
        if (n > max)
            n = max;
        for (i = 0; i < n; i++) {
            const uint8_t *e = (const uint8_t *)(uintptr_t)table + 24 * i;
            mem_copy(&out[i].addr, e, 8);
            mem_copy(&out[i].size, e + 8, 8);
            mem_copy(&out[i].type, e + 16, 4);
        }
        return n;
    }
    n = zp[BP_E820_ENTRIES];
    if (n > E820_MAX)
        n = E820_MAX;
    if (n > max)
        n = max;
    for (i = 0; i < n; i++) {
        const uint8_t *e = zp + BP_E820_TABLE + 20 * i;
        mem_copy(&out[i].addr, e, 8);
        mem_copy(&out[i].size, e + 8, 8);
        mem_copy(&out[i].type, e + 16, 4);
    }
    return n;
}

uint64_t machine_ram_end(uint64_t addr)
{
    struct e820_entry map[E820_MAX];
    int n = machine_e820(map, E820_MAX), i;
    for (i = 0; i < n; i++)
        if (map[i].type == 1 && addr >= map[i].addr && addr < map[i].addr + map[i].size)
            return map[i].addr + map[i].size;
    return 0;
}

static uint64_t machine_ram_total(void)
{
    struct e820_entry map[E820_MAX];
    int n = machine_e820(map, E820_MAX), i;
    uint64_t total = 0;
    for (i = 0; i < n; i++)
        if (map[i].type == 1)
            total += map[i].size;
    return total;
}

const char *machine_cmdline(void)
{
    const uint8_t *pvh = pvh_info();
    uint64_t p = 0;
    if (pvh)
        mem_copy(&p, pvh + PVH_CMDLINE_PADDR, 8);
    else if (zero_page())
        mem_copy(&p, zero_page() + BP_CMD_LINE_PTR, 4);
    return p ? (const char *)(uintptr_t)p : "";
}

/* ---- workloads ---- */
static struct cmdline cl;

static __attribute__((noreturn)) void usage_error(const char *msg)
{
    print("testguest: error: %s\n", msg);
    print("testguest: usage: hello | disk [records=N] [seed=S] [mode=write|verify|both] [rounds=R]"
          " | dirty [pages_per_ms=N] [mb=M] [seconds=T] [verify=0|1] [idle=0|1] [report_ms=N]"
          " | counter [interval_ms=N] [limit=N] [idle=0|1] | smp [seconds=T] [delay_ms=D] | hostile"
          " | mix [seconds=T] [records=N] [seed=S] [pages_per_ms=N] [mb=M]"
          " | pauses [seconds=T] [threshold_us=N] | fault [kind=ud|gp|pf|de|kpf|vmcall]\n");
    print("testguest: exit %d (usage)\n", EXIT_USAGE);
    guest_exit(EXIT_USAGE);
}

static void check_keys(const char *const *allowed)
{
    if (cmdline_check_keys(&cl, allowed))
        usage_error(cl.err);
}

static uint64_t opt_u64(const char *key, uint64_t def, uint64_t min, uint64_t max)
{
    uint64_t v;
    if (cmdline_u64(&cl, key, def, min, max, &v))
        usage_error(cl.err);
    return v;
}

/* idle=0|1: halt between paced steps instead of spinning */
static void opt_idle(void)
{
    if (opt_u64("idle", 0, 0, 1) && set_idle(1))
        print("testguest: warning: no TSC-deadline timer (CPUID 1 ecx bit 24): "
              "spinning instead of idling\n");
}

static int wl_hello(void)
{
    static const char *const keys[] = { NULL };
    check_keys(keys);
    print("mirrorvm test guest: hello\n");
    return EXIT_OK;
}

static int wl_counter(void)
{
    static const char *const keys[] = { "interval_ms", "limit", "idle", NULL };
    uint64_t interval, limit, n, next, step;
    check_keys(keys);
    interval = opt_u64("interval_ms", 100, 1, 3600000);
    limit = opt_u64("limit", 0, 0, UINT64_MAX);
    opt_idle();
    step = ms_to_ticks(interval);
    next = rdtsc() + step;
    for (n = 1; limit == 0 || n <= limit; n++) {
        uint64_t now = spin_until(&next);
        print("counter %llu\n", (unsigned long long)n);
        next += step;
        if (now > next)      /* fell behind (VM paused): do not burst */
            next = now + step;
    }
    print("counter: done, %llu lines\n", (unsigned long long)limit);
    return EXIT_OK;
}

static int wl_dirty(void)
{
    static const char *const keys[] = { "pages_per_ms", "mb", "seconds", "verify", "idle",
                                        "report_ms", NULL };
    uint64_t ppm, mb, seconds, base, next, tick, ms = 0, report = 0, every;
    struct dirty g;
    check_keys(keys);
    ppm = opt_u64("pages_per_ms", 100, 1, 1000000);
    mb = opt_u64("mb", 32, 1, 1 << 20);
    seconds = opt_u64("seconds", 0, 0, 1000000);
    every = opt_u64("report_ms", 1000, 1, 1000);
    opt_idle();

    base = ((uint64_t)(uintptr_t)_end + (1 << 20) - 1) & ~(uint64_t)((1 << 20) - 1);
    if (dirty_setup(&g, base, mb, ppm, (int)opt_u64("verify", 1, 0, 1), "dirty"))
        return EXIT_FAIL;
    print("dirty: %llu pages/ms over %llu MiB at 0x%llx, %s%llu s%s\n",
          (unsigned long long)g.ppm, (unsigned long long)(g.npages >> 8),
          (unsigned long long)g.start, seconds ? "" : "forever; report every ",
          (unsigned long long)(seconds ? seconds : 1),
          g.verify ? ", checking every page still holds its previous write" : "");

    tick = ms_to_ticks(1);
    next = rdtsc() + tick;
    for (;;) {
        uint64_t now;
        if (dirty_step(&g)) {
            print("dirty: FAILED: %llu page(s) lost their last write\n",
                  (unsigned long long)g.bad);
            return EXIT_FAIL;
        }
        ms++;
        now = spin_until(&next);
        next += tick;
        if (now > next + 10 * tick)   /* paused for a while: resynchronise */
            next = now + tick;
        if (ms % every == 0 && every != 1000)  /* finer progress, for benchmarks */
            print("dirty: %llu ms, %llu pages dirtied\n", (unsigned long long)ms,
                  (unsigned long long)g.total);
        if (ms % 1000 == 0) {         /* one report per 1000 paced milliseconds */
            report++;
            if (every == 1000)
                print("dirty: %llu s, %llu pages dirtied\n", (unsigned long long)report,
                      (unsigned long long)g.total);
            if (seconds && report >= seconds)
                break;
        }
    }
    print("dirty: done, %llu pages dirtied in %llu ms\n", (unsigned long long)g.total,
          (unsigned long long)ms);
    return EXIT_OK;
}

/* Raise a CPU exception at CPL3 on purpose: the CPL0 handler must report
 * it and end the run with EXIT_EXCEPTION. */
static int wl_fault(void)
{
    static const char *const keys[] = { "kind", NULL };
    size_t len;
    const char *kind;
    check_keys(keys);
    kind = cmdline_str(&cl, "kind", &len);
    if (!kind) {
        kind = "ud";
        len = 2;
    }
    print("fault: raising %.*s at CPL3; expect exit %d\n", (int)len, kind, EXIT_EXCEPTION);
    if (str_eqn(kind, len, "ud")) {
        __asm__ volatile("ud2");
    } else if (str_eqn(kind, len, "gp")) {
        __asm__ volatile("hlt");
    } else if (str_eqn(kind, len, "pf")) {
        *(volatile uint64_t *)(uintptr_t)0x8000000000ull = 1; /* not mapped */
    } else if (str_eqn(kind, len, "kpf")) {
        sys_write((const void *)(uintptr_t)0x8000000000ull, 1); /* #PF at CPL0 */
    } else if (str_eqn(kind, len, "vmcall")) {
        /* Not an exception: the vCPU hangs in KVM (see SYS_HANG). */
        print("fault: vmcall at CPL0: this vCPU now hangs where no kick reaches it\n");
        sys_call2(SYS_HANG, 0, 0);
    } else if (str_eqn(kind, len, "de")) {
        volatile unsigned zero = 0, one = 1;
        one /= zero;
    } else {
        usage_error("fault: kind must be ud, gp, pf, de, kpf or vmcall");
    }
    print("fault: FAILED: no exception\n");
    return EXIT_FAIL;
}

static void bsp_main(void)
{
    const char *cmd = machine_cmdline();
    int code;

    tsc_khz = BOOTINFO->tsc_khz;
    if (tsc_khz < 100000 || tsc_khz > 20000000) {
        print("testguest: warning: CPUID 0x40000010 gives no usable TSC frequency"
              " (%llu kHz, max hypervisor leaf 0x%x); assuming %u kHz\n",
              (unsigned long long)tsc_khz, BOOTINFO->hv_max_leaf, TSC_KHZ_FALLBACK);
        tsc_khz = TSC_KHZ_FALLBACK;
    }
    print("testguest: cmdline \"%.300s\"; %llu MiB RAM, TSC %llu kHz%s\n", cmd,
          (unsigned long long)(machine_ram_total() >> 20), (unsigned long long)tsc_khz,
          pvh_info() ? "; PVH boot" : "");

    if (cmdline_parse(cmd, &cl))
        usage_error(cl.err);

    if (str_eqn(cl.workload, cl.wlen, "hello"))
        code = wl_hello();
    else if (str_eqn(cl.workload, cl.wlen, "counter"))
        code = wl_counter();
    else if (str_eqn(cl.workload, cl.wlen, "dirty"))
        code = wl_dirty();
    else if (str_eqn(cl.workload, cl.wlen, "disk"))
        code = wl_disk(&cl);
    else if (str_eqn(cl.workload, cl.wlen, "hostile"))
        code = wl_hostile(&cl);
    else if (str_eqn(cl.workload, cl.wlen, "smp"))
        code = wl_smp(&cl);
    else if (str_eqn(cl.workload, cl.wlen, "pauses"))
        code = wl_pauses(&cl);
    else if (str_eqn(cl.workload, cl.wlen, "mix"))
        code = wl_mix(&cl);
    else if (str_eqn(cl.workload, cl.wlen, "fault"))
        code = wl_fault();
    else {
        char msg[96];
        fmt_snprintf(msg, sizeof msg, "unknown workload '%.*s'", (int)cl.wlen, cl.workload);
        usage_error(msg);
    }
    print("testguest: exit %d (%s)\n", code,
          code == EXIT_OK ? "success" : code == EXIT_USAGE ? "usage" : "failure");
    guest_exit(code);
}

/* Entered from CPL0 by iretq, as if called: cpl3_entry(cpu index). */
__attribute__((noreturn, used)) void cpl3_entry(unsigned cpu);
void cpl3_entry(unsigned cpu)
{
    if (cpu != 0)
        ap_main(cpu);
    bsp_main();
    guest_exit(EXIT_FAIL);
}
