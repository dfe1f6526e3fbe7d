//! `ddm-trainer`: the binary an island runs (the same code as `ddm train`).

use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "ddm-trainer",
    version,
    about = "Train one ddm expert on one compute island (no network, resumable)"
)]
struct Cli {
    #[command(flatten)]
    args: ddm_trainer::cli::TrainArgs,
}

fn main() -> ExitCode {
    match ddm_trainer::cli::run(Cli::parse().args) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}
