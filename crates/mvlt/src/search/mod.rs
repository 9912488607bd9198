//! Search: a catalogue ranked for a query. Exhaustive ITM over every candidate ([`Model::search`],
//! [`Model::rank_candidates`]) and its contrastive first stage ([`index`]: the catalogue's index
//! and the top k it picks for ITM to re-rank). The HTTP server and the evaluation rank through
//! these.

pub mod index;
pub mod ranking;

pub use index::{CatalogIndex, FirstStage};

use crate::data::image::Pixels;
use crate::infer::Model;
use anyhow::Result;
use burn::tensor::backend::Backend;
use serde::Serialize;

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
