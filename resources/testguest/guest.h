/*
 * mirrorvm test guest: shared declarations for the CPL3 C code.
 */
#ifndef TESTGUEST_GUEST_H
#define TESTGUEST_GUEST_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include "layout.h"
#include "util.h"

/* Filled by the CPL0 setup code (cpl0.S) at BOOTINFO_ADDR. */
struct bootinfo {
    uint64_t zero_page;     /* RSI at entry: Linux boot_params */
    uint32_t tsc_khz;       /* CPUID 0x40000010 EAX */
    uint32_t hv_max_leaf;   /* CPUID 0x40000000 EAX */
    uint32_t ap_index;      /* index of the AP being started (smp) */
    uint32_t cpuid1_ecx;    /* CPUID 1 ECX (bit 24: TSC-deadline timer) */
    uint64_t pvh_info;      /* EBX at the PVH entry: hvm_start_info; else 0 */
};
#define BOOTINFO ((volatile struct bootinfo *)(uintptr_t)BOOTINFO_ADDR)

/* Symbols of the image */
extern char tramp_start[], tramp_end[], _end[];

/* ---- system calls (int3 through the DPL3 gate) ---- */
static inline long sys_call2(long nr, long a, long b)
{
    long ret;
    __asm__ volatile("int3"
                     : "=a"(ret), "+D"(a), "+S"(b)
                     : "a"(nr)
                     : "rcx", "rdx", "memory");
    return ret;
}

static inline void sys_write(const void *buf, size_t len)
{
    sys_call2(SYS_WRITE, (long)(uintptr_t)buf, (long)len);
}

__attribute__((noreturn)) static inline void sys_exit(int code)
{
    sys_call2(SYS_EXIT, code, 0);
    for (;;)
        __asm__ volatile("pause");
}

static inline uint32_t sys_apic_read(uint32_t reg)
{
    return (uint32_t)sys_call2(SYS_APIC_READ, reg, 0);
}

static inline void sys_apic_write(uint32_t reg, uint32_t val)
{
    sys_call2(SYS_APIC_WRITE, reg, val);
}

/* Halt until an interrupt, at the latest the TSC reaching deadline. */
static inline void sys_sleep(uint64_t deadline)
{
    sys_call2(SYS_SLEEP, (long)deadline, 0);
}

/* ---- time ---- */
static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("lfence; rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

static inline void cpu_relax(void)
{
    __asm__ volatile("pause" ::: "memory");
}

#define TSC_KHZ_FALLBACK 2000000u  /* used when CPUID 0x40000010 gives nothing */
extern uint64_t tsc_khz;           /* ticks per millisecond */
uint64_t ms_to_ticks(uint64_t ms);
uint64_t us_to_ticks(uint64_t us);
uint64_t ticks_to_ms(uint64_t ticks);
void delay_us(uint64_t us);

/*
 * A timeout that counts only the time the vCPU ran: a gap of more than
 * TIMEOUT_MAX_GAP_MS between two polls (the VM was paused for a checkpoint,
 * restored on another host, or descheduled) counts as that much, and a TSC
 * going backwards counts as nothing.  So a pause or a failover never fires
 * a timeout by itself, and a TSC that restarts lower never makes a wait
 * last for ever.
 */
#define TIMEOUT_MAX_GAP_MS 10
struct timeout {
    uint64_t last;   /* TSC at the previous poll */
    uint64_t left;   /* ticks still to run */
    uint64_t cap;    /* the most one gap between polls counts for */
};
void timeout_start(struct timeout *t, uint64_t ms);
/* The same for wall-clock periods ("run for T seconds", reports): any gap
 * counts in full, only a TSC going backwards counts as nothing.  Suits code
 * that polls rarely. */
void timeout_start_wall(struct timeout *t, uint64_t ms);
int timeout_expired(struct timeout *t);  /* polls; 1 once the time ran out */

/*
 * Pacing: spin until the TSC reaches *deadline and return the TSC.  If the
 * TSC goes backwards meanwhile, *deadline moves back by as much, so a
 * periodic schedule (deadline += period) keeps its cadence.
 */
uint64_t spin_until(uint64_t *deadline);

/*
 * With idle set (option idle=1 of counter and dirty), spin_until halts the
 * vCPU in SYS_SLEEP (TSC-deadline timer, at most 10 ms at a time) instead
 * of spinning, leaving the host CPU free.  Returns 0, or -1 if the CPU has
 * no TSC-deadline timer.
 */
int set_idle(int on);

/* ---- console ---- */
void print(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
__attribute__((noreturn)) void guest_exit(int code);

/* ---- machine ---- */
struct e820_entry {
    uint64_t addr, size;
    uint32_t type;
};
int machine_e820(struct e820_entry *out, int max);
/* End of the usable RAM range that contains addr (0 if none). */
uint64_t machine_ram_end(uint64_t addr);
const char *machine_cmdline(void);

/* ---- workloads ---- */
struct cmdline;
struct vblk;
/* Probe the command line's virtio-mmio devices for a virtio-blk one. */
int find_blk(const struct cmdline *cl, struct vblk *d, const char *who);
/* disk.c: bring up the disk; a round of records (see README); verify them */
int disk_open(const struct cmdline *cl, struct vblk *d, const char *who);
int disk_round(struct vblk *d, uint32_t n, uint64_t seed, uint64_t r, const char *who);
int disk_verify(struct vblk *d, uint32_t n, uint64_t seed, const char *who);
int wl_disk(const struct cmdline *cl);
int wl_hostile(const struct cmdline *cl);
int wl_smp(const struct cmdline *cl);
int wl_mix(const struct cmdline *cl);
int wl_pauses(const struct cmdline *cl);
void ap_main(unsigned cpu) __attribute__((noreturn));

/* smp.c: start the other cpus running job (NULL: count); see smp.c */
int smp_start(void (*job)(unsigned cpu), const char *who);
void smp_tick(unsigned cpu);   /* a job shows it is alive */

#endif
