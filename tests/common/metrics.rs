//! The `--metrics` file: one JSON line per completed checkpoint. Shared by the
//! integration tests (through tests/common) and the epoch benchmark (included with
//! `#[path]`).

use std::path::Path;

/// One line of the `--metrics` file: the engine's own type, read back with serde
/// (fields mirrorvm adds later are ignored).
pub use vmm::epoch::EpochMetrics as Metric;

/// Every complete line of the metrics file at `path` (none if it does not exist
/// yet). A last line without its newline is still being written and is left out;
/// a complete line that does not parse is an error.
pub fn read_metrics(path: &Path) -> Result<Vec<Metric>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let complete = match text.rfind('\n') {
        Some(i) => &text[..i],
        None => "",
    };
    complete
        .lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| format!("{} line {}: {e}: {l}", path.display(), i + 1))
        })
        .collect()
}
