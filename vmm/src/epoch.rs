//! The epoch engine on the primary: one state machine that cuts checkpoints.
//!
//! ```text
//!             timer tick                    export done (Ack N)
//!   Running ─────────────▶ Cut N ──▶ Running+Exporting(N) ─────────────▶ Running
//!      ▲                     │              │ timer tick or region full       │
//!      │                     │              ▼                                 │
//!      │                     │        CutPostponed ──── export done ──▶ Cut N+1
//!      └─────────────────────┘ (vCPUs resume as soon as the cut is staged)
//! ```
//!
//! A cut, all inside one pause of every vCPU (see `vcpu::VcpuControl`): drain the
//! devices' pending notifications; harvest the dirty set (KVM log ∪ AtomicBitmap);
//! copy the dirty pages to a staging buffer; save devices, then vCPUs, then the VM
//! (irqchips, PIT, clock); start a new disk checkpoint region; resume. The staged
//! checkpoint then travels to the sink on the exporter thread while the guest runs
//! epoch N+1. Only one checkpoint is in flight: until the sink has checkpoint N
//! (and its disk region is retired), cut N+1 is postponed and the guest keeps
//! running. A failed export is retried, never dropped.
//!
//! The engine runs on the device event loop (it is an event-manager subscriber), so
//! the device loop is stopped between iterations for the whole cut.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_manager::{EventOps, Events, MutEventSubscriber};
use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::checkpoint::{encode_state, Checkpoint, CheckpointSink, MachineState, SavedConfig};
use crate::dirty::{self, StagedPages, PAGE_SIZE};
use crate::memory::GuestMemory;
use crate::vcpu::VcpuControl;
use crate::vm_state::VmState;

/// How long a vCPU may take to park before the cut gives up on it.
pub const PARK_DEADLINE: Duration = Duration::from_secs(3);

/// Epoch settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochConfig {
    /// Epoch length.
    pub epoch: Duration,
    /// Where checkpoints go.
    pub dir: PathBuf,
    /// Per-epoch metrics as JSON lines.
    pub metrics: Option<PathBuf>,
}

/// What the engine needs from the devices at a cut.
pub trait DeviceCut: Send {
    /// Processes pending queue notifications so no event is lost at the cut.
    fn drain(&mut self);
    /// Encodes every device's state.
    fn save(&mut self) -> Result<Vec<u8>, String>;
    /// Starts disk checkpoint `epoch` (freezes the active regions); returns the bytes
    /// in the regions just frozen.
    fn start_checkpoint(&mut self, epoch: u64) -> Result<u64, String>;
    /// Whether a disk region passed its high-water mark (end the epoch early).
    fn wants_cut(&self) -> bool;
    /// Checkpoint `epoch` is complete: release what was held back for it (output
    /// commit).
    fn complete(&mut self, epoch: u64);
}

/// The disk half of making checkpoint N complete, run on the exporter thread.
pub trait DiskCommit: Send {
    /// Makes the regions frozen at cut `epoch` durable (sealed), before the
    /// checkpoint that names them is: the memory side names the epoch, so its disk
    /// state must already be recoverable.
    fn seal(&mut self, epoch: u64) -> Result<(), String>;
    /// Checkpoint `epoch` is complete at the sink: acknowledge and retire its
    /// regions (commit them to the base images, free the slots).
    fn commit(&mut self, epoch: u64) -> Result<(), String>;
}

/// Timings and sizes of one cut, written as a JSON line once its export finished.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EpochMetrics {
    /// Checkpoint number.
    pub epoch: u64,
    /// Whether all of memory was copied.
    pub full: bool,
    /// Whole pause, µs.
    pub pause_us: u64,
    /// Kick until every vCPU parked, µs.
    pub kick_us: u64,
    /// Dirty-log harvest, µs.
    pub harvest_us: u64,
    /// Page copy into staging, µs.
    pub copy_us: u64,
    /// Device, vCPU, VM state save and disk region swap, µs.
    pub save_us: u64,
    /// Pages in the checkpoint.
    pub dirty_pages: u64,
    /// Bytes written to the sink.
    pub bytes: u64,
    /// Bytes in the disk region frozen at the cut.
    pub region_bytes: u64,
    /// Time from handing the checkpoint to the exporter until it was durable, µs.
    pub export_us: u64,
}

impl EpochMetrics {
    /// The JSON line.
    pub fn json(&self) -> String {
        format!(
            "{{\"epoch\":{},\"full\":{},\"pause_us\":{},\"kick_us\":{},\"harvest_us\":{},\"copy_us\":{},\"save_us\":{},\"dirty_pages\":{},\"bytes\":{},\"region_bytes\":{},\"export_us\":{}}}",
            self.epoch, self.full, self.pause_us, self.kick_us, self.harvest_us, self.copy_us,
            self.save_us, self.dirty_pages, self.bytes, self.region_bytes, self.export_us
        )
    }
}

/// Failures that end the run.
#[derive(Debug, thiserror::Error)]
pub enum EpochError {
    /// Timer or eventfd creation failed.
    #[error("cannot create the epoch {0}: {1}")]
    Os(&'static str, #[source] std::io::Error),
    /// A vCPU would not park.
    #[error("checkpoint {epoch}: {source}")]
    Pause {
        /// The checkpoint.
        epoch: u64,
        /// Cause.
        source: crate::vcpu::ControlError,
    },
    /// A step of the cut failed.
    #[error("checkpoint {epoch}: {what}: {reason}")]
    Cut {
        /// The checkpoint.
        epoch: u64,
        /// The step.
        what: &'static str,
        /// Cause.
        reason: String,
    },
    /// The metrics file could not be written.
    #[error("cannot write metrics to {0}: {1}")]
    Metrics(PathBuf, #[source] std::io::Error),
}

/// Work for the exporter thread.
enum Job {
    /// Pre-copy: write all of guest memory, read while the guest runs, as the base
    /// image the first checkpoint (this epoch + 1) completes.
    Base(u64),
    /// A staged checkpoint.
    Checkpoint(Checkpoint),
}

struct Exported {
    error: Option<String>,
    epoch: u64,
    base: bool,
    bytes: u64,
    export_us: u64,
    pages: StagedPages,
}

impl Exported {
    fn failed(epoch: u64, why: String) -> Self {
        Exported {
            error: Some(why),
            epoch,
            base: false,
            bytes: 0,
            export_us: 0,
            pages: StagedPages::default(),
        }
    }
}

/// The engine; add it to the device event loop.
pub struct EpochEngine {
    timer: TimerFd,
    done_evt: EventFd,
    cut_request: Option<EventFd>,
    done_rx: Receiver<Exported>,
    to_exporter: Option<Sender<Job>>,
    exporter: Option<std::thread::JoinHandle<()>>,
    stop_exporter: Arc<AtomicBool>,
    vm: Arc<VmFd>,
    mem: GuestMemory,
    vcpus: Vec<Arc<VcpuControl>>,
    devices: Box<dyn DeviceCut>,
    config: SavedConfig,
    period: Duration,
    next_epoch: u64,
    in_flight: Option<EpochMetrics>,
    postponed: bool,
    need_full: bool,
    closing: bool,
    failed: bool,
    precopy_start: Option<Instant>,
    spare: StagedPages,
    metrics: Option<(PathBuf, BufWriter<File>)>,
    on_error: Box<dyn Fn(String) + Send>,
    /// Completed checkpoints (for tests and reports).
    pub completed: u64,
}

const TOKEN_TIMER: u32 = 0;
const TOKEN_DONE: u32 = 1;
const TOKEN_CUT_REQUEST: u32 = 2;

impl EpochEngine {
    /// Builds the engine and starts its exporter thread. `on_error` ends the run.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: &EpochConfig,
        mut sink: Box<dyn CheckpointSink>,
        vm: Arc<VmFd>,
        mem: GuestMemory,
        vcpus: Vec<Arc<VcpuControl>>,
        devices: Box<dyn DeviceCut>,
        mut disks: Box<dyn DiskCommit>,
        cut_request: Option<EventFd>,
        config: SavedConfig,
        first_epoch: u64,
        on_error: Box<dyn Fn(String) + Send>,
    ) -> Result<Self, EpochError> {
        let timer = TimerFd::new().map_err(|e| EpochError::Os("timer", e.into()))?;
        let done_evt =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| EpochError::Os("eventfd", e))?;
        let metrics = match &cfg.metrics {
            Some(p) => Some((
                p.clone(),
                BufWriter::new(File::create(p).map_err(|e| EpochError::Metrics(p.clone(), e))?),
            )),
            None => None,
        };
        let (to_exporter, from_engine) = mpsc::channel::<Job>();
        let (done_tx, done_rx) = mpsc::channel::<Exported>();
        let done = done_evt
            .try_clone()
            .map_err(|e| EpochError::Os("eventfd", e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let layout: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
        let live = mem.clone();
        let exporter = std::thread::Builder::new()
            .name("exporter".into())
            .spawn(move || {
                while let Ok(job) = from_engine.recv() {
                    let start = Instant::now();
                    let epoch = match &job {
                        Job::Base(e) => *e,
                        Job::Checkpoint(c) => c.epoch,
                    };
                    if let Job::Checkpoint(c) = &job {
                        if let Err(reason) = disks.seal(c.epoch) {
                            let _ = done_tx.send(Exported::failed(
                                c.epoch,
                                format!("sealing the disk regions: {reason}"),
                            ));
                            let _ = done.write(1);
                            return;
                        }
                    }
                    // Retry until the sink has it: a checkpoint is never dropped.
                    let bytes = loop {
                        if stop2.load(Ordering::Acquire) {
                            break None;
                        }
                        let r = match &job {
                            Job::Base(e) => sink.write_base(&live, *e),
                            Job::Checkpoint(c) => sink.write(c, &layout),
                        };
                        match r {
                            Ok(b) => break Some(b),
                            Err(e) => {
                                tracing::warn!("checkpoint {epoch}: export failed, retrying: {e}");
                                if stop2.load(Ordering::Acquire) {
                                    break None;
                                }
                                std::thread::sleep(Duration::from_millis(100));
                            }
                        }
                    };
                    let Some(bytes) = bytes else { return };
                    if let Job::Checkpoint(c) = &job {
                        if let Err(reason) = disks.commit(c.epoch) {
                            let _ = done_tx.send(Exported::failed(
                                c.epoch,
                                format!("retiring the disk regions: {reason}"),
                            ));
                            let _ = done.write(1);
                            return;
                        }
                    }
                    let (base, pages) = match job {
                        Job::Base(_) => (true, StagedPages::default()),
                        Job::Checkpoint(c) => (false, c.pages),
                    };
                    let e = Exported {
                        error: None,
                        epoch,
                        base,
                        bytes,
                        export_us: start.elapsed().as_micros() as u64,
                        pages,
                    };
                    if done_tx.send(e).is_err() {
                        return;
                    }
                    let _ = done.write(1);
                }
            })
            .map_err(|e| EpochError::Os("exporter thread", e))?;
        let mut engine = EpochEngine {
            timer,
            done_evt,
            cut_request,
            done_rx,
            to_exporter: Some(to_exporter),
            exporter: Some(exporter),
            stop_exporter: stop,
            vm,
            mem,
            vcpus,
            devices,
            config,
            period: cfg.epoch,
            next_epoch: first_epoch,
            in_flight: None,
            postponed: false,
            need_full: true,
            closing: false,
            failed: false,
            precopy_start: None,
            spare: StagedPages::default(),
            metrics,
            on_error,
            completed: 0,
        };
        // Pre-copy: from here on both dirty logs record every write, while the
        // exporter copies all of memory as the guest runs. The first cut then only
        // copies what changed since, and completes that image into checkpoint
        // `first_epoch`.
        dirty::harvest(&engine.vm, &engine.mem).map_err(|e| EpochError::Cut {
            epoch: first_epoch,
            what: "dirty log",
            reason: e.to_string(),
        })?;
        engine.precopy_start = Some(Instant::now());
        if let Some(tx) = &engine.to_exporter {
            let _ = tx.send(Job::Base(first_epoch.saturating_sub(1)));
        }
        engine.in_flight = Some(EpochMetrics::default());
        engine
            .timer
            .reset(engine.period, Some(engine.period))
            .map_err(|e| EpochError::Os("timer", e.into()))?;
        Ok(engine)
    }

    fn us(d: Duration) -> u64 {
        d.as_micros() as u64
    }

    /// Cuts checkpoint `next_epoch`: see the module documentation.
    fn cut(&mut self) -> Result<(), EpochError> {
        self.cut_and(true)
    }

    /// Cuts checkpoint `next_epoch`; with `resume` false the vCPUs stay parked (the
    /// final checkpoint of a run).
    fn cut_and(&mut self, resume: bool) -> Result<(), EpochError> {
        if self.failed {
            // A failed cut may have harvested (and so cleared) dirty logs whose pages
            // no checkpoint holds: no later checkpoint may be cut in this run.
            return Err(EpochError::Cut {
                epoch: self.next_epoch,
                what: "cut",
                reason: "an earlier cut failed".into(),
            });
        }
        let r = self.cut_inner(resume);
        if r.is_err() {
            self.failed = true;
        }
        r
    }

    fn cut_inner(&mut self, resume: bool) -> Result<(), EpochError> {
        let epoch = self.next_epoch;
        let full = self.need_full;
        let cut_err = |what: &'static str, reason: String| EpochError::Cut {
            epoch,
            what,
            reason,
        };
        let t0 = Instant::now();
        for v in &self.vcpus {
            v.request_pause();
        }
        let mut parked = Ok(());
        for v in &self.vcpus {
            if let Err(source) = v.wait_parked(PARK_DEADLINE) {
                parked = Err(EpochError::Pause { epoch, source });
                break;
            }
        }
        if let Err(e) = parked {
            for v in &self.vcpus {
                v.resume();
            }
            // A vCPU whose thread ended is ending the run for its own reason (which
            // it reports); nothing was harvested, so nothing is lost.
            if let EpochError::Pause {
                source: crate::vcpu::ControlError::Exited(_),
                ..
            } = e
            {
                self.postponed = false;
                return Ok(());
            }
            return Err(e);
        }
        let t_kick = t0.elapsed();

        let result = (|| {
            self.devices.drain();
            let t1 = Instant::now();
            // The first checkpoint ("full") holds what changed since the pre-copy
            // began; with the pre-copied image it is all of memory.
            let set = dirty::harvest(&self.vm, &self.mem)
                .map_err(|e| cut_err("dirty log", e.to_string()))?;
            let t_harvest = t1.elapsed();
            let t2 = Instant::now();
            let mut pages = std::mem::take(&mut self.spare);
            pages
                .copy_from(&self.mem, &set)
                .map_err(|e| cut_err("page copy", e.to_string()))?;
            let t_copy = t2.elapsed();
            let t3 = Instant::now();
            // Order: devices (their drained work may have raised interrupts), then
            // vCPUs (LAPICs), then the VM (IOAPIC, PICs, PIT, clock).
            let devices = self
                .devices
                .save()
                .map_err(|e| cut_err("device state", e))?;
            // Every parked vCPU saves itself on its own thread, all at once.
            for v in &self.vcpus {
                v.request_save()
                    .map_err(|e| cut_err("vCPU state", e.to_string()))?;
            }
            let mut vcpus = Vec::with_capacity(self.vcpus.len());
            for v in &self.vcpus {
                vcpus.push(
                    v.wait_saved()
                        .map_err(|e| cut_err("vCPU state", e.to_string()))?,
                );
            }
            let vm = VmState::save(&self.vm).map_err(|e| cut_err("VM state", e.to_string()))?;
            let region_bytes = self
                .devices
                .start_checkpoint(epoch)
                .map_err(|e| cut_err("disk region", e))?;
            let t_save = t3.elapsed();
            let state = MachineState {
                config: self.config.clone(),
                vcpus,
                vm,
                devices,
            };
            Ok((pages, state, region_bytes, t_harvest, t_copy, t_save))
        })();
        // Resume whatever happened (the guest must not stay paused), unless this is
        // the run's final checkpoint and it succeeded.
        if resume || result.is_err() {
            for v in &self.vcpus {
                v.resume();
            }
        }
        let pause = t0.elapsed();
        let (pages, state, region_bytes, t_harvest, t_copy, t_save) = result?;
        // Encoding needs no pause.
        let state = encode_state(&state).map_err(|e| cut_err("encode", e.to_string()))?;

        let m = EpochMetrics {
            epoch,
            full,
            pause_us: Self::us(pause),
            kick_us: Self::us(t_kick),
            harvest_us: Self::us(t_harvest),
            copy_us: Self::us(t_copy),
            save_us: Self::us(t_save),
            dirty_pages: pages.len() as u64,
            region_bytes,
            ..Default::default()
        };
        if full {
            tracing::info!(
                "full checkpoint {epoch}: {} pages, pause {} µs",
                pages.len(),
                m.pause_us
            );
        }
        let c = Checkpoint {
            epoch,
            full,
            state,
            pages,
        };
        if let Some(tx) = &self.to_exporter {
            if tx.send(Job::Checkpoint(c)).is_err() {
                return Err(cut_err("export", "the exporter thread has stopped".into()));
            }
        }
        self.in_flight = Some(m);
        self.need_full = false;
        self.next_epoch += 1;
        self.postponed = false;
        Ok(())
    }

    fn exported(&mut self) -> Result<(), EpochError> {
        let _ = self.done_evt.read();
        while let Ok(e) = self.done_rx.try_recv() {
            self.handle_exported(e)?;
        }
        if !self.closing && (self.postponed || self.devices.wants_cut()) {
            self.cut()?;
        }
        Ok(())
    }

    fn handle_exported(&mut self, e: Exported) -> Result<(), EpochError> {
        if let Some(reason) = e.error {
            self.failed = true;
            return Err(EpochError::Cut {
                epoch: e.epoch,
                what: "export",
                reason,
            });
        }
        if e.base {
            self.in_flight = None;
            if let Some(t) = self.precopy_start.take() {
                tracing::info!(
                    "pre-copy of guest memory: {} bytes in {} ms",
                    e.bytes,
                    t.elapsed().as_millis()
                );
            }
            // Cut the first checkpoint right away.
            self.postponed = true;
            return Ok(());
        }
        let mut m = self.in_flight.take().unwrap_or_default();
        m.bytes = e.bytes;
        m.export_us = e.export_us;
        // Keep the staging buffer for the next cut unless it is far too big.
        let mut pages = e.pages;
        if pages.data.capacity() > 4 * (pages.data.len().max(64 * PAGE_SIZE)) {
            pages = StagedPages::default();
        }
        self.spare = pages;
        self.completed += 1;
        self.devices.complete(e.epoch);
        if let Some((path, w)) = &mut self.metrics {
            writeln!(w, "{}", m.json())
                .and_then(|_| w.flush())
                .map_err(|err| EpochError::Metrics(path.clone(), err))?;
        }
        Ok(())
    }

    /// A disk region passed its high-water mark or had to defer a write: end the
    /// epoch now (or as soon as the checkpoint in flight is done).
    fn early_cut(&mut self) -> Result<(), EpochError> {
        if let Some(evt) = &self.cut_request {
            let _ = evt.read();
        }
        // The signal may be stale (raised for a region already cut): ask the disks.
        // While a checkpoint is in flight, its completion asks them again.
        if self.in_flight.is_some() || !self.devices.wants_cut() {
            return Ok(());
        }
        self.cut()
    }

    fn tick(&mut self) -> Result<(), EpochError> {
        let _ = self.timer.wait();
        if self.in_flight.is_some() {
            // Cut N+1 needs checkpoint N at the sink: postpone, the guest runs on.
            self.postponed = true;
            return Ok(());
        }
        self.cut()
    }

    /// Waits until no checkpoint is in flight, handling completions, for at most
    /// `deadline`; false if one is still in flight then.
    fn drain_in_flight(&mut self, deadline: Instant) -> Result<bool, EpochError> {
        while self.in_flight.is_some() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            // Poll the completion channel (the eventfd is only a wake-up).
            match self
                .done_rx
                .recv_timeout(left.min(Duration::from_millis(50)))
            {
                Ok(e) => {
                    let _ = self.done_evt.read();
                    self.handle_exported(e)?;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(self.in_flight.is_none()),
            }
        }
        Ok(true)
    }

    fn stop_exporter_thread(&mut self) {
        self.stop_exporter.store(true, Ordering::Release);
        self.to_exporter = None;
        if let Some(t) = self.exporter.take() {
            let _ = t.join();
        }
    }

    /// Ends checkpointing when the guest itself ended the run: the checkpoint in
    /// flight (if any) gets until `deadline` to land; no further cut.
    pub fn shutdown(&mut self, deadline: Duration) {
        self.closing = true;
        let end = Instant::now() + deadline;
        if let Err(e) = self.drain_in_flight(end) {
            tracing::warn!("while ending: {e}");
        }
        self.stop_exporter_thread();
    }

    /// Ends checkpointing when the user stops the run (a signal, Ctrl-A x): waits
    /// for the checkpoint in flight, then cuts one final checkpoint with the vCPUs
    /// left parked and waits for it too, so that the directory holds the guest's
    /// last state and `restore` resumes it where it was stopped. Returns the final
    /// epoch; an error leaves the last complete checkpoint standing.
    pub fn finish(&mut self, deadline: Duration) -> Result<u64, EpochError> {
        self.closing = true;
        let end = Instant::now() + deadline;
        let timed_out = |epoch| EpochError::Cut {
            epoch,
            what: "final checkpoint",
            reason: format!("not written within {deadline:?}"),
        };
        let result = (|| {
            if !self.drain_in_flight(end)? {
                return Err(timed_out(self.next_epoch.saturating_sub(1)));
            }
            let epoch = self.next_epoch;
            self.cut_and(false)?;
            if !self.drain_in_flight(end)? {
                return Err(timed_out(epoch));
            }
            Ok(epoch)
        })();
        self.stop_exporter_thread();
        result
    }
}

impl MutEventSubscriber for EpochEngine {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(&self.timer, TOKEN_TIMER, EventSet::IN)) {
            (self.on_error)(format!("cannot watch the epoch timer: {e:?}"));
        }
        if let Err(e) = ops.add(Events::with_data(&self.done_evt, TOKEN_DONE, EventSet::IN)) {
            (self.on_error)(format!("cannot watch the exporter: {e:?}"));
        }
        if let Some(evt) = &self.cut_request {
            if let Err(e) = ops.add(Events::with_data(evt, TOKEN_CUT_REQUEST, EventSet::IN)) {
                (self.on_error)(format!("cannot watch the disks' cut requests: {e:?}"));
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let r = match events.data() {
            TOKEN_TIMER => self.tick(),
            TOKEN_DONE => self.exported(),
            TOKEN_CUT_REQUEST => self.early_cut(),
            _ => Ok(()),
        };
        if let Err(e) = r {
            (self.on_error)(e.to_string());
        }
    }
}
