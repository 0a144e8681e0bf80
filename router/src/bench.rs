//! Calls per second and latency of one-token `Generate` calls, sent through a router or
//! straight to a worker, so that the difference is the router's overhead.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moebius_proto::v1::generate_request::Prompt;
use moebius_proto::v1::inference_client::InferenceClient;
use moebius_proto::v1::worker_client::WorkerClient;
use moebius_proto::v1::{GenerateRequest, TokenIds, WorkerGenerateRequest};
use tokio::task::JoinSet;
use tonic::transport::{Channel, Endpoint};

use crate::error::RouterError;

/// What [`bench_calls`] measured.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchResult {
    /// Calls that succeeded.
    pub calls: usize,
    /// Calls that failed (not counted in the latencies).
    pub errors: usize,
    /// Successful calls per second of wall time.
    pub calls_per_s: f64,
    /// Median latency of a successful call.
    pub p50: Duration,
    /// 99th-percentile latency of a successful call.
    pub p99: Duration,
}

/// Sends `calls` greedy one-token `Generate` calls, `concurrency` at a time over one HTTP/2
/// connection, to the `Inference` service at `addr` or, with `direct`, to the `Worker` service
/// at `addr`. Fails when the address is bad or every call failed (with the first error).
pub async fn bench_calls(
    addr: &str,
    direct: bool,
    concurrency: usize,
    calls: usize,
) -> Result<BenchResult, RouterError> {
    let uri = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let unreachable = |e: tonic::transport::Error| RouterError::Unreachable {
        address: addr.to_string(),
        message: e.to_string(),
    };
    let channel = Endpoint::from_shared(uri)
        .map_err(unreachable)?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(unreachable)?;
    let issued = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let channel = channel.clone();
        let issued = Arc::clone(&issued);
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = Vec::new();
            while issued.fetch_add(1, Ordering::Relaxed) < calls {
                let t0 = Instant::now();
                match one_call(&channel, direct).await {
                    Ok(()) => latencies.push(t0.elapsed()),
                    Err(status) => errors.push(status),
                }
            }
            (latencies, errors)
        });
    }
    let mut latencies = Vec::with_capacity(calls);
    let mut errors = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        // A task only panics on a bug; count its calls as lost rather than guess.
        if let Ok((mut l, mut e)) = joined {
            latencies.append(&mut l);
            errors.append(&mut e);
        }
    }
    let elapsed = started.elapsed();
    if latencies.is_empty() && !errors.is_empty() {
        return Err(RouterError::Worker(errors.swap_remove(0)));
    }
    latencies.sort_unstable();
    let percentile = |p: f64| -> Duration {
        if latencies.is_empty() {
            return Duration::ZERO;
        }
        let i = ((latencies.len() - 1) as f64 * p).round() as usize;
        latencies[i]
    };
    Ok(BenchResult {
        calls: latencies.len(),
        errors: errors.len(),
        calls_per_s: latencies.len() as f64 / elapsed.as_secs_f64().max(f64::MIN_POSITIVE),
        p50: percentile(0.50),
        p99: percentile(0.99),
    })
}

async fn one_call(channel: &Channel, direct: bool) -> Result<(), tonic::Status> {
    let request = GenerateRequest {
        prompt: Some(Prompt::TokenIds(TokenIds { ids: vec![1, 2, 3] })),
        max_new_tokens: 1,
        ignore_eos: true,
        ..GenerateRequest::default()
    };
    if direct {
        let mut stream = WorkerClient::new(channel.clone())
            .generate(WorkerGenerateRequest {
                request: Some(request),
                resume: None,
            })
            .await?
            .into_inner();
        while stream.message().await?.is_some() {}
    } else {
        InferenceClient::new(channel.clone())
            .generate(request)
            .await?;
    }
    Ok(())
}
