//! ddm-trainer: job 1 of the mission, "train an expert on one compute island".
//!
//! An island reads `partition.json` and its own shard, trains a flow-matching expert, and writes
//! a checkpoint; it talks to no other island and opens no network connection. [`train`] holds the
//! loop and [`task`] what a loop optimises: an [`expert`] (flow matching on one cluster), a
//! [`router`] (cross-entropy on cluster ids), an [`autoencoder`] (the VAE latents come from), a
//! [`text_encoder`] (CLIP's contrastive loss on captioned images), or a task of another crate
//! (eval's classifier).
//! [`state`] is the resumable state, [`ema`] the weight average, [`loss_scale`] f16's loss scaler, [`parallel`] several devices per island, [`island`] which cluster and
//! data, [`config`] the settings, [`metrics`] the JSON-lines log, [`plot`] the loss curve.
//! The command lines (`ddm train`, the `ddm-trainer` binary) live in the `ddm` crate.

pub mod autoencoder;
pub mod config;
pub mod ema;
pub mod expert;
pub mod island;
pub mod loss_scale;
pub mod metrics;
pub mod parallel;
pub mod plot;
pub mod router;
pub mod router_eval;
pub mod state;
pub mod task;
pub mod text_encoder;
pub mod train;
