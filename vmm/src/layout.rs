//! The guest-physical memory map and I/O port assignments of a mirrorvm machine.
//!
//! `docs/machine.md` is the prose version of this file; keep the two in step.

/// Boot GDT: null, 64-bit code (0x08), data (0x10), TSS (0x18).
pub const BOOT_GDT_START: u64 = 0x500;
/// Boot IDT: one empty entry, so that an early fault triple-faults visibly.
pub const BOOT_IDT_START: u64 = 0x520;
/// Linux zero page (`boot_params`); RSI points here at entry.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Boot page tables: PML4, then one PDPT, then one PD per mapped GiB.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table of the boot identity map.
pub const PDPTE_START: u64 = 0xa000;
/// First of the page directories of the boot identity map (one per GiB).
pub const PDE_START: u64 = 0xb000;
/// GiB of guest-physical space identity-mapped at entry.
pub const IDENTITY_MAP_GIB: u64 = 4;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line we pass (Linux x86's COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area, where the MP table lives.
pub const EBDA_START: u64 = 0x9fc00;
/// Start of high memory: where a bzImage's protected-mode kernel is loaded.
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO hole; RAM above this goes to 4 GiB and beyond.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Base of the first virtio-mmio device.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of each virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// GSI of the first virtio-mmio device; device *i* uses `VIRTIO_FIRST_GSI + i`.
pub const VIRTIO_FIRST_GSI: u32 = 5;
/// Highest GSI the in-kernel IOAPIC routes.
pub const MAX_GSI: u32 = 23;
/// IOAPIC base address (in-kernel IOAPIC).
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// LAPIC base address (in-kernel LAPIC).
pub const APIC_START: u64 = 0xfee0_0000;
/// Address KVM needs for its TSS on Intel hosts (three pages below the BIOS area).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;

/// COM1: the 16550 UART.
pub const SERIAL_PORT: u16 = 0x3f8;
/// COM1's interrupt line.
pub const SERIAL_GSI: u32 = 4;
/// i8042 data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// i8042 command/status port; writing 0xfe resets the machine.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// Debug-exit port: a one-byte write of v ends the run with exit status v.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;

/// CPUID leaf in which we publish the TSC frequency (kHz) in EAX.
pub const CPUID_TSC_LEAF: u32 = 0x4000_0010;

/// Most vCPUs a guest may have (the MP table and the IOAPIC id that follows the
/// LAPIC ids are sized for it).
pub const MAX_VCPUS: u8 = 32;
