//! Device save and restore: the [`Snapshot`] trait every device implements, and the
//! order in which the VMM saves and restores devices at a cut.
//!
//! Each device owns a plain, serde-serializable state type beside it:
//! [`crate::serial::SerialDeviceState`], [`crate::legacy::I8042State`],
//! [`crate::virtio::mmio::MmioTransportState`] (with
//! [`crate::virtio::VirtioInterruptState`]) and [`crate::virtio::block::BlockState`]
//! (with [`crate::virtio::VirtqueueState`]). Saving is [`Snapshot::snapshot`]; restoring
//! is a constructor on each device, because each needs different host resources (an
//! eventfd, an output sink, a disk, guest memory). A state read back from a checkpoint
//! is untrusted input: every restore constructor validates it and refuses what a
//! running device could never have been in, with an error, never a panic.
//!
//! # At the cut (vCPUs paused, on the event-loop thread, between two iterations)
//!
//! 1. For every block device, [`crate::virtio::block::Block::process_pending`]: drains
//!    the queue notifications (ioeventfd counts) and processes what is available, so no
//!    notification is lost and no request is half done.
//! 2. Save every device with [`Snapshot::snapshot`]: the serial port, the i8042, each
//!    virtio-mmio transport and each block device behind it.
//!
//! # On restore (before any vCPU runs)
//!
//! 1. `SerialDevice::restore`, `I8042::set_state`.
//! 2. For each block device: one `VirtioInterrupt`, then `Block::restore` (the queue is
//!    rebuilt at its saved ring addresses and positions), then `MmioTransport::restore`
//!    on the same interrupt.
//! 3. Register the ioeventfds and irqfds exactly as on boot; add the block devices to
//!    the event loop.
//! 4. `MmioTransport::post_restore` for each transport: every queue of an active device
//!    is looked at again (its eventfd is written, so the event loop processes buffers
//!    made available after the cut, and redoes a request the disk had deferred), and the
//!    interrupt is raised again when the interrupt status is non-zero.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// A device whose state can be saved at a cut.
///
/// The state is plain data: serialize it with any serde codec (the checkpoint format
/// uses postcard). Restoring is a constructor of the device, which validates the state.
pub trait Snapshot {
    /// The device's saved state.
    type State: Serialize + DeserializeOwned + Clone + std::fmt::Debug + PartialEq;

    /// Saves the device's state. At a cut, call it with the device quiescent: vCPUs
    /// paused and, for virtio devices, after `process_pending`.
    fn snapshot(&self) -> Self::State;
}
