//! Training: objectives, optimiser, schedule, checkpoints, metrics and the loop itself.
pub mod checkpoint;
pub mod config;
pub mod ema;
pub mod hard_negatives;
pub mod loss;
pub mod metrics;
pub mod optim;
pub mod precision;
pub mod schedule;
pub mod setup;
pub mod step;
pub mod trainer;
pub mod validate;
