//! Reading a journal: its file header, the slot headers (choosing between the two
//! copies) and the records of a region, with every check the format asks for. This is
//! the parser the fuzz target exercises; it never trusts a length before bounding it.

use super::error::{Error, FileRole, IoContext, RecordProblem, Result};
use super::format::{
    CopyProblem, FileHeader, Geometry, RecordHeader, SlotHeader, FILE_HEADER_AREA, FILE_HEADER_LEN,
    RECORD_HEADER_LEN, SECTOR_SIZE, SLOT_HEADER_LEN,
};
use super::io::StoreFile;

/// Reads and validates the journal's file header and checks the file is long enough.
/// `Ok(None)` means the journal is blank (empty, or its header area all zero): it was
/// never created, or its creation was torn before anything could be sealed in it.
pub(crate) fn read_file_header<F: StoreFile + ?Sized>(j: &F) -> Result<Option<FileHeader>> {
    let len = j.len().ctx(FileRole::Journal, "reading the length")?;
    if len == 0 {
        return Ok(None);
    }
    let mut b = [0u8; FILE_HEADER_LEN];
    if len < FILE_HEADER_LEN as u64 {
        let mut short = vec![0u8; crate::to_usize(len)];
        j.read_at(&mut short, 0)
            .ctx(FileRole::Journal, "reading the file header")?;
        if short.iter().all(|&x| x == 0) {
            return Ok(None);
        }
        return Err(Error::JournalTruncated {
            len,
            expected: FILE_HEADER_AREA,
        });
    }
    j.read_at(&mut b, 0)
        .ctx(FileRole::Journal, "reading the file header")?;
    if b.iter().all(|&x| x == 0) {
        return Ok(None);
    }
    let h = match FileHeader::decode(&b) {
        Ok(h) => h,
        Err(e @ Error::UnsupportedVersion { .. }) => return Err(e),
        Err(e) => {
            // A creation torn before its header was complete leaves a header that
            // does not decode and nothing else: no slot was ever written, so the
            // journal holds nothing and may be created again. Anything else in the
            // file means real damage: refuse.
            return if rest_is_blank(j, len)? {
                Ok(None)
            } else {
                Err(e)
            };
        }
    };
    let expected = h.geometry().journal_len();
    if len < expected {
        return Err(Error::JournalTruncated { len, expected });
    }
    Ok(Some(h))
}

fn rest_is_blank<F: StoreFile + ?Sized>(j: &F, len: u64) -> Result<bool> {
    let mut pos = FILE_HEADER_AREA.min(len);
    let mut buf = vec![0u8; 1 << 16];
    while pos < len {
        let n = crate::to_usize((len - pos).min(buf.len() as u64));
        j.read_at(&mut buf[..n], pos)
            .ctx(FileRole::Journal, "reading")?;
        if buf[..n].iter().any(|&x| x != 0) {
            return Ok(false);
        }
        pos += n as u64;
    }
    Ok(true)
}

/// Both header copies of a slot and the one that counts.
#[derive(Debug, Clone)]
pub(crate) struct SlotRead {
    /// The valid copy with the highest sequence number, if any.
    pub chosen: Option<SlotHeader>,
    /// Which copy was chosen (0 or 1); 1 if none was, so the next write goes to copy 0.
    pub chosen_copy: u8,
    /// Each copy, decoded or rejected.
    pub copies: [std::result::Result<SlotHeader, CopyProblem>; 2],
}

/// Reads both header copies of `slot`.
pub(crate) fn read_slot<F: StoreFile + ?Sized>(
    j: &F,
    geo: &Geometry,
    slot: u32,
) -> Result<SlotRead> {
    let mut copies = [Err(CopyProblem::Blank), Err(CopyProblem::Blank)];
    for (c, copy) in (0u8..).zip(copies.iter_mut()) {
        let mut b = [0u8; SLOT_HEADER_LEN];
        j.read_at(&mut b, geo.copy_offset(slot, c))
            .ctx(FileRole::Journal, "reading a slot header")?;
        *copy = SlotHeader::decode(&b, slot, geo);
    }
    let (chosen, chosen_copy) = match (&copies[0], &copies[1]) {
        (Ok(a), Ok(b)) if b.seq > a.seq => (Some(*b), 1),
        (Ok(a), _) => (Some(*a), 0),
        (_, Ok(b)) => (Some(*b), 1),
        _ => (None, 1),
    };
    Ok(SlotRead {
        chosen,
        chosen_copy,
        copies,
    })
}

/// Where one record's data is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RecordLoc {
    pub seq: u32,
    pub sector: u64,
    pub len: u32,
    /// Journal offset of the data (just past the record header).
    pub data_offset: u64,
}

/// How a scan of a region's records ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ScanEnd {
    /// Valid records found.
    pub records: u32,
    /// Bytes of the region they occupy.
    pub bytes: u64,
    /// The first record that is not valid: (seq, journal offset, reason). `None` if
    /// the scan stopped because it reached its limit.
    pub bad: Option<(u32, u64, RecordProblem)>,
}

/// What to scan: the records of `slot` written by region `generation`, at most
/// `max_records` of them within `limit` bytes, naming sectors below `disk_sectors`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Scan {
    pub slot: u32,
    pub generation: u64,
    pub max_records: Option<u32>,
    pub limit: u64,
    pub disk_sectors: u64,
}

/// Scans the records of `slot` written by region `generation`, from the start of the
/// slot, stopping at `max_records` records, at `limit` bytes, or at the first record
/// that is not valid. `disk_sectors` bounds the sectors a record may name.
pub(crate) fn scan_records<F: StoreFile + ?Sized>(
    j: &F,
    geo: &Geometry,
    region: Scan,
    mut on_record: impl FnMut(RecordLoc),
) -> Result<ScanEnd> {
    let Scan {
        slot,
        generation,
        max_records,
        limit,
        disk_sectors,
    } = region;
    let limit = limit.min(geo.capacity);
    let base = geo.records_offset(slot);
    let mut pos = 0u64;
    let mut seq = 0u32;
    let mut chunk: Vec<u8> = Vec::new();
    loop {
        if max_records.is_some_and(|m| seq >= m) {
            break;
        }
        let at = base + pos;
        let bad = |reason: RecordProblem| {
            Ok(ScanEnd {
                records: seq,
                bytes: pos,
                bad: Some((seq, at, reason)),
            })
        };
        if pos + RECORD_HEADER_LEN > limit {
            if max_records.is_some() {
                return bad(RecordProblem::RegionEnds { limit });
            }
            break;
        }
        let mut hb = [0u8; crate::to_usize(RECORD_HEADER_LEN)];
        j.read_at(&mut hb, at)
            .ctx(FileRole::Journal, "reading a record header")?;
        let Some(h) = RecordHeader::decode(&hb) else {
            return bad(RecordProblem::NoMagic);
        };
        if h.generation != generation {
            return bad(RecordProblem::StaleGeneration {
                found: h.generation,
                expected: generation,
            });
        }
        if h.seq != seq {
            return bad(RecordProblem::OutOfSequence {
                found: h.seq,
                expected: seq,
            });
        }
        let len = u64::from(h.len);
        if len == 0 || len % SECTOR_SIZE != 0 {
            return bad(RecordProblem::BadLength { len });
        }
        if pos + RECORD_HEADER_LEN + len > limit {
            return bad(RecordProblem::PastRegionEnd { len, limit });
        }
        let sectors = len / SECTOR_SIZE;
        if h.sector
            .checked_add(sectors)
            .is_none_or(|end| end > disk_sectors)
        {
            return bad(RecordProblem::BeyondDisk {
                sector: h.sector,
                sectors,
                disk_sectors,
            });
        }
        // `len` is bounded by the region capacity; read it in bounded chunks anyway.
        let mut crc = h.checksum_start();
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(1 << 16) as usize;
            chunk.resize(n, 0);
            j.read_at(&mut chunk, at + RECORD_HEADER_LEN + done)
                .ctx(FileRole::Journal, "reading record data")?;
            crc = crc32c::crc32c_append(crc, &chunk);
            done += n as u64;
        }
        if crc != h.crc {
            return bad(RecordProblem::Checksum {
                stored: h.crc,
                computed: crc,
            });
        }
        on_record(RecordLoc {
            seq,
            sector: h.sector,
            len: h.len,
            data_offset: at + RECORD_HEADER_LEN,
        });
        pos += RECORD_HEADER_LEN + len;
        seq += 1;
    }
    Ok(ScanEnd {
        records: seq,
        bytes: pos,
        bad: None,
    })
}

/// Scans a sealed region completely: exactly `record_count` valid records filling
/// exactly `used_bytes`. Anything else is the region's first bad record.
pub(crate) fn scan_sealed<F: StoreFile + ?Sized>(
    j: &F,
    geo: &Geometry,
    h: &SlotHeader,
    disk_sectors: u64,
    on_record: impl FnMut(RecordLoc),
) -> Result<()> {
    let end = scan_records(
        j,
        geo,
        Scan {
            slot: h.slot,
            generation: h.generation,
            max_records: Some(h.record_count),
            limit: h.used_bytes,
            disk_sectors,
        },
        on_record,
    )?;
    let bad = |seq: u32, offset: u64, reason: RecordProblem| Error::BadRecord {
        slot: h.slot,
        epoch: h.epoch,
        seq,
        offset,
        reason,
    };
    if let Some((seq, offset, reason)) = end.bad {
        return Err(bad(seq, offset, reason));
    }
    if end.bytes != h.used_bytes {
        return Err(bad(
            end.records,
            geo.records_offset(h.slot) + end.bytes,
            RecordProblem::LengthMismatch {
                end: end.bytes,
                used_bytes: h.used_bytes,
            },
        ));
    }
    Ok(())
}
