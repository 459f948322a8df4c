//! Reading a `--metrics` file: every kind of line mirrorvm writes there, told apart
//! by its fields, and any other JSON object tolerated (a later mirrorvm may add
//! kinds of lines).

use std::path::Path;

use serde::de::DeserializeOwned;

use super::ReportError;
use crate::epoch::EpochMetrics;
use crate::replication::standby::{AppliedMetrics, FailoverMetrics};

/// The largest metrics file `report` reads (a 25 ms run writes about 10 MiB a day).
pub const MAX_FILE: u64 = 1 << 30;

/// Something that happened to the run at a point of its timeline.
#[derive(Debug, Clone, PartialEq)]
pub struct Marker {
    /// When, ms on the file's clock (0 if the file has none).
    pub at_ms: u64,
    /// The checkpoint it happened at.
    pub epoch: u64,
    /// What happened, in a few words.
    pub what: String,
    /// What happened, in a word or two (the label on the chart).
    pub short: &'static str,
}

/// What a metrics file holds.
#[derive(Debug, Default)]
pub struct Run {
    /// A primary's complete checkpoints, in file order.
    pub checkpoints: Vec<EpochMetrics>,
    /// A standby's applied checkpoints, in file order.
    pub applied: Vec<AppliedMetrics>,
    /// Standby lost (on a primary), takeover (on a standby).
    pub markers: Vec<Marker>,
    /// Lines of no kind this mirrorvm knows.
    pub unknown: usize,
    /// The last line had no newline and did not parse: cut short by a killed run,
    /// and left out.
    pub torn_tail: bool,
}

/// Reads the metrics file at `path`.
pub fn read(path: &Path) -> Result<Run, ReportError> {
    let io = |source| ReportError::Read {
        path: path.to_path_buf(),
        source,
    };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > MAX_FILE {
        return Err(ReportError::TooLarge {
            path: path.to_path_buf(),
            len,
        });
    }
    let bytes = std::fs::read(path).map_err(io)?;
    let text = String::from_utf8_lossy(&bytes);
    parse(&text, path)
}

fn record<T: DeserializeOwned>(
    v: serde_json::Value,
    path: &Path,
    line: usize,
    kind: &'static str,
) -> Result<T, ReportError> {
    serde_json::from_value(v).map_err(|source| ReportError::Line {
        path: path.to_path_buf(),
        line,
        what: kind,
        source,
    })
}

/// Parses the text of a metrics file (`path` names it in errors).
pub fn parse(text: &str, path: &Path) -> Result<Run, ReportError> {
    let mut run = Run::default();
    let lines: Vec<&str> = text.split('\n').collect();
    let last = lines.len() - 1;
    for (i, l) in lines.iter().enumerate() {
        let line = i + 1;
        if l.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = match serde_json::from_str(l) {
            Ok(v) => v,
            // No newline after it: the writer was killed mid-line.
            Err(_) if i == last => {
                run.torn_tail = true;
                continue;
            }
            Err(source) => {
                return Err(ReportError::Line {
                    path: path.to_path_buf(),
                    line,
                    what: "a JSON line",
                    source,
                })
            }
        };
        let Some(obj) = v.as_object() else {
            return Err(ReportError::NotObject {
                path: path.to_path_buf(),
                line,
            });
        };
        if obj.get("failover").and_then(serde_json::Value::as_bool) == Some(true) {
            let f: FailoverMetrics = record(v, path, line, "a failover record")?;
            run.markers.push(Marker {
                at_ms: f.at_ms,
                epoch: f.epoch,
                what: format!("failover at checkpoint {}", f.epoch),
                short: "failover",
            });
        } else if obj.contains_key("pause_us") {
            let m: EpochMetrics = record(v, path, line, "a checkpoint record")?;
            if m.unprotected {
                run.markers.push(Marker {
                    at_ms: m.at_ms,
                    epoch: m.epoch,
                    what: format!("sink lost after checkpoint {}", m.epoch),
                    short: "sink lost",
                });
            } else {
                run.checkpoints.push(m);
            }
        } else if obj.contains_key("apply_us") {
            run.applied
                .push(record(v, path, line, "an applied-checkpoint record")?);
        } else {
            run.unknown += 1;
        }
    }
    Ok(run)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("m.jsonl")
    }

    #[test]
    fn every_kind_of_line_is_told_apart() {
        let text = concat!(
            "{\"epoch\":1,\"full\":true,\"pause_us\":900,\"kick_us\":1,\"harvest_us\":2,\"copy_us\":3,\"save_us\":4,\"dirty_pages\":5,\"bytes\":6,\"region_bytes\":0,\"export_us\":7}\n",
            "\n",
            "{\"epoch\":2,\"full\":false,\"pause_us\":200,\"kick_us\":1,\"harvest_us\":2,\"copy_us\":3,\"save_us\":4,\"dirty_pages\":5,\"bytes\":6,\"region_bytes\":0,\"export_us\":7,\"at_ms\":50,\"ack_us\":8,\"retries\":0,\"new_field\":[1]}\n",
            "{\"epoch\":2,\"full\":false,\"pause_us\":0,\"kick_us\":0,\"harvest_us\":0,\"copy_us\":0,\"save_us\":0,\"dirty_pages\":0,\"bytes\":0,\"region_bytes\":0,\"export_us\":0,\"at_ms\":60,\"unprotected\":true}\n",
            "{\"epoch\":3,\"bytes\":10,\"pages\":1,\"apply_us\":5,\"received_at_ms\":70}\n",
            "{\"failover\":true,\"epoch\":3,\"reason\":\"x\",\"detect_us\":1,\"fence_us\":2,\"restore_us\":3,\"at_ms\":80}\n",
            "{\"something\":\"else\"}\n",
            "{\"epoch\":4,\"pau",
        );
        let r = parse(text, p()).unwrap();
        assert_eq!(r.checkpoints.len(), 2);
        assert_eq!(r.checkpoints[1].at_ms, 50);
        assert_eq!(r.applied.len(), 1);
        assert_eq!(r.markers.len(), 2);
        assert_eq!(r.markers[0].what, "sink lost after checkpoint 2");
        assert_eq!(r.markers[1].at_ms, 80);
        assert_eq!(r.unknown, 1);
        assert!(r.torn_tail);
    }

    #[test]
    fn a_malformed_line_is_named() {
        let e = parse("{\"epoch\":1}\nnot json\n", p()).unwrap_err();
        assert!(
            e.to_string().starts_with("m.jsonl line 2: not a JSON line"),
            "{e}"
        );
        let e = parse("[1,2]\n", p()).unwrap_err();
        assert_eq!(e.to_string(), "m.jsonl line 1: not a JSON object");
        let e = parse("{\"epoch\":1,\"pause_us\":\"slow\"}\n", p()).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("m.jsonl line 1: not a checkpoint record"),
            "{e}"
        );
    }
}
