//! One training step's model maths, apart from the loop's bookkeeping (burn's `TrainStep` shape):
//! a host batch on the device, its forward pass and losses, and the backward pass. (Several
//! devices are several processes: [`crate::distributed`].)

use super::hard_negatives;
use super::loss::{itc_embeddings, itc_loss, losses, same_product_targets, ItcTargets, Losses, MlmTargets, Targets};
use super::precision::{autocast, Precision};
use crate::data::loader::Batch;
use crate::model::{HeadSet, Mode, Pvlt};
use anyhow::{anyhow, Result};
use burn::backend::Autodiff;
use burn::optim::GradientsParams;
use burn::tensor::backend::Backend;
use burn::tensor::{FloatDType, Int, Tensor, TensorData};

/// A host batch as device tensors: the model input (clean or grid-masked image, token ids) and
/// the targets of every loss.
pub struct DeviceBatch<B: Backend> {
    pub input: Tensor<B, 4>,
    pub ids: Tensor<B, 2, Int>,
    pub targets: Targets<B>,
}

/// Which image a pre-training batch feeds the model: the reference alternates clean (even
/// batches) and grid-masked (odd) inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageInput {
    Clean,
    Masked,
}

pub fn to_device<B: Backend>(b: &Batch, image: ImageInput, device: &B::Device) -> DeviceBatch<B> {
    let (n, s, t) = (b.len(), b.image_size, b.text_len);
    let img = |v: &Vec<f32>| Tensor::<B, 4>::from_data(TensorData::new(v.clone(), [n, 3, s, s]), device);
    let ints = |v: &Vec<i64>| Tensor::<B, 1, Int>::from_data(TensorData::new(v.clone(), [v.len()]), device);
    let clean = img(&b.images);
    let input =
        if image == ImageInput::Masked && !b.masked_images.is_empty() { img(&b.masked_images) } else { clean.clone() };
    DeviceBatch {
        input,
        ids: Tensor::from_data(TensorData::new(b.input_ids.clone(), [n, t]), device),
        targets: Targets {
            mlm: MlmTargets::from_labels(&b.mlm_labels, device),
            itm_labels: ints(&b.itm_labels),
            clean_images: clean,
            sup_labels: ints(&b.sup_labels),
            sub_labels: ints(&b.sub_labels),
            itc: (b.caption_ids.len() == n * t).then(|| ItcTargets {
                caption_ids: Tensor::from_data(TensorData::new(b.caption_ids.clone(), [n, t]), device),
                targets: same_product_targets(&b.product_ids, device),
                empty_caption: b.empty_caption,
            }),
        },
    }
}

/// Loss-term names, in the order they are logged.
pub const TERMS: [&str; 6] = ["mlm", "itm", "t2i", "sup_cls", "sub_cls", "itc"];

/// (name, value) of each present loss term, then ("loss", total), read back in one transfer.
pub fn loss_values<B: Backend>(l: &Losses<B>) -> Result<Vec<(&'static str, f64)>> {
    let parts = [&l.mlm, &l.itm, &l.t2i, &l.sup_cls, &l.sub_cls, &l.itc];
    let mut names = vec![];
    let mut ts = vec![];
    for (name, t) in TERMS.iter().zip(parts) {
        if let Some(t) = t {
            names.push(*name);
            ts.push(t.clone().detach());
        }
    }
    names.push("loss");
    ts.push(l.total.clone().detach());
    let v: Vec<f64> = Tensor::cat(ts, 0)
        .into_data()
        .convert::<f64>()
        .to_vec()
        .map_err(|e| anyhow!("reading the loss values back: {e:?}"))?;
    Ok(names.into_iter().zip(v).collect())
}

/// What every micro-batch of a step shares.
#[derive(Clone, Copy, Debug)]
pub struct StepSettings {
    pub heads: HeadSet,
    pub mode: Mode,
    pub precision: Precision,
    /// Micro-batches in the step: each loss is divided by it, so the step's gradient is the mean.
    pub micro_batches: usize,
    /// ITM negatives mined by the contrastive similarity (`itm_hard_negatives`); `None`: the
    /// loader's random ones.
    pub hard_negatives: Option<HardNegatives>,
}

/// What mining ITM negatives needs of the run's config.
#[derive(Clone, Copy, Debug)]
pub struct HardNegatives {
    pub seed: u64,
    pub mlm_on_negatives: bool,
}

/// One micro-batch of a step: where it is in the run, the batch, and the image it feeds.
pub struct MicroBatch {
    pub epoch: usize,
    /// Batch index within the epoch.
    pub index: usize,
    /// Index among all micro-batches of the run: seeds its dropout and stochastic depth, so the
    /// draws do not depend on which device or rank computes it.
    pub micro_step: usize,
    pub batch: Batch,
    pub image: ImageInput,
}

/// What one micro-batch gave.
pub struct MicroResult {
    /// Loss terms (name, value); a non-finite one means no gradients were computed.
    pub losses: Vec<(&'static str, f64)>,
    pub grads: GradientsParams,
}

/// Forward and backward of one micro-batch on `model` (on `device`).
pub fn micro_batch<B: Backend>(
    model: &Pvlt<Autodiff<B>>,
    mb: &MicroBatch,
    s: StepSettings,
    device: &B::Device,
) -> Result<MicroResult> {
    let mut db = to_device::<Autodiff<B>>(&mb.batch, mb.image, device);
    let step_model = autocast(model, s.precision);
    // ITC first: its similarities choose the ITM negatives when they are mined.
    let itc = s.heads.itc.then(|| itc_embeddings(&step_model, &db.targets, s.mode)).flatten();
    // (ITC embeddings exist only for batches that carry own captions and product ids.)
    if let (Some(h), Some((img, txt))) = (s.hard_negatives, &itc) {
        let (ids, labels) = mine(&step_model, mb, img, txt, h)?;
        db.ids = Tensor::from_data(TensorData::new(ids, [mb.batch.len(), mb.batch.text_len]), device);
        db.targets.mlm = MlmTargets::from_labels(&labels, device);
    }
    let out = step_model.forward_mlm_at(
        db.input.cast(s.precision.dtype()),
        db.ids,
        s.heads,
        s.mode,
        db.targets.mlm.rows.clone(),
    );
    let mut l = losses(&out, &db.targets, s.heads);
    if let (Some((img, txt)), Some(head), Some(t)) = (itc, &step_model.itc_head, &db.targets.itc) {
        l = l.with_itc(itc_loss(img, txt, head.scale().cast(FloatDType::F32), t.targets.clone()));
    }
    let values = loss_values(&l)?;
    if values.iter().any(|(_, v)| !v.is_finite()) {
        return Ok(MicroResult { losses: values, grads: GradientsParams::new() });
    }
    let total = if s.micro_batches > 1 { l.total.div_scalar(s.micro_batches as f64) } else { l.total };
    Ok(MicroResult { losses: values, grads: GradientsParams::from_grads(total.backward(), model) })
}

/// The micro-batch's token ids and MLM labels (`[B*T]` each), its ITM negatives' captions drawn by
/// the contrastive similarity of the batch's images `img` and captions `txt` (`[B, D]`, unit
/// length), read back to the host.
fn mine<B: Backend>(
    model: &Pvlt<Autodiff<B>>,
    mb: &MicroBatch,
    img: &Tensor<Autodiff<B>, 2>,
    txt: &Tensor<Autodiff<B>, 2>,
    h: HardNegatives,
) -> Result<(Vec<i64>, Vec<i64>)> {
    let batch = &mb.batch;
    let scale = model.itc_head.as_ref().map(|head| head.scale().cast(FloatDType::F32).detach());
    let mut sim = img.clone().detach().matmul(txt.clone().detach().transpose());
    if let Some(scale) = scale {
        sim = sim * scale.unsqueeze();
    }
    let sim: Vec<f32> =
        sim.into_data().convert::<f32>().to_vec().map_err(|e| anyhow!("reading the ITC similarities back: {e:?}"))?;
    let partners = hard_negatives::partners(
        &sim,
        &batch.itm_labels,
        &batch.product_ids,
        &batch.caption_ids,
        &mut hard_negatives::rng(h.seed, mb.epoch, mb.index),
    );
    let (mut ids, mut labels) = (batch.input_ids.clone(), batch.mlm_labels.clone());
    hard_negatives::swap_captions(&mut ids, &mut labels, batch.text_len, &partners, h.mlm_on_negatives);
    Ok((ids, labels))
}
