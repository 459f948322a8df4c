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

use virtio_queue::Queue;
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

    /// Restores a saved state (does not raise the interrupt: see
    /// [`VirtioInterrupt::reraise_if_pending`]).
    pub fn set_state(&self, state: &VirtioInterruptState) {
        self.status.store(state.status, Ordering::SeqCst);
        self.needs_reset.store(state.needs_reset, Ordering::SeqCst);
        self.config_generation
            .store(state.config_generation, Ordering::SeqCst);
    }
}

/// The plain state of a [`VirtioInterrupt`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioInterruptState {
    /// InterruptStatus.
    pub status: u32,
    /// Whether DEVICE_NEEDS_RESET is set.
    pub needs_reset: bool,
    /// ConfigGeneration.
    pub config_generation: u32,
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
}
