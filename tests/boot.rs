//! kvm-backed tests of `mirrorvm run` with the built-in test guest, and of every bad
//! input the command line can be given.

mod common;

use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(60);

#[test]
fn hello_prints_the_greeting_and_exits_zero() {
    if skip_without_kvm!() {
        return;
    }
    let mut c = mirrorvm();
    c.arg("run");
    let o = run_with_timeout(c, T);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert!(out.contains("mirrorvm test guest: hello"), "{}", show(&o));
}

#[test]
fn the_guest_verdict_is_the_exit_status() {
    if skip_without_kvm!() {
        return;
    }
    // An unknown workload is the guest's own usage error (2), reported through the
    // exit port; mirrorvm exits with exactly the value the guest wrote.
    let mut c = mirrorvm();
    c.args(["run", "--cmdline", "no-such-workload"]);
    let o = run_with_timeout(c, T);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("unknown workload"),
        "{}",
        show(&o)
    );
}

#[test]
fn counter_counts_up_to_its_limit() {
    if skip_without_kvm!() {
        return;
    }
    let mut c = mirrorvm();
    c.args(["run", "--cmdline", "counter limit=20 interval_ms=5"]);
    let o = run_with_timeout(c, T);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let values: Vec<u64> = out
        .lines()
        .filter_map(|l| l.strip_prefix("counter "))
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    assert_eq!(values, (1..=20).collect::<Vec<_>>(), "{}", show(&o));
}

#[test]
fn serial_to_a_file() {
    if skip_without_kvm!() {
        return;
    }
    let dir = tempdir();
    let log = dir.path().join("console.log");
    let mut c = mirrorvm();
    c.args(["run", "--serial"])
        .arg(format!("file={}", log.display()));
    let o = run_with_timeout(c, T);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let text = std::fs::read_to_string(&log).expect("console log");
    assert!(
        text.contains("mirrorvm test guest: hello"),
        "console log: {text}"
    );
    assert!(
        !String::from_utf8_lossy(&o.stdout).contains("hello"),
        "{}",
        show(&o)
    );
}

#[test]
fn two_vcpus_both_run() {
    if skip_without_kvm!() {
        return;
    }
    let mut c = mirrorvm();
    c.args(["run", "--cpus", "2", "--cmdline", "smp"]);
    let o = run_with_timeout(c, T);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("smp: 2 cpus running"),
        "{}",
        show(&o)
    );
}

#[test]
fn sigterm_ends_the_run_cleanly() {
    if skip_without_kvm!() {
        return;
    }
    let mut child = mirrorvm()
        .args(["run", "--cmdline", "counter interval_ms=10"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    std::thread::sleep(Duration::from_millis(700));
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let start = std::time::Instant::now();
    let o = loop {
        if child.try_wait().expect("wait").is_some() {
            break child.wait_with_output().expect("output");
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "mirrorvm ignored SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(o.status.code(), Some(128 + libc::SIGTERM), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("counter 1"),
        "{}",
        show(&o)
    );
}

/// Runs `mirrorvm` with `args` and expects a one-line error containing `needle`, a
/// non-zero exit and no panic.
fn expect_error(args: &[&str], env: Option<(&str, &str)>, needle: &str) {
    let mut c = mirrorvm();
    c.args(args);
    if let Some((k, v)) = env {
        c.env(k, v);
    }
    let o = run_with_timeout(c, T);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{args:?} succeeded:\n{}", show(&o));
    assert_ne!(
        o.status.code(),
        Some(101),
        "{args:?} panicked:\n{}",
        show(&o)
    );
    assert!(
        !err.contains("panicked"),
        "{args:?} panicked:\n{}",
        show(&o)
    );
    assert!(
        err.contains(needle),
        "{args:?}: expected '{needle}' in stderr:\n{}",
        show(&o)
    );
    let error_lines = err.lines().filter(|l| l.contains("error")).count();
    assert_eq!(
        error_lines,
        1,
        "{args:?}: expected one error line:\n{}",
        show(&o)
    );
}

#[test]
fn bad_kernels_are_refused() {
    let dir = tempdir();
    let junk = dir.path().join("junk");
    std::fs::write(&junk, vec![0x5a; 8192]).unwrap();
    let truncated = dir.path().join("truncated-elf");
    std::fs::write(&truncated, b"\x7fELF\x02\x01\x01\0\0\0").unwrap();
    let junk_s = junk.to_str().unwrap();
    let trunc_s = truncated.to_str().unwrap();
    let dir_s = dir.path().to_str().unwrap();
    expect_error(
        &["run", "--kernel", "/nonexistent/vmlinux"],
        None,
        "cannot open kernel /nonexistent/vmlinux",
    );
    expect_error(
        &["run", "--kernel", junk_s],
        None,
        "neither an ELF vmlinux nor a bzImage",
    );
    expect_error(&["run", "--kernel", dir_s], None, "Is a directory");
    if !skip_without_kvm("bad_kernels_are_refused (truncated ELF)") {
        expect_error(
            &["run", "--kernel", trunc_s],
            None,
            "cannot load ELF kernel",
        );
    }
    expect_error(
        &["run", "--initramfs", "/nonexistent/initrd"],
        None,
        "cannot open initramfs",
    );
}

#[test]
fn absurd_memory_sizes_are_refused() {
    expect_error(&["run", "--memory", "0"], None, "out of range");
    expect_error(&["run", "--memory", "4K"], None, "out of range");
    expect_error(&["run", "--memory", "900T"], None, "out of range");
    expect_error(
        &["run", "--memory", "99999999999999T"],
        None,
        "invalid size",
    );
    expect_error(&["run", "--memory", "lots"], None, "invalid size");
    expect_error(
        &["run", "--memory", "100000001"],
        None,
        "not a multiple of 4 KiB",
    );
}

#[test]
fn bad_disks_are_refused() {
    let dir = tempdir();
    let odd = dir.path().join("odd.img");
    std::fs::write(&odd, vec![0u8; 1000]).unwrap();
    let empty = dir.path().join("empty.img");
    std::fs::write(&empty, b"").unwrap();
    let p = |x: &std::path::Path| format!("path={}", x.display());
    expect_error(
        &["run", "--disk", "path=/nonexistent/disk.img"],
        None,
        "cannot open disk image /nonexistent/disk.img",
    );
    expect_error(&["run", "--disk", &p(&odd)], None, "not a multiple of 512");
    expect_error(&["run", "--disk", &p(&empty)], None, "is empty");
    expect_error(
        &["run", "--disk", "readonly=on"],
        None,
        "path=FILE is required",
    );
    expect_error(
        &["run", "--disk", &format!("{},readonly=perhaps", p(&odd))],
        None,
        "readonly must be on or off",
    );
}

#[test]
fn bad_command_lines_are_refused() {
    expect_error(&["run", "--cpus", "0"], None, "invalid --cpus 0");
    expect_error(&["run", "--cpus", "4096"], None, "invalid --cpus 4096");
    expect_error(
        &["run", "--serial", "pty"],
        None,
        "expected tty, file=PATH or off",
    );
    expect_error(&["run", "--no-such-flag"], None, "unexpected argument");
    expect_error(&["fly"], None, "unrecognized subcommand");
}

#[test]
fn missing_or_forbidden_kvm_is_a_clear_error() {
    expect_error(
        &["run"],
        Some(("MIRRORVM_KVM_DEVICE", "/nonexistent/kvm")),
        "cannot open /nonexistent/kvm",
    );
    expect_error(
        &["run"],
        Some(("MIRRORVM_KVM_DEVICE", "/dev/null")),
        "/dev/null is not a KVM device",
    );
    // Not permitted: run as an unprivileged user when we are root.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 && std::path::Path::new("/dev/kvm").exists() {
        let mut c = std::process::Command::new("setpriv");
        c.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            env!("CARGO_BIN_EXE_mirrorvm"),
            "run",
        ]);
        c.stdin(std::process::Stdio::null());
        let o = run_with_timeout(c, T);
        let err = String::from_utf8_lossy(&o.stderr);
        let kvm_world_accessible = std::fs::metadata("/dev/kvm")
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o006 == 0o006)
            .unwrap_or(false);
        if !kvm_world_accessible {
            assert!(
                err.contains("Permission denied") && err.contains("kvm"),
                "{}",
                show(&o)
            );
            assert_eq!(o.status.code(), Some(1), "{}", show(&o));
        }
    } else {
        loud("*** SKIPPED missing_or_forbidden_kvm_is_a_clear_error (permission case): needs root to drop privileges ***");
    }
}

#[test]
fn a_vcpu_spinning_in_kvm_is_still_stopped_cleanly() {
    if skip_without_kvm!() {
        return;
    }
    // vmcall at CPL0 makes kvm_pvm spin the vCPU inside KVM_RUN forever: the run
    // loop must still end on SIGTERM, through the kick or, failing that, the stop
    // deadline with a clear message, never by hanging.
    let mut child = mirrorvm()
        .args(["run", "--cmdline", "fault kind=vmcall"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    std::thread::sleep(Duration::from_millis(1500));
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let start = std::time::Instant::now();
    let o = loop {
        if child.try_wait().expect("wait").is_some() {
            break child.wait_with_output().expect("output");
        }
        if start.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            panic!("mirrorvm hung with a vCPU spinning in KVM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("this vCPU now hangs"), "{}", show(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    match o.status.code() {
        Some(143) => {}
        Some(1) => assert!(err.contains("did not leave KVM_RUN"), "{}", show(&o)),
        _ => panic!("unexpected end: {}", show(&o)),
    }
}
