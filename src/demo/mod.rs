//! `mvlt demo`: the whole pipeline on the built-in synthetic catalogue, with no download and no
//! argument. In phases, each a command a user could run alone:
//!
//! 1. **catalogue**: `mvlt synth` into `OUT/catalog`, split by product (the training runs' split);
//! 2. **pre-training**: `mvlt pretrain --recipe demo` (`configs/demo.toml` says why each setting);
//! 3. **retrieval**: `mvlt eval retrieval` on the validation products, TIR and ITR, random and
//!    same-sub-category negatives; also through the contrastive first stage when the weights have
//!    it, and `mvlt index` of the catalogue for serving;
//! 4. **fine-tuning**: `mvlt finetune --recipe demo-finetune` from the pre-trained weights;
//! 5. **recognition**: `mvlt eval recognition` on the validation products;
//! 6. **report**: `REPORT.md` and `report.json` ([`report`]).
//!
//! A stage whose training run already finished is resumed (and so skipped), so a second `mvlt
//! demo` after an interruption picks up where the first stopped.

pub mod report;

use crate::data::dataset::{split_by_product, Dataset, FileDataset};
use crate::device::{run_on, run_on_devices, BackendTask, DeviceSpec};
use crate::eval::recognition::{self, RecognitionResult};
use crate::eval::retrieval::{self, Direction, ImageSource, Negatives, RetrievalResult, TwoStageResult};
use crate::infer::{LoadOptions, Model};
use crate::progress::progress_bar;
use crate::train::config::{recipe_text, TrainConfig};
use crate::train::trainer::{RunSummary, TrainRun};
use anyhow::{bail, Context, Result};
use burn::tensor::backend::Backend;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What `mvlt demo` was asked.
pub struct DemoOptions {
    pub out: PathBuf,
    /// Minutes instead of a quarter of an hour: a smaller catalogue and fewer steps (for tests).
    pub quick: bool,
    pub device: DeviceSpec,
    pub seed: u64,
}

/// The sizes of a demo run.
#[derive(Clone, Debug, Serialize)]
pub struct DemoPlan {
    /// `--quick`: a smaller catalogue and a fixed number of steps, whatever the backend.
    pub quick: bool,
    pub images: usize,
    pub image_size: u32,
    /// Overrides of the recipes (`key=value`, as `--set`), `max_steps` apart: pre-training's is
    /// `pretrain_steps`.
    pub pretrain_overrides: Vec<String>,
    pub finetune_overrides: Vec<String>,
    /// Retrieval queries per list, candidates per query (1 positive + the rest negatives).
    pub queries: usize,
    pub candidates: usize,
    /// ITM re-ranks this many of the contrastive first stage's candidates.
    pub rerank_k: usize,
    /// Pre-training steps: what the backend's measured pace ([`crate::device::demo_pace`]) fits
    /// into [`BUDGET_S`] beside the other phases, so a faster backend trains longer in the same
    /// minutes. The recipe's cosine keeps its epoch length, so a run cut short ends near peak rate.
    pub pretrain_steps: usize,
}

/// The default run's minutes on 2 CPU cores: the 15, less one of margin.
pub const BUDGET_S: f64 = 14.0 * 60.0;

impl DemoPlan {
    /// `recipe`: the demo's pre-training recipe (its catalogue size and batch); `pace`: the backend's.
    pub fn new(quick: bool, recipe: &TrainConfig, pace: crate::device::DemoPace) -> DemoPlan {
        if quick {
            DemoPlan {
                quick: true,
                images: 600,
                image_size: 64,
                // A fifth of 600 images: about 50 validation products, enough for 21-candidate lists.
                // The 60 steps anneal to their end: stopped near the peak rate instead, the contrastive
                // first stage's R@5 fell from 0.475-0.55 to 0.35-0.49 (seeds 0-2), nearer chance (0.24).
                pretrain_overrides: [
                    "batch_size=32",
                    "val_every=30",
                    "val_batches=2",
                    "val_fraction=0.2",
                    "anneal_to_max_steps=true",
                ]
                .map(String::from)
                .into(),
                finetune_overrides: [
                    "batch_size=32",
                    "max_steps=60",
                    "val_every=30",
                    "val_batches=2",
                    "val_fraction=0.2",
                ]
                .map(String::from)
                .into(),
                queries: 20,
                candidates: 21,
                rerank_k: 5,
                pretrain_steps: 60,
            }
        } else {
            DemoPlan {
                quick: false,
                images: recipe.synthetic_images,
                image_size: 64,
                pretrain_overrides: vec![],
                finetune_overrides: vec![],
                queries: 100,
                candidates: 101,
                rerank_k: 10,
                pretrain_steps: ((BUDGET_S - pace.other_phases_s).max(0.0) * pace.samples_per_s
                    / recipe.batch_size.max(1) as f64)
                    .floor()
                    .max(1.0) as usize,
            }
        }
    }
}

/// One retrieval list's result.
#[derive(Clone, Debug, Serialize)]
pub struct ListResult {
    /// `tir_random`, `itr_random`, `tir_same_subcategory`, `itr_same_subcategory`.
    pub name: String,
    pub direction: Direction,
    pub negatives: &'static str,
    pub candidates: usize,
    /// Exhaustive ITM over every candidate (the paper's protocol).
    pub itm: RetrievalResult,
    /// The contrastive first stage and ITM re-ranking its top k (weights with the ITC head).
    pub two_stage: Option<TwoStageResult>,
}

/// Everything the report shows.
#[derive(Debug, Serialize)]
pub struct DemoOutcome {
    pub out: PathBuf,
    pub plan: DemoPlan,
    pub backend: String,
    pub wall_s: f64,
    /// Seconds per phase, in order.
    pub phases: Vec<(String, f64)>,
    pub train_products: usize,
    pub val_products: usize,
    pub val_images: usize,
    pub pretrain: TrainFigures,
    pub finetune: TrainFigures,
    pub retrieval: Vec<ListResult>,
    #[serde(skip)]
    pub recognition: Option<RecognitionResult>,
    /// Example text queries (validation captions) of the search picture, in its row order.
    pub search_queries: Vec<String>,
}

/// What a training phase reports.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TrainFigures {
    pub steps: usize,
    pub samples_per_s: f64,
    pub last_val: Option<serde_json::Value>,
    pub weights: Option<PathBuf>,
}

impl From<&RunSummary> for TrainFigures {
    fn from(s: &RunSummary) -> Self {
        TrainFigures {
            steps: s.steps,
            samples_per_s: s.samples_per_s,
            last_val: s.last_val.clone(),
            weights: s.final_weights.clone(),
        }
    }
}

/// Announce a phase on standard error (the progress bars live there too).
fn phase(n: usize, what: &str) {
    eprintln!("\n== demo {n}/6: {what}");
}

/// Train one stage: resume it when its folder already has checkpoints.
fn train(recipe: &str, dir: &Path, overrides: Vec<String>, device: DeviceSpec) -> Result<RunSummary> {
    let config = TrainConfig::resolve(&recipe_text(recipe)?, &overrides)?;
    let resume = dir.join("checkpoints").is_dir();
    if resume {
        eprintln!("{} has checkpoints: resuming (a finished run only exports its weights)", dir.display());
    }
    let (_, indices) = config.device_indices()?;
    let s = run_on_devices(device, &indices, TrainRun { config, dir: dir.to_path_buf(), resume })?;
    if s.interrupted {
        bail!("interrupted during {}; run the same command again to continue", dir.display());
    }
    Ok(s)
}

pub fn run(o: &DemoOptions) -> Result<DemoOutcome> {
    let t0 = Instant::now();
    let q = |p: &Path| format!("\"{}\"", p.display().to_string().replace('\\', "\\\\").replace('"', "\\\""));
    let catalog = o.out.join("catalog");
    let common = vec![format!("data={}", q(&catalog)), format!("seed={}", o.seed), format!("device=\"{}\"", o.device)];
    let recipe = TrainConfig::resolve(&recipe_text("demo")?, &common)?;
    let pace = crate::device::backend_for(o.device)
        .map(|b| crate::device::demo_pace(o.device, b))
        .unwrap_or_else(|_| crate::device::demo_pace(DeviceSpec::Cpu, crate::device::BackendKind::Flex));
    let plan = DemoPlan::new(o.quick, &recipe, pace);
    // Pre-training's settings as it will run them: its split is the one evaluated.
    let pre_cfg =
        TrainConfig::resolve(&recipe_text("demo")?, &[common.clone(), plan.pretrain_overrides.clone()].concat())?;
    let mut phases = vec![];
    let mut lap = {
        let mut last = Instant::now();
        move |name: &str, phases: &mut Vec<(String, f64)>| {
            phases.push((name.to_string(), last.elapsed().as_secs_f64()));
            last = Instant::now();
        }
    };
    std::fs::create_dir_all(&o.out).with_context(|| format!("cannot create {}", o.out.display()))?;
    // A second run continues the first, so it must be the same demo (size, seed).
    let plan_file = o.out.join("plan.json");
    let plan_json = serde_json::to_string_pretty(&serde_json::json!({"plan": &plan, "seed": o.seed}))?;
    match std::fs::read_to_string(&plan_file) {
        Ok(old) if old != plan_json => bail!(
            "{} holds a demo run with other settings ({}); give another --out or remove that folder",
            o.out.display(),
            plan_file.display()
        ),
        Ok(_) => {}
        Err(_) => crate::files::write_atomic(&plan_file, plan_json.as_bytes())?,
    }

    // 1. Catalogue, and the split the training runs will use.
    phase(1, &format!("synthetic catalogue ({} images, {} px)", plan.images, plan.image_size));
    let pb = progress_bar(plan.images as u64, "synth");
    crate::data::synth::write_catalog(&catalog, plan.images, o.seed, plan.image_size, |k| pb.inc(k as u64))?;
    pb.finish_and_clear();
    let ds = FileDataset::open_jsonl(&catalog.join("catalog.jsonl"))?;
    let (train_rows, val_rows) = split_by_product(ds.records(), pre_cfg.val_fraction, pre_cfg.seed);
    let products = |rows: &[usize]| {
        rows.iter().map(|&r| ds.records()[r].product_id.as_str()).collect::<std::collections::BTreeSet<_>>().len()
    };
    let (train_products, val_products) = (products(&train_rows), products(&val_rows));
    eprintln!(
        "{}: {} images; training {} products, validation {} products ({} images)",
        catalog.display(),
        ds.len(),
        train_products,
        val_products,
        val_rows.len()
    );
    lap("catalogue", &mut phases);

    // 2. Pre-training.
    phase(2, "pre-training (MLM + ITM + masked image reconstruction + ITC)");
    let pre_dir = o.out.join("pretrain");
    let steps = vec![format!("max_steps={}", plan.pretrain_steps)];
    let pre = train("demo", &pre_dir, [common.clone(), steps, plan.pretrain_overrides.clone()].concat(), o.device)?;
    let pre_weights = pre.final_weights.clone().context("pre-training wrote no final weights")?;
    lap("pre-training", &mut phases);

    // 3. Retrieval on the validation products, and the report's pictures of the pre-trained model.
    phase(3, "retrieval on the validation products");
    let candidates = plan.candidates.min(val_products);
    let eval = RetrievalPhase {
        weights: &pre_weights,
        ds: &ds,
        val_rows: &val_rows,
        plan: &plan,
        candidates,
        mask_grid: pre_cfg.mask_grid,
        seed: o.seed,
        out: &o.out,
    };
    let (retrieval, search_queries) = run_on(o.device, eval)?;
    lap("retrieval", &mut phases);

    // 4. Fine-tuning.
    phase(4, "fine-tuning main- and sub-category recognition");
    let fine_dir = o.out.join("finetune");
    let fine_over =
        [common.clone(), vec![format!("init={}", q(&pre_weights))], plan.finetune_overrides.clone()].concat();
    let fine = train("demo-finetune", &fine_dir, fine_over, o.device)?;
    let fine_weights = fine.final_weights.clone().context("fine-tuning wrote no final weights")?;
    lap("fine-tuning", &mut phases);

    // 5. Recognition.
    phase(5, "recognition on the validation products");
    let recognition =
        run_on(o.device, RecognitionPhase { weights: &fine_weights, ds: &ds, val_rows: &val_rows, out: &o.out })?;
    lap("recognition", &mut phases);

    // 6. Report.
    phase(6, "report");
    let outcome = DemoOutcome {
        out: o.out.clone(),
        plan,
        backend: crate::device::backend_name(o.device),
        wall_s: t0.elapsed().as_secs_f64(),
        phases,
        train_products,
        val_products,
        val_images: val_rows.len(),
        pretrain: (&pre).into(),
        finetune: (&fine).into(),
        retrieval,
        recognition: Some(recognition),
        search_queries,
    };
    report::write(&o.out, &outcome)?;
    Ok(outcome)
}

/// Phase 3 on the chosen backend.
struct RetrievalPhase<'a> {
    weights: &'a Path,
    ds: &'a FileDataset,
    val_rows: &'a [usize],
    plan: &'a DemoPlan,
    candidates: usize,
    mask_grid: usize,
    seed: u64,
    out: &'a Path,
}

impl BackendTask for RetrievalPhase<'_> {
    type Output = (Vec<ListResult>, Vec<String>);
    fn run<B: Backend>(self, device: B::Device) -> Result<Self::Output> {
        let model = Model::<B>::load(self.weights, &LoadOptions::default(), &device)?;
        let by_id = self.ds.records().iter().enumerate().map(|(i, r)| (r.id.clone(), i)).collect();
        let source = ImageSource::Dataset(self.ds, by_id);
        let has_itc = model.config.heads.itc;
        let mut results = vec![];
        for (negatives, tag) in [(Negatives::Random, "random"), (Negatives::SameSubcategory, "same_subcategory")] {
            let lists =
                retrieval::generate(self.ds, self.val_rows, self.plan.queries, self.candidates, negatives, self.seed)?;
            retrieval::write_jsonl(&self.out.join(format!("lists_{tag}.jsonl")), &lists)?;
            for direction in [Direction::Tir, Direction::Itr] {
                let name = format!("{}_{tag}", if direction == Direction::Tir { "tir" } else { "itr" });
                let pb = progress_bar(lists.len() as u64 * (1 + has_itc as u64), &name);
                let itm = retrieval::evaluate(&model, &lists, direction, &source, 101, || pb.inc(1))?;
                let two_stage = has_itc
                    .then(|| {
                        retrieval::evaluate_two_stage(
                            &model,
                            &lists,
                            direction,
                            &source,
                            101,
                            retrieval::FirstStage { k: self.plan.rerank_k, index: None },
                            || pb.inc(1),
                        )
                    })
                    .transpose()?;
                pb.finish_and_clear();
                eprintln!(
                    "{name}: R@1 {:.3}, R@5 {:.3}, R@10 {:.3} ({} queries)",
                    itm.r1, itm.r5, itm.r10, itm.queries
                );
                results.push(ListResult {
                    name,
                    direction,
                    negatives: tag,
                    candidates: self.candidates,
                    itm,
                    two_stage,
                });
            }
        }
        // The catalogue's contrastive index, for `serve --index` and `search --index` on the result.
        if has_itc {
            let pb = progress_bar(self.ds.len() as u64, "indexing");
            crate::index::build(&model, self.weights, self.ds, &self.out.join(report::INDEX_FILE), 64, 4096, |k| {
                pb.inc(k as u64)
            })?;
            pb.finish_and_clear();
        }
        let queries = report::search_picture(&model, self.ds, self.val_rows, &self.out.join("search.png"))?;
        let picture = self.out.join("reconstruction.png");
        report::reconstruction_picture(&model, self.ds, self.val_rows, self.mask_grid, self.seed, &picture)?;
        Ok((results, queries))
    }
}

/// Phase 5 on the chosen backend.
struct RecognitionPhase<'a> {
    weights: &'a Path,
    ds: &'a FileDataset,
    val_rows: &'a [usize],
    out: &'a Path,
}

impl BackendTask for RecognitionPhase<'_> {
    type Output = RecognitionResult;
    fn run<B: Backend>(self, device: B::Device) -> Result<RecognitionResult> {
        let model = Model::<B>::load(self.weights, &LoadOptions::default(), &device)?;
        let pb = progress_bar(self.val_rows.len() as u64, "recognition");
        let r = recognition::evaluate(&model, self.ds, self.val_rows, 64, |k| pb.inc(k as u64))?;
        pb.finish_and_clear();
        for (tag, names, (t, p)) in [("main", &r.main_names, &r.main_pairs), ("sub", &r.sub_names, &r.sub_pairs)] {
            recognition::plot_confusion(
                &self.out.join(format!("confusion_{tag}.png")),
                &format!("{tag} category on the validation products (rows: truth; row-normalised)"),
                names,
                t,
                p,
            )?;
        }
        Ok(r)
    }
}
