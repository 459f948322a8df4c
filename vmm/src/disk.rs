//! Disks: opening and checking a `--disk` image, and attaching it to the machine as
//! a virtio-blk device on the virtio-mmio transport.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::EventFd;

use devices::bus::Bus;
use devices::store::{SharedStore, Store, StoreConfig, WriteOutcome};
use devices::virtio::block::{
    id_from_path, restore_with_transport, Block, BlockError, BlockState, DiskBackend, RawFile,
};
use devices::virtio::mmio::{
    MmioError, MmioTransport, MmioTransportState, MMIO_LEN, NOTIFY_REG_OFFSET,
};
use devices::virtio::StateError;

use crate::config::DiskConfig;
use crate::memory::GuestMemory;

/// Failures while opening or attaching a disk.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The image is a standby's copy whose initial copy never completed.
    #[error("disk image {0} is an incomplete copy (a standby's initial copy did not finish; its marker file IMAGE.incomplete says so): it holds no consistent disk and is never used")]
    IncompleteCopy(PathBuf),
    /// The image cannot be opened.
    #[error("cannot open disk image {path}")]
    Open {
        /// The image.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The image is not a regular file or block device.
    #[error("disk image {0} is not a regular file")]
    NotAFile(PathBuf),
    /// The image size is not whole sectors.
    #[error("disk image {path} is {size} bytes, not a multiple of 512 (the sector size)")]
    NotSectorAligned {
        /// The image.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// The checkpoint store could not be opened or recovered.
    #[error("disk {path}")]
    Store {
        /// The image.
        path: PathBuf,
        /// Cause.
        source: devices::store::Error,
    },
    /// Another process holds the image (the lock error names it and the holder).
    #[error(transparent)]
    Locked(#[from] devices::lock::LockError),
    /// The image is empty.
    #[error("disk image {0} is empty")]
    Empty(PathBuf),
    /// A region size was given for a disk without a checkpoint journal.
    #[error("disk {0}: region-size sizes the checkpoint journal, which only a disk with checkpoint=on has")]
    RegionSizeWithoutJournal(PathBuf),
    /// More disks than interrupt lines.
    #[error("{0} disks requested; at most {max} fit the interrupt lines", max = crate::layout::MAX_GSI - crate::layout::VIRTIO_FIRST_GSI + 1)]
    TooMany(usize),
    /// The virtio-blk device could not be created.
    #[error("cannot create the virtio-blk device for {path}")]
    Block {
        /// The image.
        path: PathBuf,
        /// Cause.
        source: BlockError,
    },
    /// The virtio-mmio transport could not be created.
    #[error("cannot create the virtio-mmio transport for {path}")]
    Transport {
        /// The image.
        path: PathBuf,
        /// Cause.
        source: MmioError,
    },
    /// The saved device state does not fit.
    #[error("cannot restore the state of disk {path}")]
    RestoreState {
        /// The image.
        path: PathBuf,
        /// Cause.
        source: StateError,
    },
    /// The queue notification eventfds could not be created.
    #[error("cannot create the queue notifiers of disk {path}")]
    QueueEvents {
        /// The image.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Registering the device's eventfds with KVM failed.
    #[error("cannot register {what} for disk {path} with KVM")]
    Kvm {
        /// The image.
        path: PathBuf,
        /// ioeventfd or irqfd.
        what: &'static str,
        /// Cause.
        source: kvm_ioctls::Error,
    },
    /// The device window could not be placed on the MMIO bus.
    #[error("cannot place disk {path} on the MMIO bus")]
    Bus {
        /// The image.
        path: PathBuf,
        /// Cause.
        source: devices::bus::BusError,
    },
}

/// A checked, open disk image.
pub struct OpenDisk {
    /// The image file (for a checkpointed disk, the store holds its own handle).
    pub file: File,
    /// The checkpoint store over the image, for `checkpoint=on`.
    pub store: Option<Arc<SharedStore>>,
    /// Its path, for messages and the device id.
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
    /// Guest writes refused.
    pub readonly: bool,
}

/// Opens and checks a disk image: it must exist, be a non-empty regular file, and be
/// whole 512-byte sectors.
/// With `checkpoint=on`, the store's journal is opened (created if missing) and
/// recovered to `to` (`None`: the last acknowledged checkpoint).
///
/// The image is locked against other processes (`devices::lock`): a raw disk
/// exclusively, or shared with `readonly=on` (read-only opens coexist), through
/// `OpenDisk::file` itself, whose open file description the `RawFile` backend keeps
/// while the disk is attached, so the lock lasts exactly as long; with
/// `checkpoint=on` the store holds exclusive locks on the image and its journal.
/// The marker file saying that `image` is an incomplete copy: `IMAGE.incomplete`. A
/// standby creates it (durably) before its initial copy overwrites the image and
/// removes it once the first checkpoint completed the copy; a disk with the marker is
/// never opened.
pub fn incomplete_marker(image: &Path) -> PathBuf {
    let mut s = image.as_os_str().to_owned();
    s.push(".incomplete");
    PathBuf::from(s)
}

/// Marks `image` durably as an incomplete copy (the marker and its directory entry
/// are synced).
pub fn mark_incomplete(image: &Path) -> std::io::Result<()> {
    let marker = incomplete_marker(image);
    let f = std::fs::File::create(&marker)?;
    f.sync_all()?;
    sync_parent(&marker)
}

/// Removes the incomplete-copy mark of `image`, durably.
pub fn clear_incomplete(image: &Path) -> std::io::Result<()> {
    let marker = incomplete_marker(image);
    match std::fs::remove_file(&marker) {
        Ok(()) => sync_parent(&marker),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn sync_parent(p: &Path) -> std::io::Result<()> {
    let dir = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

pub fn open(cfg: &DiskConfig, to: Option<u64>) -> Result<OpenDisk, DiskError> {
    let path = cfg.path.clone();
    if incomplete_marker(&path).exists() {
        return Err(DiskError::IncompleteCopy(path));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(!cfg.readonly)
        .open(&path)
        .map_err(|source| DiskError::Open {
            path: path.clone(),
            source,
        })?;
    let meta = file.metadata().map_err(|source| DiskError::Open {
        path: path.clone(),
        source,
    })?;
    if !meta.is_file() {
        return Err(DiskError::NotAFile(path));
    }
    let size = meta.len();
    if size == 0 {
        return Err(DiskError::Empty(path));
    }
    if size % 512 != 0 {
        return Err(DiskError::NotSectorAligned { path, size });
    }
    if !cfg.checkpoint && cfg.region_size.is_some() {
        return Err(DiskError::RegionSizeWithoutJournal(path));
    }
    if !cfg.checkpoint {
        // On `file`'s open file description: it stays held while `file`, moved into
        // the RawFile backend by `attach`, is open (not tied to any guard value).
        let kind = if cfg.readonly {
            devices::lock::LockKind::Shared
        } else {
            devices::lock::LockKind::Exclusive
        };
        devices::lock::lock_file(&file, &path, "disk image", kind)?;
    }
    let store = if cfg.checkpoint {
        let (store, report) = Store::open_path(
            &path,
            &StoreConfig::for_disk(size, cfg.region_size),
            to.into(),
        )
        .map_err(|source| {
            match source {
                // The lock error names the image and its holder already.
                devices::store::Error::Locked(e) => DiskError::Locked(e),
                source => DiskError::Store {
                    path: path.clone(),
                    source,
                },
            }
        })?;
        if !report.redone.is_empty() || !report.dropped.is_empty() || report.discarded_active > 0 {
            tracing::warn!(
                "disk {}: recovered its journal to epoch {} (redone {:?}, dropped {:?}, {} unacknowledged region(s) discarded)",
                path.display(),
                report.epoch,
                report.redone,
                report.dropped,
                report.discarded_active
            );
        }
        Some(SharedStore::new(store))
    } else {
        None
    };
    // Kept absolute, so a checkpoint names the same image from any directory.
    let path = std::fs::canonicalize(&path).unwrap_or(path);
    Ok(OpenDisk {
        file,
        path,
        size,
        readonly: cfg.readonly,
        store,
    })
}

/// A virtio-blk disk as attached: the device, its transport, and where it came from.
pub struct AttachedDisk {
    /// The block device (also an event-loop subscriber).
    pub block: Arc<Mutex<Block>>,
    /// Its virtio-mmio transport (on the MMIO bus).
    pub transport: Arc<Mutex<MmioTransport>>,
    /// The image path.
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
    /// Whether the guest may not write.
    pub readonly: bool,
    /// The checkpoint store, for `checkpoint=on`.
    pub store: Option<Arc<SharedStore>>,
}

/// Attaches an open disk as virtio-blk on a virtio-mmio window at `base` with
/// interrupt `gsi`: queue notifications arrive through KVM ioeventfds (no exit to
/// user space), interrupts leave through an irqfd, and the device's queue work runs
/// on the event loop `events`. With `saved`, the transport and device continue from
/// a checkpoint's state (call `MmioTransport::post_restore` once the vCPUs are
/// restored).
#[allow(clippy::too_many_arguments)]
pub fn attach(
    disk: OpenDisk,
    vm: &VmFd,
    mem: &GuestMemory,
    mmio: &mut Bus,
    events: &mut EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    base: u64,
    gsi: u32,
    saved: Option<&(MmioTransportState, BlockState)>,
    mode: &StoreMode,
) -> Result<AttachedDisk, DiskError> {
    let path = disk.path;
    let backend: Box<dyn DiskBackend> = match &disk.store {
        Some(store) => Box::new(CheckpointedDisk {
            max_write: max_request_len(store.lock().file_header().region_capacity),
            store: store.clone(),
            size: disk.size,
            mode: mode.clone(),
        }),
        None => Box::new(RawFile::new(disk.file, disk.size)),
    };
    let id = id_from_path(&path);
    let (block, transport) = match saved {
        None => {
            let block =
                Block::new(backend, disk.readonly, &id).map_err(|source| DiskError::Block {
                    path: path.clone(),
                    source,
                })?;
            let block = Arc::new(Mutex::new(block));
            let transport = MmioTransport::new(block.clone(), mem.clone()).map_err(|source| {
                DiskError::Transport {
                    path: path.clone(),
                    source,
                }
            })?;
            (block, transport)
        }
        Some((t, b)) => restore_with_transport(backend, disk.readonly, &id, b, t, mem.clone())
            .map_err(|source| DiskError::RestoreState {
                path: path.clone(),
                source,
            })?,
    };
    let queue_events = transport
        .queue_events()
        .map_err(|source| DiskError::QueueEvents {
            path: path.clone(),
            source,
        })?;
    for (queue, evt) in queue_events {
        // KVM keeps its own reference to the eventfd; our duplicate may be dropped.
        vm.register_ioevent(&evt, &IoEventAddress::Mmio(base + NOTIFY_REG_OFFSET), queue)
            .map_err(|source| DiskError::Kvm {
                path: path.clone(),
                what: "an ioeventfd",
                source,
            })?;
    }
    vm.register_irqfd(transport.interrupt_evt(), gsi)
        .map_err(|source| DiskError::Kvm {
            path: path.clone(),
            what: "an irqfd",
            source,
        })?;
    let transport = Arc::new(Mutex::new(transport));
    mmio.insert(transport.clone(), base, MMIO_LEN)
        .map_err(|source| DiskError::Bus {
            path: path.clone(),
            source,
        })?;
    events.add_subscriber(block.clone());
    Ok(AttachedDisk {
        block,
        transport,
        path,
        size: disk.size,
        readonly: disk.readonly,
        store: disk.store,
    })
}

/// When a checkpointed disk's regions are cut and retired.
#[derive(Clone)]
pub enum StoreMode {
    /// No checkpoint sink: a guest FLUSH, a full region and a clean shutdown each cut
    /// a checkpoint and retire it at once (`Store::commit_local`), so a completed
    /// flush is as durable as on a raw disk and the journal stays bounded.
    Local,
    /// The epoch engine cuts and retires; the disk asks for an early cut through
    /// this eventfd when its region passes the high-water mark or a write must wait.
    Epochs(Arc<EventFd>),
}

/// A virtio-blk backend over the checkpoint store: reads merge the regions and the
/// base; writes go to the active region and never touch the base image.
pub struct CheckpointedDisk {
    store: Arc<SharedStore>,
    size: u64,
    mode: StoreMode,
    max_write: u64,
}

/// The largest write request an empty region of `capacity` bytes takes whole: the
/// device hands a request to the store in records of at most `BOUNCE_LEN` bytes,
/// each with its header, so `k = ⌈capacity / BOUNCE_LEN⌉` records' headers are set
/// aside (a request that fits has fewer records than that), rounded down to sectors.
fn max_request_len(capacity: u64) -> u64 {
    let bounce = devices::virtio::block::BOUNCE_LEN as u64;
    let headers = capacity.div_ceil(bounce) * devices::store::record_footprint(0);
    capacity.saturating_sub(headers) / 512 * 512
}

fn store_io(e: devices::store::Error) -> std::io::Error {
    std::io::Error::other(e)
}

impl CheckpointedDisk {
    fn commit_local(store: &mut Store) -> std::io::Result<()> {
        commit_all(store).map_err(store_io)
    }

    fn ask_for_cut(&self) {
        if let StoreMode::Epochs(evt) = &self.mode {
            let _ = evt.write(1);
        }
    }
}

impl DiskBackend for CheckpointedDisk {
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.store.lock().read(offset / 512, buf).map_err(store_io)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let mut store = self.store.lock();
        match store.write(offset / 512, buf).map_err(store_io)? {
            WriteOutcome::Written { end_epoch_early } => {
                if end_epoch_early {
                    match self.mode {
                        StoreMode::Local => Self::commit_local(&mut store)?,
                        StoreMode::Epochs(_) => self.ask_for_cut(),
                    }
                }
                Ok(())
            }
            WriteOutcome::Deferred => match self.mode {
                StoreMode::Local => {
                    Self::commit_local(&mut store)?;
                    match store.write(offset / 512, buf).map_err(store_io)? {
                        WriteOutcome::Written { .. } => Ok(()),
                        WriteOutcome::Deferred => Err(std::io::Error::other(
                            "a write larger than a whole checkpoint region",
                        )),
                    }
                }
                StoreMode::Epochs(_) => {
                    // The device holds the request and resubmits it whole after the
                    // next cut kicks it; the event loop never waits here.
                    drop(store);
                    self.ask_for_cut();
                    Err(std::io::ErrorKind::WouldBlock.into())
                }
            },
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let mut store = self.store.lock();
        match self.mode {
            // Durable in the journal; the checkpoint that covers it is complete
            // before the guest could observe anything later (DESIGN.md, Flush).
            StoreMode::Epochs(_) => store.flush().map_err(store_io),
            StoreMode::Local => Self::commit_local(&mut store),
        }
    }

    fn len(&self) -> u64 {
        self.size
    }

    fn max_write_len(&self) -> u64 {
        self.max_write
    }
}

/// Retires everything a checkpointed disk holds into its base image (clean
/// shutdown): afterwards the base image alone is the guest's disk.
pub fn commit_all(store: &mut Store) -> Result<(), devices::store::Error> {
    let next = store.status().last_epoch + 1;
    store.commit_local(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request of `max_request_len(capacity)` bytes, cut into the device's records,
    /// fits an empty region; the limit is within a sector and the set-aside headers
    /// of the best possible.
    #[test]
    fn the_largest_request_fits_an_empty_region() {
        let bounce = devices::virtio::block::BOUNCE_LEN as u64;
        let footprint = |len: u64| len + len.div_ceil(bounce) * 32;
        for cap in [
            2 << 20,
            (2 << 20) + 4096,
            3 << 20,
            4 << 20,
            (4 << 20) + 8192,
            64 << 20,
            1 << 30,
        ] {
            let max = max_request_len(cap);
            assert_eq!(max % 512, 0);
            assert!(footprint(max) <= cap, "{cap}: {max}");
            assert!(max + 512 + cap.div_ceil(bounce) * 32 > cap, "{cap}: {max}");
        }
        // Linux's default largest request fits the smallest region.
        assert!(max_request_len(devices::store::sizing::MIN_REGION_SIZE) >= 1280 << 10);
    }
}
