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
}

pub struct Metrics {
    file: std::fs::File,
    path: PathBuf,
}

impl Metrics {
    /// Open `OUT/metrics.jsonl`, keeping only lines with `step <= keep_until`.
    pub fn open(out: &Path, keep_until: u64) -> anyhow::Result<Self> {
        let path = out.join("metrics.jsonl");
        let kept: String = std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                    .is_some_and(|s| s <= keep_until)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        ddm_core::fsio::write_bytes_atomic(&path, kept.as_bytes())?;
        let file = std::fs::OpenOptions::new().append(true).open(&path)?;
        Ok(Self { file, path })
    }

    /// All (step, loss) pairs logged so far.
    pub fn losses(out: &Path) -> Vec<(u64, f64)> {
        std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| Some((v.get("step")?.as_u64()?, v.get("loss")?.as_f64()?)))
            .collect()
    }

    pub fn write(&mut self, line: &Line) -> anyhow::Result<()> {
        writeln!(self.file, "{}", serde_json::to_string(line)?)
            .map_err(|e| anyhow::anyhow!("{}: {e}", self.path.display()))
    }
}
