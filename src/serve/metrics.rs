//! Counters for `/metrics`, in Prometheus' text format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Upper bounds (seconds) of the latency histogram buckets.
const BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

#[derive(Default)]
struct Latency {
    buckets: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

#[derive(Default)]
pub struct Metrics {
    /// (endpoint, status) -> requests.
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    latency: Mutex<BTreeMap<String, Latency>>,
    pub queue_depth: AtomicUsize,
    batches: AtomicU64,
    pairs: AtomicU64,
    /// Requests whose work the model thread dropped: the client had gone or been answered 504.
    pub abandoned: AtomicU64,
    /// Open connections.
    pub connections: AtomicUsize,
}

impl Metrics {
    pub fn record_request(&self, endpoint: &str, status: u16, seconds: f64) {
        *self.requests.lock().expect("metrics").entry((endpoint.to_string(), status)).or_default() += 1;
        let mut lat = self.latency.lock().expect("metrics");
        let l = lat.entry(endpoint.to_string()).or_default();
        for (b, &le) in l.buckets.iter_mut().zip(&BUCKETS) {
            if seconds <= le {
                *b += 1;
            }
        }
        l.count += 1;
        l.sum += seconds;
    }

    pub fn record_batch(&self, pairs: usize) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.pairs.fetch_add(pairs as u64, Ordering::Relaxed);
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# HELP mvlt_requests_total HTTP requests by endpoint and status.\n# TYPE mvlt_requests_total counter"
        );
        for ((e, st), n) in self.requests.lock().expect("metrics").iter() {
            let _ = writeln!(s, "mvlt_requests_total{{endpoint=\"{e}\",status=\"{st}\"}} {n}");
        }
        let _ = writeln!(s, "# HELP mvlt_request_seconds Request latency.\n# TYPE mvlt_request_seconds histogram");
        for (e, l) in self.latency.lock().expect("metrics").iter() {
            for (b, le) in l.buckets.iter().zip(BUCKETS) {
                let _ = writeln!(s, "mvlt_request_seconds_bucket{{endpoint=\"{e}\",le=\"{le}\"}} {b}");
            }
            let _ = writeln!(s, "mvlt_request_seconds_bucket{{endpoint=\"{e}\",le=\"+Inf\"}} {}", l.count);
            let _ = writeln!(s, "mvlt_request_seconds_sum{{endpoint=\"{e}\"}} {}", l.sum);
            let _ = writeln!(s, "mvlt_request_seconds_count{{endpoint=\"{e}\"}} {}", l.count);
        }
        let _ = writeln!(s, "# HELP mvlt_queue_depth Requests waiting for the model.\n# TYPE mvlt_queue_depth gauge");
        let _ = writeln!(s, "mvlt_queue_depth {}", self.queue_depth.load(Ordering::Relaxed));
        let _ = writeln!(s, "# HELP mvlt_batches_total Forward passes run.\n# TYPE mvlt_batches_total counter");
        let _ = writeln!(s, "mvlt_batches_total {}", self.batches.load(Ordering::Relaxed));
        let _ = writeln!(s, "# HELP mvlt_pairs_total Image-text pairs scored.\n# TYPE mvlt_pairs_total counter");
        let _ = writeln!(s, "mvlt_pairs_total {}", self.pairs.load(Ordering::Relaxed));
        let _ = writeln!(s, "# HELP mvlt_abandoned_total Requests dropped unfinished (client gone or timed out).\n# TYPE mvlt_abandoned_total counter");
        let _ = writeln!(s, "mvlt_abandoned_total {}", self.abandoned.load(Ordering::Relaxed));
        let _ =
            writeln!(s, "# HELP mvlt_open_connections Open client connections.\n# TYPE mvlt_open_connections gauge");
        let _ = writeln!(s, "mvlt_open_connections {}", self.connections.load(Ordering::Relaxed));
        s
    }
}
