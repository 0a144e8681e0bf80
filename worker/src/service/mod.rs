//! One rank as a networked worker: `moebius worker`.
//!
//! The rank's engine is an [`EngineHandle`](crate::engine::EngineHandle): the same lock-step
//! loop `moebius generate` runs, fed by commands.
//!
//! - [`grpc`]: the internal `moebius.v1.Worker` service (validation, admission, error codes);
//! - [`stream`]: one `Generate` response stream (detokenisation, stop strings, deadlines,
//!   cancellation when the client leaves, resumption of a resubmitted request);
//! - [`registration`]: the worker's key under a lease, kept alive and made anew when lost;
//! - [`stats`]: the expert load over a sliding window, sampled for `Status` and published
//!   under `stats/<id>` for the balancer;
//! - [`drain`]: an operator's drain order, which shuts the worker down as SIGTERM does;
//! - [`epochs`]: the placement watch and the epoch protocol (joining, pausing, leaving, reporting
//!   a failed group).
//!
//! [`start`] brings a worker up and returns a [`RunningWorker`]; [`run`] also waits for it.

pub mod drain;
pub mod epochs;
pub mod grpc;
pub mod registration;
pub mod stats;
pub mod stream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use moebius_coordinator::{Keys, TopologyStore, WorkerInfo};
use moebius_proto::v1::worker_server::WorkerServer;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::backend::{AnyBackend, Device};
use crate::comm::{ClusterSecret, DataListener, DataPlane};
use crate::engine::kv_budget::BLOCK_TOKENS;
use crate::engine::{
    EngineHandle, EngineOptions, EngineStatus, LoadedModel, OnGroupFailure, Phase,
};
use crate::error::{Error, Result};
use crate::metrics::WorkerMetrics;
use crate::model::{ExpertLoad, LoadWindow};
use crate::tokenizer::Tokenizer;
use epochs::EpochFollower;
use grpc::WorkerService;
use registration::{Registered, Registration};
use stats::StatsPublisher;

/// How a worker runs. Defaults are what `moebius worker` uses without flags.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Unique in the cluster; the key of its registration.
    pub id: String,
    /// The cluster's name: keys live under `/moebius/<cluster>/`.
    pub cluster: String,
    /// The Hugging Face checkpoint directory.
    pub model_dir: PathBuf,
    /// The gRPC listen address (port 0: any free port).
    pub listen: SocketAddr,
    /// The TCP data-plane listen address (port 0: any free port).
    pub data_listen: SocketAddr,
    /// The host others dial: the registered addresses are `<advertise_host>:<bound port>`.
    pub advertise_host: String,
    /// Most requests in flight (active and queued); more are refused with RESOURCE_EXHAUSTED.
    pub capacity: u32,
    /// Most prompt tokens prefilled per step.
    pub token_budget: usize,
    /// Most tokens of KV cache the worker's sequences hold together (rounded down to blocks of
    /// 16); `None`: what the device's memory allows. Prompts wait for room, and the newest
    /// sequences give theirs up to older ones (they prefill again later).
    pub kv_cache_tokens: Option<usize>,
    /// CPU threads for large products (0: all cores).
    pub threads: usize,
    /// Round activations to bf16 in prefill-sized products with bf16 weights (AVX512-BF16):
    /// faster prefill, less precise than the default f32 activations.
    pub bf16_activations: bool,
    /// Where the products run: the CPU, or a GPU (`cuda` feature).
    pub device: Device,
    /// The registration lease's TTL; keep-alives go out at a third of it.
    pub lease_ttl: Duration,
    /// Longest a collective waits for a peer before the group is declared failed (how fast a
    /// hung peer is noticed; a step of the slowest rank must fit in it).
    pub data_timeout: Duration,
    /// Longest the data-plane mesh of a new epoch may take to connect.
    pub connect_timeout: Duration,
    /// Longest shutdown waits for in-flight requests before failing them.
    pub drain_timeout: Duration,
    /// How often the expert load is sampled and published under `stats/<id>`.
    pub stats_interval: Duration,
    /// The span of the load window the statistics count over.
    pub stats_window: Duration,
    /// Where the worker counts what it does (registered by the caller, or unseen).
    pub metrics: WorkerMetrics,
    /// Mutual TLS on the gRPC service: only clients with a certificate from the cluster's CA
    /// (the router, the coordinator, operators' tools) are served. `None`: plaintext, open.
    pub tls: Option<moebius_coordinator::tls::Tls>,
    /// The secret every data-plane connection must prove; `None`: an open data plane.
    pub data_secret: Option<ClusterSecret>,
    /// What the ranks exchange tokens over: the `tcp` mesh, or NCCL between GPUs beside it.
    pub data_plane: DataPlane,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        let local = |port| SocketAddr::from(([127, 0, 0, 1], port));
        Self {
            id: "worker-0".into(),
            cluster: "default".into(),
            model_dir: PathBuf::from("model"),
            listen: local(0),
            data_listen: local(0),
            advertise_host: "127.0.0.1".into(),
            capacity: 64,
            token_budget: 512,
            kv_cache_tokens: None,
            threads: 0,
            bf16_activations: false,
            device: Device::Cpu,
            lease_ttl: Duration::from_secs(5),
            data_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(30),
            stats_interval: Duration::from_secs(5),
            stats_window: Duration::from_secs(60),
            metrics: WorkerMetrics::default(),
            tls: None,
            data_secret: None,
            data_plane: DataPlane::Tcp,
        }
    }
}

impl WorkerConfig {
    /// Checks the values, naming the one that is wrong.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(format!("worker: {m}")));
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        if !name_ok(&self.id) {
            return bad(format!(
                "id {:?} must be non-empty letters, digits, '-', '_' or '.'",
                self.id
            ));
        }
        if !name_ok(&self.cluster) {
            return bad(format!(
                "cluster {:?} must be non-empty letters, digits, '-', '_' or '.'",
                self.cluster
            ));
        }
        if self.advertise_host.is_empty() {
            return bad("advertise_host is empty".into());
        }
        if self.capacity == 0 {
            return bad("capacity must be at least 1".into());
        }
        if self.data_plane == DataPlane::Nccl && !matches!(self.device, Device::Cuda(_)) {
            return bad(format!(
                "the nccl data plane exchanges tokens between GPUs: give a GPU device \
                 (cuda:N), not {}",
                self.device
            ));
        }
        if self.token_budget == 0 {
            return bad("token_budget must be at least 1".into());
        }
        if let Some(tokens) = self.kv_cache_tokens {
            if tokens < BLOCK_TOKENS {
                return bad(format!(
                    "kv_cache_tokens {tokens} is under one block of {BLOCK_TOKENS} tokens"
                ));
            }
        }
        if self.lease_ttl < Duration::from_secs(1) {
            return bad(format!(
                "lease_ttl {:?} is under the 1 s minimum",
                self.lease_ttl
            ));
        }
        for (name, d) in [
            ("data_timeout", self.data_timeout),
            ("connect_timeout", self.connect_timeout),
            ("drain_timeout", self.drain_timeout),
            ("stats_interval", self.stats_interval),
            ("stats_window", self.stats_window),
        ] {
            if d.is_zero() {
                return bad(format!("{name} must be more than zero"));
            }
        }
        Ok(())
    }
}

/// A worker that is up: registered, serving gRPC, following the placement. Dropping it without
/// [`wait`](Self::wait) aborts its tasks and stops its engine like a crash would (the lease is
/// left to expire), which is what tests of a dying rank do.
pub struct RunningWorker {
    grpc_addr: SocketAddr,
    data_addr: SocketAddr,
    id: String,
    store: Arc<dyn TopologyStore>,
    registration: watch::Receiver<Option<Registered>>,
    service: WorkerService,
    engine: Arc<EngineHandle>,
    health: HealthReporter,
    shutdown: CancellationToken,
    drain_timeout: Duration,
    lease_ttl: Duration,
    /// Stops the registration task, so that a shutting-down worker does not register anew.
    registration_stop: CancellationToken,
    /// Stops the control tasks (placement watch, epochs).
    tasks_stop: CancellationToken,
    /// Stops the task that mirrors the engine's phase into the health service.
    health_stop: CancellationToken,
    /// Stops the gRPC server gracefully (no new connections, in-flight streams finish).
    server_stop: CancellationToken,
    server: AbortOnDropHandle<Result<()>>,
    registration_task: AbortOnDropHandle<()>,
    watch: AbortOnDropHandle<()>,
    epochs: AbortOnDropHandle<Result<()>>,
    health_sync: AbortOnDropHandle<()>,
    _stats: AbortOnDropHandle<()>,
    _drain: AbortOnDropHandle<()>,
    /// Stops the engine thread when the worker is dropped, even while gRPC connections still
    /// hold the service (and with it the engine handle).
    _engine_guard: EngineStopGuard,
}

struct EngineStopGuard(Arc<EngineHandle>);

impl Drop for EngineStopGuard {
    fn drop(&mut self) {
        self.0.request_stop();
    }
}

/// Starts a worker and runs it until `shutdown` is cancelled (or its gRPC server fails). A
/// lost lease or a failed EP group does not stop it: it rejoins.
pub async fn run(
    config: WorkerConfig,
    store: Arc<dyn TopologyStore>,
    shutdown: CancellationToken,
) -> Result<()> {
    start(config, store, shutdown).await?.wait().await
}

/// Loads the model, binds both listeners, registers under a lease and starts serving; the
/// worker joins an epoch when the placement lists it.
pub async fn start(
    config: WorkerConfig,
    store: Arc<dyn TopologyStore>,
    shutdown: CancellationToken,
) -> Result<RunningWorker> {
    config.validate()?;
    let model_dir = config.model_dir.clone();
    let backend = AnyBackend::open(config.device, config.threads, config.bf16_activations)?;
    let model = tokio::task::spawn_blocking(move || LoadedModel::open_with(&model_dir, backend))
        .await
        .map_err(|e| Error::Serve(format!("loading the model failed: {e}")))??;
    let model = Arc::new(model);
    let tokenizer =
        Tokenizer::from_dir(&config.model_dir, model.config.bos_token_id)?.map(Arc::new);

    let grpc_listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| Error::Serve(format!("cannot listen on {}: {e}", config.listen)))?;
    let grpc_addr = local_addr(grpc_listener.local_addr(), config.listen)?;
    let data = Arc::new(DataListener::bind_with(
        config.data_listen,
        config.data_secret.clone(),
    )?);
    let data_addr = data.local_addr();
    tracing::info!(id = %config.id, %grpc_addr, %data_addr, "worker listening");

    let engine = Arc::new(EngineHandle::spawn(EngineOptions {
        token_budget: config.token_budget,
        kv_cache_tokens: config.kv_cache_tokens,
        on_group_failure: OnGroupFailure::Keep,
        metrics: Some(config.metrics.clone()),
        threads: config.threads,
    })?);
    let load = Arc::new(ExpertLoad::new(
        model.config.moe_layer_count(),
        model.config.n_routed_experts,
    ));
    config.metrics.follow_expert_load(load.clone());
    let load_window = Arc::new(Mutex::new(LoadWindow::new(config.stats_window)));
    let service = WorkerService::new(
        config.id.clone(),
        model.config.clone(),
        tokenizer,
        engine.clone(),
        config.capacity,
        load_window.clone(),
    );
    let (health, health_service) = moebius_coordinator::health::health_service().await;
    set_health(&health, false).await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(moebius_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::Serve(format!("cannot build the reflection service: {e}")))?;

    let keys = Keys::new(&config.cluster);
    let registration = Registration {
        store: store.clone(),
        keys: keys.clone(),
        info: WorkerInfo {
            id: config.id.clone(),
            address: format!("{}:{}", config.advertise_host, grpc_addr.port()),
            data_address: format!("{}:{}", config.advertise_host, data_addr.port()),
            device: "cpu".into(),
            capacity: config.capacity,
            incarnation: 0,
        },
        ttl: config.lease_ttl,
    };
    let first = registration.register().await?;

    let tasks_stop = CancellationToken::new();
    let server_stop = CancellationToken::new();
    let server = {
        let stop = server_stop.clone();
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = &config.tls {
            builder = builder
                .tls_config(tls.grpc_server(moebius_coordinator::tls::Clients::Components))
                .map_err(|e| Error::Serve(format!("cannot use the TLS configuration: {e}")))?;
        }
        let router = builder
            .add_service(health_service)
            .add_service(reflection)
            .add_service(WorkerServer::new(service.clone()));
        // Without TCP_NODELAY, small responses wait for the peer's delayed ACK (~40 ms).
        let incoming =
            tonic::transport::server::TcpIncoming::from(grpc_listener).with_nodelay(Some(true));
        tokio::spawn(async move {
            router
                .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                .await
                .map_err(|e| Error::Serve(format!("the gRPC server failed: {e}")))
        })
    };
    let registration_stop = CancellationToken::new();
    let (registered_tx, registered) = watch::channel(Some(first.clone()));
    let (renew_tx, renew_rx) = mpsc::unbounded_channel();
    let registration_task =
        tokio::spawn(registration.hold(first, registered_tx, renew_rx, registration_stop.clone()));
    let (records_tx, records_rx) = watch::channel(None);
    let watch = tokio::spawn(epochs::watch_placement(
        store.clone(),
        keys.clone(),
        records_tx,
        tasks_stop.clone(),
    ));
    let stats = tokio::spawn(
        StatsPublisher {
            store: store.clone(),
            keys: keys.clone(),
            load: load.clone(),
            window: load_window,
            engine: engine.clone(),
            interval: config.stats_interval,
        }
        .run(registered.clone(), tasks_stop.clone()),
    );
    let drain = tokio::spawn(drain::follow_drain_order(
        store.clone(),
        keys.clone(),
        config.id.clone(),
        shutdown.clone(),
        tasks_stop.clone(),
    ));
    let follower = EpochFollower {
        keys,
        store: store.clone(),
        model,
        load,
        metrics: config.metrics.clone(),
        data,
        engine: engine.clone(),
        connect_timeout: config.connect_timeout,
        data_timeout: config.data_timeout,
        data_plane: config.data_plane,
        gpu: match config.device {
            Device::Cuda(n) => Some(n),
            Device::Cpu => None,
        },
        renew: renew_tx,
    };
    let epochs = tokio::spawn(follower.run(records_rx, registered.clone(), tasks_stop.clone()));
    let health_stop = CancellationToken::new();
    let health_sync = tokio::spawn(sync_health(
        engine.status(),
        health.clone(),
        health_stop.clone(),
    ));
    let engine_guard = engine.clone();
    Ok(RunningWorker {
        grpc_addr,
        data_addr,
        id: config.id,
        store,
        registration: registered,
        service,
        engine,
        health,
        shutdown,
        drain_timeout: config.drain_timeout,
        lease_ttl: config.lease_ttl,
        registration_stop,
        tasks_stop,
        health_stop,
        server_stop,
        server: AbortOnDropHandle::new(server),
        registration_task: AbortOnDropHandle::new(registration_task),
        watch: AbortOnDropHandle::new(watch),
        epochs: AbortOnDropHandle::new(epochs),
        health_sync: AbortOnDropHandle::new(health_sync),
        _stats: AbortOnDropHandle::new(stats),
        _drain: AbortOnDropHandle::new(drain),
        _engine_guard: EngineStopGuard(engine_guard),
    })
}

impl RunningWorker {
    /// The bound gRPC address.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The bound data-plane address.
    pub fn data_addr(&self) -> SocketAddr {
        self.data_addr
    }

    /// Serves until the shutdown token is cancelled (then shuts down in phases and returns
    /// `Ok`) or a critical task fails (the server dies: in-flight requests end with UNAVAILABLE
    /// and the error is returned).
    pub async fn wait(mut self) -> Result<()> {
        let failure = tokio::select! {
            () = self.shutdown.cancelled() => None,
            r = &mut self.server => Some(joined(r).err().unwrap_or_else(|| {
                Error::Serve("the gRPC server stopped".into())
            })),
            r = &mut self.registration_task => Some(match r {
                Ok(()) => Error::Serve("the registration task stopped".into()),
                Err(e) => Error::Serve(format!("the registration task panicked: {e}")),
            }),
            r = &mut self.watch => Some(match r {
                Ok(()) => Error::Serve("the placement watch stopped".into()),
                Err(e) => Error::Serve(format!("the placement watch panicked: {e}")),
            }),
            r = &mut self.epochs => Some(joined(r).err().unwrap_or_else(|| {
                Error::Serve("the epoch follower stopped".into())
            })),
        };
        match failure {
            None => {
                self.shut_down().await;
                Ok(())
            }
            Some(error) => {
                tracing::error!(id = %self.id, %error, "worker stops serving");
                self.fail(&error).await;
                Err(error)
            }
        }
    }

    /// Phased shutdown: stop accepting, drain (bounded), revoke the lease, let the group form
    /// an epoch without this rank (bounded), stop the engine.
    async fn shut_down(mut self) {
        tracing::info!(id = %self.id, in_flight = self.service.in_flight(), "shutting down");
        self.service.stop_accepting();
        self.health_stop.cancel();
        set_health(&self.health, false).await;
        self.server_stop.cancel();
        if tokio::time::timeout(self.drain_timeout, &mut self.server)
            .await
            .is_err()
        {
            tracing::warn!(
                in_flight = self.service.in_flight(),
                "drain timed out; failing the remaining requests"
            );
            // Ending the sequences ends their streams, and with them the server.
            let _ = self
                .engine
                .detach("the worker is shutting down".into())
                .wait()
                .await;
            if tokio::time::timeout(Duration::from_secs(2), &mut self.server)
                .await
                .is_err()
            {
                self.server.abort();
            }
        }
        self.revoke().await;
        // Give the coordinator one TTL to form an epoch without this worker, so that the rest
        // of the group moves on cleanly instead of failing on a vanished peer.
        let mut status = self.engine.status();
        let _ = tokio::time::timeout(
            self.lease_ttl,
            status.wait_for(|s| s.phase != Phase::Running),
        )
        .await;
        self.finish().await;
    }

    /// Stops registering and gives the lease up (its keys go with it).
    async fn revoke(&self) {
        self.registration_stop.cancel();
        let lease = self.registration.borrow().as_ref().map(|r| r.lease);
        if let Some(lease) = lease {
            if let Err(e) = self.store.revoke_lease(lease).await {
                tracing::warn!(error = %e, "cannot revoke the lease; it expires on its own");
            }
        }
    }

    /// Stops serving after a critical failure.
    async fn fail(mut self, error: &Error) {
        self.service.stop_accepting();
        self.health_stop.cancel();
        set_health(&self.health, false).await;
        let reason = format!("worker stopped serving: {error}");
        let _ = tokio::time::timeout(self.drain_timeout, self.engine.detach(reason).wait()).await;
        self.server_stop.cancel();
        if tokio::time::timeout(Duration::from_secs(2), &mut self.server)
            .await
            .is_err()
        {
            self.server.abort();
        }
        self.revoke().await;
        self.finish().await;
    }

    async fn finish(self) {
        self.registration_stop.cancel();
        self.tasks_stop.cancel();
        // A task that ended already was awaited by `wait`; awaiting it again would panic.
        if !self.registration_task.is_finished() {
            let _ = self.registration_task.await;
        }
        if !self.watch.is_finished() {
            let _ = self.watch.await;
        }
        if !self.epochs.is_finished() {
            if let Err(e) = joined(self.epochs.await) {
                tracing::warn!(error = %e, "the epoch follower ended with an error");
            }
        }
        let _ = self.health_sync.await;
        if !self.server.is_finished() {
            self.server.abort();
        }
        let engine = self.engine;
        let _ = tokio::task::spawn_blocking(move || engine.stop()).await;
        tracing::info!(id = %self.id, "worker stopped");
    }
}

fn joined<T>(r: std::result::Result<Result<T>, tokio::task::JoinError>) -> Result<T> {
    r.map_err(|e| Error::Serve(format!("a worker task panicked: {e}")))?
}

fn local_addr(addr: std::io::Result<SocketAddr>, asked: SocketAddr) -> Result<SocketAddr> {
    addr.map_err(|e| Error::Serve(format!("cannot read the address bound for {asked}: {e}")))
}

/// SERVING while the engine steps in an active epoch, NOT_SERVING otherwise.
async fn sync_health(
    mut status: watch::Receiver<EngineStatus>,
    health: HealthReporter,
    stop: CancellationToken,
) {
    let mut serving = None;
    loop {
        let now = status.borrow_and_update().phase == Phase::Running;
        if serving != Some(now) {
            set_health(&health, now).await;
            serving = Some(now);
        }
        tokio::select! {
            () = stop.cancelled() => return,
            changed = status.changed() => if changed.is_err() { return },
        }
    }
}

async fn set_health(health: &HealthReporter, serving: bool) {
    let status = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    health.set_service_status("moebius.v1.Worker", status).await;
    health.set_service_status("", status).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        WorkerConfig::default()
            .validate()
            .expect("defaults are valid");
    }

    #[test]
    fn bad_values_are_named() {
        let check = |config: WorkerConfig, field: &str| {
            let err = config.validate().expect_err(field).to_string();
            assert!(err.contains(field), "{field}: {err}");
        };
        check(
            WorkerConfig {
                id: "a/b".into(),
                ..Default::default()
            },
            "id",
        );
        check(
            WorkerConfig {
                capacity: 0,
                ..Default::default()
            },
            "capacity",
        );
        check(
            WorkerConfig {
                lease_ttl: Duration::from_millis(10),
                ..Default::default()
            },
            "lease_ttl",
        );
        check(
            WorkerConfig {
                data_timeout: Duration::ZERO,
                ..Default::default()
            },
            "data_timeout",
        );
    }
}
