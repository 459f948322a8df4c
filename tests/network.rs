//! A mirrored pair over a bad network (kvm-backed): a user-space proxy between the
//! hosts that delays, throttles, stalls and resets the stream (there is no netem
//! here), and a link cut between two network namespaces. Run one at a time: two VMMs
//! on two cores.

mod common;

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use common::pair::{free_port, wait, Pair, PairOpts};
use common::proxy::Proxy;
use common::*;

static SERIAL: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A pair whose primary reaches its standby through a proxy.
fn proxied(mut o: PairOpts) -> (Pair, Proxy) {
    let standby: SocketAddr = format!("127.0.0.1:{}", free_port())
        .parse()
        .expect("an address");
    let proxy = Proxy::start("127.0.0.1:0".parse().expect("an address"), standby);
    o.listen = Some(standby.to_string());
    o.peer = Some(proxy.addr().to_string());
    (Pair::start(&o), proxy)
}

/// The counter values are consecutive: nothing lost, nothing repeated.
fn assert_consecutive(console: &str) {
    let c = counters(console.lines());
    assert!(
        c.windows(2).all(|w| w[1] == w[0] + 1),
        "the count skipped or repeated: {c:?}"
    );
}

#[test]
fn a_slow_standby_stretches_epochs_and_loses_nothing() {
    if skip_without_kvm!() {
        return;
    }
    let _one = one_at_a_time();
    let (mut pair, proxy) = proxied(PairOpts {
        cmdline: "counter interval_ms=20".into(),
        disk: 8 << 20,
        // A slow link warrants a longer deadline; the stream itself must not suffer.
        primary_args: vec!["--dead-ms".into(), "2000".into()],
        standby_args: vec!["--dead-ms".into(), "2000".into()],
        ..Default::default()
    });
    pair.expect_applied(3, Duration::from_secs(60));
    // 30 ms each way and 20 MB/s from here on.
    proxy.set_delay(Duration::from_millis(30));
    proxy.set_throttle(Some(20 << 20));
    let at = pair.applied();
    assert!(
        wait(Duration::from_secs(60), || pair.applied() >= at + 30),
        "checkpoints stopped reaching the slow standby:\n{}",
        pair.dump()
    );
    let metrics = read_metrics(&pair.path("a.jsonl")).expect("the primary's metrics");
    let slow: Vec<u64> = metrics
        .iter()
        .filter(|m| m.epoch > at as u64 + 3)
        .map(|m| m.export_us)
        .collect();
    let mut sorted = slow.clone();
    sorted.sort_unstable();
    let p50 = sorted.get(sorted.len() / 2).copied().unwrap_or(0);
    // Every checkpoint waited at least one round trip (60 ms) for its Ack: the epochs
    // stretched instead of anything being dropped.
    assert!(p50 >= 60_000, "export p50 {p50} µs over a 60 ms round trip");
    if let Some(p) = &pair.primary {
        p.signal(libc::SIGTERM);
    }
    let (status, perr) = pair.primary_exit(Duration::from_secs(60));
    assert_eq!(status.and_then(|s| s.code()), Some(143), "{perr}");
    assert!(
        !perr.contains("lost"),
        "the slow standby was given up:\n{perr}"
    );
    let (s, serr) = pair.standby_exit(Duration::from_secs(30));
    assert_eq!(s.and_then(|s| s.code()), Some(143), "{serr}");
    assert_consecutive(&pair.primary_console());
}

#[test]
fn a_stalled_stream_costs_protection_not_the_guest_and_the_replica_goes_stale() {
    if skip_without_kvm!() {
        return;
    }
    let _one = one_at_a_time();
    let (mut pair, proxy) = proxied(PairOpts {
        disk: 8 << 20,
        witness: true,
        ..Default::default()
    });
    pair.expect_applied(3, Duration::from_secs(60));
    let before = counters(pair.primary_console().lines()).len();
    // Nothing gets through any more, either way: each side sees silence.
    proxy.stall();
    assert!(
        wait(Duration::from_secs(30), || counters(
            pair.primary_console().lines()
        )
        .len()
            > before + 10),
        "the guest stopped with its stream:\n{}",
        pair.dump()
    );
    // The standby cannot take the fence the running primary holds: one guest.
    std::thread::sleep(Duration::from_millis(500));
    assert!(pair.standby_console().is_empty(), "two guests ran");
    // The primary ends; its farewell never got through, so the standby takes the
    // fence, finds the "unprotected since" record newer than its replica, and refuses.
    if let Some(p) = &pair.primary {
        p.signal(libc::SIGTERM);
    }
    let (_, perr) = pair.primary_exit(Duration::from_secs(60));
    assert!(perr.contains("running unprotected since"), "{perr}");
    let (s, serr) = pair.standby_exit(Duration::from_secs(30));
    assert_eq!(s.and_then(|s| s.code()), Some(1), "{serr}");
    assert!(
        serr.contains("unprotected") && serr.contains("waiting for the fence"),
        "the standby did not refuse its stale replica:\n{serr}"
    );
    assert!(pair.standby_console().is_empty(), "a stale replica resumed");
    assert_consecutive(&pair.primary_console());
}

#[test]
fn a_reset_stream_with_a_witness_leaves_one_guest() {
    if skip_without_kvm!() {
        return;
    }
    let _one = one_at_a_time();
    let (mut pair, proxy) = proxied(PairOpts {
        disk: 8 << 20,
        witness: true,
        ..Default::default()
    });
    pair.expect_applied(3, Duration::from_secs(60));
    let before = counters(pair.primary_console().lines()).len();
    // A middlebox resets both connections: to the standby it looks like a death.
    proxy.reset();
    assert!(
        wait(Duration::from_secs(30), || counters(
            pair.primary_console().lines()
        )
        .len()
            > before + 10),
        "the guest stopped when its stream was reset"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        pair.standby_console().is_empty(),
        "the standby ran a second guest while the primary held the fence"
    );
    let perr = pair.kill_primary();
    assert!(perr.contains("running unprotected since"), "{perr}");
    let (_, serr) = pair.standby_exit(Duration::from_secs(30));
    assert!(!serr.contains("failover: primary lost ("), "{serr}");
}

#[test]
fn a_cut_link_between_two_namespaces_with_a_witness_leaves_one_guest() {
    if skip_without_kvm!() {
        return;
    }
    let _one = one_at_a_time();
    let prefix = format!("mvt{}", std::process::id());
    let lab = match vmm::netlab::NetLab::create(&prefix) {
        Ok(l) => l,
        Err(e) => {
            skipped(
                "a_cut_link_between_two_namespaces_with_a_witness_leaves_one_guest",
                &format!("no network lab: {}", devices::ErrorChain(&e)),
            );
            if std::env::var_os("MIRRORVM_REQUIRE_KVM").is_some() {
                panic!("CI runs as root and must be able to build the network lab: {e}");
            }
            return;
        }
    };
    use vmm::netlab::Host;
    let listen = format!("{}:7000", lab.addr(Host::B));
    let mut pair = Pair::start(&PairOpts {
        disk: 8 << 20,
        witness: true,
        listen: Some(listen),
        netns: Some((
            lab.namespace(Host::A).to_string(),
            lab.namespace(Host::B).to_string(),
        )),
        ..Default::default()
    });
    pair.expect_applied(3, Duration::from_secs(60));
    let before = counters(pair.primary_console().lines()).len();
    lab.link_down().expect("ip link set down");
    assert!(
        wait(Duration::from_secs(30), || counters(
            pair.primary_console().lines()
        )
        .len()
            > before + 10),
        "the guest stopped when its link was cut"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(pair.standby_console().is_empty(), "two guests ran");
    lab.link_up().expect("ip link set up");
    let perr = pair.kill_primary();
    assert!(perr.contains("running unprotected since"), "{perr}");
    // The primary's lock is gone now; the record refuses the standby's stale replica.
    let (s, serr) = pair.standby_exit(Duration::from_secs(30));
    assert_eq!(s.and_then(|s| s.code()), Some(1), "{serr}");
    assert!(serr.contains("unprotected"), "{serr}");
    assert!(pair.standby_console().is_empty(), "a stale replica resumed");
}
