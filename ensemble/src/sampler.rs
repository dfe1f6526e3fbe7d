//! The routed ensemble as one velocity field: at every step, for every sample, the router gives
//! p(k | x_t, t) (p(k | x_t, t, c) for a conditioned router told the class c), the strategy picks
//! and weights experts, and
//!
//!   v(x_t, t) = sum over selected k of w_k v_k(x_t, t).
//!
//! The `trajectory` strategy routes once: at the first evaluation of an integration it draws one
//! expert per sample from the router's posterior and keeps it for the whole trajectory (a new
//! integration is recognised by a new batch size or by t rising again; [`Ensemble::restart`]
//! forces one).
//!
//! Dispatch is grouped: the rows that chose expert k are gathered, expert k runs once on them, and
//! its weighted velocity is scatter-added back. Each expert runs at most once per evaluation.
//! Experts served elsewhere ([`RemoteExpert`]) are called concurrently, each from its own thread,
//! while the local ones compute, so a step costs about its slowest expert, not the sum.
//! Local experts are loaded lazily, on first use; under a memory cap
//! ([`Ensemble::with_memory_cap`]) the least recently used ones are unloaded to make room, and
//! loaded again when selected. A missing expert (an island that failed) is renormalised away by the
//! strategy; so is an expert that fails (a server that stops answering, a checkpoint that is gone or
//! corrupted), from the step it failed, when the ensemble is told to
//! [`Ensemble::tolerate_lost_experts`] (otherwise its failure is the sampling's error).

use std::cell::{Cell, RefCell};

use anyhow::Context;

use ddm_core::burn::prelude::*;
use ddm_core::burn::tensor::IndexingUpdateOp;
use ddm_core::burn::tensor::activation::softmax;
use ddm_core::flow::VelocityField;
use ddm_core::host::HostTensor;
use ddm_router::analytic::AnalyticRouter;
use ddm_router::net::RouterNet;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::remote::RemoteExpert;
use crate::strategy::Strategy;

/// Anything that gives the cluster posterior per sample: p(k | x_t, t), or p(k | x_t, t, c) when
/// it is conditioned and given classes.
pub trait Posterior {
    fn k(&self) -> usize;
    /// Classes the posterior is conditioned on (0: it ignores any class it is given).
    fn classes(&self) -> usize;
    /// The length of the conditioning vectors it reads (None: it reads none).
    fn condition_dim(&self) -> Option<usize> {
        None
    }
    /// # Shapes
    /// - `x_t`: `[N, X]`, `t`: `[N]`, `y`: `[N]` class ids (null class = `classes()`),
    ///   `c`: `[N, Dc]` conditioning vectors -> N rows of K probabilities
    fn probs(
        &self,
        x_t: &Tensor<2>,
        t: &Tensor<1>,
        y: Option<&Tensor<1, Int>>,
        c: Option<&Tensor<2>>,
    ) -> Vec<Vec<f64>>;
}

/// A trained router network.
pub struct LearnedRouter {
    pub net: RouterNet,
    pub k: usize,
}

impl Posterior for LearnedRouter {
    fn k(&self) -> usize {
        self.k
    }

    fn classes(&self) -> usize {
        self.net.classes()
    }

    fn condition_dim(&self) -> Option<usize> {
        self.net.condition_dim()
    }

    fn probs(
        &self,
        x_t: &Tensor<2>,
        t: &Tensor<1>,
        y: Option<&Tensor<1, Int>>,
        c: Option<&Tensor<2>>,
    ) -> Vec<Vec<f64>> {
        let logits = self.net.logits(x_t.clone(), t.clone(), y.cloned(), c.cloned());
        let p = HostTensor::from_tensor(softmax(logits, 1)); // device sync
        p.data
            .chunks(self.k)
            .map(|r| r.iter().map(|&v| v as f64).collect())
            .collect()
    }
}

impl Posterior for AnalyticRouter {
    fn k(&self) -> usize {
        AnalyticRouter::k(self)
    }

    fn classes(&self) -> usize {
        AnalyticRouter::classes(self)
    }

    /// Conditioning vectors are ignored: the analytic router has no model of p(k | c) for them.
    fn probs(
        &self,
        x_t: &Tensor<2>,
        t: &Tensor<1>,
        y: Option<&Tensor<1, Int>>,
        _c: Option<&Tensor<2>>,
    ) -> Vec<Vec<f64>> {
        let x = HostTensor::from_tensor(x_t.clone());
        let t = HostTensor::from_tensor(t.clone()).data;
        let classes = AnalyticRouter::classes(self);
        // Class ids per row; the null class (and any id of an unconditioned router) is None.
        let y: Vec<Option<usize>> = match y {
            Some(y) if classes > 0 => {
                let ids = y.clone().into_data().convert::<i64>();
                ids.iter::<i64>()
                    .map(|c| (c >= 0 && (c as usize) < classes).then_some(c as usize))
                    .collect()
            }
            _ => vec![None; t.len()],
        };
        let d = x.shape[1];
        x.data
            .chunks(d)
            .zip(t)
            .zip(y)
            .map(|((r, t), c)| {
                let r: Vec<f64> = r.iter().map(|&v| v as f64).collect();
                self.posterior_given(&r, t as f64, c)
            })
            .collect()
    }
}

type Loader<'a> = Box<dyn Fn() -> anyhow::Result<Box<dyn VelocityField<2> + 'a>> + 'a>;

/// One expert: local (loaded on first use, unloaded when a memory cap needs the room) or served
/// elsewhere.
pub struct ExpertSlot<'a> {
    loader: Option<Loader<'a>>,
    loaded: RefCell<Option<Box<dyn VelocityField<2> + 'a>>>,
    remote: Option<RemoteExpert>,
    /// Where it lives, for messages and reports: the server's URL or the checkpoint's path.
    location: String,
    /// What its weights take in memory once loaded (a lazy expert's checkpoint size), for the cap.
    bytes: u64,
    /// Times a lazy expert was loaded (more than once when a memory cap unloaded it).
    loads: Cell<usize>,
    /// The evaluation that last selected it (the cap unloads the least recently used first).
    last_used: Cell<usize>,
    /// A served expert that was called.
    called: Cell<bool>,
    /// An expert that failed (and was renormalised away).
    lost: Cell<bool>,
}

impl<'a> ExpertSlot<'a> {
    /// An expert loaded by `loader` the first time it is selected.
    pub fn lazy(loader: impl Fn() -> anyhow::Result<Box<dyn VelocityField<2> + 'a>> + 'a) -> Self {
        Self {
            loader: Some(Box::new(loader)),
            ..Self::missing()
        }
    }

    /// An expert already in memory.
    pub fn ready(field: Box<dyn VelocityField<2> + 'a>) -> Self {
        Self {
            loaded: RefCell::new(Some(field)),
            ..Self::missing()
        }
    }

    /// An expert served elsewhere (`ddm serve`).
    pub fn remote(expert: RemoteExpert) -> Self {
        Self {
            location: expert.client.base.clone(),
            remote: Some(expert),
            ..Self::missing()
        }
    }

    /// Where the expert lives (its checkpoint's path, say) and the bytes its weights take.
    pub fn at(mut self, location: impl Into<String>, bytes: u64) -> Self {
        self.location = location.into();
        self.bytes = bytes;
        self
    }

    /// A missing expert (its island failed or was never registered).
    pub fn missing() -> Self {
        Self {
            loader: None,
            loaded: RefCell::new(None),
            remote: None,
            location: String::new(),
            bytes: 0,
            loads: Cell::new(0),
            last_used: Cell::new(0),
            called: Cell::new(false),
            lost: Cell::new(false),
        }
    }

    pub fn is_present(&self) -> bool {
        !self.lost.get() && (self.loader.is_some() || self.loaded.borrow().is_some() || self.remote.is_some())
    }

    /// Loaded into this process (now or earlier), or (served elsewhere) called.
    pub fn is_loaded(&self) -> bool {
        self.loads.get() > 0 || self.loaded.borrow().is_some() || self.called.get()
    }

    /// Times it was loaded into this process.
    pub fn loads(&self) -> usize {
        self.loads.get()
    }

    /// A lazy expert whose weights are in memory now (what a memory cap counts).
    fn holds_weights(&self) -> bool {
        self.loader.is_some() && self.loaded.borrow().is_some()
    }

    pub fn is_remote(&self) -> bool {
        self.remote.is_some()
    }
}

/// What one evaluation did: rows per expert, and rows the router saw (in evaluation order; the
/// caller knows the times).
#[derive(Debug, Clone, Default)]
pub struct Usage {
    pub rows_per_expert: Vec<usize>,
    pub router_rows: usize,
}

/// An expert that failed during sampling (a server that stopped answering, a checkpoint that is
/// gone) and was renormalised away.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LostExpert {
    pub expert: usize,
    /// The server's URL or the checkpoint's path.
    pub location: String,
    /// The evaluation (0-based) from which it was left out.
    pub evaluation: usize,
    pub error: String,
}

/// The `trajectory` strategy's draw: one expert per sample, and the t of the last evaluation.
struct Assignment {
    experts: Vec<usize>,
    t_last: f32,
}

/// The routed ensemble.
pub struct Ensemble<'a> {
    pub experts: Vec<ExpertSlot<'a>>,
    pub router: Option<Box<dyn Posterior + 'a>>,
    pub strategy: Strategy,
    rng: RefCell<ChaCha8Rng>,
    pub usage: RefCell<Vec<Usage>>,
    assignment: RefCell<Option<Assignment>>,
    /// Whether the router is given the samples' classes (when there are any).
    router_sees_class: bool,
    /// Per-sample conditioning vectors for the router `[N, Dc]`, row i for sample i of the
    /// current integration.
    condition: RefCell<Option<Tensor<2>>>,
    /// First expert-loading error (surfaced by `take_error` after sampling).
    error: RefCell<Option<anyhow::Error>>,
    /// Whether an expert that fails is renormalised away (else it is an error).
    tolerate_lost: bool,
    lost: RefCell<Vec<LostExpert>>,
    /// The most bytes the loaded local experts' weights may take (None: no cap).
    memory_cap: Option<u64>,
    /// Experts unloaded to stay under the cap.
    evictions: Cell<usize>,
    /// The most local experts held in memory at once.
    held_peak: Cell<usize>,
}

impl<'a> Ensemble<'a> {
    pub fn new(
        experts: Vec<ExpertSlot<'a>>,
        router: Option<Box<dyn Posterior + 'a>>,
        strategy: Strategy,
        seed: u64,
    ) -> anyhow::Result<Self> {
        let k = experts.len();
        if !experts.iter().any(|e| e.is_present()) {
            anyhow::bail!("no expert is present");
        }
        match (&router, strategy) {
            (_, Strategy::Oracle { cluster }) if cluster >= k || !experts[cluster].is_present() => {
                anyhow::bail!("oracle cluster {cluster} has no expert (K = {k})")
            }
            (None, s) if s.uses_router() => anyhow::bail!("strategy {s} needs a router"),
            (_, Strategy::TopK { k: top }) if top > k => {
                anyhow::bail!("strategy top-{top} asks for more experts than the K = {k} there are")
            }
            (Some(r), _) if r.k() != k => {
                anyhow::bail!("the router has K = {}, but there are {k} expert slots", r.k())
            }
            _ => {}
        }
        Ok(Self {
            experts,
            router,
            strategy,
            rng: RefCell::new(ChaCha8Rng::seed_from_u64(seed)),
            usage: RefCell::new(vec![]),
            assignment: RefCell::new(None),
            router_sees_class: true,
            condition: RefCell::new(None),
            error: RefCell::new(None),
            tolerate_lost: false,
            lost: RefCell::new(vec![]),
            memory_cap: None,
            evictions: Cell::new(0),
            held_peak: Cell::new(0),
        })
    }

    /// Give the router these conditioning vectors `[N, Dc]`, one per sample of every evaluation
    /// from now on (so every evaluation must be of N samples).
    pub fn set_condition_vectors(&self, c: Option<Tensor<2>>) {
        *self.condition.borrow_mut() = c;
    }

    /// An expert that fails (a served one after its retries; a local one whose checkpoint cannot
    /// be loaded) is left out from that evaluation on, its weight renormalised over the others,
    /// and recorded in [`Ensemble::lost_experts`]; without this its failure is the sampling's
    /// error.
    pub fn tolerate_lost_experts(mut self) -> Self {
        self.tolerate_lost = true;
        self
    }

    /// Experts left out after they failed.
    pub fn lost_experts(&self) -> Vec<LostExpert> {
        self.lost.borrow().clone()
    }

    /// Keep the weights of the loaded local experts under `bytes`: before an expert is loaded,
    /// the least recently used ones are unloaded (and loaded again when next selected). Output is
    /// unchanged; the cost is the reloading.
    pub fn with_memory_cap(mut self, bytes: u64) -> Self {
        self.memory_cap = Some(bytes);
        self
    }

    /// Experts unloaded to stay under the memory cap.
    pub fn evictions(&self) -> usize {
        self.evictions.get()
    }

    /// The most local experts that were in memory at once.
    pub fn held_peak(&self) -> usize {
        self.held_peak.get()
    }

    /// Route without telling the router the class (its classes are not the experts').
    pub fn route_without_class(mut self) -> Self {
        self.router_sees_class = false;
        self
    }

    /// The `trajectory` strategy's current draw: the expert of each sample (None before the
    /// first evaluation).
    pub fn assigned_experts(&self) -> Option<Vec<usize>> {
        self.assignment.borrow().as_ref().map(|a| a.experts.clone())
    }

    /// Start new trajectories: the `trajectory` strategy draws its experts again at the next
    /// evaluation.
    pub fn restart(&self) {
        *self.assignment.borrow_mut() = None;
    }

    pub fn present(&self) -> Vec<bool> {
        self.experts.iter().map(|e| e.is_present()).collect()
    }

    /// An expert-loading error that happened during sampling, if any.
    pub fn take_error(&self) -> Option<anyhow::Error> {
        self.error.borrow_mut().take()
    }

    /// Load every local expert now (an error names the first that cannot be loaded), rather than
    /// when first selected.
    pub fn load_all(&self) -> anyhow::Result<()> {
        for k in 0..self.experts.len() {
            if self.experts[k].loader.is_some() {
                self.load(k)?;
            }
        }
        Ok(())
    }

    /// Local expert `k` in memory, for the current evaluation (under the cap, unloading others).
    fn load(&self, k: usize) -> anyhow::Result<()> {
        let slot = &self.experts[k];
        slot.last_used.set(self.usage.borrow().len());
        if slot.loaded.borrow().is_some() {
            return Ok(());
        }
        let Some(loader) = &slot.loader else {
            anyhow::bail!("expert {k} is missing");
        };
        if let Some(cap) = self.memory_cap {
            self.make_room(k, cap)?;
        }
        let field = loader().with_context(|| format!("loading expert {k} ({})", slot.location))?;
        *slot.loaded.borrow_mut() = Some(field);
        slot.loads.set(slot.loads.get() + 1);
        let held = self.experts.iter().filter(|e| e.holds_weights()).count();
        self.held_peak.set(self.held_peak.get().max(held));
        Ok(())
    }

    /// Unload the least recently used local experts until expert `k` fits under `cap` bytes.
    fn make_room(&self, k: usize, cap: u64) -> anyhow::Result<()> {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let need = self.experts[k].bytes;
        if need > cap {
            anyhow::bail!(
                "expert {k} ({}) takes {:.1} MiB, more than the memory cap of {:.1} MiB",
                self.experts[k].location,
                mib(need),
                mib(cap)
            );
        }
        loop {
            let held: u64 = self
                .experts
                .iter()
                .filter(|e| e.holds_weights())
                .map(|e| e.bytes)
                .sum();
            if held + need <= cap {
                return Ok(());
            }
            let victim = (0..self.experts.len())
                .filter(|&e| e != k && self.experts[e].holds_weights())
                .min_by_key(|&e| self.experts[e].last_used.get())
                .expect("weights over the cap are held by some expert");
            tracing::debug!("unloading expert {victim} to make room for expert {k}");
            *self.experts[victim].loaded.borrow_mut() = None;
            self.evictions.set(self.evictions.get() + 1);
        }
    }
}

/// Per sample, the experts to run and their weights.
type Selection = Vec<Vec<(usize, f64)>>;

impl Ensemble<'_> {
    /// Ask the router (when the strategy uses it) and let the strategy pick, per sample.
    fn route(&self, x_t: &Tensor<2>, t: &Tensor<1>, y: Option<&Tensor<1, Int>>) -> Selection {
        let [n, _] = x_t.dims();
        let k = self.experts.len();
        let probs = match &self.router {
            Some(r) if self.strategy.uses_router() => {
                let c = self.condition.borrow();
                let c = c.as_ref().inspect(|c| {
                    assert_eq!(c.dims()[0], n, "one conditioning vector per sample");
                });
                r.probs(x_t, t, y.filter(|_| self.router_sees_class), c)
            }
            _ => vec![vec![1.0 / k as f64; k]; n],
        };
        let present = self.present();
        let mut rng = self.rng.borrow_mut();
        probs
            .iter()
            .map(|p| self.strategy.select(p, &present, &mut *rng))
            .collect()
    }

    /// The `trajectory` strategy: the experts drawn at the first evaluation of an integration,
    /// kept for the rest of it. Returns the selection and whether the router was asked.
    fn trajectory(&self, x_t: &Tensor<2>, t: &Tensor<1>, y: Option<&Tensor<1, Int>>) -> (Selection, bool) {
        let n = x_t.dims()[0];
        let t_now = HostTensor::from_tensor(t.clone().slice(0..1)).data[0]; // device sync (1 value)
        let mut assignment = self.assignment.borrow_mut();
        if let Some(a) = assignment.as_mut()
            && a.experts.len() == n
            && t_now <= a.t_last
        {
            a.t_last = t_now;
            let present = self.present();
            let asked = a.experts.iter().any(|&e| !present[e]);
            if asked {
                // An expert was lost mid-trajectory: its samples draw again, from now on.
                let fresh = self.route(x_t, t, y);
                for (e, f) in a.experts.iter_mut().zip(fresh) {
                    if !present[*e] {
                        *e = f[0].0;
                    }
                }
            }
            return (a.experts.iter().map(|&e| vec![(e, 1.0)]).collect(), asked);
        }
        // A new integration: one expert per sample, drawn from the posterior.
        let selection = self.route(x_t, t, y);
        *assignment = Some(Assignment {
            experts: selection.iter().map(|s| s[0].0).collect(),
            t_last: t_now,
        });
        (selection, true)
    }
}

/// An expert's failure in one evaluation: a served one that did not answer, a local one that
/// could not be loaded.
struct ExpertFailure {
    expert: usize,
    error: anyhow::Error,
}

impl Ensemble<'_> {
    /// One evaluation: route, then run every selected expert once on its rows (served ones
    /// concurrently, from their own threads, while the local ones compute).
    fn evaluate(
        &self,
        x_t: &Tensor<2>,
        t: &Tensor<1>,
        y: Option<&Tensor<1, Int>>,
    ) -> Result<Tensor<2>, ExpertFailure> {
        let [n, _] = x_t.dims();
        let device = x_t.device();
        let k = self.experts.len();
        let (selection, asked) = match self.strategy {
            Strategy::Trajectory => self.trajectory(x_t, t, y),
            _ => (self.route(x_t, t, y), true),
        };
        let router_rows = if asked && self.router.is_some() && self.strategy.uses_router() {
            n
        } else {
            0
        };
        // Group rows by expert.
        let mut rows: Vec<Vec<i64>> = vec![vec![]; k];
        let mut weights: Vec<Vec<f32>> = vec![vec![]; k];
        for (i, picks) in selection.into_iter().enumerate() {
            for (e, w) in picks {
                rows[e].push(i as i64);
                weights[e].push(w as f32);
            }
        }
        let gather = |e: usize| {
            let m = rows[e].len();
            let idx = Tensor::<1, Int>::from_data(TensorData::new(rows[e].clone(), [m]), &device);
            let xe = x_t.clone().select(0, idx.clone()); // [M, X]
            let te = t.clone().select(0, idx.clone()); // [M]
            let ye = y.cloned().map(|y| y.select(0, idx.clone()));
            (idx, xe, te, ye)
        };
        let active: Vec<usize> = (0..k).filter(|&e| !rows[e].is_empty()).collect();
        // Served experts' requests, on the host.
        let mut calls = vec![];
        for &e in &active {
            if let Some(remote) = &self.experts[e].remote {
                let (_, xe, te, ye) = gather(e);
                let ye = ye.map(|y| y.into_data().convert::<i64>().iter::<i64>().collect::<Vec<i64>>());
                calls.push((
                    e,
                    remote,
                    HostTensor::from_tensor(xe),
                    HostTensor::from_tensor(te).data,
                    ye,
                ));
            }
        }
        let mut out = x_t.zeros_like(); // [N, X]
        let add = |out: Tensor<2>, e: usize, v: Tensor<2>| {
            let m = rows[e].len();
            let idx = Tensor::<1, Int>::from_data(TensorData::new(rows[e].clone(), [m]), &device);
            let w = Tensor::<2>::from_data(TensorData::new(weights[e].clone(), [m, 1]), &device);
            out.select_assign(0, idx, v * w, IndexingUpdateOp::Add)
        };
        let mut failed = None;
        let answers = std::thread::scope(|s| {
            let handles: Vec<_> = calls
                .into_iter()
                .map(|(e, remote, xe, te, ye)| (e, s.spawn(move || remote.velocity(xe, te, ye))))
                .collect();
            for &e in &active {
                if self.experts[e].remote.is_some() {
                    continue;
                }
                if let Err(error) = self.load(e) {
                    failed = Some(ExpertFailure { expert: e, error });
                    break;
                }
                let (_, xe, te, ye) = gather(e);
                let field = self.experts[e].loaded.borrow();
                let v = field.as_ref().expect("loaded above").velocity(xe, te, ye); // expert e runs once
                if !ddm_core::flow::all_finite(&v) {
                    failed = Some(ExpertFailure {
                        expert: e,
                        error: anyhow::anyhow!(
                            "expert {e} ({}) answered NaN or infinite velocities",
                            self.experts[e].location
                        ),
                    });
                    break;
                }
                out = add(out.clone(), e, v);
            }
            handles
                .into_iter()
                .map(|(e, h)| {
                    (
                        e,
                        h.join()
                            .unwrap_or_else(|_| Err(anyhow::anyhow!("the request thread panicked"))),
                    )
                })
                .collect::<Vec<_>>()
        });
        if let Some(f) = failed {
            return Err(f);
        }
        for (e, answer) in answers {
            self.experts[e].called.set(true);
            match answer {
                Ok(v) if v.data.iter().all(|x| x.is_finite()) => out = add(out, e, v.to_tensor::<2>(&device)),
                Ok(v) => {
                    let count = v.data.iter().filter(|x| !x.is_finite()).count();
                    let error = anyhow::anyhow!("it answered {count} NaN or infinite velocities");
                    return Err(ExpertFailure { expert: e, error });
                }
                Err(error) => return Err(ExpertFailure { expert: e, error }),
            }
        }
        self.usage.borrow_mut().push(Usage {
            rows_per_expert: rows.iter().map(|r| r.len()).collect(),
            router_rows,
        });
        Ok(out)
    }
}

impl VelocityField<2> for Ensemble<'_> {
    fn velocity(&self, x_t: Tensor<2>, t: Tensor<1>, y: Option<Tensor<1, Int>>) -> Tensor<2> {
        loop {
            if self.error.borrow().is_some() {
                // Sampling has already failed (the error is returned after it): finish cheaply.
                return x_t.zeros_like();
            }
            let ExpertFailure { expert, error } = match self.evaluate(&x_t, &t, y.as_ref()) {
                Ok(v) => return v,
                Err(f) => f,
            };
            let slot = &self.experts[expert];
            let location = slot.location.clone();
            let error = if slot.is_remote() {
                error.context(format!("expert {expert}, served at {location}"))
            } else {
                error
            };
            if !self.tolerate_lost {
                self.error.borrow_mut().get_or_insert(error);
                continue;
            }
            // Leave it out and evaluate again without it.
            let evaluation = self.usage.borrow().len();
            tracing::warn!(
                "expert {expert} failed at evaluation {evaluation}: {}; renormalising over the others from here on",
                ddm_core::error::chain(error.as_ref())
            );
            slot.lost.set(true);
            self.lost.borrow_mut().push(LostExpert {
                expert,
                location,
                evaluation,
                error: ddm_core::error::chain(error.as_ref()),
            });
            if !self.experts.iter().any(|e| e.is_present()) {
                self.error.borrow_mut().get_or_insert(anyhow::anyhow!(
                    "every expert is lost: nothing left to sample with"
                ));
            }
        }
    }
}
