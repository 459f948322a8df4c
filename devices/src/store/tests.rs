//! Unit tests per rule, the torn-write test, the corruption test and the fuzz seeds.
//! The model-based property test is in `model_test.rs`.

// Casts here are on test-controlled constants and small test sizes.
#![allow(clippy::cast_possible_truncation)]

use super::fault::{apply, CrashMode, FaultFile, FaultWorld, LogOp};
use super::format::{Geometry, SlotState, FILE_HEADER_AREA, SLOT_HEADER_AREA};
use super::*;

pub(super) const SECTORS: u64 = 64;

pub(super) fn cfg(slots: u32, capacity: u64) -> StoreConfig {
    StoreConfig {
        slot_count: slots,
        region_capacity: capacity,
        insist_on_capacity: false,
        high_water: None,
        created_epoch: 0,
        preallocate: false,
    }
}

/// A pattern unique to (`tag`, sector) for `n` sectors from `sector`.
pub(super) fn pattern(tag: u64, sector: u64, n: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity((n * SECTOR_SIZE) as usize);
    for s in sector..sector + n {
        let mut blk = [0u8; 512];
        blk[0..8].copy_from_slice(&tag.to_le_bytes());
        blk[8..16].copy_from_slice(&s.to_le_bytes());
        for (i, b) in blk.iter_mut().enumerate().skip(16) {
            *b = (tag as u8).wrapping_mul(31).wrapping_add(i as u8);
        }
        v.extend_from_slice(&blk);
    }
    v
}

struct Rig {
    world: FaultWorld,
    base: FaultFile,
    journal: FaultFile,
    config: StoreConfig,
}

impl Rig {
    fn new(config: StoreConfig) -> (Rig, Store<FaultFile>) {
        let world = FaultWorld::new();
        let base = world.file(vec![0u8; (SECTORS * SECTOR_SIZE) as usize]);
        let journal = world.file(Vec::new());
        let rig = Rig {
            world,
            base,
            journal,
            config,
        };
        let (s, rep) = rig.open(RecoverTo::LastAcknowledged).unwrap();
        assert!(rep.created);
        (rig, s)
    }

    fn open(&self, to: RecoverTo) -> Result<(Store<FaultFile>, RecoveryReport)> {
        Store::open(self.base.clone(), self.journal.clone(), &self.config, to)
    }

    fn crash(&self) {
        let mut x = 7u64;
        self.world.crash(CrashMode::TearLast, &mut || {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            x >> 33
        });
    }

    fn base_bytes(&self) -> Vec<u8> {
        self.world.durable(self.base.id())
    }
}

fn read_all<F: StoreFile>(s: &Store<F>) -> Vec<u8> {
    let mut v = vec![0u8; (SECTORS * SECTOR_SIZE) as usize];
    s.read(0, &mut v).unwrap();
    v
}

fn written(o: WriteOutcome) {
    assert!(matches!(o, WriteOutcome::Written { .. }), "{o:?}");
}

#[test]
fn write_never_touches_the_base_until_retire() {
    let (rig, mut s) = Rig::new(cfg(2, 64 << 10));
    let before = rig.base_bytes();
    written(s.write(3, &pattern(1, 3, 4)).unwrap());
    s.flush().unwrap();
    s.start_checkpoint(1).unwrap();
    s.acknowledge(1).unwrap();
    assert_eq!(rig.base_bytes(), before);
    s.retire(1).unwrap();
    let after = rig.base_bytes();
    assert_eq!(&after[3 * 512..7 * 512], &pattern(1, 3, 4)[..]);
}

#[test]
fn reads_merge_active_frozen_and_base_per_sector() {
    let (_rig, mut s) = Rig::new(cfg(3, 64 << 10));
    written(s.write(0, &pattern(1, 0, 8)).unwrap());
    s.start_checkpoint(1).unwrap();
    written(s.write(2, &pattern(2, 2, 2)).unwrap());
    s.start_checkpoint(2).unwrap();
    written(s.write(3, &pattern(3, 3, 1)).unwrap());
    // Overlapping writes in one region: newest wins.
    written(s.write(6, &pattern(4, 6, 4)).unwrap());
    written(s.write(7, &pattern(5, 7, 1)).unwrap());
    let mut buf = vec![0u8; 12 * 512];
    s.read(0, &mut buf).unwrap();
    let sec = |i: usize| &buf[i * 512..(i + 1) * 512];
    assert_eq!(sec(0), &pattern(1, 0, 1)[..]);
    assert_eq!(sec(1), &pattern(1, 1, 1)[..]);
    assert_eq!(sec(2), &pattern(2, 2, 1)[..]);
    assert_eq!(sec(3), &pattern(3, 3, 1)[..]);
    assert_eq!(sec(4), &pattern(1, 4, 1)[..]);
    assert_eq!(sec(6), &pattern(4, 6, 1)[..]);
    assert_eq!(sec(7), &pattern(5, 7, 1)[..]);
    assert_eq!(sec(9), &pattern(4, 9, 1)[..]);
    assert_eq!(sec(10), &[0u8; 512][..]);
}

#[test]
fn flush_makes_active_records_durable() {
    let (rig, mut s) = Rig::new(cfg(2, 64 << 10));
    written(s.write(0, &pattern(1, 0, 2)).unwrap());
    written(s.write(5, &pattern(2, 5, 1)).unwrap());
    s.flush().unwrap();
    rig.crash();
    let ins = inspect_files(&rig.journal, None).unwrap();
    let active = ins
        .slots
        .iter()
        .find(|x| x.header.is_some_and(|h| h.state == SlotState::Active))
        .unwrap();
    assert_eq!(active.records, 2);
    // ...and the active region is still never recovered.
    let (s, rep) = rig.open(RecoverTo::LastAcknowledged).unwrap();
    assert_eq!(rep.discarded_active, 1);
    assert_eq!(read_all(&s), vec![0u8; (SECTORS * 512) as usize]);
}

#[test]
fn start_checkpoint_without_a_free_slot_errs_or_waits() {
    let (_rig, mut s) = Rig::new(cfg(2, 64 << 10));
    s.start_checkpoint(1).unwrap();
    assert!(matches!(
        s.start_checkpoint(2),
        Err(Error::NoFreeRegion {
            epoch: 2,
            frozen: 1
        })
    ));
    assert!(matches!(
        s.start_checkpoint(1),
        Err(Error::EpochNotIncreasing { .. })
    ));
    let shared = SharedStore::new(s);
    assert!(matches!(
        shared.start_checkpoint_wait(2, Duration::from_millis(20)),
        Err(Error::WaitTimedOut { epoch: 2 })
    ));
    let other = Arc::clone(&shared);
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(30));
        other.lock().acknowledge(1).unwrap();
        other.retire(1).unwrap();
    });
    shared
        .start_checkpoint_wait(2, Duration::from_secs(10))
        .unwrap();
    t.join().unwrap();
    assert_eq!(shared.lock().status().base_epoch, 1);
}

#[test]
fn export_yields_final_extents_and_metadata() {
    let (_rig, mut s) = Rig::new(cfg(2, 64 << 10));
    written(s.write(0, &pattern(1, 0, 4)).unwrap());
    written(s.write(2, &pattern(2, 2, 4)).unwrap());
    written(s.write(20, &pattern(3, 20, 1)).unwrap());
    s.start_checkpoint(1).unwrap();
    let meta = s.export_meta(1).unwrap();
    assert_eq!((meta.epoch, meta.parent_epoch, meta.records), (1, 0, 3));
    assert_eq!(meta.sectors, 7);
    let ex = s.export(1).unwrap();
    let mut img = vec![0u8; (SECTORS * 512) as usize];
    for e in &ex.extents {
        apply(&mut img, e.sector * 512, &e.data);
    }
    let mut expect = vec![0u8; (SECTORS * 512) as usize];
    apply(&mut expect, 0, &pattern(1, 0, 4));
    apply(&mut expect, 2 * 512, &pattern(2, 2, 4));
    apply(&mut expect, 20 * 512, &pattern(3, 20, 1));
    assert_eq!(img, expect);
    assert!(matches!(s.export(9), Err(Error::NoSuchRegion(9))));
}

#[test]
fn acknowledge_is_durable_and_chosen_by_default() {
    let (rig, mut s) = Rig::new(cfg(3, 64 << 10));
    written(s.write(1, &pattern(1, 1, 1)).unwrap());
    s.start_checkpoint(1).unwrap();
    written(s.write(1, &pattern(2, 1, 1)).unwrap());
    s.start_checkpoint(2).unwrap();
    s.acknowledge(1).unwrap();
    s.export_meta(2).unwrap();
    rig.crash();
    let (s, rep) = rig.open(RecoverTo::LastAcknowledged).unwrap();
    assert_eq!(rep.epoch, 1);
    assert_eq!(rep.redone, vec![1]);
    assert_eq!(rep.dropped, vec![2]);
    let mut b = vec![0u8; 512];
    s.read(1, &mut b).unwrap();
    assert_eq!(b, pattern(1, 1, 1));
}

#[test]
fn retire_requires_ack_and_order() {
    let (_rig, mut s) = Rig::new(cfg(3, 64 << 10));
    s.start_checkpoint(1).unwrap();
    s.start_checkpoint(2).unwrap();
    assert!(matches!(s.retire(1), Err(Error::NotAcknowledged(1))));
    s.acknowledge(2).unwrap();
    assert!(matches!(
        s.retire(2),
        Err(Error::RetireOutOfOrder {
            epoch: 2,
            oldest: 1
        })
    ));
    s.acknowledge(1).unwrap();
    s.retire(1).unwrap();
    s.retire(2).unwrap();
    assert_eq!(s.status().base_epoch, 2);
    assert_eq!(s.status().free_slots, 2);
}

#[test]
fn a_retire_torn_in_the_base_is_redone() {
    for ops in 0..12 {
        let (rig, mut s) = Rig::new(cfg(2, 64 << 10));
        written(s.write(0, &pattern(1, 0, 8)).unwrap());
        written(s.write(30, &pattern(2, 30, 8)).unwrap());
        s.start_checkpoint(1).unwrap();
        s.acknowledge(1).unwrap();
        rig.world.arm(ops);
        let r = s.retire(1);
        rig.crash();
        let (s, rep) = rig.open(RecoverTo::Epoch(1)).unwrap();
        assert_eq!(rep.epoch, 1);
        let img = read_all(&s);
        assert_eq!(&img[..8 * 512], &pattern(1, 0, 8)[..], "ops {ops} {r:?}");
        assert_eq!(&img[30 * 512..38 * 512], &pattern(2, 30, 8)[..]);
        assert_eq!(rig.base_bytes(), img);
    }
}

#[test]
fn rollback_drops_only_the_active_region() {
    let (_rig, mut s) = Rig::new(cfg(2, 64 << 10));
    written(s.write(0, &pattern(1, 0, 1)).unwrap());
    s.start_checkpoint(1).unwrap();
    written(s.write(0, &pattern(2, 0, 1)).unwrap());
    written(s.write(1, &pattern(2, 1, 1)).unwrap());
    s.rollback().unwrap();
    let img = read_all(&s);
    assert_eq!(&img[..512], &pattern(1, 0, 1)[..]);
    assert_eq!(&img[512..1024], &[0u8; 512][..]);
    written(s.write(1, &pattern(3, 1, 1)).unwrap());
    let img = read_all(&s);
    assert_eq!(&img[512..1024], &pattern(3, 1, 1)[..]);
}

#[test]
fn recover_to_named_epoch_drops_later_and_refuses_missing() {
    let (rig, mut s) = Rig::new(cfg(4, 64 << 10));
    for e in 1..=3u64 {
        written(s.write(e, &pattern(e, e, 1)).unwrap());
        s.start_checkpoint(e).unwrap();
    }
    s.acknowledge(1).unwrap();
    s.retire(1).unwrap();
    s.flush().unwrap(); // seals 2 and 3
    written(s.write(9, &pattern(9, 9, 1)).unwrap());
    s.start_checkpoint(4).unwrap(); // cut, never sealed
    rig.crash();
    assert!(matches!(
        rig.open(RecoverTo::Epoch(4)),
        Err(Error::RegionMissing {
            requested: 4,
            missing: 4,
            base: 1
        })
    ));
    assert!(matches!(
        rig.open(RecoverTo::Epoch(0)),
        Err(Error::EpochRetired {
            requested: 0,
            base: 1
        })
    ));
    let (s, rep) = rig.open(RecoverTo::Epoch(2)).unwrap();
    assert_eq!((rep.epoch, rep.base_epoch_before), (2, 1));
    assert_eq!(rep.redone, vec![2]);
    assert_eq!(rep.dropped, vec![3]);
    let img = read_all(&s);
    assert_eq!(&img[2 * 512..3 * 512], &pattern(2, 2, 1)[..]);
    assert_eq!(&img[3 * 512..4 * 512], &[0u8; 512][..]);
    drop(s);
    // Region 3 was dropped for good: it can never come back.
    assert!(matches!(
        rig.open(RecoverTo::Epoch(3)),
        Err(Error::RegionMissing { missing: 3, .. })
    ));
    // Recovering again to the same epoch is idempotent.
    let (s, rep) = rig.open(RecoverTo::Epoch(2)).unwrap();
    assert!(rep.redone.is_empty());
    assert_eq!(read_all(&s), img);
}

#[test]
fn stale_records_of_an_older_generation_are_never_replayed() {
    // Fill slot 0 with many records, retire, reuse slot 0 with fewer: the old
    // records lie beyond the new ones, with the old generation.
    let (rig, mut s) = Rig::new(cfg(2, 16 << 10));
    for i in 0..6 {
        written(s.write(i * 2, &pattern(10 + i, i * 2, 2)).unwrap());
    }
    s.start_checkpoint(1).unwrap();
    s.acknowledge(1).unwrap();
    s.retire(1).unwrap();
    s.start_checkpoint(2).unwrap();
    // Slot 0 is active again.
    assert_eq!(s.status().active_slot, 0);
    assert!(s.status().active_slot_reused);
    written(s.write(40, &pattern(99, 40, 2)).unwrap());
    s.flush().unwrap();
    let ins = inspect_files(&rig.journal, None).unwrap();
    let active = &ins.slots[0];
    assert_eq!(active.records, 1);
    assert!(active.tail.as_deref().unwrap().contains("generation"));
    s.acknowledge(2).unwrap();
    s.retire(2).unwrap();
    s.start_checkpoint(3).unwrap();
    s.acknowledge(3).unwrap();
    rig.crash();
    let (s, rep) = rig.open(RecoverTo::LastAcknowledged).unwrap();
    assert_eq!(rep.epoch, 3);
    let img = read_all(&s);
    assert_eq!(&img[40 * 512..42 * 512], &pattern(99, 40, 2)[..]);
    for i in 0..6 {
        assert_eq!(
            &img[(i * 2 * 512) as usize..((i * 2 + 2) * 512) as usize],
            &pattern(10 + i, i * 2, 2)[..]
        );
    }
}

#[test]
fn a_newer_format_version_is_refused() {
    let (rig, s) = Rig::new(cfg(2, 16 << 10));
    drop(s);
    let mut j = rig.world.durable(rig.journal.id());
    j[8..12].copy_from_slice(&2u32.to_le_bytes());
    let journal = MemFile::new(j);
    let base = MemFile::new(rig.base_bytes());
    let err = Store::open(base, journal, &rig.config, RecoverTo::LastAcknowledged).unwrap_err();
    assert!(matches!(
        err,
        Error::UnsupportedVersion {
            found: 2,
            supported: 1
        }
    ));
    assert!(err.to_string().contains("newer"), "{err}");
}

#[test]
fn lengths_on_disk_are_bounded_before_use() {
    // A header claiming a 64 GiB region on a tiny file is refused, not allocated.
    let h = format::FileHeader {
        version: 1,
        slot_count: 64,
        region_capacity: format::MAX_CAPACITY,
        base_len: 4096,
        created_epoch: 0,
        journal_id: 0,
    };
    let j = MemFile::new(h.encode().to_vec());
    assert!(matches!(
        inspect_files(&j, None),
        Err(Error::JournalTruncated { .. })
    ));
    // A record claiming 4 GiB inside a small region is a bad record, not a read.
    let (rig, mut s) = Rig::new(cfg(2, 16 << 10));
    written(s.write(0, &pattern(1, 0, 1)).unwrap());
    s.start_checkpoint(1).unwrap();
    s.flush().unwrap();
    drop(s);
    let mut bytes = rig.world.durable(rig.journal.id());
    let rec = (FILE_HEADER_AREA + SLOT_HEADER_AREA) as usize;
    bytes[rec + 24..rec + 28].copy_from_slice(&u32::MAX.to_le_bytes());
    let err = verify_files(&MemFile::new(bytes), None).unwrap_err();
    assert!(matches!(err, Error::BadRecord { .. }), "{err}");
}

#[test]
fn capacity_defers_signals_and_keeps_the_journal_bounded() {
    let cap = 16u64 << 10;
    let mut c = cfg(2, cap);
    c.high_water = Some(8 << 10);
    let (rig, mut s) = {
        let world = FaultWorld::new();
        let base = world.file(vec![0u8; (SECTORS * 512) as usize]);
        let journal = world.file(Vec::new());
        let rig = Rig {
            world,
            base,
            journal,
            config: c,
        };
        let s = rig.open(RecoverTo::LastAcknowledged).unwrap().0;
        (rig, s)
    };
    let jlen = rig.journal.len().unwrap();
    assert_eq!(
        jlen,
        Geometry {
            slot_count: 2,
            capacity: cap
        }
        .journal_len()
    );
    let mut epoch = 0;
    let mut deferred = 0;
    let mut early = 0;
    for i in 0..2000u64 {
        let sector = (i * 7) % (SECTORS - 8);
        match s.write(sector, &pattern(i, sector, 8)).unwrap() {
            WriteOutcome::Written { end_epoch_early } => {
                if end_epoch_early {
                    early += 1;
                    epoch += 1;
                    s.start_checkpoint(epoch).unwrap();
                    s.acknowledge(epoch).unwrap();
                    s.retire(epoch).unwrap();
                }
            }
            WriteOutcome::Deferred => unreachable!("high water is below capacity"),
        }
    }
    assert!(early > 100);
    // Without cuts, the region fills and writes are deferred, never failed.
    loop {
        match s.write(0, &pattern(1, 0, 8)).unwrap() {
            WriteOutcome::Written { .. } => {}
            WriteOutcome::Deferred => {
                deferred += 1;
                break;
            }
        }
    }
    assert_eq!(deferred, 1);
    assert!(s.end_epoch_early());
    assert!(matches!(
        s.write(0, &vec![0u8; cap as usize]),
        Err(Error::WriteTooLarge { .. })
    ));
    assert_eq!(rig.journal.len().unwrap(), jlen, "the journal never grows");
}

#[test]
fn commit_local_leaves_the_base_alone_holding_the_disk() {
    let (rig, mut s) = Rig::new(cfg(2, 64 << 10));
    written(s.write(5, &pattern(5, 5, 3)).unwrap());
    s.start_checkpoint(1).unwrap();
    written(s.write(6, &pattern(6, 6, 3)).unwrap());
    s.commit_local(2).unwrap();
    let img = read_all(&s);
    assert_eq!(rig.base_bytes(), img);
    assert_eq!(s.status().base_epoch, 2);
}

#[test]
fn path_tools_inspect_verify_recover() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    assert!(matches!(inspect(&image), Err(Error::NoJournal(_))));
    let (mut s, rep) =
        Store::open_path(&image, &cfg(2, 1 << 20), RecoverTo::LastAcknowledged).unwrap();
    assert!(rep.created);
    written(s.write(8, &pattern(8, 8, 8)).unwrap());
    s.start_checkpoint(1).unwrap();
    s.acknowledge(1).unwrap();
    written(s.write(9, &pattern(9, 9, 1)).unwrap());
    s.flush().unwrap();
    drop(s);
    let ins = verify(&image).unwrap();
    let text = ins.to_string();
    assert!(text.contains("acknowledged epoch 1"), "{text}");
    assert!(text.contains("active"), "{text}");
    let rep = recover(&image, None).unwrap();
    assert_eq!(rep.epoch, 1);
    let data = std::fs::read(&image).unwrap();
    assert_eq!(&data[8 * 512..16 * 512], &pattern(8, 8, 8)[..]);
    // Corrupt a byte of a sealed region's record: verify names it.
    let (mut s, _) =
        Store::open_path(&image, &cfg(2, 1 << 20), RecoverTo::LastAcknowledged).unwrap();
    written(s.write(8, &pattern(80, 8, 1)).unwrap());
    s.start_checkpoint(2).unwrap();
    s.export_meta(2).unwrap();
    let slot = s.export_meta(2).unwrap().slot;
    drop(s);
    let jp = journal_path(&image);
    let mut j = std::fs::read(&jp).unwrap();
    let geo = Geometry {
        slot_count: 2,
        capacity: 1 << 20,
    };
    j[(geo.records_offset(slot) + 100) as usize] ^= 1;
    std::fs::write(&jp, j).unwrap();
    let err = verify(&image).unwrap_err();
    assert!(matches!(err, Error::BadRecord { seq: 0, .. }), "{err}");
    assert!(matches!(
        recover(&image, Some(2)),
        Err(Error::BadRecord { .. })
    ));
}

/// Builds a small journal history with the fault layer recording every write and
/// sync. Returns the world, the log, the images at each epoch, and the epochs whose
/// recovery is guaranteed once the log has reached each sync.
struct Recorded {
    log: Vec<LogOp>,
    base0: Vec<u8>,
    images: std::collections::BTreeMap<u64, Vec<u8>>,
    config: StoreConfig,
}

fn record_history() -> Recorded {
    let config = cfg(3, 8 << 10);
    let world = FaultWorld::new();
    let base0 = vec![0u8; (SECTORS * 512) as usize];
    let base = world.file(base0.clone());
    let journal = world.file(Vec::new());
    world.record();
    let (mut s, _) = Store::open(base, journal, &config, RecoverTo::LastAcknowledged).unwrap();
    let mut images = std::collections::BTreeMap::new();
    images.insert(0, base0.clone());
    let mut guest = base0.clone();
    let mut tag = 1;
    for epoch in 1..=5u64 {
        for k in 0..3u64 {
            let sector = (epoch * 5 + k * 3) % (SECTORS - 2);
            let data = pattern(tag, sector, 2);
            tag += 1;
            written(s.write(sector, &data).unwrap());
            apply(&mut guest, sector * 512, &data);
        }
        s.start_checkpoint(epoch).unwrap();
        images.insert(epoch, guest.clone());
        s.acknowledge(epoch).unwrap();
        if epoch > 1 {
            s.retire(epoch - 1).unwrap();
        }
    }
    s.retire(5).unwrap();
    Recorded {
        log: world.log(),
        base0,
        images,
        config,
    }
}

#[test]
fn torn_write_at_every_byte_of_a_recorded_history() {
    // The crash tears the write stream at every byte offset: all writes before it
    // landed, the one it cuts is partial, later ones never happened. Recovery to the
    // last acknowledged epoch must succeed and give exactly that epoch's image, and
    // that epoch may not be older than the newest whose acknowledgement was synced.
    let rec = record_history();
    let mut files: [Vec<u8>; 2] = [rec.base0.clone(), Vec::new()];
    let mut acked_synced = 0u64;
    let mut acked_written = 0u64;
    let mut checked = 0u64;
    let mut check = |files: &[Vec<u8>; 2], min_epoch: u64| {
        let base = MemFile::new(files[0].clone());
        let journal = MemFile::new(files[1].clone());
        let (s, rep) = Store::open(base, journal, &rec.config, RecoverTo::LastAcknowledged)
            .unwrap_or_else(|e| panic!("recovery failed: {e}"));
        assert!(rep.epoch >= min_epoch, "{} < {min_epoch}", rep.epoch);
        assert_eq!(
            &read_all(&s),
            &rec.images[&rep.epoch],
            "epoch {}",
            rep.epoch
        );
        checked += 1;
    };
    for op in &rec.log {
        match op {
            LogOp::SetLen { file, len } => files[*file].resize(*len as usize, 0),
            LogOp::Sync { file } => {
                if *file == 1 {
                    acked_synced = acked_written;
                }
            }
            LogOp::Write { file, offset, data } => {
                for cut in 0..data.len() {
                    let mut f = files.clone();
                    apply(&mut f[*file], *offset, &data[..cut]);
                    check(&f, acked_synced);
                }
                apply(&mut files[*file], *offset, data);
                if *file == 1 && data.len() == format::SLOT_HEADER_LEN {
                    let state = data[16];
                    if state == SlotState::Acknowledged.to_byte()
                        || state == SlotState::Retired.to_byte()
                    {
                        let epoch = u64::from_le_bytes(data[32..40].try_into().unwrap());
                        acked_written = acked_written.max(epoch);
                    }
                }
            }
        }
    }
    check(&files, 5);
    eprintln!("torn-write test: {checked} cuts, each recovered and compared");
    assert!(checked > 10_000, "{checked}");
}

#[test]
fn truncating_the_journal_anywhere_is_refused_or_recovers_cleanly() {
    let rec = record_history();
    let mut files: [Vec<u8>; 2] = [rec.base0.clone(), Vec::new()];
    for op in &rec.log {
        match op {
            LogOp::Write { file, offset, data } => apply(&mut files[*file], *offset, data),
            LogOp::SetLen { file, len } => files[*file].resize(*len as usize, 0),
            LogOp::Sync { .. } => {}
        }
    }
    for len in (0..files[1].len()).step_by(7) {
        let base = MemFile::new(files[0].clone());
        let journal = MemFile::new(files[1][..len].to_vec());
        match Store::open(base, journal, &rec.config, RecoverTo::LastAcknowledged) {
            Ok((s, rep)) => {
                // Only a blank journal (cut inside an all-zero header) opens: afresh.
                assert!(rep.created || rep.epoch == 5, "len {len}");
                if !rep.created {
                    assert_eq!(read_all(&s), rec.images[&5]);
                }
            }
            Err(e) => assert!(
                matches!(e, Error::JournalTruncated { .. }),
                "len {len}: {e}"
            ),
        }
    }
}

#[test]
fn flipped_bytes_are_detected_or_harmless() {
    // A journal with two sealed, unretired regions. Flip each byte of the used part:
    // either verify or recovery to epoch 2 reports it, or recovery still yields
    // exactly epoch 2's image. Flips inside record data must be caught by verify.
    let config = cfg(3, 8 << 10);
    let world = FaultWorld::new();
    let base = world.file(vec![0u8; (SECTORS * 512) as usize]);
    let journal = world.file(Vec::new());
    let (mut s, _) = Store::open(
        base.clone(),
        journal.clone(),
        &config,
        RecoverTo::LastAcknowledged,
    )
    .unwrap();
    let mut guest = vec![0u8; (SECTORS * 512) as usize];
    for epoch in 1..=2u64 {
        for k in 0..2u64 {
            let sector = epoch * 10 + k * 3;
            let data = pattern(epoch * 10 + k, sector, 2);
            written(s.write(sector, &data).unwrap());
            apply(&mut guest, sector * 512, &data);
        }
        s.start_checkpoint(epoch).unwrap();
    }
    s.acknowledge(1).unwrap();
    s.acknowledge(2).unwrap();
    drop(s);
    let j0 = world.durable(journal.id());
    let b0 = world.durable(base.id());
    let geo = Geometry {
        slot_count: 3,
        capacity: 8 << 10,
    };
    let mut ranges = vec![(0usize, format::FILE_HEADER_LEN)];
    for slot in 0..2 {
        let so = geo.slot_offset(slot) as usize;
        ranges.push((so, so + format::SLOT_HEADER_LEN));
        ranges.push((so + 512, so + 512 + format::SLOT_HEADER_LEN));
        let ro = geo.records_offset(slot) as usize;
        ranges.push((ro, ro + 2 * (32 + 1024)));
    }
    let (mut detected, mut harmless) = (0, 0);
    for (from, to) in ranges {
        for i in from..to {
            let mut j = j0.clone();
            j[i] ^= 0x5a;
            let verified = verify_files(&MemFile::new(j.clone()), None);
            let recovered = Store::open(
                MemFile::new(b0.clone()),
                MemFile::new(j),
                &config,
                RecoverTo::Epoch(2),
            );
            let in_data = (0..2).any(|slot| {
                let ro = geo.records_offset(slot) as usize;
                i >= ro && i < ro + 2 * (32 + 1024)
            });
            match (verified, recovered) {
                (Err(_), _) | (_, Err(_)) => detected += 1,
                (Ok(_), Ok((st, _))) => {
                    assert!(!in_data, "flip at {i} in record data went unnoticed");
                    assert_eq!(
                        read_all(&st),
                        guest,
                        "flip at {i} changed the result silently"
                    );
                    harmless += 1;
                }
            }
        }
    }
    eprintln!("corruption test: {detected} flips detected, {harmless} harmless (same image)");
    assert!(detected > 4000, "{detected} detected, {harmless} harmless");
}

#[test]
fn fuzz_seeds_run_as_a_plain_test() {
    // The fuzz target's body over seeds made here and any committed corpus files,
    // plus deterministic mutations of each: no panic is the property.
    let rec = record_history();
    let mut files: [Vec<u8>; 2] = [rec.base0.clone(), Vec::new()];
    let mut seeds: Vec<Vec<u8>> = Vec::new();
    for op in &rec.log {
        if let LogOp::SetLen { file, len } = op {
            files[*file].resize(*len as usize, 0);
        }
        if let LogOp::Write { file, offset, data } = op {
            apply(&mut files[*file], *offset, data);
            if *file == 1 && data.len() == format::SLOT_HEADER_LEN {
                let mut seed = vec![0u8];
                seed.extend_from_slice(&files[1]);
                seeds.push(seed);
            }
        }
    }
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/journal");
    if let Ok(rd) = std::fs::read_dir(&corpus) {
        for e in rd.flatten() {
            if let Ok(b) = std::fs::read(e.path()) {
                seeds.push(b);
            }
        }
    }
    let mut x = 0x9e3779b97f4a7c15u64;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut runs = 0;
    for seed in &seeds {
        fuzz_journal(seed);
        for _ in 0..40 {
            let mut m = seed.clone();
            m[0] = rnd() as u8;
            for _ in 0..1 + rnd() % 4 {
                let i = (rnd() % m.len() as u64) as usize;
                m[i] = rnd() as u8;
            }
            fuzz_journal(&m);
            runs += 1;
        }
    }
    fuzz_journal(&[]);
    fuzz_journal(&[1]);
    assert!(runs > 100);
}

#[test]
#[ignore = "writes the fuzz seeds into devices/fuzz/corpus/journal"]
fn write_fuzz_seeds() {
    let rec = record_history();
    let mut files: [Vec<u8>; 2] = [rec.base0.clone(), Vec::new()];
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/journal");
    std::fs::create_dir_all(&dir).unwrap();
    let mut n = 0;
    let mut syncs = 0;
    for op in &rec.log {
        match op {
            LogOp::SetLen { file, len } => files[*file].resize(*len as usize, 0),
            LogOp::Write { file, offset, data } => apply(&mut files[*file], *offset, data),
            LogOp::Sync { file: 1 } => {
                syncs += 1;
                // A few states: after creation, mid-history, the end.
                if [2, 6, 12].contains(&syncs) {
                    for flags in [0u8, 1 | (1 << 1)] {
                        let mut seed = vec![flags];
                        seed.extend_from_slice(&files[1]);
                        std::fs::write(dir.join(format!("seed-{syncs:02}-{flags}")), seed).unwrap();
                        n += 1;
                    }
                }
            }
            LogOp::Sync { .. } => {}
        }
    }
    assert!(n > 0);
}

#[test]
fn a_preallocated_journal_is_written_whole_and_works() {
    let mut c = cfg(2, 16 << 10);
    c.preallocate = true;
    let world = FaultWorld::new();
    let base = world.file(vec![0u8; (SECTORS * 512) as usize]);
    let journal = world.file(Vec::new());
    world.record();
    let (mut s, rep) = Store::open(
        base.clone(),
        journal.clone(),
        &c,
        RecoverTo::LastAcknowledged,
    )
    .unwrap();
    assert!(rep.created);
    let geo = Geometry {
        slot_count: 2,
        capacity: 16 << 10,
    };
    // Every byte after the header was written (allocated), the header last.
    let log = world.log();
    let writes: Vec<(u64, usize)> = log
        .iter()
        .filter_map(|op| match op {
            LogOp::Write {
                file: 1,
                offset,
                data,
            } => Some((*offset, data.len())),
            _ => None,
        })
        .collect();
    let header_at = writes.iter().position(|(o, _)| *o == 0).unwrap();
    let zeroed: u64 = writes[..header_at].iter().map(|(_, n)| *n as u64).sum();
    assert!(writes[..header_at]
        .iter()
        .all(|(o, _)| *o >= FILE_HEADER_AREA));
    assert_eq!(zeroed, geo.journal_len() - FILE_HEADER_AREA);
    written(s.write(2, &pattern(2, 2, 2)).unwrap());
    s.commit_local(1).unwrap();
    assert_eq!(&world.durable(base.id())[1024..2048], &pattern(2, 2, 2)[..]);
}

#[test]
fn large_and_odd_sized_writes() {
    let (rig, mut s) = Rig::new(cfg(2, 1 << 20));
    let big = pattern(1, 0, 60); // 30 KiB in one record
    written(s.write(0, &big).unwrap());
    written(s.write(3, &pattern(2, 3, 3)).unwrap());
    written(s.write(59, &pattern(3, 59, 5)).unwrap());
    let mut expect = vec![0u8; (SECTORS * 512) as usize];
    apply(&mut expect, 0, &big);
    apply(&mut expect, 3 * 512, &pattern(2, 3, 3));
    apply(&mut expect, 59 * 512, &pattern(3, 59, 5));
    assert_eq!(read_all(&s), expect);
    // A read starting and ending inside extents.
    let mut part = vec![0u8; 7 * 512];
    s.read(2, &mut part).unwrap();
    assert_eq!(part, expect[2 * 512..9 * 512]);
    assert!(matches!(
        s.write(SECTORS - 1, &pattern(4, 0, 2)),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        s.write(0, &[0u8; 100]),
        Err(Error::Unaligned { .. })
    ));
    s.commit_local(1).unwrap();
    assert_eq!(rig.base_bytes(), expect);
}

#[test]
fn retire_runs_beside_a_writing_device_loop() {
    // One thread plays the device loop (writes and reads through the lock), another
    // the replication thread (cuts, acknowledges, retires with the split retire).
    let world = FaultWorld::new();
    let base = world.file(vec![0u8; (SECTORS * 512) as usize]);
    let journal = world.file(Vec::new());
    let (s, _) = Store::open(
        base.clone(),
        journal,
        &cfg(3, 16 << 10),
        RecoverTo::LastAcknowledged,
    )
    .unwrap();
    let shared = SharedStore::new(s);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let device = {
        let shared = Arc::clone(&shared);
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut guest = vec![0u8; (SECTORS * 512) as usize];
            let mut tag = 0u64;
            let mut deferred = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || tag < 2000 {
                tag += 1;
                let sector = (tag * 13) % (SECTORS - 2);
                let data = pattern(tag, sector, 2);
                match shared.lock().write(sector, &data).unwrap() {
                    WriteOutcome::Written { .. } => apply(&mut guest, sector * 512, &data),
                    WriteOutcome::Deferred => deferred += 1,
                }
                let mut all = vec![0u8; guest.len()];
                shared.lock().read(0, &mut all).unwrap();
                assert!(all == guest, "the device saw stale data at write {tag}");
            }
            (guest, deferred)
        })
    };
    let mut epoch = 0;
    for _ in 0..300 {
        epoch += 1;
        shared
            .start_checkpoint_wait(epoch, Duration::from_secs(10))
            .unwrap();
        shared.lock().acknowledge(epoch).unwrap();
        shared.retire(epoch).unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (guest, _deferred) = device.join().unwrap();
    shared.lock().commit_local(epoch + 1).unwrap();
    assert_eq!(world.durable(base.id()), guest);
}

#[test]
fn journal_ids_are_random() {
    let id = || {
        let base = MemFile::new(vec![0; 4096]);
        let (s, _) = Store::open(
            base,
            MemFile::new(Vec::new()),
            &cfg(2, 4096),
            RecoverTo::LastAcknowledged,
        )
        .unwrap();
        s.file_header().journal_id
    };
    // Two journals created over the same image at once still differ (a clash has a
    // chance of 2^-64).
    assert_ne!(id(), id());
}

/// `import` is the inverse of `export`: a standby's store fed the primary's regions
/// ends with the same disk, region by region, and survives a crash after each import.
#[test]
fn import_is_the_inverse_of_export() {
    let (prig, mut primary) = Rig::new(cfg(2, 64 << 10));
    let (srig, mut standby) = Rig::new(cfg(2, 64 << 10));
    for epoch in 1..=4u64 {
        for (i, sector) in [(0u64, 3u64), (1, 10), (2, epoch * 7 % SECTORS)] {
            let n = 1 + (epoch + i) % 3;
            let sector = sector.min(SECTORS - n);
            written(
                primary
                    .write(sector, &pattern(epoch * 10 + i, sector, n))
                    .unwrap(),
            );
        }
        primary.start_checkpoint(epoch).unwrap();
        let ex = primary.export(epoch).unwrap();
        let meta = standby.import(&ex).unwrap();
        assert_eq!(meta.epoch, epoch);
        assert_eq!(meta.sectors, ex.meta.sectors);
        // The standby's region exports the same final contents.
        assert_eq!(standby.export(epoch).unwrap().extents, ex.extents);
        assert_eq!(read_all(&standby), read_all(&primary));
        // Sealed durably: a crash now loses nothing of it.
        srig.crash();
        let (reopened, report) = srig.open(RecoverTo::Epoch(epoch)).unwrap();
        assert_eq!(report.epoch, epoch);
        assert_eq!(read_all(&reopened), read_all(&primary));
        // Recovery to the epoch redid the region into the standby's base image;
        // the primary retires its own the ordinary way.
        assert_eq!(reopened.status().base_epoch, epoch);
        standby = reopened;
        primary.acknowledge(epoch).unwrap();
        primary.retire(epoch).unwrap();
        assert_eq!(srig.base_bytes(), prig.base_bytes());
    }
}

#[test]
fn import_refuses_what_it_cannot_hold_and_changes_nothing() {
    let (_prig, mut primary) = Rig::new(cfg(2, 64 << 10));
    let (_srig, mut standby) = Rig::new(cfg(2, 8 << 10));
    written(primary.write(0, &pattern(1, 0, 8)).unwrap());
    written(primary.write(30, &pattern(2, 30, 8)).unwrap());
    primary.start_checkpoint(3).unwrap();
    let ex = primary.export(3).unwrap();
    // Larger than one region of the standby's journal.
    assert!(matches!(
        standby.import(&ex),
        Err(Error::ImportTooLarge { epoch: 3, .. })
    ));
    assert_eq!(standby.status().last_epoch, 0);
    assert!(standby.status().frozen.is_empty());
    // Writes of its own in the active region.
    written(standby.write(5, &pattern(9, 5, 1)).unwrap());
    let mut small = ex.clone();
    small.extents.truncate(1);
    small.extents[0].data.truncate(512);
    assert!(matches!(
        standby.import(&small),
        Err(Error::ImportIntoBusyRegion { records: 1, .. })
    ));
    standby.rollback().unwrap();
    // An epoch that does not follow.
    standby.import(&small).unwrap();
    assert!(matches!(
        standby.import(&small),
        Err(Error::EpochNotIncreasing { epoch: 3, last: 3 })
    ));
}

/// A 16 MiB disk with no region size named gets 4 MiB regions: a journal of about
/// half the disk, not the 128 MiB every journal had before.
#[test]
fn a_16_mib_disk_gets_a_small_journal() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("small.img");
    let disk_len = 16u64 << 20;
    std::fs::File::create(&image)
        .unwrap()
        .set_len(disk_len)
        .unwrap();
    let config = StoreConfig::for_disk(disk_len, None);
    assert!(!config.insist_on_capacity);
    let (s, rep) = Store::open_path(&image, &config, RecoverTo::LastAcknowledged).unwrap();
    assert!(rep.created);
    assert_eq!(s.file_header().region_capacity, 4 << 20);
    assert_eq!(s.status().capacity, 4 << 20);
    assert_eq!(s.status().slot_count, 2);
    drop(s);
    let journal_len = std::fs::metadata(journal_path(&image)).unwrap().len();
    assert_eq!(journal_len, 4096 + 2 * (4096 + (4 << 20)));
    assert!(journal_len * 2 < disk_len + (64 << 10), "{journal_len}");
    // `disk inspect` shows the figures.
    let text = inspect(&image).unwrap().to_string();
    assert!(
        text.contains(
            "disk 16 MiB (16777216 bytes); region size 4 MiB (4194304 bytes); 2 region slots"
        ),
        "{text}"
    );
    assert!(
        text.contains("journal 8204 KiB (8400896 bytes, 0.50 × the disk), 8204 KiB allocated"),
        "{text}"
    );
}

/// A region size the user names must match an existing journal's: another one is
/// refused before recovery touches anything; with none named, the journal's own
/// size is used whatever the default rule would give today.
#[test]
fn an_existing_journal_keeps_its_region_size() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let (mut s, _) = Store::open_path(
        &image,
        &StoreConfig::for_disk(1 << 20, Some(3 << 20)),
        RecoverTo::LastAcknowledged,
    )
    .unwrap();
    written(s.write(8, &pattern(8, 8, 8)).unwrap());
    s.start_checkpoint(1).unwrap();
    s.acknowledge(1).unwrap();
    drop(s);
    let journal_before = std::fs::read(journal_path(&image)).unwrap();
    let base_before = std::fs::read(&image).unwrap();
    let err = Store::open_path(
        &image,
        &StoreConfig::for_disk(1 << 20, Some(2 << 20)),
        RecoverTo::LastAcknowledged,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::RegionSizeMismatch {
                found: 0x30_0000,
                requested: 0x20_0000
            }
        ),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("regions of 3 MiB but region-size asks for 2 MiB"),
        "{msg}"
    );
    // Refused before recovery: neither file changed (checkpoint 1 not yet redone).
    assert_eq!(std::fs::read(journal_path(&image)).unwrap(), journal_before);
    assert_eq!(std::fs::read(&image).unwrap(), base_before);
    // The same size, or none: the journal's.
    for asked in [Some(3 << 20), None] {
        let (s, rep) = Store::open_path(
            &image,
            &StoreConfig::for_disk(1 << 20, asked),
            RecoverTo::LastAcknowledged,
        )
        .unwrap();
        assert!(!rep.created);
        assert_eq!(s.status().capacity, 3 << 20);
    }
}

proptest::proptest! {
    /// Whatever a primary's region holds, its export fits a standby region of the
    /// same size: overlaps only shrink it (an extent split by a later write costs a
    /// record header, but the write replaced at least a sector). A standby whose
    /// regions are at least the primary's therefore never refuses a region.
    #[test]
    fn an_export_fits_a_region_of_the_same_size(
        capacity in proptest::sample::select(vec![8192u64, 12288, 20480]),
        writes in proptest::collection::vec((0..SECTORS, 1..=8u64), 1..200),
    ) {
        let (_prig, mut primary) = Rig::new(cfg(2, capacity));
        let (_srig, mut standby) = Rig::new(cfg(2, capacity));
        for (i, (sector, n)) in writes.into_iter().enumerate() {
            let sector = sector.min(SECTORS - n);
            if primary.write(sector, &pattern(i as u64, sector, n)).unwrap() == WriteOutcome::Deferred {
                break;
            }
        }
        primary.start_checkpoint(1).unwrap();
        let ex = primary.export(1).unwrap();
        let meta = standby.import(&ex).unwrap();
        proptest::prop_assert!(meta.used_bytes <= ex.meta.used_bytes);
        proptest::prop_assert_eq!(read_all(&standby), read_all(&primary));
    }
}
