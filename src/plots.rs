//! The pictures a run or a report shows: loss and validation curves from `metrics.jsonl`, and
//! confusion matrices. Plotting lives here, in the application, so that a program linking the
//! `mvlt` library does not compile plotters; training calls [`plot_run`] through its metrics hook.

use anyhow::{Context, Result};
use mvlt::eval::metrics::confusion_matrix;
use mvlt::train::metrics::{read_lines, series_of, Point, Series};
use plotters::prelude::*;
use std::path::Path;

static FONT: std::sync::Once = std::sync::Once::new();

pub fn register_font() {
    FONT.call_once(|| {
        // Embedded so plots render the same everywhere, with no system font lookup.
        let bytes: &'static [u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");
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
    mvlt::files::write_atomic(path, &png)
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

/// A row-normalised confusion matrix as a heat map (class names on the axes up to 40 classes).
pub fn plot_confusion(path: &Path, title: &str, names: &[String], y_true: &[usize], y_pred: &[usize]) -> Result<()> {
    use plotters::prelude::*;
    let n = names.len();
    let m = confusion_matrix(y_true, y_pred, n);
    let cell = (720 / n.max(1)).clamp(6, 40) as i32;
    let label_w = if n <= 40 { 150 } else { 10 };
    let (w, h) = (label_w + cell * n as i32 + 20, cell * n as i32 + 60);
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        register_font();
        let root = BitMapBackend::with_buffer(&mut buf, (w as u32, h as u32)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let err = |e| anyhow::anyhow!("drawing the confusion matrix: {e:?}");
        root.draw(&Text::new(title.to_string(), (10, 10), ("sans-serif", 18))).map_err(err)?;
        let (x0, y0) = (label_w, 45);
        for (t, row) in m.iter().enumerate() {
            let total: usize = row.iter().sum();
            for (p, &c) in row.iter().enumerate() {
                let v = if total == 0 { 0.0 } else { c as f64 / total as f64 };
                let shade = (255.0 * (1.0 - v)) as u8;
                let rect = [
                    (x0 + p as i32 * cell, y0 + t as i32 * cell),
                    (x0 + (p as i32 + 1) * cell, y0 + (t as i32 + 1) * cell),
                ];
                root.draw(&Rectangle::new(rect, RGBColor(shade, shade, 255).filled())).map_err(err)?;
            }
            if n <= 40 {
                let y = y0 + t as i32 * cell + cell / 2 - 5;
                root.draw(&Text::new(names[t].clone(), (4, y), ("sans-serif", 10))).map_err(err)?;
            }
        }
        root.present().map_err(err)?;
    }
    let mut png = vec![];
    use image::ImageEncoder;
    image::codecs::png::PngEncoder::new(&mut png).write_image(
        &buf,
        w as u32,
        h as u32,
        image::ExtendedColorType::Rgb8,
    )?;
    mvlt::files::write_atomic(path, &png)
}
