//! Training: objectives, learning-rate schedule and weight-decay groups (the training loop and
//! checkpoints are still to come: the open training issue).
pub mod loss;
pub mod schedule;
