//! The sampler's side of a registry: its entries built into what the sampler runs. Experts become
//! velocity fields (epsilon experts converted, classifier-free guidance wrapped around
//! class-conditional ones), the router blob a [`RouterNet`], the statistics an [`AnalyticRouter`].

use std::path::PathBuf;

use anyhow::{Context, bail};
use ddm_core::burn::prelude::*;
use ddm_core::checkpoint::{Checkpoint, Objective};
use ddm_core::flow::{EpsilonToVelocity, VelocityField};
use ddm_core::stats::ClusterStats;
use ddm_router::analytic::AnalyticRouter;
use ddm_router::net::RouterNet;

use crate::registry::claims::{Claim, Parsed};
use crate::registry::{Entry, Registry};
use crate::remote::{Client, RemoteExpert};
use crate::sampler::ExpertSlot;

impl Registry {
    /// Expert `k` as a velocity field on `device` (epsilon experts are converted).
    pub fn expert(&self, k: usize, device: &Device) -> anyhow::Result<Box<dyn VelocityField<2>>> {
        self.expert_guided(k, device, None)
    }

    /// The index entry a claim names.
    pub fn entry(&self, claim: Claim) -> anyhow::Result<&Entry> {
        let i = &self.index;
        let e = match claim {
            Claim::Expert(k) => i.experts.get(&k),
            Claim::Router => i.router.as_ref(),
            Claim::Stats(k) => i.stats.get(&k),
            Claim::Vae => i.vae.as_ref(),
        };
        e.with_context(|| format!("{}: no {claim} registered", self.dir.display()))
    }

    /// An entry's blob, read once: hashed against the sha256 the registry recorded (which covers
    /// the whole file), parsed, and checked to be what the entry claims ([`Claim::check`]).
    pub fn verified(&self, claim: Claim) -> anyhow::Result<(PathBuf, Parsed)> {
        let e = self.entry(claim)?;
        let (blob, raw) = self.verified_bytes(claim, e)?;
        let parsed = claim.check(&self.index, e, &blob, raw)?;
        Ok((blob, parsed))
    }

    /// [`Registry::verified`] for a checkpoint's entry (an expert, the router, the VAE).
    pub fn verified_checkpoint(&self, claim: Claim) -> anyhow::Result<(PathBuf, Checkpoint)> {
        match self.verified(claim)? {
            (blob, Parsed::Checkpoint(c)) => Ok((blob, *c)),
            (blob, Parsed::Stats(..)) => bail!("{}: {claim} is a statistics file", blob.display()),
        }
    }

    /// An entry's blob and its bytes, read once and checked against the registry's sha256.
    pub fn verified_bytes(&self, claim: Claim, e: &Entry) -> anyhow::Result<(PathBuf, Vec<u8>)> {
        let blob = e.blob(&self.dir);
        let raw = std::fs::read(&blob).with_context(|| {
            format!(
                "{claim} of the registry {}: reading {}",
                self.dir.display(),
                blob.display()
            )
        })?;
        let got = ddm_core::digest::sha256_hex(&raw);
        if got != e.sha256 {
            bail!(
                "{}: {claim} hashes to {got}, but the registry recorded {} (corrupted or replaced; `ddm registry verify` lists every such blob)",
                blob.display(),
                e.sha256
            );
        }
        Ok((blob, raw))
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
        let (blob, ckpt) = self.verified_checkpoint(Claim::Expert(k))?;
        let model = ckpt.model(&blob, device)?;
        let meta = ckpt.meta;
        velocity_field(&format!("expert {k} ({})", e.source), &meta, model, guidance)
    }

    pub fn router(&self, device: &Device) -> anyhow::Result<RouterNet> {
        if self.index.router.is_none() {
            bail!("no router registered (use --router analytic, or register one)");
        }
        let (path, ckpt) = self.verified_checkpoint(Claim::Router)?;
        Ok(RouterNet::from_checkpoint(&path, ckpt, device)?)
    }

    /// The analytic router from the registered per-cluster statistics.
    pub fn analytic_router(&self) -> anyhow::Result<AnalyticRouter> {
        let stats = (0..self.index.k)
            .map(|k| match self.verified(Claim::Stats(k))? {
                (_, Parsed::Stats(_, s)) => Ok(s),
                (blob, _) => bail!("{}: statistics {k} is a checkpoint", blob.display()),
            })
            .collect::<anyhow::Result<Vec<ClusterStats>>>()?;
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
