//! The CPU kernels ddm changed in its copy of burn-flex (vendor/burn-flex, VENDORED.md): element-wise
//! ops split across threads, the vectorised sigmoid, and ordered parallel sums. Each is checked
//! against an f64 reference on the host at several shapes (odd sizes, and sizes on both sides of
//! the threshold where loops go parallel), with gradients where autodiff uses them, and run on
//! one thread and on all: the results must be bit-identical.

use ddm_core::burn::prelude::*;
use ddm_core::burn::tensor::activation::sigmoid;
use ddm_core::dit::gelu_tanh;
use ddm_core::host::HostTensor;
use rand::{Rng, SeedableRng};

const SHAPES: [[usize; 2]; 4] = [[3, 5], [97, 131], [257, 129], [64 * 49, 1024]];

fn data(shape: [usize; 2], seed: u64, scale: f32) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..shape[0] * shape[1])
        .map(|_| scale * (rng.random::<f32>() * 2.0 - 1.0))
        .collect()
}

fn tensor(shape: [usize; 2], v: &[f32], device: &Device) -> Tensor<2> {
    HostTensor::new(shape.to_vec(), v.to_vec()).to_tensor::<2>(device)
}

fn host(t: Tensor<2>) -> Vec<f32> {
    HostTensor::from_tensor(t).data
}

fn close(got: &[f32], want: impl Fn(usize) -> f64, tol: f64, what: &str) {
    for (i, &g) in got.iter().enumerate() {
        let w = want(i);
        assert!(
            (g as f64 - w).abs() <= tol * (1.0 + w.abs()),
            "{what}[{i}] = {g}, expected {w}"
        );
    }
}

/// Every element-wise form the DiT uses: same-shape, row- and column-broadcast, scalar, unary.
fn elementwise(shape: [usize; 2], device: &Device) -> Vec<Vec<f32>> {
    let (a, b) = (data(shape, 1, 3.0), data(shape, 2, 3.0));
    let row = data([1, shape[1]], 3, 1.0);
    let col = data([shape[0], 1], 4, 1.0);
    let t = |v: &[f32]| tensor(shape, v, device);
    vec![
        host(t(&a) + t(&b)),
        host(t(&a) * t(&b)),
        host(t(&a) - t(&b)),
        host(t(&a) / (t(&b).abs() + 1.0)),
        host(t(&a) * tensor([1, shape[1]], &row, device)),
        host(t(&a) + tensor([shape[0], 1], &col, device)),
        host(t(&a) * 0.5 + 1.0),
        host(t(&a).exp()),
        host(sigmoid(t(&a))),
        host(gelu_tanh(t(&a))),
        // A non-contiguous operand: the transpose of a square block.
        host(
            t(&a)
                .narrow(1, 0, shape[0].min(shape[1]))
                .narrow(0, 0, shape[0].min(shape[1]))
                .swap_dims(0, 1)
                * 2.0,
        ),
    ]
}

#[test]
fn elementwise_ops_match_f64_and_do_not_depend_on_threads() {
    let device = ddm_core::device::cpu();
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let two = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    for shape in SHAPES {
        let (a, b) = (data(shape, 1, 3.0), data(shape, 2, 3.0));
        let (row, col) = (data([1, shape[1]], 3, 1.0), data([shape[0], 1], 4, 1.0));
        let r = elementwise(shape, &device);
        let (a64, b64) = (|i: usize| a[i] as f64, |i: usize| b[i] as f64);
        let cols = shape[1];
        close(&r[0], |i| a64(i) + b64(i), 1e-7, "add");
        close(&r[1], |i| a64(i) * b64(i), 1e-7, "mul");
        close(&r[2], |i| a64(i) - b64(i), 1e-7, "sub");
        close(&r[3], |i| a64(i) / (b64(i).abs() + 1.0), 1e-6, "div");
        close(&r[4], |i| a64(i) * row[i % cols] as f64, 1e-7, "row broadcast");
        close(&r[5], |i| a64(i) + col[i / cols] as f64, 1e-7, "column broadcast");
        close(&r[6], |i| a64(i) * 0.5 + 1.0, 1e-7, "scalar");
        close(&r[7], |i| a64(i).exp(), 1e-6, "exp");
        close(&r[8], |i| 1.0 / (1.0 + (-a64(i)).exp()), 3e-7, "sigmoid");
        let gelu = |x: f64| 0.5 * x * (1.0 + (0.797_884_560_802_865_4 * (x + 0.044715 * x.powi(3))).tanh());
        close(&r[9], |i| gelu(a64(i)), 1e-6, "gelu");
        let m = shape[0].min(shape[1]);
        close(
            &r[10],
            |i| 2.0 * a[(i % m) * cols + i / m] as f64,
            1e-7,
            "transposed",
        );
        // The same bits on one thread and on two.
        assert_eq!(
            one.install(|| elementwise(shape, &device)),
            r,
            "1 thread vs default, {shape:?}"
        );
        assert_eq!(
            two.install(|| elementwise(shape, &device)),
            r,
            "2 threads vs default, {shape:?}"
        );
    }
}

/// d gelu_tanh / dx through burn's autodiff (the composed ops, sigmoid's backward included)
/// against the analytic derivative, and the same bits on one thread and on all.
#[test]
fn gelu_tanh_gradient_matches_the_analytic_derivative() {
    let device = ddm_core::device::cpu().autodiff();
    let grad = |shape: [usize; 2], v: &[f32]| {
        let x = tensor(shape, v, &device).require_grad();
        let y = gelu_tanh(x.clone()).sum();
        let g = y.backward();
        HostTensor::from_tensor(x.grad(&g).expect("x has a gradient")).data
    };
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let c = 0.797_884_560_802_865_4f64;
    let d_gelu = |x: f64| {
        let u = c * (x + 0.044715 * x.powi(3));
        let th = u.tanh();
        0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * c * (1.0 + 3.0 * 0.044715 * x * x)
    };
    for shape in SHAPES {
        let v = data(shape, 7, 4.0);
        let g = grad(shape, &v);
        close(&g, |i| d_gelu(v[i] as f64), 2e-6, "d gelu");
        assert_eq!(
            one.install(|| grad(shape, &v)),
            g,
            "gradient on 1 thread, {shape:?}"
        );
    }
}

/// Large sums (above the size where flex sums in parallel) are the same bits on every run and
/// thread count, and match the f64 sum.
#[test]
fn large_sums_are_ordered_and_accurate() {
    let device = ddm_core::device::cpu();
    let shape = [4096, 1100];
    let v = data(shape, 9, 1.0);
    let sum = || HostTensor::from_tensor(tensor(shape, &v, &device).sum()).data[0];
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let s = sum();
    for _ in 0..3 {
        assert_eq!(sum().to_bits(), s.to_bits());
    }
    assert_eq!(one.install(sum).to_bits(), s.to_bits());
    let exact: f64 = v.iter().map(|&x| x as f64).sum();
    assert!(
        (s as f64 - exact).abs() < 1e-3 * (1.0 + exact.abs()),
        "{s} vs {exact}"
    );
}

/// Matrix products as burn's autodiff computes a Linear layer's weight gradient (xᵀ dy: a
/// transposed view, k much longer than m and n, which vendor/burn-flex splits in two halves of
/// k), and a forward shape, against an f64 product on the host; the same bits on one thread.
#[test]
fn matmul_long_reduction_matches_f64() {
    let device = ddm_core::device::cpu();
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    // (m, k, n)
    for (m, k, n) in [(37, 1001, 29), (256, 3136, 96), (300, 250, 70)] {
        let (x, dy) = (data([k, m], 11, 1.0), data([k, n], 12, 1.0));
        let product = || {
            host(
                tensor([k, m], &x, &device)
                    .transpose()
                    .matmul(tensor([k, n], &dy, &device)),
            )
        };
        let got = product();
        close(
            &got,
            |i| {
                (0..k)
                    .map(|r| x[r * m + i / n] as f64 * dy[r * n + i % n] as f64)
                    .sum()
            },
            2e-5 * (k as f64).sqrt(),
            "xᵀ dy",
        );
        assert_eq!(one.install(product), got, "1 thread vs all, {m} x {k} x {n}");
    }
}
