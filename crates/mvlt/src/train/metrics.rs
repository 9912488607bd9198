//! What a run writes for people and programs: JSON lines (`metrics.jsonl`: one line per logged
//! step, `"kind": "train"`, per validation pass, `"kind": "val"`, and when training samples could
//! not be read, `"kind": "skipped"` with the new ones and why), and the series plots are drawn
//! from (the drawing itself is the application's: `mvlt-cli`'s `plots`).

use anyhow::{Context, Result};
use serde_json::{Map, Value};
use std::io::Write;
use std::path::{Path, PathBuf};

pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsLog {
    /// Open for appending. On a resume, lines after `keep_up_to_step` (written after the
    /// checkpoint the run resumes from) are dropped so the log matches the run as it continues.
    pub fn open(path: &Path, keep_up_to_step: Option<usize>) -> Result<MetricsLog> {
        match keep_up_to_step {
            Some(step) if path.exists() => {
                let kept: Vec<String> = read_lines(path)?
                    .into_iter()
                    .filter(|v| v.get("step").and_then(Value::as_u64).is_some_and(|s| s as usize <= step))
                    .map(|v| v.to_string())
                    .collect();
                let text = kept.iter().map(|l| format!("{l}\n")).collect::<String>();
                crate::files::write_atomic(path, text.as_bytes())?;
            }
            Some(_) => {}
            None => {
                let _ = std::fs::remove_file(path);
            }
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(MetricsLog { path: path.to_path_buf(), file })
    }

    pub fn write(&mut self, record: &Value) -> Result<()> {
        writeln!(self.file, "{record}").with_context(|| format!("cannot write {}", self.path.display()))?;
        self.file.flush()?;
        Ok(())
    }
}

pub fn read_lines(path: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    // A line cut short by a crash is skipped rather than failing the whole plot.
    Ok(text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect())
}

/// One (x, y) point of a curve.
pub type Point = (f64, f64);
/// One panel's data: title and (x, y) points.
pub type Series = (String, Vec<Point>);

/// Series `(name, points)` for each numeric field of the records of `kind`, x = step.
pub fn series_of(records: &[Value], kind: &str, fields: &[&str]) -> Vec<Series> {
    fields
        .iter()
        .filter_map(|f| {
            let pts: Vec<(f64, f64)> = records
                .iter()
                .filter(|r| r.get("kind").and_then(Value::as_str) == Some(kind))
                .filter_map(|r| Some((r.get("step")?.as_f64()?, r.get(*f)?.as_f64()?)))
                .filter(|(_, y)| y.is_finite())
                .collect();
            (!pts.is_empty()).then(|| (f.to_string(), pts))
        })
        .collect()
}

/// A JSON object from pairs, skipping absent values.
pub fn record(pairs: &[(&str, Option<Value>)]) -> Value {
    let mut m = Map::new();
    for (k, v) in pairs {
        if let Some(v) = v {
            m.insert(k.to_string(), v.clone());
        }
    }
    Value::Object(m)
}
