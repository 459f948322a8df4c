//! mirrorvm's devices: the I/O buses, the legacy PC devices (16550 serial, i8042,
//! debug exit), the virtio-mmio transport with virtio-blk, and the checkpoint store
//! that keeps guest disk writes out of the base image until their checkpoint is held
//! by the peer.

pub mod bus;
pub mod codec;
pub mod legacy;
pub mod serial;
pub mod snapshot;
pub mod store;
pub mod virtio;

/// Bytes per sector of every virtual disk: the unit of virtio-blk requests and of the
/// checkpoint store's records.
pub const SECTOR_SIZE: u64 = 512;

/// Guest memory as every device sees it: mmap-backed, with a dirty bitmap that
/// records the VMM's own writes (KVM's dirty log does not see them).
pub type GuestMemory = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
