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

use super::supervise::Backoff;

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
    let mut parts = Vec::new();
    let coordinator = moebius_coordinator::CoordinatorConfig {
        id: "coordinator".into(),
        cluster: options.cluster.to_string(),
        expected_workers: options.workers,
        num_experts: options.experts,
        lease_ttl: options.lease_ttl,
        ..Default::default()
    };
    let store_c = store.clone();
    parts.push(LocalPart {
        name: "coordinator".into(),
        start: Arc::new(move |stop| {
            let (config, store) = (coordinator.clone(), store_c.clone());
            Box::pin(async move {
                moebius_coordinator::run(config, store, stop)
                    .await
                    .context("coordinator")
            })
        }),
        backoff: Backoff::default(),
        started: Instant::now(),
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
        });
    }
    let router = moebius_router::RouterConfig {
        cluster: options.cluster.to_string(),
        listen: options.listen,
        ..Default::default()
    };
    // The first start reports the router's address; a restart binds the same one.
    let (ready_tx, ready_rx) = oneshot::channel();
    let ready_tx = Arc::new(std::sync::Mutex::new(Some(ready_tx)));
    let listen = Arc::new(std::sync::Mutex::new(options.listen));
    let store_r = store.clone();
    parts.push(LocalPart {
        name: "router".into(),
        start: Arc::new(move |stop| {
            let (store, ready_tx, listen) = (store_r.clone(), ready_tx.clone(), listen.clone());
            let config = moebius_router::RouterConfig {
                listen: *listen.lock().unwrap_or_else(PoisonError::into_inner),
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
    });
    let mut cluster = LocalCluster {
        router_addr: options.listen,
        epoch: EpochRecord {
            epoch: 0,
            state: EpochState::Pending,
            workers: Vec::new(),
            placement: moebius_coordinator::Placement {
                num_experts: options.experts,
                ranks: Vec::new(),
            },
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
            let (router_addr, epoch) = started?;
            cluster.router_addr = router_addr;
            cluster.epoch = epoch;
            Ok(cluster)
        }
        Some(done) = cluster.tasks.join_next() => {
            shutdown.cancel();
            Err(failed(done.map(|(_, r)| r)))
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
    let mut cluster = match start_local(&options, &shutdown).await {
        Ok(cluster) => cluster,
        Err(_) if shutdown.is_cancelled() => return Ok(()),
        Err(e) => return Err(e),
    };
    banner(cluster.router_addr, model, &cluster.epoch);
    // Serve until Ctrl-C, starting again whatever stops; then stop every part.
    cluster.supervise(&shutdown).await;
    shutdown.cancel();
    cluster.join().await;
    println!("moebius stopped");
    Ok(())
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

/// A `moebius` child process: how to start it, and the running child.
struct Part {
    name: String,
    args: Vec<String>,
    child: Option<Child>,
    started: Instant,
    backoff: Backoff,
    /// When a stopped part is started again.
    restart_at: Option<Instant>,
}

impl Part {
    /// Starts the child and relays its stdout (with the part's name) on `relays`; lines go to
    /// `lines` too, for whoever waits for the router's address.
    fn start(
        &mut self,
        exe: &Path,
        relays: &mut JoinSet<()>,
        lines: Option<mpsc::UnboundedSender<String>>,
    ) -> Result<()> {
        let mut child = Command::new(exe)
            .args(&self.args)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
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
                    if let Some(lines) = &lines {
                        let _ = lines.send(line.clone());
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
        ],
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
            "--lease-ttl-secs".into(),
            ttl.clone(),
        ];
        if args.bf16_activations {
            extra.push("--bf16-activations".into());
        }
        parts.push(part(format!("worker-{i}"), "worker", extra));
    }
    parts.push(part(
        "router".into(),
        "router",
        vec!["--listen".into(), args.listen.to_string()],
    ));

    // Start every part; learn the router's address from its stdout.
    let (lines_tx, mut lines) = mpsc::unbounded_channel();
    let mut relays = JoinSet::new();
    for part in &mut parts {
        let watch = (part.name == "router").then(|| lines_tx.clone());
        part.start(&exe, &mut relays, watch)?;
    }
    drop(lines_tx);
    let store = EtcdStore::connect(&[etcd.to_string()], Duration::from_secs(5)).await?;
    let started = async {
        let addr: SocketAddr = loop {
            let line = lines
                .recv()
                .await
                .context("the router exited before serving")?;
            if let Some(addr) = line.strip_prefix("router serving on ") {
                break addr.trim().parse()?;
            }
        };
        let epoch = wait_active(&store, &args.cluster).await?;
        Ok::<_, anyhow::Error>((addr, epoch))
    };
    let outcome = tokio::select! {
        started = started => started.map(|(addr, epoch)| banner(addr, Path::new(&model), &epoch)),
        _ = shutdown.cancelled() => Ok(()),
        (i, status) = next_exit(&mut parts) => Err(anyhow!("{} exited while the cluster was starting ({status})", parts[i].name)),
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
            (i, status) = next_exit(parts) => {
                let part = &mut parts[i];
                part.child = None;
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

/// Resolves when a running part exits: its index and how it ended. Never, while none runs.
async fn next_exit(parts: &mut [Part]) -> (usize, String) {
    let waits: Vec<_> = parts
        .iter_mut()
        .enumerate()
        .filter_map(|(i, p)| p.child.as_mut().map(|c| (i, c)))
        .map(|(i, child)| {
            Box::pin(async move {
                let status = child.wait().await;
                (i, status.map_or_else(|e| e.to_string(), |s| s.to_string()))
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
