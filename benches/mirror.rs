//! Mirroring benchmark: a primary (`mirrorvm run --peer`) and its standby
//! (`mirrorvm standby`) run as separate processes of the release binary, over
//! loopback and over a veth pair between two network namespaces (`vmm::netlab`, root
//! only: the veth rows are skipped with the reason otherwise). It prints five tables,
//! each measured side by side in one run:
//!
//! 1. **Stream throughput**: one plain TCP stream (std::net, the reference) and the
//!    initial copy of a `--memory` guest (the primary's `initial copy to ADDR: …
//!    bytes of memory and disks … in S s` line), alternating; then the checkpoint bytes per
//!    second a heavy dirtier sustains (the standby's `--metrics` lines) and each
//!    checkpoint's bytes over its hand-over-to-Ack time.
//! 2. **Ack latency**: each checkpoint's hand-over to acknowledgement (`export_us` of
//!    the primary's `--metrics`), idle and at ~1,000 dirty pages per 25 ms epoch.
//! 3. **Failover by step**: SIGKILLs of the primary, and link cuts (`ip link set DEV
//!    down` on the veth pair; without root a SIGSTOP of the primary on loopback, no
//!    witness: silence), from the standby's `failover: …` line; plus every takeover
//!    that happened when nothing was killed, cut or stopped, over all the runs.
//! 4. **Guest slowdown at 40 Hz**: the same `dirty` work with no checkpoints, with
//!    `--checkpoint-dir` and with `--peer`, alternating, wall time of the run.
//! 5. **Pages on the wire**: the same runs mirrored in protocol version 3 (raw pages),
//!    and in version 4 with `--wire-compression none` (zero pages as bits) and `lz4`,
//!    alternating: bytes per checkpoint, hand-over to Ack, the primary's CPU time,
//!    wall time.
//!
//! ```sh
//! cargo bench --bench mirror
//! MIRRORVM_BENCH_KILLS=50 MIRRORVM_BENCH_RUNS=5 cargo bench --bench mirror
//! ```
//!
//! Knobs (defaults keep a run near 6–10 minutes on a 2-core machine):
//! `MIRRORVM_BENCH_RUNS` (3): repetitions of the throughput and slowdown runs;
//! `MIRRORVM_BENCH_KILLS` (20): kills, and link cuts, each;
//! `MIRRORVM_BENCH_SECONDS` (5): length of the ack-latency runs (after the first
//! checkpoint) and the `seconds=` of the dirty workloads;
//! `MIRRORVM_BENCH_COPY` (1G): the guest memory whose initial copy is timed;
//! `MIRRORVM_BENCH_SEED` (1): the pseudo-random delays before each kill or cut;
//! `MIRRORVM_BENCH_ONLY` (all): the tables to measure, e.g. `3` or `1,2,5`;
//! `MIRRORVM_BENCH_STREAM_ONLY` (0): with 1, table 1 measures only one TCP stream and
//! the checkpoint stream (no guests).
//! A speed goal lives here and nowhere in the tests: the tables say whether it is met.

#[path = "support/host.rs"]
mod host;
#[path = "../tests/common/metrics.rs"]
mod metrics;
#[path = "support/stats.rs"]
mod stats;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm::netlab::{Host, NetLab, NetLabError};
use vmm::replication::standby::AppliedMetrics;

type R<T> = Result<T, String>;

const MIB: f64 = 1024.0 * 1024.0;

/// The benchmark's knobs, from the environment.
struct Config {
    runs: usize,
    kills: usize,
    seconds: u64,
    copy: String,
    copy_bytes: u64,
    seed: u64,
    only: Option<Vec<u32>>,
    /// `MIRRORVM_BENCH_STREAM_ONLY=1`: table 1 measures only TCP and the stream path.
    stream_only: bool,
}

/// Checkpoints and their size for the stream-path measure.
const STREAM_COUNT: u64 = 16;
const STREAM_MIB: u64 = 64;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

impl Config {
    fn from_env() -> R<Config> {
        let copy = std::env::var("MIRRORVM_BENCH_COPY").unwrap_or_else(|_| "1G".into());
        let copy_bytes = vmm::config::parse_size(&copy)
            .map_err(|e| format!("MIRRORVM_BENCH_COPY={copy}: {e}"))?;
        Ok(Config {
            runs: usize::try_from(env_num("MIRRORVM_BENCH_RUNS", 3).max(1)).unwrap_or(3),
            kills: usize::try_from(env_num("MIRRORVM_BENCH_KILLS", 20).max(1)).unwrap_or(20),
            seconds: env_num("MIRRORVM_BENCH_SECONDS", 5).max(1),
            copy,
            copy_bytes,
            seed: env_num("MIRRORVM_BENCH_SEED", 1),
            only: std::env::var("MIRRORVM_BENCH_ONLY")
                .ok()
                .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect()),
            stream_only: env_num("MIRRORVM_BENCH_STREAM_ONLY", 0) != 0,
        })
    }

    /// Whether table `n` is to be measured (all, unless `MIRRORVM_BENCH_ONLY=1,3`).
    fn wants(&self, n: u32) -> bool {
        self.only.as_ref().is_none_or(|o| o.contains(&n))
    }
}

/// A tiny deterministic generator for the delays before kills and cuts.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n.max(1)
    }
}

// ---------------------------------------------------------------------------------
// Where a pair runs.

/// Loopback, or the two namespaces of a network lab.
enum Net<'a> {
    Loopback,
    Veth { lab: &'a NetLab, mtu: String },
}

/// Ports on host b of the lab: its namespace is fresh, so none is taken, and a new
/// one per pair never meets an old connection's TIME_WAIT.
static NEXT_LAB_PORT: AtomicU16 = AtomicU16::new(17_000);

impl Net<'_> {
    fn label(&self) -> String {
        match self {
            Net::Loopback => "loopback".into(),
            Net::Veth { mtu, .. } => format!("veth, MTU {mtu}"),
        }
    }

    fn ip(&self, host: Host) -> IpAddr {
        match self {
            Net::Loopback => IpAddr::V4(Ipv4Addr::LOCALHOST),
            Net::Veth { lab, .. } => IpAddr::V4(lab.addr(host)),
        }
    }

    fn netns(&self, host: Host) -> Option<PathBuf> {
        match self {
            Net::Loopback => None,
            Net::Veth { lab, .. } => Some(lab.netns_path(host)),
        }
    }

    /// A command running mirrorvm on `host`.
    fn mirrorvm(&self, host: Host) -> Command {
        let bin = env!("CARGO_BIN_EXE_mirrorvm");
        match self {
            Net::Loopback => Command::new(bin),
            Net::Veth { lab, .. } => lab.command_in(host, bin),
        }
    }

    /// A fresh address for a standby on host b.
    fn standby_addr(&self) -> R<String> {
        match self {
            Net::Loopback => {
                // Bound and released: a tiny race, as in the tests.
                let port = TcpListener::bind("127.0.0.1:0")
                    .and_then(|l| l.local_addr())
                    .map_err(|e| format!("no free port on loopback: {e}"))?
                    .port();
                Ok(format!("127.0.0.1:{port}"))
            }
            Net::Veth { lab, .. } => Ok(format!(
                "{}:{}",
                lab.addr_b(),
                NEXT_LAB_PORT.fetch_add(1, Ordering::Relaxed)
            )),
        }
    }
}

/// Runs `f` on a thread that first enters the network namespace `netns` (if any).
fn thread_in<T: Send + 'static>(
    netns: Option<PathBuf>,
    f: impl FnOnce() -> R<T> + Send + 'static,
) -> JoinHandle<R<T>> {
    std::thread::spawn(move || {
        if let Some(p) = netns {
            let ns = std::fs::File::open(&p).map_err(|e| format!("{}: {e}", p.display()))?;
            // A thread may switch its own network namespace; its sockets live there.
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("setns {}: {e}", p.display()))?;
        }
        f()
    })
}

fn join<T>(h: JoinHandle<R<T>>) -> R<T> {
    h.join()
        .map_err(|_| "a bench thread panicked".to_string())?
}

// ---------------------------------------------------------------------------------
// Processes.

/// A child process whose stderr lines are collected with the time each arrived.
/// Dropping it kills it (SIGKILL) and reaps it: no run leaves a process behind.
struct Proc {
    what: String,
    child: Child,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
    status: Option<ExitStatus>,
}

impl Proc {
    fn spawn(what: &str, mut c: Command) -> R<Proc> {
        c.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .env("NO_COLOR", "1");
        let mut child = c.spawn().map_err(|e| format!("cannot start {what}: {e}"))?;
        let err = child.stderr.take().ok_or("no stderr pipe")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                sink.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push((Instant::now(), line));
            }
        });
        Ok(Proc {
            what: what.to_string(),
            child,
            lines,
            status: None,
        })
    }

    /// The first stderr line so far for which `pred` holds, with its arrival time.
    fn find(&self, pred: impl Fn(&str) -> bool) -> Option<(Instant, String)> {
        self.lines
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .find(|(_, l)| pred(l))
            .cloned()
    }

    /// Waits up to `timeout` for a stderr line for which `pred` holds.
    fn wait_line(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Option<(Instant, String)> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(hit) = self.find(&pred) {
                return Some(hit);
            }
            if Instant::now() >= end || self.exited() {
                // One more look: the line may have arrived with the exit.
                std::thread::sleep(Duration::from_millis(20));
                return self.find(&pred);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn stderr(&self) -> String {
        let lines = self
            .lines
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut s = String::new();
        for (_, l) in lines.iter() {
            s.push_str(l);
            s.push('\n');
        }
        s
    }

    fn exited(&mut self) -> bool {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status.is_some()
    }

    fn signal(&mut self, sig: nix::sys::signal::Signal) -> R<()> {
        if self.exited() {
            return Err(format!(
                "{} has already exited ({:?})",
                self.what, self.status
            ));
        }
        let pid = i32::try_from(self.child.id()).map_err(|_| "pid out of range")?;
        // Our own child, not yet reaped: its pid cannot have been reused.
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig)
            .map_err(|e| format!("kill {} ({sig}): {e}", self.what))
    }

    /// Waits up to `timeout` for it to exit by itself.
    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + timeout;
        while !self.exited() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.status
    }

    fn kill(&mut self) {
        if !self.exited() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------
// A primary and its standby.

/// Takeovers and losses nobody caused, over every pair the benchmark runs.
#[derive(Default)]
struct Tally {
    pairs: usize,
    false_failovers: usize,
    false_losses: usize,
}

struct PairOpts<'a> {
    memory: &'a str,
    cmdline: &'a str,
    witness: bool,
    info_log: bool,
}

struct Pair {
    dir: tempfile::TempDir,
    standby: Proc,
    primary: Proc,
}

const FAILOVER: &str = "failover: primary lost";
/// Marks a row whose run saw a takeover or a lost standby nobody caused: its figures
/// cover the run up to then.
const DISTURBED: &str = " †";
const SINK_LOST: &str = "checkpoint sink lost";

impl Pair {
    fn start(net: &Net, o: &PairOpts, tally: &mut Tally) -> R<Pair> {
        let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
        let addr = net.standby_addr()?;
        let mut s = net.mirrorvm(Host::B);
        s.args(["standby", "--listen", &addr, "--serial", "off", "--metrics"])
            .arg(dir.path().join("b.jsonl"));
        let mut p = net.mirrorvm(Host::A);
        p.args(["run", "--memory", o.memory, "--cmdline", o.cmdline])
            .args(["--peer", &addr, "--serial", "off", "--metrics"])
            .arg(dir.path().join("a.jsonl"));
        if o.witness {
            s.arg("--witness").arg(dir.path().join("witness"));
            p.arg("--witness").arg(dir.path().join("witness"));
        }
        if o.info_log {
            p.env("MIRRORVM_LOG", "info");
        }
        let standby = Proc::spawn("the standby", s)?;
        // The primary keeps dialling for up to 10 s: no need to wait for the listener.
        let primary = Proc::spawn("the primary", p)?;
        tally.pairs += 1;
        Ok(Pair {
            dir,
            standby,
            primary,
        })
    }

    fn applied(&self) -> R<Vec<AppliedMetrics>> {
        read_jsonl(&self.dir.path().join("b.jsonl"))
    }

    fn primary_metrics(&self) -> R<Vec<metrics::Metric>> {
        metrics::read_metrics(&self.dir.path().join("a.jsonl"))
    }

    /// Waits until `done` holds; `Ok(true)` if a takeover or a lost standby came
    /// first (the run is disturbed: the caller counts it), an error if either process
    /// ended or `timeout` passed.
    fn wait_until(
        &mut self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&Pair) -> R<bool>,
    ) -> R<bool> {
        let end = Instant::now() + timeout;
        loop {
            if done(self)? {
                return Ok(false);
            }
            if self.took_over() || self.lost_standby() {
                return Ok(true);
            }
            if self.primary.exited() || self.standby.exited() || Instant::now() >= end {
                return Err(format!("{what}: not within {timeout:?}\n{}", self.dump()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits until the standby applied `n` checkpoints (`Ok(true)`: disturbed first).
    fn wait_applied(&mut self, n: usize, timeout: Duration) -> R<bool> {
        self.wait_until(
            &format!("the standby applying {n} checkpoint(s)"),
            timeout,
            |p| Ok(p.applied()?.len() >= n),
        )
    }

    fn took_over(&self) -> bool {
        self.standby.find(|l| l.contains(FAILOVER)).is_some()
    }

    fn lost_standby(&self) -> bool {
        self.primary.find(|l| l.contains(SINK_LOST)).is_some()
    }

    /// Counts a takeover or a lost standby that nothing caused (call once per pair).
    fn check_unprovoked(&self, tally: &mut Tally) -> bool {
        let (f, l) = (self.took_over(), self.lost_standby());
        if f {
            tally.false_failovers += 1;
        }
        if l {
            tally.false_losses += 1;
        }
        if f || l {
            eprintln!(
                "mirror benchmark: {} while nothing was killed, cut or stopped:\n{}",
                match (f, l) {
                    (true, true) => "FALSE FAILOVER, and the primary lost its standby,",
                    (true, false) => "FALSE FAILOVER",
                    _ => "the primary lost its standby",
                },
                self.dump()
            );
        }
        f || l
    }

    /// Ends the run in order: SIGTERM to the primary (a final checkpoint, then
    /// Shutdown), and the standby follows. `Ok(true)` when the run was disturbed by a
    /// takeover or a lost standby that nothing caused (counted in `tally`; both are
    /// then killed), `Ok(false)` for an orderly end.
    fn finish(&mut self, tally: &mut Tally) -> R<bool> {
        let disturbed = |p: &Pair| p.took_over() || p.lost_standby();
        if !disturbed(self) {
            self.primary.signal(nix::sys::signal::Signal::SIGTERM)?;
        }
        let timeout = Duration::from_secs(60);
        let deadline = Instant::now() + timeout;
        while !self.primary.exited() && !disturbed(self) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if !disturbed(self) {
            self.standby.wait_exit(Duration::from_secs(30));
        }
        if self.check_unprovoked(tally) {
            self.primary.kill();
            self.standby.kill();
            return Ok(true);
        }
        let (p, s) = (self.primary.status, self.standby.status);
        match (p, s) {
            (Some(p), Some(_)) if p.success() || p.code() == Some(143) => Ok(false),
            _ => Err(format!(
                "the pair did not end in order (primary {p:?}, standby {s:?})\n{}",
                self.dump()
            )),
        }
    }

    fn dump(&self) -> String {
        format!(
            "--- primary stderr:\n{}--- standby stderr:\n{}",
            tail(&self.primary.stderr(), 15),
            tail(&self.standby.stderr(), 15)
        )
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    let mut out = lines[lines.len().saturating_sub(n)..].join("\n");
    out.push('\n');
    out
}

/// Every complete JSON line of `path` (none if it does not exist yet).
fn read_jsonl<T: serde::de::DeserializeOwned>(path: &Path) -> R<Vec<T>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let complete = text.rfind('\n').map_or("", |i| &text[..i]);
    let bad = |l: &str, e: serde_json::Error| format!("{}: {e}: {l}", path.display());
    let mut out = Vec::new();
    for l in complete.lines() {
        let v: serde_json::Value = serde_json::from_str(l).map_err(|e| bad(l, e))?;
        // A standby that took over ends its file with a record of another kind.
        if v.get("failover").is_some() {
            continue;
        }
        out.push(serde_json::from_value(v).map_err(|e| bad(l, e))?);
    }
    Ok(out)
}

fn pct<T: Copy + PartialOrd>(v: &[T], p: f64) -> Option<T> {
    stats::percentile(v, p)
}

fn int(v: Option<u64>) -> String {
    v.map_or_else(|| "n/a".into(), |x| x.to_string())
}

fn f1(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".into(), |x| format!("{x:.1}"))
}

// ---------------------------------------------------------------------------------
// 1. Stream throughput.

/// One plain TCP stream of `bytes` from host a to host b: MiB/s at the receiver,
/// from the accept to the last byte.
fn raw_tcp(net: &Net, bytes: u64) -> R<f64> {
    let (tx, rx) = std::sync::mpsc::channel();
    let ip = net.ip(Host::B);
    let receiver = thread_in(net.netns(Host::B), move || {
        let l = TcpListener::bind((ip, 0)).map_err(|e| format!("bind {ip}: {e}"))?;
        let _ = tx.send(l.local_addr().map_err(|e| e.to_string()));
        let (mut s, _) = l.accept().map_err(|e| format!("accept: {e}"))?;
        let start = Instant::now();
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        while got < bytes {
            match s.read(&mut buf) {
                Ok(0) => return Err(format!("the stream ended after {got} bytes")),
                Ok(n) => got += n as u64,
                Err(e) => return Err(format!("read: {e}")),
            }
        }
        Ok(start.elapsed())
    });
    let addr: SocketAddr = rx
        .recv_timeout(Duration::from_secs(10))
        .map_err(|_| "the receiver never listened")??;
    let sender = thread_in(net.netns(Host::A), move || {
        let mut s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
        let buf = vec![0x5au8; 1 << 20];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(buf.len() as u64);
            let n = usize::try_from(n).map_err(|_| "chunk")?;
            s.write_all(&buf[..n]).map_err(|e| format!("write: {e}"))?;
            left -= n as u64;
        }
        Ok(())
    });
    join(sender)?;
    let d = join(receiver)?;
    Ok(bytes as f64 / MIB / d.as_secs_f64())
}

/// The checkpoint stream on its own, without guests or VMMs: `count` checkpoints of
/// `mib` MiB of distinct, non-zero pages each, sent by the primary's frame writer over
/// one TCP connection from host a to host b, where the standby's reader stages each
/// whole, checks it, applies its pages to a 256 MiB replica memory and acknowledges it;
/// the sender waits for each Ack before the next checkpoint, as a primary does. MiB/s
/// of page data from the first byte sent to the last Ack, after one more checkpoint
/// that warms both ends; and where a checkpoint's time goes, per checkpoint.
fn stream_path(net: &Net, mib: u64, count: u64, mode: WireMode) -> R<StreamRun> {
    use vmm::checkpoint::pagecodec::Compression;
    use vmm::checkpoint::{apply_batches, Checkpoint, Manifest};
    use vmm::dirty::{StagedPages, PAGE_SIZE};
    use vmm::replication::protocol::{
        AssemblerLimits, Body, CheckpointAssembler, FrameReader, FrameWriter, Hello, Staged,
        WireStorage, VERSION,
    };
    const MEMORY: u64 = 256 << 20;
    let manifest = Manifest {
        memory: MEMORY,
        cpus: 1,
        cmdline: String::new(),
        disks: Vec::new(),
        cpu: Default::default(),
    };
    let hello = Hello {
        protocol_version: VERSION,
        manifest: manifest.clone(),
        storage: WireStorage::Replicated,
        lineage: 1,
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let ip = net.ip(Host::B);
    let receiver = thread_in(net.netns(Host::B), move || {
        let l = TcpListener::bind((ip, 0)).map_err(|e| format!("bind {ip}: {e}"))?;
        let _ = tx.send(l.local_addr().map_err(|e| e.to_string()));
        let (s, _) = l.accept().map_err(|e| format!("accept: {e}"))?;
        let _ = s.set_nodelay(true);
        let back = s.try_clone().map_err(|e| format!("clone: {e}"))?;
        let memory = vmm::memory::create(MEMORY).map_err(|e| format!("memory: {e}"))?;
        let mut fr = FrameReader::new(std::io::BufReader::with_capacity(1 << 20, s));
        let mut fw = FrameWriter::new(std::io::BufWriter::new(back), 1);
        let mut asm = CheckpointAssembler::new(&hello, AssemblerLimits::for_manifest(&manifest));
        let mut done = 0;
        // Per timed checkpoint: its first frame read → whole and checked; → applied.
        let (mut first_at, mut recv, mut apply) = (None, Vec::new(), Vec::new());
        while done < count + 1 {
            let f = fr
                .read_frame()
                .map_err(|e| format!("read: {e}"))?
                .ok_or("the stream ended early")?;
            let t0 = *first_at.get_or_insert_with(Instant::now);
            if let Staged::Complete(c) = asm.push(f).map_err(|e| format!("assemble: {e}"))? {
                let t1 = Instant::now();
                first_at = None;
                apply_batches(&memory, &c.batches).map_err(|e| format!("apply: {e}"))?;
                if done > 0 {
                    recv.push(ms(t1.duration_since(t0)));
                    apply.push(ms(t1.elapsed()));
                }
                let epoch = c.checkpoint.epoch;
                fw.write(epoch, &Body::Ack)
                    .and_then(|()| fw.flush())
                    .map_err(|e| format!("ack: {e}"))?;
                done += 1;
            }
        }
        Ok((recv, apply))
    });
    let addr: SocketAddr = rx
        .recv_timeout(Duration::from_secs(10))
        .map_err(|_| "the receiver never listened")??;
    let sender = thread_in(net.netns(Host::A), move || {
        let pages = usize::try_from((mib << 20) / PAGE_SIZE as u64).map_err(|_| "size")?;
        let stride = (MEMORY / PAGE_SIZE as u64) / pages as u64;
        let mut data = vec![0u8; pages * PAGE_SIZE];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for w in data.chunks_exact_mut(8) {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            w.copy_from_slice(&(x | 1).to_le_bytes());
        }
        let addrs = (0..pages as u64)
            .map(|i| i * stride * PAGE_SIZE as u64)
            .collect();
        let mut c = Checkpoint {
            epoch: 0,
            full: false,
            state: vec![1; 4096],
            pages: StagedPages { addrs, data },
            disks: Vec::new(),
            console: Default::default(),
        };
        let s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
        let _ = s.set_nodelay(true);
        let back = s.try_clone().map_err(|e| format!("clone: {e}"))?;
        let mut fw = FrameWriter::new(std::io::BufWriter::with_capacity(1 << 20, s), 1);
        match mode {
            WireMode::V3 => fw.set_version(3),
            WireMode::Bitmap => fw.set_packing(Some(Compression::None)),
            WireMode::Lz4 => fw.set_packing(Some(Compression::Lz4)),
        }
        let mut fr = FrameReader::new(back);
        // Checkpoint 1 warms both ends (the replica's memory is first touched, the
        // staging grows), as the initial copy does on a real standby: it is not timed.
        let mut start = Instant::now();
        let mut acked = Vec::new();
        for epoch in 1..=count + 1 {
            if epoch == 2 {
                start = Instant::now();
            }
            c.epoch = epoch;
            let t0 = Instant::now();
            fw.write_checkpoint(&c)
                .and_then(|()| fw.flush())
                .map_err(|e| format!("send: {e}"))?;
            match fr.read_frame() {
                Ok(Some(f)) if f.epoch == epoch && matches!(f.body, Body::Ack) => {}
                other => return Err(format!("no Ack for checkpoint {epoch}: {other:?}")),
            }
            if epoch > 1 {
                acked.push(ms(t0.elapsed()));
            }
        }
        Ok((start.elapsed(), acked))
    });
    let (d, acked) = join(sender)?;
    let (recv, apply) = join(receiver)?;
    Ok(StreamRun {
        rate: (mib * count) as f64 / d.as_secs_f64(),
        receive_ms: stats::median(&recv).unwrap_or(f64::NAN),
        apply_ms: stats::median(&apply).unwrap_or(f64::NAN),
        ack_ms: stats::median(&acked).unwrap_or(f64::NAN),
    })
}

/// One run of [`stream_path`]: its rate, and per checkpoint (medians, ms): the
/// standby's time from the first frame read to the checkpoint whole and checked, its
/// apply, and the primary's time from the first byte sent to the Ack.
struct StreamRun {
    rate: f64,
    receive_ms: f64,
    apply_ms: f64,
    ack_ms: f64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `initial copy to ADDR: S bytes sent for M bytes of memory and disks (…) in T s`
/// → MiB of guest memory (and disks) per second.
fn parse_copy_line(line: &str) -> Option<f64> {
    let (_, rest) = line.split_once(" bytes sent for ")?;
    let (bytes, rest) = rest.split_once(' ')?;
    let bytes: f64 = bytes.parse().ok()?;
    let (_, rest) = rest.rsplit_once(" in ")?;
    let secs: f64 = rest.strip_suffix(" s")?.trim().parse().ok()?;
    (secs > 0.0).then(|| bytes / (1u64 << 20) as f64 / secs)
}

/// The initial copy of a `cfg.copy` guest (`counter idle=1`: the vCPU sleeps, so the
/// copy does not share the host's cores with a spinning guest): MiB/s.
fn initial_copy(net: &Net, cfg: &Config, tally: &mut Tally) -> R<Option<f64>> {
    let mut pair = Pair::start(
        net,
        &PairOpts {
            memory: &cfg.copy,
            cmdline: "counter idle=1",
            witness: false,
            info_log: true,
        },
        tally,
    )?;
    let is_copy_line =
        |l: &str| l.contains("initial copy to ") && l.contains(" bytes of memory and disks");
    let disturbed = pair.wait_until("the initial copy", Duration::from_secs(600), |p| {
        Ok(p.primary.find(is_copy_line).is_some())
    })?;
    // A run disturbed by a false failover (counted by `finish`) gives no sample.
    // A copy printed as taking 0.00 s gives no sample rather than a failure.
    let rate = match pair.primary.find(is_copy_line) {
        Some((_, line)) if !disturbed => parse_copy_line(&line),
        _ => None,
    };
    if !disturbed {
        pair.wait_applied(1, Duration::from_secs(120))?;
    }
    if pair.finish(tally)? {
        return Ok(None);
    }
    Ok(rate)
}

struct Steady {
    disturbed: bool,
    checkpoints: usize,
    mib_per_ckpt: Option<f64>,
    sustained: Option<f64>,
    in_flight: Option<f64>,
}

const STEADY_CMDLINE: &str = "dirty pages_per_ms=1000000 mb=64 verify=0 idle=1";

/// A dirtier that rewrites its whole 64 MiB region every millisecond: each checkpoint
/// carries the region. It runs for 2 × `seconds` after the first checkpoint, then is
/// stopped. Sustained = applied bytes over the standby's clock; in flight = each
/// checkpoint's bytes over its hand-over-to-Ack time (median).
fn steady(net: &Net, cfg: &Config, tally: &mut Tally) -> R<Steady> {
    let mut pair = Pair::start(
        net,
        &PairOpts {
            memory: "256M",
            cmdline: STEADY_CMDLINE,
            witness: false,
            info_log: false,
        },
        tally,
    )?;
    if !pair.wait_applied(1, Duration::from_secs(300))? {
        std::thread::sleep(Duration::from_secs(2 * cfg.seconds));
    }
    let disturbed = pair.finish(tally)?;
    // The first checkpoint completes the initial copy's rounds: left out.
    let applied: Vec<AppliedMetrics> = pair.applied()?.into_iter().skip(1).collect();
    let sent: Vec<metrics::Metric> = pair
        .primary_metrics()?
        .into_iter()
        .filter(|m| !m.full && !m.unprotected)
        .skip(1)
        .collect();
    let sustained = match (applied.first(), applied.last()) {
        (Some(a), Some(b)) if b.received_at_ms > a.received_at_ms => {
            let bytes: u64 = applied[1..].iter().map(|m| m.bytes).sum();
            Some(bytes as f64 / MIB / ((b.received_at_ms - a.received_at_ms) as f64 / 1e3))
        }
        _ => None,
    };
    let rates: Vec<f64> = sent
        .iter()
        .filter(|m| m.export_us > 0)
        .map(|m| m.bytes as f64 / MIB / (m.export_us as f64 / 1e6))
        .collect();
    let sizes: Vec<f64> = applied.iter().map(|m| m.bytes as f64 / MIB).collect();
    Ok(Steady {
        disturbed,
        checkpoints: applied.len(),
        mib_per_ckpt: stats::median(&sizes),
        sustained,
        in_flight: stats::median(&rates),
    })
}

fn throughput(cfg: &Config, nets: &[Net], tally: &mut Tally) -> R<()> {
    let copy_mib = cfg.copy_bytes >> 20;
    println!(
        "## 1. Stream throughput (goal ≥ 1.5 GiB/s = 1536 MiB/s); medians of {} alternating runs",
        cfg.runs
    );
    println!();
    println!("| path | one TCP stream, {copy_mib} MiB (MiB/s) | checkpoint stream, {STREAM_COUNT} × {STREAM_MIB} MiB, lz4 (the default) (MiB/s) | stream / TCP | per checkpoint: received, applied, sent → Ack (ms) | initial copy of a {} guest (MiB/s of guest memory) | checkpoints under the dirtier | MiB per checkpoint | sustained (MiB/s) | per checkpoint, hand-over to Ack (MiB/s) |", cfg.copy);
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let mut best_stream = Vec::new();
    for net in nets {
        let (mut raw, mut stream, mut copy) = (Vec::new(), Vec::new(), Vec::new());
        let mut parts = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..cfg.runs {
            raw.push(raw_tcp(net, cfg.copy_bytes)?);
            let run = stream_path(net, STREAM_MIB, STREAM_COUNT, WireMode::Lz4)?;
            stream.push(run.rate);
            parts.0.push(run.receive_ms);
            parts.1.push(run.apply_ms);
            parts.2.push(run.ack_ms);
            if !cfg.stream_only {
                copy.extend(initial_copy(net, cfg, tally)?);
            }
        }
        let s = if cfg.stream_only {
            None
        } else {
            Some(steady(net, cfg, tally)?)
        };
        let (r, st, c) = (
            stats::median(&raw),
            stats::median(&stream),
            stats::median(&copy),
        );
        best_stream.extend(st);
        let ratio = match (r, st) {
            (Some(r), Some(st)) if r > 0.0 => format!("{:.2}", st / r),
            _ => "n/a".into(),
        };
        let steady_cols = match &s {
            Some(s) => format!(
                "{} | {} | {} | {}",
                s.checkpoints,
                f1(s.mib_per_ckpt),
                f1(s.sustained),
                f1(s.in_flight)
            ),
            None => "not run | | |".into(),
        };
        let split = format!(
            "{} / {} / {}",
            f1(stats::median(&parts.0)),
            f1(stats::median(&parts.1)),
            f1(stats::median(&parts.2))
        );
        println!(
            "| {}{} | {} | {} | {ratio} | {split} | {} | {steady_cols} |",
            net.label(),
            if s.as_ref().is_some_and(|s| s.disturbed) {
                DISTURBED
            } else {
                ""
            },
            f1(r),
            f1(st),
            f1(c),
        );
    }
    let best = best_stream.iter().copied().fold(0.0f64, f64::max);
    println!();
    println!(
        "Goal ≥ 1536 MiB/s for the checkpoint stream: {} (best median {best:.1} MiB/s).",
        if best >= 1536.0 { "met" } else { "NOT met" }
    );
    println!();
    println!(
        "Checkpoint stream: the protocol path alone (frame writer → TCP → frame reader, staging, checks, apply to a 256 MiB replica, Ack), {STREAM_COUNT} checkpoints of {STREAM_MIB} MiB of non-zero pages, each acknowledged before the next is sent; per checkpoint (medians of the runs' medians): the standby's time from its first frame read to the checkpoint whole and checked, its apply to the replica, and the sender's time from its first byte to the Ack. Initial copy: `mirrorvm run --memory {} --cmdline \"counter idle=1\" --peer ADDR`, the primary's `initial copy to ADDR: … M bytes of memory and disks … in S s` line; the guest's memory is mostly zero pages, which are checked and skipped, not sent. Dirtier: `{STEADY_CMDLINE}` in 256 MiB for {} s after its first checkpoint, which is left out; sustained is from the standby's `--metrics` clock; the spinning guest and both VMMs share the host's cores.",
        cfg.copy,
        2 * cfg.seconds
    );
    println!();
    Ok(())
}

// ---------------------------------------------------------------------------------
// 2. Ack latency.

fn ack_latency(cfg: &Config, nets: &[Net], tally: &mut Tally) -> R<()> {
    println!(
        "## 2. Ack latency: hand-over to acknowledged (`export_us`), 25 ms epochs, 128 MiB, {} s per run",
        cfg.seconds
    );
    println!();
    println!("| load | path | checkpoints | dirty pages p50 | bytes p50 | pause p50 (µs) | ack p50 (ms) | ack p99 (ms) |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    let loads = [
        ("idle, `counter idle=1`", "counter idle=1"),
        (
            "~1,000 pages/epoch, `dirty pages_per_ms=40 mb=64`",
            "dirty pages_per_ms=40 mb=64",
        ),
    ];
    for (name, cmdline) in loads {
        for net in nets {
            let mut pair = Pair::start(
                net,
                &PairOpts {
                    memory: "128M",
                    cmdline,
                    witness: false,
                    info_log: false,
                },
                tally,
            )?;
            if !pair.wait_applied(1, Duration::from_secs(120))? {
                std::thread::sleep(Duration::from_secs(cfg.seconds));
            }
            let disturbed = pair.finish(tally)?;
            // The first checkpoint completes the initial copy (`full`); the next still
            // carries what the copy's last round left: both left out.
            let m: Vec<metrics::Metric> = pair
                .primary_metrics()?
                .into_iter()
                .filter(|m| !m.full && !m.unprotected)
                .skip(1)
                .collect();
            let ack: Vec<f64> = m.iter().map(|m| m.export_us as f64 / 1e3).collect();
            let pages: Vec<u64> = m.iter().map(|m| m.dirty_pages).collect();
            let bytes: Vec<u64> = m.iter().map(|m| m.bytes).collect();
            let pause: Vec<u64> = m.iter().map(|m| m.pause_us).collect();
            println!(
                "| {name} | {}{} | {} | {} | {} | {} | {} | {} |",
                net.label(),
                if disturbed { DISTURBED } else { "" },
                m.len(),
                int(pct(&pages, 0.5)),
                int(pct(&bytes, 0.5)),
                int(pct(&pause, 0.5)),
                f1(pct(&ack, 0.5)),
                f1(pct(&ack, 0.99)),
            );
        }
    }
    println!();
    Ok(())
}

// ---------------------------------------------------------------------------------
// 3. Failover.

/// One failover line's steps, ms.
#[derive(Debug, Clone, Copy)]
struct Steps {
    detect: f64,
    fence: f64,
    apply: f64,
    restore: f64,
    resume: f64,
    total: f64,
}

/// `…failover: primary lost (REASON) at checkpoint N: detect D ms, fence F ms, apply A
/// ms, restore R ms, resume S ms, total T ms` → the reason and the steps.
fn parse_failover(line: &str) -> Option<(String, Steps)> {
    let start = line.find("primary lost (")? + "primary lost (".len();
    let at = line.rfind(") at checkpoint ")?;
    let reason = line.get(start..at)?.to_string();
    let (_, steps) = line[at..].split_once(": ")?;
    let get = |name: &str| -> Option<f64> {
        steps.split(", ").find_map(|part| {
            let mut w = part.split(' ');
            (w.next()? == name).then_some(())?;
            w.next()?.parse().ok()
        })
    };
    Some((
        reason,
        Steps {
            detect: get("detect")?,
            fence: get("fence")?,
            apply: get("apply")?,
            restore: get("restore")?,
            resume: get("resume")?,
            total: get("total")?,
        },
    ))
}

#[derive(Clone, Copy, PartialEq)]
enum Blow {
    Kill,
    LinkCut,
    Stop,
}

#[derive(Default)]
struct Trials {
    steps: Vec<Steps>,
    /// From the kill (or cut) to the failover line on the standby's stderr, by the
    /// benchmark's clock.
    seen: Vec<f64>,
    reasons: Vec<String>,
    missed: usize,
}

const FAILOVER_CMDLINE: &str = "counter";
const FAILOVER_MEMORY: &str = "64M";

fn failover_trial(
    net: &Net,
    blow: Blow,
    witness: bool,
    rng: &mut Lcg,
    out: &mut Trials,
    tally: &mut Tally,
) -> R<()> {
    let mut pair = Pair::start(
        net,
        &PairOpts {
            memory: FAILOVER_MEMORY,
            cmdline: FAILOVER_CMDLINE,
            witness,
            info_log: false,
        },
        tally,
    )?;
    let early = pair.wait_applied(8, Duration::from_secs(120))?;
    // Somewhere within an epoch, not always just after an Ack.
    if !early {
        std::thread::sleep(Duration::from_millis(rng.below(40)));
    }
    if pair.check_unprovoked(tally) {
        return Ok(());
    }
    let t0 = Instant::now();
    match (blow, net) {
        (Blow::Kill, _) => pair.primary.signal(nix::sys::signal::Signal::SIGKILL)?,
        (Blow::Stop, _) => pair.primary.signal(nix::sys::signal::Signal::SIGSTOP)?,
        (Blow::LinkCut, Net::Veth { lab, .. }) => lab.link_down().map_err(|e| e.to_string())?,
        (Blow::LinkCut, Net::Loopback) => return Err("a link cut needs the lab".into()),
    }
    let hit = pair
        .standby
        .wait_line(Duration::from_secs(10), |l| l.contains(FAILOVER));
    pair.primary.kill();
    pair.standby.kill();
    if let (Blow::LinkCut, Net::Veth { lab, .. }) = (blow, net) {
        lab.link_up().map_err(|e| e.to_string())?;
    }
    match hit.and_then(|(at, l)| Some((at, parse_failover(&l)?))) {
        Some((at, (reason, steps))) => {
            out.steps.push(steps);
            out.seen.push(at.duration_since(t0).as_secs_f64() * 1e3);
            // "silent for 104 ms" and "silent for 109 ms" are one reason.
            let mut r = String::new();
            for c in reason.chars() {
                if !c.is_ascii_digit() {
                    r.push(c);
                } else if !r.ends_with('N') {
                    r.push('N');
                }
            }
            out.reasons.push(r);
        }
        None => {
            out.missed += 1;
            eprintln!(
                "mirror benchmark: no failover within 10 s of the {}:\n{}",
                match blow {
                    Blow::Kill => "kill",
                    Blow::LinkCut => "link cut",
                    Blow::Stop => "SIGSTOP",
                },
                pair.dump()
            );
        }
    }
    Ok(())
}

/// One series of failovers: how the primary is lost, where, with or without a witness.
struct Series<'a> {
    key: &'static str,
    what: String,
    net: &'a Net<'a>,
    blow: Blow,
    witness: bool,
    trials: Trials,
}

fn failover(cfg: &Config, lab: Option<&Net>, rng: &mut Lcg, tally: &mut Tally) -> R<()> {
    let loopback = Net::Loopback;
    let mut series = vec![
        Series {
            key: "A",
            what: "SIGKILL of the primary, loopback, with --witness".into(),
            net: &loopback,
            blow: Blow::Kill,
            witness: true,
            trials: Trials::default(),
        },
        Series {
            key: "B",
            what: "SIGKILL of the primary, loopback, no witness".into(),
            net: &loopback,
            blow: Blow::Kill,
            witness: false,
            trials: Trials::default(),
        },
        match lab {
            Some(net) => Series {
                key: "C",
                what: format!(
                    "link cut (`ip link set {} down`), {}, no witness (silence alone)",
                    vmm::netlab::DEV_A,
                    net.label()
                ),
                net,
                blow: Blow::LinkCut,
                witness: false,
                trials: Trials::default(),
            },
            None => Series {
                key: "C",
                what: "SIGSTOP of the primary (no network lab here), loopback, no witness (silence alone)".into(),
                net: &loopback,
                blow: Blow::Stop,
                witness: false,
                trials: Trials::default(),
            },
        },
    ];
    for s in &mut series {
        // A pair disturbed before its blow gives no sample: try again (up to twice).
        for _ in 0..2 * cfg.kills {
            if s.trials.steps.len() + s.trials.missed >= cfg.kills {
                break;
            }
            failover_trial(s.net, s.blow, s.witness, rng, &mut s.trials, tally)?;
        }
    }
    println!(
        "## 3. Failover by step (goal: total ≤ 150 ms p50, apply + restore + resume ≤ 50 ms), default liveness (--heartbeat-ms 10, --dead-ms 100)"
    );
    println!();
    println!(
        "Guest `{FAILOVER_CMDLINE}`, {FAILOVER_MEMORY}; each blow falls 8 checkpoints after the initial copy, plus 0–40 ms. Steps from the standby's `failover:` line."
    );
    println!();
    for s in &series {
        println!(
            "- {}: {}: {} taken over of {}",
            s.key,
            s.what,
            s.trials.steps.len(),
            s.trials.steps.len() + s.trials.missed
        );
    }
    println!();
    let mut head = String::from("| step |");
    let mut rule = String::from("| --- |");
    for s in &series {
        head.push_str(&format!(" {k} p50 (ms) | {k} p99 (ms) |", k = s.key));
        rule.push_str(" --- | --- |");
    }
    println!("{head}");
    println!("{rule}");
    type Get = fn(&Steps) -> f64;
    let rows: [(&str, Get); 7] = [
        ("detect", |s| s.detect),
        ("fence", |s| s.fence),
        ("apply", |s| s.apply),
        ("restore", |s| s.restore),
        ("resume", |s| s.resume),
        ("apply + restore + resume", |s| {
            s.apply + s.restore + s.resume
        }),
        ("total (last sign of life → guest running)", |s| s.total),
    ];
    for (name, get) in rows {
        let mut row = format!("| {name} |");
        for s in &series {
            let v: Vec<f64> = s.trials.steps.iter().map(get).collect();
            row.push_str(&format!(" {} | {} |", f1(pct(&v, 0.5)), f1(pct(&v, 0.99))));
        }
        println!("{row}");
    }
    let mut row = String::from("| blow → failover line on the standby's stderr (bench clock) |");
    for s in &series {
        let v = &s.trials.seen;
        row.push_str(&format!(" {} | {} |", f1(pct(v, 0.5)), f1(pct(v, 0.99))));
    }
    println!("{row}");
    println!();
    for s in &series {
        let t = &s.trials;
        let mut reasons = t.reasons.clone();
        reasons.sort();
        reasons.dedup();
        let total: Vec<f64> = t.steps.iter().map(|s| s.total).collect();
        let local: Vec<f64> = t
            .steps
            .iter()
            .map(|s| s.apply + s.restore + s.resume)
            .collect();
        let goal = match (pct(&total, 0.5), pct(&local, 0.5)) {
            (Some(t), Some(l)) => format!(
                "total p50 {t:.1} ms: {}; apply + restore + resume p50 {l:.1} ms: {}",
                if t <= 150.0 { "met" } else { "NOT met" },
                if l <= 50.0 { "met" } else { "NOT met" }
            ),
            _ => "no samples".into(),
        };
        println!(
            "{}: goal {goal}. No takeover within 10 s: {}. Reasons given: {}.",
            s.key,
            t.missed,
            if reasons.is_empty() {
                "none".to_string()
            } else {
                reasons.join("; ")
            }
        );
    }
    println!();
    Ok(())
}

// ---------------------------------------------------------------------------------
// 4. Guest slowdown.

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    None,
    Local,
    Mirrored,
}

/// `mirrorvm run` of `cmdline` in 128 MiB, without a console.
fn small_run(cmdline: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mirrorvm"));
    c.args([
        "run",
        "--memory",
        "128M",
        "--cmdline",
        cmdline,
        "--serial",
        "off",
    ]);
    c
}

/// Runs the primary `c` until it exits (at most 600 s), which it must do with
/// success: the process, and its wall time from spawn to exit.
fn run_to_end(c: Command, cmdline: &str) -> R<(Proc, f64)> {
    let start = Instant::now();
    let mut p = Proc::spawn("the primary", c)?;
    let status = p.wait_exit(Duration::from_secs(600));
    let wall = start.elapsed().as_secs_f64();
    if status.is_none_or(|s| !s.success()) {
        return Err(format!(
            "'{cmdline}' failed ({status:?}):\n{}",
            tail(&p.stderr(), 15)
        ));
    }
    Ok((p, wall))
}

/// One run of `cmdline` (128 MiB): its wall time (spawn to exit of the primary) and
/// the checkpoints it cut.
fn slowdown_run(cmdline: &str, mode: Mode, tally: &mut Tally) -> R<(f64, usize)> {
    if mode == Mode::Mirrored {
        let r = wire_run(cmdline, None, tally)?;
        return Ok((r.wall, r.cuts));
    }
    let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    let metrics = dir.path().join("a.jsonl");
    let mut c = small_run(cmdline);
    if mode == Mode::Local {
        c.arg("--checkpoint-dir")
            .arg(dir.path().join("ck"))
            .arg("--metrics")
            .arg(&metrics);
    }
    let (_, wall) = run_to_end(c, cmdline)?;
    let cuts = if mode == Mode::Local {
        metrics::read_metrics(&metrics)?.len()
    } else {
        0
    };
    Ok((wall, cuts))
}

fn slowdown(cfg: &Config, tally: &mut Tally) -> R<()> {
    let s = cfg.seconds;
    println!(
        "## 4. Guest slowdown at 40 Hz: wall time of `mirrorvm run --memory 128M` (spawn to exit), medians of {} alternating runs",
        cfg.runs
    );
    println!();
    println!("| work | none (s) | --checkpoint-dir (s) | --peer, loopback (s) | local / none | mirrored / none | checkpoints p50 (local, mirrored) |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for ppm in [40u64, 400] {
        let cmdline = format!("dirty pages_per_ms={ppm} mb=64 seconds={s} verify=1");
        let mut wall = [Vec::new(), Vec::new(), Vec::new()];
        let mut cuts = [Vec::new(), Vec::new(), Vec::new()];
        for _ in 0..cfg.runs {
            for (i, mode) in [Mode::None, Mode::Local, Mode::Mirrored]
                .into_iter()
                .enumerate()
            {
                let (w, c) = slowdown_run(&cmdline, mode, tally)?;
                wall[i].push(w);
                cuts[i].push(c);
            }
        }
        let m: Vec<Option<f64>> = wall.iter().map(|w| stats::median(w)).collect();
        let ratio = |x: Option<f64>| match (x, m[0]) {
            (Some(x), Some(n)) if n > 0.0 => format!("{:.2}", x / n),
            _ => "n/a".into(),
        };
        let f2 = |x: Option<f64>| x.map_or_else(|| "n/a".into(), |x| format!("{x:.2}"));
        println!(
            "| `{cmdline}` (~{} pages/epoch) | {} | {} | {} | {} | {} | {}, {} |",
            ppm * 25,
            f2(m[0]),
            f2(m[1]),
            f2(m[2]),
            ratio(m[1]),
            ratio(m[2]),
            stats::median(&cuts[1]).unwrap_or(0),
            stats::median(&cuts[2]).unwrap_or(0)
        );
    }
    println!();
    println!("The guest work is {s} s of paced steps; wall time includes boot (~15 ms), and for the mirrored run the initial copy of 128 MiB, during which the guest already runs.");
    println!();
    Ok(())
}

// ---------------------------------------------------------------------------------
// 5. Pages on the wire.

/// How a mirrored run sends its pages.
#[derive(Clone, Copy)]
enum WireMode {
    /// Protocol version 3: every page raw.
    V3,
    /// Version 4, `--wire-compression none`: zero pages as bits, the others raw.
    Bitmap,
    /// Version 4, `--wire-compression lz4` (the default).
    Lz4,
}

impl WireMode {
    fn args(self) -> &'static [&'static str] {
        match self {
            WireMode::V3 => &["--protocol-version", "3"],
            WireMode::Bitmap => &["--wire-compression", "none"],
            WireMode::Lz4 => &["--wire-compression", "lz4"],
        }
    }
}

/// What one mirrored run measured.
struct WireRun {
    wall: f64,
    /// Checkpoints cut (metrics lines).
    cuts: usize,
    /// CPU seconds (user + system) of the primary process.
    cpu: f64,
    /// Per checkpoint after the first: bytes sent, and hand-over to Ack (ms).
    bytes: Vec<f64>,
    ack_ms: Vec<f64>,
    pages: Vec<f64>,
}

/// CPU seconds (user + system) of the children reaped so far.
fn children_cpu() -> f64 {
    use nix::sys::resource::{getrusage, UsageWho};
    getrusage(UsageWho::RUSAGE_CHILDREN).map_or(0.0, |ru| {
        let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
        t(ru.user_time()) + t(ru.system_time())
    })
}

/// One run of `cmdline` (128 MiB) mirrored on loopback, its pages sent as `mode`
/// says (`None`: the defaults).
fn wire_run(cmdline: &str, mode: Option<WireMode>, tally: &mut Tally) -> R<WireRun> {
    let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    let metrics = dir.path().join("a.jsonl");
    let addr = Net::Loopback.standby_addr()?;
    let mut s = Command::new(env!("CARGO_BIN_EXE_mirrorvm"));
    s.args(["standby", "--listen", &addr, "--serial", "off"]);
    let mut standby = Proc::spawn("the standby", s)?;
    tally.pairs += 1;
    let mut c = small_run(cmdline);
    c.args(["--peer", &addr])
        .args(mode.map_or(&[][..], WireMode::args))
        .arg("--metrics")
        .arg(&metrics);
    let cpu0 = children_cpu();
    let (p, wall) = run_to_end(c, cmdline)?;
    let cpu = children_cpu() - cpu0;
    let end = standby.wait_exit(Duration::from_secs(30));
    if standby.find(|l| l.contains(FAILOVER)).is_some() {
        tally.false_failovers += 1;
    }
    if p.find(|l| l.contains(SINK_LOST)).is_some() {
        tally.false_losses += 1;
    }
    if end.is_none_or(|e| !e.success()) {
        return Err(format!(
            "the standby did not follow the primary's end ({end:?}):\n{}",
            tail(&standby.stderr(), 15)
        ));
    }
    let all = metrics::read_metrics(&metrics)?;
    let cuts = all.len();
    let sent: Vec<metrics::Metric> = all
        .into_iter()
        .filter(|m| !m.full && !m.unprotected)
        .skip(1)
        .collect();
    Ok(WireRun {
        wall,
        cuts,
        cpu,
        bytes: sent.iter().map(|m| m.bytes as f64).collect(),
        ack_ms: sent.iter().map(|m| m.export_us as f64 / 1e3).collect(),
        pages: sent.iter().map(|m| m.dirty_pages as f64).collect(),
    })
}

fn wire(cfg: &Config, tally: &mut Tally) -> R<()> {
    let s = cfg.seconds;
    println!(
        "## 5. Pages on the wire: `mirrorvm run --memory 128M --peer` on loopback, protocol version 3 (raw pages) vs version 4 with `--wire-compression none` (zero pages as bits) and `lz4`; medians of {} alternating runs",
        cfg.runs
    );
    println!();
    println!("| work | pages per checkpoint p50 | mode | KiB per checkpoint p50 | of raw | hand-over to Ack p50 (ms) | primary CPU (s) | wall (s) |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    // New pages, a walk of 64 MiB (~4,000 distinct pages per epoch), a hot set of
    // 4,096 pages rewritten every millisecond.
    let works = [
        format!("dirty pages_per_ms=40 mb=64 seconds={s} verify=1"),
        format!("dirty pages_per_ms=160 mb=64 seconds={s} verify=1"),
        format!("dirty pages_per_ms=4096 mb=16 seconds={s} verify=1"),
    ];
    let modes = [WireMode::V3, WireMode::Bitmap, WireMode::Lz4];
    for cmdline in &works {
        let mut runs: Vec<Vec<WireRun>> = modes.iter().map(|_| Vec::new()).collect();
        for _ in 0..cfg.runs {
            for (i, mode) in modes.into_iter().enumerate() {
                runs[i].push(wire_run(cmdline, Some(mode), tally)?);
            }
        }
        let med = |rs: &[WireRun], f: &dyn Fn(&WireRun) -> Vec<f64>| {
            let all: Vec<f64> = rs.iter().flat_map(f).collect();
            stats::median(&all)
        };
        let per_run = |rs: &[WireRun], f: &dyn Fn(&WireRun) -> f64| {
            stats::median(&rs.iter().map(f).collect::<Vec<f64>>())
        };
        let raw = med(&runs[0], &|r| r.bytes.clone());
        let pages = med(&runs[0], &|r| r.pages.clone());
        for (i, mode) in modes.iter().enumerate() {
            let bytes = med(&runs[i], &|r| r.bytes.clone());
            let share = match (bytes, raw) {
                (Some(b), Some(r)) if r > 0.0 => format!("{:.1} %", 100.0 * b / r),
                _ => "n/a".into(),
            };
            let f =
                |x: Option<f64>, d: usize| x.map_or_else(|| "n/a".into(), |x| format!("{x:.d$}"));
            println!(
                "| `{cmdline}` | {} | {} | {} | {share} | {} | {} | {} |",
                f(pages, 0),
                mode.args().join(" "),
                f(bytes.map(|b| b / 1024.0), 1),
                f(med(&runs[i], &|r| r.ack_ms.clone()), 2),
                f(per_run(&runs[i], &|r| r.cpu), 2),
                f(per_run(&runs[i], &|r| r.wall), 2),
            );
        }
    }
    println!();
    println!("Incompressible pages (the checkpoint stream of table 1: {STREAM_COUNT} × {STREAM_MIB} MiB of pseudo-random pages, loopback, protocol path only), medians of {} alternating runs:", cfg.runs);
    println!();
    println!("| mode | MiB/s of page data | per checkpoint: received, applied, sent → Ack (ms) |");
    println!("| --- | --- | --- |");
    let mut streams: Vec<Vec<StreamRun>> = modes.iter().map(|_| Vec::new()).collect();
    for _ in 0..cfg.runs {
        for (i, mode) in modes.into_iter().enumerate() {
            streams[i].push(stream_path(&Net::Loopback, STREAM_MIB, STREAM_COUNT, mode)?);
        }
    }
    for (i, mode) in modes.iter().enumerate() {
        let m = |f: &dyn Fn(&StreamRun) -> f64| {
            f1(stats::median(
                &streams[i].iter().map(f).collect::<Vec<f64>>(),
            ))
        };
        println!(
            "| {} | {} | {} / {} / {} |",
            mode.args().join(" "),
            m(&|r| r.rate),
            m(&|r| r.receive_ms),
            m(&|r| r.apply_ms),
            m(&|r| r.ack_ms)
        );
    }
    println!();
    println!("Bytes and hand-over to Ack are per checkpoint, after the first (which completes the initial copy); CPU and wall time are the primary process's whole run, boot and initial copy included. The test guest writes counters and patterns: a real guest's pages compress less.");
    println!();
    Ok(())
}

// ---------------------------------------------------------------------------------

fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

fn run() -> R<()> {
    // As the mirrorvm binary does, for the stream measured in-process.
    vmm::memory::tune_host_allocator();
    let cfg = Config::from_env()?;
    let started = Instant::now();
    println!("mirrorvm mirror benchmark: primary and standby as separate processes of the release binary");
    println!("{}", host::line());
    println!(
        "settings: MIRRORVM_BENCH_RUNS={} MIRRORVM_BENCH_KILLS={} MIRRORVM_BENCH_SECONDS={} MIRRORVM_BENCH_COPY={} MIRRORVM_BENCH_SEED={}{}",
        cfg.runs,
        cfg.kills,
        cfg.seconds,
        cfg.copy,
        cfg.seed,
        std::env::var("MIRRORVM_BENCH_ONLY")
            .map(|v| format!(" MIRRORVM_BENCH_ONLY={v}"))
            .unwrap_or_default()
    );
    let prefix = format!("mvbench{}", std::process::id());
    let lab = match NetLab::create(&prefix) {
        Ok(lab) => Some(lab),
        Err(e @ (NetLabError::NotRoot { .. } | NetLabError::IpMissing)) => {
            println!("veth rows skipped: {e}");
            None
        }
        Err(e) => return Err(format!("cannot build the network lab: {e}")),
    };
    let mut nets = vec![Net::Loopback];
    if let Some(lab) = &lab {
        let mtu = lab
            .command_in(Host::A, "cat")
            .arg(format!("/sys/class/net/{}/mtu", vmm::netlab::DEV_A))
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| "?".into());
        nets.push(Net::Veth { lab, mtu });
    }
    println!();
    let mut tally = Tally::default();
    let mut rng = Lcg(cfg.seed);
    if cfg.wants(1) {
        throughput(&cfg, &nets, &mut tally)?;
    }
    if cfg.wants(2) {
        ack_latency(&cfg, &nets, &mut tally)?;
    }
    if cfg.wants(3) {
        failover(&cfg, nets.get(1), &mut rng, &mut tally)?;
    }
    if cfg.wants(4) {
        slowdown(&cfg, &mut tally)?;
    }
    if cfg.wants(5) {
        wire(&cfg, &mut tally)?;
    }
    println!(
        "False failovers (a takeover when nothing was killed, cut or stopped): {} in {} primary/standby pairs; primaries that lost a standby nobody cut: {}",
        tally.false_failovers, tally.pairs, tally.false_losses
    );
    println!("† a run disturbed by such a takeover or loss: its figures cover it up to then.");
    println!(
        "bench time {:.0} s; load average at the end {}",
        started.elapsed().as_secs_f64(),
        host::load()
    );
    Ok(())
}

fn main() {
    if !kvm_usable() {
        eprintln!("*** SKIPPED mirror benchmark: /dev/kvm is unusable ***");
        return;
    }
    if let Err(e) = run() {
        eprintln!("mirror benchmark: {e}");
        std::process::exit(1);
    }
}
