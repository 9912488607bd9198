//! The `mvlt` application over the `mvlt` library (crates/mvlt): the command line, the HTTP
//! server, plots, the demo and its report, and the developer tooling.
//!
//! - [`cli`]: the `mvlt` command line.
//! - [`serve`]: the HTTP API and web page over `mvlt::infer`.
//! - [`demo`]: `mvlt demo`, the whole pipeline on the synthetic catalogue, and its report.
//! - [`plots`]: loss curves and confusion matrices.
//! - [`verify`], [`verify_step`]: parity with tensors produced by the authors' PyTorch code (a
//!   forward pass; one training step).
pub mod cli;
pub mod demo;
pub mod plots;
pub mod serve;
pub mod verify;
pub mod verify_step;
