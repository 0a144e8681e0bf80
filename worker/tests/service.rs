//! The worker as a network service: real gRPC over sockets, several workers in one process on
//! one `MemoryStore`, the TCP data plane between them, and this test playing the coordinator
//! (it writes the epoch records, waits for the acknowledgements, and activates them).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moebius_coordinator::{
    EpochRecord, EpochState, Keys, LoadStats, MemoryStore, Placement, SuspectReport, TopologyStore,
    WorkerInfo,
};
use moebius_proto::v1 as pb;
use moebius_proto::v1::generate_request::Prompt;
use moebius_proto::v1::worker_client::WorkerClient;
use moebius_worker::engine::{run_group, FinishReason, GenerateRequest, GroupOptions, LoadedModel};
use moebius_worker::service::{self, WorkerConfig};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::Code;

const FIXTURE: &str = "tiny-v3-yarn";
const EXPERTS: usize = 10;
/// MoE layers of the fixture.
const MOE_LAYERS: usize = 2;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures")
        .join(FIXTURE)
}

/// Workers of one cluster in this process, and the store they share.
struct Cluster {
    store: Arc<MemoryStore>,
    keys: Keys,
    infos: Vec<WorkerInfo>,
    addrs: Vec<SocketAddr>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<moebius_worker::Result<()>>>,
}

impl Cluster {
    async fn start(n: usize, capacity: u32) -> Self {
        let store = Arc::new(MemoryStore::new());
        let cluster = format!("test-{}", rand_suffix());
        let keys = Keys::new(&cluster);
        let shutdown = CancellationToken::new();
        let mut infos = Vec::new();
        let mut addrs = Vec::new();
        let mut tasks = Vec::new();
        for i in 0..n {
            let config = WorkerConfig {
                id: format!("w{i}"),
                cluster: cluster.clone(),
                model_dir: fixture(),
                capacity,
                token_budget: 16,
                threads: 1,
                lease_ttl: Duration::from_secs(2),
                drain_timeout: Duration::from_secs(2),
                stats_interval: Duration::from_millis(100),
                ..WorkerConfig::default()
            };
            config.validate().expect("test config is valid");
            let worker = service::start(config, store.clone(), shutdown.child_token())
                .await
                .expect("worker starts");
            addrs.push(worker.grpc_addr());
            tasks.push(tokio::spawn(worker.wait()));
            let kv = store
                .get(&keys.worker(&format!("w{i}")))
                .await
                .expect("store")
                .expect("the worker registered itself");
            let info: WorkerInfo = serde_json::from_slice(&kv.value).expect("WorkerInfo JSON");
            assert_eq!(info.address, format!("127.0.0.1:{}", addrs[i].port()));
            infos.push(info);
        }
        Self {
            store,
            keys,
            infos,
            addrs,
            shutdown,
            tasks,
        }
    }

    /// Writes epoch `epoch` over `members` (indices into the workers) with `placement`, waits
    /// for every member's acknowledgement, and activates it, as the coordinator would.
    async fn epoch(&self, epoch: u64, members: &[usize], placement: Placement) {
        let record = self.propose(epoch, members, placement).await;
        self.activate(record).await;
    }

    /// Writes epoch `epoch` as Pending and waits for every member's acknowledgement.
    async fn propose(&self, epoch: u64, members: &[usize], placement: Placement) -> EpochRecord {
        let record = EpochRecord {
            epoch,
            state: EpochState::Pending,
            workers: members.iter().map(|&i| self.infos[i].clone()).collect(),
            placement,
        };
        let key = self.keys.placement();
        let json = |r: &EpochRecord| serde_json::to_vec(r).expect("record JSON");
        self.store
            .put(&key, json(&record), None)
            .await
            .expect("put");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (ready, _) = self
                .store
                .get_prefix(&self.keys.ready_prefix(epoch))
                .await
                .expect("get");
            if ready.len() == members.len() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "epoch {epoch}: only {} of {} workers acknowledged",
                ready.len(),
                members.len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        record
    }

    /// Marks a proposed epoch Active by compare-and-swap.
    async fn activate(&self, mut record: EpochRecord) {
        let key = self.keys.placement();
        let json = |r: &EpochRecord| serde_json::to_vec(r).expect("record JSON");
        let current = self.store.get(&key).await.expect("get").expect("placement");
        record.state = EpochState::Active;
        let swapped = self
            .store
            .compare_and_swap(&key, current.mod_revision, json(&record), None)
            .await
            .expect("cas");
        assert!(swapped, "nobody else writes the placement in this test");
    }

    async fn client(&self, i: usize) -> WorkerClient<Channel> {
        WorkerClient::connect(format!("http://{}", self.addrs[i]))
            .await
            .expect("connect to the worker")
    }

    /// Waits until worker `i` reports `epoch` and reports itself serving.
    async fn wait_serving(&self, i: usize, epoch: u64) {
        let channel = Channel::from_shared(format!("http://{}", self.addrs[i]))
            .expect("uri")
            .connect()
            .await
            .expect("connect");
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
        let mut worker = WorkerClient::new(channel);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let status = worker
                .status(pb::StatusRequest {})
                .await
                .expect("status")
                .into_inner();
            let serving = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: "moebius.v1.Worker".into(),
                })
                .await
                .expect("health")
                .into_inner()
                .status
                == tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
            if status.epoch == epoch && serving {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "worker {i} never served epoch {epoch}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Kills worker `i` like a crash: its tasks and engine stop, its lease is left to expire.
    fn kill(&self, i: usize) {
        self.tasks[i].abort();
    }

    async fn stop(self) {
        self.shutdown.cancel();
        for task in self.tasks {
            let joined = tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .expect("worker stops within 20 s");
            match joined {
                Ok(result) => result.expect("clean shutdown"),
                Err(e) => assert!(e.is_cancelled(), "worker task panicked: {e}"),
            }
        }
    }
}

fn rand_suffix() -> u64 {
    use std::time::SystemTime;
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn ids_request(prompt: Vec<u32>, max_new_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: Some(Prompt::TokenIds(pb::TokenIds { ids: prompt })),
        max_new_tokens,
        ignore_eos: true,
        logprobs: true,
        top_logprobs: 5,
        ..Default::default()
    }
}

#[derive(Debug, Default)]
struct Collected {
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    top: Vec<pb::TopLogprobs>,
    text: String,
    finish: i32,
    usage: Option<pb::Usage>,
    messages: usize,
}

async fn generate(
    client: &mut WorkerClient<Channel>,
    request: pb::GenerateRequest,
) -> Result<Collected, tonic::Status> {
    let mut stream = client
        .generate(pb::WorkerGenerateRequest::from(request))
        .await?
        .into_inner();
    let mut out = Collected::default();
    while let Some(msg) = stream.message().await? {
        out.messages += 1;
        out.tokens.extend(&msg.token_ids);
        out.logprobs.extend(&msg.logprobs);
        out.top.extend(msg.top_logprobs);
        out.text.push_str(&msg.text);
        if msg.finish_reason != 0 {
            out.finish = msg.finish_reason;
            out.usage = msg.usage;
        }
    }
    Ok(out)
}

/// The reference: the same requests through `run_group` in this process.
fn reference(requests: Vec<GenerateRequest>) -> Vec<moebius_worker::engine::GenerateOutput> {
    let model = LoadedModel::open(&fixture(), 1).expect("fixture loads");
    let options = GroupOptions {
        ranks: 1,
        threads: 1,
        token_budget: 16,
        ..GroupOptions::default()
    };
    run_group(&model, &options, requests, |_, _| {})
        .expect("reference run")
        .0
}

/// Waits until worker `i`'s status counts `rows` routed rows in every MoE layer.
async fn wait_load(cluster: &Cluster, i: usize, rows: u64) -> pb::StatusResponse {
    let mut client = cluster.client(i).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = client
            .status(pb::StatusRequest {})
            .await
            .expect("status")
            .into_inner();
        let sums: Vec<u64> = status
            .expert_load
            .iter()
            .map(|l| l.tokens.iter().sum())
            .collect();
        if !sums.is_empty() && sums.iter().all(|&s| s == rows) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "worker {i} counts {sums:?} rows per layer, not {rows}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn prompts() -> Vec<Vec<u32>> {
    vec![
        vec![0, 17, 42, 99],
        (0..23).map(|i| (i * 13 + 5) % 448).collect(),
        (0..40).map(|i| (i * 31 + 7) % 448).collect(),
    ]
}

async fn wait_idle(client: &mut WorkerClient<Channel>, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let s = client
            .status(pb::StatusRequest {})
            .await
            .expect("status")
            .into_inner();
        if s.active_sequences == 0 && s.queued_requests == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} sequences still active, {} queued after {within:?}",
            s.active_sequences,
            s.queued_requests
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn generate_over_grpc_matches_run_group() {
    let cluster = Cluster::start(2, 64).await;
    cluster
        .epoch(1, &[0, 1], Placement::even(EXPERTS, 2).expect("placement"))
        .await;
    cluster.wait_serving(0, 1).await;
    cluster.wait_serving(1, 1).await;

    let n = 12;
    let want = reference(
        prompts()
            .into_iter()
            .map(|p| GenerateRequest {
                ignore_eos: true,
                top_logprobs: 5,
                ..GenerateRequest::greedy(p, n)
            })
            .collect(),
    );
    for (i, prompt) in prompts().into_iter().enumerate() {
        // Alternate the worker that takes the request: both ranks serve.
        let mut client = cluster.client(i % 2).await;
        let got = generate(&mut client, ids_request(prompt.clone(), n as u32))
            .await
            .expect("generation succeeds");
        assert_eq!(got.tokens, want[i].token_ids, "prompt {i}");
        let diff = got
            .logprobs
            .iter()
            .zip(&want[i].logprobs)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(diff < 1e-4, "prompt {i}: logprobs differ by {diff}");
        assert_eq!(got.top.len(), n);
        for (t, w) in got.top.iter().zip(&want[i].top_logprobs) {
            assert_eq!(t.token_ids, w.iter().map(|x| x.0).collect::<Vec<_>>());
        }
        assert_eq!(got.finish, pb::FinishReason::Length as i32);
        let usage = got.usage.expect("usage on the last message");
        assert_eq!(usage.prompt_tokens as usize, prompt.len());
        assert_eq!(usage.completion_tokens as usize, n);
        assert!(
            !got.text.is_empty(),
            "the fixture has a tokenizer: text deltas"
        );
    }

    // A text prompt is tokenised by the worker (BOS first) and gives the same tokens as its ids.
    let tokenizer = moebius_worker::tokenizer::Tokenizer::from_dir(&fixture(), Some(0))
        .expect("tokenizer")
        .expect("fixture has tokenizer.json");
    let ids = tokenizer.encode("hello world").expect("encode");
    let mut client = cluster.client(0).await;
    let by_text = generate(
        &mut client,
        pb::GenerateRequest {
            prompt: Some(Prompt::Text("hello world".into())),
            ..ids_request(Vec::new(), 6)
        },
    )
    .await
    .expect("text prompt");
    let by_ids = generate(&mut client, ids_request(ids.clone(), 6))
        .await
        .expect("id prompt");
    assert_eq!(by_text.tokens, by_ids.tokens);
    assert_eq!(
        by_text.usage.map(|u| u.prompt_tokens),
        Some(ids.len() as u32)
    );
    assert_eq!(
        by_text.text,
        tokenizer.decode(&by_text.tokens).expect("decode")
    );

    // A stop string: the text ends right before it, with finish reason STOP.
    let full = generate(&mut client, ids_request(vec![0, 17, 42, 99], 24))
        .await
        .expect("full");
    let chars: Vec<char> = full.text.chars().collect();
    assert!(
        chars.len() >= 8,
        "the fixture decodes to some text: {:?}",
        full.text
    );
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let cut = full.text.find(&stop).expect("stop string occurs");
    let stopped = generate(
        &mut client,
        pb::GenerateRequest {
            stop: vec![stop.clone()],
            ..ids_request(vec![0, 17, 42, 99], 24)
        },
    )
    .await
    .expect("stopped");
    assert_eq!(
        stopped.finish,
        pb::FinishReason::Stop as i32,
        "stop {stop:?}"
    );
    assert_eq!(stopped.text, full.text[..cut]);
    assert!(stopped.tokens.len() < full.tokens.len());
    assert_eq!(stopped.tokens[..], full.tokens[..stopped.tokens.len()]);
    cluster.stop().await;
}

/// A KV cache too small for the requests together: prompts wait, the newest sequences give
/// their blocks to older ones and prefill again, and every request still gets the tokens (and,
/// to rounding, the log-probabilities) it gets from a cache that holds them all; seeded
/// sampling too.
#[test]
fn a_small_kv_cache_preempts_and_every_request_gets_its_tokens() {
    let requests: Vec<GenerateRequest> = (0..8u32)
        .map(|i| {
            let prompt: Vec<u32> = (0..4 + 5 * i).map(|t| (t * 13 + 7 * i + 5) % 448).collect();
            let mut request = GenerateRequest {
                ignore_eos: true,
                ..GenerateRequest::greedy(prompt, 24)
            };
            if i % 2 == 1 {
                request.sampling.temperature = 0.8;
                request.sampling.top_p = 0.9;
                request.sampling.seed = Some(u64::from(i));
            }
            request
        })
        .collect();
    let model = LoadedModel::open(&fixture(), 1).expect("fixture loads");
    let run = |kv_cache_tokens| {
        let options = GroupOptions {
            ranks: 2,
            threads: 1,
            token_budget: 16,
            kv_cache_tokens,
            ..GroupOptions::default()
        };
        run_group(&model, &options, requests.clone(), |_, _| {}).expect("every request runs")
    };
    let (want, roomy) = run(None);
    assert_eq!(roomy.stats[0].preemptions, 0);
    // 80 tokens: 5 blocks of 16, where the longest request alone needs 4 (39 + 24 tokens).
    let (got, tight) = run(Some(80));
    assert!(
        tight.stats[0].preemptions > 0,
        "the small cache never preempted: {:?}",
        tight.stats[0]
    );
    for (i, (got, want)) in got.iter().zip(&want).enumerate() {
        assert_eq!(got.token_ids, want.token_ids, "request {i}");
        assert_eq!(got.finish_reason, Some(FinishReason::Length), "request {i}");
        let diff = got
            .logprobs
            .iter()
            .zip(&want.logprobs)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(diff < 1e-4, "request {i}: logprobs differ by {diff}");
    }
    // The preempted sequences were prefilled again.
    assert!(tight.stats[0].prefill_tokens > roomy.stats[0].prefill_tokens);
}

/// A request that can never fit the KV cache is refused with an error that names the cache;
/// one whose prompt fits but whose generation would not ends with `length` when it fills the
/// cache, as at the model's last position.
#[test]
fn the_kv_cache_bounds_a_request_like_the_context_window() {
    let model = LoadedModel::open(&fixture(), 1).expect("fixture loads");
    let options = GroupOptions {
        threads: 1,
        kv_cache_tokens: Some(40),
        ..GroupOptions::default()
    };
    let prompt: Vec<u32> = (0..20).collect();
    let (out, _) = run_group(
        &model,
        &options,
        vec![GenerateRequest {
            ignore_eos: true,
            ..GenerateRequest::greedy(prompt, 50)
        }],
        |_, _| {},
    )
    .expect("the prompt fits");
    // 40 tokens are 2 blocks of 16: 32 cached tokens, and the token sampled after the last.
    assert_eq!(out[0].token_ids.len(), 32 - 20 + 1);
    assert_eq!(out[0].finish_reason, Some(FinishReason::Length));

    let err = run_group(
        &model,
        &options,
        vec![GenerateRequest::greedy((0..33).collect(), 4)],
        |_, _| {},
    )
    .expect_err("33 tokens do not fit 32");
    let message = err.to_string();
    assert!(
        matches!(err, moebius_worker::Error::InvalidRequest(_))
            && message
                .contains("33 tokens of context do not fit this worker's KV cache of 32 tokens"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_streams_all_finish_in_shared_batches() {
    let cluster = Cluster::start(2, 64).await;
    cluster
        .epoch(1, &[0, 1], Placement::even(EXPERTS, 2).expect("placement"))
        .await;
    cluster.wait_serving(0, 1).await;
    let client = cluster.client(0).await;
    let streams = 16;
    let handles: Vec<_> = (0..streams)
        .map(|i| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let prompt = vec![0, (i * 7 % 448) as u32, 5, 9];
                generate(&mut client, ids_request(prompt, 20)).await
            })
        })
        .collect();
    for h in handles {
        let got = h.await.expect("task").expect("every stream finishes");
        assert_eq!(got.tokens.len(), 20);
        assert_eq!(got.finish, pb::FinishReason::Length as i32);
    }
    let status = cluster
        .client(0)
        .await
        .status(pb::StatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert!(status.max_batch > 1, "max_batch {}", status.max_batch);
    assert_eq!(status.worker_id, "w0");
    assert_eq!(status.epoch, 1);
    assert_eq!(status.rank, 0);
    assert_eq!(status.expert_slots, vec![0, 1, 2, 3, 4]);
    assert!(status.expert_bytes > 0);
    assert_eq!(status.active_sequences, 0);

    // Every row of w0's own sequences was counted once per expert it went to, in each MoE
    // layer: 16 streams × (4 prompt tokens + 19 fed-back tokens) × top-3. w1 routed nothing
    // of its own.
    let rows = 16 * (4 + 19) * 3;
    let load = wait_load(&cluster, 0, rows).await;
    assert_eq!(load.expert_load.len(), MOE_LAYERS);
    assert!(load.load_window_seconds > 0.0);
    let w1 = wait_load(&cluster, 1, 0).await;
    assert_eq!(w1.expert_load.len(), MOE_LAYERS);
    // ...and the same counts are published under stats/w0 for the balancer.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = cluster
            .store
            .get(&cluster.keys.stats("w0"))
            .await
            .expect("get");
        let stats: Option<LoadStats> =
            stats.map(|kv| serde_json::from_slice(&kv.value).expect("LoadStats"));
        if let Some(s) = stats.filter(|s| s.tokens.iter().all(|l| l.iter().sum::<u64>() == rows)) {
            assert_eq!(
                (s.id.as_str(), s.epoch, s.tokens.len()),
                ("w0", 1, MOE_LAYERS)
            );
            break;
        }
        assert!(Instant::now() < deadline, "stats/w0 never showed the load");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_inputs_are_invalid_argument_naming_the_field() {
    let cluster = Cluster::start(1, 64).await;
    cluster
        .epoch(1, &[0], Placement::even(EXPERTS, 1).expect("placement"))
        .await;
    cluster.wait_serving(0, 1).await;
    let mut client = cluster.client(0).await;
    let ok = ids_request(vec![0, 5, 6], 4);
    let sampling = |temperature: f32, top_p: f32| pb::GenerateRequest {
        sampling: Some(pb::SamplingParams {
            temperature,
            top_p,
            ..Default::default()
        }),
        ..ok.clone()
    };
    let cases: Vec<(pb::GenerateRequest, &str)> = vec![
        (
            pb::GenerateRequest {
                prompt: None,
                ..ok.clone()
            },
            "prompt",
        ),
        (ids_request(Vec::new(), 4), "prompt.token_ids"),
        (
            pb::GenerateRequest {
                prompt: Some(Prompt::Text(String::new())),
                ..ok.clone()
            },
            "prompt.text",
        ),
        (ids_request(vec![0, 448], 4), "prompt token id 448"),
        (ids_request(vec![0, 5], 0), "max_new_tokens"),
        (ids_request(vec![0, 5], 255), "max_new_tokens"),
        (sampling(-1.0, 1.0), "temperature"),
        (sampling(f32::NAN, 1.0), "temperature"),
        (sampling(0.5, 1.5), "top_p"),
        (sampling(0.5, -0.1), "top_p"),
        (
            pb::GenerateRequest {
                stop: vec!["x".into(), String::new()],
                ..ok.clone()
            },
            "stop[1]",
        ),
        (
            pb::GenerateRequest {
                stop_token_ids: vec![9999],
                ..ok.clone()
            },
            "stop token id",
        ),
    ];
    for (request, field) in cases {
        let err = generate(&mut client, request.clone())
            .await
            .expect_err("bad input is refused");
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(err.message().contains(field), "{field}: {}", err.message());
    }
    // top_p 0 is proto3's "unset": it means 1 and is accepted.
    generate(&mut client, sampling(0.0, 0.0))
        .await
        .expect("top_p 0 means unset");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admission_cancellation_and_deadlines() {
    let cluster = Cluster::start(1, 2).await;
    // Before any epoch the worker serves nothing.
    let mut client = cluster.client(0).await;
    let err = generate(&mut client, ids_request(vec![0, 5], 4))
        .await
        .expect_err("no epoch yet");
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("not in the active epoch"), "{err:?}");

    cluster
        .epoch(1, &[0], Placement::even(EXPERTS, 1).expect("placement"))
        .await;
    cluster.wait_serving(0, 1).await;

    // Capacity 2: two long streams in flight, the third is refused.
    let mut a = client
        .generate(pb::WorkerGenerateRequest::from(ids_request(
            vec![0, 1, 2],
            250,
        )))
        .await
        .expect("first")
        .into_inner();
    let mut b = client
        .generate(pb::WorkerGenerateRequest::from(ids_request(
            vec![0, 3, 4],
            250,
        )))
        .await
        .expect("second")
        .into_inner();
    a.message().await.expect("a streams").expect("a message");
    b.message().await.expect("b streams").expect("b message");
    let err = generate(&mut client, ids_request(vec![0, 5], 4))
        .await
        .expect_err("over capacity");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");

    // Dropping the client streams frees their sequences within a second.
    drop(a);
    drop(b);
    wait_idle(&mut client, Duration::from_secs(1)).await;
    generate(&mut client, ids_request(vec![0, 5], 4))
        .await
        .expect("capacity is free again");

    // A deadline ends the stream with DEADLINE_EXCEEDED and frees the sequence.
    let mut request = tonic::Request::new(pb::WorkerGenerateRequest::from(ids_request(
        vec![0, 7, 8],
        250,
    )));
    request.set_timeout(Duration::from_millis(50));
    let started = Instant::now();
    let result = async {
        let mut s = client.generate(request).await?.into_inner();
        while s.message().await?.is_some() {}
        Ok::<_, tonic::Status>(())
    }
    .await;
    if let Err(e) = result {
        assert!(
            matches!(e.code(), Code::DeadlineExceeded | Code::Cancelled),
            "{e:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    wait_idle(&mut client, Duration::from_secs(1)).await;
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_epoch_change_mid_generation_loses_nothing() {
    let prompt: Vec<u32> = (0..8).map(|i| (i * 37 + 3) % 448).collect();
    let n = 240;
    let want = reference(vec![GenerateRequest {
        ignore_eos: true,
        ..GenerateRequest::greedy(prompt.clone(), n)
    }]);

    let cluster = Cluster::start(3, 64).await;
    cluster
        .epoch(1, &[0, 1], Placement::even(EXPERTS, 2).expect("placement"))
        .await;
    cluster.wait_serving(0, 1).await;
    // w2 is not in epoch 1: it refuses requests.
    let err = generate(&mut cluster.client(2).await, ids_request(vec![0, 5], 4))
        .await
        .expect_err("not in the epoch");
    assert_eq!(err.code(), Code::Unavailable);

    let mut client = cluster.client(0).await;
    let mut stream = client
        .generate(pb::WorkerGenerateRequest::from(ids_request(
            prompt, n as u32,
        )))
        .await
        .expect("generate")
        .into_inner();
    let mut tokens = Vec::new();
    let first = stream
        .message()
        .await
        .expect("stream")
        .expect("first message");
    tokens.extend(first.token_ids);
    // Epoch 2: three ranks, each with a different (strided) set of slots, and a redundant
    // copy of expert 0 on the new rank.
    // The first MoE layer differs from the others.
    let strided = vec![vec![0, 3, 6, 9], vec![1, 4, 7], vec![2, 5, 8, 0]];
    let shifted = vec![vec![0, 1, 2, 3], vec![4, 5, 6, 9], vec![7, 8, 9]];
    let placement = Placement {
        num_experts: EXPERTS,
        layers: (0..MOE_LAYERS)
            .map(|l| {
                if l == 0 {
                    strided.clone()
                } else {
                    shifted.clone()
                }
            })
            .collect(),
    };
    let record = cluster.propose(2, &[0, 1, 2], placement).await;
    // Every member acknowledged, so every rank has paused and installed epoch 2; the sequence
    // is still there, halfway through.
    let paused = client
        .status(pb::StatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!((paused.epoch, paused.active_sequences), (2, 1));
    cluster.activate(record).await;
    let mut finish = 0;
    let mut during = 0;
    while let Some(msg) = stream
        .message()
        .await
        .expect("stream survives the epoch change")
    {
        tokens.extend(msg.token_ids);
        during += 1;
        finish = msg.finish_reason;
    }
    assert!(during > 0, "the generation was still running at the change");
    assert_eq!(finish, pb::FinishReason::Length as i32);
    assert_eq!(
        tokens, want[0].token_ids,
        "tokens differ from a run without the change"
    );
    for i in 0..3 {
        cluster.wait_serving(i, 2).await;
    }
    let status = client
        .status(pb::StatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!((status.epoch, status.rank), (2, 0));
    assert_eq!(status.expert_slots, vec![0, 3, 6, 9]);
    let layers: Vec<Vec<u32>> = status
        .layer_slots
        .iter()
        .map(|l| l.experts.clone())
        .collect();
    assert_eq!(layers[0], [0, 3, 6, 9]);
    assert_eq!(layers[1..], vec![vec![0, 1, 2, 3]; MOE_LAYERS - 1]);
    // w0 held experts 0-4 in every layer: of its new slots, only 6 and 9 in the first layer
    // were read; 0 and 3 there, and 0-3 everywhere else, were kept.
    assert_eq!(
        (status.slots_loaded, status.slots_kept),
        (2, 2 + 4 * (MOE_LAYERS as u32 - 1))
    );
    // The new rank serves too, with the same results.
    let mut c2 = cluster.client(2).await;
    let got = generate(&mut c2, ids_request(vec![0, 17, 42, 99], 12))
        .await
        .expect("the new rank serves");
    let want = reference(vec![GenerateRequest {
        ignore_eos: true,
        ..GenerateRequest::greedy(vec![0, 17, 42, 99], 12)
    }]);
    assert_eq!(got.tokens, want[0].token_ids);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_survivor_keeps_its_sequence_through_a_dead_peer_and_reports_it() {
    let prompt = vec![0, 1, 2];
    let n = 250;
    let want = reference(vec![GenerateRequest {
        ignore_eos: true,
        ..GenerateRequest::greedy(prompt.clone(), n)
    }]);
    let cluster = Cluster::start(2, 64).await;
    cluster
        .epoch(1, &[0, 1], Placement::even(EXPERTS, 2).expect("placement"))
        .await;
    cluster.wait_serving(0, 1).await;
    let mut client = cluster.client(0).await;
    let mut stream = client
        .generate(pb::WorkerGenerateRequest::from(ids_request(
            prompt, n as u32,
        )))
        .await
        .expect("generate")
        .into_inner();
    let mut tokens = stream
        .message()
        .await
        .expect("stream")
        .expect("first message")
        .token_ids;
    cluster.kill(1);

    // The survivor reports its group's failure at once, blaming the dead worker.
    let key = cluster.keys.suspect("w0");
    let deadline = Instant::now() + Duration::from_secs(10);
    let report: SuspectReport = loop {
        if let Some(kv) = cluster.store.get(&key).await.expect("get") {
            break serde_json::from_slice(&kv.value).expect("report JSON");
        }
        assert!(Instant::now() < deadline, "w0 reported nothing");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!((report.epoch, report.suspects), (1, vec!["w1".to_string()]));
    let paused = client
        .status(pb::StatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(paused.active_sequences, 1, "the sequence is kept");

    // Epoch 2 without the dead worker: the stream goes on as if nothing happened.
    cluster
        .epoch(2, &[0], Placement::even(EXPERTS, 1).expect("placement"))
        .await;
    while let Some(msg) = stream.message().await.expect("no error reaches the client") {
        tokens.extend(msg.token_ids);
    }
    assert_eq!(
        tokens, want[0].token_ids,
        "tokens differ from a run without the fault"
    );
    let got = generate(&mut client, ids_request(vec![0, 17, 42, 99], 12))
        .await
        .expect("serves in epoch 2");
    let want = reference(vec![GenerateRequest {
        ignore_eos: true,
        ..GenerateRequest::greedy(vec![0, 17, 42, 99], 12)
    }]);
    assert_eq!(got.tokens, want[0].token_ids);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_excluded_worker_ends_its_sequences_and_registers_anew() {
    let cluster = Cluster::start(2, 64).await;
    cluster
        .epoch(1, &[0, 1], Placement::even(EXPERTS, 2).expect("placement"))
        .await;
    cluster.wait_serving(1, 1).await;
    let mut client = cluster.client(1).await;
    let mut stream = client
        .generate(pb::WorkerGenerateRequest::from(ids_request(
            vec![0, 1, 2],
            250,
        )))
        .await
        .expect("generate")
        .into_inner();
    stream
        .message()
        .await
        .expect("stream")
        .expect("first message");
    let before = cluster
        .store
        .get(&cluster.keys.worker("w1"))
        .await
        .expect("get")
        .expect("registered");

    // Epoch 2 leaves w1 out (as a leader does after confirming a suspect).
    cluster
        .epoch(2, &[0], Placement::even(EXPERTS, 1).expect("placement"))
        .await;
    let err = loop {
        match stream.message().await {
            Ok(Some(_)) => {}
            Ok(None) => panic!("an excluded worker must not finish the request"),
            Err(e) => break e,
        }
    };
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("excluded"), "{}", err.message());
    // It registers as a new member: a new key with a new incarnation.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = cluster
            .store
            .get(&cluster.keys.worker("w1"))
            .await
            .expect("get");
        if let Some(kv) = now {
            let (old, new): (WorkerInfo, WorkerInfo) = (
                serde_json::from_slice(&before.value).expect("json"),
                serde_json::from_slice(&kv.value).expect("json"),
            );
            if kv.create_revision > before.create_revision {
                assert_ne!(old.incarnation, new.incarnation);
                break;
            }
        }
        assert!(Instant::now() < deadline, "w1 did not register anew");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let err = generate(&mut client, ids_request(vec![0, 5], 4))
        .await
        .expect_err("w1 is in no epoch");
    assert_eq!(err.code(), Code::Unavailable);
    cluster.stop().await;
}
