//! Facts of the one architecture mirrorvm runs on (x86_64, KVM), and what follows
//! from them for the code.

/// `u64` to `usize` without truncation on x86_64 (the devices crate asserts that
/// `usize` is 64 bits, once, beside the function).
pub use devices::to_usize;
