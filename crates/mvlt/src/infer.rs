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
        let image_size = o.image_size.unwrap_or(if config.img_size % 32 == 0 && config.img_size != 224 {
            config.img_size
        } else {
            256
        });
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

/// The `k` most probable classes, by name (`class N` when names are unknown).
pub fn top_k(p: &[f32], names: Option<&Vec<String>>, k: usize) -> Vec<(String, f32)> {
    let mut idx: Vec<usize> = (0..p.len()).collect();
    idx.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
    idx.into_iter()
        .take(k)
        .map(|i| (names.and_then(|n| n.get(i).cloned()).unwrap_or_else(|| format!("class {i}")), p[i]))
        .collect()
}

/// Candidates ranked by ITM, best first, and those left out because their image could not be
/// read (row, why).
pub struct Ranked {
    pub scores: Vec<(usize, f32)>,
    pub unreadable: Vec<(usize, String)>,
}

/// A search's hits, best first, and the catalogue rows it could not read (row, why).
pub struct Searched {
    pub hits: Vec<Hit>,
    pub unreadable: Vec<(usize, String)>,
}

/// A note naming what a command left out: how many of `what`, and the first few with why.
pub fn unreadable_note(
    ds: &dyn crate::data::dataset::Dataset,
    unreadable: &[(usize, String)],
    what: &str,
) -> Option<String> {
    if unreadable.is_empty() {
        return None;
    }
    let recs = ds.records();
    let shown: Vec<String> = unreadable
        .iter()
        .take(3)
        .map(|(r, why)| format!("'{}' ({})", crate::files::printable(&recs[*r].id), crate::files::printable(why)))
        .collect();
    Some(format!(
        "note: {} {what} could not be read and were left out: {}{}",
        unreadable.len(),
        shown.join("; "),
        if unreadable.len() > 3 { ", ..." } else { "" }
    ))
}

/// One search result.
#[derive(Clone, Debug, Serialize)]
pub struct Hit {
    /// Dataset row.
    pub row: usize,
    pub id: String,
    pub product_id: String,
    pub caption: String,
    pub category: String,
    pub subcategory: String,
    /// ITM match probability.
    pub score: f32,
    /// Contrastive similarity, when a first stage picked the hit (`search --index`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub similarity: Option<f32>,
}

pub enum SearchQuery<'a> {
    /// Text -> products: the text against every candidate image.
    Text(&'a str),
    /// Image -> captions: the image against every distinct candidate caption.
    Image(&'a Pixels),
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

    /// Score catalogue `rows` against a query, `batch` pairs per forward pass; best first. The
    /// candidates' other halves come from the closure (images decoded from disk for the CLI, a
    /// preprocessed cache in the server); `progress` is told each batch's size, and an error from it
    /// stops the ranking there (the server's way to drop work nobody waits for).
    pub fn rank_candidates(
        &self,
        rows: &[usize],
        query: Candidates<'_>,
        batch: usize,
        progress: impl Fn(usize) -> Result<()>,
    ) -> Result<Ranked> {
        use rayon::prelude::*;
        let mut out = Ranked { scores: Vec::with_capacity(rows.len()), unreadable: vec![] };
        for chunk in rows.chunks(batch.max(1)) {
            match &query {
                Candidates::Images { text, image_of } => {
                    // A candidate whose image cannot be read is left out and reported, not fatal:
                    // one corrupt file must not stop a search of the whole catalogue.
                    let imgs: Vec<Result<Vec<f32>>> = chunk.par_iter().map(|&r| image_of(r)).collect();
                    let mut kept = vec![];
                    for (&r, img) in chunk.iter().zip(imgs) {
                        match img {
                            Ok(v) => kept.push((r, v)),
                            Err(e) => out.unreadable.push((r, format!("{e:#}"))),
                        }
                    }
                    let tok: Vec<&[i64]> = kept.iter().map(|_| *text).collect();
                    let scores = self.match_probs(&kept.iter().map(|(_, v)| v.as_slice()).collect::<Vec<_>>(), &tok)?;
                    out.scores.extend(kept.iter().map(|(r, _)| *r).zip(scores));
                }
                Candidates::Captions { image, ids_of } => {
                    let ids: Vec<Vec<i64>> = chunk.iter().map(|&r| ids_of(r)).collect::<Result<_>>()?;
                    let imgs: Vec<&[f32]> = chunk.iter().map(|_| *image).collect();
                    let scores = self.match_probs(&imgs, &ids.iter().map(|v| v.as_slice()).collect::<Vec<_>>())?;
                    out.scores.extend(chunk.iter().copied().zip(scores));
                }
            }
            progress(chunk.len())?;
        }
        out.scores.sort_by(|a, b| b.1.total_cmp(&a.1));
        Ok(out)
    }

    /// Exhaustive ITM scoring of `rows` of a catalogue against the query; best first.
    pub fn search(
        &self,
        ds: &dyn crate::data::dataset::Dataset,
        rows: &[usize],
        query: SearchQuery,
        batch: usize,
        progress: impl Fn(usize),
    ) -> Result<Searched> {
        let recs = ds.records();
        let progress = |k: usize| -> Result<()> {
            progress(k);
            Ok(())
        };
        let ranked = match query {
            SearchQuery::Text(text) => {
                let ids = self.prepare_text(text)?;
                let image_of = |r: usize| ds.pixels(r).and_then(|p| self.prepare_image(&p));
                self.rank_candidates(rows, Candidates::Images { text: &ids, image_of: &image_of }, batch, progress)?
            }
            SearchQuery::Image(image) => {
                let img = self.prepare_image(image)?;
                let ids_of = |r: usize| self.prepare_text(&recs[r].caption);
                self.rank_candidates(
                    &distinct_captions(ds, rows),
                    Candidates::Captions { image: &img, ids_of: &ids_of },
                    batch,
                    progress,
                )?
            }
        };
        let hits = ranked
            .scores
            .into_iter()
            .map(|(row, score)| {
                let r = &recs[row];
                Hit {
                    row,
                    id: r.id.clone(),
                    product_id: r.product_id.clone(),
                    caption: r.caption.clone(),
                    category: r.category.clone(),
                    subcategory: r.subcategory.clone(),
                    score,
                    similarity: None,
                }
            })
            .collect();
        Ok(Searched { hits, unreadable: ranked.unreadable })
    }
}

/// What a search scores its fixed query against.
pub enum Candidates<'a> {
    /// One text against each row's image.
    Images { text: &'a [i64], image_of: &'a (dyn Fn(usize) -> Result<Vec<f32>> + Sync) },
    /// One image against each row's caption ids.
    Captions { image: &'a [f32], ids_of: &'a dyn Fn(usize) -> Result<Vec<i64>> },
}

/// The first row of each distinct caption among `rows` (views of a product share their caption):
/// the candidates of an image -> captions search.
pub fn distinct_captions(ds: &dyn crate::data::dataset::Dataset, rows: &[usize]) -> Vec<usize> {
    let recs = ds.records();
    let mut seen = std::collections::HashSet::new();
    rows.iter().copied().filter(|&r| seen.insert(recs[r].caption.as_str())).collect()
}

/// Catalogue rows passing the filters (case-insensitive), at most `max` of them, in catalogue order.
pub fn filter_rows(
    ds: &dyn crate::data::dataset::Dataset,
    category: Option<&str>,
    subcategory: Option<&str>,
    max: Option<usize>,
) -> Vec<usize> {
    let eq = |a: &str, b: Option<&str>| b.is_none_or(|b| a.eq_ignore_ascii_case(b));
    ds.records()
        .iter()
        .enumerate()
        .filter(|(_, r)| eq(&r.category, category) && eq(&r.subcategory, subcategory))
        .map(|(i, _)| i)
        .take(max.unwrap_or(usize::MAX))
        .collect()
}
