//! mvlt — MVLT (Masked Vision-Language Transformer in Fashion, MIR 2023) in Rust on burn.
//!
//! - [`model`]: the PVLT network, its config and weight files.
//! - [`device`]: CPU / CUDA backend selection (the one place that names burn backends).
//! - [`verify`]: parity checks against tensors produced by the authors' PyTorch code.
pub mod cli;
pub mod data;
pub mod device;
pub mod eval;
pub mod files;
pub mod infer;
pub mod memory;
pub mod model;
pub mod progress;
pub mod serve;
pub mod train;
pub mod verify;
pub mod verify_step;
