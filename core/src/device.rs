//! Backend selection. burn 0.22 picks the device at run time; ddm exposes
//! `--device cpu|wgpu|cuda[:N]`.
//!
//! The CPU backend is burn's `flex` (pure Rust, rayon + gemm). It was chosen by measurement on the
//! 2-core development machines (a DiT training step was ~20% faster on flex than on ndarray, and
//! burn 0.22 deprecates ndarray). GPU backends are cargo
//! features of the `ddm` package, both on by default: `wgpu` (any GPU with a Vulkan, Metal or DX12
//! driver) and `cuda` (NVIDIA GPUs). Neither needs a GPU, driver or toolkit to build: their
//! libraries are loaded when a device is opened, so one build serves every machine.

use std::str::FromStr;

use burn::prelude::*;

use crate::error::{Error, Result};

/// Which backend runs the tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceChoice {
    Cpu,
    Wgpu(WgpuChoice),
    /// The N-th CUDA device (`cuda` is `cuda:0`).
    Cuda(usize),
}

/// Which graphics API and adapter the wgpu backend uses: `wgpu[:API][:ADAPTER]`, e.g.
/// `wgpu`, `wgpu:vulkan`, `wgpu:gl:software`, `wgpu:vulkan:discrete-1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct WgpuChoice {
    pub api: WgpuApi,
    pub adapter: WgpuAdapter,
}

/// The graphics API under wgpu. `Auto` tries Vulkan first (on Linux the API of every GPU driver,
/// and of Mesa's software lavapipe), then whatever else the platform offers (OpenGL ES, Metal).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum WgpuApi {
    #[default]
    Auto,
    Vulkan,
    Gl,
    Metal,
    Dx12,
}

/// Which adapter: wgpu's choice (a high-power GPU first), the N-th discrete or integrated GPU,
/// or a software rasteriser (lavapipe, llvmpipe).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum WgpuAdapter {
    #[default]
    Default,
    Discrete(usize),
    Integrated(usize),
    Software,
}

impl FromStr for DeviceChoice {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let lower = s.to_ascii_lowercase();
        let mut parts = lower.split(':');
        let bad = |why: String| Error::Device(format!("device `{s}`: {why}"));
        match parts.next().unwrap_or("") {
            "cpu" if parts.clone().next().is_none() => Ok(DeviceChoice::Cpu),
            "cuda" => match (parts.next(), parts.next()) {
                (None, _) => Ok(DeviceChoice::Cuda(0)),
                (Some(n), None) => n
                    .parse()
                    .map(DeviceChoice::Cuda)
                    .map_err(|_| bad(format!("`{n}`: not a CUDA device index (cuda:0, cuda:1, ...)"))),
                (Some(_), Some(_)) => Err(bad("expected cuda or cuda:N".into())),
            },
            "wgpu" => {
                let mut w = WgpuChoice::default();
                for p in parts {
                    let indexed = |prefix: &str| -> Option<Result<usize>> {
                        let rest = p.strip_prefix(prefix)?;
                        Some(match rest.strip_prefix('-') {
                            None if rest.is_empty() => Ok(0),
                            Some(n) => n.parse().map_err(|_| bad(format!("`{p}`: not an adapter index"))),
                            None => Err(bad(format!("unknown wgpu option `{p}`"))),
                        })
                    };
                    match p {
                        "auto" => w.api = WgpuApi::Auto,
                        "vulkan" => w.api = WgpuApi::Vulkan,
                        "gl" | "opengl" | "gles" => w.api = WgpuApi::Gl,
                        "metal" => w.api = WgpuApi::Metal,
                        "dx12" => w.api = WgpuApi::Dx12,
                        "default" => w.adapter = WgpuAdapter::Default,
                        "software" | "cpu" => w.adapter = WgpuAdapter::Software,
                        _ => {
                            if let Some(i) = indexed("discrete") {
                                w.adapter = WgpuAdapter::Discrete(i?);
                            } else if let Some(i) = indexed("integrated") {
                                w.adapter = WgpuAdapter::Integrated(i?);
                            } else {
                                return Err(bad(format!(
                                    "unknown wgpu option `{p}` (APIs: vulkan, gl, metal, dx12; adapters: software, discrete[-N], integrated[-N])"
                                )));
                            }
                        }
                    }
                }
                Ok(DeviceChoice::Wgpu(w))
            }
            _ => Err(Error::Device(format!(
                "unknown device `{s}`: expected cpu, wgpu[:API][:ADAPTER] (e.g. wgpu:vulkan:software) or cuda[:N]"
            ))),
        }
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(0) => f.write_str("cuda"),
            DeviceChoice::Cuda(i) => write!(f, "cuda:{i}"),
            DeviceChoice::Wgpu(w) => {
                f.write_str("wgpu")?;
                match w.api {
                    WgpuApi::Auto => {}
                    WgpuApi::Vulkan => f.write_str(":vulkan")?,
                    WgpuApi::Gl => f.write_str(":gl")?,
                    WgpuApi::Metal => f.write_str(":metal")?,
                    WgpuApi::Dx12 => f.write_str(":dx12")?,
                }
                match w.adapter {
                    WgpuAdapter::Default => Ok(()),
                    WgpuAdapter::Software => f.write_str(":software"),
                    WgpuAdapter::Discrete(i) => write!(f, ":discrete-{i}"),
                    WgpuAdapter::Integrated(i) => write!(f, ":integrated-{i}"),
                }
            }
        }
    }
}

/// The devices one island trains on, `--device A[,B...]` (e.g. `cuda:0,cuda:1`): the first holds
/// the master weights, the optimizer and the EMA; every device computes the gradients of its share
/// of each batch (data parallel, `ddm_trainer::train`).
///
/// A wgpu adapter may be named more than once: each further mention is another logical device
/// (its own queue and memory) on the same adapter, which is how several devices are tested on one
/// software Vulkan; on one GPU it gains nothing. The CPU and a CUDA device are one device each and
/// may be named once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Devices(Vec<DeviceChoice>);

impl Devices {
    /// The device that holds the master weights.
    pub fn primary(&self) -> DeviceChoice {
        self.0[0]
    }

    pub fn choices(&self) -> &[DeviceChoice] {
        &self.0
    }

    /// Open every device, in order ([`device`] for the first mention of each).
    pub fn open(&self) -> Result<Vec<Device>> {
        let mut opened: Vec<Device> = Vec::with_capacity(self.0.len());
        for (i, &choice) in self.0.iter().enumerate() {
            #[cfg_attr(not(feature = "wgpu"), allow(unused_variables))]
            let again = self.0[..i].contains(&choice);
            opened.push(match choice {
                #[cfg(feature = "wgpu")]
                DeviceChoice::Wgpu(w) if again => gpu::open_another(w)?,
                _ => device(choice)?,
            });
        }
        Ok(opened)
    }
}

impl From<DeviceChoice> for Devices {
    fn from(choice: DeviceChoice) -> Self {
        Devices(vec![choice])
    }
}

impl FromStr for Devices {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let choices = s
            .split(',')
            .map(|d| d.trim().parse::<DeviceChoice>())
            .collect::<Result<Vec<_>>>()?;
        for (i, c) in choices.iter().enumerate() {
            if !matches!(c, DeviceChoice::Wgpu(_)) && choices[..i].contains(c) {
                return Err(Error::Device(format!(
                    "--device {s}: names `{c}` twice; each device computes a share of the batch once"
                )));
            }
        }
        Ok(Devices(choices))
    }
}

impl std::fmt::Display for Devices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self.0.iter().map(|c| c.to_string()).collect();
        f.write_str(&names.join(","))
    }
}

/// The default CPU device (burn `flex`).
pub fn cpu() -> Device {
    keep_freed_memory();
    Device::flex()
}

/// The widest SIMD the CPU backend's kernels pick on this machine: `avx512`, `avx2` (also where
/// `DDM_CPU_CAPABILITY=avx2` keeps AVX-512 out) or `baseline`. The benchmarks print it.
pub fn cpu_simd() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if burn::backend::flex::ops::vexp::avx512() {
            return "avx512";
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return "avx2";
        }
    }
    "baseline"
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
        DeviceChoice::Cpu => {
            crate::env::cpu_capability()?;
            Ok(cpu())
        }
        #[cfg(feature = "wgpu")]
        DeviceChoice::Wgpu(w) => {
            attention_on_gpu()?;
            gpu::open(w)
        }
        #[cfg(feature = "cuda")]
        DeviceChoice::Cuda(index) => {
            attention_on_gpu()?;
            cuda::open(index)
        }
        #[allow(unreachable_patterns)]
        other => {
            let feature = match other {
                DeviceChoice::Cuda(_) => "cuda",
                _ => "wgpu",
            };
            Err(Error::Device(format!(
                "this ddm was built without the `{feature}` backend (asked for `{other}`); rebuild with `cargo build --release --features {feature}`"
            )))
        }
    }
}

/// The self-attention's implementation on GPU devices, from `DDM_GPU_ATTENTION`.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn attention_on_gpu() -> Result<()> {
    ddm_kernels::gpu::use_kernels(crate::env::gpu_attention_kernels()?);
    Ok(())
}

/// Opening a CUDA device. The driver (libcuda), NVRTC (which compiles the kernels when they are
/// first used) and the CUDA headers are found at run time, not at build time; burn's runtime
/// panics on the first tensor when one is missing, so each is checked here first and a missing
/// one is an error that names it.
#[cfg(feature = "cuda")]
mod cuda {
    use burn::prelude::Device;

    use crate::error::{Error, Result};

    pub fn open(index: usize) -> Result<Device> {
        let choice = super::DeviceChoice::Cuda(index);
        let fail = |why: String| Error::Device(format!("--device {choice}: {why}"));
        // SAFETY: each only tries to `dlopen` the library under its usual names.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(fail(
                "the NVIDIA driver's library (libcuda.so) is not on this machine: install the NVIDIA driver, or use --device wgpu or cpu".into(),
            ));
        }
        let count = cudarc::driver::result::init()
            .and_then(|()| cudarc::driver::result::device::get_count())
            .map_err(|e| fail(format!("the CUDA driver did not start: {e}")))?;
        if index >= count.max(0) as usize {
            return Err(fail(format!("this machine has {count} CUDA device(s)")));
        }
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(fail(
                "NVRTC (libnvrtc.so), which compiles the GPU kernels at run time, was not found: install the CUDA toolkit's NVRTC (or `pip install nvidia-cuda-nvrtc-cu12`) and add its lib directory to LD_LIBRARY_PATH".into(),
            ));
        }
        match cubecl_cuda::install::cuda_path() {
            Some(p) if p.join("include").is_dir() => {
                let name = name(index).unwrap_or_default();
                tracing::info!("cuda: device {index} of {count} ({name}), headers in {}", p.display());
                Ok(Device::cuda(index))
            }
            _ => Err(fail(
                "the CUDA headers were not found (CUDA_PATH, /usr/local/cuda, /opt/cuda): install the CUDA toolkit's headers and set CUDA_PATH to the directory that holds include/".into(),
            )),
        }
    }

    /// The name of CUDA device `index` (e.g. "NVIDIA H100 80GB HBM3"), where the driver has one.
    pub fn name(index: usize) -> Option<String> {
        // SAFETY: only tries to `dlopen` libcuda.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return None;
        }
        cudarc::driver::result::init().ok()?;
        let device = cudarc::driver::result::device::get(index.try_into().ok()?).ok()?;
        cudarc::driver::result::device::get_name(device).ok()
    }
}

/// Opening a wgpu device: the API and adapter chosen, and said.
#[cfg(feature = "wgpu")]
mod gpu {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};

    use burn::backend::wgpu::graphics::{AutoGraphicsApi, Dx12, Metal, OpenGl, Vulkan};
    use burn::backend::wgpu::{RuntimeOptions, WgpuSetup, try_init_setup};
    use burn::prelude::Device;
    use burn::tensor::DeviceKind;
    use cubecl_wgpu::{WgpuBackend, WgpuDevice, WgpuDeviceKind};

    use super::{WgpuAdapter, WgpuApi, WgpuChoice};
    use crate::error::{Error, Result};

    /// What each choice got in this process (a wgpu runtime is set up once per device): the
    /// adapter's name and the setup, from which [`open_another`] makes further devices.
    type Opened = std::result::Result<(String, WgpuSetup), String>;

    fn opened() -> &'static Mutex<HashMap<WgpuChoice, Opened>> {
        static OPENED: OnceLock<Mutex<HashMap<WgpuChoice, Opened>>> = OnceLock::new();
        OPENED.get_or_init(Default::default)
    }

    fn kinds(a: WgpuAdapter) -> (DeviceKind, WgpuDeviceKind) {
        match a {
            WgpuAdapter::Default => (DeviceKind::DefaultDevice, WgpuDeviceKind::DefaultDevice),
            WgpuAdapter::Discrete(i) => (DeviceKind::DiscreteGpu(i), WgpuDeviceKind::DiscreteGpu(i)),
            WgpuAdapter::Integrated(i) => (DeviceKind::IntegratedGpu(i), WgpuDeviceKind::IntegratedGpu(i)),
            WgpuAdapter::Software => (DeviceKind::Cpu, WgpuDeviceKind::Cpu),
        }
    }

    fn setup(api: WgpuApi, device: &WgpuDevice) -> std::result::Result<WgpuSetup, String> {
        let options = RuntimeOptions::default();
        match api {
            WgpuApi::Auto => try_init_setup::<AutoGraphicsApi>(device, options),
            WgpuApi::Vulkan => try_init_setup::<Vulkan>(device, options),
            WgpuApi::Gl => try_init_setup::<OpenGl>(device, options),
            WgpuApi::Metal => try_init_setup::<Metal>(device, options),
            WgpuApi::Dx12 => try_init_setup::<Dx12>(device, options),
        }
        .map_err(|e| format!("{e:?}"))
    }

    /// Set up the wgpu runtime for `w` (once per process) and log the adapter it got; the burn
    /// device that uses it.
    pub fn open(w: WgpuChoice) -> Result<Device> {
        let (kind, wgpu_kind) = kinds(w.adapter);
        let mut opened = opened().lock().unwrap_or_else(|e| e.into_inner());
        let got = opened.entry(w).or_insert_with(|| {
            // The device burn's `Device::wgpu(kind)` names: the runtime registered here serves it.
            let device = WgpuDevice::new(wgpu_kind).on(WgpuBackend::Auto);
            let result = match w.api {
                // Vulkan first: probing OpenGL (EGL) on a headless Linux machine prints
                // "XDG_RUNTIME_DIR is invalid or not set" and finds at best the same GPU.
                WgpuApi::Auto => setup(WgpuApi::Vulkan, &device).or_else(|vulkan| {
                    tracing::info!("wgpu: no Vulkan adapter ({vulkan}); trying the other APIs");
                    setup(WgpuApi::Auto, &device)
                }),
                api => setup(api, &device),
            };
            result.map(|s| {
                let i = s.adapter.get_info();
                let software = matches!(i.device_type, cubecl_wgpu::wgpu::DeviceType::Cpu);
                let name = format!(
                    "{} ({:?}, {}, driver {} {})",
                    i.name,
                    i.backend,
                    if software { "software" } else { "hardware" },
                    i.driver,
                    i.driver_info
                );
                (name, s)
            })
        });
        match got {
            Ok((adapter, _)) => {
                tracing::info!("wgpu: {adapter}");
                Ok(Device::wgpu(kind))
            }
            Err(e) => Err(Error::Device(format!(
                "--device {}: no usable adapter: {e}. On a machine without a GPU, Mesa's software Vulkan (Debian: mesa-vulkan-drivers) provides one",
                super::DeviceChoice::Wgpu(w)
            ))),
        }
    }

    /// The adapter the first `open(w)` of this process got, as logged.
    pub fn adapter(w: WgpuChoice) -> Option<String> {
        let opened = opened().lock().ok()?;
        opened.get(&w)?.as_ref().ok().map(|(name, _)| name.clone())
    }

    /// Another logical device (its own queue, memory and runtime) on the adapter `open(w)` got:
    /// requested as cubecl asks for its own (WGSL: the adapter's features and limits), then
    /// registered with burn as an existing setup.
    pub fn open_another(w: WgpuChoice) -> Result<Device> {
        use cubecl_wgpu::wgpu;
        open(w)?;
        let first = match opened().lock().unwrap_or_else(|e| e.into_inner()).get(&w) {
            Some(Ok((_, setup))) => setup.clone(),
            _ => unreachable!("open(w) succeeded"),
        };
        let fail = |why: String| {
            Error::Device(format!(
                "--device {}: a second device on its adapter: {why}",
                super::DeviceChoice::Wgpu(w)
            ))
        };
        let adapter = first.adapter.clone();
        let (device, queue) = futures_lite::future::block_on(
            adapter.request_device(&wgpu::DeviceDescriptor {
                label: None,
                required_features: adapter
                    .features()
                    .difference(wgpu::Features::MAPPABLE_PRIMARY_BUFFERS),
                required_limits: adapter.limits(),
                memory_hints: wgpu::MemoryHints::MemoryUsage,
                trace: wgpu::Trace::Off,
                // SAFETY: as cubecl-wgpu enables them for its own devices (passthrough shaders).
                experimental_features: unsafe { wgpu::ExperimentalFeatures::enabled() },
            }),
        )
        .map_err(|e| fail(e.to_string()))?;
        let setup = WgpuSetup {
            device,
            queue,
            ..first
        };
        Device::wgpu_options()
            .setup(setup)
            .init()
            .map_err(|e| fail(format!("{e:?}")))
    }
}

/// The wgpu adapter a `--device wgpu...` got in this process ("NAME (API, hardware|software,
/// driver ...)"), once it is open, or the CUDA device's name; None on the CPU or builds without
/// the backend.
pub fn adapter(choice: DeviceChoice) -> Option<String> {
    match choice {
        #[cfg(feature = "wgpu")]
        DeviceChoice::Wgpu(w) => gpu::adapter(w),
        #[cfg(feature = "cuda")]
        DeviceChoice::Cuda(i) => cuda::name(i),
        _ => None,
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
                .contains("expected cpu, wgpu")
        );
        for s in [
            "wgpu",
            "wgpu:vulkan",
            "wgpu:gl:software",
            "wgpu:discrete-1",
            "wgpu:vulkan:integrated-0",
        ] {
            assert_eq!(s.parse::<DeviceChoice>().unwrap().to_string(), s);
        }
        assert_eq!(
            "wgpu:cpu".parse::<DeviceChoice>().unwrap(),
            DeviceChoice::Wgpu(WgpuChoice {
                api: WgpuApi::Auto,
                adapter: WgpuAdapter::Software
            })
        );
        assert_eq!("cuda:0".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cuda(0));
        for s in ["cuda", "cuda:3"] {
            assert_eq!(s.parse::<DeviceChoice>().unwrap().to_string(), s);
        }
        for bad in ["wgpu:vulkn", "wgpu:discrete-x", "cpu:1", "cuda:x", "cuda:0:1"] {
            assert!(bad.parse::<DeviceChoice>().is_err(), "{bad}");
        }
        #[cfg(not(feature = "cuda"))]
        assert!(
            device(DeviceChoice::Cuda(0))
                .unwrap_err()
                .to_string()
                .contains("--features cuda")
        );
    }

    /// `--device A,B`: an island's devices, in order; the CPU or a CUDA device named twice is
    /// refused (a wgpu adapter may be: another logical device on it).
    #[test]
    fn device_lists_parse_and_refuse_a_device_twice() {
        let d: Devices = "cuda:0, cuda:1".parse().unwrap();
        assert_eq!(d.choices(), &[DeviceChoice::Cuda(0), DeviceChoice::Cuda(1)]);
        assert_eq!(
            (d.primary(), d.to_string()),
            (DeviceChoice::Cuda(0), "cuda,cuda:1".into())
        );
        let w: Devices = "wgpu:software,wgpu:software".parse().unwrap();
        assert_eq!(w.choices().len(), 2);
        for bad in ["cpu,cpu", "cuda:1,cuda:0,cuda:1"] {
            let e = bad.parse::<Devices>().unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains("twice"), "{e}");
        }
        assert!("cpu,tpu".parse::<Devices>().is_err());
        assert_eq!(Devices::from(DeviceChoice::Cpu).to_string(), "cpu");
    }

    /// Without the NVIDIA driver (every CI machine) `--device cuda` is an error naming it, not a
    /// panic in the runtime; with one, an index past the last device is refused by count.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_names_what_is_missing() {
        // SAFETY: only tries to `dlopen` libcuda.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            let e = device(DeviceChoice::Cuda(0)).unwrap_err().to_string();
            assert!(
                e.starts_with("--device cuda: ") && e.contains("libcuda.so"),
                "{e}"
            );
        } else {
            let e = device(DeviceChoice::Cuda(1 << 20)).unwrap_err().to_string();
            assert!(e.contains("CUDA device(s)"), "{e}");
        }
    }
}
