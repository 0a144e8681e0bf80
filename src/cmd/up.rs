//! `moebius up`: a whole cluster on this machine. Without `--etcd` everything runs in this
//! process on the in-memory store; with `--etcd URL` the coordinator, the workers and the
//! router are separate `moebius` processes registered in that etcd.
//!
//! Once the cluster is up, `up` supervises it: a part that stops (a worker killed with
//! `kill -9`, a task that failed) is started again after a growing pause ([`Backoff`]) while
//! the rest of the cluster serves, and the restarted worker rejoins in a new epoch. Only
//! Ctrl-C (or SIGTERM) stops `up`. A part that stops while the cluster is starting stops `up`
//! with its error, so that a broken model or a taken port is reported at once.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use futures::future::BoxFuture;
use moebius_coordinator::{EpochRecord, EpochState, EtcdStore, Keys, MemoryStore, TopologyStore};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use moebius_worker::backend::Device;
use moebius_worker::comm::DataPlane;
use moebius_worker::config::ModelConfig;

use super::coordinator::BalanceArgs;
use super::supervise::Backoff;
use super::tls::{Security, TlsArgs, UpSecurityArgs};

/// The checkpoint `up` serves when no `--model` is given (relative to the repository root).
const BUNDLED_MODEL: &str = "fixtures/demo";

/// How long the cluster may take to form its first epoch.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// Flags of `moebius up`.
#[derive(Args, Debug)]
pub struct UpArgs {
    /// Checkpoint directory to serve (default: the bundled demo model, fixtures/demo).
    #[arg(long, env = "MOEBIUS_MODEL")]
    pub model: Option<PathBuf>,
    /// Number of workers (EP ranks).
    #[arg(long, env = "MOEBIUS_WORKERS", default_value_t = 2)]
    pub workers: usize,
    /// Address of the router's public gRPC API.
    #[arg(long, env = "MOEBIUS_ROUTER_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// etcd endpoint: run each part as its own process registered there. Without it, one
    /// process with the in-memory store.
    #[arg(long, env = "MOEBIUS_ETCD")]
    pub etcd: Option<String>,
    /// Cluster name: keys live under /moebius/<cluster>/.
    #[arg(long, env = "MOEBIUS_CLUSTER", default_value = "default")]
    pub cluster: String,
    /// Most requests in flight on one worker (active and queued).
    #[arg(long, default_value_t = 64)]
    pub capacity: u32,
    /// CPU threads per worker for matrix products (0: all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Most tokens of KV cache each worker's sequences hold together, in blocks of 16
    /// (default: 4 GiB of cache on a CPU; on a GPU, 80% of the memory free once the weights
    /// are loaded).
    #[arg(long)]
    pub kv_cache_tokens: Option<usize>,
    /// Round activations to bf16 in prefill-sized products with bf16 weights (AVX512-BF16):
    /// faster prefill, less precise than the default f32 activations.
    #[arg(long)]
    pub bf16_activations: bool,
    /// Where the workers compute: cpu, or cuda / cuda:N, which puts worker i on GPU N + i
    /// (a moebius built with `--features cuda`); or one device per worker, comma-separated
    /// (`cuda:0,cpu`: a GPU rank and a CPU rank, one machine's GPU tested against the CPU).
    #[arg(long, default_value = "cpu")]
    pub device: WorkerDevices,
    /// What the workers exchange tokens over in every MoE layer: tcp (any devices, any
    /// machines), or nccl between GPUs, with tcp beside it for control (every worker on a GPU;
    /// a moebius built with `--features cuda`).
    #[arg(long, default_value = "tcp")]
    pub data_plane: DataPlane,
    /// Lease TTL of workers and coordinator, in seconds (how fast a dead worker is noticed).
    #[arg(long, default_value_t = 5)]
    pub lease_ttl_secs: u64,
    /// Address of the coordinator's admin service (`moebius admin`); port 0 picks a free one.
    #[arg(long, env = "MOEBIUS_ADMIN_LISTEN", default_value = "127.0.0.1:50052")]
    pub admin_listen: SocketAddr,
    /// Seconds between the workers' samples of their expert load (published for the
    /// balancer).
    #[arg(long, default_value_t = 5.0)]
    pub stats_interval_s: f64,
    /// Address of the router's HTTP port: the live dashboard (`/dashboard`) and the
    /// Prometheus metrics (`/metrics`; of every part, in one process); port 0 picks a free one.
    #[arg(
        long,
        env = "MOEBIUS_ROUTER_HTTP_LISTEN",
        alias = "metrics-listen",
        default_value = "127.0.0.1:8000"
    )]
    pub http_listen: SocketAddr,
    /// Also export the routed tokens per (MoE layer, expert), not only per expert.
    #[arg(long)]
    pub metrics_expert_layers: bool,
    /// The model's name in the OpenAI-compatible API (default: the checkpoint directory's
    /// name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    #[command(flatten)]
    pub balance: BalanceArgs,
    #[command(flatten)]
    pub security: UpSecurityArgs,
}

/// The name the OpenAI-compatible API serves `model` under: the flag, or the checkpoint
/// directory's name.
pub fn served_model_name(flag: Option<&str>, model: &Path) -> String {
    flag.map(str::to_owned)
        .or_else(|| {
            std::fs::canonicalize(model)
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        })
        .unwrap_or_else(|| "moebius".to_owned())
}

pub fn run(args: UpArgs) -> Result<()> {
    if args.workers == 0 {
        return Err(
            moebius_worker::Error::InvalidRequest("--workers must be at least 1".into()).into(),
        );
    }
    let model = resolve_model(args.model.as_deref())?;
    let config = ModelConfig::from_dir(&model)
        .with_context(|| format!("cannot read the model at {}", model.display()))?;
    let experts = config.n_routed_experts;
    if args.workers > experts {
        return Err(moebius_worker::Error::InvalidRequest(format!(
            "--workers {} is more than the model's {experts} routed experts",
            args.workers
        ))
        .into());
    }
    args.balance.interval()?;
    stats_interval(args.stats_interval_s)?;
    args.device.check(args.workers)?;
    args.device.check_plane(args.data_plane, args.workers)?;
    super::worker::check_kv_cache_tokens(args.kv_cache_tokens)?;
    let security = args.security.resolve()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        let signals = tokio::spawn(super::cancel_on_signal(shutdown.clone()));
        let result = match &args.etcd {
            None => in_process(&args, &model, &config, security, shutdown.clone()).await,
            Some(etcd) => with_processes(&args, &model, etcd, &security, shutdown.clone()).await,
        };
        shutdown.cancel();
        signals.abort();
        result
    })
}

/// `--device` of `up`: one device for every worker, or one per worker.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerDevices(Vec<Device>);

impl WorkerDevices {
    /// The same device for every worker: `cuda:N` puts worker i on GPU N + i.
    pub fn all(device: Device) -> Self {
        Self(vec![device])
    }

    /// The device of worker `i`: GPU N + i for one `cuda:N`, so that each worker has a GPU of
    /// its own; entry `i` of a list.
    pub fn of(&self, i: usize) -> Device {
        match self.0.as_slice() {
            [Device::Cuda(n)] => Device::Cuda(n + i),
            list => list[i.min(list.len() - 1)],
        }
    }

    /// Checks that a list names one device per worker, then opens, and lets go of, the device
    /// of every worker before anything starts: a GPU that is missing (or a build without the
    /// `cuda` feature) is one line and exit code 2, not workers that fail and are restarted.
    fn check(&self, workers: usize) -> Result<()> {
        if self.0.len() > 1 && self.0.len() != workers {
            return Err(moebius_worker::Error::InvalidRequest(format!(
                "--device lists {} devices for {workers} workers: give one device, or one per worker",
                self.0.len()
            ))
            .into());
        }
        for i in 0..workers {
            if self.of(i) != Device::Cpu {
                moebius_worker::backend::AnyBackend::open(self.of(i), 1, false)?;
            }
        }
        Ok(())
    }

    /// Checks that the data plane suits the devices: nccl joins GPUs only.
    fn check_plane(&self, plane: DataPlane, workers: usize) -> Result<()> {
        if let Some(i) =
            (0..workers).find(|&i| plane == DataPlane::Nccl && self.of(i) == Device::Cpu)
        {
            return Err(moebius_worker::Error::InvalidRequest(format!(
                "--data-plane nccl exchanges tokens between GPUs, but worker {i} is on the cpu: \
                 give every worker a GPU (--device cuda:N), or use --data-plane tcp"
            ))
            .into());
        }
        Ok(())
    }
}

impl std::str::FromStr for WorkerDevices {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        s.split(',')
            .map(str::parse)
            .collect::<std::result::Result<_, _>>()
            .map(Self)
    }
}

/// `--stats-interval-s` as a duration, or a one-line error naming the flag.
pub fn stats_interval(seconds: f64) -> Result<Duration> {
    Duration::try_from_secs_f64(seconds)
        .ok()
        .filter(|d| !d.is_zero())
        .with_context(|| format!("--stats-interval-s {seconds}: give a number of seconds above 0"))
}

/// The bundled checkpoint is found from the working directory (a clone's root) or, for a
/// binary run from elsewhere, from the source tree it was built in.
pub fn resolve_model(model: Option<&Path>) -> Result<PathBuf> {
    if let Some(m) = model {
        return Ok(m.to_path_buf());
    }
    let candidates = [
        PathBuf::from(BUNDLED_MODEL),
        Path::new(env!("CARGO_MANIFEST_DIR")).join(BUNDLED_MODEL),
    ];
    candidates
        .into_iter()
        .find(|p| p.join("config.json").is_file())
        .ok_or_else(|| anyhow!("the bundled checkpoint {BUNDLED_MODEL} is not here: run from the repository root or pass --model DIR"))
}

/// A cluster running inside this process on the in-memory store.
pub struct LocalCluster {
    pub router_addr: SocketAddr,
    /// The router's HTTP port: `/dashboard`, and `/metrics` of every part.
    pub http_addr: Option<SocketAddr>,
    /// The coordinator's admin service.
    pub admin_addr: SocketAddr,
    pub epoch: EpochRecord,
    parts: Vec<LocalPart>,
    /// Each part's run, by its index in `parts`.
    tasks: JoinSet<(usize, Result<()>)>,
}

/// One part of the in-process cluster, and how to start it (again).
struct LocalPart {
    name: String,
    start: Arc<dyn Fn(CancellationToken) -> BoxFuture<'static, Result<()>> + Send + Sync>,
    backoff: Backoff,
    started: Instant,
    /// A worker that stops without an error was drained: it is not started again.
    worker: bool,
}

/// What an in-process cluster is made of.
pub struct LocalOptions<'a> {
    pub model: &'a Path,
    pub experts: usize,
    pub expert_groups: usize,
    pub workers: usize,
    pub listen: SocketAddr,
    pub cluster: &'a str,
    pub capacity: u32,
    pub threads: usize,
    pub kv_cache_tokens: Option<usize>,
    pub bf16_activations: bool,
    pub device: WorkerDevices,
    pub data_plane: DataPlane,
    pub lease_ttl: Duration,
    pub admin_listen: SocketAddr,
    pub stats_interval: Duration,
    pub redundant_experts: usize,
    pub rebalance_threshold: f64,
    pub rebalance_interval: Duration,
    /// The router's HTTP port (OpenAI-compatible API, dashboard and metrics); `None`: none.
    pub http_listen: Option<SocketAddr>,
    pub metrics_expert_layers: bool,
    /// The model's name in the OpenAI-compatible API.
    pub model_name: String,
    /// TLS, the data-plane secret and the API keys of every part.
    pub security: Security,
}

impl<'a> LocalOptions<'a> {
    /// Two workers of `model` on free ports, the flags' defaults otherwise.
    pub fn new(model: &'a Path, config: &ModelConfig) -> Self {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        let coordinator = moebius_coordinator::CoordinatorConfig::default();
        Self {
            model,
            experts: config.n_routed_experts,
            expert_groups: config.n_group.max(1),
            workers: 2,
            listen: any,
            cluster: "default",
            capacity: 64,
            threads: 0,
            kv_cache_tokens: None,
            bf16_activations: false,
            device: WorkerDevices::all(Device::Cpu),
            data_plane: DataPlane::Tcp,
            lease_ttl: Duration::from_secs(5),
            admin_listen: any,
            stats_interval: moebius_worker::service::WorkerConfig::default().stats_interval,
            redundant_experts: 0,
            rebalance_threshold: coordinator.rebalance_threshold,
            rebalance_interval: coordinator.rebalance_interval,
            http_listen: None,
            metrics_expert_layers: false,
            model_name: served_model_name(None, model),
            security: Security::default(),
        }
    }
}

impl LocalCluster {
    fn spawn(&mut self, index: usize, after: Duration, shutdown: &CancellationToken) {
        self.parts[index].started = Instant::now() + after;
        let start = Arc::clone(&self.parts[index].start);
        let stop = shutdown.child_token();
        self.tasks.spawn(async move {
            tokio::select! {
                () = stop.cancelled() => return (index, Ok(())),
                () = tokio::time::sleep(after) => {}
            }
            (index, start(stop).await)
        });
    }

    /// Serves until `shutdown`, starting again every part that stops.
    pub async fn supervise(&mut self, shutdown: &CancellationToken) {
        loop {
            let ended = tokio::select! {
                () = shutdown.cancelled() => return,
                ended = self.tasks.join_next() => ended,
            };
            let Some(ended) = ended else { return };
            let (index, why) = match ended {
                Ok((index, Ok(()))) => (index, "stopped".to_string()),
                Ok((index, Err(e))) => (index, format!("failed: {e:#}")),
                Err(e) => {
                    // A panicked part cannot be told apart here; stop rather than guess.
                    eprintln!("[up] a part of the cluster panicked: {e}; stopping");
                    shutdown.cancel();
                    return;
                }
            };
            if shutdown.is_cancelled() {
                return;
            }
            let part = &mut self.parts[index];
            if part.worker && why == "stopped" {
                println!("[up] {} drained and stopped; not started again", part.name);
                continue;
            }
            part.backoff.ran_for(part.started.elapsed());
            let after = part.backoff.next();
            println!("[up] {} {why}; starting it again in {after:?}", part.name);
            self.spawn(index, after, shutdown);
        }
    }

    /// Waits for every part to stop (after `shutdown` was cancelled).
    pub async fn join(mut self) {
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Starts coordinator, workers and router as tasks of this process and waits until the
/// router serves and the first epoch is active. Every part stops when `shutdown` is cancelled.
pub async fn start_local(
    options: &LocalOptions<'_>,
    shutdown: &CancellationToken,
) -> Result<LocalCluster> {
    let store: Arc<dyn TopologyStore> = Arc::new(MemoryStore::new());
    // One registry for every part: the router's HTTP port serves it, each worker's series
    // labelled with its id.
    let mut registry = moebius_coordinator::telemetry::registry();
    let mut parts = Vec::new();
    let admin_listener = tokio::net::TcpListener::bind(options.admin_listen)
        .await
        .with_context(|| format!("cannot listen on --admin-listen {}", options.admin_listen))?;
    let admin_addr = admin_listener.local_addr()?;
    let (admin, link) = moebius_coordinator::admin::channel();
    let tls = options.security.tls.clone();
    tokio::spawn(moebius_coordinator::admin::service::serve(
        admin_listener,
        admin,
        shutdown.clone(),
        tls.clone(),
    ));
    let coordinator = moebius_coordinator::CoordinatorConfig {
        id: "coordinator".into(),
        cluster: options.cluster.to_string(),
        expected_workers: options.workers,
        num_experts: options.experts,
        expert_groups: options.expert_groups,
        lease_ttl: options.lease_ttl,
        redundant_experts: options.redundant_experts,
        rebalance_threshold: options.rebalance_threshold,
        rebalance_interval: options.rebalance_interval,
        admin_address: Some(admin_addr.to_string()),
        metrics: moebius_coordinator::CoordinatorMetrics::register(&mut registry, "coordinator"),
        tls: tls.clone(),
        ..Default::default()
    };
    let store_c = store.clone();
    parts.push(LocalPart {
        name: "coordinator".into(),
        start: Arc::new(move |stop| {
            let (config, store, link) = (coordinator.clone(), store_c.clone(), link.clone());
            Box::pin(async move {
                moebius_coordinator::run_with_admin(config, store, stop, Some(link))
                    .await
                    .context("coordinator")
            })
        }),
        backoff: Backoff::default(),
        started: Instant::now(),
        worker: false,
    });
    for i in 0..options.workers {
        let config = moebius_worker::service::WorkerConfig {
            id: format!("worker-{i}"),
            cluster: options.cluster.to_string(),
            model_dir: options.model.to_path_buf(),
            capacity: options.capacity,
            threads: options.threads,
            kv_cache_tokens: options.kv_cache_tokens,
            bf16_activations: options.bf16_activations,
            device: options.device.of(i),
            data_plane: options.data_plane,
            lease_ttl: options.lease_ttl,
            stats_interval: options.stats_interval,
            metrics: moebius_worker::metrics::WorkerMetrics::register(
                &mut registry,
                &format!("worker-{i}"),
                options.metrics_expert_layers,
            ),
            tls: tls.clone(),
            data_secret: options.security.secret.clone(),
            ..Default::default()
        };
        let store_w = store.clone();
        parts.push(LocalPart {
            name: format!("worker-{i}"),
            start: Arc::new(move |stop| {
                let (config, store) = (config.clone(), store_w.clone());
                Box::pin(async move {
                    moebius_worker::service::run(config, store, stop)
                        .await
                        .with_context(|| format!("worker-{i}"))
                })
            }),
            backoff: Backoff::default(),
            started: Instant::now(),
            worker: true,
        });
    }
    let metrics = Arc::new(moebius_router::RouterMetrics::register(&mut registry));
    let router = moebius_router::RouterConfig {
        cluster: options.cluster.to_string(),
        listen: options.listen,
        http_listen: options.http_listen,
        model_name: options.model_name.clone(),
        registry: Arc::new(registry),
        metrics,
        tls,
        api_keys: options.security.api_keys.clone(),
        ..Default::default()
    };
    // The first start reports the router's addresses; a restart binds the same ones.
    let (ready_tx, ready_rx) = oneshot::channel();
    let ready_tx = Arc::new(std::sync::Mutex::new(Some(ready_tx)));
    let listen = Arc::new(std::sync::Mutex::new(moebius_router::Bound {
        grpc: options.listen,
        http: options.http_listen,
    }));
    let store_r = store.clone();
    parts.push(LocalPart {
        name: "router".into(),
        start: Arc::new(move |stop| {
            let (store, ready_tx, listen) = (store_r.clone(), ready_tx.clone(), listen.clone());
            let bound = *listen.lock().unwrap_or_else(PoisonError::into_inner);
            let config = moebius_router::RouterConfig {
                listen: bound.grpc,
                http_listen: bound.http,
                ..router.clone()
            };
            Box::pin(async move {
                let (addr_tx, addr_rx) = oneshot::channel();
                let serve = moebius_router::run(config, store, stop, Some(addr_tx));
                tokio::pin!(serve);
                tokio::select! {
                    result = &mut serve => return result.context("router"),
                    addr = addr_rx => if let Ok(addr) = addr {
                        *listen.lock().unwrap_or_else(PoisonError::into_inner) = addr;
                        let ready = ready_tx.lock().unwrap_or_else(PoisonError::into_inner).take();
                        if let Some(ready) = ready {
                            let _ = ready.send(addr);
                        }
                    },
                }
                serve.await.context("router")
            })
        }),
        backoff: Backoff::default(),
        started: Instant::now(),
        worker: false,
    });
    let mut cluster = LocalCluster {
        router_addr: options.listen,
        http_addr: options.http_listen,
        admin_addr,
        epoch: EpochRecord {
            epoch: 0,
            state: EpochState::Pending,
            workers: Vec::new(),
            placement: moebius_coordinator::Placement::uniform(options.experts, Vec::new()),
        },
        parts,
        tasks: JoinSet::new(),
    };
    for i in 0..cluster.parts.len() {
        cluster.spawn(i, Duration::ZERO, shutdown);
    }

    let started = async {
        let addr = ready_rx
            .await
            .context("the router stopped before it was ready")?;
        let epoch = wait_active(&*store, options.cluster).await?;
        Ok::<_, anyhow::Error>((addr, epoch))
    };
    tokio::select! {
        started = started => {
            let (bound, epoch) = started?;
            cluster.router_addr = bound.grpc;
            cluster.http_addr = bound.http;
            cluster.epoch = epoch;
            Ok(cluster)
        }
        Some(done) = cluster.tasks.join_next() => {
            shutdown.cancel();
            Err(failed(done.map(|(_, r)| r)))
        }
        _ = shutdown.cancelled() => Err(StoppedWhileStarting.into()),
    }
}

async fn in_process(
    args: &UpArgs,
    model: &Path,
    config: &ModelConfig,
    security: Security,
    shutdown: CancellationToken,
) -> Result<()> {
    let options = LocalOptions {
        workers: args.workers,
        listen: args.listen,
        cluster: &args.cluster,
        capacity: args.capacity,
        threads: args.threads,
        kv_cache_tokens: args.kv_cache_tokens,
        bf16_activations: args.bf16_activations,
        device: args.device.clone(),
        data_plane: args.data_plane,
        lease_ttl: Duration::from_secs(args.lease_ttl_secs),
        admin_listen: args.admin_listen,
        stats_interval: stats_interval(args.stats_interval_s)?,
        redundant_experts: args.balance.redundant_experts,
        rebalance_threshold: args.balance.rebalance_threshold,
        rebalance_interval: args.balance.interval()?,
        http_listen: Some(args.http_listen),
        metrics_expert_layers: args.metrics_expert_layers,
        model_name: served_model_name(args.served_model_name.as_deref(), model),
        security,
        ..LocalOptions::new(model, config)
    };
    let mut cluster = match start_local(&options, &shutdown).await {
        Ok(cluster) => cluster,
        // Ctrl-C while starting is a clean stop; a part that failed cancels too, and its error
        // is the answer.
        Err(e) if e.is::<StoppedWhileStarting>() => return Ok(()),
        Err(e) => return Err(e),
    };
    let admin = cluster.admin_addr.to_string();
    let watch = cluster.http_addr.map(|http| (http, Vec::new()));
    banner(
        cluster.router_addr,
        Some(&admin),
        model,
        &options.model_name,
        &cluster.epoch,
        watch,
        &options.security,
    );
    // Serve until Ctrl-C, starting again whatever stops; then stop every part.
    cluster.supervise(&shutdown).await;
    shutdown.cancel();
    cluster.join().await;
    println!("moebius stopped");
    Ok(())
}

/// `start_local` was stopped (Ctrl-C) before the cluster was up.
#[derive(Debug, thiserror::Error)]
#[error("stopped while starting")]
pub struct StoppedWhileStarting;

/// Why a part of the in-process cluster ended before it was asked to.
fn failed(done: Result<Result<()>, tokio::task::JoinError>) -> anyhow::Error {
    match done {
        Ok(Ok(())) => anyhow!("a part of the cluster stopped unexpectedly"),
        Ok(Err(e)) => e,
        Err(e) => anyhow!("a part of the cluster panicked: {e}"),
    }
}

/// Waits until the cluster's placement is active and returns it.
async fn wait_active(store: &dyn TopologyStore, cluster: &str) -> Result<EpochRecord> {
    let key = Keys::new(cluster).placement();
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    loop {
        if let Some(kv) = store.get(&key).await? {
            let record: EpochRecord =
                serde_json::from_slice(&kv.value).context("placement is not an epoch record")?;
            if record.state == EpochState::Active {
                return Ok(record);
            }
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the cluster formed no active epoch within {START_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The admin address the leading coordinator announced, if any.
async fn announced_admin(store: &dyn TopologyStore, cluster: &str) -> Option<String> {
    let keys = Keys::new(cluster);
    let leader = store.get(&keys.leader()).await.ok()??;
    let id: String = serde_json::from_slice(&leader.value).ok()?;
    let admin = store.get(&keys.admin(&id)).await.ok()??;
    String::from_utf8(admin.value).ok()
}

/// The router's HTTP port, and the metrics port of each other part (`(name, address)`; none
/// when the router's port serves every part).
type Watch = (SocketAddr, Vec<(String, String)>);

fn banner(
    addr: SocketAddr,
    admin: Option<&str>,
    model: &Path,
    model_name: &str,
    epoch: &EpochRecord,
    watch: Option<Watch>,
    security: &Security,
) {
    let ranks: Vec<String> = epoch
        .workers
        .iter()
        .enumerate()
        .map(|(r, w)| format!("{} ({} experts)", w.id, epoch.placement.slots(0, r).len()))
        .collect();
    println!("moebius is up: router on {addr}, model {}", model.display());
    println!(
        "epoch {} active with {} workers: {}",
        epoch.epoch,
        epoch.workers.len(),
        ranks.join(", ")
    );
    let ca = security
        .tls
        .as_ref()
        .map(|t| t.files().ca.display().to_string());
    let key_header = if security.api_keys.is_some() {
        " -H 'authorization: Bearer <a key of the --api-key-file>'"
    } else {
        ""
    };
    let (grpc_trust, scheme, curl_trust) = match &ca {
        Some(ca) => (format!("-cacert {ca}"), "https", format!(" --cacert {ca}")),
        None => ("-plaintext".to_string(), "http", String::new()),
    };
    println!("try it (grpcurl reads the API from server reflection):");
    println!(
        "  grpcurl {grpc_trust}{key_header} -d '{{\"text\": \"The river\", \"max_new_tokens\": 16, \"ignore_eos\": true}}' {addr} moebius.v1.Inference/Generate"
    );
    if let Some(admin) = admin {
        let tls_flags = security
            .tls
            .as_ref()
            .map(|t| format!(" {}", TlsArgs::forward(t).join(" ")))
            .unwrap_or_default();
        println!("operate it: moebius admin topology{tls_flags} --coordinator {admin}");
    }
    if let Some((http, _)) = &watch {
        println!("call it over HTTP (the OpenAI API at {scheme}://{http}/v1, model {model_name}):");
        println!(
            "  curl{curl_trust} {scheme}://{http}/v1/completions{key_header} -H 'Content-Type: application/json' -d '{{\"model\": \"{model_name}\", \"prompt\": \"The river\", \"max_tokens\": 16}}'"
        );
    }
    if let Some((http, others)) = watch {
        println!(
            "watch it: dashboard {scheme}://{http}/dashboard, metrics {scheme}://{http}/metrics"
        );
        for (name, addr) in others {
            println!("  metrics of {name}: {addr}");
        }
    }
    println!("Ctrl-C stops the cluster.");
}

/// A `moebius` child process: how to start it, and the running child.
struct Part {
    name: String,
    args: Vec<String>,
    child: Option<Child>,
    started: Instant,
    backoff: Backoff,
    /// When a stopped part is started again.
    restart_at: Option<Instant>,
    /// A worker that exits 0 was drained: it is not started again.
    worker: bool,
}

impl Part {
    /// Starts the child and relays its stdout (with the part's name) on `relays`; lines go to
    /// `lines` too, with the given name, for whoever waits for the addresses.
    fn start(
        &mut self,
        exe: &Path,
        relays: &mut JoinSet<()>,
        lines: Option<(String, mpsc::UnboundedSender<(String, String)>)>,
    ) -> Result<()> {
        let mut command = Command::new(exe);
        command
            .args(&self.args)
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        #[cfg(target_os = "linux")]
        // SAFETY: the closure runs in the forked child before exec and only calls prctl, which
        // is async-signal-safe.
        unsafe {
            // A part outlives no `up` that is killed outright (SIGKILL runs no destructors):
            // the kernel sends it SIGTERM when `up` dies, and it shuts down as after Ctrl-C.
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {}", self.name))?;
        println!(
            "[up] started {} (pid {})",
            self.name,
            child.id().map_or_else(|| "?".into(), |p| p.to_string())
        );
        if let Some(out) = child.stdout.take() {
            let name = self.name.clone();
            relays.spawn(async move {
                let mut reader = BufReader::new(out).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    if let Some((name, lines)) = &lines {
                        let _ = lines.send((name.clone(), line.clone()));
                    }
                    println!("[{name}] {line}");
                }
            });
        }
        self.child = Some(child);
        self.started = Instant::now();
        self.restart_at = None;
        Ok(())
    }
}

async fn with_processes(
    args: &UpArgs,
    model: &Path,
    etcd: &str,
    security: &Security,
    shutdown: CancellationToken,
) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find the moebius binary")?;
    let model = model
        .to_str()
        .ok_or_else(|| anyhow!("the model path is not UTF-8"))?
        .to_string();
    let ttl = args.lease_ttl_secs.to_string();
    let part = |name: String, sub: &str, extra: Vec<String>| -> Part {
        let mut all = vec![
            sub.to_string(),
            "--etcd".to_string(),
            etcd.to_string(),
            "--cluster".into(),
            args.cluster.clone(),
        ];
        all.extend(extra);
        Part {
            name,
            args: all,
            child: None,
            started: Instant::now(),
            backoff: Backoff::default(),
            restart_at: None,
            worker: sub == "worker",
        }
    };
    let mut parts = vec![part(
        "coordinator".into(),
        "coordinator",
        vec![
            "--model".into(),
            model.clone(),
            "--workers".into(),
            args.workers.to_string(),
            "--lease-ttl-secs".into(),
            ttl.clone(),
            "--admin-listen".into(),
            args.admin_listen.to_string(),
            "--redundant-experts".into(),
            args.balance.redundant_experts.to_string(),
            "--rebalance-threshold".into(),
            args.balance.rebalance_threshold.to_string(),
            "--rebalance-interval-s".into(),
            args.balance.rebalance_interval_s.to_string(),
            "--metrics-listen".into(),
            "127.0.0.1:0".into(),
        ]
        .into_iter()
        .chain(security.part_args())
        .collect(),
    )];
    for i in 0..args.workers {
        let mut extra = vec![
            "--model".into(),
            model.clone(),
            "--id".into(),
            format!("worker-{i}"),
            "--capacity".into(),
            args.capacity.to_string(),
            "--threads".into(),
            args.threads.to_string(),
            "--device".into(),
            args.device.of(i).to_string(),
            "--data-plane".into(),
            args.data_plane.to_string(),
            "--lease-ttl-secs".into(),
            ttl.clone(),
            "--stats-interval-s".into(),
            args.stats_interval_s.to_string(),
            "--metrics-listen".into(),
            "127.0.0.1:0".into(),
        ];
        if args.metrics_expert_layers {
            extra.push("--metrics-expert-layers".into());
        }
        if args.bf16_activations {
            extra.push("--bf16-activations".into());
        }
        if let Some(tokens) = args.kv_cache_tokens {
            extra.extend(["--kv-cache-tokens".into(), tokens.to_string()]);
        }
        extra.extend(security.worker_args());
        parts.push(part(format!("worker-{i}"), "worker", extra));
    }
    parts.push(part(
        "router".into(),
        "router",
        vec![
            "--listen".into(),
            args.listen.to_string(),
            "--http-listen".into(),
            args.http_listen.to_string(),
            "--served-model-name".into(),
            served_model_name(args.served_model_name.as_deref(), Path::new(&model)),
        ]
        .into_iter()
        .chain(security.router_args())
        .collect(),
    ));

    // Start every part; learn the router's addresses and every metrics port from stdout.
    let (lines_tx, mut lines) = mpsc::unbounded_channel();
    let mut relays = JoinSet::new();
    for part in &mut parts {
        part.start(
            &exe,
            &mut relays,
            Some((part.name.clone(), lines_tx.clone())),
        )?;
    }
    drop(lines_tx);
    let store = EtcdStore::connect_with(
        &[etcd.to_string()],
        Duration::from_secs(5),
        security.tls.as_ref(),
    )
    .await?;
    let started = async {
        let (mut addr, mut http) = (None, None);
        let mut metrics = Vec::new();
        // The router's lines come after the others' start-up lines: each part prints its
        // metrics port before it serves.
        while addr.is_none() || http.is_none() || metrics.len() < args.workers + 1 {
            let (name, line): (String, String) = lines
                .recv()
                .await
                .context("the parts exited before serving")?;
            if let Some(a) = line.strip_prefix("router serving on ") {
                addr = Some(a.trim().parse::<SocketAddr>()?);
            } else if let Some(rest) = line
                .strip_prefix("dashboard on http://")
                .or_else(|| line.strip_prefix("dashboard on https://"))
            {
                http = rest
                    .split('/')
                    .next()
                    .map(str::parse::<SocketAddr>)
                    .transpose()?;
            } else if let Some(url) = line.strip_prefix("metrics on ") {
                metrics.push((name, url.trim().to_string()));
            }
        }
        let addr = addr.context("the router printed no address")?;
        let http = http.context("the router printed no HTTP address")?;
        let epoch = wait_active(&store, &args.cluster).await?;
        let admin = announced_admin(&store, &args.cluster).await;
        Ok::<_, anyhow::Error>((addr, admin, epoch, (http, metrics)))
    };
    let outcome = tokio::select! {
        started = started => started.map(|(addr, admin, epoch, watch)| banner(addr, admin.as_deref(), Path::new(&model), &served_model_name(args.served_model_name.as_deref(), Path::new(&model)), &epoch, Some(watch), security)),
        _ = shutdown.cancelled() => Ok(()),
        (i, status, _) = next_exit(&mut parts) => Err(anyhow!("{} exited while the cluster was starting ({status})", parts[i].name)),
    };
    // The router's lines are not needed any more; its relay goes on printing them.
    drop(lines);
    if outcome.is_ok() {
        supervise(&exe, &mut parts, &mut relays, &shutdown).await;
    }
    stop_all(parts, relays, outcome).await
}

/// Until `shutdown`: starts every part that exits again, after its backoff.
async fn supervise(
    exe: &Path,
    parts: &mut [Part],
    relays: &mut JoinSet<()>,
    shutdown: &CancellationToken,
) {
    loop {
        let restart_at = parts.iter().filter_map(|p| p.restart_at).min();
        tokio::select! {
            () = shutdown.cancelled() => return,
            (i, status, success) = next_exit(parts) => {
                let part = &mut parts[i];
                part.child = None;
                if part.worker && success {
                    println!("[up] {} exited ({status}) after a drain; not started again", part.name);
                    continue;
                }
                part.backoff.ran_for(part.started.elapsed());
                let after = part.backoff.next();
                println!("[up] {} exited ({status}); starting it again in {after:?}", part.name);
                part.restart_at = Some(Instant::now() + after);
            }
            () = sleep_until(restart_at) => {
                let now = Instant::now();
                for part in parts.iter_mut().filter(|p| p.restart_at.is_some_and(|at| at <= now)) {
                    if let Err(e) = part.start(exe, relays, None) {
                        let after = part.backoff.next();
                        eprintln!("[up] {e:#}; trying again in {after:?}");
                        part.restart_at = Some(Instant::now() + after);
                    }
                }
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Resolves when a running part exits: its index, how it ended, and whether it exited 0.
/// Never, while none runs.
async fn next_exit(parts: &mut [Part]) -> (usize, String, bool) {
    let waits: Vec<_> = parts
        .iter_mut()
        .enumerate()
        .filter_map(|(i, p)| p.child.as_mut().map(|c| (i, c)))
        .map(|(i, child)| {
            Box::pin(async move {
                match child.wait().await {
                    Ok(s) => (i, s.to_string(), s.success()),
                    Err(e) => (i, e.to_string(), false),
                }
            })
        })
        .collect();
    if waits.is_empty() {
        return std::future::pending().await;
    }
    futures::future::select_all(waits).await.0
}

/// Asks every part to stop (SIGTERM), waits a little, then kills what is left.
async fn stop_all(
    mut parts: Vec<Part>,
    mut relays: JoinSet<()>,
    outcome: Result<()>,
) -> Result<()> {
    for part in &parts {
        if let Some(pid) = part.child.as_ref().and_then(Child::id) {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status()
                .await;
        }
    }
    for child in parts.iter_mut().filter_map(|p| p.child.as_mut()) {
        if tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .is_err()
        {
            let _ = child.kill().await;
        }
    }
    relays.shutdown().await;
    outcome?;
    println!("moebius stopped");
    Ok(())
}
