//! What the leader does: follow the live workers, form epochs, activate them when every rank
//! acknowledged.
//!
//! A worker of the current epoch is *intact* while its key exists, its announced info equals the
//! epoch's copy, and its key was created before the record was last written (a key created
//! later belongs to a restarted worker that lost its slots and connections). The leader forms a
//! new epoch when a member is no longer intact or a new worker can join (at most `num_experts`
//! ranks), after `settle` without membership changes. Ranks are ordered by worker id. Every
//! write of the record is a compare-and-swap on the revision this leader last saw, so a stale
//! leader cannot overwrite a newer epoch.

use std::collections::{BTreeMap, BTreeSet};

use tokio::time::Instant;

use super::watch::{Change, PrefixWatch};
use super::{leader_value, Ctx};
use crate::error::CoordinatorError;
use crate::placement::Placement;
use crate::store::{KeyValue, Revision, StoreError, WatchEvent};
use crate::topology::{EpochRecord, EpochState, WorkerInfo};

/// A registered worker as the leader sees it.
struct Live {
    info: WorkerInfo,
    /// When its key was created; tells a restarted worker from the one an epoch was formed with.
    create_revision: Revision,
}

struct Leader<'a> {
    ctx: &'a Ctx,
    workers: BTreeMap<String, Live>,
    workers_watch: PrefixWatch,
    leader_watch: PrefixWatch,
    /// The placement record as last read or written, and the key's mod revision then.
    record: Option<EpochRecord>,
    record_revision: Revision,
    /// Ids that acknowledged the pending epoch (empty while the epoch is active).
    ready: BTreeSet<String>,
    ready_watch: Option<PrefixWatch>,
    /// Last change of the worker set; epochs wait `settle` after it.
    last_change: Instant,
}

/// Leads until the store fails or leadership is lost.
pub(super) async fn lead(ctx: &Ctx) -> Result<(), CoordinatorError> {
    let (workers_watch, kvs) = PrefixWatch::start(ctx.store.clone(), ctx.keys.workers()).await?;
    let (leader_watch, leader_kvs) =
        PrefixWatch::start(ctx.store.clone(), ctx.keys.leader()).await?;
    let mut leader = Leader {
        ctx,
        workers: BTreeMap::new(),
        workers_watch,
        leader_watch,
        record: None,
        record_revision: 0,
        ready: BTreeSet::new(),
        ready_watch: None,
        last_change: Instant::now(),
    };
    leader.check_leader(Change::Snapshot(leader_kvs))?;
    leader.apply_workers(Change::Snapshot(kvs));
    leader.reload_record().await?;
    if let Some(record) = &leader.record {
        tracing::info!(
            epoch = record.epoch, state = ?record.state, workers = ?ids(&record.workers),
            "continuing from the stored epoch"
        );
        if record.placement.num_experts != ctx.config.num_experts {
            tracing::warn!(
                stored = record.placement.num_experts,
                configured = ctx.config.num_experts,
                "the stored placement has another expert count; the next epoch uses the configured one"
            );
        }
    }
    leader.run().await
}

/// Waits on an optional watch; never resolves when there is none.
async fn next_of(watch: &mut Option<PrefixWatch>) -> Result<Change, StoreError> {
    match watch {
        Some(w) => w.next().await,
        None => std::future::pending().await,
    }
}

fn ids(workers: &[WorkerInfo]) -> Vec<&str> {
    workers.iter().map(|w| w.id.as_str()).collect()
}

impl Leader<'_> {
    async fn run(&mut self) -> Result<(), CoordinatorError> {
        loop {
            self.maybe_activate().await?;
            let mut desired = self.desired();
            let settle_at = self.last_change + self.ctx.config.settle;
            tokio::select! {
                change = self.workers_watch.next() => self.apply_workers(change?),
                change = self.leader_watch.next() => self.check_leader(change?)?,
                change = next_of(&mut self.ready_watch) => self.apply_ready(change?),
                _ = tokio::time::sleep_until(settle_at), if desired.is_some() => {
                    if let Some(workers) = desired.take() {
                        self.write_epoch(workers).await?;
                    }
                }
            }
        }
    }

    /// Fails when the leader key no longer holds this coordinator's id.
    fn check_leader(&self, change: Change) -> Result<(), CoordinatorError> {
        let key = self.ctx.keys.leader();
        let me = leader_value(&self.ctx.config.id);
        let holder = match change {
            Change::Snapshot(kvs) => kvs.into_iter().find(|kv| kv.key == key).map(|kv| kv.value),
            Change::Event(WatchEvent::Put(kv)) if kv.key == key => Some(kv.value),
            Change::Event(WatchEvent::Delete { key: k, .. }) if k == key => None,
            Change::Event(_) => return Ok(()),
        };
        match holder {
            Some(value) if value == me => Ok(()),
            Some(value) => Err(CoordinatorError::NotLeader(format!(
                "the leader key now names {}",
                String::from_utf8_lossy(&value)
            ))),
            None => Err(CoordinatorError::NotLeader(
                "the leader key was deleted".into(),
            )),
        }
    }

    fn apply_workers(&mut self, change: Change) {
        let changed = match change {
            Change::Snapshot(kvs) => {
                let mut next = BTreeMap::new();
                for kv in kvs {
                    if let Some((id, live)) = self.parse_worker(&kv) {
                        next.insert(id, live);
                    }
                }
                let changed = !same_workers(&self.workers, &next);
                self.workers = next;
                changed
            }
            Change::Event(WatchEvent::Put(kv)) => match self.parse_worker(&kv) {
                Some((id, live)) => {
                    let changed = self.workers.get(&id).is_none_or(|old| {
                        old.info != live.info || old.create_revision != live.create_revision
                    });
                    self.workers.insert(id, live);
                    changed
                }
                None => self.remove_worker_key(&kv.key),
            },
            Change::Event(WatchEvent::Delete { key, .. }) => self.remove_worker_key(&key),
        };
        if changed {
            self.last_change = Instant::now();
        }
    }

    fn remove_worker_key(&mut self, key: &str) -> bool {
        let prefix = self.ctx.keys.workers();
        key.strip_prefix(prefix.as_str())
            .is_some_and(|id| self.workers.remove(id).is_some())
    }

    fn parse_worker(&self, kv: &KeyValue) -> Option<(String, Live)> {
        let prefix = self.ctx.keys.workers();
        let id = kv.key.strip_prefix(prefix.as_str())?;
        match serde_json::from_slice::<WorkerInfo>(&kv.value) {
            Ok(info) if info.id == id => Some((
                id.to_owned(),
                Live {
                    info,
                    create_revision: kv.create_revision,
                },
            )),
            Ok(info) => {
                tracing::warn!(key = %kv.key, named = %info.id, "worker registered under another id's key; ignored");
                None
            }
            Err(e) => {
                tracing::warn!(key = %kv.key, error = %e, "worker registration is not valid JSON; ignored");
                None
            }
        }
    }

    fn apply_ready(&mut self, change: Change) {
        let Some(record) = &self.record else {
            return;
        };
        let prefix = self.ctx.keys.ready_prefix(record.epoch);
        let id_of = |key: &str| key.strip_prefix(prefix.as_str()).map(str::to_owned);
        match change {
            Change::Snapshot(kvs) => {
                self.ready = kvs.iter().filter_map(|kv| id_of(&kv.key)).collect();
            }
            Change::Event(WatchEvent::Put(kv)) => self.ready.extend(id_of(&kv.key)),
            Change::Event(WatchEvent::Delete { key, .. }) => {
                if let Some(id) = id_of(&key) {
                    self.ready.remove(&id);
                }
            }
        }
    }

    /// The ranks of the next epoch, when one is due.
    fn desired(&self) -> Option<Vec<WorkerInfo>> {
        let cap = self.ctx.config.num_experts;
        let Some(record) = &self.record else {
            if self.workers.len() < self.ctx.config.expected_workers {
                return None;
            }
            return Some(
                self.workers
                    .values()
                    .take(cap)
                    .map(|l| l.info.clone())
                    .collect(),
            );
        };
        if self.workers.is_empty() {
            return None; // Keep the last record; an empty epoch serves nothing.
        }
        let intact = |w: &WorkerInfo| {
            self.workers
                .get(&w.id)
                .is_some_and(|l| l.info == *w && l.create_revision < self.record_revision)
        };
        // Intact members keep their place; others fill the free ranks in id order.
        let mut chosen: BTreeMap<&str, &WorkerInfo> = record
            .workers
            .iter()
            .filter(|w| intact(w))
            .map(|w| (w.id.as_str(), w))
            .collect();
        let survivors = chosen.len();
        for (id, live) in &self.workers {
            if chosen.len() >= cap {
                break;
            }
            chosen.entry(id.as_str()).or_insert(&live.info);
        }
        if survivors == record.workers.len() && chosen.len() == survivors {
            return None;
        }
        Some(chosen.into_values().cloned().collect())
    }

    async fn write_epoch(&mut self, workers: Vec<WorkerInfo>) -> Result<(), CoordinatorError> {
        let epoch = self.record.as_ref().map_or(1, |r| r.epoch + 1);
        let placement = Placement::even(self.ctx.config.num_experts, workers.len())?;
        let record = EpochRecord {
            epoch,
            state: EpochState::Pending,
            workers,
            placement,
        };
        let expected = if self.record.is_some() {
            self.record_revision
        } else {
            0
        };
        if swap_record(self.ctx, expected, &record).await? {
            tracing::info!(
                epoch, ranks = record.workers.len(), workers = ?ids(&record.workers),
                "epoch formed (pending)"
            );
        } else {
            tracing::warn!(
                epoch,
                "the placement changed under this leader; re-reading it"
            );
        }
        self.reload_record().await
    }

    /// Marks the pending epoch active once every rank acknowledged it.
    async fn maybe_activate(&mut self) -> Result<(), CoordinatorError> {
        let Some(record) = &self.record else {
            return Ok(());
        };
        if record.state != EpochState::Pending
            || !record.workers.iter().all(|w| self.ready.contains(&w.id))
        {
            return Ok(());
        }
        let active = EpochRecord {
            state: EpochState::Active,
            ..record.clone()
        };
        if swap_record(self.ctx, self.record_revision, &active).await? {
            tracing::info!(
                epoch = active.epoch, workers = ?ids(&active.workers), "epoch active"
            );
            remove_old_acks(self.ctx, active.epoch).await;
        } else {
            tracing::warn!(
                epoch = active.epoch,
                "the placement changed under this leader; re-reading it"
            );
        }
        self.reload_record().await
    }

    /// Reads the placement record, and follows the acknowledgements of a pending epoch.
    async fn reload_record(&mut self) -> Result<(), CoordinatorError> {
        let key = self.ctx.keys.placement();
        let Some(kv) = self.ctx.store.get(&key).await? else {
            self.record = None;
            self.record_revision = 0;
            self.ready_watch = None;
            self.ready.clear();
            return Ok(());
        };
        let record: EpochRecord =
            serde_json::from_slice(&kv.value).map_err(|e| CoordinatorError::CorruptRecord {
                key: key.clone(),
                message: e.to_string(),
            })?;
        let same_epoch = self.record.as_ref().map(|r| r.epoch) == Some(record.epoch);
        self.record_revision = kv.mod_revision;
        match record.state {
            EpochState::Pending if same_epoch && self.ready_watch.is_some() => {}
            EpochState::Pending => {
                let prefix = self.ctx.keys.ready_prefix(record.epoch);
                let (watch, kvs) = PrefixWatch::start(self.ctx.store.clone(), prefix).await?;
                self.ready_watch = Some(watch);
                self.record = Some(record);
                self.apply_ready(Change::Snapshot(kvs));
                return Ok(());
            }
            EpochState::Active => {
                self.ready_watch = None;
                self.ready.clear();
            }
        }
        self.record = Some(record);
        Ok(())
    }
}

/// Writes `record` to the placement key if its mod revision is still `expected`.
async fn swap_record(
    ctx: &Ctx,
    expected: Revision,
    record: &EpochRecord,
) -> Result<bool, CoordinatorError> {
    let value = serde_json::to_vec(record)
        .map_err(|e| StoreError::Other(format!("cannot encode the epoch record: {e}")))?;
    Ok(ctx
        .store
        .compare_and_swap(&ctx.keys.placement(), expected, value, None)
        .await?)
}
/// Deletes the acknowledgements of epochs before `epoch` (best effort).
async fn remove_old_acks(ctx: &Ctx, epoch: u64) {
    let prefix = format!("{}epochs/", ctx.keys.root());
    let kvs = match ctx.store.get_prefix(&prefix).await {
        Ok((kvs, _)) => kvs,
        Err(e) => {
            tracing::debug!(error = %e, "cannot list old acknowledgements");
            return;
        }
    };
    for kv in kvs {
        let old = kv
            .key
            .strip_prefix(prefix.as_str())
            .and_then(|rest| rest.split('/').next())
            .and_then(|n| n.parse::<u64>().ok())
            .is_some_and(|n| n < epoch);
        if old {
            if let Err(e) = ctx.store.delete(&kv.key).await {
                tracing::debug!(key = %kv.key, error = %e, "cannot delete an old acknowledgement");
            }
        }
    }
}

fn same_workers(a: &BTreeMap<String, Live>, b: &BTreeMap<String, Live>) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|((ia, la), (ib, lb))| {
            ia == ib && la.info == lb.info && la.create_revision == lb.create_revision
        })
}
