//! `ddm serve`: a registry's experts (and router) over HTTP, for samplers on other machines.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use ddm_ensemble::remote::{TOKEN_ENV, token_from_env};
use ddm_serve::ServeOptions;
use ddm_serve::batcher::BatchPolicy;

use super::DeviceArgs;

/// Serve the velocity of a registry's experts (and the router's logits) over HTTP. Tensors travel
/// as safetensors bytes: POST /v1/experts/{k}/velocity (x_t, t, y?) -> v; POST /v1/router/logits
/// (x_t, t, y?, c?) -> logits; GET /v1/metadata, /metrics (Prometheus), /health. Concurrent
/// requests for one model are coalesced into one forward (--max-wait-ms, --max-batch-rows).
/// Requests need `Authorization: Bearer TOKEN` when a token is set (DDM_SERVE_TOKEN or
/// --token-file); without one, only a loopback address is served unless --allow-unauthenticated.
/// Prints `listening on http://ADDR` when ready; SIGTERM / Ctrl-C finish in-flight requests, then
/// exit.
#[derive(Args, Debug)]
#[command(after_help = EXAMPLES)]
pub struct ServeArgs {
    /// The registry: a directory, or an object store (s3://bucket/prefix, gs://, az://;
    /// credentials and endpoint from the environment, e.g. AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL).
    #[arg(long)]
    pub registry: ddm_ensemble::registry::Location,
    /// Serve these experts (comma-separated cluster ids). Default: every local expert, and the
    /// router if one is registered.
    #[arg(long, value_parser = super::values::count(0, super::values::MAX_CLUSTERS - 1), value_delimiter = ',')]
    pub experts: Option<Vec<usize>>,
    /// Serve the router (alone, unless --experts is given too).
    #[arg(long)]
    pub router: bool,
    /// Address to listen on (port 0: any free port, printed when ready).
    #[arg(long, default_value = "127.0.0.1:8470")]
    pub listen: SocketAddr,
    /// A file holding the bearer token (else DDM_SERVE_TOKEN).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Serve without a token on a non-loopback address (anyone who can connect may use it).
    #[arg(long)]
    pub allow_unauthenticated: bool,
    /// The most rows one request may carry (1 to 1048576).
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=1 << 20))]
    pub max_rows: u32,
    /// The largest request body, in MiB (1 to 65536).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub max_body_mib: u32,
    /// How long a request may wait for its answer, in seconds (at most a year).
    #[arg(long, default_value = "120", value_parser = super::values::seconds)]
    pub timeout_s: Duration,
    /// How long the first request of a batch waits for others to join it, in ms (0: no
    /// coalescing; at most an hour).
    #[arg(long, default_value = "2", value_parser = super::values::millis)]
    pub max_wait_ms: Duration,
    /// The most rows a coalesced forward takes (1 to 1048576). On a CPU, larger batches cost more
    /// per row (a DiT-T/4 expert on 2 cores: 1.13 ms/row at 64 rows, 1.22 at 256, 1.77 at 1024),
    /// so coalescing past a few hundred rows lowers throughput; on a GPU raise it.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=1 << 20))]
    pub max_batch_rows: u32,
    /// Requests that may wait per model before new ones get 503 (1 to 65536).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub queue: u32,
    /// Seconds a client may take to send a request's head (line and headers); an idle
    /// keep-alive connection is closed after it too.
    #[arg(long, default_value = "10", value_parser = super::values::seconds)]
    pub header_timeout_s: Duration,
    /// Seconds a client may take to send a request's body (else 408).
    #[arg(long, default_value = "60", value_parser = super::values::seconds)]
    pub body_timeout_s: Duration,
    /// Connections held at once; one more is answered 503 and closed (1 to 65536).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub max_connections: u32,
    /// After SIGTERM, seconds in-flight requests get to finish before the server exits anyway.
    #[arg(long, default_value = "30", value_parser = super::values::seconds)]
    pub shutdown_timeout_s: Duration,
    /// Keep the served models' weights under this many MiB: a model is loaded when a request
    /// needs it and unloaded after its batch while another waits for room (same answers, more
    /// time). Serve more experts than fit in memory.
    #[arg(long, value_name = "MIB", value_parser = super::values::mib)]
    pub max_memory: Option<u64>,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// The precision the served experts compute in: f32, or bf16/f16 (their f32 weights cast
    /// when loaded; answers are f32 either way; the router stays f32), as `ddm sample
    /// --precision`.
    #[arg(long, default_value = "f32")]
    pub precision: ddm_core::precision::Precision,
}

const EXAMPLES: &str = "Examples:
  ddm serve --registry reg --experts 0,1 --listen 127.0.0.1:8470
  DDM_SERVE_TOKEN=$(cat token) ddm serve --registry reg --experts 2 --listen 0.0.0.0:8470
  ddm register --registry sampler-reg --remote http://island-2:8470   # then ddm sample as usual
  ddm serve --registry reg --max-memory 4096   # every expert, at most 4 GiB of them at once";

/// The bearer token: the file's (trimmed; an empty file is refused), else DDM_SERVE_TOKEN's.
pub fn token(file: Option<&std::path::Path>) -> anyhow::Result<Option<String>> {
    let Some(p) = file else {
        return Ok(token_from_env());
    };
    let t = std::fs::read_to_string(p).with_context(|| format!("reading the token file {}", p.display()))?;
    let t = t.trim().to_string();
    if t.is_empty() {
        bail!("{}: the token file is empty", p.display());
    }
    Ok(Some(t))
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let token = token(args.token_file.as_deref())?;
    let options = ServeOptions {
        registry: args.registry.local()?,
        experts: args.experts,
        router: args.router,
        listen: args.listen,
        token: token.clone(),
        allow_unauthenticated: args.allow_unauthenticated,
        max_rows: args.max_rows as usize,
        max_body_bytes: (args.max_body_mib as usize) << 20,
        request_timeout: args.timeout_s,
        batch: BatchPolicy {
            max_wait: args.max_wait_ms,
            max_batch_rows: args.max_batch_rows as usize,
            queue: args.queue as usize,
        },
        device: args.device.device()?,
        precision: args.precision,
        max_memory: args.max_memory,
        limits: ddm_serve::Limits {
            header_timeout: args.header_timeout_s,
            body_timeout: args.body_timeout_s,
            max_connections: args.max_connections as usize,
            shutdown_timeout: args.shutdown_timeout_s,
        },
    };
    ddm_serve::serve(options, |addr| {
        let auth = if token.is_some() {
            format!(" (bearer token required; {TOKEN_ENV})")
        } else {
            String::new()
        };
        println!("listening on http://{addr}{auth}");
        let _ = std::io::stdout().flush();
    })
}
