//! `ringhub-load compare A.hgrm B.hgrm … [--labels a,b] [--svg out.svg]`: latency
//! distributions side by side, each with its ratio to the first (value ÷ first run's value),
//! and a latency-by-percentile plot.
//!
//! The plot's x axis is in "nines", `-log10(1 − q)`: 0 → 0%, 1 → 90%, 2 → 99%, 3 → 99.9%…,
//! so the tail gets as much room as the median (the usual HdrHistogram picture). Each file's
//! rows are one labelled line; its maximum is drawn at `1 − 1/count` (the last value a run of
//! that many samples can show). A percentile a run has too few samples to resolve (fewer than
//! 1/(1 − q)) is marked in the table: it is the run's maximum, not a measured tail.

use crate::cli::{CompareArgs, Scale};
use crate::stats::Hgrm;
use plotters::prelude::*;
use std::path::Path;

/// Rows of the table: (quantile, label).
const ROWS: [(f64, &str); 6] = [
    (0.5, "p50"),
    (0.9, "p90"),
    (0.99, "p99"),
    (0.999, "p99.9"),
    (0.9999, "p99.99"),
    (0.99999, "p99.999"),
];

/// Distinguishable line colours (Tableau 10).
const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// One run to compare.
pub struct Run {
    pub label: String,
    pub hist: Hgrm,
}

/// Load the files with their labels (given, or the file stem).
pub fn load(files: &[impl AsRef<Path>], labels: &[String]) -> Result<Vec<Run>, String> {
    if !labels.is_empty() && labels.len() != files.len() {
        return Err(format!(
            "--labels gives {} names for {} files",
            labels.len(),
            files.len()
        ));
    }
    files
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let f = f.as_ref();
            let label = labels.get(i).cloned().unwrap_or_else(|| {
                f.file_stem()
                    .map_or_else(|| f.display().to_string(), |s| s.to_string_lossy().into())
            });
            Ok(Run {
                label,
                hist: Hgrm::read(f)?,
            })
        })
        .collect()
}

/// The comparison table: one column per run, ratios to the first.
pub fn table(runs: &[Run]) -> String {
    let fmt_v = |v: f64| {
        if v >= 1000.0 {
            format!("{v:.0}")
        } else {
            format!("{v:.1}")
        }
    };
    let mut header = vec!["µs".to_string()];
    let mut lines: Vec<Vec<String>> = Vec::new();
    for (i, r) in runs.iter().enumerate() {
        header.push(r.label.clone());
        if i > 0 {
            header.push("ratio".into());
        }
    }
    let mut unresolved = false;
    let mut row = |name: &str, val: &dyn Fn(&Run) -> (f64, bool)| {
        let mut cells = vec![name.to_string()];
        let base = val(&runs[0]).0;
        for (i, r) in runs.iter().enumerate() {
            let (v, resolved) = val(r);
            unresolved |= !resolved;
            cells.push(format!("{}{}", fmt_v(v), if resolved { "" } else { "*" }));
            if i > 0 {
                cells.push(if base > 0.0 {
                    format!("{:.2}", v / base)
                } else {
                    "-".into()
                });
            }
        }
        lines.push(cells);
    };
    for (q, name) in ROWS {
        row(name, &|r: &Run| {
            let n = r.hist.count() as f64;
            (r.hist.value_at(q), n * (1.0 - q) >= 1.0 - 1e-9)
        });
    }
    row("max", &|r: &Run| (r.hist.max_value(), true));
    row("mean", &|r: &Run| (r.hist.mean.unwrap_or(f64::NAN), true));
    let mut counts = vec!["samples".to_string()];
    for (i, r) in runs.iter().enumerate() {
        counts.push(r.hist.count().to_string());
        if i > 0 {
            counts.push(String::new());
        }
    }
    lines.push(counts);

    let cols = header.len();
    let width: Vec<usize> = (0..cols)
        .map(|c| {
            lines
                .iter()
                .map(|l| l[c].chars().count())
                .chain([header[c].chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    let fmt_line = |cells: &[String]| {
        let mut s = format!("{:<w$}", cells[0], w = width[0]);
        for (c, cell) in cells.iter().enumerate().skip(1) {
            s.push_str(&format!("  {cell:>w$}", w = width[c]));
        }
        s.trim_end().to_string() + "\n"
    };
    out.push_str(&fmt_line(&header));
    for l in &lines {
        out.push_str(&fmt_line(l));
    }
    if unresolved {
        out.push_str(
            "* fewer samples than this percentile needs (1/(1-q)): the value is the run's maximum\n",
        );
    }
    out
}

/// "nines" of quantile q: 0.9 → 1, 0.99 → 2.
fn nines(q: f64) -> f64 {
    -(1.0 - q).log10()
}

/// The points of one run's line: (nines, µs), ending at its maximum.
fn points(h: &Hgrm, x_max: f64) -> Vec<(f64, f64)> {
    let mut pts: Vec<(f64, f64)> = h
        .rows
        .iter()
        .filter(|r| r.1 < 1.0)
        .map(|r| (nines(r.1).min(x_max), r.0))
        .collect();
    let n = h.count().max(1) as f64;
    let x_end = n.log10().min(x_max);
    if pts.last().is_none_or(|p| p.0 < x_end) {
        pts.push((x_end, h.max_value()));
    }
    pts
}

/// The percentile label of an integer number of nines.
fn nines_label(x: f64) -> String {
    let k = x.round() as i32;
    if (x - k as f64).abs() > 1e-6 || k < 0 {
        return String::new();
    }
    if k == 0 {
        return "0%".into();
    }
    let pct = 100.0 - 100.0 * 10f64.powi(-k);
    format!("{:.*}%", (k - 2).max(0) as usize, pct)
}

/// Draw the latency-by-percentile plot of `runs` into `path` (SVG).
pub fn svg(runs: &[Run], path: &Path, scale: Scale, title: &str) -> Result<(), String> {
    // x: up to the nines the largest run resolves (at least 99.99%, at most 99.9999%).
    let most = runs
        .iter()
        .map(|r| r.hist.count())
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let x_max = most.log10().ceil().clamp(4.0, 6.0);
    let all: Vec<Vec<(f64, f64)>> = runs.iter().map(|r| points(&r.hist, x_max)).collect();
    let (lo, hi) = all
        .iter()
        .flatten()
        .fold((f64::MAX, 0f64), |(lo, hi), p| (lo.min(p.1), hi.max(p.1)));
    if hi <= 0.0 {
        return Err("nothing to plot: every histogram is empty".into());
    }
    let err = |e: &dyn std::fmt::Display| format!("cannot draw {}: {e}", path.display());
    let root = SVGBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .margin_right(48)
        .x_label_area_size(48)
        .y_label_area_size(72);
    let x_range = 0f64..x_max;
    let x_fmt = |x: &f64| nines_label(*x);
    let y_fmt = |y: &f64| {
        if *y >= 100.0 {
            format!("{y:.0}")
        } else if *y >= 1.0 {
            format!("{y:.1}")
        } else {
            format!("{y:.2}")
        }
    };
    macro_rules! draw {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_labels(x_max as usize + 1)
                .y_labels(12)
                .x_label_formatter(&x_fmt)
                .y_label_formatter(&y_fmt)
                .x_desc("percentile")
                .y_desc("latency (µs)")
                .axis_desc_style(("sans-serif", 16))
                .label_style(("sans-serif", 14))
                .light_line_style(BLACK.mix(0.05))
                .bold_line_style(BLACK.mix(0.15))
                .draw()
                .map_err(|e| err(&e))?;
            for (i, (run, pts)) in runs.iter().zip(&all).enumerate() {
                let color = COLORS[i % COLORS.len()];
                let style = ShapeStyle::from(&color).stroke_width(2);
                chart
                    .draw_series(LineSeries::new(pts.iter().copied(), style))
                    .map_err(|e| err(&e))?
                    .label(run.label.clone())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
                    });
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.9))
                .border_style(BLACK.mix(0.5))
                .label_font(("sans-serif", 16))
                .draw()
                .map_err(|e| err(&e))?;
        }};
    }
    match scale {
        Scale::Log => {
            let y = (lo.max(0.01) * 0.8)..(hi * 1.25);
            draw!(builder
                .build_cartesian_2d(x_range, y.log_scale())
                .map_err(|e| err(&e))?)
        }
        Scale::Linear => {
            let y = 0f64..(hi * 1.05);
            draw!(builder
                .build_cartesian_2d(x_range, y)
                .map_err(|e| err(&e))?)
        }
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// The `compare` subcommand.
pub fn run(a: &CompareArgs) -> Result<(), String> {
    let runs = load(&a.files, &a.labels)?;
    print!("{}", table(&runs));
    if let Some(path) = &a.svg {
        svg(&runs, path, a.y_scale, &a.title)?;
        println!("plot written to {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{hgrm_text, new_hist};

    fn run_of(label: &str, scale: u64, n: u64) -> Run {
        let mut h = new_hist();
        for i in 1..=n {
            h.record(scale * (1000 + i % 1000)).unwrap();
        }
        Run {
            label: label.into(),
            hist: Hgrm::parse(&hgrm_text(&h)).unwrap(),
        }
    }

    #[test]
    fn nines_labels() {
        assert_eq!(nines_label(0.0), "0%");
        assert_eq!(nines_label(1.0), "90%");
        assert_eq!(nines_label(2.0), "99%");
        assert_eq!(nines_label(3.0), "99.9%");
        assert_eq!(nines_label(5.0), "99.999%");
        assert_eq!(nines_label(2.5), "");
        assert!((nines(0.999) - 3.0).abs() < 1e-9);
    }

    #[test]
    fn table_has_ratios_to_the_first_run() {
        let runs = [run_of("a", 1, 100_000), run_of("b", 2, 1000)];
        let t = table(&runs);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].contains('a') && lines[0].contains("ratio"), "{t}");
        let p50: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(p50[0], "p50");
        assert_eq!(p50[3], "2.00", "{t}");
        // 1000 samples cannot resolve p99.99: marked.
        assert!(
            lines[5].starts_with("p99.99 ") && lines[5].contains('*'),
            "{t}"
        );
        assert!(t.contains("samples") && t.contains("100000"));
    }

    #[test]
    fn labels_must_match_the_files() {
        let err = load(&["a.hgrm", "b.hgrm"], &["x".into()]).err().unwrap();
        assert!(err.contains("2 files"));
    }

    #[test]
    fn svg_has_one_labelled_line_per_run() {
        let runs = [run_of("ringhub", 1, 100_000), run_of("peer", 2, 100_000)];
        let dir = std::env::temp_dir().join(format!("ringhub-load-svg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for scale in [Scale::Log, Scale::Linear] {
            let path = dir.join("plot.svg");
            svg(&runs, &path, scale, "test").unwrap();
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(text.starts_with("<svg"));
            // One 2-px line per run, one 3-px legend mark per run, each in the run's colour.
            assert_eq!(text.matches(r#"stroke-width="2" points"#).count(), 2);
            assert_eq!(text.matches(r#"stroke-width="3" points"#).count(), 2);
            assert_eq!(text.matches(r##"stroke="#1F77B4""##).count(), 2);
            for label in ["ringhub", "peer", "99.9%", "99.999%", "latency (µs)"] {
                assert!(text.contains(label), "{label} missing");
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
