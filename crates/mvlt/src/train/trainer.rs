//! The training loop, one straight loop for pre-training and fine-tuning, in named phases:
//! [`setup`](super::setup) prepares the run (folder, data, model, plan); [`Trainer::fit`] runs
//! micro-batches ([`step`](super::step)), takes optimiser steps, logs a window, validates and
//! checkpoints when due, then exports the final weights.
//!
//! Determinism: the model is initialised from `seed`; batch contents come from the loader, seeded
//! per (seed, epoch, row); dropout and stochastic depth reseed the backend's generator from (seed,
//! batch counter) before every batch. A checkpoint therefore pins the whole future of a run, and a
//! resumed run repeats, bit for bit on the CPU, what the uninterrupted run would have done.
//! burn's generator is process-wide (burn's own state, not ours): runs that share a
//! [`RunControl::turn`] take turns, and other work that draws random numbers on the same backend at
//! the same time (building a fresh model, another run with its own turn) would perturb a run.

use super::checkpoint::{self, TrainState};
use super::config::{Task, TrainConfig};
use super::ema::WeightAverage;
use super::metrics::{record, MetricsLog};
use super::optim::{clip_factor, grad_norm, AdamW};
use super::schedule::decays;
use super::setup::{Plan, RunData, RunFolder, StartPoint};
use super::step::{micro_batch, HardNegatives, ImageInput, MicroBatch, StepSettings};
use super::validate::validate;
use crate::data::loader::Batch;
use crate::device::BackendTask;
use crate::distributed::{all_reduce, check_same, from_rank0, sum_gradients, Collective, Group};
use crate::model::{Mode, Pvlt};
use anyhow::{anyhow, bail, Context, Result};
use burn::backend::Autodiff;
use burn::module::AutodiffModule;
use burn::optim::GradientsAccumulator;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use indicatif::ProgressBar;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// A training run: settings, its folder, whether to continue from its last checkpoint, and what
/// the caller controls of it.
pub struct TrainRun {
    pub config: TrainConfig,
    pub dir: PathBuf,
    pub resume: bool,
    pub control: RunControl,
}

/// What the caller owns of a run: how to stop it, what to do when its metrics change, and which
/// runs take turns. The library keeps none of this process-wide: the `mvlt` command sets `stop`
/// from its Ctrl-C handler and redraws its plots in `on_metrics`.
#[derive(Clone, Default)]
pub struct RunControl {
    /// Set from anywhere (a signal handler, a timer, another thread): the run finishes its step,
    /// writes a checkpoint and returns with `interrupted`.
    pub stop: Arc<AtomicBool>,
    /// Called with the run folder after each validation pass and at the end, once
    /// `metrics.jsonl` holds the new lines.
    pub on_metrics: Option<MetricsHook>,
    /// Runs holding clones of one turn run one at a time: burn's random generator is
    /// process-wide, so two runs at once would draw from it in turn and neither would repeat.
    pub turn: Arc<Mutex<()>>,
    /// This process's group when it is one rank of a distributed launch
    /// ([`crate::distributed::join`]): the ranks split every step's micro-batches and sum their
    /// gradients; rank 0 alone validates and writes.
    pub group: Option<Group>,
}

/// See [`RunControl::on_metrics`].
pub type MetricsHook = Arc<dyn Fn(&Path) -> Result<()> + Send + Sync>;

impl RunControl {
    /// Whether the run was asked to stop.
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn metrics_changed(&self, dir: &Path) -> Result<()> {
        self.on_metrics.as_ref().map_or(Ok(()), |f| f(dir))
    }
}

#[derive(Debug)]
pub struct RunSummary {
    pub steps: usize,
    /// Steps taken by this call (fewer than `steps` when it resumed a run).
    pub steps_run: usize,
    pub final_weights: Option<PathBuf>,
    pub last_checkpoint: Option<PathBuf>,
    /// Training samples per second over the run (data waits included).
    pub samples_per_s: f64,
    pub last_val: Option<serde_json::Value>,
    pub interrupted: bool,
}

/// Seed of the backend generator for batch `k` (dropout, drop_path).
fn batch_seed(seed: u64, k: usize) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (k as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9) ^ 0x5EED
}

impl BackendTask for TrainRun {
    type Output = RunSummary;
    fn run<B: Backend>(self, device: B::Device) -> Result<RunSummary> {
        train::<B>(self, device)
    }
}

type AB<B> = Autodiff<B>;

fn train<B: Backend>(run: TrainRun, device: B::Device) -> Result<RunSummary> {
    let turn = run.control.turn.clone();
    let _turn = turn.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let cfg = run.config;
    let group = run.control.group.clone();
    let (folder, data) = open_run(&cfg, &run.dir, run.resume, group.as_deref())?;
    let mut start = StartPoint::<B>::new(&cfg, &folder, &data, &device)?;
    if group.as_ref().is_none_or(|g| g.rank() == 0) {
        crate::files::write_atomic(&folder.dir.join("config.toml"), cfg.to_toml().as_bytes())?;
    }
    let world = group.as_ref().map_or(1, |g| g.world());
    let plan = Plan::new(&cfg, &data, &start.state.classes, world)?;
    if let Some(m) = start.state.micro_batches.filter(|&m| m != plan.micro_batches) {
        bail!(
            "the run being resumed took {m} micro-batches per optimiser step; these settings take {} \
             (accum_steps {} x {world} rank(s)), so it could not continue exactly: \
             choose accum_steps so that accum_steps x ranks = {m}",
            plan.micro_batches,
            cfg.accum_steps
        );
    }
    start.state.micro_batches = Some(plan.micro_batches);
    if let Some(g) = &group {
        same_start(g.as_ref(), &cfg, &start.model, &start.state)?;
    }
    Trainer::new(cfg, folder, data, plan, start.opt, start.average, start.state, device, run.control)?.fit(start.model)
}

/// The run folder and data. Under a distributed launch rank 0 prepares both (the folder, the
/// checkpoint to resume, the synthetic catalogue) and tells the others which checkpoint to resume
/// from (or why it cannot start), so that every rank continues from the same one.
fn open_run(
    cfg: &TrainConfig,
    dir: &Path,
    resume: bool,
    group: Option<&dyn Collective>,
) -> Result<(RunFolder, RunData)> {
    let open = || -> Result<(RunFolder, RunData)> {
        let folder = RunFolder::prepare(dir, resume)?;
        let data = RunData::open(cfg, &folder.dir)?;
        Ok((folder, data))
    };
    let Some(g) = group else { return open() };
    if g.rank() == 0 {
        let opened = open();
        let decision = opened
            .as_ref()
            .map(|(f, _)| f.resume_from.as_ref().map(|p| p.display().to_string()).unwrap_or_default())
            .map_err(|e| anyhow!("{e:#}"));
        from_rank0(g, "start", Some(&decision))?;
        return opened;
    }
    let resume_from = from_rank0(g, "start", None)?;
    let folder = RunFolder::joined(dir, (!resume_from.is_empty()).then(|| PathBuf::from(&resume_from)));
    if folder.resume_from.as_ref().is_some_and(|p| !p.is_file()) {
        bail!(
            "rank {}: rank 0 resumes from {resume_from}, which this machine cannot read: a run over several machines keeps its run folder on a shared file system",
            g.rank()
        );
    }
    let data = RunData::open(cfg, &folder.dir)?;
    Ok((folder, data))
}

/// Refuse ranks started differently from rank 0: their settings and their starting weights
/// (fresh, `init`, or the resumed checkpoint's) must hash alike.
fn same_start<B: Backend>(
    g: &dyn Collective,
    cfg: &TrainConfig,
    model: &Pvlt<AB<B>>,
    state: &TrainState,
) -> Result<()> {
    use sha2::{Digest, Sha256};
    let hex = |d: &[u8]| d.iter().map(|b| format!("{b:02x}")).collect::<String>();
    check_same(g, "settings", "settings", &hex(&Sha256::digest(cfg.to_toml().as_bytes())))?;
    let mut h = Sha256::new();
    for (key, data) in crate::model::weights::state_dict(&model.valid(), &state.model_config)? {
        h.update(key.as_bytes());
        h.update(data.as_bytes());
    }
    check_same(g, "weights", "starting weights", &hex(&h.finalize()))
}

/// Loss sums and counts since the last log line.
struct Window {
    sums: Vec<(&'static str, f64)>,
    samples: usize,
    batches: usize,
    started: Instant,
}

impl Window {
    fn new() -> Window {
        Window { sums: vec![], samples: 0, batches: 0, started: Instant::now() }
    }

    fn add(&mut self, losses: &[(&'static str, f64)], samples: usize) {
        for (name, v) in losses {
            match self.sums.iter_mut().find(|(n, _)| n == name) {
                Some(e) => e.1 += v,
                None => self.sums.push((name, *v)),
            }
        }
        self.samples += samples;
        self.batches += 1;
    }

    fn mean(&self, sum: f64) -> f64 {
        sum / self.batches.max(1) as f64
    }
}

/// A run in progress: its settings, plan and position, and the loop's bookkeeping. The model
/// itself moves through [`Trainer::fit`] (each optimiser step consumes and returns it).
struct Trainer<B: Backend> {
    cfg: TrainConfig,
    folder: RunFolder,
    data: RunData,
    plan: Plan,
    opt: AdamW<B>,
    /// The weight average (`ema_decay`), validated and exported in place of the last weights.
    average: Option<WeightAverage<B>>,
    state: TrainState,
    device: B::Device,
    control: RunControl,
    /// Rank 0 of a distributed launch, or the only process: the one that validates and writes.
    writer: bool,
    settings: StepSettings,
    /// `metrics.jsonl` (the writer's).
    log: Option<MetricsLog>,
    pb: ProgressBar,
    window: Window,
    accumulator: GradientsAccumulator<Pvlt<AB<B>>>,
    /// Samples accumulated into the coming step (this process's).
    samples_in_step: usize,
    /// A non-finite loss on this rank of a distributed launch: every rank stops at the end of the
    /// step (the others would otherwise wait for it until the timeout).
    failed: Option<anyhow::Error>,
    last_checkpoint: Option<PathBuf>,
    last_val: Option<serde_json::Value>,
    samples_run: usize,
    /// The step this call started from (0, or the resumed checkpoint's).
    first_step: usize,
    /// Skipped samples already reported.
    skips_reported: usize,
    started: Instant,
}

impl<B: Backend> Trainer<B> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        cfg: TrainConfig,
        folder: RunFolder,
        data: RunData,
        plan: Plan,
        opt: AdamW<B>,
        average: Option<WeightAverage<B>>,
        state: TrainState,
        device: B::Device,
        control: RunControl,
    ) -> Result<Self> {
        let pretrain = cfg.task == Task::Pretrain;
        let settings = StepSettings {
            heads: state.model_config.heads,
            mode: if pretrain || cfg.train_mode { Mode::Train } else { Mode::Eval },
            precision: cfg.precision,
            micro_batches: plan.micro_batches,
            hard_negatives: (pretrain && cfg.itm_hard_negatives)
                .then_some(HardNegatives { seed: cfg.seed, mlm_on_negatives: cfg.mlm_on_negatives }),
        };
        tracing::info!(
            "{} {} on {} ({} training rows, {} validation rows; {} steps of {} samples, peak lr {:.3e}); run folder {}",
            if pretrain { "pre-training" } else { "fine-tuning" },
            state.model_config.variant_name().unwrap_or("custom PVLT"),
            data.path.display(),
            plan.train_rows,
            plan.val_rows,
            plan.total_steps,
            plan.global_batch,
            plan.schedule.lr,
            folder.dir.display()
        );
        let writer = control.group.as_ref().is_none_or(|g| g.rank() == 0);
        let log = writer
            .then(|| {
                MetricsLog::open(&folder.dir.join("metrics.jsonl"), folder.resume_from.as_ref().map(|_| state.step))
            })
            .transpose()?;
        let pb = if writer {
            crate::progress::progress_bar(plan.total_steps as u64, "train")
        } else {
            ProgressBar::hidden()
        };
        pb.set_position(state.step as u64);
        pb.reset_eta();
        let last_checkpoint = folder.resume_from.clone();
        let first_step = state.step;
        Ok(Trainer {
            first_step,
            writer,
            samples_in_step: 0,
            failed: None,
            cfg,
            folder,
            data,
            plan,
            opt,
            average,
            state,
            device,
            control,
            settings,
            log,
            pb,
            window: Window::new(),
            accumulator: GradientsAccumulator::new(),
            last_checkpoint,
            last_val: None,
            samples_run: 0,
            skips_reported: 0,
            started: Instant::now(),
        })
    }

    /// The loop: batches into micro-batches into optimiser steps, each followed by the
    /// bookkeeping that is due; then the final weights.
    fn fit(mut self, mut model: Pvlt<AB<B>>) -> Result<RunSummary> {
        let mut interrupted = false;
        let loader = self.plan.train_loader.clone();
        // Micro-batch k of a step (counted from the step's first batch of the epoch) goes to rank
        // k mod W; one process takes them all.
        let per_step = self.plan.micro_batches;
        let (rank, world) = self.control.group.as_ref().map_or((0, 1), |g| (g.rank(), g.world()));
        'epochs: while self.state.step < self.plan.total_steps
            && self.state.epoch < self.cfg.epochs
            && !self.state.stopped_early
        {
            let epoch = self.state.epoch;
            let start = self.state.batch;
            let mut epoch_samples = 0;
            let mine = move |bi: usize| (bi % per_step) % world == rank;
            for (bi, batch) in (start..self.plan.batches).zip(loader.epoch_where(epoch as u64, start, mine)) {
                epoch_samples += batch.as_ref().map_or(0, Batch::len);
                let (micro, end_of_epoch) = self.take_batch(bi, batch);
                if end_of_epoch {
                    self.report_skips()?;
                    if start == 0 && epoch_samples == 0 && world == 1 {
                        self.pb.abandon();
                        bail!(
                            "stopping: no sample of epoch {} could be read, so nothing can be trained ({})",
                            epoch + 1,
                            self.skip_summary().unwrap_or_default()
                        );
                    }
                }
                if let Some(mb) = micro {
                    self.run_micro_batch(&model, mb)?;
                }
                let step_end = (bi + 1) % per_step == 0 || end_of_epoch;
                if !step_end {
                    continue;
                }
                let (samples, stop) = self.agree_on_step()?;
                if samples == 0 {
                    continue; // a whole step of unreadable images
                }
                let (stepped, lr, norm) = self.optimizer_step(model)?;
                model = stepped;
                self.log_window_if_due(lr, norm)?;
                let mut done = self.state.step >= self.plan.total_steps;
                let validated = self.validation_due(end_of_epoch, done);
                if validated {
                    self.validate(&model)?;
                    self.state.stopped_early = self.early_stop_agreed()?;
                    done |= self.state.stopped_early;
                }
                self.checkpoint_if_due(&model, end_of_epoch, done || stop)?;
                if stop {
                    interrupted = true;
                    self.pb.abandon_with_message("interrupted");
                    break 'epochs;
                }
                if done {
                    break 'epochs;
                }
            }
        }
        self.pb.finish();
        self.report_skips()?;
        if self.writer {
            self.control.metrics_changed(&self.folder.dir)?;
        }
        if self.state.step == 0 && !interrupted {
            bail!(
                "no training step was taken, so no weights were exported: {}",
                self.skip_summary().unwrap_or_else(|| "the plan holds no step (more epochs or data needed)".into())
            );
        }
        let final_weights = if interrupted || !self.writer { None } else { Some(self.export(&model)?) };
        let secs = self.started.elapsed().as_secs_f64();
        Ok(RunSummary {
            steps: self.state.step,
            steps_run: self.state.step - self.first_step,
            final_weights,
            last_checkpoint: self.last_checkpoint,
            samples_per_s: self.samples_run as f64 / secs.max(1e-9),
            last_val: self.last_val,
            interrupted,
        })
    }

    /// The training loader's skip report, when it skipped anything.
    fn skip_summary(&self) -> Option<String> {
        self.plan.train_loader.skips.lock().unwrap_or_else(|p| p.into_inner()).summary()
    }

    /// Samples that could not be read since the last report: said on the terminal and written
    /// to metrics.jsonl (`kind` "skipped", with the rows and reasons), so a run that trains on
    /// fewer samples than its data holds says so.
    fn report_skips(&mut self) -> Result<()> {
        let (new, total, rows) = {
            let skips = self.plan.train_loader.skips.lock().unwrap_or_else(|p| p.into_inner());
            let new: Vec<(String, String)> = skips.skipped[self.skips_reported..].to_vec();
            (new, skips.skipped.len(), skips.total_rows)
        };
        if new.is_empty() {
            return Ok(());
        }
        self.skips_reported = total;
        let pb = self.pb.clone();
        pb.suspend(|| {
            tracing::warn!(
                "{} more training sample(s) could not be read and are skipped ({total} of {rows} in all), e.g. {}: {}",
                new.len(),
                new[0].0,
                crate::files::printable(&new[0].1)
            )
        });
        let items: Vec<serde_json::Value> =
            new.iter().take(100).map(|(item, why)| json!({"item": item, "why": why})).collect();
        self.log(&json!({"kind": "skipped", "step": self.state.step, "new": new.len(), "total": total, "rows": rows, "items": items}))
    }

    /// A line in metrics.jsonl (the writer's; the other ranks write none).
    fn log(&mut self, record: &serde_json::Value) -> Result<()> {
        self.log.as_mut().map_or(Ok(()), |log| log.write(record))
    }

    /// Move the position past batch `bi`, and make it a micro-batch when it is this process's
    /// (pre-training alternates clean and masked images). Returns it and whether it ended the epoch.
    fn take_batch(&mut self, bi: usize, batch: Option<Batch>) -> (Option<MicroBatch>, bool) {
        let s = &mut self.state;
        let end_of_epoch = bi + 1 == self.plan.batches;
        let micro = batch.filter(|b| !b.is_empty()).map(|batch| {
            let masked = self.cfg.task == Task::Pretrain && s.micro_step % 2 == 1;
            let image = if masked { ImageInput::Masked } else { ImageInput::Clean };
            MicroBatch { epoch: s.epoch, index: bi, micro_step: s.micro_step, batch, image }
        });
        s.micro_step += 1;
        s.batch = bi + 1;
        if end_of_epoch {
            s.epoch += 1;
            s.batch = 0;
        }
        (micro, end_of_epoch)
    }

    /// Forward and backward of a micro-batch, its gradients into the accumulator and its losses
    /// into the log window. A non-finite loss stops the run, naming the batch and the last good
    /// checkpoint (under a distributed launch, at the end of the step, on every rank).
    fn run_micro_batch(&mut self, model: &Pvlt<AB<B>>, mb: MicroBatch) -> Result<()> {
        <AB<B> as Backend>::seed(&self.device, batch_seed(self.cfg.seed, mb.micro_step));
        let mut settings = self.settings;
        // The curriculum: random ITM negatives until the configured step (`state.step` counts the
        // steps already taken, so this is the step being computed, 1-based).
        if self.state.step + 1 < self.cfg.itm_hard_negatives_from_step {
            settings.hard_negatives = None;
        }
        let r = micro_batch::<B>(model, &mb, settings, &self.device)?;
        if let Some((term, v)) = r.losses.iter().find(|(_, v)| !v.is_finite()) {
            let records = self.data.dataset.records();
            let ids: Vec<&str> = mb.batch.indices.iter().map(|&i| records[i].id.as_str()).collect();
            let e = anyhow!(
                "stopping: loss term '{term}' is {v} at step {} (epoch {}, batch {}; items {}). The last good checkpoint is {}. \
                 Lower base_lr or set clip_grad, then --resume.",
                self.state.step + 1,
                mb.epoch + 1,
                mb.index,
                ids.join(", "),
                self.last_checkpoint.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "none (no checkpoint written yet)".into())
            );
            if self.control.group.is_none() {
                self.pb.abandon();
                return Err(e);
            }
            self.failed.get_or_insert(e);
            return Ok(());
        }
        self.window.add(&r.losses, mb.batch.len());
        self.accumulator.accumulate(model, r.grads);
        self.samples_run += mb.batch.len();
        self.samples_in_step += mb.batch.len();
        Ok(())
    }

    /// At the end of a step's micro-batches: how many samples it holds over all ranks, and
    /// whether to stop after it (asked on any rank). A non-finite loss on any rank stops every
    /// rank here, each with an error.
    fn agree_on_step(&mut self) -> Result<(usize, bool)> {
        let (samples, stop) = (std::mem::take(&mut self.samples_in_step), self.control.stopping());
        let Some(g) = self.control.group.clone() else { return Ok((samples, stop)) };
        let flags = vec![samples as f32, f32::from(u8::from(stop)), f32::from(u8::from(self.failed.is_some()))];
        let t = Tensor::<B, 1>::from_data(TensorData::new(flags, [3]), &self.device);
        let v: Vec<f32> = all_reduce(g.as_ref(), t)?
            .into_data()
            .convert::<f32>()
            .to_vec()
            .map_err(|e| anyhow!("reading the step's flags back: {e:?}"))?;
        if v[2] > 0.0 {
            self.pb.abandon();
            return Err(self.failed.take().unwrap_or_else(|| {
                anyhow!(
                    "rank {}: stopping: a loss term was not finite on another rank at step {} (that rank's output names the batch)",
                    g.rank(),
                    self.state.step + 1
                )
            }));
        }
        Ok((v[0] as usize, v[1] > 0.0))
    }

    /// One AdamW step on the accumulated gradients (clipped when `clip_grad` is set). Returns the
    /// stepped model (AdamW consumes the model, so parameters no one else holds are updated in
    /// place), the learning rate and the gradient norm.
    fn optimizer_step(&mut self, model: Pvlt<AB<B>>) -> Result<(Pvlt<AB<B>>, f64, f64)> {
        let mut grads = self.accumulator.grads();
        if let Some(g) = &self.control.group {
            grads = sum_gradients(g.as_ref(), &model, grads)?;
        }
        let norm = grad_norm(&model, &grads);
        let lr = self.plan.schedule.at(self.state.step);
        let decay_rule = |name: &str, shape: &[usize]| decays(name, shape);
        let model = self.opt.step(model, &mut grads, lr, clip_factor(norm, self.cfg.clip_grad), &decay_rule);
        if let Some(a) = &mut self.average {
            a.update(&model.valid());
        }
        self.state.step += 1;
        self.pb.inc(1);
        Ok((model, lr, norm))
    }

    /// A `train` line in metrics.jsonl with the window's mean losses, every `log_every` steps.
    fn log_window_if_due(&mut self, lr: f64, norm: f64) -> Result<()> {
        let step = self.state.step;
        if !step.is_multiple_of(self.cfg.log_every) && step != self.plan.total_steps {
            return Ok(());
        }
        self.combine_window()?;
        let w = std::mem::replace(&mut self.window, Window::new());
        let sps = w.samples as f64 / w.started.elapsed().as_secs_f64().max(1e-9);
        let mut pairs: Vec<(&str, Option<serde_json::Value>)> = vec![
            ("kind", Some(json!("train"))),
            ("step", Some(json!(step))),
            ("epoch", Some(json!(step as f64 / self.plan.steps_per_epoch as f64))),
            ("lr", Some(json!(lr))),
            ("grad_norm", Some(json!(norm))),
            ("samples_per_s", Some(json!(sps))),
        ];
        for (name, v) in &w.sums {
            pairs.push((name, Some(json!(w.mean(*v)))));
        }
        self.log(&record(&pairs))?;
        let msg: Vec<String> = w.sums.iter().map(|(n, v)| format!("{n} {:.3}", w.mean(*v))).collect();
        self.pb.set_message(format!("{} | lr {lr:.2e} | {sps:.1} samples/s", msg.join(" ")));
        Ok(())
    }

    /// The window's sums over all ranks (rank order), into the window: the log line then says
    /// what one process taking every micro-batch would say.
    fn combine_window(&mut self) -> Result<()> {
        let Some(g) = self.control.group.clone() else { return Ok(()) };
        let w = &self.window;
        let mine = json!({"sums": w.sums, "batches": w.batches, "samples": w.samples});
        let all = g.exchange(&format!("window/{}", self.state.step), mine.to_string().as_bytes())?;
        let mut combined = Window { sums: vec![], samples: 0, batches: 0, started: w.started };
        for (r, bytes) in all.iter().enumerate() {
            let v: serde_json::Value =
                serde_json::from_slice(bytes).with_context(|| format!("rank {r} sent an unreadable log window"))?;
            let sums: Vec<(String, f64)> = serde_json::from_value(v["sums"].clone())?;
            for (name, sum) in sums {
                let Some(name) = super::step::TERMS.iter().chain(&["loss"]).find(|t| **t == name) else {
                    bail!("rank {r} sent an unknown loss term '{name}'")
                };
                match combined.sums.iter_mut().find(|(n, _)| n == name) {
                    Some(e) => e.1 += sum,
                    None => combined.sums.push((name, sum)),
                }
            }
            combined.batches += v["batches"].as_u64().unwrap_or(0) as usize;
            combined.samples += v["samples"].as_u64().unwrap_or(0) as usize;
        }
        self.window = combined;
        Ok(())
    }

    /// Whether this step validates: every `val_every` steps (or at the end of each epoch), and at
    /// the end, when the run has a validation split. The same answer on every rank.
    fn validation_due(&self, end_of_epoch: bool, done: bool) -> bool {
        let due =
            if self.cfg.val_every > 0 { self.state.step.is_multiple_of(self.cfg.val_every) } else { end_of_epoch };
        (due || done) && self.plan.val_loader.is_some()
    }

    /// Validate (the writer alone), keep `best.safetensors` by `select_by`, and tell the caller
    /// (`RunControl::on_metrics`).
    fn validate(&mut self, model: &Pvlt<AB<B>>) -> Result<()> {
        let Some(loader) = self.plan.val_loader.clone().filter(|_| self.writer) else { return Ok(()) };
        let pb = self.pb.clone();
        pb.suspend(|| -> Result<()> {
            let weights = self.weights(model);
            let v = validate(&weights, &loader, self.settings.heads, self.cfg.val_batches, &self.device)?;
            let mut rec = v.clone();
            rec["kind"] = json!("val");
            rec["step"] = json!(self.state.step);
            if let Some(log) = self.log.as_mut() {
                log.write(&rec)?;
            }
            let score = self.cfg.selection_score(&v).with_context(|| {
                format!(
                    "select_by = {:?}: the validation reports no such figure ({})",
                    self.cfg.select_by,
                    summarize(&v)
                )
            })?;
            if self.state.best_val_loss.is_none_or(|(b, _)| score < b) {
                self.state.best_val_loss = Some((score, self.state.step));
                crate::model::weights::save_model(&weights, &self.state.model_config, &self.best_path())?;
            }
            tracing::info!("validation at step {}: {}", self.state.step, summarize(&v));
            self.last_val = Some(v);
            Ok(())
        })?;
        self.control.metrics_changed(&self.folder.dir)
    }

    fn best_path(&self) -> PathBuf {
        self.folder.dir.join("best.safetensors")
    }

    /// After a validation: whether `select_by` has not improved for `early_stop_steps`. The writer
    /// decides (it alone validates); under a distributed launch every rank hears it.
    fn early_stop_agreed(&mut self) -> Result<bool> {
        let Some(patience) = self.cfg.early_stop_steps else { return Ok(false) };
        let mine = self.writer
            && self.state.best_val_loss.is_some_and(|(_, at)| self.state.step.saturating_sub(at) >= patience);
        let stop = match self.control.group.clone() {
            None => mine,
            Some(g) => {
                let t = Tensor::<B, 1>::from_data(TensorData::new(vec![f32::from(u8::from(mine))], [1]), &self.device);
                let v: Vec<f32> = all_reduce(g.as_ref(), t)?
                    .into_data()
                    .convert::<f32>()
                    .to_vec()
                    .map_err(|e| anyhow!("reading the early-stop flag back: {e:?}"))?;
                v[0] > 0.0
            }
        };
        if stop {
            let best = self.state.best_val_loss.map_or(0, |(_, at)| at);
            tracing::info!(
                "stopping early at step {}: {} has not improved since step {best} ({patience} steps)",
                self.state.step,
                self.cfg.select_by
            );
        }
        Ok(stop)
    }

    /// A checkpoint every `checkpoint_every` steps (or at the end of each epoch), at the end and
    /// on Ctrl-C; only the newest `keep_last` are kept.
    fn checkpoint_if_due(&mut self, model: &Pvlt<AB<B>>, end_of_epoch: bool, forced: bool) -> Result<()> {
        let due = if self.cfg.checkpoint_every > 0 {
            self.state.step.is_multiple_of(self.cfg.checkpoint_every)
        } else {
            end_of_epoch
        } || forced;
        if due && self.writer {
            let path = self.folder.checkpoints.join(checkpoint::file_name(self.state.step));
            checkpoint::save(&path, &model.valid(), &self.opt, self.average.as_ref(), &self.state)?;
            checkpoint::prune(&self.folder.checkpoints, self.cfg.keep_last)?;
            self.last_checkpoint = Some(path);
        }
        Ok(())
    }

    /// The weights a run stands for: the weight average when it keeps one, else the last step's.
    fn weights(&self, model: &Pvlt<AB<B>>) -> Pvlt<B> {
        match &self.average {
            Some(a) => a.apply(model.valid()),
            None => model.valid(),
        }
    }

    /// `final/`: the weights, the class names and the vocabulary, for the inference commands.
    fn export(&self, model: &Pvlt<AB<B>>) -> Result<PathBuf> {
        let out = self.folder.dir.join("final");
        let w = out.join("model.safetensors");
        if self.cfg.export_best && self.best_path().is_file() {
            // The best validated weights, as `validate` wrote them (same format and config).
            let bytes = std::fs::read(self.best_path())
                .with_context(|| format!("cannot read {}", self.best_path().display()))?;
            crate::files::write_atomic(&w, &bytes)?;
        } else {
            crate::model::weights::save_model(&self.weights(model), &self.state.model_config, &w)?;
        }
        crate::files::write_atomic(
            &out.join("classes.json"),
            serde_json::to_string_pretty(&self.state.classes)?.as_bytes(),
        )?;
        let vocab = &self.data.vocab_path;
        std::fs::copy(vocab, out.join("vocab.txt")).with_context(|| format!("cannot copy {}", vocab.display()))?;
        Ok(w)
    }
}

pub fn summarize(v: &serde_json::Value) -> String {
    v.as_object()
        .map(|o| {
            o.iter()
                .filter_map(|(k, x)| {
                    Some(match x.as_u64() {
                        Some(n) => format!("{k} {n}"),
                        None => format!("{k} {:.4}", x.as_f64()?),
                    })
                })
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}
