/*
 * mirrorvm test guest: fixed layout and ABI constants.
 *
 * Included by the CPL0 assembly, the CPL3 C code and (through the C
 * preprocessor) the linker script, so it holds #defines only.  Plain
 * integer literals (no U/L suffixes): gas and ld parse them too.
 */
#ifndef TESTGUEST_LAYOUT_H
#define TESTGUEST_LAYOUT_H

/* The image is linked (and loaded, by p_paddr) here; identity mapped. */
#define IMAGE_BASE          0x200000

/* CPL0 code: exception stubs first, 16 bytes per vector 0..31, then the
 * shared interrupt handler for vectors 32..255 at stub slot 32. */
#define CPL0_TEXT_ADDR      0x200000
#define CPL0_TEXT_MAX       0x4000
#define STUB_SIZE           16
#define IRQ_STUB_ADDR       (CPL0_TEXT_ADDR + 32 * STUB_SIZE)

/* CPL0 data (all built by the assembler, no runtime loops). */
#define CPL0_DATA_ADDR      0x204000
#define PML4_ADDR           0x204000
#define PDPT_ADDR           0x205000
#define PD_ADDR             0x206000   /* 4 pages: 4 GiB of 2 MiB pages */
#define IDT_ADDR            0x20a000   /* 256 gates of 16 bytes */
#define GDT_ADDR            0x20b000
#define TSS_ADDR            0x20c000   /* MAX_CPUS TSSs, TSS_STRIDE apart */
#define TSS_STRIDE          128
#define BOOTINFO_ADDR       0x20d000   /* struct bootinfo, see guest.h */
#define CPL0_DATA_END       0x20e000

#define MAX_CPUS            32         /* as many as mirrorvm run --cpus allows */

/* GDT selectors */
#define SEL_KCODE           0x08
#define SEL_KDATA           0x10
#define SEL_UDATA           0x18       /* use with RPL 3: 0x1b */
#define SEL_UCODE           0x20       /* use with RPL 3: 0x23 */
#define SEL_TSS0            0x28       /* TSS of cpu i: SEL_TSS0 + 16 * i */

/* Per-cpu stacks (in .bss) */
#define KSTACK_SHIFT        14         /* 16 KiB CPL0 stack per cpu */
#define USTACK_SHIFT        16         /* 64 KiB CPL3 stack per cpu */

/* The AP start-up trampoline is copied here (SIPI vector 0x06). */
#define TRAMP_ADDR          0x6000

#define LAPIC_BASE          0xfee00000
#define SERIAL_PORT         0x3f8
#define EXIT_PORT           0xf4

/* System calls: int3 (vector 3, DPL3 gate) with the number in rax. */
#define SYS_WRITE           0   /* rdi = buffer, rsi = length -> rax = 0 */
#define SYS_EXIT            1   /* rdi = exit code (low byte); never returns */
#define SYS_APIC_READ       2   /* rdi = LAPIC register offset -> rax = value */
#define SYS_APIC_WRITE      3   /* rdi = LAPIC register offset, rsi = value */
#define SYS_HANG            5   /* vmcall at CPL0: a vCPU KVM cannot interrupt under kvm_pvm (tests the VMM watchdog) */
#define SYS_SLEEP           4   /* rdi = TSC deadline: arm the TSC-deadline
                                   timer, sti; hlt until an interrupt */

/* LAPIC timer vector (TSC-deadline mode, programmed on every cpu) */
#define TIMER_VECTOR        0x40

/* Exit codes written to EXIT_PORT */
#define EXIT_OK             0
#define EXIT_FAIL           1   /* the workload's check failed */
#define EXIT_USAGE          2   /* bad command line */
#define EXIT_EXCEPTION      3   /* unexpected CPU exception */

#endif
