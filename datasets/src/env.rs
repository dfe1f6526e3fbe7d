//! Every environment variable ddm-datasets reads, in one place.
//!
//! - `DDM_CACHE`: where downloads are kept (default `$XDG_CACHE_HOME/ddm`, else `~/.cache/ddm`).

use std::path::PathBuf;

/// ddm's cache directory.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("DDM_CACHE") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("ddm");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".cache/ddm"),
        None => PathBuf::from(".ddm-cache"),
    }
}
