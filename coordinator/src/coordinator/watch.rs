//! A prefix watch that survives stream errors: it starts with a get, watches from that
//! revision + 1, resumes from the last revision seen + 1, and falls back to a fresh get when
//! the store compacted past it.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use crate::store::{KeyValue, Revision, StoreError, TopologyStore, WatchEvent, WatchStream};

/// Pause before reopening a watch whose stream ended, so a flapping store is not hammered.
const REOPEN_DELAY: Duration = Duration::from_millis(200);

/// What changed under the prefix.
pub(crate) enum Change {
    Event(WatchEvent),
    /// The watch had to restart from a fresh read: this is the whole prefix now.
    Snapshot(Vec<KeyValue>),
}

pub(crate) struct PrefixWatch {
    store: Arc<dyn TopologyStore>,
    prefix: String,
    /// The first revision not yet seen.
    next: Revision,
    stream: Option<WatchStream>,
}

impl PrefixWatch {
    /// Reads the prefix and opens the watch right after it.
    pub(crate) async fn start(
        store: Arc<dyn TopologyStore>,
        prefix: String,
    ) -> Result<(Self, Vec<KeyValue>), StoreError> {
        let (kvs, revision) = store.get_prefix(&prefix).await?;
        let stream = store.watch_prefix(&prefix, revision + 1).await?;
        let watch = Self {
            store,
            prefix,
            next: revision + 1,
            stream: Some(stream),
        };
        Ok((watch, kvs))
    }

    /// The next change. An error means the store could not be reached to reopen the watch.
    pub(crate) async fn next(&mut self) -> Result<Change, StoreError> {
        loop {
            let stream = match &mut self.stream {
                Some(stream) => stream,
                None => {
                    tokio::time::sleep(REOPEN_DELAY).await;
                    match self.store.watch_prefix(&self.prefix, self.next).await {
                        Ok(stream) => self.stream.insert(stream),
                        Err(StoreError::Compacted(_)) => return self.resync().await,
                        Err(e) => return Err(e),
                    }
                }
            };
            match stream.next().await {
                Some(Ok(event)) => {
                    self.next = event.revision() + 1;
                    return Ok(Change::Event(event));
                }
                Some(Err(StoreError::Compacted(_))) => return self.resync().await,
                Some(Err(e)) => {
                    tracing::warn!(prefix = %self.prefix, error = %e, "watch failed; resuming");
                    self.stream = None;
                }
                None => {
                    tracing::debug!(prefix = %self.prefix, "watch ended; resuming");
                    self.stream = None;
                }
            }
        }
    }

    async fn resync(&mut self) -> Result<Change, StoreError> {
        tracing::warn!(prefix = %self.prefix, "watch compacted; re-reading the prefix");
        self.stream = None;
        let (kvs, revision) = self.store.get_prefix(&self.prefix).await?;
        self.next = revision + 1;
        self.stream = Some(self.store.watch_prefix(&self.prefix, self.next).await?);
        Ok(Change::Snapshot(kvs))
    }
}
