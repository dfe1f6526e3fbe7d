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
        tokens: None,
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

/// The checkpoint with `field` of its model config set to `value` and the metadata sealed again
/// (as a hand-made file whose author computed the seal would be), the tensors, their table and
/// their checksums untouched.
fn with_model_field(valid: &[u8], field: &str, value: serde_json::Value) -> Vec<u8> {
    with_header(valid, |header| {
        let (body, _) =
            ddm_core::digest::unseal_json(header["__metadata__"]["ddm"].as_str().unwrap()).unwrap();
        let mut meta: serde_json::Value = serde_json::from_str(&body).unwrap();
        meta["model"][field] = value;
        let body = meta.to_string();
        let sealed = ddm_core::digest::seal_json(&body, &ddm_core::digest::sha256_hex(body.as_bytes()));
        header["__metadata__"]["ddm"] = serde_json::Value::String(sealed);
    })
}

/// A safetensors file with `edit` applied to its header's JSON (tensor table and metadata), padded
/// to 8 bytes as safetensors writes it, the data section unchanged.
fn with_header(valid: &[u8], edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let n = u64::from_le_bytes(valid[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&valid[8..8 + n]).unwrap();
    edit(&mut header);
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

/// An edit of a checkpoint's header that does not seal it again: the table (which name points at
/// which bytes, with what dtype and shape) or the metadata.
#[derive(Debug, Clone)]
enum HeaderEdit {
    SwapOffsets(usize, usize),
    Dtype(usize, &'static str),
    ReverseShape(usize),
    Rename(usize, String),
    /// Replace the metadata's character at (index mod its length less the closing brace) by this
    /// one.
    MetadataChar(usize, char),
    DropSeal,
    /// Set `format_version` (and keep the seal, or drop it).
    Relabel(u32, bool),
}

fn header_edit() -> impl Strategy<Value = HeaderEdit> {
    prop_oneof![
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| HeaderEdit::SwapOffsets(a, b)),
        (
            any::<usize>(),
            prop::sample::select(vec!["F16", "BF16", "I32", "U32", "F64", "U8"])
        )
            .prop_map(|(i, d)| HeaderEdit::Dtype(i, d)),
        any::<usize>().prop_map(HeaderEdit::ReverseShape),
        (any::<usize>(), "[a-z_.0-9]{1,24}").prop_map(|(i, n)| HeaderEdit::Rename(i, n)),
        (any::<usize>(), prop::char::range(' ', '~')).prop_map(|(i, c)| HeaderEdit::MetadataChar(i, c)),
        Just(HeaderEdit::DropSeal),
        (0u32..5, any::<bool>()).prop_map(|(v, k)| HeaderEdit::Relabel(v, k)),
    ]
}

/// `valid` with `edit` applied to its header.
fn edited(valid: &[u8], edit: &HeaderEdit) -> Vec<u8> {
    with_header(valid, |h| {
        let names: Vec<String> = h
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| *k != "__metadata__")
            .cloned()
            .collect();
        let pick = |i: usize| names[i % names.len()].clone();
        let ddm = h["__metadata__"]["ddm"].as_str().unwrap().to_string();
        let (body, sha) = ddm_core::digest::unseal_json(&ddm).unwrap();
        match edit {
            HeaderEdit::SwapOffsets(a, b) => {
                let (a, b) = (pick(*a), pick(*b));
                let (oa, ob) = (h[&a]["data_offsets"].clone(), h[&b]["data_offsets"].clone());
                h[&a]["data_offsets"] = ob;
                h[&b]["data_offsets"] = oa;
            }
            HeaderEdit::Dtype(i, d) => h[&pick(*i)]["dtype"] = (*d).into(),
            HeaderEdit::ReverseShape(i) => {
                let n = pick(*i);
                let mut shape = h[&n]["shape"].as_array().unwrap().clone();
                shape.reverse();
                h[&n]["shape"] = shape.into();
            }
            HeaderEdit::Rename(i, new) => {
                let old = pick(*i);
                let t = h.as_object_mut().unwrap().remove(&old).unwrap();
                h[new.as_str()] = t;
            }
            HeaderEdit::MetadataChar(i, c) => {
                // Any character but the last: that is the object's closing brace, which sealing
                // moves after the seal (without it there is no object to seal).
                let mut chars: Vec<char> = body.chars().collect();
                let at = i % (chars.len() - 1);
                chars[at] = *c;
                let body: String = chars.into_iter().collect();
                h["__metadata__"]["ddm"] = ddm_core::digest::seal_json(&body, &sha).into();
            }
            HeaderEdit::DropSeal => h["__metadata__"]["ddm"] = body.into(),
            HeaderEdit::Relabel(v, keep) => {
                let body = body.replace("\"format_version\":3", &format!("\"format_version\":{v}"));
                h["__metadata__"]["ddm"] = if *keep {
                    ddm_core::digest::seal_json(&body, &sha)
                } else {
                    body
                }
                .into();
            }
        }
    })
}

proptest! {
    #![proptest_config(cases())]

    /// Any edit of a checkpoint's header that is not sealed again (its tensor table or its
    /// metadata) is refused, naming the file.
    #[test]
    fn checkpoint_header_edits(edit in header_edit()) {
        let valid = DIT.with(|d| d.clone());
        let bytes = edited(&valid, &edit);
        prop_assume!(bytes != with_header(&valid, |_| {})); // not an edit (the same header)
        let path = Path::new("edited.safetensors");
        let result = TensorFile::from_bytes(path, bytes).and_then(ddm_core::checkpoint::Checkpoint::from_file);
        match result {
            Ok(_) => prop_assert!(false, "{edit:?} was accepted"),
            Err(e) => prop_assert!(e.to_string().contains("edited.safetensors"), "{}", e),
        }
    }
}

/// The files a user (or a damaged disk) hands the data side, written once: a valid PNG, a
/// partition's shard 0, cluster statistics, a `tensors:` dataset and a training state.
struct DataFiles {
    _dir: tempfile::TempDir,
    partition: std::path::PathBuf,
    png: Vec<u8>,
    shard: Vec<u8>,
    stats: Vec<u8>,
    tensors: Vec<u8>,
    state: Vec<u8>,
}

fn data_files() -> DataFiles {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    registry_fixture(d, 2);
    let rgb: Vec<u8> = (0..6 * 5 * 3).map(|i| (i * 7 % 256) as u8).collect();
    ddm_core::grid::write_rgb_png(&d.join("a.png"), &rgb, 6, 5).unwrap();
    let rows: Vec<Vec<f32>> = (0..5).map(|i| vec![i as f32, -(i as f32)]).collect();
    ddm_core::stats::ClusterStats::of_rows(2, rows.iter().map(|r| r.as_slice()))
        .save(&d.join("stats.safetensors"), Some(0), "fp")
        .unwrap();
    let x = HostTensor::new(vec![3, 1, 2, 2], (0..12).map(|i| i as f32).collect());
    let y = HostTensor::new(vec![3], vec![0.0, 1.0, 2.0]);
    let c = HostTensor::new(vec![3, 2], vec![0.5; 6]);
    let mut tensors = std::collections::BTreeMap::from([
        ("x".to_string(), ddm_core::host::RawTensor::f32(&x)),
        ("c".to_string(), ddm_core::host::RawTensor::f32(&c)),
    ]);
    tensors.insert(
        "y".into(),
        ddm_core::host::RawTensor::i64(vec![3], &y.data.iter().map(|&v| v as i64).collect::<Vec<_>>()),
    );
    let tensors = ddm_core::host::raw_to_safetensors_bytes(&tensors, None).unwrap();
    common::ok(common::ddm(
        d,
        &[
            "train",
            "--partition",
            "p",
            "--cluster",
            "0",
            "--out",
            "island",
            "--model",
            "mlp",
            "--mlp-hidden",
            "8",
            "--steps",
            "2",
            "--quiet",
        ],
    ));
    DataFiles {
        partition: d.join("p"),
        png: std::fs::read(d.join("a.png")).unwrap(),
        shard: std::fs::read(d.join("p").join(ddm_datasets::partition::shard_name(0))).unwrap(),
        stats: std::fs::read(d.join("stats.safetensors")).unwrap(),
        tensors,
        state: std::fs::read(d.join("island/train-state.safetensors")).unwrap(),
        _dir: dir,
    }
}

thread_local! {
    static DATA: DataFiles = data_files();
}

/// `err`'s text names `path`'s file name.
fn names(err: &dyn std::fmt::Display, path: &Path) -> bool {
    err.to_string()
        .contains(path.file_name().unwrap().to_str().unwrap())
}

proptest! {
    #![proptest_config(cases())]

    /// CIFAR-10 binary batches: arbitrary bytes, and whole records with any label byte.
    #[test]
    fn cifar_batches(bytes in prop::collection::vec(any::<u8>(), 0..4096), records in 0usize..3, label in any::<u8>()) {
        let path = Path::new("fuzzed_batch.bin");
        let _ = ddm_datasets::cifar::parse_batch(path, &bytes);
        let mut whole = vec![0u8; records * 3073];
        for r in 0..records {
            whole[r * 3073] = label;
        }
        if let Err(e) = ddm_datasets::cifar::parse_batch(path, &whole) {
            prop_assert!(names(&e, path), "{}", e);
        }
    }

    /// `--data` strings: any text, and each known kind with any tail.
    #[test]
    fn data_source_strings(s in ".{0,32}", kind in prop::sample::select(vec!["fashion-mnist", "fashion-mnist-10k", "idx", "idx-test", "cifar10", "cifar10-test", "images", "tensors", "gmm", "default"]), tail in "[:@/.a-z0-9-]{0,16}") {
        for arg in [s.clone(), format!("{kind}{tail}"), format!("{kind}:{tail}")] {
            if let Ok(src) = ddm_datasets::source::parse_source(&arg, false) {
                let _ = src.describe();
            }
        }
    }
}

proptest! {
    // Each case writes files: an eighth of the cases of the in-memory targets.
    #![proptest_config(ProptestConfig { cases: (cases().cases / 8).max(16), ..cases() })]

    /// Image folders: a mutated PNG (flipped bytes, truncation) among valid ones.
    #[test]
    fn image_folders(m in mutation(), size in 1usize..9) {
        let dir = tempfile::tempdir().unwrap();
        let png = DATA.with(|d| d.png.clone());
        std::fs::write(dir.path().join("a.png"), &png).unwrap();
        let bad = dir.path().join("b.png");
        std::fs::write(&bad, apply(&png, &m)).unwrap();
        let folder = ddm_datasets::folder::ImageFolder { dir: dir.path().to_path_buf(), size };
        use ddm_datasets::Source;
        match folder.load() {
            Ok(d) => prop_assert_eq!(d.shape[1..].to_vec(), vec![size, size]),
            Err(e) => prop_assert!(names(&e, &bad), "{}", e),
        }
    }

    /// A partition's shard, mutated, with partition.json's checksum updated to match (a
    /// consistent but hostile partition): the shard parser itself must hold.
    #[test]
    fn partition_shards(m in mutation()) {
        let dir = tempfile::tempdir().unwrap();
        let (valid, partition) = DATA.with(|d| (d.shard.clone(), d.partition.clone()));
        let bytes = apply(&valid, &m);
        let name = ddm_datasets::partition::shard_name(0);
        std::fs::write(dir.path().join(&name), &bytes).unwrap();
        let mut manifest = ddm_datasets::partition::read_manifest(&partition).unwrap();
        manifest.files.get_mut(&name).unwrap().sha256 = ddm_core::digest::sha256_hex(&bytes);
        if let Err(e) = ddm_datasets::partition::load_shard(dir.path(), &manifest, 0) {
            prop_assert!(names(&e, Path::new(&name)), "{}", e);
        }
    }

    /// Cluster statistics, and a `tensors:` dataset, mutated on disk.
    #[test]
    fn statistics_and_tensor_datasets(m in mutation()) {
        let dir = tempfile::tempdir().unwrap();
        let (stats, tensors) = DATA.with(|d| (d.stats.clone(), d.tensors.clone()));
        let p = dir.path().join("stats.safetensors");
        std::fs::write(&p, apply(&stats, &m)).unwrap();
        if let Err(e) = ddm_core::stats::ClusterStats::load(&p) {
            prop_assert!(names(&e, &p), "{}", e);
        }
        let p = dir.path().join("data.safetensors");
        std::fs::write(&p, apply(&tensors, &m)).unwrap();
        use ddm_datasets::Source;
        if let Err(e) = (ddm_datasets::tensors::TensorsFile { path: p.clone() }).load() {
            prop_assert!(names(&e, &p), "{}", e);
        }
    }

    /// A training state, mutated: refused (naming the file) before a resume can use it.
    #[test]
    fn training_states(m in mutation()) {
        let dir = tempfile::tempdir().unwrap();
        let (state, partition) = DATA.with(|d| (d.state.clone(), d.partition.clone()));
        let p = dir.path().join("train-state.safetensors");
        std::fs::write(&p, apply(&state, &m)).unwrap();
        match ddm_trainer::state::read_loop_state(dir.path()) {
            Ok(Some(st)) => {
                let task = ddm_trainer::expert::ExpertTask {
                    partition: ddm_datasets::partition::Partition::open(&partition).unwrap(),
                    target: ddm_trainer::island::Target::Cluster(0),
                    objective: st.config.objective,
                };
                let device = ddm_core::device::cpu();
                let optim = ddm_trainer::train::optimizer(&st.config);
                if let Err(e) = ddm_trainer::state::load(&task, dir.path(), &device, &device.clone().autodiff(), optim) {
                    prop_assert!(names(&format!("{e:#}"), &p), "{:#}", e);
                }
            }
            Ok(None) => prop_assert!(false, "the state file is there"),
            Err(e) => prop_assert!(names(&format!("{e:#}"), &p), "{:#}", e),
        }
    }
}

/// `bytes` with the seal's digest (the hex after `"sha256_of_the_rest":"`) made non-hex, and the
/// file's last byte (tensor data) flipped: a damaged seal must not pass for an absent one. Found
/// by the training-state target: two flipped bytes, one in the digest and one in the optimizer's
/// record, reached burn's record reader, which panicked.
fn damaged_seal_and_data(bytes: &[u8]) -> Vec<u8> {
    let key = b"sha256_of_the_rest\\\":\\\"";
    let at = bytes
        .windows(key.len())
        .position(|w| w == key)
        .expect("a sealed header")
        + key.len();
    let mut b = bytes.to_vec();
    b[at] = b'x';
    let last = b.len() - 1;
    b[last] ^= 0x5a;
    b
}

#[test]
fn a_damaged_seal_does_not_pass_for_an_absent_one() {
    let dir = tempfile::tempdir().unwrap();
    let state = DATA.with(|d| d.state.clone());
    std::fs::write(
        dir.path().join("train-state.safetensors"),
        damaged_seal_and_data(&state),
    )
    .unwrap();
    let e = ddm_trainer::state::read_loop_state(dir.path()).unwrap_err();
    assert!(
        format!("{e:#}").contains("`sha256_of_the_rest`) is missing or damaged"),
        "{e:#}"
    );

    let ckpt = DIT.with(|d| d.clone());
    let f = TensorFile::from_bytes(Path::new("damaged.safetensors"), damaged_seal_and_data(&ckpt)).unwrap();
    let e = ddm_core::checkpoint::Checkpoint::from_file(f)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("damaged.safetensors") && e.contains("missing or damaged"),
        "{e}"
    );
}
