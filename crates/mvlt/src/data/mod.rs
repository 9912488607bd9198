//! Data: tokenizer and text corruptions, image preprocessing, datasets.
pub mod dataset;
pub mod image;
pub mod loader;
pub mod synth;
pub mod text;
