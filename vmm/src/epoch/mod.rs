//! The epoch engine on the primary: one state machine that cuts checkpoints, hands
//! them to the exporter, releases held output and retires disk regions when they are
//! complete, and decides how a run ends.
//!
//! ```text
//!            start
//!              │  harvest (clears the logs), Begin(manifest), Base(memory)
//!              ▼
//!          PreCopy ── base written ──▶ cut (full) ─┐
//!              ▲                                   ▼
//!              │ BaseLost          tick   ┌──── Exporting{N} ──── tick / region full ───▶ CutPostponed{N}
//!              │                  ┌──────▶│   written: release output ≤ N, Retire(N)          │
//!            (any)              Idle      │   retired ──▶ Idle                    retired ──▶ cut N+1
//!                                 ▲       └────────────────┘                                  │
//!                                 └───────────────────────────────────────────────────────────┘
//!
//!   sink Lost ──▶ Unprotected   (output released, every region retired locally, ticks swap regions only)
//!   fence lost ─▶ Fenced        (nothing released or retired any more, no cut)
//!   a cut or a disk commit fails ─▶ Failed (no cut any more: a failed cut may have cleared dirty logs)
//!   stop ──▶ Closing            (the checkpoint in flight lands; a user stop cuts one final checkpoint)
//! ```
//!
//! A cut (`cut.rs`), all inside one pause of every vCPU: drain the devices' pending
//! notifications; harvest the dirty set; copy the dirty pages to a staging buffer;
//! save devices, vCPUs and VM; swap the disks' regions; seal the epoch's console
//! output; resume. The staged checkpoint then travels to the sink on the exporter
//! thread (`exporter.rs`) while the guest runs epoch N+1. Only one checkpoint is in
//! flight: until checkpoint N is at the sink and its disk regions are retired, cut
//! N+1 is postponed and the guest keeps running. A failed export is retried with
//! backoff, never dropped.
//!
//! The engine drives the machine only through small traits (`parts.rs`: [`Vcpus`],
//! [`DirtyLog`], [`StateCapture`], [`DiskCut`], [`Output`], [`DiskCommit`]; and
//! [`ExportQueue`]), so `model_test.rs` drives it with fakes and checks its invariants
//! after every step, without KVM. The machine's implementations live in
//! `machine/adapters.rs`. Its errors are in `error.rs`; `event_loop.rs` puts it on the
//! device event loop.
//!
//! How a run ends (final checkpoint, releasing output, retiring disks, marking the
//! sink) is decided in `ending.rs`.

mod cut;
pub mod ending;
mod error;
mod event_loop;
pub mod exporter;
pub mod length;
pub mod metrics;
#[cfg(test)]
mod model_test;
mod parts;

use std::io::Write;
use std::time::{Duration, Instant};

use devices::ErrorChain;

use crate::checkpoint::sink::BaseDelta;
use crate::checkpoint::{CheckpointSink, Manifest, ReplicaId};
use crate::dirty::{DirtySet, StagedPages, PAGE_SIZE};
use crate::memory::GuestMemory;
use crate::telemetry::Telemetry;

pub use error::{Cause, CutError, EpochError, PauseError};
pub use event_loop::EpochLoop;
pub use exporter::{ExportEvent, ExportQueue, Job, LostDuring, NoSink};
pub use length::{EpochLength, LengthError, Pacer};
pub use metrics::EpochMetrics;
pub use parts::{DirtyLog, DiskCommit, DiskCut, Output, Parts, StateCapture, Vcpus};

/// How long a vCPU may take to park before the cut gives up on it.
pub const PARK_DEADLINE: Duration = Duration::from_secs(3);

/// Where the engine is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// All of memory is travelling to the sink as its base while the guest runs;
    /// nothing is complete yet. The first cut after it (`first`) completes the base.
    PreCopy {
        /// The checkpoint that will complete the base.
        first: u64,
    },
    /// No checkpoint in flight: the next tick cuts.
    Idle,
    /// Checkpoint `epoch` is travelling to the sink, or retiring its disk regions
    /// once the sink has it ([`EpochEngine::last_complete`] tells which).
    Exporting {
        /// The checkpoint.
        epoch: u64,
    },
    /// A tick or a full region came while checkpoint `epoch` was in flight: cut as
    /// soon as it is done. The guest keeps running meanwhile.
    CutPostponed {
        /// The checkpoint in flight.
        epoch: u64,
    },
    /// The run is ending: no cut but the final one; `in_flight` lands first.
    Closing {
        /// A checkpoint still in flight.
        in_flight: Option<u64>,
        /// A base is travelling (the sink lost its own): the final checkpoint must
        /// complete it.
        rebasing: bool,
    },
    /// A cut or a disk commit failed: no further cut in this run.
    Failed,
    /// The sink is lost: held output was released, regions retire locally, ticks
    /// only swap disk regions. `since`: the last checkpoint the sink completed.
    Unprotected {
        /// The last complete checkpoint, if any.
        since: Option<u64>,
    },
    /// Another host holds the right to run: nothing more is released or retired,
    /// and no checkpoint is cut.
    Fenced,
}

impl Phase {
    /// A short name for status reports (`precopy`, `idle`, `exporting`, …).
    pub fn name(&self) -> &'static str {
        match self {
            Phase::PreCopy { .. } => "precopy",
            Phase::Idle => "idle",
            Phase::Exporting { .. } => "exporting",
            Phase::CutPostponed { .. } => "cut_postponed",
            Phase::Closing { .. } => "closing",
            Phase::Failed => "failed",
            Phase::Unprotected { .. } => "unprotected",
            Phase::Fenced => "fenced",
        }
    }

    /// The checkpoint in flight, if any.
    pub fn in_flight(&self) -> Option<u64> {
        match *self {
            Phase::Exporting { epoch } | Phase::CutPostponed { epoch } => Some(epoch),
            Phase::Closing { in_flight, .. } => in_flight,
            _ => None,
        }
    }
}

/// Deliberate faults, to show that the model test catches each broken invariant.
#[cfg(test)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Sabotage {
    /// Drop the highest dirty page from each harvest.
    pub lose_a_page: bool,
    /// Cut on a tick even while a checkpoint is in flight.
    pub two_in_flight: bool,
    /// Retire a checkpoint's regions as soon as it is cut.
    pub retire_early: bool,
    /// Release a checkpoint's output as soon as it is cut.
    pub release_early: bool,
    /// Release held output when fenced.
    pub release_when_fenced: bool,
    /// Forget that a cut failed.
    pub cut_after_failure: bool,
    /// Leave the vCPUs parked after a cut.
    pub stay_paused: bool,
    /// Copy the dirty pages and resume the vCPUs before re-protecting them.
    pub protect_after_resume: bool,
}

/// The engine. Call its `on_*` methods from the device loop ([`EpochLoop`] does).
pub struct EpochEngine {
    parts: Parts,
    exporter: Box<dyn ExportQueue>,
    mem: GuestMemory,
    phase: Phase,
    next_epoch: u64,
    spare: StagedPages,
    in_flight: Option<EpochMetrics>,
    last_complete: Option<u64>,
    local_retire_pending: bool,
    need_full: bool,
    metrics: Option<Box<dyn Write + Send>>,
    /// The Prometheus registry, fed from the same records as `metrics`.
    telemetry: Option<Telemetry>,
    /// When the engine was made: the origin of `EpochMetrics::at_ms`.
    started: Instant,
    /// When the newest complete checkpoint ended its pause.
    complete_cut_at: Option<Instant>,
    /// Most pre-copy rounds after the first full pass (0: cut right after it).
    max_rounds: u32,
    /// Rounds sent in the pre-copy under way, the size of the last, and whether the
    /// round in flight is the last one.
    rounds: Rounds,
    /// The last cut of this run: the status reports it, the next cut's metrics
    /// measure its epoch from it, and its completion its ack lag.
    last_cut: Option<LastCut>,
    /// Who waits for a checkpoint to be complete (`on_complete`).
    waiters: Vec<(u64, CompletionWaiter)>,
    /// The manifest the sink began with: a standby that joins later gets it too.
    manifest: Option<Manifest>,
    /// This engine's lineage: its checkpoints are named `(lineage, epoch)`.
    lineage: u64,
    /// The newest checkpoint a sink completed (or the one the guest resumed from),
    /// by name: the point `pending` and `since_cut` count changes from.
    complete_id: Option<ReplicaId>,
    /// Pages written after `complete_id` up to the newest cut.
    pending: DirtySet,
    /// Pages harvested after the newest cut (pre-copy passes and rounds).
    since_cut: DirtySet,
    /// A standby that joined while regions were retiring locally: attached once
    /// they are.
    joining: Option<Box<dyn CheckpointSink>>,
    /// The epoch length, fixed or chosen from each complete checkpoint (`length.rs`).
    pacer: Pacer,
    /// The length changed since the event loop last asked (`take_new_length`).
    new_length: bool,
    /// The pages of the last checkpoint cut, to count those the next one rewrites.
    last_pages: Vec<u64>,
    #[cfg(test)]
    pub(crate) sabotage: Sabotage,
}

/// `d` in whole microseconds, as the metrics count.
fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// A cut: its checkpoint, when its pause began, and how long it lasted.
#[derive(Debug, Clone, Copy)]
struct LastCut {
    epoch: u64,
    began: Instant,
    pause: Duration,
}

/// Where an iterative pre-copy stands.
#[derive(Debug, Clone, Copy, Default)]
struct Rounds {
    sent: u32,
    last: Option<usize>,
    finishing: bool,
}

/// Told once a checkpoint is complete at the sink (its epoch), or why it never will
/// be.
pub type CompletionWaiter = Box<dyn FnOnce(Result<u64, CutRefused>) + Send>;

/// Why no checkpoint can be cut on request ([`EpochEngine::request_cut`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CutRefused {
    /// The initial copy is under way.
    #[error("the initial copy to the checkpoint sink is under way: no checkpoint can be cut before it ends")]
    PreCopy,
    /// The run is ending.
    #[error("the run is ending")]
    Closing,
    /// A cut or a disk commit failed.
    #[error("checkpointing failed in this run: no further checkpoint can be cut")]
    Failed,
    /// The sink is lost.
    #[error("no standby protects the guest (it was lost, or none has joined yet): it runs unprotected and no checkpoint is cut")]
    Unprotected,
    /// Another host holds the fence.
    #[error("another host holds the fence: this one cuts no checkpoint")]
    Fenced,
}

/// Where the engine stands, for a status report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineStatus {
    /// The phase.
    pub phase: Phase,
    /// The last checkpoint cut in this run.
    pub last_cut: Option<u64>,
    /// The last checkpoint complete at the sink in this run.
    pub last_complete: Option<u64>,
    /// The last cut's pause, µs.
    pub last_pause_us: Option<u64>,
    /// Bytes of the checkpoint in flight (pages and disk regions) until the sink
    /// has it.
    pub in_flight_bytes: u64,
}

/// Iterative pre-copy stops once a round has at most this many pages: the cut then
/// copies what is left within its pause.
pub const PRECOPY_SMALL: usize = 256;
/// Default most pre-copy rounds after the first full pass.
pub const PRECOPY_MAX_ROUNDS: u32 = 8;

impl EpochEngine {
    /// An engine that will cut checkpoint `first_epoch` first. Nothing happens until
    /// [`start`](Self::start).
    pub fn new(
        parts: Parts,
        exporter: Box<dyn ExportQueue>,
        mem: GuestMemory,
        first_epoch: u64,
        metrics: Option<Box<dyn Write + Send>>,
    ) -> Self {
        EpochEngine {
            parts,
            exporter,
            mem,
            phase: Phase::PreCopy { first: first_epoch },
            next_epoch: first_epoch,
            spare: StagedPages::default(),
            in_flight: None,
            last_complete: None,
            local_retire_pending: false,
            need_full: true,
            metrics,
            telemetry: None,
            started: Instant::now(),
            complete_cut_at: None,
            max_rounds: 0,
            rounds: Rounds::default(),
            last_cut: None,
            waiters: Vec::new(),
            manifest: None,
            lineage: 0,
            complete_id: None,
            pending: DirtySet::default(),
            since_cut: DirtySet::default(),
            joining: None,
            pacer: Pacer::new(EpochLength::default()),
            new_length: false,
            last_pages: Vec::new(),
            #[cfg(test)]
            sabotage: Sabotage::default(),
        }
    }

    /// Makes the pre-copy iterative, as live migration's is: after the full pass,
    /// rounds resend the pages the guest wrote meanwhile until the dirty set stops
    /// shrinking (or is small, or `max` rounds were sent); the first cut then copies
    /// only what is left. 0 (the default) cuts right after the full pass.
    pub fn set_precopy_rounds(&mut self, max: u32) {
        self.max_rounds = max;
    }

    /// Feeds `telemetry` (the `--metrics-addr` registry) from every record the
    /// engine writes to its metrics file, and from its retries and lag.
    pub fn set_telemetry(&mut self, telemetry: Telemetry) {
        self.telemetry = Some(telemetry);
    }

    /// Names this engine's checkpoints `(lineage, epoch)` ([`ReplicaId`]), so a
    /// standby that rejoins with a replica of one of them gets only what changed.
    pub fn set_lineage(&mut self, lineage: u64) {
        self.lineage = lineage;
    }

    /// Sets the epoch length: fixed, or chosen by the engine (`length.rs`). Call
    /// [`EpochEngine::set_page_cost`] after it.
    pub fn set_epoch_length(&mut self, setting: EpochLength) {
        self.pacer = Pacer::new(setting);
        self.new_length = true;
    }

    /// What a rewritten page costs the guest (its write-protection fault, as the
    /// start-up probe measured it), for the automatic epoch length.
    pub fn set_page_cost(&mut self, cost: Duration) {
        self.pacer.set_page_cost(cost);
    }

    /// The epoch length in force.
    pub fn epoch_length(&self) -> Duration {
        self.pacer.current()
    }

    /// The epoch length, if it changed since the last call; with how long ago the
    /// last cut's pause began (the next epoch is measured from it).
    pub fn take_new_length(&mut self) -> Option<(Duration, Option<Duration>)> {
        if !std::mem::take(&mut self.new_length) {
            return None;
        }
        Some((
            self.pacer.current(),
            self.last_cut.map(|c| c.began.elapsed()),
        ))
    }

    /// Where the engine is.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// When the pause of the last cut began (for a switchover's downtime: the final
    /// checkpoint's).
    pub fn last_cut_began(&self) -> Option<Instant> {
        self.last_cut.map(|c| c.began)
    }

    /// The last checkpoint the sink completed in this run.
    pub fn last_complete(&self) -> Option<u64> {
        self.last_complete
    }

    /// Where the engine stands.
    pub fn status(&self) -> EngineStatus {
        EngineStatus {
            phase: self.phase,
            last_cut: self.last_cut.map(|c| c.epoch),
            last_complete: self.last_complete,
            last_pause_us: self.last_cut.map(|c| us(c.pause)),
            in_flight_bytes: self.in_flight.as_ref().map_or(0, |m| {
                m.dirty_pages
                    .saturating_mul(PAGE_SIZE as u64)
                    .saturating_add(m.region_bytes)
            }),
        }
    }

    /// Cuts a checkpoint as soon as possible (an API request): now if none is in
    /// flight, else right after the one in flight, as a postponed tick does. Returns
    /// the epoch of that checkpoint.
    pub fn request_cut(&mut self) -> Result<Result<u64, CutRefused>, EpochError> {
        match self.phase {
            Phase::Idle => {
                let epoch = self.next_epoch;
                self.cut(true)?;
                Ok(Ok(epoch))
            }
            Phase::Exporting { epoch } | Phase::CutPostponed { epoch } => {
                self.phase = Phase::CutPostponed { epoch };
                Ok(Ok(self.next_epoch))
            }
            Phase::PreCopy { .. } => Ok(Err(CutRefused::PreCopy)),
            Phase::Closing { .. } => Ok(Err(CutRefused::Closing)),
            Phase::Failed => Ok(Err(CutRefused::Failed)),
            Phase::Unprotected { .. } => Ok(Err(CutRefused::Unprotected)),
            Phase::Fenced => Ok(Err(CutRefused::Fenced)),
        }
    }

    /// Calls `f` once checkpoint `epoch` (or a later one) is complete at the sink, or
    /// with the reason it never will be. Dropped unanswered if the run ends first.
    pub fn on_complete(&mut self, epoch: u64, f: CompletionWaiter) {
        self.waiters.push((epoch, f));
        self.settle_waiters();
    }

    /// Answers the waiters whose checkpoint is complete, or can no longer be.
    pub fn settle_waiters(&mut self) {
        if self.waiters.is_empty() {
            return;
        }
        let never = match self.phase {
            Phase::Failed => Some(CutRefused::Failed),
            Phase::Unprotected { .. } => Some(CutRefused::Unprotected),
            Phase::Fenced => Some(CutRefused::Fenced),
            _ => None,
        };
        for (epoch, f) in std::mem::take(&mut self.waiters) {
            if self.last_complete.is_some_and(|c| c >= epoch) {
                f(Ok(epoch));
            } else if let Some(why) = &never {
                f(Err(why.clone()));
            } else {
                self.waiters.push((epoch, f));
            }
        }
    }

    /// Starts checkpointing: the manifest goes to the sink, then the pre-copy. From
    /// here on the dirty logs record every write while the exporter copies all of
    /// memory as the guest runs; the first cut copies only what changed since.
    pub fn start(&mut self, manifest: Manifest) -> Result<(), EpochError> {
        self.manifest = Some(manifest.clone());
        self.exporter.submit(Job::Begin(manifest));
        self.start_precopy()
    }

    /// Starts without a sink (a primary waiting for a standby to join, or a standby
    /// that took over): unprotected, output flowing, disk writes retired locally at
    /// every tick, the dirty logs recording every write from here on. `resumed_from`
    /// names the checkpoint the guest was resumed from, if it was: a standby that
    /// joins holding that replica gets only the pages written since.
    pub fn start_unprotected(&mut self, manifest: Manifest, resumed_from: Option<ReplicaId>) {
        self.manifest = Some(manifest);
        self.complete_id = resumed_from;
        self.phase = Phase::Unprotected { since: None };
        self.parts.output.release_all();
        if let Some(t) = &self.telemetry {
            t.set_unprotected();
        }
    }

    /// A standby joined: while unprotected, the sink is replaced by `sink` and a
    /// pre-copy to it begins (once the local retire under way, if any, is done); it
    /// is sent only what changed if it holds a replica this engine can name.
    /// Otherwise (protected already, or ending) `sink` is handed back: the caller
    /// drops it, which closes its connections.
    #[allow(clippy::type_complexity)]
    pub fn attach(
        &mut self,
        sink: Box<dyn CheckpointSink>,
    ) -> Result<Result<(), Box<dyn CheckpointSink>>, EpochError> {
        if !matches!(self.phase, Phase::Unprotected { .. })
            || self.manifest.is_none()
            || self.joining.is_some()
        {
            return Ok(Err(sink));
        }
        self.joining = Some(sink);
        self.attach_joining()?;
        Ok(Ok(()))
    }

    /// Attaches the standby that joined, unless a local retire is still under way
    /// (the pre-copy reads the base images it writes).
    fn attach_joining(&mut self) -> Result<(), EpochError> {
        if self.local_retire_pending || !matches!(self.phase, Phase::Unprotected { .. }) {
            return Ok(());
        }
        let (Some(sink), Some(manifest)) = (self.joining.take(), self.manifest.clone()) else {
            return Ok(());
        };
        self.exporter.submit(Job::Attach(sink));
        self.exporter.submit(Job::Begin(manifest));
        // Output is held again from here: the first checkpoint releases it.
        self.parts.output.hold();
        self.start_precopy()
    }

    /// The pages written since a checkpoint a standby may hold, if this engine can
    /// name one.
    fn delta(&self) -> Option<BaseDelta> {
        let complete = self.complete_id?;
        let mut pages = self.pending.clone();
        pages.union(&self.since_cut);
        Some(BaseDelta {
            complete,
            lineage: self.lineage,
            newest: self.last_cut.map(|c| c.epoch),
            pages,
        })
    }

    fn start_precopy(&mut self) -> Result<(), EpochError> {
        let first = self.next_epoch;
        let set = self
            .parts
            .dirty
            .harvest()
            .map_err(|source| EpochError::Cut {
                epoch: first,
                source,
            })?;
        self.since_cut.union(&set);
        self.exporter.submit(Job::Base {
            epoch: first.saturating_sub(1),
            mem: self.mem.clone(),
            delta: self.delta(),
        });
        self.phase = Phase::PreCopy { first };
        self.in_flight = None;
        self.need_full = true;
        self.rounds = Rounds::default();
        Ok(())
    }

    /// A pre-copy pass or round landed: send another round of what the guest wrote
    /// meanwhile, or cut the checkpoint that completes the base.
    fn precopy_next(&mut self, first: u64) -> Result<(), EpochError> {
        if self.rounds.finishing || self.rounds.sent >= self.max_rounds {
            return self.cut(true);
        }
        // What the guest wrote during the last round (the harvest clears the logs:
        // these pages go out in the next round, whatever is decided).
        let set = self
            .parts
            .dirty
            .harvest()
            .map_err(|source| EpochError::Cut {
                epoch: first,
                source,
            })?;
        let n = set.count();
        let shrinking = self.rounds.last.is_none_or(|l| n * 10 < l * 9);
        self.rounds = Rounds {
            sent: self.rounds.sent + 1,
            last: Some(n),
            finishing: n <= PRECOPY_SMALL || !shrinking || self.rounds.sent + 1 >= self.max_rounds,
        };
        if self.rounds.finishing && n > PRECOPY_SMALL {
            // The copy cannot catch up with the guest: say so once, and stop trying.
            eprintln!(
                "mirrorvm: the pre-copy is not converging ({n} pages written during round {}, {}): the first checkpoint copies what is left in one pause",
                self.rounds.sent,
                if shrinking {
                    "the last round allowed"
                } else {
                    "not fewer than in the round before"
                }
            );
        }
        tracing::info!(
            "pre-copy round {}: {n} pages written during the last round{}",
            self.rounds.sent,
            if self.rounds.finishing {
                " (last round)"
            } else {
                ""
            }
        );
        self.since_cut.union(&set);
        self.exporter.submit(Job::BaseRound {
            epoch: first.saturating_sub(1),
            mem: self.mem.clone(),
            set,
        });
        Ok(())
    }

    /// The epoch timer fired.
    pub fn on_tick(&mut self) -> Result<(), EpochError> {
        if let Some(t) = &self.telemetry {
            t.set_lag(self.complete_cut_at.unwrap_or(self.started).elapsed());
        }
        match self.phase {
            Phase::Idle => self.cut(true),
            #[cfg(test)]
            Phase::Exporting { .. } if self.sabotage.two_in_flight => self.cut(true),
            Phase::Exporting { epoch } => {
                // Cut N+1 needs checkpoint N at the sink and its regions retired:
                // postpone, the guest runs on.
                self.phase = Phase::CutPostponed { epoch };
                Ok(())
            }
            Phase::Unprotected { .. } => self.local_swap(),
            Phase::PreCopy { .. }
            | Phase::CutPostponed { .. }
            | Phase::Closing { .. }
            | Phase::Failed
            | Phase::Fenced => Ok(()),
        }
    }

    /// A disk region passed its high-water mark or deferred a write: end the epoch
    /// now, or as soon as the checkpoint in flight is done. The signal may be stale
    /// (raised for a region already cut), so the disks are asked again.
    pub fn on_region_full(&mut self) -> Result<(), EpochError> {
        if !self.parts.disks.wants_cut() {
            return Ok(());
        }
        match self.phase {
            Phase::Idle => self.cut(true),
            Phase::Exporting { epoch } => {
                self.phase = Phase::CutPostponed { epoch };
                Ok(())
            }
            Phase::Unprotected { .. } => self.local_swap(),
            _ => Ok(()),
        }
    }

    /// Another host took the fence: from now on nothing is released, retired or cut.
    pub fn on_fenced(&mut self) {
        self.phase = Phase::Fenced;
        // Queued retires are dropped; nothing more reaches the sink.
        drop(self.exporter.stop());
        #[cfg(test)]
        if self.sabotage.release_when_fenced {
            self.parts.output.release_all();
        }
    }

    /// Handles every event the exporter has ready (the device loop calls this when
    /// the exporter's eventfd fires).
    pub fn on_exporter(&mut self) -> Result<(), EpochError> {
        while let Some(e) = self.exporter.try_next() {
            self.handle(e)?;
        }
        Ok(())
    }

    fn handle(&mut self, e: ExportEvent) -> Result<(), EpochError> {
        match e {
            ExportEvent::Begun | ExportEvent::Attached => Ok(()),
            ExportEvent::BaseWritten { epoch, bytes, us } => {
                if let Some(t) = &self.telemetry {
                    t.record_base(bytes);
                }
                tracing::info!(
                    "pre-copy of guest memory (base {epoch}): {bytes} bytes in {} ms",
                    us / 1000
                );
                match self.phase {
                    // Another round, or cut the checkpoint that completes the base.
                    Phase::PreCopy { first } => self.precopy_next(first),
                    Phase::Closing { in_flight, .. } => {
                        self.phase = Phase::Closing {
                            in_flight,
                            rebasing: false,
                        };
                        Ok(())
                    }
                    _ => Ok(()),
                }
            }
            ExportEvent::Written {
                epoch,
                bytes,
                us,
                pages,
            } => self.written(epoch, bytes, us, pages),
            ExportEvent::Retired { epoch } => self.retired(epoch),
            ExportEvent::RetiredAll => {
                self.local_retire_pending = false;
                self.attach_joining()
            }
            ExportEvent::Retrying { epoch, error } => {
                if let Some(t) = &self.telemetry {
                    t.record_retry();
                }
                if let Some(m) = self.in_flight.as_mut().filter(|m| m.epoch == epoch) {
                    m.retries += 1;
                }
                tracing::warn!(
                    "checkpoint {epoch}: export failed, retrying: {}",
                    ErrorChain(&*error)
                );
                Ok(())
            }
            ExportEvent::BaseLost { epoch, during } => {
                tracing::warn!("the checkpoint sink lost its base ({during:?} {epoch}): copying all of memory again");
                self.rebase(epoch, during)
            }
            ExportEvent::Lost { error } => {
                self.unprotect(&error);
                Ok(())
            }
            ExportEvent::Fenced { error } => {
                eprintln!(
                    "mirrorvm: {}: holding console output and disk writes from now on",
                    ErrorChain(&*error)
                );
                self.on_fenced();
                if let Some(t) = &self.telemetry {
                    t.set_unprotected();
                }
                Ok(())
            }
            ExportEvent::Failed { epoch, what, error } => {
                self.phase = Phase::Failed;
                Err(EpochError::Commit {
                    epoch,
                    what,
                    source: error,
                })
            }
        }
    }

    fn written(
        &mut self,
        epoch: u64,
        bytes: u64,
        us: u64,
        pages: StagedPages,
    ) -> Result<(), EpochError> {
        // What sending a page cost: the hot-page policy weighs it (a hot page is
        // sent at every checkpoint, written or not).
        self.parts
            .dirty
            .observe_export(pages.len(), Duration::from_micros(us));
        // Keep the staging buffer for the next cut unless it is far too big.
        if pages.data.capacity() <= 4 * pages.data.len().max(64 * PAGE_SIZE) {
            self.spare = pages;
        }
        let mut m = self.in_flight.take().unwrap_or_default();
        m.bytes = bytes;
        m.export_us = us;
        // The length in force for this epoch; then learn from it (auto mode).
        m.target_us = self::us(self.pacer.current());
        let sample = length::Sample {
            epoch: Duration::from_micros(m.epoch_us),
            pause: Duration::from_micros(m.pause_us),
            export: Duration::from_micros(us),
            dirty_pages: m.dirty_pages,
            copy: Duration::from_micros(m.copy_us),
            rewritten_pages: m.rewritten_pages,
        };
        if self.pacer.observe(&sample).is_some() {
            self.new_length = true;
        }
        if let Some(c) = self.last_cut.filter(|c| c.epoch == epoch) {
            let resumed = c.began + c.pause;
            m.ack_us = self::us(resumed.elapsed());
            self.complete_cut_at = Some(resumed);
        }
        self.last_complete = Some(epoch);
        // A replica of `epoch` now exists: changes count from it.
        self.complete_id = Some(ReplicaId {
            lineage: self.lineage,
            epoch,
        });
        self.pending = DirtySet::default();
        if self.phase == Phase::Fenced {
            return Ok(());
        }
        // Complete: its output may be seen, its regions may be retired.
        self.parts.output.release(epoch);
        #[cfg(test)]
        if self.sabotage.retire_early {
            return self.log_metrics(&m);
        }
        if !matches!(self.phase, Phase::Unprotected { .. }) {
            self.exporter.submit(Job::Retire(epoch));
        }
        self.log_metrics(&m)
    }

    fn retired(&mut self, epoch: u64) -> Result<(), EpochError> {
        match self.phase {
            Phase::Exporting { epoch: e, .. } if e == epoch => {
                self.phase = Phase::Idle;
                // A region that filled up meanwhile asks for its cut now.
                if self.parts.disks.wants_cut() {
                    return self.cut(true);
                }
                Ok(())
            }
            Phase::CutPostponed { epoch: e, .. } if e == epoch => {
                self.phase = Phase::Idle;
                self.cut(true)
            }
            Phase::Closing {
                in_flight: Some(e),
                rebasing,
            } if e == epoch => {
                self.phase = Phase::Closing {
                    in_flight: None,
                    rebasing,
                };
                Ok(())
            }
            Phase::Unprotected { .. } => {
                self.local_retire_pending = false;
                self.attach_joining()
            }
            _ => Ok(()),
        }
    }

    /// The sink lost its base. During the manifest: the base follows anyway. During
    /// the base: send it again. During checkpoint N: retire N's regions locally (its
    /// disk writes are in the journal and go into the base images, which a new base
    /// copy then carries) and copy all of memory again. Only one base or checkpoint
    /// is ever queued, so this never doubles up.
    fn rebase(&mut self, epoch: u64, during: LostDuring) -> Result<(), EpochError> {
        if matches!(
            self.phase,
            Phase::Fenced | Phase::Failed | Phase::Unprotected { .. }
        ) {
            return Ok(());
        }
        match during {
            LostDuring::Begin => return Ok(()),
            LostDuring::Base => {
                // The logs were harvested for rounds already sent: all of memory
                // again, and rounds start over.
                self.rounds = Rounds::default();
                self.exporter.submit(Job::Base {
                    epoch,
                    mem: self.mem.clone(),
                    delta: self.delta(),
                });
                return Ok(());
            }
            LostDuring::Checkpoint => {}
        }
        let in_flight = self.phase.in_flight();
        if in_flight == Some(epoch) {
            self.exporter.submit(Job::Retire(epoch));
        }
        let closing = matches!(self.phase, Phase::Closing { .. });
        self.start_precopy()?;
        if closing {
            // Ending: the in-flight checkpoint's regions retire first (jobs run in
            // order), then the base; the final cut then completes it.
            self.phase = Phase::Closing {
                in_flight: in_flight.filter(|e| *e == epoch),
                rebasing: true,
            };
        }
        // Otherwise PreCopy: N's retire runs before the base (jobs run in order), so
        // the cut that completes the base finds a free region.
        Ok(())
    }

    fn unprotect(&mut self, error: &Cause) {
        if matches!(
            self.phase,
            Phase::Fenced | Phase::Failed | Phase::Unprotected { .. }
        ) {
            return;
        }
        eprintln!(
            "mirrorvm: checkpoint sink lost ({}): running unprotected since checkpoint {}",
            ErrorChain(&**error),
            self.last_complete
                .map_or_else(|| "none".to_string(), |e| e.to_string())
        );
        self.phase = Phase::Unprotected {
            since: self.last_complete,
        };
        let line = EpochMetrics {
            epoch: self.last_complete.unwrap_or(0),
            at_ms: self.ms_since_start(),
            unprotected: true,
            ..Default::default()
        };
        if let Err(e) = self.log_metrics(&line) {
            tracing::warn!("cannot write the metrics file: {}", ErrorChain(&e));
        }
        self.in_flight = None;
        self.parts.output.release_all();
        self.exporter.submit(Job::RetireAll);
        self.local_retire_pending = true;
    }

    /// Unprotected: swap the disks' regions and retire them at once, so writes keep
    /// flowing into the base images. No pause: nothing needs to match memory.
    fn local_swap(&mut self) -> Result<(), EpochError> {
        if self.local_retire_pending || self.joining.is_some() {
            return Ok(());
        }
        let epoch = self.next_epoch;
        self.parts
            .disks
            .start_checkpoint(epoch)
            .map_err(|source| EpochError::Cut { epoch, source })?;
        self.next_epoch += 1;
        self.exporter.submit(Job::RetireAll);
        self.local_retire_pending = true;
        Ok(())
    }

    /// Milliseconds since the engine was made (`EpochMetrics::at_ms`).
    fn ms_since_start(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Records one line: in the Prometheus registry, then in the metrics file.
    fn log_metrics(&mut self, m: &EpochMetrics) -> Result<(), EpochError> {
        if let Some(t) = &self.telemetry {
            t.record_checkpoint(m);
        }
        if let Some(w) = &mut self.metrics {
            m.write_line(w).map_err(EpochError::Metrics)?;
        }
        Ok(())
    }

    /// Handles events until `done` holds for the phase, for at most until
    /// `deadline`; false if it still does not hold then.
    fn wait_until(
        &mut self,
        deadline: Instant,
        done: impl Fn(&Phase) -> bool,
    ) -> Result<bool, EpochError> {
        while !done(&self.phase) {
            if matches!(
                self.phase,
                Phase::Failed | Phase::Fenced | Phase::Unprotected { .. }
            ) {
                return Ok(false);
            }
            match self.exporter.wait(deadline) {
                Some(e) => self.handle(e)?,
                None => return Ok(done(&self.phase)),
            }
            if Instant::now() >= deadline {
                return Ok(done(&self.phase));
            }
        }
        Ok(true)
    }

    fn close(&mut self) {
        self.phase = match self.phase {
            Phase::PreCopy { .. } => Phase::Closing {
                in_flight: None,
                rebasing: true,
            },
            Phase::Idle => Phase::Closing {
                in_flight: None,
                rebasing: false,
            },
            Phase::Exporting { epoch, .. } | Phase::CutPostponed { epoch, .. } => Phase::Closing {
                in_flight: Some(epoch),
                rebasing: false,
            },
            p => p,
        };
    }

    /// Ends checkpointing when the guest itself ended the run: the checkpoint in
    /// flight (if any) gets until `deadline` to land; no further cut. A pre-copy
    /// under way is abandoned: nothing is complete, and nothing will be.
    pub fn shutdown(&mut self, deadline: Duration) {
        self.close();
        let end = Instant::now() + deadline;
        if let Err(e) = self.wait_until(end, |p| p.in_flight().is_none()) {
            tracing::warn!("while ending: {}", ErrorChain(&e));
        }
    }

    /// Ends checkpointing when the user stops the run (a signal, Ctrl-A x): waits
    /// for the checkpoint in flight (and a base under way), then cuts one final
    /// checkpoint with the vCPUs left parked and waits until the sink has it, so that
    /// a restore resumes the guest where it was stopped. Returns the final epoch; an
    /// error leaves the last complete checkpoint standing.
    pub fn finish(&mut self, deadline: Duration) -> Result<u64, EpochError> {
        let end = Instant::now() + deadline;
        self.close();
        let settled = |p: &Phase| {
            matches!(
                p,
                Phase::Closing {
                    in_flight: None,
                    rebasing: false
                }
            )
        };
        loop {
            if matches!(
                self.phase,
                Phase::Failed | Phase::Fenced | Phase::Unprotected { .. }
            ) {
                return Err(EpochError::NoFinal(self.phase));
            }
            let epoch = self.next_epoch;
            if !self.wait_until(end, settled)? {
                return Err(EpochError::FinalTimeout { epoch, deadline });
            }
            self.cut(false)?;
            // The cut left the phase Exporting; keep closing.
            self.phase = Phase::Closing {
                in_flight: Some(epoch),
                rebasing: false,
            };
            if !self.wait_until(end, settled)? {
                return Err(EpochError::FinalTimeout { epoch, deadline });
            }
            if self.last_complete == Some(epoch) {
                return Ok(epoch);
            }
            // The sink lost its base under the final checkpoint: once the new base
            // is there, cut it again.
        }
    }

    /// Stops the exporter after the job under way and hands back the sink, so the
    /// caller can settle the disks and then record the end with
    /// [`CheckpointSink::end`](crate::checkpoint::CheckpointSink::end).
    pub fn stop(&mut self) -> Option<Box<dyn crate::checkpoint::CheckpointSink>> {
        self.exporter.stop()
    }
}
