use super::bench_compare::{random_batch, StepTimes, TrainBench};
use crate::cli::run_on;
use anyhow::Result;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Int, Tensor};
use mvlt::device::{BackendTask, DeviceSpec};
use mvlt::model::{HeadSet, Mode, Pvlt, PvltConfig};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::time::Instant;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Preset or config file.
    #[arg(long, default_value = "tiny")]
    config: String,
    #[arg(long, default_value_t = 256)]
    image_size: usize,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Heads to run: any of itm, mlm, t2i, cls (comma separated), or all / none.
    #[arg(long, default_value = "itm")]
    heads: String,
    #[arg(long, default_value_t = 5)]
    iters: usize,
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// Time pre-training steps instead of the forward pass: MLM (at the masked positions), ITM and
    /// reconstruction heads, forward and backward, then AdamW, with the time of each part
    /// (`--heads` does not apply).
    #[arg(long)]
    train_step: bool,
    #[command(flatten)]
    compare: super::bench_compare::CompareArgs,
}

fn parse_heads(s: &str) -> Result<HeadSet> {
    match s {
        "all" => return Ok(HeadSet::ALL),
        "none" | "" => return Ok(HeadSet::NONE),
        _ => {}
    }
    let mut h = HeadSet::NONE;
    for part in s.split(',') {
        match part.trim() {
            "itm" => h.itm = true,
            "mlm" => h.mlm = true,
            "t2i" => h.t2i = true,
            "cls" => h.cls = true,
            other => anyhow::bail!("unknown head '{other}' (itm, mlm, t2i, cls, all, none)"),
        }
    }
    Ok(h)
}

struct Bench<'a>(&'a BenchArgs, PvltConfig, HeadSet);

impl BackendTask for Bench<'_> {
    type Output = ();
    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        let (a, cfg, heads) = (self.0, self.1, self.2);
        B::seed(&device, 0);
        if a.train_step {
            return train_steps::<B>(a, &cfg, device);
        }
        let model = Pvlt::<B>::new(&cfg, &device);
        let images =
            Tensor::<B, 4>::random([a.batch, 3, a.image_size, a.image_size], Distribution::Uniform(0.0, 1.0), &device);
        let ids = Tensor::<B, 2, Int>::random(
            [a.batch, cfg.num_text_tokens],
            Distribution::Uniform(1000.0, 30000.0),
            &device,
        );
        let mut times = vec![];
        for i in 0..a.warmup + a.iters {
            let t0 = Instant::now();
            let out = model.forward(images.clone(), ids.clone(), heads, Mode::Eval);
            // Read a value back so asynchronous backends finish the work inside the timing.
            let _ = out.text_tokens.clone().sum().into_scalar();
            if let Some(l) = out.itm_logits {
                let _ = l.sum().into_scalar();
            }
            if let Some(l) = out.mlm_logits {
                let _ = l.sum().into_scalar();
            }
            if let Some(l) = out.t2i_logits {
                let _ = l.sum().into_scalar();
            }
            if i >= a.warmup {
                times.push(t0.elapsed().as_secs_f64());
            }
        }
        let (median, min) = median_min(&times);
        println!(
            "forward {} {}x{} batch {} heads [{}] on {}: median {:.1} ms, min {:.1} ms over {} runs ({:.1} images/s)",
            cfg.variant_name().map(|v| format!("pvlt_{v}")).unwrap_or_else(|| "custom".into()),
            a.image_size,
            a.image_size,
            a.batch,
            heads.names().join(","),
            a.device,
            median * 1e3,
            min * 1e3,
            times.len(),
            a.batch as f64 / median
        );
        Ok(())
    }
}

/// The median (the upper one of an even count) and the minimum of timings; `times` is not empty.
fn median_min(times: &[f64]) -> (f64, f64) {
    let mut v = times.to_vec();
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0])
}

/// `--train-step`: median and min of each part of the step over `--iters` steps.
fn train_steps<B: Backend>(a: &BenchArgs, cfg: &PvltConfig, device: B::Device) -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let batch = random_batch(a.batch, a.image_size, cfg.num_text_tokens, cfg.vocab_size, &mut rng);
    let mut bench = TrainBench::<B>::new(cfg, &device);
    let mut times = vec![];
    for i in 0..a.warmup + a.iters {
        let t = bench.step(&batch, i)?;
        if i >= a.warmup {
            times.push(t);
        }
    }
    let stat = |f: &dyn Fn(&StepTimes) -> f64| median_min(&times.iter().map(f).collect::<Vec<_>>());
    let (total, total_min) = stat(&|t| t.total());
    let (fb, fb_min) = stat(&|t| t.forward_backward);
    let (opt, opt_min) = stat(&|t| t.optimiser);
    println!(
        "pre-training step {} {}x{} batch {} on {}: median {:.1} ms (min {:.1}) over {} steps ({:.2} samples/s): \
         forward + backward {:.1} ms (min {:.1}), AdamW {:.1} ms (min {:.1})",
        cfg.variant_name().map(|v| format!("pvlt_{v}")).unwrap_or_else(|| "custom".into()),
        a.image_size,
        a.image_size,
        a.batch,
        a.device,
        total * 1e3,
        total_min * 1e3,
        times.len(),
        a.batch as f64 / total,
        fb * 1e3,
        fb_min * 1e3,
        opt * 1e3,
        opt_min * 1e3
    );
    Ok(())
}

pub fn run(a: BenchArgs) -> Result<()> {
    if a.compare.compare_pytorch {
        return super::bench_compare::run(&a.compare, a.device);
    }
    anyhow::ensure!(a.iters >= 1, "--iters must be at least 1 (got 0): the median needs a timed run");
    let cfg = PvltConfig::resolve(&a.config)?;
    cfg.check_image_size(a.image_size, a.image_size)?;
    let heads = parse_heads(&a.heads)?;
    let mut cfg = cfg;
    cfg.heads = heads;
    run_on(a.device, Bench(&a, cfg, heads))
}
