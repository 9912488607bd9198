//! The three dataset readers on the shared format fixtures, and the bad input each must survive.
mod common;

use mvlt::data::dataset::{open_dataset, split_by_product, ClassMap, Dataset, FashionGenH5, FileDataset};
use std::path::{Path, PathBuf};

fn datasets_dir() -> Option<PathBuf> {
    common::fixtures().map(|d| d.join("../datasets"))
}

#[test]
fn fashiongen_h5_reads_latin1_captions_and_lazy_images() {
    let Some(dir) = datasets_dir() else { return };
    let ds = FashionGenH5::open(&dir.join("fashiongen_mini_validation.h5")).unwrap();
    assert_eq!(ds.len(), 12);
    let r = &ds.records()[2];
    assert!(r.caption.contains("cr\u{e9}pe"), "Latin-1 decode: {:?}", r.caption);
    assert_eq!(ds.records()[0].category, "TOPS");
    assert_eq!(ds.records()[0].product_id, ds.records()[1].product_id, "poses of one product are consecutive");
    let p = ds.pixels(5).unwrap();
    assert_eq!((p.width, p.height, p.channels), (256, 256, 3));
    assert!(p.data.iter().any(|&v| v != p.data[0]));
    assert!(ds.skips().summary().is_none());
}

#[test]
fn fashiongen_h5_variants_and_damage() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    // Variable-length UTF-8 strings and 1-D shapes.
    let ds = FashionGenH5::open(&data.join("fashiongen_vlen_1d.h5")).unwrap();
    assert_eq!(ds.len(), 3);
    assert_eq!(ds.records()[2].caption, "Grey cr\u{e9}pe bag.");
    assert_eq!(ds.records()[1].product_id, "7");
    assert_eq!(ds.pixels(2).unwrap().width, 32);
    // A missing dataset is named.
    let e = FashionGenH5::open(&data.join("fashiongen_no_category.h5")).err().unwrap().to_string();
    assert!(e.contains("no dataset 'input_category'"), "{e}");
    // A truncated file is an error naming the file, never a panic.
    let tmp = common::tempdir("h5trunc");
    let bytes = std::fs::read(data.join("fashiongen_vlen_1d.h5")).unwrap();
    for cut in [100, bytes.len() / 2, bytes.len() - 10] {
        let t = tmp.join("cut.h5");
        std::fs::write(&t, &bytes[..cut]).unwrap();
        match FashionGenH5::open(&t) {
            Err(e) => assert!(format!("{e:#}").contains("cut.h5"), "{e:#}"),
            // Cut inside the image data only: the rows whose bytes are gone fail when read.
            Ok(ds) => assert!((0..ds.len()).any(|i| ds.pixels(i).is_err()), "truncation at {cut} went unnoticed"),
        }
    }
}

#[test]
fn authors_layout_pairs_images_and_pickles() {
    let Some(dir) = datasets_dir() else { return };
    let ds = open_dataset(&dir.join("authors_layout")).unwrap();
    assert_eq!(ds.len(), 12);
    let classes: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("authors_layout/class_names.json")).unwrap()).unwrap();
    let r = &ds.records()[0];
    assert_eq!(r.id, "100231_id_gridfs_1");
    assert!(!r.caption.is_empty());
    assert!(classes.to_string().contains(&r.category), "{} not in {classes}", r.category);
    assert_eq!(ds.pixels(0).unwrap().channels, 3);
}

#[test]
fn authors_layout_bad_pickles_are_skipped_and_reported() {
    let Some(dir) = datasets_dir() else { return };
    let tmp = common::tempdir("authors");
    let (img, info) = (tmp.join("extracted_valid_images"), tmp.join("full_valid_info_PAI"));
    std::fs::create_dir_all(&img).unwrap();
    std::fs::create_dir_all(&info).unwrap();
    let src = dir.join("authors_layout");
    for stem in ["100231_id_gridfs_1", "100231_id_gridfs_2", "100232_id_gridfs_1"] {
        std::fs::copy(src.join(format!("extracted_valid_images/{stem}.png")), img.join(format!("{stem}.png"))).unwrap();
    }
    std::fs::copy(src.join("full_valid_info_PAI/100231_id_gridfs_1.pkl"), info.join("100231_id_gridfs_1.pkl")).unwrap();
    std::fs::write(info.join("100231_id_gridfs_2.pkl"), b"\x80\x02]q\x00.").unwrap(); // a list, not a dict
    std::fs::write(info.join("100232_id_gridfs_1.pkl"), b"\x80\x02}q\x00X\x01\x00\x00\x00aq\x01K\x01s.").unwrap(); // {'a': 1}
    let ds = open_dataset(&tmp).unwrap();
    assert_eq!(ds.len(), 1);
    let s = ds.skips().summary().unwrap();
    assert!(
        s.starts_with("skipped 2 of 3 rows") && s.contains("not a dict") && s.contains("no 'product_id' key"),
        "{s}"
    );
    // Names that do not pair up are an error.
    std::fs::rename(img.join("100232_id_gridfs_1.png"), img.join("100299_id_gridfs_1.png")).unwrap();
    let e = open_dataset(&tmp).err().unwrap().to_string();
    assert!(e.contains("do not pair up") && e.contains("100299_id_gridfs_1 vs 100232_id_gridfs_1"), "{e}");
}

#[test]
fn jsonl_catalogue_skips_bad_rows_with_reasons() {
    let Some(dir) = datasets_dir() else { return };
    let tmp = common::tempdir("jsonl");
    std::fs::create_dir_all(tmp.join("img")).unwrap();
    std::fs::copy(dir.join("authors_layout/extracted_valid_images/100231_id_gridfs_1.png"), tmp.join("img/a.png"))
        .unwrap();
    let good = r#"{"id": "a1", "image": "img/a.png", "caption": "Red tee.", "category": "TOPS", "subcategory": "T-SHIRTS", "product_id": "a"}"#;
    let lines = [
        good,
        "{not json",
        r#"{"id": "a2", "image": "img/a.png", "caption": "Red tee."}"#,
        r#"{"id": "a3", "image": "../outside.png", "caption": "x", "category": "T", "subcategory": "S"}"#,
        r#"{"id": "a4", "image": "img/a.png", "caption": "   ", "category": "T", "subcategory": "S"}"#,
        r#"{"id": "a5", "image": "img/missing.png", "caption": "x", "category": "T", "subcategory": "S"}"#,
        "",
        r#"{"id": 6, "image": "img/a.png", "caption": "Blue tee.", "category": "TOPS", "subcategory": "T-SHIRTS"}"#,
    ];
    let mut text = lines.join("\n").into_bytes();
    text.extend_from_slice(b"\n\xff\xfe broken utf8\n");
    std::fs::write(tmp.join("catalog.jsonl"), text).unwrap();
    let ds = FileDataset::open_jsonl(&tmp.join("catalog.jsonl")).unwrap();
    assert_eq!(ds.len(), 2);
    assert_eq!(ds.records()[1].id, "6");
    assert_eq!(ds.records()[1].product_id, "6", "product_id defaults to id");
    let s = ds.skips().summary().unwrap();
    for want in [
        "skipped 6 of 8 rows",
        "line 2: not a catalogue row",
        "line 3: not a catalogue row",
        "escapes the catalogue folder",
        "empty caption",
        "does not exist",
    ] {
        assert!(s.contains(want), "missing '{want}' in: {s}");
    }
    assert!(ds.skips().skipped.iter().any(|(_, w)| w == "not valid UTF-8"));
    // A catalogue with nothing usable is an error.
    std::fs::write(tmp.join("empty.jsonl"), "{bad\n").unwrap();
    assert!(FileDataset::open_jsonl(&tmp.join("empty.jsonl")).err().unwrap().to_string().contains("no usable rows"));
}

#[test]
fn split_never_leaks_a_product_and_class_ids_are_sorted_names() {
    let Some(dir) = datasets_dir() else { return };
    let ds = open_dataset(&dir.join("fashiongen_mini_validation.h5")).unwrap();
    let mut records = ds.records().to_vec();
    // Make it bigger: many synthetic products with two views each.
    for i in 0..500 {
        for v in 0..2 {
            let mut r = records[0].clone();
            r.product_id = format!("p{i}");
            r.id = format!("p{i}_{v}");
            records.push(r);
        }
    }
    let (train, val) = split_by_product(&records, 0.2, 42);
    assert_eq!(train.len() + val.len(), records.len());
    let val_products: std::collections::HashSet<_> = val.iter().map(|&i| &records[i].product_id).collect();
    assert!(train.iter().all(|&i| !val_products.contains(&records[i].product_id)));
    let frac = val.len() as f64 / records.len() as f64;
    assert!((0.15..0.25).contains(&frac), "{frac}");
    assert_eq!((train.clone(), val.clone()), split_by_product(&records, 0.2, 42));
    assert_ne!(val, split_by_product(&records, 0.2, 43).1);
    // A sample of products: whole products, seeded, and its own validation share (the draw is
    // salted apart from the split's, or a small sample would be all validation).
    let sample = mvlt::data::dataset::sample_products(&records, 100, 42);
    let sampled: std::collections::HashSet<_> = sample.iter().map(|&i| &records[i].product_id).collect();
    assert_eq!(sampled.len(), 100);
    assert!(records.iter().enumerate().all(|(i, r)| sample.contains(&i) == sampled.contains(&r.product_id)));
    assert_eq!(sample, mvlt::data::dataset::sample_products(&records, 100, 42));
    assert_ne!(sample, mvlt::data::dataset::sample_products(&records, 100, 43));
    let in_val = sample.iter().filter(|i| val.contains(i)).count() as f64 / sample.len() as f64;
    assert!((0.08..0.35).contains(&in_val), "{in_val} of the sample in the 0.2 validation split");
    assert_eq!(mvlt::data::dataset::sample_products(&records, 10_000, 1).len(), records.len());
    let classes = ClassMap::from_records(ds.records());
    let mut sorted = classes.main.clone();
    sorted.sort();
    assert_eq!(classes.main, sorted);
    assert_eq!(classes.main_id(&classes.main[1]), Some(1));
}
