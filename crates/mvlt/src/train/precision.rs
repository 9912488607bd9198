//! Mixed precision: forward and backward passes in bf16 with f32 master weights.
//!
//! The model the optimiser updates stays f32. Each step runs a bf16 view of it made by
//! [`autocast`]: every trainable parameter goes through a *tracked* cast, so the backward pass
//! returns f32 gradients for the f32 parameters (the cast's backward casts back) and AdamW's state
//! and update stay f32, as PyTorch's AMP keeps them. The layers themselves compute LayerNorm,
//! BatchNorm (statistics and running buffers) and the attention softmax in f32, and the losses
//! are f32 (`loss.rs`); those casts are no-ops for an f32 model, so f32 training is unchanged.
//!
//! Why bf16 and not f16: bf16 has f32's exponent range, so no loss scaling is needed, and burn's
//! CUDA backend runs its matmuls on tensor cores. The reference trains with fp16 autocast plus a
//! GradScaler; bf16 gives the same speed class without the scaler's skipped steps.

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{FloatDType, Tensor};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

impl Precision {
    pub fn dtype(self) -> FloatDType {
        match self {
            Precision::F32 => FloatDType::F32,
            Precision::Bf16 => FloatDType::BF16,
        }
    }
}

/// Casts trainable parameters, leaving buffers (BatchNorm running statistics, which burn shares
/// between a module and its copies) untouched in f32.
struct CastParams(FloatDType);

impl<B: Backend> ModuleMapper<B> for CastParams {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        if !param.is_require_grad() {
            return param;
        }
        let dtype = self.0;
        param.map(|t| t.cast(dtype))
    }
}

/// The model to run a step with: `model` itself in f32, else a view whose parameters are tracked
/// casts of `model`'s (gradients flow back to `model`'s f32 parameters).
pub fn autocast<B: Backend, M: Module<B>>(model: &M, precision: Precision) -> M {
    match precision {
        Precision::F32 => model.clone(),
        p => model.clone().map(&mut CastParams(p.dtype())),
    }
}
