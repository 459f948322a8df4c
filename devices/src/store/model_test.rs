//! The model-based property test: random sequences of write, read, flush,
//! start_checkpoint, export, acknowledge, retire, rollback and crash against an
//! in-memory model of what the guest sees and what each checkpoint holds. A crash is
//! a real one: the fault layer under both files drops or tears every write not yet
//! synced, and can be armed to strike in the middle of any operation (a retire
//! half-way through the base image, a reused slot being rewritten, recovery itself).
//! After every crash the store is recovered and compared with the model.
//!
//! `MIRRORVM_PROPTEST_CASES` raises the case count (default: CI-sized).

// Casts here are on test-controlled constants and small test sizes.
#![allow(clippy::cast_possible_truncation)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use super::fault::{apply, is_crash, CrashMode, FaultFile, FaultWorld};
use super::tests::{cfg, pattern, SECTORS};
use super::*;

/// Region sizes a case may draw: from a region that takes two of the largest writes
/// (8 sectors) to one that takes a dozen, so deferred writes and early cuts come at
/// different points of a history.
const CAPACITIES: [u64; 3] = [8 << 10, 12 << 10, 20 << 10];

static CRASHES: AtomicU64 = AtomicU64::new(0);
static ARMED_CRASHES: AtomicU64 = AtomicU64::new(0);
static CRASH_IN_RETIRE: AtomicU64 = AtomicU64::new(0);
static CRASH_IN_RETIRE_BASE_TORN: AtomicU64 = AtomicU64::new(0);
static CRASH_REWRITING_REUSED_SLOT: AtomicU64 = AtomicU64::new(0);
static CRASH_IN_RECOVERY: AtomicU64 = AtomicU64::new(0);
static REFUSED: AtomicU64 = AtomicU64::new(0);
static DEFERRED: AtomicU64 = AtomicU64::new(0);
static NO_FREE: AtomicU64 = AtomicU64::new(0);
static RECOVERED_TO_NAMED: AtomicU64 = AtomicU64::new(0);
static SPLIT_RETIRES: AtomicU64 = AtomicU64::new(0);

#[derive(Debug, Clone)]
enum Op {
    Write {
        sector: u64,
        sectors: u64,
    },
    Read {
        sector: u64,
        sectors: u64,
    },
    Flush,
    Cut,
    Export {
        pick: u8,
    },
    Ack,
    Retire,
    /// A retire split as the VMM runs it: prepare, the device keeps writing and
    /// reading while the job copies, then finish.
    RetireSplit {
        writes: u8,
    },
    Rollback,
    Crash {
        any: bool,
        target: u8,
        in_recovery: Option<u8>,
    },
    Arm {
        ops: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        30 => (0..SECTORS, 1..=8u64).prop_map(|(s, n)| Op::Write { sector: s.min(SECTORS - n), sectors: n }),
        8 => (0..SECTORS, 1..=16u64).prop_map(|(s, n)| Op::Read { sector: s.min(SECTORS - n), sectors: n }),
        4 => Just(Op::Flush),
        12 => Just(Op::Cut),
        4 => any::<u8>().prop_map(|pick| Op::Export { pick }),
        10 => Just(Op::Ack),
        7 => Just(Op::Retire),
        5 => (0..4u8).prop_map(|writes| Op::RetireSplit { writes }),
        2 => Just(Op::Rollback),
        4 => (any::<bool>(), any::<u8>(), prop::option::weighted(0.3, 0..40u8))
            .prop_map(|(any, target, in_recovery)| Op::Crash { any, target, in_recovery }),
        6 => (0..40u8).prop_map(|ops| Op::Arm { ops }),
    ]
}

#[derive(Debug, Clone, Copy)]
struct Frozen {
    epoch: u64,
    sealed: bool,
    acked: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inflight {
    Other,
    /// An operation that seals every frozen region (flush, export, acknowledge).
    Seal,
    Ack(u64),
    Retire(u64),
}

struct Model {
    guest: Vec<u8>,
    images: BTreeMap<u64, Vec<u8>>,
    frozen: Vec<Frozen>,
    base_epoch: u64,
    last_epoch: u64,
    used: u64,
    slots: u32,
    capacity: u64,
    tag: u64,
}

struct Harness {
    world: FaultWorld,
    base: FaultFile,
    journal: FaultFile,
    config: StoreConfig,
    store: Store<FaultFile>,
    m: Model,
    rng: u64,
}

impl Harness {
    fn new(slots: u32, capacity: u64, seed: u64) -> Harness {
        let world = FaultWorld::new();
        let img = vec![0u8; (SECTORS * SECTOR_SIZE) as usize];
        let base = world.file(img.clone());
        let journal = world.file(Vec::new());
        let config = cfg(slots, capacity);
        let (store, _) = Store::open(
            base.clone(),
            journal.clone(),
            &config,
            RecoverTo::LastAcknowledged,
        )
        .unwrap();
        let mut images = BTreeMap::new();
        images.insert(0, img.clone());
        Harness {
            world,
            base,
            journal,
            config,
            store,
            m: Model {
                guest: img,
                images,
                frozen: Vec::new(),
                base_epoch: 0,
                last_epoch: 0,
                used: 0,
                slots,
                capacity,
                tag: 1,
            },
            rng: seed | 1,
        }
    }

    fn rnd(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn step(&mut self, op: &Op) {
        let (inflight, r) = self.apply(op);
        if let Err(e) = r {
            assert!(is_crash(&e), "unexpected error from {op:?}: {e}");
            ARMED_CRASHES.fetch_add(1, Relaxed);
            let any = self.rnd() % 2 == 0;
            let target = self.rnd() as u8;
            self.crash_and_recover(inflight, any, target, None);
        }
    }

    fn apply(&mut self, op: &Op) -> (Inflight, Result<()>) {
        let m = &mut self.m;
        match *op {
            Op::Write { sector, sectors } => {
                let data = pattern(m.tag, sector, sectors);
                m.tag += 1;
                let need = record_footprint(data.len() as u64);
                let full = m.used + need > m.capacity;
                let r = self.store.write(sector, &data).map(|o| match o {
                    WriteOutcome::Written { .. } => {
                        assert!(!full, "a write that cannot fit was accepted");
                        apply(&mut m.guest, sector * SECTOR_SIZE, &data);
                        m.used += need;
                    }
                    WriteOutcome::Deferred => {
                        assert!(full, "a write that fits was deferred");
                        assert!(self.store.end_epoch_early());
                        DEFERRED.fetch_add(1, Relaxed);
                    }
                });
                (Inflight::Other, r)
            }
            Op::Read { sector, sectors } => {
                let mut buf = vec![0u8; (sectors * SECTOR_SIZE) as usize];
                let r = self.store.read(sector, &mut buf).map(|()| {
                    let at = (sector * SECTOR_SIZE) as usize;
                    assert!(
                        buf == m.guest[at..at + buf.len()],
                        "read of {sectors} at {sector} differs from the model"
                    );
                });
                (Inflight::Other, r)
            }
            Op::Flush => {
                let r = self.store.flush().map(|()| {
                    for f in &mut m.frozen {
                        f.sealed = true;
                    }
                });
                (Inflight::Seal, r)
            }
            Op::Cut => {
                let epoch = m.last_epoch + 1;
                let no_free = m.frozen.len() as u32 + 1 >= m.slots;
                let r = match self.store.start_checkpoint(epoch) {
                    Ok(()) => {
                        assert!(!no_free, "cut {epoch} succeeded without a free slot");
                        m.frozen.push(Frozen {
                            epoch,
                            sealed: false,
                            acked: false,
                        });
                        m.images.insert(epoch, m.guest.clone());
                        m.last_epoch = epoch;
                        m.used = 0;
                        Ok(())
                    }
                    Err(Error::NoFreeRegion { .. }) => {
                        assert!(no_free, "cut {epoch} refused with a free slot");
                        NO_FREE.fetch_add(1, Relaxed);
                        Ok(())
                    }
                    Err(e) => Err(e),
                };
                (Inflight::Other, r)
            }
            Op::Export { pick } => {
                if m.frozen.is_empty() {
                    return (Inflight::Other, Ok(()));
                }
                let i = pick as usize % m.frozen.len();
                let epoch = m.frozen[i].epoch;
                let parent = if i == 0 {
                    m.base_epoch
                } else {
                    m.frozen[i - 1].epoch
                };
                let r = self.store.export(epoch).map(|ex| {
                    assert_eq!(ex.meta.parent_epoch, parent);
                    let mut img = m.images[&parent].clone();
                    for e in &ex.extents {
                        apply(&mut img, e.sector * SECTOR_SIZE, &e.data);
                    }
                    assert!(img == m.images[&epoch], "export of {epoch} is wrong");
                    for f in &mut m.frozen {
                        f.sealed = true;
                    }
                });
                (Inflight::Seal, r)
            }
            Op::Ack => {
                let Some(i) = m.frozen.iter().position(|f| !f.acked) else {
                    return (Inflight::Other, Ok(()));
                };
                let epoch = m.frozen[i].epoch;
                let r = self.store.acknowledge(epoch).map(|()| {
                    for f in &mut m.frozen {
                        f.sealed = true;
                    }
                    m.frozen[i].acked = true;
                });
                (Inflight::Ack(epoch), r)
            }
            Op::Retire => {
                let Some(f) = m.frozen.first().copied() else {
                    return (Inflight::Other, Ok(()));
                };
                match self.store.retire(f.epoch) {
                    Ok(()) => {
                        assert!(f.acked);
                        m.frozen.remove(0);
                        m.base_epoch = f.epoch;
                        (Inflight::Retire(f.epoch), Ok(()))
                    }
                    Err(Error::NotAcknowledged(_)) => {
                        assert!(!f.acked);
                        (Inflight::Other, Ok(()))
                    }
                    Err(e) => {
                        if is_crash(&e) {
                            CRASH_IN_RETIRE.fetch_add(1, Relaxed);
                            if self.world.has_pending(self.base.id()) {
                                CRASH_IN_RETIRE_BASE_TORN.fetch_add(1, Relaxed);
                            }
                        }
                        (Inflight::Retire(f.epoch), Err(e))
                    }
                }
            }
            Op::RetireSplit { writes } => {
                let Some(f) = m.frozen.first().copied() else {
                    return (Inflight::Other, Ok(()));
                };
                let job = match self.store.prepare_retire(f.epoch) {
                    Ok(job) => job,
                    Err(Error::NotAcknowledged(_)) => {
                        assert!(!f.acked);
                        return (Inflight::Other, Ok(()));
                    }
                    Err(e) => return (Inflight::Retire(f.epoch), Err(e)),
                };
                assert!(f.acked);
                // The device loop goes on while the job runs.
                for k in 0..writes {
                    let sector = self.rnd() % (SECTORS - 4);
                    let (_, r) = self.apply(&Op::Write {
                        sector,
                        sectors: 1 + u64::from(k),
                    });
                    if let Err(e) = r {
                        return (Inflight::Retire(f.epoch), Err(e));
                    }
                    let (_, r) = self.apply(&Op::Read {
                        sector: 0,
                        sectors: SECTORS,
                    });
                    if let Err(e) = r {
                        return (Inflight::Retire(f.epoch), Err(e));
                    }
                }
                let result = job.run();
                let crashed = result.as_ref().is_err_and(is_crash);
                if crashed {
                    CRASH_IN_RETIRE.fetch_add(1, Relaxed);
                    if self.world.has_pending(self.base.id()) {
                        CRASH_IN_RETIRE_BASE_TORN.fetch_add(1, Relaxed);
                    }
                }
                let r = self.store.finish_retire(job, result).map(|()| {
                    let m = &mut self.m;
                    m.frozen.remove(0);
                    m.base_epoch = f.epoch;
                    SPLIT_RETIRES.fetch_add(1, Relaxed);
                });
                (Inflight::Retire(f.epoch), r)
            }
            Op::Rollback => {
                let r = self.store.rollback().map(|()| {
                    m.guest = m.images[&m.last_epoch].clone();
                    m.used = 0;
                });
                (Inflight::Other, r)
            }
            Op::Crash {
                any,
                target,
                in_recovery,
            } => {
                self.world.disarm();
                self.crash_and_recover(Inflight::Other, any, target, in_recovery);
                (Inflight::Other, Ok(()))
            }
            Op::Arm { ops } => {
                self.world.arm(u64::from(ops));
                (Inflight::Other, Ok(()))
            }
        }
    }

    fn crash_and_recover(
        &mut self,
        inflight: Inflight,
        any: bool,
        target: u8,
        in_recovery: Option<u8>,
    ) {
        CRASHES.fetch_add(1, Relaxed);
        let st = self.store.status();
        if st.active_slot_reused
            && st.active_records > 0
            && self.world.has_pending(self.journal.id())
        {
            CRASH_REWRITING_REUSED_SLOT.fetch_add(1, Relaxed);
        }
        let mode = if any {
            CrashMode::Any
        } else {
            CrashMode::TearLast
        };
        let mut rng = self.rng;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        self.world.crash(mode, &mut next);
        self.rng = next();

        let m = &self.m;
        let base_g = m.base_epoch;
        let base_p = match inflight {
            Inflight::Retire(e) => e,
            _ => base_g,
        };
        let sealed_max_g = m
            .frozen
            .iter()
            .filter(|f| f.sealed)
            .map(|f| f.epoch)
            .max()
            .unwrap_or(base_g);
        let acked_g = m
            .frozen
            .iter()
            .filter(|f| f.acked)
            .map(|f| f.epoch)
            .max()
            .unwrap_or(base_g);
        // Once the region next in line is acknowledged its retire may have begun, so
        // the base no longer holds anything older.
        let floor_g = match m.frozen.first() {
            Some(f) if f.acked => f.epoch,
            _ => base_g,
        };
        // The highest floor a partly persisted operation in flight may have left.
        let floor_p = match (m.frozen.first(), inflight) {
            (Some(f), Inflight::Ack(a)) if f.epoch == a => a,
            (Some(f), Inflight::Retire(r)) if f.epoch == r => match m.frozen.get(1) {
                Some(next) if next.acked => next.epoch,
                _ => r,
            },
            _ => floor_g.max(base_p),
        };
        let to = if target % 4 == 0 {
            RecoverTo::LastAcknowledged
        } else {
            let lo = base_g.saturating_sub(1);
            let hi = m.last_epoch + 1;
            RecoverTo::Epoch(lo + u64::from(target) % (hi - lo + 1))
        };

        let mut result = self.open_maybe_crashing(to, mode, in_recovery);
        if let RecoverTo::Epoch(e) = to {
            match &result {
                Ok(_) => {
                    RECOVERED_TO_NAMED.fetch_add(1, Relaxed);
                }
                Err(err) => {
                    let must = floor_p <= e && e <= sealed_max_g;
                    assert!(!must, "recovery to {e} refused: {err} (base {base_g}/{base_p}, sealed up to {sealed_max_g})");
                    assert!(
                        matches!(
                            err,
                            Error::EpochRetired { .. }
                                | Error::RegionMissing { .. }
                                | Error::RetireMayHaveBegun { .. }
                        ),
                        "recovery to {e} failed oddly: {err}"
                    );
                    REFUSED.fetch_add(1, Relaxed);
                    result = self.open_maybe_crashing(RecoverTo::LastAcknowledged, mode, None);
                }
            }
        }
        let (store, rep) = result.unwrap_or_else(|e| panic!("recovery failed: {e}"));
        let e = rep.epoch;
        match to {
            RecoverTo::Epoch(n) if rep.epoch == n => {}
            _ => {
                let possible = e == acked_g
                    || matches!(inflight, Inflight::Ack(a) if a == e)
                    || matches!(inflight, Inflight::Retire(a) if a == e);
                assert!(
                    possible,
                    "recovered to {e}; acknowledged {acked_g}, in flight {inflight:?}"
                );
            }
        }
        assert!(
            e >= floor_g,
            "recovered to {e}, older than the floor {floor_g}"
        );
        let img = self
            .m
            .images
            .get(&e)
            .unwrap_or_else(|| panic!("recovered to unknown epoch {e}"))
            .clone();
        let mut all = vec![0u8; img.len()];
        store.read(0, &mut all).unwrap();
        assert!(all == img, "recovered disk differs from epoch {e}");
        assert!(
            self.world.durable(self.base.id()) == img,
            "the base image alone does not hold epoch {e}"
        );
        self.store = store;
        let m = &mut self.m;
        m.guest = img;
        m.images.retain(|&k, _| k <= e);
        m.frozen.clear();
        m.base_epoch = e;
        m.last_epoch = e;
        m.used = 0;
    }

    /// Opens the store, optionally crashing in the middle of recovery first.
    fn open_maybe_crashing(
        &mut self,
        to: RecoverTo,
        mode: CrashMode,
        in_recovery: Option<u8>,
    ) -> Result<(Store<FaultFile>, RecoveryReport)> {
        if let Some(k) = in_recovery {
            self.world.arm(u64::from(k));
            let r = Store::open(self.base.clone(), self.journal.clone(), &self.config, to);
            match r {
                Err(e) if is_crash(&e) => {
                    CRASH_IN_RECOVERY.fetch_add(1, Relaxed);
                    let mut rng = self.rnd();
                    self.world.crash(mode, &mut || {
                        rng = rng
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        rng >> 17
                    });
                }
                other => {
                    self.world.disarm();
                    return other;
                }
            }
        }
        Store::open(self.base.clone(), self.journal.clone(), &self.config, to)
    }
}

fn run_case(slots: u32, capacity: u64, seed: u64, ops: &[Op]) {
    let mut h = Harness::new(slots, capacity, seed);
    for op in ops {
        h.step(op);
    }
    h.world.disarm();
    h.crash_and_recover(Inflight::Other, true, 0, None);
}

fn cases() -> u32 {
    std::env::var("MIRRORVM_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

#[test]
fn model_based_crash_test() {
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (
        2u32..=3,
        prop::sample::select(&CAPACITIES[..]),
        any::<u64>(),
        prop::collection::vec(op(), 1..160),
    );
    let t = std::time::Instant::now();
    let result = runner.run(&strategy, |(slots, capacity, seed, ops)| {
        run_case(slots, capacity, seed, &ops);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let c = |a: &AtomicU64| a.load(Relaxed);
    eprintln!(
        "model test: {} cases in {:.1?}; crashes {} (armed {}), in retire {} (base half-written {}), \
         rewriting a reused slot {}, in recovery {}; recovered to a named epoch {}, refused {}; \
         writes deferred {}, cuts without a free slot {}, split retires completed {}",
        cases(),
        t.elapsed(),
        c(&CRASHES),
        c(&ARMED_CRASHES),
        c(&CRASH_IN_RETIRE),
        c(&CRASH_IN_RETIRE_BASE_TORN),
        c(&CRASH_REWRITING_REUSED_SLOT),
        c(&CRASH_IN_RECOVERY),
        c(&RECOVERED_TO_NAMED),
        c(&REFUSED),
        c(&DEFERRED),
        c(&NO_FREE),
        c(&SPLIT_RETIRES),
    );
    for (name, v) in [
        ("crash in retire", &CRASH_IN_RETIRE),
        (
            "crash with the base half-written",
            &CRASH_IN_RETIRE_BASE_TORN,
        ),
        (
            "crash rewriting a reused slot",
            &CRASH_REWRITING_REUSED_SLOT,
        ),
        ("crash in recovery", &CRASH_IN_RECOVERY),
        ("deferred write", &DEFERRED),
        ("cut without a free slot", &NO_FREE),
        ("split retire", &SPLIT_RETIRES),
    ] {
        assert!(c(v) > 0, "the generator never produced a {name}");
    }
}
