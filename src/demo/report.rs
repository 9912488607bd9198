//! The demo's report: `report.json` (the figures), `REPORT.md` (paper-style tables and the
//! pictures), and the pictures themselves: what a text search returns, what the reconstruction
//! head makes of a masked image.

use super::{DemoOutcome, ListResult};
use anyhow::{Context, Result};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use image::{Rgb, RgbImage};
use mvlt::data::dataset::{Dataset, FileDataset};
use mvlt::data::image::{apply_grid_mask, grid_mask};
use mvlt::eval::recognition::RecognitionResult;
use mvlt::infer::Model;
use mvlt::model::{HeadSet, Mode};
use mvlt::search::SearchQuery;
use rand::SeedableRng;
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::path::Path;

/// Side of one picture cell in pixels (the demo's images are 64 px; shown twice as large).
const CELL: u32 = 128;
const GAP: u32 = 6;

/// `report.json`: the issue's schema (R@K as fractions), plus the run's details.
pub fn json_of(o: &DemoOutcome) -> Value {
    let recall = |r: &mvlt::eval::retrieval::RetrievalResult| json!({"r@1": r.r1, "r@5": r.r5, "r@10": r.r10, "queries": r.queries});
    let mut retrieval = serde_json::Map::new();
    let mut first_stage = serde_json::Map::new();
    for l in &o.retrieval {
        let mut v = recall(&l.itm);
        v["candidates"] = json!(l.candidates);
        retrieval.insert(l.name.clone(), v);
        if let Some(t) = &l.two_stage {
            first_stage.insert(
                l.name.clone(),
                json!({
                    "embeddings": recall(&t.first_stage),
                    "first_stage_recall_at_k": t.first_stage_recall_at_k,
                    "k": t.k,
                    "two_stage": recall(&t.two_stage),
                    "itm_plus_similarity": recall(&t.itm_plus_similarity),
                }),
            );
        }
    }
    let rec = o.recognition.as_ref().map(|r| {
        let one = |x: &mvlt::eval::metrics::Report| {
            json!({"accuracy": x.accuracy, "macro_f1": x.macro_f1, "images": x.samples})
        };
        json!({"main": one(&r.main), "sub": one(&r.sub)})
    });
    let held_apart: serde_json::Map<String, Value> = o
        .held_apart
        .iter()
        .map(|l| {
            let mut v = json!({"itm": recall(&l.itm), "candidates": l.candidates});
            if let Some(t) = &l.two_stage {
                v["embeddings"] = recall(&t.first_stage);
            }
            (l.name.clone(), v)
        })
        .collect();
    json!({
        "retrieval": retrieval,
        "held_apart": (!held_apart.is_empty()).then_some(held_apart),
        "ranking": o.ranking,
        "own_catalogue": o.plan.catalogue,
        "recognition": rec,
        "first_stage": (!first_stage.is_empty()).then_some(first_stage),
        "wall_s": o.wall_s,
        "backend": o.backend,
        "phases_s": o.phases.iter().map(|(n, s)| json!({"phase": n, "seconds": s})).collect::<Vec<_>>(),
        "catalogue": {"images": o.plan.images, "image_size": o.plan.image_size, "train_products": o.train_products,
                      "val_products": o.val_products, "val_images": o.val_images},
        "pretrain": o.pretrain,
        "pretrain_plan": o.steps,
        "finetune": o.finetune,
        "search_queries": o.search_queries,
        "targets": targets(o).into_iter().map(|(t, measured, met)| json!({"target": t, "measured": measured, "met": met})).collect::<Vec<_>>(),
    })
}

/// The demo's targets (the goal, and the floor a default run must reach): each with what the run
/// measured and whether it is met. Retrieval is ITM's ranking, the paper's protocol; `None` when a
/// figure is missing (no recognition phase).
pub fn targets(o: &DemoOutcome) -> Vec<(&'static str, String, Option<bool>)> {
    if o.plan.catalogue.is_some() {
        return catalogue_targets(o);
    }
    let r1 = |name: &str| o.retrieval.iter().find(|l| l.name == name).map(|l| l.itm.r1);
    let both = |a: &str, b: &str, min: f64| -> (String, Option<bool>) {
        match (r1(a), r1(b)) {
            (Some(x), Some(y)) => (format!("{} / {}", pct(x), pct(y)), Some(x >= min && y >= min)),
            _ => ("-".into(), None),
        }
    };
    let acc = |pick: fn(&RecognitionResult) -> f64, min: f64| -> (String, Option<bool>) {
        match &o.recognition {
            Some(r) => (pct(pick(r)), Some(pick(r) >= min)),
            None => ("-".into(), None),
        }
    };
    let (main, sub) = (|r: &RecognitionResult| r.main.accuracy, |r: &RecognitionResult| r.sub.accuracy);
    let random = both("tir_random", "itr_random", 0.9);
    let same = both("tir_same_subcategory", "itr_same_subcategory", 0.6);
    let floor_itm = both("tir_random", "itr_random", 0.5);
    let floor_main = acc(main, 0.9);
    let floor = match (floor_itm.1, floor_main.1) {
        (Some(a), Some(b)) => Some(a && b),
        _ => None,
    };
    let main_goal = acc(main, 0.95);
    let sub_goal = acc(sub, 0.85);
    vec![
        ("goal: ITM R@1 >= 90, random negatives (TIR / ITR)", random.0, random.1),
        ("goal: ITM R@1 >= 60, same-sub-category negatives (TIR / ITR)", same.0, same.1),
        ("goal: main-category accuracy >= 95", main_goal.0, main_goal.1),
        ("goal: sub-category accuracy >= 85", sub_goal.0, sub_goal.1),
        (
            "floor: ITM R@1 >= 50 both ways, random negatives; main accuracy >= 90",
            format!("{}; {}", floor_itm.0, floor_main.0),
            floor,
        ),
    ]
}

/// Issue 35's targets for a team's catalogue of real products, on its validation products.
fn catalogue_targets(o: &DemoOutcome) -> Vec<(&'static str, String, Option<bool>)> {
    let list = |name: &str| o.retrieval.iter().find(|l| l.name == name);
    let both = |pick: &dyn Fn(&ListResult) -> Option<f64>, min: f64| -> (String, Option<bool>) {
        match (list("tir_random").and_then(pick), list("itr_random").and_then(pick)) {
            (Some(x), Some(y)) => (format!("{} / {}", pct(x), pct(y)), Some(x >= min && y >= min)),
            _ => ("-".into(), None),
        }
    };
    let itm = both(&|l| Some(l.itm.r1), 0.5);
    let emb = both(&|l| l.two_stage.as_ref().map(|t| t.first_stage.r1), 0.6);
    let acc = |pick: fn(&RecognitionResult) -> &mvlt::eval::metrics::Report, min: f64| match &o.recognition {
        Some(r) => {
            (format!("{} (macro-F1 {})", pct(pick(r).accuracy), pct(pick(r).macro_f1)), Some(pick(r).accuracy >= min))
        }
        None => ("-".into(), None),
    };
    let main = acc(|r| &r.main, 0.97);
    let sub = acc(|r| &r.sub, 0.90);
    vec![
        ("ITM R@1 >= 50 both ways, random negatives (TIR / ITR)", itm.0, itm.1),
        ("contrastive embeddings R@1 >= 60, random negatives (TIR / ITR)", emb.0, emb.1),
        ("main-category accuracy >= 97", main.0, main.1),
        ("sub-category accuracy >= 90", sub.0, sub.1),
    ]
}

fn pct(x: f64) -> String {
    format!("{:.1}", 100.0 * x)
}

/// `R@1 | R@5 | R@10` cells in percent.
fn recall_cells(r: &mvlt::eval::retrieval::RetrievalResult) -> String {
    format!("{} | {} | {}", pct(r.r1), pct(r.r5), pct(r.r10))
}

fn minutes(s: f64) -> String {
    format!("{}m {:02}s", (s / 60.0) as u64, (s % 60.0) as u64)
}

/// The README's demo table, from a run's `report.json`: what the README shows is what the run
/// reported (a test compares the two). `None` when the report lacks a figure the table shows.
pub fn readme_table(r: &Value) -> Option<String> {
    let f = |path: &[&str]| -> Option<f64> {
        let mut v = r;
        for k in path {
            v = v.get(*k)?;
        }
        v.as_f64()
    };
    let pair =
        |a: &[&str], b: &[&str]| -> Option<String> { Some(format!("{:.0} / {:.0}", 100.0 * f(a)?, 100.0 * f(b)?)) };
    let from = match r.get("pretrain_plan")?.get("from")?.as_str()? {
        "measured" => "planned from the measured pace",
        "--steps" => "asked with --steps",
        _ => "fixed by --quick",
    };
    let rows = [
        ("wall time", minutes(f(&["wall_s"])?)),
        (&*format!("pre-training steps of 64 ({from})"), format!("{:.0}", f(&["pretrain", "steps"])?)),
        (
            "**ITM R@1, random negatives, TIR / ITR**",
            format!("**{}**", pair(&["retrieval", "tir_random", "r@1"], &["retrieval", "itr_random", "r@1"])?),
        ),
        (
            "ITM R@1, same-sub-category negatives, TIR / ITR",
            pair(&["retrieval", "tir_same_subcategory", "r@1"], &["retrieval", "itr_same_subcategory", "r@1"])?,
        ),
        (
            "contrastive embeddings R@1, random negatives, TIR / ITR",
            pair(
                &["first_stage", "tir_random", "embeddings", "r@1"],
                &["first_stage", "itr_random", "embeddings", "r@1"],
            )?,
        ),
        (
            "embeddings' top 10 re-ranked by ITM, R@1, random negatives, TIR / ITR",
            pair(
                &["first_stage", "tir_random", "two_stage", "r@1"],
                &["first_stage", "itr_random", "two_stage", "r@1"],
            )?,
        ),
        (
            "recognition accuracy, main / sub",
            format!(
                "{:.1} / {:.1}",
                100.0 * f(&["recognition", "main", "accuracy"])?,
                100.0 * f(&["recognition", "sub", "accuracy"])?
            ),
        ),
        (
            "last validation: ITM accuracy, PSNR of the reconstruction",
            format!("{:.2}, {:.1} dB", f(&["pretrain", "last_val", "itm_acc"])?, f(&["pretrain", "last_val", "psnr"])?),
        ),
    ];
    let mut out = String::from("| | |\n|---|---|\n");
    for (name, value) in rows {
        out += &format!("| {name} | {value} |\n");
    }
    Some(out)
}

/// The retrieval and recognition tables (markdown; also what `mvlt demo` prints at the end).
pub fn summary(o: &DemoOutcome) -> String {
    let mut m = String::new();
    let _ = writeln!(m, "## Retrieval (ITM match probability over each query's candidates, as in the paper)\n");
    let _ = writeln!(m, "| direction | negatives | R@1 | R@5 | R@10 | queries | candidates |");
    let _ = writeln!(m, "|---|---|---|---|---|---|---|");
    let dir = |l: &ListResult| match l.direction {
        mvlt::eval::retrieval::Direction::Tir => "text -> image (TIR)",
        mvlt::eval::retrieval::Direction::Itr => "image -> text (ITR)",
    };
    for l in &o.retrieval {
        let _ = writeln!(
            m,
            "| {} | {} | {} | {} | {} |",
            dir(l),
            l.negatives.replace('_', "-"),
            recall_cells(&l.itm),
            l.itm.queries,
            l.candidates
        );
    }
    let candidates = o.retrieval.first().map(|l| l.candidates).unwrap_or(101);
    let _ = writeln!(m, "\nR@K in percent; chance R@1 is {:.1}.", 100.0 / candidates as f64);
    if candidates < o.plan.candidates {
        let _ = writeln!(
            m,
            "Lists of {candidates} candidates, not {}: the validation split holds {} products.",
            o.plan.candidates, o.val_products
        );
    }
    m.push('\n');
    if o.retrieval.iter().any(|l| l.two_stage.is_some()) {
        let _ = writeln!(m, "### Through the contrastive embeddings (first stage) and ITM re-ranking its top k\n");
        let _ = writeln!(
            m,
            "| direction | negatives | embeddings R@1 | R@5 | R@10 | positive in top k | ITM re-rank R@1 | R@5 | R@10 \
             | ITM + similarity R@1 | R@5 | R@10 |"
        );
        let _ = writeln!(m, "|---|---|---|---|---|---|---|---|---|---|---|---|");
        for l in &o.retrieval {
            if let Some(t) = &l.two_stage {
                let _ = writeln!(
                    m,
                    "| {} | {} | {} | {} (k = {}) | {} | {} |",
                    dir(l),
                    l.negatives.replace('_', "-"),
                    recall_cells(&t.first_stage),
                    pct(t.first_stage_recall_at_k),
                    t.k,
                    recall_cells(&t.two_stage),
                    recall_cells(&t.itm_plus_similarity)
                );
            }
        }
        m.push('\n');
    }
    if let Some(c) = &o.ranking {
        let _ = writeln!(
            m,
            "### The ranking search and serve use
"
        );
        let _ = writeln!(
            m,
            "`mvlt index` measured the three orders of the first stage's top {} on {} text queries of validation \
             products ({} candidates) and recorded the best in the index: **{}** ({}).\n",
            c.k,
            c.queries,
            c.candidates,
            c.ranking,
            c.ranking.describe()
        );
        let _ = writeln!(m, "| ranking | R@1 | R@5 | R@10 |\n|---|---|---|---|");
        for x in &c.measured {
            let _ = writeln!(m, "| {} | {} | {} | {} |", x.ranking, pct(x.r1), pct(x.r5), pct(x.r10));
        }
        m.push('\n');
    }
    if let (Some(c), false) = (&o.plan.catalogue, o.held_apart.is_empty()) {
        let _ = writeln!(m, "### Sub-categories neither training run saw ({})\n", c.held_apart.join(", "));
        let _ =
            writeln!(m, "| direction | ITM R@1 | R@5 | R@10 | embeddings R@1 | R@5 | R@10 | queries | candidates |");
        let _ = writeln!(m, "|---|---|---|---|---|---|---|---|---|");
        for l in &o.held_apart {
            let emb = l.two_stage.as_ref().map(|t| recall_cells(&t.first_stage)).unwrap_or_else(|| "- | - | -".into());
            let _ =
                writeln!(m, "| {} | {} | {emb} | {} | {} |", dir(l), recall_cells(&l.itm), l.itm.queries, l.candidates);
        }
        m.push('\n');
    }
    if let Some(r) = &o.recognition {
        let _ = writeln!(m, "## Recognition (fine-tuned; image and caption, as the reference evaluates)\n");
        let _ = writeln!(m, "| task | accuracy | macro-F1 | classes | images |");
        let _ = writeln!(m, "|---|---|---|---|---|");
        for (name, rep, n) in
            [("main category", &r.main, r.main_names.len()), ("sub-category", &r.sub, r.sub_names.len())]
        {
            let _ = writeln!(m, "| {name} | {} | {} | {n} | {} |", pct(rep.accuracy), pct(rep.macro_f1), rep.samples);
        }
        m.push('\n');
    }
    if !o.plan.quick {
        let _ = writeln!(m, "## Against the demo's targets\n");
        let _ = writeln!(m, "| target (percent) | measured | met |");
        let _ = writeln!(m, "|---|---|---|");
        for (t, measured, met) in targets(o) {
            let met = match met {
                Some(true) => "yes",
                Some(false) => "no",
                None => "-",
            };
            let _ = writeln!(m, "| {t} | {measured} | {met} |");
        }
        m.push('\n');
    }
    m
}

/// `REPORT.md`.
pub fn markdown(o: &DemoOutcome) -> String {
    let mut m = String::new();
    let _ = writeln!(m, "# mvlt demo report\n");
    let what = match &o.plan.catalogue {
        None => "the built-in synthetic catalogue".to_string(),
        Some(c) => format!(
            "your catalogue `{}`{}",
            c.source.display(),
            c.products.map(|n| format!(" (a sample of {n} of its products)")).unwrap_or_default()
        ),
    };
    let _ = writeln!(
        m,
        "PVLT pre-trained from scratch on {what} ({} images of {} px: {} training \
         products, {} validation products with {} images), then fine-tuned for recognition. Every figure below is \
         on the **validation products**, which training never saw. Backend: {}. Wall time {} ({}).\n",
        o.plan.images,
        o.plan.image_size,
        o.train_products,
        o.val_products,
        o.val_images,
        o.backend,
        minutes(o.wall_s),
        o.phases.iter().map(|(n, s)| format!("{n} {}", minutes(*s))).collect::<Vec<_>>().join(", ")
    );
    m += &summary(o);
    let _ = writeln!(m, "## Training\n");
    for (name, t, dir) in [("Pre-training", &o.pretrain, "pretrain"), ("Fine-tuning", &o.finetune, "finetune")] {
        let _ = writeln!(
            m,
            "{name}: {} steps at {:.1} samples/s; last validation: {}.\n",
            t.steps,
            t.samples_per_s,
            t.last_val.as_ref().map(mvlt::train::trainer::summarize).unwrap_or_else(|| "none".into())
        );
        let _ = writeln!(m, "![{name} loss terms]({dir}/loss.png)\n\n![{name} validation]({dir}/val.png)\n");
    }
    let _ = writeln!(m, "{}\n", plan_line(&o.steps));
    if let Some(p) = &o.steps.pace {
        let after: f64 = o.phases.iter().skip_while(|(n, _)| n != "pre-training").skip(1).map(|(_, s)| s).sum();
        let _ = writeln!(
            m,
            "Predicted {} for the phases after pre-training, took {} (report included). Repeat this run exactly: \
             `{} -- demo{} --seed {} --steps {}`.\n",
            minutes(p.after_pretraining_s),
            minutes(after),
            mvlt::device::cargo_run(),
            o.plan.catalogue.as_ref().map(super::catalogue::OwnCatalogue::arguments).unwrap_or_default(),
            o.seed,
            o.steps.pretrain_steps
        );
    }
    let _ = writeln!(
        m,
        "`mlm_grounding` is MLM accuracy with the right image minus with another product's: above 0 once the \
         text reads the image. `psnr` is the reconstruction of the grid-masked image (clamped to [0, 1], as a \
         person would see it) and `psnr_input` the masked input itself, the baseline it has to beat.\n"
    );
    let _ = writeln!(m, "## What a text search returns\n");
    let _ = writeln!(
        m,
        "For each caption, its own image (left), then the model's top 5 among all validation images: by ITM \
         match probability on the first row, and by the contrastive embeddings on the second (weights with the \
         ITC head). Green frame: the query's product; red: another.\n"
    );
    for (i, q) in o.search_queries.iter().enumerate() {
        let _ = writeln!(m, "{}. {q}", i + 1);
    }
    let _ = writeln!(m, "\n![text search](search.png)\n");
    let _ = writeln!(m, "## Masked image reconstruction\n");
    let _ = writeln!(m, "Columns: original, grid-masked input (half the cells), reconstruction.\n");
    let _ = writeln!(m, "![reconstruction](reconstruction.png)\n");
    if o.recognition.is_some() {
        let _ = writeln!(m, "## Confusion matrices\n");
        let _ = writeln!(m, "![main category](confusion_main.png)\n\n![sub-category](confusion_sub.png)\n");
    }
    let _ = writeln!(m, "## Try it\n");
    if let Some(c) = &o.ranking {
        let _ = writeln!(
            m,
            "With --index, search and serve order the first stage's top 50 by **{}** ({}), the ranking the index \
             measured best above; `--ranking embeddings|itm|itm+similarity` overrides it.\n",
            c.ranking,
            c.ranking.describe()
        );
    }
    let w = o.pretrain.weights.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
    let (catalog, index) = (o.plan.catalogue_dir(&o.out), o.out.join(INDEX_FILE));
    let _ = writeln!(m, "```sh");
    let _ = writeln!(m, "{}", serve_command(o));
    if index.exists() {
        let _ = writeln!(
            m,
            "{} -- search --weights {w} --catalog {} --index {} --text {:?}",
            mvlt::device::cargo_run(),
            catalog.display(),
            index.display(),
            match (&o.plan.catalogue, o.search_queries.first()) {
                (Some(_), Some(q)) => q.as_str(),
                _ => "red striped t-shirt",
            }
        );
    }
    let _ = writeln!(m, "```");
    m
}

/// Where the pre-training steps came from, in a sentence (terminal and REPORT.md).
pub fn plan_line(s: &super::StepPlan) -> String {
    match &s.pace {
        Some(p) => format!(
            "Pre-training steps planned from this machine's pace: {} steps; {} timed steps took {:.2} s each \
             ({:.1} samples/s with start-up, validation and checkpoint), the later phases were priced \
             at {:.2} s per exhaustive ITM query of 101 candidates, {:.2} s per first-stage query and {:.1} ms per \
             indexed image: {} of them, {} spent before planning, in a budget of {}.",
            s.pretrain_steps,
            p.timed_steps,
            p.step_s(),
            p.samples_per_s(),
            p.itm_query_s,
            p.two_stage_query_s,
            p.image_embedding_s * 1e3,
            minutes(p.after_pretraining_s),
            minutes(p.spent_s),
            minutes(p.budget_s)
        ),
        None if s.from == super::StepsFrom::Quick => {
            format!("Pre-training steps: {} (fixed by --quick).", s.pretrain_steps)
        }
        None => format!("Pre-training steps: {} (asked with --steps).", s.pretrain_steps),
    }
}

/// The catalogue's contrastive index in the demo's folder (built when the weights have ITC).
pub const INDEX_FILE: &str = "catalog.index";

/// The command that serves the demo's pre-trained model over its catalogue.
pub fn serve_command(o: &DemoOutcome) -> String {
    let w = o.pretrain.weights.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
    let index = o.out.join(INDEX_FILE);
    let index = if index.exists() { format!(" --index {}", index.display()) } else { String::new() };
    format!(
        "{} -- serve --weights {w} --catalog {}{index}   # then open http://127.0.0.1:8080",
        mvlt::device::cargo_run(),
        o.plan.catalogue_dir(&o.out).display()
    )
}

pub fn write(out: &Path, o: &DemoOutcome) -> Result<()> {
    mvlt::files::write_atomic(&out.join("report.json"), serde_json::to_string_pretty(&json_of(o))?.as_bytes())?;
    mvlt::files::write_atomic(&out.join("REPORT.md"), markdown(o).as_bytes())
}

/// Paste `img` (HWC RGB bytes, any size) into cell (`col`, `row`) of `sheet`, framed in `frame`.
fn paste(sheet: &mut RgbImage, img: &RgbImage, col: u32, row: u32, frame: Option<Rgb<u8>>) {
    let img = image::imageops::resize(img, CELL, CELL, image::imageops::FilterType::Nearest);
    let (x, y) = (GAP + col * (CELL + GAP), GAP + row * (CELL + GAP));
    if let Some(c) = frame {
        for dy in 0..CELL + 2 * (GAP / 2) {
            for dx in 0..CELL + 2 * (GAP / 2) {
                let (px, py) = (x + dx - GAP / 2, y + dy - GAP / 2);
                if px < sheet.width() && py < sheet.height() {
                    sheet.put_pixel(px, py, c);
                }
            }
        }
    }
    image::imageops::overlay(sheet, &img, x as i64, y as i64);
}

fn sheet(cols: u32, rows: u32) -> RgbImage {
    RgbImage::from_pixel(GAP + cols * (CELL + GAP), GAP + rows * (CELL + GAP), Rgb([255, 255, 255]))
}

fn rgb_of(ds: &FileDataset, row: usize) -> Result<RgbImage> {
    let p = ds.pixels(row)?;
    RgbImage::from_raw(p.width as u32, p.height as u32, p.data).context("image buffer")
}

/// CHW floats in [0, 1] -> an RGB image.
fn rgb_of_chw(chw: &[f32], side: usize) -> RgbImage {
    let n = side * side;
    RgbImage::from_fn(side as u32, side as u32, |x, y| {
        let i = y as usize * side + x as usize;
        let c = |k: usize| (chw[k * n + i].clamp(0.0, 1.0) * 255.0).round() as u8;
        Rgb([c(0), c(1), c(2)])
    })
}

/// Four text queries (captions of four validation products) against every validation image:
/// by ITM (the paper's ranking), and, when the weights have the ITC head, by the contrastive
/// embeddings on the row below. Returns the queries.
pub fn search_picture<B: Backend>(
    model: &Model<B>,
    ds: &FileDataset,
    val_rows: &[usize],
    path: &Path,
) -> Result<Vec<String>> {
    let recs = ds.records();
    let firsts = mvlt::search::distinct_captions(ds, val_rows);
    let step = (firsts.len() / 4).max(1);
    let picks: Vec<usize> = firsts.iter().step_by(step).take(4).copied().collect();
    let itc = model.config.heads.itc;
    // Every validation image embedded once (ITC).
    let mut gallery: Vec<Vec<f32>> = vec![];
    if itc {
        for chunk in val_rows.chunks(64) {
            let px: Vec<Vec<f32>> =
                chunk.iter().map(|&r| model.prepare_image(&ds.pixels(r)?)).collect::<Result<_>>()?;
            gallery.extend(model.image_embeddings(&px.iter().map(|v| v.as_slice()).collect::<Vec<_>>())?);
        }
    }
    let rows_per_query = 1 + itc as u32;
    let mut img = sheet(6, picks.len() as u32 * rows_per_query);
    let mut queries = vec![];
    for (i, &q) in picks.iter().enumerate() {
        let caption = &recs[q].caption;
        queries.push(caption.clone());
        let by_itm: Vec<usize> =
            model.search(ds, val_rows, SearchQuery::Text(caption), 101, |_| {})?.hits.iter().map(|h| h.row).collect();
        let mut rankings = vec![by_itm];
        if itc {
            let t = model.caption_embeddings(&[caption])?.remove(0);
            let sims: Vec<f32> = gallery.iter().map(|g| mvlt::search::index::dot(g, &t)).collect();
            let mut order: Vec<usize> = (0..val_rows.len()).collect();
            order.sort_by(|&a, &b| sims[b].total_cmp(&sims[a]));
            rankings.push(order.into_iter().map(|j| val_rows[j]).collect());
        }
        for (k, ranking) in rankings.iter().enumerate() {
            let row = i as u32 * rows_per_query + k as u32;
            paste(&mut img, &rgb_of(ds, q)?, 0, row, None);
            for (c, &hit) in ranking.iter().take(5).enumerate() {
                let right = recs[hit].product_id == recs[q].product_id;
                let frame = if right { Rgb([30, 170, 60]) } else { Rgb([210, 40, 40]) };
                paste(&mut img, &rgb_of(ds, hit)?, c as u32 + 1, row, Some(frame));
            }
        }
    }
    img.save(path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(queries)
}

/// Original, grid-masked and reconstructed versions of four validation images.
pub fn reconstruction_picture<B: Backend>(
    model: &Model<B>,
    ds: &FileDataset,
    val_rows: &[usize],
    mask_grid: usize,
    seed: u64,
    path: &Path,
) -> Result<()> {
    let s = model.image_size;
    let picks: Vec<usize> = val_rows.iter().step_by((val_rows.len() / 4).max(1)).take(4).copied().collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let (mut originals, mut masked, mut ids) = (vec![], vec![], vec![]);
    for &r in &picks {
        let x = model.prepare_image(&ds.pixels(r)?)?;
        let mut m = x.clone();
        apply_grid_mask(&mut m, s, mask_grid, &grid_mask(mask_grid, &mut rng))?;
        originals.push(x);
        masked.push(m);
        ids.extend(model.prepare_text(&ds.records()[r].caption)?);
    }
    let n = picks.len();
    let t = model.config.num_text_tokens;
    let input = Tensor::<B, 4>::from_data(TensorData::new(masked.concat(), [n, 3, s, s]), &model.device);
    let tok = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [n, t]), &model.device);
    let out = model.net.forward(input, tok, HeadSet { t2i: true, ..HeadSet::NONE }, Mode::Eval);
    let rec: Vec<f32> = out
        .t2i_logits
        .context("these weights have no reconstruction head")?
        .into_data()
        .convert::<f32>()
        .to_vec()
        .map_err(|e| anyhow::anyhow!("reading the reconstruction: {e:?}"))?;
    let mut img = sheet(3, n as u32);
    for i in 0..n {
        for (c, chw) in
            [&originals[i][..], &masked[i][..], &rec[i * 3 * s * s..(i + 1) * 3 * s * s]].into_iter().enumerate()
        {
            paste(&mut img, &rgb_of_chw(chw, s), c as u32, i as u32, None);
        }
    }
    img.save(path).with_context(|| format!("cannot write {}", path.display()))
}
