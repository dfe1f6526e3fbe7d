//! `ddm`: the command-line tool of Decentralized Diffusion Models.
//!
//! Each verb has its own module under `commands/` with a doc-commented `Args` struct (its `--help`)
//! and a `run` function. `main` prints the error chain and exits with status 2 on failure.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod commands;

/// Decentralized Diffusion Models: diffusion experts trained on isolated compute islands, mixed by a
/// router at every denoising step.
#[derive(Parser)]
#[command(name = "ddm", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// Turn PyTorch weights (a PyTorch-named state dict + a JSON config) into a ddm checkpoint.
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Commands::Train(args) = cli.command {
        // The trainer has its own exit statuses (3: interrupted, resumable).
        return match commands::train::run(args) {
            Ok(code) => ExitCode::from(code),
            Err(err) => {
                eprintln!("error: {err:#}");
                ExitCode::from(2)
            }
        };
    }
    let result = match cli.command {
        Commands::Import(args) => commands::import::run(args),
        Commands::Predict(args) => commands::predict::run(args),
        Commands::Info(args) => commands::info::run(args),
        Commands::Partition(args) => commands::partition::run(args),
        Commands::Data(args) => commands::data::run(args),
        Commands::Train(_) => unreachable!("handled above"),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}
