//! How big a disk's checkpoint regions are: the bounds a user's region size
//! (`--disk ...,region-size=S`) must keep, and the size a new journal gets when the
//! user names none. `docs/store-format.md` ("Region size") gives the reasoning.

use super::format::Geometry;

/// The granularity of a region size: the journal lays out its slots in 4 KiB pages
/// (a slot's header area, then its records), so a region is a whole number of them.
pub const REGION_SIZE_ALIGN: u64 = 4096;

/// The smallest region a user may ask for. A guest request is written into one
/// region whole (a request that does not fit waits for the next cut, whole), so a
/// region must hold the largest request a guest sends at once with room to spare:
/// Linux's default limit is 1280 KiB, and the device hands the store at most 2 MiB
/// per record.
pub const MIN_REGION_SIZE: u64 = 2 << 20;

/// The largest region a user may ask for: a standby takes at most 1 GiB of region
/// data per disk in one checkpoint (`AssemblerLimits`), so a larger region could
/// never be mirrored.
pub const MAX_REGION_SIZE: u64 = 1 << 30;

/// The default region never exceeds this (the size every journal had before the
/// region size became the user's to choose).
pub const DEFAULT_REGION_CAP: u64 = 64 << 20;

/// The default region holds this fraction of the disk (1/4).
pub const DEFAULT_DISK_DIVISOR: u64 = 4;

/// Region slots in a new journal: one region frozen at the cut and travelling, one
/// taking the guest's writes. The engine keeps one checkpoint in flight, so it never
/// uses more.
pub const DEFAULT_SLOTS: u32 = 2;

/// The region size a new journal gets for a disk of `disk_len` bytes when the user
/// names none: a quarter of the disk rounded up to a whole MiB, at least
/// [`MIN_REGION_SIZE`] and at most [`DEFAULT_REGION_CAP`]. A 16 MiB disk gets 4 MiB
/// regions (a journal of 8 MiB), a disk of 256 MiB or more 64 MiB regions.
pub fn default_region_size(disk_len: u64) -> u64 {
    const MIB: u64 = 1 << 20;
    let share = disk_len.div_ceil(DEFAULT_DISK_DIVISOR);
    share
        .div_ceil(MIB)
        .saturating_mul(MIB)
        .clamp(MIN_REGION_SIZE, DEFAULT_REGION_CAP)
}

/// A region size the store refuses to create.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RegionSizeError {
    /// The size is not a whole number of the journal's 4 KiB pages.
    #[error("region-size {} is not a multiple of 4 KiB (the journal lays out its regions in 4 KiB pages)", Bytes(*.0))]
    Unaligned(u64),
    /// The size is below the minimum.
    #[error("region-size {} is below the minimum {}: a region must hold a guest's largest write request whole (Linux sends up to 1280 KiB)", Bytes(*.0), Bytes(MIN_REGION_SIZE))]
    TooSmall(u64),
    /// The size is above the maximum.
    #[error("region-size {} is above the maximum {}: a standby takes at most that much region data per disk in one checkpoint", Bytes(*.0), Bytes(MAX_REGION_SIZE))]
    TooLarge(u64),
}

/// Checks a region size a user asked for: a multiple of [`REGION_SIZE_ALIGN`] from
/// [`MIN_REGION_SIZE`] to [`MAX_REGION_SIZE`].
pub fn check_region_size(bytes: u64) -> Result<u64, RegionSizeError> {
    if bytes < MIN_REGION_SIZE {
        Err(RegionSizeError::TooSmall(bytes))
    } else if bytes > MAX_REGION_SIZE {
        Err(RegionSizeError::TooLarge(bytes))
    } else if bytes % REGION_SIZE_ALIGN != 0 {
        Err(RegionSizeError::Unaligned(bytes))
    } else {
        Ok(bytes)
    }
}

/// The length of a journal of `slot_count` regions of `region_size` bytes: the file
/// header's page, then per slot its header page and its records.
pub fn journal_len(slot_count: u32, region_size: u64) -> u64 {
    Geometry {
        slot_count,
        capacity: region_size,
    }
    .journal_len()
}

/// A byte count for people: exact, in the largest binary unit that divides it
/// (`64 MiB`, `4100 KiB`), else in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bytes(pub u64);

impl std::fmt::Display for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const UNITS: [(u32, &str); 4] = [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")];
        let n = self.0;
        for (shift, unit) in UNITS {
            let size = 1u64 << shift;
            if n >= size && n % size == 0 {
                return write!(f, "{} {unit}", n >> shift);
            }
        }
        write!(f, "{n} bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn default_follows_the_disk_between_floor_and_cap() {
        // Tiny disks get the floor.
        assert_eq!(default_region_size(512), MIN_REGION_SIZE);
        assert_eq!(default_region_size(4 * MIB), MIN_REGION_SIZE);
        assert_eq!(default_region_size(8 * MIB), MIN_REGION_SIZE);
        // A quarter of the disk, rounded up to a MiB.
        assert_eq!(default_region_size(16 * MIB), 4 * MIB);
        assert_eq!(default_region_size(16 * MIB + 512), 5 * MIB);
        assert_eq!(default_region_size(100 * MIB), 25 * MIB);
        assert_eq!(default_region_size(255 * MIB), 64 * MIB);
        // The cap from 256 MiB on.
        assert_eq!(default_region_size(256 * MIB), 64 * MIB);
        assert_eq!(default_region_size(1 << 40), 64 * MIB);
        assert_eq!(default_region_size(u64::MAX), 64 * MIB);
        // Every default is a size a user could have asked for.
        for len in [0, 512, 3 * MIB + 512, 16 * MIB, 77 * MIB + 4096, 1 << 50] {
            assert_eq!(
                check_region_size(default_region_size(len)),
                Ok(default_region_size(len))
            );
        }
    }

    #[test]
    fn a_16_mib_disk_gets_a_journal_half_its_size() {
        let len = journal_len(DEFAULT_SLOTS, default_region_size(16 * MIB));
        assert_eq!(len, 4096 + 2 * (4096 + 4 * MIB));
        assert!(len < 16 * MIB / 2 + 16 * 1024);
    }

    #[test]
    fn bounds_and_granularity() {
        assert_eq!(check_region_size(2 * MIB), Ok(2 * MIB));
        assert_eq!(check_region_size(1 << 30), Ok(1 << 30));
        assert_eq!(check_region_size(2 * MIB + 4096), Ok(2 * MIB + 4096));
        assert_eq!(
            check_region_size(2 * MIB - 4096),
            Err(RegionSizeError::TooSmall(2 * MIB - 4096))
        );
        assert_eq!(check_region_size(0), Err(RegionSizeError::TooSmall(0)));
        assert_eq!(
            check_region_size((1 << 30) + 4096),
            Err(RegionSizeError::TooLarge((1 << 30) + 4096))
        );
        assert_eq!(
            check_region_size(3 * MIB + 512),
            Err(RegionSizeError::Unaligned(3 * MIB + 512))
        );
        let msg = RegionSizeError::TooSmall(MIB).to_string();
        assert!(
            msg.contains("1 MiB") && msg.contains("minimum 2 MiB"),
            "{msg}"
        );
        let msg = RegionSizeError::Unaligned(3 * MIB + 512).to_string();
        assert!(
            msg.contains("3146240 bytes") && msg.contains("4 KiB"),
            "{msg}"
        );
    }

    #[test]
    fn bytes_are_shown_exactly() {
        assert_eq!(Bytes(64 * MIB).to_string(), "64 MiB");
        assert_eq!(Bytes(4100 * 1024).to_string(), "4100 KiB");
        assert_eq!(Bytes(1 << 30).to_string(), "1 GiB");
        assert_eq!(Bytes(8 * MIB + 12 * 1024).to_string(), "8204 KiB");
        assert_eq!(Bytes(1000).to_string(), "1000 bytes");
        assert_eq!(Bytes(0).to_string(), "0 bytes");
    }
}
