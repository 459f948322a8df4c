//! Disk images are locked against a second mirrorvm: a second run on an image (raw or
//! `checkpoint=on`) and `mirrorvm disk inspect` of a journal being written are refused
//! with one line naming the image; the kernel releases the locks of a process killed
//! with SIGKILL, so the next run starts; read-only opens of one raw image coexist.

mod common;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(60);

/// A running `mirrorvm run`, killed (SIGKILL) and reaped however the test ends.
struct Running(Child);

impl Running {
    /// Starts the test guest's endless `counter` with `disk` (a `--disk` value), its
    /// console in `console`, and returns once the guest prints, so its disk is open
    /// and locked.
    fn start(disk: &str, console: &Path) -> Running {
        let mut c = mirrorvm();
        c.args(["run", "--cmdline", "counter interval_ms=50", "--disk", disk])
            .arg("--serial")
            .arg(format!("file={}", console.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut r = Running(c.spawn().expect("spawn mirrorvm"));
        let end = Instant::now() + T;
        loop {
            let text = std::fs::read_to_string(console).unwrap_or_default();
            if text.contains("counter 1\n") {
                return r;
            }
            if let Some(s) = r.0.try_wait().expect("wait") {
                panic!("the first mirrorvm ended early ({s}):\n{text}");
            }
            assert!(Instant::now() < end, "the guest did not start:\n{text}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    /// SIGKILL: no exit path of mirrorvm runs, only the kernel cleans up.
    fn kill9(mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(args: &[&str]) -> Output {
    let mut c: Command = mirrorvm();
    c.args(args);
    run_with_timeout(c, T)
}

fn hello(disk: &str) -> Output {
    run(&[
        "run",
        "--cmdline",
        "hello",
        "--disk",
        disk,
        "--serial",
        "off",
    ])
}

/// The run failed with status 1 and exactly one `mirrorvm: error:` line, which names
/// `img`, says "in use" and gives the holder's pid.
fn assert_in_use(o: &Output, img: &Path, holder: u32) {
    assert_eq!(o.status.code(), Some(1), "{}", show(o));
    let err = String::from_utf8_lossy(&o.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "not one line: {}", show(o));
    let line = lines[0];
    assert!(line.starts_with("mirrorvm: error: "), "{}", show(o));
    assert!(line.contains(&img.display().to_string()), "{}", show(o));
    assert!(line.contains("is in use by"), "{}", show(o));
    assert!(line.contains(&format!("pid {holder}")), "{}", show(o));
    assert!(!line.contains("panicked"), "{}", show(o));
}

#[test]
fn checkpointed_image_is_locked_until_its_mirrorvm_dies() {
    if skip_without_kvm("checkpointed_image_is_locked_until_its_mirrorvm_dies") {
        return;
    }
    let dir = tempdir();
    let img = dir.path().join("a.img");
    make_image(&img, 8 << 20);
    let disk = format!("path={},checkpoint=on", img.display());
    let first = Running::start(&disk, &dir.path().join("console.txt"));

    let o = hello(&disk);
    assert_in_use(&o, &img, first.pid());
    // Without checkpoint=on, or read-only, the image is just as busy.
    assert_in_use(
        &hello(&format!("path={}", img.display())),
        &img,
        first.pid(),
    );
    assert_in_use(
        &hello(&format!("path={},readonly=on", img.display())),
        &img,
        first.pid(),
    );
    // The tools refuse the journal being written rather than read it torn.
    let img_arg = img.to_str().expect("utf-8 temp path");
    for tool in ["inspect", "verify", "recover"] {
        let o = run(&["disk", tool, img_arg]);
        assert_in_use(&o, &img, first.pid());
        assert!(
            String::from_utf8_lossy(&o.stdout).is_empty(),
            "{tool}: {}",
            show(&o)
        );
    }

    first.kill9();
    let o = hello(&disk);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let o = run(&["disk", "inspect", img_arg]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
}

#[test]
fn raw_image_is_locked_until_its_mirrorvm_dies() {
    if skip_without_kvm("raw_image_is_locked_until_its_mirrorvm_dies") {
        return;
    }
    let dir = tempdir();
    let img = dir.path().join("r.img");
    make_image(&img, 4 << 20);
    let disk = format!("path={}", img.display());
    let first = Running::start(&disk, &dir.path().join("console.txt"));

    assert_in_use(&hello(&disk), &img, first.pid());
    assert_in_use(
        &hello(&format!("path={},readonly=on", img.display())),
        &img,
        first.pid(),
    );
    assert_in_use(
        &hello(&format!("path={},checkpoint=on", img.display())),
        &img,
        first.pid(),
    );

    first.kill9();
    let o = hello(&disk);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
}

#[test]
fn read_only_opens_of_a_raw_image_coexist() {
    if skip_without_kvm("read_only_opens_of_a_raw_image_coexist") {
        return;
    }
    let dir = tempdir();
    let img = dir.path().join("ro.img");
    make_image(&img, 4 << 20);
    let ro = format!("path={},readonly=on", img.display());
    let first = Running::start(&ro, &dir.path().join("console.txt"));

    let o = hello(&ro);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    // A writer is kept out while a reader runs.
    assert_in_use(
        &hello(&format!("path={}", img.display())),
        &img,
        first.pid(),
    );
    drop(first);
}

#[test]
fn one_image_named_twice_is_refused() {
    if skip_without_kvm("one_image_named_twice_is_refused") {
        return;
    }
    let dir = tempdir();
    let img = dir.path().join("twice.img");
    make_image(&img, 4 << 20);
    let disk = format!("path={}", img.display());
    let o = run(&[
        "run",
        "--cmdline",
        "hello",
        "--disk",
        &disk,
        "--disk",
        &disk,
        "--serial",
        "off",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{}", show(&o));
    assert!(
        err.contains("is in use by this process itself"),
        "{}",
        show(&o)
    );
}
