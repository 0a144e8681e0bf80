//! The one get-watch-resume loop of every part: a prefix watch that rides through store
//! outages.
//!
//! The first [`PrefixWatch::next`] reads the whole prefix and yields it as a
//! [`Change::Snapshot`]; then the watch runs from that read's revision + 1 and yields events in
//! revision order. When the stream breaks (etcd restarted, the connection dropped) it resumes
//! from the last revision seen + 1; when the store compacted past that revision it starts over
//! with a fresh read (another snapshot). Store failures are retried with a growing pause, never
//! returned: a part that follows the topology keeps its last view while the store is away.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use crate::store::{KeyValue, Revision, StoreError, TopologyStore, WatchEvent, WatchStream};

/// First pause before retrying a failed read or watch; it doubles up to `MAX_RETRY`.
const MIN_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(2);

/// What changed under the prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Event(WatchEvent),
    /// The watch (re)started from a fresh read: this is the whole prefix now.
    Snapshot(Vec<KeyValue>),
}

impl Change {
    /// Follows a set of ids kept as keys `<prefix><id>` (drain orders, ready acknowledgements):
    /// a snapshot replaces the set, a put adds its id, a delete removes it.
    pub fn apply_ids(self, ids: &mut BTreeSet<String>, prefix: &str) {
        let id_of = |key: &str| {
            key.strip_prefix(prefix)
                .filter(|id| !id.is_empty())
                .map(str::to_owned)
        };
        match self {
            Change::Snapshot(kvs) => *ids = kvs.iter().filter_map(|kv| id_of(&kv.key)).collect(),
            Change::Event(WatchEvent::Put(kv)) => ids.extend(id_of(&kv.key)),
            Change::Event(WatchEvent::Delete { key, .. }) => {
                if let Some(id) = id_of(&key) {
                    ids.remove(&id);
                }
            }
        }
    }
}

/// A prefix watch that survives stream errors and store outages.
pub struct PrefixWatch {
    store: Arc<dyn TopologyStore>,
    prefix: String,
    /// The first revision not yet seen; `None` until the first read (or after a compaction).
    next: Option<Revision>,
    stream: Option<WatchStream>,
    /// Pause before the next retry after a failure.
    retry: Duration,
}

impl std::fmt::Debug for PrefixWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrefixWatch")
            .field("prefix", &self.prefix)
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

impl PrefixWatch {
    /// A watch of every key under `prefix`; nothing is read until the first [`next`](Self::next).
    pub fn new(store: Arc<dyn TopologyStore>, prefix: impl Into<String>) -> Self {
        Self {
            store,
            prefix: prefix.into(),
            next: None,
            stream: None,
            retry: MIN_RETRY,
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The next change. Waits (retrying) while the store is unreachable. Cancel-safe: dropping
    /// the future loses no event.
    pub async fn next(&mut self) -> Change {
        loop {
            match self.try_next().await {
                Ok(change) => {
                    self.retry = MIN_RETRY;
                    return change;
                }
                Err(e) => {
                    tracing::warn!(prefix = %self.prefix, error = %e, retry = ?self.retry,
                        "topology watch failed; retrying");
                    if matches!(e, StoreError::Compacted(_)) {
                        self.next = None;
                    }
                    self.stream = None;
                    tokio::time::sleep(self.retry).await;
                    self.retry = (self.retry * 2).min(MAX_RETRY);
                }
            }
        }
    }

    async fn try_next(&mut self) -> Result<Change, StoreError> {
        let Some(from) = self.next else {
            let (kvs, revision) = self.store.get_prefix(&self.prefix).await?;
            self.next = Some(revision + 1);
            return Ok(Change::Snapshot(kvs));
        };
        let stream = match &mut self.stream {
            Some(stream) => stream,
            None => {
                let stream = self.store.watch_prefix(&self.prefix, from).await?;
                self.stream.insert(stream)
            }
        };
        match stream.next().await {
            Some(Ok(event)) => {
                self.next = Some(event.revision() + 1);
                Ok(Change::Event(event))
            }
            Some(Err(e)) => Err(e),
            None => Err(StoreError::Other("the watch stream ended".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStore;

    #[tokio::test(start_paused = true)]
    async fn snapshot_then_events_then_a_snapshot_after_compaction() {
        let store = Arc::new(MemoryStore::with_history(4));
        store.put("/p/a", b"1".to_vec(), None).await.unwrap();
        let mut watch = PrefixWatch::new(store.clone(), "/p/");
        match watch.next().await {
            Change::Snapshot(kvs) => assert_eq!(kvs.len(), 1),
            other => panic!("expected a snapshot, got {other:?}"),
        }
        store.put("/p/b", b"2".to_vec(), None).await.unwrap();
        match watch.next().await {
            Change::Event(WatchEvent::Put(kv)) => assert_eq!(kv.key, "/p/b"),
            other => panic!("expected b's put, got {other:?}"),
        }
        // Fall behind the bounded history: the watch starts over from a read.
        watch.stream = None;
        for i in 0..8 {
            store.put("/p/c", vec![i], None).await.unwrap();
        }
        match watch.next().await {
            Change::Snapshot(kvs) => assert_eq!(kvs.len(), 3),
            other => panic!("expected a fresh snapshot, got {other:?}"),
        }
    }
}
