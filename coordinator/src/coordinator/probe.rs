//! Whether a worker is alive: its gRPC health service answers at all (`NOT_SERVING` counts; a
//! worker whose group failed says so while it waits for the next epoch). A dead process
//! refuses the connection; a hung one (SIGSTOP) accepts it in the kernel but never answers.

use std::time::Duration;

use crate::tls::{self, Tls};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// The status the health service of the worker at `address` (`host:port`) answers within
/// `timeout` (over mutual TLS with `tls`); `None` when it does not answer.
async fn check(address: &str, timeout: Duration, tls: Option<&Tls>) -> Option<i32> {
    let endpoint = tls::endpoint(address, tls).ok()?;
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
pub(crate) async fn answers(address: &str, timeout: Duration, tls: Option<&Tls>) -> bool {
    check(address, timeout, tls).await.is_some()
}

/// Whether the worker at `address` answers SERVING within `timeout`.
pub(crate) async fn serving(address: &str, timeout: Duration, tls: Option<&Tls>) -> bool {
    check(address, timeout, tls).await == Some(ServingStatus::Serving as i32)
}
