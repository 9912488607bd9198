//! The demo's pace, measured on the machine it runs on: how long a pre-training step takes (the
//! warm-up segment of pre-training, timed) and how long each later phase will take (its own code
//! run on a few of its items, timed), so the demo gives pre-training whatever its minutes leave.
//! Nothing here assumes a speed: a faster machine or backend trains longer in the same minutes.

use super::DemoPlan;
use anyhow::Result;
use burn::tensor::backend::Backend;
use mvlt::data::dataset::{Dataset, FileDataset};
use mvlt::eval::retrieval::{self, Direction, ImageSource, Negatives};
use mvlt::infer::{LoadOptions, Model};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Instant;

/// Retrieval queries of each direction timed to price the retrieval phase.
const PROBE_QUERIES: usize = 2;
/// Images timed to price indexing.
const PROBE_IMAGES: usize = 64;

/// What the demo measured, and the pre-training steps it planned from it (`plan.json`, REPORT.md).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MeasuredPace {
    /// Pre-training steps taken when the plan was made (the warm-up segment's end).
    pub warmup_steps: usize,
    /// The timed segment of pre-training: its steps and wall seconds (start-up, its validation,
    /// checkpoint and export included, as every later segment of that length has them).
    pub timed_steps: usize,
    pub timed_s: f64,
    /// Samples per pre-training step.
    pub batch_size: usize,
    /// Seconds per item of each later phase, each timed on its own code.
    pub itm_query_s: f64,
    pub two_stage_query_s: f64,
    pub image_embedding_s: f64,
    /// Seconds already spent when the plan was made (catalogue, warm-up, this probe).
    pub spent_s: f64,
    /// Predicted seconds of the phases after pre-training.
    pub after_pretraining_s: f64,
    /// The demo's budget in seconds.
    pub budget_s: f64,
}

impl MeasuredPace {
    /// Seconds per pre-training step.
    pub fn step_s(&self) -> f64 {
        self.timed_s / self.timed_steps.max(1) as f64
    }

    /// Pre-training samples per second (start-up, validation and checkpoints included).
    pub fn samples_per_s(&self) -> f64 {
        self.batch_size as f64 / self.step_s().max(1e-9)
    }

    /// The pre-training steps that fill the budget: the warm-up's, plus what the time left after
    /// the later phases holds at the warm-up's pace (never fewer than the warm-up's).
    pub fn planned_steps(&self) -> usize {
        let left = self.budget_s - self.spent_s - self.after_pretraining_s;
        let more = (left.max(0.0) / self.step_s().max(1e-9)).floor() as usize;
        self.warmup_steps + more
    }

    /// Seconds of the phases after pre-training, from the per-item costs: exhaustive ITM over
    /// every list (two negative kinds, two directions), the contrastive first stage with its
    /// re-ranking, the catalogue's index, then fine-tuning and recognition. Fine-tuning is priced at
    /// pre-training's seconds per step (its steps are lighter: no MLM, reconstruction or contrastive
    /// term) and recognition at one ITM query per 101 validation images (a forward pass of each
    /// image with its caption, as ITM's): upper bounds rather than guesses. With `held_apart`, two
    /// more lists (the held-apart sub-categories); with the index, one first-stage list more (the
    /// ranking's measurement).
    pub fn after_pretraining(
        &self,
        plan: &DemoPlan,
        finetune_steps: usize,
        val_images: usize,
        held_apart: bool,
    ) -> f64 {
        let lists = (4.0 + 2.0 * f64::from(u8::from(held_apart))) * plan.queries as f64;
        lists * (self.itm_query_s + self.two_stage_query_s)
            + plan.queries as f64 * self.two_stage_query_s
            + plan.images as f64 * self.image_embedding_s
            + finetune_steps as f64 * self.step_s()
            + val_images as f64 / plan.candidates.max(1) as f64 * self.itm_query_s
    }
}

/// Per-item seconds of the later phases, timed on the warm-up's weights.
pub struct Probe<'a> {
    pub weights: &'a Path,
    pub ds: &'a FileDataset,
    pub val_rows: &'a [usize],
    pub plan: &'a DemoPlan,
    pub candidates: usize,
    pub seed: u64,
}

/// `(itm_query_s, two_stage_query_s, image_embedding_s)`.
impl mvlt::device::BackendTask for Probe<'_> {
    type Output = (f64, f64, f64);
    fn run<B: Backend>(self, device: B::Device) -> Result<Self::Output> {
        let model = Model::<B>::load(self.weights, &LoadOptions::default(), &device)?;
        let by_id = self.ds.records().iter().enumerate().map(|(i, r)| (r.id.clone(), i)).collect();
        let source = ImageSource::Dataset(self.ds, by_id);
        let lists = retrieval::generate(
            self.ds,
            self.val_rows,
            PROBE_QUERIES.min(self.plan.queries),
            self.candidates,
            Negatives::Random,
            self.seed,
        )?;
        // One untimed query first: the first pass allocates what the others reuse.
        retrieval::evaluate(&model, &lists[..1], Direction::Tir, &source, 101, || {})?;
        let timed = |f: &dyn Fn(Direction) -> Result<()>| -> Result<f64> {
            let t = Instant::now();
            f(Direction::Tir)?;
            f(Direction::Itr)?;
            Ok(t.elapsed().as_secs_f64() / (2 * lists.len()).max(1) as f64)
        };
        let itm = timed(&|d| retrieval::evaluate(&model, &lists, d, &source, 101, || {}).map(drop))?;
        let two_stage = if model.config.heads.itc {
            let first = || retrieval::FirstStage { k: self.plan.rerank_k, index: None };
            timed(&|d| retrieval::evaluate_two_stage(&model, &lists, d, &source, 101, first(), || {}).map(drop))?
        } else {
            0.0
        };
        let embedding = if model.config.heads.itc {
            let rows = &self.val_rows[..PROBE_IMAGES.min(self.val_rows.len())];
            let t = Instant::now();
            let images: Vec<Vec<f32>> =
                rows.iter().map(|&r| model.prepare_image(&self.ds.pixels(r)?)).collect::<Result<_>>()?;
            model.image_embeddings(&images.iter().map(|v| v.as_slice()).collect::<Vec<_>>())?;
            t.elapsed().as_secs_f64() / rows.len().max(1) as f64
        } else {
            0.0
        };
        Ok((itm, two_stage, embedding))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pace(spent_s: f64, after_pretraining_s: f64) -> MeasuredPace {
        MeasuredPace {
            warmup_steps: 100,
            timed_steps: 100,
            timed_s: 200.0,
            batch_size: 64,
            itm_query_s: 1.0,
            two_stage_query_s: 0.1,
            image_embedding_s: 0.001,
            spent_s,
            after_pretraining_s,
            budget_s: 840.0,
        }
    }

    #[test]
    fn the_steps_fill_what_the_budget_leaves_at_the_measured_pace() {
        // 840 s - 240 s spent - 400 s after = 200 s left at 2 s a step: 100 more.
        assert_eq!(pace(240.0, 400.0).planned_steps(), 200);
        // Twice as fast a machine plans twice the steps beyond the warm-up.
        let fast = MeasuredPace { timed_s: 100.0, ..pace(240.0, 400.0) };
        assert_eq!(fast.planned_steps(), 300);
        // Over budget already: the warm-up's steps, never fewer.
        assert_eq!(pace(900.0, 400.0).planned_steps(), 100);
    }

    #[test]
    fn the_later_phases_are_priced_by_their_items() {
        let plan = DemoPlan::new(false, 20_000);
        // 400 queries x (1 + 0.1) s, the ranking's 100 first-stage queries x 0.1 s, 20,000 images
        // x 1 ms, 120 fine-tuning steps x 2 s, 1,010 validation images at 1 s per 101.
        let s = pace(0.0, 0.0).after_pretraining(&plan, 120, 1010, false);
        assert!((s - (440.0 + 10.0 + 20.0 + 240.0 + 10.0)).abs() < 1e-9, "{s}");
        // Held-apart sub-categories: 200 queries more of both.
        let h = pace(0.0, 0.0).after_pretraining(&plan, 120, 1010, true);
        assert!((h - s - 220.0).abs() < 1e-9, "{h}");
    }
}
