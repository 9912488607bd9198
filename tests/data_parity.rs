//! Tokenizer and image preprocessing against the reference (../shared/fixtures/reference).
mod common;

use mvlt::data::text::TextProcessor;

fn vocab(dir: &std::path::Path) -> std::path::PathBuf {
    dir.join("../vocab/bert-base-uncased-vocab.txt")
}

#[test]
fn tokenizer_matches_all_reference_cases() {
    let Some(dir) = common::fixtures() else { return };
    let t = TextProcessor::from_vocab_file(&vocab(&dir)).unwrap();
    assert_eq!(t.vocab_size, 30522);
    assert_eq!((t.pad_id, t.unk_id, t.cls_id, t.sep_id, t.mask_id), (0, 100, 101, 102, 103));
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_cases.json")).unwrap()).unwrap();
    let items = cases["items"].as_array().unwrap();
    assert_eq!(items.len(), 40);
    let mut failures = vec![];
    for (i, item) in items.iter().enumerate() {
        let text = item["text"].as_str().unwrap();
        let want_tokens: Vec<String> = serde_json::from_value(item["tokens"].clone()).unwrap();
        let want_ids: Vec<i64> = serde_json::from_value(item["ori_input_ids"].clone()).unwrap();
        let e = t.encode(text, want_ids.len()).unwrap();
        if e.tokens != want_tokens || e.input_ids != want_ids || e.truncated != item["truncated"].as_bool().unwrap() {
            failures.push(format!("case {i} {text:?}:\n  ours   {:?}\n  theirs {:?}", e.tokens, want_tokens));
        }
    }
    assert!(failures.is_empty(), "{} of 40 cases differ:\n{}", failures.len(), failures.join("\n"));
}

mod images {
    use super::common;
    use mvlt::data::image::{preprocess, Pixels};
    use mvlt::model::weights::StateDict;

    fn max_diff(a: &[u8], b: &[u8]) -> u8 {
        a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).max().unwrap_or(0)
    }

    #[test]
    fn preprocessing_matches_reference_boxes_dithers_and_tensors() {
        let Some(dir) = common::fixtures() else { return };
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("image_preproc.json")).unwrap()).unwrap();
        let tensors = StateDict::read(&dir.join("image_preproc.safetensors")).unwrap().tensors;
        let items = meta["items"].as_array().unwrap();
        assert_eq!(items.len(), 8);
        let mut report = vec![];
        for it in items {
            let file = dir.join(it["file"].as_str().unwrap());
            let want_box: Vec<usize> = serde_json::from_value(it["crop_box_ltrb"].clone()).unwrap();
            let want = tensors[it["tensor_u8_key"].as_str().unwrap()].as_bytes().to_vec();
            // For JPEGs, PIL's decoded pixels separate decoder differences from our crop/resize.
            let pixels = match it["decoded_key"].as_str() {
                Some(k) => {
                    let d = &tensors[k];
                    Pixels::from_hwc_rgb(d.shape[1], d.shape[0], d.as_bytes().to_vec())
                }
                None => Pixels::open(&file).unwrap(),
            };
            // The dither itself, bit for bit.
            let bitmap = image::open(dir.join(it["dither_bitmap"].as_str().unwrap())).unwrap().to_luma8();
            let ours = pixels.dither();
            let differing = bitmap.as_raw().iter().zip(&ours).filter(|(&r, &o)| (r > 127) != o).count();
            assert_eq!(differing, 0, "{}: {differing} dither bits differ", file.display());

            let out = preprocess(&pixels, 256).unwrap();
            assert_eq!(out.crop_box.map(|b| b.to_vec()), Some(want_box.clone()), "{}", file.display());
            let d = max_diff(&out.chw_u8, &want);
            report.push(format!(
                "{}: box {:?}, max |diff| {d}/255",
                file.file_name().unwrap().to_string_lossy(),
                want_box
            ));
            assert!(d <= 1, "{}: resized pixels differ by {d}/255", file.display());
            // And from the file with our own decoder (for JPEGs, decoders may differ by a little).
            if it["decoded_key"].is_string() {
                let own = preprocess(&Pixels::open(&file).unwrap(), 256).unwrap();
                report.push(format!(
                    "   own JPEG decode: box {:?}, max |diff| {}/255",
                    own.crop_box,
                    max_diff(&own.chw_u8, &want)
                ));
            }
        }
        eprintln!("{}", report.join("\n"));
    }
}

#[test]
fn float_pipeline_equals_reference_tensor_bit_for_bit_definition() {
    // preprocess_floats must give exactly float32(u8) / 255 of the u8 pipeline.
    let Some(dir) = common::fixtures() else { return };
    let p = mvlt::data::image::Pixels::open(&dir.join("images/01_tshirt_solid_red_300x400.png")).unwrap();
    let u8s = mvlt::data::image::preprocess(&p, 64).unwrap().chw_u8;
    let (floats, _) = mvlt::data::image::preprocess_floats(&p, 64).unwrap();
    let want: Vec<f32> = u8s.iter().map(|&v| v as f32 / 255.0).collect();
    assert_eq!(
        floats.iter().map(|f| f.to_bits()).collect::<Vec<_>>(),
        want.iter().map(|f| f.to_bits()).collect::<Vec<_>>()
    );
}

mod formats {
    use mvlt::data::image::{preprocess, Pixels};
    use std::path::PathBuf;

    fn file(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/formats").join(name)
    }

    /// Every odd file decodes, gets the garment's box, and becomes a 3-channel tensor.
    #[test]
    fn grey_rgba_16bit_cmyk_and_one_pixel_images() {
        for (name, channels) in [("grey.png", 1), ("grey16.png", 1), ("rgba.png", 3), ("cmyk.jpg", 3)] {
            let p = Pixels::open(&file(name)).unwrap_or_else(|e| panic!("{name}: {e:#}"));
            assert_eq!((p.width, p.height, p.channels), (48, 40, channels), "{name}");
            let out = preprocess(&p, 32).unwrap();
            let b = out.crop_box.unwrap_or_else(|| panic!("{name}: no box"));
            assert!(b[0] >= 9 && b[1] >= 7 && b[2] <= 31 && b[3] <= 31, "{name}: box {b:?}");
            assert_eq!(out.chw_u8.len(), 3 * 32 * 32);
        }
        // The CMYK garment is red: the decoder must have turned ink into light the right way.
        let p = Pixels::open(&file("cmyk.jpg")).unwrap();
        let px = &p.data[(20 * 48 + 20) * 3..(20 * 48 + 20) * 3 + 3];
        assert!(px[0] > 200 && px[1] < 60 && px[2] < 60, "CMYK red decoded as {px:?}");
        // A one-pixel image: black, so the box is empty; the whole image is used.
        let p = Pixels::open(&file("one_pixel.png")).unwrap();
        let out = preprocess(&p, 8).unwrap();
        assert_eq!(out.crop_box, None);
        assert!(out.chw_u8.iter().all(|&v| v == 0));
    }

    #[test]
    fn missing_empty_and_truncated_files_name_the_file() {
        let e = format!("{:#}", Pixels::open(&file("absent.png")).unwrap_err());
        assert!(e.contains("absent.png") && e.contains("does not exist"), "{e}");
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        std::fs::write(dir.join("empty.png"), b"").unwrap();
        let e = format!("{:#}", Pixels::open(&dir.join("empty.png")).unwrap_err());
        assert!(e.contains("empty.png") && e.contains("cannot decode"), "{e}");
        let bytes = std::fs::read(file("cmyk.jpg")).unwrap();
        std::fs::write(dir.join("cut.jpg"), &bytes[..bytes.len() / 3]).unwrap();
        // A cut JPEG either fails with the file named or decodes partially; it never panics.
        if let Err(e) = Pixels::open(&dir.join("cut.jpg")) {
            assert!(format!("{e:#}").contains("cut.jpg"));
        }
    }

    #[test]
    fn huge_and_odd_captions() {
        let Some(dir) = super::common::fixtures() else { return };
        let t = mvlt::data::text::TextProcessor::from_vocab_file(&super::vocab(&dir)).unwrap();
        let long = "silk dress ".repeat(10_000);
        let e = t.encode(&long, 128).unwrap();
        assert!(e.truncated && e.input_ids.len() == 128 && e.input_ids[127] == 102);
        let e = t.encode("   \t\n ", 8).unwrap();
        assert_eq!(e.input_ids, [101, 102, 0, 0, 0, 0, 0, 0]);
    }
}
