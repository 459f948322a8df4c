//! The virtio-mmio transport, modern interface only (version 2; virtio 1.x spec 4.2.2).
//!
//! One transport occupies a 4 KiB window of the MMIO bus (see [`MMIO_LEN`]). Its
//! registers are accessed from vCPU threads; the device's queues are processed on the
//! event loop, woken by the queue eventfds (KVM ioeventfds on QueueNotify, see
//! [`MmioTransport::queue_events`]). Interrupts go out through the eventfd of
//! [`MmioTransport::interrupt_evt`], an irqfd on the device's GSI.

use std::io;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::{
    Activation, StateError, VirtioDevice, VirtioInterrupt, VirtioInterruptState,
    STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FAILED, STATUS_FEATURES_OK,
    STATUS_NEEDS_RESET, VIRTIO_F_VERSION_1,
};
use crate::bus::{lock_recover, BusDevice};
use crate::snapshot::Snapshot;
use crate::{ErrorChain, GuestMemory};

/// "virt" in little endian: the MagicValue register.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// The Version register: 2, the modern (virtio 1.x) interface.
pub const MMIO_VERSION: u32 = 2;
/// The VendorID register: "MRVM" in little endian.
pub const MMIO_VENDOR_ID: u32 = u32::from_le_bytes(*b"MRVM");
/// Size of one transport's MMIO window.
pub const MMIO_LEN: u64 = 0x1000;
/// Offset of the QueueNotify register: the VMM puts its ioeventfds at `base + this`, with
/// the queue index as datamatch (4-byte write).
pub const NOTIFY_REG_OFFSET: u64 = VIRTIO_MMIO_QUEUE_NOTIFY as u64;
/// Offset of the device configuration space.
pub const CONFIG_SPACE_OFFSET: u64 = VIRTIO_MMIO_CONFIG as u64;

/// The largest queue the split-ring format allows.
const MAX_QUEUE_SIZE: u16 = 32768;

/// Errors building a transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// the device's queue events do not match its queues
    #[error("the device has {queues} queues but {events} queue eventfds")]
    QueueEventCount {
        /// Queues of the device.
        queues: usize,
        /// Eventfds it gave.
        events: usize,
    },
    /// a queue's maximum size is not a power of two in 1..=32768
    #[error("queue {index} has an invalid maximum size {max_size}")]
    InvalidQueueMaxSize {
        /// The queue.
        index: usize,
        /// Its maximum size.
        max_size: u16,
    },
    /// the device does not offer VIRTIO_F_VERSION_1
    #[error("the device does not offer VIRTIO_F_VERSION_1, required by the modern transport")]
    NotVersion1,
    /// could not create the interrupt eventfd
    #[error("could not create the interrupt eventfd")]
    CreateInterrupt(#[source] io::Error),
    /// could not duplicate a queue eventfd
    #[error("could not duplicate the eventfd of queue {index}")]
    CloneQueueEvent {
        /// The queue.
        index: usize,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Why the transport refused to activate the device at DRIVER_OK (the device then
/// reports DEVICE_NEEDS_RESET).
#[derive(Debug, thiserror::Error)]
enum QueueSetupError {
    /// a queue configuration the split ring cannot take
    #[error("queue {index} cannot be set up as the driver configured it")]
    Invalid {
        index: usize,
        #[source]
        source: virtio_queue::Error,
    },
    /// rings outside guest memory
    #[error("queue {index}: rings not in guest memory")]
    OutsideMemory { index: usize },
}

/// One queue's configuration as the driver wrote it (the registers it reads back). The
/// device's positions in an active queue's rings are saved by the device
/// ([`super::VirtqueueState`]).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MmioQueueState {
    /// QueueNumMax.
    pub max_size: u16,
    /// QueueNum.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// QueueDesc{Low,High}.
    pub desc_table: u64,
    /// QueueDriver{Low,High} (available ring).
    pub avail_ring: u64,
    /// QueueDevice{Low,High} (used ring).
    pub used_ring: u64,
}

impl MmioQueueState {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            ..Default::default()
        }
    }
}

/// The transport's plain state (register file and queue configuration).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct MmioTransportState {
    /// The virtio device id of the device behind the transport (checked on restore).
    pub device_type: u32,
    /// The features the device offered (checked on restore: a device restored with
    /// different options, read-only for instance, is refused).
    pub device_features: u64,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// The features the driver wrote, both words.
    pub driver_features: u64,
    /// The driver accepted a feature bit beyond 63, which no device offers (FEATURES_OK
    /// will be refused).
    pub driver_features_beyond_64: bool,
    /// QueueSel.
    pub queue_sel: u32,
    /// The device status as the driver set it (DEVICE_NEEDS_RESET lives in the interrupt).
    pub status: u32,
    /// Per-queue configuration.
    pub queues: Vec<MmioQueueState>,
    /// InterruptStatus, DEVICE_NEEDS_RESET and ConfigGeneration.
    pub interrupt: VirtioInterruptState,
}

/// A virtio-mmio (version 2) transport around a [`VirtioDevice`]. Put it on the MMIO bus
/// as `Arc<Mutex<MmioTransport>>` over [`MMIO_LEN`] bytes.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemory,
    interrupt: Arc<VirtioInterrupt>,
    queue_evts: Vec<EventFd>,
    device_type: u32,
    device_features: u64,
    state: MmioTransportState,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device_type)
            .field(
                "device_features",
                &format_args!("{:#x}", self.device_features),
            )
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

fn read_u32(data: &[u8]) -> Option<u32> {
    <[u8; 4]>::try_from(data).ok().map(u32::from_le_bytes)
}

fn set_low(value: &mut u64, low: u32) {
    *value = (*value & !0xffff_ffff) | u64::from(low);
}

fn set_high(value: &mut u64, high: u32) {
    *value = (*value & 0xffff_ffff) | (u64::from(high) << 32);
}

impl MmioTransport {
    /// Wraps `device`. `mem` is the guest memory the queues live in.
    pub fn new(device: Arc<Mutex<dyn VirtioDevice>>, mem: GuestMemory) -> Result<Self, MmioError> {
        let interrupt = VirtioInterrupt::new().map_err(MmioError::CreateInterrupt)?;
        Self::with_interrupt(device, mem, Arc::new(interrupt))
    }

    /// Wraps `device`, raising interrupts through `interrupt`.
    pub fn with_interrupt(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemory,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<Self, MmioError> {
        let (device_type, device_features, queues, queue_evts) = {
            let dev = lock_recover(&device);
            let sizes = dev.queue_max_sizes();
            let events = dev.queue_events();
            if sizes.len() != events.len() {
                return Err(MmioError::QueueEventCount {
                    queues: sizes.len(),
                    events: events.len(),
                });
            }
            let mut queues = Vec::with_capacity(sizes.len());
            for (index, &max_size) in sizes.iter().enumerate() {
                if max_size == 0 || max_size > MAX_QUEUE_SIZE || !max_size.is_power_of_two() {
                    return Err(MmioError::InvalidQueueMaxSize { index, max_size });
                }
                queues.push(MmioQueueState::new(max_size));
            }
            let queue_evts = events
                .iter()
                .enumerate()
                .map(|(index, e)| {
                    e.try_clone()
                        .map_err(|source| MmioError::CloneQueueEvent { index, source })
                })
                .collect::<Result<Vec<_>, _>>()?;
            if dev.device_features() & (1 << VIRTIO_F_VERSION_1) == 0 {
                return Err(MmioError::NotVersion1);
            }
            (dev.device_type(), dev.device_features(), queues, queue_evts)
        };
        Ok(Self {
            device,
            mem,
            interrupt,
            queue_evts,
            device_type,
            device_features,
            state: MmioTransportState {
                queues,
                ..Default::default()
            },
        })
    }

    /// The queue notification eventfds, duplicated: `(queue index, eventfd)`. Register each
    /// as a KVM ioeventfd at `base + NOTIFY_REG_OFFSET`, 4 bytes, datamatch = queue index.
    pub fn queue_events(&self) -> io::Result<Vec<(u32, EventFd)>> {
        self.queue_evts
            .iter()
            .zip(0u32..)
            .map(|(e, i)| Ok((i, e.try_clone()?)))
            .collect()
    }

    /// The interrupt eventfd: register it as an irqfd on the device's GSI.
    pub fn interrupt_evt(&self) -> &EventFd {
        self.interrupt.eventfd()
    }

    /// The interrupt line shared with the device.
    pub fn interrupt(&self) -> &Arc<VirtioInterrupt> {
        &self.interrupt
    }

    /// The device behind the transport.
    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    /// The virtio device id.
    pub fn device_type(&self) -> u32 {
        self.device_type
    }

    /// The register state (for save/restore).
    pub fn state(&self) -> MmioTransportState {
        let mut state = self.state.clone();
        state.device_type = self.device_type;
        state.device_features = self.device_features;
        state.interrupt = self.interrupt.state();
        state
    }

    /// Recreates a transport from a saved state (restore), around a `device` already
    /// restored on the same `interrupt` (for virtio-blk:
    /// [`super::block::Block::restore`]), with its queues in `mem`.
    ///
    /// The state is untrusted input and is checked against the device: same device type,
    /// features and queues; a status the driver could have reached (each initialisation
    /// step after the one before it, accepted features the device offers); and a device
    /// that is active exactly when the status says so (DRIVER_OK and no
    /// DEVICE_NEEDS_RESET means active; an active device has DRIVER_OK).
    ///
    /// Nothing is signalled here: once the VMM has registered the queue ioeventfds and
    /// the interrupt irqfd and added the device to the event loop, it calls
    /// [`MmioTransport::post_restore`].
    pub fn restore(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemory,
        interrupt: Arc<VirtioInterrupt>,
        state: &MmioTransportState,
    ) -> Result<Self, StateError> {
        state.interrupt.validate()?;
        let mut transport =
            Self::with_interrupt(device, mem, interrupt).map_err(StateError::Transport)?;
        if state.device_type != transport.device_type {
            return Err(StateError::DeviceType {
                saved: state.device_type,
                device: transport.device_type,
            });
        }
        if state.device_features != transport.device_features {
            return Err(StateError::DeviceFeatures {
                saved: state.device_features,
                device: transport.device_features,
            });
        }
        if state.queues.len() != transport.state.queues.len() {
            return Err(StateError::QueueCount {
                saved: state.queues.len(),
                device: transport.state.queues.len(),
            });
        }
        for (index, (saved, device)) in state.queues.iter().zip(&transport.state.queues).enumerate()
        {
            if saved.max_size != device.max_size {
                return Err(StateError::QueueMaxSize {
                    index,
                    saved: saved.max_size,
                    device: device.max_size,
                });
            }
        }
        let status = state.status;
        let settable = STATUS_ACKNOWLEDGE
            | STATUS_DRIVER
            | STATUS_FEATURES_OK
            | STATUS_DRIVER_OK
            | STATUS_FAILED;
        if status & !settable != 0 {
            return Err(StateError::StatusBits { status });
        }
        let needs = |bit: u32, before: u32| status & bit == 0 || status & before != 0;
        if !needs(STATUS_DRIVER, STATUS_ACKNOWLEDGE)
            || !needs(STATUS_FEATURES_OK, STATUS_DRIVER)
            || !needs(STATUS_DRIVER_OK, STATUS_FEATURES_OK)
        {
            return Err(StateError::StatusOrder { status });
        }
        transport.state = state.clone();
        if status & STATUS_FEATURES_OK != 0 && !transport.features_acceptable() {
            return Err(StateError::FeaturesRefused {
                acked: state.driver_features,
                offered: transport.device_features,
            });
        }
        let device_active = lock_recover(&transport.device).is_active();
        let driver_ok = status & STATUS_DRIVER_OK != 0;
        let needs_reset = state.interrupt.needs_reset;
        if (device_active && !driver_ok) || (driver_ok && !needs_reset && !device_active) {
            return Err(StateError::ActivationMismatch {
                status,
                needs_reset,
                device_active,
            });
        }
        transport.interrupt.set_state(&state.interrupt)?;
        Ok(transport)
    }

    /// Completes a restore, once the queue ioeventfds and the interrupt irqfd are
    /// registered and the device is in the event loop: every queue of an activated
    /// device is looked at again (its eventfd is written, so buffers the driver made
    /// available after the cut, or a request the disk had deferred, are processed), and
    /// the interrupt is raised again if the interrupt status is non-zero (an irqfd
    /// injection may have landed after the interrupt controllers were saved). Calling it
    /// more than once is harmless.
    pub fn post_restore(&self) {
        if self.is_activated() {
            for (i, _) in (0u32..).zip(&self.queue_evts) {
                self.notify(i);
            }
        }
        self.interrupt.reraise_if_pending();
    }

    /// Whether the driver has set DRIVER_OK. The device may still have refused to start:
    /// then [`MmioTransport::status`] also has DEVICE_NEEDS_RESET.
    pub fn is_activated(&self) -> bool {
        self.state.status & STATUS_DRIVER_OK != 0
    }

    /// The status register as the driver reads it.
    pub fn status(&self) -> u32 {
        let mut status = self.state.status;
        if self.interrupt.needs_reset() {
            status |= STATUS_NEEDS_RESET;
        }
        status
    }

    fn selected_queue(&self) -> Option<&MmioQueueState> {
        self.state.queues.get(self.state.queue_sel as usize)
    }

    /// The selected queue, if it may still be configured (before DRIVER_OK).
    fn configurable_queue(&mut self) -> Option<&mut MmioQueueState> {
        if self.state.status & STATUS_DRIVER_OK != 0 {
            tracing::debug!("virtio-mmio: queue configuration after DRIVER_OK ignored");
            return None;
        }
        self.state.queues.get_mut(self.state.queue_sel as usize)
    }

    fn read_register(&self, offset: u32) -> u32 {
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC_VALUE,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device_type,
            VIRTIO_MMIO_VENDOR_ID => MMIO_VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.state.device_features_sel {
                0 => low_half(self.device_features),
                1 => (self.device_features >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size.into()),
            VIRTIO_MMIO_QUEUE_NUM => self.selected_queue().map_or(0, |q| q.size.into()),
            VIRTIO_MMIO_QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready.into()),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            VIRTIO_MMIO_STATUS => self.status(),
            VIRTIO_MMIO_QUEUE_DESC_LOW => {
                self.selected_queue().map_or(0, |q| low_half(q.desc_table))
            }
            VIRTIO_MMIO_QUEUE_DESC_HIGH => self
                .selected_queue()
                .map_or(0, |q| (q.desc_table >> 32) as u32),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => {
                self.selected_queue().map_or(0, |q| low_half(q.avail_ring))
            }
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => self
                .selected_queue()
                .map_or(0, |q| (q.avail_ring >> 32) as u32),
            VIRTIO_MMIO_QUEUE_USED_LOW => {
                self.selected_queue().map_or(0, |q| low_half(q.used_ring))
            }
            VIRTIO_MMIO_QUEUE_USED_HIGH => self
                .selected_queue()
                .map_or(0, |q| (q.used_ring >> 32) as u32),
            // No shared memory regions: a length of all ones means "no such region".
            VIRTIO_MMIO_SHM_LEN_LOW
            | VIRTIO_MMIO_SHM_LEN_HIGH
            | VIRTIO_MMIO_SHM_BASE_LOW
            | VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            VIRTIO_MMIO_CONFIG_GENERATION => self.interrupt.config_generation(),
            _ => {
                tracing::debug!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u32, value: u32) {
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.state.device_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES => {
                let status = self.state.status;
                if status & STATUS_DRIVER == 0 || status & STATUS_FEATURES_OK != 0 {
                    tracing::debug!("virtio-mmio: DriverFeatures write in status {status:#x}");
                    return;
                }
                match self.state.driver_features_sel {
                    0 => set_low(&mut self.state.driver_features, value),
                    1 => set_high(&mut self.state.driver_features, value),
                    // No feature bits beyond 63: a driver accepting one breaks FEATURES_OK.
                    _ if value != 0 => self.state.driver_features_beyond_64 = true,
                    _ => {}
                }
            }
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.state.driver_features_sel = value,
            VIRTIO_MMIO_QUEUE_SEL => self.state.queue_sel = value,
            VIRTIO_MMIO_QUEUE_NUM => {
                if let Some(q) = self.configurable_queue() {
                    // Validated at activation; keep what the driver wrote (within u16).
                    q.size = u16::try_from(value).unwrap_or(0);
                }
            }
            VIRTIO_MMIO_QUEUE_READY => {
                if let Some(q) = self.configurable_queue() {
                    q.ready = value == 1;
                }
            }
            VIRTIO_MMIO_QUEUE_NOTIFY => self.notify(value),
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(value),
            VIRTIO_MMIO_STATUS => self.set_status(value),
            VIRTIO_MMIO_QUEUE_DESC_LOW => {
                if let Some(q) = self.configurable_queue() {
                    set_low(&mut q.desc_table, value)
                }
            }
            VIRTIO_MMIO_QUEUE_DESC_HIGH => {
                if let Some(q) = self.configurable_queue() {
                    set_high(&mut q.desc_table, value)
                }
            }
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => {
                if let Some(q) = self.configurable_queue() {
                    set_low(&mut q.avail_ring, value)
                }
            }
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
                if let Some(q) = self.configurable_queue() {
                    set_high(&mut q.avail_ring, value)
                }
            }
            VIRTIO_MMIO_QUEUE_USED_LOW => {
                if let Some(q) = self.configurable_queue() {
                    set_low(&mut q.used_ring, value)
                }
            }
            VIRTIO_MMIO_QUEUE_USED_HIGH => {
                if let Some(q) = self.configurable_queue() {
                    set_high(&mut q.used_ring, value)
                }
            }
            VIRTIO_MMIO_SHM_SEL => {}
            _ => tracing::debug!("virtio-mmio: write of unknown register {offset:#x}"),
        }
    }

    /// A QueueNotify write that reached the transport (no ioeventfd, or not yet): pass it
    /// on through the queue's eventfd, exactly as KVM would.
    fn notify(&self, value: u32) {
        match self.queue_evts.get(value as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    tracing::warn!("virtio-mmio: could not signal queue {value}: {e}");
                }
            }
            None => tracing::debug!("virtio-mmio: notify of unknown queue {value}"),
        }
    }

    fn features_acceptable(&self) -> bool {
        let acked = self.state.driver_features;
        acked & !self.device_features == 0
            && acked & (1 << VIRTIO_F_VERSION_1) != 0
            && !self.state.driver_features_beyond_64
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.state.status;
        // DEVICE_NEEDS_RESET is the device's to set; the driver echoing it back is harmless.
        let value = value & 0xff & !STATUS_NEEDS_RESET;
        if old & !value != 0 {
            tracing::warn!(
                "virtio-mmio: driver cleared status bits ({old:#x} -> {value:#x}), ignored"
            );
            return;
        }
        let new = value & !old;
        let mut status = old;
        if new & STATUS_ACKNOWLEDGE != 0 {
            status |= STATUS_ACKNOWLEDGE;
        }
        if new & STATUS_DRIVER != 0 && status & STATUS_ACKNOWLEDGE != 0 {
            status |= STATUS_DRIVER;
        }
        if new & STATUS_FEATURES_OK != 0 && status & STATUS_DRIVER != 0 {
            if self.features_acceptable() {
                status |= STATUS_FEATURES_OK;
            } else {
                tracing::info!(
                    "virtio-mmio: refusing FEATURES_OK for features {:#x} (offered {:#x})",
                    self.state.driver_features,
                    self.device_features
                );
            }
        }
        if new & STATUS_FAILED != 0 {
            status |= STATUS_FAILED;
        }
        let activate = new & STATUS_DRIVER_OK != 0
            && status & STATUS_FEATURES_OK != 0
            && status & STATUS_FAILED == 0;
        if activate {
            status |= STATUS_DRIVER_OK;
        }
        self.state.status = status;
        if activate {
            self.activate();
        }
    }

    fn build_queues(&self) -> Result<Vec<Queue>, QueueSetupError> {
        let event_idx = self.state.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut queues = Vec::with_capacity(self.state.queues.len());
        for (index, q) in self.state.queues.iter().enumerate() {
            let invalid = |source| QueueSetupError::Invalid { index, source };
            let mut queue = Queue::new(q.max_size).map_err(invalid)?;
            if q.ready {
                queue.try_set_size(q.size).map_err(invalid)?;
                queue
                    .try_set_desc_table_address(GuestAddress(q.desc_table))
                    .map_err(invalid)?;
                queue
                    .try_set_avail_ring_address(GuestAddress(q.avail_ring))
                    .map_err(invalid)?;
                queue
                    .try_set_used_ring_address(GuestAddress(q.used_ring))
                    .map_err(invalid)?;
                queue.set_event_idx(event_idx);
                queue.set_ready(true);
                if !queue.is_valid(&self.mem) {
                    return Err(QueueSetupError::OutsideMemory { index });
                }
            }
            queues.push(queue);
        }
        Ok(queues)
    }

    fn activate(&mut self) {
        let queues = match self.build_queues() {
            Ok(queues) => queues,
            Err(e) => {
                tracing::warn!(
                    "virtio-mmio: cannot activate the device: {}",
                    ErrorChain(&e)
                );
                self.interrupt.set_needs_reset();
                return;
            }
        };
        let activation = Activation {
            mem: self.mem.clone(),
            queues,
            interrupt: self.interrupt.clone(),
            acked_features: self.state.driver_features,
        };
        if let Err(e) = lock_recover(&self.device).activate(activation) {
            tracing::warn!("virtio-mmio: device activation failed: {}", ErrorChain(&e));
            self.interrupt.set_needs_reset();
            return;
        }
        // Wake the event loop for every queue: buffers the driver made available before
        // DRIVER_OK (or notifications the loop dropped while inactive) are not lost.
        for (i, _) in (0u32..).zip(&self.queue_evts) {
            self.notify(i);
        }
    }

    /// Resets the transport and the device (the driver wrote 0 to the status register).
    pub fn reset(&mut self) {
        lock_recover(&self.device).reset();
        let queues = self
            .state
            .queues
            .iter()
            .map(|q| MmioQueueState::new(q.max_size))
            .collect();
        self.state = MmioTransportState {
            queues,
            ..Default::default()
        };
        self.interrupt.reset();
    }
}

impl Snapshot for MmioTransport {
    type State = MmioTransportState;

    fn snapshot(&self) -> MmioTransportState {
        self.state()
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            lock_recover(&self.device).read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        let value = match (u32::try_from(offset), data.len()) {
            (Ok(offset), 4) if offset % 4 == 0 => self.read_register(offset),
            _ => {
                tracing::debug!(
                    "virtio-mmio: bad register read at {offset:#x}, {} bytes",
                    data.len()
                );
                0
            }
        };
        if data.len() == 4 {
            data.copy_from_slice(&value.to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            lock_recover(&self.device).write_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        match (u32::try_from(offset), read_u32(data)) {
            (Ok(offset), Some(value)) if offset % 4 == 0 => self.write_register(offset, value),
            _ => tracing::debug!(
                "virtio-mmio: bad register write at {offset:#x}, {} bytes",
                data.len()
            ),
        }
    }
}

/// The low 32 bits of a 64-bit value: what a guest reads from the `*_LOW` half of a
/// 64-bit register (the `*_HIGH` half is `x >> 32`).
fn low_half(x: u64) -> u32 {
    (x & 0xffff_ffff) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::INT_CONFIG;
    use vm_memory::Bytes;

    /// A device with two queues, 16 bytes of config and a record of what happened.
    struct Dummy {
        evts: Vec<EventFd>,
        config: [u8; 16],
        activation: Option<Activation>,
        refuse: bool,
        resets: u32,
    }

    const DUMMY_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1) | 0b101;

    impl Dummy {
        fn new() -> Self {
            Self {
                evts: (0..2)
                    .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
                    .collect(),
                config: *b"0123456789abcdef",
                activation: None,
                refuse: false,
                resets: 0,
            }
        }
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn device_features(&self) -> u64 {
            DUMMY_FEATURES
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 256]
        }
        fn queue_events(&self) -> &[EventFd] {
            &self.evts
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = usize::try_from(offset)
                    .ok()
                    .and_then(|o| self.config.get(o + i))
                    .copied()
                    .unwrap_or(0);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            if let Some(dst) = self
                .config
                .get_mut(crate::to_usize(offset)..crate::to_usize(offset) + data.len())
            {
                dst.copy_from_slice(data);
            }
        }
        fn activate(&mut self, activation: Activation) -> Result<(), super::super::ActivateError> {
            if self.refuse {
                return Err(super::super::ActivateError::AlreadyActive);
            }
            self.activation = Some(activation);
            Ok(())
        }
        fn reset(&mut self) {
            self.activation = None;
            self.resets += 1;
        }
        fn is_active(&self) -> bool {
            self.activation.is_some()
        }
    }

    fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn setup() -> (MmioTransport, Arc<Mutex<Dummy>>) {
        let dev = Arc::new(Mutex::new(Dummy::new()));
        let t = MmioTransport::new(dev.clone(), mem()).unwrap();
        (t, dev)
    }

    fn r(t: &mut MmioTransport, offset: u32) -> u32 {
        let mut data = [0u8; 4];
        t.read(offset.into(), &mut data);
        u32::from_le_bytes(data)
    }

    fn w(t: &mut MmioTransport, offset: u32, value: u32) {
        t.write(offset.into(), &value.to_le_bytes());
    }

    fn negotiate(t: &mut MmioTransport, features: u64) -> u32 {
        w(t, VIRTIO_MMIO_STATUS, STATUS_ACKNOWLEDGE);
        w(t, VIRTIO_MMIO_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        w(t, VIRTIO_MMIO_DRIVER_FEATURES, low_half(features));
        w(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        w(t, VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
        w(
            t,
            VIRTIO_MMIO_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        r(t, VIRTIO_MMIO_STATUS)
    }

    fn setup_queue(t: &mut MmioTransport, index: u32, size: u32, base: u64) {
        w(t, VIRTIO_MMIO_QUEUE_SEL, index);
        w(t, VIRTIO_MMIO_QUEUE_NUM, size);
        w(t, VIRTIO_MMIO_QUEUE_DESC_LOW, low_half(base));
        w(t, VIRTIO_MMIO_QUEUE_DESC_HIGH, (base >> 32) as u32);
        w(t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, low_half(base + 0x1000));
        w(t, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 0);
        w(t, VIRTIO_MMIO_QUEUE_USED_LOW, low_half(base + 0x2000));
        w(t, VIRTIO_MMIO_QUEUE_USED_HIGH, 0);
        w(t, VIRTIO_MMIO_QUEUE_READY, 1);
    }

    const ALL_OK: u32 = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;

    #[test]
    fn identification_registers() {
        let (mut t, _) = setup();
        assert_eq!(r(&mut t, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(r(&mut t, VIRTIO_MMIO_VERSION), 2);
        assert_eq!(r(&mut t, VIRTIO_MMIO_DEVICE_ID), 42);
        assert_eq!(r(&mut t, VIRTIO_MMIO_VENDOR_ID), MMIO_VENDOR_ID);
        w(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        assert_eq!(r(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 0b101);
        w(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 1);
        w(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 2);
        assert_eq!(r(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 0);
        w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
        assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 256);
        w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 2);
        assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
        assert_eq!(r(&mut t, VIRTIO_MMIO_SHM_LEN_LOW), u32::MAX);
        // Unaligned and odd-sized register accesses read 0 and do nothing.
        let mut b = [0xffu8; 2];
        t.read(0, &mut b);
        assert_eq!(b, [0, 0]);
        let mut b = [0xffu8; 4];
        t.read(2, &mut b);
        assert_eq!(b, [0; 4]);
        t.write(VIRTIO_MMIO_STATUS.into(), &[1]);
        assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), 0);
    }

    #[test]
    fn config_space_reads_and_writes() {
        let (mut t, dev) = setup();
        let mut b = [0u8; 4];
        t.read(0x104, &mut b);
        assert_eq!(&b, b"4567");
        let mut one = [0u8];
        t.read(0x10f, &mut one);
        assert_eq!(&one, b"f");
        t.read(0x10e, &mut b);
        assert_eq!(&b, b"ef\0\0");
        t.write(0x100, b"zz");
        assert_eq!(&dev.lock().unwrap().config[..3], b"zz2");
        assert_eq!(r(&mut t, VIRTIO_MMIO_CONFIG_GENERATION), 0);
    }

    #[test]
    fn feature_negotiation_and_activation() {
        let (mut t, dev) = setup();
        let status = negotiate(&mut t, DUMMY_FEATURES);
        assert_ne!(status & STATUS_FEATURES_OK, 0);
        // Features are frozen once FEATURES_OK is set.
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 0);
        assert_eq!(t.state().driver_features, DUMMY_FEATURES);

        setup_queue(&mut t, 0, 8, 0x10000);
        setup_queue(&mut t, 1, 256, 0x20000);
        w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
        assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_READY), 1);
        assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_NUM), 8);
        let evts = t.queue_events().unwrap();
        assert_eq!(evts.len(), 2);

        w(&mut t, VIRTIO_MMIO_STATUS, ALL_OK);
        assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), ALL_OK);
        {
            let d = dev.lock().unwrap();
            let act = d.activation.as_ref().expect("activated");
            assert_eq!(act.acked_features, DUMMY_FEATURES);
            assert_eq!(act.queues.len(), 2);
            assert!(act.queues[0].ready());
            assert_eq!(act.queues[0].size(), 8);
            assert_eq!(act.queues[0].desc_table(), 0x10000);
            assert_eq!(act.queues[1].used_ring(), 0x22000);
        }
        // Activation wakes every queue.
        for (i, e) in &evts {
            assert_eq!(e.read().unwrap(), 1, "queue {i}");
        }
        // Queue configuration is frozen after DRIVER_OK.
        w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
        w(&mut t, VIRTIO_MMIO_QUEUE_NUM, 4);
        assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_NUM), 8);

        // A notify reaching the transport writes the eventfd.
        w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        assert_eq!(evts[1].1.read().unwrap(), 1);
        assert!(evts[0].1.read().is_err());
        w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 7);

        // Interrupt status and ack.
        t.interrupt().signal_used_queue();
        assert_eq!(t.interrupt_evt().read().unwrap(), 1);
        assert_eq!(r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 1);
        w(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, 1);
        assert_eq!(r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);

        // Reset.
        w(&mut t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), 0);
        assert_eq!(dev.lock().unwrap().resets, 1);
        assert!(dev.lock().unwrap().activation.is_none());
        w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
        assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
        assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_NUM), 16);
        assert_eq!(t.state().driver_features, 0);
    }

    #[test]
    fn features_ok_refused() {
        // A feature the device does not offer.
        let (mut t, _) = setup();
        let status = negotiate(&mut t, DUMMY_FEATURES | 0b10);
        assert_eq!(status & STATUS_FEATURES_OK, 0);
        // DRIVER_OK without FEATURES_OK does nothing.
        w(&mut t, VIRTIO_MMIO_STATUS, ALL_OK & !STATUS_FEATURES_OK);
        assert!(!t.is_activated());

        // A legacy driver (no VERSION_1).
        let (mut t, _) = setup();
        assert_eq!(negotiate(&mut t, 0b1) & STATUS_FEATURES_OK, 0);

        // A feature word beyond 63.
        let (mut t, _) = setup();
        w(&mut t, VIRTIO_MMIO_STATUS, STATUS_ACKNOWLEDGE);
        w(
            &mut t,
            VIRTIO_MMIO_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER,
        );
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 3);
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
        w(
            &mut t,
            VIRTIO_MMIO_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS) & STATUS_FEATURES_OK, 0);

        // FEATURES_OK before DRIVER is not accepted; nor DRIVER before ACKNOWLEDGE.
        let (mut t, _) = setup();
        w(
            &mut t,
            VIRTIO_MMIO_STATUS,
            STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), 0);
    }

    #[test]
    fn status_bits_cannot_be_cleared_except_by_reset() {
        let (mut t, _) = setup();
        negotiate(&mut t, DUMMY_FEATURES);
        w(&mut t, VIRTIO_MMIO_STATUS, STATUS_ACKNOWLEDGE);
        assert_eq!(
            r(&mut t, VIRTIO_MMIO_STATUS),
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
        );
        w(
            &mut t,
            VIRTIO_MMIO_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_FAILED,
        );
        assert_ne!(r(&mut t, VIRTIO_MMIO_STATUS) & STATUS_FAILED, 0);
        w(&mut t, VIRTIO_MMIO_STATUS, 0xff);
        assert!(!t.is_activated(), "no DRIVER_OK after FAILED");
    }

    #[test]
    fn bad_queue_setup_needs_reset() {
        // Rings outside guest memory.
        let (mut t, dev) = setup();
        negotiate(&mut t, DUMMY_FEATURES);
        setup_queue(&mut t, 0, 8, 0x4000_0000);
        w(&mut t, VIRTIO_MMIO_STATUS, ALL_OK);
        let status = r(&mut t, VIRTIO_MMIO_STATUS);
        assert_ne!(status & STATUS_NEEDS_RESET, 0);
        assert_ne!(r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS) & 2, 0);
        assert!(dev.lock().unwrap().activation.is_none());
        // The driver echoing NEEDS_RESET back is harmless; a reset clears it.
        w(&mut t, VIRTIO_MMIO_STATUS, status);
        w(&mut t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), 0);
        assert_eq!(r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);

        // A size that is not a power of two, or too big.
        for size in [3, 32, 0, 0x1_0000] {
            let (mut t, _) = setup();
            negotiate(&mut t, DUMMY_FEATURES);
            setup_queue(&mut t, 0, size, 0x10000);
            w(&mut t, VIRTIO_MMIO_STATUS, ALL_OK);
            assert_ne!(r(&mut t, VIRTIO_MMIO_STATUS) & STATUS_NEEDS_RESET, 0);
        }

        // A misaligned ring.
        let (mut t, _) = setup();
        negotiate(&mut t, DUMMY_FEATURES);
        setup_queue(&mut t, 0, 8, 0x10008);
        w(&mut t, VIRTIO_MMIO_STATUS, ALL_OK);
        assert_ne!(r(&mut t, VIRTIO_MMIO_STATUS) & STATUS_NEEDS_RESET, 0);

        // The device refusing activation.
        let (mut t, dev) = setup();
        dev.lock().unwrap().refuse = true;
        negotiate(&mut t, DUMMY_FEATURES);
        setup_queue(&mut t, 0, 8, 0x10000);
        w(&mut t, VIRTIO_MMIO_STATUS, ALL_OK);
        assert_ne!(r(&mut t, VIRTIO_MMIO_STATUS) & STATUS_NEEDS_RESET, 0);
    }

    #[test]
    fn unready_queue_is_passed_unready() {
        let (mut t, dev) = setup();
        negotiate(&mut t, DUMMY_FEATURES);
        setup_queue(&mut t, 1, 16, 0x10000);
        w(&mut t, VIRTIO_MMIO_STATUS, ALL_OK);
        let d = dev.lock().unwrap();
        let act = d.activation.as_ref().unwrap();
        assert!(!act.queues[0].ready());
        assert!(act.queues[1].ready());
        // The memory handed to the device is the guest's.
        act.mem.write_obj(1u8, GuestAddress(0)).unwrap();
    }

    #[test]
    fn state_round_trip_mid_handshake() {
        use crate::snapshot::Snapshot;

        let (mut t, _) = setup();
        negotiate(&mut t, DUMMY_FEATURES);
        w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
        w(&mut t, VIRTIO_MMIO_QUEUE_NUM, 64);
        w(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x20000);
        w(&mut t, VIRTIO_MMIO_QUEUE_DESC_HIGH, 0);
        w(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        t.interrupt().signal_config_change();
        let saved = t.snapshot();
        assert_eq!(saved.device_type, 42);
        assert_eq!(saved.device_features, DUMMY_FEATURES);
        assert_eq!(saved.interrupt.config_generation, 1);
        let bytes = postcard::to_allocvec(&saved).unwrap();
        let decoded: MmioTransportState = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(decoded, saved);

        let dev = Arc::new(Mutex::new(Dummy::new()));
        let interrupt = Arc::new(VirtioInterrupt::new().unwrap());
        let mut t = MmioTransport::restore(dev.clone(), mem(), interrupt, &decoded).unwrap();
        assert_eq!(t.state(), saved);
        // Registers read back as before.
        assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_NUM), 64);
        assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW), 0x20000);
        assert_eq!(
            r(&mut t, VIRTIO_MMIO_DEVICE_FEATURES),
            (DUMMY_FEATURES >> 32) as u32
        );
        assert_eq!(r(&mut t, VIRTIO_MMIO_CONFIG_GENERATION), 1);
        assert_eq!(r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), INT_CONFIG);
        t.post_restore();
        assert_eq!(t.interrupt_evt().read().unwrap(), 1);
        // The driver finishes the handshake on the restored transport.
        setup_queue(&mut t, 1, 64, 0x20000);
        w(&mut t, VIRTIO_MMIO_STATUS, ALL_OK);
        assert!(dev.lock().unwrap().activation.is_some());
        assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), ALL_OK);

        // DRIVER_OK restored onto a device that is not active: refused, unless the
        // activation had failed (DEVICE_NEEDS_RESET).
        let active = t.snapshot();
        let dev = Arc::new(Mutex::new(Dummy::new()));
        let interrupt = Arc::new(VirtioInterrupt::new().unwrap());
        assert!(matches!(
            MmioTransport::restore(dev.clone(), mem(), interrupt.clone(), &active),
            Err(StateError::ActivationMismatch { .. })
        ));
        let mut failed = active.clone();
        failed.interrupt.needs_reset = true;
        let t = MmioTransport::restore(dev, mem(), interrupt, &failed).unwrap();
        assert_ne!(t.status() & STATUS_NEEDS_RESET, 0);
    }

    #[test]
    fn construction_errors() {
        struct NoV1(Dummy);
        impl VirtioDevice for NoV1 {
            fn device_type(&self) -> u32 {
                1
            }
            fn device_features(&self) -> u64 {
                0
            }
            fn queue_max_sizes(&self) -> &[u16] {
                &[100]
            }
            fn queue_events(&self) -> &[EventFd] {
                &self.0.evts[..1]
            }
            fn read_config(&self, _: u64, _: &mut [u8]) {}
            fn write_config(&mut self, _: u64, _: &[u8]) {}
            fn activate(&mut self, _: Activation) -> Result<(), super::super::ActivateError> {
                Ok(())
            }
            fn reset(&mut self) {}
            fn is_active(&self) -> bool {
                false
            }
        }
        let dev = Arc::new(Mutex::new(NoV1(Dummy::new())));
        assert!(matches!(
            MmioTransport::new(dev, mem()),
            Err(MmioError::InvalidQueueMaxSize { .. })
        ));
    }

    mod prop {
        use super::*;
        use crate::virtio::block::{Block, DiskBackend};
        use proptest::prelude::*;

        struct ZeroDisk;
        impl DiskBackend for ZeroDisk {
            fn read_at(&mut self, buf: &mut [u8], _offset: u64) -> io::Result<()> {
                buf.fill(0);
                Ok(())
            }
            fn write_at(&mut self, _buf: &[u8], _offset: u64) -> io::Result<()> {
                Ok(())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
            fn len(&self) -> u64 {
                64 * 1024
            }
        }

        #[derive(Clone, Debug)]
        enum Op {
            Read(u64, usize),
            Write(u64, Vec<u8>),
            Process,
            Scribble(u64, u64),
            Handshake(u32, [u16; 3]),
        }

        fn register() -> impl Strategy<Value = u64> {
            prop_oneof![
                (0u64..0x40).prop_map(|r| r * 4),
                0u64..0x1000,
                Just(0x70u64),
                Just(0x44),
                Just(0x50),
            ]
        }

        fn value() -> impl Strategy<Value = u32> {
            prop_oneof![
                0u32..16,
                Just(0x1f),
                Just(0x0f),
                Just(0x7),
                Just(0x3),
                Just(1),
                Just(0x1000),
                Just(0x4000),
                any::<u32>(),
            ]
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                (register(), prop_oneof![Just(4usize), 0usize..9])
                    .prop_map(|(o, n)| Op::Read(o, n)),
                (register(), value()).prop_map(|(o, v)| Op::Write(o, v.to_le_bytes().to_vec())),
                (register(), proptest::collection::vec(any::<u8>(), 0..9))
                    .prop_map(|(o, b)| Op::Write(o, b)),
                Just(Op::Process),
                (0u64..0x10000, any::<u64>()).prop_map(|(a, v)| Op::Scribble(a, v)),
                (
                    prop_oneof![Just(16u32), Just(256), any::<u32>()],
                    any::<[u16; 3]>()
                )
                    .prop_map(|(n, a)| Op::Handshake(n, a)),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Random register traffic from a hostile driver, with the block device behind
            /// the transport and random ring contents: no panic, and the status register
            /// never claims what the rules forbid.
            #[test]
            fn register_fuzz(ops in proptest::collection::vec(op(), 1..200)) {
                let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
                let block = Arc::new(Mutex::new(Block::new(Box::new(ZeroDisk), false, b"f").unwrap()));
                let mut t = MmioTransport::new(block.clone(), mem.clone()).unwrap();
                for op in ops {
                    match op {
                        Op::Read(offset, n) => {
                            let mut buf = vec![0u8; n];
                            t.read(offset, &mut buf);
                        }
                        Op::Write(offset, data) => t.write(offset, &data),
                        Op::Process => block.lock().unwrap().process_queue(),
                        Op::Scribble(addr, v) => {
                            let _ = mem.write_obj(v, GuestAddress(addr & !7));
                        }
                        Op::Handshake(size, addrs) => {
                            w(&mut t, VIRTIO_MMIO_STATUS, 0);
                            let features = t.device_features;
                            negotiate(&mut t, features);
                            w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
                            w(&mut t, VIRTIO_MMIO_QUEUE_NUM, size);
                            w(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, u32::from(addrs[0]) & !0xf);
                            w(&mut t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, u32::from(addrs[1]) & !1);
                            w(&mut t, VIRTIO_MMIO_QUEUE_USED_LOW, u32::from(addrs[2]) & !3);
                            w(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
                            w(&mut t, VIRTIO_MMIO_STATUS, ALL_OK);
                        }
                    }
                    let status = t.status();
                    if status & STATUS_DRIVER_OK != 0 {
                        prop_assert_ne!(status & STATUS_FEATURES_OK, 0);
                    }
                    if status & STATUS_FEATURES_OK != 0 {
                        let st = t.state();
                        prop_assert_eq!(st.driver_features & !t.device_features, 0);
                        prop_assert_ne!(status & STATUS_DRIVER, 0);
                    }
                    if status & STATUS_DRIVER != 0 {
                        prop_assert_ne!(status & STATUS_ACKNOWLEDGE, 0);
                    }
                    let active = block.lock().unwrap().is_active();
                    if active {
                        prop_assert_ne!(status & STATUS_DRIVER_OK, 0);
                    }
                    if status & STATUS_DRIVER_OK != 0 && status & STATUS_NEEDS_RESET == 0 {
                        prop_assert!(active);
                    }
                }
                t.write(u64::from(VIRTIO_MMIO_STATUS), &0u32.to_le_bytes());
                prop_assert_eq!(t.status(), 0);
                prop_assert!(!block.lock().unwrap().is_active());
            }
        }
    }
}
