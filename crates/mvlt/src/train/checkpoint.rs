//! Training checkpoints: one safetensors file holding the model (`model.<key>`, so any command
//! that takes `--weights` reads it as a model), the AdamW moments (`optim.exp_avg.<key>`,
//! `optim.exp_avg_sq.<key>`), the weight average when the run keeps one (`ema.<key>`, flattened)
//! and, in the metadata, everything else a resume needs.
//!
//! Written atomically (temp file, fsync, rename): a crash or `kill -9` at any moment leaves every
//! checkpoint under its final name complete.

use super::config::TrainConfig;
use super::ema::WeightAverage;
use super::optim::{AdamW, Moments};
use crate::data::dataset::ClassMap;
use crate::model::weights::{state_dict, write_safetensors, CONFIG_METADATA_KEY};
use crate::model::{Pvlt, PvltConfig};
use anyhow::{anyhow, bail, Context, Result};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

pub const STATE_METADATA_KEY: &str = "mvlt.train_state";

/// Where a run stands; saved in every checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimiser steps done.
    pub step: usize,
    /// Batches consumed in all (decides clean vs masked input: even clean, odd masked).
    pub micro_step: usize,
    /// The epoch to continue in, and its next batch.
    pub epoch: usize,
    pub batch: usize,
    /// Best validation figure so far (`select_by`, lower better: the loss, or an accuracy
    /// negated), and its step.
    pub best_val_loss: Option<(f64, usize)>,
    /// The run stopped early (`early_stop_steps`): a resume only exports its weights.
    #[serde(default)]
    pub stopped_early: bool,
    /// Per-parameter AdamW step counts.
    pub optim_steps: BTreeMap<String, u64>,
    /// Steps folded into the weight average (`ema_decay`); 0 when the run keeps none.
    #[serde(default)]
    pub ema_updates: u64,
    pub train_config: TrainConfig,
    pub model_config: PvltConfig,
    pub classes: ClassMap,
    /// SHA-256 of the vocabulary file: a resume or fine-tune with another vocabulary is refused.
    pub vocab_sha256: String,
    /// Micro-batches per optimiser step (accumulation steps x devices x ranks): a resume that
    /// would take another number is refused, as it could not continue the run exactly. Absent in
    /// checkpoints written before it was recorded.
    #[serde(default)]
    pub micro_batches: Option<usize>,
}

pub fn file_name(step: usize) -> String {
    format!("step-{step:08}.safetensors")
}

pub fn save<B: Backend>(
    path: &Path,
    model: &Pvlt<B>,
    opt: &AdamW<B>,
    average: Option<&WeightAverage<B>>,
    state: &TrainState,
) -> Result<()> {
    let mut tensors: Vec<(String, TensorData)> =
        state_dict(model, &state.model_config)?.into_iter().map(|(k, v)| (format!("model.{k}"), v)).collect();
    for (key, m) in &opt.state {
        tensors.push((format!("optim.exp_avg.{key}"), m.m.to_data()));
        tensors.push((format!("optim.exp_avg_sq.{key}"), m.v.to_data()));
    }
    for (key, t) in average.iter().flat_map(|a| &a.average) {
        tensors.push((format!("ema.{key}"), t.to_data()));
    }
    let mut state = state.clone();
    state.optim_steps = opt.state.iter().map(|(k, m)| (k.clone(), m.step)).collect();
    state.ema_updates = average.map_or(0, |a| a.updates);
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert(CONFIG_METADATA_KEY.to_string(), serde_json::to_string(&state.model_config)?);
    meta.insert(STATE_METADATA_KEY.to_string(), serde_json::to_string(&state)?);
    write_safetensors(path, &tensors, meta)
}

/// What a checkpoint holds besides the model (read by `weights::StateDict::read`, which keeps the
/// `model.*` entries).
pub struct Resumed<B: Backend> {
    pub state: TrainState,
    pub opt: AdamW<B>,
    /// The weight average, when the run kept one (its decay: the checkpoint's `ema_decay`).
    pub average: Option<WeightAverage<B>>,
}

pub fn load_state<B: Backend>(path: &Path, device: &B::Device) -> Result<Resumed<B>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read checkpoint {}", path.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| anyhow!("{} is not a safetensors checkpoint: {e}", path.display()))?;
    let meta = meta.metadata().clone().unwrap_or_default();
    let Some(json) = meta.get(STATE_METADATA_KEY) else {
        bail!("{} is a weights file, not a training checkpoint (no {STATE_METADATA_KEY} metadata)", path.display());
    };
    let state: TrainState =
        serde_json::from_str(json).with_context(|| format!("{}: unreadable training state", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let mut opt = AdamW::new(state.train_config.adamw());
    let read = |name: &str| -> Result<Tensor<B, 1>> {
        let view = st.tensor(name).map_err(|e| anyhow!("{}: missing optimiser tensor {name}: {e}", path.display()))?;
        if view.dtype() != safetensors::Dtype::F32 {
            bail!("{}: optimiser tensor {name} is {:?}, expected F32", path.display(), view.dtype());
        }
        let n: usize = view.shape().iter().product();
        let data = TensorData::from_bytes_vec(view.data().to_vec(), vec![n], burn::tensor::DType::F32);
        Ok(Tensor::from_data(data, device))
    };
    for (key, &step) in &state.optim_steps {
        let m = read(&format!("optim.exp_avg.{key}"))?;
        let v = read(&format!("optim.exp_avg_sq.{key}"))?;
        opt.state.insert(key.clone(), Moments { step, m, v });
    }
    let average = match state.train_config.ema_decay.filter(|_| state.ema_updates > 0) {
        Some(decay) => {
            let mut a = WeightAverage::new(decay);
            a.updates = state.ema_updates;
            for name in st.names() {
                if let Some(key) = name.strip_prefix("ema.") {
                    a.average.insert(key.to_string(), read(name)?);
                }
            }
            if a.average.is_empty() {
                bail!(
                    "{}: the training state counts {} weight-average updates but the file holds no ema.* tensors",
                    path.display(),
                    a.updates
                );
            }
            Some(a)
        }
        None => None,
    };
    Ok(Resumed { state, opt, average })
}

/// Checkpoints of a run, oldest first.
pub fn list(dir: &Path) -> Vec<(usize, PathBuf)> {
    let mut out: Vec<(usize, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = name.strip_prefix("step-")?.strip_suffix(".safetensors")?.parse().ok()?;
            Some((step, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// Whether `path` is a complete checkpoint: every tensor within the file and the training state
/// readable. A file cut short (a full disk, a copy interrupted) fails here.
pub fn probe(path: &Path) -> Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| anyhow!("not a complete safetensors file ({e})"))?;
    safetensors::SafeTensors::deserialize(&bytes).map_err(|e| anyhow!("not a complete safetensors file ({e})"))?;
    let json = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(STATE_METADATA_KEY))
        .with_context(|| format!("no {STATE_METADATA_KEY} metadata"))?;
    serde_json::from_str::<TrainState>(json).context("unreadable training state")?;
    Ok(())
}

/// The newest checkpoint of `dir` that [`probe`] accepts, and each newer one it skipped with why.
pub fn newest_loadable(dir: &Path) -> (Option<PathBuf>, Vec<(PathBuf, String)>) {
    let mut skipped = vec![];
    for (_, path) in list(dir).into_iter().rev() {
        match probe(&path) {
            Ok(()) => return (Some(path), skipped),
            Err(e) => skipped.push((path, format!("{e:#}"))),
        }
    }
    (None, skipped)
}

/// Delete all but the newest `keep` checkpoints.
pub fn prune(dir: &Path, keep: usize) -> Result<()> {
    let all = list(dir);
    for (_, p) in all.iter().take(all.len().saturating_sub(keep.max(1))) {
        std::fs::remove_file(p).with_context(|| format!("cannot remove old checkpoint {}", p.display()))?;
    }
    Ok(())
}

pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect())
}
