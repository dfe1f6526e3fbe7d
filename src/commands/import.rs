//! `ddm import`: PyTorch weights -> ddm checkpoint.
//!
//! `--from pytorch`: a safetensors state dict under the public PyTorch DiT names; the config is
//! that model's constructor arguments as JSON (`input_size`, `patch_size`, `in_channels`,
//! `hidden_size`, `depth`, `num_heads`, ...: the form `ddm_core::dit::config::DitConfig` reads).
//! `--from diffusers-vae`: a diffusers AutoencoderKL directory (`config.json`,
//! `diffusion_pytorch_model.safetensors`, as `save_pretrained` writes it; Stable Diffusion's VAE).
//! `--from transformers-clip`: a transformers CLIPTextModel directory (`config.json`,
//! `model.safetensors`) and its `tokenizer.json`: the text encoder, its tokenizer sealed inside.
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
    /// A diffusers DiTTransformer2DModel or PixArtTransformer2DModel directory (config.json +
    /// diffusion_pytorch_model.safetensors): an expert trained with diffusers (a PixArt reads
    /// the caption's token embeddings: `c_tokens` and `c_mask` given with `ddm sample
    /// --condition`).
    Diffusers,
    /// A diffusers AutoencoderKL directory (config.json + diffusion_pytorch_model.safetensors).
    DiffusersVae,
    /// A transformers CLIPTextModel (or CLIPModel) directory (config.json + model.safetensors)
    /// with its tokenizer.json there or in ../tokenizer/: a text encoder for `ddm encode-text`.
    TransformersClip,
    /// A checkpoint written by an older ddm (format 1 or 2), whose seal does not cover the whole
    /// file: verified as far as its format allows, then written sealed whole, its metadata and
    /// tensors unchanged (--objective and --range are not read). A format-1 file without any seal
    /// needs --trust-unsealed, as nothing in it can be verified.
    Ddm,
}

/// Import a model trained elsewhere as a ddm expert checkpoint.
#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  ddm import --from pytorch dit.safetensors --config dit.json --out expert.safetensors\n  ddm import --from pytorch ddpm.safetensors --config dit.json --objective epsilon-linear --out e.safetensors\n  ddm import --from diffusers dit-xl-2-256/transformer --objective epsilon-linear --out expert.safetensors\n  ddm import --from diffusers island-3/transformer --partition part --cluster 3 --out expert-3.safetensors\n  ddm import --from diffusers pixart-512/transformer --objective epsilon-linear --out pixart.safetensors\n  ddm import --from diffusers-vae sd-vae-ft-mse/ --out vae.safetensors\n  ddm import --from transformers-clip sd-v1-5/text_encoder --out text-encoder.safetensors"
)]
pub struct ImportArgs {
    /// Where the weights come from.
    #[arg(long, value_enum, default_value = "pytorch")]
    pub from: Source,
    /// The weights (safetensors, PyTorch parameter names, Linear weights [out, in]); with
    /// --from diffusers, diffusers-vae or transformers-clip, the model's directory.
    pub weights: PathBuf,
    /// The model's config as JSON: `{"arch": "dit", "input_size": 28, "patch_size": 4, ...}`
    /// (`arch` defaults to "dit"). Not for diffusers (its directory has config.json).
    #[arg(long, required_if_eq("from", "pytorch"))]
    pub config: Option<PathBuf>,
    /// What the network predicts.
    #[arg(long, value_enum, default_value = "velocity")]
    pub objective: ObjectiveArg,
    /// Value range of the data the model was trained on (with --partition: the partition's).
    #[arg(long, num_args = 2, value_names = ["MIN", "MAX"], default_values_t = [-1.0, 1.0], allow_negative_numbers = true, value_parser = super::values::finite_f32)]
    pub range: Vec<f32>,
    /// The ddm partition whose shard --cluster the model was trained on (by another framework, on
    /// an island): the checkpoint then records that partition, cluster, data range and latent
    /// space, so it can join the partition's registry like an island's expert.
    #[arg(long, requires = "cluster")]
    pub partition: Option<PathBuf>,
    /// With --partition: the cluster the model was trained on.
    #[arg(long, value_parser = super::values::count(0, super::values::MAX_CLUSTERS - 1), requires = "partition")]
    pub cluster: Option<usize>,
    /// The checkpoint to write.
    #[arg(long)]
    pub out: PathBuf,
    /// With --from ddm: re-seal a format-1 checkpoint that carries no seal (its metadata cannot
    /// be verified: only do this for a file you trust).
    #[arg(long)]
    pub trust_unsealed: bool,
    /// With a diffusers PixArt: its null caption, the text encoder's token states for the empty
    /// prompt (what PixArt's pipeline uses as the negative prompt): a tensors file with `c_tokens`
    /// [1, L, Dc] and `c_mask` [1, L], made by the same encoder as the captions you sample with.
    /// Stored in the checkpoint, it is what the model reads for no caption, so `ddm sample
    /// --guidance` works (without it an imported PixArt has no null caption it was trained on).
    #[arg(long)]
    pub null_caption: Option<PathBuf>,
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
    if args.range[0] >= args.range[1] {
        bail!(
            "--range {} {}: MIN must be below MAX",
            args.range[0],
            args.range[1]
        );
    }
    if args.null_caption.is_some() && !matches!(args.from, Source::Diffusers) {
        bail!("--null-caption is for --from diffusers: a PixArt's null caption");
    }
    let (config, tensors, origin) = match (args.from, &args.config) {
        (Source::DiffusersVae, None) => return import_diffusers_vae(&args),
        (Source::TransformersClip, None) => return import_transformers_clip(&args),
        (Source::Ddm, None) => return reseal(&args),
        (Source::Diffusers | Source::DiffusersVae | Source::TransformersClip | Source::Ddm, Some(_)) => {
            bail!(
                "--config is for --from pytorch; a diffusers or transformers directory and a ddm checkpoint carry their own"
            )
        }
        (Source::Diffusers, None) => {
            let origin = args.weights.join(ddm_core::diffusers::WEIGHTS);
            let class = ddm_core::diffusers::class_name(&args.weights)?;
            if class.as_deref() == Some(ddm_core::pixart::DIFFUSERS_CLASS) {
                let (mut config, mut tensors) = ddm_core::pixart::read_diffusers(&args.weights)?;
                if let Some(path) = &args.null_caption {
                    let (embeddings, mask) = null_caption(path, config.caption_channels)?;
                    config.null_caption_length = Some(mask.shape[0]);
                    tensors.insert("null_caption.embeddings".into(), embeddings);
                    tensors.insert("null_caption.mask".into(), mask);
                }
                (ModelConfig::PixArt(config), tensors, origin)
            } else {
                let (config, tensors) = ddm_core::dit::diffusers::read_diffusers(&args.weights)?;
                (ModelConfig::Dit(config), tensors, origin)
            }
        }
        (Source::Pytorch, Some(c)) => {
            let config = read_model_config(c)?;
            let file = TensorFile::read(&args.weights)?;
            let tensors: BTreeMap<String, HostTensor> = file
                .names()
                .map(|n| Ok((n.to_string(), file.f32(n)?)))
                .collect::<ddm_core::Result<_>>()?;
            (config, tensors, args.weights.clone())
        }
        (Source::Pytorch, None) => unreachable!("clap requires --config with --from pytorch"),
    };
    if args.null_caption.is_some() && config.arch() != "pixart" {
        bail!("--null-caption is for a diffusers PixArt (PixArtTransformer2DModel): the model read has none");
    }
    // Build the model once: this checks every name and shape against the config.
    let device = ddm_core::device::cpu();
    let model = config.load(tensors, &origin, &device)?;

    let objective = args.objective.objective();
    let manifest = match &args.partition {
        Some(p) => Some(ddm_datasets::partition::read_manifest(p)?),
        None => None,
    };
    let range = match &manifest {
        Some(m) => m.dataset.range,
        None => [args.range[0], args.range[1]],
    };
    let config_arch = config.arch();
    let mut meta = CheckpointMeta::expert(config, range, objective);
    if let (Some(m), Some(k)) = (&manifest, args.cluster) {
        let dir = args
            .partition
            .as_ref()
            .expect("clap pairs --partition with --cluster")
            .display();
        if k >= m.k {
            bail!("--cluster {k}: the partition {dir} has K = {}", m.k);
        }
        if meta.data.shape != m.dataset.shape {
            bail!(
                "{}: the model takes samples of shape {:?}, but the partition {dir} holds {:?}",
                args.weights.display(),
                meta.data.shape,
                m.dataset.shape
            );
        }
        meta.partition = Some(m.fingerprint.clone());
        meta.cluster = Some(k);
        meta.latent = m.dataset.latent.clone();
    }
    meta.source = Some(match args.from {
        Source::Diffusers => format!(
            "imported from the diffusers {} {}",
            match config_arch {
                "pixart" => ddm_core::pixart::DIFFUSERS_CLASS,
                _ => "DiTTransformer2DModel",
            },
            args.weights.display()
        ),
        _ => format!("imported from PyTorch weights {}", args.weights.display()),
    });
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

/// The null caption of the tensors file `path` for a PixArt reading token states of width
/// `channels`: its one sequence up to its last token (embeddings `[L, Dc]`, mask `[L]`).
fn null_caption(path: &std::path::Path, channels: usize) -> anyhow::Result<(HostTensor, HostTensor)> {
    let file = TensorFile::read(path)?;
    let Some(s) = ddm_datasets::dataset::TokenSequences::read(&file, path, 1)? else {
        bail!(
            "{}: no `c_tokens`: the null caption is one token sequence, `c_tokens` [1, L, {channels}] with `c_mask` [1, L]",
            path.display()
        );
    };
    if s.dim() != channels {
        bail!(
            "{}: `c_tokens` holds token states of width {}, but the PixArt reads width {channels}",
            path.display(),
            s.dim()
        );
    }
    let Some(last) = s.mask.data.iter().rposition(|&m| m == 1.0) else {
        bail!(
            "{}: `c_mask` is padding only; that is ddm's own null caption (give the encoder's tokens for the empty prompt)",
            path.display()
        );
    };
    let l = last + 1;
    Ok((
        HostTensor::new(vec![l, channels], s.embeddings.data[..l * channels].to_vec()),
        HostTensor::new(vec![l], s.mask.data[..l].to_vec()),
    ))
}

/// An older ddm checkpoint -> the same checkpoint sealed whole (format 3).
fn reseal(args: &ImportArgs) -> anyhow::Result<()> {
    let file = TensorFile::read(&args.weights)?;
    let had_seal = file
        .metadata
        .get(ddm_core::checkpoint::METADATA_KEY)
        .is_some_and(|json| ddm_core::digest::unseal_json(json).is_some());
    let mut ckpt = Checkpoint::from_unsealed_file(file)?; // checks every seal the file's format has
    let old = ckpt.meta.format_version;
    if ckpt.sealed() {
        println!(
            "{}: already sealed whole (format {old}); nothing to do",
            args.weights.display()
        );
        return Ok(());
    }
    if !had_seal && !args.trust_unsealed {
        bail!(
            "{}: a format-{old} checkpoint without a seal: its metadata cannot be verified; pass --trust-unsealed to re-seal it anyway",
            args.weights.display()
        );
    }
    ckpt.meta.format_version = ddm_core::checkpoint::FORMAT_VERSION;
    ckpt.save(&args.out)?;
    let new = Checkpoint::read(&args.out)?.meta.tensors_sha256;
    let tensors = match new == ckpt.meta.tensors_sha256 {
        true => format!("tensors sha256 {} unchanged", ddm_core::text::short(&new, 12)),
        // Tensors stored in another dtype are written as f32: their bytes (and a VAE's latent
        // space name) change.
        false => format!(
            "tensors rewritten as f32: sha256 {} -> {}",
            ddm_core::text::short(&ckpt.meta.tensors_sha256, 12),
            ddm_core::text::short(&new, 12)
        ),
    };
    println!(
        "wrote {} (format {old} -> {}, sealed whole; {tensors})",
        args.out.display(),
        ddm_core::checkpoint::FORMAT_VERSION,
    );
    Ok(())
}

/// A diffusers AutoencoderKL directory -> a ddm autoencoder checkpoint (the same tensors, names
/// and config).
fn import_diffusers_vae(args: &ImportArgs) -> anyhow::Result<()> {
    let (config, tensors) = ddm_core::vae::read_diffusers(&args.weights)?;
    let origin = args.weights.join(ddm_core::diffusers::WEIGHTS);
    let vae = config.load(tensors, &origin, &ddm_core::device::cpu())?;
    let mut meta = CheckpointMeta::autoencoder(ModelConfig::Vae(config), [args.range[0], args.range[1]]);
    meta.source = Some(format!(
        "imported from the diffusers AutoencoderKL {}",
        args.weights.display()
    ));
    let ckpt = Checkpoint {
        meta,
        tensors: vae.state_dict().0,
    };
    ckpt.save(&args.out)?;
    let space = ckpt.latent_space().expect("an autoencoder has a latent space");
    println!(
        "wrote {} ({} tensors; latents {:?}, scaling factor {})",
        args.out.display(),
        ckpt.tensors.len(),
        space.latent_shape,
        space.scaling_factor
    );
    Ok(())
}

/// A transformers CLIP text encoder directory and its tokenizer -> a ddm text-encoder checkpoint
/// (transformers' tensors and config; the tokenizer, padded to the encoder's length, in its
/// metadata).
fn import_transformers_clip(args: &ImportArgs) -> anyhow::Result<()> {
    let (config, tensors) = ddm_core::clip::read_transformers(&args.weights)?;
    let origin = args.weights.join(ddm_core::clip::TRANSFORMERS_WEIGHTS);
    let encoder = config.load(tensors, &origin, &ddm_core::device::cpu())?;
    let tokenizer = ddm_core::clip::read_transformers_tokenizer(&args.weights, &config)?;
    let mut meta = CheckpointMeta::text_encoder(config, tokenizer.to_json()?);
    meta.source = Some(format!(
        "imported from the transformers CLIPTextModel {}",
        args.weights.display()
    ));
    let ckpt = Checkpoint {
        meta,
        tensors: encoder.state_dict().0,
    };
    ckpt.save(&args.out)?;
    let space = ckpt.text_space().expect("a text encoder has a text space");
    println!(
        "wrote {} ({} tensors; captions of up to {} tokens -> vectors of {})",
        args.out.display(),
        ckpt.tensors.len(),
        space.length,
        space.dim
    );
    Ok(())
}
