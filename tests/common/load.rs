//! Clients of a cluster under test: concurrent streams through the router, what each client
//! received (and when), and the one check every fault test makes: nothing was lost.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moebius_proto::v1::generate_request::Prompt;
use moebius_proto::v1::inference_client::InferenceClient;
use moebius_proto::v1::{FinishReason, GenerateRequest, SamplingParams, TokenIds};
use tokio::sync::Notify;
use tokio::task::JoinSet;

/// Prompt tokens of every request `requests` makes.
pub const PROMPT_LEN: u32 = 4;

/// `n` distinct requests of `max_new_tokens` each: greedy, or sampled at temperature 0.8 and
/// top-p 0.9 with a seed of their own.
pub fn requests(n: u32, max_new_tokens: u32, sampled: bool) -> Vec<GenerateRequest> {
    (0..n)
        .map(|i| GenerateRequest {
            prompt: Some(Prompt::TokenIds(TokenIds {
                ids: vec![0, 5 + i, 40 + 2 * i, 7],
            })),
            max_new_tokens,
            ignore_eos: true,
            sampling: Some(SamplingParams {
                temperature: if sampled { 0.8 } else { 0.0 },
                top_p: if sampled { 0.9 } else { 1.0 },
                top_k: 0,
                seed: sampled.then_some(1000 + u64::from(i)),
            }),
            ..Default::default()
        })
        .collect()
}

/// `n` greedy requests whose prompts repeat a few tokens (a skewed mix: most rows go to the
/// same experts), each still distinct in its last token.
pub fn skewed_requests(n: u32, max_new_tokens: u32) -> Vec<GenerateRequest> {
    (0..n)
        .map(|i| GenerateRequest {
            prompt: Some(Prompt::TokenIds(TokenIds {
                ids: vec![0, 5 + i % 2, 5 + i % 2, 9 + i],
            })),
            max_new_tokens,
            ignore_eos: true,
            ..Default::default()
        })
        .collect()
}

/// What one client received.
#[derive(Debug, Clone, Default)]
pub struct Received {
    pub tokens: Vec<u32>,
    pub finish_reason: i32,
    pub completion_tokens: Option<u32>,
    pub prompt_tokens: Option<u32>,
    /// The longest wait between two messages (or for the first one).
    pub longest_gap: Duration,
}

/// Streams that run concurrently.
pub struct Load {
    tasks: JoinSet<(usize, Result<Received, tonic::Status>)>,
    /// Streams that received their first message.
    started: Arc<(AtomicUsize, Notify)>,
    n: usize,
}

impl Load {
    /// Opens every request as a stream through the router at `addr`.
    pub fn start(addr: &str, requests: Vec<GenerateRequest>) -> Self {
        let started = Arc::new((AtomicUsize::new(0), Notify::new()));
        let mut tasks = JoinSet::new();
        let n = requests.len();
        for (i, request) in requests.into_iter().enumerate() {
            let (addr, started) = (format!("http://{addr}"), started.clone());
            tasks.spawn(async move { (i, stream(addr, request, started).await) });
        }
        Self { tasks, started, n }
    }

    /// Waits until every stream has received its first message.
    pub async fn wait_started(&self) {
        let (count, notify) = &*self.started;
        tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                let notified = notify.notified();
                if count.load(Ordering::SeqCst) >= self.n {
                    return;
                }
                notified.await;
            }
        })
        .await
        .expect("every stream started within 60 s");
    }

    /// Waits for every stream to end (at most two minutes) and returns what each received,
    /// in request order.
    pub async fn finish(mut self) -> Vec<Result<Received, tonic::Status>> {
        let mut out: Vec<Option<Result<Received, tonic::Status>>> = vec![None; self.n];
        let all = async {
            while let Some(joined) = self.tasks.join_next().await {
                let (i, result) = joined.expect("a client task panicked");
                out[i] = Some(result);
            }
        };
        tokio::time::timeout(Duration::from_secs(120), all)
            .await
            .expect("every stream ended within two minutes");
        out.into_iter()
            .map(|r| r.expect("every stream ran"))
            .collect()
    }
}

async fn stream(
    addr: String,
    request: GenerateRequest,
    started: Arc<(AtomicUsize, Notify)>,
) -> Result<Received, tonic::Status> {
    let mut client = InferenceClient::connect(addr)
        .await
        .map_err(|e| tonic::Status::unavailable(format!("cannot connect to the router: {e}")))?;
    let mut last = Instant::now();
    let mut got = Received::default();
    let mut stream = client.generate_stream(request).await?.into_inner();
    let mut first = true;
    while let Some(message) = stream.message().await? {
        got.longest_gap = got.longest_gap.max(last.elapsed());
        last = Instant::now();
        if first {
            first = false;
            started.0.fetch_add(1, Ordering::SeqCst);
            started.1.notify_waiters();
        }
        got.tokens.extend(message.token_ids);
        if message.finish_reason != 0 {
            got.finish_reason = message.finish_reason;
            got.completion_tokens = message.usage.map(|u| u.completion_tokens);
            got.prompt_tokens = message.usage.map(|u| u.prompt_tokens);
        }
    }
    Ok(got)
}

/// Runs `requests` to the end with no fault: the reference every fault run is held to.
pub async fn reference(addr: &str, requests: Vec<GenerateRequest>) -> Vec<Vec<u32>> {
    Load::start(addr, requests)
        .finish()
        .await
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            r.unwrap_or_else(|e| panic!("no-fault request {i} failed: {e:?}"))
                .tokens
        })
        .collect()
}

/// Nothing was lost: every stream completed, with exactly `max_new_tokens` tokens, those of
/// the no-fault run, and the usage of the whole request.
pub fn assert_nothing_lost(
    results: &[Result<Received, tonic::Status>],
    reference: &[Vec<u32>],
    max_new_tokens: u32,
) {
    assert_eq!(results.len(), reference.len());
    for (i, (result, want)) in results.iter().zip(reference).enumerate() {
        let got = match result {
            Ok(got) => got,
            Err(e) => panic!("request {i}: the client saw an error: {e:?}"),
        };
        assert_eq!(
            got.tokens.len(),
            max_new_tokens as usize,
            "request {i}: wrong number of tokens"
        );
        assert_eq!(
            &got.tokens, want,
            "request {i}: tokens differ from the no-fault run"
        );
        assert_eq!(
            got.finish_reason,
            FinishReason::Length as i32,
            "request {i}"
        );
        assert_eq!(got.completion_tokens, Some(max_new_tokens), "request {i}");
        assert_eq!(got.prompt_tokens, Some(PROMPT_LEN), "request {i}");
    }
}

/// The longest pause any client saw.
pub fn longest_gap(results: &[Result<Received, tonic::Status>]) -> Duration {
    results
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .map(|r| r.longest_gap)
        .max()
        .unwrap_or_default()
}
