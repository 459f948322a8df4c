//! The serial console on a terminal: raw mode while the guest runs (Ctrl-C goes to
//! the guest, not to mirrorvm), Ctrl-A x quits, and the terminal's settings are
//! restored afterwards. `script` (util-linux) provides the pseudo-terminal.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Runs `shell` under `script` on a new pseudo-terminal, feeding `input` after
/// `delay`; returns what the terminal showed.
fn on_a_terminal(shell: &str, input: &[u8], delay: Duration) -> String {
    let mut child = Command::new("script")
        .args(["-qec", shell, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("script (util-linux)");
    let mut stdin = child.stdin.take().expect("stdin");
    std::thread::sleep(delay);
    let _ = stdin.write_all(input);
    let _ = stdin.flush();
    let start = Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("mirrorvm on a terminal did not end");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(stdin);
    let o = child.wait_with_output().expect("output");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn ctrl_c_goes_to_the_guest_and_ctrl_a_x_quits_restoring_the_terminal() {
    if skip_without_kvm!() {
        return;
    }
    let dir = tempdir();
    let (before, after) = (dir.path().join("before"), dir.path().join("after"));
    let shell = format!(
        "stty -g > {b}; {bin} run --cmdline 'counter interval_ms=50'; echo \"rc=$?\"; stty -g > {a}",
        b = before.display(),
        a = after.display(),
        bin = env!("CARGO_BIN_EXE_mirrorvm"),
    );
    // Ctrl-C, then a second later Ctrl-A x. In raw mode Ctrl-C is a byte for the
    // guest's UART; were the terminal cooked, it would kill mirrorvm (rc=130).
    let shown = on_a_terminal(&shell, b"\x03\x01x", Duration::from_millis(1500));
    assert!(
        shown.contains("rc=0"),
        "Ctrl-A x did not quit cleanly:\n{shown}"
    );
    assert!(
        !shown.contains("rc=130"),
        "Ctrl-C reached mirrorvm:\n{shown}"
    );
    assert!(
        shown.contains("counter 10"),
        "the guest did not run:\n{shown}"
    );
    let b = std::fs::read_to_string(&before).unwrap();
    let a = std::fs::read_to_string(&after).unwrap();
    assert_eq!(b, a, "terminal settings not restored");
}
