//! `mvlt eval retrieval` and `mvlt eval recognition`.
use super::infer_cmd::ModelArgs;
use crate::cli::run_on;
use anyhow::{bail, Result};
use burn::tensor::backend::Backend;
use mvlt::data::dataset::{open_dataset, split_by_product, Dataset};
use mvlt::device::BackendTask;
use mvlt::eval::metrics::Report;
use mvlt::eval::recognition;
use mvlt::eval::retrieval::{self, Direction, ImageSource, Negatives};
use mvlt::progress::progress_bar;
use mvlt::search::index::CatalogIndex;
use std::path::PathBuf;

/// The rows an evaluation covers: the validation split of a run's data (`--val-fraction F
/// --seed S`, the run's), else every row.
fn evaluated_rows(ds: &dyn Dataset, val_fraction: Option<f64>, seed: u64) -> Vec<usize> {
    match val_fraction {
        Some(f) => split_by_product(ds.records(), f, seed).1,
        None => (0..ds.len()).collect(),
    }
}

#[derive(clap::Args)]
pub struct RetrievalArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, value_enum)]
    direction: Direction,
    /// Candidate lists: the authors' retrieve_ITR / retrieve_TIR folder, or a .jsonl file written by --save-lists.
    #[arg(long)]
    lists: Option<PathBuf>,
    /// Folder of the images the authors' lists name (extracted_valid_images).
    #[arg(long)]
    images: Option<PathBuf>,
    /// Generate lists from this dataset instead (and resolve their images in it).
    #[arg(long)]
    data: Option<PathBuf>,
    #[arg(long, default_value_t = 1000)]
    queries: usize,
    #[arg(long, default_value_t = 101)]
    candidates: usize,
    #[arg(long, value_enum, default_value = "random")]
    negatives: Negatives,
    /// Generate lists from the validation split of a training run's data only (its val_fraction;
    /// --seed is the run's seed).
    #[arg(long, value_parser = super::parse_fraction)]
    val_fraction: Option<f64>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write the generated lists here (JSON lines) so the result can be reproduced.
    #[arg(long)]
    save_lists: Option<PathBuf>,
    /// Also rank through the contrastive embeddings (weights pre-trained with --with-itc) and
    /// re-rank their top K by ITM: the first stage's R@K and recall at K, and the two-stage R@K.
    #[arg(long, value_name = "K")]
    rerank: Option<usize>,
    /// The first stage from an index of the --data catalogue (mvlt index, same weights): its recall
    /// on the lists and on the whole indexed gallery, and the two-stage R@K with its top --rerank
    /// (default 50) re-ranked by ITM, next to exhaustive ITM.
    #[arg(long, value_name = "INDEX")]
    first_stage: Option<PathBuf>,
    /// Write {"direction", "queries", "r@1", "r@5", "r@10", "ranks"} here (with --rerank also
    /// "first_stage" and "two_stage").
    #[arg(long)]
    json: Option<PathBuf>,
}

impl BackendTask for &RetrievalArgs {
    type Output = ();
    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        let m = self.model.load::<B>(&device)?;
        let data: Option<Box<dyn Dataset>> = self.data.as_ref().map(|d| open_dataset(d)).transpose()?;
        let queries = match (&self.lists, &data) {
            (Some(l), _) if l.is_dir() => retrieval::read_authors_lists(l)?,
            (Some(l), _) => retrieval::read_jsonl_lists(l)?,
            (None, Some(ds)) => {
                let rows = evaluated_rows(ds.as_ref(), self.val_fraction, self.seed);
                retrieval::generate(ds.as_ref(), &rows, self.queries, self.candidates, self.negatives, self.seed)?
            }
            (None, None) => {
                bail!("give --lists (the authors' folder or a .jsonl of lists) or --data to generate lists from")
            }
        };
        if let Some(p) = &self.save_lists {
            retrieval::write_jsonl(p, &queries)?;
            eprintln!("lists written to {}", p.display());
        }
        let source = match (&self.images, &data) {
            (Some(dir), _) => ImageSource::Folder(dir.clone()),
            (None, Some(ds)) => ImageSource::Dataset(
                ds.as_ref(),
                ds.records().iter().enumerate().map(|(i, r)| (r.id.clone(), i)).collect(),
            ),
            (None, None) => bail!("give --images (the folder the lists' img_name entries are in) or --data"),
        };
        let pb = progress_bar(queries.len() as u64, "queries");
        let r = retrieval::evaluate(&m, &queries, self.direction, &source, self.model.batch_size, || pb.inc(1))?;
        pb.finish_and_clear();
        let name = match self.direction {
            Direction::Itr => "image -> text (ITR)",
            Direction::Tir => "text -> image (TIR)",
        };
        let cands = queries.iter().map(|q| q.candidates.len()).max().unwrap_or(0);
        println!("| {name:<20} | R@1    | R@5    | R@10   | queries | candidates |");
        println!("|----------------------|--------|--------|--------|---------|------------|");
        println!(
            "| {:<20} | {:>6.2} | {:>6.2} | {:>6.2} | {:>7} | {:>10} |",
            "ITM, every candidate",
            100.0 * r.r1,
            100.0 * r.r5,
            100.0 * r.r10,
            r.queries,
            cands
        );
        let mut json = serde_json::to_value(&r)?;
        let index = match (&self.first_stage, &data) {
            (Some(path), Some(_)) => Some(CatalogIndex::open_for(path, &self.model.weights, m.config.itc_dim)?),
            (Some(_), None) => bail!("--first-stage needs --data, the catalogue the index was built over"),
            (None, _) => None,
        };
        let rerank = self.rerank.or(index.as_ref().map(|_| 50));
        if let Some(k) = rerank {
            let pb = progress_bar(queries.len() as u64, "two-stage");
            let first = retrieval::FirstStage { k, index: index.as_ref() };
            let t = retrieval::evaluate_two_stage(
                &m,
                &queries,
                self.direction,
                &source,
                self.model.batch_size,
                first,
                || pb.inc(1),
            )?;
            pb.finish_and_clear();
            for (name, x) in
                [("ITC first stage".to_string(), &t.first_stage), (format!("ITC top {k}, ITM"), &t.two_stage)]
            {
                println!(
                    "| {:<20} | {:>6.2} | {:>6.2} | {:>6.2} | {:>7} | {:>10} |",
                    name,
                    100.0 * x.r1,
                    100.0 * x.r5,
                    100.0 * x.r10,
                    x.queries,
                    cands
                );
            }
            println!(
                "first stage: the positive is in the top {k} for {:.2}% of the queries (top 50: {:.2}%){}",
                100.0 * t.first_stage_recall_at_k,
                100.0 * t.first_stage_recall_at_50,
                if t.from_index { ", image embeddings from the index" } else { "" }
            );
            json["first_stage"] = serde_json::to_value(&t)?;
        }
        if let (Some(index), Some(ds)) = (&index, &data) {
            let pb = progress_bar(0, "embedding texts");
            let g = retrieval::gallery_recall(
                &m,
                &queries,
                self.direction,
                index,
                ds.as_ref(),
                self.model.batch_size,
                |n, total| {
                    pb.set_length(total as u64);
                    pb.inc(n as u64)
                },
            )?;
            pb.finish_and_clear();
            println!(
                "first stage over the whole index ({} {}): R@1 {:.2}%, R@5 {:.2}%, R@10 {:.2}%, R@50 {:.2}%, median rank {} ({} queries)",
                g.gallery,
                if self.direction == Direction::Tir { "images" } else { "distinct captions" },
                100.0 * g.result.r1,
                100.0 * g.result.r5,
                100.0 * g.result.r10,
                100.0 * g.r50,
                g.median_rank + 1,
                g.result.queries
            );
            json["first_stage"]["gallery"] = serde_json::to_value(&g)?;
        }
        if let Some(p) = &self.json {
            mvlt::files::write_atomic(p, serde_json::to_string_pretty(&json)?.as_bytes())?;
        }
        Ok(())
    }
}

pub fn retrieval(a: RetrievalArgs) -> Result<()> {
    run_on(a.model.device, &a)
}

#[derive(clap::Args)]
pub struct RecognitionArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The test data (any format).
    #[arg(long)]
    data: PathBuf,
    /// Evaluate only the validation split of a training run's data (val_fraction, seed of the run).
    #[arg(long, value_parser = super::parse_fraction)]
    val_fraction: Option<f64>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write the reports (per-class rows included) here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write confusion matrices PREFIX_main.png and PREFIX_sub.png.
    #[arg(long)]
    confusion: Option<PathBuf>,
}

fn print_per_class(title: &str, r: &Report, names: &[String]) {
    println!("{title}: per class");
    println!("  {:<24} {:>9} {:>9} {:>9} {:>8}", "class", "precision", "recall", "f1", "support");
    for c in &r.per_class {
        let name = names.get(c.label).map(String::as_str).unwrap_or("?");
        println!("  {:<24} {:>9.4} {:>9.4} {:>9.4} {:>8}", name, c.precision, c.recall, c.f1, c.support);
    }
}

impl BackendTask for &RecognitionArgs {
    type Output = ();
    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        let m = self.model.load::<B>(&device)?;
        let ds = open_dataset(&self.data)?;
        let rows = evaluated_rows(ds.as_ref(), self.val_fraction, self.seed);
        let pb = progress_bar(rows.len() as u64, "images");
        let r = recognition::evaluate(&m, ds.as_ref(), &rows, self.model.batch_size, |k| pb.inc(k as u64))?;
        pb.finish_and_clear();
        print_per_class("main category", &r.main, &r.main_names);
        print_per_class("sub-category", &r.sub, &r.sub_names);
        if let Some(note) = mvlt::search::unreadable_note(ds.as_ref(), &r.unreadable, "rows") {
            println!("{note}");
        }
        if r.unknown_class_rows > 0 {
            println!("note: {} rows have a category the model does not know and were left out", r.unknown_class_rows);
        }
        println!();
        println!("| recognition   | accuracy | macro-F1 | micro-F1 | weighted-F1 | images |");
        println!("|---------------|----------|----------|----------|-------------|--------|");
        for (name, rep) in [("main category", &r.main), ("sub-category", &r.sub)] {
            println!(
                "| {name:<13} | {:>8.2} | {:>8.2} | {:>8.2} | {:>11.2} | {:>6} |",
                100.0 * rep.accuracy,
                100.0 * rep.macro_f1,
                100.0 * rep.micro_f1,
                100.0 * rep.weighted_f1,
                rep.samples
            );
        }
        if let Some(p) = &self.json {
            mvlt::files::write_atomic(p, serde_json::to_string_pretty(&r)?.as_bytes())?;
        }
        if let Some(prefix) = &self.confusion {
            for (tag, names, (t, pr)) in [("main", &r.main_names, &r.main_pairs), ("sub", &r.sub_names, &r.sub_pairs)] {
                let path = PathBuf::from(format!("{}_{tag}.png", prefix.display()));
                crate::plots::plot_confusion(
                    &path,
                    &format!("{tag} category confusion (rows: truth, columns: prediction; row-normalised)"),
                    names,
                    t,
                    pr,
                )?;
                println!("confusion matrix: {}", path.display());
            }
        }
        Ok(())
    }
}

pub fn recognition(a: RecognitionArgs) -> Result<()> {
    run_on(a.model.device, &a)
}
