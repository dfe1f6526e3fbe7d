//! The few dense linear-algebra kernels clustering needs: matrix products through the `gemm` crate
//! (the same SIMD kernels burn's CPU backend uses), and PCA through nalgebra's symmetric eigen
//! solver. Matrices are row-major `f32` slices.

use nalgebra::{DMatrix, SymmetricEigen};
use rayon::prelude::*;

/// `out[m, n] = a[m, k] · b[n, k]^T` (e.g. dot products of every point with every centroid).
/// Rows of `a` are split across rayon threads; each block runs a single-threaded gemm.
pub fn matmul_abt(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    assert_eq!(a.len(), m * k);
    assert_eq!(b.len(), n * k);
    let mut out = vec![0f32; m * n];
    const BLOCK: usize = 2048;
    out.par_chunks_mut(BLOCK * n)
        .zip(a.par_chunks(BLOCK * k))
        .for_each(|(o, a)| {
            let rows = a.len() / k.max(1);
            // SAFETY: all strides describe in-bounds row-major buffers of the stated sizes:
            // dst [rows, n], lhs [rows, k], rhs = b^T, element (kk, j) at b[j * k + kk].
            unsafe {
                gemm::gemm(
                    rows,
                    n,
                    k,
                    o.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    a.as_ptr(),
                    1,
                    k as isize,
                    b.as_ptr(),
                    k as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        });
    out
}

/// `out[k, k] = x^T x` for `x` `[n, k]` (a scatter matrix), accumulated in f64 over row blocks.
pub fn gram(x: &[f32], n: usize, k: usize) -> Vec<f64> {
    assert_eq!(x.len(), n * k);
    const BLOCK: usize = 4096;
    x.par_chunks(BLOCK * k)
        .map(|blk| {
            let rows = blk.len() / k;
            let mut o = vec![0f32; k * k];
            // SAFETY: lhs = blk^T (element (i, r) at blk[r * k + i]), rhs = blk [rows, k], dst [k, k].
            unsafe {
                gemm::gemm(
                    k,
                    k,
                    rows,
                    o.as_mut_ptr(),
                    1,
                    k as isize,
                    false,
                    blk.as_ptr(),
                    k as isize,
                    1,
                    blk.as_ptr(),
                    1,
                    k as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            o.into_iter().map(|v| v as f64).collect::<Vec<f64>>()
        })
        .reduce(
            || vec![0f64; k * k],
            |mut a, b| {
                a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                a
            },
        )
}

/// A fitted PCA: `project(x) = (x - mean) · components`, components `[dim, d]`.
#[derive(Debug, Clone)]
pub struct Pca {
    pub mean: Vec<f32>,
    /// `[dim, d]`, columns are the top-d principal directions (unit length).
    pub components: Vec<f32>,
    pub dim: usize,
    pub d: usize,
    /// Variance explained by each kept direction.
    pub explained_variance: Vec<f64>,
}

impl Pca {
    /// Fit the top `d` directions of `x` `[n, dim]` (eigenvectors of the covariance).
    ///
    /// The covariance comes from one pass over the data without a centred copy:
    /// C = (X^T X - n mu mu^T) / (n - 1), the Gram matrix accumulated in f64 across row blocks.
    pub fn fit(x: &[f32], n: usize, dim: usize, d: usize) -> Pca {
        let d = d.min(dim);
        let sums = x
            .par_chunks(dim * 4096)
            .map(|blk| {
                let mut s = vec![0f64; dim];
                for row in blk.chunks(dim) {
                    for (a, &v) in s.iter_mut().zip(row) {
                        *a += v as f64;
                    }
                }
                s
            })
            .reduce(
                || vec![0f64; dim],
                |mut a, b| {
                    a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                    a
                },
            );
        let mean: Vec<f64> = sums.iter().map(|s| s / n as f64).collect();
        let g = gram(x, n, dim);
        let mut cov = DMatrix::from_row_slice(dim, dim, &g);
        for i in 0..dim {
            for j in 0..dim {
                cov[(i, j)] = (cov[(i, j)] - n as f64 * mean[i] * mean[j]) / (n.max(2) - 1) as f64;
            }
        }
        let eig = SymmetricEigen::new(cov);
        let mut order: Vec<usize> = (0..dim).collect();
        order.sort_by(|&a, &b| eig.eigenvalues[b].total_cmp(&eig.eigenvalues[a]));
        let mut components = vec![0f32; dim * d];
        for (j, &col) in order.iter().take(d).enumerate() {
            for i in 0..dim {
                components[i * d + j] = eig.eigenvectors[(i, col)] as f32;
            }
        }
        let explained_variance = order.iter().take(d).map(|&c| eig.eigenvalues[c]).collect();
        Pca {
            mean: mean.iter().map(|&m| m as f32).collect(),
            components,
            dim,
            d,
            explained_variance,
        }
    }

    /// Project `x` `[n, dim]` to `[n, d]`: x W - mu W, without a centred copy of x.
    pub fn project(&self, x: &[f32], n: usize) -> Vec<f32> {
        // components^T is [d, dim]: x W = x · (components^T)^T.
        let mut ct = vec![0f32; self.d * self.dim];
        for i in 0..self.dim {
            for j in 0..self.d {
                ct[j * self.dim + i] = self.components[i * self.d + j];
            }
        }
        let mut out = matmul_abt(x, &ct, n, self.d, self.dim);
        let shift = matmul_abt(&self.mean, &ct, 1, self.d, self.dim); // mu W, [1, d]
        out.par_chunks_mut(self.d)
            .for_each(|r| r.iter_mut().zip(&shift).for_each(|(v, s)| *v -= s));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmul_matches_naive() {
        let (m, n, k) = (5000, 7, 13);
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let b: Vec<f32> = (0..n * k)
            .map(|i| ((i * 104729) % 97) as f32 / 48.0 - 1.0)
            .collect();
        let c = matmul_abt(&a, &b, m, n, k);
        for i in [0, 1, 2047, 2048, 4999] {
            for j in 0..n {
                let want: f32 = (0..k).map(|t| a[i * k + t] * b[j * k + t]).sum();
                assert!((c[i * n + j] - want).abs() < 1e-4, "{i},{j}");
            }
        }
        let g = gram(&a, m, k);
        let want: f64 = (0..m).map(|r| (a[r * k + 3] * a[r * k + 5]) as f64).sum();
        assert!((g[3 * k + 5] - want).abs() < 1e-2 * want.abs().max(1.0));
    }

    #[test]
    fn pca_finds_the_dominant_direction() {
        // Points along (3, 4)/5 with small noise in the orthogonal direction.
        let n = 1000;
        let x: Vec<f32> = (0..n)
            .flat_map(|i| {
                let s = (i as f32 / n as f32 - 0.5) * 10.0;
                let e = ((i * 37) % 11) as f32 / 110.0 - 0.05;
                [0.6 * s - 0.8 * e + 1.0, 0.8 * s + 0.6 * e - 2.0]
            })
            .collect();
        let p = Pca::fit(&x, n, 2, 1);
        let (c0, c1) = (p.components[0], p.components[1]);
        assert!(
            (c0.abs() - 0.6).abs() < 1e-3 && (c1.abs() - 0.8).abs() < 1e-3,
            "{c0} {c1}"
        );
        assert!((p.mean[0] - 1.0).abs() < 0.05 && (p.mean[1] + 2.0).abs() < 0.05);
        assert_eq!(p.project(&x, n).len(), n);
    }
}
