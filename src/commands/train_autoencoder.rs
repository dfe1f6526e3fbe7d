//! `ddm train-autoencoder`: the VAE whose latents experts are trained on.

use std::path::PathBuf;

use clap::Args;
use ddm_trainer::autoencoder::{AutoencoderTask, DEFAULT_MODEL};

use super::settings::{TrainSettings, run_task};

/// Train an AutoencoderKL (diffusers' architecture and parameter names) on images, with the
/// trainer's loop (resumable, EMA, metrics, loss curve): reconstruction of a posterior sample (MSE
/// per pixel) + --kl-weight x KL per latent element. Writes OUT/autoencoder.safetensors, its
/// latent scaling factor set so the training images' latents have unit variance, and
/// OUT/reconstructions.png (images above their reconstructions). A user with a pretrained VAE
/// (Stable Diffusion's) imports it instead: `ddm import --from diffusers-vae DIR`.
#[derive(Args, Debug)]
#[command(after_help = EXAMPLES)]
pub struct TrainAutoencoderArgs {
    /// Images to train on (any `--data` source: fashion-mnist, a folder, a tensors file).
    #[arg(long, default_value = "fashion-mnist")]
    pub data: String,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Weight of the KL term (per latent element) against the reconstruction (per pixel).
    #[arg(long, value_parser = super::values::non_negative, default_value_t = 1e-4)]
    pub kl_weight: f64,
    /// Training settings; --model is `vae:LEVELS:WIDTH:LATENT_CHANNELS` (default vae:3:8:4:
    /// 8/16/32 channels, 28 x 28 images -> 4 x 7 x 7 latents); unset ones default to 1500 steps of
    /// batch 64, lr 1e-3 (README's latent-space run: reconstruction MSE 0.023 on Fashion-MNIST).
    #[command(flatten)]
    pub settings: TrainSettings,
}

const EXAMPLES: &str = "Examples:
  ddm train-autoencoder --out vae
  ddm encode --vae vae/autoencoder.safetensors --data fashion-mnist --out latents.safetensors
  ddm train-autoencoder --data images:photos@64 --model vae:4:64:4 --steps 20000 --out vae-photos";

pub fn run(args: TrainAutoencoderArgs) -> anyhow::Result<u8> {
    if !(args.kl_weight.is_finite() && args.kl_weight >= 0.0) {
        anyhow::bail!("--kl-weight {} must be a number >= 0", args.kl_weight);
    }
    let mut s = args.settings.clone();
    s.model.get_or_insert(DEFAULT_MODEL.into());
    s.steps.get_or_insert(1500);
    s.lr.get_or_insert(1e-3);
    let config = s.resolve_config()?;
    if config.objective != ddm_core::checkpoint::Objective::Velocity || config.class_conditional {
        anyhow::bail!(
            "`objective` and --class-conditional are an expert's settings: an autoencoder has none"
        );
    }
    let data = ddm_eval::load_data(&args.data, true)?;
    let task = AutoencoderTask {
        data,
        kl_weight: args.kl_weight,
    };
    run_task(&task, &s, config, &args.out)
}
