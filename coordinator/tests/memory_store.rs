//! The store conformance suite against `MemoryStore`, on paused time.

// Test code: a failed call is a failed test.
#![allow(clippy::unwrap_used)]

mod support;

use moebius_coordinator::MemoryStore;

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test(start_paused = true)]
        async fn $name() {
            support::$name(&MemoryStore::new()).await;
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
