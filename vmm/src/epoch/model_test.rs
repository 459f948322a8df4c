//! Model-based test of the epoch engine, without KVM.
//!
//! Fakes stand in for everything the engine drives: a real (small) vm-memory guest
//! memory whose bitmap is the dirty log, vCPUs that can be paused, disks with two
//! region slots, an output gate, and a sink that keeps an image of memory and can
//! fail, lose its base, or be lost for good. The real `ExportWorker` runs the jobs,
//! one attempt per step. Random sequences of guest writes, timer ticks, region-full
//! signals, exporter steps, sink failures and recoveries, save failures and fences,
//! ended by a user stop, a guest stop or a crash, drive the engine; after every step
//! the invariants are checked:
//!
//! 1. no dirty page is lost: every page not dirty in the log has its current value
//!    at the sink or in the checkpoint travelling to it (unless the run failed, or is
//!    unprotected or fenced, when nothing more is promised);
//! 2. at most one checkpoint is in flight, and a region swap always finds a free
//!    slot (cut N+1 only after N's regions are retired);
//! 3. a region is retired only once its checkpoint is complete at the sink, or the
//!    run went unprotected, or the sink lost its base (then the new base carries it);
//! 4. output is released only for complete checkpoints or when unprotected, never
//!    when fenced;
//! 5. a failed cut stops further cuts;
//! 6. the vCPUs are never left paused outside a cut, and disk regions swap only while
//!    they are paused (unless unprotected);
//! 7. a user stop that succeeds leaves the sink holding exactly the guest's memory;
//! 8. the epoch length in force, every new length handed to the timer, and every
//!    metrics line's `target_us` lie within the setting's bounds (fixed or
//!    `auto,min,max`, drawn at random).
//!
//! 8. a page is writable only while KVM's log has it (else its next write is lost).
//!
//! The fake dirty log models KVM with manual re-protection: each page is logged or
//! not, writable or write-protected. A guest write to a protected page "faults": the
//! page is logged and becomes writable; a write to a writable page changes nothing
//! in the log. Reading the log changes nothing; re-protecting a page clears its bit
//! and protects it. The real hot-page policy ([`HotPages`]) picks what to
//! re-protect, with a budget of a few hot pages. So a write between the copy of a
//! page and its re-protection is in neither the copy nor the log: lost. The guest
//! writes while its vCPUs run, including (the `Race` step) in the middle of a
//! dirty-log operation the engine makes while they run.
//!
//! `each_invariant_can_fail` breaks the engine on purpose eight ways (a lost page,
//! two checkpoints in flight, an early retire, an early release, a release while
//! fenced, a cut after a failed one, vCPUs left paused, pages re-protected after the
//! vCPUs resume) and checks that each is caught by the invariant it breaks:
//! invariants 1 to 6 (the late re-protection loses a write: invariant 1). Invariants
//! 7 and 8 have no sabotage of their own; a lost page also trips 7.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestError, TestRunner};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::exporter::{ExportWorker, ManualExporter};
use super::*;
use crate::checkpoint::sink::{CheckpointSink, SinkEnd, SinkError};
use crate::checkpoint::{Checkpoint, DiskRegion, MachineState, Manifest, StorageMode};
use crate::dirty::{DirtySet, HostCosts, HotConfig, HotPages, Protect, StagedPages, PAGE_SIZE};
use crate::memory::GuestMemory;
use crate::vm_state::VmState;

const PAGES: usize = 16;

/// Drops the highest page of a dirty set (the `lose_a_page` sabotage).
pub(super) fn drop_highest(set: &mut DirtySet) {
    for (_, words) in set.regions.iter_mut().rev() {
        for w in words.iter_mut().rev() {
            if *w != 0 {
                *w &= !(1u64 << (63 - w.leading_zeros()));
                return;
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SinkMode {
    Ok,
    Failing,
    Lost,
    LoseBaseOnce,
}

/// Everything the fakes share, and what they saw.
struct World {
    mem: GuestMemory,
    paused: bool,
    // The fake KVM dirty log, per page: in the log; writable (not write-protected).
    logged: Vec<bool>,
    writable: Vec<bool>,
    // A guest write that lands during the next dirty-log operation made while the
    // vCPUs run (or at the end of the step).
    race: Option<(usize, u64)>,
    // Disks: frozen regions (at most one with two slots), region-full signal.
    frozen: Vec<u64>,
    region_full: bool,
    fail_next_save: bool,
    // The sink.
    sink_mode: SinkMode,
    image: Option<Vec<Vec<u8>>>,
    complete: Vec<u64>,
    rebased: Vec<u64>,
    lost: bool,
    // Set by the test.
    fenced: bool,
    failed: bool,
    in_final: bool,
    violations: Vec<String>,
}

type Shared = Arc<Mutex<World>>;

fn w(s: &Shared) -> std::sync::MutexGuard<'_, World> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

impl World {
    fn violate(&mut self, what: String) {
        self.violations.push(what);
    }

    fn page(&self, p: usize) -> Vec<u8> {
        let mut b = vec![0u8; PAGE_SIZE];
        self.mem
            .read_slice(&mut b, GuestAddress((p * PAGE_SIZE) as u64))
            .expect("fake memory");
        b
    }

    fn dirty(&self, p: usize) -> bool {
        self.logged[p]
    }

    /// A guest write: a write-protected page faults into the fake KVM, which logs
    /// it and makes it writable; a writable page is written silently.
    fn guest_write(&mut self, page: usize, value: u64) -> Result<(), String> {
        let addr = GuestAddress((page * PAGE_SIZE + 8) as u64);
        self.mem.write_obj(value, addr).map_err(|e| e.to_string())?;
        if !self.writable[page] {
            self.logged[page] = true;
            self.writable[page] = true;
        }
        Ok(())
    }

    /// The racing write, if one is pending and the vCPUs run.
    fn land_race(&mut self) {
        if self.paused {
            return;
        }
        if let Some((page, value)) = self.race.take() {
            if let Err(e) = self.guest_write(page, value) {
                self.violate(e);
            }
        }
    }
}

struct FakeVcpus(Shared);
impl Vcpus for FakeVcpus {
    fn pause(&mut self) -> Result<(), PauseError> {
        w(&self.0).paused = true;
        Ok(())
    }
    fn resume(&mut self) {
        w(&self.0).paused = false;
    }
}

struct FakeDirty {
    world: Shared,
    hot: HotPages,
}
impl FakeDirty {
    fn new(world: Shared) -> Self {
        let config = HotConfig {
            policy: Protect::Hot,
            costs: HostCosts {
                fault_ns: 20_000,
                copy_ns: 1_000,
                export_ns: 0,
            },
            fault_from: crate::dirty::FaultFrom::Environment,
            // Four hot pages at most, of the model's sixteen.
            budget: Duration::from_micros(4),
        };
        FakeDirty {
            world,
            hot: HotPages::new(&[PAGES], config),
        }
    }
}
impl DirtyLog for FakeDirty {
    fn read(&mut self) -> Result<DirtySet, CutError> {
        let mut s = w(&self.world);
        if s.failed {
            s.violate("a cut harvested the dirty log after a failed cut".into());
        }
        // The VMM makes no writes of its own here: vm-memory's bitmap is not used.
        let r = s.mem.iter().next().expect("one region");
        let _ = vm_memory::mmap::MmapRegion::bitmap(r).get_and_reset();
        let mut words = vec![0u64; PAGES.div_ceil(64)];
        for (p, l) in s.logged.iter().enumerate() {
            if *l {
                words[p / 64] |= 1 << (p % 64);
            }
        }
        Ok(DirtySet {
            regions: vec![(0, words)],
        })
    }
    fn protect(&mut self, set: &DirtySet, how: Protect) -> Result<u64, CutError> {
        let chosen = self.hot.choose(set, how);
        let mut s = w(&self.world);
        // A vCPU that runs may write while the log is being cleared.
        s.land_race();
        for a in chosen.pages() {
            let p = crate::arch::to_usize(a) / PAGE_SIZE;
            s.logged[p] = false;
            s.writable[p] = false;
        }
        Ok(self.hot.hot() as u64)
    }
    fn copy(&mut self, set: &DirtySet, into: &mut StagedPages) -> Result<(), CutError> {
        let mem = w(&self.world).mem.clone();
        into.copy_from(&mem, set)
            .map_err(|e| CutError::PageCopy(Box::new(e)))
    }
}

struct FakeState(Shared);
impl StateCapture for FakeState {
    fn drain(&mut self) {}
    fn save(&mut self) -> Result<MachineState, CutError> {
        let mut s = w(&self.0);
        if std::mem::take(&mut s.fail_next_save) {
            // The log was harvested (cleared) already: this run can never again
            // cut a complete checkpoint.
            s.failed = true;
            return Err(CutError::Devices("injected save failure".into()));
        }
        Ok(MachineState {
            vcpus: vec![],
            vm: VmState::default(),
            devices: vec![],
        })
    }
}

struct FakeDisks(Shared);
impl DiskCut for FakeDisks {
    fn start_checkpoint(&mut self, epoch: u64) -> Result<u64, CutError> {
        let mut s = w(&self.0);
        if s.failed {
            s.violate(format!("region swap {epoch} after a failed cut"));
        }
        if !s.paused && !s.lost {
            s.violate(format!("region swap {epoch} with the vCPUs running"));
        }
        if !s.frozen.is_empty() {
            let frozen = s.frozen.clone();
            s.violate(format!(
                "region swap {epoch} with no free slot: {frozen:?} not retired (two checkpoints in flight)"
            ));
        }
        s.frozen.push(epoch);
        s.region_full = false;
        Ok(0)
    }
    fn wants_cut(&self) -> bool {
        w(&self.0).region_full
    }
}

impl DiskCommit for FakeDisks {
    fn seal(&mut self, epoch: u64, _mode: StorageMode) -> Result<Vec<DiskRegion>, Cause> {
        let s = w(&self.0);
        if !s.frozen.contains(&epoch) {
            return Err(format!("seal {epoch}: not frozen").into());
        }
        Ok(vec![])
    }
    fn retire(&mut self, epoch: u64) -> Result<(), Cause> {
        let mut s = w(&self.0);
        if s.fenced {
            s.violate(format!("retired {epoch} while fenced"));
        }
        if !s.complete.contains(&epoch) && !s.lost && !s.rebased.contains(&epoch) {
            s.violate(format!("retired {epoch} before the sink completed it"));
        }
        s.frozen.retain(|e| *e != epoch);
        Ok(())
    }
    fn retire_all(&mut self) -> Result<(), Cause> {
        let mut s = w(&self.0);
        if !s.lost {
            s.violate("retired every region locally while protected".into());
        }
        if s.fenced {
            s.violate("retired every region while fenced".into());
        }
        s.frozen.clear();
        Ok(())
    }
}

struct FakeOutput(Shared);
impl Output for FakeOutput {
    fn seal(&mut self, _epoch: u64) -> crate::checkpoint::Console {
        crate::checkpoint::Console::default()
    }
    fn release(&mut self, epoch: u64) {
        let mut s = w(&self.0);
        if s.fenced {
            s.violate(format!("released output {epoch} while fenced"));
        }
        if !s.complete.contains(&epoch) && !s.lost {
            s.violate(format!(
                "released output {epoch} before the sink completed it"
            ));
        }
    }
    fn hold(&mut self) {}
    fn release_all(&mut self) {
        let mut s = w(&self.0);
        if s.fenced {
            s.violate("released all output while fenced".into());
        }
        if !s.lost {
            s.violate("released all output while protected".into());
        }
    }
}

struct FakeSink(Shared);
impl FakeSink {
    fn mode(&self) -> Result<(), SinkError> {
        self.mode_for(None)
    }

    fn mode_for(&self, epoch: Option<u64>) -> Result<(), SinkError> {
        let mut s = w(&self.0);
        match s.sink_mode {
            SinkMode::Ok => Ok(()),
            SinkMode::Failing => Err(SinkError::Failed("injected sink failure".into())),
            SinkMode::Lost => {
                s.lost = true;
                Err(SinkError::Lost("injected: the peer is gone".into()))
            }
            SinkMode::LoseBaseOnce => {
                s.sink_mode = SinkMode::Ok;
                s.image = None;
                // The checkpoint under way may retire: the new base carries it.
                s.rebased.extend(epoch);
                Err(SinkError::BaseLost)
            }
        }
    }
}
impl CheckpointSink for FakeSink {
    fn storage(&self) -> StorageMode {
        StorageMode::Shared
    }
    fn begin(&mut self, _m: &Manifest) -> Result<(), SinkError> {
        self.mode()
    }
    fn write_base(
        &mut self,
        mem: &GuestMemory,
        _epoch: u64,
        _delta: Option<&crate::checkpoint::BaseDelta>,
    ) -> Result<u64, SinkError> {
        self.mode()?;
        let mut image = Vec::with_capacity(PAGES);
        for p in 0..PAGES {
            let mut b = vec![0u8; PAGE_SIZE];
            mem.read_slice(&mut b, GuestAddress((p * PAGE_SIZE) as u64))
                .map_err(|e| SinkError::Failed(Box::new(e)))?;
            image.push(b);
        }
        w(&self.0).image = Some(image);
        Ok((PAGES * PAGE_SIZE) as u64)
    }
    fn write_base_pages(&mut self, pages: &StagedPages, _epoch: u64) -> Result<u64, SinkError> {
        self.mode()?;
        let mut s = w(&self.0);
        let Some(image) = s.image.as_mut() else {
            return Err(SinkError::BaseLost);
        };
        for (a, page) in pages.addrs.iter().zip(pages.data.chunks_exact(PAGE_SIZE)) {
            image[crate::arch::to_usize(*a) / PAGE_SIZE] = page.to_vec();
        }
        Ok(pages.data.len() as u64)
    }
    fn write(&mut self, c: &Checkpoint) -> Result<u64, SinkError> {
        self.mode_for(Some(c.epoch))?;
        let mut s = w(&self.0);
        let Some(image) = s.image.as_mut() else {
            s.rebased.push(c.epoch);
            return Err(SinkError::BaseLost);
        };
        for (a, page) in c
            .pages
            .addrs
            .iter()
            .zip(c.pages.data.chunks_exact(PAGE_SIZE))
        {
            image[crate::arch::to_usize(*a) / PAGE_SIZE] = page.to_vec();
        }
        s.complete.push(c.epoch);
        Ok(c.pages.data.len() as u64)
    }
    fn end(&mut self, _how: &SinkEnd) -> Result<(), SinkError> {
        Ok(())
    }
}

/// The manual exporter, shared with the test so it can step it and look inside.
#[derive(Clone)]
struct SharedExporter(Arc<Mutex<ManualExporter>>);
impl ExportQueue for SharedExporter {
    fn submit(&mut self, job: Job) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).submit(job)
    }
    fn try_next(&mut self) -> Option<ExportEvent> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).try_next()
    }
    fn wait(&mut self, d: std::time::Instant) -> Option<ExportEvent> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).wait(d)
    }
    fn stop(&mut self) -> Option<Box<dyn CheckpointSink>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).stop()
    }
}

#[derive(Debug, Clone)]
enum Step {
    Write {
        page: usize,
        value: u64,
    },
    /// A timer tick (`tick`) or an exporter step, with a guest write that lands in
    /// the middle of the first dirty-log operation the engine makes meanwhile while
    /// the vCPUs run (else at the end of the step).
    Race {
        page: usize,
        value: u64,
        tick: bool,
    },
    Tick,
    RegionFull,
    Export,
    Sink(SinkMode),
    FailNextSave,
    Fence,
    /// An API request: cut now (or after the one in flight) and report completion.
    RequestCut,
}

/// What cut requests were answered: (epoch asked for, the answer).
type Answers = Arc<Mutex<Vec<(u64, Result<u64, super::CutRefused>)>>>;

#[derive(Debug, Clone, Copy)]
enum End {
    UserStop,
    GuestStop,
    Crash,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0..PAGES, any::<u64>()).prop_map(|(page, value)| Step::Write { page, value }),
        3 => (0..PAGES, any::<u64>(), any::<bool>())
            .prop_map(|(page, value, tick)| Step::Race { page, value, tick }),
        4 => Just(Step::Tick),
        1 => Just(Step::RegionFull),
        6 => Just(Step::Export),
        1 => Just(Step::Sink(SinkMode::Failing)),
        2 => Just(Step::Sink(SinkMode::Ok)),
        1 => Just(Step::Sink(SinkMode::Lost)),
        1 => Just(Step::Sink(SinkMode::LoseBaseOnce)),
        1 => Just(Step::FailNextSave),
        1 => Just(Step::Fence),
        1 => Just(Step::RequestCut),
    ]
}

fn end() -> impl Strategy<Value = End> {
    prop_oneof![Just(End::UserStop), Just(End::GuestStop), Just(End::Crash)]
}

/// A cut request is answered complete only once the sink holds that checkpoint (or
/// a later one), and refused only once no checkpoint can complete any more.
fn check_answers(world: &Shared, answers: &Answers) {
    let mut s = w(world);
    for (asked, r) in answers.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        match r {
            Ok(e) if e != asked || !s.complete.iter().any(|c| c >= e) => {
                let v =
                    format!("cut request {asked} answered complete ({e}) before the sink held it");
                s.violate(v);
            }
            Err(why) if !(s.failed || s.lost || s.fenced) => {
                let v = format!("cut request {asked} refused ({why}) while checkpoints go on");
                s.violate(v);
            }
            _ => {}
        }
    }
}

/// Checks the invariants that hold between steps.
fn check(world: &Shared, engine: &EpochEngine, exporter: &SharedExporter) {
    let mut s = w(world);
    if s.paused && !s.in_final {
        s.violate("the vCPUs were left paused outside a cut".into());
    }
    let phase = engine.phase();
    if phase == Phase::Failed {
        s.failed = true;
    }
    let x = exporter.0.lock().unwrap_or_else(|e| e.into_inner());
    let checkpoints: Vec<&Checkpoint> = x
        .queue
        .iter()
        .filter_map(|j| match j {
            Job::Checkpoint { checkpoint, .. } => Some(checkpoint),
            _ => None,
        })
        .collect();
    if checkpoints.len() > 1 {
        s.violate(format!("{} checkpoints in flight", checkpoints.len()));
    }
    if let Some(p) = (0..PAGES).find(|&p| s.writable[p] && !s.logged[p]) {
        s.violate(format!(
            "page {p} is writable but not in the dirty log: its next write would be lost"
        ));
    }
    if s.failed || s.lost || s.fenced {
        return;
    }
    let base_pending = x.queue.iter().any(|j| matches!(j, Job::Base { .. }));
    // A pre-copy round still queued copies its pages from memory when it runs:
    // they were re-protected before it was queued, so it will send what they hold.
    let round_pending = |p: usize| {
        x.queue.iter().any(|j| match j {
            Job::BaseRound { set, .. } => set.pages().any(|a| a == (p * PAGE_SIZE) as u64),
            _ => false,
        })
    };
    for p in 0..PAGES {
        if s.dirty(p) || base_pending || round_pending(p) {
            continue;
        }
        let now = s.page(p);
        let gpa = (p * PAGE_SIZE) as u64;
        let travelling = checkpoints.iter().rev().find_map(|c| {
            c.pages
                .addrs
                .iter()
                .position(|a| *a == gpa)
                .map(|i| c.pages.data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE].to_vec())
        });
        let held = travelling.or_else(|| s.image.as_ref().map(|img| img[p].clone()));
        if held.as_deref() != Some(now.as_slice()) {
            s.violate(format!(
                "page {p} was written, is no longer in the dirty log, and its value differs from memory at the sink and in what travels (phase {phase:?})"
            ));
            return;
        }
    }
}

fn run_model(steps: &[Step], end: End, sabotage: Sabotage) -> Result<(), String> {
    run_model_with_rounds(steps, end, sabotage, 0)
}

/// [`run_model`] with an iterative pre-copy of at most `rounds` rounds.
fn run_model_with_rounds(
    steps: &[Step],
    end: End,
    sabotage: Sabotage,
    rounds: u32,
) -> Result<(), String> {
    run_model_paced(steps, end, sabotage, rounds, EpochLength::default()).map(|_| ())
}

/// A metrics file the test reads back.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The lengths `setting` allows.
fn allowed(setting: EpochLength) -> (Duration, Duration) {
    match setting {
        EpochLength::Fixed(d) => (d, d),
        EpochLength::Auto { min, max } => (min, max),
    }
}

/// Invariant 8: every epoch length the engine runs at, asks its timer for, or
/// reports in its metrics lies within the setting's bounds (is the fixed length).
fn check_length(world: &Shared, engine: &mut EpochEngine, setting: EpochLength) {
    let (lo, hi) = allowed(setting);
    let mut bad = Vec::new();
    if !(lo..=hi).contains(&engine.epoch_length()) {
        bad.push(engine.epoch_length());
    }
    if let Some((len, _)) = engine.take_new_length() {
        if !(lo..=hi).contains(&len) {
            bad.push(len);
        }
    }
    for len in bad {
        w(world).violate(format!("epoch length {len:?} outside {lo:?}..={hi:?}"));
    }
}

/// [`run_model_with_rounds`] with an epoch length setting; returns the length in
/// force at the end.
fn run_model_paced(
    steps: &[Step],
    end: End,
    sabotage: Sabotage,
    rounds: u32,
    setting: EpochLength,
) -> Result<Duration, String> {
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), PAGES * PAGE_SIZE)])
        .map_err(|e| e.to_string())?;
    let world: Shared = Arc::new(Mutex::new(World {
        mem: mem.clone(),
        paused: false,
        logged: vec![false; PAGES],
        writable: vec![false; PAGES],
        race: None,
        frozen: vec![],
        region_full: false,
        fail_next_save: false,
        sink_mode: SinkMode::Ok,
        image: None,
        complete: vec![],
        rebased: vec![],
        lost: false,
        fenced: false,
        failed: false,
        in_final: false,
        violations: vec![],
    }));
    let worker = ExportWorker::new(
        Box::new(FakeSink(world.clone())),
        Box::new(FakeDisks(world.clone())),
    );
    let exporter = SharedExporter(Arc::new(Mutex::new(ManualExporter::new(worker))));
    let parts = Parts {
        vcpus: Box::new(FakeVcpus(world.clone())),
        dirty: Box::new(FakeDirty::new(world.clone())),
        state: Box::new(FakeState(world.clone())),
        disks: Box::new(FakeDisks(world.clone())),
        output: Box::new(FakeOutput(world.clone())),
    };
    let lines = Lines::default();
    let mut engine = EpochEngine::new(
        parts,
        Box::new(exporter.clone()),
        mem.clone(),
        1,
        Some(Box::new(lines.clone())),
    );
    engine.sabotage = sabotage;
    engine.set_precopy_rounds(rounds);
    engine.set_epoch_length(setting);
    let manifest = Manifest {
        memory: (PAGES * PAGE_SIZE) as u64,
        cpus: 1,
        cmdline: String::new(),
        disks: vec![],
        cpu: Default::default(),
    };
    engine.start(manifest).map_err(|e| e.to_string())?;
    let answers: Answers = Arc::default();
    for st in steps {
        let r = match st {
            Step::Write { page, value } => {
                let mut s = w(&world);
                if !s.paused {
                    s.guest_write(*page, *value)?;
                }
                Ok(())
            }
            Step::Race { page, value, tick } => {
                w(&world).race = Some((*page, *value));
                if *tick {
                    engine.on_tick()
                } else {
                    exporter.0.lock().unwrap_or_else(|e| e.into_inner()).step();
                    engine.on_exporter()
                }
            }
            Step::Tick => engine.on_tick(),
            Step::RegionFull => {
                w(&world).region_full = true;
                engine.on_region_full()
            }
            Step::Export => {
                exporter.0.lock().unwrap_or_else(|e| e.into_inner()).step();
                engine.on_exporter()
            }
            Step::Sink(mode) => {
                let mut s = w(&world);
                if !s.lost {
                    s.sink_mode = *mode;
                }
                Ok(())
            }
            Step::FailNextSave => {
                w(&world).fail_next_save = true;
                Ok(())
            }
            Step::Fence => {
                w(&world).fenced = true;
                engine.on_fenced();
                Ok(())
            }
            Step::RequestCut => match engine.request_cut() {
                Ok(Ok(epoch)) => {
                    let a = answers.clone();
                    engine.on_complete(
                        epoch,
                        Box::new(move |r| {
                            a.lock().unwrap_or_else(|e| e.into_inner()).push((epoch, r))
                        }),
                    );
                    Ok(())
                }
                Ok(Err(_)) => Ok(()),
                Err(e) => Err(e),
            },
        };
        engine.settle_waiters();
        // A racing write no operation met lands now, as a plain write.
        w(&world).land_race();
        w(&world).race = None;
        // Engine errors end the real run; the model goes on to check that nothing
        // more happens that should not.
        let _ = r;
        check(&world, &engine, &exporter);
        check_answers(&world, &answers);
        check_length(&world, &mut engine, setting);
    }
    match end {
        End::Crash => {}
        End::GuestStop => {
            engine.shutdown(Duration::from_millis(10));
            check(&world, &engine, &exporter);
        }
        End::UserStop => {
            w(&world).in_final = true;
            let r = engine.finish(Duration::from_millis(10));
            let s = w(&world);
            if let Ok(epoch) = r {
                if !s.complete.contains(&epoch) {
                    return Err(format!(
                        "final checkpoint {epoch} reported written but the sink lacks it"
                    ));
                }
                let img = s
                    .image
                    .as_ref()
                    .ok_or("final checkpoint without a sink image")?;
                for (p, held) in img.iter().enumerate() {
                    if *held != s.page(p) {
                        return Err(format!(
                            "after the final checkpoint {epoch}, page {p} at the sink differs from memory"
                        ));
                    }
                }
            }
        }
    }
    let (lo, hi) = allowed(setting);
    let text = lines.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for line in String::from_utf8_lossy(&text).lines() {
        let m: EpochMetrics = serde_json::from_str(line).map_err(|e| e.to_string())?;
        let target = Duration::from_micros(m.target_us);
        if !m.unprotected && !(lo..=hi).contains(&target) {
            return Err(format!(
                "checkpoint {} reports epoch length {target:?} outside {lo:?}..={hi:?}",
                m.epoch
            ));
        }
    }
    let v = &w(&world).violations;
    if v.is_empty() {
        Ok(engine.epoch_length())
    } else {
        Err(v.join("; "))
    }
}

fn runner(cases: u32) -> TestRunner {
    TestRunner::new_with_rng(
        Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        },
        proptest::test_runner::TestRng::deterministic_rng(
            proptest::test_runner::RngAlgorithm::ChaCha,
        ),
    )
}

fn strategy() -> impl Strategy<Value = (Vec<Step>, End)> {
    (proptest::collection::vec(step(), 0..80), end())
}

/// Fixed lengths, and automatic ones within random bounds.
fn setting() -> impl Strategy<Value = EpochLength> {
    prop_oneof![
        (1u64..200).prop_map(|ms| EpochLength::Fixed(Duration::from_millis(ms))),
        (1u64..30, 0u64..200).prop_map(|(min, extra)| EpochLength::Auto {
            min: Duration::from_millis(min),
            max: Duration::from_millis(min + extra),
        }),
    ]
}

proptest! {
    #![proptest_config(Config { cases: 512, failure_persistence: None, ..Config::default() })]

    #[test]
    fn the_engine_keeps_its_invariants((steps, end) in strategy(), rounds in 0u32..4) {
        if let Err(e) = run_model_with_rounds(&steps, end, Sabotage::default(), rounds) {
            prop_assert!(false, "{}", e);
        }
    }

    #[test]
    fn the_engine_keeps_its_invariants_at_any_epoch_length(
        (steps, end) in strategy(),
        setting in setting(),
    ) {
        if let Err(e) = run_model_paced(&steps, end, Sabotage::default(), 0, setting) {
            prop_assert!(false, "{}", e);
        }
    }
}

/// The base's exports, then `n` epochs of one write, a tick and the exports that
/// land its checkpoint.
fn quiet_steps(n: usize) -> Vec<Step> {
    let mut steps = vec![Step::Export, Step::Export, Step::Export];
    for i in 0..n {
        steps.push(Step::Write {
            page: i % PAGES,
            value: i as u64 + 1,
        });
        steps.extend([Step::Tick, Step::Export, Step::Export, Step::Export]);
    }
    steps
}

/// Auto mode's lengths change in the model (its epochs last microseconds, so the
/// engine shortens them to the lower bound) and every invariant still holds.
#[test]
fn auto_mode_moves_the_length_and_keeps_the_invariants() {
    let setting = EpochLength::Auto {
        min: Duration::from_millis(2),
        max: Duration::from_millis(40),
    };
    let steps = quiet_steps(12);
    let last = run_model_paced(&steps, End::UserStop, Sabotage::default(), 0, setting).unwrap();
    assert_eq!(last, Duration::from_millis(2));
}

#[test]
fn a_quiet_run_completes_checkpoints_and_a_user_stop_lands_exactly() {
    let steps = quiet_steps(10);
    run_model(&steps, End::UserStop, Sabotage::default()).unwrap();
}

/// Each sabotage breaks one invariant; the model test must notice.
#[test]
fn each_invariant_can_fail() {
    let cases: [(&str, Sabotage, &str); 8] = [
        (
            "lose a page",
            Sabotage {
                lose_a_page: true,
                ..Default::default()
            },
            "from memory",
        ),
        (
            "two in flight",
            Sabotage {
                two_in_flight: true,
                ..Default::default()
            },
            "in flight",
        ),
        (
            "retire early",
            Sabotage {
                retire_early: true,
                ..Default::default()
            },
            "before the sink completed it",
        ),
        (
            "release early",
            Sabotage {
                release_early: true,
                ..Default::default()
            },
            "released output",
        ),
        (
            "release when fenced",
            Sabotage {
                release_when_fenced: true,
                ..Default::default()
            },
            "while fenced",
        ),
        (
            "cut after failure",
            Sabotage {
                cut_after_failure: true,
                ..Default::default()
            },
            "after a failed cut",
        ),
        (
            "stay paused",
            Sabotage {
                stay_paused: true,
                ..Default::default()
            },
            "left paused",
        ),
        (
            "re-protect after resume",
            Sabotage {
                protect_after_resume: true,
                ..Default::default()
            },
            "from memory",
        ),
    ];
    for (name, sabotage, needle) in cases {
        let result = runner(2000).run(&strategy(), |(steps, end)| {
            run_model(&steps, end, sabotage).map_err(TestCaseError::fail)
        });
        match result {
            Err(TestError::Fail(why, _)) => assert!(
                why.message().contains(needle),
                "sabotage '{name}' was caught, but not by the invariant it breaks: {why}"
            ),
            other => panic!("sabotage '{name}' went unnoticed: {other:?}"),
        }
    }
}
