//! The worker's registration: its key under a lease, kept alive for the life of the worker,
//! and made anew (a new lease, a new incarnation) when the lease is lost or the worker was
//! excluded from its group. The worker exits only when told to: a lost lease (etcd unreachable
//! for longer than the TTL, the process paused) makes it a new member, not a dead one.

use std::sync::Arc;
use std::time::Duration;

use moebius_coordinator::{Keys, LeaseId, TopologyStore, WorkerInfo};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};

/// First pause after a failed registration attempt; doubles up to `MAX_RETRY`.
const MIN_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(2);

/// The registration in force: the lease the worker's keys live under, and the info (with its
/// incarnation) the leader copies into epoch records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    pub lease: LeaseId,
    pub info: WorkerInfo,
}

/// What the registration task needs.
pub struct Registration {
    pub store: Arc<dyn TopologyStore>,
    pub keys: Keys,
    /// The worker's info; the incarnation is replaced at every registration.
    pub info: WorkerInfo,
    pub ttl: Duration,
}

impl Registration {
    /// Grants a lease and writes the worker's key under it, once.
    pub async fn register(&self) -> Result<Registered> {
        let info = WorkerInfo {
            incarnation: rand::random(),
            ..self.info.clone()
        };
        let lease = self.store.grant_lease(self.ttl).await?;
        let value = serde_json::to_vec(&info)
            .map_err(|e| Error::Serve(format!("cannot encode the worker info: {e}")))?;
        self.store
            .put(&self.keys.worker(&info.id), value, Some(lease))
            .await?;
        tracing::info!(id = %info.id, lease, incarnation = info.incarnation, "registered");
        Ok(Registered { lease, info })
    }

    /// Keeps `first` alive until `stop`, and publishes the registration in force on `current`:
    /// `None` from the moment the lease is lost until the worker asks (on `renew`) to register
    /// again, which it does once it has stopped serving as the old member. A `renew` while the
    /// lease is alive gives the old lease up first (the worker was excluded).
    pub async fn hold(
        self,
        first: Registered,
        current: watch::Sender<Option<Registered>>,
        mut renew: mpsc::UnboundedReceiver<()>,
        stop: CancellationToken,
    ) {
        let mut held = Some(first);
        loop {
            let reg = match held.take() {
                Some(reg) => reg,
                None => match self.register_until(&stop).await {
                    Some(reg) => reg,
                    None => return,
                },
            };
            let lease = reg.lease;
            current.send_replace(Some(reg));
            tokio::select! {
                () = stop.cancelled() => return,
                lost = moebius_coordinator::lease::keep_alive(&*self.store, lease, self.ttl) => {
                    tracing::warn!(lease, error = %lost, "registration lost; rejoining as a new member");
                    current.send_replace(None);
                    // Wait until the worker has stopped serving as the old member.
                    tokio::select! {
                        () = stop.cancelled() => return,
                        asked = renew.recv() => if asked.is_none() { return },
                    }
                }
                asked = renew.recv() => {
                    if asked.is_none() {
                        return;
                    }
                    current.send_replace(None);
                    // Best effort: an old lease that cannot be revoked expires on its own.
                    let _ = self.store.revoke_lease(lease).await;
                }
            }
        }
    }

    /// Registers, retrying with a growing pause; `None` when stopped first.
    async fn register_until(&self, stop: &CancellationToken) -> Option<Registered> {
        let mut retry = MIN_RETRY;
        loop {
            tokio::select! {
                () = stop.cancelled() => return None,
                result = self.register() => match result {
                    Ok(reg) => return Some(reg),
                    Err(e) => tracing::warn!(error = %e, ?retry, "cannot register; retrying"),
                },
            }
            tokio::select! {
                () = stop.cancelled() => return None,
                () = tokio::time::sleep(retry) => {}
            }
            retry = (retry * 2).min(MAX_RETRY);
        }
    }
}
