//! The standby's side of mirroring: wait for a primary, take its initial copy, apply
//! every checkpoint to a replica (memory here, disks in its own images and
//! journals), acknowledge it, and take over when the primary dies.
//!
//! ```text
//!   listening ── Hello (checked: version, memory, disks, their sizes and region sizes, CPU) ──▶ refused ─┐
//!       ▲                                                                                   │
//!       │ bad frame: session dropped,                                      (keep listening) ◀┘
//!       │ no takeover                 Accept
//!       │                               ▼
//!       └──────────────────────── copying ── Base / DiskBase frames: written in place
//!                                    │         (disks marked incomplete, durably)
//!                                    │ first checkpoint (full) applied: marks removed
//!                                    ▼
//!                                mirroring ── checkpoint N staged whole, checked, applied
//!                                    │          (memory, region import), then Ack(N),
//!                                    │          then N retired into the standby's images
//!          Shutdown ◀────────────────┤
//!     (exit with the primary's status)│ connection lost, or silent for dead-after
//!                                    ▼
//!                                failover: fence (witness) → disks at N → restore → resume
//!                                          → show console output the primary held back
//! ```
//!
//! The standby retires each checkpoint's disk regions into its own base images right
//! after it acknowledged them, so its images hold exactly the last applied epoch plus
//! at most one sealed region (which a takeover redoes). Nothing is fsynced before an
//! Ack: if this host dies, its replica dies with it.
//!
//! A primary that dies before its first checkpoint arrived leaves nothing to resume:
//! the standby says so and exits without taking over.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;

use super::fence::{Attempt, FenceError, FenceWait, Witness};
use super::join::JoinListener;
use super::join::{dial, DialError};
use super::liveness::{Liveness, LivenessConfig, Pulse, Verdict, Watch};
use super::peer::PeerConfig;
use super::protocol::{
    speaks, AssembleError, AssemblerLimits, Body, CheckpointAssembler, Complete, CopyPlan, Digest,
    FrameError, FrameReader, FrameWriter, Hello, HelloAck, Holdings, JoinRole, RefuseReason,
    ReplicaId, Shutdown, Staged, WireConfig, WireStorage, OLDEST_VERSION,
};
use super::transport::{Closer, Connection, Listener, Transport, TransportError};
use crate::api::{Endpoint, StandbyBackend, VmInfo};
use crate::checkpoint::source::ReplicaSource;
use crate::checkpoint::{
    apply_pages, check_batches, decode_state, Console, ContentError, DiskManifest, Manifest,
    RegionContent, Restored,
};
use crate::config::{DiskConfig, EpochConfig, SerialConfig, SinkConfig};
use crate::cpuid::GuestCpu;
use crate::memory::GuestMemory;
use crate::{Machine, RunEnd, VmmError};
use devices::store::sizing::Bytes;

/// How long a connecting primary may take to send its Hello, and to open its
/// liveness connection after the HelloAck.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);

/// What a standby needs.
#[derive(Debug, Clone)]
pub struct StandbyConfig {
    /// Where to listen for a primary that dials this standby (`--peer`), `HOST:PORT`;
    /// after a takeover, where standbys that dial the new primary (`--join`) are
    /// accepted.
    pub listen: Option<String>,
    /// The primary to dial (`--join`), `HOST:PORT`: after a failover nobody dials the
    /// new primary, so a returning host dials it. Dialed again after every session
    /// that ends without a takeover.
    pub join: Option<String>,
    /// This host's copies of the primary's disks, in the primary's attach order.
    pub disks: Vec<DiskConfig>,
    /// Where the console goes once this host runs the guest.
    pub serial: SerialConfig,
    /// The KVM device.
    pub kvm_device: PathBuf,
    /// The witness file holding the fence, if any.
    pub witness: Option<PathBuf>,
    /// Heartbeats and deadlines.
    pub liveness: LivenessConfig,
    /// One JSON line per applied checkpoint, and one for a takeover.
    pub metrics: Option<PathBuf>,
    /// Serve the same figures for Prometheus at `http://ADDR/metrics`.
    pub metrics_addr: Option<String>,
    /// How hosts talk.
    pub transport: Transport,
    /// The newest protocol version to speak, and how pages are packed once this
    /// host mirrors to a standby of its own.
    pub wire: WireConfig,
}

/// Failures of the standby.
#[derive(Debug, thiserror::Error)]
pub enum StandbyError {
    /// Listening or accepting failed.
    #[error("standby")]
    Transport(#[source] TransportError),
    /// This host cannot run KVM guests, so it cannot stand by.
    #[error("cannot probe this host's CPU through {path}")]
    HostCpu {
        /// The KVM device.
        path: String,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A disk of this host cannot be used.
    #[error("cannot use disk image {path}")]
    Disk {
        /// The image.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Neither `--listen` nor `--join` was given.
    #[error("a standby needs --listen ADDR (a primary dials it), --join ADDR (it dials the primary), or both")]
    NoAddress,
    /// A disk's journal cannot be created or used.
    #[error("cannot use the journal of disk image {path}")]
    Store {
        /// The image.
        path: PathBuf,
        /// Cause.
        #[source]
        source: devices::store::Error,
    },
    /// Guest memory for the replica cannot be allocated.
    #[error("cannot allocate the replica's memory")]
    Memory(#[source] crate::memory::MemoryError),
    /// The metrics file cannot be written.
    #[error("cannot write the metrics file")]
    Metrics(#[source] std::io::Error),
    /// The Prometheus endpoint cannot be served.
    #[error(transparent)]
    Endpoint(#[from] crate::telemetry::EndpointError),
    /// A thread cannot be started.
    #[error("cannot start the {0} thread")]
    Thread(&'static str, #[source] std::io::Error),
    /// The primary died before its initial copy completed: nothing to resume.
    #[error("the primary was lost ({0}) before its initial copy completed: there is nothing to take over")]
    NothingToResume(String),
    /// The fence cannot be taken, or the replica may not resume.
    #[error("cannot take over")]
    Fence(#[source] FenceError),
    /// The replica cannot be applied (this host's own disks or memory failed).
    #[error("cannot apply checkpoint {epoch} to the replica")]
    Apply {
        /// The checkpoint.
        epoch: u64,
        /// Cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The machine cannot be rebuilt from the replica.
    #[error("cannot resume the guest from checkpoint {epoch}")]
    Restore {
        /// The checkpoint.
        epoch: u64,
        /// Cause.
        #[source]
        source: Box<VmmError>,
    },
}

/// How a standby's watch ended.
pub enum StandbyEnd {
    /// The primary ended the run in order: nothing to take over.
    PrimaryEnded {
        /// How, from the primary.
        how: String,
        /// The primary's exit status.
        exit_status: i32,
    },
    /// The primary died: this host resumes the guest.
    TookOver(Box<Takeover>),
}

/// The timings of a failover, by step.
#[derive(Debug, Clone, Default)]
pub struct FailoverReport {
    /// Why the primary was declared lost.
    pub reason: String,
    /// The checkpoint resumed.
    pub epoch: u64,
    /// From the primary's last sign of life to the decision.
    pub detect: Duration,
    /// Taking the fence.
    pub fence: Duration,
    /// Settling the replica's disks at the checkpoint.
    pub apply: Duration,
    /// Building the machine from the replica.
    pub restore: Duration,
    /// Console bytes shown that the primary had held back.
    pub console_bytes: u64,
    /// A planned handover (switchover), not a failure.
    pub handover: bool,
}

impl std::fmt::Display for FailoverReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        if self.handover {
            return write!(
                f,
                "switchover: took the guest over at checkpoint {}: fence {:.1} ms, apply {:.1} ms, restore {:.1} ms",
                self.epoch,
                ms(self.fence),
                ms(self.apply),
                ms(self.restore)
            );
        }
        write!(
            f,
            "failover: primary lost ({}) at checkpoint {}: detect {:.1} ms, fence {:.1} ms, apply {:.1} ms, restore {:.1} ms",
            self.reason,
            self.epoch,
            ms(self.detect),
            ms(self.fence),
            ms(self.apply),
            ms(self.restore)
        )
    }
}

/// A machine rebuilt from the replica, ready to run as the new primary.
pub struct Takeover {
    /// The machine.
    pub machine: Machine,
    /// How the failover went so far.
    pub report: FailoverReport,
    /// When the primary was declared lost.
    pub decided: Instant,
    /// The fence, held while this host runs the guest.
    _fence: Option<super::peer::SharedFence>,
    /// The Prometheus endpoint, served on while this host runs the guest.
    endpoint: Option<crate::telemetry::MetricsEndpoint>,
}

impl Takeover {
    /// Runs the guest; prints the failover line (with the resume step and the total
    /// from the primary's last sign of life) once every vCPU runs.
    pub fn run(self) -> Result<RunEnd, VmmError> {
        let Takeover {
            mut machine,
            report,
            decided,
            _fence,
            endpoint,
        } = self;
        if let Some(e) = endpoint {
            machine.keep_metrics_endpoint(e);
        }
        let ready = Instant::now();
        machine.on_running(Box::new(move || {
            let resume = ready.elapsed();
            let total = report.detect + decided.elapsed();
            eprintln!(
                "mirrorvm: {report}, resume {:.1} ms, total {:.1} ms",
                resume.as_secs_f64() * 1e3,
                total.as_secs_f64() * 1e3
            );
        }));
        let r = machine.run();
        drop(_fence);
        r
    }
}

/// One JSON line per applied checkpoint (`--metrics` on the standby).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AppliedMetrics {
    /// The checkpoint.
    pub epoch: u64,
    /// Bytes received for it (frames included).
    pub bytes: u64,
    /// Pages in it.
    pub pages: u64,
    /// Staged-to-acknowledged time, µs.
    pub apply_us: u64,
    /// When it was acknowledged, ms since the standby started.
    pub received_at_ms: u64,
}

/// The JSON line a standby writes to `--metrics` when it takes over (before the
/// guest resumes), so a run's figures show where the failover fell.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FailoverMetrics {
    /// Always true: tells this line from the checkpoint lines.
    pub failover: bool,
    /// The checkpoint resumed.
    pub epoch: u64,
    /// Why the primary was declared lost.
    pub reason: String,
    /// From the primary's last sign of life to the decision, µs.
    pub detect_us: u64,
    /// Taking the fence, µs.
    pub fence_us: u64,
    /// Building the machine from the replica, µs.
    pub restore_us: u64,
    /// When the machine was ready to resume, ms since the standby started (the
    /// clock of `received_at_ms`).
    pub at_ms: u64,
}

/// This host's CPU as KVM offers it to guests, for the Hello check. Also runs the
/// start-up fault probe, so a takeover finds its figure ready.
fn host_cpu(kvm_device: &std::path::Path) -> Result<GuestCpu, StandbyError> {
    let shown = kvm_device.display().to_string();
    let err = |source| StandbyError::HostCpu {
        path: shown.clone(),
        source,
    };
    let c_path = std::ffi::CString::new(kvm_device.as_os_str().as_encoded_bytes())
        .map_err(|_| err(kvm_ioctls::Error::new(libc::EINVAL)))?;
    let kvm = kvm_ioctls::Kvm::new_with_path(&c_path).map_err(err)?;
    // What a guest started here would see: the same derivation as a boot's.
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(err)?;
    let vm = kvm.create_vm().map_err(err)?;
    let vcpu = vm.create_vcpu(0).map_err(err)?;
    let tsc = vcpu.get_tsc_khz().ok().filter(|k| *k > 0);
    crate::cpuid::filter(&mut cpuid, 0, 1, tsc)
        .map_err(|_| err(kvm_ioctls::Error::new(libc::ENOSPC)))?;
    vcpu.set_cpuid2(&cpuid).map_err(err)?;
    let seen = vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES).map_err(err)?;
    crate::fault_probe::measure_ahead(&kvm);
    Ok(GuestCpu::of(seen.as_slice(), tsc))
}

/// This host's disk: its image and (once the copy is done) its store.
struct Disk {
    config: DiskConfig,
    size: u64,
    file: Option<File>,
    store: Option<devices::store::Store>,
}

impl Disk {
    fn err(&self) -> impl Fn(std::io::Error) -> StandbyError + '_ {
        move |source| StandbyError::Disk {
            path: self.config.path.clone(),
            source,
        }
    }
}

/// The standby: construct with [`Standby::new`], then [`Standby::serve`].
pub struct Standby {
    config: StandbyConfig,
    listener: Option<Listener>,
    /// The replica of the last session that ended without a takeover: offered to
    /// the next primary, which then sends only what changed since.
    kept: Option<Replica>,
    /// The protocol version the next Join is written in (`--join`): the newest
    /// this host speaks, or the one before after a primary closed on a Join
    /// without a word, as an older primary does with a Join it cannot read.
    join_version: u16,
    cpu: GuestCpu,
    started: Instant,
    metrics: Option<BufWriter<File>>,
    /// The status the API reports while this host stands by.
    info: Arc<std::sync::Mutex<VmInfo>>,
    /// The API, handed to the machine if this host takes over.
    api: Option<Endpoint>,
    telemetry: Option<crate::telemetry::Telemetry>,
    endpoint: Option<crate::telemetry::MetricsEndpoint>,
}

/// Why a connection brought no session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NoHello {
    /// It closed (or broke) before its first frame.
    Silent,
    /// The primary said it takes no standby now.
    TurnedAway,
    /// Anything else: a wrong first frame, a Hello this standby refused.
    Other,
}

/// A session's connections once its Hello was accepted.
struct Greeted {
    hello: Hello,
    fr: FrameReader<BufReader<Box<dyn Read + Send>>>,
    fw: FrameWriter<BufWriter<Box<dyn Write + Send>>>,
    closer: Closer,
    /// The liveness connection, if this standby dialed it.
    live: Option<Connection>,
}

/// Why a session ended.
enum SessionEnd {
    /// The primary ended the run in order.
    Shutdown(Shutdown),
    /// The primary is lost: fail over.
    Lost(String),
    /// The primary broke the protocol: drop it, keep listening, never take over on
    /// its account.
    Broken(String),
}

/// The replica as the session leaves it.
struct Replica {
    manifest: Manifest,
    /// The lineage of the primary whose checkpoints it holds.
    lineage: u64,
    memory: GuestMemory,
    /// The last applied checkpoint and its state.
    applied: Option<(u64, Vec<u8>)>,
    /// Console output of applied checkpoints the primary may not have shown, oldest
    /// first.
    console: Vec<(u64, Console)>,
    /// An initial copy is arriving (a Base or DiskBase frame came, no checkpoint yet).
    copying: bool,
}

impl Standby {
    /// Checks this host (KVM, its CPU) and starts listening.
    pub fn new(config: StandbyConfig) -> Result<Standby, StandbyError> {
        let (telemetry, endpoint) = config
            .metrics_addr
            .as_deref()
            .map(|addr| crate::telemetry::start(addr, crate::telemetry::Role::Standby))
            .transpose()?
            .unzip();
        let cpu = host_cpu(&config.kvm_device)?;
        if config.listen.is_none() && config.join.is_none() {
            return Err(StandbyError::NoAddress);
        }
        let listener = config
            .listen
            .as_deref()
            .map(|addr| config.transport.listen(addr))
            .transpose()
            .map_err(StandbyError::Transport)?;
        let metrics = match &config.metrics {
            Some(p) => Some(BufWriter::new(
                File::create(p).map_err(StandbyError::Metrics)?,
            )),
            None => None,
        };
        Ok(Standby {
            join_version: config.wire.max_version,
            config,
            listener,
            kept: None,
            cpu,
            started: Instant::now(),
            metrics,
            info: Arc::new(std::sync::Mutex::new(StandbyBackend::initial_info())),
            api: None,
            telemetry,
            endpoint,
        })
    }

    /// A standby made of a primary that just handed its guest over (switchover): it
    /// keeps that guest's memory as the replica of the final checkpoint, so the new
    /// primary sends only the pages written since it resumed, and the disk chunks
    /// that differ (few: both disks hold the final checkpoint).
    pub fn after_handover(
        config: StandbyConfig,
        handed: crate::HandedOver,
    ) -> Result<Standby, StandbyError> {
        let mut s = Standby::new(config)?;
        s.kept = Some(Replica {
            manifest: handed.manifest,
            lineage: handed.replica.lineage,
            memory: handed.memory,
            // Only its name is used: a kept replica is never resumed.
            applied: Some((handed.replica.epoch, Vec::new())),
            console: Vec::new(),
            copying: false,
        });
        Ok(s)
    }

    /// Answers the API's requests at `endpoint`: its status while it stands by,
    /// then, if it takes over, the resumed machine's.
    pub fn serve_api(&mut self, endpoint: Endpoint) {
        endpoint.set(Arc::new(StandbyBackend {
            info: self.info.clone(),
        }));
        self.api = Some(endpoint);
    }

    /// Updates the status the API reports.
    fn status(&self, f: impl FnOnce(&mut VmInfo)) {
        f(&mut devices::bus::lock_recover(&self.info));
    }

    /// The address it listens on, if it listens.
    pub fn local_addr(&self) -> Option<String> {
        self.listener.as_ref().map(Listener::local_addr)
    }

    /// The next session's connections: the data connection, and the liveness
    /// connection when this standby dials (`--join`; a primary that dials opens it
    /// after the Holdings). Dialing retries every second until the primary answers.
    fn next_connection(&mut self) -> Result<(Connection, Option<Connection>), StandbyError> {
        let Some(addr) = self.config.join.clone() else {
            let Some(l) = &self.listener else {
                return Err(StandbyError::NoAddress);
            };
            return Ok((l.accept().map_err(StandbyError::Transport)?, None));
        };
        let t = self.config.transport;
        let mut said = false;
        loop {
            let token = crate::checkpoint::new_lineage();
            let (v, d) = (self.join_version, Duration::from_secs(2));
            let r = dial(&t, &addr, JoinRole::Data, token, v, d).and_then(|data| {
                dial(&t, &addr, JoinRole::Liveness, token, v, d).map(|live| (data, Some(live)))
            });
            match r {
                Ok(pair) => return Ok(pair),
                Err(e) => {
                    // A primary that cannot be reached said nothing of its version.
                    if let DialError::Connect(_) = e {
                        self.join_version = self.config.wire.max_version;
                    }
                    if !said {
                        eprintln!(
                            "mirrorvm: standby: waiting for the primary at {addr} ({}); trying every second",
                            devices::ErrorChain(&e)
                        );
                        said = true;
                    }
                    if let DialError::Send(_) = e {
                        tracing::info!("the primary at {addr} closed the connection");
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }

    /// Checks a Hello against this host: the reason and a sentence if it must be
    /// refused.
    fn check_hello(&self, hello: &Hello, version: u16) -> Result<(), (RefuseReason, String)> {
        let newest = self.config.wire.max_version;
        if hello.protocol_version != version
            || !(OLDEST_VERSION..=newest).contains(&hello.protocol_version)
        {
            return Err((
                RefuseReason::Version,
                format!(
                    "a Hello of protocol version {} in a version {version} frame; this standby speaks {}",
                    hello.protocol_version,
                    speaks(OLDEST_VERSION, newest)
                ),
            ));
        }
        if hello.storage != WireStorage::Replicated {
            return Err((
                RefuseReason::Storage,
                "this standby keeps its own disk copies (replicated storage) only".into(),
            ));
        }
        let m = &hello.manifest;
        if let Err(e) = crate::memory::check_size(m.memory) {
            return Err((
                RefuseReason::Machine,
                format!("cannot hold {} MiB of guest memory: {e}", m.memory >> 20),
            ));
        }
        if m.disks.len() != self.config.disks.len() {
            return Err((
                RefuseReason::Machine,
                format!(
                    "the primary has {} disk(s), this standby {} (give one --disk per primary disk, in order)",
                    m.disks.len(),
                    self.config.disks.len()
                ),
            ));
        }
        for (i, (theirs, ours)) in m.disks.iter().zip(&self.config.disks).enumerate() {
            let size = std::fs::metadata(&ours.path).map(|md| md.len());
            match size {
                Ok(s) if s == theirs.size => {}
                Ok(s) => {
                    return Err((
                        RefuseReason::Machine,
                        format!(
                            "disk {i} is {} bytes on the primary and {s} bytes here ({})",
                            theirs.size,
                            ours.path.display()
                        ),
                    ))
                }
                Err(e) => {
                    return Err((
                        RefuseReason::Machine,
                        format!(
                            "disk {i} ({}) cannot be read here: {e}",
                            ours.path.display()
                        ),
                    ))
                }
            }
            if ours.readonly {
                return Err((
                    RefuseReason::Machine,
                    format!(
                        "disk {i} ({}) is read-only here: a standby writes its copy",
                        ours.path.display()
                    ),
                ));
            }
            // Every region the primary sends must fit one of this journal's: an
            // export never takes more than the region it came from, so a region at
            // least as large always does.
            if let (Some(here), Some(there)) = (ours.region_size, theirs.region_size) {
                if here < there {
                    return Err((
                        RefuseReason::Machine,
                        format!(
                            "disk {i} ({}) has region-size {} here but {} on the primary: a checkpoint region of the primary might not fit; give region-size={} or more here, or leave it out to take the primary's",
                            ours.path.display(),
                            Bytes(here),
                            Bytes(there),
                            Bytes(there).to_string().replace(' ', ""),
                        ),
                    ));
                }
            }
        }
        if let Err(why) = m.cpu.check_runs_on(&self.cpu) {
            return Err((RefuseReason::Machine, why));
        }
        Ok(())
    }

    /// Serves primaries until one ends in order or dies after its initial copy.
    pub fn serve(mut self) -> Result<StandbyEnd, StandbyError> {
        if let Some(a) = self.local_addr() {
            eprintln!("mirrorvm: standby: listening on {a}");
        }
        if let Some(a) = &self.config.join {
            eprintln!("mirrorvm: standby: joining the primary at {a}");
        }
        loop {
            let (conn, live) = self.next_connection()?;
            let peer = conn.peer().to_string();
            let (hello, r, mut w, closer) = match self.greet(conn) {
                Ok(g) => g,
                Err(no) => {
                    if self.config.join.is_some() {
                        self.next_join_version(&peer, no);
                        std::thread::sleep(Duration::from_secs(1));
                    }
                    continue;
                }
            };
            // The next session offers the newest version again: the primary may
            // have been upgraded meanwhile.
            self.join_version = self.config.wire.max_version;
            // What this host holds goes to the primary, which then sends only what
            // differs: the replica kept from an earlier session, and a digest of each
            // disk (once its unacknowledged tail is dropped).
            let (disks, digests) = self.prepare_disks(&hello.manifest.disks)?;
            let holdings = Holdings {
                replica: self
                    .kept
                    .as_ref()
                    .filter(|k| k.manifest.memory == hello.manifest.memory)
                    .and_then(Replica::id),
                disks: digests,
                listen: self.local_addr(),
            };
            if let Some(id) = holdings.replica {
                tracing::info!("offering the replica of {id} to the primary at {peer}");
            }
            if w.write(0, &Body::Holdings(holdings))
                .and_then(|()| w.flush())
                .is_err()
            {
                continue;
            }
            let greeted = Greeted {
                hello,
                fr: r,
                fw: w,
                closer,
                live,
            };
            let ended = self.session(&peer, greeted, disks)?;
            if let Some(t) = &self.telemetry {
                // Whatever comes next, this session's replica protects nothing.
                t.set_unprotected();
            }
            if !matches!(ended.0, SessionEnd::Lost(_)) {
                self.status(|i| *i = StandbyBackend::initial_info());
            }
            match ended {
                (SessionEnd::Shutdown(Shutdown::Handover), (replica, disks, _silence, decided)) => {
                    return self
                        .take_over(
                            "the primary handed the guest over (switchover)".into(),
                            replica,
                            disks,
                            Duration::ZERO,
                            decided,
                            true,
                        )
                        .map(|t| StandbyEnd::TookOver(Box::new(t)));
                }
                (SessionEnd::Shutdown(Shutdown::Abandoned), (replica, ..)) => {
                    self.keep(replica);
                    eprintln!(
                        "mirrorvm: standby: the primary at {peer} gave up on this standby and runs on without it; waiting for a primary"
                    );
                }
                (SessionEnd::Shutdown(s), _) => {
                    let (how, exit_status) = match s {
                        Shutdown::Finished { exit_status, how } => (how, exit_status),
                        Shutdown::Stopped { exit_status } => {
                            ("stopped by the user".to_string(), exit_status)
                        }
                        Shutdown::Abandoned | Shutdown::Handover => ("abandoned".to_string(), 1),
                    };
                    eprintln!(
                        "mirrorvm: standby: the primary ended the run ({how}): exiting with status {exit_status}"
                    );
                    return Ok(StandbyEnd::PrimaryEnded { how, exit_status });
                }
                (SessionEnd::Broken(why), (replica, ..)) => {
                    self.keep(replica);
                    eprintln!(
                        "mirrorvm: standby: dropped the primary at {peer}: {why}; waiting for a primary"
                    );
                }
                (SessionEnd::Lost(why), (replica, disks, pulse_silence, decided)) => {
                    return self
                        .take_over(why, replica, disks, pulse_silence, decided, false)
                        .map(|t| StandbyEnd::TookOver(Box::new(t)));
                }
            }
        }
    }

    /// Keeps a replica that holds a whole checkpoint, for the next session.
    fn keep(&mut self, replica: Replica) {
        if replica.applied.is_some() {
            self.kept = Some(replica);
        }
    }

    /// Reads a Hello from a new connection and answers it; on `Err` the connection
    /// is not a primary this standby accepts (it keeps listening, or dials again).
    /// Once accepted, both directions speak the Hello's protocol version.
    #[allow(clippy::type_complexity)]
    fn greet(
        &self,
        conn: Connection,
    ) -> Result<
        (
            Hello,
            FrameReader<BufReader<Box<dyn Read + Send>>>,
            FrameWriter<BufWriter<Box<dyn Write + Send>>>,
            Closer,
        ),
        NoHello,
    > {
        let peer = conn.peer().to_string();
        let newest = self.config.wire.max_version;
        if conn.set_read_timeout(Some(HANDSHAKE_DEADLINE)).is_err() {
            return Err(NoHello::Other);
        }
        let (r, w, closer) = conn.split().map_err(|_| NoHello::Other)?;
        let mut fr = FrameReader::new(BufReader::with_capacity(1 << 20, r));
        fr.accept_versions(OLDEST_VERSION, newest);
        let mut fw = FrameWriter::new(BufWriter::new(w), 0);
        fw.set_version(newest);
        let hello = match fr.read_frame() {
            Ok(Some(f)) => match f.body {
                Body::Hello(h) => {
                    fw.set_generation(f.generation);
                    h
                }
                // A primary that turns a dialing standby away says why.
                Body::HelloAck(HelloAck::Refuse { detail, .. }) => {
                    eprintln!("mirrorvm: standby: the primary at {peer} turned this standby away: {detail}");
                    return Err(NoHello::TurnedAway);
                }
                other => {
                    eprintln!(
                        "mirrorvm: standby: ignored a connection from {peer}: it began with a {} frame, not a Hello",
                        other.frame_type()
                    );
                    return Err(NoHello::Other);
                }
            },
            Ok(None) => return Err(NoHello::Silent),
            Err(FrameError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted
                ) =>
            {
                return Err(NoHello::Silent)
            }
            Err(e) => {
                eprintln!(
                    "mirrorvm: standby: ignored a connection from {peer}: {}",
                    devices::ErrorChain(&e)
                );
                if matches!(e, FrameError::Version { .. }) {
                    let _ = fw.write(
                        0,
                        &Body::HelloAck(HelloAck::Refuse {
                            reason: RefuseReason::Version,
                            detail: format!(
                                "this standby speaks protocol {}",
                                speaks(OLDEST_VERSION, newest)
                            ),
                        }),
                    );
                    let _ = fw.flush();
                }
                return Err(NoHello::Other);
            }
        };
        // Whatever the answer, it is written in the Hello's version: a primary of
        // that version reads no other.
        let version = fr.version();
        fw.set_version(version);
        if let Err((reason, detail)) = self.check_hello(&hello, version) {
            eprintln!("mirrorvm: standby: refused the primary at {peer}: {detail}");
            let _ = fw
                .write(0, &Body::HelloAck(HelloAck::Refuse { reason, detail }))
                .and_then(|()| fw.flush());
            return Err(NoHello::Other);
        }
        fr.pin(version);
        if version < newest {
            eprintln!(
                "mirrorvm: standby: the primary at {peer} speaks protocol version {version}: this session uses it"
            );
        }
        if fw
            .write(0, &Body::HelloAck(HelloAck::Accept))
            .and_then(|()| fw.flush())
            .is_err()
        {
            return Err(NoHello::Other);
        }
        if closer.set_read_timeout(None).is_err() {
            return Err(NoHello::Other);
        }
        Ok((hello, fr, fw, closer))
    }

    /// After a dialed session that brought no Hello: a primary that closed without
    /// a word may be one version older, which ignores a Join it cannot read, so the
    /// next Join is written in the version before (and then in the newest again).
    fn next_join_version(&mut self, peer: &str, no: NoHello) {
        let newest = self.config.wire.max_version;
        self.join_version = match no {
            NoHello::Silent if self.join_version > OLDEST_VERSION => {
                let older = self.join_version - 1;
                eprintln!(
                    "mirrorvm: standby: the primary at {peer} closed the connection without a Hello; dialing again with protocol version {older} (an older primary ignores a newer Join)"
                );
                older
            }
            _ => newest,
        };
    }

    /// Readies this host's disks for the initial copy, and hashes them for the
    /// primary: each is marked incomplete (durably) before anything changes; its
    /// journal is recovered to its last acknowledged checkpoint (what this host
    /// wrote after that, the unacknowledged tail, is dropped: the primary never had
    /// it) and removed; then every chunk is hashed. The copy then rewrites only the
    /// chunks whose hash differs from the primary's. Each new journal will have the
    /// region size named here, else the primary's (from `theirs`, the Hello's
    /// disks), else the default for its size.
    fn prepare_disks(
        &self,
        theirs: &[DiskManifest],
    ) -> Result<(Vec<Disk>, Vec<Digest>), StandbyError> {
        let mut out = Vec::new();
        let mut digests = Vec::new();
        for (i, d) in self.config.disks.iter().enumerate() {
            let err = |source| StandbyError::Disk {
                path: d.path.clone(),
                source,
            };
            crate::disk::mark_incomplete(&d.path).map_err(err)?;
            let journal = devices::store::journal_path(&d.path);
            if journal.exists() {
                let size = std::fs::metadata(&d.path).map_err(err)?.len();
                let cfg = devices::store::StoreConfig::for_disk(size, d.region_size);
                match devices::store::Store::open_path(
                    &d.path,
                    &cfg,
                    devices::store::RecoverTo::LastAcknowledged,
                ) {
                    Ok((store, report)) => {
                        tracing::info!("disk {i}: journal recovered to its last acknowledged checkpoint: {report:?}");
                        drop(store);
                    }
                    // Whatever the image holds then, the hashes find what differs.
                    Err(e) => eprintln!(
                        "mirrorvm: standby: disk {i} ({}): its journal cannot be recovered ({}); the copy compares the image as it is",
                        d.path.display(),
                        devices::ErrorChain(&e)
                    ),
                }
                match std::fs::remove_file(&journal) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(err(e)),
                }
            }
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&d.path)
                .map_err(err)?;
            let size = file.metadata().map_err(err)?.len();
            digests.push(super::digest::of_file(&file, size).map_err(err)?);
            let region_size = d
                .region_size
                .or_else(|| theirs.get(i).and_then(|t| t.region_size))
                .unwrap_or_else(|| devices::store::sizing::default_region_size(size));
            out.push(Disk {
                config: DiskConfig {
                    checkpoint: true,
                    region_size: Some(region_size),
                    ..d.clone()
                },
                size,
                file: Some(file),
                store: None,
            });
        }
        Ok((out, digests))
    }

    #[allow(clippy::type_complexity)]
    fn session(
        &mut self,
        peer: &str,
        greeted: Greeted,
        mut disks: Vec<Disk>,
    ) -> Result<(SessionEnd, (Replica, Vec<Disk>, Duration, Instant)), StandbyError> {
        let Greeted {
            hello,
            mut fr,
            mut fw,
            closer,
            live,
        } = greeted;
        let m = &hello.manifest;
        self.status(|i| {
            *i = VmInfo {
                state: "copying".into(),
                cpus: m.cpus,
                memory_bytes: m.memory,
                peer: Some(peer.to_string()),
                ..StandbyBackend::initial_info()
            }
        });
        eprintln!(
            "mirrorvm: standby: primary {peer} connected: {} MiB, {} vCPU(s), {} disk(s)",
            m.memory >> 20,
            m.cpus,
            m.disks.len()
        );
        let closer = Arc::new(closer);
        let pulse = Arc::new(Pulse::default());
        let verdict = Arc::new(Verdict::default());
        let ours = Arc::new(AtomicU64::new(0));
        let released = Arc::new(AtomicU64::new(0));
        // A primary that dials opens its liveness connection right after the
        // Holdings; a standby that dials opened it already.
        let live = match (live, &self.listener) {
            (Some(l), _) => Some(l),
            (None, Some(l)) => l
                .accept_within(HANDSHAKE_DEADLINE)
                .map_err(StandbyError::Transport)?,
            (None, None) => None,
        };
        let Some(live) = live else {
            return Ok((
                SessionEnd::Broken("it opened no liveness connection".into()),
                (
                    self.empty_replica(&hello)?,
                    Vec::new(),
                    Duration::ZERO,
                    Instant::now(),
                ),
            ));
        };
        let on_dead = closer.clone();
        let said: Arc<std::sync::Mutex<Option<Shutdown>>> = Arc::default();
        let reader_done = Arc::new(AtomicBool::new(false));
        let mut liveness = Liveness::spawn(
            live,
            0,
            hello.protocol_version,
            self.config.liveness,
            Watch {
                pulse: pulse.clone(),
                ours: ours.clone(),
                theirs: released.clone(),
                verdict: verdict.clone(),
                extra: Box::new(|| None),
                on_dead: Box::new(move || on_dead.close()),
                farewell: None,
                said: said.clone(),
                reader_done: reader_done.clone(),
            },
        )
        .map_err(|e| StandbyError::Thread("liveness", e))?;

        // The kept replica stays until the copy's plan says whether it is built on.
        let mut replica = match self.kept.take() {
            Some(k) if k.manifest.memory == hello.manifest.memory => k,
            _ => self.empty_replica(&hello)?,
        };
        let limits = AssemblerLimits::for_manifest(&hello.manifest);
        let mut asm = CheckpointAssembler::new(&hello, limits);
        let counted = fr.bytes_read();
        let mut first_bytes = counted.load(Ordering::Relaxed);
        let mut staged_at = None;
        // Whether this session applied a checkpoint yet.
        let mut applied_here = false;
        let end = loop {
            let frame = match fr.read_frame() {
                Ok(Some(f)) => f,
                Ok(None) => {
                    break SessionEnd::Lost(
                        verdict
                            .get()
                            .unwrap_or_else(|| "the connection closed".into()),
                    )
                }
                Err(e @ (FrameError::Io(_) | FrameError::Truncated { .. })) => {
                    break SessionEnd::Lost(verdict.get().unwrap_or_else(|| {
                        format!("the connection failed: {}", devices::ErrorChain(&e))
                    }))
                }
                Err(e) => {
                    break SessionEnd::Broken(format!(
                        "a malformed frame: {}",
                        devices::ErrorChain(&e)
                    ))
                }
            };
            pulse.touch();
            staged_at.get_or_insert_with(Instant::now);
            match asm.push(frame) {
                Ok(Staged::Nothing) => {}
                Ok(Staged::Plan { epoch, plan }) => {
                    if applied_here {
                        break SessionEnd::Broken(
                            "a second initial copy in one session is not supported".into(),
                        );
                    }
                    if let Err(why) = self.begin_copy(&mut replica, &hello, plan) {
                        break SessionEnd::Broken(why);
                    }
                    open_stores(&mut disks, epoch)?;
                    staged_at = None;
                }
                Ok(Staged::Base { .. } | Staged::DiskBase { .. }) if !replica.copying => {
                    break SessionEnd::Broken(
                        "an initial copy without its plan (CopyPlan) first".into(),
                    );
                }
                // The plan opened the copy (journals created, memory chosen).
                Ok(Staged::Base { pages, .. }) => {
                    if let Err(e) = apply_pages(&replica.memory, &pages) {
                        break SessionEnd::Broken(format!("a bad base page: {e}"));
                    }
                    staged_at = None;
                }
                Ok(Staged::DiskBase { chunk, .. }) => {
                    let Some(d) = disks.get(chunk.disk as usize) else {
                        break SessionEnd::Broken(format!("a chunk of disk {}", chunk.disk));
                    };
                    let fits = chunk
                        .offset
                        .checked_add(chunk.data.len() as u64)
                        .is_some_and(|e| e <= d.size);
                    if !fits {
                        break SessionEnd::Broken(format!(
                            "a chunk at byte {} of disk {} runs past its end",
                            chunk.offset, chunk.disk
                        ));
                    }
                    if let Some(f) = &d.file {
                        f.write_all_at(&chunk.data, chunk.offset).map_err(d.err())?;
                    }
                    staged_at = None;
                }
                Ok(Staged::Complete(c)) => {
                    let epoch = c.checkpoint.epoch;
                    let pages = c.page_count() as u64;
                    let first = match self.apply(&mut replica, &mut disks, *c) {
                        Ok(first) => first,
                        Err(Applied::Broken(why)) => break SessionEnd::Broken(why),
                        Err(Applied::Failed(e)) => {
                            liveness.stop();
                            closer.close();
                            return Err(e);
                        }
                    };
                    applied_here = true;
                    let acked = fw
                        .write(epoch, &Body::Ack)
                        .and_then(|()| fw.flush())
                        .is_ok();
                    ours.store(epoch, Ordering::Relaxed);
                    self.status(|i| {
                        i.state = "mirroring".into();
                        i.epoch = Some(epoch);
                        i.last_complete = Some(epoch);
                        i.protected = true;
                    });
                    if first {
                        self.finish_copy(&mut disks, epoch)?;
                    }
                    if !acked {
                        // The primary is gone; the replica holds epoch `epoch`.
                        continue;
                    }
                    self.retire(&mut disks, epoch)?;
                    let now = counted.load(Ordering::Relaxed);
                    let m = AppliedMetrics {
                        epoch,
                        bytes: now - first_bytes,
                        pages,
                        apply_us: staged_at.take().map_or(0, |t: Instant| us(t.elapsed())),
                        received_at_ms: us(self.started.elapsed()) / 1000,
                    };
                    first_bytes = now;
                    self.write_metrics(&m)?;
                    // Output the primary has shown needs no keeping.
                    let shown = released.load(Ordering::Relaxed);
                    replica.console.retain(|(e, _)| *e > shown);
                }
                Ok(Staged::Shutdown(Shutdown::Handover)) if !applied_here => {
                    break SessionEnd::Broken(
                        "a handover before any checkpoint of this session was applied".into(),
                    )
                }
                Ok(Staged::Shutdown(s)) => break SessionEnd::Shutdown(s),
                Err(e) => break SessionEnd::Broken(assemble_why(&e)),
            }
        };
        let mut end = end;
        if let SessionEnd::Lost(_) = &end {
            // A primary that ends the session on purpose (an orderly end, or giving
            // this standby up) says so on the liveness connection too: read what it
            // sent before deciding (briefly: a dead primary's connection ends at
            // once, a silent one sends nothing).
            let wait_until = Instant::now() + 2 * self.config.liveness.heartbeat;
            let heard = || devices::bus::lock_recover(&said).is_some();
            while !reader_done.load(Ordering::Acquire) && !heard() && Instant::now() < wait_until {
                std::thread::sleep(Duration::from_millis(1));
            }
            if let Some(s) = devices::bus::lock_recover(&said).take() {
                end = SessionEnd::Shutdown(s);
            }
        }
        let decided = Instant::now();
        if matches!(
            end,
            SessionEnd::Lost(_) | SessionEnd::Shutdown(Shutdown::Handover)
        ) && !applied_here
        {
            // A replica kept from an earlier session is older than what that primary
            // ran on without this standby (it recorded so, with a witness): it is
            // never resumed. Only a checkpoint of this session is.
            replica.applied = None;
        }
        let silence = pulse.silent_for();
        liveness.stop();
        closer.close();
        let shown = released.load(Ordering::Relaxed);
        replica.console.retain(|(e, _)| *e > shown);
        Ok((end, (replica, disks, silence, decided)))
    }

    /// An initial copy begins: on the replica this host kept, if `plan` names it
    /// (only the pages changed since will come), else on zeroed memory. Either way
    /// the replica is not restorable until the copy's first checkpoint is applied.
    fn begin_copy(
        &self,
        replica: &mut Replica,
        hello: &Hello,
        plan: CopyPlan,
    ) -> Result<(), String> {
        match plan.memory {
            Some(id) if replica.id() == Some(id) => {
                tracing::info!("the copy builds on the replica of {id}");
            }
            Some(id) => {
                return Err(format!(
                    "the copy builds on a replica of {id}, which this standby does not hold"
                ))
            }
            None if replica.applied.is_some() || replica.copying => {
                // A kept (or half-copied) replica is not zeros: start over.
                *replica = self
                    .empty_replica(hello)
                    .map_err(|e| format!("{}", devices::ErrorChain(&e)))?;
            }
            None => {}
        }
        replica.manifest = hello.manifest.clone();
        replica.lineage = hello.lineage;
        replica.applied = None;
        replica.console.clear();
        replica.copying = true;
        Ok(())
    }

    fn empty_replica(&self, hello: &Hello) -> Result<Replica, StandbyError> {
        Ok(Replica {
            manifest: hello.manifest.clone(),
            lineage: hello.lineage,
            memory: crate::memory::create(hello.manifest.memory).map_err(StandbyError::Memory)?,
            applied: None,
            console: Vec::new(),
            copying: false,
        })
    }

    fn write_metrics(&mut self, m: &AppliedMetrics) -> Result<(), StandbyError> {
        if let Some(t) = &self.telemetry {
            t.record_applied(m);
        }
        self.write_line(m)
    }

    fn write_line(&mut self, m: &impl serde::Serialize) -> Result<(), StandbyError> {
        if let Some(w) = &mut self.metrics {
            serde_json::to_writer(&mut *w, m)
                .map_err(|e| StandbyError::Metrics(std::io::Error::other(e)))?;
            w.write_all(b"\n").map_err(StandbyError::Metrics)?;
            w.flush().map_err(StandbyError::Metrics)?;
        }
        Ok(())
    }

    /// Applies a whole checkpoint: checks its state, completes the copy if it is the
    /// first, imports its regions into this host's journals, writes its pages.
    fn apply(
        &mut self,
        replica: &mut Replica,
        disks: &mut [Disk],
        complete: Complete,
    ) -> Result<bool, Applied> {
        let Complete {
            checkpoint: c,
            batches,
        } = complete;
        let epoch = c.epoch;
        let failed = |source: Box<dyn std::error::Error + Send + Sync>| {
            Applied::Failed(StandbyError::Apply { epoch, source })
        };
        // Nothing is written before everything that can be checked is.
        let state = decode_state(&c.state)
            .map_err(|e| Applied::Broken(format!("checkpoint {epoch}: {e}")))?;
        if state.vcpus.len() != usize::from(replica.manifest.cpus) {
            return Err(Applied::Broken(format!(
                "checkpoint {epoch} has {} vCPU states for {} vCPUs",
                state.vcpus.len(),
                replica.manifest.cpus
            )));
        }
        let pages = check_batches(&replica.memory, &batches)
            .map_err(|e: ContentError| Applied::Broken(format!("checkpoint {epoch}: {e}")))?;
        let first = replica.applied.is_none();
        if first {
            // The first checkpoint completes an initial copy, which must have come.
            let (Some(base), true) = (epoch.checked_sub(1), replica.copying) else {
                return Err(Applied::Broken(format!(
                    "checkpoint {epoch} came before any initial copy"
                )));
            };
            open_stores(disks, base).map_err(Applied::Failed)?;
        }
        for r in &c.disks {
            let RegionContent::Data(export) = &r.content else {
                return Err(Applied::Broken(format!(
                    "checkpoint {epoch} carries region metadata without data"
                )));
            };
            let Some(store) = disks.get_mut(r.disk).and_then(|d| d.store.as_mut()) else {
                return Err(Applied::Broken(format!("a region of disk {}", r.disk)));
            };
            store.import(export).map_err(|e| match e {
                // What the primary sent does not fit or does not follow: its fault.
                devices::store::Error::ImportTooLarge { .. }
                | devices::store::Error::EpochNotIncreasing { .. }
                | devices::store::Error::ImportIntoBusyRegion { .. } => {
                    Applied::Broken(format!("checkpoint {epoch}: {e}"))
                }
                e => failed(Box::new(e)),
            })?;
        }
        pages
            .write()
            .map_err(|e: ContentError| Applied::Broken(format!("checkpoint {epoch}: {e}")))?;
        replica.applied = Some((epoch, c.state));
        replica.copying = false;
        if !c.console.bytes.is_empty() {
            replica.console.push((epoch, c.console));
        }
        Ok(first)
    }

    /// After the first checkpoint was applied (and acknowledged: no fsync is needed
    /// before an Ack): the copied images are made durable, and only then are their
    /// incomplete-copy marks removed.
    fn finish_copy(&self, disks: &mut [Disk], epoch: u64) -> Result<(), StandbyError> {
        for d in disks.iter_mut() {
            if let Some(f) = d.file.take() {
                f.sync_all().map_err(d.err())?;
            }
            crate::disk::clear_incomplete(&d.config.path).map_err(d.err())?;
        }
        eprintln!("mirrorvm: standby: initial copy complete at checkpoint {epoch}");
        Ok(())
    }

    /// After the Ack: commits checkpoint `epoch`'s regions into this host's images.
    fn retire(&self, disks: &mut [Disk], epoch: u64) -> Result<(), StandbyError> {
        for d in disks.iter_mut() {
            if let Some(store) = d.store.as_mut() {
                let path = d.config.path.clone();
                let r = store.acknowledge(epoch).and_then(|()| store.retire(epoch));
                r.map_err(|source| StandbyError::Store { path, source })?;
            }
        }
        Ok(())
    }

    fn take_over(
        &mut self,
        reason: String,
        replica: Replica,
        disks: Vec<Disk>,
        silence: Duration,
        decided: Instant,
        handover: bool,
    ) -> Result<Takeover, StandbyError> {
        let Some((epoch, state)) = replica.applied else {
            return Err(StandbyError::NothingToResume(reason));
        };
        if handover {
            eprintln!("mirrorvm: standby: {reason}: taking over at checkpoint {epoch}");
        } else {
            eprintln!(
                "mirrorvm: standby: primary lost ({reason}): taking over at checkpoint {epoch}"
            );
        }
        let mut report = FailoverReport {
            reason,
            epoch,
            detect: silence,
            handover,
            ..Default::default()
        };
        // Fence.
        let t = Instant::now();
        let mut held: Option<super::peer::SharedFence> = None;
        match &self.config.witness {
            Some(path) => {
                let w = Witness::new(path);
                let mut fence = match w.try_acquire().map_err(StandbyError::Fence)? {
                    Attempt::Acquired(f) => f,
                    Attempt::Busy(holder) => {
                        eprintln!(
                            "mirrorvm: failover: waiting for the fence: the witness {} is held by {holder} (a primary that is alive but silent keeps it)",
                            path.display()
                        );
                        // Blocks in the kernel until the holder's lock is released
                        // (it dies or exits); no deadline: a live primary keeps it.
                        w.start_wait()
                            .and_then(FenceWait::wait)
                            .map_err(StandbyError::Fence)?
                    }
                };
                let generation = fence.take_over(epoch).map_err(StandbyError::Fence)?;
                tracing::info!("took the fence: generation {generation}");
                // This process holds the witness while it runs the guest.
                held = Some(Arc::new(std::sync::Mutex::new(fence)));
            }
            None if handover => {}
            None => eprintln!(
                "mirrorvm: failover: no --witness: taking over on silence alone (a network partition can leave two guests running)"
            ),
        }
        report.fence = t.elapsed();
        // Disks: close the stores; the machine opens them at exactly `epoch`.
        let t = Instant::now();
        let mut manifest = replica.manifest;
        let mut ours = Vec::new();
        for d in disks {
            let journal_id = d.store.as_ref().map(|s| s.file_header().journal_id);
            let region_size = d.store.as_ref().map(|s| s.file_header().region_capacity);
            ours.push(DiskManifest {
                config: d.config.clone(),
                size: d.size,
                journal_id,
                region_size,
            });
        }
        manifest.disks = ours;
        report.apply = t.elapsed();
        let t = Instant::now();
        let state = decode_state(&state).map_err(|e| StandbyError::Apply {
            epoch,
            source: Box::new(e),
        })?;
        let mut source = ReplicaSource::new(
            manifest,
            Restored {
                epoch,
                memory: replica.memory,
                state,
            },
            "the standby's replica",
        );
        // The new primary runs unprotected, and accepts a standby that dials it on
        // this host's listening address (re-protection); so it tracks what the guest
        // writes from the resumed checkpoint on.
        let session = PeerConfig {
            addr: self.local_addr().unwrap_or_default(),
            witness: None,
            liveness: self.config.liveness,
            transport: self.config.transport,
            max_rate: None,
            listen: None,
            wire: self.config.wire,
        };
        let epochs = EpochConfig {
            epoch: crate::epoch::EpochLength::Fixed(crate::config::DEFAULT_EPOCH),
            sink: SinkConfig::Await(session.clone()),
            metrics: None,
            metrics_addr: None,
        };
        let mut machine = Machine::from_source(
            &mut source,
            &self.config.serial,
            &self.config.kvm_device,
            Some(epochs),
        )
        .map_err(|e| StandbyError::Restore {
            epoch,
            source: Box::new(e),
        })?;
        machine.taken_over = true;
        if let Some(l) = self.listener.take() {
            machine.accept_standbys(
                JoinListener::from_listener(l),
                session,
                held.clone(),
                ReplicaId {
                    lineage: replica.lineage,
                    epoch,
                },
            );
        }
        if let Some(endpoint) = self.api.clone() {
            machine.serve_api(endpoint);
        }
        report.restore = t.elapsed();
        // Output of held epochs up to the one resumed that the primary may not have
        // shown (it reported what it released in its heartbeats).
        let mut end = None;
        for (_, c) in &replica.console {
            machine.show_console(c.offset, &c.bytes);
            report.console_bytes += c.bytes.len() as u64;
            end = Some(c.offset + c.bytes.len() as u64);
        }
        let _ = end;
        if let Some(t) = &self.telemetry {
            t.record_failover();
        }
        let line = FailoverMetrics {
            failover: true,
            epoch,
            reason: report.reason.clone(),
            detect_us: us(report.detect),
            fence_us: us(report.fence),
            restore_us: us(report.restore),
            at_ms: us(self.started.elapsed()) / 1000,
        };
        if let Err(e) = self.write_line(&line) {
            // The guest must resume whatever the metrics file says.
            tracing::warn!("{}", devices::ErrorChain(&e));
        }
        Ok(Takeover {
            machine,
            report,
            decided,
            _fence: held,
            endpoint: self.endpoint.take(),
        })
    }
}

impl Replica {
    /// Its name, once it holds a whole checkpoint.
    fn id(&self) -> Option<ReplicaId> {
        self.applied.as_ref().map(|(epoch, _)| ReplicaId {
            lineage: self.lineage,
            epoch: *epoch,
        })
    }
}

/// Creates each disk's journal, starting at `epoch` (the initial copy's), if it
/// does not exist yet: before the copy completes, so the first checkpoint's
/// acknowledgement does not wait for a new journal to be written.
fn open_stores(disks: &mut [Disk], epoch: u64) -> Result<(), StandbyError> {
    for d in disks.iter_mut().filter(|d| d.store.is_none()) {
        let cfg = devices::store::StoreConfig {
            created_epoch: epoch,
            ..devices::store::StoreConfig::for_disk(d.size, d.config.region_size)
        };
        let (store, _) = devices::store::Store::open_path(
            &d.config.path,
            &cfg,
            devices::store::RecoverTo::LastAcknowledged,
        )
        .map_err(|source| StandbyError::Store {
            path: d.config.path.clone(),
            source,
        })?;
        d.store = Some(store);
    }
    Ok(())
}

/// Why applying a checkpoint stopped.
enum Applied {
    /// The checkpoint is malformed: the primary broke the protocol.
    Broken(String),
    /// This host failed to apply it.
    Failed(StandbyError),
}

fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn assemble_why(e: &AssembleError) -> String {
    format!("{}", devices::ErrorChain(e))
}
