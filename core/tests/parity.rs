//! Parity with the public PyTorch DiT: `testdata/reference/` holds PyTorch-made weights (every
//! parameter random, including those DiT zero-initialises), an input and the PyTorch output.
//! ddm must reproduce the output to 1e-4 (max abs) on the CPU backend.

use std::collections::BTreeMap;
use std::path::PathBuf;

use ddm_core::burn::prelude::*;
use ddm_core::dit::pos_embed_2d;
use ddm_core::host::{HostTensor, TensorFile};
use ddm_core::model::ModelConfig;

fn reference(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../testdata/reference")
        .join(name)
}

fn run_reference(name: &str) -> f32 {
    let device = ddm_core::device::cpu();
    let config: ModelConfig =
        serde_json::from_str(&std::fs::read_to_string(reference(&format!("{name}.config.json"))).unwrap())
            .unwrap();
    let weights_path = reference(&format!("{name}.weights.safetensors"));
    let file = TensorFile::read(&weights_path).unwrap();
    let tensors: BTreeMap<String, HostTensor> = file
        .names()
        .map(|n| (n.to_string(), file.f32(n).unwrap()))
        .collect();
    let model = config.load(tensors, &weights_path, &device).unwrap();

    let io = TensorFile::read(&reference(&format!("{name}.io.safetensors"))).unwrap();
    let x_t = io.f32("x_t").unwrap().to_tensor::<4>(&device);
    let t = io.f32("t").unwrap().to_tensor::<1>(&device);
    let y = io.contains("y").then(|| {
        let y = io.i64("y").unwrap();
        Tensor::<1, Int>::from_data(TensorData::new(y.data, y.shape), &device)
    });
    let want = io.f32("v").unwrap();
    let got = HostTensor::from_tensor(model.predict(x_t, t, y));
    assert_eq!(got.shape, want.shape);
    got.data
        .iter()
        .zip(&want.data)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

#[test]
fn unconditional_dit_matches_pytorch() {
    let err = run_reference("dit-small");
    println!("dit-small max abs error vs PyTorch: {err:e}");
    assert!(err <= 1e-4, "max abs error {err}");
}

#[test]
fn class_conditional_dit_matches_pytorch() {
    let err = run_reference("dit-class");
    println!("dit-class max abs error vs PyTorch: {err:e}");
    assert!(err <= 1e-4, "max abs error {err}");
}

/// Our fixed 2-D sin-cos position embedding is the reference's.
#[test]
fn position_embedding_matches_pytorch() {
    for (name, dim, grid) in [("dit-small", 64, 7), ("dit-class", 96, 8)] {
        let file = TensorFile::read(&reference(&format!("{name}.weights.safetensors"))).unwrap();
        let want = file.f32("pos_embed").unwrap();
        let got = pos_embed_2d(dim, grid);
        assert_eq!(got.shape, want.shape);
        let err = got
            .data
            .iter()
            .zip(&want.data)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(err < 1e-5, "{name}: {err}");
    }
}
