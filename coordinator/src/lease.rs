//! The one keep-alive loop of every part that holds a lease (workers, coordinators).

use std::time::Duration;

use tokio::time::Instant;

use crate::store::{LeaseId, StoreError, TopologyStore};

/// Refreshes `lease` every `ttl / 3` and returns once the store says it is gone (expired or
/// revoked): the caller's keys under it are gone too.
///
/// An unreachable store is not a loss. etcd gives every lease a fresh TTL when it comes back
/// (a restart, a new leader), so a part that keeps trying through an outage keeps its lease and
/// its place; if the lease did expire meanwhile, the first answer says so. A part that really
/// lost its role while cut off cannot do harm meanwhile: leader writes are fenced
/// ([`Fence`](crate::store::Fence)), and a worker's peers exclude it.
pub async fn keep_alive(store: &dyn TopologyStore, lease: LeaseId, ttl: Duration) -> StoreError {
    let period = ttl / 3;
    let mut last_ok = Instant::now();
    let mut warned = false;
    loop {
        tokio::time::sleep(period).await;
        let result = match tokio::time::timeout(
            period.max(Duration::from_millis(10)),
            store.keep_alive(lease),
        )
        .await
        {
            Ok(result) => result,
            Err(_) => Err(StoreError::Other(format!(
                "keep-alive had no answer within {period:?}"
            ))),
        };
        match result {
            Ok(()) => {
                if warned {
                    tracing::info!(lease, after = ?last_ok.elapsed(), "the store answers keep-alives again");
                    warned = false;
                }
                last_ok = Instant::now();
            }
            Err(e @ StoreError::LeaseLost(_)) => return e,
            Err(e) => {
                if !warned || last_ok.elapsed() >= ttl {
                    tracing::warn!(lease, error = %e, unanswered = ?last_ok.elapsed(),
                        "lease keep-alive failed; retrying until the store answers");
                    warned = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStore;

    #[tokio::test(start_paused = true)]
    async fn keeps_a_lease_alive_until_it_is_revoked() {
        let store = MemoryStore::new();
        let ttl = Duration::from_secs(3);
        let lease = store.grant_lease(ttl).await.unwrap();
        store.put("/k", b"v".to_vec(), Some(lease)).await.unwrap();
        let lost =
            tokio::time::timeout(Duration::from_secs(30), keep_alive(&store, lease, ttl)).await;
        assert!(lost.is_err(), "a kept lease is not lost: {lost:?}");
        assert!(
            store.get("/k").await.unwrap().is_some(),
            "kept alive for 10 TTLs"
        );
        store.revoke_lease(lease).await.unwrap();
        let lost = keep_alive(&store, lease, ttl).await;
        assert!(
            matches!(lost, StoreError::LeaseLost(l) if l == lease),
            "{lost}"
        );
    }
}
