//! An I/O bus: maps non-overlapping address ranges to devices.
//!
//! The same type serves the port I/O space (PIO exits) and the memory-mapped I/O space
//! (MMIO exits). A device sees accesses as an offset from the base of its range.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// A device that can sit on a [`Bus`].
pub trait BusDevice: Send {
    /// Reads `data.len()` bytes at `offset` from the device's base into `data`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Writes `data` at `offset` from the device's base.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors of [`Bus::insert`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// a bus range must not be empty
    #[error("a bus range must not be empty (base {base:#x})")]
    ZeroLength {
        /// Base of the rejected range.
        base: u64,
    },
    /// the range wraps around the end of the address space
    #[error("bus range at {base:#x} of length {len:#x} wraps around the address space")]
    Overflow {
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// the range overlaps a range that is already on the bus
    #[error(
        "bus range [{base:#x}, +{len:#x}) overlaps the existing range [{other_base:#x}, +{other_len:#x})"
    )]
    Overlap {
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
        /// Base of the range it collides with.
        other_base: u64,
        /// Length of the range it collides with.
        other_len: u64,
    },
}

/// A device shared between the bus and whoever else needs it (the VMM, an event loop).
pub type SharedBusDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct BusRange {
    len: u64,
    device: SharedBusDevice,
}

/// Locks a mutex, recovering the guard if another thread panicked while holding it.
///
/// A poisoned device lock must not take the whole VMM down: the device state may be
/// half-updated, but it is still memory-safe to use and the guest can reset it.
pub fn lock_recover<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| {
        tracing::warn!("recovering a poisoned device lock");
        poisoned.into_inner()
    })
}

/// Maps non-overlapping `[base, base + len)` ranges to devices.
///
/// Cloning a bus shares its devices. Lookups take `&self`, so one bus (in an `Arc`) can
/// serve every vCPU thread; each access locks only the device it reaches.
#[derive(Clone, Default)]
pub struct Bus {
    ranges: BTreeMap<u64, BusRange>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(
                self.ranges
                    .iter()
                    .map(|(base, r)| format!("[{base:#x}, +{:#x})", r.len)),
            )
            .finish()
    }
}

impl Bus {
    /// Creates an empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` on the bus at `[base, base + len)`.
    pub fn insert(&mut self, device: SharedBusDevice, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength { base });
        }
        // `last` is the highest address of the new range; `base + len` may be 2^64 exactly.
        let last = base
            .checked_add(len - 1)
            .ok_or(BusError::Overflow { base, len })?;
        // The only ranges that can overlap are the last one starting at or below `last`.
        if let Some((&other_base, other)) = self.ranges.range(..=last).next_back() {
            // other_base <= last; they overlap unless `other` ends before `base`.
            let other_last = other_base + (other.len - 1);
            if other_last >= base {
                return Err(BusError::Overlap {
                    base,
                    len,
                    other_base,
                    other_len: other.len,
                });
            }
        }
        self.ranges.insert(base, BusRange { len, device });
        Ok(())
    }

    /// Finds the device whose range holds `addr`: its base and the device.
    pub fn get(&self, addr: u64) -> Option<(u64, &SharedBusDevice)> {
        let (&base, range) = self.ranges.range(..=addr).next_back()?;
        if addr - base < range.len {
            Some((base, &range.device))
        } else {
            None
        }
    }

    /// Removes the device whose range starts at `base`, returning it.
    pub fn remove(&mut self, base: u64) -> Option<SharedBusDevice> {
        self.ranges.remove(&base).map(|r| r.device)
    }

    /// Reads from the device at `addr`. Returns false (and leaves `data` alone) when no
    /// device is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.get(addr) {
            Some((base, device)) => {
                lock_recover(device).read(addr - base, data);
                true
            }
            None => false,
        }
    }

    /// Writes to the device at `addr`. Returns false when no device is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.get(addr) {
            Some((base, device)) => {
                lock_recover(device).write(addr - base, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records the last access; reads return the offset's low byte.
    #[derive(Default)]
    struct Probe {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Probe {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset.to_le_bytes()[0]);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    fn probe() -> Arc<Mutex<Probe>> {
        Arc::new(Mutex::new(Probe::default()))
    }

    #[test]
    fn insert_rejects_overlap_and_zero_length() {
        let mut bus = Bus::new();
        bus.insert(probe(), 0x10, 0x10).unwrap();
        assert_eq!(
            bus.insert(probe(), 0x40, 0),
            Err(BusError::ZeroLength { base: 0x40 })
        );
        for (base, len) in [
            (0x10, 1),
            (0x1f, 1),
            (0x8, 0x9),
            (0x0, 0x100),
            (0x18, 0x100),
        ] {
            assert!(
                matches!(
                    bus.insert(probe(), base, len),
                    Err(BusError::Overlap { .. })
                ),
                "[{base:#x}, +{len:#x}) should overlap"
            );
        }
        // Adjacent ranges are fine.
        bus.insert(probe(), 0x8, 0x8).unwrap();
        bus.insert(probe(), 0x20, 0x8).unwrap();
        // The very top of the address space, and a wrapping range.
        bus.insert(probe(), u64::MAX, 1).unwrap();
        assert!(matches!(
            bus.insert(probe(), u64::MAX - 1, 3),
            Err(BusError::Overflow { .. })
        ));
        assert!(matches!(
            bus.insert(probe(), u64::MAX - 1, 2),
            Err(BusError::Overlap { .. })
        ));
    }

    #[test]
    fn dispatch_with_offsets() {
        let mut bus = Bus::new();
        let a = probe();
        let b = probe();
        bus.insert(a.clone(), 0x3f8, 8).unwrap();
        bus.insert(b.clone(), 0xd000_0000, 0x1000).unwrap();

        let mut data = [0u8; 1];
        assert!(bus.read(0x3fd, &mut data));
        assert_eq!(data, [5]);
        assert!(bus.write(0x3f8, b"x"));
        assert_eq!(a.lock().unwrap().last_write, Some((0, vec![b'x'])));

        let mut word = [0u8; 4];
        assert!(bus.read(0xd000_0070, &mut word));
        assert_eq!(word, [0x70; 4]);
        assert!(bus.write(0xd000_0fff, &[1, 2]));
        assert_eq!(b.lock().unwrap().last_write, Some((0xfff, vec![1, 2])));

        // Holes.
        let mut untouched = [0xaa];
        assert!(!bus.read(0x3f7, &mut untouched));
        assert!(!bus.read(0x400, &mut untouched));
        assert!(!bus.write(0xd000_1000, &[0]));
        assert!(!bus.read(0, &mut untouched));
        assert_eq!(untouched, [0xaa]);

        assert!(bus.remove(0x3f8).is_some());
        assert!(!bus.write(0x3f8, &[0]));
    }

    #[test]
    fn poisoned_device_lock_does_not_panic() {
        let mut bus = Bus::new();
        let dev = probe();
        bus.insert(dev.clone(), 0x60, 1).unwrap();
        let d = dev.clone();
        let _ = std::thread::spawn(move || {
            let _guard = d.lock().unwrap();
            panic!("poison the lock");
        })
        .join();
        assert!(dev.is_poisoned());
        assert!(bus.write(0x60, &[7]));
        let mut data = [0];
        assert!(bus.read(0x60, &mut data));
    }
}
