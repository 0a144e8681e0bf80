//! Follows the cluster's topology in the store and feeds the [`Pool`]: the `placement` key (the
//! current epoch), the `workers/` prefix (who holds a lease, in which incarnation) and the
//! `drain/` prefix (workers an operator is scaling down: no new requests), each through the
//! shared [`PrefixWatch`], which rides through store outages (the router keeps
//! routing on its last view meanwhile).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use moebius_coordinator::{
    Change, EpochRecord, KeyValue, Keys, PrefixWatch, TopologyStore, WatchEvent, WorkerInfo,
};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::pool::Pool;

/// Which key range a follower feeds into the pool.
#[derive(Debug, Clone, Copy)]
enum Feed {
    Placement,
    Workers,
    Drains,
}

/// Follows placement and registrations until `stop` is cancelled.
pub(crate) async fn watch_topology(
    store: Arc<dyn TopologyStore>,
    keys: Keys,
    pool: Arc<Pool>,
    stop: CancellationToken,
) {
    tokio::join!(
        follow(store.clone(), &keys, Feed::Placement, &pool, &stop),
        follow(store.clone(), &keys, Feed::Workers, &pool, &stop),
        follow(store, &keys, Feed::Drains, &pool, &stop),
    );
}

async fn follow(
    store: Arc<dyn TopologyStore>,
    keys: &Keys,
    feed: Feed,
    pool: &Pool,
    stop: &CancellationToken,
) {
    let prefix = match feed {
        Feed::Placement => keys.placement(),
        Feed::Workers => keys.workers(),
        Feed::Drains => keys.drains(),
    };
    let mut draining = BTreeSet::new();
    let mut watch = PrefixWatch::new(store, prefix.clone());
    loop {
        let change = tokio::select! {
            _ = stop.cancelled() => return,
            change = watch.next() => change,
        };
        match (feed, change) {
            (Feed::Placement, Change::Snapshot(kvs)) => {
                let record = kvs
                    .iter()
                    .find(|kv| kv.key == prefix)
                    .and_then(|kv| decode_epoch(&kv.value));
                pool.set_epoch(record);
            }
            (Feed::Placement, Change::Event(WatchEvent::Put(kv))) if kv.key == prefix => {
                // A record that does not decode leaves the last good one in place.
                if let Some(record) = decode_epoch(&kv.value) {
                    pool.set_epoch(Some(record));
                }
            }
            (Feed::Placement, Change::Event(WatchEvent::Delete { key, .. })) if key == prefix => {
                pool.set_epoch(None)
            }
            (Feed::Placement, Change::Event(_)) => {}
            (Feed::Workers, Change::Snapshot(kvs)) => {
                let workers: HashMap<String, u64> =
                    kvs.iter().filter_map(|kv| worker(keys, kv)).collect();
                pool.set_registered(workers);
            }
            (Feed::Workers, Change::Event(WatchEvent::Put(kv))) => {
                if let Some((id, incarnation)) = worker(keys, &kv) {
                    pool.set_worker_registered(&id, Some(incarnation));
                }
            }
            (Feed::Workers, Change::Event(WatchEvent::Delete { key, .. })) => {
                if let Some(id) = worker_id(keys, &key) {
                    pool.set_worker_registered(id, None);
                }
            }
            (Feed::Drains, change) => {
                change.apply_ids(&mut draining, &prefix);
                pool.set_draining(draining.clone());
            }
        }
    }
}

/// The id and incarnation of a registration.
fn worker(keys: &Keys, kv: &KeyValue) -> Option<(String, u64)> {
    let id = worker_id(keys, &kv.key)?;
    match serde_json::from_slice::<WorkerInfo>(&kv.value) {
        Ok(info) => Some((id.to_string(), info.incarnation)),
        Err(err) => {
            warn!(key = %kv.key, "ignoring a worker registration that does not decode: {err}");
            None
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
