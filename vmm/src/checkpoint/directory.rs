//! Checkpoints in a local directory: the [`DirectorySink`] that `--checkpoint-dir`
//! writes and the [`DirectorySource`] that `mirrorvm restore --from` reads. Layout
//! and crash rules are specified in `docs/checkpoint-format.md`:
//!
//! ```text
//! DIR/machine.json         the manifest (written once, at begin)
//! DIR/memory.img           guest memory as of memory.epoch (regions back to back)
//! DIR/memory.epoch         the epoch memory.img holds
//! DIR/ckpt-<epoch>.mvc     checkpoint files after it (format: `super::format`)
//! DIR/finished             present when the guest ended its run itself
//! ```
//!
//! Each page of a checkpoint is written once, into its checkpoint file (zero pages as
//! a bit, the others lz4-compressed unless the sink is told otherwise): the files
//! after `memory.epoch` form a chain that a restore replays over the image. Only when
//! the chain grows past a bound ([`FoldPolicy`]) is it folded into `memory.img`, each
//! page's newest copy once, on a thread of its own while the next checkpoints are
//! written.
//!
//! The directory shares the disks' journals (they live beside their images on the
//! same host), so its checkpoints carry region metadata only
//! ([`StorageMode::Shared`]): a restore recovers each journal to the checkpoint's
//! epoch.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::format::{self, FormatError};
use super::pagecodec::Compression;
use super::replay::{self, ReplayFault};
use super::sink::{CheckpointSink, SinkEnd, SinkError, StorageMode};
use super::source::{CheckpointSource, Restored, SourceError};
use super::{Checkpoint, ContentError, Manifest};
use crate::dirty::{StagedPages, PAGE_SIZE};
use crate::memory::{self, GuestMemory, MemoryError};

/// Failures reading or writing a checkpoint directory.
#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    /// An I/O error on a file or the directory.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A checkpoint file is malformed.
    #[error("{path}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        source: FormatError,
    },
    /// A page batch's content is corrupt (an lz4 block that does not expand to one
    /// page).
    #[error("corrupt page section")]
    Pages(#[from] super::pagecodec::CodecError),
    /// A checkpoint's content does not fit the machine.
    #[error("{path}")]
    Content {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        source: ContentError,
    },
    /// The manifest cannot be read or written.
    #[error("manifest {path}")]
    Manifest {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: serde_json::Error,
    },
    /// The directory is locked by another process.
    #[error("checkpoint directory {path}")]
    Locked {
        /// The directory.
        path: PathBuf,
        /// Who holds it.
        source: devices::lock::LockError,
    },
    /// The guest of this chain ended its run itself.
    #[error("{dir}: the guest ended that run itself ({how}); there is nothing to resume, and its disks hold its final state")]
    Finished {
        /// The directory.
        dir: PathBuf,
        /// How it ended.
        how: String,
    },
    /// A checkpoint file's name and header disagree.
    #[error("{path}: the header says epoch {header}, the name says {name}")]
    EpochMismatch {
        /// The file.
        path: PathBuf,
        /// Epoch in the header.
        header: u64,
        /// Epoch in the name.
        name: u64,
    },
    /// The directory holds no complete checkpoint.
    #[error("{0}: no complete checkpoint")]
    NoCheckpoint(PathBuf),
    /// A checkpoint between the memory image and the latest is missing.
    #[error("{dir}: checkpoint {epoch} is missing (the chain from the memory image at epoch {base} is broken)")]
    Gap {
        /// The directory.
        dir: PathBuf,
        /// Missing epoch.
        epoch: u64,
        /// Epoch of the memory image.
        base: u64,
    },
    /// The memory image does not match the manifest's memory size.
    #[error("{path}: memory image is {actual} bytes, the checkpoint's guest has {expected}")]
    ImageSize {
        /// The image.
        path: PathBuf,
        /// Guest memory size.
        expected: u64,
        /// Image size.
        actual: u64,
    },
    /// A checkpoint was written before the manifest.
    #[error("{0}: a checkpoint was offered before the manifest")]
    NotBegun(PathBuf),
    /// Guest memory for the restore could not be created.
    #[error("cannot allocate the restored guest's memory")]
    Memory(#[source] MemoryError),
    /// The thread that folds the chain into the image could not be started.
    #[error("cannot start the thread that folds checkpoints into the memory image")]
    FoldThread(#[source] std::io::Error),
}

/// A checkpoint file larger than this is rewritten without its pages once a fold
/// has put them into the image (it stays for its machine state): a restore then
/// reads its state, not megabytes of pages it would skip.
const STATE_ONLY_ABOVE: u64 = 256 << 10;

/// When the chain of checkpoint files after `memory.img` is folded into it. The
/// fold writes each page's newest copy once and syncs the image; until then a
/// checkpoint's pages live in its file only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FoldPolicy {
    /// Fold once the chain's files hold more than this many bytes.
    pub max_bytes: u64,
    /// Fold once the chain has more than this many files.
    pub max_files: usize,
    /// Fold once the chain holds more than this many distinct pages (a restore
    /// writes each of them once).
    pub max_pages: u64,
}

impl FoldPolicy {
    /// Fold after every checkpoint (the version 2 behaviour: every page is written
    /// twice, once in its file and once in the image).
    pub const EVERY: FoldPolicy = FoldPolicy {
        max_bytes: 0,
        max_files: 0,
        max_pages: 0,
    };

    /// `fold=small`, the default: bounds what a restore replays whatever the guest's
    /// size: 2,048 distinct pages (8 MiB to write into the restored guest's memory),
    /// 8 MiB of files (to read and check) and 32 files, plus what was written while
    /// the last fold ran. A restore of such a chain costs milliseconds (`cargo bench
    /// --bench boot`); the price is a fold every checkpoint or few for a guest that
    /// writes more than that per checkpoint, on the fold's own thread, beside the
    /// exports (`docs/checkpoint-format.md`).
    pub const SMALL: FoldPolicy = FoldPolicy {
        max_bytes: 8 << 20,
        max_files: 32,
        max_pages: 2048,
    };

    /// `fold=large`: as many chain bytes as the guest has memory (at least 16 MiB, at
    /// most 4 GiB), or 32 files, whichever comes first, with no bound on pages. A
    /// busy guest folds rarely (less disk and CPU beside it); a restore may read up
    /// to the memory's size of files, decoding each page's newest copy only.
    pub fn by_memory(memory: u64) -> FoldPolicy {
        FoldPolicy {
            max_bytes: memory.clamp(16 << 20, 4 << 30),
            max_files: 32,
            max_pages: u64::MAX,
        }
    }

    /// The policy `fold` names, for a guest of `memory` bytes.
    pub fn for_guest(fold: Fold, memory: u64) -> FoldPolicy {
        match fold {
            Fold::Small => FoldPolicy::SMALL,
            Fold::Large => FoldPolicy::by_memory(memory),
        }
    }
}

/// Which fold bound a checkpoint directory keeps (`--checkpoint-dir DIR,fold=`):
/// a trade between the work of folding (on its own thread) and the cost of a
/// restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fold {
    /// [`FoldPolicy::SMALL`]: restores in milliseconds, busy guests fold often.
    #[default]
    Small,
    /// [`FoldPolicy::by_memory`]: rare folds, slower restores of busy guests.
    Large,
}

impl std::str::FromStr for Fold {
    type Err = DirSpecError;

    fn from_str(v: &str) -> Result<Self, Self::Err> {
        match v {
            "small" => Ok(Fold::Small),
            "large" => Ok(Fold::Large),
            _ => Err(DirSpecError::Fold(v.to_string())),
        }
    }
}

/// How a [`DirectorySink`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DirectoryOptions {
    /// How pages that are not all zeros are stored.
    pub compression: Compression,
    /// When the chain is folded into the image: [`FoldPolicy::for_guest`] of this,
    /// once the guest's memory size is known.
    pub fold: Fold,
    /// A bound of its own instead of `fold`'s (tests and benchmarks).
    pub policy: Option<FoldPolicy>,
    /// Fold in line, inside the write of the checkpoint that passed the bound,
    /// instead of on a thread of its own beside the exports (the default). Only a
    /// benchmark of the old way wants this.
    pub fold_in_line: bool,
}

/// A `--checkpoint-dir` value that cannot be parsed.
#[derive(Debug, thiserror::Error)]
pub enum DirSpecError {
    /// No directory before the options.
    #[error("no directory given")]
    NoDirectory,
    /// An option other than `compress=` and `fold=`.
    #[error("unknown option {0:?} (expected compress=lz4|none or fold=small|large)")]
    Unknown(String),
    /// A `fold=` value other than small or large.
    #[error("unknown fold bound {0:?}: expected small or large")]
    Fold(String),
    /// A `compress=` value other than lz4 or none.
    #[error(transparent)]
    Compression(#[from] super::pagecodec::UnknownCompression),
}

/// Parses `DIR[,compress=lz4|none][,fold=small|large]`: the directory is
/// everything before the first comma.
pub fn parse_dir_spec(spec: &str) -> Result<crate::config::DirectoryConfig, DirSpecError> {
    let mut parts = spec.split(',');
    let dir = parts
        .next()
        .filter(|d| !d.is_empty())
        .ok_or(DirSpecError::NoDirectory)?;
    let mut compression = Compression::default();
    let mut fold = Fold::default();
    for opt in parts {
        let opt = opt.trim();
        if let Some(v) = opt.strip_prefix("compress=") {
            compression = v.parse()?;
        } else if let Some(v) = opt.strip_prefix("fold=") {
            fold = v.parse()?;
        } else {
            return Err(DirSpecError::Unknown(opt.to_string()));
        }
    }
    Ok(crate::config::DirectoryConfig {
        path: PathBuf::from(dir),
        compression,
        fold,
    })
}

impl From<DirectoryError> for SinkError {
    fn from(e: DirectoryError) -> Self {
        SinkError::failed(e)
    }
}

impl From<DirectoryError> for SourceError {
    fn from(e: DirectoryError) -> Self {
        SourceError::Unreadable(Box::new(e))
    }
}

fn io<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> DirectoryError + 'a {
    move |source| DirectoryError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Name of a checkpoint file.
pub fn checkpoint_name(epoch: u64) -> String {
    format!("ckpt-{epoch:020}.mvc")
}

const MANIFEST: &str = "machine.json";
const MEMORY_IMAGE: &str = "memory.img";
const MEMORY_EPOCH: &str = "memory.epoch";
/// Present when the guest of the chain ended the run itself: nothing to resume.
const FINISHED: &str = "finished";

fn sync_dir(dir: &Path) -> Result<(), DirectoryError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("cannot sync directory", dir))
}

/// Writes `bytes` to `dir/name` through a synced temporary file and a rename.
fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), DirectoryError> {
    let tmp = dir.join(format!("{name}.tmp"));
    let dst = dir.join(name);
    let mut f = File::create(&tmp).map_err(io("cannot create", &tmp))?;
    f.write_all(bytes).map_err(io("cannot write", &tmp))?;
    f.sync_all().map_err(io("cannot sync", &tmp))?;
    fs::rename(&tmp, &dst).map_err(io("cannot rename", &tmp))?;
    sync_dir(dir)
}

/// Offset in `memory.img` of guest address `gpa`: regions are stored back to back.
fn image_offset(layout: &[(u64, u64)], gpa: u64) -> Option<u64> {
    let mut off = 0;
    for &(start, len) in layout {
        if gpa >= start && gpa < start + len {
            return Some(off + gpa - start);
        }
        off += len;
    }
    None
}

fn layout_of(memory: u64) -> Vec<(u64, u64)> {
    memory::ram_ranges(memory)
        .into_iter()
        .map(|(a, l)| (a.0, l as u64))
        .collect()
}

/// The checkpoint files in `dir`, by epoch.
pub fn list_checkpoints(dir: &Path) -> Result<Vec<(u64, PathBuf)>, DirectoryError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io("cannot read directory", dir))? {
        let entry = entry.map_err(io("cannot read directory", dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(num) = name
            .strip_prefix("ckpt-")
            .and_then(|n| n.strip_suffix(".mvc"))
        {
            if num.len() == 20 && num.bytes().all(|b| b.is_ascii_digit()) {
                if let Ok(e) = num.parse::<u64>() {
                    out.push((e, entry.path()));
                }
            }
        }
    }
    out.sort();
    Ok(out)
}

fn check_not_finished(dir: &Path) -> Result<(), DirectoryError> {
    match fs::read_to_string(dir.join(FINISHED)) {
        Ok(how) => Err(DirectoryError::Finished {
            dir: dir.to_path_buf(),
            how: how.trim().to_string(),
        }),
        Err(_) => Ok(()),
    }
}

/// Removes every checkpoint file of `dir` before `epoch`; returns how many.
fn remove_older(dir: &Path, epoch: u64) -> Result<usize, DirectoryError> {
    let mut removed = 0;
    for (e, path) in list_checkpoints(dir)? {
        if e < epoch {
            fs::remove_file(&path).map_err(io("cannot remove", &path))?;
            removed += 1;
        }
    }
    Ok(removed)
}

fn lock(dir: &Path) -> Result<devices::lock::DirLock, DirectoryError> {
    devices::lock::lock_dir(dir).map_err(|source| DirectoryError::Locked {
        path: dir.to_path_buf(),
        source,
    })
}

/// The sink of `--checkpoint-dir`: a directory holding `memory.img` (guest memory as
/// of `memory.epoch`) and the checkpoint files after it. The directory is locked for
/// the life of the sink, so two runs never write one chain.
pub struct DirectorySink {
    dir: PathBuf,
    layout: Option<Vec<(u64, u64)>>,
    options: DirectoryOptions,
    fold: FoldPolicy,
    /// The epoch `memory.img` holds (`memory.epoch`), once there is a base.
    base: Option<u64>,
    /// Files and bytes of the chain after the base.
    chain_files: usize,
    chain_bytes: u64,
    /// The chain's distinct pages: a bit per page of the image, and their count.
    chain_pages: Vec<u64>,
    chain_distinct: u64,
    /// The encoded page batch of the checkpoint being written, kept for reuse.
    scratch: Vec<u8>,
    /// The fold running on its own thread, if any.
    folding: Option<FoldInFlight>,
    /// The last fold failed: fold at the next checkpoint whatever the bound says.
    refold: bool,
    _lock: devices::lock::DirLock,
}

impl DirectorySink {
    /// A sink writing into `dir` (created if missing, then locked), with the
    /// default options (lz4, the default fold policy).
    pub fn open(dir: &Path) -> Result<Self, DirectoryError> {
        Self::open_with(dir, DirectoryOptions::default())
    }

    /// A sink writing into `dir` (created if missing, then locked) as `options` say.
    pub fn open_with(dir: &Path, options: DirectoryOptions) -> Result<Self, DirectoryError> {
        fs::create_dir_all(dir).map_err(io("cannot create checkpoint directory", dir))?;
        let lock = lock(dir)?;
        Ok(DirectorySink {
            dir: dir.to_path_buf(),
            layout: None,
            options,
            // Replaced at `begin`, once the guest's memory size is known.
            fold: options.policy.unwrap_or(FoldPolicy::SMALL),
            base: None,
            chain_files: 0,
            chain_bytes: 0,
            chain_pages: Vec::new(),
            chain_distinct: 0,
            scratch: Vec::new(),
            folding: None,
            refold: false,
            _lock: lock,
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Forgets the chain's counts (and a pending refold): a new base holds
    /// everything, or a fold now running will.
    fn reset_chain(&mut self) {
        self.refold = false;
        self.chain_files = 0;
        self.chain_bytes = 0;
        self.chain_pages.iter_mut().for_each(|w| *w = 0);
        self.chain_distinct = 0;
    }

    /// Counts the pages of a checkpoint just added to the chain; those already in
    /// it count once.
    fn count_pages(&mut self, addrs: &[u64]) {
        let Some(layout) = self.layout.as_deref() else {
            return;
        };
        let total: u64 = layout.iter().map(|(_, l)| l).sum();
        let words = crate::arch::to_usize((total / PAGE_SIZE as u64).div_ceil(64));
        if self.chain_pages.len() != words {
            self.chain_pages = vec![0; words];
        }
        for gpa in addrs {
            // A page outside memory was refused when the file was written.
            if let Some(off) = image_offset(layout, *gpa) {
                let idx = crate::arch::to_usize(off / PAGE_SIZE as u64);
                let (w, bit) = (idx / 64, 1u64 << (idx % 64));
                if self.chain_pages[w] & bit == 0 {
                    self.chain_pages[w] |= bit;
                    self.chain_distinct += 1;
                }
            }
        }
    }

    /// Makes every earlier chain unrestorable, then removes its files.
    fn clear_chain(&self) -> Result<(), DirectoryError> {
        let mut removed = 0;
        for name in [MEMORY_EPOCH, FINISHED] {
            let p = self.dir.join(name);
            match fs::remove_file(&p) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("cannot remove", &p)(e)),
            }
        }
        removed += remove_older(&self.dir, u64::MAX)?;
        // Nothing removed (the base after `begin` cleared it): nothing to sync.
        if removed == 0 {
            return Ok(());
        }
        sync_dir(&self.dir)
    }

    fn layout(&self) -> Result<&[(u64, u64)], DirectoryError> {
        self.layout
            .as_deref()
            .ok_or_else(|| DirectoryError::NotBegun(self.dir.clone()))
    }

    fn write_base_inner(&mut self, mem: &GuestMemory, epoch: u64) -> Result<u64, DirectoryError> {
        // A fold of the old chain must not write into the new image.
        self.settle();
        self.clear_chain()?;
        let tmp = self.dir.join("memory.img.tmp");
        let img = self.dir.join(MEMORY_IMAGE);
        let f = File::create(&tmp).map_err(io("cannot create", &tmp))?;
        let total: u64 = mem.iter().map(|r| r.len()).sum();
        f.set_len(total).map_err(io("cannot size", &tmp))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut off = 0u64;
        let mut written = 0u64;
        let mut progress =
            crate::progress::Progress::new(format!("pre-copy to {}", self.dir.display()), total);
        for r in mem.iter() {
            let mut done = 0u64;
            while done < r.len() {
                let n = crate::arch::to_usize((r.len() - done).min(buf.len() as u64));
                let gpa = r.start_addr().0 + done;
                mem.read_slice(&mut buf[..n], GuestAddress(gpa))
                    .map_err(|_| DirectoryError::Content {
                        path: tmp.clone(),
                        source: ContentError::PageOutside(gpa),
                    })?;
                // All-zero MiB are left as holes.
                if buf[..n].iter().any(|b| *b != 0) {
                    f.write_all_at(&buf[..n], off + done)
                        .map_err(io("cannot write", &tmp))?;
                    written += n as u64;
                }
                done += n as u64;
                progress.add(n as u64);
            }
            off += r.len();
        }
        progress.finish();
        f.sync_all().map_err(io("cannot sync", &tmp))?;
        fs::rename(&tmp, &img).map_err(io("cannot rename", &tmp))?;
        write_atomic(&self.dir, MEMORY_EPOCH, format!("{epoch}\n").as_bytes())?;
        self.base = Some(epoch);
        self.reset_chain();
        Ok(written)
    }

    fn write_base_pages_inner(&mut self, pages: &StagedPages) -> Result<u64, DirectoryError> {
        self.write_pages_in_place(&self.dir.join(MEMORY_IMAGE), pages)?;
        Ok(pages.data.len() as u64)
    }

    /// Writes `pages` into the memory image `img` at their places and syncs it.
    fn write_pages_in_place(&self, img: &Path, pages: &StagedPages) -> Result<(), DirectoryError> {
        let layout = self.layout()?;
        let f = OpenOptions::new()
            .write(true)
            .open(img)
            .map_err(io("cannot open", img))?;
        for (gpa, page) in pages.addrs.iter().zip(pages.data.chunks_exact(PAGE_SIZE)) {
            let off = image_offset(layout, *gpa).ok_or_else(|| DirectoryError::Content {
                path: img.to_path_buf(),
                source: ContentError::PageOutside(*gpa),
            })?;
            f.write_all_at(page, off).map_err(io("cannot write", img))?;
        }
        f.sync_data().map_err(io("cannot sync", img))
    }

    fn write_inner(&mut self, c: &Checkpoint) -> Result<u64, DirectoryError> {
        let name = checkpoint_name(c.epoch);
        let tmp = self.dir.join(format!("{name}.tmp"));
        let dst = self.dir.join(&name);
        let file = File::create(&tmp).map_err(io("cannot create", &tmp))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
        let written = format::write(&mut w, c, self.options.compression, &mut self.scratch)
            .map_err(io("cannot write", &tmp))?;
        let f = w.into_inner().map_err(|e| DirectoryError::Io {
            what: "cannot write",
            path: tmp.clone(),
            source: e.into_error(),
        })?;
        f.sync_all().map_err(io("cannot sync", &tmp))?;
        fs::rename(&tmp, &dst).map_err(io("cannot rename", &tmp))?;
        sync_dir(&self.dir)?;
        // Complete. A retried write of the same epoch replaces its file: count it once.
        if self.base.is_some_and(|b| c.epoch > b) {
            self.chain_files += 1;
            self.chain_bytes += written.bytes;
            self.count_pages(&c.pages.addrs);
        }
        self.poll_fold();
        let over = self.chain_files > self.fold.max_files
            || self.chain_bytes > self.fold.max_bytes
            || self.chain_distinct > self.fold.max_pages;
        if self.folding.is_some() && self.chain_files > self.fold.max_files {
            // Folds fall behind: wait for this one rather than let the chain, and
            // with it a restore, grow without bound.
            self.settle();
        }
        if self.folding.is_none() && (over || self.refold) {
            self.fold(c, written.bytes)?;
        }
        Ok(written.bytes)
    }

    /// Learns how a fold on its own thread ended, if it has: on success the image
    /// holds its checkpoint; on failure the chain is whole and the next checkpoint
    /// folds again.
    fn poll_fold(&mut self) {
        if self
            .folding
            .as_ref()
            .is_some_and(|f| f.handle.is_finished())
        {
            self.settle();
        }
    }

    /// Waits for a fold running on its own thread to finish, so that the directory
    /// holds its result: `memory.img` at the newest folded checkpoint and the chain
    /// after it. A failed fold leaves the chain whole (nothing is lost) and is
    /// retried with the next checkpoint.
    pub fn settle(&mut self) {
        let Some(f) = self.folding.take() else {
            return;
        };
        let why = match f.handle.join() {
            Ok(Ok(())) => {
                self.base = Some(f.upto);
                return;
            }
            Ok(Err(e)) => devices::ErrorChain(&e).to_string(),
            Err(_) => "the fold thread panicked".to_string(),
        };
        tracing::warn!(
            "folding checkpoint {} into the memory image failed (the chain stays whole; the next checkpoint folds again): {why}",
            f.upto
        );
        self.refold = true;
    }

    /// Folds the chain up to checkpoint `c` (just made complete), in line or on a
    /// thread of its own as the options say.
    fn fold(&mut self, c: &Checkpoint, file_bytes: u64) -> Result<(), DirectoryError> {
        let state_only = if file_bytes > STATE_ONLY_ABOVE {
            let bare = Checkpoint {
                epoch: c.epoch,
                full: c.full,
                state: c.state.clone(),
                ..Default::default()
            };
            let mut bytes = Vec::new();
            format::write(
                &mut bytes,
                &bare,
                self.options.compression,
                &mut self.scratch,
            )
            .map_err(io(
                "cannot encode",
                &self.dir.join(checkpoint_name(c.epoch)),
            ))?;
            Some(bytes)
        } else {
            None
        };
        let job = FoldJob {
            dir: self.dir.clone(),
            layout: self.layout()?.to_vec(),
            base: self.base.unwrap_or(0),
            upto: c.epoch,
            state_only,
        };
        if self.options.fold_in_line {
            if let Err(e) = job.run() {
                // The chain is whole: fold it all at the next checkpoint.
                self.refold = true;
                return Err(e);
            }
            self.reset_chain();
            self.base = Some(c.epoch);
            return Ok(());
        }
        let spawned = std::thread::Builder::new()
            .name("mirrorvm-fold".into())
            .spawn(move || {
                crate::threads::lower_own_priority(crate::threads::FOLD_NICE_ABOVE);
                job.run()
            })
            .map_err(DirectoryError::FoldThread);
        let handle = match spawned {
            Ok(h) => h,
            Err(e) => {
                self.refold = true;
                return Err(e);
            }
        };
        // The files after `c` start a new count: they are the chain once the fold
        // is done.
        self.reset_chain();
        self.folding = Some(FoldInFlight {
            upto: c.epoch,
            handle,
        });
        Ok(())
    }
}

/// A fold running on its own thread.
struct FoldInFlight {
    /// The checkpoint it brings the image to.
    upto: u64,
    handle: std::thread::JoinHandle<Result<(), DirectoryError>>,
}

/// What a fold needs, owned, so that it can run beside the exporter: it reads only
/// complete checkpoint files, which nothing rewrites, and writes `memory.img`, which
/// nothing else writes while a chain exists.
struct FoldJob {
    dir: PathBuf,
    layout: Vec<(u64, u64)>,
    /// The epoch `memory.img` holds now.
    base: u64,
    /// The newest checkpoint to fold in.
    upto: u64,
    /// A file with `upto`'s state and no pages, to replace its large file with.
    state_only: Option<Vec<u8>>,
}

impl FoldJob {
    /// Folds every checkpoint file after `base` up to `upto` into `memory.img`: each
    /// page's newest copy is written once (files are read newest first), the image
    /// synced, then `memory.epoch` set to `upto` and older files removed. A crash in
    /// between leaves `memory.epoch` at the old base with every chain file in place,
    /// and the replay of the chain overwrites whatever the fold had written.
    fn run(self) -> Result<(), DirectoryError> {
        let layout = &self.layout;
        let total: u64 = layout.iter().map(|(_, l)| l).sum();
        let max_pages = total / PAGE_SIZE as u64;
        let img = self.dir.join(MEMORY_IMAGE);
        let f = OpenOptions::new()
            .write(true)
            .open(&img)
            .map_err(io("cannot open", &img))?;
        let mut seen = vec![0u64; crate::arch::to_usize(max_pages.div_ceil(64))];
        let mut buf = [0u8; PAGE_SIZE];
        let files = list_checkpoints(&self.dir)?;
        for (epoch, path) in files.iter().rev() {
            if *epoch > self.upto || *epoch <= self.base {
                continue;
            }
            let checked = read_checked(path, *epoch, max_pages)?;
            let stored: Vec<_> = checked
                .stored_pages(max_pages)
                .map_err(|source| DirectoryError::File {
                    path: path.clone(),
                    source,
                })?
                .collect();
            // Newest first within a file too (a later copy of a page wins, as in a
            // replay); a page a newer copy was written for is skipped unexpanded.
            for (i, &(gpa, page)) in stored.iter().enumerate().rev() {
                let off = image_offset(layout, gpa).ok_or_else(|| DirectoryError::Content {
                    path: path.clone(),
                    source: ContentError::PageOutside(gpa),
                })?;
                let idx = crate::arch::to_usize(off / PAGE_SIZE as u64);
                let (word, bit) = (idx / 64, 1u64 << (idx % 64));
                if seen[word] & bit != 0 {
                    continue;
                }
                seen[word] |= bit;
                page.expand_into(&mut buf)
                    .map_err(|_| super::pagecodec::CodecError::Corrupt {
                        index: i as u64,
                        addr: gpa,
                    })?;
                f.write_all_at(&buf, off)
                    .map_err(io("cannot write", &img))?;
            }
        }
        f.sync_data().map_err(io("cannot sync", &img))?;
        write_atomic(
            &self.dir,
            MEMORY_EPOCH,
            format!("{}\n", self.upto).as_bytes(),
        )?;
        remove_older(&self.dir, self.upto)?;
        // Either file restores the same machine: a crash before the rename leaves the
        // old one.
        if let Some(bytes) = &self.state_only {
            write_atomic(&self.dir, &checkpoint_name(self.upto), bytes)?;
        }
        Ok(())
    }
}

/// Reads the checkpoint file `path` of epoch `epoch` and checks its sizes, checksums
/// and epoch; its pages are left encoded.
fn read_checked(
    path: &Path,
    epoch: u64,
    max_pages: u64,
) -> Result<format::Checked, DirectoryError> {
    let mut file = File::open(path).map_err(io("cannot open", path))?;
    let len = file.metadata().map_err(io("cannot stat", path))?.len();
    let mut r = std::io::BufReader::with_capacity(1 << 20, &mut file);
    let c =
        format::read_checked(&mut r, len, max_pages).map_err(|source| DirectoryError::File {
            path: path.to_path_buf(),
            source,
        })?;
    if c.header.epoch != epoch {
        return Err(DirectoryError::EpochMismatch {
            path: path.to_path_buf(),
            header: c.header.epoch,
            name: epoch,
        });
    }
    Ok(c)
}

/// Reads and checks the checkpoint file `path` of epoch `epoch`, pages expanded.
#[cfg(test)]
fn read_checkpoint(
    path: &Path,
    epoch: u64,
    max_pages: u64,
) -> Result<format::Decoded, DirectoryError> {
    read_checked(path, epoch, max_pages)?
        .decode(max_pages)
        .map_err(|source| DirectoryError::File {
            path: path.to_path_buf(),
            source,
        })
}

impl CheckpointSink for DirectorySink {
    fn storage(&self) -> StorageMode {
        StorageMode::Shared
    }

    /// The old chain is made unrestorable first (it describes another machine), then
    /// the manifest is written atomically.
    fn begin(&mut self, manifest: &Manifest) -> Result<(), SinkError> {
        self.settle();
        self.clear_chain()?;
        let path = self.dir.join(MANIFEST);
        let json = serde_json::to_vec_pretty(manifest)
            .map_err(|source| DirectoryError::Manifest { path, source })?;
        write_atomic(&self.dir, MANIFEST, &json)?;
        self.layout = Some(layout_of(manifest.memory));
        self.fold = self
            .options
            .policy
            .unwrap_or_else(|| FoldPolicy::for_guest(self.options.fold, manifest.memory));
        self.base = None;
        self.reset_chain();
        Ok(())
    }

    /// Durability order: the old chain is removed first (its checkpoints describe
    /// another image), then `memory.img` is written under a temporary name, synced,
    /// renamed, and `memory.epoch` set to `epoch`.
    fn write_base(
        &mut self,
        mem: &GuestMemory,
        epoch: u64,
        _delta: Option<&crate::checkpoint::BaseDelta>,
    ) -> Result<u64, SinkError> {
        Ok(self.write_base_inner(mem, epoch)?)
    }

    /// Writes the pages into `memory.img` in place and syncs it: the image is not
    /// restorable on its own until the full checkpoint after the pre-copy lands.
    fn write_base_pages(&mut self, pages: &StagedPages, _epoch: u64) -> Result<u64, SinkError> {
        Ok(self.write_base_pages_inner(pages)?)
    }

    /// Durability order: the checkpoint file is written under a temporary name,
    /// synced, renamed, and the directory synced: from here on the checkpoint is
    /// complete, its pages written once, in its file. When the chain after the image
    /// has grown past the [`FoldPolicy`], it is folded into `memory.img` (synced),
    /// `memory.epoch` advanced, and older checkpoint files removed. A crash anywhere
    /// leaves the previous or this checkpoint restorable: replaying the chain over a
    /// half-folded image is idempotent.
    fn write(&mut self, c: &Checkpoint) -> Result<u64, SinkError> {
        Ok(self.write_inner(c)?)
    }

    /// A guest that ended its run marks the directory finished: restore refuses it.
    fn end(&mut self, how: &SinkEnd) -> Result<(), SinkError> {
        // Leave the directory folded as far as it was going to be: a restore then
        // replays less.
        self.settle();
        if let SinkEnd::Finished { how, .. } = how {
            write_atomic(&self.dir, FINISHED, format!("{how}\n").as_bytes())?;
        }
        Ok(())
    }
}

impl Drop for DirectorySink {
    /// A fold still running is waited for, so the directory lock is not released
    /// while it writes the image.
    fn drop(&mut self) {
        self.settle();
    }
}

/// The source of `mirrorvm restore --from DIR`.
pub struct DirectorySource {
    dir: PathBuf,
    /// The manifest, once read: `load` needs it too.
    manifest: Option<Manifest>,
}

impl DirectorySource {
    /// A source reading `dir`.
    pub fn new(dir: &Path) -> Self {
        DirectorySource {
            dir: dir.to_path_buf(),
            manifest: None,
        }
    }

    fn manifest_inner(&mut self) -> Result<Manifest, DirectoryError> {
        if let Some(m) = &self.manifest {
            return Ok(m.clone());
        }
        let m = self.read_manifest()?;
        self.manifest = Some(m.clone());
        Ok(m)
    }

    fn read_manifest(&self) -> Result<Manifest, DirectoryError> {
        check_not_finished(&self.dir)?;
        let path = self.dir.join(MANIFEST);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|source| DirectoryError::Manifest { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Format version 1 kept the manifest inside every checkpoint.
                let files = list_checkpoints(&self.dir)?;
                let (_, path) = files
                    .last()
                    .ok_or_else(|| DirectoryError::NoCheckpoint(self.dir.clone()))?;
                let mut f = File::open(path).map_err(io("cannot open", path))?;
                let len = f.metadata().map_err(io("cannot stat", path))?.len();
                let file_err = |source| DirectoryError::File {
                    path: path.clone(),
                    source,
                };
                let (h, state) = format::read_state_section(&mut f, len).map_err(file_err)?;
                let section = format::decode_state(h.version, &state).map_err(file_err)?;
                let mut m = section
                    .v1_manifest
                    .ok_or_else(|| DirectoryError::NoCheckpoint(self.dir.clone()))?;
                for d in &mut m.disks {
                    d.size = fs::metadata(&d.config.path).map_or(0, |m| m.len());
                }
                Ok(m)
            }
            Err(e) => Err(io("cannot read", &path)(e)),
        }
    }

    fn load_inner(&mut self) -> Result<Restored, DirectoryError> {
        let manifest = self.manifest_inner()?;
        let dir = &self.dir;
        let files = list_checkpoints(dir)?;
        let Some((latest, _)) = files.last().cloned() else {
            return Err(DirectoryError::NoCheckpoint(dir.clone()));
        };
        let base = fs::read_to_string(dir.join(MEMORY_EPOCH))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .ok_or_else(|| DirectoryError::NoCheckpoint(dir.clone()))?;
        if latest <= base && !dir.join(checkpoint_name(base)).exists() {
            return Err(DirectoryError::NoCheckpoint(dir.clone()));
        }
        let img = dir.join(MEMORY_IMAGE);
        let f = File::open(&img).map_err(io("cannot open", &img))?;
        let total: u64 = memory::ram_ranges(manifest.memory)
            .iter()
            .map(|(_, len)| *len as u64)
            .sum();
        let actual = f.metadata().map_err(io("cannot stat", &img))?.len();
        if actual != total {
            return Err(DirectoryError::ImageSize {
                path: img,
                expected: total,
                actual,
            });
        }
        // The image is mapped, not read: pages come from the file as they are
        // touched, and the replay's and the guest's writes stay private.
        let mem = memory::map_image(&f, manifest.memory).map_err(DirectoryError::Memory)?;
        // Every file of the chain is read and checked whole (sizes, checksums,
        // epochs) before memory is touched; then each page's newest copy is written.
        let max_pages = total / PAGE_SIZE as u64;
        let started = std::time::Instant::now();
        let mut chain = Vec::new();
        for epoch in base..=latest {
            let path = dir.join(checkpoint_name(epoch));
            if !path.exists() {
                if epoch == base {
                    continue; // folded into the image and removed
                }
                return Err(DirectoryError::Gap {
                    dir: dir.clone(),
                    epoch,
                    base,
                });
            }
            let checked = read_checked(&path, epoch, max_pages)?;
            chain.push((path, checked));
        }
        let read = started.elapsed();
        // A file of the base's epoch is still there when the fold that made the base
        // kept it for its state: its pages are in the image already.
        let replayed =
            &chain[usize::from(chain.first().is_some_and(|(_, c)| c.header.epoch == base))..];
        let files: Vec<&format::Checked> = replayed.iter().map(|(_, c)| c).collect();
        let bytes: usize = files.iter().map(|c| c.pages.len() + c.state.len()).sum();
        let pages: u64 = files.iter().map(|c| c.header.npages).sum();
        let stats = replay::replay(
            &mem,
            &files,
            max_pages,
            replay::threads_for(crate::arch::to_usize(pages)),
        )
        .map_err(|e| {
            let path = replayed[e.file].0.clone();
            match e.fault {
                ReplayFault::Format(source) => DirectoryError::File { path, source },
                ReplayFault::Outside(gpa) => DirectoryError::Content {
                    path,
                    source: ContentError::PageOutside(gpa),
                },
                ReplayFault::Corrupt(gpa) => DirectoryError::Content {
                    path,
                    source: ContentError::CorruptPage(gpa),
                },
            }
        })?;
        let (path, last) = chain
            .pop()
            .ok_or_else(|| DirectoryError::NoCheckpoint(dir.clone()))?;
        // `cargo bench --bench boot` reads this line (MIRRORVM_LOG=debug).
        tracing::debug!(
            "chain replayed: {} files after the image at epoch {base}, {bytes} bytes read and checked in {:.2} ms; {} pages, {} written (each page's newest copy) on {} threads; {:.2} ms in all",
            stats.files,
            read.as_secs_f64() * 1e3,
            stats.pages,
            stats.written,
            stats.threads,
            started.elapsed().as_secs_f64() * 1e3,
        );
        let section = format::decode_state(last.header.version, &last.state)
            .map_err(|source| DirectoryError::File { path, source })?;
        Ok(Restored {
            epoch: last.header.epoch,
            memory: mem,
            state: section.state,
        })
    }
}

impl CheckpointSource for DirectorySource {
    fn describe(&self) -> String {
        self.dir.display().to_string()
    }

    fn manifest(&mut self) -> Result<Manifest, SourceError> {
        Ok(self.manifest_inner()?)
    }

    /// Reads `memory.img` and replays every checkpoint after it, checking each file
    /// whole (sizes, checksums, epochs, page addresses) as it goes. The directory is
    /// locked while it is read.
    fn load(&mut self) -> Result<Restored, SourceError> {
        let _lock = lock(&self.dir)?;
        Ok(self.load_inner()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{encode_state, DiskManifest, MachineState};
    use crate::config::DiskConfig;
    use crate::dirty::StagedPages;
    use crate::vm_state::VmState;

    fn manifest() -> Manifest {
        Manifest {
            memory: 16 << 20,
            cpus: 1,
            cmdline: "x".into(),
            disks: vec![DiskManifest {
                config: DiskConfig {
                    readonly: true,
                    ..DiskConfig::new("/nonexistent")
                },
                size: 4096,
                journal_id: None,
                region_size: None,
            }],
            cpu: Default::default(),
        }
    }

    fn state(tag: u8) -> Vec<u8> {
        encode_state(&MachineState {
            vcpus: vec![],
            vm: VmState::default(),
            devices: vec![tag],
        })
        .unwrap()
    }

    fn page(gpa: u64, byte: u8) -> StagedPages {
        StagedPages {
            addrs: vec![gpa],
            data: vec![byte; PAGE_SIZE],
        }
    }

    #[test]
    fn a_chain_written_by_the_sink_is_read_by_the_source() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ck");
        let m = manifest();
        let mem = memory::create(m.memory).unwrap();
        mem.write_slice(&[7u8; 8], GuestAddress(0x3000)).unwrap();
        {
            let mut sink = DirectorySink::open(&dir).unwrap();
            // A second sink on the same directory is refused while the first lives.
            assert!(matches!(
                DirectorySink::open(&dir),
                Err(DirectoryError::Locked { .. })
            ));
            sink.begin(&m).unwrap();
            sink.write_base(&mem, 4, None).unwrap();
            for (e, b) in [(5u64, 0x55u8), (6, 0x66)] {
                sink.write(&Checkpoint {
                    epoch: e,
                    full: e == 5,
                    state: state(b),
                    pages: page(0x2000, b),
                    disks: vec![],
                    console: Default::default(),
                })
                .unwrap();
            }
        }
        let mut src = DirectorySource::new(&dir);
        assert_eq!(src.manifest().unwrap(), m);
        let r = src.load().unwrap();
        assert_eq!(r.epoch, 6);
        assert_eq!(r.state.devices, vec![0x66]);
        assert_eq!(r.memory.read_obj::<u8>(GuestAddress(0x2000)).unwrap(), 0x66);
        assert_eq!(r.memory.read_obj::<u8>(GuestAddress(0x3000)).unwrap(), 7);
        // Both files are the chain after the image: nothing was folded yet.
        assert_eq!(list_checkpoints(&dir).unwrap().len(), 2);
        assert_eq!(fs::read_to_string(dir.join(MEMORY_EPOCH)).unwrap(), "4\n");

        // Marked finished: nothing to resume.
        let mut sink = DirectorySink::open(&dir).unwrap();
        sink.end(&SinkEnd::Finished {
            how: "GuestExit(0)".into(),
            exit_status: 0,
        })
        .unwrap();
        drop(sink);
        let err = DirectorySource::new(&dir).manifest().unwrap_err();
        assert!(format!("{:?}", err).contains("Finished"), "{err:?}");
    }

    #[test]
    fn a_missing_link_or_a_wrong_name_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let m = manifest();
        let mem = memory::create(m.memory).unwrap();
        let mut sink = DirectorySink::open(&dir).unwrap();
        sink.begin(&m).unwrap();
        sink.write_base(&mem, 1, None).unwrap();
        drop(sink);
        // A checkpoint file after a gap.
        let c = Checkpoint {
            epoch: 4,
            state: state(1),
            ..Default::default()
        };
        let mut bytes = Vec::new();
        format::write(&mut bytes, &c, Compression::Lz4, &mut Vec::new()).unwrap();
        fs::write(dir.join(checkpoint_name(4)), &bytes).unwrap();
        let err = DirectorySource::new(&dir).load_inner().unwrap_err();
        assert!(
            matches!(err, DirectoryError::Gap { epoch: 2, .. }),
            "{err:?}"
        );
        // The same file under another epoch's name.
        fs::remove_file(dir.join(checkpoint_name(4))).unwrap();
        fs::write(dir.join(checkpoint_name(2)), &bytes).unwrap();
        let err = DirectorySource::new(&dir).load_inner().unwrap_err();
        assert!(
            matches!(
                err,
                DirectoryError::EpochMismatch {
                    header: 4,
                    name: 2,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    /// A page whose bytes depend on its address and the epoch: `words` non-zero
    /// words (0: a zero page), like the test guest's `dirty` pages.
    fn stamped(gpa: u64, epoch: u64, words: usize) -> Vec<u8> {
        let mut p = vec![0u8; PAGE_SIZE];
        for w in 0..words {
            let v = (gpa ^ (epoch << 40) ^ w as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            p[w * 8..w * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        p
    }

    /// Writes checkpoints `first..=last` through `sink`; epoch e dirties pages
    /// `e % 5 .. e % 5 + 8` (so pages repeat across epochs), some of them zero.
    /// Calls `after` with the epoch and the memory the guest has after each one.
    fn write_chain(
        sink: &mut DirectorySink,
        mem: &GuestMemory,
        first: u64,
        last: u64,
        mut after: impl FnMut(&mut DirectorySink, u64, Vec<u8>),
    ) {
        for e in first..=last {
            let mut pages = StagedPages::default();
            for p in (e % 5)..(e % 5) + 8 {
                let gpa = p * PAGE_SIZE as u64;
                let words = usize::try_from((p + e) % 4 * 100).unwrap();
                let page = stamped(gpa, e, words);
                mem.write_slice(&page, GuestAddress(gpa)).unwrap();
                pages.addrs.push(gpa);
                pages.data.extend_from_slice(&page);
            }
            sink.write(&Checkpoint {
                epoch: e,
                full: e == first,
                state: state(u8::try_from(e % 256).unwrap()),
                pages,
                disks: vec![],
                console: Default::default(),
            })
            .unwrap();
            let mut img = vec![0u8; 16 * PAGE_SIZE];
            mem.read_slice(&mut img, GuestAddress(0)).unwrap();
            after(sink, e, img);
        }
    }

    /// Where two images first differ (not the images: too long to print).
    fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
        a.iter().zip(b).position(|(x, y)| x != y)
    }

    fn restored_prefix(dir: &Path) -> (u64, Vec<u8>) {
        let r = DirectorySource::new(dir).load_inner().unwrap();
        let mut img = vec![0u8; 16 * PAGE_SIZE];
        r.memory.read_slice(&mut img, GuestAddress(0)).unwrap();
        (r.epoch, img)
    }

    #[test]
    fn the_chain_is_folded_at_its_bound_and_restores_the_same_memory() {
        for (compression, fold, fold_in_line) in [
            (
                Compression::Lz4,
                FoldPolicy {
                    max_bytes: u64::MAX,
                    max_files: 3,
                    max_pages: u64::MAX,
                },
            ),
            (
                Compression::None,
                FoldPolicy {
                    max_bytes: 40_000,
                    max_files: 100,
                    max_pages: u64::MAX,
                },
            ),
            (
                Compression::Lz4,
                FoldPolicy {
                    max_bytes: u64::MAX,
                    max_files: 100,
                    max_pages: 10,
                },
            ),
            (Compression::Lz4, FoldPolicy::SMALL),
            (Compression::Lz4, FoldPolicy::EVERY),
        ]
        .into_iter()
        .flat_map(|(c, f)| [(c, f, true), (c, f, false)])
        {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("ck");
            let m = manifest();
            let mem = memory::create(m.memory).unwrap();
            mem.write_slice(&[9u8; 16], GuestAddress(0x8000)).unwrap();
            let mut sink = based_sink_with(
                &dir,
                DirectoryOptions {
                    compression,
                    policy: Some(fold),
                    fold_in_line,
                    ..Default::default()
                },
                &m,
                &mem,
            );
            let mut folds = 0;
            let mut last_base = 0;
            write_chain(&mut sink, &mem, 1, 12, |sink, e, img| {
                // A fold on its own thread is waited for, so that the directory
                // shows its result.
                sink.settle();
                // After every checkpoint the directory restores exactly it.
                let (re, rimg) = restored_prefix(&dir);
                assert_eq!(re, e);
                assert_eq!(
                    first_diff(&rimg, &img),
                    None,
                    "epoch {e}, {compression} {fold:?}, in line: {fold_in_line}"
                );
                let base: u64 = fs::read_to_string(dir.join(MEMORY_EPOCH))
                    .unwrap()
                    .trim()
                    .parse()
                    .unwrap();
                if base != last_base {
                    folds += 1;
                    last_base = base;
                    assert_eq!(base, e, "a fold brings the image to the newest checkpoint");
                }
                let chain = list_checkpoints(&dir).unwrap();
                assert!(chain.iter().all(|(n, _)| *n >= base));
                assert!(chain.len() <= fold.max_files + 1, "{chain:?}");
            });
            if fold == FoldPolicy::SMALL {
                // 12 small checkpoints of at most 13 distinct pages stay one chain.
                assert_eq!(folds, 0);
                continue;
            }
            assert!(folds > 0, "{compression} {fold:?}: never folded");
            if fold == FoldPolicy::EVERY {
                assert_eq!(folds, 12);
            } else {
                assert!(folds < 12, "{compression} {fold:?}: folded every time");
            }
        }
    }

    #[test]
    fn folds_on_their_own_thread_beside_back_to_back_checkpoints_lose_nothing() {
        // A bound of 10 distinct pages: nearly every checkpoint passes it, so folds
        // run while the next checkpoints are written, and later ones wait for them.
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ck");
        let m = manifest();
        let mem = memory::create(m.memory).unwrap();
        let mut sink = based_sink(&dir, Compression::Lz4, pages_only(10), &m, &mem);
        let mut want = Vec::new();
        write_chain(&mut sink, &mem, 1, 150, |_, _, img| want = img);
        drop(sink);
        let base: u64 = fs::read_to_string(dir.join(MEMORY_EPOCH))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(base > 0, "no fold finished");
        let chain = list_checkpoints(&dir).unwrap();
        assert!(chain.iter().all(|(e, _)| *e >= base), "{base}: {chain:?}");
        let (re, rimg) = restored_prefix(&dir);
        assert_eq!(re, 150);
        assert_eq!(first_diff(&rimg, &want), None);
    }

    /// A sink in `dir` that stores pages as `compression` says and folds by `fold`
    /// on its own thread, begun for `m` with the base image of `mem` at epoch 0.
    fn based_sink(
        dir: &Path,
        compression: Compression,
        fold: FoldPolicy,
        m: &Manifest,
        mem: &GuestMemory,
    ) -> DirectorySink {
        let options = DirectoryOptions {
            compression,
            policy: Some(fold),
            fold_in_line: false,
            ..Default::default()
        };
        based_sink_with(dir, options, m, mem)
    }

    /// A sink in `dir` with `options`, begun for `m` with the base image of `mem` at
    /// epoch 0.
    fn based_sink_with(
        dir: &Path,
        options: DirectoryOptions,
        m: &Manifest,
        mem: &GuestMemory,
    ) -> DirectorySink {
        let mut sink = DirectorySink::open_with(dir, options).unwrap();
        sink.begin(m).unwrap();
        sink.write_base(mem, 0, None).unwrap();
        sink
    }

    /// A fold bound of `max_pages` distinct pages only.
    fn pages_only(max_pages: u64) -> FoldPolicy {
        FoldPolicy {
            max_bytes: u64::MAX,
            max_files: usize::MAX,
            max_pages,
        }
    }

    #[test]
    fn a_large_folded_checkpoint_keeps_its_state_only_and_restores_the_same() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ck");
        let m = manifest();
        let mem = memory::create(m.memory).unwrap();
        let mut sink = based_sink(&dir, Compression::None, pages_only(100), &m, &mem);
        // Epoch 1: 90 raw pages (~360 KiB, no fold); epoch 2: 90 more, past the
        // page bound: the fold takes both, and file 2 keeps its state only.
        for e in 1..=2u64 {
            let mut pages = StagedPages::default();
            for p in 0..90u64 {
                let gpa = (e * 100 + p) * PAGE_SIZE as u64;
                let page = stamped(gpa, e, 512);
                mem.write_slice(&page, GuestAddress(gpa)).unwrap();
                pages.addrs.push(gpa);
                pages.data.extend_from_slice(&page);
            }
            sink.write(&Checkpoint {
                epoch: e,
                state: state(u8::try_from(e).unwrap()),
                pages,
                ..Default::default()
            })
            .unwrap();
        }
        drop(sink);
        assert_eq!(fs::read_to_string(dir.join(MEMORY_EPOCH)).unwrap(), "2\n");
        let chain = list_checkpoints(&dir).unwrap();
        assert_eq!(chain.iter().map(|(e, _)| *e).collect::<Vec<_>>(), vec![2]);
        let len = fs::metadata(&chain[0].1).unwrap().len();
        assert!(
            len < STATE_ONLY_ABOVE,
            "{len} bytes left in the folded file"
        );
        let r = DirectorySource::new(&dir).load_inner().unwrap();
        assert_eq!(r.epoch, 2);
        assert_eq!(r.state.devices, vec![2]);
        let mut want = vec![0u8; 300 * PAGE_SIZE];
        let mut got = want.clone();
        mem.read_slice(&mut want, GuestAddress(0)).unwrap();
        r.memory.read_slice(&mut got, GuestAddress(0)).unwrap();
        assert_eq!(first_diff(&got, &want), None);
    }

    #[test]
    fn a_fold_torn_at_any_page_still_restores_the_newest_checkpoint() {
        // The fold writes pages into memory.img before memory.epoch moves: model a
        // crash after k of its page writes by copying the directory, applying only the
        // first k writes of a fold to the copy's image, and restoring the copy.
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ck");
        let m = manifest();
        let mem = memory::create(m.memory).unwrap();
        let mut sink = based_sink(&dir, Compression::Lz4, pages_only(u64::MAX), &m, &mem);
        let mut want = Vec::new();
        write_chain(&mut sink, &mem, 1, 6, |_, _, img| want = img);
        drop(sink);
        // The pages a fold would write, newest first, each once.
        let mut writes: Vec<(u64, Vec<u8>)> = Vec::new();
        for (e, path) in list_checkpoints(&dir).unwrap().iter().rev() {
            let d = read_checkpoint(path, *e, 4096).unwrap();
            for (gpa, p) in d
                .pages
                .addrs
                .iter()
                .zip(d.pages.data.chunks_exact(PAGE_SIZE))
            {
                if !writes.iter().any(|(g, _)| g == gpa) {
                    writes.push((*gpa, p.to_vec()));
                }
            }
        }
        for k in 0..=writes.len() {
            let copy = tmp.path().join(format!("torn{k}"));
            fs::create_dir(&copy).unwrap();
            for entry in fs::read_dir(&dir).unwrap() {
                let entry = entry.unwrap();
                fs::copy(entry.path(), copy.join(entry.file_name())).unwrap();
            }
            let img = OpenOptions::new()
                .write(true)
                .open(copy.join(MEMORY_IMAGE))
                .unwrap();
            for (gpa, p) in &writes[..k] {
                img.write_all_at(p, *gpa).unwrap();
            }
            let (re, rimg) = restored_prefix(&copy);
            assert_eq!(re, 6);
            assert_eq!(first_diff(&rimg, &want), None, "torn after {k} writes");
        }
    }

    #[test]
    fn dir_specs_parse_and_bad_options_are_named() {
        let d = parse_dir_spec("/tmp/ck").unwrap();
        assert_eq!(
            (d.path, d.compression, d.fold),
            (PathBuf::from("/tmp/ck"), Compression::Lz4, Fold::Small)
        );
        let d = parse_dir_spec("ck,compress=none,fold=large").unwrap();
        assert_eq!(
            (d.path, d.compression, d.fold),
            (PathBuf::from("ck"), Compression::None, Fold::Large)
        );
        assert_eq!(
            parse_dir_spec("ck,fold=large,compress=lz4")
                .unwrap()
                .compression,
            Compression::Lz4
        );
        let e = parse_dir_spec("ck,fold=tiny").unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown fold bound \"tiny\": expected small or large"
        );
        assert!(matches!(
            parse_dir_spec(",compress=lz4"),
            Err(DirSpecError::NoDirectory)
        ));
        let e = parse_dir_spec("ck,compress=zstd").unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown compression \"zstd\": expected lz4 or none"
        );
        let e = parse_dir_spec("ck,level=3").unwrap_err();
        assert!(e.to_string().contains("unknown option \"level=3\""), "{e}");
    }

    #[test]
    fn checkpoint_names_are_strict() {
        let tmp = tempfile::tempdir().unwrap();
        for n in [
            "ckpt-1.mvc",
            "ckpt-0000000000000000000x.mvc",
            "ckpt-00000000000000000003.mvc.tmp",
        ] {
            fs::write(tmp.path().join(n), b"").unwrap();
        }
        fs::write(tmp.path().join(checkpoint_name(3)), b"").unwrap();
        let l = list_checkpoints(tmp.path()).unwrap();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].0, 3);
    }
}
