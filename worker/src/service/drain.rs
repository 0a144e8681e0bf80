//! An operator's drain order (`drain/<id>`, written by the leader on `moebius admin drain`):
//! the worker shuts down the way SIGTERM shuts it down — it stops taking requests, finishes
//! its sequences, gives up its lease so that the next epoch places its experts on the others,
//! and its process exits 0.

use std::sync::Arc;

use moebius_coordinator::{Change, Keys, PrefixWatch, TopologyStore, WatchEvent};
use tokio_util::sync::CancellationToken;

/// Follows worker `id`'s drain key and cancels `shutdown` when an order appears; ends at
/// `stop`.
pub async fn follow_drain_order(
    store: Arc<dyn TopologyStore>,
    keys: Keys,
    id: String,
    shutdown: CancellationToken,
    stop: CancellationToken,
) {
    let key = keys.drain(&id);
    let mut watch = PrefixWatch::new(store, key.clone());
    loop {
        let change = tokio::select! {
            () = stop.cancelled() => return,
            change = watch.next() => change,
        };
        let ordered = match change {
            Change::Snapshot(kvs) => kvs.iter().any(|kv| kv.key == key),
            Change::Event(WatchEvent::Put(kv)) => kv.key == key,
            Change::Event(WatchEvent::Delete { .. }) => false,
        };
        if ordered {
            tracing::info!(%id, "drain ordered: finishing the sequences, then leaving");
            shutdown.cancel();
            return;
        }
    }
}
