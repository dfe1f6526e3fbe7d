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

/// The largest absolute difference between two equally long slices.
fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
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
    let got = HostTensor::from_tensor(model.predict(x_t, t, &ddm_core::condition::Condition::maybe_class(y)));
    assert_eq!(got.shape, want.shape);
    max_abs_diff(&got.data, &want.data)
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
        let err = max_abs_diff(&got.data, &want.data);
        assert!(err < 1e-5, "{name}: {err}");
    }
}

/// ddm's AutoencoderKL against diffusers': `testdata/diffusers/vae-tiny` (made by
/// `scripts/make_diffusers_reference.py`, every parameter perturbed from its initial value), one
/// input and diffusers' posterior mean, log variance and decoding of the mean.
#[test]
fn autoencoder_kl_matches_diffusers() {
    let device = ddm_core::device::cpu();
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/diffusers");
    let (config, tensors) = ddm_core::vae::read_diffusers(&dir.join("vae-tiny")).unwrap();
    assert_eq!(config.latent_shape(), vec![4, 7, 7]);
    assert_eq!(config.scaling_factor, 0.5);
    let vae = config.load(tensors, &dir.join("vae-tiny"), &device).unwrap();
    let io = TensorFile::read(&dir.join("vae-tiny.io.safetensors")).unwrap();
    let x = io.f32("x").unwrap().to_tensor::<4>(&device);
    let posterior = vae.encode(x);
    let decoded = vae.decode(posterior.mean.clone());
    for (name, got) in [
        ("mean", posterior.mean),
        ("logvar", posterior.logvar),
        ("decoded", decoded),
    ] {
        let want = io.f32(name).unwrap();
        let got = HostTensor::from_tensor(got);
        assert_eq!(got.shape, want.shape, "{name}");
        let err = max_abs_diff(&got.data, &want.data);
        let scale = want.data.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        println!("vae-tiny {name}: max abs error vs diffusers {err:e} (max |value| {scale})");
        assert!(err <= 1e-4, "{name}: max abs error {err}");
    }
}

/// diffusers' `DiTTransformer2DModel` (per-block conditioning, shifted timestep frequencies, learned
/// sigma) read as a ddm DiT: `testdata/diffusers/dit-tiny`, every parameter perturbed, against
/// diffusers' output (its first C channels, the prediction; diffusers takes t on 0..1000, ddm
/// t in [0, 1] scaled by 1000).
#[test]
fn diffusers_dit_matches_diffusers() {
    let device = ddm_core::device::cpu();
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/diffusers");
    let (config, tensors) = ddm_core::dit::diffusers::read_diffusers(&dir.join("dit-tiny")).unwrap();
    assert!(config.per_block_conditioning && config.learn_sigma);
    assert_eq!((config.num_classes, config.class_rows()), (10, 11));
    let model = ModelConfig::Dit(config)
        .load(tensors, &dir.join("dit-tiny"), &device)
        .unwrap();
    let io = TensorFile::read(&dir.join("dit-tiny.io.safetensors")).unwrap();
    let x = io.f32("x").unwrap().to_tensor::<4>(&device);
    let t = io.f32("timestep").unwrap().to_tensor::<1>(&device) / 1000.0;
    let y = io.i64("class_labels").unwrap();
    let y = Tensor::<1, Int>::from_data(TensorData::new(y.data, y.shape), &device);
    let got = HostTensor::from_tensor(model.predict(x, t, &ddm_core::condition::Condition::class(y)));
    let want = io.f32("sample").unwrap(); // [3, 8, 8, 8]: prediction then variance channels
    assert_eq!(got.shape, vec![3, 4, 8, 8]);
    let per = 4 * 64;
    let err = (0..3)
        .flat_map(|n| (0..per).map(move |i| (n, i)))
        .map(|(n, i)| (got.data[n * per + i] - want.data[n * 2 * per + i]).abs())
        .fold(0.0, f32::max);
    println!("dit-tiny max abs error vs diffusers: {err:e}");
    assert!(err <= 1e-4, "max abs error {err}");
}

/// diffusers' `PixArtTransformer2DModel` (adaLN-single, cross-attention to a masked caption,
/// learned sigma) read as a ddm PixArt: `testdata/diffusers/pixart-tiny`, every parameter
/// perturbed, against diffusers' output. The third caption is all padding (the null caption).
#[test]
fn diffusers_pixart_matches_diffusers() {
    let device = ddm_core::device::cpu();
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/diffusers");
    let (config, tensors) = ddm_core::pixart::read_diffusers(&dir.join("pixart-tiny")).unwrap();
    assert!(config.learn_sigma);
    assert_eq!((config.hidden_size, config.caption_channels), (32, 24));
    let model = ModelConfig::PixArt(config)
        .load(tensors, &dir.join("pixart-tiny"), &device)
        .unwrap();
    let io = TensorFile::read(&dir.join("pixart-tiny.io.safetensors")).unwrap();
    let x = io.f32("x").unwrap().to_tensor::<4>(&device);
    let t = io.f32("timestep").unwrap().to_tensor::<1>(&device) / 1000.0;
    let c = ddm_core::condition::Condition::tokens(
        io.f32("encoder_hidden_states").unwrap().to_tensor::<3>(&device),
        io.f32("encoder_attention_mask").unwrap().to_tensor::<2>(&device),
    );
    let got = HostTensor::from_tensor(model.predict(x, t, &c));
    let want = io.f32("sample").unwrap(); // [3, 8, 8, 8]: prediction then variance channels
    assert_eq!(got.shape, vec![3, 4, 8, 8]);
    let per = 4 * 64;
    let err = (0..3)
        .flat_map(|n| (0..per).map(move |i| (n, i)))
        .map(|(n, i)| (got.data[n * per + i] - want.data[n * 2 * per + i]).abs())
        .fold(0.0, f32::max);
    println!("pixart-tiny max abs error vs diffusers: {err:e}");
    assert!(err <= 1e-4, "max abs error {err}");
}

/// ddm's text encoder and tokenizer against transformers': `testdata/transformers/clip-tiny` (a
/// random CLIPTextModel and a small CLIP-style tokenizer, made by
/// `scripts/make_transformers_reference.py`). The captions tokenize to CLIPTokenizerFast's ids and
/// mask (whitespace folded, cased letters lowered, the long one cut with its end-of-text kept), and
/// the token states and pooled vector match CLIPTextModel's.
#[test]
fn clip_text_model_matches_transformers() {
    let device = ddm_core::device::cpu();
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/transformers");
    let (config, tensors) = ddm_core::clip::read_transformers(&dir.join("clip-tiny")).unwrap();
    assert_eq!((config.max_position_embeddings, config.eos_token_id), (16, 1));
    let model = config.load(tensors, &dir.join("clip-tiny"), &device).unwrap();
    let tokenizer = ddm_core::clip::read_transformers_tokenizer(&dir.join("clip-tiny"), &config).unwrap();

    let io = TensorFile::read(&dir.join("clip-tiny.io.safetensors")).unwrap();
    let captions: Vec<String> = serde_json::from_str(&io.metadata["captions"]).unwrap();
    let batch = tokenizer.encode(&captions).unwrap();
    assert_eq!(batch.ids, io.i64("input_ids").unwrap().data);
    let want_mask: Vec<f32> = io
        .i64("attention_mask")
        .unwrap()
        .data
        .iter()
        .map(|&m| m as f32)
        .collect();
    assert_eq!(batch.mask, want_mask);

    let (ids, mask) = batch.to_tensors(&device);
    let got = model.forward(ids, mask);
    for (name, got) in [
        ("last_hidden_state", HostTensor::from_tensor(got.tokens)),
        ("pooler_output", HostTensor::from_tensor(got.pooled)),
    ] {
        let want = io.f32(name).unwrap();
        assert_eq!(got.shape, want.shape, "{name}");
        let err = max_abs_diff(&got.data, &want.data);
        println!("clip-tiny {name}: max abs error vs transformers {err:e}");
        assert!(err <= 1e-4, "{name}: max abs error {err}");
    }

    // Written out and read back (what a checkpoint stores), the tokenizer gives the same ids.
    let json = tokenizer.to_json().unwrap();
    let back = ddm_core::tokenizer::TextTokenizer::from_json(
        &json,
        "stored",
        16,
        ddm_core::tokenizer::Pad::Token("<|endoftext|>"),
    )
    .unwrap();
    assert_eq!(
        back.encode(&captions).unwrap(),
        tokenizer.encode(&captions).unwrap()
    );
}
