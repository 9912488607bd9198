//! Datasets: one interface, three on-disk formats.
//!
//! - [`FileDataset::open_jsonl`]: a team's own products, one JSON object per image (schema in the README).
//! - [`FashionGenH5`]: Fashion-Gen as distributed (HDF5), read lazily row by row.
//! - [`FileDataset::open_authors_layout`]: the MVLT authors' reorganised copy (images + pickled dicts).
//!
//! Rows that cannot be used are skipped, counted and reported ("skipped 3 of 260480 rows: ..."),
//! never dropped silently; a file that cannot be read at all is an error naming it.

use super::image::Pixels;
use crate::files::Confined;
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// What every reader yields per image (several images may share a product: poses).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    pub product_id: String,
    pub caption: String,
    pub category: String,
    pub subcategory: String,
}

/// Rows a reader left out, with the reason for each.
#[derive(Clone, Debug, Default)]
pub struct SkipReport {
    pub total_rows: usize,
    pub skipped: Vec<(String, String)>,
}

impl SkipReport {
    pub fn skip(&mut self, row: impl Into<String>, why: impl Into<String>) {
        self.skipped.push((row.into(), why.into()));
    }
    pub fn summary(&self) -> Option<String> {
        if self.skipped.is_empty() {
            return None;
        }
        let shown: Vec<String> = self.skipped.iter().take(5).map(|(r, w)| format!("{r}: {w}")).collect();
        Some(format!(
            "skipped {} of {} rows: {}{}",
            self.skipped.len(),
            self.total_rows,
            shown.join("; "),
            if self.skipped.len() > 5 { "; ..." } else { "" }
        ))
    }
}

pub trait Dataset: Send + Sync {
    /// Where the data came from, for messages.
    fn source(&self) -> String;
    fn records(&self) -> &[Record];
    /// Decode image `i` (lazy: large datasets are never held in memory).
    fn pixels(&self, i: usize) -> Result<Pixels>;
    fn skips(&self) -> &SkipReport;
    /// The image file of row `i`, for formats that keep one file per image.
    fn image_path(&self, _i: usize) -> Option<&Path> {
        None
    }
    fn len(&self) -> usize {
        self.records().len()
    }
    fn is_empty(&self) -> bool {
        self.records().is_empty()
    }
}

/// Open any supported dataset: a `.jsonl` catalogue, a `.h5` Fashion-Gen file, or a folder in the
/// authors' layout.
pub fn open_dataset(path: &Path) -> Result<Box<dyn Dataset>> {
    if path.is_dir() {
        if path.join("catalog.jsonl").exists() {
            return Ok(Box::new(FileDataset::open_jsonl(&path.join("catalog.jsonl"))?));
        }
        return Ok(Box::new(FileDataset::open_authors_layout(path)?));
    }
    match path.extension().and_then(|e| e.to_str()) {
        Some("jsonl") | Some("json") => Ok(Box::new(FileDataset::open_jsonl(path)?)),
        Some("h5") | Some("hdf5") => Ok(Box::new(FashionGenH5::open(path)?)),
        _ if !path.exists() => bail!("dataset {} does not exist", path.display()),
        _ => bail!("cannot tell the format of {}: expected a .jsonl catalogue, a Fashion-Gen .h5 file or an authors'-layout folder", path.display()),
    }
}

/// `vocab.txt` in a dataset's folder (the synthetic catalogue writes one): the folder itself, or
/// the folder of a catalogue or HDF5 file.
pub fn vocab_beside_data(data: &Path) -> Option<std::path::PathBuf> {
    let dir = if data.is_dir() { data.to_path_buf() } else { data.parent()?.to_path_buf() };
    let v = dir.join("vocab.txt");
    v.exists().then_some(v)
}

/// `vocab.txt` beside a weights file (training exports one into `final/`).
pub fn vocab_beside_weights(weights: &Path) -> Option<std::path::PathBuf> {
    let v = weights.parent()?.join("vocab.txt");
    v.exists().then_some(v)
}

/// Class ids: the sorted distinct names (deterministic; saved with a run).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassMap {
    pub main: Vec<String>,
    pub sub: Vec<String>,
}

impl ClassMap {
    pub fn from_records(records: &[Record]) -> ClassMap {
        let main: BTreeSet<&str> = records.iter().map(|r| r.category.as_str()).collect();
        let sub: BTreeSet<&str> = records.iter().map(|r| r.subcategory.as_str()).collect();
        ClassMap {
            main: main.into_iter().map(String::from).collect(),
            sub: sub.into_iter().map(String::from).collect(),
        }
    }
    pub fn main_id(&self, name: &str) -> Option<usize> {
        self.main.binary_search_by(|n| n.as_str().cmp(name)).ok()
    }
    pub fn sub_id(&self, name: &str) -> Option<usize> {
        self.sub.binary_search_by(|n| n.as_str().cmp(name)).ok()
    }
}

/// Split rows into (train, validation) by product, seeded: all views of a product land on the same
/// side, so validation never sees a training product.
pub fn split_by_product(records: &[Record], val_fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let (mut train, mut val) = (vec![], vec![]);
    for (i, r) in records.iter().enumerate() {
        if product_draw(seed, &r.product_id) < val_fraction {
            val.push(i);
        } else {
            train.push(i);
        }
    }
    (train, val)
}

/// How many distinct products the `rows` of `records` hold (a product's views count once).
pub fn count_products(records: &[Record], rows: &[usize]) -> usize {
    rows.iter().map(|&r| records[r].product_id.as_str()).collect::<BTreeSet<_>>().len()
}

/// A product's seeded draw, uniform in [0, 1): FNV-1a over seed and product id, then splitmix64's
/// finaliser (FNV alone leaves the high bits nearly constant for short similar ids): stable
/// across platforms and releases.
fn product_draw(seed: u64, product_id: &str) -> f64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in seed.to_le_bytes().iter().chain(product_id.as_bytes()) {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d049bb133111eb);
    h ^= h >> 31;
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// The rows of `products` products drawn at random (seeded; the draw is salted apart from
/// [`split_by_product`]'s, so a subset's validation split is its own share), in catalogue order:
/// a team-sized catalogue cut from a larger one. All rows when there are no more products.
pub fn sample_products(records: &[Record], products: usize, seed: u64) -> Vec<usize> {
    let salted = seed ^ 0x5355_4253_4554_0000;
    let mut draws: Vec<(f64, &str)> = records
        .iter()
        .map(|r| r.product_id.as_str())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .map(|p| (product_draw(salted, p), p))
        .collect();
    draws.sort_by(|a, b| a.0.total_cmp(&b.0));
    let kept: std::collections::HashSet<&str> = draws.into_iter().take(products).map(|(_, p)| p).collect();
    (0..records.len()).filter(|&i| kept.contains(records[i].product_id.as_str())).collect()
}

fn check_caption(caption: &str) -> Result<(), String> {
    if caption.trim().is_empty() {
        return Err("empty caption".into());
    }
    if caption.len() > super::text::MAX_CAPTION_BYTES {
        return Err(format!(
            "caption of {} bytes, over the limit of {} bytes",
            caption.len(),
            super::text::MAX_CAPTION_BYTES
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Formats with one image file per row: the JSONL catalogue and the authors' layout

pub struct FileDataset {
    /// The catalogue file or the layout's folder.
    pub source: PathBuf,
    /// The folder every image must stay inside: checked again at each read, so a file swapped for
    /// a symlink after opening is still refused.
    image_root: Confined,
    records: Vec<Record>,
    images: Vec<PathBuf>,
    skips: SkipReport,
}

impl Dataset for FileDataset {
    fn source(&self) -> String {
        self.source.display().to_string()
    }
    fn records(&self) -> &[Record] {
        &self.records
    }
    fn pixels(&self, i: usize) -> Result<Pixels> {
        let rel = self.images[i].strip_prefix(self.image_root.root()).unwrap_or(&self.images[i]);
        let path = self.image_root.resolve(rel).map_err(|e| anyhow!(e))?;
        Pixels::open(&path)
    }
    fn skips(&self) -> &SkipReport {
        &self.skips
    }
    fn image_path(&self, i: usize) -> Option<&Path> {
        Some(&self.images[i])
    }
}

/// Longest catalogue line (one product) read; longer lines are skipped and reported.
pub const MAX_LINE: usize = 1 << 20;

#[derive(Deserialize)]
struct JsonlRow {
    id: serde_json::Value,
    image: String,
    caption: String,
    category: String,
    subcategory: String,
    product_id: Option<serde_json::Value>,
}

fn id_string(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl FileDataset {
    /// A catalogue: one JSON object per line with `id`, `image` (path relative to the file),
    /// `caption`, `category`, `subcategory`, optional `product_id` (defaults to `id`).
    pub fn open_jsonl(path: &Path) -> Result<FileDataset> {
        use std::io::BufRead;
        crate::files::regular_file_size(path, "catalogue")?;
        let file = std::fs::File::open(path).with_context(|| format!("cannot read catalogue {}", path.display()))?;
        // Streamed line by line, each line at most MAX_LINE bytes: a catalogue's size is bounded
        // only by the disk, and one runaway line must not take the memory with it.
        let mut reader = std::io::BufReader::new(file);
        let image_root = Confined::new(path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")))?;
        let (mut records, mut images, mut skips) = (vec![], vec![], SkipReport::default());
        let mut first_line_of_id: std::collections::HashMap<String, usize> = Default::default();
        let mut line = Vec::new();
        for n in 1.. {
            line.clear();
            let got = std::io::Read::take(&mut reader, MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut line)
                .with_context(|| format!("cannot read catalogue {}", path.display()))?;
            if got == 0 {
                break;
            }
            let row = format!("{} line {n}", path.display());
            if line.len() > MAX_LINE && line.last() != Some(&b'\n') {
                // Skip the rest of the over-long line.
                reader.skip_until(b'\n').with_context(|| format!("cannot read catalogue {}", path.display()))?;
                skips.total_rows += 1;
                skips.skip(row, format!("line longer than {MAX_LINE} bytes"));
                continue;
            }
            let line = line.strip_suffix(b"\n").unwrap_or(&line);
            if line.iter().all(|b| b.is_ascii_whitespace()) {
                continue;
            }
            skips.total_rows += 1;
            let Ok(line) = std::str::from_utf8(line) else {
                skips.skip(row, "not valid UTF-8");
                continue;
            };
            let r: JsonlRow = match serde_json::from_str(line) {
                Ok(r) => r,
                Err(e) => {
                    skips.skip(
                        row,
                        format!("not a catalogue row ({e}); fields: id, image, caption, category, subcategory"),
                    );
                    continue;
                }
            };
            if let Err(why) = check_caption(&r.caption) {
                skips.skip(row, why);
                continue;
            }
            let image = match image_root.resolve(Path::new(&r.image)) {
                Ok(p) => p,
                Err(why) => {
                    skips.skip(row, why);
                    continue;
                }
            };
            if !image.is_file() {
                skips.skip(row, format!("image {} is not a regular file", image.display()));
                continue;
            }
            let id = id_string(&r.id);
            if let Some(first) = first_line_of_id.get(&id) {
                skips.skip(row, format!("duplicate id '{id}' (first on line {first}); ids must be unique per image"));
                continue;
            }
            first_line_of_id.insert(id.clone(), n);
            records.push(Record {
                product_id: r.product_id.as_ref().map(id_string).unwrap_or_else(|| id.clone()),
                id,
                caption: r.caption,
                category: r.category,
                subcategory: r.subcategory,
            });
            images.push(image);
        }
        if records.is_empty() {
            bail!(
                "catalogue {} has no usable rows{}",
                path.display(),
                skips.summary().map(|s| format!(" ({s})")).unwrap_or_default()
            );
        }
        Ok(FileDataset { source: path.to_path_buf(), image_root, records, images, skips })
    }
}

// ---------------------------------------------------------------------------------------------
// Fashion-Gen HDF5

pub struct FashionGenH5 {
    pub path: PathBuf,
    /// `input_image`, opened once (its header is not re-parsed per row).
    image: hdf5_reader::Dataset,
    records: Vec<Record>,
    /// HDF5 row of each record (rows may be skipped).
    rows: Vec<usize>,
    image_hw: (usize, usize),
    skips: SkipReport,
}

/// Fixed-length byte strings decoded as Latin-1 (the release's encoding), trailing NULs and
/// spaces removed; variable-length strings as the reader decodes them.
fn latin1_strings(ds: &hdf5_reader::Dataset, n: usize) -> Result<Vec<String>> {
    use hdf5_reader::Datatype;
    let out: Vec<String> = match ds.dtype() {
        Datatype::String { size: hdf5_reader::StringSize::Fixed(len), .. } => {
            let raw = ds.read_raw_bytes()?;
            raw.chunks(*len as usize)
                .map(|c| c.iter().map(|&b| b as char).collect::<String>().trim_end_matches(['\0', ' ']).to_string())
                .collect()
        }
        _ => ds.read_strings()?,
    };
    if out.len() != n {
        bail!("has {} entries, expected {n}", out.len());
    }
    Ok(out)
}

impl FashionGenH5 {
    pub const REQUIRED: [&'static str; 5] =
        ["input_image", "input_description", "input_category", "input_subcategory", "input_productID"];

    pub fn open(path: &Path) -> Result<FashionGenH5> {
        if !path.exists() {
            bail!("HDF5 file {} does not exist", path.display());
        }
        let file = hdf5_reader::Hdf5File::open(path)
            .map_err(|e| anyhow!("cannot read HDF5 file {}: {e} (truncated or not HDF5?)", path.display()))?;
        let get = |name: &str| {
            file.dataset(&format!("/{name}")).map_err(|e| {
                anyhow!(
                    "{} has no dataset '{name}' ({e}); Fashion-Gen files hold {}",
                    path.display(),
                    Self::REQUIRED.join(", ")
                )
            })
        };
        let image = get("input_image")?;
        let shape: Vec<usize> = image.shape().iter().map(|&d| d as usize).collect();
        if shape.len() != 4 || shape[3] != 3 {
            bail!("{}: input_image has shape {shape:?}, expected [N, H, W, 3]", path.display());
        }
        let n = shape[0];
        let ctx = |name: &str| format!("{}: dataset '{name}'", path.display());
        let captions = latin1_strings(&get("input_description")?, n).with_context(|| ctx("input_description"))?;
        let cats = latin1_strings(&get("input_category")?, n).with_context(|| ctx("input_category"))?;
        let subs = latin1_strings(&get("input_subcategory")?, n).with_context(|| ctx("input_subcategory"))?;
        let pid_ds = get("input_productID")?;
        let pids: Vec<i64> = pid_ds
            .read_array::<i32>()
            .map(|a| a.iter().map(|&x| x as i64).collect())
            .or_else(|_| pid_ds.read_array::<i64>().map(|a| a.iter().copied().collect()))
            .map_err(|e| anyhow!("{}: {e}", ctx("input_productID")))?;
        if pids.len() != n {
            bail!("{}: input_productID has {} entries, input_image {n}", path.display(), pids.len());
        }
        let poses = file.dataset("/input_pose").ok().and_then(|d| latin1_strings(&d, n).ok());
        let (mut records, mut rows, mut skips) = (vec![], vec![], SkipReport { total_rows: n, ..Default::default() });
        for i in 0..n {
            if let Err(why) = check_caption(&captions[i]) {
                skips.skip(format!("{} row {i}", path.display()), why);
                continue;
            }
            let pose = poses.as_ref().map(|p| p[i].clone()).unwrap_or_else(|| i.to_string());
            records.push(Record {
                id: format!("{}_{}", pids[i], pose),
                product_id: pids[i].to_string(),
                caption: captions[i].clone(),
                category: cats[i].clone(),
                subcategory: subs[i].clone(),
            });
            rows.push(i);
        }
        Ok(FashionGenH5 { path: path.to_path_buf(), image, records, rows, image_hw: (shape[1], shape[2]), skips })
    }
}

impl Dataset for FashionGenH5 {
    fn source(&self) -> String {
        self.path.display().to_string()
    }
    fn records(&self) -> &[Record] {
        &self.records
    }
    fn pixels(&self, i: usize) -> Result<Pixels> {
        use hdf5_reader::{SliceInfo, SliceInfoElem};
        let row = self.rows[i] as u64;
        let (h, w) = self.image_hw;
        let sel = SliceInfo {
            selections: vec![
                SliceInfoElem::Index(row),
                SliceInfoElem::Slice { start: 0, end: h as u64, step: 1 },
                SliceInfoElem::Slice { start: 0, end: w as u64, step: 1 },
                SliceInfoElem::Slice { start: 0, end: 3, step: 1 },
            ],
        };
        let arr = self
            .image
            .read_slice::<u8>(&sel)
            .map_err(|e| anyhow!("{} row {row}: cannot read image: {e}", self.path.display()))?;
        Ok(Pixels::from_hwc_rgb(w, h, arr.iter().copied().collect()))
    }
    fn skips(&self) -> &SkipReport {
        &self.skips
    }
}

// ---------------------------------------------------------------------------------------------
// The authors' layout

fn find_subdir(root: &Path, prefix: &str, suffix: &str) -> Result<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(root)
        .with_context(|| format!("cannot list {}", root.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_dir()
                && p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(prefix) && n.ends_with(suffix))
        })
        .collect();
    found.sort();
    found.into_iter().next().ok_or_else(|| {
        anyhow!(
            "{} has no {prefix}*{suffix} folder (the authors' layout: extracted_*_images/ and full_*_info_PAI/)",
            root.display()
        )
    })
}

fn sorted_files(dir: &Path, ext: &str) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some(ext))
        .collect();
    v.sort();
    Ok(v)
}

/// Read a pickle as plain data ([`crate::pickle::read_json`]). Unknown classes (numpy arrays in
/// the real files' `input_ids`) become null instead of being executed or rejected.
pub fn read_pickle(path: &Path) -> Result<serde_json::Value> {
    let bytes = crate::files::read_limited(path, "pickle", crate::files::MAX_SMALL_FILE_BYTES)?;
    crate::pickle::read_json(&bytes, MAX_PICKLE_OBJECTS)
        .map_err(|e| anyhow!("{} is not a readable pickle: {e:#}", path.display()))
}

/// Objects one per-image or per-query pickle may hold (a query of 101 candidates has about 500).
const MAX_PICKLE_OBJECTS: usize = 100_000;

pub fn pickle_str(dict: &serde_json::Value, key: &str) -> Result<String, String> {
    let Some(d) = dict.as_object() else { return Err("the pickle is not a dict".into()) };
    match d.get(key) {
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(serde_json::Value::Number(n)) if n.is_i64() => Ok(n.to_string()),
        Some(other) => Err(format!("key '{key}' is not a string ({})", crate::files::printable(&other.to_string()))),
        None => Err(format!("the dict has no '{key}' key")),
    }
}

impl FileDataset {
    /// The authors' layout: `extracted_*_images/<name>.png` paired by sorted name with
    /// `full_*_info_PAI/<name>.pkl`.
    pub fn open_authors_layout(root: &Path) -> Result<FileDataset> {
        let img_dir = find_subdir(root, "extracted_", "_images")?;
        let info_dir = find_subdir(root, "full_", "_info_PAI")?;
        let images = sorted_files(&img_dir, "png")?;
        let infos = sorted_files(&info_dir, "pkl")?;
        if images.len() != infos.len() {
            bail!(
                "{} holds {} images but {} holds {} pickles",
                img_dir.display(),
                images.len(),
                info_dir.display(),
                infos.len()
            );
        }
        // The reference pairs by sorted position; check that the names agree.
        let stem = |p: &PathBuf| p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let bad: Vec<String> = images
            .iter()
            .zip(&infos)
            .filter(|(a, b)| stem(a) != stem(b))
            .take(5)
            .map(|(a, b)| format!("{} vs {}", stem(a), stem(b)))
            .collect();
        if !bad.is_empty() {
            bail!("image and pickle names do not pair up in {}: {}", root.display(), bad.join(", "));
        }
        let (mut records, mut kept, mut skips) =
            (vec![], vec![], SkipReport { total_rows: images.len(), ..Default::default() });
        let image_root = Confined::new(&img_dir)?;
        for (img, info) in images.iter().zip(&infos) {
            let row = info.display().to_string();
            let img = match image_root.resolve(Path::new(img.file_name().unwrap_or_default())) {
                Ok(p) => p,
                Err(why) => {
                    skips.skip(row, why);
                    continue;
                }
            };
            let v = match read_pickle(info) {
                Ok(v) => v,
                Err(e) => {
                    skips.skip(row, e.to_string());
                    continue;
                }
            };
            let fields = (|| -> Result<Record, String> {
                Ok(Record {
                    id: stem(&img),
                    product_id: pickle_str(&v, "product_id")?,
                    caption: pickle_str(&v, "captions")?,
                    category: pickle_str(&v, "super_cls_name")?,
                    subcategory: pickle_str(&v, "sub_cls_name")?,
                })
            })();
            match fields.and_then(|r| check_caption(&r.caption).map(|_| r)) {
                Ok(r) => {
                    records.push(r);
                    kept.push(img);
                }
                Err(why) => skips.skip(row, why),
            }
        }
        Ok(FileDataset { source: root.to_path_buf(), image_root, records, images: kept, skips })
    }
}
