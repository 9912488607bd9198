//! Fairness between clients: how many connections, and how many requests in flight, one peer
//! address may hold. Without it one client holding idle sockets or stalled uploads fills the
//! server's connection and request slots and everyone else waits or gets 503.
//!
//! Behind a reverse proxy every client has the proxy's address: raise the limits there (or set
//! them to the global ones).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// The peer address of a request's connection (set by the accept loop).
#[derive(Clone, Copy, Debug)]
pub struct ClientIp(pub IpAddr);

#[derive(Default)]
struct Counts {
    connections: usize,
    inflight: usize,
}

/// Per-address counts; an address leaves the map when it holds nothing.
pub struct Clients {
    counts: Mutex<HashMap<IpAddr, Counts>>,
    max_connections: usize,
    max_inflight: usize,
}

/// A connection or a request counted against its address until dropped.
pub struct Held {
    clients: Arc<Clients>,
    ip: IpAddr,
    connection: bool,
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut counts = self.clients.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = counts.get_mut(&self.ip) {
            if self.connection {
                c.connections = c.connections.saturating_sub(1);
            } else {
                c.inflight = c.inflight.saturating_sub(1);
            }
            if c.connections == 0 && c.inflight == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

impl Clients {
    pub fn new(max_connections: usize, max_inflight: usize) -> Arc<Clients> {
        Arc::new(Clients {
            counts: Mutex::default(),
            max_connections: max_connections.max(1),
            max_inflight: max_inflight.max(1),
        })
    }

    fn take(self: &Arc<Self>, ip: IpAddr, connection: bool) -> Option<Held> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let c = counts.entry(ip).or_default();
        let (n, max) =
            if connection { (&mut c.connections, self.max_connections) } else { (&mut c.inflight, self.max_inflight) };
        if *n >= max {
            if c.connections == 0 && c.inflight == 0 {
                counts.remove(&ip);
            }
            return None;
        }
        *n += 1;
        Some(Held { clients: self.clone(), ip, connection })
    }

    /// A new connection from `ip`, unless it already holds its share.
    pub fn connect(self: &Arc<Self>, ip: IpAddr) -> Option<Held> {
        self.take(ip, true)
    }

    /// A new request in flight from `ip`, unless it already has its share.
    pub fn begin_request(self: &Arc<Self>, ip: IpAddr) -> Option<Held> {
        self.take(ip, false)
    }

    pub fn max_connections(&self) -> usize {
        self.max_connections
    }

    pub fn max_inflight(&self) -> usize {
        self.max_inflight
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_address_gets_its_share_and_gives_it_back() {
        let c = Clients::new(2, 1);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let a1 = c.connect(a).unwrap();
        let _a2 = c.connect(a).unwrap();
        assert!(c.connect(a).is_none(), "a third connection from one address");
        let _b1 = c.connect(b).unwrap();
        let r = c.begin_request(a).unwrap();
        assert!(c.begin_request(a).is_none());
        assert!(c.begin_request(b).is_some());
        drop(r);
        assert!(c.begin_request(a).is_some());
        drop(a1);
        assert!(c.connect(a).is_some());
        drop(_a2);
        drop(_b1);
        assert!(c.counts.lock().unwrap().is_empty(), "addresses that hold nothing are forgotten");
    }
}
