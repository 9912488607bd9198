//! Where the shared reference fixtures live: `$MVLT_FIXTURES`, else `../shared/fixtures/reference`.
//! When they are missing, parity tests fail under CI (CI=true) and are skipped with a message
//! otherwise.
#![allow(dead_code)]
use std::path::{Path, PathBuf};

pub fn fixtures() -> Option<PathBuf> {
    let dir = std::env::var_os("MVLT_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/reference"));
    if dir.join("small_io.json").exists() {
        return Some(dir);
    }
    if std::env::var("CI").map(|v| v == "true").unwrap_or(false) {
        panic!("reference fixtures not found at {} (set MVLT_FIXTURES)", dir.display());
    }
    eprintln!("SKIPPED: reference fixtures not found at {} (set MVLT_FIXTURES)", dir.display());
    None
}

/// Tests of one test binary that draw from the CPU backend's random generator take turns: it is
/// process-wide, so building a model in one test would perturb another's seeded one.
pub fn backend_turn() -> std::sync::MutexGuard<'static, ()> {
    static BACKEND: std::sync::Mutex<()> = std::sync::Mutex::new(());
    BACKEND.lock().unwrap_or_else(|p| p.into_inner())
}

/// A fresh temporary folder for one test, removed when the value is dropped (set
/// `MVLT_KEEP_TEST_DIRS=1` to keep it for a look after a failure). Derefs to its path.
pub struct TempDir(tempfile::TempDir);

pub fn tempdir(name: &str) -> TempDir {
    let keep = std::env::var_os("MVLT_KEEP_TEST_DIRS").is_some();
    TempDir(tempfile::Builder::new().prefix(&format!("mvlt-test-{name}-")).disable_cleanup(keep).tempdir().unwrap())
}

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        self.0.path()
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        self
    }
}

/// Run the `mvlt` binary with `args`.
pub fn mvlt(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_mvlt")).args(args).output().expect("run mvlt")
}

/// Standard output and standard error of a run, together.
pub fn text(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// The nano PVLT of the training tests: one block per stage, widths 8-16.
pub const NANO_MODEL: &str = r#"{"embed_dims": [8, 16, 16, 16], "num_heads": [1, 2, 2, 2], "mlp_ratios": [2, 2, 2, 2], "depths": [1, 1, 1, 1],
    "token_hidden_size": 16, "t2i_channel": 4}"#;

/// [`NANO_MODEL`] written to `dir/nano.json`.
pub fn nano_model(dir: &Path) -> PathBuf {
    let p = dir.join("nano.json");
    std::fs::write(&p, NANO_MODEL).unwrap();
    p
}

/// Recipe overrides (`--set KEY=VALUE`), each value written as TOML by the toml crate, so paths
/// and strings need no hand quoting.
#[derive(Default)]
pub struct Overrides(Vec<String>);

impl Overrides {
    pub fn set(mut self, key: &str, value: impl Into<toml::Value>) -> Self {
        self.0.push(format!("{key}={}", value.into()));
        self
    }

    pub fn path(self, key: &str, path: &Path) -> Self {
        self.set(key, path.display().to_string())
    }

    /// Overrides already in `key=value` form (as a user passes them to `--set`).
    pub fn raw(mut self, items: &[&str]) -> Self {
        self.0.extend(items.iter().map(|s| s.to_string()));
        self
    }

    pub fn build(self) -> Vec<String> {
        self.0
    }
}

/// A model with every head (the contrastive one included), trained for a few steps on a small
/// synthetic catalogue.
pub fn trained_model(base: &Path) -> (PathBuf, PathBuf) {
    let data = base.join("catalogue");
    mvlt::data::synth::write_catalog(&data, 60, 5, 32, |_| {}).unwrap();
    use mvlt::train::config::{DataSource, ModelSpec, TrainConfigBuilder};
    let config = TrainConfigBuilder::recipe("cpu-pretrain")
        .unwrap()
        .with(|c| {
            c.model = ModelSpec::File(nano_model(base));
            c.data = DataSource::Path(data.clone());
            c.image_size = 32;
            c.max_len = 16;
            c.batch_size = 4;
            c.max_steps = Some(6);
            c.with_cls = true;
            c.with_itc = true;
            c.workers = 1;
            c.val_batches = 1;
        })
        .build()
        .unwrap();
    let s = mvlt::device::run_on(
        mvlt::device::DeviceSpec::Cpu,
        mvlt::train::trainer::TrainRun { config, dir: base.join("run"), resume: false, control: run_control() },
    )
    .unwrap();
    (s.final_weights.unwrap(), data)
}

/// `mvlt serve` on a free loopback port (its first line of output says which); killed on drop.
pub struct ServerProcess {
    child: std::process::Child,
    /// `127.0.0.1:PORT`
    pub addr: String,
    /// `http://127.0.0.1:PORT`
    pub url: String,
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn start_server(weights: &Path, catalog: &Path, extra: &[&str]) -> ServerProcess {
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_mvlt"))
        .args(["serve", "--weights", weights.to_str().unwrap(), "--catalog", catalog.to_str().unwrap()])
        .args(["--addr", "127.0.0.1:0"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line: {line}"))
        .to_string();
    let addr = url.strip_prefix("http://").unwrap_or(&url).to_string();
    ServerProcess { child, addr, url }
}

/// POST `body` with `ctype`: (status, JSON answer).
#[allow(dead_code)]
pub fn post(url: &str, ctype: &str, body: &[u8]) -> (u16, serde_json::Value) {
    let (st, text) = match ureq::post(url).set("Content-Type", ctype).send_bytes(body) {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(c, r)) => (c, r.into_string().unwrap()),
        Err(e) => panic!("{e}"),
    };
    (st, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}")))
}

/// The control every training run of a test binary shares: one turn, so runs in parallel test
/// threads take turns at burn's process-wide random generator and each stays deterministic.
#[allow(dead_code)]
pub fn run_control() -> mvlt::train::trainer::RunControl {
    static TURN: std::sync::OnceLock<mvlt::train::trainer::RunControl> = std::sync::OnceLock::new();
    TURN.get_or_init(Default::default).clone()
}

/// A synthetic catalogue written once per test process (`images` at `size` px from `seed`), in
/// cargo's per-target scratch folder under `name`: statics are never dropped, so a self-removing
/// temporary folder would be left behind; each test process rewrites it.
pub fn scratch_catalogue(name: &str, images: usize, seed: u64, size: u32) -> PathBuf {
    static MADE: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let mut made = MADE.lock().unwrap_or_else(|p| p.into_inner());
    if !made.iter().any(|m| m == name) {
        let _ = std::fs::remove_dir_all(&d);
        mvlt::data::synth::write_catalog(&d, images, seed, size, |_| {}).unwrap();
        made.push(name.to_string());
    }
    d
}
