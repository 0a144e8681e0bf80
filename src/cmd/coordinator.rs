//! `moebius coordinator`: flags into a `CoordinatorConfig`, an etcd connection, and
//! `moebius_coordinator::run` until Ctrl-C or SIGTERM.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use moebius_coordinator::{CoordinatorConfig, EtcdStore};
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
}

pub fn run(args: CoordinatorArgs) -> Result<()> {
    let config = CoordinatorConfig {
        id: args.id.unwrap_or_else(default_id),
        cluster: args.cluster,
        expected_workers: args.workers,
        num_experts: routed_experts(&args.model)?,
        lease_ttl: Duration::from_secs(args.lease_ttl_secs),
        ..CoordinatorConfig::default()
    };
    config.validate()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let store = EtcdStore::connect(&args.etcd, Duration::from_secs(5)).await?;
        let shutdown = CancellationToken::new();
        let signals = tokio::spawn(super::cancel_on_signal(shutdown.clone()));
        tracing::info!(id = %config.id, cluster = %config.cluster, "coordinator starting");
        println!(
            "coordinator {} running for cluster {}",
            config.id, config.cluster
        );
        let result = moebius_coordinator::run(config, Arc::new(store), shutdown.clone()).await;
        signals.abort();
        result?;
        Ok(())
    })
}

/// Reads `n_routed_experts` from the checkpoint's config.json.
fn routed_experts(model: &Path) -> Result<usize> {
    let path = model.join("config.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    match json
        .get("n_routed_experts")
        .and_then(serde_json::Value::as_u64)
    {
        Some(n) if n > 0 => Ok(usize::try_from(n)?),
        _ => bail!(
            "{} has no positive `n_routed_experts`; is it a DeepSeek-V2/V3 checkpoint?",
            path.display()
        ),
    }
}

fn default_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty() && !h.contains('/'))
        .unwrap_or_else(|| "coordinator".into());
    format!("{host}-{}", std::process::id())
}
