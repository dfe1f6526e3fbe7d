//! The loss curve (`OUT/loss.png`): loss per logged step on a log scale, with a smoothed line,
//! redrawn at every checkpoint so a person can see a run's progress while it trains.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;

/// DejaVu Sans (its licence: trainer/assets/DejaVuSans-LICENSE), embedded so plots have text on
/// machines without fonts.
const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

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
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d(0u64..x_max, (lo * 0.9..hi * 1.1).log_scale())
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("flow-matching loss")
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), RGBColor(150, 170, 220)))
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        // Exponential smoothing over the logged points (about a tenth of them).
        let a = (10.0 / pts.len() as f64).clamp(0.02, 0.5);
        let mut s = pts[0].1;
        let smooth: Vec<(u64, f64)> = pts
            .iter()
            .map(|&(x, y)| {
                s = (1.0 - a) * s + a * y;
                (x, s)
            })
            .collect();
        chart
            .draw_series(LineSeries::new(smooth, RGBColor(20, 60, 160).stroke_width(2)))
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        root.present().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    }
    ddm_core::grid::write_rgb_png(path, &buf, w, h)?;
    Ok(())
}
