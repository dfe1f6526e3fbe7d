//! The experiment's outputs: a markdown table per setting and a plot of the score against
//! training FLOPs, one line per system.

use std::collections::BTreeMap;
use std::path::Path;

use plotters::prelude::*;

use crate::experiment::Row;
use crate::images::ImageReport;

fn systems_in_order(rows: &[Row]) -> Vec<String> {
    let mut names: Vec<String> = vec![];
    for r in rows {
        if !names.contains(&r.system) {
            names.push(r.system.clone());
        }
    }
    names
}

fn stages(rows: &[Row]) -> Vec<u32> {
    let mut s: Vec<u32> = rows.iter().map(|r| r.stage_pct).collect();
    s.sort();
    s.dedup();
    s
}

/// The markdown report of one setting: the final stage in full, then the score at every stage.
pub fn markdown(title: &str, rows: &[Row], floor: Option<&ImageReport>, header: &str) -> String {
    let mut s = format!("## {title}\n\n{header}\n\n");
    let st = stages(rows);
    let Some(&last) = st.last() else {
        return s + "(no results yet)\n";
    };
    let final_rows: Vec<&Row> = rows.iter().filter(|r| r.stage_pct == last).collect();
    let images = final_rows.iter().any(|r| r.images.is_some());
    s.push_str(&format!("### At {last}% of the training budget\n\n"));
    // The text setting's rows also say how well the samples show their prompts.
    let prompted = final_rows.iter().any(|r| r.adherence.is_some());
    if images {
        let (extra_head, extra_rule) = match prompted {
            true => (" prompted class ↑ | prompted attributes ↑ |", "---:|---:|"),
            false => ("", ""),
        };
        s.push_str(&format!("| system | train TFLOPs | FD ↓ | precision ↑ | recall ↑ | class TV ↓ |{extra_head} nn-train RMS | sample GFLOPs/img | sample ms/img |\n"));
        s.push_str(&format!(
            "|---|---:|---:|---:|---:|---:|{extra_rule}---:|---:|---:|\n"
        ));
        for r in &final_rows {
            let Some(i) = r.images.as_ref() else { continue };
            let extra = match (prompted, &r.adherence) {
                (true, Some(a)) => format!(" {:.3} | {:.3} |", a.class, a.attributes),
                (true, None) => " – | – |".into(),
                (false, _) => String::new(),
            };
            s.push_str(&format!(
                "| {} | {:.2} | {:.3} | {:.3} | {:.3} | {:.3} |{extra} {:.4} | {:.2} | {:.1} |\n",
                r.system,
                r.train_flops / 1e12,
                i.fd,
                i.precision,
                i.recall,
                i.class_tv,
                i.nn_train_rms,
                r.sample_gflops,
                r.sample_seconds * 1e3
            ));
        }
        if let Some(f) = floor {
            let extra = if prompted { " – | – |" } else { "" };
            s.push_str(&format!(
                "| *real train images (floor)* | – | {:.3} | {:.3} | {:.3} | {:.3} |{extra} {:.4} (test imgs) | – | – |\n",
                f.fd, f.precision, f.recall, f.class_tv, f.nn_train_rms
            ));
        }
    } else {
        s.push_str("| system | train GFLOPs | velocity MSE ↓ | energy dist. ↓ | mode-weight TV ↓ | mode weights | sample MFLOPs/sample | sample µs/sample |\n");
        s.push_str("|---|---:|---:|---:|---:|---|---:|---:|\n");
        for r in &final_rows {
            let Some(m) = r.mixture.as_ref() else { continue };
            let w: Vec<String> = m.mode_weights.iter().map(|v| format!("{v:.3}")).collect();
            s.push_str(&format!(
                "| {} | {:.1} | {:.4} | {:.4} | {:.3} | {} | {:.2} | {:.1} |\n",
                r.system,
                r.train_flops / 1e9,
                m.velocity_mse,
                m.energy_distance,
                m.mode_weight_tv,
                w.join(" "),
                r.sample_gflops * 1e3,
                r.sample_seconds * 1e6
            ));
        }
    }
    let metric = if images { "FD" } else { "energy distance" };
    s.push_str(&format!("\n### {metric} at each checkpoint\n\n| system |"));
    for p in &st {
        s.push_str(&format!(" {p}% |"));
    }
    s.push_str("\n|---|");
    s.push_str(&"---:|".repeat(st.len()));
    s.push('\n');
    for name in systems_in_order(rows) {
        s.push_str(&format!("| {name} |"));
        for p in &st {
            match rows.iter().find(|r| r.system == name && r.stage_pct == *p) {
                Some(r) => s.push_str(&format!(" {:.3} |", r.score())),
                None => s.push_str(" – |"),
            }
        }
        s.push('\n');
    }
    if !images {
        s.push_str("\n### Velocity MSE per t bin (final stage)\n\n| system |");
        for b in 0..10 {
            s.push_str(&format!(
                " t {:.1}–{:.1} |",
                b as f64 / 10.0,
                (b + 1) as f64 / 10.0
            ));
        }
        s.push_str("\n|---|");
        s.push_str(&"---:|".repeat(10));
        s.push('\n');
        for r in &final_rows {
            let Some(m) = r.mixture.as_ref() else { continue };
            s.push_str(&format!("| {} |", r.system));
            for v in &m.velocity_mse_by_bin {
                s.push_str(&format!(" {v:.4} |"));
            }
            s.push('\n');
        }
    }
    s
}

/// Score against training FLOPs, one line per system (a dashed line at the floor, if any).
pub fn plot(path: &Path, title: &str, rows: &[Row], floor: Option<f64>) -> anyhow::Result<()> {
    let mut lines: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let order = systems_in_order(rows);
    for r in rows {
        lines
            .entry(r.system.clone())
            .or_default()
            .push((r.train_flops / 1e12, r.score()));
    }
    let xs: Vec<f64> = lines.values().flatten().map(|p| p.0).collect();
    let ys: Vec<f64> = lines
        .values()
        .flatten()
        .map(|p| p.1)
        .chain(floor)
        .filter(|v| v.is_finite())
        .collect();
    if xs.is_empty() || ys.is_empty() {
        return Ok(());
    }
    let (x_max, y_max) = (
        xs.iter().cloned().fold(0.0, f64::max) * 1.05,
        ys.iter().cloned().fold(0.0, f64::max) * 1.1,
    );
    let y_min = ys.iter().cloned().fold(f64::INFINITY, f64::min).min(0.0);
    ddm_trainer::plot::register_font();
    let (w, h) = (960usize, 600usize);
    let mut buf = vec![255u8; w * h * 3];
    draw(
        &mut buf,
        (w, h),
        title,
        &order,
        &lines,
        floor,
        rows,
        (x_max, y_min, y_max),
    )
    .map_err(|e| anyhow::anyhow!("drawing {}: {e}", path.display()))?;
    ddm_core::grid::write_rgb_png(path, &buf, w, h)?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn draw<'a>(
    buf: &'a mut [u8],
    (w, h): (usize, usize),
    title: &str,
    order: &[String],
    lines: &BTreeMap<String, Vec<(f64, f64)>>,
    floor: Option<f64>,
    rows: &[Row],
    (x_max, y_min, y_max): (f64, f64, f64),
) -> Result<(), Box<dyn std::error::Error + 'a>> {
    let root = BitMapBackend::with_buffer(buf, (w as u32, h as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max, y_min..y_max)?;
    let y_desc = if rows.iter().any(|r| r.images.is_some()) {
        "FD (classifier features)"
    } else {
        "energy distance"
    };
    chart
        .configure_mesh()
        .x_desc("training TFLOPs (experts + router, or monolith)")
        .y_desc(y_desc)
        .draw()?;
    for (i, name) in order.iter().enumerate() {
        let mut pts = lines[name].clone();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let color = Palette99::pick(i).to_rgba();
        let style = if name == "monolith" {
            color.stroke_width(4)
        } else {
            color.stroke_width(2)
        };
        chart
            .draw_series(LineSeries::new(pts.clone(), style))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3)));
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    }
    floor_and_legend(&mut chart, floor, (0.0, x_max))?;
    root.present()?;
    Ok(())
}

/// The floor as a dashed grey line across `[x0, x1]` (if any), and the legend in the upper
/// right: how every FD plot ends.
pub fn floor_and_legend<'a, DB: DrawingBackend + 'a, X: Ranged<ValueType = f64>>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<X, plotters::coord::types::RangedCoordf64>>,
    floor: Option<f64>,
    (x0, x1): (f64, f64),
) -> Result<(), Box<dyn std::error::Error + 'a>> {
    if let Some(f) = floor {
        let grey = RGBColor(120, 120, 120);
        chart
            .draw_series(DashedLineSeries::new(
                vec![(x0, f), (x1, f)],
                6,
                4,
                grey.stroke_width(1),
            ))?
            .label("real images (floor)")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], grey));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    Ok(())
}
