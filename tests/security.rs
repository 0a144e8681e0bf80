//! Securing a cluster as an operator does: `moebius certs`, etcd serving TLS that asks for
//! client certificates, and `moebius up --etcd https://… --self-signed-tls DIR --api-key-file
//! F`. Then every part refuses the clients that are not the cluster's (no TLS, another CA, no
//! client certificate, no or a wrong API key), the cluster serves its own, and junk on 200
//! data-plane connections changes no token. And each limit on a request gets its error.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::up::{pid_of, Up};
use common::{fixture, http, rss_bytes};
use moebius_coordinator::tls::{Tls, TlsFiles};
use moebius_coordinator::{EtcdServer, EtcdStore, Keys, TopologyStore, WorkerInfo};
use moebius_proto::v1::generate_request::Prompt;
use moebius_proto::v1::inference_client::InferenceClient;
use moebius_proto::v1::{GenerateRequest, SamplingParams, TokenIds};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::Code;

const MODEL: &str = "tiny-v3";
const KEY: &str = "sk-moebius-test-0123456789";
const TOKENS: u32 = 8;
/// Connections of junk sent to the data plane.
const JUNK_CONNECTIONS: usize = 200;
/// How much a worker's resident memory may grow while the junk arrives.
const JUNK_RSS_BOUND: u64 = 64 << 20;

/// One test at a time: each starts a cluster on a machine of two cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn moebius(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moebius"))
        .args(args)
        .output()
        .expect("moebius runs")
}

fn files(dir: &Path) -> TlsFiles {
    TlsFiles {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
        ca: dir.join("ca.pem"),
        server_name: None,
    }
}

fn request(i: u32) -> GenerateRequest {
    GenerateRequest {
        prompt: Some(Prompt::TokenIds(TokenIds {
            ids: vec![0, 5 + i, 40 + 2 * i, 7],
        })),
        max_new_tokens: TOKENS,
        ignore_eos: true,
        sampling: Some(SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        }),
        ..GenerateRequest::default()
    }
}

/// A channel to `addr`: over TLS with `tls`, plaintext without.
async fn channel(addr: &str, tls: Option<ClientTlsConfig>) -> Result<Channel, tonic::Status> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .expect("a URI")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(60));
    let endpoint = match tls {
        Some(tls) => endpoint.tls_config(tls).expect("a TLS config"),
        None => endpoint,
    };
    endpoint
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("cannot connect: {e:?}")))
}

/// One unary call through the router at `addr`, with `key` as a bearer token when given.
async fn generate(
    addr: &str,
    tls: Option<ClientTlsConfig>,
    key: Option<&str>,
    request: GenerateRequest,
) -> Result<Vec<u32>, tonic::Status> {
    let mut client = InferenceClient::new(channel(addr, tls).await?);
    let mut request = tonic::Request::new(request);
    if let Some(key) = key {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {key}").parse().expect("ascii"),
        );
    }
    Ok(client.generate(request).await?.into_inner().token_ids)
}

/// The gRPC health status of `addr` for `service`.
async fn health(
    addr: &str,
    tls: Option<ClientTlsConfig>,
    service: &str,
) -> Result<i32, tonic::Status> {
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel(addr, tls).await?);
    let reply = client
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        })
        .await?;
    Ok(reply.into_inner().status)
}

/// TLS that trusts the CA of `dir` and shows no client certificate.
fn trust_only(dir: &Path) -> ClientTlsConfig {
    let ca = std::fs::read(dir.join("ca.pem")).expect("ca.pem");
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("127.0.0.1")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_secured_cluster_serves_its_own_and_refuses_everyone_else() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (certs, other) = (dir.path().join("certs"), dir.path().join("other"));
    for d in [&certs, &other] {
        let out = moebius(&["certs", d.to_str().expect("utf-8")]);
        assert!(out.status.success(), "moebius certs: {out:?}");
    }
    let keys = dir.path().join("api-keys");
    std::fs::write(&keys, format!("# the test's key\n{KEY}\n")).expect("keys");
    let ours = Tls::load(&files(&certs)).expect("the generated files load");
    let theirs = Tls::load(&files(&other)).expect("the other CA's files load");

    let etcd = EtcdServer::start_tls(&files(&certs)).expect("etcd starts with TLS");
    assert!(etcd.endpoint().starts_with("https://"));
    let cluster = format!("secure{}", std::process::id());
    let up = Up::start(
        etcd.endpoint(),
        &cluster,
        &fixture(MODEL),
        &[
            "--workers",
            "2",
            "--self-signed-tls",
            certs.to_str().expect("utf-8"),
            "--api-key-file",
            keys.to_str().expect("utf-8"),
        ],
    );
    let worker_pids: Vec<u32> = (0..2)
        .map(|_| pid_of(&up.next_line("a worker's pid", |l| l.starts_with("[up] started worker-"))))
        .collect();
    let router = up.router_addr();
    let admin = up.admin_addr();
    let http = up.http_addr();
    let client = || Some(ours.grpc_client());

    // The router serves a client that trusts the CA and sends a key.
    let reference: Vec<Vec<u32>> = {
        let mut all = Vec::new();
        for i in 0..6 {
            let tokens = generate(&router, client(), Some(KEY), request(i))
                .await
                .expect("the cluster serves over TLS with the key");
            assert_eq!(tokens.len(), TOKENS as usize);
            all.push(tokens);
        }
        all
    };

    // The router refuses: no TLS, another CA, no key, a wrong key.
    let plain = generate(&router, None, Some(KEY), request(0)).await;
    assert!(plain.is_err(), "a plaintext client was served: {plain:?}");
    let foreign = generate(&router, Some(theirs.grpc_client()), Some(KEY), request(0)).await;
    assert_eq!(
        foreign.map_err(|s| s.code()),
        Err(Code::Unavailable),
        "a client of another CA"
    );
    let no_key = generate(&router, client(), None, request(0))
        .await
        .expect_err("no key");
    assert_eq!(no_key.code(), Code::Unauthenticated, "{no_key:?}");
    assert!(
        no_key.message().contains("authorization: Bearer"),
        "{no_key:?}"
    );
    let wrong = generate(
        &router,
        client(),
        Some("sk-moebius-test-0123456788"),
        request(0),
    )
    .await
    .expect_err("a wrong key");
    assert_eq!(wrong.code(), Code::Unauthenticated, "{wrong:?}");
    assert_eq!(wrong.message(), "the API key is not valid");
    // Health stays open to anyone who trusts the CA.
    assert_eq!(
        health(&router, Some(trust_only(&certs)), "moebius.v1.Inference")
            .await
            .ok(),
        Some(1)
    );

    // HTTPS: the API asks for the key; health does not; plain HTTP gets no answer.
    let ca = certs.join("ca.pem");
    let (status, body) =
        http::request_tls(&http, "GET", "/v1/models", &[], b"", &ca).expect("HTTPS answers");
    assert_eq!(status, 401, "{body}");
    let error: serde_json::Value = serde_json::from_str(&body).expect("an error object");
    assert_eq!(error["error"]["code"], "invalid_api_key", "{body}");
    let bearer = format!("Bearer {KEY}");
    let (status, body) = http::request_tls(
        &http,
        "GET",
        "/v1/models",
        &[("Authorization", &bearer)],
        b"",
        &ca,
    )
    .expect("HTTPS answers");
    assert_eq!(status, 200, "{body}");
    let completion = br#"{"prompt": [0, 5, 40, 7], "max_tokens": 4}"#;
    let (status, body) = http::request_tls(
        &http,
        "POST",
        "/v1/completions",
        &[
            ("Authorization", &bearer),
            ("Content-Type", "application/json"),
        ],
        completion,
        &ca,
    )
    .expect("HTTPS answers");
    assert_eq!(status, 200, "{body}");
    let (status, _) =
        http::request_tls(&http, "GET", "/health", &[], b"", &ca).expect("HTTPS answers");
    assert_eq!(status, 200);
    assert!(
        http::request_tls(&http, "GET", "/health", &[], b"", &other.join("ca.pem")).is_none(),
        "a client of another CA finished a TLS handshake with the HTTP port"
    );

    // The workers: only clients with a certificate from the CA.
    let store = EtcdStore::connect_with(&etcd.endpoints(), Duration::from_secs(5), Some(&ours))
        .await
        .expect("etcd over TLS with our certificate");
    let (registered, _) = store
        .get_prefix(&Keys::new(&cluster).workers())
        .await
        .expect("the workers' keys");
    let workers: Vec<WorkerInfo> = registered
        .iter()
        .map(|kv| serde_json::from_slice(&kv.value).expect("a worker record"))
        .collect();
    assert_eq!(workers.len(), 2);
    for w in &workers {
        assert_eq!(
            health(&w.address, Some(ours.grpc_client()), "").await.ok(),
            Some(1),
            "worker {} serves the cluster's certificate",
            w.id
        );
        for (what, tls) in [
            ("no client certificate", Some(trust_only(&certs))),
            ("another CA", Some(theirs.grpc_client())),
            ("no TLS", None),
        ] {
            let refused = health(&w.address, tls, "").await;
            assert!(
                refused.is_err(),
                "worker {} served a client with {what}: {refused:?}",
                w.id
            );
        }
    }

    // The coordinator's admin service, through the operator's CLI.
    let out = moebius(&["admin", "topology", "--coordinator", &admin]);
    assert!(
        !out.status.success(),
        "admin without a certificate: {out:?}"
    );
    let tls_flags: Vec<String> = [
        "--tls-cert",
        "cert.pem",
        "--tls-key",
        "key.pem",
        "--tls-ca",
        "ca.pem",
    ]
    .chunks(2)
    .flat_map(|f| [f[0].to_string(), certs.join(f[1]).display().to_string()])
    .collect();
    let mut args = vec!["admin", "topology", "--coordinator", &admin];
    args.extend(tls_flags.iter().map(String::as_str));
    let out = moebius(&args);
    assert!(out.status.success(), "admin with the certificate: {out:?}");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("worker-0") && table.contains("worker-1"),
        "{table}"
    );

    // `moebius health`, the chart's probe under TLS: a worker is SERVING to a client with the
    // cluster's certificate; without TLS flags the check fails with exit 1 and one line.
    let mut args = vec!["health", "--addr", &workers[0].address, "--service", ""];
    args.extend(tls_flags.iter().map(String::as_str));
    let out = moebius(&args);
    assert!(out.status.success(), "health with the certificate: {out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "SERVING");
    let out = moebius(&["health", "--addr", &workers[0].address]);
    assert_eq!(out.status.code(), Some(1), "health without TLS: {out:?}");

    // etcd, through its own client: a certificate from the CA is required.
    let etcdctl = |with_cert: bool| {
        let mut c = Command::new("etcdctl");
        c.args(["--endpoints", etcd.endpoint(), "--cacert"])
            .arg(&ca);
        if with_cert {
            c.arg("--cert").arg(certs.join("cert.pem"));
            c.arg("--key").arg(certs.join("key.pem"));
        }
        c.args([
            "--command-timeout=3s",
            "get",
            "--prefix",
            "--keys-only",
            "/moebius",
        ]);
        c.output()
            .expect("etcdctl runs (scripts/test.sh installs etcd-client)")
    };
    assert!(
        !etcdctl(false).status.success(),
        "etcd served a client without a certificate"
    );
    assert!(
        etcdctl(true).status.success(),
        "etcd refused the cluster's certificate"
    );

    // The data plane: a stranger's hello is answered `Unauthenticated` (verdict 3).
    let data = workers[0].data_address.clone();
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&data).expect("connects");
        let mut hello = b"MOEBEP\x00\x02".to_vec();
        hello.extend_from_slice(&1u64.to_le_bytes());
        hello.extend_from_slice(&1u32.to_le_bytes());
        hello.extend_from_slice(&2u32.to_le_bytes());
        hello.push(8);
        hello.extend_from_slice(b"worker-1");
        s.write_all(&hello).expect("writes");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut reply = [0u8; 28];
        s.read_exact(&mut reply).expect("an answer");
        assert_eq!(
            u32::from_le_bytes(reply[24..28].try_into().expect("4 bytes")),
            3
        );
    }

    // Junk on 200 connections while requests run: every request gets the tokens it got
    // before, no worker dies, and none grows by more than the bound.
    let rss_before: Vec<u64> = worker_pids.iter().map(|&p| rss_bytes(p)).collect();
    let junk = std::thread::spawn({
        let addrs: Vec<String> = workers.iter().map(|w| w.data_address.clone()).collect();
        move || flood(&addrs, JUNK_CONNECTIONS)
    });
    let during: Vec<_> = (0..6)
        .map(|i| {
            let (router, tls) = (router.clone(), client());
            tokio::spawn(async move { generate(&router, tls, Some(KEY), request(i)).await })
        })
        .collect();
    let sent = tokio::task::spawn_blocking(move || junk.join().expect("the junk thread"))
        .await
        .expect("joined");
    assert_eq!(sent, JUNK_CONNECTIONS);
    for (i, task) in during.into_iter().enumerate() {
        let tokens = task
            .await
            .expect("joined")
            .expect("a request during the junk");
        assert_eq!(tokens, reference[i], "request {i} changed under the junk");
    }
    for (i, &pid) in worker_pids.iter().enumerate() {
        assert!(
            Path::new(&format!("/proc/{pid}")).exists(),
            "worker-{i} died"
        );
        let grew = rss_bytes(pid).saturating_sub(rss_before[i]);
        assert!(
            grew < JUNK_RSS_BOUND,
            "worker-{i} grew by {grew} bytes under the junk"
        );
    }
    let after = generate(&router, client(), Some(KEY), request(0))
        .await
        .expect("serves after");
    assert_eq!(after, reference[0]);
}

/// Opens `n` connections over `addrs` and sends each one kind of junk: random bytes, a frame
/// header claiming 2^64-1 bytes, a truncated hello, or nothing; holds them all open a moment,
/// then closes them. Returns how many were opened.
fn flood(addrs: &[String], n: usize) -> usize {
    use std::io::Write;
    let mut open = Vec::new();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..n {
        let Ok(mut s) = std::net::TcpStream::connect(&addrs[i % addrs.len()]) else {
            continue;
        };
        let junk: Vec<u8> = match i % 4 {
            0 => (0..4096)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect(),
            1 => [u64::MAX.to_le_bytes().as_slice(), &0u32.to_le_bytes()].concat(),
            2 => b"MOEBEP\x01\x02\x01\x00".to_vec(),
            _ => Vec::new(),
        };
        let _ = s.write_all(&junk);
        open.push(s);
    }
    std::thread::sleep(Duration::from_secs(3));
    open.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_limit_on_a_request_gets_its_error() {
    let _serial = SERIAL.lock().await;
    let up = Up::start_with(&fixture(MODEL), &["--workers", "1"]);
    let router = up.router_addr();
    let http = up.http_addr();
    let call = |request: GenerateRequest| {
        let router = router.clone();
        async move { generate(&router, None, None, request).await }
    };
    // A 1 MB request id is refused, and not echoed back.
    let big_id = call(GenerateRequest {
        request_id: "x".repeat(1 << 20),
        ..request(0)
    })
    .await
    .expect_err("a 1 MB request id");
    assert_eq!(big_id.code(), Code::InvalidArgument);
    assert!(
        big_id.message().starts_with("request_id:"),
        "{}",
        &big_id.message()[..100.min(big_id.message().len())]
    );
    assert!(big_id.message().len() < 1000, "the id came back");
    let cases: [(&str, GenerateRequest); 5] = [
        (
            "stop",
            GenerateRequest {
                stop: vec!["a".into(); 17],
                ..request(0)
            },
        ),
        (
            "stop",
            GenerateRequest {
                stop: vec!["a".repeat(257)],
                ..request(0)
            },
        ),
        (
            "stop_token_ids",
            GenerateRequest {
                stop_token_ids: vec![1; 65],
                ..request(0)
            },
        ),
        (
            "top_logprobs",
            GenerateRequest {
                logprobs: true,
                top_logprobs: 21,
                ..request(0)
            },
        ),
        (
            "request_id",
            GenerateRequest {
                request_id: "has space".into(),
                ..request(0)
            },
        ),
    ];
    for (field, request) in cases {
        let err = call(request).await.expect_err(field);
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(
            err.message().starts_with(&format!("{field}:")),
            "{field}: {err:?}"
        );
    }
    // A message over the 4 MiB bound: OUT_OF_RANGE from the transport, naming the sizes.
    let huge = call(GenerateRequest {
        prompt: Some(Prompt::Text("x".repeat(5 << 20))),
        ..request(0)
    })
    .await
    .expect_err("a 5 MiB message");
    assert_eq!(huge.code(), Code::OutOfRange, "{huge:?}");
    assert!(huge.message().contains("4194304"), "{huge:?}");
    // A prompt longer than the model's context: the worker's INVALID_ARGUMENT.
    let long = call(GenerateRequest {
        prompt: Some(Prompt::TokenIds(TokenIds {
            ids: vec![5; 100_000],
        })),
        ..request(0)
    })
    .await
    .expect_err("a prompt past the context");
    assert_eq!(long.code(), Code::InvalidArgument, "{long:?}");
    // HTTP: a body over the bound is 413.
    let body = vec![b' '; (4 << 20) + 1];
    let (status, text) = http::post(&http, "/v1/completions", Some("application/json"), &body);
    assert_eq!(status, 413, "{text}");
    // Still serving.
    let tokens = call(request(0)).await.expect("serves after the refusals");
    assert_eq!(tokens.len(), TOKENS as usize);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn up_in_one_process_serves_over_tls_with_its_throwaway_certificates() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = dir.path().join("tls");
    let up = Up::start_with(
        &fixture(MODEL),
        &[
            "--workers",
            "2",
            "--self-signed-tls",
            certs.to_str().expect("utf-8"),
        ],
    );
    let router = up.router_addr();
    let http = up.http_addr();
    // `up` wrote the files, and its parts use them: the router answers over TLS only.
    let ours = Tls::load(&files(&certs)).expect("up wrote a CA, a certificate and its key");
    assert!(certs.join("cluster-secret").exists());
    let tokens = generate(&router, Some(ours.grpc_client()), None, request(1))
        .await
        .expect("the in-process cluster serves over TLS");
    assert_eq!(tokens.len(), TOKENS as usize);
    assert!(generate(&router, None, None, request(1)).await.is_err());
    let (status, _) =
        http::request_tls(&http, "GET", "/v1/models", &[], b"", &certs.join("ca.pem"))
            .expect("HTTPS answers");
    assert_eq!(status, 200, "no API keys were configured");
}
