//! Nearest-neighbour metrics on feature (or pixel) vectors, row-major `f32` `[n, dim]`:
//! - improved precision and recall (Kynkäänniemi et al., 2019): each set's manifold is the union of
//!   balls around its points with radius the distance to the point's k-th nearest neighbour;
//!   precision is the fraction of generated points inside the real manifold, recall the fraction of
//!   real points inside the generated one;
//! - the distance from each sample to its nearest training sample (a memorisation check).
//!
//! Distances come from one matrix product: |a - b|^2 = |a|^2 + |b|^2 - 2 a.b.

use ddm_datasets::linalg::matmul_abt;
use rayon::prelude::*;

fn sq_norms(x: &[f32], dim: usize) -> Vec<f32> {
    x.chunks(dim).map(|r| r.iter().map(|v| v * v).sum()).collect()
}

/// Squared distances between every row of `a` and every row of `b`: `[na, nb]`.
pub fn sq_distances(a: &[f32], b: &[f32], dim: usize) -> Vec<f32> {
    let (na, nb) = (a.len() / dim, b.len() / dim);
    let (a2, b2) = (sq_norms(a, dim), sq_norms(b, dim));
    let mut d = matmul_abt(a, b, na, nb, dim);
    d.par_chunks_mut(nb).zip(&a2).for_each(|(row, &ai)| {
        for (v, &bj) in row.iter_mut().zip(&b2) {
            *v = (ai + bj - 2.0 * *v).max(0.0);
        }
    });
    d
}

/// For each row of `x`: the distance to its `k`-th nearest other row.
pub fn knn_radii(x: &[f32], dim: usize, k: usize) -> Vec<f32> {
    let n = x.len() / dim;
    assert!(k >= 1 && k < n, "k = {k} needs more than k points (got {n})");
    let d = sq_distances(x, x, dim);
    d.par_chunks(n)
        .map(|row| {
            let mut r = row.to_vec();
            // Index 0 after selection is the point itself (distance 0); index k its k-th neighbour.
            r.select_nth_unstable_by(k, |a, b| a.total_cmp(b));
            r[k].sqrt()
        })
        .collect()
}

/// The fraction of rows of `query` that lie inside at least one ball (centre row of `support`,
/// radius `radii`).
fn coverage(query: &[f32], support: &[f32], radii: &[f32], dim: usize) -> f64 {
    let ns = support.len() / dim;
    let d = sq_distances(query, support, dim);
    let inside = d
        .par_chunks(ns)
        .filter(|row| {
            row.iter()
                .zip(radii)
                .any(|(&dd, &r)| dd.sqrt() <= r * (1.0 + 1e-6))
        })
        .count();
    inside as f64 / (query.len() / dim) as f64
}

/// Improved precision and recall of `fake` against `real`, with `k`-NN balls (the paper uses 3).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PrecisionRecall {
    pub precision: f64,
    pub recall: f64,
}

pub fn precision_recall(real: &[f32], fake: &[f32], dim: usize, k: usize) -> PrecisionRecall {
    let real_r = knn_radii(real, dim, k);
    let fake_r = knn_radii(fake, dim, k);
    PrecisionRecall {
        precision: coverage(fake, real, &real_r, dim),
        recall: coverage(real, fake, &fake_r, dim),
    }
}

/// For each row of `a`: the distance to the nearest row of `b` (`b` processed in blocks, so a
/// large training set never needs a full distance matrix).
pub fn nearest_distances(a: &[f32], b: &[f32], dim: usize) -> Vec<f32> {
    let na = a.len() / dim;
    let mut best = vec![f32::INFINITY; na];
    const BLOCK: usize = 8192;
    for chunk in b.chunks(BLOCK * dim) {
        let nb = chunk.len() / dim;
        let d = sq_distances(a, chunk, dim);
        for (bi, row) in best.iter_mut().zip(d.chunks(nb)) {
            *bi = row.iter().copied().fold(*bi, f32::min);
        }
    }
    best.into_iter().map(f32::sqrt).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distances_match_the_definition() {
        let a = [0.0, 0.0, 3.0, 4.0];
        let b = [0.0, 4.0, 6.0, 8.0];
        let d = sq_distances(&a, &b, 2);
        assert_eq!(d, vec![16.0, 100.0, 9.0 + 0.0, 25.0]);
        assert_eq!(nearest_distances(&a, &b, 2), vec![4.0, 3.0]);
    }

    #[test]
    fn radii_are_kth_neighbours() {
        let x = [0.0, 1.0, 3.0, 10.0];
        assert_eq!(knn_radii(&x, 1, 1), vec![1.0, 1.0, 2.0, 7.0]);
        assert_eq!(knn_radii(&x, 1, 2), vec![3.0, 2.0, 3.0, 9.0]);
    }
}
