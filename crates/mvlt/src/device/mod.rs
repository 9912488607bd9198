//! Where the model runs: a device (`cpu`, `cuda[:N]`) and the burn backend that drives it. This is
//! the only module that names concrete burn backends, so moving to another burn release or backend
//! touches this file alone.
//!
//! Backends ([`BackendKind`]), each behind a cargo feature but `flex`:
//! - `flex`: burn's pure-Rust CPU backend; needs nothing, always built.
//! - `tch` (feature `tch`): PyTorch's own kernels (libtorch through burn-tch) on the CPU and on
//!   NVIDIA GPUs; 2.3-2.7x flex's speed on 2 CPU cores (docs/BENCHMARKS.md); on GPUs, PyTorch's
//!   defaults (f32 matmuls without TF32).
//!   `scripts/setup-libtorch.sh` installs the libtorch it links.
//! - `cubecl` (feature `cuda`): burn's CUDA backend (cubecl kernels, NVRTC at run time).
//!
//! The caller picks one (the `mvlt` command: `--backend` or `MVLT_BACKEND`); by default a device
//! runs on the fastest backend the binary has for it: `tch` when built, else `flex` (CPU) or
//! `cubecl` (CUDA).
//!
//! `wgpu` (behind the `wgpu` feature) is a check, not a training target: burn's WGPU backend runs
//! the same burn-cubecl kernels and backward rules as CUDA, and with a software Vulkan driver
//! (Mesa's lavapipe) it runs on any CPU. So a machine without an NVIDIA GPU can still find what the
//! GPU path lacks (the bilinear-backward panic of the first H100 run was such a gap) before a GPU
//! session is spent on it. `scripts/gpu_check.sh` runs with `DEV=wgpu` (README, "Devices").

mod host;
mod libtorch;

pub use host::with_host_f32;
#[cfg(feature = "tch")]
pub use libtorch::use_torch_backward_kernels;
pub use libtorch::{libtorch, libtorch_version, torch_threads};

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
/// PyTorch's kernels through libtorch, CPU and CUDA.
#[cfg(feature = "tch")]
pub type Torch = burn::backend::LibTorch<f32>;

/// Whether backend `B`'s fused attention kernel (`burn::tensor::module::attention`) is faster than
/// the written-out product-softmax-product in inference, as measured on pvlt_tiny at 256 px, batch
/// 16, 2 cores (README, Speed): libtorch's scaled_dot_product_attention yes (about 10%); flex's
/// kernel, which runs each (batch, head) on one thread, no (10-15% slower). Backends not measured
/// keep the written-out ops.
pub fn fused_attention_pays<B: Backend>() -> bool {
    #[cfg(feature = "tch")]
    if std::any::TypeId::of::<B>() == std::any::TypeId::of::<Torch>() {
        return true;
    }
    false
}

/// The burn backend that drives a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum BackendKind {
    /// burn's pure-Rust CPU backend (no setup).
    Flex,
    /// libtorch (PyTorch's CPU and CUDA kernels); feature `tch`.
    Tch,
    /// burn's CUDA backend (cubecl); feature `cuda`.
    Cubecl,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Flex => "flex",
            BackendKind::Tch => "tch",
            BackendKind::Cubecl => "cubecl",
        })
    }
}

impl FromStr for BackendKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "flex" => Ok(BackendKind::Flex),
            "tch" | "libtorch" => Ok(BackendKind::Tch),
            "cubecl" => Ok(BackendKind::Cubecl),
            _ => bail!("unknown backend '{s}': use flex, tch or cubecl"),
        }
    }
}

impl BackendKind {
    /// Whether this binary was built with the backend.
    pub fn built(self) -> bool {
        match self {
            BackendKind::Flex => true,
            BackendKind::Tch => cfg!(feature = "tch"),
            BackendKind::Cubecl => cfg!(feature = "cuda"),
        }
    }

    /// The cargo feature that builds it.
    fn feature(self) -> &'static str {
        match self {
            BackendKind::Flex => "",
            BackendKind::Tch => "tch",
            BackendKind::Cubecl => "cuda",
        }
    }
}

/// `cargo run --release` with the backend features this binary was built with: the commands it
/// prints for a user to follow then reuse this build instead of rebuilding without them.
pub fn cargo_run() -> String {
    let mut features: Vec<&str> =
        [BackendKind::Tch, BackendKind::Cubecl].into_iter().filter(|b| b.built()).map(BackendKind::feature).collect();
    if cfg!(feature = "wgpu") {
        features.push("wgpu");
    }
    if features.is_empty() {
        "cargo run --release".to_string()
    } else {
        format!("cargo run --release --features {}", features.join(","))
    }
}

/// The backends this binary has for a kind of device, fastest first (the first is the default).
pub fn backends_for(spec: DeviceSpec) -> Vec<BackendKind> {
    let order: &[BackendKind] = match spec {
        DeviceSpec::Cpu => &[BackendKind::Tch, BackendKind::Flex],
        DeviceSpec::Cuda(_) => &[BackendKind::Tch, BackendKind::Cubecl],
        DeviceSpec::Wgpu => &[],
    };
    order.iter().copied().filter(|b| b.built()).collect()
}

/// `kind`, if this binary has it; else why not and how to get it.
pub fn check_built(kind: BackendKind) -> Result<BackendKind> {
    if !kind.built() {
        bail!(
            "backend {kind}: this mvlt was built without it; rebuild with `--features {}`{}",
            kind.feature(),
            if kind == BackendKind::Tch { " after `eval \"$(scripts/setup-libtorch.sh)\"`" } else { "" }
        );
    }
    Ok(kind)
}

/// The backend `spec` runs on: `chosen` (the caller's choice, e.g. a `--backend` flag), else the
/// fastest this binary has for it.
pub fn backend_for(spec: DeviceSpec, chosen: Option<BackendKind>) -> Result<BackendKind> {
    let built = backends_for(spec);
    match chosen {
        Some(k) if built.contains(&k) => Ok(k),
        Some(k) if !k.built() => check_built(k),
        Some(k) => bail!("backend {k} does not run on {spec} (this binary has {})", names(&built)),
        None => built.first().copied().ok_or_else(|| {
            anyhow::anyhow!(
                "this mvlt has no backend for {spec}: rebuild with `--features tch` (libtorch) or `--features cuda`"
            )
        }),
    }
}

fn names(b: &[BackendKind]) -> String {
    if b.is_empty() {
        return "none".into();
    }
    b.iter().map(|k| k.to_string()).collect::<Vec<_>>().join(", ")
}

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

/// The burn backend a device runs on (`chosen`, else the default), in words (for reports).
pub fn backend_name(spec: DeviceSpec, chosen: Option<BackendKind>) -> String {
    match backend_for(spec, chosen) {
        Ok(backend) => backend_name_of(spec, backend),
        Err(e) if spec != DeviceSpec::Wgpu => format!("{e}"),
        Err(_) => backend_name_of(spec, BackendKind::Cubecl),
    }
}

/// `backend` on `spec`, in words.
pub fn backend_name_of(spec: DeviceSpec, backend: BackendKind) -> String {
    match (spec, backend) {
        (DeviceSpec::Wgpu, _) => "burn wgpu".into(),
        (DeviceSpec::Cpu, BackendKind::Tch) => {
            format!("libtorch {} (burn-tch) on the CPU, {} threads", libtorch_version(), torch_threads())
        }
        (DeviceSpec::Cpu, _) => format!("burn flex (pure Rust) on the CPU, {} threads", rayon::current_num_threads()),
        (DeviceSpec::Cuda(n), BackendKind::Tch) => format!("libtorch {} (burn-tch) on GPU {n}", libtorch_version()),
        (DeviceSpec::Cuda(n), _) => format!("burn cuda (cubecl) on GPU {n}"),
    }
}

/// What `mvlt info` prints: the backends of this binary and which each device would use
/// (`chosen`, else the default).
pub fn describe(chosen: Option<BackendKind>) -> String {
    let mut out = String::new();
    let built: Vec<BackendKind> =
        [BackendKind::Flex, BackendKind::Tch, BackendKind::Cubecl].into_iter().filter(|b| b.built()).collect();
    out += &format!("backends built: {}\n", names(&built));
    for spec in [DeviceSpec::Cpu, DeviceSpec::Cuda(0)] {
        let kind = match spec {
            DeviceSpec::Cpu => "cpu",
            _ => "cuda",
        };
        match backend_for(spec, chosen) {
            Ok(b) => out += &format!("--device {kind}: {b} ({})\n", backend_name(spec, chosen)),
            Err(e) => out += &format!("--device {kind}: {e}\n"),
        }
    }
    match libtorch() {
        Some((version, lib)) => {
            out += &format!("libtorch: {version} ({})", lib.display());
            #[cfg(feature = "tch")]
            if tch::Cuda::is_available() {
                out += &format!(", {} CUDA device(s)", tch::Cuda::device_count());
            }
            out += "\n";
        }
        None if BackendKind::Tch.built() => out += "libtorch: not loaded yet\n",
        None => out +=
            "libtorch: not built in (eval \"$(scripts/setup-libtorch.sh)\" && cargo build --release --features tch)\n",
    }
    out
}

/// Work generic over the backend; [`run_on`] picks the backend from a [`DeviceSpec`].
/// (Rust closures cannot be generic over a type, hence a trait.) One device per process: several
/// devices are several processes ([`crate::distributed`]).
pub trait BackendTask {
    type Output;
    fn run<B: Backend>(self, device: B::Device) -> Result<Self::Output>;
}

/// Run on `spec` with its default backend (the fastest this binary has).
pub fn run_on<T: BackendTask>(spec: DeviceSpec, task: T) -> Result<T::Output> {
    run_on_backend(spec, None, task)
}

/// Run on `spec`, on backend `chosen` or the default.
pub fn run_on_backend<T: BackendTask>(spec: DeviceSpec, chosen: Option<BackendKind>, task: T) -> Result<T::Output> {
    let backend = match spec {
        DeviceSpec::Wgpu => BackendKind::Cubecl,
        _ => backend_for(spec, chosen)?,
    };
    run_with(spec, backend, task)
}

/// Run on `spec` with the given backend (tests run every built backend this way).
pub fn run_with<T: BackendTask>(spec: DeviceSpec, backend: BackendKind, task: T) -> Result<T::Output> {
    match (spec, backend) {
        (DeviceSpec::Wgpu, _) => run_wgpu(task),
        (DeviceSpec::Cpu, BackendKind::Flex) => task.run::<Cpu>(Default::default()),
        (_, BackendKind::Tch) => run_tch(spec, task),
        (DeviceSpec::Cuda(n), BackendKind::Cubecl) => run_cuda(n, task),
        (s, b) => bail!("backend {b} does not run on {s}"),
    }
}

#[cfg(feature = "tch")]
fn run_tch<T: BackendTask>(spec: DeviceSpec, task: T) -> Result<T::Output> {
    use burn::backend::libtorch::LibTorchDevice;
    use_torch_backward_kernels();
    let device = match spec {
        DeviceSpec::Cuda(n) => {
            let count = tch::Cuda::device_count().max(0) as usize;
            if n >= count {
                bail!(
                    "cuda:{n}: libtorch sees {count} CUDA device(s) (is this libtorch a CUDA build, is the driver there?)"
                );
            }
            LibTorchDevice::Cuda(n)
        }
        _ => LibTorchDevice::Cpu,
    };
    task.run::<Torch>(device)
}

#[cfg(not(feature = "tch"))]
fn run_tch<T: BackendTask>(_spec: DeviceSpec, _task: T) -> Result<T::Output> {
    bail!("backend tch: this mvlt was built without it; rebuild with `--features tch`")
}

#[cfg(feature = "wgpu")]
fn run_wgpu<T: BackendTask>(task: T) -> Result<T::Output> {
    let device = burn::backend::wgpu::WgpuDevice::default();
    if let Err(msg) = probe::<Wgpu>(&device) {
        bail!("wgpu: no usable adapter on this machine ({msg}); on Debian, `apt-get install mesa-vulkan-drivers` gives a software one");
    }
    task.run::<Wgpu>(device)
}

#[cfg(not(feature = "wgpu"))]
fn run_wgpu<T: BackendTask>(_task: T) -> Result<T::Output> {
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
fn run_cuda<T: BackendTask>(n: usize, task: T) -> Result<T::Output> {
    let device = burn::backend::cuda::CudaDevice::new(n);
    if let Err(msg) = probe::<Gpu>(&device) {
        bail!("cuda:{n}: no usable NVIDIA GPU / CUDA driver with this index on this machine ({msg})");
    }
    task.run::<Gpu>(device)
}

#[cfg(not(feature = "cuda"))]
fn run_cuda<T: BackendTask>(n: usize, _task: T) -> Result<T::Output> {
    bail!("cuda:{}: this mvlt was built without GPU support; rebuild with `cargo build --release --features cuda`", n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// flex's exp and erf are the vendored patch's vectorised ones (vendor/burn-flex.patch): checked
    /// here against f64 over large tensors (the parallel paths) and at the edges, so the main suite
    /// covers them.
    /// erf by its series of positive terms, 2/sqrt(pi) e^(-x^2) sum 2^n x^(2n+1) / (2n+1)!!
    /// (stable in f64 for |x| <= 5; std has no erf).
    fn erf_f64(x: f64) -> f64 {
        let (mut term, mut sum, mut k) = (x.abs(), 0.0f64, 1.0f64);
        while term > 1e-18 * sum.max(1e-300) {
            sum += term;
            k += 2.0;
            term *= 2.0 * x * x / k;
        }
        (2.0 / std::f64::consts::PI.sqrt() * (-x * x).exp() * sum).copysign(x)
    }

    #[test]
    fn flex_exp_and_erf_agree_with_f64() {
        use burn::tensor::{Tensor, TensorData};
        let n = 200_000;
        let xs: Vec<f32> = (0..n).map(|i| -90.0 + 180.0 * i as f32 / n as f32).collect();
        let device = Default::default();
        let t = Tensor::<Cpu, 1>::from_data(TensorData::new(xs.clone(), [n]), &device);
        let exp = t.clone().exp().into_data().to_vec::<f32>().unwrap();
        let erf = (t / 20.0).erf().into_data().to_vec::<f32>().unwrap();
        for ((x, e), r) in xs.iter().zip(&exp).zip(&erf) {
            let want = (*x as f64).exp();
            let ok = if want > f32::MAX as f64 {
                e.is_infinite()
            } else if want < 1.2e-38 {
                *e == 0.0 || (*e as f64 - want).abs() < 1.2e-38
            } else {
                ((*e as f64 - want) / want).abs() < 5e-7
            };
            assert!(ok, "exp({x}) = {e}, want {want}");
            let want = erf_f64(*x as f64 / 20.0);
            assert!((*r as f64 - want).abs() < 1e-6, "erf({}) = {r}, want {want}", x / 20.0);
        }
        let edges = Tensor::<Cpu, 1>::from_data(
            TensorData::new(vec![f32::INFINITY, f32::NEG_INFINITY, f32::NAN], [3]),
            &device,
        );
        let e = edges.exp().into_data().to_vec::<f32>().unwrap();
        assert!(e[0] == f32::INFINITY && e[1] == 0.0 && e[2].is_nan(), "{e:?}");
    }

    #[test]
    fn parses_devices() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert_eq!("wgpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Wgpu);
        assert!("tpu".parse::<DeviceSpec>().unwrap_err().to_string().contains("unknown device 'tpu'"));
    }

    #[test]
    fn the_default_backend_is_the_fastest_built() {
        let cpu = backends_for(DeviceSpec::Cpu);
        assert_eq!(cpu.last(), Some(&BackendKind::Flex));
        assert_eq!(cpu[0], if cfg!(feature = "tch") { BackendKind::Tch } else { BackendKind::Flex });
        assert!(!backends_for(DeviceSpec::Cuda(0)).contains(&BackendKind::Flex));
        assert_eq!("libtorch".parse::<BackendKind>().unwrap(), BackendKind::Tch);
        assert!("onnx".parse::<BackendKind>().is_err());
        // The printed command rebuilds nothing: it names this build's features.
        assert!(cargo_run().starts_with("cargo run --release"));
        assert_eq!(cargo_run().contains("tch"), cfg!(feature = "tch"));
    }
}
