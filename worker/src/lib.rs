//! The Moebius worker: everything one rank of an EP group runs.
//!
//! - [`config`]: the model's `config.json` (DeepSeek-V3 and V2), validated.
//! - [`checkpoint`]: Hugging Face checkpoint directories — memory-mapped safetensors, dtype
//!   conversion, FP8 block dequantisation; reads only the tensors asked for.
//! - [`backend`]: the compute backend trait and the CPU backend (`gemm` for f32 weights, packed
//!   AVX-512 kernels for bf16 weights).
//! - [`model`]: MLA attention, the MoE block with its expert-parallel exchange, the KV cache.
//! - [`engine`]: requests, sampling, the batched step loop and in-process EP groups.
//! - [`comm`]: the expert-parallel communicator trait (all-to-all-v) and its `local` (threads)
//!   and `tcp` (full mesh) backends.
//! - [`service`]: one rank as a networked worker — the `moebius.v1.Worker` gRPC service, the
//!   engine thread, registration, the placement watch and the epoch protocol.
//! - [`metrics`]: the worker's Prometheus metrics (steps, sequences, exchange, epochs, expert
//!   load).
//! - [`tokenizer`]: the checkpoint's `tokenizer.json`.
//! - [`chat`]: the checkpoint's chat template, rendered as transformers renders it.
//! - [`error`]: the crate's error type.
//! - `fuzz`: the entry points of the fuzz targets in `fuzz/` (decoders of untrusted bytes).
pub mod backend;
pub mod chat;
pub mod checkpoint;
pub mod comm;
pub mod config;
pub mod engine;
pub mod error;
#[doc(hidden)]
pub mod fuzz;
pub mod metrics;
pub mod model;
pub mod service;
pub mod tokenizer;

pub use error::{Error, Result};
pub use service::{RunningWorker, WorkerConfig};
