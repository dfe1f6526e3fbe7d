//! The loss curve (`OUT/loss.png`): loss per logged step on a log scale, with a smoothed line,
//! redrawn at every checkpoint so a person can see a run's progress while it trains.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;

/// The font grids use (embedded in ddm-core), so plots have text on machines without fonts.
const FONT: &[u8] = ddm_core::grid::FONT;

pub fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // A font that fails to register only costs the labels, never the run.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// Draw `points` (step, loss) to `path`.
pub fn loss_curve(path: &Path, title: &str, points: &[(u64, f64)]) -> anyhow::Result<()> {
    let pts = positive(points);
    if pts.len() < 2 {
        return Ok(());
    }
    let (w, h) = (900usize, 520usize);
    let mut buf = vec![255u8; w * h * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w as u32, h as u32)).into_drawing_area();
        draw_loss(&root, title, &pts, 22, 14)?;
    }
    ddm_core::grid::write_rgb_png(path, &buf, w, h)?;
    Ok(())
}

/// The same curve as an SVG document of `w` x `h` pixels (`ddm ui` draws it live); None with fewer
/// than two points.
pub fn loss_curve_svg(
    title: &str,
    points: &[(u64, f64)],
    (w, h): (u32, u32),
) -> anyhow::Result<Option<String>> {
    let pts = positive(points);
    if pts.len() < 2 {
        return Ok(None);
    }
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (w, h)).into_drawing_area();
        draw_loss(&root, title, &pts, 16, 11)?;
    }
    Ok(Some(svg))
}

/// The points a log axis can show.
fn positive(points: &[(u64, f64)]) -> Vec<(u64, f64)> {
    points
        .iter()
        .copied()
        .filter(|p| p.1.is_finite() && p.1 > 0.0)
        .collect()
}

/// The loss curve on `root`: raw points, the smoothed line, log-scale loss; at least two points.
fn draw_loss<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    pts: &[(u64, f64)],
    title_px: u32,
    label_px: u32,
) -> anyhow::Result<()> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow::anyhow!("drawing the loss curve: {e:?}");
    register_font();
    root.fill(&WHITE).map_err(err)?;
    let x_max = pts.last().map(|p| p.0).unwrap_or(1).max(1);
    let lo = pts.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let hi = pts.iter().map(|p| p.1).fold(0.0, f64::max);
    let (y_lo, y_hi) = (lo * 0.9, hi * 1.1);
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", title_px))
        .margin(15)
        .x_label_area_size(3 * label_px)
        .y_label_area_size(5 * label_px)
        .build_cartesian_2d(
            0u64..x_max,
            (y_lo..y_hi).log_scale().with_key_points(log_ticks(y_lo, y_hi)),
        )
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("flow-matching loss (log scale)")
        .y_label_formatter(&|v| tick_label(*v))
        .label_style(("sans-serif", label_px))
        .draw()
        .map_err(err)?;
    chart
        .draw_series(LineSeries::new(pts.iter().copied(), RGBColor(150, 170, 220)))
        .map_err(err)?;
    chart
        .draw_series(LineSeries::new(
            smoothed(pts),
            RGBColor(20, 60, 160).stroke_width(2),
        ))
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// One curve of a plot: its legend, its points, its colour, and whether it is dashed.
type Line = (String, Vec<(f64, f64)>, RGBColor, bool);

/// A router's evaluation (`router-eval.json`) as an SVG document of `w` x `h` pixels: accuracy and
/// calibration error (ECE) per noise level, without the condition and (dashed) with it.
pub fn router_eval_svg(eval: &crate::router_eval::RouterEval, (w, h): (u32, u32)) -> anyhow::Result<String> {
    use crate::router_eval::BinReport;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (w, h)).into_drawing_area();
        let err =
            |e: DrawingAreaErrorKind<std::io::Error>| anyhow::anyhow!("drawing the router curve: {e:?}");
        register_font();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("router by noise level", ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(33)
            .y_label_area_size(45)
            .build_cartesian_2d(0f64..1f64, -0.02f64..1.02f64)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("t (0: data, 1: noise)")
            .label_style(("sans-serif", 11))
            .draw()
            .map_err(err)?;
        let mid = |b: &BinReport| (b.t_lo + b.t_hi) / 2.0;
        let blue = RGBColor(20, 60, 160);
        let orange = RGBColor(220, 110, 20);
        let mut lines: Vec<Line> = vec![
            (
                "accuracy".into(),
                eval.without_class.iter().map(|b| (mid(b), b.accuracy)).collect(),
                blue,
                false,
            ),
            (
                "ECE".into(),
                eval.without_class.iter().map(|b| (mid(b), b.ece)).collect(),
                orange,
                false,
            ),
        ];
        if let (Some(given), Some(bins)) = (&eval.given, &eval.with_condition) {
            lines.push((
                format!("accuracy given the {given}"),
                bins.iter().map(|b| (mid(b), b.accuracy)).collect(),
                blue,
                true,
            ));
            lines.push((
                format!("ECE given the {given}"),
                bins.iter().map(|b| (mid(b), b.ece)).collect(),
                orange,
                true,
            ));
        }
        for (name, pts, color, dashed) in lines {
            let style = color.stroke_width(2);
            let series = match dashed {
                false => chart.draw_series(LineSeries::new(pts, style)).map_err(err)?,
                true => chart
                    .draw_series(DashedLineSeries::new(pts, 6, 4, style))
                    .map_err(err)?,
            };
            // The legend's key: one stroke, or two with a gap for a dashed line.
            let (end, start) = if dashed { (7, 11) } else { (9, 9) };
            series.label(name).legend(move |(x, y)| {
                EmptyElement::at((x, y))
                    + PathElement::new(vec![(0, 0), (end, 0)], color.stroke_width(2))
                    + PathElement::new(vec![(start, 0), (18, 0)], color.stroke_width(2))
            });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::MiddleLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK.mix(0.3))
            .label_font(("sans-serif", 11))
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// The loss smoothed without lag: at each point, the geometric mean of the points around it (a
/// window centred on it, about 4% of the run, narrower near both ends). A trailing average lags a
/// falling loss by half its window: at the start of a run, hundreds of steps.
fn smoothed(pts: &[(u64, f64)]) -> Vec<(u64, f64)> {
    let logs: Vec<f64> = pts.iter().map(|p| p.1.ln()).collect();
    let half = (pts.len() / 50).max(1);
    (0..pts.len())
        .map(|i| {
            let h = half.min(i).min(pts.len() - 1 - i);
            let window = &logs[i - h..=i + h];
            (pts[i].0, (window.iter().sum::<f64>() / window.len() as f64).exp())
        })
        .collect()
}

/// Tick values for a log axis over [lo, hi]: 1, 2, 3, 5 x 10^e inside it, or more mantissas
/// (1.5, 4, 6, 7, 8 too) when that leaves fewer than 4 ticks (a loss falling from 1.5 to 0.3).
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let ticks = |mantissas: &[f64]| -> Vec<f64> {
        let (e0, e1) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
        (e0..=e1)
            .flat_map(|e| {
                mantissas.iter().map(move |m| match e {
                    e if e < 0 => m / 10f64.powi(-e), // 3 / 10 is 0.3; 3 * 0.1 is not
                    e => m * 10f64.powi(e),
                })
            })
            .filter(|v| (lo..=hi).contains(v))
            .collect()
    };
    let few = ticks(&[1.0, 2.0, 3.0, 5.0]);
    match few.len() {
        0..4 => ticks(&[1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]),
        _ => few,
    }
}

/// A tick's label with the digits it needs: 0.3, 1.5, 20.
fn tick_label(v: f64) -> String {
    let decimals = (1 - v.log10().floor() as i32).max(0) as usize;
    let s = format!("{v:.decimals$}");
    match s.contains('.') {
        true => s.trim_end_matches('0').trim_end_matches('.').to_string(),
        false => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_ticks_label_a_narrow_range_several_times() {
        assert_eq!(log_ticks(0.27, 1.8), vec![0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0, 1.5]);
        assert_eq!(
            log_ticks(0.01, 3.0),
            vec![0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 3.0]
        );
        let labels: Vec<String> = [0.3, 1.5, 20.0, 0.05].map(tick_label).to_vec();
        assert_eq!(labels, ["0.3", "1.5", "20", "0.05"]);
    }

    #[test]
    fn the_smoothed_loss_does_not_lag_a_falling_loss() {
        // A loss falling fast from 1.6 to 0.3 in the first few hundred steps, logged every 10
        // steps as the trainer does: the smoothed curve stays within 5% of it everywhere (the
        // trailing average drawn before was 2x too high at steps 100-200, 1.25x at 400).
        let pts: Vec<(u64, f64)> = (0..120u64)
            .map(|i| (10 * i, 0.3 + 1.3 * (-((10 * i) as f64) / 60.0).exp()))
            .collect();
        let sm = smoothed(&pts);
        for (p, q) in pts.iter().zip(&sm) {
            assert!((q.1 / p.1 - 1.0).abs() < 0.05, "step {}: {} vs {}", p.0, q.1, p.1);
        }
    }
}
