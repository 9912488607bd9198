//! mvlt patch: backward kernels an inner backend may supply for the tracked layer norm and
//! softmax (`ops/module.rs`, `ops/activation.rs`). burn 0.21's backend API has forward kernels for
//! both but no backward ones, so the closed forms there run as 4 (softmax) and about 12 (layer norm)
//! element-wise passes; a backend whose library has single fused backward kernels (libtorch's
//! `_softmax_backward_data`, `native_layer_norm_backward`) registers them here once, keyed by its
//! type, and the tracked ops use them instead.

use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;
use burn_backend::Backend;
use burn_backend::tensor::FloatTensor;
use core::any::{Any, TypeId};
use std::sync::RwLock;

/// Backward kernels of backend `B` for the tracked fused ops.
pub trait FusedBackward<B: Backend>: Send + Sync + 'static {
    /// Gradients `[dx, dgamma, dbeta]` of `layer_norm(x) * gamma + beta` over the last dimension
    /// (biased variance, `epsilon` inside the square root), given the output's gradient `grad`.
    fn layer_norm(
        &self,
        grad: FloatTensor<B>,
        x: FloatTensor<B>,
        gamma: FloatTensor<B>,
        epsilon: f64,
    ) -> [FloatTensor<B>; 3];

    /// Gradient of the input of `softmax(x, dim)`, given its `output` and the output's `grad`.
    fn softmax(&self, grad: FloatTensor<B>, output: FloatTensor<B>, dim: usize) -> FloatTensor<B>;
}

type Registered = (TypeId, Box<dyn Any + Send + Sync>);

static REGISTRY: RwLock<Vec<Registered>> = RwLock::new(Vec::new());

/// Use `kernels` for every later backward pass of the tracked layer norm and softmax on `B`
/// (replacing what was registered for `B` before).
pub fn register_fused_backward<B: Backend>(kernels: Arc<dyn FusedBackward<B>>) {
    let mut registry = REGISTRY.write().unwrap_or_else(|e| e.into_inner());
    registry.retain(|(id, _)| *id != TypeId::of::<B>());
    registry.push((TypeId::of::<B>(), Box::new(kernels)));
}

/// Whether kernels are registered for `B`.
pub fn has_fused_backward<B: Backend>() -> bool {
    fused_backward::<B>().is_some()
}

/// The kernels registered for `B`, if any.
pub(crate) fn fused_backward<B: Backend>() -> Option<Arc<dyn FusedBackward<B>>> {
    let registry = REGISTRY.read().unwrap_or_else(|e| e.into_inner());
    registry
        .iter()
        .find(|(id, _)| *id == TypeId::of::<B>())
        .and_then(|(_, k)| k.downcast_ref::<Arc<dyn FusedBackward<B>>>().cloned())
}
