//! The exporter: takes checkpoints from the engine to the sink, off the device loop.
//!
//! The engine decides ([`Job`]s); the [`ExportWorker`] carries out one attempt of a
//! job against the sink and the disks; the [`Exporter`] runs the worker on its own
//! thread, retrying a failed attempt with exponential backoff (never dropping a
//! checkpoint), and reports [`ExportEvent`]s back through a channel and an eventfd
//! the device loop watches. The model test runs the same worker synchronously.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use vmm_sys_util::eventfd::EventFd;

use super::{Cause, DiskCommit, EpochError};
use crate::checkpoint::sink::{BaseDelta, CheckpointSink, SinkError};
use crate::checkpoint::{Checkpoint, Manifest};
use crate::dirty::StagedPages;
use crate::memory::GuestMemory;

/// First retry delay after a failed export.
pub const RETRY_MIN: Duration = Duration::from_millis(10);
/// Longest retry delay.
pub const RETRY_MAX: Duration = Duration::from_secs(2);

/// Work the engine hands to the exporter, carried out in order.
pub enum Job {
    /// Send the one-time facts.
    Begin(Manifest),
    /// Pre-copy: all of `mem`, read while the guest runs, as the base that
    /// checkpoint `epoch + 1` completes.
    Base {
        /// The base's epoch.
        epoch: u64,
        /// Live guest memory.
        mem: GuestMemory,
        /// The pages written since a checkpoint the sink may hold a replica of.
        delta: Option<BaseDelta>,
    },
    /// A later pre-copy round: the pages of `set`, read again from `mem` while the
    /// guest runs, replace their copies in the base of `epoch`.
    BaseRound {
        /// The base's epoch.
        epoch: u64,
        /// Live guest memory.
        mem: GuestMemory,
        /// The pages written during the previous round.
        set: crate::dirty::DirtySet,
    },
    /// A staged checkpoint: seal its disk regions (once), then write it.
    Checkpoint {
        /// The checkpoint.
        checkpoint: Checkpoint,
        /// Whether its disk regions are sealed into it already (a retry).
        sealed: bool,
    },
    /// Checkpoint N is complete: retire its disk regions.
    Retire(u64),
    /// No sink any more: retire every frozen region locally.
    RetireAll,
    /// A new sink (a standby that joined an unprotected primary) replaces the lost
    /// one.
    Attach(Box<dyn CheckpointSink>),
}

impl Job {
    fn epoch(&self) -> u64 {
        match self {
            Job::Base { epoch, .. } | Job::BaseRound { epoch, .. } | Job::Retire(epoch) => *epoch,
            Job::Checkpoint { checkpoint, .. } => checkpoint.epoch,
            Job::Begin(_) | Job::RetireAll | Job::Attach(_) => 0,
        }
    }
}

/// What the exporter reports back.
#[derive(Debug)]
pub enum ExportEvent {
    /// The sink has the manifest.
    Begun,
    /// The sink has the base.
    BaseWritten {
        /// Its epoch.
        epoch: u64,
        /// Bytes written.
        bytes: u64,
        /// Time taken, µs.
        us: u64,
    },
    /// The sink has checkpoint `epoch`: it is complete.
    Written {
        /// The checkpoint.
        epoch: u64,
        /// Bytes written.
        bytes: u64,
        /// From hand-over to durable, µs.
        us: u64,
        /// The staging buffer, for reuse.
        pages: StagedPages,
    },
    /// Checkpoint `epoch`'s regions are retired.
    Retired {
        /// The checkpoint.
        epoch: u64,
    },
    /// Every frozen region is retired locally.
    RetiredAll,
    /// A new sink is in place.
    Attached,
    /// An attempt failed and will be retried.
    Retrying {
        /// The checkpoint (0 for the manifest).
        epoch: u64,
        /// Why.
        error: Cause,
    },
    /// The sink lost its base during a job.
    BaseLost {
        /// The job's epoch (a checkpoint's, or the base's).
        epoch: u64,
        /// Which job.
        during: LostDuring,
    },
    /// The sink is gone for good.
    Lost {
        /// Why.
        error: Cause,
    },
    /// The sink is gone and this host may not go on alone.
    Fenced {
        /// Why.
        error: Cause,
    },
    /// Sealing or retiring a disk region failed: checkpointing cannot go on.
    Failed {
        /// The checkpoint.
        epoch: u64,
        /// The step.
        what: &'static str,
        /// Why.
        error: Cause,
    },
}

/// The job during which a sink lost its base.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LostDuring {
    /// The manifest (a base follows anyway).
    Begin,
    /// The base itself: send it again.
    Base,
    /// A checkpoint: retire it locally and send a new base.
    Checkpoint,
}

/// The outcome of one attempt.
pub enum Attempt {
    /// Done; report this.
    Done(ExportEvent),
    /// Failed for now; the job stays and is tried again.
    Retry(Cause),
}

/// Carries out jobs against a sink and the disks, one attempt at a time.
pub struct ExportWorker {
    sink: Box<dyn CheckpointSink>,
    disks: Box<dyn DiskCommit>,
}

impl ExportWorker {
    /// A worker writing to `sink` and committing through `disks`.
    pub fn new(sink: Box<dyn CheckpointSink>, disks: Box<dyn DiskCommit>) -> Self {
        ExportWorker { sink, disks }
    }

    /// One attempt at `job`. A job may be attempted again after [`Attempt::Retry`].
    pub fn attempt(&mut self, job: &mut Job) -> Attempt {
        let start = Instant::now();
        let us = || u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
        let epoch = job.epoch();
        let during = match job {
            Job::Begin(_) => LostDuring::Begin,
            Job::Base { .. } | Job::BaseRound { .. } => LostDuring::Base,
            _ => LostDuring::Checkpoint,
        };
        let sink_err = |e: SinkError| match e {
            SinkError::Failed(cause) => Attempt::Retry(cause),
            SinkError::BaseLost => Attempt::Done(ExportEvent::BaseLost { epoch, during }),
            SinkError::Lost(error) => Attempt::Done(ExportEvent::Lost { error }),
            SinkError::Fenced(error) => Attempt::Done(ExportEvent::Fenced { error }),
        };
        match job {
            Job::Begin(m) => match self.sink.begin(m) {
                Ok(()) => Attempt::Done(ExportEvent::Begun),
                Err(e) => sink_err(e),
            },
            Job::Base { epoch, mem, delta } => {
                match self.sink.write_base(mem, *epoch, delta.as_ref()) {
                    Ok(bytes) => Attempt::Done(ExportEvent::BaseWritten {
                        epoch: *epoch,
                        bytes,
                        us: us(),
                    }),
                    Err(e) => sink_err(e),
                }
            }
            Job::BaseRound { epoch, mem, set } => {
                let mut pages = StagedPages::default();
                if let Err(e) = pages.copy_from(mem, set) {
                    return Attempt::Done(ExportEvent::Failed {
                        epoch: *epoch,
                        what: "reading guest memory for a pre-copy round",
                        error: Box::new(e),
                    });
                }
                match self.sink.write_base_pages(&pages, *epoch) {
                    Ok(bytes) => Attempt::Done(ExportEvent::BaseWritten {
                        epoch: *epoch,
                        bytes,
                        us: us(),
                    }),
                    Err(e) => sink_err(e),
                }
            }
            Job::Checkpoint { checkpoint, sealed } => {
                if !*sealed {
                    // The memory side names the epoch, so its disk state must be
                    // recoverable before the checkpoint is.
                    match self.disks.seal(checkpoint.epoch, self.sink.storage()) {
                        Ok(regions) => {
                            checkpoint.disks = regions;
                            *sealed = true;
                        }
                        Err(error) => {
                            return Attempt::Done(ExportEvent::Failed {
                                epoch,
                                what: "sealing the disk regions",
                                error,
                            })
                        }
                    }
                }
                match self.sink.write(checkpoint) {
                    Ok(bytes) => Attempt::Done(ExportEvent::Written {
                        epoch,
                        bytes,
                        us: us(),
                        pages: std::mem::take(&mut checkpoint.pages),
                    }),
                    Err(e) => sink_err(e),
                }
            }
            Job::Retire(epoch) => match self.disks.retire(*epoch) {
                Ok(()) => Attempt::Done(ExportEvent::Retired { epoch: *epoch }),
                Err(error) => Attempt::Done(ExportEvent::Failed {
                    epoch: *epoch,
                    what: "retiring the disk regions",
                    error,
                }),
            },
            Job::Attach(sink) => {
                // The job cannot run twice: a placeholder stays behind in it.
                self.sink = std::mem::replace(sink, Box::new(NoSink));
                Attempt::Done(ExportEvent::Attached)
            }
            Job::RetireAll => match self.disks.retire_all() {
                Ok(()) => Attempt::Done(ExportEvent::RetiredAll),
                Err(error) => Attempt::Done(ExportEvent::Failed {
                    epoch,
                    what: "retiring the disk regions locally",
                    error,
                }),
            },
        }
    }
}

/// The sink of a primary that has none yet (it waits for a standby to join): every
/// write reports it lost, so the engine runs unprotected; the end records nothing.
pub struct NoSink;

/// Why [`NoSink`] takes nothing.
#[derive(Debug, thiserror::Error)]
#[error("no standby is attached")]
pub struct NoStandby;

impl CheckpointSink for NoSink {
    fn storage(&self) -> crate::checkpoint::StorageMode {
        crate::checkpoint::StorageMode::Replicated
    }
    fn begin(&mut self, _: &Manifest) -> Result<(), SinkError> {
        Err(SinkError::Lost(Box::new(NoStandby)))
    }
    fn write_base(
        &mut self,
        _: &GuestMemory,
        _: u64,
        _: Option<&BaseDelta>,
    ) -> Result<u64, SinkError> {
        Err(SinkError::Lost(Box::new(NoStandby)))
    }
    fn write_base_pages(&mut self, _: &StagedPages, _: u64) -> Result<u64, SinkError> {
        Err(SinkError::Lost(Box::new(NoStandby)))
    }
    fn write(&mut self, _: &Checkpoint) -> Result<u64, SinkError> {
        Err(SinkError::Lost(Box::new(NoStandby)))
    }
    fn end(&mut self, _: &crate::checkpoint::sink::SinkEnd) -> Result<(), SinkError> {
        Ok(())
    }
}

/// The engine's view of the exporter.
pub trait ExportQueue: Send {
    /// Queues a job.
    fn submit(&mut self, job: Job);
    /// An event, if one is ready.
    fn try_next(&mut self) -> Option<ExportEvent>;
    /// Waits for an event until `deadline`.
    fn wait(&mut self, deadline: Instant) -> Option<ExportEvent>;
    /// Stops after the job under way (queued jobs are dropped) and hands back the
    /// sink, so the end of the run can be recorded after the disks are settled.
    fn stop(&mut self) -> Option<Box<dyn CheckpointSink>>;
}

/// The exporter thread.
pub struct Exporter {
    to_worker: Option<Sender<Job>>,
    events: Receiver<ExportEvent>,
    thread: Option<std::thread::JoinHandle<ExportWorker>>,
    stop: Arc<AtomicBool>,
}

impl Exporter {
    /// Starts the thread; `wake` is written whenever an event is ready.
    pub fn spawn(mut worker: ExportWorker, wake: EventFd) -> Result<Self, EpochError> {
        let (to_worker, jobs) = mpsc::channel::<Job>();
        let (tx, events) = mpsc::channel::<ExportEvent>();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("exporter".into())
            .spawn(move || {
                let send = |e: ExportEvent| {
                    let ok = tx.send(e).is_ok();
                    let _ = wake.write(1);
                    ok
                };
                while let Ok(mut job) = jobs.recv() {
                    let mut delays = ExponentialBuilder::default()
                        .with_min_delay(RETRY_MIN)
                        .with_max_delay(RETRY_MAX)
                        .with_jitter()
                        .without_max_times()
                        .build();
                    let event = loop {
                        if stopping.load(Ordering::Acquire) {
                            return worker;
                        }
                        match worker.attempt(&mut job) {
                            Attempt::Done(e) => break e,
                            Attempt::Retry(error) => {
                                if !send(ExportEvent::Retrying {
                                    epoch: job.epoch(),
                                    error,
                                }) {
                                    return worker;
                                }
                                let delay = delays.next().unwrap_or(RETRY_MAX);
                                sleep_unless_stopped(delay, &stopping);
                            }
                        }
                    };
                    if !send(event) {
                        return worker;
                    }
                }
                worker
            })
            .map_err(|e| EpochError::Os("exporter thread", e))?;
        Ok(Exporter {
            to_worker: Some(to_worker),
            events,
            thread: Some(thread),
            stop,
        })
    }
}

fn sleep_unless_stopped(d: Duration, stop: &AtomicBool) {
    let end = Instant::now() + d;
    while !stop.load(Ordering::Acquire) {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(Duration::from_millis(20)));
    }
}

impl ExportQueue for Exporter {
    fn submit(&mut self, job: Job) {
        if let Some(tx) = &self.to_worker {
            let _ = tx.send(job);
        }
    }

    fn try_next(&mut self) -> Option<ExportEvent> {
        self.events.try_recv().ok()
    }

    fn wait(&mut self, deadline: Instant) -> Option<ExportEvent> {
        let left = deadline.saturating_duration_since(Instant::now());
        self.events.recv_timeout(left).ok()
    }

    fn stop(&mut self) -> Option<Box<dyn CheckpointSink>> {
        self.stop.store(true, Ordering::Release);
        self.to_worker = None;
        let worker = self.thread.take()?.join().ok()?;
        Some(worker.sink)
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// An exporter that runs jobs only when told to: the model test drives the engine
/// step by step with it.
#[cfg(test)]
pub struct ManualExporter {
    /// The worker (taken by `stop`).
    pub worker: Option<ExportWorker>,
    /// Jobs not yet done, oldest first.
    pub queue: std::collections::VecDeque<Job>,
    /// Events not yet taken by the engine.
    pub events: std::collections::VecDeque<ExportEvent>,
    /// Attempts a `wait` makes before it gives up (a stand-in for its deadline).
    pub wait_attempts: usize,
    /// Whether `stop` was called.
    pub stopped: bool,
}

#[cfg(test)]
impl ManualExporter {
    /// A manual exporter over `worker`.
    pub fn new(worker: ExportWorker) -> Self {
        ManualExporter {
            worker: Some(worker),
            queue: std::collections::VecDeque::new(),
            events: std::collections::VecDeque::new(),
            wait_attempts: 8,
            stopped: false,
        }
    }

    /// One attempt at the oldest job; true if it finished.
    pub fn step(&mut self) -> bool {
        let Some(worker) = self.worker.as_mut() else {
            return false;
        };
        let Some(mut job) = self.queue.pop_front() else {
            return false;
        };
        match worker.attempt(&mut job) {
            Attempt::Done(e) => {
                self.events.push_back(e);
                true
            }
            Attempt::Retry(error) => {
                let epoch = job.epoch();
                self.queue.push_front(job);
                self.events
                    .push_back(ExportEvent::Retrying { epoch, error });
                false
            }
        }
    }
}

#[cfg(test)]
impl ExportQueue for ManualExporter {
    fn submit(&mut self, job: Job) {
        if !self.stopped {
            self.queue.push_back(job);
        }
    }

    fn try_next(&mut self) -> Option<ExportEvent> {
        self.events.pop_front()
    }

    /// Makes at most `wait_attempts` attempts (time does not pass here); retries
    /// are not reported through `wait`.
    fn wait(&mut self, _deadline: Instant) -> Option<ExportEvent> {
        let mut attempts = 0;
        loop {
            while let Some(e) = self.events.pop_front() {
                if !matches!(e, ExportEvent::Retrying { .. }) {
                    return Some(e);
                }
            }
            if self.queue.is_empty() || attempts == self.wait_attempts {
                return None;
            }
            self.step();
            attempts += 1;
        }
    }

    fn stop(&mut self) -> Option<Box<dyn CheckpointSink>> {
        self.stopped = true;
        self.queue.clear();
        self.worker.take().map(|w| w.sink)
    }
}
