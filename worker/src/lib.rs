//! The Moebius worker: everything one rank of an EP group runs.
//!
//! - [`checkpoint`]: Hugging Face checkpoint directories — memory-mapped safetensors, dtype
//!   conversion, FP8 block dequantisation; reads only the tensors asked for.
//! - [`comm`]: the expert-parallel communicator trait (all-to-all-v) and its `local` (threads)
//!   and `tcp` (full mesh) backends.
//! - [`error`]: the crate's error type.
pub mod checkpoint;
pub mod comm;
pub mod error;

pub use error::{Error, Result};
