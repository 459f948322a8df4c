//! The engine on the device event loop: its epoch timer, the exporter's wake-ups and
//! the disks' early-cut requests become calls of the engine's `on_*` methods.

use std::time::Duration;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use devices::ErrorChain;

use super::{CutRefused, EpochEngine, EpochError};

const TOKEN_TIMER: u32 = 0;
const TOKEN_EXPORTER: u32 = 1;
const TOKEN_CUT_REQUEST: u32 = 2;

/// The engine on the device event loop: its timer, the exporter's wake-ups and the
/// disks' early-cut requests.
pub struct EpochLoop {
    engine: EpochEngine,
    timer: TimerFd,
    exporter_evt: EventFd,
    cut_request: Option<EventFd>,
    on_error: Box<dyn Fn(String) + Send>,
}

impl EpochLoop {
    /// Wraps a started engine; its timer ticks every [`EpochEngine::epoch_length`],
    /// re-armed whenever the engine changes it. `exporter_evt` fires when the
    /// exporter has events; `cut_request` when a disk asks for an early cut;
    /// `on_error` ends the run.
    pub fn new(
        mut engine: EpochEngine,
        exporter_evt: EventFd,
        cut_request: Option<EventFd>,
        on_error: Box<dyn Fn(String) + Send>,
    ) -> Result<Self, EpochError> {
        let mut timer = TimerFd::new().map_err(|e| EpochError::Os("timer", e.into()))?;
        let period = engine.epoch_length();
        let _ = engine.take_new_length();
        timer
            .reset(period, Some(period))
            .map_err(|e| EpochError::Os("timer", e.into()))?;
        Ok(EpochLoop {
            engine,
            timer,
            exporter_evt,
            cut_request,
            on_error,
        })
    }

    /// The engine.
    pub fn engine(&mut self) -> &mut EpochEngine {
        &mut self.engine
    }

    /// Cuts a checkpoint as soon as possible ([`EpochEngine::request_cut`]); a cut
    /// that fails ends the run, as a failed tick does.
    pub fn request_cut(&mut self) -> Result<u64, CutRefused> {
        let r = match self.engine.request_cut() {
            Ok(r) => r,
            Err(e) => {
                (self.on_error)(format!("checkpointing failed: {}", ErrorChain(&e)));
                Err(CutRefused::Failed)
            }
        };
        self.engine.settle_waiters();
        r
    }

    /// The epoch length in force.
    pub fn period(&self) -> Duration {
        self.engine.epoch_length()
    }

    /// Re-arms the timer when the engine chose a new epoch length: the next tick
    /// comes one new length after the last cut began (at once if that is past).
    fn follow_length(&mut self) -> Result<(), EpochError> {
        let Some((period, since_cut)) = self.engine.take_new_length() else {
            return Ok(());
        };
        let first = period
            .saturating_sub(since_cut.unwrap_or_default())
            .max(MIN_FIRST_TICK);
        self.timer
            .reset(first, Some(period))
            .map_err(|e| EpochError::Os("timer", e.into()))
    }
}

/// The soonest a re-armed timer fires (a zero first expiry would disarm it).
const MIN_FIRST_TICK: Duration = Duration::from_micros(100);

impl MutEventSubscriber for EpochLoop {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(&self.timer, TOKEN_TIMER, EventSet::IN)) {
            (self.on_error)(format!("cannot watch the epoch timer: {e:?}"));
        }
        if let Err(e) = ops.add(Events::with_data(
            &self.exporter_evt,
            TOKEN_EXPORTER,
            EventSet::IN,
        )) {
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
            TOKEN_TIMER => {
                let _ = self.timer.wait();
                self.engine.on_tick()
            }
            TOKEN_EXPORTER => {
                let _ = self.exporter_evt.read();
                self.engine.on_exporter()
            }
            TOKEN_CUT_REQUEST => {
                if let Some(evt) = &self.cut_request {
                    let _ = evt.read();
                }
                self.engine.on_region_full()
            }
            _ => Ok(()),
        };
        let r = r.and_then(|()| self.follow_length());
        if let Err(e) = r {
            (self.on_error)(format!("checkpointing failed: {}", ErrorChain(&e)));
        }
        self.engine.settle_waiters();
    }
}
