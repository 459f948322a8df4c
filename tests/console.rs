//! The serial console on a terminal: raw mode while the guest runs (Ctrl-C goes to
//! the guest, not to mirrorvm), Ctrl-A x quits, and the terminal's settings are
//! restored afterwards. `script` (util-linux) provides the pseudo-terminal.

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Runs `shell` under `script` on a new pseudo-terminal, feeding `input` once the
/// terminal has shown `ready`; returns what the terminal showed.
fn on_a_terminal(shell: &str, ready: &str, input: &[u8]) -> String {
    let mut child = Command::new("script")
        .args(["-qec", shell, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("script (util-linux)");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = stdout.read(&mut buf) {
            if tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut shown = Vec::new();
    let mut sent = false;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(chunk) => shown.extend_from_slice(&chunk),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            // The terminal closed: everything it showed has arrived.
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if !sent && String::from_utf8_lossy(&shown).contains(ready) {
            stdin.write_all(input).expect("type on the terminal");
            stdin.flush().expect("type on the terminal");
            sent = true;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "mirrorvm on a terminal did not end (input sent: {sent}):\n{}",
                String::from_utf8_lossy(&shown)
            );
        }
    }
    drop(stdin);
    let status = child.wait().expect("wait for script");
    assert!(
        sent,
        "the terminal never showed '{ready}' (script {status:?}):\n{}",
        String::from_utf8_lossy(&shown)
    );
    String::from_utf8_lossy(&shown).into_owned()
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
    // Once the guest runs (so the terminal is in raw mode), Ctrl-C, then Ctrl-A x.
    // In raw mode Ctrl-C is a byte for the guest's UART; were the terminal cooked,
    // it would kill mirrorvm (rc=130).
    let shown = on_a_terminal(&shell, "counter 10", b"\x03\x01x");
    assert!(
        shown.contains("rc=0"),
        "Ctrl-A x did not quit cleanly:\n{shown}"
    );
    assert!(
        !shown.contains("rc=130"),
        "Ctrl-C reached mirrorvm:\n{shown}"
    );
    let b = std::fs::read_to_string(&before).unwrap();
    let a = std::fs::read_to_string(&after).unwrap();
    assert_eq!(b, a, "terminal settings not restored");
}
