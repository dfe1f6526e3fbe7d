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

mod app;
pub mod auth;
pub mod batcher;
pub mod error;
mod handlers;
pub mod metrics;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::middleware;
use axum::routing::{get, post};
use ddm_core::burn::prelude::*;

use batcher::BatchPolicy;
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
    /// The precision the served experts compute in (their weights cast when loaded).
    pub precision: ddm_core::precision::Precision,
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

/// Serve until SIGTERM / Ctrl-C. `on_ready` is told the bound address (with `--listen
/// 127.0.0.1:0`, the port the system chose) once requests are accepted.
pub fn serve(o: ServeOptions, on_ready: impl FnOnce(SocketAddr)) -> anyhow::Result<()> {
    o.precision.check(&o.device)?;
    let metrics = Metrics::new();
    let app = Arc::new(app::build(&o, &metrics)?);
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
            .route("/v1/metadata", get(handlers::metadata))
            .route("/metrics", get(handlers::metrics_text))
            .route("/v1/experts/{k}/velocity", post(handlers::velocity))
            .route("/v1/router/logits", post(handlers::router_logits))
            .route_layer(middleware::from_fn_with_state(app.clone(), handlers::read_body))
            .route_layer(middleware::from_fn_with_state(app.clone(), handlers::authorize))
            .route("/health", get(|| async { "ok" }))
            .layer(middleware::from_fn_with_state(app.clone(), handlers::track))
            .layer(DefaultBodyLimit::max(o.max_body_bytes))
            .with_state(app.clone());
        on_ready(addr);
        accept_until_stopped(listener, routes, &app.metrics, o.limits).await;
        anyhow::Ok(())
    })?;
    drop(app); // closes the queues; the workers finish what they hold
    Ok(())
}

/// Accept connections until SIGTERM / Ctrl-C, each served by hyper with the header timeout, at most
/// `max_connections` at once; then let in-flight requests finish for at most the shutdown timeout.
pub async fn accept_until_stopped(
    listener: tokio::net::TcpListener,
    routes: Router,
    metrics: &Metrics,
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
            metrics.connection_refused();
            tokio::spawn(refuse(stream));
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(routes.clone());
        let connection = graceful.watch(http.serve_connection(hyper_util::rt::TokioIo::new(stream), service));
        let metrics = metrics.clone();
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
