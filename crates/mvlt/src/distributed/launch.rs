//! Where a process stands in a launch, from the environment torchrun gives each process (the same
//! variables PyTorch's `init_process_group("env://")` reads).

use anyhow::{bail, Result};
use std::fmt;

/// This process's place in a distributed launch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    /// Global rank, `0..world`.
    pub rank: usize,
    pub world: usize,
    /// Rank within this machine: picks the GPU (`cuda:LOCAL_RANK`).
    pub local_rank: usize,
    pub local_world: usize,
    /// The rendezvous store's address.
    pub master_addr: String,
    pub master_port: u16,
    /// How many times torchrun has restarted the group (`--max-restarts`): a restarted group
    /// resumes from the run's last checkpoint.
    pub restart: usize,
    /// torchrun's agent hosts the store (every rank is its client, keys under this attempt's
    /// prefix); otherwise rank 0 hosts it.
    pub agent_store: bool,
}

impl fmt::Display for Launch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rank {} of {} (store {}:{})", self.rank, self.world, self.master_addr, self.master_port)
    }
}

impl Launch {
    /// From this process's environment; `None` when it was not launched as one of several
    /// ranks (no `WORLD_SIZE`, or `WORLD_SIZE=1` without `RANK`).
    pub fn from_env() -> Result<Option<Launch>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// From variables `get` looks up (tests hand in their own).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<Launch>> {
        let world = match get("WORLD_SIZE") {
            None => {
                if get("RANK").is_some() {
                    bail!(
                        "RANK is set but WORLD_SIZE is not: set both (torchrun sets them), or neither for one process"
                    );
                }
                return Ok(None);
            }
            Some(w) => number("WORLD_SIZE", &w)?,
        };
        if world == 0 {
            bail!("WORLD_SIZE is 0: it counts the processes of the run, at least 1");
        }
        let rank = match get("RANK") {
            Some(r) => number("RANK", &r)?,
            None if world == 1 => return Ok(None),
            None => bail!("WORLD_SIZE is {world} but RANK is not set: each process needs its rank (torchrun sets it)"),
        };
        if rank >= world {
            bail!("RANK {rank} is not below WORLD_SIZE {world}: ranks run from 0 to {}", world - 1);
        }
        let local_rank = get("LOCAL_RANK").map(|v| number("LOCAL_RANK", &v)).transpose()?.unwrap_or(rank);
        let local_world = get("LOCAL_WORLD_SIZE").map(|v| number("LOCAL_WORLD_SIZE", &v)).transpose()?.unwrap_or(world);
        if local_rank >= local_world {
            bail!("LOCAL_RANK {local_rank} is not below LOCAL_WORLD_SIZE {local_world}");
        }
        let Some(master_addr) = get("MASTER_ADDR").filter(|a| !a.trim().is_empty()) else {
            bail!("MASTER_ADDR is not set: the address of the rendezvous store (torchrun sets it; 127.0.0.1 on one machine)")
        };
        let port =
            get("MASTER_PORT").ok_or_else(|| anyhow::anyhow!("MASTER_PORT is not set: the rendezvous store's port"))?;
        let master_port = match port.trim().parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => bail!("MASTER_PORT '{}' is not a port number (1-65535)", crate::files::printable(&port)),
        };
        let restart = get("TORCHELASTIC_RESTART_COUNT")
            .map(|v| number("TORCHELASTIC_RESTART_COUNT", &v))
            .transpose()?
            .unwrap_or(0);
        let agent_store = get("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v.eq_ignore_ascii_case("true"));
        Ok(Some(Launch {
            rank,
            world,
            local_rank,
            local_world,
            master_addr: master_addr.trim().to_string(),
            master_port,
            restart,
            agent_store,
        }))
    }

    /// Whether the store's address is this machine's loopback (every rank on one machine): the
    /// group's sockets then bind 127.0.0.1 only.
    pub fn loopback(&self) -> bool {
        let a = self.master_addr.as_str();
        a == "localhost" || a.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }
}

fn number(name: &str, v: &str) -> Result<usize> {
    match v.trim().parse::<usize>() {
        Ok(n) if n < 1 << 20 => Ok(n),
        _ => bail!("{name} '{}' is not a number of processes (0 to 1048575)", crate::files::printable(v)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(vars: &[(&str, &str)]) -> Result<Option<Launch>> {
        Launch::from_vars(|k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string()))
    }

    const TORCHRUN: [(&str, &str); 8] = [
        ("WORLD_SIZE", "2"),
        ("RANK", "1"),
        ("LOCAL_RANK", "1"),
        ("LOCAL_WORLD_SIZE", "2"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "29500"),
        ("TORCHELASTIC_RESTART_COUNT", "1"),
        ("TORCHELASTIC_USE_AGENT_STORE", "True"),
    ];

    #[test]
    fn reads_what_torchrun_sets() {
        let l = launch(&TORCHRUN).unwrap().unwrap();
        assert_eq!((l.rank, l.world, l.local_rank, l.local_world, l.restart), (1, 2, 1, 2, 1));
        assert_eq!((l.master_addr.as_str(), l.master_port, l.agent_store), ("127.0.0.1", 29500, true));
        assert!(l.loopback());
    }

    #[test]
    fn one_process_is_no_launch() {
        assert_eq!(launch(&[]).unwrap(), None);
        assert_eq!(launch(&[("WORLD_SIZE", "1")]).unwrap(), None);
    }

    #[test]
    fn bad_environments_are_named() {
        let without = |name: &str| TORCHRUN.iter().copied().filter(|(n, _)| *n != name).collect::<Vec<_>>();
        let with = |name: &'static str, v: &'static str| {
            let mut vars = without(name);
            vars.push((name, v));
            vars
        };
        let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
            (without("RANK"), "RANK is not set"),
            (vec![("RANK", "0")], "WORLD_SIZE is not"),
            (with("RANK", "2"), "RANK 2 is not below WORLD_SIZE 2"),
            (with("WORLD_SIZE", "two"), "WORLD_SIZE 'two' is not a number"),
            (with("WORLD_SIZE", "0"), "WORLD_SIZE is 0"),
            (without("MASTER_ADDR"), "MASTER_ADDR is not set"),
            (without("MASTER_PORT"), "MASTER_PORT is not set"),
            (with("MASTER_PORT", "70000"), "MASTER_PORT '70000' is not a port"),
            (with("LOCAL_RANK", "5"), "LOCAL_RANK 5 is not below"),
        ];
        for (vars, expected) in cases {
            let e = launch(&vars).unwrap_err().to_string();
            assert!(e.contains(expected), "{vars:?}: {e}");
        }
    }
}
