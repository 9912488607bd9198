//! Data: tokenizer and text corruptions, image preprocessing, datasets.
pub mod text;
