//! `mvlt serve` and its loopback load test, `mvlt bench-serve`.
use super::infer_cmd::ModelArgs;
use crate::cli::run_on;
use crate::serve::{ServeConfig, Server};
use anyhow::{bail, Context, Result};
use burn::tensor::backend::Backend;
use mvlt::data::dataset::{open_dataset, Dataset};
use mvlt::device::BackendTask;
use mvlt::search::index::FirstStage;
use std::net::SocketAddr;
use std::path::PathBuf;
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
    /// Catalogue rows one search scores at most.
    #[arg(long, default_value_t = ServeConfig::default().max_candidates)]
    max_candidates: usize,
    /// Texts one /v1/score request may carry.
    #[arg(long, default_value_t = ServeConfig::default().max_texts)]
    max_texts: usize,
    /// Pixels a request image may have (read from its header; larger ones get 400 before decoding).
    #[arg(long, default_value_t = ServeConfig::default().max_image_pixels)]
    max_image_pixels: u64,
    /// Open connections at most; more clients wait in the listen backlog.
    #[arg(long, default_value_t = ServeConfig::default().max_connections)]
    max_connections: usize,
    /// Seconds a client has to send its headers (also closes idle keep-alive connections).
    #[arg(long, default_value_t = 10.0)]
    header_timeout: f64,
    /// Seconds a client has to send a request's body (408 after).
    #[arg(long, default_value_t = 30.0)]
    body_timeout: f64,
    /// A contrastive index of the catalogue (mvlt index, same weights): text searches rank every
    /// indexed image by similarity first, then order the top --first-stage-k by the ranking the
    /// index measured best (`--ranking` overrides).
    #[arg(long)]
    index: Option<PathBuf>,
    #[arg(long, default_value_t = 50)]
    first_stage_k: usize,
    /// With --index: embeddings, itm or itm+similarity, instead of the index's measured ranking.
    #[arg(long, value_parser = crate::cli::infer_cmd::parse_ranking, requires = "index")]
    ranking: Option<mvlt::search::ranking::Ranking>,
    /// A file whose first line is the access token: every data route then needs
    /// `Authorization: Bearer <token>`. Required when --addr is not a loopback address.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Serve beyond loopback without a token (anyone who can reach the port can use the API).
    #[arg(long)]
    insecure_public: bool,
    /// A host name requests may be addressed to, besides loopback names and --addr's address
    /// (repeatable; `*`: any). Requests naming another host get 403 (DNS-rebinding protection).
    #[arg(long = "allow-host", value_name = "NAME")]
    allow_hosts: Vec<String>,
    /// An origin (scheme://host[:port]) whose web pages may call the API (repeatable; `*`: any).
    /// Default: only the server's own page.
    #[arg(long = "cors-origin", value_name = "ORIGIN")]
    cors_origins: Vec<String>,
    /// Connections one client address may hold open.
    #[arg(long, default_value_t = ServeConfig::default().max_connections_per_client)]
    max_connections_per_client: usize,
    /// Requests one client address may have in flight.
    #[arg(long, default_value_t = ServeConfig::default().max_inflight_per_client)]
    max_inflight_per_client: usize,
    /// Seconds a request body may pause before the request is dropped (408).
    #[arg(long, default_value_t = 5.0)]
    body_stall: f64,
}

/// A duration given in seconds on the command line: finite, positive, at most a day.
fn seconds(flag: &str, value: f64) -> Result<Duration> {
    if !(value.is_finite() && value > 0.0 && value <= 86_400.0) {
        bail!("--{flag} must be a number of seconds above 0 and at most 86400 (a day), got {value}");
    }
    Ok(Duration::from_secs_f64(value))
}

/// A count given on the command line: at least 1 and at most `max`.
fn count(flag: &str, value: usize, max: usize) -> Result<usize> {
    if !(1..=max).contains(&value) {
        bail!("--{flag} must be between 1 and {max}, got {value}");
    }
    Ok(value)
}

impl ServeArgs {
    fn config(&self) -> Result<ServeConfig> {
        let token = self.token_file.as_deref().map(crate::serve::access::Access::read_token).transpose()?;
        let access = crate::serve::access::Access::new(
            self.addr,
            token,
            &self.allow_hosts,
            &self.cors_origins,
            self.insecure_public,
        )?;
        Ok(ServeConfig {
            max_body: count("max-body-mib", self.max_body_mib, 1024)? << 20,
            timeout: seconds("timeout", self.timeout)?,
            queue: count("queue", self.queue, 1 << 16)?,
            max_batch: self.model.batch_size,
            window: Duration::from_millis(self.batch_window_ms.min(10_000)),
            max_candidates: count("max-candidates", self.max_candidates, 100_000_000)?,
            max_texts: count("max-texts", self.max_texts, 1 << 16)?,
            max_image_pixels: self.max_image_pixels.clamp(1, mvlt::data::image::MAX_PIXELS),
            max_connections: count("max-connections", self.max_connections, 1 << 16)?,
            header_timeout: seconds("header-timeout", self.header_timeout)?,
            body_timeout: seconds("body-timeout", self.body_timeout)?,
            body_stall: seconds("body-stall", self.body_stall)?,
            max_connections_per_client: count("max-connections-per-client", self.max_connections_per_client, 1 << 16)?,
            max_inflight_per_client: count("max-inflight-per-client", self.max_inflight_per_client, 1 << 16)?,
            access,
            ..ServeConfig::default()
        })
    }
}

fn server<B: Backend>(a: &ServeArgs, device: &B::Device) -> Result<Server> {
    let cfg = a.config()?;
    let m = a.model.load::<B>(device)?;
    let data: Arc<dyn Dataset> = Arc::from(open_dataset(&a.catalog)?);
    let first_stage = match &a.index {
        Some(path) => {
            let index = mvlt::search::index::CatalogIndex::open_for(path, &a.model.weights, m.config.itc_dim)?;
            let n = index.len();
            let mut fs = FirstStage::new(index, a.first_stage_k, data.as_ref())?;
            fs.set_ranking(a.ranking);
            eprintln!(
                "text searches: first stage over {n} indexed images, the top {} ranked by {} ({}, {})",
                a.first_stage_k,
                fs.ranking,
                fs.ranking.describe(),
                fs.ranking_from
            );
            fs.check_covers(data.as_ref()).with_context(|| format!("index {}", path.display()))?;
            Some(fs)
        }
        None => None,
    };
    Server::new(m, data, cfg, first_stage)
}

impl BackendTask for &ServeArgs {
    type Output = ();
    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        let server = server::<B>(self, &device)?;
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
        let server = server::<B>(&self.serve, &device)?;
        // One catalogue image as the request image.
        let data = open_dataset(&self.serve.catalog)?;
        let p = data.pixels(0)?;
        let png = p.to_png()?;
        use base64::Engine;
        let body =
            serde_json::json!({"image": base64::engine::general_purpose::STANDARD.encode(&png), "text": self.text})
                .to_string();

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
            println!(
                "| {c:>11} | {:>8} | {ok:>3} | {:>6.1} | {:>6.1} | {:>6.1} |",
                results.len(),
                results.len() as f64 / secs,
                percentile(&lat, 0.5),
                percentile(&lat, 0.99)
            );
        }
        // Bad requests: each must get a 4xx with a JSON error, and the server must stay up.
        let huge = vec![b'a'; (self.serve.max_body_mib << 20) + 1024];
        let cases: Vec<(&str, &str, Vec<u8>)> = vec![
            ("wrong content type", "text/plain", b"hello".to_vec()),
            ("body over the limit", "application/json", huge),
            ("broken image", "application/json", br#"{"image": "aGVsbG8gd29ybGQ=", "text": "a shirt"}"#.to_vec()),
            (
                "empty text",
                "application/json",
                serde_json::json!({"image": base64::engine::general_purpose::STANDARD.encode(&png), "text": "  "})
                    .to_string()
                    .into_bytes(),
            ),
            ("wrong field type", "application/json", br#"{"image": 5, "text": ["x"]}"#.to_vec()),
            ("not JSON", "application/json", b"{nope".to_vec()),
        ];
        println!("\n| bad request | status | JSON error |");
        println!("|-------------|--------|------------|");
        let mut failed = 0;
        for (name, ctype, body) in cases {
            let (st, text) = post(&url, ctype, &body);
            let json_err =
                serde_json::from_str::<serde_json::Value>(&text).ok().and_then(|v| v.get("error").cloned()).is_some();
            if !(400..500).contains(&st) || !json_err {
                failed += 1;
            }
            println!("| {name} | {st} | {json_err} |");
        }
        failed += hostile_mix(addr, &self.serve.config()?)?;
        let health = ureq::get(&format!("http://{addr}/healthz")).call().map(|r| r.status()).unwrap_or(0);
        println!("\n/healthz after the bad and hostile requests: {health}");
        let _ = stop_tx.send(());
        rt.block_on(handle).context("server task")??;
        if failed > 0 || health != 200 {
            bail!("{failed} bad request(s) were not answered with a 4xx JSON error, or the server went down");
        }
        Ok(())
    }
}

/// The hostile mix: each case sent by 8 clients at once, the server's answers checked (a 4xx with
/// a JSON error, or 200 for the image at the pixel limit), the slow clients checked to be cut off,
/// and the process's peak memory over the mix reported. Returns the number of failed cases.
fn hostile_mix(addr: SocketAddr, cfg: &ServeConfig) -> Result<usize> {
    use base64::Engine;
    use std::io::{Read, Write};
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let side = (cfg.max_image_pixels as f64).sqrt() as u32;
    // An image at the pixel limit, decoded for real: a blocky pattern so the PNG stays small.
    let at_limit = {
        let img = image::RgbImage::from_fn(side, side, |x, y| image::Rgb([(x / 16) as u8, (y / 16) as u8, 128]));
        let mut png = vec![];
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
        png
    };
    let small = b64(&mvlt::data::image::png_claiming(16, 16));
    let cases: Vec<(String, String, u16)> = vec![
        (
            format!("16000x16000 PNG header ({} bytes)", mvlt::data::image::png_claiming(16000, 16000).len()),
            serde_json::json!({"image": b64(&mvlt::data::image::png_claiming(16000, 16000)), "text": "a shirt"})
                .to_string(),
            400,
        ),
        (
            format!("{side}x{side} PNG at the pixel limit ({} KB)", at_limit.len() >> 10),
            serde_json::json!({"image": b64(&at_limit), "text": "a shirt"}).to_string(),
            200,
        ),
        (
            "12,000 texts".into(),
            serde_json::json!({"image": small, "texts": vec!["a red shirt"; 12_000]}).to_string(),
            400,
        ),
        ("one 7 MB text".into(), serde_json::json!({"image": small, "text": "red ".repeat(7 << 18)}).to_string(), 400),
    ];
    let url = format!("http://{addr}/v1/score");
    println!("\n| hostile case, 8 at once | statuses | JSON errors | seconds | peak RSS MB |");
    println!("|---|---|---|---|---|");
    let mut failed = 0;
    let mut overall_peak = 0u64;
    for (name, body, want) in &cases {
        if body.len() > cfg.max_body {
            println!("| {name} | (skipped: {} bytes is over --max-body-mib) | | | |", body.len());
            continue;
        }
        mvlt::memory::reset_peak_rss();
        let t0 = Instant::now();
        let answers: Vec<(u16, String)> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8).map(|_| s.spawn(|| post(&url, "application/json", body.as_bytes()))).collect();
            hs.into_iter().map(|h| h.join().unwrap_or((0, "client thread panicked".into()))).collect()
        });
        let secs = t0.elapsed().as_secs_f64();
        let peak = mvlt::memory::peak_rss().unwrap_or(0);
        overall_peak = overall_peak.max(peak);
        let statuses: std::collections::BTreeSet<u16> = answers.iter().map(|a| a.0).collect();
        let json_errors = answers
            .iter()
            .filter(|(_, t)| {
                serde_json::from_str::<serde_json::Value>(t).ok().and_then(|v| v.get("error").cloned()).is_some()
            })
            .count();
        let ok = answers.iter().all(|(st, _)| st == want) && (*want == 200 || json_errors == answers.len());
        if !ok {
            failed += 1;
            eprintln!(
                "note: hostile case '{name}': expected {want}, got {:?}",
                answers.iter().map(|(s, t)| format!("{s} {}", &t[..t.len().min(120)])).collect::<Vec<_>>()
            );
        }
        println!("| {name} | {statuses:?} | {json_errors}/8 | {secs:.2} | {:.0} |", peak as f64 / 1e6);
    }
    // Slow clients: connect only, partial headers, idle keep-alive; each must be closed by the
    // server within the header timeout (plus a second of slack).
    let limit = cfg.header_timeout + Duration::from_secs(1);
    let slow: [(&str, &[u8]); 3] = [
        ("connect only", b""),
        ("partial headers", b"POST /v1/score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty"),
        ("idle keep-alive after a request", b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"),
    ];
    // All at once: each waits out the header timeout.
    let results: Vec<(bool, f64)> = std::thread::scope(|scope| {
        let hs: Vec<_> = slow
            .iter()
            .map(|(_, send)| {
                scope.spawn(move || {
                    let t0 = Instant::now();
                    let closed = (|| -> Result<bool> {
                        let mut c = std::net::TcpStream::connect(addr)?;
                        c.set_read_timeout(Some(limit + Duration::from_secs(5)))?;
                        c.write_all(send)?;
                        let mut buf = [0u8; 4096];
                        // Read until the server closes (0 bytes) or the read times out (not closed).
                        loop {
                            match c.read(&mut buf) {
                                Ok(0) => return Ok(true),
                                Ok(_) => continue,
                                Err(e)
                                    if matches!(
                                        e.kind(),
                                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                                    ) =>
                                {
                                    return Ok(false)
                                }
                                Err(_) => return Ok(true),
                            }
                        }
                    })()
                    .unwrap_or(false);
                    (closed, t0.elapsed().as_secs_f64())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or((false, f64::NAN))).collect()
    });
    for ((name, _), (closed, secs)) in slow.iter().zip(results) {
        if !(closed && secs <= limit.as_secs_f64()) {
            failed += 1;
        }
        println!(
            "| slow client: {name} | {} | | {secs:.2} | |",
            if closed { "closed by the server" } else { "still open" }
        );
    }
    println!(
        "\npeak RSS over the hostile mix (server and load-test client in one process): {:.0} MB",
        overall_peak as f64 / 1e6
    );
    Ok(failed)
}

pub fn bench(a: ServeBenchArgs) -> Result<()> {
    run_on(a.serve.model.device, &a)
}
