//! Benchmark (not a test): the AutoencoderKL's encode and decode forwards and its training step
//! (reconstruction MSE + KL, backward, AdamW), beside the PyTorch peer `scripts/bench_vae.py`
//! (diffusers' AutoencoderKL, same config, same batch; README, Results and benchmarks).
//!
//! `--config small`: 1 x 28 x 28, `vae:3:32:4` (the latent table's VAE: levels of 32, 64, 128
//! channels, 4 latent channels). `--config sd`: Stable Diffusion's sd-vae-ft-mse architecture
//! (3 x 256 x 256, levels of 128, 256, 512, 512, two ResNet blocks a level), random weights.
//!
//! cargo build --release --workspace --examples
//! target/release/examples/bench_vae --config small [--batch 64] [--iters 5]

use std::time::Instant;

use ddm_core::burn::optim::{GradientsParams, ModuleOptimizer};
use ddm_core::device::DeviceChoice;
use ddm_core::host::HostTensor;
use ddm_core::params::RandomInit;
use ddm_core::vae::AutoencoderKLConfig;
use rand::SeedableRng;

fn config(name: &str) -> AutoencoderKLConfig {
    match name {
        "small" => AutoencoderKLConfig::small(1, 28, 3, 32, 4).unwrap(),
        "sd" => AutoencoderKLConfig {
            block_out_channels: vec![128, 256, 512, 512],
            down_block_types: vec!["DownEncoderBlock2D".into(); 4],
            up_block_types: vec!["UpDecoderBlock2D".into(); 4],
            layers_per_block: 2,
            sample_size: 256,
            ..AutoencoderKLConfig::small(3, 256, 4, 128, 4).unwrap()
        },
        other => panic!("--config small|sd, not {other}"),
    }
}

/// The median of `iters` timed runs of `f` after one untimed run, in ms.
fn median_ms(iters: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut ms: Vec<f64> = (0..iters)
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    ms[ms.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: &str| -> String {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
            .unwrap_or_else(|| default.into())
    };
    let name = arg("--config", "small");
    let batch: usize = arg("--batch", "64").parse().unwrap();
    let iters: usize = arg("--iters", "5").parse().unwrap();
    let c = config(&name);
    let plain = ddm_core::device::device(DeviceChoice::Cpu).unwrap_or_else(|e| {
        eprintln!("bench_vae: {e}");
        std::process::exit(2)
    });
    let device = plain.clone().autodiff();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let image = vec![batch, c.in_channels, c.sample_size, c.sample_size];
    let mut latent = vec![batch];
    latent.extend(c.latent_shape());
    let x = ddm_core::flow::randn(image, &mut rng)
        .to_tensor::<4>(&plain)
        .clamp(-1.0, 1.0);
    let z = ddm_core::flow::randn(latent.clone(), &mut rng).to_tensor::<4>(&plain);

    let net = c.build(&mut RandomInit::new(0, &plain)).unwrap();
    let encode = median_ms(iters, || {
        let _ = HostTensor::from_tensor(net.encode(x.clone()).mean);
    });
    let decode = median_ms(iters, || {
        let _ = HostTensor::from_tensor(net.decode(z.clone()));
    });

    // Training step: as `ddm train-autoencoder` (trainer/src/autoencoder.rs), KL weight 1e-6.
    let mut model = c.build(&mut RandomInit::new(0, &device)).unwrap();
    let mut optim = ModuleOptimizer::from(ddm_core::update::AdamW::new(0.0, None));
    let xa = x.clone().to_device(&device);
    let latent_size: usize = latent[1..].iter().product();
    let train = median_ms(iters, || {
        let posterior = model.encode(xa.clone());
        let e = ddm_core::flow::randn(latent.clone(), &mut rng).to_tensor::<4>(&device);
        let diff = model.decode(posterior.sample(e)) - xa.clone();
        let loss = (diff.clone() * diff).mean() + posterior.kl().mean() / latent_size as f64 * 1e-6;
        let _ = loss.clone().into_scalar::<f32>();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        // The CPU backend runs each op as it is called: the step is done when it returns.
        model = optim.step(1e-4, model.clone(), grads);
    });
    println!(
        "{{\"impl\": \"ddm\", \"cpu_simd\": \"{}\", \"config\": \"{name}\", \"batch\": {batch}, \"encode_ms\": {encode:.1}, \"decode_ms\": {decode:.1}, \"train_step_ms\": {train:.1}, \"encode_img_per_s\": {:.1}, \"decode_img_per_s\": {:.1}, \"train_img_per_s\": {:.1}, \"gflop_per_img_fwd\": {:.2}}}",
        ddm_core::device::cpu_simd(),
        batch as f64 / encode * 1e3,
        batch as f64 / decode * 1e3,
        batch as f64 / train * 1e3,
        c.flops_per_sample() / 1e9,
    );
}
