//! The demo's verdict, computed from raw evidence only: the console transcripts of
//! both hosts, the standby's stderr and `--metrics` lines, and how the standby
//! ended. Never from mirrorvm's own view of whether it worked. Pure functions, so each
//! rule is tested on hand-written transcripts.

use std::fmt;

/// The standby's failover line, parsed: `failover: primary lost (REASON) at
/// checkpoint N: detect D ms, fence F ms, …, total T ms`.
#[derive(Debug, Clone, PartialEq)]
pub struct Failover {
    /// Why the standby declared the primary dead.
    pub reason: String,
    /// The checkpoint the guest resumed from.
    pub checkpoint: u64,
    /// Each step and its milliseconds, in the order printed (total excluded).
    pub steps: Vec<(String, f64)>,
    /// The whole failover, milliseconds.
    pub total_ms: f64,
}

const FAILOVER_START: &str = "failover: primary lost (";
const FAILOVER_AT: &str = ") at checkpoint ";

/// Parses the failover line (with or without the `mirrorvm: ` prefix); `None` if
/// `line` is not one. The reason may itself hold parentheses.
pub fn parse_failover(line: &str) -> Option<Failover> {
    let rest = &line[line.find(FAILOVER_START)? + FAILOVER_START.len()..];
    let close = rest.rfind(FAILOVER_AT)?;
    let reason = rest[..close].to_owned();
    let (n, times) = rest[close + FAILOVER_AT.len()..].split_once(':')?;
    let checkpoint = n.trim().parse().ok()?;
    let mut steps = Vec::new();
    let mut total_ms = None;
    for part in times.split(',') {
        let (name, value) = part
            .trim()
            .strip_suffix("ms")?
            .trim_end()
            .rsplit_once(' ')?;
        let value: f64 = value.parse().ok()?;
        if name == "total" {
            total_ms = Some(value);
        } else {
            steps.push((name.to_owned(), value));
        }
    }
    Some(Failover {
        reason,
        checkpoint,
        steps,
        total_ms: total_ms?,
    })
}

/// One line of the standby's `--metrics` file: a checkpoint it applied (the
/// standby's own type, read back with serde; fields added later are ignored).
pub use crate::replication::standby::AppliedMetrics as StandbyMetric;

/// Parses the complete lines of a standby metrics file; lines that do not parse are
/// skipped (the verdict counts checkpoints, it does not police the format).
pub fn parse_standby_metrics(text: &str) -> Vec<StandbyMetric> {
    complete_lines(text)
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The lines of `text` that end in a newline (a last line without one is still being
/// written).
pub fn complete_lines(text: &str) -> impl Iterator<Item = &str> {
    let end = text.rfind('\n').map_or(0, |i| i + 1);
    text[..end].lines()
}

/// The console of the two hosts, joined where host b took over from host a.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Transcript {
    /// Complete lines host a showed (with the line that straddles the junction, if
    /// host b finished it).
    pub a: Vec<String>,
    /// Lines host b showed after it took over.
    pub b: Vec<String>,
    /// How the junction looked.
    pub junction: Junction,
}

/// What happened to a line host a had only begun to show when it died.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Junction {
    /// Host a's output ended at the end of a line.
    #[default]
    Clean,
    /// Host b went on from the middle of the line, where host a stopped.
    Continued,
    /// Host b showed the line again from its start: the part host a showed is
    /// repeated.
    Restarted,
}

impl Transcript {
    /// Joins what host a showed before it died and what host b showed after taking
    /// over. Carriage returns are dropped.
    pub fn join(a: &str, b: &str) -> Transcript {
        let a = a.replace('\r', "");
        let b = b.replace('\r', "");
        let (complete, partial) = match a.rfind('\n') {
            Some(i) => (&a[..i], &a[i + 1..]),
            None => ("", a.as_str()),
        };
        let mut a_lines: Vec<String> = complete.lines().map(str::to_owned).collect();
        if complete.is_empty() && a.starts_with('\n') {
            a_lines.push(String::new());
        }
        let mut b_lines: Vec<String> = b.lines().map(str::to_owned).collect();
        let junction = if partial.is_empty() {
            Junction::Clean
        } else if b.starts_with(partial) {
            Junction::Restarted
        } else {
            let rest = if b_lines.is_empty() {
                String::new()
            } else {
                b_lines.remove(0)
            };
            a_lines.push(format!("{partial}{rest}"));
            Junction::Continued
        };
        Transcript {
            a: a_lines,
            b: b_lines,
            junction,
        }
    }

    /// How many lines host b showed again at the junction: the longest run of host
    /// a's last lines that host b's first lines repeat (plus one for a restarted
    /// partial line).
    pub fn repeated_at_junction(&self) -> usize {
        let max = self.a.len().min(self.b.len());
        let k = (1..=max)
            .rev()
            .find(|&k| self.a[self.a.len() - k..] == self.b[..k])
            .unwrap_or(0);
        k + usize::from(self.junction == Junction::Restarted)
    }

    /// Every line, host a's then host b's.
    pub fn lines(&self) -> impl Iterator<Item = &str> {
        self.a.iter().chain(&self.b).map(String::as_str)
    }
}

/// The two engines of the test guest's `mix` workload, each printing a progress line
/// per second with its own seconds count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// `mix: memory: S s, P pages dirtied` (cpu 1, dirtying and checking pages).
    Memory,
    /// `mix: disk: S s, R rounds of N records checked and rewritten` (cpu 0).
    Disk,
}

impl Engine {
    /// Both engines.
    pub const ALL: [Engine; 2] = [Engine::Memory, Engine::Disk];

    fn marker(self) -> &'static str {
        match self {
            Engine::Memory => "mix: memory: ",
            Engine::Disk => "mix: disk: ",
        }
    }

    /// `"memory"` or `"disk"`.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Memory => "memory",
            Engine::Disk => "disk",
        }
    }
}

/// The seconds counts of `engine`'s progress lines in `lines`, in order. A line may
/// hold more than one (a garbled junction): each `MARKER S s,` counts.
pub fn progress_seconds<'a>(engine: Engine, lines: impl IntoIterator<Item = &'a str>) -> Vec<u64> {
    let marker = engine.marker();
    let mut out = Vec::new();
    for line in lines {
        let mut rest = line;
        while let Some(i) = rest.find(marker) {
            rest = &rest[i + marker.len()..];
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits > 0 && rest[digits..].starts_with(" s,") {
                if let Ok(s) = rest[..digits].parse() {
                    out.push(s);
                }
            }
        }
    }
    out
}

/// One engine's progress seconds across the failover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Continuity {
    /// The engine.
    pub engine: Engine,
    /// Seconds host a showed.
    pub on_a: Vec<u64>,
    /// Seconds host b showed after taking over.
    pub on_b: Vec<u64>,
    /// Seconds between 1 and the last one shown that neither host showed.
    pub lost: Vec<u64>,
    /// Progress lines shown more than once (extra copies).
    pub repeated: usize,
    /// Whether a second first appeared after a later one (shown out of order; a
    /// second shown again is counted in `repeated` instead).
    pub out_of_order: bool,
}

impl Continuity {
    /// Checks `engine`'s progress seconds over the joined transcript.
    pub fn of(engine: Engine, t: &Transcript) -> Continuity {
        let on_a = progress_seconds(engine, t.a.iter().map(String::as_str));
        let on_b = progress_seconds(engine, t.b.iter().map(String::as_str));
        let all: Vec<u64> = on_a.iter().chain(&on_b).copied().collect();
        let mut seen = std::collections::BTreeSet::new();
        let mut repeated = 0;
        let mut out_of_order = false;
        let mut high = 0;
        for &s in &all {
            if !seen.insert(s) {
                repeated += 1;
            } else if s < high {
                out_of_order = true;
            }
            high = high.max(s);
        }
        let lost = (1..=high).filter(|s| !seen.contains(s)).collect();
        Continuity {
            engine,
            on_a,
            on_b,
            lost,
            repeated,
            out_of_order,
        }
    }

    /// Seconds host b showed beyond the last one host a showed: the workload going on
    /// after the failover.
    pub fn after_failover(&self) -> usize {
        let last_a = self.on_a.iter().copied().max().unwrap_or(0);
        self.on_b.iter().filter(|&&s| s > last_a).count()
    }
}

/// What the guest itself said about its checks.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GuestReport {
    /// Lines with `FAILED` (a lost page, a disk record that disagrees).
    pub failed: Vec<String>,
    /// The test guest's CPU exception report, if any.
    pub exception: Option<String>,
    /// The workload's final line (`mix: … all verified`).
    pub verified: Option<String>,
    /// The test guest's exit line (`testguest: exit N (…)`).
    pub exit: Option<String>,
}

impl GuestReport {
    /// Reads the guest's own verdicts from its console lines.
    pub fn of<'a>(lines: impl IntoIterator<Item = &'a str>) -> GuestReport {
        let mut r = GuestReport::default();
        for l in lines {
            if l.contains("FAILED") {
                r.failed.push(l.to_owned());
            }
            if l.contains("*** testguest: unexpected CPU exception") && r.exception.is_none() {
                r.exception = Some(l.to_owned());
            }
            if l.starts_with("mix: ") && l.ends_with("all verified") {
                r.verified = Some(l.to_owned());
            }
            if l.starts_with("testguest: exit ") {
                r.exit = Some(l.to_owned());
            }
        }
        r
    }
}

/// What the guest was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Workload {
    /// The test guest's `mix seconds=N` (0: forever, stopped by the demo).
    Mix {
        /// The `seconds=` given.
        seconds: u64,
    },
    /// A Linux kernel booting from an ext4 root disk, killed mid-boot.
    Linux,
}

/// Marker of the Linux root mount, the success of the Linux demo.
pub const LINUX_MOUNTED: &str = "VFS: Mounted root";
/// Marker of the Linux banner: it must appear once, or the standby booted afresh.
pub const LINUX_BANNER: &str = "Linux version ";

/// Everything the verdict is computed from.
#[derive(Debug, Clone, Default)]
pub struct Evidence {
    /// Host a's console file.
    pub console_a: String,
    /// Host b's console file.
    pub console_b: String,
    /// The standby's stderr lines.
    pub standby_stderr: Vec<String>,
    /// The standby's `--metrics` lines.
    pub standby_metrics: Vec<StandbyMetric>,
    /// The standby's exit code (`None`: killed by a signal the demo did not send, or
    /// not reaped).
    pub standby_exit: Option<i32>,
    /// Whether the demo had to stop the standby (SIGTERM) rather than the guest ending
    /// the run itself.
    pub standby_stopped: bool,
}

/// The demo's verdict.
#[derive(Debug, Clone)]
pub struct Verdict {
    /// What the guest ran.
    pub workload: Workload,
    /// The standby's failover line, parsed.
    pub failover: Option<Failover>,
    /// Checkpoints the standby applied (lines of its metrics file).
    pub mirrored: usize,
    /// The last checkpoint it applied.
    pub last_mirrored: Option<u64>,
    /// The joined console.
    pub transcript: Transcript,
    /// Per engine (mix only).
    pub continuity: Vec<Continuity>,
    /// The guest's own checks.
    pub guest: GuestReport,
    /// The standby's exit code.
    pub standby_exit: Option<i32>,
    /// Each rule that did not hold, as a sentence. Empty: passed.
    pub problems: Vec<String>,
}

impl Verdict {
    /// Computes the verdict for `workload` from `e`.
    pub fn judge(workload: Workload, e: &Evidence) -> Verdict {
        let mut problems = Vec::new();
        let failover = e.standby_stderr.iter().find_map(|l| parse_failover(l));
        if failover.is_none() {
            problems.push("host-b printed no failover line: it never took over".to_owned());
        }
        let mirrored = e.standby_metrics.len();
        if mirrored == 0 {
            problems.push("host-b's metrics show no checkpoint applied".to_owned());
        }
        let transcript = Transcript::join(&e.console_a, &e.console_b);
        let guest = GuestReport::of(transcript.lines());
        for l in &guest.failed {
            problems.push(format!("the guest reported a failure: {l:?}"));
        }
        if let Some(x) = &guest.exception {
            problems.push(format!("the guest crashed: {x:?}"));
        }
        let mut continuity = Vec::new();
        match workload {
            Workload::Mix { seconds } => {
                for engine in Engine::ALL {
                    let c = Continuity::of(engine, &transcript);
                    if !c.lost.is_empty() {
                        problems.push(format!(
                            "{} progress lines lost: second(s) {:?} were never shown",
                            engine.name(),
                            c.lost
                        ));
                    }
                    if c.out_of_order {
                        problems.push(format!("{} progress lines went backwards", engine.name()));
                    }
                    if c.after_failover() == 0 {
                        problems.push(format!(
                            "the {} engine's progress did not go on after the failover",
                            engine.name()
                        ));
                    }
                    continuity.push(c);
                }
                if seconds > 0 {
                    if guest.verified.is_none() {
                        problems.push(
                            "the guest never printed its final `mix: … all verified` line"
                                .to_owned(),
                        );
                    }
                    if e.standby_exit != Some(0) {
                        problems.push(format!(
                            "host-b did not end with the guest's status 0 (it ended {})",
                            show_exit(e.standby_exit, e.standby_stopped)
                        ));
                    }
                } else if !e.standby_stopped || !matches!(e.standby_exit, Some(0 | 143)) {
                    problems.push(format!(
                        "host-b did not end cleanly when stopped (it ended {})",
                        show_exit(e.standby_exit, e.standby_stopped)
                    ));
                }
            }
            Workload::Linux => {
                let on_a = |m| transcript.a.iter().any(|l| l.contains(m));
                let on_b = |m| transcript.b.iter().any(|l| l.contains(m));
                if on_a(LINUX_MOUNTED) {
                    problems.push(format!(
                        "host-a had already reached `{LINUX_MOUNTED}` before it was killed: choose a smaller --kill-after"
                    ));
                } else if !on_b(LINUX_MOUNTED) {
                    problems.push(format!("host-b's console never reached `{LINUX_MOUNTED}`"));
                }
                let banners = transcript
                    .lines()
                    .filter(|l| l.contains(LINUX_BANNER))
                    .count();
                if banners != 1 {
                    problems.push(format!(
                        "the kernel banner appears {banners} times (1 expected: host-b must continue the boot, not start another)"
                    ));
                }
            }
        }
        Verdict {
            workload,
            failover,
            mirrored,
            last_mirrored: e.standby_metrics.iter().map(|m| m.epoch).max(),
            transcript,
            continuity,
            guest,
            standby_exit: e.standby_exit,
            problems,
        }
    }

    /// Whether every rule held.
    pub fn passed(&self) -> bool {
        self.problems.is_empty()
    }
}

fn show_exit(code: Option<i32>, stopped: bool) -> String {
    let how = match code {
        Some(c) => format!("with status {c}"),
        None => "without an exit status".to_owned(),
    };
    if stopped {
        format!("{how}, after the demo stopped it")
    } else {
        how
    }
}

/// `a–b` for a run of seconds, `none` for none.
fn span(v: &[u64]) -> String {
    match (v.iter().min(), v.iter().max()) {
        (Some(lo), Some(hi)) if lo == hi => format!("{lo}"),
        (Some(lo), Some(hi)) => format!("{lo}–{hi}"),
        _ => "none".to_owned(),
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "verdict: {}",
            if self.passed() { "PASSED" } else { "FAILED" }
        )?;
        match &self.failover {
            Some(fo) => {
                writeln!(
                    f,
                    "  failover   host-b took over from checkpoint {} (primary lost: {})",
                    fo.checkpoint, fo.reason
                )?;
                let steps: Vec<String> = fo
                    .steps
                    .iter()
                    .map(|(name, ms)| format!("{name} {ms} ms"))
                    .collect();
                writeln!(
                    f,
                    "             {} = {} ms in all",
                    steps.join(" + "),
                    fo.total_ms
                )?;
            }
            None => writeln!(f, "  failover   none seen")?,
        }
        writeln!(
            f,
            "  mirrored   {} checkpoint(s) applied on host-b{}",
            self.mirrored,
            self.last_mirrored
                .map(|e| format!(", the last one {e}"))
                .unwrap_or_default()
        )?;
        writeln!(
            f,
            "  console    {} line(s) on host-a, {} on host-b after the takeover; {} repeated at the junction{}",
            self.transcript.a.len(),
            self.transcript.b.len(),
            self.transcript.repeated_at_junction(),
            match self.transcript.junction {
                Junction::Clean => "",
                Junction::Continued => " (host-b finished the line host-a had begun)",
                Junction::Restarted => " (host-b showed host-a's unfinished line again)",
            }
        )?;
        for c in &self.continuity {
            writeln!(
                f,
                "             {:<6} seconds {} on host-a, {} on host-b: {} lost, {} repeated",
                c.engine.name(),
                span(&c.on_a),
                span(&c.on_b),
                c.lost.len(),
                c.repeated
            )?;
        }
        let checks = match self.workload {
            Workload::Mix { .. } => {
                let mut s = if self.guest.failed.is_empty() {
                    "no FAILED line".to_owned()
                } else {
                    format!("{} FAILED line(s)", self.guest.failed.len())
                };
                if let Some(v) = &self.guest.verified {
                    s.push_str(&format!("; {v:?}"));
                }
                s
            }
            Workload::Linux => {
                let mounted = self.transcript.b.iter().any(|l| l.contains(LINUX_MOUNTED));
                format!(
                    "root file system {}on host-b",
                    if mounted { "mounted " } else { "NOT mounted " }
                )
            }
        };
        writeln!(f, "  guest      {checks}")?;
        if let Some(code) = self.standby_exit {
            writeln!(f, "  host-b     exited with status {code}")?;
        }
        for p in &self.problems {
            writeln!(f, "  ✗ {p}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAILOVER: &str = "mirrorvm: failover: primary lost (connection closed (os error 104)) at checkpoint 212: detect 103 ms, fence 0.4 ms, apply 1 ms, restore 2 ms, resume 0 ms, total 106.4 ms";

    #[test]
    fn failover_line_parses_with_parentheses_in_the_reason() {
        let f = parse_failover(FAILOVER).expect("parses");
        assert_eq!(f.reason, "connection closed (os error 104)");
        assert_eq!(f.checkpoint, 212);
        assert_eq!(
            f.steps,
            vec![
                ("detect".to_owned(), 103.0),
                ("fence".to_owned(), 0.4),
                ("apply".to_owned(), 1.0),
                ("restore".to_owned(), 2.0),
                ("resume".to_owned(), 0.0),
            ]
        );
        assert!((f.total_ms - 106.4).abs() < 1e-9);
        // Without the prefix too.
        assert_eq!(
            parse_failover(FAILOVER.strip_prefix("mirrorvm: ").expect("prefix")),
            Some(f)
        );
    }

    #[test]
    fn lines_that_are_not_a_whole_failover_line_do_not_parse() {
        for l in [
            "mirrorvm: standby: initial copy complete at checkpoint 3",
            "failover: primary lost (x) at checkpoint : detect 1 ms, total 1 ms",
            "failover: primary lost (x) at checkpoint 5: detect 1 ms",
            "failover: primary lost (x) at checkpoint 5: detect one ms, total 1 ms",
            "failover: primary lost (x) at checkpoint 5: detect 1 s, total 1 ms",
            "failover: primary lost (x at checkpoint 5: total 1 ms",
        ] {
            assert_eq!(parse_failover(l), None, "{l}");
        }
    }

    #[test]
    fn standby_metrics_parse_leniently() {
        let text = "{\"epoch\":1,\"bytes\":10,\"pages\":2,\"apply_us\":5,\"received_at_ms\":7}\n\
                    {\"epoch\":2,\"bytes\":3,\"pages\":0,\"apply_us\":1,\"received_at_ms\":9,\"new_field\":true}\n\
                    not json\n\
                    {\"epoch\":3,\"by";
        let m = parse_standby_metrics(text);
        assert_eq!(m.len(), 2);
        assert_eq!(
            m[0],
            StandbyMetric {
                epoch: 1,
                bytes: 10,
                pages: 2,
                apply_us: 5,
                received_at_ms: 7
            }
        );
        assert_eq!(m[1].epoch, 2);
        assert_eq!(m[1].pages, 0);
    }

    fn mem(s: u64) -> String {
        format!("mix: memory: {s} s, {} pages dirtied\n", s * 1000)
    }
    fn disk(s: u64) -> String {
        format!(
            "mix: disk: {s} s, {} rounds of 16 records checked and rewritten\n",
            s * 7
        )
    }
    fn run(range: std::ops::RangeInclusive<u64>) -> String {
        range.map(|s| mem(s) + &disk(s)).collect()
    }

    const BANNER: &str =
        "mix: cpu 1 dirties 20 pages/ms over 16 MiB; cpu 0 rewrites 16 disk records; 10 s\n";
    const END: &str =
        "mix: 70 disk rounds and 10000 pages dirtied, all verified\ntestguest: exit 0 (success)\n";

    fn evidence(a: String, b: String) -> Evidence {
        Evidence {
            console_a: a,
            console_b: b,
            standby_stderr: vec![
                "mirrorvm: standby: listening on 10.77.0.2:7370".to_owned(),
                FAILOVER.to_owned(),
            ],
            standby_metrics: (1..=212)
                .map(|epoch| StandbyMetric {
                    epoch,
                    ..Default::default()
                })
                .collect(),
            standby_exit: Some(0),
            standby_stopped: false,
        }
    }

    #[test]
    fn a_seamless_failover_passes() {
        let e = evidence(
            format!("{BANNER}{}", run(1..=5)),
            format!("{}{END}", run(6..=10)),
        );
        let v = Verdict::judge(Workload::Mix { seconds: 10 }, &e);
        assert!(v.passed(), "{v}");
        assert_eq!(v.mirrored, 212);
        assert_eq!(v.last_mirrored, Some(212));
        assert_eq!(v.transcript.repeated_at_junction(), 0);
        for c in &v.continuity {
            assert_eq!(c.on_a, (1..=5).collect::<Vec<_>>());
            assert_eq!(c.on_b, (6..=10).collect::<Vec<_>>());
            assert!(c.lost.is_empty() && c.repeated == 0 && !c.out_of_order);
            assert_eq!(c.after_failover(), 5);
        }
        let shown = v.to_string();
        assert!(shown.starts_with("verdict: PASSED"), "{shown}");
        assert!(shown.contains("from checkpoint 212"), "{shown}");
        assert!(
            shown.contains("memory seconds 1–5 on host-a, 6–10 on host-b: 0 lost, 0 repeated"),
            "{shown}"
        );
    }

    #[test]
    fn a_line_split_at_the_kill_is_joined_not_lost() {
        // Host a died in the middle of "mix: disk: 5 s, …"; host b finishes it.
        let full = format!("{BANNER}{}", run(1..=7));
        let cut = full.find("mix: disk: 5 s").expect("line") + 8;
        let e = evidence(full[..cut].to_owned(), format!("{}{END}", &full[cut..]));
        let v = Verdict::judge(Workload::Mix { seconds: 7 }, &e);
        assert_eq!(v.transcript.junction, Junction::Continued);
        assert!(v.passed(), "{v}");
        assert_eq!(v.continuity[1].on_a.last(), Some(&5));
    }

    #[test]
    fn lost_and_repeated_lines_are_counted() {
        // Host b starts one second too late for memory (4 is lost) and repeats
        // disk 3 and a whole line pair.
        let a = format!("{BANNER}{}", run(1..=3));
        let b = format!("{}{}{END}", disk(3), run(5..=8)) + &mem(3);
        let v = Verdict::judge(Workload::Mix { seconds: 8 }, &evidence(a, b));
        assert!(!v.passed());
        let m = &v.continuity[0];
        assert_eq!(m.lost, vec![4]);
        assert_eq!(m.repeated, 1, "memory 3 twice");
        assert!(!m.out_of_order, "a repeat is not out of order");
        let d = &v.continuity[1];
        assert_eq!(d.lost, vec![4]);
        assert_eq!(d.repeated, 1);
        assert!(
            v.problems
                .iter()
                .any(|p| p.contains("memory progress lines lost: second(s) [4]")),
            "{v}"
        );
        assert!(v.to_string().contains("1 lost, 1 repeated"));
    }

    #[test]
    fn repeated_lines_at_the_junction_are_counted() {
        let a = format!("{BANNER}{}", run(1..=4));
        let b = format!("{}{}{END}", run(4..=4), run(5..=9));
        let v = Verdict::judge(Workload::Mix { seconds: 9 }, &evidence(a, b));
        assert_eq!(v.transcript.repeated_at_junction(), 2);
        assert_eq!(v.continuity[0].repeated, 1);
        // Repeats are counted, not a failure.
        assert!(v.passed(), "{v}");

        // A restarted unfinished line counts once more.
        let full = run(1..=4);
        let cut = full.len() - 5;
        let b = format!("{}{}{END}", disk(4), run(5..=9));
        let t = Transcript::join(&full[..cut], &b);
        assert_eq!(t.junction, Junction::Restarted);
        assert_eq!(t.repeated_at_junction(), 1);
    }

    #[test]
    fn guest_failures_and_missing_takeover_fail_the_verdict() {
        let mut e = evidence(
            format!("{BANNER}{}", run(1..=3)),
            format!("{}mix: FAILED: memory: 3 page(s) lost their last write\ntestguest: exit 1 (failure)\n", run(4..=5)),
        );
        e.standby_exit = Some(1);
        e.standby_stderr.retain(|l| !l.contains("failover"));
        let v = Verdict::judge(Workload::Mix { seconds: 10 }, &e);
        let p = v.problems.join("\n");
        assert!(p.contains("no failover line"), "{p}");
        assert!(p.contains("the guest reported a failure"), "{p}");
        assert!(p.contains("final `mix: … all verified`"), "{p}");
        assert!(p.contains("status 1"), "{p}");
        assert!(v.to_string().starts_with("verdict: FAILED"));
    }

    #[test]
    fn progress_must_go_on_after_the_failover() {
        let e = evidence(format!("{BANNER}{}", run(1..=5)), String::new());
        let v = Verdict::judge(
            Workload::Mix { seconds: 0 },
            &Evidence {
                standby_stopped: true,
                standby_exit: Some(143),
                ..e
            },
        );
        let p = v.problems.join("\n");
        assert!(p.contains("memory engine's progress did not go on"), "{p}");
        assert!(p.contains("disk engine's progress did not go on"), "{p}");
    }

    #[test]
    fn a_forever_run_stopped_by_the_demo_passes_without_a_final_line() {
        let mut e = evidence(format!("{BANNER}{}", run(1..=5)), run(6..=9));
        e.standby_stopped = true;
        e.standby_exit = Some(143);
        let v = Verdict::judge(Workload::Mix { seconds: 0 }, &e);
        assert!(v.passed(), "{v}");
    }

    #[test]
    fn linux_must_mount_its_root_on_host_b_without_booting_twice() {
        let a = "[    0.000000] Linux version 6.1.0 (gcc)\n[    1.0] virtio_blk virtio0: [vda]\n";
        let b = "[    9.0] EXT4-fs (vda): mounted filesystem\n[    9.1] VFS: Mounted root (ext4 filesystem) on device 254:0.\n";
        let v = Verdict::judge(Workload::Linux, &evidence(a.to_owned(), b.to_owned()));
        assert!(v.passed(), "{v}");
        assert!(v.to_string().contains("root file system mounted on host-b"));

        let rebooted = format!("{a}{b}");
        let v = Verdict::judge(Workload::Linux, &evidence(a.to_owned(), rebooted));
        assert!(
            v.problems
                .iter()
                .any(|p| p.contains("banner appears 2 times")),
            "{v}"
        );

        let v = Verdict::judge(Workload::Linux, &evidence(format!("{a}{b}"), String::new()));
        assert!(
            v.problems
                .iter()
                .any(|p| p.contains("smaller --kill-after")),
            "{v}"
        );

        let v = Verdict::judge(Workload::Linux, &evidence(a.to_owned(), String::new()));
        assert!(
            v.problems.iter().any(|p| p.contains("never reached")),
            "{v}"
        );
    }

    #[test]
    fn progress_seconds_are_found_even_in_a_garbled_line() {
        let lines = [
            "mix: memory: 5mix: memory: 5 s, 1 pages dirtied",
            "mix: memory: x s,",
            "mix: disk: 2 s, 3 rounds",
        ];
        assert_eq!(progress_seconds(Engine::Memory, lines), vec![5]);
        assert_eq!(progress_seconds(Engine::Disk, lines), vec![2]);
    }
}
