//! Faults under load, with real processes and a real etcd: a worker killed (`kill -9`) or hung
//! (`SIGSTOP`), the leader coordinator killed, etcd restarted, junk on the data plane, and no
//! worker left. Every test first runs its requests without a fault, then with one, and checks
//! that nothing was lost: every stream completed with exactly its tokens of the no-fault run,
//! and no client saw an error.
//!
//! The tests run one at a time (each starts a cluster of processes on a machine of two cores).

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::load::{self, assert_nothing_lost, Load};
use common::up::{pid_of, Up};
use common::{fixture, send_signal, Cluster, Options, LEASE_TTL_SECS};
use moebius_proto::v1::StatusRequest;
use tonic::Code;

const MODEL: &str = "tiny-v3-yarn";
const STREAMS: u32 = 48;
const TOKENS: u32 = 200;

/// One fault test at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Sequences worker `i` holds now.
async fn active(cluster: &Cluster, i: usize) -> u32 {
    cluster
        .worker_client(i)
        .await
        .status(StatusRequest {})
        .await
        .expect("status")
        .into_inner()
        .active_sequences
}

/// 48 streams run without a fault, then again while `fault` hits worker 1, which holds some
/// of them; returns the cluster for more checks.
async fn fault_under_load(sampled: bool, fault: impl FnOnce(&mut Cluster)) -> Cluster {
    let mut cluster = Cluster::start(&fixture(MODEL), 3, 64);
    cluster.wait_active(3, Duration::from_secs(30));
    let requests = load::requests(STREAMS, TOKENS, sampled);
    let reference = load::reference(&cluster.router_addr, requests.clone()).await;

    let running = Load::start(&cluster.router_addr, requests);
    running.wait_started().await;
    assert!(
        active(&cluster, 1).await > 0,
        "worker 1 must hold streams when the fault hits"
    );
    fault(&mut cluster);
    let results = running.finish().await;
    assert_nothing_lost(&results, &reference, TOKENS);
    eprintln!(
        "longest pause a client saw: {:?}",
        load::longest_gap(&results)
    );
    cluster
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_of_a_worker_loses_no_greedy_stream() {
    let _serial = SERIAL.lock().await;
    let cluster = fault_under_load(false, |c| c.workers[1].kill()).await;
    // The group went on without it, every expert placed on the two survivors.
    let placement = cluster.wait_active(2, Duration::from_secs(30));
    let placed = common::placed_experts(&placement);
    assert_eq!(placed, (0..10).collect::<Vec<u64>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_of_a_worker_loses_no_seeded_sampled_stream() {
    let _serial = SERIAL.lock().await;
    fault_under_load(true, |c| c.workers[1].kill()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hung_worker_loses_nothing_and_rejoins_without_stepping_in_a_stale_epoch() {
    let _serial = SERIAL.lock().await;
    let cluster = fault_under_load(false, |c| c.workers[1].signal("STOP")).await;
    let stale = cluster.wait_active(2, Duration::from_secs(30))["epoch"]
        .as_u64()
        .expect("epoch");
    cluster.workers[1].signal("CONT");
    // From its first answer on, worker 1 never steps in an epoch it is no longer part of: its
    // step count stays put until it reports a newer epoch than the one it was stopped in. The
    // one step SIGSTOP may have frozen after its last collective (in the LM head or the
    // sampler) may still finish: it began in a live epoch, and needs no peer to end.
    let mut first: Option<(u64, u64)> = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = cluster
            .worker_client(1)
            .await
            .status(StatusRequest {})
            .await
            .expect("the resumed worker answers")
            .into_inner();
        let (epoch, steps) = (status.epoch, status.steps);
        let (first_epoch, first_steps) = *first.get_or_insert((epoch, steps));
        if epoch == first_epoch && epoch < stale {
            assert!(
                steps <= first_steps + 1,
                "worker 1 stepped in stale epoch {epoch}: {first_steps} steps at its first answer, {steps} now"
            );
        }
        if epoch > stale {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "worker 1 never joined a new epoch"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster.wait_active(3, Duration::from_secs(30));
    // And the three serve again, with the tokens of the no-fault run.
    let requests = load::requests(6, 16, false);
    let want = load::reference(&cluster.router_addr, requests.clone()).await;
    let again = Load::start(&cluster.router_addr, requests).finish().await;
    assert_nothing_lost(&again, &want, 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_leader_coordinator_fails_no_request() {
    let _serial = SERIAL.lock().await;
    let options = Options {
        coordinators: 2,
        ..Options::default()
    };
    let mut cluster = Cluster::start_with(&fixture(MODEL), options);
    cluster.wait_active(3, Duration::from_secs(30));
    assert_eq!(
        cluster.get_json(&cluster.key("coordinator/leader")),
        "coord-a"
    );
    let requests = load::requests(STREAMS, TOKENS, false);
    let reference = load::reference(&cluster.router_addr, requests.clone()).await;

    let running = Load::start(&cluster.router_addr, requests);
    running.wait_started().await;
    cluster.coordinator.kill();
    let killed = Instant::now();
    assert_nothing_lost(&running.finish().await, &reference, TOKENS);
    // The standby leads within the lease TTL (plus etcd's expiry check and a little slack).
    let within = Duration::from_secs(LEASE_TTL_SECS + 3);
    while cluster.get_json(&cluster.key("coordinator/leader")) != "coord-b" {
        assert!(killed.elapsed() < within, "no new leader within {within:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The new leader forms epochs: a worker killed now is replaced in a new epoch.
    cluster.workers[2].kill();
    cluster.wait_active(2, Duration::from_secs(30));
    let requests = load::requests(6, 16, false);
    let results = Load::start(&cluster.router_addr, requests.clone())
        .finish()
        .await;
    let want: Vec<Vec<u32>> = reference.iter().take(6).map(|t| t[..16].to_vec()).collect();
    assert_nothing_lost(&results, &want, 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restarting_etcd_under_load_fails_no_request() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start(&fixture(MODEL), 3, 64);
    let before = cluster.wait_active(3, Duration::from_secs(30));
    let requests = load::requests(16, 24, false);
    let reference = load::reference(&cluster.router_addr, requests.clone()).await;

    // Clients send request after request while etcd is stopped for 5 s and started again.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = tokio::task::JoinSet::new();
    for c in 0..4 {
        let (addr, stop, requests) = (cluster.router_addr.clone(), stop.clone(), requests.clone());
        clients.spawn(async move {
            let mut results = Vec::new();
            let mut i = c;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let one = Load::start(&addr, vec![requests[i % requests.len()].clone()]);
                results.push((i % requests.len(), one.finish().await.remove(0)));
                i += 4;
            }
            results
        });
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.etcd.kill();
    tokio::time::sleep(Duration::from_secs(5)).await;
    cluster
        .etcd
        .restart()
        .expect("etcd starts again on its data");
    tokio::time::sleep(Duration::from_secs(LEASE_TTL_SECS + 1)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut served = 0;
    while let Some(joined) = clients.join_next().await {
        for (i, result) in joined.expect("client task") {
            let got = result.unwrap_or_else(|e| panic!("request {i} failed: {e:?}"));
            assert_eq!(got.tokens, reference[i], "request {i}: tokens differ");
            served += 1;
        }
    }
    assert!(served > 16, "only {served} requests ran across the restart");

    // Every worker still serves, in the same epoch: nothing had to be re-formed.
    let after = cluster.placement();
    assert_eq!(after["epoch"], before["epoch"], "{after}");
    assert_eq!(after["state"], "active");
    for (i, worker) in cluster.workers.iter_mut().enumerate() {
        assert!(worker.alive(), "worker {i} exited");
    }
    for i in 0..3 {
        let status = cluster
            .worker_client(i)
            .await
            .status(StatusRequest {})
            .await
            .expect("status")
            .into_inner();
        assert_eq!(Some(status.epoch), after["epoch"].as_u64(), "worker {i}");
    }
    assert_eq!(cluster.get_prefix_json(&cluster.key("workers/")).len(), 3);
}

/// A hello in the data plane's wire format, for junk that looks almost right.
fn hello(epoch: u64, rank: u32, world: u32, id: &str) -> Vec<u8> {
    let mut b = b"MOEBEP\x00\x02".to_vec();
    b.extend_from_slice(&epoch.to_le_bytes());
    b.extend_from_slice(&rank.to_le_bytes());
    b.extend_from_slice(&world.to_le_bytes());
    b.push(id.len() as u8);
    b.extend_from_slice(id.as_bytes());
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn junk_on_the_data_plane_neither_blocks_an_epoch_nor_grows_memory() {
    let _serial = SERIAL.lock().await;
    /// How much a worker's resident memory may grow from the junk below.
    const BOUND: u64 = 64 << 20;
    let mut cluster = Cluster::start(&fixture(MODEL), 3, 64);
    let placement = cluster.wait_active(3, Duration::from_secs(30));
    let epoch = placement["epoch"].as_u64().expect("epoch");
    let requests = load::requests(STREAMS, TOKENS, false);
    let reference = load::reference(&cluster.router_addr, requests.clone()).await;
    let rss_before: Vec<u64> = cluster.workers.iter().map(|w| w.rss_bytes()).collect();

    let mut junk = Vec::new();
    for worker in cluster.get_prefix_json(&cluster.key("workers/")) {
        let addr = worker["data_address"]
            .as_str()
            .expect("data address")
            .to_string();
        let mut send = |bytes: &[u8]| {
            let mut s = TcpStream::connect(&addr).expect("junk connects");
            // A worker may close a junk connection before all of it is written.
            let _ = s.write_all(bytes);
            junk.push(s);
        };
        let random: Vec<u8> = (0..64 << 10)
            .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        send(&random);
        send(&hello(epoch + 1, 7, 99, "w1")); // a wrong rank and group size
        send(&hello(epoch + 1, 2, 3, "intruder")); // a worker id of no member
        send(&hello(epoch - 1, 2, 3, "w2")); // a stale epoch
        let mut huge = u64::MAX.to_le_bytes().to_vec(); // a huge length prefix
        huge.extend_from_slice(&[0; 4]);
        send(&huge);
        send(&hello(epoch + 1, 2, 3, "w2")[..11]); // a truncated hello
        for _ in 0..40 {
            junk.push(TcpStream::connect(&addr).expect("idle connects")); // silence
        }
    }
    let running = Load::start(&cluster.router_addr, requests);
    running.wait_started().await;
    cluster.workers[1].kill();
    assert_nothing_lost(&running.finish().await, &reference, TOKENS);
    cluster.wait_active(2, Duration::from_secs(30));
    for i in [0, 2] {
        let grown = cluster.workers[i].rss_bytes().saturating_sub(rss_before[i]);
        assert!(
            grown < BOUND,
            "worker {i} grew by {grown} bytes, over {BOUND}"
        );
    }
    drop(junk);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_with_no_worker_left_is_a_request_unavailable() {
    let _serial = SERIAL.lock().await;
    // Longer than the lease TTL: the router learns that the workers are gone before it gives
    // up waiting for one.
    let options = Options {
        router_args: vec!["--epoch-wait-s".into(), (LEASE_TTL_SECS + 4).to_string()],
        ..Options::default()
    };
    let mut cluster = Cluster::start_with(&fixture(MODEL), options);
    cluster.wait_active(3, Duration::from_secs(30));
    let running = Load::start(&cluster.router_addr, load::requests(6, TOKENS, false));
    running.wait_started().await;
    for worker in &mut cluster.workers {
        worker.kill();
    }
    for (i, result) in running.finish().await.into_iter().enumerate() {
        let err = result.expect_err("no worker is left to finish it");
        assert_eq!(err.code(), Code::Unavailable, "request {i}: {err:?}");
        assert!(
            err.message().contains("no live worker"),
            "request {i}: {}",
            err.message()
        );
    }
    let mut client = cluster.client().await;
    let err = client
        .generate(load::requests(1, 4, false).remove(0))
        .await
        .expect_err("no worker");
    assert_eq!(err.code(), Code::Unavailable);
    assert!(
        err.message().contains("no live worker"),
        "{}",
        err.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn moebius_up_restarts_a_killed_worker_and_serves_meanwhile() {
    let _serial = SERIAL.lock().await;
    let etcd = moebius_coordinator::EtcdServer::start().expect("etcd starts");
    let cluster = format!("up{}", std::process::id());
    let mut up = Up::start(
        etcd.endpoint(),
        &cluster,
        &fixture(MODEL),
        &[
            "--workers",
            "3",
            "--lease-ttl-secs",
            &LEASE_TTL_SECS.to_string(),
        ],
    );
    let first = up.next_line("worker-1 start", |l| l.starts_with("[up] started worker-1"));
    let victim = pid_of(&first);
    let addr = up.router_addr();

    let requests = load::requests(STREAMS, TOKENS, false);
    let reference = load::reference(&addr, requests.clone()).await;
    let running = Load::start(&addr, requests);
    running.wait_started().await;
    send_signal(victim, "KILL");
    assert_nothing_lost(&running.finish().await, &reference, TOKENS);

    // up starts it again, and the three form an epoch together.
    let again = up.next_line("worker-1 restart", |l| {
        l.starts_with("[up] started worker-1")
    });
    assert_ne!(pid_of(&again), victim);
    let store = moebius_coordinator::EtcdStore::connect(&etcd.endpoints(), Duration::from_secs(5))
        .await
        .expect("etcd");
    let key = moebius_coordinator::Keys::new(&cluster).placement();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        use moebius_coordinator::TopologyStore;
        let record: Option<moebius_coordinator::EpochRecord> = store
            .get(&key)
            .await
            .expect("get")
            .map(|kv| serde_json::from_slice(&kv.value).expect("record"));
        if record.is_some_and(|r| {
            r.state == moebius_coordinator::EpochState::Active && r.workers.len() == 3
        }) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no active epoch of 3 after the restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let requests = load::requests(6, 16, false);
    let want: Vec<Vec<u32>> = reference.iter().take(6).map(|t| t[..16].to_vec()).collect();
    assert_nothing_lost(&Load::start(&addr, requests).finish().await, &want, 16);

    // Ctrl-C (SIGTERM) stops it cleanly.
    send_signal(up.child.id(), "TERM");
    up.next_line("goodbye", |l| l == "moebius stopped");
    let status = up.child.wait().expect("up exits");
    assert!(status.success(), "{status}");
}
