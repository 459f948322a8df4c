//! The API's commands, carried out on the device event loop: the API thread sends
//! them through an [`Inbox`] and waits; here each is a plain call on the machine's
//! parts (the vCPU controls, the epoch engine, the shutdown latch, the console gate).
//!
//! A user pause parks every vCPU until resumed. Epoch ticks go on cutting meanwhile:
//! the guest writes nothing, so each cut is small (its state, and whatever the
//! devices finished), output held from before the pause is still released as its
//! checkpoint completes, and a standby keeps acknowledging, so the primary never
//! looks lagging. Cuts leave the vCPUs parked while the pause holds
//! (`adapters::KvmVcpus`). Heartbeats run on their own thread either way.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use devices::bus::lock_recover;
use event_manager::{EventOps, Events, MutEventSubscriber};
use serde_json::json;
use vmm_sys_util::epoll::EventSet;

use super::Shutdown;
use crate::api::{ApiError, Command, Inbox, Pending, Role, VmInfo};
use crate::epoch::{EpochLoop, Phase, PARK_DEADLINE};
use crate::output::OutputGate;
use crate::run_end::RunEnd;
use crate::vcpu::{ControlError, VcpuControl};

/// Where this machine's checkpoints go, as the status reports it.
#[derive(Debug, Clone)]
pub(super) enum SinkKind {
    /// No checkpoints (a takeover runs this way too).
    None,
    /// A checkpoint directory.
    Directory,
    /// A standby at this address.
    Peer(String),
}

/// The machine's answers to API commands, on the device event loop.
pub(super) struct ApiControl {
    pub inbox: Inbox,
    pub engine: Option<Arc<Mutex<EpochLoop>>>,
    pub controls: Vec<Arc<VcpuControl>>,
    pub paused: Arc<AtomicBool>,
    pub shutdown: Arc<Shutdown>,
    pub gate: Arc<OutputGate>,
    pub sink: SinkKind,
    pub taken_over: bool,
    pub memory_bytes: u64,
}

impl ApiControl {
    fn carry_out(&mut self, p: Pending) {
        let r = match p.cmd {
            Command::Ping => crate::api::ping(),
            Command::Info => {
                serde_json::to_value(self.info()).map_err(|e| ApiError::internal(e.to_string()))
            }
            Command::Pause => self.pause(),
            Command::Resume => self.resume(),
            Command::Checkpoint { wait } => match self.cut() {
                Err(e) => Err(e),
                Ok(epoch) if !wait => Ok(json!({ "epoch": epoch, "complete": false })),
                Ok(epoch) => {
                    if let Some(e) = &self.engine {
                        lock_recover(e).engine().on_complete(
                            epoch,
                            Box::new(move |r| {
                                p.reply(
                                    r.map(|epoch| json!({ "epoch": epoch, "complete": true }))
                                        .map_err(|why| ApiError::conflict(why.to_string())),
                                );
                            }),
                        );
                    }
                    return;
                }
            },
            Command::Shutdown => self.stop(),
            Command::Switchover => self.switchover(),
        };
        p.reply(r);
    }

    fn ending(&self) -> Result<(), ApiError> {
        match self.shutdown.reason() {
            Some(_) => Err(ApiError::conflict("the run is ending")),
            None => Ok(()),
        }
    }

    fn pause(&mut self) -> Result<serde_json::Value, ApiError> {
        self.ending()?;
        if self.paused.swap(true, Ordering::AcqRel) {
            return Err(ApiError::conflict("the guest is already paused"));
        }
        for c in &self.controls {
            c.request_pause();
        }
        for c in &self.controls {
            if let Err(e) = c.wait_parked(PARK_DEADLINE) {
                self.unpause();
                return Err(match e {
                    ControlError::Exited(_) => {
                        ApiError::conflict("a vCPU has stopped: the run is ending")
                    }
                    e => ApiError::internal(devices::ErrorChain(&e).to_string()),
                });
            }
        }
        Ok(json!({ "state": "paused" }))
    }

    fn unpause(&self) {
        self.paused.store(false, Ordering::Release);
        for c in &self.controls {
            c.resume();
        }
    }

    fn resume(&mut self) -> Result<serde_json::Value, ApiError> {
        self.ending()?;
        if !self.paused.load(Ordering::Acquire) {
            return Err(ApiError::conflict("the guest is not paused"));
        }
        self.unpause();
        Ok(json!({ "state": "running" }))
    }

    fn cut(&mut self) -> Result<u64, ApiError> {
        self.ending()?;
        let Some(e) = &self.engine else {
            return Err(ApiError::conflict(
                "this run has no checkpoint sink (start it with --checkpoint-dir or --peer)",
            ));
        };
        lock_recover(e)
            .request_cut()
            .map_err(|why| ApiError::conflict(why.to_string()))
    }

    fn stop(&mut self) -> Result<serde_json::Value, ApiError> {
        self.ending()?;
        self.shutdown.request(RunEnd::Quit);
        let final_checkpoint = self.engine.is_some();
        Ok(json!({ "stopping": true, "final_checkpoint": final_checkpoint }))
    }

    /// Hands the guest to the standby: only while a standby holds a complete
    /// checkpoint (the run then ends as a user stop does, with a handover).
    fn switchover(&mut self) -> Result<serde_json::Value, ApiError> {
        self.ending()?;
        let status = self
            .engine
            .as_ref()
            .map(|e| lock_recover(e).engine().status());
        let ready = !matches!(self.sink, SinkKind::Directory)
            && status.is_some_and(|s| {
                matches!(
                    s.phase,
                    Phase::Idle | Phase::Exporting { .. } | Phase::CutPostponed { .. }
                ) && s.last_complete.is_some()
            });
        if !ready {
            return Err(ApiError::conflict(
                "no standby holds a complete checkpoint of this guest: nothing to switch over to",
            ));
        }
        if self.paused.load(Ordering::Acquire) {
            return Err(ApiError::conflict(
                "the guest is paused: resume it first (the standby resumes it where it was)",
            ));
        }
        self.shutdown.request(RunEnd::Switchover);
        Ok(json!({ "switchover": true }))
    }

    fn info(&self) -> VmInfo {
        let status = self
            .engine
            .as_ref()
            .map(|e| lock_recover(e).engine().status());
        let phase = status.map(|s| s.phase);
        let role = match (&self.sink, phase) {
            (_, Some(Phase::Failed)) => Role::Failed,
            (_, Some(Phase::Fenced)) => Role::Fenced,
            (_, Some(Phase::Unprotected { .. })) => Role::Unprotected,
            (SinkKind::Directory, _) => Role::Checkpointing,
            (SinkKind::Peer(_), _) => Role::Primary,
            // Waiting for a standby (--listen) and one has joined.
            (SinkKind::None, Some(_)) => Role::Primary,
            (SinkKind::None, _) if self.taken_over => Role::Unprotected,
            (SinkKind::None, _) => Role::Standalone,
        };
        let lag_epochs = status.map_or(0, |s| match (s.last_cut, s.last_complete) {
            (Some(c), Some(d)) => c.saturating_sub(d),
            (Some(_), None) => 1,
            (None, _) => 0,
        });
        let lag_bytes = match phase {
            Some(Phase::PreCopy { .. }) => self.memory_bytes,
            _ => status.map_or(0, |s| s.in_flight_bytes),
        };
        VmInfo {
            role,
            state: if self.paused.load(Ordering::Acquire) {
                "paused"
            } else {
                "running"
            }
            .into(),
            phase: phase.map(|p| p.name().to_string()),
            cpus: u8::try_from(self.controls.len()).unwrap_or(u8::MAX),
            memory_bytes: self.memory_bytes,
            sink: match self.sink {
                SinkKind::None => "none",
                SinkKind::Directory => "directory",
                SinkKind::Peer(_) => "peer",
            }
            .into(),
            peer: match &self.sink {
                SinkKind::Peer(a) => Some(a.clone()),
                _ => None,
            },
            protected: role == Role::Primary && status.is_some_and(|s| s.last_complete.is_some()),
            epoch: status.and_then(|s| s.last_cut),
            last_complete: status.and_then(|s| s.last_complete),
            lag_epochs,
            lag_bytes,
            last_pause_us: status.and_then(|s| s.last_pause_us),
            held_output_bytes: self.gate.held_bytes() as u64,
        }
    }
}

const TOKEN_INBOX: u32 = 0;

impl MutEventSubscriber for ApiControl {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            self.inbox.evt(),
            TOKEN_INBOX,
            EventSet::IN,
        )) {
            tracing::warn!("cannot watch the API's requests: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        for p in self.inbox.drain() {
            self.carry_out(p);
        }
    }
}
