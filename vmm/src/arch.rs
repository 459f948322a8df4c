//! Facts of the one architecture mirrorvm runs on (x86_64, KVM), and what follows
//! from them for the code.

// mirrorvm runs on x86_64 only, where usize is 64 bits: see `to_usize`.
const _: () = assert!(usize::BITS == 64);

/// Converts a `u64` to a `usize`, which never truncates here: mirrorvm runs on x86_64
/// only, where `usize` is 64 bits (asserted at compile time next to this function).
///
/// Use it for guest addresses, sizes and offsets already bounded by guest memory or
/// a file's length, rather than a bare `as usize` (which `cast_possible_truncation`
/// flags).
#[allow(clippy::cast_possible_truncation)] // usize is 64 bits, asserted above
pub const fn to_usize(x: u64) -> usize {
    x as usize
}
