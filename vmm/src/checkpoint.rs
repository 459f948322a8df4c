//! Checkpoints: what a cut produces, their file format, and where they go (a
//! [`CheckpointSink`]; the directory sink here, the peer sink with mirroring).
//!
//! The format is specified in `docs/checkpoint-format.md`. In short, a checkpoint
//! file is a 64-byte header (magic, version, flags, epoch, section sizes, header
//! CRC32C), the postcard-encoded [`MachineState`], the page addresses, the page
//! data, and a trailer with a CRC32C over everything before it. The decoder checks
//! the sizes against the file length before it allocates anything.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::dirty::{StagedPages, PAGE_SIZE};
use crate::memory::GuestMemory;
use crate::vcpu::VcpuState;
use crate::vm_state::VmState;

/// File magic of a checkpoint.
pub const MAGIC: [u8; 8] = *b"MVCKPT\0\0";
/// Trailer magic.
pub const END_MAGIC: [u8; 8] = *b"MVCKEND\0";
/// Format version this code writes and reads.
pub const VERSION: u32 = 1;
/// Header size.
pub const HEADER_LEN: usize = 64;
/// Trailer size: CRC32C (4), padding (4), end magic (8).
pub const TRAILER_LEN: usize = 16;
/// Largest encoded machine state we accept.
pub const MAX_STATE_LEN: u64 = 64 << 20;
/// Flag: the checkpoint is full (its memory is the whole of `memory.img`).
pub const FLAG_FULL: u32 = 1;

/// The configuration a restore needs to rebuild the same machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedConfig {
    /// Guest memory in bytes.
    pub memory: u64,
    /// vCPU count.
    pub cpus: u8,
    /// The guest's command line (with devices appended).
    pub cmdline: String,
    /// Disks, in attach order.
    pub disks: Vec<crate::config::DiskConfig>,
    /// The journal id of each checkpointed disk (same order; `None` for the others):
    /// a restore checks it before recovering, so a swapped or recreated journal is
    /// refused instead of being recovered to the wrong history.
    pub journal_ids: Vec<Option<u64>>,
}

/// Everything but memory, at a cut.
#[derive(Debug, Serialize, Deserialize)]
pub struct MachineState {
    /// How to rebuild the machine.
    pub config: SavedConfig,
    /// Each vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// Interrupt controllers, PIT, clock.
    pub vm: VmState,
    /// Device state, postcard-encoded by the devices layer.
    pub devices: Vec<u8>,
}

/// One checkpoint, staged in memory at the cut.
#[derive(Debug)]
pub struct Checkpoint {
    /// Its epoch.
    pub epoch: u64,
    /// Whether `pages` holds all of memory.
    pub full: bool,
    /// The encoded [`MachineState`].
    pub state: Vec<u8>,
    /// The dirty pages.
    pub pages: StagedPages,
}

/// Failures reading or writing checkpoints.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// An I/O error on a checkpoint file or directory.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Not a checkpoint file.
    #[error("{0}: not a mirrorvm checkpoint (bad magic)")]
    BadMagic(PathBuf),
    /// Written by a newer mirrorvm.
    #[error("{path}: checkpoint format version {version}; this mirrorvm reads version {VERSION}")]
    Version {
        /// The file.
        path: PathBuf,
        /// Its version.
        version: u32,
    },
    /// The header's CRC does not match.
    #[error("{0}: header checksum mismatch")]
    HeaderCrc(PathBuf),
    /// The sizes in the header do not add up to the file.
    #[error("{path}: header says {expected} bytes, file has {actual}")]
    Size {
        /// The file.
        path: PathBuf,
        /// Size the header implies.
        expected: u64,
        /// Actual size.
        actual: u64,
    },
    /// A section is larger than allowed.
    #[error("{path}: {what} of {len} bytes exceeds the limit")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Which section.
        what: &'static str,
        /// Its size.
        len: u64,
    },
    /// The body's CRC does not match.
    #[error("{0}: checksum mismatch (the file is corrupt or torn)")]
    BodyCrc(PathBuf),
    /// The state could not be decoded.
    #[error("{path}: cannot decode the machine state: {source}")]
    Decode {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: postcard::Error,
    },
    /// The state could not be encoded.
    #[error("cannot encode the machine state: {0}")]
    Encode(#[source] postcard::Error),
    /// A page lies outside guest memory.
    #[error("{path}: page {addr:#x} is outside guest memory")]
    PageOutside {
        /// The file.
        path: PathBuf,
        /// The page address.
        addr: u64,
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
    /// More pages than the guest has.
    #[error("{path}: {pages} pages, more than the guest's {max}")]
    TooManyPages {
        /// The file.
        path: PathBuf,
        /// Pages in the file.
        pages: u64,
        /// Pages of guest memory.
        max: u64,
    },
    /// The directory holds no complete checkpoint.
    #[error("{0}: no complete checkpoint")]
    NoCheckpoint(PathBuf),
    /// A checkpoint between the folded image and the latest is missing.
    #[error("{dir}: checkpoint {epoch} is missing (the chain from the memory image at epoch {base} is broken)")]
    Gap {
        /// The directory.
        dir: PathBuf,
        /// Missing epoch.
        epoch: u64,
        /// Epoch of the memory image.
        base: u64,
    },
    /// The memory image does not match the checkpoint's memory size.
    #[error("{path}: memory image is {actual} bytes, the checkpoint's guest has {expected}")]
    ImageSize {
        /// The image.
        path: PathBuf,
        /// Guest memory size.
        expected: u64,
        /// Image size.
        actual: u64,
    },
}

fn io<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> CheckpointError + 'a {
    move |source| CheckpointError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Encodes the machine state.
pub fn encode_state(state: &MachineState) -> Result<Vec<u8>, CheckpointError> {
    postcard::to_stdvec(state).map_err(CheckpointError::Encode)
}

fn header(epoch: u64, flags: u32, state_len: u64, pages: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&flags.to_le_bytes());
    h[16..24].copy_from_slice(&epoch.to_le_bytes());
    h[24..32].copy_from_slice(&state_len.to_le_bytes());
    h[32..40].copy_from_slice(&pages.to_le_bytes());
    h[40..44].copy_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
    let crc = crc32c::crc32c(&h[..60]);
    h[60..64].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Writes checkpoint `c` (with `pages` or, for a full checkpoint stored as the
/// memory image, none) to `w`; returns bytes written.
fn write_file(w: &mut impl Write, c: &Checkpoint, with_pages: bool) -> std::io::Result<u64> {
    let npages = if with_pages { c.pages.len() as u64 } else { 0 };
    let flags = if c.full { FLAG_FULL } else { 0 };
    let h = header(c.epoch, flags, c.state.len() as u64, npages);
    let mut crc = crc32c::crc32c(&h);
    w.write_all(&h)?;
    crc = crc32c::crc32c_append(crc, &c.state);
    w.write_all(&c.state)?;
    let mut n = (HEADER_LEN + c.state.len()) as u64;
    if with_pages {
        let mut addrs = Vec::with_capacity(c.pages.len() * 8);
        for a in &c.pages.addrs {
            addrs.extend_from_slice(&a.to_le_bytes());
        }
        crc = crc32c::crc32c_append(crc, &addrs);
        w.write_all(&addrs)?;
        crc = crc32c::crc32c_append(crc, &c.pages.data);
        w.write_all(&c.pages.data)?;
        n += (addrs.len() + c.pages.data.len()) as u64;
    }
    let mut t = [0u8; TRAILER_LEN];
    t[0..4].copy_from_slice(&crc.to_le_bytes());
    t[8..16].copy_from_slice(&END_MAGIC);
    w.write_all(&t)?;
    Ok(n + TRAILER_LEN as u64)
}

/// A decoded checkpoint file.
#[derive(Debug)]
pub struct LoadedCheckpoint {
    /// Its epoch.
    pub epoch: u64,
    /// Whether it is a full checkpoint.
    pub full: bool,
    /// The encoded state (decode with [`LoadedCheckpoint::state`]).
    pub state: Vec<u8>,
    /// Its pages.
    pub pages: StagedPages,
    path: PathBuf,
}

impl LoadedCheckpoint {
    /// Decodes the machine state.
    pub fn state(&self) -> Result<MachineState, CheckpointError> {
        postcard::from_bytes(&self.state).map_err(|source| CheckpointError::Decode {
            path: self.path.clone(),
            source,
        })
    }
}

/// Reads and checks a checkpoint file: magic, version, header CRC, sizes against
/// the file length (before allocating), body CRC.
/// A checked checkpoint header.
struct Header {
    raw: [u8; HEADER_LEN],
    flags: u32,
    epoch: u64,
    state_len: u64,
    npages: u64,
}

/// Opens a checkpoint file and checks, in order: length, magic, version, header CRC,
/// the state bound, the page count against `max_pages`, and that the sizes add up to
/// the file's length exactly. Nothing is allocated from the header before that.
fn open_checked(path: &Path, max_pages: u64) -> Result<(File, Header), CheckpointError> {
    let mut f = File::open(path).map_err(io("cannot open", path))?;
    let len = f.metadata().map_err(io("cannot stat", path))?.len();
    let p = || path.to_path_buf();
    if len < (HEADER_LEN + TRAILER_LEN) as u64 {
        return Err(CheckpointError::Size {
            path: p(),
            expected: (HEADER_LEN + TRAILER_LEN) as u64,
            actual: len,
        });
    }
    let mut h = [0u8; HEADER_LEN];
    f.read_exact(&mut h).map_err(io("cannot read", path))?;
    if h[0..8] != MAGIC {
        return Err(CheckpointError::BadMagic(p()));
    }
    let u32_at = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
    let u64_at = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&h[o..o + 8]);
        u64::from_le_bytes(b)
    };
    let version = u32_at(8);
    if version != VERSION {
        return Err(CheckpointError::Version { path: p(), version });
    }
    if u32_at(60) != crc32c::crc32c(&h[..60]) {
        return Err(CheckpointError::HeaderCrc(p()));
    }
    let header = Header {
        raw: h,
        flags: u32_at(12),
        epoch: u64_at(16),
        state_len: u64_at(24),
        npages: u64_at(32),
    };
    if header.state_len > MAX_STATE_LEN {
        return Err(CheckpointError::TooLarge {
            path: p(),
            what: "machine state",
            len: header.state_len,
        });
    }
    if header.npages > max_pages {
        return Err(CheckpointError::TooManyPages {
            path: p(),
            pages: header.npages,
            max: max_pages,
        });
    }
    let expected = header
        .npages
        .checked_mul(8 + PAGE_SIZE as u64)
        .and_then(|b| b.checked_add(header.state_len))
        .and_then(|b| b.checked_add((HEADER_LEN + TRAILER_LEN) as u64));
    match expected {
        Some(e) if e == len => Ok((f, header)),
        _ => Err(CheckpointError::Size {
            path: p(),
            expected: expected.unwrap_or(u64::MAX),
            actual: len,
        }),
    }
}

/// Reads only the machine state of a checkpoint file (not its pages, and without
/// the body checksum: `read_file` checks that when the checkpoint is loaded).
fn read_state_only(path: &Path) -> Result<MachineState, CheckpointError> {
    let (mut f, h) = open_checked(path, u64::MAX)?;
    let mut state = vec![0u8; h.state_len as usize];
    f.read_exact(&mut state).map_err(io("cannot read", path))?;
    postcard::from_bytes(&state).map_err(|source| CheckpointError::Decode {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads and checks a whole checkpoint file holding at most `max_pages` pages: the
/// header (see `open_checked`), then the body and its CRC.
pub fn read_file(path: &Path, max_pages: u64) -> Result<LoadedCheckpoint, CheckpointError> {
    let (mut f, hdr) = open_checked(path, max_pages)?;
    let p = || path.to_path_buf();
    let h = hdr.raw;
    let (flags, epoch, state_len, npages) = (hdr.flags, hdr.epoch, hdr.state_len, hdr.npages);
    // Sizes are now bounded by the file's length.
    let mut state = vec![0u8; state_len as usize];
    f.read_exact(&mut state).map_err(io("cannot read", path))?;
    let mut addr_bytes = vec![0u8; npages as usize * 8];
    f.read_exact(&mut addr_bytes)
        .map_err(io("cannot read", path))?;
    let mut data = vec![0u8; npages as usize * PAGE_SIZE];
    f.read_exact(&mut data).map_err(io("cannot read", path))?;
    let mut t = [0u8; TRAILER_LEN];
    f.read_exact(&mut t).map_err(io("cannot read", path))?;
    let mut crc = crc32c::crc32c(&h);
    crc = crc32c::crc32c_append(crc, &state);
    crc = crc32c::crc32c_append(crc, &addr_bytes);
    crc = crc32c::crc32c_append(crc, &data);
    if t[8..16] != END_MAGIC || u32::from_le_bytes([t[0], t[1], t[2], t[3]]) != crc {
        return Err(CheckpointError::BodyCrc(p()));
    }
    let addrs = addr_bytes
        .chunks_exact(8)
        .map(|c| {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            u64::from_le_bytes(b)
        })
        .collect();
    Ok(LoadedCheckpoint {
        epoch,
        full: flags & FLAG_FULL != 0,
        state,
        pages: StagedPages { addrs, data },
        path: p(),
    })
}

/// Where checkpoints go. `write` returns once the checkpoint is durable there.
pub trait CheckpointSink: Send {
    /// Pre-copy: makes all of `mem`, read while the guest runs, the base image that
    /// checkpoint `epoch + 1` will complete. Until that checkpoint is complete the
    /// base alone is not restorable. Returns the bytes written.
    fn write_base(&mut self, mem: &GuestMemory, epoch: u64) -> Result<u64, CheckpointError>;
    /// Makes checkpoint `c` durable; returns the bytes written.
    fn write(&mut self, c: &Checkpoint, mem_layout: &[(u64, u64)]) -> Result<u64, CheckpointError>;
}

/// A local directory holding `memory.img` (guest memory as of `memory.epoch`), and
/// the checkpoint files after it. See `docs/checkpoint-format.md`.
pub struct DirectorySink {
    dir: PathBuf,
}

/// Name of a checkpoint file.
pub fn checkpoint_name(epoch: u64) -> String {
    format!("ckpt-{epoch:020}.mvc")
}

const MEMORY_IMAGE: &str = "memory.img";
/// Present when the guest of the chain ended the run itself: nothing to resume.
const FINISHED: &str = "finished";
const MEMORY_EPOCH: &str = "memory.epoch";

fn sync_dir(dir: &Path) -> Result<(), CheckpointError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("cannot sync directory", dir))
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

impl DirectorySink {
    /// A sink writing into `dir` (created if missing).
    pub fn new(dir: &Path) -> Result<Self, CheckpointError> {
        fs::create_dir_all(dir).map_err(io("cannot create checkpoint directory", dir))?;
        Ok(DirectorySink {
            dir: dir.to_path_buf(),
        })
    }

    fn write_epoch_file(&self, epoch: u64) -> Result<(), CheckpointError> {
        let tmp = self.dir.join("memory.epoch.tmp");
        let dst = self.dir.join(MEMORY_EPOCH);
        let mut f = File::create(&tmp).map_err(io("cannot create", &tmp))?;
        f.write_all(format!("{epoch}\n").as_bytes())
            .map_err(io("cannot write", &tmp))?;
        f.sync_all().map_err(io("cannot sync", &tmp))?;
        fs::rename(&tmp, &dst).map_err(io("cannot rename", &tmp))?;
        sync_dir(&self.dir)
    }
}

impl CheckpointSink for DirectorySink {
    /// Durability order: the old chain is removed first (its checkpoints describe
    /// another image), then `memory.img` is written under a temporary name, synced,
    /// renamed, and `memory.epoch` set to `epoch`. All-zero MiB are left as holes.
    fn write_base(&mut self, mem: &GuestMemory, epoch: u64) -> Result<u64, CheckpointError> {
        let _ = fs::remove_file(self.dir.join(MEMORY_EPOCH));
        let _ = fs::remove_file(self.dir.join(FINISHED));
        self.remove_older(u64::MAX)?;
        sync_dir(&self.dir)?;
        let tmp = self.dir.join("memory.img.tmp");
        let img = self.dir.join(MEMORY_IMAGE);
        let f = File::create(&tmp).map_err(io("cannot create", &tmp))?;
        let total: u64 = mem.iter().map(|r| r.len()).sum();
        f.set_len(total).map_err(io("cannot size", &tmp))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut off = 0u64;
        let mut written = 0u64;
        for r in mem.iter() {
            let mut done = 0u64;
            while done < r.len() {
                let n = (r.len() - done).min(buf.len() as u64) as usize;
                let gpa = r.start_addr().0 + done;
                mem.read_slice(&mut buf[..n], GuestAddress(gpa))
                    .map_err(|_| CheckpointError::PageOutside {
                        path: tmp.clone(),
                        addr: gpa,
                    })?;
                if buf[..n].iter().any(|b| *b != 0) {
                    f.write_all_at(&buf[..n], off + done)
                        .map_err(io("cannot write", &tmp))?;
                    written += n as u64;
                }
                done += n as u64;
            }
            off += r.len();
        }
        f.sync_all().map_err(io("cannot sync", &tmp))?;
        fs::rename(&tmp, &img).map_err(io("cannot rename", &tmp))?;
        self.write_epoch_file(epoch)?;
        Ok(written)
    }

    /// Durability order: the checkpoint file is written under a temporary name,
    /// synced, renamed, and the directory synced: from here on the checkpoint is
    /// complete. Then its pages are folded into `memory.img`, which is synced,
    /// `memory.epoch` advanced, and older checkpoint files removed. A crash anywhere
    /// leaves the previous or this checkpoint restorable: replaying a half-folded
    /// checkpoint over the image is idempotent.
    fn write(&mut self, c: &Checkpoint, layout: &[(u64, u64)]) -> Result<u64, CheckpointError> {
        let img = self.dir.join(MEMORY_IMAGE);
        let name = checkpoint_name(c.epoch);
        let tmp = self.dir.join(format!("{name}.tmp"));
        let dst = self.dir.join(&name);
        let file = File::create(&tmp).map_err(io("cannot create", &tmp))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
        let written = write_file(&mut w, c, true).map_err(io("cannot write", &tmp))?;
        let f = w.into_inner().map_err(|e| CheckpointError::Io {
            what: "cannot write",
            path: tmp.clone(),
            source: e.into_error(),
        })?;
        f.sync_all().map_err(io("cannot sync", &tmp))?;
        fs::rename(&tmp, &dst).map_err(io("cannot rename", &tmp))?;
        sync_dir(&self.dir)?;
        // Complete. Fold it into the image so the directory stays bounded.
        let f = OpenOptions::new()
            .write(true)
            .open(&img)
            .map_err(io("cannot open", &img))?;
        for (i, &gpa) in c.pages.addrs.iter().enumerate() {
            let off = image_offset(layout, gpa).ok_or(CheckpointError::PageOutside {
                path: img.clone(),
                addr: gpa,
            })?;
            f.write_all_at(&c.pages.data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE], off)
                .map_err(io("cannot write", &img))?;
        }
        f.sync_data().map_err(io("cannot sync", &img))?;
        self.write_epoch_file(c.epoch)?;
        self.remove_older(c.epoch)?;
        Ok(written)
    }
}

impl DirectorySink {
    fn remove_older(&self, epoch: u64) -> Result<(), CheckpointError> {
        for (e, path) in list_checkpoints(&self.dir)? {
            if e < epoch {
                fs::remove_file(&path).map_err(io("cannot remove", &path))?;
            }
        }
        Ok(())
    }
}

/// The checkpoint files in `dir`, by epoch.
pub fn list_checkpoints(dir: &Path) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io("cannot read directory", dir))? {
        let entry = entry.map_err(io("cannot read directory", dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(num) = name
            .strip_prefix("ckpt-")
            .and_then(|n| n.strip_suffix(".mvc"))
        {
            if let Ok(e) = num.parse::<u64>() {
                out.push((e, entry.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The latest complete checkpoint in `dir`, with guest memory rebuilt into `mem`
/// (which must have the checkpoint's layout: build it from [`peek_config`]).
pub fn load_latest(dir: &Path, mem: &GuestMemory) -> Result<LoadedCheckpoint, CheckpointError> {
    check_not_finished(dir)?;
    let files = list_checkpoints(dir)?;
    let Some((latest, _)) = files.last().cloned() else {
        return Err(CheckpointError::NoCheckpoint(dir.to_path_buf()));
    };
    let base = match fs::read_to_string(dir.join(MEMORY_EPOCH)) {
        Ok(s) => s.trim().parse::<u64>().ok(),
        Err(_) => None,
    };
    let Some(base) = base else {
        return Err(CheckpointError::NoCheckpoint(dir.to_path_buf()));
    };
    if latest <= base && !dir.join(checkpoint_name(base)).exists() {
        return Err(CheckpointError::NoCheckpoint(dir.to_path_buf()));
    }
    // Load the image.
    let img = dir.join(MEMORY_IMAGE);
    let f = File::open(&img).map_err(io("cannot open", &img))?;
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    let actual = f.metadata().map_err(io("cannot stat", &img))?.len();
    if actual != total {
        return Err(CheckpointError::ImageSize {
            path: img,
            expected: total,
            actual,
        });
    }
    let mut off = 0u64;
    for r in mem.iter() {
        let mut buf = vec![0u8; 1 << 20];
        let mut done = 0u64;
        while done < r.len() {
            let n = (r.len() - done).min(buf.len() as u64) as usize;
            f.read_exact_at(&mut buf[..n], off + done)
                .map_err(io("cannot read", &img))?;
            mem.write_slice(&buf[..n], GuestAddress(r.start_addr().0 + done))
                .map_err(|_| CheckpointError::PageOutside {
                    path: img.clone(),
                    addr: r.start_addr().0 + done,
                })?;
            done += n as u64;
        }
        off += r.len();
    }
    // Replay every checkpoint after the image, in order; the last one's state wins.
    let mut last = None;
    for epoch in base..=latest {
        let path = dir.join(checkpoint_name(epoch));
        if !path.exists() {
            if epoch == base {
                continue; // the image's own checkpoint file may be gone once folded into a later one
            }
            return Err(CheckpointError::Gap {
                dir: dir.to_path_buf(),
                epoch,
                base,
            });
        }
        let max_pages = total / PAGE_SIZE as u64;
        let c = read_file(&path, max_pages)?;
        if c.epoch != epoch {
            return Err(CheckpointError::EpochMismatch {
                path,
                header: c.epoch,
                name: epoch,
            });
        }
        for (i, &gpa) in c.pages.addrs.iter().enumerate() {
            mem.write_slice(
                &c.pages.data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE],
                GuestAddress(gpa),
            )
            .map_err(|_| CheckpointError::PageOutside {
                path: path.clone(),
                addr: gpa,
            })?;
        }
        last = Some(c);
    }
    last.ok_or_else(|| CheckpointError::NoCheckpoint(dir.to_path_buf()))
}

/// The saved configuration of the latest checkpoint in `dir`.
pub fn peek_config(dir: &Path) -> Result<SavedConfig, CheckpointError> {
    check_not_finished(dir)?;
    let files = list_checkpoints(dir)?;
    let (_, path) = files
        .last()
        .ok_or_else(|| CheckpointError::NoCheckpoint(dir.to_path_buf()))?;
    Ok(read_state_only(path)?.config)
}

/// Marks `dir` as the chain of a guest that ended its run itself (`how`).
pub fn mark_finished(dir: &Path, how: &str) -> Result<(), CheckpointError> {
    let path = dir.join(FINISHED);
    fs::write(&path, format!("{how}\n")).map_err(io("cannot write", &path))?;
    sync_dir(dir)
}

fn check_not_finished(dir: &Path) -> Result<(), CheckpointError> {
    match fs::read_to_string(dir.join(FINISHED)) {
        Ok(how) => Err(CheckpointError::Finished {
            dir: dir.to_path_buf(),
            how: how.trim().to_string(),
        }),
        Err(_) => Ok(()),
    }
}
