//! The `mirrorvm` command line: parse, hand the configuration to the `vmm` library,
//! report, exit. Everything it does is a library call tests can make too.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use clap::{Args, Parser, Subcommand};
use std::time::Duration;
use vmm::checkpoint::pagecodec::Compression;
use vmm::config::{
    self, DiskConfig, EpochConfig, KernelSource, SerialConfig, SinkConfig, VmConfig,
};
use vmm::epoch::EpochLength;
use vmm::machine::RestoreConfig;
use vmm::replication::liveness::LivenessConfig;
use vmm::replication::peer::PeerConfig;
use vmm::replication::protocol::{WireConfig, OLDEST_VERSION, VERSION};
use vmm::replication::standby::{Standby, StandbyConfig, StandbyEnd};
use vmm::replication::transport::Transport;
use vmm::{Machine, RunEnd};

/// mirrorvm: a KVM virtual machine monitor that keeps a peer host ready to take over.
#[derive(Parser, Debug)]
#[command(name = "mirrorvm", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a guest and run it until it exits, resets or is stopped.
    ///
    /// With no --kernel, boots the built-in test guest (workload `hello` unless
    /// --cmdline names another: hello, disk, dirty, counter, smp, mix, pauses, hostile,
    /// fault; see resources/testguest/README.md).
    /// On the console, Ctrl-A x quits.
    Run(RunArgs),

    /// Continue a guest from the latest complete checkpoint in a directory written by
    /// `run --checkpoint-dir`: memory, vCPUs, devices and disks as they were at the cut.
    Restore(RestoreArgs),

    /// Stand by for a primary (`run --peer`): receive its initial copy and every
    /// checkpoint, and take over when it dies. Exits with the primary's status when it
    /// ends its run in order; after a takeover, with the guest's.
    Standby(StandbyArgs),

    /// Inspect, verify or recover the checkpoint journal of a disk image used with
    /// `--disk path=IMAGE,checkpoint=on` (the journal is IMAGE.mvj).
    #[command(subcommand)]
    Disk(DiskCommand),

    /// Send a command to a running mirrorvm's API socket (`--api-socket`) and print
    /// its JSON answer (docs/api.md). Exits 0 if it was carried out, 1 if refused.
    Ctl(CtlArgs),

    /// Planned switchover: ask the primary at its API socket to hand the guest to
    /// its standby (a final checkpoint, the standby resumes it, the old primary
    /// becomes its standby without a copy). The same as `ctl switchover`.
    Switchover(SwitchoverArgs),

    /// Show mirroring and failover: a primary on host-a mirrors a guest to a standby
    /// on host-b (two network namespaces as root, else loopback), is killed with
    /// SIGKILL, and the standby takes over while the guest carries on. Ends with a
    /// verdict from both hosts' consoles and the guest's own checks; exits 0 only if
    /// it holds (docs/demo.md).
    Demo(DemoArgs),

    /// Draw a run from its --metrics file as an SVG picture: pause over time with
    /// its steps stacked, dirty pages, bytes per checkpoint, ack lag, failover
    /// markers and a pause histogram (a standby's file: pages, bytes, apply times).
    Report(ReportArgs),
}

#[derive(Args, Debug)]
struct ReportArgs {
    /// The JSON-lines file written by --metrics (of run, restore or standby).
    metrics: PathBuf,

    /// Where to write the SVG picture.
    #[arg(short, long, value_name = "SVG")]
    output: PathBuf,
}

#[derive(Args, Debug)]
struct DemoArgs {
    /// The test guest's `mix seconds=`: 0 runs it until the demo stops it --run-after
    /// seconds after the takeover; N ends it by itself after N seconds of guest time
    /// (counted from boot, so N must cover the initial copy and --kill-after) with a
    /// final check of everything.
    #[arg(long, value_name = "SECONDS", default_value_t = 0)]
    seconds: u64,

    /// Seconds of mirroring (after the initial copy) before the primary is killed
    /// [default: 6; with --kernel, 0 after the kernel registers its virtio-mmio device].
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(0..=3600))]
    kill_after: Option<u64>,

    /// Seconds the guest runs on host-b after the takeover.
    #[arg(long, value_name = "SECONDS", default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=3600))]
    run_after: u64,

    /// Boot this Linux vmlinux from an ext4 root disk instead of the test guest; it is
    /// killed mid-boot and host-b must finish the boot (`VFS: Mounted root`).
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,

    /// Use loopback for both hosts even as root.
    #[arg(long)]
    loopback: bool,

    /// Both hosts' --dead-ms: a peer silent this long is declared dead. Longer than
    /// mirrorvm's 100 ms so that a loaded machine gives no false alarm; a SIGKILL is
    /// seen at once anyway, as a closed connection.
    #[arg(long, value_name = "N", default_value_t = vmm::demo::DEFAULT_DEAD_MS, value_parser = clap::value_parser!(u64).range(11..=3_600_000))]
    dead_ms: u64,
}

#[derive(Args, Debug)]
struct CtlArgs {
    /// The API socket of the mirrorvm to talk to.
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,

    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Subcommand, Debug, Clone, Copy)]
enum CtlCommand {
    /// Check that it answers: its version and pid.
    Ping,
    /// Its status: role, epoch, protected or not, peer, lag, last pause, held output.
    Info,
    /// Park every vCPU until `resume` (checkpoints go on).
    Pause,
    /// Let a paused guest run again.
    Resume,
    /// Cut a checkpoint now and wait until it is complete at the sink.
    Checkpoint {
        /// Answer once the checkpoint is cut (or scheduled), not once complete.
        #[arg(long)]
        no_wait: bool,
    },
    /// Stop the run with a final checkpoint (if checkpointing), as SIGTERM does; the
    /// VMM then exits 0.
    Shutdown,
    /// Hand the guest to the standby (planned switchover); this host becomes its
    /// standby.
    Switchover,
}

#[derive(Args, Debug)]
struct SwitchoverArgs {
    /// The primary's API socket (its `--api-socket`).
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,
}

#[derive(Subcommand, Debug)]
enum DiskCommand {
    /// Show the journal: its geometry, the base image's epoch, each region slot's
    /// state, epoch and size.
    Inspect {
        /// The disk image (not the .mvj journal).
        image: PathBuf,
    },
    /// Check every checksum in the journal; exit 1 naming the first bad record.
    Verify {
        /// The disk image.
        image: PathBuf,
    },
    /// Apply the recovery rules offline: redo sealed regions up to the epoch, drop
    /// later ones, so the base image alone holds that epoch.
    Recover {
        /// The disk image.
        image: PathBuf,
        /// Recover to this checkpoint [default: the last acknowledged one].
        #[arg(long)]
        epoch: Option<u64>,
    },
}

/// Checkpointing options, shared by `run` and `restore`.
#[derive(Args, Debug)]
struct EpochArgs {
    /// Cut a checkpoint every N milliseconds (1..=3600000). `auto` lets mirrorvm choose
    /// the length from each checkpoint's pause, dirty pages and export time: the
    /// shortest that keeps the guest's slowdown and the export in budget, between
    /// min and max milliseconds [auto's default: min=5,max=100].
    #[arg(long, value_name = "N|auto[,min=N][,max=N]", default_value = "25")]
    epoch_ms: EpochLength,

    /// Checkpoint the guest into DIR (created if missing): memory is pre-copied while the
    /// guest runs, then one checkpoint is cut per epoch, each page written once, into
    /// its checkpoint's file; the chain of files is folded into DIR/memory.img, on a
    /// thread of its own, once it holds 2,048 distinct pages, 8 MiB or 32 files
    /// (`fold=small`, the default: a restore in milliseconds), or as many bytes as the
    /// guest has memory, or 32 files (`fold=large`: fewer folds beside a busy guest).
    /// Every writable disk needs checkpoint=on. Stopping mirrorvm (SIGINT, SIGTERM,
    /// Ctrl-A x) cuts a final checkpoint that `restore` resumes. Zero pages are stored
    /// as bits; `,compress=none` stores the other pages raw instead of lz4-compressed
    /// (the default, `compress=lz4`).
    #[arg(long, value_name = "DIR[,compress=lz4|none][,fold=small|large]")]
    checkpoint_dir: Option<String>,

    /// Mirror the guest to the standby at ADDR (HOST:PORT, started with `mirrorvm
    /// standby --listen ADDR`): after an initial copy, one checkpoint per epoch, each
    /// acknowledged before its console output is shown and its disk writes reach the
    /// images. Every writable disk needs checkpoint=on. Plaintext TCP: use a private link.
    /// `,max-rate=R` caps the initial copy at R bytes per second (e.g. 100M; at least
    /// 1M); checkpoints are never held back.
    #[arg(
        long,
        value_name = "ADDR[,max-rate=R]",
        conflicts_with = "checkpoint_dir"
    )]
    peer: Option<String>,

    /// Accept a standby that dials this primary (`mirrorvm standby --join ADDR`) on
    /// ADDR (HOST:PORT) whenever the guest runs unprotected: from the start without
    /// --peer, or after losing the --peer standby. The pair re-forms while the guest
    /// runs; a standby that holds a replica or disks of this guest is sent only what
    /// differs.
    #[arg(long, value_name = "ADDR", conflicts_with = "checkpoint_dir")]
    listen: Option<String>,

    /// The witness file holding the fence (a lock both hosts reach on a local file
    /// system): a standby takes over only once it holds it, so a primary that is alive
    /// but cut off never runs alongside it. Without it a network partition can leave
    /// two guests running.
    #[arg(long, value_name = "PATH")]
    witness: Option<PathBuf>,

    #[command(flatten)]
    liveness: LivenessArgs,

    #[command(flatten)]
    wire: WireArgs,

    #[command(flatten)]
    api: ApiArgs,

    /// Per-epoch metrics as JSON lines (needs --checkpoint-dir, --peer or --listen).
    #[arg(long, value_name = "PATH")]
    metrics: Option<PathBuf>,

    /// Serve the same figures for Prometheus at http://ADDR/metrics (HOST:PORT;
    /// port 0 picks one, shown on stderr). Needs --checkpoint-dir, --peer or --listen.
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<String>,
}

/// The HTTP API on a Unix socket.
#[derive(Args, Debug)]
struct ApiArgs {
    /// Serve the HTTP API (docs/api.md) on a Unix socket at PATH: status, pause,
    /// resume, checkpoint now, shutdown. `mirrorvm ctl` talks to it.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
}

/// Starts the API server (after the options are checked, before the machine is
/// built, so a script can wait for the socket).
fn start_api(path: Option<PathBuf>) -> anyhow::Result<Option<vmm::api::ApiServer>> {
    Ok(match path {
        Some(p) => Some(vmm::api::ApiServer::start(&p)?),
        None => None,
    })
}

/// What goes on the wire between a primary and its standby.
#[derive(Args, Debug)]
struct WireArgs {
    /// How pages travel to a standby: lz4 compresses each page that is not zero
    /// (zero pages always travel as one bit), none sends them as they are. Applies
    /// in protocol version 4; version 3 sends every page raw.
    #[arg(long, value_name = "lz4|none", default_value = "lz4")]
    wire_compression: Compression,

    /// The newest replication protocol version to speak (3 or 4). A primary and
    /// its standby agree on the newest version both speak by themselves, so a pair
    /// is upgraded one host at a time; set 3 to keep an upgraded host on the older
    /// version.
    #[arg(long, value_name = "N", default_value_t = VERSION,
          value_parser = clap::value_parser!(u16).range(i64::from(OLDEST_VERSION)..=i64::from(VERSION)))]
    protocol_version: u16,
}

impl WireArgs {
    fn config(&self) -> WireConfig {
        WireConfig {
            max_version: self.protocol_version,
            compression: self.wire_compression,
        }
    }
}

/// Heartbeats and deadlines between a primary and its standby.
#[derive(Args, Debug)]
struct LivenessArgs {
    /// Send a heartbeat every N milliseconds.
    #[arg(long, value_name = "N", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    heartbeat_ms: u64,

    /// Declare the peer dead after N milliseconds without a sign of life.
    #[arg(long, value_name = "N", default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    dead_ms: u64,

    /// Primary: declare the standby lost when a checkpoint stays unacknowledged for N
    /// milliseconds, or the initial copy gets no byte through for N milliseconds (at
    /// least 10 s: it answers heartbeats but does not keep up).
    #[arg(long, value_name = "N", default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    max_lag_ms: u64,
}

impl LivenessArgs {
    fn config(&self) -> anyhow::Result<LivenessConfig> {
        if self.dead_ms <= self.heartbeat_ms {
            return Err(usage(format!(
                "--dead-ms ({}) must be longer than --heartbeat-ms ({})",
                self.dead_ms, self.heartbeat_ms
            )));
        }
        Ok(LivenessConfig {
            heartbeat: Duration::from_millis(self.heartbeat_ms),
            dead_after: Duration::from_millis(self.dead_ms),
            max_lag: Duration::from_millis(self.max_lag_ms),
        })
    }
}

impl EpochArgs {
    fn config(self) -> anyhow::Result<Option<EpochConfig>> {
        if self.witness.is_some() && self.peer.is_none() && self.listen.is_none() {
            return Err(usage(
                "--witness needs --peer or --listen (it fences a primary against its standby)"
                    .into(),
            ));
        }
        let sink = match (self.checkpoint_dir, self.peer, self.listen) {
            (Some(spec), _, _) => {
                let dir = vmm::checkpoint::directory::parse_dir_spec(&spec)
                    .map_err(|e| usage(format!("--checkpoint-dir {spec}: {e}")))?;
                SinkConfig::Directory(dir)
            }
            (None, Some(spec), listen) => {
                let (addr, max_rate) =
                    vmm::replication::peer::parse_peer(&spec).map_err(|e| usage(e.to_string()))?;
                SinkConfig::Peer(PeerConfig {
                    addr,
                    witness: self.witness,
                    liveness: self.liveness.config()?,
                    transport: Transport::PlainTcp,
                    max_rate,
                    listen,
                    wire: self.wire.config(),
                })
            }
            (None, None, Some(listen)) => SinkConfig::Await(PeerConfig {
                addr: listen.clone(),
                witness: self.witness,
                liveness: self.liveness.config()?,
                transport: Transport::PlainTcp,
                max_rate: None,
                listen: Some(listen),
                wire: self.wire.config(),
            }),
            (None, None, None) => {
                if self.metrics.is_some() {
                    return Err(usage(
                        "--metrics needs --checkpoint-dir, --peer or --listen".into(),
                    ));
                }
                if self.metrics_addr.is_some() {
                    return Err(usage(
                        "--metrics-addr needs --checkpoint-dir, --peer or --listen".into(),
                    ));
                }
                return Ok(None);
            }
        };
        Ok(Some(EpochConfig {
            epoch: self.epoch_ms,
            sink,
            metrics: self.metrics,
            metrics_addr: self.metrics_addr,
        }))
    }
}

#[derive(Args, Debug)]
struct StandbyArgs {
    /// Listen for the primary on ADDR (HOST:PORT): a primary started with --peer ADDR
    /// dials it. After a takeover, the new primary accepts a standby that dials it
    /// (--join) here.
    #[arg(long, value_name = "ADDR", required_unless_present = "join")]
    listen: Option<String>,

    /// Dial the running primary at ADDR (its `run --listen ADDR`, or the --listen of a
    /// standby that took over) instead of waiting for it: how a host that was away
    /// rejoins. Only the disk chunks (and, with a replica kept from an earlier
    /// session, the pages) that differ are copied. Dialed again after a session that
    /// ends without a takeover.
    #[arg(long, value_name = "ADDR")]
    join: Option<String>,

    /// This host's copy of each of the primary's disks, in the primary's order:
    /// path=FILE[,checkpoint=on], the same size as the primary's. The initial copy
    /// overwrites it; until the first checkpoint completes the copy it is marked
    /// incomplete (FILE.incomplete) and never used. region-size=S sizes its journal's
    /// regions (at least the primary's) [default: the primary's].
    #[arg(long, value_name = "path=FILE[,checkpoint=on][,region-size=S]")]
    disk: Vec<DiskConfig>,

    /// Serial console once this host runs the guest: tty, file=PATH, or off.
    #[arg(long, value_name = "tty|file=PATH|off", default_value = "tty")]
    serial: SerialConfig,

    /// The witness file holding the fence (the same file the primary names).
    #[arg(long, value_name = "PATH")]
    witness: Option<PathBuf>,

    /// One JSON line per applied checkpoint, and one for a takeover.
    #[arg(long, value_name = "PATH")]
    metrics: Option<PathBuf>,

    /// Serve the standby's figures for Prometheus at http://ADDR/metrics (HOST:PORT;
    /// port 0 picks one, shown on stderr); after a takeover, the new primary's.
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<String>,

    #[command(flatten)]
    liveness: LivenessArgs,

    #[command(flatten)]
    wire: WireArgs,

    #[command(flatten)]
    api: ApiArgs,
}

#[derive(Args, Debug)]
struct RestoreArgs {
    /// The checkpoint directory.
    #[arg(long, value_name = "DIR")]
    from: PathBuf,

    /// Serial console: tty (stdout, with stdin as input), file=PATH, or off.
    #[arg(long, value_name = "tty|file=PATH|off", default_value = "tty")]
    serial: SerialConfig,

    #[command(flatten)]
    epochs: EpochArgs,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Kernel to boot: an ELF vmlinux or a bzImage [default: the built-in test guest].
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,

    /// Initramfs (cpio archive) to load beside the kernel.
    #[arg(long, value_name = "PATH")]
    initramfs: Option<PathBuf>,

    /// Kernel command line; `virtio_mmio.device=` entries for the disks are appended
    /// [default: "hello" for the test guest, "console=ttyS0 reboot=k panic=1" for a kernel].
    #[arg(long, value_name = "STR")]
    cmdline: Option<String>,

    /// Number of vCPUs (1 to 32).
    #[arg(long, value_name = "N", default_value_t = 1)]
    cpus: u32,

    /// Guest memory, with an optional K, M, G or T suffix.
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = config::parse_size)]
    memory: u64,

    /// A virtio-blk disk: path=FILE[,readonly=on][,checkpoint=on][,region-size=S]. With
    /// checkpoint=on the guest's writes go into checkpoint regions of FILE.mvj and reach
    /// FILE when their checkpoint is retired. region-size=S (e.g. 8M, 64MiB; 2 MiB to
    /// 1 GiB in 4 KiB steps) sizes each of the journal's two regions when it is created
    /// [default: a quarter of the disk, 2 MiB to 64 MiB]. Repeat for more disks (vda,
    /// vdb, …).
    #[arg(
        long,
        value_name = "path=FILE[,readonly=on][,checkpoint=on][,region-size=S]"
    )]
    disk: Vec<DiskConfig>,

    /// Serial console: tty (stdout, with stdin as input), file=PATH, or off.
    #[arg(long, value_name = "tty|file=PATH|off", default_value = "tty")]
    serial: SerialConfig,

    #[command(flatten)]
    epochs: EpochArgs,
}

/// sysexits' EX_USAGE: the command line is wrong (clap's own errors too), distinct
/// from 1 (mirrorvm failed) and 2 (the guest stopped in a way that ends a VM).
const EX_USAGE: u8 = 64;

/// A command-line error found after parsing (options that do not go together).
#[derive(Debug)]
struct Usage(String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

fn usage(msg: String) -> anyhow::Error {
    anyhow::Error::new(Usage(msg))
}

fn kvm_device() -> PathBuf {
    std::env::var_os("MIRRORVM_KVM_DEVICE")
        .map_or_else(|| config::DEFAULT_KVM_DEVICE.into(), Into::into)
}

impl RunArgs {
    fn into_config(self) -> anyhow::Result<VmConfig> {
        Ok(VmConfig {
            kernel: self
                .kernel
                .map_or(KernelSource::TestGuest, KernelSource::File),
            initramfs: self.initramfs,
            cmdline: self.cmdline,
            cpus: VmConfig::cpus_from(self.cpus).map_err(|e| usage(e.to_string()))?,
            memory: self.memory,
            disks: self.disk,
            serial: self.serial,
            kvm_device: kvm_device(),
            epoch: self.epochs.config()?,
        })
    }
}

fn run(mut args: RunArgs) -> anyhow::Result<RunEnd> {
    let api_socket = args.epochs.api.api_socket.take();
    let config = args.into_config()?;
    let api = start_api(api_socket)?;
    let mut machine = Machine::new(&config)?;
    if let Some(api) = &api {
        machine.serve_api(api.endpoint());
    }
    let handed = handover_slot(&mut machine);
    tracing::info!(cmdline = machine.cmdline(), "booting");
    let end = machine.run()?;
    if end != RunEnd::Switchover {
        return Ok(end);
    }
    // Handed over: this host becomes the new primary's standby, keeping the
    // guest's memory as its replica.
    let handed = take_handed(&handed)?;
    let Some(peer) = config.epoch.as_ref().and_then(|e| match &e.sink {
        SinkConfig::Peer(p) | SinkConfig::Await(p) => Some(p.clone()),
        SinkConfig::Directory(_) => None,
    }) else {
        anyhow::bail!("a switchover needs a standby");
    };
    let Some(join) = handed.rejoin.clone() else {
        eprintln!(
            "mirrorvm: switchover: the standby runs the guest now; it accepts no standby (no --listen), so this host exits"
        );
        return Ok(RunEnd::Switchover);
    };
    eprintln!(
        "mirrorvm: switchover: the standby runs the guest now; this host becomes its standby (joining {join})"
    );
    let sc = StandbyConfig {
        listen: peer.listen.clone(),
        join: Some(join),
        disks: config.disks.clone(),
        serial: config.serial.clone(),
        kvm_device: config.kvm_device.clone(),
        witness: peer.witness.clone(),
        liveness: peer.liveness,
        metrics: None,
        metrics_addr: None,
        transport: peer.transport,
        wire: peer.wire,
    };
    let mut standby = Standby::after_handover(sc.clone(), handed)?;
    if let Some(api) = &api {
        standby.serve_api(api.endpoint());
    }
    stand_by(standby, sc, api.as_ref())
}

type HandoverSlot = Arc<Mutex<Option<vmm::HandedOver>>>;

/// Where `machine` leaves what it holds if it hands its guest over (switchover).
fn handover_slot(machine: &mut Machine) -> HandoverSlot {
    let handed: HandoverSlot = Arc::new(Mutex::new(None));
    let slot = handed.clone();
    machine.on_handover(Box::new(move |h| {
        *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(h);
    }));
    handed
}

fn take_handed(slot: &HandoverSlot) -> anyhow::Result<vmm::HandedOver> {
    slot.lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .ok_or_else(|| {
            anyhow::anyhow!("the switchover did not complete (see above): this host runs no guest")
        })
}

fn restore(mut args: RestoreArgs) -> anyhow::Result<RunEnd> {
    let api_socket = args.epochs.api.api_socket.take();
    let cfg = RestoreConfig {
        from: args.from,
        serial: args.serial,
        kvm_device: kvm_device(),
        epoch: args.epochs.config()?,
    };
    let api = start_api(api_socket)?;
    let mut machine = Machine::restore(&cfg)?;
    if let Some(api) = &api {
        machine.serve_api(api.endpoint());
    }
    Ok(machine.run()?)
}

fn standby(args: StandbyArgs) -> anyhow::Result<RunEnd> {
    let liveness = args.liveness.config()?;
    let api = start_api(args.api.api_socket)?;
    let config = StandbyConfig {
        listen: args.listen,
        join: args.join,
        disks: args.disk,
        serial: args.serial,
        kvm_device: kvm_device(),
        witness: args.witness,
        liveness,
        metrics: args.metrics,
        metrics_addr: args.metrics_addr,
        transport: Transport::PlainTcp,
        wire: args.wire.config(),
    };
    let mut standby = Standby::new(config.clone())?;
    if let Some(api) = &api {
        standby.serve_api(api.endpoint());
    }
    stand_by(standby, config, api.as_ref())
}

/// Serves as a standby until the primary ends in order (its status), or until this
/// host took over and its guest ended (the guest's). A host that took over and then
/// hands the guest back (switchover) stands by again, for the host it handed to.
fn stand_by(
    mut standby: Standby,
    mut config: StandbyConfig,
    api: Option<&vmm::api::ApiServer>,
) -> anyhow::Result<RunEnd> {
    loop {
        let mut t = match standby.serve()? {
            StandbyEnd::PrimaryEnded { exit_status, .. } => {
                return Ok(RunEnd::GuestExit(
                    u8::try_from(exit_status.clamp(0, 255)).unwrap_or(u8::MAX),
                ))
            }
            StandbyEnd::TookOver(t) => t,
        };
        let handed = handover_slot(&mut t.machine);
        let end = t.run()?;
        if end != RunEnd::Switchover {
            return Ok(end);
        }
        let handed = take_handed(&handed)?;
        let Some(join) = handed.rejoin.clone() else {
            eprintln!(
                "mirrorvm: switchover: the other host runs the guest now; it accepts no standby (no --listen), so this host exits"
            );
            return Ok(end);
        };
        eprintln!(
            "mirrorvm: switchover: the other host runs the guest now; this host becomes its standby (joining {join})"
        );
        config.join = Some(join);
        standby = Standby::after_handover(config.clone(), handed)?;
        if let Some(api) = api {
            standby.serve_api(api.endpoint());
        }
    }
}

fn disk(cmd: DiskCommand) -> anyhow::Result<()> {
    use devices::store;
    match cmd {
        DiskCommand::Inspect { image } => print!("{}", store::inspect(&image)?),
        DiskCommand::Verify { image } => {
            let report = store::verify(&image)?;
            print!("{report}");
            println!("verify: every checksum is good");
        }
        DiskCommand::Recover { image, epoch } => {
            let r = store::recover(&image, epoch)?;
            println!(
                "recovered {}: the base image now holds epoch {} (was {}); redone {:?}, dropped {:?}, {} unacknowledged region(s) discarded",
                image.display(),
                r.epoch,
                r.base_epoch_before,
                r.redone,
                r.dropped,
                r.discarded_active
            );
        }
    }
    Ok(())
}

fn ctl(args: &CtlArgs) -> anyhow::Result<ExitCode> {
    use vmm::api::Command as Api;
    let req = match args.command {
        CtlCommand::Ping => Api::Ping,
        CtlCommand::Info => Api::Info,
        CtlCommand::Pause => Api::Pause,
        CtlCommand::Resume => Api::Resume,
        CtlCommand::Checkpoint { no_wait } => Api::Checkpoint { wait: !no_wait },
        CtlCommand::Shutdown => Api::Shutdown,
        CtlCommand::Switchover => Api::Switchover,
    };
    let r = vmm::api::ctl(&args.api_socket, req)?;
    if (200..300).contains(&r.status) {
        println!("{}", r.body);
        return Ok(ExitCode::SUCCESS);
    }
    let json = r.json();
    let why = json["error"].as_str().unwrap_or(&r.body);
    eprintln!("mirrorvm: error: {why} (HTTP {})", r.status);
    Ok(ExitCode::from(1))
}

fn report(args: &ReportArgs) -> anyhow::Result<()> {
    let s = vmm::report::write_report(&args.metrics, &args.output)?;
    println!(
        "report: {} checkpoint(s) and {} marker(s) drawn into {}",
        s.checkpoints,
        s.markers,
        args.output.display()
    );
    Ok(())
}

fn demo(args: DemoArgs) -> ExitCode {
    let mirrorvm = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("mirrorvm: error: cannot find the mirrorvm binary to run: {e}");
            return ExitCode::from(1);
        }
    };
    let opts = vmm::demo::DemoOptions {
        mirrorvm,
        seconds: args.seconds,
        kill_after: args.kill_after.map(Duration::from_secs),
        run_after: Duration::from_secs(args.run_after),
        kernel: args.kernel,
        loopback: args.loopback,
        dead_ms: args.dead_ms,
    };
    match vmm::demo::run(&opts) {
        Ok(outcome) if outcome.verdict.passed() => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(1),
        Err(vmm::demo::DemoError::Interrupted { signal }) => {
            eprintln!("mirrorvm: demo interrupted: both hosts stopped and cleaned up");
            ExitCode::from(u8::try_from(128 + signal).unwrap_or(u8::MAX))
        }
        Err(e) => {
            eprintln!("mirrorvm: error: {:#}", anyhow::Error::from(e));
            ExitCode::from(1)
        }
    }
}

fn main() -> ExitCode {
    vmm::memory::tune_host_allocator();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MIRRORVM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version print to stdout and succeed; every other
            // command-line error exits EX_USAGE.
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EX_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Restore(args) => restore(args),
        Command::Standby(args) => standby(args),
        Command::Demo(args) => return demo(args),
        Command::Switchover(args) => {
            let args = CtlArgs {
                api_socket: args.api_socket,
                command: CtlCommand::Switchover,
            };
            return ctl(&args).unwrap_or_else(|e| {
                eprintln!("mirrorvm: error: {e:#}");
                ExitCode::from(1)
            });
        }
        Command::Ctl(args) => {
            return ctl(&args).unwrap_or_else(|e| {
                eprintln!("mirrorvm: error: {e:#}");
                ExitCode::from(1)
            })
        }
        Command::Report(args) => {
            return match report(&args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("mirrorvm: error: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Disk(cmd) => {
            return match disk(cmd) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("mirrorvm: error: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
    };
    match result {
        Ok(end) => {
            match &end {
                RunEnd::GuestError(msg) => eprintln!("mirrorvm: guest stopped: {msg}"),
                RunEnd::Signal(s) => eprintln!("mirrorvm: stopped by signal {s}"),
                RunEnd::Reset => tracing::info!("guest reset the machine"),
                RunEnd::GuestExit(_) | RunEnd::Quit | RunEnd::Switchover => {}
            }
            ExitCode::from(u8::try_from(end.exit_code().clamp(0, 255)).unwrap_or(u8::MAX))
        }
        Err(e) => {
            eprintln!("mirrorvm: error: {e:#}");
            if e.chain().any(|c| c.is::<Usage>()) {
                ExitCode::from(EX_USAGE)
            } else {
                ExitCode::from(1)
            }
        }
    }
}
