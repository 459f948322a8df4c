//! virtio devices: the [`VirtioDevice`] trait, the interrupt line they share with their
//! transport, the virtio-mmio transport ([`mmio::MmioTransport`]) and virtio-blk
//! ([`block::Block`]).
//!
//! Threads: the transport's registers are accessed from vCPU threads (MMIO exits); the
//! queues are processed on the device event loop (event-manager). A device is shared
//! between the two as `Arc<Mutex<...>>`; the transport locks it only for config-space
//! accesses, activation and reset. Queue notifications are eventfds the device owns
//! (the VMM registers them as KVM ioeventfds on the transport's QueueNotify register);
//! interrupts go out through [`VirtioInterrupt`], whose eventfd the VMM registers as an
//! irqfd.

pub mod block;
pub mod mmio;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use crate::GuestMemory;

pub use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE as STATUS_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER as STATUS_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK as STATUS_DRIVER_OK, VIRTIO_CONFIG_S_FAILED as STATUS_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK as STATUS_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET as STATUS_NEEDS_RESET,
};

/// Feature bit: the device complies with virtio 1.x (mandatory on a modern transport).
pub const VIRTIO_F_VERSION_1: u32 = virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// InterruptStatus bit: the device used a buffer in a queue.
pub const INT_USED_RING: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
/// InterruptStatus bit: the device configuration changed (or the device needs a reset).
pub const INT_CONFIG: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

/// The interrupt side of a virtio device, shared by the transport (vCPU threads read and
/// acknowledge InterruptStatus) and the device (the event loop raises interrupts).
///
/// Raising an interrupt sets a bit in the interrupt status and writes the eventfd, which
/// the VMM registers as an irqfd on the device's GSI.
#[derive(Debug)]
pub struct VirtioInterrupt {
    status: AtomicU32,
    needs_reset: AtomicBool,
    config_generation: AtomicU32,
    evt: EventFd,
}

impl VirtioInterrupt {
    /// Creates an interrupt line with a fresh eventfd.
    pub fn new() -> io::Result<Self> {
        Ok(Self::with_eventfd(EventFd::new(libc::EFD_NONBLOCK)?))
    }

    /// Creates an interrupt line around an existing eventfd.
    pub fn with_eventfd(evt: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            config_generation: AtomicU32::new(0),
            evt,
        }
    }

    /// The eventfd to register as an irqfd.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.evt.write(1) {
            tracing::warn!("virtio: could not raise the interrupt: {e}");
        }
    }

    /// Signals that buffers were used (InterruptStatus bit 0).
    pub fn signal_used_queue(&self) {
        self.raise(INT_USED_RING);
    }

    /// Signals a configuration change (InterruptStatus bit 1) and bumps ConfigGeneration.
    pub fn signal_config_change(&self) {
        self.config_generation.fetch_add(1, Ordering::SeqCst);
        self.raise(INT_CONFIG);
    }

    /// Marks the device as needing a reset (DEVICE_NEEDS_RESET in the status register)
    /// after the driver broke the rules irrecoverably, and tells the driver with a
    /// configuration-change interrupt. Only the first call raises the interrupt.
    pub fn set_needs_reset(&self) {
        if !self.needs_reset.swap(true, Ordering::SeqCst) {
            tracing::warn!("virtio: device needs a reset");
            self.raise(INT_CONFIG);
        }
    }

    /// Whether the device needs a reset.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The ConfigGeneration register.
    pub fn config_generation(&self) -> u32 {
        self.config_generation.load(Ordering::SeqCst)
    }

    /// InterruptACK: clears the given bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Writes the eventfd again if an interrupt is pending (after a restore: an irqfd
    /// injection may have landed after the interrupt controllers were saved).
    pub fn reraise_if_pending(&self) {
        if self.status() != 0 {
            if let Err(e) = self.evt.write(1) {
                tracing::warn!("virtio: could not raise the interrupt: {e}");
            }
        }
    }

    /// Clears everything (device reset). The config generation keeps counting.
    pub fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
    }

    /// The plain state, for save/restore.
    pub fn state(&self) -> VirtioInterruptState {
        VirtioInterruptState {
            status: self.status(),
            needs_reset: self.needs_reset(),
            config_generation: self.config_generation(),
        }
    }

    /// Restores a saved state after validating it (does not raise the interrupt: see
    /// [`VirtioInterrupt::reraise_if_pending`]). On error nothing changes.
    pub fn set_state(&self, state: &VirtioInterruptState) -> Result<(), StateError> {
        state.validate()?;
        self.status.store(state.status, Ordering::SeqCst);
        self.needs_reset.store(state.needs_reset, Ordering::SeqCst);
        self.config_generation
            .store(state.config_generation, Ordering::SeqCst);
        Ok(())
    }
}

/// The plain state of a [`VirtioInterrupt`].
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioInterruptState {
    /// InterruptStatus: [`INT_USED_RING`] and [`INT_CONFIG`] bits.
    pub status: u32,
    /// Whether DEVICE_NEEDS_RESET is set.
    pub needs_reset: bool,
    /// ConfigGeneration.
    pub config_generation: u32,
}

impl VirtioInterruptState {
    /// Checks that the state is one an interrupt line can be in.
    pub fn validate(&self) -> Result<(), StateError> {
        if self.status & !(INT_USED_RING | INT_CONFIG) != 0 {
            return Err(StateError::InterruptStatus {
                status: self.status,
            });
        }
        Ok(())
    }
}

/// The saved state of one virtqueue: virtio-queue's own [`QueueState`] (its
/// configuration and the device's positions in its rings), made serializable.
///
/// The live queue of an active device belongs to the device, so this state is saved by
/// the device (see [`block::BlockState`]); the transport saves the queue registers as
/// the driver wrote them ([`mmio::MmioQueueState`]).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(transparent)]
pub struct VirtqueueState(#[serde(with = "QueueStateDef")] pub QueueState);

/// serde's description of virtio-queue's `QueueState`, which has no serde support of
/// its own. The compiler checks it against the real type field for field; the field
/// order is the encoding's (postcard writes the fields in this order), so never
/// reorder it.
#[derive(Serialize, Deserialize)]
#[serde(remote = "QueueState")]
struct QueueStateDef {
    /// The largest size the device offers (QueueNumMax).
    max_size: u16,
    /// The size the driver chose (QueueNum).
    size: u16,
    /// Whether the driver made the queue ready.
    ready: bool,
    /// Guest address of the descriptor table.
    desc_table: u64,
    /// Guest address of the available ring.
    avail_ring: u64,
    /// Guest address of the used ring.
    used_ring: u64,
    /// The device's position in the available ring: the next entry it will take.
    next_avail: u16,
    /// The device's position in the used ring: the next entry it will fill.
    next_used: u16,
    /// Whether VIRTIO_F_EVENT_IDX was negotiated.
    event_idx_enabled: bool,
}

impl From<&Queue> for VirtqueueState {
    fn from(q: &Queue) -> Self {
        Self(q.state())
    }
}

/// Alignment of the descriptor table (virtio 1.x, split ring).
const DESC_TABLE_ALIGN: u64 = 16;
/// Alignment of the available ring.
const AVAIL_RING_ALIGN: u64 = 2;
/// Alignment of the used ring.
const USED_RING_ALIGN: u64 = 4;

impl VirtqueueState {
    /// Rebuilds the queue of an active device: queue `index`, whose device offers
    /// `max_size` entries, with its rings in `mem`.
    ///
    /// The state is untrusted input. It is refused unless the queue is ready, its maximum
    /// size is the device's, its size a power of two no larger than that, its rings
    /// aligned and wholly inside guest memory. The ring positions take any value (they
    /// are free-running counters; a driver that does not agree with them gets
    /// DEVICE_NEEDS_RESET at the next notification, as it would on a running device).
    pub fn to_queue(
        &self,
        index: usize,
        max_size: u16,
        mem: &GuestMemory,
    ) -> Result<Queue, StateError> {
        let s = &self.0;
        if s.max_size != max_size {
            return Err(StateError::QueueMaxSize {
                index,
                saved: s.max_size,
                device: max_size,
            });
        }
        if !s.ready {
            return Err(StateError::QueueNotReady { index });
        }
        if s.size == 0 || s.size > max_size || !s.size.is_power_of_two() {
            return Err(StateError::QueueSize {
                index,
                size: s.size,
                max_size,
            });
        }
        for (ring, addr, align) in [
            ("descriptor table", s.desc_table, DESC_TABLE_ALIGN),
            ("available ring", s.avail_ring, AVAIL_RING_ALIGN),
            ("used ring", s.used_ring, USED_RING_ALIGN),
        ] {
            if addr % align != 0 {
                return Err(StateError::RingMisaligned { index, ring, addr });
            }
        }
        let mut queue =
            Queue::new(max_size).map_err(|source| StateError::Queue { index, source })?;
        queue
            .try_set_size(s.size)
            .map_err(|source| StateError::Queue { index, source })?;
        queue
            .try_set_desc_table_address(GuestAddress(s.desc_table))
            .map_err(|source| StateError::Queue { index, source })?;
        queue
            .try_set_avail_ring_address(GuestAddress(s.avail_ring))
            .map_err(|source| StateError::Queue { index, source })?;
        queue
            .try_set_used_ring_address(GuestAddress(s.used_ring))
            .map_err(|source| StateError::Queue { index, source })?;
        queue.set_event_idx(s.event_idx_enabled);
        queue.set_next_avail(s.next_avail);
        queue.set_next_used(s.next_used);
        queue.set_ready(true);
        if !queue.is_valid(mem) {
            return Err(StateError::RingsOutsideMemory { index });
        }
        Ok(queue)
    }
}

/// Why a saved virtio state (transport, interrupt, queue or device) was refused.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// the saved interrupt status has bits beyond used-ring and configuration-change
    #[error("the saved interrupt status {status:#x} has unknown bits")]
    InterruptStatus {
        /// The saved InterruptStatus.
        status: u32,
    },
    /// the saved device status has bits the driver cannot set
    #[error("the saved device status {status:#x} has bits the driver cannot set")]
    StatusBits {
        /// The saved status.
        status: u32,
    },
    /// the saved device status skips a step of the initialisation sequence
    #[error("the saved device status {status:#x} skips a step of the initialisation")]
    StatusOrder {
        /// The saved status.
        status: u32,
    },
    /// the saved features were accepted (FEATURES_OK) but the device would refuse them
    #[error(
        "the saved features {acked:#x} were accepted, but the device offers {offered:#x} and \
         requires VIRTIO_F_VERSION_1"
    )]
    FeaturesRefused {
        /// The features the driver accepted.
        acked: u64,
        /// The features the device offers.
        offered: u64,
    },
    /// the state was saved from a different kind of device
    #[error("the state was saved from virtio device type {saved}, this device is type {device}")]
    DeviceType {
        /// The saved device type.
        saved: u32,
        /// The device's type.
        device: u32,
    },
    /// the state was saved from a device offering different features
    #[error(
        "the state was saved from a device offering features {saved:#x}, this one offers \
         {device:#x} (a different read-only setting?)"
    )]
    DeviceFeatures {
        /// The saved device features.
        saved: u64,
        /// The device's features.
        device: u64,
    },
    /// the state has a different number of queues than the device
    #[error("the state has {saved} queues, the device has {device}")]
    QueueCount {
        /// Queues in the state.
        saved: usize,
        /// Queues of the device.
        device: usize,
    },
    /// a queue's saved maximum size differs from the device's
    #[error("queue {index}: the saved maximum size {saved} is not the device's {device}")]
    QueueMaxSize {
        /// The queue.
        index: usize,
        /// The saved maximum size.
        saved: u16,
        /// The device's maximum size.
        device: u16,
    },
    /// an active queue is not ready
    #[error("queue {index} of an active device is not ready")]
    QueueNotReady {
        /// The queue.
        index: usize,
    },
    /// a queue's size is not a power of two in 1..=its maximum
    #[error("queue {index}: size {size} is not a power of two between 1 and {max_size}")]
    QueueSize {
        /// The queue.
        index: usize,
        /// The saved size.
        size: u16,
        /// The queue's maximum size.
        max_size: u16,
    },
    /// a ring address breaks its alignment
    #[error("queue {index}: the {ring} at {addr:#x} is misaligned")]
    RingMisaligned {
        /// The queue.
        index: usize,
        /// Which ring.
        ring: &'static str,
        /// Its address.
        addr: u64,
    },
    /// a queue's rings are not wholly inside guest memory
    #[error("queue {index}: the rings are not inside guest memory")]
    RingsOutsideMemory {
        /// The queue.
        index: usize,
    },
    /// virtio-queue refused the queue configuration
    #[error("queue {index}: virtio-queue refuses the saved configuration")]
    Queue {
        /// The queue.
        index: usize,
        /// The cause.
        #[source]
        source: virtio_queue::Error,
    },
    /// the transport and the device disagree on whether the device is active
    #[error(
        "the transport status {status:#x} (needs reset: {needs_reset}) does not match a device \
         that is {}", if *.device_active { "active" } else { "inactive" }
    )]
    ActivationMismatch {
        /// The saved transport status.
        status: u32,
        /// Whether the saved interrupt has DEVICE_NEEDS_RESET.
        needs_reset: bool,
        /// Whether the restored device is active.
        device_active: bool,
    },
    /// the saved event-index setting of a queue disagrees with the acked features
    #[error("queue {index}: event index {enabled} disagrees with the acked features")]
    EventIdx {
        /// The queue.
        index: usize,
        /// The saved setting.
        enabled: bool,
    },
    /// a deferred request is recorded on an inactive device
    #[error("the state records a deferred request on an inactive device")]
    DeferredInactive,
    /// the disk to restore onto has a different size than the saved device
    #[error("the state was saved with a disk of {saved} sectors, this disk has {disk}")]
    Capacity {
        /// Sectors at save time.
        saved: u64,
        /// Sectors of the disk now.
        disk: u64,
    },
    /// the transport could not be built
    #[error("cannot build the transport")]
    Transport(#[source] mmio::MmioError),
    /// the block device could not be built
    #[error("cannot build the block device")]
    Block(#[source] block::BlockError),
}

/// Why a device refused to activate.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// the driver gave a different number of queues than the device has
    #[error("the device has {expected} queues, activation brought {got}")]
    QueueCount {
        /// Queues of the device.
        expected: usize,
        /// Queues given.
        got: usize,
    },
    /// the device is already active
    #[error("the device is already active")]
    AlreadyActive,
    /// a required queue is not ready
    #[error("queue {index} is not ready")]
    QueueNotReady {
        /// The queue.
        index: usize,
    },
}

/// What a device receives when the driver sets DRIVER_OK.
#[derive(Debug)]
pub struct Activation {
    /// Guest memory: every device write goes through it, so the dirty bitmap sees it.
    pub mem: GuestMemory,
    /// The queues, configured and validated by the transport (a queue the driver did not
    /// make ready is passed with `ready() == false`).
    pub queues: Vec<Queue>,
    /// The interrupt line.
    pub interrupt: std::sync::Arc<VirtioInterrupt>,
    /// The features the driver accepted.
    pub acked_features: u64,
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// The virtio device id (2 for a block device).
    fn device_type(&self) -> u32;

    /// The features the device offers (VIRTIO_F_VERSION_1 included).
    fn device_features(&self) -> u64;

    /// The maximum size of each queue; the number of entries is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// One notification eventfd per queue, in queue order. The transport duplicates them
    /// (for the VMM's ioeventfds and for QueueNotify writes that reach it).
    fn queue_events(&self) -> &[EventFd];

    /// Reads the device configuration space at `offset` (out-of-range bytes read 0).
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes the device configuration space at `offset`.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// Starts the device (the driver set DRIVER_OK). Called on a vCPU thread; queue work
    /// belongs to the event loop, which the transport wakes after a successful activation.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;

    /// Stops the device and forgets the queues and the driver's features (the driver wrote
    /// 0 to the status register).
    fn reset(&mut self);

    /// Whether the device was activated and not reset since (checked against the
    /// transport's state on restore).
    fn is_active(&self) -> bool;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The postcard bytes of a queue state, as the hand-written mirror of `QueueState`
    /// that `VirtqueueState` used to be encoded them: checkpoints written by earlier
    /// builds must decode, and new ones must not change.
    const GOLDEN_QUEUE: &[u8] = &[
        0x80, 0x02, 0x80, 0x01, 0x01, 0x80, 0x80, 0x04, 0x80, 0x90, 0x04, 0x80, 0xa0, 0x04, 0xfd,
        0xff, 0x03, 0x07, 0x01,
    ];

    fn golden_queue() -> QueueState {
        QueueState {
            max_size: 256,
            next_avail: 0xfffd,
            next_used: 7,
            event_idx_enabled: true,
            size: 128,
            ready: true,
            desc_table: 0x1_0000,
            avail_ring: 0x1_0800,
            used_ring: 0x1_1000,
        }
    }

    #[test]
    fn queue_state_encoding_is_stable() {
        let state = VirtqueueState(golden_queue());
        let bytes = postcard::to_allocvec(&state).unwrap();
        assert_eq!(bytes, GOLDEN_QUEUE, "{bytes:02x?}");
        let decoded: VirtqueueState = postcard::from_bytes(GOLDEN_QUEUE).unwrap();
        assert_eq!(decoded, state);
    }
}
