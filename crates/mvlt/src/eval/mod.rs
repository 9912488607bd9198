//! Evaluation as the paper reports it: retrieval (R@1/5/10 over candidate lists) and category
//! recognition (accuracy and F1 scores).
pub mod metrics;
pub mod recognition;
pub mod retrieval;
