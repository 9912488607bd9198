//! Validation during training: eval-mode losses and the metrics a person watches.

use super::loss::{itc_embeddings, losses, mlm_positions};
use super::step::{to_device, ImageInput};
use crate::data::loader::Loader;
use crate::model::{HeadSet, Mode, Pvlt};
use anyhow::{anyhow, Result};
use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Tensor};
use serde_json::json;
use std::sync::Arc;

/// Correct predictions out of those counted.
#[derive(Default, Clone, Copy)]
struct Hits {
    ok: usize,
    n: usize,
}

impl Hits {
    /// Count `predicted` against `labels`, skipping negative labels (none / ignored).
    fn add(&mut self, predicted: &[i64], labels: &[i64]) {
        for (p, &y) in predicted.iter().zip(labels) {
            if y >= 0 {
                self.n += 1;
                self.ok += (*p == y) as usize;
            }
        }
    }

    fn rate(self) -> Option<f64> {
        (self.n > 0).then(|| self.ok as f64 / self.n as f64)
    }
}

/// What validation adds up over its batches.
#[derive(Default)]
struct Tally {
    loss: f64,
    batches: usize,
    rows: usize,
    mlm: Hits,
    /// MLM with each text paired with another product's image (see [`validate`]).
    mlm_other_image: Hits,
    itm: Hits,
    /// In-batch contrastive retrieval: the row's own caption (or its product's) ranked first.
    itc: Hits,
    sup: Hits,
    sub: Hits,
    /// Squared reconstruction error and the pixels it is over.
    squared_error: f64,
    /// The same for the grid-masked input itself: the baseline a reconstruction has to beat.
    squared_error_input: f64,
    pixels: usize,
}

impl Tally {
    fn report(&self, heads: HeadSet) -> serde_json::Value {
        let mut v = json!({ "loss": self.loss / self.batches as f64, "rows": self.rows });
        let o = v.as_object_mut().expect("a JSON object");
        let mut put = |k: &str, x: Option<f64>| {
            if let Some(x) = x {
                o.insert(k.into(), json!(x));
            }
        };
        put("mlm_acc", self.mlm.rate());
        put("mlm_acc_other_image", self.mlm_other_image.rate());
        // How much the right image helps MLM: the grounding signal (0 while the text ignores it).
        put("mlm_grounding", self.mlm.rate().zip(self.mlm_other_image.rate()).map(|(a, b)| a - b));
        put("itm_acc", heads.itm.then(|| self.itm.ok as f64 / self.rows as f64));
        let psnr = |se: f64| (self.pixels > 0).then(|| 10.0 * (1.0 / (se / self.pixels as f64)).log10());
        put("itc_acc", self.itc.rate());
        put("psnr", psnr(self.squared_error));
        put("psnr_input", psnr(self.squared_error_input));
        put("sup_acc", self.sup.rate());
        put("sub_acc", self.sub.rate());
        v
    }
}

/// Row-wise argmax of `[N, C]` logits.
fn argmax<B: Backend>(t: Tensor<B, 2>) -> Result<Vec<i64>> {
    t.argmax(1).into_data().convert::<i64>().to_vec().map_err(|e| anyhow!("reading predictions back: {e:?}"))
}

/// `[B, 1, C]` head output -> `[B, C]`.
fn squeeze_token<B: Backend>(t: Tensor<B, 3>) -> Tensor<B, 2> {
    let [b, _, c] = t.dims();
    t.reshape([b, c])
}

/// Validation in eval mode: mean loss, MLM accuracy on the corrupted positions, ITM accuracy,
/// reconstruction PSNR (input: the grid-masked image, target: the clean one), recognition accuracy.
pub fn validate<B: Backend>(
    model: &Pvlt<B>,
    loader: &Arc<Loader>,
    heads: HeadSet,
    max_batches: usize,
    device: &B::Device,
) -> Result<serde_json::Value> {
    let n = if max_batches == 0 { loader.batches_per_epoch() } else { max_batches.min(loader.batches_per_epoch()) };
    let mut t = Tally::default();
    for batch in loader.epoch(0, 0).take(n) {
        if batch.is_empty() {
            continue;
        }
        let db = to_device::<B>(&batch, ImageInput::Masked, device);
        let clean = db.targets.clean_images.clone();
        let rows = || db.targets.mlm.rows.clone();
        let (_, mlm_labels) = mlm_positions(&batch.mlm_labels);
        // The same texts with the images rotated by half a batch (validation rows come in product
        // order, so the partner is another product's): masked words predicted as well as with the
        // right image mean the text stream does not use the image (yet); ITM cannot learn before
        // it does.
        let nb = batch.len();
        if heads.mlm && nb > 1 {
            let k = nb / 2;
            let other = Tensor::cat(vec![db.input.clone().slice(k..nb), db.input.clone().slice(0..k)], 0);
            let out =
                model.forward_mlm_at(other, db.ids.clone(), HeadSet { mlm: true, ..HeadSet::NONE }, Mode::Eval, rows());
            if let Some(l) = out.mlm_logits_at {
                t.mlm_other_image.add(&argmax(l)?, &mlm_labels);
            }
        }
        if let Some((img, txt)) = heads.itc.then(|| itc_embeddings(model, &db.targets, Mode::Eval)).flatten() {
            // Right when the best-scoring caption belongs to the image's product.
            let best = argmax(img.matmul(txt.transpose()))?;
            t.itc.n += best.len();
            t.itc.ok += best
                .iter()
                .enumerate()
                .filter(|&(i, &j)| batch.product_ids[j as usize] == batch.product_ids[i])
                .count();
        }
        let input = db.input.clone();
        let out = model.forward_mlm_at(db.input, db.ids, heads, Mode::Eval, rows());
        let l = losses(&out, &db.targets, heads);
        t.loss += l.total.into_scalar().elem::<f64>();
        t.batches += 1;
        t.rows += batch.len();
        if let Some(l) = out.mlm_logits_at {
            t.mlm.add(&argmax(l)?, &mlm_labels);
        }
        if let Some(l) = out.itm_logits {
            t.itm.add(&argmax(squeeze_token(l))?, &batch.itm_labels);
        }
        if let Some(l) = out.sup_cls_logits {
            t.sup.add(&argmax(squeeze_token(l))?, &batch.sup_labels);
        }
        if let Some(l) = out.sub_cls_logits {
            t.sub.add(&argmax(squeeze_token(l))?, &batch.sub_labels);
        }
        if let Some(rec) = out.t2i_logits {
            // PSNR of the image a person would see: the head's raw output clamped to [0, 1].
            t.squared_error_input += input.sub(clean.clone()).powf_scalar(2.0).sum().into_scalar().elem::<f64>();
            t.squared_error += rec.clamp(0.0, 1.0).sub(clean).powf_scalar(2.0).sum().into_scalar().elem::<f64>();
            t.pixels += batch.images.len();
        }
    }
    if t.batches == 0 {
        return Err(anyhow!("validation: no readable batch"));
    }
    Ok(t.report(heads))
}
