//! Order statistics shared by the benchmarks: benches/boot.rs and benches/epoch.rs
//! of the mirrorvm package, and devices/benches/store.rs of the devices crate, each
//! include this file with `#[path = ...] mod stats;` (a bench is its own crate, and
//! one file beats a helper crate for two functions).
#![allow(dead_code)]

/// The `p`-quantile (`p` in 0.0..=1.0) of `values` by nearest rank: the element at
/// index round((n - 1) × p) of the values sorted ascending, so `p = 0.5` is the
/// median (the upper one for an even count). `None` when `values` is empty.
///
/// Panics on values that do not order (a NaN) or `p` outside 0.0..=1.0.
pub fn percentile<T: Copy + PartialOrd>(values: &[T], p: f64) -> Option<T> {
    assert!((0.0..=1.0).contains(&p), "percentile {p} is not in 0..=1");
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.partial_cmp(b).expect("values that do not order (NaN)"));
    // p is in 0..=1 (asserted above), so the rounded product is in 0..=len-1.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    Some(sorted[i])
}

/// The median of `values` ([`percentile`] at 0.5); `None` when empty.
pub fn median<T: Copy + PartialOrd>(values: &[T]) -> Option<T> {
    percentile(values, 0.5)
}
