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
use anyhow::{bail, Context, Result};
use burn::tensor::backend::Backend;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
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
            // serde_json's map keeps insertion order (feature preserve_order), and serde-pickle hands
            // dict items over in pickle order; serde_pickle::Value would sort them.
            let v: serde_json::Value =
                serde_pickle::from_slice(&bytes, serde_pickle::DeOptions::new().decode_strings())
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Negatives {
    /// Any other product.
    Random,
    /// Other products of the positive's sub-category first (harder), then random ones.
    SameSubcategory,
}

/// Draw `queries` queries of `candidates` candidates each from a dataset (seeded). A negative never
/// shares the positive's product.
pub fn generate(
    ds: &dyn Dataset,
    queries: usize,
    candidates: usize,
    negatives: Negatives,
    seed: u64,
) -> Result<Vec<Query>> {
    let recs = ds.records();
    let products: std::collections::BTreeSet<&str> = recs.iter().map(|r| r.product_id.as_str()).collect();
    if products.len() < candidates {
        bail!("{} has {} products, fewer than the {candidates} candidates asked for", ds.source(), products.len());
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut rows: Vec<usize> = (0..recs.len()).collect();
    rows.shuffle(&mut rng);
    let cand = |i: usize| Candidate {
        image: recs[i].id.clone(),
        caption: recs[i].caption.clone(),
        product_id: recs[i].product_id.clone(),
    };
    let mut out = vec![];
    for (q, &pos) in rows.iter().take(queries).enumerate() {
        let p = &recs[pos];
        let mut used = std::collections::HashSet::from([p.product_id.as_str()]);
        let mut list = vec![cand(pos)];
        if negatives == Negatives::SameSubcategory {
            let mut same: Vec<usize> = (0..recs.len())
                .filter(|&i| recs[i].subcategory == p.subcategory && recs[i].product_id != p.product_id)
                .collect();
            same.shuffle(&mut rng);
            for i in same {
                if list.len() == candidates {
                    break;
                }
                if used.insert(recs[i].product_id.as_str()) {
                    list.push(cand(i));
                }
            }
        }
        while list.len() < candidates {
            let &i = rows.choose(&mut rng).expect("non-empty");
            if used.insert(recs[i].product_id.as_str()) {
                list.push(cand(i));
            }
        }
        out.push(Query { query: q, candidates: list });
    }
    if out.len() < queries {
        eprintln!("note: {} has {} rows; generated {} queries, not {queries}", ds.source(), recs.len(), out.len());
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
    let prep = |name: &str| -> Result<Vec<f32>> {
        model.prepare_image(&images.pixels(name).with_context(|| format!("candidate image {name}"))?)
    };
    for q in queries {
        let first = &q.candidates[0];
        let mut scores = Vec::with_capacity(q.candidates.len());
        match direction {
            Direction::Itr => {
                let img = prep(&first.image)?;
                for chunk in q.candidates.chunks(batch.max(1)) {
                    let ids: Vec<Vec<i64>> =
                        chunk.iter().map(|c| model.prepare_text(&c.caption)).collect::<Result<_>>()?;
                    let imgs: Vec<&[f32]> = chunk.iter().map(|_| img.as_slice()).collect();
                    scores.extend(model.match_probs(&imgs, &ids.iter().map(|v| v.as_slice()).collect::<Vec<_>>())?);
                }
            }
            Direction::Tir => {
                let ids = model.prepare_text(&first.caption)?;
                for chunk in q.candidates.chunks(batch.max(1)) {
                    let imgs: Vec<Vec<f32>> = chunk.par_iter().map(|c| prep(&c.image)).collect::<Result<_>>()?;
                    let tok: Vec<&[i64]> = chunk.iter().map(|_| ids.as_slice()).collect();
                    scores.extend(model.match_probs(&imgs.iter().map(|v| v.as_slice()).collect::<Vec<_>>(), &tok)?);
                }
            }
        }
        ranks.push(rank_of_positive(&scores));
        progress();
    }
    Ok(RetrievalResult {
        direction,
        queries: ranks.len(),
        r1: recall_at(&ranks, 1),
        r5: recall_at(&ranks, 5),
        r10: recall_at(&ranks, 10),
        ranks,
    })
}
