//! `mvlt synth`: write the built-in synthetic catalogue.
use anyhow::Result;
use mvlt::data::dataset::{Dataset, FileDataset};
use mvlt::data::synth::write_catalog;
use mvlt::progress::progress_bar;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct SynthArgs {
    /// Output folder (catalog.jsonl, images/, vocab.txt).
    #[arg(long)]
    out: PathBuf,
    /// Number of images (products have 2-3 views each).
    #[arg(long, default_value_t = 2000)]
    n: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Image side in pixels.
    #[arg(long, default_value_t = 256)]
    size: u32,
    /// Also write a 4x4 contact sheet of the first 16 images.
    #[arg(long)]
    contact_sheet: Option<PathBuf>,
}

pub fn run(a: SynthArgs) -> Result<()> {
    let pb = progress_bar(a.n as u64, "synth");
    let t0 = Instant::now();
    let written = write_catalog(&a.out, a.n, a.seed, a.size, |k| pb.inc(k as u64))?;
    pb.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    let cat = FileDataset::open_jsonl(&a.out.join("catalog.jsonl"))?;
    let products: std::collections::BTreeSet<_> = cat.records().iter().map(|r| r.product_id.clone()).collect();
    println!(
        "wrote {written} images of {} products ({}x{} px) to {} in {secs:.1} s ({:.0} images/s); vocabulary: {}",
        products.len(),
        a.size,
        a.size,
        a.out.display(),
        written as f64 / secs,
        a.out.join("vocab.txt").display()
    );
    if let Some(sheet) = &a.contact_sheet {
        // One view of each of the first 16 products.
        let firsts: Vec<usize> = (0..cat.len())
            .filter(|&i| i == 0 || cat.records()[i].product_id != cat.records()[i - 1].product_id)
            .take(16)
            .collect();
        let k = firsts.len();
        super::infer_cmd::contact_sheet(&cat, &firsts, 4, 128, sheet)?;
        println!("contact sheet of {k} images: {}", sheet.display());
    }
    Ok(())
}
