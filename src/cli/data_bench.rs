//! `mvlt data bench`: how fast batches are made, against the reference's PIL pipeline.
use anyhow::{bail, Context, Result};
use mvlt::data::dataset::vocab_beside_data;
use mvlt::data::dataset::{open_dataset, ClassMap, Dataset};
use mvlt::data::image::preprocess_floats;
use mvlt::data::loader::{Loader, LoaderConfig};
use mvlt::data::text::TextProcessor;
use mvlt::progress::progress_bar;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

#[derive(clap::Args)]
pub struct DataBenchArgs {
    /// Dataset: catalogue .jsonl (or its folder), Fashion-Gen .h5, or an authors'-layout folder.
    #[arg(long)]
    pub data: PathBuf,
    /// Vocabulary (default: vocab.txt beside the catalogue, as `mvlt synth` writes).
    #[arg(long)]
    pub vocab: Option<PathBuf>,
    #[arg(long, default_value_t = 256)]
    pub size: usize,
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Images to process.
    #[arg(long, default_value_t = 512)]
    pub n: usize,
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Also time the reference PIL pipeline (scripts/reference_pipeline.py) with this Python, one
    /// process, on the same images, and print the per-core ratio.
    #[arg(long)]
    pub reference_python: Option<String>,
}

pub fn run(a: DataBenchArgs) -> Result<()> {
    let ds: Arc<dyn Dataset> = Arc::from(open_dataset(&a.data)?);
    if let Some(s) = ds.skips().summary() {
        eprintln!("{s}");
    }
    let vocab = a
        .vocab
        .clone()
        .or_else(|| vocab_beside_data(&a.data))
        .context("no --vocab given and no vocab.txt beside the data")?;
    let text = Arc::new(TextProcessor::from_vocab_file(&vocab)?);
    let classes = Arc::new(ClassMap::from_records(ds.records()));
    let n = a.n.min(ds.len());
    let rows: Vec<usize> = (0..n).collect();

    // 1. Our image pipeline alone, one thread: decode, dither, crop, resize, to floats.
    let t0 = Instant::now();
    for &i in &rows {
        let p = ds.pixels(i)?;
        std::hint::black_box(preprocess_floats(&p, a.size)?);
    }
    let ours_per_core = n as f64 / t0.elapsed().as_secs_f64();

    // 2. Whole batches (images + masked images + MLM/ITM text) with the worker pool.
    let cfg = LoaderConfig {
        batch_size: a.batch_size,
        image_size: a.size,
        max_len: 128,
        workers: a.workers,
        ..Default::default()
    };
    let loader = Arc::new(Loader::new(ds.clone(), text, classes, rows.clone(), cfg)?);
    let pb = progress_bar(n as u64, "batches");
    let t0 = Instant::now();
    let mut seen = 0;
    for b in loader.epoch(0, 0) {
        seen += b.len();
        pb.inc(b.len() as u64);
    }
    pb.finish_and_clear();
    let loader_rate = seen as f64 / t0.elapsed().as_secs_f64();
    println!("data: {} ({} images at {}x{})", ds.source(), n, a.size, a.size);
    println!("  image pipeline, 1 thread:                  {ours_per_core:8.1} images/s");
    println!("  full pre-training batches, {} workers:      {loader_rate:8.1} images/s", a.workers);
    if let Some(s) = loader.skips.lock().unwrap().summary() {
        println!("  {s}");
    }

    // 3. The reference pipeline in PIL, one process.
    if let Some(py) = &a.reference_python {
        let paths: Vec<String> = rows
            .iter()
            .map(|&i| ds.image_path(i).map(|p| p.display().to_string()))
            .collect::<Option<_>>()
            .context("the PIL comparison needs a dataset with one file per image (catalogue or authors' layout)")?;
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/reference_pipeline.py");
        let mut child = std::process::Command::new(py)
            .arg(script)
            .arg(a.size.to_string())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot run {py}"))?;
        child.stdin.take().unwrap().write_all(paths.join("\n").as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("{py} {script} failed (needs Pillow and numpy)");
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("reference script output")?;
        let rate = v["images"].as_f64().unwrap_or(0.0) / v["seconds"].as_f64().unwrap_or(f64::NAN);
        println!("  reference PIL pipeline, 1 process:         {rate:8.1} images/s");
        println!("  per-core ratio (ours / reference):         {:8.2}x", ours_per_core / rate);
    }
    Ok(())
}
