//! Boot and restore benchmark: how long `mirrorvm run` takes from process start to
//! the test guest's first serial byte, and to the guest's exit; and how long
//! `mirrorvm restore` of a 256 MiB guest takes from process start to the restored
//! guest's first serial byte (goal ≤ 20 ms), for an idle guest and for guests that
//! leave the largest chains of checkpoint files the fold bound allows (the table
//! prints each chain: files, bytes, pages). Runs the real binary repeatedly and
//! prints tables of medians (a bench target, never a timed test: these machines are
//! shared and noisy).
//!
//!     cargo bench --bench boot            # 30 runs of each workload
//!     MIRRORVM_BENCH_RUNS=100 cargo bench --bench boot
//!     MIRRORVM_BENCH_ONLY=restore cargo bench --bench boot   # the restore table only

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
/// serial byte, and the time the restore took to replay the chain (from its debug
/// log line); the restored process is then killed, which leaves `dir` as it was (a
/// restore without `--checkpoint-dir` writes nothing there).
fn one_restore(dir: &Path) -> Option<(Duration, Option<f64>)> {
    let log = dir.with_extension("log");
    let start = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mirrorvm"))
        .args(["restore".as_ref(), "--from".as_ref(), dir.as_os_str()])
        .env("MIRRORVM_LOG", "vmm::checkpoint::directory=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).ok()?)
        .spawn()
        .ok()?;
    let mut out = child.stdout.take()?;
    let mut byte = [0u8; 1];
    let got = out.read_exact(&mut byte).is_ok();
    let first_byte = start.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    // "... on N threads; X ms in all"
    let replay = text
        .lines()
        .find(|l| l.contains("chain replayed"))
        .and_then(|l| l.rsplit("; ").next())
        .and_then(|t| t.split(' ').next())
        .and_then(|v| v.parse::<f64>().ok());
    got.then_some((first_byte, replay))
}

/// A guest to checkpoint and restore: the label, `mirrorvm run` arguments after
/// `--memory 256M`, how many checkpoints it completes (its metrics lines) before
/// the kills, and when after that it is killed with SIGKILL, in milliseconds: one
/// directory and one row per kill (where a kill lands, inside a fold or not,
/// decides what the chain holds).
struct RestoreCase {
    label: &'static str,
    args: &'static [&'static str],
    after: usize,
    kills: &'static [u64],
}

/// The restore table's guests. Each prints as soon as it runs again (`counter`
/// every millisecond, `dirty` with `report_ms=1`), so the first byte marks a
/// running guest. The `dirty` ones leave the largest chains the fold bound allows:
/// many new pages per checkpoint, a hot set of 4,096 pages rewritten all the time,
/// and 64 MiB checkpoints (1 s epochs over a 64 MiB region).
const RESTORE_CASES: [RestoreCase; 4] = [
    RestoreCase {
        label: "`counter interval_ms=1`",
        args: &["--cmdline", "counter interval_ms=1"],
        after: 60,
        kills: &[0],
    },
    RestoreCase {
        label: "`dirty pages_per_ms=40 mb=240` (new pages)",
        args: &["--cmdline", "dirty pages_per_ms=40 mb=240 report_ms=1"],
        after: 40,
        kills: &[0, 530],
    },
    RestoreCase {
        label: "`dirty pages_per_ms=4096 mb=16` (hot set)",
        args: &["--cmdline", "dirty pages_per_ms=4096 mb=16 report_ms=1"],
        after: 60,
        kills: &[0, 40, 90],
    },
    RestoreCase {
        label: "`dirty pages_per_ms=400 mb=64`, `--epoch-ms 1000` (64 MiB checkpoints)",
        args: &[
            "--cmdline",
            "dirty pages_per_ms=400 mb=64 report_ms=1",
            "--epoch-ms",
            "1000",
        ],
        after: 3,
        kills: &[0, 530],
    },
];

/// A checkpoint directory of a 256 MiB guest run as `case` says and killed with
/// SIGKILL (so it is not marked finished); its per-epoch metrics go to
/// `metrics`.
fn checkpointed_guest(
    dir: &Path,
    metrics: &Path,
    case: &RestoreCase,
    kill_ms: u64,
    fold: &str,
) -> Result<(), String> {
    let _ = std::fs::remove_dir_all(dir);
    let mut child = Command::new(env!("CARGO_BIN_EXE_mirrorvm"))
        .args(["run", "--memory", "256M"])
        .args(case.args)
        .arg("--checkpoint-dir")
        .arg(format!("{},fold={fold}", dir.display()))
        .arg("--metrics")
        .arg(metrics)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("spawn: {e}"))?;
    // Until `case.after` checkpoints are complete (at most 60 s), then `kill_ms`.
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline
        && std::fs::read_to_string(metrics).map_or(0, |t| t.lines().count()) < case.after
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(kill_ms));
    let _ = child.kill();
    let _ = child.wait();
    if dir.join("memory.img").exists() {
        Ok(())
    } else {
        Err(format!("{} holds no memory image", dir.display()))
    }
}

/// What a restore of `dir` replays: the files after the image (its own epoch's
/// file, kept for its state, is not replayed), their bytes, their pages with every
/// copy counted, and the distinct pages among them (what the restore writes).
struct Chain {
    files: usize,
    bytes: u64,
    pages: u64,
    distinct: usize,
}

fn chain_of(dir: &Path) -> Result<Chain, String> {
    use vmm::checkpoint::{directory, format};
    let base: u64 = std::fs::read_to_string(dir.join("memory.epoch"))
        .map_err(|e| format!("memory.epoch: {e}"))?
        .trim()
        .parse()
        .map_err(|e| format!("memory.epoch: {e}"))?;
    let files = directory::list_checkpoints(dir).map_err(|e| e.to_string())?;
    let mut chain = Chain {
        files: 0,
        bytes: 0,
        pages: 0,
        distinct: 0,
    };
    let mut distinct = std::collections::HashSet::new();
    for (epoch, path) in files.iter().filter(|(e, _)| *e > base) {
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let len = bytes.len() as u64;
        let c = format::read_checked(&mut bytes.as_slice(), len, u64::MAX)
            .map_err(|e| format!("checkpoint {epoch}: {e}"))?;
        let pages = c
            .stored_pages(u64::MAX)
            .map_err(|e| format!("checkpoint {epoch}: {e}"))?;
        for (gpa, _) in pages {
            chain.pages += 1;
            distinct.insert(gpa);
        }
        chain.files += 1;
        chain.bytes += len;
    }
    chain.distinct = distinct.len();
    Ok(chain)
}

/// The p50 and p90 of the `export_us` of the complete checkpoints in the metrics
/// file `path`, in milliseconds, and how many there were.
fn exports(path: &Path) -> (f64, f64, usize) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let us: Vec<f64> = text
        .lines()
        .filter_map(|l| {
            let rest = &l[l.find("\"export_us\":")? + 12..];
            let end = rest.find([',', '}'])?;
            rest[..end].parse::<f64>().ok()
        })
        .collect();
    let p = |q| stats::percentile(&us, q).unwrap_or(f64::NAN) / 1e3;
    (p(0.5), p(0.9), us.len())
}

fn restore_table(runs: usize) {
    println!();
    println!("| restore, 256 MiB guest killed with SIGKILL | fold bound | chain: files, bytes | pages (every copy) | distinct pages written | export while it ran p50 / p90 (ms) | replay p50 (ms) | first serial byte p50 (ms) | p90 | min | goal ≤ 20 ms p50 |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    // Each case under both fold bounds (`fold=small`, the default: 2,048 distinct
    // pages, 8 MiB or 32 files; `fold=large`: the guest's memory size in chain
    // bytes, or 32 files), one after the other.
    for (case, kill_ms, fold) in RESTORE_CASES.iter().flat_map(|c| {
        c.kills
            .iter()
            .flat_map(move |k| ["large", "small"].map(|f| (c, *k, f)))
    }) {
        let dir =
            std::env::temp_dir().join(format!("mirrorvm-bench-restore-{}", std::process::id()));
        let metrics = dir.with_extension("jsonl");
        let chain =
            checkpointed_guest(&dir, &metrics, case, kill_ms, fold).and_then(|()| chain_of(&dir));
        let chain = match chain {
            Ok(c) => c,
            Err(e) => {
                eprintln!("cannot prepare the restore of {}: {e}", case.label);
                std::process::exit(1);
            }
        };
        let (export_p50, export_p90, _) = exports(&metrics);
        let mut first = Vec::new();
        let mut replay = Vec::new();
        // One warm-up restore, as for the boots.
        let _ = one_restore(&dir);
        for _ in 0..runs {
            match one_restore(&dir) {
                Some((d, r)) => {
                    first.push(d);
                    replay.extend(r);
                }
                None => {
                    eprintln!("a restore from {} showed no output", dir.display());
                    std::process::exit(1);
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_file(&metrics);
        let p50 = stats::percentile(&first, 0.5).unwrap_or_default();
        println!(
            "| {}, killed {} ms after checkpoint {} | {} | {}, {} | {} | {} | {export_p50:.1} / {export_p90:.1} | {:.2} | {} | {} | {} | {} |",
            case.label,
            kill_ms,
            case.after,
            if fold == "large" {
                "large: memory's size, 32 files"
            } else {
                "small (default): 2,048 pages, 8 MiB, 32 files"
            },
            chain.files,
            chain.bytes,
            chain.pages,
            chain.distinct,
            stats::median(&replay).unwrap_or(f64::NAN),
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
    if std::env::var("MIRRORVM_BENCH_ONLY").as_deref() == Ok("restore") {
        restore_table(runs);
        println!();
        println!("{} (after)", host::line());
        return;
    }
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
    println!();
    println!("{} (after)", host::line());
}
