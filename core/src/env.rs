//! Every environment variable ddm reads, in one place: its name, what it means, and how it is
//! read. A value that is set but cannot be read is an error naming the variable, never ignored.
//!
//! | variable | meaning |
//! |---|---|
//! | `DDM_CACHE` | where downloads are kept (default `$XDG_CACHE_HOME/ddm`, else `~/.cache/ddm`) |
//! | `DDM_CA_CERT` | a PEM file of extra trusted roots for https (a private CA, a self-signed server) |
//! | `DDM_SERVE_TOKEN` | the bearer token `ddm serve` requires and the sampler sends |
//! | `DDM_REGISTRY_LOCK_WAIT` | seconds a registration waits for another one's lock (default 300) |
//! | `DDM_REGISTRY_GC_GRACE` | seconds an unnamed blob in a store lives before `registry gc` deletes it (default 3600) |
//! | `SLURM_ARRAY_TASK_ID`, `JOB_COMPLETION_INDEX` | an island's cluster in a Slurm array or an indexed Kubernetes Job |
//! | `DDM_GPU_ATTENTION` | the DiT's self-attention and PixArt's cross-attention on a GPU device: `kernel` (default, ddm's CubeCL kernels) or `composite` (burn's ops) |
//! | `DDM_CPU_CAPABILITY` | `avx2` keeps the CPU backend's AVX-512 kernels out (gemm's, macerator's, ddm's fused ones), to measure an AVX2 machine on an AVX-512 one; `avx512` or unset: the widest the CPU has |
//! | `RAYON_NUM_THREADS` | CPU threads (read by rayon; reported by the benchmarks) |

use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, Result};

pub const CACHE: &str = "DDM_CACHE";
pub const CA_CERT: &str = "DDM_CA_CERT";
pub const SERVE_TOKEN: &str = "DDM_SERVE_TOKEN";
pub const REGISTRY_LOCK_WAIT: &str = "DDM_REGISTRY_LOCK_WAIT";
pub const REGISTRY_GC_GRACE: &str = "DDM_REGISTRY_GC_GRACE";
/// Where an array job says which element it is, in the order they are read.
pub const ARRAY_INDEX: [&str; 2] = ["SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX"];
pub const THREADS: &str = "RAYON_NUM_THREADS";
pub const GPU_ATTENTION: &str = "DDM_GPU_ATTENTION";
pub const CPU_CAPABILITY: &str = "DDM_CPU_CAPABILITY";

/// ddm's cache directory.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = non_empty(CACHE) {
        return PathBuf::from(d);
    }
    if let Some(d) = non_empty("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("ddm");
    }
    match non_empty("HOME") {
        Some(h) => PathBuf::from(h).join(".cache/ddm"),
        None => PathBuf::from(".ddm-cache"),
    }
}

/// The PEM file named by `DDM_CA_CERT`, if set.
pub fn ca_cert() -> Option<PathBuf> {
    non_empty(CA_CERT).map(PathBuf::from)
}

/// The bearer token from `DDM_SERVE_TOKEN`, trimmed, if set and not blank.
pub fn serve_token() -> Option<String> {
    let t = non_empty(SERVE_TOKEN)?;
    let t = t.to_string_lossy().trim().to_string();
    (!t.is_empty()).then_some(t)
}

/// `DDM_REGISTRY_LOCK_WAIT` as a duration, if set.
pub fn registry_lock_wait() -> Result<Option<Duration>> {
    seconds(REGISTRY_LOCK_WAIT)
}

/// `DDM_REGISTRY_GC_GRACE` as a duration, if set.
pub fn registry_gc_grace() -> Result<Option<Duration>> {
    seconds(REGISTRY_GC_GRACE)
}

/// The array job's element (`SLURM_ARRAY_TASK_ID`, else `JOB_COMPLETION_INDEX`) and the variable
/// it came from, if either is set.
pub fn array_index() -> Result<Option<(usize, &'static str)>> {
    for var in ARRAY_INDEX {
        if let Some(v) = non_empty(var) {
            let v = v.to_string_lossy();
            let k = v
                .trim()
                .parse()
                .map_err(|_| invalid(var, &v, "not a cluster index (a whole number from 0)"))?;
            return Ok(Some((k, var)));
        }
    }
    Ok(None)
}

/// Whether the attention (the DiT's, PixArt's cross-attention) runs ddm's CubeCL kernels on a GPU
/// device (`DDM_GPU_ATTENTION`
/// unset or `kernel`) or burn's composite ops (`composite`).
pub fn gpu_attention_kernels() -> Result<bool> {
    let Some(v) = non_empty(GPU_ATTENTION) else {
        return Ok(true);
    };
    let v = v.to_string_lossy();
    match v.trim() {
        "kernel" => Ok(true),
        "composite" => Ok(false),
        _ => Err(invalid(GPU_ATTENTION, &v, "expected `kernel` or `composite`")),
    }
}

/// Checks `DDM_CPU_CAPABILITY`: unset, `avx512` (the widest the CPU has, the default) or `avx2`
/// (AVX-512 kept out). The CPU kernels read it themselves, once (the vendored gemm-common and
/// macerator, burn-flex's `vexp::avx512`), so here it is only refused when it is something else,
/// which they would silently take for the default.
pub fn cpu_capability() -> Result<()> {
    let Some(v) = std::env::var_os(CPU_CAPABILITY) else {
        return Ok(());
    };
    match v.to_str() {
        Some("avx2" | "avx512") => Ok(()),
        _ => Err(invalid(
            CPU_CAPABILITY,
            &v.to_string_lossy(),
            "expected `avx2` (keeps AVX-512 out) or `avx512` (the default)",
        )),
    }
}

/// The CPU threads rayon uses: `RAYON_NUM_THREADS` when it is a number, else every core.
pub fn threads() -> usize {
    non_empty(THREADS)
        .and_then(|v| v.to_str()?.trim().parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn non_empty(var: &str) -> Option<std::ffi::OsString> {
    std::env::var_os(var).filter(|v| !v.is_empty())
}

/// A variable holding seconds: a finite number from 0 to a year.
fn seconds(var: &str) -> Result<Option<Duration>> {
    let Some(v) = non_empty(var) else {
        return Ok(None);
    };
    let v = v.to_string_lossy();
    match v.trim().parse::<f64>() {
        Ok(s) if s.is_finite() && (0.0..=YEAR_S).contains(&s) => Ok(Some(Duration::from_secs_f64(s))),
        _ => Err(invalid(var, &v, "expected seconds, a number from 0 to 31536000")),
    }
}

const YEAR_S: f64 = 365.0 * 24.0 * 3600.0;

fn invalid(var: &str, value: &str, reason: &str) -> Error {
    Error::Env {
        var: var.to_string(),
        value: crate::text::printable(crate::text::short(value, 80)).into_owned(),
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // One test touches the process environment, so no two race on it.
    #[test]
    fn values_are_read_or_refused_by_name() {
        let var = REGISTRY_GC_GRACE;
        // SAFETY: the only test in this binary that changes the environment.
        unsafe { std::env::set_var(var, "2.5") };
        assert_eq!(registry_gc_grace().unwrap(), Some(Duration::from_millis(2500)));
        for bad in ["-1", "NaN", "soon", "1e12"] {
            unsafe { std::env::set_var(var, bad) };
            let e = registry_gc_grace().unwrap_err().to_string();
            assert!(e.contains(var) && e.contains(bad), "{e}");
        }
        unsafe { std::env::remove_var(var) };
        assert_eq!(registry_gc_grace().unwrap(), None);

        unsafe { std::env::set_var("SLURM_ARRAY_TASK_ID", "x3") };
        let e = array_index().unwrap_err().to_string();
        assert!(e.contains("SLURM_ARRAY_TASK_ID") && e.contains("x3"), "{e}");
        unsafe { std::env::set_var("SLURM_ARRAY_TASK_ID", " 3 ") };
        assert_eq!(array_index().unwrap(), Some((3, "SLURM_ARRAY_TASK_ID")));
        unsafe { std::env::remove_var("SLURM_ARRAY_TASK_ID") };

        assert!(gpu_attention_kernels().unwrap());
        unsafe { std::env::set_var(GPU_ATTENTION, "composite") };
        assert!(!gpu_attention_kernels().unwrap());
        unsafe { std::env::set_var(GPU_ATTENTION, "flash") };
        let e = gpu_attention_kernels().unwrap_err().to_string();
        assert!(e.contains(GPU_ATTENTION) && e.contains("flash"), "{e}");
        unsafe { std::env::remove_var(GPU_ATTENTION) };

        assert!(cpu_capability().is_ok());
        unsafe { std::env::set_var(CPU_CAPABILITY, "AVX2") };
        let e = cpu_capability().unwrap_err().to_string();
        assert!(e.contains(CPU_CAPABILITY) && e.contains("AVX2"), "{e}");
        unsafe { std::env::remove_var(CPU_CAPABILITY) };
    }
}
