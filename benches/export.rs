//! Export benchmark: what the local directory sink costs per checkpoint, and how
//! much the page codec saves on real guests. Two tables, each measured side by side
//! in one run:
//!
//! 1. **Export time.** The directory sink is driven as a library (no guest) with
//!    checkpoints of an ordinary size (1,000 pages) and of 64 MiB (16,384 pages),
//!    whose pages look like the test guest's `dirty` pages (a few non-zero words) or
//!    are incompressible noise; each checkpoint writes the same pages, as a hot set
//!    does. Four ways of writing, in alternating rounds: every page written twice
//!    with a fold after every checkpoint and raw pages (what format version 2 did);
//!    once, lz4, under `fold=large` (the guest's memory size in chain bytes, or 32
//!    files) with its folds on their own thread; under the default bound
//!    `fold=small` (2,048 distinct pages, 8 MiB or 32 files, which keeps a restore
//!    short) with its folds in line, as before, and on their own thread (the
//!    default).
//!    Median, p90 and mean of `CheckpointSink::write` (the mean includes the folds
//!    made in line; a fold on its own thread shows only where the next write waits
//!    for it or competes with it for the cores).
//! 2. **Checkpoint size and CPU.** The release binary runs each workload of the test
//!    guest with `--checkpoint-dir DIR,compress=none` and is stopped; the raw chain
//!    it leaves is re-encoded here: bytes as raw pages, with zero pages as bits, with
//!    lz4, and with lz4 of the XOR against the page's previous copy (which this
//!    bench rebuilds from the image and the chain; the local sink does not hold it),
//!    and the CPU time of encoding and decoding.
//!
//! ```text
//! cargo bench --bench export
//! MIRRORVM_BENCH_ROUNDS=15 cargo bench --bench export      # more rounds (default 9)
//! MIRRORVM_BENCH_SECONDS=8 cargo bench --bench export      # longer guest runs (default 4)
//! MIRRORVM_BENCH_DIR=/dev/shm cargo bench --bench export   # where the sink writes
//! ```

#[path = "support/host.rs"]
mod host;
#[path = "support/stats.rs"]
mod stats;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmm::checkpoint::directory::{list_checkpoints, DirectoryOptions, DirectorySink, FoldPolicy};
use vmm::checkpoint::pagecodec::{self, Compression};
use vmm::checkpoint::{format, Checkpoint, CheckpointSink, DiskManifest, Manifest};
use vmm::dirty::{StagedPages, PAGE_SIZE};

const MEMORY: u64 = 256 << 20;

fn fail(msg: &str) -> ! {
    eprintln!("export benchmark: {msg}");
    std::process::exit(1);
}

fn manifest() -> Manifest {
    Manifest {
        memory: MEMORY,
        cpus: 1,
        cmdline: "bench".into(),
        disks: Vec::<DiskManifest>::new(),
        cpu: Default::default(),
    }
}

/// A xorshift generator: the same pages every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Content {
    /// Like the `dirty` workload: one to eight non-zero words a page.
    Sparse,
    /// Random bytes: nothing to compress.
    Noise,
}

/// `n` pages at consecutive addresses from 16 MiB on, as epoch `epoch` writes them.
fn pages(n: usize, content: Content, epoch: u64) -> StagedPages {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d ^ epoch);
    let mut p = StagedPages {
        addrs: Vec::with_capacity(n),
        data: vec![0u8; n * PAGE_SIZE],
    };
    for i in 0..n {
        p.addrs.push((16 << 20) + (i * PAGE_SIZE) as u64);
        let page = &mut p.data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE];
        match content {
            Content::Sparse => {
                for w in 0..=usize::try_from(rng.next() % 8).unwrap_or(0) {
                    let at = (w * 61 % 512) * 8;
                    page[at..at + 8].copy_from_slice(&rng.next().to_le_bytes());
                }
            }
            Content::Noise => {
                for c in page.chunks_exact_mut(8) {
                    c.copy_from_slice(&rng.next().to_le_bytes());
                }
            }
        }
    }
    p
}

struct Way {
    name: &'static str,
    options: DirectoryOptions,
}

fn ways() -> [Way; 4] {
    [
        Way {
            name: "v2: file + fold every checkpoint, raw",
            options: DirectoryOptions {
                compression: Compression::None,
                fold: Default::default(),
                policy: Some(FoldPolicy::EVERY),
                fold_in_line: true,
            },
        },
        Way {
            name: "v3: file only, fold=large (memory's size in bytes, 32 files), lz4, fold on its own thread",
            options: DirectoryOptions {
                compression: Compression::Lz4,
                fold: Default::default(),
                policy: Some(FoldPolicy::by_memory(MEMORY)),
                fold_in_line: false,
            },
        },
        Way {
            name: "v3: file only, fold=small, lz4, fold in line (before)",
            options: DirectoryOptions {
                compression: Compression::Lz4,
                fold: Default::default(),
                policy: Some(FoldPolicy::SMALL),
                fold_in_line: true,
            },
        },
        Way {
            name: "v3: file only, fold=small, lz4, fold on its own thread (the default)",
            options: DirectoryOptions {
                compression: Compression::Lz4,
                fold: Default::default(),
                policy: Some(FoldPolicy::SMALL),
                fold_in_line: false,
            },
        },
    ]
}

/// Table 1.
fn export_times(root: &Path, rounds: usize) {
    println!("## 1. Export time of one checkpoint (CheckpointSink::write), {rounds} alternating rounds of 8 checkpoints per way, 256 MiB guest, into {}", root.display());
    println!();
    println!("| checkpoint | way | file bytes | p50 (ms) | p90 (ms) | mean incl. folds in line (ms) | vs v2 (p50) |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    let mem = vmm::memory::create(MEMORY).unwrap_or_else(|e| fail(&format!("memory: {e}")));
    for (label, n, content) in [
        ("1,000 pages, dirty-like", 1000usize, Content::Sparse),
        ("1,000 pages, noise", 1000, Content::Noise),
        ("64 MiB, dirty-like", 16384, Content::Sparse),
        ("64 MiB, noise", 16384, Content::Noise),
    ] {
        let batches: Vec<StagedPages> = (0..8).map(|e| pages(n, content, e)).collect();
        let ways = ways();
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); ways.len()];
        let mut bytes = vec![0u64; ways.len()];
        let mut sinks: Vec<DirectorySink> = ways
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let dir = root.join(format!("way{i}"));
                let mut s = DirectorySink::open_with(&dir, w.options)
                    .unwrap_or_else(|e| fail(&format!("open {}: {e}", dir.display())));
                s.begin(&manifest())
                    .unwrap_or_else(|e| fail(&e.to_string()));
                s.write_base(&mem, 0, None)
                    .unwrap_or_else(|e| fail(&e.to_string()));
                s
            })
            .collect();
        let mut epoch = 0u64;
        for _ in 0..rounds {
            for (i, sink) in sinks.iter_mut().enumerate() {
                for (k, b) in batches.iter().enumerate() {
                    let c = Checkpoint {
                        epoch: epoch + 1 + k as u64,
                        full: epoch == 0 && k == 0,
                        state: vec![0; 12_000],
                        pages: b.clone(),
                        disks: Vec::new(),
                        console: Default::default(),
                    };
                    let t = Instant::now();
                    let w = sink
                        .write(&c)
                        .unwrap_or_else(|e| fail(&format!("write: {e}")));
                    times[i].push(t.elapsed().as_secs_f64() * 1e3);
                    bytes[i] = w;
                }
            }
            epoch += batches.len() as u64;
        }
        drop(sinks);
        let v2 = stats::median(&times[0]).unwrap_or(f64::NAN);
        for (i, w) in ways.iter().enumerate() {
            let p50 = stats::median(&times[i]).unwrap_or(f64::NAN);
            let p90 = stats::percentile(&times[i], 0.9).unwrap_or(f64::NAN);
            let mean = times[i].iter().sum::<f64>() / times[i].len() as f64;
            println!(
                "| {label} | {} | {} | {p50:.2} | {p90:.2} | {mean:.2} | {:.2}× |",
                w.name,
                bytes[i],
                v2 / p50
            );
        }
        for i in 0..ways.len() {
            let _ = std::fs::remove_dir_all(root.join(format!("way{i}")));
        }
    }
    println!();
}

/// Per-workload sums of table 2.
#[derive(Default)]
struct Sizes {
    checkpoints: u64,
    pages: u64,
    zero: u64,
    raw: u64,
    zero_bits: u64,
    lz4: u64,
    delta: u64,
    lz4_us: f64,
    delta_us: f64,
    decode_us: f64,
}

/// Runs the release binary on `cmdline` for `secs`, stopped with SIGINT (a final
/// checkpoint), into `dir` with raw pages.
fn run_guest(dir: &Path, args: &[&str], secs: u64) -> bool {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mirrorvm"));
    // The large fold bound (the default: the guest's memory size in bytes, or 32
    // files) leaves a chain of several checkpoints to re-encode.
    c.arg("run")
        .args(args)
        .arg("--checkpoint-dir")
        .arg(format!("{},compress=none,fold=large", dir.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let Ok(mut child) = c.spawn() else {
        return false;
    };
    std::thread::sleep(Duration::from_secs(secs));
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe {
            libc::kill(pid, libc::SIGINT);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Re-encodes the chain `dir` holds (table 2).
fn sizes_of_chain(dir: &Path) -> Option<Sizes> {
    let img = std::fs::read(dir.join("memory.img")).ok()?;
    let mut image = img; // the guest's memory as of each checkpoint, rebuilt
    let layout: Vec<(u64, u64)> = vmm::memory::ram_ranges(MEMORY)
        .into_iter()
        .map(|(a, l)| (a.0, l as u64))
        .collect();
    let offset = |gpa: u64| {
        let mut off = 0;
        for &(s, l) in &layout {
            if gpa >= s && gpa < s + l {
                return usize::try_from(off + gpa - s).ok();
            }
            off += l;
        }
        None
    };
    let mut out = Sizes::default();
    let mut buf = Vec::new();
    let max_pages = MEMORY / PAGE_SIZE as u64;
    for (_, path) in list_checkpoints(dir).ok()? {
        let mut f = std::fs::File::open(&path).ok()?;
        let len = f.metadata().ok()?.len();
        let d = format::read(&mut f, len, max_pages).ok()?;
        if d.header.flags & format::FLAG_FULL != 0 {
            // The first checkpoint completes the pre-copy: its pages are not an epoch's.
            for (gpa, p) in d
                .pages
                .addrs
                .iter()
                .zip(d.pages.data.chunks_exact(PAGE_SIZE))
            {
                let o = offset(*gpa)?;
                image[o..o + PAGE_SIZE].copy_from_slice(p);
            }
            continue;
        }
        out.checkpoints += 1;
        out.pages += d.pages.addrs.len() as u64;
        out.raw += (d.pages.addrs.len() * (8 + PAGE_SIZE)) as u64;
        buf.clear();
        let s = pagecodec::encode(&d.pages, Compression::None, &mut buf);
        out.zero += s.zero;
        out.zero_bits += s.bytes;
        buf.clear();
        let t = Instant::now();
        let s = pagecodec::encode(&d.pages, Compression::Lz4, &mut buf);
        out.lz4_us += t.elapsed().as_secs_f64() * 1e6;
        out.lz4 += s.bytes;
        let t = Instant::now();
        let back = pagecodec::decode(&buf, max_pages).ok()?;
        out.decode_us += t.elapsed().as_secs_f64() * 1e6;
        if back != d.pages {
            fail("decode(encode(pages)) differs");
        }
        // XOR against the previous copy, then the same codec (a zero XOR is a bit).
        let t = Instant::now();
        let mut x = d.pages.clone();
        for (gpa, p) in x.addrs.iter().zip(x.data.chunks_exact_mut(PAGE_SIZE)) {
            let o = offset(*gpa)?;
            for (a, b) in p.iter_mut().zip(&image[o..o + PAGE_SIZE]) {
                *a ^= *b;
            }
        }
        buf.clear();
        let s = pagecodec::encode(&x, Compression::Lz4, &mut buf);
        out.delta_us += t.elapsed().as_secs_f64() * 1e6;
        out.delta += s.bytes;
        for (gpa, p) in d
            .pages
            .addrs
            .iter()
            .zip(d.pages.data.chunks_exact(PAGE_SIZE))
        {
            let o = offset(*gpa)?;
            image[o..o + PAGE_SIZE].copy_from_slice(p);
        }
    }
    Some(out)
}

/// Table 2.
fn sizes(root: &Path, secs: u64) {
    println!("## 2. Checkpoint size and codec CPU per workload (the chain left by {secs} s of each run, first checkpoint left out)");
    println!();
    println!("| workload | checkpoints | pages / ckpt | zero pages | raw (v2) / ckpt | zero as bits / ckpt | + lz4 / ckpt | + XOR delta, lz4 / ckpt | lz4 saves | lz4 encode µs / ckpt (MB/s) | decode µs / ckpt | delta encode µs / ckpt |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let dirty = format!("dirty pages_per_ms=40 mb=64 verify=1 seconds={}", secs + 30);
    let dirty_fast = format!(
        "dirty pages_per_ms=400 mb=64 verify=1 seconds={}",
        secs + 30
    );
    let mix = format!("mix seconds={}", secs + 30);
    let idle = format!("counter interval_ms=1000 idle=1 limit={}", secs + 30);
    let workloads: [(&str, Vec<&str>); 4] = [
        (
            "idle (`counter idle=1`)",
            vec!["--memory", "256M", "--cmdline", &idle],
        ),
        (
            "`dirty` 40 pages/ms, 64 MiB",
            vec!["--memory", "256M", "--cmdline", &dirty],
        ),
        (
            "`dirty` 400 pages/ms, 64 MiB",
            vec!["--memory", "256M", "--cmdline", &dirty_fast],
        ),
        (
            "`mix` (2 vCPUs, disk)",
            vec!["--memory", "256M", "--cpus", "2", "--cmdline", &mix],
        ),
    ];
    for (name, args) in workloads {
        let dir = root.join("guest");
        let _ = std::fs::remove_dir_all(&dir);
        let mut args = args;
        let disk = root.join("mix.img");
        let disk_arg = format!("path={},checkpoint=on", disk.display());
        if name.contains("mix") {
            let f = std::fs::File::create(&disk).unwrap_or_else(|e| fail(&e.to_string()));
            f.set_len(16 << 20).unwrap_or_else(|e| fail(&e.to_string()));
            args.push("--disk");
            args.push(&disk_arg);
        }
        if !run_guest(&dir, &args, secs) {
            println!("| {name} | run failed | | | | | | | | | | |");
            continue;
        }
        let Some(s) = sizes_of_chain(&dir) else {
            println!("| {name} | chain unreadable | | | | | | | | | | |");
            continue;
        };
        let n = s.checkpoints.max(1) as f64;
        let kib = |b: u64| format!("{:.1} KiB", b as f64 / n / 1024.0);
        println!(
            "| {name} | {} | {:.0} | {:.1} % | {} | {} | {} | {} | {:.1} % | {:.0} ({:.0}) | {:.0} | {:.0} |",
            s.checkpoints,
            s.pages as f64 / n,
            100.0 * s.zero as f64 / s.pages.max(1) as f64,
            kib(s.raw),
            kib(s.zero_bits),
            kib(s.lz4),
            kib(s.delta),
            100.0 * (1.0 - s.lz4 as f64 / s.raw.max(1) as f64),
            s.lz4_us / n,
            (s.pages * PAGE_SIZE as u64) as f64 / s.lz4_us.max(1e-9),
            s.decode_us / n,
            s.delta_us / n,
        );
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_file(&disk);
    }
    println!();
}

fn main() {
    let rounds: usize = std::env::var("MIRRORVM_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(9);
    let secs: u64 = std::env::var("MIRRORVM_BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let base = std::env::var_os("MIRRORVM_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let root = tempfile::tempdir_in(&base).unwrap_or_else(|e| fail(&e.to_string()));
    println!("mirrorvm export benchmark");
    println!("{}", host::line());
    println!();
    export_times(root.path(), rounds);
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        println!("*** SKIPPED table 2: /dev/kvm is unusable ***");
        return;
    }
    sizes(root.path(), secs);
}
