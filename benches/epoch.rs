//! Epoch benchmark: what checkpointing every 25 ms costs a guest that writes memory,
//! with the old dirty-tracking policy (every dirty page re-protected at every cut)
//! and the hot-page policy side by side in one run.
//!
//!     cargo bench --bench epoch
//!     MIRRORVM_BENCH_SECONDS=8 MIRRORVM_BENCH_ROUNDS=3 cargo bench --bench epoch
//!
//! First it prints the host: CPU, cores, whether KVM is the software-nested
//! `kvm_pvm`, the load average, and three costs measured here:
//! - a write-protection fault, twice: by the start-up probe the VMM runs
//!   (`vmm::fault_probe`, what the hot-page policy uses), and by a guest writing
//!   new pages as fast as it can under the old policy, which takes one fault per
//!   page: (epoch length − pause) ÷ pages dirtied, median over its epochs (the
//!   guest's own work per page is a few ns);
//! - a page copy: the cut's copy step ÷ its pages, median over the hot-set run's
//!   cuts, and a plain 4 KiB memcpy between two buffers in this process;
//! - a kick: the idle guest's median kick (until every vCPU parked).
//!
//! Then, per workload of the test guest's `dirty` command: its rate (paced steps per
//! second, from its progress lines) without checkpoints, with the old policy
//! (`MIRRORVM_DIRTY_POLICY=all`) and with the hot-page policy (the default); the
//! pause p50/p99, the bytes written per checkpoint p50 and the hot pages p50 of each
//! checkpointed run (from `--metrics`; the first checkpoint, which completes the
//! pre-copy, is left out). Runs alternate (plain, old, hot) in each round so they
//! share the machine's noise; the table holds medians over the rounds. A run that
//! has not finished its guest work after `MIRRORVM_BENCH_CAP` seconds (default 25)
//! is stopped with SIGTERM and its rate taken from the progress lines so far.
//! `MIRRORVM_BENCH_VARIANT="K=V …; K=V …"` adds to each round a run of the hot-page
//! policy per `;`-separated group, with those environment settings (settings
//! compared side by side);
//! `MIRRORVM_BENCH_LOADS=walk,hot` runs only the workloads named.

#[path = "../tests/common/metrics.rs"]
mod metrics;
#[path = "support/stats.rs"]
mod stats;

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Ends the benchmark with an error: a failed run must not be printed as figures.
fn fail(msg: &str) -> ! {
    eprintln!("epoch benchmark: {msg}");
    std::process::exit(1);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Plain,
    Old,
    Hot,
    /// Hot pages with the settings of the i-th `MIRRORVM_BENCH_VARIANT`.
    Variant(usize),
}

impl Mode {
    fn name(self) -> String {
        match self {
            Mode::Plain => "no checkpoints".into(),
            Mode::Old => "old: protect all".into(),
            Mode::Hot => "hot pages".into(),
            Mode::Variant(i) => format!(
                "hot pages, {}",
                variants().get(i).map(|v| v.join(" ")).unwrap_or_default()
            ),
        }
    }
}

/// `MIRRORVM_BENCH_VARIANT`: environment settings (`K=V`, space-separated) of
/// extra runs of the hot-page policy beside the others (one per `;`-separated
/// group), to compare settings side by side in one run.
fn variants() -> Vec<Vec<String>> {
    std::env::var("MIRRORVM_BENCH_VARIANT")
        .unwrap_or_default()
        .split(';')
        .map(|v| v.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .filter(|v| !v.is_empty())
        .collect()
}

#[derive(Default)]
struct Run {
    /// Paced guest steps (milliseconds of guest work) per wall second.
    steps_per_s: Option<f64>,
    metrics: Vec<metrics::Metric>,
    /// Whether the guest finished its work (not stopped at the cap).
    finished: bool,
}

/// Runs the test guest with `cmdline` (a `dirty ... report_ms=R` or an idle
/// counter) in `mode`, for at most `cap`.
fn run(cmdline: &str, mode: Mode, cap: Duration) -> Run {
    let dir = tempfile::tempdir_in(sink_dir()).unwrap_or_else(|e| fail(&format!("tempdir: {e}")));
    let metrics_path = dir.path().join("metrics.jsonl");
    let mut c = Command::new(env!("CARGO_BIN_EXE_mirrorvm"));
    c.stdin(Stdio::null()).stderr(Stdio::null());
    c.args(["run", "--memory", "256M", "--cmdline", cmdline]);
    if mode != Mode::Plain {
        c.args(["--epoch-ms", "25", "--checkpoint-dir"])
            .arg(dir.path().join("ck"))
            .arg("--metrics")
            .arg(&metrics_path);
        c.env(
            "MIRRORVM_DIRTY_POLICY",
            if mode == Mode::Old { "all" } else { "hot" },
        );
        if let Mode::Variant(i) = mode {
            for kv in variants().get(i).cloned().unwrap_or_default() {
                if let Some((k, v)) = kv.split_once('=') {
                    c.env(k, v);
                }
            }
        }
    }
    c.stdout(Stdio::piped());
    let mut child = c
        .spawn()
        .unwrap_or_else(|e| fail(&format!("spawn mirrorvm: {e}")));
    let out = child
        .stdout
        .take()
        .unwrap_or_else(|| fail("no stdout pipe"));
    // Progress lines "dirty: M ms, P pages dirtied", stamped on arrival.
    let (tx, rx) = mpsc::channel::<(Instant, u64)>();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.strip_prefix("dirty: ") {
                if let Some(ms) = rest.strip_suffix(" pages dirtied").and_then(|r| {
                    r.split_once(" ms,")
                        .and_then(|(ms, _)| ms.trim().parse::<u64>().ok())
                }) {
                    let _ = tx.send((Instant::now(), ms));
                }
            }
        }
    });
    let start = Instant::now();
    let mut finished = true;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if start.elapsed() > cap => {
                finished = false;
                let pid = i32::try_from(child.id()).unwrap_or_else(|_| fail("pid"));
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
                let _ = child.wait();
                break;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => fail(&format!("wait: {e}")),
        }
    }
    let _ = reader.join();
    let stamps: Vec<(Instant, u64)> = rx.try_iter().collect();
    let steps_per_s = match (stamps.first(), stamps.last()) {
        (Some(a), Some(b)) if b.1 > a.1 => {
            let s = b.0.duration_since(a.0).as_secs_f64();
            (s > 0.0).then(|| (b.1 - a.1) as f64 / s)
        }
        _ => None,
    };
    let metrics = if mode == Mode::Plain {
        Vec::new()
    } else {
        metrics::read_metrics(&metrics_path).unwrap_or_else(|e| fail(&e))
    };
    Run {
        steps_per_s,
        metrics: metrics.into_iter().skip(1).collect(),
        finished,
    }
}

/// Where checkpoint directories go: `MIRRORVM_BENCH_DIR`, else /dev/shm when it
/// exists (so the export, which the next cut waits for, does not stretch the epochs
/// far beyond 25 ms and hide the dirty-tracking costs this bench is about), else the
/// system's temporary directory.
fn sink_dir() -> std::path::PathBuf {
    if let Some(d) = std::env::var_os("MIRRORVM_BENCH_DIR") {
        return d.into();
    }
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        shm.into()
    } else {
        std::env::temp_dir()
    }
}

fn pct(v: &[u64], p: f64) -> u64 {
    stats::percentile(v, p).unwrap_or(0)
}

fn host_line() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let pvm = std::path::Path::new("/sys/module/kvm_pvm").exists();
    format!(
        "{nproc} cores, {cpu}, KVM {}",
        if pvm {
            "kvm_pvm (software-nested)"
        } else {
            "hardware (no kvm_pvm)"
        }
    )
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
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
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let secs = env("MIRRORVM_BENCH_SECONDS", 4);
    let rounds = env("MIRRORVM_BENCH_ROUNDS", 3).max(1);
    let cap = Duration::from_secs(env("MIRRORVM_BENCH_CAP", 25));
    println!("mirrorvm epoch benchmark: 25 ms epochs, {secs} s of guest work per run (stopped after {} s), {rounds} round(s), 1 vCPU, 256 MiB, test guest", cap.as_secs());
    println!("host: {}; load average at start {}", host_line(), loadavg());
    println!("checkpoint directories in {}", sink_dir().display());

    // Host costs. The fault: a guest asking for far more new pages than it can
    // write, under the old policy; one fault per page.
    let memcpy_ns = vmm::dirty::HostCosts::measure(0).copy_ns;
    let probe = kvm_ioctls::Kvm::new()
        .map_err(|e| e.to_string())
        .and_then(|k| vmm::fault_probe::measure(&k).map_err(|e| e.to_string()))
        .unwrap_or_else(|e| fail(&format!("the fault probe: {e}")));
    let sat = run(
        &format!("dirty pages_per_ms=4000 mb=240 verify=0 seconds={secs} report_ms=20"),
        Mode::Old,
        cap,
    );
    let mut per_page: Vec<u64> = sat
        .metrics
        .iter()
        .filter(|m| m.dirty_pages > 100 && m.epoch_us > m.pause_us)
        .map(|m| (m.epoch_us - m.pause_us) * 1000 / m.dirty_pages)
        .collect();
    per_page.sort_unstable();
    let fault_ns =
        stats::median(&per_page).unwrap_or_else(|| fail("no epoch to measure the fault"));
    let idle = run(
        &format!("counter interval_ms=1000 idle=1 limit={secs}"),
        Mode::Hot,
        cap,
    );
    let kicks: Vec<u64> = idle.metrics.iter().map(|m| m.kick_us).collect();
    let idle_pauses: Vec<u64> = idle.metrics.iter().map(|m| m.pause_us).collect();
    if kicks.is_empty() {
        fail("the idle run cut no checkpoint after the first");
    }

    // name, command line, what "a step" is.
    let loads: [(&str, String); 3] = [
        (
            "hot set: 4,096 pages (16 MiB) rewritten every ms",
            format!("dirty pages_per_ms=4096 mb=16 verify=0 seconds={secs} report_ms=20"),
        ),
        (
            "walk: 160 pages/ms (4,000 a 25 ms epoch) over 64 MiB",
            format!("dirty pages_per_ms=160 mb=64 verify=0 seconds={secs} report_ms=20"),
        ),
        (
            "new pages: 40/ms (1,000 an epoch) over 240 MiB",
            format!("dirty pages_per_ms=40 mb=240 verify=0 seconds={secs} report_ms=20"),
        ),
    ];
    let mut modes = vec![Mode::Plain, Mode::Old, Mode::Hot];
    modes.extend((0..variants().len()).map(Mode::Variant));
    // MIRRORVM_BENCH_LOADS: which workloads (hot, walk, new; all by default).
    let only = std::env::var("MIRRORVM_BENCH_LOADS").unwrap_or_default();
    let wanted = |name: &str| {
        only.is_empty()
            || only
                .split(',')
                .any(|w| name.starts_with(w.trim()) && !w.trim().is_empty())
    };
    // results[load][mode] = runs
    let mut results: Vec<Vec<Vec<Run>>> = (0..loads.len())
        .map(|_| (0..modes.len()).map(|_| Vec::new()).collect())
        .collect();
    for _ in 0..rounds {
        for (li, (name, cmdline)) in loads.iter().enumerate() {
            if !wanted(name) {
                continue;
            }
            for (mi, mode) in modes.iter().enumerate() {
                results[li][mi].push(run(cmdline, *mode, cap));
            }
        }
    }
    let mut copy_per_page: Vec<u64> = results[0][2]
        .iter()
        .flat_map(|r| r.metrics.iter())
        .filter(|m| m.dirty_pages > 100)
        .map(|m| m.copy_us * 1000 / m.dirty_pages)
        .collect();
    copy_per_page.sort_unstable();
    let copy_ns = stats::median(&copy_per_page).unwrap_or(0);
    println!();
    println!("| host cost | measured |");
    println!("| --- | --- |");
    println!(
        "| write-protection fault, start-up probe ({} pages at CPL3, fastest of {} rounds; the probe took {:.1} ms) | {:.1} µs |",
        probe.pages,
        probe.rounds,
        probe.took.as_secs_f64() * 1e3,
        probe.fault_ns as f64 / 1000.0
    );
    println!(
        "| write-protection fault (old policy, new pages as fast as the guest can) | {:.1} µs |",
        fault_ns as f64 / 1000.0
    );
    println!(
        "| page copy at a cut (hot-set run's copy step ÷ pages) | {:.2} µs |",
        copy_ns as f64 / 1000.0
    );
    println!(
        "| page copy, plain 4 KiB memcpy in this process | {:.2} µs |",
        memcpy_ns as f64 / 1000.0
    );
    println!(
        "| kick (idle guest, until the vCPU parked), p50 | {} µs |",
        pct(&kicks, 0.5)
    );
    println!(
        "| idle pause p50 / p99 | {} / {} µs |",
        pct(&idle_pauses, 0.5),
        pct(&idle_pauses, 0.99)
    );
    println!();
    println!("| workload | policy | steps/s (guest ms of work per wall s) | slowdown | pause p50 (µs) | pause p99 (µs) | copy p50 (µs) | bytes per checkpoint p50 | dirty pages p50 | hot pages p50 | epoch p50 (ms) |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for (li, (name, _)) in loads.iter().enumerate() {
        if !wanted(name) {
            continue;
        }
        let rate = |mi: usize| {
            let v: Vec<f64> = results[li][mi]
                .iter()
                .filter_map(|r| r.steps_per_s)
                .collect();
            stats::median(&v)
        };
        let plain = rate(0);
        for (mi, mode) in modes.iter().enumerate() {
            let runs = &results[li][mi];
            let r = rate(mi);
            let capped = runs.iter().any(|r| !r.finished);
            let slowdown = match (plain, r) {
                (Some(p), Some(c)) if mi > 0 && p > 0.0 => {
                    format!("{:.1} %", (1.0 - c / p) * 100.0)
                }
                _ => "".into(),
            };
            let all: Vec<&metrics::Metric> = runs.iter().flat_map(|r| r.metrics.iter()).collect();
            let col = |f: fn(&metrics::Metric) -> u64, p: f64| {
                if *mode == Mode::Plain || all.is_empty() {
                    "".to_string()
                } else {
                    let v: Vec<u64> = all.iter().map(|m| f(m)).collect();
                    pct(&v, p).to_string()
                }
            };
            println!(
                "| {name} | {} | {}{} | {slowdown} | {} | {} | {} | {} | {} | {} | {} |",
                mode.name(),
                r.map_or("none".into(), |r| format!("{r:.1}")),
                if capped { " (stopped at the cap)" } else { "" },
                col(|m| m.pause_us, 0.5),
                col(|m| m.pause_us, 0.99),
                col(|m| m.copy_us, 0.5),
                col(|m| m.bytes, 0.5),
                col(|m| m.dirty_pages, 0.5),
                col(|m| m.hot_pages, 0.5),
                col(|m| m.epoch_us / 1000, 0.5),
            );
        }
    }
    // What the fault cost allows the new-pages guest: each ms of work is 1 ms plus
    // a fault per page.
    let bound = 1000.0 / (1.0 + 40.0 * fault_ns as f64 / 1e6);
    println!();
    println!("new pages: the measured fault allows at most {bound:.0} steps/s (1 ms of work + 40 faults per step)");
    println!("load average at the end: {}", loadavg());
}
