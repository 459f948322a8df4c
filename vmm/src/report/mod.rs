//! `mirrorvm report METRICS.jsonl -o report.svg`: a picture of a run drawn from its
//! `--metrics` file with `plotters` (SVG backend).
//!
//! A primary's file gives five panels: the pause of each checkpoint over time with
//! its steps stacked (kick, harvest, copy, save, the rest), dirty pages, bytes per
//! checkpoint (at the sink, and of the disk regions), the ack lag (end of pause to
//! complete, and the export's last attempt), and a histogram of the pauses. A
//! standby's file gives pages, bytes received and the apply time of each checkpoint,
//! and a histogram of the apply times. Markers show where a primary lost its sink
//! and where a standby took over. Long runs are thinned to at most
//! [`MAX_POINTS`] points per series, each the largest of its slice of time, so
//! spikes stay visible. `read.rs` reads the file.

mod read;

use std::path::{Path, PathBuf};

use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

pub use read::{parse, read, Marker, Run, MAX_FILE};

/// The most points a series is drawn with.
pub const MAX_POINTS: usize = 1500;

const WIDTH: u32 = 1200;
const PANEL: u32 = 270;
const HEAD: u32 = 90;
const FONT: &str = "sans-serif";

/// Failures of `report`.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The metrics file cannot be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The metrics file is larger than `report` reads.
    #[error("{} is {len} bytes, more than the {MAX_FILE} a report reads", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        len: u64,
    },
    /// A line is not what it claims to be.
    #[error("{} line {line}: not {what}", path.display())]
    Line {
        /// The file.
        path: PathBuf,
        /// Its 1-based line number.
        line: usize,
        /// What it looked like, or had to be.
        what: &'static str,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// A line is JSON but not an object.
    #[error("{} line {line}: not a JSON object", path.display())]
    NotObject {
        /// The file.
        path: PathBuf,
        /// Its 1-based line number.
        line: usize,
    },
    /// The file holds no checkpoint to draw.
    #[error("{} holds no checkpoint record (is it a --metrics file of mirrorvm run, restore or standby?)", path.display())]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// Drawing failed.
    #[error("cannot draw the report: {0}")]
    Draw(String),
    /// The picture cannot be written.
    #[error("cannot write {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

fn draw_err<E: std::fmt::Debug>(e: E) -> ReportError {
    ReportError::Draw(format!("{e:?}"))
}

/// What was drawn, for the command's one-line summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Checkpoints drawn.
    pub checkpoints: usize,
    /// Markers drawn.
    pub markers: usize,
    /// Lines of unknown kinds, left out.
    pub unknown: usize,
}

/// Reads the metrics file `input` and writes its picture to `output` as SVG.
pub fn write_report(input: &Path, output: &Path) -> Result<Summary, ReportError> {
    let run = read(input)?;
    let svg = render(&run, input)?;
    std::fs::write(output, svg).map_err(|source| ReportError::Write {
        path: output.to_path_buf(),
        source,
    })?;
    Ok(Summary {
        checkpoints: run.checkpoints.len() + run.applied.len(),
        markers: run.markers.len(),
        unknown: run.unknown,
    })
}

#[allow(clippy::cast_precision_loss)]
fn f(n: u64) -> f64 {
    n as f64
}

/// The value at quantile `q` of `v` (sorted here), 0 if empty.
fn quantile(v: &[f64], q: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return 0.0;
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let i = ((s.len() - 1) as f64 * q).round() as usize;
    s[i.min(s.len() - 1)]
}

/// The indices of at most [`MAX_POINTS`] points, each the one with the largest
/// `key` in its slice of `xs` (which ascend).
fn thin(xs: &[f64], key: impl Fn(usize) -> f64) -> Vec<usize> {
    if xs.len() <= MAX_POINTS {
        return (0..xs.len()).collect();
    }
    let (lo, hi) = (xs[0], xs[xs.len() - 1]);
    let width = ((hi - lo) / f(MAX_POINTS as u64)).max(f64::MIN_POSITIVE);
    let mut out: Vec<usize> = Vec::new();
    let mut bin = None;
    for (i, x) in xs.iter().enumerate() {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let b = ((x - lo) / width) as u64;
        match (bin, out.last_mut()) {
            (Some(cur), Some(last)) if cur == b => {
                if key(i) > key(*last) {
                    *last = i;
                }
            }
            _ => {
                bin = Some(b);
                out.push(i);
            }
        }
    }
    out
}

/// Axis labels with as many decimals as a scale up to `top` needs.
fn label(top: f64) -> impl Fn(&f64) -> String {
    let decimals = if top >= 100.0 {
        0
    } else if top >= 1.0 {
        1
    } else {
        3
    };
    move |v| format!("{v:.decimals$}")
}

/// A range that plotters can draw: never empty, a little room above.
fn span(lo: f64, hi: f64) -> std::ops::Range<f64> {
    let hi = if hi.is_finite() { hi } else { lo + 1.0 };
    if hi <= lo {
        lo..lo + 1.0
    } else {
        lo..hi + (hi - lo) * 0.08
    }
}

/// The x axis: seconds on the file's clock, or checkpoint numbers for a file
/// written before the clock existed.
struct Axis {
    xs: Vec<f64>,
    desc: &'static str,
    marker_x: Vec<(f64, &'static str)>,
}

impl Axis {
    /// The range shown: every checkpoint and every marker.
    fn range(&self) -> std::ops::Range<f64> {
        let all = || self.xs.iter().chain(self.marker_x.iter().map(|(x, _)| x));
        let lo = all().copied().fold(f64::INFINITY, f64::min);
        let hi = all().copied().fold(f64::NEG_INFINITY, f64::max);
        if lo.is_finite() {
            span(lo, hi)
        } else {
            span(0.0, 1.0)
        }
    }
}

fn axis_of(times_ms: &[u64], epochs: &[u64], markers: &[Marker]) -> Axis {
    let clock = times_ms.iter().any(|t| *t > 0);
    if clock {
        Axis {
            xs: times_ms.iter().map(|t| f(*t) / 1000.0).collect(),
            desc: "time (s)",
            marker_x: markers
                .iter()
                .map(|m| (f(m.at_ms) / 1000.0, m.short))
                .collect(),
        }
    } else {
        Axis {
            xs: epochs.iter().map(|e| f(*e)).collect(),
            desc: "checkpoint",
            marker_x: markers.iter().map(|m| (f(m.epoch), m.short)).collect(),
        }
    }
}

/// A series of one panel: its name, colour and values (one per checkpoint).
struct Series<'a> {
    name: &'a str,
    color: RGBColor,
    values: Vec<f64>,
}

const BLUE_: RGBColor = RGBColor(31, 119, 180);
const ORANGE: RGBColor = RGBColor(255, 127, 14);
const GREEN_: RGBColor = RGBColor(44, 160, 44);
const RED_: RGBColor = RGBColor(214, 39, 40);
const PURPLE: RGBColor = RGBColor(148, 103, 189);
const GREY: RGBColor = RGBColor(127, 127, 127);

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

type Chart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// How the y axis of a chart is labelled.
#[derive(Clone, Copy)]
enum YLabels {
    /// As many decimals as the scale needs.
    Scale,
    /// Whole numbers, at most this many labels.
    Counts(usize),
}

/// A chart of one panel, its axes drawn: `title` above, `x` and `y` described and
/// labelled with as many decimals as their scales need.
fn chart<'a, 'b>(
    area: &'a Area<'b>,
    title: &str,
    (x, x_desc): (std::ops::Range<f64>, &str),
    (y, y_desc): (std::ops::Range<f64>, &str),
    y_labels: YLabels,
) -> Result<Chart<'a, 'b>, ReportError> {
    let (y_fmt, y_labels) = match y_labels {
        YLabels::Scale => (label(y.end), 10),
        YLabels::Counts(n) => (label(100.0), n),
    };
    let x_fmt = label(x.end - x.start);
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FONT, 18))
        .margin(8)
        .x_label_area_size(36)
        .y_label_area_size(80)
        .build_cartesian_2d(x, y)
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .y_labels(y_labels)
        .x_label_formatter(&x_fmt)
        .y_label_formatter(&y_fmt)
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(draw_err)?;
    Ok(chart)
}

/// The legend, in the upper right corner.
fn legend<'a, 'b: 'a>(chart: &mut Chart<'a, 'b>) -> Result<(), ReportError> {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .label_font((FONT, 13))
        .draw()
        .map_err(draw_err)
}

/// Draws the markers as vertical lines over a chart's whole height, each labelled
/// at its foot on its left (the caption says more).
fn draw_markers<'a, 'b: 'a>(
    chart: &mut Chart<'a, 'b>,
    axis: &Axis,
    top: f64,
) -> Result<(), ReportError> {
    for (x, what) in &axis.marker_x {
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(*x, 0.0), (*x, top)],
                RED_.stroke_width(2),
            )))
            .map_err(draw_err)?;
        let style = (FONT, 13)
            .into_font()
            .color(&RED_)
            .pos(Pos::new(HPos::Right, VPos::Bottom));
        chart
            .draw_series(std::iter::once(Text::new(
                format!("{what} "),
                (*x, top * 0.04),
                style,
            )))
            .map_err(draw_err)?;
    }
    Ok(())
}

/// One time panel: lines, or (`stacked`) areas each drawn from zero, the last one
/// on top, so each band shows its own series.
fn time_panel(
    area: &Area<'_>,
    title: &str,
    unit: &str,
    axis: &Axis,
    series: &[Series<'_>],
    stacked: bool,
    y_max: Option<f64>,
) -> Result<(), ReportError> {
    let x = axis.range();
    let top_of = |s: &Series<'_>| s.values.iter().copied().fold(0.0, f64::max);
    let top = y_max.unwrap_or_else(|| series.iter().map(top_of).fold(0.0, f64::max));
    let y = span(0.0, top);
    let y_top = y.end;
    let mut chart = chart(area, title, (x, axis.desc), (y, unit), YLabels::Scale)?;
    for s in series {
        let keep = thin(&axis.xs, |i| s.values[i]);
        let points: Vec<(f64, f64)> = keep.iter().map(|i| (axis.xs[*i], s.values[*i])).collect();
        let color = s.color;
        if points.len() <= 100 {
            // Few points: each is shown, so a lone one is not lost.
            chart
                .draw_series(points.iter().map(|p| Circle::new(*p, 2, color.filled())))
                .map_err(draw_err)?;
        }
        let drawn = if stacked {
            chart
                .draw_series(AreaSeries::new(points, 0.0, color.filled()).border_style(color))
                .map_err(draw_err)?
        } else {
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))
                .map_err(draw_err)?
        };
        drawn
            .label(s.name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], color.filled()));
    }
    draw_markers(&mut chart, axis, y_top)?;
    legend(&mut chart)?;
    Ok(())
}

/// A histogram of `values` (in `unit`): 40 bins up to the largest value or, with
/// 200 values or more, up to the 99th percentile with the rest in one grey bar
/// beyond it; the median and the 99th percentile are marked.
fn histogram_panel(
    area: &Area<'_>,
    title: &str,
    unit: &str,
    values: &[f64],
) -> Result<(), ReportError> {
    const BINS: usize = 40;
    let p50 = quantile(values, 0.5);
    let p99 = quantile(values, 0.99);
    let max = values.iter().copied().fold(0.0, f64::max);
    let hi = if values.len() >= 200 && p99 > 0.0 {
        p99
    } else {
        max.max(1e-9)
    };
    let width = hi / f(BINS as u64);
    let mut counts = [0u64; BINS + 1];
    for v in values {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let b = if *v > hi {
            BINS
        } else {
            ((v / width) as usize).min(BINS - 1)
        };
        counts[b] += 1;
    }
    let most = counts.iter().copied().max().unwrap_or(0);
    let bars = if counts[BINS] > 0 { BINS + 1 } else { BINS };
    // A little room on the right, so a p99 at the last bar's edge stays visible.
    let x_end = width * f(bars as u64) * 1.03;
    let mut chart = chart(
        area,
        title,
        (0.0..x_end, unit),
        (span(0.0, f(most)), "checkpoints"),
        YLabels::Counts(usize::try_from(most + 1).unwrap_or(10).clamp(2, 10)),
    )?;
    chart
        .draw_series(counts.iter().take(bars).enumerate().map(|(i, c)| {
            let x0 = width * f(i as u64);
            let color = if i == BINS { GREY } else { BLUE_ };
            Rectangle::new([(x0, 0.0), (x0 + width * 0.92, f(*c))], color.filled())
        }))
        .map_err(draw_err)?
        .label(if counts[BINS] > 0 {
            format!("checkpoints ({} above p99 in the grey bar)", counts[BINS])
        } else {
            "checkpoints".to_string()
        })
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], BLUE_.filled()));
    let top = f(most) * 1.08;
    for (name, v, color) in [("p50", p50, GREEN_), ("p99", p99, RED_)] {
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(v, 0.0), (v, top)],
                color.stroke_width(2),
            )))
            .map_err(draw_err)?
            .label(format!("{name} {} {unit}", label(v)(&v)))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 14, y)], color.stroke_width(2))
            });
    }
    legend(&mut chart)?;
    Ok(())
}

/// A unit for byte counts up to `max`, and its size.
fn byte_unit(max: f64) -> (&'static str, f64) {
    if max >= f(1 << 30) {
        ("GiB", f(1 << 30))
    } else if max >= f(1 << 20) {
        ("MiB", f(1 << 20))
    } else {
        ("KiB", 1024.0)
    }
}

/// The SVG picture of `run` (read from `path`, which names it).
pub fn render(run: &Run, path: &Path) -> Result<String, ReportError> {
    if run.checkpoints.is_empty() && run.applied.is_empty() {
        return Err(ReportError::Empty {
            path: path.to_path_buf(),
        });
    }
    let primary = !run.checkpoints.is_empty();
    let panels: u32 = if primary { 5 } else { 4 };
    let mut svg = String::new();
    {
        let root =
            SVGBackend::with_string(&mut svg, (WIDTH, HEAD + panels * PANEL)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let (head, body) = root.split_vertically(HEAD);
        let rows = body.split_evenly((usize::try_from(panels).unwrap_or(5), 1));
        let name = path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        let mut notes = Vec::new();
        if run.unknown > 0 {
            notes.push(format!("{} line(s) of unknown kinds left out", run.unknown));
        }
        if run.torn_tail {
            notes.push("the last line was cut short and is left out".to_string());
        }
        let (title, caption) = if primary {
            draw_primary(run, &rows)?
        } else {
            draw_standby(run, &rows)?
        };
        head.draw_text(
            &format!("mirrorvm {title}: {name}"),
            &(FONT, 24).into_font().into(),
            (20, 14),
        )
        .map_err(draw_err)?;
        let mut line2 = caption;
        for n in notes {
            line2.push_str("; ");
            line2.push_str(&n);
        }
        head.draw_text(&line2, &(FONT, 15).into_font().into(), (20, 52))
            .map_err(draw_err)?;
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

fn draw_primary(run: &Run, rows: &[Area<'_>]) -> Result<(String, String), ReportError> {
    let c = &run.checkpoints;
    let times: Vec<u64> = c.iter().map(|m| m.at_ms).collect();
    let epochs: Vec<u64> = c.iter().map(|m| m.epoch).collect();
    let axis = axis_of(&times, &epochs, &run.markers);
    let us =
        |g: fn(&crate::epoch::EpochMetrics) -> u64| c.iter().map(|m| f(g(m))).collect::<Vec<_>>();
    // Stacked: each series is the sum of the steps up to it.
    let (kick, harvest, copy, save) = (
        us(|m| m.kick_us),
        us(|m| m.kick_us + m.harvest_us),
        us(|m| m.kick_us + m.harvest_us + m.copy_us),
        us(|m| m.kick_us + m.harvest_us + m.copy_us + m.save_us),
    );
    let pause = us(|m| {
        m.pause_us
            .max(m.kick_us + m.harvest_us + m.copy_us + m.save_us)
    });
    // A checkpoint that completes a pre-copy pauses far longer than the rest: the
    // scale follows the others, and the caption gives its figure.
    let steady: Vec<f64> = c
        .iter()
        .zip(&pause)
        .filter(|(m, _)| !m.full)
        .map(|(_, p)| *p)
        .collect();
    let full_max = c
        .iter()
        .zip(&pause)
        .filter(|(m, _)| m.full)
        .map(|(_, p)| *p)
        .fold(0.0, f64::max);
    let steady_max = steady.iter().copied().fold(0.0, f64::max);
    let off_scale = full_max > 2.0 * steady_max && !steady.is_empty();
    let shown_max = if off_scale {
        steady_max
    } else {
        steady_max.max(full_max)
    };
    // Milliseconds once pauses reach 10 ms: fewer digits to read.
    let (t_unit, t_div) = if shown_max >= 10_000.0 {
        ("ms", 1000.0)
    } else {
        ("µs", 1.0)
    };
    let scaled = |v: Vec<f64>| v.into_iter().map(|x| x / t_div).collect::<Vec<_>>();
    let (kick, harvest, copy, save) = (scaled(kick), scaled(harvest), scaled(copy), scaled(save));
    let pause = scaled(pause);
    let y_max = off_scale.then_some(steady_max / t_div);
    time_panel(
        &rows[0],
        "Pause per checkpoint, steps stacked",
        t_unit,
        &axis,
        &[
            Series {
                name: "other (drain, region swap, resume)",
                color: GREY,
                values: pause.clone(),
            },
            Series {
                name: "save",
                color: PURPLE,
                values: save,
            },
            Series {
                name: "copy",
                color: GREEN_,
                values: copy,
            },
            Series {
                name: "harvest",
                color: ORANGE,
                values: harvest,
            },
            Series {
                name: "kick",
                color: BLUE_,
                values: kick,
            },
        ],
        true,
        y_max,
    )?;
    time_panel(
        &rows[1],
        "Dirty pages per checkpoint",
        "pages",
        &axis,
        &[Series {
            name: "dirty pages",
            color: BLUE_,
            values: us(|m| m.dirty_pages),
        }],
        false,
        None,
    )?;
    let bytes = us(|m| m.bytes);
    let regions = us(|m| m.region_bytes);
    let (unit, size) = byte_unit(bytes.iter().chain(&regions).copied().fold(0.0, f64::max));
    time_panel(
        &rows[2],
        "Bytes per checkpoint",
        unit,
        &axis,
        &[
            Series {
                name: "at the sink",
                color: BLUE_,
                values: bytes.iter().map(|b| b / size).collect(),
            },
            Series {
                name: "disk regions",
                color: ORANGE,
                values: regions.iter().map(|b| b / size).collect(),
            },
        ],
        false,
        None,
    )?;
    let ms = |v: Vec<f64>| v.into_iter().map(|u| u / 1000.0).collect::<Vec<_>>();
    time_panel(
        &rows[3],
        "Ack lag: end of pause until complete (acknowledged or durable)",
        "ms",
        &axis,
        &[
            Series {
                name: "ack lag",
                color: RED_,
                values: ms(us(|m| m.ack_us)),
            },
            Series {
                name: "export (last attempt)",
                color: BLUE_,
                values: ms(us(|m| m.export_us)),
            },
        ],
        false,
        None,
    )?;
    histogram_panel(&rows[4], "Pause histogram", t_unit, &pause)?;
    let retries: u64 = c.iter().map(|m| m.retries).sum();
    let d = usize::from(t_div > 1.0);
    let mut caption = format!(
        "{} checkpoints (epochs {}–{}); pause p50 {:.d$} {t_unit}, p99 {:.d$} {t_unit}, max {:.d$} {t_unit}; {} retries",
        c.len(),
        epochs.first().copied().unwrap_or(0),
        epochs.last().copied().unwrap_or(0),
        quantile(&pause, 0.5),
        quantile(&pause, 0.99),
        pause.iter().copied().fold(0.0, f64::max),
        retries,
    );
    if y_max.is_some() {
        caption.push_str(&format!(
            "; the pre-copy's completing checkpoint ({:.d$} {t_unit}) is off the pause scale",
            full_max / t_div
        ));
    }
    for m in &run.markers {
        caption.push_str(&format!("; {}", m.what));
    }
    Ok(("primary run".into(), caption))
}

fn draw_standby(run: &Run, rows: &[Area<'_>]) -> Result<(String, String), ReportError> {
    let a = &run.applied;
    let times: Vec<u64> = a.iter().map(|m| m.received_at_ms).collect();
    let epochs: Vec<u64> = a.iter().map(|m| m.epoch).collect();
    let axis = axis_of(&times, &epochs, &run.markers);
    let pages: Vec<f64> = a.iter().map(|m| f(m.pages)).collect();
    let bytes: Vec<f64> = a.iter().map(|m| f(m.bytes)).collect();
    let apply: Vec<f64> = a.iter().map(|m| f(m.apply_us) / 1000.0).collect();
    time_panel(
        &rows[0],
        "Pages per applied checkpoint",
        "pages",
        &axis,
        &[Series {
            name: "pages",
            color: BLUE_,
            values: pages,
        }],
        false,
        None,
    )?;
    let (unit, size) = byte_unit(bytes.iter().copied().fold(0.0, f64::max));
    time_panel(
        &rows[1],
        "Bytes received per checkpoint",
        unit,
        &axis,
        &[Series {
            name: "received",
            color: BLUE_,
            values: bytes.iter().map(|b| b / size).collect(),
        }],
        false,
        None,
    )?;
    time_panel(
        &rows[2],
        "Apply: first frame until applied and acknowledged",
        "ms",
        &axis,
        &[Series {
            name: "apply",
            color: RED_,
            values: apply.clone(),
        }],
        false,
        None,
    )?;
    histogram_panel(&rows[3], "Apply time histogram", "ms", &apply)?;
    let mut caption = format!(
        "{} checkpoints applied (epochs {}–{}); apply p50 {:.1} ms, p99 {:.1} ms",
        a.len(),
        epochs.first().copied().unwrap_or(0),
        epochs.last().copied().unwrap_or(0),
        quantile(&apply, 0.5),
        quantile(&apply, 0.99),
    );
    for m in &run.markers {
        caption.push_str(&format!("; {}", m.what));
    }
    Ok(("standby run".into(), caption))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::epoch::EpochMetrics;

    #[test]
    fn thinning_keeps_the_spikes() {
        let xs: Vec<f64> = (0..10_000).map(|i| f(i) * 0.025).collect();
        let v: Vec<f64> = (0..10_000)
            .map(|i| if i == 4321 { 1e6 } else { 1.0 })
            .collect();
        let keep = thin(&xs, |i| v[i]);
        assert!(keep.len() <= MAX_POINTS + 1, "{}", keep.len());
        assert!(keep.contains(&4321));
        assert!(keep.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn a_run_renders_with_its_series() {
        let mut run = Run::default();
        for e in 1..=50u64 {
            run.checkpoints.push(EpochMetrics {
                epoch: e,
                full: e == 1,
                pause_us: if e == 1 { 40_000 } else { 200 + e },
                kick_us: 20,
                harvest_us: 30,
                copy_us: 100,
                save_us: 40,
                dirty_pages: e * 3,
                bytes: e * 5000,
                at_ms: e * 25,
                ack_us: 900,
                export_us: 800,
                ..Default::default()
            });
        }
        run.markers.push(Marker {
            at_ms: 1000,
            epoch: 40,
            what: "sink lost after checkpoint 40".into(),
            short: "sink lost",
        });
        let svg = render(&run, Path::new("x/m.jsonl")).unwrap();
        for s in [
            "harvest",
            "dirty pages",
            "ack lag",
            "Pause histogram",
            "sink lost",
            "m.jsonl",
            "off the pause scale",
        ] {
            assert!(svg.contains(s), "no {s}");
        }
        let e = render(&Run::default(), Path::new("e.jsonl")).unwrap_err();
        assert!(
            e.to_string().starts_with("e.jsonl holds no checkpoint"),
            "{e}"
        );
    }
}
