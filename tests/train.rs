//! Training end to end: the step against a PyTorch step, exact resume, crash safety, NaN stops,
//! Ctrl-C, and a pre-train -> fine-tune run that learns.
mod common;
use common::{backend_turn, mvlt, tempdir, text, Overrides};
use mvlt::device::{run_on, DeviceSpec};
use mvlt::model::weights::StateDict;
use mvlt::train::checkpoint;
use mvlt::train::config::TrainConfig;
use mvlt::train::trainer::TrainRun;
use mvlt_cli::verify::Tolerance;
use mvlt_cli::verify_step::TrainStepTask;
use std::path::{Path, PathBuf};
use std::process::Command;

fn data(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(rel)
}

/// A model small enough that a training step takes milliseconds (PVLT's structure, all heads).
/// Settings for a tiny run on a 32 px synthetic catalogue shared by the tests of one process.
fn nano_overrides(dir: &Path, extra: &[&str]) -> Vec<String> {
    Overrides::default()
        .path("model", &common::nano_model(dir))
        .path("data", &shared_catalogue())
        .set("image_size", 32)
        .set("max_len", 16)
        .set("batch_size", 4)
        .set("epochs", 2)
        .set("base_lr", 0.064)
        .set("warmup_epochs", 0.2)
        .set("dropout", 0.1)
        .set("drop_path_rate", 0.1)
        .set("log_every", 1)
        .set("val_batches", 2)
        .set("workers", 1)
        .raw(extra)
        .build()
}

/// One synthetic catalogue (48 images, 32 px) shared by the tests of this process.
fn shared_catalogue() -> PathBuf {
    common::scratch_catalogue("train-catalogue", 48, 3, 32)
}

/// The cpu-pretrain recipe with `overrides` (as `--set` takes them).
fn config(overrides: &[String]) -> TrainConfig {
    mvlt::train::config::TrainConfigBuilder::recipe("cpu-pretrain").unwrap().set(overrides).unwrap().build().unwrap()
}

fn run(dir: &Path, overrides: &[String], resume: bool) -> mvlt::train::trainer::RunSummary {
    let config = config(overrides);
    run_on(config.train_device(), TrainRun { config, dir: dir.to_path_buf(), resume, control: common::run_control() })
        .unwrap()
}

/// `field` of each training line of a run's metrics.jsonl, in order.
fn train_metric(run: &Path, field: &str) -> Vec<f64> {
    mvlt::train::metrics::read_lines(&run.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .filter(|v| v["kind"] == "train")
        .map(|v| v[field].as_f64().unwrap())
        .collect()
}

fn model_tensors(path: &Path) -> Vec<(String, Vec<u8>)> {
    StateDict::read(path).unwrap().tensors.into_iter().map(|(k, v)| (k, v.as_bytes().to_vec())).collect()
}

#[test]
fn training_step_matches_the_pytorch_step() {
    let _turn = backend_turn();
    let task = TrainStepTask {
        step_file: data("train_step/step.safetensors"),
        weights: data("train_step/weights.safetensors"),
        config: data("train_step/config.json").display().to_string(),
        non_strict: false,
        tol: Tolerance::default(),
    };
    // On every CPU backend of this build (flex; libtorch with the `tch` feature).
    for backend in mvlt::device::backends_for(DeviceSpec::Cpu) {
        let rows = mvlt::device::run_with(DeviceSpec::Cpu, backend, task.clone()).unwrap();
        check_train_step(&rows, backend);
    }
}

fn check_train_step(rows: &[mvlt_cli::verify::Row], backend: mvlt::device::BackendKind) {
    let failed: Vec<_> = rows.iter().filter(|r| !r.ok).map(|r| format!("{} ({:.2e})", r.name, r.max_abs)).collect();
    assert!(failed.is_empty(), "{backend}: {} tensors off: {failed:?}", failed.len());
    // 6 losses, a gradient and a post-step value per parameter, 11 BatchNorms x 3 buffers.
    let grads = rows.iter().filter(|r| r.name.starts_with("grad/")).count();
    assert_eq!(rows.iter().filter(|r| r.name.starts_with("loss/")).count(), 6);
    assert_eq!(rows.iter().filter(|r| r.name.starts_with("param_after/")).count(), grads);
    assert_eq!(rows.iter().filter(|r| r.name.starts_with("bn_after/")).count(), 33);
    assert!(grads > 150, "{grads}");
    // The [PAD] row of the word embeddings, its two sources apart: the fixture's lookup part is
    // zero there (padding_idx), and our gradient equals the fixture's decoder part.
    let pad_rows: Vec<_> =
        rows.iter().filter(|r| r.name.starts_with("grad_part/") && r.name.contains("[PAD row]")).collect();
    assert_eq!(pad_rows.len(), 2, "{:?}", rows.iter().map(|r| &r.name).collect::<Vec<_>>());
}

#[test]
fn verify_train_step_cli_and_a_wrong_fixture() {
    let ok = mvlt(&[
        "verify",
        "--train-step",
        data("train_step/step.safetensors").to_str().unwrap(),
        "--weights",
        data("train_step/weights.safetensors").to_str().unwrap(),
        "--config",
        data("train_step/config.json").to_str().unwrap(),
    ]);
    assert!(ok.status.success(), "{}", text(&ok));
    assert!(text(&ok).contains("the training step matches"), "{}", text(&ok));
    let missing = mvlt(&["verify", "--train-step", data("train_step/step.safetensors").to_str().unwrap()]);
    assert!(!missing.status.success());
    assert!(text(&missing).contains("--train-step needs --weights"), "{}", text(&missing));
}

/// A run split in two and resumed ends where the straight run ends: the same weights, optimiser
/// moments and weight average (`ema_decay`), and a metrics log with each step once. The exported
/// weights are the average, not the last step's.
#[test]
fn resume_continues_exactly() {
    let _turn = backend_turn();
    let base = tempdir("resume");
    let straight = base.join("straight");
    let split = base.join("split");
    let over = |steps: usize| nano_overrides(&base, &[&format!("max_steps={steps}"), "ema_decay=0.9"]);
    let s = run(&straight, &over(8), false);
    assert_eq!(s.steps, 8);
    let h = run(&split, &over(4), false);
    assert_eq!(h.steps, 4);
    let r = run(&split, &over(8), true);
    assert_eq!(r.steps, 8);
    let last_checkpoint = |run: &Path| checkpoint::list(&run.join("checkpoints")).last().unwrap().1.clone();
    let a = model_tensors(&straight.join("final/model.safetensors"));
    let b = model_tensors(&split.join("final/model.safetensors"));
    assert_eq!(a.len(), b.len());
    for ((ka, va), (kb, vb)) in a.iter().zip(&b) {
        assert_eq!(ka, kb);
        assert!(va == vb, "{ka} differs after resume");
    }
    let (raw_a, raw_b) = (model_tensors(&last_checkpoint(&straight)), model_tensors(&last_checkpoint(&split)));
    assert!(raw_a == raw_b, "the last step's weights differ after resume");
    assert!(raw_a.iter().zip(&a).any(|(a, b)| a != b), "the export is the last step's weights, not their average");
    // Same optimiser state and weight average too, and the metrics log has each step once.
    let a = checkpoint::load_state::<mvlt::device::Cpu>(&last_checkpoint(&straight), &Default::default()).unwrap();
    let b = checkpoint::load_state::<mvlt::device::Cpu>(&last_checkpoint(&split), &Default::default()).unwrap();
    assert_eq!((a.state.step, a.state.micro_step, a.state.ema_updates), (b.state.step, b.state.micro_step, 8));
    for (k, m) in &a.opt.state {
        let n = &b.opt.state[k];
        assert_eq!(m.step, n.step);
        assert!(m.m.to_data().as_bytes() == n.m.to_data().as_bytes(), "exp_avg of {k}");
        assert!(m.v.to_data().as_bytes() == n.v.to_data().as_bytes(), "exp_avg_sq of {k}");
    }
    let (ea, eb) = (a.average.unwrap(), b.average.unwrap());
    assert_eq!(ea.average.len(), eb.average.len());
    for (k, t) in &ea.average {
        assert!(t.to_data().as_bytes() == eb.average[k].to_data().as_bytes(), "weight average of {k}");
    }
    assert_eq!(train_metric(&split, "step"), (1..=8).map(f64::from).collect::<Vec<f64>>());

    // A weight average of the wrong size (a corrupt or doctored checkpoint) is refused at resume,
    // naming the tensor, rather than failing inside the backend at the first validation.
    let path = last_checkpoint(&split);
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut names = st.names();
    names.sort();
    let victim = names
        .into_iter()
        .find(|n| n.starts_with("ema.") && st.tensor(n).unwrap().shape().iter().product::<usize>() > 1)
        .unwrap()
        .to_string();
    let tensors: Vec<(String, burn::tensor::TensorData)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let keep = if name == victim { 4 } else { view.data().len() };
            let data = view.data()[..keep].to_vec();
            let shape = if name == victim { vec![1] } else { view.shape().to_vec() };
            let dtype = match view.dtype() {
                safetensors::Dtype::F32 => burn::tensor::DType::F32,
                safetensors::Dtype::I64 => burn::tensor::DType::I64,
                other => panic!("{name}: {other:?}"),
            };
            (name, burn::tensor::TensorData::from_bytes_vec(data, shape, dtype))
        })
        .collect();
    mvlt::model::weights::write_safetensors(&path, &tensors, meta.metadata().clone().unwrap()).unwrap();
    let config = config(&over(9));
    let e =
        run_on(DeviceSpec::Cpu, TrainRun { config, dir: split.clone(), resume: true, control: common::run_control() })
            .unwrap_err();
    let e = format!("{e:#}");
    assert!(e.contains(&format!("{victim} holds 1 values")) && e.contains("corrupt"), "{e}");
}

/// ITM negatives mined by the contrastive similarity (`itm_hard_negatives`) are drawn from the
/// seed and the batch's place in the run: a run split in two and resumed ends with the same
/// weights as a straight one, and differs from a run with the loader's random negatives. With
/// `anneal_to_max_steps` the cosine ends at the run's last step, not at `epochs`.
#[test]
fn hard_negatives_resume_exactly_and_the_schedule_anneals_to_max_steps() {
    let _turn = backend_turn();
    let base = tempdir("hard-negatives");
    let over_from = |steps: usize, hard: bool, from: usize| {
        let extra = [
            format!("max_steps={steps}"),
            "with_itc=true".into(),
            format!("itm_hard_negatives={hard}"),
            format!("itm_hard_negatives_from_step={from}"),
            "anneal_to_max_steps=true".into(),
            "min_lr=1e-6".into(),
        ];
        nano_overrides(&base, &extra.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let over = |steps: usize, hard: bool| over_from(steps, hard, 0);
    assert_eq!(run(&base.join("straight"), &over(6, true), false).steps, 6);
    run(&base.join("split"), &over(3, true), false);
    // The resumed half anneals to step 6 too: same schedule as the straight run from here on.
    assert_eq!(run(&base.join("split"), &over(6, true), true).steps, 6);
    run(&base.join("random"), &over(6, false), false);
    let straight = model_tensors(&base.join("straight/final/model.safetensors"));
    let split = model_tensors(&base.join("split/final/model.safetensors"));
    let random = model_tensors(&base.join("random/final/model.safetensors"));
    assert!(straight.iter().zip(&split).all(|(a, b)| a == b), "hard-negative runs differ after resume");
    assert!(straight.iter().zip(&random).any(|(a, b)| a != b), "mining changed nothing");
    // The curriculum: mining from step 7 of 6 leaves the run random; from step 4 it mines the last three.
    run(&base.join("late"), &over_from(6, true, 7), false);
    run(&base.join("curriculum"), &over_from(6, true, 4), false);
    let late = model_tensors(&base.join("late/final/model.safetensors"));
    let curriculum = model_tensors(&base.join("curriculum/final/model.safetensors"));
    assert!(late.iter().zip(&random).all(|(a, b)| a == b), "mining began before itm_hard_negatives_from_step");
    assert!(curriculum.iter().zip(&random).any(|(a, b)| a != b), "mining never began");
    assert!(curriculum.iter().zip(&straight).any(|(a, b)| a != b), "mining began at the first step");
    let lr = train_metric(&base.join("straight"), "lr");
    let peak = lr.iter().cloned().fold(0.0, f64::max);
    assert!(lr[5] < 0.1 * peak, "the last step's lr {} is not near the floor (peak {peak}): {lr:?}", lr[5]);
}

/// bf16 mixed precision through the whole loop: it runs, the losses stay finite, the exported weights are f32 (the master copy) and were trained. (Whether
/// bf16 runs learn as well as f32 ones is a question for a longer run: see docs/BENCHMARKS.md.)
#[test]
fn bf16_training_runs_with_f32_master_weights() {
    let _turn = backend_turn();
    let base = tempdir("bf16");
    let s = run(
        &base.join("bf16"),
        &nano_overrides(&base, &["max_steps=6", "precision=\"bf16\"", "checkpoint_every=1", "keep_last=6"]),
        false,
    );
    assert_eq!(s.steps, 6);
    let checkpoints = checkpoint::list(&base.join("bf16/checkpoints"));
    assert_eq!(checkpoints.len(), 6);
    let read = |p: &Path| StateDict::read(p).unwrap().tensors;
    let (first, last) = (read(&checkpoints[0].1), read(&base.join("bf16/final/model.safetensors")));
    assert!(last.values().all(|t| t.dtype == burn::tensor::DType::F32 || t.dtype == burn::tensor::DType::I64));
    assert_ne!(first["block1.0.attn.q.weight"], last["block1.0.attn.q.weight"], "steps 2-6 changed nothing");
    let losses = train_metric(&base.join("bf16"), "loss");
    assert_eq!(losses.len(), 6);
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
}

#[test]
fn a_nan_loss_stops_with_a_diagnostic_and_keeps_the_last_good_checkpoint() {
    let _turn = backend_turn();
    let base = tempdir("nan");
    let dir = base.join("run");
    let config =
        config(&nano_overrides(&base, &["base_lr=1e12", "warmup_epochs=0", "checkpoint_every=1", "max_steps=20"]));
    let err =
        run_on(DeviceSpec::Cpu, TrainRun { config, dir: dir.clone(), resume: false, control: common::run_control() })
            .unwrap_err()
            .to_string();
    assert!(err.contains("stopping: loss term"), "{err}");
    assert!(err.contains("at step") && err.contains("items"), "{err}");
    let ckpts = checkpoint::list(&dir.join("checkpoints"));
    assert!(!ckpts.is_empty(), "a checkpoint from before the NaN: {err}");
    let last = &ckpts.last().unwrap().1;
    assert!(err.contains(&last.display().to_string()), "{err}");
    StateDict::read(last).unwrap();
}

fn cli_pretrain(dir: &Path, base: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mvlt"));
    c.args(["pretrain", "--out", dir.to_str().unwrap()]);
    for o in nano_overrides(base, extra) {
        c.args(["--set", &o]);
    }
    c
}

fn wait_for_checkpoints(dir: &Path, n: usize) {
    let t0 = std::time::Instant::now();
    while checkpoint::list(&dir.join("checkpoints")).len() < n {
        assert!(t0.elapsed().as_secs() < 300, "no checkpoint appeared");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn kill_9_leaves_loadable_checkpoints_and_resume_works() {
    let base = tempdir("kill9");
    let dir = base.join("run");
    let mut child = cli_pretrain(&dir, &base, &["checkpoint_every=1", "keep_last=100", "epochs=50"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for_checkpoints(&dir, 3);
    child.kill().unwrap(); // SIGKILL, possibly in the middle of writing a checkpoint
    child.wait().unwrap();
    let ckpts = checkpoint::list(&dir.join("checkpoints"));
    for (_, p) in &ckpts {
        StateDict::read(p).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
        checkpoint::load_state::<mvlt::device::Cpu>(p, &Default::default()).unwrap();
    }
    let last = ckpts.last().unwrap().0;
    // A write cut short by the kill leaves its temporary file (named after the dead process):
    // the resume removes it.
    let stale = dir.join("checkpoints").join(".step-99999999.safetensors.tmp2147483647");
    std::fs::write(&stale, vec![0u8; 4096]).unwrap();
    let o = cli_pretrain(
        &dir,
        &base,
        &["checkpoint_every=1", "keep_last=100", "epochs=50", &format!("max_steps={}", last + 2)],
    )
    .arg("--resume")
    .output()
    .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains(&format!("resuming from {}", ckpts.last().unwrap().1.display())), "{}", text(&o));
    assert!(text(&o).contains(&format!("done: {} steps", last + 2)), "{}", text(&o));
    assert!(!stale.exists() && text(&o).contains("removed 1 temporary file(s)"), "{}", text(&o));
}

/// Unreadable training images: skipped, said on the terminal and in metrics.jsonl; a catalogue
/// with no readable image stops with an error and exports nothing.
#[test]
fn unreadable_samples_are_reported_and_nothing_is_trained_from_nothing() {
    let base = tempdir("unreadable");
    let cat = base.join("cat");
    mvlt::data::synth::write_catalog(&cat, 16, 5, 32, |_| {}).unwrap();
    let mut images: Vec<PathBuf> = std::fs::read_dir(cat.join("images")).unwrap().flatten().map(|e| e.path()).collect();
    images.sort();
    let data = format!("data={}", toml::Value::from(cat.display().to_string()));
    for p in &images[..2] {
        std::fs::write(p, b"not an image").unwrap();
    }
    let dir = base.join("some");
    let o = cli_pretrain(&dir, &base, &[&data, "max_steps=3", "val_fraction=0"]).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("could not be read and are skipped"), "{}", text(&o));
    let log = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let skipped: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == "skipped")
        .collect();
    let reported: u64 = skipped.iter().map(|v| v["new"].as_u64().unwrap()).sum();
    assert_eq!(reported, 2, "each unreadable row once: {log}");
    assert!(skipped[0]["items"][0]["why"].as_str().unwrap().contains("cannot decode"), "{log}");

    for p in &images {
        std::fs::write(p, b"not an image").unwrap();
    }
    let dir = base.join("none");
    let o = cli_pretrain(&dir, &base, &[&data, "max_steps=3", "val_fraction=0"]).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("no sample of epoch 1 could be read"), "{}", text(&o));
    assert!(!dir.join("final").exists(), "no weights exported from nothing");
}

#[test]
fn ctrl_c_writes_a_checkpoint_and_exits() {
    let base = tempdir("ctrlc");
    let dir = base.join("run");
    let child = cli_pretrain(&dir, &base, &["checkpoint_every=1000", "epochs=50"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until training is under way (the metrics log has a line), then interrupt.
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(dir.join("metrics.jsonl")).map(|s| s.lines().count()).unwrap_or(0) < 2 {
        assert!(t0.elapsed().as_secs() < 300, "training did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", text(&o));
    assert!(text(&o).contains("interrupted after step"), "{}", text(&o));
    let ckpts = checkpoint::list(&dir.join("checkpoints"));
    assert_eq!(ckpts.len(), 1, "one checkpoint, written on Ctrl-C");
    StateDict::read(&ckpts[0].1).unwrap();
}

#[test]
fn refuses_to_overwrite_a_run_and_to_resume_nothing() {
    let _turn = backend_turn();
    let base = tempdir("refuse");
    let dir = base.join("run");
    let config = config(&nano_overrides(&base, &["max_steps=1"]));
    let e = run_on(
        DeviceSpec::Cpu,
        TrainRun { config: config.clone(), dir: dir.clone(), resume: true, control: common::run_control() },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("does not exist"), "{e}");
    assert!(!dir.exists(), "--resume must not create the run folder it was pointed at");
    std::fs::create_dir_all(&dir).unwrap();
    let e = run_on(
        DeviceSpec::Cpu,
        TrainRun { config: config.clone(), dir: dir.clone(), resume: true, control: common::run_control() },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("no checkpoint"), "{e}");
    run_on(
        DeviceSpec::Cpu,
        TrainRun { config: config.clone(), dir: dir.clone(), resume: false, control: common::run_control() },
    )
    .unwrap();
    let e = run_on(DeviceSpec::Cpu, TrainRun { config, dir, resume: false, control: common::run_control() })
        .unwrap_err()
        .to_string();
    assert!(e.contains("pass --resume"), "{e}");
}

#[test]
fn finetune_from_the_authors_checkpoint_on_their_layout() {
    let Some(fix) = common::fixtures() else { return };
    let base = tempdir("finetune-authors");
    let dir = base.join("run");
    let data = fix.join("../datasets/authors_layout");
    let o = mvlt(&[
        "finetune",
        "--out",
        dir.to_str().unwrap(),
        "--init",
        fix.join("small_checkpoint.pth").to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--vocab",
        fix.join("../vocab/bert-base-uncased-vocab.txt").to_str().unwrap(),
        "--set",
        &format!("model=\"{}\"", fix.join("small_io.json").display()),
        "--set",
        "image_size=64",
        "--set",
        "max_len=32",
        "--set",
        "batch_size=4",
        "--set",
        "max_steps=2",
        "--set",
        "val_fraction=0.3",
        "--set",
        "workers=1",
    ]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    // The authors' heads have 48 / 122 classes; the fixture data 5 / 6: those heads start fresh.
    assert!(t.contains("has 122 classes in sub_cls_head.*, the data 6: that head starts fresh"), "{t}");
    assert!(t.contains("loaded 189 keys"), "{t}");
    let classes: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("final/classes.json")).unwrap()).unwrap();
    assert_eq!(classes["sub"].as_array().unwrap().len(), 6);
}

/// `--resume` whose newest checkpoint is cut short falls back to the newest one that loads, says
/// which it skipped and why, moves the broken one aside, and continues exactly: the result equals
/// an uninterrupted run of the same length.
#[test]
fn resume_falls_back_past_a_truncated_checkpoint() {
    let _turn = backend_turn();
    let base = tempdir("resume-fallback");
    let (straight, split) = (base.join("straight"), base.join("split"));
    run(&straight, &nano_overrides(&base, &["max_steps=6"]), false);
    run(&split, &nano_overrides(&base, &["max_steps=4", "checkpoint_every=2", "keep_last=10"]), false);
    let ckpts = checkpoint::list(&split.join("checkpoints"));
    assert_eq!(ckpts.iter().map(|c| c.0).collect::<Vec<_>>(), vec![2, 4]);
    let newest = &ckpts[1].1;
    let len = std::fs::metadata(newest).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(newest).unwrap().set_len(len / 2).unwrap();
    let r = run(&split, &nano_overrides(&base, &["max_steps=6", "checkpoint_every=2", "keep_last=10"]), true);
    assert_eq!(r.steps, 6);
    assert!(newest.with_extension("safetensors.broken").exists(), "the truncated checkpoint is moved aside");
    let a = model_tensors(&straight.join("final/model.safetensors"));
    let b = model_tensors(&split.join("final/model.safetensors"));
    for ((ka, va), (_, vb)) in a.iter().zip(&b) {
        assert!(va == vb, "{ka} differs after resuming from step 2");
    }
    // The CLI says what it skipped.
    let o = Command::new(env!("CARGO_BIN_EXE_mvlt"))
        .args(["pretrain", "--resume", "--out"])
        .arg(base.join("nowhere"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(text(&o).contains("does not exist"), "{}", text(&o));
    assert!(!base.join("nowhere").exists());
}

/// Early stopping by a validation accuracy: the run stops at the first validation
/// `early_stop_steps` after its best (worked out here from the logged validations), exports the
/// best weights (`export_best`), and a resume of the stopped run only exports. With a rate too
/// small to move the accuracy it stops long before `max_steps`; the augmentation is on throughout.
#[test]
fn early_stopping_exports_the_best_and_a_resume_only_exports() {
    let _turn = backend_turn();
    let base = tempdir("early-stop");
    let extra = [
        "max_steps=40",
        "epochs=100",
        "val_every=2",
        "base_lr=1e-12",
        "warmup_lr=1e-12",
        "min_lr=1e-12",
        "warmup_epochs=0",
        "select_by=mlm_acc",
        "early_stop_steps=4",
        "export_best=true",
        "augment_min_scale=0.6",
        "augment_flip=true",
    ];
    let over = nano_overrides(&base, &extra);
    let dir = base.join("run");
    let s = run(&dir, &over, false);
    let vals: Vec<(usize, f64)> = mvlt::train::metrics::read_lines(&dir.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .filter(|v| v["kind"] == "val")
        .map(|v| (v["step"].as_u64().unwrap() as usize, v["mlm_acc"].as_f64().unwrap()))
        .collect();
    let mut best = (f64::NEG_INFINITY, 0);
    let mut expected = None;
    for &(step, acc) in &vals {
        if acc > best.0 {
            best = (acc, step);
        } else if step - best.1 >= 4 {
            expected = Some(step);
            break;
        }
    }
    let expected = expected.unwrap_or_else(|| panic!("mlm_acc kept improving: {vals:?}"));
    assert_eq!(s.steps, expected, "{vals:?}");
    assert!(s.steps < 40 && vals.last().unwrap().0 == s.steps, "{vals:?}");
    let best_file = std::fs::read(dir.join("best.safetensors")).unwrap();
    assert_eq!(std::fs::read(dir.join("final/model.safetensors")).unwrap(), best_file);
    let again = run(&dir, &over, true);
    assert_eq!((again.steps, again.steps_run), (expected, 0), "a stopped run resumed trained on");
}
