//! `mvlt verify --train-step`: one pre-training step against a stored PyTorch step.
//!
//! The fixture (one safetensors file) holds the inputs (`in/*`), the loss terms (`loss/*`), every
//! parameter's gradient (`grad/<name>`), BatchNorm buffers after the forward (`bn_after/<name>`)
//! and parameters after one AdamW step (`param_after/<name>`). The step is the odd (masked-image)
//! pre-training step with all five losses, train mode, dropout and drop_path off, AdamW lr 1e-3,
//! betas 0.9/0.999, eps 1e-8, weight decay 0.01 on every parameter.

use crate::verify::{compare_values, Row, Tolerance};
use anyhow::{bail, Context, Result};
use burn::backend::Autodiff;
use burn::optim::GradientsParams;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use mvlt::device::BackendTask;
use mvlt::model::weights::{load_model, state_dict, StateDict};
use mvlt::model::{Mode, PvltConfig};
use mvlt::train::loss::{losses, MlmTargets, Targets};
use mvlt::train::optim::{named_grads, AdamW, AdamWConfig};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Clone)]
pub struct TrainStepTask {
    pub step_file: PathBuf,
    pub weights: PathBuf,
    pub config: String,
    pub non_strict: bool,
    pub tol: Tolerance,
}

/// The fixture's AdamW settings (fixed by the format).
pub const STEP_LR: f64 = 1e-3;
pub const STEP_ADAMW: AdamWConfig = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };

fn values(d: &TensorData) -> Result<Vec<f64>> {
    d.clone().convert::<f64>().to_vec::<f64>().map_err(|e| anyhow::anyhow!("reading a tensor's values: {e:?}"))
}

fn to_f64<B: Backend, const D: usize>(t: Tensor<B, D>) -> Result<Vec<f64>> {
    values(&t.into_data())
}

/// Parameters after the step, compared relative to the tensor's own scale: `|ours - ref| <= rtol *
/// max |ref| + slack`, where `slack` is what the (separately checked) gradient difference does to
/// this first AdamW update. On step 1 the update is `lr * g / (|g| + eps)`, so where |g| is near eps
/// a gradient difference at float32 rounding level moves the parameter by a visible fraction of lr;
/// `slack = lr * |u(g_ours) - u(g_ref)|` accounts for exactly that and nothing else.
fn compare_after_step(
    name: &str,
    shape: Vec<usize>,
    ours: &[f64],
    reference: &[f64],
    grads: Option<(&[f64], &[f64])>,
    rtol: f64,
) -> Row {
    let scale = reference.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-12);
    let u = |g: f64| g / (g.abs() + STEP_ADAMW.eps);
    let (mut max_abs, mut ok) = (0.0f64, true);
    for (i, (a, e)) in ours.iter().zip(reference).enumerate() {
        let d = (a - e).abs();
        let slack = grads.map(|(go, gr)| STEP_LR * (u(go[i]) - u(gr[i])).abs()).unwrap_or(0.0);
        ok &= d <= rtol * scale + slack;
        max_abs = if d.is_nan() { f64::INFINITY } else { max_abs.max(d) };
    }
    Row { name: name.to_string(), shape, max_abs, max_rel: max_abs / scale, ok, skipped: None }
}

fn missing(name: &str, why: &str) -> Row {
    Row {
        name: name.to_string(),
        shape: vec![],
        max_abs: f64::NAN,
        max_rel: f64::NAN,
        ok: false,
        skipped: Some(why.to_string()),
    }
}

/// The word-embedding gradient's two sources, checked apart where they differ: the lookup
/// (`padding_idx` 0) gives the [PAD] row nothing, so that row's gradient is the tied MLM decoder's
/// alone. Rows: the fixture's lookup part is zero there, and our [PAD] row equals its decoder part.
/// Fixtures without `grad_part/*` entries (older ones) add no rows.
fn pad_row_check(
    fx: &BTreeMap<String, TensorData>,
    ours: &BTreeMap<String, Vec<f64>>,
    tol: &Tolerance,
) -> Result<Vec<Row>> {
    let key = mvlt::model::weights::WORD_EMBEDDINGS_KEY;
    let (Some(lookup), Some(decoder)) =
        (fx.get(&format!("grad_part/lookup/{key}")), fx.get(&format!("grad_part/decoder/{key}")))
    else {
        return Ok(vec![]);
    };
    let hidden = decoder.shape.last().copied().unwrap_or(0);
    let row0 = |d: &TensorData| -> Result<Vec<f64>> { Ok(values(d)?.into_iter().take(hidden).collect()) };
    let mut rows = vec![compare_values(
        &format!("grad_part/lookup/{key}[PAD row] is zero"),
        vec![hidden],
        &row0(lookup)?,
        &vec![0.0; hidden],
        false,
        &Tolerance { atol: 0.0, rtol: 0.0 },
    )];
    let name = format!("grad_part/decoder/{key}[PAD row] = our whole gradient's");
    match ours.get(key) {
        Some(g) => {
            rows.push(compare_values(&name, vec![hidden], &g[..hidden.min(g.len())], &row0(decoder)?, false, tol))
        }
        None => rows.push(missing(&name, "we computed no gradient for the word embeddings")),
    }
    Ok(rows)
}

impl BackendTask for TrainStepTask {
    type Output = Vec<Row>;
    fn run<B: Backend>(self, device: B::Device) -> Result<Vec<Row>> {
        type AB<B> = Autodiff<B>;
        let fx = StateDict::read(&self.step_file)?.tensors;
        let get = |k: &str| {
            fx.get(k).with_context(|| format!("{}: the training-step fixture has no '{k}'", self.step_file.display()))
        };
        let mut cfg = PvltConfig::resolve(&self.config)?;
        cfg.drop_path_rate = 0.0;
        cfg.text_dropout = 0.0;
        let loaded = load_model::<AB<B>>(&cfg, std::slice::from_ref(&self.weights), self.non_strict, &device)?;
        loaded.print_reports();
        let model = loaded.model;

        let images = get("in/images")?;
        let [b, c, h, w]: [usize; 4] = images
            .shape
            .to_vec()
            .try_into()
            .map_err(|_| anyhow::anyhow!("in/images must be [B,3,H,W], got {:?}", images.shape))?;
        if c != 3 {
            bail!("in/images must have 3 channels, got {c}");
        }
        cfg.check_image_size(h, w)?;
        let img =
            |k: &str| -> Result<Tensor<AB<B>, 4>> { Ok(Tensor::from_data(get(k)?.clone().convert::<f32>(), &device)) };
        let ints = |k: &str| -> Result<Vec<i64>> {
            get(k)?.clone().convert::<i64>().to_vec::<i64>().map_err(|e| anyhow::anyhow!("{k}: {e:?}"))
        };
        let ids = ints("in/input_ids")?;
        let t = cfg.num_text_tokens;
        if ids.len() != b * t {
            bail!(
                "in/input_ids must be [{b}, {t}] (num_text_tokens of the config), got {:?}",
                get("in/input_ids")?.shape
            );
        }
        let mlm_labels = ints("in/mlm_labels")?;
        if mlm_labels.len() != b * t {
            bail!("in/mlm_labels must be [{b}, {t}] like in/input_ids, got {:?}", get("in/mlm_labels")?.shape);
        }
        let flat = |v: Vec<i64>| Tensor::<AB<B>, 1, Int>::from_data(TensorData::new(v.clone(), [v.len()]), &device);
        let targets = Targets {
            mlm: MlmTargets::from_labels(&mlm_labels, &device),
            itm_labels: flat(ints("in/itm_labels")?),
            clean_images: img("in/images")?,
            sup_labels: flat(ints("in/sup_cls_labels")?),
            sub_labels: flat(ints("in/sub_cls_labels")?),
            itc: None,
        };
        let input_ids = Tensor::<AB<B>, 2, Int>::from_data(TensorData::new(ids, [b, t]), &device);
        let heads = cfg.heads;
        let out =
            model.forward_mlm_at(img("in/masked_images")?, input_ids, heads, Mode::Train, targets.mlm.rows.clone());
        let l = losses(&out, &targets, heads);

        let mut rows = vec![];
        let tol = &self.tol;
        let terms = [
            ("loss/loss_mlm", &l.mlm),
            ("loss/loss_itm", &l.itm),
            ("loss/loss_sup_cls", &l.sup_cls),
            ("loss/loss_sub_cls", &l.sub_cls),
            ("loss/loss_t2i", &l.t2i),
            ("loss/total_loss", &Some(l.total.clone())),
        ];
        for (name, ours) in terms {
            match (fx.get(name), ours) {
                (Some(want), Some(v)) => {
                    rows.push(compare_values(name, vec![], &to_f64(v.clone())?, &values(want)?, false, tol))
                }
                (Some(_), None) => rows.push(missing(name, "this head is not in the config")),
                (None, _) => rows.push(missing(name, "not in the fixture")),
            }
        }

        let grads = GradientsParams::from_grads(l.total.backward(), &model);
        let mut seen = 0;
        let mut our_grads: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for (key, shape, g) in named_grads(&model, &grads) {
            let name = format!("grad/{key}");
            match (fx.get(&name), g) {
                (Some(want), Some(g)) => {
                    seen += 1;
                    let g = to_f64(g)?;
                    rows.push(compare_values(&name, shape, &g, &values(want)?, false, tol));
                    our_grads.insert(key, g);
                }
                (Some(_), None) => rows.push(missing(&name, "we computed no gradient for it")),
                (None, _) => rows.push(missing(&name, "no gradient stored for this parameter")),
            }
        }
        let stored = fx.keys().filter(|k| k.starts_with("grad/")).count();
        if stored != seen {
            let ours: std::collections::HashSet<String> = rows.iter().map(|r| r.name.clone()).collect();
            for k in fx.keys().filter(|k| k.starts_with("grad/") && !ours.contains(*k)) {
                rows.push(missing(k, "stored gradient of a parameter this model does not have"));
            }
        }

        rows.extend(pad_row_check(&fx, &our_grads, tol)?);

        // BatchNorm buffers after the forward (the running update happened in it).
        let after: BTreeMap<String, TensorData> =
            state_dict(&burn::module::AutodiffModule::valid(&model), &cfg)?.into_iter().collect();
        for (name, want) in fx.iter().filter(|(k, _)| k.starts_with("bn_after/")) {
            let key = &name["bn_after/".len()..];
            match after.get(key) {
                Some(ours) => rows.push(compare_values(
                    name,
                    want.shape.to_vec(),
                    &values(ours)?,
                    &values(want)?,
                    key.ends_with("num_batches_tracked"),
                    tol,
                )),
                None => rows.push(missing(name, "no such buffer in the model")),
            }
        }

        let mut grads = grads;
        let mut opt = AdamW::<B>::new(STEP_ADAMW);
        let model = opt.step(model, &mut grads, STEP_LR, 1.0, &|_, _| true);
        let after: BTreeMap<String, TensorData> =
            state_dict(&burn::module::AutodiffModule::valid(&model), &cfg)?.into_iter().collect();
        for (name, want) in fx.iter().filter(|(k, _)| k.starts_with("param_after/")) {
            let key = &name["param_after/".len()..];
            match after.get(key) {
                Some(ours) => {
                    let ref_grad = fx.get(&format!("grad/{key}")).map(values).transpose()?;
                    let grads = our_grads.get(key).zip(ref_grad.as_ref()).map(|(a, b)| (a.as_slice(), b.as_slice()));
                    rows.push(compare_after_step(
                        name,
                        want.shape.to_vec(),
                        &values(ours)?,
                        &values(want)?,
                        grads,
                        tol.rtol,
                    ))
                }
                None => rows.push(missing(name, "no such parameter in the model")),
            }
        }
        Ok(rows)
    }
}
