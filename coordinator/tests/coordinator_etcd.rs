//! Coordinator failover against a real etcd, on real time (the tests fail, never skip, when
//! the `etcd` binary is missing).

// Test code: a failed call is a failed test.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use moebius_coordinator::{run, CoordinatorConfig, EpochState, EtcdStore, Keys, TopologyStore};
use support::{assert_fully_placed, ids, wait_leader, wait_record, FakeWorker};
use tokio_util::sync::CancellationToken;

const TTL: Duration = Duration::from_secs(2);

fn config(id: &str) -> CoordinatorConfig {
    CoordinatorConfig {
        id: id.into(),
        cluster: "e2e".into(),
        expected_workers: 2,
        num_experts: 6,
        lease_ttl: TTL,
        settle: Duration::from_millis(100),
        ..CoordinatorConfig::default()
    }
}

#[tokio::test]
async fn a_standby_takes_over_from_a_dead_leader_and_continues() {
    let server = support::etcd();
    let store: Arc<dyn TopologyStore> = Arc::new(
        EtcdStore::connect(&server.endpoints(), Duration::from_secs(5))
            .await
            .unwrap(),
    );
    let keys = Keys::new("e2e");

    let a_stop = CancellationToken::new();
    let a = tokio::spawn(run(config("a"), store.clone(), a_stop.clone()));
    wait_leader(&store, &keys, "a").await;
    let b_stop = CancellationToken::new();
    let b = tokio::spawn(run(config("b"), store.clone(), b_stop.clone()));

    let w1 = FakeWorker::register(&store, &keys, "w1", TTL).await;
    let w2 = FakeWorker::register(&store, &keys, "w2", TTL).await;
    let e1 = wait_record(&store, &keys, "epoch 1", |r| r.epoch == 1).await;
    assert_eq!(ids(&e1), ["w1", "w2"]);
    assert_fully_placed(&e1, 6);
    w1.ack(&store, &keys, 1).await;
    w2.ack(&store, &keys, 1).await;
    wait_record(&store, &keys, "epoch 1 active", |r| {
        r.state == EpochState::Active
    })
    .await;

    // The leader dies without revoking its lease; b takes over when it expires.
    a.abort();
    let _ = a.await;
    wait_leader(&store, &keys, "b").await;
    let _w3 = FakeWorker::register(&store, &keys, "w3", TTL).await;
    let e2 = wait_record(&store, &keys, "epoch 2", |r| r.epoch == 2).await;
    assert_eq!(ids(&e2), ["w1", "w2", "w3"]);
    assert_fully_placed(&e2, 6);

    let history = support::record_history(&store, &keys).await;
    let expected: Vec<(u64, String)> = vec![
        (1, "Pending".into()),
        (1, "Active".into()),
        (2, "Pending".into()),
    ];
    assert_eq!(history, expected);

    b_stop.cancel();
    b.await.unwrap().unwrap();
    assert!(
        store.get(&keys.leader()).await.unwrap().is_none(),
        "shutdown revokes the lease"
    );
    drop(a_stop);
}
