//! `mvlt pretrain` and `mvlt finetune`.
use crate::cli::run_on_devices;
use anyhow::Result;
use mvlt::train::config::{recipe_text, Task, TrainConfig};
use mvlt::train::trainer::{summarize, TrainRun};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct TrainArgs {
    /// Recipe: a built-in one (pretrain, finetune: the reference's; cpu-pretrain, cpu-finetune:
    /// minutes on a CPU) or a TOML file. Default: cpu-pretrain / cpu-finetune, or the run's own
    /// config.toml with --resume.
    #[arg(long)]
    recipe: Option<String>,
    /// Run folder: checkpoints/, metrics.jsonl, loss.png, val.png, config.toml, final/.
    /// Default: runs/pretrain or runs/finetune.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue from the newest checkpoint in --out.
    #[arg(long)]
    resume: bool,
    /// Override any recipe setting: --set epochs=3 --set clip_grad=1.0 (repeatable; `key=` unsets).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Shorthands for common settings (same as --set).
    #[arg(long)]
    data: Option<String>,
    #[arg(long)]
    vocab: Option<PathBuf>,
    #[arg(long)]
    init: Option<PathBuf>,
    #[arg(long)]
    device: Option<String>,
    /// Data-parallel training on these GPUs, e.g. 0,1 (with --device cuda).
    #[arg(long, value_delimiter = ',')]
    devices: Vec<usize>,
    /// f32, or bf16: mixed precision with f32 master weights (meant for GPUs).
    #[arg(long)]
    precision: Option<String>,
    #[arg(long)]
    epochs: Option<usize>,
    #[arg(long)]
    max_steps: Option<usize>,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    seed: Option<u64>,
    /// Pre-training: also train the recognition heads.
    #[arg(long)]
    with_cls: bool,
    /// Pre-training: also train image-text contrastive embeddings (ITC; not in the authors' recipe).
    #[arg(long)]
    with_itc: bool,
    /// Fine-tuning: train mode (dropout, BatchNorm batch statistics) instead of the reference's eval mode.
    #[arg(long)]
    train_mode: bool,
}

pub fn run(task: Task, a: TrainArgs) -> Result<()> {
    let out = a.out.clone().unwrap_or_else(|| PathBuf::from("runs").join(task.name()));
    let recipe = match (&a.recipe, a.resume) {
        (Some(r), _) => recipe_text(r)?,
        (None, true) if out.join("config.toml").exists() => {
            recipe_text(&out.join("config.toml").display().to_string())?
        }
        (None, _) => recipe_text(task.cpu_recipe())?,
    };
    let q = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
    let mut over = vec![format!("task={}", q(task.name()))];
    let path = |p: &PathBuf| q(&p.display().to_string());
    over.extend(a.data.as_ref().map(|v| format!("data={}", q(v))));
    over.extend(a.vocab.as_ref().map(|v| format!("vocab={}", path(v))));
    over.extend(a.init.as_ref().map(|v| format!("init={}", path(v))));
    over.extend(a.device.as_ref().map(|v| format!("device={}", q(v))));
    if !a.devices.is_empty() {
        over.push(format!("devices={:?}", a.devices));
    }
    over.extend(a.precision.as_ref().map(|v| format!("precision={}", q(v))));
    over.extend(a.epochs.map(|v| format!("epochs={v}")));
    over.extend(a.max_steps.map(|v| format!("max_steps={v}")));
    over.extend(a.batch_size.map(|v| format!("batch_size={v}")));
    over.extend(a.seed.map(|v| format!("seed={v}")));
    if a.with_cls {
        over.push("with_cls=true".into());
    }
    if a.with_itc {
        over.push("with_itc=true".into());
    }
    if a.train_mode {
        over.push("train_mode=true".into());
    }
    over.extend(a.set.iter().cloned());
    let config = TrainConfig::resolve(&recipe, &over)?;
    let (device, indices) = config.device_indices()?;
    let s = run_on_devices(
        device,
        &indices,
        TrainRun { config, dir: out.clone(), resume: a.resume, control: super::run_control() },
    )?;
    if s.interrupted {
        println!(
            "interrupted after step {}; continue with --resume (checkpoint {})",
            s.steps,
            s.last_checkpoint.map(|p| p.display().to_string()).unwrap_or_default()
        );
        std::process::exit(130);
    }
    println!("done: {} steps, {:.1} samples/s", s.steps, s.samples_per_s);
    if let Some(v) = &s.last_val {
        println!("last validation: {}", summarize(v));
    }
    if let Some(w) = &s.final_weights {
        println!("weights: {} (with classes.json and vocab.txt beside it)", w.display());
    }
    println!("metrics: {0}/metrics.jsonl; plots: {0}/loss.png, {0}/val.png", out.display());
    Ok(())
}
