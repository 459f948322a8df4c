//! Shared helpers for mirrorvm's integration tests: run the real binary
//! ([`mirrorvm`], [`run_with_timeout`], [`Running`] for one that runs on), skip
//! loudly when KVM is unusable (`if skip_without_kvm!() { return; }`, which names
//! the test itself), checkpoint directories ([`wait_checkpoint`],
//! [`memory_epoch`]) and `--metrics` files ([`read_metrics`]), and build the Linux
//! guest.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The mirrorvm binary cargo built for these tests.
pub fn mirrorvm() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mirrorvm"));
    c.stdin(Stdio::null());
    c
}

/// Writes straight to the process's stderr: unlike `eprintln!`, the test harness
/// does not capture it, so a skip is always visible.
pub fn loud(msg: &str) {
    let _ = writeln!(std::io::stderr(), "{msg}");
}

/// The KVM device mirrorvm opens: `MIRRORVM_KVM_DEVICE`, else /dev/kvm.
pub fn kvm_device() -> PathBuf {
    std::env::var_os("MIRRORVM_KVM_DEVICE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/dev/kvm"))
}

/// Why KVM cannot be used here, if it cannot: the device mirrorvm opens
/// ([`kvm_device`]) must open and answer KVM_GET_API_VERSION with 12.
pub fn kvm_unusable() -> Option<String> {
    let dev = kvm_device();
    let Ok(c_path) = std::ffi::CString::new(dev.as_os_str().as_encoded_bytes()) else {
        return Some(format!("{} is not a usable path", dev.display()));
    };
    match kvm_ioctls::Kvm::new_with_path(&c_path) {
        Err(e) => Some(format!("cannot open {}: {e}", dev.display())),
        Ok(kvm) => match kvm.get_api_version() {
            12 => None,
            v => Some(format!(
                "{} answered KVM_GET_API_VERSION with {v}, not 12",
                dev.display()
            )),
        },
    }
}

/// Returns true (after printing a loud SKIPPED line naming `test`) when KVM is
/// unusable, so the test cannot run. With `MIRRORVM_REQUIRE_KVM` set it panics
/// instead. Prefer the [`skip_without_kvm!`] macro, which names the test itself.
pub fn skip_without_kvm(test: &str) -> bool {
    match kvm_unusable() {
        Some(reason) => {
            skipped(test, &format!("KVM is unusable on this host: {reason}"));
            if std::env::var_os("MIRRORVM_REQUIRE_KVM").is_some() {
                panic!("MIRRORVM_REQUIRE_KVM is set but KVM is unusable: {reason}");
            }
            true
        }
        None => false,
    }
}

/// Prints the loud SKIPPED line for `test` (or a part of it) and `why`.
pub fn skipped(test: &str, why: &str) {
    loud(&format!("\n*** SKIPPED {test}: {why} ***\n"));
}

/// The path of the function it is expanded in (`binary::module::function`), with
/// closure segments left out: the test's name when expanded in a `#[test]` function.
#[macro_export]
macro_rules! function_path {
    () => {{
        fn here() {}
        fn name_of<T>(_: T) -> &'static str {
            ::std::any::type_name::<T>()
        }
        let path = name_of(here);
        path.strip_suffix("::here")
            .unwrap_or(path)
            .split("::")
            .filter(|seg| *seg != "{{closure}}")
            .collect::<Vec<_>>()
            .join("::")
    }};
}

/// `if skip_without_kvm!() { return; }`: [`skip_without_kvm`] with the name of
/// the test it is written in, so the SKIPPED line can never name another test.
/// `skip_without_kvm!("a part")` adds what is being skipped to the name.
#[macro_export]
macro_rules! skip_without_kvm {
    () => {
        $crate::common::skip_without_kvm(&$crate::function_path!())
    };
    ($part:expr) => {
        $crate::common::skip_without_kvm(&format!("{} ({})", $crate::function_path!(), $part))
    };
}

/// Runs a command with a deadline, killing it when the deadline passes.
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Output {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn mirrorvm");
    let start = Instant::now();
    let out_pipe = child.stdout.take().expect("stdout");
    let err_pipe = child.stderr.take().expect("stderr");
    let out_t = std::thread::spawn(move || read_all(out_pipe));
    let err_t = std::thread::spawn(move || read_all(err_pipe));
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            let stdout = out_t.join().unwrap_or_default();
            let stderr = err_t.join().unwrap_or_default();
            panic!(
                "command timed out after {timeout:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                String::from_utf8_lossy(&stdout),
                String::from_utf8_lossy(&stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    }
}

fn read_all(mut r: impl std::io::Read) -> Vec<u8> {
    let mut v = Vec::new();
    let _ = r.read_to_end(&mut v);
    v
}

/// stdout and stderr of a run, for assertion messages.
pub fn show(o: &Output) -> String {
    format!(
        "status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A scratch directory removed when dropped.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("mirrorvm-test")
        .tempdir()
        .expect("tempdir")
}

/// Creates a zero-filled image of `size` bytes.
pub fn make_image(path: &Path, size: u64) {
    let f = std::fs::File::create(path).expect("create image");
    f.set_len(size).expect("size image");
}

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Builds (or finds cached) the small Linux kernel; returns its output directory.
/// The tests of one binary share a single build.
pub fn linux_artifacts() -> PathBuf {
    static OUT: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    OUT.get_or_init(|| {
        let script = repo().join("resources/linux/build.sh");
        let out = Command::new("bash")
            .arg(&script)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        if !out.status.success() {
            return Err(format!("resources/linux/build.sh failed:\n{}", show(&out)));
        }
        let dir = std::env::var_os("MIRRORVM_LINUX_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo().join("resources/linux/build"));
        Ok(dir.join("out"))
    })
    .clone()
    .unwrap_or_else(|e| panic!("{e}"))
}

/// The command line that gets the small kernel through KVM's emulator here
/// (ENVIRONMENT.md).
pub const LINUX_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 8250.nr_uarts=1 tsc=reliable noxsave nopku nofsgsbase noinvpcid nopcid clearcpuid=popcnt,rdrand,rdseed,smap,umip,avx,avx2,movbe,bmi1,bmi2,abm,rdpid,aes,pclmulqdq root=/dev/vda rw rootfstype=ext4";

/// Creates an empty ext4 file system image of `size` bytes at `path`.
pub fn make_ext4(path: &Path, size: u64) {
    make_image(path, size);
    let mk = Command::new("mkfs.ext4")
        .args(["-F", "-q"])
        .arg(path)
        .output()
        .expect("mkfs.ext4 (e2fsprogs)");
    assert!(mk.status.success(), "mkfs.ext4: {}", show(&mk));
}

/// A spawned mirrorvm (or any command) whose stdout lines arrive on a channel and
/// whose stderr is collected on a thread (so neither pipe can fill up and stall
/// it). Dropping it kills the process, so a failing assertion leaves nothing
/// running behind.
pub struct Running {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    stderr: Option<std::thread::JoinHandle<()>>,
    /// Everything read from stderr so far.
    stderr_buf: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    /// Every stdout line received so far, in order.
    pub seen: Vec<String>,
}

impl Running {
    /// Spawns `c` with stdout and stderr piped.
    pub fn spawn(mut c: Command) -> Running {
        use std::io::BufRead;
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = c.spawn().expect("spawn mirrorvm");
        let out = child.stdout.take().expect("stdout");
        let err = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr_buf = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let buf = stderr_buf.clone();
        let stderr = std::thread::spawn(move || {
            use std::io::Read;
            let mut err = err;
            let mut chunk = [0u8; 4096];
            while let Ok(n) = err.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                buf.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend_from_slice(&chunk[..n]);
            }
        });
        Running {
            child,
            lines: rx,
            stderr: Some(stderr),
            stderr_buf,
            seen: Vec::new(),
        }
    }

    /// What the process wrote to stderr so far (it keeps running).
    pub fn stderr_now(&self) -> String {
        let b = self.stderr_buf.lock().unwrap_or_else(|p| p.into_inner());
        String::from_utf8_lossy(&b).into_owned()
    }

    /// Waits until stderr holds a whole line (ended by a newline) for which `pred` is
    /// true; that line, or `None` if `timeout` passes first.
    pub fn wait_stderr(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&str) -> bool,
    ) -> Option<String> {
        let end = Instant::now() + timeout;
        loop {
            let now = self.stderr_now();
            // A line being written may be seen in pieces: only whole lines count.
            let whole = now.rfind('\n').map_or("", |i| &now[..i]);
            if let Some(l) = whole.lines().find(|l| pred(l)) {
                return Some(l.to_string());
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Its exit status if it has exited, `None` while it runs.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("wait")
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        let sig = nix::sys::signal::Signal::try_from(signal).expect("a standard signal");
        // The pid is our own child's, which cannot have been reused since we have not
        // reaped it yet.
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig)
            .unwrap_or_else(|e| panic!("kill({pid}, {signal}): {e}"));
    }

    /// Collects lines until `pred` holds for one of them (true), or `timeout`
    /// passes or stdout closes (false).
    pub fn wait_for(&mut self, timeout: Duration, mut pred: impl FnMut(&str) -> bool) -> bool {
        let end = Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            match self.lines.recv_timeout(left.min(Duration::from_millis(50))) {
                Ok(l) => {
                    let hit = pred(&l);
                    self.seen.push(l);
                    if hit {
                        return true;
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return false,
            }
        }
    }

    /// Collects the lines that arrive during `d` (or until stdout closes).
    pub fn collect_for(&mut self, d: Duration) {
        self.wait_for(d, |_| false);
    }

    /// Waits up to `timeout` for the process to exit by itself, collecting its
    /// output; `None` if it is still running then (it is killed on drop).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                break s;
            }
            if Instant::now() >= end {
                return None;
            }
            self.collect_for(Duration::from_millis(20));
        };
        // The rest of its stdout: the pipe closes now that it has exited.
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(l);
        }
        Some(status)
    }

    /// Kills the process with SIGKILL (a crash), and returns every stdout line it
    /// printed.
    pub fn kill9(mut self) -> Vec<String> {
        self.child.kill().expect("kill -9 mirrorvm");
        self.child.wait().expect("reap mirrorvm");
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(l);
        }
        std::mem::take(&mut self.seen)
    }

    /// Ends the process (SIGKILL if it still runs) and returns its stderr.
    pub fn stderr(mut self) -> String {
        // An error here means it has already exited, which is fine.
        let _ = self.child.kill();
        self.child.wait().expect("reap mirrorvm");
        if let Some(t) = self.stderr.take() {
            let _ = t.join();
        }
        self.stderr_now()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // Best effort: it may have exited already, and a panic here would hide the
        // assertion that is unwinding.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The epoch of the newest complete checkpoint in the checkpoint directory `dir`, if
/// any: the newest `ckpt-N.mvc` of the chain after `memory.epoch` (format 3 folds the
/// chain into the image only now and then), or `memory.epoch` itself.
pub fn memory_epoch(dir: &Path) -> Option<u64> {
    let base: u64 = std::fs::read_to_string(dir.join("memory.epoch"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let newest = vmm::checkpoint::directory::list_checkpoints(dir)
        .ok()
        .and_then(|l| l.last().map(|(e, _)| *e))
        .unwrap_or(0);
    Some(base.max(newest))
}

/// Waits until the checkpoint directory `dir` holds a complete checkpoint of epoch
/// `epoch` or later (a checkpoint file beside a memory image of that epoch);
/// false if `timeout` passes first.
pub fn wait_checkpoint(dir: &Path, epoch: u64, timeout: Duration) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        let has_ckpt = std::fs::read_dir(dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .any(|e| e.path().extension().is_some_and(|x| x == "mvc"))
            })
            .unwrap_or(false);
        if has_ckpt && memory_epoch(dir).is_some_and(|e| e >= epoch) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

pub mod copylines;
mod metrics;
pub mod pair;
pub mod proxy;
#[allow(unused_imports)]
pub use metrics::{read_metrics, Metric};

/// The values of the test guest's `counter N` lines, in order.
pub fn counters<S: AsRef<str>>(lines: impl IntoIterator<Item = S>) -> Vec<u64> {
    lines
        .into_iter()
        .filter_map(|l| {
            l.as_ref()
                .strip_prefix("counter ")
                .and_then(|v| v.trim().parse().ok())
        })
        .collect()
}
