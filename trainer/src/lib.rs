//! ddm-trainer: job 1 of the mission, "train an expert on one compute island".
//!
//! An island reads `partition.json` and its own shard, trains a flow-matching expert, and writes
//! a checkpoint; it talks to no other island and opens no network connection. [`train`] holds the
//! loop, [`state`] the resumable state, [`ema`] the weight average, [`island`] which cluster and
//! data, [`config`] the settings, [`metrics`] the JSON-lines log, [`cli`] the shared command line.

pub mod cli;
pub mod config;
pub mod ema;
pub mod island;
pub mod metrics;
pub mod plot;
pub mod state;
pub mod stats;
pub mod task;
pub mod train;
