//! What `ddm register` accepts besides local files: exported registry folders and http:// URLs
//! (downloaded into a cache, checked against `#sha256=` when given).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use ddm_core::digest::sha256_hex;

/// Expand what `ddm register` was given: an exported folder (with `index.json`) becomes its
/// `*/model.safetensors` files; an `http://` URL is downloaded into `cache` (with `#sha256=HEX`,
/// the file must hash to HEX before it is used); anything else is a path.
pub fn expand_sources(sources: &[String], cache: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = vec![];
    for s in sources {
        if let Some(rest) = s
            .strip_prefix("http://")
            .or_else(|| s.strip_prefix("https://").map(|_| ""))
        {
            if rest.is_empty() {
                bail!(
                    "{s}: https needs a TLS-enabled build; ddm fetches plain http:// (integrity comes from sha256)"
                );
            }
            let (url, want) = match s.split_once("#sha256=") {
                Some((u, h)) => (u.to_string(), Some(h.to_ascii_lowercase())),
                None => (s.clone(), None),
            };
            let bytes = reqwest::blocking::get(&url)
                .and_then(|r| r.error_for_status())
                .and_then(|r| r.bytes())
                .with_context(|| format!("downloading {url}"))?;
            let got = sha256_hex(&bytes);
            if let Some(want) = want
                && want != got
            {
                bail!("{url}: sha256 {got} does not match the expected {want}; not used");
            }
            std::fs::create_dir_all(cache).with_context(|| format!("creating {}", cache.display()))?;
            let p = cache.join(format!("{got}.safetensors"));
            ddm_core::fsio::write_bytes_atomic(&p, &bytes)?;
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
