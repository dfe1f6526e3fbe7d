//! `ddm ui`: the whole decentralized run in a browser.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;
use ddm_ensemble::remote::TOKEN_ENV;
use ddm_ui::UiOptions;

use super::DeviceArgs;

/// Show a run in a browser: its islands live (step, loss curve, ETA, state, sample grid), the
/// partition (each cluster's grid, size, class mix, prior), the registry (checkpoints, FLOPs,
/// conditioning, whether served experts answer, verify), the router's accuracy and calibration per
/// noise level, and sampling by hand (class or prompt, strategy, solver, steps, guidance, seed: the
/// grid equals `ddm sample`'s with the same settings, with which experts ran per step). Read-only.
/// Off loopback it needs a token (DDM_SERVE_TOKEN or --token-file): open /?token=TOKEN once. On a
/// cluster, keep the loopback address and tunnel: `ssh -L 8471:127.0.0.1:8471 login-node`, then
/// open http://127.0.0.1:8471 on your machine.
#[derive(Args, Debug)]
#[command(after_help = EXAMPLES)]
pub struct UiArgs {
    /// A run directory: every directory inside it a trainer wrote into is an island; its
    /// `partition/` and `registry/` are shown unless given below (`ddm quickstart --out DIR`
    /// writes this layout).
    #[arg(long)]
    pub runs: Option<PathBuf>,
    /// The partition directory (partition.json, clusters.png).
    #[arg(long)]
    pub partition: Option<PathBuf>,
    /// The registry to show and sample (a directory).
    #[arg(long)]
    pub registry: Option<PathBuf>,
    /// The text encoder prompts go through (sampling by prompt; `ddm sample --text-encoder`).
    #[arg(long)]
    pub text_encoder: Option<PathBuf>,
    /// Address to listen on (port 0: any free port, printed when ready).
    #[arg(long, default_value = "127.0.0.1:8471")]
    pub listen: SocketAddr,
    /// A file holding the bearer token (else DDM_SERVE_TOKEN).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Serve without a token on a non-loopback address (anyone who can connect sees the run and
    /// may sample).
    #[arg(long)]
    pub allow_unauthenticated: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

const EXAMPLES: &str = "Examples:
  ddm ui --runs runs/quickstart            # then open http://127.0.0.1:8471
  ddm ui --registry reg --partition part --runs islands/
  # On a cluster's login node; then, on your laptop: ssh -N -L 8471:127.0.0.1:8471 login-node
  # and open http://127.0.0.1:8471 (the page never leaves loopback, no token needed)
  DDM_SERVE_TOKEN=$(cat token) ddm ui --runs runs/big --listen 0.0.0.0:8471   # open /?token=...";

pub fn run(args: UiArgs) -> anyhow::Result<()> {
    let token = super::serve::token(args.token_file.as_deref())?;
    let options = UiOptions {
        runs: args.runs,
        partition: args.partition,
        registry: args.registry,
        text_encoder: args.text_encoder,
        listen: args.listen,
        token: token.clone(),
        allow_unauthenticated: args.allow_unauthenticated,
        device: args.device.device()?,
        limits: ddm_serve::Limits::default(),
    };
    ddm_ui::serve_ui(options, |addr| {
        let auth = match token.is_some() {
            true => format!(" (token required: open http://{addr}/?token=... with {TOKEN_ENV}'s value)"),
            false => String::new(),
        };
        println!("listening on http://{addr}{auth}");
        let _ = std::io::stdout().flush();
    })
}
