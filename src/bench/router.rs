//! `moebius bench router`: one-token `Generate` calls through the router against the same
//! calls sent straight to the worker's internal service, on an in-process one-worker cluster.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use serde_json::json;

#[derive(Args, Debug)]
pub struct RouterArgs {
    /// Checkpoint directory (default: the bundled demo model, fixtures/demo).
    #[arg(long, env = "MOEBIUS_MODEL")]
    model: Option<PathBuf>,
    /// Calls per measurement.
    #[arg(long, default_value_t = 2000)]
    calls: usize,
    /// Concurrency levels, comma-separated.
    #[arg(long, default_value = "1,64", value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run(args: RouterArgs) -> Result<()> {
    if args.calls == 0 || args.concurrency.contains(&0) {
        bail!("--calls and every --concurrency must be at least 1");
    }
    let model = crate::cmd::up::resolve_model(args.model.as_deref())?;
    let config = moebius_worker::config::ModelConfig::from_dir(&model)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let options = crate::cmd::up::LocalOptions {
            workers: 1,
            cluster: "bench",
            capacity: 1024,
            threads: 1,
            ..crate::cmd::up::LocalOptions::new(&model, &config)
        };
        let cluster = crate::cmd::up::start_local(&options, &shutdown).await?;
        let router_addr = cluster.router_addr.to_string();
        let worker_addr = cluster.epoch.workers[0].address.clone();
        let mut rows = Vec::new();
        for &c in &args.concurrency {
            // Warm both paths (connections, first steps) before measuring.
            moebius_router::bench_calls(&router_addr, false, c, c.max(50)).await?;
            moebius_router::bench_calls(&worker_addr, true, c, c.max(50)).await?;
            let direct = moebius_router::bench_calls(&worker_addr, true, c, args.calls).await?;
            let routed = moebius_router::bench_calls(&router_addr, false, c, args.calls).await?;
            rows.push(json!({
                "concurrency": c,
                "direct_calls_per_s": direct.calls_per_s,
                "router_calls_per_s": routed.calls_per_s,
                "router_share_of_direct": routed.calls_per_s / direct.calls_per_s,
                "direct_p50_ms": direct.p50.as_secs_f64() * 1e3,
                "direct_p99_ms": direct.p99.as_secs_f64() * 1e3,
                "router_p50_ms": routed.p50.as_secs_f64() * 1e3,
                "router_p99_ms": routed.p99.as_secs_f64() * 1e3,
                "router_added_p50_ms": (routed.p50.as_secs_f64() - direct.p50.as_secs_f64()) * 1e3,
                "router_added_p99_ms": (routed.p99.as_secs_f64() - direct.p99.as_secs_f64()) * 1e3,
                "errors": direct.errors + routed.errors,
            }));
        }
        shutdown.cancel();
        cluster.join().await;
        let report =
            json!({"model": model.display().to_string(), "calls": args.calls, "results": rows});
        if args.json {
            println!("{report}");
        } else {
            println!(
                "{:>5} {:>12} {:>12} {:>7} {:>10} {:>10} {:>10} {:>10}",
                "conc",
                "direct/s",
                "router/s",
                "share",
                "dir p50ms",
                "rtr p50ms",
                "dir p99ms",
                "rtr p99ms"
            );
            for r in &rows {
                let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
                println!(
                    "{:>5} {:>12.0} {:>12.0} {:>7.3} {:>10.3} {:>10.3} {:>10.3} {:>10.3}",
                    r["concurrency"],
                    f("direct_calls_per_s"),
                    f("router_calls_per_s"),
                    f("router_share_of_direct"),
                    f("direct_p50_ms"),
                    f("router_p50_ms"),
                    f("direct_p99_ms"),
                    f("router_p99_ms")
                );
            }
        }
        Ok(())
    })
}
