//! What a run writes for people and programs: JSON lines (`metrics.jsonl`: one line per logged
//! step, `"kind": "train"`, per validation pass, `"kind": "val"`, and when training samples could
//! not be read, `"kind": "skipped"` with the new ones and why) and PNG plots drawn from them
//! (`loss.png`, `val.png`).

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
    plot_runs(path, title, &[(String::new(), series.to_vec())], smooth)
}

/// Colours of the runs of one chart, in order.
const PALETTE: [RGBColor; 6] = [BLUE, RED, RGBColor(0, 150, 0), MAGENTA, RGBColor(230, 140, 0), CYAN];

/// [`plot_panels`] for several runs at once: one panel per field, one colour per run (named in
/// the legend), so runs that differ in one setting can be compared curve by curve.
pub fn plot_runs(path: &Path, title: &str, runs: &[(String, Vec<Series>)], smooth: usize) -> Result<()> {
    // Panels in order of first appearance; each lists the runs that have the field.
    let mut fields: Vec<&str> = vec![];
    for (_, series) in runs {
        for (name, _) in series {
            if !fields.contains(&name.as_str()) {
                fields.push(name);
            }
        }
    }
    if fields.is_empty() {
        return Ok(());
    }
    register_font();
    let cols = fields.len().min(3);
    let rows = fields.len().div_ceil(cols);
    let (w, h) = (420 * cols as u32, 300 * rows as u32 + 40);
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let (top, body) = root.split_vertically(40);
        top.titled(title, ("sans-serif", 22)).map_err(plot_err)?;
        for (area, field) in body.split_evenly((rows, cols)).into_iter().zip(&fields) {
            // (run index, run name, points) of each run that has the field.
            let lines: Vec<(usize, &str, &[Point])> = runs
                .iter()
                .enumerate()
                .filter_map(|(i, (run, series))| {
                    series.iter().find(|(n, _)| n == field).map(|(_, pts)| (i, run.as_str(), pts.as_slice()))
                })
                .collect();
            let all = lines.iter().flat_map(|l| l.2.iter());
            let (x0, x1, y0, y1) = all.fold((f64::MAX, f64::MIN, f64::MAX, f64::MIN), |(a, b, c, d), p| {
                (a.min(p.0), b.max(p.0), c.min(p.1), d.max(p.1))
            });
            let pad = ((y1 - y0) * 0.05).max(1e-9);
            let x1 = if x1 > x0 { x1 } else { x0 + 1.0 };
            let mut chart = ChartBuilder::on(&area)
                .caption(*field, ("sans-serif", 16))
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
            for (i, run, pts) in lines {
                let colour = PALETTE[i % PALETTE.len()];
                let raw = if smooth > 1 { colour.mix(0.25) } else { colour.mix(1.0) };
                let drawn =
                    chart.draw_series(LineSeries::new(pts.iter().copied(), raw.stroke_width(1))).map_err(plot_err)?;
                if smooth > 1 && pts.len() > smooth {
                    let avg: Vec<(f64, f64)> = (smooth - 1..pts.len())
                        .map(|i| (pts[i].0, pts[i + 1 - smooth..=i].iter().map(|p| p.1).sum::<f64>() / smooth as f64))
                        .collect();
                    let drawn = chart.draw_series(LineSeries::new(avg, colour.stroke_width(2))).map_err(plot_err)?;
                    if !run.is_empty() {
                        drawn.label(run).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], colour));
                    }
                } else if !run.is_empty() {
                    drawn.label(run).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], colour));
                }
            }
            if runs.len() > 1 {
                chart
                    .configure_series_labels()
                    .background_style(WHITE.mix(0.8))
                    .border_style(BLACK.mix(0.3))
                    .label_font(("sans-serif", 11))
                    .draw()
                    .map_err(plot_err)?;
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

/// The training-line fields plotted, in panel order.
pub const TRAIN_FIELDS: &[&str] = &["loss", "mlm", "itm", "t2i", "itc", "sup_cls", "sub_cls", "lr"];
/// The validation-line fields plotted, in panel order.
pub const VAL_FIELDS: &[&str] = &[
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
];

/// Redraw `loss.png` and `val.png` in `dir` from `metrics.jsonl`.
pub fn plot_run(dir: &Path) -> Result<()> {
    let records = read_lines(&dir.join("metrics.jsonl"))?;
    let train = series_of(&records, "train", TRAIN_FIELDS);
    plot_panels(&dir.join("loss.png"), "training loss terms (thin: logged steps; thick: moving average)", &train, 5)?;
    let val = series_of(&records, "val", VAL_FIELDS);
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
