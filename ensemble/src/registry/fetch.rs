//! What `ddm register` accepts besides local files: exported registry folders and http(s):// URLs
//! (streamed into a cache, resumed when interrupted, checked against `#sha256=` when given).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use ddm_core::digest::{sha256_file, sha256_hex};

/// Expand what `ddm register` was given: an exported folder (with `index.json`) becomes its
/// `*/model.safetensors` files; an `http://` or `https://` URL is downloaded into `cache` (with
/// `#sha256=HEX`, the file must hash to HEX before it is used, and a cached copy that does is not
/// fetched again); anything else is a path.
pub fn expand_sources(sources: &[String], cache: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = vec![];
    let mut client = None;
    for s in sources {
        if s.starts_with("http://") || s.starts_with("https://") {
            let (url, want) = match s.split_once("#sha256=") {
                Some((u, h)) => (u.to_string(), Some(h.to_ascii_lowercase())),
                None => (s.clone(), None),
            };
            if let Some(w) = &want {
                let cached = cache.join(format!("{w}.safetensors"));
                if cached.exists() && sha256_file(&cached)? == *w {
                    out.push(cached);
                    continue;
                }
            }
            let client = match &client {
                Some(c) => c,
                None => client.insert(ddm_net::client()?),
            };
            // Streamed to a partial file named after the URL (so an interrupted download resumes),
            // then filed under its sha256.
            let partial = cache.join(format!("url-{}.safetensors", &sha256_hex(url.as_bytes())[..16]));
            let got = ddm_net::download(client, &url, &partial, want.as_deref(), &())?;
            let p = cache.join(format!("{got}.safetensors"));
            std::fs::rename(&partial, &p).with_context(|| format!("moving {} into place", p.display()))?;
            out.push(p);
            continue;
        }
        let p = PathBuf::from(s);
        if p.is_dir() {
            if !p.join("index.json").exists() {
                bail!(
                    "{}: a directory, but not an exported registry (no index.json)",
                    p.display()
                );
            }
            let mut models: Vec<PathBuf> = std::fs::read_dir(&p)
                .with_context(|| format!("reading {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path().join("model.safetensors")))
                .filter(|m| m.exists())
                .collect();
            models.sort();
            out.extend(models);
        } else {
            out.push(p);
        }
    }
    Ok(out)
}
