//! The `TopologyStore`: where all cluster state lives (etcd in production, memory for the
//! single-process cluster), with the semantics both implementations share.
//!
//! Keys are strings, values are bytes (JSON by convention, so `etcdctl get --prefix /moebius`
//! stays readable). Revisions are the store's global, monotonically increasing counter, as in
//! etcd: every write gets a new one, and a watch resumes from one.

use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;

/// A lease's id; keys written under a lease vanish when it expires or is revoked.
pub type LeaseId = i64;

/// A store revision.
pub type Revision = i64;

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot reach the store at {endpoint}: {message}")]
    Unreachable { endpoint: String, message: String },
    #[error("lease {0} has expired or was revoked")]
    LeaseLost(LeaseId),
    #[error("the watch was compacted past revision {0}; restart it from a fresh get")]
    Compacted(Revision),
    #[error("store: {0}")]
    Other(String),
}

impl StoreError {
    /// A stable short name of the variant, for metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Unreachable { .. } => "unreachable",
            StoreError::LeaseLost(_) => "lease_lost",
            StoreError::Compacted(_) => "compacted",
            StoreError::Other(_) => "other",
        }
    }
}

/// A stored key and its value, with etcd's revision bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the write that created the key (since its last deletion).
    pub create_revision: Revision,
    /// Revision of the last write to the key.
    pub mod_revision: Revision,
    /// The lease the key lives under, if any.
    pub lease: Option<LeaseId>,
}

/// A change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// The key was created or updated.
    Put(KeyValue),
    /// The key was deleted, or its lease expired; `prev` is its last value when known.
    Delete {
        key: String,
        revision: Revision,
        prev: Option<KeyValue>,
    },
}

impl WatchEvent {
    pub fn key(&self) -> &str {
        match self {
            WatchEvent::Put(kv) => &kv.key,
            WatchEvent::Delete { key, .. } => key,
        }
    }

    pub fn revision(&self) -> Revision {
        match self {
            WatchEvent::Put(kv) => kv.mod_revision,
            WatchEvent::Delete { revision, .. } => *revision,
        }
    }
}

/// Events of a prefix watch, in revision order. The stream ends (or yields an error) when the
/// store goes away; the caller resumes from the last revision it saw + 1.
pub type WatchStream = BoxStream<'static, Result<WatchEvent, StoreError>>;

/// A fencing token: a write that carries it happens only while `key` exists under `lease`, so a
/// leader proves that it still leads in the same transaction it writes with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub key: String,
    pub lease: LeaseId,
}

/// Cluster state: leases, keys, compare-and-swap and prefix watches.
#[async_trait]
pub trait TopologyStore: Send + Sync + 'static {
    /// Grants a lease that expires `ttl` after its last keep-alive.
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError>;
    /// Refreshes a lease once; `LeaseLost` when it already expired. Callers refresh at a third
    /// of the TTL.
    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError>;
    /// Revokes a lease now, deleting its keys.
    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError>;

    /// Writes `key` (under `lease` when given); returns the new revision.
    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Revision, StoreError>;
    /// Reads one key.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;
    /// Reads every key under `prefix`, sorted by key, and the store revision they are read at.
    async fn get_prefix(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError>;
    /// Writes `key` only if its `mod_revision` is `expected` (0: only if it does not exist).
    /// Returns whether the write happened.
    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Revision,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<bool, StoreError>;
    /// [`compare_and_swap`](Self::compare_and_swap) without a lease on `key`, and only while
    /// `fence.key` exists under `fence.lease`. Returns whether the write happened.
    async fn compare_and_swap_fenced(
        &self,
        key: &str,
        expected: Revision,
        value: Vec<u8>,
        fence: &Fence,
    ) -> Result<bool, StoreError>;
    /// Deletes `key`; deleting a missing key is not an error.
    async fn delete(&self, key: &str) -> Result<(), StoreError>;
    /// Watches every key under `prefix` from revision `from` on (inclusive).
    async fn watch_prefix(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError>;
}
