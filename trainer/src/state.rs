//! The whole state of a training run, in one file written atomically at every checkpoint:
//! `OUT/train-state.safetensors` holds `model.<name>` and `ema.<name>` tensors (PyTorch names), the
//! optimizer state (`optimizer`, burn's burnpack bytes, keyed by name-derived parameter ids), and
//! under the header key `ddm-train-state` the loop's position: config, step, data order (epoch and
//! position), RNG position, samples seen, wall time. Restarting the same command resumes exactly.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use ddm_core::burn::optim::ModuleOptimizer;
use ddm_core::burn::prelude::*;
use ddm_core::burn::tensor::Bytes;
use ddm_core::host::{RawTensor, TensorFile, raw_to_safetensors_bytes};
use ddm_core::model::ModelConfig;
use ddm_core::params::StateLoader;
use ddm_core::precision::Precision;
use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;
use crate::loss_scale::LossScale;
use crate::task::{Net, Task};

pub const STATE_FILE: &str = "train-state.safetensors";
const META_KEY: &str = "ddm-train-state";
/// Version 2 requires the loop state's seal (its checksum); version 1 may predate it.
pub const FORMAT: u32 = 2;

/// Where the loop is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoopState {
    pub format_version: u32,
    pub config: TrainConfig,
    pub model: ModelConfig,
    /// `cluster:K` or `monolith`.
    pub target: String,
    pub partition: String,
    pub step: u64,
    /// Data order: epoch e visits the samples in a permutation seeded by (seed, e).
    pub epoch: u64,
    pub pos: usize,
    /// Position of the noise/time RNG stream (as a decimal string: JSON has no u128).
    pub rng_word_pos: String,
    pub samples_seen: u64,
    pub wall_time_s: f64,
    pub last_loss: Option<f64>,
    /// The f16 loss scaler's state (absent for f32 and bf16 runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<LossScale>,
}

impl LoopState {
    /// The state before the first step of a run.
    pub fn fresh(config: &TrainConfig, model: &ModelConfig, target: String, partition: &str) -> Self {
        LoopState {
            format_version: FORMAT,
            config: config.clone(),
            model: model.clone(),
            target,
            partition: partition.to_string(),
            step: 0,
            epoch: 0,
            pos: 0,
            rng_word_pos: "0".into(),
            samples_seen: 0,
            wall_time_s: 0.0,
            last_loss: None,
            loss_scale: (config.precision == Precision::F16).then(LossScale::default),
        }
    }
}

pub fn path(out: &Path) -> PathBuf {
    out.join(STATE_FILE)
}

/// Save atomically.
pub fn save<N: Net>(
    out: &Path,
    st: &LoopState,
    model: &N,
    ema: &N,
    optim: &ModuleOptimizer,
) -> anyhow::Result<()> {
    let mut t: BTreeMap<String, RawTensor> = BTreeMap::new();
    for (n, v) in model.valid().state_dict() {
        t.insert(format!("model.{n}"), RawTensor::f32(&v));
    }
    for (n, v) in ema.state_dict() {
        t.insert(format!("ema.{n}"), RawTensor::f32(&v));
    }
    let opt = optim
        .into_bytes()
        .map_err(|e| anyhow::anyhow!("cannot serialise the optimizer state: {e:?}"))?;
    let opt: Vec<u8> = opt.to_vec();
    t.insert("optimizer".into(), RawTensor::u8(vec![opt.len()], opt));
    // The checksum covers the tensors and the loop state. The file is built once, sealed with a
    // placeholder digest that is then overwritten in place: the data section does not depend on
    // the metadata, and a digest always has 64 characters (building the file a second time held
    // two copies of a large model's state in memory at once).
    let json = ddm_core::json::to_string("the training state", st)?;
    let placeholder = "f".repeat(64);
    // One metadata key (its bytes stay deterministic), the checksum sealed into the JSON.
    let md = HashMap::from([(
        META_KEY.to_string(),
        ddm_core::digest::seal_json(&json, &placeholder),
    )]);
    let mut bytes = raw_to_safetensors_bytes(&t, Some(md))?;
    let sum = checksum(ddm_core::host::data_section(&bytes), &json);
    let header_len = 8 + u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header = &mut bytes[8..header_len];
    let at: Vec<usize> = header
        .windows(64)
        .enumerate()
        .filter(|(_, w)| *w == placeholder.as_bytes())
        .map(|(i, _)| i)
        .collect();
    let [i] = at[..] else {
        bail!("sealing the training state: the placeholder digest is not unique in its header");
    };
    header[i..i + 64].copy_from_slice(sum.as_bytes());
    ddm_core::fsio::write_bytes_atomic(&path(out), &bytes)?;
    Ok(())
}

/// What a saved state holds.
pub struct Loaded<N> {
    pub state: LoopState,
    pub model: N,
    pub ema: N,
    pub optim: ModuleOptimizer,
}

/// Read the loop state only (cheap: for checking what a directory holds).
pub fn read_loop_state(out: &Path) -> anyhow::Result<Option<LoopState>> {
    let p = path(out);
    if !p.exists() {
        return Ok(None);
    }
    let f = TensorFile::read(&p)?;
    Ok(Some(parse_meta(&f)?))
}

/// The step of the state saved in `out`, from the file's header alone (the weights and moments
/// are not read, nor their checksum checked): for watching a run, not for resuming it.
pub fn saved_step(out: &Path) -> Option<u64> {
    use std::io::Read;
    let mut f = std::fs::File::open(path(out)).ok()?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).ok()?;
    let mut header = vec![0u8; usize::try_from(u64::from_le_bytes(len)).ok()?.min(1 << 24)];
    f.read_exact(&mut header).ok()?;
    let header: serde_json::Value = serde_json::from_slice(&header).ok()?;
    let state: serde_json::Value = serde_json::from_str(header["__metadata__"][META_KEY].as_str()?).ok()?;
    state["step"].as_u64()
}

fn checksum(data: &[u8], json: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(data);
    h.update(json.as_bytes());
    ddm_core::digest::hex(&h.finalize())
}

/// Parse the loop state, after checking the checksum (version-1 states may have none and are read
/// as they are; from version 2 a missing or damaged checksum is refused).
fn parse_meta(f: &TensorFile) -> anyhow::Result<LoopState> {
    let json = f
        .metadata
        .get(META_KEY)
        .with_context(|| format!("{}: not a ddm training state", f.path.display()))?;
    let st: LoopState =
        serde_json::from_str(json).with_context(|| format!("{}: bad training state", f.path.display()))?;
    match ddm_core::digest::unseal_json(json) {
        Some((body, want)) => {
            let got = checksum(f.data_bytes(), &body);
            if got != want {
                bail!(
                    "{}: hashes to {got}, but records {want}: the training state is corrupted; delete it to start over, or restore it",
                    f.path.display()
                );
            }
        }
        None if st.format_version >= 2 => bail!(
            "{}: the checksum (`sha256_of_the_rest`) is missing or damaged: the training state is corrupted; delete it to start over, or restore it",
            f.path.display()
        ),
        None => {}
    }
    if !(1..=FORMAT).contains(&st.format_version) {
        bail!(
            "{}: training-state version {} is not supported (this ddm reads 1 to {FORMAT})",
            f.path.display(),
            st.format_version
        );
    }
    Ok(st)
}

/// Load everything: the model on `train_device` (autodiff), the EMA on `device`.
pub fn load<T: Task>(
    task: &T,
    out: &Path,
    device: &Device,
    train_device: &Device,
    optim: ModuleOptimizer,
) -> anyhow::Result<Loaded<T::Net>> {
    let p = path(out);
    let f = TensorFile::read(&p)?;
    let state = parse_meta(&f)?;
    let (mut model_t, mut ema_t) = (BTreeMap::new(), BTreeMap::new());
    for name in f.names() {
        if let Some(n) = name.strip_prefix("model.") {
            model_t.insert(n.to_string(), f.f32(name)?);
        } else if let Some(n) = name.strip_prefix("ema.") {
            ema_t.insert(n.to_string(), f.f32(name)?);
        }
    }
    let build = |tensors, device: &Device| -> anyhow::Result<T::Net> {
        let mut src = StateLoader::new(&p, tensors, device);
        let net = task.build(&state.model, &mut src)?;
        src.finish(state.model.arch())?;
        Ok(net)
    };
    let model = build(model_t, train_device)?;
    let ema = build(ema_t, device)?;
    let (_, opt) = f.u8("optimizer")?;
    // burn's record reader panics on some malformed records: a panic here is a bad file too.
    let restored = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // On `device`, not burn's default device (the first GPU backend compiled in).
        optim.from_bytes_on(Bytes::from_bytes_vec(opt.to_vec()), device)
    }));
    let optim = match restored {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => bail!("{}: cannot restore the optimizer state: {e:?}", p.display()),
        Err(_) => bail!(
            "{}: cannot restore the optimizer state: a malformed record",
            p.display()
        ),
    };
    Ok(Loaded {
        state,
        model,
        ema,
        optim,
    })
}
