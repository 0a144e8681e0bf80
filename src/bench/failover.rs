//! `moebius bench failover`: what a client sees when a worker process dies under load.
//!
//! The benchmark runs the cluster the way a user does — `moebius up --etcd` on a throwaway etcd,
//! every part its own process — and drives it with `--streams` concurrent greedy streams twice:
//! once without a fault (the reference), then again with `kill -9` of one worker once every
//! stream has its first token and `--kill-after-ms` more have passed (`--fault stop` sends
//! SIGSTOP instead: a hung worker, noticed by the data-plane timeout). It reports:
//!
//! - **lost**: streams that failed or whose tokens differ from the reference run (must be 0);
//! - **stall**: for each stream still running at the kill, the longest wait between two token
//!   messages that ends after the kill; p50 / p99 / max over those streams, next to the normal
//!   inter-token latency of the same run before the kill;
//! - **kill to next epoch**: from the fault to the active placement without the failed worker;
//! - **migrated**: the sequences the failed worker held at the fault, each of which the router
//!   resubmitted to a survivor.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use moebius_coordinator::{
    EpochRecord, EpochState, EtcdServer, EtcdStore, Keys, TopologyStore, WorkerInfo,
};
use moebius_proto::v1::inference_client::InferenceClient;
use moebius_proto::v1::worker_client::WorkerClient;
use moebius_proto::v1::{GenerateRequest, StatusRequest};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use super::serve::Dist;

/// The cluster name the benchmark registers under in its own etcd.
const CLUSTER: &str = "failover";
/// The worker that is killed (`up` names its workers `worker-0`, `worker-1`, ...).
const VICTIM: &str = "worker-1";
/// How long the cluster may take to start, and a run to finish.
const PHASE_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    Kill,
    Stop,
}

impl Fault {
    fn signal(self) -> &'static str {
        match self {
            Self::Kill => "-KILL",
            Self::Stop => "-STOP",
        }
    }
}

/// Flags of `moebius bench failover`.
#[derive(Args, Debug)]
pub struct FailoverArgs {
    /// Checkpoint directory (default: the bundled demo model, fixtures/demo).
    #[arg(long, env = "MOEBIUS_MODEL")]
    model: Option<PathBuf>,
    /// Worker processes (at least 2: one is killed).
    #[arg(long, default_value_t = 3)]
    workers: usize,
    /// Concurrent streams.
    #[arg(long, default_value_t = 48)]
    streams: usize,
    /// Prompt length in tokens (random ids, seeded).
    #[arg(long, default_value_t = 8)]
    input_len: usize,
    /// Tokens each stream generates (`ignore_eos`).
    #[arg(long, default_value_t = 128)]
    output_len: u32,
    /// The fault: `kill` (SIGKILL, the process dies) or `stop` (SIGSTOP, the process hangs until
    /// the end of the run).
    #[arg(long, value_enum, default_value_t = Fault::Kill)]
    fault: Fault,
    /// How long after every stream's first token the worker is killed.
    #[arg(long, default_value_t = 200)]
    kill_after_ms: u64,
    /// Lease TTL of the parts, in seconds (`moebius up`'s default).
    #[arg(long, default_value_t = 5)]
    lease_ttl_secs: u64,
    /// CPU threads per worker for matrix products.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Prompt token ids are drawn from 2..VOCAB (inside the tiny checkpoints' vocabulary).
    #[arg(long, default_value_t = 400)]
    vocab: u32,
    /// Show the cluster's logs on stderr.
    #[arg(long)]
    verbose: bool,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run(args: FailoverArgs) -> Result<()> {
    if args.workers < 2 {
        bail!("--workers must be at least 2: one is killed and the others serve on");
    }
    if args.streams == 0 || args.output_len < 2 || args.input_len == 0 || args.vocab <= 2 {
        bail!(
            "--streams, --input-len must be at least 1, --output-len at least 2, --vocab above 2"
        );
    }
    let model = crate::cmd::up::resolve_model(args.model.as_deref())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(measure(&args, model))?;
    if args.json {
        println!("{report}");
    } else {
        print_report(&report);
    }
    match report["lost"].as_u64() {
        Some(0) => Ok(()),
        lost => bail!("{} requests were lost", lost.unwrap_or_default()),
    }
}

async fn measure(args: &FailoverArgs, model: PathBuf) -> Result<Value> {
    let etcd = EtcdServer::start().context("cannot start a throwaway etcd")?;
    let up = Up::start(args, &model, etcd.endpoint()).await?;
    let store = EtcdStore::connect(&[etcd.endpoint().to_string()], Duration::from_secs(5)).await?;
    let keys = Keys::new(CLUSTER);
    let before = active_epoch(&store, &keys).await?;
    let channel = Endpoint::from_shared(format!("http://{}", up.router))?
        .connect()
        .await
        .context("cannot reach the router")?;

    let requests = requests(args);
    eprintln!("failover: reference run of {} streams", requests.len());
    let reference = Streams::start(&channel, &requests).finish().await;
    if let Some((i, e)) = reference
        .iter()
        .enumerate()
        .find_map(|(i, r)| r.as_ref().err().map(|e| (i, e)))
    {
        bail!("stream {i} failed without a fault: {e}");
    }

    eprintln!(
        "failover: fault run: {} of {VICTIM} under load",
        args.fault.signal()
    );
    let streams = Streams::start(&channel, &requests);
    streams.wait_started().await;
    tokio::time::sleep(Duration::from_millis(args.kill_after_ms)).await;
    let migrated = held_sequences(&store, &keys).await?;
    let killed_at = Instant::now();
    signal(up.victim_pid, args.fault.signal()).await?;
    let next_epoch = tokio::spawn({
        let victim = VICTIM.to_string();
        async move { wait_epoch_without(&store, &keys, before.epoch, &victim).await }
    });
    let results = streams.finish().await;
    let to_epoch = tokio::time::timeout(PHASE_TIMEOUT, next_epoch)
        .await
        .context("no epoch without the killed worker formed")???;
    if args.fault == Fault::Stop {
        signal(up.victim_pid, "-CONT").await?;
    }
    up.stop().await;

    Ok(report(
        args,
        &reference,
        &results,
        killed_at,
        to_epoch.duration_since(killed_at),
        migrated,
    ))
}

/// `moebius up --etcd`, run as a child process as a user would. Dropped without [`Up::stop`]
/// (on an error), it is sent SIGTERM so that it stops its own children too.
struct Up {
    child: Child,
    router: String,
    victim_pid: u32,
}

impl Up {
    async fn start(args: &FailoverArgs, model: &std::path::Path, etcd: &str) -> Result<Self> {
        let exe = std::env::current_exe().context("cannot find the moebius binary")?;
        let mut child = Command::new(exe)
            .args(["up", "--etcd", etcd, "--cluster", CLUSTER])
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(["--http-listen", "127.0.0.1:0"])
            .args(["--workers", &args.workers.to_string()])
            .args(["--threads", &args.threads.to_string()])
            .args(["--lease-ttl-secs", &args.lease_ttl_secs.to_string()])
            .arg("--model")
            .arg(model)
            .stdout(Stdio::piped())
            .stderr(if args.verbose {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .context("cannot start moebius up")?;
        let stdout = child.stdout.take().context("up's stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let (mut router, mut victim_pid) = (None, None);
        let started = async {
            while let Some(line) = lines.next_line().await? {
                if let Some(addr) = line.strip_prefix("[router] router serving on ") {
                    router = Some(addr.trim().to_string());
                }
                if let Some(pid) = line
                    .strip_prefix(&format!("[up] started {VICTIM} (pid "))
                    .and_then(|rest| rest.strip_suffix(')'))
                {
                    victim_pid = pid.parse().ok();
                }
                if line.starts_with("epoch ") && line.contains(" active with ") {
                    return Ok(());
                }
            }
            Err(anyhow!("moebius up exited before its cluster was active"))
        };
        tokio::time::timeout(PHASE_TIMEOUT, started)
            .await
            .context("moebius up did not start in time")??;
        // The rest of up's output is not needed; keep draining it so that up never blocks.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self {
            child,
            router: router.context("up did not print the router's address")?,
            victim_pid: victim_pid.with_context(|| format!("up did not print {VICTIM}'s pid"))?,
        })
    }

    /// Stops `up` the way Ctrl-C does, so that it stops its children.
    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = signal(pid, "-TERM").await;
        }
        if tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
        }
    }
}

async fn signal(pid: u32, signal: &str) -> Result<()> {
    let status = Command::new("kill")
        .arg(signal)
        .arg(pid.to_string())
        .status()
        .await?;
    if !status.success() {
        bail!("kill {signal} {pid} failed ({status})");
    }
    Ok(())
}

async fn active_epoch(store: &EtcdStore, keys: &Keys) -> Result<EpochRecord> {
    let kv = store
        .get(&keys.placement())
        .await?
        .context("no placement in etcd")?;
    let record: EpochRecord = serde_json::from_slice(&kv.value)?;
    if record.state != EpochState::Active {
        bail!("the placement is not active");
    }
    Ok(record)
}

/// When the first active epoch after `after` without `victim` was seen (polled every 5 ms).
async fn wait_epoch_without(
    store: &EtcdStore,
    keys: &Keys,
    after: u64,
    victim: &str,
) -> Result<Instant> {
    loop {
        if let Ok(record) = active_epoch(store, keys).await {
            if record.epoch > after && record.rank_of(victim).is_none() {
                return Ok(Instant::now());
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The sequences the victim holds (active and queued), from its own status.
async fn held_sequences(store: &EtcdStore, keys: &Keys) -> Result<u32> {
    let kv = store
        .get(&keys.worker(VICTIM))
        .await?
        .with_context(|| format!("{VICTIM} is not registered"))?;
    let info: WorkerInfo = serde_json::from_slice(&kv.value)?;
    let status = WorkerClient::connect(format!("http://{}", info.address))
        .await?
        .status(StatusRequest {})
        .await?
        .into_inner();
    Ok(status.active_sequences + status.queued_requests)
}

fn requests(args: &FailoverArgs) -> Vec<GenerateRequest> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    (0..args.streams)
        .map(|_| {
            let prompt = (0..args.input_len)
                .map(|_| rng.random_range(2..args.vocab))
                .collect();
            super::serve::request(prompt, args.output_len)
        })
        .collect()
}

/// What one stream received, and when each message with tokens arrived.
#[derive(Debug, Default)]
struct Received {
    tokens: Vec<u32>,
    arrivals: Vec<Instant>,
}

/// Concurrent streams through the router.
struct Streams {
    tasks: JoinSet<(usize, Result<Received, String>)>,
    started: Arc<(AtomicUsize, Notify)>,
    n: usize,
}

impl Streams {
    fn start(channel: &Channel, requests: &[GenerateRequest]) -> Self {
        let started = Arc::new((AtomicUsize::new(0), Notify::new()));
        let mut tasks = JoinSet::new();
        for (i, request) in requests.iter().cloned().enumerate() {
            let client = InferenceClient::new(channel.clone());
            let started = started.clone();
            tasks.spawn(async move { (i, stream(client, request, &started).await) });
        }
        Self {
            tasks,
            started,
            n: requests.len(),
        }
    }

    async fn wait_started(&self) {
        let (count, notify) = &*self.started;
        while count.load(Ordering::Acquire) < self.n {
            let notified = notify.notified();
            if count.load(Ordering::Acquire) >= self.n {
                break;
            }
            let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
        }
    }

    async fn finish(mut self) -> Vec<Result<Received, String>> {
        let mut out: Vec<Result<Received, String>> =
            (0..self.n).map(|_| Err("not run".into())).collect();
        let all = async {
            while let Some(done) = self.tasks.join_next().await {
                if let Ok((i, result)) = done {
                    out[i] = result;
                }
            }
        };
        if tokio::time::timeout(PHASE_TIMEOUT, all).await.is_err() {
            self.tasks.abort_all();
        }
        out
    }
}

async fn stream(
    mut client: InferenceClient<Channel>,
    request: GenerateRequest,
    started: &(AtomicUsize, Notify),
) -> Result<Received, String> {
    let status = |s: tonic::Status| format!("{:?}: {}", s.code(), s.message());
    let mut messages = client
        .generate_stream(request)
        .await
        .map_err(status)?
        .into_inner();
    let mut got = Received::default();
    while let Some(message) = messages.message().await.map_err(status)? {
        if message.token_ids.is_empty() {
            continue;
        }
        if got.arrivals.is_empty() {
            started.0.fetch_add(1, Ordering::AcqRel);
            started.1.notify_waiters();
        }
        got.arrivals.push(Instant::now());
        got.tokens.extend(message.token_ids);
    }
    Ok(got)
}

fn report(
    args: &FailoverArgs,
    reference: &[Result<Received, String>],
    results: &[Result<Received, String>],
    killed_at: Instant,
    kill_to_epoch: Duration,
    migrated: u32,
) -> Value {
    let mut lost = Vec::new();
    let (mut stalls, mut before_gaps) = (Vec::new(), Vec::new());
    for (i, (got, want)) in results.iter().zip(reference).enumerate() {
        let want = want.as_ref().map(|r| &r.tokens).ok();
        match got {
            Err(e) => lost.push(format!("stream {i}: {e}")),
            Ok(r) if Some(&r.tokens) != want => {
                lost.push(format!("stream {i}: tokens differ from the no-fault run"))
            }
            Ok(r) => {
                let gaps = r.arrivals.windows(2).map(|w| (w[1], w[1] - w[0]));
                let mut stall = None::<Duration>;
                for (end, gap) in gaps {
                    if end > killed_at {
                        stall = Some(stall.map_or(gap, |s| s.max(gap)));
                    } else {
                        before_gaps.push(gap.as_secs_f64());
                    }
                }
                stalls.extend(stall.map(|s| s.as_secs_f64()));
            }
        }
    }
    let stall = Dist::of(&stalls).scaled(1000.0);
    let max = stalls.iter().copied().fold(0.0, f64::max) * 1000.0;
    json!({
        "fault": format!("{:?}", args.fault).to_lowercase(),
        "workers": args.workers,
        "streams": args.streams,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "lease_ttl_secs": args.lease_ttl_secs,
        "lost": lost.len(),
        "lost_detail": lost,
        "streams_running_at_kill": stalls.len(),
        "migrated": migrated,
        "stall_ms": {"p50": stall.p50, "p99": stall.p99, "max": max},
        "itl_before_kill_ms": Dist::of(&before_gaps).scaled(1000.0).json(),
        "kill_to_next_epoch_ms": kill_to_epoch.as_secs_f64() * 1000.0,
    })
}

fn print_report(r: &Value) {
    let ms = |v: &Value| v.as_f64().unwrap_or(0.0);
    println!(
        "{} of one of {} workers under {} streams ({} tokens each)",
        r["fault"].as_str().unwrap_or_default(),
        r["workers"],
        r["streams"],
        r["output_len"]
    );
    println!("requests lost:            {}", r["lost"]);
    for detail in r["lost_detail"].as_array().into_iter().flatten() {
        println!("  {}", detail.as_str().unwrap_or_default());
    }
    println!(
        "migrated:                 {} (sequences the failed worker held)",
        r["migrated"]
    );
    println!(
        "stall around the kill:    p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} streams running)",
        ms(&r["stall_ms"]["p50"]),
        ms(&r["stall_ms"]["p99"]),
        ms(&r["stall_ms"]["max"]),
        r["streams_running_at_kill"]
    );
    println!(
        "inter-token before kill:  p50 {:.1} ms, p99 {:.1} ms",
        ms(&r["itl_before_kill_ms"]["p50"]),
        ms(&r["itl_before_kill_ms"]["p99"])
    );
    println!(
        "kill to next epoch:       {:.1} ms",
        ms(&r["kill_to_next_epoch_ms"])
    );
}
