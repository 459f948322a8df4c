//! The errors of the checkpoint store.

use std::io;

/// Which file of the store an I/O error concerns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileRole {
    /// The raw base image.
    Base,
    /// The region journal beside it.
    Journal,
}

impl std::fmt::Display for FileRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FileRole::Base => f.write_str("base image"),
            FileRole::Journal => f.write_str("region journal"),
        }
    }
}

/// Everything that can go wrong in the checkpoint store.
///
/// One variant per failure. A variant's message says what failed at the store's level;
/// an underlying error (I/O, the operating system's random source, a checksum
/// mismatch found by [`crate::codec`]) is attached as its `source()` and not repeated
/// in the message: print the whole chain (see [`crate::ErrorChain`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// an I/O operation on one of the store's files failed
    #[error("{op} on the {file} failed")]
    Io {
        /// Which file.
        file: FileRole,
        /// What the store was doing.
        op: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// another process holds a lock on the base image or the journal (another mirrorvm runs on them)
    #[error(transparent)]
    Locked(#[from] crate::lock::LockError),
    /// a previous write-back or sync failed; the store refuses further work (reopen it to recover)
    #[error("the store is poisoned by an earlier failed {0}; reopen it to recover")]
    Poisoned(&'static str),
    /// the file is not a mirrorvm region journal (bad magic)
    #[error("not a mirrorvm region journal: bad magic {found:02x?}")]
    BadMagic {
        /// The first bytes found.
        found: [u8; 8],
    },
    /// the journal was written by a newer format version than this build understands
    #[error("region journal format version {found} is newer than the newest this build reads ({supported}); use a newer mirrorvm")]
    UnsupportedVersion {
        /// Version in the file.
        found: u32,
        /// Newest version this build reads.
        supported: u32,
    },
    /// the journal's file header fails its checksum
    #[error("the region journal's file header is corrupt")]
    HeaderChecksum(#[source] crate::codec::CrcMismatch),
    /// a field of the journal's file header is out of its allowed range
    #[error(
        "the region journal's file header field `{field}` = {value} is out of range ({allowed})"
    )]
    HeaderField {
        /// Field name.
        field: &'static str,
        /// Value found.
        value: u64,
        /// The allowed range, in words.
        allowed: &'static str,
    },
    /// the journal file is shorter than its header says
    #[error("the region journal is truncated: {len} bytes, its header needs {expected}")]
    JournalTruncated {
        /// Actual length.
        len: u64,
        /// Length the header implies.
        expected: u64,
    },
    /// the base image's size does not match the one the journal was made for
    #[error("the base image is {actual} bytes but the journal was made for {expected}")]
    BaseSizeMismatch {
        /// Size the journal records.
        expected: u64,
        /// Size of the base image.
        actual: u64,
    },
    /// the journal's regions have another size than the one the user asked for
    #[error("its journal has regions of {} but region-size asks for {}: a journal keeps the region size it was created with. Leave region-size out to use the journal's, or let a run end cleanly (or run `mirrorvm disk recover`) so the image alone holds the disk, then remove the journal (IMAGE.mvj) to have it created anew", super::sizing::Bytes(*.found), super::sizing::Bytes(*.requested))]
    RegionSizeMismatch {
        /// Region size of the existing journal.
        found: u64,
        /// Region size asked for.
        requested: u64,
    },
    /// the base image's size is not a whole number of 512-byte sectors
    #[error("the base image is {0} bytes, not a multiple of 512")]
    BaseNotSectorSized(u64),
    /// the operating system could not supply a random journal id
    #[error("cannot draw a random id for a new region journal")]
    JournalId(#[source] getrandom::Error),
    /// a new journal cannot be created with the configured geometry (the source says
    /// which field is out of range)
    #[error("cannot create a region journal with this store configuration")]
    Config(#[source] Box<Error>),
    /// a request is not aligned to 512-byte sectors or is empty
    #[error("request at sector {sector} of {len} bytes is empty or not a multiple of 512 bytes")]
    Unaligned {
        /// First sector.
        sector: u64,
        /// Length in bytes.
        len: usize,
    },
    /// a request reaches beyond the end of the disk
    #[error(
        "request at sector {sector} of {len} bytes goes beyond the end of the {disk_len}-byte disk"
    )]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Length in bytes.
        len: usize,
        /// Disk size in bytes.
        disk_len: u64,
    },
    /// a single write is larger than a whole region can ever hold
    #[error("a write of {len} bytes can never fit a region of {capacity} bytes (record header included)")]
    WriteTooLarge {
        /// Length in bytes.
        len: usize,
        /// Region capacity in bytes.
        capacity: u64,
    },
    /// no region slot is free for a new active region (the oldest frozen one is not retired yet)
    #[error("no free region slot to start checkpoint {epoch}: {frozen} frozen region(s) await retirement")]
    NoFreeRegion {
        /// The epoch whose cut was asked for.
        epoch: u64,
        /// How many regions are frozen.
        frozen: usize,
    },
    /// timed out waiting for a region slot to become free
    #[error("timed out waiting for a free region slot to start checkpoint {epoch}")]
    WaitTimedOut {
        /// The epoch whose cut was asked for.
        epoch: u64,
    },
    /// checkpoint epochs must increase
    #[error("checkpoint epoch {epoch} is not after the last one ({last})")]
    EpochNotIncreasing {
        /// Epoch asked for.
        epoch: u64,
        /// Newest existing epoch.
        last: u64,
    },
    /// there is no frozen region for this epoch
    #[error("there is no frozen region for epoch {0}")]
    NoSuchRegion(u64),
    /// regions are retired oldest first
    #[error("region {epoch} cannot be retired before the older region {oldest}")]
    RetireOutOfOrder {
        /// Epoch asked for.
        epoch: u64,
        /// Oldest frozen epoch.
        oldest: u64,
    },
    /// a region is retired only once the peer has acknowledged it
    #[error("region {0} cannot be retired: it is not acknowledged")]
    NotAcknowledged(u64),
    /// a retire of this region is already running
    #[error("region {0} is already being retired")]
    RetireInProgress(u64),
    /// recovery was asked for an epoch older than what the base image already holds
    #[error("cannot recover to epoch {requested}: the base image already holds epoch {base}")]
    EpochRetired {
        /// Epoch asked for.
        requested: u64,
        /// Epoch of the base image.
        base: u64,
    },
    /// recovery was asked for an epoch older than an acknowledged region whose retire may have begun
    #[error("cannot recover to epoch {requested}: region {acknowledged} is acknowledged, so its retire may already have written the base image")]
    RetireMayHaveBegun {
        /// Epoch asked for.
        requested: u64,
        /// The acknowledged region next in line for retirement.
        acknowledged: u64,
    },
    /// recovery was asked for an epoch whose sealed region is not in the journal
    #[error("cannot recover to epoch {requested}: the sealed region of epoch {missing} is missing from the journal (base image at epoch {base})")]
    RegionMissing {
        /// Epoch asked for.
        requested: u64,
        /// The epoch whose region is missing.
        missing: u64,
        /// Epoch of the base image.
        base: u64,
    },
    /// a record of a sealed region is torn or corrupt
    #[error(
        "slot {slot} (epoch {epoch}): record {seq} at journal offset {offset} is bad: {reason}"
    )]
    BadRecord {
        /// Region slot.
        slot: u32,
        /// Epoch of the region.
        epoch: u64,
        /// Record number in the region.
        seq: u32,
        /// Byte offset of the record in the journal.
        offset: u64,
        /// What is wrong with it.
        reason: RecordProblem,
    },
    /// a sealed region's parent epoch is older than the base image's epoch
    #[error("the sealed region of epoch {epoch} follows epoch {parent}, older than the base image's epoch {base}: the journal's history is inconsistent")]
    BrokenChain {
        /// Epoch of the region.
        epoch: u64,
        /// Its parent epoch.
        parent: u64,
        /// Epoch of the base image.
        base: u64,
    },
    /// the journal has no valid file header: it was never created, or its creation was torn
    #[error("no region journal at {0}")]
    NoJournal(String),
    /// An imported region cannot go into a store whose active region holds writes.
    #[error("cannot import region {epoch}: the active region already holds {records} records of this disk's own (a standby's disk takes writes only from its primary)")]
    ImportIntoBusyRegion {
        /// The region's epoch.
        epoch: u64,
        /// Records already in the active region.
        records: u32,
    },
    /// An imported region does not fit one region of this store.
    #[error("cannot import region {epoch}: its data does not fit one region of this journal ({capacity} bytes)")]
    ImportTooLarge {
        /// The region's epoch.
        epoch: u64,
        /// Region capacity.
        capacity: u64,
    },
    /// two sealed regions claim the same epoch
    #[error("slots {a} and {b} both hold a sealed region for epoch {epoch}")]
    DuplicateEpoch {
        /// Epoch.
        epoch: u64,
        /// First slot.
        a: u32,
        /// Second slot.
        b: u32,
    },
}

/// What is wrong with a write record: the detail of [`Error::BadRecord`], shown in
/// its message (it is the store's own finding, not an underlying error). In an active
/// region the same finding marks where the region's valid records end.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordProblem {
    /// the region's recorded length ends before this record
    #[error("the region ends at {limit} bytes, before this record")]
    RegionEnds {
        /// Bytes of records the region holds.
        limit: u64,
    },
    /// no record magic where a record should start
    #[error("no record magic (torn, stale or never written)")]
    NoMagic,
    /// the record was written by an earlier region in the same slot
    #[error("generation {found} belongs to an older use of the slot, not {expected}")]
    StaleGeneration {
        /// Generation in the record.
        found: u64,
        /// Generation of the region.
        expected: u64,
    },
    /// the record's number is not the next one
    #[error("record number {found} where {expected} was due")]
    OutOfSequence {
        /// Number in the record.
        found: u32,
        /// The number due.
        expected: u32,
    },
    /// the data length is zero or not whole sectors
    #[error("length {len} is not a positive multiple of 512")]
    BadLength {
        /// Data length in the record.
        len: u64,
    },
    /// the data runs past the end of the region
    #[error("length {len} runs past the region's end at {limit}")]
    PastRegionEnd {
        /// Data length in the record.
        len: u64,
        /// Bytes of records the region may hold.
        limit: u64,
    },
    /// the record names sectors beyond the end of the disk
    #[error("sectors {sector}..+{sectors} lie beyond the disk's {disk_sectors}")]
    BeyondDisk {
        /// First sector.
        sector: u64,
        /// Sectors written.
        sectors: u64,
        /// Sectors of the disk.
        disk_sectors: u64,
    },
    /// the record's CRC32C does not match its header and data
    #[error("CRC32C {stored:#010x} stored, {computed:#010x} computed (torn or corrupt)")]
    Checksum {
        /// CRC in the record.
        stored: u32,
        /// CRC of the header and data read.
        computed: u32,
    },
    /// a sealed region's records do not fill exactly the bytes its header records
    #[error("the records end at {end} bytes but the header says {used_bytes}")]
    LengthMismatch {
        /// Where the valid records end.
        end: u64,
        /// Bytes the slot header records.
        used_bytes: u64,
    },
}

/// Shorthand for results of the store.
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) trait IoContext<T> {
    fn ctx(self, file: FileRole, op: &'static str) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, file: FileRole, op: &'static str) -> Result<T> {
        self.map_err(|source| Error::Io { file, op, source })
    }
}
