//! `moebius router`: serves a cluster's public gRPC API, following its topology in etcd.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use moebius_coordinator::EtcdStore;
use moebius_router::auth::ApiKeys;
use moebius_router::RouterConfig;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// Flags of `moebius router`.
#[derive(Args, Debug)]
pub struct RouterArgs {
    /// etcd endpoints holding the cluster's topology, comma-separated (e.g. http://127.0.0.1:2379).
    #[arg(long, env = "MOEBIUS_ETCD", required = true, value_delimiter = ',')]
    etcd: Vec<String>,
    /// Name of the cluster: its keys live under /moebius/<cluster>/.
    #[arg(long, env = "MOEBIUS_CLUSTER", default_value = "default")]
    cluster: String,
    /// Address of the public gRPC API (port 0 picks a free port).
    #[arg(long, env = "MOEBIUS_ROUTER_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Most requests in flight on one worker [default: the capacity each worker advertises].
    #[arg(long, env = "MOEBIUS_ROUTER_MAX_IN_FLIGHT_PER_WORKER")]
    max_in_flight_per_worker: Option<u32>,
    /// Cap on a request's duration in seconds, on top of the client's deadline [default: none].
    #[arg(long, env = "MOEBIUS_ROUTER_REQUEST_TIMEOUT_S")]
    request_timeout_s: Option<f64>,
    /// On shutdown, seconds that in-flight requests may take to finish.
    #[arg(long, env = "MOEBIUS_ROUTER_DRAIN_TIMEOUT_S", default_value_t = 30.0)]
    drain_timeout_s: f64,
    /// Seconds a request waits for a worker to route to while the cluster is starting or
    /// re-forming (or every worker is gone) before it fails with UNAVAILABLE.
    #[arg(long, env = "MOEBIUS_ROUTER_EPOCH_WAIT_S", default_value_t = 10.0)]
    epoch_wait_s: f64,
    /// Most times one request is resubmitted to another worker after losing its worker; past
    /// it the client gets UNAVAILABLE.
    #[arg(long, env = "MOEBIUS_ROUTER_MIGRATION_LIMIT", default_value_t = 3)]
    migration_limit: u32,
    /// Address of the HTTP port: Prometheus metrics (`GET /metrics`) and the live dashboard
    /// (`GET /dashboard`); port 0 picks a free one. Without it there is no HTTP port.
    #[arg(long, env = "MOEBIUS_ROUTER_HTTP_LISTEN", alias = "metrics-listen")]
    http_listen: Option<SocketAddr>,
    /// The model's name in the OpenAI-compatible API: what clients send as `model`.
    #[arg(
        long,
        env = "MOEBIUS_ROUTER_SERVED_MODEL_NAME",
        default_value = "moebius"
    )]
    served_model_name: String,
    /// File of API keys, one per line (`#` starts a comment): a call to the API must send one
    /// as `authorization: Bearer <key>` (gRPC metadata or HTTP header), else it gets
    /// UNAUTHENTICATED / 401. Health, metrics and the dashboard stay open.
    #[arg(long, env = "MOEBIUS_API_KEY_FILE")]
    api_key_file: Option<PathBuf>,
    /// Largest request message (gRPC) or body (HTTP), in bytes.
    #[arg(long, env = "MOEBIUS_ROUTER_MAX_REQUEST_BYTES", default_value_t = moebius_router::limits::DEFAULT_MAX_REQUEST_BYTES)]
    max_request_bytes: usize,
    /// Most connections one client address may hold open to the public ports.
    #[arg(long, env = "MOEBIUS_ROUTER_MAX_CONNECTIONS_PER_PEER", default_value_t = moebius_coordinator::peers::DEFAULT_CONNECTIONS_PER_PEER)]
    max_connections_per_peer: usize,
    #[command(flatten)]
    tls: super::tls::TlsArgs,
}

/// How long connecting to etcd may take at start-up.
const ETCD_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The router's configuration from its flags, checked; nothing opened yet.
fn config(args: &RouterArgs) -> Result<RouterConfig> {
    let seconds = |flag: &str, s: f64| {
        Duration::try_from_secs_f64(s).with_context(|| format!("{flag} {s}: give seconds >= 0"))
    };
    let config = RouterConfig {
        cluster: args.cluster.clone(),
        listen: args.listen,
        max_in_flight_per_worker: args.max_in_flight_per_worker,
        request_timeout: args
            .request_timeout_s
            .map(|s| seconds("--request-timeout-s", s))
            .transpose()?,
        drain_timeout: seconds("--drain-timeout-s", args.drain_timeout_s)?,
        epoch_wait: seconds("--epoch-wait-s", args.epoch_wait_s)?,
        migration_limit: args.migration_limit,
        http_listen: args.http_listen,
        model_name: args.served_model_name.clone(),
        max_request_bytes: args.max_request_bytes,
        max_connections_per_peer: args.max_connections_per_peer,
        ..RouterConfig::default()
    }
    .with_own_metrics();
    config.validate()?;
    Ok(config)
}

/// `--check-config`: what the router would start as.
pub fn check(args: &RouterArgs) -> Result<String> {
    let config = config(args)?;
    let http = config
        .http_listen
        .map_or_else(|| "off".to_owned(), |a| a.to_string());
    let keys = super::check::secret_file(
        args.api_key_file.as_deref(),
        "API keys",
        "no API keys",
        ApiKeys::from_file,
    )?;
    Ok(format!(
        "router of cluster {}: gRPC {}, HTTP {http} (OpenAI API model {:?}), etcd {}, {}, {keys}",
        config.cluster,
        config.listen,
        config.model_name,
        args.etcd.join(","),
        args.tls.check()?,
    ))
}

pub fn run(args: RouterArgs) -> Result<()> {
    let config = RouterConfig {
        tls: args.tls.load()?,
        api_keys: args
            .api_key_file
            .as_deref()
            .map(ApiKeys::from_file)
            .transpose()?,
        ..config(&args)?
    };
    let runtime = tokio::runtime::Runtime::new().context("cannot start the Tokio runtime")?;
    runtime.block_on(serve(config, args.etcd))
}

async fn serve(config: RouterConfig, etcd: Vec<String>) -> Result<()> {
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let store = EtcdStore::connect_with(&etcd, ETCD_CONNECT_TIMEOUT, config.tls.as_ref())
        .await
        .context("cannot connect to etcd; check --etcd")?;
    let shutdown = CancellationToken::new();
    let (ready_tx, ready_rx) = oneshot::channel();
    let router = moebius_router::run(config, Arc::new(store), shutdown.clone(), Some(ready_tx));
    tokio::pin!(router);
    tokio::select! {
        result = &mut router => return Ok(result?),
        bound = ready_rx => {
            if let Ok(bound) = bound {
                println!("router serving on {}", bound.grpc);
                if let Some(http) = bound.http {
                    println!("dashboard on {scheme}://{http}/dashboard, metrics on {scheme}://{http}/metrics");
                }
            }
        }
    }
    tokio::select! {
        result = &mut router => return Ok(result?),
        _ = super::cancel_on_signal(shutdown.clone()) => {}
    }
    Ok(router.await?)
}
