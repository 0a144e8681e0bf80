//! The gRPC health service every Moebius server carries, with the `liveness` service that
//! Kubernetes' liveness probes ask: SERVING for as long as the process answers at all, unlike
//! the overall status (`""`), which says whether the part is ready for work.

use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

/// The health service name that answers SERVING while the process runs.
pub const LIVENESS: &str = "liveness";

/// A health service whose `liveness` is SERVING; the part reports its readiness on the
/// reporter.
pub async fn health_service() -> (HealthReporter, HealthServer<impl Health>) {
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status(LIVENESS, ServingStatus::Serving)
        .await;
    (reporter, service)
}
