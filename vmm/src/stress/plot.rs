//! `--plot FILE.svg`: the touch latency distribution of each run, as cumulative
//! distributions on one chart with a logarithmic latency axis.

use std::path::Path;

use plotters::prelude::*;

use super::{Report, StressArgs};

type PlotResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// One CDF curve: (latency in µs, fraction of touches at most that slow).
fn cdf_points(report: &Report) -> Vec<(f64, f64)> {
    report
        .latency
        .iter_recorded()
        .map(|v| {
            (
                v.value_iterated_to().max(1) as f64 / 1e3,
                v.quantile_iterated_to(),
            )
        })
        .collect()
}

/// Draws the latency CDF of every report into the SVG file `path`.
pub(super) fn latency_cdf(path: &Path, args: &StressArgs, reports: &[Report]) -> PlotResult {
    // With --rounds, every round of every mode is a curve of its own.
    let rounds = reports.iter().any(|r| r.round > 1);
    let curves: Vec<(String, Vec<(f64, f64)>)> = reports
        .iter()
        .map(|r| {
            let [p50, p99, ..] = r.percentiles_ns();
            let label = if rounds {
                format!("{} #{}", r.label(), r.round)
            } else {
                r.label()
            };
            let name = format!(
                "{label}: p50 {}, p99 {}, {:.0} faults/s",
                super::report::fmt_ns(p50),
                super::report::fmt_ns(p99),
                r.faults_per_sec()
            );
            (name, cdf_points(r))
        })
        .collect();
    let xs = curves.iter().flat_map(|(_, c)| c.iter().map(|p| p.0));
    let lo = xs.clone().fold(f64::INFINITY, f64::min);
    let hi = xs.fold(0.0, f64::max);
    let (lo, hi) = if lo.is_finite() && hi > lo {
        (lo * 0.8, hi * 1.25)
    } else {
        (0.1, 1000.0)
    };

    let root = SVGBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let what = match reports.first().map(|r| r.engine) {
        Some(super::Engine::Kvm) => "guest page",
        _ => "touch",
    };
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "rangevm stress: {what} latency, {:?} pattern, {} workers, {} handlers",
                args.pattern, args.workers, args.handlers
            ),
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d((lo..hi).log_scale(), 0.0..1.0)?;
    chart
        .configure_mesh()
        .x_desc("latency (µs, log scale)")
        .x_label_formatter(&|v| format!("{v}"))
        .y_desc("fraction of touches at most this slow")
        .draw()?;
    for (i, (name, points)) in curves.into_iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], color));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
