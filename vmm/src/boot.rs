//! Booting: load a kernel (ELF vmlinux or bzImage) and an initramfs into guest
//! memory, write the command line, the Linux zero page with its e820 map, the boot
//! GDT and identity page tables, and put the boot vCPU in 64-bit long mode at the
//! kernel's entry point (Linux's 64-bit boot protocol, see docs/machine.md).

use std::io::{Cursor, Read, Seek, SeekFrom};

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{self, bzimage::BzImage, elf::Elf, KernelLoader};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, ReadVolatile,
};

use crate::layout::*;
use crate::memory::GuestMemory;

/// Failures while loading a guest and preparing its boot state.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file could not be read.
    #[error("cannot read kernel image: {0}")]
    ReadKernel(#[source] std::io::Error),
    /// The kernel file is neither ELF nor bzImage.
    #[error("kernel image is neither an ELF vmlinux nor a bzImage")]
    UnknownKernelFormat,
    /// linux-loader refused the ELF image.
    #[error("cannot load ELF kernel: {0}")]
    LoadElf(#[source] loader::Error),
    /// linux-loader refused the bzImage.
    #[error("cannot load bzImage kernel: {0}")]
    LoadBzImage(#[source] loader::Error),
    /// The bzImage has no 64-bit entry point.
    #[error("bzImage has no 64-bit entry point (XLF_KERNEL_64 not set); it is too old or 32-bit")]
    BzImageNot64Bit,
    /// The initramfs could not be read.
    #[error("cannot read initramfs: {0}")]
    ReadInitramfs(#[source] std::io::Error),
    /// The initramfs does not fit in guest memory below the kernel's limit.
    #[error("initramfs of {size} bytes does not fit in guest memory above the kernel")]
    InitramfsTooLarge {
        /// Size of the initramfs.
        size: u64,
    },
    /// A value does not fit its 32-bit field in the zero page's setup header.
    #[error("{what} {value:#x} does not fit the zero page's 32-bit field")]
    ZeroPageField {
        /// Which value.
        what: &'static str,
        /// The value.
        value: u64,
        /// Cause.
        #[source]
        source: std::num::TryFromIntError,
    },
    /// The command line is too long or invalid.
    #[error("kernel command line is invalid or longer than {CMDLINE_MAX_SIZE} bytes: {0}")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// Writing the command line into guest memory failed.
    #[error("cannot write the command line into guest memory: {0}")]
    LoadCmdline(#[source] loader::Error),
    /// Writing the zero page failed.
    #[error("cannot write the zero page: {0}")]
    ZeroPage(#[source] linux_loader::configurator::Error),
    /// Writing a boot structure (GDT, page tables) failed.
    #[error("cannot write {what} into guest memory: {source}")]
    GuestWrite {
        /// Which structure.
        what: &'static str,
        /// Cause.
        source: vm_memory::GuestMemoryError,
    },
    /// Too many e820 entries (cannot happen with our layout).
    #[error("too many e820 entries")]
    E820Full,
}

/// Kernel formats we boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// An ELF image entered at `e_entry` in long mode (vmlinux, our test guest).
    Elf,
    /// A bzImage entered at its 64-bit entry point.
    BzImage,
}

/// Where the kernel landed and how to enter it.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// Format of the image.
    pub format: KernelFormat,
    /// Guest-physical address of the 64-bit entry point.
    pub entry: GuestAddress,
    /// First byte after the loaded image.
    pub end: u64,
    /// The bzImage setup header, to start the zero page from.
    pub setup_header: Option<setup_header>,
}

/// Sniffs the format of a kernel image from its first bytes.
pub fn detect_format<R: Read + Seek>(image: &mut R) -> Result<KernelFormat, BootError> {
    let mut head = [0u8; 0x206];
    image
        .seek(SeekFrom::Start(0))
        .map_err(BootError::ReadKernel)?;
    let mut filled = 0;
    while filled < head.len() {
        match image
            .read(&mut head[filled..])
            .map_err(BootError::ReadKernel)?
        {
            0 => break,
            n => filled += n,
        }
    }
    image
        .seek(SeekFrom::Start(0))
        .map_err(BootError::ReadKernel)?;
    if filled >= 4 && head[..4] == *b"\x7fELF" {
        Ok(KernelFormat::Elf)
    } else if filled >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        Ok(KernelFormat::BzImage)
    } else {
        Err(BootError::UnknownKernelFormat)
    }
}

/// Loads a kernel image (ELF or bzImage) into guest memory.
pub fn load_kernel<F>(mem: &GuestMemory, image: &mut F) -> Result<LoadedKernel, BootError>
where
    F: Read + ReadVolatile + Seek,
{
    match detect_format(image)? {
        KernelFormat::Elf => {
            let r = Elf::load(mem, None, image, Some(GuestAddress(HIMEM_START)))
                .or_else(|e| match e {
                    // Our test guest and small kernels may sit below 1 MiB's end; only
                    // reject them if they really collide with the boot structures.
                    loader::Error::Elf(linux_loader::loader::elf::Error::InvalidEntryAddress) => {
                        Elf::load(mem, None, image, None)
                    }
                    e => Err(e),
                })
                .map_err(BootError::LoadElf)?;
            Ok(LoadedKernel {
                format: KernelFormat::Elf,
                entry: r.kernel_load,
                end: r.kernel_end,
                setup_header: None,
            })
        }
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, image, Some(GuestAddress(HIMEM_START)))
                .map_err(BootError::LoadBzImage)?;
            let hdr = r.setup_header.ok_or(BootError::UnknownKernelFormat)?;
            // XLF_KERNEL_64: the kernel has the 64-bit entry point at load + 0x200.
            if hdr.xloadflags & 1 == 0 {
                return Err(BootError::BzImageNot64Bit);
            }
            Ok(LoadedKernel {
                format: KernelFormat::BzImage,
                entry: r.kernel_load.unchecked_add(0x200),
                end: r.kernel_end,
                setup_header: Some(hdr),
            })
        }
    }
}

/// Loads an in-memory ELF image (the embedded test guest).
pub fn load_kernel_bytes(mem: &GuestMemory, bytes: &[u8]) -> Result<LoadedKernel, BootError> {
    load_kernel(mem, &mut Cursor::new(bytes))
}

/// Where an initramfs of `size` bytes goes: page-aligned, at the top of low RAM,
/// under `addr_max`, above the kernel.
pub fn initramfs_address(
    mem: &GuestMemory,
    kernel_end: u64,
    size: u64,
    addr_max: u64,
) -> Result<GuestAddress, BootError> {
    let first = mem.iter().next().map_or(0, |r| r.len());
    let top = first.min(addr_max.saturating_add(1));
    let start = top
        .checked_sub(size)
        .map(|s| s & !0xfff)
        .filter(|&s| s >= kernel_end && s >= HIMEM_START)
        .ok_or(BootError::InitramfsTooLarge { size })?;
    Ok(GuestAddress(start))
}

/// Copies an initramfs file into guest memory; returns (address, size).
pub fn load_initramfs(
    mem: &GuestMemory,
    file: &mut std::fs::File,
    kernel_end: u64,
    addr_max: u64,
) -> Result<(GuestAddress, u64), BootError> {
    let size = file.metadata().map_err(BootError::ReadInitramfs)?.len();
    let addr = initramfs_address(mem, kernel_end, size, addr_max)?;
    file.seek(SeekFrom::Start(0))
        .map_err(BootError::ReadInitramfs)?;
    mem.read_exact_volatile_from(addr, file, crate::arch::to_usize(size))
        .map_err(|e| BootError::ReadInitramfs(std::io::Error::other(e.to_string())))?;
    Ok((addr, size))
}

/// Writes the command line at [`CMDLINE_START`].
pub fn load_cmdline(mem: &GuestMemory, cmdline: &str) -> Result<(), BootError> {
    let cl = linux_loader::cmdline::Cmdline::try_from(cmdline, CMDLINE_MAX_SIZE)
        .map_err(BootError::Cmdline)?;
    loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &cl).map_err(BootError::LoadCmdline)
}

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
/// Default initrd_addr_max for kernels that do not say (Linux's own default).
pub const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// `value` as the u32 of a setup header field, or [`BootError::ZeroPageField`].
fn zero_page_field(what: &'static str, value: u64) -> Result<u32, BootError> {
    u32::try_from(value).map_err(|source| BootError::ZeroPageField {
        what,
        value,
        source,
    })
}

/// Builds and writes the zero page.
pub fn write_zero_page(
    mem: &GuestMemory,
    kernel: &LoadedKernel,
    cmdline_len: usize,
    initramfs: Option<(GuestAddress, u64)>,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(hdr) = kernel.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = 0xff; // "undefined" boot loader
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
                                     // CMDLINE_START is a constant below 1 MiB.
    #[allow(clippy::cast_possible_truncation)]
    let cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmd_line_ptr = cmd_line_ptr;
    params.hdr.cmdline_size = zero_page_field("command line length", cmdline_len as u64)?;
    if kernel.format == KernelFormat::Elf {
        params.hdr.kernel_alignment = 0x0100_0000;
    }
    if let Some((addr, size)) = initramfs {
        params.hdr.ramdisk_image = zero_page_field("initramfs address", addr.raw_value())?;
        params.hdr.ramdisk_size = zero_page_field("initramfs size", size)?;
    }

    let mut e820 = Vec::new();
    e820.push((0, EBDA_START, E820_RAM));
    e820.push((EBDA_START, 0xa0000 - EBDA_START, E820_RESERVED));
    for region in mem.iter() {
        let start = region.start_addr().raw_value().max(HIMEM_START);
        let end = region.start_addr().raw_value() + region.len();
        if end > start {
            e820.push((start, end - start, E820_RAM));
        }
    }
    if e820.len() > params.e820_table.len() {
        return Err(BootError::E820Full);
    }
    for (i, (addr, size, kind)) in e820.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *kind,
        };
    }
    params.e820_entries = u8::try_from(e820.len()).map_err(|_| BootError::E820Full)?;

    LinuxBootConfigurator::write_bootparams::<GuestMemory>(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(BootError::ZeroPage)
}

/// Flat 64-bit GDT: null, code, data, TSS (the TSS is only a placeholder KVM wants).
const BOOT_GDT: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff), // code: present, DPL0, exec/read, L=1, G=1
    gdt_entry(0xc093, 0, 0xfffff), // data: present, DPL0, read/write, D/B=1, G=1
    gdt_entry(0x808b, 0, 0xfffff), // TSS: present, busy 64-bit TSS
];

/// Encodes a GDT descriptor from flags (access byte low, flags nibble in bits 12..16),
/// base and limit.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// A KVM segment from a GDT entry and its selector index.
fn segment(index: u16, entry: u64) -> kvm_segment {
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: {
            let raw = (entry & 0xffff) as u32 | ((entry >> 32) & 0xf_0000) as u32;
            if (entry >> 55) & 1 == 1 {
                (raw << 12) | 0xfff
            } else {
                raw
            }
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: ((entry >> 55) & 1) as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Writes the boot GDT, an empty IDT and the identity page tables.
pub fn write_boot_tables(mem: &GuestMemory) -> Result<(), BootError> {
    let w = |what: &'static str, addr: u64, val: u64| {
        mem.write_obj(val, GuestAddress(addr))
            .map_err(|source| BootError::GuestWrite { what, source })
    };
    for (i, e) in BOOT_GDT.iter().enumerate() {
        w("the boot GDT", BOOT_GDT_START + 8 * i as u64, *e)?;
    }
    w("the boot IDT", BOOT_IDT_START, 0)?;
    // PML4[0] -> PDPT; PDPT[g] -> PD g; each PD maps 1 GiB with 2 MiB pages.
    w("the PML4", PML4_START, PDPTE_START | 0x03)?;
    for g in 0..IDENTITY_MAP_GIB {
        let pd = PDE_START + g * 0x1000;
        w("the PDPT", PDPTE_START + 8 * g, pd | 0x03)?;
        for i in 0..512u64 {
            let phys = (g << 30) | (i << 21);
            w("a page directory", pd + 8 * i, phys | 0x83)?;
        }
    }
    Ok(())
}

const X86_CR0_PE: u64 = 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_NE: u64 = 1 << 5;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Puts `sregs` in 64-bit long mode with the boot GDT and page tables.
pub fn setup_long_mode_sregs(sregs: &mut kvm_sregs) {
    let code = segment(1, BOOT_GDT[1]);
    let data = segment(2, BOOT_GDT[2]);
    let tss = segment(3, BOOT_GDT[3]);
    sregs.gdt.base = BOOT_GDT_START;
    // BOOT_GDT has 4 entries: the limit is 31.
    #[allow(clippy::cast_possible_truncation)]
    let gdt_limit = (BOOT_GDT.len() * 8 - 1) as u16;
    sregs.gdt.limit = gdt_limit;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    long_mode_paging(sregs, PML4_START);
}

/// Turns on protected mode, PAE paging from the PML4 at `pml4`, and long mode (the
/// boot vCPU's and the fault probe's control registers).
pub fn long_mode_paging(sregs: &mut kvm_sregs, pml4: u64) {
    sregs.cr3 = pml4;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_NE | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
}

/// General registers of the boot vCPU at the kernel's 64-bit entry.
pub fn boot_regs(entry: GuestAddress) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry.raw_value(),
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap()
    }

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let code = segment(1, BOOT_GDT[1]);
        assert_eq!(
            (code.base, code.limit, code.l, code.present, code.type_),
            (0, 0xffff_ffff, 1, 1, 0xb)
        );
        let data = segment(2, BOOT_GDT[2]);
        assert_eq!(
            (data.selector, data.db, data.l, data.type_),
            (0x10, 1, 0, 3)
        );
    }

    #[test]
    fn garbage_is_not_a_kernel() {
        let mut c = Cursor::new(vec![0u8; 4096]);
        assert!(matches!(
            detect_format(&mut c),
            Err(BootError::UnknownKernelFormat)
        ));
        let mut empty = Cursor::new(Vec::<u8>::new());
        assert!(matches!(
            detect_format(&mut empty),
            Err(BootError::UnknownKernelFormat)
        ));
        let mut truncated_elf = Cursor::new(b"\x7fELF\x02\x01".to_vec());
        assert!(load_kernel(&mem(), &mut truncated_elf).is_err());
    }

    #[test]
    fn page_tables_identity_map() {
        let m = mem();
        write_boot_tables(&m).unwrap();
        let pml4: u64 = m.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPTE_START);
        let pdpt3: u64 = m.read_obj(GuestAddress(PDPTE_START + 24)).unwrap();
        let pde: u64 = m.read_obj(GuestAddress((pdpt3 & !0xfff) + 8 * 5)).unwrap();
        assert_eq!(pde & !0xfff, (3 << 30) | (5 << 21));
        assert_eq!(pde & 0x83, 0x83);
    }

    #[test]
    fn e820_and_cmdline_in_zero_page() {
        let m = mem();
        let k = LoadedKernel {
            format: KernelFormat::Elf,
            entry: GuestAddress(0x20_0000),
            end: 0x30_0000,
            setup_header: None,
        };
        load_cmdline(&m, "hello world").unwrap();
        write_zero_page(&m, &k, 12, Some((GuestAddress(0x100_0000), 4096))).unwrap();
        let p: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!(u64::from(p.hdr.cmd_line_ptr), CMDLINE_START);
        assert_eq!(p.e820_entries, 3);
        let last = p.e820_table[2];
        assert_eq!(
            (last.addr, last.size, last.r#type),
            (HIMEM_START, (64 << 20) - HIMEM_START, 1)
        );
        assert_eq!({ p.hdr.ramdisk_image }, 0x100_0000);
    }

    #[test]
    fn initramfs_goes_high_and_refuses_overlap() {
        let m = mem();
        let a = initramfs_address(&m, 0x20_0000, 1 << 20, DEFAULT_INITRD_ADDR_MAX).unwrap();
        assert_eq!(a.raw_value(), (63 << 20));
        assert!(initramfs_address(&m, 0x20_0000, 63 << 20, DEFAULT_INITRD_ADDR_MAX).is_err());
    }
}
