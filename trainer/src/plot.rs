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
    let pts: Vec<(u64, f64)> = points
        .iter()
        .copied()
        .filter(|p| p.1.is_finite() && p.1 > 0.0)
        .collect();
    if pts.len() < 2 {
        return Ok(());
    }
    register_font();
    let (w, h) = (900usize, 520usize);
    let mut buf = vec![255u8; w * h * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w as u32, h as u32)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let x_max = pts.last().map(|p| p.0).unwrap_or(1).max(1);
        let lo = pts.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
        let hi = pts.iter().map(|p| p.1).fold(0.0, f64::max);
        let (y_lo, y_hi) = (lo * 0.9, hi * 1.1);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d(
                0u64..x_max,
                (y_lo..y_hi).log_scale().with_key_points(log_ticks(y_lo, y_hi)),
            )
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("flow-matching loss (log scale)")
            .y_label_formatter(&|v| tick_label(*v))
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), RGBColor(150, 170, 220)))
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        chart
            .draw_series(LineSeries::new(
                smoothed(&pts),
                RGBColor(20, 60, 160).stroke_width(2),
            ))
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        root.present().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    }
    ddm_core::grid::write_rgb_png(path, &buf, w, h)?;
    Ok(())
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
