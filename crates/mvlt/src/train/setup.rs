//! Everything a run needs before its first step: the run folder (and the checkpoint to resume
//! from), the data and vocabulary, the model with its optimiser and position, and the plan of
//! loaders and steps.

use super::checkpoint::{self, TrainState};
use super::config::{Task, TrainConfig};
use super::ema::WeightAverage;
use super::optim::AdamW;
use super::schedule::{scaled_lr, LrSchedule};
use crate::data::dataset::{open_dataset, vocab_beside_data, ClassMap, Dataset};
use crate::data::loader::{Loader, LoaderConfig};
use crate::data::text::{MlmPolicy, TextProcessor};
use crate::device::Cpu;
use crate::model::weights::{load_state_dict, resolve_config, to_backend, StateDict};
use crate::model::{HeadSet, Pvlt, PvltConfig};
use anyhow::{bail, Context, Result};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The run folder, and the checkpoint a resumed run continues from.
pub struct RunFolder {
    pub dir: PathBuf,
    pub checkpoints: PathBuf,
    pub resume_from: Option<PathBuf>,
}

impl RunFolder {
    /// The folder another process prepared (rank 0 of a distributed launch), resuming from the
    /// checkpoint it chose.
    pub fn joined(dir: &Path, resume_from: Option<PathBuf>) -> RunFolder {
        RunFolder { dir: dir.to_path_buf(), checkpoints: dir.join("checkpoints"), resume_from }
    }

    /// Create the folder of a new run (refusing one that holds a run already), or find the
    /// checkpoint to resume: the newest that loads, a truncated newer one reported and skipped.
    pub fn prepare(dir: &Path, resume: bool) -> Result<RunFolder> {
        if resume && !dir.is_dir() {
            bail!("--resume: the run folder {} does not exist (give the --out of the run to continue)", dir.display());
        }
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create run folder {}", dir.display()))?;
        let checkpoints = dir.join("checkpoints");
        // A write cut short (kill -9, a full disk before this version) left its temporary file:
        // it holds no data a resume needs, and it may be what fills the disk.
        for folder in [dir.to_path_buf(), checkpoints.clone(), dir.join("final")] {
            let (n, bytes) = crate::files::remove_stale_temporaries(&folder)?;
            if n > 0 {
                tracing::warn!(
                    "removed {n} temporary file(s) ({:.1} MB) left in {} by an interrupted write",
                    bytes as f64 / 1e6,
                    folder.display()
                );
            }
        }
        let existing = checkpoint::list(&checkpoints);
        let resume_from = match (resume, existing.last()) {
            (true, Some(_)) => {
                let (found, skipped) = checkpoint::newest_loadable(&checkpoints);
                for (p, why) in &skipped {
                    // Renamed aside so that pruning never keeps it in place of a good one.
                    let aside = p.with_extension("safetensors.broken");
                    let moved = std::fs::rename(p, &aside).is_ok();
                    tracing::info!(
                        "warning: skipping checkpoint {}: {why}{}",
                        p.display(),
                        if moved { format!(" (renamed to {})", aside.display()) } else { String::new() }
                    );
                }
                match found {
                    Some(p) => Some(p),
                    None => bail!(
                        "--resume: none of the {} checkpoints in {} can be loaded (see the warnings above)",
                        existing.len(),
                        checkpoints.display()
                    ),
                }
            }
            (true, None) => bail!("--resume: no checkpoint in {} to continue from", checkpoints.display()),
            (false, Some(_)) => bail!(
                "{} already holds checkpoints of a run: pass --resume to continue it, or choose another --out",
                checkpoints.display()
            ),
            (false, None) => None,
        };
        Ok(RunFolder { dir: dir.to_path_buf(), checkpoints, resume_from })
    }
}

/// The data of a run: the dataset (the synthetic catalogue is written on first use) and its
/// vocabulary.
pub struct RunData {
    pub path: PathBuf,
    pub dataset: Arc<dyn Dataset>,
    pub text: Arc<TextProcessor>,
    pub vocab_path: PathBuf,
    pub vocab_sha256: String,
}

impl RunData {
    pub fn open(cfg: &TrainConfig, dir: &Path) -> Result<RunData> {
        let path = cfg.data_path(dir);
        if cfg.data == super::config::DataSource::Synthetic && !path.join("catalog.jsonl").exists() {
            let pb = crate::progress::progress_bar(cfg.synthetic_images as u64, "synthetic catalogue");
            crate::data::synth::write_catalog(&path, cfg.synthetic_images, cfg.seed, cfg.synthetic_size, |k| {
                pb.inc(k as u64)
            })?;
            pb.finish_and_clear();
        }
        let dataset: Arc<dyn Dataset> = Arc::from(open_dataset(&path)?);
        if let Some(s) = dataset.skips().summary() {
            tracing::warn!("{s}");
        }
        let vocab_path = match &cfg.vocab {
            Some(v) => v.clone(),
            None => vocab_beside_data(&path).with_context(|| {
                format!("no vocabulary: set vocab = \"path/to/vocab.txt\" (none found beside {})", path.display())
            })?,
        };
        let text = Arc::new(TextProcessor::from_vocab_file(&vocab_path)?);
        let vocab_sha256 = checkpoint::sha256_file(&vocab_path)?;
        Ok(RunData { path, dataset, text, vocab_path, vocab_sha256 })
    }
}

/// The heads a task trains.
pub fn heads_of(cfg: &TrainConfig) -> HeadSet {
    match cfg.task {
        Task::Pretrain => {
            use super::config::Objective;
            let on = |o: Objective| cfg.objectives.contains(&o);
            HeadSet {
                mlm: on(Objective::Mlm),
                itm: on(Objective::Itm),
                t2i: on(Objective::T2i),
                cls: cfg.with_cls,
                itc: cfg.with_itc,
            }
        }
        Task::Finetune => HeadSet::FINETUNE,
    }
}

/// The architecture to train: from `init` weights when given (their stored or inferred config),
/// else `cfg.model`; then the data-dependent parts (vocabulary, classes, text length, heads).
pub fn model_config(
    cfg: &TrainConfig,
    text: &TextProcessor,
    classes: &ClassMap,
    init: Option<&StateDict>,
) -> Result<PvltConfig> {
    let mut m = match init {
        Some(sd) => resolve_config(None, Some(sd)).or_else(|_| cfg.model.resolve())?,
        None => {
            let mut m = cfg.model.resolve()?;
            m.img_size = cfg.image_size;
            m.num_text_tokens = cfg.max_len;
            m.vocab_size = text.vocab_size;
            m
        }
    };
    if m.num_text_tokens != cfg.max_len {
        bail!(
            "the initial weights take {} text tokens but max_len is {}: set max_len = {}",
            m.num_text_tokens,
            cfg.max_len,
            m.num_text_tokens
        );
    }
    if m.vocab_size != text.vocab_size {
        bail!(
            "wrong vocabulary: the model has {} word embeddings but the vocabulary file has {} entries (use the vocabulary the weights were trained with)",
            m.vocab_size,
            text.vocab_size
        );
    }
    // Whatever the weights started from, they are now trained on `image_size` images.
    m.input_size = Some(cfg.image_size);
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
            tracing::warn!("{} has {have} classes in {head}*, the data {n}: that head starts fresh", sd.path.display());
        }
    }
}

/// Where a run starts: model, optimiser and position.
pub struct StartPoint<B: Backend> {
    pub model: Pvlt<Autodiff<B>>,
    pub opt: AdamW<B>,
    pub average: Option<WeightAverage<B>>,
    pub state: TrainState,
}

impl<B: Backend> StartPoint<B> {
    /// From the checkpoint to resume, or fresh (optionally from `init` weights).
    pub fn new(cfg: &TrainConfig, folder: &RunFolder, data: &RunData, device: &B::Device) -> Result<Self> {
        let mut start = match &folder.resume_from {
            Some(path) => Self::resume(path, data, device)?,
            None => Self::fresh(cfg, data, device)?,
        };
        // The weight average follows this run's `ema_decay`: a resume may switch it on (it starts
        // from the resumed weights) or off.
        start.average = match (cfg.ema_decay, start.average.take()) {
            (Some(decay), Some(mut a)) => {
                a.decay = decay;
                Some(a)
            }
            (Some(decay), None) => {
                if folder.resume_from.is_some() {
                    tracing::info!("ema_decay = {decay}: the weight average starts at the resumed weights");
                }
                Some(WeightAverage::new(decay))
            }
            (None, Some(_)) => {
                tracing::info!(
                    "no ema_decay: the checkpoint's weight average is dropped; the run exports its last weights"
                );
                None
            }
            (None, None) => None,
        };
        start.state.train_config = cfg.clone();
        Ok(start)
    }

    fn resume(path: &Path, data: &RunData, device: &B::Device) -> Result<Self> {
        let checkpoint::Resumed { state, opt, average } = checkpoint::load_state::<B>(path, device)?;
        if state.vocab_sha256 != data.vocab_sha256 {
            bail!(
                "{} was trained with another vocabulary than {} (SHA-256 differs)",
                path.display(),
                data.vocab_path.display()
            );
        }
        let sd = StateDict::read(path)?;
        let (model, _) = load_state_dict(Pvlt::<Autodiff<B>>::new(&state.model_config, device), &sd, true)?;
        // The optimiser moments and the weight average are flat: each must have its parameter's
        // size, or the first step (or the first validation) would fail deep inside the backend.
        let moments = opt.state.iter().flat_map(|(k, m)| [("optim.exp_avg", k, &m.m), ("optim.exp_avg_sq", k, &m.v)]);
        let averaged = average.iter().flat_map(|a| &a.average).map(|(k, t)| ("ema", k, t));
        for (prefix, key, t) in moments.chain(averaged) {
            let expected = sd.tensors.get(key).map(|w| w.shape.num_elements());
            if expected != Some(t.dims()[0]) {
                bail!(
                    "{}: {prefix}.{key} holds {} values but the model's {key} {}; the checkpoint is corrupt",
                    path.display(),
                    t.dims()[0],
                    expected.map_or("does not exist".to_string(), |n| format!("has {n}"))
                );
            }
        }
        tracing::info!(
            "resuming from {} (step {}, epoch {}, batch {})",
            path.display(),
            state.step,
            state.epoch + 1,
            state.batch
        );
        Ok(StartPoint { model, opt, average, state })
    }

    fn fresh(cfg: &TrainConfig, data: &RunData, device: &B::Device) -> Result<Self> {
        let classes = ClassMap::from_records(data.dataset.records());
        let init = cfg.init.as_ref().map(|p| StateDict::read(p)).transpose()?;
        let model_config = model_config(cfg, &data.text, &classes, init.as_ref())?;
        // The initial weights are drawn on the CPU whatever the device: each backend's generator
        // draws other numbers from one seed, and one seed should mean one model (a GPU run then
        // starts where the CPU run with that seed starts).
        let cpu = Default::default();
        <Cpu as Backend>::seed(&cpu, cfg.seed);
        let mut model = to_backend::<Cpu, Autodiff<B>>(&Pvlt::<Cpu>::new(&model_config, &cpu), &model_config, device)?;
        <Autodiff<B> as Backend>::seed(device, cfg.seed);
        if let Some(mut sd) = init {
            drop_mismatched_class_heads(&mut sd, &model_config);
            let (m, report) = load_state_dict(model, &sd, !cfg.init_non_strict)?;
            model = m;
            tracing::info!("initial weights {}: {}", sd.path.display(), report.summary());
        }
        let state = TrainState {
            step: 0,
            micro_step: 0,
            epoch: 0,
            batch: 0,
            best_val_loss: None,
            stopped_early: false,
            optim_steps: Default::default(),
            ema_updates: 0,
            train_config: cfg.clone(),
            model_config,
            classes,
            vocab_sha256: data.vocab_sha256.clone(),
            micro_batches: None,
        };
        Ok(StartPoint { model, opt: AdamW::new(cfg.adamw()), average: None, state })
    }
}

/// The loaders and the step arithmetic of a run.
pub struct Plan {
    pub train_loader: Arc<Loader>,
    pub val_loader: Option<Arc<Loader>>,
    pub train_rows: usize,
    pub val_rows: usize,
    /// Training batches per epoch.
    pub batches: usize,
    /// Micro-batches per optimiser step: accumulation steps times devices, each taking one.
    pub micro_batches: usize,
    pub steps_per_epoch: usize,
    /// Samples per optimiser step.
    pub global_batch: usize,
    pub schedule: LrSchedule,
    pub total_steps: usize,
}

impl Plan {
    pub fn new(cfg: &TrainConfig, data: &RunData, classes: &ClassMap, devices: usize) -> Result<Plan> {
        let (train_rows, val_rows) = cfg.split(data.dataset.records());
        if train_rows.is_empty() {
            bail!(
                "{} has no training rows after the validation split (val_fraction {})",
                data.path.display(),
                cfg.val_fraction
            );
        }
        let loader_config = LoaderConfig {
            batch_size: cfg.batch_size,
            image_size: cfg.image_size,
            max_len: cfg.max_len,
            seed: cfg.seed,
            workers: cfg.workers,
            prefetch: 4,
            shuffle: true,
            pretrain: cfg.task == Task::Pretrain,
            mask_grid: cfg.mask_grid,
            mlm: MlmPolicy {
                probability: cfg.mlm_probability,
                focus_ids: match &cfg.mlm_focus {
                    Some(spec) => data.text.piece_ids(&super::config::focus_words(spec)?)?,
                    None => vec![],
                },
                focus_probability: cfg.mlm_focus_probability,
            },
            own_captions: cfg.with_itc,
            mlm_on_negatives: cfg.mlm_on_negatives,
            augment: cfg.augment(),
        };
        let classes = Arc::new(classes.clone());
        let (n_train, n_val) = (train_rows.len(), val_rows.len());
        let loader = |rows: Vec<usize>, config: LoaderConfig| {
            Loader::new(data.dataset.clone(), data.text.clone(), classes.clone(), rows, config).map(Arc::new)
        };
        let train_loader = loader(train_rows, loader_config.clone())?;
        let val_loader = (!val_rows.is_empty())
            .then(|| loader(val_rows, LoaderConfig { shuffle: false, augment: None, ..loader_config }))
            .transpose()?;

        let batches = train_loader.batches_per_epoch();
        let micro_batches = cfg.accum_steps * devices;
        let steps_per_epoch = batches.div_ceil(micro_batches);
        let global_batch = cfg.batch_size * micro_batches;
        let total_steps = (steps_per_epoch * cfg.epochs).min(cfg.max_steps.unwrap_or(usize::MAX));
        let schedule = LrSchedule {
            lr: scaled_lr(cfg.base_lr, global_batch),
            warmup_lr: cfg.warmup_lr,
            min_lr: cfg.min_lr,
            warmup_epochs: cfg.warmup_epochs,
            epochs: if cfg.anneal_to_max_steps {
                total_steps as f64 / steps_per_epoch.max(1) as f64
            } else {
                cfg.epochs as f64
            },
            steps_per_epoch,
        };
        Ok(Plan {
            train_loader,
            val_loader,
            train_rows: n_train,
            val_rows: n_val,
            batches,
            micro_batches,
            steps_per_epoch,
            global_batch,
            schedule,
            total_steps,
        })
    }
}
