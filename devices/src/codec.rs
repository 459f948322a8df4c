//! The one way mirrorvm encodes its fixed-layout, little-endian on-disk headers.
//!
//! A header is a `#[repr(C)]` struct of byte arrays and [`U16`]/[`U32`]/[`U64`]
//! (little-endian integers of alignment 1, so the struct has no implicit padding and
//! its layout is its byte layout on disk on every host), with reserved bytes as
//! explicit `[u8; N]` fields. It derives zerocopy's [`FromBytes`], [`IntoBytes`],
//! [`KnownLayout`] and [`Immutable`]; encoding is then [`IntoBytes::as_bytes`] (or
//! `zerocopy::transmute!` into a byte array), decoding [`FromBytes::read_from_bytes`]
//! or [`FromBytes::read_from_prefix`]: no offset arithmetic by hand. The struct is the
//! raw bytes only; a typed, validated view (with enums, bounds checked) lives beside
//! it and converts to and from it.
//!
//! Headers that end in a CRC32C of all their preceding bytes implement
//! [`Crc32cHeader`] (an empty impl) and get [`Crc32cHeader::seal`] and
//! [`Crc32cHeader::check_crc`].
//!
//! ```
//! use devices::codec::{Crc32cHeader, FromBytes, Immutable, IntoBytes, KnownLayout, U32, U64};
//!
//! #[derive(FromBytes, IntoBytes, KnownLayout, Immutable)]
//! #[repr(C)]
//! struct RawExample {
//!     magic: [u8; 8],
//!     version: U32,
//!     reserved: [u8; 4],
//!     epoch: U64,
//!     crc: U32,
//! }
//! // Pin the on-disk size: a field added by mistake fails the build.
//! const _: () = assert!(size_of::<RawExample>() == 28);
//! impl Crc32cHeader for RawExample {}
//!
//! let mut h = RawExample {
//!     magic: *b"EXAMPLE\0",
//!     version: U32::new(1),
//!     reserved: [0; 4],
//!     epoch: U64::new(42),
//!     crc: U32::ZERO,
//! };
//! h.seal();
//! let bytes: [u8; 28] = zerocopy::transmute!(h);
//! let back = RawExample::read_from_bytes(&bytes).unwrap();
//! back.check_crc().unwrap();
//! assert_eq!(back.epoch.get(), 42);
//! ```

pub use zerocopy::little_endian::{U16, U32, U64};
pub use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Size of the CRC32C field that ends a [`Crc32cHeader`].
pub const CRC_LEN: usize = 4;

/// A stored CRC32C does not match the bytes it covers (the header is torn or corrupt).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("CRC32C {stored:#010x} stored, {computed:#010x} computed")]
pub struct CrcMismatch {
    /// The CRC found in the header.
    pub stored: u32,
    /// The CRC of the bytes it covers.
    pub computed: u32,
}

/// A fixed-layout header whose last [`CRC_LEN`] bytes are the little-endian CRC32C
/// (Castagnoli) of all the bytes before them.
///
/// Implement it with an empty `impl` on a zerocopy header struct whose last field is
/// the `U32` CRC. The CRC is computed over the struct's bytes, reserved fields
/// included, so reserved bytes are covered as the format says.
pub trait Crc32cHeader: FromBytes + IntoBytes + Immutable + KnownLayout + Sized {
    /// Bytes covered by the CRC: everything but the CRC field itself.
    const COVERED: usize = size_of::<Self>() - CRC_LEN;

    /// The CRC32C of the covered bytes. To extend it over data that follows the
    /// header (as a write record does), pass it to `crc32c::crc32c_append`.
    fn covered_crc(&self) -> u32 {
        crc32c::crc32c(&self.as_bytes()[..Self::COVERED])
    }

    /// The CRC stored in the header's last bytes.
    fn stored_crc(&self) -> u32 {
        let mut b = [0u8; CRC_LEN];
        b.copy_from_slice(&self.as_bytes()[Self::COVERED..]);
        u32::from_le_bytes(b)
    }

    /// Sets the stored CRC to `crc`.
    fn set_stored_crc(&mut self, crc: u32) {
        self.as_mut_bytes()[Self::COVERED..].copy_from_slice(&crc.to_le_bytes());
    }

    /// Fills in the CRC over the covered bytes: call it last, before writing.
    fn seal(&mut self) {
        let crc = self.covered_crc();
        self.set_stored_crc(crc);
    }

    /// Checks the stored CRC against the covered bytes.
    fn check_crc(&self) -> Result<(), CrcMismatch> {
        let (stored, computed) = (self.stored_crc(), self.covered_crc());
        if stored == computed {
            Ok(())
        } else {
            Err(CrcMismatch { stored, computed })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Debug)]
    #[repr(C)]
    struct Raw {
        a: U16,
        pad: [u8; 2],
        b: U64,
        crc: U32,
    }
    const _: () = assert!(size_of::<Raw>() == 16);
    impl Crc32cHeader for Raw {}

    #[test]
    fn little_endian_layout_and_crc() {
        let mut r = Raw {
            a: U16::new(0x0102),
            pad: [0; 2],
            b: U64::new(0x0304_0506_0708_090a),
            crc: U32::ZERO,
        };
        r.seal();
        let bytes = r.as_bytes();
        assert_eq!(&bytes[..12], &[2, 1, 0, 0, 10, 9, 8, 7, 6, 5, 4, 3]);
        let crc = crc32c::crc32c(&bytes[..12]);
        assert_eq!(&bytes[12..], &crc.to_le_bytes());
        assert_eq!(r.check_crc(), Ok(()));
        let mut damaged = Raw::read_from_bytes(bytes).unwrap();
        damaged.pad[1] = 1;
        assert_eq!(
            damaged.check_crc(),
            Err(CrcMismatch {
                stored: crc,
                computed: damaged.covered_crc()
            })
        );
    }
}
