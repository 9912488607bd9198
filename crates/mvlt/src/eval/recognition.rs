//! Main- and sub-category recognition over a dataset: the image with its caption, as the reference
//! evaluates, argmax of each head.

use super::metrics::{classification_report, Report};
use crate::data::dataset::Dataset;
use crate::infer::Model;
use anyhow::{bail, Result};
use burn::tensor::backend::Backend;
use rayon::prelude::*;
use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct RecognitionResult {
    pub main: Report,
    pub sub: Report,
    pub main_names: Vec<String>,
    pub sub_names: Vec<String>,
    #[serde(skip)]
    pub main_pairs: (Vec<usize>, Vec<usize>),
    #[serde(skip)]
    pub sub_pairs: (Vec<usize>, Vec<usize>),
    /// Rows whose category is not one the model knows.
    pub unknown_class_rows: usize,
    /// Rows whose image or caption could not be read (row, why): left out, not counted.
    #[serde(skip)]
    pub unreadable: Vec<(usize, String)>,
}

pub fn evaluate<B: Backend>(
    model: &Model<B>,
    ds: &dyn Dataset,
    rows: &[usize],
    batch: usize,
    progress: impl Fn(usize),
) -> Result<RecognitionResult> {
    let Some(classes) = &model.classes else {
        bail!("the model's class names are unknown: pass --classes (classes.json of the run, or the authors' class_names.json)");
    };
    let recs = ds.records();
    let mut known = vec![];
    let mut unknown = 0;
    for &r in rows {
        match (
            classes.main.iter().position(|c| *c == recs[r].category),
            classes.sub.iter().position(|c| *c == recs[r].subcategory),
        ) {
            (Some(m), Some(s)) => known.push((r, m, s)),
            _ => unknown += 1,
        }
    }
    if known.is_empty() {
        bail!("none of the {} rows of {} has a category the model knows", rows.len(), ds.source());
    }
    let (mut mt, mut mp, mut st, mut sp) = (vec![], vec![], vec![], vec![]);
    let mut unreadable = vec![];
    for chunk in known.chunks(batch.max(1)) {
        let prepared: Vec<Result<(Vec<f32>, Vec<i64>)>> = chunk
            .par_iter()
            .map(|&(r, _, _)| Ok((model.prepare_image(&ds.pixels(r)?)?, model.prepare_text(&recs[r].caption)?)))
            .collect();
        // A row that cannot be read is left out and reported: one corrupt image must not stop
        // the evaluation of the rest.
        let mut rows = vec![];
        let mut inputs = vec![];
        for (&row, p) in chunk.iter().zip(prepared) {
            match p {
                Ok(p) => {
                    rows.push(row);
                    inputs.push(p);
                }
                Err(e) => unreadable.push((row.0, format!("{e:#}"))),
            }
        }
        let imgs: Vec<&[f32]> = inputs.iter().map(|p| p.0.as_slice()).collect();
        let ids: Vec<&[i64]> = inputs.iter().map(|p| p.1.as_slice()).collect();
        let predicted = if rows.is_empty() { vec![] } else { model.recognize(&imgs, &ids)? };
        for (&(_, m, s), (pm, ps)) in rows.iter().zip(predicted) {
            mt.push(m);
            mp.push(pm);
            st.push(s);
            sp.push(ps);
        }
        progress(chunk.len());
    }
    if mt.is_empty() {
        bail!(
            "none of the {} rows of {} could be read ({} unreadable; the first: {})",
            known.len(),
            ds.source(),
            unreadable.len(),
            unreadable.first().map(|(_, why)| crate::files::printable(why)).unwrap_or_default()
        );
    }
    Ok(RecognitionResult {
        main: classification_report(&mt, &mp),
        sub: classification_report(&st, &sp),
        main_names: classes.main.clone(),
        sub_names: classes.sub.clone(),
        main_pairs: (mt, mp),
        sub_pairs: (st, sp),
        unknown_class_rows: unknown,
        unreadable,
    })
}
