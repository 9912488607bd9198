//! `mvlt serve`: the HTTP API and a small web page over one loaded model and a catalogue.
//!
//! - `POST /v1/score`, `/v1/classify`, `/v1/search`: JSON (`image` as base64 or a data URL) or
//!   multipart/form-data (`image` as a file part); answers JSON, errors `{"error": "..."}` with a 4xx
//!   or 5xx status.
//! - `GET /healthz`, `/metrics` (Prometheus text), `/openapi.json`, `/v1/images/{row}` (catalogue
//!   images for the page), `/` (the page).
//!
//! Requests are decoded and preprocessed on tokio's blocking pool, then queued for the model thread
//! (`batcher`), which batches concurrent requests. A full queue answers 503, a request that takes
//! longer than the timeout 504, a body over the limit 413, another content type 415.
//!
//! Every input is bounded before it costs anything (see [`ServeConfig`]): requests in flight, body
//! bytes and the time to send them, texts per request and bytes per text, image pixels (read from
//! the header before decoding) and concurrent decodes, candidates per search, open connections and
//! the time to send headers (which also closes idle keep-alive connections). Work whose client has
//! gone or timed out is dropped by the model thread between forward passes.

pub mod access;
pub mod batcher;
pub mod clients;
pub mod metrics;

use access::Access;
use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::{FromRequest, MatchedPath, Path as UrlPath, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use batcher::{BatcherConfig, Catalogue, Head, JobError, Output, Queue, Submit, Work};
use burn::tensor::backend::Backend;
use clients::{ClientIp, Clients};
use metrics::Metrics;
use mvlt::data::dataset::Dataset;
use mvlt::data::image::{preprocess, Pixels};
use mvlt::data::text::TextProcessor;
use mvlt::infer::{top_k, Model};
use mvlt::search::index::FirstStage;
use mvlt::search::{distinct_captions, filter_rows};
use rayon::prelude::*;
use serde::Deserialize;
use serde_json::json;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Largest request body, bytes.
    pub max_body: usize,
    /// Per-request limit, queue wait included.
    pub timeout: Duration,
    /// Requests that may wait for the model before 503.
    pub queue: usize,
    /// Pairs per forward pass.
    pub max_batch: usize,
    /// How long the model thread waits for concurrent requests to batch.
    pub window: Duration,
    /// Catalogue rows one search scores at most.
    pub max_candidates: usize,
    /// Texts one `/v1/score` request may carry.
    pub max_texts: usize,
    /// Pixels of one request image (checked from its header, before decoding).
    pub max_image_pixels: u64,
    /// Request images decoded at once; others wait (decoding is what costs memory).
    pub decode_slots: usize,
    /// POST requests being read or answered at once; more are answered 503 at once.
    pub max_inflight: usize,
    /// Open connections; further clients wait in the listen backlog.
    pub max_connections: usize,
    /// Time a client has to send a request's headers; also how long an idle keep-alive
    /// connection stays open.
    pub header_timeout: Duration,
    /// Time a client has to send a request's body.
    pub body_timeout: Duration,
    /// Longest pause within a body: a body that stops arriving gives its request slot back
    /// after this (408), not after the whole body timeout.
    pub body_stall: Duration,
    /// Open connections one peer address may hold; more are answered 503 and closed.
    pub max_connections_per_client: usize,
    /// POST requests one peer address may have in flight; more are answered 503.
    pub max_inflight_per_client: usize,
    /// Longer side of the catalogue images `GET /v1/images/{row}` sends (scaled down from the
    /// file, one decode at a time).
    pub thumbnail_side: usize,
    /// Token, Host allow-list and CORS policy ([`access`]).
    pub access: Access,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            max_body: 8 << 20,
            timeout: Duration::from_secs(30),
            queue: 64,
            max_batch: 32,
            window: Duration::from_millis(2),
            max_candidates: 20_000,
            max_texts: 256,
            max_image_pixels: 16_000_000,
            decode_slots: 2,
            max_inflight: 32,
            max_connections: 256,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            body_stall: Duration::from_secs(5),
            max_connections_per_client: 64,
            max_inflight_per_client: 8,
            thumbnail_side: 512,
            access: Access::loopback(),
        }
    }
}

/// Longest request URI and largest header block answered by the API itself (414 / 431 as JSON);
/// hyper refuses still larger ones on its own (`HYPER_MAX_BUF`), with an empty body.
const MAX_URI_BYTES: usize = 8 << 10;
const MAX_HEADER_BYTES: usize = 32 << 10;
const MAX_HEADER_COUNT: usize = 64;
const HYPER_MAX_BUF: usize = 256 << 10;
const HYPER_MAX_HEADERS: usize = 128;
/// Longest text of a request: the model reads its first T - 2 word pieces only.
const MAX_REQUEST_TEXT_BYTES: usize = mvlt::data::text::MAX_CAPTION_BYTES;

struct App {
    queue: Queue,
    text: Arc<TextProcessor>,
    max_len: usize,
    image_size: usize,
    classes: Option<mvlt::data::dataset::ClassMap>,
    data: Arc<dyn Dataset>,
    /// Catalogue rows whose image could be read.
    usable: Vec<bool>,
    /// The heads the weights have: an endpoint whose head is missing answers 422.
    heads: mvlt::model::HeadSet,
    decode_slots: Arc<tokio::sync::Semaphore>,
    inflight: Arc<tokio::sync::Semaphore>,
    clients: Arc<Clients>,
    /// Catalogue images decoded for `/v1/images` one at a time (a catalogue file may hold 64
    /// megapixels), and the last few thumbnails sent.
    thumbnail_slot: Arc<tokio::sync::Semaphore>,
    thumbnails: std::sync::Mutex<std::collections::VecDeque<(usize, Bytes)>>,
    metrics: Arc<Metrics>,
    cfg: ServeConfig,
    /// Text searches through an index (`serve --index`); it covers every catalogue row.
    first_stage: Option<FirstStage>,
}

/// An error answer: status and a message, as `{"error": message}`.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

/// The fields every endpoint reads (each uses some of them).
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    /// base64 or a `data:image/...;base64,` URL (JSON); a file part (multipart).
    image: Option<String>,
    #[serde(skip)]
    image_bytes: Option<Bytes>,
    text: Option<String>,
    texts: Option<Vec<String>>,
    top: Option<usize>,
    category: Option<String>,
    subcategory: Option<String>,
}

impl Input {
    fn image(&self) -> Result<Option<Vec<u8>>, ApiError> {
        if let Some(b) = &self.image_bytes {
            return Ok(Some(b.to_vec()));
        }
        let Some(s) = &self.image else { return Ok(None) };
        let payload = match s.split_once(";base64,") {
            Some((_, p)) => p,
            None => s.as_str(),
        };
        base64::engine::general_purpose::STANDARD
            .decode(payload.trim())
            .map(Some)
            .map_err(|e| bad(format!("image: not valid base64 ({e})")))
    }
}

/// How much of an over-limit body is still read (and thrown away) before the 413 answer, and for
/// how long. Most clients send the whole body before they read the answer (no `Expect:
/// 100-continue`); a server that answers and closes early leaves them writing into a reset
/// connection ("broken pipe") and they never see the 413. Bounded, so a huge upload cannot keep a
/// connection busy for long.
const DRAIN_BYTES: usize = 64 << 20;
const DRAIN_TIME: Duration = Duration::from_secs(5);

/// The whole body, at most `limit` bytes (413 beyond, after draining as above), within `time`
/// and with no pause longer than `stall` (408 beyond either: a client sending a byte a second, or
/// one that stops, holds no slot for long).
async fn read_body(body: axum::body::Body, limit: usize, time: Duration, stall: Duration) -> Result<Bytes, ApiError> {
    tokio::time::timeout(time, read_body_unbounded_in_time(body, limit, stall)).await.map_err(|_| {
        ApiError(StatusCode::REQUEST_TIMEOUT, format!("the request body did not arrive within {time:?}"))
    })?
}

async fn read_body_unbounded_in_time(
    mut body: axum::body::Body,
    limit: usize,
    stall: Duration,
) -> Result<Bytes, ApiError> {
    use http_body_util::BodyExt;
    let mut buf = Vec::new();
    loop {
        let frame = match tokio::time::timeout(stall, body.frame()).await {
            Err(_) => {
                return Err(ApiError(
                    StatusCode::REQUEST_TIMEOUT,
                    format!("the request body did not arrive: nothing came for {stall:?}"),
                ))
            }
            Ok(None) => break,
            Ok(Some(frame)) => frame.map_err(|e| bad(format!("reading the request body: {e}")))?,
        };
        let Ok(data) = frame.into_data() else { continue };
        if buf.len() + data.len() > limit {
            drain(body, buf.len() + data.len()).await;
            return Err(ApiError(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request body is over the {limit}-byte limit"),
            ));
        }
        buf.extend_from_slice(&data);
    }
    Ok(Bytes::from(buf))
}

/// Read and drop the rest of a body (at most [`DRAIN_BYTES`] in all, for at most [`DRAIN_TIME`])
/// before an early answer, so that the client reads the answer instead of a reset connection.
async fn drain(mut body: axum::body::Body, mut seen: usize) {
    use http_body_util::BodyExt;
    let drain = async {
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.into_data().map(|d| d.len()).unwrap_or(0);
            if seen > DRAIN_BYTES {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
}

/// A POST request's places among those in flight (`ServeConfig::max_inflight`) and among its
/// client's (`max_inflight_per_client`), held until it is answered.
struct Slot {
    _global: tokio::sync::OwnedSemaphorePermit,
    _client: Option<clients::Held>,
}

async fn read_input(app: &App, req: Request) -> Result<(Input, Slot), ApiError> {
    let busy = |msg: String| ApiError(StatusCode::SERVICE_UNAVAILABLE, msg);
    let client = match req.extensions().get::<ClientIp>() {
        Some(ClientIp(ip)) => match app.clients.begin_request(*ip) {
            Some(held) => Some(held),
            None => {
                drain(req.into_body(), 0).await;
                return Err(busy(format!(
                    "your address already has {} requests in flight; wait for their answers",
                    app.clients.max_inflight()
                )));
            }
        },
        None => None,
    };
    let global = match app.inflight.clone().try_acquire_owned() {
        Ok(p) => p,
        Err(_) => {
            drain(req.into_body(), 0).await;
            return Err(busy(format!(
                "the server is busy ({} requests in flight); retry shortly",
                app.cfg.max_inflight
            )));
        }
    };
    let input = read_fields(req, app.cfg.max_body, app.cfg.body_timeout, app.cfg.body_stall).await?;
    Ok((input, Slot { _global: global, _client: client }))
}

async fn read_fields(req: Request, limit: usize, time: Duration, stall: Duration) -> Result<Input, ApiError> {
    let ctype =
        req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_ascii_lowercase();
    let is_json = ctype.starts_with("application/json");
    if !is_json && !ctype.starts_with("multipart/form-data") {
        drain(req.into_body(), 0).await;
        return Err(ApiError(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("Content-Type must be application/json or multipart/form-data, got '{ctype}'"),
        ));
    }
    let (parts, body) = req.into_parts();
    let body = read_body(body, limit, time, stall).await?;
    if is_json {
        serde_json::from_slice(&body).map_err(|e| bad(format!("invalid JSON body: {e}")))
    } else {
        let req = Request::from_parts(parts, axum::body::Body::from(body));
        let mut mp = axum::extract::Multipart::from_request(req, &())
            .await
            .map_err(|e| bad(format!("invalid multipart body: {e}")))?;
        let mut input = Input::default();
        while let Some(field) = mp.next_field().await.map_err(|e| bad(format!("invalid multipart body: {e}")))? {
            let name = field.name().unwrap_or("").to_string();
            let data = field.bytes().await.map_err(|e| bad(format!("reading part '{name}': {e}")))?;
            let text = || String::from_utf8(data.to_vec()).map_err(|_| bad(format!("part '{name}' is not UTF-8 text")));
            match name.as_str() {
                "image" => input.image_bytes = Some(data.clone()),
                "text" => input.text = Some(text()?),
                "top" => input.top = Some(text()?.trim().parse().map_err(|_| bad("top must be a positive integer"))?),
                "category" => input.category = Some(text()?),
                "subcategory" => input.subcategory = Some(text()?),
                other => return Err(bad(format!("unknown part '{other}' (image, text, top, category, subcategory)"))),
            }
        }
        Ok(input)
    }
}

/// When a request must be answered by (`ServeConfig::timeout` after it was read).
type Deadline = tokio::time::Instant;

fn timed_out(app: &App) -> ApiError {
    ApiError(StatusCode::GATEWAY_TIMEOUT, format!("no answer within {:?}", app.cfg.timeout))
}

/// A request whose deadline passed before it reached the model: dropped there, and counted with
/// the work the model thread drops (`mvlt_abandoned_total`).
fn abandoned(app: &App) -> ApiError {
    app.metrics.abandoned.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    timed_out(app)
}

impl App {
    fn deadline(&self) -> Deadline {
        tokio::time::Instant::now() + self.cfg.timeout
    }

    /// Token ids of `texts`, tokenized on the blocking pool (a text can take milliseconds; 256 of
    /// them must not hold the threads that answer every other client), within the deadline.
    async fn encode(self: &Arc<Self>, texts: Vec<String>, deadline: Deadline) -> Result<Vec<Arc<Vec<i64>>>, ApiError> {
        for t in &texts {
            if t.trim().is_empty() {
                return Err(bad("text is empty"));
            }
            if t.len() > MAX_REQUEST_TEXT_BYTES {
                return Err(bad(format!(
                    "a text of {} bytes, over the limit of {MAX_REQUEST_TEXT_BYTES} bytes (a product description is a few hundred)",
                    t.len()
                )));
            }
        }
        let app = self.clone();
        let work = tokio::task::spawn_blocking(move || {
            texts
                .iter()
                .map(|t| app.text.encode(t, app.max_len).map(|e| Arc::new(e.input_ids)))
                .collect::<Result<Vec<_>>>()
        });
        tokio::time::timeout_at(deadline, work)
            .await
            .map_err(|_| abandoned(self))?
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("tokenizing failed: {e}")))?
            .map_err(|e| bad(format!("text: {e:#}")))
    }

    /// Decode and preprocess on the blocking pool (CPU work off the async threads), at most
    /// `decode_slots` at a time, images of at most `max_image_pixels`.
    async fn image(self: &Arc<Self>, bytes: Vec<u8>, deadline: Deadline) -> Result<Arc<Vec<f32>>, ApiError> {
        let size = self.image_size;
        let max_pixels = self.cfg.max_image_pixels;
        let slot = tokio::time::timeout_at(deadline, self.decode_slots.clone().acquire_owned())
            .await
            .map_err(|_| {
                ApiError(StatusCode::SERVICE_UNAVAILABLE, "the server is busy decoding images; retry shortly".into())
            })?
            .map_err(|_| ApiError(StatusCode::INTERNAL_SERVER_ERROR, "the image decoder is closed".into()))?;
        let work = tokio::task::spawn_blocking(move || -> Result<Vec<f32>> {
            let _slot = slot;
            Ok(mvlt::data::image::preprocess_floats(&Pixels::decode_limited(&bytes, max_pixels)?, size)?.0)
        });
        tokio::time::timeout_at(deadline, work)
            .await
            .map_err(|_| abandoned(self))?
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("decoding failed: {e}")))?
            .map(Arc::new)
            .map_err(|e| bad(format!("image: {e:#}")))
    }

    /// 422 unless the weights have `head`, naming the weights that do.
    fn require(&self, head: Head) -> Result<(), ApiError> {
        match mvlt::infer::missing_head(self.heads, head.heads()) {
            None => Ok(()),
            Some(why) => Err(ApiError(StatusCode::UNPROCESSABLE_ENTITY, why.into())),
        }
    }

    async fn run(&self, work: Work, deadline: Deadline) -> Result<Output, ApiError> {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let rx = match self.queue.submit(work, left) {
            Submit::Ok(rx) => rx,
            Submit::Full => {
                return Err(ApiError(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the server is busy (queue full); retry shortly".into(),
                ))
            }
            Submit::Closed => {
                return Err(ApiError(StatusCode::INTERNAL_SERVER_ERROR, "the model thread stopped".into()))
            }
        };
        match tokio::time::timeout_at(deadline, rx).await {
            Err(_) => Err(timed_out(self)),
            Ok(Err(_)) => {
                Err(ApiError(StatusCode::INTERNAL_SERVER_ERROR, "the model thread dropped the request".into()))
            }
            // The model thread saw the deadline pass before this timer did.
            Ok(Ok(Err(JobError::Abandoned))) => Err(timed_out(self)),
            Ok(Ok(Err(JobError::Failed(msg)))) => {
                tracing_note(&format!("a request failed in the model: {msg}"));
                Err(ApiError(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the model failed on this request (the server log says why)".into(),
                ))
            }
            Ok(Ok(Ok(out))) => Ok(out),
        }
    }

    /// A catalogue image scaled down to `thumbnail_side`, as PNG: from the last few sent, or
    /// decoded (one at a time) on the blocking pool.
    async fn thumbnail(self: &Arc<Self>, row: usize, deadline: Deadline) -> Result<Bytes, ApiError> {
        let cached = |app: &App| {
            let cache = app.thumbnails.lock().unwrap_or_else(|p| p.into_inner());
            cache.iter().find(|(r, _)| *r == row).map(|(_, png)| png.clone())
        };
        if let Some(png) = cached(self) {
            return Ok(png);
        }
        let slot = tokio::time::timeout_at(deadline, self.thumbnail_slot.clone().acquire_owned())
            .await
            .map_err(|_| {
                ApiError(StatusCode::SERVICE_UNAVAILABLE, "the server is busy sending images; retry shortly".into())
            })?
            .map_err(|_| ApiError(StatusCode::INTERNAL_SERVER_ERROR, "the image decoder is closed".into()))?;
        if let Some(png) = cached(self) {
            return Ok(png);
        }
        let app = self.clone();
        let work = tokio::task::spawn_blocking(move || -> Result<Bytes> {
            let _slot = slot;
            let px = mvlt::data::image::thumbnail(app.data.pixels(row)?, app.cfg.thumbnail_side)?;
            Ok(Bytes::from(px.to_png()?))
        });
        let png = tokio::time::timeout_at(deadline, work)
            .await
            .map_err(|_| timed_out(self))?
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("decoding failed: {e}")))?
            .map_err(|e| {
                // The reason names files on this machine: it goes to the log, not to the client.
                tracing_note(&format!("catalogue row {row}: {e:#}"));
                ApiError(
                    StatusCode::NOT_FOUND,
                    format!("catalogue image {row} cannot be read (the server log says why)"),
                )
            })?;
        let mut cache = self.thumbnails.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= THUMBNAILS_KEPT {
            cache.pop_front();
        }
        cache.push_back((row, png.clone()));
        Ok(png)
    }
}

/// Thumbnails kept in memory (about 100 KB each at 512 px).
const THUMBNAILS_KEPT: usize = 64;

/// A note for the server's operator (standard error).
fn tracing_note(msg: &str) {
    eprintln!("note: {}", mvlt::files::printable(msg));
}

async fn score(State(app): State<Arc<App>>, req: Request) -> Result<Json<serde_json::Value>, ApiError> {
    app.require(Head::Itm)?;
    let (input, _slot) = read_input(&app, req).await?;
    let deadline = app.deadline();
    let bytes = input.image()?.ok_or_else(|| bad("image is required"))?;
    let texts: Vec<String> = match (input.text, input.texts) {
        (Some(t), None) => vec![t],
        (None, Some(ts)) if !ts.is_empty() => ts,
        _ => return Err(bad("give text (a string) or texts (a non-empty list of strings)")),
    };
    if texts.len() > app.cfg.max_texts {
        return Err(bad(format!(
            "{} texts in one request, over the limit of {}; split them over several requests",
            texts.len(),
            app.cfg.max_texts
        )));
    }
    let ids = app.encode(texts.clone(), deadline).await?;
    let img = app.image(bytes, deadline).await?;
    let Output::Itm(p) = app.run(Work::Pairs { head: Head::Itm, images: vec![img; ids.len()], ids }, deadline).await?
    else {
        unreachable!()
    };
    let results: Vec<_> = texts.iter().zip(p).map(|(t, p)| json!({"text": t, "match_probability": p})).collect();
    Ok(Json(json!({ "results": results })))
}

async fn classify(State(app): State<Arc<App>>, req: Request) -> Result<Json<serde_json::Value>, ApiError> {
    app.require(Head::Cls)?;
    let (input, _slot) = read_input(&app, req).await?;
    let deadline = app.deadline();
    let bytes = input.image()?.ok_or_else(|| bad("image is required"))?;
    let ids = match &input.text {
        Some(t) => app.encode(vec![t.clone()], deadline).await?.remove(0),
        None => Arc::new(app.text.encode("", app.max_len).map_err(|e| bad(e.to_string()))?.input_ids),
    };
    let img = app.image(bytes, deadline).await?;
    let Output::Cls(mut v) =
        app.run(Work::Pairs { head: Head::Cls, images: vec![img], ids: vec![ids] }, deadline).await?
    else {
        unreachable!()
    };
    let (main, sub) = v.pop().ok_or_else(|| ApiError(StatusCode::INTERNAL_SERVER_ERROR, "no output".into()))?;
    let k = input.top.unwrap_or(5).clamp(1, 1000);
    let list = |p: &[f32], names: Option<&Vec<String>>| {
        top_k(p, names, k).into_iter().map(|(n, p)| json!({"name": n, "probability": p})).collect::<Vec<_>>()
    };
    Ok(Json(
        json!({ "main": list(&main, app.classes.as_ref().map(|c| &c.main)), "sub": list(&sub, app.classes.as_ref().map(|c| &c.sub)) }),
    ))
}

async fn search(State(app): State<Arc<App>>, req: Request) -> Result<Json<serde_json::Value>, ApiError> {
    app.require(Head::Itm)?;
    let (input, _slot) = read_input(&app, req).await?;
    let deadline = app.deadline();
    let k = input.top.unwrap_or(10).clamp(1, 1000);
    let mut rows: Vec<usize> =
        filter_rows(app.data.as_ref(), input.category.as_deref(), input.subcategory.as_deref(), None)
            .into_iter()
            .filter(|&r| app.usable[r])
            .collect();
    let (text, image) = match (&input.text, input.image()?) {
        (Some(t), None) => (Some(app.encode(vec![t.clone()], deadline).await?.remove(0)), None),
        (None, Some(bytes)) => {
            rows = distinct_captions(app.data.as_ref(), &rows);
            (None, Some(app.image(bytes, deadline).await?))
        }
        _ => return Err(bad("give text (text -> products) or image (image -> captions), not both")),
    };
    // With an index, a text query's first stage picks the rows ITM scores (all of them, or at most
    // max_candidates, without one).
    let mut first_stage = None;
    if let (Some(fs), Some(ids)) = (&app.first_stage, &text) {
        let Output::Embedding(q) = app.run(Work::Embed { ids: ids.clone() }, deadline).await? else { unreachable!() };
        let (app2, candidates) = (app.clone(), std::mem::take(&mut rows));
        let indexed = candidates.len();
        let top = tokio::task::spawn_blocking(move || {
            let fs = app2.first_stage.as_ref().expect("checked above");
            fs.pick(&q, &candidates, app2.data.as_ref())
        })
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")))?;
        rows = top.iter().map(|&(r, _)| r).collect();
        first_stage = Some((top.into_iter().collect::<std::collections::HashMap<usize, f32>>(), indexed, fs.k));
    }
    rows.truncate(app.cfg.max_candidates);
    let candidates = rows.len();
    let Output::Search(mut hits) = app.run(Work::Search { text, image, rows }, deadline).await? else { unreachable!() };
    if let (Some(fs), Some((sim, ..))) = (&app.first_stage, &first_stage) {
        fs.order(&mut hits, |row| sim[&row]);
    }
    let recs = app.data.records();
    let hits: Vec<_> = hits
        .into_iter()
        .take(k)
        .map(|(row, score)| {
            let r = &recs[row];
            let similarity = first_stage.as_ref().map(|(sim, ..)| sim[&row]);
            json!({"row": row, "id": r.id, "product_id": r.product_id, "caption": r.caption, "category": r.category,
                   "subcategory": r.subcategory, "score": score, "similarity": similarity,
                   "image_url": format!("/v1/images/{row}")})
        })
        .collect();
    let mut answer = json!({ "candidates": candidates, "hits": hits });
    match (&app.first_stage, first_stage) {
        (Some(fs), Some((_, indexed, k))) => {
            answer["first_stage"] = json!({ "indexed": indexed, "k": k });
            answer["ranking"] = fs.ranking_json();
        }
        _ => {
            answer["ranking"] = json!({ "name": "itm", "description": "ITM over every candidate", "from": "no index" });
        }
    }
    Ok(Json(answer))
}

async fn catalogue_image(
    State(app): State<Arc<App>>,
    row: Result<UrlPath<usize>, axum::extract::rejection::PathRejection>,
) -> Result<Response, ApiError> {
    let UrlPath(row) = row.map_err(|e| {
        ApiError(StatusCode::NOT_FOUND, format!("no such catalogue image: {e} (rows are 0..{})", app.data.len()))
    })?;
    if row >= app.data.len() {
        return Err(ApiError(StatusCode::NOT_FOUND, format!("no catalogue row {row}")));
    }
    let png = app.thumbnail(row, app.deadline()).await?;
    Ok(([(header::CONTENT_TYPE, "image/png"), (header::CACHE_CONTROL, "max-age=3600")], png).into_response())
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

async fn metrics_text(State(app): State<Arc<App>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], app.metrics.render()).into_response()
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], include_str!("openapi.json")).into_response()
}

async fn page() -> Html<&'static str> {
    Html(include_str!("page.html"))
}

async fn fallback() -> ApiError {
    ApiError(StatusCode::NOT_FOUND, "no such endpoint (see /openapi.json)".into())
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{} is not allowed on {} (see /openapi.json)", req.method(), req.uri().path()),
    )
}

/// 414 and 431 as JSON, below hyper's own limits (whose answers have no body).
async fn bounded_head(req: Request, next: axum::middleware::Next) -> Response {
    let uri = req.uri().to_string().len();
    if uri > MAX_URI_BYTES {
        return ApiError(
            StatusCode::URI_TOO_LONG,
            format!("the request URI is {uri} bytes, over the limit of {MAX_URI_BYTES}"),
        )
        .into_response();
    }
    let headers = req.headers();
    let bytes: usize = headers.iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum();
    if headers.len() > MAX_HEADER_COUNT || bytes > MAX_HEADER_BYTES {
        return ApiError(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!(
                "{} headers of {bytes} bytes, over the limit of {MAX_HEADER_COUNT} headers or {MAX_HEADER_BYTES} bytes",
                headers.len()
            ),
        )
        .into_response();
    }
    next.run(req).await
}

/// Record status and latency of every request.
async fn observe(
    State(app): State<Arc<App>>,
    path: Option<MatchedPath>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let t0 = Instant::now();
    let endpoint = path.map(|p| p.as_str().to_string()).unwrap_or_else(|| "other".into());
    let resp = next.run(req).await;
    app.metrics.record_request(&endpoint, resp.status().as_u16(), t0.elapsed().as_secs_f64());
    resp
}

/// Answer a connection over its address's share with 503 and close it. What the client sends
/// meanwhile is read and dropped (at most [`DRAIN_BYTES`], for at most a second), so that a client
/// that writes its whole request before reading (most do) reads the 503 instead of a reset.
async fn refuse_connection(mut stream: tokio::net::TcpStream, share: usize) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = json!({ "error": format!("your address already holds {share} connections to this server; close some or reuse them") })
        .to_string();
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(answer.as_bytes()).await;
        let _ = stream.shutdown().await;
        let (mut buf, mut seen) = ([0u8; 16 << 10], 0);
        while let Ok(n @ 1..) = stream.read(&mut buf).await {
            seen += n;
            if seen > DRAIN_BYTES {
                break;
            }
        }
    })
    .await;
}

/// Everything the server holds, ready to serve: the model thread started, the catalogue
/// preprocessed.
pub struct Server {
    app: Arc<App>,
}

impl Server {
    /// With `first_stage`, text searches go through the index (the weights need the ITC head).
    pub fn new<B: Backend>(
        model: Model<B>,
        data: Arc<dyn Dataset>,
        cfg: ServeConfig,
        first_stage: Option<FirstStage>,
    ) -> Result<Server> {
        if first_stage.is_some() && !model.config.heads.itc {
            anyhow::bail!("{}", mvlt::infer::NO_ITC_HEAD);
        }
        // A server returns freed memory promptly (see `mvlt::memory`), from its first
        // allocation: preprocessing a catalogue of large photos must not leave its peak behind.
        mvlt::memory::keep_freed_memory(false);
        let recs = data.records();
        let size = model.image_size;
        let pb = mvlt::progress::progress_bar(recs.len() as u64, "catalogue");
        let images: Vec<Option<Vec<u8>>> = (0..recs.len())
            .into_par_iter()
            .map(|i| {
                let out = data.pixels(i).and_then(|p| preprocess(&p, size)).map(|p| p.chw_u8);
                pb.inc(1);
                out.map_err(|e| eprintln!("note: catalogue row {i} ({}) left out: {e:#}", recs[i].id)).ok()
            })
            .collect();
        pb.finish_and_clear();
        let usable: Vec<bool> = images.iter().map(Option::is_some).collect();
        let captions = recs
            .iter()
            .map(|r| model.text.encode(&r.caption, model.config.num_text_tokens).map(|e| Arc::new(e.input_ids)))
            .collect::<Result<Vec<_>>>()?;
        let catalogue =
            Arc::new(Catalogue { images: images.into_iter().map(Option::unwrap_or_default).collect(), captions });
        let metrics = Arc::new(Metrics::default());
        let (text, max_len, image_size, classes, heads) = (
            model.text.clone(),
            model.config.num_text_tokens,
            model.image_size,
            model.classes.clone(),
            model.config.heads,
        );
        let queue = batcher::start(
            model,
            catalogue,
            BatcherConfig { queue: cfg.queue, max_batch: cfg.max_batch, window: cfg.window },
            metrics.clone(),
        );
        mvlt::memory::release_freed();
        let decode_slots = Arc::new(tokio::sync::Semaphore::new(cfg.decode_slots.max(1)));
        let inflight = Arc::new(tokio::sync::Semaphore::new(cfg.max_inflight.max(1)));
        Ok(Server {
            app: Arc::new(App {
                queue,
                text,
                max_len,
                image_size,
                classes,
                data,
                usable,
                heads,
                decode_slots,
                inflight,
                clients: Clients::new(cfg.max_connections_per_client, cfg.max_inflight_per_client),
                thumbnail_slot: Arc::new(tokio::sync::Semaphore::new(1)),
                thumbnails: Default::default(),
                metrics,
                cfg,
                first_stage,
            }),
        })
    }

    pub fn router(&self) -> Router {
        let app = self.app.clone();
        Router::new()
            .route("/", get(page))
            .route("/healthz", get(healthz))
            .route("/metrics", get(metrics_text))
            .route("/openapi.json", get(openapi))
            .route("/v1/score", post(score))
            .route("/v1/classify", post(classify))
            .route("/v1/search", post(search))
            .route("/v1/images/{row}", get(catalogue_image))
            .fallback(fallback)
            .method_not_allowed_fallback(method_not_allowed)
            .layer(axum::middleware::from_fn_with_state(Arc::new(self.app.cfg.access.clone()), access::guard))
            .layer(axum::middleware::from_fn(bounded_head))
            .layer(axum::middleware::from_fn_with_state(app.clone(), observe))
            // The body limit is enforced while reading (413 as JSON); this stops axum's own
            // 2 MB default from answering first.
            .layer(axum::extract::DefaultBodyLimit::disable())
            .with_state(app)
    }

    /// Bind `addr` (port 0: any free port); returns the listener and the address it got.
    pub async fn bind(addr: SocketAddr) -> Result<(tokio::net::TcpListener, SocketAddr)> {
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
        let bound = listener.local_addr()?;
        Ok((listener, bound))
    }

    /// Serve until `shutdown` resolves; in-flight requests finish first (for at most the request
    /// timeout). At most `max_connections` connections are open at once; each must send its
    /// headers within `header_timeout`, which also closes idle keep-alive connections.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        use hyper_util::rt::{TokioIo, TokioTimer};
        let router = self.router();
        let cfg = self.app.cfg.clone();
        let metrics = self.app.metrics.clone();
        let slots = Arc::new(tokio::sync::Semaphore::new(cfg.max_connections.max(1)));
        let clients = self.app.clients.clone();
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(cfg.header_timeout)
            .max_buf_size(HYPER_MAX_BUF)
            .max_headers(HYPER_MAX_HEADERS);
        tokio::pin!(shutdown);
        loop {
            let slot = tokio::select! {
                s = slots.clone().acquire_owned() => s.context("connection slots closed")?,
                _ = &mut shutdown => break,
            };
            let (stream, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors and the like: wait a little rather than spin.
                        eprintln!("note: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = &mut shutdown => break,
            };
            // One address gets its share of the connections; the rest are told so and closed at
            // once, so that they neither wait in the backlog nor crowd out other clients.
            let Some(held) = clients.connect(peer.ip()) else {
                drop(slot);
                tokio::spawn(refuse_connection(stream, clients.max_connections()));
                continue;
            };
            let ip = ClientIp(peer.ip());
            let service = hyper_util::service::TowerToHyperService::new(tower::ServiceExt::map_request(
                router.clone(),
                move |mut req: axum::http::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(ip);
                    req
                },
            ));
            let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
            let metrics = metrics.clone();
            metrics.connections.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tokio::spawn(async move {
                let _ = conn.await;
                metrics.connections.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                drop((slot, held));
            });
        }
        drop(listener);
        if tokio::time::timeout(cfg.timeout + cfg.body_timeout, graceful.shutdown()).await.is_err() {
            eprintln!("note: some connections were still open at shutdown and were closed");
        }
        Ok(())
    }
}
