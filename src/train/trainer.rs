//! The training loop, one straight loop for pre-training and fine-tuning.
//!
//! Determinism: the model is initialised from `seed`; batch contents come from the loader, seeded
//! per (seed, epoch, row); dropout and stochastic depth reseed the backend's generator from (seed,
//! batch counter) before every batch. A checkpoint therefore pins the whole future of a run, and a
//! resumed run repeats, bit for bit on the CPU, what the uninterrupted run would have done.
//! burn's generator is process-wide: runs in one process take turns (`RUN_LOCK`), and other work
//! that draws random numbers on the same backend at the same time (building a fresh model) would
//! perturb a run.

use super::checkpoint::{self, TrainState};
use super::config::{Task, TrainConfig};
use super::loss::{losses, mlm_positions, MlmTargets, Targets};
use super::metrics::{self, record, MetricsLog};
use super::optim::{clip_factor, grad_norm, AdamW};
use super::precision::{autocast, Precision};
use super::schedule::{decays, scaled_lr, LrSchedule};
use crate::data::dataset::{open_dataset, split_by_product, ClassMap, Dataset};
use crate::data::loader::{Batch, Loader, LoaderConfig};
use crate::data::text::TextProcessor;
use crate::device::{BackendTask, Cpu};
use crate::model::weights::{load_state_dict, resolve_config, save_model, to_backend, StateDict};
use crate::model::{HeadSet, Pvlt, PvltConfig};
use anyhow::{anyhow, bail, Context, Result};
use burn::backend::Autodiff;
use burn::module::{AutodiffModule, Module};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use serde_json::json;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// A training run: settings, its folder, and whether to continue from its last checkpoint.
pub struct TrainRun {
    pub config: TrainConfig,
    pub dir: PathBuf,
    pub resume: bool,
}

#[derive(Debug)]
pub struct RunSummary {
    pub steps: usize,
    pub final_weights: Option<PathBuf>,
    pub last_checkpoint: Option<PathBuf>,
    /// Training samples per second over the run (data waits included).
    pub samples_per_s: f64,
    pub last_val: Option<serde_json::Value>,
    pub interrupted: bool,
}

/// Serialises training runs within a process (the backend's generator is shared).
static RUN_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Set by Ctrl-C; the loop checkpoints and stops at the next step boundary.
static STOP: AtomicBool = AtomicBool::new(false);

fn install_ctrlc() {
    // Fails only when a handler is already installed (a second run in one process): keep it.
    let _ = ctrlc::set_handler(|| {
        if STOP.swap(true, Ordering::SeqCst) {
            eprintln!("\nsecond Ctrl-C: exiting without a checkpoint");
            std::process::exit(130);
        }
        eprintln!("\nCtrl-C: finishing this step, writing a checkpoint, then stopping (Ctrl-C again to quit at once)");
    });
}

/// The architecture to train: from `init` weights when given (their stored or inferred config),
/// else `cfg.model`; then the data-dependent parts (vocabulary, classes, text length, heads).
pub fn model_config(cfg: &TrainConfig, text: &TextProcessor, classes: &ClassMap, init: Option<&StateDict>) -> Result<PvltConfig> {
    let mut m = match init {
        Some(sd) => resolve_config(None, Some(sd)).or_else(|_| resolve_model(&cfg.model))?,
        None => {
            let mut m = resolve_model(&cfg.model)?;
            m.img_size = cfg.image_size;
            m.num_text_tokens = cfg.max_len;
            m.vocab_size = text.vocab_size;
            m
        }
    };
    if m.num_text_tokens != cfg.max_len {
        bail!("the initial weights take {} text tokens but max_len is {}: set max_len = {}", m.num_text_tokens, cfg.max_len, m.num_text_tokens);
    }
    if m.vocab_size != text.vocab_size {
        bail!(
            "wrong vocabulary: the model has {} word embeddings but the vocabulary file has {} entries (use the vocabulary the weights were trained with)",
            m.vocab_size,
            text.vocab_size
        );
    }
    m.drop_path_rate = cfg.drop_path_rate;
    m.text_dropout = cfg.dropout;
    m.heads = heads_of(cfg);
    if m.heads.cls {
        m.num_sup_classes = classes.main.len();
        m.num_sub_classes = classes.sub.len();
    }
    m.validate()?;
    m.check_image_size(cfg.image_size, cfg.image_size)?;
    Ok(m)
}

/// Recognition heads trained for another class list (e.g. the authors' 48 / 122 Fashion-Gen classes
/// when fine-tuning on a catalogue of one's own) cannot be loaded: leave them out, so they start
/// fresh, and say so.
fn drop_mismatched_class_heads(sd: &mut StateDict, m: &PvltConfig) {
    for (head, n) in [("sup_cls_head.", m.num_sup_classes), ("sub_cls_head.", m.num_sub_classes)] {
        let bias = format!("{head}linear_bias");
        if let Some(have) = sd.tensors.get(&bias).map(|t| t.shape[0]).filter(|&k| k != n) {
            sd.tensors.retain(|k, _| !k.starts_with(head));
            eprintln!("note: {} has {have} classes in {head}*, the data {n}: that head starts fresh", sd.path.display());
        }
    }
}

/// A preset, `micro` (a CPU-sized PVLT for demos and tests), or a config file.
pub fn resolve_model(spec: &str) -> Result<PvltConfig> {
    if spec == "micro" {
        let v: serde_json::Value = serde_json::from_str(include_str!("../../configs/pvlt_micro.json"))?;
        return PvltConfig::from_json(&v);
    }
    PvltConfig::resolve(spec)
}

pub fn heads_of(cfg: &TrainConfig) -> HeadSet {
    match cfg.task {
        Task::Pretrain => HeadSet { itm: true, mlm: true, t2i: true, cls: cfg.with_cls },
        Task::Finetune => HeadSet { cls: true, ..HeadSet::NONE },
    }
}

/// Host batch -> device tensors. `masked`: feed the grid-masked image (odd pre-training batches).
struct DeviceBatch<B: Backend> {
    input: Tensor<B, 4>,
    ids: Tensor<B, 2, Int>,
    targets: Targets<B>,
}

fn to_device<B: Backend>(b: &Batch, masked: bool, device: &B::Device) -> DeviceBatch<B> {
    let (n, s, t) = (b.len(), b.image_size, b.text_len);
    let img = |v: &Vec<f32>| Tensor::<B, 4>::from_data(TensorData::new(v.clone(), [n, 3, s, s]), device);
    let ints = |v: &Vec<i64>| Tensor::<B, 1, Int>::from_data(TensorData::new(v.clone(), [v.len()]), device);
    let clean = img(&b.images);
    let input = if masked && !b.masked_images.is_empty() { img(&b.masked_images) } else { clean.clone() };
    DeviceBatch {
        input,
        ids: Tensor::from_data(TensorData::new(b.input_ids.clone(), [n, t]), device),
        targets: Targets {
            mlm: MlmTargets::from_labels(&b.mlm_labels, device),
            itm_labels: ints(&b.itm_labels),
            clean_images: clean,
            sup_labels: ints(&b.sup_labels),
            sub_labels: ints(&b.sub_labels),
        },
    }
}

const TERMS: [&str; 5] = ["mlm", "itm", "t2i", "sup_cls", "sub_cls"];

/// (name, value) of each present loss term, then ("loss", total), read back in one transfer.
fn loss_values<B: Backend>(l: &super::loss::Losses<B>) -> Vec<(&'static str, f64)> {
    let parts = [&l.mlm, &l.itm, &l.t2i, &l.sup_cls, &l.sub_cls];
    let mut names = vec![];
    let mut ts = vec![];
    for (name, t) in TERMS.iter().zip(parts) {
        if let Some(t) = t {
            names.push(*name);
            ts.push(t.clone().detach());
        }
    }
    names.push("loss");
    ts.push(l.total.clone().detach());
    let v: Vec<f64> = Tensor::cat(ts, 0).into_data().convert::<f64>().to_vec().unwrap_or_default();
    names.into_iter().zip(v).collect()
}

/// Seed of the backend generator for batch `k` (dropout, drop_path).
fn batch_seed(seed: u64, k: usize) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (k as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9) ^ 0x5EED
}

impl BackendTask for TrainRun {
    type Output = RunSummary;
    fn run<B: Backend>(self, device: B::Device) -> Result<RunSummary> {
        train::<B>(self, vec![device])
    }
    fn run_multi<B: Backend>(self, devices: Vec<B::Device>) -> Result<RunSummary> {
        train::<B>(self, devices)
    }
}

/// What one micro-batch gave: its loss terms (name, value) and its gradients.
type MicroResult = (Vec<(&'static str, f64)>, GradientsParams);

/// Forward and backward of one micro-batch on `model` (a replica on `device`). `scale` divides the
/// loss: the gradient of a step is the mean over its micro-batches and devices.
#[allow(clippy::too_many_arguments)]
fn micro_batch<B: Backend>(
    model: &Pvlt<Autodiff<B>>,
    batch: &Batch,
    masked: bool,
    heads: HeadSet,
    train_mode: bool,
    precision: Precision,
    scale: usize,
    device: &B::Device,
) -> MicroResult {
    let db = to_device::<Autodiff<B>>(batch, masked, device);
    let step_model = autocast(model, precision);
    let out = step_model.forward_mlm_at(db.input.cast(precision.dtype()), db.ids, heads, train_mode, Some(db.targets.mlm.rows.clone()));
    let l = losses(&out, &db.targets, heads);
    let values = loss_values(&l);
    if values.iter().any(|(_, v)| !v.is_finite()) {
        return (values, GradientsParams::new());
    }
    let total = if scale > 1 { l.total.div_scalar(scale as f64) } else { l.total };
    (values, GradientsParams::from_grads(total.backward(), model))
}

/// One micro-step over the devices: micro-batch `r` of `group` runs on `devices[r]`, each in its
/// own thread on a replica forked from `model`. The gradients come back on `devices[0]`, in
/// device order, so the sum is the same as accumulating the micro-batches one after another.
///
/// Why not burn's `distributed` feature (NCCL all-reduce inside backward): in burn 0.21 it makes
/// every autodiff backend require a collective implementation that the CPU backend lacks, so the
/// CPU build would lose training. The gradients move with burn's `GradientsParams::to_device`
/// instead: one copy per replica per step.
#[allow(clippy::too_many_arguments)]
fn data_parallel<B: Backend>(
    model: &Pvlt<Autodiff<B>>,
    group: &[(usize, Batch, bool)],
    devices: &[B::Device],
    heads: HeadSet,
    train_mode: bool,
    precision: Precision,
    scale: usize,
) -> Vec<MicroResult> {
    let run = |m: &Pvlt<Autodiff<B>>, r: usize| {
        let (_, batch, masked) = &group[r];
        micro_batch::<B>(m, batch, *masked, heads, train_mode, precision, scale, &devices[r])
    };
    if group.len() == 1 {
        return vec![run(model, 0)];
    }
    let replicas: Vec<Pvlt<Autodiff<B>>> = (1..group.len()).map(|r| model.clone().fork(&devices[r])).collect();
    let mut results = std::thread::scope(|scope| {
        let handles: Vec<_> = replicas.iter().enumerate().map(|(i, m)| scope.spawn(move || run(m, i + 1))).collect();
        let first = run(model, 0);
        let mut all = vec![first];
        for h in handles {
            all.push(h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)));
        }
        all
    });
    for (r, (_, grads)) in results.iter_mut().enumerate().skip(1) {
        *grads = std::mem::take(grads).to_device(&devices[0], &replicas[r - 1]);
    }
    results
}

fn train<B: Backend>(run: TrainRun, devices: Vec<B::Device>) -> Result<RunSummary> {
    let device = devices[0].clone();
    let _turn = RUN_LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let cfg = run.config;
    let dir = run.dir;
    if run.resume && !dir.is_dir() {
        bail!("--resume: the run folder {} does not exist (give the --out of the run to continue)", dir.display());
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create run folder {}", dir.display()))?;
    let ckpt_dir = dir.join("checkpoints");
    let existing = checkpoint::list(&ckpt_dir);
    let resume_from = match (run.resume, existing.last()) {
        (true, Some(_)) => {
            // The newest checkpoint that loads; a truncated newer one is reported and skipped.
            let (found, skipped) = checkpoint::newest_loadable(&ckpt_dir);
            for (p, why) in &skipped {
                // Renamed aside so that pruning never keeps it in place of a good one.
                let aside = p.with_extension("safetensors.broken");
                let moved = std::fs::rename(p, &aside).is_ok();
                eprintln!(
                    "warning: skipping checkpoint {}: {why}{}",
                    p.display(),
                    if moved { format!(" (renamed to {})", aside.display()) } else { String::new() }
                );
            }
            match found {
                Some(p) => Some(p),
                None => bail!("--resume: none of the {} checkpoints in {} can be loaded (see the warnings above)", existing.len(), ckpt_dir.display()),
            }
        }
        (true, None) => bail!("--resume: no checkpoint in {} to continue from", ckpt_dir.display()),
        (false, Some(_)) => bail!(
            "{} already holds checkpoints of a run: pass --resume to continue it, or choose another --out",
            ckpt_dir.display()
        ),
        (false, None) => None,
    };

    // Data.
    let data_path = cfg.data_path(&dir);
    if cfg.data == "synthetic" && !data_path.join("catalog.jsonl").exists() {
        let pb = crate::progress::progress_bar(cfg.synthetic_images as u64, "synthetic catalogue");
        crate::data::synth::write_catalog(&data_path, cfg.synthetic_images, cfg.seed, cfg.synthetic_size, |k| pb.inc(k as u64))?;
        pb.finish_and_clear();
    }
    let dataset: Arc<dyn Dataset> = Arc::from(open_dataset(&data_path)?);
    if let Some(s) = dataset.skips().summary() {
        eprintln!("note: {s}");
    }
    let vocab_path = match &cfg.vocab {
        Some(v) => v.clone(),
        None => crate::data::dataset::default_vocab(&data_path).with_context(|| {
            format!("no vocabulary: set vocab = \"path/to/vocab.txt\" (none found beside {})", data_path.display())
        })?,
    };
    let text = Arc::new(TextProcessor::from_vocab_file(&vocab_path)?);
    let vocab_sha256 = checkpoint::sha256_file(&vocab_path)?;

    // Model, optimiser and position: from the last checkpoint, or fresh (optionally from `init`).
    type AB<B> = Autodiff<B>;
    let (mut model, mut opt, mut state) = match &resume_from {
        Some(path) => {
            let (state, opt) = checkpoint::load_state::<B>(path, &device)?;
            if state.vocab_sha256 != vocab_sha256 {
                bail!("{} was trained with another vocabulary than {} (SHA-256 differs)", path.display(), vocab_path.display());
            }
            let sd = StateDict::read(path)?;
            let (model, _) = load_state_dict(Pvlt::<AB<B>>::new(&state.model_config, &device), &sd, true)?;
            eprintln!("resuming from {} (step {}, epoch {}, batch {})", path.display(), state.step, state.epoch + 1, state.batch);
            (model, opt, state)
        }
        None => {
            let classes = ClassMap::from_records(dataset.records());
            let init = cfg.init.as_ref().map(|p| StateDict::read(p)).transpose()?;
            let model_config = model_config(&cfg, &text, &classes, init.as_ref())?;
            // The initial weights are drawn on the CPU whatever the device: each backend's
            // generator draws other numbers from one seed, and one seed should mean one model
            // (a GPU run then starts where the CPU run with that seed starts).
            let cpu = Default::default();
            <Cpu as Backend>::seed(&cpu, cfg.seed);
            let mut model = to_backend::<Cpu, AB<B>>(&Pvlt::<Cpu>::new(&model_config, &cpu), &model_config, &device)?;
            <AB<B> as Backend>::seed(&device, cfg.seed);
            if let Some(mut sd) = init {
                drop_mismatched_class_heads(&mut sd, &model_config);
                let (m, report) = load_state_dict(model, &sd, !cfg.init_non_strict)?;
                model = m;
                eprintln!("initial weights {}: {}", sd.path.display(), report.summary());
            }
            let opt = AdamW::new(cfg.adamw());
            let state = TrainState {
                step: 0,
                micro_step: 0,
                epoch: 0,
                batch: 0,
                best_val_loss: None,
                optim_steps: Default::default(),
                train_config: cfg.clone(),
                model_config,
                classes,
                vocab_sha256,
            };
            (model, opt, state)
        }
    };
    state.train_config = cfg.clone();
    crate::model::weights::write_atomic(&dir.join("config.toml"), cfg.to_toml().as_bytes())?;

    let (train_rows, val_rows) = split_by_product(dataset.records(), cfg.val_fraction, cfg.seed);
    if train_rows.is_empty() {
        bail!("{} has no training rows after the validation split (val_fraction {})", data_path.display(), cfg.val_fraction);
    }
    let pretrain = cfg.task == Task::Pretrain;
    let loader_config = LoaderConfig {
        batch_size: cfg.batch_size,
        image_size: cfg.image_size,
        max_len: cfg.max_len,
        seed: cfg.seed,
        workers: cfg.workers,
        prefetch: 4,
        shuffle: true,
        pretrain,
        mask_grid: cfg.mask_grid,
        mlm_probability: cfg.mlm_probability,
    };
    let classes = Arc::new(state.classes.clone());
    let n_train = train_rows.len();
    let train_loader = Arc::new(Loader::new(dataset.clone(), text.clone(), classes.clone(), train_rows, loader_config.clone())?);
    let val_loader = (!val_rows.is_empty())
        .then(|| Loader::new(dataset.clone(), text.clone(), classes.clone(), val_rows.clone(), LoaderConfig { shuffle: false, ..loader_config.clone() }))
        .transpose()?
        .map(Arc::new);

    let batches = train_loader.batches_per_epoch();
    // Micro-batches per optimiser step: accumulation steps times devices, each taking one.
    let micro_batches = cfg.accum_steps * devices.len();
    let steps_per_epoch = batches.div_ceil(micro_batches);
    let global_batch = cfg.batch_size * micro_batches;
    let schedule = LrSchedule {
        lr: scaled_lr(cfg.base_lr, global_batch),
        warmup_lr: cfg.warmup_lr,
        min_lr: cfg.min_lr,
        warmup_epochs: cfg.warmup_epochs,
        epochs: cfg.epochs as f64,
        steps_per_epoch,
    };
    let total_steps = (steps_per_epoch * cfg.epochs).min(cfg.max_steps.unwrap_or(usize::MAX));
    let heads = state.model_config.heads;
    let train_mode = pretrain || cfg.train_mode;
    eprintln!(
        "{} {} on {} ({} training rows, {} validation rows; {} steps of {} samples, peak lr {:.3e}); run folder {}",
        if pretrain { "pre-training" } else { "fine-tuning" },
        state.model_config.variant_name().unwrap_or("custom PVLT"),
        data_path.display(),
        n_train,
        val_rows.len(),
        total_steps,
        global_batch,
        schedule.lr,
        dir.display()
    );

    let mut log = MetricsLog::open(&dir.join("metrics.jsonl"), resume_from.as_ref().map(|_| state.step))?;
    install_ctrlc();
    STOP.store(false, Ordering::SeqCst);
    let pb = crate::progress::progress_bar(total_steps as u64, "train");
    pb.set_position(state.step as u64);
    pb.reset_eta();

    let t_run = Instant::now();
    let mut samples_run = 0usize;
    let (mut t_log, mut samples_log, mut batches_log) = (Instant::now(), 0usize, 0usize);
    let mut last_ckpt: Option<PathBuf> = resume_from.clone();
    let mut last_val = None;
    let mut accumulator = GradientsAccumulator::<Pvlt<AB<B>>>::new();
    let mut micro_in_step = 0usize;
    let mut group: Vec<(usize, Batch, bool)> = Vec::with_capacity(devices.len());
    let mut sums: Vec<(&'static str, f64)> = vec![];
    let decay_rule = |name: &str, shape: &[usize]| decays(name, shape);
    let mut interrupted = false;

    'epochs: while state.step < total_steps && state.epoch < cfg.epochs {
        let epoch = state.epoch;
        let start = state.batch;
        for (bi, batch) in (start..batches).zip(train_loader.epoch(epoch as u64, start)) {
            let end_of_epoch = bi + 1 == batches;
            if !batch.is_empty() {
                let masked = pretrain && state.micro_step % 2 == 1;
                group.push((bi, batch, masked));
            }
            state.micro_step += 1;
            state.batch = bi + 1;
            if end_of_epoch {
                state.epoch = epoch + 1;
                state.batch = 0;
            }
            if group.len() < devices.len() && !end_of_epoch {
                continue; // one micro-batch per device
            }
            if !group.is_empty() {
                <AB<B> as Backend>::seed(&device, batch_seed(cfg.seed, state.micro_step - 1));
                let results = data_parallel::<B>(&model, &group, &devices, heads, train_mode, cfg.precision, micro_batches);
                for ((bi, batch, _), (values, grads)) in group.drain(..).zip(results) {
                    if let Some((term, v)) = values.iter().find(|(_, v)| !v.is_finite()) {
                        pb.abandon();
                        let ids: Vec<&str> = batch.indices.iter().map(|&i| dataset.records()[i].id.as_str()).collect();
                        bail!(
                            "stopping: loss term '{term}' is {v} at step {} (epoch {}, batch {bi}; items {}). The last good checkpoint is {}. \
                             Lower base_lr or set clip_grad, then --resume.",
                            state.step + 1,
                            epoch + 1,
                            ids.join(", "),
                            last_ckpt.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "none (no checkpoint written yet)".into())
                        );
                    }
                    for (name, v) in &values {
                        match sums.iter_mut().find(|(n, _)| n == name) {
                            Some(e) => e.1 += v,
                            None => sums.push((name, *v)),
                        }
                    }
                    accumulator.accumulate(&model, grads);
                    samples_run += batch.len();
                    samples_log += batch.len();
                    batches_log += 1;
                }
                micro_in_step += 1;
            }
            if micro_in_step < cfg.accum_steps && !end_of_epoch {
                continue;
            }
            if micro_in_step == 0 {
                continue; // a whole accumulation window of unreadable images
            }

            // One optimiser step.
            let mut grads = accumulator.grads();
            let norm = grad_norm(&model, &grads);
            let lr = schedule.at(state.step);
            model = opt.step(model, &mut grads, lr, clip_factor(norm, cfg.clip_grad), &decay_rule);
            state.step += 1;
            pb.inc(1);

            if state.step % cfg.log_every == 0 || state.step == total_steps {
                let secs = t_log.elapsed().as_secs_f64();
                let sps = samples_log as f64 / secs.max(1e-9);
                let mean = |v: f64| v / batches_log.max(1) as f64;
                let mut pairs: Vec<(&str, Option<serde_json::Value>)> = vec![
                    ("kind", Some(json!("train"))),
                    ("step", Some(json!(state.step))),
                    ("epoch", Some(json!(state.step as f64 / steps_per_epoch as f64))),
                    ("lr", Some(json!(lr))),
                    ("grad_norm", Some(json!(norm))),
                    ("samples_per_s", Some(json!(sps))),
                ];
                for (name, v) in &sums {
                    pairs.push((name, Some(json!(mean(*v)))));
                }
                log.write(&record(&pairs))?;
                let msg: Vec<String> = sums.iter().map(|(n, v)| format!("{n} {:.3}", mean(*v))).collect();
                pb.set_message(format!("{} | lr {lr:.2e} | {sps:.1} samples/s", msg.join(" ")));
                sums.clear();
                t_log = Instant::now();
                samples_log = 0;
                batches_log = 0;
            }
            micro_in_step = 0;

            let done = state.step >= total_steps;
            let stop = STOP.load(Ordering::SeqCst);
            let val_due = if cfg.val_every > 0 { state.step % cfg.val_every == 0 } else { end_of_epoch } || done;
            if val_due {
                if let Some(vl) = &val_loader {
                    pb.suspend(|| -> Result<()> {
                        let v = validate(&model.valid(), vl, heads, cfg.val_batches, &device)?;
                        let mut rec = v.clone();
                        rec["kind"] = json!("val");
                        rec["step"] = json!(state.step);
                        log.write(&rec)?;
                        let loss = v["loss"].as_f64().unwrap_or(f64::NAN);
                        if state.best_val_loss.is_none_or(|(b, _)| loss < b) {
                            state.best_val_loss = Some((loss, state.step));
                            save_model(&model.valid(), &state.model_config, &dir.join("best.safetensors"))?;
                        }
                        eprintln!("validation at step {}: {}", state.step, summarize(&v));
                        last_val = Some(v);
                        Ok(())
                    })?;
                    metrics::plot_run(&dir)?;
                }
            }
            let ckpt_due = if cfg.checkpoint_every > 0 { state.step % cfg.checkpoint_every == 0 } else { end_of_epoch } || done || stop;
            if ckpt_due {
                let path = ckpt_dir.join(checkpoint::file_name(state.step));
                checkpoint::save(&path, &model.valid(), &opt, &state)?;
                checkpoint::prune(&ckpt_dir, cfg.keep_last)?;
                last_ckpt = Some(path);
            }
            if stop {
                interrupted = true;
                pb.abandon_with_message("interrupted");
                break 'epochs;
            }
            if done {
                break 'epochs;
            }
        }
    }
    pb.finish();
    metrics::plot_run(&dir)?;
    let final_weights = if interrupted {
        None
    } else {
        let out = dir.join("final");
        let w = out.join("model.safetensors");
        save_model(&model.valid(), &state.model_config, &w)?;
        crate::model::weights::write_atomic(&out.join("classes.json"), serde_json::to_string_pretty(&state.classes)?.as_bytes())?;
        std::fs::copy(&vocab_path, out.join("vocab.txt")).with_context(|| format!("cannot copy {}", vocab_path.display()))?;
        Some(w)
    };
    let secs = t_run.elapsed().as_secs_f64();
    Ok(RunSummary { steps: state.step, final_weights, last_checkpoint: last_ckpt, samples_per_s: samples_run as f64 / secs.max(1e-9), last_val, interrupted })
}

pub fn summarize(v: &serde_json::Value) -> String {
    v.as_object()
        .map(|o| {
            o.iter()
                .filter_map(|(k, x)| Some(match x.as_u64() {
                    Some(n) => format!("{k} {n}"),
                    None => format!("{k} {:.4}", x.as_f64()?),
                }))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

/// Validation in eval mode: mean loss, MLM accuracy on the corrupted positions, ITM accuracy,
/// reconstruction PSNR (input: the grid-masked image, target: the clean one), recognition accuracy.
pub fn validate<B: Backend>(model: &Pvlt<B>, loader: &Arc<Loader>, heads: HeadSet, max_batches: usize, device: &B::Device) -> Result<serde_json::Value> {
    let n = if max_batches == 0 { loader.batches_per_epoch() } else { max_batches.min(loader.batches_per_epoch()) };
    let (mut loss, mut batches) = (0.0, 0usize);
    let (mut mlm_ok, mut mlm_n, mut itm_ok, mut sup_ok, mut sup_n, mut sub_ok, mut sub_n, mut rows) = (0, 0, 0, 0, 0, 0, 0, 0);
    let (mut se, mut px, mut mlm_other_ok, mut mlm_other_n) = (0.0f64, 0usize, 0usize, 0usize);
    let argmax = |t: Tensor<B, 2>| -> Vec<i64> { t.argmax(1).into_data().convert::<i64>().to_vec().unwrap_or_default() };
    // Correct argmax predictions over the rows with a label (negative labels: none / ignored).
    let acc = |logits: Option<Tensor<B, 2>>, labels: &[i64], ok: &mut usize, n: &mut usize| {
        if let Some(l) = logits {
            for (p, &y) in argmax(l).iter().zip(labels) {
                if y >= 0 {
                    *n += 1;
                    *ok += (*p == y) as usize;
                }
            }
        }
    };
    // `[B, 1, C]` head output -> `[B, C]`.
    let rows2 = |t: &Option<Tensor<B, 3>>| {
        t.clone().map(|t| {
            let [b, _, c] = t.dims();
            t.reshape([b, c])
        })
    };
    for batch in loader.epoch(0, 0).take(n) {
        if batch.is_empty() {
            continue;
        }
        let db = to_device::<B>(&batch, true, device);
        let clean = db.targets.clean_images.clone();
        let mlm_rows = || Some(db.targets.mlm.rows.clone());
        let (_, mlm_labels) = mlm_positions(&batch.mlm_labels);
        // The same texts with the images rotated by half a batch (validation rows come in product
        // order, so the partner is another product's): masked words predicted as well as with the
        // right image mean the text stream does not use the image (yet); ITM cannot learn before
        // it does.
        let nb = batch.len();
        if heads.mlm && nb > 1 {
            let k = nb / 2;
            let other = Tensor::cat(vec![db.input.clone().slice(k..nb), db.input.clone().slice(0..k)], 0);
            let out = model.forward_mlm_at(other, db.ids.clone(), HeadSet { mlm: true, ..HeadSet::NONE }, false, mlm_rows());
            acc(out.mlm_logits_at, &mlm_labels, &mut mlm_other_ok, &mut mlm_other_n);
        }
        let out = model.forward_mlm_at(db.input, db.ids, heads, false, mlm_rows());
        let l = losses(&out, &db.targets, heads);
        loss += l.total.into_scalar().elem::<f64>();
        batches += 1;
        rows += batch.len();
        acc(out.mlm_logits_at, &mlm_labels, &mut mlm_ok, &mut mlm_n);
        if let Some(logits) = rows2(&out.itm_logits) {
            itm_ok += argmax(logits).iter().zip(&batch.itm_labels).filter(|(p, y)| p == y).count();
        }
        acc(rows2(&out.sup_cls_logits), &batch.sup_labels, &mut sup_ok, &mut sup_n);
        acc(rows2(&out.sub_cls_logits), &batch.sub_labels, &mut sub_ok, &mut sub_n);
        if let Some(rec) = out.t2i_logits {
            se += rec.sub(clean).powf_scalar(2.0).sum().into_scalar().elem::<f64>();
            px += batch.images.len();
        }
    }
    if batches == 0 {
        return Err(anyhow!("validation: no readable batch"));
    }
    let ratio = |a: usize, b: usize| (b > 0).then(|| a as f64 / b as f64);
    let mut v = json!({ "loss": loss / batches as f64, "rows": rows });
    let o = v.as_object_mut().expect("object");
    let mut put = |k: &str, x: Option<f64>| {
        if let Some(x) = x {
            o.insert(k.into(), json!(x));
        }
    };
    put("mlm_acc", ratio(mlm_ok, mlm_n));
    put("mlm_acc_other_image", ratio(mlm_other_ok, mlm_other_n));
    put("itm_acc", heads.itm.then(|| itm_ok as f64 / rows as f64));
    put("psnr", (px > 0).then(|| 10.0 * (1.0 / (se / px as f64)).log10()));
    put("sup_acc", ratio(sup_ok, sup_n));
    put("sub_acc", ratio(sub_ok, sub_n));
    Ok(v)
}
