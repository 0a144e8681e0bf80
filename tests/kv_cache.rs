//! The KV cache budget (`--kv-cache-tokens`) as `moebius up` runs it: more streams than the
//! workers' caches hold at once all complete with their own tokens, the metrics show the
//! preemptions it took, and a prompt that can never fit is refused with the reason.

mod common;

use common::load::{self, assert_nothing_lost, Load};
use common::up::Up;
use common::{fixture, http};
use moebius_coordinator::EtcdServer;
use moebius_proto::v1::generate_request::Prompt;
use moebius_proto::v1::inference_client::InferenceClient;
use moebius_proto::v1::{GenerateRequest, TokenIds};
use tonic::Code;

const MODEL: &str = "tiny-v3-yarn";
/// Each worker's cache: 3 blocks of 16 tokens, where one request takes 4 + 40 tokens.
const KV_CACHE_TOKENS: &str = "48";
const STREAMS: u32 = 10;
const TOKENS: u32 = 40;

/// The sum of the series of `name` (with its labels' opening brace, or a full series).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn more_streams_than_the_kv_cache_holds_all_get_their_tokens() {
    let up = Up::start_with(
        &fixture(MODEL),
        &["--workers", "2", "--kv-cache-tokens", KV_CACHE_TOKENS],
    );
    let addr = up.router_addr();
    let http = up.http_addr();
    let (_, text) = http::get(&http, "/metrics");
    assert_eq!(
        metric(&text, "moebius_worker_kv_cache_capacity_tokens{"),
        2.0 * 48.0,
        "{text}"
    );

    // Seeded sampling, so that a preempted stream must resume at the right draw. One at a
    // time, each request fits a cache alone: the run without preemption.
    let requests = load::requests(STREAMS, TOKENS, true);
    let mut reference = Vec::new();
    for request in &requests {
        reference.extend(load::reference(&addr, vec![request.clone()]).await);
    }
    let (_, text) = http::get(&http, "/metrics");
    assert_eq!(metric(&text, "moebius_worker_preemptions_total{"), 0.0);

    let results = Load::start(&addr, requests).finish().await;
    assert_nothing_lost(&results, &reference, TOKENS);
    let (_, text) = http::get(&http, "/metrics");
    let preemptions = metric(&text, "moebius_worker_preemptions_total{");
    assert!(
        preemptions > 0.0,
        "{STREAMS} streams of {} tokens fit two caches of {KV_CACHE_TOKENS} without preemption",
        TOKENS + load::PROMPT_LEN
    );

    // A prompt longer than a whole cache can never run: refused, naming the cache.
    assert_a_prompt_past_the_cache_is_refused(&addr).await;
}

/// A 49-token prompt, longer than a worker's whole cache of 48, is refused at once with
/// `INVALID_ARGUMENT`, naming the cache and its flag's size.
async fn assert_a_prompt_past_the_cache_is_refused(addr: &str) {
    let mut client = InferenceClient::connect(format!("http://{addr}"))
        .await
        .expect("router");
    let long = GenerateRequest {
        prompt: Some(Prompt::TokenIds(TokenIds {
            ids: (0..49).collect(),
        })),
        max_new_tokens: 4,
        ..Default::default()
    };
    let refused = match client.generate_stream(long).await {
        Err(status) => status,
        Ok(response) => {
            let mut stream = response.into_inner();
            loop {
                match stream.message().await {
                    Err(status) => break status,
                    Ok(Some(_)) => continue,
                    Ok(None) => panic!("a 49-token prompt ran in a 48-token cache"),
                }
            }
        }
    };
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("49 tokens of context do not fit this worker's KV cache of 48 tokens"),
        "{}",
        refused.message()
    );
}

/// `up --etcd`, where every worker is a process of its own, passes `--kv-cache-tokens` on to
/// each: a prompt past it is refused by the worker with the size given, and a request within it
/// completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn up_with_etcd_hands_the_kv_cache_budget_to_its_worker_processes() {
    let etcd = EtcdServer::start().expect("etcd starts (scripts/test.sh installs etcd-server)");
    let cluster = format!("kvcache{}", std::process::id());
    let up = Up::start(
        etcd.endpoint(),
        &cluster,
        &fixture(MODEL),
        &["--workers", "2", "--kv-cache-tokens", KV_CACHE_TOKENS],
    );
    let addr = up.router_addr();
    let requests = load::requests(2, TOKENS, true);
    let results = Load::start(&addr, requests.clone()).finish().await;
    let reference = load::reference(&addr, requests).await;
    assert_nothing_lost(&results, &reference, TOKENS);
    assert_a_prompt_past_the_cache_is_refused(&addr).await;
}
