//! Re-protection (kvm-backed, on loopback): a standby that dials a running primary
//! (`standby --join`), failback A → B → A sending only what differs, a disk changed
//! behind a returning host's back, a replica older than what its primary ran on
//! alone, and hosts killed in the middle of a re-protection. One test at a time:
//! two VMMs on two cores.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use common::copylines::{copies, downtime_ms as downtime};
use common::pair::{continuity, free_port, lines, mix_seconds, wait};
use common::*;

static SERIAL: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const MIX: &str = "mix seconds=0 mb=8 pages_per_ms=20";
const DISK: u64 = 32 << 20;

fn addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// A disk image full of a non-zero pattern: a full copy would send all of it.
fn filled_image(p: &Path) {
    let fill: Vec<u8> = (0..DISK)
        .map(|i| u8::try_from(i % 251).expect("below 251") | 1)
        .collect();
    std::fs::write(p, fill).expect("write a filled image");
}

/// `run`: the primary, with a disk, mirroring to `peer` or waiting for a standby on
/// `listen`.
fn primary(
    cmdline: &str,
    disk: &Path,
    console: &Path,
    peer: Option<&str>,
    listen: Option<&str>,
) -> Command {
    let mut c = mirrorvm();
    c.args([
        "run",
        "--memory",
        "64M",
        "--cpus",
        "2",
        "--cmdline",
        cmdline,
    ])
    .arg("--disk")
    .arg(format!("path={},checkpoint=on", disk.display()))
    .arg("--serial")
    .arg(format!("file={}", console.display()));
    if let Some(p) = peer {
        c.args(["--peer", p]);
    }
    if let Some(l) = listen {
        c.args(["--listen", l]);
    }
    c
}

/// `standby`: listening on `listen`, joining `join`, with its disk, console and
/// metrics (one line per applied checkpoint).
fn standby(
    disk: &Path,
    console: &Path,
    metrics: &Path,
    listen: Option<&str>,
    join: Option<&str>,
) -> Command {
    let mut c = mirrorvm();
    c.arg("standby")
        .arg("--disk")
        .arg(format!("path={},checkpoint=on", disk.display()))
        .arg("--serial")
        .arg(format!("file={}", console.display()))
        .arg("--metrics")
        .arg(metrics);
    if let Some(l) = listen {
        c.args(["--listen", l]);
    }
    if let Some(j) = join {
        c.args(["--join", j]);
    }
    c
}

/// Waits up to `secs` for a line of `who`'s stderr that contains `pat`; else fails
/// with `why` and both stderrs (`other`'s under its name).
fn expect_line(who: &Running, pat: &str, secs: u64, why: &str, other: (&str, &Running)) {
    assert!(
        who.wait_stderr(Duration::from_secs(secs), |l| l.contains(pat))
            .is_some(),
        "{why}:\n{}\n{}:\n{}",
        who.stderr_now(),
        other.0,
        other.1.stderr_now()
    );
}

/// Waits for `who`'s takeover from a killed primary; else fails with `why` and both
/// stderrs (`killed`: the killed host's name and what it printed).
fn expect_takeover(who: &Running, why: &str, killed: (&str, &str)) {
    assert!(
        who.wait_stderr(Duration::from_secs(30), |l| l
            .contains("failover: primary lost"))
            .is_some(),
        "{why}:\n{}\n{}:\n{}",
        who.stderr_now(),
        killed.0,
        killed.1
    );
}

/// Waits up to 60 s for the console file `console` to show at least `memory`
/// progress lines of the memory engine and `disk` of the disk engine.
fn shows(console: &Path, memory: usize, disk: usize) -> bool {
    wait(Duration::from_secs(60), || {
        let c = read(console);
        mix_seconds(&c, "memory").len() >= memory && mix_seconds(&c, "disk").len() >= disk
    })
}

fn no_failed_checks(consoles: &[(&str, &str)]) {
    for (who, c) in consoles {
        assert!(
            !c.contains("FAILED"),
            "the guest's own checks failed on {who}:\n{c}"
        );
    }
}

/// Progress lines neither lost nor repeated (beyond the one epoch a failover may
/// show twice) across consoles shown one after the other.
fn assert_continuous(parts: &[&str]) {
    for engine in ["memory", "disk"] {
        let mut seen: Vec<u64> = Vec::new();
        for p in parts {
            let next = mix_seconds(p, engine);
            let (lost, repeated) = continuity(&seen, &next);
            assert_eq!(
                lost,
                0,
                "{engine} progress lost across a failover:\n{}",
                parts.join("\n-----\n")
            );
            assert!(
                repeated <= 1,
                "{engine} progress repeated {repeated} times:\n{}",
                parts.join("\n-----\n")
            );
            seen.extend(next);
        }
    }
}

#[test]
fn a_to_b_to_a_fails_back_sending_only_what_differs() {
    if skip_without_kvm!() {
        return;
    }
    let _one = one_at_a_time();
    let dir = tempdir();
    let p = |n: &str| dir.path().join(n);
    filled_image(&p("a.img"));
    make_image(&p("b.img"), DISK);
    let (a_addr, b_addr) = (addr(), addr());

    // A mirrors to B; A dies; B takes over and accepts a standby on its address.
    let b = Running::spawn(standby(
        &p("b.img"),
        &p("b.txt"),
        &p("b.jsonl"),
        Some(&b_addr),
        None,
    ));
    let a = Running::spawn(primary(MIX, &p("a.img"), &p("a.txt"), Some(&b_addr), None));
    assert!(
        wait(Duration::from_secs(90), || lines(&p("b.jsonl")) >= 5),
        "B applied nothing:\n{}",
        b.stderr()
    );
    let a_err = a.stderr();
    expect_takeover(&b, "B did not take over", ("A", &a_err));
    assert!(shows(&p("b.txt"), 2, 0));

    // A comes back as B's standby, with its own disk: only what differs travels.
    let a2 = Running::spawn(standby(
        &p("a.img"),
        &p("a2.txt"),
        &p("a2.jsonl"),
        Some(&a_addr),
        Some(&b_addr),
    ));
    assert!(
        wait(Duration::from_secs(120), || lines(&p("a2.jsonl")) >= 5),
        "A did not rejoin B:\nA2:\n{}\nB:\n{}",
        a2.stderr_now(),
        b.stderr_now()
    );
    let b_err = b.stderr_now();
    let c = copies(&b_err);
    assert_eq!(c.len(), 1, "one initial copy from B to A:\n{b_err}");
    let common::copylines::Copy {
        sent,
        total,
        differed,
        ..
    } = c[0];
    // The disk is 32 MiB of non-zero bytes; A's copy differs from B's only where the
    // guest wrote since the failover (a few records) and in what A wrote that B
    // never acknowledged.
    assert!(
        differed < DISK / 8,
        "{differed} bytes of disk differed of {DISK}:\n{b_err}"
    );
    assert!(sent < total / 3, "{sent} bytes sent of {total}:\n{b_err}");

    // B dies; A takes over again.
    let b_err = b.stderr();
    expect_takeover(&a2, "A did not take over from B", ("B", &b_err));
    assert!(
        shows(&p("a2.txt"), 3, 3),
        "the guest did not carry on at A:\n{}",
        a2.stderr_now()
    );
    let a2_err = a2.stderr();
    let (ca, cb, ca2) = (read(&p("a.txt")), read(&p("b.txt")), read(&p("a2.txt")));
    no_failed_checks(&[("A", &ca), ("B", &cb), ("A again", &ca2)]);
    assert_continuous(&[&ca, &cb, &ca2]);
    loud(&format!(
        "reprotect: failback B → A sent {sent} of {total} bytes ({differed} bytes of disk differed); A took over again: {}",
        a2_err.lines().find(|l| l.contains("failover: primary lost")).unwrap_or("")
    ));
}

#[test]
fn a_chunk_changed_behind_a_returning_hosts_back_is_found_and_resent() {
    if skip_without_kvm!() {
        return;
    }
    let _one = one_at_a_time();
    let dir = tempdir();
    let p = |n: &str| dir.path().join(n);
    filled_image(&p("a.img"));
    make_image(&p("b.img"), DISK);
    let a_addr = addr();
    // The guest never writes its disk: after the first copy both images are equal.
    let a = Running::spawn(primary(
        "counter interval_ms=20",
        &p("a.img"),
        &p("a.txt"),
        None,
        Some(&a_addr),
    ));
    let b = Running::spawn(standby(
        &p("b.img"),
        &p("b.txt"),
        &p("b.jsonl"),
        None,
        Some(&a_addr),
    ));
    assert!(
        wait(Duration::from_secs(90), || lines(&p("b.jsonl")) >= 3),
        "B never caught up:\n{}\nA:\n{}",
        b.stderr_now(),
        a.stderr_now()
    );
    drop(b.stderr());
    assert!(
        a.wait_stderr(Duration::from_secs(10), |l| l
            .contains("running unprotected"))
            .is_some(),
        "A did not notice its standby died:\n{}",
        a.stderr_now()
    );
    // One 64 KiB chunk of B's copy changes while B is away.
    let at = 17 * (64 << 10) + 1000;
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(p("b.img"))
            .unwrap();
        f.write_all_at(b"changed behind its back", at).unwrap();
    }
    let b2 = Running::spawn(standby(
        &p("b.img"),
        &p("b2.txt"),
        &p("b2.jsonl"),
        None,
        Some(&a_addr),
    ));
    assert!(
        wait(Duration::from_secs(90), || lines(&p("b2.jsonl")) >= 3),
        "B did not rejoin:\n{}\nA:\n{}",
        b2.stderr_now(),
        a.stderr_now()
    );
    // An orderly end: B exits with A's status, and both images are equal.
    a.signal(libc::SIGTERM);
    let mut a = a;
    let mut b2 = b2;
    assert!(a.wait_exit(Duration::from_secs(30)).is_some());
    assert!(
        b2.wait_exit(Duration::from_secs(30)).is_some(),
        "B did not end with A"
    );
    let a_err = a.stderr();
    let c = copies(&a_err);
    assert_eq!(c.len(), 2, "two initial copies:\n{a_err}");
    assert_eq!(
        c[0].differed, DISK,
        "the first copy finds every chunk different:\n{a_err}"
    );
    assert_eq!(
        c[1].differed,
        64 << 10,
        "the second copy resends exactly the changed chunk:\n{a_err}"
    );
    let (ia, ib) = (
        std::fs::read(p("a.img")).unwrap(),
        std::fs::read(p("b.img")).unwrap(),
    );
    assert!(ia == ib, "the images differ after the rejoin");
}

fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(libc::pid_t::try_from(pid).expect("a pid"));
    nix::sys::signal::kill(pid, sig).expect("signal a child");
}

/// Lines of `stderr` that contain `pat`.
fn count(stderr: &str, pat: &str) -> usize {
    stderr.lines().filter(|l| l.contains(pat)).count()
}

#[test]
fn a_replica_older_than_unprotected_since_rejoins_as_a_standby_but_never_resumes() {
    use nix::sys::signal::Signal::{SIGCONT, SIGSTOP};
    if skip_without_kvm!() {
        return;
    }
    let _one = one_at_a_time();
    let dir = tempdir();
    let p = |n: &str| dir.path().join(n);
    make_image(&p("a.img"), DISK);
    make_image(&p("b.img"), DISK);
    let a_addr = addr();
    let witness = p("witness");
    let mut pc = primary(MIX, &p("a.img"), &p("a.txt"), None, Some(&a_addr));
    pc.arg("--witness").arg(&witness);
    let a = Running::spawn(pc);
    let mut sc = standby(&p("b.img"), &p("b.txt"), &p("b.jsonl"), None, Some(&a_addr));
    sc.arg("--witness").arg(&witness);
    let b = Running::spawn(sc);
    assert!(
        wait(Duration::from_secs(90), || lines(&p("b.jsonl")) >= 3),
        "B never caught up:\n{}",
        b.stderr_now()
    );
    // B stalls: A gives it up and runs on alone, recording so in the witness.
    signal(b.pid(), SIGSTOP);
    let gave_up = wait(Duration::from_secs(10), || {
        count(&a.stderr_now(), "running unprotected") >= 1
    });
    signal(b.pid(), SIGCONT);
    assert!(gave_up, "A did not give B up:\n{}", a.stderr_now());
    // Accepted as a standby: B rejoins with its (older) replica and is sent only the
    // pages changed since.
    let before = lines(&p("b.jsonl"));
    assert!(
        wait(Duration::from_secs(90), || lines(&p("b.jsonl"))
            >= before + 3),
        "B did not rejoin:\n{}\nA:\n{}",
        b.stderr_now(),
        a.stderr_now()
    );
    let c = copies(&a.stderr_now());
    assert_eq!(c.len(), 2, "{}", a.stderr_now());
    assert!(
        c[1].delta,
        "the rejoin copy was not built on B's replica:\n{}",
        a.stderr_now()
    );

    // Refused as a failover source: B stalls again, A runs on alone (and records
    // so), then A dies while B is away. B's replica is older than what A ran on
    // alone: B must never resume it.
    signal(b.pid(), SIGSTOP);
    let gave_up = wait(Duration::from_secs(10), || {
        count(&a.stderr_now(), "running unprotected") >= 2
    });
    let a_err = a.stderr();
    signal(b.pid(), SIGCONT);
    assert!(gave_up, "A did not give B up the second time:\n{a_err}");
    std::thread::sleep(Duration::from_secs(3));
    let b_err = b.stderr();
    assert!(
        !b_err.contains("failover: primary lost"),
        "B resumed a replica older than A's unprotected-since record:\n{b_err}\nA:\n{a_err}"
    );
    assert!(read(&p("b.txt")).is_empty(), "B ran the guest:\n{b_err}");
}

#[test]
fn killing_either_host_during_a_reprotection_leaves_the_survivor_and_a_later_one_works() {
    if skip_without_kvm!() {
        return;
    }
    let _one = one_at_a_time();
    let dir = tempdir();
    let p = |n: &str| dir.path().join(n);
    filled_image(&p("a.img"));
    let a_addr = addr();
    let a = Running::spawn(primary(MIX, &p("a.img"), &p("a.txt"), None, Some(&a_addr)));
    let mut seed = 0x5eed_u64;
    for round in 0..4 {
        let img = p(&format!("b{round}.img"));
        make_image(&img, DISK);
        let (console, metrics) = (p(&format!("b{round}.txt")), p(&format!("b{round}.jsonl")));
        let b = Running::spawn(standby(&img, &console, &metrics, None, Some(&a_addr)));
        assert!(
            wait(Duration::from_secs(30), || count(&a.stderr_now(), "joined")
                > round),
            "round {round}: no standby joined:\n{}",
            a.stderr_now()
        );
        // A random moment of the copy (32 MiB of disk and the guest's memory).
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        std::thread::sleep(Duration::from_millis((seed >> 33) % 400));
        let b_err = b.stderr();
        assert!(!b_err.contains("failover"), "round {round}: {b_err}");
        assert!(
            read(&console).is_empty(),
            "round {round}: a standby ran the guest"
        );
    }
    // The primary survived every one of them.
    let shown = mix_seconds(&read(&p("a.txt")), "memory").len();
    assert!(
        wait(Duration::from_secs(30), || mix_seconds(
            &read(&p("a.txt")),
            "memory"
        )
        .len()
            > shown + 1),
        "the primary's guest stopped:\n{}",
        a.stderr_now()
    );
    // And a later re-protection works.
    make_image(&p("last.img"), DISK);
    let b = Running::spawn(standby(
        &p("last.img"),
        &p("last.txt"),
        &p("last.jsonl"),
        None,
        Some(&a_addr),
    ));
    assert!(
        wait(Duration::from_secs(120), || lines(&p("last.jsonl")) >= 3),
        "the last standby did not catch up:\n{}\nA:\n{}",
        b.stderr_now(),
        a.stderr_now()
    );

    // The other way round: the primary dies during a standby's initial copy (the
    // standby rejoins with the replica it kept). It holds nothing of this session
    // to resume: it says so and runs no guest.
    let lost_before = count(&a.stderr_now(), "running unprotected");
    signal(b.pid(), nix::sys::signal::Signal::SIGSTOP);
    let joined = count(&a.stderr_now(), "joined");
    let gave_up = wait(Duration::from_secs(10), || {
        count(&a.stderr_now(), "running unprotected") > lost_before
    });
    signal(b.pid(), nix::sys::signal::Signal::SIGCONT);
    assert!(
        gave_up,
        "A did not give the last standby up:\n{}",
        a.stderr_now()
    );
    assert!(
        wait(Duration::from_secs(30), || count(&a.stderr_now(), "joined")
            > joined),
        "the last standby did not rejoin:\n{}",
        a.stderr_now()
    );
    let applied = lines(&p("last.jsonl"));
    let a_err = a.stderr();
    let mut b = b;
    let ended = wait(Duration::from_secs(30), || {
        b.exited().is_some() || b.stderr_now().contains("failover: primary lost")
    });
    // Between two sessions (the primary died just as it gave the standby up), a
    // --join standby dials on: it resumes nothing, which is what matters here.
    let dialing = b.stderr_now().contains("waiting for the primary at");
    let b_err = b.stderr();
    assert!(
        ended || dialing,
        "the standby neither ended, took over, nor dials on:\n{b_err}"
    );
    if dialing && !ended {
        assert!(
            read(&p("last.txt")).is_empty(),
            "a standby ran a replica it must not resume"
        );
    } else if lines(&p("last.jsonl")) == applied {
        // Killed before the copy's first checkpoint: nothing to resume.
        assert!(
            b_err.contains("nothing to take over"),
            "{b_err}\nA:\n{a_err}"
        );
        assert!(
            read(&p("last.txt")).is_empty(),
            "a standby ran a replica it must not resume"
        );
    } else {
        // The copy completed first: a proper failover.
        assert!(b_err.contains("failover: primary lost"), "{b_err}");
    }
}

/// `mirrorvm switchover --api-socket SOCK`: exits 0 once the primary took it.
fn switchover(sock: &Path) {
    let o = run_with_timeout(
        {
            let mut c = mirrorvm();
            c.arg("switchover").arg("--api-socket").arg(sock);
            c
        },
        Duration::from_secs(30),
    );
    assert!(o.status.success(), "switchover refused: {}", show(&o));
}

#[test]
fn switchover_a_to_b_to_a_under_a_two_vcpu_mix_loses_nothing() {
    if skip_without_kvm!() {
        return;
    }
    let _one = one_at_a_time();
    let dir = tempdir();
    let p = |n: &str| dir.path().join(n);
    make_image(&p("a.img"), DISK);
    make_image(&p("b.img"), DISK);
    let (a_addr, b_addr) = (addr(), addr());
    let mut sc = standby(&p("b.img"), &p("b.txt"), &p("b.jsonl"), Some(&b_addr), None);
    sc.arg("--api-socket").arg(p("b.sock"));
    let b = Running::spawn(sc);
    let mut pc = primary(MIX, &p("a.img"), &p("a.txt"), Some(&b_addr), Some(&a_addr));
    pc.arg("--api-socket").arg(p("a.sock"));
    let a = Running::spawn(pc);
    assert!(
        wait(Duration::from_secs(90), || lines(&p("b.jsonl")) >= 5),
        "B never caught up:\n{}\nA:\n{}",
        b.stderr_now(),
        a.stderr_now()
    );

    // A → B: B runs the guest, A becomes its standby without a copy of memory.
    switchover(&p("a.sock"));
    expect_line(
        &b,
        "switchover: took the guest over",
        30,
        "B did not take the guest:",
        ("A", &a),
    );
    expect_line(
        &a,
        "initial copy complete",
        60,
        "A did not become B's standby:",
        ("B", &b),
    );
    let first = downtime(&a.stderr_now(), &b.stderr_now()).expect("the first switchover's figures");
    let c = copies(&b.stderr_now());
    assert_eq!(c.len(), 1, "{}", b.stderr_now());
    assert!(
        c[0].delta,
        "A's memory was copied whole, not built on:\n{}",
        b.stderr_now()
    );
    assert!(shows(&p("b.txt"), 2, 0));

    // B → A.
    switchover(&p("b.sock"));
    expect_line(
        &a,
        "switchover: took the guest over",
        30,
        "A did not take the guest back:",
        ("B", &b),
    );
    assert!(
        b.wait_stderr(Duration::from_secs(60), |l| l
            .contains("initial copy complete"))
            .is_some(),
        "B did not become A's standby:\n{}",
        b.stderr_now()
    );
    let second =
        downtime(&b.stderr_now(), &a.stderr_now()).expect("the second switchover's figures");
    let shown = mix_seconds(&read(&p("a.txt")), "memory").len();
    assert!(
        shows(&p("a.txt"), shown + 2, 3),
        "the guest did not carry on at A:\n{}",
        a.stderr_now()
    );
    // An orderly end: both exit 0.
    a.signal(libc::SIGTERM);
    let (mut a, mut b) = (a, b);
    let sa = a.wait_exit(Duration::from_secs(30));
    let sb = b.wait_exit(Duration::from_secs(30));
    let (ea, eb) = (a.stderr(), b.stderr());
    assert_eq!(sa.and_then(|s| s.code()), Some(143), "A:\n{ea}");
    assert_eq!(sb.and_then(|s| s.code()), Some(143), "B:\n{eb}");
    // The console, A's then B's then A's again (A's file holds both of its parts):
    // nothing lost, nothing repeated, and the guest's own checks passed throughout.
    let (ca, cb) = (read(&p("a.txt")), read(&p("b.txt")));
    no_failed_checks(&[("A", &ca), ("B", &cb)]);
    for engine in ["memory", "disk"] {
        let mut all: Vec<u64> = mix_seconds(&ca, engine);
        all.extend(mix_seconds(&cb, engine));
        let shown = all.len();
        all.sort_unstable();
        all.dedup();
        let repeated = shown - all.len();
        let first = all.first().copied().unwrap_or(0);
        let last = all.last().copied().unwrap_or(0);
        let lost = (last - first + 1) - all.len() as u64;
        assert_eq!(
            lost, 0,
            "{engine} progress lost across two switchovers:\nA:\n{ca}\nB:\n{cb}"
        );
        // Output commit: at most the one epoch a takeover may show twice, per switchover.
        assert!(
            repeated <= 2,
            "{engine} progress shown {repeated} times twice:\nA:\n{ca}\nB:\n{cb}"
        );
    }
    loud(&format!(
        "reprotect: switchover A → B downtime ≤ {first:.1} ms, B → A ≤ {second:.1} ms (final pause to confirmation + handover to resume)"
    ));
}

/// `--protocol-version 3`: this build speaking only version 3, as the host not yet
/// upgraded does (the frozen version 3 frames of `vmm/src/replication/testdata` pin
/// that what this build writes in version 3 is what version 3 wrote).
fn old(mut c: Command) -> Command {
    c.args(["--protocol-version", "3"]);
    c
}

#[test]
fn a_pair_is_upgraded_one_host_at_a_time_by_switching_over() {
    if skip_without_kvm!() {
        return;
    }
    let _one = one_at_a_time();
    let dir = tempdir();
    let p = |n: &str| dir.path().join(n);
    make_image(&p("a.img"), DISK);
    make_image(&p("b.img"), DISK);
    let (a_addr, b_addr) = (addr(), addr());
    let session_v3 = "speaks protocol version 3: this session uses it";

    // A, not upgraded yet, runs the guest; B, upgraded, joins it. A ignores B's
    // newer Join, so B dials again in version 3.
    let mut pc = old(primary(MIX, &p("a.img"), &p("a.txt"), None, Some(&a_addr)));
    pc.arg("--api-socket").arg(p("a.sock"));
    let a = Running::spawn(pc);
    let b = Running::spawn(standby(
        &p("b.img"),
        &p("b.txt"),
        &p("b.jsonl"),
        Some(&b_addr),
        Some(&a_addr),
    ));
    assert!(
        wait(Duration::from_secs(120), || lines(&p("b.jsonl")) >= 5),
        "B never caught up with the older A:\nB:\n{}\nA:\n{}",
        b.stderr_now(),
        a.stderr_now()
    );
    let b_err = b.stderr_now();
    assert!(
        b_err.contains("dialing again with protocol version 3") && b_err.contains(session_v3),
        "B did not fall back to version 3 for A:\n{b_err}"
    );

    // A → B: B, upgraded, runs the guest; A, still old, becomes its standby and
    // joins in version 3, which B speaks to it.
    switchover(&p("a.sock"));
    expect_line(
        &b,
        "switchover: took the guest over",
        30,
        "B did not take the guest:",
        ("A", &a),
    );
    expect_line(
        &b,
        &format!("{session_v3} (pages travel raw)"),
        60,
        "the upgraded B did not speak version 3 to the old A:",
        ("A", &a),
    );
    expect_line(
        &a,
        "initial copy complete",
        60,
        "A did not become B's standby:",
        ("B", &b),
    );

    // A is upgraded: stopped, and started again as this build, joining B. The two
    // now speak version 4.
    let a_err = a.stderr();
    assert!(
        !a_err.contains("FAILED") && !a_err.contains("error"),
        "the old A:\n{a_err}"
    );
    let a2 = Running::spawn(standby(
        &p("a.img"),
        &p("a2.txt"),
        &p("a2.jsonl"),
        Some(&a_addr),
        Some(&b_addr),
    ));
    assert!(
        wait(Duration::from_secs(120), || lines(&p("a2.jsonl")) >= 5),
        "the upgraded A did not rejoin B:\nA2:\n{}\nB:\n{}",
        a2.stderr_now(),
        b.stderr_now()
    );
    // (A may be turned away once, while B has not yet noticed the old A is gone:
    // a refusal, which does not make A fall back to version 3.)
    let b_err = b.stderr_now();
    let last_join = b_err
        .rfind("joined: copying to it")
        .expect("B took a standby");
    assert!(
        !b_err[last_join..].contains("protocol version"),
        "B spoke an older version to the upgraded A:\n{b_err}"
    );
    assert_eq!(
        count(&a2.stderr_now(), "protocol version"),
        0,
        "{}",
        a2.stderr_now()
    );

    // Both upgraded, the pair protects the guest: B dies, A carries on.
    let b_err = b.stderr();
    expect_takeover(&a2, "A did not take over from B", ("B", &b_err));
    assert!(
        shows(&p("a2.txt"), 3, 0),
        "the guest did not carry on at A:\n{}\nB:\n{b_err}",
        a2.stderr_now()
    );
    let a2_err = a2.stderr();
    let (ca, cb, ca2) = (read(&p("a.txt")), read(&p("b.txt")), read(&p("a2.txt")));
    no_failed_checks(&[("A", &ca), ("B", &cb), ("A upgraded", &ca2)]);
    assert_continuous(&[&ca, &cb, &ca2]);
    loud(&format!(
        "reprotect: upgraded one host at a time (v3 A + v4 B, switchover, A upgraded): {}",
        a2_err
            .lines()
            .find(|l| l.contains("failover: primary lost"))
            .unwrap_or("")
    ));
}

#[test]
fn a_newer_primary_offers_an_older_standby_the_older_version() {
    if skip_without_kvm!() {
        return;
    }
    let _one = one_at_a_time();
    let dir = tempdir();
    let p = |n: &str| dir.path().join(n);
    make_image(&p("a.img"), DISK);
    make_image(&p("b.img"), DISK);
    let b_addr = addr();
    let b = Running::spawn(old(standby(
        &p("b.img"),
        &p("b.txt"),
        &p("b.jsonl"),
        Some(&b_addr),
        None,
    )));
    let a = Running::spawn(primary(MIX, &p("a.img"), &p("a.txt"), Some(&b_addr), None));
    assert!(
        wait(Duration::from_secs(90), || lines(&p("b.jsonl")) >= 5),
        "the older B applied nothing:\nB:\n{}\nA:\n{}",
        b.stderr_now(),
        a.stderr_now()
    );
    let a_err = a.stderr();
    assert!(
        a_err.contains("does not speak protocol version 4")
            && a_err.contains("speaks protocol version 3: this session uses it (pages travel raw)"),
        "A did not fall back to version 3:\n{a_err}"
    );
    expect_takeover(&b, "the older B did not take over", ("A", &a_err));
    assert!(
        shows(&p("b.txt"), 2, 0),
        "the guest did not carry on at B:\n{}\nA:\n{a_err}",
        b.stderr_now()
    );
    drop(b.stderr());
    let (ca, cb) = (read(&p("a.txt")), read(&p("b.txt")));
    no_failed_checks(&[("A", &ca), ("B", &cb)]);
    assert_continuous(&[&ca, &cb]);
}
