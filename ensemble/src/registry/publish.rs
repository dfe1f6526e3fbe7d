//! Checking a registry's blobs against their recorded hashes, and exporting the published folder
//! layout other tools read.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use ddm_core::checkpoint::Checkpoint;
use ddm_core::digest::sha256_file;

use super::index::{Entry, Index, read_index};

/// Re-hash every blob, and ask every server of a remote expert whether it still serves that
/// checkpoint (same sha256); every problem found (it keeps going after the first).
pub fn verify(dir: &Path) -> anyhow::Result<Vec<String>> {
    let idx = read_index(dir)?.with_context(|| format!("{}: no registry here", dir.display()))?;
    Ok(verify_index(&idx, &|e| {
        let blob = e.blob(dir);
        Ok((blob.display().to_string(), sha256_file(&blob)?))
    }))
}

/// [`verify`] for any registry: `hash` names an entry's blob and hashes it.
pub(crate) fn verify_index(
    idx: &Index,
    hash: &dyn Fn(&Entry) -> anyhow::Result<(String, String)>,
) -> Vec<String> {
    let mut problems = vec![];
    let entries = idx
        .experts
        .iter()
        .map(|(k, e)| (format!("expert {k}"), e))
        .chain(idx.router.iter().map(|e| ("router".to_string(), e)))
        .chain(idx.stats.iter().map(|(k, e)| (format!("statistics {k}"), e)));
    for (what, e) in entries {
        if let Some(url) = &e.remote {
            let k: usize = what.trim_start_matches("expert ").parse().unwrap_or(usize::MAX);
            match crate::remote::Client::new(url).and_then(|c| c.metadata()) {
                Err(err) => problems.push(format!("{what}: {url}: {err:#}")),
                Ok(m) => match m.experts.get(&k) {
                    None => problems.push(format!("{what}: {url} no longer serves expert {k}")),
                    Some(s) if s.sha256 != e.sha256 => problems.push(format!(
                        "{what}: {url} serves checkpoint {}, but {} was registered",
                        s.sha256, e.sha256
                    )),
                    Some(_) => {}
                },
            }
            continue;
        }
        match hash(e) {
            Ok((_, h)) if h == e.sha256 => {}
            Ok((blob, h)) => problems.push(format!("{what}: {blob} hashes to {h}, expected {}", e.sha256)),
            Err(err) => problems.push(format!("{what}: {err:#}")),
        }
    }
    problems
}

/// Write the published folder layout: `expert_K/{config.json, model.safetensors}` per expert,
/// `router/{config.json, model.safetensors}`, `vae/...` (a latent registry's VAE), and
/// `index.json` (the registry's index). `config.json`
/// is the checkpoint's ddm metadata; `model.safetensors` is the checkpoint itself. Experts served
/// elsewhere have no file to export: `index.json` keeps their URLs.
pub fn export(dir: &Path, out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let reg = super::Registry::open(dir)?;
    check_export_target(out)?;
    // Written beside `out`, then moved into place whole: a killed or failed export leaves the
    // previous one (or nothing), never a mix.
    let tmp = ddm_core::fsio::TempDir::beside(out, "export")?;
    let mut written = vec![];
    let mut put = |folder: String, e: &Entry| -> anyhow::Result<()> {
        let f = tmp.path().join(&folder);
        std::fs::create_dir_all(&f).with_context(|| format!("creating {}", f.display()))?;
        let (blob, bytes) = reg.verified_bytes(&folder, e)?;
        ddm_core::fsio::write_bytes_atomic(&f.join("model.safetensors"), &bytes)?;
        let ckpt = Checkpoint::from_file(ddm_core::host::TensorFile::from_bytes(&blob, bytes)?)?;
        ddm_core::fsio::write_bytes_atomic(&f.join("config.json"), &serde_json::to_vec_pretty(&ckpt.meta)?)?;
        written.push(out.join(folder));
        Ok(())
    };
    let idx = &reg.index;
    for (k, e) in idx.experts.iter().filter(|(_, e)| e.remote.is_none()) {
        put(format!("expert_{k}"), e)?;
    }
    if let Some(e) = &idx.router {
        put("router".into(), e)?;
    }
    if let Some(e) = &idx.vae {
        put("vae".into(), e)?;
    }
    ddm_core::fsio::write_bytes_atomic(&tmp.path().join("index.json"), &serde_json::to_vec_pretty(idx)?)?;
    tmp.publish(out)?;
    Ok(written)
}

/// An export may replace nothing, an empty directory, or an earlier export (a directory with
/// `index.json`); never a file or a directory of something else.
fn check_export_target(out: &Path) -> anyhow::Result<()> {
    if !out.exists() {
        return Ok(());
    }
    if !out.is_dir() {
        bail!("{}: a file; --out names the folder to export to", out.display());
    }
    let empty = std::fs::read_dir(out)
        .with_context(|| format!("reading {}", out.display()))?
        .next()
        .is_none();
    if !empty && !out.join("index.json").exists() {
        bail!(
            "{}: a directory that is not an earlier export (no index.json); choose another --out",
            out.display()
        );
    }
    Ok(())
}
