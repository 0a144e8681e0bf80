//! `moebius coordinator`: flags into a `CoordinatorConfig`, an etcd connection, and
//! `moebius_coordinator::run` until Ctrl-C or SIGTERM.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use moebius_coordinator::{CoordinatorConfig, CoordinatorMetrics, EtcdStore};
use tokio_util::sync::CancellationToken;

/// Flags of `moebius coordinator`.
#[derive(Args, Debug)]
pub struct CoordinatorArgs {
    /// etcd endpoints, comma-separated (e.g. http://127.0.0.1:2379).
    #[arg(long, env = "MOEBIUS_ETCD", value_delimiter = ',', required = true)]
    pub etcd: Vec<String>,
    /// Cluster name: keys live under /moebius/<cluster>/.
    #[arg(long, env = "MOEBIUS_CLUSTER", default_value = "default")]
    pub cluster: String,
    /// This coordinator's id in the leader election (default: <hostname>-<pid>).
    #[arg(long, env = "MOEBIUS_COORDINATOR_ID")]
    pub id: Option<String>,
    /// Workers that must register before the first epoch is formed.
    #[arg(long, env = "MOEBIUS_WORKERS", default_value_t = 2)]
    pub workers: usize,
    /// Checkpoint directory; its config.json's `n_routed_experts` is the number of experts.
    #[arg(long, env = "MOEBIUS_MODEL")]
    pub model: PathBuf,
    /// TTL of the coordinator's lease in seconds (failover time after a crash).
    #[arg(long, env = "MOEBIUS_LEASE_TTL_SECS", default_value_t = 5)]
    pub lease_ttl_secs: u64,
    /// Address of the admin gRPC service (`moebius admin`); port 0 picks a free port.
    #[arg(long, env = "MOEBIUS_ADMIN_LISTEN", default_value = "127.0.0.1:50052")]
    pub admin_listen: SocketAddr,
    /// Host others dial for the admin service: announced as <host>:<bound port>.
    #[arg(long, env = "MOEBIUS_ADVERTISE_HOST", default_value = "127.0.0.1")]
    pub advertise_host: String,
    /// Address of the Prometheus metrics port (`GET /metrics`); port 0 picks a free one.
    /// Without it no metrics are served.
    #[arg(long, env = "MOEBIUS_COORDINATOR_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    #[command(flatten)]
    pub balance: BalanceArgs,
    #[command(flatten)]
    pub tls: super::tls::TlsArgs,
}

/// How the experts are balanced; shared by `moebius coordinator` and `moebius up`.
#[derive(Args, Debug, Clone)]
pub struct BalanceArgs {
    /// Expert slots beyond one per logical expert, over the EP group: hot experts get copies
    /// (DeepSeek's EPLB). An operator can change it later with `moebius admin redundant`.
    #[arg(long, env = "MOEBIUS_REDUNDANT_EXPERTS", default_value_t = 0)]
    pub redundant_experts: usize,
    /// Rebalance on its own when the mean over MoE layers of max/mean rows per rank passes
    /// this (0 turns automatic rebalancing off).
    #[arg(long, env = "MOEBIUS_REBALANCE_THRESHOLD", default_value_t = 1.3)]
    pub rebalance_threshold: f64,
    /// Seconds between looks at the load for an automatic rebalance.
    #[arg(long, env = "MOEBIUS_REBALANCE_INTERVAL_S", default_value_t = 60.0)]
    pub rebalance_interval_s: f64,
}

impl BalanceArgs {
    /// The interval as a duration, or a one-line error naming the flag.
    pub fn interval(&self) -> Result<Duration> {
        Duration::try_from_secs_f64(self.rebalance_interval_s)
            .ok()
            .filter(|d| !d.is_zero())
            .with_context(|| {
                format!(
                    "--rebalance-interval-s {}: give a number of seconds above 0",
                    self.rebalance_interval_s
                )
            })
    }
}

/// The coordinator's configuration from its flags and the model's expert counts, checked;
/// nothing opened yet.
fn config(
    args: &CoordinatorArgs,
    (num_experts, expert_groups): (usize, usize),
) -> Result<CoordinatorConfig> {
    let id = args.id.clone().unwrap_or_else(default_id);
    let config = CoordinatorConfig {
        id,
        cluster: args.cluster.clone(),
        expected_workers: args.workers,
        num_experts,
        expert_groups,
        lease_ttl: Duration::from_secs(args.lease_ttl_secs),
        redundant_experts: args.balance.redundant_experts,
        rebalance_threshold: args.balance.rebalance_threshold,
        rebalance_interval: args.balance.interval()?,
        ..CoordinatorConfig::default()
    };
    config.validate()?;
    Ok(config)
}

/// `--check-config`: what the coordinator would start as. Where the model is not here (a
/// volume only the pod mounts), the checks that need its expert counts are left out.
pub fn check(args: &CoordinatorArgs) -> Result<String> {
    let experts = if args.model.join("config.json").exists() {
        routed_experts(&args.model)?
    } else {
        (args.workers.max(1), 1)
    };
    let config = config(args, experts)?;
    Ok(format!(
        "coordinator {} of cluster {}: {} workers, admin {}, model {}, etcd {}, {}",
        config.id,
        config.cluster,
        config.expected_workers,
        args.admin_listen,
        super::check::model(&args.model),
        args.etcd.join(","),
        args.tls.check()?,
    ))
}

pub fn run(args: CoordinatorArgs) -> Result<()> {
    let config = config(&args, routed_experts(&args.model)?)?;
    let mut registry = moebius_coordinator::telemetry::registry();
    let config = CoordinatorConfig {
        metrics: CoordinatorMetrics::register(&mut registry, &config.id),
        tls: args.tls.load()?,
        ..config
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let store =
            EtcdStore::connect_with(&args.etcd, Duration::from_secs(5), config.tls.as_ref())
                .await?;
        let shutdown = CancellationToken::new();
        let signals = tokio::spawn(super::cancel_on_signal(shutdown.clone()));
        if let Some(addr) = args.metrics_listen {
            super::metrics::serve(addr, registry, shutdown.clone(), config.tls.as_ref()).await?;
        }
        let listener = tokio::net::TcpListener::bind(args.admin_listen)
            .await
            .with_context(|| format!("cannot listen on --admin-listen {}", args.admin_listen))?;
        let admin_addr = listener.local_addr()?;
        let config = CoordinatorConfig {
            admin_address: Some(format!("{}:{}", args.advertise_host, admin_addr.port())),
            ..config
        };
        let (handle, link) = moebius_coordinator::admin::channel();
        let admin = tokio::spawn(moebius_coordinator::admin::service::serve(
            listener,
            handle,
            shutdown.clone(),
            config.tls.clone(),
        ));
        tracing::info!(id = %config.id, cluster = %config.cluster, "coordinator starting");
        println!(
            "coordinator {} running for cluster {}, admin on {admin_addr}",
            config.id, config.cluster
        );
        let result = moebius_coordinator::run_with_admin(
            config,
            Arc::new(store),
            shutdown.clone(),
            Some(link),
        )
        .await;
        shutdown.cancel();
        signals.abort();
        let _ = admin.await;
        result?;
        Ok(())
    })
}

/// Reads `n_routed_experts` and `n_group` (1 when absent) from the checkpoint's config.json.
fn routed_experts(model: &Path) -> Result<(usize, usize)> {
    let path = model.join("config.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    let experts = match json
        .get("n_routed_experts")
        .and_then(serde_json::Value::as_u64)
    {
        Some(n) if n > 0 => usize::try_from(n)?,
        _ => bail!(
            "{} has no positive `n_routed_experts`; is it a DeepSeek-V2/V3 checkpoint?",
            path.display()
        ),
    };
    let groups = json
        .get("n_group")
        .and_then(serde_json::Value::as_u64)
        .filter(|&g| g > 0)
        .map_or(Ok(1), usize::try_from)?;
    Ok((experts, groups))
}

fn default_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty() && !h.contains('/'))
        .unwrap_or_else(|| "coordinator".into());
    format!("{host}-{}", std::process::id())
}
