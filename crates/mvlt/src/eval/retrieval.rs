//! Retrieval evaluation as the paper does it: each query against its candidate list, ranked by the
//! ITM match probability.
//!
//! Candidate lists come from the authors' `retrieve_ITR` / `retrieve_TIR` folders (one pickled dict
//! per query, candidates in insertion order, the first the positive) or are generated from any
//! dataset and saved as JSON lines (one query per line:
//! `{"query": 0, "candidates": [{"image": ID, "caption": "...", "product_id": "..."}, ...]}`, first
//! candidate positive), so a result can be reproduced and shared.

use super::metrics::{rank_of_positive, recall_at};
use crate::data::dataset::Dataset;
use crate::data::image::Pixels;
use crate::infer::Model;
use crate::search::index::{dot, CatalogIndex};
use anyhow::{bail, Context, Result};
use burn::tensor::backend::Backend;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Text to image: one caption against candidate images.
    Tir,
    /// Image to text: one image against candidate captions.
    Itr,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    /// Image file name (authors' lists) or dataset row id (generated lists).
    pub image: String,
    pub caption: String,
    pub product_id: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Query {
    pub query: usize,
    pub candidates: Vec<Candidate>,
}

/// Read the authors' folder of pickled queries, in file-name order, keeping dict order.
pub fn read_authors_lists(dir: &Path) -> Result<Vec<Query>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read list folder {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "pkl"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{} holds no .pkl query files", dir.display());
    }
    files
        .iter()
        .enumerate()
        .map(|(q, f)| {
            let bytes = crate::files::read_limited(f, "query list", crate::files::MAX_SMALL_FILE_BYTES)?;
            // serde_json's map keeps insertion order (feature preserve_order), and the pickle's
            // dict items come in pickle order: the first candidate stays first.
            let v = crate::pickle::read_json(&bytes, 100_000)
                .with_context(|| format!("{} is not a readable pickle", f.display()))?;
            let map = v.as_object().with_context(|| format!("{}: expected a dict of candidates", f.display()))?;
            let candidates = map
                .iter()
                .map(|(k, c)| {
                    let s = |name: &str| -> Result<String> {
                        match c.get(name) {
                            Some(serde_json::Value::String(s)) => Ok(s.clone()),
                            Some(serde_json::Value::Number(n)) => Ok(n.to_string()),
                            _ => bail!("{}: candidate '{k}' has no string '{name}'", f.display()),
                        }
                    };
                    Ok(Candidate { image: s("img_name")?, caption: s("captions")?, product_id: s("product_id")? })
                })
                .collect::<Result<Vec<_>>>()?;
            if candidates.len() < 2 {
                bail!(
                    "{}: a query needs a positive and at least one negative, found {} candidates",
                    f.display(),
                    candidates.len()
                );
            }
            Ok(Query { query: q, candidates })
        })
        .collect()
}

pub fn read_jsonl_lists(path: &Path) -> Result<Vec<Query>> {
    let text = crate::files::read_text_limited(path, "query lists", crate::files::MAX_VOCAB_FILE_BYTES)?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| format!("{} line {}: not a query object", path.display(), i + 1))
        })
        .collect()
}

/// Negatives for generated lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Negatives {
    /// Any other product.
    Random,
    /// Other products of the positive's sub-category first (harder), then random ones.
    SameSubcategory,
}

/// Draw `queries` queries of `candidates` candidates each from the dataset rows `rows` (seeded;
/// queries and negatives both come from those rows, e.g. the validation products). A negative
/// never shares the positive's product.
pub fn generate(
    ds: &dyn Dataset,
    rows: &[usize],
    queries: usize,
    candidates: usize,
    negatives: Negatives,
    seed: u64,
) -> Result<Vec<Query>> {
    let recs = ds.records();
    let products = crate::data::dataset::count_products(recs, rows);
    if products < candidates {
        bail!(
            "{} has {products} products in the rows evaluated, fewer than the {candidates} candidates asked for",
            ds.source()
        );
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut rows: Vec<usize> = rows.to_vec();
    rows.shuffle(&mut rng);
    let cand = |i: usize| Candidate {
        image: recs[i].id.clone(),
        caption: recs[i].caption.clone(),
        product_id: recs[i].product_id.clone(),
    };
    // Sub-category -> rows, in the shuffled order, for same-sub-category negatives.
    let mut by_sub: HashMap<&str, Vec<usize>> = HashMap::new();
    for &i in &rows {
        by_sub.entry(recs[i].subcategory.as_str()).or_default().push(i);
    }
    let mut out = vec![];
    for (q, &pos) in rows.iter().take(queries).enumerate() {
        let p = &recs[pos];
        let mut used = std::collections::HashSet::from([p.product_id.as_str()]);
        // A negative with the positive's very caption (a shop's shared title: "Lucera Women
        // Silver Earrings" names 73 products) is as right as the positive, so none is drawn.
        let other_caption = |i: usize| recs[i].caption != p.caption;
        let mut list = vec![cand(pos)];
        if negatives == Negatives::SameSubcategory {
            let mut same: Vec<usize> = by_sub[p.subcategory.as_str()].clone();
            same.shuffle(&mut rng);
            for i in same {
                if list.len() == candidates {
                    break;
                }
                if other_caption(i) && used.insert(recs[i].product_id.as_str()) {
                    list.push(cand(i));
                }
            }
        }
        // Bounded: a catalogue whose products nearly all share the positive's caption cannot fill
        // the list, which is said rather than looped on.
        let mut draws = 0usize;
        while list.len() < candidates {
            draws += 1;
            if draws > 1000 * candidates + rows.len() {
                bail!(
                    "{}: cannot draw {candidates} candidates for '{}': too few products with another caption",
                    ds.source(),
                    crate::files::printable(&p.id)
                );
            }
            let &i = rows.choose(&mut rng).expect("non-empty");
            if other_caption(i) && used.insert(recs[i].product_id.as_str()) {
                list.push(cand(i));
            }
        }
        out.push(Query { query: q, candidates: list });
    }
    if out.len() < queries {
        tracing::warn!(
            "{} has {} rows to query; generated {} queries, not {queries}",
            ds.source(),
            rows.len(),
            out.len()
        );
    }
    Ok(out)
}

pub fn write_jsonl(path: &Path, queries: &[Query]) -> Result<()> {
    let text: String = queries.iter().map(|q| serde_json::to_string(q).map(|s| s + "\n")).collect::<Result<_, _>>()?;
    crate::files::write_atomic(path, text.as_bytes())
}

/// Where candidate images come from: files in a folder (authors' lists) or dataset rows by id.
pub enum ImageSource<'a> {
    Folder(PathBuf),
    Dataset(&'a dyn Dataset, HashMap<String, usize>),
}

impl ImageSource<'_> {
    pub fn pixels(&self, name: &str) -> Result<Pixels> {
        match self {
            ImageSource::Folder(dir) => Pixels::open(&dir.join(name)),
            ImageSource::Dataset(ds, by_id) => {
                let i = by_id.get(name).with_context(|| format!("image id '{name}' is not in {}", ds.source()))?;
                ds.pixels(*i)
            }
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct RetrievalResult {
    pub direction: Direction,
    pub queries: usize,
    #[serde(rename = "r@1")]
    pub r1: f64,
    #[serde(rename = "r@5")]
    pub r5: f64,
    #[serde(rename = "r@10")]
    pub r10: f64,
    /// Rank of the positive per query, 0-based, in list order.
    pub ranks: Vec<usize>,
}

impl RetrievalResult {
    pub fn from_ranks(direction: Direction, ranks: Vec<usize>) -> Self {
        RetrievalResult {
            direction,
            queries: ranks.len(),
            r1: recall_at(&ranks, 1),
            r5: recall_at(&ranks, 5),
            r10: recall_at(&ranks, 10),
            ranks,
        }
    }
}

/// ITM match probabilities of a query (`q.candidates[0]`'s caption or image) against the
/// candidates at `which`, in batches of `batch`, in `which` order.
fn itm_scores<B: Backend>(
    model: &Model<B>,
    q: &Query,
    which: &[usize],
    direction: Direction,
    images: &ImageSource,
    batch: usize,
) -> Result<Vec<f32>> {
    let prep = |name: &str| -> Result<Vec<f32>> {
        model.prepare_image(&images.pixels(name).with_context(|| format!("candidate image {name}"))?)
    };
    let first = &q.candidates[0];
    let mut scores = Vec::with_capacity(which.len());
    match direction {
        Direction::Itr => {
            let img = prep(&first.image)?;
            for chunk in which.chunks(batch.max(1)) {
                let ids: Vec<Vec<i64>> =
                    chunk.iter().map(|&i| model.prepare_text(&q.candidates[i].caption)).collect::<Result<_>>()?;
                let imgs: Vec<&[f32]> = chunk.iter().map(|_| img.as_slice()).collect();
                scores.extend(model.match_probs(&imgs, &ids.iter().map(|v| v.as_slice()).collect::<Vec<_>>())?);
            }
        }
        Direction::Tir => {
            let ids = model.prepare_text(&first.caption)?;
            for chunk in which.chunks(batch.max(1)) {
                let imgs: Vec<Vec<f32>> =
                    chunk.par_iter().map(|&i| prep(&q.candidates[i].image)).collect::<Result<_>>()?;
                let tok: Vec<&[i64]> = chunk.iter().map(|_| ids.as_slice()).collect();
                scores.extend(model.match_probs(&imgs.iter().map(|v| v.as_slice()).collect::<Vec<_>>(), &tok)?);
            }
        }
    }
    Ok(scores)
}

/// Score every query's candidates (in batches of `batch`) and rank the positive.
pub fn evaluate<B: Backend>(
    model: &Model<B>,
    queries: &[Query],
    direction: Direction,
    images: &ImageSource,
    batch: usize,
    progress: impl Fn(),
) -> Result<RetrievalResult> {
    let mut ranks = Vec::with_capacity(queries.len());
    for q in queries {
        let all: Vec<usize> = (0..q.candidates.len()).collect();
        ranks.push(rank_of_positive(&itm_scores(model, q, &all, direction, images, batch)?));
        progress();
    }
    Ok(RetrievalResult::from_ranks(direction, ranks))
}

/// Retrieval through the contrastive embeddings (issue: a first stage before ITM): every distinct
/// candidate image and caption is embedded once, each query's candidates ranked by cosine
/// similarity, then the first stage's top `k` re-ranked by ITM (the rest keep their order after them).
#[derive(Clone, Debug, Serialize)]
pub struct TwoStageResult {
    /// Ranking by the embeddings alone.
    pub first_stage: RetrievalResult,
    /// Share of queries whose positive is in the first stage's top `k`.
    pub first_stage_recall_at_k: f64,
    pub k: usize,
    /// The first stage's recall at 50 (the default k of search and serve).
    #[serde(rename = "first_stage_recall@50")]
    pub first_stage_recall_at_50: f64,
    /// Whether the image embeddings were read from an index (`mvlt index`) rather than computed.
    pub from_index: bool,
    /// The top `k` re-ranked by ITM.
    pub two_stage: RetrievalResult,
    /// The top `k` re-ranked by ITM probability plus similarity (BLIP's retrieval practice).
    pub itm_plus_similarity: RetrievalResult,
}

/// How the first stage runs: its `k`, and where image embeddings come from (an index built with
/// the same weights, whose ids are the lists' image names; else computed here).
#[derive(Clone, Copy)]
pub struct FirstStage<'a> {
    pub k: usize,
    pub index: Option<&'a CatalogIndex>,
}

pub fn evaluate_two_stage<B: Backend>(
    model: &Model<B>,
    queries: &[Query],
    direction: Direction,
    images: &ImageSource,
    batch: usize,
    first_stage: FirstStage,
    progress: impl Fn(),
) -> Result<TwoStageResult> {
    let batch = batch.max(1);
    let k = first_stage.k;
    // Embed each distinct image and caption once.
    let mut image_names: Vec<&str> =
        queries.iter().flat_map(|q| q.candidates.iter().map(|c| c.image.as_str())).collect();
    let mut captions: Vec<&str> =
        queries.iter().flat_map(|q| q.candidates.iter().map(|c| c.caption.as_str())).collect();
    image_names.sort_unstable();
    image_names.dedup();
    captions.sort_unstable();
    captions.dedup();
    let (need_images, need_captions) = match direction {
        Direction::Tir => (image_names, queries.iter().map(|q| q.candidates[0].caption.as_str()).collect::<Vec<_>>()),
        Direction::Itr => (queries.iter().map(|q| q.candidates[0].image.as_str()).collect(), captions),
    };
    let mut image_emb: HashMap<&str, Vec<f32>> = HashMap::new();
    if let Some(index) = first_stage.index {
        let row = index.rows_by_id();
        for n in need_images.iter().copied() {
            let r = *row.get(n).with_context(|| format!("image '{n}' of the lists is not in the index"))?;
            image_emb.insert(n, index.row(r).to_vec());
        }
    }
    let need_images: Vec<&str> = need_images.into_iter().filter(|n| !image_emb.contains_key(n)).collect();
    for chunk in need_images.chunks(batch) {
        let px: Vec<Vec<f32>> = chunk
            .par_iter()
            .map(|n| model.prepare_image(&images.pixels(n).with_context(|| format!("candidate image {n}"))?))
            .collect::<Result<_>>()?;
        let e = model.image_embeddings(&px.iter().map(|v| v.as_slice()).collect::<Vec<_>>())?;
        image_emb.extend(chunk.iter().copied().zip(e));
    }
    let mut text_emb: HashMap<&str, Vec<f32>> = HashMap::new();
    for chunk in need_captions.chunks(batch) {
        text_emb.extend(chunk.iter().copied().zip(model.caption_embeddings(chunk)?));
    }
    let (mut first_ranks, mut two_ranks, mut sum_ranks, mut in_top_k) = (vec![], vec![], vec![], 0usize);
    for q in queries {
        let first = &q.candidates[0];
        let sims: Vec<f32> = q
            .candidates
            .iter()
            .map(|c| match direction {
                Direction::Tir => dot(&text_emb[first.caption.as_str()], &image_emb[c.image.as_str()]),
                Direction::Itr => dot(&image_emb[first.image.as_str()], &text_emb[c.caption.as_str()]),
            })
            .collect();
        first_ranks.push(rank_of_positive(&sims));
        // Candidate order by similarity, best first; the top k get ITM scores.
        let mut order: Vec<usize> = (0..sims.len()).collect();
        order.sort_by(|&a, &b| sims[b].total_cmp(&sims[a]));
        let top = &order[..k.min(order.len())];
        in_top_k += top.contains(&0) as usize;
        let itm = itm_scores(model, q, top, direction, images, batch)?;
        // The positive's place: among the top k by the re-ranking score when it is there (ties do
        // not push it down, as in `rank_of_positive`), else after all of them in similarity order.
        let rerank_rank = |score: &[f32]| match top.iter().position(|&i| i == 0) {
            Some(p) => score.iter().filter(|&&s| s > score[p]).count(),
            None => top.len() + order[top.len()..].iter().position(|&i| i == 0).unwrap_or(0),
        };
        two_ranks.push(rerank_rank(&itm));
        let sum: Vec<f32> = top.iter().zip(&itm).map(|(&i, p)| p + sims[i]).collect();
        sum_ranks.push(rerank_rank(&sum));
        progress();
    }
    let result = |ranks: Vec<usize>| RetrievalResult::from_ranks(direction, ranks);
    Ok(TwoStageResult {
        first_stage_recall_at_k: in_top_k as f64 / queries.len().max(1) as f64,
        first_stage_recall_at_50: recall_at(&first_ranks, 50),
        from_index: first_stage.index.is_some(),
        k,
        first_stage: result(first_ranks),
        two_stage: result(two_ranks),
        itm_plus_similarity: result(sum_ranks),
    })
}

/// The first stage over a whole indexed gallery rather than a 101-candidate list: each query's
/// rank among every indexed image (TIR) or every distinct caption of the indexed rows (ITR).
///
/// Ranks count products, not images: for TIR, the rank is the number of images of *other*
/// captions scoring above the best image of the query's caption (a product's other views are as
/// right as the listed one); for ITR, captions are distinct, so the positive caption is one entry.
#[derive(Clone, Debug, Serialize)]
pub struct GalleryRecall {
    /// Direction, queries, R@1/5/10 and each query's rank in the gallery.
    #[serde(flatten)]
    pub result: RetrievalResult,
    /// Images (TIR) or distinct captions (ITR) each query is ranked against.
    pub gallery: usize,
    #[serde(rename = "r@50")]
    pub r50: f64,
    pub median_rank: usize,
}

/// Largest caption gallery embedded for image queries (each caption is one text forward pass).
pub const MAX_CAPTION_GALLERY: usize = 1_000_000;

pub fn gallery_recall<B: Backend>(
    model: &Model<B>,
    queries: &[Query],
    direction: Direction,
    index: &CatalogIndex,
    ds: &dyn Dataset,
    batch: usize,
    progress: impl Fn(usize, usize),
) -> Result<GalleryRecall> {
    let batch = batch.max(1);
    let caption_of: HashMap<&str, &str> = ds.records().iter().map(|r| (r.id.as_str(), r.caption.as_str())).collect();
    let index_captions: Vec<&str> = index
        .ids
        .iter()
        .map(|id| {
            caption_of.get(id.as_str()).copied().with_context(|| {
                format!("indexed image '{id}' is not in the dataset: give the catalogue the index was built over")
            })
        })
        .collect::<Result<_>>()?;
    let embed_texts = |texts: &[&str]| -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(batch) {
            out.extend(model.caption_embeddings(chunk)?);
            progress(chunk.len(), texts.len());
        }
        Ok(out)
    };
    let index_row = index.rows_by_id();
    let mut ranks = Vec::with_capacity(queries.len());
    let gallery = match direction {
        Direction::Tir => {
            let texts: Vec<&str> = queries.iter().map(|q| q.candidates[0].caption.as_str()).collect();
            let emb = embed_texts(&texts)?;
            ranks = texts
                .par_iter()
                .zip(&emb)
                .map(|(q, t)| {
                    let sims: Vec<f32> = (0..index.len()).map(|r| dot(index.row(r), t)).collect();
                    let best = (0..index.len())
                        .filter(|&r| index_captions[r] == *q)
                        .map(|r| sims[r])
                        .fold(f32::NEG_INFINITY, f32::max);
                    if best == f32::NEG_INFINITY {
                        bail!("no indexed image has the query caption '{q}': is the index built over this catalogue?");
                    }
                    Ok((0..index.len()).filter(|&r| index_captions[r] != *q && sims[r] > best).count())
                })
                .collect::<Result<_>>()?;
            index.len()
        }
        Direction::Itr => {
            let mut captions = index_captions.clone();
            captions.sort_unstable();
            captions.dedup();
            if captions.len() > MAX_CAPTION_GALLERY {
                bail!("{} distinct captions, over the gallery limit of {MAX_CAPTION_GALLERY}", captions.len());
            }
            let emb = embed_texts(&captions)?;
            let position: HashMap<&str, usize> = captions.iter().enumerate().map(|(i, c)| (*c, i)).collect();
            for q in queries {
                let first = &q.candidates[0];
                let r = *index_row
                    .get(first.image.as_str())
                    .with_context(|| format!("query image '{}' is not in the index", first.image))?;
                let sims: Vec<f32> = emb.iter().map(|e| dot(index.row(r), e)).collect();
                let p = *position
                    .get(first.caption.as_str())
                    .with_context(|| format!("the caption of query image '{}' is not in the gallery", first.image))?;
                ranks.push(sims.iter().filter(|&&s| s > sims[p]).count());
            }
            captions.len()
        }
    };
    let mut sorted = ranks.clone();
    sorted.sort_unstable();
    Ok(GalleryRecall {
        gallery,
        r50: recall_at(&ranks, 50),
        median_rank: sorted.get(sorted.len() / 2).copied().unwrap_or(0),
        result: RetrievalResult::from_ranks(direction, ranks),
    })
}
