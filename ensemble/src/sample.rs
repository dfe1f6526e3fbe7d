//! `ddm sample`: load the registry, build the routed ensemble, integrate from noise to data, and
//! write a PNG grid, the samples as safetensors, and a JSON report (expert usage per step range,
//! time per step, peak memory).

use ddm_core::clip::TextSpace;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use ddm_core::burn::prelude::*;
use ddm_core::checkpoint::Checkpoint;
use ddm_core::condition::{Condition, Tokens};
use ddm_core::flow::{self, Drift, Solver, StepSchedule, VelocityError};
use ddm_core::grid::Layout;
use ddm_core::host::{HostTensor, write_tensors};
use ddm_core::precision::Precision;
use ddm_core::progress::Progress;
use ddm_core::vae::{AutoencoderKL, LatentSpace};
use rand::SeedableRng;
use serde::Serialize;

use crate::experts::Guidance;
use crate::registry::Registry;
use crate::sampler::{Ensemble, ExpertSlot, LearnedRouter, Posterior};
use crate::strategy::Strategy;

/// Which classes a class-conditional sample draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Classes {
    /// Every sample of this class.
    One(usize),
    /// Class-balanced: sample i of class i mod C, so every class gets N / C samples (the whole
    /// distribution, for scoring a conditional system).
    All,
}

impl std::str::FromStr for Classes {
    type Err = String;

    /// A class id, or `all`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "all" => Ok(Classes::All),
            id => id
                .parse()
                .map(Classes::One)
                .map_err(|_| format!("bad class `{s}`: expected a class id or `all`")),
        }
    }
}

impl std::fmt::Display for Classes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Classes::One(c) => write!(f, "{c}"),
            Classes::All => write!(f, "all"),
        }
    }
}

impl Classes {
    /// The class of each of `n` samples, for experts conditioned on `classes` classes.
    pub fn ids(&self, n: usize, classes: usize) -> Vec<i64> {
        match *self {
            Classes::One(c) => vec![c as i64; n],
            Classes::All => (0..n).map(|i| (i % classes) as i64).collect(),
        }
    }

    /// The largest class id asked for.
    pub fn max_id(&self, classes: usize) -> usize {
        match *self {
            Classes::One(c) => c,
            Classes::All => classes.saturating_sub(1),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouterChoice {
    /// The registered, trained router.
    Learned,
    /// The analytic router from the registered per-cluster statistics.
    Analytic,
}

/// What to sample from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A registry's routed ensemble.
    Registry(PathBuf),
    /// One dense checkpoint: a monolith, a distilled student, or a single expert.
    Checkpoint(PathBuf),
}

pub struct SampleOptions {
    pub source: Source,
    pub n: usize,
    pub steps: usize,
    pub solver: Solver,
    /// Where the steps fall between t = 1 and t = 0.
    pub schedule: StepSchedule,
    /// The strategy; None: [`Strategy::default_for`] (chosen by whether the router sees the class).
    pub strategy: Option<Strategy>,
    pub router: RouterChoice,
    pub allow_missing: bool,
    /// The most bytes the loaded local experts' weights may take (least recently used unloaded).
    pub max_memory: Option<u64>,
    /// Samples integrated at once (the rest wait for the next batch).
    pub batch: usize,
    /// Class-conditional sampling: which classes.
    pub class: Option<Classes>,
    /// Classifier-free guidance scale on the class and the conditioning vectors (1: none).
    pub guidance: f64,
    /// Per-sample conditioning vectors for a vector-conditioned router and experts.
    pub condition: Option<ConditionInput>,
    pub seed: u64,
    /// The PNG grid (`NAME.png`); `NAME.safetensors` and `NAME.json` are written beside it.
    pub out: PathBuf,
    pub device: Device,
    /// The precision the experts compute in (bf16/f16: their f32 weights cast when loaded; the
    /// router, the solver and the decoder stay f32).
    pub precision: Precision,
    /// Decode latent samples into images (experts trained on VAE latents).
    pub decode: Decode,
}

/// Whether (and with which VAE) latent samples are decoded into images.
#[derive(Debug, Clone, PartialEq)]
pub enum Decode {
    /// Write the samples as they are (latents stay latents).
    No,
    /// With the registry's VAE.
    Registry,
    /// With this autoencoder checkpoint (it must be the VAE of the experts' latent space).
    File(PathBuf),
}

/// A VAE that turns latent samples into images.
pub struct Decoder {
    pub space: LatentSpace,
    pub vae: AutoencoderKL,
    /// Where it came from (named in the report).
    pub source: String,
}

impl Decoder {
    /// Decode samples `[N, L*s*s]` (in the experts' scaled space) into images `[N, C*S*S]`, 64 at
    /// a time.
    pub fn decode(&self, x0: &HostTensor, device: &Device, progress: &dyn Progress) -> HostTensor {
        let n = x0.shape[0];
        let per: usize = self.space.latent_shape.iter().product();
        let per_image: usize = self.space.image_shape.iter().product();
        let mut out = Vec::with_capacity(n * per_image);
        progress.begin(&format!("decode {n}"), n as u64);
        for start in (0..n).step_by(64) {
            let b = 64.min(n - start);
            let mut shape = vec![b];
            shape.extend(&self.space.latent_shape);
            let z = HostTensor::new(shape, x0.data[start * per..(start + b) * per].to_vec())
                .to_tensor::<4>(device);
            let images = self.vae.decode(self.space.to_vae(z)); // [b, C, S, S]
            out.extend(HostTensor::from_tensor(images).data);
            progress.advance(b as u64);
        }
        progress.finish();
        HostTensor::new(vec![n, per_image], out)
    }
}

/// The decoder `decode` asks for, for experts trained in `space` (None: pixel space).
fn decoder(
    decode: &Decode,
    space: Option<&LatentSpace>,
    registry: Option<&Registry>,
    device: &Device,
) -> anyhow::Result<Option<Decoder>> {
    if *decode == Decode::No {
        if let Some(space) = space {
            tracing::info!(
                "the experts sample latents of {}; pass --decode (or --vae FILE) for images",
                space.describe()
            );
        }
        return Ok(None);
    }
    let Some(space) = space else {
        bail!("--decode: the experts were trained in pixel space; there is nothing to decode");
    };
    let (path, ckpt, source) = match (decode, registry) {
        (Decode::File(p), _) => (p.clone(), Checkpoint::read(p)?, p.display().to_string()),
        (Decode::Registry, Some(reg)) => {
            let entry = reg.index.vae.as_ref().with_context(|| {
                format!(
                    "--decode: the registry {} holds no VAE; register it (ddm register --registry REG autoencoder.safetensors) or pass --vae FILE",
                    reg.dir.display()
                )
            })?;
            let (blob, ckpt) = reg.verified_checkpoint(crate::registry::claims::Claim::Vae)?;
            (blob, ckpt, entry.source.clone())
        }
        (Decode::Registry, None) => bail!("--decode with --checkpoint needs the VAE: pass --vae FILE"),
        (Decode::No, _) => unreachable!("returned above"),
    };
    let own = ckpt.latent_space().with_context(|| {
        format!(
            "{}: a checkpoint of role {}, not an autoencoder",
            path.display(),
            ckpt.meta.role
        )
    })?;
    if own != *space {
        bail!(
            "{}: this VAE's latent space is {}, but the experts were trained in {}",
            path.display(),
            own.describe(),
            space.describe()
        );
    }
    Ok(Some(Decoder {
        space: space.clone(),
        vae: ckpt.autoencoder(&path, device)?,
        source,
    }))
}

#[derive(Debug, Clone, Serialize)]
pub struct StepRange {
    pub t_from: f64,
    pub t_to: f64,
    /// Samples routed to each expert, summed over the steps of the range.
    pub rows_per_expert: Vec<usize>,
}

/// An expert lost during sampling (a server that stopped answering, a checkpoint that is gone).
#[derive(Debug, Clone, Serialize)]
pub struct LostReport {
    pub expert: usize,
    /// The server's URL or the checkpoint's path.
    pub location: String,
    /// The batch of samples (0-based, of `batch_size` samples each) in which it failed, the
    /// first step (0-based) of that batch sampled without it, and that step's t; the batches
    /// after it sample without it from their first step.
    pub batch: usize,
    pub from_step: usize,
    pub t: f64,
    pub error: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub strategy: String,
    pub router: String,
    /// The classes sampled (`3`, `all`), if conditional.
    pub class: Option<String>,
    pub guidance: Option<f64>,
    /// Whether the router saw the class (a conditioned router given a class).
    pub router_sees_class: bool,
    /// Whether the router saw per-sample conditioning vectors (`--condition`).
    pub router_sees_vectors: bool,
    /// Whether the router saw per-sample token sequences (`--condition`'s `c_tokens`, or
    /// `--prompt`).
    pub router_sees_tokens: bool,
    /// Router evaluations per sample (steps for most strategies, 1 for `trajectory`).
    pub router_calls_per_sample: f64,
    pub n: usize,
    pub steps: usize,
    pub solver: String,
    #[serde(default)]
    pub schedule: String,
    pub experts_present: Vec<usize>,
    pub experts_missing: Vec<usize>,
    pub experts_loaded: Vec<usize>,
    /// Experts served elsewhere (`ddm serve`) that the sampler called over the network.
    pub experts_remote: Vec<usize>,
    /// Experts that failed (with --allow-missing): left out from `from_step` on.
    pub experts_lost: Vec<LostReport>,
    /// Times each expert was loaded into this process (more than once under --max-memory).
    pub expert_loads: Vec<usize>,
    /// Experts unloaded to stay under --max-memory.
    pub expert_evictions: usize,
    /// The most local experts that were in memory at once.
    pub experts_held_peak: usize,
    pub max_memory_mib: Option<f64>,
    /// Samples integrated at once (`--batch-size`); N samples take ceil(N / batch) batches.
    pub batch_size: usize,
    pub seconds: f64,
    pub seconds_per_step: f64,
    pub expert_evaluations: usize,
    pub usage: Vec<StepRange>,
    pub peak_rss_mib: Option<f64>,
    pub png: String,
    pub tensors: String,
    /// The VAE the latent samples were decoded with (`x0` then holds images, `latents` the
    /// samples); None when not decoded.
    pub decoded_with: Option<String>,
}

/// Refuse to sample when the samples alone (`n` rows of `values` f32) need more memory than this
/// machine has available.
fn check_output_memory(n: usize, values: usize) -> anyhow::Result<()> {
    let need = n as f64 * values as f64 * 4.0;
    if let Some(available) = ddm_core::host::available_memory()
        && need > available
    {
        bail!(
            "--n {n}: the samples alone take {:.1} GB, more than the {:.1} GB this machine has available; draw them in several runs (--seed differs)",
            need / 1e9,
            available / 1e9
        );
    }
    Ok(())
}

/// The usage of evaluation i of an integration, summed over the batches (each batch is one
/// integration of `evaluations` evaluations).
fn per_evaluation(
    usage: &[crate::sampler::Usage],
    evaluations: usize,
    k: usize,
) -> Vec<crate::sampler::Usage> {
    let mut out = vec![
        crate::sampler::Usage {
            rows_per_expert: vec![0; k],
            router_rows: 0,
        };
        evaluations.min(usage.len())
    ];
    for (i, u) in usage.iter().enumerate() {
        let o = &mut out[i % evaluations];
        for (a, b) in o.rows_per_expert.iter_mut().zip(&u.rows_per_expert) {
            *a += b;
        }
        o.router_rows += u.router_rows;
    }
    out
}

/// Peak resident memory of this process (Linux `VmHWM`), in MiB.
pub fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = s
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// The samples' and the report's paths beside the PNG grid `out` (`NAME.png` -> `NAME.safetensors`,
/// `NAME.json`). `out` must end in `.png`, so two different `--out`s never share an output and no
/// output overwrites another.
pub fn output_paths(out: &std::path::Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let png = out
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("png"));
    if !png {
        bail!(
            "--out {}: the PNG grid's name must end in .png (the samples and the report are written beside it, as NAME.safetensors and NAME.json)",
            out.display()
        );
    }
    Ok((out.with_extension("safetensors"), out.with_extension("json")))
}

/// A drift that reports each evaluation to a [`Progress`].
struct Counted<'e, 'a> {
    inner: &'e mut Ensemble<'a>,
    progress: &'e dyn Progress,
}

impl Drift<2> for Counted<'_, '_> {
    fn drift(&mut self, x_t: Tensor<2>, t: Tensor<1>, c: &Condition) -> Result<Tensor<2>, VelocityError> {
        let v = self.inner.drift(x_t, t, c)?;
        self.progress.advance(1);
        Ok(v)
    }
}

/// Sample as `o` says, reporting each ensemble evaluation (one per Euler step, two per Heun
/// step) to `progress`.
pub fn sample(o: &SampleOptions, progress: &dyn Progress) -> anyhow::Result<Report> {
    if o.out.is_dir() {
        bail!(
            "{}: a directory; --out names the PNG grid to write (e.g. {})",
            o.out.display(),
            o.out.join("samples.png").display()
        );
    }
    output_paths(&o.out)?;
    // Sampling can take long: find an unwritable --out before it.
    ddm_core::fsio::check_writable(&o.out)?;
    o.precision.check(&o.device)?;
    let device = o.device.clone();
    let reg_path = match &o.source {
        Source::Registry(p) => p,
        Source::Checkpoint(path) => return sample_checkpoint(o, path, progress),
    };
    let mut reg = Registry::open(reg_path)?;
    reg.precision = o.precision;
    let k = reg.index.k;
    let missing: Vec<usize> = (0..k).filter(|c| !reg.index.experts.contains_key(c)).collect();
    if !missing.is_empty() && !o.allow_missing {
        bail!(
            "experts missing for clusters {missing:?} (their islands have not registered); pass --allow-missing to sample \
             with the {} present, the router's weights renormalised over them",
            k - missing.len()
        );
    }
    if !missing.is_empty() {
        tracing::warn!(
            "sampling without the experts of clusters {missing:?}; the router's weights are renormalised"
        );
    }
    let classes = reg.expert_classes()?;
    let guidance = guidance(o, classes)?;
    let experts: Vec<ExpertSlot> = (0..k)
        .map(|c| reg.expert_slot(c, &device, guidance))
        .collect::<anyhow::Result<_>>()?;
    let router = router(o, &reg, &device)?;
    // A learned router's classes are the experts' (registration checks it; an index written by
    // hand may not). The analytic router knows the classes its statistics counted: it is told the
    // class only when those are the experts'.
    let router_classes = router.as_ref().map_or(0, |r| r.classes());
    if o.router == RouterChoice::Learned && router_classes > 0 && router_classes != classes {
        bail!(
            "the router knows {router_classes} classes, the experts {classes}: they were trained on different labels"
        );
    }
    let router_sees_class = o.class.is_some() && router_classes == classes;
    if o.class.is_some() && router.is_some() && !router_sees_class {
        tracing::warn!(
            "the router is not conditioned on the class: it weights the experts by p(k | x_t) (the prior at t = 1), not p(k | x_t, c)"
        );
    }
    let condition = match &o.condition {
        None => None,
        Some(input) => {
            let (c, what) = input.read(reg.index.text.as_ref())?;
            let dims = (router.as_deref(), experts_vector_dim(&reg)?);
            let reads_vectors = dims.1.is_some() || dims.0.is_some_and(|r| r.condition_dim().is_some());
            // Token sequences go to PixArt experts and a router that reads them; vectors to
            // whoever reads them.
            let tokens = match token_width(router.as_deref(), experts_token_dim(&reg)?)? {
                Some(dt) => {
                    c.check_tokens(&what, o.n, dt)?;
                    c.tokens
                }
                None => None,
            };
            let vectors = match reads_vectors || tokens.is_none() {
                true => Some(condition_vectors(c.vectors, &what, o.n, dims)?),
                false => None,
            };
            Some(ConditionTensors { vectors, tokens })
        }
    };
    let router_sees_vectors = condition.as_ref().is_some_and(|c| c.vectors.is_some())
        && router.as_ref().is_some_and(|r| r.condition_dim().is_some());
    let router_sees_tokens = condition.as_ref().is_some_and(|c| c.tokens.is_some())
        && router.as_ref().is_some_and(|r| r.token_dim().is_some());
    let strategy = o
        .strategy
        .unwrap_or_else(|| Strategy::default_for(router_sees_class));
    let mut ensemble = Ensemble::new(experts, router, strategy, o.seed)?;
    if !router_sees_class {
        ensemble = ensemble.route_without_class();
    }
    if o.allow_missing {
        ensemble = ensemble.tolerate_lost_experts();
    }
    if let Some(bytes) = o.max_memory {
        ensemble = ensemble.with_memory_cap(bytes);
    }
    let shape = reg.index.data.shape.clone();
    let decoder = decoder(&o.decode, reg.index.latent.as_ref(), Some(&reg), &device)?;
    run(
        o,
        Sampled {
            ensemble,
            strategy,
            k,
            missing,
            classes,
            class_names: reg.index.class_names.clone(),
            shape,
            router_sees_class,
            router_sees_vectors,
            router_sees_tokens,
            condition,
            decoder,
        },
        progress,
    )
}

/// The router the strategy needs (none for one that routes without it), learned or analytic.
fn router(o: &SampleOptions, reg: &Registry, device: &Device) -> anyhow::Result<Option<Box<dyn Posterior>>> {
    if !o.strategy.is_none_or(|s| s.uses_router()) {
        return Ok(None);
    }
    Ok(Some(match o.router {
        RouterChoice::Learned => {
            let net = reg.router(device)?;
            if o.class.is_none() && !net.routes_without_class() {
                bail!(
                    "the router is conditioned on the class and was trained without condition dropout (no null class): sample with --class"
                );
            }
            Box::new(LearnedRouter { net, k: reg.index.k })
        }
        RouterChoice::Analytic => Box::new(reg.analytic_router()?),
    }))
}

/// The width of the conditioning vectors the registry's experts read (None: they read none);
/// experts that disagree are refused.
fn experts_vector_dim(reg: &Registry) -> anyhow::Result<Option<usize>> {
    experts_width(reg, |e| e.condition_dim, "conditioning vectors", "a condition")
}

/// The one width of `what` the registry's experts read (`width` of each entry; None: none);
/// experts that disagree are refused, as they cannot share `shared`.
fn experts_width(
    reg: &Registry,
    width: impl Fn(&crate::registry::Entry) -> Option<usize>,
    what: &str,
    shared: &str,
) -> anyhow::Result<Option<usize>> {
    let dims: std::collections::BTreeSet<Option<usize>> = reg.index.experts.values().map(width).collect();
    match dims.len() {
        0 | 1 => Ok(dims.into_iter().next().flatten()),
        _ => bail!(
            "the registry's experts read {what} of different widths ({dims:?}): they cannot share {shared}"
        ),
    }
}

/// The width of the token embeddings the registry's experts read (None: they read none); experts
/// that disagree are refused.
fn experts_token_dim(reg: &Registry) -> anyhow::Result<Option<usize>> {
    experts_width(reg, |e| e.token_dim, "token sequences", "a caption")
}

/// The width of the token states the router and the experts read (None: neither reads token
/// sequences); the two must agree.
fn token_width(router: Option<&dyn Posterior>, experts: Option<usize>) -> anyhow::Result<Option<usize>> {
    match (router.and_then(|r| r.token_dim()), experts) {
        (Some(r), Some(e)) if r != e => {
            bail!("the router reads token states of width {r}, the experts of width {e}")
        }
        (r, e) => Ok(r.or(e)),
    }
}

/// `prompts` through the text encoder at `text_encoder` (pooled vectors and token states): sample
/// i of `n` gets prompt i modulo their count.
pub fn prompt_condition(prompts: &[String], text_encoder: &Path, n: usize) -> anyhow::Result<ConditionInput> {
    let ckpt = ddm_core::checkpoint::Checkpoint::read(text_encoder)?;
    if ckpt.meta.role != ddm_core::checkpoint::Role::TextEncoder {
        bail!(
            "{}: a checkpoint of role {}; prompts go through a text encoder (ddm import --from transformers-clip)",
            text_encoder.display(),
            ckpt.meta.role
        );
    }
    if prompts.is_empty() {
        bail!("no prompt to sample");
    }
    let device = ddm_core::device::cpu();
    let (encoder, tokenizer) = ckpt.text_encoder(text_encoder, &device)?;
    let (ids, mask) = tokenizer.encode(prompts)?.to_tensors(&device);
    let out = encoder.forward(ids, mask.clone());
    // Sample i reads prompt i modulo their count: rows of [P, ...] -> [N, ...].
    let rows = |t: HostTensor| {
        let per: usize = t.shape[1..].iter().product();
        let mut shape = t.shape.clone();
        shape[0] = n;
        let p = prompts.len();
        let data = (0..n)
            .flat_map(|i| t.data[(i % p) * per..(i % p + 1) * per].to_vec())
            .collect();
        HostTensor::new(shape, data)
    };
    let condition = ConditionTensors {
        vectors: Some(rows(HostTensor::from_tensor(out.pooled))), // [N, D]
        tokens: Some((
            rows(HostTensor::from_tensor(out.tokens)), // [N, L, D]
            rows(HostTensor::from_tensor(mask)),       // [N, L]
        )),
    };
    Ok(ConditionInput::Prompts {
        condition,
        text: ckpt.text_space().expect("a text encoder has a text space"),
    })
}

/// Where the condition comes from.
#[derive(Debug, Clone)]
pub enum ConditionInput {
    /// A safetensors file, row i for sample i: pooled vectors `c` `[N, Dc]` and/or token
    /// sequences `c_tokens` `[N, L, Dt]` with their mask `c_mask` `[N, L]` (1: token, 0: padding).
    File(PathBuf),
    /// Prompts encoded by a text encoder (its pooled vectors and token states), and the
    /// encoder's text space (which must be the models').
    Prompts {
        condition: ConditionTensors,
        text: TextSpace,
    },
}

/// A per-sample condition on the host: pooled vectors `[N, Dc]`, token sequences `[N, L, Dt]`
/// and their mask `[N, L]`.
#[derive(Debug, Clone, Default)]
pub struct ConditionTensors {
    pub vectors: Option<HostTensor>,
    pub tokens: Option<(HostTensor, HostTensor)>,
}

impl ConditionTensors {
    /// Rows `rows` on `device`.
    fn rows(&self, rows: std::ops::Range<usize>, device: &Device) -> (Option<Tensor<2>>, Option<Tokens>) {
        let b = rows.len();
        let take = |t: &HostTensor| {
            let per: usize = t.shape[1..].iter().product();
            let mut shape = t.shape.clone();
            shape[0] = b;
            HostTensor::new(shape, t.data[rows.start * per..rows.end * per].to_vec())
        };
        (
            self.vectors.as_ref().map(|c| take(c).to_tensor::<2>(device)),
            self.tokens.as_ref().map(|(e, m)| Tokens {
                embeddings: take(e).to_tensor::<3>(device),
                mask: take(m).to_tensor::<2>(device),
            }),
        )
    }

    /// The token sequences, checked for `n` samples of models that read tokens of width `dt`.
    fn check_tokens(&self, what: &str, n: usize, dt: usize) -> anyhow::Result<()> {
        let Some((e, m)) = &self.tokens else {
            bail!(
                "{what}: no token sequences (`c_tokens`, `c_mask`), and the model reads a caption's tokens"
            );
        };
        let l = e.shape.get(1).copied().unwrap_or(0);
        if e.shape.len() != 3 || e.shape[0] != n || e.shape[2] != dt || l == 0 {
            bail!(
                "{what}: `c_tokens` has shape {:?}; the model reads [{n}, L, {dt}] (one sequence per sample, --n {n})",
                e.shape
            );
        }
        if m.shape != [n, l] {
            bail!("{what}: `c_mask` has shape {:?}; expected [{n}, {l}]", m.shape);
        }
        if let Some(bad) = m.data.iter().find(|v| **v != 0.0 && **v != 1.0) {
            bail!("{what}: `c_mask` holds {bad}; expected 1 (a token) or 0 (padding)");
        }
        Ok(())
    }
}

impl ConditionInput {
    /// The condition, named for messages; prompts only in the models' text space `models`.
    fn read(&self, models: Option<&TextSpace>) -> anyhow::Result<(ConditionTensors, String)> {
        match self {
            ConditionInput::File(path) => {
                let f = ddm_core::host::TensorFile::read(path)?;
                let vectors = f.contains("c").then(|| f.f32("c")).transpose()?;
                let tokens = match f.contains("c_tokens") {
                    false => None,
                    true => Some((f.f32("c_tokens")?, f.f32("c_mask")?)),
                };
                if vectors.is_none() && tokens.is_none() {
                    bail!(
                        "{}: holds neither `c` (pooled vectors) nor `c_tokens` and `c_mask` (token sequences)",
                        path.display()
                    );
                }
                Ok((ConditionTensors { vectors, tokens }, path.display().to_string()))
            }
            ConditionInput::Prompts { condition, text } => match models {
                None => bail!(
                    "--prompt: the models sampled do not record which text encoder made the vectors they read (they were not trained on `ddm encode-text` output); give the vectors with --condition"
                ),
                Some(r) if r != text => bail!(
                    "--text-encoder is {}, but the models sampled read the vectors of {}",
                    text.describe(),
                    r.describe()
                ),
                Some(_) => Ok((condition.clone(), "the prompts".into())),
            },
        }
    }
}

/// The conditioning vectors `c` `[n, Dc]` (of `what`), checked against what the router and the
/// experts read (at least one of them must).
fn condition_vectors(
    c: Option<HostTensor>,
    what: &str,
    n: usize,
    (router, experts): (Option<&dyn Posterior>, Option<usize>),
) -> anyhow::Result<HostTensor> {
    let router = router.and_then(|r| r.condition_dim());
    let d = match (router, experts) {
        (None, None) => bail!(
            "{what}: conditioning vectors given, but neither the router nor the experts read any (train them with --condition-vectors)"
        ),
        (Some(r), Some(e)) if r != e => {
            bail!("the router reads conditioning vectors of width {r}, the experts of width {e}")
        }
        (Some(d), _) | (None, Some(d)) => d,
    };
    let Some(c) = c else {
        bail!("{what}: no pooled vectors `c`, and the models read conditioning vectors of width {d}");
    };
    if c.shape != [n, d] {
        bail!(
            "{what}: `c` has shape {:?}; the models read [{n}, {d}] (one vector per sample, --n {n})",
            c.shape
        );
    }
    Ok(c)
}

/// What every expert is asked for: `--class` for experts conditioned on `classes` classes (the
/// largest class id asked for), whether vectors are given, and the guidance scale.
fn guidance(o: &SampleOptions, classes: usize) -> anyhow::Result<Guidance> {
    let max_class = match o.class {
        Some(which) if classes == 0 => {
            bail!("--class {which}: the model is not class-conditional (train it with --class-conditional)")
        }
        Some(Classes::All) if !o.n.is_multiple_of(classes) => bail!(
            "--class all with --n {}: the {classes} classes get equal counts only when --n is a multiple of {classes} (e.g. --n {})",
            o.n,
            o.n.div_ceil(classes) * classes
        ),
        Some(which) => Some(which.max_id(classes)),
        None => None,
    };
    if o.guidance != 1.0 && max_class.is_none() && o.condition.is_none() {
        bail!(
            "--guidance {}: guidance needs a condition: --class, --condition or --prompt",
            o.guidance
        );
    }
    Ok(Guidance {
        max_class,
        vectors: o.condition.is_some(),
        scale: o.guidance,
    })
}

/// One dense checkpoint (a monolith, a distilled student), sampled as an ensemble of one.
fn sample_checkpoint(
    o: &SampleOptions,
    path: &std::path::Path,
    progress: &dyn Progress,
) -> anyhow::Result<Report> {
    let (meta, model) = ddm_core::checkpoint::load(path, &o.device)?;
    let model = ddm_core::precision::cast(model, o.precision);
    if meta.role != ddm_core::checkpoint::Role::Expert {
        bail!(
            "{}: a checkpoint of role {}; --checkpoint samples an expert, a monolith or a distilled student",
            path.display(),
            meta.role
        );
    }
    let classes = meta.model.num_classes();
    let condition = match &o.condition {
        None => None,
        Some(input) => {
            let (c, what) = input.read(meta.text.as_ref())?;
            Some(match meta.model.token_dim() {
                0 => {
                    let dim = Some(meta.model.condition_dim()).filter(|&d| d > 0);
                    ConditionTensors {
                        vectors: Some(condition_vectors(c.vectors, &what, o.n, (None, dim))?),
                        tokens: None,
                    }
                }
                dt => {
                    c.check_tokens(&what, o.n, dt)?;
                    ConditionTensors {
                        vectors: None,
                        tokens: c.tokens,
                    }
                }
            })
        }
    };
    let field =
        crate::experts::velocity_field(&path.display().to_string(), &meta, model, guidance(o, classes)?)?;
    let strategy = Strategy::Oracle { cluster: 0 };
    let ensemble = Ensemble::new(vec![ExpertSlot::ready(field)], None, strategy, o.seed)?;
    let decoder = decoder(&o.decode, meta.latent.as_ref(), None, &o.device)?;
    run(
        o,
        Sampled {
            ensemble,
            strategy,
            k: 1,
            missing: vec![],
            classes,
            class_names: None,
            shape: meta.data.shape.clone(),
            router_sees_class: false,
            router_sees_vectors: false,
            router_sees_tokens: false,
            condition,
            decoder,
        },
        progress,
    )
}

/// What sampling runs: the ensemble and what the report says about it.
struct Sampled<'a> {
    ensemble: Ensemble<'a>,
    strategy: Strategy,
    k: usize,
    missing: Vec<usize>,
    classes: usize,
    /// The classes' names, from the registry (labels of a `--class all` grid).
    class_names: Option<Vec<String>>,
    shape: Vec<usize>,
    router_sees_class: bool,
    router_sees_vectors: bool,
    router_sees_tokens: bool,
    /// The per-sample condition (the router's and the experts' vectors, the experts' token
    /// sequences), row i for sample i.
    condition: Option<ConditionTensors>,
    decoder: Option<Decoder>,
}

/// Integrate from noise, write the samples, the grid and the report.
fn run(o: &SampleOptions, mut s: Sampled<'_>, progress: &dyn Progress) -> anyhow::Result<Report> {
    let per: usize = s.shape.iter().product();
    let out_per = s
        .decoder
        .as_ref()
        .map_or(0, |d| d.space.image_shape.iter().product());
    check_output_memory(o.n, per + out_per)?;
    let t0 = Instant::now();
    let x0 = integrate_batches(o, &mut s, per, progress)?;
    let seconds = t0.elapsed().as_secs_f64();
    let bad = x0.data.iter().filter(|v| !v.is_finite()).count();
    if bad > 0 {
        bail!(
            "the samples hold {bad} NaN or infinite values (the router's weights or an expert's velocities were not finite); nothing written"
        );
    }
    let tensors = write_outputs(o, &s, x0, progress)?;
    let report = report(o, &s, seconds, tensors);
    let (_, report_path) = output_paths(&o.out)?;
    ddm_core::fsio::write_bytes_atomic(
        &report_path,
        &ddm_core::json::to_vec_pretty("the sampling report", &report)?,
    )?;
    Ok(report)
}

/// Evaluations of the ensemble per integration.
fn evaluations(o: &SampleOptions) -> usize {
    o.solver.evaluations_per_step() * o.steps
}

/// The N samples `[N, X]`, integrated batch by batch. The noise is drawn in order from one seeded
/// stream, so batch b holds the rows b * batch.. of the noise one batch of all N would have.
fn integrate_batches(
    o: &SampleOptions,
    s: &mut Sampled<'_>,
    per: usize,
    progress: &dyn Progress,
) -> anyhow::Result<HostTensor> {
    let device = o.device.clone();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(o.seed);
    let times = o.schedule.times(o.steps);
    let ids = o.class.map(|which| which.ids(o.n, s.classes));
    let batches = o.n.div_ceil(o.batch);
    progress.begin(
        &format!("sample {} ({})", o.n, s.strategy),
        (evaluations(o) * batches) as u64,
    );
    let mut samples = Vec::new();
    samples
        .try_reserve_exact(o.n * per)
        .map_err(|_| anyhow::anyhow!("--n {}: no memory for {} samples of {per} values", o.n, o.n))?;
    for start in (0..o.n).step_by(o.batch) {
        let rows = start..(start + o.batch).min(o.n);
        let b = rows.len();
        let x1 = flow::randn(vec![b, per], &mut rng).to_tensor::<2>(&device);
        let (vector, tokens) = match &s.condition {
            Some(cond) => cond.rows(rows.clone(), &device),
            None => (None, None),
        };
        let c = Condition {
            class: ids.as_ref().map(|ids| {
                Tensor::<1, Int>::from_data(TensorData::new(ids[rows.clone()].to_vec(), [b]), &device)
            }),
            vector,
            tokens,
        };
        s.ensemble.restart(); // new trajectories
        let mut counted = Counted {
            inner: &mut s.ensemble,
            progress,
        };
        let x0 = flow::integrate(&mut counted, x1, &c, &times, o.solver)?;
        samples.extend(HostTensor::from_tensor(x0).data); // device sync: the timing includes all the work
    }
    progress.finish();
    Ok(HostTensor::new(vec![o.n, per], samples))
}

/// Write the samples (decoded into images when asked: `x0` the images, `latents` the samples) and
/// the PNG grid; returns the tensors' path.
fn write_outputs(
    o: &SampleOptions,
    s: &Sampled<'_>,
    x0: HostTensor,
    progress: &dyn Progress,
) -> anyhow::Result<PathBuf> {
    let mut outputs = BTreeMap::new();
    let (x0, shape) = match &s.decoder {
        None => (x0, s.shape.clone()),
        Some(d) => {
            let mut latent_shape = vec![o.n];
            latent_shape.extend(&s.shape);
            outputs.insert(
                "latents".to_string(),
                HostTensor::new(latent_shape, x0.data.clone()),
            );
            (d.decode(&x0, &o.device, progress), d.space.image_shape.clone())
        }
    };
    let per: usize = shape.iter().product();
    let (tensors_path, _) = output_paths(&o.out)?;
    let mut full_shape = vec![o.n];
    full_shape.extend(&shape);
    if shape.len() == 3 && (shape[0] == 1 || shape[0] == 3) {
        let px = ddm_core::grid::to_u8(&x0.data);
        let cells: Vec<Option<&[u8]>> = px.chunks(per).map(Some).collect();
        let layout = grid_layout(o, s, shape[1]);
        ddm_core::grid::write_grid_png_with(&o.out, &cells, [shape[0], shape[1], shape[2]], &layout)?;
    }
    outputs.insert("x0".to_string(), HostTensor::new(full_shape, x0.data));
    write_tensors(&tensors_path, &outputs, &BTreeMap::new())?;
    Ok(tensors_path)
}

/// The PNG grid's layout: for `--class all`, one column per class (sample i is of class i mod C)
/// under its name; else a square. Cells are upscaled to be seen, unless there are hundreds.
fn grid_layout(o: &SampleOptions, s: &Sampled<'_>, height: usize) -> Layout {
    let mut layout = match o.class {
        Some(Classes::All) if s.classes > 0 && o.n >= s.classes => {
            let name = |c: usize| s.class_names.as_ref().and_then(|n| n.get(c).cloned());
            Layout {
                col_labels: (0..s.classes)
                    .map(|c| name(c).unwrap_or_else(|| format!("class {c}")))
                    .collect(),
                ..Layout::for_people(s.classes, height)
            }
        }
        _ => Layout::for_people((o.n as f64).sqrt().ceil() as usize, height),
    };
    if o.n > 400 {
        layout.scale = 1;
    }
    layout
}

/// Expert usage per step range: the evaluations of every batch summed, in at most 5 ranges of t.
fn usage_ranges(usage: &[crate::sampler::Usage], k: usize, t_of: &dyn Fn(usize) -> f64) -> Vec<StepRange> {
    let ranges = 5.min(usage.len()).max(1);
    let per_range = usage.len().div_ceil(ranges).max(1);
    usage
        .chunks(per_range)
        .enumerate()
        .map(|(r, c)| StepRange {
            t_from: t_of(r * per_range),
            t_to: t_of(r * per_range + c.len() - 1),
            rows_per_expert: (0..k)
                .map(|e| c.iter().map(|u| u.rows_per_expert[e]).sum())
                .collect(),
        })
        .collect()
}

/// What the sampling did.
fn report(o: &SampleOptions, s: &Sampled<'_>, seconds: f64, tensors: PathBuf) -> Report {
    let (ensemble, k, evaluations) = (&s.ensemble, s.k, evaluations(o));
    let expert_evaluations: usize = ensemble
        .usage
        .iter()
        .map(|u| u.rows_per_expert.iter().filter(|&&r| r > 0).count())
        .sum();
    let usage = per_evaluation(&ensemble.usage, evaluations, k);
    // Evaluation i belongs to step i / (evaluations per step), which starts at times[step].
    let times = o.schedule.times(o.steps);
    let evals_per_step = evaluations / o.steps;
    let t_of = |i: usize| times[(i / evals_per_step).min(o.steps.saturating_sub(1))];
    let router_rows: usize = usage.iter().map(|u| u.router_rows).sum();
    Report {
        class: o.class.map(|c| c.to_string()),
        guidance: (o.class.is_some() || o.condition.is_some()).then_some(o.guidance),
        router_sees_class: s.router_sees_class,
        router_sees_vectors: s.router_sees_vectors,
        router_sees_tokens: s.router_sees_tokens,
        router_calls_per_sample: router_rows as f64 / o.n.max(1) as f64,
        strategy: s.strategy.to_string(),
        router: match (s.strategy.uses_router(), o.router) {
            (false, _) => "none".into(),
            (true, RouterChoice::Learned) => "learned".into(),
            (true, RouterChoice::Analytic) => "analytic".into(),
        },
        n: o.n,
        steps: o.steps,
        solver: o.solver.name().into(),
        schedule: o.schedule.to_string(),
        experts_present: (0..k).filter(|c| !s.missing.contains(c)).collect(),
        experts_missing: s.missing.clone(),
        experts_loaded: (0..k).filter(|&c| ensemble.experts[c].is_loaded()).collect(),
        experts_remote: (0..k).filter(|&c| ensemble.experts[c].is_remote()).collect(),
        experts_lost: ensemble
            .lost_experts()
            .iter()
            .map(|l| LostReport {
                expert: l.expert,
                location: l.location.clone(),
                batch: l.evaluation / evaluations,
                from_step: (l.evaluation % evaluations) / evals_per_step,
                t: t_of(l.evaluation % evaluations),
                error: l.error.clone(),
            })
            .collect(),
        expert_loads: ensemble.experts.iter().map(|e| e.loads()).collect(),
        expert_evictions: ensemble.evictions(),
        experts_held_peak: ensemble.held_peak(),
        max_memory_mib: o.max_memory.map(|b| b as f64 / (1 << 20) as f64),
        batch_size: o.batch,
        seconds,
        seconds_per_step: seconds / o.steps as f64,
        expert_evaluations,
        usage: usage_ranges(&usage, k, &t_of),
        peak_rss_mib: peak_rss_mib(),
        png: o.out.display().to_string(),
        tensors: tensors.display().to_string(),
        decoded_with: s.decoder.as_ref().map(|d| d.source.clone()),
    }
}
