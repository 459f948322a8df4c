//! How long an epoch lasts: fixed (`--epoch-ms N`), or chosen from what the last
//! checkpoints cost (`--epoch-ms auto`).
//!
//! # The automatic policy
//!
//! A cut costs the guest its pause, and every page it dirties costs it a write-
//! protection fault (the first write after each harvest). Part of that cost comes
//! once per cut whatever the epoch's length (the pause's fixed part, a hot set
//! written in every epoch); the rest grows with the epoch (pages written once).
//! Only the first part shrinks, per second of guest time, when epochs get longer.
//! Longer epochs also hold more unconfirmed work: everything since the last
//! complete checkpoint is at risk, and console output waits that long.
//!
//! So the policy picks the *shortest* length, within `[min, max]`, at which
//! - the per-cut cost is at most [`SLOWDOWN_BUDGET`] of the epoch, and
//! - the export of a checkpoint takes at most [`EXPORT_SHARE`] of the epoch, so
//!   the exporter keeps pace and no cut waits behind it.
//!
//! The per-cut cost is the pause without its page copy, plus, for every page that
//! was dirty in the previous checkpoint too (a page the guest rewrites in every
//! epoch), its copy and its fault: those come once per cut however long the epoch,
//! so a longer epoch amortises them. A page written once costs its fault whatever
//! the length, and is left out. (A region walked more slowly than the epoch shows
//! no overlap; once epochs outgrow the walk, its pages show up in consecutive
//! checkpoints and count.) The per-cut cost is averaged with exponentially fading
//! weights, as the guest's behaviour changes.
//!
//! The export's time is learnt as a straight line over the epoch length — fixed +
//! slope × length — fitted to the recent checkpoints with fading weights. The
//! exporter keeps pace when fixed + slope × length ≤ share × length; if the export
//! grows as fast as the epoch, no length helps and the shortest is best. A slope
//! can only be measured across different lengths; until the lengths seen differ
//! enough, the last slope stands (0 at first). Each step at most doubles or halves
//! the length, so one odd checkpoint cannot swing it.

use std::time::Duration;

/// The part of an epoch the guest may lose to the per-cut cost, in automatic mode.
pub const SLOWDOWN_BUDGET: f64 = 0.02;
/// The part of an epoch the export of its checkpoint may take, in automatic mode.
pub const EXPORT_SHARE: f64 = 0.5;
/// What a dirty page costs the guest, µs, in automatic mode, until the machine
/// sets the fault the start-up probe measured ([`Pacer::set_page_cost`]): a
/// write-protection fault under the software-nested KVM of the development
/// machines (ENVIRONMENT.md measured ~23 µs); on hardware KVM it is far less.
pub const DEFAULT_PAGE_COST_US: f64 = 20.0;
/// Default shortest automatic epoch.
pub const DEFAULT_AUTO_MIN: Duration = Duration::from_millis(5);
/// Default longest automatic epoch.
pub const DEFAULT_AUTO_MAX: Duration = Duration::from_millis(100);
/// Where an automatic run starts: the fixed default.
pub const AUTO_START: Duration = Duration::from_millis(25);
/// Weight kept by older checkpoints at each new one (about the last 8 count).
const FADE: f64 = 0.875;
/// Lengths must spread by this fraction of their mean before a slope is fitted.
const MIN_SPREAD: f64 = 0.1;

/// The epoch length setting (`--epoch-ms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EpochLength {
    /// Every epoch lasts this long (`--epoch-ms N`).
    Fixed(Duration),
    /// The engine chooses, within these bounds (`--epoch-ms auto[,min=N][,max=N]`).
    Auto {
        /// Shortest epoch.
        min: Duration,
        /// Longest epoch.
        max: Duration,
    },
}

impl Default for EpochLength {
    fn default() -> Self {
        EpochLength::Fixed(AUTO_START)
    }
}

/// Why an `--epoch-ms` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LengthError {
    /// Neither a number nor `auto`.
    #[error("`{0}` is neither a number of milliseconds nor auto[,min=N][,max=N]")]
    Syntax(String),
    /// A length outside 1 ms ..= 1 h.
    #[error("{0} ms is outside 1..=3600000")]
    Range(u64),
    /// An option `auto` does not know.
    #[error("unknown auto option `{0}` (known: min=N, max=N)")]
    Option(String),
    /// min above max.
    #[error("auto: min={min} is above max={max}")]
    Bounds {
        /// The shortest length asked for, ms.
        min: u64,
        /// The longest, ms.
        max: u64,
    },
}

fn parse_ms(s: &str) -> Result<u64, LengthError> {
    let n: u64 = s
        .trim()
        .parse()
        .map_err(|_| LengthError::Syntax(s.to_string()))?;
    if !(1..=3_600_000).contains(&n) {
        return Err(LengthError::Range(n));
    }
    Ok(n)
}

impl std::str::FromStr for EpochLength {
    type Err = LengthError;

    /// `N` (milliseconds) or `auto[,min=N][,max=N]`.
    fn from_str(s: &str) -> Result<Self, LengthError> {
        let mut parts = s.split(',');
        let head = parts.next().unwrap_or_default().trim();
        if head != "auto" {
            if parts.next().is_some() {
                return Err(LengthError::Syntax(s.to_string()));
            }
            return Ok(EpochLength::Fixed(Duration::from_millis(parse_ms(head)?)));
        }
        let mut min = u64::try_from(DEFAULT_AUTO_MIN.as_millis()).unwrap_or(5);
        let mut max = u64::try_from(DEFAULT_AUTO_MAX.as_millis()).unwrap_or(100);
        for opt in parts {
            match opt.trim().split_once('=') {
                Some(("min", v)) => min = parse_ms(v)?,
                Some(("max", v)) => max = parse_ms(v)?,
                _ => return Err(LengthError::Option(opt.to_string())),
            }
        }
        if min > max {
            return Err(LengthError::Bounds { min, max });
        }
        Ok(EpochLength::Auto {
            min: Duration::from_millis(min),
            max: Duration::from_millis(max),
        })
    }
}

impl std::fmt::Display for EpochLength {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EpochLength::Fixed(d) => write!(f, "{}", d.as_millis()),
            EpochLength::Auto { min, max } => {
                write!(f, "auto,min={},max={}", min.as_millis(), max.as_millis())
            }
        }
    }
}

/// What one complete checkpoint cost, as the policy sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// How long its epoch really lasted (from the previous cut).
    pub epoch: Duration,
    /// Its pause.
    pub pause: Duration,
    /// Its export.
    pub export: Duration,
    /// Pages it carried.
    pub dirty_pages: u64,
    /// The part of the pause spent copying pages.
    pub copy: Duration,
    /// Pages it carried that the previous checkpoint carried too.
    pub rewritten_pages: u64,
}

/// `v` in ascending order: itself if it already is (a harvest's usually is).
fn sorted(v: &[u64]) -> std::borrow::Cow<'_, [u64]> {
    if v.is_sorted() {
        std::borrow::Cow::Borrowed(v)
    } else {
        let mut c = v.to_vec();
        c.sort_unstable();
        std::borrow::Cow::Owned(c)
    }
}

/// How many pages two checkpoints have in common (each list without repeats).
pub fn common_pages(prev: &[u64], now: &[u64]) -> u64 {
    let (a, b) = (sorted(prev), sorted(now));
    let (mut i, mut j, mut n) = (0, 0, 0u64);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                n += 1;
                i += 1;
                j += 1;
            }
        }
    }
    n
}

/// A value averaged with exponentially fading weights.
#[derive(Debug, Clone, Copy, Default)]
struct Fading {
    w: f64,
    sum: f64,
}

impl Fading {
    fn add(&mut self, v: f64) {
        self.w = self.w * FADE + 1.0;
        self.sum = self.sum * FADE + v;
    }

    fn mean(&self) -> f64 {
        if self.w == 0.0 {
            0.0
        } else {
            self.sum / self.w
        }
    }
}

/// A straight line y ≈ a + b·x over (x, y) points whose weights fade.
#[derive(Debug, Clone, Copy, Default)]
struct Fit {
    w: f64,
    x: f64,
    y: f64,
    xx: f64,
    xy: f64,
    /// The last slope fitted across enough spread.
    slope: f64,
}

impl Fit {
    fn add(&mut self, x: f64, y: f64) {
        self.w = self.w * FADE + 1.0;
        self.x = self.x * FADE + x;
        self.y = self.y * FADE + y;
        self.xx = self.xx * FADE + x * x;
        self.xy = self.xy * FADE + x * y;
        let (mx, my) = (self.x / self.w, self.y / self.w);
        let var = self.xx / self.w - mx * mx;
        if mx > 0.0 && var > (MIN_SPREAD * mx).powi(2) {
            let cov = self.xy / self.w - mx * my;
            // A cost never falls as the epoch grows, nor grows faster than in
            // proportion: clamp what noise may suggest.
            self.slope = (cov / var).clamp(0.0, (my / mx).max(0.0));
        }
    }

    /// The fixed part `a` at the current means, given the slope.
    fn fixed(&self) -> f64 {
        if self.w == 0.0 {
            return 0.0;
        }
        (self.y / self.w - self.slope * self.x / self.w).max(0.0)
    }
}

/// The epoch length in force, and in automatic mode what it is chosen from. Pure:
/// the engine feeds it every complete checkpoint and asks for the length.
#[derive(Debug, Clone)]
pub struct Pacer {
    setting: EpochLength,
    current: Duration,
    page_cost_us: f64,
    /// The guest's per-cut cost, µs: the pause without its copy, plus copy and
    /// fault of the pages rewritten since the previous checkpoint.
    guest: Fading,
    /// The export's time, µs.
    export: Fit,
}

impl Pacer {
    /// A pacer for `setting`; automatic mode starts at [`AUTO_START`] within its
    /// bounds.
    pub fn new(setting: EpochLength) -> Self {
        let current = match setting {
            EpochLength::Fixed(d) => d,
            EpochLength::Auto { min, max } => AUTO_START.clamp(min, max),
        };
        Pacer {
            setting,
            current,
            page_cost_us: DEFAULT_PAGE_COST_US,
            guest: Fading::default(),
            export: Fit::default(),
        }
    }

    /// Sets what a dirty page costs the guest (measured on the host, if known).
    pub fn set_page_cost(&mut self, cost: Duration) {
        self.page_cost_us = cost.as_secs_f64() * 1e6;
    }

    /// The setting.
    pub fn setting(&self) -> EpochLength {
        self.setting
    }

    /// The epoch length in force.
    pub fn current(&self) -> Duration {
        self.current
    }

    /// Learns from one complete checkpoint; returns the new length if it changed.
    pub fn observe(&mut self, s: &Sample) -> Option<Duration> {
        let EpochLength::Auto { min, max } = self.setting else {
            return None;
        };
        // The first cut of a run has no epoch before it.
        if s.epoch.is_zero() {
            return None;
        }
        let x = s.epoch.as_secs_f64() * 1e3;
        let rewritten = s.rewritten_pages.min(s.dirty_pages) as f64;
        let copy_us = s.copy.min(s.pause).as_secs_f64() * 1e6;
        let hot_share = if s.dirty_pages == 0 {
            0.0
        } else {
            rewritten / s.dirty_pages as f64
        };
        let per_cut_us = s.pause.as_secs_f64() * 1e6 - copy_us * (1.0 - hot_share)
            + rewritten * self.page_cost_us;
        self.guest.add(per_cut_us);
        self.export.add(x, s.export.as_secs_f64() * 1e6);
        // Shortest length at which the per-cut cost fits the budget (ms).
        let for_guest = self.guest.mean() / 1e3 / SLOWDOWN_BUDGET;
        // Shortest length at which the exporter keeps pace; if the export grows as
        // fast as the epoch, no length helps and the shortest is best.
        let share_left = EXPORT_SHARE - self.export.slope / 1e3;
        let for_export = if share_left > 0.0 {
            self.export.fixed() / 1e3 / share_left
        } else {
            0.0
        };
        let want_ms = for_guest.max(for_export);
        let now_ms = self.current.as_secs_f64() * 1e3;
        let step_ms = want_ms.clamp(now_ms / 2.0, now_ms * 2.0);
        let lo = min.as_secs_f64() * 1e3;
        let hi = max.as_secs_f64() * 1e3;
        // Whole milliseconds: the timer and the metrics read better, and a change
        // under one is noise.
        let next = Duration::try_from_secs_f64(step_ms.clamp(lo, hi).round() / 1e3)
            .unwrap_or(max)
            .clamp(min, max);
        if next == self.current {
            return None;
        }
        self.current = next;
        Some(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn whole_ms(d: Duration) -> u64 {
        u64::try_from(d.as_millis()).unwrap()
    }

    fn auto() -> Pacer {
        Pacer::new("auto".parse().unwrap())
    }

    /// Runs `n` checkpoints of a guest whose cost at length T (ms) is `f(T)`:
    /// (pause µs, dirty pages, export µs, pages also in the previous checkpoint).
    /// The copy is 1 µs a page. Returns the lengths chosen.
    fn drive(p: &mut Pacer, n: usize, f: impl Fn(u64) -> (u64, u64, u64, u64)) -> Vec<u64> {
        let mut out = Vec::new();
        for _ in 0..n {
            let t = p.current();
            let (pause, pages, export, rewritten) = f(whole_ms(t));
            p.observe(&Sample {
                epoch: t,
                pause: Duration::from_micros(pause),
                export: Duration::from_micros(export),
                dirty_pages: pages,
                copy: Duration::from_micros(pages.min(pause)),
                rewritten_pages: rewritten,
            });
            out.push(whole_ms(p.current()));
        }
        out
    }

    #[test]
    fn parses_numbers_auto_and_bounds() {
        assert_eq!("25".parse(), Ok(EpochLength::Fixed(ms(25))));
        assert_eq!(
            "auto".parse(),
            Ok(EpochLength::Auto {
                min: DEFAULT_AUTO_MIN,
                max: DEFAULT_AUTO_MAX
            })
        );
        assert_eq!(
            "auto,min=2,max=40".parse(),
            Ok(EpochLength::Auto {
                min: ms(2),
                max: ms(40)
            })
        );
        assert_eq!("0".parse::<EpochLength>(), Err(LengthError::Range(0)));
        assert_eq!(
            "auto,min=50,max=40".parse::<EpochLength>(),
            Err(LengthError::Bounds { min: 50, max: 40 })
        );
        assert!(matches!(
            "auto,len=3".parse::<EpochLength>(),
            Err(LengthError::Option(_))
        ));
        assert!(matches!(
            "fast".parse::<EpochLength>(),
            Err(LengthError::Syntax(_))
        ));
        assert!(matches!(
            "25,min=3".parse::<EpochLength>(),
            Err(LengthError::Syntax(_))
        ));
        for s in ["25", "auto,min=2,max=40"] {
            let l: EpochLength = s.parse().unwrap();
            assert_eq!(l.to_string().parse::<EpochLength>(), Ok(l));
        }
    }

    #[test]
    fn common_pages_counts_the_overlap_sorted_or_not() {
        assert_eq!(common_pages(&[], &[1, 2]), 0);
        assert_eq!(common_pages(&[1, 2, 3, 9], &[2, 3, 4, 9]), 3);
        assert_eq!(common_pages(&[9, 1, 3], &[3, 9, 2]), 2);
    }

    #[test]
    fn a_walk_slower_than_the_epoch_is_not_a_hot_set() {
        // 4,000 pages an epoch walking 16,000: no page in two consecutive
        // checkpoints at 25 ms, so nothing to amortise.
        let mut p = auto();
        let chosen = drive(&mut p, 10, |t| {
            let pages = 160 * t;
            let rewritten = pages.saturating_sub(16_000).min(16_000);
            (300 + pages, pages.min(16_000), 5_000, rewritten)
        });
        assert!(chosen.iter().all(|&c| c <= 25), "{chosen:?}");
    }

    #[test]
    fn fixed_never_moves() {
        let mut p = Pacer::new(EpochLength::Fixed(ms(25)));
        let chosen = drive(&mut p, 20, |_| (5_000, 4_000, 90_000, 4_000));
        assert!(chosen.iter().all(|&c| c == 25), "{chosen:?}");
    }

    #[test]
    fn an_idle_guest_gets_short_epochs() {
        // 200 µs pause, nothing dirty: 200 µs / 2 % = 10 ms.
        let mut p = auto();
        let chosen = drive(&mut p, 30, |_| (200, 0, 300, 0));
        assert_eq!(*chosen.last().unwrap(), 10, "{chosen:?}");
    }

    #[test]
    fn a_hot_set_gets_long_epochs() {
        // 4,000 pages rewritten in every epoch whatever its length: the cost is all
        // per cut, so lengthening pays, up to the bound.
        let mut p = auto();
        let chosen = drive(&mut p, 30, |_| (4_500, 4_000, 20_000, 4_000));
        assert_eq!(*chosen.last().unwrap(), 100, "{chosen:?}");
    }

    #[test]
    fn pages_written_once_do_not_buy_long_epochs() {
        // 40 new pages a ms: the fault cost grows with the epoch, so a longer one
        // saves nothing and holds more at risk: the shortest length the pause
        // allows (200 µs without the copy / 2 % = 10 ms).
        let mut p = auto();
        let chosen = drive(&mut p, 30, |t| {
            let pages = 40 * t;
            (200 + pages, pages, 200 + 2 * pages, 0)
        });
        assert!(chosen[3..].iter().all(|&c| c <= 12), "{chosen:?}");
        assert_eq!(*chosen.last().unwrap(), 10, "{chosen:?}");
    }

    #[test]
    fn a_slow_export_lengthens_the_epoch_until_it_keeps_pace() {
        // Export: 30 ms of fixed work per checkpoint (e.g. syncs), little guest
        // cost: needs 30 / 0.5 = 60 ms.
        let mut p = auto();
        let chosen = drive(&mut p, 40, |_| (200, 1, 30_000, 0));
        let last = *chosen.last().unwrap();
        assert!((58..=62).contains(&last), "{chosen:?}");
    }

    #[test]
    fn each_step_at_most_doubles_or_halves_and_stays_in_bounds() {
        let mut p = Pacer::new("auto,min=3,max=70".parse().unwrap());
        let mut before = whole_ms(p.current());
        let costs = [
            (100, 0, 50, 0),
            (9_000, 9_000, 100_000, 9_000),
            (10, 0, 10, 0),
        ];
        for i in 0..60 {
            let (pause, pages, export, hot) = costs[(i / 7) % costs.len()];
            let now = drive(&mut p, 1, |_| (pause, pages, export, hot))[0];
            assert!((3..=70).contains(&now), "{now}");
            assert!(
                now <= before * 2 + 1 && now * 2 + 1 >= before,
                "{before} → {now}"
            );
            before = now;
        }
    }

    #[test]
    fn the_first_cut_teaches_nothing() {
        let mut p = auto();
        assert_eq!(
            p.observe(&Sample {
                epoch: Duration::ZERO,
                pause: ms(50),
                export: ms(500),
                dirty_pages: 100_000,
                copy: ms(40),
                rewritten_pages: 0,
            }),
            None
        );
        assert_eq!(p.current(), AUTO_START);
    }
}
