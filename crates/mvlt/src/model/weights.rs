//! Weight files in and out: safetensors (native), PyTorch `.pth` (the authors' training checkpoint
//! or a bare state dict), strict and non-strict loading with precise reports.
//!
//! Every module path in the burn tree equals the reference state-dict key once the `_N` fields of
//! `nn.Sequential` stand-ins are renamed `N` (see `layers.rs`). `.pth` files are read by
//! [`super::torch_file`], which interprets the pickle opcodes as data and never executes anything.

use super::config::PvltConfig;
use super::pvlt::Pvlt;
use crate::files::printable;
use anyhow::{anyhow, bail, Context, Result};
use burn::module::ParamId;
use burn::store::{ModuleSnapshot, TensorSnapshot};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, TensorData};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The tied MLM decoder weight: in `.pth` files an alias of the word embeddings; never stored in
/// safetensors (the reference's convention, which we follow).
pub const TIED_DECODER_KEY: &str = "mlm_head.mlm_decoder.weight";
pub const WORD_EMBEDDINGS_KEY: &str = "text_embeddings.word_embeddings.weight";
/// Optional int64 buffer `arange(512)` that transformers 4.10 kept in the state dict.
pub const POSITION_IDS_KEY: &str = "text_embeddings.position_ids";
/// Metadata key under which our safetensors files carry the model config (JSON).
pub const CONFIG_METADATA_KEY: &str = "mvlt.config";

/// The weight-file formats, told apart by their structure (never by one byte: a safetensors header
/// length may start with any byte, 0x80 included).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightsFormat {
    /// 8-byte little-endian header length N, then N bytes of JSON (`{` first), then the data.
    Safetensors,
    /// `torch.save` since PyTorch 1.6: a zip archive (`PK\x03\x04`).
    TorchZip,
    /// `torch.save` before 1.6: a pickle, `0x80` and protocol 2 to 5.
    TorchPickle,
}

impl WeightsFormat {
    pub fn detect(path: &Path, size: u64) -> Result<WeightsFormat> {
        use std::io::Read;
        let mut head = [0u8; 9];
        let mut f =
            std::fs::File::open(path).with_context(|| format!("cannot open weights file {}", path.display()))?;
        let n = Read::take(&mut f, 9)
            .read(&mut head)
            .with_context(|| format!("cannot read weights file {}", path.display()))?;
        Self::from_head(&head[..n], size).ok_or_else(|| {
            anyhow!(
                "{} is not a weights file: it is neither safetensors (an 8-byte header length within the file, then '{{'), \
                 a PyTorch zip archive (PK\\x03\\x04) nor a PyTorch pickle (0x80, protocol 2-5){}",
                path.display(),
                if size < 9 { format!("; it holds only {size} bytes (empty or truncated?)") } else { String::new() }
            )
        })
    }

    /// The format whose structure the file's first bytes (up to 9) and size fit, if any.
    pub fn from_head(head: &[u8], size: u64) -> Option<WeightsFormat> {
        if head.len() >= 9 {
            let n = u64::from_le_bytes(head[..8].try_into().ok()?);
            if n >= 2 && n.checked_add(8).is_some_and(|end| end <= size) && head[8] == b'{' {
                return Some(WeightsFormat::Safetensors);
            }
        }
        if head.starts_with(b"PK\x03\x04") {
            return Some(WeightsFormat::TorchZip);
        }
        if head.len() >= 2 && head[0] == 0x80 && (2..=5).contains(&head[1]) {
            return Some(WeightsFormat::TorchPickle);
        }
        None
    }
}

/// A state dict read from disk, keyed by the reference's names.
#[derive(Debug)]
pub struct StateDict {
    pub path: PathBuf,
    pub format: &'static str,
    pub tensors: BTreeMap<String, TensorData>,
    /// safetensors `__metadata__` (empty for .pth).
    pub metadata: HashMap<String, String>,
}

impl StateDict {
    pub fn read(path: &Path) -> Result<StateDict> {
        let size = crate::files::regular_file_size(path, "weights file")?;
        let sd = match WeightsFormat::detect(path, size)? {
            WeightsFormat::Safetensors => Self::read_safetensors(path)?,
            WeightsFormat::TorchZip => Self::read_pth(path, size, true)?,
            WeightsFormat::TorchPickle => Self::read_pth(path, size, false)?,
        };
        sd.check_finite()?;
        Ok(sd)
    }

    /// Every float value is finite: NaN or infinite weights would only show up later as NaN
    /// scores or losses, far from the file that caused them.
    fn check_finite(&self) -> Result<()> {
        for (key, data) in &self.tensors {
            if !data.dtype.is_float() {
                continue;
            }
            // Read in place (no copy of the tensor), converting element by element for f16/bf16.
            let (mut bad, mut first) = (0usize, None);
            for (i, v) in data.iter::<f32>().enumerate() {
                if !v.is_finite() {
                    bad += 1;
                    first.get_or_insert((i, v));
                }
            }
            if let Some((index, value)) = first {
                bail!(
                    "{}: tensor '{}' holds {bad} NaN or infinite value(s) (the first at flat index {index}: {value}); these weights are broken \
                     (a diverged run?): use an earlier checkpoint",
                    self.path.display(),
                    printable(key),
                );
            }
        }
        Ok(())
    }

    fn read_safetensors(path: &Path) -> Result<StateDict> {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
            anyhow!("{} is neither a PyTorch file nor a valid safetensors file ({e}); is it truncated?", path.display())
        })?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| anyhow!("{}: bad safetensors header: {e}", path.display()))?;
        let metadata = meta.metadata().clone().unwrap_or_default();
        let mut tensors = BTreeMap::new();
        for (name, view) in st.tensors() {
            let dtype = match view.dtype() {
                safetensors::Dtype::F32 => DType::F32,
                safetensors::Dtype::F64 => DType::F64,
                safetensors::Dtype::F16 => DType::F16,
                safetensors::Dtype::BF16 => DType::BF16,
                safetensors::Dtype::I64 => DType::I64,
                safetensors::Dtype::I32 => DType::I32,
                safetensors::Dtype::U8 => DType::U8,
                other => bail!("{}: tensor '{name}' has unsupported dtype {other:?}", path.display()),
            };
            let data = TensorData::from_bytes_vec(view.data().to_vec(), view.shape().to_vec(), dtype);
            tensors.insert(name, data);
        }
        // Our training checkpoints keep the model under `model.` beside the optimiser state.
        let nested = tensors.keys().any(|k| k.starts_with("model."));
        let tensors = if nested { unnest(tensors) } else { tensors };
        Ok(StateDict {
            path: path.to_path_buf(),
            format: if nested { "safetensors (training checkpoint)" } else { "safetensors" },
            tensors,
            metadata,
        })
    }

    fn read_pth(path: &Path, file_size: u64, zip: bool) -> Result<StateDict> {
        let file = super::torch_file::read(path, file_size, zip)
            .map_err(|e| anyhow!("cannot read PyTorch file {}: {e:#}", path.display()))?;
        if file.tensors.is_empty() {
            bail!(
                "PyTorch file {} holds no tensors (expected a state dict or a checkpoint with a 'model' entry)",
                path.display()
            );
        }
        Ok(StateDict {
            path: path.to_path_buf(),
            format: if file.nested { "pth (training checkpoint, 'model' entry)" } else { "pth (bare state dict)" },
            tensors: file.tensors,
            metadata: HashMap::new(),
        })
    }

    /// The config stored in our own safetensors files, if any.
    pub fn stored_config(&self) -> Result<Option<PvltConfig>> {
        match self.metadata.get(CONFIG_METADATA_KEY) {
            None => Ok(None),
            Some(s) => {
                let v: serde_json::Value = serde_json::from_str(s)
                    .with_context(|| format!("{}: bad {CONFIG_METADATA_KEY} metadata", self.path.display()))?;
                Ok(Some(PvltConfig::from_json(&v)?))
            }
        }
    }

    /// A config stored in a file describes the weights in it: a model that needs far more values
    /// than the file holds is refused before it is built (a crafted config could otherwise ask
    /// for gigabytes).
    pub fn check_config_fits(&self, cfg: &PvltConfig) -> Result<()> {
        let held: u64 = self.tensors.values().map(|d| d.num_elements() as u64).sum();
        let needed = cfg.min_param_count();
        if needed > held.saturating_mul(2) + 1_000_000 {
            bail!(
                "{}: its stored config ({CONFIG_METADATA_KEY}) describes a model of at least {needed} parameters, but the file holds \
                 only {held} values; the metadata does not belong to these weights",
                self.path.display()
            );
        }
        Ok(())
    }

    fn shape(&self, key: &str) -> Option<&[usize]> {
        self.tensors.get(key).map(|d| d.shape.as_slice())
    }

    /// Architecture read off the tensor shapes. Head counts cannot be seen in weights, so they come
    /// from the preset with the same widths (or `None` when no preset matches).
    pub fn infer_config(&self) -> Option<PvltConfig> {
        let mut cfg = PvltConfig::tiny();
        for i in 0..4 {
            let w = self.shape(&format!("patch_embed{}.proj.weight", i + 1))?;
            cfg.embed_dims[i] = w[0];
            if i == 0 {
                cfg.patch_size = w[2];
            }
            cfg.depths[i] =
                (0..).take_while(|b| self.tensors.contains_key(&format!("block{}.{b}.norm1.weight", i + 1))).count();
            cfg.sr_ratios[i] = self.shape(&format!("block{}.0.attn.sr.weight", i + 1)).map(|s| s[2]).unwrap_or(1);
            cfg.mlp_ratios[i] =
                self.shape(&format!("block{}.0.mlp.fc1.weight", i + 1)).map(|s| s[0] / w[0]).unwrap_or(1);
        }
        let grid = ((self.shape("pos_embed1")?[1]) as f64).sqrt() as usize;
        cfg.img_size = grid * cfg.patch_size;
        if let Some(w) = self.shape(WORD_EMBEDDINGS_KEY) {
            cfg.vocab_size = w[0];
            cfg.token_hidden_size = w[1];
        }
        if let Some(t) = self.shape("text_pos_embed1") {
            cfg.num_text_tokens = t[1];
        }
        if let Some(p) = self.shape("text_embeddings.position_embeddings.weight") {
            cfg.max_position_embeddings = p[0];
        }
        if let Some(s) = self.shape("sup_cls_head.linear.weight") {
            cfg.num_sup_classes = s[0];
        }
        if let Some(s) = self.shape("sub_cls_head.linear.weight") {
            cfg.num_sub_classes = s[0];
        }
        if let Some(s) = self.shape("itc_head.image_proj.weight") {
            cfg.itc_dim = s[0];
        }
        cfg.heads = super::HeadSet::present_in(self.tensors.keys().map(|k| k.as_str()));
        let preset = cfg.variant_name().and_then(PvltConfig::preset)?;
        cfg.num_heads = preset.num_heads;
        Some(cfg)
    }
}

/// Keep only the `model.*` entries of a checkpoint, without the prefix.
fn unnest(tensors: BTreeMap<String, TensorData>) -> BTreeMap<String, TensorData> {
    tensors.into_iter().filter_map(|(k, v)| k.strip_prefix("model.").map(|k| (k.to_string(), v))).collect()
}

/// A BatchNorm counter (`num_batches_tracked`) as the model holds it: whole numbers from 0 to
/// 2^24 (f32's exact integers), stored as integers or, in some converted files, as floats.
fn counts(data: &TensorData) -> Result<Vec<f32>, String> {
    let values: Vec<f64> = if data.dtype.is_float() {
        data.iter::<f64>().collect()
    } else {
        data.iter::<i64>().map(|x| x as f64).collect()
    };
    match values.iter().find(|v| !(v.fract() == 0.0 && (0.0..=16_777_216.0).contains(*v))) {
        Some(v) => Err(format!("holds {v:e}, not a count of batches (a whole number from 0 to 2^24)")),
        None => Ok(values.into_iter().map(|v| v as f32).collect()),
    }
}

/// Burn module path -> reference key (`stages.0.text_embed._0.weight` -> `text_embed1.0.weight`,
/// `stages.1.blocks.0.attn.q.weight` -> `block2.0.attn.q.weight`).
pub fn reference_key(burn_path: &str) -> String {
    let mut segs: Vec<&str> = burn_path.split('.').collect();
    // `stages.{i}.{part}...` is the reference's numbered `{part}{i + 1}...` (blocks: `block{n}`).
    let numbered;
    if let ["stages", i, part, ..] = segs[..] {
        if let Ok(i) = i.parse::<usize>() {
            let name = if part == "blocks" { "block" } else { part };
            numbered = format!("{name}{}", i + 1);
            segs.splice(0..3, [numbered.as_str()]);
        }
    }
    segs.iter()
        .map(|seg| match seg.strip_prefix('_') {
            Some(rest) if !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()) => rest,
            _ => seg,
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// Where a key comes in the reference's registration order: its positional tables of every stage
/// first, then each stage's patch embedding, text projection and blocks, then the rest (the stages
/// are one collection here, so their tables come with them).
fn reference_rank(burn_path: &str) -> u8 {
    match burn_path.split('.').collect::<Vec<_>>()[..] {
        ["stages", _, "pos_embed" | "text_pos_embed"] => 0,
        ["stages", ..] => 1,
        _ => 2,
    }
}

/// One expected entry of the model's state dict.
pub struct ExpectedKey {
    pub key: String,
    pub shape: Vec<usize>,
    pub is_int: bool,
    snapshot: TensorSnapshot,
}

/// The model's own state dict layout, in registration order (the reference's order).
pub fn expected_keys<B: Backend>(model: &Pvlt<B>) -> Vec<ExpectedKey> {
    let mut snapshots = model.collect(None, None, false);
    snapshots.sort_by_key(|s| reference_rank(&s.full_path())); // stable: the order within a rank stays
    snapshots
        .into_iter()
        .map(|s| ExpectedKey {
            key: reference_key(&s.full_path()),
            shape: s.shape.to_vec(),
            is_int: s.full_path().ends_with("num_batches_tracked"),
            snapshot: s,
        })
        .collect()
}

/// What a load did. Names are reference keys.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub loaded: Vec<String>,
    /// In the file but not in the model (ignored).
    pub unexpected: Vec<String>,
    /// In the model but not in the file (kept at their current values).
    pub missing: Vec<String>,
    /// Known aliases/buffers accepted without loading (tied decoder, position_ids).
    pub aliases: Vec<String>,
}

impl LoadReport {
    pub fn summary(&self) -> String {
        let list = |v: &Vec<String>| {
            if v.is_empty() {
                String::new()
            } else {
                // Names come from the file: shown with terminal controls escaped.
                let shown: Vec<_> = v.iter().take(12).map(|k| printable(k)).collect();
                format!(
                    ": {}{}",
                    shown.join(", "),
                    if v.len() > 12 { format!(", ... ({} more)", v.len() - 12) } else { String::new() }
                )
            }
        };
        format!(
            "loaded {} keys; ignored {} unexpected{}; missing {} (kept their initial values){}",
            self.loaded.len(),
            self.unexpected.len(),
            list(&self.unexpected),
            self.missing.len(),
            list(&self.missing)
        )
    }
}

fn shapes_agree(file: &[usize], model: &[usize], is_int: bool) -> bool {
    // BatchNorm's num_batches_tracked is a 0-d int64 in PyTorch and [1] here.
    file == model || (is_int && file.iter().product::<usize>() == 1 && model == [1])
}

/// Load `sd` into `model`. Strict: every model key must be present and nothing else. Non-strict:
/// load what matches by name. A shape mismatch is an error either way.
pub fn load_state_dict<B: Backend>(model: Pvlt<B>, sd: &StateDict, strict: bool) -> Result<(Pvlt<B>, LoadReport)> {
    let mut model = model;
    let expected = expected_keys(&model);
    let by_key: HashMap<&str, &ExpectedKey> = expected.iter().map(|e| (e.key.as_str(), e)).collect();
    let mut report = LoadReport::default();
    let mut snapshots = vec![];

    for (key, data) in &sd.tensors {
        let (key, data) = if key == TIED_DECODER_KEY {
            // An alias of the word embeddings; only used when the file lacks the embeddings itself.
            if sd.tensors.contains_key(WORD_EMBEDDINGS_KEY) || !by_key.contains_key(WORD_EMBEDDINGS_KEY) {
                report.aliases.push(key.clone());
                continue;
            }
            (WORD_EMBEDDINGS_KEY, data)
        } else if key == POSITION_IDS_KEY {
            report.aliases.push(key.clone());
            continue;
        } else {
            (key.as_str(), data)
        };
        let Some(exp) = by_key.get(key) else {
            report.unexpected.push(key.to_string());
            continue;
        };
        if !shapes_agree(&data.shape, &exp.shape, exp.is_int) {
            bail!(
                "shape mismatch for key '{}' in {}: the file has {:?}, the model expects {:?} (is --config the \
                 architecture these weights were trained with?)",
                printable(key),
                sd.path.display(),
                data.shape,
                exp.shape
            );
        }
        let data = if exp.is_int {
            TensorData::new(
                counts(data).map_err(|why| anyhow!("key '{}' in {}: {why}", printable(key), sd.path.display()))?,
                exp.shape.clone(),
            )
        } else {
            if !data.dtype.is_float() {
                bail!(
                    "key '{}' in {} has dtype {:?}, expected a float tensor",
                    printable(key),
                    sd.path.display(),
                    data.dtype
                );
            }
            data.clone().convert::<f32>()
        };
        let s = &exp.snapshot;
        snapshots.push(TensorSnapshot::from_data(
            data,
            s.path_stack.clone().unwrap_or_default(),
            s.container_stack.clone().unwrap_or_default(),
            s.tensor_id.unwrap_or_else(ParamId::new),
        ));
        report.loaded.push(key.to_string());
    }
    let present: std::collections::HashSet<&str> = report.loaded.iter().map(|s| s.as_str()).collect();
    report.missing = expected.iter().filter(|e| !present.contains(e.key.as_str())).map(|e| e.key.clone()).collect();

    if strict && (!report.missing.is_empty() || !report.unexpected.is_empty()) {
        let hint = if report.loaded.len() * 2 < expected.len() {
            " — it does not look like weights for this model configuration"
        } else {
            ""
        };
        bail!(
            "strict load of {} failed{hint}: {}. Use --non-strict to load only the matching keys \
             (e.g. PVT ImageNet weights, or a pre-training checkpoint for fine-tuning).",
            sd.path.display(),
            report.summary()
        );
    }
    let result = model.apply(snapshots, None, None, false);
    if !result.errors.is_empty() {
        bail!("loading {} failed: {:?}", sd.path.display(), result.errors);
    }
    Ok((model, report))
}

/// The model's state dict as (reference key, data) in registration order, as the reference's
/// safetensors files hold it: tied decoder omitted, `position_ids` included, BatchNorm counters as
/// 0-d int64.
pub fn state_dict<B: Backend>(model: &Pvlt<B>, cfg: &PvltConfig) -> Result<Vec<(String, TensorData)>> {
    let mut out = vec![];
    for e in expected_keys(model) {
        let data = e.snapshot.to_data().map_err(|err| anyhow!("cannot read tensor {}: {err:?}", e.key))?;
        let data = if e.is_int {
            let v: Vec<i64> = data.iter::<f32>().map(|x| x as i64).collect();
            TensorData::new(v, Vec::<usize>::new())
        } else {
            data.convert::<f32>()
        };
        if e.key == WORD_EMBEDDINGS_KEY {
            let ids: Vec<i64> = (0..cfg.max_position_embeddings as i64).collect();
            out.push((POSITION_IDS_KEY.to_string(), TensorData::new(ids, [1, cfg.max_position_embeddings])));
        }
        out.push((e.key, data));
    }
    Ok(out)
}

/// Write tensors as safetensors atomically (temp file, fsync, rename): a crash never leaves a
/// half-written file under the final name.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, TensorData)],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(k, d)| {
            let dtype = match d.dtype {
                DType::F32 => safetensors::Dtype::F32,
                DType::F64 => safetensors::Dtype::F64,
                DType::F16 => safetensors::Dtype::F16,
                DType::BF16 => safetensors::Dtype::BF16,
                DType::I64 => safetensors::Dtype::I64,
                DType::I32 => safetensors::Dtype::I32,
                other => return Err(anyhow!("tensor '{k}': cannot write dtype {other:?}")),
            };
            let view = safetensors::tensor::TensorView::new(dtype, d.shape.to_vec(), d.as_bytes())
                .map_err(|e| anyhow!("tensor '{k}': {e}"))?;
            Ok((k.clone(), view))
        })
        .collect::<Result<_>>()?;
    let bytes =
        safetensors::tensor::serialize(views, &Some(metadata)).map_err(|e| anyhow!("serialising safetensors: {e}"))?;
    crate::files::write_atomic(path, &bytes)
}

/// The same weights on another backend (or device), through the backend-neutral state dict.
pub fn to_backend<B1: Backend, B2: Backend>(
    model: &Pvlt<B1>,
    cfg: &PvltConfig,
    device: &B2::Device,
) -> Result<Pvlt<B2>> {
    let sd = StateDict {
        path: PathBuf::from("(in memory)"),
        format: "memory",
        tensors: state_dict(model, cfg)?.into_iter().collect(),
        metadata: HashMap::new(),
    };
    Ok(load_state_dict(Pvlt::<B2>::new(cfg, device), &sd, true)?.0)
}

/// Save a model as safetensors with its config in the metadata.
pub fn save_model<B: Backend>(model: &Pvlt<B>, cfg: &PvltConfig, path: &Path) -> Result<()> {
    let tensors = state_dict(model, cfg)?;
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert(CONFIG_METADATA_KEY.to_string(), serde_json::to_string(cfg)?);
    write_safetensors(path, &tensors, meta)
}

/// How `--config` was given, which decides where the head set comes from.
pub enum ConfigSource {
    /// A preset or nothing: the heads are those the weights contain.
    Implicit,
    /// A file naming its heads (`loss_type`/`heads`): used as is.
    Explicit,
}

/// Resolve the architecture for `weights`: `--config` if given (a preset name or a JSON file), else
/// the config stored in our safetensors, else the preset whose shapes the weights have.
pub fn resolve_config(config: Option<&str>, first_weights: Option<&StateDict>) -> Result<PvltConfig> {
    let (mut cfg, source) = match config {
        Some(spec) if PvltConfig::preset(spec).is_some() => (PvltConfig::preset(spec).unwrap(), ConfigSource::Implicit),
        Some(spec) => (PvltConfig::resolve(spec)?, ConfigSource::Explicit),
        None => match first_weights {
            None => bail!("no --config and no weights to read one from: pass --config tiny|small|medium|large or a config file"),
            Some(sd) => match sd.stored_config()? {
                Some(c) => {
                    sd.check_config_fits(&c)?;
                    (c, ConfigSource::Explicit)
                }
                None => match sd.infer_config() {
                    Some(c) => (c, ConfigSource::Implicit),
                    None => bail!(
                        "cannot tell the architecture of {} (its shapes match no preset and it stores no config): pass --config",
                        sd.path.display()
                    ),
                },
            },
        },
    };
    if let (ConfigSource::Implicit, Some(sd)) = (source, first_weights) {
        let present = super::HeadSet::present_in(sd.tensors.keys().map(|k| k.as_str()));
        if present != super::HeadSet::NONE {
            cfg.heads = present;
        }
    }
    Ok(cfg)
}

/// A model and what loading each weights file did.
pub struct LoadedModel<B: Backend> {
    pub model: Pvlt<B>,
    /// One per file, in the order given.
    pub reports: Vec<(PathBuf, LoadReport)>,
}

impl<B: Backend> LoadedModel<B> {
    /// Print each file's load report (loaded / ignored / missing keys).
    pub fn print_reports(&self) {
        for (w, report) in &self.reports {
            tracing::info!("{}: {}", w.display(), report.summary());
        }
    }
}

/// Build a model of `cfg` and load weight files into it: the first strictly unless `non_strict`,
/// later ones always non-strictly on top (e.g. PVT ImageNet weights). Returns one report per file.
pub fn load_model<B: Backend>(
    cfg: &PvltConfig,
    weights: &[PathBuf],
    non_strict: bool,
    device: &B::Device,
) -> Result<LoadedModel<B>> {
    let mut model = Pvlt::<B>::new(cfg, device);
    let mut reports = vec![];
    for (i, w) in weights.iter().enumerate() {
        let sd = StateDict::read(w)?;
        let (m, report) = load_state_dict(model, &sd, i == 0 && !non_strict)?;
        model = m;
        reports.push((w.clone(), report));
    }
    Ok(LoadedModel { model, reports })
}

/// The reference state-dict layout of a model (key, shape, dtype), tied alias and buffers included,
/// in the reference's order — what the `manifest_*.json` files list.
pub fn reference_layout<B: Backend>(model: &Pvlt<B>, cfg: &PvltConfig) -> Vec<(String, Vec<usize>, &'static str)> {
    let mut out = vec![];
    let keys = expected_keys(model);
    let last_mlm = keys.iter().rposition(|e| e.key.starts_with("mlm_head."));
    for (i, e) in keys.iter().enumerate() {
        if e.key == WORD_EMBEDDINGS_KEY {
            out.push((POSITION_IDS_KEY.to_string(), vec![1, cfg.max_position_embeddings], "int64"));
        }
        if e.is_int {
            out.push((e.key.clone(), vec![], "int64"));
        } else {
            out.push((e.key.clone(), e.shape.clone(), "float32"));
        }
        if Some(i) == last_mlm {
            out.push((TIED_DECODER_KEY.to_string(), vec![cfg.vocab_size, cfg.token_hidden_size], "float32"));
        }
    }
    out
}

/// True for state-dict entries that are buffers or aliases rather than trainable parameters.
pub fn is_buffer_or_alias(key: &str) -> bool {
    key == TIED_DECODER_KEY
        || key == POSITION_IDS_KEY
        || key.ends_with("running_mean")
        || key.ends_with("running_var")
        || key.ends_with("num_batches_tracked")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_paths_map_to_the_reference_names() {
        assert_eq!(reference_key("stages.0.pos_embed"), "pos_embed1");
        assert_eq!(reference_key("stages.3.text_pos_embed"), "text_pos_embed4");
        assert_eq!(reference_key("stages.3.blocks.1.attn.q.weight"), "block4.1.attn.q.weight");
        assert_eq!(reference_key("stages.1.text_embed._0.weight"), "text_embed2.0.weight");
        assert_eq!(reference_key("stages.2.patch_embed.proj.weight"), "patch_embed3.proj.weight");
        assert_eq!(reference_key("itm_head.linear.weight"), "itm_head.linear.weight");
    }

    /// A safetensors file of one F32 tensor `w` = [1, 2] whose header (JSON padded with spaces,
    /// which the format allows) is exactly `header_len` bytes, with optional metadata.
    fn safetensors_bytes(header_len: usize, metadata: Option<&str>) -> Vec<u8> {
        let meta = metadata.map(|m| format!("\"__metadata__\":{m},")).unwrap_or_default();
        let mut header = format!("{{{meta}\"w\":{{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}}}");
        assert!(header.len() <= header_len, "header of {} bytes does not fit {header_len}", header.len());
        header.extend(std::iter::repeat_n(' ', header_len - header.len()));
        let mut bytes = (header_len as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend(1f32.to_le_bytes());
        bytes.extend(2f32.to_le_bytes());
        bytes
    }

    /// Every low byte of the header length, 0x80 (a pickle's first byte) included, is read as
    /// safetensors: the format is told by structure, not by the first byte.
    #[test]
    fn safetensors_of_every_low_header_byte_load() {
        let dir = tempfile::tempdir().unwrap();
        for low in 0..=255usize {
            let path = dir.path().join(format!("w{low}.safetensors"));
            std::fs::write(&path, safetensors_bytes(0x200 + low, None)).unwrap();
            let sd = StateDict::read(&path).unwrap_or_else(|e| panic!("header length 0x{:x}: {e:#}", 0x200 + low));
            assert_eq!(sd.format, "safetensors");
            assert_eq!(sd.tensors["w"].to_vec::<f32>().unwrap(), vec![1.0, 2.0]);
        }
    }

    #[test]
    fn formats_by_structure() {
        use WeightsFormat::*;
        assert_eq!(WeightsFormat::from_head(b"PK\x03\x04\x14\x00\x00\x00\x00", 100), Some(TorchZip));
        assert_eq!(WeightsFormat::from_head(&[0x80, 2, b'}', b'q', 0, 0, 0, 0, 0], 100), Some(TorchPickle));
        // 0x80 then a byte that is no pickle protocol, and a header length beyond the file.
        assert_eq!(WeightsFormat::from_head(&[0x80, 0x5d, 0, 0, 0, 0, 0, 0, b'{'], 100), None);
        // A header length that fits, but no '{' after it.
        assert_eq!(WeightsFormat::from_head(&[0x10, 0, 0, 0, 0, 0, 0, 0, b'x'], 100), None);
        assert_eq!(WeightsFormat::from_head(b"hello", 5), None);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("notes.txt");
        std::fs::write(&p, "just some text, not weights").unwrap();
        let e = format!("{:#}", StateDict::read(&p).unwrap_err());
        assert!(e.contains("is not a weights file"), "{e}");
    }

    #[test]
    fn non_finite_weights_name_the_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("nan.safetensors");
        let mut bytes = safetensors_bytes(0x100, None);
        let n = bytes.len();
        bytes[n - 4..].copy_from_slice(&f32::NAN.to_le_bytes());
        std::fs::write(&p, bytes).unwrap();
        let e = format!("{:#}", StateDict::read(&p).unwrap_err());
        assert!(e.contains("tensor 'w' holds 1 NaN or infinite value(s)") && e.contains("flat index 1"), "{e}");
    }

    /// A config in the metadata that asks for a huge model is refused before anything is built:
    /// beyond the sane bounds, or beyond what the file holds.
    #[test]
    fn crafted_stored_configs_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (r#"{"depths":[100000,1,1,1]}"#, "total depth = 100003 is over the limit"),
            (r#"{"embed_dims":[8192,8192,8192,8192],"num_heads":[1,1,1,1]}"#, "over the limit of 2000000000"),
            (r#"{"depths":[2,2,2,2]}"#, "the metadata does not belong to these weights"),
        ];
        for (i, (cfg, want)) in cases.iter().enumerate() {
            let meta = format!("{{\"{CONFIG_METADATA_KEY}\":{}}}", serde_json::to_string(cfg).unwrap());
            let p = dir.path().join(format!("c{i}.safetensors"));
            std::fs::write(&p, safetensors_bytes(0x200, Some(&meta))).unwrap();
            let sd = StateDict::read(&p).unwrap();
            let e = format!("{:#}", resolve_config(None, Some(&sd)).unwrap_err());
            assert!(e.contains(want), "{cfg}: {e}");
        }
    }
}
