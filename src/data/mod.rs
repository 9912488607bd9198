//! Data: tokenizer and text corruptions, image preprocessing, datasets.
pub mod dataset;
pub mod image;
pub mod text;
