//! `mvlt demo`.
use crate::demo::{self, DemoOptions};
use anyhow::Result;
use mvlt::device::DeviceSpec;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Folder of the run: catalog/, pretrain/, finetune/, REPORT.md, report.json and the pictures.
    /// Running the demo again continues a stopped run there.
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
    /// A run of a few minutes (a smaller catalogue, fewer steps and queries), for tests.
    #[arg(long)]
    quick: bool,
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Pre-training steps, instead of what the pace measured after a warm-up fits into the demo's
    /// minutes: `plan.json` and REPORT.md give a run's, so that any run can be repeated exactly.
    #[arg(long)]
    steps: Option<usize>,
    /// Your own catalogue instead of the synthetic one: a folder with catalog.jsonl and its
    /// images (or the .jsonl file). The demo chooses its settings from its size.
    #[arg(long)]
    data: Option<PathBuf>,
    /// The vocabulary of the catalogue's captions (e.g. bert-base-uncased-vocab.txt); default:
    /// vocab.txt beside the catalogue.
    #[arg(long, requires = "data")]
    vocab: Option<PathBuf>,
    /// With --data: a sample of this many of its products (the same ones whatever --seed),
    /// written to OUT/catalog: a team-sized catalogue cut from a larger one.
    #[arg(long, requires = "data")]
    products: Option<usize>,
}

pub fn run(a: DemoArgs) -> Result<()> {
    let o = demo::run(&DemoOptions {
        out: a.out.clone(),
        quick: a.quick,
        device: a.device,
        seed: a.seed,
        steps: a.steps,
        data: a.data.clone(),
        vocab: a.vocab.clone(),
        products: a.products,
    })?;
    println!("\n{}", demo::report::summary(&o));
    println!("report: {} (figures also in {})", a.out.join("REPORT.md").display(), a.out.join("report.json").display());
    println!("serve the result: {}", demo::report::serve_command(&o));
    Ok(())
}
