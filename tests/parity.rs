//! The model against the authors' PyTorch outputs (../shared/fixtures/reference).
mod common;

use burn::tensor::Tensor;
use mvlt::device::{backends_for, run_with, Cpu, DeviceSpec};
use mvlt::model::pvlt::resize_pos_embed;
use mvlt::model::weights::{load_state_dict, reference_layout, StateDict};
use mvlt::model::{HeadSet, Pvlt, PvltConfig};
use mvlt_cli::verify::{print_rows, Fixture, FixtureOverrides, Tolerance, VerifyTask};
use std::path::Path;

/// Every tensor of `fixture` within tolerance, on each CPU backend this build has (flex, and
/// libtorch with the `tch` feature).
fn check(name: &str, fixture: Fixture) {
    for backend in backends_for(DeviceSpec::Cpu) {
        let task = VerifyTask { fixture: &fixture, tol: Tolerance::default(), verbose_load: true };
        let rows = run_with(DeviceSpec::Cpu, backend, task).unwrap();
        let name = format!("{name} on {backend}");
        print_rows(&name, &rows);
        let compared = rows.iter().filter(|r| r.skipped.is_none()).count();
        assert!(compared >= 10, "{name}: only {compared} tensors compared");
        assert!(rows.iter().all(|r| r.skipped.is_none()), "{name}: some tensors were not understood");
        let bad: Vec<_> = rows.iter().filter(|r| !r.ok).map(|r| &r.name).collect();
        assert!(bad.is_empty(), "{name}: tensors off the reference: {bad:?}");
    }
}

#[test]
fn small_io_matches_reference() {
    let Some(dir) = common::fixtures() else { return };
    check("small_io", Fixture::load(&dir.join("small_io.json"), &FixtureOverrides::default()).unwrap());
}

#[test]
fn authors_style_checkpoint_pth_gives_small_io_outputs() {
    let Some(dir) = common::fixtures() else { return };
    let o = FixtureOverrides { weights: vec![dir.join("small_checkpoint.pth")], ..Default::default() };
    check("small_io via small_checkpoint.pth", Fixture::load(&dir.join("small_io.json"), &o).unwrap());
}

#[test]
fn small_e2e_256_matches_reference() {
    let Some(dir) = common::fixtures() else { return };
    let o = FixtureOverrides {
        config: Some(dir.join("small_io.json").display().to_string()),
        weights: vec![dir.join("small_model.safetensors")],
        image: Some(format!(
            "{}:02_dress_striped_navy_256x256/tensor_u8",
            dir.join("image_preproc.safetensors").display()
        )),
        ..Default::default()
    };
    check("small_e2e_256", Fixture::load(&dir.join("small_e2e_256.json"), &o).unwrap());
}

#[test]
fn pvt_partial_load_matches_reference() {
    let Some(dir) = common::fixtures() else { return };
    let o = FixtureOverrides {
        config: Some(dir.join("small_io.json").display().to_string()),
        weights: vec![dir.join("small_model.safetensors")],
        inputs: Some(dir.join("small_io.safetensors")),
        ..Default::default()
    };
    check("pvt_partial_load", Fixture::load(&dir.join("pvt_partial_load.json"), &o).unwrap());
}

#[test]
fn pvt_partial_load_reports_accepted_and_ignored_keys() {
    let Some(dir) = common::fixtures() else { return };
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("pvt_partial_load.json")).unwrap()).unwrap();
    let names = |k: &str| -> Vec<String> {
        let mut v: Vec<String> = serde_json::from_value(meta[k].clone()).unwrap();
        v.sort();
        v
    };
    let cfg = PvltConfig::resolve(&dir.join("small_io.json").display().to_string()).unwrap();
    let model = Pvlt::<Cpu>::new(&cfg, &Default::default());
    let sd = StateDict::read(&dir.join("pvt_small_random.pth")).unwrap();
    let (_, report) = load_state_dict(model, &sd, false).unwrap();
    let mut loaded = report.loaded.clone();
    loaded.sort();
    let mut unexpected = report.unexpected.clone();
    unexpected.sort();
    assert_eq!(loaded, names("accepted_keys"));
    assert_eq!(unexpected, names("ignored_unexpected_keys"));
    assert_eq!(loaded.len(), 156);
}

#[test]
fn pos_embed_resize_matches_reference_cases() {
    let Some(dir) = common::fixtures() else { return };
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("pos_embed_interp.json")).unwrap()).unwrap();
    let sd = StateDict::read(&dir.join("pos_embed_interp.safetensors")).unwrap();
    let cases = meta["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 15);
    let device = Default::default();
    for c in cases {
        let (i, s, d) = (
            c["case"].as_u64().unwrap(),
            c["src_grid"].as_u64().unwrap() as usize,
            c["dst_grid"].as_u64().unwrap() as usize,
        );
        let src = sd.tensors[&format!("case{i}/src")].clone();
        let want: Vec<f32> = sd.tensors[&format!("case{i}/out")].to_vec().unwrap();
        let out = resize_pos_embed(Tensor::<Cpu, 3>::from_data(src, &device), s, d, d);
        assert_eq!(out.dims(), [1, d * d, 2], "case {i}");
        let got: Vec<f32> = out.into_data().to_vec().unwrap();
        // The project-wide parity tolerance (allclose, atol = rtol = 1e-4); observed max 1.3e-5.
        let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        let ok = got.iter().zip(&want).all(|(a, b)| (a - b).abs() <= 1e-4 + 1e-4 * b.abs());
        eprintln!("pos_embed case {i} ({s} -> {d}): max abs error {err:.2e}");
        assert!(ok, "case {i} ({s} -> {d}): max abs error {err}");
    }
}

fn manifest(dir: &Path, variant: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join(format!("manifest_{variant}.json"))).unwrap()).unwrap()
}

fn unique_params(layout: &[(String, Vec<usize>, &'static str)]) -> usize {
    layout
        .iter()
        .filter(|(k, _, _)| !mvlt::model::weights::is_buffer_or_alias(k))
        .map(|(_, s, _)| s.iter().product::<usize>())
        .sum()
}

#[test]
fn layouts_equal_reference_manifests_for_all_variants() {
    let Some(dir) = common::fixtures() else { return };
    for variant in PvltConfig::PRESETS {
        let m = manifest(&dir, variant);
        let cfg = PvltConfig::preset(variant).unwrap();
        let model = Pvlt::<Cpu>::new(&cfg, &Default::default());
        let layout = reference_layout(&model, &cfg);
        let theirs: Vec<(String, Vec<usize>)> = m["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e["key"].as_str().unwrap().to_string(), serde_json::from_value(e["shape"].clone()).unwrap()))
            .collect();
        let ours: Vec<(String, Vec<usize>)> = layout.iter().map(|(k, s, _)| (k.clone(), s.clone())).collect();
        assert_eq!(ours, theirs, "{variant}: keys, shapes and order");
        assert_eq!(
            unique_params(&layout) as u64,
            m["total_parameters_unique"].as_u64().unwrap(),
            "{variant}: parameter count"
        );
        // The authors' two recipes drop heads; their counts must match too.
        for (heads, field) in [
            (HeadSet::PRETRAIN, "total_parameters_unique_pretrain_config"),
            (HeadSet::FINETUNE, "total_parameters_unique_finetune_config"),
        ] {
            let cfg = PvltConfig { heads, ..cfg.clone() };
            let model = Pvlt::<Cpu>::new(&cfg, &Default::default());
            assert_eq!(
                unique_params(&reference_layout(&model, &cfg)) as u64,
                m[field].as_u64().unwrap(),
                "{variant} {field}"
            );
        }
    }
}

#[test]
fn tiny_has_40_947_029_parameters() {
    let cfg = PvltConfig::tiny();
    let model = Pvlt::<Cpu>::new(&cfg, &Default::default());
    assert_eq!(unique_params(&reference_layout(&model, &cfg)), 40_947_029);
}

#[test]
fn safetensors_round_trip_is_exact() {
    let Some(dir) = common::fixtures() else { return };
    let cfg = PvltConfig::resolve(&dir.join("small_io.json").display().to_string()).unwrap();
    let sd = StateDict::read(&dir.join("small_model.safetensors")).unwrap();
    let (model, _) = load_state_dict(Pvlt::<Cpu>::new(&cfg, &Default::default()), &sd, true).unwrap();
    let tmp = common::tempdir("roundtrip");
    let out = tmp.join("m.safetensors");
    mvlt::model::weights::save_model(&model, &cfg, &out).unwrap();
    let back = StateDict::read(&out).unwrap();
    assert_eq!(back.stored_config().unwrap().as_ref(), Some(&cfg));
    for (k, v) in &sd.tensors {
        let w = &back.tensors[k];
        assert_eq!(w.shape, v.shape, "{k}");
        assert_eq!(w.as_bytes(), v.as_bytes(), "{k} changed in the round trip");
    }
    // Ours adds nothing the reference files lack but the BatchNorm counters it also stores.
    assert_eq!(back.tensors.len(), sd.tensors.len());
}

#[test]
fn weight_decay_groups_equal_the_authors_optimizer_groups() {
    let Some(dir) = common::fixtures() else { return };
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("small_checkpoint.json")).unwrap()).unwrap();
    let opt = &meta["optimizer"];
    let sizes: Vec<usize> = serde_json::from_value(opt["param_groups_sizes"].clone()).unwrap();
    assert_eq!(sizes, [161, 85]);
    // Group 0 (no weight decay) holds optimizer indices 0..161, group 1 the rest.
    let names: std::collections::BTreeMap<String, String> =
        serde_json::from_value(opt["index_to_name"].clone()).unwrap();
    let model: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("small_model.json")).unwrap()).unwrap();
    let shapes: std::collections::HashMap<String, Vec<usize>> = model["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["key"].as_str().unwrap().to_string(), serde_json::from_value(e["shape"].clone()).unwrap()))
        .collect();
    assert_eq!(names.len(), 246);
    for (idx, name) in &names {
        let in_decay_group = idx.parse::<usize>().unwrap() >= sizes[0];
        assert_eq!(mvlt::train::schedule::decays(name, &shapes[name]), in_decay_group, "{name} (index {idx})");
    }
}
