//! The witness-file fence: the lock a standby must hold before it resumes the guest,
//! so that two running copies of one guest (split brain) never exist.
//!
//! The fence is an exclusive OFD lock ([`devices::lock`]) on a *witness file* that
//! both hosts' mirrorvm processes reach. The running primary holds it. A standby takes
//! over only once it holds it: then it checks that its replica is not older than the
//! recorded "unprotected since" epoch, and bumps the *fence generation* (not the
//! store's slot generation), which frames carry so that a fenced primary's traffic is
//! refused. The kernel releases the lock of a dead process at once, so failover stays
//! fast; a primary that is alive but silent (stopped, cut off) keeps it, and the
//! standby waits.
//!
//! A standby waits for the lock by blocking in the kernel, not by polling: a helper
//! thread owns its own open of the witness file and sleeps in `F_OFD_SETLKW`
//! ([`Witness::start_wait`], [`FenceWait`]), and the kernel grants it the lock the
//! moment the holder's last descriptor closes, so a killed primary's fence passes to
//! the standby as soon as its process is torn down. The requester waits on the thread
//! with or without a deadline ([`Witness::acquire`] has one, the standby's take-over
//! none). This was chosen over a short-interval poll because a refused attempt is not
//! cheap here: it names the holder by scanning `/proc` (every process's fds, since
//! `/proc/locks` shows no pid for OFD locks), which at 1–2 ms intervals would cost a
//! core on a busy host, and the old 50 ms interval added up to 50 ms to every
//! failover whose primary was still being torn down at the first try. What a blocking
//! wait costs instead is cancellation: nothing but a signal wakes a thread blocked in
//! `F_OFD_SETLKW`, and mirrorvm sends its threads no signals for this. So a given-up
//! wait is handled by ownership: its thread owns the only descriptor of its open file
//! description, and when the lock is finally granted to a requester that has gone, it
//! unlocks and closes it at once instead of handing it over. A given-up wait therefore
//! never holds the fence beyond that instant; its thread stays blocked (holding
//! nothing: a blocked request conflicts with no lock) until the holder goes.
//!
//! The file is never unlinked or replaced (a newcomer would lock a fresh inode while
//! the holder still locks the old one): after locking, the path must still name the
//! locked inode. It holds a small record, written in place as two checksummed copies
//! so that a torn write always leaves the previous record readable. The layout and the
//! rules are specified in `docs/fencing.md`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::codec::{Crc32cHeader, FromBytes, Immutable, IntoBytes, KnownLayout, U32, U64};
use devices::lock::{lock_file, lock_file_wait, unlock_file, Holder, LockError, LockKind};

/// Magic at the start of each record copy.
pub const MAGIC: [u8; 8] = *b"MVFENCE\0";
/// Record format version this code reads and writes.
pub const VERSION: u32 = 1;
/// Size of one record copy.
pub const RECORD_LEN: usize = 64;
/// File offsets of the two record copies. They sit in separate 512-byte sectors, so a
/// torn write of one never touches the other.
pub const COPY_OFFSETS: [u64; 2] = [0, 512];
/// Record flag: the `unprotected_since` field holds an epoch.
pub const FLAG_UNPROTECTED: u32 = 1;

/// What the witness file is, in lock errors.
const WHAT: &str = "witness file";

/// One record copy as laid out on disk (little-endian).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct RawRecord {
    magic: [u8; 8],
    version: U32,
    flags: U32,
    seq: U64,
    fence_generation: U64,
    unprotected_since: U64,
    reserved: [u8; 20],
    crc: U32,
}

const _: () = assert!(size_of::<RawRecord>() == RECORD_LEN);

/// The last four bytes are the CRC32C of the rest.
impl Crc32cHeader for RawRecord {}

/// The fence's durable state, as the newest valid record copy holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Record {
    /// Write counter: of two valid copies, the higher one counts. 0 for a fresh file.
    pub seq: u64,
    /// The fence generation: bumped by every standby that takes over. 0 for a fresh
    /// file.
    pub fence_generation: u64,
    /// The first epoch a replica must have reached to resume, recorded by a primary
    /// that went on without its standby; `None` if no primary ever did.
    pub unprotected_since: Option<u64>,
}

/// Why one record copy is not usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CopyProblem {
    /// The copy does not start with the witness magic.
    #[error("bad magic")]
    BadMagic,
    /// The copy's CRC does not match its bytes (a torn write, or damage).
    #[error("checksum mismatch")]
    Crc,
    /// Written by another version of the format.
    #[error("format version {0}")]
    Version(u32),
    /// Unknown flags or non-zero reserved bytes.
    #[error("unknown flags or reserved bytes set")]
    Reserved,
}

/// Failures of the fence.
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    /// The witness file could not be opened or created.
    #[error("cannot open or create the witness file {path}")]
    Open {
        /// The witness file.
        path: PathBuf,
        /// The error of `open`.
        #[source]
        source: io::Error,
    },
    /// Another open of the witness file holds the fence: a primary (or a standby that
    /// took over) is alive.
    #[error("witness file {path} is held by {holder}: the process holding the fence is alive")]
    Held {
        /// The witness file.
        path: PathBuf,
        /// Who holds it, as far as `/proc` tells (a process on another host is
        /// [`Holder::Unknown`]).
        holder: Holder,
    },
    /// A standby waited for the fence until its deadline and it is still held.
    #[error(
        "witness file {path} is still held by {holder} after {:.1}s: the primary is alive; not taking over",
        waited.as_secs_f64()
    )]
    StillHeld {
        /// The witness file.
        path: PathBuf,
        /// Who held it at the last attempt.
        holder: Holder,
        /// How long the standby waited.
        waited: Duration,
    },
    /// The kernel refused the lock for another reason than a conflict (a file system
    /// without OFD locks, no memory for the lock).
    #[error("cannot lock the witness file {path}")]
    Lock {
        /// The witness file.
        path: PathBuf,
        /// The refusal.
        #[source]
        source: LockError,
    },
    /// The path no longer names the locked file: it was replaced (renamed over) or
    /// removed, so the lock excludes nobody who opens the path now.
    #[error(
        "witness file {path} was replaced or removed while locked: the lock no longer fences \
         anyone; the witness file must never be deleted or replaced"
    )]
    Replaced {
        /// The witness file.
        path: PathBuf,
        /// The error of `stat` on the path, if it no longer exists.
        #[source]
        source: Option<io::Error>,
    },
    /// Reading the record failed.
    #[error("cannot read the witness file {path}")]
    Read {
        /// The witness file.
        path: PathBuf,
        /// The error of `pread` or `fstat`.
        #[source]
        source: io::Error,
    },
    /// Writing or syncing the record failed. It may or may not be durable: the caller
    /// must act as if it was not written (a primary keeps holding its output, a standby
    /// does not resume).
    #[error("cannot write the fence record to the witness file {path}")]
    Write {
        /// The witness file.
        path: PathBuf,
        /// The error of `pwrite` or `fdatasync`.
        #[source]
        source: io::Error,
    },
    /// Neither record copy is valid, and they are not both blank: the file is damaged,
    /// or not a witness file. Nothing can be concluded about the fence generation.
    #[error(
        "witness file {path} holds no valid fence record (first copy: {first}; second copy: \
         {second}); it is damaged or not a mirrorvm witness file"
    )]
    Corrupt {
        /// The witness file.
        path: PathBuf,
        /// What is wrong with the first copy ("blank" if all zero).
        first: String,
        /// What is wrong with the second copy.
        second: String,
    },
    /// A record copy was written by a newer mirrorvm.
    #[error("witness file {path} has fence record version {found}; this mirrorvm reads version {VERSION}")]
    Version {
        /// The witness file.
        path: PathBuf,
        /// The version found.
        found: u32,
    },
    /// The standby's replica is older than the epoch from which the primary ran
    /// without a standby: resuming it would undo what the world already saw.
    #[error(
        "the replica is at epoch {replica}, but the primary ran unprotected from epoch \
         {unprotected_since} on (witness file {path}): this replica is stale and must never resume"
    )]
    StaleReplica {
        /// The witness file.
        path: PathBuf,
        /// The replica's epoch.
        replica: u64,
        /// The recorded "unprotected since" epoch.
        unprotected_since: u64,
    },
    /// The thread that waits for the lock could not be started.
    #[error("cannot start waiting for the lock on the witness file {path}")]
    Wait {
        /// The witness file.
        path: PathBuf,
        /// The error of spawning the thread.
        #[source]
        source: io::Error,
    },
    /// A [`FenceWait`] was asked again after it had returned the fence or an error.
    #[error("the wait for the witness file {path} already ended")]
    WaitEnded {
        /// The witness file.
        path: PathBuf,
    },
    /// The fence generation or the record's write counter cannot grow any further
    /// (only a damaged file can get there).
    #[error("the fence generation or record counter in witness file {path} is exhausted")]
    Exhausted {
        /// The witness file.
        path: PathBuf,
    },
}

/// Decodes one record copy: `Ok(None)` if it is blank (all zero, never written).
fn decode_copy(bytes: &[u8; RECORD_LEN]) -> Result<Option<Record>, CopyProblem> {
    if bytes.iter().all(|&b| b == 0) {
        return Ok(None);
    }
    let raw = RawRecord::ref_from_bytes(bytes.as_slice()).map_err(|_| CopyProblem::BadMagic)?;
    if raw.magic != MAGIC {
        return Err(CopyProblem::BadMagic);
    }
    raw.check_crc().map_err(|_| CopyProblem::Crc)?;
    let version = raw.version.get();
    if version != VERSION {
        return Err(CopyProblem::Version(version));
    }
    let flags = raw.flags.get();
    let unprotected = raw.unprotected_since.get();
    if flags & !FLAG_UNPROTECTED != 0
        || raw.reserved.iter().any(|&b| b != 0)
        || (flags & FLAG_UNPROTECTED == 0 && unprotected != 0)
    {
        return Err(CopyProblem::Reserved);
    }
    Ok(Some(Record {
        seq: raw.seq.get(),
        fence_generation: raw.fence_generation.get(),
        unprotected_since: (flags & FLAG_UNPROTECTED != 0).then_some(unprotected),
    }))
}

/// Encodes one record copy.
fn encode_copy(r: &Record) -> [u8; RECORD_LEN] {
    let mut raw = RawRecord {
        magic: MAGIC,
        version: U32::new(VERSION),
        flags: U32::new(if r.unprotected_since.is_some() {
            FLAG_UNPROTECTED
        } else {
            0
        }),
        seq: U64::new(r.seq),
        fence_generation: U64::new(r.fence_generation),
        unprotected_since: U64::new(r.unprotected_since.unwrap_or(0)),
        reserved: [0; 20],
        crc: U32::ZERO,
    };
    raw.seal();
    let mut out = [0u8; RECORD_LEN];
    out.copy_from_slice(raw.as_bytes());
    out
}

/// Chooses the current record from the two copies: the valid one with the higher
/// sequence number. Returns it and the index of the copy holding it (`None` for a
/// fresh file, both copies blank).
fn choose(
    path: &Path,
    copies: [Result<Option<Record>, CopyProblem>; 2],
) -> Result<(Record, Option<usize>), FenceError> {
    // A copy from a newer format must not be ignored in favour of an older one.
    for c in &copies {
        if let Err(CopyProblem::Version(found)) = c {
            if *found > VERSION {
                return Err(FenceError::Version {
                    path: path.to_owned(),
                    found: *found,
                });
            }
        }
    }
    match copies {
        [Ok(Some(a)), Ok(Some(b))] => Ok(if b.seq > a.seq {
            (b, Some(1))
        } else {
            (a, Some(0))
        }),
        [Ok(Some(a)), _] => Ok((a, Some(0))),
        [_, Ok(Some(b))] => Ok((b, Some(1))),
        [Ok(None), Ok(None)] => Ok((Record::default(), None)),
        // One copy damaged and the other blank is not a fresh file: the damaged copy
        // may have held a generation already handed out.
        [a, b] => {
            let why = |c: Result<Option<Record>, CopyProblem>| match c {
                Ok(_) => "blank".to_owned(),
                Err(p) => p.to_string(),
            };
            Err(FenceError::Corrupt {
                path: path.to_owned(),
                first: why(a),
                second: why(b),
            })
        }
    }
}

/// Reads both record copies of `file`; bytes past its end read as zero.
fn read_copies(file: &File, path: &Path) -> Result<[[u8; RECORD_LEN]; 2], FenceError> {
    let mut out = [[0u8; RECORD_LEN]; 2];
    for (buf, &offset) in out.iter_mut().zip(COPY_OFFSETS.iter()) {
        let mut done = 0;
        while done < RECORD_LEN {
            let at = offset + done as u64;
            match file.read_at(&mut buf[done..], at) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(FenceError::Read {
                        path: path.to_owned(),
                        source,
                    })
                }
            }
        }
    }
    Ok(out)
}

/// The witness file named by `--witness PATH`: where the fence is taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Witness {
    path: PathBuf,
}

/// The result of one attempt at the fence.
#[derive(Debug)]
pub enum Attempt {
    /// The fence is ours.
    Acquired(Fence),
    /// Another open of the witness file holds it.
    Busy(Holder),
}

impl Witness {
    /// The witness file at `path` (nothing is opened yet).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Witness { path: path.into() }
    }

    /// The witness file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes the fence without waiting, as a starting primary does: opens the witness
    /// file (creating it if missing, never truncating or replacing it), locks it
    /// exclusively, checks that the path still names the locked file, and reads the
    /// record. A fence held elsewhere is [`FenceError::Held`].
    pub fn open(&self) -> Result<Fence, FenceError> {
        match self.try_acquire()? {
            Attempt::Acquired(f) => Ok(f),
            Attempt::Busy(holder) => Err(FenceError::Held {
                path: self.path.clone(),
                holder,
            }),
        }
    }

    /// One attempt at the fence, as [`Witness::open`], except that a fence held
    /// elsewhere is an answer ([`Attempt::Busy`]), not an error.
    pub fn try_acquire(&self) -> Result<Attempt, FenceError> {
        lock_and_load(self.open_file()?, &self.path)
    }

    /// Opens (or creates) the witness file, never truncating or replacing it.
    fn open_file(&self) -> Result<File, FenceError> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&self.path)
            .map_err(|source| FenceError::Open {
                path: self.path.clone(),
                source,
            })
    }

    /// Waits for the fence until `deadline`, as a standby that may give up does: one
    /// attempt without waiting, then, while another process holds it, a blocking wait
    /// ([`Witness::start_wait`]) that takes the lock the moment its holder releases it.
    /// A holder still alive at the deadline is [`FenceError::StillHeld`] (naming the
    /// holder the first attempt found), and this process then holds no lock on the
    /// witness file (see [`FenceWait`]); any other failure is returned at once. Each
    /// call that hits its deadline leaves a thread blocked until the holder goes: to
    /// wait in slices, keep one [`FenceWait`] and call [`FenceWait::wait_until`] again.
    pub fn acquire(&self, deadline: Instant) -> Result<Fence, FenceError> {
        let start = Instant::now();
        let holder = match self.try_acquire()? {
            Attempt::Acquired(f) => return Ok(f),
            Attempt::Busy(holder) => holder,
        };
        let mut wait = self.start_wait()?;
        match wait.wait_until(deadline)? {
            Some(f) => Ok(f),
            None => Err(FenceError::StillHeld {
                path: self.path.clone(),
                holder,
                waited: start.elapsed(),
            }),
        }
    }

    /// Starts waiting for the fence: opens the witness file and hands it to a thread
    /// that blocks in `F_OFD_SETLKW` until the kernel grants the lock. The returned
    /// [`FenceWait`] collects the fence, with or without a deadline; dropping it gives
    /// the wait up.
    pub fn start_wait(&self) -> Result<FenceWait, FenceError> {
        let file = self.open_file()?;
        let shared = Arc::new(WaitShared {
            state: Mutex::new(WaitState::Waiting),
            changed: Condvar::new(),
        });
        let (path, theirs) = (self.path.clone(), shared.clone());
        let thread = std::thread::Builder::new()
            .name("fence-wait".to_owned())
            .spawn(move || wait_for_lock(file, &path, &theirs))
            .map_err(|source| FenceError::Wait {
                path: self.path.clone(),
                source,
            })?;
        Ok(FenceWait {
            path: self.path.clone(),
            shared,
            thread: Some(thread),
        })
    }
}

/// Where a [`FenceWait`] and its thread meet.
#[derive(Debug)]
struct WaitShared {
    state: Mutex<WaitState>,
    /// Signalled when the thread's wait ends.
    changed: Condvar,
}

impl WaitShared {
    fn lock(&self) -> MutexGuard<'_, WaitState> {
        // Neither side panics while holding it; a poisoned state is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The state of a wait for the lock.
#[derive(Debug)]
enum WaitState {
    /// The thread is blocked in the kernel, waiting for the lock.
    Waiting,
    /// The thread's wait ended: the file, locked, or why the kernel refused the lock.
    Done(Result<File, LockError>),
    /// The requester gave up: whatever the thread gets, it releases at once.
    Cancelled,
    /// The result was handed out (or released).
    Taken,
}

/// The body of a [`FenceWait`]'s thread: waits for the lock on `file`, which it alone
/// owns, then hands it over, or, if the requester has gone, releases it and closes
/// the file. It never holds the lock for anyone who is not there to take it.
fn wait_for_lock(file: File, path: &Path, shared: &WaitShared) {
    let r = lock_file_wait(&file, path, WHAT, LockKind::Exclusive);
    let mut state = shared.lock();
    if matches!(*state, WaitState::Cancelled) {
        *state = WaitState::Taken;
        drop(state);
        release(file);
        return;
    }
    *state = WaitState::Done(r.map(|()| file));
    shared.changed.notify_all();
}

/// Gives up a lock taken on `file` that no one will use: unlocks it explicitly (so
/// that no other descriptor of its description, such as a child's after a fork, keeps
/// it) and closes the file. An unlock that fails is followed by the close, which
/// releases the lock of the description's last descriptor anyway.
fn release(file: File) {
    let _ = unlock_file(&file);
    drop(file);
}

/// A wait for the fence in progress ([`Witness::start_wait`]): a thread blocked in
/// `F_OFD_SETLKW` on its own open of the witness file, which the kernel wakes the
/// moment the holder's lock is released (it unlocks, closes, or dies).
///
/// Dropping it gives the wait up: a lock already granted but not collected is
/// released at once; a thread still blocked stays blocked (nothing but a signal could
/// wake it) but holds nothing meanwhile, and when the kernel grants it the lock later
/// it releases it at once and ends, so a given-up wait never holds the fence on its
/// own. It does hold it for that instant, during which another process trying the
/// lock without waiting would be refused.
#[derive(Debug)]
pub struct FenceWait {
    path: PathBuf,
    shared: Arc<WaitShared>,
    /// The waiting thread; not joined (it may stay blocked as long as the holder
    /// lives).
    thread: Option<JoinHandle<()>>,
}

impl FenceWait {
    /// Waits until the fence is ours (`Ok(Some)`, its record read as in
    /// [`Witness::open`]) or `deadline` passes (`Ok(None)`: still held; wait again,
    /// or drop this to give up). After it returned the fence or an error the wait is
    /// over: another call is [`FenceError::WaitEnded`].
    pub fn wait_until(&mut self, deadline: Instant) -> Result<Option<Fence>, FenceError> {
        self.wait_for(Some(deadline))
    }

    /// Waits for the fence for as long as it takes.
    pub fn wait(mut self) -> Result<Fence, FenceError> {
        loop {
            if let Some(f) = self.wait_for(None)? {
                return Ok(f);
            }
        }
    }

    fn wait_for(&mut self, deadline: Option<Instant>) -> Result<Option<Fence>, FenceError> {
        let mut state = self.shared.lock();
        loop {
            match std::mem::replace(&mut *state, WaitState::Taken) {
                WaitState::Done(Ok(file)) => {
                    drop(state);
                    return load(file, &self.path).map(Some);
                }
                WaitState::Done(Err(source)) => {
                    return Err(FenceError::Lock {
                        path: self.path.clone(),
                        source,
                    })
                }
                WaitState::Taken | WaitState::Cancelled => {
                    return Err(FenceError::WaitEnded {
                        path: self.path.clone(),
                    })
                }
                WaitState::Waiting => *state = WaitState::Waiting,
            }
            state = match deadline {
                None => self
                    .shared
                    .changed
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner),
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Ok(None);
                    }
                    self.shared
                        .changed
                        .wait_timeout(state, deadline - now)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        }
    }

    /// Gives the wait up as dropping it does, and returns its thread, which ends once
    /// the kernel grants it the lock and it has released it (tests join it).
    #[cfg(test)]
    fn cancel(mut self) -> JoinHandle<()> {
        let thread = self.thread.take();
        drop(self);
        thread.expect("the thread is taken only here")
    }
}

impl Drop for FenceWait {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        match std::mem::replace(&mut *state, WaitState::Cancelled) {
            WaitState::Done(Ok(file)) => {
                *state = WaitState::Taken;
                drop(state);
                release(file);
            }
            WaitState::Done(Err(_)) | WaitState::Taken => *state = WaitState::Taken,
            WaitState::Waiting | WaitState::Cancelled => {}
        }
        // Detach the thread: it ends on its own once its wait ends.
        drop(self.thread.take());
    }
}

/// Locks the open witness file, checks that `path` still names it, and reads its
/// record.
fn lock_and_load(file: File, path: &Path) -> Result<Attempt, FenceError> {
    match lock_file(&file, path, WHAT, LockKind::Exclusive) {
        Ok(()) => {}
        Err(LockError::Busy { holder, .. }) => return Ok(Attempt::Busy(holder)),
        Err(source) => {
            return Err(FenceError::Lock {
                path: path.to_owned(),
                source,
            })
        }
    }
    load(file, path).map(Attempt::Acquired)
}

/// Once `file` is locked: checks that `path` still names it and reads its record.
/// On an error `file` is closed, which releases the lock.
fn load(file: File, path: &Path) -> Result<Fence, FenceError> {
    check_same_file(&file, path)?;
    let [a, b] = read_copies(&file, path)?;
    let (record, current) = choose(path, [decode_copy(&a), decode_copy(&b)])?;
    Ok(Fence {
        file,
        path: path.to_owned(),
        record,
        current,
    })
}

/// Checks that `path` names the very file `file` is open on (same device and inode).
fn check_same_file(file: &File, path: &Path) -> Result<(), FenceError> {
    let held = file.metadata().map_err(|source| FenceError::Read {
        path: path.to_owned(),
        source,
    })?;
    match std::fs::metadata(path) {
        Ok(now) if now.dev() == held.dev() && now.ino() == held.ino() => Ok(()),
        Ok(_) => Err(FenceError::Replaced {
            path: path.to_owned(),
            source: None,
        }),
        Err(source) => Err(FenceError::Replaced {
            path: path.to_owned(),
            source: Some(source),
        }),
    }
}

/// The held fence: the locked witness file and its record. The lock is released when
/// this value is dropped, or by the kernel when the process dies.
#[derive(Debug)]
pub struct Fence {
    file: File,
    path: PathBuf,
    record: Record,
    /// The copy holding `record` (`None`: a fresh file, nothing written yet). The next
    /// write goes to the other copy.
    current: Option<usize>,
}

impl Fence {
    /// The witness file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The fence generation: the one to put in frames (and journal records).
    pub fn generation(&self) -> u64 {
        self.record.fence_generation
    }

    /// The recorded "unprotected since" epoch, if any.
    pub fn unprotected_since(&self) -> Option<u64> {
        self.record.unprotected_since
    }

    /// The whole record, as last read or written.
    pub fn record(&self) -> Record {
        self.record
    }

    /// Bumps the fence generation, as a standby taking over does: the new generation
    /// is written and synced before this returns it, so frames of older generations
    /// can be refused.
    pub fn bump(&mut self) -> Result<u64, FenceError> {
        let generation =
            self.record
                .fence_generation
                .checked_add(1)
                .ok_or_else(|| FenceError::Exhausted {
                    path: self.path.clone(),
                })?;
        self.write(Record {
            fence_generation: generation,
            ..self.record
        })?;
        Ok(generation)
    }

    /// Records that the primary runs without a standby from `epoch` on: `epoch` is the
    /// first epoch whose output it releases without a standby's acknowledgement, so a
    /// replica older than it must never resume. Written and synced before this
    /// returns; the primary calls it before it releases anything.
    ///
    /// The record only ever rises: an `epoch` below the one already recorded leaves
    /// the higher one in place (it is still written and synced, which is harmless).
    pub fn record_unprotected_since(&mut self, epoch: u64) -> Result<(), FenceError> {
        let since = self
            .record
            .unprotected_since
            .map_or(epoch, |old| old.max(epoch));
        self.write(Record {
            unprotected_since: Some(since),
            ..self.record
        })
    }

    /// Checks that a replica at `replica_epoch` may resume: it must not be older than
    /// the recorded "unprotected since" epoch.
    pub fn check_replica(&self, replica_epoch: u64) -> Result<(), FenceError> {
        match self.record.unprotected_since {
            Some(since) if replica_epoch < since => Err(FenceError::StaleReplica {
                path: self.path.clone(),
                replica: replica_epoch,
                unprotected_since: since,
            }),
            _ => Ok(()),
        }
    }

    /// A standby's whole take-over once it holds the fence: checks its replica
    /// ([`Fence::check_replica`]), then bumps the generation ([`Fence::bump`]) and
    /// returns the new one. A stale replica leaves the record untouched.
    pub fn take_over(&mut self, replica_epoch: u64) -> Result<u64, FenceError> {
        self.check_replica(replica_epoch)?;
        self.bump()
    }

    /// Checks that the fence is still held: the path still names the locked file. A
    /// holder that cannot prove it (the file was replaced or removed) must hold its
    /// output and stop retiring.
    pub fn check_held(&self) -> Result<(), FenceError> {
        check_same_file(&self.file, &self.path)
    }

    /// Writes `record` (with the next sequence number) to the copy that does not hold
    /// the current record, syncs it, and only then makes it current.
    fn write(&mut self, record: Record) -> Result<(), FenceError> {
        let seq = self
            .record
            .seq
            .checked_add(1)
            .ok_or_else(|| FenceError::Exhausted {
                path: self.path.clone(),
            })?;
        let record = Record { seq, ..record };
        let target = match self.current {
            Some(0) => 1,
            _ => 0,
        };
        let io_err = |source| FenceError::Write {
            path: self.path.clone(),
            source,
        };
        self.file
            .write_all_at(&encode_copy(&record), COPY_OFFSETS[target])
            .map_err(io_err)?;
        self.file.sync_data().map_err(io_err)?;
        self.record = record;
        self.current = Some(target);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    /// The environment variable that makes [`child_holds_witness`] hold a witness file.
    const HOLD_ENV: &str = "MIRRORVM_TEST_FENCE_HOLD";
    /// The line the child prints once it holds the fence.
    const HELD_LINE: &str = "FENCE-HELD";

    fn scratch() -> (tempfile::TempDir, Witness) {
        let dir = tempfile::tempdir().unwrap();
        let w = Witness::new(dir.path().join("witness"));
        (dir, w)
    }

    fn read_raw(w: &Witness) -> Vec<u8> {
        std::fs::read(w.path()).unwrap()
    }

    fn write_raw(w: &Witness, offset: u64, bytes: &[u8]) {
        let f = OpenOptions::new().write(true).open(w.path()).unwrap();
        f.write_all_at(bytes, offset).unwrap();
    }

    #[test]
    fn fence_fresh_file_is_generation_zero_and_created() {
        let (_d, w) = scratch();
        let f = w.open().unwrap();
        assert_eq!(f.generation(), 0);
        assert_eq!(f.unprotected_since(), None);
        assert_eq!(f.record(), Record::default());
        assert!(w.path().exists());
        // Reading writes nothing.
        assert_eq!(std::fs::metadata(w.path()).unwrap().len(), 0);
        f.check_replica(0).unwrap();
    }

    #[test]
    fn fence_two_opens_in_one_process_conflict() {
        let (_d, w) = scratch();
        let held = w.open().unwrap();
        let e = w.open().unwrap_err();
        match &e {
            FenceError::Held { holder, .. } => assert_eq!(*holder, Holder::ThisProcess),
            other => panic!("not Held: {other:?}"),
        }
        assert!(
            e.to_string()
                .starts_with(&format!("witness file {} is held by ", w.path().display())),
            "{e}"
        );
        assert!(matches!(w.try_acquire().unwrap(), Attempt::Busy(_)));
        drop(held);
        assert!(matches!(w.try_acquire().unwrap(), Attempt::Acquired(_)));
    }

    #[test]
    fn fence_acquire_times_out_while_held_and_succeeds_once_released() {
        let (_d, w) = scratch();
        let held = w.open().unwrap();
        let e = w
            .acquire(Instant::now() + Duration::from_millis(120))
            .unwrap_err();
        match &e {
            FenceError::StillHeld { waited, .. } => {
                assert!(*waited >= Duration::from_millis(120), "{waited:?}")
            }
            other => panic!("not StillHeld: {other:?}"),
        }
        assert!(
            e.to_string()
                .ends_with("the primary is alive; not taking over"),
            "{e}"
        );
        let w2 = w.clone();
        let waiter =
            std::thread::spawn(move || w2.acquire(Instant::now() + Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(100));
        drop(held);
        let f = waiter.join().unwrap().unwrap();
        assert_eq!(f.generation(), 0);
    }

    #[test]
    fn fence_record_round_trip() {
        for r in [
            Record::default(),
            Record {
                seq: 7,
                fence_generation: 3,
                unprotected_since: Some(0),
            },
            Record {
                seq: u64::MAX,
                fence_generation: u64::MAX,
                unprotected_since: Some(u64::MAX),
            },
        ] {
            let bytes = encode_copy(&r);
            assert_eq!(&bytes[..8], b"MVFENCE\0");
            assert_eq!(decode_copy(&bytes), Ok(Some(r)));
        }
        assert_eq!(decode_copy(&[0; RECORD_LEN]), Ok(None));
    }

    #[test]
    fn fence_copy_layout_is_pinned() {
        let bytes = encode_copy(&Record {
            seq: 0x0102,
            fence_generation: 5,
            unprotected_since: Some(9),
        });
        assert_eq!(&bytes[8..12], &1u32.to_le_bytes()); // version
        assert_eq!(&bytes[12..16], &1u32.to_le_bytes()); // flags
        assert_eq!(&bytes[16..24], &0x0102u64.to_le_bytes()); // seq
        assert_eq!(&bytes[24..32], &5u64.to_le_bytes()); // fence generation
        assert_eq!(&bytes[32..40], &9u64.to_le_bytes()); // unprotected since
        assert_eq!(&bytes[40..60], &[0u8; 20]);
        assert_eq!(&bytes[60..], &crc32c::crc32c(&bytes[..60]).to_le_bytes());
    }

    #[test]
    fn fence_bad_copies_are_rejected() {
        let good = encode_copy(&Record {
            seq: 1,
            fence_generation: 1,
            unprotected_since: None,
        });
        let mut b = good;
        b[0] = b'X';
        assert_eq!(decode_copy(&b), Err(CopyProblem::BadMagic));
        let mut b = good;
        b[30] ^= 1;
        assert_eq!(decode_copy(&b), Err(CopyProblem::Crc));
        let reseal = |mut b: [u8; RECORD_LEN]| {
            let c = crc32c::crc32c(&b[..60]);
            b[60..].copy_from_slice(&c.to_le_bytes());
            b
        };
        let mut b = good;
        b[8] = 2;
        assert_eq!(decode_copy(&reseal(b)), Err(CopyProblem::Version(2)));
        let mut b = good;
        b[12] = 2; // unknown flag
        assert_eq!(decode_copy(&reseal(b)), Err(CopyProblem::Reserved));
        let mut b = good;
        b[45] = 1; // reserved byte
        assert_eq!(decode_copy(&reseal(b)), Err(CopyProblem::Reserved));
        let mut b = good;
        b[32] = 1; // an epoch without the flag
        assert_eq!(decode_copy(&reseal(b)), Err(CopyProblem::Reserved));
    }

    #[test]
    fn fence_writes_alternate_copies_and_survive_reopen() {
        let (_d, w) = scratch();
        let mut f = w.open().unwrap();
        assert_eq!(f.bump().unwrap(), 1);
        assert_eq!(f.bump().unwrap(), 2);
        f.record_unprotected_since(40).unwrap();
        assert_eq!(f.bump().unwrap(), 3);
        drop(f);
        let raw = read_raw(&w);
        assert_eq!(raw.len(), 512 + RECORD_LEN);
        let copy = |i: usize| {
            let mut c = [0u8; RECORD_LEN];
            let at = usize::try_from(COPY_OFFSETS[i]).unwrap();
            c.copy_from_slice(&raw[at..at + RECORD_LEN]);
            decode_copy(&c).unwrap().unwrap()
        };
        // Writes 1 and 3 went to the first copy, 2 and 4 to the second.
        assert_eq!((copy(0).seq, copy(0).fence_generation), (3, 2));
        assert_eq!((copy(1).seq, copy(1).fence_generation), (4, 3));
        let mut f = w.open().unwrap();
        assert_eq!(f.generation(), 3);
        assert_eq!(f.unprotected_since(), Some(40));
        assert_eq!(f.record().seq, 4);
        assert_eq!(f.bump().unwrap(), 4);
        drop(f);
        assert_eq!(w.open().unwrap().generation(), 4);
    }

    #[test]
    fn fence_torn_newest_copy_falls_back_to_the_other() {
        let (_d, w) = scratch();
        let mut f = w.open().unwrap();
        f.bump().unwrap(); // copy 0: generation 1
        f.bump().unwrap(); // copy 1: generation 2
        drop(f);
        // Tear the second copy: its second half never reached the disk.
        write_raw(&w, COPY_OFFSETS[1] + 32, &[0u8; 32]);
        let mut f = w.open().unwrap();
        assert_eq!(f.generation(), 1);
        // The next write replaces the torn copy, never the good one.
        assert_eq!(f.bump().unwrap(), 2);
        drop(f);
        let raw = read_raw(&w);
        let mut c0 = [0u8; RECORD_LEN];
        c0.copy_from_slice(&raw[..RECORD_LEN]);
        assert_eq!(decode_copy(&c0).unwrap().unwrap().fence_generation, 1);
        assert_eq!(w.open().unwrap().generation(), 2);
    }

    #[test]
    fn fence_both_copies_bad_is_a_clear_error() {
        let (_d, w) = scratch();
        let mut f = w.open().unwrap();
        f.bump().unwrap();
        f.bump().unwrap();
        drop(f);
        write_raw(&w, COPY_OFFSETS[0] + 24, &[0xff]);
        write_raw(&w, COPY_OFFSETS[1], b"garbage!");
        let e = w.open().unwrap_err();
        assert!(matches!(e, FenceError::Corrupt { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            format!(
                "witness file {} holds no valid fence record (first copy: checksum mismatch; \
                 second copy: bad magic); it is damaged or not a mirrorvm witness file",
                w.path().display()
            )
        );
        // The lock was not kept by the failed open.
        let again = w.open().unwrap_err();
        assert!(matches!(again, FenceError::Corrupt { .. }), "{again:?}");
    }

    #[test]
    fn fence_damaged_only_copy_is_not_a_fresh_file() {
        let (_d, w) = scratch();
        std::fs::write(w.path(), b"not a witness file").unwrap();
        let e = w.open().unwrap_err();
        match &e {
            FenceError::Corrupt { first, second, .. } => {
                assert_eq!((first.as_str(), second.as_str()), ("bad magic", "blank"))
            }
            other => panic!("not Corrupt: {other:?}"),
        }
    }

    #[test]
    fn fence_newer_version_is_refused() {
        let (_d, w) = scratch();
        let mut f = w.open().unwrap();
        f.bump().unwrap();
        f.bump().unwrap();
        drop(f);
        let mut b = encode_copy(&Record {
            seq: 9,
            fence_generation: 9,
            unprotected_since: None,
        });
        b[8] = 2;
        let c = crc32c::crc32c(&b[..60]);
        b[60..].copy_from_slice(&c.to_le_bytes());
        write_raw(&w, COPY_OFFSETS[0], &b);
        let e = w.open().unwrap_err();
        assert!(matches!(e, FenceError::Version { found: 2, .. }), "{e:?}");
    }

    #[test]
    fn fence_replaced_file_is_refused() {
        let (d, w) = scratch();
        // Between open and lock: the path is renamed over.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(w.path())
            .unwrap();
        let other = d.path().join("other");
        std::fs::write(&other, b"").unwrap();
        std::fs::rename(&other, w.path()).unwrap();
        let e = match lock_and_load(file, w.path()) {
            Err(e) => e,
            Ok(a) => panic!("not refused: {a:?}"),
        };
        assert!(
            matches!(e, FenceError::Replaced { source: None, .. }),
            "{e:?}"
        );
        assert!(
            e.to_string().contains("must never be deleted or replaced"),
            "{e}"
        );

        // While held: the holder can no longer prove it holds the fence.
        let f = w.open().unwrap();
        f.check_held().unwrap();
        std::fs::write(&other, b"").unwrap();
        std::fs::rename(&other, w.path()).unwrap();
        assert!(matches!(
            f.check_held(),
            Err(FenceError::Replaced { source: None, .. })
        ));
        std::fs::remove_file(w.path()).unwrap();
        assert!(matches!(
            f.check_held(),
            Err(FenceError::Replaced {
                source: Some(_),
                ..
            })
        ));
    }

    #[test]
    fn fence_check_replica_refuses_an_older_replica() {
        let (_d, w) = scratch();
        let mut f = w.open().unwrap();
        f.check_replica(0).unwrap();
        f.record_unprotected_since(100).unwrap();
        f.check_replica(100).unwrap();
        f.check_replica(101).unwrap();
        let e = f.check_replica(99).unwrap_err();
        assert!(
            matches!(
                e,
                FenceError::StaleReplica {
                    replica: 99,
                    unprotected_since: 100,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("stale and must never resume"), "{e}");
        // The record never goes down.
        f.record_unprotected_since(50).unwrap();
        assert_eq!(f.unprotected_since(), Some(100));
        drop(f);
        // A standby with a stale replica takes nothing over: the generation stays.
        let mut f = w.open().unwrap();
        assert!(matches!(
            f.take_over(99),
            Err(FenceError::StaleReplica { .. })
        ));
        assert_eq!(f.generation(), 0);
        assert_eq!(f.take_over(100).unwrap(), 1);
        drop(f);
        let f = w.open().unwrap();
        assert_eq!((f.generation(), f.unprotected_since()), (1, Some(100)));
    }

    #[test]
    fn fence_generation_exhausted_is_an_error() {
        let (_d, w) = scratch();
        let b = encode_copy(&Record {
            seq: 1,
            fence_generation: u64::MAX,
            unprotected_since: None,
        });
        std::fs::write(w.path(), b).unwrap();
        let mut f = w.open().unwrap();
        assert!(matches!(f.bump(), Err(FenceError::Exhausted { .. })));
        assert_eq!(f.generation(), u64::MAX);
    }

    /// Not a test on its own: the child process of
    /// [`fence_lock_of_a_killed_process_is_released`]. With [`HOLD_ENV`] set it takes
    /// the fence on that path, says so, and sleeps until killed.
    #[test]
    #[ignore = "helper: run by fence_lock_of_a_killed_process_is_released"]
    fn child_holds_witness() {
        let Some(path) = std::env::var_os(HOLD_ENV) else {
            return;
        };
        let _fence = Witness::new(PathBuf::from(path)).open().unwrap();
        // libtest has already printed "test NAME ... " without a newline.
        println!("\n{HELD_LINE}");
        // Hold it until killed; give up if the parent test is gone (no orphans).
        let parent = std::os::unix::process::parent_id();
        let end = Instant::now() + Duration::from_secs(120);
        while std::os::unix::process::parent_id() == parent && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts a child process holding the fence on `w` (see [`child_holds_witness`])
    /// and returns once it holds it.
    fn spawn_holder(w: &Witness) -> std::process::Child {
        let exe = std::env::current_exe().unwrap();
        let mut child = Command::new(exe)
            .args([
                "--exact",
                "replication::fence::tests::child_holds_witness",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(HOLD_ENV, w.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Wait for the child to say it holds the fence, but not forever.
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let held = BufReader::new(stdout)
                .lines()
                .any(|l| l.is_ok_and(|l| l.trim() == HELD_LINE));
            let _ = tx.send(held);
        });
        if rx.recv_timeout(Duration::from_secs(60)) != Ok(true) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the child never took the fence");
        }
        child
    }

    /// Kills `child` and reaps it.
    fn kill_holder(mut child: std::process::Child) {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        let pid = Pid::from_raw(i32::try_from(child.id()).unwrap());
        kill(pid, Signal::SIGKILL).unwrap();
        assert!(!child.wait().unwrap().success());
    }

    /// How many locks this process holds on the witness file, through any of its
    /// descriptors (`/proc/self/fdinfo` lists the locks granted to each description,
    /// not the requests still waiting).
    fn locks_held_here(w: &Witness) -> usize {
        let file = std::fs::metadata(w.path()).unwrap();
        let mut n = 0;
        for fd in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
            match std::fs::metadata(fd.path()) {
                Ok(m) if m.dev() == file.dev() && m.ino() == file.ino() => {}
                _ => continue,
            }
            let info = Path::new("/proc/self/fdinfo").join(fd.file_name());
            let text = std::fs::read_to_string(info).unwrap_or_default();
            n += text.lines().filter(|l| l.starts_with("lock:")).count();
        }
        n
    }

    /// Joins a given-up wait's thread, which ends once it was granted the lock and
    /// released it; a thread still blocked long after its holder died fails the test.
    fn join_given_up(thread: JoinHandle<()>) {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(thread.join().is_ok());
        });
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(60)),
            Ok(true),
            "the given-up wait's thread did not end after its holder died"
        );
    }

    #[test]
    fn fence_lock_of_a_killed_process_is_released() {
        let (_d, w) = scratch();
        let child = spawn_holder(&w);

        // Held by the child: the standby waits, and learns who holds it.
        let pid = child.id();
        match w.try_acquire().unwrap() {
            Attempt::Busy(Holder::Others(procs)) => {
                assert!(procs.iter().any(|(p, _)| *p == pid), "{procs:?}")
            }
            other => panic!("not busy with the child: {other:?}"),
        }
        let e = w.open().unwrap_err();
        assert!(e.to_string().contains(&format!("pid {pid}")), "{e}");

        kill_holder(child);
        let mut f = w.acquire(Instant::now() + Duration::from_secs(10)).unwrap();
        assert_eq!(f.take_over(0).unwrap(), 1);
    }

    #[test]
    fn fence_a_blocked_wait_gets_the_fence_when_its_holder_is_killed() {
        let (_d, w) = scratch();
        let child = spawn_holder(&w);
        let mut wait = w.start_wait().unwrap();
        // The child is alive: a deadline already due finds the wait still waiting,
        // holding nothing.
        assert!(wait.wait_until(Instant::now()).unwrap().is_none());
        assert_eq!(locks_held_here(&w), 0);
        // The kernel grants the blocked request once the holder is gone; the deadline
        // is only a guard against a hang.
        kill_holder(child);
        let mut f = wait
            .wait_until(Instant::now() + Duration::from_secs(60))
            .unwrap()
            .expect("the killed holder's lock was not granted to the waiting standby");
        assert_eq!(locks_held_here(&w), 1);
        assert_eq!(f.take_over(0).unwrap(), 1);
        // The wait is spent.
        assert!(matches!(
            wait.wait_until(Instant::now()),
            Err(FenceError::WaitEnded { .. })
        ));
        drop(f);
        assert_eq!(locks_held_here(&w), 0);
        assert_eq!(w.open().unwrap().generation(), 1);
    }

    #[test]
    fn fence_acquire_from_a_live_holder_hits_its_deadline_and_holds_nothing() {
        let (_d, w) = scratch();
        let child = spawn_holder(&w);
        let pid = child.id();
        let e = w
            .acquire(Instant::now() + Duration::from_millis(100))
            .unwrap_err();
        match &e {
            FenceError::StillHeld {
                holder: Holder::Others(procs),
                ..
            } => assert!(procs.iter().any(|(p, _)| *p == pid), "{procs:?}"),
            other => panic!("not StillHeld by the child: {other:?}"),
        }
        assert_eq!(locks_held_here(&w), 0);
        // Once the holder is dead the fence is free for the next attempt (the given-up
        // wait's thread, granted the lock too, lets go of it at once).
        kill_holder(child);
        let mut f = w.acquire(Instant::now() + Duration::from_secs(60)).unwrap();
        assert_eq!(f.take_over(0).unwrap(), 1);
    }

    #[test]
    fn fence_a_given_up_wait_releases_the_lock_it_is_granted_later() {
        let (_d, w) = scratch();
        let child = spawn_holder(&w);
        let mut wait = w.start_wait().unwrap();
        assert!(wait.wait_until(Instant::now()).unwrap().is_none());
        let thread = wait.cancel();
        assert_eq!(locks_held_here(&w), 0);
        // The holder dies: the kernel grants the given-up request, whose thread
        // releases the lock and ends instead of keeping it for no one.
        kill_holder(child);
        join_given_up(thread);
        assert_eq!(locks_held_here(&w), 0);
        let mut f = w.open().unwrap();
        assert_eq!(f.take_over(0).unwrap(), 1);
    }

    #[test]
    fn fence_a_given_up_wait_releases_a_lock_granted_but_not_collected() {
        let (_d, w) = scratch();
        let held = w.open().unwrap();
        let mut wait = w.start_wait().unwrap();
        assert!(wait.wait_until(Instant::now()).unwrap().is_none());
        drop(held);
        // Granted now (or soon); give it up without collecting it.
        let shared = wait.shared.clone();
        let granted = {
            let state = shared.lock();
            let (state, _) = shared
                .changed
                .wait_timeout_while(state, Duration::from_secs(60), |s| {
                    matches!(s, WaitState::Waiting)
                })
                .unwrap();
            matches!(*state, WaitState::Done(Ok(_)))
        };
        assert!(granted, "the released lock was not granted to the wait");
        assert_eq!(locks_held_here(&w), 1);
        join_given_up(wait.cancel());
        assert_eq!(locks_held_here(&w), 0);
        w.open().unwrap();
    }
}
