//! `mvlt demo --data CATALOGUE`: the demo on a team's own catalogue (images + JSONL) instead of the
//! synthetic one. What differs from the synthetic demo lives here: the catalogue read in place or
//! cut to `--products` products, the validation share and the held-apart sub-categories chosen
//! from its size, and the sizes of the retrieval lists.

use anyhow::{bail, Context, Result};
use mvlt::data::dataset::{count_products, sample_products, Dataset, FileDataset, Record};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Validation products aimed at: enough for 101-candidate lists with room to spare.
const VAL_PRODUCTS: f64 = 300.0;

/// The seed of the `--products` sample: the same products whatever `--seed`, so that seeds
/// compare training runs on one catalogue.
pub const SAMPLE_SEED: u64 = 0;

/// What the demo was given, and what it made of it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct OwnCatalogue {
    /// The catalogue as given (`--data`).
    pub source: PathBuf,
    /// `--products`: the demo trains on a seeded sample of this many products, written to
    /// `OUT/catalog` (images copied), so that index and server read a catalogue of just those.
    pub products: Option<usize>,
    /// Sub-categories kept out of both training runs: the held-apart check searches them.
    pub held_apart: Vec<String>,
    /// Share of the products validated on (the split by product of both training runs).
    pub val_fraction: f64,
    /// `--vocab`, as given.
    pub vocab: Option<PathBuf>,
}

/// The catalogue file of `data`: a folder holding `catalog.jsonl`, or a `.jsonl` file.
pub fn catalogue_file(data: &Path) -> Result<PathBuf> {
    if data.is_dir() && data.join("catalog.jsonl").is_file() {
        return Ok(data.join("catalog.jsonl"));
    }
    if data.is_file() && data.extension().is_some_and(|e| e == "jsonl") {
        return Ok(data.to_path_buf());
    }
    bail!(
        "--data {}: the demo reads a catalogue of images + JSONL (a folder with catalog.jsonl, or a .jsonl file; \
         one {{\"id\", \"image\", \"caption\", \"category\", \"subcategory\"}} per line)",
        data.display()
    )
}

impl OwnCatalogue {
    /// Settle the demo's choices for `ds` (the whole catalogue as given): the validation share and
    /// the held-apart sub-categories, with the rows it keeps (all, or the `--products` sample).
    pub fn plan(
        source: &Path,
        vocab: Option<&Path>,
        ds: &FileDataset,
        products: Option<usize>,
    ) -> Result<(OwnCatalogue, Vec<usize>)> {
        let recs = ds.records();
        let rows: Vec<usize> = match products {
            Some(0) => bail!("--products must be at least 1"),
            Some(n) => sample_products(recs, n, SAMPLE_SEED),
            None => (0..recs.len()).collect(),
        };
        let n_products = count_products(recs, &rows);
        if n_products < 20 {
            bail!("{} holds {n_products} products: too few to train on and evaluate (at least 20)", source.display());
        }
        let val_fraction = (VAL_PRODUCTS / n_products as f64).clamp(0.02, 0.1);
        let own = OwnCatalogue {
            source: source.to_path_buf(),
            products,
            held_apart: held_apart(recs, &rows),
            val_fraction,
            vocab: vocab.map(Path::to_path_buf),
        };
        Ok((own, rows))
    }

    /// The `mvlt demo` arguments that name this catalogue: ` --data C [--vocab V] [--products N]`.
    pub fn arguments(&self) -> String {
        let mut a = format!(" --data {}", self.source.display());
        if let Some(v) = &self.vocab {
            a += &format!(" --vocab {}", v.display());
        }
        if let Some(n) = self.products {
            a += &format!(" --products {n}");
        }
        a
    }

    /// The settings both training runs take from the catalogue (`key=value`, as `--set`).
    pub fn overrides(&self) -> Vec<String> {
        let names: Vec<String> = self.held_apart.iter().map(|s| format!("{s:?}")).collect();
        vec![format!("val_fraction={}", self.val_fraction), format!("hold_apart_subcategories=[{}]", names.join(", "))]
    }
}

/// Sub-categories to keep out of training, by a fixed draw: each of 0.5% to 4% of the rows (never
/// a main category's largest), taken until they hold 3% of the rows or number four. Empty when no
/// sub-category fits (a catalogue of a few kinds).
pub fn held_apart(recs: &[Record], rows: &[usize]) -> Vec<String> {
    let n = rows.len() as f64;
    let mut count: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for &r in rows {
        *count.entry((recs[r].category.as_str(), recs[r].subcategory.as_str())).or_default() += 1;
    }
    let largest: BTreeMap<&str, usize> = count.iter().fold(BTreeMap::new(), |mut m, ((main, _), &c)| {
        let e = m.entry(*main).or_insert(0);
        *e = (*e).max(c);
        m
    });
    let mut eligible: Vec<(u64, &str, usize)> = count
        .iter()
        .filter(|((main, _), &c)| c as f64 >= (0.005 * n).max(10.0) && c as f64 <= 0.04 * n && c < largest[main])
        .map(|((_, sub), &c)| (fnv(sub), *sub, c))
        .collect();
    eligible.sort();
    let (mut out, mut held) = (vec![], 0usize);
    for (_, sub, c) in eligible {
        if held as f64 >= 0.03 * n || out.len() == 4 {
            break;
        }
        out.push(sub.to_string());
        held += c;
    }
    out.sort();
    out
}

/// FNV-1a of a name: a fixed, platform-independent order to draw sub-categories in.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}

/// Write the rows of `ds` to `dir` as a catalogue of its own (`catalog.jsonl`, images copied to
/// `images/ROW.EXT`), ids, products, captions and categories kept. The JSONL is written last and
/// atomically, so a copy interrupted half-way is done again rather than used.
pub fn write_subset(ds: &FileDataset, rows: &[usize], dir: &Path) -> Result<()> {
    let images = dir.join("images");
    std::fs::create_dir_all(&images).with_context(|| format!("cannot create {}", images.display()))?;
    let recs = ds.records();
    let mut jsonl = String::new();
    for &r in rows {
        let src = ds.image_path(r).context("the catalogue keeps no image files")?;
        let ext = src.extension().and_then(|e| e.to_str()).filter(|e| e.chars().all(|c| c.is_ascii_alphanumeric()));
        let name = format!("{r}.{}", ext.unwrap_or("img"));
        std::fs::copy(src, images.join(&name))
            .with_context(|| format!("cannot copy the image of '{}'", mvlt::files::printable(&recs[r].id)))?;
        let rec = &recs[r];
        let line = serde_json::json!({"id": rec.id, "product_id": rec.product_id, "image": format!("images/{name}"),
                                      "caption": rec.caption, "category": rec.category, "subcategory": rec.subcategory});
        jsonl += &format!("{line}\n");
    }
    mvlt::files::write_atomic(&dir.join("catalog.jsonl"), jsonl.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(i: usize, main: &str, sub: &str) -> Record {
        Record {
            id: format!("i{i}"),
            product_id: format!("p{i}"),
            caption: format!("c{i}"),
            category: main.into(),
            subcategory: sub.into(),
        }
    }

    /// Held apart: small sub-categories, never a main category's largest, about 3% of the rows.
    #[test]
    fn held_apart_takes_small_subcategories_up_to_three_percent() {
        let mut recs = vec![];
        let sizes = [("A", "big", 600), ("A", "s1", 30), ("A", "s2", 30), ("B", "big2", 300), ("B", "s3", 30)];
        for (main, sub, n) in sizes {
            for _ in 0..n {
                recs.push(rec(recs.len(), main, sub));
            }
        }
        let rows: Vec<usize> = (0..recs.len()).collect();
        let h = held_apart(&recs, &rows);
        assert_eq!(h.len(), 1, "{h:?}: one of 30 rows reaches 3% of 990");
        assert!(h[0].starts_with('s'), "{h:?}");
        // A catalogue of one kind holds nothing apart.
        let one: Vec<Record> = (0..100).map(|i| rec(i, "A", "only")).collect();
        assert!(held_apart(&one, &(0..100).collect::<Vec<_>>()).is_empty());
    }

    #[test]
    fn catalogue_file_names_what_it_expects() {
        let e = catalogue_file(Path::new("/nonexistent/catalogue")).unwrap_err().to_string();
        assert!(e.contains("a folder with catalog.jsonl, or a .jsonl file"), "{e}");
    }
}
