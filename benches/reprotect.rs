//! Re-protection benchmark: the release binary's primary and standbys as separate
//! processes on loopback. Two tables, each measured side by side in one run:
//!
//! 1. **Re-protection, full copy vs failback**: a 256 MiB guest whose memory is
//!    mostly written (`dirty` over 192 MiB) with a 256 MiB disk full of data. A
//!    standby with an empty disk and no replica joins (`standby --join`): a full
//!    copy. The primary then gives it up (it is stopped for longer than `--dead-ms`)
//!    and it rejoins holding its replica and a nearly identical disk: a failback.
//!    Alternating, `MIRRORVM_BENCH_RUNS` (3) of each. Time: from the primary's
//!    "joined" line to the standby's "initial copy complete" (the first checkpoint
//!    applied: protected again). Bytes: the primary's "initial copy" line.
//! 2. **Switchover downtime**: `MIRRORVM_BENCH_SWITCHOVERS` (20) planned switchovers
//!    back and forth under a 2-vCPU `mix` guest: the old primary's "final pause to
//!    the standby's confirmation" plus the new primary's "handover read to guest
//!    running", p50 and p99.
//!
//! ```sh
//! cargo bench --bench reprotect
//! MIRRORVM_BENCH_RUNS=5 MIRRORVM_BENCH_SWITCHOVERS=50 cargo bench --bench reprotect
//! ```
//! A speed goal lives here, not in the tests: the tables say whether it is met
//! (switchover downtime ≤ 100 ms on loopback).

#[path = "../tests/common/copylines.rs"]
mod copylines;
#[path = "support/host.rs"]
mod host;
#[path = "support/stats.rs"]
mod stats;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MIB: f64 = 1024.0 * 1024.0;
const DISK: u64 = 256 << 20;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
    format!("127.0.0.1:{}", l.local_addr().expect("its address").port())
}

/// A child whose stderr is collected as it comes.
struct Proc {
    child: Child,
    err: Arc<Mutex<String>>,
}

impl Proc {
    fn spawn(mut c: Command) -> Proc {
        c.stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = c.spawn().expect("spawn mirrorvm");
        let mut pipe = child.stderr.take().expect("its stderr");
        let err = Arc::new(Mutex::new(String::new()));
        let sink = err.clone();
        std::thread::spawn(move || {
            let mut b = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut b) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push_str(&String::from_utf8_lossy(&b[..n]));
            }
        });
        Proc { child, err }
    }

    fn err(&self) -> String {
        self.err.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn count(&self, pat: &str) -> usize {
        self.err().lines().filter(|l| l.contains(pat)).count()
    }

    /// Waits until `pat` shows up on `n` lines; the instant it was seen.
    fn wait_count(&self, pat: &str, n: usize, timeout: Duration) -> Option<Instant> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if self.count(pat) >= n {
                return Some(Instant::now());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        None
    }

    fn signal(&self, sig: libc::c_int) {
        let Ok(pid) = libc::pid_t::try_from(self.child.id()) else {
            return;
        };
        // SAFETY: kill(2) on our own child's pid, which is not reaped yet (so not
        // reused); it touches no memory of ours.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn mirrorvm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mirrorvm"))
}

fn filled(p: &Path) {
    let fill: Vec<u8> = (0..DISK)
        .map(|i| u8::try_from(i % 251).unwrap_or(0) | 1)
        .collect();
    std::fs::write(p, fill).expect("write a filled image");
}

fn zeroed(p: &Path) {
    let f = std::fs::File::create(p).expect("create an image");
    f.set_len(DISK).expect("size it");
}

fn table1(dir: &Path, runs: usize) {
    let a_addr = free_addr();
    filled(&dir.join("a.img"));
    let mut c = mirrorvm();
    c.args([
        "run",
        "--memory",
        "256M",
        "--cmdline",
        "dirty pages_per_ms=20 mb=192 verify=0",
    ])
    .arg("--disk")
    .arg(format!(
        "path={},checkpoint=on",
        dir.join("a.img").display()
    ))
    .args(["--serial", "off", "--listen", &a_addr]);
    let a = Proc::spawn(c);
    // Let the guest write most of its 192 MiB.
    std::thread::sleep(Duration::from_secs(12));
    let mut rows: Vec<(&str, f64, u64)> = Vec::new();
    for run in 0..runs {
        let img = dir.join(format!("s{run}.img"));
        zeroed(&img);
        let mut c = mirrorvm();
        c.arg("standby")
            .arg("--disk")
            .arg(format!("path={},checkpoint=on", img.display()))
            .args(["--serial", "off", "--join", &a_addr]);
        let joined = a.count("joined");
        let s = Proc::spawn(c);
        let Some(t0) = a.wait_count("joined", joined + 1, Duration::from_secs(60)) else {
            eprintln!("run {run}: no standby joined:\n{}", a.err());
            return;
        };
        let Some(t1) = s.wait_count("initial copy complete", 1, Duration::from_secs(300)) else {
            eprintln!("run {run}: the full copy did not complete:\n{}", s.err());
            return;
        };
        rows.push((
            "full copy",
            (t1 - t0).as_secs_f64(),
            copylines::copies(&a.err()).last().map_or(0, |c| c.sent),
        ));
        // Given up (stopped past --dead-ms), then back with its replica and disk.
        let lost = a.count("running unprotected");
        s.signal(libc::SIGSTOP);
        let gave_up = a.wait_count("running unprotected", lost + 1, Duration::from_secs(10));
        s.signal(libc::SIGCONT);
        if gave_up.is_none() {
            eprintln!("run {run}: the primary did not give its standby up");
            return;
        }
        let Some(t0) = a.wait_count("joined", joined + 2, Duration::from_secs(60)) else {
            eprintln!("run {run}: the standby did not rejoin:\n{}", s.err());
            return;
        };
        let Some(t1) = s.wait_count("initial copy complete", 2, Duration::from_secs(300)) else {
            eprintln!("run {run}: the failback did not complete:\n{}", s.err());
            return;
        };
        rows.push((
            "failback",
            (t1 - t0).as_secs_f64(),
            copylines::copies(&a.err()).last().map_or(0, |c| c.sent),
        ));
        drop(s);
        // The primary notices at once (the connections close).
        let _ = a.wait_count("running unprotected", lost + 2, Duration::from_secs(10));
    }
    println!();
    println!("Re-protection of a 256 MiB guest (192 MiB written) with a 256 MiB disk full of data, loopback, {runs} run(s) of each, alternating");
    println!("{}", host::line());
    println!("| copy | joined → protected, median | min | max | bytes sent, median |");
    println!("| --- | --- | --- | --- | --- |");
    for kind in ["full copy", "failback"] {
        let t: Vec<f64> = rows.iter().filter(|r| r.0 == kind).map(|r| r.1).collect();
        let b: Vec<u64> = rows.iter().filter(|r| r.0 == kind).map(|r| r.2).collect();
        let (Some(m), Some(lo), Some(hi), Some(bm)) = (
            stats::median(&t),
            stats::percentile(&t, 0.0),
            stats::percentile(&t, 1.0),
            stats::median(&b),
        ) else {
            continue;
        };
        println!(
            "| {kind} | {m:.2} s | {lo:.2} s | {hi:.2} s | {:.1} MiB |",
            bm as f64 / MIB
        );
    }
}

fn switchover(sock: &Path) -> bool {
    mirrorvm()
        .arg("switchover")
        .arg("--api-socket")
        .arg(sock)
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn table2(dir: &Path, n: usize) {
    let (a_addr, b_addr) = (free_addr(), free_addr());
    for i in ["sa.img", "sb.img"] {
        zeroed(&dir.join(i));
    }
    let (sa, sb) = (dir.join("a.sock"), dir.join("b.sock"));
    let mut c = mirrorvm();
    c.arg("standby")
        .arg("--disk")
        .arg(format!(
            "path={},checkpoint=on",
            dir.join("sb.img").display()
        ))
        .args(["--serial", "off", "--listen", &b_addr, "--api-socket"])
        .arg(&sb);
    let b = Proc::spawn(c);
    let mut c = mirrorvm();
    c.args(["run", "--memory", "256M", "--cpus", "2"])
        .args(["--cmdline", "mix seconds=0 mb=8 pages_per_ms=20"])
        .arg("--disk")
        .arg(format!(
            "path={},checkpoint=on",
            dir.join("sa.img").display()
        ))
        .args([
            "--serial",
            "off",
            "--peer",
            &b_addr,
            "--listen",
            &a_addr,
            "--api-socket",
        ])
        .arg(&sa);
    let a = Proc::spawn(c);
    if b.wait_count("initial copy complete", 1, Duration::from_secs(120))
        .is_none()
    {
        eprintln!("the pair never formed:\n{}\n{}", a.err(), b.err());
        return;
    }
    let mut downs = Vec::new();
    // (primary, its socket, standby)
    let mut hosts = [(&a, &sa), (&b, &sb)];
    for i in 0..n {
        std::thread::sleep(Duration::from_millis(500));
        let (old, sock) = hosts[0];
        let new = hosts[1].0;
        let took = new.count("switchover: took the guest over");
        let protected = old.count("initial copy complete");
        if !switchover(sock) {
            eprintln!("switchover {i} refused:\n{}", old.err());
            break;
        }
        if new
            .wait_count(
                "switchover: took the guest over",
                took + 1,
                Duration::from_secs(30),
            )
            .is_none()
            || old
                .wait_count(
                    "initial copy complete",
                    protected + 1,
                    Duration::from_secs(120),
                )
                .is_none()
        {
            eprintln!(
                "switchover {i} did not complete:\n{}\n{}",
                old.err(),
                new.err()
            );
            break;
        }
        if let Some(d) = copylines::downtime_ms(&old.err(), &new.err()) {
            downs.push(d);
        }
        hosts.swap(0, 1);
    }
    println!();
    println!("Planned switchover of a 256 MiB, 2-vCPU guest running `mix` (8 MiB rewritten at 20 pages/ms, disk records), loopback, back and forth");
    println!("{}", host::line());
    println!("| switchovers | downtime p50 | p99 | max | goal |");
    println!("| --- | --- | --- | --- | --- |");
    if let (Some(p50), Some(p99), Some(max)) = (
        stats::median(&downs),
        stats::percentile(&downs, 0.99),
        stats::percentile(&downs, 1.0),
    ) {
        println!(
            "| {} | {p50:.1} ms | {p99:.1} ms | {max:.1} ms | ≤ 100 ms: {} |",
            downs.len(),
            if p99 <= 100.0 { "met" } else { "not met" }
        );
    }
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` runs nothing here.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    if !Path::new("/dev/kvm").exists() {
        println!("SKIPPED: the re-protection benchmark needs /dev/kvm");
        return;
    }
    let runs = usize::try_from(env_num("MIRRORVM_BENCH_RUNS", 3)).unwrap_or(3);
    let n = usize::try_from(env_num("MIRRORVM_BENCH_SWITCHOVERS", 20)).unwrap_or(20);
    let dir: PathBuf = tempfile::tempdir().expect("a temporary directory").keep();
    let only = std::env::var("MIRRORVM_BENCH_ONLY").unwrap_or_default();
    if only.is_empty() || only.contains('1') {
        table1(&dir, runs);
    }
    if only.is_empty() || only.contains('2') {
        table2(&dir, n);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
