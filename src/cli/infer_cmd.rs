//! `mvlt score`, `mvlt classify`, `mvlt search`.
use crate::cli::run_on;
use anyhow::{bail, Context, Result};
use burn::tensor::backend::Backend;
use mvlt::data::dataset::open_dataset;
use mvlt::data::image::Pixels;
use mvlt::device::{BackendTask, DeviceSpec};
use mvlt::infer::{LoadOptions, Model};
use mvlt::progress::progress_bar;
use mvlt::search::ranking::Ranking;
use mvlt::search::{filter_rows, Hit, SearchQuery};
use std::collections::HashMap;
use std::path::PathBuf;

/// How to load a model (shared by the inference and evaluation commands).
#[derive(clap::Args, Clone)]
pub struct ModelArgs {
    /// Trained weights (final/model.safetensors of a run, a checkpoint, or the authors' .pth).
    #[arg(long)]
    pub weights: PathBuf,
    /// Architecture, when the weights do not carry it (a preset or a config file).
    #[arg(long)]
    pub config: Option<String>,
    /// Vocabulary (default: vocab.txt beside the weights).
    #[arg(long)]
    pub vocab: Option<PathBuf>,
    /// Class names: classes.json of a run or the authors' class_names.json (default: beside the weights).
    #[arg(long)]
    pub classes: Option<PathBuf>,
    /// Image side to run at (default: the training size of our weights, 256 for the authors').
    #[arg(long)]
    pub image_size: Option<usize>,
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    /// Pairs per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
}

impl ModelArgs {
    pub fn load<B: Backend>(&self, device: &B::Device) -> Result<Model<B>> {
        let o = LoadOptions {
            config: self.config.clone(),
            vocab: self.vocab.clone(),
            classes: self.classes.clone(),
            image_size: self.image_size,
            non_strict: false,
        };
        Model::load(&self.weights, &o, device)
    }
}

#[derive(clap::Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    image: PathBuf,
    /// One or more texts to score against the image.
    #[arg(long, required = true)]
    text: Vec<String>,
    #[arg(long)]
    json: bool,
}

impl BackendTask for &ScoreArgs {
    type Output = ();
    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        let m = self.model.load::<B>(&device)?;
        let img = m.prepare_image(&Pixels::open(&self.image)?)?;
        let ids: Vec<Vec<i64>> = self.text.iter().map(|t| m.prepare_text(t)).collect::<Result<_>>()?;
        let imgs: Vec<&[f32]> = ids.iter().map(|_| img.as_slice()).collect();
        let p = m.match_probs(&imgs, &ids.iter().map(|v| v.as_slice()).collect::<Vec<_>>())?;
        for (t, p) in self.text.iter().zip(p) {
            if self.json {
                println!("{}", serde_json::json!({"image": self.image, "text": t, "match_probability": p}));
            } else {
                println!("{p:.4}  {t}");
            }
        }
        Ok(())
    }
}

pub fn score(a: ScoreArgs) -> Result<()> {
    run_on(a.model.device, &a)
}

#[derive(clap::Args)]
pub struct ClassifyArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    image: PathBuf,
    /// The product's caption (the recognition heads read it, as in the reference); optional.
    #[arg(long)]
    text: Option<String>,
    #[arg(long, default_value_t = 5)]
    top: usize,
    #[arg(long)]
    json: bool,
}

impl BackendTask for &ClassifyArgs {
    type Output = ();
    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        let m = self.model.load::<B>(&device)?;
        let c = m.classify(&Pixels::open(&self.image)?, self.text.as_deref(), self.top)?;
        if self.json {
            println!("{}", serde_json::to_string(&c)?);
            return Ok(());
        }
        for (title, list) in [("main category", &c.main), ("sub-category", &c.sub)] {
            println!("{title}:");
            for (name, p) in list {
                println!("  {p:.4}  {name}");
            }
        }
        Ok(())
    }
}

pub fn classify(a: ClassifyArgs) -> Result<()> {
    run_on(a.model.device, &a)
}

#[derive(clap::Args)]
pub struct SearchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The catalogue: a JSONL catalogue, Fashion-Gen .h5 or authors' folder.
    #[arg(long)]
    catalog: PathBuf,
    /// Text -> products.
    #[arg(long, conflicts_with = "image")]
    text: Option<String>,
    /// Image -> captions.
    #[arg(long)]
    image: Option<PathBuf>,
    #[arg(long, default_value_t = 10)]
    top: usize,
    #[arg(long)]
    category: Option<String>,
    #[arg(long)]
    subcategory: Option<String>,
    /// Score at most this many catalogue rows (after the filters, in catalogue order).
    #[arg(long)]
    max_candidates: Option<usize>,
    /// Write a contact sheet of the hits' images (text search).
    #[arg(long)]
    sheet: Option<PathBuf>,
    #[arg(long)]
    json: bool,
    /// A contrastive index of the catalogue (mvlt index, same weights): a text search ranks every
    /// indexed image by similarity first and ITM re-ranks only the top --first-stage-k.
    #[arg(long)]
    index: Option<PathBuf>,
    #[arg(long, default_value_t = 50)]
    first_stage_k: usize,
    /// With --index: how the first stage's top k are ordered, instead of the ranking the index
    /// measured best: embeddings, itm or itm+similarity.
    #[arg(long, value_parser = parse_ranking, requires = "index")]
    ranking: Option<Ranking>,
}

pub fn parse_ranking(s: &str) -> Result<Ranking, String> {
    s.parse().map_err(|e: anyhow::Error| e.to_string())
}

impl BackendTask for &SearchArgs {
    type Output = ();
    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        let t0 = std::time::Instant::now();
        let m = self.model.load::<B>(&device)?;
        let ds = open_dataset(&self.catalog)?;
        let rows = filter_rows(ds.as_ref(), self.category.as_deref(), self.subcategory.as_deref(), self.max_candidates);
        if rows.is_empty() {
            bail!(
                "no catalogue row passes the filters (category {:?}, subcategory {:?})",
                self.category,
                self.subcategory
            );
        }
        let image;
        let query = match (&self.text, &self.image) {
            (Some(t), None) => SearchQuery::Text(t),
            (None, Some(p)) => {
                image = Pixels::open(p)?;
                SearchQuery::Image(&image)
            }
            _ => bail!("give --text (text -> products) or --image (image -> captions)"),
        };
        // With an index: the first stage picks the candidates ITM scores, and keeps its similarity.
        let mut similarity: HashMap<usize, f32> = HashMap::new();
        let mut loaded = t0.elapsed();
        let mut first_stage = None;
        let rows = match (&self.index, &query) {
            (None, _) => rows,
            (Some(path), SearchQuery::Text(t)) => {
                let index = mvlt::search::index::CatalogIndex::open_for(path, &self.model.weights, m.config.itc_dim)?;
                let mut fs = mvlt::search::index::FirstStage::new(index, self.first_stage_k, ds.as_ref())?;
                fs.set_ranking(self.ranking);
                loaded = t0.elapsed();
                let q = m.caption_embeddings(&[t])?.remove(0);
                let top = fs.pick(&q, &rows, ds.as_ref())?;
                first_stage = Some((t0.elapsed() - loaded, rows.len(), fs));
                similarity.extend(top.iter().copied());
                top.into_iter().map(|(r, _)| r).collect()
            }
            (Some(_), SearchQuery::Image(_)) => {
                bail!("--index holds image embeddings, for text queries; search --image without it (exhaustive)")
            }
        };
        let pb = progress_bar(rows.len() as u64, "scoring");
        let scoring = std::time::Instant::now();
        let searched = m.search(ds.as_ref(), &rows, query, self.model.batch_size, |k| pb.inc(k as u64))?;
        let scoring = scoring.elapsed();
        pb.finish_and_clear();
        if let Some(note) = mvlt::search::unreadable_note(ds.as_ref(), &searched.unreadable, "catalogue images") {
            eprintln!("{note}");
        }
        let mut hits = searched.hits;
        for h in &mut hits {
            h.similarity = similarity.get(&h.row).copied();
        }
        if let Some((.., fs)) = &first_stage {
            let r = fs.ranking;
            let key = |h: &Hit| r.score(h.score, h.similarity.unwrap_or(0.0));
            hits.sort_by(|a, b| key(b).total_cmp(&key(a)));
        }
        let top: Vec<&Hit> = hits.iter().take(self.top).collect();
        if self.json {
            // The hits alone on standard output (as before rankings were chosen); the ranking on
            // standard error.
            if let Some((.., fs)) = &first_stage {
                eprintln!("ranked by {} ({}, {})", fs.ranking, fs.ranking.describe(), fs.ranking_from);
            }
            println!("{}", serde_json::to_string(&top)?);
        } else {
            println!(
                "{:>4}  {:>7}  {:>10}  {:<14} {:<18} {:<16} caption",
                "rank", "ITM", "similarity", "id", "sub-category", "product"
            );
            for (i, h) in top.iter().enumerate() {
                let cap: String = h.caption.chars().take(70).collect();
                let sim = h.similarity.map(|s| format!("{s:.4}")).unwrap_or_else(|| "-".into());
                println!(
                    "{:>4}  {:>7.4}  {sim:>10}  {:<14} {:<18} {:<16} {cap}",
                    i + 1,
                    h.score,
                    h.id,
                    h.subcategory,
                    h.product_id
                );
            }
            let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
            match &first_stage {
                Some((d, n, fs)) => println!(
                    "(ranked by {} ({}, {}); {} candidates scored by ITM in {:.0} ms after a first stage over {n} \
                     indexed images in {:.1} ms; loading the model, catalogue and index took {:.0} ms)",
                    fs.ranking,
                    fs.ranking.describe(),
                    fs.ranking_from,
                    hits.len(),
                    ms(scoring),
                    ms(*d),
                    ms(loaded)
                ),
                None => println!(
                    "({} of {} candidates scored by ITM in {:.0} ms; loading took {:.0} ms)",
                    hits.len(),
                    rows.len(),
                    ms(scoring),
                    ms(loaded)
                ),
            }
        }
        if let Some(sheet) = &self.sheet {
            let rows: Vec<usize> = top.iter().map(|h| h.row).collect();
            contact_sheet(ds.as_ref(), &rows, 5, 160, sheet)?;
            println!("contact sheet: {}", sheet.display());
        }
        Ok(())
    }
}

pub fn search(a: SearchArgs) -> Result<()> {
    run_on(a.model.device, &a)
}

#[derive(clap::Args)]
pub struct IndexArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    catalog: PathBuf,
    /// The index file to write (safetensors); INDEX.partial holds an interrupted build's progress.
    #[arg(long)]
    out: PathBuf,
    /// The settings of the run that trained the weights (its config.toml): its split by product
    /// names the held-out products on which the three rankings (embeddings, itm, itm+similarity)
    /// are measured, and the best is recorded for search and serve. Default: the config.toml of
    /// the run whose final/ folder holds the weights; without one nothing is measured and
    /// searches re-rank by ITM.
    #[arg(long)]
    split_from: Option<PathBuf>,
    /// Text queries of held-out products the rankings are measured on.
    #[arg(long, default_value_t = 100)]
    ranking_queries: usize,
    /// Candidates per query (fewer when the held-out products are fewer).
    #[arg(long, default_value_t = 101)]
    ranking_candidates: usize,
    /// ITM re-ranks this many of the first stage's candidates in the measurement.
    #[arg(long, default_value_t = 10)]
    ranking_k: usize,
}

impl IndexArgs {
    /// The settings file whose split names the held-out products, if any.
    fn split_settings(&self) -> Option<PathBuf> {
        self.split_from.clone().or_else(|| {
            let run = self.model.weights.parent()?.parent()?;
            Some(run.join("config.toml")).filter(|p| p.is_file())
        })
    }

    /// The catalogue rows the weights did not train on, by the run's split, or why there are none.
    fn held_out(&self, ds: &dyn mvlt::data::dataset::Dataset) -> Result<Option<Vec<usize>>> {
        let Some(path) = self.split_settings() else { return Ok(None) };
        let text = mvlt::files::read_text_limited(&path, "run settings", mvlt::files::MAX_SMALL_FILE_BYTES)?;
        let cfg = mvlt::train::config::TrainConfig::resolve(&text, &[])
            .with_context(|| format!("{} (--split-from) is not a run's settings", path.display()))?;
        let same = |p: &std::path::Path| {
            let canon = |q: &std::path::Path| std::fs::canonicalize(q).ok();
            canon(p).is_some() && canon(p) == canon(&self.catalog)
        };
        Ok(Some(match &cfg.data {
            // Every row outside its training split: the validation products, and any
            // sub-categories it held apart.
            mvlt::train::config::DataSource::Path(p) if same(p) => {
                let train: std::collections::HashSet<usize> = cfg.split(ds.records()).0.into_iter().collect();
                (0..ds.len()).filter(|r| !train.contains(r)).collect()
            }
            // Trained on another catalogue: none of these products was seen.
            _ => (0..ds.len()).collect(),
        }))
    }
}

impl BackendTask for &IndexArgs {
    type Output = ();
    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        let m = self.model.load::<B>(&device)?;
        if !m.config.heads.itc {
            bail!(
                "{} has no contrastive (ITC) head: index with weights pre-trained with --with-itc (mvlt demo's are)",
                self.model.weights.display()
            );
        }
        let ds = open_dataset(&self.catalog)?;
        // Read the run's settings first: a bad --split-from fails before the embedding work.
        let held_out = self.held_out(ds.as_ref())?;
        let pb = progress_bar(ds.len() as u64, "indexing");
        let t0 = std::time::Instant::now();
        let (weights, batch) = (&self.model.weights, self.model.batch_size);
        let mut index =
            mvlt::search::index::build(&m, weights, ds.as_ref(), &self.out, batch, 4096, |k| pb.inc(k as u64))?;
        pb.finish_and_clear();
        let secs = t0.elapsed().as_secs_f64();
        println!(
            "indexed {} images in {secs:.1} s ({:.0} images/s), {} bytes per image: {}",
            index.len(),
            index.len() as f64 / secs.max(1e-9),
            index.dim * 4,
            self.out.display()
        );
        let products = |rows: &[usize]| mvlt::data::dataset::count_products(ds.records(), rows);
        match held_out {
            None => println!(
                "ranking: not measured (no run settings beside the weights; give --split-from RUN/config.toml): \
                 searches re-rank by ITM"
            ),
            Some(rows) if products(&rows) < 2 => {
                println!("ranking: not measured ({} held-out products): searches re-rank by ITM", products(&rows))
            }
            Some(rows) => {
                let pb = progress_bar(self.ranking_queries.min(products(&rows)) as u64, "measuring rankings");
                let choice = mvlt::search::ranking::measure(
                    &m,
                    &index,
                    ds.as_ref(),
                    &rows,
                    self.ranking_queries,
                    self.ranking_candidates,
                    self.ranking_k,
                    0,
                    || pb.inc(1),
                )?;
                pb.finish_and_clear();
                println!("ranking: {}", mvlt::search::ranking::summary(&choice));
                index.ranking = Some(choice);
                index.save(&self.out)?;
            }
        }
        Ok(())
    }
}

pub fn index(a: IndexArgs) -> Result<()> {
    run_on(a.model.device, &a)
}

/// Images of `rows` in a grid of `cols` columns, `cell` pixels each, in order.
pub fn contact_sheet(
    ds: &dyn mvlt::data::dataset::Dataset,
    rows: &[usize],
    cols: usize,
    cell: u32,
    path: &std::path::Path,
) -> Result<()> {
    let per_line = cols.max(1);
    let cols = rows.len().clamp(1, per_line) as u32;
    let lines = rows.len().div_ceil(per_line).max(1) as u32;
    let mut grid = image::RgbImage::from_pixel(cell * cols, cell * lines, image::Rgb([255, 255, 255]));
    for (i, &r) in rows.iter().enumerate() {
        let p = ds.pixels(r)?;
        let img = image::RgbImage::from_raw(p.width as u32, p.height as u32, p.data).context("image buffer")?;
        let img = image::imageops::resize(&img, cell, cell, image::imageops::FilterType::Triangle);
        let (x, y) = ((i % per_line) as u32 * cell, (i / per_line) as u32 * cell);
        image::imageops::overlay(&mut grid, &img, x as i64, y as i64);
    }
    grid.save(path).with_context(|| format!("cannot write {}", path.display()))
}
