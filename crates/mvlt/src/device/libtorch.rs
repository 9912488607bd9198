//! libtorch as a backend: its own backward kernels under autodiff, and which libtorch the
//! process loaded (version, threads) for reports.

#[cfg(feature = "tch")]
use super::Torch;
#[cfg(feature = "tch")]
use burn::backend::libtorch::TchTensor;

/// libtorch's own backward kernels for the layer norm and softmax that training tracks as single
/// ops (vendored burn-autodiff, `fused_backward`), in place of the closed forms written with burn
/// ops there: `_softmax_backward_data` is one pass where the closed form makes four, and libtorch's
/// layer-norm backward (`native_layer_norm_backward`, bound by the vendored burn-tch because tch
/// 0.22 does not expose it) about four where the closed form makes twelve. On pvlt_tiny's shapes,
/// timed in PyTorch: 135 ms of closed forms against 44 ms per training step (2 cores) when the
/// kernel was reached through libtorch's autograd (a recomputed forward, `y * grad` and its
/// backward around it); called directly, 2-3x less again (stage 1, `[8, 4224, 64]`: 2.5 ms
/// against 7.1 ms).
#[cfg(feature = "tch")]
struct TorchBackward;

#[cfg(feature = "tch")]
impl burn::backend::autodiff::fused_backward::FusedBackward<Torch> for TorchBackward {
    fn layer_norm(&self, grad: TchTensor, x: TchTensor, gamma: TchTensor, epsilon: f64) -> [TchTensor; 3] {
        // The kernel itself, through the vendored burn-tch's binding of it (libtorch's autograd
        // there should libtorch refuse).
        burn::backend::libtorch::native::layer_norm_backward(&grad.tensor, &x.tensor, &gamma.tensor, epsilon)
            .map(TchTensor::new)
    }

    fn softmax(&self, grad: TchTensor, output: TchTensor, dim: usize) -> TchTensor {
        let kind = output.tensor.kind();
        TchTensor::new(tch::Tensor::internal_softmax_backward_data(&grad.tensor, &output.tensor, dim as i64, kind))
    }
}

/// Registers [`TorchBackward`] with autodiff (once per process); every libtorch run calls it.
#[cfg(feature = "tch")]
pub fn use_torch_backward_kernels() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        burn::backend::autodiff::fused_backward::register_fused_backward::<Torch>(std::sync::Arc::new(TorchBackward))
    });
}

/// The version of the libtorch the binary runs with (the library found through
/// `LD_LIBRARY_PATH`, read from its folder's `version.py` as pip installs it), and where it is.
pub fn libtorch() -> Option<(String, std::path::PathBuf)> {
    #[cfg(feature = "tch")]
    {
        // tch has no run-time version call; the loaded library's own files say it.
        let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
        let lib = maps.lines().filter_map(|l| l.split_whitespace().nth(5)).find(|p| p.ends_with("libtorch_cpu.so"))?;
        let lib = std::path::PathBuf::from(lib);
        let version = lib
            .parent()
            .and_then(|d| d.parent())
            .and_then(|d| std::fs::read_to_string(d.join("version.py")).ok())
            .and_then(|v| {
                v.lines()
                    .find_map(|l| l.strip_prefix("__version__ = ").map(|s| s.trim_matches(['\'', '"']).to_string()))
            })
            .unwrap_or_else(|| "(version unknown)".into());
        Some((version, lib))
    }
    #[cfg(not(feature = "tch"))]
    {
        None
    }
}

/// [`libtorch`]'s version, for reports.
pub fn libtorch_version() -> String {
    libtorch().map(|l| l.0).unwrap_or_else(|| "(not loaded)".into())
}

/// Threads libtorch's CPU kernels use.
pub fn torch_threads() -> usize {
    #[cfg(feature = "tch")]
    {
        tch::get_num_threads().max(1) as usize
    }
    #[cfg(not(feature = "tch"))]
    {
        0
    }
}
