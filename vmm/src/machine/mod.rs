//! A machine: KVM VM, memory, vCPUs and devices, built from a configuration and run.
//!
//! - `build.rs`: the one place where a configuration (a boot, or a checkpoint source
//!   for a restore) becomes a machine, and where its checkpoint sink is opened.
//! - `run.rs`: the run loop: vCPU threads, the device event loop, and carrying out
//!   the end-of-run plan of `epoch::ending`.
//! - `control.rs`: what ends a run: the shutdown latch, signals, console input.
//! - `adapters.rs`: the machine as the epoch engine sees it.
//! - `api.rs`: the API's commands (`--api-socket`), carried out on the device loop.

mod adapters;
mod api;
mod build;
mod control;
mod joins;
mod run;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::legacy::{I8042State, I8042};
use devices::serial::{SerialDevice, SerialDeviceState};
use devices::virtio::block::BlockState;
use devices::virtio::mmio::MmioTransportState;
use event_manager::{EventManager, MutEventSubscriber};
use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::checkpoint::sink::CheckpointSink;
use crate::checkpoint::source::SourceError;
use crate::config::{EpochConfig, SerialConfig};
use crate::disk::AttachedDisk;
use crate::memory::GuestMemory;
use crate::output::OutputGate;
use crate::vcpu::Vcpu;

pub use crate::run_end::RunEnd;
pub use control::Shutdown;

/// How long the last checkpoint of a run may take to be written.
pub const FINAL_CHECKPOINT_DEADLINE: Duration = Duration::from_secs(30);

/// How long stopping vCPUs may take before one is declared stuck.
pub const VCPU_STOP_DEADLINE: Duration = Duration::from_secs(3);

/// Failures while building or running a machine.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The standby cannot be reached or the fence cannot be taken.
    #[error("cannot mirror to the standby")]
    Peer(#[source] crate::replication::peer::PeerError),
    /// /dev/kvm is missing or cannot be opened. The cause is shown inline, before
    /// the hint about what to do, so it is not also a `source()`.
    #[error("cannot open {path}: {cause}{hint}")]
    OpenKvm {
        /// The device node.
        path: String,
        /// Cause.
        cause: kvm_ioctls::Error,
        /// What to do about it.
        hint: &'static str,
    },
    /// The device node does not speak the KVM API.
    #[error("{0} is not a KVM device (KVM_GET_API_VERSION did not answer 12)")]
    NotKvm(String),
    /// KVM's API version or a capability we need is missing.
    #[error("KVM lacks a capability mirrorvm needs: {0}")]
    KvmCapability(&'static str),
    /// A VM-level KVM ioctl failed.
    #[error("{what} failed")]
    Kvm {
        /// The ioctl.
        what: &'static str,
        /// Cause.
        source: kvm_ioctls::Error,
    },
    /// Manual dirty-log protection could not be switched on.
    #[error("cannot set up dirty-page tracking")]
    DirtyTracking(#[source] crate::dirty::DirtyError),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    /// Kernel loading and boot structures.
    #[error(transparent)]
    Boot(#[from] crate::boot::BootError),
    /// The MP table.
    #[error(transparent)]
    Mptable(#[from] crate::mptable::MptableError),
    /// vCPU configuration.
    #[error(transparent)]
    Vcpu(#[from] crate::vcpu::VcpuError),
    /// The kernel file could not be opened.
    #[error("cannot open kernel {path}")]
    OpenKernel {
        /// The file.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The kernel file is unusable.
    #[error("kernel {path}")]
    Kernel {
        /// The file.
        path: String,
        /// What is wrong with it.
        source: crate::boot::BootError,
    },
    /// The initramfs file could not be opened.
    #[error("cannot open initramfs {path}")]
    OpenInitramfs {
        /// The file.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The serial output file could not be created.
    #[error("cannot create serial output file {path}")]
    SerialFile {
        /// The file.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// A disk could not be opened or attached.
    #[error(transparent)]
    Disk(#[from] crate::disk::DiskError),
    /// An eventfd, signalfd or thread could not be created.
    #[error("cannot create {what}")]
    Os {
        /// What was being created.
        what: &'static str,
        /// Cause.
        source: std::io::Error,
    },
    /// Putting a device on a bus failed.
    #[error("cannot place a device on the bus")]
    Bus(#[from] devices::bus::BusError),
    /// The device event loop failed.
    #[error("device event loop failed")]
    EventLoop(#[source] event_manager::Error),
    /// A writable disk without checkpoint regions under epochs.
    #[error("disk {0} is writable but not checkpointed: with checkpoints every writable disk needs checkpoint=on (or readonly=on), or its writes would run ahead of the checkpoints")]
    UncheckpointedDisk(String),
    /// The checkpoint directory could not be opened as a sink.
    #[error(transparent)]
    Sink(#[from] crate::checkpoint::directory::DirectoryError),
    /// The Prometheus endpoint cannot be served.
    #[error(transparent)]
    Metrics(#[from] crate::telemetry::EndpointError),
    /// The epoch engine failed.
    #[error(transparent)]
    Epoch(#[from] crate::epoch::EpochError),
    /// A checkpointed disk could not be retired into its base image at the end.
    #[error("disk {path}: cannot retire its checkpoint regions at shutdown (the journal keeps them; `mirrorvm disk recover` applies them)")]
    DiskShutdown {
        /// The image.
        path: String,
        /// Cause.
        source: devices::store::Error,
    },
    /// The checkpoint source could not be read.
    #[error("cannot restore from {what}")]
    Source {
        /// The source.
        what: String,
        /// Cause.
        source: SourceError,
    },
    /// The saved device state cannot be decoded.
    #[error("cannot restore: the device state does not decode")]
    DecodeDevices(#[source] postcard::Error),
    /// The checkpoint's state does not match its manifest.
    #[error("cannot restore: the checkpoint has {found} {what}, its manifest {expected}")]
    StateMismatch {
        /// vCPUs or disks.
        what: &'static str,
        /// In the state.
        found: usize,
        /// In the manifest.
        expected: usize,
    },
    /// A checkpoint's epoch cannot be continued.
    #[error("cannot restore: checkpoint epoch {0} cannot be continued")]
    EpochOverflow(u64),
    /// A checkpointed disk's journal cannot be read to check its id.
    #[error("cannot restore: disk {path}")]
    JournalUnreadable {
        /// The image.
        path: String,
        /// Cause.
        source: devices::store::Error,
    },
    /// A checkpointed disk's journal is not the one the checkpoint was taken with.
    #[error("cannot restore: disk {path}: its journal (id {found:#x}) is not the one this checkpoint was taken with (id {expected:#x})")]
    JournalMismatch {
        /// The image.
        path: String,
        /// The journal's id.
        found: u64,
        /// The id in the manifest.
        expected: u64,
    },
    /// The manifest lists a journal id for a disk that is not checkpointed, or none
    /// for one that is.
    #[error("cannot restore: disk {0} is listed without the journal id a checkpointed disk needs")]
    JournalMissing(String),
    /// A device's saved state was refused.
    #[error("cannot restore the {what}")]
    RestoreDevice {
        /// The device.
        what: &'static str,
        /// Cause.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The VM's saved state (irqchips, PIT, clock) was refused.
    #[error("cannot restore the VM state")]
    RestoreVm(#[source] crate::vm_state::VmStateError),
    /// A vCPU did not leave KVM_RUN when kicked.
    #[error("vCPU {0} did not leave KVM_RUN within {1:?} of being kicked: the guest is stuck in an instruction KVM cannot interrupt (see ENVIRONMENT.md: vmcall under kvm_pvm); giving up on it")]
    VcpuStuck(u8, Duration),
}

/// The state of every device, as one serde value in the checkpoint.
#[derive(Debug, Serialize, Deserialize)]
pub struct DevicesState {
    /// COM1.
    pub serial: SerialDeviceState,
    /// The i8042.
    pub i8042: I8042State,
    /// Each disk's transport and block device, in attach order.
    pub disks: Vec<(MmioTransportState, BlockState)>,
}

/// What `mirrorvm restore` needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreConfig {
    /// The checkpoint directory.
    pub from: std::path::PathBuf,
    /// Serial console of the restored guest.
    pub serial: SerialConfig,
    /// The KVM device node.
    pub kvm_device: std::path::PathBuf,
    /// Keep checkpointing the restored guest.
    pub epoch: Option<EpochConfig>,
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Checkpointing, as configured: the sink is opened when the machine is built.
struct Checkpointing {
    config: EpochConfig,
    /// The registry the engine feeds (`--metrics-addr`).
    telemetry: Option<crate::telemetry::Telemetry>,
    sink: Box<dyn CheckpointSink>,
    first_epoch: u64,
    cut_request: Arc<EventFd>,
    /// This run's lineage: its checkpoints are named `(lineage, epoch)`.
    lineage: u64,
    /// The checkpoint the guest was resumed from by a takeover, by name.
    resumed_from: Option<crate::checkpoint::ReplicaId>,
    /// The fence, shared by every standby session of this run.
    fence: Option<crate::replication::peer::SharedFence>,
    /// Where standbys dial in, and the settings of their sessions.
    joins: Option<(
        crate::replication::join::JoinListener,
        crate::replication::peer::PeerConfig,
    )>,
}

/// What a primary holds after it handed its guest to the standby (switchover): its
/// memory, exactly the final checkpoint's, so it can become that standby's standby
/// without a copy.
pub struct HandedOver {
    /// Guest memory, parked at the final checkpoint.
    pub memory: GuestMemory,
    /// The machine.
    pub manifest: crate::checkpoint::Manifest,
    /// The final checkpoint, by name.
    pub replica: crate::checkpoint::ReplicaId,
    /// Where the new primary accepts a standby (`--join`).
    pub rejoin: Option<String>,
}

/// A built VM, ready to run.
pub struct Machine {
    // Field order matters for drop: vCPUs and the VM go before the memory they map.
    vcpus: Vec<Vcpu>,
    vm: Arc<VmFd>,
    kvm: Kvm,
    mem: GuestMemory,
    serial: Arc<Mutex<SerialDevice>>,
    gate: Arc<OutputGate>,
    i8042: Arc<Mutex<I8042>>,
    disks: Vec<AttachedDisk>,
    shutdown: Arc<Shutdown>,
    events: EventManager<Subscriber>,
    attach_stdin: bool,
    cmdline: String,
    memory_size: u64,
    checkpointing: Option<Checkpointing>,
    /// The Prometheus endpoint, served while the machine lives.
    metrics_endpoint: Option<crate::telemetry::MetricsEndpoint>,
    on_running: Option<Box<dyn FnOnce() + Send>>,
    /// Told what this host holds once it handed the guest to its standby.
    on_handover: Option<Box<dyn FnOnce(HandedOver) + Send>>,
    /// This run's lineage, once checkpointing started.
    lineage: Option<u64>,
    /// Where the API's requests come in, if it serves one.
    api: Option<crate::api::Endpoint>,
    /// Resumed by a standby that took over from its primary.
    pub(crate) taken_over: bool,
}

impl Machine {
    /// Makes a machine built to wait for a standby (a [`SinkConfig::Await`] sink)
    /// accept standbys that dial it on `listener` (`standby --join`), with sessions
    /// set up as `session` says, under `fence`. `resumed_from` names the checkpoint
    /// the guest was resumed from: a standby holding that replica gets only the
    /// pages written since. A standby that took over calls this before it runs.
    ///
    /// [`SinkConfig::Await`]: crate::config::SinkConfig::Await
    pub fn accept_standbys(
        &mut self,
        listener: crate::replication::join::JoinListener,
        session: crate::replication::peer::PeerConfig,
        fence: Option<crate::replication::peer::SharedFence>,
        resumed_from: crate::checkpoint::ReplicaId,
    ) {
        if let Some(cp) = &mut self.checkpointing {
            eprintln!(
                "mirrorvm: accepting standbys (standby --join) on {}",
                listener.local_addr()
            );
            cp.joins = Some((listener, session));
            cp.fence = fence;
            cp.resumed_from = Some(resumed_from);
        }
    }

    /// The command line the guest was given (with the devices appended).
    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// The guest's memory.
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// The KVM VM.
    pub fn vm(&self) -> &VmFd {
        &self.vm
    }

    /// A handle to end the run from elsewhere (tests, a control socket).
    pub fn shutdown_handle(&self) -> Arc<Shutdown> {
        self.shutdown.clone()
    }

    /// Answers the API's requests at `endpoint` while the guest runs (from the
    /// start of [`Machine::run`] until the run ends).
    pub fn serve_api(&mut self, endpoint: crate::api::Endpoint) {
        self.api = Some(endpoint);
    }

    /// Calls `f` once every vCPU thread is started (a standby taking over times its
    /// resume with it).
    /// Calls `f` once this primary handed its guest to the standby (switchover),
    /// with what it holds: the caller can make it that standby's standby.
    pub fn on_handover(&mut self, f: Box<dyn FnOnce(HandedOver) + Send>) {
        self.on_handover = Some(f);
    }

    /// Calls `f` once every vCPU runs.
    pub fn on_running(&mut self, f: Box<dyn FnOnce() + Send>) {
        self.on_running = Some(f);
    }

    /// Keeps `endpoint` serving while this machine runs (a standby that takes over
    /// hands over the endpoint it served as a standby).
    pub fn keep_metrics_endpoint(&mut self, endpoint: crate::telemetry::MetricsEndpoint) {
        self.metrics_endpoint = Some(endpoint);
    }

    /// Shows console bytes the guest wrote before this machine existed (a standby
    /// taking over shows what its primary held back), continuing the console stream
    /// at `offset + bytes.len()`.
    pub fn show_console(&self, offset: u64, bytes: &[u8]) {
        self.gate.show(offset, bytes);
    }
}
