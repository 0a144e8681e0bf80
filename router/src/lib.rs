//! The Moebius router: the public gRPC API of a cluster.
//!
//! - [`config`]: [`RouterConfig`], filled by `moebius router` from its flags.
//! - [`server`]: [`run`], the gRPC server (`moebius.v1.Inference`, health, reflection) and its
//!   shutdown in phases.
//! - `service`: the `Inference` handlers: check, open on a worker, relay the stream.
//! - `forward`: opening a request on a worker, with one retry elsewhere when it refuses.
//! - `pool`: the routable workers, their in-flight counts, least-loaded pick, admission.
//! - `watch`: follows the placement and the worker registrations in the `TopologyStore`.
//! - `request`: what the router checks without the model, request ids, deadlines, merging a
//!   stream into one response.
//! - [`error`]: [`RouterError`] and its mapping to gRPC status codes.
//! - [`bench`](mod@bench): calls per second and latency through a router or straight to a worker.

pub mod bench;
pub mod config;
pub mod error;
mod forward;
mod pool;
mod request;
pub mod server;
mod service;
mod watch;

pub use bench::{bench_calls, BenchResult};
pub use config::RouterConfig;
pub use error::RouterError;
pub use server::run;
