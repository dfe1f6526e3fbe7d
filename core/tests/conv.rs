//! The CPU backend's 2-D convolution (vendor/burn-flex: the tiled im2col + gemm forward that
//! writes its output in place, and ddm's weight and input gradients) against a direct convolution
//! written out in loops: the output and the gradients of the input (ddm's as a convolution at
//! stride 1), the weight and the bias, at odd shapes (stride, padding, dilation, groups, one pixel,
//! several tiles of output positions, tiles of whole samples on small maps, the VAE's
//! downsampling), and the same bits on one thread and on all.

use ddm_core::burn::prelude::*;
use ddm_core::burn::tensor::module::conv2d;
use ddm_core::burn::tensor::ops::ConvOptions;
use ddm_core::host::HostTensor;
use rand::{Rng, SeedableRng};

/// A convolution problem: input `[n, c_in, h, w]`, `c_out` filters of `kernel`, and its options.
#[derive(Debug, Clone, Copy)]
struct Case {
    x: [usize; 4],
    c_out: usize,
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
    dilation: [usize; 2],
    groups: usize,
}

const CASES: [Case; 12] = [
    Case {
        x: [2, 3, 7, 5],
        c_out: 4,
        kernel: [3, 3],
        stride: [1, 1],
        padding: [1, 1],
        dilation: [1, 1],
        groups: 1,
    },
    Case {
        x: [1, 4, 9, 8],
        c_out: 6,
        kernel: [3, 2],
        stride: [2, 1],
        padding: [1, 0],
        dilation: [1, 1],
        groups: 2,
    },
    Case {
        x: [3, 2, 6, 6],
        c_out: 5,
        kernel: [3, 3],
        stride: [1, 1],
        padding: [2, 2],
        dilation: [2, 2],
        groups: 1,
    },
    // 600 output positions: two tiles of 512.
    Case {
        x: [2, 8, 30, 20],
        c_out: 16,
        kernel: [3, 3],
        stride: [1, 1],
        padding: [1, 1],
        dilation: [1, 1],
        groups: 1,
    },
    Case {
        x: [1, 1, 1, 1],
        c_out: 1,
        kernel: [1, 1],
        stride: [1, 1],
        padding: [0, 0],
        dilation: [1, 1],
        groups: 1,
    },
    // Stride 1 with groups, a non-square dilated kernel: the input gradient as a convolution by
    // the swapped, flipped weight.
    Case {
        x: [2, 6, 7, 6],
        c_out: 9,
        kernel: [3, 2],
        stride: [1, 1],
        padding: [1, 0],
        dilation: [1, 2],
        groups: 3,
    },
    // Padding wider than the kernel reaches: the input gradient as a transposed convolution.
    Case {
        x: [1, 2, 4, 3],
        c_out: 3,
        kernel: [1, 1],
        stride: [1, 1],
        padding: [1, 1],
        dilation: [1, 1],
        groups: 1,
    },
    // The VAE's downsampling (after its explicit padding): 3 x 3, stride 2, no padding.
    Case {
        x: [2, 8, 9, 9],
        c_out: 8,
        kernel: [3, 3],
        stride: [2, 2],
        padding: [0, 0],
        dilation: [1, 1],
        groups: 1,
    },
    // Maps smaller than a tile, 11 samples: tiles of whole samples (2 a tile, the last alone),
    // with groups; and the small config's deepest level, a 7 x 7 map (8 samples a tile).
    Case {
        x: [11, 6, 5, 5],
        c_out: 9,
        kernel: [3, 3],
        stride: [1, 1],
        padding: [1, 1],
        dilation: [1, 1],
        groups: 3,
    },
    Case {
        x: [64, 16, 7, 7],
        c_out: 8,
        kernel: [3, 3],
        stride: [1, 1],
        padding: [1, 1],
        dilation: [1, 1],
        groups: 1,
    },
    // Stride 1, the output as wide as the input but taller (the forward's transposed im2col copies
    // a whole row at once there): a wide kernel reaching 2 columns into the padding.
    Case {
        x: [2, 3, 6, 9],
        c_out: 4,
        kernel: [2, 5],
        stride: [1, 1],
        padding: [2, 2],
        dilation: [1, 1],
        groups: 1,
    },
    // The VAE's ResNet convolution at the small config's first level.
    Case {
        x: [4, 32, 28, 28],
        c_out: 32,
        kernel: [3, 3],
        stride: [1, 1],
        padding: [1, 1],
        dilation: [1, 1],
        groups: 1,
    },
];

fn data(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..len).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect()
}

impl Case {
    fn w_shape(&self) -> [usize; 4] {
        [
            self.c_out,
            self.x[1] / self.groups,
            self.kernel[0],
            self.kernel[1],
        ]
    }

    fn out_hw(&self) -> [usize; 2] {
        [0, 1].map(|a| {
            (self.x[2 + a] + 2 * self.padding[a] - self.dilation[a] * (self.kernel[a] - 1) - 1)
                / self.stride[a]
                + 1
        })
    }

    fn out_shape(&self) -> [usize; 4] {
        let [oh, ow] = self.out_hw();
        [self.x[0], self.c_out, oh, ow]
    }

    /// Every (output index, input index, weight index) that the convolution multiplies.
    fn taps(&self) -> Vec<(usize, usize, usize)> {
        let [n, c_in, h, w] = self.x;
        let [_, per_group, kh, kw] = self.w_shape();
        let [oh, ow] = self.out_hw();
        let out_per_group = self.c_out / self.groups;
        let mut taps = vec![];
        for b in 0..n {
            for co in 0..self.c_out {
                let g = co / out_per_group;
                for (y, x) in (0..oh).flat_map(|y| (0..ow).map(move |x| (y, x))) {
                    let out = ((b * self.c_out + co) * oh + y) * ow + x;
                    for ci in 0..per_group {
                        for (ky, kx) in (0..kh).flat_map(|ky| (0..kw).map(move |kx| (ky, kx))) {
                            let iy = (y * self.stride[0] + ky * self.dilation[0]) as isize
                                - self.padding[0] as isize;
                            let ix = (x * self.stride[1] + kx * self.dilation[1]) as isize
                                - self.padding[1] as isize;
                            if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                continue;
                            }
                            let input = ((b * c_in + g * per_group + ci) * h + iy as usize) * w + ix as usize;
                            let weight = ((co * per_group + ci) * kh + ky) * kw + kx;
                            taps.push((out, input, weight));
                        }
                    }
                }
            }
        }
        taps
    }
}

/// (output, d/dx, d/dw, d/dbias) of `sum(conv2d(x, w, bias) * r)` from the taps, summed in f64.
fn direct(case: &Case, x: &[f32], w: &[f32], bias: &[f32], r: &[f32]) -> [Vec<f32>; 4] {
    let out_len: usize = case.out_shape().iter().product();
    let spatial = out_len / case.x[0] / case.c_out;
    let mut out: Vec<f64> = (0..out_len)
        .map(|i| bias[(i / spatial) % case.c_out] as f64)
        .collect();
    let (mut dx, mut dw) = (vec![0.0f64; x.len()], vec![0.0f64; w.len()]);
    let mut db = vec![0.0f64; case.c_out];
    for (i, &ri) in r.iter().enumerate() {
        db[(i / spatial) % case.c_out] += ri as f64;
    }
    for (o, i, k) in case.taps() {
        out[o] += x[i] as f64 * w[k] as f64;
        dx[i] += r[o] as f64 * w[k] as f64;
        dw[k] += r[o] as f64 * x[i] as f64;
    }
    [out, dx, dw, db].map(|v| v.into_iter().map(|v| v as f32).collect())
}

/// The same through burn's conv2d and autodiff on the CPU backend.
fn burn(case: &Case, x: &[f32], w: &[f32], bias: &[f32], r: &[f32]) -> [Vec<f32>; 4] {
    let device = ddm_core::device::cpu().autodiff();
    let t =
        |v: &[f32], shape: Vec<usize>| Tensor::<4>::from_data(TensorData::new(v.to_vec(), shape), &device);
    let xt = t(x, case.x.to_vec()).require_grad();
    let wt = t(w, case.w_shape().to_vec()).require_grad();
    let bt = Tensor::<1>::from_data(TensorData::new(bias.to_vec(), [case.c_out]), &device).require_grad();
    let options = ConvOptions::new(case.stride, case.padding, case.dilation, case.groups);
    let out = conv2d(xt.clone(), wt.clone(), Some(bt.clone()), options);
    let grads = (out.clone() * t(r, case.out_shape().to_vec())).sum().backward();
    let host = |t: Tensor<4>| HostTensor::from_tensor(t).data;
    [
        host(out),
        host(xt.grad(&grads).unwrap()),
        host(wt.grad(&grads).unwrap()),
        HostTensor::from_tensor(bt.grad(&grads).unwrap()).data,
    ]
}

fn inputs(case: &Case, seed: u64) -> [Vec<f32>; 4] {
    let len = |s: [usize; 4]| s.iter().product::<usize>();
    [
        data(len(case.x), seed),
        data(len(case.w_shape()), seed + 1),
        data(case.c_out, seed + 2),
        data(len(case.out_shape()), seed + 3),
    ]
}

#[test]
fn conv2d_and_its_gradients_match_a_direct_convolution() {
    for (k, case) in CASES.iter().enumerate() {
        let [x, w, b, r] = inputs(case, 10 * k as u64);
        let want = direct(case, &x, &w, &b, &r);
        let got = burn(case, &x, &w, &b, &r);
        for (i, what) in ["output", "d/dx", "d/dw", "d/dbias"].into_iter().enumerate() {
            // A gradient sums up to N * Ho * Wo products: the bound is relative to the tensor's
            // largest value, not to each (possibly cancelled) element.
            let scale = want[i].iter().fold(1.0f32, |m, v| m.max(v.abs()));
            let err = got[i]
                .iter()
                .zip(&want[i])
                .fold(0.0f32, |m, (g, w)| m.max((g - w).abs()));
            assert!(
                err <= 1e-5 * scale,
                "{case:?} {what}: off by {err} (largest value {scale})"
            );
        }
        assert!(
            got[2].iter().any(|&v| v != 0.0),
            "{case:?}: a zero weight gradient"
        );
    }
}

#[test]
fn conv2d_gradients_are_the_same_bits_on_one_thread_and_on_all() {
    for (k, case) in CASES.iter().enumerate() {
        let [x, w, b, r] = inputs(case, 100 + k as u64);
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(|| burn(case, &x, &w, &b, &r));
        let all = burn(case, &x, &w, &b, &r);
        assert!(one == all, "{case:?}: one thread and all differ");
    }
}
