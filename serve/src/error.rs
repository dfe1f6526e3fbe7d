//! Everything a request can end in besides an answer, as a type: each kind has its HTTP status,
//! so a handler returns the error and the status follows from what went wrong.

use std::time::Duration;

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

/// Why a request was not answered with a tensor.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// No token, or the wrong one (401).
    #[error("a valid bearer token is required (Authorization: Bearer TOKEN)")]
    Unauthorized,
    /// A malformed request: its tensors, classes, condition (400).
    #[error("{0}")]
    BadRequest(String),
    /// An expert (or the router) this server does not serve (404).
    #[error("{0}")]
    NotFound(String),
    /// A body or a row count over the server's limits (413).
    #[error("{0}")]
    TooLarge(String),
    /// A body that did not arrive in time (408).
    #[error("the request body did not arrive within {0:?}")]
    BodyTimeout(Duration),
    /// The model's queue is full (503: retry later).
    #[error("the queue is full; retry later")]
    QueueFull,
    /// The model did not answer in time (504).
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The model failed on this request (500): it could not be loaded, or answered NaN.
    #[error("the model failed: {0}")]
    Model(String),
    /// The model's worker is gone (500).
    #[error("the worker stopped")]
    WorkerGone,
}

impl ServeError {
    pub fn status(&self) -> StatusCode {
        match self {
            ServeError::Unauthorized => StatusCode::UNAUTHORIZED,
            ServeError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ServeError::NotFound(_) => StatusCode::NOT_FOUND,
            ServeError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ServeError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ServeError::QueueFull => StatusCode::SERVICE_UNAVAILABLE,
            ServeError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ServeError::Model(_) | ServeError::WorkerGone => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ServeError {
    /// The status and the reason as plain text; 401 says which scheme it wants.
    fn into_response(self) -> Response {
        let mut r = (self.status(), format!("{self}\n")).into_response();
        if matches!(self, ServeError::Unauthorized) {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_its_status() {
        for (e, status) in [
            (ServeError::Unauthorized, 401),
            (ServeError::BadRequest("x".into()), 400),
            (ServeError::NotFound("x".into()), 404),
            (ServeError::TooLarge("x".into()), 413),
            (ServeError::BodyTimeout(Duration::from_secs(1)), 408),
            (ServeError::QueueFull, 503),
            (ServeError::Timeout(Duration::from_secs(1)), 504),
            (ServeError::Model("x".into()), 500),
            (ServeError::WorkerGone, 500),
        ] {
            let r = e.into_response();
            assert_eq!(r.status().as_u16(), status);
        }
        let r = ServeError::Unauthorized.into_response();
        assert_eq!(r.headers()[header::WWW_AUTHENTICATE], "Bearer");
    }
}
