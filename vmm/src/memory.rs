//! Guest memory: allocation, the RAM layout around the 32-bit MMIO hole, and the
//! registration of each region with KVM as a memory slot.
//!
//! Memory is a `GuestMemoryMmap<AtomicBitmap>`: the bitmap records every write the
//! VMM and its devices make through vm-memory, which KVM's dirty log cannot see.

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use nix::unistd::{sysconf, SysconfVar};

use crate::arch::to_usize;
use crate::layout::{MMIO_GAP_END, MMIO_GAP_START};

pub use devices::GuestMemory;

/// Smallest guest we accept: the boot structures and a kernel must fit.
pub const MIN_MEMORY: u64 = 16 << 20;
/// Largest guest we accept, whatever the host has (1 TiB).
pub const MAX_MEMORY: u64 = 1 << 40;

/// Failures while creating or registering guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The requested size is outside what mirrorvm accepts.
    #[error("memory size {size} bytes is out of range: it must be between {min} MiB and {max}")]
    SizeOutOfRange {
        /// Requested size.
        size: u64,
        /// Minimum in MiB.
        min: u64,
        /// Human-readable maximum.
        max: String,
    },
    /// The requested size is not a whole number of 4 KiB pages.
    #[error("memory size {0} bytes is not a multiple of 4 KiB")]
    NotPageAligned(u64),
    /// mmap of the guest memory failed.
    #[error("cannot allocate {size} bytes of guest memory: {source}")]
    Allocate {
        /// Requested size.
        size: u64,
        /// Cause.
        source: vm_memory::mmap::FromRangesError,
    },
    /// KVM refused a memory slot.
    #[error("KVM_SET_USER_MEMORY_REGION for slot {slot} failed: {source}")]
    SetRegion {
        /// Slot number.
        slot: u32,
        /// Cause.
        source: kvm_ioctls::Error,
    },
    /// Mapping a memory image failed.
    #[error("cannot map {size} bytes of the memory image at offset {offset}: {source}")]
    MapImage {
        /// The region's size.
        size: usize,
        /// Its offset in the image.
        offset: u64,
        /// Cause.
        source: vm_memory::mmap::MmapRegionError,
    },
    /// The mapped image's regions do not form a guest memory.
    #[error("the memory image's regions do not form a guest memory: {0}")]
    ImageLayout(vm_memory::GuestRegionCollectionError),
    /// A region would end past the top of the guest's address space.
    #[error("a memory region at {0:#x} would end past the top of the address space")]
    RegionPastEnd(u64),
    /// The image file could not be opened a second time for a region.
    #[error("cannot duplicate the memory image's file handle: {0}")]
    ImageHandle(std::io::Error),
    /// A region's host address could not be found.
    #[error("guest memory region at {0:#x} has no host mapping")]
    NoHostAddress(u64),
}

/// The RAM ranges of a guest of `size` bytes: below the MMIO hole, then above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), to_usize(size))]
    } else {
        vec![
            (GuestAddress(0), to_usize(MMIO_GAP_START)),
            (GuestAddress(MMIO_GAP_END), to_usize(size - MMIO_GAP_START)),
        ]
    }
}

/// Total physical memory of this host, when it can be read.
fn host_memory() -> Option<u64> {
    // sysconf's value when it is known and positive.
    let positive = |var| {
        let v = sysconf(var).ok()??;
        u64::try_from(v).ok().filter(|&v| v > 0)
    };
    positive(SysconfVar::_PHYS_PAGES)?.checked_mul(positive(SysconfVar::PAGE_SIZE)?)
}

/// Checks a requested memory size against our limits and the host's RAM.
pub fn check_size(size: u64) -> Result<(), MemoryError> {
    let max = host_memory().map_or(MAX_MEMORY, |h| h.min(MAX_MEMORY));
    if !(MIN_MEMORY..=max).contains(&size) {
        return Err(MemoryError::SizeOutOfRange {
            size,
            min: MIN_MEMORY >> 20,
            max: format!("{} MiB (this host's RAM, at most 1 TiB)", max >> 20),
        });
    }
    if size % 4096 != 0 {
        return Err(MemoryError::NotPageAligned(size));
    }
    Ok(())
}

/// Allocates guest memory of `size` bytes, laid out around the MMIO hole.
///
/// The regions are offered to transparent huge pages (`MADV_HUGEPAGE`): a guest's
/// memory is touched 2 MiB at a time instead of 4 KiB, which makes first writes (a
/// standby receiving an initial copy, a guest booting) far cheaper, above all under
/// nested virtualization, where each page fault is expensive. KVM still tracks dirty
/// pages at 4 KiB. A host with THP off ignores the advice.
pub fn create(size: u64) -> Result<GuestMemory, MemoryError> {
    check_size(size)?;
    let mem = GuestMemory::from_ranges(&ram_ranges(size))
        .map_err(|source| MemoryError::Allocate { size, source })?;
    for region in mem.iter() {
        advise_huge_pages(region.as_ptr(), crate::arch::to_usize(region.len()));
    }
    Ok(mem)
}

/// Guest memory of `size` bytes backed by `image` (its RAM regions stored back to
/// back, as a checkpoint directory's `memory.img` holds them), mapped privately and
/// lazily: a page is read from the file when the guest or the VMM first touches it,
/// and a write makes a private copy, so the file never changes through this mapping.
/// A restore then costs a mapping, not a read of all of memory. The caller checks
/// that the file holds `size` bytes; the file must not be truncated while the guest
/// runs (a page past its end would fault the process).
pub fn map_image(image: &std::fs::File, size: u64) -> Result<GuestMemory, MemoryError> {
    use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
    use vm_memory::mmap::MmapRegionBuilder;
    use vm_memory::{FileOffset, GuestRegionMmap};

    check_size(size)?;
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for (addr, len) in ram_ranges(size) {
        let file = image.try_clone().map_err(MemoryError::ImageHandle)?;
        let mapping = MmapRegionBuilder::new_with_bitmap(len, AtomicBitmap::with_len(len))
            .with_file_offset(FileOffset::new(file, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|source| MemoryError::MapImage {
                size: len,
                offset,
                source,
            })?;
        let region = GuestRegionMmap::new(mapping, addr)
            .ok_or(MemoryError::RegionPastEnd(addr.raw_value()))?;
        regions.push(region);
        offset += len as u64;
    }
    GuestMemory::from_regions(regions).map_err(MemoryError::ImageLayout)
}

/// Makes the process's allocator keep and reuse large buffers instead of mapping and
/// unmapping each one (glibc maps any allocation over its threshold, 128 KiB to
/// 32 MiB, with `mmap` and unmaps it on free). The checkpoint stream allocates and
/// frees megabytes per frame; fresh mappings cost a page fault and a page clear per
/// 4 KiB, which measured as a quarter of the stream's CPU time on a nested host.
/// Allocations under 64 MiB come from the heap, and up to 256 MiB of freed heap is
/// kept for reuse. Call once, early, before other threads start.
pub fn tune_host_allocator() {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: mallopt only sets a glibc allocator parameter; it takes plain
        // integers, touches no memory of ours, and is called before other threads
        // allocate (the caller's contract).
        unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20) };
        // SAFETY: as above.
        unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20) };
    }
}

/// `madvise(MADV_HUGEPAGE)` on one region; advice only, so a refusal is logged, not
/// an error.
fn advise_huge_pages(addr: *mut u8, len: usize) {
    // SAFETY: [addr, addr + len) is one whole mapping just created by
    // `GuestMemory::from_ranges` and owned by it; MADV_HUGEPAGE changes only how the
    // kernel backs it, never its contents or its validity.
    let r = unsafe { libc::madvise(addr.cast(), len, libc::MADV_HUGEPAGE) };
    if r != 0 {
        tracing::debug!(
            "madvise(MADV_HUGEPAGE) on guest memory: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Registers every region of `mem` with KVM, slot *i* for region *i*.
///
/// With `log_dirty`, KVM tracks guest writes to the slot (KVM_GET_DIRTY_LOG).
pub fn register(vm: &VmFd, mem: &GuestMemory, log_dirty: bool) -> Result<(), MemoryError> {
    for (slot, region) in (0u32..).zip(mem.iter()) {
        let start = region.start_addr();
        let host = mem
            .get_host_address(start)
            .map_err(|_| MemoryError::NoHostAddress(start.raw_value()))?;
        let region = kvm_userspace_memory_region {
            slot,
            flags: if log_dirty {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: start.raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the host range [userspace_addr, +memory_size) is a live mmap owned by
        // `mem`, which the caller keeps alive for as long as the VM exists (the Vmm holds
        // both), and slots do not overlap because the regions of a GuestMemoryMmap do not.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(|source| MemoryError::SetRegion { slot, source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_range() {
        let r = ram_ranges(256 << 20);
        assert_eq!(r, vec![(GuestAddress(0), 256 << 20)]);
    }

    #[test]
    fn large_guest_skips_the_mmio_hole() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], (GuestAddress(0), to_usize(MMIO_GAP_START)));
        assert_eq!(r[1].0, GuestAddress(MMIO_GAP_END));
        assert_eq!(r[0].1 + r[1].1, 4 << 30);
    }

    #[test]
    fn absurd_sizes_are_refused() {
        assert!(check_size(0).is_err());
        assert!(check_size(1 << 20).is_err());
        assert!(check_size(u64::MAX).is_err());
        assert!(check_size((64 << 20) + 1).is_err());
        assert!(check_size(64 << 20).is_ok());
    }

    #[test]
    fn a_mapped_image_reads_from_the_file_and_never_writes_to_it() {
        use std::io::Write;
        use vm_memory::Bytes;
        let size = 16u64 << 20;
        let mut f = tempfile::tempfile().unwrap();
        let mut image = vec![0u8; to_usize(size)];
        image[4096] = 0x5a;
        image[to_usize(size) - 1] = 0xa5;
        f.write_all(&image).unwrap();
        let mem = map_image(&f, size).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(4096)).unwrap(), 0x5a);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(size - 1)).unwrap(), 0xa5);
        mem.write_obj(0x77u8, GuestAddress(4096)).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(4096)).unwrap(), 0x77);
        // The write stayed private: the file still holds what it held.
        let mut byte = [0u8; 1];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut byte, 4096).unwrap();
        assert_eq!(byte[0], 0x5a);
        // A bad size is refused, as for anonymous memory.
        assert!(map_image(&f, 1 << 20).is_err());
    }
}
