//! Where the shared reference fixtures live: `$MVLT_FIXTURES`, else `../shared/fixtures/reference`.
//! When they are missing, parity tests fail under CI (CI=true) and are skipped with a message
//! otherwise.
#![allow(dead_code)]
use std::path::PathBuf;

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

/// A fresh temporary folder for one test.
pub fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mvlt-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
