//! `ddm encode`: a dataset of images -> a `tensors:` dataset of VAE latents.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use ddm_core::checkpoint::{Checkpoint, Role};
use ddm_core::host::{HostIntTensor, HostTensor};
use ddm_core::progress::Progress;
use ddm_datasets::tensors::{CLASS_NAMES_KEY, LATENT_KEY};

use super::DeviceArgs;

/// Encode images into a VAE's latent space: writes a safetensors file with `x` (the posterior
/// means, scaled by the VAE's scaling factor: `(z - shift) * scaling`), the labels `y` and
/// conditioning vectors `c` when the data has them, and the latent space (which VAE, which
/// scaling) and class names in its metadata. `partition`, `train` and `train-router` read it as `tensors:FILE`
/// unchanged; every model trained on it records the latent space, registries refuse to mix spaces,
/// and `ddm sample --decode` turns samples back into images.
#[derive(Args, Debug)]
#[command(after_help = EXAMPLES)]
pub struct EncodeArgs {
    /// The VAE: a ddm autoencoder checkpoint (`ddm train-autoencoder`, or `ddm import --from
    /// diffusers-vae`).
    #[arg(long)]
    pub vae: PathBuf,
    /// Images to encode (any `--data` source).
    #[arg(long, default_value = "fashion-mnist")]
    pub data: String,
    /// The tensors file to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Also write the images decoded back from their latents here (`x0` [N, C, S, S], with `y`):
    /// what the VAE keeps of the data; `ddm eval images FILE` scores it (the latent pipeline's
    /// floor).
    #[arg(long, value_name = "FILE")]
    pub reconstructions: Option<PathBuf>,
    /// Images per forward pass.
    #[arg(long, value_parser = super::values::count(1, super::values::MAX_BATCH), default_value_t = 256)]
    pub batch_size: usize,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

const EXAMPLES: &str = "Examples:
  ddm encode --vae vae/autoencoder.safetensors --data fashion-mnist --out latents.safetensors
  ddm partition --data tensors:latents.safetensors --k 4 --out part
  ddm encode --vae vae/autoencoder.safetensors --data fashion-mnist:test --out test.safetensors --reconstructions rec.safetensors
  ddm encode --vae sd-vae.safetensors --data images:photos@64 --out photos.safetensors --device wgpu";

pub fn run(args: EncodeArgs) -> anyhow::Result<()> {
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let device = args.device.device()?;
    let ckpt = Checkpoint::read(&args.vae)?;
    if ckpt.meta.role != Role::Autoencoder {
        bail!(
            "{}: a checkpoint of role {}; --vae takes an autoencoder (ddm train-autoencoder, ddm import --from diffusers-vae)",
            args.vae.display(),
            ckpt.meta.role
        );
    }
    let vae = ckpt.autoencoder(&args.vae, &device)?;
    let space = ckpt
        .latent_space()
        .expect("an autoencoder checkpoint has a latent space");
    let data = ddm_eval::load_data(&args.data, true)?;
    let config = vae.config();
    if data.shape != config.image_shape() {
        bail!(
            "{}: images of shape {:?}, but the VAE {} takes {:?}",
            data.name,
            data.shape,
            args.vae.display(),
            config.image_shape()
        );
    }
    ddm_core::fsio::check_writable(&args.out)?;
    if let Some(r) = &args.reconstructions {
        ddm_core::fsio::check_writable(r)?;
    }
    let n = data.len();
    let (latents, reconstructions) = encode_all(&args, &vae, &space, &data, &device)?;
    let mut shape = vec![n];
    shape.extend(&space.latent_shape);
    let mut tensors = BTreeMap::from([("x".to_string(), HostTensor::new(shape, latents))]);
    if let Some(c) = &data.cond {
        tensors.insert("c".into(), c.clone());
    }
    let mut ints = BTreeMap::new();
    if let Some(labels) = &data.labels {
        ints.insert(
            "y".to_string(),
            HostIntTensor {
                shape: vec![n],
                data: labels.iter().map(|&l| l as i64).collect(),
            },
        );
    }
    if let Some(path) = &args.reconstructions {
        let mut shape = vec![n];
        shape.extend(config.image_shape());
        let x0 = BTreeMap::from([("x0".to_string(), HostTensor::new(shape, reconstructions))]);
        ddm_core::host::write_tensors(path, &x0, &ints)?;
        println!("wrote {} ({n} reconstructions)", path.display());
    }
    let mut md = std::collections::HashMap::from([(
        LATENT_KEY.to_string(),
        ddm_core::json::to_string("the latent space", &space)?,
    )]);
    if let Some(names) = &data.class_names {
        md.insert(CLASS_NAMES_KEY.to_string(), serde_json::to_string(names)?);
    }
    let bytes = ddm_core::host::to_safetensors_bytes(&tensors, &ints, Some(md))?;
    ddm_core::fsio::write_bytes_atomic(&args.out, &bytes)
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!(
        "wrote {} ({n} latents of shape {:?} from {}, {})",
        args.out.display(),
        space.latent_shape,
        data.name,
        space.describe()
    );
    Ok(())
}

/// Every image's latent (in the model's scaling), `args.batch_size` at a time, and its
/// reconstruction when asked for; a non-finite latent is an error naming the image.
fn encode_all(
    args: &EncodeArgs,
    vae: &ddm_core::vae::AutoencoderKL,
    space: &ddm_core::vae::LatentSpace,
    data: &ddm_datasets::Dataset,
    device: &ddm_core::burn::prelude::Device,
) -> anyhow::Result<(Vec<f32>, Vec<f32>)> {
    let n = data.len();
    let per_latent: usize = space.latent_shape.iter().product();
    let mut latents = Vec::with_capacity(n * per_latent);
    let mut reconstructions = vec![];
    let bar = crate::ui::Bar::new(args.quiet);
    bar.begin(&format!("encode {}", data.name), n as u64);
    let mut image_shape = vec![0];
    image_shape.extend(vae.config().image_shape());
    for start in (0..n).step_by(args.batch_size) {
        let idx: Vec<usize> = (start..(start + args.batch_size).min(n)).collect();
        image_shape[0] = idx.len();
        let x = HostTensor::new(image_shape.clone(), data.gather(&idx)).to_tensor::<4>(device);
        let mean = vae.encode(x).mean; // [B, L, s, s]
        if args.reconstructions.is_some() {
            reconstructions.extend(HostTensor::from_tensor(vae.decode(mean.clone())).data);
        }
        latents.extend(HostTensor::from_tensor(space.to_model(mean)).data);
        bar.advance(idx.len() as u64);
    }
    bar.finish();
    if let Some(i) = latents.iter().position(|v| !v.is_finite()) {
        bail!(
            "the VAE {} gives a non-finite latent for image {} of {}",
            args.vae.display(),
            i / per_latent,
            data.name
        );
    }
    Ok((latents, reconstructions))
}
