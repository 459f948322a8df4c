//! Telemetry of a running mirrorvm (kvm-backed unless said otherwise): the
//! Prometheus endpoint (`--metrics-addr`) read with a real exposition-format parser
//! (`prometheus-parse`) and set against the `--metrics` file of the same run; the
//! `report` picture of a real metrics file, checked as XML; progress of the pre-copy
//! as plain lines off a terminal and as a bar on one. Runs one at a time.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use common::pair::{wait, Pair, PairOpts};
use common::*;
use prometheus_parse::{Scrape, Value};

static SERIAL: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The address of `mirrorvm: metrics on http://ADDR/metrics` on a process's stderr.
fn metrics_addr(r: &Running) -> String {
    let line = r
        .wait_stderr(Duration::from_secs(30), |l| {
            l.contains("metrics on http://")
        })
        .unwrap_or_else(|| panic!("no metrics address line:\n{}", r.stderr_now()));
    line.split("http://")
        .nth(1)
        .and_then(|s| s.strip_suffix("/metrics"))
        .expect("ADDR/metrics")
        .to_string()
}

/// GET /metrics from `addr`: the body, parsed with `prometheus-parse`.
fn scrape(addr: &str) -> (String, Scrape) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read the response");
    let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    let parsed = Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("parses");
    (body.to_string(), parsed)
}

/// A scrape in which the histograms named in `families` had all taken in as many
/// checkpoints as `mirrorvm_checkpoints_total` says: the registry takes in a record
/// one family after another (the counter last), so a scrape can fall between two of
/// them. Tries again (the next checkpoint is tens of milliseconds away) until so.
fn settled_scrape(addr: &str, families: &[&str]) -> (String, Scrape) {
    for _ in 0..50 {
        let (body, s) = scrape(addr);
        let n = value(&s, "mirrorvm_checkpoints_total", &[]);
        let settled = s.samples.iter().all(|x| match &x.value {
            Value::Histogram(b) if families.contains(&x.metric.as_str()) => {
                b.last().map(|c| c.count) == Some(n)
            }
            _ => true,
        });
        if settled {
            return (body, s);
        }
        std::thread::sleep(Duration::from_millis(3));
    }
    panic!("no scrape of {addr} in which every one of {families:?} counts every checkpoint");
}

/// A counter, gauge or untyped sample's value (`prometheus-parse` reads OpenMetrics
/// counters, whose samples end in `_total`, as untyped).
fn value(s: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    s.samples
        .iter()
        .find(|x| x.metric == metric && labels.iter().all(|(k, v)| x.labels.get(k) == Some(v)))
        .and_then(|x| match x.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(v),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no sample {metric}{labels:?}"))
}

/// A histogram's cumulative bucket counts (the last one is +Inf).
fn buckets(s: &Scrape, metric: &str, labels: &[(&str, &str)]) -> Vec<f64> {
    s.samples
        .iter()
        .find(|x| x.metric == metric && labels.iter().all(|(k, v)| x.labels.get(k) == Some(v)))
        .and_then(|x| match &x.value {
            Value::Histogram(b) => Some(b.iter().map(|c| c.count).collect()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no histogram {metric}{labels:?}"))
}

/// Every family the text declares has samples in the parse: nothing was dropped.
fn every_family_parsed(body: &str, s: &Scrape) {
    for l in body.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let name = l.split(' ').next().unwrap();
        assert!(
            s.samples.iter().any(|x| x.metric.starts_with(name)),
            "family {name} has no parsed sample"
        );
    }
    assert_eq!(body.lines().last(), Some("# EOF"));
}

/// A checkpointed `mix` run of 2 vCPUs in `mem` with `extra` options, in `dir`.
fn checkpointed_run(dir: &Path, mem: &str, extra: &[&str]) -> Running {
    make_image(&dir.join("disk.img"), 16 << 20);
    let mut c = mirrorvm();
    c.args([
        "run",
        "--memory",
        mem,
        "--cpus",
        "2",
        "--cmdline",
        "mix seconds=0",
    ])
    .arg("--disk")
    .arg(format!(
        "path={},checkpoint=on",
        dir.join("disk.img").display()
    ))
    .arg("--checkpoint-dir")
    .arg(dir.join("ck"))
    .arg("--metrics")
    .arg(dir.join("m.jsonl"))
    .arg("--serial")
    .arg(format!("file={}", dir.join("console.txt").display()))
    // The engine says how long the pre-copy took.
    .env("MIRRORVM_LOG", "vmm::epoch=info")
    .args(extra);
    Running::spawn(c)
}

fn wait_lines(path: &Path, n: usize, r: &Running) -> Vec<Metric> {
    let ok = wait(Duration::from_secs(120), || {
        read_metrics(path).map(|m| m.len() >= n).unwrap_or(false)
    });
    assert!(ok, "fewer than {n} checkpoints:\n{}", r.stderr_now());
    read_metrics(path).expect("metrics")
}

#[test]
fn the_prometheus_endpoint_shows_what_the_metrics_file_says() {
    if skip_without_kvm!() {
        return;
    }
    let _one = one_at_a_time();
    let dir = tempdir();
    // 512 MiB: the debug build's pre-copy takes seconds, so plain progress lines show.
    let mut r = checkpointed_run(dir.path(), "512M", &["--metrics-addr", "127.0.0.1:0"]);
    let addr = metrics_addr(&r);
    let before = wait_lines(&dir.path().join("m.jsonl"), 5, &r);
    let (body, s) = settled_scrape(
        &addr,
        &[
            "mirrorvm_checkpoint_pause_seconds",
            "mirrorvm_checkpoint_pause_step_seconds",
            "mirrorvm_checkpoint_dirty_pages",
            "mirrorvm_checkpoint_bytes",
            "mirrorvm_checkpoint_region_bytes",
            "mirrorvm_checkpoint_export_seconds",
            "mirrorvm_checkpoint_ack_seconds",
        ],
    );
    every_family_parsed(&body, &s);

    let n = value(&s, "mirrorvm_checkpoints_total", &[]);
    assert!(n >= before.len() as f64, "{n} < {}", before.len());
    let pause = buckets(&s, "mirrorvm_checkpoint_pause_seconds", &[]);
    assert_eq!(pause.len(), 17, "16 buckets and +Inf");
    assert_eq!(pause.last().copied(), Some(n));
    assert!(
        pause.windows(2).all(|w| w[0] <= w[1]),
        "cumulative: {pause:?}"
    );
    assert_eq!(value(&s, "mirrorvm_checkpoint_pause_seconds_count", &[]), n);
    for step in ["kick", "harvest", "copy", "save"] {
        let b = buckets(
            &s,
            "mirrorvm_checkpoint_pause_step_seconds",
            &[("step", step)],
        );
        assert_eq!(b.last().copied(), Some(n), "{step}");
    }
    let pause_sum = value(&s, "mirrorvm_checkpoint_pause_seconds_sum", &[]);
    assert!(
        pause_sum > 0.0 && pause_sum / n < 1.0,
        "mean pause {}",
        pause_sum / n
    );
    assert!(
        value(&s, "mirrorvm_checkpoint_dirty_pages_sum", &[]) >= n,
        "mix dirties pages"
    );
    let bytes = value(&s, "mirrorvm_checkpoint_bytes_sum", &[]);
    assert!(bytes > 0.0);
    assert!(
        value(&s, "mirrorvm_sent_bytes_total", &[]) >= bytes,
        "pre-copy included"
    );
    assert_eq!(
        buckets(&s, "mirrorvm_checkpoint_ack_seconds", &[])
            .last()
            .copied(),
        Some(n)
    );
    assert_eq!(value(&s, "mirrorvm_role", &[("role", "primary")]), 1.0);
    assert_eq!(value(&s, "mirrorvm_role", &[("role", "standby")]), 0.0);
    assert_eq!(value(&s, "mirrorvm_protected", &[]), 1.0);
    assert_eq!(value(&s, "mirrorvm_export_retries_total", &[]), 0.0);
    assert_eq!(value(&s, "mirrorvm_failovers_total", &[]), 0.0);
    let lag = value(&s, "mirrorvm_lag_seconds", &[]);
    assert!((0.0..30.0).contains(&lag), "lag {lag}");
    let last = value(&s, "mirrorvm_last_complete_checkpoint", &[]);

    r.signal(libc::SIGTERM);
    assert!(
        r.wait_exit(Duration::from_secs(60)).is_some(),
        "did not stop"
    );
    let err = r.stderr();
    // Not a terminal: the pre-copy's progress is plain lines, one a second, and no
    // bar redrawn in place.
    assert!(!err.contains('\r'), "{err:?}");
    let precopy_ms: u64 = err
        .lines()
        .find_map(|l| {
            l.split(" bytes in ")
                .nth(1)?
                .strip_suffix(" ms")?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no pre-copy time:\n{err}"));
    let plain = err
        .lines()
        .filter(|l| l.starts_with("mirrorvm: pre-copy to ") && l.contains(" of 512 MiB, "))
        .count() as u64;
    assert!(
        plain + 1 >= precopy_ms / 1000 && plain <= precopy_ms / 1000 + 1,
        "{plain} plain lines for a pre-copy of {precopy_ms} ms:\n{err}"
    );
    // One source: the registry's figures are the file's first n lines'.
    let all = read_metrics(&dir.path().join("m.jsonl")).expect("metrics");
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let first = &all[..n as usize];
    // (The gauge is read after the counter: a checkpoint completing meanwhile may
    // have moved it on.)
    let nth = first.last().map_or(0.0, |m| m.epoch as f64);
    let next = all.get(first.len()).map_or(nth, |m| m.epoch as f64);
    assert!((nth..=next).contains(&last), "{last} not in {nth}..={next}");
    let file_pause: u64 = first.iter().map(|m| m.pause_us).sum();
    assert!(
        (pause_sum - file_pause as f64 / 1e6).abs() < 1e-6,
        "{pause_sum} vs {file_pause} µs"
    );
    let file_bytes: u64 = first.iter().map(|m| m.bytes).sum();
    assert_eq!(bytes, file_bytes as f64);
}

/// The `<text>` of every element of an SVG document, which must be well-formed.
fn svg_texts(svg: &str) -> Vec<String> {
    let doc = roxmltree::Document::parse(svg).expect("well-formed XML");
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    doc.descendants()
        .filter(|n| n.has_tag_name("text"))
        .filter_map(|n| n.text().map(|t| t.trim().to_string()))
        .collect()
}

fn report(metrics: &Path, svg: &Path) -> std::process::Output {
    let mut c = mirrorvm();
    c.arg("report").arg(metrics).arg("-o").arg(svg);
    run_with_timeout(c, Duration::from_secs(60))
}

#[test]
fn report_draws_a_real_run() {
    if skip_without_kvm!() {
        return;
    }
    let _one = one_at_a_time();
    let dir = tempdir();
    let mut r = checkpointed_run(dir.path(), "64M", &[]);
    wait_lines(&dir.path().join("m.jsonl"), 8, &r);
    r.signal(libc::SIGTERM);
    assert!(
        r.wait_exit(Duration::from_secs(60)).is_some(),
        "did not stop"
    );
    let m = read_metrics(&dir.path().join("m.jsonl")).expect("metrics");

    let svg_path = dir.path().join("report.svg");
    let o = report(&dir.path().join("m.jsonl"), &svg_path);
    assert!(o.status.success(), "{}", show(&o));
    let svg = std::fs::read_to_string(&svg_path).expect("the SVG");
    let texts = svg_texts(&svg);
    for want in [
        "Pause per checkpoint, steps stacked",
        "kick",
        "harvest",
        "copy",
        "save",
        "Dirty pages per checkpoint",
        "dirty pages",
        "Bytes per checkpoint",
        "at the sink",
        "disk regions",
        "ack lag",
        "Pause histogram",
        "time (s)",
    ] {
        assert!(
            texts.iter().any(|t| t == want),
            "no text {want:?} in {texts:?}"
        );
    }
    let caption = format!(
        "{} checkpoints (epochs {}–{})",
        m.len(),
        m[0].epoch,
        m[m.len() - 1].epoch
    );
    assert!(
        texts.iter().any(|t| t.starts_with(&caption)),
        "no {caption:?} in {texts:?}"
    );
    // Five filled pause areas and the lines of the other panels.
    let doc = roxmltree::Document::parse(&svg).unwrap();
    let count = |tag: &str| doc.descendants().filter(|n| n.has_tag_name(tag)).count();
    assert!(count("polygon") >= 5, "{} areas", count("polygon"));
    assert!(count("polyline") >= 4, "{} lines", count("polyline"));
}

#[test]
fn report_refuses_bad_files_in_one_line() {
    let dir = tempdir();
    let good = r#"{"epoch":1,"full":true,"pause_us":900,"kick_us":1,"harvest_us":2,"copy_us":3,"save_us":4,"dirty_pages":5,"bytes":6,"region_bytes":0,"export_us":7}"#;
    let cases: [(&str, String, &str); 4] = [
        (
            "malformed.jsonl",
            format!("{good}\n{good}\n{{\"epoch\":3,\"pause_us\n{good}\n"),
            "malformed.jsonl line 3: not a JSON line",
        ),
        (
            "wrong.jsonl",
            format!("{good}\n{{\"epoch\":2,\"pause_us\":\"slow\"}}\n"),
            "wrong.jsonl line 2: not a checkpoint record",
        ),
        (
            "empty.jsonl",
            String::new(),
            "empty.jsonl holds no checkpoint record",
        ),
        (
            "other.jsonl",
            "{\"a\":1}\n".into(),
            "other.jsonl holds no checkpoint record",
        ),
    ];
    for (name, text, want) in cases {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        let o = report(&p, &dir.path().join("out.svg"));
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{name}: {}", show(&o));
        assert_eq!(err.lines().count(), 1, "{name}: {err}");
        assert!(err.contains(want), "{name}: {err}");
        assert!(
            !dir.path().join("out.svg").exists(),
            "{name}: a picture was written"
        );
    }
    let o = report(
        &dir.path().join("missing.jsonl"),
        &dir.path().join("out.svg"),
    );
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("cannot read"),
        "{}",
        show(&o)
    );
}

#[test]
fn a_mirrored_pair_shows_both_roles_and_the_failover() {
    if skip_without_kvm!() {
        return;
    }
    let _one = one_at_a_time();
    let mut pair = Pair::start(&PairOpts {
        cmdline: "mix seconds=0".into(),
        cpus: 2,
        disk: 16 << 20,
        primary_args: vec!["--metrics-addr".into(), "127.0.0.1:0".into()],
        standby_args: vec!["--metrics-addr".into(), "127.0.0.1:0".into()],
        ..Default::default()
    });
    let s_addr = metrics_addr(pair.standby.as_ref().unwrap());
    let p_addr = metrics_addr(pair.primary.as_ref().unwrap());
    pair.expect_applied(5, Duration::from_secs(120));

    let (body, s) = settled_scrape(
        &s_addr,
        &[
            "mirrorvm_checkpoint_apply_seconds",
            "mirrorvm_checkpoint_bytes",
        ],
    );
    every_family_parsed(&body, &s);
    let applied = value(&s, "mirrorvm_checkpoints_total", &[]);
    assert!(applied >= 5.0, "{applied}");
    assert_eq!(value(&s, "mirrorvm_role", &[("role", "standby")]), 1.0);
    assert_eq!(value(&s, "mirrorvm_protected", &[]), 1.0);
    assert!(value(&s, "mirrorvm_received_bytes_total", &[]) > 0.0);
    assert_eq!(
        buckets(&s, "mirrorvm_checkpoint_apply_seconds", &[])
            .last()
            .copied(),
        Some(applied)
    );

    let (_, p) = scrape(&p_addr);
    assert_eq!(value(&p, "mirrorvm_role", &[("role", "primary")]), 1.0);
    assert_eq!(value(&p, "mirrorvm_protected", &[]), 1.0);
    let acked = value(&p, "mirrorvm_checkpoints_total", &[]);
    assert!(acked >= 5.0, "{acked}");
    // For a standby, a checkpoint is complete when acknowledged: the ack lag holds
    // the whole round trip, so it is at least the export's.
    assert!(
        value(&p, "mirrorvm_checkpoint_ack_seconds_sum", &[])
            >= value(&p, "mirrorvm_checkpoint_export_seconds_sum", &[])
    );

    pair.kill_primary();
    let sb = pair.standby.as_ref().unwrap();
    assert!(
        sb.wait_stderr(Duration::from_secs(60), |l| l
            .contains("failover: primary lost"))
            .is_some(),
        "no takeover:\n{}",
        sb.stderr_now()
    );
    let (_, t) = scrape(&s_addr);
    assert_eq!(value(&t, "mirrorvm_failovers_total", &[]), 1.0);
    assert_eq!(value(&t, "mirrorvm_role", &[("role", "primary")]), 1.0);
    assert_eq!(value(&t, "mirrorvm_role", &[("role", "standby")]), 0.0);
    assert_eq!(value(&t, "mirrorvm_protected", &[]), 0.0);
    pair.kill_standby();

    // The standby's file ends with its takeover, which the report marks.
    let b = std::fs::read_to_string(pair.path("b.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(b.lines().last().unwrap()).unwrap();
    assert_eq!(last["failover"], true, "{b}");
    let svg_path = pair.path("b.svg");
    let o = report(&pair.path("b.jsonl"), &svg_path);
    assert!(o.status.success(), "{}", show(&o));
    let texts = svg_texts(&std::fs::read_to_string(&svg_path).unwrap());
    let marker = format!("failover at checkpoint {}", last["epoch"]);
    assert!(
        texts.iter().any(|t| t.contains(&marker)),
        "no {marker:?} in {texts:?}"
    );
    // The line on each of the three time panels is labelled.
    assert_eq!(
        texts.iter().filter(|t| *t == "failover").count(),
        3,
        "{texts:?}"
    );
    assert!(
        texts.iter().any(|t| t == "Apply time histogram"),
        "{texts:?}"
    );
    let o = report(&pair.path("a.jsonl"), &pair.path("a.svg"));
    assert!(o.status.success(), "{}", show(&o));
}

#[test]
fn the_pre_copy_shows_a_bar_on_a_terminal() {
    if skip_without_kvm!() {
        return;
    }
    let _one = one_at_a_time();
    let dir = tempdir();
    let shell = format!(
        "{} run --memory 512M --cmdline 'counter limit=30 interval_ms=100' --serial off --checkpoint-dir {}",
        env!("CARGO_BIN_EXE_mirrorvm"),
        dir.path().join("ck").display()
    );
    let mut c = Command::new("script");
    c.args(["-qec", &shell, "/dev/null"]);
    let o = run_with_timeout(c, Duration::from_secs(120));
    let shown = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", show(&o));
    // indicatif's bar (sizes with decimals, redrawn in place), not the plain lines.
    assert!(shown.contains("mirrorvm: pre-copy to "), "{shown}");
    assert!(shown.contains(" of 512.00 MiB, "), "{shown}");
    assert!(shown.contains('\r') || shown.contains("\x1b["), "{shown:?}");
    assert!(
        !shown.contains(" of 512 MiB, "),
        "a plain line on a terminal: {shown}"
    );
}

#[test]
fn metrics_addresses_that_cannot_serve_are_one_error_line() {
    let dir = tempdir();
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = held.local_addr().unwrap().to_string();
    let ck = dir.path().join("ck");
    let ck = ck.to_str().unwrap();
    for (args, want) in [
        (
            vec!["run", "--metrics-addr", "127.0.0.1:0"],
            "--metrics-addr needs --checkpoint-dir, --peer or --listen",
        ),
        (
            vec![
                "run",
                "--checkpoint-dir",
                ck,
                "--metrics-addr",
                "not an address",
            ],
            "cannot serve metrics on not an address",
        ),
        (
            vec!["run", "--checkpoint-dir", ck, "--metrics-addr", &busy],
            "cannot serve metrics on 127.0.0.1:",
        ),
    ] {
        let mut c = mirrorvm();
        c.args(&args).args(["--serial", "off"]);
        let o = run_with_timeout(c, Duration::from_secs(60));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?}: {}", show(&o));
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.starts_with("mirrorvm: error: ") && err.contains(want),
            "{args:?}: {err}"
        );
    }
}
