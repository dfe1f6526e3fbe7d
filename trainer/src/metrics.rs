//! Metrics as JSON lines (`OUT/metrics.jsonl`): one object per logged step, machine-readable.
//! A resumed run first drops the lines past its checkpoint, so the file never repeats a step.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Line {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub img_per_s: f64,
    pub samples_seen: u64,
    pub wall_time_s: f64,
    /// f16 only: the loss scale after this step, and the steps skipped so far for overflowing
    /// gradients (the run's, resumed parts included).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped_steps: Option<u64>,
}

pub struct Metrics {
    file: std::fs::File,
    path: PathBuf,
    /// Every (step, loss) logged, for the loss curve.
    losses: Vec<(u64, f64)>,
}

impl Metrics {
    /// Open `OUT/metrics.jsonl`, keeping only lines with `step <= keep_until`.
    pub fn open(out: &Path, keep_until: u64) -> anyhow::Result<Self> {
        let path = out.join("metrics.jsonl");
        let (mut kept, mut losses) = (String::new(), vec![]);
        for l in std::fs::read_to_string(&path).unwrap_or_default().lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(l) else {
                continue;
            };
            let Some(step) = v
                .get("step")
                .and_then(|s| s.as_u64())
                .filter(|&s| s <= keep_until)
            else {
                continue;
            };
            kept.push_str(l);
            kept.push('\n');
            if let Some(loss) = v.get("loss").and_then(|x| x.as_f64()) {
                losses.push((step, loss));
            }
        }
        ddm_core::fsio::write_bytes_atomic(&path, kept.as_bytes())?;
        let file = std::fs::OpenOptions::new().append(true).open(&path)?;
        Ok(Self { file, path, losses })
    }

    /// Every (step, loss) logged so far (this run and the part of earlier runs it continues).
    pub fn losses(&self) -> &[(u64, f64)] {
        &self.losses
    }

    pub fn write(&mut self, line: &Line) -> anyhow::Result<()> {
        self.losses.push((line.step, line.loss));
        writeln!(self.file, "{}", serde_json::to_string(line)?)
            .map_err(|e| anyhow::anyhow!("{}: {e}", self.path.display()))
    }
}
