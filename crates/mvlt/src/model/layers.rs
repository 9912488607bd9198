//! The few building blocks PVLT needs, with PyTorch's parameter layouts and names.
//!
//! Why not burn-nn's layers: burn's `Linear` stores its weight transposed, its `LayerNorm` calls the
//! affine parameters gamma/beta, and its `BatchNorm` updates running variance with the biased estimate
//! (PyTorch uses the unbiased one). Mirroring PyTorch here means every module path in the burn tree is
//! exactly the reference's state-dict key (see `weights.rs`), with no adapters or transposes.
//!
//! `nn.Sequential` children are named by index in PyTorch (`text_embed1.0.weight`); Rust fields cannot
//! be named `0`, so those structs use fields `_0`, `_1`, and `weights.rs` maps `_N` <-> `N`.

use burn::module::{Module, Param, RunningState};
use burn::tensor::backend::Backend;
use burn::tensor::module::{conv2d, embedding, linear};
use burn::tensor::ops::ConvOptions;
use burn::tensor::{DType, Distribution, FloatDType, Int, Tensor, TensorPrimitive};

/// Linear layer, weight `[out, in]` as in PyTorch. Init: normal(`std`) weight, zero bias. The
/// reference's `_init_weights` uses trunc-normal(0.02); its bounds are +-2 absolute, i.e. 100
/// standard deviations at 0.02, so a plain normal is the same distribution.
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    pub weight: Param<Tensor<B, 2>>,
    pub bias: Option<Param<Tensor<B, 1>>>,
}

impl<B: Backend> Linear<B> {
    pub fn new(d_in: usize, d_out: usize, bias: bool, std: f64, device: &B::Device) -> Self {
        let weight = Tensor::random([d_out, d_in], Distribution::Normal(0.0, std), device);
        Linear {
            weight: Param::from_tensor(weight),
            bias: bias.then(|| Param::from_tensor(Tensor::zeros([d_out], device))),
        }
    }

    /// `[..., in] -> [..., out]`
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        linear(x, self.weight.val().transpose(), self.bias.as_ref().map(|b| b.val()))
    }

    /// The two halves of the output channels as separate products (`[..., out/2]` each): the
    /// numbers of `forward` split along the last axis, without slicing a strided view of it.
    pub fn forward_halves<const D: usize>(&self, x: Tensor<B, D>) -> (Tensor<B, D>, Tensor<B, D>) {
        let [out, d_in] = self.weight.dims();
        let half = out / 2;
        let w = self.weight.val();
        let part = |r: std::ops::Range<usize>| {
            linear(
                x.clone(),
                w.clone().slice([r.clone(), 0..d_in]).transpose(),
                self.bias.as_ref().map(|b| b.val().slice([r])),
            )
        };
        (part(0..half), part(half..out))
    }
}

/// LayerNorm over the last axis (biased variance, as PyTorch).
#[derive(Module, Debug)]
pub struct LayerNorm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    pub bias: Param<Tensor<B, 1>>,
    pub eps: f64,
}

impl<B: Backend> LayerNorm<B> {
    pub fn new(dim: usize, eps: f64, device: &B::Device) -> Self {
        LayerNorm {
            weight: Param::from_tensor(Tensor::ones([dim], device)),
            bias: Param::from_tensor(Tensor::zeros([dim], device)),
            eps,
        }
    }

    /// Computed in f32 whatever the input's precision (as PyTorch's autocast does): bf16 statistics
    /// over hundreds of channels lose too much. The casts are no-ops on an f32 model.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dtype = x.dtype();
        if dtype == DType::F32 {
            // One kernel (libtorch's `layer_norm`, flex's) instead of seven elementwise passes;
            // under autodiff one tracked op with a closed-form backward (vendor/burn-autodiff).
            let out = B::layer_norm(
                x.into_primitive().tensor(),
                self.weight.val().into_primitive().tensor(),
                Some(self.bias.val().into_primitive().tensor()),
                self.eps,
            );
            return Tensor::from_primitive(TensorPrimitive::Float(out));
        }
        self.forward_written_out(x)
    }

    /// The same function in elementwise ops, statistics in f32 (what bf16 runs).
    pub fn forward_written_out<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dtype = x.dtype();
        let x = x.cast(FloatDType::F32);
        let (var, mean) = x.clone().var_mean_bias(D - 1);
        let x = x.sub(mean).div(var.add_scalar(self.eps).sqrt());
        let (weight, bias) = (self.weight.val().cast(FloatDType::F32), self.bias.val().cast(FloatDType::F32));
        x.mul(weight.unsqueeze()).add(bias.unsqueeze()).cast(dtype)
    }
}

/// Whether an f32 forward pass without autodiff (inference, evaluation) may use the backend's fused
/// scaled-dot-product `attention`. It computes the same function in fewer passes over memory;
/// under autodiff burn 0.21 decomposes it into the ops written out in `Attention` anyway, and
/// bf16 keeps its explicit f32 softmax.
pub fn fused_inference<B: Backend, const D: usize>(x: &Tensor<B, D>) -> bool {
    x.dtype() == DType::F32 && !B::ad_enabled(&x.device())
}

/// Conv2d, weight `[out, in, k, k]`, square kernel, stride and padding.
/// Init: PyTorch's default (kaiming-uniform with a = sqrt(5): U(+-1/sqrt(fan_in)) for weight and bias).
#[derive(Module, Debug)]
pub struct Conv2d<B: Backend> {
    pub weight: Param<Tensor<B, 4>>,
    pub bias: Option<Param<Tensor<B, 1>>>,
    pub stride: usize,
    pub padding: usize,
}

impl<B: Backend> Conv2d<B> {
    pub fn new(
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        bias: bool,
        device: &B::Device,
    ) -> Self {
        let bound = 1.0 / ((c_in * kernel * kernel) as f64).sqrt();
        let u = Distribution::Uniform(-bound, bound);
        Conv2d {
            weight: Param::from_tensor(Tensor::random([c_out, c_in, kernel, kernel], u, device)),
            bias: bias.then(|| Param::from_tensor(Tensor::random([c_out], u, device))),
            stride,
            padding,
        }
    }

    /// `[B, C_in, H, W] -> [B, C_out, H', W']`
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let options = ConvOptions::new([self.stride; 2], [self.padding; 2], [1, 1], 1);
        conv2d(x, self.weight.val(), self.bias.as_ref().map(|b| b.val()), options)
    }

    /// The kernel side when this conv cuts an `h x w` grid into whole non-overlapping patches
    /// (kernel = stride, no padding, both sides multiples of it): PVT's patch embeddings and
    /// spatial reductions. Such a conv is one matrix product of the patches with the weight.
    fn patch_side(&self, h: usize, w: usize) -> Option<usize> {
        let k = self.weight.dims()[2];
        (k == self.stride && self.padding == 0 && h.is_multiple_of(k) && w.is_multiple_of(k)).then_some(k)
    }

    /// [`Conv2d::forward`] of a token grid, tokens in and out: `[B, h*w, C_in]` (row-major grid)
    /// -> `([B, h'*w', C_out], h', w')`, the same numbers as `forward` between the two layout
    /// changes (up to the order of the sums).
    ///
    /// Why: a patch-cutting conv is a matrix product, and conv kernels run these shapes well below
    /// GEMM speed, the backward pass most of all (burn's default backward: a dilated conv for the
    /// weight, a transposed one for the input). pvlt_tiny's seven patch convs at batch 8, timed in
    /// PyTorch on 2 cores that way: 58 ms forward and 191 ms backward of a 2.9 s training step. As
    /// tokens, the transposes to and from NCHW around them go too. Any other conv runs `forward`.
    pub fn forward_tokens(&self, x: Tensor<B, 3>, h: usize, w: usize) -> (Tensor<B, 3>, usize, usize) {
        let [b, _, c] = x.dims();
        let Some(k) = self.patch_side(h, w) else {
            // Not patch-cutting: the conv over the grid's NCHW view.
            return self.forward_image_tokens(x.swap_dims(1, 2).reshape([b, c, h, w]));
        };
        let (ho, wo) = (h / k, w / k);
        // Each patch as one row, (kh, kw, C_in) fastest last; the weight's columns in that order.
        let patches: Tensor<B, 6> = x.reshape([b, ho, k, wo, k, c]).permute([0, 1, 3, 2, 4, 5]);
        let c_out = self.weight.dims()[0];
        let weight = self.weight.val().permute([0, 2, 3, 1]).reshape([c_out, k * k * c]);
        (self.patch_product(patches.reshape([b * ho * wo, k * k * c]), weight, b, ho * wo), ho, wo)
    }

    /// [`Conv2d::forward_tokens`] of an image `[B, C_in, H, W]` -> `([B, H'*W', C_out], H', W')`.
    pub fn forward_image_tokens(&self, x: Tensor<B, 4>) -> (Tensor<B, 3>, usize, usize) {
        let [b, c, h, w] = x.dims();
        let Some(k) = self.patch_side(h, w) else {
            let y = self.forward(x);
            let [_, c_out, ho, wo] = y.dims();
            return (y.reshape([b, c_out, ho * wo]).swap_dims(1, 2), ho, wo);
        };
        let (ho, wo) = (h / k, w / k);
        // Patches as rows, (C_in, kh, kw) fastest last: the weight's own layout.
        let patches: Tensor<B, 6> = x.reshape([b, c, ho, k, wo, k]).permute([0, 2, 4, 1, 3, 5]);
        let c_out = self.weight.dims()[0];
        let weight = self.weight.val().reshape([c_out, c * k * k]);
        (self.patch_product(patches.reshape([b * ho * wo, c * k * k]), weight, b, ho * wo), ho, wo)
    }

    /// `[B*L, K]` patch rows times the `[C_out, K]` weight (+ bias) -> `[B, L, C_out]`.
    fn patch_product(&self, rows: Tensor<B, 2>, weight: Tensor<B, 2>, b: usize, l: usize) -> Tensor<B, 3> {
        let c_out = weight.dims()[0];
        linear(rows, weight.transpose(), self.bias.as_ref().map(|b| b.val())).reshape([b, l, c_out])
    }
}

/// BatchNorm2d with PyTorch semantics: batch statistics (biased variance) in training, running
/// statistics in eval; running update `r = (1 - m) r + m stat` with the UNBIASED batch variance.
#[derive(Module, Debug)]
pub struct BatchNorm2d<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    pub bias: Param<Tensor<B, 1>>,
    pub running_mean: RunningState<Tensor<B, 1>>,
    pub running_var: RunningState<Tensor<B, 1>>,
    /// PyTorch's int64 scalar buffer, kept as a float `[1]` (burn has no integer running state; exact
    /// up to 2^24 batches) so a checkpoint round-trips. Unused in compute: momentum is fixed.
    pub num_batches_tracked: RunningState<Tensor<B, 1>>,
    pub eps: f64,
    pub momentum: f64,
}

impl<B: Backend> BatchNorm2d<B> {
    pub fn new(channels: usize, device: &B::Device) -> Self {
        BatchNorm2d {
            weight: Param::from_tensor(Tensor::ones([channels], device)),
            bias: Param::from_tensor(Tensor::zeros([channels], device)),
            running_mean: RunningState::new(Tensor::zeros([channels], device)),
            running_var: RunningState::new(Tensor::ones([channels], device)),
            num_batches_tracked: RunningState::new(Tensor::zeros([1], device)),
            eps: 1e-5,
            momentum: 0.1,
        }
    }

    /// `[B, C, H, W] -> [B, C, H, W]`. Statistics, running buffers and the normalisation are f32
    /// even when the input is bf16 (see `LayerNorm::forward`).
    pub fn forward(&self, x: Tensor<B, 4>, train: bool) -> Tensor<B, 4> {
        let (dtype, device) = (x.dtype(), x.device());
        let x = x.cast(FloatDType::F32);
        let [b, c, h, w] = x.dims();
        let (mean, var) = if train {
            let flat = x.clone().swap_dims(0, 1).reshape([c, b * h * w]);
            let (var, mean) = flat.var_mean_bias(1);
            let (mean, var) = (mean.reshape([c]), var.reshape([c]));
            let n = (b * h * w) as f64;
            let unbiased = var.clone().detach().mul_scalar(n / (n - 1.0).max(1.0));
            let m = self.momentum;
            // burn shares running buffers between a model and its replicas on other devices (each
            // thread's update is kept apart and averaged on the next read), hence `to_device`.
            let running = |s: &RunningState<Tensor<B, 1>>| s.value_sync().to_device(&device);
            let rm = running(&self.running_mean).mul_scalar(1.0 - m).add(mean.clone().detach().mul_scalar(m));
            let rv = running(&self.running_var).mul_scalar(1.0 - m).add(unbiased.mul_scalar(m));
            self.running_mean.update(rm);
            self.running_var.update(rv);
            self.num_batches_tracked.update(running(&self.num_batches_tracked).add_scalar(1));
            (mean, var)
        } else {
            (self.running_mean.value().to_device(&device), self.running_var.value().to_device(&device))
        };
        let shape = [1, c, 1, 1];
        let scale = self.weight.val().cast(FloatDType::F32).div(var.add_scalar(self.eps).sqrt()).reshape(shape);
        x.sub(mean.reshape(shape)).mul(scale).add(self.bias.val().cast(FloatDType::F32).reshape(shape)).cast(dtype)
    }
}

/// `nn.Embedding(n, d, padding_idx)`: table `[n, d]`, init N(0, `std`) (PyTorch's default is 1),
/// the padding row zero at init. As in PyTorch, the lookup gives the padding row no gradient; the row
/// can still learn through other uses of the table (the tied MLM decoder, MVLT-SPEC 2.1).
#[derive(Module, Debug)]
pub struct Embedding<B: Backend> {
    pub weight: Param<Tensor<B, 2>>,
    /// Looked-up rows of this id pass no gradient back to the table.
    pub padding_idx: Option<usize>,
}

impl<B: Backend> Embedding<B> {
    pub fn new(n: usize, d: usize, padding_idx: Option<usize>, std: f64, device: &B::Device) -> Self {
        let mut w = Tensor::random([n, d], Distribution::Normal(0.0, std), device);
        if let Some(p) = padding_idx {
            w = w.slice_assign([p..p + 1, 0..d], Tensor::zeros([1, d], device));
        }
        Embedding { weight: Param::from_tensor(w), padding_idx }
    }

    /// `[B, T] ids -> [B, T, d]`
    pub fn forward(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let Some(pad) = self.padding_idx else {
            return embedding(self.weight.val(), ids);
        };
        let [b, t] = ids.dims();
        let [_, d] = self.weight.dims();
        let is_pad = ids.clone().equal_elem(pad as i64).unsqueeze_dim::<3>(2).expand([b, t, d]);
        let rows = embedding(self.weight.val(), ids);
        // The same values, but at padding positions they come from a detached copy, so the
        // lookup's gradient skips the padding row exactly as PyTorch's `padding_idx` does.
        rows.clone().mask_where(is_pad, rows.detach())
    }
}

/// `nn.Sequential(nn.Linear, nn.LayerNorm)`: the per-stage text projection (`text_embed{i}`) and
/// every head's "embed" (`*_head_embed`).
#[derive(Module, Debug)]
pub struct LinearNorm<B: Backend> {
    pub _0: Linear<B>,
    pub _1: LayerNorm<B>,
}

impl<B: Backend> LinearNorm<B> {
    pub fn new(d_in: usize, d_out: usize, eps: f64, std: f64, device: &B::Device) -> Self {
        LinearNorm { _0: Linear::new(d_in, d_out, true, std, device), _1: LayerNorm::new(d_out, eps, device) }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        self._1.forward(self._0.forward(x))
    }
}

/// `ConvBN` of the reconstruction head: `nn.Sequential(Conv2d 3x3 pad 1 no bias, BatchNorm2d)`,
/// no activation.
#[derive(Module, Debug)]
pub struct ConvBn<B: Backend> {
    pub _0: Conv2d<B>,
    pub _1: BatchNorm2d<B>,
}

impl<B: Backend> ConvBn<B> {
    pub fn new(c_in: usize, c_out: usize, device: &B::Device) -> Self {
        ConvBn { _0: Conv2d::new(c_in, c_out, 3, 1, 1, false, device), _1: BatchNorm2d::new(c_out, device) }
    }

    pub fn forward(&self, x: Tensor<B, 4>, train: bool) -> Tensor<B, 4> {
        self._1.forward(self._0.forward(x), train)
    }
}

/// Inverted dropout, a no-op outside training.
pub fn dropout<B: Backend, const D: usize>(x: Tensor<B, D>, p: f64, train: bool) -> Tensor<B, D> {
    if !train || p == 0.0 {
        return x;
    }
    let keep = x.random_like(Distribution::Bernoulli(1.0 - p));
    x.mul(keep).div_scalar(1.0 - p)
}

/// Stochastic depth on a residual branch `[B, N, C]`: drop whole samples, rescale the rest.
pub fn drop_path<B: Backend>(x: Tensor<B, 3>, p: f64, train: bool) -> Tensor<B, 3> {
    if !train || p == 0.0 {
        return x;
    }
    let [b, _, _] = x.dims();
    // The rescale goes on the `[B, 1, 1]` mask (as timm's `drop_path` does): one pass over the
    // activations forward and one backward, instead of two each.
    let keep = Tensor::<B, 3>::random([b, 1, 1], Distribution::Bernoulli(1.0 - p), &x.device()).div_scalar(1.0 - p);
    let keep = keep.cast(x.dtype());
    x.mul(keep)
}

/// Bilinear resize of `[B, C, H, W]` to `[B, C, out_h, out_w]`, as PyTorch's
/// `F.interpolate(mode='bilinear', antialias=False)` with the given `align_corners`.
///
/// Written as two matrix products with fixed interpolation matrices (`A_h · X · A_wᵀ`) rather than
/// burn's `interpolate`: burn 0.21's CUDA backend has no backward for bilinear interpolation (it
/// panics), and the resized tables here (position embeddings, the reconstruction head) need
/// gradients. Matrix products differentiate on every backend.
pub fn bilinear<B: Backend>(x: Tensor<B, 4>, out_h: usize, out_w: usize, align_corners: bool) -> Tensor<B, 4> {
    let [b, c, h, w] = x.dims();
    let device = x.device();
    let dtype = x.dtype();
    let a_h = interpolation_matrix::<B>(h, out_h, align_corners, &device).cast(dtype);
    let a_w = interpolation_matrix::<B>(w, out_w, align_corners, &device).cast(dtype);
    // Along W: [B*C*H, W] x [W, out_w].
    let x = x.reshape([b * c * h, w]).matmul(a_w.transpose());
    // Along H: [B*C, out_w, H] x [H, out_h], then back to [B, C, out_h, out_w].
    let x = x.reshape([b * c, h, out_w]).swap_dims(1, 2).reshape([b * c * out_w, h]).matmul(a_h.transpose());
    x.reshape([b * c, out_w, out_h]).swap_dims(1, 2).reshape([b, c, out_h, out_w])
}

/// `[n_out, n_in]`: row `o` holds the two weights PyTorch's bilinear kernel gives output `o`.
fn interpolation_matrix<B: Backend>(
    n_in: usize,
    n_out: usize,
    align_corners: bool,
    device: &B::Device,
) -> Tensor<B, 2> {
    let mut m = vec![0f32; n_out * n_in];
    for o in 0..n_out {
        // PyTorch's area_pixel_compute_source_index (upsample_bilinear2d, size given, no scale factor).
        let src = if align_corners {
            if n_out > 1 {
                o as f64 * (n_in as f64 - 1.0) / (n_out as f64 - 1.0)
            } else {
                0.0
            }
        } else {
            ((o as f64 + 0.5) * n_in as f64 / n_out as f64 - 0.5).max(0.0)
        };
        let i0 = (src.floor() as usize).min(n_in - 1);
        let i1 = (i0 + 1).min(n_in - 1);
        let l1 = (src - i0 as f64) as f32;
        m[o * n_in + i0] += 1.0 - l1;
        m[o * n_in + i1] += l1;
    }
    Tensor::from_data(burn::tensor::TensorData::new(m, [n_out, n_in]), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Cpu;
    use burn::backend::Autodiff;
    use burn::tensor::activation::{log_softmax, softmax};
    use burn::tensor::module::interpolate;
    use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
    use burn::tensor::ElementConversion;

    /// The gradients of `sum(w * f(x))` through `fused` and `written` (x and each parameter
    /// from `params`), largest absolute difference over all of them.
    fn grad_gap<B: Backend>(
        x: Tensor<B, 3>,
        fused: impl Fn(Tensor<Autodiff<B>, 3>) -> Tensor<Autodiff<B>, 3>,
        written: impl Fn(Tensor<Autodiff<B>, 3>) -> Tensor<Autodiff<B>, 3>,
        params: impl Fn(&burn::backend::autodiff::grads::Gradients) -> Vec<Tensor<B, 1>>,
    ) -> (f32, f32) {
        let w = Tensor::<Autodiff<B>, 3>::random(x.dims(), Distribution::Normal(0.0, 1.0), &x.device());
        let run = |f: &dyn Fn(Tensor<Autodiff<B>, 3>) -> Tensor<Autodiff<B>, 3>| {
            let x = Tensor::<Autodiff<B>, 3>::from_inner(x.clone()).require_grad();
            let y = f(x.clone());
            let grads = (y.clone() * w.clone()).sum().backward();
            let mut all = vec![x.grad(&grads).unwrap().flatten::<1>(0, 2)];
            all.extend(params(&grads));
            (y.inner(), Tensor::cat(all, 0))
        };
        let ((y1, g1), (y2, g2)) = (run(&fused), run(&written));
        let gap = |a: Tensor<B, 1>, b: Tensor<B, 1>| -> f32 { (a - b).abs().max().into_scalar().elem() };
        (gap(y1.flatten(0, 2), y2.flatten(0, 2)), gap(g1, g2))
    }

    /// vendor/burn-autodiff's single-op LayerNorm, softmax and log-softmax: their gradients
    /// (input, weight, bias) against autodiff through the same functions written out.
    fn fused_ops_differentiate_as_written_out<B: Backend>() {
        type AB<B> = Autodiff<B>;
        let device: B::Device = Default::default();
        B::seed(&device, 7);
        let x = Tensor::<B, 3>::random([3, 17, 40], Distribution::Normal(0.5, 2.0), &device);
        let mut ln = LayerNorm::<AB<B>>::new(40, 1e-6, &device);
        ln.weight = Param::from_tensor(Tensor::random([40], Distribution::Normal(1.0, 0.5), &device));
        ln.bias = Param::from_tensor(Tensor::random([40], Distribution::Normal(0.0, 0.5), &device));
        let params = |g: &burn::backend::autodiff::grads::Gradients| {
            vec![ln.weight.val().grad(g).unwrap(), ln.bias.val().grad(g).unwrap()]
        };
        let (out, grad) = grad_gap(x.clone(), |x| ln.forward(x), |x| ln.forward_written_out(x), params);
        assert!(out < 1e-5 && grad < 1e-4, "layer norm: output {out}, gradients {grad}");

        let soft = |x: Tensor<AB<B>, 3>| {
            let e = (x.clone() - x.detach().max_dim(2)).exp();
            e.clone() / e.sum_dim(2)
        };
        let (out, grad) = grad_gap(x.clone(), |x| softmax(x, 2), soft, |_| vec![]);
        assert!(out < 1e-6 && grad < 1e-5, "softmax: output {out}, gradients {grad}");
        let log_soft = |x: Tensor<AB<B>, 3>| {
            let shifted = x.clone() - x.detach().max_dim(2);
            shifted.clone() - shifted.exp().sum_dim(2).log()
        };
        let (out, grad) = grad_gap(x, |x| log_softmax(x, 2), log_soft, |_| vec![]);
        assert!(out < 1e-5 && grad < 1e-5, "log-softmax: output {out}, gradients {grad}");
    }

    #[test]
    fn fused_ops_differentiate_as_written_out_on_flex() {
        fused_ops_differentiate_as_written_out::<Cpu>();
    }

    #[cfg(feature = "tch")]
    #[test]
    fn fused_ops_differentiate_as_written_out_on_libtorch() {
        // With libtorch's backward kernels, as every libtorch run has them.
        crate::device::use_torch_backward_kernels();
        assert!(burn::backend::autodiff::fused_backward::has_fused_backward::<crate::device::Torch>());
        fused_ops_differentiate_as_written_out::<crate::device::Torch>();
    }

    /// `Conv2d::forward_tokens` / `forward_image_tokens` (one product of the patches) against
    /// the conv itself, output and the gradients of input, weight and bias: patch-cutting convs
    /// (PVT's patch embeddings and reductions), and convs that must fall back to `forward`
    /// (overlapping kernel, padding, a grid the kernel does not divide).
    fn patch_convs_match_the_conv<B: Backend>() {
        type AB<B> = Autodiff<B>;
        let device: B::Device = Default::default();
        B::seed(&device, 11);
        // (c_in, c_out, kernel, stride, padding, h, w)
        let cases = [
            (5, 7, 2, 2, 0, 6, 4),
            (3, 8, 4, 4, 0, 8, 12),
            (6, 6, 3, 3, 0, 9, 6),
            (4, 5, 3, 1, 1, 5, 5),
            (4, 3, 2, 2, 0, 5, 4),
        ];
        for (c_in, c_out, k, s, p, h, w) in cases {
            let conv = Conv2d::<AB<B>>::new(c_in, c_out, k, s, p, true, &device);
            let x = Tensor::<B, 4>::random([2, c_in, h, w], Distribution::Normal(0.0, 1.0), &device);
            let tokens = x.clone().reshape([2, c_in, h * w]).swap_dims(1, 2);
            let (ho, wo) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
            let weights = Tensor::<AB<B>, 3>::random([2, ho * wo, c_out], Distribution::Normal(0.0, 1.0), &device);
            let run = |path: usize| {
                let img = Tensor::<AB<B>, 4>::from_inner(x.clone()).require_grad();
                let tok = Tensor::<AB<B>, 3>::from_inner(tokens.clone()).require_grad();
                let y = match path {
                    0 => {
                        let y = conv.forward(img.clone());
                        let [b, c, ho, wo] = y.dims();
                        y.reshape([b, c, ho * wo]).swap_dims(1, 2)
                    }
                    1 => conv.forward_image_tokens(img.clone()).0,
                    _ => conv.forward_tokens(tok.clone(), h, w).0,
                };
                let grads = (y.clone() * weights.clone()).sum().backward();
                let x_grad = match path {
                    2 => tok.grad(&grads).unwrap().swap_dims(1, 2).reshape([2, c_in, h, w]),
                    _ => img.grad(&grads).unwrap(),
                };
                let params = [
                    x_grad.flatten::<1>(0, 3),
                    conv.weight.val().grad(&grads).unwrap().flatten(0, 3),
                    conv.bias.as_ref().unwrap().val().grad(&grads).unwrap(),
                ];
                (y.inner(), Tensor::cat(params.to_vec(), 0))
            };
            let gap = |a: Tensor<B, 1>, b: Tensor<B, 1>| -> f32 { (a - b).abs().max().into_scalar().elem() };
            let (y0, g0) = run(0);
            for path in [1, 2] {
                let (y, g) = run(path);
                let (out, grad) = (gap(y.flatten(0, 2), y0.clone().flatten(0, 2)), gap(g, g0.clone()));
                assert!(
                    out < 1e-5 && grad < 1e-4,
                    "conv {c_in}->{c_out} k{k} s{s} p{p} on {h}x{w}, path {path}: output {out}, gradients {grad}"
                );
            }
        }
    }

    #[test]
    fn patch_convs_match_the_conv_on_flex() {
        patch_convs_match_the_conv::<Cpu>();
    }

    #[cfg(feature = "tch")]
    #[test]
    fn patch_convs_match_the_conv_on_libtorch() {
        patch_convs_match_the_conv::<crate::device::Torch>();
    }

    /// Input, weight and bias gradients of `sum(g * conv(x))` on backend `B` for the same numbers
    /// everywhere, as host vectors.
    #[cfg(feature = "tch")]
    fn conv_gradients<B: Backend>(
        [x, w, b, g]: [&burn::tensor::TensorData; 4],
        stride: usize,
        padding: usize,
    ) -> [Vec<f32>; 3] {
        type AB<B> = Autodiff<B>;
        let device: B::Device = Default::default();
        let conv = Conv2d::<AB<B>> {
            weight: Param::from_tensor(Tensor::from_data(w.clone(), &device)),
            bias: Some(Param::from_tensor(Tensor::from_data(b.clone(), &device))),
            stride,
            padding,
        };
        let x = Tensor::<AB<B>, 4>::from_data(x.clone(), &device).require_grad();
        let grads = (conv.forward(x.clone()) * Tensor::from_data(g.clone(), &device)).sum().backward();
        let host = |t: Tensor<B, 4>| t.into_data().to_vec::<f32>().unwrap();
        [
            host(x.grad(&grads).unwrap()),
            host(conv.weight.val().grad(&grads).unwrap()),
            conv.bias.as_ref().unwrap().val().grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap(),
        ]
    }

    /// vendor/burn-tch's conv2d backward (libtorch's `convolution_backward`, `src/native`)
    /// against burn's default backward on flex: 3x3 convs with padding 1 at strides 1 and 2 (the
    /// reconstruction head's), a 1x1 conv, and an overlapping strided one.
    #[cfg(feature = "tch")]
    #[test]
    fn libtorch_conv_gradients_match_flex() {
        let device = Default::default();
        Cpu::seed(&device, 5);
        let normal = |shape: [usize; 4]| Tensor::<Cpu, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
        // (c_in, c_out, kernel, stride, padding, h, w)
        for (c_in, c_out, k, s, p, h, w) in
            [(4, 6, 3, 1, 1, 7, 5), (3, 5, 3, 2, 1, 9, 8), (6, 3, 1, 1, 0, 4, 4), (2, 4, 4, 2, 1, 8, 6)]
        {
            let (ho, wo) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
            let x = normal([2, c_in, h, w]).into_data();
            let wt = normal([c_out, c_in, k, k]).into_data();
            let b = Tensor::<Cpu, 1>::random([c_out], Distribution::Normal(0.0, 1.0), &device).into_data();
            let g = normal([2, c_out, ho, wo]).into_data();
            let want = conv_gradients::<Cpu>([&x, &wt, &b, &g], s, p);
            let got = conv_gradients::<crate::device::Torch>([&x, &wt, &b, &g], s, p);
            for (name, (a, b)) in ["input", "weight", "bias"].iter().zip(want.iter().zip(&got)) {
                assert_eq!(a.len(), b.len(), "{name} gradient sizes");
                let gap = a.iter().zip(b).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(gap < 1e-4, "conv {k}x{k}/{s} pad {p}: {name} gradients differ by {gap}");
            }
        }
    }

    /// Same numbers as burn's own bilinear `interpolate` (checked against PyTorch by the reference
    /// fixtures' position tables and reconstruction output), up- and down-sampling, both corner modes.
    #[test]
    fn bilinear_matches_burns_interpolate() {
        let device = Default::default();
        let x = Tensor::<Cpu, 4>::random([2, 3, 5, 7], Distribution::Normal(0.0, 1.0), &device);
        for (oh, ow) in [(10, 14), (40, 56), (3, 4), (5, 7), (1, 9)] {
            for align in [false, true] {
                let want = interpolate(
                    x.clone(),
                    [oh, ow],
                    InterpolateOptions::new(InterpolateMode::Bilinear).with_align_corners(align),
                );
                let got = bilinear(x.clone(), oh, ow, align);
                let err: f32 = got.sub(want).abs().max().into_scalar();
                assert!(err < 1e-5, "{oh}x{ow} align_corners={align}: max abs error {err}");
            }
        }
    }

    /// `padding_idx`: the looked-up [PAD] rows carry their values forward but send no gradient back
    /// to row 0 (PyTorch's `nn.Embedding(padding_idx=0)`); other rows get the summed gradient of
    /// every position that looked them up; without `padding_idx` row 0 learns like any other.
    #[test]
    fn padding_row_gets_no_gradient_from_the_lookup() {
        type AB = burn::backend::Autodiff<Cpu>;
        let device = Default::default();
        let ids =
            Tensor::<AB, 2, Int>::from_data(burn::tensor::TensorData::new(vec![0i64, 3, 0, 5, 3, 0], [2, 3]), &device);
        let upstream = Tensor::<AB, 3>::from_data(
            burn::tensor::TensorData::new((0..24).map(|i| i as f32 + 1.0).collect::<Vec<_>>(), [2, 3, 4]),
            &device,
        );
        for padding_idx in [Some(0), None] {
            let mut emb = Embedding::<AB>::new(6, 4, padding_idx, 1.0, &device);
            // A non-zero padding row, as the tied decoder's init leaves it in the full model.
            emb.weight =
                Param::from_tensor(Tensor::random([6, 4], Distribution::Normal(0.0, 1.0), &device).require_grad());
            let out = emb.forward(ids.clone());
            let table: Vec<f32> = emb.weight.val().into_data().to_vec().unwrap();
            let got: Vec<f32> = out.clone().into_data().to_vec().unwrap();
            assert_eq!(&got[0..4], &table[0..4], "the [PAD] position still reads row 0");
            let grads = (out * upstream.clone()).sum().backward();
            let g: Vec<f32> = emb.weight.grad(&grads).unwrap().into_data().to_vec().unwrap();
            // Row 3 is looked up at positions 1 and 4 (upstream 5..8 and 17..20).
            assert_eq!(&g[12..16], &[22.0, 24.0, 26.0, 28.0]);
            let pad_row: &[f32] = &g[0..4];
            match padding_idx {
                // Positions 0, 2, 5: 1..4 + 9..12 + 21..24.
                None => assert_eq!(pad_row, &[31.0, 34.0, 37.0, 40.0]),
                Some(_) => assert_eq!(pad_row, &[0.0; 4]),
            }
        }
    }
}
