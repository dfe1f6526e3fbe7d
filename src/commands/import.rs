//! `ddm import`: PyTorch weights -> ddm checkpoint.
//!
//! The weights file is a safetensors state dict under the public PyTorch DiT names; the config is
//! that model's constructor arguments as JSON (`../shared/reference/*.config.json` is the form).
//! Every tensor is checked against the config (names and shapes, nothing missing, nothing extra)
//! before the checkpoint is written.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use ddm_core::checkpoint::{Checkpoint, CheckpointMeta};
use ddm_core::host::{HostTensor, TensorFile};
use ddm_core::model::ModelConfig;

use super::settings::ObjectiveArg;

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Source {
    /// A PyTorch state dict in safetensors format with PyTorch DiT parameter names.
    Pytorch,
}

/// Import a model trained elsewhere as a ddm expert checkpoint.
#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  ddm import --from pytorch dit.safetensors --config dit.json --out expert.safetensors\n  ddm import --from pytorch ddpm.safetensors --config dit.json --objective epsilon-linear --out e.safetensors"
)]
pub struct ImportArgs {
    /// Where the weights come from.
    #[arg(long, value_enum, default_value = "pytorch")]
    pub from: Source,
    /// The weights (safetensors, PyTorch parameter names, Linear weights [out, in]).
    pub weights: PathBuf,
    /// The model's config as JSON: `{"arch": "dit", "input_size": 28, "patch_size": 4, ...}`
    /// (`arch` defaults to "dit").
    #[arg(long)]
    pub config: PathBuf,
    /// What the network predicts.
    #[arg(long, value_enum, default_value = "velocity")]
    pub objective: ObjectiveArg,
    /// Value range of the data the model was trained on.
    #[arg(long, num_args = 2, value_names = ["MIN", "MAX"], default_values_t = [-1.0, 1.0], allow_negative_numbers = true)]
    pub range: Vec<f32>,
    /// The checkpoint to write.
    #[arg(long)]
    pub out: PathBuf,
}

/// Parse a model config, defaulting `arch` to "dit" (the PyTorch reference's configs name it).
pub fn read_model_config(path: &std::path::Path) -> anyhow::Result<ModelConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut value: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
    if let Some(obj) = value.as_object_mut() {
        obj.entry("arch").or_insert_with(|| "dit".into());
    } else {
        bail!(
            "{}: expected a JSON object of model hyper-parameters",
            path.display()
        );
    }
    let config: ModelConfig =
        serde_json::from_value(value).with_context(|| format!("{}: not a model config", path.display()))?;
    Ok(config)
}

pub fn run(args: ImportArgs) -> anyhow::Result<()> {
    let config = read_model_config(&args.config)?;
    let file = TensorFile::read(&args.weights)?;
    let tensors: BTreeMap<String, HostTensor> = file
        .names()
        .map(|n| Ok((n.to_string(), file.f32(n)?)))
        .collect::<ddm_core::Result<_>>()?;
    // Build the model once: this checks every name and shape against the config.
    let device = ddm_core::device::cpu();
    let model = config.load(tensors, &args.weights, &device)?;

    let objective = args.objective.objective();
    let mut meta = CheckpointMeta::expert(config, [args.range[0], args.range[1]], objective);
    meta.source = Some(format!(
        "imported from PyTorch weights {}",
        args.weights.display()
    ));
    let ckpt = Checkpoint::from_model(&model, meta);
    ckpt.save(&args.out)?;
    let params: usize = ckpt.tensors.values().map(|t| t.numel()).sum();
    println!(
        "wrote {} ({} tensors, {params} values)",
        args.out.display(),
        ckpt.tensors.len()
    );
    Ok(())
}
