//! Golden bytes of the journal format.
//!
//! The fixtures in `testdata/` were written by the hand-coded header codec that the
//! format shipped with (format version 1), from the fixed inputs below. These tests
//! check that (a) the current encoder still produces exactly those bytes and (b) the
//! current decoder reads them back to the same values, so journals written by any
//! earlier build keep reading byte for byte. A failure here is a format change: bump
//! `FORMAT_VERSION` and document it rather than regenerating the fixtures.
//!
//! `MIRRORVM_WRITE_GOLDEN=1 cargo test -p devices golden -- --ignored` rewrites the
//! fixtures; only ever do that for a new format version, with new file names.

// Casts here are on test-controlled constants and small test sizes.
#![allow(clippy::cast_possible_truncation)]

use std::path::PathBuf;
use std::sync::Arc;

use super::format::{
    FileHeader, Geometry, RecordHeader, SlotHeader, SlotState, FILE_HEADER_LEN, FORMAT_VERSION,
    RECORD_HEADER_LEN, SLOT_HEADER_LEN,
};
use super::journal::{read_file_header, read_slot, scan_sealed};
use super::{MemFile, RecoverTo, Store, StoreConfig, SECTOR_SIZE};

/// The journal id of every fixture (the id is random in real journals).
const GOLDEN_ID: u64 = 0x0123_4567_89ab_cdef;

fn testdata(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("src/store/testdata")
        .join(name)
}

/// Compares `bytes` with fixture `name`, or writes the fixture when asked to.
fn check_or_write(name: &str, bytes: &[u8]) {
    let path = testdata(name);
    if std::env::var_os("MIRRORVM_WRITE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().expect("testdata has a parent")).unwrap();
        std::fs::write(&path, bytes).unwrap();
        return;
    }
    let golden = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(bytes.len(), golden.len(), "{name}: length");
    if let Some(i) = (0..bytes.len()).find(|&i| bytes[i] != golden[i]) {
        panic!(
            "{name}: first difference at byte {i}: {:#04x} encoded, {:#04x} golden",
            bytes[i], golden[i]
        );
    }
}

fn golden(name: &str) -> Vec<u8> {
    std::fs::read(testdata(name)).unwrap()
}

fn file_header() -> FileHeader {
    FileHeader {
        version: FORMAT_VERSION,
        slot_count: 3,
        region_capacity: 1 << 20,
        base_len: 1 << 30,
        created_epoch: 7,
        journal_id: GOLDEN_ID,
    }
}

const GEO: Geometry = Geometry {
    slot_count: 3,
    capacity: 1 << 20,
};

/// One slot header per state that carries data, with every field distinct.
fn slot_headers() -> Vec<(&'static str, SlotHeader)> {
    let h =
        |slot, seq, state, record_count, generation, epoch, parent_epoch, used_bytes| SlotHeader {
            slot,
            seq,
            state,
            record_count,
            generation,
            epoch,
            parent_epoch,
            used_bytes,
            base_epoch: 0x0102_0304_0506_0708,
        };
    vec![
        (
            "slot_active.bin",
            h(0, 1, SlotState::Active, 0, 11, 0, 41, 0),
        ),
        (
            "slot_sealed.bin",
            h(1, 0x1_0000_0002, SlotState::Sealed, 3, 12, 43, 42, 3 * 544),
        ),
        (
            "slot_acknowledged.bin",
            h(2, 3, SlotState::Acknowledged, 1, 13, 44, 43, 1056),
        ),
        (
            "slot_retired.bin",
            h(1, 4, SlotState::Retired, 2, 14, 45, 44, 2 * 544),
        ),
        (
            "slot_dropped.bin",
            h(2, 5, SlotState::Dropped, 0, 15, 0, 45, 0),
        ),
    ]
}

fn record() -> (RecordHeader, Vec<u8>) {
    let data: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 3) as u8).collect();
    let mut h = RecordHeader {
        seq: 2,
        generation: 0x00de_adbe_ef00_0012,
        sector: 0x0000_0001_0000_0040,
        len: 1024,
        crc: 0,
    };
    h.crc = h.checksum(&data);
    (h, data)
}

#[test]
fn golden_file_header() {
    check_or_write("file_header.bin", &file_header().encode());
    let b = golden("file_header.bin");
    assert_eq!(b.len(), FILE_HEADER_LEN);
    assert_eq!(FileHeader::decode(&b).unwrap(), file_header());
}

#[test]
fn golden_slot_headers() {
    for (name, h) in slot_headers() {
        check_or_write(name, &h.encode());
        let b: [u8; SLOT_HEADER_LEN] = golden(name).try_into().unwrap();
        assert_eq!(SlotHeader::decode(&b, h.slot, &GEO), Ok(h), "{name}");
    }
}

#[test]
fn golden_record() {
    let (h, data) = record();
    let mut bytes = h.encode().to_vec();
    bytes.extend_from_slice(&data);
    check_or_write("record.bin", &bytes);
    let b = golden("record.bin");
    let hb: [u8; RECORD_HEADER_LEN as usize] = b[..RECORD_HEADER_LEN as usize].try_into().unwrap();
    let decoded = RecordHeader::decode(&hb).unwrap();
    assert_eq!(decoded, h);
    assert_eq!(
        decoded.checksum(&b[RECORD_HEADER_LEN as usize..]),
        decoded.crc
    );
}

const BASE_SECTORS: u64 = 8;

fn fill(tag: u8, sectors: u64) -> Vec<u8> {
    (0..sectors * SECTOR_SIZE)
        .map(|i| tag.wrapping_add(i as u8))
        .collect()
}

/// Runs a fixed scenario on a new 2-slot journal and returns (base, journal) with the
/// journal id replaced by [`GOLDEN_ID`]. At the end slot 1 holds the acknowledged
/// region of epoch 2 (2 records), slot 0 the active region (1 record) after holding
/// the retired region of epoch 1; the base image holds epoch 1.
fn scenario() -> (Vec<u8>, Vec<u8>) {
    let base = Arc::new(MemFile::new(vec![0; (BASE_SECTORS * SECTOR_SIZE) as usize]));
    let journal = Arc::new(MemFile::new(Vec::new()));
    let cfg = StoreConfig {
        slot_count: 2,
        region_capacity: 4096,
        insist_on_capacity: false,
        high_water: None,
        created_epoch: 0,
        preallocate: false,
    };
    let (mut s, _) = Store::open(
        base.clone(),
        journal.clone(),
        &cfg,
        RecoverTo::LastAcknowledged,
    )
    .unwrap();
    let _ = s.write(1, &fill(0xa0, 1)).unwrap();
    s.start_checkpoint(1).unwrap();
    s.acknowledge(1).unwrap();
    s.retire(1).unwrap();
    let _ = s.write(3, &fill(0xb0, 2)).unwrap();
    let _ = s.write(6, &fill(0xb8, 1)).unwrap();
    s.start_checkpoint(2).unwrap();
    let _ = s.write(0, &fill(0xc0, 1)).unwrap();
    s.flush().unwrap();
    s.acknowledge(2).unwrap();
    drop(s);
    let mut j = journal.contents();
    // Fix the random id, then the header CRC (bytes 60..64 over 0..60), by hand: this
    // must not depend on the codec under test.
    j[48..56].copy_from_slice(&GOLDEN_ID.to_le_bytes());
    let crc = crc32c::crc32c(&j[..60]);
    j[60..64].copy_from_slice(&crc.to_le_bytes());
    (base.contents(), j)
}

#[test]
fn golden_journal() {
    let (base, journal) = scenario();
    check_or_write("scenario_base.bin", &base);
    check_or_write("scenario_journal.bin", &journal);

    // The decoder reads the golden journal back.
    let j = MemFile::new(golden("scenario_journal.bin"));
    let h = read_file_header(&j).unwrap().unwrap();
    assert_eq!(h.journal_id, GOLDEN_ID);
    assert_eq!(
        (h.version, h.slot_count, h.region_capacity, h.base_len),
        (1, 2, 4096, BASE_SECTORS * SECTOR_SIZE)
    );
    let geo = h.geometry();
    let s1 = read_slot(&j, &geo, 1).unwrap().chosen.unwrap();
    assert_eq!(
        (s1.state, s1.epoch, s1.parent_epoch, s1.record_count),
        (SlotState::Acknowledged, 2, 1, 2)
    );
    assert_eq!(s1.used_bytes, 2 * RECORD_HEADER_LEN + 3 * SECTOR_SIZE);
    let mut recs = Vec::new();
    scan_sealed(&j, &geo, &s1, BASE_SECTORS, |r| {
        recs.push((r.seq, r.sector, r.len))
    })
    .unwrap();
    assert_eq!(recs, vec![(0, 3, 1024), (1, 6, 512)]);
    let s0 = read_slot(&j, &geo, 0).unwrap().chosen.unwrap();
    assert_eq!(s0.state, SlotState::Active);
    assert_eq!(s0.base_epoch, 1);

    // And a store opened over the golden files recovers epoch 2.
    let (s, report) = Store::open(
        MemFile::new(golden("scenario_base.bin")),
        j,
        &StoreConfig::default(),
        RecoverTo::LastAcknowledged,
    )
    .unwrap();
    assert!(!report.created);
    assert_eq!(report.epoch, 2);
    let mut buf = vec![0u8; (BASE_SECTORS * SECTOR_SIZE) as usize];
    s.read(0, &mut buf).unwrap();
    let mut want = vec![0u8; buf.len()];
    let sec = |n: u64| (n * SECTOR_SIZE) as usize;
    want[sec(1)..sec(2)].copy_from_slice(&fill(0xa0, 1));
    want[sec(3)..sec(5)].copy_from_slice(&fill(0xb0, 2));
    want[sec(6)..sec(7)].copy_from_slice(&fill(0xb8, 1));
    assert_eq!(buf, want);
}

/// Rewrites every fixture from the current code (see the module documentation).
#[test]
#[ignore = "writes the golden fixtures; run only for a new format version"]
fn write_golden() {
    assert!(
        std::env::var_os("MIRRORVM_WRITE_GOLDEN").is_some(),
        "set MIRRORVM_WRITE_GOLDEN=1"
    );
    golden_file_header();
    golden_slot_headers();
    golden_record();
    golden_journal();
}
