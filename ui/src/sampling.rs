//! Sampling from the page: the settings of `ddm sample` (class or prompt, strategy, router,
//! solver, schedule, steps, guidance, seed, N, precision), checked, then drawn by the same function into a
//! temporary directory, so the grid's pixels are those `ddm sample` writes with the same settings.

use std::path::PathBuf;

use axum::http::StatusCode;
use base64::Engine;
use ddm_core::burn::prelude::*;
use ddm_core::flow::{Solver, StepSchedule};
use ddm_core::precision::Precision;
use ddm_ensemble::sample::{Classes, Decode, RouterChoice, SampleOptions, Source};
use ddm_ensemble::strategy::Strategy;
use serde::{Deserialize, Serialize};

use super::Refusal;

/// The most samples one request may draw (the page shows them as one grid).
pub const MAX_N: usize = 256;
/// The most integration steps one request may take.
pub const MAX_STEPS: usize = 200;

/// A sampling request: `ddm sample`'s settings, with its defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleRequest {
    #[serde(default = "default_n")]
    pub n: usize,
    #[serde(default = "default_steps")]
    pub steps: usize,
    #[serde(default = "default_solver")]
    pub solver: Solver,
    /// `uniform`, `shifted:S` or `beta[:A:B]`.
    #[serde(default)]
    pub schedule: Option<String>,
    /// A strategy as `ddm sample --strategy` takes it (none: its default).
    #[serde(default)]
    pub strategy: Option<String>,
    /// `learned` or `analytic`.
    #[serde(default)]
    pub router: Option<String>,
    /// A class id or `all`.
    #[serde(default)]
    pub class: Option<String>,
    #[serde(default)]
    pub prompt: Option<String>,
    #[serde(default = "default_guidance")]
    pub guidance: f64,
    #[serde(default)]
    pub seed: u64,
    /// `f32` (default), `bf16` or `f16`: what the experts compute in.
    #[serde(default)]
    pub precision: Option<String>,
}

fn default_n() -> usize {
    16
}
fn default_steps() -> usize {
    12
}
fn default_solver() -> Solver {
    Solver::UniPc
}
fn default_guidance() -> f64 {
    1.0
}

/// What the page gets back.
#[derive(Debug, Serialize)]
pub struct SampleAnswer {
    /// The PNG grid, base64.
    pub png_base64: String,
    /// `ddm sample`'s report: usage per step range, time, evaluations.
    pub report: ddm_ensemble::sample::Report,
    pub seconds_per_image: f64,
    /// Samples through experts, summed over every evaluation, per image: steps (times the
    /// solver's evaluations per step) times the experts a sample is routed to.
    pub expert_evaluations_per_image: f64,
}

/// Draws samples from one registry, one request at a time.
pub struct Sampler {
    registry: PathBuf,
    text_encoder: Option<PathBuf>,
    device: Device,
    busy: std::sync::Mutex<()>,
}

impl Sampler {
    pub fn new(registry: PathBuf, text_encoder: Option<PathBuf>, device: Device) -> Self {
        Self {
            registry,
            text_encoder,
            device,
            busy: std::sync::Mutex::new(()),
        }
    }

    /// Whether the page may sample by prompt (a text encoder was given).
    pub fn reads_prompts(&self) -> bool {
        self.text_encoder.is_some()
    }

    /// Check `r`, then draw it (blocking); 503 while another request is drawing.
    pub fn draw(&self, r: SampleRequest) -> Result<SampleAnswer, Refusal> {
        let options = self.options(&r)?;
        let Ok(_guard) = self.busy.try_lock() else {
            return Err(Refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                "another sample is being drawn; try again when it is done".into(),
            ));
        };
        let dir = tempfile::tempdir().map_err(|e| Refusal::failed(e.into()))?;
        let options = SampleOptions {
            out: dir.path().join("samples.png"),
            ..options
        };
        let report = ddm_ensemble::sample::sample(&options, &()).map_err(Refusal::failed)?;
        let png = std::fs::read(&options.out).map_err(|e| Refusal::failed(e.into()))?;
        Ok(SampleAnswer {
            png_base64: base64::engine::general_purpose::STANDARD.encode(png),
            seconds_per_image: report.seconds / report.n as f64,
            expert_evaluations_per_image: report
                .usage
                .iter()
                .flat_map(|u| &u.rows_per_expert)
                .sum::<usize>() as f64
                / report.n as f64,
            report,
        })
    }

    /// `ddm sample`'s options for `r` (its defaults where `r` is silent), or why not.
    fn options(&self, r: &SampleRequest) -> Result<SampleOptions, Refusal> {
        if !(1..=MAX_N).contains(&r.n) {
            return Err(Refusal::bad(format!(
                "n {}: draw 1 to {MAX_N} samples from the page",
                r.n
            )));
        }
        if !(1..=MAX_STEPS).contains(&r.steps) {
            return Err(Refusal::bad(format!("steps {}: 1 to {MAX_STEPS}", r.steps)));
        }
        if !(0.0..=100.0).contains(&r.guidance) {
            return Err(Refusal::bad(format!("guidance {}: 0 to 100", r.guidance)));
        }
        let schedule: StepSchedule = match &r.schedule {
            None => StepSchedule::Uniform,
            Some(s) => s
                .parse()
                .map_err(|e: String| Refusal::bad(format!("schedule: {e}")))?,
        };
        let strategy: Option<Strategy> = match r.strategy.as_deref().filter(|s| !s.is_empty()) {
            None => None,
            Some(s) => Some(
                s.parse()
                    .map_err(|e: String| Refusal::bad(format!("strategy: {e}")))?,
            ),
        };
        let router = match r.router.as_deref() {
            None | Some("learned") => RouterChoice::Learned,
            Some("analytic") => RouterChoice::Analytic,
            Some(other) => return Err(Refusal::bad(format!("router `{other}`: `learned` or `analytic`"))),
        };
        let class: Option<Classes> = match r.class.as_deref().filter(|s| !s.is_empty()) {
            None => None,
            Some(c) => Some(
                c.parse()
                    .map_err(|e: String| Refusal::bad(format!("class: {e}")))?,
            ),
        };
        let condition = match r.prompt.as_deref().filter(|p| !p.trim().is_empty()) {
            None => None,
            Some(p) => {
                let encoder = self.text_encoder.as_ref().ok_or_else(|| {
                    Refusal::bad("prompts need a text encoder: start ddm ui with --text-encoder")
                })?;
                Some(
                    ddm_ensemble::sample::prompt_condition(&[p.to_string()], encoder, r.n)
                        .map_err(Refusal::failed)?,
                )
            }
        };
        let precision: Precision = match r.precision.as_deref().filter(|p| !p.is_empty()) {
            None => Precision::F32,
            Some(p) => p
                .parse()
                .map_err(|e: ddm_core::error::Error| Refusal::bad(e.to_string()))?,
        };
        precision
            .check(&self.device)
            .map_err(|e| Refusal::bad(e.to_string()))?;
        let has_vae = ddm_ensemble::registry::read_index(&self.registry)
            .ok()
            .flatten()
            .is_some_and(|i| i.vae.is_some());
        Ok(SampleOptions {
            source: Source::Registry(self.registry.clone()),
            n: r.n,
            steps: r.steps,
            solver: r.solver,
            schedule,
            strategy,
            router,
            allow_missing: false,
            max_memory: None,
            batch: BATCH,
            class,
            guidance: r.guidance,
            condition,
            seed: r.seed,
            out: PathBuf::new(),
            device: self.device.clone(),
            precision,
            decode: match has_vae {
                true => Decode::Registry,
                false => Decode::No,
            },
        })
    }
}

/// `ddm sample --batch-size`'s default (the noise does not depend on it).
const BATCH: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;

    fn request(json: &str) -> SampleRequest {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn the_precision_is_read_or_refused_by_name() {
        let s = Sampler::new(PathBuf::from("no-registry"), None, ddm_core::device::cpu());
        let precision = |json: &str| s.options(&request(json)).map(|o| o.precision);
        assert_eq!(precision("{}").unwrap(), Precision::F32);
        assert_eq!(precision(r#"{"precision": "bf16"}"#).unwrap(), Precision::Bf16);
        let Err(Refusal(status, reason)) = precision(r#"{"precision": "fp8"}"#) else {
            panic!("fp8 accepted");
        };
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(reason.contains("fp8") && reason.contains("bf16"), "{reason}");
    }
}
