//! `moebius up`: a whole cluster on this machine. Without `--etcd` everything runs in this
//! process on the in-memory store; with `--etcd URL` the coordinator, the workers and the
//! router are separate `moebius` processes registered in that etcd.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use moebius_coordinator::{EpochRecord, EpochState, EtcdStore, Keys, MemoryStore, TopologyStore};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// The checkpoint `up` serves when no `--model` is given (relative to the repository root).
const BUNDLED_MODEL: &str = "fixtures/tiny-v3";

/// How long the cluster may take to form its first epoch.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// Flags of `moebius up`.
#[derive(Args, Debug)]
pub struct UpArgs {
    /// Checkpoint directory to serve (default: the repository's bundled tiny checkpoint).
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
    /// Round activations to bf16 in prefill-sized products with bf16 weights (AVX512-BF16):
    /// faster prefill, less precise than the default f32 activations.
    #[arg(long)]
    pub bf16_activations: bool,
    /// Lease TTL of workers and coordinator, in seconds (how fast a dead worker is noticed).
    #[arg(long, default_value_t = 5)]
    pub lease_ttl_secs: u64,
}

pub fn run(args: UpArgs) -> Result<()> {
    if args.workers == 0 {
        return Err(
            moebius_worker::Error::InvalidRequest("--workers must be at least 1".into()).into(),
        );
    }
    let model = resolve_model(args.model.as_deref())?;
    let experts = moebius_worker::config::ModelConfig::from_dir(&model)
        .with_context(|| format!("cannot read the model at {}", model.display()))?
        .n_routed_experts;
    if args.workers > experts {
        return Err(moebius_worker::Error::InvalidRequest(format!(
            "--workers {} is more than the model's {experts} routed experts",
            args.workers
        ))
        .into());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        let signals = tokio::spawn(super::cancel_on_signal(shutdown.clone()));
        let result = match &args.etcd {
            None => in_process(&args, &model, experts, shutdown.clone()).await,
            Some(etcd) => with_processes(&args, &model, etcd, shutdown.clone()).await,
        };
        shutdown.cancel();
        signals.abort();
        result
    })
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
    pub epoch: EpochRecord,
    pub tasks: JoinSet<Result<()>>,
}

/// What an in-process cluster is made of.
pub struct LocalOptions<'a> {
    pub model: &'a Path,
    pub experts: usize,
    pub workers: usize,
    pub listen: SocketAddr,
    pub cluster: &'a str,
    pub capacity: u32,
    pub threads: usize,
    pub bf16_activations: bool,
    pub lease_ttl: Duration,
}

/// Starts coordinator, workers and router as tasks of this process and waits until the
/// router serves and the first epoch is active. Every part stops when `shutdown` is cancelled.
pub async fn start_local(
    options: &LocalOptions<'_>,
    shutdown: &CancellationToken,
) -> Result<LocalCluster> {
    let store: Arc<dyn TopologyStore> = Arc::new(MemoryStore::new());
    let mut tasks: JoinSet<Result<()>> = JoinSet::new();
    let coordinator = moebius_coordinator::CoordinatorConfig {
        id: "coordinator".into(),
        cluster: options.cluster.to_string(),
        expected_workers: options.workers,
        num_experts: options.experts,
        lease_ttl: options.lease_ttl,
        ..Default::default()
    };
    let (store_c, stop) = (store.clone(), shutdown.child_token());
    tasks.spawn(async move {
        moebius_coordinator::run(coordinator, store_c, stop)
            .await
            .context("coordinator")
    });
    for i in 0..options.workers {
        let config = moebius_worker::service::WorkerConfig {
            id: format!("worker-{i}"),
            cluster: options.cluster.to_string(),
            model_dir: options.model.to_path_buf(),
            capacity: options.capacity,
            threads: options.threads,
            bf16_activations: options.bf16_activations,
            lease_ttl: options.lease_ttl,
            ..Default::default()
        };
        let (store_w, stop) = (store.clone(), shutdown.child_token());
        tasks.spawn(async move {
            moebius_worker::service::run(config, store_w, stop)
                .await
                .with_context(|| format!("worker-{i}"))
        });
    }
    let router = moebius_router::RouterConfig {
        cluster: options.cluster.to_string(),
        listen: options.listen,
        ..Default::default()
    };
    let (ready_tx, ready_rx) = oneshot::channel();
    let (store_r, stop) = (store.clone(), shutdown.child_token());
    tasks.spawn(async move {
        moebius_router::run(router, store_r, stop, Some(ready_tx))
            .await
            .context("router")
    });

    let started = async {
        let addr = ready_rx
            .await
            .context("the router stopped before it was ready")?;
        let epoch = wait_active(&*store, options.cluster).await?;
        Ok::<_, anyhow::Error>((addr, epoch))
    };
    tokio::select! {
        started = started => {
            let (router_addr, epoch) = started?;
            Ok(LocalCluster { router_addr, epoch, tasks })
        }
        Some(done) = tasks.join_next() => {
            shutdown.cancel();
            Err(failed(done))
        }
        _ = shutdown.cancelled() => bail!("stopped while starting"),
    }
}

async fn in_process(
    args: &UpArgs,
    model: &Path,
    experts: usize,
    shutdown: CancellationToken,
) -> Result<()> {
    let options = LocalOptions {
        model,
        experts,
        workers: args.workers,
        listen: args.listen,
        cluster: &args.cluster,
        capacity: args.capacity,
        threads: args.threads,
        bf16_activations: args.bf16_activations,
        lease_ttl: Duration::from_secs(args.lease_ttl_secs),
    };
    let LocalCluster {
        router_addr,
        epoch,
        mut tasks,
    } = match start_local(&options, &shutdown).await {
        Ok(cluster) => cluster,
        Err(_) if shutdown.is_cancelled() => return Ok(()),
        Err(e) => return Err(e),
    };
    banner(router_addr, model, &epoch);
    // Serve until Ctrl-C or until a part fails; then stop every part.
    let mut first_error = None;
    tokio::select! {
        _ = shutdown.cancelled() => {}
        Some(done) = tasks.join_next() => first_error = Some(failed(done)),
    }
    shutdown.cancel();
    while let Some(done) = tasks.join_next().await {
        if let Ok(Err(e)) = done {
            first_error.get_or_insert(e);
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => {
            println!("moebius stopped");
            Ok(())
        }
    }
}

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

fn banner(addr: SocketAddr, model: &Path, epoch: &EpochRecord) {
    let ranks: Vec<String> = epoch
        .workers
        .iter()
        .zip(&epoch.placement.ranks)
        .map(|(w, s)| format!("{} ({} experts)", w.id, s.len()))
        .collect();
    println!("moebius is up: router on {addr}, model {}", model.display());
    println!(
        "epoch {} active with {} workers: {}",
        epoch.epoch,
        epoch.workers.len(),
        ranks.join(", ")
    );
    println!("try it (grpcurl reads the API from server reflection):");
    println!(
        "  grpcurl -plaintext -d '{{\"text\": \"The river\", \"max_new_tokens\": 16, \"ignore_eos\": true}}' {addr} moebius.v1.Inference/Generate"
    );
    println!("Ctrl-C stops the cluster.");
}

/// A `moebius` child process and its name.
struct Part {
    name: String,
    child: Child,
}

async fn with_processes(
    args: &UpArgs,
    model: &Path,
    etcd: &str,
    shutdown: CancellationToken,
) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find the moebius binary")?;
    let model = model
        .to_str()
        .ok_or_else(|| anyhow!("the model path is not UTF-8"))?
        .to_string();
    let ttl = args.lease_ttl_secs.to_string();
    let common = [
        "--etcd".to_string(),
        etcd.to_string(),
        "--cluster".into(),
        args.cluster.clone(),
    ];
    let mut parts = Vec::new();
    let spawn = |name: String, sub: &str, extra: Vec<String>| -> Result<Part> {
        let child = Command::new(&exe)
            .arg(sub)
            .args(&common)
            .args(extra)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        Ok(Part { name, child })
    };
    let workers = args.workers.to_string();
    parts.push(spawn(
        "coordinator".into(),
        "coordinator",
        vec![
            "--model".into(),
            model.clone(),
            "--workers".into(),
            workers,
            "--lease-ttl-secs".into(),
            ttl.clone(),
        ],
    )?);
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
            "--lease-ttl-secs".into(),
            ttl.clone(),
        ];
        if args.bf16_activations {
            extra.push("--bf16-activations".into());
        }
        parts.push(spawn(format!("worker-{i}"), "worker", extra)?);
    }
    parts.push(spawn(
        "router".into(),
        "router",
        vec!["--listen".into(), args.listen.to_string()],
    )?);

    // Relay each child's stdout, and learn the router's address from it.
    let (addr_tx, addr_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut relays = JoinSet::new();
    for part in &mut parts {
        if let Some(out) = part.child.stdout.take() {
            let (name, addr_tx) = (part.name.clone(), addr_tx.clone());
            relays.spawn(async move {
                let mut lines = BufReader::new(out).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Some(addr) = line.strip_prefix("router serving on ") {
                        let _ = addr_tx.send(addr.trim().to_string());
                    }
                    println!("[{name}] {line}");
                }
            });
        }
    }
    drop(addr_tx);
    let store = EtcdStore::connect(&[etcd.to_string()], Duration::from_secs(5)).await?;
    let started = async {
        let mut addr_rx = addr_rx;
        let addr: SocketAddr = addr_rx
            .recv()
            .await
            .context("the router exited before serving")?
            .parse()?;
        let epoch = wait_active(&store, &args.cluster).await?;
        Ok::<_, anyhow::Error>((addr, epoch))
    };
    let outcome = tokio::select! {
        started = started => started.map(|(addr, epoch)| banner(addr, Path::new(&model), &epoch)),
        _ = shutdown.cancelled() => Ok(()),
        exited = first_exit(&mut parts) => Err(exited),
    };
    if outcome.is_ok() && !shutdown.is_cancelled() {
        tokio::select! {
            _ = shutdown.cancelled() => {}
            exited = first_exit(&mut parts) => return stop_all(parts, relays, Err(exited)).await,
        }
    }
    stop_all(parts, relays, outcome).await
}

/// Resolves when any part exits, naming it.
async fn first_exit(parts: &mut [Part]) -> anyhow::Error {
    let waits = parts.iter_mut().map(|p| {
        let name = p.name.clone();
        Box::pin(async move { (name, p.child.wait().await) })
    });
    let ((name, status), _, _) = futures::future::select_all(waits).await;
    anyhow!(
        "{name} exited ({})",
        status.map_or_else(|e| e.to_string(), |s| s.to_string())
    )
}

/// Asks every part to stop (SIGTERM), waits a little, then kills what is left.
async fn stop_all(
    mut parts: Vec<Part>,
    mut relays: JoinSet<()>,
    outcome: Result<()>,
) -> Result<()> {
    for part in &parts {
        if let Some(pid) = part.child.id() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status()
                .await;
        }
    }
    for part in &mut parts {
        if tokio::time::timeout(Duration::from_secs(10), part.child.wait())
            .await
            .is_err()
        {
            let _ = part.child.kill().await;
        }
    }
    relays.shutdown().await;
    outcome?;
    println!("moebius stopped");
    Ok(())
}
