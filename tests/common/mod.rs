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

/// A model with every head, trained for a few steps on a small synthetic catalogue.
pub fn trained_model(base: &Path) -> (PathBuf, PathBuf) {
    let data = base.join("catalogue");
    mvlt::data::synth::write_catalog(&data, 60, 5, 32, |_| {}).unwrap();
    let nano = base.join("nano.json");
    std::fs::write(&nano, r#"{"embed_dims": [8, 16, 16, 16], "num_heads": [1, 2, 2, 2], "mlp_ratios": [2, 2, 2, 2], "depths": [1, 1, 1, 1], "token_hidden_size": 16, "t2i_channel": 4}"#).unwrap();
    let over: Vec<String> = vec![
        format!("model=\"{}\"", nano.display()),
        format!("data=\"{}\"", data.display()),
        "image_size=32".into(),
        "max_len=16".into(),
        "batch_size=4".into(),
        "max_steps=6".into(),
        "with_cls=true".into(),
        "workers=1".into(),
        "val_batches=1".into(),
    ];
    let config = mvlt::train::config::TrainConfig::resolve(&mvlt::train::config::recipe_text("cpu-pretrain").unwrap(), &over).unwrap();
    let s = mvlt::device::run_on(mvlt::device::DeviceSpec::Cpu, mvlt::train::trainer::TrainRun { config, dir: base.join("run"), resume: false }).unwrap();
    (s.final_weights.unwrap(), data)
}
