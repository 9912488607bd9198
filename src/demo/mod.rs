//! `mvlt demo`: the whole pipeline on the built-in synthetic catalogue, with no download and no
//! argument. In phases, each a command a user could run alone:
//!
//! 1. **catalogue**: `mvlt synth` into `OUT/catalog`, split by product (the training runs' split);
//! 2. **pre-training**: `mvlt pretrain --recipe demo` (`crates/mvlt/configs/demo.toml` says why each setting),
//!    first a warm-up segment that [`pace`] times, with the later phases' costs, to plan the steps
//!    that fill the demo's minutes; then the rest of the run, resumed from the segment's checkpoint;
//! 3. **retrieval**: `mvlt eval retrieval` on the validation products, TIR and ITR, random and
//!    same-sub-category negatives; also through the contrastive first stage when the weights have
//!    it, and `mvlt index` of the catalogue for serving;
//! 4. **fine-tuning**: `mvlt finetune --recipe demo-finetune` from the pre-trained weights;
//! 5. **recognition**: `mvlt eval recognition` on the validation products;
//! 6. **report**: `REPORT.md` and `report.json` ([`report`]).
//!
//! A stage whose training run already finished is resumed (and so skipped), so a second `mvlt
//! demo` after an interruption picks up where the first stopped.

pub mod pace;
pub mod report;

use crate::cli::run_on;
use anyhow::{bail, Context, Result};
use burn::tensor::backend::Backend;
use mvlt::data::dataset::{split_by_product, Dataset, FileDataset};
use mvlt::device::{BackendTask, DeviceSpec};
use mvlt::eval::recognition::{self, RecognitionResult};
use mvlt::eval::retrieval::{self, Direction, ImageSource, Negatives, RetrievalResult, TwoStageResult};
use mvlt::infer::{LoadOptions, Model};
use mvlt::progress::progress_bar;
use mvlt::train::config::{DataSource, TrainConfig, TrainConfigBuilder};
use mvlt::train::trainer::RunSummary;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What `mvlt demo` was asked.
pub struct DemoOptions {
    pub out: PathBuf,
    /// Minutes instead of a quarter of an hour: a smaller catalogue and fewer steps (for tests).
    pub quick: bool,
    pub device: DeviceSpec,
    pub seed: u64,
    /// Pre-training steps, instead of what the measured pace fits into [`BUDGET_S`]: reproduces a
    /// run whose `plan.json` or REPORT.md gives them.
    pub steps: Option<usize>,
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
}

/// How many steps pre-training takes, and where that number came from (`plan.json`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StepPlan {
    pub pretrain_steps: usize,
    pub from: StepsFrom,
    /// With [`StepsFrom::Measured`]: the pace the steps were planned from.
    pub pace: Option<pace::MeasuredPace>,
}

/// Where [`StepPlan::pretrain_steps`] came from (`plan.json` keeps the words).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum StepsFrom {
    /// Fixed by `--quick`.
    #[serde(rename = "quick")]
    Quick,
    /// Asked with `--steps`.
    #[serde(rename = "--steps")]
    Asked,
    /// Planned from the pace measured after the warm-up.
    #[serde(rename = "measured")]
    Measured,
}

/// The default run's minutes on 2 CPU cores: the 15, less one of margin.
pub const BUDGET_S: f64 = 14.0 * 60.0;

/// Pre-training steps of `--quick`: the 60 anneal to their end (`anneal_to_max_steps`).
const QUICK_STEPS: usize = 60;

impl DemoPlan {
    /// `images`: the catalogue of the demo's pre-training recipe.
    pub fn new(quick: bool, images: usize) -> DemoPlan {
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
            }
        } else {
            DemoPlan {
                quick: false,
                images,
                image_size: 64,
                pretrain_overrides: vec![],
                finetune_overrides: vec![],
                queries: 100,
                candidates: 101,
                rerank_k: 10,
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
    pub steps: StepPlan,
    pub seed: u64,
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

/// The validation split of the demo's catalogue, as pre-training draws it.
struct Split {
    val_rows: Vec<usize>,
    train_products: usize,
    val_products: usize,
}

/// Write the synthetic catalogue and split it by product as `pre_cfg` will.
fn catalogue_phase(catalog: &Path, plan: &DemoPlan, pre_cfg: &TrainConfig) -> Result<(FileDataset, Split)> {
    let pb = progress_bar(plan.images as u64, "synth");
    mvlt::data::synth::write_catalog(catalog, plan.images, pre_cfg.seed, plan.image_size, |k| pb.inc(k as u64))?;
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
    Ok((ds, Split { val_rows, train_products, val_products }))
}

/// A training stage's settings: `recipe` on the demo's catalogue, seed and device, with `change`,
/// then the plan's own overrides of the recipe (`--quick`'s, kept in plan.json as recipe keys).
fn stage_config(
    recipe: &str,
    o: &DemoOptions,
    plan_overrides: &[String],
    change: impl FnOnce(&mut TrainConfig),
) -> Result<TrainConfig> {
    TrainConfigBuilder::recipe(recipe)?
        .with(|c| {
            c.data = DataSource::Path(o.out.join("catalog"));
            c.seed = o.seed;
            c.device = o.device;
        })
        .with(change)
        .set(plan_overrides)?
        .build()
}

/// Train one stage: resume it when its folder already has checkpoints.
fn train(config: TrainConfig, dir: &Path) -> Result<RunSummary> {
    let resume = dir.join("checkpoints").is_dir();
    if resume {
        eprintln!("{} has checkpoints: resuming (a finished run only exports its weights)", dir.display());
    }
    let s = crate::cli::train(config, dir, resume)?;
    if s.interrupted {
        bail!("interrupted during {}; run the same command again to continue", dir.display());
    }
    Ok(s)
}

/// `plan.json`: what a second run in the same folder must repeat (settings and seed), and, once
/// planned, the pre-training steps it continues with.
#[derive(Serialize, Deserialize)]
struct PlanFile {
    plan: serde_json::Value,
    seed: u64,
    #[serde(default)]
    steps: Option<StepPlan>,
}

/// The steps a run in `out` already planned, if any; refuses a folder of another demo, or a
/// `--steps` other than the planned ones.
fn read_plan_file(path: &Path, plan: &DemoPlan, o: &DemoOptions) -> Result<Option<StepPlan>> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(None) };
    let old: Option<PlanFile> = serde_json::from_str(&text).ok();
    let Some(old) = old.filter(|f| f.plan == serde_json::json!(plan) && f.seed == o.seed) else {
        bail!(
            "{} holds a demo run with other settings ({}); give another --out or remove that folder",
            o.out.display(),
            path.display()
        );
    };
    if let (Some(asked), Some(planned)) = (o.steps, &old.steps) {
        if asked != planned.pretrain_steps {
            bail!(
                "{} holds a demo run of {} pre-training steps, not the --steps {asked} asked; give another --out",
                o.out.display(),
                planned.pretrain_steps
            );
        }
    }
    Ok(old.steps)
}

fn write_plan_file(path: &Path, plan: &DemoPlan, seed: u64, steps: Option<&StepPlan>) -> Result<()> {
    let file = PlanFile { plan: serde_json::json!(plan), seed, steps: steps.cloned() };
    mvlt::files::write_atomic(path, serde_json::to_string_pretty(&file)?.as_bytes())
}

pub fn run(o: &DemoOptions) -> Result<DemoOutcome> {
    let t0 = Instant::now();
    let catalog = o.out.join("catalog");
    let recipe = stage_config("demo", o, &[], |_| {})?;
    let plan = DemoPlan::new(o.quick, recipe.synthetic_images);
    if o.steps == Some(0) {
        bail!("--steps must be at least 1");
    }
    // Pre-training's settings as it will run them: its split is the one evaluated.
    let pre_cfg = stage_config("demo", o, &plan.pretrain_overrides, |_| {})?;
    let mut phases = vec![];
    let mut lap = {
        let mut last = Instant::now();
        move |name: &str, phases: &mut Vec<(String, f64)>| {
            phases.push((name.to_string(), last.elapsed().as_secs_f64()));
            last = Instant::now();
        }
    };
    std::fs::create_dir_all(&o.out).with_context(|| format!("cannot create {}", o.out.display()))?;
    // A second run continues the first, so it must be the same demo (size, seed, steps).
    let plan_file = o.out.join("plan.json");
    let planned = read_plan_file(&plan_file, &plan, o)?;
    let known = planned.or(match (o.steps, o.quick) {
        (Some(n), _) => Some(StepPlan { pretrain_steps: n, from: StepsFrom::Asked, pace: None }),
        (None, true) => Some(StepPlan { pretrain_steps: QUICK_STEPS, from: StepsFrom::Quick, pace: None }),
        (None, false) => None,
    });
    write_plan_file(&plan_file, &plan, o.seed, known.as_ref())?;

    // 1. Catalogue, and the split the training runs will use.
    phase(1, &format!("synthetic catalogue ({} images, {} px)", plan.images, plan.image_size));
    let (ds, split) = catalogue_phase(&catalog, &plan, &pre_cfg)?;
    let Split { val_rows, train_products, val_products } = split;
    lap("catalogue", &mut phases);

    // 2. Pre-training: a warm-up segment when the steps are still to plan, the plan, the rest.
    phase(2, "pre-training (MLM + ITM + masked image reconstruction + ITC)");
    let pre_dir = o.out.join("pretrain");
    let candidates = plan.candidates.min(val_products);
    let pretrain = |steps: usize| {
        train(stage_config("demo", o, &plan.pretrain_overrides, |c| c.max_steps = Some(steps))?, &pre_dir)
    };
    let steps = match known {
        Some(s) => s,
        None => {
            // The warm-up ends where the recipe validates and checkpoints anyway, so the segments
            // log what one uninterrupted run of the planned steps would (`--steps` reproduces it).
            let warmup = pre_cfg.val_every.max(1);
            let timed = |steps: usize| -> Result<(RunSummary, f64)> {
                let t = Instant::now();
                let s = pretrain(steps)?;
                Ok((s, t.elapsed().as_secs_f64()))
            };
            let (mut warm, mut timed_s) = timed(warmup)?;
            if warm.steps_run < warmup / 2 {
                // Resumed near the warm-up's end (stopped before planning): time one more segment.
                (warm, timed_s) = timed(warm.steps + warmup)?;
            }
            let weights = warm.final_weights.clone().context("the warm-up segment wrote no weights")?;
            eprintln!("timing the later phases on a few of their items ...");
            let probe =
                pace::Probe { weights: &weights, ds: &ds, val_rows: &val_rows, plan: &plan, candidates, seed: o.seed };
            let (itm_query_s, two_stage_query_s, image_embedding_s) = run_on(o.device, probe)?;
            let finetune_cfg =
                stage_config("demo-finetune", o, &plan.finetune_overrides, |c| c.init = Some(weights.clone()))?;
            let mut pace = pace::MeasuredPace {
                warmup_steps: warm.steps,
                timed_steps: warm.steps_run,
                timed_s,
                batch_size: pre_cfg.batch_size,
                itm_query_s,
                two_stage_query_s,
                image_embedding_s,
                spent_s: t0.elapsed().as_secs_f64(),
                after_pretraining_s: 0.0,
                budget_s: BUDGET_S,
            };
            pace.after_pretraining_s =
                pace.after_pretraining(&plan, finetune_cfg.max_steps.unwrap_or(0), val_rows.len());
            let s = StepPlan { pretrain_steps: pace.planned_steps(), from: StepsFrom::Measured, pace: Some(pace) };
            eprintln!("{}", report::plan_line(&s));
            write_plan_file(&plan_file, &plan, o.seed, Some(&s))?;
            s
        }
    };
    let pre = pretrain(steps.pretrain_steps)?;
    let pre_weights = pre.final_weights.clone().context("pre-training wrote no final weights")?;
    lap("pre-training", &mut phases);

    // 3. Retrieval on the validation products, and the report's pictures of the pre-trained model.
    phase(3, "retrieval on the validation products");
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
    let fine_cfg = stage_config("demo-finetune", o, &plan.finetune_overrides, |c| c.init = Some(pre_weights.clone()))?;
    let fine = train(fine_cfg, &fine_dir)?;
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
        steps,
        seed: o.seed,
        backend: mvlt::device::backend_name(o.device, crate::cli::backend()),
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
            mvlt::search::index::build(
                &model,
                self.weights,
                self.ds,
                &self.out.join(report::INDEX_FILE),
                64,
                4096,
                |k| pb.inc(k as u64),
            )?;
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
            crate::plots::plot_confusion(
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

#[cfg(test)]
mod tests {
    use super::*;

    fn options(out: &Path, steps: Option<usize>) -> DemoOptions {
        DemoOptions { out: out.to_path_buf(), quick: true, device: DeviceSpec::Cpu, seed: 0, steps }
    }

    /// A second run continues the first with the steps it planned; another `--steps` or another
    /// demo's folder is refused rather than mixed in.
    #[test]
    fn plan_file_keeps_the_planned_steps_and_refuses_others() {
        let dir = std::env::temp_dir().join(format!("mvlt-plan-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("plan.json");
        let plan = DemoPlan::new(true, 600);
        assert_eq!(read_plan_file(&path, &plan, &options(&dir, None)).unwrap(), None);
        let steps = StepPlan { pretrain_steps: 60, from: StepsFrom::Quick, pace: None };
        write_plan_file(&path, &plan, 0, Some(&steps)).unwrap();
        assert_eq!(read_plan_file(&path, &plan, &options(&dir, None)).unwrap(), Some(steps.clone()));
        assert_eq!(read_plan_file(&path, &plan, &options(&dir, Some(60))).unwrap(), Some(steps));
        let e = read_plan_file(&path, &plan, &options(&dir, Some(7))).unwrap_err().to_string();
        assert!(e.contains("60 pre-training steps, not the --steps 7"), "{e}");
        let e = read_plan_file(&path, &DemoPlan::new(false, 600), &options(&dir, None)).unwrap_err().to_string();
        assert!(e.contains("holds a demo run with other settings"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
