//! The registry (a contract; see docs/ARCHITECTURE.md): a directory with `registry.json` and content-addressed
//! blobs (`blobs/<sha256>.safetensors`). Registering verifies each checkpoint (its own checksum,
//! role, partition fingerprint, data spec, cluster id in range, K) and refuses anything else with a
//! clear message, leaving the registry untouched: every check runs before anything is written,
//! blobs are written before the index, and the index is replaced atomically. An exclusive file lock
//! around the read-modify-write makes concurrent registrations from several processes lose nothing.

//!
//! [`index`] is the file format, [`claims`] what each entry must be, [`register`] checks and
//! plans a registration and removes entries, [`publish`] verifies and exports, [`fetch`] turns
//! URLs and exported folders into local files. Where a registry lives is one seam,
//! [`backend::Backend`]: a directory ([`dir`]) or an object store ([`store`]). Building the sampler's
//! experts and routers from a registry is the sampler side's job (`crate::experts`).

use std::path::{Path, PathBuf};

use anyhow::Context;
use ddm_core::precision::Precision;

pub mod backend;
pub mod claims;
pub mod dir;
pub mod fetch;
pub mod index;
pub mod publish;
pub mod register;
pub mod store;

pub use backend::{Backend, Location};
pub use dir::DirRegistry;
pub use fetch::expand_sources;
pub use index::{Entry, INDEX, Index, read_index};
pub use publish::{export, verify};
pub use register::{Registered, gc, register, remove};
pub use store::StoreRegistry;

/// `, conditioned on C classes` for an entry that records it.
fn conditioning(e: &Entry) -> String {
    match e.classes {
        Some(c) if c > 0 => format!(", conditioned on {c} classes"),
        _ => String::new(),
    }
}

/// A loaded registry, ready to hand experts to the sampler.
pub struct Registry {
    pub dir: PathBuf,
    pub index: Index,
    /// The precision local experts are loaded to compute in (f32 unless `ddm sample --precision`;
    /// their weights are f32 on disk either way).
    pub precision: Precision,
}

impl Registry {
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let index = read_index(dir)?
            .with_context(|| format!("{}: no registry here (ddm register creates one)", dir.display()))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            index,
            precision: Precision::F32,
        })
    }

    pub fn list(&self) -> String {
        let i = &self.index;
        let mut s = format!(
            "registry {} (partition {}, K = {}, data {:?})\n",
            self.dir.display(),
            ddm_core::text::short(&i.partition, 12),
            i.k,
            i.data.shape
        );
        for k in 0..i.k {
            match i.experts.get(&k) {
                Some(e) => s.push_str(&format!(
                    "  expert {k}: {} ({} bytes) {} {}{}\n",
                    ddm_core::text::short(&e.sha256, 12),
                    e.bytes,
                    if e.remote.is_some() { "served at" } else { "from" },
                    ddm_core::text::printable(&e.source),
                    conditioning(e)
                )),
                None => s.push_str(&format!("  expert {k}: missing\n")),
            }
        }
        match &i.router {
            Some(e) => s.push_str(&format!(
                "  router:   {} ({} bytes) from {}{}\n",
                ddm_core::text::short(&e.sha256, 12),
                e.bytes,
                ddm_core::text::printable(&e.source),
                conditioning(e)
            )),
            None => s.push_str("  router:   none\n"),
        }
        s.push_str(&format!(
            "  statistics for the analytic router: {} of {}\n",
            i.stats.len(),
            i.k
        ));
        if let Some(l) = &i.latent {
            s.push_str(&format!(
                "  latent space: {:?} latents of {:?} images, {}\n",
                l.latent_shape,
                l.image_shape,
                l.describe()
            ));
            match &i.vae {
                Some(e) => s.push_str(&format!(
                    "  VAE:      {} ({} bytes) from {}\n",
                    ddm_core::text::short(&e.sha256, 12),
                    e.bytes,
                    e.source
                )),
                None => s.push_str("  VAE:      none (sample --decode needs --vae FILE)\n"),
            }
        }
        s
    }
}
