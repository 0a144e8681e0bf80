//! The router's configuration: a plain struct that the binary fills from flags.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use moebius_coordinator::telemetry::Registry;

use moebius_coordinator::tls::Tls;

use crate::auth::ApiKeys;
use crate::error::RouterError;
use crate::metrics::RouterMetrics;

/// How one router serves one cluster.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// The cluster's name: its keys live under `/moebius/<cluster>/`.
    pub cluster: String,
    /// Where the public gRPC API listens; port 0 picks a free port (reported by `run`).
    pub listen: SocketAddr,
    /// Most requests this router keeps in flight on one worker; `None` uses the capacity the
    /// worker advertises in the epoch record.
    pub max_in_flight_per_worker: Option<u32>,
    /// A cap on every request's duration, on top of the client's own deadline; `None`: only
    /// the client's deadline applies.
    pub request_timeout: Option<Duration>,
    /// How long a new request waits for an active epoch (the cluster is starting or re-forming)
    /// before it fails with `UNAVAILABLE`; the client's deadline cuts it shorter.
    pub epoch_wait: Duration,
    /// On shutdown, how long in-flight requests may run on before they are cut off.
    pub drain_timeout: Duration,
    /// Most times one request is resubmitted to another worker after losing its worker; past
    /// it the client gets `UNAVAILABLE`.
    pub migration_limit: u32,
    /// Where the HTTP port listens (the OpenAI-compatible API, `/metrics`, `/dashboard`);
    /// `None`: no HTTP port.
    pub http_listen: Option<SocketAddr>,
    /// The model's name in the OpenAI-compatible API: what clients send as `model` and
    /// `GET /v1/models` lists.
    pub model_name: String,
    /// What `/metrics` serves: the router's own metrics and whatever else the caller
    /// registered (a single-process cluster serves every part's here).
    pub registry: Arc<Registry>,
    /// Where the router counts requests; registered into `registry` by the caller.
    pub metrics: Arc<RouterMetrics>,
    /// TLS: the public ports serve our certificate, and the workers are called over mutual
    /// TLS. `None`: plaintext everywhere.
    pub tls: Option<Tls>,
    /// The keys a client must send (`authorization: Bearer <key>`) to call the API (gRPC
    /// `Inference` and HTTP `/v1/...`); `None`: no key needed.
    pub api_keys: Option<ApiKeys>,
    /// Largest request message, gRPC or HTTP body, in bytes. Over it: gRPC `OUT_OF_RANGE`
    /// (tonic's message-size check), HTTP 413.
    pub max_request_bytes: usize,
    /// Most connections one client address may hold open to the public ports together; more
    /// are closed on accept.
    pub max_connections_per_peer: usize,
}

impl RouterConfig {
    /// Metrics registered into a fresh registry that only the router fills.
    pub fn with_own_metrics(mut self) -> Self {
        let mut registry = moebius_coordinator::telemetry::registry();
        self.metrics = Arc::new(RouterMetrics::register(&mut registry));
        self.registry = Arc::new(registry);
        self
    }
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            cluster: "default".to_string(),
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            max_in_flight_per_worker: None,
            request_timeout: None,
            epoch_wait: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(30),
            migration_limit: 3,
            http_listen: None,
            model_name: "moebius".to_string(),
            registry: Arc::default(),
            metrics: Arc::default(),
            tls: None,
            api_keys: None,
            max_request_bytes: crate::limits::DEFAULT_MAX_REQUEST_BYTES,
            max_connections_per_peer: moebius_coordinator::peers::DEFAULT_CONNECTIONS_PER_PEER,
        }
    }
}

impl RouterConfig {
    /// Checks the values that would otherwise fail later and less clearly.
    pub fn validate(&self) -> Result<(), RouterError> {
        let bad = |message: String| Err(RouterError::Config(message));
        if self.cluster.is_empty() || self.cluster.contains('/') {
            return bad(format!(
                "cluster {:?}: give a non-empty name without '/'",
                self.cluster
            ));
        }
        if self.max_in_flight_per_worker == Some(0) {
            return bad("max_in_flight_per_worker: must be at least 1 (or unset to use each worker's capacity)".into());
        }
        if self.request_timeout.is_some_and(|t| t.is_zero()) {
            return bad("request_timeout: must be positive (or unset for none)".into());
        }
        if self.max_request_bytes < 1024 {
            return bad(format!(
                "max_request_bytes {}: must be at least 1024",
                self.max_request_bytes
            ));
        }
        if self.max_connections_per_peer == 0 {
            return bad("max_connections_per_peer: must be at least 1".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        assert_eq!(RouterConfig::default().validate().ok(), Some(()));
    }

    #[test]
    fn rejects_bad_values() {
        for config in [
            RouterConfig {
                cluster: String::new(),
                ..RouterConfig::default()
            },
            RouterConfig {
                cluster: "a/b".into(),
                ..RouterConfig::default()
            },
            RouterConfig {
                max_in_flight_per_worker: Some(0),
                ..RouterConfig::default()
            },
            RouterConfig {
                request_timeout: Some(Duration::ZERO),
                ..RouterConfig::default()
            },
        ] {
            let err = config.validate().expect_err("invalid config");
            assert_eq!(err.kind(), "config");
        }
    }
}
