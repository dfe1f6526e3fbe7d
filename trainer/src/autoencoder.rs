//! The autoencoder task: train an AutoencoderKL on images, so experts can be trained on its latents
//! (`ddm train-autoencoder`). The loss is latent diffusion's without its perceptual and adversarial
//! terms: the reconstruction of a posterior sample (mean squared error per pixel) plus `kl_weight`
//! times the KL to N(0, I) per latent element. At the end the scaling factor is set so the training
//! images' latents have unit variance, as Stable Diffusion's 0.18215 does for its data.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use ddm_core::burn::prelude::*;
use ddm_core::checkpoint::{Checkpoint, CheckpointMeta, TrainingSummary};
use ddm_core::host::HostTensor;
use ddm_core::model::ModelConfig;
use ddm_core::params::ParamSource;
use ddm_core::vae::{AutoencoderKL, AutoencoderKLConfig};
use ddm_datasets::Dataset;
use rand_chacha::ChaCha8Rng;

use crate::config::TrainConfig;
use crate::task::{Batch, Net, Task, TrainData};

pub const AUTOENCODER_FILE: &str = "autoencoder.safetensors";
/// `--model` for an autoencoder: `vae:LEVELS:WIDTH:LATENT_CHANNELS`.
pub const DEFAULT_MODEL: &str = "vae:3:8:4";

impl Net for AutoencoderKL {
    fn state_dict(&self) -> BTreeMap<String, HostTensor> {
        AutoencoderKL::state_dict(self).0
    }
}

/// Train a VAE on a dataset of images.
pub struct AutoencoderTask {
    pub data: Dataset,
    /// Weight of the KL term (per latent element) against the reconstruction (per pixel).
    pub kl_weight: f64,
}

/// Parse `vae:LEVELS:WIDTH:LATENT` into a VAE for `[C, S, S]` images.
pub fn vae_config(model: &str, shape: &[usize], data_name: &str) -> anyhow::Result<AutoencoderKLConfig> {
    let parts: Vec<&str> = model.split(':').collect();
    let nums: Option<Vec<usize>> = parts[1..].iter().map(|s| s.parse().ok()).collect();
    let (levels, width, latent) = match (parts.first(), nums.as_deref()) {
        (Some(&"vae"), Some(&[l, w, z])) => (l, w, z),
        _ => bail!(
            "--model {model}: an autoencoder is `vae:LEVELS:WIDTH:LATENT_CHANNELS` (e.g. {DEFAULT_MODEL}: LEVELS levels of WIDTH, 2 WIDTH, 4 WIDTH... channels, each halving the side after the first, and LATENT_CHANNELS latent channels)"
        ),
    };
    let [c, h, w] = shape else {
        bail!("{data_name}: samples of shape {shape:?}; an autoencoder needs images [C, S, S]");
    };
    if h != w {
        bail!("{data_name}: {h} x {w} images; ddm's autoencoder takes square images");
    }
    Ok(AutoencoderKLConfig::small(*c, *h, levels, width, latent)?)
}

impl Task for AutoencoderTask {
    type Net = AutoencoderKL;

    fn name(&self) -> String {
        format!("autoencoder (kl weight {})", self.kl_weight)
    }

    fn data(&self) -> anyhow::Result<TrainData> {
        Ok(TrainData {
            data: self.data.clone(),
            targets: None,
            fingerprint: self.data.fingerprint(),
        })
    }

    fn net_config(&self, config: &TrainConfig, data: &Dataset) -> anyhow::Result<ModelConfig> {
        Ok(ModelConfig::Vae(vae_config(
            &config.model,
            &data.shape,
            &data.name,
        )?))
    }

    fn build(&self, net: &ModelConfig, src: &mut impl ParamSource) -> anyhow::Result<AutoencoderKL> {
        match net {
            ModelConfig::Vae(c) => Ok(c.build(src)?),
            other => bail!("an autoencoder task cannot train a {}", other.arch()),
        }
    }

    /// # Shapes
    /// - `batch.x0`: `[B, C*S*S]` -> `[1]`
    fn loss(
        &self,
        net: &AutoencoderKL,
        batch: Batch<'_>,
        _config: &TrainConfig,
        _net_config: &ModelConfig,
        rng: &mut ChaCha8Rng,
    ) -> anyhow::Result<Tensor<1>> {
        let c = net.config();
        let [b, _] = batch.x0.dims();
        let (ch, s) = (c.in_channels, c.sample_size);
        let x = batch.x0.reshape([b, ch, s, s]); // [B, C, S, S]
        let posterior = net.encode(x.clone()); // [B, L, s, s]
        let mut latent = vec![b];
        latent.extend(c.latent_shape());
        let latent_size: usize = latent[1..].iter().product();
        let e = ddm_core::flow::randn(latent, rng).to_tensor::<4>(&x.device());
        let reconstruction = net.decode(posterior.sample(e)); // [B, C, S, S]
        let diff = reconstruction - x;
        let mse = (diff.clone() * diff).mean();
        let kl = posterior.kl().mean() / latent_size as f64;
        Ok(mse + kl * self.kl_weight)
    }

    fn finish(
        &self,
        out: &Path,
        ema: &AutoencoderKL,
        _net_config: &ModelConfig,
        summary: TrainingSummary,
        data: &TrainData,
    ) -> anyhow::Result<PathBuf> {
        let mut config = ema.config().clone();
        let (scaling, recon_mse) = measure(ema, &data.data)?;
        config.scaling_factor = scaling;
        let mut meta = CheckpointMeta::autoencoder(ModelConfig::Vae(config), data.data.range());
        meta.source = Some(format!("ddm train-autoencoder on {}", data.data.name));
        meta.extra.insert("reconstruction_mse".into(), recon_mse.into());
        meta.training = Some(summary);
        let path = out.join(AUTOENCODER_FILE);
        Checkpoint {
            meta,
            tensors: ema.state_dict().0,
        }
        .save(&path)?;
        write_reconstructions(ema, &data.data, &out.join("reconstructions.png"))?;
        tracing::info!(
            "latent scaling factor {scaling:.5}; reconstruction MSE {recon_mse:.5} (images in [-1, 1])"
        );
        Ok(path)
    }
}

/// Over (up to) 2048 evenly spaced training images: the scaling factor 1 / std of the posterior
/// means (so latents have unit variance, what diffusion's N(0, I) noise expects), and the mean
/// squared reconstruction error of decoding those means.
fn measure(vae: &AutoencoderKL, data: &Dataset) -> anyhow::Result<(f64, f64)> {
    let device = vae
        .devices()
        .first()
        .cloned()
        .unwrap_or_else(ddm_core::device::cpu);
    let n = data.len().min(2048);
    let idx: Vec<usize> = (0..n).map(|i| i * data.len() / n).collect();
    let c = vae.config();
    let (mut sum, mut sum2, mut count, mut se) = (0.0f64, 0.0f64, 0usize, 0.0f64);
    for chunk in idx.chunks(128) {
        let x = HostTensor::new(
            vec![chunk.len(), c.in_channels, c.sample_size, c.sample_size],
            data.gather(chunk),
        )
        .to_tensor::<4>(&device);
        let mean = vae.encode(x.clone()).mean;
        let diff = vae.decode(mean.clone()) - x;
        se += (diff.clone() * diff).sum().into_scalar::<f32>() as f64;
        let m = HostTensor::from_tensor(mean);
        for &v in &m.data {
            sum += v as f64;
            sum2 += (v as f64) * (v as f64);
        }
        count += m.data.len();
    }
    let var = sum2 / count as f64 - (sum / count as f64).powi(2);
    if !(var.is_finite() && var > 0.0) {
        bail!(
            "the trained autoencoder's latents have variance {var}: it collapsed; train longer or with a lower --kl-weight"
        );
    }
    let pixels = (n * data.sample_size()) as f64;
    Ok((1.0 / var.sqrt(), se / pixels))
}

/// 16 training images (top rows) above their reconstructions (bottom rows).
fn write_reconstructions(vae: &AutoencoderKL, data: &Dataset, path: &Path) -> anyhow::Result<()> {
    let c = vae.config();
    if !(c.in_channels == 1 || c.in_channels == 3) {
        return Ok(());
    }
    let device = vae
        .devices()
        .first()
        .cloned()
        .unwrap_or_else(ddm_core::device::cpu);
    let n = data.len().min(16);
    let idx: Vec<usize> = (0..n).map(|i| i * data.len() / n).collect();
    let x = data.gather(&idx);
    let t = HostTensor::new(vec![n, c.in_channels, c.sample_size, c.sample_size], x.clone());
    let rec = HostTensor::from_tensor(vae.decode(vae.encode(t.to_tensor::<4>(&device)).mean));
    let per = data.sample_size();
    let (a, b) = (ddm_core::grid::to_u8(&x), ddm_core::grid::to_u8(&rec.data));
    let cells: Vec<Option<&[u8]>> = a.chunks(per).chain(b.chunks(per)).map(Some).collect();
    ddm_core::grid::write_grid_png(
        path,
        &cells,
        [c.in_channels, c.sample_size, c.sample_size],
        8,
        2,
        40,
    )
    .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
