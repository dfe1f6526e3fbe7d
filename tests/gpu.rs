//! The wgpu backend against the CPU (burn flex), on whatever adapter the machine has: in CI,
//! Mesa's software Vulkan (lavapipe, Debian `mesa-vulkan-drivers`). The `wgpu` feature is on by
//! default; the tests that need a Vulkan driver are ignored unless asked for:
//! `cargo test --release --test gpu -- --include-ignored` (CI runs them with the workspace).
//!
//! f32 on both sides; the GPU sums in another order, so values agree to a tolerance, not bits.
#![cfg(feature = "wgpu")]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ddm_core::burn::optim::{GradientsParams, SgdConfig};
use ddm_core::burn::prelude::*;
use ddm_core::device::DeviceChoice;
use ddm_core::host::{HostTensor, TensorFile};
use ddm_core::model::ModelConfig;
use ddm_core::precision::Precision;

mod common;
use common::{
    fails, fixed_prediction, ok, registry_fixture, relative_error, tiny_image_partition, tiny_island,
};

fn wgpu() -> Device {
    ddm_core::device::device("wgpu".parse().unwrap())
        .expect("a wgpu adapter (lavapipe: apt-get install mesa-vulkan-drivers)")
}

fn reference(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/reference")
        .join(name)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// The reference DiT's velocity, the gradient of a loss on it (the sum of its squares) with respect
/// to its input, and every weight after one SGD step of rate 1 (so weight differences are gradient
/// differences), on `device` (with autodiff), computing in `precision` (f32 master weights).
fn forward_and_gradients(
    name: &str,
    device: &Device,
    precision: Precision,
) -> (Vec<f32>, Vec<f32>, BTreeMap<String, HostTensor>) {
    let device = device.clone().autodiff();
    let config: ModelConfig =
        serde_json::from_str(&std::fs::read_to_string(reference(&format!("{name}.config.json"))).unwrap())
            .unwrap();
    let weights = reference(&format!("{name}.weights.safetensors"));
    let file = TensorFile::read(&weights).unwrap();
    let tensors = file
        .names()
        .map(|n| (n.to_string(), file.f32(n).unwrap()))
        .collect();
    let model = config.load(tensors, &weights, &device).unwrap();
    let io = TensorFile::read(&reference(&format!("{name}.io.safetensors"))).unwrap();
    let x_t = io.f32("x_t").unwrap().to_tensor::<4>(&device).require_grad();
    let t = io.f32("t").unwrap().to_tensor::<1>(&device);
    let y = io.contains("y").then(|| {
        let y = io.i64("y").unwrap();
        Tensor::<1, Int>::from_data(TensorData::new(y.data, y.shape), &device)
    });
    let compute = ddm_core::precision::cast(model.clone(), precision);
    let v = compute.predict(x_t.clone(), t, &ddm_core::condition::Condition::maybe_class(y));
    let velocity = HostTensor::from_tensor(v.clone()).data;
    let loss = (v.clone() * v).sum();
    let grads = loss.backward();
    let input_grad = HostTensor::from_tensor(x_t.grad(&grads).unwrap()).data;
    let params = GradientsParams::from_grads(grads, &model);
    let stepped = SgdConfig::new().init().step(1.0, model, params);
    (velocity, input_grad, stepped.state_dict())
}

/// DiT forward and gradients on wgpu equal flex within 1e-4, at the reference shapes (with and
/// without classes); the forward also equals PyTorch's output.
#[test]
#[ignore = "needs a Vulkan driver: apt-get install mesa-vulkan-drivers (.ci/run installs it)"]
fn dit_forward_and_gradients_on_wgpu_equal_flex() {
    let gpu = wgpu();
    let cpu = ddm_core::device::cpu();
    for name in ["dit-small", "dit-class"] {
        let (v_cpu, g_cpu, w_cpu) = forward_and_gradients(name, &cpu, Precision::F32);
        let (v_gpu, g_gpu, w_gpu) = forward_and_gradients(name, &gpu, Precision::F32);
        let want = TensorFile::read(&reference(&format!("{name}.io.safetensors")))
            .unwrap()
            .f32("v")
            .unwrap()
            .data;
        let (dv, dp, dg) = (
            max_diff(&v_cpu, &v_gpu),
            max_diff(&v_gpu, &want),
            max_diff(&g_cpu, &g_gpu),
        );
        // Each weight's gradient (its value before the step minus after), and the largest
        // difference between the two devices relative to that parameter's largest gradient.
        let before = TensorFile::read(&reference(&format!("{name}.weights.safetensors"))).unwrap();
        let scale = |x: &[f32]| x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let mut dw = (0.0f32, String::new());
        for (n, w) in &w_cpu {
            let w0 = before.f32(n).unwrap().data;
            let g: Vec<f32> = w0.iter().zip(&w.data).map(|(a, b)| a - b).collect();
            let rel = max_diff(&w.data, &w_gpu[n].data) / scale(&g).max(1e-6);
            if rel > dw.0 {
                dw = (rel, n.clone());
            }
        }
        let dg_rel = dg / scale(&g_cpu);
        println!(
            "{name}: velocity {dv:.2e} (vs PyTorch {dp:.2e}; max |v| {:.2}), input gradient {dg:.2e} ({dg_rel:.2e} of its max), weight gradients {:.2e} of their max ({})",
            scale(&v_cpu),
            dw.0,
            dw.1
        );
        assert!(
            dv <= 1e-4 && dp <= 1e-4,
            "{name}: forward differs by {dv} (PyTorch: {dp})"
        );
        assert!(
            dg_rel <= 1e-4,
            "{name}: input gradient differs by {dg} ({dg_rel} relative)"
        );
        assert!(
            dw.0 <= 1e-4,
            "{name}: the gradient of {} differs by {} of its largest value",
            dw.1,
            dw.0
        );
    }
}

/// Mixed precision on the GPU backend: the reference DiT cast to f16 (f32 master weights) on wgpu
/// predicts what its f32 forward does, and its backward reaches the input and the f32 weights,
/// to f16's precision. (burn does not check dtypes: one f32 tensor left in the f16 forward gives
/// wrong values on wgpu, not an error.)
#[test]
#[ignore = "needs a Vulkan driver: apt-get install mesa-vulkan-drivers (.ci/run installs it)"]
fn an_f16_dit_on_wgpu_computes_close_to_f32() {
    let gpu = wgpu();
    Precision::F16
        .check(&gpu)
        .expect("lavapipe and most GPUs have f16 shaders");
    let (v32, g32, w32) = forward_and_gradients("dit-class", &gpu, Precision::F32);
    let (v16, g16, w16) = forward_and_gradients("dit-class", &gpu, Precision::F16);
    let before = TensorFile::read(&reference("dit-class.weights.safetensors")).unwrap();
    let step = |w: &BTreeMap<String, HostTensor>| -> Vec<f32> {
        w.iter()
            .flat_map(|(n, w)| {
                let w0 = before.f32(n).unwrap().data;
                w0.iter().zip(&w.data).map(|(a, b)| a - b).collect::<Vec<_>>()
            })
            .collect()
    };
    let (dv, dg, dw) = (
        relative_error(&v16, &v32),
        relative_error(&g16, &g32),
        relative_error(&step(&w16), &step(&w32)),
    );
    println!(
        "f16 vs f32 on wgpu: velocity {dv:.2e}, input gradient {dg:.2e}, weight gradients {dw:.2e} (relative L2)"
    );
    assert!(dv > 0.0 && dv < 0.01, "velocity differs by {dv}");
    assert!(dg > 0.0 && dg < 0.05, "input gradient differs by {dg}");
    assert!(dw > 0.0 && dw < 0.05, "weight gradients differ by {dw}");
}

/// The diffusers-made tiny VAE (`testdata/diffusers/vae-tiny`) on `device` with autodiff: the
/// posterior mean, the decoding of it, and the gradient of the decoding's sum of squares with
/// respect to the input image.
fn vae_forward_and_gradient(device: &Device) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let device = device.clone().autodiff();
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/diffusers");
    let (config, tensors) = ddm_core::vae::read_diffusers(&dir.join("vae-tiny")).unwrap();
    let vae = config.load(tensors, &dir.join("vae-tiny"), &device).unwrap();
    let io = TensorFile::read(&dir.join("vae-tiny.io.safetensors")).unwrap();
    let x = io.f32("x").unwrap().to_tensor::<4>(&device).require_grad();
    let mean = vae.encode(x.clone()).mean;
    let decoded = vae.decode(mean.clone());
    let grads = decoded.clone().square().sum().backward();
    let host = |t: Tensor<4>| HostTensor::from_tensor(t).data;
    let dx = host(x.grad(&grads).expect("the image has a gradient"));
    (host(mean), host(decoded), dx)
}

/// The VAE on wgpu (GroupNorm + SiLU as burn's composite ops, nearest upsampling through burn's
/// interpolate) against the CPU's fused kernels: the encoding, the decoding and the input gradient.
#[test]
#[ignore = "needs a Vulkan driver: apt-get install mesa-vulkan-drivers (.ci/run installs it)"]
fn the_vae_on_wgpu_equals_flex() {
    let (m_gpu, d_gpu, g_gpu) = vae_forward_and_gradient(&wgpu());
    let (m_cpu, d_cpu, g_cpu) = vae_forward_and_gradient(&ddm_core::device::cpu());
    let (em, ed, eg) = (
        relative_error(&m_gpu, &m_cpu),
        relative_error(&d_gpu, &d_cpu),
        relative_error(&g_gpu, &g_cpu),
    );
    println!("VAE on wgpu vs flex: mean {em:.2e}, decoded {ed:.2e}, input gradient {eg:.2e} (relative L2)");
    assert!(em < 1e-5 && ed < 1e-5 && eg < 1e-4, "the VAE differs on wgpu");
}

/// `qkv` `[n, t, 3 heads hd]` on `device` (with autodiff), uniform in [-2, 2), in `dtype`, and a
/// fixed weighting `[n, t, heads hd]` of the output for the loss.
fn attention_inputs([n, t, heads, hd]: [usize; 4], seed: u64, device: &Device) -> (Tensor<3>, Tensor<3>) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut data = |len: usize| {
        (0..len)
            .map(|_| rng.random::<f32>() * 4.0 - 2.0)
            .collect::<Vec<_>>()
    };
    let d = heads * hd;
    let qkv = Tensor::<3>::from_data(TensorData::new(data(n * t * 3 * d), [n, t, 3 * d]), device);
    let w = Tensor::<3>::from_data(TensorData::new(data(n * t * d), [n, t, d]), device);
    (qkv, w)
}

/// The output of `op` and the gradient of `sum(out * w)` with respect to qkv, computed in `dtype`
/// (qkv cast from f32, so the gradient lands on the f32 tensor), read back as f32.
fn attention_and_gradient(
    op: fn(Tensor<3>, usize) -> Tensor<3>,
    (qkv, w): &(Tensor<3>, Tensor<3>),
    heads: usize,
    dtype: ddm_core::burn::tensor::FloatDType,
) -> (Vec<f32>, Vec<f32>) {
    let qkv = qkv.clone().require_grad();
    let out = op(qkv.clone().cast(dtype), heads).cast(ddm_core::burn::tensor::FloatDType::F32);
    let grads = (out.clone() * w.clone()).sum().backward();
    let grad = qkv.grad(&grads).unwrap();
    (
        HostTensor::from_tensor(out).data,
        HostTensor::from_tensor(grad).data,
    )
}

/// The self-attention's CubeCL kernels (`kernels/src/gpu.rs`, what the DiT runs on wgpu and CUDA)
/// against burn's composite ops on the same device: values and the gradient of qkv, at odd shapes
/// (one token, one head, head widths 1, 5 and 72), the bench DiT's (49 tokens, 4 heads of 64) and
/// 256 tokens (DiT-B/2 at 32 x 32 latents); in f32, and in f16 against the f32 composite.
#[test]
#[ignore = "needs a Vulkan driver: apt-get install mesa-vulkan-drivers (.ci/run installs it)"]
fn attention_kernels_on_wgpu_match_the_composite() {
    use ddm_core::burn::tensor::FloatDType;
    use ddm_core::fused::{attention, composite};
    let gpu = wgpu().autodiff();
    // [N, T, heads, hd]
    let shapes = [
        [1, 1, 1, 1],
        [2, 3, 1, 5],
        [3, 7, 2, 5],
        [2, 17, 3, 72],
        [4, 49, 4, 64],
        [1, 256, 2, 64],
    ];
    for (k, shape) in shapes.into_iter().enumerate() {
        let inputs = attention_inputs(shape, k as u64, &gpu);
        let heads = shape[2];
        for dtype in [FloatDType::F32, FloatDType::F16] {
            let x = inputs.0.clone().cast(dtype);
            assert!(
                ddm_core::gpu::runs(&x),
                "the kernels do not take {dtype:?} on wgpu"
            );
        }
        let (v, g) = attention_and_gradient(attention, &inputs, heads, FloatDType::F32);
        let (cv, cg) = attention_and_gradient(composite::attention, &inputs, heads, FloatDType::F32);
        let (ev, eg) = (relative_error(&v, &cv), relative_error(&g, &cg));
        println!("{shape:?} f32: output {ev:.1e}, gradient {eg:.1e} (relative L2)");
        assert!(ev < 1e-5 && eg < 1e-5, "{shape:?}: output {ev}, gradient {eg}");
        assert!(g.iter().any(|&x| x != 0.0), "{shape:?}: a zero gradient");

        let (hv, hg) = attention_and_gradient(attention, &inputs, heads, FloatDType::F16);
        let (ev, eg) = (relative_error(&hv, &cv), relative_error(&hg, &cg));
        println!("{shape:?} f16: output {ev:.1e}, gradient {eg:.1e} (relative L2 to f32)");
        assert!(
            ev < 5e-3 && eg < 1e-2,
            "{shape:?} f16: output {ev}, gradient {eg}"
        );
    }
}

/// PixArt's cross-attention through the kernels against burn's composite ops on wgpu: q
/// `[n, t, heads hd]` to a caption's keys and values `[n, l, 2 heads hd]` whose last quarter is
/// masked (bias -10000, the first key always kept); values and the gradients of q and kv, at odd
/// shapes (one query, two keys, one head, head width 1) and PixArt-Bench's (49 image tokens, 77 caption
/// tokens, 4 heads of 64); in f32, and in f16 against the f32 composite.
#[test]
#[ignore = "needs a Vulkan driver: apt-get install mesa-vulkan-drivers (.ci/run installs it)"]
fn cross_attention_kernels_on_wgpu_match_the_composite() {
    use ddm_core::burn::tensor::FloatDType;
    use ddm_core::fused::{composite, cross_attention};
    use rand::{Rng, SeedableRng};
    type Cross = fn(Tensor<3>, Tensor<3>, Tensor<2>, usize) -> Tensor<3>;
    let gpu = wgpu().autodiff();
    let run = |op: Cross, [n, t, l, heads, hd]: [usize; 5], seed: u64, dtype: FloatDType| {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut data = |len: usize| {
            (0..len)
                .map(|_| rng.random::<f32>() * 4.0 - 2.0)
                .collect::<Vec<_>>()
        };
        let d = heads * hd;
        let tensor = |v: Vec<f32>, shape: [usize; 3]| Tensor::<3>::from_data(TensorData::new(v, shape), &gpu);
        let q = tensor(data(n * t * d), [n, t, d]).require_grad();
        let kv = tensor(data(n * l * 2 * d), [n, l, 2 * d]).require_grad();
        let w = tensor(data(n * t * d), [n, t, d]);
        let mask: Vec<f32> = (0..n * l)
            .map(|i| {
                if i % l > 0 && i % l >= l - l / 4 {
                    -10000.0
                } else {
                    0.0
                }
            })
            .collect();
        let bias = Tensor::<2>::from_data(TensorData::new(mask, [n, l]), &gpu);
        assert!(
            ddm_core::gpu::runs(&q.clone().cast(dtype)),
            "the kernels do not take {dtype:?} on wgpu"
        );
        let out = op(
            q.clone().cast(dtype),
            kv.clone().cast(dtype),
            bias.cast(dtype),
            heads,
        )
        .cast(FloatDType::F32);
        let grads = (out.clone() * w).sum().backward();
        let host3 = |t: Tensor<3>| HostTensor::from_tensor(t).data;
        let (dq, dkv) = (q.grad(&grads).unwrap(), kv.grad(&grads).unwrap());
        (host3(out), host3(dq), host3(dkv))
    };
    // [N, T, L, heads, hd]. (With one key the softmax is 1 and dq exactly zero, which a relative
    // error cannot measure.)
    let shapes = [
        [1, 1, 2, 1, 1],
        [2, 3, 5, 1, 5],
        [3, 7, 4, 2, 5],
        [2, 49, 77, 4, 64],
    ];
    for (k, shape) in shapes.into_iter().enumerate() {
        let seed = 10 + k as u64;
        let (cv, cq, ckv) = run(composite::cross_attention, shape, seed, FloatDType::F32);
        for (dtype, tol_v, tol_g) in [(FloatDType::F32, 1e-5, 1e-5), (FloatDType::F16, 5e-3, 1e-2)] {
            let (v, dq, dkv) = run(cross_attention, shape, seed, dtype);
            let (ev, eq, ekv) = (
                relative_error(&v, &cv),
                relative_error(&dq, &cq),
                relative_error(&dkv, &ckv),
            );
            println!(
                "{shape:?} {dtype:?}: output {ev:.1e}, dq {eq:.1e}, dkv {ekv:.1e} (relative L2 to f32 composite)"
            );
            assert!(
                ev < tol_v && eq < tol_g && ekv < tol_g,
                "{shape:?} {dtype:?}: output {ev}, dq {eq}, dkv {ekv}"
            );
            assert!(dkv.iter().any(|&x| x != 0.0), "{shape:?}: a zero gradient");
        }
    }
}

/// diffusers' PixArt (`testdata/diffusers/pixart-tiny`: cross-attention to masked captions, one all
/// padding) read as a ddm PixArt on wgpu, its cross-attention through the kernels, against
/// diffusers' output, as `core/tests/parity.rs` checks it on the CPU.
#[test]
#[ignore = "needs a Vulkan driver: apt-get install mesa-vulkan-drivers (.ci/run installs it)"]
fn the_diffusers_pixart_on_wgpu_matches_diffusers() {
    let device = wgpu();
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/diffusers");
    let (config, tensors) = ddm_core::pixart::read_diffusers(&dir.join("pixart-tiny")).unwrap();
    let model = ModelConfig::PixArt(config)
        .load(tensors, &dir.join("pixart-tiny"), &device)
        .unwrap();
    let io = TensorFile::read(&dir.join("pixart-tiny.io.safetensors")).unwrap();
    let x = io.f32("x").unwrap().to_tensor::<4>(&device);
    assert!(ddm_core::gpu::runs(&x), "the attention kernels run on wgpu");
    let t = io.f32("timestep").unwrap().to_tensor::<1>(&device) / 1000.0;
    let c = ddm_core::condition::Condition::tokens(
        io.f32("encoder_hidden_states").unwrap().to_tensor::<3>(&device),
        io.f32("encoder_attention_mask").unwrap().to_tensor::<2>(&device),
    );
    let got = HostTensor::from_tensor(model.predict(x, t, &c));
    let want = io.f32("sample").unwrap(); // [3, 8, 8, 8]: prediction then variance channels
    let per = 4 * 64;
    let err = (0..3)
        .flat_map(|n| (0..per).map(move |i| (n, i)))
        .map(|(n, i)| (got.data[n * per + i] - want.data[n * 2 * per + i]).abs())
        .fold(0.0, f32::max);
    println!("pixart-tiny on wgpu: max abs error vs diffusers {err:e}");
    assert!(err <= 1e-4, "max abs error {err}");
}

/// Mixed precision end to end on a GPU backend: a DiT island trained with `--precision f16` on
/// wgpu (f32 master weights, f16 loss scaling) predicts close to the f32 island of the same seed
/// after the same steps, and samples in f16 what it samples in f32. bf16, where the adapter has no bf16 shaders (lavapipe), is refused by
/// name before training.
#[test]
#[ignore = "needs a Vulkan driver: apt-get install mesa-vulkan-drivers (.ci/run installs it)"]
fn an_f16_island_on_wgpu_trains_close_to_f32() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    tiny_image_partition(d);
    let island = |out: &str, precision: &str| {
        let args = [
            "--out",
            out,
            "--steps",
            "20",
            "--device",
            "wgpu",
            "--precision",
            precision,
        ];
        tiny_island(d, &args)
    };
    ok(island("f32", "f32"));
    ok(island("f16", "f16"));
    let (full, half) = (
        fixed_prediction(&d.join("f32/expert.safetensors")),
        fixed_prediction(&d.join("f16/expert.safetensors")),
    );
    let err = relative_error(&half, &full);
    println!("f16 vs f32 island on wgpu: prediction {err:.2e} (relative L2)");
    assert!(full.iter().any(|&v| v != 0.0), "the f32 island learnt nothing");
    assert!(err > 0.0 && err < 0.005, "relative error {err}"); // measured on lavapipe: 2.2e-4
    let st = ddm_trainer::state::read_loop_state(&d.join("f16"))
        .unwrap()
        .unwrap();
    assert!(st.loss_scale.is_some(), "an f16 run keeps a loss scale");
    // Sampling it on wgpu in f16 gives its f32 samples, to f16's accuracy.
    let sample = |precision: &str| {
        let png = format!("s-{precision}.png");
        let args = [
            "sample",
            "--checkpoint",
            "f16/expert.safetensors",
            "--n",
            "16",
            "--steps",
            "6",
            "--device",
            "wgpu",
            "--precision",
            precision,
            "--quiet",
            "--out",
            &png,
        ];
        ok(ddm_on(d, env!("CARGO_BIN_EXE_ddm"), &args));
        tensor(&d.join(png).with_extension("safetensors"), "x0")
    };
    let err = relative_error(&sample("f16"), &sample("f32"));
    println!("sampling on wgpu in f16 vs f32: samples {err:.2e} (relative L2)");
    assert!(err > 0.0 && err < 0.005, "samples differ by {err}");
    if !wgpu().supports_dtype(ddm_core::burn::tensor::FloatDType::BF16) {
        let e = fails(island("bf16", "bf16"));
        assert!(e.contains("--precision bf16") && e.contains("no bf16"), "{e}");
    }
}

/// Several devices per island, data parallel: the same adapter named twice is two logical wgpu
/// devices (each its own queue and memory); an island trained on both, each computing half of
/// every batch, learns what the one-device island learns on the same batches (to floating-point
/// rounding), and a run stopped half-way and resumed on two devices ends bit-identical to the
/// run that went straight through.
#[test]
#[ignore = "needs a Vulkan driver: apt-get install mesa-vulkan-drivers (.ci/run installs it)"]
fn two_wgpu_devices_train_what_one_device_trains() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    tiny_image_partition(d);
    let island = |out: &str, device: &str, steps: &str| {
        let args = [
            "--out",
            out,
            "--steps",
            steps,
            "--batch-size",
            "15",
            "--log-every",
            "1",
            "--device",
            device,
        ];
        tiny_island(d, &args)
    };
    let (one, two) = ("wgpu:software", "wgpu:software,wgpu:software");
    let devices = two.parse::<ddm_core::device::Devices>().unwrap().open().unwrap();
    assert_ne!(devices[0], devices[1], "two logical devices, not one twice");
    ok(island("one", one, "20"));
    ok(island("two", two, "20"));
    let losses = |out: &str| -> Vec<f64> {
        std::fs::read_to_string(d.join(out).join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                    .as_f64()
                    .unwrap()
            })
            .collect()
    };
    let (l1, l2) = (losses("one"), losses("two"));
    let dl = l1
        .iter()
        .zip(&l2)
        .map(|(a, b)| ((a - b) / a).abs())
        .fold(0.0, f64::max);
    let (full, split) = (
        fixed_prediction(&d.join("one/expert.safetensors")),
        fixed_prediction(&d.join("two/expert.safetensors")),
    );
    let err = relative_error(&split, &full);
    println!(
        "two devices vs one: losses {dl:.2e} apart at most (relative), prediction {err:.2e} (relative L2)"
    );
    assert_eq!(l1.len(), 20);
    assert!(dl < 1e-5, "the losses differ by {dl}"); // measured: 1.0e-7
    assert!(err < 1e-4, "the predictions differ by {err}"); // measured: 1.5e-7
    // Stopped at step 10, resumed to 20 on the two devices: the same bits.
    ok(island("resumed", two, "10"));
    ok(island("resumed", two, "20"));
    let meta = |out: &str| {
        ddm_core::checkpoint::Checkpoint::read(&d.join(out).join("expert.safetensors"))
            .unwrap()
            .meta
    };
    assert_eq!(meta("resumed").tensors_sha256, meta("two").tensors_sha256);
    assert_eq!(meta("two").training.unwrap().backend, two);
}

fn ddm_on(dir: &Path, bin: &str, args: &[&str]) -> Output {
    Command::new(bin)
        .args(args)
        .current_dir(dir)
        .env_remove("SLURM_ARRAY_TASK_ID")
        .env_remove("JOB_COMPLETION_INDEX")
        .output()
        .unwrap()
}

fn tensor(path: &Path, name: &str) -> Vec<f32> {
    TensorFile::read(path).unwrap().f32(name).unwrap().data
}

/// An MLP island trained long enough on wgpu that its velocity is far from 0.
const ISLAND: [&str; 10] = [
    "--model",
    "mlp",
    "--steps",
    "200",
    "--lr",
    "1e-2",
    "--warmup-steps",
    "10",
    "--device",
    "wgpu",
];

/// Every verb that runs a model takes `--device wgpu` and names the adapter: an island trains on
/// wgpu and its checkpoint predicts the same on the CPU; a router trains; routed sampling equals
/// the CPU's at a fixed seed; `ddm serve` answers on wgpu.
#[test]
#[ignore = "needs a Vulkan driver: apt-get install mesa-vulkan-drivers (.ci/run installs it)"]
fn every_verb_runs_on_wgpu_and_agrees_with_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    registry_fixture(d, 2); // partition `p` of a 2-D Gaussian mixture
    let ddm = env!("CARGO_BIN_EXE_ddm");
    let island = ok(ddm_on(
        d,
        env!("CARGO_BIN_EXE_ddm-trainer"),
        &[
            &["--partition", "p", "--cluster", "0", "--out", "e0"][..],
            &ISLAND,
        ]
        .concat(),
    ));
    assert!(island.contains("wrote e0/expert.safetensors"), "{island}");
    // "XDG_RUNTIME_DIR is invalid or not set" comes from libwayland-client, which Mesa's Vulkan
    // drivers (lavapipe too) load and which looks for a Wayland display when the driver starts
    // (`vulkaninfo` prints it as well); with the variable set, as in a login session, it is gone.
    let xdg = d.join("xdg");
    std::fs::create_dir(&xdg).unwrap();
    std::fs::set_permissions(&xdg, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let out = Command::new(ddm)
        .args(["train", "--partition", "p", "--cluster", "1", "--out", "e1"])
        .args(ISLAND)
        .current_dir(d)
        .env("XDG_RUNTIME_DIR", &xdg)
        .env_remove("SLURM_ARRAY_TASK_ID")
        .env_remove("JOB_COMPLETION_INDEX")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(out);
    assert!(log.contains("wgpu: "), "the adapter is named: {log}");
    assert!(!log.contains("XDG_RUNTIME_DIR"), "{log}");
    ok(ddm_on(
        d,
        ddm,
        &[
            "train-router",
            "--partition",
            "p",
            "--out",
            "r",
            "--model",
            "mlp",
            "--steps",
            "5",
            "--eval-samples",
            "50",
            "--device",
            "wgpu",
        ],
    ));
    ok(ddm_on(
        d,
        ddm,
        &[
            "register",
            "--registry",
            "reg",
            "e0/expert.safetensors",
            "e1/expert.safetensors",
            "r/router.safetensors",
        ],
    ));

    // predict: the wgpu-trained checkpoint on both devices.
    let n = 64;
    let x: Vec<f32> = (0..n * 2)
        .map(|i| ((i * 7919 % 200) as f32 - 100.0) / 25.0)
        .collect();
    let t: Vec<f32> = (0..n).map(|i| (i as f32 + 0.5) / n as f32).collect();
    ddm_core::host::write_tensors(
        &d.join("in.safetensors"),
        &BTreeMap::from([
            ("x_t".to_string(), HostTensor::new(vec![n, 2], x)),
            ("t".to_string(), HostTensor::new(vec![n], t)),
        ]),
        &BTreeMap::new(),
    )
    .unwrap();
    for dev in ["cpu", "wgpu"] {
        ok(ddm_on(
            d,
            ddm,
            &[
                "predict",
                "--checkpoint",
                "e0/expert.safetensors",
                "--input",
                "in.safetensors",
                "--out",
                &format!("v-{dev}.safetensors"),
                "--device",
                dev,
            ],
        ));
    }
    let v_cpu = tensor(&d.join("v-cpu.safetensors"), "v");
    let dv = max_diff(&v_cpu, &tensor(&d.join("v-wgpu.safetensors"), "v"));
    let v_scale = v_cpu.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(
        v_scale > 0.1,
        "the trained expert predicts ~0 (max |v| {v_scale}): nothing to compare"
    );
    println!("predict: wgpu vs cpu {dv:.2e} (max |v| {v_scale:.2})");
    assert!(dv <= 1e-4, "predict differs by {dv}");

    // sample: the routed ensemble (learned router, full strategy) from the same noise.
    for dev in ["cpu", "wgpu"] {
        ok(ddm_on(
            d,
            ddm,
            &[
                "sample",
                "--registry",
                "reg",
                "--strategy",
                "full",
                "--n",
                "32",
                "--steps",
                "8",
                "--seed",
                "5",
                "--out",
                &format!("s-{dev}.png"),
                "--device",
                dev,
                "--quiet",
            ],
        ));
    }
    let ds = max_diff(
        &tensor(&d.join("s-cpu.safetensors"), "x0"),
        &tensor(&d.join("s-wgpu.safetensors"), "x0"),
    );
    println!("sample: wgpu vs cpu {ds:.2e}");
    assert!(ds <= 1e-3, "routed samples differ by {ds}");

    // serve: one velocity request answered by an expert on wgpu.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = Command::new(ddm)
        .args([
            "serve",
            "--registry",
            "reg",
            "--experts",
            "0",
            "--device",
            "wgpu",
            "--listen",
        ])
        .arg(format!("127.0.0.1:{port}"))
        .current_dir(d)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let client = ddm_ensemble::remote::Client::new(&format!("http://127.0.0.1:{port}")).unwrap();
    let start = std::time::Instant::now();
    while client.metadata().is_err() {
        assert!(
            start.elapsed().as_secs() < 120,
            "ddm serve --device wgpu did not answer"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let input = TensorFile::read(&d.join("in.safetensors")).unwrap();
    let request = ddm_ensemble::remote::Request {
        x_t: input.f32("x_t").unwrap(),
        t: input.f32("t").unwrap().data,
        y: None,
        c: None,
        tokens: None,
    };
    let served = client.velocity(0, &request).unwrap();
    let dserve = max_diff(&served.data, &tensor(&d.join("v-cpu.safetensors"), "v"));
    println!("serve: wgpu vs cpu {dserve:.2e}");
    assert!(dserve <= 1e-4, "served velocity differs by {dserve}");
    let _ = server.kill();
    let _ = server.wait();
}

/// `--device` names an API and an adapter; a bad one is refused with the choices.
#[test]
fn device_choices_parse_and_a_software_adapter_is_named() {
    let soft: DeviceChoice = "wgpu:software".parse().unwrap();
    if ddm_core::device::device(soft).is_ok() {
        let adapter = ddm_core::device::adapter(soft).unwrap();
        println!("software adapter: {adapter}");
        assert!(adapter.contains("software"), "{adapter}");
    }
    let e = "wgpu:vulkn".parse::<DeviceChoice>().unwrap_err().to_string();
    assert!(e.contains("vulkan, gl"), "{e}");
}
