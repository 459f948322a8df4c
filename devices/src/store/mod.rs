//! The checkpoint store: guest disk writes go, non-destructively, into rotating
//! checkpoint regions of a journal beside the raw base image, and reach the base image
//! only when their checkpoint is retired.
//!
//! `docs/store-format.md` specifies the journal format, the slot state machine, the
//! recovery rules and the durability points. In short:
//!
//! * [`Store::write`] appends a checksummed record to the *active* region; it never
//!   touches the base image. A write that does not fit returns
//!   [`WriteOutcome::Deferred`]; past the high-water mark a write reports that the
//!   epoch should end early.
//! * [`Store::read`] merges, per sector, the active region, the frozen regions (newest
//!   first) and the base image, through in-memory indexes.
//! * [`Store::start_checkpoint`] (vCPUs paused) freezes the active region as checkpoint
//!   N and activates a free slot; it does no fsync.
//! * [`Store::export`]/[`Store::export_meta`] make the frozen region durable (sealed)
//!   and hand out its data or metadata; [`Store::acknowledge`] records durably that the
//!   peer holds it; [`Store::retire`] (or the split [`Store::prepare_retire`],
//!   [`RetireJob::run`], [`Store::finish_retire`] so the copy runs off the device
//!   loop) commits it into the base image and frees the slot.
//! * [`Store::open`] recovers after a crash to the epoch the caller names, or to the
//!   last acknowledged one.
//!
//! The files sit behind [`StoreFile`], so tests put a fault-injecting layer underneath.
//!
//! # From the device event loop
//!
//! The loop owns the store (or locks a [`SharedStore`] briefly per request):
//!
//! * a guest write calls [`Store::write`]; on [`WriteOutcome::Written`] complete the
//!   request; if `end_epoch_early` is set, ask the epoch engine for a cut. On
//!   [`WriteOutcome::Deferred`] keep the request (its descriptor chain) in a FIFO,
//!   ask for a cut, and return to the loop; resubmit the FIFO after the next cut,
//!   before any newer write (so write order is kept). Never wait on the loop;
//! * a guest read calls [`Store::read`]; a guest FLUSH calls [`Store::flush`] (with a
//!   sink), or [`Store::commit_local`] (local policy: cut, acknowledge, retire);
//! * the cut (vCPUs paused, loop parked) calls [`Store::start_checkpoint`]; on
//!   [`Error::NoFreeRegion`] the cut is postponed and the guest keeps running;
//! * the replication thread exports, acknowledges, and retires with
//!   [`SharedStore::retire`], which holds the lock only to start and finish, so the
//!   copy into the base image never stalls the loop.

mod error;
mod extent;
pub mod format;
mod io;
mod journal;
pub mod sizing;
mod tools;

#[cfg(test)]
mod fault;
#[cfg(test)]
mod golden_test;
#[cfg(test)]
mod model_test;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub use error::{Error, FileRole, RecordProblem, Result};
pub use extent::{Extent, ExtentMap};
pub use format::{record_footprint, SlotState, SECTOR_SIZE};
pub use io::{MemFile, StoreFile};
pub use tools::{
    fuzz_journal, inspect, inspect_files, recover, verify, verify_files, Inspection, SlotReport,
};

use crate::to_usize;
use error::IoContext;
use format::{FileHeader, Geometry, SlotHeader, FORMAT_VERSION, RECORD_HEADER_LEN};

/// The journal's path for a base image: the image's name with `.mvj` appended.
pub fn journal_path(image: &Path) -> PathBuf {
    let mut s = image.as_os_str().to_owned();
    s.push(".mvj");
    PathBuf::from(s)
}

/// How a store is laid out and when it asks for an early cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// Region slots in a new journal (an existing journal keeps its own).
    pub slot_count: u32,
    /// Bytes of records (headers included) each region holds, in a new journal.
    pub region_capacity: u64,
    /// The user named `region_capacity`: an existing journal whose regions have
    /// another size is refused ([`Error::RegionSizeMismatch`]) before anything is
    /// recovered. Otherwise an existing journal keeps its own size, whatever
    /// `region_capacity` says.
    pub insist_on_capacity: bool,
    /// Bytes of the active region past which writes report that the epoch should end
    /// early; `None` means three quarters of the capacity.
    pub high_water: Option<u64>,
    /// The epoch the base image holds when a new journal is created.
    pub created_epoch: u64,
    /// Write the whole new journal with zeros when creating it (in 1 MiB writes),
    /// rather than leaving it sparse: its blocks are then allocated, so a region can
    /// never meet a full file system in mid-run, and the page cache holds it in large
    /// folios, which makes the 4 KiB record writes and their fdatasync markedly
    /// cheaper (see the benchmarks).
    pub preallocate: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            slot_count: sizing::DEFAULT_SLOTS,
            region_capacity: sizing::DEFAULT_REGION_CAP,
            insist_on_capacity: false,
            high_water: None,
            created_epoch: 0,
            preallocate: true,
        }
    }
}

impl StoreConfig {
    /// The configuration of a disk of `disk_len` bytes: regions of `region_size`
    /// bytes if the user named a size (an existing journal must then have it), else
    /// [`sizing::default_region_size`] for a new journal and the journal's own size
    /// for an existing one.
    pub fn for_disk(disk_len: u64, region_size: Option<u64>) -> Self {
        StoreConfig {
            region_capacity: region_size.unwrap_or_else(|| sizing::default_region_size(disk_len)),
            insist_on_capacity: region_size.is_some(),
            ..StoreConfig::default()
        }
    }
}

/// The epoch recovery brings the store to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecoverTo {
    /// The newest acknowledged checkpoint (or what the base image holds if none is).
    LastAcknowledged,
    /// This checkpoint: the side holding the memory names it.
    Epoch(u64),
}

impl From<Option<u64>> for RecoverTo {
    fn from(e: Option<u64>) -> Self {
        e.map_or(RecoverTo::LastAcknowledged, RecoverTo::Epoch)
    }
}

/// What became of a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum WriteOutcome {
    /// The write is in the active region. `end_epoch_early` is true once the region is
    /// past its high-water mark: the caller should ask for a cut.
    Written {
        /// The active region is past its high-water mark.
        end_epoch_early: bool,
    },
    /// The write does not fit the active region. Nothing was written: hold the request
    /// and submit it again after the next cut (and ask for one). Never wait for it on
    /// the device loop.
    Deferred,
}

/// The metadata of a frozen region: what a peer on shared storage needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionMeta {
    /// Checkpoint epoch.
    pub epoch: u64,
    /// The epoch it follows.
    pub parent_epoch: u64,
    /// Slot in the journal.
    pub slot: u32,
    /// Generation of the slot's use.
    pub generation: u64,
    /// Records in the region.
    pub records: u32,
    /// Bytes of records in the region.
    pub used_bytes: u64,
    /// Distinct sectors the region holds.
    pub sectors: u64,
    /// Whether the peer has acknowledged it.
    pub acknowledged: bool,
}

/// One run of sectors of an exported region and its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportExtent {
    /// First sector.
    pub sector: u64,
    /// The data, a whole number of sectors.
    pub data: Vec<u8>,
}

/// A frozen region as a peer with its own disk copy needs it: metadata, and the final
/// contents of every sector it holds (overlaps already resolved, newest wins).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    /// The metadata.
    pub meta: RegionMeta,
    /// The data, in sector order.
    pub extents: Vec<ExportExtent>,
}

/// What recovery did when the store was opened.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// The epoch the store (and now the base image alone) holds.
    pub epoch: u64,
    /// The epoch the base image held before recovery.
    pub base_epoch_before: u64,
    /// Sealed regions committed into the base image, oldest first.
    pub redone: Vec<u64>,
    /// Sealed regions later than the epoch, discarded.
    pub dropped: Vec<u64>,
    /// Active regions discarded (writes no checkpoint covers).
    pub discarded_active: u32,
    /// Whether the journal was created afresh.
    pub created: bool,
}

/// A snapshot of the store's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// Slot of the active region.
    pub active_slot: u32,
    /// Generation of the active region.
    pub active_generation: u64,
    /// Bytes used in the active region.
    pub active_used: u64,
    /// Records in the active region.
    pub active_records: u32,
    /// Whether the active slot held an earlier region (it is being rewritten).
    pub active_slot_reused: bool,
    /// Frozen regions, oldest first.
    pub frozen: Vec<RegionMeta>,
    /// The epoch the base image holds.
    pub base_epoch: u64,
    /// The newest checkpoint epoch (frozen or retired).
    pub last_epoch: u64,
    /// The newest acknowledged epoch.
    pub last_acknowledged: u64,
    /// Slots free for a new active region.
    pub free_slots: u32,
    /// The active region is past its high-water mark or a write was deferred.
    pub end_epoch_early: bool,
    /// Region capacity in bytes.
    pub capacity: u64,
    /// Number of slots.
    pub slot_count: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Active,
    Frozen { sealed_on_disk: bool },
    Acknowledged,
    Retiring,
}

#[derive(Debug)]
struct Region {
    slot: u32,
    generation: u64,
    epoch: u64,
    parent_epoch: u64,
    used: u64,
    records: u32,
    index: ExtentMap,
    phase: Phase,
}

impl Region {
    fn meta(&self) -> RegionMeta {
        RegionMeta {
            epoch: self.epoch,
            parent_epoch: self.parent_epoch,
            slot: self.slot,
            generation: self.generation,
            records: self.records,
            used_bytes: self.used,
            sectors: self.index.sectors(),
            acknowledged: matches!(self.phase, Phase::Acknowledged | Phase::Retiring),
        }
    }
}

/// Per-slot bookkeeping of header writes.
#[derive(Debug, Clone, Copy)]
struct SlotBook {
    /// Sequence number of the newest copy written.
    seq: u64,
    /// Copy the newest header went to.
    copy: u8,
    /// Whether that newest copy is known durable.
    durable: bool,
    /// State the newest copy records.
    state: SlotState,
    /// Whether the slot holds a region (active or frozen) in memory.
    in_use: bool,
    /// Whether the slot has held a region before (reuse).
    used_before: bool,
}

/// The checkpoint store over a base image and its region journal.
pub struct Store<F: StoreFile = std::fs::File> {
    base: Arc<F>,
    journal: Arc<F>,
    header: FileHeader,
    geo: Geometry,
    disk_sectors: u64,
    slots: Vec<SlotBook>,
    active: Region,
    /// Oldest first.
    frozen: Vec<Region>,
    base_epoch: u64,
    last_epoch: u64,
    last_acked: u64,
    next_generation: u64,
    high_water: u64,
    journal_dirty: bool,
    cut_wanted: bool,
    poisoned: Option<&'static str>,
    buf: Vec<u8>,
}

impl<F: StoreFile> std::fmt::Debug for Store<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("status", &self.status())
            .finish()
    }
}

impl Store<std::fs::File> {
    /// Opens the store of the raw image at `image` (journal at [`journal_path`]),
    /// creating the journal if it does not exist, and recovers it to `to`.
    ///
    /// Both files are locked exclusively ([`crate::lock`]) before anything is read
    /// or created, so a second process opening the same image or journal gets
    /// [`Error::Locked`]. The locks belong to the store's own open files and are
    /// released when the store and its retire jobs are dropped, or the process dies.
    pub fn open_path(
        image: &Path,
        config: &StoreConfig,
        to: RecoverTo,
    ) -> Result<(Self, RecoveryReport)> {
        let base = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(image)
            .ctx(FileRole::Base, "opening")?;
        lock_exclusive(&base, image, "disk image")?;
        let jp = journal_path(image);
        let journal = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&jp)
            .ctx(FileRole::Journal, "opening")?;
        lock_exclusive(&journal, &jp, "region journal")?;
        Store::open(base, journal, config, to)
    }
}

/// Locks `file` exclusively for as long as it (the store's handle) stays open.
fn lock_exclusive(file: &std::fs::File, path: &Path, what: &'static str) -> Result<()> {
    crate::lock::lock_file(file, path, what, crate::lock::LockKind::Exclusive)?;
    Ok(())
}

impl<F: StoreFile> Store<F> {
    /// Opens a store over `base` and `journal`. A blank journal is created with
    /// `config`'s geometry; an existing one is recovered to `to` (see the recovery
    /// rules in `docs/store-format.md`): sealed regions up to the epoch are committed
    /// into the base image, later ones and active ones dropped. The returned store has
    /// an empty active region and no frozen region; the base image alone holds the
    /// recovered epoch.
    pub fn open(
        base: F,
        journal: F,
        config: &StoreConfig,
        to: RecoverTo,
    ) -> Result<(Self, RecoveryReport)> {
        let base_len = base.len().ctx(FileRole::Base, "reading the length")?;
        if base_len % SECTOR_SIZE != 0 {
            return Err(Error::BaseNotSectorSized(base_len));
        }
        // Whatever we read must be durable before we build on it: a process crash
        // leaves unsynced writes in the page cache, readable but not yet durable.
        journal.sync().ctx(FileRole::Journal, "syncing at open")?;
        base.sync().ctx(FileRole::Base, "syncing at open")?;
        let (header, created) = match journal::read_file_header(&journal)? {
            Some(h) => (h, false),
            None => (create_journal(&journal, config, base_len)?, true),
        };
        if header.base_len != base_len {
            return Err(Error::BaseSizeMismatch {
                expected: header.base_len,
                actual: base_len,
            });
        }
        if config.insist_on_capacity && header.region_capacity != config.region_capacity {
            return Err(Error::RegionSizeMismatch {
                found: header.region_capacity,
                requested: config.region_capacity,
            });
        }
        let high_water = config
            .high_water
            .unwrap_or(header.region_capacity / 4 * 3)
            .min(header.region_capacity);
        let mut plan = recovery::plan(&journal, &header, to)?;
        plan.report.created = created;
        recovery::execute(&base, &journal, &header, &plan)?;
        let geo = header.geometry();
        let slots = plan
            .slots
            .iter()
            .map(|s| SlotBook {
                seq: s.seq,
                copy: s.copy,
                durable: true,
                state: s.state,
                in_use: false,
                used_before: s.state != SlotState::Empty,
            })
            .collect();
        let epoch = plan.report.epoch;
        let mut store = Store {
            base: Arc::new(base),
            journal: Arc::new(journal),
            header,
            geo,
            disk_sectors: base_len / SECTOR_SIZE,
            slots,
            active: Region {
                slot: 0,
                generation: 0,
                epoch: 0,
                parent_epoch: epoch,
                used: 0,
                records: 0,
                index: ExtentMap::new(),
                phase: Phase::Active,
            },
            frozen: Vec::new(),
            base_epoch: epoch,
            last_epoch: epoch,
            last_acked: epoch,
            next_generation: plan.max_generation + 1,
            high_water,
            journal_dirty: false,
            cut_wanted: false,
            poisoned: None,
            buf: Vec::new(),
        };
        store.active = store.activate_free_slot()?;
        Ok((store, plan.report))
    }

    /// The disk's size in bytes (the base image's size).
    pub fn len(&self) -> u64 {
        self.disk_sectors * SECTOR_SIZE
    }

    /// Whether the disk has no sectors.
    pub fn is_empty(&self) -> bool {
        self.disk_sectors == 0
    }

    /// The journal's file header.
    pub fn file_header(&self) -> FileHeader {
        self.header
    }

    fn check(&self) -> Result<()> {
        match self.poisoned {
            Some(what) => Err(Error::Poisoned(what)),
            None => Ok(()),
        }
    }

    fn check_range(&self, sector: u64, len: usize) -> Result<u64> {
        if len == 0 || len as u64 % SECTOR_SIZE != 0 {
            return Err(Error::Unaligned { sector, len });
        }
        let sectors = len as u64 / SECTOR_SIZE;
        if sector
            .checked_add(sectors)
            .is_none_or(|end| end > self.disk_sectors)
        {
            return Err(Error::OutOfRange {
                sector,
                len,
                disk_len: self.len(),
            });
        }
        Ok(sectors)
    }

    /// Writes `data` (a whole number of sectors) at `sector` into the active region.
    /// Never touches the base image and never waits for the disk beyond one buffered
    /// write. Returns [`WriteOutcome::Deferred`] if the region cannot take it now.
    pub fn write(&mut self, sector: u64, data: &[u8]) -> Result<WriteOutcome> {
        self.check()?;
        let sectors = self.check_range(sector, data.len())?;
        let need = record_footprint(data.len() as u64);
        let len = match u32::try_from(data.len()) {
            Ok(len) if need <= self.geo.capacity => len,
            _ => {
                return Err(Error::WriteTooLarge {
                    len: data.len(),
                    capacity: self.geo.capacity,
                })
            }
        };
        if self.active.used + need > self.geo.capacity {
            self.cut_wanted = true;
            return Ok(WriteOutcome::Deferred);
        }
        let rec = format::RecordHeader {
            seq: self.active.records,
            generation: self.active.generation,
            sector,
            len,
            crc: 0,
        };
        let rec = format::RecordHeader {
            crc: rec.checksum(data),
            ..rec
        };
        let at = self.geo.records_offset(self.active.slot) + self.active.used;
        self.buf.clear();
        self.buf.extend_from_slice(&rec.encode());
        self.buf.extend_from_slice(data);
        self.journal
            .write_at(&self.buf, at)
            .ctx(FileRole::Journal, "appending a record")?;
        self.journal_dirty = true;
        self.active
            .index
            .insert(sector, sectors, at + RECORD_HEADER_LEN);
        self.active.used += need;
        self.active.records += 1;
        Ok(WriteOutcome::Written {
            end_epoch_early: self.end_epoch_early(),
        })
    }

    /// Whether the caller should end the epoch early: the active region is past its
    /// high-water mark, or a write was deferred since the last cut.
    pub fn end_epoch_early(&self) -> bool {
        self.cut_wanted || self.active.used >= self.high_water
    }

    /// Reads `buf.len()` bytes (a whole number of sectors) at `sector`: per sector, the
    /// newest of the active region, the frozen regions and the base image.
    pub fn read(&self, sector: u64, buf: &mut [u8]) -> Result<()> {
        self.check()?;
        let sectors = self.check_range(sector, buf.len())?;
        self.read_layer(0, sector, sectors, buf)
    }

    fn layer(&self, i: usize) -> Option<&ExtentMap> {
        if i == 0 {
            Some(&self.active.index)
        } else {
            let n = self.frozen.len();
            (i <= n).then(|| &self.frozen[n - i].index)
        }
    }

    fn read_layer(&self, layer: usize, sector: u64, sectors: u64, buf: &mut [u8]) -> Result<()> {
        let Some(map) = self.layer(layer) else {
            return self
                .base
                .read_at(buf, sector * SECTOR_SIZE)
                .ctx(FileRole::Base, "reading");
        };
        if map.is_empty() {
            return self.read_layer(layer + 1, sector, sectors, buf);
        }
        let mut result = Ok(());
        map.lookup(sector, sectors, |s, n, off| {
            if result.is_err() {
                return;
            }
            let from = to_usize((s - sector) * SECTOR_SIZE);
            let to = from + to_usize(n * SECTOR_SIZE);
            let part = &mut buf[from..to];
            result = match off {
                Some(o) => self
                    .journal
                    .read_at(part, o)
                    .ctx(FileRole::Journal, "reading region data"),
                None => self.read_layer(layer + 1, s, n, part),
            };
        });
        result
    }

    fn sync_journal(&mut self) -> Result<()> {
        if let Err(e) = self.journal.sync() {
            self.poisoned = Some("journal sync");
            return Err(Error::Io {
                file: FileRole::Journal,
                op: "syncing",
                source: e,
            });
        }
        self.journal_dirty = false;
        for s in &mut self.slots {
            s.durable = true;
        }
        Ok(())
    }

    /// Writes a new header copy for `slot`. The copy it overwrites is the older one;
    /// the newer one must be durable first, so a torn write always leaves one valid
    /// copy recording a state the slot really was in.
    fn write_slot_header(&mut self, mut h: SlotHeader) -> Result<()> {
        let slot = h.slot as usize;
        if !self.slots[slot].durable {
            self.sync_journal()?;
        }
        let book = &mut self.slots[slot];
        h.seq = book.seq + 1;
        h.base_epoch = self.base_epoch;
        let copy = 1 - book.copy;
        let at = self.geo.copy_offset(h.slot, copy);
        book.seq = h.seq;
        book.copy = copy;
        book.durable = false;
        book.state = h.state;
        self.journal_dirty = true;
        if let Err(e) = self.journal.write_at(&h.encode(), at) {
            // The slot's newest copy is now unknown: refuse to go on.
            self.poisoned = Some("slot header write");
            return Err(Error::Io {
                file: FileRole::Journal,
                op: "writing a slot header",
                source: e,
            });
        }
        Ok(())
    }

    fn region_header(r: &Region, state: SlotState) -> SlotHeader {
        SlotHeader {
            slot: r.slot,
            seq: 0,
            state,
            record_count: if state == SlotState::Active {
                0
            } else {
                r.records
            },
            generation: r.generation,
            epoch: r.epoch,
            parent_epoch: r.parent_epoch,
            used_bytes: if state == SlotState::Active {
                0
            } else {
                r.used
            },
            base_epoch: 0,
        }
    }

    fn free_slot(&self) -> Option<u32> {
        (0u32..)
            .zip(&self.slots)
            .find(|(_, s)| !s.in_use && s.state.is_free())
            .map(|(i, _)| i)
    }

    fn activate_free_slot(&mut self) -> Result<Region> {
        let slot = self.free_slot().ok_or(Error::NoFreeRegion {
            epoch: self.last_epoch + 1,
            frozen: self.frozen.len(),
        })?;
        let r = Region {
            slot,
            generation: self.next_generation,
            epoch: 0,
            parent_epoch: self.last_epoch,
            used: 0,
            records: 0,
            index: ExtentMap::new(),
            phase: Phase::Active,
        };
        self.next_generation += 1;
        self.write_slot_header(Self::region_header(&r, SlotState::Active))?;
        let book = &mut self.slots[slot as usize];
        book.in_use = true;
        Ok(r)
    }

    /// Makes the active region's records durable (and seals any frozen region not yet
    /// sealed on disk). A guest FLUSH with a checkpoint sink maps to this.
    pub fn flush(&mut self) -> Result<()> {
        self.check()?;
        if !self.seal_pending()? && self.journal_dirty {
            self.sync_journal()?;
        }
        Ok(())
    }

    /// Cuts checkpoint `epoch` (call with the vCPUs paused): the active region is
    /// frozen as region `epoch` and a free slot becomes the active region. No fsync
    /// happens here; the frozen region is sealed durably by the next
    /// [`export`](Self::export), [`export_meta`](Self::export_meta),
    /// [`acknowledge`](Self::acknowledge) or [`flush`](Self::flush). Fails with
    /// [`Error::NoFreeRegion`] when every slot is taken (the oldest frozen region is
    /// not retired yet): postpone the cut, or wait with [`SharedStore`].
    pub fn start_checkpoint(&mut self, epoch: u64) -> Result<()> {
        self.check()?;
        self.check_can_cut(epoch)?;
        let prev_last = self.last_epoch;
        self.last_epoch = epoch;
        let next = match self.activate_free_slot() {
            Ok(r) => r,
            Err(e) => {
                self.last_epoch = prev_last;
                return Err(e);
            }
        };
        let mut old = std::mem::replace(&mut self.active, next);
        old.epoch = epoch;
        old.parent_epoch = prev_last;
        old.phase = Phase::Frozen {
            sealed_on_disk: false,
        };
        self.frozen.push(old);
        self.cut_wanted = false;
        Ok(())
    }

    /// Whether checkpoint `epoch` can be cut now: it must follow the last one, and a
    /// slot must be free for the next active region.
    fn check_can_cut(&self, epoch: u64) -> Result<()> {
        if epoch <= self.last_epoch {
            return Err(Error::EpochNotIncreasing {
                epoch,
                last: self.last_epoch,
            });
        }
        if self.free_slot().is_none() {
            return Err(Error::NoFreeRegion {
                epoch,
                frozen: self.frozen.len(),
            });
        }
        Ok(())
    }

    /// Seals every frozen region not yet sealed on disk: its records are synced, then
    /// its sealed header is written and synced. Returns whether it synced.
    fn seal_pending(&mut self) -> Result<bool> {
        let pending: Vec<usize> = (0..self.frozen.len())
            .filter(|&i| {
                self.frozen[i].phase
                    == Phase::Frozen {
                        sealed_on_disk: false,
                    }
            })
            .collect();
        if pending.is_empty() {
            return Ok(false);
        }
        self.sync_journal()?;
        for &i in &pending {
            let h = Self::region_header(&self.frozen[i], SlotState::Sealed);
            self.write_slot_header(h)?;
        }
        self.sync_journal()?;
        for &i in &pending {
            self.frozen[i].phase = Phase::Frozen {
                sealed_on_disk: true,
            };
        }
        Ok(true)
    }

    fn frozen_index(&self, epoch: u64) -> Result<usize> {
        self.frozen
            .iter()
            .position(|r| r.epoch == epoch)
            .ok_or(Error::NoSuchRegion(epoch))
    }

    /// Seals frozen region `epoch` durably and returns its metadata: what a peer on
    /// shared storage needs.
    pub fn export_meta(&mut self, epoch: u64) -> Result<RegionMeta> {
        self.check()?;
        let i = self.frozen_index(epoch)?;
        self.seal_pending()?;
        Ok(self.frozen[i].meta())
    }

    /// Seals frozen region `epoch` durably and returns its metadata and data: what a
    /// peer with its own disk copy needs.
    pub fn export(&mut self, epoch: u64) -> Result<Export> {
        let meta = self.export_meta(epoch)?;
        let i = self.frozen_index(epoch)?;
        let mut extents = Vec::new();
        for e in self.frozen[i].index.extents() {
            let mut data = vec![0u8; to_usize(e.sectors * SECTOR_SIZE)];
            self.journal
                .read_at(&mut data, e.offset)
                .ctx(FileRole::Journal, "reading region data")?;
            extents.push(ExportExtent {
                sector: e.sector,
                data,
            });
        }
        Ok(Export { meta, extents })
    }

    /// The inverse of [`export`](Self::export), on a standby's own copy of the disk:
    /// writes every extent of `region` into the (empty) active region, freezes it as
    /// region `region.meta.epoch`, and seals it durably. The store then holds that
    /// region exactly as the primary's did, and retires it like any other. Refused
    /// if the active region already holds writes, if the epoch does not follow the
    /// store's last one, or if the data does not fit one region; nothing is frozen
    /// then (a partly written active region is dropped with [`rollback`](Self::rollback)).
    pub fn import(&mut self, region: &Export) -> Result<RegionMeta> {
        self.check()?;
        let epoch = region.meta.epoch;
        if self.active.records != 0 {
            return Err(Error::ImportIntoBusyRegion {
                epoch,
                records: self.active.records,
            });
        }
        // Refused before anything is written.
        self.check_can_cut(epoch)?;
        let need = region
            .extents
            .iter()
            .map(|e| record_footprint(e.data.len() as u64))
            .fold(0u64, u64::saturating_add);
        if need > self.geo.capacity {
            return Err(Error::ImportTooLarge {
                epoch,
                capacity: self.geo.capacity,
            });
        }
        for e in &region.extents {
            match self.write(e.sector, &e.data) {
                Ok(WriteOutcome::Written { .. }) => {}
                Ok(WriteOutcome::Deferred) => {
                    self.rollback()?;
                    return Err(Error::ImportTooLarge {
                        epoch,
                        capacity: self.geo.capacity,
                    });
                }
                Err(err) => {
                    let _ = self.rollback();
                    return Err(err);
                }
            }
        }
        self.start_checkpoint(epoch)?;
        self.export_meta(epoch)
    }

    /// Records durably that the peer holds checkpoint `epoch`.
    pub fn acknowledge(&mut self, epoch: u64) -> Result<()> {
        self.check()?;
        let i = self.frozen_index(epoch)?;
        if matches!(self.frozen[i].phase, Phase::Acknowledged | Phase::Retiring) {
            return Ok(());
        }
        self.seal_pending()?;
        let h = Self::region_header(&self.frozen[i], SlotState::Acknowledged);
        self.write_slot_header(h)?;
        self.sync_journal()?;
        self.frozen[i].phase = Phase::Acknowledged;
        self.last_acked = self.last_acked.max(epoch);
        Ok(())
    }

    /// Retires acknowledged checkpoint `epoch` (the oldest frozen one) in one go:
    /// commits its region into the base image, makes the base durable, then frees
    /// the slot durably. To keep the copy off the device loop use
    /// [`prepare_retire`](Self::prepare_retire) and friends instead.
    pub fn retire(&mut self, epoch: u64) -> Result<()> {
        let job = self.prepare_retire(epoch)?;
        let result = job.run();
        self.finish_retire(job, result)
    }

    /// Starts retiring acknowledged checkpoint `epoch`, which must be the oldest frozen
    /// one. The returned job does the I/O ([`RetireJob::run`]) without the store, so it
    /// can run on another thread while the device keeps writing and reading; then hand
    /// it back to [`finish_retire`](Self::finish_retire).
    pub fn prepare_retire(&mut self, epoch: u64) -> Result<RetireJob<F>> {
        self.check()?;
        let oldest = self.frozen.first().ok_or(Error::NoSuchRegion(epoch))?;
        if oldest.epoch != epoch {
            self.frozen_index(epoch)?;
            return Err(Error::RetireOutOfOrder {
                epoch,
                oldest: oldest.epoch,
            });
        }
        match oldest.phase {
            Phase::Acknowledged => {}
            Phase::Retiring => return Err(Error::RetireInProgress(epoch)),
            _ => return Err(Error::NotAcknowledged(epoch)),
        }
        let slot = oldest.slot as usize;
        if !self.slots[slot].durable {
            self.sync_journal()?;
        }
        let r = &self.frozen[0];
        let mut h = Self::region_header(r, SlotState::Retired);
        h.base_epoch = epoch;
        let book = &mut self.slots[slot];
        h.seq = book.seq + 1;
        let copy = 1 - book.copy;
        let job = RetireJob {
            base: Arc::clone(&self.base),
            journal: Arc::clone(&self.journal),
            extents: r.index.extents().collect(),
            header: h.encode(),
            header_offset: self.geo.copy_offset(h.slot, copy),
            epoch,
            slot: h.slot,
        };
        book.seq = h.seq;
        book.copy = copy;
        book.durable = false;
        book.state = SlotState::Retired;
        self.frozen[0].phase = Phase::Retiring;
        Ok(job)
    }

    /// Completes a retire with the result of its [`RetireJob::run`]. On success the
    /// base image holds the epoch and the slot is free. On failure the store is
    /// poisoned (the base image is half-written): reopen it, and recovery redoes the
    /// retire.
    pub fn finish_retire(&mut self, job: RetireJob<F>, result: Result<()>) -> Result<()> {
        if let Err(e) = result {
            self.poisoned = Some("retire");
            return Err(e);
        }
        let Some(r) = self.frozen.first() else {
            return Err(Error::NoSuchRegion(job.epoch));
        };
        if r.epoch != job.epoch || r.phase != Phase::Retiring {
            return Err(Error::NoSuchRegion(job.epoch));
        }
        self.frozen.remove(0);
        self.base_epoch = job.epoch;
        let book = &mut self.slots[job.slot as usize];
        book.in_use = false;
        book.durable = true;
        book.used_before = true;
        Ok(())
    }

    /// Drops the active region: its writes, which no checkpoint covers, are gone
    /// (a peer taking over does this). Frozen regions are kept.
    pub fn rollback(&mut self) -> Result<()> {
        self.check()?;
        if self.active.records == 0 && self.active.used == 0 {
            return Ok(());
        }
        let mut r = Region {
            slot: self.active.slot,
            generation: self.next_generation,
            epoch: 0,
            parent_epoch: self.last_epoch,
            used: 0,
            records: 0,
            index: ExtentMap::new(),
            phase: Phase::Active,
        };
        self.next_generation += 1;
        // A new generation in the same slot: the old records can never match it.
        self.write_slot_header(Self::region_header(&r, SlotState::Active))?;
        std::mem::swap(&mut self.active, &mut r);
        self.cut_wanted = false;
        Ok(())
    }

    /// Local policy (no peer): cuts checkpoint `epoch`, then acknowledges and retires
    /// every frozen region, so the base image alone holds the disk. A FLUSH, a full
    /// region and a clean shutdown use this until a checkpoint sink exists.
    pub fn commit_local(&mut self, epoch: u64) -> Result<()> {
        self.check()?;
        while let Some(r) = self.frozen.first() {
            let e = r.epoch;
            self.acknowledge(e)?;
            self.retire(e)?;
        }
        self.start_checkpoint(epoch)?;
        self.acknowledge(epoch)?;
        self.retire(epoch)
    }

    /// A snapshot of the store's state.
    pub fn status(&self) -> Status {
        // One entry per slot, and the slot count is a u32: the count fits.
        #[allow(clippy::cast_possible_truncation)]
        let free_slots = self
            .slots
            .iter()
            .filter(|s| !s.in_use && s.state.is_free())
            .count() as u32;
        Status {
            active_slot: self.active.slot,
            active_generation: self.active.generation,
            active_used: self.active.used,
            active_records: self.active.records,
            active_slot_reused: self.slots[self.active.slot as usize].used_before,
            frozen: self.frozen.iter().map(Region::meta).collect(),
            base_epoch: self.base_epoch,
            last_epoch: self.last_epoch,
            last_acknowledged: self.last_acked,
            free_slots,
            end_epoch_early: self.end_epoch_early(),
            capacity: self.geo.capacity,
            slot_count: self.geo.slot_count,
        }
    }
}

/// The I/O of a retire, detached from the store so it can run off the device loop.
#[derive(Debug)]
pub struct RetireJob<F: StoreFile = std::fs::File> {
    base: Arc<F>,
    journal: Arc<F>,
    extents: Vec<Extent>,
    header: [u8; format::SLOT_HEADER_LEN],
    header_offset: u64,
    epoch: u64,
    slot: u32,
}

impl<F: StoreFile> RetireJob<F> {
    /// The epoch being retired.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Copies the region into the base image, syncs the base, then writes and syncs
    /// the slot's retired header. Safe to run while the store keeps serving the
    /// active region: it touches only the base image and this slot's header.
    pub fn run(&self) -> Result<()> {
        copy_extents(&*self.base, &*self.journal, &self.extents)?;
        self.base
            .sync()
            .ctx(FileRole::Base, "syncing after retire")?;
        self.journal
            .write_at(&self.header, self.header_offset)
            .ctx(FileRole::Journal, "writing the retired header")?;
        self.journal
            .sync()
            .ctx(FileRole::Journal, "syncing after retire")
    }
}

/// Copies a region's extents (in sector order) from the journal into the base image.
/// Extents that continue one another on the disk are gathered into one buffer and
/// written with one call (up to 1 MiB), so a region written as many small sequential
/// records costs few large base writes.
fn copy_extents<F: StoreFile + ?Sized>(base: &F, journal: &F, extents: &[Extent]) -> Result<()> {
    const CHUNK: u64 = 1 << 20;
    let mut buf: Vec<u8> = Vec::new();
    // The pending run: first sector and bytes gathered in `buf`.
    let mut run_sector = 0u64;
    let flush = |buf: &mut Vec<u8>, sector: u64| -> Result<()> {
        if !buf.is_empty() {
            base.write_at(buf, sector * SECTOR_SIZE)
                .ctx(FileRole::Base, "writing retired data")?;
            buf.clear();
        }
        Ok(())
    };
    for e in extents {
        let bytes = e.sectors * SECTOR_SIZE;
        let mut done = 0;
        while done < bytes {
            let sector = e.sector + done / SECTOR_SIZE;
            let contiguous =
                !buf.is_empty() && run_sector + buf.len() as u64 / SECTOR_SIZE == sector;
            if !contiguous || buf.len() as u64 >= CHUNK {
                flush(&mut buf, run_sector)?;
                run_sector = sector;
            }
            let room = CHUNK - buf.len() as u64;
            let n = (bytes - done).min(room.max(SECTOR_SIZE));
            let at = buf.len();
            buf.resize(at + to_usize(n), 0);
            journal
                .read_at(&mut buf[at..], e.offset + done)
                .ctx(FileRole::Journal, "reading region data to retire")?;
            done += n;
        }
    }
    flush(&mut buf, run_sector)
}

fn create_journal<F: StoreFile>(j: &F, config: &StoreConfig, base_len: u64) -> Result<FileHeader> {
    // Random, so that a journal recreated over the same image (same size, same
    // epoch, same moment) is still told apart from the one a checkpoint recorded.
    let journal_id = getrandom::u64().map_err(Error::JournalId)?;
    let h = FileHeader {
        version: FORMAT_VERSION,
        slot_count: config.slot_count,
        region_capacity: config.region_capacity,
        base_len,
        created_epoch: config.created_epoch,
        journal_id,
    };
    h.validate().map_err(|e| Error::Config(Box::new(e)))?;
    let len = h.geometry().journal_len();
    j.set_len(0).ctx(FileRole::Journal, "creating")?;
    j.set_len(len).ctx(FileRole::Journal, "creating")?;
    if config.preallocate {
        // Zeros everywhere but the header, which comes last: a crash before it leaves
        // a blank journal.
        let zeros = vec![0u8; (1 << 20).min(to_usize(len))];
        let mut pos = format::FILE_HEADER_AREA;
        while pos < len {
            let n = to_usize((len - pos).min(zeros.len() as u64));
            j.write_at(&zeros[..n], pos)
                .ctx(FileRole::Journal, "preallocating")?;
            pos += n as u64;
        }
    }
    j.write_at(&h.encode(), 0)
        .ctx(FileRole::Journal, "writing the file header")?;
    j.sync().ctx(FileRole::Journal, "syncing the new journal")?;
    Ok(h)
}

mod recovery {
    //! The recovery rules (docs/store-format.md, "Recovery").

    use super::*;
    use crate::store::journal::{read_slot, scan_sealed};

    #[derive(Debug, Clone, Copy)]
    pub(super) struct SlotAfter {
        pub seq: u64,
        pub copy: u8,
        pub state: SlotState,
    }

    pub(super) struct Plan {
        pub report: RecoveryReport,
        /// Slot headers to write before the base is touched (drops), synced.
        pub drops: Vec<(SlotHeader, u8)>,
        /// Regions to commit, oldest first, with their extents.
        pub redo: Vec<(SlotHeader, ExtentMap)>,
        /// Headers to write after the base is durable.
        pub retires: Vec<(SlotHeader, u8)>,
        /// Each slot's bookkeeping once the plan has run.
        pub slots: Vec<SlotAfter>,
        pub max_generation: u64,
    }

    /// Reads the journal and decides what recovery to `to` does, without writing.
    pub(super) fn plan<F: StoreFile>(j: &F, h: &FileHeader, to: RecoverTo) -> Result<Plan> {
        let geo = h.geometry();
        let disk_sectors = h.base_len / SECTOR_SIZE;
        let mut reads = Vec::new();
        let mut base_epoch = h.created_epoch;
        let mut max_generation = 0;
        for slot in 0..geo.slot_count {
            let r = read_slot(j, &geo, slot)?;
            for c in r.copies.iter().flatten() {
                base_epoch = base_epoch.max(c.base_epoch);
                max_generation = max_generation.max(c.generation);
                if c.state == SlotState::Retired {
                    base_epoch = base_epoch.max(c.epoch);
                }
            }
            reads.push(r);
        }
        // Sealed regions the base does not hold yet, by epoch.
        let mut sealed: Vec<SlotHeader> = reads
            .iter()
            .filter_map(|r| r.chosen)
            .filter(|c| c.state.is_sealed() && c.epoch > base_epoch)
            .collect();
        sealed.sort_by_key(|c| c.epoch);
        for w in sealed.windows(2) {
            if w[0].epoch == w[1].epoch {
                return Err(Error::DuplicateEpoch {
                    epoch: w[0].epoch,
                    a: w[0].slot,
                    b: w[1].slot,
                });
            }
        }
        let target = match to {
            RecoverTo::Epoch(n) => n,
            RecoverTo::LastAcknowledged => sealed
                .iter()
                .filter(|c| c.state == SlotState::Acknowledged)
                .map(|c| c.epoch)
                .max()
                .unwrap_or(base_epoch),
        };
        if target < base_epoch {
            return Err(Error::EpochRetired {
                requested: target,
                base: base_epoch,
            });
        }
        // The region next in line for retirement, once acknowledged, may be half
        // written into the base: the base no longer holds any epoch before it.
        if let Some(next) = sealed
            .iter()
            .find(|c| c.parent_epoch == base_epoch && c.state == SlotState::Acknowledged)
        {
            if target < next.epoch {
                return Err(Error::RetireMayHaveBegun {
                    requested: target,
                    acknowledged: next.epoch,
                });
            }
        }
        // Follow the chain from the target back to the base.
        let mut chain = Vec::new();
        let mut cur = target;
        while cur > base_epoch {
            let Some(c) = sealed.iter().find(|c| c.epoch == cur) else {
                return Err(Error::RegionMissing {
                    requested: target,
                    missing: cur,
                    base: base_epoch,
                });
            };
            if c.parent_epoch < base_epoch {
                return Err(Error::BrokenChain {
                    epoch: c.epoch,
                    parent: c.parent_epoch,
                    base: base_epoch,
                });
            }
            chain.push(*c);
            cur = c.parent_epoch;
        }
        chain.reverse();
        let mut redo = Vec::new();
        for c in &chain {
            let mut index = ExtentMap::new();
            scan_sealed(j, &geo, c, disk_sectors, |rec| {
                index.insert(
                    rec.sector,
                    u64::from(rec.len) / SECTOR_SIZE,
                    rec.data_offset,
                )
            })?;
            redo.push((*c, index));
        }
        let mut report = RecoveryReport {
            epoch: target,
            base_epoch_before: base_epoch,
            redone: chain.iter().map(|c| c.epoch).collect(),
            ..Default::default()
        };
        let mut drops = Vec::new();
        let mut retires = Vec::new();
        let mut slots = Vec::new();
        let mut next_gen = max_generation;
        for (slot, r) in (0u32..).zip(reads.iter()) {
            let mut seq = r.copies.iter().flatten().map(|c| c.seq).max().unwrap_or(0);
            let mut copy = r.chosen_copy;
            let mut state = r.chosen.map_or(SlotState::Empty, |c| c.state);
            let mut push = |list: &mut Vec<(SlotHeader, u8)>, mut h: SlotHeader, st: SlotState| {
                seq += 1;
                copy = 1 - copy;
                h.seq = seq;
                h.state = st;
                list.push((h, copy));
                state = st;
            };
            if let Some(c) = r.chosen {
                if chain.iter().any(|x| x.slot == slot) {
                    let mut h = c;
                    h.base_epoch = target;
                    push(&mut retires, h, SlotState::Retired);
                } else if c.state.is_sealed() && c.epoch <= base_epoch {
                    // Already in the base (its retire's header was lost): mark it.
                    let mut h = c;
                    h.base_epoch = base_epoch;
                    push(&mut drops, h, SlotState::Retired);
                } else if c.state.is_sealed() {
                    report.dropped.push(c.epoch);
                    let mut h = c;
                    h.base_epoch = base_epoch;
                    push(&mut drops, h, SlotState::Dropped);
                } else if c.state == SlotState::Active {
                    report.discarded_active += 1;
                    next_gen += 1;
                    let h = SlotHeader {
                        slot,
                        seq: 0,
                        state: SlotState::Dropped,
                        record_count: 0,
                        generation: next_gen,
                        epoch: 0,
                        parent_epoch: 0,
                        used_bytes: 0,
                        base_epoch,
                    };
                    push(&mut drops, h, SlotState::Dropped);
                }
            } else if r
                .copies
                .iter()
                .any(|c| matches!(c, Err(format::CopyProblem::Invalid(_))))
            {
                // A torn header write: settle the slot as dropped.
                next_gen += 1;
                let h = SlotHeader {
                    slot,
                    seq: 0,
                    state: SlotState::Dropped,
                    record_count: 0,
                    generation: next_gen,
                    epoch: 0,
                    parent_epoch: 0,
                    used_bytes: 0,
                    base_epoch,
                };
                push(&mut drops, h, SlotState::Dropped);
            }
            slots.push(SlotAfter { seq, copy, state });
        }
        report.dropped.sort_unstable();
        Ok(Plan {
            report,
            drops,
            redo,
            retires,
            slots,
            max_generation: next_gen,
        })
    }

    /// Carries out a plan. Each step is made durable before the next, so a crash at
    /// any point leaves a journal that recovers to the same epoch again.
    pub(super) fn execute<F: StoreFile>(
        base: &F,
        j: &F,
        h: &FileHeader,
        plan: &Plan,
    ) -> Result<()> {
        let geo = h.geometry();
        let write = |list: &[(SlotHeader, u8)]| -> Result<()> {
            for (s, copy) in list {
                j.write_at(&s.encode(), geo.copy_offset(s.slot, *copy))
                    .ctx(FileRole::Journal, "writing a slot header in recovery")?;
            }
            if !list.is_empty() {
                j.sync().ctx(FileRole::Journal, "syncing in recovery")?;
            }
            Ok(())
        };
        // 1. Later regions and stale states are settled first: once the base moves,
        //    nothing later than the target may still look replayable.
        write(&plan.drops)?;
        // 2. Redo, oldest first; idempotent, so a torn earlier attempt is harmless.
        for (_, index) in &plan.redo {
            let extents: Vec<Extent> = index.extents().collect();
            copy_extents(base, j, &extents)?;
        }
        if !plan.redo.is_empty() {
            base.sync().ctx(FileRole::Base, "syncing in recovery")?;
        }
        // 3. Only then do the regions become retired.
        write(&plan.retires)
    }
}

/// A store shared between the device loop and the replication thread, with a way
/// to wait for a free slot at a cut.
#[derive(Debug)]
pub struct SharedStore<F: StoreFile = std::fs::File> {
    inner: Mutex<Store<F>>,
    freed: Condvar,
}

impl<F: StoreFile> SharedStore<F> {
    /// Wraps a store.
    pub fn new(store: Store<F>) -> Arc<Self> {
        Arc::new(SharedStore {
            inner: Mutex::new(store),
            freed: Condvar::new(),
        })
    }

    /// Locks the store for a short operation (a write, a read, a cut).
    pub fn lock(&self) -> MutexGuard<'_, Store<F>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Cuts checkpoint `epoch`, waiting up to `timeout` for a slot to be freed by a
    /// retire on another thread. Never call this on the device loop.
    pub fn start_checkpoint_wait(&self, epoch: u64, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut g = self.lock();
        loop {
            match g.start_checkpoint(epoch) {
                Err(Error::NoFreeRegion { .. }) => {}
                other => return other,
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::WaitTimedOut { epoch });
            }
            g = self
                .freed
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Retires `epoch` holding the lock only to start and finish: the copy into the
    /// base image runs unlocked, so the device loop keeps going. Wakes cut waiters.
    pub fn retire(&self, epoch: u64) -> Result<()> {
        let job = self.lock().prepare_retire(epoch)?;
        let result = job.run();
        let r = self.lock().finish_retire(job, result);
        self.freed.notify_all();
        r
    }
}
