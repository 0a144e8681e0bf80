//! `MemoryStore`: the in-process `TopologyStore` of the single-process cluster, with etcd's
//! semantics.
//!
//! One global revision counter, bumped once per write, delete or lease expiry (a lease's keys
//! are deleted in one revision, as etcd does); per-key create and mod revisions; leases timed
//! with `tokio::time`, so tests can pause and advance the clock. Watches do not buffer: every
//! watch reads the shared, bounded event history from its next revision and waits on a
//! revision signal, so a slow watcher costs no memory and one that falls behind the history
//! gets `Compacted`, as with etcd.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use async_trait::async_trait;
use futures::stream;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::store::{
    Fence, KeyValue, LeaseId, Revision, StoreError, TopologyStore, WatchEvent, WatchStream,
};

/// Events kept for watches that start in the past, unless told otherwise.
pub const DEFAULT_HISTORY: usize = 16 * 1024;

/// The in-memory store. Create it inside a Tokio runtime: it owns a lease-expiry task, aborted
/// when the store is dropped (watch streams then end).
pub struct MemoryStore {
    inner: Arc<Inner>,
    expiry: JoinHandle<()>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.inner.lock();
        f.debug_struct("MemoryStore")
            .field("revision", &state.revision)
            .field("keys", &state.kvs.len())
            .field("leases", &state.leases.len())
            .finish()
    }
}

struct Inner {
    state: Mutex<State>,
    /// The latest revision; watches wait on it for new events.
    revision_tx: watch::Sender<Revision>,
    /// Wakes the expiry task when a lease with an earlier deadline appears.
    leases_changed: Notify,
}

struct Lease {
    ttl: Duration,
    deadline: Instant,
    keys: BTreeSet<String>,
}

struct State {
    revision: Revision,
    kvs: BTreeMap<String, KeyValue>,
    leases: HashMap<LeaseId, Lease>,
    next_lease: LeaseId,
    /// Events in revision order; at most `history_limit` of them.
    history: VecDeque<WatchEvent>,
    history_limit: usize,
    /// Watches from this revision or older cannot be served any more (0: nothing dropped).
    compacted: Revision,
}

impl State {
    fn record(&mut self, event: WatchEvent) {
        if self.history.len() >= self.history_limit {
            if let Some(old) = self.history.pop_front() {
                self.compacted = old.revision();
            }
        }
        self.history.push_back(event);
    }

    /// Deletes the keys of every lease whose deadline has passed, one revision per lease.
    fn expire(&mut self, now: Instant) {
        let expired: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(&id, _)| id)
            .collect();
        for id in expired {
            self.remove_lease(id);
        }
    }

    fn remove_lease(&mut self, id: LeaseId) -> bool {
        let Some(lease) = self.leases.remove(&id) else {
            return false;
        };
        if lease.keys.is_empty() {
            return true;
        }
        self.revision += 1;
        let revision = self.revision;
        for key in lease.keys {
            if let Some(prev) = self.kvs.remove(&key) {
                self.record(WatchEvent::Delete {
                    key,
                    revision,
                    prev: Some(prev),
                });
            }
        }
        true
    }

    fn put(
        &mut self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Revision, StoreError> {
        if let Some(id) = lease {
            if !self.leases.contains_key(&id) {
                return Err(StoreError::LeaseLost(id));
            }
        }
        self.revision += 1;
        let revision = self.revision;
        let old = self.kvs.get(key).map(|kv| (kv.create_revision, kv.lease));
        let create_revision = match old {
            Some((created, old_lease)) => {
                if old_lease != lease {
                    self.detach(key, old_lease);
                }
                created
            }
            None => revision,
        };
        if let Some(l) = lease.and_then(|id| self.leases.get_mut(&id)) {
            l.keys.insert(key.to_owned());
        }
        let kv = KeyValue {
            key: key.to_owned(),
            value,
            create_revision,
            mod_revision: revision,
            lease,
        };
        self.kvs.insert(key.to_owned(), kv.clone());
        self.record(WatchEvent::Put(kv));
        Ok(revision)
    }

    fn detach(&mut self, key: &str, lease: Option<LeaseId>) {
        if let Some(l) = lease.and_then(|id| self.leases.get_mut(&id)) {
            l.keys.remove(key);
        }
    }

    fn delete(&mut self, key: &str) {
        let Some(prev) = self.kvs.remove(key) else {
            return;
        };
        self.detach(key, prev.lease);
        self.revision += 1;
        self.record(WatchEvent::Delete {
            key: key.to_owned(),
            revision: self.revision,
            prev: Some(prev),
        });
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters more than losing the store, so keep serving.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` on the state after expiring due leases, then wakes watches if anything changed.
    fn with_state<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let (out, revision) = {
            let mut state = self.lock();
            state.expire(Instant::now());
            let out = f(&mut state);
            (out, state.revision)
        };
        self.revision_tx.send_if_modified(|r| {
            let changed = *r != revision;
            *r = revision;
            changed
        });
        out
    }
}

impl MemoryStore {
    /// An empty store that keeps [`DEFAULT_HISTORY`] events for watches from the past.
    ///
    /// # Panics
    /// Outside a Tokio runtime (it spawns its lease-expiry task).
    pub fn new() -> Self {
        Self::with_history(DEFAULT_HISTORY)
    }

    /// An empty store that keeps the last `history` events (at least one) for watches that
    /// start in the past; older starts get `Compacted`.
    pub fn with_history(history: usize) -> Self {
        let (revision_tx, _) = watch::channel(0);
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                revision: 0,
                kvs: BTreeMap::new(),
                leases: HashMap::new(),
                next_lease: 1,
                history: VecDeque::new(),
                history_limit: history.max(1),
                compacted: 0,
            }),
            revision_tx,
            leases_changed: Notify::new(),
        });
        let expiry = tokio::spawn(expiry_loop(Arc::downgrade(&inner)));
        Self { inner, expiry }
    }

    /// The store's current revision.
    pub fn revision(&self) -> Revision {
        self.inner.with_state(|s| s.revision)
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for MemoryStore {
    fn drop(&mut self) {
        self.expiry.abort();
    }
}

/// Deletes expired leases' keys when their deadline comes, so that watches see the Delete
/// events without waiting for the next call.
async fn expiry_loop(inner: Weak<Inner>) {
    loop {
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let next = inner.with_state(|s| s.leases.values().map(|l| l.deadline).min());
        let wake = inner.leases_changed.notified();
        match next {
            Some(deadline) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => {}
                    _ = wake => {}
                }
            }
            None => wake.await,
        }
    }
}

#[async_trait]
impl TopologyStore for MemoryStore {
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        if ttl.is_zero() {
            return Err(StoreError::Other("a lease needs a positive TTL".into()));
        }
        let id = self.inner.with_state(|s| {
            let id = s.next_lease;
            s.next_lease += 1;
            s.leases.insert(
                id,
                Lease {
                    ttl,
                    deadline: Instant::now() + ttl,
                    keys: BTreeSet::new(),
                },
            );
            id
        });
        self.inner.leases_changed.notify_one();
        Ok(id)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.inner.with_state(|s| match s.leases.get_mut(&lease) {
            Some(l) => {
                l.deadline = Instant::now() + l.ttl;
                Ok(())
            }
            None => Err(StoreError::LeaseLost(lease)),
        })
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        if self.inner.with_state(|s| s.remove_lease(lease)) {
            Ok(())
        } else {
            Err(StoreError::LeaseLost(lease))
        }
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Revision, StoreError> {
        self.inner.with_state(|s| s.put(key, value, lease))
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        Ok(self.inner.with_state(|s| s.kvs.get(key).cloned()))
    }

    async fn get_prefix(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        Ok(self.inner.with_state(|s| {
            let kvs = s
                .kvs
                .range::<str, _>((
                    std::ops::Bound::Included(prefix),
                    std::ops::Bound::Unbounded,
                ))
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(_, kv)| kv.clone())
                .collect();
            (kvs, s.revision)
        }))
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Revision,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<bool, StoreError> {
        self.inner.with_state(|s| {
            let current = s.kvs.get(key).map_or(0, |kv| kv.mod_revision);
            if current != expected {
                return Ok(false);
            }
            s.put(key, value, lease).map(|_| true)
        })
    }

    async fn compare_and_swap_fenced(
        &self,
        key: &str,
        expected: Revision,
        value: Vec<u8>,
        fence: &Fence,
    ) -> Result<bool, StoreError> {
        self.inner.with_state(|s| {
            let current = s.kvs.get(key).map_or(0, |kv| kv.mod_revision);
            let fenced = s
                .kvs
                .get(&fence.key)
                .is_some_and(|kv| kv.lease == Some(fence.lease));
            if current != expected || !fenced {
                return Ok(false);
            }
            s.put(key, value, None).map(|_| true)
        })
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.inner.with_state(|s| s.delete(key));
        Ok(())
    }

    async fn watch_prefix(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError> {
        let next = self.inner.with_state(|s| {
            if from <= 0 {
                // As etcd: no start revision means "from now on".
                return Ok(s.revision + 1);
            }
            if from <= s.compacted {
                return Err(StoreError::Compacted(s.compacted));
            }
            Ok(from)
        })?;
        let watch = Watch {
            inner: Arc::downgrade(&self.inner),
            revisions: self.inner.revision_tx.subscribe(),
            prefix: prefix.to_owned(),
            next,
            pending: VecDeque::new(),
            done: false,
        };
        Ok(Box::pin(stream::unfold(watch, Watch::next)))
    }
}

/// One watch's cursor into the shared history.
struct Watch {
    /// Weak, so that a forgotten watch does not keep the store alive.
    inner: Weak<Inner>,
    revisions: watch::Receiver<Revision>,
    prefix: String,
    /// The first revision not yet read from the history.
    next: Revision,
    pending: VecDeque<WatchEvent>,
    done: bool,
}

impl Watch {
    async fn next(mut self) -> Option<(Result<WatchEvent, StoreError>, Self)> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some((Ok(event), self));
            }
            if self.done {
                return None;
            }
            {
                let inner = self.inner.upgrade()?;
                // Mark the current revision seen before reading, so a write after the read
                // wakes `changed` below.
                self.revisions.borrow_and_update();
                let state = inner.lock();
                if self.next <= state.compacted {
                    self.done = true;
                    let err = StoreError::Compacted(state.compacted);
                    drop(state);
                    return Some((Err(err), self));
                }
                let start = state.history.partition_point(|e| e.revision() < self.next);
                let prefix = &self.prefix;
                self.pending.extend(
                    state
                        .history
                        .range(start..)
                        .filter(|e| e.key().starts_with(prefix.as_str()))
                        .cloned(),
                );
                self.next = state.revision + 1;
            }
            if self.pending.is_empty() && self.revisions.changed().await.is_err() {
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_watch_behind_the_history_is_compacted() {
        let store = MemoryStore::with_history(2);
        for i in 0..4 {
            store.put("/k", vec![i], None).await.unwrap();
        }
        // Revisions 1..=4; the history holds 3 and 4.
        assert!(matches!(
            store.watch_prefix("/", 2).await,
            Err(StoreError::Compacted(2))
        ));
        let mut w = store.watch_prefix("/", 3).await.unwrap();
        assert_eq!(w.next().await.unwrap().unwrap().revision(), 3);
        assert_eq!(w.next().await.unwrap().unwrap().revision(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_watch_that_falls_behind_gets_compacted() {
        let store = MemoryStore::with_history(2);
        let mut w = store.watch_prefix("/", 1).await.unwrap();
        for i in 0..5 {
            store.put("/k", vec![i], None).await.unwrap();
        }
        assert!(matches!(
            w.next().await,
            Some(Err(StoreError::Compacted(_)))
        ));
        assert!(w.next().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn lease_keys_move_with_a_rewrite_under_another_lease() {
        let store = MemoryStore::new();
        let a = store.grant_lease(Duration::from_secs(1)).await.unwrap();
        let b = store.grant_lease(Duration::from_secs(10)).await.unwrap();
        store.put("/k", b"1".to_vec(), Some(a)).await.unwrap();
        store.put("/k", b"2".to_vec(), Some(b)).await.unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let kv = store.get("/k").await.unwrap().unwrap();
        assert_eq!(kv.value, b"2");
        assert_eq!(kv.create_revision, 1);
        assert_eq!(kv.lease, Some(b));
        store.revoke_lease(b).await.unwrap();
        assert!(store.get("/k").await.unwrap().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn watches_end_when_the_store_is_dropped() {
        let store = MemoryStore::new();
        let mut w = store.watch_prefix("/", 0).await.unwrap();
        drop(store);
        assert!(w.next().await.is_none());
    }
}
