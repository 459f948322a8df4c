//! Mirroring to a standby and failing over (kvm-backed; a primary and a standby on
//! loopback). Mirrored tests run one at a time: two VMMs on two cores.
//!
//! `MIRRORVM_KILLS=N` sets how many primaries the random-kill test kills (default
//! 20); `MIRRORVM_KILLS=1000 cargo test --release --test mirror killed_primaries`
//! runs a thousand.

mod common;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::pair::{continuity, lines, mix_seconds, wait, Pair, PairOpts};
use common::*;

/// One mirrored test at a time in this process.
static SERIAL: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The failover line's total, in ms.
fn failover_total_ms(stderr: &str) -> Option<f64> {
    let line = stderr
        .lines()
        .find(|l| l.contains("failover: primary lost"))?;
    let total = line.split("total ").nth(1)?;
    total.trim_end_matches(" ms").trim().parse().ok()
}

/// A tiny deterministic generator for kill moments (no extra crate needed).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

#[test]
fn killed_primaries_are_continued_by_the_standby() {
    if skip_without_kvm!() {
        return;
    }
    let _one = one_at_a_time();
    let kills: u32 = std::env::var("MIRRORVM_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let seed = std::env::var("MIRRORVM_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed);
    let mut rng = Lcg(seed);
    let mut totals = Vec::new();
    let mut repeated_total = 0;
    for round in 0..kills {
        let o = PairOpts {
            cmdline: "mix seconds=0 mb=8 pages_per_ms=20".into(),
            cpus: 2,
            memory: "64M".into(),
            disk: 16 << 20,
            ..Default::default()
        };
        let mut pair = Pair::start(&o);
        if !pair.wait_applied(1, Duration::from_secs(60)) {
            let d = pair.dump();
            panic!("round {round}: no checkpoint reached the standby:\n{d}");
        }
        // A random moment: 0 to 1.5 s after the first checkpoint.
        let delay = Duration::from_millis(rng.next() % 1500);
        std::thread::sleep(delay);
        let applied_before = pair.applied();
        let primary_stderr = pair.kill_primary();
        let shown = pair.primary_console();
        // The guest carries on at the standby: three more progress lines of each
        // engine, each of which checked memory or disk records.
        let grew = wait(Duration::from_secs(60), || {
            let c = pair.standby_console();
            mix_seconds(&c, "memory").len() >= 3 && mix_seconds(&c, "disk").len() >= 3
        });
        let after = pair.standby_console();
        let (status, stderr) = {
            if let Some(s) = &pair.standby {
                s.signal(libc::SIGTERM);
            }
            pair.standby_exit(Duration::from_secs(30))
        };
        assert!(
            grew,
            "round {round} (killed {delay:?} after the first checkpoint, {applied_before} applied): the guest did not carry on at the standby.\nprimary stderr:\n{primary_stderr}\nstandby stderr:\n{stderr}\nstandby console:\n{after}"
        );
        assert!(
            !after.contains("FAILED") && !shown.contains("FAILED"),
            "round {round}: the guest's own checks failed:\nprimary:\n{shown}\nstandby:\n{after}"
        );
        for engine in ["memory", "disk"] {
            let (lost, repeated) =
                continuity(&mix_seconds(&shown, engine), &mix_seconds(&after, engine));
            assert_eq!(
                lost, 0,
                "round {round}: {engine} progress lines lost across the failover:\nprimary:\n{shown}\nstandby:\n{after}"
            );
            repeated_total += repeated;
        }
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(143),
            "round {round}: the standby, now the primary, did not end on SIGTERM: {stderr}"
        );
        let total = failover_total_ms(&stderr)
            .unwrap_or_else(|| panic!("round {round}: no failover line:\n{stderr}"));
        totals.push(total);
    }
    totals.sort_by(f64::total_cmp);
    if let Some(p50) = totals.get(totals.len() / 2) {
        loud(&format!(
            "mirror: {kills} primaries killed; failover total p50 {p50:.1} ms, max {:.1} ms; {repeated_total} progress line(s) shown twice",
            totals.last().copied().unwrap_or(0.0)
        ));
    }
}

#[test]
fn a_primary_killed_during_its_initial_copy_is_not_taken_over() {
    if skip_without_kvm!() {
        return;
    }
    let _one = one_at_a_time();
    // A copy that takes a while whatever the wire packs: 8 MiB of disk data (disk
    // chunks travel as they are) at 1 MiB/s.
    let addr = format!("127.0.0.1:{}", common::pair::free_port());
    let o = PairOpts {
        disk: 8 << 20,
        disk_filled: true,
        listen: Some(addr.clone()),
        peer: Some(format!("{addr},max-rate=1M")),
        ..Default::default()
    };
    let mut pair = Pair::start(&o);
    // The copy has started once the standby marked its disk incomplete and created
    // its journal at the copy's epoch (the copy's plan came: the handshake, liveness
    // connection included, is over).
    let marker = pair.path("b.img.incomplete");
    let journal = pair.path("b.img.mvj");
    assert!(
        wait(Duration::from_secs(30), || marker.exists()
            && journal.exists()),
        "the initial copy never started"
    );
    let _ = pair.kill_primary();
    let (status, stderr) = pair.standby_exit(Duration::from_secs(30));
    assert_eq!(pair.applied(), 0, "the copy completed before the kill");
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{stderr}");
    assert!(
        stderr.contains("before its initial copy completed"),
        "{stderr}"
    );
    assert!(!stderr.contains("failover: primary lost"), "{stderr}");
    // Its disk stays marked, and nothing uses it.
    assert!(marker.exists());
    let out = run_with_timeout(
        {
            let mut c = mirrorvm();
            c.args(["run", "--memory", "64M", "--serial", "off", "--disk"])
                .arg(format!(
                    "path={},checkpoint=on",
                    pair.path("b.img").display()
                ));
            c
        },
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("incomplete copy"),
        "{}",
        show(&out)
    );
}

#[test]
fn orderly_ends_are_not_failovers() {
    if skip_without_kvm!() {
        return;
    }
    let _one = one_at_a_time();
    // The guest ends the run: the standby exits with its status.
    let o = PairOpts {
        cmdline: "counter limit=15 interval_ms=50".into(),
        disk: 8 << 20,
        ..Default::default()
    };
    let mut pair = Pair::start(&o);
    let (p, perr) = pair.primary_exit(Duration::from_secs(90));
    assert_eq!(p.and_then(|s| s.code()), Some(0), "{perr}");
    let (s, serr) = pair.standby_exit(Duration::from_secs(30));
    assert_eq!(
        s.and_then(|s| s.code()),
        Some(0),
        "{serr}\nprimary:\n{perr}"
    );
    assert!(serr.contains("the primary ended the run"), "{serr}");
    assert!(!serr.contains("failover"), "{serr}");
    assert_eq!(pair.standby_console(), "", "the standby ran the guest");
    assert_eq!(counters(pair.primary_console().lines()).len(), 15);

    // SIGTERM: a final checkpoint, then Shutdown; the standby exits with 143 too.
    let o = PairOpts {
        disk: 8 << 20,
        ..Default::default()
    };
    let mut pair = Pair::start(&o);
    pair.expect_applied(3, Duration::from_secs(60));
    if let Some(p) = &pair.primary {
        p.signal(libc::SIGTERM);
    }
    let (p, perr) = pair.primary_exit(Duration::from_secs(60));
    assert_eq!(p.and_then(|s| s.code()), Some(143), "{perr}");
    let (s, serr) = pair.standby_exit(Duration::from_secs(30));
    assert_eq!(s.and_then(|s| s.code()), Some(143), "{serr}");
    assert!(!serr.contains("failover"), "{serr}");
    assert_eq!(pair.standby_console(), "");
}

#[test]
fn a_lost_standby_leaves_the_primary_unprotected_and_its_replica_stale() {
    if skip_without_kvm!() {
        return;
    }
    let _one = one_at_a_time();
    let o = PairOpts {
        disk: 8 << 20,
        witness: true,
        primary_args: vec!["--max-lag-ms".into(), "300".into()],
        ..Default::default()
    };
    let mut pair = Pair::start(&o);
    pair.expect_applied(3, Duration::from_secs(60));
    // Cut the standby off (it stays alive, with its replica).
    let standby_pid = pair.standby.as_ref().map(Running::pid).unwrap_or(0);
    if let Some(s) = &pair.standby {
        s.signal(libc::SIGSTOP);
    }
    let before = counters(pair.primary_console().lines()).len();
    // The primary goes on alone and releases what it held.
    assert!(
        wait(Duration::from_secs(30), || counters(
            pair.primary_console().lines()
        )
        .len()
            > before + 10),
        "the primary's guest stopped when its standby went silent"
    );
    if let Some(s) = &pair.standby {
        s.signal(libc::SIGCONT);
    }
    // When the standby wakes it finds that its primary gave it up (it said so as it
    // closed the session): no takeover, it waits for a primary.
    std::thread::sleep(Duration::from_millis(500));
    assert!(pair.standby_console().is_empty(), "two guests ran");
    if let Some(p) = &pair.primary {
        p.signal(libc::SIGTERM);
    }
    let (p, perr) = pair.primary_exit(Duration::from_secs(60));
    assert!(p.is_some(), "the primary did not end: {perr}");
    assert!(
        perr.contains("running unprotected since"),
        "the primary did not say it runs unprotected:\n{perr}"
    );
    // Once on stderr, and once in the metrics.
    assert_eq!(
        perr.matches("running unprotected since").count(),
        1,
        "{perr}"
    );
    let m = read_metrics(&pair.path("a.jsonl")).expect("the primary's metrics");
    assert_eq!(m.iter().filter(|l| l.unprotected).count(), 1);
    std::thread::sleep(Duration::from_millis(300));
    let serr = pair.kill_standby();
    assert!(
        serr.contains("gave up on this standby") && !serr.contains("failover"),
        "standby {standby_pid}:\n{serr}"
    );
    assert!(pair.standby_console().is_empty(), "a stale replica resumed");
    // The witness says from which epoch on no replica of that standby may resume.
    let applied = pair.applied() as u64;
    let fence = vmm::replication::fence::Witness::new(pair.path("witness"))
        .open()
        .expect("the witness is free once both exited");
    let since = fence
        .unprotected_since()
        .expect("an unprotected-since record");
    assert!(
        since > applied,
        "unprotected since {since}, standby applied {applied}"
    );
    assert!(fence.check_replica(since - 1).is_err());
}

#[test]
fn a_stopped_primary_keeps_the_fence_and_no_second_guest_runs() {
    if skip_without_kvm!() {
        return;
    }
    let _one = one_at_a_time();
    let o = PairOpts {
        witness: true,
        ..Default::default()
    };
    let mut pair = Pair::start(&o);
    pair.expect_applied(3, Duration::from_secs(60));
    if let Some(p) = &pair.primary {
        p.signal(libc::SIGSTOP);
    }
    // Well past the 100 ms deadline: the standby declares it lost but cannot fence.
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        pair.standby_console().is_empty(),
        "the standby ran the guest while the primary held the fence"
    );
    let shown = counters(pair.primary_console().lines()).len();
    if let Some(p) = &pair.primary {
        p.signal(libc::SIGCONT);
    }
    // The primary carries on (unprotected now: its standby dropped it).
    assert!(
        wait(Duration::from_secs(30), || counters(
            pair.primary_console().lines()
        )
        .len()
            > shown + 5),
        "the primary did not carry on after SIGCONT"
    );
    assert!(pair.standby_console().is_empty(), "two guests ran");
    let perr = pair.kill_primary();
    let (_, serr) = pair.standby_exit(Duration::from_secs(30));
    assert!(
        serr.contains("waiting for the fence"),
        "the standby did not wait for the fence:\n{serr}\nprimary:\n{perr}"
    );
}

#[test]
fn without_a_witness_a_stopped_primary_is_taken_over() {
    if skip_without_kvm!() {
        return;
    }
    let _one = one_at_a_time();
    let mut pair = Pair::start(&PairOpts::default());
    pair.expect_applied(3, Duration::from_secs(60));
    if let Some(p) = &pair.primary {
        p.signal(libc::SIGSTOP);
    }
    // Silence alone decides: the standby takes over (the README's warning).
    assert!(
        wait(Duration::from_secs(30), || !counters(
            pair.standby_console().lines()
        )
        .is_empty()),
        "the standby did not take over a silent primary"
    );
    if let Some(p) = &pair.primary {
        p.signal(libc::SIGCONT);
    }
    let shown = counters(pair.primary_console().lines()).len();
    // Both guests now run: exactly what a witness prevents.
    let both = wait(Duration::from_secs(30), || {
        counters(pair.primary_console().lines()).len() > shown + 3
    });
    let _ = pair.kill_primary();
    let serr = pair.kill_standby();
    assert!(both, "the primary did not carry on after SIGCONT");
    assert!(serr.contains("no --witness"), "{serr}");
}

#[test]
fn two_vcpus_and_a_disk_survive_a_failover_with_a_witness() {
    if skip_without_kvm!() {
        return;
    }
    let _one = one_at_a_time();
    let o = PairOpts {
        cmdline: "mix seconds=0 mb=8 pages_per_ms=50".into(),
        cpus: 2,
        disk: 16 << 20,
        witness: true,
        ..Default::default()
    };
    let mut pair = Pair::start(&o);
    pair.expect_applied(10, Duration::from_secs(90));
    let t = Instant::now();
    let _ = pair.kill_primary();
    assert!(
        wait(Duration::from_secs(60), || mix_seconds(
            &pair.standby_console(),
            "disk"
        )
        .len()
            >= 3),
        "the guest did not carry on"
    );
    let took = t.elapsed();
    if let Some(s) = &pair.standby {
        s.signal(libc::SIGTERM);
    }
    let (_, serr) = pair.standby_exit(Duration::from_secs(30));
    let console = pair.standby_console();
    assert!(!console.contains("FAILED"), "{console}");
    assert!(serr.contains("failover: primary lost"), "{serr}");
    // The witness now names the standby's generation: 1 (the primary ran at 0).
    let fence = vmm::replication::fence::Witness::new(pair.path("witness"))
        .open()
        .expect("the witness is free once both exited");
    assert_eq!(fence.generation(), 1);
    assert!(lines(&pair.path("b.jsonl")) >= 10);
    loud(&format!(
        "mirror: 2 vCPUs with a witness: guest checks running again {took:?} after the kill"
    ));
}

#[test]
fn linux_failed_over_mid_boot_mounts_its_root_on_the_standby() {
    if skip_without_kvm!() {
        return;
    }
    let kernel = linux_artifacts().join("vmlinux");
    let _one = one_at_a_time();
    let o = PairOpts {
        cmdline: LINUX_CMDLINE.into(),
        memory: "128M".into(),
        disk: 32 << 20,
        kernel: Some(kernel),
        witness: true,
        ..Default::default()
    };
    let mut pair = Pair::start(&o);
    // Mid-boot: the kernel registered its virtio-mmio device (its output is shown
    // once its checkpoint is acknowledged) but has not probed the disk or mounted
    // its root.
    // Linux's early boot under checkpoints takes 30-60 s here (emulated CPL0 code
    // and a pause every epoch); the bound is for a loaded machine. (It once never
    // came: the periodic tick's catch-up loop, resources/linux/README.md.)
    let booting = wait(Duration::from_secs(360), || {
        pair.primary_console()
            .contains("virtio-mmio: Registering device")
    });
    if !booting {
        let d = pair.dump();
        panic!("the kernel did not start on the primary:\n{d}");
    }
    let shown = pair.primary_console();
    assert!(
        !shown.contains("VFS: Mounted root"),
        "the kernel mounted its root before the kill: not mid-boot"
    );
    let _ = pair.kill_primary();
    let mounted = wait(Duration::from_secs(240), || {
        pair.standby_console()
            .contains("VFS: Mounted root (ext4 filesystem)")
    });
    let (status, stderr) = pair.standby_exit(Duration::from_secs(120));
    let after = pair.standby_console();
    assert!(
        mounted,
        "the standby's kernel did not mount its root:\n{stderr}\nprimary console:\n{shown}\nstandby console:\n{after}"
    );
    assert!(stderr.contains("failover: primary lost"), "{stderr}");
    // The run ends as Linux's do here: init cannot run, panic, reset: status 0.
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{stderr}");
    // Nothing shown by the primary is shown again from the start.
    assert!(
        !after.contains("Linux version"),
        "the standby repeated the boot banner:\n{after}"
    );
}

#[test]
fn a_killed_standby_leaves_the_primary_running_unprotected() {
    if skip_without_kvm!() {
        return;
    }
    let _one = one_at_a_time();
    let o = PairOpts {
        disk: 8 << 20,
        witness: true,
        ..Default::default()
    };
    let mut pair = Pair::start(&o);
    pair.expect_applied(3, Duration::from_secs(60));
    let _ = pair.kill_standby();
    let before = counters(pair.primary_console().lines()).len();
    assert!(
        wait(Duration::from_secs(30), || counters(
            pair.primary_console().lines()
        )
        .len()
            > before + 10),
        "the primary's guest stopped with its standby"
    );
    if let Some(p) = &pair.primary {
        p.signal(libc::SIGTERM);
    }
    let (status, perr) = pair.primary_exit(Duration::from_secs(60));
    assert_eq!(status.and_then(|s| s.code()), Some(143), "{perr}");
    assert_eq!(
        perr.matches("running unprotected since").count(),
        1,
        "{perr}"
    );
    let fence = vmm::replication::fence::Witness::new(pair.path("witness"))
        .open()
        .expect("the witness is free");
    assert!(fence.unprotected_since().is_some());
    let c = counters(pair.primary_console().lines());
    assert!(c.windows(2).all(|w| w[1] == w[0] + 1), "{c:?}");
}

/// The standby's journal takes the primary's region size (from the Hello) when its
/// `--disk` names none: a primary with small 2 MiB regions, whose `disk` guest fills
/// them, is killed mid-run and the standby finishes the guest's rounds, its checks
/// passing.
#[test]
fn a_standby_takes_the_primarys_region_size_and_fails_over_with_it() {
    if skip_without_kvm!() {
        return;
    }
    let _one = one_at_a_time();
    let o = PairOpts {
        cmdline: "disk records=1024 rounds=6".into(),
        disk: 16 << 20,
        primary_disk_opts: ",region-size=2M".into(),
        // Long epochs: the cuts come from full regions.
        primary_args: vec!["--epoch-ms".into(), "1000".into()],
        ..Default::default()
    };
    let mut pair = Pair::start(&o);
    pair.expect_applied(4, Duration::from_secs(90));
    let journal = std::fs::metadata(pair.path("b.img.mvj")).map(|m| m.len());
    let perr = pair.kill_primary();
    assert_eq!(
        journal.ok(),
        Some(4096 + 2 * (4096 + (2 << 20))),
        "the standby's journal does not have the primary's 2 MiB regions"
    );
    let (s, serr) = pair.standby_exit(Duration::from_secs(120));
    let console = pair.standby_console();
    assert_eq!(
        s.and_then(|s| s.code()),
        Some(0),
        "{serr}\nstandby console:\n{console}\nprimary:\n{perr}"
    );
    assert!(serr.contains("failover: primary lost"), "{serr}");
    assert!(console.contains("1024 records verified"), "{console}");
    // The primary's regions filled: cuts came from full regions.
    let m = read_metrics(&pair.path("a.jsonl")).unwrap();
    assert!(m.iter().all(|c| c.region_bytes <= 2 << 20), "{m:?}");
    assert!(
        m.iter().filter(|c| c.region_bytes >= 3 << 19).count() >= 2,
        "no cut on a full region: {m:?}"
    );
}

/// A standby told to use smaller regions than the primary's refuses it in the
/// Hello: one line on each side naming the disk and both sizes, and the primary
/// runs on unprotected.
#[test]
fn a_standby_with_smaller_regions_than_the_primary_refuses_it() {
    if skip_without_kvm!() {
        return;
    }
    let _one = one_at_a_time();
    let o = PairOpts {
        cmdline: "counter interval_ms=50".into(),
        disk: 16 << 20,
        primary_disk_opts: ",region-size=4M".into(),
        standby_disk_opts: ",region-size=2M".into(),
        ..Default::default()
    };
    let mut pair = Pair::start(&o);
    let needle = "has region-size 2 MiB here but 4 MiB on the primary";
    let refused = pair
        .standby
        .as_ref()
        .map(|s| {
            s.wait_stderr(Duration::from_secs(60), |e| e.contains(needle))
                .is_some()
        })
        .unwrap_or(false);
    let said = pair
        .primary
        .as_ref()
        .map(|p| {
            p.wait_stderr(Duration::from_secs(30), |e| e.contains(needle))
                .is_some()
        })
        .unwrap_or(false);
    // The primary runs on: its guest keeps counting.
    std::thread::sleep(Duration::from_millis(300));
    let running = pair.primary.as_mut().is_some_and(|p| p.exited().is_none());
    let counted = counters(pair.primary_console().lines()).len();
    let perr = pair.kill_primary();
    let serr = pair.kill_standby();
    assert!(refused && said, "primary:\n{perr}\nstandby:\n{serr}");
    assert!(running, "the primary stopped:\n{perr}");
    assert!(counted > 0, "the primary's guest did not run:\n{perr}");
    let line = |text: &str| text.lines().filter(|l| l.contains(needle)).count();
    assert_eq!(line(&serr), 1, "{serr}");
    assert_eq!(line(&perr), 1, "{perr}");
    assert!(
        serr.contains("give region-size=4MiB or more here"),
        "{serr}"
    );
    assert!(!serr.contains("panicked") && !perr.contains("panicked"));
}

/// `--peer ADDR,max-rate=R` holds the initial copy to R bytes per second: 16 MiB of
/// non-zero disk at 4 MiB/s cannot be copied in under 4 s. Then the pair mirrors
/// at full speed (checkpoints are never held back).
#[test]
fn max_rate_holds_the_initial_copy_to_its_rate() {
    if skip_without_kvm!() {
        return;
    }
    let _one = one_at_a_time();
    let addr = format!("127.0.0.1:{}", common::pair::free_port());
    let o = PairOpts {
        disk: 16 << 20,
        disk_filled: true,
        listen: Some(addr.clone()),
        peer: Some(format!("{addr},max-rate=4M")),
        ..Default::default()
    };
    let start = Instant::now();
    let mut pair = Pair::start(&o);
    pair.expect_applied(1, Duration::from_secs(120));
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(3900),
        "16 MiB copied in {took:?} at max-rate=4M:\n{}",
        pair.dump()
    );
    // Checkpoints then come every epoch, unpaced: 20 more well within 20 s.
    let at_copy = pair.applied();
    pair.expect_applied(at_copy + 20, Duration::from_secs(20));
}

/// A pre-copy that cannot catch up with the guest says so once and completes in the
/// first checkpoint: a 4 MiB region rewritten all the time, copied at 1 MiB/s, is
/// written whole again during every round.
#[test]
fn a_pre_copy_that_cannot_converge_says_so_and_completes() {
    if skip_without_kvm!() {
        return;
    }
    let _one = one_at_a_time();
    let addr = format!("127.0.0.1:{}", common::pair::free_port());
    let o = PairOpts {
        cmdline: "dirty pages_per_ms=200 mb=4 verify=1".into(),
        listen: Some(addr.clone()),
        peer: Some(format!("{addr},max-rate=1M")),
        ..Default::default()
    };
    let mut pair = Pair::start(&o);
    let said = pair.primary.as_ref().and_then(|p| {
        p.wait_stderr(Duration::from_secs(120), |l| {
            l.contains("the pre-copy is not converging")
        })
    });
    assert!(
        said.is_some(),
        "no word of the copy not converging:\n{}",
        pair.dump()
    );
    // And the copy completes all the same, and mirroring goes on.
    pair.expect_applied(5, Duration::from_secs(120));
    let err = pair
        .primary
        .as_ref()
        .map(|p| p.stderr_now())
        .unwrap_or_default();
    assert_eq!(
        err.matches("the pre-copy is not converging").count(),
        1,
        "said more than once:\n{err}"
    );
}
