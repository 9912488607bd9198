//! Training: objectives (the training loop, checkpoints and schedules are the open training issue).
pub mod loss;
