//! mvlt — MVLT (Masked Vision-Language Transformer in Fashion, MIR 2023) in Rust on burn, as a
//! library: what a program needs to train, evaluate and search with the model. The `mvlt`
//! command, its HTTP server, plots, demo and developer tooling are the application at the
//! repository root (`mvlt-cli`), built on this crate.
//!
//! - [`model`]: the PVLT network (MVLT-SPEC 2), its config, and weight files (safetensors, the
//!   authors' `.pth`).
//! - [`data`]: the three dataset formats and the synthetic catalogue, the reference's image and
//!   text preprocessing, the pre-training corruptions and the batch loader.
//! - [`train`]: objectives, AdamW, schedule, checkpoints, metrics and the training loop.
//! - [`eval`]: retrieval (R@K over candidate lists) and recognition (accuracy, F1, confusion).
//! - [`infer`]: load trained weights once, then score and classify; [`search`]: rank a catalogue
//!   for a query, exhaustively by ITM or through the contrastive index (its first stage).
//! - [`device`]: CPU / CUDA backend selection (the one place that names burn backends).
//! - [`distributed`]: data-parallel training over processes and machines through PyTorch's c10d.
//! - [`pickle`]: a bounded pickle reader (the authors' `.pth` and `.pkl` files), data only.
//! - [`files`]: bounded, checked reads of user-named files and atomic writes; [`memory`]: the
//!   allocator's keep-or-return policy; [`progress`]: progress bars.
//!
//! Messages go through `tracing`; the library installs no subscriber, keeps no process-wide
//! settings of its own and never exits the process.
pub mod data;
pub mod device;
pub mod distributed;
pub mod eval;
pub mod files;

pub mod infer;
pub mod memory;
pub mod model;
pub mod pickle;
pub mod progress;
pub mod search;
pub mod train;
