//! A fault-injecting file layer for tests: in-memory files that know which of their
//! writes are durable (synced), can be armed to "crash" after a number of operations,
//! and at a crash keep only what a real power loss could leave behind.

// Casts here are on test-controlled constants and small test sizes.
#![allow(clippy::cast_possible_truncation)]

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use super::io::StoreFile;

/// What a crash does to the writes made since a file's last sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashMode {
    /// Drop them all, except the last one, which is torn at a random byte.
    TearLast,
    /// Each one independently survives whole, is dropped, or is torn at a random
    /// byte (page-cache write-back happens in any order).
    Any,
}

#[derive(Debug, Default)]
struct FileState {
    durable: Vec<u8>,
    current: Vec<u8>,
    pending: Vec<(u64, Vec<u8>)>,
}

/// One recorded operation (for the torn-write test).
#[derive(Debug, Clone)]
pub enum LogOp {
    /// A write to file `file`.
    Write {
        file: usize,
        offset: u64,
        data: Vec<u8>,
    },
    /// A sync of file `file`.
    Sync { file: usize },
    /// A length change of file `file`.
    SetLen { file: usize, len: u64 },
}

#[derive(Debug, Default)]
struct World {
    files: Vec<FileState>,
    /// Operations (writes and syncs) left before the simulated crash.
    budget: Option<u64>,
    crashed: bool,
    log: Option<Vec<LogOp>>,
    ops: u64,
}

/// A set of files that crash together.
#[derive(Debug, Clone, Default)]
pub struct FaultWorld {
    inner: Arc<Mutex<World>>,
}

/// One file of a [`FaultWorld`].
#[derive(Debug, Clone)]
pub struct FaultFile {
    world: Arc<Mutex<World>>,
    id: usize,
}

fn crashed() -> io::Error {
    io::Error::other("simulated crash")
}

/// Whether an error is the simulated crash.
pub fn is_crash(e: &super::Error) -> bool {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = src {
        if s.to_string() == "simulated crash" {
            return true;
        }
        src = s.source();
    }
    false
}

impl FaultWorld {
    /// A new, empty world.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, World> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a file with durable contents `data`.
    pub fn file(&self, data: Vec<u8>) -> FaultFile {
        let mut w = self.lock();
        w.files.push(FileState {
            durable: data.clone(),
            current: data,
            pending: Vec::new(),
        });
        FaultFile {
            world: Arc::clone(&self.inner),
            id: w.files.len() - 1,
        }
    }

    /// Crash after `ops` more writes or syncs: that operation fails (a write may be
    /// partly applied), and so does everything after it.
    pub fn arm(&self, ops: u64) {
        self.lock().budget = Some(ops);
    }

    /// Cancels an armed crash that has not happened yet.
    pub fn disarm(&self) {
        let mut w = self.lock();
        if !w.crashed {
            w.budget = None;
        }
    }

    /// Whether file `id` has writes that are not durable.
    pub fn has_pending(&self, id: usize) -> bool {
        !self.lock().files[id].pending.is_empty()
    }

    /// Starts recording every write and sync.
    pub fn record(&self) {
        self.lock().log = Some(Vec::new());
    }

    /// The recorded operations.
    pub fn log(&self) -> Vec<LogOp> {
        self.lock().log.clone().unwrap_or_default()
    }

    /// Simulates a power loss: every file keeps its durable contents plus what
    /// `mode` lets survive of its pending writes, chosen with `rng`. The world is
    /// usable again afterwards (disarmed) with the surviving contents.
    pub fn crash(&self, mode: CrashMode, rng: &mut impl FnMut() -> u64) {
        let mut w = self.lock();
        for f in &mut w.files {
            let pending = std::mem::take(&mut f.pending);
            let n = pending.len();
            for (i, (off, data)) in pending.into_iter().enumerate() {
                let keep = match mode {
                    CrashMode::TearLast if i + 1 == n => tear(data.len(), rng),
                    CrashMode::TearLast => 0,
                    CrashMode::Any => match rng() % 3 {
                        0 => data.len(),
                        1 => 0,
                        _ => tear(data.len(), rng),
                    },
                };
                apply(&mut f.durable, off, &data[..keep]);
            }
            f.current = f.durable.clone();
        }
        w.budget = None;
        w.crashed = false;
    }

    /// The durable contents of file `id`.
    pub fn durable(&self, id: usize) -> Vec<u8> {
        self.lock().files[id].durable.clone()
    }
}

fn tear(len: usize, rng: &mut impl FnMut() -> u64) -> usize {
    if len == 0 {
        0
    } else {
        (rng() % len as u64) as usize
    }
}

/// Applies a write to a byte vector, extending it.
pub fn apply(v: &mut Vec<u8>, off: u64, data: &[u8]) {
    let off = off as usize;
    if v.len() < off + data.len() {
        v.resize(off + data.len(), 0);
    }
    v[off..off + data.len()].copy_from_slice(data);
}

impl FaultFile {
    fn lock(&self) -> MutexGuard<'_, World> {
        self.world.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// This file's index in its world.
    pub fn id(&self) -> usize {
        self.id
    }
}

/// Counts an operation against the budget; `Err` if the crash happens now.
fn tick(w: &mut World) -> io::Result<()> {
    if w.crashed {
        return Err(crashed());
    }
    w.ops += 1;
    if let Some(b) = w.budget.as_mut() {
        if *b == 0 {
            w.crashed = true;
            return Err(crashed());
        }
        *b -= 1;
    }
    Ok(())
}

impl StoreFile for FaultFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let w = self.lock();
        if w.crashed {
            return Err(crashed());
        }
        let f = &w.files[self.id];
        let start = offset as usize;
        let src = f
            .current
            .get(start..start + buf.len())
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "short read"))?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut w = self.lock();
        if let Err(e) = tick(&mut w) {
            if w.crashed && w.budget == Some(0) {
                // The write in flight at the crash may be partly on disk.
                w.budget = None;
                w.files[self.id].pending.push((offset, buf.to_vec()));
            }
            return Err(e);
        }
        let id = self.id;
        if let Some(log) = w.log.as_mut() {
            log.push(LogOp::Write {
                file: id,
                offset,
                data: buf.to_vec(),
            });
        }
        let f = &mut w.files[id];
        apply(&mut f.current, offset, buf);
        f.pending.push((offset, buf.to_vec()));
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        let mut w = self.lock();
        tick(&mut w)?;
        let id = self.id;
        if let Some(log) = w.log.as_mut() {
            log.push(LogOp::Sync { file: id });
        }
        let f = &mut w.files[id];
        for (off, data) in std::mem::take(&mut f.pending) {
            apply(&mut f.durable, off, &data);
        }
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        let w = self.lock();
        if w.crashed {
            return Err(crashed());
        }
        Ok(w.files[self.id].current.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut w = self.lock();
        if w.crashed {
            return Err(crashed());
        }
        // Treated as metadata made durable at once (only journal creation uses it,
        // and a sync follows).
        let id = self.id;
        if let Some(log) = w.log.as_mut() {
            log.push(LogOp::SetLen { file: id, len });
        }
        let f = &mut w.files[id];
        f.current.resize(len as usize, 0);
        f.durable.resize(len as usize, 0);
        for (off, data) in &mut f.pending {
            let end = (*off as usize).saturating_add(data.len());
            if *off as usize >= len as usize {
                data.clear();
            } else if end > len as usize {
                data.truncate(len as usize - *off as usize);
            }
        }
        Ok(())
    }
}
