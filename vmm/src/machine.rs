//! A machine: the one place where a [`VmConfig`] becomes a running VM.
//!
//! [`Machine::new`] opens KVM, creates the VM with its in-kernel irqchip and PIT,
//! allocates and registers memory, attaches the devices, loads the kernel and
//! configures the vCPUs. [`Machine::run`] starts one thread per vCPU, runs the
//! device event loop on the calling thread until something ends the run (the
//! guest's debug exit or reset, a guest error, SIGINT/SIGTERM, Ctrl-A x), stops the
//! vCPUs, and reports why the run ended.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::bus::{lock_recover, Bus};
use devices::legacy::I8042State;
use devices::legacy::{DebugExit, I8042};
use devices::serial::{SerialDevice, SerialDeviceState};
use devices::snapshot::Snapshot;
use devices::virtio::block::{Block, BlockState};
use devices::virtio::mmio::{MmioTransport, MmioTransportState};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{self, BootError, DEFAULT_INITRD_ADDR_MAX};
use crate::checkpoint::SavedConfig;
use crate::config::{DiskConfig, KernelSource, SerialConfig, VmConfig};
use crate::console::{EscapeDecoder, Keystroke, OutputGate, RawTerminal};
use crate::disk::StoreMode;
use crate::epoch::{DeviceCut, DiskCommit, EpochConfig, EpochEngine};
use crate::layout::*;
use crate::memory::{self, GuestMemory, MemoryError};
use crate::mptable::{self, MptableError};
use crate::vcpu::{self, Vcpu, VcpuControl, VcpuError, VcpuStop};
use devices::store::Store;

/// How long the last checkpoint of a run may take to be written.
pub const FINAL_CHECKPOINT_DEADLINE: Duration = Duration::from_secs(30);

/// How long stopping vCPUs may take before one is declared stuck.
pub const VCPU_STOP_DEADLINE: Duration = Duration::from_secs(3);

/// Failures while building or running a machine.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// /dev/kvm is missing or cannot be opened.
    #[error("cannot open {path}: {source}{hint}")]
    OpenKvm {
        /// The device node.
        path: String,
        /// Cause.
        source: kvm_ioctls::Error,
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
    #[error("{what} failed: {source}")]
    Kvm {
        /// The ioctl.
        what: &'static str,
        /// Cause.
        source: kvm_ioctls::Error,
    },
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Kernel loading and boot structures.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// The MP table.
    #[error(transparent)]
    Mptable(#[from] MptableError),
    /// vCPU configuration.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The kernel file could not be opened.
    #[error("cannot open kernel {path}: {source}")]
    OpenKernel {
        /// The file.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The kernel file is unusable.
    #[error("kernel {path}: {source}")]
    Kernel {
        /// The file.
        path: String,
        /// What is wrong with it.
        source: BootError,
    },
    /// The initramfs file could not be opened.
    #[error("cannot open initramfs {path}: {source}")]
    OpenInitramfs {
        /// The file.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The serial output file could not be created.
    #[error("cannot create serial output file {path}: {source}")]
    SerialFile {
        /// The file.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// A disk could not be attached.
    #[error(transparent)]
    Disk(#[from] crate::disk::DiskError),
    /// An eventfd, signalfd or thread could not be created.
    #[error("cannot create {what}: {source}")]
    Os {
        /// What was being created.
        what: &'static str,
        /// Cause.
        source: std::io::Error,
    },
    /// Putting a device on a bus failed.
    #[error("cannot place a device on the bus: {0}")]
    Bus(#[from] devices::bus::BusError),
    /// The device event loop failed.
    #[error("device event loop failed: {0:?}")]
    EventLoop(event_manager::Error),
    /// A writable disk without checkpoint regions under epochs.
    #[error("disk {0} is writable but not checkpointed: with --checkpoint-dir every writable disk needs checkpoint=on (or readonly=on), or its writes would run ahead of the checkpoints")]
    UncheckpointedDisk(String),
    /// Checkpoint files.
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    /// The epoch engine could not start.
    #[error(transparent)]
    Epoch(#[from] crate::epoch::EpochError),
    /// A checkpointed disk could not be retired into its base image at the end.
    #[error("disk {path}: cannot retire its checkpoint regions at shutdown (the journal keeps them; `mirrorvm disk recover` applies them): {source}")]
    DiskShutdown {
        /// The image.
        path: String,
        /// Cause.
        source: devices::store::Error,
    },
    /// A checkpoint's content cannot be restored.
    #[error("cannot restore: {0}")]
    Restore(String),
    /// A vCPU did not leave KVM_RUN when kicked.
    #[error("vCPU {0} did not leave KVM_RUN within {1:?} of being kicked: the guest is stuck in an instruction KVM cannot interrupt (see ENVIRONMENT.md: vmcall under kvm_pvm); giving up on it")]
    VcpuStuck(u8, Duration),
}

/// Why a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEnd {
    /// The guest wrote this value to the debug-exit port.
    GuestExit(u8),
    /// The guest reset the machine (i8042 0xfe: Linux's `reboot=k`, or a panic with
    /// `panic=N`).
    Reset,
    /// The VMM received this signal (SIGINT, SIGTERM).
    Signal(i32),
    /// The user typed Ctrl-A x on the console.
    Quit,
    /// The guest did something that stops it (internal error, triple fault, …).
    GuestError(String),
}

impl RunEnd {
    /// The process exit status that reports this end: the guest's own value for a
    /// debug exit, 0 for a reset or quit, 128+signal for a signal, 2 for a guest error.
    pub fn exit_code(&self) -> i32 {
        match self {
            RunEnd::GuestExit(v) => i32::from(*v),
            RunEnd::Reset | RunEnd::Quit => 0,
            RunEnd::Signal(s) => 128 + s,
            RunEnd::GuestError(_) => 2,
        }
    }
}

/// The first reason to end the run, and the eventfd that wakes the event loop.
pub struct Shutdown {
    reason: Mutex<Option<RunEnd>>,
    evt: EventFd,
}

impl Shutdown {
    fn new() -> Result<Self, VmmError> {
        Ok(Shutdown {
            reason: Mutex::new(None),
            evt: EventFd::new(libc::EFD_NONBLOCK).map_err(|source| VmmError::Os {
                what: "the shutdown eventfd",
                source,
            })?,
        })
    }

    /// Ends the run for `reason` unless it is already ending for another.
    pub fn request(&self, reason: RunEnd) {
        let mut r = lock_recover(&self.reason);
        if r.is_none() {
            *r = Some(reason);
        }
        drop(r);
        let _ = self.evt.write(1);
    }

    /// Why the run is ending, once it is.
    pub fn reason(&self) -> Option<RunEnd> {
        lock_recover(&self.reason).clone()
    }
}

/// The device event loop's own events: shutdown requests, signals, console input.
struct Control {
    shutdown: Arc<Shutdown>,
    signals: SignalFd,
    serial: Arc<Mutex<SerialDevice>>,
    stdin: bool,
    escape: EscapeDecoder,
}

const TOKEN_SHUTDOWN: u32 = 0;
const TOKEN_SIGNAL: u32 = 1;
const TOKEN_STDIN: u32 = 2;

impl MutEventSubscriber for Control {
    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::with_data(
            &self.shutdown.evt,
            TOKEN_SHUTDOWN,
            EventSet::IN,
        ));
        let _ = ops.add(Events::with_data_raw(
            self.signals.as_raw_fd(),
            TOKEN_SIGNAL,
            EventSet::IN,
        ));
        if self.stdin {
            // epoll refuses regular files (stdin redirected from a file): then there
            // is simply no console input.
            if ops
                .add(Events::with_data_raw(
                    libc::STDIN_FILENO,
                    TOKEN_STDIN,
                    EventSet::IN,
                ))
                .is_err()
            {
                self.stdin = false;
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_SHUTDOWN => {
                let _ = self.shutdown.evt.read();
            }
            TOKEN_SIGNAL => {
                if let Ok(Some(info)) = self.signals.read_signal() {
                    self.shutdown.request(RunEnd::Signal(info.ssi_signo as i32));
                }
            }
            TOKEN_STDIN => {
                let mut buf = [0u8; 64];
                // SAFETY: reads into a stack buffer of the stated length.
                let n =
                    unsafe { libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), buf.len()) };
                if n <= 0 {
                    // EOF or error: stop watching stdin; the guest keeps running.
                    let _ = ops.remove(Events::with_data_raw(
                        libc::STDIN_FILENO,
                        TOKEN_STDIN,
                        EventSet::IN,
                    ));
                    return;
                }
                let mut to_guest = Vec::with_capacity(n as usize);
                for &b in &buf[..n as usize] {
                    match self.escape.feed(b) {
                        Keystroke::Guest(b) => to_guest.push(b),
                        Keystroke::Quit => self.shutdown.request(RunEnd::Quit),
                        Keystroke::None => {}
                    }
                }
                if !to_guest.is_empty() {
                    // Bytes beyond the UART's FIFO are dropped, as a real UART would.
                    let _ = lock_recover(&self.serial).enqueue_input(&to_guest);
                }
            }
            _ => {}
        }
    }
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// A virtio-blk disk as attached: the device, its transport, and where it came from.
pub struct AttachedDisk {
    /// The block device (also an event-loop subscriber).
    pub block: Arc<Mutex<Block>>,
    /// Its virtio-mmio transport (on the MMIO bus).
    pub transport: Arc<Mutex<MmioTransport>>,
    /// The image path.
    pub path: std::path::PathBuf,
    /// Whether the guest may not write.
    pub readonly: bool,
    /// The checkpoint store, for `checkpoint=on`.
    pub store: Option<Arc<Mutex<devices::store::Store>>>,
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

/// A block device and its transport, as the cut saves them.
type DiskPair = (Arc<Mutex<Block>>, Arc<Mutex<MmioTransport>>);

/// The devices as the epoch engine sees them.
struct MachineDevices {
    gate: Arc<OutputGate>,
    serial: Arc<Mutex<SerialDevice>>,
    i8042: Arc<Mutex<I8042>>,
    disks: Vec<DiskPair>,
    stores: Vec<Arc<Mutex<Store>>>,
}

impl DeviceCut for MachineDevices {
    fn drain(&mut self) {
        for (block, _) in &self.disks {
            lock_recover(block).process_pending();
        }
    }

    fn save(&mut self) -> Result<Vec<u8>, String> {
        let state = DevicesState {
            serial: lock_recover(&self.serial).snapshot(),
            i8042: lock_recover(&self.i8042).snapshot(),
            disks: self
                .disks
                .iter()
                .map(|(b, t)| (lock_recover(t).snapshot(), lock_recover(b).snapshot()))
                .collect(),
        };
        postcard::to_stdvec(&state).map_err(|e| e.to_string())
    }

    fn start_checkpoint(&mut self, epoch: u64) -> Result<u64, String> {
        // Console output of this epoch waits for its checkpoint.
        self.gate.seal(epoch);
        let mut bytes = 0;
        for store in &self.stores {
            let mut s = lock_recover(store);
            s.start_checkpoint(epoch).map_err(|e| e.to_string())?;
            bytes += s.status().frozen.last().map_or(0, |r| r.used_bytes);
        }
        // A write deferred for lack of room goes again into the new active region.
        if !self.stores.is_empty() {
            for (block, _) in &self.disks {
                let _ = lock_recover(block).kick_evt().write(1);
            }
        }
        Ok(bytes)
    }

    fn wants_cut(&self) -> bool {
        self.stores
            .iter()
            .any(|s| lock_recover(s).end_epoch_early())
    }

    fn complete(&mut self, epoch: u64) {
        self.gate.release(epoch);
    }
}

/// The disks' side of a complete checkpoint, on the exporter thread.
struct StoreCommit {
    stores: Vec<Arc<Mutex<Store>>>,
}

impl DiskCommit for StoreCommit {
    fn seal(&mut self, epoch: u64) -> Result<(), String> {
        for store in &self.stores {
            lock_recover(store)
                .export_meta(epoch)
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn commit(&mut self, epoch: u64) -> Result<(), String> {
        for store in &self.stores {
            lock_recover(store)
                .acknowledge(epoch)
                .map_err(|e| e.to_string())?;
            // The copy into the base image runs without the store's lock, so the
            // device keeps serving the guest meanwhile.
            let job = lock_recover(store)
                .prepare_retire(epoch)
                .map_err(|e| e.to_string())?;
            let result = job.run();
            lock_recover(store)
                .finish_retire(job, result)
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// How a machine comes to life.
enum Init<'a> {
    /// Boot a kernel.
    Boot(&'a VmConfig),
    /// Continue from a checkpoint directory.
    Restore(&'a RestoreConfig),
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

/// A built VM, ready to run.
pub struct Machine {
    // Field order matters for drop: vCPUs and the VM go before the memory they map.
    vcpus: Vec<Vcpu>,
    vm: Arc<VmFd>,
    _kvm: Kvm,
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
    epoch: Option<EpochConfig>,
    first_epoch: u64,
    cut_request: Option<Arc<EventFd>>,
}

fn open_kvm(path: &std::path::Path) -> Result<Kvm, VmmError> {
    let shown = path.display().to_string();
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| VmmError::NotKvm(shown.clone()))?;
    let kvm = Kvm::new_with_path(&c_path).map_err(|source| {
        let hint = match source.errno() {
            libc::ENOENT => " (it does not exist: this host has no KVM; load kvm_intel or kvm_amd, or run on a host with virtualization)",
            libc::EACCES | libc::EPERM => " (permission denied: run as root or add yourself to the 'kvm' group)",
            _ => "",
        };
        VmmError::OpenKvm { path: shown.clone(), source, hint }
    })?;
    // KVM_API_VERSION has been 12 since Linux 2.6.22; anything else is not KVM.
    if kvm.get_api_version() != 12 {
        return Err(VmmError::NotKvm(shown));
    }
    Ok(kvm)
}

/// Before a restore touches any disk: each checkpointed disk's journal must be the
/// one the checkpoint was taken with.
fn check_journals(saved: &SavedConfig) -> Result<(), VmmError> {
    for (disk, id) in saved.disks.iter().zip(&saved.journal_ids) {
        let Some(id) = id else { continue };
        let found = devices::store::inspect(&disk.path)
            .map_err(|e| VmmError::Restore(format!("disk {}: {e}", disk.path.display())))?
            .header
            .journal_id;
        if found != *id {
            return Err(VmmError::Restore(format!(
                "disk {}: its journal (id {found:#x}) is not the one this checkpoint was taken with (id {id:#x})",
                disk.path.display()
            )));
        }
    }
    Ok(())
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { what, source }
}

fn serial_output(serial: &SerialConfig) -> Result<(Box<dyn Write + Send>, bool), VmmError> {
    Ok(match serial {
        SerialConfig::Tty => (Box::new(std::io::stdout()), true),
        SerialConfig::File(p) => (
            Box::new(File::create(p).map_err(|source| VmmError::SerialFile {
                path: p.display().to_string(),
                source,
            })?),
            false,
        ),
        SerialConfig::Off => (Box::new(std::io::sink()), false),
    })
}

impl Machine {
    /// Builds the machine `config` describes, ready to boot its kernel.
    pub fn new(config: &VmConfig) -> Result<Machine, VmmError> {
        Self::build(Init::Boot(config))
    }

    /// Rebuilds the machine of the latest complete checkpoint in `cfg.from`, ready to
    /// continue where the checkpoint was cut.
    pub fn restore(cfg: &RestoreConfig) -> Result<Machine, VmmError> {
        Self::build(Init::Restore(cfg))
    }

    fn build(init: Init) -> Result<Machine, VmmError> {
        // What to build, and checks that need no KVM first, so bad input is reported
        // as such.
        let (memory_size, cpus, disk_cfgs, serial_cfg, kvm_device, epoch) = match &init {
            Init::Boot(c) => (
                c.memory,
                c.cpus,
                c.disks.clone(),
                c.serial.clone(),
                c.kvm_device.clone(),
                c.epoch.clone(),
            ),
            Init::Restore(r) => {
                let saved = crate::checkpoint::peek_config(&r.from)?;
                let disks = saved.disks.clone();
                (
                    saved.memory,
                    saved.cpus,
                    disks,
                    r.serial.clone(),
                    r.kvm_device.clone(),
                    r.epoch.clone(),
                )
            }
        };
        memory::check_size(memory_size)?;
        mptable::build(cpus)?;
        if epoch.is_some() {
            if let Some(d) = disk_cfgs.iter().find(|d| !d.readonly && !d.checkpoint) {
                return Err(VmmError::UncheckpointedDisk(d.path.display().to_string()));
            }
        }
        let mut kernel_file = None;
        let mut initramfs = None;
        if let Init::Boot(config) = &init {
            if let KernelSource::File(p) = &config.kernel {
                let mut f = File::open(p).map_err(|source| VmmError::OpenKernel {
                    path: p.display().to_string(),
                    source,
                })?;
                boot::detect_format(&mut f).map_err(|source| VmmError::Kernel {
                    path: p.display().to_string(),
                    source,
                })?;
                kernel_file = Some(f);
            }
            if let Some(p) = &config.initramfs {
                initramfs = Some(File::open(p).map_err(|source| VmmError::OpenInitramfs {
                    path: p.display().to_string(),
                    source,
                })?);
            }
        }
        // A restore recovers every checkpointed disk to the epoch of the checkpoint
        // (the memory side names it); a boot to the last acknowledged one.
        // A restore reads and checks the whole checkpoint chain into memory first,
        // so a bad directory is refused before any disk is touched.
        let mem = memory::create(memory_size)?;
        let loaded = match &init {
            Init::Restore(r) => {
                let c = crate::checkpoint::load_latest(&r.from, &mem)?;
                let state = c.state()?;
                let devices: DevicesState = postcard::from_bytes(&state.devices).map_err(|e| {
                    VmmError::Restore(format!("cannot decode the device state: {e}"))
                })?;
                if state.vcpus.len() != usize::from(cpus) || devices.disks.len() != disk_cfgs.len()
                {
                    return Err(VmmError::Restore(
                        "the checkpoint's vCPU or disk count does not match its configuration"
                            .into(),
                    ));
                }
                let next = c.epoch.checked_add(1).ok_or_else(|| {
                    VmmError::Restore(format!("checkpoint epoch {} cannot be continued", c.epoch))
                })?;
                tracing::info!("restoring checkpoint {} from {}", c.epoch, r.from.display());
                Some((c.epoch, next, state, devices))
            }
            Init::Boot(_) => None,
        };
        let restore_epoch = loaded.as_ref().map(|l| l.0);
        if let Some((_, _, state, _)) = &loaded {
            check_journals(&state.config)?;
        }
        let disks = disk_cfgs
            .iter()
            .map(|d| crate::disk::open(d, restore_epoch))
            .collect::<Result<Vec<_>, _>>()?;
        let cut_request = match epoch {
            Some(_) => Some(Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(
                |source| VmmError::Os {
                    what: "the cut-request eventfd",
                    source,
                },
            )?)),
            None => None,
        };
        let store_mode = match &cut_request {
            Some(evt) => StoreMode::Epochs(evt.clone()),
            None => StoreMode::Local,
        };
        let (restored, first_epoch) = match loaded {
            Some((_, next, state, devices)) => (Some((state, devices)), next),
            None => {
                // Checkpoint numbers continue each store's own.
                let next = disks
                    .iter()
                    .filter_map(|d| d.store.as_ref())
                    .map(|s| lock_recover(s).status().last_epoch + 1)
                    .max()
                    .unwrap_or(1);
                (None, next)
            }
        };
        if disks.len() > (MAX_GSI - VIRTIO_FIRST_GSI + 1) as usize {
            return Err(crate::disk::DiskError::TooMany(disks.len()).into());
        }

        let kvm = open_kvm(&kvm_device)?;
        if !kvm.check_extension(kvm_ioctls::Cap::Irqchip)
            || !kvm.check_extension(kvm_ioctls::Cap::ImmediateExit)
        {
            return Err(VmmError::KvmCapability(
                "in-kernel irqchip and immediate_exit",
            ));
        }
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        // Ordering: the TSS address and the irqchip must exist before any vCPU is
        // created (KVM creates each vCPU's LAPIC against the irqchip); the PIT after
        // the irqchip, which it injects into.
        vm.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        vm.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;

        // With epochs, KVM logs guest writes from the start.
        memory::register(&vm, &mem, epoch.is_some())?;

        let shutdown = Arc::new(Shutdown::new()?);
        let mut pio = Bus::new();
        let mut mmio = Bus::new();
        let mut events: EventManager<Subscriber> =
            EventManager::new().map_err(VmmError::EventLoop)?;

        // Legacy devices.
        let (serial_out, attach_stdin) = serial_output(&serial_cfg)?;
        // Output commit: with checkpoints, console output waits for its checkpoint.
        let gate = OutputGate::new(serial_out, epoch.is_some());
        let serial_out: Box<dyn Write + Send> = Box::new(gate.writer());
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| VmmError::Os {
            what: "the serial interrupt eventfd",
            source,
        })?;
        let irq_for_kvm = serial_irq.try_clone().map_err(|source| VmmError::Os {
            what: "the serial interrupt eventfd",
            source,
        })?;
        let serial = match &restored {
            Some((_, d)) => SerialDevice::restore(&d.serial, serial_irq, serial_out)
                .map_err(|e| VmmError::Restore(format!("serial: {e}")))?,
            None => SerialDevice::with_interrupt(serial_irq, serial_out),
        };
        vm.register_irqfd(&irq_for_kvm, SERIAL_GSI)
            .map_err(kvm_err("KVM_IRQFD (serial)"))?;
        let serial = Arc::new(Mutex::new(serial));
        pio.insert(serial.clone(), u64::from(SERIAL_PORT), 8)?;
        let s = shutdown.clone();
        let mut i8042 = I8042::new(Box::new(move || s.request(RunEnd::Reset)));
        if let Some((_, d)) = &restored {
            i8042
                .set_state(d.i8042.clone())
                .map_err(|e| VmmError::Restore(format!("i8042: {e}")))?;
        }
        let i8042 = Arc::new(Mutex::new(i8042));
        pio.insert(
            i8042.clone(),
            // One range over 0x60..=0x64: the device decodes data (0x60) and
            // command/status (0x64) by offset.
            u64::from(I8042_DATA_PORT),
            u64::from(I8042_COMMAND_PORT - I8042_DATA_PORT) + 1,
        )?;
        let s = shutdown.clone();
        pio.insert(
            Arc::new(Mutex::new(DebugExit::new(Box::new(move |v| {
                s.request(RunEnd::GuestExit(v))
            })))),
            u64::from(DEBUG_EXIT_PORT),
            1,
        )?;

        // virtio-mmio disks.
        let mut cmdline = match &init {
            Init::Boot(c) => c.base_cmdline().to_string(),
            Init::Restore(_) => String::new(),
        };
        let mut attached = Vec::new();
        for (i, disk) in disks.into_iter().enumerate() {
            let base = VIRTIO_MMIO_BASE + i as u64 * VIRTIO_MMIO_SIZE;
            let gsi = VIRTIO_FIRST_GSI + i as u32;
            let saved = restored.as_ref().map(|(_, d)| &d.disks[i]);
            attached.push(crate::disk::attach(
                disk,
                &vm,
                &mem,
                &mut mmio,
                &mut events,
                base,
                gsi,
                saved,
                &store_mode,
            )?);
            cmdline.push_str(&format!(" virtio_mmio.device=4K@{base:#x}:{gsi}"));
        }

        let pio = Arc::new(pio);
        let mmio = Arc::new(mmio);
        vcpu::install_kick_handler()?;
        let mut vcpus = Vec::with_capacity(usize::from(cpus));
        let cmdline = match (&init, &restored) {
            (Init::Boot(config), _) => {
                // Kernel, initramfs, command line, zero page, boot tables, MP table.
                let kernel = match kernel_file.as_mut() {
                    Some(f) => boot::load_kernel(&mem, f)?,
                    None => boot::load_kernel_bytes(&mem, crate::testguest::ELF)?,
                };
                let initrd = match initramfs.as_mut() {
                    Some(f) => {
                        let max = kernel.setup_header.map_or(DEFAULT_INITRD_ADDR_MAX, |h| {
                            u64::from(h.initrd_addr_max).max(0xfff_ffff)
                        });
                        Some(boot::load_initramfs(&mem, f, kernel.end, max)?)
                    }
                    None => None,
                };
                boot::load_cmdline(&mem, &cmdline)?;
                boot::write_zero_page(&mem, &kernel, cmdline.len() + 1, initrd)?;
                boot::write_boot_tables(&mem)?;
                mptable::write(&mem, config.cpus)?;
                let supported = kvm
                    .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
                    .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
                let mut tsc_khz = None;
                for index in 0..cpus {
                    let fd = vm
                        .create_vcpu(u64::from(index))
                        .map_err(kvm_err("KVM_CREATE_VCPU"))?;
                    if index == 0 {
                        tsc_khz = fd.get_tsc_khz().ok().filter(|&k| k > 0);
                    }
                    let mut cpuid = supported.clone();
                    crate::cpuid::filter(&mut cpuid, index, cpus, tsc_khz).map_err(|_| {
                        VmmError::KvmCapability("room for the TSC-frequency CPUID leaf")
                    })?;
                    let v = Vcpu::new(index, fd, pio.clone(), mmio.clone());
                    v.configure(&cpuid, (index == 0).then_some(kernel.entry))?;
                    vcpus.push(v);
                }
                cmdline
            }
            (Init::Restore(_), Some((state, _))) => {
                // Ordering: VM state (clock, PIT, irqchips) before the vCPUs, whose
                // LAPICs then see the IOAPIC routing in place; devices were restored
                // above and are re-kicked after the vCPUs (post_restore below).
                state
                    .vm
                    .restore(&vm)
                    .map_err(|e| VmmError::Restore(e.to_string()))?;
                for (index, vs) in state.vcpus.iter().enumerate() {
                    let fd = vm
                        .create_vcpu(index as u64)
                        .map_err(kvm_err("KVM_CREATE_VCPU"))?;
                    let v = Vcpu::new(index as u8, fd, pio.clone(), mmio.clone());
                    v.restore_state(vs)?;
                    vcpus.push(v);
                }
                state.config.cmdline.clone()
            }
            (Init::Restore(_), None) => return Err(VmmError::Restore("no state".into())),
        };
        if epoch.is_some() {
            if let Some(v0) = vcpus.first() {
                let list = Arc::new(vcpu::readable_msrs(&kvm, v0.fd()));
                for v in &mut vcpus {
                    v.set_msr_list(list.clone());
                }
            }
        }
        if restored.is_some() {
            for d in &attached {
                lock_recover(&d.transport).post_restore();
            }
        }

        Ok(Machine {
            vcpus,
            vm: Arc::new(vm),
            _kvm: kvm,
            mem,
            serial,
            gate,
            i8042,
            disks: attached,
            shutdown,
            events,
            attach_stdin,
            cmdline,
            memory_size,
            epoch,
            first_epoch,
            cut_request,
        })
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

    /// Runs the guest until something ends the run; see [`RunEnd`].
    pub fn run(mut self) -> Result<RunEnd, VmmError> {
        // SIGINT and SIGTERM are blocked on this thread before any vCPU thread exists,
        // so every thread inherits the mask and the signals are only ever read from
        // the signalfd by the event loop.
        let mut mask = SigSet::empty();
        mask.add(Signal::SIGINT);
        mask.add(Signal::SIGTERM);
        let mut old_mask = SigSet::empty();
        nix::sys::signal::pthread_sigmask(
            nix::sys::signal::SigmaskHow::SIG_BLOCK,
            Some(&mask),
            Some(&mut old_mask),
        )
        .map_err(|e| VmmError::Os {
            what: "the signal mask",
            source: e.into(),
        })?;
        let result = self.run_blocked(mask);
        let _ = nix::sys::signal::pthread_sigmask(
            nix::sys::signal::SigmaskHow::SIG_SETMASK,
            Some(&old_mask),
            None,
        );
        result
    }

    fn run_blocked(&mut self, mask: SigSet) -> Result<RunEnd, VmmError> {
        let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
            .map_err(|e| VmmError::Os {
            what: "the signalfd",
            source: e.into(),
        })?;
        let _raw = if self.attach_stdin {
            RawTerminal::stdin()
        } else {
            None
        };
        let control = Arc::new(Mutex::new(Control {
            shutdown: self.shutdown.clone(),
            signals,
            serial: self.serial.clone(),
            stdin: self.attach_stdin,
            escape: EscapeDecoder::default(),
        }));
        self.events.add_subscriber(control);

        // Everything that can fail is set up before any guest code runs.
        let controls: Vec<Arc<VcpuControl>> = self
            .vcpus
            .iter()
            .map(|v| VcpuControl::new(v.index()))
            .collect();
        let mut engine = None;
        if let Some(cfg) = &self.epoch {
            let sink = crate::checkpoint::DirectorySink::new(&cfg.dir)?;
            let stores: Vec<_> = self.disks.iter().filter_map(|d| d.store.clone()).collect();
            let devices = MachineDevices {
                gate: self.gate.clone(),
                serial: self.serial.clone(),
                i8042: self.i8042.clone(),
                disks: self
                    .disks
                    .iter()
                    .map(|d| (d.block.clone(), d.transport.clone()))
                    .collect(),
                stores: stores.clone(),
            };
            let cut_request = match &self.cut_request {
                Some(e) => Some(e.try_clone().map_err(|source| VmmError::Os {
                    what: "the cut-request eventfd",
                    source,
                })?),
                None => None,
            };
            let saved = SavedConfig {
                memory: self.memory_size,
                cpus: controls.len() as u8,
                cmdline: self.cmdline.clone(),
                disks: self
                    .disks
                    .iter()
                    .map(|d| DiskConfig {
                        path: d.path.clone(),
                        readonly: d.readonly,
                        checkpoint: d.store.is_some(),
                    })
                    .collect(),
                journal_ids: self
                    .disks
                    .iter()
                    .map(|d| {
                        d.store
                            .as_ref()
                            .map(|s| lock_recover(s).file_header().journal_id)
                    })
                    .collect(),
            };
            let s = self.shutdown.clone();
            let e = EpochEngine::new(
                cfg,
                Box::new(sink),
                self.vm.clone(),
                self.mem.clone(),
                controls.clone(),
                Box::new(devices),
                Box::new(StoreCommit { stores }),
                cut_request,
                saved,
                self.first_epoch,
                Box::new(move |msg| {
                    s.request(RunEnd::GuestError(format!("checkpointing failed: {msg}")))
                }),
            )?;
            let e = Arc::new(Mutex::new(e));
            self.events.add_subscriber(e.clone());
            engine = Some(e);
        }

        let (done_tx, done_rx) = mpsc::channel::<u8>();
        let mut threads = Vec::new();
        for (mut vcpu, control) in self.vcpus.drain(..).zip(controls.iter().cloned()) {
            let (ctl, shutdown, done) = (control.clone(), self.shutdown.clone(), done_tx.clone());
            let index = vcpu.index();
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || {
                    if let VcpuStop::GuestError(msg) = vcpu.run(&ctl) {
                        shutdown.request(RunEnd::GuestError(msg));
                    }
                    let _ = done.send(index);
                    vcpu
                })
                .map_err(|source| VmmError::Os {
                    what: "a vCPU thread",
                    source,
                })?;
            threads.push(handle);
        }
        let loop_result = loop {
            if self.shutdown.reason().is_some() {
                break Ok(());
            }
            if let Err(e) = self.events.run_with_timeout(100) {
                break Err(VmmError::EventLoop(e));
            }
        };
        if let Err(e) = &loop_result {
            self.shutdown.request(RunEnd::GuestError(format!("{e}")));
        }

        // How checkpointing ends. When the guest itself ended the run (exit, reset,
        // error) the checkpoint in flight may land, and the directory is marked
        // finished: there is nothing to resume. When the user stopped it (signal,
        // Ctrl-A x), one final checkpoint is cut with the vCPUs parked, so that
        // `restore` resumes the guest where it was stopped; its disks are then at
        // exactly that checkpoint. If that fails, the last complete checkpoint
        // stands: disks and held output are left as they are, for it.
        let user_stop = matches!(
            self.shutdown.reason(),
            Some(RunEnd::Signal(_) | RunEnd::Quit)
        ) && loop_result.is_ok();
        let mut final_result = Ok(());
        let mut commit_disks = true;
        if let Some(e) = &engine {
            let mut e = lock_recover(e);
            if user_stop {
                commit_disks = false;
                match e.finish(FINAL_CHECKPOINT_DEADLINE) {
                    Ok(epoch) => tracing::info!("final checkpoint {epoch} written"),
                    Err(err) => final_result = Err(VmmError::Epoch(err)),
                }
            } else {
                e.shutdown(FINAL_CHECKPOINT_DEADLINE);
            }
        }

        // Stop the vCPUs: set every stop flag, then kick until each thread reports.
        let deadline = Instant::now() + VCPU_STOP_DEADLINE;
        let mut running: Vec<bool> = vec![true; threads.len()];
        while running.iter().any(|r| *r) {
            for (i, c) in controls.iter().enumerate() {
                if running[i] {
                    c.request_stop();
                }
            }
            match done_rx.recv_timeout(Duration::from_millis(10)) {
                Ok(i) => running[i as usize] = false,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            if Instant::now() > deadline {
                let stuck = running.iter().position(|r| *r).unwrap_or(0) as u8;
                return Err(VmmError::VcpuStuck(stuck, VCPU_STOP_DEADLINE));
            }
        }
        for h in threads {
            if let Ok(v) = h.join() {
                self.vcpus.push(v);
            }
        }
        if final_result.is_err() {
            // The held output belongs to checkpoints that never completed.
            let _ = lock_recover(&self.serial).output_mut().flush();
            return final_result.map(|_| RunEnd::Quit);
        }
        // Everything the guest wrote is released on a clean end.
        self.gate.open();
        let _ = lock_recover(&self.serial).output_mut().flush();
        // The guest ended (or there are no epochs): every checkpointed disk's
        // regions go into its base image, which then alone holds the guest's disk.
        if commit_disks {
            for d in &self.disks {
                if let Some(store) = &d.store {
                    if let Err(source) = crate::disk::commit_all(store) {
                        return Err(VmmError::DiskShutdown {
                            path: d.path.display().to_string(),
                            source,
                        });
                    }
                }
            }
            if let (Some(cfg), Some(reason)) = (&self.epoch, self.shutdown.reason()) {
                crate::checkpoint::mark_finished(&cfg.dir, &format!("{reason:?}"))?;
            }
        }
        loop_result?;
        Ok(self.shutdown.reason().unwrap_or(RunEnd::Quit))
    }
}
