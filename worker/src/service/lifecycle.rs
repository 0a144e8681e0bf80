//! The worker's part of the control path: registration under a lease, the keep-alive, the
//! placement watch, and the epoch protocol (DESIGN.md, "The control path").
//!
//! Epoch protocol, as one rank sees it: a `Pending` record that lists this worker at rank `r`
//! and is newer than what is installed → build the rank's model for `placement.ranks[r]` (shared
//! weights reused, only this rank's experts read) → pause the engine (the group agrees, so every
//! rank stops after the same step) → connect the data plane to the record's ranks → install
//! model and data plane (the sequences and their caches stay) → write `epochs/<n>/ready/<id>`.
//! When the record turns `Active`, the engine steps again. A record that does not list this
//! worker detaches it: its sequences end with UNAVAILABLE and requests are refused.

use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use moebius_coordinator::{
    EpochRecord, EpochState, Keys, LeaseId, StoreError, TopologyStore, WatchEvent,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::comm::TcpComm;
use crate::engine::LoadedModel;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::service::engine_thread::{EngineHandle, Installation};

/// Pause before re-opening a failed placement watch.
const WATCH_RETRY: Duration = Duration::from_millis(200);

/// Refreshes `lease` every `ttl / 3` until `stop`; fails with the lease lost when a refresh
/// says so or when no refresh has succeeded for a whole `ttl` (the store was unreachable).
pub async fn keep_alive(
    store: Arc<dyn TopologyStore>,
    lease: LeaseId,
    ttl: Duration,
    stop: CancellationToken,
) -> Result<()> {
    let period = ttl / 3;
    let mut last_ok = Instant::now();
    loop {
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            () = tokio::time::sleep(period) => {}
        }
        match store.keep_alive(lease).await {
            Ok(()) => last_ok = Instant::now(),
            Err(StoreError::LeaseLost(l)) => return Err(StoreError::LeaseLost(l).into()),
            Err(e) if last_ok.elapsed() >= ttl => {
                tracing::error!(error = %e, "no keep-alive succeeded for a whole lease TTL");
                return Err(StoreError::LeaseLost(lease).into());
            }
            Err(e) => tracing::warn!(error = %e, "lease keep-alive failed; retrying"),
        }
    }
}

/// Follows `keys.placement()`: a get, then a watch from the next revision, resumed after the
/// last seen revision when the stream fails. Publishes each epoch record on `records`.
pub async fn watch_placement(
    store: Arc<dyn TopologyStore>,
    keys: Keys,
    records: watch::Sender<Option<EpochRecord>>,
    stop: CancellationToken,
) -> Result<()> {
    let key = keys.placement();
    // `None`: start (again) from a get.
    let mut resume_from = None;
    loop {
        if stop.is_cancelled() {
            return Ok(());
        }
        let from = match resume_from {
            Some(from) => from,
            None => match store.get_prefix(&key).await {
                Ok((kvs, revision)) => {
                    if let Some(kv) = kvs.iter().find(|kv| kv.key == key) {
                        publish(&records, &kv.value);
                    }
                    revision + 1
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the placement; retrying");
                    retry_pause(&stop).await;
                    continue;
                }
            },
        };
        let mut watch = match store.watch_prefix(&key, from).await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the placement; retrying");
                resume_from = (!matches!(e, StoreError::Compacted(_))).then_some(from);
                retry_pause(&stop).await;
                continue;
            }
        };
        resume_from = Some(from);
        loop {
            let event = tokio::select! {
                () = stop.cancelled() => return Ok(()),
                e = watch.next() => e,
            };
            match event {
                Some(Ok(event)) => {
                    resume_from = Some(event.revision() + 1);
                    if let WatchEvent::Put(kv) = &event {
                        if kv.key == key {
                            publish(&records, &kv.value);
                        }
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "placement watch failed; resuming");
                    if matches!(e, StoreError::Compacted(_)) {
                        resume_from = None;
                    }
                    break;
                }
                None => {
                    tracing::warn!("placement watch ended; resuming");
                    break;
                }
            }
        }
        retry_pause(&stop).await;
    }
}

async fn retry_pause(stop: &CancellationToken) {
    tokio::select! {
        () = stop.cancelled() => {}
        () = tokio::time::sleep(WATCH_RETRY) => {}
    }
}

fn publish(records: &watch::Sender<Option<EpochRecord>>, value: &[u8]) {
    match serde_json::from_slice::<EpochRecord>(value) {
        Ok(record) => {
            records.send_replace(Some(record));
        }
        Err(e) => tracing::warn!(error = %e, "the placement is not a valid epoch record; ignored"),
    }
}

/// Everything the epoch follower needs.
pub struct EpochFollower {
    pub id: String,
    pub keys: Keys,
    pub store: Arc<dyn TopologyStore>,
    pub lease: LeaseId,
    pub model: Arc<LoadedModel>,
    /// The data-plane listener, kept for the life of the worker; each epoch's mesh accepts on a
    /// clone of it.
    pub data_listener: TcpListener,
    pub engine: Arc<EngineHandle>,
    pub connect_timeout: Duration,
    pub data_timeout: Duration,
}

impl EpochFollower {
    /// Applies every epoch record published on `records` until `stop`.
    pub async fn run(
        self,
        mut records: watch::Receiver<Option<EpochRecord>>,
        stop: CancellationToken,
    ) -> Result<()> {
        // The newest epoch this worker acted on, and whether it is installed here.
        let mut seen = 0u64;
        let mut installed: Option<u64> = None;
        loop {
            tokio::select! {
                () = stop.cancelled() => return Ok(()),
                changed = records.changed() => if changed.is_err() { return Ok(()) },
            }
            let Some(record) = records.borrow_and_update().clone() else {
                continue;
            };
            if record.epoch < seen {
                continue;
            }
            match record.rank_of(&self.id) {
                None => {
                    if record.epoch > seen || installed.is_some() {
                        tracing::info!(epoch = record.epoch, "not in this epoch; detaching");
                        self.engine
                            .detach("worker is not in the active epoch".into())
                            .await?;
                        installed = None;
                    }
                }
                Some(rank) => {
                    if installed != Some(record.epoch) {
                        match self.prepare(&record, rank).await {
                            Ok(()) => installed = Some(record.epoch),
                            Err(e) => {
                                tracing::error!(epoch = record.epoch, rank, error = %e,
                                    "cannot join the epoch; waiting for the next one");
                            }
                        }
                    }
                    if record.state == EpochState::Active && installed == Some(record.epoch) {
                        self.engine.resume(record.epoch)?;
                    }
                }
            }
            seen = record.epoch;
        }
    }

    /// Builds, pauses, connects, installs and acknowledges epoch `record` at `rank`.
    async fn prepare(&self, record: &EpochRecord, rank: usize) -> Result<()> {
        let epoch = record.epoch;
        tracing::info!(epoch, rank, slots = ?record.placement.ranks.get(rank), "joining epoch");
        let model = {
            let loaded = self.model.clone();
            let placement = record.placement.clone();
            blocking(move || {
                Model::new(loaded.shared.clone(), &loaded.checkpoint, &placement, rank)
            })
            .await?
        };
        // Stop stepping the old epoch (the whole old group stops after the same step).
        self.engine.pause().await?;
        let listener = self
            .data_listener
            .try_clone()
            .map_err(|e| Error::Comm(format!("cannot clone the data-plane listener: {e}")))?;
        let addresses: Vec<String> = record
            .workers
            .iter()
            .map(|w| w.data_address.clone())
            .collect();
        let (connect_timeout, data_timeout) = (self.connect_timeout, self.data_timeout);
        let comm = blocking(move || {
            let addrs = resolve(&addresses)?;
            let mut comm = TcpComm::connect(rank, listener, &addrs, connect_timeout)?;
            comm.set_timeout(Some(data_timeout))?;
            Ok(comm)
        })
        .await?;
        let expert_slots = record
            .placement
            .ranks
            .get(rank)
            .map(|s| s.iter().map(|&e| e as u32).collect())
            .unwrap_or_default();
        self.engine
            .install(Installation {
                epoch,
                rank,
                model,
                comm: Box::new(comm),
                expert_slots,
            })
            .await?;
        let ack = serde_json::json!({ "id": self.id, "epoch": epoch, "rank": rank });
        self.store
            .put(
                &self.keys.ready(epoch, &self.id),
                ack.to_string().into_bytes(),
                Some(self.lease),
            )
            .await?;
        tracing::info!(epoch, rank, "ready");
        Ok(())
    }
}

/// Resolves `host:port` strings, in order.
fn resolve(addresses: &[String]) -> Result<Vec<SocketAddr>> {
    addresses
        .iter()
        .map(|a| {
            a.to_socket_addrs()
                .ok()
                .and_then(|mut it| it.next())
                .ok_or_else(|| Error::Comm(format!("cannot resolve data-plane address {a:?}")))
        })
        .collect()
}

/// Runs blocking work (loading weights, connecting the mesh) off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Serve(format!("a blocking task failed: {e}")))?
}
