//! Progress bars for long work (indicatif; hidden automatically when stderr is not a terminal).
use indicatif::{ProgressBar, ProgressStyle};

/// A bar with position, rate and ETA, plus a free message (loss terms while training).
pub fn progress_bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "{what} {{bar:40}} {{pos}}/{{len}} [{{elapsed_precise}} < {{eta_precise}}, {{per_sec}}] {{msg}}"
        ))
        .expect("static template"),
    );
    pb
}
