//! `ddm ui`: a decentralized run in a browser. One page (its HTML, script and style compiled into
//! the binary: it works offline) shows the islands of a run directory live (step, loss curve, ETA,
//! state, sample grid), the partition (each cluster's grid, size, class mix, prior), the registry
//! (every checkpoint, whether a served expert answers, `verify` on request), the router's accuracy
//! and calibration per noise level, and samples the registry's ensemble by hand.
//!
//! Read-only: nothing the page asks for writes into the run, the partition or the registry (a
//! sample is drawn into a temporary directory and sent back). Like `ddm serve`, off loopback it
//! needs a bearer token: as an `Authorization: Bearer` header, or once in the address
//! (`/?token=TOKEN`), which sets a cookie holding the token's hash for the page's own requests.
//! Bad requests get a 4xx with the reason as JSON (`{"error": ...}`); one sample is drawn at a
//! time (another meanwhile gets 503).

mod islands;
mod registry;
mod sampling;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::bail;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Request as HttpRequest, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use ddm_core::burn::prelude::*;
use serde_json::json;

use ddm_serve::Limits;
use ddm_serve::auth::{bearer, same};
use ddm_serve::metrics::Metrics;

pub use islands::{Island, State as IslandState};

/// What `ddm ui` was asked to show.
#[derive(Debug, Clone)]
pub struct UiOptions {
    /// A run directory: its islands (each directory a trainer wrote into); its `partition/` and
    /// `registry/` unless given below.
    pub runs: Option<PathBuf>,
    pub partition: Option<PathBuf>,
    pub registry: Option<PathBuf>,
    /// The text encoder prompts go through (sampling by prompt).
    pub text_encoder: Option<PathBuf>,
    pub listen: SocketAddr,
    pub token: Option<String>,
    pub allow_unauthenticated: bool,
    /// Where samples drawn from the page run.
    pub device: Device,
    pub limits: Limits,
}

impl UiOptions {
    /// The partition directory: given, else `RUNS/partition` when it holds a partition.
    fn partition_dir(&self) -> Option<PathBuf> {
        let found = self.runs.as_ref().map(|r| r.join("partition"));
        self.partition
            .clone()
            .or(found.filter(|p| p.join("partition.json").is_file()))
    }

    /// The registry directory: given, else `RUNS/registry` when it holds a registry.
    fn registry_dir(&self) -> Option<PathBuf> {
        let found = self.runs.as_ref().map(|r| r.join("registry"));
        self.registry
            .clone()
            .or(found.filter(|p| p.join(ddm_ensemble::registry::INDEX).is_file()))
    }
}

/// What the handlers share.
struct Ui {
    runs: Option<PathBuf>,
    partition: Option<PathBuf>,
    registry: Option<PathBuf>,
    /// sha256 of the token (what the cookie holds), when one is set.
    token: Option<(String, String)>,
    summaries: registry::Summaries,
    sampler: Option<sampling::Sampler>,
}

/// A refusal: its status and the reason, sent as `{"error": reason}`.
#[derive(Debug)]
struct Refusal(StatusCode, String);

impl Refusal {
    fn bad(reason: impl Into<String>) -> Self {
        Self(StatusCode::BAD_REQUEST, reason.into())
    }
    fn not_found(reason: impl Into<String>) -> Self {
        Self(StatusCode::NOT_FOUND, reason.into())
    }
    fn failed(err: anyhow::Error) -> Self {
        Self(
            StatusCode::UNPROCESSABLE_ENTITY,
            ddm_core::error::chain(err.as_ref()),
        )
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (self.0, axum::Json(json!({ "error": self.1 }))).into_response()
    }
}

type Answer = Result<Response, Refusal>;

/// Serve the page until SIGTERM / Ctrl-C. `on_ready` is told the bound address once requests are
/// accepted.
pub fn serve_ui(o: UiOptions, on_ready: impl FnOnce(SocketAddr)) -> anyhow::Result<()> {
    if o.token.is_none() && !o.listen.ip().is_loopback() && !o.allow_unauthenticated {
        bail!(
            "{}: not a loopback address, and no token: set DDM_SERVE_TOKEN or --token-file (or pass --allow-unauthenticated to show the run to anyone who can connect)",
            o.listen
        );
    }
    if o.runs.is_none() && o.partition.is_none() && o.registry.is_none() {
        bail!("nothing to show: give --runs, --partition or --registry");
    }
    for (flag, dir) in [
        ("--runs", &o.runs),
        ("--partition", &o.partition),
        ("--registry", &o.registry),
    ] {
        if let Some(d) = dir
            && !d.is_dir()
        {
            bail!("{flag} {}: not a directory", d.display());
        }
    }
    let registry = o.registry_dir();
    let ui = Arc::new(Ui {
        runs: o.runs.clone(),
        partition: o.partition_dir(),
        sampler: registry
            .clone()
            .map(|r| sampling::Sampler::new(r, o.text_encoder.clone(), o.device.clone())),
        registry,
        token: o.token.clone().map(|t| {
            let hash = ddm_core::digest::sha256_hex(t.as_bytes());
            (t, hash)
        }),
        summaries: registry::Summaries::default(),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(o.listen)
            .await
            .map_err(|e| anyhow::anyhow!("listening on {}: {e}", o.listen))?;
        let addr = listener.local_addr()?;
        on_ready(addr);
        ddm_serve::accept_until_stopped(listener, routes(ui), &Metrics::new(), o.limits).await;
        anyhow::Ok(())
    })
}

/// The page, its assets and its JSON/SVG/PNG endpoints, behind the token.
fn routes(ui: Arc<Ui>) -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", include_str!("assets/index.html")) }),
        )
        .route(
            "/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", include_str!("assets/app.js")) }),
        )
        .route(
            "/style.css",
            get(|| async { asset("text/css; charset=utf-8", include_str!("assets/style.css")) }),
        )
        .route("/api/overview", get(overview))
        .route("/api/islands", get(island_list))
        .route("/api/islands/{name}/loss.svg", get(island_loss))
        .route("/api/islands/{name}/samples.png", get(island_samples))
        .route("/api/partition", get(partition))
        .route("/api/partition/clusters.png", get(partition_grid))
        .route("/api/registry", get(registry_view))
        .route("/api/registry/verify", post(verify))
        .route("/api/router", get(router_eval))
        .route("/api/router.svg", get(router_svg))
        .route("/api/sample", post(sample))
        .fallback(|| async { Refusal::not_found("no such page") })
        .layer(middleware::from_fn_with_state(ui.clone(), authorize))
        .layer(DefaultBodyLimit::max(64 << 10))
        .with_state(ui)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// The name of the cookie that holds the token's sha256.
const COOKIE: &str = "ddm_ui_token";

/// With a token set, a request needs it: as a bearer header, as the cookie the page got, or in
/// the address (`?token=`), which sets the cookie and sends the browser on without it.
async fn authorize(State(ui): State<Arc<Ui>>, headers: HeaderMap, req: HttpRequest, next: Next) -> Response {
    let Some((token, hash)) = &ui.token else {
        return next.run(req).await;
    };
    let header_ok = bearer(&headers).is_some_and(|g| same(g.as_bytes(), token.as_bytes()));
    let cookie_ok = cookies(&headers).any(|(k, v)| k == COOKIE && same(v.as_bytes(), hash.as_bytes()));
    if header_ok || cookie_ok {
        return next.run(req).await;
    }
    let query = req.uri().query().unwrap_or("");
    let given = form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == "token");
    if let Some((_, t)) = given
        && same(t.as_bytes(), token.as_bytes())
    {
        let cookie = format!("{COOKIE}={hash}; Path=/; HttpOnly; SameSite=Strict");
        return (
            StatusCode::SEE_OTHER,
            [
                (header::LOCATION, req.uri().path().to_string()),
                (header::SET_COOKIE, cookie),
            ],
        )
            .into_response();
    }
    Refusal(
        StatusCode::UNAUTHORIZED,
        "this page needs the token `ddm ui` was started with: open /?token=TOKEN, or send Authorization: Bearer TOKEN".into(),
    )
    .into_response()
}

/// The request's cookies, as (name, value).
fn cookies(headers: &HeaderMap) -> impl Iterator<Item = (&str, &str)> {
    headers
        .get_all(header::COOKIE)
        .into_iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
}

/// Run blocking work (files, checkpoints, servers) off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Refusal> + Send + 'static,
) -> Result<T, Refusal> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        Refusal(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the request's work failed: {e}"),
        )
    })?
}

fn json_answer(v: impl serde::Serialize) -> Answer {
    Ok(axum::Json(v).into_response())
}

/// What the page has to show: which panels have data.
async fn overview(State(ui): State<Arc<Ui>>) -> Answer {
    json_answer(json!({
        "runs": ui.runs.as_ref().map(|p| p.display().to_string()),
        "partition": ui.partition.as_ref().map(|p| p.display().to_string()),
        "registry": ui.registry.as_ref().map(|p| p.display().to_string()),
        "router_eval": router_eval_file(&ui).map(|p| p.display().to_string()),
        "prompts": ui.sampler.as_ref().is_some_and(|s| s.reads_prompts()),
        "ddm_version": env!("CARGO_PKG_VERSION"),
    }))
}

fn islands_of(ui: &Ui) -> Vec<Island> {
    ui.runs.as_deref().map(islands::discover).unwrap_or_default()
}

/// The island a URL names: one of those found (never a path built from the request).
fn island_named(ui: &Ui, name: &str) -> Result<Island, Refusal> {
    islands_of(ui)
        .into_iter()
        .find(|i| i.name == name)
        .ok_or_else(|| Refusal::not_found(format!("no island named `{name}` in the run directory")))
}

async fn island_list(State(ui): State<Arc<Ui>>) -> Answer {
    let list = blocking(move || {
        Ok(islands_of(&ui)
            .iter()
            .map(|i| islands::progress(i, ddm_trainer::state::saved_step))
            .collect::<Vec<_>>())
    })
    .await?;
    json_answer(list)
}

async fn island_loss(State(ui): State<Arc<Ui>>, UrlPath(name): UrlPath<String>) -> Answer {
    let island = island_named(&ui, &name)?;
    let points = blocking(move || Ok(islands::losses(&island))).await?;
    let svg = ddm_trainer::plot::loss_curve_svg("loss", &points, (420, 240))
        .map_err(Refusal::failed)?
        .ok_or_else(|| Refusal::not_found(format!("{name}: no loss logged yet")))?;
    Ok(svg_answer(svg))
}

fn svg_answer(svg: String) -> Response {
    (
        [
            (header::CONTENT_TYPE, "image/svg+xml"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        svg,
    )
        .into_response()
}

fn png_file(path: &Path) -> Answer {
    let bytes = std::fs::read(path).map_err(|e| Refusal::not_found(format!("{}: {e}", path.display())))?;
    Ok((
        [
            (header::CONTENT_TYPE, "image/png"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        bytes,
    )
        .into_response())
}

async fn island_samples(State(ui): State<Arc<Ui>>, UrlPath(name): UrlPath<String>) -> Answer {
    let island = island_named(&ui, &name)?;
    let grid = islands::newest_samples(&island.dir)
        .ok_or_else(|| Refusal::not_found(format!("{name}: no sample grid yet")))?;
    png_file(&grid)
}

fn partition_dir(ui: &Ui) -> Result<&Path, Refusal> {
    ui.partition.as_deref().ok_or_else(|| {
        Refusal::not_found("no partition: start ddm ui with --partition (or --runs holding partition/)")
    })
}

/// partition.json: its clusters (size, prior, class counts) and the data's class names.
async fn partition(State(ui): State<Arc<Ui>>) -> Answer {
    let path = partition_dir(&ui)?.join("partition.json");
    let text =
        std::fs::read_to_string(&path).map_err(|e| Refusal::not_found(format!("{}: {e}", path.display())))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Refusal::failed(anyhow::anyhow!("{}: not JSON: {e}", path.display())))?;
    json_answer(json!({
        "k": v.get("k"),
        "dataset": v.pointer("/dataset/name"),
        "class_names": v.pointer("/dataset/class_names"),
        "clusters": v.get("clusters"),
        "has_grid": partition_dir(&ui)?.join("clusters.png").is_file(),
    }))
}

async fn partition_grid(State(ui): State<Arc<Ui>>) -> Answer {
    png_file(&partition_dir(&ui)?.join("clusters.png"))
}

fn registry_dir(ui: &Ui) -> Result<PathBuf, Refusal> {
    ui.registry.clone().ok_or_else(|| {
        Refusal::not_found("no registry: start ddm ui with --registry (or --runs holding registry/)")
    })
}

async fn registry_view(State(ui): State<Arc<Ui>>) -> Answer {
    let dir = registry_dir(&ui)?;
    let view = blocking(move || registry::view(&dir, &ui.summaries).map_err(Refusal::failed)).await?;
    json_answer(view)
}

/// `ddm registry verify`: every blob re-hashed and checked, every server asked.
async fn verify(State(ui): State<Arc<Ui>>) -> Answer {
    let dir = registry_dir(&ui)?;
    let problems = blocking(move || ddm_ensemble::registry::verify(&dir).map_err(Refusal::failed)).await?;
    json_answer(json!({ "ok": problems.is_empty(), "problems": problems }))
}

/// The router's evaluation: `router-eval.json` of an island in the run directory.
fn router_eval_file(ui: &Ui) -> Option<PathBuf> {
    islands_of(ui)
        .into_iter()
        .map(|i| i.dir.join(ddm_trainer::router::EVAL_FILE))
        .find(|p| p.is_file())
}

fn read_router_eval(ui: &Ui) -> Result<ddm_trainer::router_eval::RouterEval, Refusal> {
    let path = router_eval_file(ui).ok_or_else(|| {
        Refusal::not_found("no router-eval.json in the run directory (ddm train-router writes it)")
    })?;
    let text =
        std::fs::read_to_string(&path).map_err(|e| Refusal::not_found(format!("{}: {e}", path.display())))?;
    ddm_trainer::router_eval::RouterEval::parse(&text).map_err(|e| {
        Refusal::failed(anyhow::anyhow!(
            "{}: not a router evaluation: {e}",
            path.display()
        ))
    })
}

async fn router_eval(State(ui): State<Arc<Ui>>) -> Answer {
    json_answer(read_router_eval(&ui)?)
}

async fn router_svg(State(ui): State<Arc<Ui>>) -> Answer {
    let eval = read_router_eval(&ui)?;
    let svg = ddm_trainer::plot::router_eval_svg(&eval, (480, 280)).map_err(Refusal::failed)?;
    Ok(svg_answer(svg))
}

/// Draw samples as `ddm sample` would with the same settings: the PNG grid (base64) and the report.
async fn sample(State(ui): State<Arc<Ui>>, body: Bytes) -> Answer {
    let request: sampling::SampleRequest =
        serde_json::from_slice(&body).map_err(|e| Refusal::bad(format!("the sampling request: {e}")))?;
    let answer = blocking(move || {
        let sampler = ui
            .sampler
            .as_ref()
            .ok_or_else(|| Refusal::not_found("no registry to sample: start ddm ui with --registry"))?;
        sampler.draw(request)
    })
    .await?;
    json_answer(answer)
}
