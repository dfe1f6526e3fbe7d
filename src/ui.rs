//! What a user sees besides results: log lines through `tracing` (level from `RUST_LOG`, default
//! `info`, to stderr, so an island under a scheduler logs at a chosen level) and progress bars
//! (hidden with `--quiet` and whenever stderr is not a terminal).

use std::io::IsTerminal;

use ddm_core::progress::Progress;
use indicatif::{ProgressBar, ProgressStyle};
use tracing_subscriber::EnvFilter;

/// Install the log subscriber: `RUST_LOG` (e.g. `RUST_LOG=debug`, `RUST_LOG=ddm_trainer=warn`),
/// else `info`.
pub fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .without_time()
        .try_init();
}

/// An error and its causes on one line, each cause once: a cause whose text the message already
/// quotes (an I/O error inside "PATH: reason") is not repeated.
pub fn error_text(err: &anyhow::Error) -> String {
    ddm_core::error::chain(err.as_ref())
}

/// A terminal progress bar for library steps that report through [`Progress`].
pub struct Bar {
    bar: ProgressBar,
}

impl Bar {
    /// A bar on stderr; never drawn when `quiet` (or when stderr is not a terminal).
    pub fn new(quiet: bool) -> Self {
        let bar = if quiet {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(0)
        };
        Self { bar }
    }
}

impl Progress for Bar {
    fn begin(&self, what: &str, total: u64) {
        self.bar.reset();
        self.bar.set_length(total);
        let template = if total == 0 {
            "{prefix} {spinner} {pos} {elapsed}"
        } else {
            "{prefix} [{bar:30}] {pos}/{len} eta {eta}"
        };
        self.bar.set_style(
            ProgressStyle::with_template(template)
                .expect("static template")
                .progress_chars("=> "),
        );
        self.bar.set_prefix(what.to_string());
    }

    fn advance(&self, n: u64) {
        self.bar.inc(n);
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
