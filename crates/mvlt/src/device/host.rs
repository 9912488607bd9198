//! Host-memory kernels: one pass over a tensor's f32 values where burn's tensor ops would make
//! several (the fused AdamW of `train::optim`).

use super::Cpu;
#[cfg(feature = "tch")]
use super::Torch;
#[cfg(feature = "tch")]
use burn::backend::libtorch::TchTensor;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};

/// Runs `f` over the f32 values of `tensors` in host memory and gives the tensors back with what
/// `f` wrote, or `Err` with them untouched where the backend keeps them elsewhere (GPU memory) or
/// not as f32, for the caller to fall back on tensor ops. The slices never alias: a tensor whose
/// storage another tensor shares is copied first, so no other tensor sees the writes.
///
/// For kernels that must touch each element once, which burn's tensor ops cannot express (the
/// fused AdamW of `train::optim`): flex's tensors leave and re-enter `TensorData` without a copy
/// when nothing else holds them; libtorch's CPU tensors are written through their data pointer
/// when burn-tch's own in-place rule (`can_mut`) allows.
pub fn with_host_f32<B: Backend, const N: usize>(
    tensors: [Tensor<B, 1>; N],
    f: impl FnOnce(&mut [&mut [f32]]),
) -> std::result::Result<[Tensor<B, 1>; N], [Tensor<B, 1>; N]> {
    if tensors.iter().any(|t| t.dtype() != DType::F32) {
        return Err(tensors);
    }
    if std::any::TypeId::of::<B>() == std::any::TypeId::of::<Cpu>() {
        let device = tensors[0].device();
        let mut data = tensors.map(|t| t.into_data());
        let mut slices = data.iter_mut().filter_map(|d| d.as_mut_slice::<f32>().ok()).collect::<Vec<_>>();
        let all = slices.len() == N;
        if all {
            f(&mut slices);
        }
        drop(slices);
        let out = data.map(|d| Tensor::from_data(d, &device));
        return if all { Ok(out) } else { Err(out) };
    }
    #[cfg(feature = "tch")]
    if std::any::TypeId::of::<B>() == std::any::TypeId::of::<Torch>() {
        use std::any::Any;
        // The type test above makes both downcasts succeed; `Err` keeps the types honest.
        let boxed: Box<dyn Any> = Box::new(tensors);
        let Ok(torch) = boxed.downcast::<[Tensor<Torch, 1>; N]>() else { unreachable!("B is Torch") };
        let back = |r: [Tensor<Torch, 1>; N]| -> [Tensor<B, 1>; N] {
            let boxed: Box<dyn Any> = Box::new(r);
            *boxed.downcast::<[Tensor<B, 1>; N]>().unwrap_or_else(|_| unreachable!("B is Torch"))
        };
        return torch_host_f32(*torch, f).map(back).map_err(back);
    }
    Err(tensors)
}

#[cfg(feature = "tch")]
fn torch_host_f32<const N: usize>(
    tensors: [Tensor<Torch, 1>; N],
    f: impl FnOnce(&mut [&mut [f32]]),
) -> std::result::Result<[Tensor<Torch, 1>; N], [Tensor<Torch, 1>; N]> {
    use burn::backend::libtorch::LibTorchDevice;
    use burn::tensor::TensorPrimitive;
    if tensors.iter().any(|t| t.device() != LibTorchDevice::Cpu) {
        return Err(tensors);
    }
    let mut prims = tensors.map(|t| {
        let p = t.into_primitive().tensor();
        if p.can_mut() && p.tensor.is_contiguous() {
            p
        } else {
            let mut fresh = tch::Tensor::empty(p.tensor.size(), (tch::Kind::Float, tch::Device::Cpu));
            fresh.copy_(&p.tensor);
            TchTensor::new(fresh)
        }
    });
    let mut slices: Vec<&mut [f32]> = prims
        .iter_mut()
        .map(|p| match p.tensor.numel() {
            0 => &mut [][..],
            // SAFETY: a contiguous f32 CPU tensor of `n` elements whose storage no other tensor
            // holds (can_mut, or a fresh copy), borrowed mutably for as long as the slice lives.
            n => unsafe { std::slice::from_raw_parts_mut(p.tensor.data_ptr() as *mut f32, n) },
        })
        .collect();
    f(&mut slices);
    Ok(prims.map(|p| Tensor::from_primitive(TensorPrimitive::Float(p))))
}
