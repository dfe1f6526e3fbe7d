//! The Fréchet distance between two sets of features, each summarised by a Gaussian (mean and
//! covariance), as in FID:
//!
//!   FD = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2)).
//!
//! tr((S_a S_b)^(1/2)) is computed without a non-symmetric matrix square root: with
//! A = S_a^(1/2) (symmetric, from an eigen-decomposition), S_a S_b is similar to A S_b A, which is
//! symmetric positive semi-definite, so the trace is the sum of the square roots of its
//! eigenvalues. Everything is in f64.

use nalgebra::{DMatrix, SymmetricEigen};

/// Mean and covariance of a feature set.
#[derive(Debug, Clone, PartialEq)]
pub struct Gaussian {
    pub dim: usize,
    /// Samples the statistics came from.
    pub n: usize,
    pub mean: Vec<f64>,
    /// Row-major `[dim, dim]`, unbiased (divides by n - 1), as numpy's `np.cov`.
    pub cov: Vec<f64>,
}

impl Gaussian {
    /// Statistics of `n` feature vectors of length `dim`, row-major in `x`.
    pub fn fit(x: &[f32], n: usize, dim: usize) -> Self {
        assert_eq!(x.len(), n * dim, "features must be [n, dim]");
        assert!(n >= 2, "a covariance needs at least two samples");
        let mut mean = vec![0f64; dim];
        for row in x.chunks(dim) {
            for (m, &v) in mean.iter_mut().zip(row) {
                *m += v as f64;
            }
        }
        mean.iter_mut().for_each(|m| *m /= n as f64);
        // Centred copy, then C = X^T X / (n - 1) through nalgebra's gemm.
        let centred = DMatrix::<f64>::from_fn(n, dim, |i, j| x[i * dim + j] as f64 - mean[j]);
        let c = centred.tr_mul(&centred) / (n as f64 - 1.0);
        let cov = (0..dim * dim).map(|k| c[(k / dim, k % dim)]).collect();
        Self { dim, n, mean, cov }
    }

    fn matrix(&self) -> DMatrix<f64> {
        DMatrix::from_row_slice(self.dim, self.dim, &self.cov)
    }
}

/// The symmetric square root of a symmetric positive semi-definite matrix (negative eigenvalues
/// from rounding are clamped to zero).
fn sqrtm_psd(m: &DMatrix<f64>) -> DMatrix<f64> {
    let e = SymmetricEigen::new(m.clone());
    let s = e.eigenvalues.map(|v| v.max(0.0).sqrt());
    &e.eigenvectors * DMatrix::from_diagonal(&s) * e.eigenvectors.transpose()
}

/// The Fréchet distance between the Gaussians `a` and `b`.
pub fn frechet_distance(a: &Gaussian, b: &Gaussian) -> f64 {
    assert_eq!(a.dim, b.dim, "feature dimensions differ");
    let mean_term: f64 = a.mean.iter().zip(&b.mean).map(|(x, y)| (x - y) * (x - y)).sum();
    let (sa, sb) = (a.matrix(), b.matrix());
    let root_a = sqrtm_psd(&sa);
    let mut inner = &root_a * &sb * &root_a;
    inner = (&inner + inner.transpose()) * 0.5; // symmetric up to rounding; make it exactly so
    let tr_sqrt: f64 = SymmetricEigen::new(inner)
        .eigenvalues
        .iter()
        .map(|&v| v.max(0.0).sqrt())
        .sum();
    (mean_term + sa.trace() + sb.trace() - 2.0 * tr_sqrt).max(0.0)
}

/// FD between two raw feature sets.
pub fn frechet_distance_of(a: &[f32], b: &[f32], dim: usize) -> f64 {
    frechet_distance(
        &Gaussian::fit(a, a.len() / dim, dim),
        &Gaussian::fit(b, b.len() / dim, dim),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_dimensional_closed_form() {
        // N(m1, s1^2) vs N(m2, s2^2): FD = (m1 - m2)^2 + (s1 - s2)^2.
        let a = Gaussian {
            dim: 1,
            n: 2,
            mean: vec![1.0],
            cov: vec![4.0],
        };
        let b = Gaussian {
            dim: 1,
            n: 2,
            mean: vec![-1.0],
            cov: vec![1.0],
        };
        assert!((frechet_distance(&a, &b) - (4.0 + 1.0)).abs() < 1e-12);
    }
}
