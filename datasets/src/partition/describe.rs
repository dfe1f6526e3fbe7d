//! `ddm partition --describe`: a table of the clusters and a PNG of examples.

use std::path::Path;

use super::*;
use crate::error::Result;

/// A table of the clusters (count, prior, dominant labels), and a PNG with a row of examples per
/// cluster written to `png`.
pub fn describe(dir: &Path, png: Option<&Path>, per_row: usize) -> Result<String> {
    let m = read_manifest(dir)?;
    let names = m.dataset.class_names.clone();
    let mut out = format!(
        "partition {} of {} ({} samples, shape {:?})\nK = {}, features {}, {:?}, seed {}\n\n{:>7} {:>7} {:>7}  dominant labels\n",
        ddm_core::text::short(&m.fingerprint, 12),
        m.dataset.name,
        m.dataset.len,
        m.dataset.shape,
        m.k,
        m.config.features,
        m.config.algorithm,
        m.config.seed,
        "cluster",
        "count",
        "prior"
    );
    for c in &m.clusters {
        let labels = match &c.label_counts {
            Some(counts) => {
                let mut order: Vec<usize> = (0..counts.len()).filter(|&l| counts[l] > 0).collect();
                order.sort_by_key(|&l| std::cmp::Reverse(counts[l]));
                order
                    .iter()
                    .take(3)
                    .map(|&l| {
                        let name = names
                            .as_ref()
                            .and_then(|n| n.get(l))
                            .cloned()
                            .unwrap_or_else(|| format!("label {l}"));
                        format!("{name} {:.0}%", 100.0 * counts[l] as f64 / c.count as f64)
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            }
            None => "(no labels)".into(),
        };
        out.push_str(&format!(
            "{:>7} {:>7} {:>7.4}  {labels}\n",
            c.id, c.count, c.prior
        ));
    }
    if let Some(png) = png {
        if m.dataset.dtype != "u8" || !matches!(m.dataset.shape.len(), 3) {
            out.push_str("(no example grid: the samples are not images)\n");
        } else {
            let mut cells: Vec<Option<Vec<u8>>> = vec![];
            for k in 0..m.k {
                let shard = load_shard(dir, &m, k)?;
                let step = (shard.len() / per_row).max(1);
                for r in 0..per_row {
                    cells.push(
                        (r * step < shard.len())
                            .then(|| shard.image_bytes(r * step).expect("u8 images").to_vec()),
                    );
                }
            }
            let refs: Vec<Option<&[u8]>> = cells.iter().map(|c| c.as_deref()).collect();
            let s = &m.dataset.shape;
            let layout = ddm_core::grid::Layout {
                row_labels: m
                    .clusters
                    .iter()
                    .map(|c| format!("cluster {} ({:.0}%)", c.id, 100.0 * c.prior))
                    .collect(),
                ..ddm_core::grid::Layout::for_people(per_row, s[1])
            };
            ddm_core::grid::write_grid_png_with(png, &refs, [s[0], s[1], s[2]], &layout)?;
            out.push_str(&format!("\nexamples (one row per cluster): {}\n", png.display()));
        }
    }
    Ok(out)
}
