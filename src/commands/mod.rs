//! One module per `ddm` verb.

pub mod data;
pub mod distill;
pub mod encode;
pub mod encode_text;
pub mod eval;
pub mod eval_router;
pub mod experiment;
pub mod import;
pub mod info;
pub mod launch;
pub mod partition;
pub mod predict;
pub mod quickstart;
pub mod register;
pub mod sample;
pub mod serve;
pub mod settings;
pub mod train;
pub mod train_autoencoder;
pub mod train_router;
pub mod train_text_encoder;
pub mod ui;
pub mod values;

use clap::Args;

/// Where tensors run.
#[derive(Args, Debug, Clone)]
pub struct DeviceArgs {
    /// Backend: `cpu` (burn flex), `wgpu[:API][:ADAPTER]` or `cuda[:N]` (both GPU backends are
    /// built by default; their drivers are loaded when the device opens).
    #[arg(long, default_value = "cpu")]
    pub device: ddm_core::device::DeviceChoice,
}

impl DeviceArgs {
    pub fn device(&self) -> anyhow::Result<ddm_core::burn::prelude::Device> {
        Ok(ddm_core::device::device(self.device)?)
    }
}
