//! The live pool of workers: who is routable now, how loaded each is from this router's point
//! of view, and the least-loaded pick with admission control.
//!
//! The topology watch ([`crate::watch`]) feeds the pool the current epoch record and the set of
//! registered workers; the pool publishes a [`Routable`] snapshot through a `watch` channel that
//! requests and the health reporter read without locking.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use moebius_coordinator::{EpochRecord, EpochState, WorkerInfo};
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use tracing::{info, warn};

use crate::error::RouterError;

/// HTTP/2 pings on a worker connection while requests are open, so that a worker whose
/// machine vanished (no TCP reset) fails its requests within a few seconds instead of hanging.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(1);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// One routable worker and this router's requests on it.
#[derive(Debug)]
pub(crate) struct WorkerSlot {
    pub id: String,
    pub address: String,
    /// Most requests in flight; changes in place when a new epoch advertises a new capacity, so
    /// that requests already counted stay counted.
    limit: AtomicU32,
    in_flight: AtomicU32,
    /// Connects lazily on first use and reconnects by itself; shared by every request.
    pub channel: Channel,
}

impl WorkerSlot {
    fn connect(info: &WorkerInfo, limit: u32) -> Result<Self, tonic::transport::Error> {
        let uri = if info.address.contains("://") {
            info.address.clone()
        } else {
            format!("http://{}", info.address)
        };
        let channel = Endpoint::from_shared(uri)?
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(KEEP_ALIVE_INTERVAL)
            .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
            .tcp_nodelay(true)
            .connect_lazy();
        Ok(Self {
            id: info.id.clone(),
            address: info.address.clone(),
            limit: AtomicU32::new(limit),
            in_flight: AtomicU32::new(0),
            channel,
        })
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Acquire)
    }
}

/// A request counted against a worker; the count drops when this does, whichever way the
/// request ends.
#[derive(Debug)]
pub(crate) struct InFlight {
    slot: Arc<WorkerSlot>,
}

impl InFlight {
    fn try_new(slot: &Arc<WorkerSlot>) -> Option<Self> {
        let limit = slot.limit.load(Ordering::Acquire);
        slot.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| Self {
                slot: Arc::clone(slot),
            })
    }

    pub fn worker(&self) -> &WorkerSlot {
        &self.slot
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.slot.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What the router may route to at one moment.
#[derive(Debug, Default)]
pub(crate) struct Routable {
    /// The epoch of the current placement record and its state; `None` before the first.
    pub epoch: Option<(u64, EpochState)>,
    /// The workers of the current epoch when it is active and they are still registered, in
    /// rank order; empty otherwise.
    pub workers: Vec<Arc<WorkerSlot>>,
}

impl Routable {
    fn unavailable(&self, waited: Duration) -> RouterError {
        match self.epoch {
            Some((epoch, EpochState::Active)) => RouterError::NoLiveWorkers { epoch },
            _ => RouterError::NoActiveEpoch { waited },
        }
    }
}

/// What the watch has seen of the topology; the pool derives [`Routable`] from it.
#[derive(Debug, Default)]
struct Topology {
    epoch: Option<EpochRecord>,
    registered: HashSet<String>,
    /// Slots by (id, address), kept across epochs so that a worker's connection and in-flight
    /// count survive a rebalance.
    slots: HashMap<(String, String), Arc<WorkerSlot>>,
}

/// The live pool of workers.
#[derive(Debug)]
pub(crate) struct Pool {
    limit_override: Option<u32>,
    topology: Mutex<Topology>,
    routable: watch::Sender<Arc<Routable>>,
    /// Rotates the starting point of the least-loaded scan so that ties spread round-robin.
    cursor: AtomicUsize,
}

impl Pool {
    pub fn new(limit_override: Option<u32>) -> Self {
        Self {
            limit_override,
            topology: Mutex::new(Topology::default()),
            routable: watch::channel(Arc::new(Routable::default())).0,
            cursor: AtomicUsize::new(0),
        }
    }

    /// Follows the routable set as it changes.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Routable>> {
        self.routable.subscribe()
    }

    /// Replaces the current epoch record (`None`: the placement key is gone).
    pub fn set_epoch(&self, record: Option<EpochRecord>) {
        self.update(|topology| {
            match (&topology.epoch, &record) {
                (Some(old), Some(new)) if old.epoch == new.epoch && old.state == new.state => {}
                (_, Some(new)) => info!(epoch = new.epoch, state = ?new.state, workers = new.workers.len(), "placement changed"),
                (Some(_), None) => warn!("placement deleted: no epoch to route to"),
                (None, None) => {}
            }
            topology.epoch = record;
        });
    }

    /// Replaces the set of registered worker ids.
    pub fn set_registered(&self, ids: HashSet<String>) {
        self.update(|topology| topology.registered = ids);
    }

    /// Marks one worker as registered or gone (its lease expired).
    pub fn set_worker_registered(&self, id: &str, registered: bool) {
        self.update(|topology| {
            if registered {
                topology.registered.insert(id.to_string());
            } else if topology.registered.remove(id) {
                info!(worker = id, "worker registration gone: no longer routed to");
            }
        });
    }

    fn update(&self, change: impl FnOnce(&mut Topology)) {
        let mut topology = match self.topology.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        change(&mut topology);
        let mut routable = Routable {
            epoch: topology.epoch.as_ref().map(|r| (r.epoch, r.state)),
            workers: Vec::new(),
        };
        let mut slots = HashMap::new();
        let mut old_slots = std::mem::take(&mut topology.slots);
        if let Some(record) = topology
            .epoch
            .as_ref()
            .filter(|r| r.state == EpochState::Active)
        {
            for info in &record.workers {
                if !topology.registered.contains(&info.id) {
                    continue;
                }
                let key = (info.id.clone(), info.address.clone());
                let limit = self.limit_override.unwrap_or(info.capacity);
                let slot = match old_slots.remove(&key) {
                    Some(slot) => {
                        slot.limit.store(limit, Ordering::Release);
                        slot
                    }
                    None => match WorkerSlot::connect(info, limit) {
                        Ok(slot) => Arc::new(slot),
                        Err(err) => {
                            warn!(worker = %info.id, address = %info.address, "cannot route to worker, bad address: {err}");
                            continue;
                        }
                    },
                };
                routable.workers.push(Arc::clone(&slot));
                slots.insert(key, slot);
            }
        }
        topology.slots = slots;
        self.routable.send_replace(Arc::new(routable));
    }

    /// Counts a new request against the least-loaded routable worker. With no routable worker
    /// (no active epoch yet, or between epochs) waits up to `wait` for one.
    pub async fn acquire(&self, wait: Duration) -> Result<InFlight, RouterError> {
        let mut rx = self.routable.subscribe();
        let until = Instant::now() + wait;
        loop {
            let routable = Arc::clone(&rx.borrow_and_update());
            if !routable.workers.is_empty() {
                return self.pick(&routable, None);
            }
            match tokio::time::timeout_at(until, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(RouterError::ShuttingDown),
                Err(_) => return Err(routable.unavailable(wait)),
            }
        }
    }

    /// Counts a retry against the least-loaded routable worker other than `exclude`, now.
    pub fn acquire_other(&self, exclude: &str) -> Result<InFlight, RouterError> {
        let routable = Arc::clone(&self.routable.borrow());
        self.pick(&routable, Some(exclude))
    }

    fn pick(&self, routable: &Routable, exclude: Option<&str>) -> Result<InFlight, RouterError> {
        let workers = &routable.workers;
        let n = workers.len();
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        loop {
            let mut best: Option<(&Arc<WorkerSlot>, u32)> = None;
            for i in 0..n {
                let slot = &workers[(start + i) % n];
                if exclude == Some(slot.id.as_str()) {
                    continue;
                }
                let load = slot.in_flight();
                if load < slot.limit.load(Ordering::Acquire)
                    && best.is_none_or(|(_, best_load)| load < best_load)
                {
                    best = Some((slot, load));
                }
            }
            let Some((slot, _)) = best else {
                return Err(RouterError::AtCapacity {
                    workers: n,
                    in_flight: workers.iter().map(|w| u64::from(w.in_flight())).sum(),
                });
            };
            // Another request may have taken the last place since the scan; scan again.
            if let Some(guard) = InFlight::try_new(slot) {
                return Ok(guard);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use moebius_coordinator::Placement;

    use super::*;

    fn record(epoch: u64, state: EpochState, ids: &[&str], capacity: u32) -> EpochRecord {
        EpochRecord {
            epoch,
            state,
            workers: ids
                .iter()
                .enumerate()
                .map(|(i, id)| WorkerInfo {
                    id: id.to_string(),
                    address: format!("127.0.0.1:{}", 1000 + i),
                    data_address: String::new(),
                    device: "cpu".into(),
                    capacity,
                })
                .collect(),
            placement: Placement {
                num_experts: ids.len(),
                ranks: (0..ids.len()).map(|r| vec![r]).collect(),
            },
        }
    }

    fn pool(ids: &[&str], capacity: u32) -> Pool {
        let pool = Pool::new(None);
        pool.set_registered(ids.iter().map(|s| s.to_string()).collect());
        pool.set_epoch(Some(record(1, EpochState::Active, ids, capacity)));
        pool
    }

    #[tokio::test]
    async fn least_loaded_then_full() {
        let pool = pool(&["a", "b"], 2);
        let mut guards = Vec::new();
        for _ in 0..4 {
            guards.push(pool.acquire(Duration::ZERO).await.expect("room"));
        }
        let on_a = guards.iter().filter(|g| g.worker().id == "a").count();
        assert_eq!(on_a, 2, "requests spread evenly");
        let err = pool.acquire(Duration::ZERO).await.expect_err("full");
        assert_eq!(err.kind(), "at_capacity");
        assert_eq!(
            err.to_string(),
            "all 2 workers are at capacity (4 requests in flight); retry later"
        );
        guards.pop();
        assert!(pool.acquire(Duration::ZERO).await.is_ok());
    }

    #[tokio::test]
    async fn pending_epoch_and_lost_registration() {
        let pool = pool(&["a", "b"], 4);
        pool.set_epoch(Some(record(2, EpochState::Pending, &["a"], 4)));
        let err = pool
            .acquire(Duration::from_millis(10))
            .await
            .expect_err("pending");
        assert_eq!(err.kind(), "no_active_epoch");

        pool.set_epoch(Some(record(2, EpochState::Active, &["a", "b"], 4)));
        pool.set_worker_registered("a", false);
        for _ in 0..3 {
            let guard = pool.acquire(Duration::ZERO).await.expect("b is live");
            assert_eq!(guard.worker().id, "b");
        }
        pool.set_worker_registered("b", false);
        let err = pool
            .acquire(Duration::from_millis(10))
            .await
            .expect_err("none");
        assert_eq!(err.kind(), "no_live_workers");
    }

    #[tokio::test]
    async fn waits_for_an_active_epoch() {
        let pool = Arc::new(pool(&["a"], 4));
        pool.set_epoch(Some(record(2, EpochState::Pending, &["a"], 4)));
        let waiter = {
            let pool = Arc::clone(&pool);
            tokio::spawn(async move { pool.acquire(Duration::from_secs(10)).await.is_ok() })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        pool.set_epoch(Some(record(2, EpochState::Active, &["a"], 4)));
        assert!(waiter.await.expect("joins"));
    }

    #[tokio::test]
    async fn retry_avoids_the_failed_worker() {
        let pool = pool(&["a", "b"], 1);
        let first = pool.acquire(Duration::ZERO).await.expect("room");
        let other = pool.acquire_other(&first.worker().id).expect("room");
        assert_ne!(first.worker().id, other.worker().id);
        let only = self::pool(&["a"], 4);
        assert!(only.acquire_other("a").is_err());
    }
}
