//! Epoch benchmark: the checkpoint pause of the real binary under load, the guest's
//! slowdown under 40 Hz checkpointing, and the pause against its copy-bound limit,
//! all measured side by side in one run and printed as tables.
//!
//!     cargo bench --bench epoch
//!     MIRRORVM_BENCH_SECONDS=20 cargo bench --bench epoch    # longer runs
//!
//! Pause figures come from `--metrics` (one JSON line per checkpoint); the first
//! checkpoint of each run is left out of the pause statistics (it completes the
//! pre-copy, its size depends on how long the pre-copy took). The copy-bound limit
//! of a pause is `dirty bytes / memcpy bandwidth + fixed cost`, with the bandwidth
//! measured here (a 64 MiB copy between two buffers, median of 9) and the fixed cost
//! taken as the idle guest's median pause (kick, empty dirty-log harvest, state save).

#[path = "../tests/common/metrics.rs"]
mod metrics;
#[path = "support/stats.rs"]
mod stats;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mirrorvm"));
    c.stdin(Stdio::null()).stderr(Stdio::null());
    c
}

/// Ends the benchmark with an error: a failed run must not be printed as figures.
fn fail(msg: &str) -> ! {
    eprintln!("epoch benchmark: {msg}");
    std::process::exit(1);
}

struct Run {
    pauses: Vec<u64>,
    pages: Vec<u64>,
}

/// Runs the test guest with `cmdline` for `secs`, checkpointing every `epoch_ms`
/// when `Some`.
fn run(cmdline: &str, epoch_ms: Option<u64>, secs: u64) -> Run {
    let dir = tempfile::tempdir().expect("tempdir");
    let metrics = dir.path().join("metrics.jsonl");
    let mut c = bin();
    c.args(["run", "--memory", "256M", "--cmdline", cmdline]);
    if let Some(ms) = epoch_ms {
        c.args(["--epoch-ms", &ms.to_string(), "--checkpoint-dir"])
            .arg(dir.path().join("ck"));
        c.arg("--metrics").arg(&metrics);
    }
    c.stdout(Stdio::null());
    let start = Instant::now();
    let status = c.status().expect("run mirrorvm");
    if start.elapsed() > Duration::from_secs(secs + 60) {
        eprintln!("warning: run took {:?}", start.elapsed());
    }
    if !status.success() {
        fail(&format!(
            "mirrorvm run --cmdline '{cmdline}' failed: {status}"
        ));
    }
    let cuts = metrics::read_metrics(&metrics).unwrap_or_else(|e| fail(&e));
    // The first checkpoint completes the pre-copy: left out.
    let (pauses, pages) = cuts
        .iter()
        .skip(1)
        .map(|m| (m.pause_us, m.dirty_pages))
        .unzip();
    Run { pauses, pages }
}

fn memcpy_bytes_per_us() -> f64 {
    let n = 64 << 20;
    let src = vec![0x5au8; n];
    let mut dst = vec![0u8; n];
    let mut t = Vec::new();
    for _ in 0..9 {
        let s = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&dst);
        t.push(s.elapsed().as_secs_f64());
    }
    n as f64 / (stats::median(&t).expect("9 copies") * 1e6)
}

/// Steps per wall-clock second of the `dirty` workload, between its first and last
/// progress lines (1000 steps apart).
fn steps_per_s(cmdline: &str, epoch_ms: Option<u64>) -> Option<f64> {
    use std::io::BufRead;
    let dir = tempfile::tempdir().ok()?;
    let mut c = bin();
    c.args(["run", "--memory", "256M", "--cmdline", cmdline]);
    if let Some(ms) = epoch_ms {
        c.args(["--epoch-ms", &ms.to_string(), "--checkpoint-dir"])
            .arg(dir.path().join("ck"));
    }
    c.stdout(Stdio::piped());
    let mut child = c.spawn().ok()?;
    let out = child.stdout.take()?;
    let mut stamps = Vec::new();
    for line in std::io::BufReader::new(out).lines() {
        let line = line.ok()?;
        if line.starts_with("dirty: ") && line.ends_with("pages dirtied") {
            stamps.push(Instant::now());
        }
    }
    if !child.wait().ok()?.success() {
        return None;
    }
    let (first, last) = (stamps.first()?, stamps.last()?);
    let secs = last.duration_since(*first).as_secs_f64();
    (stamps.len() >= 2 && secs > 0.0).then(|| (stamps.len() - 1) as f64 * 1000.0 / secs)
}

fn main() {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        eprintln!("*** SKIPPED epoch benchmark: /dev/kvm is unusable ***");
        return;
    }
    let secs: u64 = std::env::var("MIRRORVM_BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let bw = memcpy_bytes_per_us();
    println!("mirrorvm epoch benchmark: 25 ms epochs (40 Hz), {secs} s per run, 1 vCPU, 256 MiB, test guest");
    println!("memcpy bandwidth here: {:.0} MB/s", bw);
    println!();

    // 1,000 pages per 25 ms epoch = 40 pages/ms; 10,000 = 400 pages/ms.
    let loads = [
        (
            "idle",
            format!("counter interval_ms=1000 idle=1 limit={secs}"),
        ),
        (
            "1,000 pages/epoch",
            format!("dirty pages_per_ms=40 mb=64 verify=0 seconds={secs}"),
        ),
        (
            "10,000 pages/epoch",
            format!("dirty pages_per_ms=400 mb=64 verify=0 seconds={secs}"),
        ),
    ];
    println!("| load | checkpoints | dirty pages p50 | pause p50 (µs) | pause p99 (µs) | copy-bound limit (µs) | pause / limit |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    let mut fixed = 0u64;
    for (name, cmdline) in &loads {
        let r = run(cmdline, Some(25), secs);
        if r.pauses.is_empty() {
            fail(&format!(
                "'{name}': no checkpoint after the first in {secs} s"
            ));
        }
        let pct = |v: &[u64], p: f64| stats::percentile(v, p).expect("checked non-empty");
        let p50 = pct(&r.pauses, 0.5);
        let p99 = pct(&r.pauses, 0.99);
        let pages = pct(&r.pages, 0.5);
        if *name == "idle" {
            fixed = p50;
        }
        // A non-negative estimate in nanoseconds; `as` saturates, which is the meaning.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let limit = (pages as f64 * 4096.0 / bw) as u64 + fixed;
        let ratio = if limit > 0 {
            p50 as f64 / limit as f64
        } else {
            0.0
        };
        println!(
            "| {name} | {} | {pages} | {p50} | {p99} | {limit} | {ratio:.2} |",
            r.pauses.len()
        );
    }
    println!();

    // Slowdown: the dirty workload is asked to write every page of its region each
    // millisecond (one step); it keeps that pace or falls behind. Its progress lines
    // come every 1000 steps, and the wall time between the first and the last gives
    // the steps it sustains per second. Without and with checkpointing, alternating
    // so both share the machine's noise.
    println!("| dirty, every page of the region each ms | pages a step | steps/s without checkpoints | steps/s at 40 Hz | slowdown |");
    println!("| --- | --- | --- | --- | --- |");
    for mb in [16u64, 192] {
        let flat = format!("dirty pages_per_ms=1000000 mb={mb} verify=0 seconds={secs}");
        let mut plain = Vec::new();
        let mut ckpt = Vec::new();
        for _ in 0..3 {
            for (epoch_ms, into) in [(None, &mut plain), (Some(25), &mut ckpt)] {
                match steps_per_s(&flat, epoch_ms) {
                    Some(r) => into.push(r),
                    None => fail(&format!(
                        "'{flat}' with epochs {epoch_ms:?}: the run failed or printed under two progress lines"
                    )),
                }
            }
        }
        let (p, c) = (
            stats::median(&plain).expect("3 runs"),
            stats::median(&ckpt).expect("3 runs"),
        );
        let slowdown = if p > 0.0 { (1.0 - c / p) * 100.0 } else { 0.0 };
        println!(
            "| {mb} MiB region, median of 3 | {} | {p:.1} | {c:.1} | {slowdown:.1} % |",
            mb * 256
        );
    }
}
