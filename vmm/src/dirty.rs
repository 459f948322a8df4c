//! The dirty set of an epoch: KVM's dirty log (guest writes) united with the
//! vm-memory AtomicBitmap (writes the VMM and its devices made through vm-memory,
//! which KVM never sees), and the copy of those pages into a staging buffer so the
//! guest can resume before they are written out.
//!
//! Reading KVM's log clears it (manual dirty-log protection is not switched on), and
//! `AtomicBitmap::get_and_reset` clears ours, so each page dirtied after the harvest
//! lands in the next epoch's set: no write is lost between two cuts.

use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::GuestMemory;

/// Guest page size the dirty logs count in.
pub const PAGE_SIZE: usize = 4096;

/// Failures while harvesting dirty pages.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// KVM_GET_DIRTY_LOG failed.
    #[error("KVM_GET_DIRTY_LOG for slot {slot} failed: {source}")]
    GetLog {
        /// Memory slot.
        slot: u32,
        /// Cause.
        source: kvm_ioctls::Error,
    },
    /// Copying a page out of guest memory failed.
    #[error("cannot copy guest page {0:#x}")]
    Copy(u64),
}

/// One bitmap word per 64 pages, per memory region (slot order).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirtySet {
    /// (region start, bitmap words).
    pub regions: Vec<(u64, Vec<u64>)>,
}

impl DirtySet {
    /// Number of dirty pages.
    pub fn count(&self) -> usize {
        self.regions
            .iter()
            .map(|(_, w)| w.iter().map(|x| x.count_ones() as usize).sum::<usize>())
            .sum()
    }

    /// Adds the pages of `other` to this set (a region this set lacks is added).
    pub fn union(&mut self, other: &DirtySet) {
        for (start, words) in &other.regions {
            match self.regions.iter_mut().find(|(s, _)| s == start) {
                Some((_, mine)) => {
                    if mine.len() < words.len() {
                        mine.resize(words.len(), 0);
                    }
                    for (m, w) in mine.iter_mut().zip(words) {
                        *m |= *w;
                    }
                }
                None => self.regions.push((*start, words.clone())),
            }
        }
        self.regions.sort_by_key(|(s, _)| *s);
    }

    /// Guest-physical addresses of the dirty pages, ascending.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.regions.iter().flat_map(|(start, words)| {
            words.iter().enumerate().flat_map(move |(wi, &w)| {
                BitIter(w).map(move |b| start + ((wi * 64 + b) * PAGE_SIZE) as u64)
            })
        })
    }
}

struct BitIter(u64);

impl Iterator for BitIter {
    type Item = usize;
    fn next(&mut self) -> Option<usize> {
        if self.0 == 0 {
            return None;
        }
        let b = self.0.trailing_zeros() as usize;
        self.0 &= self.0 - 1;
        Some(b)
    }
}

/// Reads and clears both dirty logs. Call with the vCPUs parked and the device
/// loop stopped (the caller is the device loop), so the set is exactly the epoch's.
pub fn harvest(vm: &VmFd, mem: &GuestMemory) -> Result<DirtySet, DirtyError> {
    let mut regions = Vec::with_capacity(mem.num_regions());
    for (slot, region) in (0u32..).zip(mem.iter()) {
        let mut words = vm
            .get_dirty_log(slot, crate::arch::to_usize(region.len()))
            .map_err(|source| DirtyError::GetLog { slot, source })?;
        // The region's own bitmap: vm-memory marks every write made through it.
        let ours = vm_memory::mmap::MmapRegion::bitmap(region).get_and_reset();
        for (w, o) in words.iter_mut().zip(ours.iter()) {
            *w |= *o;
        }
        regions.push((region.start_addr().0, words));
    }
    Ok(DirtySet { regions })
}

/// Dirty pages copied out of guest memory: addresses and their contents.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StagedPages {
    /// Guest-physical address of each page.
    pub addrs: Vec<u64>,
    /// `addrs.len() * PAGE_SIZE` bytes, page *i* at `i * PAGE_SIZE`.
    pub data: Vec<u8>,
}

impl StagedPages {
    /// Copies the pages of `set` out of `mem`, reusing `self`'s buffers. Runs of
    /// adjacent pages are copied with one memcpy each.
    ///
    /// At a cut, call only with the guest quiescent (vCPUs parked, device loop
    /// stopped): the copy reads guest memory directly. A pre-copy round calls it while
    /// the guest runs: a page torn by a concurrent write was logged dirty again when
    /// it was written (the harvest write-protected it), so a later round or the cut
    /// sends it again.
    pub fn copy_from(&mut self, mem: &GuestMemory, set: &DirtySet) -> Result<(), DirtyError> {
        self.addrs.clear();
        self.addrs.extend(set.pages());
        let total = self.addrs.len() * PAGE_SIZE;
        // Grow without zero-filling what is about to be overwritten.
        if self.data.len() < total {
            self.data.resize(total, 0);
        } else {
            self.data.truncate(total);
        }
        let mut i = 0;
        while i < self.addrs.len() {
            let start = self.addrs[i];
            let mut n = 1;
            while i + n < self.addrs.len() && self.addrs[i + n] == start + (n * PAGE_SIZE) as u64 {
                n += 1;
            }
            let len = n * PAGE_SIZE;
            let slice = mem
                .get_slice(GuestAddress(start), len)
                .map_err(|_| DirtyError::Copy(start))?;
            let dst = &mut self.data[i * PAGE_SIZE..i * PAGE_SIZE + len];
            // `slice` maps `len` bytes inside one region (get_slice fails across
            // regions) and `dst` is a host buffer of the same length: all of it is
            // copied. The guest is quiescent (the caller's contract), so the source
            // is stable.
            let copied = slice.copy_to(dst);
            debug_assert_eq!(copied, len);
            i += n;
        }
        Ok(())
    }

    /// Number of pages.
    pub fn len(&self) -> usize {
        self.addrs.len()
    }

    /// Whether no page is staged.
    pub fn is_empty(&self) -> bool {
        self.addrs.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn pages_of_a_set() {
        let set = DirtySet {
            regions: vec![(0, vec![0b1001, 0]), (1 << 32, vec![1 << 63])],
        };
        let pages: Vec<u64> = set.pages().collect();
        assert_eq!(pages, vec![0, 3 * 4096, (1 << 32) + 63 * 4096]);
        assert_eq!(set.count(), 3);
    }

    #[test]
    fn a_union_holds_the_pages_of_both_sets() {
        let mut a = DirtySet {
            regions: vec![(1 << 32, vec![1]), (0, vec![0b01])],
        };
        a.regions.sort_by_key(|(s, _)| *s);
        let b = DirtySet {
            regions: vec![(0, vec![0b10, 1]), (1 << 40, vec![4])],
        };
        a.union(&b);
        let pages: Vec<u64> = a.pages().collect();
        assert_eq!(
            pages,
            vec![0, 4096, 64 * 4096, 1 << 32, (1 << 40) + 2 * 4096]
        );
        // A union with itself adds nothing.
        let before = a.clone();
        a.union(&before);
        assert_eq!(a, before);
    }

    #[test]
    fn runs_and_single_pages_are_copied() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        for p in [2u64, 3, 4, 9] {
            mem.write_obj(p * 1000 + 7, GuestAddress(p * 4096 + 16))
                .unwrap();
        }
        let set = DirtySet {
            regions: vec![(0, vec![(1 << 2) | (1 << 3) | (1 << 4) | (1 << 9)])],
        };
        let mut staged = StagedPages::default();
        staged.copy_from(&mem, &set).unwrap();
        assert_eq!(staged.addrs, vec![2 * 4096, 3 * 4096, 4 * 4096, 9 * 4096]);
        for (i, p) in [2u64, 3, 4, 9].iter().enumerate() {
            let v = u64::from_le_bytes(
                staged.data[i * 4096 + 16..i * 4096 + 24]
                    .try_into()
                    .unwrap(),
            );
            assert_eq!(v, p * 1000 + 7);
        }
        // A smaller set reuses the buffer and shrinks the view.
        let one = DirtySet {
            regions: vec![(0, vec![1 << 9])],
        };
        staged.copy_from(&mem, &one).unwrap();
        assert_eq!(staged.data.len(), 4096);
    }

    #[test]
    fn device_writes_are_in_our_bitmap_and_staged() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        mem.write_obj(0xdead_beef_u32, GuestAddress(5 * 4096 + 8))
            .unwrap();
        let region = mem.iter().next().unwrap();
        let words = vm_memory::mmap::MmapRegion::bitmap(region).get_and_reset();
        assert_eq!(words[0], 1 << 5);
        let set = DirtySet {
            regions: vec![(0, words)],
        };
        let mut staged = StagedPages::default();
        staged.copy_from(&mem, &set).unwrap();
        assert_eq!(staged.addrs, vec![5 * 4096]);
        assert_eq!(&staged.data[8..12], &0xdead_beef_u32.to_le_bytes());
        // Reading does not dirty.
        let again = vm_memory::mmap::MmapRegion::bitmap(mem.iter().next().unwrap()).get_and_reset();
        assert!(again.iter().all(|w| *w == 0));
    }
}
