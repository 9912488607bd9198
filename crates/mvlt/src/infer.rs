//! Inference for other programs: load trained weights once, then score image-text pairs, classify
//! products and search a catalogue.
//!
//! ```no_run
//! use mvlt::infer::{LoadOptions, Model};
//! use mvlt::data::image::Pixels;
//! # fn main() -> anyhow::Result<()> {
//! let model = Model::<mvlt::device::Cpu>::load("runs/pretrain/final/model.safetensors".as_ref(), &LoadOptions::default(), &Default::default())?;
//! let image = Pixels::open("shoe.png".as_ref())?;
//! let p = model.score(&image, "white leather sneakers")?; // match probability in [0, 1]
//! println!("{p:.3}");
//! # Ok(()) }
//! ```
//!
//! Images are preprocessed exactly as in training (the reference's crop, resize, [0, 1]); texts are
//! tokenised with the model's vocabulary.

use crate::data::dataset::{vocab_beside_weights, ClassMap};
use crate::data::image::{preprocess_floats, Pixels};
use crate::data::text::TextProcessor;
use crate::model::weights::{load_state_dict, resolve_config, StateDict};
use crate::model::{HeadSet, Pvlt, PvltConfig};
use anyhow::{bail, Context, Result};
use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Architecture, when the weights do not carry it (a preset or a config file).
    pub config: Option<String>,
    /// Vocabulary; default: vocab.txt beside the weights.
    pub vocab: Option<PathBuf>,
    /// Class names (our classes.json or the authors' class_names.json); default: beside the weights.
    pub classes: Option<PathBuf>,
    /// Image side the model is run at (default: the training size stored with the weights, else 256).
    pub image_size: Option<usize>,
    pub non_strict: bool,
}

pub struct Model<B: Backend> {
    pub net: Pvlt<B>,
    pub config: PvltConfig,
    pub text: std::sync::Arc<TextProcessor>,
    pub classes: Option<ClassMap>,
    pub image_size: usize,
    pub device: B::Device,
}

pub const NO_ITC_HEAD: &str = "these weights have no contrastive (ITC) head: pre-train with --with-itc \
(the demo's recipe does) to get image and text embeddings";

/// `[N, D]` -> N rows.
fn rows_of<B: Backend>(e: Tensor<B, 2>) -> Result<Vec<Vec<f32>>> {
    let d = e.dims()[1];
    Ok(output_values(e)?.chunks(d.max(1)).map(|r| r.to_vec()).collect())
}

/// Top-k classes with probabilities, by name.
#[derive(Clone, Debug, Serialize)]
pub struct Classification {
    pub main: Vec<(String, f32)>,
    pub sub: Vec<(String, f32)>,
}

/// Read class names: our `classes.json` ({"main": [..], "sub": [..]}) or the authors'
/// `class_names.json` ({"categories": [..], "subcategories": [..]}).
pub fn read_classes(path: &Path) -> Result<ClassMap> {
    let text = crate::files::read_text_limited(path, "class names file", crate::files::MAX_SMALL_FILE_BYTES)?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let list = |a: &str, b: &str| -> Result<Vec<String>> {
        let arr = v
            .get(a)
            .or_else(|| v.get(b))
            .with_context(|| format!("{}: expected '{a}' (or '{b}') lists of class names", path.display()))?;
        serde_json::from_value(arr.clone())
            .with_context(|| format!("{}: '{a}' must be a list of strings", path.display()))
    };
    Ok(ClassMap { main: list("main", "categories")?, sub: list("sub", "subcategories")? })
}

impl<B: Backend> Model<B> {
    pub fn load(weights: &Path, o: &LoadOptions, device: &B::Device) -> Result<Self> {
        let sd = StateDict::read(weights)?;
        let config = resolve_config(o.config.as_deref(), Some(&sd))?;
        let (net, report) = load_state_dict(Pvlt::<B>::new(&config, device), &sd, !o.non_strict)?;
        if o.non_strict {
            tracing::info!("{}: {}", weights.display(), report.summary());
        }
        let vocab = match &o.vocab {
            Some(v) => v.clone(),
            None => vocab_beside_weights(weights)
                .with_context(|| format!("no --vocab given and no vocab.txt beside {}", weights.display()))?,
        };
        let text = std::sync::Arc::new(TextProcessor::from_vocab_file(&vocab)?);
        if text.vocab_size != config.vocab_size {
            bail!(
                "wrong vocabulary: {} has {} entries but the model has {} word embeddings",
                vocab.display(),
                text.vocab_size,
                config.vocab_size
            );
        }
        let classes_path =
            o.classes.clone().or_else(|| weights.parent().map(|d| d.join("classes.json")).filter(|p| p.exists()));
        let classes = classes_path.map(|p| read_classes(&p)).transpose()?;
        if let (Some(c), true) = (&classes, config.heads.cls) {
            if c.main.len() != config.num_sup_classes || c.sub.len() != config.num_sub_classes {
                bail!(
                    "the class names list {} main / {} sub classes but the model has {} / {}",
                    c.main.len(),
                    c.sub.len(),
                    config.num_sup_classes,
                    config.num_sub_classes
                );
            }
        }
        let image_size = match o.image_size {
            Some(s) => s,
            None => input_size(&config, weights),
        };
        config.check_image_size(image_size, image_size)?;
        Ok(Model { net, config, text, classes, image_size, device: device.clone() })
    }

    /// Preprocess an image as in training: `[3, S, S]` floats in [0, 1].
    pub fn prepare_image(&self, p: &Pixels) -> Result<Vec<f32>> {
        Ok(preprocess_floats(p, self.image_size)?.0)
    }

    pub fn prepare_text(&self, text: &str) -> Result<Vec<i64>> {
        if text.trim().is_empty() {
            bail!("the text is empty");
        }
        Ok(self.text.encode(text, self.config.num_text_tokens)?.input_ids)
    }

    /// `[N, 3, S, S]` images and `[M, T]` ids (either list may be empty).
    fn tensors(&self, images: &[&[f32]], ids: &[&[i64]]) -> (Tensor<B, 4>, Tensor<B, 2, Int>) {
        let (s, t) = (self.image_size, self.config.num_text_tokens);
        let img: Vec<f32> = images.iter().flat_map(|x| x.iter().copied()).collect();
        let tok: Vec<i64> = ids.iter().flat_map(|x| x.iter().copied()).collect();
        (
            Tensor::from_data(TensorData::new(img, [images.len(), 3, s, s]), &self.device),
            Tensor::from_data(TensorData::new(tok, [ids.len(), t]), &self.device),
        )
    }

    /// One eval-mode forward pass of (image, text) pairs through `heads`, which the weights must
    /// have; `None` for no pairs.
    fn run_heads(
        &self,
        images: &[&[f32]],
        ids: &[&[i64]],
        heads: HeadSet,
    ) -> Result<Option<crate::model::PvltOutput<B>>> {
        if let Some(why) = missing_head(self.config.heads, heads) {
            bail!(why);
        }
        if images.is_empty() {
            return Ok(None);
        }
        let (img, tok) = self.tensors(images, ids);
        Ok(Some(self.net.forward(img, tok, heads, crate::model::Mode::Eval)))
    }

    /// ITM match probability of each (image, text) pair; one forward pass for all of them.
    pub fn match_probs(&self, images: &[&[f32]], ids: &[&[i64]]) -> Result<Vec<f32>> {
        let Some(out) = self.run_heads(images, ids, HeadSet { itm: true, ..HeadSet::NONE })? else {
            return Ok(vec![]);
        };
        let logits = out.itm_logits.context("the ITM head gave no output")?;
        let [n, _, _] = logits.dims();
        let p = softmax(logits.reshape([n, 2]), 1).slice([0..n, 1..2]).reshape([n]);
        output_values(p)
    }

    /// Contrastive (ITC) embeddings of preprocessed images, one unit-length row each; the weights
    /// must have the ITC head (`pretrain --with-itc`).
    pub fn image_embeddings(&self, images: &[&[f32]]) -> Result<Vec<Vec<f32>>> {
        if images.is_empty() {
            return Ok(vec![]);
        }
        let (img, _) = self.tensors(images, &[]);
        let e = self
            .net
            .embed_images(img, crate::model::Mode::Eval, self.text.cls_id, self.text.sep_id)
            .context(NO_ITC_HEAD)?;
        rows_of(e)
    }

    /// Contrastive (ITC) embeddings of token-id rows (`prepare_text`).
    pub fn text_embeddings(&self, ids: &[&[i64]]) -> Result<Vec<Vec<f32>>> {
        if ids.is_empty() {
            return Ok(vec![]);
        }
        let (_, tok) = self.tensors(&[], ids);
        let e = self.net.embed_texts(tok, crate::model::Mode::Eval).context(NO_ITC_HEAD)?;
        rows_of(e)
    }

    /// [`text_embeddings`](Self::text_embeddings) of texts, tokenised as the model reads them.
    pub fn caption_embeddings(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let ids: Vec<Vec<i64>> = texts.iter().map(|t| self.prepare_text(t)).collect::<Result<_>>()?;
        self.text_embeddings(&ids.iter().map(|v| v.as_slice()).collect::<Vec<_>>())
    }

    pub fn score(&self, image: &Pixels, text: &str) -> Result<f32> {
        let img = self.prepare_image(image)?;
        let ids = self.prepare_text(text)?;
        self.match_probs(&[&img], &[&ids])?.pop().context("the model gave no score")
    }

    /// Main and sub category probabilities (top `k` of each). The recognition heads read the text
    /// too (the reference feeds the caption); without one, an empty text ([CLS] [SEP]) is used.
    pub fn classify(&self, image: &Pixels, text: Option<&str>, k: usize) -> Result<Classification> {
        let img = self.prepare_image(image)?;
        let ids = match text {
            Some(t) => self.prepare_text(t)?,
            None => self.text.encode("", self.config.num_text_tokens)?.input_ids,
        };
        let (main, sub) = self.class_probs(&[&img], &[&ids])?.pop().context("the model gave no class probabilities")?;
        let names = self.classes.as_ref();
        Ok(Classification { main: top_k(&main, names.map(|c| &c.main), k), sub: top_k(&sub, names.map(|c| &c.sub), k) })
    }
}

/// What to tell a user whose weights (with heads `present`) lack one of the inference heads in
/// `wanted`, naming the weights that have it; `None` when nothing is missing.
pub fn missing_head(present: HeadSet, wanted: HeadSet) -> Option<&'static str> {
    if wanted.itm && !present.itm {
        return Some(
            "these weights have no image-text matching head (itm_head): use pre-training weights \
             (mvlt pretrain's final/model.safetensors)",
        );
    }
    if wanted.cls && !present.cls {
        return Some(
            "these weights have no recognition heads (sup_cls_head, sub_cls_head): use fine-tuned weights \
             (mvlt finetune's final/model.safetensors)",
        );
    }
    None
}

/// A model output's values as f32, or an error saying it could not be read (never an empty vector
/// that a caller would index into).
fn output_values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Result<Vec<f32>> {
    t.into_data().convert::<f32>().to_vec::<f32>().map_err(|e| anyhow::anyhow!("reading the model's output: {e:?}"))
}

/// The reference's input side (MVLT-SPEC: images resized to 256 x 256).
pub const REFERENCE_INPUT_SIZE: usize = 256;

/// The image side weights expect: the one training recorded (`PvltConfig::input_size`). Files
/// without it get a documented default, said once: the authors' checkpoints (positional tables
/// for the released 224) the reference's 256; mvlt files from before it was recorded the size of
/// their positional tables, which training then set to its image size.
pub fn input_size(config: &PvltConfig, weights: &Path) -> usize {
    if let Some(s) = config.input_size {
        return s;
    }
    let (size, why) = if config.img_size == 224 {
        (REFERENCE_INPUT_SIZE, "the reference's input size")
    } else {
        (config.img_size, "the size of its positional tables, as mvlt's training set them")
    };
    tracing::warn!(
        "{} does not record the image size it was trained on: using {size} px, {why} (--image-size overrides)",
        weights.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    );
    size
}

/// The `k` most probable classes, by name (`class N` when names are unknown).
pub fn top_k(p: &[f32], names: Option<&Vec<String>>, k: usize) -> Vec<(String, f32)> {
    let mut idx: Vec<usize> = (0..p.len()).collect();
    idx.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
    idx.into_iter()
        .take(k)
        .map(|i| (names.and_then(|n| n.get(i).cloned()).unwrap_or_else(|| format!("class {i}")), p[i]))
        .collect()
}

impl<B: Backend> Model<B> {
    /// Main and sub category probabilities of each (image, text) pair.
    pub fn class_probs(&self, images: &[&[f32]], ids: &[&[i64]]) -> Result<Vec<(Vec<f32>, Vec<f32>)>> {
        let Some(out) = self.run_heads(images, ids, HeadSet { cls: true, ..HeadSet::NONE })? else {
            return Ok(vec![]);
        };
        let rows = |logits: Tensor<B, 3>| -> Result<Vec<Vec<f32>>> {
            let [n, _, c] = logits.dims();
            let p = output_values(softmax(logits.reshape([n, c]), 1))?;
            Ok(p.chunks(c.max(1)).map(|r| r.to_vec()).collect())
        };
        let main = rows(out.sup_cls_logits.context("the recognition heads gave no main-category output")?)?;
        let sub = rows(out.sub_cls_logits.context("the recognition heads gave no sub-category output")?)?;
        Ok(main.into_iter().zip(sub).collect())
    }

    /// Argmax main and sub category of each (image, text) pair.
    pub fn recognize(&self, images: &[&[f32]], ids: &[&[i64]]) -> Result<Vec<(usize, usize)>> {
        let Some(out) = self.run_heads(images, ids, HeadSet { cls: true, ..HeadSet::NONE })? else {
            return Ok(vec![]);
        };
        let arg = |t: Tensor<B, 3>| -> Result<Vec<usize>> {
            let v = t
                .argmax(2)
                .into_data()
                .convert::<i64>()
                .to_vec::<i64>()
                .map_err(|e| anyhow::anyhow!("reading the model's output: {e:?}"))?;
            Ok(v.into_iter().map(|x| x as usize).collect())
        };
        let main = arg(out.sup_cls_logits.context("the recognition heads gave no main-category output")?)?;
        let sub = arg(out.sub_cls_logits.context("the recognition heads gave no sub-category output")?)?;
        Ok(main.into_iter().zip(sub).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_size_is_read_back_and_old_files_get_the_documented_default() {
        let w = Path::new("model.safetensors");
        // Recorded by training: used as is, whatever the positional tables were built for.
        let fine_tuned = PvltConfig { img_size: 224, input_size: Some(64), ..PvltConfig::tiny() };
        assert_eq!(input_size(&fine_tuned, w), 64);
        // The authors' checkpoints: the reference's 256.
        assert_eq!(input_size(&PvltConfig::tiny(), w), REFERENCE_INPUT_SIZE);
        // mvlt files from before it was recorded: their tables' size.
        assert_eq!(input_size(&PvltConfig { img_size: 64, ..PvltConfig::micro() }, w), 64);
    }
}
