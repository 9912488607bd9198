//! An exponential moving average of the weights (Polyak averaging; `ema_decay`), the weights a
//! run exports and validates when it is on. Not in the authors' recipes (off by default).
//!
//! Why: near the peak learning rate the weights of consecutive steps rank the same validation lists
//! quite differently (one demo's ITM R@1, TIR, at steps 1,200 / 1,300 / 1,399: 44 / 28 / 34 at peak
//! lr 1e-3), while their average ranks better (62; README, "Why ITM is slow to learn here").
//!
//! The rate follows TensorFlow's `ExponentialMovingAverage(decay, num_updates)`: after `n` steps
//! the average keeps `min(decay, (1 + n) / (10 + n))` of itself, so a short run averages over its
//! last tenth or so rather than over the initial weights. The average starts as the weights after
//! the first step. It is kept by state-dict key in f32 on the training device and saved in every
//! checkpoint (`ema.<key>`), so a resumed run continues it bit for bit. burn has no weight
//! average of its own (its `EMA` is a metric smoother), hence this module.

use super::optim::Path;
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use std::collections::BTreeMap;

pub struct WeightAverage<B: Backend> {
    pub decay: f64,
    /// Optimiser steps averaged so far (TensorFlow's `num_updates`).
    pub updates: u64,
    /// By reference state-dict key, flattened.
    pub average: BTreeMap<String, Tensor<B, 1>>,
}

impl<B: Backend> WeightAverage<B> {
    pub fn new(decay: f64) -> Self {
        WeightAverage { decay, updates: 0, average: BTreeMap::new() }
    }

    /// The share of the old average kept at the coming update.
    pub fn rate(&self) -> f64 {
        let n = self.updates as f64;
        self.decay.min((1.0 + n) / (10.0 + n))
    }

    /// Fold the weights after an optimiser step into the average.
    pub fn update<M: Module<B>>(&mut self, model: &M) {
        let rate = self.rate();
        let mut folder = Folder { path: Path::default(), average: &mut self.average, rate };
        model.visit(&mut folder);
        self.updates += 1;
    }

    /// `model` with the averaged weights in place of its own (parameters the average has not seen
    /// keep theirs).
    pub fn apply<M: Module<B>>(&self, model: M) -> M {
        model.map(&mut Substitute { path: Path::default(), average: &self.average })
    }
}

struct Folder<'a, B: Backend> {
    path: Path,
    average: &'a mut BTreeMap<String, Tensor<B, 1>>,
    rate: f64,
}

impl<B: Backend> ModuleVisitor<B> for Folder<'_, B> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.enter(name);
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }
    /// BatchNorm's running statistics are averaged like the weights (as timm's ModelEmaV2 does
    /// with the whole state dict).
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let w = param.val();
        let n = w.shape().num_elements();
        let w = w.reshape([n]);
        let key = self.path.key();
        let next = match self.average.remove(&key) {
            Some(avg) => avg.mul_scalar(self.rate) + w.mul_scalar(1.0 - self.rate),
            None => w,
        };
        self.average.insert(key, next);
    }
}

struct Substitute<'a, B: Backend> {
    path: Path,
    average: &'a BTreeMap<String, Tensor<B, 1>>,
}

impl<B: Backend> ModuleMapper<B> for Substitute<'_, B> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.enter(name);
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(avg) = self.average.get(&self.path.key()) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        Param::from_mapped_value(id, avg.clone().reshape(tensor.dims()), mapper)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Cpu;
    use burn::nn::Linear;

    fn linear_with(value: f32) -> Linear<Cpu> {
        let device = Default::default();
        Linear {
            weight: Param::from_tensor(Tensor::full([2, 1], value, &device)),
            bias: Some(Param::from_tensor(Tensor::full([1], value, &device))),
        }
    }

    fn weight(l: &Linear<Cpu>) -> Vec<f32> {
        l.weight.val().into_data().to_vec().unwrap()
    }

    /// The average begins at the first step's weights, then keeps min(decay, (1+n)/(10+n)).
    #[test]
    fn averages_with_tensorflows_rate() {
        let mut ema = WeightAverage::<Cpu>::new(0.5);
        ema.update(&linear_with(1.0));
        assert_eq!(weight(&ema.apply(linear_with(9.0))), vec![1.0, 1.0]);
        // n = 1: rate min(0.5, 2/11) = 2/11.
        ema.update(&linear_with(12.0));
        let r = 2.0f32 / 11.0;
        let expect = r * 1.0 + (1.0 - r) * 12.0;
        for w in weight(&ema.apply(linear_with(9.0))) {
            assert!((w - expect).abs() < 1e-6, "{w} vs {expect}");
        }
        // Past n = 8 the decay caps the rate.
        ema.updates = 100;
        assert_eq!(ema.rate(), 0.5);
        let averaged = ema.apply(linear_with(9.0));
        let b: Vec<f32> = averaged.bias.unwrap().val().into_data().to_vec().unwrap();
        assert!((b[0] - expect).abs() < 1e-6, "the bias is averaged too: {b:?}");
    }
}
