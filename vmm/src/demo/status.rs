//! The demo's live view: what each host is doing, read from the files and stderr
//! lines the two mirrorvm processes write, drawn as a status line per host (progress
//! bars on a terminal, plain lines once a second otherwise).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{IsTerminal, Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::verdict::{parse_failover, StandbyMetric};
use crate::epoch::EpochMetrics;

/// Reads the lines appended to a file since the last call (the file may not exist
/// yet). A last line without its newline waits for the next call.
#[derive(Debug)]
pub struct Tail {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
}

impl Tail {
    /// Follows `path` from its start.
    pub fn new(path: PathBuf) -> Tail {
        Tail {
            path,
            offset: 0,
            partial: Vec::new(),
        }
    }

    /// The complete lines appended since the last call.
    pub fn poll(&mut self) -> Vec<String> {
        let Ok(mut f) = File::open(&self.path) else {
            return Vec::new();
        };
        let mut new = Vec::new();
        if f.seek(SeekFrom::Start(self.offset)).is_err() || f.read_to_end(&mut new).is_err() {
            return Vec::new();
        }
        self.offset += u64::try_from(new.len()).unwrap_or(0);
        self.partial.extend_from_slice(&new);
        let Some(end) = self.partial.iter().rposition(|&b| b == b'\n') else {
            return Vec::new();
        };
        let done: Vec<u8> = self.partial.drain(..=end).collect();
        String::from_utf8_lossy(&done)
            .lines()
            .map(|l| l.trim_end_matches('\r').to_owned())
            .collect()
    }
}

/// The standby's phase, as its stderr lines tell it.
#[derive(Debug, Clone, PartialEq)]
pub enum StandbyState {
    /// Started, not yet listening.
    Starting,
    /// Listening for the primary.
    Listening,
    /// The primary connected; the initial copy runs.
    Copying,
    /// The initial copy is complete; checkpoints arrive.
    Mirroring,
    /// It declared the primary lost and is taking over (fence, restore) or waiting for
    /// the fence.
    LostPrimary {
        /// Why, as it said.
        reason: String,
    },
    /// Took over: it runs the guest now.
    TookOver {
        /// The checkpoint it resumed from.
        checkpoint: u64,
        /// The failover's total, ms.
        total_ms: f64,
    },
    /// The primary ended the run in an orderly way, and the standby with it.
    PrimaryEnded,
}

impl StandbyState {
    /// The state after the standby's stderr `lines`, in order.
    pub fn from_lines<'a>(lines: impl IntoIterator<Item = &'a str>) -> StandbyState {
        let mut s = StandbyState::Starting;
        for l in lines {
            if let Some(f) = parse_failover(l) {
                s = StandbyState::TookOver {
                    checkpoint: f.checkpoint,
                    total_ms: f.total_ms,
                };
            } else if let Some(reason) = lost_reason(l) {
                s = StandbyState::LostPrimary { reason };
            } else if l.contains("standby: listening on") {
                s = StandbyState::Listening;
            } else if l.contains("standby: primary ") && l.contains(" connected") {
                s = StandbyState::Copying;
            } else if l.contains("standby: initial copy complete") {
                s = StandbyState::Mirroring;
            } else if l.contains("standby: the primary ended the run") {
                s = StandbyState::PrimaryEnded;
            }
        }
        s
    }
}

/// The reason in `standby: primary lost (REASON): taking over at checkpoint N`.
fn lost_reason(line: &str) -> Option<String> {
    const START: &str = "standby: primary lost (";
    let rest = &line[line.find(START)? + START.len()..];
    Some(rest[..rest.rfind("): taking over")?].to_owned())
}

/// What the status line of the primary shows.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PrimaryView {
    /// Whether the process runs (false once killed or exited).
    pub alive: bool,
    /// Why it is not alive, when it is not.
    pub ended: Option<String>,
    /// The newest acknowledged checkpoint (the last metrics line).
    pub acked: Option<u64>,
    /// That checkpoint's pause, ms.
    pub pause_ms: f64,
    /// That checkpoint's dirty pages.
    pub dirty_pages: u64,
    /// Checkpoint bytes sent per second, over the last seconds.
    pub mb_per_s: f64,
    /// Whether a standby holds a current replica.
    pub protected: bool,
}

/// What the status line of the standby shows.
#[derive(Debug, Clone, PartialEq)]
pub struct StandbyView {
    /// Its phase.
    pub state: StandbyState,
    /// Whether the demo killed the primary (and no takeover is seen yet).
    pub primary_killed: bool,
    /// Checkpoints applied (metrics lines).
    pub applied: usize,
    /// The newest applied.
    pub last_applied: Option<u64>,
    /// The primary's newest acknowledged checkpoint minus the standby's newest
    /// applied one.
    pub lag: Option<u64>,
    /// Its exit, once it has ended.
    pub ended: Option<String>,
}

/// The primary's status line (kept under 80 columns where it can be).
pub fn render_primary(v: &PrimaryView) -> String {
    let figures = match v.acked {
        Some(e) => format!(
            "acked {e} · pause {:.2} ms · {} pages · {:.1} MB/s",
            v.pause_ms, v.dirty_pages, v.mb_per_s
        ),
        None => "nothing acknowledged yet".to_owned(),
    };
    if v.alive {
        let prot = if v.protected {
            "PROTECTED"
        } else {
            "unprotected"
        };
        format!("primary  {figures} · {prot}")
    } else {
        format!(
            "primary  {} · {figures}",
            v.ended.as_deref().unwrap_or("gone")
        )
    }
}

/// The standby's status line.
pub fn render_standby(v: &StandbyView) -> String {
    let state = match (&v.state, v.primary_killed) {
        (
            StandbyState::TookOver {
                checkpoint,
                total_ms,
            },
            _,
        ) => {
            format!("TOOK OVER at {checkpoint} in {total_ms} ms, runs the guest")
        }
        (_, true) => "primary lost: taking over".to_owned(),
        (StandbyState::Starting, _) => "starting".to_owned(),
        (StandbyState::Listening, _) => "waiting for the primary".to_owned(),
        (StandbyState::Copying, _) => "initial copy".to_owned(),
        (StandbyState::Mirroring, _) => "mirroring".to_owned(),
        (StandbyState::PrimaryEnded, _) => "the primary ended the run".to_owned(),
        (StandbyState::LostPrimary { reason }, _) => {
            format!("primary lost ({reason}): taking over")
        }
    };
    let mut s = format!("standby  {state} · applied {}", v.applied);
    if let Some(e) = v.last_applied {
        s.push_str(&format!(" (last {e})"));
    }
    if let Some(l) = v.lag {
        s.push_str(&format!(" · lag {l}"));
    }
    if let Some(end) = &v.ended {
        s.push_str(&format!(" · {end}"));
    }
    s
}

/// Follows the metrics and console files of both hosts.
#[derive(Debug)]
pub struct Monitor {
    metrics_a: Tail,
    metrics_b: Tail,
    console_a: Tail,
    console_b: Tail,
    last_a: Option<EpochMetrics>,
    /// (arrival, bytes) of the primary's recent checkpoints, for MB/s.
    recent: VecDeque<(Instant, u64)>,
    /// When the primary last acknowledged a checkpoint.
    last_ack_at: Option<Instant>,
    applied: usize,
    last_applied: Option<u64>,
    guest_line: String,
}

/// The span over which MB/s is averaged.
const RATE_WINDOW: Duration = Duration::from_secs(2);
/// A primary whose last acknowledgement is older than this is not shown protected.
const ACK_STALE: Duration = Duration::from_secs(2);

/// The files one host's mirrorvm writes.
#[derive(Debug, Clone)]
pub struct HostFiles {
    /// `--metrics`.
    pub metrics: PathBuf,
    /// `--serial file=`.
    pub console: PathBuf,
}

impl Monitor {
    /// Follows the files of host a (`a`) and host b (`b`).
    pub fn new(a: &HostFiles, b: &HostFiles) -> Monitor {
        Monitor {
            metrics_a: Tail::new(a.metrics.clone()),
            metrics_b: Tail::new(b.metrics.clone()),
            console_a: Tail::new(a.console.clone()),
            console_b: Tail::new(b.console.clone()),
            last_a: None,
            recent: VecDeque::new(),
            last_ack_at: None,
            applied: 0,
            last_applied: None,
            guest_line: String::new(),
        }
    }

    /// Reads what is new in the files.
    pub fn poll(&mut self, now: Instant) {
        for l in self.metrics_a.poll() {
            if let Ok(m) = serde_json::from_str::<EpochMetrics>(&l) {
                self.recent.push_back((now, m.bytes));
                self.last_ack_at = Some(now);
                self.last_a = Some(m);
            }
        }
        while self
            .recent
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW)
        {
            self.recent.pop_front();
        }
        for l in self.metrics_b.poll() {
            if let Ok(m) = serde_json::from_str::<StandbyMetric>(&l) {
                self.applied += 1;
                self.last_applied = Some(self.last_applied.map_or(m.epoch, |e| e.max(m.epoch)));
            }
        }
        for l in self
            .console_a
            .poll()
            .into_iter()
            .chain(self.console_b.poll())
        {
            if !l.trim().is_empty() {
                self.guest_line = l;
            }
        }
    }

    /// The primary's view; `alive`/`ended` from the process, `standby` for whether
    /// it is protected.
    pub fn primary(
        &self,
        now: Instant,
        ended: Option<String>,
        standby: &StandbyState,
    ) -> PrimaryView {
        let m = self.last_a.clone().unwrap_or_default();
        let bytes: u64 = self.recent.iter().map(|(_, b)| b).sum();
        let fresh = self
            .last_ack_at
            .is_some_and(|t| now.duration_since(t) < ACK_STALE);
        PrimaryView {
            alive: ended.is_none(),
            protected: ended.is_none() && fresh && *standby == StandbyState::Mirroring,
            ended,
            acked: self.last_a.as_ref().map(|m| m.epoch),
            pause_ms: ms(m.pause_us),
            dirty_pages: m.dirty_pages,
            mb_per_s: mb(bytes) / RATE_WINDOW.as_secs_f64(),
        }
    }

    /// The standby's view.
    pub fn standby(
        &self,
        state: StandbyState,
        primary_killed: bool,
        ended: Option<String>,
    ) -> StandbyView {
        let acked = self.last_a.as_ref().map(|m| m.epoch);
        StandbyView {
            primary_killed: primary_killed && !matches!(state, StandbyState::TookOver { .. }),
            state,
            applied: self.applied,
            last_applied: self.last_applied,
            lag: acked
                .zip(self.last_applied)
                .map(|(a, b)| a.saturating_sub(b)),
            ended,
        }
    }

    /// The newest non-empty console line of either host.
    pub fn guest_line(&self) -> &str {
        &self.guest_line
    }
}

fn ms(us: u64) -> f64 {
    // Exact below 2^53 µs (285 years).
    #[allow(clippy::cast_precision_loss)]
    let v = us as f64;
    v / 1000.0
}

fn mb(bytes: u64) -> f64 {
    #[allow(clippy::cast_precision_loss)]
    let v = bytes as f64;
    v / 1e6
}

/// Where the demo tells the user what happens: progress bars on a terminal, plain
/// lines (status once a second) otherwise. Both on stderr.
pub enum Screen {
    /// stderr is a terminal.
    Bars {
        /// The bars' owner.
        multi: MultiProgress,
        /// One bar per status line.
        bars: Vec<ProgressBar>,
        /// The status lines last shown, left on screen at the end.
        last: Vec<String>,
    },
    /// stderr is a file or a pipe.
    Plain {
        /// When the demo started.
        start: Instant,
        /// When the status lines were last printed.
        last: Option<Instant>,
    },
}

/// How often plain status lines are printed.
const PLAIN_EVERY: Duration = Duration::from_secs(1);

impl Screen {
    /// Bars if stderr is a terminal, plain lines otherwise; `lines` status lines.
    pub fn new(start: Instant, lines: usize) -> Screen {
        if !std::io::stderr().is_terminal() {
            return Screen::Plain { start, last: None };
        }
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(10));
        let style = ProgressStyle::with_template("{spinner:.green} {wide_msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
        let bars = (0..lines)
            .map(|_| {
                let b = multi.add(ProgressBar::new_spinner());
                b.set_style(style.clone());
                b
            })
            .collect();
        Screen::Bars {
            multi,
            bars,
            last: Vec::new(),
        }
    }

    /// A line above the status lines, at once.
    pub fn event(&self, msg: &str) {
        match self {
            Screen::Bars { multi, .. } => {
                if multi.println(msg).is_err() {
                    say!(std::io::stderr(), "{msg}");
                }
            }
            Screen::Plain { start, .. } => {
                say!(
                    std::io::stderr(),
                    "[{:6.1} s] {msg}",
                    start.elapsed().as_secs_f64()
                )
            }
        }
    }

    /// New status lines; `force` prints plain ones even if a second has not passed.
    pub fn status(&mut self, lines: &[String], force: bool) {
        match self {
            Screen::Bars { bars, last, .. } => {
                for (b, l) in bars.iter().zip(lines) {
                    b.set_message(l.clone());
                    b.tick();
                }
                *last = lines.to_vec();
            }
            Screen::Plain { start, last } => {
                let now = Instant::now();
                if force || last.is_none_or(|t| now.duration_since(t) >= PLAIN_EVERY) {
                    *last = Some(now);
                    let mut err = std::io::stderr().lock();
                    for l in lines {
                        let _ = writeln!(err, "[{:6.1} s]   {l}", start.elapsed().as_secs_f64());
                    }
                }
            }
        }
    }

    /// Stops drawing and leaves the last status lines on screen as plain lines.
    pub fn finish(&mut self) {
        if let Screen::Bars { bars, last, .. } = self {
            for b in bars.iter() {
                b.finish_and_clear();
            }
            for l in last.drain(..) {
                say!(std::io::stderr(), "  {l}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_returns_only_complete_new_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("f");
        let mut t = Tail::new(p.clone());
        assert!(t.poll().is_empty(), "no file yet");
        std::fs::write(&p, "one\ntw").expect("write");
        assert_eq!(t.poll(), vec!["one"]);
        assert!(t.poll().is_empty());
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .expect("open");
        f.write_all(b"o\r\nthree\n").expect("append");
        assert_eq!(t.poll(), vec!["two", "three"]);
    }

    #[test]
    fn standby_state_follows_its_stderr() {
        let mut lines = vec!["mirrorvm: standby: listening on 10.77.0.2:7370"];
        assert_eq!(
            StandbyState::from_lines(lines.clone()),
            StandbyState::Listening
        );
        lines.push("mirrorvm: standby: primary 10.77.0.1 connected: 2 vCPUs, 256 MiB");
        assert_eq!(
            StandbyState::from_lines(lines.clone()),
            StandbyState::Copying
        );
        lines.push("mirrorvm: standby: initial copy complete at checkpoint 1");
        assert_eq!(
            StandbyState::from_lines(lines.clone()),
            StandbyState::Mirroring
        );
        lines.push("mirrorvm: standby: primary lost (silent for 105 ms (a pause)): taking over at checkpoint 9");
        assert_eq!(
            StandbyState::from_lines(lines.clone()),
            StandbyState::LostPrimary {
                reason: "silent for 105 ms (a pause)".to_owned()
            }
        );
        lines.push("mirrorvm: failover: primary lost (connection reset) at checkpoint 9: detect 1 ms, total 2.5 ms");
        assert_eq!(
            StandbyState::from_lines(lines.clone()),
            StandbyState::TookOver {
                checkpoint: 9,
                total_ms: 2.5
            }
        );
        assert_eq!(StandbyState::from_lines(Vec::new()), StandbyState::Starting);
    }

    #[test]
    fn status_lines_say_what_the_user_needs() {
        let p = PrimaryView {
            alive: true,
            acked: Some(120),
            pause_ms: 0.314,
            dirty_pages: 512,
            mb_per_s: 80.04,
            protected: true,
            ..Default::default()
        };
        assert_eq!(
            render_primary(&p),
            "primary  acked 120 · pause 0.31 ms · 512 pages · 80.0 MB/s · PROTECTED"
        );
        let dead = PrimaryView {
            alive: false,
            ended: Some("KILLED (SIGKILL)".to_owned()),
            ..p
        };
        assert!(render_primary(&dead).starts_with("primary  KILLED (SIGKILL) · acked 120"));
        let s = StandbyView {
            state: StandbyState::Mirroring,
            primary_killed: false,
            applied: 119,
            last_applied: Some(120),
            lag: Some(0),
            ended: None,
        };
        assert_eq!(
            render_standby(&s),
            "standby  mirroring · applied 119 (last 120) · lag 0"
        );
        let taking = StandbyView {
            primary_killed: true,
            ..s.clone()
        };
        assert!(render_standby(&taking).contains("taking over"));
        let took = StandbyView {
            state: StandbyState::TookOver {
                checkpoint: 120,
                total_ms: 105.0,
            },
            ..s
        };
        assert!(render_standby(&took).contains("TOOK OVER at 120 in 105 ms"));
    }

    #[test]
    fn monitor_reads_both_hosts_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let host = |n: &str| HostFiles {
            metrics: dir.path().join(format!("{n}.jsonl")),
            console: dir.path().join(format!("{n}.log")),
        };
        let (a, b) = (host("a"), host("b"));
        let mut m = Monitor::new(&a, &b);
        let line = |e: u64| {
            serde_json::to_string(&EpochMetrics {
                epoch: e,
                pause_us: 250,
                dirty_pages: 10,
                bytes: 1_000_000,
                ..Default::default()
            })
            .expect("json")
        };
        std::fs::write(&a.metrics, format!("{}\n{}\n", line(1), line(2))).expect("write");
        std::fs::write(
            &b.metrics,
            "{\"epoch\":1,\"bytes\":9,\"pages\":1,\"apply_us\":4,\"received_at_ms\":3}\n",
        )
        .expect("write");
        std::fs::write(&a.console, "mix: memory: 1 s, 5 pages dirtied\n").expect("write");
        let now = Instant::now();
        m.poll(now);
        let p = m.primary(now, None, &StandbyState::Mirroring);
        assert_eq!(p.acked, Some(2));
        assert!((p.pause_ms - 0.25).abs() < 1e-9);
        assert!((p.mb_per_s - 1.0).abs() < 1e-9, "2 MB over 2 s");
        assert!(p.protected);
        assert!(!m.primary(now, None, &StandbyState::Copying).protected);
        assert!(
            !m.primary(now + Duration::from_secs(5), None, &StandbyState::Mirroring)
                .protected
        );
        let s = m.standby(StandbyState::Mirroring, false, None);
        assert_eq!((s.applied, s.last_applied, s.lag), (1, Some(1), Some(1)));
        assert_eq!(m.guest_line(), "mix: memory: 1 s, 5 pages dirtied");
    }
}
