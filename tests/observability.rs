//! Watching a cluster as an operator does: a real Prometheus scraping every part of
//! `moebius up --etcd` (router, coordinator, workers, each on its own metrics port), the
//! Grafana dashboards' queries run against it, headless Chromium loading the built-in dashboard
//! of `moebius up`, and an OTLP receiver getting one request's trace across the processes.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::fixture;
use common::http;
use common::load;
use common::otlp::Collector;
use common::prometheus::Prometheus;
use common::up::Up;
use moebius_coordinator::EtcdServer;
use serde_json::Value;

const MODEL: &str = "tiny-v3-yarn";
/// The fixture's routed experts, experts per token and MoE layers.
const EXPERTS: usize = 10;
const TOP_K: usize = 3;
const MOE_LAYERS: usize = 2;
const REQUESTS: u32 = 12;
const TOKENS: u32 = 8;

/// One test at a time: each starts a cluster on a machine of two cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prometheus_scrapes_every_part_and_every_grafana_query_runs() {
    let _serial = SERIAL.lock().await;
    let etcd = EtcdServer::start().expect("etcd starts");
    let cluster = format!("observe{}", std::process::id());
    let up = Up::start(
        etcd.endpoint(),
        &cluster,
        &fixture(MODEL),
        &["--workers", "2", "--stats-interval-s", "0.5"],
    );
    let addr = up.router_addr();
    let mut targets = vec![up.http_addr()];
    for _ in 0..3 {
        let line = up.next_line("a metrics port", |l| l.starts_with("  metrics of "));
        let url = line.rsplit(' ').next().expect("a URL");
        let target = url
            .trim_start_matches("http://")
            .trim_end_matches("/metrics");
        targets.push(target.to_string());
    }
    let prometheus = Prometheus::start(&targets);

    let requests = load::requests(REQUESTS, TOKENS, false);
    let tokens = load::reference(&addr, requests).await;
    assert!(tokens.iter().all(|t| t.len() == TOKENS as usize));

    // Every target is up: one router, one coordinator, two workers.
    assert_eq!(prometheus.wait_for("sum(up)", 4.0), Some(4.0));
    let n = f64::from(REQUESTS);
    let counts = [
        (
            r#"sum(moebius_router_requests_total{outcome="ok",code="OK"})"#,
            n,
        ),
        ("sum(moebius_router_time_to_first_token_seconds_count)", n),
        ("sum(moebius_router_request_duration_seconds_count)", n),
        (
            "sum(moebius_router_generated_tokens_total)",
            n * f64::from(TOKENS),
        ),
        (
            "sum(moebius_router_prompt_tokens_total)",
            n * f64::from(load::PROMPT_LEN),
        ),
        // Every gap between two of a request's tokens.
        (
            "sum(moebius_router_inter_token_latency_seconds_count)",
            n * f64::from(TOKENS - 1),
        ),
        ("sum(moebius_router_requests_in_flight)", 0.0),
        ("sum(moebius_router_routable_workers)", 2.0),
        // Through the model: each prompt, then every generated token but the last.
        (
            "sum(moebius_worker_tokens_total)",
            n * f64::from(load::PROMPT_LEN + TOKENS - 1),
        ),
        ("sum(moebius_coordinator_leader)", 1.0),
        ("sum(moebius_coordinator_workers_alive)", 2.0),
        ("min(moebius_worker_epoch)", 1.0),
        (
            "count(moebius_worker_expert_routed_tokens_total)",
            (2 * EXPERTS) as f64,
        ),
    ];
    for (query, want) in counts {
        assert_eq!(prometheus.wait_for(query, want), Some(want), "{query}");
    }
    // Each token through the model picked TOP_K experts in every MoE layer.
    let routed = n * f64::from(load::PROMPT_LEN + TOKENS - 1) * (TOP_K * MOE_LAYERS) as f64;
    let query = "sum(moebius_worker_expert_routed_tokens_total)";
    assert_eq!(prometheus.wait_for(query, routed), Some(routed), "{query}");
    let step = prometheus
        .scalar("sum(moebius_worker_step_duration_seconds_count)")
        .expect("steps");
    assert!(step >= f64::from(TOKENS), "{step} steps");
    let dispatched = prometheus
        .scalar(r#"sum(moebius_worker_alltoall_bytes_total{op="dispatch"})"#)
        .expect("dispatch bytes");
    assert!(dispatched > 0.0, "rows crossed between the two workers");

    // Every panel of the Grafana dashboards: a query that runs, of metrics that exist.
    let exported = prometheus.names();
    let mut checked = 0;
    for file in ["moebius-overview.json", "moebius-expert-parallel.json"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("deploy/grafana")
            .join(file);
        let dashboard: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("dashboard file"))
                .expect("dashboard JSON");
        for expr in panel_queries(&dashboard) {
            let promql = expr
                .replace("$__rate_interval", "1m")
                .replace("$__interval", "1m")
                .replace("$job", ".*")
                .replace("$instance", ".*")
                .replace("$worker", ".*");
            assert!(!promql.contains('$'), "{file}: a variable left in {expr}");
            let answer = prometheus.query(&promql);
            assert_eq!(answer["status"], "success", "{file}: {promql}: {answer}");
            for name in metric_names(&promql) {
                assert!(
                    exported.contains(&name),
                    "{file}: {name} in {promql} is exported by no part"
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 40, "only {checked} panel queries");
}

/// The `expr` of every target of every panel, rows included.
fn panel_queries(dashboard: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let mut panels: Vec<&Value> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .collect();
    while let Some(panel) = panels.pop() {
        if let Some(inner) = panel["panels"].as_array() {
            panels.extend(inner);
        }
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("every target has an expr");
            out.push(expr.to_string());
        }
    }
    out
}

/// The metric names a query reads (`moebius_...` words).
fn metric_names(promql: &str) -> Vec<String> {
    promql
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("moebius_"))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_built_in_dashboard_shows_the_cluster_in_chromium() {
    let _serial = SERIAL.lock().await;
    let up = Up::start_with(
        &fixture(MODEL),
        &["--workers", "2", "--stats-interval-s", "0.5"],
    );
    let addr = up.router_addr();
    let http_addr = up.http_addr();
    let (status, page) = http::get(&http_addr, "/dashboard");
    assert_eq!(status, 200);
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "the page loads nothing from elsewhere"
    );

    let before = render(&http_addr, None);
    for id in ["worker-0", "worker-1"] {
        assert!(
            before.contains(&format!("data-worker-id=\"{id}\"")),
            "{id} missing"
        );
    }
    assert_eq!(text_of(&before, "requests-total"), "0");

    let requests = load::requests(REQUESTS, TOKENS, false);
    load::reference(&addr, requests).await;
    // The workers publish their load twice a second.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let screenshot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let after = render(&http_addr, Some(&screenshot));
    assert_eq!(text_of(&after, "requests-total"), REQUESTS.to_string());
    assert_eq!(text_of(&after, "requests-failed"), "0");
    assert_eq!(text_of(&after, "epoch"), "1");
    assert_eq!(
        after.matches("class=\"heat-cell").count(),
        EXPERTS * MOE_LAYERS,
        "a heatmap cell per expert and MoE layer"
    );
    let imbalance: f64 = text_of(&after, "imbalance").parse().expect("an imbalance");
    assert!(imbalance >= 1.0, "{imbalance}");
    println!("dashboard screenshot: {}", screenshot.display());
}

/// The dashboard's DOM after headless Chromium ran its scripts for a few (virtual) seconds;
/// with `screenshot`, a picture of it too.
fn render(http_addr: &str, screenshot: Option<&Path>) -> String {
    let url = format!("http://{http_addr}/dashboard");
    let profile = tempfile::tempdir().expect("tempdir");
    let chromium = |extra: &[String]| {
        let mut child = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--virtual-time-budget=5000",
                "--window-size=1400,1000",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(extra)
            .arg(&url)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromium is installed (scripts/test.sh installs Debian's package)");
        let deadline = Instant::now() + Duration::from_secs(60);
        while child.try_wait().expect("wait").is_none() {
            assert!(Instant::now() < deadline, "chromium ran over 60 s");
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut out = String::new();
        use std::io::Read;
        child
            .stdout
            .take()
            .expect("piped")
            .read_to_string(&mut out)
            .expect("DOM");
        out
    };
    if let Some(path) = screenshot {
        chromium(&[format!("--screenshot={}", path.display())]);
        assert!(path.is_file(), "no screenshot at {}", path.display());
    }
    chromium(&["--dump-dom".to_string()])
}

/// The text of the element with `id` in `dom` (no nested elements).
fn text_of(dom: &str, id: &str) -> String {
    let marker = format!("id=\"{id}\"");
    let at = dom
        .find(&marker)
        .unwrap_or_else(|| panic!("no #{id} in the page"));
    let rest = &dom[at..];
    let start = rest.find('>').expect("a tag") + 1;
    let end = rest[start..].find('<').expect("a closing tag");
    rest[start..start + end].trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_request_is_one_trace_from_the_router_through_the_worker() {
    let _serial = SERIAL.lock().await;
    let collector = Collector::default();
    let endpoint = collector.start().await;
    let etcd = EtcdServer::start().expect("etcd starts");
    let cluster = format!("traces{}", std::process::id());
    let logs = tempfile::NamedTempFile::new().expect("a log file");
    let stderr = logs.reopen().expect("the log file");
    let up = Up::spawn(
        &fixture(MODEL),
        &[
            "--etcd",
            etcd.endpoint(),
            "--cluster",
            &cluster,
            "--workers",
            "2",
            "--otlp-endpoint",
            &endpoint,
            "--log-format",
            "json",
        ],
        |command| {
            command
                .env("MOEBIUS_LOG", "moebius_router=info")
                .stderr(stderr);
        },
    );
    let addr = up.router_addr();
    let tokens = load::reference(&addr, load::requests(1, TOKENS, false)).await;
    assert_eq!(tokens[0].len(), TOKENS as usize);

    // The parts export in batches (every 5 s by default).
    let deadline = Instant::now() + Duration::from_secs(30);
    let (root, worker) = loop {
        let spans = collector.spans();
        let root = spans
            .iter()
            .find(|s| s.span.name == "generate" && s.service == "moebius-router")
            .cloned();
        let worker = root.as_ref().and_then(|root| {
            spans
                .iter()
                .find(|s| s.span.name == "worker_generate" && s.span.trace_id == root.span.trace_id)
                .cloned()
        });
        if let (Some(root), Some(worker)) = (root, worker) {
            break (root, worker);
        }
        assert!(
            Instant::now() < deadline,
            "no router and worker span of one trace within 30 s; got {:?}",
            spans
                .iter()
                .map(|s| (&s.service, &s.span.name))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(worker.service, "moebius-worker");
    // The worker's span is a child of the router's attempt, itself a child of the request.
    let spans = collector.spans();
    let attempt = spans
        .iter()
        .find(|s| s.span.span_id == worker.span.parent_span_id)
        .expect("the worker span's parent was exported");
    assert_eq!(attempt.span.name, "attempt");
    assert_eq!(attempt.service, "moebius-router");
    assert_eq!(attempt.span.parent_span_id, root.span.span_id);
    assert_eq!(root.span.trace_id, worker.span.trace_id);
    // The request's GenAI attributes, and the phases on the worker.
    assert_eq!(
        root.attribute("gen_ai.request.max_tokens").as_deref(),
        Some(TOKENS.to_string().as_str())
    );
    assert_eq!(
        root.attribute("gen_ai.usage.output_tokens").as_deref(),
        Some(TOKENS.to_string().as_str())
    );
    assert_eq!(
        root.attribute("gen_ai.usage.input_tokens").as_deref(),
        Some(load::PROMPT_LEN.to_string().as_str())
    );
    for phase in ["prefill", "decode"] {
        assert!(
            spans
                .iter()
                .any(|s| s.span.name == phase && s.span.parent_span_id == worker.span.span_id),
            "no {phase} span under the worker's"
        );
    }

    // The router's JSON log line of the request names its request id and its trace.
    let trace_id: String = root
        .span
        .trace_id
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let request_id = root
        .attribute("request_id")
        .expect("the span has the request id");
    let logged = std::fs::read_to_string(logs.path()).expect("the log file");
    let line: Value = logged
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["fields"]["message"] == "request finished")
        .unwrap_or_else(|| panic!("no JSON line for the finished request in\n{logged}"));
    assert_eq!(line["span"]["request_id"], request_id.as_str(), "{line}");
    assert_eq!(line["span"]["trace_id"], trace_id.as_str(), "{line}");
}
