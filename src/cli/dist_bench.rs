//! `mvlt bench-all-reduce`: the all-reduce bandwidth of the c10d bridge, run as the ranks of a
//! launch (`torchrun --nproc-per-node 2 --no-python mvlt bench-all-reduce`).
//! `scripts/bench-all-reduce.sh` runs it beside the same all-reduce from PyTorch's own
//! `torch.distributed` and prints the ratio (docs/DISTRIBUTED.md).

use anyhow::{anyhow, bail, Result};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use mvlt::device::{BackendKind, BackendTask, DeviceSpec};
use mvlt::distributed::{all_reduce, Group, Launch};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct AllReduceBenchArgs {
    /// Size of the summed tensor in MiB of f32.
    #[arg(long, default_value_t = 64)]
    mb: usize,
    #[arg(long, default_value_t = 10)]
    iters: usize,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// `cpu` (Gloo), or `cuda` (GPU LOCAL_RANK; Gloo stages it through host memory).
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// Seconds a rank waits for the others.
    #[arg(long, default_value_t = 120.0)]
    timeout_s: f64,
}

pub fn run(a: AllReduceBenchArgs) -> Result<()> {
    let Some(launch) = Launch::from_env()? else {
        bail!("bench-all-reduce runs as the ranks of a launch: torchrun --nproc-per-node 2 --no-python mvlt bench-all-reduce")
    };
    if !(1..=4096).contains(&a.mb) || !(1..=1000).contains(&a.iters) {
        bail!("--mb must be 1-4096 and --iters 1-1000");
    }
    let group = mvlt::distributed::join(&launch, Duration::from_secs_f64(a.timeout_s))?;
    let device = match a.device {
        DeviceSpec::Cuda(_) => DeviceSpec::Cuda(launch.local_rank),
        d => d,
    };
    mvlt::device::run_on_backend(device, Some(BackendKind::Tch), Bench { a, group })
}

struct Bench {
    a: AllReduceBenchArgs,
    group: Group,
}

impl BackendTask for Bench {
    type Output = ();
    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        let (a, g) = (&self.a, self.group.as_ref());
        let n = a.mb * (1 << 20) / 4;
        let (rank, world) = (g.rank(), g.world());
        let start = Tensor::<B, 1>::from_data(TensorData::new(vec![rank as f32 + 1.0; n], [n]), &device);
        // Correctness first: every element is 1 + 2 + ... + W.
        let summed = all_reduce(g, start.clone())?;
        let expected = (world * (world + 1) / 2) as f32;
        let got: Vec<f32> = summed.clone().slice(0..1).into_data().to_vec().map_err(|e| anyhow!("{e:?}"))?;
        let last: Vec<f32> = summed.slice(n - 1..n).into_data().to_vec().map_err(|e| anyhow!("{e:?}"))?;
        if got[0] != expected || last[0] != expected {
            bail!("the all-reduce summed to {} / {}, not {expected}", got[0], last[0]);
        }
        let mut times = vec![];
        for i in 0..a.warmup + a.iters {
            let t = start.clone().mul_scalar(1.0); // a fresh buffer each time
            let _ = B::sync(&device);
            let t0 = Instant::now();
            let r = all_reduce(g, t)?;
            let _ = B::sync(&device);
            if i >= a.warmup {
                times.push(t0.elapsed().as_secs_f64());
            }
            drop(r);
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        let bytes = (n * 4) as f64;
        // nccl-tests' convention: algorithm bandwidth = size / time; bus bandwidth scales it by
        // 2(W-1)/W, the share of the data each link carries in a ring all-reduce.
        let algbw = bytes / median / 1e9;
        let busbw = algbw * 2.0 * (world as f64 - 1.0) / world as f64;
        if rank == 0 {
            println!(
                "{}",
                serde_json::json!({
                    "engine": "mvlt c10d bridge (Gloo)",
                    "ranks": world,
                    "mib": a.mb,
                    "iters": a.iters,
                    "median_s": median,
                    "min_s": times[0],
                    "algbw_gb_s": algbw,
                    "busbw_gb_s": busbw,
                })
            );
        }
        Ok(())
    }
}
