//! The sampler's side of a registry: its entries built into what the sampler runs. Experts become
//! velocity fields (epsilon experts converted, classifier-free guidance wrapped around
//! class-conditional ones), the router blob a [`RouterNet`], the statistics an [`AnalyticRouter`].

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use ddm_core::burn::prelude::*;
use ddm_core::checkpoint::{Checkpoint, Objective};
use ddm_core::flow::{EpsilonToVelocity, VelocityField};
use ddm_core::stats::ClusterStats;
use ddm_router::analytic::AnalyticRouter;
use ddm_router::net::RouterNet;

use crate::registry::Registry;
use crate::remote::{Client, RemoteExpert};
use crate::sampler::ExpertSlot;

impl Registry {
    /// Expert `k` as a velocity field on `device` (epsilon experts are converted).
    pub fn expert(&self, k: usize, device: &Device) -> anyhow::Result<Box<dyn VelocityField<2>>> {
        self.expert_guided(k, device, None)
    }

    /// An entry's blob, after checking that it still hashes to the sha256 the registry recorded
    /// (the hash covers the whole file, the checkpoint's metadata included).
    pub fn verified_blob(&self, what: &str, e: &crate::registry::Entry) -> anyhow::Result<PathBuf> {
        let blob = e.blob(&self.dir);
        let got = ddm_core::digest::sha256_file(&blob)
            .with_context(|| format!("{what} of the registry {}", self.dir.display()))?;
        self.check_hash(what, e, &blob, got)?;
        Ok(blob)
    }

    /// An entry's checkpoint, read once: hashed against the registry's sha256, then parsed and
    /// checked like any checkpoint.
    pub fn verified_checkpoint(
        &self,
        what: &str,
        e: &crate::registry::Entry,
    ) -> anyhow::Result<(PathBuf, Checkpoint)> {
        let (blob, raw) = self.verified_bytes(what, e)?;
        let ckpt = Checkpoint::from_file(ddm_core::host::TensorFile::from_bytes(&blob, raw)?)?;
        Ok((blob, ckpt))
    }

    /// An entry's blob and its bytes, read once and checked against the registry's sha256.
    pub fn verified_bytes(
        &self,
        what: &str,
        e: &crate::registry::Entry,
    ) -> anyhow::Result<(PathBuf, Vec<u8>)> {
        let blob = e.blob(&self.dir);
        let raw = std::fs::read(&blob).with_context(|| {
            format!(
                "{what} of the registry {}: reading {}",
                self.dir.display(),
                blob.display()
            )
        })?;
        self.check_hash(what, e, &blob, ddm_core::digest::sha256_hex(&raw))?;
        Ok((blob, raw))
    }

    fn check_hash(
        &self,
        what: &str,
        e: &crate::registry::Entry,
        blob: &Path,
        got: String,
    ) -> anyhow::Result<()> {
        if got != e.sha256 {
            bail!(
                "{}: {what} hashes to {got}, but the registry recorded {} (corrupted or replaced; `ddm registry verify` lists every such blob)",
                blob.display(),
                e.sha256
            );
        }
        Ok(())
    }

    /// Expert `k` as the sampler holds it: a local checkpoint loaded on first use, or a client of
    /// the server it is registered at; guidance as in [`Registry::expert_guided`]. An expert that
    /// is not registered is missing.
    pub fn expert_slot<'a>(
        &'a self,
        k: usize,
        device: &Device,
        guidance: Option<(usize, f64)>,
    ) -> anyhow::Result<ExpertSlot<'a>> {
        let Some(e) = self.index.experts.get(&k) else {
            return Ok(ExpertSlot::missing());
        };
        let Some(url) = &e.remote else {
            let device = device.clone();
            let blob = e.blob(&self.dir);
            let bytes = std::fs::metadata(&blob).map_or(0, |m| m.len());
            return Ok(ExpertSlot::lazy(move || self.expert_guided(k, &device, guidance))
                .at(blob.display().to_string(), bytes));
        };
        let classes = e.classes(&self.dir)?;
        let guidance = match guidance {
            None if classes > 0 => Some((classes, 1.0)), // no class given: the null class
            None => None,
            Some((class, _)) if classes == 0 => bail!(
                "expert {k} ({url}) is not class-conditional; sample without --class (asked for class {class})"
            ),
            Some((class, _)) if class >= classes => bail!(
                "class {class} is out of range: expert {k} ({url}) knows classes 0..={}",
                classes - 1
            ),
            Some((_, scale)) => Some((classes, scale)),
        };
        Ok(ExpertSlot::remote(RemoteExpert {
            client: Client::new(url)?,
            cluster: k,
            guidance,
        }))
    }

    /// Classes the registry's experts are conditioned on (0: unconditional; registration keeps
    /// them equal).
    pub fn expert_classes(&self) -> anyhow::Result<usize> {
        match self.index.experts.values().next() {
            Some(e) => e.classes(&self.dir),
            None => Ok(0),
        }
    }

    /// Expert `k`, with classifier-free guidance at `guidance` (the largest class id that will
    /// be asked for, scale) if given; the expert must be class-conditional.
    pub fn expert_guided(
        &self,
        k: usize,
        device: &Device,
        guidance: Option<(usize, f64)>,
    ) -> anyhow::Result<Box<dyn VelocityField<2>>> {
        let e = self
            .index
            .experts
            .get(&k)
            .with_context(|| format!("no expert registered for cluster {k}"))?;
        if let Some(url) = &e.remote {
            bail!("expert {k} is served at {url}, not held here: only `ddm sample` runs served experts");
        }
        let (blob, ckpt) = self.verified_checkpoint(&format!("expert {k}"), e)?;
        let model = ckpt.model(&blob, device)?;
        let meta = ckpt.meta;
        if meta.cluster != Some(k) || meta.partition.as_deref() != Some(self.index.partition.as_str()) {
            bail!(
                "{}: registered as expert {k} of partition {}, but it is the expert of cluster {:?} of partition {:?}",
                blob.display(),
                &self.index.partition,
                meta.cluster,
                meta.partition
            );
        }
        if meta.data != self.index.data {
            bail!(
                "{}: data {:?}, but the registry's is {:?}",
                blob.display(),
                meta.data,
                self.index.data
            );
        }
        velocity_field(&format!("expert {k} ({})", e.source), &meta, model, guidance)
    }

    pub fn router(&self, device: &Device) -> anyhow::Result<RouterNet> {
        let e = self
            .index
            .router
            .as_ref()
            .context("no router registered (use --router analytic, or register one)")?;
        let (path, ckpt) = self.verified_checkpoint("the router", e)?;
        Ok(RouterNet::from_checkpoint(&path, ckpt, device)?)
    }

    /// The analytic router from the registered per-cluster statistics.
    pub fn analytic_router(&self) -> anyhow::Result<AnalyticRouter> {
        let stats = (0..self.index.k)
            .map(|k| {
                let e = self
                    .index
                    .stats
                    .get(&k)
                    .with_context(|| format!("no statistics registered for cluster {k}"))?;
                Ok(ClusterStats::load(&self.verified_blob(&format!("statistics {k}"), e)?)?.1)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(AnalyticRouter::from_stats(&stats))
    }
}

/// A checkpoint's network as a velocity field: an epsilon expert converted, and with
/// classifier-free guidance at `guidance` (the largest class id that will be asked for, scale) if
/// given, which needs a class-conditional network. `what` names it in errors.
pub fn velocity_field(
    what: &str,
    meta: &ddm_core::checkpoint::CheckpointMeta,
    model: ddm_core::model::Model,
    guidance: Option<(usize, f64)>,
) -> anyhow::Result<Box<dyn VelocityField<2>>> {
    let (classes, null_class) = (meta.model.num_classes(), meta.model.has_null_class());
    let field: Box<dyn VelocityField<2>> = match meta.objective {
        Objective::Velocity => Box::new(model),
        Objective::Epsilon { schedule } => Box::new(EpsilonToVelocity::new(model, schedule, meta.data.range)),
    };
    let Some((class, scale)) = guidance else {
        return Ok(field);
    };
    if classes == 0 {
        bail!("{what} is not class-conditional (train with --class-conditional); sample without --class");
    }
    if class >= classes {
        bail!(
            "class {class} is out of range: {what} knows classes 0..={}",
            classes - 1
        );
    }
    if scale != 1.0 && !null_class {
        bail!(
            "{what} was trained without label dropout (no null class), so it cannot use --guidance other than 1"
        );
    }
    Ok(Box::new(ddm_core::flow::ClassifierFreeGuidance {
        inner: field,
        null_class: classes,
        scale,
    }))
}
