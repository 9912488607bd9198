//! AdamW exactly as `torch.optim.AdamW` steps, with the reference's weight-decay groups and state
//! keyed by state-dict name.
//!
//! Written here rather than taken from burn because burn 0.21's AdamW applies one weight decay to
//! every parameter (the reference exempts biases and 1-D parameters) and keys its state by
//! `ParamId`, which is fresh in every process, so a checkpoint written by one run could not be
//! resumed by another. The arithmetic follows PyTorch's single-tensor AdamW line for line.

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
        let p = tensor.inner();
        let grad = if self.grad_scale != 1.0 { grad.mul_scalar(self.grad_scale) } else { grad };
        let updated = self.opt.update(&key, p, grad, self.lr, wd);
        let mut t = Tensor::from_inner(updated);
        if require_grad {
            t = t.require_grad();
        }
        Param::from_mapped_value(id, t, mapper)
    }
}

impl<B: Backend> AdamW<B> {
    pub fn new(config: AdamWConfig) -> Self {
        AdamW { config, state: BTreeMap::new() }
    }

    /// One step of torch.optim.AdamW (amsgrad off, maximize off) on one tensor.
    fn update<const D: usize>(
        &mut self,
        key: &str,
        p: Tensor<B, D>,
        grad: Tensor<B, D>,
        lr: f64,
        wd: f64,
    ) -> Tensor<B, D> {
        let AdamWConfig { beta1, beta2, eps, .. } = self.config;
        let shape = p.dims();
        let n: usize = shape.iter().product();
        let g = grad.reshape([n]);
        let p = p.reshape([n]);
        // Decoupled weight decay first, on the parameter before the Adam update.
        let p = if wd != 0.0 { p.mul_scalar(1.0 - lr * wd) } else { p };
        let st = match self.state.remove(key) {
            Some(s) => Moments {
                step: s.step + 1,
                m: s.m.mul_scalar(beta1) + g.clone().mul_scalar(1.0 - beta1),
                v: s.v.mul_scalar(beta2) + g.clone().square().mul_scalar(1.0 - beta2),
            },
            None => Moments { step: 1, m: g.clone().mul_scalar(1.0 - beta1), v: g.square().mul_scalar(1.0 - beta2) },
        };
        let bc1 = 1.0 - beta1.powi(st.step as i32);
        let bc2 = 1.0 - beta2.powi(st.step as i32);
        let step_size = lr / bc1;
        let denom = st.v.clone().sqrt().div_scalar(bc2.sqrt()).add_scalar(eps);
        let p = p - st.m.clone().div(denom).mul_scalar(step_size);
        self.state.insert(key.to_string(), st);
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
        let p1 = opt.update("w", p, g.clone(), lr, 0.1);
        // Step 1: m = 0.1 g, v = 0.001 g^2, m_hat = g, v_hat = g^2 -> p*(1 - lr wd) - lr * sign(g) (eps aside).
        let want1 =
            [1.0 * (1.0 - 0.001) - 0.01 * 0.5 / (0.5 + 1e-8), -2.0 * (1.0 - 0.001) - 0.01 * 0.25 / (0.25 + 1e-8)];
        let got1: Vec<f32> = p1.clone().into_data().to_vec().unwrap();
        for (a, b) in got1.iter().zip(want1) {
            assert!((*a as f64 - b).abs() < 1e-6, "{a} vs {b}");
        }
        let p2 = opt.update("w", p1, g.clone().mul_scalar(-1.0), lr, 0.1);
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

    #[test]
    fn clip_factor_is_torchs() {
        assert_eq!(clip_factor(0.5, Some(1.0)), 1.0);
        assert!((clip_factor(4.0, Some(1.0)) - 1.0 / (4.0 + 1e-6)).abs() < 1e-15);
        assert_eq!(clip_factor(4.0, None), 1.0);
    }
}
