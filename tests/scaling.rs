//! Scaling expert shards under load, through `moebius up --etcd` and `moebius admin` as an
//! operator runs them, with real processes and a real etcd: a rebalance, a worker that joins,
//! and one that is drained. Every test first runs its requests undisturbed, then again while
//! the cluster changes, and checks that nothing was lost: every stream completed with exactly
//! its tokens of the undisturbed run, and no client saw an error.
//!
//! The tests run one at a time (each starts a cluster of processes on a machine of two cores).

mod common;

use std::process::Output;
use std::time::{Duration, Instant};

use common::load::{self, assert_nothing_lost, Load};
use common::up::Up;
use common::{fixture, Process};
use moebius_coordinator::{EpochRecord, EpochState, EtcdServer, EtcdStore, Keys, TopologyStore};
use moebius_proto::v1::worker_client::WorkerClient;
use moebius_proto::v1::StatusRequest;
use serde_json::Value;

const MODEL: &str = "tiny-v3-yarn";
/// The fixture's routed experts and MoE layers.
const EXPERTS: usize = 10;
const MOE_LAYERS: usize = 2;
const STREAMS: u32 = 32;
const TOKENS: u32 = 128;

/// One test at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `moebius admin <args> --coordinator <admin>`.
fn admin(admin: &str, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_moebius"))
        .arg("admin")
        .args(args)
        .args(["--coordinator", admin])
        .output()
        .expect("moebius admin runs")
}

/// `moebius admin <args> --json`, which must succeed.
fn admin_json(address: &str, args: &[&str]) -> Value {
    let out = admin(address, &[args, &["--json"]].concat());
    assert!(
        out.status.success(),
        "moebius admin {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON on stdout")
}

/// The placement record, once `pred` holds (within 60 s).
async fn wait_record(
    etcd: &EtcdServer,
    cluster: &str,
    what: &str,
    pred: impl Fn(&EpochRecord) -> bool,
) -> EpochRecord {
    let store = EtcdStore::connect(&etcd.endpoints(), Duration::from_secs(5))
        .await
        .expect("etcd");
    let key = Keys::new(cluster).placement();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let record: Option<EpochRecord> = store
            .get(&key)
            .await
            .expect("get")
            .map(|kv| serde_json::from_slice(&kv.value).expect("an epoch record"));
        if let Some(r) = record.filter(|r| pred(r)) {
            return r;
        }
        assert!(Instant::now() < deadline, "no {what} within 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn active_with(n: usize) -> impl Fn(&EpochRecord) -> bool {
    move |r| r.state == EpochState::Active && r.workers.len() == n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebalance_under_load_loses_nothing_and_lowers_the_imbalance() {
    let _serial = SERIAL.lock().await;
    let etcd = EtcdServer::start().expect("etcd starts");
    let cluster = format!("rebalance{}", std::process::id());
    let up = Up::start(
        etcd.endpoint(),
        &cluster,
        &fixture(MODEL),
        &[
            "--workers",
            "3",
            "--redundant-experts",
            "2",
            "--rebalance-threshold",
            "0",
            "--stats-interval-s",
            "0.5",
        ],
    );
    let addr = up.router_addr();
    let admin_addr = up.admin_addr();

    // Before any load: three workers of 4 slots (10 experts + 2 redundant), nothing measured.
    let t = admin_json(&admin_addr, &["topology"]);
    assert_eq!(t["workers"].as_array().map(Vec::len), Some(3));
    assert_eq!(t["redundant_experts"], 2);
    assert_eq!(t["load"].as_array().map(Vec::len), Some(0));
    let out = admin(&admin_addr, &["rebalance", "--dry-run"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("error: FAILED_PRECONDITION: no expert load"),
        "{err}"
    );

    let requests = load::skewed_requests(STREAMS, TOKENS);
    let reference = load::reference(&addr, requests.clone()).await;
    // The load of that run reaches the leader within a few samples.
    let deadline = Instant::now() + Duration::from_secs(30);
    let before = loop {
        let t = admin_json(&admin_addr, &["topology"]);
        if t["load"].as_array().map(Vec::len) == Some(MOE_LAYERS) {
            break t;
        }
        assert!(Instant::now() < deadline, "no load measured: {t}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let imbalance_before = before["imbalance"].as_f64().expect("imbalance");
    let epoch_before = before["epoch"].as_u64().expect("epoch");
    eprintln!("imbalance before: {imbalance_before:.3}");

    let dry = admin_json(&admin_addr, &["rebalance", "--dry-run"]);
    assert_eq!(dry["applied"], false);
    let running = Load::start(&addr, requests);
    running.wait_started().await;
    let plan = admin_json(&admin_addr, &["rebalance"]);
    let results = running.finish().await;
    assert_nothing_lost(&results, &reference, TOKENS);
    eprintln!(
        "rebalance: {plan}; longest pause a client saw: {:?}",
        load::longest_gap(&results)
    );
    assert_eq!(plan["applied"], true, "{plan}");
    let epoch = plan["epoch"].as_u64().expect("epoch");
    assert_eq!(epoch, epoch_before + 1);
    let after = plan["imbalance_after"].as_f64().expect("after");
    assert!(
        after < imbalance_before,
        "the plan does not lower the imbalance: {plan}"
    );

    // The new epoch is active with one placement per MoE layer...
    let record = wait_record(&etcd, &cluster, "the rebalanced epoch", |r| {
        r.epoch == epoch && r.state == EpochState::Active
    })
    .await;
    assert_eq!(record.placement.layers.len(), MOE_LAYERS);
    record.placement.validate_for(MOE_LAYERS).expect("valid");
    // Under the load measured since (the window moved on), still better than before.
    let t = admin_json(&admin_addr, &["topology"]);
    assert_eq!(t["epoch"].as_u64(), Some(epoch));
    let now = t["imbalance"].as_f64().expect("imbalance");
    assert!(
        now < imbalance_before,
        "imbalance {now} after, {imbalance_before} before"
    );
    // ...and the workers read only the slots that moved; the rest they kept.
    let (mut loaded, mut kept) = (0, 0);
    for w in record.workers.iter() {
        let status = WorkerClient::connect(format!("http://{}", w.address))
            .await
            .expect("worker")
            .status(StatusRequest {})
            .await
            .expect("status")
            .into_inner();
        assert_eq!(status.epoch, epoch);
        loaded += u64::from(status.slots_loaded);
        kept += u64::from(status.slots_kept);
    }
    let total = (EXPERTS as u64 + 2) * MOE_LAYERS as u64;
    assert_eq!(loaded + kept, total);
    let to_load = plan["slots_to_load"].as_u64().expect("slots");
    assert!(
        loaded <= to_load && kept >= total - to_load,
        "read {loaded}, kept {kept}; the plan moves {to_load}"
    );

    // The tables an operator reads, and the exit codes of what is refused.
    let out = admin(&admin_addr, &["topology"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("epoch {epoch} (active)")), "{text}");
    for i in 0..3 {
        assert!(text.contains(&format!("worker-{i}")), "{text}");
    }
    assert!(text.contains("placement (per MoE layer):"), "{text}");
    let out = admin(&admin_addr, &["drain", "nobody"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("error: INVALID_ARGUMENT: no worker named \"nobody\""),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    let out = admin(&admin_addr, &["redundant", "100"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("do not fit"));
    let out = admin("127.0.0.1:1", &["topology"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the admin service"));
    // The refusals changed nothing.
    wait_record(&etcd, &cluster, "the same epoch", |r| r.epoch == epoch).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_joins_and_one_drains_under_load_losing_nothing() {
    let _serial = SERIAL.lock().await;
    let etcd = EtcdServer::start().expect("etcd starts");
    let cluster = format!("scale{}", std::process::id());
    let model = fixture(MODEL);
    let up = Up::start(
        etcd.endpoint(),
        &cluster,
        &model,
        &["--workers", "2", "--stats-interval-s", "0.5"],
    );
    let addr = up.router_addr();
    let admin_addr = up.admin_addr();
    let requests = load::requests(STREAMS, TOKENS, false);
    let reference = load::reference(&addr, requests.clone()).await;

    // A third worker joins while 32 streams run.
    let running = Load::start(&addr, requests.clone());
    running.wait_started().await;
    let model_arg = model.to_str().expect("utf-8").to_string();
    let (_extra, _) = Process::start(
        "extra",
        &[
            "worker",
            "--etcd",
            etcd.endpoint(),
            "--cluster",
            &cluster,
            "--id",
            "extra",
            "--model",
            &model_arg,
            "--threads",
            "1",
        ]
        .map(String::from),
        "worker extra serving on ",
    );
    let joined = wait_record(&etcd, &cluster, "an epoch of 3", active_with(3)).await;
    assert!(joined.workers.iter().any(|w| w.id == "extra"));
    let results = running.finish().await;
    assert_nothing_lost(&results, &reference, TOKENS);
    eprintln!(
        "join: longest pause a client saw: {:?}",
        load::longest_gap(&results)
    );

    // worker-0 is drained while 32 streams run: its own finish there, it leaves, and up does
    // not start it again.
    let running = Load::start(&addr, requests);
    running.wait_started().await;
    let drained = admin_json(&admin_addr, &["drain", "worker-0"]);
    assert_eq!(drained["worker_id"], "worker-0");
    let results = running.finish().await;
    assert_nothing_lost(&results, &reference, TOKENS);
    eprintln!(
        "drain: longest pause a client saw: {:?}",
        load::longest_gap(&results)
    );
    let exited = up.next_line("worker-0's exit", |l| l.starts_with("[up] worker-0 exited"));
    assert!(
        exited.contains("exit status: 0") && exited.contains("not started again"),
        "{exited}"
    );
    let left = wait_record(&etcd, &cluster, "an epoch of 2", active_with(2)).await;
    let ids: Vec<&str> = left.workers.iter().map(|w| w.id.as_str()).collect();
    assert_eq!(ids, ["extra", "worker-1"]);
    left.placement
        .validate_for(MOE_LAYERS)
        .expect("every expert placed");
    let t = admin_json(&admin_addr, &["topology"]);
    let workers: Vec<&str> = t["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .filter_map(|w| w["id"].as_str())
        .collect();
    assert_eq!(workers, ["extra", "worker-1"]);

    // The two left serve with the same tokens.
    let requests = load::requests(6, 16, false);
    let want: Vec<Vec<u32>> = reference.iter().take(6).map(|t| t[..16].to_vec()).collect();
    assert_nothing_lost(&Load::start(&addr, requests).finish().await, &want, 16);
}
