//! `mvlt serve` and its loopback load test, `mvlt bench-serve`.
use super::infer_cmd::ModelArgs;
use crate::data::dataset::{open_dataset, Dataset};
use crate::device::{run_on, BackendTask};
use crate::serve::{ServeConfig, Server};
use anyhow::{bail, Context, Result};
use burn::tensor::backend::Backend;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The catalogue searched by /v1/search (any dataset format).
    #[arg(long)]
    catalog: PathBuf,
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// Largest request body, MiB.
    #[arg(long, default_value_t = 8)]
    max_body_mib: usize,
    /// Per-request limit (queue wait included), seconds.
    #[arg(long, default_value_t = 30.0)]
    timeout: f64,
    /// Requests that may wait for the model before the server answers 503.
    #[arg(long, default_value_t = 64)]
    queue: usize,
    /// How long the model waits for concurrent requests to batch together, milliseconds.
    #[arg(long, default_value_t = 2)]
    batch_window_ms: u64,
}

impl ServeArgs {
    fn config(&self) -> ServeConfig {
        ServeConfig {
            max_body: self.max_body_mib << 20,
            timeout: Duration::from_secs_f64(self.timeout),
            queue: self.queue,
            max_batch: self.model.batch_size,
            window: Duration::from_millis(self.batch_window_ms),
            ..ServeConfig::default()
        }
    }
}

fn server<B: Backend>(model: &ModelArgs, catalog: &Path, cfg: ServeConfig, device: &B::Device) -> Result<Server> {
    let m = model.load::<B>(device)?;
    let data: Arc<dyn Dataset> = Arc::from(open_dataset(catalog)?);
    Server::new(m, data, cfg)
}

impl BackendTask for &ServeArgs {
    type Output = ();
    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        let server = server::<B>(&self.model, &self.catalog, self.config(), &device)?;
        let rt = tokio::runtime::Runtime::new()?;
        rt.block_on(async move {
            let (listener, addr) = Server::bind(self.addr).await?;
            println!("listening on http://{addr}");
            use std::io::Write;
            let _ = std::io::stdout().flush();
            server
                .serve(listener, async {
                    let _ = tokio::signal::ctrl_c().await;
                    eprintln!("shutting down: finishing in-flight requests");
                })
                .await
        })
    }
}

pub fn serve(a: ServeArgs) -> Result<()> {
    run_on(a.model.device, &a)
}

#[derive(clap::Args)]
pub struct ServeBenchArgs {
    #[command(flatten)]
    serve: ServeArgs,
    /// Concurrent clients, one level after another.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    concurrency: Vec<usize>,
    /// Requests per level.
    #[arg(long, default_value_t = 200)]
    requests: usize,
    /// An image of the catalogue is used; this text is scored against it.
    #[arg(long, default_value = "a red cotton shirt with buttons")]
    text: String,
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

/// POST `body` with `ctype`; (status, body).
fn post(url: &str, ctype: &str, body: &[u8]) -> (u16, String) {
    match ureq::post(url).set("Content-Type", ctype).send_bytes(body) {
        Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
        Err(e) => (0, e.to_string()),
    }
}

impl BackendTask for &ServeBenchArgs {
    type Output = ();
    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        let server = server::<B>(&self.serve.model, &self.serve.catalog, self.serve.config(), &device)?;
        // One catalogue image as the request image.
        let data = open_dataset(&self.serve.catalog)?;
        let p = data.pixels(0)?;
        let mut png = vec![];
        use image::ImageEncoder;
        image::codecs::png::PngEncoder::new(&mut png).write_image(&p.data, p.width as u32, p.height as u32, image::ExtendedColorType::Rgb8)?;
        use base64::Engine;
        let body = serde_json::json!({"image": base64::engine::general_purpose::STANDARD.encode(&png), "text": self.text}).to_string();

        let rt = tokio::runtime::Runtime::new()?;
        let (listener, addr) = rt.block_on(Server::bind("127.0.0.1:0".parse()?))?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let handle = rt.spawn(server.serve(listener, async {
            let _ = stop_rx.await;
        }));
        let url = format!("http://{addr}/v1/score");
        println!("loopback load test of POST /v1/score ({} px image, one text) on {addr}", p.width);
        println!("| concurrency | requests |  ok |  req/s | p50 ms | p99 ms |");
        println!("|-------------|----------|-----|--------|--------|--------|");
        for &c in &self.concurrency {
            let c = c.max(1);
            let per = self.requests.div_ceil(c);
            let t0 = Instant::now();
            let results: Vec<(u16, f64, String)> = std::thread::scope(|s| {
                let hs: Vec<_> = (0..c)
                    .map(|_| {
                        s.spawn(|| {
                            (0..per)
                                .map(|_| {
                                    let t = Instant::now();
                                    let (st, text) = post(&url, "application/json", body.as_bytes());
                                    (st, t.elapsed().as_secs_f64() * 1e3, text)
                                })
                                .collect::<Vec<_>>()
                        })
                    })
                    .collect();
                hs.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect()
            });
            let secs = t0.elapsed().as_secs_f64();
            let ok = results.iter().filter(|r| r.0 == 200).count();
            let mut lat: Vec<f64> = results.iter().map(|r| r.1).collect();
            lat.sort_by(f64::total_cmp);
            if let Some(e) = results.iter().find(|r| r.0 != 200) {
                eprintln!("note: {} of {} requests failed, e.g. {} {}", results.len() - ok, results.len(), e.0, e.2);
            }
            println!("| {c:>11} | {:>8} | {ok:>3} | {:>6.1} | {:>6.1} | {:>6.1} |", results.len(), results.len() as f64 / secs, percentile(&lat, 0.5), percentile(&lat, 0.99));
        }
        // Bad requests: each must get a 4xx with a JSON error, and the server must stay up.
        let huge = vec![b'a'; (self.serve.max_body_mib << 20) + 1024];
        let cases: Vec<(&str, &str, Vec<u8>)> = vec![
            ("wrong content type", "text/plain", b"hello".to_vec()),
            ("body over the limit", "application/json", huge),
            ("broken image", "application/json", br#"{"image": "aGVsbG8gd29ybGQ=", "text": "a shirt"}"#.to_vec()),
            ("empty text", "application/json", serde_json::json!({"image": base64::engine::general_purpose::STANDARD.encode(&png), "text": "  "}).to_string().into_bytes()),
            ("wrong field type", "application/json", br#"{"image": 5, "text": ["x"]}"#.to_vec()),
            ("not JSON", "application/json", b"{nope".to_vec()),
        ];
        println!("\n| bad request | status | JSON error |");
        println!("|-------------|--------|------------|");
        let mut failed = 0;
        for (name, ctype, body) in cases {
            let (st, text) = post(&url, ctype, &body);
            let json_err = serde_json::from_str::<serde_json::Value>(&text).ok().and_then(|v| v.get("error").cloned()).is_some();
            if !(400..500).contains(&st) || !json_err {
                failed += 1;
            }
            println!("| {name} | {st} | {json_err} |");
        }
        let health = ureq::get(&format!("http://{addr}/healthz")).call().map(|r| r.status()).unwrap_or(0);
        println!("\n/healthz after the bad requests: {health}");
        let _ = stop_tx.send(());
        rt.block_on(handle).context("server task")??;
        if failed > 0 || health != 200 {
            bail!("{failed} bad request(s) were not answered with a 4xx JSON error, or the server went down");
        }
        Ok(())
    }
}

pub fn bench(a: ServeBenchArgs) -> Result<()> {
    run_on(a.serve.model.device, &a)
}
