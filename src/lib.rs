//! The `ddm` command-line tool as a library: one module per verb in [`commands`], each with a
//! doc-commented clap `Args` struct (its `--help`) and a `run` function. The binaries `ddm`
//! (`src/main.rs`) and `ddm-trainer` (`src/bin/ddm-trainer.rs`) are thin entry points over it; the
//! library crates of the workspace know nothing of command lines.

pub mod cli;
pub mod commands;
pub mod ui;
