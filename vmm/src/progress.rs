//! Progress of long work on stderr: the initial copy to a standby and the pre-copy to
//! a checkpoint directory. On a terminal it is a bar (`indicatif`) that is cleared
//! when the work is done; anywhere else (a log file, a pipe, tests, CI) it is a plain
//! line every second, `mirrorvm: WHAT: X of Y MiB, R MiB/s, about S s left`, which
//! scripts may read.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often a plain line is printed.
pub const LINE_EVERY: Duration = Duration::from_secs(1);

/// The progress of one piece of work of a known size in bytes.
pub struct Progress {
    what: String,
    total: u64,
    done: u64,
    start: Instant,
    last: Instant,
    bar: Option<ProgressBar>,
}

impl Progress {
    /// Starts showing `what` (e.g. `initial copy to 10.0.0.2:7000`) of `total` bytes:
    /// a bar if stderr is a terminal, plain lines otherwise.
    pub fn new(what: impl Into<String>, total: u64) -> Progress {
        let bar = std::io::stderr()
            .is_terminal()
            .then(|| ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr()));
        Progress::with_bar(what.into(), total, bar)
    }

    fn with_bar(what: String, total: u64, bar: Option<ProgressBar>) -> Progress {
        if let Some(b) = &bar {
            let style = ProgressStyle::with_template(
                "mirrorvm: {msg} [{bar:30}] {binary_bytes} of {binary_total_bytes}, {binary_bytes_per_sec}, about {eta} left",
            )
            .map(|s| s.progress_chars("=> "))
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            b.set_style(style);
            b.set_message(what.clone());
        }
        let now = Instant::now();
        Progress {
            what,
            total,
            done: 0,
            start: now,
            last: now,
            bar,
        }
    }

    /// The plain line for where the work stands.
    pub fn line(&self) -> String {
        let secs = self.start.elapsed().as_secs_f64().max(1e-6);
        #[allow(clippy::cast_precision_loss)]
        let (done, left_bytes) = (
            self.done as f64,
            self.total.saturating_sub(self.done) as f64,
        );
        let rate = done / secs;
        format!(
            "mirrorvm: {}: {} of {} MiB, {:.0} MiB/s, about {:.1} s left",
            self.what,
            self.done >> 20,
            self.total >> 20,
            rate / f64::from(1u32 << 20),
            left_bytes / rate.max(1.0)
        )
    }

    /// `n` more bytes are done.
    pub fn add(&mut self, n: u64) {
        self.done = self.done.saturating_add(n);
        match &self.bar {
            Some(b) => b.set_position(self.done),
            None => {
                if self.last.elapsed() >= LINE_EVERY {
                    self.last = Instant::now();
                    eprintln!("{}", self.line());
                }
            }
        }
    }

    /// The work is done: the bar is cleared. Returns how long it took.
    pub fn finish(self) -> Duration {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        self.start.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plain_line_says_how_far_and_how_fast() {
        let mut p = Progress::with_bar("initial copy to 10.0.0.2:7000".into(), 64 << 20, None);
        p.add(16 << 20);
        let l = p.line();
        assert!(
            l.starts_with("mirrorvm: initial copy to 10.0.0.2:7000: 16 of 64 MiB, "),
            "{l}"
        );
        assert!(
            l.contains(" MiB/s, about ") && l.ends_with(" s left"),
            "{l}"
        );
        assert!(p.finish() < Duration::from_secs(60));
    }

    #[test]
    fn a_bar_follows_the_work_and_is_cleared() {
        let bar = ProgressBar::with_draw_target(Some(100), ProgressDrawTarget::hidden());
        let mut p = Progress::with_bar("pre-copy to d".into(), 100, Some(bar.clone()));
        p.add(40);
        assert_eq!(bar.position(), 40);
        assert_eq!(bar.message(), "pre-copy to d");
        p.finish();
        assert!(bar.is_finished());
    }
}
