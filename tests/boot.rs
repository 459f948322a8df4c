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
    let mut c = mirrorvm();
    c.args(["run", "--cmdline", "counter interval_ms=10"]);
    let mut r = Running::spawn(c);
    // Signal only once the guest runs (not after a fixed sleep a busy machine may
    // not honour).
    assert!(
        r.wait_for(T, |l| l == "counter 1"),
        "the guest did not start:\n{}",
        r.seen.join("\n")
    );
    r.signal(libc::SIGTERM);
    let status = r.wait_exit(T).expect("mirrorvm ignored SIGTERM");
    let out = r.seen.join("\n");
    assert_eq!(
        status.code(),
        Some(128 + libc::SIGTERM),
        "{out}\n{}",
        r.stderr()
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
    expect_error_from(c, &format!("{args:?}"), &[needle]);
}

/// Runs `c` and expects a non-zero exit (not a panic's 101) with a one-line error
/// containing every one of `needles`; returns the output.
fn expect_error_from(
    c: std::process::Command,
    what: &str,
    needles: &[&str],
) -> std::process::Output {
    let o = run_with_timeout(c, T);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{what} succeeded:\n{}", show(&o));
    assert_ne!(o.status.code(), Some(101), "{what} panicked:\n{}", show(&o));
    assert!(!err.contains("panicked"), "{what} panicked:\n{}", show(&o));
    for needle in needles {
        assert!(
            err.contains(needle),
            "{what}: expected '{needle}' in stderr:\n{}",
            show(&o)
        );
    }
    let error_lines = err.lines().filter(|l| l.contains("error")).count();
    assert_eq!(
        error_lines,
        1,
        "{what}: expected one error line:\n{}",
        show(&o)
    );
    o
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
    if !skip_without_kvm!("truncated ELF") {
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

/// A command-line error exits 64 (sysexits' EX_USAGE), never 2 (a guest that
/// stopped in a way that ends a VM) or 1 (mirrorvm failed); --help and --version
/// still succeed.
#[test]
fn usage_errors_exit_64_and_help_exits_0() {
    let status = |args: &[&str]| {
        let mut c = mirrorvm();
        c.args(args);
        let o = run_with_timeout(c, T);
        (o.status.code(), show(&o))
    };
    for args in [
        &["run", "--no-such-flag"][..],
        &["fly"],
        &[],
        &["run", "--cpus", "0"],
        &["run", "--memory", "lots"],
        &["run", "--metrics", "/tmp/x.jsonl"],
        &[
            "run",
            "--peer",
            "127.0.0.1:1",
            "--dead-ms",
            "5",
            "--heartbeat-ms",
            "10",
        ],
        &[
            "standby",
            "--listen",
            "127.0.0.1:0",
            "--dead-ms",
            "5",
            "--heartbeat-ms",
            "10",
        ],
        &["ctl", "info"],
    ] {
        let (code, out) = status(args);
        assert_eq!(code, Some(64), "{args:?}:\n{out}");
    }
    // A bad --peer spec is one line naming what is wrong.
    for (spec, says) in [
        ("127.0.0.1:1,max-rate=10K", "below the least"),
        ("127.0.0.1:1,max-rate=fast", "invalid size 'fast'"),
        ("127.0.0.1:1,speed=3", "unknown --peer option 'speed=3'"),
        (",max-rate=10M", "needs an address"),
    ] {
        let mut c = mirrorvm();
        c.args(["run", "--peer", spec]);
        let o = run_with_timeout(c, T);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(o.status.code(), Some(64), "{spec}:\n{}", show(&o));
        assert_eq!(
            err.trim().lines().count(),
            1,
            "{spec}: not one line:\n{err}"
        );
        assert!(err.contains(says), "{spec}: {err}");
    }
    for args in [
        &["--help"][..],
        &["--version"],
        &["run", "--help"],
        &["ctl", "--help"],
    ] {
        let (code, out) = status(args);
        assert_eq!(code, Some(0), "{args:?}:\n{out}");
    }
}

#[test]
fn missing_or_not_kvm_devices_are_a_clear_error() {
    expect_error(
        &["run"],
        Some(("MIRRORVM_KVM_DEVICE", "/nonexistent/kvm")),
        "cannot open /nonexistent/kvm: No such file or directory (os error 2) (it does not exist: this host has no KVM",
    );
    expect_error(
        &["run"],
        Some(("MIRRORVM_KVM_DEVICE", "/dev/null")),
        "/dev/null is not a KVM device",
    );
}

#[test]
fn a_kvm_device_we_may_not_open_is_a_clear_error() {
    // A device node mirrorvm is not allowed to open, for certain: a root-owned file
    // with mode 000 in a directory anyone may enter, opened as an unprivileged
    // user (root drops to nobody with setpriv; anyone else is unprivileged already).
    let dir = tempdir();
    let set_mode = |p: &std::path::Path, mode: u32| {
        std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(mode))
            .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", p.display()));
    };
    set_mode(dir.path(), 0o755);
    let node = dir.path().join("kvm");
    std::fs::write(&node, b"").unwrap();
    set_mode(&node, 0o000);
    let root = nix::unistd::geteuid().is_root();
    let mut c = if root {
        let mut c = std::process::Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_mirrorvm"));
        c.stdin(std::process::Stdio::null());
        c
    } else {
        if std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&node)
            .is_ok()
        {
            // Only a capability (CAP_DAC_OVERRIDE) opens a mode-000 file.
            skipped(
                &function_path!(),
                "this non-root user may open any file, so no device can be forbidden",
            );
            return;
        }
        mirrorvm()
    };
    c.arg("run").env("MIRRORVM_KVM_DEVICE", &node);
    if root {
        // setpriv itself must work (util-linux, and the right to change uid here).
        let probe = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "true"])
            .output();
        match probe {
            Ok(o) if o.status.success() => {}
            other => {
                skipped(
                    &function_path!(),
                    &format!("cannot drop root privileges with setpriv: {other:?}"),
                );
                return;
            }
        }
    }
    let shown = node.display().to_string();
    let o = expect_error_from(
        c,
        &format!("run with MIRRORVM_KVM_DEVICE={shown}, unprivileged"),
        &[
            &format!("cannot open {shown}: Permission denied (os error 13)"),
            "(permission denied: run as root or add yourself to the 'kvm' group)",
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
}

#[test]
fn a_vcpu_spinning_in_kvm_is_still_stopped_cleanly() {
    if skip_without_kvm!() {
        return;
    }
    // vmcall at CPL0 makes kvm_pvm spin the vCPU inside KVM_RUN forever: the run
    // loop must still end on SIGTERM, through the kick or, failing that, the stop
    // deadline with a clear message, never by hanging.
    let mut c = mirrorvm();
    c.args(["run", "--cmdline", "fault kind=vmcall"]);
    let mut r = Running::spawn(c);
    assert!(
        r.wait_for(T, |l| l.contains("this vCPU now hangs")),
        "the guest did not reach the vmcall:\n{}",
        r.seen.join("\n")
    );
    // Give the vCPU a moment to enter the vmcall (not an assertion: were it not
    // there yet, the stop would only be easier).
    std::thread::sleep(Duration::from_millis(500));
    r.signal(libc::SIGTERM);
    let status = r
        .wait_exit(T)
        .expect("mirrorvm hung with a vCPU spinning in KVM");
    let out = r.seen.join("\n");
    let err = r.stderr();
    match status.code() {
        Some(143) => {}
        Some(1) => assert!(err.contains("did not leave KVM_RUN"), "{out}\n{err}"),
        _ => panic!("unexpected end: {status:?}\n{out}\n{err}"),
    }
}
