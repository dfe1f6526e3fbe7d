//! The routed ensemble as one drift: at every step, for every sample, the router gives
//! p(k | x_t, t) (p(k | x_t, t, c) for a conditioned router told the condition c), the strategy
//! picks and weights experts, and
//!
//!   v(x_t, t, c) = sum over selected k of w_k v_k(x_t, t, c).
//!
//! The `trajectory` strategy routes once: at the first evaluation of an integration it draws one
//! expert per sample from the router's posterior and keeps it for the whole trajectory (a new
//! integration is recognised by a new batch size or by t rising again; [`Ensemble::restart`]
//! forces one).
//!
//! Dispatch is grouped: the rows that chose expert k are gathered, expert k runs once on them, and
//! its weighted velocity is scatter-added back. Each expert runs at most once per evaluation.
//! Experts served elsewhere ([`crate::remote::RemoteExpert`]) are called concurrently, each from
//! its own thread, while the local ones compute, so a step costs about its slowest expert, not the
//! sum. Local experts are loaded lazily, on first use; under a memory cap
//! ([`Ensemble::with_memory_cap`]) the least recently used ones are unloaded to make room, and
//! loaded again when selected. A missing expert (an island that failed) is renormalised away by the
//! strategy; so is an expert that fails (a server that stops answering, a checkpoint that is gone
//! or corrupted, NaN velocities), from the evaluation it failed, when the ensemble is told to
//! [`Ensemble::tolerate_lost_experts`]; otherwise its failure is the sampling's error.

use ddm_core::burn::prelude::*;
use ddm_core::burn::tensor::IndexingUpdateOp;
use ddm_core::condition::Condition;
use ddm_core::flow::{Drift, VelocityError};
use ddm_core::host::HostTensor;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

pub use crate::posterior::{LearnedRouter, Posterior};
pub use crate::slots::ExpertSlot;
use crate::slots::MemoryCap;
use crate::strategy::Strategy;

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
    rng: ChaCha8Rng,
    pub usage: Vec<Usage>,
    assignment: Option<Assignment>,
    /// Whether the router is given the samples' classes (when there are any).
    router_sees_class: bool,
    /// Whether an expert that fails is renormalised away (else it is an error).
    tolerate_lost: bool,
    lost: Vec<LostExpert>,
    /// The most bytes the loaded local experts' weights may take (None: no cap).
    memory_cap: Option<MemoryCap>,
    /// The most local experts held in memory at once.
    held_peak: usize,
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
            rng: ChaCha8Rng::seed_from_u64(seed),
            usage: vec![],
            assignment: None,
            router_sees_class: true,
            tolerate_lost: false,
            lost: vec![],
            memory_cap: None,
            held_peak: 0,
        })
    }

    /// An expert that fails (a served one after its retries; a local one whose checkpoint cannot
    /// be loaded; one answering NaN) is left out from that evaluation on, its weight renormalised
    /// over the others, and recorded in [`Ensemble::lost_experts`]; without this its failure is
    /// the sampling's error.
    pub fn tolerate_lost_experts(mut self) -> Self {
        self.tolerate_lost = true;
        self
    }

    /// Experts left out after they failed.
    pub fn lost_experts(&self) -> &[LostExpert] {
        &self.lost
    }

    /// Keep the weights of the loaded local experts under `bytes`: before an expert is loaded,
    /// the least recently used ones are unloaded (and loaded again when next selected). Output is
    /// unchanged; the cost is the reloading.
    pub fn with_memory_cap(mut self, bytes: u64) -> Self {
        self.memory_cap = Some(MemoryCap { bytes, evictions: 0 });
        self
    }

    /// Experts unloaded to stay under the memory cap.
    pub fn evictions(&self) -> usize {
        self.memory_cap.as_ref().map_or(0, |c| c.evictions)
    }

    /// The most local experts that were in memory at once.
    pub fn held_peak(&self) -> usize {
        self.held_peak
    }

    /// Route without telling the router the class (its classes are not the experts').
    pub fn route_without_class(mut self) -> Self {
        self.router_sees_class = false;
        self
    }

    /// The `trajectory` strategy's current draw: the expert of each sample (None before the
    /// first evaluation).
    pub fn assigned_experts(&self) -> Option<Vec<usize>> {
        self.assignment.as_ref().map(|a| a.experts.clone())
    }

    /// Start new trajectories: the `trajectory` strategy draws its experts again at the next
    /// evaluation.
    pub fn restart(&mut self) {
        self.assignment = None;
    }

    pub fn present(&self) -> Vec<bool> {
        self.experts.iter().map(|e| e.is_present()).collect()
    }

    /// Load every local expert now (an error names the first that cannot be loaded), rather than
    /// when first selected.
    pub fn load_all(&mut self) -> anyhow::Result<()> {
        for k in 0..self.experts.len() {
            if self.experts[k].loader.is_some() {
                self.load(k)?;
            }
        }
        Ok(())
    }

    /// Local expert `k` in memory, for the current evaluation (under the cap, unloading others).
    fn load(&mut self, k: usize) -> anyhow::Result<()> {
        self.experts[k].last_used = self.usage.len();
        if self.experts[k].loaded.is_some() {
            return Ok(());
        }
        if self.experts[k].loader.is_none() {
            anyhow::bail!("expert {k} is missing");
        }
        if let Some(cap) = &mut self.memory_cap {
            cap.make_room(&mut self.experts, k)?;
        }
        let slot = &mut self.experts[k];
        let field = (slot.loader.as_ref().expect("checked above"))()
            .map_err(|e| e.context(format!("loading expert {k} ({})", slot.location)))?;
        slot.loaded = Some(field);
        slot.loads += 1;
        let held = self.experts.iter().filter(|e| e.holds_weights()).count();
        self.held_peak = self.held_peak.max(held);
        Ok(())
    }
}

/// Per sample, the experts to run and their weights.
type Selection = Vec<Vec<(usize, f64)>>;

impl Ensemble<'_> {
    /// Ask the router (when the strategy uses it) and let the strategy pick, per sample.
    fn route(&mut self, x_t: &Tensor<2>, t: &Tensor<1>, c: &Condition) -> Selection {
        let [n, _] = x_t.dims();
        let k = self.experts.len();
        let probs = match &self.router {
            Some(r) if self.strategy.uses_router() => match self.router_sees_class {
                true => r.probs(x_t, t, c),
                false => r.probs(x_t, t, &c.without_class()),
            },
            _ => vec![vec![1.0 / k as f64; k]; n],
        };
        let present = self.present();
        probs
            .iter()
            .map(|p| self.strategy.select(p, &present, &mut self.rng))
            .collect()
    }

    /// The `trajectory` strategy: the experts drawn at the first evaluation of an integration,
    /// kept for the rest of it. Returns the selection and whether the router was asked.
    fn trajectory(&mut self, x_t: &Tensor<2>, t: &Tensor<1>, c: &Condition) -> (Selection, bool) {
        let n = x_t.dims()[0];
        let t_now = HostTensor::from_tensor(t.clone().slice(0..1)).data[0]; // device sync (1 value)
        let present = self.present();
        let kept = self
            .assignment
            .as_ref()
            .is_some_and(|a| a.experts.len() == n && t_now <= a.t_last);
        if !kept {
            // A new integration: one expert per sample, drawn from the posterior.
            let selection = self.route(x_t, t, c);
            self.assignment = Some(Assignment {
                experts: selection.iter().map(|s| s[0].0).collect(),
                t_last: t_now,
            });
            return (selection, true);
        }
        let lost_one = self
            .assignment
            .as_ref()
            .is_some_and(|a| a.experts.iter().any(|&e| !present[e]));
        // An expert was lost mid-trajectory: its samples draw again, from now on.
        let fresh = lost_one.then(|| self.route(x_t, t, c));
        let a = self.assignment.as_mut().expect("kept");
        a.t_last = t_now;
        if let Some(fresh) = fresh {
            for (e, f) in a.experts.iter_mut().zip(fresh) {
                if !present[*e] {
                    *e = f[0].0;
                }
            }
        }
        (a.experts.iter().map(|&e| vec![(e, 1.0)]).collect(), lost_one)
    }
}

/// An expert's failure in one evaluation.
struct ExpertFailure {
    expert: usize,
    error: VelocityError,
}

/// The rows each expert runs on, with their weights.
struct Groups {
    rows: Vec<Vec<i64>>,
    weights: Vec<Vec<f32>>,
}

impl Groups {
    fn of(selection: Selection, k: usize) -> Self {
        let mut g = Groups {
            rows: vec![vec![]; k],
            weights: vec![vec![]; k],
        };
        for (i, picks) in selection.into_iter().enumerate() {
            for (e, w) in picks {
                g.rows[e].push(i as i64);
                g.weights[e].push(w as f32);
            }
        }
        g
    }

    fn index(&self, e: usize, device: &Device) -> Tensor<1, Int> {
        let m = self.rows[e].len();
        Tensor::<1, Int>::from_data(TensorData::new(self.rows[e].clone(), [m]), device)
    }

    /// `out` plus expert `e`'s weighted velocity `v` `[M, X]` scattered into its rows.
    fn add(&self, out: Tensor<2>, e: usize, v: Tensor<2>) -> Tensor<2> {
        let device = v.device();
        let m = self.rows[e].len();
        let w = Tensor::<2>::from_data(TensorData::new(self.weights[e].clone(), [m, 1]), &device);
        out.select_assign(0, self.index(e, &device), v * w, IndexingUpdateOp::Add)
    }
}

/// The count of values of `v` that are NaN or infinite (0: all finite; one device sync).
fn non_finite(v: &Tensor<2>) -> usize {
    if ddm_core::flow::all_finite(v) {
        return 0;
    }
    HostTensor::from_tensor(v.clone())
        .data
        .iter()
        .filter(|x| !x.is_finite())
        .count()
}

impl Ensemble<'_> {
    /// One evaluation: route, then run every selected expert once on its rows (served ones
    /// concurrently, from their own threads, while the local ones compute).
    /// Local experts' velocities on their rows, added into `out` (`[N, X]`); each runs once.
    fn local_velocities(
        &mut self,
        local: &[usize],
        groups: &Groups,
        (x_t, t, c): (&Tensor<2>, &Tensor<1>, &Condition),
        out: &mut Tensor<2>,
    ) -> Result<(), ExpertFailure> {
        // The experts in memory first: under a memory cap (least recently used unloaded), the
        // order 0..K would unload every expert before its turn at every step; held first, each
        // step reloads only those the cap could not keep (K - held instead of K).
        let mut order = local.to_vec();
        order.sort_by_key(|&e| self.experts[e].loaded.is_none()); // stable: by index within
        let mut velocities = Vec::with_capacity(order.len());
        for e in order {
            let fail = |error| ExpertFailure { expert: e, error };
            self.load(e)
                .map_err(|error| fail(VelocityError::other(error.as_ref())))?;
            let (xe, te, ce) = rows_of(groups, e, x_t, t, c);
            let field = self.experts[e].loaded.as_ref().expect("loaded above");
            let v = field.velocity(xe, te, &ce).map_err(fail)?;
            match non_finite(&v) {
                0 => velocities.push((e, v)),
                count => return Err(fail(VelocityError::NonFinite { count })),
            }
        }
        // Added in expert order, so a row's sum has the same bits whatever order they ran in.
        velocities.sort_by_key(|&(e, _)| e);
        for (e, v) in velocities {
            *out = groups.add(out.clone(), e, v);
        }
        Ok(())
    }

    fn evaluate(
        &mut self,
        x_t: &Tensor<2>,
        t: &Tensor<1>,
        c: &Condition,
    ) -> Result<Tensor<2>, ExpertFailure> {
        let [n, _] = x_t.dims();
        let device = x_t.device();
        let k = self.experts.len();
        let (selection, asked) = match self.strategy {
            Strategy::Trajectory => self.trajectory(x_t, t, c),
            _ => (self.route(x_t, t, c), true),
        };
        let router_rows = if asked && self.router.is_some() && self.strategy.uses_router() {
            n
        } else {
            0
        };
        let groups = Groups::of(selection, k);
        let gather = |e: usize| rows_of(&groups, e, x_t, t, c);
        let active: Vec<usize> = (0..k).filter(|&e| !groups.rows[e].is_empty()).collect();
        // Served experts' requests, on the host.
        let calls: Vec<_> = active
            .iter()
            .filter_map(|&e| {
                let remote = self.experts[e].remote.clone()?;
                let (xe, te, ce) = gather(e);
                Some((
                    e,
                    remote,
                    HostTensor::from_tensor(xe),
                    HostTensor::from_tensor(te).data,
                    ce.class_ids(),
                    (
                        ce.vector.map(HostTensor::from_tensor),
                        ce.tokens.map(|s| {
                            (
                                HostTensor::from_tensor(s.embeddings),
                                HostTensor::from_tensor(s.mask),
                            )
                        }),
                    ),
                ))
            })
            .collect();
        let local: Vec<usize> = active
            .iter()
            .copied()
            .filter(|&e| !self.experts[e].is_remote())
            .collect();
        let mut out = x_t.zeros_like(); // [N, X]
        let (local_result, answers) = std::thread::scope(|s| {
            let handles: Vec<_> = calls
                .into_iter()
                .map(|(e, remote, xe, te, ye, ce)| (e, s.spawn(move || remote.velocity(xe, te, ye, ce))))
                .collect();
            let local_result = self.local_velocities(&local, &groups, (x_t, t, c), &mut out);
            let answers: Vec<_> = handles
                .into_iter()
                .map(|(e, h)| {
                    (
                        e,
                        h.join()
                            .unwrap_or_else(|_| Err(anyhow::anyhow!("the request thread panicked"))),
                    )
                })
                .collect();
            (local_result, answers)
        });
        local_result?;
        for (e, answer) in answers {
            self.experts[e].called = true;
            let v = answer.map_err(|error| ExpertFailure {
                expert: e,
                error: VelocityError::other(error.as_ref()),
            })?;
            let count = v.data.iter().filter(|x| !x.is_finite()).count();
            if count > 0 {
                let error = VelocityError::NonFinite { count };
                return Err(ExpertFailure { expert: e, error });
            }
            out = groups.add(out, e, v.to_tensor::<2>(&device));
        }
        self.usage.push(Usage {
            rows_per_expert: groups.rows.iter().map(|r| r.len()).collect(),
            router_rows,
        });
        Ok(out)
    }

    /// Leave expert `e` out from the current evaluation on (its failure recorded), or, when
    /// failures are not tolerated, the sampling's error.
    fn lose(&mut self, failure: ExpertFailure) -> Result<(), VelocityError> {
        let ExpertFailure { expert, error } = failure;
        let slot = &mut self.experts[expert];
        let place = match slot.is_remote() {
            true => format!("served at {}", slot.location),
            false => format!("from {}", slot.location),
        };
        let error = VelocityError::Expert {
            expert,
            place,
            source: Box::new(error),
        };
        if !self.tolerate_lost {
            return Err(error);
        }
        let evaluation = self.usage.len();
        let message = ddm_core::error::chain(&error);
        tracing::warn!("{message}; renormalising over the others from evaluation {evaluation} on");
        slot.lost = true;
        self.lost.push(LostExpert {
            expert,
            location: slot.location.clone(),
            evaluation,
            error: message,
        });
        match self.experts.iter().any(|e| e.is_present()) {
            true => Ok(()),
            false => Err(VelocityError::NoExpertLeft),
        }
    }
}

impl Drift<2> for Ensemble<'_> {
    fn drift(&mut self, x_t: Tensor<2>, t: Tensor<1>, c: &Condition) -> Result<Tensor<2>, VelocityError> {
        loop {
            match self.evaluate(&x_t, &t, c) {
                Ok(v) => return Ok(v),
                // Evaluate again without the lost expert.
                Err(failure) => self.lose(failure)?,
            }
        }
    }
}

/// Expert `e`'s rows of the batch: `x_t` `[n_e, X]`, `t` `[n_e]` and their condition.
fn rows_of(
    groups: &Groups,
    e: usize,
    x_t: &Tensor<2>,
    t: &Tensor<1>,
    c: &Condition,
) -> (Tensor<2>, Tensor<1>, Condition) {
    let idx = groups.index(e, &x_t.device());
    (
        x_t.clone().select(0, idx.clone()),
        t.clone().select(0, idx.clone()),
        c.select(&idx),
    )
}
