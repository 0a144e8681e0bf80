//! The store conformance suite against a real etcd (started per test; the tests fail, never
//! skip, when the `etcd` binary is missing), plus etcd-only behaviour.

// Test code: a failed call is a failed test.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use futures::StreamExt;
use moebius_coordinator::{EtcdStore, StoreError, TopologyStore};

async fn connect(server: &moebius_coordinator::EtcdServer) -> EtcdStore {
    EtcdStore::connect(&server.endpoints(), Duration::from_secs(5))
        .await
        .unwrap()
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test]
        async fn $name() {
            let server = support::etcd();
            support::$name(&connect(&server).await).await;
        }
    )*};
}

conformance!(
    put_get_prefix_and_revisions,
    cas_creates_if_absent_once,
    cas_on_a_stale_revision_fails,
    fenced_cas_needs_the_fence_key_under_its_lease,
    lease_expiry_deletes_keys_and_watch_sees_it,
    keep_alive_on_an_expired_lease_is_lease_lost,
    revoke_deletes_keys_now,
    watch_from_an_old_revision_replays_in_order,
);

#[tokio::test]
async fn a_watch_from_a_compacted_revision_is_compacted() {
    let server = support::etcd();
    let store = connect(&server).await;
    let r1 = store.put("/c/k", b"1".to_vec(), None).await.unwrap();
    let r2 = store.put("/c/k", b"2".to_vec(), None).await.unwrap();
    store.client().clone().compact(r2, None).await.unwrap();
    let mut watch = store.watch_prefix("/c/", r1).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(10), watch.next()).await {
        Ok(Some(Err(StoreError::Compacted(rev)))) => assert_eq!(rev, r2),
        other => panic!("expected Compacted, got {other:?}"),
    }
}

#[tokio::test]
async fn connecting_to_nothing_is_unreachable_and_names_the_endpoint() {
    // A port nobody listens on: bind one and let it go.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let endpoint = format!("http://{addr}");
    match EtcdStore::connect(std::slice::from_ref(&endpoint), Duration::from_millis(500)).await {
        Err(e @ StoreError::Unreachable { .. }) => {
            assert!(e.to_string().contains(&endpoint), "{e}");
        }
        other => panic!("expected Unreachable, got {other:?}"),
    }
}

#[test]
fn a_missing_etcd_binary_says_what_to_install() {
    let err =
        moebius_coordinator::EtcdServer::start_binary(std::path::Path::new("/nonexistent/etcd"))
            .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    assert!(err.to_string().contains("etcd-server"), "{err}");
}
