//! The router over real gRPC sockets, in one process: a `MemoryStore` holds the topology, and
//! small fake workers (a tonic `Worker` server each, on their own runtime so that one can be
//! killed like a process) stream fixed tokens: `100 + i` for the i-th generated token.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moebius_coordinator::memory::MemoryStore;
use moebius_coordinator::{EpochRecord, EpochState, Keys, Placement, TopologyStore, WorkerInfo};
use moebius_proto::v1::generate_request::Prompt;
use moebius_proto::v1::inference_client::InferenceClient;
use moebius_proto::v1::worker_server::{Worker, WorkerServer};
use moebius_proto::v1::{
    FinishReason, GenerateRequest, GenerateResponse, SamplingParams, StatusRequest, StatusResponse,
    TokenIds, Usage, WorkerGenerateRequest,
};
use moebius_router::{RouterConfig, RouterError};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Server};
use tonic::{Code, Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const CLUSTER: &str = "test";

// ---------------------------------------------------------------------------------------------
// Fake worker

/// What a fake worker saw and how it behaves; shared with the test.
#[derive(Debug, Default)]
struct FakeState {
    received: AtomicUsize,
    active: AtomicUsize,
    max_active: AtomicUsize,
    completed: AtomicUsize,
    /// Streams whose client (the router) went away before the end.
    dropped: AtomicUsize,
    /// Pause before each token, in milliseconds.
    delay_ms: AtomicU64,
    /// Answer every request `RESOURCE_EXHAUSTED`.
    exhausted: AtomicBool,
    /// For every request received, how many tokens its client already had.
    resumed_at: std::sync::Mutex<Vec<u32>>,
    /// Fail every attempt with UNAVAILABLE after this many tokens (0: never).
    fail_after: AtomicU64,
}

#[derive(Debug, Clone)]
struct FakeService {
    id: String,
    state: Arc<FakeState>,
}

#[tonic::async_trait]
impl Worker for FakeService {
    type GenerateStream = ReceiverStream<Result<GenerateResponse, Status>>;

    async fn generate(
        &self,
        request: Request<WorkerGenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let state = Arc::clone(&self.state);
        state.received.fetch_add(1, Ordering::SeqCst);
        if state.exhausted.load(Ordering::SeqCst) {
            return Err(Status::resource_exhausted(format!(
                "worker {}: queue is full",
                self.id
            )));
        }
        let WorkerGenerateRequest { request, resume } = request.into_inner();
        let request = request.expect("the router sends the request");
        // A resubmitted request goes on after the tokens its client has.
        let start = resume.map_or(0, |r| r.token_ids.len() as u32);
        state.resumed_at.lock().expect("lock").push(start);
        if let Some(Prompt::TokenIds(ids)) = &request.prompt {
            if let Some(bad) = ids.ids.iter().find(|&&id| id >= 1000) {
                return Err(Status::invalid_argument(format!(
                    "prompt.token_ids: id {bad} is outside the vocabulary of 1000"
                )));
            }
        }
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let now = state.active.fetch_add(1, Ordering::SeqCst) + 1;
            state.max_active.fetch_max(now, Ordering::SeqCst);
            let n = request.max_new_tokens;
            let fail_after = state.fail_after.load(Ordering::SeqCst);
            let mut finished = true;
            for i in start..n {
                if fail_after > 0 && u64::from(i - start) == fail_after {
                    let _ = tx.send(Err(Status::unavailable("injected failure"))).await;
                    finished = false;
                    break;
                }
                let delay = Duration::from_millis(state.delay_ms.load(Ordering::SeqCst));
                tokio::select! {
                    _ = tx.closed() => { finished = false; break; }
                    _ = tokio::time::sleep(delay) => {}
                }
                let last = i + 1 == n;
                let message = GenerateResponse {
                    token_ids: vec![100 + i],
                    text: format!("<{}>", 100 + i),
                    logprobs: vec![-(i as f32) / 10.0],
                    finish_reason: if last {
                        FinishReason::Length as i32
                    } else {
                        FinishReason::Unspecified as i32
                    },
                    usage: last.then_some(Usage {
                        prompt_tokens: 3,
                        completion_tokens: n,
                    }),
                    request_id: request.request_id.clone(),
                    top_logprobs: Vec::new(),
                    tokens: Vec::new(),
                };
                if tx.send(Ok(message)).await.is_err() {
                    finished = false;
                    break;
                }
            }
            state.active.fetch_sub(1, Ordering::SeqCst);
            let counter = if finished {
                &state.completed
            } else {
                &state.dropped
            };
            counter.fetch_add(1, Ordering::SeqCst);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(StatusResponse {
            worker_id: self.id.clone(),
            active_sequences: self.state.active.load(Ordering::SeqCst) as u32,
            ..StatusResponse::default()
        }))
    }
}

/// A fake worker on its own runtime, so that [`FakeWorker::kill`] drops its sockets the way a
/// killed process does.
struct FakeWorker {
    id: String,
    addr: SocketAddr,
    state: Arc<FakeState>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl FakeWorker {
    fn start(id: &str) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(FakeState::default());
        let service = FakeService {
            id: id.to_string(),
            state: Arc::clone(&state),
        };
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            Server::builder()
                .add_service(WorkerServer::new(service))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
        });
        Self {
            id: id.to_string(),
            addr,
            state,
            runtime: Some(runtime),
        }
    }

    fn info(&self, capacity: u32) -> WorkerInfo {
        WorkerInfo {
            id: self.id.clone(),
            address: self.addr.to_string(),
            data_address: "127.0.0.1:1".into(),
            device: "cpu".into(),
            capacity,
            incarnation: 0,
        }
    }

    fn set_delay(&self, delay: Duration) {
        self.state
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Stops the worker at once: its tasks and connections vanish.
    fn kill(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for FakeWorker {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// A router in front of fake workers

struct Cluster {
    store: Arc<MemoryStore>,
    keys: Keys,
    workers: Vec<FakeWorker>,
    addr: SocketAddr,
    channel: Channel,
    shutdown: CancellationToken,
    router: Option<JoinHandle<Result<(), RouterError>>>,
}

impl Cluster {
    /// Starts `n` fake workers of `capacity` each, registers them, writes epoch 1 as active,
    /// starts a router, and waits until it routes.
    async fn start(n: usize, capacity: u32, config: RouterConfig) -> Self {
        let store = Arc::new(MemoryStore::new());
        let keys = Keys::new(CLUSTER);
        let workers: Vec<FakeWorker> = (0..n)
            .map(|i| FakeWorker::start(&format!("w{i}")))
            .collect();
        for worker in &workers {
            register(&*store, &keys, &worker.info(capacity)).await;
        }
        let infos: Vec<WorkerInfo> = workers.iter().map(|w| w.info(capacity)).collect();
        write_epoch(&*store, &keys, 1, EpochState::Active, &infos).await;

        let shutdown = CancellationToken::new();
        let (ready_tx, ready_rx) = oneshot::channel();
        let config = RouterConfig {
            cluster: CLUSTER.into(),
            listen: "127.0.0.1:0".parse().expect("addr"),
            ..config
        };
        let router = tokio::spawn(moebius_router::run(
            config,
            store.clone() as Arc<dyn TopologyStore>,
            shutdown.clone(),
            Some(ready_tx),
        ));
        let addr = ready_rx.await.expect("router reports its address").grpc;
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect()
            .await
            .expect("connect to the router");
        let cluster = Self {
            store,
            keys,
            workers,
            addr,
            channel,
            shutdown,
            router: Some(router),
        };
        if n > 0 {
            cluster.wait_health(ServingStatus::Serving).await;
        }
        cluster
    }

    fn client(&self) -> InferenceClient<Channel> {
        InferenceClient::new(self.channel.clone())
    }

    async fn health(&self) -> ServingStatus {
        let response = HealthClient::new(self.channel.clone())
            .check(HealthCheckRequest {
                service: "moebius.v1.Inference".into(),
            })
            .await
            .expect("health answers");
        response.into_inner().status()
    }

    async fn wait_health(&self, want: ServingStatus) {
        let until = Instant::now() + Duration::from_secs(5);
        loop {
            let status = self.health().await;
            if status == want {
                return;
            }
            assert!(
                Instant::now() < until,
                "health stayed {status:?}, want {want:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn stop(&mut self) -> Result<(), RouterError> {
        self.shutdown.cancel();
        let router = self.router.take().expect("running");
        tokio::time::timeout(Duration::from_secs(10), router)
            .await
            .expect("router stops")
            .expect("router task joins")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn register(store: &dyn TopologyStore, keys: &Keys, info: &WorkerInfo) {
    let value = serde_json::to_vec(info).expect("json");
    store
        .put(&keys.worker(&info.id), value, None)
        .await
        .expect("put worker");
}

async fn write_epoch(
    store: &dyn TopologyStore,
    keys: &Keys,
    epoch: u64,
    state: EpochState,
    workers: &[WorkerInfo],
) {
    let record = EpochRecord {
        epoch,
        state,
        workers: workers.to_vec(),
        placement: Placement::even(workers.len().max(1) * 2, workers.len().max(1))
            .expect("placement"),
    };
    let value = serde_json::to_vec(&record).expect("json");
    store
        .put(&keys.placement(), value, None)
        .await
        .expect("put placement");
}

fn request(max_new_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        prompt: Some(Prompt::TokenIds(TokenIds { ids: vec![1, 2, 3] })),
        max_new_tokens,
        ..GenerateRequest::default()
    }
}

fn with_timeout(request: GenerateRequest, timeout: Duration) -> Request<GenerateRequest> {
    let mut request = Request::new(request);
    request.set_timeout(timeout);
    request
}

/// Waits up to 2 s for `check` to hold.
async fn eventually(what: &str, check: impl Fn() -> bool) {
    let until = Instant::now() + Duration::from_secs(2);
    while !check() {
        assert!(Instant::now() < until, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unary_and_stream_give_the_same_tokens() {
    let mut cluster = Cluster::start(1, 8, RouterConfig::default()).await;
    let mut client = cluster.client();

    let whole = client
        .generate(request(5))
        .await
        .expect("generate")
        .into_inner();
    assert_eq!(whole.token_ids, [100, 101, 102, 103, 104]);
    assert_eq!(whole.text, "<100><101><102><103><104>");
    assert_eq!(whole.logprobs.len(), 5);
    assert_eq!(whole.finish_reason(), FinishReason::Length);
    assert_eq!(whole.usage.map(|u| u.completion_tokens), Some(5));
    assert!(
        !whole.request_id.is_empty(),
        "the router fills an empty request id"
    );

    let mut stream = client
        .generate_stream(GenerateRequest {
            request_id: "mine".into(),
            ..request(5)
        })
        .await
        .expect("generate_stream")
        .into_inner();
    let mut streamed = GenerateResponse::default();
    let mut messages = 0;
    while let Some(message) = stream.message().await.expect("message") {
        messages += 1;
        assert_eq!(message.request_id, "mine");
        streamed.token_ids.extend(message.token_ids);
        streamed.text.push_str(&message.text);
        streamed.logprobs.extend(message.logprobs);
        if message.finish_reason != 0 {
            streamed.finish_reason = message.finish_reason;
        }
        if message.usage.is_some() {
            streamed.usage = message.usage;
        }
    }
    assert_eq!(
        messages, 5,
        "one message per token, as the worker sent them"
    );
    assert_eq!(streamed.token_ids, whole.token_ids);
    assert_eq!(streamed.text, whole.text);
    assert_eq!(streamed.logprobs, whole.logprobs);
    assert_eq!(streamed.finish_reason, whole.finish_reason);
    assert_eq!(streamed.usage, whole.usage);
    assert_eq!(cluster.workers[0].state.completed.load(Ordering::SeqCst), 2);
    cluster.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn least_loaded_spreads_concurrent_requests() {
    let mut cluster = Cluster::start(2, 64, RouterConfig::default()).await;
    for worker in &cluster.workers {
        worker.set_delay(Duration::from_millis(20));
    }
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let mut client = cluster.client();
        calls.spawn(async move { client.generate(request(10)).await.map(|r| r.into_inner()) });
    }
    while let Some(call) = calls.join_next().await {
        let response = call.expect("joins").expect("generate");
        assert_eq!(response.token_ids.len(), 10);
    }
    let served: Vec<usize> = cluster
        .workers
        .iter()
        .map(|w| w.state.received.load(Ordering::SeqCst))
        .collect();
    assert_eq!(served.iter().sum::<usize>(), 16);
    // Requests overlap (10 tokens at 20 ms each), so the least-loaded pick splits them; races
    // between concurrent picks may shift one or two.
    assert!(
        served.iter().all(|&n| (6..=10).contains(&n)),
        "requests per worker: {served:?}"
    );
    cluster.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn all_workers_full_is_resource_exhausted() {
    // Capacity 1 each, advertised by the workers (no override).
    let mut cluster = Cluster::start(2, 1, RouterConfig::default()).await;
    for worker in &cluster.workers {
        worker.set_delay(Duration::from_millis(50));
    }
    let mut client = cluster.client();
    let first = client
        .generate_stream(request(100))
        .await
        .expect("first")
        .into_inner();
    let second = client
        .generate_stream(request(100))
        .await
        .expect("second")
        .into_inner();
    let err = client
        .generate(request(1))
        .await
        .expect_err("both workers are full");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message()
            .starts_with("all 2 workers are at capacity (2 requests in flight)"),
        "{}",
        err.message()
    );
    for worker in &cluster.workers {
        assert_eq!(worker.state.received.load(Ordering::SeqCst), 1);
    }
    // A place frees up when a client goes away.
    drop(first);
    let state = Arc::clone(&cluster.workers[0].state);
    let state1 = Arc::clone(&cluster.workers[1].state);
    eventually("a stream dropped", || {
        state.dropped.load(Ordering::SeqCst) + state1.dropped.load(Ordering::SeqCst) == 1
    })
    .await;
    let response = client.generate(request(1)).await.expect("room again");
    assert_eq!(response.into_inner().token_ids, [100]);
    drop(second);
    cluster.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_that_refuses_is_replaced_once() {
    let mut cluster = Cluster::start(2, 8, RouterConfig::default()).await;
    cluster.workers[0]
        .state
        .exhausted
        .store(true, Ordering::SeqCst);
    let mut client = cluster.client();
    for _ in 0..4 {
        let response = client.generate(request(2)).await.expect("served by w1");
        assert_eq!(response.into_inner().token_ids, [100, 101]);
    }
    assert_eq!(cluster.workers[1].state.completed.load(Ordering::SeqCst), 4);

    // With both refusing, the worker's own status comes back.
    cluster.workers[1]
        .state
        .exhausted
        .store(true, Ordering::SeqCst);
    let err = client.generate(request(2)).await.expect_err("both refuse");
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(
        err.message().ends_with("queue is full"),
        "{}",
        err.message()
    );
    cluster.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_is_invalid_argument_naming_the_field() {
    let mut cluster = Cluster::start(1, 8, RouterConfig::default()).await;
    let mut client = cluster.client();
    let sampling = |temperature: f32, top_p: f32| {
        Some(SamplingParams {
            temperature,
            top_p,
            ..SamplingParams::default()
        })
    };
    let cases = [
        (
            GenerateRequest {
                prompt: None,
                ..request(4)
            },
            "prompt",
        ),
        (request(0), "max_new_tokens"),
        (
            GenerateRequest {
                sampling: sampling(-0.5, 0.0),
                ..request(4)
            },
            "sampling.temperature",
        ),
        (
            GenerateRequest {
                sampling: sampling(f32::NAN, 0.0),
                ..request(4)
            },
            "sampling.temperature",
        ),
        (
            GenerateRequest {
                sampling: sampling(1.0, 1.01),
                ..request(4)
            },
            "sampling.top_p",
        ),
        (
            GenerateRequest {
                sampling: sampling(1.0, -0.2),
                ..request(4)
            },
            "sampling.top_p",
        ),
    ];
    for (bad, field) in cases {
        for streaming in [false, true] {
            let err = if streaming {
                client
                    .generate_stream(bad.clone())
                    .await
                    .map(|_| ())
                    .expect_err(field)
            } else {
                client
                    .generate(bad.clone())
                    .await
                    .map(|_| ())
                    .expect_err(field)
            };
            assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
            assert!(
                err.message().starts_with(field),
                "{field}: {}",
                err.message()
            );
        }
    }
    assert_eq!(
        cluster.workers[0].state.received.load(Ordering::SeqCst),
        0,
        "the router refused them without a worker"
    );

    // What only the model knows, the worker refuses; its status passes through unchanged.
    let out_of_vocab = GenerateRequest {
        prompt: Some(Prompt::TokenIds(TokenIds { ids: vec![5000] })),
        ..request(4)
    };
    let err = client
        .generate(out_of_vocab)
        .await
        .expect_err("outside the vocabulary");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        err.message(),
        "prompt.token_ids: id 5000 is outside the vocabulary of 1000"
    );
    cluster.stop().await.expect("clean stop");
}

/// Reads a stream to its end: every token, and the finish reason and usage of the last message.
async fn drain(
    stream: &mut tonic::Streaming<GenerateResponse>,
) -> Result<GenerateResponse, tonic::Status> {
    let mut whole = GenerateResponse::default();
    while let Some(message) = stream.message().await? {
        whole.token_ids.extend(message.token_ids);
        whole.text.push_str(&message.text);
        if message.finish_reason != 0 {
            whole.finish_reason = message.finish_reason;
            whole.usage = message.usage;
        }
    }
    Ok(whole)
}

fn tokens(n: u32) -> Vec<u32> {
    (100..100 + n).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_dying_mid_stream_loses_nothing() {
    let mut cluster = Cluster::start(2, 8, RouterConfig::default()).await;
    for w in &cluster.workers {
        w.set_delay(Duration::from_millis(20));
    }
    let mut client = cluster.client();
    // Both requests start on w0 (w1 is full for a moment).
    cluster.workers[1]
        .state
        .exhausted
        .store(true, Ordering::SeqCst);
    let mut stream = client
        .generate_stream(request(40))
        .await
        .expect("stream")
        .into_inner();
    let unary = {
        let mut client = cluster.client();
        tokio::spawn(async move { client.generate(request(40)).await })
    };
    let mut got = Vec::new();
    for _ in 0..5 {
        let message = stream.message().await.expect("tokens").expect("more");
        got.extend(message.token_ids);
    }
    eventually("both requests on w0", || {
        cluster.workers[0].state.active.load(Ordering::SeqCst) == 2
    })
    .await;
    cluster.workers[1]
        .state
        .exhausted
        .store(false, Ordering::SeqCst);
    cluster.workers[0].kill();

    let rest = drain(&mut stream).await.expect("the stream goes on on w1");
    got.extend(rest.token_ids.iter().copied());
    assert_eq!(got, tokens(40), "no token lost or repeated");
    assert_eq!(rest.finish_reason(), FinishReason::Length);
    assert_eq!(rest.usage.map(|u| u.completion_tokens), Some(40));
    let whole = unary
        .await
        .expect("joins")
        .expect("the unary call completes on w1")
        .into_inner();
    assert_eq!(whole.token_ids, tokens(40));
    assert_eq!(whole.text.matches('<').count(), 40);
    // w1 was asked to resume after what each client already had.
    let resumed = cluster.workers[1]
        .state
        .resumed_at
        .lock()
        .expect("lock")
        .clone();
    assert_eq!(resumed.len(), 2, "{resumed:?}");
    assert!(resumed.iter().all(|&n| n > 0 && n < 40), "{resumed:?}");
    cluster.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_that_leaves_the_group_hands_its_requests_over() {
    let mut cluster = Cluster::start(2, 8, RouterConfig::default()).await;
    for w in &cluster.workers {
        w.set_delay(Duration::from_millis(20));
    }
    cluster.workers[1]
        .state
        .exhausted
        .store(true, Ordering::SeqCst);
    let mut client = cluster.client();
    let mut stream = client
        .generate_stream(request(30))
        .await
        .expect("stream")
        .into_inner();
    let first = stream.message().await.expect("tokens").expect("first");
    cluster.workers[1]
        .state
        .exhausted
        .store(false, Ordering::SeqCst);
    // Epoch 2 leaves w0 out (the coordinator excluded it): its stream is given up at once,
    // although w0 itself goes on.
    let infos = vec![cluster.workers[1].info(8)];
    write_epoch(
        &*cluster.store,
        &cluster.keys,
        2,
        EpochState::Active,
        &infos,
    )
    .await;
    let rest = drain(&mut stream).await.expect("continues on w1");
    let mut got = first.token_ids;
    got.extend(rest.token_ids);
    assert_eq!(got, tokens(30));
    let w0 = Arc::clone(&cluster.workers[0].state);
    eventually("w0's stream dropped", || {
        w0.dropped.load(Ordering::SeqCst) == 1
    })
    .await;
    cluster.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resubmissions_are_bounded_by_the_migration_limit() {
    let config = RouterConfig {
        migration_limit: 2,
        ..RouterConfig::default()
    };
    let mut cluster = Cluster::start(2, 8, config).await;
    for w in &cluster.workers {
        // Every attempt fails with UNAVAILABLE after three tokens.
        w.state.fail_after.store(3, Ordering::SeqCst);
    }
    let mut client = cluster.client();
    let mut stream = client
        .generate_stream(request(40))
        .await
        .expect("stream")
        .into_inner();
    let mut got = Vec::new();
    let err = loop {
        match stream.message().await {
            Ok(Some(message)) => got.extend(message.token_ids),
            Ok(None) => panic!("every attempt fails; the stream cannot finish"),
            Err(status) => break status,
        }
    };
    // Three attempts (the first and two resubmissions), three tokens each, in order.
    assert_eq!(got, tokens(9));
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("--migration-limit"),
        "{}",
        err.message()
    );
    assert!(
        err.message().contains("injected failure"),
        "{}",
        err.message()
    );
    cluster.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_no_worker_left_a_request_is_unavailable_saying_so() {
    let config = RouterConfig {
        epoch_wait: Duration::from_millis(500),
        ..RouterConfig::default()
    };
    let mut cluster = Cluster::start(1, 8, config).await;
    cluster.workers[0].set_delay(Duration::from_millis(50));
    let mut client = cluster.client();
    let mut stream = client
        .generate_stream(request(1000))
        .await
        .expect("stream")
        .into_inner();
    stream.message().await.expect("tokens").expect("first");
    cluster.workers[0].kill();
    let err = tokio::time::timeout(Duration::from_secs(5), drain(&mut stream))
        .await
        .expect("an answer within the epoch wait")
        .expect_err("no worker is left");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("no live worker"),
        "{}",
        err.message()
    );
    // New requests are refused the same way, without dialling the dead worker every time.
    let err = client.generate(request(3)).await.expect_err("no worker");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("no live worker"),
        "{}",
        err.message()
    );
    cluster.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_deadline_and_cancel_drop_the_worker_stream() {
    let mut cluster = Cluster::start(1, 8, RouterConfig::default()).await;
    let state = Arc::clone(&cluster.workers[0].state);
    cluster.workers[0].set_delay(Duration::from_millis(50));
    let mut client = cluster.client();

    // Unary past its deadline.
    let err = client
        .generate(with_timeout(request(100), Duration::from_millis(300)))
        .await
        .expect_err("deadline");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    eventually("worker stream dropped (unary)", || {
        state.dropped.load(Ordering::SeqCst) == 1
    })
    .await;

    // Streaming past its deadline: tokens, then DEADLINE_EXCEEDED.
    let mut stream = client
        .generate_stream(with_timeout(request(100), Duration::from_millis(300)))
        .await
        .expect("stream")
        .into_inner();
    let mut tokens = 0;
    let err = loop {
        match stream.message().await {
            Ok(Some(message)) => tokens += message.token_ids.len(),
            Ok(None) => panic!("the stream ended before its 100 tokens"),
            Err(status) => break status,
        }
    };
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(
        tokens > 0 && tokens < 100,
        "{tokens} tokens before the deadline"
    );
    eventually("worker stream dropped (stream)", || {
        state.dropped.load(Ordering::SeqCst) == 2
    })
    .await;

    // A client that goes away.
    let mut stream = client
        .generate_stream(request(100))
        .await
        .expect("stream")
        .into_inner();
    stream.message().await.expect("a token").expect("more");
    drop(stream);
    eventually("worker stream dropped (cancel)", || {
        state.dropped.load(Ordering::SeqCst) == 3
    })
    .await;
    assert_eq!(state.completed.load(Ordering::SeqCst), 0);
    assert_eq!(state.active.load(Ordering::SeqCst), 0);
    cluster.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_router_request_timeout_caps_a_request() {
    let config = RouterConfig {
        request_timeout: Some(Duration::from_millis(200)),
        ..RouterConfig::default()
    };
    let mut cluster = Cluster::start(1, 8, config).await;
    cluster.workers[0].set_delay(Duration::from_millis(50));
    let err = cluster
        .client()
        .generate(request(100))
        .await
        .expect_err("capped");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    let state = Arc::clone(&cluster.workers[0].state);
    eventually("worker stream dropped", || {
        state.dropped.load(Ordering::SeqCst) == 1
    })
    .await;
    cluster.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_active_epoch_is_unavailable_and_waits_briefly() {
    let config = RouterConfig {
        epoch_wait: Duration::from_millis(300),
        ..RouterConfig::default()
    };
    let mut cluster = Cluster::start(1, 8, config).await;
    let infos = vec![cluster.workers[0].info(8)];
    write_epoch(
        &*cluster.store,
        &cluster.keys,
        2,
        EpochState::Pending,
        &infos,
    )
    .await;
    cluster.wait_health(ServingStatus::NotServing).await;

    let mut client = cluster.client();
    let err = client.generate(request(1)).await.expect_err("pending");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message()
            .starts_with("no active epoch: the cluster is re-forming"),
        "{}",
        err.message()
    );

    // A request that arrives while the epoch is pending is served once it turns active.
    let waiting = {
        let mut client = cluster.client();
        tokio::spawn(async move { client.generate(request(2)).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    write_epoch(
        &*cluster.store,
        &cluster.keys,
        2,
        EpochState::Active,
        &infos,
    )
    .await;
    let response = waiting
        .await
        .expect("joins")
        .expect("served after the epoch");
    assert_eq!(response.into_inner().token_ids, [100, 101]);
    cluster.wait_health(ServingStatus::Serving).await;
    cluster.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_whose_registration_vanishes_is_not_routed_to() {
    let config = RouterConfig {
        epoch_wait: Duration::from_millis(100),
        ..RouterConfig::default()
    };
    let mut cluster = Cluster::start(2, 8, config).await;
    cluster
        .store
        .delete(&cluster.keys.worker("w0"))
        .await
        .expect("delete");
    // The watch applies the deletion asynchronously; a few requests later, all go to w1.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = cluster.workers[0].state.received.load(Ordering::SeqCst);
    let mut client = cluster.client();
    for _ in 0..6 {
        client.generate(request(1)).await.expect("w1 serves");
    }
    assert_eq!(
        cluster.workers[0].state.received.load(Ordering::SeqCst),
        before
    );
    assert_eq!(cluster.workers[1].state.received.load(Ordering::SeqCst), 6);
    assert_eq!(cluster.health().await, ServingStatus::Serving);

    cluster
        .store
        .delete(&cluster.keys.worker("w1"))
        .await
        .expect("delete");
    cluster.wait_health(ServingStatus::NotServing).await;
    let err = client.generate(request(1)).await.expect_err("no worker");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    cluster.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reflection_lists_the_inference_service() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let mut cluster = Cluster::start(1, 8, RouterConfig::default()).await;
    let mut client = ServerReflectionClient::new(cluster.channel.clone());
    let ask = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = client
        .server_reflection_info(tokio_stream::iter([ask]))
        .await
        .expect("reflection")
        .into_inner();
    let answer = answers.message().await.expect("answer").expect("one");
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("not a service list: {answer:?}");
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"moebius.v1.Inference"), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");
    cluster.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_lets_in_flight_requests_finish() {
    let mut cluster = Cluster::start(1, 8, RouterConfig::default()).await;
    cluster.workers[0].set_delay(Duration::from_millis(20));
    let mut client = cluster.client();
    let mut stream = client
        .generate_stream(request(20))
        .await
        .expect("stream")
        .into_inner();
    stream.message().await.expect("a token").expect("more");
    let addr = cluster.addr;
    let state = Arc::clone(&cluster.workers[0].state);
    let read = async {
        let mut tokens = 1;
        while let Some(message) = stream.message().await.expect("the stream finishes") {
            tokens += message.token_ids.len();
        }
        tokens
    };
    let (stopped, tokens) = tokio::join!(cluster.stop(), read);
    stopped.expect("run returns Ok after draining");
    assert_eq!(tokens, 20);
    assert_eq!(state.completed.load(Ordering::SeqCst), 1);
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the router no longer accepts connections"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_cuts_off_requests_after_the_drain_timeout() {
    let config = RouterConfig {
        drain_timeout: Duration::from_millis(200),
        ..RouterConfig::default()
    };
    let mut cluster = Cluster::start(1, 8, config).await;
    cluster.workers[0].set_delay(Duration::from_millis(100));
    let mut client = cluster.client();
    let mut stream = client
        .generate_stream(request(1000))
        .await
        .expect("stream")
        .into_inner();
    stream.message().await.expect("a token").expect("more");
    let state = Arc::clone(&cluster.workers[0].state);
    let read = async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the stream ended as if complete"),
                Err(status) => break status,
            }
        }
    };
    let (stopped, err) = tokio::join!(cluster.stop(), read);
    stopped.expect("run returns Ok");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    eventually("worker stream dropped", || {
        state.dropped.load(Ordering::SeqCst) == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bench_calls_through_the_router_and_direct() {
    let mut cluster = Cluster::start(1, 64, RouterConfig::default()).await;
    let routed = moebius_router::bench_calls(&cluster.addr.to_string(), false, 4, 40)
        .await
        .expect("bench through the router");
    assert_eq!((routed.calls, routed.errors), (40, 0));
    assert!(routed.p50 <= routed.p99);
    let worker = cluster.workers[0].addr.to_string();
    let direct = moebius_router::bench_calls(&worker, true, 4, 40)
        .await
        .expect("bench direct");
    assert_eq!((direct.calls, direct.errors), (40, 0));
    cluster.stop().await.expect("clean stop");
}
