//! Distributed training through c10d, on loopback, the way users launch it (`torchrun`, or the
//! environment a batch script sets): 2 ranks with Gloo take the same steps as 1 process
//! accumulating 2 micro-batches; a rank killed with -9 is named by the other within the timeout,
//! and under `torchrun --max-restarts 1` the group resumes and ends with the uninterrupted run's
//! weights; bad rendezvous settings fail fast with a message naming what is wrong.
//!
//! The LibTorch build only (the flex-only build's refusal is in `tests/cli.rs`); torchrun is the one
//! `scripts/setup-libtorch.sh` installs (on PATH after `eval "$(scripts/setup-libtorch.sh)"`).
#![cfg(feature = "tch")]
mod common;
use common::{tempdir, text};
use mvlt::model::weights::StateDict;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// One 32 px synthetic catalogue for the runs of this file.
fn catalogue() -> PathBuf {
    common::scratch_catalogue("distributed-catalogue", 64, 5, 32)
}

/// `mvlt pretrain` arguments of a small run: the nano model, `steps` steps of 4 samples per
/// micro-batch, a checkpoint every 2 steps, dropout and stochastic depth on (so the seeds matter).
fn pretrain_args(base: &Path, out: &Path, steps: usize, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = ["pretrain", "--out"].iter().map(|s| s.to_string()).collect();
    a.push(out.display().to_string());
    a.extend(["--data".into(), catalogue().display().to_string()]);
    a.extend(["--max-steps".into(), steps.to_string(), "--seed".into(), "3".into()]);
    let model = common::nano_model(base);
    let sets = [
        format!("model=\"{}\"", model.display()),
        "image_size=32".into(),
        "max_len=16".into(),
        "batch_size=4".into(),
        "epochs=4".into(),
        "base_lr=0.064".into(),
        "warmup_epochs=0.2".into(),
        "dropout=0.1".into(),
        "drop_path_rate=0.1".into(),
        "log_every=1".into(),
        "val_batches=2".into(),
        "val_every=4".into(),
        "checkpoint_every=2".into(),
        "keep_last=20".into(),
        "workers=1".into(),
        "dist_timeout_s=20".into(),
    ];
    for s in sets.iter().map(String::as_str).chain(extra.iter().copied()) {
        a.extend(["--set".into(), s.to_string()]);
    }
    a
}

/// The mvlt command with one libtorch thread per process (both sides of a comparison compute
/// alike), the LibTorch backend, and no inherited launch variables.
fn mvlt_command() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mvlt"));
    c.env("OMP_NUM_THREADS", "1").env("MVLT_BACKEND", "tch");
    for v in [
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "TORCHELASTIC_RESTART_COUNT",
        "TORCHELASTIC_USE_AGENT_STORE",
    ] {
        c.env_remove(v);
    }
    c
}

fn one_process(args: &[String]) -> Output {
    mvlt_command().args(args).output().unwrap()
}

/// `torchrun --nproc-per-node 2 --no-python mvlt ARGS` on loopback.
fn torchrun(args: &[String], restarts: usize) -> Command {
    let mut c = mvlt_command();
    let mvlt = c.get_program().to_owned();
    let mut t = Command::new("torchrun");
    t.envs(c.get_envs().filter_map(|(k, v)| v.map(|v| (k.to_owned(), v.to_owned()))));
    for v in ["RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"] {
        t.env_remove(v);
    }
    t.args(["--nproc-per-node", "2", "--nnodes", "1", "--max-restarts", &restarts.to_string()])
        .args(["--rdzv-backend", "c10d", "--rdzv-endpoint", &format!("127.0.0.1:{}", free_port())])
        .arg("--no-python")
        .arg(mvlt)
        .args(args);
    c = t;
    c
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A rank started by hand, as a batch script would (no torchrun): rank 0 hosts the store.
fn rank(r: usize, world: usize, port: u16, args: &[String]) -> Command {
    let mut c = mvlt_command();
    c.env("RANK", r.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("LOCAL_RANK", r.to_string())
        .env("LOCAL_WORLD_SIZE", world.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .args(args);
    c
}

fn ok(o: &Output, what: &str) {
    assert!(o.status.success(), "{what} failed:\n{}", text(o));
}

/// `field` of each training line of a run's metrics.jsonl.
fn train_lines(run: &Path) -> Vec<serde_json::Value> {
    mvlt::train::metrics::read_lines(&run.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .filter(|v| v["kind"] == "train")
        .collect()
}

/// Largest difference between two runs' logged losses, over every line and term (and the same
/// learning rates), failing when a term is missing from either.
fn loss_gap(a: &Path, b: &Path) -> f64 {
    let (la, lb) = (train_lines(a), train_lines(b));
    assert_eq!(la.len(), lb.len(), "training lines: {} against {}", la.len(), lb.len());
    let mut gap: f64 = 0.0;
    for (x, y) in la.iter().zip(&lb) {
        assert_eq!(x["step"], y["step"]);
        assert_eq!(x["lr"], y["lr"], "learning rates differ at step {}", x["step"]);
        for term in ["mlm", "itm", "t2i", "loss", "grad_norm"] {
            let (p, q) = (x[term].as_f64(), y[term].as_f64());
            let (Some(p), Some(q)) = (p, q) else { panic!("{term} missing at step {}: {x} / {y}", x["step"]) };
            gap = gap.max((p - q).abs());
        }
    }
    gap
}

/// Largest difference between two weight files over every parameter (BatchNorm's running
/// statistics aside: each rank keeps its own, as under DDP; rank 0's are saved), and how many.
fn param_gap(a: &Path, b: &Path) -> (f64, usize) {
    let (sa, sb) = (StateDict::read(a).unwrap(), StateDict::read(b).unwrap());
    let buffer = |k: &str| k.contains("running_") || k.contains("num_batches_tracked");
    let mut keys: Vec<&String> = sa.tensors.keys().filter(|k| !buffer(k)).collect();
    keys.sort();
    assert_eq!(keys.len(), sb.tensors.keys().filter(|k| !buffer(k)).count());
    let mut gap: f32 = 0.0;
    for k in &keys {
        let (x, y) = (
            sa.tensors[*k].clone().convert::<f32>().to_vec::<f32>().unwrap(),
            sb.tensors[*k].clone().convert::<f32>().to_vec::<f32>().unwrap(),
        );
        assert_eq!(x.len(), y.len(), "{k}");
        for (p, q) in x.iter().zip(&y) {
            gap = gap.max((p - q).abs());
        }
    }
    (gap as f64, keys.len())
}

/// The 1-process reference run with `accum_steps = 2`, `steps` steps, made once per test process.
fn accumulated(steps: usize) -> PathBuf {
    static RUNS: std::sync::Mutex<Vec<(usize, PathBuf)>> = std::sync::Mutex::new(vec![]);
    let mut runs = RUNS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, p)) = runs.iter().find(|(s, _)| *s == steps) {
        return p.clone();
    }
    let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("distributed-accum-{steps}"));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    let out = base.join("run");
    ok(&one_process(&pretrain_args(&base, &out, steps, &["accum_steps=2"])), "the 1-process run");
    runs.push((steps, out.clone()));
    out
}

#[test]
fn two_ranks_take_the_steps_of_one_process_accumulating_two() {
    let base = tempdir("dist-equal");
    let reference = accumulated(4);
    let out = base.join("ranks");
    let o = torchrun(&pretrain_args(&base, &out, 4, &[]), 0).output().unwrap();
    ok(&o, "torchrun with 2 ranks");
    let losses = loss_gap(&reference, &out);
    let (params, n) = param_gap(&reference.join("final/model.safetensors"), &out.join("final/model.safetensors"));
    println!("2 ranks against 1 process x 2 micro-batches, 4 steps: losses within {losses:.3e}, {n} parameters within {params:.3e}");
    assert!(losses <= 1e-5, "losses differ by {losses}");
    assert!(params <= 1e-5, "parameters differ by {params}");
    // Rank 0 alone wrote: one metrics file whose lines count both ranks' samples.
    let first = &train_lines(&out)[0];
    assert_eq!(first["samples_per_s"].as_f64().map(|v| v > 0.0), Some(true));
    assert_eq!(train_lines(&out).len(), 4);

    // Resuming with another world size would change the step: refused, saying why.
    let again = one_process(
        &pretrain_args(&base, &out, 6, &[]).into_iter().chain(["--resume".to_string()]).collect::<Vec<_>>(),
    );
    assert!(!again.status.success());
    assert!(text(&again).contains("took 2 micro-batches per optimiser step"), "{}", text(&again));
    // With accum_steps = 2 one process continues the 2-rank run exactly.
    let cont = one_process(&[pretrain_args(&base, &out, 6, &["accum_steps=2"]), vec!["--resume".into()]].concat());
    ok(&cont, "1 process continuing the 2-rank run");
    let reference6 = accumulated(6);
    let (gap6, _) = param_gap(&reference6.join("final/model.safetensors"), &out.join("final/model.safetensors"));
    assert!(gap6 <= 1e-5, "continued run differs by {gap6}");
}

/// Waits until `path` exists (or `child` ends, or `limit` passes); whether it appeared.
fn wait_for(path: &Path, child: &mut Child, limit: Duration) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if path.exists() {
            return true;
        }
        if child.try_wait().unwrap().is_some() {
            return path.exists();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

/// The pid of the mvlt process of rank `r` writing to `out` (found through /proc).
fn rank_pid(out: &Path, r: usize) -> Option<i32> {
    let needle = out.display().to_string();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let environ = std::fs::read(e.path().join("environ")).unwrap_or_default();
        let has = |hay: &[u8], s: &str| hay.split(|b| *b == 0).any(|w| w == s.as_bytes());
        if has(&cmdline, &needle) && has(&environ, &format!("RANK={r}")) && !has(&cmdline, "--no-python") {
            return Some(pid);
        }
    }
    None
}

fn kill9(pid: i32) {
    let st = Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
    assert!(st.success());
}

#[test]
fn a_killed_rank_is_named_and_torchrun_restarts_the_group_from_its_checkpoint() {
    let base = tempdir("dist-kill");
    let steps = 16;
    // Without torchrun: rank 1 killed after the step-2 checkpoint; rank 0 fails within the timeout
    // (20 s), naming rank 1.
    let out = base.join("manual");
    let args = pretrain_args(&base, &out, steps, &[]);
    let port = free_port();
    let mut r0 = rank(0, 2, port, &args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut r1 = rank(1, 2, port, &args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    assert!(wait_for(
        &out.join("checkpoints").join(mvlt::train::checkpoint::file_name(2)),
        &mut r0,
        Duration::from_secs(120)
    ));
    r1.kill().unwrap(); // SIGKILL
    r1.wait().unwrap();
    let killed = Instant::now();
    let o = r0.wait_with_output().unwrap();
    let waited = killed.elapsed();
    let t = text(&o);
    assert!(!o.status.success(), "rank 0 went on without rank 1:\n{t}");
    if !t.contains("done: 16 steps") {
        assert!(t.contains("rank 1"), "rank 0's error does not name rank 1:\n{t}");
    }
    assert!(waited < Duration::from_secs(40), "rank 0 took {waited:?} to give up");
    println!(
        "rank 0 after rank 1 was killed: exit {:?} after {waited:?}: {}",
        o.status.code(),
        t.lines().rev().find(|l| l.contains("rank")).unwrap_or("")
    );

    // Under torchrun --max-restarts 1: the group restarts and resumes from the last checkpoint;
    // the final weights are the uninterrupted run's.
    let out = base.join("restarted");
    let mut run = torchrun(&pretrain_args(&base, &out, steps, &[]), 1)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(wait_for(
        &out.join("checkpoints").join(mvlt::train::checkpoint::file_name(2)),
        &mut run,
        Duration::from_secs(120)
    ));
    let pid = rank_pid(&out, 1).expect("rank 1's process");
    kill9(pid);
    let o = run.wait_with_output().unwrap();
    ok(&o, "the restarted group");
    let t = text(&o);
    assert!(t.contains("continuing from the last checkpoint"), "no restart seen:\n{t}");
    let reference = accumulated(steps);
    let (gap, n) = param_gap(&reference.join("final/model.safetensors"), &out.join("final/model.safetensors"));
    println!("killed and restarted: {n} parameters within {gap:.3e} of the uninterrupted run");
    assert!(gap <= 1e-5, "restarted run differs by {gap}");
}

/// A rank's run that should fail fast: its output, and how long it took.
fn fails(mut c: Command, within: Duration) -> String {
    let t = Instant::now();
    let o = c.output().unwrap();
    assert!(!o.status.success(), "succeeded:\n{}", text(&o));
    assert!(t.elapsed() < within, "took {:?}:\n{}", t.elapsed(), text(&o));
    text(&o)
}

#[test]
fn bad_rendezvous_settings_fail_fast_naming_what_is_wrong() {
    let base = tempdir("dist-bad");
    let out = base.join("run");
    let args = pretrain_args(&base, &out, 2, &["dist_timeout_s=4"]);
    let quick = Duration::from_secs(30);
    // The environment itself.
    let mut c = rank(0, 2, free_port(), &args);
    c.env_remove("RANK");
    assert!(fails(c, quick).contains("WORLD_SIZE is 2 but RANK is not set"));
    assert!(fails(rank(2, 2, free_port(), &args), quick).contains("RANK 2 is not below WORLD_SIZE 2"));
    // The store's port is taken: rank 0 says so, naming the address.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let t = fails(rank(0, 2, port, &args), quick);
    assert!(t.contains(&format!("cannot listen on 127.0.0.1:{port}")), "{t}");
    // Nobody hosts the store: rank 1 gives up after the timeout (4 s), naming the address.
    let port = free_port();
    let t = fails(rank(1, 2, port, &args), quick);
    assert!(t.contains(&format!("no rendezvous with the store at 127.0.0.1:{port}")), "{t}");
    // Ranks started with different settings are refused at the start, by both.
    let port = free_port();
    let other = pretrain_args(&base, &out, 2, &["dist_timeout_s=4", "dropout=0.2"]);
    let r0 = rank(0, 2, port, &args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let r1 = rank(1, 2, port, &other).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    for (r, child) in [r0, r1].into_iter().enumerate() {
        let o = child.wait_with_output().unwrap();
        assert!(!o.status.success(), "rank {r} started:\n{}", text(&o));
        assert!(
            text(&o).contains("rank(s) 1 of 2 were started with other settings than rank 0"),
            "rank {r}:\n{}",
            text(&o)
        );
    }
}
