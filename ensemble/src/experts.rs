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
        self.expert_guided(k, device, Guidance::default())
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
        guidance: Guidance,
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
        // The server holds the checkpoint: what the entry records is checked here, the rest (a
        // null class) by the server.
        let (classes, dim, token_dim) = (
            e.classes(&self.dir)?,
            e.condition_dim.unwrap_or(0),
            e.token_dim.unwrap_or(0),
        );
        let what = format!("expert {k} ({url})");
        let null_class = guidance.check(&what, classes, dim.max(token_dim), None)?;
        Ok(ExpertSlot::remote(RemoteExpert {
            client: Client::new(url)?,
            cluster: k,
            null_class,
            reads_vectors: dim > 0,
            reads_tokens: token_dim > 0,
            scale: guidance.scale,
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

    /// Expert `k` for samples conditioned as `guidance` says, with classifier-free guidance at
    /// its scale.
    pub fn expert_guided(
        &self,
        k: usize,
        device: &Device,
        guidance: Guidance,
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
        let model = ddm_core::precision::cast(ckpt.model(&blob, device)?, self.precision);
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

/// What the samples are conditioned on, as every expert is asked for it, and the scale of
/// classifier-free guidance on that condition.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Guidance {
    /// The largest class id asked for (None: no class given).
    pub max_class: Option<usize>,
    /// Whether the samples carry conditioning vectors or token sequences.
    pub vectors: bool,
    /// 1: plain conditional sampling.
    pub scale: f64,
}

impl Default for Guidance {
    /// Unconditional samples, no guidance.
    fn default() -> Self {
        Self {
            max_class: None,
            vectors: false,
            scale: 1.0,
        }
    }
}

impl Guidance {
    /// Check the condition against a model conditioned on `classes` classes (0: none) that
    /// reads vectors of width `dim` (0: none); `null` says whether it learnt a null condition
    /// (None: not known here). Returns the null class of a class-conditional model, which it
    /// reads when no class is given. `what` names the model in errors.
    pub fn check(
        &self,
        what: &str,
        classes: usize,
        dim: usize,
        null: Option<bool>,
    ) -> anyhow::Result<Option<usize>> {
        match self.max_class {
            Some(class) if classes == 0 => bail!(
                "{what} is not class-conditional (train with --class-conditional); sample without --class (asked for class {class})"
            ),
            Some(class) if class >= classes => bail!(
                "class {class} is out of range: {what} knows classes 0..={}",
                classes - 1
            ),
            None if classes > 0 && null == Some(false) => bail!(
                "{what} is class-conditional and was trained without label dropout (no null class): sample with --class"
            ),
            _ => {}
        }
        if self.scale != 1.0 {
            if self.max_class.is_none() && !(self.vectors && dim > 0) {
                bail!(
                    "--guidance {}: {what} reads {}: guidance needs a condition it reads",
                    self.scale,
                    match (classes, dim) {
                        (0, 0) => "no condition".to_string(),
                        (0, _) => "conditioning vectors, and none were given".to_string(),
                        _ => "a class, and none was given".to_string(),
                    }
                );
            }
            if null == Some(false) {
                bail!(
                    "{what} was trained without condition dropout (no null class, vector or caption), so it cannot use --guidance other than 1 (an imported PixArt is given its text encoder's null caption by `ddm import --null-caption`)"
                );
            }
        }
        Ok((classes > 0).then_some(classes))
    }
}

/// A checkpoint's network as a velocity field for samples conditioned as `guidance` says: an
/// epsilon expert converted, a class-conditional network given its null class where no class is
/// given, and classifier-free guidance at the guidance scale. `what` names it in errors.
pub fn velocity_field(
    what: &str,
    meta: &ddm_core::checkpoint::CheckpointMeta,
    model: ddm_core::model::Model,
    guidance: Guidance,
) -> anyhow::Result<Box<dyn VelocityField<2>>> {
    let m = &meta.model;
    let null_class = guidance.check(
        what,
        m.num_classes(),
        m.condition_dim().max(m.token_dim()),
        Some(m.has_null_condition()),
    )?;
    let field: Box<dyn VelocityField<2>> = match meta.objective {
        Objective::Velocity => Box::new(model),
        Objective::Epsilon { schedule } => Box::new(EpsilonToVelocity::new(model, schedule, meta.data.range)),
    };
    if null_class.is_none() && guidance.scale == 1.0 {
        return Ok(field);
    }
    Ok(Box::new(ddm_core::flow::ClassifierFreeGuidance {
        inner: field,
        null_class,
        scale: guidance.scale,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(max_class: Option<usize>, vectors: bool, scale: f64) -> Guidance {
        Guidance {
            max_class,
            vectors,
            scale,
        }
    }

    /// What each kind of model may be asked for; the refusals name the model and the reason.
    #[test]
    fn guidance_is_checked_against_what_the_model_reads() {
        let check = |guidance: Guidance, classes, dim, null| guidance.check("expert 0", classes, dim, null);
        // A class-conditional model reads its null class when no class is given.
        assert_eq!(
            check(g(Some(9), false, 2.0), 10, 0, Some(true)).unwrap(),
            Some(10)
        );
        assert_eq!(check(Guidance::default(), 10, 0, Some(true)).unwrap(), Some(10));
        // A model that reads vectors is guided on them, and has no null class.
        assert_eq!(check(g(None, true, 3.0), 0, 32, Some(true)).unwrap(), None);
        assert_eq!(check(g(None, true, 3.0), 0, 32, None).unwrap(), None);
        for (guidance, classes, dim, null, says) in [
            (
                g(Some(3), false, 1.0),
                0,
                32,
                Some(true),
                "is not class-conditional",
            ),
            (
                g(Some(10), false, 1.0),
                10,
                0,
                Some(true),
                "class 10 is out of range",
            ),
            (Guidance::default(), 10, 0, Some(false), "sample with --class"),
            (
                g(None, true, 2.0),
                10,
                0,
                Some(true),
                "reads a class, and none was given",
            ),
            (
                g(None, false, 2.0),
                0,
                32,
                Some(true),
                "conditioning vectors, and none were given",
            ),
            (g(None, true, 2.0), 0, 0, Some(true), "reads no condition"),
            (
                g(None, true, 2.0),
                0,
                32,
                Some(false),
                "without condition dropout",
            ),
        ] {
            let e = check(guidance, classes, dim, null).unwrap_err().to_string();
            assert!(e.contains("expert 0") && e.contains(says), "{guidance:?}: {e}");
        }
    }
}
