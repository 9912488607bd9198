//! The pre-training and fine-tuning objectives, as the reference computes them.
//!
//! Pre-training: `CE(MLM, ignore -1) + CE(ITM) + 10 * SmoothL1(beta 1, mean)(reconstruction, clean
//! image)`, plus `CE(main) + CE(sub)` when the recognition heads join. Fine-tuning: the last two.

use crate::data::text::IGNORE;
use crate::model::{HeadSet, PvltOutput};
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{FloatDType, Int, Tensor, TensorData};

/// Weight of the reconstruction term in the reference.
pub const T2I_WEIGHT: f64 = 10.0;

/// Mean cross-entropy of `logits [N, C]` against `labels [N]`, over the rows whose label is not
/// `ignore` (PyTorch's `CrossEntropyLoss(ignore_index=...)`, mean reduction). With no counted row it
/// is 0 (PyTorch gives NaN there; a batch without masked tokens should not stop a run).
pub fn cross_entropy<B: Backend>(logits: Tensor<B, 2>, labels: Tensor<B, 1, Int>, ignore: Option<i64>) -> Tensor<B, 1> {
    let [n, _] = logits.dims();
    let logp = log_softmax(logits, 1);
    let keep = match ignore {
        Some(ig) => labels.clone().not_equal_elem(ig),
        None => labels.clone().ones_like().bool(),
    };
    // Ignored rows gather class 0 and are zeroed by the mask.
    let safe = labels.mask_fill(keep.clone().bool_not(), 0);
    let picked = logp.gather(1, safe.reshape([n, 1])).reshape([n]);
    let keepf = keep.float();
    let count = keepf.clone().sum().clamp_min(1.0);
    picked.mul(keepf).sum().neg().div(count)
}

/// SmoothL1 (Huber with beta = 1), mean over all elements.
pub fn smooth_l1<B: Backend, const D: usize>(pred: Tensor<B, D>, target: Tensor<B, D>) -> Tensor<B, 1> {
    let d = pred.sub(target).abs();
    let quad = d.clone().powf_scalar(2.0).mul_scalar(0.5);
    let lin = d.clone().sub_scalar(0.5);
    let small = d.lower_elem(1.0);
    lin.mask_where(small, quad).mean()
}

/// The loss terms of one step; absent terms are `None`. `t2i` already includes the x10.
#[derive(Debug, Clone)]
pub struct Losses<B: Backend> {
    pub mlm: Option<Tensor<B, 1>>,
    pub itm: Option<Tensor<B, 1>>,
    pub t2i: Option<Tensor<B, 1>>,
    pub sup_cls: Option<Tensor<B, 1>>,
    pub sub_cls: Option<Tensor<B, 1>>,
    pub total: Tensor<B, 1>,
}

/// The MLM targets of one batch: the predicted positions and their labels. The model's MLM head
/// runs at `rows` only ([`crate::model::Pvlt::forward_mlm_at`]).
pub struct MlmTargets<B: Backend> {
    /// `[M]` indices into the batch's `B*T` text positions.
    pub rows: Tensor<B, 1, Int>,
    /// `[M]` the original token ids there.
    pub labels: Tensor<B, 1, Int>,
}

/// The positions of `labels` (`[B*T]`, [`IGNORE`] where nothing is predicted) that carry a label,
/// and those labels. A batch with none gets one ignored placeholder row, so the head still runs
/// and its parameters get the zero gradient the full head would give them (an absent gradient
/// would change what AdamW does to them).
pub fn mlm_positions(labels: &[i64]) -> (Vec<i64>, Vec<i64>) {
    let (rows, picked): (Vec<i64>, Vec<i64>) =
        labels.iter().enumerate().filter(|(_, &y)| y != IGNORE).map(|(i, &y)| (i as i64, y)).unzip();
    if rows.is_empty() {
        return (vec![0], vec![IGNORE]);
    }
    (rows, picked)
}

impl<B: Backend> MlmTargets<B> {
    /// From the `[B*T]` label array of a batch.
    pub fn from_labels(labels: &[i64], device: &B::Device) -> Self {
        let (rows, picked) = mlm_positions(labels);
        let t = |v: Vec<i64>| {
            let n = v.len();
            Tensor::from_data(TensorData::new(v, [n]), device)
        };
        MlmTargets { rows: t(rows), labels: t(picked) }
    }
}

/// Targets of one batch.
pub struct Targets<B: Backend> {
    pub mlm: MlmTargets<B>,
    /// `[B]`
    pub itm_labels: Tensor<B, 1, Int>,
    /// The clean image `[B, 3, H, W]` the reconstruction is compared with.
    pub clean_images: Tensor<B, 4>,
    pub sup_labels: Tensor<B, 1, Int>,
    pub sub_labels: Tensor<B, 1, Int>,
}

/// Combine the heads' outputs into the objective for the heads in `heads`. The MLM term reads
/// `mlm_logits_at`: run the model with `forward_mlm_at(.., t.mlm.rows)`.
pub fn losses<B: Backend>(out: &PvltOutput<B>, t: &Targets<B>, heads: HeadSet) -> Losses<B> {
    // Losses in f32 whatever precision the model ran in (a no-op for f32 models).
    let flat = |x: &Tensor<B, 3>| {
        let [b, n, c] = x.dims();
        x.clone().reshape([b * n, c]).cast(FloatDType::F32)
    };
    let mlm = heads.mlm.then(|| {
        let logits = out.mlm_logits_at.clone().expect("MLM head ran at the predicted positions");
        cross_entropy(logits.cast(FloatDType::F32), t.mlm.labels.clone(), Some(IGNORE))
    });
    let itm = heads
        .itm
        .then(|| cross_entropy(flat(out.itm_logits.as_ref().expect("ITM head ran")), t.itm_labels.clone(), None));
    let t2i = heads.t2i.then(|| {
        smooth_l1(
            out.t2i_logits.clone().expect("reconstruction head ran").cast(FloatDType::F32),
            t.clean_images.clone(),
        )
        .mul_scalar(T2I_WEIGHT)
    });
    let sup_cls = heads.cls.then(|| {
        cross_entropy(flat(out.sup_cls_logits.as_ref().expect("cls heads ran")), t.sup_labels.clone(), Some(-1))
    });
    let sub_cls = heads.cls.then(|| {
        cross_entropy(flat(out.sub_cls_logits.as_ref().expect("cls heads ran")), t.sub_labels.clone(), Some(-1))
    });
    let device = t.itm_labels.device();
    let total = [&mlm, &itm, &t2i, &sup_cls, &sub_cls]
        .into_iter()
        .flatten()
        .fold(Tensor::<B, 1>::zeros([1], &device), |acc, l| acc + l.clone());
    Losses { mlm, itm, t2i, sup_cls, sub_cls, total }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Cpu;

    fn f(v: Vec<f32>, shape: [usize; 2]) -> Tensor<Cpu, 2> {
        Tensor::from_data(TensorData::new(v, shape), &Default::default())
    }
    fn i(v: Vec<i64>) -> Tensor<Cpu, 1, Int> {
        let n = v.len();
        Tensor::from_data(TensorData::new(v, [n]), &Default::default())
    }

    #[test]
    fn cross_entropy_matches_hand_computation_and_ignores() {
        // Row 0: logits [0, ln 3] -> p(1) = 3/4; row 1: [2, 2] -> p = 1/2; row 2 ignored.
        let logits = f(vec![0.0, 3f32.ln(), 2.0, 2.0, 9.0, -9.0], [3, 2]);
        let l = cross_entropy(logits, i(vec![1, 0, -1]), Some(-1)).into_scalar();
        let want = -((0.75f64).ln() + (0.5f64).ln()) / 2.0;
        assert!((l as f64 - want).abs() < 1e-6, "{l} vs {want}");
        let none = cross_entropy(f(vec![1.0, 2.0], [1, 2]), i(vec![-1]), Some(-1)).into_scalar();
        assert_eq!(none, 0.0);
    }

    #[test]
    fn smooth_l1_is_quadratic_then_linear() {
        let p = f(vec![0.0, 0.0, 0.0], [1, 3]);
        let t = f(vec![0.5, 2.0, -3.0], [1, 3]);
        let l = smooth_l1(p, t).into_scalar();
        let want = (0.125 + 1.5 + 2.5) / 3.0;
        assert!((l as f64 - want).abs() < 1e-6, "{l} vs {want}");
    }
}
