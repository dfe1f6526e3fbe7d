//! ddm-serve: experts (and the router) of a registry served over HTTP, so the sampler on another
//! machine can run them (`ddm serve`; the wire format is `ddm_ensemble::remote`).
//!
//! axum's router on hyper's HTTP/1 server answers requests; each served model has a worker thread
//! that coalesces concurrent requests into one forward ([`batcher`]). Every request is checked
//! before it reaches a model: bearer token (401), declared and actual body size (413, before the
//! body is read when its length is declared), rows (413), tensors (400 with the reason); a full
//! queue is 503 and a forward slower than the request timeout 504. Slow clients are shed
//! ([`Limits`]): a request head must arrive within the header timeout and its body within the body
//! timeout (408), and past `max_connections` a new connection is answered 503 and closed. None of
//! these stops the server. SIGTERM or Ctrl-C stops accepting connections and lets in-flight
//! requests finish, for at most the shutdown timeout.

pub mod batcher;
pub mod metrics;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Request as HttpRequest, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use ddm_core::burn::prelude::*;
use ddm_core::flow::VelocityField;
use ddm_core::host::HostTensor;
use ddm_ensemble::registry::Registry;
use ddm_ensemble::registry::claims::Claim;
use ddm_ensemble::remote::{Request, ServedCheckpoint, ServedMetadata, response_bytes};
use ddm_router::net::RouterNet;

use batcher::{BatchPolicy, Batcher, Forward, MemoryBudget};
use metrics::Metrics;

/// What `ddm serve` was asked for.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub registry: PathBuf,
    /// Experts to serve (None: every expert registered here with a local checkpoint).
    pub experts: Option<Vec<usize>>,
    /// Serve the router's logits.
    pub router: bool,
    pub listen: SocketAddr,
    /// The bearer token clients must send (None: no authentication).
    pub token: Option<String>,
    /// Accept serving without a token on a non-loopback address.
    pub allow_unauthenticated: bool,
    /// The most rows one request may carry (more: 413).
    pub max_rows: usize,
    /// The largest request body (more: 413).
    pub max_body_bytes: usize,
    /// How long a request may wait for its answer (longer: 504).
    pub request_timeout: Duration,
    pub batch: BatchPolicy,
    pub device: Device,
    /// The most bytes the served models' weights may take at once (None: all stay loaded).
    pub max_memory: Option<u64>,
    pub limits: Limits,
}

/// How the server sheds slow or too many clients, and how long it waits when told to stop.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A request's head (line and headers) must arrive within this, counted from when the
    /// connection is ready for it (an idle keep-alive connection is closed after it too).
    pub header_timeout: Duration,
    /// A request's body must arrive within this (else 408).
    pub body_timeout: Duration,
    /// Connections held at once; one more is answered 503 and closed.
    pub max_connections: usize,
    /// After SIGTERM, in-flight requests get this long to finish; then the server exits anyway.
    pub shutdown_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(60),
            max_connections: 256,
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

/// What the handlers share.
struct App {
    metadata: ServedMetadata,
    experts: BTreeMap<usize, Batcher>,
    router: Option<Batcher>,
    token: Option<String>,
    max_rows: usize,
    max_body_bytes: usize,
    timeout: Duration,
    body_timeout: Duration,
    metrics: Metrics,
}

/// A request's rows on `device`: `x_t` flattened to `[N, X]`, `t` `[N]`, `y` `[N]`.
fn tensors(r: &Request, device: &Device) -> (Tensor<2>, Tensor<1>, Option<Tensor<1, Int>>) {
    let n = r.rows();
    let x = HostTensor::new(vec![n, r.x_t.data.len() / n], r.x_t.data.clone()).to_tensor::<2>(device);
    let t = HostTensor::new(vec![n], r.t.clone()).to_tensor::<1>(device);
    let y =
        r.y.as_ref()
            .map(|y| Tensor::<1, Int>::from_data(TensorData::new(y.clone(), [n]), device));
    (x, t, y)
}

struct ExpertModel(Box<dyn VelocityField<2>>, Device);

impl Forward for ExpertModel {
    fn forward(&self, r: &Request) -> HostTensor {
        let (x, t, y) = tensors(r, &self.1);
        let v = HostTensor::from_tensor(self.0.velocity(x, t, y));
        HostTensor::new(r.x_t.shape.clone(), v.data)
    }
}

struct RouterModel(RouterNet, Device);

impl Forward for RouterModel {
    fn forward(&self, r: &Request) -> HostTensor {
        let (x, t, y) = tensors(r, &self.1);
        let c = r.c.as_ref().map(|c| c.to_tensor::<2>(&self.1));
        HostTensor::from_tensor(self.0.logits(x, t, y, c))
    }
}

/// Whether `addr` is reachable only from this machine.
fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}

/// Build the served models and the metadata (every checkpoint verified as it loads).
fn build(o: &ServeOptions, metrics: &Metrics) -> anyhow::Result<App> {
    if o.token.is_none() && !is_loopback(&o.listen) && !o.allow_unauthenticated {
        bail!(
            "{}: not a loopback address, and no token: set DDM_SERVE_TOKEN or --token-file (or pass --allow-unauthenticated to serve anyone who can connect)",
            o.listen
        );
    }
    let reg = Registry::open(&o.registry)?;
    let local: Vec<usize> = reg
        .index
        .experts
        .iter()
        .filter(|(_, e)| e.remote.is_none())
        .map(|(&k, _)| k)
        .collect();
    let experts = match &o.experts {
        Some(list) => {
            for k in list {
                match reg.index.experts.get(k) {
                    None => bail!("{}: no expert registered for cluster {k}", o.registry.display()),
                    Some(e) if e.remote.is_some() => bail!(
                        "{}: expert {k} is itself served elsewhere ({})",
                        o.registry.display(),
                        e.source
                    ),
                    Some(_) => {}
                }
            }
            list.clone()
        }
        None if o.router => vec![],
        None => local,
    };
    let serve_router = o.router || (o.experts.is_none() && reg.index.router.is_some());
    if experts.is_empty() && !serve_router {
        bail!(
            "{}: nothing to serve (no local experts, no router)",
            o.registry.display()
        );
    }
    let served = |claim: Claim, e: &ddm_ensemble::registry::Entry| -> anyhow::Result<ServedCheckpoint> {
        let (_, ckpt) = reg.verified_checkpoint(claim)?;
        Ok(ServedCheckpoint {
            sha256: e.sha256.clone(),
            bytes: e.bytes,
            meta: ckpt.meta,
        })
    };
    let mut metadata = ServedMetadata {
        ddm_version: env!("CARGO_PKG_VERSION").into(),
        partition: reg.index.partition.clone(),
        k: reg.index.k,
        data: reg.index.data.clone(),
        experts: BTreeMap::new(),
        router: None,
        max_rows: o.max_rows,
    };
    let shared = o.max_memory.map(|cap| MemoryBudget::new(cap, metrics.clone()));
    let budget = |what: &str, bytes: u64| -> anyhow::Result<Option<(Arc<MemoryBudget>, u64)>> {
        match &shared {
            Some(b) if bytes > b.cap() => bail!(
                "{what} takes {:.1} MiB, more than --max-memory {:.1} MiB",
                bytes as f64 / (1 << 20) as f64,
                b.cap() as f64 / (1 << 20) as f64
            ),
            Some(b) => Ok(Some((b.clone(), bytes))),
            None => Ok(None),
        }
    };
    let mut batchers = BTreeMap::new();
    for &k in &experts {
        metadata
            .experts
            .insert(k, served(Claim::Expert(k), &reg.index.experts[&k])?);
        let (dir, device) = (o.registry.clone(), o.device.clone());
        let load = move || -> anyhow::Result<ExpertModel> {
            let reg = Registry::open(&dir)?;
            Ok(ExpertModel(reg.expert(k, &device)?, device.clone()))
        };
        batchers.insert(
            k,
            Batcher::start(
                format!("expert {k}"),
                load,
                o.batch,
                metrics.clone(),
                budget(&format!("expert {k}"), reg.index.experts[&k].bytes)?,
            )?,
        );
        tracing::info!("serving expert {k}");
    }
    let router = if serve_router {
        let e = reg
            .index
            .router
            .as_ref()
            .with_context(|| format!("{}: no router registered", o.registry.display()))?;
        metadata.router = Some(served(Claim::Router, e)?);
        let (dir, device) = (o.registry.clone(), o.device.clone());
        let load = move || -> anyhow::Result<RouterModel> {
            let reg = Registry::open(&dir)?;
            Ok(RouterModel(reg.router(&device)?, device.clone()))
        };
        tracing::info!("serving the router");
        let bytes = e.bytes;
        Some(Batcher::start(
            "router".into(),
            load,
            o.batch,
            metrics.clone(),
            budget("the router", bytes)?,
        )?)
    } else {
        None
    };
    Ok(App {
        metadata,
        experts: batchers,
        router,
        token: o.token.clone(),
        max_rows: o.max_rows,
        max_body_bytes: o.max_body_bytes,
        timeout: o.request_timeout,
        body_timeout: o.limits.body_timeout,
        metrics: metrics.clone(),
    })
}

/// Serve until SIGTERM / Ctrl-C. `on_ready` is told the bound address (with `--listen
/// 127.0.0.1:0`, the port the system chose) once requests are accepted.
pub fn serve(o: ServeOptions, on_ready: impl FnOnce(SocketAddr)) -> anyhow::Result<()> {
    let metrics = Metrics::new();
    let app = Arc::new(build(&o, &metrics)?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(o.listen)
            .await
            .with_context(|| format!("listening on {}", o.listen))?;
        let addr = listener.local_addr()?;
        let routes = Router::new()
            .route("/v1/metadata", get(metadata))
            .route("/metrics", get(metrics_text))
            .route("/v1/experts/{k}/velocity", post(velocity))
            .route("/v1/router/logits", post(router_logits))
            .route_layer(middleware::from_fn_with_state(app.clone(), read_body))
            .route_layer(middleware::from_fn_with_state(app.clone(), authorize))
            .route("/health", get(|| async { "ok" }))
            .layer(middleware::from_fn_with_state(app.clone(), track))
            .layer(DefaultBodyLimit::max(o.max_body_bytes))
            .with_state(app.clone());
        on_ready(addr);
        accept_until_stopped(listener, routes, &app, o.limits).await;
        anyhow::Ok(())
    })?;
    drop(app); // closes the queues; the workers finish what they hold
    Ok(())
}

/// Accept connections until SIGTERM / Ctrl-C, each served by hyper with the header timeout, at most
/// `max_connections` at once; then let in-flight requests finish for at most the shutdown timeout.
async fn accept_until_stopped(
    listener: tokio::net::TcpListener,
    routes: Router,
    app: &Arc<App>,
    limits: Limits,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: back off instead of spinning.
                    tracing::warn!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            app.metrics.connection_refused();
            tokio::spawn(refuse(stream));
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(routes.clone());
        let connection = graceful.watch(http.serve_connection(hyper_util::rt::TokioIo::new(stream), service));
        let metrics = app.metrics.clone();
        metrics.connection_opened();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("connection closed: {e}");
            }
            metrics.connection_closed();
            drop(slot);
        });
    }
    drop(listener);
    match tokio::time::timeout(limits.shutdown_timeout, graceful.shutdown()).await {
        Ok(()) => tracing::info!("stopped: every in-flight request was answered"),
        Err(_) => tracing::warn!(
            "stopped after {:?} with connections still open (their requests were not answered)",
            limits.shutdown_timeout
        ),
    }
}

/// Answer a connection over the cap with 503 and close it (without reading its request).
async fn refuse(mut stream: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    let body = "too many connections; retry later\n";
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(answer.as_bytes())).await;
    let _ = stream.shutdown().await;
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {},
        _ = tokio::signal::ctrl_c() => {},
    }
    tracing::info!("shutting down: finishing in-flight requests");
}

fn plain(status: StatusCode, message: impl Into<String>) -> Response {
    let mut m = message.into();
    m.push('\n');
    (status, m).into_response()
}

/// Constant-time comparison (the token must not leak through timing).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn authorize(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    req: HttpRequest,
    next: Next,
) -> Response {
    if let Some(token) = &app.token {
        // The scheme is case-insensitive (RFC 9110); the token is compared exactly.
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim_start().split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token);
        if !given.is_some_and(|g| same(g.trim().as_bytes(), token.as_bytes())) {
            let mut r = plain(
                StatusCode::UNAUTHORIZED,
                "a valid bearer token is required (Authorization: Bearer TOKEN)",
            );
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            return r;
        }
    }
    next.run(req).await
}

/// Read a request's body before its handler runs: refused with 413 when its declared length is
/// over the limit (before reading it) or when it grows past the limit, and with 408 when it does
/// not arrive within the body timeout. Either way the connection closes (the body was not read to
/// its end).
async fn read_body(State(app): State<Arc<App>>, req: HttpRequest, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_large = |len: String| {
        plain(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "a body of {len} bytes; this server takes at most {}",
                app.max_body_bytes
            ),
        )
    };
    if let Some(len) = declared
        && len > app.max_body_bytes as u64
    {
        return too_large(len.to_string());
    }
    let limited = http_body_util::Limited::new(body, app.max_body_bytes);
    let bytes = match tokio::time::timeout(app.body_timeout, http_body_util::BodyExt::collect(limited)).await
    {
        Err(_) => {
            return plain(
                StatusCode::REQUEST_TIMEOUT,
                format!("the request body did not arrive within {:?}", app.body_timeout),
            );
        }
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return too_large("more than that".into());
        }
        Ok(Err(e)) => return plain(StatusCode::BAD_REQUEST, format!("reading the request body: {e}")),
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    next.run(HttpRequest::from_parts(parts, axum::body::Body::from(bytes)))
        .await
}

/// Count every request and time it, by route template and status.
async fn track(State(app): State<Arc<App>>, req: HttpRequest, next: Next) -> Response {
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let start = Instant::now();
    let mut r = next.run(req).await;
    if matches!(
        r.status(),
        StatusCode::PAYLOAD_TOO_LARGE | StatusCode::REQUEST_TIMEOUT
    ) {
        // The body was not read to its end: the connection cannot carry another request, and the
        // client must know not to reuse it.
        r.headers_mut()
            .insert(header::CONNECTION, header::HeaderValue::from_static("close"));
    }
    app.metrics
        .request(&endpoint, r.status().as_u16(), start.elapsed().as_secs_f64());
    r
}

async fn metadata(State(app): State<Arc<App>>) -> Response {
    match serde_json::to_string_pretty(&app.metadata) {
        Ok(s) => ([(header::CONTENT_TYPE, "application/json")], s).into_response(),
        Err(e) => plain(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn metrics_text(State(app): State<Arc<App>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.metrics.text(),
    )
        .into_response()
}

/// Check class ids against a model's classes (`null`: whether id == classes is allowed).
fn check_classes(y: &Option<Vec<i64>>, classes: usize, null: bool, what: &str) -> Result<(), String> {
    let Some(y) = y else { return Ok(()) };
    if classes == 0 {
        return Err(format!("{what} is not class-conditional: send no y"));
    }
    let top = if null { classes } else { classes - 1 };
    match y.iter().find(|&&c| c < 0 || c as usize > top) {
        Some(c) => Err(format!("y holds class {c}; {what} knows 0..={top}")),
        None => Ok(()),
    }
}

/// Queue a checked request on a model and wait for its answer.
async fn run(app: &App, batcher: &Batcher, request: Request, name: &str) -> Response {
    let answer = match batcher.submit(request) {
        Ok(a) => a,
        Err(_) => {
            app.metrics.queue_full();
            return plain(StatusCode::SERVICE_UNAVAILABLE, "the queue is full; retry later");
        }
    };
    match tokio::time::timeout(app.timeout, answer).await {
        Err(_) => plain(
            StatusCode::GATEWAY_TIMEOUT,
            format!("no answer within {:?}", app.timeout),
        ),
        Ok(Err(_)) => plain(StatusCode::INTERNAL_SERVER_ERROR, "the worker stopped"),
        Ok(Ok(Err(e))) => plain(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
        Ok(Ok(Ok(v))) => match response_bytes(name, &v) {
            Ok(b) => ([(header::CONTENT_TYPE, "application/octet-stream")], b).into_response(),
            Err(e) => plain(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
        },
    }
}

/// Parse a body and check its rows: the status (400 or 413) and reason otherwise.
fn parse(app: &App, body: Bytes) -> Result<Request, (StatusCode, String)> {
    let r = Request::from_bytes(body.to_vec(), &app.metadata.data.shape)
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("{e:#}")))?;
    if r.rows() > app.max_rows {
        return Err((
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{} rows; this server takes at most {} per request",
                r.rows(),
                app.max_rows
            ),
        ));
    }
    Ok(r)
}

async fn velocity(State(app): State<Arc<App>>, Path(k): Path<String>, body: Bytes) -> Response {
    let Some((k, batcher)) = k
        .parse::<usize>()
        .ok()
        .and_then(|k| app.experts.get(&k).map(|b| (k, b)))
    else {
        return plain(
            StatusCode::NOT_FOUND,
            format!(
                "no expert {k} here (this server serves {:?})",
                app.metadata.experts.keys().collect::<Vec<_>>()
            ),
        );
    };
    let mut r = match parse(&app, body) {
        Ok(r) => r,
        Err((status, reason)) => return plain(status, reason),
    };
    let model = &app.metadata.experts[&k].meta.model;
    let (classes, null) = (model.num_classes(), model.has_null_class());
    if let Err(m) = check_classes(&r.y, classes, null, &format!("expert {k}")) {
        return plain(StatusCode::BAD_REQUEST, m);
    }
    if r.c.is_some() {
        return plain(
            StatusCode::BAD_REQUEST,
            "experts read no conditioning vectors: send no c",
        );
    }
    if classes > 0 && r.y.is_none() {
        if !null {
            return plain(
                StatusCode::BAD_REQUEST,
                format!("expert {k} is class-conditional without a null class: send y"),
            );
        }
        r.y = Some(vec![classes as i64; r.rows()]); // unconditional: the null class
    }
    run(&app, batcher, r, "v").await
}

async fn router_logits(State(app): State<Arc<App>>, body: Bytes) -> Response {
    let (Some(batcher), Some(served)) = (&app.router, &app.metadata.router) else {
        return plain(StatusCode::NOT_FOUND, "this server does not serve the router");
    };
    let r = match parse(&app, body) {
        Ok(r) => r,
        Err((status, reason)) => return plain(status, reason),
    };
    let (classes, null) = (
        served.meta.model.num_classes(),
        served.meta.model.has_null_class(),
    );
    if let Err(m) = check_classes(&r.y, classes, null, "the router") {
        return plain(StatusCode::BAD_REQUEST, m);
    }
    match (served.meta.condition_dim, &r.c) {
        (None, Some(_)) => {
            return plain(
                StatusCode::BAD_REQUEST,
                "the router reads no conditioning vectors",
            );
        }
        (Some(d), Some(c)) if c.shape[1] != d => {
            return plain(
                StatusCode::BAD_REQUEST,
                format!("c has {} columns; the router reads {d}", c.shape[1]),
            );
        }
        _ => {}
    }
    run(&app, batcher, r, "logits").await
}
