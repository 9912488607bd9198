//! Learning rate and weight-decay groups, as the reference's recipe sets them.
//!
//! The reference (timm 0.3.2 `CosineLRScheduler`, stepped once per epoch) warms up linearly from
//! `warmup_lr` to `lr` over `warmup_epochs`, then follows a cosine from `lr` down to `min_lr` at
//! `epochs`, with the cosine's clock counting from epoch 0 (timm's default `warmup_prefix = False`).
//! We step per optimiser step instead: the same curve evaluated at the fractional epoch
//! `step / steps_per_epoch`, so it is smooth within an epoch and equal to the reference's value at
//! every epoch boundary.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    /// Peak learning rate, already scaled (`base_lr * global_batch / 512` in the reference).
    pub lr: f64,
    pub warmup_lr: f64,
    pub min_lr: f64,
    pub warmup_epochs: f64,
    pub epochs: f64,
    pub steps_per_epoch: usize,
}

impl LrSchedule {
    /// The reference's pre-training recipe: lr 2.5e-4 * global batch / 512, 5 warm-up epochs from
    /// 1e-6, floor 1e-5.
    pub fn reference(base_lr: f64, global_batch: usize, epochs: usize, steps_per_epoch: usize) -> Self {
        LrSchedule {
            lr: scaled_lr(base_lr, global_batch),
            warmup_lr: 1e-6,
            min_lr: 1e-5,
            warmup_epochs: 5.0,
            epochs: epochs as f64,
            steps_per_epoch: steps_per_epoch.max(1),
        }
    }

    pub fn at(&self, step: usize) -> f64 {
        let t = step as f64 / self.steps_per_epoch as f64;
        if t < self.warmup_epochs {
            self.warmup_lr + t * (self.lr - self.warmup_lr) / self.warmup_epochs
        } else if t >= self.epochs {
            self.min_lr
        } else {
            self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + (std::f64::consts::PI * t / self.epochs).cos())
        }
    }
}

/// The reference scales the learning rate linearly with the global batch size, relative to 512.
pub fn scaled_lr(base_lr: f64, global_batch: usize) -> f64 {
    base_lr * global_batch as f64 / 512.0
}

/// The reference's AdamW grouping (timm's `add_weight_decay`): no weight decay on 1-D parameters
/// (biases, norm scales, the heads' extra biases) or on any parameter named `*.bias`.
pub fn decays(name: &str, shape: &[usize]) -> bool {
    !(shape.len() <= 1 || name.ends_with(".bias"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_to_the_floor() {
        let s = LrSchedule::reference(2.5e-4, 300, 150, 10);
        assert!((s.lr - 2.5e-4 * 300.0 / 512.0).abs() < 1e-15);
        assert_eq!(s.at(0), 1e-6);
        // Half-way through warm-up: half-way between the two rates.
        assert!((s.at(25) - (1e-6 + s.lr) / 2.0).abs() < 1e-12);
        // At epoch 5 (end of warm-up) the cosine clock already reads 5 of 150 epochs (timm's default).
        let at5 = 1e-5 + 0.5 * (s.lr - 1e-5) * (1.0 + (std::f64::consts::PI * 5.0 / 150.0).cos());
        assert!((s.at(50) - at5).abs() < 1e-15);
        assert!((s.at(75 * 10) - (1e-5 + 0.5 * (s.lr - 1e-5))).abs() < 1e-12, "mid-way");
        assert_eq!(s.at(150 * 10), 1e-5);
        assert_eq!(s.at(10_000), 1e-5);
        // Monotone decreasing after warm-up.
        assert!((50..1500).all(|k| s.at(k + 1) <= s.at(k)));
    }

    #[test]
    fn weight_decay_groups_match_the_reference_split() {
        assert!(decays("block1.0.attn.q.weight", &[64, 64]));
        assert!(decays("patch_embed1.proj.weight", &[64, 3, 4, 4]));
        assert!(decays("pos_embed1", &[1, 3136, 64]));
        assert!(!decays("block1.0.attn.q.bias", &[64]));
        assert!(!decays("block1.0.norm1.weight", &[64]));
        assert!(!decays("itm_head.linear_bias", &[2]));
        assert!(!decays("mlm_head.bias", &[30522]));
    }
}
