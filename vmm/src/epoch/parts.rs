//! The small traits over what the epoch engine drives. The machine implements them
//! over KVM and its devices (`machine/adapters.rs`); the model test implements them
//! with fakes (`model_test.rs`), so the engine runs without KVM.

use super::error::{Cause, CutError, PauseError};
use crate::checkpoint::{Console, DiskRegion, MachineState, StorageMode};
use crate::dirty::{DirtySet, Protect, StagedPages};

/// The vCPUs, as a cut pauses and resumes them.
pub trait Vcpus: Send {
    /// Kicks every vCPU out of KVM_RUN and waits until all are parked.
    fn pause(&mut self) -> Result<(), PauseError>;
    /// Lets every vCPU run again.
    fn resume(&mut self);
}

/// The pages written since the last harvest (KVM's log ∪ the VMM's own writes).
///
/// Ordering rule (`crate::dirty` explains it): a page's re-protection
/// ([`DirtyLog::protect`]) must be complete before its copy is taken and before the
/// vCPUs resume. A write between a copy and a later re-protection is lost.
pub trait DirtyLog: Send {
    /// Reads the log without re-protecting anything: a page stays reported until
    /// [`DirtyLog::protect`] re-protects it.
    fn read(&mut self) -> Result<DirtySet, CutError>;
    /// Re-protects the pages of `set` that `how` picks (all, or all but the hot
    /// ones), so their next write is logged; returns how many pages stay hot.
    fn protect(&mut self, set: &DirtySet, how: Protect) -> Result<u64, CutError>;
    /// Reads the log and re-protects every page it reports (a pre-copy pass, which
    /// copies afterwards, guest running).
    fn harvest(&mut self) -> Result<DirtySet, CutError> {
        let set = self.read()?;
        self.protect(&set, Protect::All)?;
        Ok(set)
    }
    /// Copies the pages of `set` into `into` (guest quiescent).
    fn copy(&mut self, set: &DirtySet, into: &mut StagedPages) -> Result<(), CutError>;
    /// A checkpoint of `pages` pages took `took` to export (the policy weighs what
    /// a page costs to send). Nothing by default.
    fn observe_export(&mut self, pages: usize, took: std::time::Duration) {
        let _ = (pages, took);
    }
}

/// The machine's state at a cut.
pub trait StateCapture: Send {
    /// Processes pending device notifications so no event is lost at the cut.
    fn drain(&mut self);
    /// Saves devices, then vCPUs, then the VM (irqchips, PIT, clock), in that order.
    fn save(&mut self) -> Result<MachineState, CutError>;
}

/// The disks at a cut, on the device loop.
pub trait DiskCut: Send {
    /// Freezes the active regions as checkpoint `epoch`'s and opens new ones; returns
    /// the bytes in the regions just frozen.
    fn start_checkpoint(&mut self, epoch: u64) -> Result<u64, CutError>;
    /// Whether a region passed its high-water mark or deferred a write (cut early).
    fn wants_cut(&self) -> bool;
}

/// Output commit (the console).
pub trait Output: Send {
    /// At cut `epoch`: what was written since the previous cut belongs to it. Returns
    /// those bytes with their offset in the console stream (a standby shows them if
    /// it takes over before the primary could).
    fn seal(&mut self, epoch: u64) -> Console;
    /// Checkpoint `epoch` is complete: release its output and everything before.
    fn release(&mut self, epoch: u64);
    /// Release everything held and stop holding (unprotected, or a clean end).
    fn release_all(&mut self);
    /// Hold output again from now on (a standby joined an unprotected primary).
    fn hold(&mut self);
}

/// The disks' side of a checkpoint after the cut, on the exporter thread.
pub trait DiskCommit: Send {
    /// Makes the regions frozen at cut `epoch` durable and returns what the sink
    /// needs of them (`mode`: metadata or data).
    fn seal(&mut self, epoch: u64, mode: StorageMode) -> Result<Vec<DiskRegion>, Cause>;
    /// Checkpoint `epoch` is complete: acknowledge and retire its regions (commit
    /// them to the base images, free the slots).
    fn retire(&mut self, epoch: u64) -> Result<(), Cause>;
    /// No sink any more: acknowledge and retire every frozen region locally.
    fn retire_all(&mut self) -> Result<(), Cause>;
}

/// The machine parts a cut drives.
pub struct Parts {
    /// The vCPUs.
    pub vcpus: Box<dyn Vcpus>,
    /// The dirty log.
    pub dirty: Box<dyn DirtyLog>,
    /// Device, vCPU and VM state.
    pub state: Box<dyn StateCapture>,
    /// Region swaps.
    pub disks: Box<dyn DiskCut>,
    /// Output commit.
    pub output: Box<dyn Output>,
}
