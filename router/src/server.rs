//! [`run`]: the router's gRPC server (the `Inference` service, health and reflection), the
//! topology watch behind it, and shutdown in phases.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use moebius_coordinator::peers::{self, PerPeer};
use moebius_coordinator::telemetry::serve_http;
use moebius_coordinator::tls::Clients;
use moebius_coordinator::{Keys, TopologyStore};
use moebius_proto::v1::inference_server::InferenceServer;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Server;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;
use tracing::{info, warn};

use crate::config::RouterConfig;
use crate::error::RouterError;
use crate::http::{self, Dashboard};
use crate::pool::Pool;
use crate::service::RouterService;
use crate::watch::watch_topology;

/// After the drain period, how long requests cut off with `UNAVAILABLE` get to close.
const CUT_OFF_GRACE: Duration = Duration::from_secs(2);

/// Most calls at once on one HTTP/2 connection of the public API.
const MAX_STREAMS_PER_CONNECTION: u32 = 1024;

/// The service name that health checks of the router's API ask about.
const INFERENCE_SERVICE: &str = "moebius.v1.Inference";

/// Where a router listens, once bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bound {
    /// The public gRPC API.
    pub grpc: SocketAddr,
    /// The HTTP port (`/metrics`, `/dashboard`), when configured.
    pub http: Option<SocketAddr>,
}

/// Serves the public API of `config.cluster` on `config.listen` until `shutdown` is cancelled,
/// and `/metrics` and `/dashboard` on `config.http_listen` when it is set.
///
/// Reports the bound addresses through `ready` (useful with port 0). On shutdown: stops
/// accepting calls and reports `NOT_SERVING`, lets in-flight calls finish for up to
/// `config.drain_timeout`, cuts off the rest with `UNAVAILABLE`, then stops its tasks.
pub async fn run(
    config: RouterConfig,
    store: Arc<dyn TopologyStore>,
    shutdown: CancellationToken,
    ready: Option<oneshot::Sender<Bound>>,
) -> Result<(), RouterError> {
    config.validate()?;
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| RouterError::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| RouterError::Bind {
        addr: config.listen,
        source,
    })?;

    let http_listener = match config.http_listen {
        Some(http) => Some(
            TcpListener::bind(http)
                .await
                .map_err(|source| RouterError::Bind { addr: http, source })?,
        ),
        None => None,
    };
    let http_addr = match &http_listener {
        Some(l) => Some(l.local_addr().map_err(|source| RouterError::Bind {
            addr: config.listen,
            source,
        })?),
        None => None,
    };

    let pool = Arc::new(
        Pool::with_metrics(config.max_in_flight_per_worker, Arc::clone(&config.metrics))
            .with_tls(config.tls.clone()),
    );
    let per_peer = PerPeer::new(config.max_connections_per_peer);
    let background_stop = CancellationToken::new();
    let drain = CancellationToken::new();
    let relays = TaskTracker::new();
    let mut background = JoinSet::new();
    background.spawn(watch_topology(
        store.clone(),
        Keys::new(&config.cluster),
        Arc::clone(&pool),
        background_stop.clone(),
    ));
    let (reporter, health) = moebius_coordinator::health::health_service().await;
    // Registered before the first request can come, so that a probe at start-up reads
    // NOT_SERVING rather than "service not registered" until the task below first reports.
    set_health(&reporter, ServingStatus::NotServing).await;
    let health_stop = shutdown.child_token();
    background.spawn(report_health(
        reporter,
        Arc::clone(&pool),
        health_stop.clone(),
    ));

    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(moebius_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    // Both versions: grpcurl and older tools still ask v1alpha.
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| RouterError::Reflection(e.to_string()))?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| RouterError::Reflection(e.to_string()))?;
    let service = RouterService::new(Arc::clone(&pool), &config, drain.clone(), relays.clone());
    if let Some(listener) = http_listener {
        let dashboard = Dashboard {
            cluster: config.cluster.clone(),
            store,
            keys: Keys::new(&config.cluster),
            pool: Arc::clone(&pool),
        };
        let api = http::openai::OpenAi::new(
            service.clone(),
            Arc::clone(&pool),
            config.model_name.clone(),
            config.max_request_bytes,
            config.api_keys.clone(),
        );
        let app = http::app(dashboard, Arc::clone(&config.registry), api);
        let stop = background_stop.clone();
        let (tls, per_peer) = (config.tls.clone(), Arc::clone(&per_peer));
        background.spawn(async move {
            if let Err(e) = serve_http(listener, app, stop, tls.as_ref(), per_peer).await {
                warn!("the router's HTTP port failed: {e}");
            }
        });
    }

    let mut builder = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION));
    if let Some(tls) = &config.tls {
        builder = builder.tls_config(tls.grpc_server(Clients::Anyone))?;
    }
    let keys = config.api_keys.clone();
    let inference = InterceptedService::new(
        InferenceServer::new(service).max_decoding_message_size(config.max_request_bytes),
        move |request: tonic::Request<()>| {
            if let Some(keys) = &keys {
                keys.check_grpc(request.metadata())?;
            }
            Ok(request)
        },
    );
    let serve = builder
        .add_service(inference)
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(
            peers::incoming(listener, Arc::clone(&per_peer)),
            shutdown.clone().cancelled_owned(),
        );
    tokio::pin!(serve);
    info!(%addr, http = ?http_addr, cluster = %config.cluster, "router serving");
    if let Some(ready) = ready {
        let _ = ready.send(Bound {
            grpc: addr,
            http: http_addr,
        });
    }

    // Phase 1: serve until shutdown.
    let served = tokio::select! {
        result = &mut serve => Some(result),
        _ = shutdown.cancelled() => None,
    };
    let result = match served {
        Some(result) => result.map_err(RouterError::from),
        None => {
            // Phase 2: no new calls; in-flight calls finish, up to the drain timeout.
            info!("router draining in-flight requests");
            match tokio::time::timeout(config.drain_timeout, &mut serve).await {
                Ok(result) => result.map_err(RouterError::from),
                Err(_) => {
                    // Phase 3: cut off what is left.
                    warn!(
                        "requests still in flight after {:?}; cutting them off",
                        config.drain_timeout
                    );
                    drain.cancel();
                    match tokio::time::timeout(CUT_OFF_GRACE, &mut serve).await {
                        Ok(result) => result.map_err(RouterError::from),
                        Err(_) => Ok(()),
                    }
                }
            }
        }
    };
    drain.cancel();
    relays.close();
    let _ = tokio::time::timeout(CUT_OFF_GRACE, relays.wait()).await;
    background_stop.cancel();
    health_stop.cancel();
    while let Some(joined) = background.join_next().await {
        if let Err(err) = joined {
            warn!("router task ended abnormally: {err}");
        }
    }
    info!("router stopped");
    result
}

/// Keeps `grpc.health.v1` in step with the pool: `SERVING` while at least one worker of the
/// active epoch is routable, `NOT_SERVING` otherwise and from shutdown on.
async fn report_health(reporter: HealthReporter, pool: Arc<Pool>, shutdown: CancellationToken) {
    let mut routable = pool.subscribe();
    let mut last = None;
    loop {
        let status = if routable.borrow_and_update().workers.is_empty() {
            ServingStatus::NotServing
        } else {
            ServingStatus::Serving
        };
        if last != Some(status) {
            set_health(&reporter, status).await;
            last = Some(status);
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            changed = routable.changed() => if changed.is_err() { break },
        }
    }
    set_health(&reporter, ServingStatus::NotServing).await;
}

async fn set_health(reporter: &HealthReporter, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    reporter.set_service_status(INFERENCE_SERVICE, status).await;
}
