//! The live pool of workers: who is routable now, who is still a member of the group, how
//! loaded each is from this router's point of view, and the least-loaded pick with admission
//! control.
//!
//! The topology watch ([`crate::watch`]) feeds the pool the current epoch record and the
//! registered workers; the pool publishes a [`Routable`] snapshot through a `watch` channel that
//! requests, their sessions and the health reporter read without locking. A worker that failed
//! a call at the transport level is marked down and skipped for a short while (or until the
//! next epoch), so that a dead worker is not dialled again and again before the coordinator has
//! excluded it.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use moebius_coordinator::tls::{self, Tls};
use moebius_coordinator::{EpochRecord, EpochState, WorkerInfo};
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::transport::Channel;
use tracing::{info, warn};

use crate::error::RouterError;
use crate::metrics::RouterMetrics;

/// HTTP/2 pings on a worker connection while requests are open, so that a worker whose
/// machine vanished (no TCP reset) fails its requests within a few seconds instead of hanging.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(1);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a worker that failed at the transport level is skipped, unless a new epoch comes
/// first.
const DOWN_FOR: Duration = Duration::from_secs(3);

/// One routable worker and this router's requests on it.
#[derive(Debug)]
pub(crate) struct WorkerSlot {
    pub id: String,
    pub address: String,
    /// The registration this slot talks to; a worker that registered anew is another slot.
    pub incarnation: u64,
    /// Set when a call failed at the transport level: skipped until then.
    down_until: Mutex<Option<Instant>>,
    /// Most requests in flight; changes in place when a new epoch advertises a new capacity, so
    /// that requests already counted stay counted.
    limit: AtomicU32,
    in_flight: AtomicU32,
    /// Connects lazily on first use and reconnects by itself; shared by every request.
    pub channel: Channel,
}

impl WorkerSlot {
    fn connect(
        info: &WorkerInfo,
        limit: u32,
        tls: Option<&Tls>,
    ) -> Result<Self, tonic::transport::Error> {
        let channel = tls::endpoint(&info.address, tls)?
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(KEEP_ALIVE_INTERVAL)
            .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
            .tcp_nodelay(true)
            .connect_lazy();
        Ok(Self {
            id: info.id.clone(),
            address: info.address.clone(),
            incarnation: info.incarnation,
            down_until: Mutex::new(None),
            limit: AtomicU32::new(limit),
            in_flight: AtomicU32::new(0),
            channel,
        })
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Acquire)
    }

    fn down(&self) -> bool {
        self.down_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some_and(|until| Instant::now() < until)
    }

    fn set_down(&self, until: Option<Instant>) {
        *self
            .down_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = until;
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

    /// The worker, to hold on to while the request is borrowed elsewhere.
    pub fn slot(&self) -> Arc<WorkerSlot> {
        Arc::clone(&self.slot)
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
    /// The workers of the current epoch when it is active and they are still registered and
    /// not being drained, in rank order; empty otherwise.
    pub workers: Vec<Arc<WorkerSlot>>,
    /// `(id, incarnation)` of every worker of the current record, pending or active, that is
    /// still registered: the workers whose requests are alive. A request on any other worker
    /// is lost and is resubmitted.
    pub members: HashSet<(String, u64)>,
}

impl Routable {
    /// Whether requests on `slot` are still alive.
    pub fn is_member(&self, slot: &WorkerSlot) -> bool {
        self.members.contains(&(slot.id.clone(), slot.incarnation))
    }

    fn unavailable(&self, waited: Duration) -> RouterError {
        match self.epoch {
            // Every worker of the record is gone (its registration expired): none is left.
            Some((epoch, _)) if self.members.is_empty() => RouterError::NoLiveWorkers { epoch },
            Some((epoch, EpochState::Active)) => RouterError::NoLiveWorkers { epoch },
            _ => RouterError::NoActiveEpoch { waited },
        }
    }
}

/// One worker as [`Pool::view`] shows it.
#[derive(Debug, Clone)]
pub(crate) struct PoolWorker {
    pub id: String,
    pub in_flight: u32,
    pub capacity: u32,
    pub routable: bool,
}

/// The pool's workers and the ids of those being drained.
#[derive(Debug, Clone, Default)]
pub(crate) struct PoolView {
    pub workers: Vec<PoolWorker>,
    pub draining: BTreeSet<String>,
}

/// What the watch has seen of the topology; the pool derives [`Routable`] from it.
#[derive(Debug, Default)]
struct Topology {
    epoch: Option<EpochRecord>,
    /// Registered workers: id to incarnation.
    registered: HashMap<String, u64>,
    /// Workers being drained: they finish what they run, but get no new requests.
    draining: BTreeSet<String>,
    /// Slots by (id, address, incarnation), kept across epochs so that a worker's connection
    /// and in-flight count survive a rebalance.
    slots: HashMap<(String, String, u64), Arc<WorkerSlot>>,
}

/// The live pool of workers.
#[derive(Debug)]
pub(crate) struct Pool {
    limit_override: Option<u32>,
    metrics: Arc<RouterMetrics>,
    topology: Mutex<Topology>,
    routable: watch::Sender<Arc<Routable>>,
    /// Rotates the starting point of the least-loaded scan so that ties spread round-robin.
    cursor: AtomicUsize,
    /// Mutual TLS towards the workers; `None`: plaintext.
    tls: Option<Tls>,
}

impl Pool {
    #[cfg(test)]
    pub fn new(limit_override: Option<u32>) -> Self {
        Self::with_metrics(limit_override, Arc::default())
    }

    /// A pool that counts its routable workers, retries and migrations in `metrics`.
    pub fn with_metrics(limit_override: Option<u32>, metrics: Arc<RouterMetrics>) -> Self {
        Self {
            limit_override,
            metrics,
            topology: Mutex::new(Topology::default()),
            routable: watch::channel(Arc::new(Routable::default())).0,
            cursor: AtomicUsize::new(0),
            tls: None,
        }
    }

    /// The same pool, calling its workers over mutual TLS with `tls`.
    pub fn with_tls(self, tls: Option<Tls>) -> Self {
        Self { tls, ..self }
    }

    pub fn metrics(&self) -> &Arc<RouterMetrics> {
        &self.metrics
    }

    /// What the dashboard shows of the workers: the requests each has in flight, and whether
    /// new requests go to it.
    pub fn view(&self) -> PoolView {
        let routable = Arc::clone(&self.routable.borrow());
        let topology = self.topology.lock().unwrap_or_else(PoisonError::into_inner);
        let workers = topology
            .slots
            .values()
            .map(|slot| PoolWorker {
                id: slot.id.clone(),
                in_flight: slot.in_flight(),
                capacity: slot.limit.load(Ordering::Acquire),
                routable: !slot.down() && routable.workers.iter().any(|w| Arc::ptr_eq(w, slot)),
            })
            .collect();
        PoolView {
            workers,
            draining: topology.draining.clone(),
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
                (old, Some(new)) => {
                    info!(epoch = new.epoch, state = ?new.state, workers = new.workers.len(), "placement changed");
                    if old.as_ref().is_none_or(|o| o.epoch != new.epoch) {
                        // A new epoch: give workers marked down another chance.
                        topology.slots.values().for_each(|s| s.set_down(None));
                    }
                }
                (Some(_), None) => warn!("placement deleted: no epoch to route to"),
                (None, None) => {}
            }
            topology.epoch = record;
        });
    }

    /// Replaces the registered workers (id to incarnation).
    pub fn set_registered(&self, workers: HashMap<String, u64>) {
        self.update(|topology| topology.registered = workers);
    }

    /// Marks one worker as registered (with its incarnation) or gone (its lease expired).
    pub fn set_worker_registered(&self, id: &str, incarnation: Option<u64>) {
        self.update(|topology| match incarnation {
            Some(incarnation) => {
                topology.registered.insert(id.to_string(), incarnation);
            }
            None => {
                if topology.registered.remove(id).is_some() {
                    info!(worker = id, "worker registration gone: no longer routed to");
                }
            }
        });
    }

    /// Replaces the set of workers being drained.
    pub fn set_draining(&self, draining: BTreeSet<String>) {
        self.update(|topology| {
            for id in draining.difference(&topology.draining) {
                info!(worker = %id, "worker draining: no new requests");
            }
            topology.draining = draining;
        });
    }

    /// Skips `slot` for new requests for a little while: a call to it failed at the transport
    /// level (it died, or cannot be reached).
    pub fn mark_down(&self, slot: &WorkerSlot) {
        if !slot.down() {
            warn!(worker = %slot.id, address = %slot.address, "worker unreachable: skipped for {DOWN_FOR:?} or until the next epoch");
        }
        slot.set_down(Some(Instant::now() + DOWN_FOR));
        // Requests waiting for a routable worker look again.
        self.routable.send_modify(|_| {});
    }

    /// Resolves once requests on `slot` are lost: its worker left the group or its
    /// registration is gone.
    pub async fn lost(&self, slot: &WorkerSlot) {
        let mut rx = self.routable.subscribe();
        loop {
            if !rx.borrow_and_update().is_member(slot) {
                return;
            }
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    fn update(&self, change: impl FnOnce(&mut Topology)) {
        let mut topology = self.topology.lock().unwrap_or_else(PoisonError::into_inner);
        change(&mut topology);
        let mut routable = Routable {
            epoch: topology.epoch.as_ref().map(|r| (r.epoch, r.state)),
            workers: Vec::new(),
            members: HashSet::new(),
        };
        if let Some(record) = &topology.epoch {
            routable.members = record
                .workers
                .iter()
                .filter(|w| topology.registered.get(&w.id) == Some(&w.incarnation))
                .map(|w| (w.id.clone(), w.incarnation))
                .collect();
        }
        let mut slots = HashMap::new();
        let mut old_slots = std::mem::take(&mut topology.slots);
        if let Some(record) = topology
            .epoch
            .as_ref()
            .filter(|r| r.state == EpochState::Active)
        {
            for info in &record.workers {
                if !routable
                    .members
                    .contains(&(info.id.clone(), info.incarnation))
                {
                    continue;
                }
                let key = (info.id.clone(), info.address.clone(), info.incarnation);
                let limit = self.limit_override.unwrap_or(info.capacity);
                let slot = match old_slots.remove(&key) {
                    Some(slot) => {
                        slot.limit.store(limit, Ordering::Release);
                        slot
                    }
                    None => match WorkerSlot::connect(info, limit, self.tls.as_ref()) {
                        Ok(slot) => Arc::new(slot),
                        Err(err) => {
                            warn!(worker = %info.id, address = %info.address, "cannot route to worker, bad address: {err}");
                            continue;
                        }
                    },
                };
                if !topology.draining.contains(&info.id) {
                    routable.workers.push(Arc::clone(&slot));
                }
                slots.insert(key, slot);
            }
        }
        topology.slots = slots;
        self.metrics
            .routable_workers
            .set(routable.workers.len() as i64);
        self.routable.send_replace(Arc::new(routable));
    }

    /// Counts a new request against the least-loaded routable worker other than `exclude`.
    /// With none to route to (no active epoch yet, between epochs, every candidate down) waits
    /// up to `wait` for one.
    pub async fn acquire(
        &self,
        wait: Duration,
        exclude: Option<&str>,
    ) -> Result<InFlight, RouterError> {
        let mut rx = self.routable.subscribe();
        let until = Instant::now() + wait;
        loop {
            let routable = Arc::clone(&rx.borrow_and_update());
            if let Some(picked) = self.pick(&routable, exclude) {
                return picked;
            }
            let next_check = until.min(Instant::now() + DOWN_FOR);
            match tokio::time::timeout_at(next_check, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(RouterError::ShuttingDown),
                Err(_) if Instant::now() >= until => return Err(routable.unavailable(wait)),
                Err(_) => {} // a worker marked down may be back
            }
        }
    }

    /// The least-loaded candidate (routable, not down, not `exclude`) with room, admission
    /// refused when every candidate is full, or `None` when there is no candidate at all.
    fn pick(
        &self,
        routable: &Routable,
        exclude: Option<&str>,
    ) -> Option<Result<InFlight, RouterError>> {
        let candidates: Vec<&Arc<WorkerSlot>> = routable
            .workers
            .iter()
            .filter(|s| exclude != Some(s.id.as_str()) && !s.down())
            .collect();
        let n = candidates.len();
        if n == 0 {
            return None;
        }
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        loop {
            let mut best: Option<(&Arc<WorkerSlot>, u32)> = None;
            for i in 0..n {
                let slot = candidates[(start + i) % n];
                let load = slot.in_flight();
                if load < slot.limit.load(Ordering::Acquire)
                    && best.is_none_or(|(_, best_load)| load < best_load)
                {
                    best = Some((slot, load));
                }
            }
            let Some((slot, _)) = best else {
                return Some(Err(RouterError::AtCapacity {
                    workers: n,
                    in_flight: candidates.iter().map(|w| u64::from(w.in_flight())).sum(),
                }));
            };
            // Another request may have taken the last place since the scan; scan again.
            if let Some(guard) = InFlight::try_new(slot) {
                return Some(Ok(guard));
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
                    incarnation: 0,
                })
                .collect(),
            placement: Placement::uniform(ids.len(), (0..ids.len()).map(|r| vec![r]).collect()),
        }
    }

    fn pool(ids: &[&str], capacity: u32) -> Pool {
        let pool = Pool::new(None);
        pool.set_registered(ids.iter().map(|s| (s.to_string(), 0)).collect());
        pool.set_epoch(Some(record(1, EpochState::Active, ids, capacity)));
        pool
    }

    #[tokio::test]
    async fn least_loaded_then_full() {
        let pool = pool(&["a", "b"], 2);
        let mut guards = Vec::new();
        for _ in 0..4 {
            guards.push(pool.acquire(Duration::ZERO, None).await.expect("room"));
        }
        let on_a = guards.iter().filter(|g| g.worker().id == "a").count();
        assert_eq!(on_a, 2, "requests spread evenly");
        let err = pool.acquire(Duration::ZERO, None).await.expect_err("full");
        assert_eq!(err.kind(), "at_capacity");
        assert_eq!(
            err.to_string(),
            "all 2 workers are at capacity (4 requests in flight); retry later"
        );
        guards.pop();
        assert!(pool.acquire(Duration::ZERO, None).await.is_ok());
    }

    #[tokio::test]
    async fn pending_epoch_and_lost_registration() {
        let pool = pool(&["a", "b"], 4);
        pool.set_epoch(Some(record(2, EpochState::Pending, &["a"], 4)));
        let err = pool
            .acquire(Duration::from_millis(10), None)
            .await
            .expect_err("pending");
        assert_eq!(err.kind(), "no_active_epoch");

        pool.set_epoch(Some(record(2, EpochState::Active, &["a", "b"], 4)));
        pool.set_worker_registered("a", None);
        for _ in 0..3 {
            let guard = pool.acquire(Duration::ZERO, None).await.expect("b is live");
            assert_eq!(guard.worker().id, "b");
        }
        pool.set_worker_registered("b", None);
        let err = pool
            .acquire(Duration::from_millis(10), None)
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
            tokio::spawn(async move { pool.acquire(Duration::from_secs(10), None).await.is_ok() })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        pool.set_epoch(Some(record(2, EpochState::Active, &["a"], 4)));
        assert!(waiter.await.expect("joins"));
    }

    #[tokio::test]
    async fn retry_avoids_the_failed_worker_and_a_down_worker_is_skipped() {
        let pool = pool(&["a", "b"], 1);
        let first = pool.acquire(Duration::ZERO, None).await.expect("room");
        let id = first.worker().id.clone();
        let other = pool.acquire(Duration::ZERO, Some(&id)).await.expect("room");
        assert_ne!(first.worker().id, other.worker().id);
        let only = self::pool(&["a"], 4);
        assert!(only.acquire(Duration::ZERO, Some("a")).await.is_err());

        let guard = only.acquire(Duration::ZERO, None).await.expect("room");
        only.mark_down(guard.worker());
        let err = only
            .acquire(Duration::from_millis(10), None)
            .await
            .expect_err("a is down");
        assert_eq!(err.kind(), "no_live_workers");
        // A new epoch clears the mark.
        only.set_epoch(Some(record(2, EpochState::Active, &["a"], 4)));
        assert!(only.acquire(Duration::ZERO, None).await.is_ok());
    }

    #[tokio::test]
    async fn a_draining_worker_gets_no_new_requests_and_keeps_its_own() {
        let pool = pool(&["a", "b"], 4);
        let on_a = pool.acquire(Duration::ZERO, Some("b")).await.expect("room");
        pool.set_draining(BTreeSet::from(["a".to_string()]));
        for _ in 0..4 {
            let guard = pool
                .acquire(Duration::ZERO, None)
                .await
                .expect("b has room");
            assert_eq!(guard.worker().id, "b");
        }
        let lost = tokio::time::timeout(Duration::from_millis(20), pool.lost(on_a.worker()));
        assert!(lost.await.is_err(), "a's requests run to their end");
        pool.set_draining(BTreeSet::new());
        let guard = pool
            .acquire(Duration::ZERO, Some("b"))
            .await
            .expect("a is back");
        assert_eq!(guard.worker().id, "a");
    }

    #[tokio::test]
    async fn a_worker_left_out_of_the_record_is_lost() {
        let pool = pool(&["a", "b"], 4);
        let guard = pool.acquire(Duration::ZERO, Some("b")).await.expect("room");
        let lost = tokio::time::timeout(Duration::from_millis(20), pool.lost(guard.worker()));
        assert!(lost.await.is_err(), "a is a member of epoch 1");
        // Epoch 2 is pending without a: its requests are lost; b's are not.
        pool.set_epoch(Some(record(2, EpochState::Pending, &["b"], 4)));
        tokio::time::timeout(Duration::from_secs(1), pool.lost(guard.worker()))
            .await
            .expect("a is lost");
        assert!(pool
            .subscribe()
            .borrow()
            .members
            .contains(&("b".to_string(), 0)));
    }
}
