//! What a run writes for people and programs: JSON lines (`metrics.jsonl`: one line per logged
//! step, `"kind": "train"`, and per validation pass, `"kind": "val"`) and PNG plots drawn from
//! them (`loss.png`, `val.png`).

use anyhow::{Context, Result};
use plotters::prelude::*;
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

/// One panel's data: title and (x, y) points.
pub type Series = (String, Vec<(f64, f64)>);

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

static FONT: std::sync::Once = std::sync::Once::new();

pub fn register_font() {
    FONT.call_once(|| {
        // Embedded so plots render the same everywhere, with no system font lookup.
        let bytes: &'static [u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, bytes);
    });
}

/// A grid of line charts, one per series (loss terms differ by orders of magnitude, so each gets
/// its own axis). Training curves also get a moving average over `smooth` points.
pub fn plot_panels(path: &Path, title: &str, series: &[Series], smooth: usize) -> Result<()> {
    if series.is_empty() {
        return Ok(());
    }
    register_font();
    let cols = series.len().min(3);
    let rows = series.len().div_ceil(cols);
    let (w, h) = (420 * cols as u32, 300 * rows as u32 + 40);
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let (top, body) = root.split_vertically(40);
        top.titled(title, ("sans-serif", 22)).map_err(plot_err)?;
        for (area, (name, pts)) in body.split_evenly((rows, cols)).into_iter().zip(series) {
            let (x0, x1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
            let (y0, y1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
            let pad = ((y1 - y0) * 0.05).max(1e-9);
            let x1 = if x1 > x0 { x1 } else { x0 + 1.0 };
            let mut chart = ChartBuilder::on(&area)
                .caption(name, ("sans-serif", 16))
                .margin(8)
                .x_label_area_size(28)
                .y_label_area_size(52)
                .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))
                .map_err(plot_err)?;
            chart
                .configure_mesh()
                .x_desc("step")
                .label_style(("sans-serif", 11))
                .light_line_style(WHITE.mix(0.0))
                .draw()
                .map_err(plot_err)?;
            let raw = if smooth > 1 { BLUE.mix(0.25) } else { BLUE.mix(1.0) };
            chart.draw_series(LineSeries::new(pts.iter().copied(), raw.stroke_width(1))).map_err(plot_err)?;
            if smooth > 1 && pts.len() > smooth {
                let avg: Vec<(f64, f64)> = (smooth - 1..pts.len())
                    .map(|i| (pts[i].0, pts[i + 1 - smooth..=i].iter().map(|p| p.1).sum::<f64>() / smooth as f64))
                    .collect();
                chart.draw_series(LineSeries::new(avg, BLUE.stroke_width(2))).map_err(plot_err)?;
            }
        }
        root.present().map_err(plot_err)?;
    }
    let mut png = vec![];
    image::codecs::png::PngEncoder::new(&mut png)
        .write_image(&buf, w, h, image::ExtendedColorType::Rgb8)
        .context("encoding plot PNG")?;
    crate::files::write_atomic(path, &png)
}

use image::ImageEncoder;

fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing a plot: {e:?}")
}

/// Redraw `loss.png` and `val.png` in `dir` from `metrics.jsonl`.
pub fn plot_run(dir: &Path) -> Result<()> {
    let records = read_lines(&dir.join("metrics.jsonl"))?;
    let train = series_of(&records, "train", &["loss", "mlm", "itm", "t2i", "itc", "sup_cls", "sub_cls", "lr"]);
    plot_panels(&dir.join("loss.png"), "training loss terms (thin: logged steps; thick: moving average)", &train, 5)?;
    let val = series_of(
        &records,
        "val",
        &[
            "loss",
            "mlm_acc",
            "mlm_acc_other_image",
            "mlm_grounding",
            "itm_acc",
            "itc_acc",
            "psnr",
            "psnr_input",
            "sup_acc",
            "sub_acc",
        ],
    );
    plot_panels(&dir.join("val.png"), "validation", &val, 1)
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
