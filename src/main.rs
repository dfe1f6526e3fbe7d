//! `ddm`: the command-line tool of Decentralized Diffusion Models.
//!
//! Each verb has its own module under `commands/` with a doc-commented `Args` struct (its `--help`)
//! and a `run` function; `ddm::cli` gathers them. `main` prints the error chain and exits with
//! status 2 on failure.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = ddm::cli::Cli::parse();
    ddm::ui::init_logging();
    match ddm::cli::run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("error: {}", ddm::ui::error_text(&err));
            ExitCode::from(2)
        }
    }
}
