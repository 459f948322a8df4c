//! Per-checkpoint figures, written as one JSON line each (`--metrics PATH`).

use std::io::Write;

use serde::{Deserialize, Serialize};

/// Timings and sizes of one cut, written once its export finished.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochMetrics {
    /// Checkpoint number.
    pub epoch: u64,
    /// Whether it completed a base image (the first after a pre-copy).
    pub full: bool,
    /// Whole pause, µs.
    pub pause_us: u64,
    /// Kick until every vCPU parked, µs.
    pub kick_us: u64,
    /// Dirty-log harvest, µs.
    pub harvest_us: u64,
    /// Page copy into staging, µs.
    pub copy_us: u64,
    /// Device, vCPU, VM state save and disk region swap, µs.
    pub save_us: u64,
    /// Pages in the checkpoint.
    pub dirty_pages: u64,
    /// Of those, pages the hot-page policy left writable at this cut (copied at
    /// every cut until their lease ends; `docs/dirty-tracking.md`).
    #[serde(default)]
    pub hot_pages: u64,
    /// Bytes written to the sink.
    pub bytes: u64,
    /// Bytes in the disk regions frozen at the cut.
    pub region_bytes: u64,
    /// Time from handing the checkpoint to the exporter until the sink had it, µs
    /// (its last attempt).
    pub export_us: u64,
    /// How long the epoch lasted: from the previous cut's pause to this one's, µs (0
    /// for the first cut of a run). Longer than `--epoch-ms` when cuts were
    /// postponed behind a slow export; `dirty_pages` counts what the guest wrote in
    /// all of it, so this is what to divide by for a dirty rate.
    #[serde(default)]
    pub epoch_us: u64,
    /// Pages in the checkpoint that the previous checkpoint of this run carried too
    /// (rewritten in consecutive epochs: what `--epoch-ms auto` counts as a per-cut
    /// cost).
    #[serde(default)]
    pub rewritten_pages: u64,
    /// The epoch length in force when this epoch ran, µs: `--epoch-ms`, or what
    /// `--epoch-ms auto` chose (0 in files written before it existed). The next
    /// line's value is the length chosen after this checkpoint.
    #[serde(default)]
    pub target_us: u64,
    /// When the cut ended its pause, ms since checkpointing started in this process
    /// (0 in files written before it existed).
    #[serde(default)]
    pub at_ms: u64,
    /// From the end of the pause until the checkpoint was complete (durable in the
    /// directory, or acknowledged by the standby), retries included, µs: how long
    /// its console output was held.
    #[serde(default)]
    pub ack_us: u64,
    /// Export attempts that failed and were retried before it completed.
    #[serde(default)]
    pub retries: u64,
    /// Set on the one line written when the sink was lost: the run goes on
    /// unprotected after checkpoint `epoch` (the last complete one; 0 if none).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unprotected: bool,
}

impl EpochMetrics {
    /// Writes the JSON line and flushes.
    pub fn write_line(&self, w: &mut dyn Write) -> std::io::Result<()> {
        serde_json::to_writer(&mut *w, self).map_err(std::io::Error::other)?;
        w.write_all(b"\n")?;
        w.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_that_reads_back() {
        let m = EpochMetrics {
            epoch: 3,
            full: true,
            pause_us: 200,
            dirty_pages: 17,
            ..Default::default()
        };
        let mut out = Vec::new();
        m.write_line(&mut out).unwrap();
        let s = String::from_utf8(out).unwrap();
        assert!(s.ends_with('\n') && s.matches('\n').count() == 1);
        assert!(s.starts_with("{\"epoch\":3,\"full\":true,\"pause_us\":200,"));
        let back: EpochMetrics = serde_json::from_str(s.trim()).unwrap();
        assert_eq!(back, m);
    }
}
