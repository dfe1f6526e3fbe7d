//! `ddm-trainer`: the binary an island runs (the same code as `ddm train`). It is its own binary so
//! a scheduler's job script names one small command; `cargo install --path .` installs it beside
//! `ddm`.

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
    args: ddm::commands::train::TrainArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    ddm::ui::init_logging();
    match ddm::commands::train::run(cli.args) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("error: {}", ddm::ui::error_text(&err));
            ExitCode::from(2)
        }
    }
}
