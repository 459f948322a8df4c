//! Disks: opening and checking a `--disk` image, and attaching it to the machine as
//! a virtio-blk device on the virtio-mmio transport.

use std::fs::{File, OpenOptions};
use std::path::PathBuf;

use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::{IoEventAddress, VmFd};

use devices::bus::Bus;
use devices::virtio::block::{id_from_path, restore_with_transport, Block, BlockState, RawFile};
use devices::virtio::mmio::{MmioTransport, MmioTransportState, MMIO_LEN, NOTIFY_REG_OFFSET};

use crate::machine::AttachedDisk;

use crate::config::DiskConfig;
use crate::memory::GuestMemory;

/// Failures while opening or attaching a disk.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The image cannot be opened.
    #[error("cannot open disk image {path}: {source}")]
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
    /// The image is empty.
    #[error("disk image {0} is empty")]
    Empty(PathBuf),
    /// More disks than interrupt lines.
    #[error("{0} disks requested; at most {max} fit the interrupt lines", max = crate::layout::MAX_GSI - crate::layout::VIRTIO_FIRST_GSI + 1)]
    TooMany(usize),
    /// The virtio device could not be created.
    #[error("cannot create the virtio-blk device for {path}: {reason}")]
    Device {
        /// The image.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// Registering the device's eventfds with KVM failed.
    #[error("cannot register {what} for disk {path} with KVM: {source}")]
    Kvm {
        /// The image.
        path: PathBuf,
        /// ioeventfd or irqfd.
        what: &'static str,
        /// Cause.
        source: kvm_ioctls::Error,
    },
    /// The device window could not be placed on the MMIO bus.
    #[error("cannot place disk {path} on the MMIO bus: {source}")]
    Bus {
        /// The image.
        path: PathBuf,
        /// Cause.
        source: devices::bus::BusError,
    },
}

/// A checked, open disk image.
pub struct OpenDisk {
    /// The image file.
    pub file: File,
    /// Its path, for messages and the device id.
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
    /// Guest writes refused.
    pub readonly: bool,
}

/// Opens and checks a disk image: it must exist, be a non-empty regular file, and be
/// whole 512-byte sectors.
pub fn open(cfg: &DiskConfig) -> Result<OpenDisk, DiskError> {
    let path = cfg.path.clone();
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
    Ok(OpenDisk {
        file,
        path,
        size,
        readonly: cfg.readonly,
    })
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
) -> Result<AttachedDisk, DiskError> {
    let path = disk.path;
    let device_err = |reason: String| DiskError::Device {
        path: path.clone(),
        reason,
    };
    let backend = Box::new(RawFile::new(disk.file, disk.size));
    let id = id_from_path(&path);
    let (block, transport) = match saved {
        None => {
            let block =
                Block::new(backend, disk.readonly, &id).map_err(|e| device_err(e.to_string()))?;
            let block = Arc::new(Mutex::new(block));
            let transport = MmioTransport::new(block.clone(), mem.clone())
                .map_err(|e| device_err(e.to_string()))?;
            (block, transport)
        }
        Some((t, b)) => restore_with_transport(backend, disk.readonly, &id, b, t, mem.clone())
            .map_err(|e| device_err(format!("cannot restore its state: {e}")))?,
    };
    for (queue, evt) in transport
        .queue_events()
        .map_err(|e| device_err(e.to_string()))?
    {
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
        readonly: disk.readonly,
    })
}
