//! `mvlt compare-runs`: the curves of several training runs in one picture, to see what one
//! setting changes (for example `--with-itc`).
use crate::plots::{plot_runs, TRAIN_FIELDS, VAL_FIELDS};
use anyhow::{bail, Result};
use mvlt::train::metrics::{read_lines, series_of};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct CompareArgs {
    /// Run folders (each with a metrics.jsonl), at most 6.
    #[arg(required = true, num_args = 1..)]
    runs: Vec<PathBuf>,
    /// A name per run for the legend, in order (default: the folder names).
    #[arg(long, value_delimiter = ',')]
    labels: Vec<String>,
    /// Folder for loss.png and val.png.
    #[arg(long)]
    out: PathBuf,
    /// Moving average of the training curves, in logged points.
    #[arg(long, default_value_t = 5)]
    smooth: usize,
}

pub fn run(a: CompareArgs) -> Result<()> {
    if a.runs.len() > 6 {
        bail!("{} runs: at most 6 fit one picture's colours", a.runs.len());
    }
    if !a.labels.is_empty() && a.labels.len() != a.runs.len() {
        bail!("{} labels for {} runs: give one per run, or none", a.labels.len(), a.runs.len());
    }
    let mut train = vec![];
    let mut val = vec![];
    for (i, run) in a.runs.iter().enumerate() {
        let records = read_lines(&run.join("metrics.jsonl"))?;
        let label = a.labels.get(i).cloned().unwrap_or_else(|| {
            run.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| run.display().to_string())
        });
        train.push((label.clone(), series_of(&records, "train", TRAIN_FIELDS)));
        val.push((label, series_of(&records, "val", VAL_FIELDS)));
    }
    std::fs::create_dir_all(&a.out)?;
    let (loss, valp) = (a.out.join("loss.png"), a.out.join("val.png"));
    plot_runs(&loss, "training loss terms (thin: logged steps; thick: moving average)", &train, a.smooth)?;
    plot_runs(&valp, "validation", &val, 1)?;
    println!("{}\n{}", loss.display(), valp.display());
    Ok(())
}
