//! The request handlers and the middleware before them: the token (401), the body (413 before it
//! arrives when its declared length is over the limit, 408 when it does not arrive in time), the
//! request's tensors and condition (400), the rows (413), then the model's queue (503) and answer
//! (504 when late, 500 when it failed). Every refusal is a [`ServeError`], whose kind is its status.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{MatchedPath, Path, Request as HttpRequest, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use ddm_ensemble::remote::{Request, response_bytes};

use crate::app::App;
use crate::auth::{bearer, same};
use crate::batcher::Batcher;
use crate::error::ServeError;

/// With a token set, a request without it (or with another) is refused with 401. The scheme is
/// case-insensitive (RFC 9110); the token is compared exactly.
pub(crate) async fn authorize(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    req: HttpRequest,
    next: Next,
) -> Response {
    if let Some(token) = &app.token
        && !bearer(&headers).is_some_and(|g| same(g.as_bytes(), token.as_bytes()))
    {
        return ServeError::Unauthorized.into_response();
    }
    next.run(req).await
}

/// Read a request's body before its handler runs: refused with 413 when its declared length is
/// over the limit (before reading it) or when it grows past the limit, and with 408 when it does
/// not arrive within the body timeout. Either way the connection closes (the body was not read to
/// its end).
pub(crate) async fn read_body(State(app): State<Arc<App>>, req: HttpRequest, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_large = |len: String| {
        ServeError::TooLarge(format!(
            "a body of {len} bytes; this server takes at most {}",
            app.max_body_bytes
        ))
    };
    if let Some(len) = declared
        && len > app.max_body_bytes as u64
    {
        return too_large(len.to_string()).into_response();
    }
    let limited = http_body_util::Limited::new(body, app.max_body_bytes);
    let read = tokio::time::timeout(app.body_timeout, http_body_util::BodyExt::collect(limited)).await;
    let bytes = match read {
        Err(_) => return ServeError::BodyTimeout(app.body_timeout).into_response(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return too_large("more than that".into()).into_response();
        }
        Ok(Err(e)) => {
            return ServeError::BadRequest(format!("reading the request body: {e}")).into_response();
        }
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    next.run(HttpRequest::from_parts(parts, axum::body::Body::from(bytes)))
        .await
}

/// Count every request and time it, by route template and status.
pub(crate) async fn track(State(app): State<Arc<App>>, req: HttpRequest, next: Next) -> Response {
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

pub(crate) async fn metadata(State(app): State<Arc<App>>) -> Response {
    match serde_json::to_string_pretty(&app.metadata) {
        Ok(s) => ([(header::CONTENT_TYPE, "application/json")], s).into_response(),
        Err(e) => ServeError::Model(e.to_string()).into_response(),
    }
}

pub(crate) async fn metrics_text(State(app): State<Arc<App>>) -> Response {
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
fn check_classes(y: &Option<Vec<i64>>, classes: usize, null: bool, what: &str) -> Result<(), ServeError> {
    let Some(y) = y else { return Ok(()) };
    if classes == 0 {
        return Err(ServeError::BadRequest(format!(
            "{what} is not class-conditional: send no y"
        )));
    }
    let top = if null { classes } else { classes - 1 };
    match y.iter().find(|&&c| c < 0 || c as usize > top) {
        Some(c) => Err(ServeError::BadRequest(format!(
            "y holds class {c}; {what} knows 0..={top}"
        ))),
        None => Ok(()),
    }
}

/// Queue a checked request on a model and wait for its answer, the tensor `name`.
async fn run(app: &App, batcher: &Batcher, request: Request, name: &str) -> Result<Response, ServeError> {
    let answer = batcher.submit(request).map_err(|_| {
        app.metrics.queue_full();
        ServeError::QueueFull
    })?;
    let v = match tokio::time::timeout(app.timeout, answer).await {
        Err(_) => return Err(ServeError::Timeout(app.timeout)),
        Ok(Err(_)) => return Err(ServeError::WorkerGone),
        Ok(Ok(answer)) => answer?,
    };
    let bytes = response_bytes(name, &v).map_err(|e| ServeError::Model(format!("{e:#}")))?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

/// Parse a body and check its rows.
fn parse(app: &App, body: Bytes) -> Result<Request, ServeError> {
    let r = Request::from_bytes(body.to_vec(), &app.metadata.data.shape)
        .map_err(|e| ServeError::BadRequest(format!("{e:#}")))?;
    if r.rows() > app.max_rows {
        return Err(ServeError::TooLarge(format!(
            "{} rows; this server takes at most {} per request",
            r.rows(),
            app.max_rows
        )));
    }
    Ok(r)
}

/// `POST /v1/experts/{k}/velocity`.
pub(crate) async fn velocity(
    State(app): State<Arc<App>>,
    Path(k): Path<String>,
    body: Bytes,
) -> Result<Response, ServeError> {
    let Some((k, batcher)) = k
        .parse::<usize>()
        .ok()
        .and_then(|k| app.experts.get(&k).map(|b| (k, b)))
    else {
        return Err(ServeError::NotFound(format!(
            "no expert {k} here (this server serves {:?})",
            app.metadata.experts.keys().collect::<Vec<_>>()
        )));
    };
    let mut r = parse(&app, body)?;
    let model = &app.metadata.experts[&k].meta.model;
    let (classes, null) = (model.num_classes(), model.has_null_class());
    check_classes(&r.y, classes, null, &format!("expert {k}"))?;
    match (model.condition_dim(), &r.c) {
        (0, Some(_)) => {
            return Err(ServeError::BadRequest(format!(
                "expert {k} reads no conditioning vectors: send no c"
            )));
        }
        (d, Some(c)) if c.shape[1] != d => {
            return Err(ServeError::BadRequest(format!(
                "c has {} columns; expert {k} reads vectors of width {d}",
                c.shape[1]
            )));
        }
        _ => {} // no vectors: the zero vector, the null condition
    }
    match (model.token_dim(), &r.tokens) {
        (0, Some(_)) => {
            return Err(ServeError::BadRequest(format!(
                "expert {k} reads no token sequences: send no c_tokens"
            )));
        }
        (d, Some((e, _))) if e.shape[2] != d => {
            return Err(ServeError::BadRequest(format!(
                "c_tokens has width {}; expert {k} reads tokens of width {d}",
                e.shape[2]
            )));
        }
        _ => {} // no tokens: the null caption
    }
    if classes > 0 && r.y.is_none() {
        if !null {
            return Err(ServeError::BadRequest(format!(
                "expert {k} is class-conditional without a null class: send y"
            )));
        }
        r.y = Some(vec![classes as i64; r.rows()]); // unconditional: the null class
    }
    run(&app, batcher, r, "v").await
}

/// `POST /v1/router/logits`.
pub(crate) async fn router_logits(State(app): State<Arc<App>>, body: Bytes) -> Result<Response, ServeError> {
    let (Some(batcher), Some(served)) = (&app.router, &app.metadata.router) else {
        return Err(ServeError::NotFound(
            "this server does not serve the router".into(),
        ));
    };
    let r = parse(&app, body)?;
    let model = &served.meta.model;
    check_classes(&r.y, model.num_classes(), model.has_null_class(), "the router")?;
    match (served.meta.condition_dim, &r.c) {
        (None, Some(_)) => {
            return Err(ServeError::BadRequest(
                "the router reads no conditioning vectors".into(),
            ));
        }
        (Some(d), Some(c)) if c.shape[1] != d => {
            return Err(ServeError::BadRequest(format!(
                "c has {} columns; the router reads {d}",
                c.shape[1]
            )));
        }
        _ => {} // no vectors: the zero vector, the null condition
    }
    match (served.meta.condition_token_dim, &r.tokens) {
        (None, Some(_)) => Err(ServeError::BadRequest(
            "the router reads no token sequences: send no c_tokens".into(),
        )),
        (Some(d), Some((e, _))) if e.shape[2] != d => Err(ServeError::BadRequest(format!(
            "c_tokens has width {}; the router reads tokens of width {d}",
            e.shape[2]
        ))),
        _ => run(&app, batcher, r, "logits").await, // no tokens: the null caption
    }
}
