//! mirrorvm's virtual machine: KVM VM and memory, vCPUs, boot, devices wiring, the
//! epoch engine and checkpoints.
//!
//! Where to look:
//! - configuration becomes a machine: `machine/build.rs`;
//! - how a cut works: `epoch/cut.rs` (the engine's state machine: `epoch/mod.rs`);
//! - where checkpoints go: `checkpoint/sink.rs` (the directory: `checkpoint/directory.rs`);
//! - where they come from on restore: `checkpoint/source.rs`;
//! - how a run ends: `epoch/ending.rs`, carried out by `machine/run.rs`.

pub mod boot;
pub mod checkpoint;
pub mod config;
pub mod cpuid;
pub mod dirty;
pub mod disk;
pub mod epoch;
pub mod layout;
pub mod machine;
pub mod memory;
pub mod mptable;
pub mod output;
pub mod replication;
pub mod run_end;
pub mod terminal;
pub mod testguest;
pub mod vcpu;
pub mod vm_state;

pub use config::VmConfig;
pub use machine::{Machine, VmmError};
pub use run_end::RunEnd;

// mirrorvm runs on x86_64 only, where usize is 64 bits: see `to_usize`.
const _: () = assert!(usize::BITS == 64);

/// Converts a `u64` to a `usize`, which never truncates here: mirrorvm runs on x86_64
/// only, where `usize` is 64 bits (asserted at compile time next to this function).
///
/// Use it for guest addresses, sizes and offsets already bounded by guest memory or
/// a file's length, rather than a bare `as usize` (which `cast_possible_truncation`
/// flags).
#[allow(clippy::cast_possible_truncation)] // usize is 64 bits, asserted above
pub(crate) const fn to_usize(x: u64) -> usize {
    x as usize
}
