//! The Moebius router: the public gRPC API of a cluster.
//!
//! - [`config`]: [`RouterConfig`], filled by `moebius router` from its flags.
//! - [`server`]: [`run`], the gRPC server (`moebius.v1.Inference`, health, reflection) and its
//!   shutdown in phases.
//! - `http`: the HTTP port: the OpenAI-compatible API, `/metrics` and the live built-in
//!   dashboard (`/dashboard`).
//! - [`metrics`]: [`RouterMetrics`], the router's Prometheus metrics, and one request's meter.
//! - `service`: the `Inference` handlers: check, open a session, relay its messages.
//! - `session`: one request across the workers that serve it: one retry elsewhere when a
//!   worker is full, resubmission with what the client has when a worker is lost.
//! - `forward`: one attempt of a request on one worker.
//! - `pool`: the routable workers, the group's members, in-flight counts, least-loaded pick,
//!   admission, workers marked down.
//! - `watch`: follows the placement and the worker registrations in the `TopologyStore`.
//! - `request`: what the router checks without the model, request ids, deadlines, merging a
//!   stream into one response.
//! - [`error`]: [`RouterError`] and its mapping to gRPC status codes.
//! - [`limits`]: what one request may ask (request id, stop strings, logprobs, chat length).
//! - [`auth`]: API keys on the public API (`--api-key-file`).
//! - [`bench`](mod@bench): calls per second and latency through a router or straight to a worker.
//! - `fuzz`: the entry points of the fuzz targets in `fuzz/` (request checks on arbitrary bytes).

pub mod auth;
pub mod bench;
pub mod config;
pub mod error;
mod forward;
#[doc(hidden)]
pub mod fuzz;
mod http;
pub mod limits;
pub mod metrics;
mod pool;
mod request;
pub mod server;
mod service;
mod session;
mod watch;

pub use bench::{bench_calls, BenchResult};
pub use config::RouterConfig;
pub use error::RouterError;
pub use metrics::RouterMetrics;
pub use server::{run, Bound};
