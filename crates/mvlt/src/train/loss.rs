//! The pre-training and fine-tuning objectives, as the reference computes them.
//!
//! Pre-training: `CE(MLM, ignore -1) + CE(ITM) + 10 * SmoothL1(beta 1, mean)(reconstruction, clean
//! image)`, plus `CE(main) + CE(sub)` when the recognition heads join. Fine-tuning: the last two.
//! Ours, off in the authors' recipes: `+ ITC` (symmetric InfoNCE over the batch, [`itc_loss`]).

use crate::data::text::IGNORE;
use crate::model::{HeadSet, Mode, Pvlt, PvltOutput};
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
    pub itc: Option<Tensor<B, 1>>,
    pub total: Tensor<B, 1>,
}

impl<B: Backend> Losses<B> {
    /// Add the contrastive term (computed apart: it needs two more passes of the model).
    pub fn with_itc(mut self, itc: Tensor<B, 1>) -> Self {
        self.total = self.total + itc.clone();
        self.itc = Some(itc);
        self
    }
}

/// Symmetric InfoNCE (CLIP / ALBEF's ITC) over a batch of unit-length image and text embeddings
/// `[B, D]` at similarity `scale` `[1]`: cross-entropy of each image against all texts and of each
/// text against all images, averaged. `targets` `[B, B]` holds each row's target distribution:
/// uniform over the rows of the same product (another view of a product is not a negative for
/// its caption), so the identity when every row is its own product.
pub fn itc_loss<B: Backend>(
    images: Tensor<B, 2>,
    texts: Tensor<B, 2>,
    scale: Tensor<B, 1>,
    targets: Tensor<B, 2>,
) -> Tensor<B, 1> {
    let sim = images.matmul(texts.transpose()) * scale.unsqueeze();
    let soft_ce = |logits: Tensor<B, 2>, t: Tensor<B, 2>| (log_softmax(logits, 1) * t).sum_dim(1).mean().neg();
    (soft_ce(sim.clone(), targets.clone()) + soft_ce(sim.transpose(), targets.transpose())).div_scalar(2.0)
}

/// Row-normalised "same product" matrix `[B, B]` of a batch's product keys: ITC's targets.
pub fn same_product_targets<B: Backend>(products: &[String], device: &B::Device) -> Tensor<B, 2> {
    let n = products.len();
    let mut v = vec![0f32; n * n];
    for (i, p) in products.iter().enumerate() {
        let same: Vec<usize> = (0..n).filter(|&j| &products[j] == p).collect();
        for j in &same {
            v[i * n + j] = 1.0 / same.len() as f32;
        }
    }
    Tensor::from_data(TensorData::new(v, [n, n]), device)
}

/// A batch's ITC embeddings `[B, D]`, in f32: the clean images' and the true (unmasked)
/// captions'. `None` when the model has no ITC head or the batch carries no captions for it.
pub fn itc_embeddings<B: Backend>(model: &Pvlt<B>, t: &Targets<B>, mode: Mode) -> Option<(Tensor<B, 2>, Tensor<B, 2>)> {
    let itc = t.itc.as_ref()?;
    let dtype = model.stages[0].patch_embed.proj.weight.val().dtype();
    let img =
        model.embed_images(t.clean_images.clone().cast(dtype), mode, itc.empty_caption[0], itc.empty_caption[1])?;
    let txt = model.embed_texts(itc.caption_ids.clone(), mode)?;
    Some((img.cast(FloatDType::F32), txt.cast(FloatDType::F32)))
}

/// What ITC needs of a batch.
pub struct ItcTargets<B: Backend> {
    /// `[B, T]` each image's own caption, not MLM-corrupted.
    pub caption_ids: Tensor<B, 2, Int>,
    /// `[B, B]` [`same_product_targets`].
    pub targets: Tensor<B, 2>,
    /// `[CLS]` and `[SEP]` ids: the empty caption of the image pass.
    pub empty_caption: [i64; 2],
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
    /// Present when the batch carries true captions (pre-training).
    pub itc: Option<ItcTargets<B>>,
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
    Losses { mlm, itm, t2i, sup_cls, sub_cls, itc: None, total }
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
    fn itc_loss_matches_hand_computation_and_merges_a_product() {
        // Two rows, orthogonal unit embeddings, scale 1: logits [[1, 0], [0, 1]] both ways.
        let e = f(vec![1.0, 0.0, 0.0, 1.0], [2, 2]);
        let scale = Tensor::<Cpu, 1>::from_floats([1.0], &Default::default());
        let eye = same_product_targets::<Cpu>(&["a".into(), "b".into()], &Default::default());
        let l = itc_loss(e.clone(), e.clone(), scale.clone(), eye).into_scalar() as f64;
        let want = -(1f64.exp() / (1f64.exp() + 1.0)).ln();
        assert!((l - want).abs() < 1e-6, "{l} vs {want}");
        // One product: each row's target is half on each column, so the loss is minus the mean of
        // both log-probabilities of a row.
        let same = same_product_targets::<Cpu>(&["a".into(), "a".into()], &Default::default());
        assert_eq!(same.to_data().to_vec::<f32>().unwrap(), [0.5; 4]);
        let l = itc_loss(e.clone(), e, scale, same).into_scalar() as f64;
        let p = 1f64.exp() / (1f64.exp() + 1.0);
        let want = -(p.ln() + (1.0 - p).ln()) / 2.0;
        assert!((l - want).abs() < 1e-6, "{l} vs {want}");
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

#[cfg(test)]
mod itc_tests {
    use super::*;
    use crate::device::Cpu;
    use crate::model::PvltConfig;
    use burn::backend::Autodiff;
    use burn::tensor::Distribution;

    type A = Autodiff<Cpu>;

    /// The contrastive term reaches both passes: distinct images and captions embed apart, and the
    /// gradient of the loss reaches the projections and the backbone's first layer.
    #[test]
    fn itc_embeddings_differ_and_gradients_reach_the_backbone() {
        let dev = Default::default();
        let mut cfg = PvltConfig::micro();
        cfg.img_size = 64;
        cfg.num_text_tokens = 8;
        cfg.vocab_size = 200;
        cfg.heads = HeadSet { itc: true, ..HeadSet::NONE };
        let model = Pvlt::<A>::new(&cfg, &dev);
        let b = 6;
        let images = Tensor::<A, 4>::random([b, 3, 64, 64], Distribution::Uniform(0.0, 1.0), &dev);
        // Real catalogue images: mostly white background, so they differ far less than noise.
        let prods = crate::data::synth::products(b, 1);
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
        let px: Vec<f32> = prods
            .iter()
            .flat_map(|p| {
                let hwc = crate::data::synth::render(p, 0, 64, &mut rng);
                (0..3)
                    .flat_map(|c| (0..64 * 64).map(|i| hwc[i * 3 + c] as f32 / 255.0).collect::<Vec<_>>())
                    .collect::<Vec<_>>()
            })
            .collect();
        let real = Tensor::<A, 4>::from_data(TensorData::new(px, [b, 3, 64, 64]), &dev);
        let e = model.embed_images(real, Mode::Train, 101, 102).unwrap();
        let real_spread = 1.0 - e.clone().matmul(e.transpose()).mean().into_scalar();
        assert!(real_spread > 1e-3, "catalogue images embed alike: {real_spread}");
        let ids: Vec<i64> = (0..b).flat_map(|i| [101, 110 + i as i64, 150 + i as i64, 120, 102, 0, 0, 0]).collect();
        let ids = Tensor::<A, 2, Int>::from_data(TensorData::new(ids, [b, 8]), &dev);
        let img = model.embed_images(images, Mode::Train, 101, 102).unwrap();
        let txt = model.embed_texts(ids, Mode::Train).unwrap();
        let spread = |e: Tensor<A, 2>| {
            let sim = e.clone().matmul(e.transpose());
            1.0 - sim.mean().into_scalar()
        };
        let (si, st) = (spread(img.clone()), spread(txt.clone()));
        tracing::info!("1 - mean cosine: images {si:e}, texts {st:e}");
        assert!(si > 1e-4 && st > 1e-4, "embeddings hardly differ: {si} {st}");
        let head = model.itc_head.as_ref().unwrap();
        let targets = same_product_targets::<A>(&(0..b).map(|i| i.to_string()).collect::<Vec<_>>(), &dev);
        let loss = itc_loss(img, txt, head.scale(), targets);
        let grads = loss.backward();
        let norm = |t: Option<Tensor<Cpu, 2>>| t.map(|g| g.powf_scalar(2.0).sum().sqrt().into_scalar()).unwrap_or(0.0);
        let g_img = norm(head.image_proj.weight.grad(&grads));
        let g_txt = norm(head.text_proj.weight.grad(&grads));
        let g_q = norm(model.stages[0].blocks[0].attn.q.weight.grad(&grads));
        tracing::info!("grad norms: image_proj {g_img:e}, text_proj {g_txt:e}, block1 q {g_q:e}");
        assert!(g_img > 0.0 && g_txt > 0.0 && g_q > 0.0);
    }
}
