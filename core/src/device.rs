//! Backend selection. burn 0.22 picks the device at run time; ddm exposes `--device cpu|wgpu|cuda`.
//!
//! The CPU backend is burn's `flex` (pure Rust, rayon + gemm). It was chosen by measurement on the
//! 2-core development machines (see ../shared/docs/notes/burn.md: a DiT training step was ~20%
//! faster on flex than on ndarray, and burn 0.22 deprecates ndarray). GPU backends are cargo
//! features of the `ddm` package (`wgpu`, `cuda`), off by default because they are large to build.

use std::str::FromStr;

use burn::prelude::*;

use crate::error::{Error, Result};

/// Which backend runs the tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    Cpu,
    Wgpu,
    Cuda,
}

impl FromStr for DeviceChoice {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "cpu" => Ok(DeviceChoice::Cpu),
            "wgpu" => Ok(DeviceChoice::Wgpu),
            "cuda" => Ok(DeviceChoice::Cuda),
            _ => Err(Error::Device(format!(
                "unknown device `{s}`: expected cpu, wgpu or cuda"
            ))),
        }
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeviceChoice::Cpu => "cpu",
            DeviceChoice::Wgpu => "wgpu",
            DeviceChoice::Cuda => "cuda",
        })
    }
}

/// The default CPU device (burn `flex`).
pub fn cpu() -> Device {
    keep_freed_memory();
    Device::flex()
}

/// glibc hands allocations above 128 KiB to fresh `mmap`s and returns them on free, so every
/// activation of a training step (megabytes each) was page-faulted in again and its unmapping
/// shot down TLBs on every core: ~17% of a DiT step on the 2-core machine. Serving blocks up to
/// 32 MiB from the heap and never trimming it keeps freed memory for the next step. Peak memory is
/// unchanged (the same blocks are live at the peak); the process just keeps its high-water mark.
/// Once per process; a no-op outside glibc.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: mallopt only changes allocator parameters; any value is accepted or refused.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
                libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
            }
        });
    }
}

/// The device for `choice`, or an error saying which cargo feature the build lacks.
pub fn device(choice: DeviceChoice) -> Result<Device> {
    match choice {
        DeviceChoice::Cpu => Ok(cpu()),
        #[cfg(feature = "wgpu")]
        DeviceChoice::Wgpu => Ok(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)),
        #[cfg(feature = "cuda")]
        DeviceChoice::Cuda => Ok(Device::cuda(0)),
        #[allow(unreachable_patterns)]
        other => Err(Error::Device(format!(
            "this ddm was built without the `{other}` backend; rebuild with `cargo build --release --features {other}`"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_reports_missing_backends() {
        assert_eq!("CPU".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cpu);
        assert!(
            "tpu"
                .parse::<DeviceChoice>()
                .unwrap_err()
                .to_string()
                .contains("cpu, wgpu or cuda")
        );
        #[cfg(not(feature = "cuda"))]
        assert!(
            device(DeviceChoice::Cuda)
                .unwrap_err()
                .to_string()
                .contains("--features cuda")
        );
    }
}
