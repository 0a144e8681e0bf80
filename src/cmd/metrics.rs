//! The metrics port of `moebius worker` and `moebius coordinator`: a registry that the part
//! fills, served on `--metrics-listen` as `GET /metrics`.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Result;
use moebius_coordinator::telemetry::{self, Registry};
use tokio_util::sync::CancellationToken;

/// Serves `registry` on `addr` until `stop` is cancelled; prints and returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    registry: Registry,
    stop: CancellationToken,
) -> Result<SocketAddr> {
    let listener = telemetry::bind(addr, "--metrics-listen").await?;
    let bound = listener.local_addr()?;
    let app = telemetry::metrics_routes(Arc::new(registry));
    tokio::spawn(async move {
        if let Err(e) = telemetry::serve_http(listener, app, stop).await {
            tracing::warn!("the metrics port failed: {e}");
        }
    });
    println!("metrics on http://{bound}/metrics");
    Ok(bound)
}
