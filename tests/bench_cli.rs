//! CI smoke tests of `moebius bench`: each subcommand runs once at tiny sizes as a real process,
//! exits 0, and prints one JSON object with every field. No timing asserts: the numbers belong in
//! BENCHMARKS.md.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// Runs `moebius <args>`, checks it succeeded, and returns the one JSON object on its stdout.
fn bench_json(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_moebius"))
        .args(args)
        .output()
        .expect("moebius runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "moebius {args:?} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "moebius {args:?} printed more than one line: {stdout}"
    );
    let v: Value = serde_json::from_str(lines[0]).expect("stdout is JSON");
    assert!(v.is_object(), "{v}");
    v
}

/// Asserts that `v` has every key, each a number (or, for `dists`, an object of mean/p50/p90/p99/max
/// numbers).
fn assert_fields(v: &Value, numbers: &[&str], dists: &[&str]) {
    for k in numbers {
        assert!(v[k].is_number(), "field {k} missing or not a number in {v}");
    }
    for k in dists {
        for p in ["mean", "p50", "p90", "p99", "max"] {
            assert!(v[k][p].is_number(), "field {k}.{p} missing in {v}");
        }
    }
}

fn results(v: &Value, want: usize) -> &Vec<Value> {
    let rows = v["results"].as_array().expect("results array");
    assert_eq!(rows.len(), want, "{v}");
    rows
}

#[test]
fn bench_alltoall_local_and_tcp() {
    for transport in ["local", "tcp"] {
        let v = bench_json(&[
            "bench",
            "alltoall",
            "--ranks",
            "2",
            "--transport",
            transport,
            "--tokens",
            "1,4",
            "--hidden",
            "32",
            "--topk",
            "2",
            "--experts",
            "8",
            "--iters",
            "3",
            "--warmup",
            "1",
            "--seed",
            "7",
            "--json",
        ]);
        assert_eq!(v["transport"], transport);
        assert_fields(
            &v,
            &[
                "ranks", "hidden", "topk", "experts", "iters", "warmup", "seed",
            ],
            &[],
        );
        for row in results(&v, 2) {
            assert_fields(
                row,
                &[
                    "tokens",
                    "token_copies_per_rank",
                    "dispatch_bytes_per_rank",
                    "combine_bytes_per_rank",
                    "dispatch_bytes_per_peer",
                    "dispatch_gb_s",
                    "combine_gb_s",
                    "raw_gb_s",
                    "dispatch_share_of_raw",
                    "combine_share_of_raw",
                    "dispatch_p50_over_raw_rtt_p50",
                    "combine_p50_over_raw_rtt_p50",
                ],
                &[
                    "dispatch_latency_us",
                    "combine_latency_us",
                    "raw_latency_us",
                    "raw_rtt_us",
                ],
            );
        }
    }
}

/// `moebius up` as a child process, killed when dropped.
struct Up {
    child: Child,
    addr: String,
    /// The router's HTTP port (the OpenAI-compatible API).
    http: String,
}

impl Up {
    fn start() -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_moebius"))
            .args([
                "up",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
                "--workers",
                "2",
                "--threads",
                "1",
            ])
            .arg("--model")
            .arg(fixture("tiny-v3"))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("moebius up starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        // Drains the child's stdout until it closes; ends with the child.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("moebius is up: router on ") {
                    let addr = rest.split([',', ' ']).next().unwrap_or("").to_string();
                    let _ = tx.send(addr);
                }
                if let Some(rest) = line.strip_prefix("watch it: dashboard http://") {
                    let addr = rest.split('/').next().unwrap_or("").to_string();
                    let _ = tx.send(addr);
                }
            }
        });
        let mut up = Self {
            child,
            addr: String::new(),
            http: String::new(),
        };
        let next = || {
            rx.recv_timeout(Duration::from_secs(120))
                .expect("moebius up printed its addresses within 120 s")
        };
        up.addr = next();
        up.http = next();
        up
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn bench_serve_over_the_openai_api_sends_the_same_load() {
    let up = Up::start();
    let v = bench_json(&[
        "bench",
        "serve",
        "--addr",
        &up.http,
        "--protocol",
        "openai",
        "--requests",
        "6",
        "--concurrency",
        "3",
        "--input-len",
        "8",
        "--output-len",
        "4",
        "--json",
    ]);
    assert_eq!(v["protocol"], "openai", "{v}");
    assert_eq!(v["completed"], 6, "{v}");
    assert_eq!(v["failed"], 0, "{v}");
    assert_eq!(v["total_output_tokens"], 6 * 4, "{v}");
    assert_eq!(v["total_input_tokens"], 6 * 8, "{v}");
}

#[test]
fn bench_serve_against_moebius_up() {
    let up = Up::start();
    let v = bench_json(&[
        "bench",
        "serve",
        "--addr",
        &up.addr,
        "--requests",
        "8",
        "--concurrency",
        "4",
        "--input-len",
        "8",
        "--output-len",
        "4",
        "--seed",
        "3",
        "--json",
    ]);
    assert_eq!(v["completed"], 8, "{v}");
    assert_eq!(v["failed"], 0, "{v}");
    assert_eq!(v["total_output_tokens"], 8 * 4, "{v}");
    assert_eq!(v["total_input_tokens"], 8 * 8, "{v}");
    assert_fields(
        &v,
        &[
            "completed",
            "failed",
            "duration_s",
            "request_throughput",
            "input_tokens_per_s",
            "output_tokens_per_s",
            "total_input_tokens",
            "total_output_tokens",
        ],
        &["ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"],
    );
}

#[test]
fn bench_serve_fails_clearly_without_a_router() {
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let out = Command::new(env!("CARGO_BIN_EXE_moebius"))
        .args([
            "bench",
            "serve",
            "--addr",
            &format!("127.0.0.1:{port}"),
            "--requests",
            "1",
        ])
        .output()
        .expect("moebius runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("127.0.0.1:{port}")), "{stderr}");
}

#[test]
fn bench_engine_tiny() {
    let model = fixture("tiny-v3");
    let v = bench_json(&[
        "bench",
        "engine",
        "--model",
        model.to_str().expect("utf-8 path"),
        "--prompt-len",
        "8",
        "--decode-tokens",
        "2",
        "--batch",
        "1,2",
        "--threads",
        "1",
        "--repeats",
        "2",
        "--json",
    ]);
    assert_eq!(v["repeats"], 2, "{v}");
    assert_fields(
        &v,
        &[
            "load_s",
            "weights_bytes",
            "decode_bytes_per_step",
            "read_bandwidth_gb_s",
            "batch1_decode_ceiling_tok_s",
        ],
        &[],
    );
    // The bandwidth is measured before the first pass of each batch and after every pass.
    let samples = v["read_bandwidth_samples_gb_s"]
        .as_array()
        .expect("bandwidth samples");
    assert_eq!(samples.len(), 2 * (2 + 1), "{v}");
    assert!(samples.iter().all(|s| s.as_f64() > Some(0.0)), "{v}");
    for row in results(&v, 2) {
        assert_fields(
            row,
            &[
                "batch",
                "prompt_len",
                "decode_tokens",
                "repeats",
                "prefill_tok_s",
                "decode_tok_s",
                "decode_step_ms",
            ],
            &[],
        );
        // Only batch 1 is held against the batch-1 ceiling.
        let ratio = row["decode_ceiling_ratio"].as_f64();
        if row["batch"] == 1 {
            assert!(ratio > Some(0.0), "{row}");
        } else {
            assert_eq!(ratio, None, "{row}");
        }
    }
}

#[test]
fn bench_products_tiny() {
    for dtype in ["bf16", "f32", "fp8"] {
        let v = bench_json(&[
            "bench",
            "products",
            "--dtype",
            dtype,
            "--shapes",
            "64x32,200x130",
            "--rows",
            "1,3",
            "--threads",
            "1",
            "--repeats",
            "2",
            "--json",
        ]);
        assert_eq!(v["dtype"], dtype, "{v}");
        let rows = results(&v, 4);
        let shapes: Vec<(u64, u64, u64)> = rows
            .iter()
            .map(|r| {
                assert_fields(r, &["seconds", "tflop_s", "weight_gb_s"], &[]);
                let n = |k: &str| r[k].as_u64().expect("a count");
                (n("out"), n("in"), n("rows"))
            })
            .collect();
        assert_eq!(
            shapes,
            [(64, 32, 1), (64, 32, 3), (200, 130, 1), (200, 130, 3)]
        );
    }
    // A shape that is not OUTxIN is the user's to fix: exit code 2 and one line naming it.
    let out = Command::new(env!("CARGO_BIN_EXE_moebius"))
        .args(["bench", "products", "--shapes", "64by32"])
        .output()
        .expect("moebius runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("\"64by32\" is not OUTxIN"), "{stderr}");
}

#[test]
fn bench_router_tiny() {
    let model = fixture("tiny-v3");
    let v = bench_json(&[
        "bench",
        "router",
        "--model",
        model.to_str().expect("utf-8 path"),
        "--calls",
        "20",
        "--concurrency",
        "1,4",
        "--json",
    ]);
    assert_fields(&v, &["calls"], &[]);
    for row in results(&v, 2) {
        assert_fields(
            row,
            &[
                "concurrency",
                "direct_calls_per_s",
                "router_calls_per_s",
                "router_share_of_direct",
                "direct_p50_ms",
                "direct_p99_ms",
                "router_p50_ms",
                "router_p99_ms",
                "errors",
            ],
            &[],
        );
        assert_eq!(row["errors"], 0, "{row}");
    }
}

#[test]
fn bench_failover_kills_a_worker_of_moebius_up_and_loses_nothing() {
    let v = bench_json(&[
        "bench",
        "failover",
        "--model",
        fixture("tiny-v3").to_str().expect("utf-8"),
        "--workers",
        "2",
        "--streams",
        "6",
        "--output-len",
        "48",
        "--kill-after-ms",
        "0",
        "--json",
    ]);
    assert_eq!(v["lost"], 0, "{v}");
    assert_eq!(v["streams"], 6, "{v}");
    assert_eq!(v["fault"], "kill", "{v}");
    for k in ["p50", "p99", "max"] {
        assert!(v["stall_ms"][k].is_number(), "stall_ms.{k} missing in {v}");
    }
    assert!(v["kill_to_next_epoch_ms"].is_number(), "{v}");
    assert!(v["migrated"].is_number(), "{v}");
}

#[test]
fn bench_failover_refuses_a_single_worker() {
    let out = Command::new(env!("CARGO_BIN_EXE_moebius"))
        .args(["bench", "failover", "--workers", "1"])
        .output()
        .expect("moebius runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--workers must be at least 2"), "{stderr}");
}
