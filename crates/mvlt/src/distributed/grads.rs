//! A step's gradients summed over the ranks, in buckets of about 25 MB (PyTorch DDP's default
//! `bucket_cap_mb`): each bucket is the flattened gradients of consecutive parameters, in the
//! model's parameter order (the same on every rank), summed with one all-reduce.
//!
//! Why not overlapped with backward, as DDP does: burn's backward pass returns all gradients at
//! once (no per-parameter hook), so there is nothing to overlap with; on 2 CPU cores the ranks'
//! compute shares the cores anyway.

use super::Collective;
use anyhow::Result;
use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData, TensorPrimitive};
use std::collections::HashMap;

/// Floats per bucket (25 MB of f32).
const BUCKET: usize = 25 * 1024 * 1024 / 4;

/// `t` summed over the ranks (every rank gets the sum).
pub fn all_reduce<B: Backend>(group: &dyn Collective, t: Tensor<B, 1>) -> Result<Tensor<B, 1>> {
    let mut p = t.into_primitive().tensor();
    group.all_reduce_sum(&mut p)?;
    Ok(Tensor::from_primitive(TensorPrimitive::Float(p)))
}

/// The sum over the ranks of each rank's `grads` (gradients of `model`'s parameters, already
/// divided by the step's micro-batch count, so the sum is their mean). A parameter gets a
/// gradient when at least one rank has one for it, as accumulation in one process would give it.
pub fn sum_gradients<AB: AutodiffBackend, M: Module<AB>>(
    group: &dyn Collective,
    model: &M,
    mut grads: GradientsParams,
) -> Result<GradientsParams> {
    let mut collect = Collect::<AB> { grads: &mut grads, params: vec![] };
    model.visit(&mut collect);
    let params = collect.params;
    let device = match params.first() {
        Some(p) => p.grad.device(),
        None => return Ok(grads),
    };
    let mut summed: HashMap<ParamId, Tensor<AB::InnerBackend, 1>> = HashMap::new();
    let mut start = 0;
    while start < params.len() {
        // One bucket: parameters from `start` while they fit (a larger one alone), and after them
        // one flag per parameter (1 where this rank has its gradient), summed with them.
        let mut end = start;
        let mut size = 0;
        while end < params.len() && (end == start || size + params[end].numel <= BUCKET) {
            size += params[end].numel;
            end += 1;
        }
        let bucket = &params[start..end];
        let mut parts: Vec<Tensor<AB::InnerBackend, 1>> = bucket.iter().map(|p| p.grad.clone()).collect();
        let flags: Vec<f32> = bucket.iter().map(|p| if p.present { 1.0 } else { 0.0 }).collect();
        parts.push(Tensor::from_data(TensorData::new(flags, [bucket.len()]), &device));
        let flat = all_reduce(group, Tensor::cat(parts, 0))?;
        let had: Vec<f32> = flat.clone().slice(size..size + bucket.len()).into_data().to_vec().unwrap_or_default();
        let mut offset = 0;
        for (p, count) in bucket.iter().zip(had) {
            if count > 0.0 {
                summed.insert(p.id, flat.clone().slice(offset..offset + p.numel));
            }
            offset += p.numel;
        }
        start = end;
    }
    let mut out = GradientsParams::new();
    model.visit(&mut Register::<AB> { summed, out: &mut out });
    Ok(out)
}

struct Flat<B: Backend> {
    id: ParamId,
    numel: usize,
    grad: Tensor<B, 1>,
    present: bool,
}

/// Takes each parameter's gradient out of `grads`, flattened (zeros where this rank has none).
struct Collect<'a, AB: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    params: Vec<Flat<AB::InnerBackend>>,
}

impl<AB: AutodiffBackend> ModuleVisitor<AB> for Collect<'_, AB> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
        let numel = param.shape().num_elements();
        let (grad, present) = match self.grads.remove::<AB::InnerBackend, D>(param.id) {
            Some(g) => (g.reshape([numel]), true),
            None => (Tensor::zeros([numel], &param.device()), false),
        };
        self.params.push(Flat { id: param.id, numel, grad, present });
    }
}

/// Registers each summed gradient in its parameter's shape.
struct Register<'a, AB: AutodiffBackend> {
    summed: HashMap<ParamId, Tensor<AB::InnerBackend, 1>>,
    out: &'a mut GradientsParams,
}

impl<AB: AutodiffBackend> ModuleVisitor<AB> for Register<'_, AB> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
        if let Some(g) = self.summed.remove(&param.id) {
            let dims: [usize; D] = param.shape().dims();
            self.out.register::<AB::InnerBackend, D>(param.id, g.reshape(dims));
        }
    }
}
