//! Follows the cluster's topology in the store and feeds the [`Pool`]: the `placement` key (the
//! current epoch) and the `workers/` prefix (who still holds a lease).
//!
//! Each key range is read with a prefix get, then watched from that revision + 1; after a
//! stream error the watch resumes from the last revision seen + 1, and after a compaction it
//! starts over from a fresh get.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use moebius_coordinator::{
    EpochRecord, KeyValue, Keys, Revision, StoreError, TopologyStore, WatchEvent,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::pool::Pool;

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Which key range a follower feeds into the pool.
#[derive(Debug, Clone, Copy)]
enum Feed {
    Placement,
    Workers,
}

/// Follows placement and registrations until `stop` is cancelled.
pub(crate) async fn watch_topology(
    store: Arc<dyn TopologyStore>,
    keys: Keys,
    pool: Arc<Pool>,
    stop: CancellationToken,
) {
    tokio::join!(
        follow(&*store, &keys, Feed::Placement, &pool, &stop),
        follow(&*store, &keys, Feed::Workers, &pool, &stop),
    );
}

async fn follow(
    store: &dyn TopologyStore,
    keys: &Keys,
    feed: Feed,
    pool: &Pool,
    stop: &CancellationToken,
) {
    let prefix = match feed {
        Feed::Placement => keys.placement(),
        Feed::Workers => keys.workers(),
    };
    // The revision to watch from; `None` when a fresh get is needed first.
    let mut next: Option<Revision> = None;
    let mut backoff = MIN_BACKOFF;
    while !stop.is_cancelled() {
        let from = match next {
            Some(from) => from,
            None => match store.get_prefix(&prefix).await {
                Ok((kvs, revision)) => {
                    apply_snapshot(pool, keys, feed, &prefix, kvs);
                    revision + 1
                }
                Err(err) => {
                    warn!(%prefix, "reading the topology failed, retrying in {backoff:?}: {err}");
                    backoff = pause(backoff, stop).await;
                    continue;
                }
            },
        };
        next = Some(from);
        let mut stream = match store.watch_prefix(&prefix, from).await {
            Ok(stream) => stream,
            Err(err) => {
                if matches!(err, StoreError::Compacted(_)) {
                    next = None;
                }
                warn!(%prefix, "watching the topology failed, retrying in {backoff:?}: {err}");
                backoff = pause(backoff, stop).await;
                continue;
            }
        };
        loop {
            let item = tokio::select! {
                _ = stop.cancelled() => return,
                item = stream.next() => item,
            };
            match item {
                Some(Ok(event)) => {
                    next = Some(event.revision() + 1);
                    backoff = MIN_BACKOFF;
                    apply_event(pool, keys, feed, &prefix, event);
                }
                Some(Err(err)) => {
                    if matches!(err, StoreError::Compacted(_)) {
                        next = None;
                    }
                    warn!(%prefix, "topology watch broke, resuming in {backoff:?}: {err}");
                    break;
                }
                None => {
                    debug!(%prefix, "topology watch ended, resuming");
                    break;
                }
            }
        }
        backoff = pause(backoff, stop).await;
    }
}

/// Sleeps `backoff` (or until stopped) and returns the next, longer backoff.
async fn pause(backoff: Duration, stop: &CancellationToken) -> Duration {
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = tokio::time::sleep(backoff) => {}
    }
    (backoff * 2).min(MAX_BACKOFF)
}

fn apply_snapshot(pool: &Pool, keys: &Keys, feed: Feed, prefix: &str, kvs: Vec<KeyValue>) {
    match feed {
        Feed::Placement => {
            let record = kvs
                .iter()
                .find(|kv| kv.key == prefix)
                .and_then(|kv| decode_epoch(&kv.value));
            pool.set_epoch(record);
        }
        Feed::Workers => {
            let ids: HashSet<String> = kvs
                .iter()
                .filter_map(|kv| worker_id(keys, &kv.key))
                .map(str::to_string)
                .collect();
            pool.set_registered(ids);
        }
    }
}

fn apply_event(pool: &Pool, keys: &Keys, feed: Feed, prefix: &str, event: WatchEvent) {
    match (feed, event) {
        (Feed::Placement, WatchEvent::Put(kv)) if kv.key == prefix => {
            // A record that does not decode leaves the last good one in place.
            if let Some(record) = decode_epoch(&kv.value) {
                pool.set_epoch(Some(record));
            }
        }
        (Feed::Placement, WatchEvent::Delete { key, .. }) if key == prefix => pool.set_epoch(None),
        (Feed::Placement, _) => {}
        (Feed::Workers, event) => {
            let registered = matches!(event, WatchEvent::Put(_));
            if let Some(id) = worker_id(keys, event.key()) {
                pool.set_worker_registered(id, registered);
            }
        }
    }
}

fn worker_id<'a>(keys: &Keys, key: &'a str) -> Option<&'a str> {
    key.strip_prefix(&keys.workers())
        .filter(|id| !id.is_empty() && !id.contains('/'))
}

fn decode_epoch(value: &[u8]) -> Option<EpochRecord> {
    match serde_json::from_slice(value) {
        Ok(record) => Some(record),
        Err(err) => {
            warn!("ignoring a placement record that does not decode: {err}");
            None
        }
    }
}
