//! The one error type of `ddm-core`. Every variant names what a user can fix: the file, the tensor,
//! the expected and the actual value.

use std::path::PathBuf;

/// Errors from reading, writing and building models and checkpoints.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a readable safetensors file ({reason}); is it truncated or corrupted?", path.display())]
    Safetensors { path: PathBuf, reason: String },
    #[error("{}: no `ddm` metadata in the safetensors header: not a ddm checkpoint (PyTorch weights go through `ddm import`)", path.display())]
    MissingMetadata { path: PathBuf },
    #[error("{}: bad `ddm` metadata: {reason}", path.display())]
    BadMetadata { path: PathBuf, reason: String },
    #[error("{}: checkpoint format version {found} is not supported (this ddm reads version {supported})", path.display())]
    UnsupportedVersion {
        path: PathBuf,
        found: u64,
        supported: u32,
    },
    #[error("{}: tensor data checksum mismatch (metadata says sha256 {expected}, data hashes to {actual}): the file is corrupted", path.display())]
    Checksum {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("{}: tensor `{name}` is missing", path.display())]
    MissingTensor { path: PathBuf, name: String },
    #[error("{}: unexpected tensor(s) not in a {arch} model with this config: {names}", path.display())]
    UnexpectedTensors {
        path: PathBuf,
        arch: String,
        names: String,
    },
    #[error("{}: tensor `{name}` has shape {actual:?}, expected {expected:?}", path.display())]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("{}: tensor `{name}` has dtype {dtype}, expected {expected}", path.display())]
    Dtype {
        path: PathBuf,
        name: String,
        dtype: String,
        expected: &'static str,
    },
    #[error("{}: tensor `{name}` holds {count} NaN or infinite value(s) (a diverged run?)", path.display())]
    NonFinite {
        path: PathBuf,
        name: String,
        count: usize,
    },
    #[error(
        "{what}: {at} is {value}, which JSON cannot carry (it would be written as null and not read back)"
    )]
    NonFiniteJson { what: String, at: String, value: f64 },
    #[error("invalid model config: {0}")]
    InvalidConfig(String),
    #[error("{0}")]
    Device(String),
    /// A value a user gave (a flag, a field) that cannot be read.
    #[error("{0}")]
    Invalid(String),
    #[error("environment variable {var} = `{value}`: {reason}")]
    Env {
        var: String,
        value: String,
        reason: String,
    },
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error with its causes on one line (`error sending request: ...: invalid peer certificate:
/// UnknownIssuer`; reqwest's own message alone does not say what went wrong), each cause once: one
/// whose text the message already quotes (the I/O error inside "PATH: reason") is not repeated.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cause = c.source();
    }
    s
}
