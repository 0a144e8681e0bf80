//! `moebius bench`: the numbers of BENCHMARKS.md, measured by the binary itself.
//!
//! - [`engine`]: prefill and decode tokens/s of one rank, against the memory-bandwidth limit
//!   ([`roofline`]);
//! - [`products`]: the backend's products with a weight alone, per shape: TFLOP/s and GB/s;
//! - [`router`]: what the router's hop costs against calls sent straight to a worker;
//! - [`serve`]: a load generator against a running router (throughput, TTFT, TPOT, ITL), over
//!   gRPC or the OpenAI-compatible HTTP API ([`openai`]: its client);
//! - [`alltoall`]: the communicator's dispatch and combine against raw TCP;
//! - [`failover`]: what streams see when a worker process is killed under load.

mod alltoall;
mod engine;
mod failover;
mod openai;
mod products;
mod roofline;
mod router;
mod serve;

use anyhow::Result;
use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Prefill and decode tokens/s of the engine on one rank.
    Engine(engine::EngineArgs),
    /// The backend's products with a weight alone, per weight shape and activation rows, as
    /// the engine calls them: time, TFLOP/s and weight GB/s.
    Products(products::ProductsArgs),
    /// The router's cost: one-token Generate calls through the router against the same calls
    /// sent straight to the worker, on an in-process cluster of one worker.
    Router(router::RouterArgs),
    /// Load generator against a running router: throughput, TTFT, TPOT, ITL and end-to-end
    /// latency of streaming requests with random token-id prompts.
    Serve(serve::ServeArgs),
    /// The all-to-all alone: MoE dispatch and combine between ranks of this process, with
    /// latency and algorithm bandwidth (bytes a rank sends to other ranks per exchange / exchange
    /// latency, as DeepEP reports it), against a raw TCP baseline of the same bytes.
    Alltoall(alltoall::AlltoallArgs),
    /// Recovery from a worker failure: `moebius up --etcd` under a steady load of streams, one
    /// worker killed with `kill -9`; reports lost requests, the stall each stream saw, the
    /// time to the next epoch and the migrated requests.
    Failover(failover::FailoverArgs),
}

pub fn run(command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Engine(args) => engine::run(args),
        BenchCommand::Products(args) => products::run(args),
        BenchCommand::Router(args) => router::run(args),
        BenchCommand::Serve(args) => serve::run(args),
        BenchCommand::Alltoall(args) => alltoall::run(args),
        BenchCommand::Failover(args) => failover::run(args),
    }
}
