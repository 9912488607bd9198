//! AdamW exactly as `torch.optim.AdamW` steps, with the reference's weight-decay groups and state
//! keyed by state-dict name.
//!
//! Written here rather than taken from burn because burn 0.21's AdamW applies one weight decay to
//! every parameter (the reference exempts biases and 1-D parameters) and keys its state by
//! `ParamId`, which is fresh in every process, so a checkpoint written by one run could not be
//! resumed by another. The arithmetic is PyTorch's: its fused CPU kernel on tensors in host memory,
//! its single-tensor sequence of ops elsewhere.

use crate::model::weights::reference_key;
use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// PyTorch's defaults with the reference's weight decay.
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
}

/// Per-parameter state: PyTorch's `step`, `exp_avg`, `exp_avg_sq` (flattened).
#[derive(Clone, Debug)]
pub struct Moments<B: Backend> {
    pub step: u64,
    pub m: Tensor<B, 1>,
    pub v: Tensor<B, 1>,
}

pub struct AdamW<B: Backend> {
    pub config: AdamWConfig,
    /// By reference state-dict key.
    pub state: BTreeMap<String, Moments<B>>,
}

/// Which parameters get weight decay, by (name, shape).
pub type DecayRule<'a> = &'a dyn Fn(&str, &[usize]) -> bool;

/// Tracks the module path through burn's visitor/mapper callbacks, giving reference keys.
#[derive(Default)]
pub(super) struct Path(Vec<String>);

impl Path {
    pub(super) fn enter(&mut self, name: &str) {
        self.0.push(name.to_string());
    }
    pub(super) fn exit(&mut self) {
        self.0.pop();
    }
    pub(super) fn key(&self) -> String {
        reference_key(&self.0.join("."))
    }
    /// BatchNorm statistics also pass through map_float/visit_float; they are not trained.
    pub(super) fn is_running_state(&self) -> bool {
        matches!(self.0.last().map(|s| s.as_str()), Some("running_mean" | "running_var" | "num_batches_tracked"))
    }
}

/// Sum of squared gradients over all parameters, for global-norm clipping.
struct SquaredNorm<'a, B: AutodiffBackend> {
    grads: &'a GradientsParams,
    total: Option<Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for SquaredNorm<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
            let s = g.square().sum();
            self.total = Some(match self.total.take() {
                Some(t) => t + s,
                None => s,
            });
        }
    }
}

/// The global L2 norm of all gradients (what `torch.nn.utils.clip_grad_norm_` computes).
pub fn grad_norm<B: AutodiffBackend, M: AutodiffModule<B>>(model: &M, grads: &GradientsParams) -> f64 {
    let mut v = SquaredNorm::<B> { grads, total: None };
    model.visit(&mut v);
    v.total.map(|t| t.into_scalar().elem::<f64>().sqrt()).unwrap_or(0.0)
}

struct Stepper<'a, B: AutodiffBackend> {
    path: Path,
    grads: &'a mut GradientsParams,
    opt: &'a mut AdamW<B::InnerBackend>,
    lr: f64,
    /// Multiplies every gradient (clipping), 1 when not clipping.
    grad_scale: f64,
    decay: DecayRule<'a>,
}

impl<B: AutodiffBackend> ModuleMapper<B> for Stepper<'_, B> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.enter(name);
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        if self.path.is_running_state() {
            return Param::from_mapped_value(id, tensor, mapper);
        }
        let Some(grad) = self.grads.remove::<B::InnerBackend, D>(id) else {
            // PyTorch skips parameters without a gradient (a head that did not run).
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let key = self.path.key();
        let shape = tensor.dims();
        let wd = if (self.decay)(&key, &shape) { self.opt.config.weight_decay } else { 0.0 };
        let require_grad = tensor.is_require_grad();
        let updated = self.opt.update(&key, tensor.inner(), grad, self.lr, wd, self.grad_scale);
        let mut t = Tensor::from_inner(updated);
        if require_grad {
            t = t.require_grad();
        }
        Param::from_mapped_value(id, t, mapper)
    }
}

/// The scalars of one AdamW step of one parameter, computed in f64 as PyTorch computes them.
#[derive(Clone, Copy, Debug)]
struct StepScalars {
    /// `1 - lr * weight_decay`: decoupled weight decay, applied to the parameter first.
    decay: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    /// `lr / (1 - beta1^step)`.
    step_size: f64,
    /// `sqrt(1 - beta2^step)`.
    bias_correction2_sqrt: f64,
    /// Multiplies the gradient first (global-norm clipping); 1 when not clipping.
    grad_scale: f64,
}

impl StepScalars {
    fn new(c: &AdamWConfig, lr: f64, wd: f64, step: u64, grad_scale: f64) -> Self {
        StepScalars {
            decay: 1.0 - lr * wd,
            beta1: c.beta1,
            beta2: c.beta2,
            eps: c.eps,
            step_size: lr / (1.0 - c.beta1.powi(step as i32)),
            bias_correction2_sqrt: (1.0 - c.beta2.powi(step as i32)).sqrt(),
            grad_scale,
        }
    }
}

/// One AdamW step over a parameter's values with each element read and written once, in the
/// arithmetic of PyTorch's fused CPU kernel (`_fused_adamw_`, FusedAdamKernel.cpp: decay, `lerp`
/// of the first moment, `mul` + `addcmul` of the second, `sqrt / bc2 + eps`, the update). Written
/// by hand because neither burn nor tch 0.22 has a fused optimiser step, and the 14 tensor ops of
/// [`adamw_ops`] took a tenth of a libtorch training step (pvlt_tiny: 40 M parameters).
fn adamw_fused(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: &StepScalars) {
    use rayon::prelude::*;
    // Large enough that a chunk's bookkeeping is nothing next to its memory traffic.
    const CHUNK: usize = 1 << 15;
    let (decay, b1c, b2, b2c) = (s.decay as f32, (1.0 - s.beta1) as f32, s.beta2 as f32, (1.0 - s.beta2) as f32);
    let (eps, step_size, bc2) = (s.eps as f32, s.step_size as f32, s.bias_correction2_sqrt as f32);
    let scale = s.grad_scale as f32;
    p.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .for_each(|(((p, g), m), v)| {
            for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                let g = g * scale;
                *m += (g - *m) * b1c;
                *v = *v * b2 + b2c * g * g;
                let denom = v.sqrt() / bc2 + eps;
                *p = *p * decay - step_size * *m / denom;
            }
        });
}

/// The same step as burn tensor ops, for tensors outside host memory (GPUs): PyTorch's
/// single-tensor AdamW line for line. Returns the parameter and the two moments.
fn adamw_ops<B: Backend>(
    p: Tensor<B, 1>,
    g: Tensor<B, 1>,
    m: Tensor<B, 1>,
    v: Tensor<B, 1>,
    s: &StepScalars,
) -> (Tensor<B, 1>, Tensor<B, 1>, Tensor<B, 1>) {
    let g = if s.grad_scale != 1.0 { g.mul_scalar(s.grad_scale) } else { g };
    let p = if s.decay != 1.0 { p.mul_scalar(s.decay) } else { p };
    let m = m.mul_scalar(s.beta1) + g.clone().mul_scalar(1.0 - s.beta1);
    let v = v.mul_scalar(s.beta2) + g.square().mul_scalar(1.0 - s.beta2);
    let denom = v.clone().sqrt().div_scalar(s.bias_correction2_sqrt).add_scalar(s.eps);
    let p = p - m.clone().div(denom).mul_scalar(s.step_size);
    (p, m, v)
}

impl<B: Backend> AdamW<B> {
    pub fn new(config: AdamWConfig) -> Self {
        AdamW { config, state: BTreeMap::new() }
    }

    /// One step of torch.optim.AdamW (amsgrad off, maximize off) on one tensor, its gradient
    /// multiplied by `grad_scale` first. In host memory (the CPU backends) one fused pass, else
    /// tensor ops.
    fn update<const D: usize>(
        &mut self,
        key: &str,
        p: Tensor<B, D>,
        grad: Tensor<B, D>,
        lr: f64,
        wd: f64,
        grad_scale: f64,
    ) -> Tensor<B, D> {
        let shape = p.dims();
        let n: usize = shape.iter().product();
        let (p, g) = (p.reshape([n]), grad.reshape([n]));
        // PyTorch starts both moments at zero; the first step's update is the same as starting
        // them at the first gradient's terms.
        let (step, m, v) = match self.state.remove(key) {
            Some(s) => (s.step + 1, s.m, s.v),
            None => (1, Tensor::zeros([n], &p.device()), Tensor::zeros([n], &p.device())),
        };
        let s = StepScalars::new(&self.config, lr, wd, step, grad_scale);
        let fused = crate::device::with_host_f32([p, g, m, v], |x| {
            if let [p, g, m, v] = x {
                adamw_fused(p, g, m, v, &s);
            }
        });
        let (p, m, v) = match fused {
            Ok([p, _, m, v]) => (p, m, v),
            Err([p, g, m, v]) => adamw_ops(p, g, m, v, &s),
        };
        self.state.insert(key.to_string(), Moments { step, m, v });
        p.reshape(shape)
    }

    /// Apply one optimiser step to every parameter of `model` that has a gradient in `grads`.
    /// `grad_scale` multiplies the gradients first (global-norm clipping).
    pub fn step<AB, M>(
        &mut self,
        model: M,
        grads: &mut GradientsParams,
        lr: f64,
        grad_scale: f64,
        decay: DecayRule<'_>,
    ) -> M
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        let mut stepper = Stepper::<AB> { path: Path::default(), grads, opt: self, lr, grad_scale, decay };
        model.map(&mut stepper)
    }
}

/// The clipping factor `torch.nn.utils.clip_grad_norm_` applies: `max_norm / (norm + 1e-6)` when
/// that is below 1.
pub fn clip_factor(norm: f64, max_norm: Option<f64>) -> f64 {
    match max_norm {
        Some(max) if norm > 0.0 => (max / (norm + 1e-6)).min(1.0),
        _ => 1.0,
    }
}

/// A parameter's reference key, shape and flattened gradient (`None`: it got none).
pub type NamedGrad<I> = (String, Vec<usize>, Option<Tensor<I, 1>>);

/// Every parameter's gradient by reference key (for checks against stored gradients).
pub fn named_grads<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: &GradientsParams,
) -> Vec<NamedGrad<B::InnerBackend>> {
    struct V<'a, I: Backend> {
        path: Path,
        grads: &'a GradientsParams,
        out: Vec<NamedGrad<I>>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for V<'_, B::InnerBackend> {
        fn enter_module(&mut self, name: &str, _c: &str) {
            self.path.enter(name);
        }
        fn exit_module(&mut self, _name: &str, _c: &str) {
            self.path.exit();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if self.path.is_running_state() {
                return;
            }
            let shape = param.val().dims().to_vec();
            let n = shape.iter().product::<usize>();
            let g = self.grads.get::<B::InnerBackend, D>(param.id).map(|t| t.reshape([n]));
            self.out.push((self.path.key(), shape, g));
        }
    }
    let mut v = V::<B::InnerBackend> { path: Path::default(), grads, out: vec![] };
    model.visit(&mut v);
    v.out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Cpu;
    use burn::tensor::TensorData;

    /// Two steps on one tensor, against values computed by hand from PyTorch's formula.
    #[test]
    fn matches_torch_adamw_by_hand() {
        let dev = Default::default();
        let mut opt = AdamW::<Cpu>::new(AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 });
        let p = Tensor::<Cpu, 1>::from_data(TensorData::new(vec![1.0f32, -2.0], [2]), &dev);
        let g = Tensor::<Cpu, 1>::from_data(TensorData::new(vec![0.5f32, 0.25], [2]), &dev);
        let lr = 0.01;
        let p1 = opt.update("w", p, g.clone(), lr, 0.1, 1.0);
        // Step 1: m = 0.1 g, v = 0.001 g^2, m_hat = g, v_hat = g^2 -> p*(1 - lr wd) - lr * sign(g) (eps aside).
        let want1 =
            [1.0 * (1.0 - 0.001) - 0.01 * 0.5 / (0.5 + 1e-8), -2.0 * (1.0 - 0.001) - 0.01 * 0.25 / (0.25 + 1e-8)];
        let got1: Vec<f32> = p1.clone().into_data().to_vec().unwrap();
        for (a, b) in got1.iter().zip(want1) {
            assert!((*a as f64 - b).abs() < 1e-6, "{a} vs {b}");
        }
        let p2 = opt.update("w", p1, g.clone().mul_scalar(-1.0), lr, 0.1, 1.0);
        // Step 2 by hand for element 0: g2 = -0.5.
        let (b1, b2) = (0.9f64, 0.999f64);
        let m = b1 * 0.05 + 0.1 * -0.5;
        let v = b2 * 0.00025 + 0.001 * 0.25;
        let denom = (v.sqrt() / (1.0 - b2 * b2).sqrt()) + 1e-8;
        let want = want1[0] * (1.0 - 0.001) - (lr / (1.0 - b1 * b1)) * m / denom;
        let got2: Vec<f32> = p2.into_data().to_vec().unwrap();
        assert!((got2[0] as f64 - want).abs() < 1e-6, "{} vs {want}", got2[0]);
        assert_eq!(opt.state["w"].step, 2);
    }

    fn random(n: usize, seed: u64) -> Vec<f32> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// The fused pass and the tensor ops are the same step: three steps with decay and clipping
    /// on `B`, each against the ops on flex, elementwise to f32 rounding.
    fn fused_matches_ops<B: Backend>() {
        let (dev, cpu) = (B::Device::default(), Default::default());
        let n = 100_003; // several of the fused pass's chunks, and a ragged last one
        let config = AdamWConfig::default();
        let mut fused = AdamW::<B>::new(config.clone());
        let mut p = Tensor::<B, 1>::from_data(TensorData::new(random(n, 1), [n]), &dev);
        let mut want = Tensor::<Cpu, 1>::from_data(TensorData::new(random(n, 1), [n]), &cpu);
        let (mut m, mut v) = (Tensor::<Cpu, 1>::zeros([n], &cpu), Tensor::<Cpu, 1>::zeros([n], &cpu));
        for step in 1..=3u64 {
            let g = random(n, 10 + step);
            let (lr, wd, scale) = (1e-3 * step as f64, 0.01, 0.5);
            p = fused.update("w", p, Tensor::from_data(TensorData::new(g.clone(), [n]), &dev), lr, wd, scale);
            let s = StepScalars::new(&config, lr, wd, step, scale);
            (want, m, v) = adamw_ops(want, Tensor::from_data(TensorData::new(g, [n]), &cpu), m, v, &s);
            let got: Vec<f32> = p.clone().into_data().to_vec().unwrap();
            let want_v: Vec<f32> = want.clone().into_data().to_vec().unwrap();
            let worst = got.iter().zip(&want_v).map(|(a, b)| (a - b).abs() / b.abs().max(1e-3)).fold(0.0, f32::max);
            assert!(worst < 1e-5, "step {step}: relative difference {worst}");
        }
        assert_eq!(fused.state["w"].step, 3);
    }

    #[test]
    fn fused_step_matches_the_ops_on_flex() {
        fused_matches_ops::<Cpu>();
    }

    #[cfg(feature = "tch")]
    #[test]
    fn fused_step_matches_the_ops_on_libtorch() {
        fused_matches_ops::<crate::device::Torch>();
    }

    /// Updating in place must not reach a tensor that shares the parameter's storage (a copy kept
    /// for EMA or a checkpoint): burn's clones share it on both CPU backends.
    fn shared_storage_is_left_alone<B: Backend>() {
        let dev = B::Device::default();
        let mut opt = AdamW::<B>::new(AdamWConfig::default());
        let p = Tensor::<B, 1>::from_data(TensorData::new(vec![1.0f32, -2.0, 3.0], [3]), &dev);
        let kept = p.clone();
        let g = Tensor::<B, 1>::from_data(TensorData::new(vec![0.5f32, 0.5, 0.5], [3]), &dev);
        let kept_g = g.clone();
        let p = opt.update("w", p, g, 0.1, 0.0, 1.0);
        assert_eq!(kept.into_data().to_vec::<f32>().unwrap(), vec![1.0, -2.0, 3.0]);
        assert_eq!(kept_g.into_data().to_vec::<f32>().unwrap(), vec![0.5, 0.5, 0.5]);
        let moved: Vec<f32> = p.into_data().to_vec().unwrap();
        assert!((moved[0] - 0.9).abs() < 1e-5, "{moved:?}");
    }

    #[test]
    fn shared_storage_is_left_alone_on_flex() {
        shared_storage_is_left_alone::<Cpu>();
    }

    #[cfg(feature = "tch")]
    #[test]
    fn shared_storage_is_left_alone_on_libtorch() {
        shared_storage_is_left_alone::<crate::device::Torch>();
    }

    #[test]
    fn clip_factor_is_torchs() {
        assert_eq!(clip_factor(0.5, Some(1.0)), 1.0);
        assert!((clip_factor(4.0, Some(1.0)) - 1.0 / (4.0 + 1e-6)).abs() < 1e-15);
        assert_eq!(clip_factor(4.0, None), 1.0);
    }
}
