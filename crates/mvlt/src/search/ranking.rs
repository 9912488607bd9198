//! Which ranking an indexed search uses, chosen by measurement (issue 35). A text search through
//! an index has three ways to order the first stage's top k:
//!
//! - **embeddings**: the contrastive similarity alone (the first stage's own order);
//! - **itm**: ITM's match probability (the paper's re-ranking);
//! - **itm+similarity**: probability plus similarity (BLIP's retrieval practice).
//!
//! On a model whose ITM has not left chance (a few thousand real products, say), re-ranking by
//! ITM orders worse than the first stage; `mvlt index` measures the three on held-out products of
//! the catalogue ([`measure`]) and records the best in the index, so search and serve use it. An
//! ITM ranking is chosen only when it beats the embeddings: search never ranks worse than its
//! own first stage on that measurement.

use crate::data::dataset::Dataset;
use crate::eval::retrieval::{self, Direction, FirstStage, ImageSource, Negatives, TwoStageResult};
use crate::infer::Model;
use crate::search::CatalogIndex;
use anyhow::{bail, Result};
use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};

/// An order of the first stage's top k.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ranking {
    #[serde(rename = "embeddings")]
    Embeddings,
    #[serde(rename = "itm")]
    Itm,
    #[serde(rename = "itm+similarity")]
    ItmPlusSimilarity,
}

impl Ranking {
    pub const ALL: [Ranking; 3] = [Ranking::Embeddings, Ranking::Itm, Ranking::ItmPlusSimilarity];

    pub fn name(self) -> &'static str {
        match self {
            Ranking::Embeddings => "embeddings",
            Ranking::Itm => "itm",
            Ranking::ItmPlusSimilarity => "itm+similarity",
        }
    }

    /// What a person reads: the answer's and the page's words.
    pub fn describe(self) -> &'static str {
        match self {
            Ranking::Embeddings => "contrastive similarity alone",
            Ranking::Itm => "ITM re-ranking of the first stage's top k",
            Ranking::ItmPlusSimilarity => "ITM probability plus similarity over the first stage's top k",
        }
    }

    /// The score a hit is ordered by, from its ITM probability and similarity.
    pub fn score(self, itm: f32, similarity: f32) -> f32 {
        match self {
            Ranking::Embeddings => similarity,
            Ranking::Itm => itm,
            Ranking::ItmPlusSimilarity => itm + similarity,
        }
    }
}

impl std::str::FromStr for Ranking {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Ranking> {
        match Ranking::ALL.into_iter().find(|r| r.name() == s) {
            Some(r) => Ok(r),
            None => bail!("ranking {s:?} is not one of embeddings, itm, itm+similarity"),
        }
    }
}

impl std::fmt::Display for Ranking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One ranking's recall on the measurement.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Measured {
    pub ranking: Ranking,
    #[serde(rename = "r@1")]
    pub r1: f64,
    #[serde(rename = "r@5")]
    pub r5: f64,
    #[serde(rename = "r@10")]
    pub r10: f64,
}

/// The ranking an index records, and the measurement it was chosen by.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RankingChoice {
    pub ranking: Ranking,
    /// Text queries (held-out products), candidates per query, and the k re-ranked.
    pub queries: usize,
    pub candidates: usize,
    pub k: usize,
    /// Every ranking's recall, text -> image, random negatives.
    pub measured: Vec<Measured>,
}

/// The best of the three on `r` by (R@1, R@5, R@10); the embeddings win ties (no ITM pass), then
/// ITM + similarity.
pub fn choose(r: &TwoStageResult, candidates: usize) -> RankingChoice {
    let m = |ranking, x: &retrieval::RetrievalResult| Measured { ranking, r1: x.r1, r5: x.r5, r10: x.r10 };
    let measured = vec![
        m(Ranking::Embeddings, &r.first_stage),
        m(Ranking::ItmPlusSimilarity, &r.itm_plus_similarity),
        m(Ranking::Itm, &r.two_stage),
    ];
    let key = |x: &Measured| (x.r1, x.r5, x.r10);
    let mut best = &measured[0];
    for x in &measured[1..] {
        if key(x) > key(best) {
            best = x;
        }
    }
    RankingChoice { ranking: best.ranking, queries: r.first_stage.queries, candidates, k: r.k, measured }
}

/// Measure the three rankings on text queries of `held_out` rows (products the weights did not
/// train on): `queries` lists of up to `candidates` (fewer when the products are fewer), random
/// negatives, the index's embeddings, ITM over the top `k`.
#[allow(clippy::too_many_arguments)]
pub fn measure<B: Backend>(
    model: &Model<B>,
    index: &CatalogIndex,
    ds: &dyn Dataset,
    held_out: &[usize],
    queries: usize,
    candidates: usize,
    k: usize,
    seed: u64,
    progress: impl Fn(),
) -> Result<RankingChoice> {
    // Rows whose image could not be read are not in the index: measured without them.
    let indexed = index.rows_by_id();
    let held_out: Vec<usize> =
        held_out.iter().copied().filter(|&r| indexed.contains_key(ds.records()[r].id.as_str())).collect();
    let held_out = &held_out[..];
    let products = crate::data::dataset::count_products(ds.records(), held_out);
    let candidates = candidates.min(products);
    if candidates < 2 {
        bail!("{products} held-out products: too few to measure a ranking (at least 2)");
    }
    let lists = retrieval::generate(ds, held_out, queries, candidates, Negatives::Random, seed)?;
    let by_id = ds.records().iter().enumerate().map(|(i, r)| (r.id.clone(), i)).collect();
    let source = ImageSource::Dataset(ds, by_id);
    let first = FirstStage { k: k.min(candidates), index: Some(index) };
    let r = retrieval::evaluate_two_stage(model, &lists, Direction::Tir, &source, 64, first, progress)?;
    Ok(choose(&r, candidates))
}

/// A line of figures: `embeddings R@1 0.31, itm+similarity R@1 0.33, itm R@1 0.04 (chosen: ...)`.
pub fn summary(c: &RankingChoice) -> String {
    let figures: Vec<String> = c.measured.iter().map(|m| format!("{} R@1 {:.3}", m.ranking, m.r1)).collect();
    format!(
        "{} ({} text queries of held-out products, {} candidates, top {}); chosen: {}",
        figures.join(", "),
        c.queries,
        c.candidates,
        c.k,
        c.ranking
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::retrieval::RetrievalResult;

    fn two_stage(first: Vec<usize>, itm: Vec<usize>, sum: Vec<usize>) -> TwoStageResult {
        let r = |ranks| RetrievalResult::from_ranks(Direction::Tir, ranks);
        TwoStageResult {
            first_stage: r(first),
            first_stage_recall_at_k: 1.0,
            k: 10,
            first_stage_recall_at_50: 1.0,
            from_index: true,
            two_stage: r(itm),
            itm_plus_similarity: r(sum),
        }
    }

    /// ITM at chance re-ranks worse than the first stage: the embeddings are kept. A better ITM
    /// wins; a tie goes to the embeddings (no ITM pass).
    #[test]
    fn chooses_the_best_and_never_worse_than_the_first_stage() {
        let c = choose(&two_stage(vec![0, 0, 3, 1], vec![4, 2, 7, 5], vec![0, 1, 3, 1]), 101);
        assert_eq!(c.ranking, Ranking::Embeddings);
        assert_eq!(c.measured[0].r1, 0.5);
        let c = choose(&two_stage(vec![0, 2, 3, 1], vec![0, 0, 0, 5], vec![0, 0, 3, 1]), 101);
        assert_eq!(c.ranking, Ranking::Itm);
        let c = choose(&two_stage(vec![0, 2, 3, 1], vec![0, 2, 3, 1], vec![0, 2, 3, 1]), 101);
        assert_eq!(c.ranking, Ranking::Embeddings);
        let c = choose(&two_stage(vec![0, 2, 3, 1], vec![0, 9, 9, 9], vec![0, 0, 3, 1]), 101);
        assert_eq!(c.ranking, Ranking::ItmPlusSimilarity);
    }

    #[test]
    fn names_round_trip_and_bad_names_are_refused() {
        for r in Ranking::ALL {
            assert_eq!(r.name().parse::<Ranking>().unwrap(), r);
            assert_eq!(serde_json::to_string(&r).unwrap(), format!("\"{}\"", r.name()));
        }
        let e = "bm25".parse::<Ranking>().unwrap_err().to_string();
        assert!(e.contains("\"bm25\" is not one of"), "{e}");
        assert_eq!(Ranking::ItmPlusSimilarity.score(0.25, 0.5), 0.75);
        assert_eq!(Ranking::Embeddings.score(0.25, 0.5), 0.5);
    }
}
