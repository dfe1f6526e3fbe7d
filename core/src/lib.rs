//! ddm-core: the pieces every other ddm crate stands on.
//!
//! - [`flow`]: the flow-matching convention (x_t = (1 - t) x0 + t e, t = 0 data), time samplers,
//!   step schedules, Euler/Heun integration, the [`flow::VelocityField`] trait experts implement,
//!   and the epsilon -> velocity adapter.
//! - [`dit`], [`mlp`], [`model`]: the networks (DiT as the PyTorch reference; an MLP for vectors).
//! - [`vae`]: the AutoencoderKL latents come from (diffusers' names), and the [`vae::LatentSpace`]
//!   experts trained on latents record; [`diffusers`] reads a diffusers model directory (the VAE's,
//!   and `dit::diffusers` maps a `DiTTransformer2DModel` onto ddm's DiT).
//! - [`checkpoint`]: the checkpoint file format (safetensors + `ddm` metadata), [`host`] tensors
//!   and files, [`params`] for PyTorch-named state dicts, [`fsio`] for atomic writes, [`digest`]
//!   for sha256 fingerprints, [`stats`] for the per-cluster statistics file.
//! - [`gmm`]: Gaussian mixtures with closed-form posteriors and velocities (the test oracle).
//! - [`progress`]: how long steps report progress (shown by the command line, not here).
//! - [`device`]: backend selection (`cpu` = burn flex; `wgpu`, `cuda` behind features); [`env`]:
//!   every environment variable ddm reads.
//! - [`condition`]: what a sample is conditioned on (a class, a vector), as experts and routers
//!   take it; [`partition`]: `partition.json`'s types, the contract islands and registries read.
//! - [`grid`]: PNG grids of samples.
//! - [`clip`]: the text encoder (transformers' `CLIPTextModel`) and [`tokenizer`] (captions -> token
//!   ids through a `tokenizer.json`): what turns a caption into a [`condition::Condition`].
//!
//! Depends on one other ddm crate, `ddm-kernels` (re-exported as [`fused`], [`group_norm`] and
//! [`update`]).

pub mod checkpoint;
pub mod clip;
pub mod condition;
pub mod device;
pub mod diffusers;
pub mod digest;
pub mod dit;
pub mod env;
pub mod error;
pub mod flow;
pub mod fsio;
pub mod gmm;
pub mod grid;
pub mod host;
pub mod json;
pub mod mlp;
pub mod model;
pub mod multistep;
pub mod params;
pub mod partition;
pub mod pixart;
pub mod precision;
pub mod progress;
pub mod stats;
pub mod text;
pub mod tokenizer;
pub mod vae;

/// The self-attention's CubeCL kernels on the GPU backends (`ddm-kernels`).
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub use ddm_kernels::gpu;
/// The fused CPU kernels the DiT, the VAE and the optimizer run (`ddm-kernels`).
pub use ddm_kernels::{fused, group_norm, update};

pub use burn;
pub use error::{Error, Result};
