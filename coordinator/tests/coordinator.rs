//! The coordinator's control loop against `MemoryStore`, on paused time: epochs as workers
//! come and go, acknowledgements, and leader failover.

// Test code: a failed call is a failed test.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use moebius_coordinator::{
    run, CoordinatorConfig, CoordinatorError, EpochState, Keys, MemoryStore, TopologyStore,
};
use support::{assert_fully_placed, ids, wait_leader, wait_record, FakeWorker};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const TTL: Duration = Duration::from_secs(2);

fn config(id: &str, expected_workers: usize, num_experts: usize) -> CoordinatorConfig {
    CoordinatorConfig {
        id: id.into(),
        cluster: "test".into(),
        expected_workers,
        num_experts,
        lease_ttl: TTL,
        settle: Duration::from_millis(300),
        ..CoordinatorConfig::default()
    }
}

struct Running {
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), CoordinatorError>>,
}

fn start(store: &Arc<dyn TopologyStore>, config: CoordinatorConfig) -> Running {
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run(config, store.clone(), shutdown.clone()));
    Running { shutdown, task }
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

fn memory() -> Arc<dyn TopologyStore> {
    Arc::new(MemoryStore::new())
}

#[tokio::test(start_paused = true)]
async fn epochs_follow_workers_joining_and_dying() {
    let store = memory();
    let keys = Keys::new("test");
    let coordinator = start(&store, config("c1", 3, 8));

    let w1 = FakeWorker::register(&store, &keys, "w1", TTL).await;
    let w2 = FakeWorker::register(&store, &keys, "w2", TTL).await;
    // Two of three expected workers: no epoch, however long we wait.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(store.get(&keys.placement()).await.unwrap().is_none());

    let w3 = FakeWorker::register(&store, &keys, "w3", TTL).await;
    let e1 = wait_record(&store, &keys, "epoch 1", |r| r.epoch == 1).await;
    assert_eq!(e1.state, EpochState::Pending);
    assert_eq!(ids(&e1), ["w1", "w2", "w3"]);
    assert_fully_placed(&e1, 8);
    let sizes: Vec<usize> = e1.placement.layer(0).iter().map(Vec::len).collect();
    assert_eq!(sizes, [3, 3, 2]);

    // Two acknowledgements are not enough.
    w1.ack(&store, &keys, 1).await;
    w2.ack(&store, &keys, 1).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let still = wait_record(&store, &keys, "epoch 1", |r| r.epoch == 1).await;
    assert_eq!(still.state, EpochState::Pending);
    w3.ack(&store, &keys, 1).await;
    wait_record(&store, &keys, "epoch 1 active", |r| {
        r.epoch == 1 && r.state == EpochState::Active
    })
    .await;

    // w2 dies: its lease expires and epoch 2 has the survivors, every expert still placed.
    w2.die();
    let e2 = wait_record(&store, &keys, "epoch 2", |r| r.epoch == 2).await;
    assert_eq!(e2.state, EpochState::Pending);
    assert_eq!(ids(&e2), ["w1", "w3"]);
    assert_fully_placed(&e2, 8);
    w1.ack(&store, &keys, 2).await;
    w3.ack(&store, &keys, 2).await;
    wait_record(&store, &keys, "epoch 2 active", |r| {
        r.epoch == 2 && r.state == EpochState::Active
    })
    .await;
    // Acknowledgements of older epochs are cleaned up.
    let (old, _) = store.get_prefix(&keys.ready_prefix(1)).await.unwrap();
    assert!(old.is_empty(), "{old:?}");

    // A fourth worker joins: epoch 3 includes it.
    let _w4 = FakeWorker::register(&store, &keys, "w4", TTL).await;
    let e3 = wait_record(&store, &keys, "epoch 3", |r| r.epoch == 3).await;
    assert_eq!(ids(&e3), ["w1", "w3", "w4"]);
    assert_fully_placed(&e3, 8);

    coordinator.stop().await;
    assert!(
        store.get(&keys.leader()).await.unwrap().is_none(),
        "shutdown revokes the lease"
    );
}

#[tokio::test(start_paused = true)]
async fn a_worker_dying_before_acknowledging_is_dropped_from_the_pending_epoch() {
    let store = memory();
    let keys = Keys::new("test");
    let coordinator = start(&store, config("c1", 2, 4));
    let w1 = FakeWorker::register(&store, &keys, "w1", TTL).await;
    let w2 = FakeWorker::register(&store, &keys, "w2", TTL).await;
    wait_record(&store, &keys, "epoch 1", |r| r.epoch == 1).await;
    w1.ack(&store, &keys, 1).await;
    w2.die();
    let e2 = wait_record(&store, &keys, "epoch 2", |r| r.epoch == 2).await;
    assert_eq!(ids(&e2), ["w1"]);
    assert_eq!(e2.placement.layer(0), [vec![0, 1, 2, 3]]);
    w1.ack(&store, &keys, 2).await;
    wait_record(&store, &keys, "epoch 2 active", |r| {
        r.state == EpochState::Active
    })
    .await;

    // The last worker dies: the record stays, no empty epoch is formed.
    w1.die();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let kept = wait_record(&store, &keys, "epoch 2", |_| true).await;
    assert_eq!((kept.epoch, ids(&kept)), (2, vec!["w1"]));
    coordinator.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_restarted_worker_gets_a_new_epoch_even_with_the_same_info() {
    let store = memory();
    let keys = Keys::new("test");
    let coordinator = start(&store, config("c1", 2, 4));
    let w1 = FakeWorker::register(&store, &keys, "w1", TTL).await;
    let w2 = FakeWorker::register(&store, &keys, "w2", TTL).await;
    wait_record(&store, &keys, "epoch 1", |r| r.epoch == 1).await;
    w1.ack(&store, &keys, 1).await;
    w2.ack(&store, &keys, 1).await;
    wait_record(&store, &keys, "epoch 1 active", |r| {
        r.state == EpochState::Active
    })
    .await;

    // w2 restarts faster than the settle time: same id, same addresses, new lease.
    store.revoke_lease(w2.lease).await.unwrap();
    let _w2 = FakeWorker::register(&store, &keys, "w2", TTL).await;
    let e2 = wait_record(&store, &keys, "epoch 2", |r| r.epoch == 2).await;
    assert_eq!(ids(&e2), ["w1", "w2"]);
    coordinator.stop().await;
}

#[tokio::test(start_paused = true)]
async fn ranks_are_capped_at_the_number_of_experts() {
    let store = memory();
    let keys = Keys::new("test");
    let coordinator = start(&store, config("c1", 2, 2));
    let w1 = FakeWorker::register(&store, &keys, "w1", TTL).await;
    let _w2 = FakeWorker::register(&store, &keys, "w2", TTL).await;
    let _w3 = FakeWorker::register(&store, &keys, "w3", TTL).await;
    let e1 = wait_record(&store, &keys, "epoch 1", |r| r.epoch == 1).await;
    assert_eq!(ids(&e1), ["w1", "w2"]);
    // No second epoch for the standby w3 while the members are intact.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        wait_record(&store, &keys, "epoch 1", |_| true).await.epoch,
        1
    );
    // When a member dies the standby takes its place.
    w1.die();
    let e2 = wait_record(&store, &keys, "epoch 2", |r| r.epoch == 2).await;
    assert_eq!(ids(&e2), ["w2", "w3"]);
    assert_fully_placed(&e2, 2);
    coordinator.stop().await;
}

#[tokio::test(start_paused = true)]
async fn only_the_leader_writes_and_a_standby_takes_over_on_shutdown() {
    let store = memory();
    let keys = Keys::new("test");
    let a = start(&store, config("a", 2, 6));
    wait_leader(&store, &keys, "a").await;
    let b = start(&store, config("b", 2, 6));

    let w1 = FakeWorker::register(&store, &keys, "w1", TTL).await;
    let w2 = FakeWorker::register(&store, &keys, "w2", TTL).await;
    wait_record(&store, &keys, "epoch 1", |r| r.epoch == 1).await;
    w1.ack(&store, &keys, 1).await;
    w2.ack(&store, &keys, 1).await;
    wait_record(&store, &keys, "epoch 1 active", |r| {
        r.state == EpochState::Active
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    wait_leader(&store, &keys, "a").await;

    a.stop().await;
    wait_leader(&store, &keys, "b").await;
    let _w3 = FakeWorker::register(&store, &keys, "w3", TTL).await;
    let e2 = wait_record(&store, &keys, "epoch 2", |r| r.epoch == 2).await;
    assert_eq!(ids(&e2), ["w1", "w2", "w3"]);
    assert_fully_placed(&e2, 6);

    // One writer at a time: every epoch was written once, then activated once.
    let history = support::record_history(&store, &keys).await;
    let expected: Vec<(u64, String)> = vec![
        (1, "Pending".into()),
        (1, "Active".into()),
        (2, "Pending".into()),
    ];
    assert_eq!(history, expected);
    b.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_standby_takes_over_when_the_leader_dies_without_revoking() {
    let store = memory();
    let keys = Keys::new("test");
    let a = start(&store, config("a", 2, 6));
    wait_leader(&store, &keys, "a").await;
    let b = start(&store, config("b", 2, 6));
    let w1 = FakeWorker::register(&store, &keys, "w1", TTL).await;
    let w2 = FakeWorker::register(&store, &keys, "w2", TTL).await;
    wait_record(&store, &keys, "epoch 1", |r| r.epoch == 1).await;

    // The leader's process dies: no revoke, its lease runs out.
    a.task.abort();
    let _ = a.task.await;
    wait_leader(&store, &keys, "b").await;
    // The new leader continues the pending epoch from the store.
    w1.ack(&store, &keys, 1).await;
    w2.ack(&store, &keys, 1).await;
    let e1 = wait_record(&store, &keys, "epoch 1 active", |r| {
        r.state == EpochState::Active
    })
    .await;
    assert_eq!(e1.epoch, 1);
    b.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_invalid_config_is_refused() {
    let store = memory();
    let err = run(config("c", 5, 4), store, CancellationToken::new())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "config");
}

#[tokio::test(start_paused = true)]
async fn a_leader_that_loses_its_lease_stops_and_campaigns_again() {
    let store = memory();
    let keys = Keys::new("test");
    let coordinator = start(&store, config("c1", 2, 4));
    wait_leader(&store, &keys, "c1").await;
    let w1 = FakeWorker::register(&store, &keys, "w1", TTL).await;
    let w2 = FakeWorker::register(&store, &keys, "w2", TTL).await;
    wait_record(&store, &keys, "epoch 1", |r| r.epoch == 1).await;

    // The store drops the coordinator's lease (as etcd does after a partition longer than the
    // TTL): the leader key goes with it, and the coordinator must win a new lease to act again.
    let first = store.get(&keys.leader()).await.unwrap().unwrap();
    store.revoke_lease(first.lease.unwrap()).await.unwrap();
    wait_leader(&store, &keys, "c1").await;
    let second = store.get(&keys.leader()).await.unwrap().unwrap();
    assert_ne!(second.lease, first.lease);

    w1.ack(&store, &keys, 1).await;
    w2.ack(&store, &keys, 1).await;
    let e1 = wait_record(&store, &keys, "epoch 1 active", |r| {
        r.state == EpochState::Active
    })
    .await;
    assert_eq!(e1.epoch, 1);
    coordinator.stop().await;
}

/// A gRPC health service that answers, as a live worker's does; its `host:port`.
async fn health_server() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_reporter, service) = tonic_health::server::health_reporter();
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await;
    });
    (addr.to_string(), task)
}

/// On real time: the probe of a suspect talks to real sockets.
#[tokio::test]
async fn a_failure_report_reforms_the_group_without_the_suspects_that_are_gone() {
    let store = memory();
    let keys = Keys::new("test");
    let long = Duration::from_secs(60);
    let coordinator = start(&store, config("c1", 3, 6));
    let (alive, _server) = health_server().await;
    let gone = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string() // closed again: connections are refused
    };
    let w1 = FakeWorker::register(&store, &keys, "w1", long).await;
    let w2 = FakeWorker::register_at(&store, &keys, "w2", long, &alive, 0).await;
    let w3 = FakeWorker::register_at(&store, &keys, "w3", long, &gone, 7).await;
    wait_record(&store, &keys, "epoch 1", |r| r.epoch == 1).await;
    for w in [&w1, &w2, &w3] {
        w.ack(&store, &keys, 1).await;
    }
    wait_record(&store, &keys, "epoch 1 active", |r| {
        r.state == EpochState::Active
    })
    .await;

    // w1's group failed; it blames w2 and w3. w2 answers its health check, w3 does not: epoch
    // 2 is formed at once, long before w3's lease (60 s) could expire.
    let reported = std::time::Instant::now();
    w1.report(&store, &keys, 1, &["w2", "w3"]).await;
    let e2 = wait_record(&store, &keys, "epoch 2", |r| r.epoch == 2).await;
    assert_eq!(ids(&e2), ["w1", "w2"]);
    assert_fully_placed(&e2, 6);
    assert!(
        reported.elapsed() < Duration::from_secs(10),
        "{:?}",
        reported.elapsed()
    );
    w1.ack(&store, &keys, 2).await;
    w2.ack(&store, &keys, 2).await;
    wait_record(&store, &keys, "epoch 2 active", |r| {
        r.epoch == 2 && r.state == EpochState::Active
    })
    .await;
    // The old report is cleaned up, and the excluded w3 is not taken back while it is the
    // same incarnation...
    tokio::time::sleep(Duration::from_millis(800)).await;
    let now = wait_record(&store, &keys, "epoch 2", |r| r.epoch >= 2).await;
    assert_eq!(
        now.epoch, 2,
        "w3 must not rejoin as the incarnation that was lost"
    );
    assert!(store.get(&keys.suspect("w1")).await.unwrap().is_none());
    // ...but it is once it registers anew.
    drop(w3);
    let _w3 = FakeWorker::register_at(&store, &keys, "w3", long, &gone, 8).await;
    let e3 = wait_record(&store, &keys, "epoch 3", |r| r.epoch == 3).await;
    assert_eq!(ids(&e3), ["w1", "w2", "w3"]);

    // A report about an epoch that is over changes nothing.
    w2.report(&store, &keys, 2, &["w1"]).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let still = wait_record(&store, &keys, "epoch 3", |r| r.epoch >= 3).await;
    assert_eq!(still.epoch, 3);
    coordinator.stop().await;
}
