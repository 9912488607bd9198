//! Data-parallel training over processes, GPUs and machines through c10d, PyTorch's own
//! distributed engine, launched as PyTorch users launch: `torchrun --nproc-per-node N --no-python
//! mvlt pretrain ...` (docs/DISTRIBUTED.md).
//!
//! - [`Launch`]: the rank, world size and rendezvous address torchrun (or a batch script) gives
//!   each process through its environment.
//! - [`Collective`]: what training asks of the process group (sum a tensor over the ranks, swap
//!   small values); [`join`] builds one from a [`Launch`] on the c10d bridge of the LibTorch build.
//! - [`sum_gradients`]: a step's gradients summed over the ranks in buckets, as PyTorch's
//!   DistributedDataParallel does after backward.
//!
//! Semantics (DDP's): one step of W ranks, each taking `batch_size` samples per micro-batch,
//! computes the same update as one process with `accum_steps = W`: micro-batch `k` of a step goes
//! to rank `k mod W`, and every random draw depends on the global micro-batch index, never on W or
//! the rank. BatchNorm keeps per-rank batch statistics (no SyncBN, as the reference under DDP);
//! rank 0's running statistics are the ones saved, as DDP's `broadcast_buffers` makes them.

#[cfg(feature = "tch")]
mod c10d;
mod grads;
mod launch;

pub use grads::{all_reduce, sum_gradients};
pub use launch::Launch;

use anyhow::Result;
use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

/// The process group as training uses it. Collectives are called by every rank in the same order.
pub trait Collective: Send + Sync {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Sum a backend's float tensor primitive (handed over as `dyn Any`) over the ranks, in
    /// place. Fails for a backend the group cannot reach (the c10d bridge takes libtorch tensors).
    fn all_reduce_sum(&self, tensor: &mut dyn Any) -> Result<()>;
    /// Rank `root`'s tensor primitive into every rank's, in place.
    fn broadcast(&self, tensor: &mut dyn Any, root: usize) -> Result<()>;
    /// Every rank's `value` under `key` (a key is used once), in rank order: small host values
    /// (log sums, hashes, decisions) through the rendezvous store.
    fn exchange(&self, key: &str, value: &[u8]) -> Result<Vec<Vec<u8>>>;
}

/// The group of a launch.
pub type Group = Arc<dyn Collective>;

/// Join the group `launch` describes: rendezvous through its store, then a Gloo process group.
/// Every collective, the rendezvous included, fails after `timeout` instead of waiting for a rank
/// that is missing.
pub fn join(launch: &Launch, timeout: Duration) -> Result<Group> {
    #[cfg(feature = "tch")]
    {
        Ok(Arc::new(c10d::C10dGroup::join(launch, timeout)?))
    }
    #[cfg(not(feature = "tch"))]
    {
        let _ = timeout;
        anyhow::bail!(
            "{launch} asks for distributed training, which runs on PyTorch's c10d inside the LibTorch build: \
             rebuild with `--features tch` after `eval \"$(scripts/setup-libtorch.sh)\"` (docs/DISTRIBUTED.md)"
        )
    }
}

/// Rank 0's decision, as every rank sees it: rank 0 passes `Some(its result)` and the others
/// `None`; a failure on rank 0 becomes a failure on every rank, naming rank 0's reason.
pub fn from_rank0(group: &dyn Collective, key: &str, result: Option<&Result<String>>) -> Result<String> {
    let mine = match result {
        Some(Ok(v)) => format!("ok:{v}"),
        Some(Err(e)) => format!("err:{e:#}"),
        None => String::new(),
    };
    let all = group.exchange(key, mine.as_bytes())?;
    let zero = String::from_utf8_lossy(&all[0]).into_owned();
    match zero.split_once(':') {
        Some(("ok", v)) => Ok(v.to_string()),
        Some(("err", e)) if group.rank() == 0 => anyhow::bail!("{e}"),
        Some(("err", e)) => anyhow::bail!("rank 0 could not go on: {e}"),
        _ => anyhow::bail!("rank 0 sent no decision for '{key}'"),
    }
}

/// Refuse a group whose ranks were started differently: every rank's `digest` (of its settings,
/// say) is compared with rank 0's.
pub fn check_same(group: &dyn Collective, key: &str, what: &str, digest: &str) -> Result<()> {
    let all = group.exchange(key, digest.as_bytes())?;
    let differ: Vec<String> =
        all.iter().enumerate().filter(|(_, d)| *d != &all[0]).map(|(r, _)| r.to_string()).collect();
    if !differ.is_empty() {
        anyhow::bail!(
            "rank(s) {} of {} were started with other {what} than rank 0: start every rank with the same command, settings and files",
            differ.join(", "),
            group.world()
        );
    }
    Ok(())
}
