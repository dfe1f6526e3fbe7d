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
    Device::flex()
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
