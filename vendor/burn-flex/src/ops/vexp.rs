//! A vectorisable `exp` for f32 and the sigmoid built on it (a ddm patch; see VENDORED.md).
//!
//! `f32::exp` is a call into libm per element, so the sigmoid of a DiT's GELU (x * sigmoid(2z)) cost
//! about 9% of a training step. This is the Cephes `expf` (range reduction by ln 2 in two parts, a
//! degree-6 polynomial, 2^n by exponent bits; relative error below 2e-7) written branch-free in
//! plain multiplies and adds, so LLVM vectorises the loop; it is compiled for AVX-512 and AVX2
//! as well and picked at run time. No fused multiply-adds: every path computes every element
//! with the same IEEE operations, so results are identical on every CPU and thread count.

const LOG2E: f32 = core::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// exp saturates outside this range (keeps 2^n a normal float).
const X_MIN: f32 = -87.0;
const X_MAX: f32 = 88.0;

/// e^x (relative error below 2e-7 on [X_MIN, X_MAX]; NaN stays NaN).
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    let x = x.clamp(X_MIN, X_MAX);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_2e-4;
    let p = p * r + 1.398_2e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 5.000_000_1e-1;
    let y = p * (r * r) + r + 1.0;
    // 2^n through the exponent bits; n is in [-126, 127] after the clamp. n + 127 + 2^23 holds the
    // integer n + 127 in its low mantissa bits, shifted into the exponent field: the same bits as
    // `(n as i32 + 127) << 23`, without the float-to-int `as` (saturating, NaN-checked), which
    // LLVM does not vectorise.
    let scale = f32::from_bits((n + (127.0 + 8_388_608.0)).to_bits() << 23);
    y * scale
}

/// 1 / (1 + e^-x), from e^-|x| so that neither branch overflows.
#[inline(always)]
pub fn sigmoid_f32(x: f32) -> f32 {
    let e = exp_f32(-x.abs());
    let s = 1.0 / (1.0 + e);
    if x >= 0.0 { s } else { e * s }
}

#[inline(always)]
fn sigmoid_slice_generic(s: &mut [f32]) {
    for x in s.iter_mut() {
        *x = sigmoid_f32(*x);
    }
}

#[cfg(all(feature = "std", target_arch = "x86_64"))]
#[target_feature(enable = "avx512f")]
fn sigmoid_slice_avx512(s: &mut [f32]) {
    sigmoid_slice_generic(s)
}

#[cfg(all(feature = "std", target_arch = "x86_64"))]
#[target_feature(enable = "avx2")]
fn sigmoid_slice_avx2(s: &mut [f32]) {
    sigmoid_slice_generic(s)
}

/// ddm patch: whether the AVX-512 paths may run: the CPU has AVX-512F and `DDM_CPU_CAPABILITY` is
/// not `avx2` (which measures an AVX2 machine on an AVX-512 one; ddm's vendored gemm-common and
/// macerator read it too). Read once.
#[cfg(all(feature = "std", target_arch = "x86_64"))]
pub fn avx512() -> bool {
    static AVX512: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVX512.get_or_init(|| {
        std::is_x86_feature_detected!("avx512f")
            && std::env::var_os("DDM_CPU_CAPABILITY").is_none_or(|v| v != "avx2")
    })
}

/// The sigmoid of every element of `s`, in place, with the widest vectors this CPU has.
pub fn sigmoid_slice(s: &mut [f32]) {
    #[cfg(all(feature = "std", target_arch = "x86_64"))]
    {
        if avx512() {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { sigmoid_slice_avx512(s) };
        }
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2.
            return unsafe { sigmoid_slice_avx2(s) };
        }
    }
    sigmoid_slice_generic(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (exp_f32(x) as f64, (x as f64).exp());
            worst = worst.max(((a - b) / b).abs());
            x += 0.013;
        }
        assert!(worst < 2e-7, "worst relative error {worst}");
        assert!(exp_f32(f32::NAN).is_nan());
        assert_eq!(exp_f32(-1000.0), exp_f32(X_MIN));
    }

    #[test]
    fn sigmoid_matches_the_reference_and_is_the_same_on_every_path() {
        let xs: Vec<f32> = (0..4001).map(|i| (i as f32 - 2000.0) * 0.05).collect();
        let mut v = xs.clone();
        sigmoid_slice(&mut v);
        let mut g = xs.clone();
        sigmoid_slice_generic(&mut g);
        assert_eq!(v, g, "vector and scalar paths differ");
        for (&x, &s) in xs.iter().zip(&v) {
            let r = 1.0 / (1.0 + (-(x as f64)).exp());
            assert!((s as f64 - r).abs() < 1e-7 + 2e-7 * r, "sigmoid({x}) = {s}, expected {r}");
        }
    }
}
