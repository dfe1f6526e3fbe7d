//! The `ddm` command line: every verb, and the one place that runs them (`ddm` and the tests that
//! walk every flag use it).

use clap::{Parser, Subcommand};

use crate::commands;

/// Decentralized Diffusion Models: diffusion experts trained on isolated compute islands, mixed by a
/// router at every denoising step.
#[derive(Parser)]
#[command(name = "ddm", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Commands,
}

#[derive(Subcommand)]
pub enum Commands {
    /// Turn PyTorch weights (a PyTorch-named state dict + a JSON config) or a diffusers
    /// AutoencoderKL directory into a ddm checkpoint.
    Import(commands::import::ImportArgs),
    /// Run a checkpoint on tensors from a file: reads `x_t`, `t` (and `y`), writes the velocity `v`.
    Predict(commands::predict::PredictArgs),
    /// Show what a checkpoint holds: model, data, objective, provenance, parameter count.
    Info(commands::info::InfoArgs),
    /// Cluster a dataset into K shards, one per island (or --describe an existing partition).
    Partition(commands::partition::PartitionArgs),
    /// Inspect or download datasets.
    Data(commands::data::DataArgs),
    /// Train one expert on one island's shard (resumable; the same as the `ddm-trainer` binary).
    Train(commands::train::TrainArgs),
    /// Train the router: which cluster did a noised sample come from? (p(k | x_t, t))
    TrainRouter(commands::train_router::TrainRouterArgs),
    /// Train the VAE whose latents experts can be trained on (AutoencoderKL, diffusers' names).
    TrainAutoencoder(commands::train_autoencoder::TrainAutoencoderArgs),
    /// Train a text encoder (CLIP's text tower) contrastively on captioned images.
    TrainTextEncoder(commands::train_text_encoder::TrainTextEncoderArgs),
    /// Encode images into a VAE's latent space: a `tensors:` dataset to partition and train on.
    Encode(commands::encode::EncodeArgs),
    /// Encode captions with a text encoder: pooled vectors (and token states) to condition on.
    EncodeText(commands::encode_text::EncodeTextArgs),
    /// Evaluate a router per noise level: accuracy, cross-entropy, calibration.
    EvalRouter(commands::eval_router::EvalRouterArgs),
    /// Add experts and a router to a registry (verified; concurrent-safe).
    Register(commands::register::RegisterArgs),
    /// List, verify or edit a registry.
    Registry(commands::register::RegistryArgs),
    /// Sample from the routed ensemble of a registry.
    Sample(commands::sample::SampleArgs),
    /// Distill a registry's ensemble into one dense student (cheaper to serve than K experts).
    Distill(commands::distill::DistillArgs),
    /// Serve a registry's experts (and router) over HTTP, for samplers on other machines.
    Serve(commands::serve::ServeArgs),
    /// Show a run in a browser: islands live, partition, registry, router, sampling by hand.
    Ui(commands::ui::UiArgs),
    /// Write (and submit) the scheduler jobs for every island and the router: Slurm, Kubernetes.
    Launch(commands::launch::LaunchArgs),
    /// The whole mission on the default data: partition, 4 island trainers, router, registry, samples.
    Quickstart(commands::quickstart::QuickstartArgs),
    /// Score samples: FD / precision / recall in a Fashion-MNIST classifier's features, exact
    /// Gaussian-mixture metrics; or train that classifier.
    Eval(commands::eval::EvalArgs),
    /// Reproducible experiments: `paper-table` (ensemble vs FLOP-matched monolith).
    Experiment(commands::experiment::ExperimentArgs),
}

/// Run a parsed command line: the exit status (0 done; training verbs 3 when interrupted, with a
/// resumable state), or the error.
pub fn run(cli: Cli) -> anyhow::Result<u8> {
    // Read by the CPU kernels themselves, which would take a misspelling for the default.
    ddm_core::env::cpu_capability()?;
    match cli.command {
        Commands::Import(args) => commands::import::run(args).map(|()| 0),
        Commands::Predict(args) => commands::predict::run(args).map(|()| 0),
        Commands::Info(args) => commands::info::run(args).map(|()| 0),
        Commands::Partition(args) => commands::partition::run(args).map(|()| 0),
        Commands::Data(args) => commands::data::run(args).map(|()| 0),
        Commands::Train(args) => commands::train::run(args),
        Commands::TrainRouter(args) => commands::train_router::run(args),
        Commands::TrainAutoencoder(args) => commands::train_autoencoder::run(args),
        Commands::TrainTextEncoder(args) => commands::train_text_encoder::run(args),
        Commands::Encode(args) => commands::encode::run(args).map(|()| 0),
        Commands::EncodeText(args) => commands::encode_text::run(args).map(|()| 0),
        Commands::EvalRouter(args) => commands::eval_router::run(args).map(|()| 0),
        Commands::Register(args) => commands::register::register(args).map(|()| 0),
        Commands::Registry(args) => commands::register::registry_cmd(args).map(|()| 0),
        Commands::Sample(args) => commands::sample::run(args).map(|()| 0),
        Commands::Serve(args) => commands::serve::run(args).map(|()| 0),
        Commands::Ui(args) => commands::ui::run(args).map(|()| 0),
        Commands::Launch(args) => commands::launch::run(args).map(|()| 0),
        Commands::Distill(args) => commands::distill::run(args),
        Commands::Quickstart(args) => commands::quickstart::run(args).map(|()| 0),
        Commands::Eval(args) => commands::eval::run(args),
        Commands::Experiment(args) => commands::experiment::run(args),
    }
}
