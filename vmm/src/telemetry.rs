//! Live figures for Prometheus (`--metrics-addr ADDR`): a registry of histograms,
//! counters and gauges that the epoch engine (on a primary) and the standby feed
//! from the very records they write to `--metrics` (`EpochMetrics`,
//! `AppliedMetrics`), so the JSON lines and the scrape never disagree. The endpoint
//! that serves the registry over HTTP is in `telemetry/endpoint.rs`.
//!
//! Every series and its meaning is listed in `docs/metrics.md`.

mod endpoint;

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

pub use endpoint::{EndpointError, MetricsEndpoint};

use crate::epoch::EpochMetrics;
use crate::replication::standby::AppliedMetrics;

/// Makes the registry of a process in `role` and serves it on `addr`, saying where
/// on stderr (`mirrorvm: metrics on http://ADDR/metrics`: with port 0, the port
/// chosen). The endpoint serves until dropped.
pub fn start(addr: &str, role: Role) -> Result<(Telemetry, MetricsEndpoint), EndpointError> {
    let t = Telemetry::new(role);
    let e = crate::run_end::without_stop_signals(|| MetricsEndpoint::serve(addr, t.clone()))?;
    eprintln!("mirrorvm: metrics on http://{}/metrics", e.local_addr());
    Ok((t, e))
}

/// The role this process plays, as `mirrorvm_role{role=…}` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// It runs the guest.
    Primary,
    /// It holds a replica and takes over when the primary dies.
    Standby,
}

impl Role {
    fn label(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Standby => "standby",
        }
    }
}

type Labels = [(&'static str, &'static str); 1];
type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

/// Buckets of a pause or one of its steps: 50 µs doubling to ~1.6 s.
fn pause_histogram() -> Histogram {
    Histogram::new(exponential_buckets(50e-6, 2.0, 16))
}

/// Buckets of a latency that includes the network or a disk: 100 µs doubling to ~13 s.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(100e-6, 2.0, 18))
}

/// Buckets of a page count: 1, 4, 16, … 4 Mi pages (16 GiB).
fn pages_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 4.0, 12))
}

/// Buckets of a size: 4 KiB, 16 KiB, … 16 GiB.
fn bytes_histogram() -> Histogram {
    Histogram::new(exponential_buckets(4096.0, 4.0, 12))
}

fn seconds_of_us(us: u64) -> f64 {
    Duration::from_micros(us).as_secs_f64()
}

/// Converts a count to the float a histogram observes (exact below 2^53).
#[allow(clippy::cast_precision_loss)]
fn as_f64(n: u64) -> f64 {
    n as f64
}

/// The metric families. Cheap to clone: every metric is shared.
struct Families {
    pause: Histogram,
    pause_step: HistogramFamily,
    dirty_pages: Histogram,
    bytes: Histogram,
    region_bytes: Histogram,
    export: Histogram,
    ack: Histogram,
    apply: Histogram,
    checkpoints: Counter,
    retries: Counter,
    failovers: Counter,
    protection_lost: Counter,
    sent_bytes: Counter,
    received_bytes: Counter,
    role: Family<Labels, Gauge>,
    protected: Gauge,
    last_complete: Gauge,
    lag: Gauge<f64, std::sync::atomic::AtomicU64>,
    epoch_target: Gauge<f64, std::sync::atomic::AtomicU64>,
    epoch_length: Gauge<f64, std::sync::atomic::AtomicU64>,
}

/// The registry of one mirrorvm process, fed by its engine or its standby. Clone it
/// to share it with the HTTP endpoint.
#[derive(Clone)]
pub struct Telemetry {
    registry: Arc<Registry>,
    f: Arc<Families>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Telemetry")
    }
}

impl Telemetry {
    /// A registry with every mirrorvm series, all at zero, for a process in `role`.
    pub fn new(role: Role) -> Telemetry {
        let f = Families {
            pause: pause_histogram(),
            pause_step: Family::new_with_constructor(pause_histogram),
            dirty_pages: pages_histogram(),
            bytes: bytes_histogram(),
            region_bytes: bytes_histogram(),
            export: latency_histogram(),
            ack: latency_histogram(),
            apply: latency_histogram(),
            checkpoints: Counter::default(),
            retries: Counter::default(),
            failovers: Counter::default(),
            protection_lost: Counter::default(),
            sent_bytes: Counter::default(),
            received_bytes: Counter::default(),
            role: Family::default(),
            protected: Gauge::default(),
            last_complete: Gauge::default(),
            lag: Gauge::default(),
            epoch_target: Gauge::default(),
            epoch_length: Gauge::default(),
        };
        let mut r = Registry::with_prefix("mirrorvm");
        r.register_with_unit(
            "checkpoint_pause",
            "How long the vCPUs were paused for a cut (primary)",
            Unit::Seconds,
            f.pause.clone(),
        );
        r.register_with_unit(
            "checkpoint_pause_step",
            "The steps of a cut's pause: kick (until every vCPU parked), harvest (dirty logs), copy (dirty pages to staging), save (device, vCPU and VM state, disk region swap)",
            Unit::Seconds,
            f.pause_step.clone(),
        );
        r.register(
            "checkpoint_dirty_pages",
            "Guest pages in a checkpoint (primary)",
            f.dirty_pages.clone(),
        );
        r.register_with_unit(
            "checkpoint",
            "Bytes a checkpoint took at its sink: written to the directory, or sent to the standby (primary); received, frames included (standby)",
            Unit::Bytes,
            f.bytes.clone(),
        );
        r.register_with_unit(
            "checkpoint_region",
            "Bytes of the disk regions frozen at a cut (primary)",
            Unit::Bytes,
            f.region_bytes.clone(),
        );
        r.register_with_unit(
            "checkpoint_export",
            "From handing a checkpoint to the exporter until the sink had it, its last attempt (primary)",
            Unit::Seconds,
            f.export.clone(),
        );
        r.register_with_unit(
            "checkpoint_ack",
            "From the end of a cut's pause until the checkpoint was complete (durable in the directory, or acknowledged by the standby), retries included: how long its console output was held (primary)",
            Unit::Seconds,
            f.ack.clone(),
        );
        r.register_with_unit(
            "checkpoint_apply",
            "From a checkpoint's first frame until it was applied and acknowledged (standby)",
            Unit::Seconds,
            f.apply.clone(),
        );
        r.register(
            "checkpoints",
            "Checkpoints completed (primary) or applied (standby)",
            f.checkpoints.clone(),
        );
        r.register(
            "export_retries",
            "Failed checkpoint exports that were retried (primary)",
            f.retries.clone(),
        );
        r.register(
            "failovers",
            "Takeovers: this standby resumed the guest after its primary was lost",
            f.failovers.clone(),
        );
        r.register(
            "protection_lost",
            "Times the primary lost its checkpoint sink (a standby given up) and ran on unprotected",
            f.protection_lost.clone(),
        );
        r.register_with_unit(
            "sent",
            "Bytes sent to the checkpoint sink: pre-copy and checkpoints (primary)",
            Unit::Bytes,
            f.sent_bytes.clone(),
        );
        r.register_with_unit(
            "received",
            "Bytes of checkpoints received from the primary (standby)",
            Unit::Bytes,
            f.received_bytes.clone(),
        );
        r.register(
            "role",
            "1 for the role this process plays now (primary runs the guest; standby holds a replica)",
            f.role.clone(),
        );
        r.register(
            "protected",
            "1 while a complete checkpoint stands at a sink that is still there (primary), or while this standby holds a complete replica (standby)",
            f.protected.clone(),
        );
        r.register(
            "last_complete_checkpoint",
            "The newest complete (primary) or applied (standby) checkpoint's number",
            f.last_complete.clone(),
        );
        r.register_with_unit(
            "lag",
            "Guest run time not yet covered by a complete checkpoint, updated every epoch (primary)",
            Unit::Seconds,
            f.lag.clone(),
        );
        r.register_with_unit(
            "epoch_target",
            "The epoch length in force for the newest complete checkpoint: --epoch-ms, or what --epoch-ms auto chose (primary)",
            Unit::Seconds,
            f.epoch_target.clone(),
        );
        r.register_with_unit(
            "epoch_length",
            "How long the newest complete checkpoint's epoch really lasted, from the cut before it (primary)",
            Unit::Seconds,
            f.epoch_length.clone(),
        );
        let t = Telemetry {
            registry: Arc::new(r),
            f: Arc::new(f),
        };
        t.set_role(role);
        t
    }

    /// Sets the role this process plays.
    pub fn set_role(&self, role: Role) {
        for r in [Role::Primary, Role::Standby] {
            self.f
                .role
                .get_or_create(&[("role", r.label())])
                .set(i64::from(r == role));
        }
    }

    /// Takes in one `--metrics` line of the primary: a complete checkpoint, or the
    /// line that says the sink was lost.
    pub fn record_checkpoint(&self, m: &EpochMetrics) {
        let f = &self.f;
        if m.unprotected {
            f.protection_lost.inc();
            f.protected.set(0);
            return;
        }
        f.pause.observe(seconds_of_us(m.pause_us));
        for (step, us) in [
            ("kick", m.kick_us),
            ("harvest", m.harvest_us),
            ("copy", m.copy_us),
            ("save", m.save_us),
        ] {
            f.pause_step
                .get_or_create(&[("step", step)])
                .observe(seconds_of_us(us));
        }
        f.dirty_pages.observe(as_f64(m.dirty_pages));
        f.bytes.observe(as_f64(m.bytes));
        f.region_bytes.observe(as_f64(m.region_bytes));
        f.export.observe(seconds_of_us(m.export_us));
        f.ack.observe(seconds_of_us(m.ack_us));
        f.sent_bytes.inc_by(m.bytes);
        f.epoch_target.set(seconds_of_us(m.target_us));
        if m.epoch_us > 0 {
            f.epoch_length.set(seconds_of_us(m.epoch_us));
        }
        f.protected.set(1);
        f.last_complete
            .set(i64::try_from(m.epoch).unwrap_or(i64::MAX));
        // Last: a scrape whose histograms count as many as this saw every figure of
        // those checkpoints (the families are read in the order registered).
        f.checkpoints.inc();
    }

    /// Takes in one `--metrics` line of a standby: a checkpoint it applied.
    pub fn record_applied(&self, m: &AppliedMetrics) {
        let f = &self.f;
        f.apply.observe(seconds_of_us(m.apply_us));
        f.bytes.observe(as_f64(m.bytes));
        f.received_bytes.inc_by(m.bytes);
        f.protected.set(1);
        f.last_complete
            .set(i64::try_from(m.epoch).unwrap_or(i64::MAX));
        f.checkpoints.inc();
    }

    /// Bytes of a pre-copy pass or round at the sink.
    pub fn record_base(&self, bytes: u64) {
        self.f.sent_bytes.inc_by(bytes);
    }

    /// A failed export that will be retried.
    pub fn record_retry(&self) {
        self.f.retries.inc();
    }

    /// This standby took over: it is the primary now, and unprotected.
    pub fn record_failover(&self) {
        self.f.failovers.inc();
        self.f.protected.set(0);
        self.set_role(Role::Primary);
    }

    /// Nothing is protected any more (fenced, or checkpointing failed).
    pub fn set_unprotected(&self) {
        self.f.protected.set(0);
    }

    /// How much guest run time no complete checkpoint covers yet.
    pub fn set_lag(&self, lag: Duration) {
        self.f.lag.set(lag.as_secs_f64());
    }

    /// The registry in the OpenMetrics text format, as a scrape gets it.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn a_checkpoint_line_feeds_every_family() {
        let t = Telemetry::new(Role::Primary);
        t.record_checkpoint(&EpochMetrics {
            epoch: 7,
            pause_us: 300,
            kick_us: 20,
            harvest_us: 30,
            copy_us: 200,
            save_us: 50,
            dirty_pages: 10,
            bytes: 50_000,
            export_us: 900,
            ack_us: 1000,
            target_us: 12_000,
            epoch_us: 12_500,
            ..Default::default()
        });
        t.record_retry();
        t.set_lag(Duration::from_millis(25));
        let s = t.encode().unwrap();
        assert_eq!(value(&s, "mirrorvm_checkpoints_total"), Some(1.0));
        assert_eq!(value(&s, "mirrorvm_export_retries_total"), Some(1.0));
        assert_eq!(value(&s, "mirrorvm_sent_bytes_total"), Some(50_000.0));
        assert_eq!(value(&s, "mirrorvm_last_complete_checkpoint"), Some(7.0));
        assert_eq!(value(&s, "mirrorvm_protected"), Some(1.0));
        assert_eq!(value(&s, "mirrorvm_lag_seconds"), Some(0.025));
        assert_eq!(value(&s, "mirrorvm_epoch_target_seconds"), Some(0.012));
        assert_eq!(value(&s, "mirrorvm_epoch_length_seconds"), Some(0.0125));
        assert_eq!(
            value(&s, "mirrorvm_checkpoint_pause_seconds_sum"),
            Some(0.0003)
        );
        assert_eq!(
            value(
                &s,
                "mirrorvm_checkpoint_pause_step_seconds_count{step=\"copy\"}"
            ),
            Some(1.0)
        );
        assert_eq!(value(&s, "mirrorvm_role{role=\"primary\"}"), Some(1.0));
        assert_eq!(value(&s, "mirrorvm_role{role=\"standby\"}"), Some(0.0));
    }

    #[test]
    fn losing_the_sink_and_failing_over_show() {
        let t = Telemetry::new(Role::Standby);
        t.record_applied(&AppliedMetrics {
            epoch: 3,
            bytes: 100,
            ..Default::default()
        });
        let s = t.encode().unwrap();
        assert_eq!(value(&s, "mirrorvm_protected"), Some(1.0));
        assert_eq!(value(&s, "mirrorvm_received_bytes_total"), Some(100.0));
        t.record_failover();
        let s = t.encode().unwrap();
        assert_eq!(value(&s, "mirrorvm_failovers_total"), Some(1.0));
        assert_eq!(value(&s, "mirrorvm_protected"), Some(0.0));
        assert_eq!(value(&s, "mirrorvm_role{role=\"primary\"}"), Some(1.0));

        let p = Telemetry::new(Role::Primary);
        p.record_checkpoint(&EpochMetrics {
            epoch: 4,
            unprotected: true,
            ..Default::default()
        });
        let s = p.encode().unwrap();
        assert_eq!(value(&s, "mirrorvm_protection_lost_total"), Some(1.0));
        // The loss line is no checkpoint.
        assert_eq!(value(&s, "mirrorvm_checkpoints_total"), Some(0.0));
    }
}
