//! mvlt patch (vendor/README.md): ATen backward kernels that tch 0.22 does not bind, compiled from
//! `aten_backward.cpp` by the build script against the same libtorch headers as tch.
//!
//! Why: burn's default conv2d backward runs a transposed conv for the input gradient and a conv
//! over swapped axes for the weight gradient, where libtorch's `convolution_backward` uses
//! oneDNN's backward kernels (pvlt_tiny's reconstruction-head 3x3 convs at batch 8, 2 cores: about
//! 230-260 ms against 160-200 ms per step, timed in PyTorch); and reaching libtorch's layer-norm
//! backward through its autograd (the only way tch offers) recomputes the forward and adds two
//! passes (2-3x the kernel alone). Should libtorch refuse a call, the gradients come from its
//! autograd over the recomputed op ([`autograd_backward`]): here for the layer norm, in burn-tch's
//! conv ops for the convs (`conv2d_backward` returns libtorch's message as `Err`).

pub mod c10d;

use std::ffi::{CStr, c_char, c_int};
use tch::Tensor;
use torch_sys::C_tensor;

unsafe extern "C" {
    fn burn_tch_native_last_error() -> *const c_char;
    fn burn_tch_conv2d_backward(
        grad_output: *const C_tensor,
        input: *const C_tensor,
        weight: *const C_tensor,
        stride: *const i64,
        padding: *const i64,
        dilation: *const i64,
        groups: i64,
        want_input: c_int,
        want_weight: c_int,
        grad_input: *mut *mut C_tensor,
        grad_weight: *mut *mut C_tensor,
    ) -> c_int;
    fn burn_tch_layer_norm_backward(
        grad_output: *const C_tensor,
        input: *const C_tensor,
        weight: *const C_tensor,
        eps: f64,
        grad_input: *mut *mut C_tensor,
        grad_weight: *mut *mut C_tensor,
        grad_bias: *mut *mut C_tensor,
    ) -> c_int;
}

/// Takes ownership of a tensor the shim allocated (`None` for a null pointer).
fn owned(ptr: *mut C_tensor) -> Option<Tensor> {
    // SAFETY: a non-null pointer is a fresh `new at::Tensor` from the shim, owned by nobody else;
    // tch frees it with `at_free` (`delete`) when the `Tensor` drops.
    (!ptr.is_null()).then(|| unsafe { Tensor::from_ptr(ptr) })
}

fn last_error() -> String {
    // SAFETY: the shim returns a pointer to its NUL-terminated thread-local buffer (or a literal).
    unsafe { CStr::from_ptr(burn_tch_native_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// The input and/or weight gradients of `conv2d(x, weight)` (`want`: which), libtorch's
/// `convolution_backward`.
pub fn conv2d_backward(
    grad: &Tensor,
    x: &Tensor,
    weight: &Tensor,
    stride: [i64; 2],
    padding: [i64; 2],
    dilation: [i64; 2],
    groups: i64,
    want: (bool, bool),
) -> Result<(Option<Tensor>, Option<Tensor>), String> {
    let (mut gx, mut gw) = (std::ptr::null_mut(), std::ptr::null_mut());
    // SAFETY: tensor pointers are live tch tensors borrowed for the call; the arrays hold two
    // values each, as the shim reads; the out-pointers are written before any return.
    let rc = unsafe {
        burn_tch_conv2d_backward(
            grad.as_ptr(),
            x.as_ptr(),
            weight.as_ptr(),
            stride.as_ptr(),
            padding.as_ptr(),
            dilation.as_ptr(),
            groups,
            want.0 as c_int,
            want.1 as c_int,
            &mut gx,
            &mut gw,
        )
    };
    let (gx, gw) = (owned(gx), owned(gw));
    if rc != 0 {
        return Err(last_error());
    }
    Ok((gx, gw))
}

/// The input, weight and bias gradients of a layer norm over the last axis of `x` (libtorch's
/// `native_layer_norm_backward`, statistics recomputed by its forward kernel). Should libtorch
/// refuse, the same kernel through its autograd.
pub fn layer_norm_backward(grad: &Tensor, x: &Tensor, gamma: &Tensor, eps: f64) -> [Tensor; 3] {
    let (mut gx, mut gg, mut gb) = (
        std::ptr::null_mut(),
        std::ptr::null_mut(),
        std::ptr::null_mut(),
    );
    // SAFETY: as in `conv2d_backward`.
    let rc = unsafe {
        burn_tch_layer_norm_backward(
            grad.as_ptr(),
            x.as_ptr(),
            gamma.as_ptr(),
            eps,
            &mut gx,
            &mut gg,
            &mut gb,
        )
    };
    if let (0, Some(gx), Some(gg), Some(gb)) = (rc, owned(gx), owned(gg), owned(gb)) {
        return [gx, gg, gb];
    }
    let d = x.size().last().copied().unwrap_or(1);
    let x = x.detach().set_requires_grad(true);
    let gamma = gamma.detach().set_requires_grad(true);
    let beta = gamma.zeros_like().set_requires_grad(true);
    let y = x.layer_norm([d], Some(&gamma), Some(&beta), eps, false);
    let mut g = autograd_backward(y, grad, &[&x, &gamma, &beta]).into_iter();
    let mut next = || g.next().expect("three inputs, three gradients");
    [next(), next(), next()]
}

/// The gradients of `leaves` (detached copies marked `requires_grad`, so the caller's tensors are
/// not touched) for `output` under the output gradient `grad`, through libtorch's autograd: the
/// fallback of the kernels above. Autograd without output gradients needs a scalar, and
/// `sum(output * grad)` has gradient `grad`.
pub(crate) fn autograd_backward(output: Tensor, grad: &Tensor, leaves: &[&Tensor]) -> Vec<Tensor> {
    let s = (output * grad).sum(grad.kind());
    Tensor::run_backward(&[s], leaves, false, false)
}
