//! `mvlt verify`: run the model on a reference fixture and compare every stored tensor it
//! understands with the numbers the authors' PyTorch code produced.
//!
//! A fixture is a JSON file (format of `small_io.json`: a `config` object, a `weights_file`,
//! optional `mlm_rows`, `outputs_file`, `pth_file`) beside a safetensors file holding the inputs
//! (`images`, `input_ids`) and the outputs. Anything missing can be supplied on the command line.

use anyhow::{bail, Context, Result};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};
use mvlt::device::BackendTask;
use mvlt::model::weights::{load_model, StateDict};
use mvlt::model::{HiddenStates, Mode, Pvlt, PvltConfig, PvltOutput};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What to run and what to compare against.
pub struct Fixture {
    pub name: String,
    pub non_strict: bool,
    pub config: PvltConfig,
    /// Loaded in order: the first strictly, later ones non-strictly on top (the reference's
    /// `load_state_dict(strict=False)` of PVT ImageNet weights).
    pub weights: Vec<PathBuf>,
    /// `[B, 3, H, W]` float32 in [0, 1].
    pub images: TensorData,
    /// `[B, T]` int64.
    pub input_ids: TensorData,
    pub expected: BTreeMap<String, TensorData>,
    /// Positions of the full MLM logit rows stored as `mlm_logits_rows`.
    pub mlm_rows: Option<Vec<usize>>,
}

/// Command-line overrides for fixtures that do not carry everything themselves.
#[derive(Default, Clone)]
pub struct FixtureOverrides {
    pub config: Option<String>,
    pub weights: Vec<PathBuf>,
    /// A safetensors file with `images` and `input_ids` (e.g. small_io.safetensors).
    pub inputs: Option<PathBuf>,
    /// `FILE:KEY` of one image tensor (u8 `[3,H,W]` scaled by 1/255, or float `[3,H,W]`/`[B,3,H,W]`).
    pub image: Option<String>,
    /// Load the first weights file non-strictly too.
    pub non_strict: bool,
}

fn read_safetensors_map(path: &Path) -> Result<BTreeMap<String, TensorData>> {
    let sd = StateDict::read(path).with_context(|| format!("reading fixture tensors {}", path.display()))?;
    Ok(sd.tensors)
}

impl Fixture {
    pub fn load(json_path: &Path, o: &FixtureOverrides) -> Result<Fixture> {
        let text = std::fs::read_to_string(json_path)
            .with_context(|| format!("cannot read fixture {}", json_path.display()))?;
        let meta: Value = serde_json::from_str(&text)
            .with_context(|| format!("fixture {} is not valid JSON", json_path.display()))?;
        let dir = json_path.parent().unwrap_or(Path::new("."));
        let config = match (&o.config, meta.get("config")) {
            (Some(spec), _) => PvltConfig::resolve(spec)?,
            (None, Some(_)) => {
                PvltConfig::from_json(&meta).with_context(|| format!("config of {}", json_path.display()))?
            }
            (None, None) => bail!("fixture {} has no `config` object; pass --config", json_path.display()),
        };
        let mut weights = o.weights.clone();
        if weights.is_empty() {
            match meta.get("weights_file").and_then(|v| v.as_str()) {
                Some(w) => weights.push(dir.join(w)),
                None => bail!("fixture {} names no `weights_file`; pass --weights", json_path.display()),
            }
        }
        // A partial-load fixture names the file loaded non-strictly on top of the base weights.
        if let Some(p) = meta.get("pth_file").and_then(|v| v.as_str()) {
            weights.push(dir.join(p));
        }
        let outputs = match meta.get("outputs_file").and_then(|v| v.as_str()) {
            Some(f) => dir.join(f),
            None => json_path.with_extension("safetensors"),
        };
        let mut expected = read_safetensors_map(&outputs)?;
        let mut inputs = match &o.inputs {
            Some(p) => read_safetensors_map(p)?,
            None => BTreeMap::new(),
        };
        for k in ["images", "input_ids"] {
            if let Some(t) = expected.remove(k) {
                inputs.entry(k.to_string()).or_insert(t);
            }
        }
        if let Some(spec) = &o.image {
            let (file, key) = spec.rsplit_once(':').context("--image-tensor must be FILE:KEY")?;
            let all = read_safetensors_map(Path::new(file))?;
            let t = all.get(key).with_context(|| format!("{file} has no tensor '{key}'"))?.clone();
            let shape = t.shape.clone();
            // u8 images become exactly the reference's `float32(u8) / 255`.
            let v: Vec<f32> = if t.dtype == DType::U8 {
                mvlt::data::image::to_unit_floats(t.as_bytes())
            } else {
                t.convert::<f32>().to_vec::<f32>().unwrap()
            };
            let shape: Vec<usize> = if shape.len() == 3 { [vec![1], shape.to_vec()].concat() } else { shape.to_vec() };
            inputs.insert("images".into(), TensorData::new(v, shape));
        }
        let images = inputs.remove("images").context("no `images` input: pass --inputs or --image-tensor")?;
        let input_ids = inputs.remove("input_ids").context("no `input_ids` input: pass --inputs")?;
        let mlm_rows = meta.get("mlm_rows").and_then(|v| serde_json::from_value(v.clone()).ok());
        Ok(Fixture {
            name: json_path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            non_strict: o.non_strict,
            config,
            weights,
            images: images.convert::<f32>(),
            input_ids,
            expected,
            mlm_rows,
        })
    }
}

/// One compared tensor.
#[derive(Debug, Clone)]
pub struct Row {
    pub name: String,
    pub shape: Vec<usize>,
    pub max_abs: f64,
    /// max |ours - ref| / |ref| over elements with |ref| > atol.
    pub max_rel: f64,
    pub ok: bool,
    /// Why a tensor was not compared (then `ok` is true and the errors are NaN).
    pub skipped: Option<String>,
}

#[derive(Clone, Copy, Debug)]
pub struct Tolerance {
    pub atol: f64,
    pub rtol: f64,
}

impl Default for Tolerance {
    fn default() -> Self {
        Tolerance { atol: 1e-4, rtol: 1e-4 }
    }
}

/// Our value for a stored tensor name, as (values, shape, exact?).
type Ours = (Vec<f64>, Vec<usize>, bool);

fn to_f64<B: Backend, const D: usize>(t: Tensor<B, D>) -> (Vec<f64>, Vec<usize>) {
    let shape = t.dims().to_vec();
    let v = t.into_data().convert::<f32>().to_vec::<f32>().expect("f32 data");
    (v.into_iter().map(|x| x as f64).collect(), shape)
}

/// Crop a row-major NCHW-or-any-rank array to `want` from the top-left or bottom-right corner.
fn crop(v: &[f64], shape: &[usize], want: &[usize], bottom_right: bool) -> Option<Vec<f64>> {
    if want.len() != shape.len() || want.iter().zip(shape).any(|(w, s)| w > s) {
        return None;
    }
    let offs: Vec<usize> = shape.iter().zip(want).map(|(s, w)| if bottom_right { s - w } else { 0 }).collect();
    let n: usize = want.iter().product();
    let mut out = Vec::with_capacity(n);
    let mut idx = vec![0usize; want.len()];
    for _ in 0..n {
        let mut flat = 0;
        for d in 0..shape.len() {
            flat = flat * shape[d] + idx[d] + offs[d];
        }
        out.push(v[flat]);
        for d in (0..want.len()).rev() {
            idx[d] += 1;
            if idx[d] < want[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    Some(out)
}

/// Reductions over the last axis of `[.., V]`.
fn reduce_last(v: &[f64], shape: &[usize], f: impl Fn(&[f64]) -> f64) -> (Vec<f64>, Vec<usize>) {
    let last = *shape.last().unwrap();
    (v.chunks(last).map(f).collect(), shape[..shape.len() - 1].to_vec())
}

struct Computed {
    base: BTreeMap<String, (Vec<f64>, Vec<usize>)>,
}

impl Computed {
    fn new<B: Backend>(out: &PvltOutput<B>, hidden: &HiddenStates<B>) -> Computed {
        let mut base = BTreeMap::new();
        for i in 0..4 {
            base.insert(format!("img_feats.{i}"), to_f64(hidden.img_feats[i].clone()));
            base.insert(format!("text_feats.{i}"), to_f64(hidden.text_feats[i].clone()));
            base.insert(format!("pos_embed_used.{i}"), to_f64(hidden.pos_embed_used[i].clone()));
        }
        base.insert("text_embeddings".into(), to_f64(hidden.text_embeddings.clone()));
        base.insert("patch_embed1".into(), to_f64(hidden.patch_embed1.clone()));
        let opt3 = |t: &Option<Tensor<B, 3>>| t.clone().map(to_f64);
        for (k, v) in [
            ("itm_logits", opt3(&out.itm_logits)),
            ("sup_cls_logits", opt3(&out.sup_cls_logits)),
            ("sub_cls_logits", opt3(&out.sub_cls_logits)),
            ("mlm_hidden", opt3(&hidden.mlm_hidden)),
            ("mlm_logits", opt3(&out.mlm_logits)),
            ("t2i_logits", out.t2i_logits.clone().map(to_f64)),
        ] {
            if let Some(v) = v {
                base.insert(k.to_string(), v);
            }
        }
        Computed { base }
    }

    /// Map a stored name onto our outputs. `Err` = not understood / not available (skipped).
    fn ours(&self, name: &str, want: &[usize], mlm_rows: Option<&[usize]>) -> std::result::Result<Ours, String> {
        if let Some(b) = self.base.get(name) {
            return Ok((b.0.clone(), b.1.clone(), false));
        }
        let get =
            |base: &str| self.base.get(base).ok_or_else(|| format!("model did not produce `{base}` (head absent?)"));
        // MLM logits are stored sliced and reduced, not whole.
        if let Some(rest) = name.strip_prefix("mlm_logits_") {
            let (v, s) = get("mlm_logits")?;
            let max = |r: &[f64]| r.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            return match rest {
                "logsumexp_f64" => {
                    let (v, s) = reduce_last(v, s, |r| {
                        let m = max(r);
                        m + r.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
                    });
                    Ok((v, s, false))
                }
                "sum_f64" => {
                    let (v, s) = reduce_last(v, s, |r| r.iter().sum());
                    Ok((v, s, false))
                }
                "max" => {
                    let (v, s) = reduce_last(v, s, max);
                    Ok((v, s, false))
                }
                "argmax" => {
                    // First index of the maximum, as torch.argmax.
                    let (v, s) = reduce_last(v, s, |r| {
                        let m = max(r);
                        // An all-NaN row has no maximum: NaN never equals the stored index.
                        r.iter().position(|&x| x == m).map_or(f64::NAN, |p| p as f64)
                    });
                    Ok((v, s, true))
                }
                "rows" => {
                    let rows = mlm_rows.ok_or("fixture JSON has no `mlm_rows`")?;
                    let (b, t, voc) = (s[0], s[1], s[2]);
                    let mut out = vec![];
                    for bi in 0..b {
                        for &r in rows {
                            if r >= t {
                                return Err(format!("mlm_rows entry {r} >= T = {t}"));
                            }
                            out.extend_from_slice(&v[(bi * t + r) * voc..(bi * t + r + 1) * voc]);
                        }
                    }
                    Ok((out, vec![b, rows.len(), voc], false))
                }
                _ if rest.starts_with("first") => {
                    let c = crop(v, s, want, false).ok_or("shape does not fit")?;
                    Ok((c, want.to_vec(), false))
                }
                _ => Err("unknown MLM reduction".into()),
            };
        }
        // Corner crops and per-channel sums of a base tensor.
        for (suffix, br) in [("_corner", false), ("_top_left_", false), ("_bottom_right_", true)] {
            if let Some(pos) = name.find(suffix) {
                let (v, s) = get(&name[..pos])?;
                let c = crop(v, s, want, br).ok_or("crop shape does not fit")?;
                return Ok((c, want.to_vec(), false));
            }
        }
        if let Some(base) = name.strip_suffix("_channel_sum_f64") {
            let (v, s) = get(base)?;
            let hw: usize = s[2..].iter().product();
            return Ok((v.chunks(hw).map(|c| c.iter().sum()).collect(), s[..2].to_vec(), false));
        }
        Err("not a tensor this checker understands".into())
    }
}

/// Compare a forward pass with the stored tensors.
pub fn compare<B: Backend>(
    (out, hidden): &(PvltOutput<B>, HiddenStates<B>),
    expected: &BTreeMap<String, TensorData>,
    mlm_rows: Option<&[usize]>,
    tol: &Tolerance,
) -> Vec<Row> {
    let computed = Computed::new(out, hidden);
    let mut rows = vec![];
    for (name, data) in expected {
        let want = data.shape.to_vec();
        let reference: Vec<f64> = data.clone().convert::<f64>().to_vec::<f64>().expect("numeric");
        match computed.ours(name, &want, mlm_rows) {
            Err(why) => rows.push(Row {
                name: name.clone(),
                shape: want,
                max_abs: f64::NAN,
                max_rel: f64::NAN,
                ok: true,
                skipped: Some(why),
            }),
            Ok((ours, shape, exact)) => {
                if shape.iter().product::<usize>() != want.iter().product::<usize>() {
                    rows.push(Row {
                        name: name.clone(),
                        shape: want.clone(),
                        max_abs: f64::NAN,
                        max_rel: f64::NAN,
                        ok: false,
                        skipped: Some(format!("shape mismatch: ours {shape:?}, reference {want:?}")),
                    });
                    continue;
                }
                rows.push(compare_values(name, want, &ours, &reference, exact, tol));
            }
        }
    }
    rows
}

/// Element-wise `|ours - ref| <= atol + rtol * |ref|` (or equality when `exact`).
pub fn compare_values(
    name: &str,
    shape: Vec<usize>,
    ours: &[f64],
    reference: &[f64],
    exact: bool,
    tol: &Tolerance,
) -> Row {
    let (mut max_abs, mut max_rel, mut ok) = (0.0f64, 0.0f64, true);
    for (a, e) in ours.iter().zip(reference) {
        let d = (a - e).abs();
        if !d.is_finite() && a != e {
            ok = false;
            max_abs = f64::INFINITY;
            continue;
        }
        max_abs = max_abs.max(d);
        if e.abs() > tol.atol {
            max_rel = max_rel.max(d / e.abs());
        }
        ok &= if exact { a == e } else { d <= tol.atol + tol.rtol * e.abs() };
    }
    Row { name: name.to_string(), shape, max_abs, max_rel, ok, skipped: None }
}

pub fn print_rows(fixture: &str, rows: &[Row]) {
    println!("{fixture}");
    println!("  {:<34} {:<18} {:>11} {:>11}  ok", "tensor", "shape", "max abs", "max rel");
    for r in rows {
        let shape = format!("{:?}", r.shape);
        match &r.skipped {
            Some(why) if r.ok => println!("  {:<34} {:<18} {:>11} {:>11}  skipped: {why}", r.name, shape, "-", "-"),
            Some(why) => println!("  {:<34} {:<18} {:>11} {:>11}  FAIL: {why}", r.name, shape, "-", "-"),
            None => println!(
                "  {:<34} {:<18} {:>11.3e} {:>11.3e}  {}",
                r.name,
                shape,
                r.max_abs,
                r.max_rel,
                if r.ok { "ok" } else { "FAIL" }
            ),
        }
    }
    let compared = rows.iter().filter(|r| r.skipped.is_none()).count();
    let failed = rows.iter().filter(|r| !r.ok).count();
    let worst = rows.iter().filter(|r| r.skipped.is_none()).map(|r| r.max_abs).fold(0.0, f64::max);
    println!(
        "  {compared} tensors compared, {failed} failed, {} skipped; max abs error {worst:.3e}",
        rows.len() - compared - rows.iter().filter(|r| r.skipped.is_some() && !r.ok).count()
    );
}

/// Load the fixture's model on a backend, run it in eval mode and compare.
pub struct VerifyTask<'a> {
    pub fixture: &'a Fixture,
    pub tol: Tolerance,
    pub verbose_load: bool,
}

impl BackendTask for VerifyTask<'_> {
    type Output = Vec<Row>;
    fn run<B: Backend>(self, device: B::Device) -> Result<Vec<Row>> {
        let f = self.fixture;
        let loaded = load_model::<B>(&f.config, &f.weights, f.non_strict, &device)?;
        if self.verbose_load {
            loaded.print_reports();
        }
        let model = loaded.model;
        let out = forward_fixture(&model, f, &device)?;
        Ok(compare(&out, &f.expected, f.mlm_rows.as_deref(), &self.tol))
    }
}

pub fn forward_fixture<B: Backend>(
    model: &Pvlt<B>,
    f: &Fixture,
    device: &B::Device,
) -> Result<(PvltOutput<B>, HiddenStates<B>)> {
    let [b, c, h, w]: [usize; 4] = f
        .images
        .shape
        .to_vec()
        .try_into()
        .map_err(|_| anyhow::anyhow!("images must be [B,3,H,W], got {:?}", f.images.shape))?;
    if c != 3 {
        bail!("images must have 3 channels, got {c}");
    }
    f.config.check_image_size(h, w)?;
    let ids_shape = f.input_ids.shape.to_vec();
    if ids_shape.len() != 2 || ids_shape[0] != b || ids_shape[1] != f.config.num_text_tokens {
        bail!("input_ids must be [{b}, {}] (batch, num_text_tokens), got {ids_shape:?}", f.config.num_text_tokens);
    }
    let ids: Vec<i64> = f.input_ids.iter::<i64>().collect();
    if let Some(bad) = ids.iter().find(|&&i| i < 0 || i as usize >= f.config.vocab_size) {
        bail!("input id {bad} is outside the vocabulary (size {})", f.config.vocab_size);
    }
    let images = Tensor::<B, 4>::from_data(f.images.clone(), device);
    let input_ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [b, ids_shape[1]]), device);
    Ok(model.output_hidden_states(images, input_ids, model.heads(), Mode::Eval))
}
