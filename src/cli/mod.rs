//! The `mvlt` command line.
mod bench;
mod bench_compare;
mod data_bench;
mod data_cmd;
mod demo_cmd;
mod dist_bench;
mod eval_cmd;
mod infer_cmd;
mod plot_cmd;
mod serve_cmd;
mod synth_cmd;
mod train_cmd;
mod verify_cmd;
mod weights_cmd;

use anyhow::Result;
use clap::{Parser, Subcommand};
use mvlt::device::{BackendKind, BackendTask, DeviceSpec};
use std::sync::OnceLock;

#[derive(Parser)]
#[command(name = "mvlt", version, about = "MVLT (Masked Vision-Language Transformer in Fashion) in Rust: \
pre-train and fine-tune, evaluate, score / classify / search, serve an HTTP API, verify against the reference, \
inspect and convert weights, benchmark", long_about = None)]
pub struct Cli {
    /// The backend that runs the model: flex (pure Rust), tch (libtorch), cubecl (burn's CUDA).
    /// Default: the fastest one this binary has for the device (`mvlt info` says which);
    /// also MVLT_BACKEND.
    #[arg(long, global = true, value_enum)]
    backend: Option<mvlt::device::BackendKind>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The whole pipeline on the built-in synthetic catalogue, no download: synthesize, pre-train,
    /// evaluate retrieval, fine-tune, evaluate recognition, and write REPORT.md + report.json.
    Demo(demo_cmd::DemoArgs),
    /// Pre-train (MLM + ITM + masked image reconstruction) on a dataset or the synthetic catalogue.
    Pretrain(train_cmd::TrainArgs),
    /// Fine-tune the recognition heads from pre-trained weights.
    Finetune(train_cmd::TrainArgs),
    /// Retrieval and recognition evaluation, as the paper reports them.
    #[command(subcommand)]
    Eval(EvalCommand),
    /// Image-text match probability (ITM head).
    Score(infer_cmd::ScoreArgs),
    /// Top main and sub categories of a product image (recognition heads).
    Classify(infer_cmd::ClassifyArgs),
    /// Search a catalogue: text -> products, or image -> captions (ITM over every candidate, or
    /// over an index's first stage with --index).
    Search(infer_cmd::SearchArgs),
    /// Embed every catalogue image once (weights pre-trained with --with-itc) into an index file
    /// that `search --index` and `serve --index` rank with one matrix product before ITM re-ranks
    /// the top k.
    Index(infer_cmd::IndexArgs),
    /// Serve the HTTP API and web page over a model and a catalogue.
    Serve(serve_cmd::ServeArgs),
    /// Loopback load test of the HTTP API: latency and requests/s at several concurrency levels,
    /// then bad requests (each must get a 4xx JSON error without taking the server down).
    BenchServe(serve_cmd::ServeBenchArgs),
    /// Run the model on a reference fixture and compare every stored tensor (exit 1 on any failure).
    Verify(verify_cmd::VerifyArgs),
    /// Describe a weights file (variant, heads, parameter count, keys), or a config's layout.
    Inspect(weights_cmd::InspectArgs),
    /// Convert a PyTorch .pth (checkpoint or state dict) to safetensors.
    Convert(weights_cmd::ConvertArgs),
    /// Time the forward pass (eval mode) on random inputs; with --compare-pytorch, every case
    /// against PyTorch in one invocation (docs/BENCHMARKS.md).
    Bench(bench::BenchArgs),
    /// All-reduce bandwidth of the distributed engine, run as the ranks of a launch
    /// (`torchrun --nproc-per-node 2 --no-python mvlt bench-all-reduce`).
    BenchAllReduce(dist_bench::AllReduceBenchArgs),
    /// Write the built-in synthetic fashion catalogue (JSONL + PNG images + vocabulary).
    Synth(synth_cmd::SynthArgs),
    /// Data tools: `mvlt data info` describes a dataset; `mvlt data bench` times the loader
    /// against the reference pipeline.
    #[command(subcommand)]
    Data(DataCommand),
    /// Print the word pieces and model input ids of texts.
    Tokenize(data_cmd::TokenizeArgs),
    /// Show what the model sees of an image: the reference crop, the resize, the tensor.
    Preprocess(data_cmd::PreprocessArgs),
    /// The curves of several training runs in one picture (loss.png, val.png), one colour per run.
    CompareRuns(plot_cmd::CompareArgs),
    /// The version, the backends this binary has, and which each device would use.
    Info,
}

#[derive(Subcommand)]
enum EvalCommand {
    /// R@1/5/10 of each query's positive among its candidates, ranked by match probability.
    Retrieval(eval_cmd::RetrievalArgs),
    /// Accuracy, macro/micro/weighted F1, per-class table and confusion matrices.
    Recognition(eval_cmd::RecognitionArgs),
}

#[derive(Subcommand)]
enum DataCommand {
    /// Images/s of the image pipeline and of whole batches (optionally vs the reference PIL pipeline).
    Bench(data_bench::DataBenchArgs),
    /// Rows, products, classes and skipped rows of a dataset (any of the three formats).
    Info(data_cmd::DataInfoArgs),
}

/// The backend this command runs on (`--backend`, else `MVLT_BACKEND`; none: each device's
/// default). The application's own setting, fixed in [`main`] before a command runs; the library
/// takes it as an argument.
static BACKEND: OnceLock<Option<BackendKind>> = OnceLock::new();

/// See [`BACKEND`].
pub fn backend() -> Option<BackendKind> {
    BACKEND.get().copied().flatten()
}

fn choose_backend(flag: Option<BackendKind>) -> Result<()> {
    let chosen = match flag {
        Some(b) => Some(b),
        None => match std::env::var("MVLT_BACKEND") {
            Ok(v) if !v.is_empty() => Some(v.parse::<BackendKind>().map_err(|e| e.context("MVLT_BACKEND"))?),
            _ => None,
        },
    };
    let chosen = chosen.map(mvlt::device::check_built).transpose()?;
    BACKEND.set(chosen).map_err(|_| anyhow::anyhow!("the backend was already chosen"))
}

/// [`mvlt::device::run_on`] on the chosen backend.
pub fn run_on<T: BackendTask>(spec: DeviceSpec, task: T) -> Result<T::Output> {
    mvlt::device::run_on_backend(spec, backend(), task)
}

/// A training run from the command line, on its settings' devices and the chosen backend, under
/// [`run_control`].
///
/// Launched as one rank of several (torchrun's environment, [`mvlt::distributed::Launch`]), it
/// joins the group first and trains on the LibTorch backend, on GPU `LOCAL_RANK` when the settings
/// name a CUDA device; a group torchrun restarted continues from the run's last checkpoint.
pub fn train(
    mut config: mvlt::train::config::TrainConfig,
    dir: &std::path::Path,
    resume: bool,
) -> Result<mvlt::train::trainer::RunSummary> {
    let Some(launch) = mvlt::distributed::Launch::from_env()? else {
        let device = config.train_device();
        let run = mvlt::train::trainer::TrainRun { config, dir: dir.to_path_buf(), resume, control: run_control() };
        return mvlt::device::run_on_backend(device, backend(), run);
    };
    if let Some(b) = backend().filter(|b| *b != BackendKind::Tch) {
        anyhow::bail!("{launch}: distributed training runs on the tch backend (PyTorch's c10d), not {b}");
    }
    // Each rank trains on the GPU of its LOCAL_RANK.
    if let DeviceSpec::Cuda(_) = config.device {
        config.device = DeviceSpec::Cuda(launch.local_rank);
        config.devices.clear();
    }
    let restarted = launch.restart > 0 && !mvlt::train::checkpoint::list(&dir.join("checkpoints")).is_empty();
    if restarted && !resume {
        tracing::info!(
            "{launch}: torchrun restarted the group (attempt {}): continuing from the last checkpoint",
            launch.restart + 1
        );
    }
    let group = mvlt::distributed::join(&launch, std::time::Duration::from_secs_f64(config.dist_timeout_s))?;
    let control = mvlt::train::trainer::RunControl { group: Some(group), ..run_control() };
    let device = config.device;
    let run = mvlt::train::trainer::TrainRun { config, dir: dir.to_path_buf(), resume: resume || restarted, control };
    mvlt::device::run_on_backend(device, Some(BackendKind::Tch), run)
}

/// The control of a training run started from the command line: Ctrl-C stops it at the next
/// step boundary with a checkpoint (a second Ctrl-C exits at once), and its plots are redrawn
/// whenever its metrics change.
pub fn run_control() -> mvlt::train::trainer::RunControl {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    static STOP: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    let stop = STOP
        .get_or_init(|| {
            let stop = Arc::new(AtomicBool::new(false));
            let flag = stop.clone();
            // Fails only when another handler is installed already; training then has no Ctrl-C stop.
            let _ = ctrlc::set_handler(move || {
                if flag.swap(true, Ordering::SeqCst) {
                    eprintln!("\nsecond Ctrl-C: exiting without a checkpoint");
                    std::process::exit(130);
                }
                eprintln!(
                    "\nCtrl-C: finishing this step, writing a checkpoint, then stopping (Ctrl-C again to quit at once)"
                );
            });
            stop
        })
        .clone();
    mvlt::train::trainer::RunControl {
        stop,
        on_metrics: Some(Arc::new(|dir: &std::path::Path| crate::plots::plot_run(dir))),
        ..Default::default()
    }
}

pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    choose_backend(cli.backend)?;
    match cli.command {
        Command::Info => {
            println!("mvlt {}", env!("CARGO_PKG_VERSION"));
            print!("{}", mvlt::device::describe(backend()));
            Ok(())
        }
        Command::Demo(a) => demo_cmd::run(a),
        Command::CompareRuns(a) => plot_cmd::run(a),
        Command::Pretrain(a) => train_cmd::run(mvlt::train::config::Task::Pretrain, a),
        Command::Finetune(a) => train_cmd::run(mvlt::train::config::Task::Finetune, a),
        Command::Eval(EvalCommand::Retrieval(a)) => eval_cmd::retrieval(a),
        Command::Eval(EvalCommand::Recognition(a)) => eval_cmd::recognition(a),
        Command::Score(a) => infer_cmd::score(a),
        Command::Classify(a) => infer_cmd::classify(a),
        Command::Search(a) => infer_cmd::search(a),
        Command::Index(a) => infer_cmd::index(a),
        Command::Serve(a) => serve_cmd::serve(a),
        Command::BenchServe(a) => serve_cmd::bench(a),
        Command::Verify(a) => verify_cmd::run(a),
        Command::Inspect(a) => weights_cmd::inspect(a),
        Command::Convert(a) => weights_cmd::convert(a),
        Command::Bench(a) => bench::run(a),
        Command::BenchAllReduce(a) => dist_bench::run(a),
        Command::Synth(a) => synth_cmd::run(a),
        Command::Data(DataCommand::Bench(a)) => data_bench::run(a),
        Command::Data(DataCommand::Info(a)) => data_cmd::info(a),
        Command::Tokenize(a) => data_cmd::tokenize(a),
        Command::Preprocess(a) => data_cmd::preprocess_cmd(a),
    }
}

/// A fraction in [0, 1) (`--val-fraction`): NaN, negative and >= 1 are refused by clap.
fn parse_fraction(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
    if !(0.0..1.0).contains(&v) {
        return Err(format!("{v} is not a fraction in [0, 1)"));
    }
    Ok(v)
}

/// A text length T in [2, 512]: [CLS] and [SEP] at least, the position table at most.
fn parse_text_len(s: &str) -> Result<usize, String> {
    let v: usize = s.parse().map_err(|_| format!("'{s}' is not a whole number"))?;
    mvlt::data::text::check_max_len(v).map_err(|e| e.to_string())?;
    Ok(v)
}
