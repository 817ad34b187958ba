//! Training curves as a PNG: training loss per epoch (left) and test
//! AUC / GAUC per epoch (right), drawn with plotters' bitmap backend.
//!
//! Text needs a TrueType font: the first of [`FONT_PATHS`] (or `$EMBER_FONT`)
//! that exists is used; without one the curves are drawn without labels.

use std::path::Path;

use plotters::prelude::*;

use crate::report::EpochRecord;
use crate::ClusterError;

/// Fonts tried, in order, for axis labels.
pub const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

fn register_font() -> bool {
    let mut paths: Vec<String> = std::env::var("EMBER_FONT").into_iter().collect();
    paths.extend(FONT_PATHS.iter().map(|s| s.to_string()));
    for p in paths {
        if let Ok(bytes) = std::fs::read(&p) {
            // plotters keeps the font for the life of the process.
            let leaked: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, leaked).is_ok() {
                return true;
            }
        }
    }
    false
}

fn err(e: impl std::fmt::Display) -> ClusterError {
    ClusterError::Report(format!("plot: {e}"))
}

/// Draws `records` to `path` (PNG, 1200x480). Returns whether labels were drawn.
pub fn plot_curves(
    path: &Path,
    title: &str,
    records: &[EpochRecord],
) -> Result<bool, ClusterError> {
    let fonts = register_font();
    let root = BitMapBackend::new(path, (1200, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (left, right) = root.split_horizontally(600);
    let n = records.len().max(1) as f64;
    let epochs: Vec<f64> = records.iter().map(|r| r.epoch as f64).collect();

    // Loss.
    let losses: Vec<f64> = records.iter().map(|r| r.train_loss).collect();
    let test_losses: Vec<f64> = records
        .iter()
        .filter_map(|r| r.test.as_ref().map(|t| t.logloss))
        .collect();
    let all: Vec<f64> = losses
        .iter()
        .chain(test_losses.iter())
        .copied()
        .filter(|v| v.is_finite())
        .collect();
    let y = bounds(&all, 0.0, 1.0);
    let mut chart = panel(&left, &format!("{title}: loss"), "logloss", n, y, fonts)?;
    let train_pts: Vec<(f64, f64)> = epochs.iter().copied().zip(losses.iter().copied()).collect();
    draw_line(&mut chart, &train_pts, BLUE, fonts.then_some("train"))?;
    let test_pts: Vec<(f64, f64)> = records
        .iter()
        .filter_map(|r| r.test.as_ref().map(|t| (r.epoch as f64, t.logloss)))
        .collect();
    draw_line(&mut chart, &test_pts, RED, fonts.then_some("test"))?;
    legend(&mut chart, fonts, SeriesLabelPosition::MiddleRight)?;

    // AUC / GAUC.
    let auc: Vec<(f64, f64)> = records
        .iter()
        .filter_map(|r| r.test.as_ref().map(|t| (r.epoch as f64, t.auc)))
        .collect();
    let gauc: Vec<(f64, f64)> = records
        .iter()
        .filter_map(|r| r.test.as_ref().map(|t| (r.epoch as f64, t.gauc)))
        .collect();
    let vals: Vec<f64> = auc
        .iter()
        .chain(gauc.iter())
        .map(|p| p.1)
        .filter(|v| v.is_finite())
        .collect();
    let y = bounds(&vals, 0.5, 1.0);
    let mut chart = panel(
        &right,
        &format!("{title}: test AUC / GAUC"),
        "AUC",
        n,
        y,
        fonts,
    )?;
    draw_line(&mut chart, &auc, GREEN, fonts.then_some("AUC"))?;
    draw_line(&mut chart, &gauc, MAGENTA, fonts.then_some("GAUC"))?;
    legend(&mut chart, fonts, SeriesLabelPosition::LowerRight)?;
    root.present().map_err(err)?;
    Ok(fonts)
}

/// A GRU4Rec run's curves to `path` (PNG, 1200x480): training loss per
/// epoch (left), test Recall@k and MRR@k of the last item per epoch
/// (right). Returns whether labels were drawn.
pub fn plot_seq_curves(
    path: &Path,
    title: &str,
    k: usize,
    epochs: &[crate::seqrec::SeqEpoch],
) -> Result<bool, ClusterError> {
    let fonts = register_font();
    let root = BitMapBackend::new(path, (1200, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (left, right) = root.split_horizontally(600);
    let n = epochs.len().max(1) as f64;
    let pts = |f: fn(&crate::seqrec::SeqEpoch) -> f64| -> Vec<(f64, f64)> {
        epochs
            .iter()
            .map(|e| (e.epoch as f64, f(e)))
            .filter(|p| p.1.is_finite())
            .collect()
    };
    let loss = pts(|e| e.loss);
    let vals: Vec<f64> = loss.iter().map(|p| p.1).collect();
    let mut chart = panel(
        &left,
        &format!("{title}: train loss"),
        "loss",
        n,
        bounds(&vals, 0.0, 1.0),
        fonts,
    )?;
    draw_line(&mut chart, &loss, BLUE, fonts.then_some("train"))?;
    legend(&mut chart, fonts, SeriesLabelPosition::UpperRight)?;
    let (recall, mrr) = (pts(|e| e.recall), pts(|e| e.mrr));
    let vals: Vec<f64> = recall.iter().chain(&mrr).map(|p| p.1).collect();
    let mut chart = panel(
        &right,
        &format!("{title}: test Recall@{k} / MRR@{k}"),
        "",
        n,
        bounds(&vals, 0.0, 1.0),
        fonts,
    )?;
    draw_line(&mut chart, &recall, GREEN, fonts.then_some("Recall"))?;
    draw_line(&mut chart, &mrr, MAGENTA, fonts.then_some("MRR"))?;
    legend(&mut chart, fonts, SeriesLabelPosition::MiddleRight)?;
    root.present().map_err(err)?;
    Ok(fonts)
}

/// Colours of the runs in [`plot_compare`], in order (then repeated).
const RUN_COLORS: [RGBColor; 6] = [BLUE, RED, GREEN, MAGENTA, RGBColor(230, 140, 0), BLACK];

/// Draws several runs side by side to `path` (PNG, 1200x480): test logloss
/// per epoch (left) and test AUC per epoch (right), one line per
/// `(label, records)`. Returns whether labels were drawn.
pub fn plot_compare(
    path: &Path,
    title: &str,
    runs: &[(String, Vec<EpochRecord>)],
) -> Result<bool, ClusterError> {
    let fonts = register_font();
    let root = BitMapBackend::new(path, (1200, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (left, right) = root.split_horizontally(600);
    let n = runs.iter().map(|(_, r)| r.len()).max().unwrap_or(1).max(1) as f64;
    type Metric = fn(&crate::report::TestMetrics) -> f64;
    let panels: [(&_, &str, Metric, (f64, f64)); 2] = [
        (&left, "test logloss", |t| t.logloss, (0.0, 1.0)),
        (&right, "test AUC", |t| t.auc, (0.5, 1.0)),
    ];
    for (area, what, metric, default) in panels {
        let series: Vec<Vec<(f64, f64)>> = runs
            .iter()
            .map(|(_, recs)| {
                recs.iter()
                    .filter_map(|r| r.test.as_ref().map(|t| (r.epoch as f64, metric(t))))
                    .filter(|p| p.1.is_finite())
                    .collect()
            })
            .collect();
        let vals: Vec<f64> = series.iter().flatten().map(|p| p.1).collect();
        let y = bounds(&vals, default.0, default.1);
        let mut chart = panel(area, &format!("{title}: {what}"), what, n, y, fonts)?;
        for (i, ((label, _), pts)) in runs.iter().zip(&series).enumerate() {
            let color = RUN_COLORS[i % RUN_COLORS.len()];
            draw_line(&mut chart, pts, color, fonts.then_some(label.as_str()))?;
        }
        legend(&mut chart, fonts, emptiest_corner(&series, n, y))?;
    }
    root.present().map_err(err)?;
    Ok(fonts)
}

/// The corner of a panel (epochs 1..=`n` across, `y` up) whose legend-sized
/// region (the outer 40% of the width and 45% of the height) the lines of
/// `series` cross least, sampled along every segment; ties go to the right,
/// then to the top.
fn emptiest_corner(series: &[Vec<(f64, f64)>], n: f64, y: (f64, f64)) -> SeriesLabelPosition {
    let sx = |x: f64| if n > 1.0 { (x - 1.0) / (n - 1.0) } else { 0.5 };
    let sy = |v: f64| (v - y.0) / (y.1 - y.0).max(f64::MIN_POSITIVE);
    // (right, top) of UpperRight, LowerRight, UpperLeft, LowerLeft.
    let corners = [(true, true), (true, false), (false, true), (false, false)];
    let mut hits = [0usize; 4];
    for pts in series {
        for w in pts.windows(2) {
            for k in 0..=16 {
                let f = k as f64 / 16.0;
                let x = sx(w[0].0 + f * (w[1].0 - w[0].0));
                let v = sy(w[0].1 + f * (w[1].1 - w[0].1));
                for (c, &(right, top)) in corners.iter().enumerate() {
                    let in_x = if right { x >= 0.6 } else { x <= 0.4 };
                    let in_y = if top { v >= 0.55 } else { v <= 0.45 };
                    hits[c] += usize::from(in_x && in_y);
                }
            }
        }
    }
    match (0..4).min_by_key(|&c| (hits[c], c)) {
        Some(1) => SeriesLabelPosition::LowerRight,
        Some(2) => SeriesLabelPosition::UpperLeft,
        Some(3) => SeriesLabelPosition::LowerLeft,
        _ => SeriesLabelPosition::UpperRight,
    }
}

type Chart<'a, 'b> = ChartContext<
    'a,
    BitMapBackend<'b>,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

/// One panel over epochs `1..=n` and `y = (lo, hi)`: margins, the caption
/// and axis labels when `fonts`, the mesh.
fn panel<'a, 'b>(
    area: &'a DrawingArea<BitMapBackend<'b>, plotters::coord::Shift>,
    caption: &str,
    y_desc: &str,
    n: f64,
    (lo, hi): (f64, f64),
    fonts: bool,
) -> Result<Chart<'a, 'b>, ClusterError> {
    let mut b = ChartBuilder::on(area);
    b.margin(15)
        .x_label_area_size(if fonts { 35 } else { 5 })
        .y_label_area_size(if fonts { 55 } else { 5 });
    if fonts {
        b.caption(caption, ("sans-serif", 20));
    }
    let mut chart = b.build_cartesian_2d(0.5f64..n + 0.5, lo..hi).map_err(err)?;
    if fonts {
        chart
            .configure_mesh()
            .x_desc("epoch")
            .x_label_formatter(&epoch_label)
            .y_desc(y_desc)
            .draw()
            .map_err(err)?;
    } else {
        chart
            .configure_mesh()
            .disable_x_mesh()
            .draw()
            .map_err(err)?;
    }
    Ok(chart)
}

/// The legend of `chart` at `pos` (plotters' default is `MiddleRight`; only
/// with fonts: labels need text).
fn legend<'a, 'b: 'a>(
    chart: &mut Chart<'a, 'b>,
    fonts: bool,
    pos: SeriesLabelPosition,
) -> Result<(), ClusterError> {
    if fonts {
        chart
            .configure_series_labels()
            .position(pos)
            .border_style(BLACK)
            .background_style(WHITE)
            .draw()
            .map_err(err)?;
    }
    Ok(())
}

/// One series: a line with dots, labelled in the legend when `label` is set.
fn draw_line(
    chart: &mut Chart<'_, '_>,
    pts: &[(f64, f64)],
    color: RGBColor,
    label: Option<&str>,
) -> Result<(), ClusterError> {
    chart
        .draw_series(pts.iter().map(|p| Circle::new(*p, 4, color.filled())))
        .map_err(err)?;
    let s = chart
        .draw_series(LineSeries::new(pts.to_vec(), color.stroke_width(2)))
        .map_err(err)?;
    if let Some(l) = label {
        s.label(l)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    Ok(())
}

/// Axis label of an epoch coordinate: integers only.
fn epoch_label(x: &f64) -> String {
    if (x - x.round()).abs() < 1e-6 {
        format!("{}", x.round() as i64)
    } else {
        String::new()
    }
}

/// A padded [lo, hi] range around `vals` (defaults when empty).
fn bounds(vals: &[f64], dlo: f64, dhi: f64) -> (f64, f64) {
    if vals.is_empty() {
        return (dlo, dhi);
    }
    let lo = vals.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = vals.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let pad = ((hi - lo) * 0.15).max(0.01);
    (lo - pad, hi + pad)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The legend goes where no line is: a line rising to the upper right
    /// leaves the upper left free, one falling from the upper left leaves
    /// the upper right free; with no lines the upper right is taken.
    #[test]
    fn legend_goes_to_the_corner_the_lines_leave_free() {
        let rising = vec![vec![(1.0, 0.0), (2.0, 0.1), (3.0, 0.5), (4.0, 1.0)]];
        let pos = emptiest_corner(&rising, 4.0, (0.0, 1.0));
        assert!(matches!(pos, SeriesLabelPosition::UpperLeft), "{pos:?}");
        let falling = vec![vec![(1.0, 1.0), (2.0, 0.5), (3.0, 0.1), (4.0, 0.0)]];
        let pos = emptiest_corner(&falling, 4.0, (0.0, 1.0));
        assert!(matches!(pos, SeriesLabelPosition::UpperRight), "{pos:?}");
        let low_right = vec![vec![(1.0, 0.9), (2.0, 0.9), (3.0, 0.2), (4.0, 0.1)]];
        let pos = emptiest_corner(&low_right, 4.0, (0.0, 1.0));
        assert!(matches!(pos, SeriesLabelPosition::UpperRight), "{pos:?}");
        let pos = emptiest_corner(&[], 4.0, (0.0, 1.0));
        assert!(matches!(pos, SeriesLabelPosition::UpperRight), "{pos:?}");
    }
}
