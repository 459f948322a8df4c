//! The in-memory index of a region: which sectors it holds and where their newest data
//! sits in the journal. Reads never scan the journal.

use std::collections::BTreeMap;
use std::ops::Bound;

use super::format::SECTOR_SIZE;

/// A run of sectors whose data lies contiguously in the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub sectors: u64,
    /// Journal byte offset of the first sector's data.
    pub offset: u64,
}

/// Non-overlapping extents keyed by first sector; a later insert wins where it overlaps.
#[derive(Debug, Clone, Default)]
pub struct ExtentMap {
    map: BTreeMap<u64, (u64, u64)>,
    sectors: u64,
}

impl ExtentMap {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the map holds nothing.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Number of distinct sectors held.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Records that `sectors` sectors from `sector` now live at journal `offset`.
    pub fn insert(&mut self, sector: u64, sectors: u64, offset: u64) {
        if sectors == 0 {
            return;
        }
        let end = sector + sectors;
        // Extents that may overlap: the one starting at or before `sector`, and all
        // starting inside [sector, end).
        let mut hits = Vec::new();
        if let Some((&s, &(n, o))) = self.map.range(..=sector).next_back() {
            if s + n > sector {
                hits.push((s, n, o));
            }
        }
        for (&s, &(n, o)) in self
            .map
            .range((Bound::Excluded(sector), Bound::Excluded(end)))
        {
            hits.push((s, n, o));
        }
        // `sector` itself may have matched both queries' edges only once: the first
        // query includes it, the second excludes it.
        for (s, n, o) in hits {
            self.map.remove(&s);
            self.sectors -= n;
            if s < sector {
                self.map.insert(s, (sector - s, o));
                self.sectors += sector - s;
            }
            if s + n > end {
                let skip = end - s;
                self.map.insert(end, (s + n - end, o + skip * SECTOR_SIZE));
                self.sectors += s + n - end;
            }
        }
        self.map.insert(sector, (sectors, offset));
        self.sectors += sectors;
    }

    /// Calls `f(sector, sectors, Some(offset))` for each held piece of
    /// `[sector, sector + sectors)` and `f(sector, sectors, None)` for each hole, in
    /// order.
    pub fn lookup(&self, sector: u64, sectors: u64, mut f: impl FnMut(u64, u64, Option<u64>)) {
        let end = sector + sectors;
        // Fast paths with one tree search: the range lies inside one extent, or in a
        // hole (the last extent starting before its end ends before it starts).
        match self.map.range(..end).next_back() {
            None => return f(sector, sectors, None),
            Some((&s, &(n, o))) => {
                if s <= sector && s + n >= end {
                    return f(sector, sectors, Some(o + (sector - s) * SECTOR_SIZE));
                }
                if s + n <= sector {
                    return f(sector, sectors, None);
                }
            }
        }
        let mut pos = sector;
        let start_key = match self.map.range(..=sector).next_back() {
            Some((&s, &(n, _))) if s + n > sector => s,
            _ => sector,
        };
        for (&s, &(n, o)) in self.map.range(start_key..end) {
            if s > pos {
                f(pos, s - pos, None);
                pos = s;
            }
            let piece_end = (s + n).min(end);
            if piece_end > pos {
                f(pos, piece_end - pos, Some(o + (pos - s) * SECTOR_SIZE));
                pos = piece_end;
            }
        }
        if pos < end {
            f(pos, end - pos, None);
        }
    }

    /// Every extent, in sector order.
    pub fn extents(&self) -> impl Iterator<Item = Extent> + '_ {
        self.map.iter().map(|(&sector, &(sectors, offset))| Extent {
            sector,
            sectors,
            offset,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(m: &ExtentMap, s: u64, n: u64) -> Vec<(u64, u64, Option<u64>)> {
        let mut v = Vec::new();
        m.lookup(s, n, |a, b, c| v.push((a, b, c)));
        v
    }

    #[test]
    fn newest_wins_and_splits() {
        let mut m = ExtentMap::new();
        m.insert(10, 10, 0);
        m.insert(12, 2, 100_000);
        assert_eq!(m.sectors(), 10);
        assert_eq!(
            pieces(&m, 8, 14),
            vec![
                (8, 2, None),
                (10, 2, Some(0)),
                (12, 2, Some(100_000)),
                (14, 6, Some(4 * 512)),
                (20, 2, None)
            ]
        );
        m.insert(5, 20, 7);
        assert_eq!(m.sectors(), 20);
        assert_eq!(
            pieces(&m, 0, 30),
            vec![(0, 5, None), (5, 20, Some(7)), (25, 5, None)]
        );
    }

    #[test]
    fn model_check() {
        // Compare against a per-sector array over many random inserts.
        let mut state = 12345u64;
        let mut rnd = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut m = ExtentMap::new();
        let mut arr = vec![None; 200];
        for i in 0..2000u64 {
            let s = rnd() % 190;
            let n = 1 + rnd() % 10;
            let off = i * 1_000_000;
            m.insert(s, n, off);
            for k in 0..n {
                arr[crate::to_usize(s + k)] = Some(off + k * 512);
            }
            let mut got = vec![None; 200];
            m.lookup(0, 200, |a, b, c| {
                for k in 0..b {
                    got[crate::to_usize(a + k)] = c.map(|o| o + k * 512);
                }
            });
            assert_eq!(got, arr);
            assert_eq!(
                m.sectors(),
                arr.iter().filter(|x| x.is_some()).count() as u64
            );
        }
    }
}
