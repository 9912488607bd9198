//! A training run's settings: a recipe file (TOML) with command-line overrides, saved resolved with
//! the run.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A pre-training objective of the reference (`loss_type` itm + mlm + t2i).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum Objective {
    /// Masked language modelling.
    Mlm,
    /// Image-text matching.
    Itm,
    /// Masked image reconstruction (text to image).
    T2i,
}

impl TryFrom<String> for Objective {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "mlm" => Ok(Objective::Mlm),
            "itm" => Ok(Objective::Itm),
            "t2i" => Ok(Objective::T2i),
            _ => Err(format!("objectives: unknown objective {s:?} (known: mlm, itm, t2i)")),
        }
    }
}

/// The reference's pre-training objectives, all three.
pub const PRETRAIN_OBJECTIVES: [Objective; 3] = [Objective::Mlm, Objective::Itm, Objective::T2i];

/// The architecture to train: a preset by name (tiny, small, medium, large, micro) or a model
/// config file (JSON). Written in recipes as one string.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum ModelSpec {
    Preset(crate::model::config::Preset),
    File(PathBuf),
}

impl ModelSpec {
    /// The architecture it names.
    pub fn resolve(&self) -> Result<crate::model::PvltConfig> {
        match self {
            ModelSpec::Preset(p) => Ok(p.config()),
            ModelSpec::File(f) => crate::model::PvltConfig::resolve(&f.display().to_string()),
        }
    }
}

impl From<String> for ModelSpec {
    fn from(s: String) -> Self {
        match crate::model::config::Preset::parse(&s) {
            Some(p) => ModelSpec::Preset(p),
            None => ModelSpec::File(s.into()),
        }
    }
}

impl From<ModelSpec> for String {
    fn from(m: ModelSpec) -> String {
        match m {
            ModelSpec::Preset(p) => p.name().to_string(),
            ModelSpec::File(f) => f.display().to_string(),
        }
    }
}

impl std::str::FromStr for ModelSpec {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(ModelSpec::from(s.to_string()))
    }
}

/// Where the training data comes from: the built-in synthetic catalogue (written into the run
/// folder on first use) or a dataset (JSONL catalogue, Fashion-Gen .h5, the authors' folder).
/// Written in recipes as `"synthetic"` or the dataset's path.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum DataSource {
    Synthetic,
    Path(PathBuf),
}

impl From<String> for DataSource {
    fn from(s: String) -> Self {
        if s == "synthetic" {
            DataSource::Synthetic
        } else {
            DataSource::Path(s.into())
        }
    }
}

impl From<DataSource> for String {
    fn from(d: DataSource) -> String {
        match d {
            DataSource::Synthetic => "synthetic".into(),
            DataSource::Path(p) => p.display().to_string(),
        }
    }
}

impl std::str::FromStr for DataSource {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(DataSource::from(s.to_string()))
    }
}

/// A [`DeviceSpec`](crate::device::DeviceSpec) as recipes write it (`"cpu"`, `"cuda:1"`).
mod device_text {
    use crate::device::DeviceSpec;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &DeviceSpec, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&d.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DeviceSpec, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(|e: anyhow::Error| serde::de::Error::custom(format!("{e:#}")))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// MLM + ITM + masked image reconstruction (+ recognition with `with_cls`).
    Pretrain,
    /// Main- and sub-category recognition from pre-trained weights.
    Finetune,
}

impl Task {
    /// Its name in recipes (`task = "..."`, the serde name) and its default run folder.
    pub fn name(self) -> &'static str {
        match self {
            Task::Pretrain => "pretrain",
            Task::Finetune => "finetune",
        }
    }

    /// The built-in recipe that runs in minutes on a CPU.
    pub fn cpu_recipe(self) -> &'static str {
        match self {
            Task::Pretrain => "cpu-pretrain",
            Task::Finetune => "cpu-finetune",
        }
    }
}

pub use super::precision::Precision;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub task: Task,
    /// Architecture: a preset (tiny, small, medium, large, micro) or a model config file. Ignored
    /// when `init` weights carry their own config.
    pub model: ModelSpec,
    /// Weights to start from (ours or the authors' .pth); fine-tuning needs them.
    pub init: Option<PathBuf>,
    /// Load `init` non-strictly (only matching keys): pre-training weights into the fine-tuning
    /// model, PVT ImageNet weights into PVLT.
    pub init_non_strict: bool,
    /// A dataset (JSONL catalogue, Fashion-Gen .h5, authors' folder) or "synthetic": the built-in
    /// catalogue, written into the run folder on first use.
    pub data: DataSource,
    pub synthetic_images: usize,
    pub synthetic_size: u32,
    /// Vocabulary (bert-base-uncased vocab.txt); default: vocab.txt beside the data.
    pub vocab: Option<PathBuf>,
    /// Validation share, split by product.
    pub val_fraction: f64,
    pub image_size: usize,
    /// Text length T (the reference: 128).
    pub max_len: usize,
    /// Reconstruction mask grid side in cells (the reference: 16).
    pub mask_grid: usize,
    /// Share of word pieces chosen for MLM (the reference: 0.15).
    pub mlm_probability: f64,
    /// Words MLM chooses with `mlm_focus_probability` instead: "synthetic" (the built-in
    /// catalogue's attribute words: colours, patterns, garment names) or a file with one word per
    /// line. Off in the authors' recipes.
    pub mlm_focus: Option<String>,
    pub mlm_focus_probability: f64,
    /// Predict masked words on mismatched (ITM negative) pairs too, as the reference does. Off:
    /// only matched pairs carry MLM labels (ALBEF), so the image always tells the truth about the
    /// words it is asked for; the negatives' text is still masked alike, so the presence of
    /// [MASK] says nothing about the match.
    pub mlm_on_negatives: bool,
    /// Per-step batch (per device).
    pub batch_size: usize,
    /// Batches whose gradients are summed before one optimiser step.
    pub accum_steps: usize,
    pub epochs: usize,
    /// Stop after this many optimiser steps (the schedule still spans `epochs`, unless
    /// `anneal_to_max_steps`).
    pub max_steps: Option<usize>,
    /// End the cosine at the run's last step (`max_steps`, when it stops the run before
    /// `epochs`) instead of at `epochs`: a run cut short by a time budget still anneals, rather
    /// than stopping near the peak rate. Off in the authors' recipes (their runs end at `epochs`).
    pub anneal_to_max_steps: bool,
    /// Learning rate for a global batch of 512 (scaled linearly, as the reference does).
    pub base_lr: f64,
    pub warmup_epochs: f64,
    pub warmup_lr: f64,
    pub min_lr: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Clip the global gradient norm to this (off when absent).
    pub clip_grad: Option<f64>,
    /// Keep an exponential moving average of the weights with this decay, and validate and export
    /// it instead of the last step's weights (`ema.rs`; checkpoints keep both). Off when absent, as
    /// in the authors' recipes.
    pub ema_decay: Option<f64>,
    pub drop_path_rate: f64,
    /// Dropout after the text embeddings.
    pub dropout: f64,
    /// Pre-training: the reference's objectives to train, a non-empty subset of "mlm", "itm",
    /// "t2i" (all three, the reference's `loss_type`, by default). Fewer make ablations: which
    /// term teaches what.
    pub objectives: Vec<Objective>,
    /// Pre-training: also train the recognition heads.
    pub with_cls: bool,
    /// Pre-training: also train image-text contrastive embeddings (ITC, ours; `model::ItcHead`).
    pub with_itc: bool,
    /// Pre-training with ITC: ITM negatives take a caption of the batch drawn by its contrastive
    /// similarity to the image, not a random one (ALBEF's hard negatives; `hard_negatives.rs`).
    pub itm_hard_negatives: bool,
    /// With `itm_hard_negatives`: the first (1-based) step whose negatives are mined; the steps before
    /// take the loader's random ones, so ITM learns the easy task before the hard one (a curriculum).
    /// 0 or 1: from the first step.
    pub itm_hard_negatives_from_step: usize,
    /// Fine-tuning: train mode (dropout, BatchNorm batch statistics). The reference fine-tunes in
    /// eval mode, the default here too.
    pub train_mode: bool,
    /// Random crops of each training image keeping at least this share of its area (1: none). With
    /// `augment_flip`, the augmentation that keeps what a caption says (no colour change): for
    /// catalogues small enough to be memorised. Not in the reference.
    pub augment_min_scale: f64,
    /// Mirror training images left-right half the time.
    pub augment_flip: bool,
    /// The validation figure that picks `best.safetensors` (and early stopping): "loss" (lowest),
    /// or an accuracy the validation reports, highest best: "itm_acc", "itc_acc", "mlm_acc",
    /// "sup_acc", "sub_acc".
    pub select_by: String,
    /// Stop when `select_by` has not improved for this many steps (checked at each validation);
    /// off when absent.
    pub early_stop_steps: Option<usize>,
    /// Export the best validated weights (`select_by`) as the run's result instead of the last.
    pub export_best: bool,
    /// Sub-categories whose rows are in neither split: the run never sees them, so its weights
    /// can be evaluated on products of kinds they never met (`mvlt demo --data`'s held-apart check).
    pub hold_apart_subcategories: Vec<String>,
    pub seed: u64,
    /// Data-loading threads.
    pub workers: usize,
    #[serde(with = "device_text")]
    pub device: crate::device::DeviceSpec,
    /// Read so that settings files of earlier versions load; at most one index (then the device's).
    /// Several devices train as the ranks of a distributed launch, one process per device
    /// (`torchrun`, docs/DISTRIBUTED.md), which replaced in-process replicas: on 2 CPU cores 2
    /// ranks took 150 samples/s where 2 replicas took 120-132 (`scripts/dist-speed.sh`).
    pub devices: Vec<usize>,
    /// Under a distributed launch (torchrun): seconds any rank waits for the others, at the
    /// rendezvous and in every collective, before it fails naming the ranks it misses. Rank 0
    /// validates and checkpoints while the others wait, so it must cover those too.
    pub dist_timeout_s: f64,
    /// Arithmetic of the forward and backward passes: "f32", or "bf16" (mixed precision: f32
    /// master weights, optimiser and BatchNorm/LayerNorm/softmax/losses; see `precision.rs`).
    pub precision: Precision,
    /// Steps between metric lines (and progress-bar updates of the loss).
    pub log_every: usize,
    /// Steps between validation passes; 0: once per epoch.
    pub val_every: usize,
    /// Cap on validation batches per pass (0: the whole split).
    pub val_batches: usize,
    /// Steps between checkpoints; 0: once per epoch.
    pub checkpoint_every: usize,
    /// How many recent checkpoints to keep (the best is kept apart).
    pub keep_last: usize,
}

/// The validation figures `select_by` may name: the loss (lowest best), then accuracies.
pub const SELECT_BY: [&str; 6] = ["loss", "itm_acc", "itc_acc", "mlm_acc", "sup_acc", "sub_acc"];

impl TrainConfig {
    /// The training and validation rows of `records`: the split by product, less the held-apart
    /// sub-categories.
    pub fn split(&self, records: &[crate::data::dataset::Record]) -> (Vec<usize>, Vec<usize>) {
        let (train, val) = crate::data::dataset::split_by_product(records, self.val_fraction, self.seed);
        let kept = |rows: Vec<usize>| -> Vec<usize> {
            rows.into_iter().filter(|&r| !self.hold_apart_subcategories.contains(&records[r].subcategory)).collect()
        };
        (kept(train), kept(val))
    }

    /// The training images' augmentation, when the settings ask for one.
    pub fn augment(&self) -> Option<crate::data::image::Augment> {
        (self.augment_min_scale < 1.0 || self.augment_flip)
            .then_some(crate::data::image::Augment { min_scale: self.augment_min_scale, flip: self.augment_flip })
    }

    /// A validation record's figure for `select_by`, lower better (an accuracy negated); `None`
    /// when the record lacks it (a head the model does not have).
    pub fn selection_score(&self, val: &serde_json::Value) -> Option<f64> {
        let v = val.get(self.select_by.as_str())?.as_f64()?;
        Some(if self.select_by == "loss" { v } else { -v })
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            task: Task::Pretrain,
            model: ModelSpec::Preset(crate::model::config::Preset::Tiny),
            init: None,
            init_non_strict: true,
            data: DataSource::Synthetic,
            synthetic_images: 2000,
            synthetic_size: 256,
            vocab: None,
            val_fraction: 0.1,
            image_size: 256,
            max_len: 128,
            mask_grid: 16,
            mlm_probability: crate::data::text::MLM_PROBABILITY,
            mlm_focus: None,
            mlm_focus_probability: 0.5,
            mlm_on_negatives: true,
            batch_size: 8,
            accum_steps: 1,
            epochs: 150,
            max_steps: None,
            anneal_to_max_steps: false,
            base_lr: 2.5e-4,
            warmup_epochs: 5.0,
            warmup_lr: 1e-6,
            min_lr: 1e-5,
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            clip_grad: None,
            ema_decay: None,
            drop_path_rate: 0.1,
            dropout: 0.1,
            with_cls: false,
            with_itc: false,
            itm_hard_negatives: false,
            itm_hard_negatives_from_step: 0,
            objectives: PRETRAIN_OBJECTIVES.to_vec(),
            train_mode: false,
            augment_min_scale: 1.0,
            augment_flip: false,
            select_by: "loss".into(),
            early_stop_steps: None,
            export_best: false,
            hold_apart_subcategories: vec![],
            seed: 0,
            workers: 2,
            device: crate::device::DeviceSpec::Cpu,
            devices: vec![],
            dist_timeout_s: 1800.0,
            precision: Precision::F32,
            log_every: 10,
            val_every: 0,
            val_batches: 0,
            checkpoint_every: 0,
            keep_last: 3,
        }
    }
}

/// The words of `mlm_focus`: the synthetic catalogue's attribute words, or a word file's lines.
pub fn focus_words(spec: &str) -> Result<Vec<String>> {
    if spec == "synthetic" {
        return Ok(crate::data::synth::attribute_words());
    }
    let text =
        crate::files::read_text_limited(Path::new(spec), "mlm_focus word list", crate::files::MAX_SMALL_FILE_BYTES)
            .with_context(|| format!("mlm_focus = {spec:?} is neither \"synthetic\" nor a readable word file"))?;
    Ok(text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect())
}

/// A built-in recipe by name, or a recipe file.
pub fn recipe_text(spec: &str) -> Result<String> {
    Ok(match spec {
        "pretrain" => include_str!("../../configs/pretrain.toml").to_string(),
        "finetune" => include_str!("../../configs/finetune.toml").to_string(),
        "cpu-pretrain" => include_str!("../../configs/cpu_pretrain.toml").to_string(),
        "cpu-finetune" => include_str!("../../configs/cpu_finetune.toml").to_string(),
        "demo" => include_str!("../../configs/demo.toml").to_string(),
        "demo-finetune" => include_str!("../../configs/demo_finetune.toml").to_string(),
        "demo-catalogue" => include_str!("../../configs/demo_catalogue.toml").to_string(),
        "demo-catalogue-finetune" => include_str!("../../configs/demo_catalogue_finetune.toml").to_string(),
        path => crate::files::read_text_limited(Path::new(path), "recipe", crate::files::MAX_SMALL_FILE_BYTES)
            .with_context(|| {
                format!("cannot read recipe {path} (built-in recipes: pretrain, finetune, cpu-pretrain, cpu-finetune, demo, demo-finetune, demo-catalogue, demo-catalogue-finetune)")
            })?,
    })
}

/// Builds a [`TrainConfig`]: a recipe, then typed changes ([`with`](Self::with)), then a user's
/// `--set key=value` overrides ([`set`](Self::set)), checked once by [`build`](Self::build). The
/// CLI, the demo and the tests all build their settings this way; only `--set` passes through
/// text, because that is how a user writes it.
#[derive(Clone, Debug)]
pub struct TrainConfigBuilder {
    config: TrainConfig,
}

impl TrainConfigBuilder {
    /// A built-in recipe by name (pretrain, finetune, cpu-pretrain, cpu-finetune, demo,
    /// demo-finetune, demo-catalogue, demo-catalogue-finetune) or a recipe file.
    pub fn recipe(spec: &str) -> Result<Self> {
        Self::parse(&recipe_text(spec)?)
    }

    /// Recipe text (TOML); unset fields take [`TrainConfig::default`].
    pub fn parse(text: &str) -> Result<Self> {
        let table: toml::Table = toml::from_str(text).context("parsing the recipe")?;
        Ok(TrainConfigBuilder { config: from_table(table)? })
    }

    /// Typed changes: `.with(|c| c.epochs = 3)`.
    pub fn with(mut self, change: impl FnOnce(&mut TrainConfig)) -> Self {
        change(&mut self.config);
        self
    }

    /// `key=value` overrides as a user writes them (`--set epochs=3`; values in TOML syntax, a
    /// bare word is a string; `key=` removes an optional setting, restoring its default).
    pub fn set(self, overrides: &[String]) -> Result<Self> {
        if overrides.is_empty() {
            return Ok(self);
        }
        let mut table = toml::Table::try_from(&self.config).context("the settings as a table")?;
        for o in overrides {
            let Some((key, value)) = o.split_once('=') else {
                bail!("override '{o}' is not key=value (e.g. --set epochs=3)");
            };
            let key = key.trim().replace('-', "_");
            let value = value.trim();
            if value.is_empty() {
                table.remove(&key);
                continue;
            }
            let parsed: toml::Value = toml::from_str::<toml::Table>(&format!("v = {value}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(value.to_string()));
            table.insert(key, parsed);
        }
        Ok(TrainConfigBuilder { config: from_table(table)? })
    }

    /// The settings, checked.
    pub fn build(self) -> Result<TrainConfig> {
        self.config.validate()?;
        Ok(self.config)
    }
}

fn from_table(table: toml::Table) -> Result<TrainConfig> {
    table.try_into().map_err(|e: toml::de::Error| anyhow::anyhow!("invalid training setting: {}", e.message()))
}

impl TrainConfig {
    /// Recipe text plus `key=value` overrides (values in TOML syntax; a bare word is a string;
    /// `key=` removes an optional setting).
    pub fn resolve(recipe: &str, overrides: &[String]) -> Result<TrainConfig> {
        TrainConfigBuilder::parse(recipe)?.set(overrides)?.build()
    }

    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("batch_size", self.batch_size),
            ("accum_steps", self.accum_steps),
            ("epochs", self.epochs),
            ("max_len", self.max_len),
            ("log_every", self.log_every),
        ];
        for (name, v) in positive {
            if v == 0 {
                bail!("{name} must be at least 1");
            }
        }
        if !(0.0..1.0).contains(&self.val_fraction) {
            bail!("val_fraction must be in [0, 1), got {}", self.val_fraction);
        }
        if self.mask_grid == 0 || !self.image_size.is_multiple_of(self.mask_grid) {
            bail!("image_size {} is not a multiple of mask_grid {}", self.image_size, self.mask_grid);
        }
        if self.devices.len() > 1 {
            bail!(
                "devices = {:?}: a process trains on one device; several devices train as the ranks of a distributed launch, \
                 one process each: torchrun --nproc-per-node {} --no-python mvlt pretrain --device cuda ... (docs/DISTRIBUTED.md)",
                self.devices,
                self.devices.len()
            );
        }
        if !(self.dist_timeout_s.is_finite() && self.dist_timeout_s >= 1.0 && self.dist_timeout_s <= 86400.0) {
            bail!("dist_timeout_s must be between 1 and 86400 seconds, got {}", self.dist_timeout_s);
        }
        if self.task == Task::Finetune && self.init.is_none() {
            bail!("fine-tuning starts from pre-trained weights: set init = \"path/to/weights\" (ours or the authors' .pth)");
        }
        if self.objectives.is_empty() {
            bail!("objectives is empty: list some of [\"mlm\", \"itm\", \"t2i\"]");
        }
        if self.itm_hard_negatives && !(self.with_itc && self.task == Task::Pretrain) {
            bail!("itm_hard_negatives draws ITM negatives by the contrastive similarity: it needs task = \"pretrain\" and with_itc = true");
        }
        if self.itm_hard_negatives_from_step > 0 && !self.itm_hard_negatives {
            bail!(
                "itm_hard_negatives_from_step = {} has no effect without itm_hard_negatives = true",
                self.itm_hard_negatives_from_step
            );
        }
        if !(self.augment_min_scale >= 0.1 && self.augment_min_scale <= 1.0) {
            bail!("augment_min_scale must be in [0.1, 1] (1: no random crop), got {}", self.augment_min_scale);
        }
        if !SELECT_BY.contains(&self.select_by.as_str()) {
            bail!("select_by = {:?} is not one of {SELECT_BY:?}", self.select_by);
        }
        if self.early_stop_steps == Some(0) {
            bail!("early_stop_steps must be at least 1 (remove it to train without early stopping)");
        }
        if let Some(d) = self.ema_decay.filter(|d| !(*d > 0.0 && *d < 1.0)) {
            bail!("ema_decay must be in (0, 1), got {d} (remove it to train without a weight average)");
        }
        if !(self.mlm_probability > 0.0 && self.mlm_probability <= 1.0) {
            bail!("mlm_probability must be in (0, 1], got {}", self.mlm_probability);
        }
        if !(self.mlm_focus_probability > 0.0 && self.mlm_focus_probability <= 1.0) {
            bail!("mlm_focus_probability must be in (0, 1], got {}", self.mlm_focus_probability);
        }
        for (name, v) in [("dropout", self.dropout), ("drop_path_rate", self.drop_path_rate)] {
            if !(0.0..1.0).contains(&v) {
                bail!("{name} must be in [0, 1), got {v}");
            }
        }
        // The optimiser and its schedule: every rate a finite number >= 0 (the peak above 0),
        // the moment decays in [0, 1), and a clipping norm above 0.
        for (name, v) in [("warmup_lr", self.warmup_lr), ("min_lr", self.min_lr), ("weight_decay", self.weight_decay)] {
            if !(v.is_finite() && v >= 0.0) {
                bail!("{name} must be a number >= 0, got {v}");
            }
        }
        for (name, v) in [("base_lr", self.base_lr), ("eps", self.eps)] {
            if !(v.is_finite() && v > 0.0) {
                bail!("{name} must be a number above 0, got {v}");
            }
        }
        for (name, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                bail!("{name} must be in [0, 1), got {v}");
            }
        }
        if !(self.warmup_epochs.is_finite() && self.warmup_epochs >= 0.0) {
            bail!("warmup_epochs must be a number >= 0, got {}", self.warmup_epochs);
        }
        if let Some(c) = self.clip_grad.filter(|c| !(c.is_finite() && *c > 0.0)) {
            bail!("clip_grad must be a number above 0, got {c} (remove it to train without clipping)");
        }
        crate::data::text::check_max_len(self.max_len)?;
        use crate::data::synth::{MAX_IMAGES, MAX_SIZE, MIN_SIZE};
        if !(MIN_SIZE..=MAX_SIZE).contains(&self.synthetic_size) {
            bail!(
                "synthetic_size must be between {MIN_SIZE} and {MAX_SIZE} pixels (each synthetic image is drawn at that size), got {}",
                self.synthetic_size
            );
        }
        if !(1..=MAX_IMAGES).contains(&self.synthetic_images) {
            bail!("synthetic_images must be between 1 and {MAX_IMAGES}, got {}", self.synthetic_images);
        }
        if self.precision == Precision::Bf16 && self.device == crate::device::DeviceSpec::Wgpu {
            bail!("precision = \"bf16\" does not run on wgpu (its WGSL shaders have no bf16 type): use precision = \"f32\" there");
        }
        Ok(())
    }

    /// The device to train on: `device`, at the index `devices` names when it names one.
    pub fn train_device(&self) -> crate::device::DeviceSpec {
        match (self.device, self.devices.first()) {
            (crate::device::DeviceSpec::Cuda(_), Some(&i)) => crate::device::DeviceSpec::Cuda(i),
            (d, _) => d,
        }
    }

    /// The optimiser settings of this run.
    pub fn adamw(&self) -> super::optim::AdamWConfig {
        super::optim::AdamWConfig {
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
        }
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a TrainConfig always serialises")
    }

    pub fn data_path(&self, run_dir: &Path) -> PathBuf {
        match &self.data {
            DataSource::Synthetic => run_dir.join("synthetic"),
            DataSource::Path(p) => p.clone(),
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn task_names_are_the_serde_names() {
        for t in [Task::Pretrain, Task::Finetune] {
            assert_eq!(serde_json::to_value(t).unwrap(), serde_json::json!(t.name()));
        }
    }
    use super::*;

    #[test]
    fn model_presets_and_files_are_told_apart() {
        use crate::model::config::Preset;
        for p in Preset::ALL {
            assert_eq!(ModelSpec::from(p.name().to_string()), ModelSpec::Preset(p));
            assert_eq!(String::from(ModelSpec::Preset(p)), p.name());
        }
        assert_eq!(ModelSpec::from("pvlt_small".to_string()), ModelSpec::Preset(Preset::Small));
        assert_eq!(ModelSpec::from("my/model.json".to_string()), ModelSpec::File("my/model.json".into()));
        let c = TrainConfigBuilder::parse("model = \"micro\"").unwrap().build().unwrap();
        assert_eq!(c.model, ModelSpec::Preset(Preset::Micro));
    }

    #[test]
    fn recipes_parse_and_overrides_apply() {
        for r in [
            "pretrain",
            "finetune",
            "cpu-pretrain",
            "cpu-finetune",
            "demo",
            "demo-finetune",
            "demo-catalogue",
            "demo-catalogue-finetune",
        ] {
            let over = if r.contains("finetune") { vec!["init=w.safetensors".to_string()] } else { vec![] };
            TrainConfig::resolve(&recipe_text(r).unwrap(), &over).unwrap_or_else(|e| panic!("{r}: {e:#}"));
        }
        let c = TrainConfig::resolve(
            &recipe_text("pretrain").unwrap(),
            &["epochs=3".into(), "clip-grad=1.5".into(), "device=cuda:1".into()],
        )
        .unwrap();
        assert_eq!((c.epochs, c.clip_grad, c.device), (3, Some(1.5), crate::device::DeviceSpec::Cuda(1)));
        let back = TrainConfig::resolve(&c.to_toml(), &[]).unwrap();
        assert_eq!(back, c);
        let e = TrainConfig::resolve("", &["epoch=3".into()]).unwrap_err().to_string();
        assert!(e.contains("unknown field `epoch`"), "{e}");
        let e = TrainConfig::resolve("", &["batch_size=0".into()]).unwrap_err().to_string();
        assert!(e.contains("batch_size must be at least 1"), "{e}");
        let e = TrainConfig::resolve("", &["objectives=[\"mlm\", \"itx\"]".into()]).unwrap_err().to_string();
        assert!(e.contains("unknown objective \"itx\""), "{e}");
        let e = TrainConfig::resolve("", &["objectives=[]".into()]).unwrap_err().to_string();
        assert!(e.contains("objectives is empty"), "{e}");
        let c = TrainConfig::resolve("", &["objectives=[\"mlm\"]".into()]).unwrap();
        let h = crate::train::setup::heads_of(&c);
        assert!(h.mlm && !h.itm && !h.t2i, "{h:?}");
        let e = TrainConfig::resolve("task = \"finetune\"", &[]).unwrap_err().to_string();
        assert!(e.contains("set init"), "{e}");
        let e = TrainConfig::resolve("", &["device=wgpu".into(), "precision=bf16".into()]).unwrap_err().to_string();
        assert!(e.contains("no bf16 type"), "{e}");
        let e = TrainConfig::resolve("", &["itm_hard_negatives=true".into()]).unwrap_err().to_string();
        assert!(e.contains("with_itc = true"), "{e}");
        TrainConfig::resolve("", &["itm_hard_negatives=true".into(), "with_itc=true".into()]).unwrap();
        let e = TrainConfig::resolve("", &["itm_hard_negatives_from_step=500".into()]).unwrap_err().to_string();
        assert!(e.contains("itm_hard_negatives_from_step = 500 has no effect"), "{e}");
        let e = TrainConfig::resolve("", &["ema_decay=1.0".into()]).unwrap_err().to_string();
        assert!(e.contains("ema_decay must be in (0, 1), got 1"), "{e}");
        assert_eq!(TrainConfig::resolve("", &["ema_decay=0.99".into()]).unwrap().ema_decay, Some(0.99));
        for (bad, want) in [
            ("augment_min_scale=0.05", "augment_min_scale must be in [0.1, 1]"),
            ("augment_min_scale=nan", "augment_min_scale must be in [0.1, 1]"),
            ("select_by=\"psnr\"", "select_by = \"psnr\" is not one of"),
            ("early_stop_steps=0", "early_stop_steps must be at least 1"),
        ] {
            let e = TrainConfig::resolve("", &[bad.into()]).unwrap_err().to_string();
            assert!(e.contains(want), "{bad}: {e}");
        }
        let c = TrainConfig::resolve("", &["augment_flip=true".into()]).unwrap();
        assert_eq!(c.augment(), Some(crate::data::image::Augment { min_scale: 1.0, flip: true }));
        assert_eq!(TrainConfig::default().augment(), None);
        // Accuracies are negated so that lower is better, as the loss.
        let c = TrainConfig::resolve("", &["select_by=\"itc_acc\"".into()]).unwrap();
        assert_eq!(c.selection_score(&serde_json::json!({"itc_acc": 0.25})), Some(-0.25));
        assert_eq!(c.selection_score(&serde_json::json!({"loss": 1.0})), None);
    }
}
