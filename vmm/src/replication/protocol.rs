//! The wire protocol between a primary and its standby: frames, their encoder and
//! decoder, and the standby's staging of one checkpoint. Specified in
//! `docs/protocol.md`.
//!
//! A frame is a fixed 40-byte header ([`HEADER_LEN`]: magic, version, type, flags,
//! payload length, epoch, fence generation, payload CRC32C, header CRC32C) followed by
//! its payload. [`FrameWriter`] writes frames to any [`Write`], [`FrameReader`] reads
//! them from any [`Read`]: the transport (a TCP or TLS stream, later) stays behind
//! that one seam. The reader checks magic, version, header CRC, type, flags and the
//! payload length against a bound before it allocates, then the payload CRC and the
//! payload's own layout; a hostile peer gets an error, never a panic or an allocation
//! beyond the bound.
//!
//! [`CheckpointAssembler`] is the standby's side of a checkpoint: it stages the
//! frames of epoch N and yields a whole [`Checkpoint`] only when an EndOfCheckpoint
//! whose totals match arrives. Anything out of place discards the half-received
//! checkpoint with an [`AssembleError`].

use std::io::{ErrorKind, Read, Write};

use devices::codec::{
    Crc32cHeader, CrcMismatch, FromBytes, Immutable, IntoBytes, KnownLayout, U16, U32, U64,
};
use devices::store::{Export, ExportExtent, RegionMeta};
use devices::SECTOR_SIZE;
use serde::{Deserialize, Serialize};

use crate::checkpoint::pagecodec::{self, Compression};
use crate::checkpoint::{Checkpoint, DiskRegion, Manifest, RegionContent, StorageMode};
use crate::dirty::{StagedPages, PAGE_SIZE};

/// Magic at the start of every frame.
pub const MAGIC: [u8; 4] = *b"MVRP";
/// The newest protocol version this code speaks, the one it offers first.
pub const VERSION: u16 = 4;
/// The oldest protocol version this code still speaks: a host accepts a peer one
/// version older, so that a pair is upgraded one host at a time by switching over
/// (docs/protocol.md, "Versions").
pub const OLDEST_VERSION: u16 = 3;
/// The first version whose Pages and Base frames may be packed ([`FLAG_PACKED`]).
pub const PACKED_SINCE: u16 = 4;
/// Header flag of a Pages or Base frame (version 4 on): the payload is a packed page
/// batch (zero pages as a bitmap, others as lz4 blocks: `checkpoint::pagecodec`),
/// not raw pages.
pub const FLAG_PACKED: u32 = 1;
/// What a host offers on the wire: the newest protocol version it speaks and how it
/// packs pages (from version 4 on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireConfig {
    /// The newest version to speak, [`OLDEST_VERSION`] to [`VERSION`]: peers agree on
    /// the newest both speak by themselves; a lower one keeps a pair on the older
    /// version (`--protocol-version`).
    pub max_version: u16,
    /// How the pages that are not zero travel in a version 4 session
    /// (`--wire-compression`); zero pages always travel as bits.
    pub compression: Compression,
}

impl Default for WireConfig {
    fn default() -> Self {
        WireConfig {
            max_version: VERSION,
            compression: Compression::Lz4,
        }
    }
}

/// Size of a frame header.
pub const HEADER_LEN: usize = 40;
/// Default bound on any payload: a reader refuses longer frames before allocating.
pub const MAX_PAYLOAD: u32 = 16 << 20;
/// Bound on the postcard-encoded control payloads (Hello, HelloAck, Shutdown).
pub const MAX_CONTROL_PAYLOAD: u32 = 64 << 10;
/// Most pages in one Pages or Base frame.
pub const MAX_BATCH_PAGES: u32 = 1024;
/// Most console bytes in one Console frame.
pub const MAX_CONSOLE_CHUNK: u32 = 1 << 20;
/// Most disk bytes in one DiskBase frame (a whole number of sectors).
pub const MAX_DISK_BASE_CHUNK: u32 = 4 << 20;

/// [`PAGE_SIZE`] as a u64.
const PAGE: u64 = PAGE_SIZE as u64;
/// Bytes one page takes in a batch: its address and its data.
const PAGE_ENTRY: u64 = 8 + PAGE;
/// Size of the fixed part of a Pages or Base payload.
const PAGES_HEAD_LEN: usize = 8;
/// The largest packed batch of [`MAX_BATCH_PAGES`] pages: count, addresses, zero
/// bitmap, lengths, and every page stored raw.
const PACKED_MAX: usize = 8
    + MAX_BATCH_PAGES as usize * 8
    + (MAX_BATCH_PAGES as usize).div_ceil(8)
    + MAX_BATCH_PAGES as usize * 2
    + MAX_BATCH_PAGES as usize * PAGE_SIZE;
/// Size of the fixed part of a Region payload.
const REGION_HEAD_LEN: usize = 64;
/// Size of an extent's header in a Region payload.
const EXTENT_HEAD_LEN: usize = 16;
/// Size of the fixed part of a Console payload.
const CONSOLE_HEAD_LEN: usize = 8;
/// Size of the fixed part of a DiskBase payload.
const DISK_BASE_HEAD_LEN: usize = 16;
/// Size of an EndOfCheckpoint payload.
const END_LEN: usize = 32;
/// EndOfCheckpoint flag: the checkpoint completes a base image.
pub const END_FLAG_FULL: u32 = 1;

/// Converts a small constant length to the header's u32 (all are far below 4 GiB).
const fn len_u32(n: usize) -> u32 {
    assert!(n <= u32::MAX as usize);
    #[allow(clippy::cast_possible_truncation)] // asserted just above
    let v = n as u32;
    v
}

/// The frame header as laid out on the wire.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct RawHeader {
    magic: [u8; 4],
    version: U16,
    frame_type: U16,
    flags: U32,
    payload_len: U32,
    epoch: U64,
    generation: U64,
    payload_crc: U32,
    crc: U32,
}
const _: () = assert!(size_of::<RawHeader>() == HEADER_LEN);
impl Crc32cHeader for RawHeader {}

/// Fixed part of a Pages or Base payload; `count` addresses, then `count` pages follow.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct RawPagesHead {
    count: U32,
    reserved: [u8; 4],
}
const _: () = assert!(size_of::<RawPagesHead>() == PAGES_HEAD_LEN);

/// Fixed part of a Region payload; `extents` extents follow.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct RawRegionHead {
    disk: U32,
    content: U32,
    epoch: U64,
    parent_epoch: U64,
    slot_generation: U64,
    used_bytes: U64,
    sectors: U64,
    slot: U32,
    records: U32,
    extents: U32,
    reserved: [u8; 4],
}
const _: () = assert!(size_of::<RawRegionHead>() == REGION_HEAD_LEN);

/// One extent's header in a Region payload; `len` bytes of data follow.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct RawExtentHead {
    sector: U64,
    len: U32,
    reserved: [u8; 4],
}
const _: () = assert!(size_of::<RawExtentHead>() == EXTENT_HEAD_LEN);

/// An EndOfCheckpoint payload.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct RawEnd {
    pages: U64,
    state_len: U64,
    console_bytes: U64,
    regions: U32,
    flags: U32,
}
const _: () = assert!(size_of::<RawEnd>() == END_LEN);

/// Region payload `content`: the region's data travels (replicated storage).
const CONTENT_DATA: u32 = 0;
/// Region payload `content`: only its metadata travels (shared storage).
const CONTENT_META: u32 = 1;

/// The type of a frame, as its header names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum FrameType {
    /// Primary → standby: the one-time facts of a session ([`Hello`]).
    Hello = 1,
    /// Standby → primary: the answer to a Hello ([`HelloAck`]).
    HelloAck = 2,
    /// Primary → standby: pages of the initial copy of memory.
    Base = 3,
    /// Primary → standby: pages dirtied in the frame's epoch.
    Pages = 4,
    /// Primary → standby: the encoded machine state at the cut.
    State = 5,
    /// Primary → standby: (part of) one disk's region frozen at the cut.
    Region = 6,
    /// Primary → standby: console bytes of the epoch, with their stream offset.
    Console = 7,
    /// Primary → standby: the checkpoint is complete; its totals.
    EndOfCheckpoint = 8,
    /// Standby → primary: the frame's epoch is applied.
    Ack = 9,
    /// Either way: still alive.
    Heartbeat = 10,
    /// Primary → standby: the run ended in order; no failover.
    Shutdown = 11,
    /// Primary → standby: part of one disk's base image, during the initial copy.
    DiskBase = 12,
    /// Standby → primary: the first frame of a connection a standby opened to its
    /// primary (`standby --join`): which connection of the session it is ([`Join`]).
    Join = 13,
    /// Standby → primary, right after `HelloAck::Accept`: what the standby already
    /// holds (its replica's name, a strong hash of every chunk of every disk), so the
    /// initial copy sends only what differs ([`Holdings`]).
    Holdings = 14,
    /// Primary → standby, first frame of an initial copy: whether the copy builds on
    /// the replica the standby holds or starts from zeros ([`CopyPlan`]).
    CopyPlan = 15,
}

impl FrameType {
    /// Every frame type, in code order.
    pub const ALL: [FrameType; 15] = [
        FrameType::Hello,
        FrameType::HelloAck,
        FrameType::Base,
        FrameType::Pages,
        FrameType::State,
        FrameType::Region,
        FrameType::Console,
        FrameType::EndOfCheckpoint,
        FrameType::Ack,
        FrameType::Heartbeat,
        FrameType::Shutdown,
        FrameType::DiskBase,
        FrameType::Join,
        FrameType::Holdings,
        FrameType::CopyPlan,
    ];

    /// The type with wire code `code`, if any.
    pub fn from_code(code: u16) -> Option<FrameType> {
        FrameType::ALL.into_iter().find(|t| t.code() == code)
    }

    /// Its wire code.
    pub fn code(self) -> u16 {
        self as u16
    }

    /// The largest payload a frame of this type may have (before the reader's own
    /// overall bound).
    pub fn max_payload(self) -> u32 {
        match self {
            FrameType::Hello
            | FrameType::HelloAck
            | FrameType::Shutdown
            | FrameType::Join
            | FrameType::CopyPlan => MAX_CONTROL_PAYLOAD,
            FrameType::Holdings => MAX_PAYLOAD,
            // A packed batch may be a little longer than a raw one (its bitmap and
            // lengths) when no page compresses.
            FrameType::Base | FrameType::Pages => len_u32(PACKED_MAX),
            FrameType::State | FrameType::Region => MAX_PAYLOAD,
            FrameType::Console => len_u32(CONSOLE_HEAD_LEN) + MAX_CONSOLE_CHUNK,
            FrameType::DiskBase => len_u32(DISK_BASE_HEAD_LEN) + MAX_DISK_BASE_CHUNK,
            FrameType::EndOfCheckpoint => len_u32(END_LEN),
            FrameType::Ack | FrameType::Heartbeat => 0,
        }
    }
}

impl std::fmt::Display for FrameType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// How disk regions travel in a session (the wire form of [`StorageMode`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireStorage {
    /// Region metadata only: both hosts reach the same journals.
    Shared,
    /// Region data: the standby keeps its own copy of every disk.
    Replicated,
}

impl From<StorageMode> for WireStorage {
    fn from(m: StorageMode) -> Self {
        match m {
            StorageMode::Shared => WireStorage::Shared,
            StorageMode::Replicated => WireStorage::Replicated,
        }
    }
}

impl From<WireStorage> for StorageMode {
    fn from(m: WireStorage) -> Self {
        match m {
            WireStorage::Shared => StorageMode::Shared,
            WireStorage::Replicated => StorageMode::Replicated,
        }
    }
}

/// The one-time facts a primary sends first: what machine the standby must be able
/// to hold (memory size, vCPUs, disks with their sizes and journal ids, command line:
/// the [`Manifest`]) and how disks travel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The protocol version the primary speaks (also in every header).
    pub protocol_version: u16,
    /// The machine, with the CPU its guest sees (`manifest.cpu`), which a standby
    /// checks against its own host before it accepts.
    pub manifest: Manifest,
    /// How disk regions travel.
    pub storage: WireStorage,
    /// The primary's lineage: the checkpoints it cuts are named `(lineage, epoch)`
    /// ([`ReplicaId`]), so a standby that later offers its replica can be told apart
    /// from one of another host's history.
    pub lineage: u64,
}

pub use crate::checkpoint::ReplicaId;

/// Which connection of a session a joining standby opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JoinRole {
    /// The data connection: Hello, the copy, checkpoints, Acks.
    Data,
    /// The liveness connection: heartbeats.
    Liveness,
}

/// The first frame of a connection a standby dialed (`standby --join`): the primary
/// pairs a session's two connections by `token`, which the standby draws at random.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Join {
    /// Which connection this is.
    pub role: JoinRole,
    /// The session's token, the same on both connections.
    pub token: u64,
}

/// Bytes of one [`Digest`] hash: BLAKE3's 256 bits. A guest that controls what it
/// writes cannot make two different chunks hash alike (unlike a CRC).
pub const DIGEST_LEN: usize = 32;

/// The most chunks one disk's digest may have (8 MiB of hashes): larger disks get
/// larger chunks ([`digest_chunk`]).
pub const MAX_DIGEST_CHUNKS: u64 = 256 << 10;

/// The smallest digest chunk: 64 KiB.
pub const MIN_DIGEST_CHUNK: u64 = 64 << 10;

/// The chunk size both sides use for a disk of `size` bytes: 64 KiB, doubled until
/// the disk has at most [`MAX_DIGEST_CHUNKS`] chunks.
pub fn digest_chunk(size: u64) -> u64 {
    let mut chunk = MIN_DIGEST_CHUNK;
    while size.div_ceil(chunk) > MAX_DIGEST_CHUNKS {
        chunk *= 2;
    }
    chunk
}

/// One disk's content as a standby holds it: a BLAKE3 hash of each `chunk`-byte
/// piece, in order (the last piece may be shorter).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Digest {
    /// Bytes per chunk ([`digest_chunk`] of the disk's size).
    pub chunk: u64,
    /// One hash per chunk.
    pub hashes: Vec<[u8; DIGEST_LEN]>,
}

/// What a standby holds when a session begins: the replica in its memory (if any,
/// and which), and each disk's digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holdings {
    /// The replica this standby's memory holds, from an earlier session.
    pub replica: Option<ReplicaId>,
    /// One digest per disk of the Hello, in order.
    pub disks: Vec<Digest>,
    /// Where this standby accepts a standby once it runs the guest (its `--listen`
    /// address), so a primary that hands it the guest (switchover) can become its
    /// standby. `None`: it listens nowhere.
    pub listen: Option<String>,
}

/// How an initial copy builds the standby's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyPlan {
    /// `Some(id)`: the standby keeps its replica, which must be `id`; only the pages
    /// changed since travel. `None`: the replica starts as zeros; the copy sends
    /// every page that is not zero.
    pub memory: Option<ReplicaId>,
}

/// Why a standby refuses a primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefuseReason {
    /// It does not speak the primary's protocol version.
    Version,
    /// It cannot hold this machine (memory, disks, their sizes or journals differ).
    Machine,
    /// It does not support the storage mode.
    Storage,
    /// It already serves another primary.
    Busy,
    /// The primary's fence generation is older than one it has seen.
    Fenced,
}

/// A standby's answer to a [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelloAck {
    /// Go ahead: the initial copy, then checkpoints.
    Accept,
    /// No: why, and a sentence for the primary's log.
    Refuse {
        /// The reason, for the primary to act on.
        reason: RefuseReason,
        /// Details for a person.
        detail: String,
    },
}

/// How a run ended, sent as the last frame of an orderly session (the wire form of
/// [`crate::checkpoint::sink::SinkEnd`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Shutdown {
    /// The guest ended the run itself: there is nothing to resume.
    Finished {
        /// The primary's exit status.
        exit_status: i32,
        /// How it ended, for the standby's log.
        how: String,
    },
    /// The user stopped the run after a final checkpoint, which may be resumed from
    /// the primary's own store; the standby does not take over.
    Stopped {
        /// The primary's exit status.
        exit_status: i32,
    },
    /// The primary gave up on this standby (its lag deadline, its silence, a broken
    /// connection) and runs on without it, unprotected: the standby must not take
    /// over. Sent on the liveness connection as the primary closes the session, so a
    /// standby that was only slow or stopped, not dead, finds it when it wakes.
    Abandoned,
    /// A planned switchover: the primary cut a final checkpoint, the standby
    /// acknowledged it, and now the standby takes the fence and resumes the guest
    /// at once. The old primary then dials it as its standby (`Holdings::listen`).
    Handover,
}

/// Part of one disk's region in a Region frame. A region too large for one frame
/// travels as several chunks for the same disk, with the same metadata and extents
/// continuing in ascending sector order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionChunk {
    /// The disk's index in attach order.
    pub disk: u32,
    /// Whether data travels (replicated storage) or only metadata (shared storage).
    pub storage: WireStorage,
    /// The region's metadata (`acknowledged` is not sent: always false on arrival).
    pub meta: RegionMeta,
    /// Extents of this chunk, ascending and disjoint; empty for shared storage.
    pub extents: Vec<ExportExtent>,
}

/// Part of one disk's base image in the initial copy: `data` belongs at byte `offset`
/// of disk `disk` (attach order). Offsets and lengths are whole sectors.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskChunk {
    /// The disk's index in attach order.
    pub disk: u32,
    /// Byte offset in the disk, a multiple of the sector size.
    pub offset: u64,
    /// The bytes, a positive whole number of sectors.
    pub data: Vec<u8>,
}

/// Console bytes and their offset in the guest's console stream: a checkpoint's
/// [`Console`](crate::checkpoint::Console).
pub type ConsoleChunk = crate::checkpoint::Console;

/// The totals an EndOfCheckpoint announces, which the standby checks against what
/// it received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    /// Pages in the checkpoint.
    pub pages: u64,
    /// Bytes of encoded machine state.
    pub state_len: u64,
    /// Console bytes.
    pub console_bytes: u64,
    /// Disks with a region.
    pub regions: u32,
    /// The checkpoint completes a base image (the first after an initial copy).
    pub full: bool,
}

/// What a frame carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// See [`FrameType::Hello`].
    Hello(Hello),
    /// See [`FrameType::HelloAck`].
    HelloAck(HelloAck),
    /// See [`FrameType::Base`].
    Base(StagedPages),
    /// See [`FrameType::Pages`].
    Pages(StagedPages),
    /// See [`FrameType::State`].
    State(Vec<u8>),
    /// See [`FrameType::Region`].
    Region(RegionChunk),
    /// See [`FrameType::Console`].
    Console(ConsoleChunk),
    /// See [`FrameType::EndOfCheckpoint`].
    EndOfCheckpoint(Totals),
    /// See [`FrameType::Ack`].
    Ack,
    /// See [`FrameType::Heartbeat`].
    Heartbeat,
    /// See [`FrameType::Shutdown`].
    Shutdown(Shutdown),
    /// See [`FrameType::DiskBase`].
    DiskBase(DiskChunk),
    /// See [`FrameType::Join`].
    Join(Join),
    /// See [`FrameType::Holdings`].
    Holdings(Holdings),
    /// See [`FrameType::CopyPlan`].
    CopyPlan(CopyPlan),
}

impl Body {
    /// The frame type carrying this body.
    pub fn frame_type(&self) -> FrameType {
        match self {
            Body::Hello(_) => FrameType::Hello,
            Body::HelloAck(_) => FrameType::HelloAck,
            Body::Base(_) => FrameType::Base,
            Body::Pages(_) => FrameType::Pages,
            Body::State(_) => FrameType::State,
            Body::Region(_) => FrameType::Region,
            Body::Console(_) => FrameType::Console,
            Body::EndOfCheckpoint(_) => FrameType::EndOfCheckpoint,
            Body::Ack => FrameType::Ack,
            Body::Heartbeat => FrameType::Heartbeat,
            Body::Shutdown(_) => FrameType::Shutdown,
            Body::DiskBase(_) => FrameType::DiskBase,
            Body::Join(_) => FrameType::Join,
            Body::Holdings(_) => FrameType::Holdings,
            Body::CopyPlan(_) => FrameType::CopyPlan,
        }
    }
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The checkpoint epoch it belongs to (Base: the epoch the copy is of; Ack: the
    /// epoch applied; Hello, HelloAck: 0; Heartbeat, Shutdown: the sender's latest).
    pub epoch: u64,
    /// The sender's fence generation: frames of an older one are refused.
    pub generation: u64,
    /// What it carries.
    pub body: Body,
}

/// What is wrong inside a payload whose length and CRC were fine.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// The payload is shorter than its fixed part.
    #[error("{len} bytes, shorter than the {need} its layout needs")]
    Short {
        /// Payload length.
        len: usize,
        /// Bytes needed.
        need: usize,
    },
    /// A page batch's count does not match its length: `8 + count × 4104` must be it.
    #[error("{count} pages need {need} bytes, the payload has {len}")]
    PageCount {
        /// Pages announced.
        count: u32,
        /// Bytes they need.
        need: u64,
        /// Payload length.
        len: usize,
    },
    /// More pages in one batch than [`MAX_BATCH_PAGES`].
    #[error("{0} pages in one batch, more than {MAX_BATCH_PAGES}")]
    BatchTooLarge(u32),
    /// A page address is not page-aligned.
    #[error("page address {0:#x} is not page-aligned")]
    UnalignedPage(u64),
    /// A reserved field is not zero.
    #[error("reserved bytes are not zero")]
    Reserved,
    /// A Region frame's content kind is unknown.
    #[error("unknown region content kind {0}")]
    RegionContent(u32),
    /// A metadata-only region carries extents.
    #[error("a metadata-only region carries {0} extents")]
    MetaWithExtents(u32),
    /// An extent is empty or not a whole number of sectors.
    #[error("extent at sector {sector} has {len} bytes, not a positive multiple of {SECTOR_SIZE}")]
    ExtentLen {
        /// Its first sector.
        sector: u64,
        /// Its length.
        len: u32,
    },
    /// Extents are not ascending and disjoint, or one runs past the last sector.
    #[error("extent at sector {0} overlaps or precedes the one before, or overflows")]
    ExtentOrder(u64),
    /// Bytes follow the last element of the payload.
    #[error("{0} bytes follow the payload's last element")]
    Trailing(usize),
    /// An EndOfCheckpoint has flags this version does not know.
    #[error("unknown end-of-checkpoint flags {0:#x}")]
    EndFlags(u32),
    /// A Console frame's offset plus length overflows the stream.
    #[error("console offset {0} plus its length overflows")]
    ConsoleOverflow(u64),
    /// A DiskBase chunk is empty, not whole sectors, or overflows.
    #[error(
        "disk chunk at byte {offset} with {len} bytes is not a positive whole number of sectors"
    )]
    DiskChunk {
        /// Its offset.
        offset: u64,
        /// Its length.
        len: usize,
    },
    /// A structured (postcard) payload does not decode.
    #[error("cannot decode the payload")]
    Decode(#[source] postcard::Error),
    /// A packed page batch does not decode.
    #[error("bad packed page batch")]
    Packed(#[source] crate::checkpoint::pagecodec::CodecError),
}

/// Failures reading or writing frames.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The transport failed.
    #[error("frame transport I/O failed")]
    Io(#[source] std::io::Error),
    /// The stream ended inside a frame (a clean end between frames is not an error).
    #[error("the stream ended {got} bytes into a {want}-byte {part}")]
    Truncated {
        /// `"header"` or `"payload"`.
        part: &'static str,
        /// Bytes received.
        got: usize,
        /// Bytes expected.
        want: usize,
    },
    /// The bytes are not a mirrorvm frame.
    #[error("not a mirrorvm replication frame (magic {0:02x?})")]
    BadMagic([u8; 4]),
    /// The peer speaks a protocol version this reader does not (too old, too new,
    /// or not the one the session agreed on).
    #[error("protocol version {got}; this mirrorvm speaks {}", speaks(*.oldest, *.newest))]
    Version {
        /// The peer's version.
        got: u16,
        /// The oldest version the reader accepted.
        oldest: u16,
        /// The newest version the reader accepted.
        newest: u16,
    },
    /// The header's CRC does not match: the header is corrupt.
    #[error("frame header checksum mismatch")]
    HeaderCrc(#[source] CrcMismatch),
    /// The header names a frame type this version does not know.
    #[error("unknown frame type {0}")]
    UnknownType(u16),
    /// The header has flags this version does not define (none are defined).
    #[error("{ty} frame with unknown flags {flags:#x}")]
    Flags {
        /// The frame's type.
        ty: FrameType,
        /// The flags.
        flags: u32,
    },
    /// The payload is longer than the bound for its type or the reader's bound;
    /// nothing was allocated for it.
    #[error("{ty} payload of {len} bytes exceeds the bound of {max} bytes")]
    TooLarge {
        /// The frame's type.
        ty: FrameType,
        /// The announced (or, writing, the encoded) length.
        len: u64,
        /// The bound.
        max: u32,
    },
    /// The payload's CRC does not match: it is corrupt.
    #[error("{ty} payload checksum mismatch")]
    PayloadCrc {
        /// The frame's type.
        ty: FrameType,
        /// The CRCs.
        #[source]
        cause: CrcMismatch,
    },
    /// The payload's layout is wrong for its type.
    #[error("malformed {ty} payload")]
    Malformed {
        /// The frame's type.
        ty: FrameType,
        /// What is wrong.
        #[source]
        cause: Malformed,
    },
    /// A structured payload could not be encoded (writing).
    #[error("cannot encode a {ty} payload")]
    Encode {
        /// The frame's type.
        ty: FrameType,
        /// Cause.
        #[source]
        cause: postcard::Error,
    },
}

/// "version 4" or "versions 3 to 4", for messages.
pub fn speaks(oldest: u16, newest: u16) -> String {
    if oldest == newest {
        format!("version {newest}")
    } else {
        format!("versions {oldest} to {newest}")
    }
}

fn malformed(ty: FrameType, cause: Malformed) -> FrameError {
    FrameError::Malformed { ty, cause }
}

/// A payload's CRC as the header stated it (`stored`) against the one computed over
/// what arrived: unequal is a corrupt payload.
fn check_payload_crc(ty: FrameType, stored: u32, computed: u32) -> Result<(), FrameError> {
    if computed == stored {
        return Ok(());
    }
    Err(FrameError::PayloadCrc {
        ty,
        cause: CrcMismatch { stored, computed },
    })
}

// ---------------------------------------------------------------------------------
// Encoding

/// Appends a page batch payload.
/// Appends a Pages or Base frame's payload up to its page data (head and addresses),
/// after checking that `data` holds exactly the pages of `addrs`.
fn encode_pages_head(
    buf: &mut Vec<u8>,
    ty: FrameType,
    addrs: &[u64],
    data: &[u8],
) -> Result<(), FrameError> {
    let count = u32::try_from(addrs.len())
        .ok()
        .filter(|c| *c <= MAX_BATCH_PAGES)
        .ok_or(malformed(ty, Malformed::BatchTooLarge(u32::MAX)))?;
    if addrs.len().checked_mul(PAGE_SIZE) != Some(data.len()) {
        return Err(malformed(
            ty,
            Malformed::PageCount {
                count,
                need: u64::from(count) * PAGE_ENTRY,
                len: data.len(),
            },
        ));
    }
    if let Some(a) = addrs.iter().find(|a| *a % PAGE != 0) {
        return Err(malformed(ty, Malformed::UnalignedPage(*a)));
    }
    let head = RawPagesHead {
        count: U32::new(count),
        reserved: [0; 4],
    };
    buf.extend_from_slice(head.as_bytes());
    for a in addrs {
        buf.extend_from_slice(&a.to_le_bytes());
    }
    Ok(())
}

/// Appends the payload of a Pages or Base frame: head, addresses, page data.
fn encode_pages(
    buf: &mut Vec<u8>,
    ty: FrameType,
    addrs: &[u64],
    data: &[u8],
) -> Result<(), FrameError> {
    encode_pages_head(buf, ty, addrs, data)?;
    buf.extend_from_slice(data);
    Ok(())
}

/// An extent to encode, borrowed (a sender splits large extents without copying).
struct ExtentRef<'a> {
    sector: u64,
    data: &'a [u8],
}

/// Appends a Region payload.
fn encode_region(
    buf: &mut Vec<u8>,
    disk: u32,
    storage: WireStorage,
    meta: &RegionMeta,
    extents: &[ExtentRef<'_>],
) -> Result<(), FrameError> {
    let ty = FrameType::Region;
    let count = u32::try_from(extents.len()).map_err(|_| FrameError::TooLarge {
        ty,
        len: u64::MAX,
        max: MAX_PAYLOAD,
    })?;
    let content = match storage {
        WireStorage::Replicated => CONTENT_DATA,
        WireStorage::Shared if count == 0 => CONTENT_META,
        WireStorage::Shared => return Err(malformed(ty, Malformed::MetaWithExtents(count))),
    };
    let head = RawRegionHead {
        disk: U32::new(disk),
        content: U32::new(content),
        epoch: U64::new(meta.epoch),
        parent_epoch: U64::new(meta.parent_epoch),
        slot_generation: U64::new(meta.generation),
        used_bytes: U64::new(meta.used_bytes),
        sectors: U64::new(meta.sectors),
        slot: U32::new(meta.slot),
        records: U32::new(meta.records),
        extents: U32::new(count),
        reserved: [0; 4],
    };
    buf.extend_from_slice(head.as_bytes());
    for e in extents {
        let len = u32::try_from(e.data.len())
            .ok()
            .filter(|l| *l > 0 && u64::from(*l) % SECTOR_SIZE == 0)
            .ok_or(malformed(
                ty,
                Malformed::ExtentLen {
                    sector: e.sector,
                    len: u32::try_from(e.data.len()).unwrap_or(u32::MAX),
                },
            ))?;
        let eh = RawExtentHead {
            sector: U64::new(e.sector),
            len: U32::new(len),
            reserved: [0; 4],
        };
        buf.extend_from_slice(eh.as_bytes());
        buf.extend_from_slice(e.data);
    }
    Ok(())
}

/// Appends the payload of `body`.
fn encode_body(buf: &mut Vec<u8>, body: &Body) -> Result<(), FrameError> {
    let ty = body.frame_type();
    match body {
        Body::Hello(h) => postcard_into(buf, ty, h),
        Body::HelloAck(a) => postcard_into(buf, ty, a),
        Body::Shutdown(s) => postcard_into(buf, ty, s),
        Body::Join(j) => postcard_into(buf, ty, j),
        Body::Holdings(h) => postcard_into(buf, ty, h),
        Body::CopyPlan(c) => postcard_into(buf, ty, c),
        Body::Base(p) | Body::Pages(p) => encode_pages(buf, ty, &p.addrs, &p.data),
        Body::State(s) => {
            buf.extend_from_slice(s);
            Ok(())
        }
        Body::Region(r) => {
            let refs: Vec<ExtentRef<'_>> = r
                .extents
                .iter()
                .map(|e| ExtentRef {
                    sector: e.sector,
                    data: &e.data,
                })
                .collect();
            encode_region(buf, r.disk, r.storage, &r.meta, &refs)
        }
        Body::Console(c) => {
            buf.extend_from_slice(&c.offset.to_le_bytes());
            buf.extend_from_slice(&c.bytes);
            Ok(())
        }
        Body::EndOfCheckpoint(t) => {
            let raw = RawEnd {
                pages: U64::new(t.pages),
                state_len: U64::new(t.state_len),
                console_bytes: U64::new(t.console_bytes),
                regions: U32::new(t.regions),
                flags: U32::new(if t.full { END_FLAG_FULL } else { 0 }),
            };
            buf.extend_from_slice(raw.as_bytes());
            Ok(())
        }
        Body::Ack | Body::Heartbeat => Ok(()),
        Body::DiskBase(c) => {
            buf.extend_from_slice(&c.disk.to_le_bytes());
            buf.extend_from_slice(&[0; 4]);
            buf.extend_from_slice(&c.offset.to_le_bytes());
            buf.extend_from_slice(&c.data);
            Ok(())
        }
    }
}

/// Appends the postcard encoding of a structured payload.
fn postcard_into<T: Serialize>(buf: &mut Vec<u8>, ty: FrameType, v: &T) -> Result<(), FrameError> {
    let bytes = postcard::to_stdvec(v).map_err(|cause| FrameError::Encode { ty, cause })?;
    buf.extend_from_slice(&bytes);
    Ok(())
}

/// Writes frames to a transport. Each frame goes out with one `write_all` of its
/// header and one of its payload; nothing is flushed until [`FrameWriter::flush`].
#[derive(Debug)]
pub struct FrameWriter<W> {
    w: W,
    buf: Vec<u8>,
    generation: u64,
    version: u16,
    packing: Option<Compression>,
}

impl<W: Write> FrameWriter<W> {
    /// A writer stamping every frame with fence generation `generation`.
    pub fn new(w: W, generation: u64) -> Self {
        FrameWriter {
            w,
            buf: Vec::new(),
            generation,
            version: VERSION,
            packing: None,
        }
    }

    /// Writes every later frame in protocol `version` (the one a session agreed on).
    pub fn set_version(&mut self, version: u16) {
        self.version = version;
    }

    /// The protocol version frames are written in.
    pub fn version(&self) -> u16 {
        self.version
    }

    /// Sends the page batches of [`write_base`](Self::write_base) and
    /// [`write_checkpoint`](Self::write_checkpoint) packed with `compression` (zero
    /// pages as bits), or raw (`None`). Versions before [`PACKED_SINCE`] always send
    /// them raw.
    pub fn set_packing(&mut self, compression: Option<Compression>) {
        self.packing = compression;
    }

    /// The same writer stamping later frames with fence generation `generation`.
    pub fn set_generation(&mut self, generation: u64) {
        self.generation = generation;
    }

    /// The transport.
    pub fn get_ref(&self) -> &W {
        &self.w
    }

    /// The transport, to hand back when the session ends.
    pub fn into_inner(self) -> W {
        self.w
    }

    /// Sends a frame of `epoch` carrying `body`. A payload over its type's bound is
    /// refused (nothing is written): the sender never sends what a receiver refuses.
    pub fn write(&mut self, epoch: u64, body: &Body) -> Result<(), FrameError> {
        self.buf.clear();
        let mut buf = std::mem::take(&mut self.buf);
        let r =
            encode_body(&mut buf, body).and_then(|()| self.send(body.frame_type(), epoch, 0, &buf));
        self.buf = buf;
        r
    }

    /// Writes the header for `payload` and the payload.
    fn send(
        &mut self,
        ty: FrameType,
        epoch: u64,
        flags: u32,
        payload: &[u8],
    ) -> Result<(), FrameError> {
        self.send_parts(ty, epoch, flags, &[payload])
    }

    /// Writes the header for a payload made of `parts`, then the parts, each with its
    /// own `write_all`: page data goes from where it is staged to the transport
    /// without being copied into a frame buffer first.
    fn send_parts(
        &mut self,
        ty: FrameType,
        epoch: u64,
        flags: u32,
        parts: &[&[u8]],
    ) -> Result<(), FrameError> {
        let max = ty.max_payload().min(MAX_PAYLOAD);
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let len = u32::try_from(total)
            .ok()
            .filter(|l| *l <= max)
            .ok_or(FrameError::TooLarge {
                ty,
                len: total as u64,
                max,
            })?;
        let payload_crc = parts.iter().fold(0, |crc, p| crc32c::crc32c_append(crc, p));
        let mut h = RawHeader {
            magic: MAGIC,
            version: U16::new(self.version),
            frame_type: U16::new(ty.code()),
            flags: U32::new(flags),
            payload_len: U32::new(len),
            epoch: U64::new(epoch),
            generation: U64::new(self.generation),
            payload_crc: U32::new(payload_crc),
            crc: U32::ZERO,
        };
        h.seal();
        self.w.write_all(h.as_bytes()).map_err(FrameError::Io)?;
        for p in parts {
            self.w.write_all(p).map_err(FrameError::Io)?;
        }
        Ok(())
    }

    /// Sends a batch of pages of `epoch` as one Pages or Base frame.
    fn send_pages(
        &mut self,
        ty: FrameType,
        epoch: u64,
        addrs: &[u64],
        data: &[u8],
    ) -> Result<(), FrameError> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let r = match self.packing.filter(|_| self.version >= PACKED_SINCE) {
            // The raw head is built only for its checks (count, lengths, alignment).
            Some(compression) => {
                encode_pages_head(&mut Vec::new(), ty, addrs, data).and_then(|()| {
                    pagecodec::encode_slices(addrs, data, compression, &mut buf);
                    self.send(ty, epoch, FLAG_PACKED, &buf)
                })
            }
            None => encode_pages_head(&mut buf, ty, addrs, data)
                .and_then(|()| self.send_parts(ty, epoch, 0, &[&buf, data])),
        };
        self.buf = buf;
        r
    }

    /// Sends pages of the initial copy of memory (a base at `epoch`), in as many Base
    /// frames as [`MAX_BATCH_PAGES`] makes them.
    pub fn write_base(&mut self, epoch: u64, pages: &StagedPages) -> Result<(), FrameError> {
        self.write_batches(FrameType::Base, epoch, pages)
    }

    fn write_batches(
        &mut self,
        ty: FrameType,
        epoch: u64,
        pages: &StagedPages,
    ) -> Result<(), FrameError> {
        if pages.addrs.len().checked_mul(PAGE_SIZE) != Some(pages.data.len()) {
            return Err(malformed(
                ty,
                Malformed::PageCount {
                    count: u32::try_from(pages.addrs.len()).unwrap_or(u32::MAX),
                    need: (pages.addrs.len() as u64).saturating_mul(PAGE_ENTRY),
                    len: pages.data.len(),
                },
            ));
        }
        let batch = MAX_BATCH_PAGES as usize;
        for (addrs, data) in pages
            .addrs
            .chunks(batch)
            .zip(pages.data.chunks(batch * PAGE_SIZE))
        {
            self.send_pages(ty, epoch, addrs, data)?;
        }
        Ok(())
    }

    /// Sends checkpoint `c` with its console output `console`: Pages, Region, Console
    /// and State frames (each within its bound), then EndOfCheckpoint with the totals.
    /// Regions must carry data for replicated storage, metadata for shared storage.
    pub fn write_checkpoint(&mut self, c: &Checkpoint) -> Result<(), FrameError> {
        self.write_checkpoint_with(c, &c.console)
    }

    /// [`write_checkpoint`](Self::write_checkpoint) with other console bytes (tests
    /// build hostile streams with it).
    fn write_checkpoint_with(
        &mut self,
        c: &Checkpoint,
        console: &ConsoleChunk,
    ) -> Result<(), FrameError> {
        let epoch = c.epoch;
        self.write_batches(FrameType::Pages, epoch, &c.pages)?;
        for region in &c.disks {
            self.write_region(epoch, region)?;
        }
        let chunk = MAX_CONSOLE_CHUNK as usize;
        let mut offset = console.offset;
        let mut buf = std::mem::take(&mut self.buf);
        let mut r = Ok(());
        for part in console.bytes.chunks(chunk) {
            buf.clear();
            buf.extend_from_slice(&offset.to_le_bytes());
            buf.extend_from_slice(part);
            r = self.send(FrameType::Console, epoch, 0, &buf);
            if r.is_err() {
                break;
            }
            offset = offset.saturating_add(part.len() as u64);
        }
        self.buf = buf;
        r?;
        self.send(FrameType::State, epoch, 0, &c.state)?;
        let regions = u32::try_from(c.disks.len()).map_err(|_| FrameError::TooLarge {
            ty: FrameType::EndOfCheckpoint,
            len: c.disks.len() as u64,
            max: u32::MAX,
        })?;
        self.write(
            epoch,
            &Body::EndOfCheckpoint(Totals {
                pages: c.pages.len() as u64,
                state_len: c.state.len() as u64,
                console_bytes: console.bytes.len() as u64,
                regions,
                full: c.full,
            }),
        )
    }

    /// Sends one disk's region in as many Region frames as its size needs, splitting
    /// extents at sector boundaries.
    fn write_region(&mut self, epoch: u64, region: &DiskRegion) -> Result<(), FrameError> {
        let ty = FrameType::Region;
        let disk = u32::try_from(region.disk).map_err(|_| FrameError::TooLarge {
            ty,
            len: region.disk as u64,
            max: u32::MAX,
        })?;
        let (storage, meta, extents) = match &region.content {
            RegionContent::Meta(m) => (WireStorage::Shared, m, &[][..]),
            RegionContent::Data(e) => (WireStorage::Replicated, &e.meta, &e.extents[..]),
        };
        // Room for extent data in one frame, a whole number of sectors.
        let room = (MAX_PAYLOAD as usize - REGION_HEAD_LEN) / 2;
        let room = room - room % crate::arch::to_usize(SECTOR_SIZE);
        let mut parts: Vec<ExtentRef<'_>> = Vec::new();
        let mut used = 0usize;
        for e in extents {
            let mut sector = e.sector;
            for piece in e.data.chunks(room) {
                if !parts.is_empty() && used + EXTENT_HEAD_LEN + piece.len() > room {
                    self.send_region(epoch, disk, storage, meta, &parts)?;
                    parts.clear();
                    used = 0;
                }
                parts.push(ExtentRef {
                    sector,
                    data: piece,
                });
                used += EXTENT_HEAD_LEN + piece.len();
                sector = sector.saturating_add(piece.len() as u64 / SECTOR_SIZE);
            }
        }
        self.send_region(epoch, disk, storage, meta, &parts)
    }

    fn send_region(
        &mut self,
        epoch: u64,
        disk: u32,
        storage: WireStorage,
        meta: &RegionMeta,
        parts: &[ExtentRef<'_>],
    ) -> Result<(), FrameError> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let r = encode_region(&mut buf, disk, storage, meta, parts)
            .and_then(|()| self.send(FrameType::Region, epoch, 0, &buf));
        self.buf = buf;
        r
    }

    /// Flushes the transport.
    pub fn flush(&mut self) -> Result<(), FrameError> {
        self.w.flush().map_err(FrameError::Io)
    }
}

// ---------------------------------------------------------------------------------
// Decoding

/// Reads frames from a transport, blocking.
#[derive(Debug)]
pub struct FrameReader<R> {
    r: R,
    max_payload: u32,
    /// The versions accepted: any this code speaks until [`FrameReader::pin`].
    oldest: u16,
    newest: u16,
    /// The version of the last frame read.
    last_version: u16,
    read: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// The payload of the frame being read, kept between frames.
    buf: Vec<u8>,
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<usize, FrameError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    Ok(got)
}

fn u64_at(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

impl<R: Read> FrameReader<R> {
    /// A reader with the default payload bound, [`MAX_PAYLOAD`].
    pub fn new(r: R) -> Self {
        Self::with_max_payload(r, MAX_PAYLOAD)
    }

    /// A reader refusing payloads over `max_payload` bytes (and over each type's own
    /// bound), whatever a header says.
    pub fn with_max_payload(r: R, max_payload: u32) -> Self {
        FrameReader {
            r,
            max_payload,
            oldest: OLDEST_VERSION,
            newest: VERSION,
            last_version: VERSION,
            read: Default::default(),
            buf: Vec::new(),
        }
    }

    /// A counter of the bytes this reader has read (headers and payloads), which
    /// another thread may watch.
    pub fn bytes_read(&self) -> std::sync::Arc<std::sync::atomic::AtomicU64> {
        self.read.clone()
    }

    /// The transport.
    pub fn into_inner(self) -> R {
        self.r
    }

    /// Accepts frames of protocol `version` only from now on: the version a session
    /// agreed on.
    pub fn pin(&mut self, version: u16) {
        self.accept_versions(version, version);
    }

    /// Accepts frames of protocol versions `oldest` to `newest` from now on.
    pub fn accept_versions(&mut self, oldest: u16, newest: u16) {
        self.oldest = oldest;
        self.newest = newest;
    }

    /// The protocol version of the last frame read (a Hello's or a Join's is the
    /// version its sender speaks).
    pub fn version(&self) -> u16 {
        self.last_version
    }

    /// Reads the next frame: `Ok(None)` when the stream ends cleanly between frames.
    /// After an error the stream is out of step: drop the session.
    pub fn read_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        let mut hb = [0u8; HEADER_LEN];
        let got = read_full(&mut self.r, &mut hb)?;
        self.count(got);
        if got == 0 {
            return Ok(None);
        }
        if got < HEADER_LEN {
            return Err(FrameError::Truncated {
                part: "header",
                got,
                want: HEADER_LEN,
            });
        }
        let (ty, epoch, generation, len, payload_crc, flags) = self.check_header(&hb)?;
        if flags & FLAG_PACKED != 0 {
            self.read_payload(0, len, len)?;
            return self.finish_packed(ty, epoch, generation, len, payload_crc);
        }
        if matches!(ty, FrameType::Pages | FrameType::Base) {
            return self.read_pages(ty, epoch, generation, len, payload_crc);
        }
        self.read_payload(0, len, len)?;
        self.finish(ty, epoch, generation, &self.buf[..len], payload_crc)
    }

    /// Reads bytes `[from, to)` of a payload of `len` bytes into the frame buffer,
    /// which is kept for the next frame (a fresh one per frame costs page faults and
    /// clearing every time). `len` is within the header's bound: this is the only
    /// allocation a header sizes.
    fn read_payload(&mut self, from: usize, to: usize, len: usize) -> Result<(), FrameError> {
        if self.buf.len() < to {
            self.buf.resize(to, 0);
        }
        let got = read_full(&mut self.r, &mut self.buf[from..to])?;
        self.count(got);
        if from + got < to {
            return Err(FrameError::Truncated {
                part: "payload",
                got: from + got,
                want: len,
            });
        }
        Ok(())
    }

    /// Reads the payload of a Pages or Base frame of `len` bytes (within its bound)
    /// in two parts: its head and addresses into the frame buffer, then its page data
    /// straight into the vector the frame will carry, so that the data is copied once
    /// (from the socket) on its way to the staging.
    fn read_pages(
        &mut self,
        ty: FrameType,
        epoch: u64,
        generation: u64,
        len: usize,
        payload_crc: u32,
    ) -> Result<Option<Frame>, FrameError> {
        let truncated = |got: usize| FrameError::Truncated {
            part: "payload",
            got,
            want: len,
        };
        let mut head = [0u8; PAGES_HEAD_LEN];
        let want = PAGES_HEAD_LEN.min(len);
        let got = read_full(&mut self.r, &mut head[..want])?;
        self.count(got);
        if got < want {
            return Err(truncated(got));
        }
        // A length that cannot hold whole entries is malformed whatever the count says.
        let entries = (len.saturating_sub(PAGES_HEAD_LEN)) as u64;
        let count = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        if len < PAGES_HEAD_LEN || entries != u64::from(count) * PAGE_ENTRY {
            // Read (and check) the rest as any frame before judging it, so that the
            // error says what was wrong with a frame that arrived whole.
            self.buf.resize(self.buf.len().max(want), 0);
            self.buf[..want].copy_from_slice(&head[..want]);
            self.read_payload(want, len, len)?;
            return self.finish(ty, epoch, generation, &self.buf[..len], payload_crc);
        }
        let n = count as usize;
        let addr_len = n * 8;
        self.buf.resize(self.buf.len().max(PAGES_HEAD_LEN), 0);
        self.buf[..PAGES_HEAD_LEN].copy_from_slice(&head);
        self.read_payload(PAGES_HEAD_LEN, PAGES_HEAD_LEN + addr_len, len)?;
        // The data: read into spare capacity, not zero-filled first.
        let data_len = n * PAGE_SIZE;
        let mut data = Vec::with_capacity(data_len);
        let got = (&mut self.r)
            .take(data_len as u64)
            .read_to_end(&mut data)
            .map_err(FrameError::Io)?;
        self.count(got);
        if got < data_len {
            return Err(truncated(PAGES_HEAD_LEN + addr_len + got));
        }
        let head_part = &self.buf[..PAGES_HEAD_LEN + addr_len];
        let computed = crc32c::crc32c_append(crc32c::crc32c(head_part), &data);
        check_payload_crc(ty, payload_crc, computed)?;
        let pages = decode_pages_parts(head_part, data).map_err(|cause| malformed(ty, cause))?;
        Ok(Some(pages_frame(ty, epoch, generation, pages)))
    }

    /// Checks a packed page batch's CRC (the payload of `len` bytes is in the frame
    /// buffer) and expands it.
    fn finish_packed(
        &self,
        ty: FrameType,
        epoch: u64,
        generation: u64,
        len: usize,
        payload_crc: u32,
    ) -> Result<Option<Frame>, FrameError> {
        let payload = &self.buf[..len];
        let computed = crc32c::crc32c(payload);
        check_payload_crc(ty, payload_crc, computed)?;
        let pages = pagecodec::decode(payload, u64::from(MAX_BATCH_PAGES))
            .map_err(|cause| malformed(ty, Malformed::Packed(cause)))?;
        Ok(Some(pages_frame(ty, epoch, generation, pages)))
    }

    /// Checks a whole payload's CRC and decodes it.
    fn finish(
        &self,
        ty: FrameType,
        epoch: u64,
        generation: u64,
        payload: &[u8],
        payload_crc: u32,
    ) -> Result<Option<Frame>, FrameError> {
        let computed = crc32c::crc32c(payload);
        check_payload_crc(ty, payload_crc, computed)?;
        let body = decode_body(ty, payload).map_err(|cause| malformed(ty, cause))?;
        Ok(Some(Frame {
            epoch,
            generation,
            body,
        }))
    }

    fn count(&self, n: usize) {
        self.read
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// Checks a header: magic, version, CRC, type, flags, length bound. Returns the
    /// type, epoch, generation, payload length, payload CRC and flags.
    #[allow(clippy::type_complexity)]
    fn check_header(
        &mut self,
        hb: &[u8; HEADER_LEN],
    ) -> Result<(FrameType, u64, u64, usize, u32, u32), FrameError> {
        let raw =
            RawHeader::ref_from_bytes(hb.as_slice()).map_err(|_| FrameError::BadMagic([0; 4]))?;
        if raw.magic != MAGIC {
            return Err(FrameError::BadMagic(raw.magic));
        }
        let version = raw.version.get();
        if !(self.oldest..=self.newest).contains(&version) {
            return Err(FrameError::Version {
                got: version,
                oldest: self.oldest,
                newest: self.newest,
            });
        }
        raw.check_crc().map_err(FrameError::HeaderCrc)?;
        let code = raw.frame_type.get();
        let ty = FrameType::from_code(code).ok_or(FrameError::UnknownType(code))?;
        let flags = raw.flags.get();
        let known = match ty {
            FrameType::Pages | FrameType::Base if version >= PACKED_SINCE => FLAG_PACKED,
            _ => 0,
        };
        if flags & !known != 0 {
            return Err(FrameError::Flags { ty, flags });
        }
        let max = ty.max_payload().min(self.max_payload);
        let len = raw.payload_len.get();
        if len > max {
            return Err(FrameError::TooLarge {
                ty,
                len: u64::from(len),
                max,
            });
        }
        let fields = (
            ty,
            raw.epoch.get(),
            raw.generation.get(),
            len as usize,
            raw.payload_crc.get(),
            flags,
        );
        self.last_version = version;
        Ok(fields)
    }
}

/// A Base or Pages frame (`ty`) carrying `pages`.
fn pages_frame(ty: FrameType, epoch: u64, generation: u64, pages: StagedPages) -> Frame {
    Frame {
        epoch,
        generation,
        body: if ty == FrameType::Base {
            Body::Base(pages)
        } else {
            Body::Pages(pages)
        },
    }
}

fn need(payload: &[u8], n: usize) -> Result<(), Malformed> {
    if payload.len() < n {
        Err(Malformed::Short {
            len: payload.len(),
            need: n,
        })
    } else {
        Ok(())
    }
}

fn decode_pages(payload: &[u8]) -> Result<StagedPages, Malformed> {
    let (head, rest) = RawPagesHead::read_from_prefix(payload).map_err(|_| Malformed::Short {
        len: payload.len(),
        need: PAGES_HEAD_LEN,
    })?;
    let count = head.count.get();
    if count > MAX_BATCH_PAGES {
        return Err(Malformed::BatchTooLarge(count));
    }
    if head.reserved != [0; 4] {
        return Err(Malformed::Reserved);
    }
    let need = u64::from(count) * PAGE_ENTRY;
    if rest.len() as u64 != need {
        return Err(Malformed::PageCount {
            count,
            need: need + PAGES_HEAD_LEN as u64,
            len: payload.len(),
        });
    }
    let n = count as usize;
    let (addr_bytes, data) = rest.split_at(n * 8);
    let addrs = decode_addrs(addr_bytes)?;
    Ok(StagedPages {
        addrs,
        data: data.to_vec(),
    })
}

/// Page addresses, each page-aligned.
fn decode_addrs(addr_bytes: &[u8]) -> Result<Vec<u64>, Malformed> {
    let addrs: Vec<u64> = addr_bytes.chunks_exact(8).map(u64_at).collect();
    if let Some(a) = addrs.iter().find(|a| *a % PAGE != 0) {
        return Err(Malformed::UnalignedPage(*a));
    }
    Ok(addrs)
}

/// A Pages or Base payload read in two parts: `head_and_addrs` (whose count the
/// reader has matched with the payload's length) and the page data.
fn decode_pages_parts(head_and_addrs: &[u8], data: Vec<u8>) -> Result<StagedPages, Malformed> {
    let (head, addr_bytes) =
        RawPagesHead::read_from_prefix(head_and_addrs).map_err(|_| Malformed::Short {
            len: head_and_addrs.len(),
            need: PAGES_HEAD_LEN,
        })?;
    let count = head.count.get();
    if count > MAX_BATCH_PAGES {
        return Err(Malformed::BatchTooLarge(count));
    }
    if head.reserved != [0; 4] {
        return Err(Malformed::Reserved);
    }
    let addrs = decode_addrs(addr_bytes)?;
    if addrs.len() != count as usize || data.len() != addrs.len() * PAGE_SIZE {
        return Err(Malformed::PageCount {
            count,
            need: u64::from(count) * PAGE_ENTRY + PAGES_HEAD_LEN as u64,
            len: head_and_addrs.len() + data.len(),
        });
    }
    Ok(StagedPages { addrs, data })
}

fn decode_region(payload: &[u8]) -> Result<RegionChunk, Malformed> {
    let (head, mut rest) =
        RawRegionHead::read_from_prefix(payload).map_err(|_| Malformed::Short {
            len: payload.len(),
            need: REGION_HEAD_LEN,
        })?;
    if head.reserved != [0; 4] {
        return Err(Malformed::Reserved);
    }
    let count = head.extents.get();
    let storage = match head.content.get() {
        CONTENT_DATA => WireStorage::Replicated,
        CONTENT_META if count == 0 => WireStorage::Shared,
        CONTENT_META => return Err(Malformed::MetaWithExtents(count)),
        other => return Err(Malformed::RegionContent(other)),
    };
    let meta = RegionMeta {
        epoch: head.epoch.get(),
        parent_epoch: head.parent_epoch.get(),
        slot: head.slot.get(),
        generation: head.slot_generation.get(),
        records: head.records.get(),
        used_bytes: head.used_bytes.get(),
        sectors: head.sectors.get(),
        acknowledged: false,
    };
    // No capacity from `count`: every extent takes at least 16 + 512 bytes of the
    // (bounded) payload, so the loop ends on the payload's length.
    let mut extents = Vec::new();
    let mut next_sector = 0u64;
    for _ in 0..count {
        let (eh, after) = RawExtentHead::read_from_prefix(rest).map_err(|_| Malformed::Short {
            len: payload.len(),
            need: payload.len() - rest.len() + EXTENT_HEAD_LEN,
        })?;
        let (sector, len) = (eh.sector.get(), eh.len.get());
        if eh.reserved != [0; 4] {
            return Err(Malformed::Reserved);
        }
        if len == 0 || u64::from(len) % SECTOR_SIZE != 0 {
            return Err(Malformed::ExtentLen { sector, len });
        }
        let end = sector
            .checked_add(u64::from(len) / SECTOR_SIZE)
            .ok_or(Malformed::ExtentOrder(sector))?;
        if sector < next_sector {
            return Err(Malformed::ExtentOrder(sector));
        }
        let l = len as usize;
        need(after, l).map_err(|_| Malformed::Short {
            len: payload.len(),
            need: payload.len() - after.len() + l,
        })?;
        extents.push(ExportExtent {
            sector,
            data: after[..l].to_vec(),
        });
        next_sector = end;
        rest = &after[l..];
    }
    if !rest.is_empty() {
        return Err(Malformed::Trailing(rest.len()));
    }
    Ok(RegionChunk {
        disk: head.disk.get(),
        storage,
        meta,
        extents,
    })
}

fn decode_body(ty: FrameType, payload: &[u8]) -> Result<Body, Malformed> {
    fn pc<'a, T: Deserialize<'a>>(p: &'a [u8]) -> Result<T, Malformed> {
        let (v, rest) = postcard::take_from_bytes(p).map_err(Malformed::Decode)?;
        if rest.is_empty() {
            Ok(v)
        } else {
            Err(Malformed::Trailing(rest.len()))
        }
    }
    Ok(match ty {
        FrameType::Hello => Body::Hello(pc(payload)?),
        FrameType::HelloAck => Body::HelloAck(pc(payload)?),
        FrameType::Shutdown => Body::Shutdown(pc(payload)?),
        FrameType::Join => Body::Join(pc(payload)?),
        FrameType::Holdings => Body::Holdings(pc(payload)?),
        FrameType::CopyPlan => Body::CopyPlan(pc(payload)?),
        FrameType::Base => Body::Base(decode_pages(payload)?),
        FrameType::Pages => Body::Pages(decode_pages(payload)?),
        FrameType::State => Body::State(payload.to_vec()),
        FrameType::Region => Body::Region(decode_region(payload)?),
        FrameType::Console => {
            need(payload, CONSOLE_HEAD_LEN)?;
            let offset = u64_at(payload);
            let bytes = payload[CONSOLE_HEAD_LEN..].to_vec();
            if offset.checked_add(bytes.len() as u64).is_none() {
                return Err(Malformed::ConsoleOverflow(offset));
            }
            Body::Console(ConsoleChunk { offset, bytes })
        }
        FrameType::EndOfCheckpoint => {
            let raw = RawEnd::read_from_bytes(payload).map_err(|_| Malformed::Short {
                len: payload.len(),
                need: END_LEN,
            })?;
            let flags = raw.flags.get();
            if flags & !END_FLAG_FULL != 0 {
                return Err(Malformed::EndFlags(flags));
            }
            Body::EndOfCheckpoint(Totals {
                pages: raw.pages.get(),
                state_len: raw.state_len.get(),
                console_bytes: raw.console_bytes.get(),
                regions: raw.regions.get(),
                full: flags & END_FLAG_FULL != 0,
            })
        }
        // The length bound (0) already refused anything else.
        FrameType::Ack => Body::Ack,
        FrameType::Heartbeat => Body::Heartbeat,
        FrameType::DiskBase => {
            need(payload, DISK_BASE_HEAD_LEN)?;
            let disk = u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]);
            if payload[4..8] != [0; 4] {
                return Err(Malformed::Reserved);
            }
            let offset = u64_at(&payload[8..]);
            let data = payload[DISK_BASE_HEAD_LEN..].to_vec();
            let sector = crate::arch::to_usize(SECTOR_SIZE);
            if data.is_empty() || data.len() % sector != 0 || offset % SECTOR_SIZE != 0 {
                return Err(Malformed::DiskChunk {
                    offset,
                    len: data.len(),
                });
            }
            if offset.checked_add(data.len() as u64).is_none() {
                return Err(Malformed::DiskChunk {
                    offset,
                    len: data.len(),
                });
            }
            Body::DiskBase(DiskChunk { disk, offset, data })
        }
    })
}

// ---------------------------------------------------------------------------------
// Staging on the standby

/// Bounds on what one checkpoint may stage on the standby, beyond each frame's bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AssemblerLimits {
    /// Most pages in one checkpoint (or one base): the guest's page count.
    pub max_pages: u64,
    /// Most bytes of region data in one checkpoint, all disks together.
    pub max_region_bytes: u64,
    /// Most console bytes in one checkpoint.
    pub max_console_bytes: u64,
}

impl AssemblerLimits {
    /// Limits for the machine of `manifest`: its pages, 1 GiB of region data per
    /// disk, 64 MiB of console output.
    pub fn for_manifest(manifest: &Manifest) -> Self {
        AssemblerLimits {
            max_pages: manifest.memory / PAGE,
            max_region_bytes: (manifest.disks.len() as u64).saturating_mul(1 << 30),
            max_console_bytes: 64 << 20,
        }
    }
}

/// Failures staging a checkpoint. After any of them the half-received checkpoint is
/// discarded; the assembler still holds its last complete epoch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssembleError {
    /// A frame that has no place in the checkpoint stream at this point (a Hello,
    /// HelloAck or Ack; a Shutdown or Base inside a checkpoint).
    #[error("unexpected {ty} frame {during}")]
    Unexpected {
        /// The frame's type.
        ty: FrameType,
        /// `"between checkpoints"` or `"inside checkpoint N"`.
        during: String,
    },
    /// A frame carries an older fence generation than one already seen: its sender
    /// has been fenced.
    #[error("frame of fence generation {got}, older than generation {current}")]
    StaleGeneration {
        /// The frame's generation.
        got: u64,
        /// The newest seen.
        current: u64,
    },
    /// The fence generation changed inside a checkpoint.
    #[error("fence generation changed from {was} to {got} inside checkpoint {epoch}")]
    GenerationChanged {
        /// The checkpoint.
        epoch: u64,
        /// Its generation.
        was: u64,
        /// The frame's.
        got: u64,
    },
    /// A frame of another epoch arrived inside checkpoint `receiving`.
    #[error("a frame of epoch {got} inside checkpoint {receiving}")]
    WrongEpoch {
        /// The frame's epoch.
        got: u64,
        /// The checkpoint being received.
        receiving: u64,
    },
    /// A checkpoint does not follow the last complete one (epochs increase by one).
    #[error("checkpoint {got} does not follow epoch {last}; expected {}", last.saturating_add(1))]
    OutOfOrder {
        /// The new checkpoint's epoch.
        got: u64,
        /// The last complete epoch (or base).
        last: u64,
    },
    /// Base frames of a new copy must not go back before the last epoch, nor mix
    /// epochs within one copy.
    #[error("base copy of epoch {got} after epoch {last}")]
    BaseEpoch {
        /// The frame's epoch.
        got: u64,
        /// The last epoch (or the copy in progress).
        last: u64,
    },
    /// A second State frame in one checkpoint.
    #[error("a second state frame in checkpoint {0}")]
    DuplicateState(u64),
    /// The checkpoint ended without its State frame.
    #[error("checkpoint {0} ended without its machine state")]
    MissingState(u64),
    /// A total announced by EndOfCheckpoint disagrees with what arrived.
    #[error("checkpoint {epoch}: {what} announced {announced}, received {received}")]
    Totals {
        /// The checkpoint.
        epoch: u64,
        /// `"pages"`, `"state bytes"`, `"regions"` or `"console bytes"`.
        what: &'static str,
        /// The EndOfCheckpoint's total.
        announced: u64,
        /// What was staged.
        received: u64,
    },
    /// The first checkpoint after an initial copy must complete it (`full`).
    #[error("checkpoint {0} follows an initial copy but does not complete it")]
    NotFull(u64),
    /// A region for a disk the machine does not have.
    #[error("region for disk {disk}; the machine has {disks}")]
    NoSuchDisk {
        /// Its disk index.
        disk: u32,
        /// Disks in the manifest.
        disks: usize,
    },
    /// A region's own epoch differs from its checkpoint's.
    #[error("region of disk {disk} is of epoch {region}, in checkpoint {epoch}")]
    RegionEpoch {
        /// Its disk.
        disk: u32,
        /// The region's epoch.
        region: u64,
        /// The checkpoint's.
        epoch: u64,
    },
    /// A region travels as the session's storage mode does not say.
    #[error("region of disk {disk} travels as {got:?}, the session is {expected:?}")]
    Storage {
        /// Its disk.
        disk: u32,
        /// How it travels.
        got: WireStorage,
        /// The session's mode.
        expected: WireStorage,
    },
    /// A later chunk of a disk's region disagrees with the first: other metadata, or
    /// extents not after the earlier ones.
    #[error("chunks of disk {disk}'s region disagree (metadata or extent order)")]
    RegionChunks {
        /// Its disk.
        disk: u32,
    },
    /// Console bytes do not continue the stream where the previous ones ended.
    #[error("console bytes at offset {got}, expected {expected}")]
    ConsoleGap {
        /// The offset expected.
        expected: u64,
        /// The frame's.
        got: u64,
    },
    /// A checkpoint stages more than its limits allow.
    #[error("checkpoint {epoch}: more {what} than the limit of {limit}")]
    TooMuch {
        /// The checkpoint.
        epoch: u64,
        /// `"pages"`, `"region bytes"` or `"console bytes"`.
        what: &'static str,
        /// The limit.
        limit: u64,
    },
}

/// A checkpoint that arrived whole: ready to apply.
#[derive(Debug)]
pub struct Complete {
    /// The checkpoint: state, regions (data or metadata, in disk order) and its
    /// console output. Its `pages` are empty: they are in `batches`.
    pub checkpoint: Checkpoint,
    /// The checkpoint's pages, as the frames carried them, in order: applying them
    /// batch by batch spares a copy of every page into one buffer.
    pub batches: Vec<StagedPages>,
}

impl Complete {
    /// How many pages the checkpoint carries.
    pub fn page_count(&self) -> usize {
        self.batches.iter().map(StagedPages::len).sum()
    }

    /// Moves the batches into `checkpoint.pages`, in order, for a caller that wants
    /// the checkpoint whole.
    pub fn join_pages(&mut self) {
        for b in self.batches.drain(..) {
            if self.checkpoint.pages.addrs.is_empty() {
                self.checkpoint.pages = b;
            } else {
                self.checkpoint.pages.addrs.extend_from_slice(&b.addrs);
                self.checkpoint.pages.data.extend_from_slice(&b.data);
            }
        }
    }
}

/// What a frame fed to the assembler produced.
#[derive(Debug)]
pub enum Staged {
    /// Nothing yet: a part of a checkpoint, or a heartbeat.
    Nothing,
    /// Pages of an initial copy at `epoch`: write them into the replica's memory (it
    /// is not restorable before the checkpoint that completes the copy arrives).
    Base {
        /// The copy's epoch.
        epoch: u64,
        /// The pages.
        pages: StagedPages,
    },
    /// Part of a disk's base image of an initial copy at `epoch`: write it into the
    /// standby's own copy of that disk (inconsistent until the copy completes).
    DiskBase {
        /// The copy's epoch.
        epoch: u64,
        /// Where the bytes go.
        chunk: DiskChunk,
    },
    /// An initial copy at `epoch` begins: keep the replica named in `plan` or start
    /// from zeros, before any of its Base frames is written.
    Plan {
        /// The copy's epoch.
        epoch: u64,
        /// How memory is copied.
        plan: CopyPlan,
    },
    /// A checkpoint arrived whole: apply it, then acknowledge it.
    Complete(Box<Complete>),
    /// The primary ended the run in order (between checkpoints): no failover.
    Shutdown(Shutdown),
}

/// One disk's region being staged.
#[derive(Debug)]
struct RegionAcc {
    meta: RegionMeta,
    extents: Vec<ExportExtent>,
    next_sector: u64,
}

/// The checkpoint being received.
#[derive(Debug)]
struct Partial {
    epoch: u64,
    generation: u64,
    /// The page batches, as their frames carried them.
    pages: Vec<StagedPages>,
    page_count: u64,
    state: Option<Vec<u8>>,
    regions: Vec<Option<RegionAcc>>,
    region_bytes: u64,
    console: Option<ConsoleChunk>,
}

/// The standby's staging of checkpoints: feed it every frame the primary sends after
/// the Hello; it yields a checkpoint only once all of it arrived and its totals match.
///
/// ```text
///            first frame of N (N = last + 1)          EndOfCheckpoint(N), totals match
///   idle ───────────────────────────────▶ receiving N ──────────────────────────▶ complete N
///    ▲ ▲                                     │                                       │
///    │ └──── error: N discarded ◀────────────┘        (caller applies, then acks)     │
///    └──────────────────────────────────────────────────────────────────────────────────┘
/// ```
#[derive(Debug)]
pub struct CheckpointAssembler {
    limits: AssemblerLimits,
    storage: WireStorage,
    disks: usize,
    /// The last complete checkpoint, or the epoch of the last base copy.
    last: Option<u64>,
    /// A base copy arrived since the last checkpoint: the next must be `full`.
    need_full: bool,
    /// Newest fence generation seen.
    generation: u64,
    /// Where the next console bytes start, once known.
    console_next: Option<u64>,
    partial: Option<Partial>,
}

impl CheckpointAssembler {
    /// An assembler for the session `hello` opened, with `limits`.
    pub fn new(hello: &Hello, limits: AssemblerLimits) -> Self {
        CheckpointAssembler {
            limits,
            storage: hello.storage,
            disks: hello.manifest.disks.len(),
            last: None,
            need_full: false,
            generation: 0,
            console_next: None,
            partial: None,
        }
    }

    /// The last complete epoch (or the epoch of the last base copy), if any.
    pub fn last_epoch(&self) -> Option<u64> {
        self.last
    }

    /// Whether a checkpoint is half received.
    pub fn is_receiving(&self) -> bool {
        self.partial.is_some()
    }

    /// Discards a half-received checkpoint (the connection was lost).
    pub fn discard(&mut self) {
        self.partial = None;
    }

    /// Stages one frame. On an error the half-received checkpoint is discarded.
    pub fn push(&mut self, frame: Frame) -> Result<Staged, AssembleError> {
        let r = self.stage(frame);
        if r.is_err() {
            self.partial = None;
        }
        r
    }

    fn during(&self) -> String {
        match &self.partial {
            Some(p) => format!("inside checkpoint {}", p.epoch),
            None => "between checkpoints".to_string(),
        }
    }

    fn stage(&mut self, frame: Frame) -> Result<Staged, AssembleError> {
        let Frame {
            epoch,
            generation,
            body,
        } = frame;
        if generation < self.generation {
            return Err(AssembleError::StaleGeneration {
                got: generation,
                current: self.generation,
            });
        }
        if let Some(p) = &self.partial {
            if generation != p.generation {
                return Err(AssembleError::GenerationChanged {
                    epoch: p.epoch,
                    was: p.generation,
                    got: generation,
                });
            }
        }
        self.generation = generation;
        let ty = body.frame_type();
        match body {
            Body::Heartbeat => Ok(Staged::Nothing),
            Body::Hello(_) | Body::HelloAck(_) | Body::Ack | Body::Join(_) | Body::Holdings(_) => {
                Err(AssembleError::Unexpected {
                    ty,
                    during: self.during(),
                })
            }
            Body::Shutdown(s) if self.partial.is_none() => Ok(Staged::Shutdown(s)),
            Body::CopyPlan(plan) => self
                .base(FrameType::CopyPlan, epoch)
                .map(|epoch| Staged::Plan { epoch, plan }),
            Body::Shutdown(_) => Err(AssembleError::Unexpected {
                ty,
                during: self.during(),
            }),
            Body::Base(pages) => self
                .base(FrameType::Base, epoch)
                .map(|epoch| Staged::Base { epoch, pages }),
            Body::DiskBase(chunk) => {
                if chunk.disk as usize >= self.disks {
                    return Err(AssembleError::NoSuchDisk {
                        disk: chunk.disk,
                        disks: self.disks,
                    });
                }
                self.base(FrameType::DiskBase, epoch)
                    .map(|epoch| Staged::DiskBase { epoch, chunk })
            }
            Body::Pages(pages) => {
                let limit = self.limits.max_pages;
                let p = self.receiving(epoch, generation)?;
                let total = p.page_count.saturating_add(pages.len() as u64);
                if total > limit {
                    return Err(AssembleError::TooMuch {
                        epoch,
                        what: "pages",
                        limit,
                    });
                }
                p.page_count = total;
                p.pages.push(pages);
                Ok(Staged::Nothing)
            }
            Body::State(s) => {
                let p = self.receiving(epoch, generation)?;
                if p.state.is_some() {
                    return Err(AssembleError::DuplicateState(epoch));
                }
                p.state = Some(s);
                Ok(Staged::Nothing)
            }
            Body::Region(r) => self.region(epoch, generation, r),
            Body::Console(c) => self.console(epoch, generation, c),
            Body::EndOfCheckpoint(t) => {
                self.receiving(epoch, generation)?;
                self.end(t)
            }
        }
    }

    /// A frame of an initial copy (memory or disk) at `epoch`: only between
    /// checkpoints, and a copy keeps one epoch.
    fn base(&mut self, ty: FrameType, epoch: u64) -> Result<u64, AssembleError> {
        if self.partial.is_some() {
            return Err(AssembleError::Unexpected {
                ty,
                during: self.during(),
            });
        }
        if let Some(last) = self.last {
            // A copy in progress keeps its epoch; a new one never goes back.
            if epoch < last || (self.need_full && epoch != last) {
                return Err(AssembleError::BaseEpoch { got: epoch, last });
            }
        }
        self.last = Some(epoch);
        self.need_full = true;
        Ok(epoch)
    }

    /// The checkpoint being received, started by this frame of `epoch` if none is.
    fn receiving(&mut self, epoch: u64, generation: u64) -> Result<&mut Partial, AssembleError> {
        if self.partial.is_none() {
            if let Some(last) = self.last {
                if last.checked_add(1) != Some(epoch) {
                    return Err(AssembleError::OutOfOrder { got: epoch, last });
                }
            }
            self.partial = Some(Partial {
                epoch,
                generation,
                pages: Vec::new(),
                page_count: 0,
                state: None,
                regions: (0..self.disks).map(|_| None).collect(),
                region_bytes: 0,
                console: None,
            });
        }
        match &mut self.partial {
            Some(p) if p.epoch != epoch => Err(AssembleError::WrongEpoch {
                got: epoch,
                receiving: p.epoch,
            }),
            Some(p) => Ok(p),
            // Just set above.
            None => Err(AssembleError::Unexpected {
                ty: FrameType::Pages,
                during: "between checkpoints".to_string(),
            }),
        }
    }

    fn region(
        &mut self,
        epoch: u64,
        generation: u64,
        r: RegionChunk,
    ) -> Result<Staged, AssembleError> {
        let (disks, expected, limit) = (self.disks, self.storage, self.limits.max_region_bytes);
        let p = self.receiving(epoch, generation)?;
        let disk = r.disk;
        let slot = usize::try_from(disk)
            .ok()
            .and_then(|d| p.regions.get_mut(d))
            .ok_or(AssembleError::NoSuchDisk { disk, disks })?;
        if r.storage != expected {
            return Err(AssembleError::Storage {
                disk,
                got: r.storage,
                expected,
            });
        }
        if r.meta.epoch != epoch {
            return Err(AssembleError::RegionEpoch {
                disk,
                region: r.meta.epoch,
                epoch,
            });
        }
        let bytes: u64 = r.extents.iter().map(|e| e.data.len() as u64).sum();
        let total = p.region_bytes.saturating_add(bytes);
        if total > limit {
            return Err(AssembleError::TooMuch {
                epoch,
                what: "region bytes",
                limit,
            });
        }
        p.region_bytes = total;
        let acc = slot.get_or_insert_with(|| RegionAcc {
            meta: r.meta,
            extents: Vec::new(),
            next_sector: 0,
        });
        if acc.meta != r.meta
            || r.extents
                .first()
                .is_some_and(|e| e.sector < acc.next_sector)
        {
            return Err(AssembleError::RegionChunks { disk });
        }
        for e in r.extents {
            // The decoder checked each chunk's extents: ascending, no overflow.
            acc.next_sector = e.sector.saturating_add(e.data.len() as u64 / SECTOR_SIZE);
            acc.extents.push(e);
        }
        Ok(Staged::Nothing)
    }

    fn console(
        &mut self,
        epoch: u64,
        generation: u64,
        c: ConsoleChunk,
    ) -> Result<Staged, AssembleError> {
        let (stream_next, limit) = (self.console_next, self.limits.max_console_bytes);
        let p = self.receiving(epoch, generation)?;
        let expected = match &p.console {
            Some(held) => Some(held.offset.saturating_add(held.bytes.len() as u64)),
            None => stream_next,
        };
        if let Some(expected) = expected {
            if c.offset != expected {
                return Err(AssembleError::ConsoleGap {
                    expected,
                    got: c.offset,
                });
            }
        }
        let held = p.console.get_or_insert_with(|| ConsoleChunk {
            offset: c.offset,
            bytes: Vec::new(),
        });
        if (held.bytes.len() as u64).saturating_add(c.bytes.len() as u64) > limit {
            return Err(AssembleError::TooMuch {
                epoch,
                what: "console bytes",
                limit,
            });
        }
        held.bytes.extend_from_slice(&c.bytes);
        Ok(Staged::Nothing)
    }

    fn end(&mut self, t: Totals) -> Result<Staged, AssembleError> {
        let Some(p) = self.partial.take() else {
            return Err(AssembleError::Unexpected {
                ty: FrameType::EndOfCheckpoint,
                during: self.during(),
            });
        };
        let epoch = p.epoch;
        let Some(state) = p.state else {
            return Err(AssembleError::MissingState(epoch));
        };
        let had_console = p.console.is_some();
        let console = p.console.unwrap_or(ConsoleChunk {
            offset: self.console_next.unwrap_or(0),
            bytes: Vec::new(),
        });
        let regions: Vec<DiskRegion> = p
            .regions
            .into_iter()
            .enumerate()
            .filter_map(|(disk, acc)| {
                acc.map(|acc| DiskRegion {
                    disk,
                    content: match self.storage {
                        WireStorage::Shared => RegionContent::Meta(acc.meta),
                        WireStorage::Replicated => RegionContent::Data(Export {
                            meta: acc.meta,
                            extents: acc.extents,
                        }),
                    },
                })
            })
            .collect();
        let check = |what, announced: u64, received: u64| {
            if announced == received {
                Ok(())
            } else {
                Err(AssembleError::Totals {
                    epoch,
                    what,
                    announced,
                    received,
                })
            }
        };
        check("pages", t.pages, p.page_count)?;
        check("state bytes", t.state_len, state.len() as u64)?;
        check("regions", u64::from(t.regions), regions.len() as u64)?;
        check("console bytes", t.console_bytes, console.bytes.len() as u64)?;
        if self.need_full && !t.full {
            return Err(AssembleError::NotFull(epoch));
        }
        self.last = Some(epoch);
        self.need_full = false;
        // Only console bytes that came say where the stream stands: a session that
        // began mid-stream (a standby that joined a running guest) learns its offset
        // from the first bytes it receives, whatever the checkpoints before it held.
        if had_console {
            self.console_next = Some(console.offset.saturating_add(console.bytes.len() as u64));
        }
        Ok(Staged::Complete(Box::new(Complete {
            checkpoint: Checkpoint {
                epoch,
                full: t.full,
                state,
                pages: StagedPages::default(),
                disks: regions,
                console,
            },
            batches: p.pages,
        })))
    }
}

/// Fuzz mode bit (the input's first byte): recompute every header's CRCs before
/// decoding, so that mutated lengths, types, epochs and payloads reach the checks that
/// sit behind the CRCs (a fuzzer cannot forge a CRC32C).
pub const FUZZ_RESEAL: u8 = 1;
/// Fuzz mode bit: stage in a shared-storage session (regions carry metadata only)
/// instead of a replicated one.
pub const FUZZ_SHARED: u8 = 2;

/// Decodes any byte string as a stream of frames and stages them in an assembler for
/// a two-disk machine: every input ends in an error or a clean end, never a panic,
/// and no allocation exceeds the reader's 1 MiB bound and the assembler's (small)
/// limits. The
/// fuzz target `vmm/fuzz/fuzz_targets/frame.rs` calls this.
///
/// The first byte is the mode ([`FUZZ_RESEAL`], [`FUZZ_SHARED`]), the rest the
/// stream. Besides not panicking, it asserts that every frame the reader accepts
/// re-encodes to a frame that decodes to the same value (for the fixed binary
/// layouts, to the very same bytes), and that every checkpoint the assembler completes
/// is within its limits and made of what the session allows.
pub fn fuzz(data: &[u8]) {
    let Some((&mode, stream)) = data.split_first() else {
        return;
    };
    let mut hello = fuzz_hello();
    if mode & FUZZ_SHARED != 0 {
        hello.storage = WireStorage::Shared;
    }
    // Small enough that short inputs reach them (16 pages, 16 sectors, 1 KiB).
    let limits = AssemblerLimits {
        max_pages: 16,
        max_region_bytes: 8 << 10,
        max_console_bytes: 1 << 10,
    };
    let mut assembler = CheckpointAssembler::new(&hello, limits);
    let mut bytes = stream.to_vec();
    if mode & FUZZ_RESEAL != 0 {
        reseal_stream(&mut bytes);
    }
    let mut reader = FrameReader::with_max_payload(&bytes[..], 1 << 20);
    let consumed = reader.bytes_read();
    let mut at = 0usize;
    while let Ok(Some(frame)) = reader.read_frame() {
        let end = crate::arch::to_usize(consumed.load(std::sync::atomic::Ordering::Relaxed));
        fuzz_check_round_trip(&frame, reader.version(), &bytes[at..end]);
        at = end;
        if let Ok(Staged::Complete(c)) = assembler.push(frame) {
            let mut c = *c;
            c.join_pages();
            fuzz_check_complete(&c.checkpoint, &hello, &limits, assembler.last_epoch());
        }
    }
}

/// Recomputes the payload CRC and the header CRC of every frame in `bytes`, as the
/// headers' payload lengths lay the frames out (a last payload may be cut short).
fn reseal_stream(bytes: &mut [u8]) {
    let mut at = 0usize;
    while let Some(end) = at.checked_add(HEADER_LEN).filter(|e| *e <= bytes.len()) {
        let (head, rest) = bytes[at..].split_at_mut(HEADER_LEN);
        let Ok(h) = RawHeader::mut_from_bytes(head) else {
            return;
        };
        let len = crate::arch::to_usize(u64::from(h.payload_len.get()));
        let payload = &rest[..len.min(rest.len())];
        h.payload_crc = U32::new(crc32c::crc32c(payload));
        h.seal();
        match end.checked_add(len) {
            Some(next) => at = next,
            None => return,
        }
    }
}

/// Re-encodes a decoded frame (in `version`, the one it was read in) and decodes it
/// again: it must be the same frame, and for the raw binary layouts (all but the
/// postcard payloads, whose varints have more than one spelling, and packed page
/// batches, whose lz4 blocks have more than one too) the same bytes as `wire`, the
/// frame as it was read.
fn fuzz_check_round_trip(frame: &Frame, version: u16, wire: &[u8]) {
    let mut w = FrameWriter::new(Vec::new(), frame.generation);
    w.set_version(version);
    if let Err(e) = w.write(frame.epoch, &frame.body) {
        panic!("a frame the reader accepted does not encode: {e}: {frame:?}");
    }
    let out = w.into_inner();
    match FrameReader::new(&out[..]).read_frame() {
        Ok(Some(again)) => assert_eq!(&again, frame, "a re-encoded frame decodes otherwise"),
        other => panic!("a re-encoded frame does not decode: {other:?}"),
    }
    let postcard = matches!(
        frame.body,
        Body::Hello(_) | Body::HelloAck(_) | Body::Shutdown(_)
    );
    let packed = wire.get(8..12) != Some(&[0u8; 4][..]);
    if !postcard && !packed {
        assert_eq!(out, wire, "a decoded frame re-encodes to other bytes");
    }
}

/// Checks a checkpoint the assembler completed against the session and the limits.
fn fuzz_check_complete(c: &Checkpoint, hello: &Hello, limits: &AssemblerLimits, last: Option<u64>) {
    assert_eq!(
        last,
        Some(c.epoch),
        "the completed epoch is not the last one"
    );
    assert!(c.pages.len() as u64 <= limits.max_pages, "too many pages");
    assert_eq!(c.pages.addrs.len() * PAGE_SIZE, c.pages.data.len());
    assert!(c.console.bytes.len() as u64 <= limits.max_console_bytes);
    let mut region_bytes = 0u64;
    let mut disks = c.disks.iter().map(|d| d.disk).peekable();
    while let Some(d) = disks.next() {
        assert!(d < hello.manifest.disks.len(), "a region for disk {d}");
        assert!(
            disks.peek().is_none_or(|n| *n > d),
            "regions not in disk order"
        );
    }
    for d in &c.disks {
        match (&d.content, hello.storage) {
            (RegionContent::Meta(m), WireStorage::Shared) => assert_eq!(m.epoch, c.epoch),
            (RegionContent::Data(e), WireStorage::Replicated) => {
                assert_eq!(e.meta.epoch, c.epoch);
                let mut next = 0u64;
                for x in &e.extents {
                    assert!(x.sector >= next, "extents out of order");
                    assert!(!x.data.is_empty() && x.data.len() as u64 % SECTOR_SIZE == 0);
                    next = x.sector + x.data.len() as u64 / SECTOR_SIZE;
                    region_bytes += x.data.len() as u64;
                }
            }
            (content, storage) => panic!("{content:?} region in a {storage:?} session"),
        }
    }
    assert!(
        region_bytes <= limits.max_region_bytes,
        "too many region bytes"
    );
}

/// The session [`fuzz`] and the tests assume: 1 MiB of memory, two disks, replicated.
fn fuzz_hello() -> Hello {
    let disk = |n: &str| crate::checkpoint::DiskManifest {
        config: crate::config::DiskConfig {
            checkpoint: true,
            ..crate::config::DiskConfig::new(n)
        },
        size: 1 << 20,
        journal_id: Some(7),
        region_size: Some(2 << 20),
    };
    Hello {
        protocol_version: VERSION,
        manifest: Manifest {
            memory: 1 << 20,
            cpus: 1,
            cmdline: String::new(),
            disks: vec![disk("a.img"), disk("b.img")],
            cpu: Default::default(),
        },
        storage: WireStorage::Replicated,
        lineage: 0x5eed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GEN: u64 = 3;

    fn meta(epoch: u64) -> RegionMeta {
        RegionMeta {
            epoch,
            parent_epoch: epoch - 1,
            slot: 1,
            generation: 9,
            records: 2,
            used_bytes: 4096,
            sectors: 3,
            acknowledged: false,
        }
    }

    fn pages(addrs: &[u64]) -> StagedPages {
        let mut data = vec![0u8; addrs.len() * PAGE_SIZE];
        for (i, a) in addrs.iter().enumerate() {
            data[i * PAGE_SIZE] = (*a / PAGE).to_le_bytes()[0];
            data[i * PAGE_SIZE + PAGE_SIZE - 1] = 0x5a;
        }
        StagedPages {
            addrs: addrs.to_vec(),
            data,
        }
    }

    fn checkpoint(epoch: u64) -> (Checkpoint, ConsoleChunk) {
        let c = Checkpoint {
            epoch,
            full: false,
            state: vec![epoch.to_le_bytes()[0]; 100],
            pages: pages(&[0, 3 * PAGE, 17 * PAGE]),
            console: ConsoleChunk::default(),
            disks: vec![DiskRegion {
                disk: 1,
                content: RegionContent::Data(Export {
                    meta: meta(epoch),
                    extents: vec![
                        ExportExtent {
                            sector: 2,
                            data: vec![1; 1024],
                        },
                        ExportExtent {
                            sector: 10,
                            data: vec![2; 512],
                        },
                    ],
                }),
            }],
        };
        let console = ConsoleChunk {
            offset: 100 * (epoch - 1),
            bytes: vec![b'x'; 100],
        };
        (c, console)
    }

    fn encode_checkpoint(c: &Checkpoint, console: &ConsoleChunk) -> Vec<u8> {
        let mut w = FrameWriter::new(Vec::new(), GEN);
        w.write_checkpoint_with(c, console).unwrap();
        w.into_inner()
    }

    fn read_all(bytes: &[u8]) -> Result<Vec<Frame>, FrameError> {
        let mut r = FrameReader::new(bytes);
        let mut out = Vec::new();
        while let Some(f) = r.read_frame()? {
            out.push(f);
        }
        Ok(out)
    }

    fn assembler() -> CheckpointAssembler {
        CheckpointAssembler::new(
            &fuzz_hello(),
            AssemblerLimits::for_manifest(&fuzz_hello().manifest),
        )
    }

    fn assemble(
        a: &mut CheckpointAssembler,
        frames: Vec<Frame>,
    ) -> Result<Vec<Complete>, AssembleError> {
        let mut done = Vec::new();
        for f in frames {
            if let Staged::Complete(c) = a.push(f)? {
                let mut c = *c;
                c.join_pages();
                done.push(c);
            }
        }
        Ok(done)
    }

    fn same(a: &Checkpoint, b: &Checkpoint) {
        assert_eq!(a.epoch, b.epoch);
        assert_eq!(a.full, b.full);
        assert_eq!(a.state, b.state);
        assert_eq!(a.pages, b.pages);
        assert_eq!(a.disks, b.disks);
    }

    fn every_body() -> Vec<Body> {
        vec![
            Body::Hello(fuzz_hello()),
            Body::HelloAck(HelloAck::Accept),
            Body::HelloAck(HelloAck::Refuse {
                reason: RefuseReason::Machine,
                detail: "memory differs".into(),
            }),
            Body::Base(pages(&[PAGE, 2 * PAGE])),
            Body::Pages(pages(&[0])),
            Body::Pages(StagedPages::default()),
            Body::State(vec![1, 2, 3]),
            Body::Region(RegionChunk {
                disk: 1,
                storage: WireStorage::Replicated,
                meta: meta(5),
                extents: vec![ExportExtent {
                    sector: 4,
                    data: vec![7; 1536],
                }],
            }),
            Body::Region(RegionChunk {
                disk: 0,
                storage: WireStorage::Shared,
                meta: meta(5),
                extents: vec![],
            }),
            Body::Console(ConsoleChunk {
                offset: 12,
                bytes: b"hello".to_vec(),
            }),
            Body::EndOfCheckpoint(Totals {
                pages: 1,
                state_len: 3,
                console_bytes: 5,
                regions: 1,
                full: true,
            }),
            Body::Ack,
            Body::Heartbeat,
            Body::Shutdown(Shutdown::Finished {
                exit_status: 3,
                how: "guest exit 3".into(),
            }),
            Body::Shutdown(Shutdown::Stopped { exit_status: 130 }),
            Body::Shutdown(Shutdown::Abandoned),
            Body::DiskBase(DiskChunk {
                disk: 1,
                offset: 4096,
                data: vec![9; 1024],
            }),
            Body::Join(Join {
                role: JoinRole::Liveness,
                token: 0xfeed,
            }),
            Body::Holdings(Holdings {
                replica: Some(ReplicaId {
                    lineage: 3,
                    epoch: 77,
                }),
                disks: vec![Digest {
                    chunk: MIN_DIGEST_CHUNK,
                    hashes: vec![[5; DIGEST_LEN], [6; DIGEST_LEN]],
                }],
                listen: Some("10.0.0.2:7000".into()),
            }),
            Body::Shutdown(Shutdown::Handover),
            Body::CopyPlan(CopyPlan {
                memory: Some(ReplicaId {
                    lineage: 3,
                    epoch: 77,
                }),
            }),
            Body::CopyPlan(CopyPlan { memory: None }),
        ]
    }

    #[test]
    fn every_frame_type_round_trips() {
        let bodies = every_body();
        let mut w = FrameWriter::new(Vec::new(), GEN);
        for (i, b) in bodies.iter().enumerate() {
            w.write(i as u64, b).unwrap();
        }
        let frames = read_all(&w.into_inner()).unwrap();
        assert_eq!(frames.len(), bodies.len());
        for (i, (f, b)) in frames.iter().zip(&bodies).enumerate() {
            assert_eq!(f.epoch, i as u64);
            assert_eq!(f.generation, GEN);
            assert_eq!(&f.body, b);
        }
        let types: std::collections::HashSet<FrameType> =
            bodies.iter().map(Body::frame_type).collect();
        assert_eq!(types.len(), FrameType::ALL.len());
    }

    #[test]
    fn header_layout_is_pinned() {
        let mut w = FrameWriter::new(Vec::new(), 0x0102);
        w.write(0x0a0b, &Body::Heartbeat).unwrap();
        let b = w.into_inner();
        assert_eq!(b.len(), HEADER_LEN);
        assert_eq!(&b[0..4], b"MVRP");
        assert_eq!(&b[4..6], &VERSION.to_le_bytes());
        assert_eq!(&b[6..8], &10u16.to_le_bytes());
        assert_eq!(&b[8..16], &[0; 8]);
        assert_eq!(&b[16..24], &0x0a0bu64.to_le_bytes());
        assert_eq!(&b[24..32], &0x0102u64.to_le_bytes());
        assert_eq!(&b[32..36], &crc32c::crc32c(&[]).to_le_bytes());
        assert_eq!(&b[36..40], &crc32c::crc32c(&b[..36]).to_le_bytes());
    }

    #[test]
    fn a_checkpoint_stream_assembles() {
        let mut a = assembler();
        for epoch in 1..=3 {
            let (c, console) = checkpoint(epoch);
            let done =
                assemble(&mut a, read_all(&encode_checkpoint(&c, &console)).unwrap()).unwrap();
            assert_eq!(done.len(), 1);
            same(&done[0].checkpoint, &c);
            assert_eq!(done[0].checkpoint.console, console);
        }
        assert_eq!(a.last_epoch(), Some(3));
    }

    #[test]
    fn large_batches_and_regions_are_split_and_rejoined() {
        let addrs: Vec<u64> = (0..(u64::from(MAX_BATCH_PAGES) + 5))
            .map(|i| i * PAGE)
            .collect();
        let (mut c, console) = checkpoint(1);
        c.pages = pages(&addrs);
        let big = vec![3u8; (MAX_PAYLOAD as usize) + 4096];
        c.disks = vec![DiskRegion {
            disk: 0,
            content: RegionContent::Data(Export {
                meta: meta(1),
                extents: vec![ExportExtent {
                    sector: 0,
                    data: big,
                }],
            }),
        }];
        let frames = read_all(&encode_checkpoint(&c, &console)).unwrap();
        let n = |t: FrameType| frames.iter().filter(|f| f.body.frame_type() == t).count();
        assert_eq!(n(FrameType::Pages), 2);
        assert!(n(FrameType::Region) >= 3);
        let mut a = CheckpointAssembler::new(
            &fuzz_hello(),
            AssemblerLimits {
                max_pages: 4096,
                max_region_bytes: 64 << 20,
                max_console_bytes: 1 << 20,
            },
        );
        let done = assemble(&mut a, frames).unwrap();
        assert_eq!(done[0].checkpoint.pages, c.pages);
        // The one extent comes back as adjacent pieces holding the same sectors.
        let RegionContent::Data(e) = &done[0].checkpoint.disks[0].content else {
            panic!("data expected");
        };
        let joined: Vec<u8> = e.extents.iter().flat_map(|x| x.data.clone()).collect();
        assert_eq!(joined.len(), MAX_PAYLOAD as usize + 4096);
        let mut next = 0;
        for x in &e.extents {
            assert_eq!(x.sector, next);
            next += x.data.len() as u64 / SECTOR_SIZE;
        }
    }

    fn valid_stream() -> Vec<u8> {
        let mut w = FrameWriter::new(Vec::new(), GEN);
        w.write_base(0, &pages(&[0, PAGE])).unwrap();
        let mut bytes = w.into_inner();
        let (mut c, console) = checkpoint(1);
        c.full = true;
        bytes.extend(encode_checkpoint(&c, &console));
        let (c, console) = checkpoint(2);
        bytes.extend(encode_checkpoint(&c, &console));
        let mut w = FrameWriter::new(bytes, GEN);
        w.write(2, &Body::Shutdown(Shutdown::Stopped { exit_status: 130 }))
            .unwrap();
        w.into_inner()
    }

    #[test]
    fn truncation_at_every_byte_is_an_error_never_a_panic() {
        let bytes = valid_stream();
        let all = read_all(&bytes).unwrap();
        let mut boundaries = vec![0usize];
        let mut w = FrameWriter::new(Vec::new(), GEN);
        for f in &all {
            w.write(f.epoch, &f.body).unwrap();
            boundaries.push(w.get_ref().len());
        }
        assert_eq!(w.get_ref(), &bytes, "re-encoding is byte-identical");
        for cut in 0..bytes.len() {
            let r = read_all(&bytes[..cut]);
            if boundaries.contains(&cut) {
                assert!(r.is_ok(), "cut at boundary {cut}");
            } else {
                assert!(
                    matches!(r, Err(FrameError::Truncated { .. })),
                    "cut at {cut}: {r:?}"
                );
            }
        }
    }

    fn heartbeat_bytes() -> Vec<u8> {
        let mut w = FrameWriter::new(Vec::new(), GEN);
        w.write(1, &Body::State(vec![1, 2, 3, 4])).unwrap();
        w.into_inner()
    }

    fn reseal(b: &mut [u8]) {
        let crc = crc32c::crc32c(&b[..36]);
        b[36..40].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn corrupt_headers_and_payloads_are_refused() {
        let good = heartbeat_bytes();

        let mut b = good.clone();
        b[0] = b'X';
        assert!(matches!(read_all(&b), Err(FrameError::BadMagic(_))));

        let mut b = good.clone();
        b[20] ^= 1; // epoch
        assert!(matches!(read_all(&b), Err(FrameError::HeaderCrc(_))));

        let mut b = good.clone();
        b[HEADER_LEN + 1] ^= 1;
        assert!(matches!(
            read_all(&b),
            Err(FrameError::PayloadCrc {
                ty: FrameType::State,
                ..
            })
        ));

        let mut b = good.clone();
        b[4..6].copy_from_slice(&(VERSION + 1).to_le_bytes());
        let e = read_all(&b).unwrap_err();
        assert!(matches!(e, FrameError::Version { got, .. } if got == VERSION + 1));
        assert!(e.to_string().contains(&format!("version {}", VERSION + 1)));
        let mut b = good.clone();
        b[4..6].copy_from_slice(&(OLDEST_VERSION - 1).to_le_bytes());
        reseal(&mut b);
        let e = read_all(&b).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "protocol version {}; this mirrorvm speaks versions {OLDEST_VERSION} to {VERSION}",
                OLDEST_VERSION - 1
            )
        );

        let mut b = good.clone();
        b[6..8].copy_from_slice(&99u16.to_le_bytes());
        reseal(&mut b);
        assert!(matches!(read_all(&b), Err(FrameError::UnknownType(99))));

        let mut b = good.clone();
        b[8] = 1;
        reseal(&mut b);
        assert!(matches!(
            read_all(&b),
            Err(FrameError::Flags { flags: 1, .. })
        ));

        for garbage in [&[0u8; 100][..], &[0xff; 7][..], b"GET / HTTP/1.1\r\n\r\n"] {
            assert!(read_all(garbage).is_err());
        }
    }

    #[test]
    fn huge_lengths_are_refused_before_allocating() {
        for (ty, max) in [
            (FrameType::State, MAX_PAYLOAD),
            (FrameType::Pages, FrameType::Pages.max_payload()),
            (FrameType::Hello, MAX_CONTROL_PAYLOAD),
            (FrameType::Ack, 0),
        ] {
            let mut b = heartbeat_bytes();
            b[6..8].copy_from_slice(&ty.code().to_le_bytes());
            b[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
            reseal(&mut b);
            // Only the header is there: a reader that allocated and read would report
            // truncation instead.
            let e = read_all(&b[..HEADER_LEN]).unwrap_err();
            assert!(
                matches!(e, FrameError::TooLarge { ty: t, len, max: m } if t == ty && len == u64::from(u32::MAX) && m == max),
                "{e:?}"
            );
            assert!(e.to_string().contains(&format!("bound of {max} bytes")));
        }
        // The reader's own bound applies below the type's.
        let hb = heartbeat_bytes();
        let mut r = FrameReader::with_max_payload(&hb[..], 3);
        assert!(matches!(
            r.read_frame(),
            Err(FrameError::TooLarge { max: 3, .. })
        ));
        // A writer refuses what a reader would.
        let mut w = FrameWriter::new(Vec::new(), 0);
        let e = w
            .write(1, &Body::State(vec![0; MAX_PAYLOAD as usize + 1]))
            .unwrap_err();
        assert!(matches!(e, FrameError::TooLarge { .. }));
        assert!(w.get_ref().is_empty());
    }

    #[test]
    fn malformed_payloads_are_refused() {
        let frame = |ty: FrameType, payload: &[u8]| {
            let mut h = RawHeader {
                magic: MAGIC,
                version: U16::new(VERSION),
                frame_type: U16::new(ty.code()),
                flags: U32::ZERO,
                payload_len: U32::new(u32::try_from(payload.len()).unwrap()),
                epoch: U64::new(1),
                generation: U64::new(GEN),
                payload_crc: U32::new(crc32c::crc32c(payload)),
                crc: U32::ZERO,
            };
            h.seal();
            let mut b = h.as_bytes().to_vec();
            b.extend_from_slice(payload);
            read_all(&b).unwrap_err()
        };
        let cause = |e: FrameError| match e {
            FrameError::Malformed { cause, .. } => cause,
            other => panic!("{other:?}"),
        };
        // Pages: count × 4104 + 8 must be the length.
        let mut p = 2u32.to_le_bytes().to_vec();
        p.extend([0; 4]);
        p.extend(vec![0; 8 + 4096]);
        assert!(matches!(
            cause(frame(FrameType::Pages, &p)),
            Malformed::PageCount { count: 2, .. }
        ));
        let mut p = 1u32.to_le_bytes().to_vec();
        p.extend([0; 4]);
        p.extend(5u64.to_le_bytes());
        p.extend(vec![0; 4096]);
        assert_eq!(
            cause(frame(FrameType::Pages, &p)),
            Malformed::UnalignedPage(5)
        );
        let mut p = (MAX_BATCH_PAGES + 1).to_le_bytes().to_vec();
        p.extend([0; 4]);
        assert!(matches!(
            cause(frame(FrameType::Base, &p)),
            Malformed::BatchTooLarge(_)
        ));
        // Region: an extent count far beyond the payload.
        let mut w = FrameWriter::new(Vec::new(), GEN);
        let Body::Region(r) = &every_body()[7] else {
            unreachable!()
        };
        w.write(1, &Body::Region(r.clone())).unwrap();
        let mut p = w.into_inner()[HEADER_LEN..].to_vec();
        p[56..60].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            cause(frame(FrameType::Region, &p)),
            Malformed::Short { .. }
        ));
        p[56..60].copy_from_slice(&0u32.to_le_bytes());
        assert!(matches!(
            cause(frame(FrameType::Region, &p)),
            Malformed::Trailing(_)
        ));
        p[56..60].copy_from_slice(&1u32.to_le_bytes());
        p[72..76].copy_from_slice(&100u32.to_le_bytes());
        assert!(matches!(
            cause(frame(FrameType::Region, &p)),
            Malformed::ExtentLen { len: 100, .. }
        ));
        // Others.
        assert!(matches!(
            cause(frame(FrameType::EndOfCheckpoint, &[0; 31])),
            Malformed::Short { .. }
        ));
        let mut end = [0u8; 32];
        end[28] = 2;
        assert_eq!(
            cause(frame(FrameType::EndOfCheckpoint, &end)),
            Malformed::EndFlags(2)
        );
        assert!(matches!(
            cause(frame(FrameType::Console, &[1, 2])),
            Malformed::Short { .. }
        ));
        assert!(matches!(
            cause(frame(FrameType::Hello, &[0xff; 9])),
            Malformed::Decode(_)
        ));
        assert!(matches!(
            cause(frame(FrameType::Shutdown, &[1, 0, 0])),
            Malformed::Trailing(1)
        ));
        assert!(matches!(
            frame(FrameType::Heartbeat, &[0]),
            FrameError::TooLarge { max: 0, .. }
        ));
        // DiskBase: a head, then whole sectors at a sector offset.
        let disk_chunk = |offset: u64, len: usize, reserved: u8| {
            let mut p = vec![0u8; 16 + len];
            p[4] = reserved;
            p[8..16].copy_from_slice(&offset.to_le_bytes());
            cause(frame(FrameType::DiskBase, &p))
        };
        assert!(matches!(disk_chunk(0, 0, 0), Malformed::DiskChunk { .. }));
        assert!(matches!(disk_chunk(0, 100, 0), Malformed::DiskChunk { .. }));
        assert!(matches!(disk_chunk(7, 512, 0), Malformed::DiskChunk { .. }));
        assert!(matches!(
            disk_chunk(u64::MAX - 511, 512, 0),
            Malformed::DiskChunk { .. }
        ));
        assert_eq!(disk_chunk(0, 512, 1), Malformed::Reserved);
        assert!(matches!(
            cause(frame(FrameType::DiskBase, &[0; 8])),
            Malformed::Short { .. }
        ));
    }

    fn frames_of(epoch: u64) -> Vec<Frame> {
        let (c, console) = checkpoint(epoch);
        read_all(&encode_checkpoint(&c, &console)).unwrap()
    }

    #[test]
    fn a_session_joined_mid_stream_takes_the_console_offset_it_first_sees() {
        // A standby that joined a running guest: its first checkpoints carry no
        // console bytes, then bytes at the stream's offset (not 0) arrive.
        let mut a = assembler();
        for epoch in 1..=2 {
            let (c, _) = checkpoint(epoch);
            let frames = read_all(&encode_checkpoint(&c, &ConsoleChunk::default())).unwrap();
            assemble(&mut a, frames).unwrap();
        }
        let (c, _) = checkpoint(3);
        let late = ConsoleChunk {
            offset: 830,
            bytes: b"mix: memory: 7 s".to_vec(),
        };
        let done = assemble(&mut a, read_all(&encode_checkpoint(&c, &late)).unwrap()).unwrap();
        assert_eq!(done[0].checkpoint.console, late);
        // From then on the stream must continue where those bytes ended.
        let (c, _) = checkpoint(4);
        let gap = ConsoleChunk {
            offset: 900,
            bytes: b"x".to_vec(),
        };
        assert_eq!(
            assemble(&mut a, read_all(&encode_checkpoint(&c, &gap)).unwrap()).unwrap_err(),
            AssembleError::ConsoleGap {
                expected: 846,
                got: 900
            }
        );
    }

    #[test]
    fn epochs_must_follow_one_another() {
        let mut a = assembler();
        assemble(&mut a, frames_of(1)).unwrap();
        let e = assemble(&mut a, frames_of(3)).unwrap_err();
        assert_eq!(e, AssembleError::OutOfOrder { got: 3, last: 1 });
        let e = assemble(&mut a, frames_of(1)).unwrap_err();
        assert_eq!(e, AssembleError::OutOfOrder { got: 1, last: 1 });
        // A frame of another epoch inside checkpoint 2 discards it.
        let mut two = frames_of(2);
        let end = two.pop().unwrap();
        let mut stray = frames_of(3).remove(0);
        stray.epoch = 3;
        two.push(stray);
        assert_eq!(
            assemble(&mut a, two).unwrap_err(),
            AssembleError::WrongEpoch {
                got: 3,
                receiving: 2
            }
        );
        assert!(!a.is_receiving());
        // The End alone is then a checkpoint without its state.
        assert_eq!(
            assemble(&mut a, vec![end]).unwrap_err(),
            AssembleError::MissingState(2)
        );
        // Whole, it is fine; the console continues where 1 ended.
        let done = assemble(&mut a, frames_of(2)).unwrap();
        assert_eq!(done[0].checkpoint.epoch, 2);
    }

    #[test]
    fn totals_that_disagree_discard_the_checkpoint() {
        for (what, change) in [
            ("pages", 0usize),
            ("state bytes", 1),
            ("console bytes", 2),
            ("regions", 3),
        ] {
            let mut a = assembler();
            let mut f = frames_of(1);
            let Some(Frame {
                body: Body::EndOfCheckpoint(t),
                ..
            }) = f.last_mut()
            else {
                panic!("end expected");
            };
            match change {
                0 => t.pages += 1,
                1 => t.state_len -= 1,
                2 => t.console_bytes = 0,
                _ => t.regions = 2,
            }
            let e = assemble(&mut a, f).unwrap_err();
            assert!(
                matches!(e, AssembleError::Totals { what: w, epoch: 1, .. } if w == what),
                "{e:?}"
            );
            assert_eq!(a.last_epoch(), None);
            assert!(!a.is_receiving());
        }
    }

    #[test]
    fn out_of_place_frames_are_errors() {
        let mut a = assembler();
        let mut f = frames_of(1);
        // A second State.
        let state = f
            .iter()
            .find(|x| x.body.frame_type() == FrameType::State)
            .cloned()
            .unwrap();
        f.insert(1, state);
        assert_eq!(
            assemble(&mut a, f).unwrap_err(),
            AssembleError::DuplicateState(1)
        );
        // Shutdown inside a checkpoint: an error; between checkpoints: the end.
        let mut f = frames_of(1);
        let end = f.pop().unwrap();
        let shutdown = Frame {
            epoch: 1,
            generation: GEN,
            body: Body::Shutdown(Shutdown::Stopped { exit_status: 130 }),
        };
        f.push(shutdown.clone());
        f.push(end);
        assert!(matches!(
            assemble(&mut a, f),
            Err(AssembleError::Unexpected {
                ty: FrameType::Shutdown,
                ..
            })
        ));
        assert!(matches!(
            a.push(shutdown),
            Ok(Staged::Shutdown(Shutdown::Stopped { exit_status: 130 }))
        ));
        // Heartbeats anywhere are ignored.
        let mut f = frames_of(1);
        f.insert(
            2,
            Frame {
                epoch: 0,
                generation: GEN,
                body: Body::Heartbeat,
            },
        );
        assert_eq!(assemble(&mut a, f).unwrap().len(), 1);
        // Hello or Ack in the stream.
        let hello = Frame {
            epoch: 0,
            generation: GEN,
            body: Body::Hello(fuzz_hello()),
        };
        assert!(matches!(
            a.push(hello),
            Err(AssembleError::Unexpected { .. })
        ));
        // A stale generation, and a generation change mid-checkpoint.
        let mut f = frames_of(2);
        f[0].generation = GEN - 1;
        assert_eq!(
            assemble(&mut a, f).unwrap_err(),
            AssembleError::StaleGeneration {
                got: GEN - 1,
                current: GEN
            }
        );
        let mut f = frames_of(2);
        f[1].generation = GEN + 1;
        assert!(matches!(
            assemble(&mut a, f),
            Err(AssembleError::GenerationChanged { .. })
        ));
        // A region for a disk the machine lacks, or of the wrong storage mode.
        let mut f = frames_of(2);
        for x in &mut f {
            if let Body::Region(r) = &mut x.body {
                r.disk = 2;
            }
        }
        assert!(matches!(
            assemble(&mut a, f),
            Err(AssembleError::NoSuchDisk { disk: 2, disks: 2 })
        ));
        let mut f = frames_of(2);
        for x in &mut f {
            if let Body::Region(r) = &mut x.body {
                r.meta.epoch = 1;
            }
        }
        assert!(matches!(
            assemble(&mut a, f),
            Err(AssembleError::RegionEpoch { .. })
        ));
        // A console gap.
        let mut f = frames_of(2);
        for x in &mut f {
            if let Body::Console(c) = &mut x.body {
                c.offset += 1;
            }
        }
        assert_eq!(
            assemble(&mut a, f).unwrap_err(),
            AssembleError::ConsoleGap {
                expected: 100,
                got: 101
            }
        );
        assert_eq!(assemble(&mut a, frames_of(2)).unwrap().len(), 1);
    }

    #[test]
    fn region_chunks_that_disagree_discard_the_checkpoint() {
        let chunk = |sector: u64, meta: RegionMeta| Frame {
            epoch: 1,
            generation: GEN,
            body: Body::Region(RegionChunk {
                disk: 1,
                storage: WireStorage::Replicated,
                meta,
                extents: vec![ExportExtent {
                    sector,
                    data: vec![1; 1024],
                }],
            }),
        };
        // Sectors 2-3, then a chunk starting inside them.
        let mut a = assembler();
        a.push(chunk(2, meta(1))).unwrap();
        assert_eq!(
            a.push(chunk(3, meta(1))).unwrap_err(),
            AssembleError::RegionChunks { disk: 1 }
        );
        assert!(!a.is_receiving());
        // Other metadata in a later chunk.
        let mut other = meta(1);
        other.records += 1;
        a.push(chunk(2, meta(1))).unwrap();
        assert_eq!(
            a.push(chunk(10, other)).unwrap_err(),
            AssembleError::RegionChunks { disk: 1 }
        );
        // Adjacent chunks that agree are one region.
        a.push(chunk(2, meta(1))).unwrap();
        a.push(chunk(4, meta(1))).unwrap();
        assert!(a.is_receiving());
    }

    #[test]
    fn a_base_copy_must_be_completed_by_a_full_checkpoint() {
        let mut a = assembler();
        let base = Frame {
            epoch: 0,
            generation: GEN,
            body: Body::Base(pages(&[0])),
        };
        assert!(matches!(
            a.push(base.clone()),
            Ok(Staged::Base { epoch: 0, .. })
        ));
        assert!(matches!(a.push(base), Ok(Staged::Base { .. })));
        let other = Frame {
            epoch: 1,
            generation: GEN,
            body: Body::Base(pages(&[0])),
        };
        assert_eq!(
            a.push(other).unwrap_err(),
            AssembleError::BaseEpoch { got: 1, last: 0 }
        );
        assert_eq!(
            assemble(&mut a, frames_of(1)).unwrap_err(),
            AssembleError::NotFull(1)
        );
        let (mut c, console) = checkpoint(1);
        c.full = true;
        let done = assemble(&mut a, read_all(&encode_checkpoint(&c, &console)).unwrap()).unwrap();
        assert!(done[0].checkpoint.full);
        // Too many pages for the machine.
        let mut f = frames_of(2);
        if let Body::Pages(p) = &mut f[0].body {
            *p = pages(&(0..300).map(|i| i * PAGE).collect::<Vec<_>>());
        }
        assert!(matches!(
            assemble(&mut a, f),
            Err(AssembleError::TooMuch {
                what: "pages",
                limit: 256,
                ..
            })
        ));
    }

    #[test]
    fn shared_storage_carries_region_metadata() {
        let mut hello = fuzz_hello();
        hello.storage = WireStorage::Shared;
        let mut a =
            CheckpointAssembler::new(&hello, AssemblerLimits::for_manifest(&hello.manifest));
        let (mut c, console) = checkpoint(1);
        c.disks = vec![DiskRegion {
            disk: 0,
            content: RegionContent::Meta(meta(1)),
        }];
        let done = assemble(&mut a, read_all(&encode_checkpoint(&c, &console)).unwrap()).unwrap();
        same(&done[0].checkpoint, &c);
        // Data in a shared session is refused.
        let e = assemble(&mut a, frames_of(2)).unwrap_err();
        assert!(matches!(
            e,
            AssembleError::Storage {
                expected: WireStorage::Shared,
                ..
            }
        ));
    }

    #[test]
    fn fuzz_entry_survives_mutated_streams() {
        let stream = valid_stream();
        fuzz(&[]);
        fuzz(&[0]);
        for mode in [0, FUZZ_RESEAL, FUZZ_SHARED, FUZZ_RESEAL | FUZZ_SHARED] {
            let mut bytes = vec![mode];
            bytes.extend_from_slice(&stream);
            fuzz(&bytes);
        }
        let mut bytes = vec![FUZZ_RESEAL];
        bytes.extend_from_slice(&stream);
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..300 {
            let mut b = bytes.clone();
            for _ in 0..(next() % 8 + 1) {
                // Byte 0 is the mode: mutate the stream only.
                let i = 1 + crate::arch::to_usize(next() % (b.len() as u64 - 1));
                match next() % 3 {
                    0 => b[i] ^= 1 << (next() % 8),
                    1 => b.truncate(i),
                    _ => b[i] = 0xff,
                }
                if b.len() < 2 {
                    break;
                }
            }
            fuzz(&b);
        }
    }

    /// A small session for the fuzz seeds: a one-page base copy with a disk base
    /// chunk, the full checkpoint 1 that completes it and checkpoint 2 (one page each,
    /// a two-extent region, in two chunks in checkpoint 2 when replicated, console
    /// bytes), heartbeats, and an orderly shutdown.
    fn seed_session(storage: WireStorage) -> Vec<u8> {
        let mut w = FrameWriter::new(Vec::new(), GEN);
        w.write_base(0, &pages(&[2 * PAGE])).unwrap();
        w.write(
            0,
            &Body::DiskBase(DiskChunk {
                disk: 0,
                offset: 1024,
                data: vec![4; 512],
            }),
        )
        .unwrap();
        for epoch in 1..=2 {
            let (mut c, console) = checkpoint(epoch);
            c.full = epoch == 1;
            c.pages = pages(&[epoch * PAGE]);
            if storage == WireStorage::Shared {
                c.disks = vec![DiskRegion {
                    disk: 0,
                    content: RegionContent::Meta(meta(epoch)),
                }];
            }
            if epoch == 1 || storage == WireStorage::Shared {
                w.write_checkpoint_with(&c, &console).unwrap();
            } else {
                // Its region in two chunks, one extent each, as a large one travels.
                let RegionContent::Data(e) = &c.disks[0].content else {
                    unreachable!()
                };
                w.write(epoch, &Body::Pages(c.pages.clone())).unwrap();
                for x in &e.extents {
                    let chunk = RegionChunk {
                        disk: 1,
                        storage,
                        meta: e.meta,
                        extents: vec![x.clone()],
                    };
                    w.write(epoch, &Body::Region(chunk)).unwrap();
                }
                w.write(epoch, &Body::Console(console.clone())).unwrap();
                w.write(epoch, &Body::State(c.state.clone())).unwrap();
                let end = Totals {
                    pages: 1,
                    state_len: c.state.len() as u64,
                    console_bytes: console.bytes.len() as u64,
                    regions: 1,
                    full: false,
                };
                w.write(epoch, &Body::EndOfCheckpoint(end)).unwrap();
            }
            w.write(epoch, &Body::Heartbeat).unwrap();
        }
        w.write(2, &Body::Shutdown(Shutdown::Stopped { exit_status: 130 }))
            .unwrap();
        w.into_inner()
    }

    /// The seed corpus of the `frame` fuzz target (`vmm/fuzz/corpus/frame`): the
    /// mode byte of [`fuzz`], then the stream.
    fn fuzz_seeds() -> Vec<(&'static str, Vec<u8>)> {
        let mut every = FrameWriter::new(Vec::new(), GEN);
        for (i, b) in every_body().iter().enumerate() {
            every.write(i as u64, b).unwrap();
        }
        let with_mode = |mode: u8, stream: Vec<u8>| [vec![mode], stream].concat();
        vec![
            (
                "seed-session",
                with_mode(FUZZ_RESEAL, seed_session(WireStorage::Replicated)),
            ),
            (
                "seed-session-crc",
                with_mode(0, seed_session(WireStorage::Replicated)),
            ),
            (
                "seed-session-shared",
                with_mode(FUZZ_RESEAL | FUZZ_SHARED, seed_session(WireStorage::Shared)),
            ),
            (
                "seed-every-frame",
                with_mode(FUZZ_RESEAL, every.into_inner()),
            ),
        ]
    }

    #[test]
    fn fuzz_seeds_are_whole_sessions() {
        for (name, seed) in fuzz_seeds() {
            let frames = read_all(&seed[1..]).unwrap();
            if name == "seed-every-frame" {
                assert_eq!(frames.len(), every_body().len());
                continue;
            }
            let mut hello = fuzz_hello();
            if seed[0] & FUZZ_SHARED != 0 {
                hello.storage = WireStorage::Shared;
            }
            let mut a =
                CheckpointAssembler::new(&hello, AssemblerLimits::for_manifest(&hello.manifest));
            let mut complete = 0;
            let mut shutdown = false;
            for f in frames {
                match a.push(f) {
                    Ok(Staged::Complete(_)) => complete += 1,
                    Ok(Staged::Shutdown(_)) => shutdown = true,
                    Ok(_) => {}
                    Err(e) => panic!("{name}: {e}"),
                }
            }
            assert_eq!((complete, shutdown), (2, true), "{name}");
            fuzz(&seed);
        }
    }

    /// Writes [`fuzz_seeds`] into the directory named by `MIRRORVM_FUZZ_SEEDS` (an
    /// absolute path: tests run in `vmm/`), from the repository's root:
    /// `MIRRORVM_FUZZ_SEEDS=$PWD/vmm/fuzz/corpus/frame cargo test -p vmm --lib
    /// write_fuzz_seeds -- --ignored`.
    #[test]
    #[ignore = "writes the frame fuzz target's seed corpus when MIRRORVM_FUZZ_SEEDS is set"]
    fn write_fuzz_seeds() {
        let Some(dir) = std::env::var_os("MIRRORVM_FUZZ_SEEDS") else {
            return;
        };
        let dir = std::path::PathBuf::from(dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, seed) in fuzz_seeds() {
            std::fs::write(dir.join(name), seed).unwrap();
        }
    }

    fn arb_checkpoint(epoch: u64) -> impl Strategy<Value = (Checkpoint, ConsoleChunk)> {
        (
            proptest::collection::btree_set(0u64..256, 0..40),
            proptest::collection::vec(any::<u8>(), 1..300),
            proptest::collection::vec(any::<u8>(), 0..200),
            proptest::option::of(proptest::collection::btree_map(0u64..2000, 1usize..4, 0..5)),
            any::<bool>(),
            any::<u8>(),
        )
            .prop_map(move |(addrs, state, console, region, full, fill)| {
                let addrs: Vec<u64> = addrs.into_iter().map(|a| a * PAGE).collect();
                let mut p = pages(&addrs);
                p.data.iter_mut().step_by(97).for_each(|b| *b ^= fill);
                let mut disks = Vec::new();
                if let Some(r) = region {
                    // Disjoint extents: start sectors 10 apart, at most 3 sectors.
                    let extents = r
                        .into_iter()
                        .map(|(s, n)| ExportExtent {
                            sector: s * 10,
                            data: vec![fill; n * 512],
                        })
                        .collect();
                    disks.push(DiskRegion {
                        disk: usize::from(fill % 2),
                        content: RegionContent::Data(Export {
                            meta: meta(epoch),
                            extents,
                        }),
                    });
                }
                (
                    Checkpoint {
                        epoch,
                        full,
                        state,
                        pages: p,
                        disks,
                        console: ConsoleChunk::default(),
                    },
                    ConsoleChunk {
                        offset: 0,
                        bytes: console,
                    },
                )
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn random_checkpoint_sequences_assemble_to_themselves(
            cps in (arb_checkpoint(1), arb_checkpoint(2), arb_checkpoint(3)),
            heartbeat_at in 0usize..20,
            version in OLDEST_VERSION..=VERSION,
            packing in prop_oneof![
                Just(None),
                Just(Some(Compression::None)),
                Just(Some(Compression::Lz4)),
            ],
        ) {
            let mut a = assembler();
            let mut offset = 0;
            for (c, mut console) in [cps.0, cps.1, cps.2] {
                console.offset = offset;
                offset += console.bytes.len() as u64;
                // Whatever the session's version and packing, the same checkpoint.
                let mut w = FrameWriter::new(Vec::new(), GEN);
                w.set_version(version);
                w.set_packing(packing);
                w.write_checkpoint_with(&c, &console).unwrap();
                let mut r = FrameReader::new(&w.get_ref()[..]);
                r.pin(version);
                let mut frames = Vec::new();
                while let Some(f) = r.read_frame().unwrap() {
                    frames.push(f);
                }
                let at = heartbeat_at.min(frames.len() - 1);
                frames.insert(at, Frame { epoch: 9, generation: GEN, body: Body::Heartbeat });
                let done = assemble(&mut a, frames).unwrap();
                prop_assert_eq!(done.len(), 1);
                let got = &done[0];
                same(&got.checkpoint, &c);
                prop_assert_eq!(&got.checkpoint.console, &console);
            }
        }
    }

    // -----------------------------------------------------------------------------
    // Versions: the frozen frames of version 3 (testdata/, written by the version 3
    // encoder and never regenerated) must still read, and packing follows the
    // version.

    const FROZEN_HELLO_V3: &[u8] = include_bytes!("testdata/hello-v3.bin");
    const FROZEN_JOIN_V3: &[u8] = include_bytes!("testdata/join-v3.bin");
    const FROZEN_SESSION_V3: &[u8] = include_bytes!("testdata/session-v3.bin");

    #[test]
    fn a_frozen_version_3_hello_and_join_read_as_version_3() {
        let mut r = FrameReader::new(FROZEN_HELLO_V3);
        let f = r.read_frame().unwrap().unwrap();
        assert_eq!(r.version(), 3);
        let mut want = fuzz_hello();
        want.protocol_version = 3;
        assert_eq!(f.body, Body::Hello(want));
        assert_eq!((f.epoch, f.generation), (0, 3));
        assert!(r.read_frame().unwrap().is_none());

        let mut r = FrameReader::new(FROZEN_JOIN_V3);
        let f = r.read_frame().unwrap().unwrap();
        assert_eq!(r.version(), 3);
        assert_eq!(
            f.body,
            Body::Join(Join {
                role: JoinRole::Data,
                token: 0x0123_4567_89ab_cdef
            })
        );
    }

    #[test]
    fn a_version_3_hello_written_today_is_the_frozen_one() {
        // What this code writes when a session speaks version 3 is, byte for byte,
        // what version 3 wrote: an older peer reads it as its own.
        let mut w = FrameWriter::new(Vec::new(), 3);
        w.set_version(3);
        let mut hello = fuzz_hello();
        hello.protocol_version = 3;
        w.write(0, &Body::Hello(hello)).unwrap();
        assert_eq!(w.into_inner(), FROZEN_HELLO_V3);
        let mut w = FrameWriter::new(Vec::new(), 0);
        w.set_version(3);
        w.write(
            0,
            &Body::Join(Join {
                role: JoinRole::Data,
                token: 0x0123_4567_89ab_cdef,
            }),
        )
        .unwrap();
        assert_eq!(w.into_inner(), FROZEN_JOIN_V3);
    }

    #[test]
    fn a_frozen_version_3_session_assembles_and_rewrites_to_the_same_bytes() {
        let mut r = FrameReader::new(FROZEN_SESSION_V3);
        let mut frames = Vec::new();
        while let Some(f) = r.read_frame().unwrap() {
            assert_eq!(r.version(), 3);
            frames.push(f);
        }
        let mut a = assembler();
        let mut complete = 0;
        let mut shutdown = false;
        for f in frames.iter().cloned() {
            match a.push(f).unwrap() {
                Staged::Complete(_) => complete += 1,
                Staged::Shutdown(_) => shutdown = true,
                _ => {}
            }
        }
        assert_eq!((complete, shutdown), (2, true));
        // A session pinned to version 3 writes exactly these frames: raw pages
        // even when packing is asked for.
        let mut w = FrameWriter::new(Vec::new(), GEN);
        w.set_version(3);
        w.set_packing(Some(Compression::Lz4));
        for f in &frames {
            match &f.body {
                Body::Base(p) => w.write_base(f.epoch, p).unwrap(),
                b => w.write(f.epoch, b).unwrap(),
            }
        }
        assert_eq!(w.into_inner(), FROZEN_SESSION_V3);
    }

    #[test]
    fn a_reader_pinned_to_a_version_refuses_the_other() {
        let mut w = FrameWriter::new(Vec::new(), GEN);
        w.write(1, &Body::Heartbeat).unwrap();
        let v4 = w.into_inner();
        let mut r = FrameReader::new(&v4[..]);
        r.pin(3);
        let e = r.read_frame().unwrap_err();
        assert!(matches!(
            e,
            FrameError::Version {
                got: VERSION,
                oldest: 3,
                newest: 3
            }
        ));
        assert!(e.to_string().ends_with("this mirrorvm speaks version 3"));
        let mut r = FrameReader::new(FROZEN_HELLO_V3);
        r.pin(VERSION);
        assert!(matches!(
            r.read_frame(),
            Err(FrameError::Version { got: 3, .. })
        ));
    }

    /// Pages of every kind a guest has: zero, compressible, incompressible.
    fn mixed_pages(n: u64) -> StagedPages {
        let mut p = StagedPages::default();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for i in 0..n {
            p.addrs.push(i * 3 * PAGE);
            let mut page = vec![0u8; PAGE_SIZE];
            match i % 3 {
                0 => {}
                1 => page[..64].fill(i.to_le_bytes()[0] | 1),
                _ => {
                    for b in &mut page {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        *b = x.to_le_bytes()[0];
                    }
                }
            }
            p.data.extend_from_slice(&page);
        }
        p
    }

    #[test]
    fn packed_batches_round_trip_smaller_and_only_from_version_4() {
        let pages = mixed_pages(u64::from(MAX_BATCH_PAGES) + 7);
        for compression in [Compression::Lz4, Compression::None] {
            let mut w = FrameWriter::new(Vec::new(), GEN);
            w.set_packing(Some(compression));
            w.write_base(0, &pages).unwrap();
            let mut c = checkpoint(1).0;
            c.pages = pages.clone();
            w.write_checkpoint(&c).unwrap();
            let packed = w.into_inner();
            let mut w = FrameWriter::new(Vec::new(), GEN);
            w.write_base(0, &pages).unwrap();
            w.write_checkpoint(&c).unwrap();
            let raw = w.into_inner();
            // A third of the pages are zero: they cost a bit each.
            assert!(
                packed.len() < raw.len() * 3 / 4,
                "{compression}: {} packed vs {} raw",
                packed.len(),
                raw.len()
            );
            let (a, b) = (read_all(&packed).unwrap(), read_all(&raw).unwrap());
            assert_eq!(a, b, "{compression}: packed frames decode to the raw ones");
        }
        // A version 3 header cannot carry the flag.
        let mut w = FrameWriter::new(Vec::new(), GEN);
        w.set_packing(Some(Compression::Lz4));
        w.write_base(0, &mixed_pages(3)).unwrap();
        let mut b = w.into_inner();
        assert_eq!(&b[8..12], &FLAG_PACKED.to_le_bytes());
        b[4..6].copy_from_slice(&3u16.to_le_bytes());
        reseal(&mut b);
        assert!(matches!(
            read_all(&b),
            Err(FrameError::Flags {
                ty: FrameType::Base,
                flags: FLAG_PACKED
            })
        ));
        // Nor can any other frame type, in any version.
        let mut b = heartbeat_bytes();
        b[8..12].copy_from_slice(&FLAG_PACKED.to_le_bytes());
        reseal(&mut b);
        assert!(matches!(read_all(&b), Err(FrameError::Flags { .. })));
    }

    #[test]
    fn malformed_packed_batches_are_refused() {
        let mut w = FrameWriter::new(Vec::new(), GEN);
        w.set_packing(Some(Compression::Lz4));
        w.write_base(0, &mixed_pages(5)).unwrap();
        let good = w.into_inner();
        let payload = HEADER_LEN;
        // A count over the batch bound, an unaligned address, a bad length, a
        // corrupt lz4 block, trailing bytes: each is Malformed::Packed.
        let mut cases: Vec<Vec<u8>> = Vec::new();
        let mut b = good.clone();
        b[payload..payload + 8].copy_from_slice(&(u64::from(MAX_BATCH_PAGES) + 1).to_le_bytes());
        cases.push(b);
        let mut b = good.clone();
        b[payload + 8 + 8] |= 1;
        cases.push(b);
        let lengths = payload + 8 + 5 * 8 + 1;
        let mut b = good.clone();
        b[lengths..lengths + 2].copy_from_slice(&0u16.to_le_bytes());
        cases.push(b);
        let mut b = good.clone();
        let data = lengths + 2 * 3;
        b[data] ^= 0xff;
        b[data + 1] ^= 0xff;
        cases.push(b);
        let mut b = good.clone();
        b.push(0);
        let len = u32::from_le_bytes([b[12], b[13], b[14], b[15]]) + 1;
        b[12..16].copy_from_slice(&len.to_le_bytes());
        cases.push(b);
        for (i, mut b) in cases.into_iter().enumerate() {
            reseal_stream(&mut b);
            match read_all(&b) {
                Err(FrameError::Malformed {
                    ty: FrameType::Base,
                    cause: Malformed::Packed(_),
                }) => {}
                other => panic!("case {i}: {other:?}"),
            }
        }
    }
}
