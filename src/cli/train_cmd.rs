//! `mvlt pretrain` and `mvlt finetune`.
use anyhow::Result;
use mvlt::device::DeviceSpec;
use mvlt::train::config::{DataSource, Precision, Task, TrainConfigBuilder};
use mvlt::train::trainer::summarize;
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
    /// The data: a dataset (JSONL catalogue, Fashion-Gen .h5, the authors' folder) or `synthetic`.
    #[arg(long)]
    data: Option<DataSource>,
    /// The vocabulary (bert-base-uncased vocab.txt); default: vocab.txt beside the data.
    #[arg(long)]
    vocab: Option<PathBuf>,
    /// Weights to start from (ours or the authors' .pth); fine-tuning needs them.
    #[arg(long)]
    init: Option<PathBuf>,
    /// cpu, cuda, cuda:N (or wgpu, a check of the GPU code path).
    #[arg(long)]
    device: Option<DeviceSpec>,
    /// f32, or bf16: mixed precision with f32 master weights (meant for GPUs).
    #[arg(long)]
    precision: Option<Precision>,
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
        (Some(r), _) => r.clone(),
        (None, true) if out.join("config.toml").exists() => out.join("config.toml").display().to_string(),
        (None, _) => task.cpu_recipe().to_string(),
    };
    // Flags set typed fields; `--set` (text, as the user wrote it) comes last and wins.
    let config = TrainConfigBuilder::recipe(&recipe)?
        .with(|c| {
            c.task = task;
            set_some(&mut c.data, a.data);
            c.vocab = a.vocab.or(c.vocab.take());
            c.init = a.init.or(c.init.take());
            set_some(&mut c.device, a.device);
            set_some(&mut c.precision, a.precision);
            set_some(&mut c.epochs, a.epochs);
            c.max_steps = a.max_steps.or(c.max_steps);
            set_some(&mut c.batch_size, a.batch_size);
            set_some(&mut c.seed, a.seed);
            c.with_cls |= a.with_cls;
            c.with_itc |= a.with_itc;
            c.train_mode |= a.train_mode;
        })
        .set(&a.set)?
        .build()?;
    let s = super::train(config, &out, a.resume)?;
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

/// `field = value` when a flag gave one.
fn set_some<T>(field: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *field = v;
    }
}
