//! Offline tools over a journal: inspect, verify, recover (what `mirrorvm disk` calls),
//! and the fuzz entry point for the journal parser.

use std::fmt;
use std::path::Path;

use super::error::{Error, FileRole, IoContext, Result};
use super::format::{FileHeader, SlotHeader, SlotState, FILE_HEADER_LEN, SECTOR_SIZE};
use super::io::{MemFile, StoreFile};
use super::journal::{read_file_header, read_slot, scan_records, scan_sealed, Scan};
use super::sizing::Bytes;
use super::{journal_path, RecoverTo, RecoveryReport, Store, StoreConfig};

/// One slot as found in the journal.
#[derive(Debug)]
pub struct SlotReport {
    /// Slot index.
    pub slot: u32,
    /// The header copy that counts, if any is valid.
    pub header: Option<SlotHeader>,
    /// Each copy in words ("seq 4, sealed" or why it is rejected).
    pub copies: [String; 2],
    /// Valid records found (for a sealed region: all of them, if it verifies).
    pub records: u32,
    /// Bytes those records occupy.
    pub bytes: u64,
    /// For a sealed or acknowledged region: its first bad record, if any. Recovery to
    /// an epoch that needs this region refuses.
    pub bad: Option<Error>,
    /// For an active region: why the scan stopped (a torn tail is normal after a
    /// crash; the active region is never recovered).
    pub tail: Option<String>,
}

/// What a journal holds, slot by slot.
#[derive(Debug)]
pub struct Inspection {
    /// The journal's file header.
    pub header: FileHeader,
    /// The epoch the base image holds (per the journal).
    pub base_epoch: u64,
    /// The newest acknowledged epoch (or the base's).
    pub last_acknowledged: u64,
    /// The slots.
    pub slots: Vec<SlotReport>,
    /// The journal file's length in bytes.
    pub journal_len: u64,
    /// Bytes of the journal file the file system has allocated (blocks), when known:
    /// less than its length when it was created sparse.
    pub journal_allocated: Option<u64>,
}

impl fmt::Display for Inspection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = &self.header;
        writeln!(
            f,
            "journal format v{}, created at epoch {}",
            h.version, h.created_epoch
        )?;
        writeln!(
            f,
            "disk {} ({} bytes); region size {} ({} bytes); {} region slots",
            Bytes(h.base_len),
            h.base_len,
            Bytes(h.region_capacity),
            h.region_capacity,
            h.slot_count
        )?;
        // Lossy only past 2^53 bytes, for a ratio shown to two places.
        #[allow(clippy::cast_precision_loss)]
        let ratio = self.journal_len as f64 / h.base_len.max(1) as f64;
        write!(
            f,
            "journal {} ({} bytes, {ratio:.2} × the disk)",
            Bytes(self.journal_len),
            self.journal_len
        )?;
        match self.journal_allocated {
            Some(a) => writeln!(f, ", {} allocated", Bytes(a))?,
            None => writeln!(f)?,
        }
        writeln!(
            f,
            "base image at epoch {}, last acknowledged epoch {}",
            self.base_epoch, self.last_acknowledged
        )?;
        for s in &self.slots {
            match &s.header {
                None => write!(f, "slot {}: empty", s.slot)?,
                Some(hd) => write!(
                    f,
                    "slot {}: {} epoch {} (after {}), generation {}, {} records, {} bytes",
                    s.slot, hd.state, hd.epoch, hd.parent_epoch, hd.generation, s.records, s.bytes
                )?,
            }
            if let Some(e) = &s.bad {
                write!(f, "; BAD: {e}")?;
            }
            if let Some(t) = &s.tail {
                write!(f, "; tail: {t}")?;
            }
            writeln!(f, " [copies: {}; {}]", s.copies[0], s.copies[1])?;
        }
        Ok(())
    }
}

fn describe(c: &std::result::Result<SlotHeader, super::format::CopyProblem>) -> String {
    match c {
        Ok(h) => format!("seq {} {}", h.seq, h.state),
        Err(super::format::CopyProblem::Blank) => "blank".into(),
        Err(super::format::CopyProblem::Invalid(why)) => format!("invalid ({why})"),
    }
}

/// Inspects a journal given as a [`StoreFile`]; `base_len`, if known, is checked
/// against the header.
pub fn inspect_files<F: StoreFile + ?Sized>(
    journal: &F,
    base_len: Option<u64>,
) -> Result<Inspection> {
    let header = read_file_header(journal)?.ok_or_else(|| Error::NoJournal("this file".into()))?;
    if let Some(len) = base_len {
        if len != header.base_len {
            return Err(Error::BaseSizeMismatch {
                expected: header.base_len,
                actual: len,
            });
        }
    }
    let geo = header.geometry();
    let disk_sectors = header.base_len / SECTOR_SIZE;
    let mut base_epoch = header.created_epoch;
    let mut reads = Vec::new();
    for slot in 0..geo.slot_count {
        let r = read_slot(journal, &geo, slot)?;
        for c in r.copies.iter().flatten() {
            base_epoch = base_epoch.max(c.base_epoch);
            if c.state == SlotState::Retired {
                base_epoch = base_epoch.max(c.epoch);
            }
        }
        reads.push(r);
    }
    let mut slots = Vec::new();
    let mut last_acknowledged = base_epoch;
    for (slot, r) in (0u32..).zip(reads) {
        let mut rep = SlotReport {
            slot,
            header: r.chosen,
            copies: [describe(&r.copies[0]), describe(&r.copies[1])],
            records: 0,
            bytes: 0,
            bad: None,
            tail: None,
        };
        if let Some(h) = r.chosen {
            if h.state == SlotState::Acknowledged && h.epoch > base_epoch {
                last_acknowledged = last_acknowledged.max(h.epoch);
            }
            match h.state {
                SlotState::Sealed | SlotState::Acknowledged | SlotState::Retired => {
                    let mut n = 0;
                    match scan_sealed(journal, &geo, &h, disk_sectors, |_| n += 1) {
                        Ok(()) => {
                            rep.records = h.record_count;
                            rep.bytes = h.used_bytes;
                        }
                        Err(e @ Error::BadRecord { .. }) => {
                            rep.records = n;
                            // A retired region's data is in the base already.
                            if h.state == SlotState::Retired {
                                rep.tail = Some(format!("retired region no longer verifies: {e}"));
                            } else {
                                rep.bad = Some(e);
                            }
                        }
                        Err(e) => return Err(e),
                    }
                }
                SlotState::Active => {
                    let end = scan_records(
                        journal,
                        &geo,
                        Scan {
                            slot: h.slot,
                            generation: h.generation,
                            max_records: None,
                            limit: geo.capacity,
                            disk_sectors,
                        },
                        |_| {},
                    )?;
                    rep.records = end.records;
                    rep.bytes = end.bytes;
                    rep.tail = end
                        .bad
                        .map(|(seq, off, why)| format!("record {seq} at {off}: {why}"));
                }
                SlotState::Empty | SlotState::Dropped => {}
            }
        }
        slots.push(rep);
    }
    Ok(Inspection {
        header,
        base_epoch,
        last_acknowledged,
        slots,
        journal_len: journal.len().ctx(FileRole::Journal, "reading the length")?,
        journal_allocated: None,
    })
}

/// Verifies every checksum of a journal given as a [`StoreFile`]: the file header,
/// the slot headers, and every record of every sealed or acknowledged region. Returns
/// the inspection, or the first bad record.
pub fn verify_files<F: StoreFile + ?Sized>(
    journal: &F,
    base_len: Option<u64>,
) -> Result<Inspection> {
    let mut ins = inspect_files(journal, base_len)?;
    for s in &mut ins.slots {
        if let Some(e) = s.bad.take() {
            return Err(e);
        }
    }
    // Put nothing back: a verified inspection has no bad regions.
    Ok(ins)
}

/// Opens the journal read-only under a shared lock (held while the returned file is
/// open): a journal that a running mirrorvm writes (it holds the exclusive lock) is
/// refused with [`Error::Locked`] instead of being read half-written.
fn open_journal_ro(image: &Path) -> Result<(std::fs::File, Option<u64>)> {
    let jp = journal_path(image);
    if !jp.exists() {
        return Err(Error::NoJournal(jp.display().to_string()));
    }
    let j = std::fs::File::open(&jp).ctx(FileRole::Journal, "opening")?;
    crate::lock::lock_file(&j, &jp, "region journal", crate::lock::LockKind::Shared)?;
    let base_len = std::fs::metadata(image).ok().map(|m| m.len());
    Ok((j, base_len))
}

/// `mirrorvm disk inspect`: what the journal of the image at `image` holds.
pub fn inspect(image: &Path) -> Result<Inspection> {
    let (j, base_len) = open_journal_ro(image)?;
    let mut ins = inspect_files(&j, base_len)?;
    ins.journal_allocated = j
        .metadata()
        .ok()
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m).saturating_mul(512));
    Ok(ins)
}

/// `mirrorvm disk verify`: checks every checksum; `Err` carries the first bad record.
pub fn verify(image: &Path) -> Result<Inspection> {
    let (j, base_len) = open_journal_ro(image)?;
    verify_files(&j, base_len)
}

/// `mirrorvm disk recover`: applies the recovery rules offline, to `epoch` or (with
/// `None`) the last acknowledged one, so the base image alone holds that epoch. Like
/// any store opening, it locks the image and the journal exclusively, so it refuses
/// while a mirrorvm runs on them.
pub fn recover(image: &Path, epoch: Option<u64>) -> Result<RecoveryReport> {
    let jp = journal_path(image);
    if !jp.exists() {
        return Err(Error::NoJournal(jp.display().to_string()));
    }
    let (_store, report) =
        Store::open_path(image, &StoreConfig::default(), RecoverTo::from(epoch))?;
    Ok(report)
}

/// Largest base image the fuzz entry point will allocate.
const FUZZ_MAX_BASE: u64 = 1 << 20;

/// The fuzz target's body: treats `data` as a journal and runs the parser, the
/// verifier and recovery over it, in memory. It must never panic, hang or allocate
/// beyond bounds, whatever the input. The first byte selects options: bit 0 repairs
/// the file header's CRC (so mutations get past it), bits 1-2 choose the recovery
/// target (last acknowledged, or epochs 1, 2, 3).
pub fn fuzz_journal(data: &[u8]) {
    let Some((&flags, body)) = data.split_first() else {
        return;
    };
    let mut j = body.to_vec();
    if flags & 1 != 0 && j.len() >= FILE_HEADER_LEN {
        let crc = crc32c::crc32c(&j[..60]);
        j[60..64].copy_from_slice(&crc.to_le_bytes());
    }
    let base_len = super::format::raw_base_len(&j).unwrap_or(4096);
    if base_len > FUZZ_MAX_BASE || base_len % SECTOR_SIZE != 0 {
        // Still run the parser: it must reject the header cleanly.
        let _ = inspect_files(&MemFile::new(j), None);
        return;
    }
    let journal = MemFile::new(j);
    let _ = inspect_files(&journal, Some(base_len)).map(|i| i.to_string());
    let _ = verify_files(&journal, Some(base_len));
    let to = match (flags >> 1) & 3 {
        0 => RecoverTo::LastAcknowledged,
        n => RecoverTo::Epoch(u64::from(n)),
    };
    let base = MemFile::new(vec![0u8; crate::to_usize(base_len)]);
    let cfg = StoreConfig {
        slot_count: 2,
        region_capacity: 4096,
        insist_on_capacity: false,
        high_water: None,
        created_epoch: 0,
        preallocate: false,
    };
    if let Ok((mut store, _)) = Store::open(base, journal, &cfg, to) {
        if store.len() >= SECTOR_SIZE {
            let mut buf = [0u8; 512];
            let _ = store.read(0, &mut buf);
            let _ = store.write(0, &buf);
            let mut buf2 = [0u8; 512];
            let _ = store.read(0, &mut buf2);
            assert_eq!(buf, buf2, "a write must read back");
        }
    }
}
