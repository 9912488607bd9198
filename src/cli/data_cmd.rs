//! `mvlt tokenize`, `mvlt preprocess` and `mvlt data info`: what the model sees of a text and of an
//! image, and what a dataset holds.
use anyhow::{Context, Result};
use burn::tensor::TensorData;
use mvlt::data::dataset::{open_dataset, ClassMap};
use mvlt::data::image::{preprocess, Pixels};
use mvlt::data::text::TextProcessor;
use mvlt::model::weights::write_safetensors;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct TokenizeArgs {
    /// WordPiece vocabulary file (e.g. bert-base-uncased-vocab.txt).
    #[arg(long)]
    vocab: PathBuf,
    /// Text length T of the model input ([CLS] + up to T-2 pieces + [SEP] + [PAD]...).
    #[arg(long, default_value_t = 128, value_parser = super::parse_text_len)]
    max_len: usize,
    /// One JSON object per text: {"text", "tokens", "input_ids"}.
    #[arg(long)]
    json: bool,
    #[arg(required = true)]
    texts: Vec<String>,
}

pub fn tokenize(a: TokenizeArgs) -> Result<()> {
    let t = TextProcessor::from_vocab_file(&a.vocab)?;
    for text in &a.texts {
        let e = t.encode(text, a.max_len)?;
        if a.json {
            println!("{}", serde_json::json!({"text": text, "tokens": e.tokens, "input_ids": e.input_ids}));
        } else {
            println!("{text}");
            println!(
                "  pieces ({}{}): {}",
                e.tokens.len(),
                if e.truncated { ", truncated" } else { "" },
                e.tokens.join(" ")
            );
            println!("  input_ids: {:?}", e.input_ids);
        }
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct PreprocessArgs {
    /// Image file (PNG or JPEG).
    #[arg(long)]
    image: PathBuf,
    /// Output side in pixels (the authors use 256).
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Write what the model sees as a PNG.
    #[arg(long)]
    png: Option<PathBuf>,
    /// Write the model-input tensor `image` [3,S,S] float32 in [0,1] as safetensors.
    #[arg(long)]
    safetensors: Option<PathBuf>,
    /// Print {"image", "crop_box_ltrb", "size"} as JSON.
    #[arg(long)]
    json: bool,
}

pub fn preprocess_cmd(a: PreprocessArgs) -> Result<()> {
    let pixels = Pixels::open(&a.image)?;
    let out = preprocess(&pixels, a.size)?;
    let full = [0, 0, pixels.width, pixels.height];
    if out.crop_box.is_none() {
        eprintln!("note: {} has no black pixel after dithering; using the whole image", a.image.display());
    }
    let b = out.crop_box.unwrap_or(full);
    if let Some(p) = &a.png {
        let n = a.size * a.size;
        let hwc: Vec<u8> = (0..n).flat_map(|i| [out.chw_u8[i], out.chw_u8[n + i], out.chw_u8[2 * n + i]]).collect();
        image::RgbImage::from_raw(a.size as u32, a.size as u32, hwc)
            .context("image buffer")?
            .save(p)
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    if let Some(p) = &a.safetensors {
        let data = TensorData::new(mvlt::data::image::to_unit_floats(&out.chw_u8), [3, a.size, a.size]);
        write_safetensors(p, &[("image".to_string(), data)], Default::default())?;
    }
    if a.json {
        println!("{}", serde_json::json!({"image": a.image, "crop_box_ltrb": b, "size": [a.size, a.size]}));
    } else {
        println!(
            "{}: {}x{} -> crop box (l, t, r, b) = {:?} -> {}x{}",
            a.image.display(),
            pixels.width,
            pixels.height,
            b,
            a.size,
            a.size
        );
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct DataInfoArgs {
    /// Dataset: catalogue .jsonl (or its folder), Fashion-Gen .h5, or an authors'-layout folder.
    #[arg(long)]
    pub data: PathBuf,
    /// Show the sizes of a train/validation split by product with this validation fraction.
    #[arg(long, value_parser = super::parse_fraction)]
    pub val_fraction: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Rows to print.
    #[arg(long, default_value_t = 3)]
    pub head: usize,
}

pub fn info(a: DataInfoArgs) -> Result<()> {
    let ds = open_dataset(&a.data)?;
    let classes = ClassMap::from_records(ds.records());
    let products: std::collections::BTreeSet<_> = ds.records().iter().map(|r| &r.product_id).collect();
    println!("{}: {} images of {} products", ds.source(), ds.len(), products.len());
    println!("  {} main categories: {}", classes.main.len(), classes.main.join(", "));
    println!("  {} sub-categories: {}", classes.sub.len(), classes.sub.join(", "));
    if let Some(s) = ds.skips().summary() {
        println!("  {s}");
    }
    if let Some(f) = a.val_fraction {
        let (train, val) = mvlt::data::dataset::split_by_product(ds.records(), f, a.seed);
        println!("  split by product (seed {}): {} train / {} validation images", a.seed, train.len(), val.len());
    }
    for r in ds.records().iter().take(a.head) {
        println!("  {}", serde_json::to_string(r)?);
    }
    Ok(())
}
