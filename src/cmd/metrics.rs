//! The metrics port of `moebius worker` and `moebius coordinator`: a registry that the part
//! fills, served on `--metrics-listen` as `GET /metrics`.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Result;
use moebius_coordinator::peers::{PerPeer, DEFAULT_CONNECTIONS_PER_PEER};
use moebius_coordinator::telemetry::{self, Registry};
use moebius_coordinator::tls::Tls;
use tokio_util::sync::CancellationToken;

/// Serves `registry` on `addr` until `stop` is cancelled; prints and returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    registry: Registry,
    stop: CancellationToken,
    tls: Option<&Tls>,
) -> Result<SocketAddr> {
    let listener = telemetry::bind(addr, "--metrics-listen").await?;
    let bound = listener.local_addr()?;
    let app = telemetry::metrics_routes(Arc::new(registry));
    let tls = tls.cloned();
    let scheme = if tls.is_some() { "https" } else { "http" };
    tokio::spawn(async move {
        let per_peer = PerPeer::new(DEFAULT_CONNECTIONS_PER_PEER);
        if let Err(e) = telemetry::serve_http(listener, app, stop, tls.as_ref(), per_peer).await {
            tracing::warn!("the metrics port failed: {e}");
        }
    });
    println!("metrics on {scheme}://{bound}/metrics");
    Ok(bound)
}
