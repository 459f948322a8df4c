//! Benchmarks of the checkpoint store against plain pwrite/pread on the same file
//! system with the same durability cadence (buffered I/O, fdatasync every
//! `SYNC_EVERY` writes), and the cost of a retire per MiB.
//!
//! Run: `cargo bench -p devices --bench store`. At the end it prints the medians and
//! the ratios store/raw (throughput ratios: higher is better, 1.0 = as fast as raw).
//!
//! * write path: the guest's side only (journal appends and flushes); the cut,
//!   acknowledge and retire at each region's high-water mark run untimed.
//! * steady state: the same, with the cut, acknowledge and retire timed inline on the
//!   same thread (in the VMM the retire runs on another thread, so this is the worst
//!   case): every byte is written twice.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[path = "../../benches/support/stats.rs"]
mod stats;

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use devices::store::{RecoverTo, Store, StoreConfig, WriteOutcome};

const BLOCK: usize = 4096;
const DISK: u64 = 64 << 20;
const CAPACITY: u64 = 16 << 20;
const SYNC_EVERY: u64 = 256;
const BLOCKS: u64 = DISK / BLOCK as u64;
/// Reads that hit a region stay inside what one region holds.
const REGION_SPAN_BLOCKS: u64 = (8 << 20) / BLOCK as u64;

struct Dir {
    _tmp: tempfile::TempDir,
    path: PathBuf,
}

fn dir() -> Dir {
    // The same file system for the raw file and the store.
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().to_owned();
    Dir { _tmp: tmp, path }
}

fn make_image(path: &Path) -> File {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .expect("create image");
    // Allocate every block, as a real disk image would be.
    let chunk = vec![0x5au8; 1 << 20];
    for i in 0..DISK / chunk.len() as u64 {
        f.write_all_at(&chunk, i * chunk.len() as u64).unwrap();
    }
    f.sync_all().unwrap();
    f
}

fn open_store(path: &Path) -> Store {
    open_store_with(path, true)
}

/// A store over a fresh image; `preallocate`: the journal is written with zeros at
/// creation (the default) or left sparse.
fn open_store_with(path: &Path, preallocate: bool) -> Store {
    make_image(path);
    let cfg = StoreConfig {
        slot_count: 2,
        region_capacity: CAPACITY,
        insist_on_capacity: false,
        high_water: None,
        created_epoch: 0,
        preallocate,
    };
    Store::open_path(path, &cfg, RecoverTo::LastAcknowledged)
        .expect("open store")
        .0
}

/// Block number of the `i`th access: sequential or a fixed pseudo-random order.
fn block(i: u64, random: bool, span: u64) -> u64 {
    if random {
        (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 17) % span
    } else {
        i % span
    }
}

struct StoreWriter {
    store: Store,
    epoch: u64,
    n: u64,
    sync_every: u64,
}

impl StoreWriter {
    /// One guest write (plus the flush cadence). Returns the time spent in the cut,
    /// acknowledge and retire this write triggered.
    fn write(&mut self, i: u64, random: bool, data: &[u8]) -> Duration {
        let sector = block(i, random, BLOCKS) * (BLOCK as u64 / 512);
        let mut side = Duration::ZERO;
        loop {
            match self.store.write(sector, data).expect("write") {
                WriteOutcome::Written { end_epoch_early } => {
                    if end_epoch_early {
                        side += self.cut();
                    }
                    break;
                }
                WriteOutcome::Deferred => side += self.cut(),
            }
        }
        self.n += 1;
        if self.n % self.sync_every == 0 {
            self.store.flush().expect("flush");
        }
        side
    }

    fn cut(&mut self) -> Duration {
        let t = Instant::now();
        self.epoch += 1;
        self.store.start_checkpoint(self.epoch).expect("cut");
        self.store.acknowledge(self.epoch).expect("ack");
        self.store.retire(self.epoch).expect("retire");
        t.elapsed()
    }
}

fn writes(c: &mut Criterion) {
    let d = dir();
    let data = vec![0xa5u8; BLOCK];
    let mut g = c.benchmark_group("write4k");
    g.throughput(Throughput::Bytes(BLOCK as u64));
    for random in [false, true] {
        let pattern = if random { "random" } else { "seq" };
        let raw = make_image(&d.path.join("raw.img"));
        let mut n = 0u64;
        g.bench_function(BenchmarkId::new("raw", pattern), |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                for _ in 0..iters {
                    let off = block(n, random, BLOCKS) * BLOCK as u64;
                    raw.write_all_at(&data, off).unwrap();
                    n += 1;
                    if n % SYNC_EVERY == 0 {
                        raw.sync_data().unwrap();
                    }
                }
                t.elapsed()
            })
        });
        drop(raw);
        for steady in [false, true] {
            let name = if steady {
                "store_steady"
            } else {
                "store_write_path"
            };
            let mut w = StoreWriter {
                store: open_store(&d.path.join(format!("{name}-{pattern}.img"))),
                epoch: 0,
                n: 0,
                sync_every: SYNC_EVERY,
            };
            let mut i = 0u64;
            g.bench_function(BenchmarkId::new(name, pattern), |b| {
                b.iter_custom(|iters| {
                    let t = Instant::now();
                    let mut side = Duration::ZERO;
                    for _ in 0..iters {
                        side += w.write(i, random, &data);
                        i += 1;
                    }
                    let all = t.elapsed();
                    if steady {
                        all
                    } else {
                        all - side
                    }
                })
            });
        }
    }
    g.finish();
}

fn reads(c: &mut Criterion) {
    let d = dir();
    let mut g = c.benchmark_group("read4k");
    g.throughput(Throughput::Bytes(BLOCK as u64));
    let raw = make_image(&d.path.join("raw.img"));
    let base = open_store(&d.path.join("base.img"));
    // A store whose first REGION_SPAN_BLOCKS blocks are all in the active region.
    let mut region = open_store(&d.path.join("region.img"));
    let data = vec![0xa5u8; BLOCK];
    for i in 0..REGION_SPAN_BLOCKS {
        let o = region.write(i * 8, &data).expect("fill");
        assert!(matches!(o, WriteOutcome::Written { .. }));
    }
    region.flush().unwrap();
    let mut buf = vec![0u8; BLOCK];
    for random in [false, true] {
        let pattern = if random { "random" } else { "seq" };
        let span = REGION_SPAN_BLOCKS;
        let mut n = 0u64;
        g.bench_function(BenchmarkId::new("raw", pattern), |b| {
            b.iter(|| {
                let off = block(n, random, span) * BLOCK as u64;
                raw.read_exact_at(&mut buf, off).unwrap();
                n += 1;
            })
        });
        g.bench_function(BenchmarkId::new("store_base_hit", pattern), |b| {
            b.iter(|| {
                base.read(block(n, random, span) * 8, &mut buf).unwrap();
                n += 1;
            })
        });
        g.bench_function(BenchmarkId::new("store_region_hit", pattern), |b| {
            b.iter(|| {
                region.read(block(n, random, span) * 8, &mut buf).unwrap();
                n += 1;
            })
        });
    }
    g.finish();
}

const RETIRE_MIB: u64 = 8;

fn retire(c: &mut Criterion) {
    let d = dir();
    let mut g = c.benchmark_group("retire");
    g.throughput(Throughput::Bytes(RETIRE_MIB << 20));
    g.sample_size(20);
    let data = vec![0xa5u8; BLOCK];
    for random in [false, true] {
        let pattern = if random { "random" } else { "seq" };
        let mut w = StoreWriter {
            store: open_store(&d.path.join(format!("retire-{pattern}.img"))),
            epoch: 0,
            n: 0,
            sync_every: SYNC_EVERY,
        };
        let mut i = 0u64;
        g.bench_function(BenchmarkId::new("8MiB", pattern), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    for _ in 0..(RETIRE_MIB << 20) / BLOCK as u64 {
                        let sector = block(i, random, BLOCKS) * 8;
                        let o = w.store.write(sector, &data).expect("write");
                        assert!(matches!(o, WriteOutcome::Written { .. }));
                        i += 1;
                    }
                    w.epoch += 1;
                    w.store.start_checkpoint(w.epoch).unwrap();
                    w.store.acknowledge(w.epoch).unwrap();
                    let t = Instant::now();
                    w.store.retire(w.epoch).unwrap();
                    total += t.elapsed();
                }
                total
            })
        });
    }
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(1500))
        .measurement_time(Duration::from_secs(4))
        .output_directory(&output_dir())
        .configure_from_args()
}

fn output_dir() -> PathBuf {
    std::env::var_os("CRITERION_HOME")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("CARGO_TARGET_DIR").map(|t| PathBuf::from(t).join("criterion"))
        })
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/criterion"))
}

/// The median time per iteration of a finished benchmark, from criterion's output.
fn median_ns(group: &str, func: &str, param: &str) -> Option<f64> {
    let p = output_dir()
        .join(group)
        .join(func)
        .join(param)
        .join("new/estimates.json");
    let s = std::fs::read_to_string(p).ok()?;
    let at = s.find("\"median\"")?;
    let rest = &s[at..];
    let pe = rest.find("\"point_estimate\":")? + "\"point_estimate\":".len();
    let num: String = rest[pe..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '-' | '+'))
        .collect();
    num.parse().ok()
}

fn summary() {
    let mib_s = |ns: f64, bytes: f64| bytes / ns * 1e9 / f64::from(1 << 20);
    println!("\n| benchmark | median per op | MiB/s | ratio to raw | goal |");
    println!("| --- | --- | --- | --- | --- |");
    for pattern in ["seq", "random"] {
        let raw = median_ns("write4k", "raw", pattern);
        for (name, label, goal) in [
            ("raw", "raw pwrite", ""),
            ("store_write_path", "store write path", ">= 0.9"),
            ("store_steady", "store steady state incl. retire", ">= 0.45"),
        ] {
            if let Some(ns) = median_ns("write4k", name, pattern) {
                let ratio = raw.map(|r| format!("{:.2}", r / ns)).unwrap_or_default();
                println!(
                    "| {pattern} 4 KiB writes: {label} | {:.2} µs | {:.0} | {ratio} | {goal} |",
                    ns / 1e3,
                    mib_s(ns, BLOCK as f64)
                );
            }
        }
    }
    for pattern in ["seq", "random"] {
        let raw = median_ns("read4k", "raw", pattern);
        for (name, label, goal) in [
            ("raw", "raw pread", ""),
            ("store_base_hit", "store, hits the base", ">= 0.95"),
            ("store_region_hit", "store, hits a region", ">= 0.9"),
        ] {
            if let Some(ns) = median_ns("read4k", name, pattern) {
                let ratio = raw.map(|r| format!("{:.2}", r / ns)).unwrap_or_default();
                println!(
                    "| {pattern} 4 KiB reads: {label} | {:.2} µs | {:.0} | {ratio} | {goal} |",
                    ns / 1e3,
                    mib_s(ns, BLOCK as f64)
                );
            }
        }
    }
    for pattern in ["seq", "random"] {
        if let Some(ns) = median_ns("retire", "8MiB", pattern) {
            println!(
                "| retire of 8 MiB written as {pattern} 4 KiB blocks | {:.2} ms per MiB | {:.0} | | |",
                ns / 1e6 / RETIRE_MIB as f64,
                mib_s(ns, (RETIRE_MIB << 20) as f64)
            );
        }
    }
}

/// Median nanoseconds per operation of `a` and of `b`, measured in alternating
/// batches so that drift of this (noisy, nested-virtualised) machine hits both alike.
/// Each closure runs one batch of `batch` operations and returns the time to count.
fn paired(
    rounds: usize,
    batch: u64,
    mut a: impl FnMut(u64) -> Duration,
    mut b: impl FnMut(u64) -> Duration,
) -> (f64, f64) {
    let (mut ta, mut tb) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        // Alternate which goes first too.
        if r % 2 == 0 {
            ta.push(a(batch).as_nanos() as f64 / batch as f64);
            tb.push(b(batch).as_nanos() as f64 / batch as f64);
        } else {
            tb.push(b(batch).as_nanos() as f64 / batch as f64);
            ta.push(a(batch).as_nanos() as f64 / batch as f64);
        }
    }
    (median(&ta), median(&tb))
}

type Timed<'a> = Box<dyn FnMut(u64) -> (Duration, Duration) + 'a>;

/// Runs each closure's batch in turn, `rounds` times, rotating which goes first.
/// Each returns two durations (e.g. without and with side work); returns them all.
fn interleaved(
    rounds: usize,
    batch: u64,
    fns: &mut [Timed<'_>],
) -> Vec<(Vec<Duration>, Vec<Duration>)> {
    let mut out = vec![(Vec::new(), Vec::new()); fns.len()];
    for r in 0..rounds {
        for k in 0..fns.len() {
            let i = (r + k) % fns.len();
            let (a, b) = fns[i](batch);
            out[i].0.push(a);
            out[i].1.push(b);
        }
    }
    out
}

/// The median of a non-empty set of timings.
fn median(v: &[f64]) -> f64 {
    stats::median(v).expect("no timings")
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

fn row(label: &str, store_ns: f64, raw_ns: f64, goal: &str) {
    println!(
        "| {label} | {:.2} µs | {:.2} µs | {:.2} | {goal} |",
        store_ns / 1e3,
        raw_ns / 1e3,
        raw_ns / store_ns
    );
}

/// The paired comparisons: the table for the README.
fn paired_table() {
    let d = dir();
    let data = vec![0xa5u8; BLOCK];
    println!("\nPaired medians (alternating batches; ratio = raw time / store time, higher is better):\n");
    println!("| operation | store | raw | ratio | goal |");
    println!("| --- | --- | --- | --- | --- |");
    // Writes: raw, a store with a preallocated journal and one with a sparse journal,
    // in rotating batches of 4 sync periods, so that all three see the same disk
    // (this machine's fdatasync latency swings by 5x from minute to minute).
    let batch = 4 * SYNC_EVERY;
    for (random, sync) in [(false, true), (true, true), (false, false)] {
        let pattern = if random { "random" } else { "sequential" };
        let every = if sync { SYNC_EVERY } else { u64::MAX };
        let cadence = if sync {
            ""
        } else {
            ", never synced (page cache only)"
        };
        let raw = make_image(&d.path.join(format!("p-raw-{pattern}-{sync}.img")));
        let mut rn = 0u64;
        let raw_batch = |n: u64| {
            let t = Instant::now();
            for _ in 0..n {
                raw.write_all_at(&data, block(rn, random, BLOCKS) * BLOCK as u64)
                    .unwrap();
                rn += 1;
                if rn % every == 0 {
                    raw.sync_data().unwrap();
                }
            }
            let e = t.elapsed();
            (e, e)
        };
        let writer = |preallocate: bool| StoreWriter {
            store: open_store_with(
                &d.path
                    .join(format!("p-store-{pattern}-{sync}-{preallocate}.img")),
                preallocate,
            ),
            epoch: 0,
            n: 0,
            sync_every: every,
        };
        let data = &data;
        let batch_fn = |mut w: StoreWriter| {
            let mut i = 0u64;
            move |n: u64| {
                let t = Instant::now();
                let mut side = Duration::ZERO;
                for _ in 0..n {
                    side += w.write(i, random, data);
                    i += 1;
                }
                let all = t.elapsed();
                (all - side, all)
            }
        };
        let mut fns: Vec<Timed<'_>> = vec![Box::new(raw_batch), Box::new(batch_fn(writer(true)))];
        if sync {
            fns.push(Box::new(batch_fn(writer(false))));
        }
        let t = interleaved(if sync { 240 } else { 600 }, batch, &mut fns);
        let per_op = |v: &[Duration]| -> Vec<f64> {
            v.iter()
                .map(|d| d.as_nanos() as f64 / batch as f64)
                .collect()
        };
        let raw_path = per_op(&t[0].0);
        for (k, journal) in [(1, ""), (2, ", sparse journal")] {
            if k >= t.len() {
                continue;
            }
            row(
                &format!("{pattern} 4 KiB writes{cadence}{journal}: write path (medians)"),
                median(&per_op(&t[k].0)),
                median(&raw_path),
                ">= 0.9",
            );
            if sync {
                row(
                    &format!(
                        "{pattern} 4 KiB writes{journal}: steady state, cut+ack+retire inline (means)"
                    ),
                    mean(&per_op(&t[k].1)),
                    mean(&raw_path),
                    ">= 0.45",
                );
            }
        }
    }
    // Reads. Two raw baselines: `raw_large` laid out by 1 MiB writes (like the base
    // images), and `raw_small` whose blocks were written by 4 KiB writes (like the
    // store's regions). Linux caches the first in large folios, which makes 4 KiB
    // reads from it markedly cheaper; the journal's records never get those.
    let raw_large = make_image(&d.path.join("p-raw-large.img"));
    let raw_small = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(d.path.join("p-raw-small.img"))
        .unwrap();
    raw_small.set_len(DISK).unwrap();
    for i in 0..REGION_SPAN_BLOCKS {
        raw_small.write_all_at(&data, i * BLOCK as u64).unwrap();
    }
    let base = open_store(&d.path.join("p-base.img"));
    let mut region = open_store(&d.path.join("p-region.img"));
    for i in 0..REGION_SPAN_BLOCKS {
        let o = region.write(i * 8, &data).expect("fill");
        assert!(matches!(o, WriteOutcome::Written { .. }));
    }
    let mut sparse = open_store_with(&d.path.join("p-sparse.img"), false);
    for i in 0..REGION_SPAN_BLOCKS {
        let o = sparse.write(i * 8, &data).expect("fill");
        assert!(matches!(o, WriteOutcome::Written { .. }));
    }
    let mut frozen = open_store(&d.path.join("p-frozen.img"));
    for i in 0..REGION_SPAN_BLOCKS {
        let o = frozen.write(i * 8, &data).expect("fill");
        assert!(matches!(o, WriteOutcome::Written { .. }));
    }
    frozen.start_checkpoint(1).unwrap();
    let mut buf = vec![0u8; BLOCK];
    let mut buf2 = vec![0u8; BLOCK];
    for random in [false, true] {
        let pattern = if random { "random" } else { "sequential" };
        for (label, store, raw, raw_label, goal) in [
            (
                "hit the base",
                &base,
                &raw_large,
                "1 MiB-written raw file",
                ">= 0.95",
            ),
            (
                "hit the active region",
                &region,
                &raw_small,
                "4 KiB-written raw file",
                ">= 0.9",
            ),
            (
                "hit the frozen region",
                &frozen,
                &raw_small,
                "4 KiB-written raw file",
                ">= 0.9",
            ),
            (
                "hit the active region",
                &region,
                &raw_large,
                "1 MiB-written raw file",
                ">= 0.9",
            ),
            (
                "hit the active region of a sparse journal",
                &sparse,
                &raw_small,
                "4 KiB-written raw file",
                ">= 0.9",
            ),
            (
                "hit the active region of a sparse journal",
                &sparse,
                &raw_large,
                "1 MiB-written raw file",
                ">= 0.9",
            ),
        ] {
            let mut rn = 0u64;
            let mut sn = 0u64;
            let (raw_ns, store_ns) = paired(
                200,
                2000,
                |n| {
                    let t = Instant::now();
                    for _ in 0..n {
                        raw.read_exact_at(
                            &mut buf,
                            block(rn, random, REGION_SPAN_BLOCKS) * BLOCK as u64,
                        )
                        .unwrap();
                        rn += 1;
                    }
                    t.elapsed()
                },
                |n| {
                    let t = Instant::now();
                    for _ in 0..n {
                        store
                            .read(block(sn, random, REGION_SPAN_BLOCKS) * 8, &mut buf2)
                            .unwrap();
                        sn += 1;
                    }
                    t.elapsed()
                },
            );
            row(
                &format!("{pattern} 4 KiB reads that {label} (vs {raw_label})"),
                store_ns,
                raw_ns,
                goal,
            );
        }
    }
}

criterion_group! {
    name = benches;
    config = config();
    targets = writes, reads, retire
}

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    summary();
    paired_table();
}
