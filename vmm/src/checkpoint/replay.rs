//! Replaying a chain of checkpoint files into guest memory, as a restore does: the
//! memory must end with each page's newest copy. Rather than writing every file's
//! pages in order (a chain of busy checkpoints holds the same pages many times), the
//! chain is indexed from its newest file to its oldest and a page is taken from the
//! first file that holds it; older copies are skipped without being expanded. The
//! chosen pages are then expanded straight into guest memory (no staging buffer),
//! split over a few threads.
//!
//! Every page address of every file is still checked against guest memory, so a
//! file that a writer could not have produced is refused whether or not its pages
//! are used. An lz4 block is expanded (and so checked) only where it is a page's
//! newest copy: an older copy's bytes are covered by its file's checksum, and its
//! contents do not matter.

use std::num::NonZeroUsize;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::format::{Checked, FormatError};
use super::pagecodec::Stored;
use crate::dirty::PAGE_SIZE;
use crate::memory::GuestMemory;

/// Why a chain could not be replayed; `file` is the index of the file at fault in
/// the slice given to [`replay`].
#[derive(Debug, thiserror::Error)]
#[error("checkpoint file {file} of the chain")]
pub struct ReplayError {
    /// Index of the file at fault (0 is the oldest).
    pub file: usize,
    /// What is wrong with it.
    #[source]
    pub fault: ReplayFault,
}

/// What is wrong with a file of the chain.
#[derive(Debug, thiserror::Error)]
pub enum ReplayFault {
    /// Its page section is malformed.
    #[error("malformed page section")]
    Format(#[source] FormatError),
    /// A page lies outside guest memory.
    #[error("page {0:#x} is outside guest memory")]
    Outside(u64),
    /// A page's newest copy is an lz4 block that does not expand to one page.
    #[error("page {0:#x} is not a valid lz4 block of one page")]
    Corrupt(u64),
}

/// What a replay did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplayStats {
    /// Files in the chain.
    pub files: usize,
    /// Pages the files hold, every copy counted.
    pub pages: u64,
    /// Distinct pages written into memory (each page's newest copy).
    pub written: u64,
    /// Threads that expanded them.
    pub threads: usize,
}

/// Below this many pages to expand a replay stays on the calling thread: starting a
/// thread costs about as much as expanding a few hundred pages.
const PAGES_PER_THREAD: usize = 512;

/// At most this many threads expand pages (a restore should not take every core of
/// a large host for a few milliseconds of work).
const MAX_THREADS: usize = 4;

/// How many threads a replay of `pages` pages uses on this host.
pub fn threads_for(pages: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
    (pages / PAGES_PER_THREAD).clamp(1, cores.min(MAX_THREADS))
}

/// The page-frame index of each guest-physical page, over memory's regions laid
/// back to back.
struct Frames(Vec<(u64, u64, usize)>);

impl Frames {
    fn of(mem: &GuestMemory) -> Frames {
        let mut first = 0usize;
        Frames(
            mem.iter()
                .map(|r| {
                    let e = (r.start_addr().0, r.len(), first);
                    first += crate::arch::to_usize(r.len() / PAGE_SIZE as u64);
                    e
                })
                .collect(),
        )
    }

    fn count(&self) -> usize {
        self.0.last().map_or(0, |(_, len, first)| {
            first + crate::arch::to_usize(len / PAGE_SIZE as u64)
        })
    }

    /// The frame of the page at `gpa` (4 KiB aligned), if it lies in memory.
    fn frame(&self, gpa: u64) -> Option<usize> {
        self.0.iter().find_map(|&(start, len, first)| {
            let off = gpa.checked_sub(start).filter(|o| *o < len)?;
            Some(first + crate::arch::to_usize(off / PAGE_SIZE as u64))
        })
    }
}

/// Brings `mem` from the image the chain starts from to the chain's newest
/// checkpoint: `files` are the chain's checked files, oldest first, each holding at
/// most `max_pages` pages. Every page ends with its copy in the newest file that
/// holds it. Expands pages on up to `threads` threads ([`threads_for`] chooses).
///
/// On an error, memory may hold some of the chain's pages: the caller discards it.
pub fn replay(
    mem: &GuestMemory,
    files: &[&Checked],
    max_pages: u64,
    threads: usize,
) -> Result<ReplayStats, ReplayError> {
    let frames = Frames::of(mem);
    let mut seen = vec![0u64; frames.count().div_ceil(64)];
    let mut jobs: Vec<(u64, Stored<'_>, usize)> = Vec::new();
    let mut pages = 0u64;
    for (file, checked) in files.iter().enumerate().rev() {
        let fault = |fault| ReplayError { file, fault };
        let stored = checked
            .stored_pages(max_pages)
            .map_err(|e| fault(ReplayFault::Format(e)))?;
        // Within a file too, a later copy of a page wins (a writer never stores a
        // page twice in one checkpoint, but the format allows it).
        let stored: Vec<_> = stored.collect();
        for &(gpa, page) in stored.iter().rev() {
            pages += 1;
            // Batches and older files' addresses are checked for alignment when
            // parsed: a frame is a whole page.
            let f = frames
                .frame(gpa)
                .ok_or_else(|| fault(ReplayFault::Outside(gpa)))?;
            let (word, bit) = (f / 64, 1u64 << (f % 64));
            if seen[word] & bit == 0 {
                seen[word] |= bit;
                jobs.push((gpa, page, file));
            }
        }
    }
    let threads = threads.clamp(1, jobs.len().max(1));
    let chunk = jobs.len().div_ceil(threads).max(1);
    let results: Vec<Result<(), ReplayError>> = if threads == 1 {
        vec![expand(mem, &jobs)]
    } else {
        std::thread::scope(|s| {
            let handles: Vec<_> = jobs
                .chunks(chunk)
                .map(|part| s.spawn(|| expand(mem, part)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        })
    };
    results.into_iter().collect::<Result<(), _>>()?;
    Ok(ReplayStats {
        files: files.len(),
        pages,
        written: jobs.len() as u64,
        threads,
    })
}

/// Expands each page of `jobs` into guest memory at its address.
fn expand(mem: &GuestMemory, jobs: &[(u64, Stored<'_>, usize)]) -> Result<(), ReplayError> {
    for &(gpa, stored, file) in jobs {
        let slice = mem
            .get_slice(GuestAddress(gpa), PAGE_SIZE)
            .map_err(|_| ReplayError {
                file,
                fault: ReplayFault::Outside(gpa),
            })?;
        let guard = slice.ptr_guard_mut();
        let ptr = guard.as_ptr().cast::<[u8; PAGE_SIZE]>();
        // Nothing else touches these bytes while `page` lives: replay runs before the
        // memory is given to KVM or to any device, and `jobs` holds each page once
        // (the seen bitmap), so no two threads write the same page.
        // SAFETY: `ptr` spans PAGE_SIZE bytes of one live guest mapping (`get_slice`),
        // u8 needs no alignment, and no other reference to them exists (above).
        let page = unsafe { &mut *ptr };
        stored.expand_into(page).map_err(|_| ReplayError {
            file,
            fault: ReplayFault::Corrupt(gpa),
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::format;
    use crate::checkpoint::pagecodec::Compression;
    use crate::checkpoint::Checkpoint;
    use crate::dirty::StagedPages;
    use proptest::prelude::*;
    use vm_memory::Bytes;

    const MEMORY: u64 = 16 << 20;
    const PAGES: u64 = MEMORY / PAGE_SIZE as u64;

    /// A checked file of epoch `epoch` holding `pages` (address, fill kind).
    fn file(epoch: u64, pages: &[(u64, u8)], compression: Compression) -> Checked {
        let mut staged = StagedPages::default();
        for &(page, kind) in pages {
            staged.addrs.push(page * PAGE_SIZE as u64);
            staged.data.extend_from_slice(&contents(page, epoch, kind));
        }
        let c = Checkpoint {
            epoch,
            pages: staged,
            state: vec![1, 2, 3],
            ..Default::default()
        };
        let mut bytes = Vec::new();
        format::write(&mut bytes, &c, compression, &mut Vec::new()).unwrap();
        format::read_checked(&mut bytes.as_slice(), bytes.len() as u64, PAGES).unwrap()
    }

    /// Zero (kind 0), a few words (1: compresses) or noise (2: stored raw).
    fn contents(page: u64, epoch: u64, kind: u8) -> Vec<u8> {
        let mut x = (page << 20 | epoch) | 1;
        let mut p = vec![0u8; PAGE_SIZE];
        let words = match kind % 3 {
            0 => 0,
            1 => 3,
            _ => PAGE_SIZE / 8,
        };
        for w in p.chunks_exact_mut(8).take(words) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        p
    }

    /// The model: every file's pages written in order, oldest first, over a
    /// non-zero image.
    fn model(chain: &[Vec<(u64, u8)>]) -> Vec<u8> {
        let mut m = vec![0xa5u8; crate::arch::to_usize(MEMORY)];
        for (e, pages) in chain.iter().enumerate() {
            for &(page, kind) in pages {
                let at = crate::arch::to_usize(page) * PAGE_SIZE;
                m[at..at + PAGE_SIZE].copy_from_slice(&contents(page, e as u64, kind));
            }
        }
        m
    }

    fn replayed(chain: &[Checked], threads: usize) -> (Vec<u8>, ReplayStats) {
        let mem = crate::memory::create(MEMORY).unwrap();
        mem.write_slice(
            &vec![0xa5u8; crate::arch::to_usize(MEMORY)],
            GuestAddress(0),
        )
        .unwrap();
        let refs: Vec<&Checked> = chain.iter().collect();
        let stats = replay(&mem, &refs, PAGES, threads).unwrap();
        let mut out = vec![0u8; crate::arch::to_usize(MEMORY)];
        mem.read_slice(&mut out, GuestAddress(0)).unwrap();
        (out, stats)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Newest-first replay, on any number of threads, leaves memory exactly as
        /// writing every file in order does.
        #[test]
        fn newest_copy_wins_like_an_in_order_replay(
            chain in prop::collection::vec(
                prop::collection::vec((0..PAGES, 0u8..3), 0..40), 1..8),
            lz4 in any::<bool>(),
            threads in 1usize..5,
        ) {
            let compression = if lz4 { Compression::Lz4 } else { Compression::None };
            let files: Vec<Checked> = chain
                .iter()
                .enumerate()
                .map(|(e, p)| file(e as u64, p, compression))
                .collect();
            let (got, stats) = replayed(&files, threads);
            let want = model(&chain);
            let diff = got
                .chunks_exact(PAGE_SIZE)
                .zip(want.chunks_exact(PAGE_SIZE))
                .position(|(a, b)| a != b);
            prop_assert_eq!(diff, None);
            let distinct: std::collections::HashSet<u64> =
                chain.iter().flatten().map(|(p, _)| *p).collect();
            prop_assert_eq!(stats.written, distinct.len() as u64);
            prop_assert_eq!(stats.pages, chain.iter().map(Vec::len).sum::<usize>() as u64);
        }
    }

    #[test]
    fn a_corrupt_older_copy_is_skipped_and_a_corrupt_newest_copy_refused() {
        // Page 3 compresses in both files; garble the older file's block.
        let garble = |c: &mut Checked| {
            let n = c.pages.len();
            for b in &mut c.pages[n - 8..] {
                *b = 0xff;
            }
        };
        let mut old = file(0, &[(3, 1)], Compression::Lz4);
        garble(&mut old);
        let new = file(1, &[(3, 1)], Compression::Lz4);
        let (got, _) = replayed(&[old, new], 1);
        assert_eq!(got[3 * PAGE_SIZE..4 * PAGE_SIZE], contents(3, 1, 1)[..]);

        let old = file(0, &[(3, 1)], Compression::Lz4);
        let mut new = file(1, &[(3, 1)], Compression::Lz4);
        garble(&mut new);
        let mem = crate::memory::create(MEMORY).unwrap();
        let err = replay(&mem, &[&old, &new], PAGES, 1).unwrap_err();
        assert_eq!(err.file, 1);
        assert!(matches!(err.fault, ReplayFault::Corrupt(0x3000)), "{err:?}");
    }

    #[test]
    fn a_page_outside_memory_is_refused_even_when_superseded() {
        let inside = file(1, &[(2, 1)], Compression::Lz4);
        // A file checked against a larger memory holds a page past this one's end.
        let c = Checkpoint {
            epoch: 0,
            pages: StagedPages {
                addrs: vec![MEMORY],
                data: vec![1; PAGE_SIZE],
            },
            ..Default::default()
        };
        let mut bytes = Vec::new();
        format::write(&mut bytes, &c, Compression::Lz4, &mut Vec::new()).unwrap();
        let outside =
            format::read_checked(&mut bytes.as_slice(), bytes.len() as u64, PAGES * 2).unwrap();
        let mem = crate::memory::create(MEMORY).unwrap();
        let err = replay(&mem, &[&outside, &inside], PAGES * 2, 2).unwrap_err();
        assert_eq!(err.file, 0);
        assert!(
            matches!(err.fault, ReplayFault::Outside(a) if a == MEMORY),
            "{err:?}"
        );
    }
}
