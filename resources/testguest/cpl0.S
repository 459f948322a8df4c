/*
 * mirrorvm test guest: everything that runs at CPL0.
 *
 * Only setup and trap/interrupt service live here.  Under the software-nested
 * KVM of our test machines every CPL0 instruction is emulated (~0.6 us each)
 * and the emulator lacks x87 (but fninit), SSE arithmetic, xsave, int3/int n,
 * vmcall and rdtscp; check-cpl0.sh verifies none of them appear in the CPL0
 * sections of the final ELF.  Tables (page tables, GDT, IDT, TSSs) are built
 * by the assembler at fixed addresses (layout.h), so setup is a handful of
 * instructions per CPU.
 *
 * Sections:
 *   .text.cpl0.stubs  vector stubs, at CPL0_TEXT_ADDR (16 bytes per vector)
 *   .text.cpl0        the rest of the CPL0 code
 *   .data.cpl0        tables and boot info, at CPL0_DATA_ADDR
 *   .text.trampoline  AP start-up code, copied to TRAMP_ADDR by CPL3
 *   .text.pvh32       32-bit PVH entry (for QEMU and other PVH loaders)
 *   .note.Xen         the PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)
 */
#include "layout.h"

#define BI_ZERO_PAGE    (BOOTINFO_ADDR + 0)
#define BI_TSC_KHZ      (BOOTINFO_ADDR + 8)
#define BI_HV_MAX_LEAF  (BOOTINFO_ADDR + 12)
#define BI_AP_INDEX     (BOOTINFO_ADDR + 16)
#define BI_CPUID1_ECX   (BOOTINFO_ADDR + 20)
#define BI_PVH_INFO     (BOOTINFO_ADDR + 24)

/* ------------------------------------------------------------------------ */
/* Vector stubs                                                             */
/* ------------------------------------------------------------------------ */
        .section .text.cpl0.stubs, "ax", @progbits
        .code64
        .globl  isr_stubs
isr_stubs:
        .set    vec, 0
        .rept   32
        .org    vec * STUB_SIZE, 0x90
        .if     vec == 2
        iretq                           /* NMI: nothing to do */
        .elseif vec == 3
        jmp     isr_syscall             /* int3 from CPL3: system call */
        .else
        .if     (vec == 8) || (vec == 10) || (vec == 11) || (vec == 12) || (vec == 13) || (vec == 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
        /* the CPU pushed an error code */
        .else
        pushq   $0
        .endif
        pushq   $vec
        jmp     exc_common
        .endif
        .set    vec, vec + 1
        .endr

        /* vectors 32..255: acknowledge the LAPIC and return */
        .org    32 * STUB_SIZE, 0x90
        .globl  isr_irq
isr_irq:
        pushq   %rax
        movl    $(LAPIC_BASE + 0xb0), %eax
        movl    $0, (%rax)
        popq    %rax
        iretq

/* ------------------------------------------------------------------------ */
/* Entry, per-cpu setup, system calls, exceptions                           */
/* ------------------------------------------------------------------------ */
        .section .text.cpl0, "ax", @progbits
        .code64

/* BSP entry (Linux 64-bit boot protocol): long mode, CPL0, RSI = zero page. */
        .globl  _start
_start:
        cli
        movq    %rsi, BI_ZERO_PAGE
        movl    $PML4_ADDR, %eax
        movq    %rax, %cr3
        lgdt    gdt_ptr
        movl    $SEL_KDATA, %eax
        movw    %ax, %ds
        movw    %ax, %es
        movw    %ax, %ss
        xorl    %eax, %eax
        movw    %ax, %fs
        movw    %ax, %gs
        movq    $(kstacks + (1 << KSTACK_SHIFT)), %rsp  /* cpu 0's: no need to trust the loader's */
        pushq   $SEL_KCODE
        pushq   $bsp_common
        lretq

/* PVH entry, continued in long mode (see pvh_start): CS is already ours. */
pvh_entry64:
        movl    $SEL_KDATA, %eax
        movw    %ax, %ds
        movw    %ax, %es
        movw    %ax, %ss
        xorl    %eax, %eax
        movw    %ax, %fs
        movw    %ax, %gs
        movq    $(kstacks + (1 << KSTACK_SHIFT)), %rsp

bsp_common:
        /* 8259 PICs: move their vectors to 0x20..0x2f (so that even a
         * spurious IRQ 7/15 is not taken for an exception), then mask all
         * lines.  Devices' interrupts are never used: drivers poll. */
        movb    $0x11, %al
        outb    %al, $0x20
        outb    %al, $0xa0
        movb    $0x20, %al
        outb    %al, $0x21
        movb    $0x28, %al
        outb    %al, $0xa1
        movb    $4, %al
        outb    %al, $0x21
        movb    $2, %al
        outb    %al, $0xa1
        movb    $1, %al
        outb    %al, $0x21
        outb    %al, $0xa1
        movb    $0xff, %al
        outb    %al, $0x21
        outb    %al, $0xa1
        /* TSC frequency in kHz (leaf 0x40000010, VMware/QEMU convention) */
        movl    $0x40000000, %eax
        xorl    %ecx, %ecx
        cpuid
        movl    %eax, BI_HV_MAX_LEAF
        movl    $0x40000010, %eax
        xorl    %ecx, %ecx
        cpuid
        movl    %eax, BI_TSC_KHZ
        movl    $1, %eax
        xorl    %ecx, %ecx
        cpuid
        movl    %ecx, BI_CPUID1_ECX
        xorl    %edi, %edi
        jmp     cpu_common

/* AP entry, reached from the trampoline in long mode on its temporary GDT. */
        .globl  ap_entry64
ap_entry64:
        movl    BI_AP_INDEX, %edi
        lgdt    gdt_ptr
        movl    $SEL_KDATA, %eax
        movw    %ax, %ds
        movw    %ax, %es
        movw    %ax, %ss
        xorl    %eax, %eax
        movw    %ax, %fs
        movw    %ax, %gs
        movl    %edi, %eax
        incl    %eax
        shlq    $KSTACK_SHIFT, %rax
        addq    $kstacks, %rax
        movq    %rax, %rsp
        pushq   $SEL_KCODE
        pushq   $cpu_common
        lretq

/* Per-cpu setup; edi = cpu index.  Ends by dropping to CPL3. */
cpu_common:
        movl    %edi, %eax
        incl    %eax
        shlq    $KSTACK_SHIFT, %rax
        addq    $kstacks, %rax
        movq    %rax, %rsp
        movl    %edi, %ecx
        shll    $7, %ecx                        /* TSS_STRIDE */
        movq    %rax, (TSS_ADDR + 4)(%rcx)      /* tss.rsp0 */
        /* SSE for CPL3: CR0.EM=0 TS=0 MP=1 NE=1; CR4.OSFXSR|OSXMMEXCPT, no SMEP/SMAP */
        movq    %cr0, %rax
        andq    $~0xc, %rax
        orq     $0x22, %rax
        movq    %rax, %cr0
        movq    %cr4, %rax
        orq     $0x600, %rax
        andq    $~0x300000, %rax
        movq    %rax, %cr4
        fninit
        lidt    idt_ptr
        movl    %edi, %eax
        shll    $4, %eax
        addl    $SEL_TSS0, %eax
        ltr     %ax
        /* software-enable the LAPIC (spurious vector 0xff) */
        movl    $(LAPIC_BASE + 0xf0), %eax
        movl    $0x1ff, (%rax)
        /* LVT timer: TSC-deadline mode, TIMER_VECTOR (used by SYS_SLEEP) */
        movl    $(LAPIC_BASE + 0x320), %eax
        movl    $((2 << 17) | TIMER_VECTOR), (%rax)
        /* iretq to cpl3_entry(cpu) on this cpu's user stack */
        movl    %edi, %eax
        incl    %eax
        shlq    $USTACK_SHIFT, %rax
        addq    $ustacks, %rax
        subq    $8, %rax
        pushq   $(SEL_UDATA | 3)
        pushq   %rax
        pushq   $0x202
        pushq   $(SEL_UCODE | 3)
        pushq   $cpl3_entry
        iretq

/* int3 through the DPL3 gate.  rax = number, rdi/rsi = arguments, result in
 * rax.  Clobbers rcx, rdx, rsi, rdi (the wrappers in guest.h say so).
 * SYS_SLEEP takes the (interrupt-gate) handler's IF=0 through sti; hlt: the
 * timer interrupt nests on this stack, then cli and return. */
isr_syscall:
        cmpl    $SYS_WRITE, %eax
        jne     2f
        movl    $SERIAL_PORT, %edx
        testq   %rsi, %rsi
        jz      1f
0:      movb    (%rdi), %al
        outb    %al, %dx
        incq    %rdi
        decq    %rsi
        jnz     0b
1:      xorl    %eax, %eax
        iretq
2:      cmpl    $SYS_SLEEP, %eax
        jne     10f
        movl    %edi, %eax
        shrq    $32, %rdi
        movl    %edi, %edx
        movl    $0x6e0, %ecx                    /* IA32_TSC_DEADLINE */
        wrmsr
        sti                                     /* hlt runs in sti's shadow: */
        hlt                                     /* no wake-up is lost */
        cli
        xorl    %eax, %eax
        iretq
10:     cmpl    $SYS_EXIT, %eax
        jne     3f
        movl    %edi, %eax
        jmp     do_exit
3:      cmpl    $SYS_APIC_READ, %eax
        jne     4f
        andl    $0xff0, %edi
        movl    $LAPIC_BASE, %eax
        addq    %rdi, %rax
        movl    (%rax), %eax
        iretq
4:      cmpl    $SYS_APIC_WRITE, %eax
        jne     5f
        andl    $0xff0, %edi
        movl    $LAPIC_BASE, %eax
        addq    %rdi, %rax
        movl    %esi, (%rax)
        xorl    %eax, %eax
        iretq
5:      cmpl    $SYS_HANG, %eax
        jne     7f
        /* The one deliberate forbidden instruction (check-cpl0.sh allows exactly
         * this address): under kvm_pvm, vmcall at CPL0 spins the vCPU inside
         * KVM_RUN where no kick reaches it. `fault kind=vmcall` uses it to test
         * that the VMM gives up on such a vCPU with a clear message. */
        .globl  deliberate_vmcall
deliberate_vmcall:
        vmcall
        jmp     deliberate_vmcall
7:      movq    $-1, %rax
        iretq

/* al = exit code.  Port 0xf4 ends the run; the i8042 reset is a fallback. */
do_exit:
        outb    %al, $EXIT_PORT
        movb    $0xfe, %al
        outb    %al, $0x64
6:      cli
        hlt
        jmp     6b

/* Unexpected exception.  Stack: vector, error code, rip, cs, rflags, rsp, ss */
exc_common:
        leaq    msg_exc(%rip), %rsi
        call    puts
        movq    (%rsp), %rax
        movl    $2, %ecx
        call    puthex
        movb    $' ', %al
        call    putc
        movq    (%rsp), %rax
        leaq    exc_names(%rip), %rsi
        leaq    (%rsi,%rax,4), %rsi
        call    puts
        leaq    msg_cpl(%rip), %rsi
        call    puts
        movq    24(%rsp), %rax
        andl    $3, %eax
        movl    $1, %ecx
        call    puthex
        leaq    msg_err(%rip), %rsi
        call    puts
        movq    8(%rsp), %rax
        movl    $8, %ecx
        call    puthex
        leaq    msg_rip(%rip), %rsi
        call    puts
        movq    16(%rsp), %rax
        movl    $16, %ecx
        call    puthex
        leaq    msg_rsp(%rip), %rsi
        call    puts
        movq    40(%rsp), %rax
        movl    $16, %ecx
        call    puthex
        leaq    msg_cr2(%rip), %rsi
        call    puts
        movq    %cr2, %rax
        movl    $16, %ecx
        call    puthex
        leaq    msg_apic(%rip), %rsi
        call    puts
        movl    $(LAPIC_BASE + 0x20), %eax
        movl    (%rax), %eax
        shrl    $24, %eax
        movl    $2, %ecx
        call    puthex
        leaq    msg_end(%rip), %rsi
        call    puts
        movb    $EXIT_EXCEPTION, %al
        jmp     do_exit

/* putc: al.  Clobbers dx. */
putc:
        movl    $SERIAL_PORT, %edx
        outb    %al, %dx
        ret

/* puts: rsi = NUL-terminated string.  Clobbers rax, rdx, rsi. */
puts:
        movl    $SERIAL_PORT, %edx
7:      movb    (%rsi), %al
        testb   %al, %al
        jz      8f
        outb    %al, %dx
        incq    %rsi
        jmp     7b
8:      ret

/* puthex: rax = value, ecx = number of hex digits (1..16).  Clobbers rax,
 * rbx, rcx, rdx, rsi. */
puthex:
        movq    %rax, %rbx
        movl    $SERIAL_PORT, %edx
        leaq    hexdigits(%rip), %rsi
9:      decl    %ecx
        movq    %rbx, %rax
        shlb    $2, %cl
        shrq    %cl, %rax
        shrb    $2, %cl
        andl    $15, %eax
        movb    (%rsi,%rax), %al
        outb    %al, %dx
        testl   %ecx, %ecx
        jnz     9b
        ret

        .section .rodata.cpl0, "a", @progbits
hexdigits:
        .ascii  "0123456789abcdef"
msg_exc:
        .asciz  "\n*** testguest: unexpected CPU exception, vector 0x"
msg_cpl:
        .asciz  " at CPL"
msg_err:
        .asciz  ": error code 0x"
msg_rip:
        .asciz  " rip 0x"
msg_rsp:
        .asciz  " rsp 0x"
msg_cr2:
        .asciz  " cr2 0x"
msg_apic:
        .asciz  " apic id 0x"
msg_end:
        .asciz  "\n*** testguest: exit 3 (exception)\n"
        .balign 4
exc_names:      /* 4 bytes per vector */
        .asciz  "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM"
        .asciz  "#DF", "#MF", "#TS", "#NP", "#SS", "#GP", "#PF", "#15"
        .asciz  "#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "#22", "#23"
        .asciz  "#24", "#25", "#26", "#27", "#HV", "#VC", "#SX", "#31"

/* ------------------------------------------------------------------------ */
/* Tables                                                                   */
/* ------------------------------------------------------------------------ */
        .section .data.cpl0, "aw", @progbits
        .globl  pml4
pml4:                                   /* at PML4_ADDR */
        .quad   PDPT_ADDR + 0x7         /* P | RW | US */
        .fill   511, 8, 0

        .org    PDPT_ADDR - CPL0_DATA_ADDR
pdpt:
        .quad   PD_ADDR + 0x0000 + 0x7
        .quad   PD_ADDR + 0x1000 + 0x7
        .quad   PD_ADDR + 0x2000 + 0x7
        .quad   PD_ADDR + 0x3000 + 0x7
        .fill   508, 8, 0

        .org    PD_ADDR - CPL0_DATA_ADDR
pd:     /* 2048 x 2 MiB, P | RW | US | PS; the top GiB (MMIO) uncached */
        .set    i, 0
        .rept   2048
        .if     i < 1536
        .quad   (i << 21) | 0x87
        .else
        .quad   (i << 21) | 0x9f
        .endif
        .set    i, i + 1
        .endr

        .org    IDT_ADDR - CPL0_DATA_ADDR
idt:    /* interrupt gates; vector 3 has DPL 3 (system call) */
        .set    vec, 0
        .rept   256
        .if     vec < 32
        .set    handler, CPL0_TEXT_ADDR + vec * STUB_SIZE
        .else
        .set    handler, IRQ_STUB_ADDR
        .endif
        .word   handler & 0xffff
        .word   SEL_KCODE
        .byte   0
        .if     vec == 3
        .byte   0xee
        .else
        .byte   0x8e
        .endif
        .word   (handler >> 16) & 0xffff
        .long   0
        .long   0
        .set    vec, vec + 1
        .endr

        .org    GDT_ADDR - CPL0_DATA_ADDR
gdt:
        .quad   0
        .quad   0x00af9a000000ffff      /* 0x08 kernel code, 64-bit */
        .quad   0x00cf92000000ffff      /* 0x10 kernel data */
        .quad   0x00cff2000000ffff      /* 0x18 user data, DPL 3 */
        .quad   0x00affa000000ffff      /* 0x20 user code, 64-bit, DPL 3 */
        .set    cpu, 0
        .rept   MAX_CPUS                /* 0x28 + 16 * cpu: 64-bit TSS */
        .set    tss, TSS_ADDR + cpu * TSS_STRIDE
        .quad   103 | ((tss & 0xffffff) << 16) | (0x89 << 40) | (((tss >> 24) & 0xff) << 56)
        .quad   0
        .set    cpu, cpu + 1
        .endr
gdt_end:
        .balign 8
        .word   0, 0, 0
gdt_ptr:
        .word   gdt_end - gdt - 1
        .quad   GDT_ADDR
        .word   0, 0, 0
idt_ptr:
        .word   256 * 16 - 1
        .quad   IDT_ADDR

        .org    TSS_ADDR - CPL0_DATA_ADDR
tss_array:
        .rept   MAX_CPUS
        .fill   102, 1, 0
        .word   104                     /* I/O map base: no bitmap */
        .fill   24, 1, 0
        .endr

        .org    BOOTINFO_ADDR - CPL0_DATA_ADDR
        .globl  bootinfo
bootinfo:
        .quad   0                       /* zero page address (RSI at entry) */
        .long   0                       /* TSC kHz, CPUID 0x40000010 eax */
        .long   0                       /* CPUID 0x40000000 eax */
        .long   0                       /* index of the AP being started */
        .long   0                       /* CPUID 1 ecx */
        .quad   0                       /* hvm_start_info address (PVH entry) */
        .org    CPL0_DATA_END - CPL0_DATA_ADDR

/* ------------------------------------------------------------------------ */
/* Stacks                                                                   */
/* ------------------------------------------------------------------------ */
        .section .bss.stacks, "aw", @nobits
        .balign 4096
        .globl  kstacks
kstacks:
        .skip   MAX_CPUS << KSTACK_SHIFT
        .balign 4096
        .globl  ustacks
ustacks:
        .skip   MAX_CPUS << USTACK_SHIFT

/* ------------------------------------------------------------------------ */
/* PVH entry (Xen's direct boot ABI, used by QEMU -kernel): 32-bit          */
/* protected mode, paging off, EBX = hvm_start_info.  Goes to long mode on  */
/* the guest's tables and joins the BSP path; CPL3 then reads the command   */
/* line and memory map from hvm_start_info instead of the zero page.        */
/* ------------------------------------------------------------------------ */
        .section .text.pvh32, "ax", @progbits
        .code32
        .globl  pvh_start, pvh_start_end
pvh_start:
        cli
        movl    %ebx, BI_PVH_INFO
        lgdt    gdt_ptr
        movl    %cr4, %eax
        orl     $0x20, %eax                     /* PAE */
        movl    %eax, %cr4
        movl    $PML4_ADDR, %eax
        movl    %eax, %cr3
        movl    $0xc0000080, %ecx               /* EFER */
        rdmsr
        orl     $0x100, %eax                    /* LME */
        wrmsr
        movl    %cr0, %eax
        orl     $0x80000001, %eax               /* PG | PE */
        movl    %eax, %cr0
        ljmpl   $SEL_KCODE, $pvh_entry64
pvh_start_end:

        .section .note.Xen, "a", @note
        .balign 4
        .long   4                               /* name size */
        .long   4                               /* descriptor size */
        .long   18                              /* XEN_ELFNOTE_PHYS32_ENTRY */
        .asciz  "Xen"
        .long   pvh_start
        .code64

/* ------------------------------------------------------------------------ */
/* AP trampoline: runs at TRAMP_ADDR in real mode after SIPI vector         */
/* TRAMP_ADDR >> 12; goes through protected mode to long mode on the        */
/* guest's page tables and jumps to ap_entry64.  Position-dependent on      */
/* TRAMP_ADDR only; copied there by the CPL3 smp workload.                  */
/* ------------------------------------------------------------------------ */
#define TR(sym) (TRAMP_ADDR + (sym) - tramp_start)
        .section .text.trampoline, "ax", @progbits
        .code16
        .globl  tramp_start, tramp_start32, tramp_start64, tramp_data, tramp_end
tramp_start:
        cli
        movw    %cs, %ax
        movw    %ax, %ds
        lgdtl   (tramp_gdtr - tramp_start)
        movl    %cr0, %eax
        orl     $1, %eax
        movl    %eax, %cr0
        ljmpl   $0x08, $TR(tramp_start32)

        .code32
tramp_start32:
        movl    $0x10, %eax
        movw    %ax, %ds
        movw    %ax, %es
        movw    %ax, %ss
        movl    %cr4, %eax
        orl     $0x20, %eax                     /* PAE */
        movl    %eax, %cr4
        movl    $PML4_ADDR, %eax
        movl    %eax, %cr3
        movl    $0xc0000080, %ecx               /* EFER */
        rdmsr
        orl     $0x100, %eax                    /* LME */
        wrmsr
        movl    %cr0, %eax
        orl     $0x80000001, %eax               /* PG | PE */
        movl    %eax, %cr0
        ljmpl   $0x18, $TR(tramp_start64)

        .code64
tramp_start64:
        movabsq $ap_entry64, %rax
        jmpq    *%rax

tramp_data:
        .balign 8
tramp_gdt:
        .quad   0
        .quad   0x00cf9a000000ffff              /* 0x08 code, 32-bit */
        .quad   0x00cf92000000ffff              /* 0x10 data */
        .quad   0x00af9a000000ffff              /* 0x18 code, 64-bit */
tramp_gdtr:
        .word   4 * 8 - 1
        .long   TR(tramp_gdt)
tramp_end:
