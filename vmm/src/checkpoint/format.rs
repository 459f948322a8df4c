//! The checkpoint file format, as bytes: encode and decode, no file system. Specified
//! in `docs/checkpoint-format.md`.
//!
//! ```text
//! header   64 bytes: magic "MVCKPT\0\0", version u32, flags u32, epoch u64,
//!          state_len u64, npages u64, page_size u32, pages_len u64 (version 3;
//!          zero before), 8 reserved zero bytes, CRC32C u32 of bytes 0..60
//!          (all little-endian)
//! state    state_len bytes: the postcard-encoded machine state
//! pages    version 3: pages_len bytes, a page batch (`super::pagecodec`: zero
//!          pages as a bitmap, the others lz4 or raw)
//!          versions 1 and 2: npages × u64 addresses, then npages × 4096 bytes
//! trailer  CRC32C u32 of everything before it, 4 zero bytes, "MVCKEND\0"
//! ```
//!
//! The decoder checks magic, version, header CRC, the state bound and the page count
//! bound, and that the sizes add up to the input's length exactly, before it allocates
//! anything from the header; the page batch's own counts are checked by its codec.
//!
//! Version 1 files (until the manifest moved out of every checkpoint) carry the
//! machine's configuration inside the state; they still read (`StateSection::V1`),
//! as golden bytes in the tests prove. Version 2 files (raw pages) still read too.

use std::io::{Read, Write};
use std::path::PathBuf;

use devices::codec::{Crc32cHeader, FromBytes, Immutable, IntoBytes, KnownLayout, U32, U64};
use serde::Deserialize;

use super::pagecodec::{self, CodecError, Compression, EncodeStats};
use super::{Checkpoint, DiskManifest, MachineState, Manifest};
use crate::config::DiskConfig;
use crate::dirty::{StagedPages, PAGE_SIZE};
use crate::vcpu::VcpuState;
use crate::vm_state::VmState;

/// [`PAGE_SIZE`] as the header's u32 field.
#[allow(clippy::cast_possible_truncation)] // PAGE_SIZE is 4096
const PAGE_SIZE_U32: u32 = PAGE_SIZE as u32;

/// File magic of a checkpoint.
pub const MAGIC: [u8; 8] = *b"MVCKPT\0\0";
/// Trailer magic.
pub const END_MAGIC: [u8; 8] = *b"MVCKEND\0";
/// Format version this code writes.
pub const VERSION: u32 = 3;
/// The first version whose pages are a page batch (`super::pagecodec`).
pub const BATCH_VERSION: u32 = 3;
/// Oldest format version this code reads.
pub const OLDEST_VERSION: u32 = 1;
/// Header size.
pub const HEADER_LEN: usize = 64;
/// Trailer size: CRC32C (4), padding (4), end magic (8).
pub const TRAILER_LEN: usize = 16;
/// Largest encoded machine state accepted.
pub const MAX_STATE_LEN: u64 = 64 << 20;
/// Flag: the checkpoint completes a base image.
pub const FLAG_FULL: u32 = 1;

/// The header as laid out on disk.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct RawHeader {
    magic: [u8; 8],
    version: U32,
    flags: U32,
    epoch: U64,
    state_len: U64,
    npages: U64,
    page_size: U32,
    pages_len: U64,
    reserved: [u8; 8],
    crc: U32,
}

const _: () = assert!(std::mem::size_of::<RawHeader>() == HEADER_LEN);

/// The last four bytes are the CRC32C of the rest: the same codec as the store's.
impl Crc32cHeader for RawHeader {}

/// A checked header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Format version.
    pub version: u32,
    /// [`FLAG_FULL`] and future flags.
    pub flags: u32,
    /// The checkpoint's epoch.
    pub epoch: u64,
    /// Bytes of encoded machine state.
    pub state_len: u64,
    /// Pages in the file.
    pub npages: u64,
    /// Bytes of the page batch (version 3 and later; written as zero before, where
    /// the pages section is `npages × (8 + 4096)` bytes).
    pub pages_len: u64,
}

impl Header {
    /// Bytes of the pages section, if it fits in a u64.
    pub fn pages_section_len(&self) -> Option<u64> {
        if self.version >= BATCH_VERSION {
            Some(self.pages_len)
        } else {
            self.npages.checked_mul(8 + PAGE_SIZE as u64)
        }
    }

    /// The file length these sizes imply, if it fits in a u64.
    pub fn file_len(&self) -> Option<u64> {
        self.pages_section_len()
            .and_then(|b| b.checked_add(self.state_len))
            .and_then(|b| b.checked_add((HEADER_LEN + TRAILER_LEN) as u64))
    }
}

/// Failures decoding a checkpoint file.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// Reading the input failed.
    #[error("cannot read")]
    Io(#[source] std::io::Error),
    /// Not a checkpoint file.
    #[error("not a mirrorvm checkpoint (bad magic)")]
    BadMagic,
    /// Written by a newer (or unknown) format.
    #[error(
        "checkpoint format version {0}; this mirrorvm reads versions {OLDEST_VERSION} to {VERSION}"
    )]
    Version(u32),
    /// The header's CRC does not match.
    #[error("header checksum mismatch")]
    HeaderCrc,
    /// The page size is not the one this mirrorvm uses.
    #[error("page size {0}, expected {PAGE_SIZE}")]
    PageSize(u32),
    /// The sizes in the header do not add up to the input.
    #[error("the header says {expected} bytes, the file has {actual}")]
    Size {
        /// Size the header implies (u64::MAX: overflows).
        expected: u64,
        /// Actual size.
        actual: u64,
    },
    /// The machine state is larger than allowed.
    #[error("machine state of {0} bytes exceeds the limit of {MAX_STATE_LEN}")]
    StateTooLarge(u64),
    /// More pages than the guest has.
    #[error("{pages} pages, more than the guest's {max}")]
    TooManyPages {
        /// Pages in the file.
        pages: u64,
        /// Pages of guest memory.
        max: u64,
    },
    /// The body's CRC does not match.
    #[error("checksum mismatch (the file is corrupt or torn)")]
    BodyCrc,
    /// The machine state could not be decoded.
    #[error("cannot decode the machine state")]
    Decode(#[source] postcard::Error),
    /// The page batch is malformed.
    #[error("bad page section")]
    Pages(#[source] CodecError),
    /// The page batch holds another number of pages than the header says.
    #[error("the header says {header} pages, the page section holds {batch}")]
    PageCount {
        /// Pages in the header.
        header: u64,
        /// Pages in the batch.
        batch: u64,
    },
}

/// Encodes a header.
pub fn encode_header(h: &Header) -> [u8; HEADER_LEN] {
    let mut raw = RawHeader {
        magic: MAGIC,
        version: U32::new(h.version),
        flags: U32::new(h.flags),
        epoch: U64::new(h.epoch),
        state_len: U64::new(h.state_len),
        npages: U64::new(h.npages),
        page_size: U32::new(PAGE_SIZE_U32),
        pages_len: U64::new(if h.version >= BATCH_VERSION {
            h.pages_len
        } else {
            0
        }),
        reserved: [0; 8],
        crc: U32::new(0),
    };
    raw.seal();
    let mut out = [0u8; HEADER_LEN];
    out.copy_from_slice(raw.as_bytes());
    out
}

/// Decodes and checks a header: magic, version, CRC, page size, state bound.
pub fn decode_header(bytes: &[u8; HEADER_LEN]) -> Result<Header, FormatError> {
    let raw = RawHeader::ref_from_bytes(bytes.as_slice()).map_err(|_| FormatError::BadMagic)?;
    if raw.magic != MAGIC {
        return Err(FormatError::BadMagic);
    }
    let version = raw.version.get();
    if !(OLDEST_VERSION..=VERSION).contains(&version) {
        return Err(FormatError::Version(version));
    }
    raw.check_crc().map_err(|_| FormatError::HeaderCrc)?;
    if raw.page_size.get() != PAGE_SIZE_U32 {
        return Err(FormatError::PageSize(raw.page_size.get()));
    }
    let h = Header {
        version,
        flags: raw.flags.get(),
        epoch: raw.epoch.get(),
        state_len: raw.state_len.get(),
        npages: raw.npages.get(),
        pages_len: raw.pages_len.get(),
    };
    if h.state_len > MAX_STATE_LEN {
        return Err(FormatError::StateTooLarge(h.state_len));
    }
    Ok(h)
}

/// Checks a header's sizes against the input's length and the guest's page count.
pub fn check_len(h: &Header, len: u64, max_pages: u64) -> Result<(), FormatError> {
    if h.npages > max_pages {
        return Err(FormatError::TooManyPages {
            pages: h.npages,
            max: max_pages,
        });
    }
    match h.file_len() {
        Some(e) if e == len => Ok(()),
        e => Err(FormatError::Size {
            expected: e.unwrap_or(u64::MAX),
            actual: len,
        }),
    }
}

/// What [`write`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Written {
    /// Bytes of the whole file.
    pub bytes: u64,
    /// How its pages were stored.
    pub pages: EncodeStats,
}

/// Encodes checkpoint `c` (format [`VERSION`]) with its pages stored as
/// `compression` says, into `w`. `scratch` holds the encoded page batch (its
/// length goes in the header first); pass the same buffer again to reuse it.
pub fn write(
    w: &mut impl Write,
    c: &Checkpoint,
    compression: Compression,
    scratch: &mut Vec<u8>,
) -> std::io::Result<Written> {
    scratch.clear();
    let stats = pagecodec::encode(&c.pages, compression, scratch);
    let h = encode_header(&Header {
        version: VERSION,
        flags: if c.full { FLAG_FULL } else { 0 },
        epoch: c.epoch,
        state_len: c.state.len() as u64,
        npages: stats.pages,
        pages_len: scratch.len() as u64,
    });
    let mut crc = crc32c::crc32c(&h);
    w.write_all(&h)?;
    crc = crc32c::crc32c_append(crc, &c.state);
    w.write_all(&c.state)?;
    crc = crc32c::crc32c_append(crc, scratch);
    w.write_all(scratch)?;
    let mut t = [0u8; TRAILER_LEN];
    t[0..4].copy_from_slice(&crc.to_le_bytes());
    t[8..16].copy_from_slice(&END_MAGIC);
    w.write_all(&t)?;
    Ok(Written {
        bytes: (HEADER_LEN + c.state.len() + scratch.len() + TRAILER_LEN) as u64,
        pages: stats,
    })
}

/// A decoded checkpoint file.
#[derive(Debug)]
pub struct Decoded {
    /// Its header.
    pub header: Header,
    /// The encoded state section (decode with [`decode_state`]).
    pub state: Vec<u8>,
    /// Its pages.
    pub pages: StagedPages,
    /// How they were stored (version 1 and 2 files: all raw).
    pub stored: EncodeStats,
}

fn read_header(r: &mut impl Read, len: u64) -> Result<(Header, [u8; HEADER_LEN]), FormatError> {
    if len < (HEADER_LEN + TRAILER_LEN) as u64 {
        return Err(FormatError::Size {
            expected: (HEADER_LEN + TRAILER_LEN) as u64,
            actual: len,
        });
    }
    let mut h = [0u8; HEADER_LEN];
    r.read_exact(&mut h).map_err(FormatError::Io)?;
    Ok((decode_header(&h)?, h))
}

/// A checkpoint file whose sizes and checksums were checked, its pages not yet
/// decoded: [`Checked::batch`] walks them without expanding all of them,
/// [`Checked::decode`] expands them all.
#[derive(Debug)]
pub struct Checked {
    /// Its header.
    pub header: Header,
    /// The encoded state section.
    pub state: Vec<u8>,
    /// The page section as stored.
    pub pages: Vec<u8>,
}

/// Reads a whole checkpoint of `len` bytes holding at most `max_pages` pages and
/// checks the header and sizes first, then the body's CRC.
pub fn read_checked(r: &mut impl Read, len: u64, max_pages: u64) -> Result<Checked, FormatError> {
    let (header, raw) = read_header(r, len)?;
    check_len(&header, len, max_pages)?;
    // Sizes are now bounded by the input's length.
    let mut state = vec![0u8; crate::arch::to_usize(header.state_len)];
    r.read_exact(&mut state).map_err(FormatError::Io)?;
    // Bounded by the input's length too (check_len).
    let section = header.pages_section_len().unwrap_or(0);
    let mut pages = vec![0u8; crate::arch::to_usize(section)];
    r.read_exact(&mut pages).map_err(FormatError::Io)?;
    let mut t = [0u8; TRAILER_LEN];
    r.read_exact(&mut t).map_err(FormatError::Io)?;
    let mut crc = crc32c::crc32c(&raw);
    crc = crc32c::crc32c_append(crc, &state);
    crc = crc32c::crc32c_append(crc, &pages);
    if t[8..16] != END_MAGIC || t[0..4] != crc.to_le_bytes() {
        return Err(FormatError::BodyCrc);
    }
    Ok(Checked {
        header,
        state,
        pages,
    })
}

impl Checked {
    /// The page batch of a version 3 file (its structure and page count checked);
    /// `None` for older versions, whose raw pages [`Checked::decode`] reads.
    pub fn batch(&self, max_pages: u64) -> Result<Option<pagecodec::Batch<'_>>, FormatError> {
        if self.header.version < BATCH_VERSION {
            return Ok(None);
        }
        let batch = pagecodec::Batch::parse(&self.pages, max_pages).map_err(FormatError::Pages)?;
        if batch.len() as u64 != self.header.npages {
            return Err(FormatError::PageCount {
                header: self.header.npages,
                batch: batch.len() as u64,
            });
        }
        Ok(Some(batch))
    }

    /// Every page's address and stored form, in the file's order, without
    /// expanding any: version 3 files through their batch, older ones as raw pages
    /// (their addresses checked for alignment here, as a batch's are when parsed).
    pub fn stored_pages(&self, max_pages: u64) -> Result<FilePages<'_>, FormatError> {
        if let Some(batch) = self.batch(max_pages)? {
            return Ok(FilePages::Batch(batch.stored()));
        }
        // check_len bounded the page count by `max_pages` and sized the section as
        // P × (8 + PAGE_SIZE).
        let n = crate::arch::to_usize(self.header.npages);
        let (addrs, data) = self.pages.split_at(n * 8);
        for (i, a) in addrs.chunks_exact(8).enumerate() {
            let addr = le_u64(a);
            if addr % PAGE_SIZE as u64 != 0 {
                return Err(FormatError::Pages(pagecodec::CodecError::Unaligned {
                    index: i as u64,
                    addr,
                }));
            }
        }
        Ok(FilePages::Raw(
            addrs.chunks_exact(8).zip(data.chunks_exact(PAGE_SIZE)),
        ))
    }

    /// Expands every page.
    pub fn decode(self, max_pages: u64) -> Result<Decoded, FormatError> {
        let (pages, stored) = match self.batch(max_pages)? {
            Some(batch) => (batch.to_pages().map_err(FormatError::Pages)?, batch.stats()),
            None => {
                let n = crate::arch::to_usize(self.header.npages);
                let (addr_bytes, data) = self.pages.split_at(n * 8);
                let addrs = addr_bytes
                    .chunks_exact(8)
                    .map(|c| {
                        let mut b = [0u8; 8];
                        b.copy_from_slice(c);
                        u64::from_le_bytes(b)
                    })
                    .collect();
                let stored = EncodeStats {
                    pages: self.header.npages,
                    raw: self.header.npages,
                    bytes: self.pages.len() as u64,
                    ..Default::default()
                };
                (
                    StagedPages {
                        addrs,
                        data: data.to_vec(),
                    },
                    stored,
                )
            }
        };
        Ok(Decoded {
            header: self.header,
            state: self.state,
            pages,
            stored,
        })
    }
}

fn le_u64(b: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(b);
    u64::from_le_bytes(w)
}

/// The pages of a checked checkpoint file as stored: see [`Checked::stored_pages`].
#[derive(Debug, Clone)]
pub enum FilePages<'a> {
    /// A version 3 file's page batch.
    Batch(pagecodec::StoredPages<'a>),
    /// A version 1 or 2 file's raw pages: addresses, then pages.
    Raw(std::iter::Zip<std::slice::ChunksExact<'a, u8>, std::slice::ChunksExact<'a, u8>>),
}

impl<'a> Iterator for FilePages<'a> {
    type Item = (u64, pagecodec::Stored<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            FilePages::Batch(b) => b.next(),
            FilePages::Raw(r) => r
                .next()
                .map(|(a, page)| (le_u64(a), pagecodec::Stored::Raw(page))),
        }
    }
}

/// Reads and checks a whole checkpoint of `len` bytes holding at most `max_pages`
/// pages: the header and sizes first, then the body and its CRC, then its pages.
pub fn read(r: &mut impl Read, len: u64, max_pages: u64) -> Result<Decoded, FormatError> {
    read_checked(r, len, max_pages)?.decode(max_pages)
}

/// Reads only the header and state section of a checkpoint of `len` bytes (not its
/// pages, and without the body checksum, which [`read`] checks).
pub fn read_state_section(r: &mut impl Read, len: u64) -> Result<(Header, Vec<u8>), FormatError> {
    let (header, _) = read_header(r, len)?;
    check_len(&header, len, u64::MAX)?;
    let mut state = vec![0u8; crate::arch::to_usize(header.state_len)];
    r.read_exact(&mut state).map_err(FormatError::Io)?;
    Ok((header, state))
}

/// Version 1's disk configuration, frozen as it was encoded.
#[derive(Deserialize)]
struct DiskConfigV1 {
    path: PathBuf,
    readonly: bool,
    checkpoint: bool,
}

/// Version 1's configuration inside every checkpoint, frozen as it was encoded.
#[derive(Deserialize)]
struct SavedConfigV1 {
    memory: u64,
    cpus: u8,
    cmdline: String,
    disks: Vec<DiskConfigV1>,
    journal_ids: Vec<Option<u64>>,
}

#[derive(Deserialize)]
struct MachineStateV1 {
    config: SavedConfigV1,
    vcpus: Vec<VcpuState>,
    vm: VmState,
    devices: Vec<u8>,
}

/// A decoded state section.
#[derive(Debug)]
pub struct StateSection {
    /// The machine state.
    pub state: MachineState,
    /// The manifest a version 1 file carries in every checkpoint (disk sizes are
    /// then unknown: 0). Version 2 keeps it beside the checkpoints.
    pub v1_manifest: Option<Manifest>,
}

/// Decodes the state section of a file of format `version`.
pub fn decode_state(version: u32, bytes: &[u8]) -> Result<StateSection, FormatError> {
    if version == 1 {
        let v1: MachineStateV1 = postcard::from_bytes(bytes).map_err(FormatError::Decode)?;
        let c = v1.config;
        let disks = c
            .disks
            .into_iter()
            .enumerate()
            .map(|(i, d)| DiskManifest {
                config: DiskConfig {
                    readonly: d.readonly,
                    checkpoint: d.checkpoint,
                    ..DiskConfig::new(d.path)
                },
                size: 0,
                journal_id: c.journal_ids.get(i).copied().flatten(),
                region_size: None,
            })
            .collect();
        return Ok(StateSection {
            state: MachineState {
                vcpus: v1.vcpus,
                vm: v1.vm,
                devices: v1.devices,
            },
            v1_manifest: Some(Manifest {
                memory: c.memory,
                cpus: c.cpus,
                cmdline: c.cmdline,
                disks,
                cpu: Default::default(),
            }),
        });
    }
    Ok(StateSection {
        state: postcard::from_bytes(bytes).map_err(FormatError::Decode)?,
        v1_manifest: None,
    })
}

/// Decodes any byte string as a checkpoint file: refused with an error or decoded,
/// never a panic or an allocation beyond the input's size. The fuzz target
/// (`vmm/fuzz`) calls this.
pub fn fuzz(data: &[u8]) {
    let max_pages = u64::from(data.first().copied().unwrap_or(0));
    if let Ok(d) = read(
        &mut std::io::Cursor::new(data),
        data.len() as u64,
        max_pages,
    ) {
        let _ = decode_state(d.header.version, &d.state);
    }
    let _ = read_state_section(&mut std::io::Cursor::new(data), data.len() as u64);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A version 1 file written by the code before the manifest moved out of the
    /// checkpoints (epoch 7, two pages at 0x1000 and 0x5000 holding `i % 251`).
    const V1: &[u8] = include_bytes!("testdata/ckpt-v1.mvc");

    fn sample() -> Checkpoint {
        let data: Vec<u8> = (0..2 * PAGE_SIZE)
            .map(|i| u8::try_from(i % 251).unwrap())
            .collect();
        Checkpoint {
            epoch: 9,
            full: true,
            state: vec![1, 2, 3, 4, 5, 6, 7],
            pages: StagedPages {
                addrs: vec![0x1000, 0x5000],
                data,
            },
            disks: Vec::new(),
            console: Default::default(),
        }
    }

    fn encoded(c: &Checkpoint) -> Vec<u8> {
        let mut out = Vec::new();
        let n = write(&mut out, c, Compression::Lz4, &mut Vec::new()).unwrap();
        assert_eq!(n.bytes, out.len() as u64);
        assert_eq!(n.pages.pages, c.pages.addrs.len() as u64);
        out
    }

    /// Re-seals the body CRC after an edit, so a test reaches the checks behind it.
    fn reseal(b: &mut [u8]) {
        let n = b.len() - TRAILER_LEN;
        let crc = crc32c::crc32c(&b[..n]);
        b[n..n + 4].copy_from_slice(&crc.to_le_bytes());
    }

    /// A version 2 file, as that code wrote it: raw addresses and pages.
    fn v2_bytes(c: &Checkpoint) -> Vec<u8> {
        let mut out = encode_header(&Header {
            version: 2,
            flags: 0,
            epoch: c.epoch,
            state_len: c.state.len() as u64,
            npages: c.pages.addrs.len() as u64,
            pages_len: 0,
        })
        .to_vec();
        out.extend_from_slice(&c.state);
        for a in &c.pages.addrs {
            out.extend_from_slice(&a.to_le_bytes());
        }
        out.extend_from_slice(&c.pages.data);
        out.extend_from_slice(&[0; 8]);
        out.extend_from_slice(&END_MAGIC);
        reseal(&mut out);
        out
    }

    #[test]
    fn version_2_files_still_read() {
        let c = sample();
        let b = v2_bytes(&c);
        assert_eq!(b.len(), 64 + 7 + 2 * (8 + 4096) + 16);
        let d = read(&mut b.as_slice(), b.len() as u64, 16).unwrap();
        assert_eq!(d.header.version, 2);
        assert_eq!(d.pages, c.pages);
        assert!(matches!(
            read(&mut b.as_slice(), b.len() as u64, 1),
            Err(FormatError::TooManyPages { pages: 2, max: 1 })
        ));
    }

    #[test]
    fn zero_pages_take_no_data_and_repetitive_pages_shrink() {
        let mut c = sample();
        c.pages.data[..PAGE_SIZE].fill(0);
        let b = encoded(&c);
        // Header, state, count, 2 addresses, bitmap, one length, the compressed
        // page (i % 251 compresses well), trailer.
        assert!(b.len() < 64 + 7 + 8 + 16 + 1 + 2 + 400 + 16, "{}", b.len());
        let d = read(&mut b.as_slice(), b.len() as u64, 16).unwrap();
        assert_eq!(d.pages, c.pages);
        let mut raw = Vec::new();
        let w = write(&mut raw, &c, Compression::None, &mut Vec::new()).unwrap();
        assert_eq!(w.pages.raw, 1);
        assert_eq!(w.pages.zero, 1);
        assert_eq!(w.bytes, (64 + 7 + 8 + 16 + 1 + 2 + 4096 + 16) as u64);
        let d = read(&mut raw.as_slice(), raw.len() as u64, 16).unwrap();
        assert_eq!(d.pages, c.pages);
    }

    #[test]
    fn round_trip() {
        let c = sample();
        let bytes = encoded(&c);
        let d = read(&mut bytes.as_slice(), bytes.len() as u64, 16).unwrap();
        assert_eq!(d.header.epoch, 9);
        assert_eq!(d.header.flags & FLAG_FULL, FLAG_FULL);
        assert_eq!(d.header.version, VERSION);
        assert_eq!(d.state, c.state);
        assert_eq!(d.pages, c.pages);
        let (h, state) = read_state_section(&mut bytes.as_slice(), bytes.len() as u64).unwrap();
        assert_eq!(h, d.header);
        assert_eq!(state, c.state);
    }

    #[test]
    fn header_layout_is_the_documented_one() {
        let h = encode_header(&Header {
            version: 2,
            flags: 1,
            epoch: 0x0102_0304_0506_0708,
            state_len: 0x10,
            npages: 3,
            pages_len: 0x1234,
        });
        assert_eq!(&h[0..8], b"MVCKPT\0\0");
        assert_eq!(&h[8..12], &2u32.to_le_bytes());
        assert_eq!(&h[12..16], &1u32.to_le_bytes());
        assert_eq!(&h[16..24], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(&h[24..32], &0x10u64.to_le_bytes());
        assert_eq!(&h[32..40], &3u64.to_le_bytes());
        assert_eq!(&h[40..44], &4096u32.to_le_bytes());
        // Version 2 has no pages_len: reserved, zero.
        assert!(h[44..60].iter().all(|b| *b == 0));
        assert_eq!(&h[60..64], &crc32c::crc32c(&h[..60]).to_le_bytes());
        let h = encode_header(&Header {
            version: 3,
            flags: 0,
            epoch: 1,
            state_len: 0x10,
            npages: 3,
            pages_len: 0x1234,
        });
        assert_eq!(&h[44..52], &0x1234u64.to_le_bytes());
        assert!(h[52..60].iter().all(|b| *b == 0));
    }

    #[test]
    fn version_1_golden_bytes_still_read() {
        let d = read(&mut &V1[..], V1.len() as u64, 1 << 20).unwrap();
        assert_eq!(d.header.version, 1);
        assert_eq!(d.header.epoch, 7);
        assert_eq!(d.pages.addrs, vec![0x1000, 0x5000]);
        assert!(d
            .pages
            .data
            .iter()
            .enumerate()
            .all(|(i, b)| usize::from(*b) == i % 251));
        let s = decode_state(1, &d.state).unwrap();
        let m = s.v1_manifest.expect("a v1 file carries its manifest");
        assert_eq!(m.memory, 64 << 20);
        assert_eq!(m.cpus, 1);
        assert_eq!(m.cmdline, "counter virtio_mmio.device=4K@0xd0000000:5");
        assert_eq!(m.disks.len(), 1);
        assert_eq!(m.disks[0].config.path, PathBuf::from("/tmp/disk.img"));
        assert!(m.disks[0].config.checkpoint);
        assert_eq!(m.disks[0].journal_id, Some(0x1122_3344_5566_7788));
        assert_eq!(s.state.devices, vec![1, 2, 3, 4, 5]);
        assert_eq!(s.state.vm.clock.clock, 123_456_789);
        assert!(s.state.vcpus.is_empty());
        // Re-encoding the same header gives the same bytes: the codec did not move.
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(&V1[..HEADER_LEN]);
        assert_eq!(encode_header(&decode_header(&h).unwrap()), h);
    }

    #[test]
    fn every_corruption_is_refused_before_allocating() {
        let good = encoded(&sample());
        let len = good.len() as u64;
        let check = |bytes: &[u8]| read(&mut &bytes[..], bytes.len() as u64, 16);

        let mut b = good.clone();
        b[0] ^= 1;
        assert!(matches!(check(&b), Err(FormatError::BadMagic)));

        let mut b = good.clone();
        b[8] = 9;
        assert!(matches!(check(&b), Err(FormatError::Version(9))));

        let mut b = good.clone();
        b[20] ^= 1;
        assert!(matches!(check(&b), Err(FormatError::HeaderCrc)));

        // A huge page count with a valid CRC is refused by the bound, not allocated.
        let mut b = good.clone();
        let h = encode_header(&Header {
            version: VERSION,
            flags: 0,
            epoch: 9,
            state_len: 7,
            npages: u64::MAX / 2,
            pages_len: u64::MAX - 40,
        });
        b[..HEADER_LEN].copy_from_slice(&h);
        assert!(matches!(
            read(&mut &b[..], len, u64::MAX),
            Err(FormatError::Size { .. })
        ));
        assert!(matches!(check(&b), Err(FormatError::TooManyPages { .. })));

        let h = encode_header(&Header {
            version: VERSION,
            flags: 0,
            epoch: 9,
            state_len: MAX_STATE_LEN + 1,
            npages: 0,
            pages_len: 0,
        });
        b[..HEADER_LEN].copy_from_slice(&h);
        assert!(matches!(check(&b), Err(FormatError::StateTooLarge(_))));

        // A flipped page byte or a torn tail fails the body CRC or the size check.
        let mut b = good.clone();
        let mid = b.len() / 2;
        b[mid] ^= 0x40;
        assert!(matches!(check(&b), Err(FormatError::BodyCrc)));
        assert!(matches!(
            check(&good[..good.len() - 1]),
            Err(FormatError::Size { .. })
        ));
        assert!(matches!(check(&good[..10]), Err(FormatError::Size { .. })));

        // Checksums intact, contents wrong: the header's page count disagrees with
        // the batch's, or the batch itself is malformed.
        let hdr = |npages| {
            let mut h = [0u8; HEADER_LEN];
            h.copy_from_slice(&good[..HEADER_LEN]);
            let mut d = decode_header(&h).unwrap();
            d.npages = npages;
            encode_header(&d)
        };
        let mut b = good.clone();
        b[..HEADER_LEN].copy_from_slice(&hdr(1));
        reseal(&mut b);
        assert!(matches!(
            check(&b),
            Err(FormatError::PageCount {
                header: 1,
                batch: 2
            })
        ));
        let mut b = good.clone();
        b[HEADER_LEN + 7 + 8] |= 1; // the first page address, unaligned
        reseal(&mut b);
        assert!(matches!(
            check(&b),
            Err(FormatError::Pages(CodecError::Unaligned { .. }))
        ));
        let mut b = good.clone();
        b[HEADER_LEN + 7..HEADER_LEN + 15].copy_from_slice(&3u64.to_le_bytes());
        reseal(&mut b);
        assert!(matches!(check(&b), Err(FormatError::Pages(_))));
    }

    #[test]
    fn fuzz_entry_survives_garbage() {
        let good = encoded(&sample());
        for cut in [0, 1, 63, 64, 65, good.len() / 2, good.len() - 1] {
            fuzz(&good[..cut]);
        }
        let mut x = 0x1234_5678_u32;
        for _ in 0..200 {
            let mut b = good.clone();
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let i = x as usize % b.len();
                b[i] = (x >> 8).to_le_bytes()[0];
            }
            fuzz(&b);
        }
    }
}
