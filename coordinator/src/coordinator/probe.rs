//! Whether a worker is alive: its gRPC health service answers at all (`NOT_SERVING` counts; a
//! worker whose group failed says so while it waits for the next epoch). A dead process
//! refuses the connection; a hung one (SIGSTOP) accepts it in the kernel but never answers.

use std::time::Duration;

use tonic::transport::Endpoint;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// The status the health service of the worker at `address` (`host:port`) answers within
/// `timeout`; `None` when it does not answer.
async fn check(address: &str, timeout: Duration) -> Option<i32> {
    let uri = if address.contains("://") {
        address.to_string()
    } else {
        format!("http://{address}")
    };
    let endpoint = Endpoint::from_shared(uri).ok()?;
    let check = async {
        let channel = endpoint.connect_timeout(timeout).connect().await.ok()?;
        HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .ok()
    };
    let response = tokio::time::timeout(timeout, check).await.ok()??;
    Some(response.into_inner().status)
}

/// Whether the worker at `address` answers a health check within `timeout`.
pub(crate) async fn answers(address: &str, timeout: Duration) -> bool {
    check(address, timeout).await.is_some()
}

/// Whether the worker at `address` answers SERVING within `timeout`.
pub(crate) async fn serving(address: &str, timeout: Duration) -> bool {
    check(address, timeout).await == Some(ServingStatus::Serving as i32)
}
