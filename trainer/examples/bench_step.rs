//! Benchmark (not a test): one training step of a DiT on 1 x 28 x 28 data, by phase.
//! Same model and settings as the PyTorch peer (`dit_fm.py bench --model a`; README, Benchmarks)
//! for `--size Bench`
//! (hidden 256, depth 6, 4 heads, patch 4; AdamW lr 1e-4; batch 64).
//! `--size PixArt-Bench/4` is the same trunk as a PixArt, cross-attending to random captions of
//! `--caption L` tokens (77 by default, CLIP's length) of width 256, a quarter of each sample's
//! caption padding.
//!
//! Then, like the peer's `fwd256` phase, the median time of an inference forward of 256 samples.
//!
//! `--precision bf16|f16` computes the forward and backward in that dtype on a cast copy of the f32
//! weights, as `ddm train --precision` does (without f16's loss scaling; the optimizer and EMA
//! stay f32), and the inference forward on a cast copy of the weights, as `ddm sample --precision`.
//!
//! `--device` runs it on a GPU backend, and `--image S --channels C` on other data (DiT-B/2 on
//! Stable Diffusion's latents of 256 x 256 images: `--image 32 --channels 4`). The model's forward
//! FLOPs give the achieved TFLOP/s (a training step counted as 3 forwards); `--peak-tflops P`, the
//! device's datasheet peak, adds the MFU (`scripts/gpu_bench.sh`).
//!
//! cargo build --release --workspace --examples
//! target/release/examples/bench_step [--size DiT-Bench/4] [--batch 64] [--steps 20] [--fwd-iters 5] [--caption 77]
//!     [--device cpu] [--precision f32] [--image 28] [--channels 1] [--peak-tflops P]

use std::time::Instant;

use ddm_core::burn::optim::{GradientsParams, ModuleOptimizer};
use ddm_core::burn::prelude::*;
use ddm_core::condition::Condition;
use ddm_core::device::DeviceChoice;
use ddm_core::dit::DiTConfig;
use ddm_core::flow::{flow_matching_loss, interpolate, randn};
use ddm_core::host::HostTensor;
use ddm_core::model::ModelConfig;
use ddm_core::pixart::PixArtConfig;
use ddm_core::precision::{Precision, cast};
use rand::SeedableRng;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: &str| -> String {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
            .unwrap_or_else(|| default.into())
    };
    let size = arg("--size", "DiT-Bench/4");
    let batch: usize = arg("--batch", "64").parse().unwrap();
    let steps: usize = arg("--steps", "20").parse().unwrap();
    let fwd_iters: usize = arg("--fwd-iters", "5").parse().unwrap();
    let caption: usize = arg("--caption", "77").parse().unwrap();
    let choice: DeviceChoice = arg("--device", "cpu").parse().unwrap();
    let precision: Precision = arg("--precision", "f32").parse().unwrap_or_else(|e| {
        eprintln!("bench_step: {e}");
        std::process::exit(2)
    });
    let (image, channels): (usize, usize) = (
        arg("--image", "28").parse().unwrap(),
        arg("--channels", "1").parse().unwrap(),
    );
    let peak: Option<f64> = args
        .iter()
        .position(|a| a == "--peak-tflops")
        .map(|i| args[i + 1].parse().unwrap());
    let per = channels * image * image; // floats per sample: x is [N, C*H*W]
    let warmup = 3;
    let plain = ddm_core::device::device(choice).unwrap_or_else(|e| {
        eprintln!("bench_step: {e}");
        std::process::exit(2)
    });
    if let Err(e) = precision.check(&plain) {
        eprintln!("bench_step: {e}");
        std::process::exit(2)
    }
    let device = plain.clone().autodiff();
    let config = match size.strip_prefix("PixArt-") {
        Some(dit) => ModelConfig::PixArt(PixArtConfig::named(dit, image, channels).unwrap())
            .with_caption_tokens(CAPTION_WIDTH, caption, 0.0)
            .unwrap(),
        None => ModelConfig::Dit(DiTConfig::named(&size, image, channels).unwrap()),
    };
    let reads_captions = config.token_dim() > 0;
    let condition = |n: usize, rng: &mut rand_chacha::ChaCha8Rng, device: &Device| match reads_captions {
        true => captions(n, caption, rng, device),
        false => Condition::none(),
    };
    let params: usize = config
        .init(0, &plain)
        .unwrap()
        .state_dict()
        .values()
        .map(|t| t.numel())
        .sum();
    let mut model = config.init(0, &device).unwrap();
    let mut ema = model.valid();
    let mut optim = ModuleOptimizer::from(ddm_core::update::AdamW::new(0.0, None));
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut times = [0f64; 5]; // data, forward, backward, optimizer, ema
    let sync = |t: Tensor<1>| t.into_scalar::<f32>();
    for step in 0..warmup + steps {
        let t0 = Instant::now();
        let x0 = randn(vec![batch, per], &mut rng)
            .to_tensor::<2>(&device)
            .clamp(-1.0, 1.0);
        let e = randn(vec![batch, per], &mut rng).to_tensor::<2>(&device);
        let t: Vec<f32> = (0..batch).map(|i| (i as f32 + 0.5) / batch as f32).collect();
        let t = Tensor::<1>::from_data(TensorData::new(t, [batch]), &device);
        let c = condition(batch, &mut rng, &device);
        let t1 = Instant::now();
        let compute = (precision != Precision::F32).then(|| cast(model.clone(), precision));
        let v =
            compute
                .as_ref()
                .unwrap_or(&model)
                .predict(interpolate(x0.clone(), e.clone(), t.clone()), t, &c);
        let loss = flow_matching_loss(v, x0, e);
        let _ = sync(loss.clone());
        let t2 = Instant::now();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let t3 = Instant::now();
        model = optim.step(1e-4, model, grads);
        let _ = HostTensor::from_tensor(model.valid().state_dict_first());
        let t4 = Instant::now();
        ema = ddm_trainer::ema::update(ema, &model.valid(), 0.999);
        let _ = HostTensor::from_tensor(ema.state_dict_first());
        let t5 = Instant::now();
        if step >= warmup {
            for (i, d) in [t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4].iter().enumerate() {
                times[i] += d.as_secs_f64() / steps as f64;
            }
        }
    }
    let total: f64 = times.iter().sum();
    // Inference: a forward of 256 samples on the plain (non-autodiff) device, as a sampler runs.
    let net = cast(model.valid(), precision);
    let mut fwd = vec![];
    for i in 0..fwd_iters + 1 {
        let x = randn(vec![256, per], &mut rng).to_tensor::<2>(&plain);
        let t: Vec<f32> = (0..256).map(|i| (i as f32 + 0.5) / 256.0).collect();
        let t = Tensor::<1>::from_data(TensorData::new(t, [256]), &plain);
        let c = condition(256, &mut rng, &plain);
        let t0 = Instant::now();
        let _ = HostTensor::from_tensor(net.predict(x, t, &c));
        if i > 0 {
            fwd.push(t0.elapsed().as_secs_f64());
        }
    }
    fwd.sort_by(f64::total_cmp);
    let fwd256 = fwd.get(fwd.len() / 2).copied().unwrap_or(f64::NAN);
    // Achieved TFLOP/s from the model's forward FLOPs; a training step is ~3 forwards (the
    // backward computes the input and the weight gradients of every matmul).
    let flops = config.flops_per_sample();
    let step_tflops = 3.0 * flops * batch as f64 / total / 1e12;
    let fwd_tflops = flops * 256.0 / fwd256 / 1e12;
    let mfu = match peak {
        Some(p) => format!(
            ", \"peak_tflops\": {p}, \"mfu_step\": {:.4}, \"mfu_fwd256\": {:.4}",
            step_tflops / p,
            fwd_tflops / p
        ),
        None => String::new(),
    };
    let adapter = ddm_core::device::adapter(choice).unwrap_or_default();
    // The self-attention's implementation on a GPU device (`DDM_GPU_ATTENTION`).
    let attention = match (choice, ddm_core::env::gpu_attention_kernels()) {
        (DeviceChoice::Cpu, _) => "cpu",
        (_, Ok(true)) => "kernel",
        (_, _) => "composite",
    };
    println!(
        "{{\"impl\": \"ddm\", \"device\": \"{choice}\", \"adapter\": {adapter:?}, \"size\": \"{size}\", \"precision\": \"{precision}\", \"attention\": \"{attention}\", \"data\": [{channels}, {image}, {image}], \"params\": {params}, \"gflops_per_sample\": {:.3}, \"batch\": {batch}, \"threads\": \"{}\", \"cpu_simd\": \"{}\", \"ms_per_step\": {:.1}, \"img_per_s\": {:.1}, \"fwd256_ms_median\": {:.1}, \"step_tflops\": {step_tflops:.3}, \"fwd256_tflops\": {fwd_tflops:.3}{mfu}, \"ms\": {{\"data\": {:.1}, \"forward\": {:.1}, \"backward\": {:.1}, \"optimizer\": {:.1}, \"ema\": {:.1}}}}}",
        flops / 1e9,
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".into()),
        ddm_core::device::cpu_simd(),
        total * 1e3,
        batch as f64 / total,
        fwd256 * 1e3,
        times[0] * 1e3,
        times[1] * 1e3,
        times[2] * 1e3,
        times[3] * 1e3,
        times[4] * 1e3
    );
}

/// The width of the benchmark's caption token states.
const CAPTION_WIDTH: usize = 256;

/// `n` random captions of `l` token states, each with its last quarter (rounded down) padding.
fn captions(n: usize, l: usize, rng: &mut rand_chacha::ChaCha8Rng, device: &Device) -> Condition {
    let embeddings = randn(vec![n, l, CAPTION_WIDTH], rng).to_tensor::<3>(device);
    let tokens = l - l / 4;
    let mask: Vec<f32> = (0..n * l).map(|i| (i % l < tokens) as u8 as f32).collect();
    Condition::tokens(
        embeddings,
        Tensor::from_data(TensorData::new(mask, [n, l]), device),
    )
}

trait FirstTensor {
    fn state_dict_first(&self) -> Tensor<1>;
}

impl FirstTensor for ddm_core::model::Model {
    /// A tiny read-back that forces pending work to finish (a sync point).
    fn state_dict_first(&self) -> Tensor<1> {
        use ddm_core::burn::module::{Module, ModuleVisitor, Param};
        struct First(Option<Tensor<1>>);
        impl ModuleVisitor for First {
            fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
                if self.0.is_none() {
                    self.0 = Some(p.val().flatten::<1>(0, D - 1).narrow(0, 0, 1));
                }
            }
        }
        let mut f = First(None);
        self.visit(&mut f);
        f.0.expect("a model has parameters")
    }
}
