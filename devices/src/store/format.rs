//! The on-disk format of the region journal: constants, byte layouts, encoding and
//! decoding. `docs/store-format.md` is the specification; this module implements it.
//!
//! All integers are little-endian. Each header has a raw, byte-exact struct encoded with
//! [`crate::codec`] (zerocopy) and a typed view that is validated when decoded. Nothing
//! here trusts a length read from disk: every field is bounded before it is used for an
//! offset or an allocation.

use super::error::{Error, Result};
use crate::codec::{Crc32cHeader, FromBytes, Immutable, IntoBytes, KnownLayout, U32, U64};

/// The sector size; the file header's `sector_size` field must hold it.
pub use crate::SECTOR_SIZE;
/// The newest format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Magic at offset 0 of the journal.
pub const FILE_MAGIC: [u8; 8] = *b"MVMJRNL\0";
/// Bytes reserved for the file header at the start of the journal.
pub const FILE_HEADER_AREA: u64 = 4096;
/// Bytes of the file header that are defined (and covered by its CRC).
pub const FILE_HEADER_LEN: usize = 64;
/// Bytes reserved at the start of each slot for its two header copies.
pub const SLOT_HEADER_AREA: u64 = 4096;
/// Distance between the two header copies of a slot.
pub const SLOT_COPY_STRIDE: u64 = 512;
/// Bytes of a slot header copy that are defined (and covered by its CRC).
pub const SLOT_HEADER_LEN: usize = 72;
/// Magic of a slot header copy.
pub const SLOT_MAGIC: [u8; 4] = *b"MVJS";
/// Bytes of a write record's header (its data follows immediately).
pub const RECORD_HEADER_LEN: u64 = 32;
/// Magic of a write record.
pub const RECORD_MAGIC: [u8; 4] = *b"MVJW";
/// Fewest region slots a journal may have.
pub const MIN_SLOTS: u32 = 2;
/// Most region slots a journal may have.
pub const MAX_SLOTS: u32 = 64;
/// Smallest region capacity (bytes of records per slot).
pub const MIN_CAPACITY: u64 = 4096;
/// Largest region capacity.
pub const MAX_CAPACITY: u64 = 1 << 36;
/// Largest base image the format describes.
pub const MAX_BASE_LEN: u64 = 1 << 56;

/// The bytes a write of `len` data bytes takes in a region.
pub const fn record_footprint(len: u64) -> u64 {
    RECORD_HEADER_LEN + len
}

/// The journal's file header: written once when the journal is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileHeader {
    /// Format version.
    pub version: u32,
    /// Number of region slots.
    pub slot_count: u32,
    /// Bytes of records each slot holds.
    pub region_capacity: u64,
    /// Size of the base image the journal belongs to.
    pub base_len: u64,
    /// Epoch the base image held when the journal was created.
    pub created_epoch: u64,
    /// A random number drawn when the journal is created: a checkpoint records the
    /// id of each disk's journal, and restore refuses a journal with another id.
    pub journal_id: u64,
}

/// The file header's bytes on disk (docs/store-format.md, "File header").
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct RawFileHeader {
    magic: [u8; 8],
    version: U32,
    header_len: U32,
    sector_size: U32,
    slot_count: U32,
    region_capacity: U64,
    base_len: U64,
    created_epoch: U64,
    journal_id: U64,
    reserved: [u8; 4],
    crc: U32,
}
const _: () = assert!(size_of::<RawFileHeader>() == FILE_HEADER_LEN);
impl Crc32cHeader for RawFileHeader {}

impl FileHeader {
    /// Encodes the header into its `FILE_HEADER_LEN` bytes.
    pub fn encode(&self) -> [u8; FILE_HEADER_LEN] {
        // FILE_HEADER_LEN and SECTOR_SIZE are small constants: they fit a u32.
        #[allow(clippy::cast_possible_truncation)]
        let mut raw = RawFileHeader {
            magic: FILE_MAGIC,
            version: self.version.into(),
            header_len: U32::new(FILE_HEADER_LEN as u32),
            sector_size: U32::new(SECTOR_SIZE as u32),
            slot_count: self.slot_count.into(),
            region_capacity: self.region_capacity.into(),
            base_len: self.base_len.into(),
            created_epoch: self.created_epoch.into(),
            journal_id: self.journal_id.into(),
            reserved: [0; 4],
            crc: U32::ZERO,
        };
        raw.seal();
        zerocopy::transmute!(raw)
    }

    /// Decodes and validates a file header. The version is checked before the
    /// checksum, so that a newer journal is refused as such rather than as corrupt.
    pub fn decode(b: &[u8]) -> Result<FileHeader> {
        let Ok((raw, _)) = RawFileHeader::read_from_prefix(b) else {
            return Err(Error::JournalTruncated {
                len: b.len() as u64,
                expected: FILE_HEADER_LEN as u64,
            });
        };
        if raw.magic != FILE_MAGIC {
            return Err(Error::BadMagic { found: raw.magic });
        }
        let version = raw.version.get();
        if version > FORMAT_VERSION {
            return Err(Error::UnsupportedVersion {
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        raw.check_crc().map_err(Error::HeaderChecksum)?;
        if version == 0 {
            return Err(field("version", 0, "1"));
        }
        let header_len = raw.header_len.get();
        if header_len as usize != FILE_HEADER_LEN {
            return Err(field("header_len", header_len.into(), "64"));
        }
        let sector = raw.sector_size.get();
        if u64::from(sector) != SECTOR_SIZE {
            return Err(field("sector_size", sector.into(), "512"));
        }
        let h = FileHeader {
            version,
            slot_count: raw.slot_count.get(),
            region_capacity: raw.region_capacity.get(),
            base_len: raw.base_len.get(),
            created_epoch: raw.created_epoch.get(),
            journal_id: raw.journal_id.get(),
        };
        h.validate()?;
        Ok(h)
    }

    /// Checks every field against its bounds.
    pub fn validate(&self) -> Result<()> {
        if !(MIN_SLOTS..=MAX_SLOTS).contains(&self.slot_count) {
            return Err(field("slot_count", self.slot_count.into(), "2..=64"));
        }
        if !(MIN_CAPACITY..=MAX_CAPACITY).contains(&self.region_capacity)
            || self.region_capacity % 4096 != 0
        {
            return Err(field(
                "region_capacity",
                self.region_capacity,
                "a multiple of 4096 in 4 KiB..=64 GiB",
            ));
        }
        if self.base_len % SECTOR_SIZE != 0 || self.base_len > MAX_BASE_LEN {
            return Err(field(
                "base_len",
                self.base_len,
                "a multiple of 512 up to 2^56",
            ));
        }
        Ok(())
    }

    /// The geometry this header describes.
    pub fn geometry(&self) -> Geometry {
        Geometry {
            slot_count: self.slot_count,
            capacity: self.region_capacity,
        }
    }
}

fn field(field: &'static str, value: u64, allowed: &'static str) -> Error {
    Error::HeaderField {
        field,
        value,
        allowed,
    }
}

/// Where things are in the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Number of region slots.
    pub slot_count: u32,
    /// Bytes of records per slot.
    pub capacity: u64,
}

impl Geometry {
    /// Byte offset of slot `slot`'s header area.
    pub fn slot_offset(&self, slot: u32) -> u64 {
        FILE_HEADER_AREA + u64::from(slot) * (SLOT_HEADER_AREA + self.capacity)
    }
    /// Byte offset of header copy `copy` (0 or 1) of slot `slot`.
    pub fn copy_offset(&self, slot: u32, copy: u8) -> u64 {
        self.slot_offset(slot) + u64::from(copy) * SLOT_COPY_STRIDE
    }
    /// Byte offset of the first record of slot `slot`.
    pub fn records_offset(&self, slot: u32) -> u64 {
        self.slot_offset(slot) + SLOT_HEADER_AREA
    }
    /// Total journal length.
    pub fn journal_len(&self) -> u64 {
        self.slot_offset(self.slot_count)
    }
}

/// The state of a region slot, as its header records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SlotState {
    /// Never used (also: no valid header copy).
    Empty,
    /// Receiving the writes of the current epoch; never recovered.
    Active,
    /// Frozen at a cut; its records are durable and complete.
    Sealed,
    /// Sealed, and the peer holds it.
    Acknowledged,
    /// Committed into the base image; the slot is free.
    Retired,
    /// Discarded (rolled back, or later than a recovery's epoch); the slot is free.
    Dropped,
}

impl SlotState {
    /// The state's byte on disk.
    pub fn to_byte(self) -> u8 {
        match self {
            SlotState::Empty => 0,
            SlotState::Active => 1,
            SlotState::Sealed => 2,
            SlotState::Acknowledged => 3,
            SlotState::Retired => 4,
            SlotState::Dropped => 5,
        }
    }
    /// The state of a byte on disk, if it is one.
    pub fn from_byte(b: u8) -> Option<SlotState> {
        Some(match b {
            0 => SlotState::Empty,
            1 => SlotState::Active,
            2 => SlotState::Sealed,
            3 => SlotState::Acknowledged,
            4 => SlotState::Retired,
            5 => SlotState::Dropped,
            _ => return None,
        })
    }
    /// Whether the slot holds a sealed region (sealed or acknowledged).
    pub fn is_sealed(self) -> bool {
        matches!(self, SlotState::Sealed | SlotState::Acknowledged)
    }
    /// Whether the slot may be given to a new active region.
    pub fn is_free(self) -> bool {
        matches!(
            self,
            SlotState::Empty | SlotState::Retired | SlotState::Dropped
        )
    }
}

impl std::fmt::Display for SlotState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SlotState::Empty => "empty",
            SlotState::Active => "active",
            SlotState::Sealed => "sealed",
            SlotState::Acknowledged => "acknowledged",
            SlotState::Retired => "retired",
            SlotState::Dropped => "dropped",
        })
    }
}

/// One copy of a slot's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotHeader {
    /// Slot index (must match the slot it is found in).
    pub slot: u32,
    /// Write counter of this slot's header; the valid copy with the higher one wins.
    pub seq: u64,
    /// State.
    pub state: SlotState,
    /// Records in the region (sealed and later states).
    pub record_count: u32,
    /// Generation of the region occupying the slot; unique over the journal's life.
    pub generation: u64,
    /// Epoch of the region (sealed and later; 0 while active).
    pub epoch: u64,
    /// Epoch of the checkpoint this region follows (the previous region or the base).
    pub parent_epoch: u64,
    /// Bytes of records in the region (sealed and later states).
    pub used_bytes: u64,
    /// The epoch the base image durably held when this copy was written.
    pub base_epoch: u64,
}

/// Why a slot header copy was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyProblem {
    /// All zero: never written.
    Blank,
    /// Written, but not a valid copy (torn, corrupt or inconsistent).
    Invalid(InvalidCopy),
}

/// What is wrong with a slot header copy that is not blank. Recovery falls back to the
/// other copy; `inspect` shows it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidCopy {
    /// no slot header magic
    #[error("bad magic")]
    BadMagic,
    /// the copy fails its CRC32C
    #[error("{0}")]
    Checksum(crate::codec::CrcMismatch),
    /// the state byte is not a known state
    #[error("unknown state {0}")]
    UnknownState(u8),
    /// the copy names another slot than the one it sits in
    #[error("copy names slot {named} but sits in slot {slot}")]
    WrongSlot {
        /// Slot in the copy.
        named: u32,
        /// Slot it was read from.
        slot: u32,
    },
    /// more bytes used than a region holds
    #[error("used_bytes {used} exceeds the capacity {capacity}")]
    UsedBeyondCapacity {
        /// Bytes used, per the copy.
        used: u64,
        /// Region capacity.
        capacity: u64,
    },
    /// more records than the used bytes can hold
    #[error("{records} records cannot fit {used} bytes")]
    TooManyRecords {
        /// Records, per the copy.
        records: u32,
        /// Bytes used, per the copy.
        used: u64,
    },
    /// a sealed region whose parent is not an earlier epoch
    #[error("parent epoch {parent} is not before epoch {epoch}")]
    ParentNotBefore {
        /// Parent epoch.
        parent: u64,
        /// Epoch of the region.
        epoch: u64,
    },
}

/// A slot header copy's bytes on disk (docs/store-format.md, "Slot header").
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct RawSlotHeader {
    magic: [u8; 4],
    slot: U32,
    seq: U64,
    state: u8,
    reserved0: [u8; 3],
    record_count: U32,
    generation: U64,
    epoch: U64,
    parent_epoch: U64,
    used_bytes: U64,
    base_epoch: U64,
    reserved1: [u8; 4],
    crc: U32,
}
const _: () = assert!(size_of::<RawSlotHeader>() == SLOT_HEADER_LEN);
impl Crc32cHeader for RawSlotHeader {}

impl SlotHeader {
    /// Encodes the copy.
    pub fn encode(&self) -> [u8; SLOT_HEADER_LEN] {
        let mut raw = RawSlotHeader {
            magic: SLOT_MAGIC,
            slot: self.slot.into(),
            seq: self.seq.into(),
            state: self.state.to_byte(),
            reserved0: [0; 3],
            record_count: self.record_count.into(),
            generation: self.generation.into(),
            epoch: self.epoch.into(),
            parent_epoch: self.parent_epoch.into(),
            used_bytes: self.used_bytes.into(),
            base_epoch: self.base_epoch.into(),
            reserved1: [0; 4],
            crc: U32::ZERO,
        };
        raw.seal();
        zerocopy::transmute!(raw)
    }

    /// Decodes and validates a copy found in slot `slot` of a journal of geometry `geo`.
    pub fn decode(
        b: &[u8; SLOT_HEADER_LEN],
        slot: u32,
        geo: &Geometry,
    ) -> std::result::Result<SlotHeader, CopyProblem> {
        if b.iter().all(|&x| x == 0) {
            return Err(CopyProblem::Blank);
        }
        let raw: RawSlotHeader = zerocopy::transmute!(*b);
        let bad = |p: InvalidCopy| Err(CopyProblem::Invalid(p));
        if raw.magic != SLOT_MAGIC {
            return bad(InvalidCopy::BadMagic);
        }
        if let Err(e) = raw.check_crc() {
            return bad(InvalidCopy::Checksum(e));
        }
        let Some(state) = SlotState::from_byte(raw.state) else {
            return bad(InvalidCopy::UnknownState(raw.state));
        };
        let h = SlotHeader {
            slot: raw.slot.get(),
            seq: raw.seq.get(),
            state,
            record_count: raw.record_count.get(),
            generation: raw.generation.get(),
            epoch: raw.epoch.get(),
            parent_epoch: raw.parent_epoch.get(),
            used_bytes: raw.used_bytes.get(),
            base_epoch: raw.base_epoch.get(),
        };
        if h.slot != slot {
            return bad(InvalidCopy::WrongSlot {
                named: h.slot,
                slot,
            });
        }
        if h.used_bytes > geo.capacity {
            return bad(InvalidCopy::UsedBeyondCapacity {
                used: h.used_bytes,
                capacity: geo.capacity,
            });
        }
        if u64::from(h.record_count) * RECORD_HEADER_LEN > h.used_bytes {
            return bad(InvalidCopy::TooManyRecords {
                records: h.record_count,
                used: h.used_bytes,
            });
        }
        if state.is_sealed() && h.parent_epoch >= h.epoch {
            return bad(InvalidCopy::ParentNotBefore {
                parent: h.parent_epoch,
                epoch: h.epoch,
            });
        }
        Ok(h)
    }
}

/// A write record's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    /// Record number within its region, from 0.
    pub seq: u32,
    /// Generation of the region that wrote it.
    pub generation: u64,
    /// First sector written.
    pub sector: u64,
    /// Data bytes (a multiple of 512).
    pub len: u32,
    /// CRC32C over the header's first 28 bytes, then the data.
    pub crc: u32,
}

/// A write record header's bytes on disk (docs/store-format.md, "Write record").
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct RawRecordHeader {
    magic: [u8; 4],
    seq: U32,
    generation: U64,
    sector: U64,
    len: U32,
    crc: U32,
}
const _: () = assert!(size_of::<RawRecordHeader>() == crate::to_usize(RECORD_HEADER_LEN));
impl Crc32cHeader for RawRecordHeader {}

impl RecordHeader {
    /// Encodes the header; `crc` must already be [`RecordHeader::checksum`] of the data.
    pub fn encode(&self) -> [u8; crate::to_usize(RECORD_HEADER_LEN)] {
        zerocopy::transmute!(self.raw())
    }

    fn raw(&self) -> RawRecordHeader {
        RawRecordHeader {
            magic: RECORD_MAGIC,
            seq: self.seq.into(),
            generation: self.generation.into(),
            sector: self.sector.into(),
            len: self.len.into(),
            crc: self.crc.into(),
        }
    }

    /// The CRC32C of this header (without its CRC field) followed by `data`.
    pub fn checksum(&self, data: &[u8]) -> u32 {
        let crc = self.checksum_start();
        crc32c::crc32c_append(crc, data)
    }

    /// The CRC32C over the header's first 28 bytes; extend it over the data with
    /// `crc32c::crc32c_append`.
    pub fn checksum_start(&self) -> u32 {
        self.raw().covered_crc()
    }

    /// Decodes a header; `None` if the magic is wrong.
    pub fn decode(b: &[u8; crate::to_usize(RECORD_HEADER_LEN)]) -> Option<RecordHeader> {
        let raw: RawRecordHeader = zerocopy::transmute!(*b);
        if raw.magic != RECORD_MAGIC {
            return None;
        }
        Some(RecordHeader {
            seq: raw.seq.get(),
            generation: raw.generation.get(),
            sector: raw.sector.get(),
            len: raw.len.get(),
            crc: raw.crc.get(),
        })
    }
}

/// The `base_len` field of the file header at the start of `b`, whatever the rest of
/// the header holds (the fuzz target sizes its base image from it). `None` if `b` is
/// shorter than a file header.
pub(crate) fn raw_base_len(b: &[u8]) -> Option<u64> {
    RawFileHeader::ref_from_prefix(b)
        .ok()
        .map(|(raw, _)| raw.base_len.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_header_round_trips_and_rejects_newer_version() {
        let h = FileHeader {
            version: FORMAT_VERSION,
            slot_count: 2,
            region_capacity: 1 << 20,
            base_len: 1 << 30,
            created_epoch: 7,
            journal_id: 99,
        };
        let b = h.encode();
        assert_eq!(FileHeader::decode(&b).unwrap(), h);
        let mut newer = h;
        newer.version = FORMAT_VERSION + 1;
        let err = FileHeader::decode(&newer.encode()).unwrap_err();
        assert!(matches!(
            err,
            Error::UnsupportedVersion {
                found: 2,
                supported: 1
            }
        ));
        assert!(err.to_string().contains("newer"));
    }

    #[test]
    fn file_header_bounds_are_checked() {
        let mut h = FileHeader {
            version: FORMAT_VERSION,
            slot_count: 1000,
            region_capacity: 1 << 20,
            base_len: 1 << 30,
            created_epoch: 0,
            journal_id: 0,
        };
        assert!(matches!(
            FileHeader::decode(&h.encode()),
            Err(Error::HeaderField {
                field: "slot_count",
                ..
            })
        ));
        h.slot_count = 2;
        h.region_capacity = u64::MAX;
        assert!(matches!(
            FileHeader::decode(&h.encode()),
            Err(Error::HeaderField {
                field: "region_capacity",
                ..
            })
        ));
    }

    #[test]
    fn slot_header_round_trips_and_detects_damage() {
        let geo = Geometry {
            slot_count: 2,
            capacity: 1 << 20,
        };
        let h = SlotHeader {
            slot: 1,
            seq: 5,
            state: SlotState::Sealed,
            record_count: 3,
            generation: 9,
            epoch: 4,
            parent_epoch: 3,
            used_bytes: 3 * 4128,
            base_epoch: 2,
        };
        let b = h.encode();
        assert_eq!(SlotHeader::decode(&b, 1, &geo), Ok(h));
        assert!(SlotHeader::decode(&b, 0, &geo).is_err());
        for i in 0..SLOT_HEADER_LEN {
            let mut c = b;
            c[i] ^= 0x10;
            assert!(SlotHeader::decode(&c, 1, &geo).is_err(), "flip at {i}");
        }
        assert_eq!(
            SlotHeader::decode(&[0; SLOT_HEADER_LEN], 1, &geo),
            Err(CopyProblem::Blank)
        );
    }
}
