//! Shared by the coordinator crate's integration tests: the store conformance suite (one
//! generic function per behaviour, run against every `TopologyStore`) and fake workers.
//!
//! Waits use `tokio::time`, so the same function runs on real time against etcd and on paused
//! time against `MemoryStore`.

#![allow(dead_code)]
// Test helpers: a failed call is a failed test.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use moebius_coordinator::{
    EpochRecord, EtcdServer, Fence, Keys, LeaseId, StoreError, TopologyStore, WatchEvent,
    WatchStream, WorkerInfo,
};
use tokio::task::JoinHandle;

/// Starts an etcd for one test; fails the test (never skips it) when etcd is missing.
pub fn etcd() -> EtcdServer {
    match EtcdServer::start() {
        Ok(server) => server,
        Err(e) => panic!("these tests need a real etcd: {e}"),
    }
}

/// Long enough for etcd to expire a 2 s lease (it checks every 500 ms) on a loaded machine.
const WAIT: Duration = Duration::from_secs(20);

async fn next_event(stream: &mut WatchStream) -> WatchEvent {
    match tokio::time::timeout(WAIT, stream.next()).await {
        Ok(Some(Ok(event))) => event,
        Ok(Some(Err(e))) => panic!("watch failed: {e}"),
        Ok(None) => panic!("watch ended"),
        Err(_) => panic!("no watch event within {WAIT:?}"),
    }
}

// ---- conformance ----

pub async fn put_get_prefix_and_revisions(store: &dyn TopologyStore) {
    let r1 = store.put("/c/p/b", b"b".to_vec(), None).await.unwrap();
    let r2 = store.put("/c/p/a", b"a".to_vec(), None).await.unwrap();
    let r3 = store.put("/c/q/x", b"x".to_vec(), None).await.unwrap();
    let r4 = store.put("/c/p/c", b"c".to_vec(), None).await.unwrap();
    assert_eq!(
        [r2, r3, r4],
        [r1 + 1, r1 + 2, r1 + 3],
        "one revision per write"
    );

    let a = store.get("/c/p/a").await.unwrap().unwrap();
    assert_eq!(
        (a.value.as_slice(), a.create_revision, a.mod_revision),
        (&b"a"[..], r2, r2)
    );
    assert_eq!(a.lease, None);
    let r5 = store.put("/c/p/a", b"a2".to_vec(), None).await.unwrap();
    let a = store.get("/c/p/a").await.unwrap().unwrap();
    assert_eq!(
        (a.create_revision, a.mod_revision),
        (r2, r5),
        "an update keeps create_revision"
    );

    let (kvs, revision) = store.get_prefix("/c/p/").await.unwrap();
    let keys: Vec<&str> = kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(
        keys,
        ["/c/p/a", "/c/p/b", "/c/p/c"],
        "sorted by key, prefix only"
    );
    assert_eq!(revision, r5);
    assert!(store.get("/c/p/missing").await.unwrap().is_none());

    store.delete("/c/p/b").await.unwrap();
    store.delete("/c/p/b").await.unwrap(); // deleting a missing key is not an error
    assert!(store.get("/c/p/b").await.unwrap().is_none());
    let r7 = store.put("/c/p/b", b"b2".to_vec(), None).await.unwrap();
    let b = store.get("/c/p/b").await.unwrap().unwrap();
    assert_eq!(
        b.create_revision, r7,
        "a re-created key has a new create_revision"
    );
    let (_, revision) = store.get_prefix("/c/").await.unwrap();
    assert_eq!(revision, r7);
}

pub async fn cas_creates_if_absent_once(store: &dyn TopologyStore) {
    assert!(store
        .compare_and_swap("/c/cas", 0, b"1".to_vec(), None)
        .await
        .unwrap());
    assert!(!store
        .compare_and_swap("/c/cas", 0, b"2".to_vec(), None)
        .await
        .unwrap());
    assert_eq!(store.get("/c/cas").await.unwrap().unwrap().value, b"1");
}

pub async fn cas_on_a_stale_revision_fails(store: &dyn TopologyStore) {
    let r1 = store.put("/c/k", b"1".to_vec(), None).await.unwrap();
    let r2 = store.put("/c/k", b"2".to_vec(), None).await.unwrap();
    assert!(!store
        .compare_and_swap("/c/k", r1, b"x".to_vec(), None)
        .await
        .unwrap());
    assert_eq!(store.get("/c/k").await.unwrap().unwrap().value, b"2");
    assert!(store
        .compare_and_swap("/c/k", r2, b"3".to_vec(), None)
        .await
        .unwrap());
    let kv = store.get("/c/k").await.unwrap().unwrap();
    assert_eq!(kv.value, b"3");
    assert!(kv.mod_revision > r2);
    // A CAS on a missing key with a non-zero revision fails too.
    assert!(!store
        .compare_and_swap("/c/none", r2, b"x".to_vec(), None)
        .await
        .unwrap());
}

pub async fn fenced_cas_needs_the_fence_key_under_its_lease(store: &dyn TopologyStore) {
    let lease = store.grant_lease(Duration::from_secs(60)).await.unwrap();
    let other = store.grant_lease(Duration::from_secs(60)).await.unwrap();
    let fence = Fence {
        key: "/c/f/leader".into(),
        lease,
    };
    // No fence key yet: no write, also not a create.
    assert!(!store
        .compare_and_swap_fenced("/c/f/data", 0, b"0".to_vec(), &fence)
        .await
        .unwrap());
    store
        .put("/c/f/leader", b"me".to_vec(), Some(lease))
        .await
        .unwrap();
    assert!(store
        .compare_and_swap_fenced("/c/f/data", 0, b"1".to_vec(), &fence)
        .await
        .unwrap());
    let data = store.get("/c/f/data").await.unwrap().unwrap();
    assert_eq!((data.value.as_slice(), data.lease), (&b"1"[..], None));
    // A stale revision fails even with the fence.
    assert!(!store
        .compare_and_swap_fenced("/c/f/data", data.mod_revision - 1, b"x".to_vec(), &fence)
        .await
        .unwrap());
    // The fence key under another lease (a new leader) fences the old one out.
    store
        .put("/c/f/leader", b"other".to_vec(), Some(other))
        .await
        .unwrap();
    assert!(!store
        .compare_and_swap_fenced("/c/f/data", data.mod_revision, b"2".to_vec(), &fence)
        .await
        .unwrap());
    store.revoke_lease(other).await.unwrap();
    assert!(!store
        .compare_and_swap_fenced("/c/f/data", data.mod_revision, b"2".to_vec(), &fence)
        .await
        .unwrap());
    assert_eq!(store.get("/c/f/data").await.unwrap().unwrap().value, b"1");
}

pub async fn lease_expiry_deletes_keys_and_watch_sees_it(store: &dyn TopologyStore) {
    let lease = store.grant_lease(Duration::from_secs(2)).await.unwrap();
    let other = store.put("/c/l/plain", b"p".to_vec(), None).await.unwrap();
    store
        .put("/c/l/a", b"a".to_vec(), Some(lease))
        .await
        .unwrap();
    let kv = store.get("/c/l/a").await.unwrap().unwrap();
    assert_eq!(kv.lease, Some(lease));
    let mut watch = store
        .watch_prefix("/c/l/", kv.mod_revision + 1)
        .await
        .unwrap();
    match next_event(&mut watch).await {
        WatchEvent::Delete {
            key,
            revision,
            prev,
        } => {
            assert_eq!(key, "/c/l/a");
            assert!(revision > kv.mod_revision);
            let prev = prev.expect("a lease expiry's Delete carries the previous value");
            assert_eq!(
                (prev.value.as_slice(), prev.lease),
                (&b"a"[..], Some(lease))
            );
        }
        other => panic!("expected the lease's Delete, got {other:?}"),
    }
    assert!(store.get("/c/l/a").await.unwrap().is_none());
    let plain = store.get("/c/l/plain").await.unwrap().unwrap();
    assert_eq!(plain.mod_revision, other, "keys without the lease stay");
}

pub async fn keep_alive_on_an_expired_lease_is_lease_lost(store: &dyn TopologyStore) {
    let lease = store.grant_lease(Duration::from_secs(2)).await.unwrap();
    store.keep_alive(lease).await.unwrap();
    let rev = store
        .put("/c/ka", b"x".to_vec(), Some(lease))
        .await
        .unwrap();
    let mut watch = store.watch_prefix("/c/ka", rev + 1).await.unwrap();
    assert!(matches!(
        next_event(&mut watch).await,
        WatchEvent::Delete { .. }
    ));
    match store.keep_alive(lease).await {
        Err(StoreError::LeaseLost(id)) => assert_eq!(id, lease),
        other => panic!("expected LeaseLost, got {other:?}"),
    }
    match store.put("/c/ka", b"y".to_vec(), Some(lease)).await {
        Err(StoreError::LeaseLost(id)) => assert_eq!(id, lease),
        other => panic!("a put under a lost lease must fail with LeaseLost, got {other:?}"),
    }
}

pub async fn revoke_deletes_keys_now(store: &dyn TopologyStore) {
    let lease = store.grant_lease(Duration::from_secs(60)).await.unwrap();
    store
        .put("/c/r/a", b"a".to_vec(), Some(lease))
        .await
        .unwrap();
    store
        .put("/c/r/b", b"b".to_vec(), Some(lease))
        .await
        .unwrap();
    store.revoke_lease(lease).await.unwrap();
    assert!(store.get_prefix("/c/r/").await.unwrap().0.is_empty());
    assert!(matches!(
        store.keep_alive(lease).await,
        Err(StoreError::LeaseLost(_))
    ));
}

pub async fn watch_from_an_old_revision_replays_in_order(store: &dyn TopologyStore) {
    let r1 = store.put("/c/w/a", b"1".to_vec(), None).await.unwrap();
    let r2 = store.put("/c/w/b", b"2".to_vec(), None).await.unwrap();
    store.put("/c/other", b"-".to_vec(), None).await.unwrap();
    store.delete("/c/w/a").await.unwrap();
    let r5 = store.put("/c/w/b", b"3".to_vec(), None).await.unwrap();

    let mut watch = store.watch_prefix("/c/w/", r1).await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(next_event(&mut watch).await);
    }
    let summary: Vec<(&str, &str, i64)> = seen
        .iter()
        .map(|e| match e {
            WatchEvent::Put(kv) => ("put", kv.key.as_str(), kv.mod_revision),
            WatchEvent::Delete { key, revision, .. } => ("delete", key.as_str(), *revision),
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("put", "/c/w/a", r1),
            ("put", "/c/w/b", r2),
            ("delete", "/c/w/a", r5 - 1),
            ("put", "/c/w/b", r5),
        ]
    );
    match &seen[2] {
        WatchEvent::Delete {
            prev: Some(prev), ..
        } => assert_eq!(prev.value, b"1"),
        other => panic!("the Delete must carry its previous value: {other:?}"),
    }
    // And live events keep coming after the replay.
    let r6 = store.put("/c/w/c", b"4".to_vec(), None).await.unwrap();
    assert_eq!(next_event(&mut watch).await.revision(), r6);
}

// ---- fake workers and epochs ----

/// A registered worker whose lease is kept alive until it is stopped or dropped.
pub struct FakeWorker {
    pub info: WorkerInfo,
    pub lease: LeaseId,
    keeper: JoinHandle<()>,
}

impl FakeWorker {
    pub async fn register(
        store: &Arc<dyn TopologyStore>,
        keys: &Keys,
        id: &str,
        ttl: Duration,
    ) -> Self {
        Self::register_at(store, keys, id, ttl, &format!("127.0.0.1:1{id}"), 0).await
    }

    /// Registers with a gRPC `address` (where the leader probes it) and an incarnation.
    pub async fn register_at(
        store: &Arc<dyn TopologyStore>,
        keys: &Keys,
        id: &str,
        ttl: Duration,
        address: &str,
        incarnation: u64,
    ) -> Self {
        let info = WorkerInfo {
            id: id.to_owned(),
            address: address.to_owned(),
            data_address: format!("127.0.0.1:2{id}"),
            device: "cpu".into(),
            capacity: 8,
            incarnation,
        };
        let lease = store.grant_lease(ttl).await.unwrap();
        store
            .put(
                &keys.worker(id),
                serde_json::to_vec(&info).unwrap(),
                Some(lease),
            )
            .await
            .unwrap();
        let s = store.clone();
        let keeper = tokio::spawn(async move {
            loop {
                tokio::time::sleep(ttl / 3).await;
                if s.keep_alive(lease).await.is_err() {
                    return;
                }
            }
        });
        Self {
            info,
            lease,
            keeper,
        }
    }

    /// Stops refreshing the lease: the worker "dies" and its key expires after the TTL.
    pub fn die(&self) {
        self.keeper.abort();
    }

    /// Reports that this worker's group failed in `epoch`, blaming `suspects`.
    pub async fn report(
        &self,
        store: &Arc<dyn TopologyStore>,
        keys: &Keys,
        epoch: u64,
        suspects: &[&str],
    ) {
        let report = moebius_coordinator::SuspectReport {
            epoch,
            suspects: suspects.iter().map(|s| s.to_string()).collect(),
            reason: "test".into(),
        };
        store
            .put(
                &keys.suspect(&self.info.id),
                serde_json::to_vec(&report).unwrap(),
                Some(self.lease),
            )
            .await
            .unwrap();
    }

    /// Writes this worker's acknowledgement of `epoch`, under its lease.
    pub async fn ack(&self, store: &Arc<dyn TopologyStore>, keys: &Keys, epoch: u64) {
        store
            .put(
                &keys.ready(epoch, &self.info.id),
                b"{}".to_vec(),
                Some(self.lease),
            )
            .await
            .unwrap();
    }
}

impl Drop for FakeWorker {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

/// Polls the placement record until `pred` holds.
pub async fn wait_record(
    store: &Arc<dyn TopologyStore>,
    keys: &Keys,
    what: &str,
    pred: impl Fn(&EpochRecord) -> bool,
) -> EpochRecord {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut last = None;
    loop {
        if let Some(kv) = store.get(&keys.placement()).await.unwrap() {
            let record: EpochRecord = serde_json::from_slice(&kv.value).unwrap();
            if pred(&record) {
                return record;
            }
            last = Some(record);
        }
        if tokio::time::Instant::now() > deadline {
            panic!("waited 30 s for {what}; the last record was {last:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls the leader key until it names `id`.
pub async fn wait_leader(store: &Arc<dyn TopologyStore>, keys: &Keys, id: &str) {
    let want = format!("\"{id}\"").into_bytes();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let current = store.get(&keys.leader()).await.unwrap().map(|kv| kv.value);
        if current.as_deref() == Some(want.as_slice()) {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!(
                "waited 30 s for leader {id}; the leader key holds {:?}",
                current.map(|v| String::from_utf8_lossy(&v).into_owned())
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn ids(record: &EpochRecord) -> Vec<&str> {
    record.workers.iter().map(|w| w.id.as_str()).collect()
}

/// Every expert placed, one rank per worker.
pub fn assert_fully_placed(record: &EpochRecord, num_experts: usize) {
    assert_eq!(record.placement.num_experts, num_experts);
    assert_eq!(record.placement.num_ranks(), record.workers.len());
    record.placement.validate().unwrap();
}

/// Every (epoch, state) the placement key went through, from its whole history.
pub async fn record_history(store: &Arc<dyn TopologyStore>, keys: &Keys) -> Vec<(u64, String)> {
    let Some(last) = store.get(&keys.placement()).await.unwrap() else {
        return Vec::new();
    };
    let now = last.mod_revision;
    let mut watch = store.watch_prefix(&keys.placement(), 1).await.unwrap();
    let mut out = Vec::new();
    loop {
        let event = next_event(&mut watch).await;
        if let WatchEvent::Put(kv) = &event {
            if kv.key == keys.placement() {
                let record: EpochRecord = serde_json::from_slice(&kv.value).unwrap();
                out.push((record.epoch, format!("{:?}", record.state)));
            }
        }
        if event.revision() >= now {
            return out;
        }
    }
}
