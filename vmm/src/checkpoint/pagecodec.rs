//! The page codec: a batch of guest pages as compact bytes, and back. Zero pages are
//! one bit in a bitmap and carry no data; every other page is stored as an lz4 block
//! when that is smaller than the page, raw otherwise. Pure encode/decode, no file
//! system and no socket: the checkpoint file (`super::format`, version 3) stores its
//! pages this way, and a peer sink can send a batch of pages the same way.
//!
//! ```text
//! count    u64 P: pages in the batch
//! addrs    P × u64: guest-physical address of each page (4 KiB aligned)
//! zeros    ⌈P/8⌉ bytes: bit i (byte i/8, least significant bit first) set when
//!          page i is all zeros; the unused high bits of the last byte are zero
//! lengths  one u16 per page that is not zero, in order: its stored length L,
//!          1 ≤ L ≤ 4096; L = 4096 means raw, L < 4096 an lz4 block (lz4_flex's
//!          block format, no frame, no size prefix) that expands to exactly 4096 bytes
//! data     the stored bytes of those pages, in order, back to back
//! ```
//!
//! All integers are little-endian. The batch's length is exactly the sum of its
//! parts: the decoder checks every count and length against the input before it
//! allocates, and refuses with a [`CodecError`] anything else; no input panics it.

use std::fmt;
use std::str::FromStr;

use crate::dirty::{StagedPages, PAGE_SIZE};

/// [`PAGE_SIZE`] as the length field's type.
#[allow(clippy::cast_possible_truncation)] // PAGE_SIZE is 4096
const PAGE_LEN: u16 = PAGE_SIZE as u16;

/// How pages that are not all zeros are stored. Zero pages are always a bit only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Raw 4 KiB pages.
    None,
    /// An lz4 block per page where that is smaller, raw otherwise.
    #[default]
    Lz4,
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::None => "none",
            Compression::Lz4 => "lz4",
        })
    }
}

/// A compression name that is neither `lz4` nor `none`.
#[derive(Debug, thiserror::Error)]
#[error("unknown compression {0:?}: expected lz4 or none")]
pub struct UnknownCompression(pub String);

impl FromStr for Compression {
    type Err = UnknownCompression;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "lz4" => Ok(Compression::Lz4),
            "none" => Ok(Compression::None),
            _ => Err(UnknownCompression(s.to_string())),
        }
    }
}

/// What an encode did, for metrics and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EncodeStats {
    /// Pages in the batch.
    pub pages: u64,
    /// Pages that were all zeros (no data stored).
    pub zero: u64,
    /// Pages stored as lz4 blocks.
    pub compressed: u64,
    /// Pages stored raw.
    pub raw: u64,
    /// Bytes appended to the output.
    pub bytes: u64,
}

/// Why a batch could not be decoded. Each message says what is wrong; none of them
/// follows a panic or an allocation beyond the input's size and the page bound.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    /// The input ends before a part the counts require.
    #[error("page batch truncated: {part} needs {needed} bytes at offset {offset}, {len} in all")]
    Truncated {
        /// Which part.
        part: &'static str,
        /// Bytes it needs.
        needed: u64,
        /// Where it starts.
        offset: u64,
        /// The input's length.
        len: u64,
    },
    /// More pages than the receiver allows (the guest's page count).
    #[error("page batch of {pages} pages, more than the limit of {max}")]
    TooManyPages {
        /// Pages the batch claims.
        pages: u64,
        /// The limit.
        max: u64,
    },
    /// An address is not page-aligned.
    #[error("page {index} has the unaligned address {addr:#x}")]
    Unaligned {
        /// Index in the batch.
        index: u64,
        /// The address.
        addr: u64,
    },
    /// The zero bitmap has bits set past the last page.
    #[error("the zero-page bitmap has bits set past page {0}")]
    BitmapPadding(u64),
    /// A stored length is 0 or larger than a page.
    #[error("page {index} has a stored length of {len} bytes (1 to 4096 allowed)")]
    BadLength {
        /// Index in the batch.
        index: u64,
        /// The length.
        len: u16,
    },
    /// The data section's size differs from the sum of the lengths.
    #[error("page data of {actual} bytes, the lengths add up to {expected}")]
    DataSize {
        /// Sum of the stored lengths.
        expected: u64,
        /// Bytes left in the input.
        actual: u64,
    },
    /// A compressed page does not expand to exactly one page.
    #[error("page {index} ({addr:#x}) is not a valid lz4 block of one page")]
    Corrupt {
        /// Index in the batch.
        index: u64,
        /// Its address.
        addr: u64,
    },
}

/// Appends the encoding of `pages` to `out`. `pages` must be well formed (as many
/// addresses as pages; the staging code guarantees it): extra data bytes are
/// ignored, missing ones end the batch early.
pub fn encode(pages: &StagedPages, compression: Compression, out: &mut Vec<u8>) -> EncodeStats {
    encode_slices(&pages.addrs, &pages.data, compression, out)
}

/// [`encode`] of pages given as their addresses and their data (`data` holds the
/// pages of `addrs`, in order), so a sender encodes part of a staging buffer without
/// copying it first.
pub fn encode_slices(
    addrs: &[u64],
    data: &[u8],
    compression: Compression,
    out: &mut Vec<u8>,
) -> EncodeStats {
    let start = out.len();
    let n = addrs.len().min(data.len() / PAGE_SIZE);
    let mut stats = EncodeStats {
        pages: n as u64,
        ..Default::default()
    };
    out.extend_from_slice(&(n as u64).to_le_bytes());
    for a in &addrs[..n] {
        out.extend_from_slice(&a.to_le_bytes());
    }
    let bitmap_at = out.len();
    out.resize(bitmap_at + n.div_ceil(8), 0);
    let lengths_at = out.len();
    let nonzero = data
        .chunks_exact(PAGE_SIZE)
        .take(n)
        .enumerate()
        .filter_map(|(i, p)| {
            if is_zero(p) {
                out[bitmap_at + i / 8] |= 1 << (i % 8);
                None
            } else {
                Some(p)
            }
        })
        .count();
    stats.zero = (n - nonzero) as u64;
    out.resize(lengths_at + 2 * nonzero, 0);
    let mut slot = lengths_at;
    let mut block = vec![0u8; lz4_flex::block::get_maximum_output_size(PAGE_SIZE)];
    let mut skip = IncompressibleRun::default();
    for (i, page) in data.chunks_exact(PAGE_SIZE).take(n).enumerate() {
        if out[bitmap_at + i / 8] & (1 << (i % 8)) != 0 {
            continue;
        }
        let stored = match compression {
            Compression::Lz4 if skip.tries() => {
                match lz4_flex::block::compress_into(page, &mut block) {
                    Ok(len) if len < PAGE_SIZE => {
                        skip.compressed();
                        Some(&block[..len])
                    }
                    _ => {
                        skip.failed();
                        None
                    }
                }
            }
            Compression::Lz4 | Compression::None => None,
        };
        let stored = match stored {
            Some(s) => {
                stats.compressed += 1;
                s
            }
            None => {
                stats.raw += 1;
                page
            }
        };
        // A stored length is at most PAGE_SIZE, which fits a u16.
        let len = u16::try_from(stored.len()).unwrap_or(PAGE_LEN);
        out[slot..slot + 2].copy_from_slice(&len.to_le_bytes());
        slot += 2;
        out.extend_from_slice(stored);
    }
    stats.bytes = (out.len() - start) as u64;
    stats
}

/// Consecutive pages lz4 could not shrink after which the encoder stops trying.
const GIVE_UP_AFTER: u32 = 4;

/// Pages then stored raw without trying, before the next page is tried again.
const SKIP_PAGES: u32 = 32;

/// Where memory does not compress (encrypted or already compressed data, noise),
/// trying every page costs the encoder more than the pages it sends: an incompressible
/// checkpoint stream ran at about two thirds of its raw rate (`cargo bench --bench
/// mirror`, table 5). After [`GIVE_UP_AFTER`] pages in a row that did not shrink, the
/// next [`SKIP_PAGES`] are stored raw untried; one page is then tried, and if it does
/// not shrink either, the next window is skipped at once. Pages of one region tend to
/// be alike, so little is lost where compressible pages follow incompressible ones:
/// at most a window of them is stored raw. The format does not change: a raw page is
/// always a valid stored form.
#[derive(Default)]
struct IncompressibleRun {
    /// Pages in a row that did not shrink.
    failed: u32,
    /// Pages still to store raw untried.
    skip: u32,
}

impl IncompressibleRun {
    /// Whether to try compressing the next page (and count it if not).
    fn tries(&mut self) -> bool {
        if self.skip > 0 {
            self.skip -= 1;
            return false;
        }
        true
    }

    fn compressed(&mut self) {
        self.failed = 0;
    }

    fn failed(&mut self) {
        self.failed += 1;
        if self.failed >= GIVE_UP_AFTER {
            self.skip = SKIP_PAGES;
            // One more failure after the window skips the next one.
            self.failed = GIVE_UP_AFTER - 1;
        }
    }
}

/// Whether a page is all zeros (compared 64 bytes at a time, which vectorizes).
fn is_zero(page: &[u8]) -> bool {
    page.chunks(64)
        .all(|c| c.iter().fold(0u8, |acc, b| acc | b) == 0)
}

fn read_u64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// A batch whose structure was checked: counts, alignment, bitmap and lengths all
/// agree with the input. Page contents are expanded (and lz4 blocks checked) by
/// [`Batch::for_each`] or [`Batch::to_pages`].
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    count: usize,
    addrs: &'a [u8],
    zeros: &'a [u8],
    lengths: &'a [u8],
    data: &'a [u8],
}

/// An lz4 block that does not expand to exactly one page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("an lz4 block that does not expand to exactly one page")]
pub struct NotOnePage;

/// How one page of a batch is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored<'a> {
    /// All zeros: no data.
    Zero,
    /// The page's bytes as they are (exactly one page).
    Raw(&'a [u8]),
    /// An lz4 block that must expand to exactly one page ([`Stored::expand_into`]
    /// checks that).
    Lz4(&'a [u8]),
}

impl Stored<'_> {
    /// Writes the page's contents into `out`; fails when an lz4 block does not
    /// expand to exactly one page (`out` is then partly written).
    pub fn expand_into(&self, out: &mut [u8; PAGE_SIZE]) -> Result<(), NotOnePage> {
        match self {
            Stored::Zero => out.fill(0),
            Stored::Raw(page) => out.copy_from_slice(page),
            Stored::Lz4(block) => match lz4_flex::block::decompress_into(block, out) {
                Ok(PAGE_SIZE) => {}
                _ => return Err(NotOnePage),
            },
        }
        Ok(())
    }
}

/// The pages of a [`Batch`] as stored: see [`Batch::stored`].
#[derive(Debug, Clone)]
pub struct StoredPages<'a> {
    batch: Batch<'a>,
    next: usize,
    /// Offset of the next length in `batch.lengths`.
    slot: usize,
    /// Offset of the next stored page in `batch.data`.
    data: usize,
}

impl<'a> Iterator for StoredPages<'a> {
    type Item = (u64, Stored<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        let b = &self.batch;
        let i = self.next;
        if i >= b.count {
            return None;
        }
        self.next += 1;
        let addr = b.addr(i);
        if b.is_zero(i) {
            return Some((addr, Stored::Zero));
        }
        let len = usize::from(u16::from_le_bytes([
            b.lengths[self.slot],
            b.lengths[self.slot + 1],
        ]));
        self.slot += 2;
        // parse() checked that the lengths add up to the data section and that each
        // is 1 to PAGE_SIZE.
        let stored = &b.data[self.data..self.data + len];
        self.data += len;
        Some((
            addr,
            if len == PAGE_SIZE {
                Stored::Raw(stored)
            } else {
                Stored::Lz4(stored)
            },
        ))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.batch.count - self.next;
        (left, Some(left))
    }
}

/// Takes `needed` bytes of `b` at `*at` for `part`, or says the input is too short.
fn take<'a>(
    b: &'a [u8],
    at: &mut usize,
    needed: u64,
    part: &'static str,
) -> Result<&'a [u8], CodecError> {
    let short = || CodecError::Truncated {
        part,
        needed,
        offset: *at as u64,
        len: b.len() as u64,
    };
    let n = usize::try_from(needed).map_err(|_| short())?;
    let end = at
        .checked_add(n)
        .filter(|e| *e <= b.len())
        .ok_or_else(short)?;
    let s = &b[*at..end];
    *at = end;
    Ok(s)
}

impl<'a> Batch<'a> {
    /// Checks the structure of the batch `bytes` (all of it, nothing after it) of at
    /// most `max_pages` pages.
    pub fn parse(bytes: &'a [u8], max_pages: u64) -> Result<Batch<'a>, CodecError> {
        let mut at = 0;
        let count = read_u64(take(bytes, &mut at, 8, "the page count")?, 0);
        if count > max_pages {
            return Err(CodecError::TooManyPages {
                pages: count,
                max: max_pages,
            });
        }
        // Every page takes at least 8 bytes of address: a count the input cannot
        // hold fails here, before any size is computed from it.
        let addrs = take(
            bytes,
            &mut at,
            count.saturating_mul(8),
            "the page addresses",
        )?;
        let count = addrs.len() / 8;
        for (i, a) in addrs.chunks_exact(8).enumerate() {
            let addr = read_u64(a, 0);
            if addr % PAGE_SIZE as u64 != 0 {
                return Err(CodecError::Unaligned {
                    index: i as u64,
                    addr,
                });
            }
        }
        let zeros = take(
            bytes,
            &mut at,
            count.div_ceil(8) as u64,
            "the zero-page bitmap",
        )?;
        if count % 8 != 0 {
            if let Some(last) = zeros.last() {
                if last >> (count % 8) != 0 {
                    return Err(CodecError::BitmapPadding(count as u64));
                }
            }
        }
        let zero_pages: usize = zeros.iter().map(|b| b.count_ones() as usize).sum();
        let nonzero = count - zero_pages;
        let lengths = take(bytes, &mut at, 2 * nonzero as u64, "the page lengths")?;
        let mut expected = 0u64;
        let mut page = 0usize;
        for l in lengths.chunks_exact(2) {
            while zeros[page / 8] & (1 << (page % 8)) != 0 {
                page += 1;
            }
            let len = u16::from_le_bytes([l[0], l[1]]);
            if len == 0 || len > PAGE_LEN {
                return Err(CodecError::BadLength {
                    index: page as u64,
                    len,
                });
            }
            expected += u64::from(len);
            page += 1;
        }
        let data = &bytes[at..];
        if data.len() as u64 != expected {
            return Err(CodecError::DataSize {
                expected,
                actual: data.len() as u64,
            });
        }
        Ok(Batch {
            count,
            addrs,
            zeros,
            lengths,
            data,
        })
    }

    /// Pages in the batch.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether the batch has no pages.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The address of page `i` (`i < len()`).
    pub fn addr(&self, i: usize) -> u64 {
        read_u64(self.addrs, i * 8)
    }

    /// Whether page `i` is a zero page.
    pub fn is_zero(&self, i: usize) -> bool {
        self.zeros[i / 8] & (1 << (i % 8)) != 0
    }

    /// How the batch's pages are stored (its `bytes` field: the batch's length).
    pub fn stats(&self) -> EncodeStats {
        let zero = (0..self.count).filter(|i| self.is_zero(*i)).count() as u64;
        let raw = self
            .lengths
            .chunks_exact(2)
            .filter(|l| u16::from_le_bytes([l[0], l[1]]) == PAGE_LEN)
            .count() as u64;
        let stored = self.lengths.len() as u64 / 2;
        EncodeStats {
            pages: self.count as u64,
            zero,
            compressed: stored - raw,
            raw,
            bytes: (8 + self.addrs.len() + self.zeros.len() + self.lengths.len() + self.data.len())
                as u64,
        }
    }

    /// Calls `f(index, address, contents)` for every page, in order, expanding
    /// compressed pages into a page buffer; stops at the first page that does not
    /// expand to exactly one page, or at `f`'s first error.
    pub fn for_each<E: From<CodecError>>(
        &self,
        f: impl FnMut(usize, u64, &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        self.for_each_where(|_, _| true, f)
    }

    /// As [`Batch::for_each`], for the pages `keep(index, address)` accepts only:
    /// the others are skipped without being expanded (a fold that already wrote a
    /// newer copy of a page does not decompress the older ones).
    pub fn for_each_where<E: From<CodecError>>(
        &self,
        mut keep: impl FnMut(usize, u64) -> bool,
        mut f: impl FnMut(usize, u64, &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut buf = [0u8; PAGE_SIZE];
        for (i, (addr, stored)) in self.stored().enumerate() {
            if !keep(i, addr) {
                continue;
            }
            match stored {
                Stored::Raw(page) => f(i, addr, page)?,
                Stored::Zero | Stored::Lz4(_) => {
                    stored
                        .expand_into(&mut buf)
                        .map_err(|NotOnePage| CodecError::Corrupt {
                            index: i as u64,
                            addr,
                        })?;
                    f(i, addr, &buf)?
                }
            }
        }
        Ok(())
    }

    /// Every page's address and stored form, in order, without expanding any: a
    /// reader that needs only some pages, or expands them elsewhere (a restore
    /// decodes each page's newest copy straight into guest memory), starts here.
    pub fn stored(&self) -> StoredPages<'a> {
        StoredPages {
            batch: *self,
            next: 0,
            slot: 0,
            data: 0,
        }
    }

    /// Every page, expanded. Allocates `len() × 4096` bytes, bounded by the
    /// `max_pages` given to [`Batch::parse`].
    pub fn to_pages(&self) -> Result<StagedPages, CodecError> {
        let mut out = StagedPages {
            addrs: Vec::with_capacity(self.count),
            data: Vec::with_capacity(self.count * PAGE_SIZE),
        };
        self.for_each(|_, addr, page| {
            out.addrs.push(addr);
            out.data.extend_from_slice(page);
            Ok::<(), CodecError>(())
        })?;
        Ok(out)
    }
}

/// Decodes the batch `bytes` of at most `max_pages` pages.
pub fn decode(bytes: &[u8], max_pages: u64) -> Result<StagedPages, CodecError> {
    Batch::parse(bytes, max_pages)?.to_pages()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn batch(pages: &[(u64, Vec<u8>)]) -> StagedPages {
        StagedPages {
            addrs: pages.iter().map(|(a, _)| *a).collect(),
            data: pages.iter().flat_map(|(_, d)| d.iter().copied()).collect(),
        }
    }

    /// A zero page, a compressible page and an incompressible one.
    fn sample() -> StagedPages {
        let mut x = 0x9e37_79b9_u32;
        let noise: Vec<u8> = (0..PAGE_SIZE)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x.to_le_bytes()[0]
            })
            .collect();
        let text: Vec<u8> = b"mirrorvm "
            .iter()
            .copied()
            .cycle()
            .take(PAGE_SIZE)
            .collect();
        batch(&[
            (0x1000, vec![0; PAGE_SIZE]),
            (0x2000, text),
            (0x7000, noise),
        ])
    }

    fn encoded(p: &StagedPages, c: Compression) -> Vec<u8> {
        let mut out = Vec::new();
        let s = encode(p, c, &mut out);
        assert_eq!(s.bytes, out.len() as u64);
        out
    }

    #[test]
    fn zero_pages_are_bits_and_text_compresses() {
        let p = sample();
        let mut out = Vec::new();
        let s = encode(&p, Compression::Lz4, &mut out);
        assert_eq!((s.pages, s.zero, s.compressed, s.raw), (3, 1, 1, 1));
        assert_eq!(Batch::parse(&out, 3).unwrap().stats(), s);
        assert!(out.len() < 8 + 24 + 1 + 4 + 2 * PAGE_SIZE, "{}", out.len());
        assert_eq!(out[32], 0b001, "the bitmap marks page 0 only");
        assert_eq!(decode(&out, 3).unwrap(), p);

        let s = encode(&p, Compression::None, &mut out);
        assert_eq!((s.zero, s.compressed, s.raw), (1, 0, 2));
        assert_eq!(s.bytes, 8 + 24 + 1 + 4 + 2 * PAGE_SIZE as u64);
        let second = &out[out.len() - usize::try_from(s.bytes).unwrap()..];
        assert_eq!(decode(second, 3).unwrap(), p);
        assert_eq!(
            decode(&encoded(&StagedPages::default(), Compression::Lz4), 0).unwrap(),
            StagedPages::default()
        );
    }

    #[test]
    fn after_a_run_of_incompressible_pages_a_window_is_stored_raw_untried() {
        let s = sample();
        let (text, noise) = (&s.data[PAGE_SIZE..2 * PAGE_SIZE], &s.data[2 * PAGE_SIZE..]);
        // Noise, noise, …: after GIVE_UP_AFTER failures, SKIP_PAGES pages are not
        // tried, so text pages inside that window are stored raw, and text after it
        // is compressed again (after at most one more window, opened by the noise
        // page tried at the window's end: here the page tried is text).
        let give_up = usize::try_from(GIVE_UP_AFTER).unwrap();
        let window = usize::try_from(SKIP_PAGES).unwrap();
        let mut pages = Vec::new();
        for i in 0..give_up {
            pages.push((0x10_0000 + i as u64 * 0x1000, noise.to_vec()));
        }
        for i in 0..window + 8 {
            pages.push((0x20_0000 + i as u64 * 0x1000, text.to_vec()));
        }
        let p = batch(&pages);
        let mut out = Vec::new();
        let st = encode(&p, Compression::Lz4, &mut out);
        assert_eq!(st.raw, (give_up + window) as u64, "{st:?}");
        assert_eq!(st.compressed, 8, "{st:?}");
        assert_eq!(decode(&out, pages.len() as u64).unwrap(), p);

        // Interleaved: a compressible page resets the run, nothing is skipped.
        let mut mixed = Vec::new();
        for i in 0..64u64 {
            let data = if i % 3 == 2 { text } else { noise };
            mixed.push((i * 0x1000, data.to_vec()));
        }
        let p = batch(&mixed);
        let st = encode(&p, Compression::Lz4, &mut out);
        assert_eq!(st.compressed, 21, "{st:?}");
    }

    #[test]
    fn skipped_pages_are_not_expanded_and_the_others_are_in_order() {
        let p = sample();
        let mut out = encoded(&p, Compression::Lz4);
        // Garble page 1's lz4 block: skipping it must not notice.
        let len = usize::from(u16::from_le_bytes([out[33], out[34]]));
        for x in &mut out[37..37 + len] {
            *x = 0xff;
        }
        let b = Batch::parse(&out, 3).unwrap();
        let mut seen = Vec::new();
        b.for_each_where(
            |i, _| i != 1,
            |i, addr, page| {
                seen.push((i, addr, page.to_vec()));
                Ok::<(), CodecError>(())
            },
        )
        .unwrap();
        assert_eq!(seen.len(), 2);
        assert_eq!((seen[0].0, seen[0].1), (0, 0x1000));
        assert_eq!(seen[1].2, p.data[2 * PAGE_SIZE..]);
        assert!(matches!(
            b.to_pages(),
            Err(CodecError::Corrupt { index: 1, .. })
        ));
    }

    #[test]
    fn every_corrupt_batch_is_refused_with_its_reason() {
        let good = encoded(&sample(), Compression::Lz4);
        let e = |b: &[u8]| decode(b, 16).unwrap_err();

        assert!(matches!(e(&good[..4]), CodecError::Truncated { .. }));
        assert_eq!(
            decode(&good, 2).unwrap_err(),
            CodecError::TooManyPages { pages: 3, max: 2 }
        );
        // A count the input cannot hold is refused before anything is sized from it.
        let mut b = good.clone();
        b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            decode(&b, u64::MAX).unwrap_err(),
            CodecError::Truncated {
                part: "the page addresses",
                ..
            }
        ));
        let mut b = good.clone();
        b[8] = 1;
        assert_eq!(
            e(&b),
            CodecError::Unaligned {
                index: 0,
                addr: 0x1001
            }
        );
        let mut b = good.clone();
        b[32] |= 0x80;
        assert_eq!(e(&b), CodecError::BitmapPadding(3));
        // Page 1 (the first stored one) with length 0 and with more than a page.
        for bad in [0u16, 4097] {
            let mut b = good.clone();
            b[33..35].copy_from_slice(&bad.to_le_bytes());
            assert_eq!(e(&b), CodecError::BadLength { index: 1, len: bad });
        }
        // Marking a stored page zero leaves its data unaccounted for.
        let mut b = good.clone();
        b[32] |= 0b010;
        assert!(matches!(
            e(&b),
            CodecError::Truncated { .. } | CodecError::DataSize { .. }
        ));
        assert!(matches!(
            e(&good[..good.len() - 1]),
            CodecError::DataSize { .. }
        ));
        let mut b = good.clone();
        b.push(0);
        assert!(matches!(e(&b), CodecError::DataSize { .. }));
        // A garbled lz4 block of the right length.
        let mut b = good.clone();
        let len = usize::from(u16::from_le_bytes([b[33], b[34]]));
        for x in &mut b[37..37 + len] {
            *x = 0xff;
        }
        assert_eq!(
            e(&b),
            CodecError::Corrupt {
                index: 1,
                addr: 0x2000
            }
        );
        // A raw-length page that is stored compressed cannot be told apart, but one
        // that claims fewer bytes than it expands to is refused: shorten the block.
        let mut b = good.clone();
        b[33..35].copy_from_slice(&u16::try_from(len - 1).unwrap().to_le_bytes());
        b.remove(37 + len - 1);
        assert!(matches!(e(&b), CodecError::Corrupt { .. }));
    }

    #[test]
    fn garbage_never_panics() {
        let good = encoded(&sample(), Compression::Lz4);
        for cut in 0..good.len() {
            let _ = decode(&good[..cut], 16);
        }
        let mut x = 0x1234_5678_u32;
        for _ in 0..2000 {
            let mut b = good.clone();
            for _ in 0..3 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let i = x as usize % b.len();
                b[i] = (x >> 8).to_le_bytes()[0];
            }
            if let Ok(p) = decode(&b, 16) {
                assert_eq!(p.data.len(), p.addrs.len() * PAGE_SIZE);
            }
        }
    }

    /// A page as the guest writes it: zeros, a repeated byte, a sparse pattern, or
    /// noise, so every storage kind shows up.
    fn page_strategy() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            Just(vec![0u8; PAGE_SIZE]),
            any::<u8>().prop_map(|b| vec![b; PAGE_SIZE]),
            prop::collection::vec((0..PAGE_SIZE, any::<u8>()), 0..40).prop_map(|w| {
                let mut p = vec![0u8; PAGE_SIZE];
                for (i, b) in w {
                    p[i] = b;
                }
                p
            }),
            prop::collection::vec(any::<u8>(), PAGE_SIZE),
        ]
    }

    proptest! {
        #[test]
        fn encode_then_decode_is_the_identity(
            pages in prop::collection::vec((0u64..1 << 40, page_strategy()), 0..24),
            lz4 in any::<bool>(),
        ) {
            let p = batch(&pages.into_iter().map(|(a, d)| (a * PAGE_SIZE as u64, d)).collect::<Vec<_>>());
            let c = if lz4 { Compression::Lz4 } else { Compression::None };
            let mut out = vec![0xee; 3]; // appends after what is there
            let s = encode(&p, c, &mut out);
            prop_assert_eq!(s.pages, p.addrs.len() as u64);
            prop_assert_eq!(s.zero + s.compressed + s.raw, s.pages);
            prop_assert!(s.bytes <= 8 + s.pages * (8 + 2 + PAGE_SIZE as u64) + s.pages.div_ceil(8));
            prop_assert_eq!(Batch::parse(&out[3..], s.pages).unwrap().stats(), s);
            let back = decode(&out[3..], p.addrs.len() as u64).unwrap();
            prop_assert_eq!(back, p);
        }
    }
}
