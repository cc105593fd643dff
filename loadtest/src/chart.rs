//! The `plan` chart: table size and memory over time, and the delay legitimate mail saw by
//! sender type, as one SVG file.

use std::path::Path;

use anyhow::anyhow;
use plotters::prelude::*;

use crate::plan::{PlanReport, Point, SENDER_TYPES};

/// Picks one value of a timeline point.
type Value = fn(&Point) -> f64;

const COLORS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
];

/// Writes the chart of `r` to `path` as SVG.
pub fn write_svg(r: &PlanReport, path: &Path) -> anyhow::Result<()> {
    draw(r, path).map_err(|e| anyhow!("chart {}: {e}", path.display()))
}

fn draw(r: &PlanReport, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (1000, 1050)).into_drawing_area();
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
    let panels = root.split_evenly((3, 1));
    let hours = r.timeline.last().map_or(1.0, |p| p.hours).max(1e-3);

    // Live triplets by state, in millions.
    let m = 1e6;
    let top = r
        .timeline
        .iter()
        .map(|p| (p.greylisted + p.whitelisted) as f64 / m)
        .fold(0.0, f64::max)
        .max(1e-3)
        * 1.1;
    let mut c = ChartBuilder::on(&panels[0])
        .caption("live triplets (millions)", ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..hours, 0.0..top)?;
    c.configure_mesh().x_desc("hours").draw()?;
    let series: [(&str, Value); 3] = [
        ("all", |p| (p.greylisted + p.whitelisted) as f64),
        ("greylisted", |p| p.greylisted as f64),
        ("whitelisted", |p| p.whitelisted as f64),
    ];
    for (i, (name, f)) in series.into_iter().enumerate() {
        let color = COLORS[i];
        c.draw_series(LineSeries::new(
            r.timeline.iter().map(|p| (p.hours, f(p) / m)),
            color.stroke_width(2),
        ))?
        .label(name)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    c.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;

    // Memory, MiB.
    let mib = 1024.0 * 1024.0;
    let top = r
        .timeline
        .iter()
        .map(|p| p.table_bytes.max(p.rss_bytes) as f64 / mib)
        .fold(0.0, f64::max)
        .max(1e-3)
        * 1.1;
    let mut c = ChartBuilder::on(&panels[1])
        .caption("memory (MiB)", ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..hours, 0.0..top)?;
    c.configure_mesh().x_desc("hours").draw()?;
    let table_label = if r.sample > 1 {
        format!("engine tables, full scale (sample × {})", r.sample)
    } else {
        "engine tables".to_string()
    };
    let mem: [(String, Value); 2] = [
        (table_label, |p| p.table_bytes as f64),
        ("process RSS growth (as simulated)".to_string(), |p| {
            p.rss_bytes as f64
        }),
    ];
    for (i, (name, f)) in mem.into_iter().enumerate() {
        let color = COLORS[i];
        c.draw_series(LineSeries::new(
            r.timeline.iter().map(|p| (p.hours, f(p) / mib)),
            color.stroke_width(2),
        ))?
        .label(name)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    c.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;

    // Delay distribution: share of delivered mail delivered within x minutes.
    let mut c = ChartBuilder::on(&panels[2])
        .caption(
            "delayed legitimate mail: share delivered within x minutes, by sender type",
            ("sans-serif", 16),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..240.0, 0.0..1.0)?;
    c.configure_mesh()
        .x_desc("minutes after first attempt")
        .draw()?;
    for (i, name) in SENDER_TYPES.iter().enumerate() {
        let Some(points) = r.delay_cdf.get(*name) else {
            continue;
        };
        let color = COLORS[i];
        c.draw_series(LineSeries::new(
            points.iter().map(|&(x, y)| (x / 60.0, y)),
            color.stroke_width(2),
        ))?
        .label(*name)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    c.configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
