//! Experts served over the network (`ddm serve`): the wire format both sides share and the
//! sampler's client.
//!
//! A server exposes, under its base URL:
//!
//! | endpoint | in | out |
//! |---|---|---|
//! | `GET /health` | | `ok` (no token needed) |
//! | `GET /v1/metadata` | | JSON [`ServedMetadata`] |
//! | `GET /metrics` | | Prometheus text |
//! | `POST /v1/experts/{k}/velocity` | safetensors `x_t` F32 `[N, ...]`, `t` F32 `[N]`, `y` I64 `[N]`?, `c` F32 `[N, Dc]`?, `c_tokens` F32 `[N, L, Dt]` + `c_mask` F32 `[N, L]`? | `v` F32, the shape of `x_t` |
//! | `POST /v1/router/logits` | `x_t`, `t`, `y`?, `c` F32 `[N, Dc]`? | `logits` F32 `[N, K]` |
//!
//! Tensors travel as safetensors bytes, the format checkpoints already use. When the server has a
//! token, requests carry `Authorization: Bearer TOKEN`; clients read it from `DDM_SERVE_TOKEN`.
//! An expert's velocity is the expert's own (epsilon experts converted by the server); guidance is
//! applied by the client, as it is for a local expert, so a served expert is the same field.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use ddm_core::checkpoint::{CheckpointMeta, DataSpec};
use ddm_core::host::{HostIntTensor, HostTensor, TensorFile, to_safetensors_bytes};
use serde::{Deserialize, Serialize};

/// The environment variable holding the bearer token (server and clients).
pub use ddm_core::env::SERVE_TOKEN as TOKEN_ENV;

/// One checkpoint a server holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServedCheckpoint {
    /// sha256 of the checkpoint file (the registry's blob name).
    pub sha256: String,
    pub bytes: u64,
    pub meta: CheckpointMeta,
}

/// `GET /v1/metadata`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServedMetadata {
    pub ddm_version: String,
    /// The partition fingerprint of the registry served from.
    pub partition: String,
    pub k: usize,
    pub data: DataSpec,
    /// Served experts, by cluster.
    pub experts: BTreeMap<usize, ServedCheckpoint>,
    pub router: Option<ServedCheckpoint>,
    /// The most rows one request may carry.
    pub max_rows: usize,
}

/// A request's tensors: `x_t` `[N, ...]`, `t` `[N]`, optional class ids `y` `[N]`,
/// conditioning vectors `c` `[N, Dc]` and token sequences (`c_tokens` `[N, L, Dt]`, `c_mask`
/// `[N, L]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub x_t: HostTensor,
    pub t: Vec<f32>,
    pub y: Option<Vec<i64>>,
    pub c: Option<HostTensor>,
    pub tokens: Option<(HostTensor, HostTensor)>,
}

impl Request {
    pub fn rows(&self) -> usize {
        self.t.len()
    }

    pub fn to_bytes(&self) -> anyhow::Result<Vec<u8>> {
        let mut f = BTreeMap::from([
            ("x_t".to_string(), self.x_t.clone()),
            (
                "t".to_string(),
                HostTensor::new(vec![self.t.len()], self.t.clone()),
            ),
        ]);
        if let Some(c) = &self.c {
            f.insert("c".into(), c.clone());
        }
        if let Some((e, m)) = &self.tokens {
            f.insert("c_tokens".into(), e.clone());
            f.insert("c_mask".into(), m.clone());
        }
        let mut i = BTreeMap::new();
        if let Some(y) = &self.y {
            i.insert(
                "y".to_string(),
                HostIntTensor {
                    shape: vec![y.len()],
                    data: y.clone(),
                },
            );
        }
        Ok(to_safetensors_bytes(&f, &i, None)?)
    }

    /// Parse and check a request body: `x_t` is `[N, ...]` with `N >= 1` rows of `row_shape` (or
    /// `[N, X]`, the rows flattened, as the sampler holds them),
    /// `t` is `[N]` in [0, 1], `y` and `c` (if present) have N rows, every value is finite.
    /// The error says what is wrong (the server answers it with 400).
    pub fn from_bytes(body: Vec<u8>, row_shape: &[usize]) -> anyhow::Result<Self> {
        let f = TensorFile::from_bytes(Path::new("request body"), body)?;
        let x_t = f.f32("x_t")?;
        let t = f.f32("t")?;
        let Some(&n) = x_t.shape.first() else {
            bail!("x_t is a scalar; expected [N, {row_shape:?}]");
        };
        let width: usize = row_shape.iter().product();
        let flat = x_t.shape.len() == 2 && x_t.shape[1] == width;
        if !flat && x_t.shape[1..] != *row_shape {
            bail!(
                "x_t has shape {:?}; this server's data is [N, {}] (or flattened, [N, {width}])",
                x_t.shape,
                row_shape
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        if n == 0 {
            bail!("x_t has no rows");
        }
        if t.shape != [n] {
            bail!(
                "t has shape {:?}; expected [{n}] (one time per row of x_t)",
                t.shape
            );
        }
        if let Some(bad) = t.data.iter().find(|v| !(0.0..=1.0).contains(*v)) {
            bail!("t holds {bad}; flow times lie in [0, 1]");
        }
        if x_t.data.iter().any(|v| !v.is_finite()) {
            bail!("x_t holds a non-finite value");
        }
        let y = match f.contains("y") {
            false => None,
            true => {
                let y = f.i64("y")?;
                if y.shape != [n] {
                    bail!("y has shape {:?}; expected [{n}]", y.shape);
                }
                Some(y.data)
            }
        };
        let c = match f.contains("c") {
            false => None,
            true => {
                let c = f.f32("c")?;
                if c.shape.len() != 2 || c.shape[0] != n {
                    bail!("c has shape {:?}; expected [{n}, Dc]", c.shape);
                }
                if c.data.iter().any(|v| !v.is_finite()) {
                    bail!("c holds a non-finite value");
                }
                Some(c)
            }
        };
        let tokens = match f.contains("c_tokens") {
            false => None,
            true => Some(tokens_of(&f, n)?),
        };
        Ok(Self {
            x_t,
            t: t.data,
            y,
            c,
            tokens,
        })
    }
}

/// A request's `c_tokens` `[n, L, Dt]` and `c_mask` `[n, L]`: finite, the mask of zeros and ones.
fn tokens_of(f: &TensorFile, n: usize) -> anyhow::Result<(HostTensor, HostTensor)> {
    let (e, m) = (f.f32("c_tokens")?, f.f32("c_mask")?);
    if e.shape.len() != 3 || e.shape[0] != n || e.shape[1] == 0 || e.shape[2] == 0 {
        bail!("c_tokens has shape {:?}; expected [{n}, L, Dt]", e.shape);
    }
    if m.shape != [n, e.shape[1]] {
        bail!("c_mask has shape {:?}; expected [{n}, {}]", m.shape, e.shape[1]);
    }
    if e.data.iter().any(|v| !v.is_finite()) {
        bail!("c_tokens holds a non-finite value");
    }
    if let Some(v) = m.data.iter().find(|v| **v != 0.0 && **v != 1.0) {
        bail!("c_mask holds {v}; expected 1 (a token) or 0 (padding)");
    }
    Ok((e, m))
}

/// A response body: one F32 tensor named `name`.
pub fn response_bytes(name: &str, t: &HostTensor) -> anyhow::Result<Vec<u8>> {
    Ok(to_safetensors_bytes(
        &BTreeMap::from([(name.to_string(), t.clone())]),
        &BTreeMap::new(),
        None,
    )?)
}

/// The bearer token clients send: `DDM_SERVE_TOKEN`, if set and not empty.
pub fn token_from_env() -> Option<String> {
    ddm_core::env::serve_token()
}

/// An HTTP error from a server, with its status (4xx are not retried).
#[derive(Debug)]
pub struct HttpError {
    pub status: u16,
    pub message: String,
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HTTP {}: {}", self.status, self.message)
    }
}

impl std::error::Error for HttpError {}

/// The largest metadata document a client reads (`GET /v1/metadata`).
const METADATA_LIMIT: u64 = 16 << 20;

/// An answer's body, refused (naming `what`) if it is longer than `limit` bytes.
fn read_bounded(resp: reqwest::blocking::Response, limit: u64, what: &str) -> anyhow::Result<Vec<u8>> {
    use std::io::Read;
    if let Some(len) = resp.content_length()
        && len > limit
    {
        bail!("{what}: the answer declares {len} bytes, more than the {limit} expected");
    }
    let mut body = vec![];
    resp.take(limit + 1)
        .read_to_end(&mut body)
        .with_context(|| format!("{what}: reading the answer"))?;
    if body.len() as u64 > limit {
        bail!("{what}: the answer is longer than the {limit} bytes expected");
    }
    Ok(body)
}

/// A client of one server: blocking, retrying transient failures (connection refused or reset,
/// timeouts, 502/503/504) with exponential backoff.
#[derive(Clone)]
pub struct Client {
    /// The server's base URL, without a trailing slash.
    pub base: String,
    http: reqwest::blocking::Client,
    token: Option<String>,
    /// Attempts after the first; each waits twice as long as the one before, from `backoff`.
    pub retries: u32,
    pub backoff: Duration,
}

impl Client {
    pub fn new(base: &str) -> anyhow::Result<Self> {
        Self::with_timeout(base, Duration::from_secs(600))
    }

    /// A client whose every request must be answered within `timeout`.
    pub fn with_timeout(base: &str, timeout: Duration) -> anyhow::Result<Self> {
        let base = base.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            bail!("{base}: a served expert's URL starts with http:// or https://");
        }
        let http = ddm_net::client_builder()?
            .timeout(timeout)
            .build()
            .context("building the HTTP client")?;
        Ok(Self {
            base,
            http,
            token: token_from_env(),
            retries: 3,
            backoff: Duration::from_millis(200),
        })
    }

    /// Send the request `req` builds (again on a transient failure) and read at most `limit`
    /// bytes of a successful answer (a larger one is an error, not read to its end).
    fn send(
        &self,
        what: &str,
        limit: u64,
        req: impl Fn() -> reqwest::blocking::RequestBuilder,
    ) -> anyhow::Result<Vec<u8>> {
        let mut wait = self.backoff;
        let mut attempt = 0;
        loop {
            let mut r = req();
            if let Some(t) = &self.token {
                r = r.bearer_auth(t);
            }
            let err: anyhow::Error = match r.send() {
                Ok(resp) if resp.status().is_success() => return read_bounded(resp, limit, what),
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let message = read_bounded(resp, 64 << 10, what)
                        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
                        .unwrap_or_default();
                    let e = HttpError { status, message };
                    if !matches!(status, 502..=504) {
                        return Err(anyhow::Error::new(e).context(what.to_string()));
                    }
                    e.into()
                }
                Err(e) => e.into(),
            };
            if attempt >= self.retries {
                return Err(err.context(format!("{what} (gave up after {} attempts)", attempt + 1)));
            }
            tracing::debug!("{what}: {err:#}; retrying in {wait:?}");
            std::thread::sleep(wait);
            wait *= 2;
            attempt += 1;
        }
    }

    /// `GET /v1/metadata`.
    pub fn metadata(&self) -> anyhow::Result<ServedMetadata> {
        let url = format!("{}/v1/metadata", self.base);
        let body = self.send(&format!("GET {url}"), METADATA_LIMIT, || self.http.get(&url))?;
        serde_json::from_slice(&body).with_context(|| format!("{url}: not a ddm server's metadata"))
    }

    /// POST `request`, read tensor `name` of the answer, whose values take at most `values` f32.
    fn post_tensor(
        &self,
        url: &str,
        request: &Request,
        name: &str,
        values: usize,
    ) -> anyhow::Result<HostTensor> {
        let body = request.to_bytes()?;
        // The tensor's bytes and a safetensors header.
        let limit = (values as u64).saturating_mul(4).saturating_add(64 << 10);
        let answer = self.send(&format!("POST {url}"), limit, || {
            self.http
                .post(url)
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .body(body.clone())
        })?;
        let f = TensorFile::from_bytes(Path::new(url), answer)?;
        Ok(f.f32(name)?)
    }

    /// Expert `k`'s velocity at `request` (`[N, ...]`, the shape of `x_t`).
    pub fn velocity(&self, k: usize, request: &Request) -> anyhow::Result<HostTensor> {
        let url = format!("{}/v1/experts/{k}/velocity", self.base);
        let v = self.post_tensor(&url, request, "v", request.x_t.data.len())?;
        if v.shape != request.x_t.shape {
            bail!(
                "{url}: answered v of shape {:?} for x_t of shape {:?}",
                v.shape,
                request.x_t.shape
            );
        }
        Ok(v)
    }

    /// The router's logits `[N, K]`.
    pub fn router_logits(&self, request: &Request) -> anyhow::Result<HostTensor> {
        let url = format!("{}/v1/router/logits", self.base);
        // K is at most a few thousand: a bound, not the exact size.
        self.post_tensor(&url, request, "logits", request.rows().saturating_mul(1 << 16))
    }
}

/// An expert served elsewhere, as the sampler runs it: the server's field for cluster `k`, with
/// the null class filled in and classifier-free guidance applied here (as
/// [`ddm_core::flow::ClassifierFreeGuidance`] does for a local expert).
#[derive(Clone)]
pub struct RemoteExpert {
    pub client: Client,
    pub cluster: usize,
    /// The null class of a class-conditional expert (read where no class is given).
    pub null_class: Option<usize>,
    /// Whether the expert reads conditioning vectors (they are sent only then).
    pub reads_vectors: bool,
    /// Whether the expert reads token sequences (they are sent only then).
    pub reads_tokens: bool,
    /// The guidance scale (1: none).
    pub scale: f64,
}

impl RemoteExpert {
    /// `x_t` `[M, ...]`, `t` `[M]`, `y` `[M]`?, `c` `[M, Dc]`?, token sequences `[M, L, Dt]` and
    /// `[M, L]`? -> `v` `[M, ...]`.
    pub fn velocity(
        &self,
        x_t: HostTensor,
        t: Vec<f32>,
        y: Option<Vec<i64>>,
        (c, tokens): (Option<HostTensor>, Option<(HostTensor, HostTensor)>),
    ) -> anyhow::Result<HostTensor> {
        let m = t.len();
        let c = c.filter(|_| self.reads_vectors);
        let tokens = tokens.filter(|_| self.reads_tokens);
        let conditioned = y.is_some() || c.is_some() || tokens.is_some();
        let y = y.or_else(|| self.null_class.map(|null| vec![null as i64; m]));
        if !conditioned || self.scale == 1.0 {
            let request = Request { x_t, t, y, c, tokens };
            return self.client.velocity(self.cluster, &request);
        }
        // Conditional and null rows in one request: [2M, X]. The null condition is the null
        // class and the zero vector (a class the expert does not read stays as given).
        let twice = |v: &[f32]| [v, v].concat();
        let mut shape2 = x_t.shape.clone();
        shape2[0] = 2 * m;
        let y2 = y.map(|y| {
            let null = self.null_class.map_or(y.clone(), |n| vec![n as i64; m]);
            [y, null].concat()
        });
        // Rows, then as many null rows (zeros).
        let with_null = |a: HostTensor| {
            let mut shape = a.shape.clone();
            shape[0] = 2 * m;
            let zeros = vec![0.0; a.data.len()];
            HostTensor::new(shape, [a.data, zeros].concat())
        };
        let request = Request {
            x_t: HostTensor::new(shape2, twice(&x_t.data)),
            t: twice(&t),
            y: y2,
            c: c.map(with_null),
            tokens: tokens.map(|(e, mask)| (with_null(e), with_null(mask))),
        };
        let v = self.client.velocity(self.cluster, &request)?;
        let (cond, null_v) = v.data.split_at(v.data.len() / 2);
        let s = self.scale as f32;
        let data = cond.iter().zip(null_v).map(|(&c, &u)| u + (c - u) * s).collect();
        Ok(HostTensor::new(x_t.shape, data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(shape: Vec<usize>, t: Vec<f32>) -> Vec<u8> {
        let n: usize = shape.iter().product();
        Request {
            x_t: HostTensor::new(shape, vec![0.5; n]),
            t,
            y: None,
            c: None,
            tokens: None,
        }
        .to_bytes()
        .unwrap()
    }

    /// Token sequences travel with their mask and come back as sent; a wrong shape or a mask
    /// that is not 0/1 is refused by name.
    #[test]
    fn requests_carry_token_sequences() {
        let tokens = |l: usize, mask: Vec<f32>| {
            Some((
                HostTensor::new(vec![2, l, 3], (0..2 * l * 3).map(|v| v as f32).collect()),
                HostTensor::new(vec![2, mask.len() / 2], mask),
            ))
        };
        let request = |tokens| Request {
            x_t: HostTensor::new(vec![2, 4], vec![0.5; 8]),
            t: vec![0.5; 2],
            y: None,
            c: None,
            tokens,
        };
        let sent = request(tokens(2, vec![1.0, 0.0, 1.0, 1.0]));
        let got = Request::from_bytes(sent.to_bytes().unwrap(), &[4]).unwrap();
        assert_eq!(got, sent);
        for (bad, why) in [
            (tokens(2, vec![1.0, 0.5, 1.0, 1.0]), "c_mask holds 0.5"),
            (
                tokens(2, vec![1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
                "c_mask has shape [2, 3]",
            ),
        ] {
            let e = Request::from_bytes(request(bad).to_bytes().unwrap(), &[4])
                .unwrap_err()
                .to_string();
            assert!(e.contains(why), "{e}");
        }
    }

    #[test]
    fn requests_take_image_rows_shaped_or_flattened_and_refuse_the_rest() {
        let row = [1, 2, 2];
        for shape in [vec![3, 1, 2, 2], vec![3, 4]] {
            let r = Request::from_bytes(body(shape.clone(), vec![0.5; 3]), &row).unwrap();
            assert_eq!((r.rows(), r.x_t.shape.clone()), (3, shape));
        }
        for (shape, t, why) in [
            (vec![3, 2, 2], vec![0.5; 3], "shape"),
            (vec![3, 5], vec![0.5; 3], "shape"),
            (vec![0, 4], vec![], "no rows"),
            (vec![3, 4], vec![0.5; 2], "one time per row"),
            (vec![3, 4], vec![0.5, 0.5, -0.1], "[0, 1]"),
        ] {
            let e = Request::from_bytes(body(shape.clone(), t), &row)
                .unwrap_err()
                .to_string();
            assert!(e.contains(why), "{shape:?}: {e}");
        }
        let e = Request::from_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{}".to_vec(), &row).unwrap_err();
        assert!(format!("{e:#}").contains("request body"), "{e:#}");
    }
}
