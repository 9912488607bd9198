//! The synthetic catalogue and the batch loader: deterministic, parallel, and honest about skips.
mod common;

use mvlt::data::dataset::{ClassMap, Dataset, FileDataset};
use mvlt::data::loader::{Loader, LoaderConfig};
use mvlt::data::synth::write_catalog;
use mvlt::data::text::{TextProcessor, IGNORE};
use std::sync::Arc;

fn loader(dir: &std::path::Path, workers: usize, seed: u64) -> Arc<Loader> {
    loader_with(dir, workers, seed, true)
}

fn loader_with(dir: &std::path::Path, workers: usize, seed: u64, mlm_on_negatives: bool) -> Arc<Loader> {
    let ds: Arc<dyn Dataset> = Arc::new(FileDataset::open_jsonl(&dir.join("catalog.jsonl")).unwrap());
    let text = Arc::new(TextProcessor::from_vocab_file(&dir.join("vocab.txt")).unwrap());
    let classes = Arc::new(ClassMap::from_records(ds.records()));
    let rows = (0..ds.len()).collect();
    let cfg = LoaderConfig {
        batch_size: 5,
        image_size: 32,
        max_len: 24,
        seed,
        workers,
        prefetch: 2,
        mlm_on_negatives,
        ..Default::default()
    };
    Arc::new(Loader::new(ds, text, classes, rows, cfg).unwrap())
}

#[test]
fn synth_is_deterministic_and_readable() {
    let (a, b) = (common::tempdir("synth-a"), common::tempdir("synth-b"));
    assert_eq!(write_catalog(&a, 30, 7, 48, |_| {}).unwrap(), 30);
    write_catalog(&b, 30, 7, 48, |_| {}).unwrap();
    assert_eq!(std::fs::read(a.join("catalog.jsonl")).unwrap(), std::fs::read(b.join("catalog.jsonl")).unwrap());
    assert_eq!(
        std::fs::read(a.join("images/100003_1.png")).unwrap(),
        std::fs::read(b.join("images/100003_1.png")).unwrap()
    );
    let cat = FileDataset::open_jsonl(&a.join("catalog.jsonl")).unwrap();
    assert_eq!(cat.len(), 30);
    assert!(cat.skips().summary().is_none());
    // Several views per product: retrieval has true multi-view positives.
    let products: std::collections::BTreeSet<_> = cat.records().iter().map(|r| &r.product_id).collect();
    assert!(products.len() < 20);
    let text = TextProcessor::from_vocab_file(&a.join("vocab.txt")).unwrap();
    let unk = cat
        .records()
        .iter()
        .map(|r| text.encode(&r.caption, 128).unwrap().input_ids.iter().filter(|&&i| i == text.unk_id).count())
        .sum::<usize>();
    assert_eq!(unk, 0, "the built-in vocabulary covers every caption word");
}

#[test]
fn batches_do_not_depend_on_worker_count() {
    let dir = common::tempdir("loader");
    write_catalog(&dir, 23, 3, 40, |_| {}).unwrap();
    let one: Vec<_> = loader(&dir, 1, 9).epoch(0, 0).collect();
    let two: Vec<_> = loader(&dir, 2, 9).epoch(0, 0).collect();
    assert_eq!(one.len(), 5);
    assert_eq!(one, two);
    let b = &one[0];
    assert_eq!(b.len(), 5);
    assert_eq!(b.images.len(), 5 * 3 * 32 * 32);
    assert_eq!(b.masked_images.len(), b.images.len());
    assert_eq!(b.input_ids.len(), 5 * 24);
    assert!(b.mlm_labels.iter().any(|&l| l != IGNORE));
    assert!(b.sup_labels.iter().all(|&l| l >= 0) && b.sub_labels.iter().all(|&l| l >= 0));
    // Another epoch is another order and other corruptions; resuming mid-epoch gives the same rest.
    let other: Vec<_> = loader(&dir, 2, 9).epoch(1, 0).collect();
    assert_ne!(one[0].indices, other[0].indices);
    let resumed: Vec<_> = loader(&dir, 2, 9).epoch(0, 2).collect();
    assert_eq!(resumed, one[2..]);
    let all: std::collections::BTreeSet<usize> = one.iter().flat_map(|b| b.indices.clone()).collect();
    assert_eq!(all.len(), 23, "every row exactly once per epoch");
}

/// `mlm_on_negatives = false`: mismatched pairs carry no MLM label, yet their text is corrupted
/// exactly as with labels (same ids), so a [MASK] in the input says nothing about the match.
/// Matched pairs are untouched.
#[test]
fn mlm_on_matched_pairs_only() {
    let dir = common::tempdir("loader-mlm-matched");
    write_catalog(&dir, 40, 5, 32, |_| {}).unwrap();
    let all: Vec<_> = loader_with(&dir, 1, 4, true).epoch(0, 0).collect();
    let matched: Vec<_> = loader_with(&dir, 1, 4, false).epoch(0, 0).collect();
    let (mut negatives, mut labelled_positives) = (0, 0);
    for (a, m) in all.iter().zip(&matched) {
        assert_eq!(a.input_ids, m.input_ids, "the corruption itself does not change");
        assert_eq!(a.itm_labels, m.itm_labels);
        for (row, &itm) in a.itm_labels.iter().enumerate() {
            let (la, lm) = (&a.mlm_labels[row * 24..(row + 1) * 24], &m.mlm_labels[row * 24..(row + 1) * 24]);
            if itm == 0 {
                negatives += 1;
                assert!(lm.iter().all(|&l| l == IGNORE), "a negative pair carries MLM labels");
            } else {
                assert_eq!(la, lm);
                labelled_positives += la.iter().any(|&l| l != IGNORE) as usize;
            }
        }
    }
    assert!(negatives > 5 && labelled_positives > 5, "{negatives} negatives, {labelled_positives} labelled positives");
}

#[test]
fn corrupt_images_are_skipped_and_reported() {
    let dir = common::tempdir("loader-bad");
    write_catalog(&dir, 10, 4, 40, |_| {}).unwrap();
    std::fs::write(dir.join("images/100001_1.png"), b"\x89PNG truncated").unwrap();
    let l = loader(&dir, 2, 1);
    let seen: usize = l.epoch(0, 0).map(|b| b.len()).sum();
    assert_eq!(seen, 9);
    let s = l.skips.lock().unwrap().summary().unwrap();
    assert!(s.contains("skipped 1 of 1") && s.contains("100001_1") && s.contains("cannot decode"), "{s}");
}

#[test]
fn images_without_black_pixels_are_used_whole_and_counted() {
    let dir = common::tempdir("loader-white");
    write_catalog(&dir, 6, 5, 40, |_| {}).unwrap();
    for name in ["100000_1.png", "100001_1.png"] {
        image::RgbImage::from_pixel(40, 40, image::Rgb([255, 255, 255])).save(dir.join("images").join(name)).unwrap();
    }
    let l = loader(&dir, 1, 2);
    let seen: usize = l.epoch(0, 0).map(|b| b.len()).sum();
    assert_eq!(seen, 6);
    assert_eq!(l.uncropped.load(std::sync::atomic::Ordering::Relaxed), 2);
}
