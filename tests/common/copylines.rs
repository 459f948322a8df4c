//! Reading the re-protection lines mirrorvm prints on stderr: each initial copy's
//! `initial copy to ADDR: S bytes sent for T bytes of [changed] memory and disks (D
//! bytes of disk chunks that differed) …` and a switchover's two halves of downtime.
//! Shared by tests/reprotect.rs and benches/reprotect.rs (included with `#[path]`).
#![allow(dead_code)]

/// One initial copy, as the primary reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Copy {
    /// Bytes sent.
    pub sent: u64,
    /// Bytes of memory (or of changed memory) and disks the copy covered.
    pub total: u64,
    /// Bytes of disk chunks that differed, and were sent.
    pub differed: u64,
    /// Whether memory was built on the standby's replica (only changed pages sent).
    pub delta: bool,
}

/// Every initial copy reported in `stderr`, oldest first.
pub fn copies(stderr: &str) -> Vec<Copy> {
    stderr
        .lines()
        .filter(|l| l.contains("initial copy to ") && l.contains(" bytes sent for "))
        .filter_map(|l| {
            let rest = l.split(": ").nth(2)?;
            let word = |s: &str| s.split(' ').next()?.parse().ok();
            Some(Copy {
                sent: word(rest)?,
                total: word(rest.split(" bytes sent for ").nth(1)?)?,
                differed: word(rest.split('(').nth(1)?)?,
                delta: rest.contains("of changed memory"),
            })
        })
        .collect()
}

/// The newest switchover's downtime bound, ms: the old primary's "final pause to the
/// standby's confirmation" (in `old`) plus the new primary's "handover read to guest
/// running" (`total`, in `new`).
pub fn downtime_ms(old: &str, new: &str) -> Option<f64> {
    let ms = |s: &str| -> Option<f64> { s.split(" ms").next()?.trim().parse().ok() };
    let handed = old
        .lines()
        .rev()
        .find(|l| l.contains("handed the guest over"))?;
    let took = new
        .lines()
        .rev()
        .find(|l| l.contains("switchover: took the guest over"))?;
    Some(ms(handed.rsplit(": ").next()?)? + ms(took.split("total ").nth(1)?)?)
}
