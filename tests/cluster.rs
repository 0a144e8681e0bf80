//! End-to-end: a real etcd, a coordinator, three workers and a router, each a process,
//! exercised over gRPC the way a user would.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::load::{self, assert_nothing_lost, Load};
use common::{fixture, Cluster, LEASE_TTL_SECS};
use moebius_proto::v1::generate_request::Prompt;
use moebius_proto::v1::{
    FinishReason, GenerateRequest, GenerateResponse, SamplingParams, StatusRequest, TokenIds,
};
use tokio_stream::StreamExt;
use tonic::Code;

const MODEL: &str = "tiny-v3-yarn";

fn ids_request(ids: &[u32], max_new_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        prompt: Some(Prompt::TokenIds(TokenIds { ids: ids.to_vec() })),
        max_new_tokens,
        ignore_eos: true,
        logprobs: true,
        sampling: Some(SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
        }),
        ..Default::default()
    }
}

/// A short greedy-sized request with the given sampling temperature and top-p.
fn sampled(temperature: f32, top_p: f32) -> GenerateRequest {
    GenerateRequest {
        sampling: Some(SamplingParams {
            temperature,
            top_p,
            top_k: 0,
            seed: None,
        }),
        ..ids_request(&[0, 5], 4)
    }
}

/// What `moebius generate` prints for the same prompt, in one process.
fn reference(ids: &[u32], max_new_tokens: u32) -> (Vec<u32>, Vec<f32>) {
    let ids_arg = ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let out = Command::new(env!("CARGO_BIN_EXE_moebius"))
        .args([
            "generate",
            "--model",
            fixture(MODEL).to_str().expect("utf-8"),
            "--prompt-ids",
            &ids_arg,
        ])
        .args([
            "--max-new-tokens",
            &max_new_tokens.to_string(),
            "--ignore-eos",
            "--json",
        ])
        .output()
        .expect("moebius generate runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let tokens = v["token_ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|t| t.as_u64().expect("id") as u32)
        .collect();
    let lps = v["logprobs"]
        .as_array()
        .expect("lps")
        .iter()
        .map(|t| t.as_f64().expect("lp") as f32)
        .collect();
    (tokens, lps)
}

fn assert_close(ours: &[f32], theirs: &[f32], tol: f32, what: &str) {
    assert_eq!(ours.len(), theirs.len(), "{what}: lengths differ");
    for (a, b) in ours.iter().zip(theirs) {
        assert!((a - b).abs() < tol, "{what}: {a} vs {b}");
    }
}

async fn collect(
    mut stream: tonic::Streaming<GenerateResponse>,
) -> Result<GenerateResponse, tonic::Status> {
    let mut all = GenerateResponse::default();
    while let Some(msg) = stream.next().await {
        let msg = msg?;
        all.token_ids.extend(msg.token_ids);
        all.logprobs.extend(msg.logprobs);
        all.text.push_str(&msg.text);
        if msg.finish_reason != 0 {
            all.finish_reason = msg.finish_reason;
            all.usage = msg.usage;
        }
    }
    Ok(all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_three_worker_cluster_serves_rejects_bad_input_and_survives_a_kill() {
    let mut cluster = Cluster::start(&fixture(MODEL), 3, 64);
    let epoch = cluster.wait_active(3, Duration::from_secs(30));
    eprintln!("epoch active: {epoch}");

    // The topology is readable JSON in etcd.
    let dump = cluster.etcdctl_get("/moebius", true);
    for key in [
        "/workers/w0",
        "/workers/w1",
        "/workers/w2",
        "/placement",
        "/coordinator/leader",
    ] {
        assert!(
            dump.contains(&format!("/moebius/{}{key}", cluster.cluster)),
            "etcd lacks {key}:\n{dump}"
        );
    }
    let worker_json =
        cluster.etcdctl_get(&format!("/moebius/{}/workers/w0", cluster.cluster), false);
    let value: serde_json::Value =
        serde_json::from_str(worker_json.lines().nth(1).expect("value line"))
            .expect("worker value is JSON");
    assert_eq!(value["id"], "w0");

    // Health.
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", cluster.router_addr))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health answers")
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // Same tokens and logprobs as one process, unary and streaming.
    let prompt = [0u32, 17, 250, 31, 99, 4, 12];
    let (want_tokens, want_lps) = reference(&prompt, 10);
    let mut client = cluster.client().await;
    let unary = client
        .generate(ids_request(&prompt, 10))
        .await
        .expect("Generate succeeds")
        .into_inner();
    assert_eq!(unary.token_ids, want_tokens);
    assert_close(&unary.logprobs, &want_lps, 1e-4, "unary logprobs");
    assert_eq!(unary.finish_reason, FinishReason::Length as i32);
    assert_eq!(
        unary.usage.map(|u| (u.prompt_tokens, u.completion_tokens)),
        Some((7, 10))
    );
    let stream = client
        .generate_stream(ids_request(&prompt, 10))
        .await
        .expect("stream starts")
        .into_inner();
    let streamed = collect(stream).await.expect("stream completes");
    assert_eq!(streamed.token_ids, want_tokens);
    assert_close(&streamed.logprobs, &want_lps, 1e-4, "streamed logprobs");

    // 16 concurrent streams all finish, and the workers batched them.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..16u32 {
        let mut c = client.clone();
        tasks.spawn(async move {
            let req = ids_request(&[0, 5 + i, 40 + i, 7], 12);
            let s = c.generate_stream(req).await?.into_inner();
            collect(s).await
        });
    }
    let mut done = 0;
    while let Some(r) = tasks.join_next().await {
        let r = r.expect("task").expect("stream completes");
        assert_eq!(r.token_ids.len(), 12);
        done += 1;
    }
    assert_eq!(done, 16);
    let mut max_batch = 0;
    for i in 0..3 {
        let s = cluster
            .worker_client(i)
            .await
            .status(StatusRequest {})
            .await
            .expect("status")
            .into_inner();
        max_batch = max_batch.max(s.max_batch);
    }
    assert!(
        max_batch > 1,
        "16 concurrent streams should share steps, max batch was {max_batch}"
    );

    // Bad input: INVALID_ARGUMENT naming the field.
    let bad: Vec<(GenerateRequest, &str)> = vec![
        (
            GenerateRequest {
                max_new_tokens: 4,
                ..Default::default()
            },
            "prompt",
        ),
        (ids_request(&[], 4), "prompt"),
        (ids_request(&[0, 99999], 4), "outside the vocabulary"),
        (ids_request(&[0, 5], 0), "max_new_tokens"),
        (ids_request(&[0, 5], 100_000), "max_new_tokens"),
        (sampled(-1.0, 1.0), "temperature"),
        (sampled(f32::NAN, 1.0), "temperature"),
        (sampled(1.0, 1.5), "top_p"),
        (
            GenerateRequest {
                prompt: Some(Prompt::Text(String::new())),
                max_new_tokens: 4,
                ..Default::default()
            },
            "prompt",
        ),
    ];
    for (req, field) in bad {
        let err = client
            .generate(req.clone())
            .await
            .expect_err("bad input is refused");
        assert_eq!(err.code(), Code::InvalidArgument, "{req:?}: {err:?}");
        assert!(
            err.message().contains(field),
            "{req:?}: message {:?} should name {field}",
            err.message()
        );
    }

    // A cancelled stream and an expired deadline free their sequences.
    let stream = client
        .generate_stream(ids_request(&[0, 9, 9, 9], 200))
        .await
        .expect("stream")
        .into_inner();
    drop(stream);
    let mut req = tonic::Request::new(ids_request(&[0, 8, 8, 8], 200));
    req.set_timeout(Duration::from_millis(50));
    let err = client.generate(req).await.expect_err("deadline expires");
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );
    let start = Instant::now();
    loop {
        let mut active = 0;
        for i in 0..3 {
            let s = cluster
                .worker_client(i)
                .await
                .status(StatusRequest {})
                .await
                .expect("status")
                .into_inner();
            active += s.active_sequences + s.queued_requests;
        }
        if active == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{active} sequences still live 5 s after cancel"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // kill -9 of one worker: every in-flight stream completes with the tokens of the no-fault
    // run. Sequences on the survivors keep their KV caches; those on the dead worker migrate.
    let requests = load::requests(12, 200, false);
    let reference = load::reference(&cluster.router_addr, requests.clone()).await;
    let running = Load::start(&cluster.router_addr, requests);
    running.wait_started().await;
    cluster.workers[1].kill();
    let results = running.finish().await;
    assert_nothing_lost(&results, &reference, 200);
    eprintln!(
        "longest pause a client saw: {:?}",
        load::longest_gap(&results)
    );

    // ...and within the lease TTL plus a few seconds, the placement covers every expert on the
    // two survivors and new calls succeed there at once.
    let placement = cluster.wait_active(2, Duration::from_secs(LEASE_TTL_SECS + 15));
    let placed = common::placed_experts(&placement);
    assert_eq!(
        placed,
        (0..10).collect::<Vec<u64>>(),
        "every expert is placed on the survivors"
    );
    let after = client
        .generate(ids_request(&prompt, 10))
        .await
        .expect("a new call succeeds on the survivors")
        .into_inner();
    assert_eq!(
        after.token_ids, want_tokens,
        "the survivors compute the same tokens"
    );
    assert_close(&after.logprobs, &want_lps, 1e-4, "logprobs after the kill");
}
