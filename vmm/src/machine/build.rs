//! The one place where a configuration becomes a machine: a boot ([`Machine::new`])
//! or a restore from any checkpoint source ([`Machine::from_source`]) both end in
//! `assemble`, which creates the VM, attaches the devices, configures or restores
//! the vCPUs, and opens the checkpoint sink the configuration names.
//!
//! Checks that need no KVM come first, so bad input is reported as such; a restore
//! reads and checks its whole checkpoint before any disk is touched.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use devices::bus::{lock_recover, Bus};
use devices::legacy::{DebugExit, I8042};
use devices::serial::SerialDevice;
use event_manager::EventManager;
use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::Kvm;
use vmm_sys_util::eventfd::EventFd;

use super::control::Shutdown;
use super::{Checkpointing, DevicesState, Machine, RestoreConfig, RunEnd, Subscriber, VmmError};
use crate::boot::{self, DEFAULT_INITRD_ADDR_MAX};
use crate::checkpoint::directory::{DirectorySink, DirectorySource};
use crate::checkpoint::sink::CheckpointSink;
use crate::checkpoint::source::CheckpointSource;
use crate::checkpoint::{MachineState, Manifest};
use crate::config::{DiskConfig, EpochConfig, KernelSource, SerialConfig, SinkConfig, VmConfig};
use crate::disk::{OpenDisk, StoreMode};
use crate::layout::*;
use crate::memory::{self, GuestMemory};
use crate::mptable;
use crate::output::OutputGate;
use crate::vcpu::{self, Vcpu};

/// A kernel to boot, opened and checked.
struct BootPlan {
    cmdline: String,
    cpus: u8,
    kernel: Option<File>,
    initramfs: Option<File>,
}

/// How the machine comes to life.
enum Start {
    /// Boot a kernel.
    Boot(BootPlan),
    /// Continue from a checkpoint's state (memory already holds it).
    Restore {
        cmdline: String,
        state: Box<MachineState>,
        devices: DevicesState,
    },
}

/// Everything `assemble` needs, whatever the machine came from.
struct Plan {
    memory_size: u64,
    mem: GuestMemory,
    cpus: u8,
    disks: Vec<OpenDisk>,
    serial: SerialConfig,
    kvm_device: PathBuf,
    epoch: Option<EpochConfig>,
    first_epoch: u64,
    start: Start,
}

fn open_kvm(path: &Path) -> Result<Kvm, VmmError> {
    let shown = path.display().to_string();
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| VmmError::NotKvm(shown.clone()))?;
    let kvm = Kvm::new_with_path(&c_path).map_err(|source| {
        let hint = match source.errno() {
            libc::ENOENT => " (it does not exist: this host has no KVM; load kvm_intel or kvm_amd, or run on a host with virtualization)",
            libc::EACCES | libc::EPERM => " (permission denied: run as root or add yourself to the 'kvm' group)",
            _ => "",
        };
        VmmError::OpenKvm { path: shown.clone(), cause: source, hint }
    })?;
    // KVM_API_VERSION has been 12 since Linux 2.6.22; anything else is not KVM.
    if kvm.get_api_version() != 12 {
        return Err(VmmError::NotKvm(shown));
    }
    Ok(kvm)
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { what, source }
}

pub(super) fn os_err(what: &'static str) -> impl FnOnce(std::io::Error) -> VmmError {
    move |source| VmmError::Os { what, source }
}

/// The console's destination. A booted guest starts its file afresh; a resumed one
/// (restore, takeover) continues it, so a host that runs the guest again after a
/// switchover keeps what its console showed before.
fn serial_output(
    serial: &SerialConfig,
    resumed: bool,
) -> Result<(Box<dyn Write + Send>, bool), VmmError> {
    Ok(match serial {
        SerialConfig::Tty => (Box::new(std::io::stdout()), true),
        SerialConfig::File(p) => (
            Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .write(true)
                    .append(resumed)
                    .truncate(!resumed)
                    .open(p)
                    .map_err(|source| VmmError::SerialFile {
                        path: p.display().to_string(),
                        source,
                    })?,
            ),
            false,
        ),
        SerialConfig::Off => (Box::new(std::io::sink()), false),
    })
}

/// Checks that need no KVM, common to boot and restore.
fn check(
    memory: u64,
    cpus: u8,
    disks: &[DiskConfig],
    epoch: &Option<EpochConfig>,
) -> Result<(), VmmError> {
    memory::check_size(memory)?;
    mptable::build(cpus)?;
    if epoch.is_some() {
        if let Some(d) = disks.iter().find(|d| !d.readonly && !d.checkpoint) {
            return Err(VmmError::UncheckpointedDisk(d.path.display().to_string()));
        }
    }
    if disks.len() > (MAX_GSI - VIRTIO_FIRST_GSI + 1) as usize {
        return Err(crate::disk::DiskError::TooMany(disks.len()).into());
    }
    Ok(())
}

/// Before a restore touches any disk: each checkpointed disk's journal must be the
/// one the checkpoint was taken with, and every checkpointed disk must name one.
fn check_journals(manifest: &Manifest) -> Result<(), VmmError> {
    for d in &manifest.disks {
        let path = d.config.path.display().to_string();
        let expected = match (d.config.checkpoint, d.journal_id) {
            (true, Some(id)) => id,
            (false, None) => continue,
            _ => return Err(VmmError::JournalMissing(path)),
        };
        let found = devices::store::inspect(&d.config.path)
            .map_err(|source| VmmError::JournalUnreadable {
                path: path.clone(),
                source,
            })?
            .header
            .journal_id;
        if found != expected {
            return Err(VmmError::JournalMismatch {
                path,
                found,
                expected,
            });
        }
    }
    Ok(())
}

/// Opens the sink a configuration names: the one place a sink is chosen. `gate` is
/// the console's output gate (a peer tells its standby what it released). Returns
/// the sink and the fence it holds (a standby that joins later shares it).
#[allow(clippy::type_complexity)]
fn open_sink(
    config: &SinkConfig,
    gate: &OutputGate,
    lineage: u64,
) -> Result<
    (
        Box<dyn CheckpointSink>,
        Option<crate::replication::peer::SharedFence>,
    ),
    VmmError,
> {
    use crate::replication::peer::{open_fence, PeerSink};
    Ok(match config {
        SinkConfig::Directory(d) => (
            Box::new(DirectorySink::open_with(
                &d.path,
                crate::checkpoint::directory::DirectoryOptions {
                    compression: d.compression,
                    fold: d.fold,
                    policy: None,
                    fold_in_line: false,
                },
            )?),
            None,
        ),
        SinkConfig::Peer(peer) => {
            let sink =
                PeerSink::open(peer, gate.released_epoch(), lineage).map_err(VmmError::Peer)?;
            let fence = sink.fence();
            (Box::new(sink), fence)
        }
        SinkConfig::Await(peer) => (
            Box::new(crate::epoch::NoSink),
            open_fence(peer).map_err(VmmError::Peer)?,
        ),
    })
}

/// Opens where standbys dial in (`--listen`), before the VM exists: a bad address
/// costs nothing.
#[allow(clippy::type_complexity)]
fn open_joins(
    config: &SinkConfig,
) -> Result<
    Option<(
        crate::replication::join::JoinListener,
        crate::replication::peer::PeerConfig,
    )>,
    VmmError,
> {
    let (SinkConfig::Peer(p) | SinkConfig::Await(p)) = config else {
        return Ok(None);
    };
    let Some(addr) = &p.listen else {
        return Ok(None);
    };
    let l = crate::replication::join::JoinListener::listen(&p.transport, addr).map_err(|e| {
        VmmError::Peer(crate::replication::peer::PeerError::Listen {
            addr: addr.clone(),
            source: e,
        })
    })?;
    eprintln!(
        "mirrorvm: accepting standbys (standby --join) on {}",
        l.local_addr()
    );
    Ok(Some((l, p.clone())))
}

impl Machine {
    /// Builds the machine `config` describes, ready to boot its kernel.
    pub fn new(config: &VmConfig) -> Result<Machine, VmmError> {
        check(config.memory, config.cpus, &config.disks, &config.epoch)?;
        let mut kernel = None;
        if let KernelSource::File(p) = &config.kernel {
            let mut f = File::open(p).map_err(|source| VmmError::OpenKernel {
                path: p.display().to_string(),
                source,
            })?;
            boot::detect_format(&mut f).map_err(|source| VmmError::Kernel {
                path: p.display().to_string(),
                source,
            })?;
            kernel = Some(f);
        }
        let initramfs = match &config.initramfs {
            Some(p) => Some(File::open(p).map_err(|source| VmmError::OpenInitramfs {
                path: p.display().to_string(),
                source,
            })?),
            None => None,
        };
        // A boot recovers every checkpointed disk to its last acknowledged checkpoint.
        let disks = config
            .disks
            .iter()
            .map(|d| crate::disk::open(d, None))
            .collect::<Result<Vec<_>, _>>()?;
        // Checkpoint numbers continue each store's own.
        let first_epoch = disks
            .iter()
            .filter_map(|d| d.store.as_ref())
            .map(|s| s.lock().status().last_epoch + 1)
            .max()
            .unwrap_or(1);
        let mem = memory::create(config.memory)?;
        assemble(Plan {
            memory_size: config.memory,
            mem,
            cpus: config.cpus,
            disks,
            serial: config.serial.clone(),
            kvm_device: config.kvm_device.clone(),
            epoch: config.epoch.clone(),
            first_epoch,
            start: Start::Boot(BootPlan {
                cmdline: config.base_cmdline().to_string(),
                cpus: config.cpus,
                kernel,
                initramfs,
            }),
        })
    }

    /// Rebuilds the machine of the latest complete checkpoint in `cfg.from`, ready to
    /// continue where the checkpoint was cut.
    pub fn restore(cfg: &RestoreConfig) -> Result<Machine, VmmError> {
        let mut source = DirectorySource::new(&cfg.from);
        Self::from_source(&mut source, &cfg.serial, &cfg.kvm_device, cfg.epoch.clone())
    }

    /// Rebuilds the machine of `source`'s latest complete checkpoint: a directory, or
    /// a replica whose memory is used in place. Every checkpointed disk is recovered
    /// to exactly that checkpoint's epoch.
    pub fn from_source(
        source: &mut dyn CheckpointSource,
        serial: &SerialConfig,
        kvm_device: &Path,
        epoch: Option<EpochConfig>,
    ) -> Result<Machine, VmmError> {
        let what = source.describe();
        let src_err = |source| VmmError::Source {
            what: what.clone(),
            source,
        };
        let manifest = source.manifest().map_err(src_err)?;
        let disk_cfgs: Vec<DiskConfig> = manifest.disks.iter().map(|d| d.config.clone()).collect();
        check(manifest.memory, manifest.cpus, &disk_cfgs, &epoch)?;
        let restored = source.load().map_err(src_err)?;
        let devices: DevicesState =
            postcard::from_bytes(&restored.state.devices).map_err(VmmError::DecodeDevices)?;
        if restored.state.vcpus.len() != usize::from(manifest.cpus) {
            return Err(VmmError::StateMismatch {
                what: "vCPUs",
                found: restored.state.vcpus.len(),
                expected: usize::from(manifest.cpus),
            });
        }
        if devices.disks.len() != manifest.disks.len() {
            return Err(VmmError::StateMismatch {
                what: "disks",
                found: devices.disks.len(),
                expected: manifest.disks.len(),
            });
        }
        let first_epoch = restored
            .epoch
            .checked_add(1)
            .ok_or(VmmError::EpochOverflow(restored.epoch))?;
        tracing::info!("restoring checkpoint {} from {what}", restored.epoch);
        check_journals(&manifest)?;
        let disks = disk_cfgs
            .iter()
            .map(|d| crate::disk::open(d, Some(restored.epoch)))
            .collect::<Result<Vec<_>, _>>()?;
        assemble(Plan {
            memory_size: manifest.memory,
            mem: restored.memory,
            cpus: manifest.cpus,
            disks,
            serial: serial.clone(),
            kvm_device: kvm_device.to_path_buf(),
            epoch,
            first_epoch,
            start: Start::Restore {
                cmdline: manifest.cmdline,
                state: Box::new(restored.state),
                devices,
            },
        })
    }
}

fn assemble(plan: Plan) -> Result<Machine, VmmError> {
    let Plan {
        memory_size,
        mem,
        cpus,
        disks,
        serial: serial_cfg,
        kvm_device,
        epoch,
        first_epoch,
        mut start,
    } = plan;
    // The hot-page policy wants the host's fault cost when checkpointing starts:
    // the probe (a few ms, its own small VM) runs beside the machine's building, so
    // a restore does not wait for it before its guest runs.
    if epoch.is_some() && std::env::var_os("MIRRORVM_FAULT_US").is_none() {
        // (Its thread never takes SIGINT or SIGTERM: the machine reads them.)
        let device = kvm_device.clone();
        let _ = crate::run_end::without_stop_signals(|| {
            std::thread::Builder::new()
                .name("fault-probe".into())
                .spawn(move || {
                    if let Ok(kvm) = open_kvm(&device) {
                        crate::fault_probe::measure_ahead(&kvm);
                    }
                })
        });
    }
    // Output commit: with checkpoints, console output waits for its checkpoint.
    let resumed = matches!(start, Start::Restore { .. });
    let (serial_out, attach_stdin) = serial_output(&serial_cfg, resumed)?;
    let gate = OutputGate::new(serial_out, epoch.is_some());
    // The metrics endpoint listens before anything else is reached, so a bad
    // address costs nothing.
    let (telemetry, metrics_endpoint) = epoch
        .as_ref()
        .and_then(|e| e.metrics_addr.as_deref())
        .map(|addr| crate::telemetry::start(addr, crate::telemetry::Role::Primary))
        .transpose()?
        .unzip();
    // The sink is opened (a directory locked, a standby reached) before the VM exists.
    let checkpointing = match &epoch {
        Some(config) => {
            let lineage = crate::checkpoint::new_lineage();
            let joins = open_joins(&config.sink)?;
            let (sink, fence) = open_sink(&config.sink, &gate, lineage)?;
            Some(Checkpointing {
                config: config.clone(),
                telemetry,
                sink,
                first_epoch,
                cut_request: Arc::new(
                    EventFd::new(libc::EFD_NONBLOCK).map_err(os_err("the cut-request eventfd"))?,
                ),
                lineage,
                resumed_from: None,
                fence,
                joins,
            })
        }
        None => None,
    };
    let store_mode = match &checkpointing {
        Some(c) => StoreMode::Epochs(c.cut_request.clone()),
        None => StoreMode::Local,
    };

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
    vm.set_tss_address(crate::arch::to_usize(KVM_TSS_ADDRESS))
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;

    // With epochs, KVM logs guest writes from the start.
    memory::register(&vm, &mem, checkpointing.is_some())?;

    let shutdown = Arc::new(Shutdown::new().map_err(os_err("the shutdown eventfd"))?);
    let mut pio = Bus::new();
    let mut mmio = Bus::new();
    let mut events: EventManager<Subscriber> = EventManager::new().map_err(VmmError::EventLoop)?;

    // Legacy devices.
    let serial_out: Box<dyn Write + Send> = Box::new(gate.writer());
    let serial_irq =
        EventFd::new(libc::EFD_NONBLOCK).map_err(os_err("the serial interrupt eventfd"))?;
    let irq_for_kvm = serial_irq
        .try_clone()
        .map_err(os_err("the serial interrupt eventfd"))?;
    let saved = match &start {
        Start::Restore { devices, .. } => Some(devices),
        Start::Boot(_) => None,
    };
    let serial = match saved {
        Some(d) => SerialDevice::restore(&d.serial, serial_irq, serial_out).map_err(|e| {
            VmmError::RestoreDevice {
                what: "serial port",
                source: Box::new(e),
            }
        })?,
        None => SerialDevice::with_interrupt(serial_irq, serial_out),
    };
    let mut serial = serial;
    let full = gate.clone();
    serial.set_busy_probe(Box::new(move || full.is_full()));
    vm.register_irqfd(&irq_for_kvm, SERIAL_GSI)
        .map_err(kvm_err("KVM_IRQFD (serial)"))?;
    let serial = Arc::new(Mutex::new(serial));
    pio.insert(serial.clone(), u64::from(SERIAL_PORT), 8)?;
    let s = shutdown.clone();
    let mut i8042 = I8042::new(Box::new(move || s.request(RunEnd::Reset)));
    if let Some(d) = saved {
        i8042
            .set_state(d.i8042.clone())
            .map_err(|e| VmmError::RestoreDevice {
                what: "i8042",
                source: Box::new(e),
            })?;
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
    let mut cmdline = match &start {
        Start::Boot(b) => b.cmdline.clone(),
        Start::Restore { cmdline, .. } => cmdline.clone(),
    };
    let mut attached = Vec::new();
    for (i, disk) in disks.into_iter().enumerate() {
        let base = VIRTIO_MMIO_BASE + i as u64 * VIRTIO_MMIO_SIZE;
        // At most MAX_GSI - VIRTIO_FIRST_GSI + 1 disks (checked in `plan`): i fits.
        #[allow(clippy::cast_possible_truncation)]
        let gsi = VIRTIO_FIRST_GSI + i as u32;
        let saved_disk = saved.map(|d| &d.disks[i]);
        attached.push(crate::disk::attach(
            disk,
            &vm,
            &mem,
            &mut mmio,
            &mut events,
            base,
            gsi,
            saved_disk,
            &store_mode,
        )?);
        if let Start::Boot(_) = start {
            cmdline.push_str(&format!(" virtio_mmio.device=4K@{base:#x}:{gsi}"));
        }
    }

    let pio = Arc::new(pio);
    let mmio = Arc::new(mmio);
    vcpu::install_kick_handler()?;
    let mut vcpus = Vec::with_capacity(usize::from(cpus));
    match &mut start {
        Start::Boot(b) => {
            // Kernel, initramfs, command line, zero page, boot tables, MP table.
            let kernel = match b.kernel.as_mut() {
                Some(f) => boot::load_kernel(&mem, f)?,
                None => boot::load_kernel_bytes(&mem, crate::testguest::ELF)?,
            };
            let initrd = match b.initramfs.as_mut() {
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
            mptable::write(&mem, b.cpus)?;
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
        }
        Start::Restore { state, .. } => {
            // Ordering: VM state (clock, PIT, irqchips) before the vCPUs, whose
            // LAPICs then see the IOAPIC routing in place; devices were restored
            // above and are re-kicked after the vCPUs (post_restore below).
            state.vm.restore(&vm).map_err(VmmError::RestoreVm)?;
            for (index, vs) in (0..cpus).zip(&state.vcpus) {
                let fd = vm
                    .create_vcpu(u64::from(index))
                    .map_err(kvm_err("KVM_CREATE_VCPU"))?;
                let v = Vcpu::new(index, fd, pio.clone(), mmio.clone());
                v.restore_state(vs)?;
                vcpus.push(v);
            }
        }
    }
    if checkpointing.is_some() {
        if let Some(v0) = vcpus.first() {
            let list = Arc::new(vcpu::readable_msrs(&kvm, v0.fd()));
            for v in &mut vcpus {
                v.set_msr_list(list.clone());
            }
        }
    }
    if let Start::Restore { .. } = start {
        for d in &attached {
            lock_recover(&d.transport).post_restore();
        }
    }

    Ok(Machine {
        vcpus,
        vm: Arc::new(vm),
        kvm,
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
        checkpointing,
        metrics_endpoint,
        on_running: None,
        on_handover: None,
        lineage: None,
        api: None,
        taken_over: false,
    })
}
