//! Where the model runs: `cpu` (burn's Flex backend) or `cuda[:N]` (burn's CUDA backend, behind the
//! `cuda` cargo feature). This is the only module that names concrete burn backends, so moving to
//! another burn release or backend touches this file alone.
//!
//! `wgpu` (behind the `wgpu` feature) is a check, not a training target: burn's WGPU backend runs
//! the same burn-cubecl kernels and backward rules as CUDA, and with a software Vulkan driver
//! (Mesa's lavapipe) it runs on any CPU. So a machine without an NVIDIA GPU can still find what the
//! GPU path lacks (the bilinear-backward panic of the first H100 run was such a gap) before a GPU
//! session is spent on it. `scripts/gpu_check.sh` runs with `DEV=wgpu` (README, "Devices").

use anyhow::{bail, Result};
use burn::tensor::backend::Backend;
use std::fmt;
use std::str::FromStr;

/// The CPU backend.
pub type Cpu = burn::backend::Flex;
/// The CUDA backend.
#[cfg(feature = "cuda")]
pub type Gpu = burn::backend::Cuda;
/// burn-cubecl through WGPU (see the module comment).
#[cfg(feature = "wgpu")]
pub type Wgpu = burn::backend::Wgpu;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
    /// The default WGPU adapter (a check of the JIT path; see the module comment).
    Wgpu,
}

impl FromStr for DeviceSpec {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
            "wgpu" => Ok(DeviceSpec::Wgpu),
            _ => match s.strip_prefix("cuda:").map(|n| n.parse::<usize>()) {
                Some(Ok(n)) => Ok(DeviceSpec::Cuda(n)),
                _ => bail!("unknown device '{s}': use cpu, cuda, cuda:N (or wgpu, a check of the GPU code path)"),
            },
        }
    }
}

impl DeviceSpec {
    /// The device's index within its kind (the CPU and the WGPU adapter are device 0).
    pub fn index(self) -> usize {
        match self {
            DeviceSpec::Cpu | DeviceSpec::Wgpu => 0,
            DeviceSpec::Cuda(n) => n,
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceSpec::Wgpu => write!(f, "wgpu"),
        }
    }
}

/// The burn backend a device runs on, in words (for reports).
pub fn backend_name(spec: DeviceSpec) -> String {
    match spec {
        DeviceSpec::Cpu => format!("burn flex (pure Rust) on the CPU, {} threads", rayon::current_num_threads()),
        DeviceSpec::Cuda(n) => format!("burn cuda on GPU {n}"),
        DeviceSpec::Wgpu => "burn wgpu".into(),
    }
}

/// Work generic over the backend; [`run_on`] picks the backend from a [`DeviceSpec`].
/// (Rust closures cannot be generic over a type, hence a trait.)
pub trait BackendTask {
    type Output;
    fn run<B: Backend>(self, device: B::Device) -> Result<Self::Output>;
    /// Work spread over several devices of one backend (data-parallel training); by default the
    /// first device does it all.
    fn run_multi<B: Backend>(self, devices: Vec<B::Device>) -> Result<Self::Output>
    where
        Self: Sized,
    {
        let first = devices.into_iter().next().expect("at least one device");
        self.run::<B>(first)
    }
}

pub fn run_on<T: BackendTask>(spec: DeviceSpec, task: T) -> Result<T::Output> {
    run_on_devices(spec, &[spec.index()], task)
}

/// Run on several devices of `spec`'s kind: GPU indices for CUDA; for the CPU, which is one
/// device, each index is one more model replica on it (for testing data parallelism).
pub fn run_on_devices<T: BackendTask>(spec: DeviceSpec, indices: &[usize], task: T) -> Result<T::Output> {
    if indices.is_empty() {
        bail!("no device given");
    }
    match spec {
        DeviceSpec::Cpu => task.run_multi::<Cpu>(vec![Default::default(); indices.len()]),
        DeviceSpec::Cuda(_) => run_cuda(indices, task),
        DeviceSpec::Wgpu => run_wgpu(indices, task),
    }
}

#[cfg(feature = "wgpu")]
fn run_wgpu<T: BackendTask>(indices: &[usize], task: T) -> Result<T::Output> {
    if indices.len() > 1 {
        bail!("wgpu: one device only (it is a check of the GPU code path, not a training target)");
    }
    let device = burn::backend::wgpu::WgpuDevice::default();
    if let Err(msg) = probe::<Wgpu>(&device) {
        bail!("wgpu: no usable adapter on this machine ({msg}); on Debian, `apt-get install mesa-vulkan-drivers` gives a software one");
    }
    task.run::<Wgpu>(device)
}

#[cfg(not(feature = "wgpu"))]
fn run_wgpu<T: BackendTask>(_indices: &[usize], _task: T) -> Result<T::Output> {
    bail!("wgpu: this mvlt was built without it; rebuild with `cargo build --release --features wgpu`")
}

/// One tiny tensor op on `device`. GPU runtimes load their drivers at first use and panic when
/// they are missing (cudarc without libcuda/NVRTC, wgpu without an adapter): the panic's text, to
/// turn into an error that says what is missing instead of a backtrace.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn probe<B: Backend>(device: &B::Device) -> std::result::Result<(), String> {
    // The device is only read, and nothing runs on it after a failed probe.
    let op = std::panic::AssertUnwindSafe(|| burn::tensor::Tensor::<B, 1>::ones([1], device).into_scalar());
    std::panic::catch_unwind(op).map(|_| ()).map_err(|e| {
        e.downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default()
    })
}

#[cfg(feature = "cuda")]
fn run_cuda<T: BackendTask>(indices: &[usize], task: T) -> Result<T::Output> {
    let mut devices = vec![];
    for &n in indices {
        let device = burn::backend::cuda::CudaDevice::new(n);
        if let Err(msg) = probe::<Gpu>(&device) {
            bail!("cuda:{n}: no usable NVIDIA GPU / CUDA driver with this index on this machine ({msg})");
        }
        devices.push(device);
    }
    task.run_multi::<Gpu>(devices)
}

#[cfg(not(feature = "cuda"))]
fn run_cuda<T: BackendTask>(indices: &[usize], _task: T) -> Result<T::Output> {
    bail!(
        "cuda:{}: this mvlt was built without GPU support; rebuild with `cargo build --release --features cuda`",
        indices[0]
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn parses_devices() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert_eq!("wgpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Wgpu);
        assert!("tpu".parse::<DeviceSpec>().unwrap_err().to_string().contains("unknown device 'tpu'"));
    }
}
