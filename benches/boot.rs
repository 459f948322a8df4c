//! Boot and restore benchmark: how long `mirrorvm run` takes from process start to
//! the test guest's first serial byte, and to the guest's exit; and how long
//! `mirrorvm restore` of a 256 MiB guest takes from process start to the restored
//! guest's first serial byte (goal ≤ 20 ms). Runs the real binary repeatedly and
//! prints tables of medians (a bench target, never a timed test: these machines are
//! shared and noisy).
//!
//!     cargo bench --bench boot            # 30 runs of each workload
//!     MIRRORVM_BENCH_RUNS=100 cargo bench --bench boot

#[path = "support/host.rs"]
mod host;
#[path = "support/stats.rs"]
mod stats;

use std::io::Read;
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

struct Sample {
    first_byte: Duration,
    exit: Duration,
}

/// Spawns mirrorvm with `args` and waits for its first serial byte: the child, its
/// stdout, when it started, and how long the byte took.
fn until_first_byte(args: &[&std::ffi::OsStr]) -> Option<(Child, ChildStdout, Instant, Duration)> {
    let start = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mirrorvm"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let Some(mut out) = child.stdout.take() else {
        let _ = child.kill();
        let _ = child.wait();
        return None;
    };
    let mut byte = [0u8; 1];
    if out.read_exact(&mut byte).is_err() {
        let _ = child.kill();
        let _ = child.wait();
        return None;
    }
    Some((child, out, start, start.elapsed()))
}

fn one_run(args: &[&str]) -> Option<Sample> {
    let all: Vec<&std::ffi::OsStr> = ["run", "--memory", "128M"]
        .iter()
        .chain(args)
        .map(std::ffi::OsStr::new)
        .collect();
    let (mut child, mut out, start, first_byte) = until_first_byte(&all)?;
    let mut rest = Vec::new();
    out.read_to_end(&mut rest).ok()?;
    let status = child.wait().ok()?;
    let exit = start.elapsed();
    status.success().then_some(Sample { first_byte, exit })
}

/// Milliseconds of the `p`-percentile of `v`.
fn ms(v: &[Duration], p: f64) -> String {
    let d = stats::percentile(v, p).expect("at least one run");
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

/// Time from spawning `mirrorvm restore --from dir` to the restored guest's first
/// serial byte; the restored process is then killed, which leaves `dir` as it was
/// (a restore without `--checkpoint-dir` writes nothing there).
fn one_restore(dir: &Path) -> Option<Duration> {
    let args = ["restore".as_ref(), "--from".as_ref(), dir.as_os_str()];
    let (mut child, _out, _, first_byte) = until_first_byte(&args)?;
    let _ = child.kill();
    let _ = child.wait();
    Some(first_byte)
}

/// A checkpoint directory of a 256 MiB `counter interval_ms=1` guest, killed with
/// SIGKILL after `secs` seconds of checkpoints (so it is not marked finished).
fn checkpointed_guest(dir: &Path, secs: u64) -> Result<(), String> {
    let _ = std::fs::remove_dir_all(dir);
    let mut child = Command::new(env!("CARGO_BIN_EXE_mirrorvm"))
        .args([
            "run",
            "--memory",
            "256M",
            "--cmdline",
            "counter interval_ms=1",
        ])
        .arg("--checkpoint-dir")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("spawn: {e}"))?;
    std::thread::sleep(Duration::from_secs(secs));
    let _ = child.kill();
    let _ = child.wait();
    if dir.join("memory.img").exists() {
        Ok(())
    } else {
        Err(format!("{} holds no memory image", dir.display()))
    }
}

fn restore_table(runs: usize) {
    let dir = std::env::temp_dir().join(format!("mirrorvm-bench-restore-{}", std::process::id()));
    if let Err(e) = checkpointed_guest(&dir, 3) {
        eprintln!("cannot prepare the restore benchmark: {e}");
        std::process::exit(1);
    }
    let mut first = Vec::new();
    // One warm-up restore, as for the boots.
    let _ = one_restore(&dir);
    for _ in 0..runs {
        match one_restore(&dir) {
            Some(d) => first.push(d),
            None => {
                eprintln!("a restore from {} showed no output", dir.display());
                std::process::exit(1);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!();
    println!("| restore, 256 MiB `counter interval_ms=1` guest | first serial byte p50 (ms) | p90 | min | goal |");
    println!("| --- | --- | --- | --- | --- |");
    let p50 = stats::percentile(&first, 0.5).unwrap_or_default();
    println!(
        "| `mirrorvm restore --from DIR` | {} | {} | {} | ≤ 20 ms p50: {} |",
        ms(&first, 0.5),
        ms(&first, 0.9),
        ms(&first, 0.0),
        if p50 <= Duration::from_millis(20) {
            "met"
        } else {
            "NOT met"
        }
    );
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing special.
    // Either way, a missing KVM is reported loudly rather than measured as zero.
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        eprintln!("*** SKIPPED boot benchmark: /dev/kvm is unusable ***");
        return;
    }
    let runs: usize = std::env::var("MIRRORVM_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30)
        .max(1);
    println!("mirrorvm boot benchmark: {runs} runs each, 128 MiB, test guest");
    println!("{}", host::line());
    println!();
    println!(
        "| workload | first serial byte p50 (ms) | p90 | guest exit p50 (ms) | p90 | min exit |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    let workloads: [(&str, &[&str]); 2] = [
        ("hello, 1 vCPU", &["--cmdline", "hello"]),
        ("smp, 2 vCPUs", &["--cpus", "2", "--cmdline", "smp"]),
    ];
    for (workload, args) in workloads {
        // One warm-up run so page cache and binary loading do not skew the first.
        let _ = one_run(args);
        let mut first = Vec::new();
        let mut exit = Vec::new();
        for _ in 0..runs {
            match one_run(args) {
                Some(s) => {
                    first.push(s.first_byte);
                    exit.push(s.exit);
                }
                None => {
                    eprintln!("run of '{workload}' failed");
                    std::process::exit(1);
                }
            }
        }
        println!(
            "| {workload} | {} | {} | {} | {} | {} |",
            ms(&first, 0.5),
            ms(&first, 0.9),
            ms(&exit, 0.5),
            ms(&exit, 0.9),
            ms(&exit, 0.0)
        );
    }
    restore_table(runs);
}
