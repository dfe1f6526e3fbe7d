//! Checking a registry's blobs against their recorded hashes, and exporting the published folder
//! layout other tools read.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use ddm_core::digest::sha256_hex;

use super::claims::{Claim, Parsed};
use super::index::{Entry, Index, read_index};

/// Re-hash every blob and check it is what its entry claims ([`Claim::check`]: expert k of this
/// partition, the router over its K clusters, cluster k's statistics, the latent space's VAE), and
/// ask every server of a remote expert whether it still serves that checkpoint (same sha256);
/// every problem found (it keeps going after the first).
pub fn verify(dir: &Path) -> anyhow::Result<Vec<String>> {
    let idx = read_index(dir)?.with_context(|| format!("{}: no registry here", dir.display()))?;
    Ok(verify_index(&idx, &|e| {
        let blob = e.blob(dir);
        let bytes = std::fs::read(&blob).with_context(|| format!("reading {}", blob.display()))?;
        Ok((blob, bytes))
    }))
}

/// Reads an entry's blob: its name and bytes.
pub(crate) type ReadBlob<'a> = &'a dyn Fn(&Entry) -> anyhow::Result<(PathBuf, Vec<u8>)>;

/// [`verify`] for any registry: `read` names an entry's blob and reads its bytes.
pub(crate) fn verify_index(idx: &Index, read: ReadBlob) -> Vec<String> {
    let mut problems = vec![];
    for (claim, e) in Claim::all(idx) {
        let what = claim.to_string();
        if let Some(url) = &e.remote {
            let Claim::Expert(k) = claim else {
                problems.push(format!("{what}: only experts may be served elsewhere ({url})"));
                continue;
            };
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
        match read(e) {
            Ok((blob, bytes)) => {
                let h = sha256_hex(&bytes);
                if h != e.sha256 {
                    problems.push(format!(
                        "{what}: {} hashes to {h}, expected {}",
                        blob.display(),
                        e.sha256
                    ));
                } else if let Err(err) = claim.check(idx, e, &blob, bytes) {
                    problems.push(format!("{what}: {err:#}"));
                }
            }
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
    let mut put = |folder: String, claim: Claim| -> anyhow::Result<()> {
        let f = tmp.path().join(&folder);
        std::fs::create_dir_all(&f).with_context(|| format!("creating {}", f.display()))?;
        let e = reg.entry(claim)?;
        let (blob, bytes) = reg.verified_bytes(claim, e)?;
        ddm_core::fsio::write_bytes_atomic(&f.join("model.safetensors"), &bytes)?;
        let Parsed::Checkpoint(ckpt) = claim.check(&reg.index, e, &blob, bytes)? else {
            bail!("{}: {claim} is not a checkpoint", blob.display());
        };
        ddm_core::fsio::write_bytes_atomic(&f.join("config.json"), &serde_json::to_vec_pretty(&ckpt.meta)?)?;
        written.push(out.join(folder));
        Ok(())
    };
    let idx = &reg.index;
    for (&k, _) in idx.experts.iter().filter(|(_, e)| e.remote.is_none()) {
        put(format!("expert_{k}"), Claim::Expert(k))?;
    }
    if idx.router.is_some() {
        put("router".into(), Claim::Router)?;
    }
    if idx.vae.is_some() {
        put("vae".into(), Claim::Vae)?;
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
