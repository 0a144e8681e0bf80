//! `moebius worker`: one rank of the EP group, registered in etcd, serving `moebius.v1.Worker`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use moebius_coordinator::telemetry::Registry;
use moebius_coordinator::EtcdStore;
use moebius_worker::backend::Device;
use moebius_worker::comm::{ClusterSecret, DataPlane};
use moebius_worker::engine::kv_budget::{KvBudget, BLOCK_TOKENS};
use moebius_worker::metrics::WorkerMetrics;
use moebius_worker::service::{self, WorkerConfig};
use tokio_util::sync::CancellationToken;

use super::tls::TlsArgs;

/// Flags of `moebius worker`.
#[derive(Args, Debug)]
pub struct WorkerArgs {
    /// etcd endpoints holding the cluster's topology, comma-separated (e.g. http://127.0.0.1:2379).
    #[arg(long, env = "MOEBIUS_ETCD", required = true, value_delimiter = ',')]
    etcd: Vec<String>,
    /// Name of the cluster: its keys live under /moebius/<cluster>/.
    #[arg(long, env = "MOEBIUS_CLUSTER", default_value = "default")]
    cluster: String,
    /// This worker's id, unique in the cluster.
    #[arg(long, env = "MOEBIUS_WORKER_ID")]
    id: String,
    /// Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer.json).
    #[arg(long, env = "MOEBIUS_MODEL")]
    model: PathBuf,
    /// Address of the internal gRPC service (port 0 picks a free port).
    #[arg(long, env = "MOEBIUS_WORKER_LISTEN", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Address of the TCP data plane between ranks (port 0 picks a free port).
    #[arg(
        long,
        env = "MOEBIUS_WORKER_DATA_LISTEN",
        default_value = "127.0.0.1:0"
    )]
    data_listen: SocketAddr,
    /// Host the router and the other ranks dial: registered addresses are <host>:<bound port>.
    #[arg(
        long,
        env = "MOEBIUS_WORKER_ADVERTISE_HOST",
        default_value = "127.0.0.1"
    )]
    advertise_host: String,
    /// Most requests in flight (active and queued); more get RESOURCE_EXHAUSTED.
    #[arg(long, env = "MOEBIUS_WORKER_CAPACITY", default_value_t = 64)]
    capacity: u32,
    /// Most prompt tokens prefilled per engine step.
    #[arg(long, env = "MOEBIUS_WORKER_TOKEN_BUDGET", default_value_t = 512)]
    token_budget: usize,
    /// Most tokens of KV cache the worker's sequences hold together, in blocks of 16 (default:
    /// 4 GiB of cache on a CPU; on a GPU, 80% of the memory free once the weights are loaded).
    /// Prompts wait for room; the newest sequences give theirs up to older ones and prefill
    /// again later.
    #[arg(long, env = "MOEBIUS_WORKER_KV_CACHE_TOKENS")]
    kv_cache_tokens: Option<usize>,
    /// CPU threads for large products (0: all cores).
    #[arg(long, env = "MOEBIUS_WORKER_THREADS", default_value_t = 0)]
    threads: usize,
    /// Round activations to bf16 in prefill-sized products with bf16 weights (AVX512-BF16):
    /// faster prefill, less precise than the default f32 activations.
    #[arg(long, env = "MOEBIUS_WORKER_BF16_ACTIVATIONS")]
    bf16_activations: bool,
    /// Where the products run: cpu, or cuda / cuda:N (GPU N; a moebius built with
    /// `--features cuda`).
    #[arg(long, env = "MOEBIUS_WORKER_DEVICE", default_value = "cpu")]
    device: Device,
    /// What the ranks exchange tokens over: tcp (any devices, any machines), or nccl between
    /// GPUs, with tcp beside it for control (every worker of the cluster on a GPU and on nccl; a
    /// moebius built with `--features cuda`).
    #[arg(long, env = "MOEBIUS_WORKER_DATA_PLANE", default_value = "tcp")]
    data_plane: DataPlane,
    /// TTL of the registration lease in seconds; keep-alives go out at a third of it.
    #[arg(long, env = "MOEBIUS_WORKER_LEASE_TTL_SECS", default_value_t = 5)]
    lease_ttl_secs: u64,
    /// Seconds a collective waits for a peer before the group is declared failed: how fast a
    /// hung peer is noticed. One layer of the slowest rank's step must fit in it.
    #[arg(long, env = "MOEBIUS_WORKER_DATA_TIMEOUT_S", default_value_t = 5.0)]
    data_timeout_s: f64,
    /// Seconds between samples of the expert load, published under stats/<id> for the
    /// balancer and shown in the Status RPC.
    #[arg(long, env = "MOEBIUS_WORKER_STATS_INTERVAL_S", default_value_t = 5.0)]
    stats_interval_s: f64,
    /// Address of the Prometheus metrics port (`GET /metrics`); port 0 picks a free one.
    /// Without it no metrics are served.
    #[arg(long, env = "MOEBIUS_WORKER_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Also export the routed tokens per (MoE layer, expert), not only per expert: layers ×
    /// experts series.
    #[arg(long, env = "MOEBIUS_WORKER_METRICS_EXPERT_LAYERS")]
    metrics_expert_layers: bool,
    #[command(flatten)]
    tls: TlsArgs,
    /// File holding the cluster's data-plane secret (at least 32 bytes; `moebius certs` writes
    /// one): every data-plane connection proves it before its first frame, and seals its frames
    /// with keys derived from it. Required with TLS.
    #[arg(long, env = "MOEBIUS_CLUSTER_SECRET_FILE")]
    cluster_secret_file: Option<PathBuf>,
    /// Run the data plane without the secret although TLS is configured: only on a network
    /// that nothing else can reach.
    #[arg(
        long,
        env = "MOEBIUS_INSECURE_DATA_PLANE",
        conflicts_with = "cluster_secret_file"
    )]
    insecure_data_plane: bool,
}

/// Refuses TLS without a data-plane secret unless the open data plane was chosen.
pub fn check_data_plane(tls: bool, secret: bool, insecure: bool) -> Result<()> {
    if tls && !secret && !insecure {
        return Err(super::UsageError(
            "with TLS configured, the data plane needs --cluster-secret-file (or \
             --insecure-data-plane, on a network that nothing else can reach)"
                .into(),
        )
        .into());
    }
    Ok(())
}

/// Refuses a KV cache budget under one block.
pub fn check_kv_cache_tokens(tokens: Option<usize>) -> Result<()> {
    match tokens {
        Some(t) if t < BLOCK_TOKENS => Err(super::UsageError(format!(
            "--kv-cache-tokens {t} is under one block of {BLOCK_TOKENS} tokens"
        ))
        .into()),
        _ => Ok(()),
    }
}

/// How long connecting to etcd may take at start-up.
const ETCD_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The worker's configuration from its flags, checked; nothing opened yet.
fn config(args: &WorkerArgs) -> Result<WorkerConfig> {
    let data_timeout = Duration::try_from_secs_f64(args.data_timeout_s)
        .ok()
        .filter(|d| !d.is_zero())
        .with_context(|| {
            format!(
                "--data-timeout-s {}: give a number of seconds above 0",
                args.data_timeout_s
            )
        })?;
    check_kv_cache_tokens(args.kv_cache_tokens)?;
    if args.data_plane == DataPlane::Nccl && !matches!(args.device, Device::Cuda(_)) {
        return Err(super::UsageError(format!(
            "--data-plane nccl exchanges tokens between GPUs: give --device cuda:N (not {})",
            args.device
        ))
        .into());
    }
    let config = WorkerConfig {
        id: args.id.clone(),
        cluster: args.cluster.clone(),
        model_dir: args.model.clone(),
        listen: args.listen,
        data_listen: args.data_listen,
        advertise_host: args.advertise_host.clone(),
        capacity: args.capacity,
        token_budget: args.token_budget,
        kv_cache_tokens: args.kv_cache_tokens,
        threads: args.threads,
        bf16_activations: args.bf16_activations,
        device: args.device,
        data_plane: args.data_plane,
        lease_ttl: Duration::from_secs(args.lease_ttl_secs),
        data_timeout,
        stats_interval: super::up::stats_interval(args.stats_interval_s)?,
        ..WorkerConfig::default()
    };
    config.validate()?;
    check_data_plane(
        args.tls.enabled(),
        args.cluster_secret_file.is_some(),
        args.insecure_data_plane,
    )?;
    Ok(config)
}

/// `--check-config`: what the worker would start as.
pub fn check(args: &WorkerArgs) -> Result<String> {
    let config = config(args)?;
    let data_plane = super::check::secret_file(
        args.cluster_secret_file.as_deref(),
        "with the cluster secret",
        "open",
        ClusterSecret::from_file,
    )?;
    let kv_cache = config.kv_cache_tokens.map_or_else(
        || "what memory allows".to_string(),
        |t| format!("{} tokens", KvBudget::tokens(t).capacity_tokens()),
    );
    Ok(format!(
        "worker {} of cluster {}: gRPC {}, {} data plane {} {data_plane}, advertised as {}, \
         KV cache {kv_cache}, model {}, etcd {}, {}",
        config.id,
        config.cluster,
        config.listen,
        config.data_plane,
        config.data_listen,
        config.advertise_host,
        super::check::model(&config.model_dir),
        args.etcd.join(","),
        args.tls.check()?,
    ))
}

pub fn run(args: WorkerArgs) -> Result<()> {
    let config = config(&args)?;
    let mut registry = moebius_coordinator::telemetry::registry();
    let config = WorkerConfig {
        metrics: WorkerMetrics::register(&mut registry, &config.id, args.metrics_expert_layers),
        tls: args.tls.load()?,
        data_secret: args
            .cluster_secret_file
            .as_deref()
            .map(ClusterSecret::from_file)
            .transpose()?,
        ..config
    };
    let metrics = args.metrics_listen.map(|addr| (addr, registry));
    let runtime = tokio::runtime::Runtime::new().context("cannot start the Tokio runtime")?;
    runtime.block_on(serve(config, args.etcd, metrics))
}

async fn serve(
    config: WorkerConfig,
    etcd: Vec<String>,
    metrics: Option<(SocketAddr, Registry)>,
) -> Result<()> {
    let store = EtcdStore::connect_with(&etcd, ETCD_CONNECT_TIMEOUT, config.tls.as_ref())
        .await
        .context("cannot connect to etcd; check --etcd")?;
    let shutdown = CancellationToken::new();
    if let Some((addr, registry)) = metrics {
        super::metrics::serve(addr, registry, shutdown.clone(), config.tls.as_ref()).await?;
    }
    let id = config.id.clone();
    let worker = service::start(config, Arc::new(store), shutdown.clone()).await?;
    println!("worker {id} serving on {}", worker.grpc_addr());
    let wait = worker.wait();
    tokio::pin!(wait);
    tokio::select! {
        result = &mut wait => return Ok(result?),
        _ = stop_signal() => shutdown.cancel(),
    }
    Ok(wait.await?)
}

/// Ctrl-C, or SIGTERM (what Kubernetes and `docker stop` send).
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
