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

pub mod catalogue;
pub mod pace;
pub mod report;

use crate::cli::run_on;
use anyhow::{bail, Context, Result};
use burn::tensor::backend::Backend;
use mvlt::data::dataset::{Dataset, FileDataset};
use mvlt::device::{BackendTask, DeviceSpec};
use mvlt::eval::recognition::{self, RecognitionResult};
use mvlt::eval::retrieval::{self, Direction, ImageSource, Negatives, RetrievalResult, TwoStageResult};
use mvlt::infer::{LoadOptions, Model};
use mvlt::progress::progress_bar;
use mvlt::search::ranking::RankingChoice;
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
    /// A team's own catalogue (images + JSONL) instead of the synthetic one ([`catalogue`]).
    pub data: Option<PathBuf>,
    /// Its vocabulary (default: vocab.txt beside the catalogue).
    pub vocab: Option<PathBuf>,
    /// With `data`: train on a sample of this many of its products (the same whatever the seed).
    pub products: Option<usize>,
}

impl DemoOptions {
    /// The pre-training and fine-tuning recipes: the synthetic demo's, or the own catalogue's.
    fn recipes(&self) -> (&'static str, &'static str) {
        match self.data {
            Some(_) => ("demo-catalogue", "demo-catalogue-finetune"),
            None => ("demo", "demo-finetune"),
        }
    }
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
    /// `--data`: the team's catalogue and what the demo chose for it.
    pub catalogue: Option<catalogue::OwnCatalogue>,
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
                catalogue: None,
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
                catalogue: None,
            }
        }
    }
}

impl DemoPlan {
    /// A team's catalogue: its sizes, and its settings ahead of `--quick`'s (which still shrink the
    /// steps and lists for tests).
    pub fn for_catalogue(quick: bool, images: usize, own: catalogue::OwnCatalogue) -> DemoPlan {
        let mut plan = DemoPlan::new(quick, images);
        plan.images = images;
        for overrides in [&mut plan.pretrain_overrides, &mut plan.finetune_overrides] {
            overrides.splice(0..0, own.overrides());
            // --quick's validation share is for the synthetic 600 images; the catalogue's is its own.
            overrides.retain(|o| !o.starts_with("val_fraction=0.2"));
        }
        plan.catalogue = Some(own);
        plan
    }

    /// The catalogue folder the training runs, the index and the server read.
    pub fn catalogue_dir(&self, out: &Path) -> PathBuf {
        match &self.catalogue {
            Some(c) if c.products.is_none() => c.source.clone(),
            _ => out.join("catalog"),
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
    /// `--data`: retrieval on the held-apart sub-categories (random negatives), which neither
    /// training run saw.
    pub held_apart: Vec<ListResult>,
    /// The ranking the index measured best on the validation products, and the measurement.
    pub ranking: Option<RankingChoice>,
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
    /// Rows of the held-apart sub-categories (`--data`).
    held_apart_rows: Vec<usize>,
    train_products: usize,
    val_products: usize,
}

/// Write the synthetic catalogue (or, for `--data --products`, the team's sample of it), and split
/// it by product as `pre_cfg` will.
fn catalogue_phase(
    catalog: &Path,
    source: Option<&Source>,
    plan: &DemoPlan,
    pre_cfg: &TrainConfig,
) -> Result<(FileDataset, Split)> {
    match &plan.catalogue {
        None => phase(1, &format!("synthetic catalogue ({} images, {} px)", plan.images, plan.image_size)),
        Some(c) => phase(1, &format!("your catalogue {} ({} images)", c.source.display(), plan.images)),
    }
    let file = catalogue::catalogue_file(catalog);
    match (&plan.catalogue, source) {
        (None, _) => {
            let pb = progress_bar(plan.images as u64, "synth");
            mvlt::data::synth::write_catalog(catalog, plan.images, pre_cfg.seed, plan.image_size, |k| {
                pb.inc(k as u64)
            })?;
            pb.finish_and_clear();
        }
        // The sample is written once; plan.json has made sure a second run is the same demo.
        (Some(own), Some((source, rows))) if own.products.is_some() && file.is_err() => {
            eprintln!(
                "writing a sample of {} products ({} images) to {}",
                own.products.unwrap_or_default(),
                rows.len(),
                catalog.display()
            );
            catalogue::write_subset(source, rows, catalog)?;
        }
        _ => {}
    }
    let ds = FileDataset::open_jsonl(&catalogue::catalogue_file(catalog)?)?;
    if let Some(note) = ds.skips().summary() {
        eprintln!("note: {note}");
    }
    let (train_rows, val_rows) = pre_cfg.split(ds.records());
    let held_apart_rows: Vec<usize> =
        (0..ds.len()).filter(|&r| pre_cfg.hold_apart_subcategories.contains(&ds.records()[r].subcategory)).collect();
    let products = |rows: &[usize]| mvlt::data::dataset::count_products(ds.records(), rows);
    let (train_products, val_products) = (products(&train_rows), products(&val_rows));
    eprintln!(
        "{}: {} images; training {} products, validation {} products ({} images)",
        catalog.display(),
        ds.len(),
        train_products,
        val_products,
        val_rows.len()
    );
    if !held_apart_rows.is_empty() {
        eprintln!(
            "held apart from training: {} images of {} ({})",
            held_apart_rows.len(),
            products(&held_apart_rows),
            pre_cfg.hold_apart_subcategories.join(", ")
        );
    }
    Ok((ds, Split { val_rows, held_apart_rows, train_products, val_products }))
}

/// A training stage's settings: `recipe` on the demo's catalogue `data`, seed and device, with
/// `change`, then the plan's own overrides of the recipe (`--quick`'s and the catalogue's, kept in
/// plan.json as recipe keys).
fn stage_config(
    recipe: &str,
    o: &DemoOptions,
    data: &Path,
    plan_overrides: &[String],
    change: impl FnOnce(&mut TrainConfig),
) -> Result<TrainConfig> {
    TrainConfigBuilder::recipe(recipe)?
        .with(|c| {
            c.data = DataSource::Path(data.to_path_buf());
            // A sample in OUT/catalog has no vocabulary beside it: the catalogue's own is the default.
            c.vocab = o.vocab.clone().or_else(|| o.data.as_deref().and_then(mvlt::data::dataset::vocab_beside_data));
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

/// The team's catalogue as given (`--data`), and the rows of it the demo keeps.
type Source = (FileDataset, Vec<usize>);

/// The plan of a run, and the team's catalogue when there is one.
fn plan_of(o: &DemoOptions) -> Result<(DemoPlan, Option<Source>)> {
    if o.products.is_some() && o.data.is_none() {
        bail!("--products samples a team's catalogue: give it with --data");
    }
    let Some(data) = &o.data else {
        let recipe = stage_config("demo", o, &o.out.join("catalog"), &[], |_| {})?;
        return Ok((DemoPlan::new(o.quick, recipe.synthetic_images), None));
    };
    let source = FileDataset::open_jsonl(&catalogue::catalogue_file(data)?)?;
    let (own, rows) = catalogue::OwnCatalogue::plan(data, o.vocab.as_deref(), &source, o.products)?;
    Ok((DemoPlan::for_catalogue(o.quick, rows.len(), own), Some((source, rows))))
}

pub fn run(o: &DemoOptions) -> Result<DemoOutcome> {
    let t0 = Instant::now();
    if o.steps == Some(0) {
        bail!("--steps must be at least 1");
    }
    let (plan, source) = plan_of(o)?;
    let catalog = plan.catalogue_dir(&o.out);
    let (pre_recipe, fine_recipe) = o.recipes();
    // Pre-training's settings as it will run them: its split is the one evaluated.
    let pre_cfg = stage_config(pre_recipe, o, &catalog, &plan.pretrain_overrides, |_| {})?;
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
    let (ds, split) = catalogue_phase(&catalog, source.as_ref(), &plan, &pre_cfg)?;
    drop(source);
    let Split { val_rows, held_apart_rows, train_products, val_products } = split;
    lap("catalogue", &mut phases);

    // 2. Pre-training: a warm-up segment when the steps are still to plan, the plan, the rest.
    let recognition = if pre_cfg.with_cls { " + recognition" } else { "" };
    phase(2, &format!("pre-training (MLM + ITM + masked image reconstruction + ITC{recognition})"));
    let pre_dir = o.out.join("pretrain");
    let candidates = plan.candidates.min(val_products);
    let pretrain = |steps: usize| {
        train(stage_config(pre_recipe, o, &catalog, &plan.pretrain_overrides, |c| c.max_steps = Some(steps))?, &pre_dir)
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
                stage_config(fine_recipe, o, &catalog, &plan.finetune_overrides, |c| c.init = Some(weights.clone()))?;
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
            pace.after_pretraining_s = pace.after_pretraining(
                &plan,
                finetune_cfg.max_steps.unwrap_or(0),
                val_rows.len(),
                !held_apart_rows.is_empty(),
            );
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
        held_apart_rows: &held_apart_rows,
        plan: &plan,
        candidates,
        mask_grid: pre_cfg.mask_grid,
        seed: o.seed,
        out: &o.out,
    };
    let RetrievalOutput { retrieval, held_apart, ranking, search_queries } = run_on(o.device, eval)?;
    lap("retrieval", &mut phases);

    // 4. Fine-tuning.
    phase(4, "fine-tuning main- and sub-category recognition");
    let fine_dir = o.out.join("finetune");
    let fine_cfg =
        stage_config(fine_recipe, o, &catalog, &plan.finetune_overrides, |c| c.init = Some(pre_weights.clone()))?;
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
        held_apart,
        ranking,
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
    held_apart_rows: &'a [usize],
    plan: &'a DemoPlan,
    candidates: usize,
    mask_grid: usize,
    seed: u64,
    out: &'a Path,
}

/// What phase 3 measured.
struct RetrievalOutput {
    retrieval: Vec<ListResult>,
    held_apart: Vec<ListResult>,
    ranking: Option<RankingChoice>,
    search_queries: Vec<String>,
}

impl RetrievalPhase<'_> {
    /// Lists of `rows` with each kind of `negatives` (files `lists_{prefix}{kind}.jsonl`), ranked
    /// by exhaustive ITM and, with the ITC head, by the first stage and its re-rankings.
    fn lists<B: Backend>(
        &self,
        model: &Model<B>,
        rows: &[usize],
        candidates: usize,
        negatives: &[(Negatives, &'static str)],
        prefix: &str,
    ) -> Result<Vec<ListResult>> {
        let by_id = self.ds.records().iter().enumerate().map(|(i, r)| (r.id.clone(), i)).collect();
        let source = ImageSource::Dataset(self.ds, by_id);
        let has_itc = model.config.heads.itc;
        let mut results = vec![];
        for &(kind, tag) in negatives {
            let lists = retrieval::generate(self.ds, rows, self.plan.queries, candidates, kind, self.seed)?;
            retrieval::write_jsonl(&self.out.join(format!("lists_{prefix}{tag}.jsonl")), &lists)?;
            for direction in [Direction::Tir, Direction::Itr] {
                let name = format!("{prefix}{}_{tag}", if direction == Direction::Tir { "tir" } else { "itr" });
                let pb = progress_bar(lists.len() as u64 * (1 + has_itc as u64), &name);
                let itm = retrieval::evaluate(model, &lists, direction, &source, 101, || pb.inc(1))?;
                let two_stage = has_itc
                    .then(|| {
                        let first = retrieval::FirstStage { k: self.plan.rerank_k, index: None };
                        retrieval::evaluate_two_stage(model, &lists, direction, &source, 101, first, || pb.inc(1))
                    })
                    .transpose()?;
                pb.finish_and_clear();
                eprintln!(
                    "{name}: R@1 {:.3}, R@5 {:.3}, R@10 {:.3} ({} queries)",
                    itm.r1, itm.r5, itm.r10, itm.queries
                );
                results.push(ListResult { name, direction, negatives: tag, candidates, itm, two_stage });
            }
        }
        Ok(results)
    }
}

impl BackendTask for RetrievalPhase<'_> {
    type Output = RetrievalOutput;
    fn run<B: Backend>(self, device: B::Device) -> Result<RetrievalOutput> {
        let model = Model::<B>::load(self.weights, &LoadOptions::default(), &device)?;
        let both = [(Negatives::Random, "random"), (Negatives::SameSubcategory, "same_subcategory")];
        let retrieval = self.lists(&model, self.val_rows, self.candidates, &both, "")?;
        let held_apart = match mvlt::data::dataset::count_products(self.ds.records(), self.held_apart_rows) {
            n if n >= 2 => self.lists(
                &model,
                self.held_apart_rows,
                self.plan.candidates.min(n),
                &[(Negatives::Random, "random")],
                "held_apart_",
            )?,
            _ => vec![],
        };
        // The catalogue's contrastive index, for `serve --index` and `search --index` on the
        // result, with the ranking measured best on the validation products.
        let mut ranking = None;
        if model.config.heads.itc {
            let pb = progress_bar(self.ds.len() as u64, "indexing");
            let path = self.out.join(report::INDEX_FILE);
            let mut index =
                mvlt::search::index::build(&model, self.weights, self.ds, &path, 64, 4096, |k| pb.inc(k as u64))?;
            pb.finish_and_clear();
            let pb = progress_bar(self.plan.queries as u64, "measuring rankings");
            let choice = mvlt::search::ranking::measure(
                &model,
                &index,
                self.ds,
                self.val_rows,
                self.plan.queries,
                self.candidates,
                self.plan.rerank_k,
                self.seed,
                || pb.inc(1),
            )?;
            pb.finish_and_clear();
            eprintln!("ranking: {}", mvlt::search::ranking::summary(&choice));
            index.ranking = Some(choice.clone());
            index.save(&path)?;
            ranking = Some(choice);
        }
        let search_queries = report::search_picture(&model, self.ds, self.val_rows, &self.out.join("search.png"))?;
        let picture = self.out.join("reconstruction.png");
        report::reconstruction_picture(&model, self.ds, self.val_rows, self.mask_grid, self.seed, &picture)?;
        Ok(RetrievalOutput { retrieval, held_apart, ranking, search_queries })
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
        DemoOptions {
            out: out.to_path_buf(),
            quick: true,
            device: DeviceSpec::Cpu,
            seed: 0,
            steps,
            data: None,
            vocab: None,
            products: None,
        }
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
