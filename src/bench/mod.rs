//! `moebius bench`: the numbers of BENCHMARKS.md, measured by the binary itself.
//!
//! - [`engine`]: prefill and decode tokens/s of one rank, against the memory-bandwidth limit;
//! - [`router`]: what the router's hop costs against calls sent straight to a worker.

mod engine;
mod router;

use anyhow::Result;
use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Prefill and decode tokens/s of the engine on one rank.
    Engine(engine::EngineArgs),
    /// The router's cost: one-token Generate calls through the router against the same calls
    /// sent straight to the worker, on an in-process cluster of one worker.
    Router(router::RouterArgs),
}

pub fn run(command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Engine(args) => engine::run(args),
        BenchCommand::Router(args) => router::run(args),
    }
}

