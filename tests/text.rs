//! Text conditioning from the command line: a transformers CLIP text encoder imported with its
//! tokenizer, captions encoded into the vectors (and token states) models condition on, joined to
//! the samples they describe, and the refusals that keep one encoder's conditions from another's.

mod common;

use std::path::{Path, PathBuf};

use common::{ddm, fails, fixed_prediction, max_abs_diff, ok, registry_fixture, relative_error, tiny_images};
use ddm_core::checkpoint::Checkpoint;
use ddm_core::host::{HostTensor, TensorFile};

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/transformers")
}

fn import_encoder(d: &Path) {
    let src = testdata().join("clip-tiny");
    let out = ok(ddm(
        d,
        &[
            "import",
            "--from",
            "transformers-clip",
            src.to_str().unwrap(),
            "--out",
            "te.safetensors",
        ],
    ));
    assert!(out.contains("up to 16 tokens -> vectors of 32"), "{out}");
}

/// `ddm import --from transformers-clip` then `ddm encode-text --tokens` on the reference captions
/// (a .jsonl file): the file's `c`, `c_tokens` and `c_mask` are transformers' pooled output, token
/// states and attention mask, and its metadata names the encoder by its tensors' sha256.
#[test]
fn imported_clip_encodes_captions_as_transformers_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    import_encoder(d);
    let info = ok(ddm(d, &["info", "te.safetensors"]));
    assert!(info.contains("text-encoder"), "{info}");

    let io = TensorFile::read(&testdata().join("clip-tiny.io.safetensors")).unwrap();
    let captions: Vec<String> = serde_json::from_str(&io.metadata["captions"]).unwrap();
    let lines: Vec<String> = captions
        .iter()
        .map(|c| serde_json::json!({ "caption": c }).to_string())
        .collect();
    std::fs::write(d.join("captions.jsonl"), lines.join("\n")).unwrap();
    let out = ok(ddm(
        d,
        &[
            "encode-text",
            "--encoder",
            "te.safetensors",
            "--captions",
            "captions.jsonl",
            "--tokens",
            "--quiet",
            "--out",
            "text.safetensors",
        ],
    ));
    assert!(
        out.contains("4 captions -> c [4, 32], c_tokens [4, 16, 32], c_mask [4, 16]"),
        "{out}"
    );

    let text = TensorFile::read(&d.join("text.safetensors")).unwrap();
    for (ours, theirs) in [("c", "pooler_output"), ("c_tokens", "last_hidden_state")] {
        let (got, want) = (text.f32(ours).unwrap(), io.f32(theirs).unwrap());
        assert_eq!(got.shape, want.shape, "{ours}");
        let err = max_abs_diff(&got.data, &want.data);
        assert!(
            err <= 1e-4,
            "{ours}: max abs error {err} against transformers' {theirs}"
        );
    }
    let mask = text.f32("c_mask").unwrap().data;
    let want: Vec<f32> = io
        .i64("attention_mask")
        .unwrap()
        .data
        .iter()
        .map(|&m| m as f32)
        .collect();
    assert_eq!(mask, want);
    let space: ddm_core::clip::TextSpace =
        serde_json::from_str(&text.metadata[ddm_datasets::tensors::TEXT_SPACE_KEY]).unwrap();
    let encoder = Checkpoint::read(&d.join("te.safetensors")).unwrap();
    assert_eq!(space, encoder.text_space().unwrap());
}

/// With --data, caption i is written beside sample i: a `tensors:` dataset (`x` as bytes, `y`,
/// `c`) that `ddm partition` reads as it is. Caption and sample counts must agree.
#[test]
fn captions_join_their_samples_as_one_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    import_encoder(d);
    tiny_images(&d.join("data"));
    let captions: Vec<String> = (0..96)
        .map(|i| match i % 2 {
            0 => format!("a bright left half, number {i}"),
            _ => format!("a bright top half, number {i}"),
        })
        .collect();
    std::fs::write(d.join("captions.txt"), captions.join("\n")).unwrap();
    let args = |captions: &'static str| {
        [
            "encode-text",
            "--encoder",
            "te.safetensors",
            "--captions",
            captions,
            "--data",
            "idx:data",
            "--quiet",
            "--out",
            "train.safetensors",
        ]
    };
    ok(ddm(d, &args("captions.txt")));
    let f = TensorFile::read(&d.join("train.safetensors")).unwrap();
    assert_eq!(f.u8("x").unwrap().0, vec![96, 1, 8, 8]);
    assert_eq!(f.i64("y").unwrap().data.len(), 96);
    assert_eq!(f.f32("c").unwrap().shape, vec![96, 32]);
    // Different captions, different vectors; the same caption twice, the same vector.
    let c = f.f32("c").unwrap().data;
    assert!(max_abs_diff(&c[..32], &c[32..64]) > 1e-3);
    ok(ddm(
        d,
        &[
            "partition",
            "--data",
            "tensors:train.safetensors",
            "--k",
            "2",
            "--out",
            "part",
            "--quiet",
        ],
    ));

    std::fs::write(d.join("few.txt"), "one caption\nand another\n").unwrap();
    let err = fails(ddm(d, &args("few.txt")));
    assert!(
        err.contains("few.txt has 2 captions") && err.contains("96 samples"),
        "{err}"
    );
}

/// What is not a text encoder is refused as one, and a text encoder is not an ensemble member.
#[test]
fn a_text_encoder_is_used_only_as_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    import_encoder(d);
    let experts = registry_fixture(d, 2);
    std::fs::write(d.join("c.txt"), "a caption\n").unwrap();
    let expert = experts[0].to_str().unwrap();
    let err = fails(ddm(
        d,
        &[
            "encode-text",
            "--encoder",
            expert,
            "--captions",
            "c.txt",
            "--out",
            "t.safetensors",
        ],
    ));
    assert!(
        err.contains("role expert") && err.contains("--encoder takes a text encoder"),
        "{err}"
    );
    let err = fails(ddm(
        d,
        &[
            "register",
            "--registry",
            "reg",
            "--partition",
            "p",
            expert,
            "te.safetensors",
        ],
    ));
    assert!(
        err.contains("te.safetensors: a text encoder is not a member of an ensemble"),
        "{err}"
    );
    assert!(
        !d.join("reg/registry.json").exists(),
        "a refused registration writes nothing"
    );
}

/// `ddm data captions` measures what each image shows and phrases it; `ddm encode-text` reads the
/// .jsonl it writes as it is. Three classes of bars (narrow, medium, wide) at four brightnesses:
/// each caption names its class, its width's third and its shade's.
#[test]
fn measured_captions_describe_their_images() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    import_encoder(d);
    for (class, cols) in [("bag", 3..5), ("coat", 2..6), ("dress", 1..7)] {
        std::fs::create_dir_all(d.join("imgs").join(class)).unwrap();
        for (i, v) in [60u8, 120, 180, 240].into_iter().enumerate() {
            let px: Vec<u8> = (0..64)
                .map(|p| {
                    if (1..7).contains(&(p / 8)) && cols.contains(&(p % 8)) {
                        v
                    } else {
                        0
                    }
                })
                .collect();
            let path = d.join(format!("imgs/{class}/{i}.png"));
            ddm_core::grid::write_grid_png(&path, &[Some(px.as_slice())], [1, 8, 8], 1, 0, 0).unwrap();
        }
    }
    let out = ok(ddm(
        d,
        &[
            "data",
            "captions",
            "--data",
            "images:imgs@8",
            "--out",
            "captions.jsonl",
        ],
    ));
    assert!(out.contains("12 captions"), "{out}");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(d.join("captions.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 12);
    for (i, l) in lines.iter().enumerate() {
        let (class, width) = [("bag", "narrow"), ("coat", "medium-width"), ("dress", "wide")][i / 4];
        assert_eq!(
            (l["class"].as_str(), l["width"].as_str()),
            (Some(class), Some(width)),
            "image {i}: {l}"
        );
        let shade = if i % 4 == 0 {
            "dark"
        } else if i % 4 == 3 {
            "light"
        } else {
            ""
        };
        if !shade.is_empty() {
            assert_eq!(l["shade"], shade, "image {i}: {l}");
        }
        assert!(l["caption"].as_str().unwrap().contains(class), "{l}");
    }
    let openings: std::collections::BTreeSet<&str> = lines
        .iter()
        .map(|l| l["caption"].as_str().unwrap().split(' ').next().unwrap())
        .collect();
    assert!(openings.len() >= 2, "captions open with {openings:?} only");
    ok(ddm(
        d,
        &[
            "encode-text",
            "--encoder",
            "te.safetensors",
            "--captions",
            "captions.jsonl",
            "--data",
            "images:imgs@8",
            "--quiet",
            "--out",
            "train.safetensors",
        ],
    ));
    assert_eq!(
        TensorFile::read(&d.join("train.safetensors"))
            .unwrap()
            .f32("c")
            .unwrap()
            .shape,
        vec![12, 32]
    );
}

/// An image folder with a caption beside each image (webdataset's layout) needs no --captions;
/// without captions of its own, the folder is named.
#[test]
fn an_image_folder_brings_its_own_captions() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    import_encoder(d);
    std::fs::create_dir_all(d.join("photos")).unwrap();
    for (i, caption) in ["a dark square", "a light square", "a bag"].iter().enumerate() {
        let v = [30u8, 220, 120][i];
        let px = vec![v; 64];
        ddm_core::grid::write_grid_png(
            &d.join(format!("photos/{i}.png")),
            &[Some(px.as_slice())],
            [1, 8, 8],
            1,
            0,
            1,
        )
        .unwrap();
        std::fs::write(d.join(format!("photos/{i}.txt")), caption).unwrap();
    }
    let args = [
        "encode-text",
        "--encoder",
        "te.safetensors",
        "--data",
        "images:photos@8",
        "--quiet",
        "--out",
        "t.safetensors",
    ];
    let out = ok(ddm(d, &args));
    assert!(out.contains("3 captions"), "{out}");
    // The same captions from a file give the same vectors.
    std::fs::write(d.join("c.txt"), "a dark square\na light square\na bag\n").unwrap();
    ok(ddm(
        d,
        &[
            "encode-text",
            "--encoder",
            "te.safetensors",
            "--captions",
            "c.txt",
            "--quiet",
            "--out",
            "u.safetensors",
        ],
    ));
    let c = |f: &str| TensorFile::read(&d.join(f)).unwrap().f32("c").unwrap().data;
    assert_eq!(c("t.safetensors"), c("u.safetensors"));

    for i in 0..3 {
        std::fs::remove_file(d.join(format!("photos/{i}.txt"))).unwrap();
    }
    let err = fails(ddm(d, &args));
    assert!(
        err.contains("photos") && err.contains("has no captions of its own"),
        "{err}"
    );
}

/// Experts that read text: captions -> `ddm encode-text --data` -> partition -> two islands
/// trained with --condition-vectors -> register -> `ddm sample --condition`. The experts record
/// the width they read, the registry keeps it, and the caption changes the samples of one expert
/// alone (`oracle:0`), so the experts read them, and the analytic router weighs the clusters by
/// it (their statistics of the vectors); `--prompt` samples what the caption's vector does,
/// through the registry's text encoder only; guidance on the caption, a served expert and a
/// distilled student read it too.
#[test]
fn experts_trained_on_captions_sample_by_caption() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    import_encoder(d);
    tiny_images(&d.join("data"));
    let captions: Vec<&str> = (0..96)
        .map(|i| {
            if i % 2 == 0 {
                "a bright left half"
            } else {
                "a bright top half"
            }
        })
        .collect();
    std::fs::write(d.join("captions.txt"), captions.join("\n")).unwrap();
    ok(ddm(
        d,
        &[
            "encode-text",
            "--encoder",
            "te.safetensors",
            "--captions",
            "captions.txt",
            "--data",
            "idx:data",
            "--quiet",
            "--out",
            "train.safetensors",
        ],
    ));
    ok(ddm(
        d,
        &[
            "partition",
            "--data",
            "tensors:train.safetensors",
            "--k",
            "2",
            "--algorithm",
            "random",
            "--out",
            "p",
        ],
    ));
    for k in ["0", "1"] {
        let out = format!("e{k}");
        ok(ddm(
            d,
            &[
                "train",
                "--partition",
                "p",
                "--cluster",
                k,
                "--out",
                &out,
                "--model",
                "mlp",
                "--mlp-hidden",
                "32",
                "--steps",
                "30",
                "--batch-size",
                "16",
                "--condition-vectors",
                "--quiet",
            ],
        ));
        let meta = Checkpoint::read(&d.join(format!("e{k}/expert.safetensors")))
            .unwrap()
            .meta;
        assert_eq!(
            (meta.condition_dim, meta.model.condition_dim()),
            (Some(32), 32),
            "expert {k}"
        );
    }
    ok(ddm(
        d,
        &[
            "register",
            "--registry",
            "reg",
            "--partition",
            "p",
            "e0/expert.safetensors",
            "e1/expert.safetensors",
        ],
    ));
    let index = ddm_ensemble::registry::read_index(&d.join("reg"))
        .unwrap()
        .unwrap();
    assert!(index.experts.values().all(|e| e.condition_dim == Some(32)));

    // Four samples of one caption, then of the other, then of the first again; the same seed.
    let text = TensorFile::read(&d.join("train.safetensors"))
        .unwrap()
        .f32("c")
        .unwrap()
        .data;
    let mut samples = vec![];
    for (name, row) in [("left", 0), ("top", 1), ("left-again", 0)] {
        let c: Vec<f32> = (0..4)
            .flat_map(|_| text[row * 32..(row + 1) * 32].to_vec())
            .collect();
        let cond = format!("c-{name}.safetensors");
        ddm_core::host::write_tensors(
            &d.join(&cond),
            &[("c".to_string(), ddm_core::host::HostTensor::new(vec![4, 32], c))].into(),
            &Default::default(),
        )
        .unwrap();
        let out = format!("{name}.png");
        ok(ddm(
            d,
            &[
                "sample",
                "--registry",
                "reg",
                "--router",
                "analytic",
                "--strategy",
                "full",
                "--n",
                "4",
                "--steps",
                "8",
                "--condition",
                &cond,
                "--out",
                &out,
            ],
        ));
        samples.push(
            TensorFile::read(&d.join(format!("{name}.safetensors")))
                .unwrap()
                .f32("x0")
                .unwrap()
                .data,
        );
    }
    // Sampling is deterministic, so any difference is the caption's (30 steps of training move
    // the samples by about 6e-4).
    assert_eq!(samples[0], samples[2]);
    assert!(
        max_abs_diff(&samples[0], &samples[1]) > 0.0,
        "the caption changes nothing"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("left.json")).unwrap()).unwrap();
    assert_eq!(
        report["router_sees_vectors"].as_bool(),
        Some(true),
        "the analytic router reads the islands' statistics of the vectors: {report}"
    );
    let by_expert_0 = |cond: &str| {
        ok(ddm(
            d,
            &[
                "sample",
                "--registry",
                "reg",
                "--strategy",
                "oracle:0",
                "--n",
                "4",
                "--steps",
                "8",
                "--condition",
                cond,
                "--out",
                "oracle.png",
            ],
        ));
        TensorFile::read(&d.join("oracle.safetensors"))
            .unwrap()
            .f32("x0")
            .unwrap()
            .data
    };
    assert!(
        max_abs_diff(
            &by_expert_0("c-left.safetensors"),
            &by_expert_0("c-top.safetensors")
        ) > 0.0,
        "the caption does not reach the experts"
    );

    // The registry knows the text space; `--prompt` encodes the caption into the same vector
    // `ddm encode-text` made (to float rounding: one caption, not a batch of 96), so it samples
    // what `--condition` did.
    let index = ddm_ensemble::registry::read_index(&d.join("reg"))
        .unwrap()
        .unwrap();
    let encoder = Checkpoint::read(&d.join("te.safetensors")).unwrap();
    assert_eq!(index.text, encoder.text_space());
    let prompt = |registry: &str, encoder: &str, guidance: &str, out: &str| {
        // The analytic router needs every cluster's statistics; a served expert brings none.
        let router = if registry == "reg" { "analytic" } else { "learned" };
        let got = ddm(
            d,
            &[
                "sample",
                "--registry",
                registry,
                "--router",
                router,
                "--strategy",
                "full",
                "--n",
                "4",
                "--steps",
                "8",
                "--prompt",
                "a bright left half",
                "--text-encoder",
                encoder,
                "--guidance",
                guidance,
                "--out",
                &format!("{out}.png"),
            ],
        );
        let x0 = TensorFile::read(&d.join(format!("{out}.safetensors")))
            .and_then(|f| f.f32("x0"))
            .map(|x| x.data);
        (got, x0)
    };
    let (got, prompted) = prompt("reg", "te.safetensors", "1", "prompted");
    ok(got);
    assert!(max_abs_diff(&prompted.unwrap(), &samples[0]) < 1e-5);
    // Another encoder's vectors are refused, naming both encoders.
    let mut other = encoder.clone();
    let t = other.tensors.get_mut("final_layer_norm.bias").unwrap();
    t.data[0] += 0.5;
    other.save(&d.join("te2.safetensors")).unwrap();
    let err = fails(prompt("reg", "te2.safetensors", "1", "refused").0);
    assert!(
        err.contains("--text-encoder is text encoder") && err.contains("the models sampled read"),
        "{err}"
    );

    // Guidance on the caption (the experts learnt the zero vector: --class-dropout 0.1) moves
    // the samples.
    let (got, guided) = prompt("reg", "te.safetensors", "3", "guided");
    ok(got);
    let guided = guided.unwrap();
    assert!(
        max_abs_diff(&guided, &samples[0]) > 0.0,
        "guidance changed nothing"
    );

    // With a router that reads the caption too: expert 1 served, expert 0 and the router from
    // their files. The served expert receives the vectors (and its guidance's null rows), so the
    // samples are those of the same registry held locally, guided or not.
    ok(ddm(
        d,
        &[
            "train-router",
            "--partition",
            "p",
            "--out",
            "r",
            "--model",
            "mlp",
            "--mlp-hidden",
            "32",
            "--steps",
            "30",
            "--batch-size",
            "16",
            "--eval-samples",
            "20",
            "--condition-vectors",
            "--quiet",
        ],
    ));
    let (e0, router) = ("e0/expert.safetensors", "r/router.safetensors");
    ok(ddm(
        d,
        &[
            "register",
            "--registry",
            "local",
            "--partition",
            "p",
            e0,
            "e1/expert.safetensors",
            router,
        ],
    ));
    let server = common::Server::start(d, &["--registry", "reg", "--experts", "1"], None);
    ok(ddm(
        d,
        &["register", "--registry", "mixed", "--partition", "p", e0, router],
    ));
    ok(ddm(
        d,
        &[
            "register",
            "--registry",
            "mixed",
            "--partition",
            "p",
            "--remote",
            &server.url,
        ],
    ));
    for guidance in ["1", "3"] {
        let (got, local) = prompt("local", "te.safetensors", guidance, "local");
        ok(got);
        let (got, served) = prompt("mixed", "te.safetensors", guidance, "served");
        ok(got);
        let diff = max_abs_diff(&served.unwrap(), &local.unwrap());
        assert!(diff < 1e-5, "guidance {guidance}: served differs by {diff}");
    }
    drop(server);

    // A student distilled from the experts reads the vectors too, records their text space, and
    // samples by prompt from its checkpoint.
    ok(ddm(
        d,
        &[
            "distill",
            "--registry",
            "reg",
            "--partition",
            "p",
            "--out",
            "student",
            "--model",
            "mlp",
            "--mlp-hidden",
            "32",
            "--steps",
            "20",
            "--batch-size",
            "16",
            "--quiet",
        ],
    ));
    let student = Checkpoint::read(&d.join("student/expert.safetensors"))
        .unwrap()
        .meta;
    assert_eq!(
        (student.model.condition_dim(), student.text.clone()),
        (32, encoder.text_space())
    );
    let mut drawn = vec![];
    for caption in ["a bright left half", "a bright top half"] {
        ok(ddm(
            d,
            &[
                "sample",
                "--checkpoint",
                "student/expert.safetensors",
                "--n",
                "4",
                "--steps",
                "8",
                "--prompt",
                caption,
                "--text-encoder",
                "te.safetensors",
                "--guidance",
                "2",
                "--out",
                "student.png",
            ],
        ));
        drawn.push(
            TensorFile::read(&d.join("student.safetensors"))
                .unwrap()
                .f32("x0")
                .unwrap()
                .data,
        );
    }
    assert!(
        max_abs_diff(&drawn[0], &drawn[1]) > 0.0,
        "the caption does not reach the student"
    );

    // Vectors of another width are refused by name.
    ddm_core::host::write_tensors(
        &d.join("narrow.safetensors"),
        &[(
            "c".to_string(),
            ddm_core::host::HostTensor::new(vec![4, 8], vec![0.0; 32]),
        )]
        .into(),
        &Default::default(),
    )
    .unwrap();
    let err = fails(ddm(
        d,
        &[
            "sample",
            "--registry",
            "reg",
            "--router",
            "analytic",
            "--n",
            "4",
            "--condition",
            "narrow.safetensors",
        ],
    ));
    assert!(
        err.contains("narrow.safetensors: `c` has shape [4, 8]") && err.contains("[4, 32]"),
        "{err}"
    );
}

/// Write `name` holding F32 tensors.
fn write(d: &Path, name: &str, tensors: Vec<(&str, ddm_core::host::HostTensor)>) {
    let map = tensors.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    ddm_core::host::write_tensors(&d.join(name), &map, &Default::default()).unwrap();
}

/// A diffusers PixArt (`testdata/diffusers/pixart-tiny`) imported as an epsilon expert samples by
/// its caption's token sequence (`c_tokens`, `c_mask` from `--condition`): another caption, other
/// samples; a padded-out token changes nothing. Token sequences of another width and guidance
/// without caption dropout are refused by name; the expert joins a registry, which records the
/// width of its tokens.
#[test]
fn an_imported_pixart_samples_by_its_captions_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/diffusers/pixart-tiny");
    let out = ok(ddm(
        d,
        &[
            "import",
            "--from",
            "diffusers",
            src.to_str().unwrap(),
            "--objective",
            "epsilon-linear",
            "--out",
            "pixart.safetensors",
        ],
    ));
    assert!(out.contains("wrote pixart.safetensors"), "{out}");
    let meta = Checkpoint::read(&d.join("pixart.safetensors")).unwrap().meta;
    assert_eq!((meta.model.arch(), meta.model.token_dim()), ("pixart", 24));
    assert!(meta.source.unwrap().contains("PixArtTransformer2DModel"));

    // Two captions of 3 tokens (padded to 5), one per run; the second run's padding differs.
    let caption = |seed: u32, pad: f32| {
        let mut v: Vec<f32> = (0..5 * 24)
            .map(|i| (((i as u32 * 7919 + seed * 104729) % 200) as f32 / 100.0) - 1.0)
            .collect();
        v[3 * 24..].iter_mut().for_each(|x| *x = pad);
        v
    };
    let mask = HostTensor::new(vec![2, 5], [[1.0, 1.0, 1.0, 0.0, 0.0]; 2].concat());
    let mut drawn = vec![];
    for (name, seed, pad) in [("a", 1, 0.0), ("b", 2, 0.0), ("a-padded", 1, 5.0)] {
        let tokens = HostTensor::new(vec![2, 5, 24], [caption(seed, pad), caption(seed, pad)].concat());
        write(
            d,
            &format!("{name}.safetensors"),
            vec![("c_tokens", tokens), ("c_mask", mask.clone())],
        );
        ok(ddm(
            d,
            &[
                "sample",
                "--checkpoint",
                "pixart.safetensors",
                "--n",
                "2",
                "--steps",
                "4",
                "--condition",
                &format!("{name}.safetensors"),
                "--out",
                "p.png",
            ],
        ));
        drawn.push(
            TensorFile::read(&d.join("p.safetensors"))
                .unwrap()
                .f32("x0")
                .unwrap()
                .data,
        );
    }
    assert!(
        max_abs_diff(&drawn[0], &drawn[1]) > 1e-3,
        "the caption does not reach the model"
    );
    assert!(
        max_abs_diff(&drawn[0], &drawn[2]) < 1e-5,
        "padding reaches the model"
    );

    let sample = |condition: &str, extra: &[&str]| {
        let mut a = vec![
            "sample",
            "--checkpoint",
            "pixart.safetensors",
            "--n",
            "2",
            "--steps",
            "2",
            "--condition",
            condition,
        ];
        a.extend(extra);
        ddm(d, &a)
    };
    write(
        d,
        "wide.safetensors",
        vec![
            ("c_tokens", HostTensor::new(vec![2, 5, 32], vec![0.0; 320])),
            ("c_mask", mask.clone()),
        ],
    );
    let err = fails(sample("wide.safetensors", &[]));
    assert!(
        err.contains("`c_tokens` has shape [2, 5, 32]") && err.contains("[2, L, 24]"),
        "{err}"
    );
    write(
        d,
        "pooled.safetensors",
        vec![("c", HostTensor::new(vec![2, 24], vec![0.0; 48]))],
    );
    let err = fails(sample("pooled.safetensors", &[]));
    assert!(err.contains("no token sequences"), "{err}");
    let err = fails(sample("a.safetensors", &["--guidance", "2"]));
    assert!(
        err.contains("without condition dropout") && err.contains("--null-caption"),
        "{err}"
    );

    // Given its encoder's null caption (one token, then padding), the imported PixArt is guided;
    // unguided, its samples are those it drew without one.
    let null = (0..5 * 24).map(|i| if i < 24 { (i as f32 * 0.3).sin() } else { 0.0 });
    write(
        d,
        "null.safetensors",
        vec![
            ("c_tokens", HostTensor::new(vec![1, 5, 24], null.collect())),
            (
                "c_mask",
                HostTensor::new(vec![1, 5], vec![1.0, 0.0, 0.0, 0.0, 0.0]),
            ),
        ],
    );
    let import_with_null = |null: &str| {
        ddm(
            d,
            &[
                "import",
                "--from",
                "diffusers",
                src.to_str().unwrap(),
                "--objective",
                "epsilon-linear",
                "--null-caption",
                null,
                "--out",
                "pixart-null.safetensors",
            ],
        )
    };
    ok(import_with_null("null.safetensors"));
    let meta = Checkpoint::read(&d.join("pixart-null.safetensors")).unwrap().meta;
    assert!(meta.model.has_null_condition());
    let guided = |scale: &str| {
        ok(ddm(
            d,
            &[
                "sample",
                "--checkpoint",
                "pixart-null.safetensors",
                "--n",
                "2",
                "--steps",
                "4",
                "--condition",
                "a.safetensors",
                "--guidance",
                scale,
                "--out",
                "g.png",
            ],
        ));
        TensorFile::read(&d.join("g.safetensors"))
            .unwrap()
            .f32("x0")
            .unwrap()
            .data
    };
    assert!(max_abs_diff(&guided("1"), &drawn[0]) < 1e-6);
    assert!(
        max_abs_diff(&guided("3"), &drawn[0]) > 1e-3,
        "guidance changed nothing"
    );
    // A null caption of another width, or of padding only, is refused by name.
    write(
        d,
        "wide-null.safetensors",
        vec![
            ("c_tokens", HostTensor::new(vec![1, 5, 32], vec![0.5; 160])),
            (
                "c_mask",
                HostTensor::new(vec![1, 5], vec![1.0, 0.0, 0.0, 0.0, 0.0]),
            ),
        ],
    );
    let err = fails(import_with_null("wide-null.safetensors"));
    assert!(
        err.contains("wide-null.safetensors") && err.contains("width 32") && err.contains("width 24"),
        "{err}"
    );
    write(
        d,
        "padding.safetensors",
        vec![
            ("c_tokens", HostTensor::new(vec![1, 5, 24], vec![0.0; 120])),
            ("c_mask", HostTensor::new(vec![1, 5], vec![0.0; 5])),
        ],
    );
    let err = fails(import_with_null("padding.safetensors"));
    assert!(
        err.contains("padding.safetensors: `c_mask` is padding only"),
        "{err}"
    );

    // A PixArt expert joins a registry, which records the width of the tokens it reads.
    write(
        d,
        "latents.safetensors",
        vec![("x", HostTensor::new(vec![8, 4, 8, 8], vec![0.1; 8 * 256]))],
    );
    let err = fails(ddm(
        d,
        &[
            "partition",
            "--data",
            "tensors:latents.safetensors",
            "--k",
            "2",
            "--out",
            "p",
        ],
    ));
    assert!(err.contains("holds one value (0.1) in every entry"), "{err}");
    let x = (0..8 * 256).map(|i| (i % 17) as f32 / 8.0 - 1.0).collect();
    write(
        d,
        "latents.safetensors",
        vec![("x", HostTensor::new(vec![8, 4, 8, 8], x))],
    );
    ok(ddm(
        d,
        &[
            "partition",
            "--data",
            "tensors:latents.safetensors",
            "--k",
            "2",
            "--algorithm",
            "random",
            "--out",
            "p",
        ],
    ));
    ok(ddm(
        d,
        &[
            "import",
            "--from",
            "diffusers",
            src.to_str().unwrap(),
            "--partition",
            "p",
            "--cluster",
            "0",
            "--out",
            "expert-0.safetensors",
        ],
    ));
    ok(ddm(
        d,
        &[
            "register",
            "--registry",
            "reg",
            "--partition",
            "p",
            "expert-0.safetensors",
        ],
    ));
    let index = ddm_ensemble::registry::read_index(&d.join("reg"))
        .unwrap()
        .unwrap();
    assert_eq!(index.experts[&0].token_dim, Some(24));
}

/// A PixArt trained in ddm on captioned images: `encode-text --tokens --data` -> partition (the
/// shards carry each caption's token states) -> `train --model PixArt-XS/2` (caption dropout:
/// the padding-only null caption) -> `sample --checkpoint --prompt`: the caption's tokens reach
/// the model through cross-attention, the checkpoint records the encoder, guidance runs; two such
/// islands sample as a routed ensemble, local or with one expert served.
#[test]
fn a_pixart_trained_on_captions_samples_by_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    import_encoder(d);
    tiny_images(&d.join("data"));
    let captions: Vec<&str> = (0..96)
        .map(|i| match i % 2 {
            0 => "a bright left half",
            _ => "a bright top half",
        })
        .collect();
    std::fs::write(d.join("captions.txt"), captions.join("\n")).unwrap();
    ok(ddm(
        d,
        &[
            "encode-text",
            "--encoder",
            "te.safetensors",
            "--captions",
            "captions.txt",
            "--data",
            "idx:data",
            "--tokens",
            "--quiet",
            "--out",
            "train.safetensors",
        ],
    ));
    ok(ddm(
        d,
        &[
            "partition",
            "--data",
            "tensors:train.safetensors",
            "--k",
            "2",
            "--algorithm",
            "random",
            "--out",
            "p",
        ],
    ));
    let train = |out: &str, extra: &[&str]| {
        let args = [
            "train",
            "--partition",
            "p",
            "--cluster",
            "0",
            "--out",
            out,
            "--model",
            "PixArt-XS/2",
            "--steps",
            "20",
            "--batch-size",
            "16",
            "--quiet",
        ];
        ddm(d, &[&args[..], extra].concat())
    };
    ok(train("e0", &[]));
    // The same island in bf16 (f32 master weights) learns what the f32 one learns.
    ok(train("e0-bf16", &["--precision", "bf16"]));
    let (full, half) = (
        fixed_prediction(&d.join("e0/expert.safetensors")),
        fixed_prediction(&d.join("e0-bf16/expert.safetensors")),
    );
    let err = relative_error(&half, &full);
    println!("PixArt island in bf16 vs f32: prediction {err:.2e} (relative L2)");
    assert!(err > 0.0 && err < 0.02, "relative error {err}"); // measured: 1.9e-3
    let meta = Checkpoint::read(&d.join("e0/expert.safetensors")).unwrap().meta;
    let encoder = Checkpoint::read(&d.join("te.safetensors")).unwrap();
    assert_eq!((meta.model.arch(), meta.model.token_dim()), ("pixart", 32));
    assert!(meta.model.has_null_condition());
    assert_eq!(meta.text, encoder.text_space());

    let sample = |prompt: &str, guidance: &str| {
        ok(ddm(
            d,
            &[
                "sample",
                "--checkpoint",
                "e0/expert.safetensors",
                "--n",
                "4",
                "--steps",
                "8",
                "--prompt",
                prompt,
                "--text-encoder",
                "te.safetensors",
                "--guidance",
                guidance,
                "--out",
                "s.png",
            ],
        ));
        TensorFile::read(&d.join("s.safetensors"))
            .unwrap()
            .f32("x0")
            .unwrap()
            .data
    };
    let left = sample("a bright left half", "1");
    let top = sample("a bright top half", "1");
    let guided = sample("a bright left half", "3");
    assert!(
        max_abs_diff(&left, &top) > 0.0,
        "the caption does not reach the PixArt"
    );
    assert!(max_abs_diff(&left, &guided) > 0.0, "guidance changed nothing");

    // Two PixArt islands as a routed ensemble: every expert selected reads the caption's tokens
    // (its own rows of them), guided or not.
    ok(ddm(
        d,
        &[
            "train",
            "--partition",
            "p",
            "--cluster",
            "1",
            "--out",
            "e1",
            "--model",
            "PixArt-XS/2",
            "--steps",
            "20",
            "--batch-size",
            "16",
            "--quiet",
        ],
    ));
    ok(ddm(
        d,
        &[
            "register",
            "--registry",
            "reg",
            "--partition",
            "p",
            "e0/expert.safetensors",
            "e1/expert.safetensors",
        ],
    ));
    let routed = |prompt: &str, guidance: &str| {
        ok(ddm(
            d,
            &[
                "sample",
                "--registry",
                "reg",
                "--router",
                "analytic",
                "--strategy",
                "full",
                "--n",
                "4",
                "--steps",
                "8",
                "--prompt",
                prompt,
                "--text-encoder",
                "te.safetensors",
                "--guidance",
                guidance,
                "--out",
                "r.png",
            ],
        ));
        TensorFile::read(&d.join("r.safetensors"))
            .unwrap()
            .f32("x0")
            .unwrap()
            .data
    };
    let (left, top, guided) = (
        routed("a bright left half", "1"),
        routed("a bright top half", "1"),
        routed("a bright left half", "3"),
    );
    assert!(
        max_abs_diff(&left, &top) > 0.0,
        "the caption does not reach the routed PixArts"
    );
    assert!(
        max_abs_diff(&left, &guided) > 0.0,
        "guidance changed nothing in the ensemble"
    );

    // A router that reads the caption's tokens (their mean, padding left out), trained on the
    // partition's token sequences and registered: sampling gives it each prompt's tokens, and
    // `ddm predict` shows its logits move with the caption and with its absence (the null caption).
    ok(ddm(
        d,
        &[
            "train-router",
            "--partition",
            "p",
            "--out",
            "router",
            "--condition-tokens",
            "--class-dropout",
            "0.2",
            "--steps",
            "20",
            "--batch-size",
            "16",
            "--eval-samples",
            "20",
            "--quiet",
        ],
    ));
    let router = Checkpoint::read(&d.join("router/router.safetensors"))
        .unwrap()
        .meta;
    assert_eq!(
        (router.condition_token_dim, router.condition_dim, &router.text),
        (Some(32), None, &encoder.text_space())
    );
    ok(ddm(
        d,
        &["register", "--registry", "reg", "router/router.safetensors"],
    ));
    ok(ddm(
        d,
        &[
            "sample",
            "--registry",
            "reg",
            "--strategy",
            "full",
            "--n",
            "4",
            "--steps",
            "4",
            "--prompt",
            "a bright left half",
            "--text-encoder",
            "te.safetensors",
            "--out",
            "learned.png",
        ],
    ));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("learned.json")).unwrap()).unwrap();
    assert_eq!(
        (report["router"].as_str(), report["router_sees_tokens"].as_bool()),
        (Some("learned"), Some(true)),
        "{report}"
    );
    let captions = TensorFile::read(&d.join("train.safetensors")).unwrap();
    let (tokens, mask) = (captions.f32("c_tokens").unwrap(), captions.f32("c_mask").unwrap());
    let (l, dt) = (tokens.shape[1], tokens.shape[2]);
    let x_t = HostTensor::new(vec![2, 1, 8, 8], vec![0.1; 128]);
    let t = HostTensor::new(vec![2], vec![0.9; 2]);
    let logits = |with_tokens: bool| {
        let mut input = vec![("x_t", x_t.clone()), ("t", t.clone())];
        if with_tokens {
            // Rows 0 and 1: "a bright left half", "a bright top half".
            input.push((
                "c_tokens",
                HostTensor::new(vec![2, l, dt], tokens.data[..2 * l * dt].to_vec()),
            ));
            input.push(("c_mask", HostTensor::new(vec![2, l], mask.data[..2 * l].to_vec())));
        }
        write(d, "router-in.safetensors", input);
        ok(ddm(
            d,
            &[
                "predict",
                "--checkpoint",
                "router/router.safetensors",
                "--input",
                "router-in.safetensors",
                "--out",
                "router-out.safetensors",
            ],
        ));
        TensorFile::read(&d.join("router-out.safetensors"))
            .unwrap()
            .f32("logits")
            .unwrap()
            .data
    };
    let (given, null) = (logits(true), logits(false));
    assert!(
        max_abs_diff(&given[..2], &given[2..]) > 0.0,
        "the caption does not reach the router"
    );
    assert!(
        max_abs_diff(&given, &null) > 0.0,
        "the null caption is the caption"
    );

    // A PixArt student distilled from the PixArt experts reads the caption's tokens (the teacher
    // is given the student's), records the text space, and samples by prompt; a student that
    // reads no tokens is refused.
    let distill = |out: &str, model: &str| {
        ddm(
            d,
            &[
                "distill",
                "--registry",
                "reg",
                "--partition",
                "p",
                "--out",
                out,
                "--model",
                model,
                "--steps",
                "10",
                "--batch-size",
                "16",
                "--quiet",
            ],
        )
    };
    ok(distill("student", "PixArt-XS/2"));
    let student = Checkpoint::read(&d.join("student/expert.safetensors"))
        .unwrap()
        .meta;
    assert_eq!(
        (student.model.arch(), student.model.token_dim(), &student.text),
        ("pixart", 32, &encoder.text_space())
    );
    assert!(student.model.has_null_condition());
    let by_student = |prompt: &str| {
        ok(ddm(
            d,
            &[
                "sample",
                "--checkpoint",
                "student/expert.safetensors",
                "--n",
                "4",
                "--steps",
                "4",
                "--prompt",
                prompt,
                "--text-encoder",
                "te.safetensors",
                "--guidance",
                "2",
                "--out",
                "student.png",
            ],
        ));
        TensorFile::read(&d.join("student.safetensors"))
            .unwrap()
            .f32("x0")
            .unwrap()
            .data
    };
    assert!(
        max_abs_diff(
            &by_student("a bright left half"),
            &by_student("a bright top half")
        ) > 0.0,
        "the caption does not reach the student"
    );
    let err = fails(distill("dit-student", "DiT-XS/4"));
    assert!(
        err.contains("PixArts reading each caption's token sequence") && err.contains("--model DiT-XS/4"),
        "{err}"
    );

    // Expert 1 served: it receives the caption's tokens (and the null caption's under guidance),
    // so its samples (`oracle:1`, every sample by expert 1) are those of the registry held here.
    let server = common::Server::start(d, &["--registry", "reg", "--experts", "1"], None);
    ok(ddm(
        d,
        &[
            "register",
            "--registry",
            "mixed",
            "--partition",
            "p",
            "e0/expert.safetensors",
        ],
    ));
    ok(ddm(
        d,
        &[
            "register",
            "--registry",
            "mixed",
            "--partition",
            "p",
            "--remote",
            &server.url,
        ],
    ));
    let oracle = |registry: &str, guidance: &str| {
        ok(ddm(
            d,
            &[
                "sample",
                "--registry",
                registry,
                "--strategy",
                "oracle:1",
                "--n",
                "4",
                "--steps",
                "8",
                "--prompt",
                "a bright left half",
                "--text-encoder",
                "te.safetensors",
                "--guidance",
                guidance,
                "--out",
                "o.png",
            ],
        ));
        TensorFile::read(&d.join("o.safetensors"))
            .unwrap()
            .f32("x0")
            .unwrap()
            .data
    };
    for guidance in ["1", "3"] {
        let diff = max_abs_diff(&oracle("mixed", guidance), &oracle("reg", guidance));
        assert!(diff < 1e-5, "guidance {guidance}: served differs by {diff}");
    }
    drop(server);

    // Data without token sequences cannot train a PixArt.
    ok(ddm(
        d,
        &[
            "partition",
            "--data",
            "idx:data",
            "--k",
            "2",
            "--algorithm",
            "random",
            "--out",
            "p",
            "--force",
        ],
    ));
    let err = fails(train("e-untokened", &[]));
    assert!(
        err.contains("a PixArt reads each caption's token sequence") && err.contains("--tokens"),
        "{err}"
    );
}

/// `ddm train-text-encoder` on Fashion-MNIST's measured captions: the trained encoder finds a
/// caption's image among 256 far more often than chance and than the same encoder untrained, it
/// is a text encoder like an imported one (`encode-text` reads it), and its pooled vectors tell
/// the captions' classes apart.
#[test]
fn a_text_encoder_trained_on_captions_matches_them_to_their_images() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(ddm(
        d,
        &[
            "data",
            "captions",
            "--data",
            "fashion-mnist-10k",
            "--out",
            "captions.jsonl",
        ],
    ));
    let accuracy = |steps: &str| {
        let out = format!("te-{steps}");
        ok(ddm(
            d,
            &[
                "train-text-encoder",
                "--data",
                "fashion-mnist-10k",
                "--captions",
                "captions.jsonl",
                "--model",
                "clip:32:1:2",
                "--steps",
                steps,
                "--batch-size",
                "128",
                "--lr",
                "2e-3",
                "--warmup-steps",
                "10",
                "--quiet",
                "--out",
                &out,
            ],
        ));
        let ckpt = Checkpoint::read(&d.join(&out).join("text-encoder.safetensors")).unwrap();
        ckpt.meta.extra["retrieval_top1"].as_f64().unwrap()
    };
    let (untrained, trained) = (accuracy("1"), accuracy("200"));
    assert!(
        trained > 0.05 && trained > 4.0 * untrained,
        "retrieval top-1 {trained} after 200 steps, {untrained} after 1 (chance 1/256)"
    );
    let prompts = [
        "a light, medium-width trouser",
        "a light, medium-width ankle boot",
        "trouser, light and medium-width",
        "ankle boot, light and medium-width",
    ];
    std::fs::write(d.join("prompts.txt"), prompts.join("\n")).unwrap();
    ok(ddm(
        d,
        &[
            "encode-text",
            "--encoder",
            "te-200/text-encoder.safetensors",
            "--captions",
            "prompts.txt",
            "--quiet",
            "--out",
            "c.safetensors",
        ],
    ));
    let c = TensorFile::read(&d.join("c.safetensors"))
        .unwrap()
        .f32("c")
        .unwrap();
    assert_eq!(c.shape, vec![4, 32]);
    let row = |i: usize| &c.data[i * 32..(i + 1) * 32];
    let cosine = |a: &[f32], b: &[f32]| {
        let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(p, q)| p * q).sum::<f32>();
        dot(a, b) / (dot(a, a) * dot(b, b)).sqrt()
    };
    // Two phrasings of one garment are closer than one phrasing of two garments.
    for (same, other) in [((0, 2), (0, 1)), ((1, 3), (1, 0)), ((2, 0), (2, 3))] {
        assert!(
            cosine(row(same.0), row(same.1)) > cosine(row(other.0), row(other.1)),
            "prompts {same:?} should be closer than {other:?}"
        );
    }
}
