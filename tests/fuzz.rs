//! Property tests over hostile input for the parsers of user-supplied bytes and strings: arbitrary
//! bytes, and mutations (flipped bytes, truncations, a forged header length) of valid files. Every
//! call must return (an error naming its input is fine); a panic or an abort fails the test.
//! `PROPTEST_CASES` sets the cases per target (default 256; README reports a longer run).

use std::path::Path;

use ddm_core::host::{HostTensor, TensorFile};
use ddm_ensemble::remote::Request;
use proptest::prelude::*;

mod common;
use common::registry_fixture;

fn cases() -> ProptestConfig {
    let n = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    ProptestConfig {
        cases: n,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A change to a valid file: flip bytes, truncate, or forge the safetensors header length.
#[derive(Debug, Clone)]
enum Mutation {
    Flip(Vec<(usize, u8)>),
    Truncate(usize),
    HeaderLength(u64),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        prop::collection::vec((any::<usize>(), 1u8..=255), 1..8).prop_map(Mutation::Flip),
        any::<usize>().prop_map(Mutation::Truncate),
        any::<u64>().prop_map(Mutation::HeaderLength),
    ]
}

fn apply(valid: &[u8], m: &Mutation) -> Vec<u8> {
    let mut b = valid.to_vec();
    match m {
        Mutation::Flip(flips) => {
            for &(i, x) in flips {
                let i = i % b.len();
                b[i] ^= x;
            }
        }
        Mutation::Truncate(n) => b.truncate(n % b.len()),
        Mutation::HeaderLength(n) => b[..8].copy_from_slice(&n.to_le_bytes()),
    }
    b
}

fn valid_request() -> Vec<u8> {
    Request {
        x_t: HostTensor::new(vec![3, 1, 2, 2], (0..12).map(|i| i as f32 / 12.0).collect()),
        t: vec![0.1, 0.5, 0.9],
        y: Some(vec![0, 1, 2]),
        c: Some(HostTensor::new(vec![3, 2], vec![0.5; 6])),
    }
    .to_bytes()
    .unwrap()
}

fn fixture() -> (tempfile::TempDir, Vec<u8>, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let experts = registry_fixture(dir.path(), 2);
    let checkpoint = std::fs::read(&experts[0]).unwrap();
    let partition = std::fs::read_to_string(dir.path().join("p/partition.json")).unwrap();
    common::ok(common::ddm(
        dir.path(),
        &[
            "register",
            "--registry",
            "reg",
            "--partition",
            "p",
            experts[0].to_str().unwrap(),
        ],
    ));
    let index = std::fs::read_to_string(dir.path().join("reg/registry.json")).unwrap();
    (dir, checkpoint, partition, index)
}

proptest! {
    #![proptest_config(cases())]

    /// `ddm serve`'s request bodies: every rejection is a 400 with a reason, never a panic.
    #[test]
    fn served_request_bodies(bytes in prop::collection::vec(any::<u8>(), 0..512), m in mutation()) {
        let _ = Request::from_bytes(bytes, &[1, 2, 2]);
        let mutated = apply(&valid_request(), &m);
        if let Err(e) = Request::from_bytes(mutated, &[1, 2, 2]) {
            let msg = format!("{e:#}");
            prop_assert!(!msg.is_empty());
        }
    }

    /// Checkpoints (safetensors + `ddm` metadata + checksum).
    #[test]
    fn checkpoints(bytes in prop::collection::vec(any::<u8>(), 0..512), m in mutation()) {
        let path = Path::new("fuzzed.safetensors");
        let _ = TensorFile::from_bytes(path, bytes);
        let valid = CHECKPOINT.with(|c| c.clone());
        let mutated = apply(&valid, &m);
        if let Ok(f) = TensorFile::from_bytes(path, mutated) {
            match ddm_core::checkpoint::Checkpoint::from_file(f) {
                Ok(c) => { let _ = c.model(path, &ddm_core::device::cpu()); }
                Err(e) => {
                    let msg = e.to_string();
                    prop_assert!(msg.contains("fuzzed.safetensors"), "{}", msg);
                }
            }
        }
    }

    /// IDX image and label files.
    #[test]
    fn idx_files(bytes in prop::collection::vec(any::<u8>(), 0..256), header in prop::collection::vec(any::<u32>(), 4)) {
        let path = Path::new("fuzzed-idx");
        let _ = ddm_datasets::idx::parse_idx_images(path, &bytes);
        let _ = ddm_datasets::idx::parse_idx_labels(path, &bytes);
        // A plausible magic with absurd sizes.
        let mut forged: Vec<u8> = [0x803u32, header[1], header[2], header[3]].iter().flat_map(|w| w.to_be_bytes()).collect();
        forged.extend(&bytes);
        let _ = ddm_datasets::idx::parse_idx_images(path, &forged);
        let mut labels: Vec<u8> = [0x801u32, header[0]].iter().flat_map(|w| w.to_be_bytes()).collect();
        labels.extend(&bytes);
        let _ = ddm_datasets::idx::parse_idx_labels(path, &labels);
    }

    /// Strategy strings and training configs (TOML).
    #[test]
    fn strategy_and_config_strings(s in ".{0,24}", known in prop::sample::select(vec!["top-", "sample:", "nucleus:", "threshold:", "oracle:", "full", "trajectory"]), tail in "[-0-9.:eEnaif]{0,10}") {
        let _ = s.parse::<ddm_ensemble::strategy::Strategy>();
        if let Ok(st) = format!("{known}{tail}").parse::<ddm_ensemble::strategy::Strategy>() {
            let _ = st.validate();
        }
        if let Ok(c) = toml::from_str::<ddm_trainer::config::TrainConfig>(&s) {
            let _ = c.validate();
        }
        let _ = toml::from_str::<ddm_trainer::config::TrainConfig>(&format!("lr = {tail}\nsteps = {tail}"));
    }
}

thread_local! {
    static FIXTURE: (tempfile::TempDir, Vec<u8>, String, String) = fixture();
    static CHECKPOINT: Vec<u8> = FIXTURE.with(|f| f.1.clone());
}

proptest! {
    // Each case writes two files: an eighth of the cases of the in-memory targets.
    #![proptest_config(ProptestConfig { cases: (cases().cases / 8).max(16), ..cases() })]

    /// partition.json and registry.json, mutated in place: read errors name the file.
    #[test]
    fn partition_and_registry_files(flips in prop::collection::vec((any::<usize>(), 1u8..=255), 1..6)) {
        let dir = tempfile::tempdir().unwrap();
        let (partition, index) = FIXTURE.with(|f| (f.2.clone(), f.3.clone()));
        let mutate = |text: &str| {
            let mut b = text.as_bytes().to_vec();
            for &(i, x) in &flips {
                let i = i % b.len();
                b[i] ^= x;
            }
            b
        };
        std::fs::create_dir_all(dir.path().join("p")).unwrap();
        std::fs::write(dir.path().join("p/partition.json"), mutate(&partition)).unwrap();
        if let Err(e) = ddm_datasets::partition::read_manifest(&dir.path().join("p")) {
            let msg = e.to_string();
            prop_assert!(msg.contains("partition.json"), "{}", msg);
        }
        std::fs::create_dir_all(dir.path().join("reg")).unwrap();
        std::fs::write(dir.path().join("reg/registry.json"), mutate(&index)).unwrap();
        if let Err(e) = ddm_ensemble::registry::read_index(&dir.path().join("reg")) {
            let msg = format!("{e:#}");
            prop_assert!(msg.contains("registry.json"), "{}", msg);
        }
    }
}

/// A small DiT checkpoint's bytes.
fn dit_checkpoint() -> Vec<u8> {
    let device = ddm_core::device::cpu();
    let mut dit = ddm_core::dit::DiTConfig::named("DiT-T/4", 8, 1).unwrap();
    dit.depth = 1;
    let config = ddm_core::model::ModelConfig::Dit(dit);
    let model = config.init(0, &device).unwrap();
    let meta = ddm_core::checkpoint::CheckpointMeta::expert(
        config,
        [-1.0, 1.0],
        ddm_core::checkpoint::Objective::Velocity,
    );
    ddm_core::checkpoint::Checkpoint::from_model(&model, meta)
        .to_bytes()
        .unwrap()
}

/// The checkpoint with `field` of its model config set to `value`, the metadata unsealed (as a
/// hand-made or older file would be), the tensors and their checksum untouched.
fn with_model_field(valid: &[u8], field: &str, value: serde_json::Value) -> Vec<u8> {
    let n = u64::from_le_bytes(valid[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&valid[8..8 + n]).unwrap();
    let (body, _) = ddm_core::digest::unseal_json(header["__metadata__"]["ddm"].as_str().unwrap()).unwrap();
    let mut meta: serde_json::Value = serde_json::from_str(&body).unwrap();
    meta["model"][field] = value;
    header["__metadata__"]["ddm"] = serde_json::Value::String(meta.to_string());
    let mut h = header.to_string().into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    [
        (h.len() as u64).to_le_bytes().to_vec(),
        h,
        valid[8 + n..].to_vec(),
    ]
    .concat()
}

thread_local! {
    static DIT: Vec<u8> = dit_checkpoint();
}

proptest! {
    #![proptest_config(cases())]

    /// Metadata that parses but is absurd (zero patch size or heads, a 2^40-wide model) is refused
    /// before any arithmetic or allocation uses it.
    #[test]
    fn absurd_model_configs(
        field in prop::sample::select(vec!["input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes", "frequency_embedding_size", "mlp_ratio"]),
        value in prop_oneof![Just(0u64), Just(1), Just(3), Just(1 << 40), Just(u64::MAX), any::<u32>().prop_map(u64::from)],
    ) {
        let bytes = DIT.with(|d| with_model_field(d, field, serde_json::json!(value)));
        let path = Path::new("absurd.safetensors");
        let f = TensorFile::from_bytes(path, bytes).unwrap();
        match ddm_core::checkpoint::Checkpoint::from_file(f) {
            Ok(c) => {
                let _ = c.meta.model.flops_per_sample();
                let _ = c.model(path, &ddm_core::device::cpu());
            }
            Err(e) => {
                let msg = e.to_string();
                prop_assert!(msg.contains("absurd.safetensors"), "{}", msg);
            }
        }
    }
}
