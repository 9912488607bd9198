//! mvlt — MVLT (Masked Vision-Language Transformer in Fashion, MIR 2023) in Rust on burn.
//!
//! - [`model`]: the PVLT network (MVLT-SPEC 2), its config, and weight files (safetensors, the
//!   authors' `.pth`).
//! - [`data`]: the three dataset formats and the synthetic catalogue, the reference's image and
//!   text preprocessing, the pre-training corruptions and the batch loader.
//! - [`train`]: objectives, AdamW, schedule, checkpoints, metrics and the training loop.
//! - [`eval`]: retrieval (R@K over candidate lists) and recognition (accuracy, F1, confusion).
//! - [`infer`]: load trained weights once, then score, classify and search; [`index`]: a
//!   catalogue's contrastive index, the first stage of a search.
//! - [`serve`]: the HTTP API and web page over [`infer`].
//! - [`verify`], [`verify_step`]: parity with tensors produced by the authors' PyTorch code (a
//!   forward pass; one training step).
//! - [`device`]: CPU / CUDA backend selection (the one place that names burn backends).
//! - [`pickle`]: a bounded pickle reader (the authors' `.pth` and `.pkl` files), data only.
//! - [`files`]: bounded, checked reads of user-named files and atomic writes; [`memory`]: the
//!   allocator's keep-or-return policy; [`progress`]: progress bars.
//! - [`demo`]: `mvlt demo`, the whole pipeline on the synthetic catalogue, and its report.
//! - [`cli`]: the `mvlt` command line.
pub mod cli;
pub mod data;
pub mod demo;
pub mod device;
pub mod eval;
pub mod files;
pub mod index;
pub mod infer;
pub mod memory;
pub mod model;
pub mod pickle;
pub mod progress;
pub mod serve;
pub mod train;
pub mod verify;
pub mod verify_step;
