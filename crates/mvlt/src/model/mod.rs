//! The PVLT model: configuration, layers, the network and its weight files.
pub mod config;
pub mod layers;
pub mod pvlt;
pub mod torch_file;
pub mod weights;

pub use config::{HeadSet, PvltConfig};
pub use pvlt::{HiddenStates, MlmAt, Mode, Pvlt, PvltOutput};
