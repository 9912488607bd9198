//! The [`Collective`] of the LibTorch build: c10d's TCPStore and Gloo process group, through the
//! bridge in the vendored burn-tch (`vendor/burn-tch/src/native/c10d.rs`).

use super::{Collective, Launch};
use anyhow::{anyhow, bail, Result};
use burn::backend::libtorch::native::c10d::{Bind, ProcessGroup, Store, StoreRole};
use burn::backend::libtorch::TchTensor;
use std::any::Any;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub struct C10dGroup {
    store: Store,
    group: ProcessGroup,
    launch: Launch,
    timeout: Duration,
    /// Collectives called so far; each rank records the latest it reached in the store, so that a
    /// failed collective can name the ranks that never reached it.
    calls: AtomicU64,
}

impl C10dGroup {
    pub fn join(launch: &Launch, timeout: Duration) -> Result<Self> {
        let l = launch;
        let addr = format!("{}:{}", l.master_addr, l.master_port);
        let (role, prefix) = if l.agent_store {
            // torchrun's agent hosts the store and keeps it across restarts: each attempt's keys
            // under their own prefix (as PyTorch's env:// rendezvous does).
            (StoreRole::Client, format!("/worker/attempt_{}", l.restart))
        } else if l.rank == 0 {
            (StoreRole::Server { listen_fd: listen(&l.master_addr, l.master_port)? }, String::new())
        } else {
            (StoreRole::Client, String::new())
        };
        let store = Store::new(&l.master_addr, l.master_port, role, l.world, timeout, &prefix).map_err(|e| {
            anyhow!(
                "rank {}: no rendezvous with the store at {addr} within {:.0} s: {e}{}",
                l.rank,
                timeout.as_secs_f64(),
                if l.rank == 0 || l.agent_store {
                    ""
                } else {
                    " (rank 0 hosts it: did it start, with the same MASTER_ADDR and MASTER_PORT?)"
                }
            )
        })?;
        let bind = if l.loopback() {
            Bind::Hostname("127.0.0.1".into())
        } else if let Ok(iface) = std::env::var("GLOO_SOCKET_IFNAME") {
            Bind::Interface(iface)
        } else {
            Bind::Default
        };
        let group = ProcessGroup::gloo(&store, l.rank, l.world, &bind, timeout).map_err(|e| {
            anyhow!(
                "rank {}: the Gloo process group of {} ranks did not form within {:.0} s: {e}",
                l.rank,
                l.world,
                timeout.as_secs_f64()
            )
        })?;
        tracing::info!("{l}: joined the group (Gloo, timeout {:.0} s)", timeout.as_secs_f64());
        Ok(C10dGroup { store, group, launch: l.clone(), timeout, calls: AtomicU64::new(0) })
    }

    /// Why collective `call` failed on this rank, naming the ranks that never reached it.
    fn failure(&self, what: &str, call: u64, e: String) -> anyhow::Error {
        let mut behind = vec![];
        for r in (0..self.launch.world).filter(|&r| r != self.launch.rank) {
            let key = format!("mvlt/reached/{r}");
            let reached = match self.store.check(&key) {
                Ok(true) => self.store.get(&key).ok().and_then(|v| v.try_into().ok()).map(u64::from_le_bytes),
                Ok(false) => Some(0),
                Err(_) => None,
            };
            match reached {
                Some(n) if n < call => behind.push(format!("rank {r} (it stopped at collective {n})")),
                Some(_) => {}
                None => {
                    behind.push("the store is unreachable (its host, rank 0 or torchrun, stopped)".into());
                    break;
                }
            }
        }
        let who = if behind.is_empty() {
            "a rank stopped during it, or the network failed".to_string()
        } else {
            format!("missing: {}", behind.join(", "))
        };
        anyhow!(
            "rank {} of {}: {what} (collective {call}) failed within the {:.0} s timeout; {who}: {e}",
            self.launch.rank,
            self.launch.world,
            self.timeout.as_secs_f64()
        )
    }

    fn collective(
        &self,
        what: &str,
        tensor: &mut dyn Any,
        f: impl Fn(&ProcessGroup, &mut tch::Tensor) -> Result<(), String>,
    ) -> Result<()> {
        let Some(t) = tensor.downcast_mut::<TchTensor>() else {
            bail!("distributed training runs on the LibTorch backend (tch); this run's tensors are another backend's")
        };
        let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let key = format!("mvlt/reached/{}", self.launch.rank);
        self.store.set(&key, &call.to_le_bytes()).map_err(|e| self.failure(what, call, e))?;
        f(&self.group, &mut t.tensor).map_err(|e| self.failure(what, call, e))
    }
}

/// A socket listening on `addr:port` for the store this rank hosts: bound to that address alone
/// (127.0.0.1 listens on this machine only), and a port in use fails here, naming it.
fn listen(addr: &str, port: u16) -> Result<i32> {
    use std::os::fd::IntoRawFd;
    let listener = std::net::TcpListener::bind((addr, port)).map_err(|e| {
        anyhow!("rank 0 cannot listen on {addr}:{port} for the rendezvous store: {e} (another run on that port? choose another MASTER_PORT)")
    })?;
    Ok(listener.into_raw_fd())
}

impl Collective for C10dGroup {
    fn rank(&self) -> usize {
        self.launch.rank
    }

    fn world(&self) -> usize {
        self.launch.world
    }

    fn all_reduce_sum(&self, tensor: &mut dyn Any) -> Result<()> {
        self.collective("all-reduce", tensor, |g, t| g.all_reduce_sum(t))
    }

    fn broadcast(&self, tensor: &mut dyn Any, root: usize) -> Result<()> {
        self.collective("broadcast", tensor, |g, t| g.broadcast(t, root))
    }

    fn exchange(&self, key: &str, value: &[u8]) -> Result<Vec<Vec<u8>>> {
        let (rank, world) = (self.launch.rank, self.launch.world);
        self.store
            .set(&format!("mvlt/x/{key}/{rank}"), value)
            .map_err(|e| anyhow!("rank {rank}: cannot write '{key}' to the rendezvous store: {e}"))?;
        (0..world)
            .map(|r| {
                self.store.get(&format!("mvlt/x/{key}/{r}")).map_err(|e| {
                    anyhow!(
                        "rank {rank}: rank {r} did not send '{key}' within {:.0} s (stopped, or started with other settings?): {e}",
                        self.timeout.as_secs_f64()
                    )
                })
            })
            .collect()
    }
}
