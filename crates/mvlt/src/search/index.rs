//! A catalogue's contrastive index (`mvlt index`): every image embedded once by the weights' ITC
//! head, so a text query ranks the whole catalogue with one matrix-vector product and ITM re-ranks
//! only the first stage's top k.
//!
//! File: safetensors with one tensor, `embeddings` `[N, D]` f32 (unit rows), and metadata
//! `format` = `mvlt-index-1`, `weights_sha256` (the index refuses other weights), `ids` (a JSON
//! list of the catalogue row ids, in row order) and `skipped` (ids whose image could not be read
//! when it was built: never searched). Exact search: N x D multiply-adds per query, a few
//! milliseconds at 100,000 products and D = 128.
//!
//! A file is checked against the weights it is used with: their hash, the ITC head's width D,
//! finite unit rows (an index with NaN or unnormalised rows would rank by noise).

use crate::data::dataset::Dataset;
use crate::infer::Model;
use crate::search::ranking::Ranking;
use anyhow::{bail, Context, Result};
use burn::tensor::backend::Backend;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const FORMAT: &str = "mvlt-index-1";

/// Cosine similarity of two unit-length embeddings.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
/// Widest embedding an index may hold (the ITC head's `itc_dim`).
const MAX_DIM: usize = 4096;
/// Largest index file read: 16 million products at D = 128.
pub const MAX_INDEX_BYTES: u64 = 8 << 30;

#[derive(Clone, Debug, PartialEq)]
pub struct CatalogIndex {
    pub weights_sha256: String,
    /// Catalogue row ids, one per embedding row.
    pub ids: Vec<String>,
    pub dim: usize,
    /// `[N, dim]`, row-major, unit rows.
    pub embeddings: Vec<f32>,
    /// Catalogue ids left out because their image could not be read.
    pub skipped: Vec<String>,
    /// The ranking measured best on held-out products (`ranking.rs`), when `mvlt index` could
    /// measure it.
    pub ranking: Option<super::ranking::RankingChoice>,
}

impl CatalogIndex {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes: Vec<u8> = self.embeddings.iter().flat_map(|x| x.to_le_bytes()).collect();
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![self.len(), self.dim], &bytes)
            .map_err(|e| anyhow::anyhow!("index tensor: {e}"))?;
        let meta = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("weights_sha256".to_string(), self.weights_sha256.clone()),
            ("ids".to_string(), serde_json::to_string(&self.ids)?),
            ("skipped".to_string(), serde_json::to_string(&self.skipped)?),
        ]);
        let mut meta = meta;
        if let Some(r) = &self.ranking {
            meta.insert("ranking".to_string(), serde_json::to_string(r)?);
        }
        let out = safetensors::serialize([("embeddings", view)], &Some(meta))
            .map_err(|e| anyhow::anyhow!("writing the index: {e}"))?;
        crate::files::write_atomic(path, &out)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let bytes = crate::files::read_limited(path, "index", MAX_INDEX_BYTES)?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| anyhow::anyhow!("{} is not an mvlt index (safetensors): {e}", path.display()))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| anyhow::anyhow!("{}: unreadable metadata: {e}", path.display()))?;
        let meta = meta.metadata().clone().unwrap_or_default();
        if meta.get("format").map(String::as_str) != Some(FORMAT) {
            bail!(
                "{} is not an mvlt index (no format = {FORMAT} in its metadata); build one with mvlt index",
                path.display()
            );
        }
        let ids: Vec<String> =
            serde_json::from_str(meta.get("ids").context("index metadata lacks 'ids'")?).context("index 'ids'")?;
        let skipped: Vec<String> = match meta.get("skipped") {
            Some(s) => serde_json::from_str(s).context("index 'skipped'")?,
            None => vec![],
        };
        let ranking = match meta.get("ranking") {
            Some(s) => Some(serde_json::from_str(s).with_context(|| {
                format!("{}: its 'ranking' metadata is not a ranking mvlt index writes", path.display())
            })?),
            None => None,
        };
        let weights_sha256 = meta.get("weights_sha256").cloned().unwrap_or_default();
        if weights_sha256.len() != 64 || !weights_sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!(
                "{}: its weights_sha256 is not a SHA-256 digest (64 hex digits); rebuild it with mvlt index",
                path.display()
            );
        }
        let t = st.tensor("embeddings").with_context(|| format!("{} has no 'embeddings' tensor", path.display()))?;
        let shape = t.shape();
        if t.dtype() != safetensors::Dtype::F32 || shape.len() != 2 || shape[0] != ids.len() {
            bail!("{}: 'embeddings' must be F32 [{}, D], found {:?} {:?}", path.display(), ids.len(), t.dtype(), shape);
        }
        let dim = shape[1];
        if !ids.is_empty() && !(1..=MAX_DIM).contains(&dim) {
            bail!("{}: its embeddings have {dim} dimensions; an ITC head's width is 1 to {MAX_DIM}", path.display());
        }
        let embeddings: Vec<f32> =
            t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        for (i, row) in embeddings.chunks(dim.max(1)).enumerate() {
            let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
            if !(norm - 1.0).abs().le(&1e-3) {
                bail!(
                    "{}: embedding row {i} ('{}') has length {norm}, not 1 (NaN, or not written by mvlt index): rebuild the index",
                    path.display(),
                    crate::files::printable(&ids[i])
                );
            }
        }
        Ok(CatalogIndex { weights_sha256, ids, dim, embeddings, skipped, ranking })
    }

    /// Row `i`'s embedding.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.embeddings[i * self.dim..(i + 1) * self.dim]
    }

    /// Index row of each catalogue id.
    pub fn rows_by_id(&self) -> HashMap<&str, usize> {
        self.ids.iter().enumerate().map(|(i, id)| (id.as_str(), i)).collect()
    }

    /// [`load`](Self::load) the index at `path` and refuse it unless it was built with `weights`,
    /// whose ITC head embeds in `itc_dim` dimensions.
    pub fn open_for(path: &Path, weights: &Path, itc_dim: usize) -> Result<Self> {
        let index = Self::load(path)?;
        index.check_weights(weights, path)?;
        if !index.is_empty() && index.dim != itc_dim {
            bail!(
                "the index {} holds {}-dimensional embeddings, but these weights embed in {itc_dim}: rebuild it with mvlt index",
                path.display(),
                index.dim
            );
        }
        Ok(index)
    }

    /// Refuse weights other than the ones the index was built with.
    pub fn check_weights(&self, weights: &Path, index: &Path) -> Result<()> {
        let sha = crate::train::checkpoint::sha256_file(weights)?;
        if sha != self.weights_sha256 {
            bail!(
                "the index {} was built with other weights (sha256 {}…), not {} ({}…): rebuild it with mvlt index",
                index.display(),
                &self.weights_sha256[..12],
                weights.display(),
                &sha[..12]
            );
        }
        Ok(())
    }

    /// The `k` rows most similar to `query` among `allowed` rows (all when `None`), best first.
    pub fn top_k(&self, query: &[f32], k: usize, allowed: Option<&[usize]>) -> Vec<(usize, f32)> {
        let score = |i: usize| dot(self.row(i), query);
        let mut scored: Vec<(usize, f32)> = match allowed {
            Some(rows) => rows.iter().map(|&i| (i, score(i))).collect(),
            None => (0..self.len()).map(|i| (i, score(i))).collect(),
        };
        let k = k.min(scored.len());
        if k < scored.len() {
            scored.select_nth_unstable_by(k, |a, b| b.1.total_cmp(&a.1));
            scored.truncate(k);
        }
        scored.sort_by(|a, b| b.1.total_cmp(&a.1));
        scored
    }

    /// Map dataset rows to index rows by id; every row must be indexed.
    pub fn rows_of(&self, ds: &dyn Dataset, rows: &[usize]) -> Result<Vec<usize>> {
        let by_id = self.rows_by_id();
        rows.iter()
            .map(|&r| by_id.get(ds.records()[r].id.as_str()).copied().ok_or_else(|| not_indexed(ds, r)))
            .collect()
    }
}

/// Why catalogue row `r` cannot go through the index.
fn not_indexed(ds: &dyn Dataset, r: usize) -> anyhow::Error {
    let id = &ds.records()[r].id;
    anyhow::anyhow!("catalogue row '{id}' is not in the index: rebuild it with mvlt index over this catalogue")
}

/// The first stage of a search over a catalogue: which rows ITM scores. Shared by `mvlt search
/// --index` and `mvlt serve --index`.
pub struct FirstStage {
    pub index: CatalogIndex,
    /// Rows handed to ITM.
    pub k: usize,
    /// Index row of each catalogue row (`None`: not indexed).
    index_row: Vec<Option<usize>>,
    /// Catalogue rows the index left out because their image could not be read.
    unreadable: std::collections::HashSet<usize>,
    /// Catalogue row of each index row the catalogue has.
    catalogue_row: HashMap<usize, usize>,
    /// How the top `k` are ordered: the index's measured ranking unless asked otherwise
    /// ([`FirstStage::set_ranking`]); an index without a measurement re-ranks by ITM.
    pub ranking: Ranking,
    /// Where [`ranking`](Self::ranking) came from: "measured", "asked" or "not measured".
    pub ranking_from: &'static str,
}

impl FirstStage {
    pub fn new(index: CatalogIndex, k: usize, ds: &dyn Dataset) -> Result<FirstStage> {
        anyhow::ensure!(k >= 1, "the first stage's k must be at least 1");
        let by_id = index.rows_by_id();
        let index_row: Vec<Option<usize>> = ds.records().iter().map(|r| by_id.get(r.id.as_str()).copied()).collect();
        let catalogue_row = index_row.iter().enumerate().filter_map(|(r, i)| Some(((*i)?, r))).collect();
        let skipped: std::collections::HashSet<&str> = index.skipped.iter().map(String::as_str).collect();
        let unreadable = ds
            .records()
            .iter()
            .enumerate()
            .filter(|(r, rec)| index_row[*r].is_none() && skipped.contains(rec.id.as_str()))
            .map(|(r, _)| r)
            .collect();
        let (ranking, ranking_from) = match &index.ranking {
            Some(c) => (c.ranking, "measured"),
            None => (Ranking::Itm, "not measured"),
        };
        Ok(FirstStage { index, k, index_row, catalogue_row, unreadable, ranking, ranking_from })
    }

    /// Override the index's ranking (a `--ranking` flag); `None` keeps it.
    pub fn set_ranking(&mut self, asked: Option<Ranking>) {
        if let Some(r) = asked {
            (self.ranking, self.ranking_from) = (r, "asked");
        }
    }

    /// Order hits `(catalogue row, ITM probability)` by the ranking, best first, given each
    /// row's similarity.
    pub fn order(&self, hits: &mut [(usize, f32)], similarity: impl Fn(usize) -> f32) {
        let r = self.ranking;
        hits.sort_by(|a, b| r.score(b.1, similarity(b.0)).total_cmp(&r.score(a.1, similarity(a.0))));
    }

    /// What an answer says of the ranking: its name, words, where it came from and the
    /// measurement, if any.
    pub fn ranking_json(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.ranking.name(),
            "description": self.ranking.describe(),
            "from": self.ranking_from,
            "measured": self.index.ranking,
        })
    }

    /// Refuse a catalogue with rows the index lacks (a server checks this once, at start); rows
    /// whose image could not be read when it was built are no gap.
    pub fn check_covers(&self, ds: &dyn Dataset) -> Result<()> {
        match (0..self.index_row.len()).find(|r| self.index_row[*r].is_none() && !self.unreadable.contains(r)) {
            Some(r) => Err(not_indexed(ds, r)),
            None => Ok(()),
        }
    }

    /// The `k` of `rows` (catalogue rows, all indexed or unreadable) most similar to the `query`
    /// embedding, as (catalogue row, similarity), best first.
    pub fn pick(&self, query: &[f32], rows: &[usize], ds: &dyn Dataset) -> Result<Vec<(usize, f32)>> {
        let allowed: Vec<usize> = rows
            .iter()
            .filter(|r| !self.unreadable.contains(r))
            .map(|&r| self.index_row[r].ok_or_else(|| not_indexed(ds, r)))
            .collect::<Result<_>>()?;
        Ok(self
            .index
            .top_k(query, self.k, Some(&allowed))
            .into_iter()
            .map(|(i, s)| (self.catalogue_row[&i], s))
            .collect())
    }
}

/// Where an interrupted build keeps what it has: `INDEX.partial`.
pub fn partial_path(out: &Path) -> PathBuf {
    let mut s = out.as_os_str().to_owned();
    s.push(".partial");
    PathBuf::from(s)
}

/// Embed every image of `ds` with `model` (loaded from `weights`, whose hash the index records),
/// `batch` images at a time, saving `INDEX.partial` every `save_every` images and continuing from
/// it when it matches.
pub fn build<B: Backend>(
    model: &Model<B>,
    weights: &Path,
    ds: &dyn Dataset,
    out: &Path,
    batch: usize,
    save_every: usize,
    progress: impl Fn(usize),
) -> Result<CatalogIndex> {
    let weights_sha256 = &crate::train::checkpoint::sha256_file(weights)?;
    let ids: Vec<String> = ds.records().iter().map(|r| r.id.clone()).collect();
    let partial = partial_path(out);
    // A partial build continues when it is of these weights and its rows (embedded and
    // skipped, in catalogue order) are a prefix of this catalogue's.
    let resumable = |p: &CatalogIndex| {
        let (mut done, mut seen) = (p.ids.iter().peekable(), 0);
        let skipped: std::collections::HashSet<&String> = p.skipped.iter().collect();
        for id in &ids {
            if done.peek() == Some(&id) {
                done.next();
            } else if !skipped.contains(id) {
                break;
            }
            seen += 1;
        }
        (done.peek().is_none()).then_some(seen)
    };
    let (mut index, start) = match CatalogIndex::load(&partial) {
        Ok(p) if &p.weights_sha256 == weights_sha256 && resumable(&p).is_some() => {
            let seen = resumable(&p).unwrap_or(0);
            tracing::info!("continuing {} ({} of {} images embedded)", partial.display(), p.len(), ids.len());
            (p, seen)
        }
        _ => (
            CatalogIndex {
                weights_sha256: weights_sha256.clone(),
                ids: vec![],
                dim: 0,
                embeddings: vec![],
                skipped: vec![],
                ranking: None,
            },
            0,
        ),
    };
    progress(start);
    let mut since_save = 0;
    for start in (start..ids.len()).step_by(batch.max(1)) {
        let rows: Vec<usize> = (start..(start + batch.max(1)).min(ids.len())).collect();
        let px: Vec<Result<Vec<f32>>> = {
            use rayon::prelude::*;
            rows.par_iter().map(|&r| ds.pixels(r).and_then(|p| model.prepare_image(&p))).collect()
        };
        // An unreadable image is left out of the index and said once; search never offers it.
        let mut kept = vec![];
        for (&r, p) in rows.iter().zip(px) {
            match p {
                Ok(p) => kept.push((r, p)),
                Err(e) => {
                    tracing::warn!(
                        "catalogue image '{}' left out of the index: {e:#}",
                        crate::files::printable(&ids[r])
                    );
                    index.skipped.push(ids[r].clone());
                }
            }
        }
        let e = model.image_embeddings(&kept.iter().map(|(_, v)| v.as_slice()).collect::<Vec<_>>())?;
        index.dim = e.first().map(Vec::len).unwrap_or(index.dim);
        for ((r, _), v) in kept.iter().zip(e) {
            index.ids.push(ids[*r].clone());
            index.embeddings.extend(v);
        }
        progress(rows.len());
        since_save += rows.len();
        if since_save >= save_every {
            index.save(&partial)?;
            since_save = 0;
        }
    }
    index.save(out)?;
    let _ = std::fs::remove_file(&partial);
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::search::ranking::{Measured, Ranking, RankingChoice};

    fn index(ranking: Option<RankingChoice>) -> CatalogIndex {
        CatalogIndex {
            weights_sha256: "ab".repeat(32),
            ids: vec!["a".into(), "b".into()],
            dim: 2,
            embeddings: vec![1.0, 0.0, 0.0, 1.0],
            skipped: vec![],
            ranking,
        }
    }

    /// The measured ranking travels in the file; metadata that is not one is refused by name.
    #[test]
    fn ranking_round_trips_and_nonsense_is_refused() {
        let dir = std::env::temp_dir().join(format!("mvlt-index-ranking-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let choice = RankingChoice {
            ranking: Ranking::ItmPlusSimilarity,
            queries: 100,
            candidates: 101,
            k: 10,
            measured: vec![Measured { ranking: Ranking::Embeddings, r1: 0.25, r5: 0.5, r10: 0.75 }],
        };
        for r in [None, Some(choice)] {
            let p = dir.join("x.index");
            index(r.clone()).save(&p).unwrap();
            assert_eq!(CatalogIndex::load(&p).unwrap(), index(r));
        }
        // The same file with a ranking that is not JSON of one.
        let bytes: Vec<u8> = [1f32, 0.0, 0.0, 1.0].iter().flat_map(|x| x.to_le_bytes()).collect();
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 2], &bytes).unwrap();
        let meta = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("weights_sha256".to_string(), "ab".repeat(32)),
            ("ids".to_string(), "[\"a\",\"b\"]".to_string()),
            ("ranking".to_string(), "{\"ranking\":\"bm25\"}".to_string()),
        ]);
        let p = dir.join("bad.index");
        std::fs::write(&p, safetensors::serialize([("embeddings", view)], &Some(meta)).unwrap()).unwrap();
        let e = format!("{:#}", CatalogIndex::load(&p).unwrap_err());
        assert!(e.contains("its 'ranking' metadata is not a ranking mvlt index writes"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
