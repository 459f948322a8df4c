//! What goes wrong in the epoch engine, each failure with its cause attached.

use std::time::Duration;

use super::Phase;

/// Why a vCPU would not pause.
#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    /// The vCPU's thread has ended (the run is ending for its own reason).
    #[error("vCPU {0} has stopped running")]
    Exited(u8),
    /// The vCPU could not be paused (stuck in KVM_RUN, or its control failed).
    #[error("cannot pause the vCPUs")]
    Failed(#[source] Cause),
}

/// A boxed cause.
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

/// A failed step of a cut, with its cause.
#[derive(Debug, thiserror::Error)]
pub enum CutError {
    /// The dirty log could not be read.
    #[error("cannot read the dirty log")]
    DirtyLog(#[source] Cause),
    /// Dirty pages could not be copied.
    #[error("cannot copy the dirty pages")]
    PageCopy(#[source] Cause),
    /// Device state could not be saved.
    #[error("cannot save the device state")]
    Devices(#[source] Cause),
    /// A vCPU's state could not be saved.
    #[error("cannot save a vCPU's state")]
    Vcpu(#[source] Cause),
    /// The VM state (irqchips, PIT, clock) could not be saved.
    #[error("cannot save the VM state")]
    Vm(#[source] Cause),
    /// A disk could not start its new checkpoint region.
    #[error("cannot swap a disk's checkpoint region")]
    DiskRegion(#[source] Cause),
    /// The machine state could not be encoded.
    #[error("cannot encode the machine state")]
    Encode(#[source] crate::checkpoint::ContentError),
}

/// Failures that end checkpointing (and the run).
#[derive(Debug, thiserror::Error)]
pub enum EpochError {
    /// Timer or eventfd creation failed.
    #[error("cannot create the epoch {0}")]
    Os(&'static str, #[source] std::io::Error),
    /// A vCPU would not park.
    #[error("checkpoint {epoch}")]
    Pause {
        /// The checkpoint.
        epoch: u64,
        /// Cause.
        source: PauseError,
    },
    /// A step of the cut failed.
    #[error("checkpoint {epoch}")]
    Cut {
        /// The checkpoint.
        epoch: u64,
        /// Cause.
        source: CutError,
    },
    /// An earlier cut failed; no later one may be cut.
    #[error("checkpoint {0}: an earlier cut failed, so no later checkpoint can be complete")]
    AfterFailure(u64),
    /// The exporter failed to seal or retire a disk region.
    #[error("checkpoint {epoch}: {what}")]
    Commit {
        /// The checkpoint.
        epoch: u64,
        /// The step.
        what: &'static str,
        /// Cause.
        source: Cause,
    },
    /// The exporter thread is gone.
    #[error("the checkpoint exporter has stopped")]
    ExporterGone,
    /// The final checkpoint was not written in time.
    #[error("final checkpoint {epoch} not written within {deadline:?}")]
    FinalTimeout {
        /// The checkpoint.
        epoch: u64,
        /// The deadline.
        deadline: Duration,
    },
    /// There is no sink to write a final checkpoint to.
    #[error("no final checkpoint: the run is {0:?}")]
    NoFinal(Phase),
    /// The metrics could not be written.
    #[error("cannot write metrics")]
    Metrics(#[source] std::io::Error),
}
