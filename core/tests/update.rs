//! The fused parameter updates (`kernels/src/update.rs`) against burn's own: AdamW (with and without
//! weight decay and per-parameter clipping) over several steps and shapes (one element, odd sizes,
//! more than one chunk, the bench DiT's largest weight), the EMA, optimizer records that load
//! either way, tensors shared elsewhere left untouched, and the same bits on one thread and on all.

use ddm_core::burn::module::Module;
use ddm_core::burn::nn::{Linear, LinearConfig};
use ddm_core::burn::optim::grad_clipping::GradientClipping;
use ddm_core::burn::optim::{AdamWState, GradientsParams, ModuleOptimizer, Optimizer};
use ddm_core::burn::prelude::*;
use ddm_core::host::HostTensor;
use ddm_core::update::{AdamW, ema};
use rand::{Rng, SeedableRng};

mod common;
use common::assert_close;

const SHAPES: [&[usize]; 5] = [&[1], &[7], &[33, 5], &[16387], &[256, 1536]];

fn tensor<const D: usize>(shape: &[usize], seed: u64, scale: f32) -> Tensor<D> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n = shape.iter().product();
    let v = (0..n)
        .map(|_| scale * (rng.random::<f32>() * 2.0 - 1.0))
        .collect();
    HostTensor::new(shape.to_vec(), v).to_tensor::<D>(&ddm_core::device::cpu())
}

fn host<const D: usize>(t: &Tensor<D>) -> Vec<f32> {
    HostTensor::from_tensor(t.clone()).data
}

/// `steps` AdamW steps of a random parameter with random gradients of size `grad_scale`, fused or
/// burn's (clipping as burn's `GradientClipping::Norm`): the parameter and both moments after each.
fn adamw_run<const D: usize>(
    opt: &AdamW,
    fused: bool,
    shape: &[usize],
    grad_scale: f32,
    steps: u64,
) -> Vec<[Vec<f32>; 3]> {
    let composite = opt.composite().build();
    let mut p = tensor::<D>(shape, 1, 1.0);
    let mut state: Option<AdamWState<D>> = None;
    let mut out = vec![];
    for s in 0..steps {
        let g = tensor::<D>(shape, 100 + s, grad_scale);
        let lr = 1e-3 * (s + 1) as f64;
        (p, state) = if fused {
            opt.step(lr, p, g, state)
        } else {
            let g = match opt.clip_norm {
                Some(c) => GradientClipping::Norm(c).clip_gradient(g),
                None => g,
            };
            composite.step(lr, p, g, state)
        };
        let m = &state.as_ref().unwrap().momentum;
        assert_eq!(m.time, s as usize + 1);
        out.push([host(&p), host(&m.moment_1), host(&m.moment_2)]);
    }
    out
}

#[test]
fn adamw_matches_burns_adamw() {
    let cases = [
        ("plain", AdamW::new(0.0, None), 1.0),
        ("weight decay", AdamW::new(0.05, None), 1.0),
        ("clipped", AdamW::new(0.01, Some(0.5)), 3.0),
        ("clip above the norm", AdamW::new(0.01, Some(1e6)), 1.0),
    ];
    for (what, opt, grad_scale) in cases {
        for shape in SHAPES {
            let (got, want) = match shape.len() {
                1 => (
                    adamw_run::<1>(&opt, true, shape, grad_scale, 4),
                    adamw_run::<1>(&opt, false, shape, grad_scale, 4),
                ),
                _ => (
                    adamw_run::<2>(&opt, true, shape, grad_scale, 4),
                    adamw_run::<2>(&opt, false, shape, grad_scale, 4),
                ),
            };
            for (s, (g, w)) in got.iter().zip(&want).enumerate() {
                for (k, name) in ["parameter", "moment_1", "moment_2"].iter().enumerate() {
                    assert_close(&g[k], &w[k], 1e-5, &format!("{what} {shape:?} step {s}: {name}"));
                }
            }
            // The clipping did something where it should, and nothing where it should not.
            let plain = AdamW {
                clip_norm: None,
                ..opt.clone()
            };
            let unclipped = adamw_run::<1>(&plain, true, &[shape.iter().product()], grad_scale, 1);
            let first = &adamw_run::<1>(&opt, true, &[shape.iter().product()], grad_scale, 1)[0][1];
            let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
            match what {
                "clipped" => assert!(norm(first) < norm(&unclipped[0][1]) * 0.99, "{what} {shape:?}"),
                _ => assert_eq!(first, &unclipped[0][1], "{what} {shape:?}"),
            }
        }
    }
}

#[test]
fn ema_matches_burns_ops() {
    for shape in SHAPES {
        let n = shape.iter().product::<usize>();
        let (avg, cur) = (tensor::<1>(&[n], 3, 1.0), tensor::<1>(&[n], 4, 1.0));
        let want = host(&(avg.clone() * 0.999 + cur.clone() * (1.0 - 0.999)));
        // `avg` is shared with the line above: the kernel must copy it, not write into it.
        let before = host(&avg);
        let got = host(&ema(avg.clone(), cur.clone(), 0.999));
        assert_close(&got, &want, 1e-6, &format!("ema {shape:?}"));
        assert_eq!(host(&avg), before, "the shared average was written to");
    }
}

#[test]
fn shared_parameters_and_moments_are_not_written() {
    let opt = AdamW::new(0.01, Some(1.0));
    let (p, g) = (tensor::<1>(&[20000], 1, 1.0), tensor::<1>(&[20000], 2, 1.0));
    let (p1, state) = opt.step(1e-2, p.clone(), g.clone(), None);
    let state = state.unwrap();
    let (m, v) = (host(&state.momentum.moment_1), host(&state.momentum.moment_2));
    let before = host(&p1);
    let (p2, _) = opt.step(1e-2, p1.clone(), g, Some(state.clone()));
    assert_ne!(host(&p2), before);
    assert_eq!(host(&p1), before, "a parameter held elsewhere changed");
    assert_eq!(
        host(&state.momentum.moment_1),
        m,
        "a moment held elsewhere changed"
    );
    assert_eq!(
        host(&state.momentum.moment_2),
        v,
        "a moment held elsewhere changed"
    );
    assert_eq!(host(&p), host(&tensor::<1>(&[20000], 1, 1.0)));
}

#[test]
fn same_bits_on_one_thread_and_on_all() {
    let run = || {
        let opt = AdamW::new(0.01, Some(0.5));
        let r = adamw_run::<2>(&opt, true, &[256, 1536], 3.0, 3);
        let e = host(&ema(
            tensor::<1>(&[100003], 5, 1.0),
            tensor::<1>(&[100003], 6, 1.0),
            0.99,
        ));
        (r, e)
    };
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap()
        .install(run);
    let all = rayon::ThreadPoolBuilder::new()
        .num_threads(4)
        .build()
        .unwrap()
        .install(run);
    assert!(one == all, "the updates depend on the thread count");
}

/// A step of a small linear layer from the gradient of sum(y^2) for a random input.
fn linear_step(optim: &mut ModuleOptimizer, model: Linear, seed: u64) -> Linear {
    let device = ddm_core::device::cpu().autodiff();
    // Fresh leaves (same parameter ids), so one model can take two different steps.
    let model = model.valid().train();
    let x = tensor::<2>(&[4, 5], seed, 1.0).to_device(&device);
    let loss = model.forward(x).powf_scalar(2.0).sum();
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    optim.step(1e-2, model, grads)
}

#[test]
fn optimizer_records_load_either_way() {
    let device = ddm_core::device::cpu().autodiff();
    let fused = || ModuleOptimizer::from(AdamW::new(0.01, Some(1.0)));
    let burns = || {
        AdamW::new(0.01, None)
            .composite()
            .with_grad_clipping(Some(
                ddm_core::burn::optim::grad_clipping::GradientClippingConfig::Norm(1.0),
            ))
            .init()
    };
    // Three steps with each, then the record moves to the other kind and both take a fourth.
    for (first, second) in [(fused(), burns()), (burns(), fused())] {
        let mut a = first;
        let mut model: Linear = LinearConfig::new(5, 3).init(&device);
        for s in 0..3 {
            model = linear_step(&mut a, model, s);
        }
        let bytes = a.into_bytes().unwrap();
        let mut b = second.from_bytes_on(bytes, &ddm_core::device::cpu()).unwrap();
        let (ma, mb) = (
            linear_step(&mut a, model.clone(), 9),
            linear_step(&mut b, model.clone(), 9),
        );
        let w = |m: &Linear| HostTensor::from_tensor(m.weight.val().inner()).data;
        assert_close(&w(&mb), &w(&ma), 1e-5, "weight after the reloaded step");
        assert_ne!(w(&ma), w(&model), "the step changed nothing");
        // A fresh optimizer (no moments) takes a different step: the record really was loaded.
        let fresh = linear_step(&mut fused(), model.clone(), 9);
        assert!(w(&fresh) != w(&ma));
    }
}
