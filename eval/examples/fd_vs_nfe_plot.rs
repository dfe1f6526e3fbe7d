//! The FD-vs-NFE plot of README's "Sampling in fewer steps" (`scripts/fd_vs_nfe.sh` runs it):
//! one panel per system (monolith, top-1, trajectory, full), FD against the velocity evaluations
//! per sample on a log axis, one line per solver and schedule, the floor dashed.
//!
//! `cargo run --release -p ddm-eval --example fd_vs_nfe_plot -- FD_JSON OUT_PNG`, where FD_JSON
//! is `ddm eval images --json` over samples named `SYSTEM-SOLVER-SCHEDULE-NFE.safetensors`.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, bail};
use plotters::prelude::*;

const SYSTEMS: [&str; 4] = ["monolith", "top-1", "trajectory", "full"];
const SOLVERS: [&str; 4] = ["euler", "heun", "dpm++2m", "unipc"];

/// (solver, schedule) -> [(NFE, FD)], per system.
type Lines = BTreeMap<String, BTreeMap<(String, String), Vec<(f64, f64)>>>;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [json, out] = args.as_slice() else {
        bail!("usage: fd_vs_nfe_plot FD_JSON OUT_PNG");
    };
    let text = std::fs::read_to_string(json).with_context(|| format!("reading {json}"))?;
    let fd: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{json}: not JSON"))?;
    let (lines, floor) = lines(&fd).with_context(|| format!("{json}: not an FD-vs-NFE report"))?;
    draw(Path::new(out), &lines, floor)
}

/// The points of every line, and the floor's FD.
fn lines(fd: &serde_json::Value) -> anyhow::Result<(Lines, Option<f64>)> {
    let mut lines = Lines::new();
    let mut floor = None;
    for (path, report) in fd.as_object().context("expected an object")? {
        let score = report.get("fd").and_then(|v| v.as_f64());
        if path == "floor" {
            floor = score;
            continue;
        }
        let name = Path::new(path).file_stem().and_then(|s| s.to_str()).unwrap_or("");
        // SYSTEM-SOLVER-SCHEDULE-NFE; SYSTEM may hold a dash (top-1).
        let parts: Vec<&str> = name.rsplitn(4, '-').collect();
        let [nfe, schedule, solver, system] = parts.as_slice() else {
            continue;
        };
        let (Ok(nfe), Some(score)) = (nfe.parse::<f64>(), score) else {
            continue;
        };
        lines
            .entry(system.to_string())
            .or_default()
            .entry((solver.to_string(), schedule.to_string()))
            .or_default()
            .push((nfe, score));
    }
    if lines.is_empty() {
        bail!("no sample named SYSTEM-SOLVER-SCHEDULE-NFE");
    }
    Ok((lines, floor))
}

fn draw(path: &Path, lines: &Lines, floor: Option<f64>) -> anyhow::Result<()> {
    ddm_trainer::plot::register_font();
    let (w, h) = (1200usize, 860usize);
    let mut buf = vec![255u8; w * h * 3];
    let y_max = lines
        .values()
        .flat_map(|l| l.values().flatten())
        .map(|p| p.1)
        .fold(0.0, f64::max)
        * 1.05;
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w as u32, h as u32)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let root = root
            .titled(
                "FD against sampling evaluations (NFE), class-conditional, N = 500",
                ("sans-serif", 22),
            )
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        for (panel, system) in root.split_evenly((2, 2)).iter().zip(SYSTEMS) {
            let Some(by) = lines.get(system) else { continue };
            panel_chart(panel, system, by, floor, y_max).map_err(|e| anyhow::anyhow!("{system}: {e}"))?;
        }
        root.present().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    }
    ddm_core::grid::write_rgb_png(path, &buf, w, h)?;
    Ok(())
}

fn panel_chart<'a>(
    area: &DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>,
    system: &str,
    by: &BTreeMap<(String, String), Vec<(f64, f64)>>,
    floor: Option<f64>,
    y_max: f64,
) -> Result<(), Box<dyn std::error::Error + 'a>> {
    let mut chart = ChartBuilder::on(area)
        .caption(system, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(45)
        .build_cartesian_2d(
            (3.5f64..56.0)
                .log_scale()
                .with_key_points(vec![4.0, 6.0, 8.0, 12.0, 16.0, 25.0, 50.0]),
            0.0..y_max,
        )?;
    chart
        .configure_mesh()
        .x_desc("NFE")
        .y_desc("FD")
        .x_label_formatter(&|v| format!("{v}"))
        .draw()?;
    for ((solver, schedule), pts) in by {
        let i = SOLVERS.iter().position(|s| s == solver).unwrap_or(SOLVERS.len());
        let color = Palette99::pick(i).to_rgba();
        let mut pts = pts.clone();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let label = match schedule.as_str() {
            "uniform" => solver.clone(),
            // File names spell colons as underscores: shifted_3 is `--schedule shifted:3`.
            s => format!("{solver}, {}", s.replace('_', ":")),
        };
        // Uniform solid, shifted dashed, beta dotted.
        let style = color.stroke_width(2);
        let drawn = match schedule.split('_').next() {
            Some("uniform") => chart.draw_series(LineSeries::new(pts.clone(), style))?,
            Some("beta") => chart.draw_series(DashedLineSeries::new(pts.clone(), 2, 4, style))?,
            _ => chart.draw_series(DashedLineSeries::new(pts.clone(), 8, 5, style))?,
        };
        drawn
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    }
    ddm_eval::report::floor_and_legend(&mut chart, floor, (3.5, 56.0))?;
    Ok(())
}
