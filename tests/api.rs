//! The HTTP API on a Unix socket (`--api-socket`, docs/api.md): every endpoint
//! through the socket, the bad requests, pause and resume under a running `mix`
//! guest with checkpoints, a standby's answers, the socket file's life, and
//! `mirrorvm ctl`.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use vmm::api::{request, Response, VmInfo};

const T: Duration = Duration::from_secs(10);

fn call(sock: &Path, method: &str, path: &str, body: Option<&str>) -> Response {
    request(
        sock,
        method,
        path,
        body.map(str::as_bytes),
        Duration::from_secs(70),
    )
    .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// Asserts an error answer: `status` and a JSON `{"error": "..."}` containing `needle`.
fn refused(r: &Response, status: u16, needle: &str) {
    assert_eq!(r.status, status, "{r:?}");
    let e = r.json()["error"].as_str().map(str::to_string);
    assert!(
        e.as_deref().is_some_and(|e| e.contains(needle)),
        "expected an error containing '{needle}': {r:?}"
    );
}

fn info(sock: &Path) -> VmInfo {
    let r = call(sock, "GET", "/api/v1/vm.info", None);
    assert_eq!(r.status, 200, "{r:?}");
    serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("vm.info: {e}: {}", r.body))
}

/// Waits until the API answers vm.info with the guest running (not the 503 of a
/// machine still being built).
fn wait_running(sock: &Path, run: &Running) -> VmInfo {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        if sock.exists() {
            if let Ok(r) = request(sock, "GET", "/api/v1/vm.info", None, T) {
                if r.status == 200 {
                    return serde_json::from_str(&r.body).unwrap();
                }
                assert_eq!(r.status, 503, "{r:?}");
            }
        }
        assert!(
            Instant::now() < end,
            "the API never answered:\n{}",
            run.stderr_now()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn counter(dir: &Path, extra: &[&str]) -> Running {
    let mut c = mirrorvm();
    c.args(["run", "--cmdline", "counter interval_ms=50", "--serial"])
        .arg(format!("file={}", dir.join("console.txt").display()))
        .arg("--api-socket")
        .arg(dir.join("api.sock"))
        .args(extra);
    Running::spawn(c)
}

#[test]
fn every_endpoint_and_every_bad_request() {
    if skip_without_kvm!() {
        return;
    }
    let dir = tempdir();
    let sock = dir.path().join("api.sock");
    let ck = dir.path().join("ck");
    let mut run = counter(
        dir.path(),
        &["--memory", "64M", "--checkpoint-dir", ck.to_str().unwrap()],
    );
    let first = wait_running(&sock, &run);
    assert_eq!(first.role, vmm::api::Role::Checkpointing);
    assert_eq!(first.sink, "directory");
    assert_eq!(first.state, "running");
    assert_eq!((first.cpus, first.memory_bytes), (1, 64 << 20));
    assert!(!first.protected && first.peer.is_none());

    // vmm.ping: the version and this process.
    let r = call(&sock, "GET", "/api/v1/vmm.ping", None);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["pid"].as_u64(), Some(u64::from(run.pid())));
    assert_eq!(r.json()["version"], env!("CARGO_PKG_VERSION"));

    // vm.checkpoint: cut now and wait until complete; then without waiting. During
    // the initial copy no checkpoint can be cut (409).
    let mut r = call(&sock, "PUT", "/api/v1/vm.checkpoint", None);
    if r.status == 409 {
        refused(&r, 409, "initial copy");
        assert!(
            common::pair::wait(T, || info(&sock).last_complete.is_some()),
            "no checkpoint completes"
        );
        r = call(&sock, "PUT", "/api/v1/vm.checkpoint", None);
    }
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["complete"], true);
    let cut = r.json()["epoch"].as_u64().expect("an epoch");
    let i = info(&sock);
    assert!(
        i.last_complete.is_some_and(|c| c >= cut),
        "{i:?} after {cut}"
    );
    assert!(i.last_pause_us.is_some(), "{i:?}");
    let r = call(
        &sock,
        "PUT",
        "/api/v1/vm.checkpoint",
        Some(r#"{"wait": false}"#),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["complete"], false);
    assert!(r.json()["epoch"].as_u64().is_some_and(|e| e > cut), "{r:?}");

    // vm.pause, vm.resume, and each out of turn.
    refused(
        &call(&sock, "PUT", "/api/v1/vm.resume", None),
        409,
        "not paused",
    );
    let r = call(&sock, "PUT", "/api/v1/vm.pause", Some("{}"));
    assert_eq!(
        (r.status, r.json()["state"].as_str()),
        (200, Some("paused"))
    );
    assert_eq!(info(&sock).state, "paused");
    refused(
        &call(&sock, "PUT", "/api/v1/vm.pause", None),
        409,
        "already paused",
    );
    // A checkpoint of a paused guest: cut with the vCPUs left parked.
    let r = call(&sock, "PUT", "/api/v1/vm.checkpoint", None);
    assert_eq!(
        (r.status, r.json()["complete"].as_bool()),
        (200, Some(true))
    );
    assert_eq!(info(&sock).state, "paused");
    let r = call(&sock, "PUT", "/api/v1/vm.resume", None);
    assert_eq!(
        (r.status, r.json()["state"].as_str()),
        (200, Some("running"))
    );
    assert_eq!(info(&sock).state, "running");

    // Bad requests.
    refused(
        &call(&sock, "GET", "/api/v1/vm.nothing", None),
        404,
        "no such endpoint",
    );
    refused(&call(&sock, "GET", "/", None), 404, "no such endpoint");
    let r = call(&sock, "POST", "/api/v1/vm.info", None);
    refused(&r, 405, "takes GET");
    refused(
        &call(&sock, "GET", "/api/v1/vm.pause", None),
        405,
        "takes PUT",
    );
    refused(
        &call(&sock, "PUT", "/api/v1/vm.pause", Some("{not json")),
        400,
        "not valid JSON",
    );
    refused(
        &call(
            &sock,
            "PUT",
            "/api/v1/vm.checkpoint",
            Some(r#"{"wiat": true}"#),
        ),
        400,
        "unknown field",
    );
    refused(
        &call(
            &sock,
            "PUT",
            "/api/v1/vm.checkpoint",
            Some(r#"{"wait": "yes"}"#),
        ),
        400,
        "not valid JSON",
    );
    let big = format!("{{\"pad\": \"{}\"}}", "x".repeat(vmm::api::MAX_BODY));
    refused(
        &call(&sock, "PUT", "/api/v1/vm.pause", Some(&big)),
        413,
        "larger than",
    );
    // None of them changed anything.
    assert_eq!(info(&sock).state, "running");

    // vm.shutdown of a paused guest: a user stop, with a final checkpoint cut with
    // the vCPUs parked; exit 0, socket removed.
    assert_eq!(call(&sock, "PUT", "/api/v1/vm.pause", None).status, 200);
    let r = call(&sock, "PUT", "/api/v1/vm.shutdown", None);
    assert_eq!(r.status, 202, "{r:?}");
    assert_eq!(r.json()["final_checkpoint"], true);
    let status = run.wait_exit(Duration::from_secs(30)).expect("it exits");
    assert_eq!(status.code(), Some(0), "{}", run.stderr_now());
    assert!(!sock.exists(), "the socket file is left behind");
    // The final checkpoint is restorable, and the restored guest runs: the counter
    // goes on.
    let console = dir.path().join("console.txt");
    let before = counters(std::fs::read_to_string(&console).unwrap().lines());
    let last = *before.last().expect("the counter counted");
    let restored_console = dir.path().join("restored.txt");
    let mut c = mirrorvm();
    c.args(["restore", "--from", ck.to_str().unwrap(), "--serial"])
        .arg(format!("file={}", restored_console.display()))
        .arg("--api-socket")
        .arg(&sock);
    let restored = Running::spawn(c);
    let i = wait_running(&sock, &restored);
    assert_eq!(
        (i.role, i.state.as_str()),
        (vmm::api::Role::Standalone, "running"),
        "{i:?}"
    );
    let goes_on = common::pair::wait(T, || {
        let text = std::fs::read_to_string(&restored_console).unwrap_or_default();
        counters(text.lines()).first() == Some(&(last + 1)) && counters(text.lines()).len() >= 3
    });
    assert!(goes_on, "the restored counter does not go on from {last}");
    refused(
        &call(&sock, "PUT", "/api/v1/vm.checkpoint", None),
        409,
        "no checkpoint sink",
    );
}

#[test]
fn pause_and_resume_under_a_running_mix_guest() {
    if skip_without_kvm!() {
        return;
    }
    let dir = tempdir();
    let sock = dir.path().join("api.sock");
    let metrics = dir.path().join("m.jsonl");
    let console = dir.path().join("console.txt");
    let img = dir.path().join("disk.img");
    make_image(&img, 64 << 20);
    let mut c = mirrorvm();
    c.args([
        "run",
        "--cpus",
        "2",
        "--memory",
        "128M",
        "--cmdline",
        "mix seconds=12",
    ])
    .arg("--disk")
    .arg(format!("path={},checkpoint=on", img.display()))
    .arg("--serial")
    .arg(format!("file={}", console.display()))
    .arg("--checkpoint-dir")
    .arg(dir.path().join("ck"))
    .arg("--metrics")
    .arg(&metrics)
    .arg("--api-socket")
    .arg(&sock);
    let mut run = Running::spawn(c);
    wait_running(&sock, &run);
    // Let the guest dirty memory for a while.
    let busy = |n: usize| {
        read_metrics(&metrics)
            .unwrap()
            .iter()
            .filter(|m| !m.full && m.dirty_pages > 200)
            .count()
            >= n
    };
    assert!(
        common::pair::wait(Duration::from_secs(30), || busy(10)),
        "no busy checkpoints:\n{}",
        run.stderr_now()
    );

    let r = call(&sock, "PUT", "/api/v1/vm.pause", None);
    assert_eq!(r.status, 200, "{r:?}");
    let paused_at = info(&sock).epoch.expect("an epoch");
    std::thread::sleep(Duration::from_millis(1500));
    let i = info(&sock);
    assert_eq!(i.state, "paused");
    let resumed_at = i.epoch.expect("an epoch");
    let r = call(&sock, "PUT", "/api/v1/vm.resume", None);
    assert_eq!(r.status, 200, "{r:?}");
    // Checkpoints go on after the resume, with the guest dirtying memory again.
    let busy_after = || {
        read_metrics(&metrics)
            .unwrap()
            .iter()
            .filter(|m| m.epoch > resumed_at + 1 && m.dirty_pages > 200)
            .count()
    };
    assert!(
        common::pair::wait(Duration::from_secs(30), || busy_after() >= 10),
        "{} busy checkpoints after the resume:\n{}",
        busy_after(),
        run.stderr_now()
    );

    // Ticks kept cutting while paused, and the parked guest dirtied nothing (the
    // first cut after the pause may still hold pages of the running guest).
    assert!(
        resumed_at >= paused_at + 5,
        "only {} checkpoints in 1.5 s of pause",
        resumed_at - paused_at
    );
    let status = run.wait_exit(Duration::from_secs(60)).expect("mix ends");
    let out = std::fs::read_to_string(&console).unwrap();
    assert_eq!(status.code(), Some(0), "{out}\n{}", run.stderr_now());
    assert!(out.contains("all verified"), "{out}");
    let all = read_metrics(&metrics).unwrap();
    let during: Vec<_> = all
        .iter()
        .filter(|m| m.epoch > paused_at + 1 && m.epoch <= resumed_at)
        .collect();
    assert!(during.len() >= 4, "{} lines during the pause", during.len());
    // Hot pages (left writable: docs/dirty-tracking.md) stay in every checkpoint
    // until their lease ends (and in the one that ends it), written or not. A parked
    // guest writes nothing, so no page joins them: each checkpoint of the pause holds
    // at most the hot set it started with, and the hot set only shrinks.
    let hot_before = all
        .iter()
        .filter(|m| m.epoch <= paused_at + 1)
        .map(|m| m.hot_pages)
        .next_back()
        .unwrap_or(0);
    let mut hot = hot_before;
    for m in &during {
        assert!(
            m.dirty_pages <= hot_before + 64 && m.hot_pages <= hot,
            "checkpoint {} of a paused guest ({hot_before} hot pages before the pause): {m:?}",
            m.epoch
        );
        hot = m.hot_pages;
    }
}

#[test]
fn no_sink_stale_and_busy_sockets_and_ctl() {
    if skip_without_kvm!() {
        return;
    }
    let dir = tempdir();
    let sock = dir.path().join("api.sock");
    // A socket file left by a process that died (nothing listens) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let run = counter(dir.path(), &[]);
    let i = wait_running(&sock, &run);
    assert_eq!(
        (i.role, i.sink.as_str()),
        (vmm::api::Role::Standalone, "none")
    );
    assert_eq!(i.phase, None);
    refused(
        &call(&sock, "PUT", "/api/v1/vm.checkpoint", None),
        409,
        "no checkpoint sink",
    );

    // One that a live process listens on is refused, with one line, exit 1.
    let mut c = mirrorvm();
    c.args(["run", "--serial", "off", "--api-socket"])
        .arg(&sock);
    let o = run_with_timeout(c, T);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("is in use"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    // So is a path that is not a socket.
    let file = dir.path().join("plain");
    std::fs::write(&file, b"x").unwrap();
    let mut c = mirrorvm();
    c.args(["run", "--serial", "off", "--api-socket"])
        .arg(&file);
    let o = run_with_timeout(c, T);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(show(&o).contains("is not a socket"), "{}", show(&o));
    assert_eq!(std::fs::read(&file).unwrap(), b"x");

    // A client that stalls halfway through its body holds up no other request.
    let mut stalled = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    std::io::Write::write_all(
        &mut stalled,
        b"PUT /api/v1/vm.pause HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{",
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(info(&sock).state, "running");
    drop(stalled);

    // mirrorvm ctl against the real socket.
    let ctl = |args: &[&str]| {
        let mut c = mirrorvm();
        c.arg("ctl").arg("--api-socket").arg(&sock).args(args);
        run_with_timeout(c, T)
    };
    let o = ctl(&["info"]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let i: VmInfo = serde_json::from_slice(&o.stdout).expect("info is JSON");
    assert_eq!(i.state, "running");
    let o = ctl(&["ping"]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains(&run.pid().to_string()));
    let o = ctl(&["pause"]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let o = ctl(&["pause"]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        err.trim(),
        "mirrorvm: error: the guest is already paused (HTTP 409)"
    );
    let o = ctl(&["checkpoint"]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(show(&o).contains("no checkpoint sink"), "{}", show(&o));
    let o = ctl(&["resume"]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let o = ctl(&["shutdown"]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let mut run = run;
    let status = run.wait_exit(Duration::from_secs(30)).expect("it exits");
    assert_eq!(status.code(), Some(0));
    assert!(!sock.exists());
    // Nothing listens any more: one line, exit 1.
    let o = ctl(&["info"]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(
        show(&o).contains("cannot connect to the API socket"),
        "{}",
        show(&o)
    );
}

#[test]
fn a_standby_reports_itself_and_refuses_guest_commands() {
    if skip_without_kvm!() {
        return;
    }
    let dir = tempdir();
    let sock = dir.path().join("api.sock");
    let img = dir.path().join("b.img");
    make_image(&img, 16 << 20);
    let mut c = mirrorvm();
    c.args([
        "standby",
        "--listen",
        "127.0.0.1:0",
        "--serial",
        "off",
        "--disk",
    ])
    .arg(format!("path={},checkpoint=on", img.display()))
    .arg("--api-socket")
    .arg(&sock);
    let run = Running::spawn(c);
    let i = wait_running(&sock, &run);
    assert_eq!(i.role, vmm::api::Role::Standby);
    assert_eq!(i.state, "listening");
    assert!(
        !i.protected && i.epoch.is_none() && i.peer.is_none(),
        "{i:?}"
    );
    for path in ["vm.pause", "vm.resume", "vm.checkpoint", "vm.shutdown"] {
        refused(
            &call(&sock, "PUT", &format!("/api/v1/{path}"), None),
            409,
            "standby",
        );
    }
    let r = call(&sock, "GET", "/api/v1/vmm.ping", None);
    assert_eq!(r.status, 200, "{r:?}");
}

#[test]
fn a_paused_primary_is_not_taken_over_and_a_takeover_answers_on_the_same_socket() {
    use common::pair::{Pair, PairOpts};
    if skip_without_kvm!() {
        return;
    }
    let socks = tempdir();
    let (p_sock, s_sock) = (socks.path().join("p.sock"), socks.path().join("s.sock"));
    let mut pair = Pair::start(&PairOpts {
        primary_args: vec!["--api-socket".into(), p_sock.display().to_string()],
        standby_args: vec!["--api-socket".into(), s_sock.display().to_string()],
        ..Default::default()
    });
    pair.expect_applied(5, Duration::from_secs(60));
    let p = info(&p_sock);
    assert_eq!(p.role, vmm::api::Role::Primary, "{p:?}");
    assert!(p.protected, "{p:?}");
    assert_eq!(p.peer.as_deref(), Some(pair.addr.as_str()));
    let s = info(&s_sock);
    assert_eq!(
        (s.role, s.state.as_str()),
        (vmm::api::Role::Standby, "mirroring")
    );
    assert!(s.protected && s.peer.is_some(), "{s:?}");
    refused(
        &call(&s_sock, "PUT", "/api/v1/vm.checkpoint", None),
        409,
        "standby",
    );

    // Paused for ten times --dead-ms: heartbeats and acknowledgements go on.
    assert_eq!(call(&p_sock, "PUT", "/api/v1/vm.pause", None).status, 200);
    let applied = pair.applied();
    std::thread::sleep(Duration::from_millis(1000));
    let s = info(&s_sock);
    assert_eq!(
        s.role,
        vmm::api::Role::Standby,
        "the standby took over: {s:?}"
    );
    assert!(
        pair.applied() > applied + 10,
        "checkpoints stopped while paused"
    );
    let p = info(&p_sock);
    assert_eq!(
        (p.role, p.state.as_str()),
        (vmm::api::Role::Primary, "paused")
    );
    assert!(p.protected, "{p:?}");
    assert_eq!(call(&p_sock, "PUT", "/api/v1/vm.resume", None).status, 200);
    let shown = pair.primary_console().len();
    assert!(
        common::pair::wait(T, || pair.primary_console().len() > shown),
        "the guest does not go on after the resume"
    );
    let standby_err = pair.standby.as_ref().unwrap().stderr_now();
    assert!(!standby_err.contains("failover"), "{standby_err}");

    // Now kill the primary: the standby takes over, and its socket answers for the
    // guest it resumed.
    pair.kill_primary();
    let took_over = common::pair::wait(Duration::from_secs(30), || {
        request(&s_sock, "GET", "/api/v1/vm.info", None, T)
            .is_ok_and(|r| r.status == 200 && r.json()["role"] == "unprotected")
    });
    assert!(took_over, "{}", pair.dump());
    let s = info(&s_sock);
    assert_eq!(s.state, "running", "{s:?}");
    assert!(!s.protected, "{s:?}");
    // It runs unprotected until a standby joins it.
    refused(
        &call(&s_sock, "PUT", "/api/v1/vm.checkpoint", None),
        409,
        "no standby protects the guest",
    );
}

/// Before the guest runs, the API answers, but only `vmm.ping`: a primary still
/// reaching its standby (nobody listens at the address, so it gives up after its
/// connect deadline) has no machine yet, and every `vm.*` request gets 503.
#[test]
fn before_the_guest_runs_vm_requests_are_503_and_ping_answers() {
    if skip_without_kvm!() {
        return;
    }
    let dir = tempdir();
    let sock = dir.path().join("api.sock");
    let nobody = format!("127.0.0.1:{}", common::pair::free_port());
    let mut run = counter(dir.path(), &["--peer", &nobody]);
    let end = Instant::now() + T;
    while request(&sock, "GET", "/api/v1/vmm.ping", None, T)
        .map(|r| r.status)
        .ok()
        != Some(200)
    {
        assert!(
            Instant::now() < end,
            "the API never answered a ping:\n{}",
            run.stderr_now()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for (method, path) in [
        ("GET", "/api/v1/vm.info"),
        ("PUT", "/api/v1/vm.pause"),
        ("PUT", "/api/v1/vm.checkpoint"),
    ] {
        let r = call(&sock, method, path, None);
        assert_eq!(
            r.status, 503,
            "{method} {path} before the guest runs: {r:?}"
        );
        assert!(r.json()["error"].is_string(), "{r:?}");
    }
    // It gives up on the standby it cannot reach, in one line, and removes its socket.
    let status = run.wait_exit(Duration::from_secs(60));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(1),
        "{}",
        run.stderr_now()
    );
    assert!(!sock.exists(), "the socket file outlived its process");
}
