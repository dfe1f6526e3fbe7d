//! The islands of a run directory as `ddm ui` shows them: every directory a trainer wrote into
//! (`config.toml`, `metrics.jsonl`), its progress read from those files and its state from the
//! trainer's lock, its divergence mark and its final checkpoint. Nothing here writes or locks.

use std::path::{Path, PathBuf};

use serde::Serialize;

/// A directory a trainer wrote into.
#[derive(Debug, Clone)]
pub struct Island {
    /// The directory's name (what the page and its URLs call it).
    pub name: String,
    pub dir: PathBuf,
}

/// What an island is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// A trainer holds the directory's lock.
    Running,
    /// Stopped before its last step, with a state to resume from.
    Interrupted,
    /// Reached its last step.
    Done,
    /// The loss stopped being finite (the trainer's divergence mark).
    Diverged,
    /// Neither running nor with anything saved yet.
    Waiting,
}

/// An island's progress, as the page shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Progress {
    pub name: String,
    pub state: State,
    /// The last step logged or saved, and the run's last step (from config.toml).
    pub step: u64,
    pub steps: Option<u64>,
    pub loss: Option<f64>,
    /// How many losses were logged (a curve needs two).
    pub loss_points: usize,
    pub img_per_s: Option<f64>,
    /// Seconds left at the last logged speed (running islands only).
    pub eta_s: Option<f64>,
    /// The step of the saved training state (what a restart resumes from).
    pub checkpoint_step: Option<u64>,
    /// The final checkpoint's file name, once written.
    pub checkpoint: Option<String>,
    /// The newest sample grid the trainer wrote.
    pub samples: Option<String>,
    /// The divergence mark's step, when diverged.
    pub diverged_at: Option<u64>,
}

/// What a trainer writes first, and what marks a directory as an island's.
const MARKERS: [&str; 2] = ["config.toml", "metrics.jsonl"];

/// Final checkpoints, by the task that writes them.
const FINAL: [&str; 4] = [
    "expert.safetensors",
    "router.safetensors",
    "autoencoder.safetensors",
    "text-encoder.safetensors",
];

/// The islands under `runs`: `runs` itself if a trainer wrote there, and each directory inside it
/// that one did, by name.
pub fn discover(runs: &Path) -> Vec<Island> {
    let is_island = |d: &Path| MARKERS.iter().any(|m| d.join(m).is_file());
    let mut found = vec![];
    if is_island(runs) {
        let name = runs
            .file_name()
            .map_or("run".into(), |n| n.to_string_lossy().into_owned());
        found.push(Island {
            name,
            dir: runs.to_path_buf(),
        });
    }
    let Ok(entries) = std::fs::read_dir(runs) else {
        return found;
    };
    let mut dirs: Vec<Island> = entries
        .flatten()
        .filter(|e| e.path().is_dir() && is_island(&e.path()))
        .map(|e| Island {
            name: e.file_name().to_string_lossy().into_owned(),
            dir: e.path(),
        })
        .collect();
    dirs.sort_by(|a, b| a.name.cmp(&b.name));
    found.extend(dirs);
    found
}

/// One line of `metrics.jsonl` (the fields the page reads).
#[derive(Debug, Clone, Copy)]
struct Logged {
    step: u64,
    loss: f64,
    img_per_s: f64,
}

/// Every readable line of the island's `metrics.jsonl` (a line being written is skipped).
fn logged(dir: &Path) -> Vec<Logged> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| {
            Some(Logged {
                step: v.get("step")?.as_u64()?,
                loss: v.get("loss")?.as_f64()?,
                img_per_s: v.get("img_per_s").and_then(|x| x.as_f64()).unwrap_or(0.0),
            })
        })
        .collect()
}

/// Every (step, loss) the island logged.
pub fn losses(island: &Island) -> Vec<(u64, f64)> {
    logged(&island.dir).iter().map(|l| (l.step, l.loss)).collect()
}

/// `steps` and `batch_size` from the island's config.toml.
fn planned(dir: &Path) -> (Option<u64>, Option<u64>) {
    let Ok(text) = std::fs::read_to_string(dir.join("config.toml")) else {
        return (None, None);
    };
    let Ok(table) = text.parse::<toml::Table>() else {
        return (None, None);
    };
    let int = |k: &str| {
        table
            .get(k)
            .and_then(|v| v.as_integer())
            .and_then(|v| u64::try_from(v).ok())
    };
    (int("steps"), int("batch_size"))
}

/// The island's progress now.
pub fn progress(island: &Island, saved_step: impl Fn(&Path) -> Option<u64>) -> Progress {
    let dir = &island.dir;
    let lines = logged(dir);
    let last = lines.last().copied();
    let (steps, batch) = planned(dir);
    let running = lock_held(&dir.join(ddm_trainer::train::LOCK_FILE));
    let diverged_at = read_divergence(dir);
    let checkpoint = FINAL
        .iter()
        .find(|f| dir.join(f).is_file())
        .map(|f| f.to_string());
    let checkpoint_step = saved_step(dir);
    // A short run may log nothing (it logs every `log_every` steps) but still saves its state.
    let step = last.map_or(0, |l| l.step).max(checkpoint_step.unwrap_or(0));
    let state = match () {
        _ if running => State::Running,
        _ if diverged_at.is_some() => State::Diverged,
        _ if steps.is_some_and(|s| step >= s) || (checkpoint.is_some() && steps.is_none()) => State::Done,
        _ if checkpoint_step.is_some() => State::Interrupted,
        _ => State::Waiting,
    };
    let eta_s = match (state, last, steps, batch) {
        (State::Running, Some(l), Some(s), Some(b)) if l.img_per_s > 0.0 => {
            Some(s.saturating_sub(l.step) as f64 * b as f64 / l.img_per_s)
        }
        _ => None,
    };
    Progress {
        name: island.name.clone(),
        state,
        step,
        steps,
        loss: last.map(|l| l.loss),
        loss_points: lines.len(),
        img_per_s: last.map(|l| l.img_per_s),
        eta_s,
        checkpoint_step,
        checkpoint,
        samples: newest_samples(dir).map(|p| p.file_name().unwrap().to_string_lossy().into_owned()),
        diverged_at,
    }
}

/// The step of the trainer's divergence mark, if there is one.
fn read_divergence(dir: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(dir.join(ddm_trainer::train::DIVERGED_FILE)).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some(v.get("step").and_then(|s| s.as_u64()).unwrap_or(0))
}

/// The newest sample grid a trainer wrote: `samples-STEP.png` snapshots, else `samples.png`.
pub fn newest_samples(dir: &Path) -> Option<PathBuf> {
    let snapshots = std::fs::read_dir(dir).ok()?.flatten().filter_map(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        let step: u64 = name
            .strip_prefix("samples-")?
            .strip_suffix(".png")?
            .parse()
            .ok()?;
        Some((step, e.path()))
    });
    match snapshots.max_by_key(|(step, _)| *step) {
        Some((_, p)) => Some(p),
        None => Some(dir.join("samples.png")).filter(|p| p.is_file()),
    }
}

/// Whether some process holds an flock on `path`, read from the kernel's lock table
/// (`/proc/locks`) without taking the lock, so a trainer starting now never finds it held.
#[cfg(target_os = "linux")]
fn lock_held(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    let Ok(table) = std::fs::read_to_string("/proc/locks") else {
        return false;
    };
    // glibc's gnu_dev_major / gnu_dev_minor: /proc/locks prints MAJOR:MINOR:INODE (hex, hex, decimal).
    let dev = meta.dev();
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let id = format!("{major:02x}:{minor:02x}:{}", meta.ino());
    table
        .lines()
        .any(|l| l.contains("FLOCK") && l.split_whitespace().any(|f| f == id))
}

/// Elsewhere: a trainer logged within the last minute.
#[cfg(not(target_os = "linux"))]
fn lock_held(path: &Path) -> bool {
    let metrics = path.with_file_name("metrics.jsonl");
    std::fs::metadata(metrics)
        .and_then(|m| m.modified())
        .is_ok_and(|t| t.elapsed().is_ok_and(|e| e.as_secs() < 60))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_os = "linux")]
    fn a_held_lock_is_seen_and_a_released_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train.lock");
        let f = std::fs::File::create(&path).unwrap();
        assert!(!lock_held(&path));
        f.try_lock().unwrap();
        assert!(lock_held(&path));
        f.unlock().unwrap();
        assert!(!lock_held(&path));
    }

    #[test]
    fn states_follow_the_files_a_trainer_leaves() {
        let dir = tempfile::tempdir().unwrap();
        let island = Island {
            name: "expert-0".into(),
            dir: dir.path().join("expert-0"),
        };
        std::fs::create_dir(&island.dir).unwrap();
        let write = |f: &str, s: &str| std::fs::write(island.dir.join(f), s).unwrap();
        write("config.toml", "steps = 100\nbatch_size = 8\n");
        assert_eq!(discover(dir.path()).len(), 1);
        assert_eq!(progress(&island, |_| None).state, State::Waiting);
        write(
            "metrics.jsonl",
            "{\"step\":10,\"loss\":1.5,\"img_per_s\":80.0}\n{\"step\":20,\"loss\":1.2,\"img_per_s\":80.0}\n{\"step\":3",
        );
        let p = progress(&island, |_| Some(20));
        assert_eq!((p.state, p.step, p.loss), (State::Interrupted, 20, Some(1.2)));
        write("diverged.json", "{\"step\":21}");
        let p = progress(&island, |_| Some(20));
        assert_eq!((p.state, p.diverged_at), (State::Diverged, Some(21)));
        std::fs::remove_file(island.dir.join("diverged.json")).unwrap();
        write(
            "metrics.jsonl",
            "{\"step\":100,\"loss\":0.5,\"img_per_s\":80.0}\n",
        );
        assert_eq!(progress(&island, |_| Some(100)).state, State::Done);
        // A run too short to log anything is done once it saved its last step.
        write("metrics.jsonl", "");
        let p = progress(&island, |_| Some(100));
        assert_eq!((p.state, p.step, p.loss_points), (State::Done, 100, 0));
        // A running trainer: the lock is held; the ETA is the steps left at the logged speed.
        write("metrics.jsonl", "{\"step\":60,\"loss\":0.7,\"img_per_s\":80.0}\n");
        let lock = std::fs::File::create(island.dir.join("train.lock")).unwrap();
        lock.try_lock().unwrap();
        let p = progress(&island, |_| Some(60));
        if cfg!(target_os = "linux") {
            assert_eq!(p.state, State::Running);
            assert_eq!(p.eta_s, Some(40.0 * 8.0 / 80.0));
        }
    }

    #[test]
    fn the_newest_snapshot_is_the_grid_shown() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(newest_samples(dir.path()), None);
        for f in [
            "samples.png",
            "samples-0000200.png",
            "samples-0001000.png",
            "samples-x.png",
        ] {
            std::fs::write(dir.path().join(f), b"").unwrap();
        }
        assert_eq!(
            newest_samples(dir.path()),
            Some(dir.path().join("samples-0001000.png"))
        );
    }
}
