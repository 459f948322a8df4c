//! Where a restore reads checkpoints from: the [`CheckpointSource`] trait.
//!
//! A source hands over the stream's [`Manifest`] first (so the machine can be built
//! with the right memory, vCPUs and disks), then guest memory brought to its latest
//! complete checkpoint together with that checkpoint's machine state. A directory
//! allocates memory and replays its chain into it ([`super::directory`]); a replica
//! ([`ReplicaSource`]) already holds memory in place, as a standby that applied every
//! checkpoint does, and hands it over without a copy.

use super::{MachineState, Manifest};
use crate::memory::GuestMemory;

/// A boxed cause.
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

/// Failures reading a checkpoint source.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The source cannot provide a checkpoint (its own error says why).
    #[error("cannot read the checkpoint")]
    Unreadable(#[source] Cause),
    /// The source holds no complete checkpoint.
    #[error("no complete checkpoint to restore")]
    NoCheckpoint,
}

/// Memory and state at a source's latest complete checkpoint.
#[derive(Debug)]
pub struct Restored {
    /// The checkpoint's epoch.
    pub epoch: u64,
    /// Guest memory, holding that checkpoint.
    pub memory: GuestMemory,
    /// The machine state cut with it.
    pub state: MachineState,
}

/// A place a restore reads checkpoints from.
pub trait CheckpointSource {
    /// Where the checkpoints come from, for messages (a directory path, a peer).
    fn describe(&self) -> String;
    /// The one-time facts of the stream.
    fn manifest(&mut self) -> Result<Manifest, SourceError>;
    /// Guest memory at the latest complete checkpoint, with its state. Checks
    /// everything it reads before returning, so a bad source is refused before any
    /// disk is touched.
    fn load(&mut self) -> Result<Restored, SourceError>;
}

/// A replica held in memory: a manifest, guest memory already at a checkpoint, and
/// that checkpoint's state. A standby taking over builds its machine from one, so
/// its memory is used in place.
pub struct ReplicaSource {
    manifest: Manifest,
    restored: Option<Restored>,
    what: String,
}

impl ReplicaSource {
    /// A replica at checkpoint `restored.epoch` of the stream `manifest` describes.
    pub fn new(manifest: Manifest, restored: Restored, what: impl Into<String>) -> Self {
        ReplicaSource {
            manifest,
            restored: Some(restored),
            what: what.into(),
        }
    }
}

impl CheckpointSource for ReplicaSource {
    fn describe(&self) -> String {
        self.what.clone()
    }

    fn manifest(&mut self) -> Result<Manifest, SourceError> {
        Ok(self.manifest.clone())
    }

    /// Hands over the replica's memory (once).
    fn load(&mut self) -> Result<Restored, SourceError> {
        self.restored.take().ok_or(SourceError::NoCheckpoint)
    }
}
