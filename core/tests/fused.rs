//! The fused DiT and PixArt ops (`kernels/src/fused.rs`) and the VAE's GroupNorm
//! (`kernels/src/group_norm.rs`) against the same operations composed of
//! burn ops (`fused::composite`, differentiated by burn's autodiff): values and the gradients of
//! every input, at several shapes (odd sizes, one token, one channel, the bench DiT's), and the same
//! bits on one thread and on all.

use ddm_core::burn::prelude::*;
use ddm_core::fused::{self, composite};
use ddm_core::group_norm;
use ddm_core::host::HostTensor;
use rand::{Rng, SeedableRng};

mod common;
use common::assert_close;

/// `[N, T, D]`.
const SHAPES: [[usize; 3]; 6] = [
    [1, 1, 1],
    [2, 3, 1],
    [2, 3, 5],
    [3, 7, 33],
    [5, 49, 256],
    [64, 49, 256],
];

fn data(len: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..len)
        .map(|_| scale * (rng.random::<f32>() * 2.0 - 1.0))
        .collect()
}

fn tensor<const D: usize>(shape: [usize; D], seed: u64, scale: f32, device: &Device) -> Tensor<D> {
    let v = data(shape.iter().product(), seed, scale);
    HostTensor::new(shape.to_vec(), v).to_tensor::<D>(device)
}

fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    HostTensor::from_tensor(t).data
}

/// An op on `[*, *, D]` inputs.
type Op = dyn Fn(&[Tensor<3>]) -> Tensor<3> + Sync;

/// One op's output and its inputs' gradients for a random upstream gradient, either fused or
/// composite: `op(inputs) -> output`, inputs given as (shape, seed, scale).
fn run(inputs: &[(Vec<usize>, u64, f32)], op: &Op) -> (Vec<f32>, Vec<Vec<f32>>) {
    let device = ddm_core::device::cpu().autodiff();
    // Every input as [*, *, D]: per-sample vectors are [N, 1, D] here and squeezed by the op.
    let xs: Vec<Tensor<3>> = inputs
        .iter()
        .map(|(shape, seed, scale)| {
            let s = [shape[0], shape[1], shape[2]];
            tensor(s, *seed, *scale, &device).require_grad()
        })
        .collect();
    assert!(
        fused::fused_here(&xs[0]),
        "the CPU autodiff device runs the fused kernels"
    );
    let y = op(&xs);
    let w = tensor(y.dims(), 99, 1.0, &device);
    let grads = (y.clone() * w).sum().backward();
    let g = xs
        .iter()
        .map(|x| host(x.grad(&grads).expect("every input has a gradient")))
        .collect();
    (host(y), g)
}

fn check(name: &str, inputs: &[(Vec<usize>, u64, f32)], fused: &Op, composite: &Op, tol: f32) {
    let (y, g) = run(inputs, fused);
    let (y_ref, g_ref) = run(inputs, composite);
    assert_close(&y, &y_ref, tol, &format!("{name} {:?} output", inputs[0].0));
    for (i, (g, g_ref)) in g.iter().zip(&g_ref).enumerate() {
        assert_close(g, g_ref, tol, &format!("{name} {:?} d input {i}", inputs[0].0));
    }
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let (y1, g1) = one.install(|| run(inputs, fused));
    assert!(
        y1 == y && g1 == g,
        "{name} {:?}: 1 thread differs from all",
        inputs[0].0
    );
}

fn vec2(x: &Tensor<3>) -> Tensor<2> {
    let [n, _, d] = x.dims();
    x.clone().reshape([n, d])
}

#[test]
fn gelu_tanh_matches_the_composite() {
    for [n, t, d] in SHAPES {
        check(
            "gelu_tanh",
            &[(vec![n, t, 4 * d], 1, 4.0)],
            &|x| fused::gelu_tanh(x[0].clone()),
            &|x| composite::gelu_tanh(x[0].clone()),
            1e-5,
        );
    }
}

#[test]
fn layer_norm_modulate_matches_the_composite() {
    for [n, t, d] in SHAPES {
        for eps in [1e-6, 1e-5] {
            let inputs = [
                (vec![n, t, d], 1, 3.0),
                (vec![n, 1, d], 2, 1.0),
                (vec![n, 1, d], 3, 1.0),
            ];
            check(
                "layer_norm_modulate",
                &inputs,
                &move |x| fused::layer_norm_modulate(x[0].clone(), vec2(&x[1]), vec2(&x[2]), eps),
                &move |x| composite::layer_norm_modulate(x[0].clone(), vec2(&x[1]), vec2(&x[2]), eps),
                // One channel: x̂ = 0 and the composite's gradient is rounding noise of size eps^-1/2.
                if d == 1 { 1e-2 } else { 2e-4 },
            );
        }
    }
}

#[test]
fn gated_residual_matches_the_composite() {
    for [n, t, d] in SHAPES {
        let inputs = [
            (vec![n, t, d], 1, 3.0),
            (vec![n, 1, d], 2, 1.0),
            (vec![n, t, d], 3, 2.0),
        ];
        check(
            "gated_residual",
            &inputs,
            &|x| fused::gated_residual(x[0].clone(), vec2(&x[1]), x[2].clone()),
            &|x| composite::gated_residual(x[0].clone(), vec2(&x[1]), x[2].clone()),
            1e-5,
        );
    }
}

/// GroupNorm (+ SiLU), the VAE's: x `[N, C, S]` seen as `[N, C, S, 1]`, gamma and beta `[1, 1, C]`
/// seen as `[C]`; odd sizes, one value per group, one group, and a VAE level's.
#[test]
fn group_norm_matches_the_composite() {
    // (N, C, S, groups)
    for (n, c, s, groups) in [
        (1, 1, 1, 1),
        (2, 6, 35, 3),
        (3, 4, 1, 2),
        (2, 5, 9, 1),
        (4, 64, 64, 32),
    ] {
        for silu in [false, true] {
            let inputs = [
                (vec![n, c, s], 1, 3.0),
                (vec![1, 1, c], 2, 1.5),
                (vec![1, 1, c], 3, 1.0),
            ];
            let args = move |x: &[Tensor<3>]| {
                let x4 = x[0].clone().reshape([n, c, s, 1]);
                (x4, x[1].clone().reshape([c]), x[2].clone().reshape([c]))
            };
            check(
                "group_norm",
                &inputs,
                &move |x| {
                    let (x, gamma, beta) = args(x);
                    group_norm::group_norm(x, gamma, beta, groups, 1e-6, silu).reshape([n, c, s])
                },
                &move |x| {
                    let (x, gamma, beta) = args(x);
                    group_norm::composite::group_norm(x, gamma, beta, groups, 1e-6, silu).reshape([n, c, s])
                },
                // One value per group: x̂ = 0 and the composite's gradient is rounding noise.
                if c / groups * s == 1 { 1e-2 } else { 2e-4 },
            );
        }
    }
}

/// Inputs that need no gradient (constants, or the output of a no-grad branch) and views that
/// are not contiguous (the adaLN chunks are narrowed columns of one matrix) take the same path.
#[test]
fn constants_and_strided_views_are_handled() {
    let device = ddm_core::device::cpu().autodiff();
    let (n, t, d) = (4, 9, 12);
    let x = tensor([n, t, d], 1, 2.0, &device).require_grad();
    let m = tensor([n, 3 * d], 2, 1.0, &device); // constant, as [shift | scale | gate]
    let part = |i: usize| m.clone().narrow(1, i * d, d);
    let f = |x: Tensor<3>,
             ln: &dyn Fn(Tensor<3>, Tensor<2>, Tensor<2>) -> Tensor<3>,
             gr: &dyn Fn(Tensor<3>, Tensor<2>, Tensor<3>) -> Tensor<3>| {
        let h = ln(x.clone(), part(0), part(1));
        let y = gr(x.clone(), part(2), h);
        let grads = (y.clone() * y.clone()).sum().backward();
        (host(y), host(x.grad(&grads).unwrap()))
    };
    let (y, g) = f(
        x.clone(),
        &|x, a, b| fused::layer_norm_modulate(x, a, b, 1e-6),
        &fused::gated_residual,
    );
    let (y_ref, g_ref) = f(
        x,
        &|x, a, b| composite::layer_norm_modulate(x, a, b, 1e-6),
        &composite::gated_residual,
    );
    assert_close(&y, &y_ref, 1e-5, "output");
    assert_close(&g, &g_ref, 1e-4, "d x");
}

#[test]
fn attention_matches_the_composite() {
    // [N, T, heads, head size]: one token, one head, odd sizes, the bench DiT's.
    for [n, t, heads, hd] in [
        [1, 1, 1, 1],
        [2, 3, 1, 5],
        [3, 7, 3, 11],
        [2, 49, 4, 64],
        [64, 49, 4, 64],
    ] {
        let d3 = 3 * heads * hd;
        check(
            "attention",
            &[(vec![n, t, d3], 1, 2.0)],
            &move |x| fused::attention(x[0].clone(), heads),
            &move |x| composite::attention(x[0].clone(), heads),
            1e-4,
        );
    }
}

/// A caption mask's bias `[N, L]`: sample i keeps its first L - i tokens (at least one), except
/// sample 2, which is padding only (ddm's null caption).
fn caption_bias(n: usize, l: usize, device: &Device) -> Tensor<2> {
    let mask: Vec<f32> = (0..n)
        .flat_map(|i| (0..l).map(move |j| (i != 2 && j < l.saturating_sub(i).max(1)) as u8 as f32))
        .collect();
    (Tensor::<2>::from_data(TensorData::new(mask, [n, l]), device).neg() + 1.0) * -10000.0
}

#[test]
fn cross_attention_matches_the_composite() {
    // [N, T, L, heads, head size]: one token and one key, one head, odd sizes, a PixArt-S/2's
    // 28 x 28 latents under a 77-token caption.
    for [n, t, l, heads, hd] in [
        [1, 1, 1, 1, 1],
        [2, 3, 2, 1, 5],
        [3, 7, 5, 3, 11],
        [4, 49, 77, 6, 64],
    ] {
        let d = heads * hd;
        check(
            "cross_attention",
            &[(vec![n, t, d], 1, 2.0), (vec![n, l, 2 * d], 2, 2.0)],
            &move |x| {
                let bias = caption_bias(n, l, &x[0].device());
                fused::cross_attention(x[0].clone(), x[1].clone(), bias, heads)
            },
            &move |x| {
                let bias = caption_bias(n, l, &x[0].device());
                composite::cross_attention(x[0].clone(), x[1].clone(), bias, heads)
            },
            1e-4,
        );
    }
}

/// Without autodiff (the sampler's forward) each op runs the plain CPU kernel.
#[test]
fn forward_without_autodiff_matches_the_composite() {
    let device = ddm_core::device::cpu();
    let (n, t, heads, hd) = (5, 9, 3, 7);
    let d = heads * hd;
    let x = tensor([n, t, d], 1, 2.0, &device);
    let qkv = tensor([n, t, 3 * d], 2, 2.0, &device);
    let v = |seed| tensor([n, d], seed, 1.0, &device);
    let affine = |seed| tensor([t], seed, 1.0, &device);
    assert!(fused::fused_here(&x), "the CPU device runs the fused kernels");
    let pairs = [
        (fused::gelu_tanh(x.clone()), composite::gelu_tanh(x.clone())),
        (
            fused::layer_norm_modulate(x.clone(), v(3), v(4), 1e-6),
            composite::layer_norm_modulate(x.clone(), v(3), v(4), 1e-6),
        ),
        (
            fused::gated_residual(x.clone(), v(5), x.clone() * 0.5),
            composite::gated_residual(x.clone(), v(5), x.clone() * 0.5),
        ),
        (
            // x as [N, C = T, S = D] in 3 groups
            group_norm::group_norm(x.clone(), affine(6), affine(7), 3, 1e-6, true),
            group_norm::composite::group_norm(x.clone(), affine(6), affine(7), 3, 1e-6, true),
        ),
        (
            fused::attention(qkv.clone(), heads),
            composite::attention(qkv.clone(), heads),
        ),
        (
            fused::cross_attention(
                x.clone(),
                qkv.clone().narrow(2, 0, 2 * d),
                caption_bias(n, t, &device),
                heads,
            ),
            composite::cross_attention(
                x.clone(),
                qkv.narrow(2, 0, 2 * d),
                caption_bias(n, t, &device),
                heads,
            ),
        ),
    ];
    for (i, (got, want)) in pairs.into_iter().enumerate() {
        assert_close(&host(got), &host(want), 1e-5, &format!("op {i}"));
    }
}

/// `DDM_CPU_CAPABILITY=avx2` runs what an AVX2 + FMA machine runs, on an AVX-512 one: the fused
/// element-wise kernels give the same bits as with AVX-512 (no fused multiply-adds, the same
/// summation order), and those that multiply through gemm (attention, a convolution and its
/// gradients) agree within rounding. The variable is read once per process, so the AVX2 half runs
/// in a child: this test binary, this test, with the variable set and `DDM_TEST_OUT` naming the file
/// it writes its numbers to.
#[test]
fn the_avx2_paths_agree_with_avx512() {
    const OUT: &str = "DDM_TEST_OUT";
    if let Some(path) = std::env::var_os(OUT) {
        let expect = if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            "avx2"
        } else {
            "baseline"
        };
        assert_eq!(
            ddm_core::device::cpu_simd(),
            expect,
            "DDM_CPU_CAPABILITY=avx2 is obeyed"
        );
        let json = serde_json::to_string(&avx2_check_outputs()).unwrap();
        std::fs::write(path, json).unwrap();
        return;
    }
    let path = std::env::temp_dir().join(format!("ddm-avx2-check-{}.json", std::process::id()));
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["the_avx2_paths_agree_with_avx512", "--exact", "--test-threads=1"])
        .env("DDM_CPU_CAPABILITY", "avx2")
        .env(OUT, &path)
        .output()
        .unwrap();
    assert!(
        child.status.success(),
        "the AVX2 run failed:\n{}{}",
        String::from_utf8_lossy(&child.stdout),
        String::from_utf8_lossy(&child.stderr)
    );
    let avx2: (Vec<Vec<f32>>, Vec<Vec<f32>>) =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    std::fs::remove_file(&path).unwrap();
    let (exact, close) = avx2_check_outputs();
    assert!(
        exact == avx2.0,
        "the fused element-wise kernels give other bits with AVX2"
    );
    for (i, (got, want)) in avx2.1.iter().zip(&close).enumerate() {
        assert_close(got, want, 1e-5, &format!("gemm-based output {i} with AVX2"));
    }
}

/// (outputs that must be bit-identical on every SIMD path, outputs that agree within rounding).
fn avx2_check_outputs() -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    use ddm_core::burn::tensor::module::conv2d;
    use ddm_core::burn::tensor::ops::ConvOptions;
    let flat = |(y, g): (Vec<f32>, Vec<Vec<f32>>)| std::iter::once(y).chain(g).collect::<Vec<_>>();
    let mut exact = flat(run(&[(vec![3, 7, 132], 1, 4.0)], &|x| {
        fused::gelu_tanh(x[0].clone())
    }));
    let norm_inputs = [
        (vec![2, 8, 35], 1, 3.0),
        (vec![1, 1, 8], 2, 1.5),
        (vec![1, 1, 8], 3, 1.0),
    ];
    exact.extend(flat(run(&norm_inputs, &|x| {
        let (gamma, beta) = (x[1].clone().reshape([8]), x[2].clone().reshape([8]));
        group_norm::group_norm(x[0].clone().reshape([2, 8, 35, 1]), gamma, beta, 4, 1e-6, true)
            .reshape([2, 8, 35])
    })));
    let mut close = flat(run(&[(vec![2, 49, 3 * 4 * 16], 1, 2.0)], &|x| {
        fused::attention(x[0].clone(), 4)
    }));
    // A 3 x 3 convolution, 16 -> 24 channels on 9 x 9, as [N, C, H*W].
    close.extend(flat(run(
        &[
            (vec![2, 16, 81], 1, 1.0),
            (vec![24, 16, 9], 2, 0.3),
            (vec![1, 1, 24], 3, 1.0),
        ],
        &|x| {
            let options = ConvOptions::new([1, 1], [1, 1], [1, 1], 1);
            let (w, b) = (x[1].clone().reshape([24, 16, 3, 3]), x[2].clone().reshape([24]));
            conv2d(x[0].clone().reshape([2, 16, 9, 9]), w, Some(b), options).reshape([2, 24, 81])
        },
    )));
    (exact, close)
}
