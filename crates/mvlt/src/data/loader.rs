//! Batches ready for the model: decode, crop, resize, mask and tokenize in worker threads, a few
//! batches ahead of the consumer.
//!
//! Every random choice of a sample (MLM corruption, ITM partner, grid mask) comes from an RNG seeded
//! by (seed, epoch, dataset index), and the epoch order from (seed, epoch): the batches are the same
//! whatever the number of workers or their timing.

use super::dataset::{ClassMap, Dataset, SkipReport};
use super::image::{apply_grid_mask, augmented_floats, grid_mask, preprocess_floats, Augment};
use super::text::{itm_pair, TextProcessor, IGNORE};
use anyhow::Result;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::sync::{mpsc, Arc, Mutex};

#[derive(Clone, Debug)]
pub struct LoaderConfig {
    pub batch_size: usize,
    pub image_size: usize,
    /// Text length T.
    pub max_len: usize,
    pub seed: u64,
    pub workers: usize,
    /// Batches prepared ahead of the consumer.
    pub prefetch: usize,
    pub shuffle: bool,
    /// Pre-training corruptions (MLM, ITM pairing, grid mask); off for fine-tuning and evaluation.
    pub pretrain: bool,
    /// Side of the reconstruction mask grid (16 in the reference).
    pub mask_grid: usize,
    /// Which word pieces MLM chooses (the reference: 15% of every piece).
    pub mlm: super::text::MlmPolicy,
    /// Pre-training with ITC: also carry each image's own, uncorrupted caption and the product ids
    /// (`Batch::caption_ids`, `Batch::product_ids`). Off otherwise, so a run without ITC neither
    /// tokenizes twice nor ships those arrays to the device.
    pub own_captions: bool,
    /// MLM labels on ITM negatives too (the reference); off: on matched pairs only
    /// (`TrainConfig::mlm_on_negatives`).
    pub mlm_on_negatives: bool,
    /// Random crops and flips of each training image (`TrainConfig::augment_*`); never for
    /// validation or evaluation.
    pub augment: Option<Augment>,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            batch_size: 8,
            image_size: 256,
            max_len: 128,
            seed: 0,
            workers: 2,
            prefetch: 4,
            shuffle: true,
            pretrain: true,
            mask_grid: 16,
            mlm: super::text::MlmPolicy::default(),
            own_captions: false,
            mlm_on_negatives: true,
            augment: None,
        }
    }
}

/// One batch, row-major host arrays.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// Dataset indices of the rows (samples whose image failed to load are left out).
    pub indices: Vec<usize>,
    /// `[B, 3, S, S]` in [0, 1].
    pub images: Vec<f32>,
    /// `[B, 3, S, S]`, half the grid cells set to 1e-6 (empty unless pre-training).
    pub masked_images: Vec<f32>,
    /// `[B, T]`, MLM-corrupted when pre-training.
    pub input_ids: Vec<i64>,
    /// `[B, T]`, original id where corrupted, -1 elsewhere.
    pub mlm_labels: Vec<i64>,
    /// `[B]`: 1 when the caption is the image's own.
    pub itm_labels: Vec<i64>,
    pub sup_labels: Vec<i64>,
    pub sub_labels: Vec<i64>,
    /// `[B, T]` each image's own caption, not corrupted (empty unless `own_captions`).
    pub caption_ids: Vec<i64>,
    /// `[B]` product ids of the rows (empty unless `own_captions`).
    pub product_ids: Vec<String>,
    /// `[CLS]` and `[SEP]`: the empty caption.
    pub empty_caption: [i64; 2],
    pub image_size: usize,
    pub text_len: usize,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.indices.len()
    }
    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }
}

struct Sample {
    index: usize,
    image: Vec<f32>,
    masked: Vec<f32>,
    ids: Vec<i64>,
    mlm: Vec<i64>,
    itm: i64,
    sup: i64,
    sub: i64,
    own_ids: Vec<i64>,
}

pub struct Loader {
    pub dataset: Arc<dyn Dataset>,
    pub text: Arc<TextProcessor>,
    pub classes: Arc<ClassMap>,
    pub config: LoaderConfig,
    /// Which dataset rows this loader draws from (e.g. the training split).
    pub rows: Arc<Vec<usize>>,
    product_ids: Arc<Vec<String>>,
    pool: Arc<rayon::ThreadPool>,
    /// Rows whose sample could not be made (an unreadable image, say), each once, with reasons;
    /// `total_rows` is the rows this loader draws from.
    pub skips: Arc<Mutex<SkipReport>>,
    /// The rows in `skips`, so that a row that fails every epoch is reported once.
    skipped_rows: Arc<Mutex<std::collections::HashSet<usize>>>,
    /// Images with no black pixel after dithering (used whole; the reference crashes there).
    pub uncropped: Arc<std::sync::atomic::AtomicUsize>,
}

impl Loader {
    pub fn new(
        dataset: Arc<dyn Dataset>,
        text: Arc<TextProcessor>,
        classes: Arc<ClassMap>,
        rows: Vec<usize>,
        config: LoaderConfig,
    ) -> Result<Loader> {
        let product_ids = Arc::new(dataset.records().iter().map(|r| r.product_id.clone()).collect());
        let n_rows = rows.len();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(config.workers.max(1))
            .thread_name(|i| format!("mvlt-data-{i}"))
            .build()?;
        Ok(Loader {
            dataset,
            text,
            classes,
            config,
            rows: Arc::new(rows),
            product_ids,
            pool: Arc::new(pool),
            skips: Arc::new(Mutex::new(SkipReport { total_rows: n_rows, skipped: vec![] })),
            skipped_rows: Default::default(),
            uncropped: Default::default(),
        })
    }

    pub fn batches_per_epoch(&self) -> usize {
        self.rows.len().div_ceil(self.config.batch_size)
    }

    /// The row order of an epoch.
    pub fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let mut order = (*self.rows).clone();
        if self.config.shuffle {
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(
                self.config.seed.wrapping_add(epoch.wrapping_mul(0x9E37_79B9)),
            ));
        }
        order
    }

    fn sample(&self, index: usize, epoch: u64) -> Result<Sample> {
        let cfg = &self.config;
        let seed =
            cfg.seed ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03) ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let rec = &self.dataset.records()[index];
        let pixels = self.dataset.pixels(index)?;
        let (image, crop_box) = match &cfg.augment {
            // Its own stream, so that the draws below (ITM pairing, masks) are those of a run
            // without augmentation.
            Some(aug) => {
                let mut aug_rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5EED_A06E_0000_0001);
                augmented_floats(&pixels, cfg.image_size, aug, &mut aug_rng)?
            }
            None => preprocess_floats(&pixels, cfg.image_size)?,
        };
        if crop_box.is_none() && self.uncropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed) == 0 {
            tracing::warn!(
                "{} ({}) has no black pixel after dithering; such images are used whole (said once per dataset)",
                self.dataset.source(),
                rec.id
            );
        }
        let (caption_index, itm) = if cfg.pretrain { itm_pair(index, &self.product_ids, &mut rng) } else { (index, 1) };
        let enc = self.text.encode(&self.dataset.records()[caption_index].caption, cfg.max_len)?;
        let own_ids = match (cfg.pretrain && cfg.own_captions, caption_index == index) {
            (false, _) => vec![],
            (true, true) => enc.input_ids.clone(),
            (true, false) => self.text.encode(&rec.caption, cfg.max_len)?.input_ids,
        };
        let (ids, mlm, masked) = if cfg.pretrain {
            let (ids, mut mlm) = self.text.mask_tokens(&enc.input_ids, &cfg.mlm, &mut rng);
            if itm == 0 && !cfg.mlm_on_negatives {
                mlm.fill(IGNORE);
            }
            let mut masked = image.clone();
            apply_grid_mask(&mut masked, cfg.image_size, cfg.mask_grid, &grid_mask(cfg.mask_grid, &mut rng))?;
            (ids, mlm, masked)
        } else {
            (enc.input_ids, vec![IGNORE; cfg.max_len], vec![])
        };
        let class = |id: Option<usize>| id.map(|i| i as i64).unwrap_or(-1);
        Ok(Sample {
            index,
            image,
            masked,
            ids,
            mlm,
            itm,
            sup: class(self.classes.main_id(&rec.category)),
            sub: class(self.classes.sub_id(&rec.subcategory)),
            own_ids,
        })
    }

    /// Build batch `b` of `epoch` (blocking, in the worker pool).
    pub fn batch(&self, epoch: u64, order: &[usize], b: usize) -> Batch {
        let bs = self.config.batch_size;
        let rows = &order[b * bs..((b + 1) * bs).min(order.len())];
        let samples: Vec<Result<Sample>> =
            self.pool.install(|| rows.par_iter().map(|&i| self.sample(i, epoch)).collect());
        let mut batch = Batch {
            indices: vec![],
            images: vec![],
            masked_images: vec![],
            input_ids: vec![],
            mlm_labels: vec![],
            itm_labels: vec![],
            sup_labels: vec![],
            sub_labels: vec![],
            caption_ids: vec![],
            product_ids: vec![],
            empty_caption: [self.text.cls_id, self.text.sep_id],
            image_size: self.config.image_size,
            text_len: self.config.max_len,
        };
        for (s, &row) in samples.into_iter().zip(rows) {
            match s {
                Ok(s) => {
                    batch.indices.push(s.index);
                    batch.images.extend(s.image);
                    batch.masked_images.extend(s.masked);
                    batch.input_ids.extend(s.ids);
                    batch.mlm_labels.extend(s.mlm);
                    batch.itm_labels.push(s.itm);
                    batch.sup_labels.push(s.sup);
                    batch.sub_labels.push(s.sub);
                    if !s.own_ids.is_empty() {
                        batch.caption_ids.extend(s.own_ids);
                        batch.product_ids.push(self.product_ids[s.index].clone());
                    }
                }
                Err(e) => {
                    if self.skipped_rows.lock().unwrap_or_else(|p| p.into_inner()).insert(row) {
                        let mut skips = self.skips.lock().unwrap_or_else(|p| p.into_inner());
                        skips.skip(
                            format!(
                                "{} item {} ({})",
                                self.dataset.source(),
                                row,
                                crate::files::printable(&self.dataset.records()[row].id)
                            ),
                            format!("{e:#}"),
                        );
                    }
                    continue;
                }
            }
        }
        batch
    }

    /// Iterate the batches of one epoch from batch `start` on, prepared `prefetch` batches ahead on
    /// a producer thread.
    pub fn epoch(self: &Arc<Self>, epoch: u64, start: usize) -> impl Iterator<Item = Batch> {
        self.epoch_where(epoch, start, |_| true).flatten()
    }

    /// [`epoch`](Self::epoch), one item per batch position, but only the batches `keep` wants are
    /// made (`None` for the others): a rank of a distributed run reads only its own share.
    pub fn epoch_where(
        self: &Arc<Self>,
        epoch: u64,
        start: usize,
        keep: impl Fn(usize) -> bool + Send + 'static,
    ) -> impl Iterator<Item = Option<Batch>> {
        let (tx, rx) = mpsc::sync_channel(self.config.prefetch.max(1));
        let me = Arc::clone(self);
        std::thread::spawn(move || {
            let order = me.epoch_order(epoch);
            for b in start..me.batches_per_epoch() {
                if tx.send(keep(b).then(|| me.batch(epoch, &order, b))).is_err() {
                    break; // the consumer stopped
                }
            }
        });
        rx.into_iter()
    }
}
