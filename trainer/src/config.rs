//! The training configuration: every value has a documented default. Read from a TOML file
//! (`--config train.toml`), then overridden by flags. The resolved config is stored in the run's
//! state; a resumed run uses the stored config (only `steps` may grow).

use ddm_core::checkpoint::Objective;
use ddm_core::flow::TimeSampler;
use ddm_core::precision::Precision;
use serde::{Deserialize, Serialize};

/// The most optimizer steps (and warm-up, checkpoint, sample and log intervals) a run takes.
pub const MAX_STEPS: u64 = 1_000_000_000;
/// The largest batch.
pub const MAX_BATCH: usize = 1 << 16;
/// The widest MLP layer and its deepest stack.
pub const MAX_MLP_WIDTH: usize = 1 << 16;
pub const MAX_MLP_DEPTH: usize = 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// The expert's network: a named DiT size (`DiT-T/4`, `DiT-Bench/4`, `DiT-S/2`, ...) for
    /// images, or `mlp` for vector data.
    pub model: String,
    /// MLP width and depth (vector data only).
    pub mlp_hidden: usize,
    pub mlp_depth: usize,
    /// Optimizer steps in total.
    pub steps: u64,
    pub batch_size: usize,
    /// Peak AdamW learning rate (DiT uses 1e-4).
    pub lr: f64,
    /// Linear warm-up from 0 to `lr` over this many steps.
    pub warmup_steps: u64,
    /// AdamW decoupled weight decay (DiT uses 0).
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (0: no clipping).
    pub grad_clip: f64,
    /// EMA decay of the weights (reached after a warm-up, see `ema_decay_at`); the expert
    /// checkpoint holds the EMA weights.
    pub ema_decay: f64,
    /// How training draws t.
    pub time_sampler: TimeSampler,
    /// Condition on class labels (when the data has them), with label dropout for guidance.
    pub class_conditional: bool,
    /// Probability of replacing a label by the null class (classifier-free guidance), and an
    /// expert's conditioning vector by the zero vector.
    pub class_dropout: f64,
    /// Condition an expert on the data's per-sample conditioning vectors `c` (a caption's pooled
    /// text embedding, `ddm encode-text`), through adaLN like the class.
    pub condition_vectors: bool,
    /// Save the whole training state every this many steps (and at the end).
    pub checkpoint_every: u64,
    /// Write a grid of EMA samples every this many steps (0: only at the end).
    pub sample_every: u64,
    /// Write a metrics line every this many steps.
    pub log_every: u64,
    /// Seeds initialisation, noise, times and data order.
    pub seed: u64,
    /// What an expert learns to predict: the flow-matching velocity (ddm's own), or DDPM's noise
    /// (`{ kind = "epsilon", schedule = { kind = "cosine", s = 0.008 } }`), converted to velocity
    /// when sampled. Routers ignore it.
    pub objective: Objective,
    /// The dtype of the forward and backward passes: `f32`, or `bf16`/`f16` with f32 master
    /// weights (the optimizer's moments, the EMA and the checkpoints stay f32; f16 adds dynamic
    /// loss scaling). A resumed run keeps its precision.
    pub precision: Precision,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            model: "DiT-T/4".into(),
            mlp_hidden: 256,
            mlp_depth: 3,
            steps: 2000,
            batch_size: 64,
            lr: 1e-4,
            warmup_steps: 100,
            weight_decay: 0.0,
            grad_clip: 1.0,
            ema_decay: 0.999,
            time_sampler: TimeSampler::Uniform,
            class_conditional: false,
            class_dropout: 0.1,
            condition_vectors: false,
            checkpoint_every: 500,
            sample_every: 0,
            log_every: 10,
            seed: 0,
            objective: Objective::Velocity,
            precision: Precision::F32,
        }
    }
}

impl TrainConfig {
    /// The learning rate at `step` (linear warm-up, then constant).
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            self.lr * (step + 1) as f64 / self.warmup_steps as f64
        } else {
            self.lr
        }
    }

    /// The EMA decay at `step`: min(ema_decay, (1 + step) / (10 + step)). Without the warm-up a
    /// short run's EMA would still be mostly its initial weights (0.999^300 = 0.74), which for
    /// adaLN-Zero means a model that predicts nearly zero.
    pub fn ema_decay_at(&self, step: u64) -> f64 {
        self.ema_decay.min((1 + step) as f64 / (10 + step) as f64)
    }

    pub fn validate(&self) -> Result<(), String> {
        for (name, v, lo) in [
            ("steps", self.steps, 1),
            ("warmup_steps", self.warmup_steps, 0),
            ("checkpoint_every", self.checkpoint_every, 1),
            ("sample_every", self.sample_every, 0),
            ("log_every", self.log_every, 1),
        ] {
            if !(lo..=MAX_STEPS).contains(&v) {
                return Err(format!("{name} = {v} is outside {lo} ..= {MAX_STEPS}"));
            }
        }
        for (name, v, lo, hi) in [
            ("batch_size", self.batch_size, 1, MAX_BATCH),
            ("mlp_hidden", self.mlp_hidden, 1, MAX_MLP_WIDTH),
            ("mlp_depth", self.mlp_depth, 0, MAX_MLP_DEPTH),
        ] {
            if !(lo..=hi).contains(&v) {
                return Err(format!("{name} = {v} is outside {lo} ..= {hi}"));
            }
        }
        if let TimeSampler::LogitNormal { mean, std } = self.time_sampler
            && !(mean.is_finite() && std.is_finite() && std > 0.0)
        {
            return Err(format!(
                "time_sampler logit-normal:{mean}:{std}: the mean must be finite and the std positive"
            ));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(format!("lr must be a positive number, got {}", self.lr));
        }
        if !(0.0..1.0).contains(&self.ema_decay) {
            return Err(format!("ema_decay must be in [0, 1), got {}", self.ema_decay));
        }
        if !(self.grad_clip >= 0.0 && self.grad_clip.is_finite()) {
            return Err(format!(
                "grad_clip must be a number >= 0 (0: no clipping), got {}",
                self.grad_clip
            ));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return Err(format!(
                "weight_decay must be a number >= 0, got {}",
                self.weight_decay
            ));
        }
        if !(0.0..1.0).contains(&self.class_dropout) {
            return Err(format!(
                "class_dropout must be in [0, 1), got {}",
                self.class_dropout
            ));
        }
        if let Objective::Epsilon { schedule } = &self.objective {
            schedule.validate()?;
        }
        Ok(())
    }

    /// Two configs describe the same run if they differ at most in what may change on resume:
    /// `steps` (extend a run), `lr` (lower it after a divergence) and the checkpoint, sample and
    /// log cadence. Everything that defines the model, the data stream or the optimizer must match.
    pub fn same_run(&self, other: &TrainConfig) -> bool {
        self.resumable_part() == other.resumable_part()
    }

    /// The settings that make `other` a different run (`batch_size: 64 then 32`), in words.
    pub fn differences(&self, other: &TrainConfig) -> Vec<String> {
        let (a, b) = (
            serde_json::to_value(self.resumable_part()).unwrap_or_default(),
            serde_json::to_value(other.resumable_part()).unwrap_or_default(),
        );
        let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
            return vec![];
        };
        a.iter()
            .filter(|(k, v)| b.get(*k) != Some(v))
            .map(|(k, v)| format!("{k}: {v} then {}", b.get(k).unwrap_or(&serde_json::Value::Null)))
            .collect()
    }

    fn resumable_part(&self) -> TrainConfig {
        TrainConfig {
            steps: 0,
            lr: 0.0,
            checkpoint_every: 1,
            sample_every: 0,
            log_every: 1,
            ..self.clone()
        }
    }
}
