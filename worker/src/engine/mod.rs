//! The engine: requests, sampling, and the step loop of a rank.
//!
//! - [`request`]: a generation request, its validation, streamed tokens and the final output;
//! - [`sampling`]: greedy/temperature/top-k/top-p sampling and log-probabilities;
//! - [`rank`]: one rank's sequences and the batched step (decode tokens plus prefill chunks
//!   under a token budget), with the sinks their tokens go to;
//! - [`kv_budget`]: the KV cache a rank's sequences may hold, in blocks of tokens (admission
//!   and preemption keep the caches within it);
//! - [`thread`]: the engine thread, the one lock-step loop every rank runs (agreement, step,
//!   pause, epoch installation, surviving a failed group);
//! - [`group`]: an EP group of engine threads in this process over the `local` or `tcp` data
//!   plane.

pub mod group;
pub mod kv_budget;
pub mod rank;
pub mod request;
pub mod sampling;
pub mod thread;

pub use group::{run_group, GroupOptions, GroupReport, LoadedModel, Transport};
pub use kv_budget::KvBudget;
pub use rank::{EventSink, RankEngine, RankStats, SequenceEvent, Submission, Tagged};
pub use request::{FinishReason, GenerateOutput, GenerateRequest, TokenEvent};
pub use sampling::{Sampled, Sampler, SamplingParams};
pub use thread::{
    EngineHandle, EngineOptions, EngineStatus, GroupFailure, Installation, OnGroupFailure, Phase,
};
