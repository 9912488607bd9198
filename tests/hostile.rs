//! Hostile input, as a careful user and a hostile client would send it: every case must get a
//! clear error (or be skipped and reported) — no panic, no unbounded memory or time, nothing read
//! from outside the folders it belongs to. The command-line cases are one table; the server cases
//! run over HTTP on loopback, each bounded in count and time.
mod common;
use common::{mvlt, start_server, tempdir, text, ServerProcess};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn hostile(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/hostile").join(name)
}

/// The trained nano model and its catalogue, made once per test process.
fn model() -> &'static (PathBuf, PathBuf) {
    static ONCE: std::sync::OnceLock<(PathBuf, PathBuf)> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("hostile-model");
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        common::trained_model(&base)
    })
}

/// A copy of the trained weights with one value made NaN.
fn nan_weights(dir: &Path) -> PathBuf {
    use mvlt::model::weights::{write_safetensors, StateDict};
    let (weights, _) = model();
    let sd = StateDict::read(weights).unwrap();
    let mut tensors: Vec<(String, burn::tensor::TensorData)> = sd.tensors.into_iter().collect();
    let (_, d) = tensors.iter_mut().find(|(k, _)| k == "itm_head.linear.weight").unwrap();
    let mut v: Vec<f32> = d.to_vec().unwrap();
    v[3] = f32::NAN;
    *d = burn::tensor::TensorData::new(v, d.shape.clone());
    let out = dir.join("nan.safetensors");
    write_safetensors(&out, &tensors, sd.metadata).unwrap();
    std::fs::copy(weights.parent().unwrap().join("vocab.txt"), dir.join("vocab.txt")).unwrap();
    out
}

/// Every bad command-line input, with the words its error must contain. Each runs the binary.
#[test]
fn bad_command_line_inputs_get_clear_errors() {
    let tmp = tempdir("hostile-cli");
    let (weights, data) = model();
    let (w, vocab) = (weights.to_str().unwrap(), data.join("vocab.txt"));
    let vocab = vocab.to_str().unwrap();
    // A 2 GB sparse file: no disk used, but a reader that reads first would take 2 GB.
    let sparse = tmp.join("sparse.png");
    std::fs::File::create(&sparse).unwrap().set_len(2 << 30).unwrap();
    // A PNG whose header claims 16000 x 16000 pixels.
    let huge = tmp.join("huge.png");
    std::fs::write(&huge, mvlt::data::image::png_claiming(16000, 16000)).unwrap();
    let zero_catalogue = tmp.join("zero.jsonl");
    std::os::unix::fs::symlink("/dev/zero", &zero_catalogue).unwrap();
    let nan = nan_weights(&tmp);
    let fifo = tmp.join("fifo.png");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let converted = tmp.join("converted.safetensors");
    let oversized = hostile("oversized_tensor.pth");
    let (sparse, huge, zero_catalogue, nan, fifo, converted, oversized) = (
        sparse.to_str().unwrap(),
        huge.to_str().unwrap(),
        zero_catalogue.to_str().unwrap(),
        nan.to_str().unwrap(),
        fifo.to_str().unwrap(),
        converted.to_str().unwrap(),
        oversized.to_str().unwrap(),
    );
    let data_s = data.to_str().unwrap();

    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        ("a .pth tensor claiming 4 GB", vec!["inspect", oversized], "more than the whole file"),
        ("converting it", vec!["convert", oversized, converted, "--config", "tiny"], "more than the whole file"),
        (
            "a 2 GB sparse image",
            vec!["score", "--weights", w, "--image", sparse, "--text", "a shirt"],
            "over the limit of 134217728 bytes",
        ),
        ("a FIFO as image", vec!["score", "--weights", w, "--image", fifo, "--text", "a shirt"], "not a regular file"),
        (
            "a 16000x16000 image",
            vec!["score", "--weights", w, "--image", huge, "--text", "a shirt"],
            "over the limit of 64000000 pixels",
        ),
        ("/dev/zero as vocabulary", vec!["tokenize", "--vocab", "/dev/zero", "x"], "not a regular file"),
        ("/dev/zero as catalogue", vec!["data", "info", "--data", zero_catalogue], "not a regular file"),
        ("T = 2^64 - 1", vec!["tokenize", "--vocab", vocab, "--max-len", "18446744073709551615", "x"], "between 2"),
        ("T = 1e9", vec!["tokenize", "--vocab", vocab, "--max-len", "1e9", "x"], "not a whole number"),
        ("T = 513", vec!["tokenize", "--vocab", vocab, "--max-len", "513", "x"], "between 2"),
        ("--val-fraction 2", vec!["data", "info", "--data", data_s, "--val-fraction", "2"], "not a fraction"),
        ("--val-fraction NaN", vec!["data", "info", "--data", data_s, "--val-fraction", "NaN"], "not a fraction"),
        ("--val-fraction -1", vec!["data", "info", "--data", data_s, "--val-fraction=-1"], "not a fraction"),
        (
            "weights holding NaN",
            vec!["score", "--weights", nan, "--image", sparse, "--text", "x"],
            "tensor 'itm_head.linear.weight' holds 1 NaN",
        ),
        ("a text file as weights", vec!["inspect", vocab], "is not a weights file"),
    ];
    let mut failures = vec![];
    for (name, args, want) in &cases {
        let t0 = Instant::now();
        let o = mvlt(args);
        let out = text(&o);
        let panicked = out.contains("panicked");
        if o.status.success() || panicked || !out.contains(want) {
            failures.push(format!("{name}: exit {:?}, expected '{want}' in:\n{out}", o.status.code()));
        }
        eprintln!(
            "{name}: exit {:?} in {:.2} s: {}",
            o.status.code(),
            t0.elapsed().as_secs_f64(),
            out.lines().last().unwrap_or("")
        );
    }
    assert!(!Path::new(converted).exists(), "a refused conversion writes nothing");
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n\n"));
}

/// A catalogue's rows: an image that is a symlink out of its folder, a path that leaves and comes
/// back (fine), a duplicate id, a runaway line. The bad rows are skipped and reported; the good
/// ones stay.
#[test]
fn catalogue_rows_stay_inside_and_unique() {
    use mvlt::data::dataset::{Dataset, FileDataset, MAX_LINE};
    let tmp = tempdir("hostile-catalogue");
    let cat = tmp.join("cat");
    std::fs::create_dir_all(cat.join("images")).unwrap();
    let (_, data) = model();
    let some_image = data.join("images").read_dir().unwrap().flatten().map(|e| e.path()).min().unwrap();
    std::fs::copy(&some_image, cat.join("images/a.png")).unwrap();
    std::fs::copy(&some_image, tmp.join("outside.png")).unwrap();
    std::os::unix::fs::symlink(tmp.join("outside.png"), cat.join("images/link.png")).unwrap();
    let row = |id: &str, image: &str| {
        format!(
            r#"{{"id": "{id}", "image": "{image}", "caption": "a red shirt", "category": "TOPS", "subcategory": "SHIRTS"}}"#
        )
    };
    let lines = [
        row("1", "images/a.png"),
        row("2", "images/../images/a.png"),
        row("3", "images/link.png"),
        row("1", "images/a.png"),
        format!(r#"{{"id": "4", "caption": "{}"}}"#, "x".repeat(MAX_LINE + 10)),
        row("5", "../outside.png"),
    ];
    std::fs::write(cat.join("catalog.jsonl"), lines.join("\n")).unwrap();
    let ds = FileDataset::open_jsonl(&cat.join("catalog.jsonl")).unwrap();
    let ids: Vec<&str> = ds.records().iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, vec!["1", "2"]);
    let skipped: Vec<String> = ds.skips().skipped.iter().map(|(r, w)| format!("{r}: {w}")).collect();
    assert_eq!(skipped.len(), 4, "{skipped:#?}");
    assert!(skipped[0].contains("line 3") && skipped[0].contains("escapes the catalogue folder"), "{skipped:#?}");
    assert!(skipped[1].contains("line 4") && skipped[1].contains("duplicate id '1' (first on line 1)"), "{skipped:#?}");
    assert!(skipped[2].contains("line 5") && skipped[2].contains("longer than"), "{skipped:#?}");
    assert!(skipped[3].contains("line 6") && skipped[3].contains("escapes the catalogue folder"), "{skipped:#?}");
    // A file swapped for a symlink after opening is refused at read time too.
    std::fs::remove_file(cat.join("images/a.png")).unwrap();
    std::os::unix::fs::symlink(tmp.join("outside.png"), cat.join("images/a.png")).unwrap();
    let e = format!("{:#}", ds.pixels(0).unwrap_err());
    assert!(e.contains("escapes the catalogue folder"), "{e}");
}

/// `mvlt serve` with 1 s header and body timeouts.
fn serve(weights: &Path, catalog: &Path, extra: &[&str]) -> ServerProcess {
    start_server(weights, catalog, &[&["--header-timeout", "1", "--body-timeout", "1"], extra].concat())
}

/// One raw HTTP/1.1 exchange: send `request`, read until the server closes or 10 s pass.
/// Returns (status, body) — status 0 if the server closed without answering.
fn raw(addr: &str, request: &[u8]) -> (u16, String) {
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = c.write_all(request);
    let mut out = vec![];
    let _ = c.read_to_end(&mut out);
    let s = String::from_utf8_lossy(&out).to_string();
    let status = s.split_whitespace().nth(1).and_then(|x| x.parse().ok()).unwrap_or(0);
    let body = s.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

fn post_json(addr: &str, path: &str, body: &str) -> (u16, String) {
    raw(addr, format!("POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).as_bytes())
}

fn json_error(body: &str) -> Option<String> {
    // Chunked bodies carry a size line first; find the JSON object.
    let start = body.find('{')?;
    let end = body.rfind('}')?;
    serde_json::from_str::<serde_json::Value>(&body[start..=end]).ok()?.get("error")?.as_str().map(String::from)
}

/// The server's hostile cases: each answered with the right status and a JSON error, in bounded
/// time, and slow clients cut off by the header and body timeouts.
#[test]
fn hostile_requests_get_json_errors_and_slow_clients_are_cut_off() {
    use base64::Engine;
    let (weights, data) = model();
    let s = serve(weights, data, &["--max-body-mib", "8", "--max-texts", "64"]);
    let a = s.addr.as_str();
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let img =
        std::fs::read(data.join("images").read_dir().unwrap().flatten().map(|e| e.path()).min().unwrap()).unwrap();
    let long_uri = format!("GET /v1/images/{} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", "9".repeat(10_000));
    let many_headers = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{}\r\n",
        (0..80).map(|i| format!("X-H{i}: v\r\n")).collect::<String>()
    );
    let cases: Vec<(&str, (u16, String), u16, &str)> = vec![
        ("12,000 texts", post_json(a, "/v1/score", &serde_json::json!({"image": b64(&img), "texts": vec!["a shirt"; 12_000]}).to_string()), 400, "over the limit of 64"),
        ("a 7 MB text", post_json(a, "/v1/score", &serde_json::json!({"image": b64(&img), "text": "red ".repeat(7 << 18)}).to_string()), 400, "over the limit of 65536 bytes"),
        ("a 16000x16000 PNG", post_json(a, "/v1/score", &serde_json::json!({"image": b64(&mvlt::data::image::png_claiming(16000, 16000)), "text": "x"}).to_string()), 400, "pixels"),
        ("row -1", raw(a, b"GET /v1/images/-1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"), 404, "no such catalogue image"),
        ("DELETE", raw(a, b"DELETE /v1/score HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"), 405, "DELETE is not allowed"),
        ("a 10 KB URI", raw(a, long_uri.as_bytes()), 414, "URI"),
        ("80 headers", raw(a, many_headers.as_bytes()), 431, "headers"),
        ("a body that stops", raw(a, b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"text\":"), 408, "did not arrive"),
    ];
    let mut failures = vec![];
    for (name, (status, body), want, words) in &cases {
        let err = json_error(body);
        eprintln!("{name}: {status} {err:?}");
        if status != want || !err.as_deref().is_some_and(|e| e.contains(words)) {
            failures.push(format!("{name}: want {want} with '{words}', got {status} {body}"));
        }
    }
    // Slow clients: connect only, partial headers, idle after a request; closed within the
    // 1 s header timeout (allow 5 s for a loaded machine).
    for (name, send) in [
        ("connect only", &b""[..]),
        ("partial headers", b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Ty"),
        ("idle keep-alive", b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"),
    ] {
        let t0 = Instant::now();
        let (_, _) = raw(a, send);
        let secs = t0.elapsed().as_secs_f64();
        eprintln!("{name}: closed after {secs:.2} s");
        if secs > 5.0 {
            failures.push(format!("{name}: still open after {secs:.1} s"));
        }
    }
    let (st, _) = raw(a, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert_eq!(st, 200, "the server is still up");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Weights without recognition heads: /v1/classify is the client's error (422), naming the
/// weights that would do. And work that timed out is dropped by the model thread, not finished.
#[test]
fn missing_heads_are_422_and_abandoned_work_is_dropped() {
    use mvlt::model::weights::{load_state_dict, save_model, StateDict};
    let tmp = tempdir("hostile-heads");
    let (weights, data) = model();
    let sd = StateDict::read(weights).unwrap();
    let mut cfg = sd.stored_config().unwrap().unwrap();
    cfg.heads.cls = false;
    let (net, _) =
        load_state_dict(mvlt::model::Pvlt::<mvlt::device::Cpu>::new(&cfg, &Default::default()), &sd, false).unwrap();
    let no_cls = tmp.join("no_cls.safetensors");
    save_model(&net, &cfg, &no_cls).unwrap();
    std::fs::copy(weights.parent().unwrap().join("vocab.txt"), tmp.join("vocab.txt")).unwrap();
    use base64::Engine;
    let img = base64::engine::general_purpose::STANDARD.encode(
        std::fs::read(data.join("images").read_dir().unwrap().flatten().map(|e| e.path()).min().unwrap()).unwrap(),
    );
    let s = serve(&no_cls, data, &[]);
    let (st, body) = post_json(&s.addr, "/v1/classify", &serde_json::json!({"image": img}).to_string());
    assert_eq!(st, 422, "{body}");
    assert!(
        json_error(&body).unwrap().contains("use fine-tuned weights (mvlt finetune's final/model.safetensors)"),
        "{body}"
    );
    drop(s);

    // Every request times out at once (1 us): the client gets 504, the model thread drops the work.
    let s = serve(weights, data, &["--timeout", "0.000001"]);
    let texts = vec!["a red shirt"; 64];
    for _ in 0..3 {
        let (st, body) =
            post_json(&s.addr, "/v1/score", &serde_json::json!({"image": img, "texts": texts}).to_string());
        assert_eq!(st, 504, "{body}");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, metrics) = raw(&s.addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let abandoned: u64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix("mvlt_abandoned_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if abandoned >= 3 {
            break;
        }
        assert!(Instant::now() < deadline, "the model thread did not drop the timed-out work:\n{metrics}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
