//! The engine: requests, sampling, and the step loop of a rank.
//!
//! - [`request`]: a generation request, its validation, streamed tokens and the final output;
//! - [`sampling`]: greedy/temperature/top-k/top-p sampling and log-probabilities;
//! - [`rank`]: one rank's sequences, batched steps (decode tokens plus prefill chunks under a
//!   token budget) and the lock-step loop every rank of a group runs;
//! - [`group`]: an EP group of threads in this process over the `local` or `tcp` data plane.

pub mod group;
pub mod rank;
pub mod request;
pub mod sampling;

pub use group::{run_group, GroupOptions, GroupReport, LoadedModel, Transport};
pub use rank::{Agreement, RankEngine, RankStats, RunUntil, SequenceEvent, Submission};
pub use request::{FinishReason, GenerateOutput, GenerateRequest, TokenEvent};
pub use sampling::{Sampled, Sampler, SamplingParams};
