//! virtio-blk (device id 2): one request queue, requests executed one at a time on the
//! device event loop, on top of a [`DiskBackend`].
//!
//! Supported requests: IN, OUT, FLUSH and GET_ID; anything else completes with UNSUPP.
//! The device treats everything in guest memory as hostile: a request it cannot make
//! sense of completes with IOERR when it has a usable status byte, and is otherwise
//! returned with a used length of 0; a queue it cannot use at all (corrupt available
//! ring, used ring out of reach) makes the device report DEVICE_NEEDS_RESET. Work per
//! request is bounded by the queue size (descriptors) and by a fixed bounce buffer.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::mmio::{MmioTransport, MmioTransportState};
use super::{
    ActivateError, Activation, StateError, VirtioDevice, VirtioInterrupt, VirtqueueState,
    VIRTIO_F_VERSION_1,
};
use crate::snapshot::Snapshot;
use crate::{ErrorChain, GuestMemory, SECTOR_SIZE};

/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Segments per request the driver may use (the queue size minus header and status).
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Length of the GET_ID answer.
pub const ID_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;
/// Size of the bounce buffer between the disk and guest memory: the largest single
/// backend read or write. Linux's default request limit (1280 KiB) fits.
pub const BOUNCE_LEN: usize = 2 * 1024 * 1024;
/// Length of the request header (type, reserved, sector).
const HEADER_LEN: u64 = 16;

// The status byte values: virtio-bindings has them as u32, the device writes one
// byte. They are 0, 2 and 1 (virtio 1.2, 5.2.6): the casts cannot truncate.
#[allow(clippy::cast_possible_truncation)]
const STATUS_OK: u8 = VIRTIO_BLK_S_OK as u8;
#[allow(clippy::cast_possible_truncation)]
const STATUS_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
#[allow(clippy::cast_possible_truncation)]
const STATUS_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
/// Event data of the kick eventfd in the event loop (queue eventfds use their index).
const KICK_DATA: u32 = u32::MAX;
/// Length of the configuration space we serve.
const CONFIG_LEN: usize = 24;

/// A disk as virtio-blk sees it: a byte array of fixed length.
///
/// Implementations: [`RawFile`] here; the checkpoint store provides another. Reads and
/// writes transfer the whole buffer or fail. The device only issues whole-sector
/// transfers at sector-aligned offsets within [`DiskBackend::len`], at most
/// [`BOUNCE_LEN`] bytes each, in request order (a request larger than that arrives as
/// consecutive calls). A `write_at` or `flush` failing with
/// [`io::ErrorKind::WouldBlock`] means "cannot take it now": the device puts the request
/// back, stops the queue, and submits the request again, whole, after its kick eventfd
/// ([`Block::kick_evt`]) is written.
pub trait DiskBackend: Send {
    /// Reads `buf.len()` bytes at byte `offset`.
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes `buf` at byte `offset`.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&mut self) -> io::Result<()>;
    /// The largest write request, in bytes, the backend can ever complete. The device
    /// fails a larger one with IOERR at once, as a disk fails a transfer beyond its
    /// limit: a backend that defers what does not fit now (the checkpoint store, whose
    /// region takes a request whole) would otherwise defer it for ever.
    fn max_write_len(&self) -> u64 {
        u64::MAX
    }
    /// The disk's size in bytes.
    fn len(&self) -> u64;
    /// Whether the disk has no bytes at all.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Errors of the block device and its raw-file backend.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// could not open the disk image
    #[error("could not open the disk image {path}")]
    Open {
        /// The image.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// could not get the size of the disk image
    #[error("could not get the size of the disk image {path}")]
    Metadata {
        /// The image.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// could not create an eventfd
    #[error("could not create an eventfd for the block device")]
    EventFd(#[source] io::Error),
}

/// A raw disk image in a host file.
#[derive(Debug)]
pub struct RawFile {
    file: File,
    len: u64,
}

impl RawFile {
    /// Opens `path`, read-write unless `read_only`.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| BlockError::Open {
                path: path.to_owned(),
                source,
            })?;
        let len = file
            .metadata()
            .map_err(|source| BlockError::Metadata {
                path: path.to_owned(),
                source,
            })?
            .len();
        Ok(Self { file, len })
    }

    /// Wraps an open file of `len` bytes.
    pub fn new(file: File, len: u64) -> Self {
        Self { file, len }
    }
}

impl DiskBackend for RawFile {
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn len(&self) -> u64 {
        self.len
    }
}

/// Makes a GET_ID string from a disk image's file name (the last 20 bytes of it).
pub fn id_from_path(path: &Path) -> Vec<u8> {
    let name = path
        .file_name()
        .map(|n| n.as_encoded_bytes().to_vec())
        .unwrap_or_default();
    let start = name.len().saturating_sub(ID_LEN);
    name[start..].to_vec()
}

/// A contiguous piece of guest memory named by a descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Seg {
    addr: GuestAddress,
    len: u64,
}

/// A request the device cannot even complete with a status: it goes back with used length 0.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
enum ChainError {
    /// longer than the queue
    #[error("descriptor chain longer than {0} descriptors")]
    TooLong(usize),
    /// a loop, a descriptor out of reach, or more than 4 GiB of buffers
    #[error("descriptor chain does not end (loop, unreadable descriptor or size overflow)")]
    Unterminated,
    /// no writable last byte
    #[error("descriptor chain has no usable status byte")]
    NoStatus,
}

/// A request that completes with IOERR.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    /// a readable buffer after a writable one, or data in the wrong direction
    #[error("buffers in the wrong direction")]
    Direction,
    /// the header is shorter than 16 bytes
    #[error("request header shorter than 16 bytes")]
    ShortHeader,
    /// a buffer outside guest memory
    #[error("buffer at {addr:#x} (+{len:#x}) is outside guest memory")]
    OutsideMemory { addr: u64, len: u64 },
    /// data length not a multiple of 512
    #[error("data length {0} is not a multiple of 512")]
    Unaligned(u64),
    /// beyond the disk
    #[error("sector {sector} + {len} bytes is beyond the disk's {capacity} sectors")]
    OutOfRange {
        sector: u64,
        len: u64,
        capacity: u64,
    },
    /// write to a read-only disk
    #[error("write to a read-only disk")]
    ReadOnly,
    /// a write larger than the backend can ever take
    #[error("a write of {len} bytes is larger than the disk can ever take at once ({max} bytes)")]
    TooLarge { len: u64, max: u64 },
    /// guest memory access failed
    #[error("guest memory access failed")]
    Memory(#[source] vm_memory::GuestMemoryError),
    /// the disk failed
    #[error("disk I/O failed")]
    Io(#[source] io::Error),
}

/// What became of a request.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Return it to the driver with this used length.
    Done(u32),
    /// The backend cannot take it now: put it back and stop the queue.
    Deferred,
}

/// The disk side of the device: everything a request needs besides the queue.
struct DiskIo {
    disk: Box<dyn DiskBackend>,
    read_only: bool,
    id: [u8; ID_LEN],
    bounce: Vec<u8>,
}

/// Checks that every byte of `segs` is in guest memory.
fn check_segs(mem: &GuestMemory, segs: &[Seg]) -> Result<(), RequestError> {
    for s in segs {
        let in_memory = s.len == 0
            || usize::try_from(s.len)
                .is_ok_and(|len| GuestMemoryBackend::check_range(mem, s.addr, len));
        if !in_memory {
            return Err(RequestError::OutsideMemory {
                addr: s.addr.0,
                len: s.len,
            });
        }
    }
    Ok(())
}

/// The segments left after skipping the first `skip` bytes of `segs`.
fn skip_bytes(segs: &[Seg], mut skip: u64) -> Vec<Seg> {
    let mut out = Vec::with_capacity(segs.len());
    for s in segs {
        if skip >= s.len {
            skip -= s.len;
            continue;
        }
        out.push(Seg {
            // In memory (checked), so this cannot wrap.
            addr: GuestAddress(s.addr.0 + skip),
            len: s.len - skip,
        });
        skip = 0;
    }
    out
}

/// The next chunk of a transfer: the bounce buffer's size (whole sectors) or what is left
/// (whole sectors: checked by the caller), whichever is smaller.
fn chunk_len(bounce: usize, left: u64) -> usize {
    usize::try_from(left).map_or(bounce, |left| left.min(bounce))
}

/// A position in a list of guest buffers (all checked to be in guest memory), to copy
/// byte streams in and out of them across buffer boundaries.
struct SegCursor<'a> {
    segs: &'a [Seg],
    /// Offset into `segs[0]`.
    offset: u64,
}

impl<'a> SegCursor<'a> {
    fn new(segs: &'a [Seg]) -> Self {
        Self { segs, offset: 0 }
    }

    /// Bytes left from the current position.
    fn remaining(&self) -> u64 {
        match self.segs.split_first() {
            Some((first, rest)) => first.len - self.offset + total_len(rest),
            None => 0,
        }
    }

    /// The next piece: where, and how many bytes (at most `max`); advances past it.
    fn next_piece(&mut self, max: usize) -> Option<(GuestAddress, usize)> {
        loop {
            let (first, rest) = self.segs.split_first()?;
            let left = first.len - self.offset;
            if left == 0 {
                self.segs = rest;
                self.offset = 0;
                continue;
            }
            let n = usize::try_from(left).map_or(max, |left| left.min(max));
            // In guest memory (checked), so this cannot wrap.
            let addr = GuestAddress(first.addr.0 + self.offset);
            self.offset += n as u64;
            return Some((addr, n));
        }
    }

    /// Copies guest bytes into `out` (stops early if the buffers run out).
    fn read(&mut self, mem: &GuestMemory, out: &mut [u8]) -> Result<(), RequestError> {
        let mut done = 0;
        while done < out.len() {
            let Some((addr, n)) = self.next_piece(out.len() - done) else {
                break;
            };
            mem.read_slice(&mut out[done..done + n], addr)
                .map_err(RequestError::Memory)?;
            done += n;
        }
        Ok(())
    }

    /// Copies `data` into guest buffers (stops early if the buffers run out).
    fn write(&mut self, mem: &GuestMemory, data: &[u8]) -> Result<(), RequestError> {
        let mut done = 0;
        while done < data.len() {
            let Some((addr, n)) = self.next_piece(data.len() - done) else {
                break;
            };
            mem.write_slice(&data[done..done + n], addr)
                .map_err(RequestError::Memory)?;
            done += n;
        }
        Ok(())
    }
}

fn total_len(segs: &[Seg]) -> u64 {
    segs.iter().map(|s| s.len).sum()
}

fn is_would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

impl DiskIo {
    fn capacity(&self) -> u64 {
        self.disk.len() / SECTOR_SIZE
    }

    /// Splits a chain into its readable and writable segments and its status byte.
    fn parse_chain(
        chain: DescriptorChain<&GuestMemory>,
        max_descs: usize,
        mem: &GuestMemory,
    ) -> Result<(Vec<Descriptor>, GuestAddress), ChainError> {
        let mut descs: Vec<Descriptor> = Vec::with_capacity(max_descs.min(QUEUE_SIZE.into()));
        for desc in chain {
            if descs.len() == max_descs {
                return Err(ChainError::TooLong(max_descs));
            }
            descs.push(desc);
        }
        // The chain iterator stops silently on loops (after queue-size steps), unreadable
        // descriptors and length overflow: a proper chain ends without NEXT.
        let last = match descs.last() {
            Some(last) if !last.has_next() => *last,
            _ => return Err(ChainError::Unterminated),
        };
        if !last.is_write_only() || last.len() == 0 {
            return Err(ChainError::NoStatus);
        }
        let status = last
            .addr()
            .0
            .checked_add(u64::from(last.len()) - 1)
            .map(GuestAddress)
            .filter(|a| GuestMemoryBackend::check_range(mem, *a, 1))
            .ok_or(ChainError::NoStatus)?;
        Ok((descs, status))
    }

    /// Executes one request: `None` when the backend deferred it, else the status byte
    /// or the reason for IOERR.
    fn execute(
        &mut self,
        mem: &GuestMemory,
        descs: &[Descriptor],
    ) -> Option<Result<u8, RequestError>> {
        let mut readable = Vec::with_capacity(descs.len());
        let mut writable = Vec::with_capacity(descs.len());
        let mut direction_error = false;
        for (i, d) in descs.iter().enumerate() {
            let mut len = u64::from(d.len());
            if i + 1 == descs.len() {
                // The status byte (parse_chain checked the last descriptor has one).
                len = len.saturating_sub(1);
            }
            let seg = Seg {
                addr: d.addr(),
                len,
            };
            if d.is_write_only() {
                writable.push(seg);
            } else if writable.is_empty() {
                readable.push(seg);
            } else {
                direction_error = true;
            }
        }
        match self.execute_segs(mem, &readable, &writable, direction_error) {
            Err(RequestError::Io(e)) if is_would_block(&e) => None,
            result => Some(result),
        }
    }

    fn execute_segs(
        &mut self,
        mem: &GuestMemory,
        readable: &[Seg],
        writable: &[Seg],
        direction_error: bool,
    ) -> Result<u8, RequestError> {
        if direction_error {
            return Err(RequestError::Direction);
        }
        check_segs(mem, readable)?;
        check_segs(mem, writable)?;
        if total_len(readable) < HEADER_LEN {
            return Err(RequestError::ShortHeader);
        }
        let mut header = [0u8; crate::to_usize(HEADER_LEN)];
        self.gather(mem, readable, &mut header)?;
        let request_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let sector = u64::from_le_bytes([
            header[8], header[9], header[10], header[11], header[12], header[13], header[14],
            header[15],
        ]);
        let data_in = skip_bytes(readable, HEADER_LEN);
        let data_in_len = total_len(&data_in);
        let data_out_len = total_len(writable);

        match request_type {
            VIRTIO_BLK_T_IN => {
                if data_in_len != 0 {
                    return Err(RequestError::Direction);
                }
                let offset = self.check_range(sector, data_out_len)?;
                self.disk_to_guest(mem, writable, offset)?;
                Ok(STATUS_OK)
            }
            VIRTIO_BLK_T_OUT => {
                if data_out_len != 0 {
                    return Err(RequestError::Direction);
                }
                if self.read_only {
                    return Err(RequestError::ReadOnly);
                }
                let offset = self.check_range(sector, data_in_len)?;
                let max = self.disk.max_write_len();
                if data_in_len > max {
                    return Err(RequestError::TooLarge {
                        len: data_in_len,
                        max,
                    });
                }
                self.guest_to_disk(mem, &data_in, offset)?;
                Ok(STATUS_OK)
            }
            VIRTIO_BLK_T_FLUSH => {
                self.disk.flush().map_err(RequestError::Io)?;
                Ok(STATUS_OK)
            }
            VIRTIO_BLK_T_GET_ID => {
                let id = self.id;
                self.scatter(mem, writable, &id)?;
                Ok(STATUS_OK)
            }
            other => {
                tracing::debug!("virtio-blk: unsupported request type {other}");
                Ok(STATUS_UNSUPP)
            }
        }
    }

    /// Checks a data transfer of `len` bytes at `sector`; returns its byte offset.
    fn check_range(&self, sector: u64, len: u64) -> Result<u64, RequestError> {
        if len & (SECTOR_SIZE - 1) != 0 {
            return Err(RequestError::Unaligned(len));
        }
        let capacity = self.capacity();
        let offset = sector.checked_mul(SECTOR_SIZE);
        match offset.and_then(|o| o.checked_add(len)) {
            Some(end) if end <= capacity * SECTOR_SIZE => Ok(end - len),
            _ => Err(RequestError::OutOfRange {
                sector,
                len,
                capacity,
            }),
        }
    }

    /// Reads `out.len()` bytes from the start of `segs`.
    fn gather(&self, mem: &GuestMemory, segs: &[Seg], out: &mut [u8]) -> Result<(), RequestError> {
        SegCursor::new(segs).read(mem, out)
    }

    /// Writes `data` to the start of `segs`, then zeros over the rest of them (the used
    /// length covers every writable byte).
    fn scatter(&self, mem: &GuestMemory, segs: &[Seg], data: &[u8]) -> Result<(), RequestError> {
        let mut cursor = SegCursor::new(segs);
        cursor.write(mem, data)?;
        let zeros = [0u8; 4096];
        while cursor.remaining() > 0 {
            cursor.write(mem, &zeros)?;
        }
        Ok(())
    }

    /// Reads `len` bytes of the disk at `offset` into `segs`. The backend sees reads of
    /// whole sectors, at most the bounce buffer each.
    fn disk_to_guest(
        &mut self,
        mem: &GuestMemory,
        segs: &[Seg],
        mut offset: u64,
    ) -> Result<(), RequestError> {
        let mut cursor = SegCursor::new(segs);
        let mut left = total_len(segs);
        while left > 0 {
            let n = chunk_len(self.bounce.len(), left);
            let buf = &mut self.bounce[..n];
            self.disk.read_at(buf, offset).map_err(RequestError::Io)?;
            cursor.write(mem, buf)?;
            offset += n as u64;
            left -= n as u64;
        }
        Ok(())
    }

    /// Writes the data in `segs` to the disk at `offset`. The backend sees writes of
    /// whole sectors, at most the bounce buffer each (one write for most requests).
    fn guest_to_disk(
        &mut self,
        mem: &GuestMemory,
        segs: &[Seg],
        mut offset: u64,
    ) -> Result<(), RequestError> {
        let mut cursor = SegCursor::new(segs);
        let mut left = total_len(segs);
        while left > 0 {
            let n = chunk_len(self.bounce.len(), left);
            let buf = &mut self.bounce[..n];
            cursor.read(mem, buf)?;
            self.disk.write_at(buf, offset).map_err(RequestError::Io)?;
            offset += n as u64;
            left -= n as u64;
        }
        Ok(())
    }

    /// Runs one descriptor chain to completion (or deferral).
    fn handle_chain(
        &mut self,
        mem: &GuestMemory,
        chain: DescriptorChain<&GuestMemory>,
        max_descs: usize,
    ) -> Outcome {
        let (descs, status_addr) = match Self::parse_chain(chain, max_descs, mem) {
            Ok(parsed) => parsed,
            Err(e) => {
                tracing::warn!("virtio-blk: dropping request: {e}");
                return Outcome::Done(0);
            }
        };
        let status = match self.execute(mem, &descs) {
            None => return Outcome::Deferred,
            Some(Ok(status)) => status,
            Some(Err(e)) => {
                tracing::debug!("virtio-blk: request failed: {}", ErrorChain(&e));
                STATUS_IOERR
            }
        };
        if let Err(e) = mem.write_obj(status, status_addr) {
            // Checked in parse_chain; only a memory layout change could get here.
            tracing::warn!("virtio-blk: cannot write the status byte: {e}");
            return Outcome::Done(0);
        }
        // The bytes written into the chain: after a failure only the status byte; after
        // success every writable byte, status included (at most 4 GiB - 1: the chain
        // iterator stops at a u32 overflow of the total).
        if status != STATUS_OK {
            return Outcome::Done(1);
        }
        let used = descs
            .iter()
            .filter(|d| d.is_write_only())
            .map(|d| u64::from(d.len()))
            .sum::<u64>();
        Outcome::Done(u32::try_from(used).unwrap_or(u32::MAX))
    }
}

/// The device's state while the driver drives it.
struct Active {
    mem: GuestMemory,
    queue: Queue,
    interrupt: Arc<VirtioInterrupt>,
    acked_features: u64,
}

/// The plain state of a block device (for save/restore).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockState {
    /// The disk's size in sectors (checked on restore: the guest knows it).
    pub capacity: u64,
    /// The features the device offered (checked on restore: they depend on read-only).
    pub device_features: u64,
    /// The driver's side, while the device is active.
    pub active: Option<BlockActiveState>,
    /// Whether a request was waiting for the backend (see [`DiskBackend`]). It stays in
    /// the available ring (the queue's position is before it), so a restored device does
    /// it again; a restored device starts undeferred.
    pub deferred: bool,
}

/// The state of an active block device.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct BlockActiveState {
    /// The features the driver accepted.
    pub acked_features: u64,
    /// The request queue: its rings and the device's positions in them.
    pub queue: VirtqueueState,
}

/// A virtio-blk device. Share it as `Arc<Mutex<Block>>` between its
/// [`super::mmio::MmioTransport`] (as `Arc<Mutex<dyn VirtioDevice>>`) and the event
/// manager (it is a [`MutEventSubscriber`]).
pub struct Block {
    io: DiskIo,
    avail_features: u64,
    config: [u8; CONFIG_LEN],
    queue_evts: Vec<EventFd>,
    kick_evt: EventFd,
    active: Option<Active>,
    deferred: bool,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("capacity", &self.io.capacity())
            .field("read_only", &self.io.read_only)
            .field("active", &self.active.is_some())
            .field("deferred", &self.deferred)
            .finish_non_exhaustive()
    }
}

impl Block {
    /// Creates a block device on `disk`. `id` is the GET_ID answer (at most 20 bytes are
    /// used; see [`id_from_path`]). The capacity is the disk size in whole sectors.
    pub fn new(disk: Box<dyn DiskBackend>, read_only: bool, id: &[u8]) -> Result<Self, BlockError> {
        let mut id_bytes = [0u8; ID_LEN];
        let n = id.len().min(ID_LEN);
        id_bytes[..n].copy_from_slice(&id[..n]);

        let mut avail_features =
            (1u64 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BLK_F_FLUSH) | (1 << VIRTIO_BLK_F_SEG_MAX);
        if read_only {
            avail_features |= 1 << VIRTIO_BLK_F_RO;
        }
        if disk.len() & (SECTOR_SIZE - 1) != 0 {
            tracing::warn!(
                "virtio-blk: disk size {} is not a multiple of 512; the tail is not visible",
                disk.len()
            );
        }
        let io = DiskIo {
            disk,
            read_only,
            id: id_bytes,
            bounce: vec![0; BOUNCE_LEN],
        };
        // struct virtio_blk_config: capacity, size_max, seg_max, geometry, blk_size.
        let mut config = [0u8; CONFIG_LEN];
        config[0..8].copy_from_slice(&io.capacity().to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        #[allow(clippy::cast_possible_truncation)] // SECTOR_SIZE is 512
        let blk_size = SECTOR_SIZE as u32;
        config[20..24].copy_from_slice(&blk_size.to_le_bytes());

        let new_evt = || EventFd::new(libc::EFD_NONBLOCK).map_err(BlockError::EventFd);
        Ok(Self {
            io,
            avail_features,
            config,
            queue_evts: vec![new_evt()?],
            kick_evt: new_evt()?,
            active: None,
            deferred: false,
        })
    }

    /// Capacity in sectors.
    pub fn capacity(&self) -> u64 {
        self.io.capacity()
    }

    /// The kick eventfd: writing it makes the device look at its queue again (after a
    /// deferred request, or after a restore). Watched from [`MutEventSubscriber::init`].
    pub fn kick_evt(&self) -> &EventFd {
        &self.kick_evt
    }

    /// Whether the driver activated the device.
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// The plain state.
    pub fn state(&self) -> BlockState {
        BlockState {
            capacity: self.capacity(),
            device_features: self.avail_features,
            active: self.active.as_ref().map(|a| BlockActiveState {
                acked_features: a.acked_features,
                queue: VirtqueueState::from(&a.queue),
            }),
            deferred: self.deferred,
        }
    }

    /// Recreates a block device from a saved state (restore): on `disk` (recovered to
    /// the checkpoint the state belongs to), with the same `read_only` and `id` as the
    /// saved device, its queue in `mem` (the restored guest memory), raising interrupts
    /// through `interrupt`, the line the transport is restored on
    /// ([`super::mmio::MmioTransport::restore`]; [`restore_with_transport`] does both).
    ///
    /// A device saved active comes back active, its queue rebuilt at the saved ring
    /// addresses and positions: the next notification (or
    /// [`super::mmio::MmioTransport::post_restore`]) continues where it was, including a
    /// request the disk had deferred. The state is untrusted input: it is refused unless
    /// it matches this disk (capacity) and options (offered features), the acked features
    /// are offered ones, and the queue is valid in `mem` (see [`VirtqueueState::to_queue`]).
    pub fn restore(
        disk: Box<dyn DiskBackend>,
        read_only: bool,
        id: &[u8],
        state: &BlockState,
        mem: GuestMemory,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<Self, StateError> {
        let mut block = Self::new(disk, read_only, id).map_err(StateError::Block)?;
        if state.capacity != block.capacity() {
            return Err(StateError::Capacity {
                saved: state.capacity,
                disk: block.capacity(),
            });
        }
        if state.device_features != block.avail_features {
            return Err(StateError::DeviceFeatures {
                saved: state.device_features,
                device: block.avail_features,
            });
        }
        match &state.active {
            None if state.deferred => return Err(StateError::DeferredInactive),
            None => {}
            Some(active) => {
                let acked = active.acked_features;
                if acked & !block.avail_features != 0 || acked & (1 << VIRTIO_F_VERSION_1) == 0 {
                    return Err(StateError::FeaturesRefused {
                        acked,
                        offered: block.avail_features,
                    });
                }
                let event_idx = acked & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
                if active.queue.0.event_idx_enabled != event_idx {
                    return Err(StateError::EventIdx {
                        index: 0,
                        enabled: active.queue.0.event_idx_enabled,
                    });
                }
                let queue = active.queue.to_queue(0, QUEUE_SIZE, &mem)?;
                block.active = Some(Active {
                    mem,
                    queue,
                    interrupt,
                    acked_features: acked,
                });
            }
        }
        // A deferred request is still in the available ring: the first look at the queue
        // after the restore submits it again.
        block.deferred = false;
        Ok(block)
    }

    /// Drains pending queue notifications and processes the queue (the VMM calls this at
    /// a cut, before saving device state, so no notification is lost). Afterwards no
    /// request is half done: each request is executed whole or deferred whole.
    ///
    /// Cheap when nothing is pending: a few eventfd reads and one read of the available
    /// index. At most one queue's worth of requests is processed (the queue eventfd is
    /// then signalled again; requests left in the available ring are looked at after a
    /// restore too). A deferred request is retried only if the kick eventfd was written
    /// (the disk made room); otherwise the device stays deferred and the state records
    /// it: after the region swap at the cut, write [`Block::kick_evt`] to retry.
    pub fn process_pending(&mut self) {
        for evt in &self.queue_evts {
            // EAGAIN means nothing pending: fine.
            let _ = evt.read();
        }
        if self.kick_evt.read().is_ok() {
            self.deferred = false;
        }
        self.process_queue();
    }

    /// Processes the available requests, at most one queue's worth; if more remain, the
    /// device signals its own queue eventfd so the event loop comes back to it after
    /// serving other events.
    pub fn process_queue(&mut self) {
        if self.deferred {
            return;
        }
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if active.interrupt.needs_reset() {
            return;
        }
        let mem = &active.mem;
        let queue = &mut active.queue;
        if !queue.ready() {
            return;
        }
        let max_descs = usize::from(queue.size());
        let mut used_any = false;
        let mut budget = queue.size();
        loop {
            let chain = match queue.iter(mem) {
                Ok(mut iter) => iter.next(),
                Err(e) => {
                    tracing::warn!("virtio-blk: unusable available ring: {e}");
                    active.interrupt.set_needs_reset();
                    break;
                }
            };
            let Some(chain) = chain else {
                break;
            };
            let head = chain.head_index();
            match self.io.handle_chain(mem, chain, max_descs) {
                Outcome::Done(len) => {
                    if let Err(e) = queue.add_used(mem, head, len) {
                        tracing::warn!("virtio-blk: cannot return request {head}: {e}");
                        active.interrupt.set_needs_reset();
                        break;
                    }
                    used_any = true;
                }
                Outcome::Deferred => {
                    queue.go_to_previous_position();
                    self.deferred = true;
                    break;
                }
            }
            budget = budget.saturating_sub(1);
            if budget == 0 {
                if let Err(e) = self.queue_evts[0].write(1) {
                    tracing::warn!("virtio-blk: cannot re-arm the queue: {e}");
                }
                break;
            }
        }
        if used_any {
            match queue.needs_notification(mem) {
                Ok(false) => {}
                Ok(true) => active.interrupt.signal_used_queue(),
                Err(e) => {
                    tracing::warn!("virtio-blk: cannot read the used event: {e}");
                    active.interrupt.signal_used_queue();
                }
            }
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn device_features(&self) -> u64 {
        self.avail_features
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| self.config.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Nothing writable without VIRTIO_BLK_F_CONFIG_WCE.
        tracing::debug!(
            "virtio-blk: ignoring config write at {offset:#x} ({} bytes)",
            data.len()
        );
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let Activation {
            mem,
            queues,
            interrupt,
            acked_features,
        } = activation;
        let got = queues.len();
        let Ok([queue]) = <[Queue; 1]>::try_from(queues) else {
            return Err(ActivateError::QueueCount { expected: 1, got });
        };
        if !queue.ready() {
            return Err(ActivateError::QueueNotReady { index: 0 });
        }
        self.active = Some(Active {
            mem,
            queue,
            interrupt,
            acked_features,
        });
        self.deferred = false;
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.deferred = false;
    }

    fn is_active(&self) -> bool {
        self.active.is_some()
    }
}

impl Snapshot for Block {
    type State = BlockState;

    fn snapshot(&self) -> BlockState {
        self.state()
    }
}

/// Restores a block device and its virtio-mmio transport together, on one new interrupt
/// line: [`Block::restore`] then [`MmioTransport::restore`]. The VMM then registers the
/// ioeventfds ([`MmioTransport::queue_events`]) and the irqfd
/// ([`MmioTransport::interrupt_evt`]) as on boot, adds the block device to the event
/// loop, and calls [`MmioTransport::post_restore`].
pub fn restore_with_transport(
    disk: Box<dyn DiskBackend>,
    read_only: bool,
    id: &[u8],
    block_state: &BlockState,
    transport_state: &MmioTransportState,
    mem: GuestMemory,
) -> Result<(Arc<Mutex<Block>>, MmioTransport), StateError> {
    let interrupt = Arc::new(
        VirtioInterrupt::new()
            .map_err(|e| StateError::Transport(super::mmio::MmioError::CreateInterrupt(e)))?,
    );
    let block = Block::restore(
        disk,
        read_only,
        id,
        block_state,
        mem.clone(),
        interrupt.clone(),
    )?;
    let block = Arc::new(Mutex::new(block));
    let transport = MmioTransport::restore(block.clone(), mem, interrupt, transport_state)?;
    Ok((block, transport))
}

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        for (i, evt) in (0u32..).zip(&self.queue_evts) {
            if let Err(e) = ops.add(Events::with_data(evt, i, EventSet::IN)) {
                tracing::error!("virtio-blk: cannot watch queue {i}: {e}");
            }
        }
        if let Err(e) = ops.add(Events::with_data(&self.kick_evt, KICK_DATA, EventSet::IN)) {
            tracing::error!("virtio-blk: cannot watch the kick eventfd: {e}");
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            KICK_DATA => {
                let _ = self.kick_evt.read();
                self.deferred = false;
                self.process_queue();
            }
            index => match self.queue_evts.get(index as usize) {
                Some(evt) => {
                    // Drain first: a notification after this point re-arms the eventfd.
                    // While inactive, drained notifications are not lost: activation
                    // signals every queue again.
                    let _ = evt.read();
                    self.process_queue();
                }
                None => tracing::warn!("virtio-blk: event for unknown queue {index}"),
            },
        }
    }
}

#[cfg(test)]
mod tests;
