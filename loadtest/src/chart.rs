//! The `plan` chart: table size and memory over time, the delay legitimate mail saw by
//! sender type, and that delay with pool identities off and on, as one SVG file.

use std::path::Path;

use anyhow::anyhow;
use plotters::prelude::*;

use crate::plan::{PlanReport, Point, SENDER_TYPES};

/// Picks one value of a timeline point.
type Value = fn(&Point) -> f64;

/// Matplotlib's "tab10": one colour per sender type.
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

/// Writes the chart of `r` to `path` as SVG.
pub fn write_svg(r: &PlanReport, path: &Path) -> anyhow::Result<()> {
    draw(r, path).map_err(|e| anyhow!("chart {}: {e}", path.display()))
}

fn draw(r: &PlanReport, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (1000, 1400)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(
        &format!(
            "greyhound plan: {:.0} msg/s, {:.0}% spam, {} days{}",
            r.config.rate,
            100.0 * r.config.spam_share,
            r.config.days,
            if r.sample > 1 {
                format!(" (1 in {} senders simulated, scaled)", r.sample)
            } else {
                String::new()
            }
        ),
        ("sans-serif", 20),
    )?;
    let panels = root.split_evenly((4, 1));
    let hours = r.timeline.last().map_or(1.0, |p| p.hours).max(1e-3);
    let over_time = |f: Value, scale: f64| -> Vec<(f64, f64)> {
        r.timeline.iter().map(|p| (p.hours, f(p) / scale)).collect()
    };

    // Live triplets by state, in millions.
    let m = 1e6;
    line_panel(
        &panels[0],
        "live triplets (millions)",
        "hours",
        hours,
        None,
        SeriesLabelPosition::UpperLeft,
        vec![
            (
                "all".into(),
                over_time(|p| (p.greylisted + p.whitelisted) as f64, m),
            ),
            ("greylisted".into(), over_time(|p| p.greylisted as f64, m)),
            ("whitelisted".into(), over_time(|p| p.whitelisted as f64, m)),
        ],
    )?;

    // Memory, MiB.
    let mib = 1024.0 * 1024.0;
    let table_label = if r.sample > 1 {
        format!("engine tables, full scale (sample × {})", r.sample)
    } else {
        "engine tables".to_string()
    };
    line_panel(
        &panels[1],
        "memory (MiB)",
        "hours",
        hours,
        None,
        SeriesLabelPosition::UpperLeft,
        vec![
            (table_label, over_time(|p| p.table_bytes as f64, mib)),
            (
                "process RSS growth (as simulated)".into(),
                over_time(|p| p.rss_bytes as f64, mib),
            ),
        ],
    )?;

    // Delay distribution: share of delivered mail delivered within x minutes.
    let cdfs = SENDER_TYPES
        .iter()
        .filter_map(|name| {
            let points = r.delay_cdf.get(*name)?;
            Some((
                name.to_string(),
                points.iter().map(|&(x, y)| (x / 60.0, y)).collect(),
            ))
        })
        .collect();
    line_panel(
        &panels[2],
        "delayed legitimate mail: share delivered within x minutes, by sender type",
        "minutes after first attempt",
        240.0,
        Some(1.0),
        SeriesLabelPosition::LowerRight,
        cdfs,
    )?;
    identity_panel(&panels[3], r)?;
    root.present()?;
    Ok(())
}

/// Grouped bars: per sender type, the median delay of delayed mail for each pool-identity
/// run (off, on), with a whisker up to the 95th percentile.
fn identity_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    r: &PlanReport,
) -> Result<(), Box<dyn std::error::Error>>
where
    DB::ErrorType: 'static,
{
    let runs: Vec<(&str, Vec<(f64, f64)>)> = r
        .runs
        .iter()
        .map(|name| {
            let by_type = r.legit_by_pool_identity.get(name);
            let values = SENDER_TYPES
                .iter()
                .map(|t| {
                    by_type.and_then(|m| m.get(*t)).map_or((0.0, 0.0), |d| {
                        (d.delayed_median_secs / 60.0, d.delayed_p95_secs / 60.0)
                    })
                })
                .collect();
            (name.as_str(), values)
        })
        .collect();
    let top = runs
        .iter()
        .flat_map(|(_, v)| v.iter().map(|p| p.1))
        .fold(0.0, f64::max)
        .max(1.0)
        * 1.15;
    let n = SENDER_TYPES.len();
    let mut c = ChartBuilder::on(area)
        .caption(
            "delayed legitimate mail by sender type: median (bar) and p95 (whisker), \
             pool identity off / on (simulated)",
            ("sans-serif", 16),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..n as f64, 0.0..top)?;
    // Ticks every half unit: the centres (i + 0.5) carry the type names.
    c.configure_mesh()
        .disable_x_mesh()
        .x_labels(2 * n + 1)
        .x_label_formatter(&|x| {
            let i = x - 0.5;
            if i >= 0.0 && (i - i.round()).abs() < 1e-6 {
                SENDER_TYPES
                    .get(i.round() as usize)
                    .map_or(String::new(), |t| t.to_string())
            } else {
                String::new()
            }
        })
        .y_desc("minutes")
        .draw()?;
    let width = 0.8 / runs.len().max(1) as f64;
    let run_colors = [COLORS[3], COLORS[2]];
    for (j, (name, values)) in runs.iter().enumerate() {
        let color = match *name {
            "on" => run_colors[1],
            _ => run_colors[0],
        };
        let x0 = |i: usize| i as f64 + 0.1 + j as f64 * width;
        c.draw_series(values.iter().enumerate().map(|(i, &(median, _))| {
            Rectangle::new(
                [(x0(i), 0.0), (x0(i) + width * 0.9, median)],
                color.filled(),
            )
        }))?
        .label(format!("pool identity {name}"))
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], color.filled()));
        c.draw_series(values.iter().enumerate().map(|(i, &(median, p95))| {
            let mid = x0(i) + width * 0.45;
            PathElement::new(vec![(mid, median), (mid, p95)], BLACK.stroke_width(2))
        }))?;
    }
    c.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// One panel of named line series, x from 0 to `x_max`, y from 0 to `y_max` (or 10 % above
/// the highest point).
#[allow(clippy::too_many_arguments)]
fn line_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    caption: &str,
    x_desc: &str,
    x_max: f64,
    y_max: Option<f64>,
    legend: SeriesLabelPosition,
    series: Vec<(String, Vec<(f64, f64)>)>,
) -> Result<(), Box<dyn std::error::Error>>
where
    DB::ErrorType: 'static,
{
    let top = y_max.unwrap_or_else(|| {
        series
            .iter()
            .flat_map(|(_, pts)| pts.iter().map(|p| p.1))
            .fold(0.0, f64::max)
            .max(1e-3)
            * 1.1
    });
    let mut c = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max, 0.0..top)?;
    c.configure_mesh().x_desc(x_desc).draw()?;
    for (i, (name, points)) in series.into_iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        c.draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    c.configure_series_labels()
        .position(legend)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}
