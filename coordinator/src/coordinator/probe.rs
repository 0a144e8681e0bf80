//! Whether a worker is alive: its gRPC health service answers at all (`NOT_SERVING` counts; a
//! worker whose group failed says so while it waits for the next epoch). A dead process
//! refuses the connection; a hung one (SIGSTOP) accepts it in the kernel but never answers.

use std::time::Duration;

use tonic::transport::Endpoint;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Whether the worker at `address` (`host:port`) answers a health check within `timeout`.
pub(super) async fn answers(address: &str, timeout: Duration) -> bool {
    let uri = if address.contains("://") {
        address.to_string()
    } else {
        format!("http://{address}")
    };
    let Ok(endpoint) = Endpoint::from_shared(uri) else {
        return false;
    };
    let check = async {
        let channel = endpoint.connect_timeout(timeout).connect().await.ok()?;
        HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .ok()
    };
    matches!(tokio::time::timeout(timeout, check).await, Ok(Some(_)))
}
