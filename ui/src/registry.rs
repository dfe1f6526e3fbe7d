//! The registry as `ddm ui` shows it: every entry with what its checkpoint says (model, size,
//! FLOPs, objective, conditioning), and for an expert served elsewhere whether its server answers.
//! Checkpoint summaries are kept by sha256: a registered blob never changes.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use ddm_core::checkpoint::{Checkpoint, CheckpointMeta};
use ddm_ensemble::registry::{Entry, Registry};
use serde::Serialize;

/// What one registered checkpoint is.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub model: String,
    pub parameters: Option<usize>,
    pub gflops_per_forward: f64,
    pub objective: String,
    pub trained_steps: Option<u64>,
}

impl Summary {
    fn of(meta: &CheckpointMeta, parameters: Option<usize>) -> Self {
        Self {
            model: meta.model.arch().to_string(),
            parameters,
            gflops_per_forward: meta.model.flops_per_sample() / 1e9,
            objective: meta.objective.to_string(),
            trained_steps: meta.training.as_ref().map(|t| t.steps),
        }
    }
}

/// One entry of the registry, for the page.
#[derive(Debug, Clone, Serialize)]
pub struct EntryView {
    /// `expert 2`, `router`, `VAE`.
    pub what: String,
    pub sha256: String,
    pub bytes: u64,
    pub source: String,
    pub registered_at: u64,
    /// `class (10)`, `vector (512)`, `tokens (768)`, or `none`.
    pub conditioning: String,
    /// The cluster's prior (experts).
    pub prior: Option<f64>,
    /// Its server, for an expert served elsewhere.
    pub served_at: Option<String>,
    /// Whether that server answered its metadata, serving this checkpoint.
    pub answers: Option<bool>,
    /// Why not, or why the summary could not be read.
    pub problem: Option<String>,
    pub summary: Option<Summary>,
}

/// The registry, for the page.
#[derive(Debug, Clone, Serialize)]
pub struct RegistryView {
    pub dir: String,
    pub partition: String,
    pub k: usize,
    pub data_shape: Vec<usize>,
    pub class_names: Option<Vec<String>>,
    pub latent: Option<String>,
    pub text: Option<String>,
    pub experts: Vec<EntryView>,
    /// Clusters with no expert registered yet.
    pub missing: Vec<usize>,
    pub router: Option<EntryView>,
    pub vae: Option<EntryView>,
    /// Clusters with statistics for the analytic router.
    pub statistics: usize,
}

/// Checkpoint summaries by sha256.
#[derive(Default)]
pub struct Summaries(Mutex<HashMap<String, Summary>>);

impl Summaries {
    /// The summary of a local entry's blob (read and verified once).
    fn local(&self, dir: &Path, e: &Entry) -> anyhow::Result<Summary> {
        if let Some(s) = self.0.lock().unwrap().get(&e.sha256) {
            return Ok(s.clone());
        }
        let ckpt = Checkpoint::read(&e.blob(dir))?;
        let params = ckpt.tensors.values().map(|t| t.numel()).sum();
        let s = Summary::of(&ckpt.meta, Some(params));
        self.0.lock().unwrap().insert(e.sha256.clone(), s.clone());
        Ok(s)
    }
}

/// How long a served expert's server gets to answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// The registry in `dir` as it is now (blocking: it reads blobs and asks servers).
pub fn view(dir: &Path, summaries: &Summaries) -> anyhow::Result<RegistryView> {
    let reg = Registry::open(dir)?;
    let idx = &reg.index;
    let entry = |what: String, e: &Entry, prior: Option<f64>| -> EntryView {
        let mut v = EntryView {
            what,
            sha256: e.sha256.clone(),
            bytes: e.bytes,
            source: e.source.clone(),
            registered_at: e.registered_at,
            conditioning: conditioning(e),
            prior,
            served_at: e.remote.clone(),
            answers: None,
            problem: None,
            summary: None,
        };
        let summary = match &e.remote {
            Some(url) => probe(url, e)
                .inspect(|_| v.answers = Some(true))
                .inspect_err(|_| {
                    v.answers = Some(false);
                }),
            None => summaries.local(dir, e),
        };
        match summary {
            Ok(s) => v.summary = Some(s),
            Err(err) => v.problem = Some(ddm_core::error::chain(err.as_ref())),
        }
        v
    };
    let prior = |k: usize| idx.priors.as_ref().and_then(|p| p.get(k).copied());
    Ok(RegistryView {
        dir: dir.display().to_string(),
        partition: idx.partition.clone(),
        k: idx.k,
        data_shape: idx.data.shape.clone(),
        class_names: idx.class_names.clone(),
        latent: idx.latent.as_ref().map(|l| l.describe()),
        text: idx.text.as_ref().map(|t| t.describe()),
        experts: idx
            .experts
            .iter()
            .map(|(&k, e)| entry(format!("expert {k}"), e, prior(k)))
            .collect(),
        missing: (0..idx.k).filter(|k| !idx.experts.contains_key(k)).collect(),
        router: idx.router.as_ref().map(|e| entry("router".into(), e, None)),
        vae: idx.vae.as_ref().map(|e| entry("VAE".into(), e, None)),
        statistics: idx.stats.len(),
    })
}

/// Ask a served expert's server for its metadata: it must serve the registered checkpoint.
fn probe(url: &str, e: &Entry) -> anyhow::Result<Summary> {
    let mut client = ddm_ensemble::remote::Client::with_timeout(url, PROBE_TIMEOUT)?;
    client.retries = 0;
    let served = client.metadata()?;
    let ckpt = served
        .experts
        .values()
        .find(|c| c.sha256 == e.sha256)
        .ok_or_else(|| anyhow::anyhow!("{url} answers, but no longer serves checkpoint {}", e.sha256))?;
    Ok(Summary::of(&ckpt.meta, None))
}

/// What an entry's model reads besides x_t and t.
fn conditioning(e: &Entry) -> String {
    let mut parts = vec![];
    if let Some(c) = e.classes.filter(|&c| c > 0) {
        parts.push(format!("class ({c})"));
    }
    if let Some(d) = e.condition_dim {
        parts.push(format!("vector ({d})"));
    }
    if let Some(d) = e.token_dim {
        parts.push(format!("tokens ({d})"));
    }
    match parts.is_empty() {
        true => "none".into(),
        false => parts.join(", "),
    }
}
