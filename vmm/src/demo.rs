//! `mirrorvm demo`: mirroring and failover shown in one command, to someone who has
//! never seen mirrorvm (`docs/demo.md`).
//!
//! It runs the mirrorvm binary itself as two processes: a standby on host b, then a
//! primary on host a that mirrors its guest to it (two network namespaces of a
//! [`NetLab`], or loopback when they cannot be made). It shows a live status line per
//! host, kills the primary with SIGKILL, shows the standby take over while the guest
//! carries on, and ends with a verdict computed from the raw console transcripts of
//! both hosts and the guest's own checks ([`verdict`]). Every exit path, Ctrl-C
//! included, kills and reaps both processes and deletes the namespaces.

/// `writeln!` to a stream, ignoring a closed pipe (`mirrorvm demo | head`): unlike
/// `println!`, never a panic in the middle of the demo.
macro_rules! say {
    ($out:expr, $($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!($out, $($arg)*);
    }};
}

pub mod status;
pub mod verdict;

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::lock::{lock_file, LockError, LockKind};

use crate::netlab::{Host, NetLab, NetLabError};
use status::{HostFiles, Monitor, Screen, StandbyState};
use verdict::{Evidence, Verdict, Workload};

/// The prefix of the demo's network namespaces: `mvdemo-host-a`, `mvdemo-host-b`.
pub const LAB_PREFIX: &str = "mvdemo";
/// The port the standby listens on inside host b's namespace.
pub const LAB_PORT: u16 = 7370;
/// Size of each host's disk image.
pub const DISK_BYTES: u64 = 64 << 20;
/// The test guest's workload, before `seconds=`: two engines, one dirtying and
/// checking memory, one rewriting and checking disk records (resources/testguest).
pub const MIX_ARGS: &str = "pages_per_ms=20 mb=16 records=16";
/// The Linux command line that gets the small kernel through KVM's emulator here
/// (ENVIRONMENT.md; the same one `tests/linux.rs` uses), with an ext4 root on vda.
pub const LINUX_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 8250.nr_uarts=1 tsc=reliable noxsave nopku nofsgsbase noinvpcid nopcid clearcpuid=popcnt,rdrand,rdseed,smap,umip,avx,avx2,movbe,bmi1,bmi2,abm,rdpid,aes,pclmulqdq root=/dev/vda rw rootfstype=ext4";

/// How long the standby may take to listen.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long until the initial copy is complete (boot, pre-copy of memory and disk).
const PROTECT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long after the kill the standby may take to print its failover line.
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(60);
/// How much later than planned the guest may end by itself on host b.
const END_SLACK: Duration = Duration::from_secs(120);
/// How long a Linux guest may take to reach [`LINUX_KILL_MARKER`] on host a (it is
/// emulated: 20–60 s on a quiet machine, several minutes on a loaded one).
const LINUX_MARKER_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a Linux guest may take to finish booting on host b.
const LINUX_END_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a process has between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(30);
/// The refresh period of the status lines (5 per second).
const TICK: Duration = Duration::from_millis(200);

/// What the demo does.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// The mirrorvm binary to run as primary and standby (normally
    /// `std::env::current_exe()`).
    pub mirrorvm: PathBuf,
    /// The guest's `mix seconds=`. 0 runs it until the demo stops the standby
    /// `run_after` after the takeover (the verdict then rests on the guest's running
    /// checks and progress lines). N > 0 lets it end by itself and verify everything
    /// once more: N counts from the guest's start, and the initial copy before the
    /// kill timer starts takes several seconds, so N must exceed that plus
    /// `kill_after`; the demo then waits for the guest's end instead of `run_after`.
    pub seconds: u64,
    /// How long the primary mirrors before the demo kills it: from the standby's
    /// initial copy complete, or with `kernel` from the [`LINUX_KILL_MARKER`] on host
    /// a's console. `None`: [`DEFAULT_KILL_AFTER`] for the test guest, at once for
    /// Linux.
    pub kill_after: Option<Duration>,
    /// How long the guest runs on host b after the takeover.
    pub run_after: Duration,
    /// Boot this Linux vmlinux (ext4 root disk) instead of the test guest.
    pub kernel: Option<PathBuf>,
    /// Use loopback even when the network lab could be made.
    pub loopback: bool,
    /// Both hosts' liveness deadline (`--dead-ms`): a peer silent this long is
    /// declared dead.
    pub dead_ms: u64,
}

/// How long the test guest is mirrored before the kill, by default.
pub const DEFAULT_KILL_AFTER: Duration = Duration::from_secs(6);
/// With `--kernel`, the kill timer starts when host a's console shows this: the
/// kernel is past its early clock setup and has yet to probe its disk and mount its
/// root. (Takeovers earlier in the boot used to stall in the guest kernel's tick
/// replay; the kernel build no longer replays ticks: docs/demo.md, "Linux".)
pub const LINUX_KILL_MARKER: &str = "virtio-mmio: Registering device";

/// The demo's default liveness deadline, longer than mirrorvm's own 100 ms: on a
/// loaded 2-core host (an emulated Linux boot, a compile beside it) a liveness thread
/// can go unscheduled for more than 100 ms and the standby would declare a live
/// primary dead. A SIGKILL is still seen at once, as a closed connection.
pub const DEFAULT_DEAD_MS: u64 = 500;

/// How a demo that ran to its verdict came out.
#[derive(Debug)]
pub struct Outcome {
    /// The verdict.
    pub verdict: Verdict,
    /// The working directory (images, consoles, metrics, logs), kept when the verdict
    /// failed.
    pub kept: Option<PathBuf>,
}

/// Why the demo could not reach a verdict.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The options contradict each other.
    #[error("bad demo options: {0}")]
    Options(String),
    /// SIGINT or SIGTERM handlers could not be installed.
    #[error("cannot install the demo's signal handlers")]
    Signals(#[source] std::io::Error),
    /// The working directory could not be made.
    #[error("cannot create the demo's working directory")]
    WorkDir(#[source] std::io::Error),
    /// A file in the working directory could not be made.
    #[error("cannot create {path}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The kernel given with `--kernel` cannot be found.
    #[error("cannot find the kernel {path}")]
    Kernel {
        /// The path given.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `mkfs.ext4` could not be run to make the Linux guest's root file system.
    #[error("cannot run mkfs.ext4 (e2fsprogs) to make the root image {path}")]
    MkfsSpawn {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `mkfs.ext4` failed.
    #[error("mkfs.ext4 {path} failed ({status}): {stderr}")]
    Mkfs {
        /// The image.
        path: PathBuf,
        /// How it ended.
        status: ExitStatus,
        /// What it printed on stderr.
        stderr: String,
    },
    /// No free port on loopback.
    #[error("cannot find a free port on loopback")]
    Port(#[source] std::io::Error),
    /// A mirrorvm process could not be started.
    #[error("cannot start the {role} on {host}")]
    Spawn {
        /// "primary" or "standby".
        role: &'static str,
        /// "host-a" or "host-b".
        host: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A process ended before the demo got to where it needed it.
    #[error("the {role} on {host} ended ({status}) while the demo waited for {when}; its last stderr lines:\n{tail}")]
    Ended {
        /// "primary" or "standby".
        role: &'static str,
        /// "host-a" or "host-b".
        host: &'static str,
        /// Its exit status.
        status: String,
        /// What the demo was waiting for.
        when: &'static str,
        /// Its last stderr lines.
        tail: String,
    },
    /// Something did not happen in time.
    #[error("waited {} s for {what} in vain; the standby's last stderr lines:\n{tail}", timeout.as_secs())]
    Timeout {
        /// What was awaited.
        what: &'static str,
        /// How long the demo waited.
        timeout: Duration,
        /// The standby's last stderr lines.
        tail: String,
    },
    /// The standby declared the primary lost while it was still running (its
    /// liveness deadline passed on a loaded host, or the link failed). The fence keeps
    /// the two from both running the guest, but the demo cannot go on.
    #[error("host-b declared host-a lost ({reason}) while it was still running, before the demo killed it: a false alarm (a host too loaded for --dead-ms {dead_ms}?); the fence keeps them from both running the guest. The standby's last stderr lines:\n{tail}")]
    FalseAlarm {
        /// The standby's reason.
        reason: String,
        /// The liveness deadline in use.
        dead_ms: u64,
        /// The standby's last stderr lines.
        tail: String,
    },
    /// The guest ended its run on host-a before the demo killed the primary (a
    /// `--seconds` too short), so there was nothing to fail over.
    #[error("the guest ended its run on host-a before the primary was killed (is --seconds shorter than the initial copy plus --kill-after? 0 runs it until the demo stops it); the standby's last stderr lines:\n{tail}")]
    GuestEndedEarly {
        /// The standby's last stderr lines.
        tail: String,
    },
    /// A transcript or metrics file could not be read for the verdict.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The user interrupted the demo (Ctrl-C or SIGTERM).
    #[error("interrupted by signal {signal}")]
    Interrupted {
        /// The signal number.
        signal: i32,
    },
}

/// Where the two hosts are.
enum Network {
    /// Two namespaces; the lock keeps another demo off the same names.
    Lab { lab: NetLab, _lock: File },
    /// Loopback, and why.
    Loopback { why: String },
}

impl Network {
    fn standby_addr(&self) -> Result<SocketAddr, DemoError> {
        match self {
            Network::Lab { lab, .. } => Ok(SocketAddr::from((lab.addr_b(), LAB_PORT))),
            Network::Loopback { .. } => {
                // A port the kernel says is free now; the standby binds it a moment
                // later (a race only with another program taking it meanwhile).
                let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(DemoError::Port)?;
                l.local_addr().map_err(DemoError::Port)
            }
        }
    }

    fn command(&self, host: Host, program: &Path) -> Command {
        match self {
            Network::Lab { lab, .. } => lab.command_in(host, program),
            Network::Loopback { .. } => Command::new(program),
        }
    }

    fn describe(&self) -> String {
        match self {
            Network::Lab { lab, .. } => format!(
                "network: host-a is namespace {} ({}), host-b is {} ({}), joined by a veth pair",
                lab.namespace(Host::A),
                lab.addr_a(),
                lab.namespace(Host::B),
                lab.addr_b()
            ),
            Network::Loopback { why } => {
                format!("network: loopback (127.0.0.1) for both hosts: {why}")
            }
        }
    }
}

/// Builds the lab, or says why not and falls back to loopback.
fn network(loopback: bool) -> Network {
    if loopback {
        return Network::Loopback {
            why: "--loopback was given".to_owned(),
        };
    }
    match lab() {
        Ok(n) => n,
        Err(why) => Network::Loopback { why },
    }
}

fn lab() -> Result<Network, String> {
    let euid = nix::unistd::geteuid();
    if !euid.is_root() {
        // Said before the lock file is touched, which may belong to root.
        return Err(NetLabError::NotRoot {
            euid: euid.as_raw(),
        }
        .to_string());
    }
    // One demo at a time owns the namespace names: a second one uses loopback rather
    // than deleting the first one's lab as a leftover.
    let path = std::env::temp_dir().join("mirrorvm-demo-netlab.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    match lock_file(&lock, &path, "network lab lock", LockKind::Exclusive) {
        Ok(()) => {}
        Err(LockError::Busy { holder, .. }) => {
            return Err(format!("the network lab is in use by {holder}"))
        }
        Err(e) => return Err(e.to_string()),
    }
    let lab = match NetLab::create(LAB_PREFIX) {
        Err(NetLabError::Exists { .. }) => {
            // A demo killed before it could clean up: we hold the lock, so it is not
            // running any more.
            NetLab::cleanup_stale(LAB_PREFIX).map_err(|e| e.to_string())?;
            NetLab::create(LAB_PREFIX)
        }
        other => other,
    }
    .map_err(|e| e.to_string())?;
    Ok(Network::Lab { lab, _lock: lock })
}

/// A mirrorvm child: its stderr lines collected on a thread (and copied to a log
/// file). Dropping it kills (SIGKILL) and reaps it if it still runs.
struct Proc {
    role: &'static str,
    host: &'static str,
    child: Child,
    status: Option<ExitStatus>,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
}

impl Proc {
    fn spawn(
        mut cmd: Command,
        role: &'static str,
        host: &'static str,
        workdir: &Path,
    ) -> Result<Proc, DemoError> {
        let spawn_err = |source| DemoError::Spawn { role, host, source };
        let out_path = workdir.join(host).join("stdout.log");
        let stdout = File::create(&out_path).map_err(|source| DemoError::File {
            path: out_path,
            source,
        })?;
        let log_path = workdir.join(host).join("stderr.log");
        let mut log = File::create(&log_path).map_err(|source| DemoError::File {
            path: log_path,
            source,
        })?;
        cmd.current_dir(workdir)
            // Its log lines are shown inside the demo's own: plain text, no colours.
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::piped())
            // Its own process group: a Ctrl-C at the terminal reaches the demo only,
            // which then stops both hosts itself.
            .process_group(0);
        // SAFETY: the closure runs in the child between fork and exec, where only
        // async-signal-safe calls are allowed: it makes one prctl system call and
        // allocates nothing.
        unsafe {
            cmd.pre_exec(|| {
                // If the demo dies without cleaning up (SIGKILL), so does the child.
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)
            });
        }
        let mut child = cmd.spawn().map_err(spawn_err)?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let reader = child.stderr.take().map(|err| {
            let lines = Arc::clone(&lines);
            std::thread::spawn(move || {
                for line in BufReader::new(err).lines() {
                    let Ok(line) = line else { break };
                    let _ = writeln!(log, "{line}");
                    devices::bus::lock_recover(&lines).push(line);
                }
            })
        });
        Ok(Proc {
            role,
            host,
            child,
            status: None,
            lines,
            reader,
        })
    }

    fn lines(&self) -> Vec<String> {
        devices::bus::lock_recover(&self.lines).clone()
    }

    fn tail(&self) -> String {
        let lines = self.lines();
        let from = lines.len().saturating_sub(12);
        lines[from..].join("\n")
    }

    /// Its exit status, once it has ended.
    fn poll(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, then reap.
    fn kill(&mut self) {
        if self.poll().is_none() {
            // An error means it has just exited by itself; wait() reaps it either way.
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }

    /// SIGTERM, then SIGKILL if it has not ended within `grace`.
    fn terminate(&mut self, grace: Duration) {
        if self.poll().is_some() {
            return;
        }
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // Our own unreaped child: the pid cannot have been reused.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let end = Instant::now() + grace;
        while self.poll().is_none() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
    }

    /// Waits for its stderr to be read to the end (after it has ended).
    fn drain(&mut self) {
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }

    fn ended(&self, when: &'static str) -> DemoError {
        DemoError::Ended {
            role: self.role,
            host: self.host,
            status: self.status.map_or("still running".to_owned(), show_status),
            when,
            tail: self.tail(),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        self.drain();
    }
}

fn show_status(s: ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => s.to_string(),
    }
}

/// The working directory's layout (paths relative to it, so the commands shown to the
/// user stay short).
struct Layout {
    disk_a: &'static str,
    disk_b: &'static str,
    console_a: &'static str,
    console_b: &'static str,
    metrics_a: &'static str,
    metrics_b: &'static str,
    witness: &'static str,
}

const LAYOUT: Layout = Layout {
    disk_a: "host-a/disk.img",
    disk_b: "host-b/disk.img",
    console_a: "host-a/console.log",
    console_b: "host-b/console.log",
    metrics_a: "host-a/metrics.jsonl",
    metrics_b: "host-b/metrics.jsonl",
    witness: "witness",
};

/// The SIGINT/SIGTERM flags the demo polls.
struct Interrupts {
    int: Arc<AtomicBool>,
    term: Arc<AtomicBool>,
}

impl Interrupts {
    fn install() -> Result<Interrupts, DemoError> {
        let int = Arc::new(AtomicBool::new(false));
        let term = Arc::new(AtomicBool::new(false));
        signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&int))
            .map_err(DemoError::Signals)?;
        signal_hook::flag::register(signal_hook::consts::SIGTERM, Arc::clone(&term))
            .map_err(DemoError::Signals)?;
        Ok(Interrupts { int, term })
    }

    fn check(&self) -> Result<(), DemoError> {
        if self.int.load(Ordering::SeqCst) {
            return Err(DemoError::Interrupted {
                signal: signal_hook::consts::SIGINT,
            });
        }
        if self.term.load(Ordering::SeqCst) {
            return Err(DemoError::Interrupted {
                signal: signal_hook::consts::SIGTERM,
            });
        }
        Ok(())
    }
}

/// Runs the demo and prints its verdict on stdout (the live view goes to stderr).
pub fn run(opts: &DemoOptions) -> Result<Outcome, DemoError> {
    let s = opts.seconds;
    let kill_after = opts.kill_after.unwrap_or(DEFAULT_KILL_AFTER);
    if opts.kernel.is_none() && s > 0 && Duration::from_secs(s) <= kill_after {
        return Err(DemoError::Options(format!(
            "--seconds {s} ends the guest before --kill-after {} s: nothing would be left to fail over",
            kill_after.as_secs_f64()
        )));
    }
    let interrupts = Interrupts::install()?;
    // Declared first, dropped last: the namespaces go only after both processes.
    let net = network(opts.loopback);
    let dir = tempfile::Builder::new()
        .prefix("mirrorvm-demo")
        .tempdir()
        .map_err(DemoError::WorkDir)?;
    let start = Instant::now();
    let mut screen = Screen::new(start, 3);
    let result = run_in(opts, &net, dir.path(), &interrupts, &mut screen, start);
    screen.finish();
    match result {
        Ok(verdict) => {
            say!(std::io::stdout(), "{verdict}");
            let kept = if verdict.passed() {
                None
            } else {
                let p = dir.keep();
                say!(
                    std::io::stdout(),
                    "the demo's files (consoles, metrics, logs) are kept in {}",
                    p.display()
                );
                Some(p)
            };
            Ok(Outcome { verdict, kept })
        }
        Err(e @ DemoError::Interrupted { .. }) => Err(e),
        Err(e) => {
            let p = dir.keep();
            say!(
                std::io::stderr(),
                "mirrorvm: the demo's files are kept in {}",
                p.display()
            );
            Err(e)
        }
    }
}

/// The guest and machine the demo runs.
struct Guest {
    workload: Workload,
    args: Vec<String>,
    describe: String,
}

fn guest(opts: &DemoOptions, dir: &Path) -> Result<Guest, DemoError> {
    match &opts.kernel {
        Some(kernel) => {
            // Both hosts run in the working directory: the path must not be relative.
            let kernel = std::fs::canonicalize(kernel).map_err(|source| DemoError::Kernel {
                path: kernel.clone(),
                source,
            })?;
            make_ext4(&dir.join(LAYOUT.disk_a))?;
            let (a, b) = (dir.join(LAYOUT.disk_a), dir.join(LAYOUT.disk_b));
            std::fs::copy(&a, &b).map_err(|source| DemoError::File { path: b, source })?;
            Ok(Guest {
                workload: Workload::Linux,
                args: vec![
                    "--kernel".into(),
                    kernel.display().to_string(),
                    "--cpus".into(),
                    "1".into(),
                    "--memory".into(),
                    "128M".into(),
                    "--cmdline".into(),
                    LINUX_CMDLINE.into(),
                ],
                describe: format!(
                    "guest: Linux ({}) booting from an ext4 root disk; it is killed mid-boot, and host-b must finish the boot (`{}`)",
                    kernel.display(),
                    verdict::LINUX_MOUNTED
                ),
            })
        }
        None => {
            let seconds = opts.seconds;
            for p in [LAYOUT.disk_a, LAYOUT.disk_b] {
                let path = dir.join(p);
                File::create(&path)
                    .and_then(|f| f.set_len(DISK_BYTES))
                    .map_err(|source| DemoError::File { path, source })?;
            }
            Ok(Guest {
                workload: Workload::Mix { seconds },
                args: vec![
                    "--cpus".into(),
                    "2".into(),
                    "--memory".into(),
                    "256M".into(),
                    "--cmdline".into(),
                    format!("mix seconds={seconds} {MIX_ARGS}"),
                ],
                describe: format!(
                    "guest: the test guest's `mix`: one vCPU dirties memory and checks every page keeps its last write, the other rewrites disk records and checks each holds the previous round; {}",
                    if seconds == 0 {
                        "forever (the demo stops it)".to_owned()
                    } else {
                        format!("for {seconds} s, then it verifies everything and exits")
                    }
                ),
            })
        }
    }
}

fn make_ext4(path: &Path) -> Result<(), DemoError> {
    File::create(path)
        .and_then(|f| f.set_len(DISK_BYTES))
        .map_err(|source| DemoError::File {
            path: path.to_owned(),
            source,
        })?;
    let out = Command::new("mkfs.ext4")
        .args(["-F", "-q"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| DemoError::MkfsSpawn {
            path: path.to_owned(),
            source,
        })?;
    if !out.status.success() {
        return Err(DemoError::Mkfs {
            path: path.to_owned(),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

fn shown(program: &str, args: &[String]) -> String {
    let quoted: Vec<String> = args
        .iter()
        .map(|a| {
            if a.contains(' ') {
                format!("\"{a}\"")
            } else {
                a.clone()
            }
        })
        .collect();
    format!("{program} {}", quoted.join(" "))
}

/// Forwards the stderr lines a process printed since `seen` as events.
fn echo_new(screen: &Screen, p: &Proc, seen: &mut usize) -> Vec<String> {
    let lines = p.lines();
    let new: Vec<String> = lines.get(*seen..).unwrap_or_default().to_vec();
    *seen = lines.len();
    for l in &new {
        screen.event(&format!("{} | {l}", p.host));
    }
    new
}

/// The demo's phases, shared state and status display.
struct Stage<'a> {
    screen: &'a mut Screen,
    monitor: Monitor,
    interrupts: &'a Interrupts,
    standby: Proc,
    primary: Option<Proc>,
    seen_b: usize,
    seen_a: usize,
    killed: bool,
    dead_ms: u64,
}

impl Stage<'_> {
    /// One refresh: new stderr lines as events, then the status lines (`force`: print
    /// plain ones even if a second has not passed).
    fn tick(&mut self) -> Result<StandbyState, DemoError> {
        self.refresh(false)
    }

    fn refresh(&mut self, force: bool) -> Result<StandbyState, DemoError> {
        self.interrupts.check()?;
        echo_new(self.screen, &self.standby, &mut self.seen_b);
        if let Some(p) = &self.primary {
            echo_new(self.screen, p, &mut self.seen_a);
        }
        let now = Instant::now();
        self.monitor.poll(now);
        let state = StandbyState::from_lines(self.standby.lines().iter().map(String::as_str));
        let a_end = match &mut self.primary {
            None => Some("not started".to_owned()),
            Some(_) if self.killed => Some("KILLED (SIGKILL)".to_owned()),
            Some(p) => p.poll().map(show_status),
        };
        let b_end = self.standby.poll().map(show_status);
        let pv = self.monitor.primary(now, a_end, &state);
        let sv = self.monitor.standby(state.clone(), self.killed, b_end);
        let lines = [
            format!("host-a  {}", status::render_primary(&pv)),
            format!("host-b  {}", status::render_standby(&sv)),
            format!("guest   {}", self.monitor.guest_line()),
        ];
        self.screen.status(&lines, force);
        if !force {
            std::thread::sleep(TICK);
        }
        Ok(state)
    }

    /// Fails if a process ended when it should not have: the primary before the kill,
    /// the standby unless `standby_may_end`. True if the standby ended (allowed).
    fn check_ended(
        &mut self,
        when: &'static str,
        standby_may_end: bool,
    ) -> Result<bool, DemoError> {
        if !self.killed {
            let lines = self.standby.lines();
            if let StandbyState::LostPrimary { reason } =
                StandbyState::from_lines(lines.iter().map(String::as_str))
            {
                return Err(DemoError::FalseAlarm {
                    reason,
                    dead_ms: self.dead_ms,
                    tail: self.standby.tail(),
                });
            }
        }
        if !self.killed {
            if let Some(p) = &mut self.primary {
                if p.poll().is_some() {
                    // A guest that ended its run on host-a ends the standby too, with
                    // a line saying so: give it a moment to tell.
                    let end = Instant::now() + Duration::from_secs(1);
                    while self.standby.poll().is_none() && Instant::now() < end {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    if self.standby.poll().is_some() {
                        self.standby.drain();
                    }
                    let lines = self.standby.lines();
                    if StandbyState::from_lines(lines.iter().map(String::as_str))
                        == StandbyState::PrimaryEnded
                    {
                        return Err(DemoError::GuestEndedEarly {
                            tail: self.standby.tail(),
                        });
                    }
                    return Err(p.ended(when));
                }
            }
        }
        if self.standby.poll().is_some() {
            if standby_may_end {
                return Ok(true);
            }
            return Err(self.standby.ended(when));
        }
        Ok(false)
    }

    /// Ticks until `done` holds for the standby's state; fails if the timeout passes
    /// or a process ends first.
    fn wait_for(
        &mut self,
        what: &'static str,
        timeout: Duration,
        done: impl Fn(&StandbyState) -> bool,
    ) -> Result<(), DemoError> {
        let end = Instant::now() + timeout;
        loop {
            if done(&self.tick()?) {
                return Ok(());
            }
            self.check_ended(what, false)?;
            if Instant::now() > end {
                return Err(DemoError::Timeout {
                    what,
                    timeout,
                    tail: self.standby.tail(),
                });
            }
        }
    }

    /// Ticks for `d`; fails if a process ends meanwhile (the standby may, when
    /// `standby_may_end`: then it returns early).
    fn run_for(
        &mut self,
        d: Duration,
        what: &'static str,
        standby_may_end: bool,
    ) -> Result<(), DemoError> {
        let end = Instant::now() + d;
        while Instant::now() < end {
            self.tick()?;
            if self.check_ended(what, standby_may_end)? {
                break;
            }
        }
        Ok(())
    }
}

fn run_in(
    opts: &DemoOptions,
    net: &Network,
    dir: &Path,
    interrupts: &Interrupts,
    screen: &mut Screen,
    start: Instant,
) -> Result<Verdict, DemoError> {
    for host in ["host-a", "host-b"] {
        let p = dir.join(host);
        std::fs::create_dir_all(&p).map_err(|source| DemoError::File { path: p, source })?;
    }
    screen.event(&net.describe());
    screen.event(&format!("working directory: {}", dir.display()));
    let g = guest(opts, dir)?;
    screen.event(&g.describe);
    let listen = net.standby_addr()?;

    let standby_args: Vec<String> = vec![
        "standby".into(),
        "--listen".into(),
        listen.to_string(),
        "--disk".into(),
        format!("path={},checkpoint=on", LAYOUT.disk_b),
        "--serial".into(),
        format!("file={}", LAYOUT.console_b),
        "--witness".into(),
        LAYOUT.witness.into(),
        "--metrics".into(),
        LAYOUT.metrics_b.into(),
        "--dead-ms".into(),
        opts.dead_ms.to_string(),
    ];
    screen.event(&format!("host-b $ {}", shown("mirrorvm", &standby_args)));
    let mut cmd = net.command(Host::B, &opts.mirrorvm);
    cmd.args(&standby_args);
    let standby = Proc::spawn(cmd, "standby", "host-b", dir)?;
    let files = |console: &str, metrics: &str| HostFiles {
        console: dir.join(console),
        metrics: dir.join(metrics),
    };
    let mut st = Stage {
        screen,
        monitor: Monitor::new(
            &files(LAYOUT.console_a, LAYOUT.metrics_a),
            &files(LAYOUT.console_b, LAYOUT.metrics_b),
        ),
        interrupts,
        standby,
        primary: None,
        seen_a: 0,
        seen_b: 0,
        killed: false,
        dead_ms: opts.dead_ms,
    };
    st.wait_for("the standby to listen", LISTEN_TIMEOUT, |s| {
        *s != StandbyState::Starting
    })?;

    let mut primary_args: Vec<String> = vec!["run".into()];
    primary_args.extend(g.args.iter().cloned());
    primary_args.extend([
        "--disk".into(),
        format!("path={},checkpoint=on", LAYOUT.disk_a),
        "--serial".into(),
        format!("file={}", LAYOUT.console_a),
        "--peer".into(),
        listen.to_string(),
        "--witness".into(),
        LAYOUT.witness.into(),
        "--metrics".into(),
        LAYOUT.metrics_a.into(),
        "--dead-ms".into(),
        opts.dead_ms.to_string(),
    ]);
    st.screen
        .event(&format!("host-a $ {}", shown("mirrorvm", &primary_args)));
    let mut cmd = net.command(Host::A, &opts.mirrorvm);
    cmd.args(&primary_args);
    st.primary = Some(Proc::spawn(cmd, "primary", "host-a", dir)?);
    st.wait_for("the initial copy to the standby", PROTECT_TIMEOUT, |s| {
        matches!(s, StandbyState::Mirroring)
    })?;
    let kill_after = if g.workload == Workload::Linux {
        st.screen.event(&format!(
            "mirroring: host-b holds a replica; waiting for `{LINUX_KILL_MARKER}` on host-a's console (mid-boot, past the kernel's clock calibration)"
        ));
        let console = dir.join(LAYOUT.console_a);
        let marker = move |_: &StandbyState| {
            std::fs::read(&console)
                .is_ok_and(|b| String::from_utf8_lossy(&b).contains(LINUX_KILL_MARKER))
        };
        st.wait_for(
            "the kernel's virtio-mmio device on host-a",
            LINUX_MARKER_TIMEOUT,
            marker,
        )?;
        opts.kill_after.unwrap_or(Duration::ZERO)
    } else {
        opts.kill_after.unwrap_or(DEFAULT_KILL_AFTER)
    };
    st.screen.event(&format!(
        "mirroring: host-b holds a replica; host-a is killed in {:.0} s",
        kill_after.as_secs_f64()
    ));
    st.run_for(kill_after, "the kill (mirroring)", false)?;

    if let Some(p) = &mut st.primary {
        let pid = p.pid();
        p.kill();
        st.killed = true;
        st.screen.event(&format!(
            "host-a: SIGKILL to the primary (pid {pid}) at {:.1} s: host-a is gone",
            start.elapsed().as_secs_f64()
        ));
    }
    st.wait_for("the standby's takeover", FAILOVER_TIMEOUT, |s| {
        matches!(s, StandbyState::TookOver { .. })
    })?;

    // Then the guest goes on, on host-b.
    let stopped = match g.workload {
        Workload::Mix { seconds: 0 } => {
            st.run_for(opts.run_after, "the guest to run on host-b", false)?;
            st.screen
                .event("host-b: SIGTERM to the new primary: the demo is over");
            st.standby.terminate(STOP_GRACE);
            true
        }
        Workload::Mix { .. } | Workload::Linux => {
            let limit = if g.workload == Workload::Linux {
                LINUX_END_TIMEOUT
            } else {
                opts.run_after + END_SLACK
            };
            st.run_for(limit, "the guest to run on host-b", true)?;
            if st.standby.poll().is_none() {
                st.screen.event(&format!(
                    "host-b: the guest did not end within {} s: SIGTERM",
                    limit.as_secs()
                ));
                st.standby.terminate(STOP_GRACE);
                true
            } else {
                false
            }
        }
    };
    st.standby.drain();
    // The last stderr lines and status.
    st.refresh(true)?;

    let read = |rel: &str| {
        let path = dir.join(rel);
        match std::fs::read(&path) {
            Ok(b) => Ok(String::from_utf8_lossy(&b).into_owned()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
            Err(source) => Err(DemoError::Read { path, source }),
        }
    };
    let evidence = Evidence {
        console_a: read(LAYOUT.console_a)?,
        console_b: read(LAYOUT.console_b)?,
        standby_stderr: st.standby.lines(),
        standby_metrics: verdict::parse_standby_metrics(&read(LAYOUT.metrics_b)?),
        standby_exit: st.standby.status.and_then(|s| s.code()),
        standby_stopped: stopped,
    };
    Ok(Verdict::judge(g.workload, &evidence))
}
