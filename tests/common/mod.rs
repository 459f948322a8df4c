//! Shared helpers for mirrorvm's integration tests: run the real binary, skip loudly
//! when KVM is unusable, build the Linux guest.
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

/// Why KVM cannot be used here, if it cannot.
pub fn kvm_unusable() -> Option<String> {
    let f = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(f) => f,
        Err(e) => return Some(format!("cannot open /dev/kvm: {e}")),
    };
    // KVM_GET_API_VERSION = _IO(0xAE, 0x00)
    // SAFETY: the ioctl takes no argument and only returns an integer.
    let v = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&f), 0xAE00) };
    if v != 12 {
        return Some(format!(
            "/dev/kvm answered KVM_GET_API_VERSION with {v}, not 12"
        ));
    }
    None
}

/// Returns true (after printing a loud SKIPPED line) when the test cannot run.
pub fn skip_without_kvm(test: &str) -> bool {
    match kvm_unusable() {
        Some(reason) => {
            loud(&format!(
                "\n*** SKIPPED {test}: KVM is unusable on this host: {reason} ***\n"
            ));
            if std::env::var_os("MIRRORVM_REQUIRE_KVM").is_some() {
                panic!("MIRRORVM_REQUIRE_KVM is set but KVM is unusable: {reason}");
            }
            true
        }
        None => false,
    }
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
