//! The admin API against a real etcd, over real gRPC: the leader answers with the topology and
//! the load the workers published, plans and applies a rebalance, sets redundant experts,
//! writes drain orders, and refuses what cannot be done with the documented codes; a standby
//! refuses every command naming the leader.

// Test code: a failed call is a failed test.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use moebius_coordinator::admin::{self, service};
use moebius_coordinator::{
    run_with_admin, CoordinatorConfig, DrainOrder, EpochState, EtcdStore, Keys, LoadStats,
    TopologyStore,
};
use moebius_proto::v1 as pb;
use pb::admin_client::AdminClient;
use support::{wait_leader, wait_record, FakeWorker};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::Code;

const TTL: Duration = Duration::from_secs(2);
const EXPERTS: usize = 8;

/// A coordinator with its admin service on a free port.
struct Coordinator {
    client: AdminClient<Channel>,
    stop: CancellationToken,
}

impl Coordinator {
    async fn start(id: &str, store: &Arc<dyn TopologyStore>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (handle, link) = admin::channel();
        let stop = CancellationToken::new();
        tokio::spawn(service::serve(listener, handle, stop.clone(), None));
        let config = CoordinatorConfig {
            id: id.into(),
            cluster: "admin".into(),
            expected_workers: 2,
            num_experts: EXPERTS,
            lease_ttl: TTL,
            settle: Duration::from_millis(100),
            rebalance_threshold: 0.0,
            admin_address: Some(addr.to_string()),
            ..CoordinatorConfig::default()
        };
        tokio::spawn(run_with_admin(
            config,
            store.clone(),
            stop.clone(),
            Some(link),
        ));
        let client = AdminClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        Self { client, stop }
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Publishes `tokens` as worker `w`'s load.
async fn publish(
    store: &Arc<dyn TopologyStore>,
    keys: &Keys,
    w: &FakeWorker,
    tokens: Vec<Vec<u64>>,
) {
    let stats = LoadStats {
        id: w.info.id.clone(),
        epoch: 1,
        window_s: 30.0,
        tokens,
        slot_bytes: 1000,
    };
    store
        .put(
            &keys.stats(&w.info.id),
            serde_json::to_vec(&stats).unwrap(),
            Some(w.lease),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn the_leader_plans_rebalances_and_drains_and_refuses_what_cannot_be_done() {
    let server = support::etcd();
    let store: Arc<dyn TopologyStore> = Arc::new(
        EtcdStore::connect(&server.endpoints(), Duration::from_secs(5))
            .await
            .unwrap(),
    );
    let keys = Keys::new("admin");
    let mut leader = Coordinator::start("a", &store).await;
    wait_leader(&store, &keys, "a").await;
    let mut standby = Coordinator::start("b", &store).await;

    let w0 = FakeWorker::register(&store, &keys, "w0", TTL).await;
    let w1 = FakeWorker::register(&store, &keys, "w1", TTL).await;
    wait_record(&store, &keys, "epoch 1", |r| r.epoch == 1).await;
    // Not active yet: a rebalance waits for it.
    let err = leader
        .client
        .rebalance(pb::RebalanceRequest { dry_run: true })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("still forming"), "{}", err.message());
    w0.ack(&store, &keys, 1).await;
    w1.ack(&store, &keys, 1).await;
    wait_record(&store, &keys, "epoch 1 active", |r| {
        r.state == EpochState::Active
    })
    .await;

    // No load yet: nothing to plan from.
    let err = leader
        .client
        .rebalance(pb::RebalanceRequest { dry_run: true })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("no expert load"),
        "{}",
        err.message()
    );

    // A standby names the leader, for every command.
    let err = standby
        .client
        .get_topology(pb::GetTopologyRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("the leader is a"),
        "{}",
        err.message()
    );

    // Two MoE layers, each with most tokens on experts 0-3, which the even placement puts
    // all on rank 0.
    let skewed: Vec<u64> = (0..EXPERTS as u64)
        .map(|e| if e < 4 { 100 } else { 10 })
        .collect();
    publish(&store, &keys, &w0, vec![skewed.clone(), skewed.clone()]).await;
    publish(&store, &keys, &w1, vec![skewed.clone(), skewed.clone()]).await;
    // Both workers' samples, once the leader has read them both (they land one at a time).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let topology = loop {
        let t = leader
            .client
            .get_topology(pb::GetTopologyRequest {})
            .await
            .unwrap()
            .into_inner();
        let both = t.load.len() == 2 && t.load[0].tokens.first() == Some(&200);
        if both || tokio::time::Instant::now() > deadline {
            break t;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!((topology.leader.as_str(), topology.epoch), ("a", 1));
    assert_eq!(topology.epoch_state, "active");
    assert_eq!(topology.load[0].tokens[0], 200);
    let ids: Vec<(&str, i32, u32)> = topology
        .workers
        .iter()
        .map(|w| (w.id.as_str(), w.rank, w.slots))
        .collect();
    assert_eq!(ids, [("w0", 0, 4), ("w1", 1, 4)]);
    // Rank 0 computes 800 of 880 rows per layer: 1.82 times the mean.
    assert!(
        (topology.imbalance - 800.0 / 440.0).abs() < 1e-9,
        "{topology:?}"
    );

    // A dry run plans without changing anything.
    let plan = leader
        .client
        .rebalance(pb::RebalanceRequest { dry_run: true })
        .await
        .unwrap()
        .into_inner();
    assert!(!plan.applied);
    assert_eq!(plan.changed_layers, [0, 1]);
    assert!(plan.imbalance_after < 1.05, "{plan:?}");
    assert_eq!(plan.bytes_to_load, plan.slots_to_load * 1000);
    assert!(
        plan.slots_to_load > 0 && plan.slots_to_load <= 8,
        "{plan:?}"
    );
    let record = wait_record(&store, &keys, "still epoch 1", |r| r.epoch == 1).await;
    assert!(record.placement.is_uniform());

    // Applied, it forms epoch 2 with the plan, one placement per MoE layer.
    let applied = leader
        .client
        .rebalance(pb::RebalanceRequest { dry_run: false })
        .await
        .unwrap()
        .into_inner();
    assert!(applied.applied);
    assert_eq!(applied.epoch, 2);
    let e2 = wait_record(&store, &keys, "epoch 2", |r| r.epoch == 2).await;
    assert_eq!(e2.state, EpochState::Pending);
    assert_eq!(e2.placement.layers.len(), 2);
    e2.placement.validate_for(2).unwrap();
    w0.ack(&store, &keys, 2).await;
    w1.ack(&store, &keys, 2).await;
    wait_record(&store, &keys, "epoch 2 active", |r| {
        r.epoch == 2 && r.state == EpochState::Active
    })
    .await;
    // Balanced now: another rebalance moves nothing.
    let again = leader
        .client
        .rebalance(pb::RebalanceRequest { dry_run: false })
        .await
        .unwrap()
        .into_inner();
    assert!(!again.applied);
    assert!(again.note.contains("nothing moves"), "{}", again.note);

    // Redundant experts: too many is INVALID_ARGUMENT; two more slots re-plan with copies.
    let err = leader
        .client
        .set_redundant_experts(pb::SetRedundantExpertsRequest {
            count: 9,
            dry_run: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("do not fit"), "{}", err.message());
    let plan = leader
        .client
        .set_redundant_experts(pb::SetRedundantExpertsRequest {
            count: 2,
            dry_run: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(plan.applied, "{plan:?}");
    let e3 = wait_record(&store, &keys, "epoch 3", |r| r.epoch == 3).await;
    for l in 0..2 {
        let slots: Vec<usize> = e3.placement.layer(l).iter().map(Vec::len).collect();
        assert_eq!(slots, [5, 5], "layer {l}");
    }
    let stored = store.get(&keys.settings()).await.unwrap().unwrap();
    assert_eq!(stored.value, br#"{"redundant_experts":2}"#);
    w0.ack(&store, &keys, 3).await;
    w1.ack(&store, &keys, 3).await;
    wait_record(&store, &keys, "epoch 3 active", |r| {
        r.epoch == 3 && r.state == EpochState::Active
    })
    .await;

    // Drain: an unknown id, then w1 (an order appears), then the last one left.
    let err = leader
        .client
        .drain(pb::DrainRequest {
            worker_id: "nobody".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    leader
        .client
        .drain(pb::DrainRequest {
            worker_id: "w1".into(),
        })
        .await
        .unwrap();
    let order = store.get(&keys.drain("w1")).await.unwrap().unwrap();
    let order: DrainOrder = serde_json::from_slice(&order.value).unwrap();
    assert_eq!(order.id, "w1");
    let err = leader
        .client
        .drain(pb::DrainRequest {
            worker_id: "w0".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("last worker"), "{}", err.message());
    // The drained worker leaves (here: its lease is revoked, as its shutdown does): the next
    // epoch places every expert on w0, and the order is deleted.
    store.revoke_lease(w1.lease).await.unwrap();
    let e4 = wait_record(&store, &keys, "epoch without w1", |r| r.workers.len() == 1).await;
    e4.placement.validate().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while store.get(&keys.drain("w1")).await.unwrap().is_some() {
        assert!(tokio::time::Instant::now() < deadline, "the order stays");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(w0);
}
