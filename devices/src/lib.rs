//! mirrorvm's devices: the I/O buses, the legacy PC devices (16550 serial, i8042,
//! debug exit), the virtio-mmio transport with virtio-blk, and the checkpoint store
//! that keeps guest disk writes out of the base image until their checkpoint is held
//! by the peer, and the locks that keep two mirrorvm processes off the same files.

// Outside tests, nothing a guest or user controls may panic the device model: no
// unwrap/expect (tests use them freely). The crate has no unsafe code; any that is
// added needs a `// SAFETY:` comment (workspace lint `undocumented_unsafe_blocks`).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod bus;
pub mod codec;
pub mod legacy;
pub mod lock;
pub mod serial;
pub mod snapshot;
pub mod store;
pub mod virtio;

/// Displays an error followed by each of its sources, `"outer: inner: innermost"`.
///
/// The errors of this crate follow one convention: a variant's message says what
/// failed at its own level and the cause is attached with `#[source]`, never repeated
/// in the message. Whoever prints an error for a person (a log line, the binary's
/// report) prints the whole chain, for example with this.
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(e) = source {
            write!(f, ": {e}")?;
            source = e.source();
        }
        Ok(())
    }
}

// mirrorvm runs on x86_64 only, where usize is 64 bits: see `to_usize`.
const _: () = assert!(usize::BITS == 64);

/// Converts a `u64` to a `usize`, which never truncates here: mirrorvm runs on x86_64
/// only, where `usize` is 64 bits (asserted at compile time next to this function).
///
/// Use it for offsets and lengths already bounded by a file's or the guest's size,
/// rather than a bare `as usize` (which the `cast_possible_truncation` lint flags).
#[allow(clippy::cast_possible_truncation)] // usize is 64 bits, asserted above
pub const fn to_usize(x: u64) -> usize {
    x as usize
}

/// Bytes per sector of every virtual disk: the unit of virtio-blk requests and of the
/// checkpoint store's records.
pub const SECTOR_SIZE: u64 = 512;

/// Guest memory as every device sees it: mmap-backed, with a dirty bitmap that
/// records the VMM's own writes (KVM's dirty log does not see them).
pub type GuestMemory = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

#[cfg(test)]
mod tests {
    use super::ErrorChain;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot write the journal")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn error_chain_prints_every_source() {
        let e = Outer(std::io::Error::other("disk full"));
        assert_eq!(e.to_string(), "cannot write the journal");
        assert_eq!(
            ErrorChain(&e).to_string(),
            "cannot write the journal: disk full"
        );
    }
}
