//! The web page end to end in headless Chromium (Debian's `chromium`, driven over the DevTools
//! protocol): type a description and get the product grid; choose an image and get captions and
//! categories. Also the HTTP API's error answers. `.ci/run` installs Chromium; elsewhere the test
//! is skipped with a message when it is missing.
mod common;
use common::{post, tempdir, trained_model, ServerProcess};
use headless_chrome::{Browser, LaunchOptions};
use std::path::PathBuf;
use std::time::Duration;

fn chromium() -> Option<PathBuf> {
    let p = std::env::var_os("MVLT_CHROMIUM").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    if p.exists() {
        return Some(p);
    }
    if std::env::var("CI").map(|v| v == "true").unwrap_or(false) {
        panic!("Chromium not found at {} (.ci/run installs Debian's chromium; MVLT_CHROMIUM overrides)", p.display());
    }
    eprintln!("SKIPPED: Chromium not found at {} (set MVLT_CHROMIUM)", p.display());
    None
}

/// `mvlt serve` with a 1 MiB body limit.
fn start_server(weights: &std::path::Path, catalog: &std::path::Path, extra: &[&str]) -> ServerProcess {
    common::start_server(weights, catalog, &[&["--max-body-mib", "1"], extra].concat())
}

#[test]
fn api_answers_and_errors() {
    let base = tempdir("api");
    let (weights, data) = trained_model(&base);
    let s = start_server(&weights, &data, &[]);
    let img =
        std::fs::read(data.join("images").read_dir().unwrap().flatten().map(|e| e.path()).min().unwrap()).unwrap();
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(&img);

    let (st, v) = post(
        &format!("{}/v1/score", s.url),
        "application/json",
        serde_json::json!({"image": b64, "texts": ["a red shirt", "black boots"]}).to_string().as_bytes(),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["results"].as_array().unwrap().len(), 2);
    let (st, v) = post(
        &format!("{}/v1/classify", s.url),
        "application/json",
        serde_json::json!({"image": format!("data:image/png;base64,{b64}"), "top": 2}).to_string().as_bytes(),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["sub"].as_array().unwrap().len(), 2);
    let (st, v) = post(&format!("{}/v1/search", s.url), "application/json", br#"{"text": "a blue dress", "top": 3}"#);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["hits"].as_array().unwrap().len(), 3);
    assert_eq!(v["candidates"], 60);

    // Multipart with the image as a file part.
    let boundary = "XBOUNDARYX";
    let mut body = format!("--{boundary}\r\nContent-Disposition: form-data; name=\"text\"\r\n\r\na green coat\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\nContent-Type: image/png\r\n\r\n").into_bytes();
    body.extend_from_slice(&img);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let (st, v) = post(&format!("{}/v1/score", s.url), &format!("multipart/form-data; boundary={boundary}"), &body);
    assert_eq!(st, 200, "{v}");

    for (ctype, body, want) in [
        ("text/plain", b"x".to_vec(), 415),
        // Far over the 1 MiB limit, so the client is still writing when the server has seen enough:
        // the server must read on (and discard) for the client to get the 413 at all.
        ("application/json", vec![b' '; 16 << 20], 413),
        (&format!("multipart/form-data; boundary={boundary}"), [&body[..], &vec![b' '; 2 << 20]].concat(), 413),
        ("application/json", br#"{"image": "aGVsbG8=", "text": "a shirt"}"#.to_vec(), 400),
        ("application/json", serde_json::json!({"image": b64, "text": " "}).to_string().into_bytes(), 400),
        ("application/json", br#"{"image": 5}"#.to_vec(), 400),
        ("application/json", br#"{"imag": "x"}"#.to_vec(), 400),
    ] {
        let (st, v) = post(&format!("{}/v1/score", s.url), ctype, &body);
        assert_eq!(st, want, "{ctype}: {v}");
        assert!(v["error"].is_string(), "{v}");
    }
    assert_eq!(ureq::get(&format!("{}/healthz", s.url)).call().unwrap().status(), 200);
    let metrics = ureq::get(&format!("{}/metrics", s.url)).call().unwrap().into_string().unwrap();
    assert!(metrics.contains("mvlt_requests_total{endpoint=\"/v1/score\",status=\"415\"} 1"), "{metrics}");
    assert!(metrics.contains("mvlt_pairs_total"), "{metrics}");
    let openapi: serde_json::Value = ureq::get(&format!("{}/openapi.json", s.url)).call().unwrap().into_json().unwrap();
    assert!(openapi["paths"]["/v1/search"].is_object());
    drop(s);

    // A request that outlives the timeout gets 504 (the model thread is never that fast).
    let slow = start_server(&weights, &data, &["--timeout", "0.000001"]);
    let (st, v) = post(&format!("{}/v1/search", slow.url), "application/json", br#"{"text": "a blue dress"}"#);
    assert_eq!(st, 504, "{v}");
    assert!(v["error"].as_str().unwrap().contains("no answer within"), "{v}");
}

#[test]
fn web_page_in_headless_chromium() {
    let Some(chrome) = chromium() else { return };
    let base = tempdir("web");
    let (weights, data) = trained_model(&base);
    let s = start_server(&weights, &data, &[]);
    let profile = base.join("chrome-profile");
    let args: Vec<&std::ffi::OsStr> = [
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-quic",
    ]
    .iter()
    .map(std::ffi::OsStr::new)
    .collect();
    let browser = Browser::new(LaunchOptions {
        path: Some(chrome),
        headless: true,
        sandbox: false,
        window_size: Some((1200, 900)),
        user_data_dir: Some(profile),
        args,
        idle_browser_timeout: Duration::from_secs(120),
        ..LaunchOptions::default()
    })
    .unwrap();
    let tab = browser.new_tab().unwrap();
    tab.navigate_to(&s.url).unwrap().wait_until_navigated().unwrap();
    tab.wait_for_element("#query").unwrap().click().unwrap();
    tab.type_str("red striped cotton t-shirt").unwrap().press_key("Enter").unwrap();
    let cards = tab.wait_for_elements(".card").unwrap();
    assert_eq!(cards.len(), 12, "the top 12 products");
    let status = tab.find_element("#status").unwrap().get_inner_text().unwrap();
    assert!(status.contains("best of 60 products"), "{status}");
    let js = |expr: &str| -> serde_json::Value {
        tab.evaluate(expr, false).unwrap().value.unwrap_or(serde_json::Value::Null)
    };
    let scores: Vec<f64> = serde_json::from_str::<Vec<String>>(
        js("JSON.stringify([...document.querySelectorAll('.card .score')].map(e => e.textContent))").as_str().unwrap(),
    )
    .unwrap()
    .iter()
    .map(|s| s.parse().unwrap())
    .collect();
    assert_eq!(scores.len(), 12);
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "best first: {scores:?}");
    // Images load from the server, through fetch (wait for them, then check every one decoded).
    for _ in 0..200 {
        if js("[...document.querySelectorAll('.card img')].every(i => i.complete && i.naturalWidth > 0)")
            == serde_json::Value::Bool(true)
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let loaded = js("[...document.querySelectorAll('.card img')].every(i => i.complete && i.naturalWidth > 0)");
    let shot = tab
        .capture_screenshot(headless_chrome::protocol::cdp::Page::CaptureScreenshotFormatOption::Png, None, None, true)
        .unwrap();
    std::fs::write(base.join("serve_page.png"), &shot).unwrap();
    if let Ok(dir) = std::env::var("MVLT_SCREENSHOT_DIR") {
        std::fs::write(PathBuf::from(dir).join("serve_page.png"), &shot).unwrap();
    }
    assert_eq!(loaded, serde_json::Value::Bool(true), "every product image loaded");

    // Choosing an image file: best captions and predicted categories.
    let img = data.join("images").read_dir().unwrap().flatten().map(|e| e.path()).min().unwrap();
    tab.find_element("#file").unwrap().set_input_files(&[img.to_str().unwrap()]).unwrap();
    let captions = tab.wait_for_elements("#captions li").unwrap();
    assert_eq!(captions.len(), 8);
    let classes = tab.wait_for_elements("#classes li").unwrap();
    assert_eq!(classes.len(), 6, "top 3 main + top 3 sub");
    let first = js("document.querySelector('#classes li').textContent");
    assert!(first.as_str().unwrap().starts_with("main: "), "{first}");
}
