//! Locks on disk images, region journals and checkpoint directories, so that two
//! mirrorvm processes (a run started twice, or a primary and a standby side by side on
//! one host) can never write the same files at once.
//!
//! The locks are Linux *open file description* locks (`F_OFD_SETLK`) over the whole
//! file, taken without waiting, as QEMU and cloud-hypervisor lock their images (the
//! witness fence alone waits for its lock, [`lock_file_wait`]):
//!
//! * A lock belongs to the open file description, not to a process or an fd: every fd
//!   that shares the description (`dup`, [`File::try_clone`], fork) holds it, and the
//!   kernel releases it when the last of them is closed, including when the process
//!   dies (SIGKILL, crash). A dead mirrorvm never leaves a stale lock behind.
//! * Two separate `open`s of one file are two descriptions, and their locks conflict
//!   even inside one process (classic POSIX locks never conflict within a process, and
//!   closing *any* fd of the file drops them; that is why these are not used).
//! * Shared locks coexist; an exclusive lock excludes every other lock. Writers take
//!   the exclusive lock, readers (`readonly=on` disks, `mirrorvm disk inspect`) the
//!   shared one, so a reader never sees a file torn by a running writer.
//! * They are advisory: they stop every program that takes fcntl locks (mirrorvm,
//!   QEMU, cloud-hypervisor), not a plain `dd`. They conflict with POSIX `F_SETLK`
//!   locks, not with `flock(2)` ones.
//!
//! A refused lock is a [`LockError::Busy`] that names the file and, found through
//! `/proc`, the process holding it.

use std::collections::BTreeSet;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg};

/// The name of the lock file [`lock_dir`] keeps inside a checkpoint directory.
pub const DIR_LOCK_FILE: &str = "mirrorvm.lock";

/// Which lock to take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockKind {
    /// A read lock: any number of shared locks coexist, but none with an exclusive one.
    /// The file may be open read-only.
    Shared,
    /// A write lock: no other lock of either kind coexists with it. The file must be
    /// open for writing (the kernel refuses a write lock on a read-only descriptor).
    Exclusive,
}

/// Who holds a conflicting lock, as far as `/proc` tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// Other processes, by pid, with their command name (`/proc/PID/comm`) when it can
    /// be read.
    Others(Vec<(u32, Option<String>)>),
    /// This process itself, through another open of the same file (for example one
    /// image named by two `--disk` options).
    ThisProcess,
    /// The holder could not be found: no `/proc`, a process in another pid namespace
    /// or not readable by us, or a lock released in the meantime.
    Unknown,
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Holder::Others(procs) => {
                f.write_str(if procs.len() == 1 {
                    "another process ("
                } else {
                    "other processes ("
                })?;
                for (i, (pid, comm)) in procs.iter().enumerate() {
                    if i > 0 {
                        f.write_str("; ")?;
                    }
                    write!(f, "pid {pid}")?;
                    if let Some(c) = comm {
                        write!(f, ", {c}")?;
                    }
                }
                f.write_str(")")
            }
            Holder::ThisProcess => f.write_str("this process itself (is it named twice?)"),
            Holder::Unknown => f.write_str("another process (its pid could not be found)"),
        }
    }
}

/// Why a refused lock matters, after "… is in use by HOLDER".
fn busy_why(wanted: &LockKind, holder: &Holder) -> &'static str {
    match (holder, wanted) {
        (Holder::ThisProcess, _) => "",
        (_, LockKind::Exclusive) => "; only one program may use it while it is being written",
        (_, LockKind::Shared) => ", which is writing it",
    }
}

/// Failures to take a lock.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another open of the file holds a lock that conflicts with the one asked for:
    /// another mirrorvm (or QEMU, …) is using the file.
    #[error("{what} {path} is in use by {holder}{}", busy_why(wanted, holder))]
    Busy {
        /// What the file is, for the message ("disk image", "region journal", …).
        what: &'static str,
        /// The file (for a directory lock, the directory).
        path: PathBuf,
        /// The lock that was refused.
        wanted: LockKind,
        /// Who holds the conflicting lock.
        holder: Holder,
    },
    /// The kernel refused the lock for another reason than a conflict (a file system
    /// without OFD lock support, a write lock on a read-only descriptor, no memory for
    /// the lock).
    #[error("cannot lock {what} {path}: {source}")]
    Lock {
        /// What the file is.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The error of `fcntl(F_OFD_SETLK)`.
        #[source]
        source: io::Error,
    },
    /// The descriptor that keeps a [`FileLock`] held could not be duplicated.
    #[error("cannot duplicate the descriptor of {what} {path} to hold its lock: {source}")]
    Duplicate {
        /// What the file is.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The error of `fcntl(F_DUPFD_CLOEXEC)`.
        #[source]
        source: io::Error,
    },
    /// The lock file inside a checkpoint directory could not be opened or created.
    #[error("cannot open the lock file {path} of checkpoint directory {dir}: {source}")]
    OpenLockFile {
        /// The checkpoint directory.
        dir: PathBuf,
        /// The lock file in it.
        path: PathBuf,
        /// The error of `open`.
        #[source]
        source: io::Error,
    },
}

/// Takes a whole-file OFD lock of `kind` on the open file description of `file`,
/// without waiting. The lock is held until every descriptor of that description is
/// closed: here, until `file` and all its clones are dropped. Taking it again through
/// the same description (or converting its kind) succeeds.
///
/// Use it when the caller keeps `file` for as long as the lock must hold (the
/// checkpoint store, a raw disk's device); use [`FileLock`] for a lock that must
/// outlive `file`. `path` and `what` ("disk image") only name the file in errors.
pub fn lock_file(
    file: &File,
    path: &Path,
    what: &'static str,
    kind: LockKind,
) -> Result<(), LockError> {
    set_lock(file.as_fd(), kind).map_err(|errno| match errno {
        // F_OFD_SETLK reports a conflict as EAGAIN or EACCES (fcntl(2)).
        Errno::EAGAIN | Errno::EACCES => LockError::Busy {
            what,
            path: path.to_owned(),
            wanted: kind,
            holder: find_holder(file),
        },
        other => LockError::Lock {
            what,
            path: path.to_owned(),
            source: other.into(),
        },
    })
}

fn set_lock(fd: std::os::fd::BorrowedFd<'_>, kind: LockKind) -> nix::Result<()> {
    let fl = whole_file(match kind {
        LockKind::Shared => libc::F_RDLCK,
        LockKind::Exclusive => libc::F_WRLCK,
    });
    fcntl(fd, FcntlArg::F_OFD_SETLK(&fl)).map(drop)
}

/// A `struct flock` of type `l_type` (`F_RDLCK`, `F_WRLCK`, `F_UNLCK`) over the whole
/// file.
fn whole_file(l_type: libc::c_int) -> libc::flock {
    // SAFETY: `libc::flock` is a plain C struct of integers (some targets add padding
    // or sysid fields), for which all zero bytes is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    // F_RDLCK, F_WRLCK, F_UNLCK (0, 1, 2) and SEEK_SET (0) are small constants: they
    // fit the c_short fields of struct flock.
    #[allow(clippy::cast_possible_truncation)]
    let (l_type, l_whence) = (l_type as libc::c_short, libc::SEEK_SET as libc::c_short);
    fl.l_type = l_type;
    fl.l_whence = l_whence;
    // l_start 0, l_len 0: the whole file, however it grows. l_pid must be 0 for
    // OFD locks.
    fl
}

/// Takes a whole-file OFD lock of `kind` on the open file description of `file` as
/// [`lock_file`] does, but *waiting* (`F_OFD_SETLKW`) for as long as another open of
/// the file holds a conflicting lock: the kernel grants it the moment that lock is
/// released (its holder unlocks, closes it, or dies). A signal interrupting the wait
/// (`EINTR`) does not end it.
///
/// The wait has no deadline, and nothing but a signal wakes the thread blocked in it:
/// a caller that must be able to give up runs it on a thread of its own, which owns
/// `file` and releases the lock if no one wants it any more by the time it gets it
/// (as the witness fence's wait does). While it waits it holds nothing: a blocked
/// request conflicts with no other lock (`/proc/locks` shows it as a waiter, `->`).
pub fn lock_file_wait(
    file: &File,
    path: &Path,
    what: &'static str,
    kind: LockKind,
) -> Result<(), LockError> {
    let fl = whole_file(match kind {
        LockKind::Shared => libc::F_RDLCK,
        LockKind::Exclusive => libc::F_WRLCK,
    });
    loop {
        match fcntl(file.as_fd(), FcntlArg::F_OFD_SETLKW(&fl)) {
            Ok(_) => return Ok(()),
            Err(Errno::EINTR) => {}
            Err(other) => {
                return Err(LockError::Lock {
                    what,
                    path: path.to_owned(),
                    source: other.into(),
                })
            }
        }
    }
}

/// Releases the OFD lock that the open file description of `file` holds, if any
/// (`F_UNLCK` over the whole file). It is released for every descriptor sharing that
/// description: use it only on a description no one else relies on.
pub fn unlock_file(file: &File) -> io::Result<()> {
    let fl = whole_file(libc::F_UNLCK);
    fcntl(file.as_fd(), FcntlArg::F_OFD_SETLK(&fl))
        .map(drop)
        .map_err(io::Error::from)
}

/// A whole-file OFD lock that stays held as long as this value lives, even once the
/// [`File`] it was taken through is closed: it keeps its own duplicate descriptor of
/// the same open file description.
///
/// Dropping it closes only that duplicate. It never unlocks explicitly, because the
/// lock belongs to the open file description: an unlock would also release it for the
/// original `file` and its clones (a disk device still using the image). So the lock
/// is released once this value *and* every descriptor of the description are gone.
#[derive(Debug)]
pub struct FileLock {
    _fd: OwnedFd,
    kind: LockKind,
    path: PathBuf,
}

impl FileLock {
    /// Locks `file` (whole file, without waiting) as in [`lock_file`], and keeps the
    /// lock held for the life of the returned value.
    pub fn new(
        file: &File,
        path: &Path,
        what: &'static str,
        kind: LockKind,
    ) -> Result<Self, LockError> {
        let fd = file
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| LockError::Duplicate {
                what,
                path: path.to_owned(),
                source,
            })?;
        lock_file(file, path, what, kind)?;
        Ok(FileLock {
            _fd: fd,
            kind,
            path: path.to_owned(),
        })
    }

    /// The kind of lock held.
    pub fn kind(&self) -> LockKind {
        self.kind
    }

    /// The locked file's path, as given.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// An exclusive lock on a checkpoint directory, held as long as this value lives
/// (see [`lock_dir`]).
#[derive(Debug)]
pub struct DirLock {
    _file: File,
    dir: PathBuf,
}

impl DirLock {
    /// The locked directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Locks the checkpoint directory `dir` (which must exist) exclusively, so that two
/// mirrorvm processes never write checkpoints into the same directory. The lock is
/// held until the returned [`DirLock`] is dropped, or the process dies.
///
/// This module only provides it; the checkpoint directory sink takes it when it opens
/// its directory.
///
/// The lock is on a lock file inside the directory, [`DIR_LOCK_FILE`] (created if
/// missing), not on the directory itself: a directory can only be opened read-only,
/// and the kernel refuses a write (exclusive) fcntl lock on a read-only descriptor
/// (EBADF), while `flock(2)`, which would work on a directory, does not interact with
/// the fcntl locks used everywhere else. The lock file is left in place when the lock
/// is released: deleting it would let a newcomer lock a fresh file while a holder
/// still locks the deleted one. Checkpoint readers ignore it.
pub fn lock_dir(dir: &Path) -> Result<DirLock, LockError> {
    let path = dir.join(DIR_LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|source| LockError::OpenLockFile {
            dir: dir.to_owned(),
            path: path.clone(),
            source,
        })?;
    lock_file(&file, dir, "checkpoint directory", LockKind::Exclusive)?;
    Ok(DirLock {
        _file: file,
        dir: dir.to_owned(),
    })
}

/// One lock as `/proc/locks` or a `lock:` line of `/proc/PID/fdinfo/FD` shows it:
/// `1: OFDLCK ADVISORY  WRITE -1 fe:00:10010978 0 EOF`. Returns the pid field and
/// the file's (major, minor, inode), for POSIX and OFD locks (the only kinds that
/// conflict with ours); `None` for other kinds, waiters (`->`) and malformed lines.
fn parse_lock_line(line: &str) -> Option<(i64, (u32, u32, u64))> {
    let mut t = line.split_whitespace();
    t.next()?; // "1:"
    match t.next()? {
        "POSIX" | "OFDLCK" => {}
        _ => return None,
    }
    t.next()?; // ADVISORY / MANDATORY
    t.next()?; // READ / WRITE
    let pid: i64 = t.next()?.parse().ok()?;
    let mut dev = t.next()?.split(':');
    let major = u32::from_str_radix(dev.next()?, 16).ok()?;
    let minor = u32::from_str_radix(dev.next()?, 16).ok()?;
    let ino: u64 = dev.next()?.parse().ok()?;
    Some((pid, (major, minor, ino)))
}

/// Finds who holds a lock on the file `file` is open on. `/proc/locks` gives the pid
/// of POSIX locks, but shows -1 for OFD locks (as `F_OFD_GETLK` does), so for those
/// every process's open files are searched for a descriptor of that file whose
/// `/proc/PID/fdinfo` lists a lock (fdinfo shows the locks of that very open file
/// description).
fn find_holder(file: &File) -> Holder {
    let Ok(meta) = file.metadata() else {
        return Holder::Unknown;
    };
    let id = (libc::major(meta.dev()), libc::minor(meta.dev()), meta.ino());
    let mut pids = BTreeSet::new();
    if let Ok(text) = std::fs::read_to_string("/proc/locks") {
        for (pid, of) in text.lines().filter_map(parse_lock_line) {
            if of == id && pid > 0 {
                pids.extend(u32::try_from(pid).ok());
            }
        }
    }
    if pids.is_empty() {
        scan_fdinfo(meta.dev(), meta.ino(), &mut pids);
    }
    let me = std::process::id();
    let is_me = pids.remove(&me);
    if !pids.is_empty() {
        let procs = pids
            .into_iter()
            .map(|pid| {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .ok()
                    .map(|c| c.trim_end().to_owned());
                (pid, comm)
            })
            .collect();
        Holder::Others(procs)
    } else if is_me {
        Holder::ThisProcess
    } else {
        Holder::Unknown
    }
}

/// Adds to `pids` every process with a descriptor of the file (`dev`, `ino`) whose
/// fdinfo lists a POSIX or OFD lock on it. Unreadable entries are skipped: processes
/// come and go while we look.
fn scan_fdinfo(dev: u64, ino: u64, pids: &mut BTreeSet<u32>) {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            // The fd link's target: cheap to compare before reading fdinfo.
            match std::fs::metadata(fd.path()) {
                Ok(m) if m.dev() == dev && m.ino() == ino => {}
                _ => continue,
            }
            let info = p.path().join("fdinfo").join(fd.file_name());
            let Ok(text) = std::fs::read_to_string(info) else {
                continue;
            };
            // fdinfo lists only the locks of this description, so on this file; the
            // device numbers it prints may differ from stat's (btrfs subvolumes).
            let locked = text
                .lines()
                .filter_map(|l| l.strip_prefix("lock:"))
                .any(|l| parse_lock_line(l).is_some());
            if locked {
                pids.insert(pid);
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.img");
        std::fs::write(&path, [0u8; 512]).unwrap();
        (dir, path)
    }

    fn open_rw(p: &Path) -> File {
        OpenOptions::new().read(true).write(true).open(p).unwrap()
    }

    fn lock(f: &File, p: &Path, kind: LockKind) -> Result<FileLock, LockError> {
        FileLock::new(f, p, "disk image", kind)
    }

    #[test]
    fn a_waiting_lock_is_granted_when_the_holder_lets_go_and_unlock_releases_it() {
        let (_d, p) = scratch();
        let held = open_rw(&p);
        lock_file(&held, &p, "disk image", LockKind::Exclusive).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = {
            let p = p.clone();
            std::thread::spawn(move || {
                let f = open_rw(&p);
                let r = lock_file_wait(&f, &p, "disk image", LockKind::Exclusive);
                tx.send(r.is_ok()).unwrap();
                f
            })
        };
        // The waiter holds nothing while it waits: the holder can still take its
        // lock again, and only a third open is refused (by the holder's lock).
        lock_file(&held, &p, "disk image", LockKind::Exclusive).unwrap();
        assert!(rx.try_recv().is_err());
        drop(held);
        assert_eq!(rx.recv(), Ok(true));
        let f = waiter.join().unwrap();
        let other = open_rw(&p);
        assert!(matches!(
            lock_file(&other, &p, "disk image", LockKind::Exclusive),
            Err(LockError::Busy { .. })
        ));
        // Unlocking releases it while the file stays open.
        unlock_file(&f).unwrap();
        lock_file(&other, &p, "disk image", LockKind::Exclusive).unwrap();
        drop(f);
    }

    #[test]
    fn lock_exclusive_refuses_exclusive() {
        let (_d, p) = scratch();
        let (a, b) = (open_rw(&p), open_rw(&p));
        let _held = lock(&a, &p, LockKind::Exclusive).unwrap();
        let err = lock(&b, &p, LockKind::Exclusive).unwrap_err();
        match &err {
            LockError::Busy { holder, .. } => assert_eq!(*holder, Holder::ThisProcess),
            other => panic!("not Busy: {other:?}"),
        }
        let msg = err.to_string();
        assert!(msg.starts_with(&format!("disk image {} is in use by ", p.display())));
        assert!(msg.contains("this process itself"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }

    #[test]
    fn lock_shared_allows_shared() {
        let (_d, p) = scratch();
        let (a, b) = (File::open(&p).unwrap(), File::open(&p).unwrap());
        let _x = lock(&a, &p, LockKind::Shared).unwrap();
        let _y = lock(&b, &p, LockKind::Shared).unwrap();
    }

    #[test]
    fn lock_shared_and_exclusive_conflict_both_ways() {
        let (_d, p) = scratch();
        let (r, w) = (File::open(&p).unwrap(), open_rw(&p));
        let shared = lock(&r, &p, LockKind::Shared).unwrap();
        let e = lock(&w, &p, LockKind::Exclusive).unwrap_err();
        assert!(matches!(e, LockError::Busy { .. }), "{e:?}");
        drop(shared);
        drop(r);
        let _excl = lock(&w, &p, LockKind::Exclusive).unwrap();
        let r2 = File::open(&p).unwrap();
        let e = lock(&r2, &p, LockKind::Shared).unwrap_err();
        assert!(
            matches!(
                e,
                LockError::Busy {
                    wanted: LockKind::Shared,
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn lock_released_when_lock_and_file_are_dropped() {
        let (_d, p) = scratch();
        let a = open_rw(&p);
        let held = lock(&a, &p, LockKind::Exclusive).unwrap();
        drop(held);
        // The description is still open through `a`: the lock holds.
        let b = open_rw(&p);
        assert!(lock(&b, &p, LockKind::Exclusive).is_err());
        drop(a);
        lock(&b, &p, LockKind::Exclusive).unwrap();
    }

    #[test]
    fn lock_outlives_its_file_and_is_shared_with_clones() {
        let (_d, p) = scratch();
        let a = open_rw(&p);
        let held = lock(&a, &p, LockKind::Exclusive).unwrap();
        drop(a);
        let b = open_rw(&p);
        assert!(lock(&b, &p, LockKind::Exclusive).is_err());
        drop(held);
        lock_file(&b, &p, "disk image", LockKind::Exclusive).unwrap();
        // A clone shares the description, hence the lock.
        let c = b.try_clone().unwrap();
        drop(b);
        let d = open_rw(&p);
        assert!(lock_file(&d, &p, "disk image", LockKind::Shared).is_err());
        drop(c);
        lock_file(&d, &p, "disk image", LockKind::Shared).unwrap();
    }

    #[test]
    fn lock_exclusive_on_read_only_file_is_not_busy() {
        let (_d, p) = scratch();
        let r = File::open(&p).unwrap();
        let e = lock_file(&r, &p, "disk image", LockKind::Exclusive).unwrap_err();
        assert!(matches!(e, LockError::Lock { .. }), "{e:?}");
    }

    #[test]
    fn lock_dir_is_exclusive_and_released_on_drop() {
        let d = tempfile::tempdir().unwrap();
        let l = lock_dir(d.path()).unwrap();
        assert_eq!(l.dir(), d.path());
        let e = lock_dir(d.path()).unwrap_err();
        assert!(
            e.to_string().starts_with(&format!(
                "checkpoint directory {} is in use",
                d.path().display()
            )),
            "{e}"
        );
        drop(l);
        let _again = lock_dir(d.path()).unwrap();
        assert!(d.path().join(DIR_LOCK_FILE).exists());
        let missing = d.path().join("nope");
        assert!(matches!(
            lock_dir(&missing),
            Err(LockError::OpenLockFile { .. })
        ));
    }

    #[test]
    fn lock_store_open_path_excludes_other_stores_and_tools() {
        use crate::store::{self, Error, RecoverTo, Store, StoreConfig};
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("a.img");
        std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
        let cfg = StoreConfig {
            slot_count: 2,
            region_capacity: 1 << 16,
            ..StoreConfig::default()
        };
        let (s, _) = Store::open_path(&img, &cfg, RecoverTo::LastAcknowledged).unwrap();
        let e = Store::open_path(&img, &cfg, RecoverTo::LastAcknowledged).unwrap_err();
        assert!(matches!(e, Error::Locked(LockError::Busy { .. })), "{e:?}");
        assert!(
            e.to_string()
                .starts_with(&format!("disk image {} is in use", img.display())),
            "{e}"
        );
        for e in [
            store::inspect(&img).unwrap_err(),
            store::verify(&img).unwrap_err(),
        ] {
            assert!(
                e.to_string().starts_with(&format!(
                    "region journal {} is in use",
                    store::journal_path(&img).display()
                )),
                "{e}"
            );
        }
        assert!(matches!(store::recover(&img, None), Err(Error::Locked(_))));
        // Once the store is gone, a reader of the image (a readonly=on disk) and the
        // tools coexist, and keep a writer out.
        drop(s);
        let base = File::open(&img).unwrap();
        lock_file(&base, &img, "disk image", LockKind::Shared).unwrap();
        store::inspect(&img).unwrap();
        store::verify(&img).unwrap();
        assert!(matches!(
            Store::open_path(&img, &cfg, RecoverTo::LastAcknowledged),
            Err(Error::Locked(_))
        ));
        drop(base);
        let (_s, _) = Store::open_path(&img, &cfg, RecoverTo::LastAcknowledged).unwrap();
    }

    #[test]
    fn lock_line_parsing() {
        assert_eq!(
            parse_lock_line("3: OFDLCK ADVISORY  WRITE -1 fe:00:10010978 0 EOF"),
            Some((-1, (0xfe, 0, 10010978)))
        );
        assert_eq!(
            parse_lock_line("7: POSIX  ADVISORY  READ 4242 08:1f:12 100 199"),
            Some((4242, (8, 0x1f, 12)))
        );
        assert_eq!(
            parse_lock_line("1: FLOCK  ADVISORY  WRITE 6999 fe:00:5341267 0 EOF"),
            None
        );
        assert_eq!(
            parse_lock_line("3: -> OFDLCK ADVISORY  WRITE -1 fe:00:1 0 EOF"),
            None
        );
        assert_eq!(parse_lock_line("garbage"), None);
        assert_eq!(parse_lock_line(""), None);
    }

    #[test]
    fn busy_messages() {
        let busy = |wanted, holder| LockError::Busy {
            what: "region journal",
            path: "/x/a.img.mvj".into(),
            wanted,
            holder,
        };
        let other = || Holder::Others(vec![(1234, Some("mirrorvm".into()))]);
        assert_eq!(
            busy(LockKind::Shared, other()).to_string(),
            "region journal /x/a.img.mvj is in use by another process (pid 1234, mirrorvm), which is writing it"
        );
        assert_eq!(
            busy(LockKind::Exclusive, other()).to_string(),
            "region journal /x/a.img.mvj is in use by another process (pid 1234, mirrorvm); only one program may use it while it is being written"
        );
        assert_eq!(
            busy(LockKind::Exclusive, Holder::Unknown).to_string(),
            "region journal /x/a.img.mvj is in use by another process (its pid could not be found); only one program may use it while it is being written"
        );
        assert_eq!(
            busy(LockKind::Exclusive, Holder::ThisProcess).to_string(),
            "region journal /x/a.img.mvj is in use by this process itself (is it named twice?)"
        );
    }

    #[test]
    fn holder_display() {
        let h = Holder::Others(vec![(1234, Some("mirrorvm".into()))]);
        assert_eq!(h.to_string(), "another process (pid 1234, mirrorvm)");
        let h = Holder::Others(vec![(1, None), (2, Some("qemu".into()))]);
        assert_eq!(h.to_string(), "other processes (pid 1; pid 2, qemu)");
    }
}
