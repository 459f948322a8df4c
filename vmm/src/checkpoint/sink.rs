//! Where checkpoints go: the [`CheckpointSink`] trait.
//!
//! A sink is chosen in configuration ([`crate::config::SinkConfig`]) and opened where
//! the configuration becomes a machine; the epoch engine's exporter drives it from
//! its own thread, in this order:
//!
//! ```text
//! begin(manifest) ─▶ write_base(memory, E) ─▶ write(E+1) ─▶ write(E+2) ─▶ … ─▶ end(how)
//!                          ▲                                  │
//!                          └──── SinkError::BaseLost ◀────────┘  (a new peer: send all of memory again)
//! ```
//!
//! Errors say what the engine should do, not where they happened: a sink keeps its
//! own error types (file paths, peer addresses) and hands them over as the source of
//! a [`SinkError`]. A [`SinkError::Failed`] is retried with backoff, never dropped; a
//! [`SinkError::Lost`] ends protection (the primary runs on unprotected);
//! [`SinkError::BaseLost`] restarts the pre-copy.
//!
//! A peer (standby host) sink plugs in here as one more implementation: it sends the
//! manifest in its hello, the base as the initial copy, each checkpoint as frames,
//! and returns from [`CheckpointSink::write`] once the standby acknowledged it.

use super::{Checkpoint, Manifest, ReplicaId};
use crate::dirty::{DirtySet, StagedPages};
use crate::memory::GuestMemory;

/// How disk regions travel in checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageMode {
    /// The sink reaches the same disk journals (a local directory, shared storage):
    /// checkpoints carry region metadata only.
    Shared,
    /// The sink keeps its own copy of every disk: checkpoints carry region data.
    Replicated,
}

/// A boxed cause.
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

/// What went wrong at a sink, as the engine needs to know it.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// This attempt failed; the same data may be offered again (retried with backoff).
    #[error("the checkpoint sink failed")]
    Failed(#[source] Cause),
    /// The sink no longer holds a base image (a new peer): all of memory must be sent
    /// again before checkpoints mean anything to it.
    #[error("the checkpoint sink lost its base image and needs all of memory again")]
    BaseLost,
    /// The sink is gone for good (the peer died or refused us): stop protecting.
    #[error("the checkpoint sink is lost")]
    Lost(#[source] Cause),
    /// The sink is gone and this host cannot prove it may go on alone (it could not
    /// record that it runs unprotected, or another host took the fence): release
    /// nothing and retire nothing from now on.
    #[error("the checkpoint sink is lost and this host no longer holds the fence")]
    Fenced(#[source] Cause),
}

impl SinkError {
    /// A transient failure caused by `e`.
    pub fn failed(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        SinkError::Failed(Box::new(e))
    }
}

/// How a run ended, as a sink records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkEnd {
    /// The guest ended the run itself: there is nothing to resume.
    Finished {
        /// How, for a log.
        how: String,
        /// The primary's exit status (a standby exits with the same).
        exit_status: i32,
    },
    /// The user stopped the run after a final checkpoint: resume from it.
    Stopped {
        /// The primary's exit status.
        exit_status: i32,
    },
    /// The user handed the guest to the standby after a final checkpoint
    /// (switchover): the standby resumes it now.
    Handover,
}

/// What the primary knows of the pages changed since a checkpoint a standby might
/// still hold: a pre-copy to a standby holding one of the replicas it `covers` needs
/// to send only `pages` (re-protection without a full copy of memory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseDelta {
    /// The last checkpoint complete at a sink (or the one this guest was resumed
    /// from): `pages` holds every page written since.
    pub complete: ReplicaId,
    /// This host's lineage, and the newest checkpoint it cut (`complete.epoch` or
    /// later; a replica of a checkpoint cut after `complete` differs from the guest only
    /// in pages that `pages` holds too).
    pub lineage: u64,
    /// The newest checkpoint cut in `lineage`, if any.
    pub newest: Option<u64>,
    /// Every page written since `complete`.
    pub pages: DirtySet,
}

impl BaseDelta {
    /// Whether a replica named `id` differs from the guest only in `pages`.
    pub fn covers(&self, id: &ReplicaId) -> bool {
        *id == self.complete
            || (id.lineage == self.lineage
                && self.newest.is_some_and(|n| id.epoch <= n)
                && (self.complete.lineage != self.lineage || id.epoch > self.complete.epoch))
    }
}

/// A destination for checkpoints. Each method returns once what it wrote is durable
/// there (a directory: synced; a peer: applied and acknowledged).
pub trait CheckpointSink: Send {
    /// How disk regions must travel to this sink.
    fn storage(&self) -> StorageMode;
    /// The one-time facts, once, before anything else.
    fn begin(&mut self, manifest: &Manifest) -> Result<(), SinkError>;
    /// Pre-copy: all of `mem`, read while the guest runs, becomes the base that
    /// checkpoint `epoch + 1` completes. Until then the base alone is not restorable.
    /// A sink that holds a replica `delta` covers (a standby that rejoins) needs only
    /// `delta.pages`; sinks that never hold one ignore it. Returns the bytes written.
    fn write_base(
        &mut self,
        mem: &GuestMemory,
        epoch: u64,
        delta: Option<&BaseDelta>,
    ) -> Result<u64, SinkError>;
    /// A later pre-copy round: `pages`, read again while the guest runs because it
    /// wrote them during the previous round, replace their copies in the base of
    /// `epoch`. Returns the bytes written.
    fn write_base_pages(&mut self, pages: &StagedPages, epoch: u64) -> Result<u64, SinkError>;
    /// Makes checkpoint `c` durable; returns the bytes written.
    fn write(&mut self, c: &Checkpoint) -> Result<u64, SinkError>;
    /// The run ended: record how.
    fn end(&mut self, how: &SinkEnd) -> Result<(), SinkError>;
    /// After a handover ([`SinkEnd::Handover`]): where the host that now runs the
    /// guest accepts a standby (`--join`), so this one can become it. `None` for
    /// sinks that run no guest.
    fn rejoin_addr(&self) -> Option<String> {
        None
    }

    /// The engine did not take this sink (it has a destination already, or does
    /// not run unprotected): tell the destination why, if it can hear it, before
    /// the sink is dropped.
    fn decline(&mut self, _why: &str) {}
}
