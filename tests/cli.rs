//! End-to-end tests of the `mvlt` binary: the commands a user runs, and the errors bad input gets.
mod common;
use common::{mvlt, text};

use std::path::Path;

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn verify_passes_on_small_io_and_prints_a_row_per_tensor() {
    let Some(dir) = common::fixtures() else { return };
    let o = mvlt(&["verify", p(&dir.join("small_io.json"))]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    for name in ["itm_logits", "t2i_logits", "mlm_logits_argmax", "pos_embed_used.3", "text_feats.3"] {
        assert!(
            t.lines().any(|l| l.trim_start().starts_with(name) && l.trim_end().ends_with("ok")),
            "no ok row for {name}:\n{t}"
        );
    }
    assert!(t.contains("25 tensors compared, 0 failed"), "{t}");
}

#[test]
fn verify_fails_with_nonzero_exit_when_a_tensor_is_off() {
    let Some(dir) = common::fixtures() else { return };
    let o = mvlt(&[
        "verify",
        p(&dir.join("pvt_partial_load.json")),
        "--config",
        p(&dir.join("small_io.json")),
        "--weights",
        p(&dir.join("small_model.safetensors")),
        "--inputs",
        p(&dir.join("small_io.safetensors")),
        "--atol",
        "0",
        "--rtol",
        "0",
    ]);
    // atol = rtol = 0 cannot hold for float32 arithmetic done in another order: the checker must say so.
    assert!(!o.status.success());
    assert!(text(&o).contains("FAIL"), "{}", text(&o));
}

#[test]
fn convert_pth_then_verify_with_converted_weights() {
    let Some(dir) = common::fixtures() else { return };
    let tmp = common::tempdir("convert");
    let out = tmp.join("small.safetensors");
    let o =
        mvlt(&["convert", p(&dir.join("small_checkpoint.pth")), p(&out), "--config", p(&dir.join("small_io.json"))]);
    assert!(o.status.success(), "{}", text(&o));
    // The converted file carries its config: no --config needed.
    let o = mvlt(&["verify", p(&dir.join("small_io.json")), "--weights", p(&out)]);
    assert!(o.status.success(), "{}", text(&o));
    let o = mvlt(&["inspect", p(&out)]);
    let t = text(&o);
    assert!(o.status.success() && t.contains("heads: itm, mlm, t2i, cls"), "{t}");
}

#[test]
fn inspect_matches_manifests_and_counts_tiny_parameters() {
    let Some(dir) = common::fixtures() else { return };
    let o = mvlt(&["inspect", "--config", "tiny", "--manifest", p(&dir.join("manifest_tiny.json"))]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("parameters:    40,947,029"), "{t}");
    assert!(t.contains("all keys and shapes match"), "{t}");
    // A checkpoint: variant guessed from shapes is 'custom' for the small test config, keys listed.
    let o =
        mvlt(&["inspect", p(&dir.join("small_checkpoint.pth")), "--config", p(&dir.join("small_io.json")), "--keys"]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("training checkpoint") && t.contains("block3.1.attn.kv.weight"), "{t}");
}

#[test]
fn truncated_pth_is_a_clear_error() {
    let Some(dir) = common::fixtures() else { return };
    let bytes = std::fs::read(dir.join("small_checkpoint.pth")).unwrap();
    let tmp = common::tempdir("truncated");
    let bad = tmp.join("truncated.pth");
    std::fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
    let o = mvlt(&["verify", p(&dir.join("small_io.json")), "--weights", p(&bad)]);
    let t = text(&o);
    assert!(!o.status.success());
    assert!(t.contains("cannot read PyTorch file") && t.contains("truncated.pth"), "{t}");
    assert!(!t.contains("panicked"), "{t}");
}

#[test]
fn pth_missing_keys_fails_strict_and_loads_non_strict() {
    let Some(dir) = common::fixtures() else { return };
    // A bare PVT state dict lacks the text stream and heads.
    let pvt = dir.join("pvt_small_random.pth");
    let o = mvlt(&["verify", p(&dir.join("small_io.json")), "--weights", p(&pvt)]);
    let t = text(&o);
    assert!(!o.status.success());
    assert!(t.contains("strict load of") && t.contains("missing 123") && t.contains("--non-strict"), "{t}");
    assert!(t.contains("ignored 5 unexpected: cls_token"), "{t}");
    // --non-strict loads what matches and names the rest (the outputs then differ, as they should).
    let o = mvlt(&["verify", p(&dir.join("small_io.json")), "--weights", p(&pvt), "--non-strict"]);
    let t = text(&o);
    assert!(
        t.contains("loaded 156 keys; ignored 5 unexpected") && t.contains("missing 123 (kept their initial values)"),
        "{t}"
    );
    assert!(!o.status.success() && t.contains("FAIL"), "{t}");
}

#[test]
fn misshaped_tensor_names_key_and_both_shapes() {
    let Some(dir) = common::fixtures() else { return };
    let sd = mvlt::model::weights::StateDict::read(&dir.join("small_model.safetensors")).unwrap();
    let mut tensors: Vec<_> = sd.tensors.into_iter().collect();
    for (k, d) in tensors.iter_mut() {
        if k == "block2.0.mlp.fc1.weight" {
            *d = burn::tensor::TensorData::new(vec![0f32; 8 * 32], [8, 32]);
        }
    }
    let tmp = common::tempdir("misshaped");
    let bad = tmp.join("bad.safetensors");
    mvlt::model::weights::write_safetensors(&bad, &tensors, Default::default()).unwrap();
    let o = mvlt(&["verify", p(&dir.join("small_io.json")), "--weights", p(&bad)]);
    let t = text(&o);
    assert!(!o.status.success());
    assert!(
        t.contains("shape mismatch for key 'block2.0.mlp.fc1.weight'")
            && t.contains("[8, 32]")
            && t.contains("[256, 32]"),
        "{t}"
    );
    // Shape mismatches are errors under non-strict loading too.
    let cfg = mvlt::model::PvltConfig::resolve(p(&dir.join("small_io.json"))).unwrap();
    let model = mvlt::model::Pvlt::<mvlt::device::Cpu>::new(&cfg, &Default::default());
    let sd = mvlt::model::weights::StateDict::read(&bad).unwrap();
    let e = mvlt::model::weights::load_state_dict(model, &sd, false)
        .expect_err("non-strict load must fail on a shape mismatch");
    assert!(e.to_string().contains("block2.0.mlp.fc1.weight"), "{e}");
}

#[test]
fn safetensors_of_another_model_is_rejected() {
    let Some(dir) = common::fixtures() else { return };
    let tmp = common::tempdir("other");
    let other = tmp.join("bert.safetensors");
    let tensors = vec![
        (
            "encoder.layer.0.attention.self.query.weight".to_string(),
            burn::tensor::TensorData::new(vec![0f32; 4], [2, 2]),
        ),
        ("pooler.dense.bias".to_string(), burn::tensor::TensorData::new(vec![0f32; 2], [2])),
    ];
    mvlt::model::weights::write_safetensors(&other, &tensors, Default::default()).unwrap();
    let o = mvlt(&["verify", p(&dir.join("small_io.json")), "--weights", p(&other)]);
    let t = text(&o);
    assert!(!o.status.success());
    assert!(t.contains("does not look like weights for this model configuration"), "{t}");
    // Not a weights file at all.
    let junk = tmp.join("junk.safetensors");
    std::fs::write(&junk, b"this is not a tensor file").unwrap();
    let o = mvlt(&["inspect", p(&junk)]);
    let t = text(&o);
    assert!(!o.status.success() && t.contains("is not a weights file: it is neither safetensors"), "{t}");
    let o = mvlt(&["inspect", p(&tmp.join("absent.pth"))]);
    assert!(text(&o).contains("does not exist"), "{}", text(&o));
}

#[test]
fn non_divisible_config_is_a_clear_error() {
    let tmp = common::tempdir("badcfg");
    let cfg = tmp.join("bad.json");
    std::fs::write(&cfg, r#"{"embed_dims": [64, 128, 320, 512], "num_heads": [1, 2, 3, 8]}"#).unwrap();
    let o = mvlt(&["inspect", "--config", p(&cfg)]);
    let t = text(&o);
    assert!(!o.status.success());
    assert!(t.contains("embed_dims[2] = 320 is not divisible by num_heads[2] = 3"), "{t}");
    let o = mvlt(&["bench", "--config", "tiny", "--image-size", "250"]);
    let t = text(&o);
    assert!(!o.status.success() && t.contains("250x250"), "{t}");
}

#[test]
fn cpu_only_build_says_how_to_get_cuda() {
    if cfg!(feature = "cuda") {
        return;
    }
    let o = mvlt(&["bench", "--device", "cuda", "--iters", "1"]);
    let t = text(&o);
    if cfg!(feature = "tch") {
        // libtorch has CUDA kernels; on a machine without a GPU it says so.
        if !t.contains("CUDA device(s)") {
            assert!(o.status.success(), "{t}");
        }
    } else {
        assert!(!o.status.success() && t.contains("--features cuda"), "{t}");
    }
}

/// A build without LibTorch asked to run as a rank of a distributed launch says what it needs,
/// before touching the run folder (tests/distributed.rs runs the launches on the LibTorch build).
#[test]
fn flex_only_build_refuses_a_distributed_launch() {
    if cfg!(feature = "tch") {
        return;
    }
    let dir = common::tempdir("flex-dist");
    let out = dir.join("run");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_mvlt"))
        .args(["pretrain", "--out", p(&out), "--max-steps", "1"])
        .envs([("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29511")])
        .output()
        .unwrap();
    let t = text(&o);
    assert!(!o.status.success() && t.contains("rank 0 of 2") && t.contains("--features tch"), "{t}");
    assert!(!out.exists(), "the run folder was created");
}

#[test]
fn tokenize_json_gives_reference_ids() {
    let Some(dir) = common::fixtures() else { return };
    let vocab = dir.join("../vocab/bert-base-uncased-vocab.txt");
    let o = mvlt(&[
        "tokenize",
        "--vocab",
        p(&vocab),
        "--json",
        "--max-len",
        "16",
        "Crêpe de Chine blouse in ivory.",
        "Red",
    ]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    let lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(
        lines[0]["tokens"],
        serde_json::json!(["cr", "##ep", "##e", "de", "chin", "##e", "blouse", "in", "ivory", "."])
    );
    assert_eq!(lines[1]["input_ids"], serde_json::json!([101, 2417, 102, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]));
    let o = mvlt(&["tokenize", "--vocab", p(&dir.join("small_io.json")), "x"]);
    assert!(!o.status.success() && text(&o).contains("not a BERT WordPiece vocabulary"), "{}", text(&o));
}

#[test]
fn preprocess_reports_the_reference_crop_box() {
    let Some(dir) = common::fixtures() else { return };
    let tmp = common::tempdir("preprocess");
    let img = dir.join("images/08_sock_dotted_blue_speck_360x480.jpg");
    let o = mvlt(&[
        "preprocess",
        "--image",
        p(&img),
        "--size",
        "128",
        "--json",
        "--png",
        p(&tmp.join("seen.png")),
        "--safetensors",
        p(&tmp.join("seen.safetensors")),
    ]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    let v: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
    assert_eq!(v["crop_box_ltrb"], serde_json::json!([150, 40, 322, 350]));
    assert_eq!(v["size"], serde_json::json!([128, 128]));
    assert_eq!(image::open(tmp.join("seen.png")).unwrap().width(), 128);
    let st = mvlt::model::weights::StateDict::read(&tmp.join("seen.safetensors")).unwrap();
    assert_eq!(st.tensors["image"].shape.to_vec(), vec![3, 128, 128]);
    // A corrupt image names the file.
    let bad = tmp.join("broken.jpg");
    std::fs::write(&bad, &std::fs::read(&img).unwrap()[..200]).unwrap();
    let o = mvlt(&["preprocess", "--image", p(&bad)]);
    let t = text(&o);
    assert!(!o.status.success() && t.contains("broken.jpg") && t.contains("cannot decode"), "{t}");
}

#[test]
fn synth_writes_a_catalogue_the_readers_accept() {
    let tmp = common::tempdir("synth-cli");
    let out = tmp.join("cat");
    let o = mvlt(&[
        "synth",
        "--out",
        p(&out),
        "--n",
        "40",
        "--size",
        "64",
        "--seed",
        "3",
        "--contact-sheet",
        p(&tmp.join("sheet.png")),
    ]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("wrote 40 images"), "{t}");
    assert_eq!(image::open(tmp.join("sheet.png")).unwrap().width(), 512);
    let o = mvlt(&["data", "bench", "--data", p(&out), "--n", "20", "--size", "64", "--batch-size", "8"]);
    let t = text(&o);
    assert!(o.status.success() && t.contains("images/s"), "{t}");
}

#[test]
fn data_info_and_bench_on_the_format_fixtures() {
    let Some(dir) = common::fixtures() else { return };
    let ds = dir.join("../datasets");
    let vocab = dir.join("../vocab/bert-base-uncased-vocab.txt");
    for data in [ds.join("fashiongen_mini_validation.h5"), ds.join("authors_layout")] {
        let o = mvlt(&["data", "info", "--data", p(&data), "--val-fraction", "0.3"]);
        let t = text(&o);
        assert!(o.status.success() && t.contains("12 images of 6 products") && t.contains("split by product"), "{t}");
        let o = mvlt(&["data", "bench", "--data", p(&data), "--vocab", p(&vocab), "--size", "64", "--batch-size", "4"]);
        let t = text(&o);
        assert!(o.status.success() && t.contains("full pre-training batches"), "{t}");
    }
}
