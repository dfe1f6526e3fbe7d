//! A tiny DiT trained on one fixed batch (fixed x0, noise and t) must drive its flow-matching
//! loss far down: the whole stack (forward, autodiff through attention and adaLN, AdamW) learns.

use ddm_core::burn::optim::{AdamWConfig, GradientsParams};
use ddm_core::burn::prelude::*;
use ddm_core::dit::DiTConfig;
use ddm_core::flow::{flow_matching_loss, interpolate, randn};
use ddm_core::model::ModelConfig;
use rand::SeedableRng;

#[test]
fn tiny_dit_overfits_a_fixed_batch() {
    let device = ddm_core::device::cpu().autodiff();
    let mut dit = DiTConfig::named("DiT-T/4", 8, 1).unwrap();
    (dit.hidden_size, dit.depth) = (64, 2);
    let mut model = ModelConfig::Dit(dit).init(0, &device).unwrap();
    let mut optim = AdamWConfig::new().with_weight_decay(0.0).init();

    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let n = 8;
    let x0 = randn(vec![n, 1, 8, 8], &mut rng)
        .to_tensor::<4>(&device)
        .clamp(-1.0, 1.0);
    let e = randn(vec![n, 1, 8, 8], &mut rng).to_tensor::<4>(&device);
    let t = Tensor::<1>::from_floats([0.05, 0.15, 0.3, 0.45, 0.55, 0.7, 0.85, 0.95], &device);
    let x_t = interpolate(x0.clone(), e.clone(), t.clone());

    let mut losses = vec![];
    for _ in 0..300 {
        let v = model.predict(x_t.clone(), t.clone(), &ddm_core::condition::Condition::none());
        let loss = flow_matching_loss(v, x0.clone(), e.clone());
        losses.push(loss.clone().into_scalar::<f32>());
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(2e-3, model, grads);
    }
    let (first, last) = (losses[0], *losses.last().unwrap());
    println!("loss: first {first:.4}, last {last:.5}");
    assert!(
        first > 0.8,
        "a fresh DiT predicts 0, so the first loss is E|e - x0|^2 ~ 1.5: {first}"
    );
    assert!(last < 0.05 * first, "loss fell only from {first} to {last}");
}
