//! Latent space: a VAE trained by ddm (or imported from diffusers), images encoded into its
//! latents, experts and a router trained on them, a registry that knows the space and refuses to
//! mix spaces, and samples decoded back into images.

mod common;

use std::path::Path;

use common::{ddm, fails, max_abs_diff, ok, tiny_images};
use ddm_core::checkpoint::Checkpoint;
use ddm_core::host::TensorFile;

fn train_vae(d: &Path, out: &str, steps: &str, seed: &str) {
    ok(ddm(
        d,
        &[
            "train-autoencoder",
            "--data",
            "idx:data",
            "--model",
            "vae:2:8:2",
            "--steps",
            steps,
            "--batch-size",
            "16",
            "--checkpoint-every",
            "10",
            "--seed",
            seed,
            "--quiet",
            "--out",
            out,
        ],
    ));
}

/// train-autoencoder -> encode -> partition -> 2 islands -> router -> register (with the VAE) ->
/// sample -> decode, in seconds; then the registry refuses an expert or a VAE of another space.
#[test]
fn latent_pipeline_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    tiny_images(&d.join("data"));
    train_vae(d, "vae", "30", "0");
    assert!(
        std::fs::read(d.join("vae/reconstructions.png"))
            .unwrap()
            .starts_with(b"\x89PNG")
    );
    let vae = Checkpoint::read(&d.join("vae/autoencoder.safetensors")).unwrap();
    let space = vae.latent_space().unwrap();
    assert_eq!(space.latent_shape, vec![2, 4, 4]);
    assert_eq!(space.image_shape, vec![1, 8, 8]);
    assert!(space.scaling_factor.is_finite() && space.scaling_factor > 0.0);

    let out = ok(ddm(
        d,
        &[
            "encode",
            "--vae",
            "vae/autoencoder.safetensors",
            "--data",
            "idx:data",
            "--batch-size",
            "40",
            "--quiet",
            "--out",
            "latents.safetensors",
            "--reconstructions",
            "rec.safetensors",
        ],
    ));
    assert!(out.contains("96 latents of shape [2, 4, 4]"), "{out}");
    let rec = TensorFile::read(&d.join("rec.safetensors")).unwrap();
    let rec_x = rec.f32("x0").unwrap();
    assert_eq!(rec_x.shape, vec![96, 1, 8, 8]);
    assert!(rec_x.data.iter().all(|v| v.is_finite()));
    assert_eq!(rec.i64("y").unwrap().data.len(), 96);
    let latents = TensorFile::read(&d.join("latents.safetensors")).unwrap();
    let x = latents.f32("x").unwrap();
    assert_eq!(x.shape, vec![96, 2, 4, 4]);
    assert_eq!(latents.i64("y").unwrap().data.len(), 96);
    // Scaled to about unit variance (the scaling factor was measured on these images).
    let n = x.data.len() as f64;
    let mean = x.data.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x.data.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    assert!((var - 1.0).abs() < 0.05, "latent variance {var}");

    ok(ddm(
        d,
        &[
            "partition",
            "--data",
            "tensors:latents.safetensors",
            "--k",
            "2",
            "--features",
            "raw",
            "--algorithm",
            "kmeans",
            "--out",
            "p",
        ],
    ));
    let common = [
        "--model",
        "DiT-XS/1",
        "--steps",
        "20",
        "--batch-size",
        "16",
        "--quiet",
    ];
    for k in ["0", "1"] {
        let out = format!("e{k}");
        let mut args = vec!["train", "--partition", "p", "--cluster", k, "--out", &out];
        args.extend(common);
        ok(ddm(d, &args));
        // Every expert records the space it was trained in.
        let meta = Checkpoint::read(&d.join(format!("e{k}/expert.safetensors")))
            .unwrap()
            .meta;
        assert_eq!(meta.latent.as_ref(), Some(&space), "expert {k}");
    }
    let mut args = vec![
        "train-router",
        "--partition",
        "p",
        "--out",
        "r",
        "--eval-samples",
        "50",
    ];
    args.extend(common);
    ok(ddm(d, &args));
    let out = ok(ddm(
        d,
        &[
            "register",
            "--registry",
            "reg",
            "e0/expert.safetensors",
            "e1/expert.safetensors",
            "r/router.safetensors",
            "vae/autoencoder.safetensors",
        ],
    ));
    assert!(
        out.contains("registered VAE: vae/autoencoder.safetensors"),
        "{out}"
    );
    ok(ddm(d, &["registry", "--registry", "reg", "verify"]));
    let list = ok(ddm(d, &["registry", "--registry", "reg", "list"]));
    assert!(
        list.contains("latent space: [2, 4, 4] latents of [1, 8, 8] images") && list.contains("VAE: "),
        "{list}"
    );
    // An export carries the VAE, and registering the export gives the same registry back.
    ok(ddm(
        d,
        &["registry", "--registry", "reg", "export", "--out", "published"],
    ));
    assert!(d.join("published/vae/model.safetensors").exists());
    ok(ddm(d, &["register", "--registry", "reg2", "published"]));
    let (a, b) = (
        ddm_ensemble::registry::read_index(&d.join("reg"))
            .unwrap()
            .unwrap(),
        ddm_ensemble::registry::read_index(&d.join("reg2"))
            .unwrap()
            .unwrap(),
    );
    assert_eq!(
        (a.latent, a.vae.map(|e| e.sha256)),
        (b.latent, b.vae.map(|e| e.sha256))
    );

    // Sampling decodes with the registry's VAE; the same seed without --decode gives the same
    // latents, and decoding them with the VAE directly gives the same images.
    let sample = |extra: &[&str], png: &str| {
        let mut args = vec![
            "sample",
            "--registry",
            "reg",
            "--strategy",
            "full",
            "--n",
            "8",
            "--steps",
            "5",
            "--out",
            png,
        ];
        args.extend(extra);
        ok(ddm(d, &args))
    };
    sample(&["--decode"], "decoded.png");
    sample(&[], "raw.png");
    assert!(
        std::fs::read(d.join("decoded.png"))
            .unwrap()
            .starts_with(b"\x89PNG")
    );
    assert!(!d.join("raw.png").exists(), "2-channel latents are no image");
    let decoded = TensorFile::read(&d.join("decoded.safetensors")).unwrap();
    let raw = TensorFile::read(&d.join("raw.safetensors")).unwrap();
    let (images, sampled) = (decoded.f32("x0").unwrap(), decoded.f32("latents").unwrap());
    assert_eq!(images.shape, vec![8, 1, 8, 8]);
    assert_eq!(sampled, raw.f32("x0").unwrap());
    let device = ddm_core::device::cpu();
    let model = vae.autoencoder(Path::new("vae"), &device).unwrap();
    let z = space.to_vae(sampled.to_tensor::<4>(&device));
    let want = ddm_core::host::HostTensor::from_tensor(model.decode(z));
    assert!(max_abs_diff(&want.data, &images.data) < 1e-5);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("decoded.json")).unwrap()).unwrap();
    assert_eq!(report["decoded_with"], "vae/autoencoder.safetensors");

    // Another VAE is another latent space: refused by the registry and by the sampler.
    train_vae(d, "vae2", "5", "1");
    let e = fails(ddm(
        d,
        &[
            "register",
            "--registry",
            "reg",
            "--replace",
            "vae2/autoencoder.safetensors",
        ],
    ));
    assert!(
        e.contains("this VAE's latent space is") && e.contains("experts were trained in"),
        "{e}"
    );
    let e = fails(ddm(
        d,
        &[
            "sample",
            "--registry",
            "reg",
            "--vae",
            "vae2/autoencoder.safetensors",
            "--n",
            "2",
            "--steps",
            "2",
            "--out",
            "x.png",
        ],
    ));
    assert!(e.contains("this VAE's latent space is"), "{e}");
    // An expert that says it was trained in pixel space (or in another VAE's latents) cannot join.
    let mut ckpt = Checkpoint::read(&d.join("e1/expert.safetensors")).unwrap();
    ckpt.meta.latent = None;
    ckpt.save(&d.join("pixel.safetensors")).unwrap();
    let e = fails(ddm(
        d,
        &["register", "--registry", "reg", "--replace", "pixel.safetensors"],
    ));
    assert!(
        e.contains("trained in pixel space") && e.contains("cannot mix spaces"),
        "{e}"
    );
    ok(ddm(d, &["registry", "--registry", "reg", "verify"]));
    // A pixel-space registry has nothing to decode.
    let e = fails(ddm(
        d,
        &[
            "sample",
            "--checkpoint",
            "pixel.safetensors",
            "--decode",
            "--n",
            "2",
            "--steps",
            "2",
            "--out",
            "y.png",
        ],
    ));
    assert!(e.contains("pixel space"), "{e}");
}

/// The autoencoder's training resumes exactly: 10 steps, then 10 more, equals 20 in one go.
#[test]
fn autoencoder_training_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    tiny_images(&d.join("data"));
    train_vae(d, "split", "10", "3");
    train_vae(d, "split", "20", "3");
    train_vae(d, "whole", "20", "3");
    let a = Checkpoint::read(&d.join("split/autoencoder.safetensors")).unwrap();
    let b = Checkpoint::read(&d.join("whole/autoencoder.safetensors")).unwrap();
    assert_eq!(a.tensors, b.tensors);
    assert_eq!(a.meta.model, b.meta.model); // the scaling factor too
}

/// `ddm import --from diffusers-vae` takes a diffusers AutoencoderKL directory as it is; encoding
/// the reference input with it gives diffusers' posterior mean, scaled by its scaling factor.
#[test]
fn a_diffusers_vae_imports_and_encodes_as_diffusers_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let testdata = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/diffusers");
    let vae_dir = testdata.join("vae-tiny");
    let out = ok(ddm(
        d,
        &[
            "import",
            "--from",
            "diffusers-vae",
            vae_dir.to_str().unwrap(),
            "--out",
            "vae.safetensors",
        ],
    ));
    assert!(out.contains("latents [4, 7, 7], scaling factor 0.5"), "{out}");
    let info = ok(ddm(d, &["info", "vae.safetensors"]));
    assert!(info.to_lowercase().contains("autoencoder"), "{info}");
    // The reference input as a tensors dataset, encoded through the command line.
    let io = TensorFile::read(&testdata.join("vae-tiny.io.safetensors")).unwrap();
    let x = io.f32("x").unwrap();
    ddm_core::host::write_tensors(
        &d.join("x.safetensors"),
        &std::collections::BTreeMap::from([("x".to_string(), x)]),
        &std::collections::BTreeMap::new(),
    )
    .unwrap();
    ok(ddm(
        d,
        &[
            "encode",
            "--vae",
            "vae.safetensors",
            "--data",
            "tensors:x.safetensors",
            "--quiet",
            "--out",
            "z.safetensors",
        ],
    ));
    let got = TensorFile::read(&d.join("z.safetensors"))
        .unwrap()
        .f32("x")
        .unwrap();
    let want: Vec<f32> = io.f32("mean").unwrap().data.iter().map(|v| v * 0.5).collect();
    assert!(max_abs_diff(&got.data, &want) < 1e-4);
    // diffusers' DiT is imported as an expert (its own layout: per-block conditioning).
    let out = ok(ddm(
        d,
        &[
            "import",
            "--from",
            "diffusers",
            testdata.join("dit-tiny").to_str().unwrap(),
            "--objective",
            "epsilon-linear",
            "--out",
            "dit.safetensors",
        ],
    ));
    assert!(out.contains("wrote dit.safetensors"), "{out}");
    let meta = Checkpoint::read(&d.join("dit.safetensors")).unwrap().meta;
    match &meta.model {
        ddm_core::model::ModelConfig::Dit(c) => {
            assert!(
                c.per_block_conditioning && c.learn_sigma && c.freq_shift == 1.0,
                "{c:?}"
            )
        }
        other => panic!("imported as {other:?}"),
    }
    // ...and joins an ensemble when it says which shard it was trained on: a partition of 4 x 8 x 8
    // data with 10 classes, the diffusers expert as both clusters' (an island may train with
    // anything), sampled by class.
    let n = 40;
    let x: Vec<f32> = (0..n * 256)
        .map(|i| ((i * 7919 % 997) as f32 / 498.5) - 1.0)
        .collect();
    let mut ints = std::collections::BTreeMap::new();
    ints.insert(
        "y".to_string(),
        ddm_core::host::HostIntTensor {
            shape: vec![n],
            data: (0..n as i64).map(|i| i % 10).collect(),
        },
    );
    ddm_core::host::write_tensors(
        &d.join("lat.safetensors"),
        &std::collections::BTreeMap::from([(
            "x".to_string(),
            ddm_core::host::HostTensor::new(vec![n, 4, 8, 8], x),
        )]),
        &ints,
    )
    .unwrap();
    ok(ddm(
        d,
        &[
            "partition",
            "--data",
            "tensors:lat.safetensors",
            "--k",
            "2",
            "--algorithm",
            "random",
            "--out",
            "p",
        ],
    ));
    for k in ["0", "1"] {
        ok(ddm(
            d,
            &[
                "import",
                "--from",
                "diffusers",
                testdata.join("dit-tiny").to_str().unwrap(),
                "--objective",
                "epsilon-linear",
                "--partition",
                "p",
                "--cluster",
                k,
                "--out",
                &format!("island-{k}.safetensors"),
            ],
        ));
    }
    ok(ddm(
        d,
        &[
            "register",
            "--registry",
            "reg",
            "--partition",
            "p",
            "island-0.safetensors",
            "island-1.safetensors",
        ],
    ));
    ok(ddm(
        d,
        &[
            "sample",
            "--registry",
            "reg",
            "--strategy",
            "oracle:1",
            "--class",
            "3",
            "--n",
            "4",
            "--steps",
            "3",
            "--out",
            "s.png",
        ],
    ));
    let x0 = TensorFile::read(&d.join("s.safetensors"))
        .unwrap()
        .f32("x0")
        .unwrap();
    assert_eq!(x0.shape, vec![4, 4, 8, 8]);
    assert!(x0.data.iter().all(|v| v.is_finite()));
    let e = fails(ddm(
        d,
        &[
            "import",
            "--from",
            "diffusers",
            vae_dir.to_str().unwrap(),
            "--out",
            "x.safetensors",
        ],
    ));
    assert!(e.contains("AutoencoderKL, not a DiTTransformer2DModel"), "{e}");
    // A directory that is not an AutoencoderKL is named.
    std::fs::create_dir(d.join("unet")).unwrap();
    std::fs::write(d.join("unet/config.json"), r#"{"_class_name": "UNet2DModel"}"#).unwrap();
    let e = fails(ddm(
        d,
        &[
            "import",
            "--from",
            "diffusers-vae",
            "unet",
            "--out",
            "u.safetensors",
        ],
    ));
    assert!(e.contains("unet/config.json") && e.contains("UNet2DModel"), "{e}");
}
