//! `PvltConfig`: the reference constructor's arguments, presets, and validation.
//!
//! Field names follow `PyramidVisionLanguageTransformer.__init__` in the authors' code so a config
//! reads the same on both sides. The JSON form accepted by [`PvltConfig::from_json`] is either this
//! struct serialised, or the `config` object of the reference fixtures (with a nested `bert_config`
//! and a `loss_type` dict saying which heads exist).

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

/// Which heads the model has (the reference's `loss_type` keys).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeadSet {
    pub itm: bool,
    pub mlm: bool,
    /// Masked image reconstruction (the reference calls it t2i / ITG).
    pub t2i: bool,
    /// Main- and sub-category recognition.
    pub cls: bool,
    /// Image-text contrastive embeddings (ALBEF's ITC; not in the reference, so off in every
    /// preset and absent from the authors' checkpoints): `itc_head.*`.
    #[serde(default)]
    pub itc: bool,
}

impl HeadSet {
    /// The reference's four heads (ITC is ours, so not among them).
    pub const ALL: HeadSet = HeadSet { itm: true, mlm: true, t2i: true, cls: true, itc: false };
    pub const NONE: HeadSet = HeadSet { itm: false, mlm: false, t2i: false, cls: false, itc: false };
    /// The authors' pre-training recipe (`cls: 0`).
    pub const PRETRAIN: HeadSet = HeadSet { itm: true, mlm: true, t2i: true, cls: false, itc: false };
    /// The authors' recognition fine-tuning recipe (`cls` only).
    pub const FINETUNE: HeadSet = HeadSet { itm: false, mlm: false, t2i: false, cls: true, itc: false };

    /// Heads whose weights appear in a state dict (used when a config does not say).
    pub fn present_in<'a>(keys: impl IntoIterator<Item = &'a str>) -> HeadSet {
        let mut h = HeadSet::NONE;
        for k in keys {
            h.itm |= k.starts_with("itm_head");
            h.mlm |= k.starts_with("mlm_head");
            h.t2i |= k.starts_with("t2i_head");
            h.cls |= k.starts_with("sup_cls_head") || k.starts_with("sub_cls_head");
            h.itc |= k.starts_with("itc_head");
        }
        h
    }

    pub fn and(self, other: HeadSet) -> HeadSet {
        HeadSet {
            itm: self.itm && other.itm,
            mlm: self.mlm && other.mlm,
            t2i: self.t2i && other.t2i,
            cls: self.cls && other.cls,
            itc: self.itc && other.itc,
        }
    }

    pub fn names(self) -> Vec<&'static str> {
        let mut v = vec![];
        if self.itm {
            v.push("itm")
        }
        if self.mlm {
            v.push("mlm")
        }
        if self.t2i {
            v.push("t2i")
        }
        if self.cls {
            v.push("cls")
        }
        if self.itc {
            v.push("itc")
        }
        v
    }
}

fn default_itc_dim() -> usize {
    128
}

/// The named architectures: the reference's four variants and the micro one of the CPU recipes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    Micro,
    Tiny,
    Small,
    Medium,
    Large,
}

impl Preset {
    pub const ALL: [Preset; 5] = [Preset::Micro, Preset::Tiny, Preset::Small, Preset::Medium, Preset::Large];

    /// Its name in recipes and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Micro => "micro",
            Preset::Tiny => "tiny",
            Preset::Small => "small",
            Preset::Medium => "medium",
            Preset::Large => "large",
        }
    }

    /// A preset by name (`tiny` or `pvlt_tiny`).
    pub fn parse(name: &str) -> Option<Preset> {
        let name = name.strip_prefix("pvlt_").unwrap_or(name);
        Preset::ALL.into_iter().find(|p| p.name() == name)
    }

    pub fn config(self) -> PvltConfig {
        PvltConfig::preset(self.name()).expect("every preset has a config")
    }
}

/// Most parameters a config may ask for (8 GB of f32; PVLT-large has about a tenth of that).
pub const MAX_PARAMS: u64 = 2_000_000_000;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PvltConfig {
    pub patch_size: usize,
    /// Image size the positional-embedding tables are built for (224 in every released model).
    pub img_size: usize,
    /// The image side the weights were trained on (the preprocessing's resize), which inference
    /// must use too: written by training into every file it exports, read back by
    /// `infer::Model::load`. Absent in the authors' checkpoints and in mvlt files from before it
    /// was recorded (`infer::input_size` says what those get).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_size: Option<usize>,
    pub embed_dims: [usize; 4],
    pub num_heads: [usize; 4],
    pub mlp_ratios: [usize; 4],
    pub depths: [usize; 4],
    pub sr_ratios: [usize; 4],
    pub qkv_bias: bool,
    /// Width of the BERT-style text embedding (768 for bert-base sizes).
    pub token_hidden_size: usize,
    /// T: every input must have exactly this many token ids.
    pub num_text_tokens: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub num_sup_classes: usize,
    pub num_sub_classes: usize,
    /// Channel width c of the reconstruction head (fixed at 64 in the reference).
    pub t2i_channel: usize,
    /// Width of the contrastive embeddings (`heads.itc`).
    #[serde(default = "default_itc_dim")]
    pub itc_dim: usize,
    pub drop_path_rate: f64,
    /// Dropout after the text embedding's LayerNorm (BERT's hidden_dropout_prob).
    pub text_dropout: f64,
    pub block_norm_eps: f64,
    pub norm_eps: f64,
    pub bert_layer_norm_eps: f64,
    /// Standard deviation of every Linear weight at initialisation (the reference: 0.02). At a few
    /// dozen channels 0.02 leaves the attention path so weak that the text tokens hardly see the
    /// image, and ITM does not learn in CPU-sized runs (see README, Training).
    pub linear_init_std: f64,
    /// Standard deviation of the text position and token-type embedding tables at initialisation.
    /// The reference leaves them at PyTorch's default, 1, fifty times the word embeddings' 0.02:
    /// after the embedding LayerNorm a word's identity is then about 1% of its token vector, and
    /// it takes many steps before the text stream tells words apart.
    pub text_table_init_std: f64,
    pub heads: HeadSet,
}

impl PvltConfig {
    fn pvlt(depths: [usize; 4]) -> Self {
        PvltConfig {
            patch_size: 4,
            img_size: 224,
            input_size: None,
            embed_dims: [64, 128, 320, 512],
            num_heads: [1, 2, 5, 8],
            mlp_ratios: [8, 8, 4, 4],
            depths,
            sr_ratios: [8, 4, 2, 1],
            qkv_bias: true,
            token_hidden_size: 768,
            num_text_tokens: 128,
            vocab_size: 30522,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            num_sup_classes: 48,
            num_sub_classes: 122,
            t2i_channel: 64,
            itc_dim: default_itc_dim(),
            drop_path_rate: 0.1,
            text_dropout: 0.1,
            block_norm_eps: 1e-6,
            norm_eps: 1e-5,
            bert_layer_norm_eps: 1e-12,
            linear_init_std: 0.02,
            text_table_init_std: 1.0,
            heads: HeadSet::ALL,
        }
    }
    pub fn tiny() -> Self {
        Self::pvlt([2, 2, 2, 2])
    }
    pub fn small() -> Self {
        Self::pvlt([3, 4, 6, 3])
    }
    pub fn medium() -> Self {
        Self::pvlt([3, 4, 18, 3])
    }
    pub fn large() -> Self {
        Self::pvlt([3, 8, 27, 3])
    }

    /// The micro PVLT (`configs/pvlt_micro.json`): a CPU-sized model for demos, tests and the
    /// `cpu-pretrain` recipe.
    pub fn micro() -> Self {
        let v: Value = serde_json::from_str(include_str!("../../configs/pvlt_micro.json"))
            .expect("configs/pvlt_micro.json is JSON");
        Self::from_json(&v).expect("configs/pvlt_micro.json is a valid config (tested)")
    }

    /// The reference's variants (MVLT-SPEC 2); [`PvltConfig::preset`] also takes `micro`.
    pub const PRESETS: [&'static str; 4] = ["tiny", "small", "medium", "large"];

    pub fn preset(name: &str) -> Option<Self> {
        match name.strip_prefix("pvlt_").unwrap_or(name) {
            "tiny" => Some(Self::tiny()),
            "small" => Some(Self::small()),
            "medium" => Some(Self::medium()),
            "large" => Some(Self::large()),
            "micro" => Some(Self::micro()),
            _ => None,
        }
    }

    /// The preset with the same depths, if any (used by `inspect` to name a checkpoint).
    pub fn variant_name(&self) -> Option<&'static str> {
        Self::PRESETS.into_iter().chain(["micro"]).find(|p| {
            let c = Self::preset(p).unwrap();
            c.depths == self.depths && c.embed_dims == self.embed_dims
        })
    }

    /// `--config` resolution: a preset name, or a JSON file holding either this struct, the
    /// reference constructor's arguments, or a fixture/manifest with a `config` object.
    pub fn resolve(spec: &str) -> Result<Self> {
        if let Some(c) = Self::preset(spec) {
            return Ok(c);
        }
        let path = Path::new(spec);
        if !path.exists() {
            bail!("--config '{spec}' is neither a preset ({}, micro) nor an existing file", Self::PRESETS.join(", "));
        }
        let text = crate::files::read_text_limited(path, "config file", crate::files::MAX_SMALL_FILE_BYTES)?;
        let value: Value =
            serde_json::from_str(&text).with_context(|| format!("config file {} is not valid JSON", path.display()))?;
        let cfg = Self::from_json(&value).with_context(|| format!("in config file {}", path.display()))?;
        Ok(cfg)
    }

    /// Parse any of the accepted JSON shapes (see the module docs), then validate.
    pub fn from_json(value: &Value) -> Result<Self> {
        let obj = match value.get("config") {
            Some(inner) if inner.is_object() => inner,
            _ => value,
        };
        let obj = obj.as_object().context("config must be a JSON object")?;
        let base = PvltConfig::tiny();
        let bert = obj.get("bert_config").and_then(|b| b.as_object());
        // A key may live at top level (our form, manifests) or inside bert_config (fixtures).
        let get = |names: &[&str]| -> Option<&Value> {
            names.iter().find_map(|n| obj.get(*n).or_else(|| bert.and_then(|b| b.get(*n))))
        };
        let usize_of = |names: &[&str], default: usize| -> Result<usize> {
            match get(names) {
                None | Some(Value::Null) => Ok(default),
                Some(v) => v
                    .as_u64()
                    .map(|x| x as usize)
                    .with_context(|| format!("config key '{}' must be a non-negative integer, got {v}", names[0])),
            }
        };
        let f64_of = |names: &[&str], default: f64| -> Result<f64> {
            match get(names) {
                None | Some(Value::Null) => Ok(default),
                Some(v) => v.as_f64().with_context(|| format!("config key '{}' must be a number, got {v}", names[0])),
            }
        };
        let arr4 = |name: &str, default: [usize; 4]| -> Result<[usize; 4]> {
            match obj.get(name) {
                None => Ok(default),
                Some(v) => {
                    let a: Vec<usize> = serde_json::from_value(v.clone())
                        .with_context(|| format!("config key '{name}' must be a list of 4 integers, got {v}"))?;
                    a.try_into().map_err(|a: Vec<usize>| {
                        anyhow::anyhow!("config key '{name}' must have 4 entries (one per stage), got {}", a.len())
                    })
                }
            }
        };
        let heads = if let Some(h) = obj.get("heads") {
            serde_json::from_value(h.clone()).context("config key 'heads'")?
        } else if let Some(lt) = obj.get("loss_type").and_then(|l| l.as_object()) {
            let on = |k: &str| lt.get(k).and_then(|v| v.as_f64()).map(|x| x != 0.0).unwrap_or(false);
            HeadSet { itm: on("itm"), mlm: on("mlm"), t2i: on("t2i"), cls: on("cls"), itc: on("itc") }
        } else {
            HeadSet::ALL
        };
        let cfg = PvltConfig {
            patch_size: usize_of(&["patch_size"], base.patch_size)?,
            img_size: usize_of(&["img_size", "img_size_for_pos_embed"], base.img_size)?,
            input_size: get(&["input_size"]).and_then(|v| v.as_u64()).map(|v| v as usize),
            embed_dims: arr4("embed_dims", base.embed_dims)?,
            num_heads: arr4("num_heads", base.num_heads)?,
            mlp_ratios: arr4("mlp_ratios", base.mlp_ratios)?,
            depths: arr4("depths", base.depths)?,
            sr_ratios: arr4("sr_ratios", base.sr_ratios)?,
            qkv_bias: get(&["qkv_bias"]).and_then(|v| v.as_bool()).unwrap_or(true),
            token_hidden_size: usize_of(&["token_hidden_size", "hidden_size"], base.token_hidden_size)?,
            num_text_tokens: usize_of(&["num_text_tokens"], base.num_text_tokens)?,
            vocab_size: usize_of(&["vocab_size"], base.vocab_size)?,
            max_position_embeddings: usize_of(&["max_position_embeddings"], base.max_position_embeddings)?,
            type_vocab_size: usize_of(&["type_vocab_size"], base.type_vocab_size)?,
            num_sup_classes: usize_of(&["num_sup_classes", "sup_classes"], base.num_sup_classes)?,
            num_sub_classes: usize_of(&["num_sub_classes", "sub_classes"], base.num_sub_classes)?,
            t2i_channel: usize_of(&["t2i_channel"], base.t2i_channel)?,
            itc_dim: usize_of(&["itc_dim"], base.itc_dim)?,
            drop_path_rate: f64_of(&["drop_path_rate"], base.drop_path_rate)?,
            text_dropout: f64_of(&["text_dropout", "hidden_dropout_prob"], base.text_dropout)?,
            block_norm_eps: f64_of(&["block_norm_eps"], base.block_norm_eps)?,
            norm_eps: f64_of(&["norm_eps"], base.norm_eps)?,
            bert_layer_norm_eps: f64_of(&["bert_layer_norm_eps", "layer_norm_eps"], base.bert_layer_norm_eps)?,
            linear_init_std: f64_of(&["linear_init_std"], base.linear_init_std)?,
            text_table_init_std: f64_of(&["text_table_init_std"], base.text_table_init_std)?,
            heads,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Grid side of stage `i`'s positional-embedding table (56, 28, 14, 7 at img_size 224).
    pub fn pos_table_grid(&self, stage: usize) -> usize {
        self.img_size / self.patch_size / (1 << stage)
    }

    /// Reject configurations the reference would build but not run (or would run wrongly).
    pub fn validate(&self) -> Result<()> {
        for i in 0..4 {
            let (c, h) = (self.embed_dims[i], self.num_heads[i]);
            if h == 0 || c % h != 0 {
                bail!("stage {}: embed_dims[{i}] = {c} is not divisible by num_heads[{i}] = {h}", i + 1);
            }
            if self.sr_ratios[i] == 0 || self.mlp_ratios[i] == 0 || self.depths[i] == 0 {
                bail!("stage {}: sr_ratios, mlp_ratios and depths must be >= 1", i + 1);
            }
        }
        if self.patch_size == 0 || !self.img_size.is_multiple_of(self.patch_size * 8) {
            bail!(
                "img_size {} (the positional-embedding size) must be divisible by patch_size*8 = {}",
                self.img_size,
                self.patch_size * 8
            );
        }
        if self.num_text_tokens == 0 || self.num_text_tokens > self.max_position_embeddings {
            bail!(
                "num_text_tokens {} must be between 1 and max_position_embeddings {}",
                self.num_text_tokens,
                self.max_position_embeddings
            );
        }
        if !(0.0..1.0).contains(&self.drop_path_rate) || !(0.0..1.0).contains(&self.text_dropout) {
            bail!("drop_path_rate and text_dropout must be in [0, 1)");
        }
        // Sane bounds, far above every real PVLT (large: depths [3,8,27,3], widths up to 512), so a
        // crafted config (in a weights file's metadata, say) cannot ask for terabytes.
        let bounds: [(&str, usize, usize); 12] = [
            ("patch_size", self.patch_size, 64),
            ("img_size", self.img_size, 4096),
            ("token_hidden_size", self.token_hidden_size, 8192),
            ("num_text_tokens", self.num_text_tokens, 4096),
            ("vocab_size", self.vocab_size, 1_000_000),
            ("max_position_embeddings", self.max_position_embeddings, 4096),
            ("type_vocab_size", self.type_vocab_size, 64),
            ("num_sup_classes", self.num_sup_classes, 100_000),
            ("num_sub_classes", self.num_sub_classes, 100_000),
            ("t2i_channel", self.t2i_channel, 4096),
            ("itc_dim", self.itc_dim, 4096),
            ("total depth", self.depths.iter().sum(), 256),
        ];
        for (name, v, max) in bounds {
            if v > max {
                bail!("config: {name} = {v} is over the limit of {max}");
            }
        }
        for (name, a, max) in [
            ("embed_dims", self.embed_dims, 8192),
            ("num_heads", self.num_heads, 256),
            ("mlp_ratios", self.mlp_ratios, 64),
            ("sr_ratios", self.sr_ratios, 64),
        ] {
            if let Some(v) = a.iter().find(|&&v| v > max) {
                bail!("config: {name} = {a:?} has {v}, over the limit of {max}");
            }
        }
        let params = self.min_param_count();
        if params > MAX_PARAMS {
            bail!(
                "config asks for at least {params} parameters, over the limit of {MAX_PARAMS} ({} GB of f32)",
                MAX_PARAMS * 4 / 1_000_000_000
            );
        }
        for (name, v) in [
            ("linear_init_std", self.linear_init_std),
            ("text_table_init_std", self.text_table_init_std),
            ("block_norm_eps", self.block_norm_eps),
            ("norm_eps", self.norm_eps),
            ("bert_layer_norm_eps", self.bert_layer_norm_eps),
        ] {
            if !(v.is_finite() && v > 0.0) {
                bail!("{name} must be a positive number, got {v}");
            }
        }
        // Widths a layer is built with: zero would make an empty layer the backends refuse.
        for (name, v) in [
            ("token_hidden_size", self.token_hidden_size),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("type_vocab_size", self.type_vocab_size),
            ("num_sup_classes", self.num_sup_classes),
            ("num_sub_classes", self.num_sub_classes),
            ("t2i_channel", self.t2i_channel),
            ("itc_dim", self.itc_dim),
        ] {
            if v == 0 {
                bail!("config: {name} must be at least 1, got 0");
            }
        }
        if let Some(i) = self.embed_dims.iter().position(|&d| d == 0) {
            bail!("config: embed_dims[{i}] must be at least 1, got 0");
        }
        Ok(())
    }

    /// A lower bound on the parameter count: the backbone (patch and text projections, position
    /// tables, blocks) and the text embeddings, heads left out. Checked before a model is built;
    /// real models have somewhat more (their heads).
    pub fn min_param_count(&self) -> u64 {
        let mut n: u64 = 0;
        let hidden = self.token_hidden_size as u64;
        n += (self.vocab_size as u64 + self.max_position_embeddings as u64 + self.type_vocab_size as u64 + 2) * hidden;
        let grid0 = (self.img_size / self.patch_size.max(1)) as u64;
        let t = self.num_text_tokens as u64;
        for i in 0..4 {
            let c = self.embed_dims[i] as u64;
            let (c_in, k, t_in) = if i == 0 {
                (3, self.patch_size as u64, hidden)
            } else {
                (self.embed_dims[i - 1] as u64, 2, self.embed_dims[i - 1] as u64)
            };
            n += c_in * c * k * k + 3 * c; // patch embedding + its LayerNorm
            n += t_in * c + 3 * c; // text projection + LayerNorm
            let g = grid0 >> i;
            n += g * g * c + t * c; // position tables
            let (sr, mlp) = (self.sr_ratios[i] as u64, self.mlp_ratios[i] as u64);
            let attn = 4 * c * c + 4 * c + if sr > 1 { c * c * sr * sr + 3 * c } else { 0 };
            let block = 4 * c + attn + 2 * mlp * c * c + mlp * c + c;
            n += self.depths[i] as u64 * block;
        }
        n
    }

    /// The stage-1 grid is H/patch, then each stage halves it: H and W must divide by patch*8.
    pub fn check_image_size(&self, h: usize, w: usize) -> Result<()> {
        let m = self.patch_size * 8;
        if h == 0 || w == 0 || !h.is_multiple_of(m) || !w.is_multiple_of(m) {
            bail!(
                "image size {h}x{w} does not divide into the four stage grids: height and width must be \
                 multiples of patch_size*8 = {m} (e.g. 224 or 256)"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_validate() {
        for p in PvltConfig::PRESETS {
            PvltConfig::preset(p).unwrap().validate().unwrap();
        }
    }

    #[test]
    fn rejects_non_divisible_heads() {
        let mut c = PvltConfig::tiny();
        c.num_heads[2] = 3;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("embed_dims[2] = 320 is not divisible by num_heads[2] = 3"), "{e}");
    }

    #[test]
    fn rejects_image_size_that_does_not_divide() {
        let e = PvltConfig::tiny().check_image_size(250, 256).unwrap_err().to_string();
        assert!(e.contains("250x256") && e.contains("multiples of patch_size*8 = 32"), "{e}");
        PvltConfig::tiny().check_image_size(224, 288).unwrap();
    }

    #[test]
    fn parses_fixture_config_with_nested_bert_config() {
        let v: Value = serde_json::json!({"config": {
            "patch_size": 4, "img_size_for_pos_embed": 224, "qkv_bias": true, "block_norm_eps": 1e-6,
            "loss_type": {"itm": 1, "mlm": 1, "t2i": 0, "cls": 1},
            "bert_config": {"vocab_size": 30522, "hidden_size": 64, "layer_norm_eps": 1e-12},
            "embed_dims": [16, 32, 40, 64], "num_heads": [1, 2, 2, 4], "mlp_ratios": [8, 8, 4, 4],
            "depths": [2, 2, 2, 2], "sr_ratios": [8, 4, 2, 1], "token_hidden_size": 64, "num_text_tokens": 32}});
        let c = PvltConfig::from_json(&v).unwrap();
        assert_eq!(c.embed_dims, [16, 32, 40, 64]);
        assert_eq!(c.token_hidden_size, 64);
        assert_eq!(c.num_text_tokens, 32);
        assert_eq!(c.heads, HeadSet { itm: true, mlm: true, t2i: false, cls: true, itc: false });
        // Our own serialised form round-trips.
        let back = PvltConfig::from_json(&serde_json::to_value(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    /// The init scales: the reference's by default (a fixture's config has neither key), read from
    /// the micro config, and a non-positive one is refused by name.
    #[test]
    fn init_scales() {
        let fixture = PvltConfig::from_json(&serde_json::json!({"embed_dims": [16, 32, 40, 64]})).unwrap();
        assert_eq!((fixture.linear_init_std, fixture.text_table_init_std), (0.02, 1.0));
        let micro = PvltConfig::micro();
        assert_eq!((micro.linear_init_std, micro.text_table_init_std), (0.1, 0.02));
        let e = format!("{:#}", PvltConfig::from_json(&serde_json::json!({"linear_init_std": 0.0})).unwrap_err());
        assert!(e.contains("linear_init_std must be a positive number, got 0"), "{e}");
    }

    #[test]
    fn config_errors_name_the_key() {
        let v = serde_json::json!({"embed_dims": [64, 128, 320]});
        let e = format!("{:#}", PvltConfig::from_json(&v).unwrap_err());
        assert!(e.contains("embed_dims") && e.contains("4 entries"), "{e}");
    }
}
