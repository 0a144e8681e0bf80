//! What the leader does: follow the live workers, form epochs, activate them when every rank
//! acknowledged, and re-form the group at once when a worker reports that it failed.
//!
//! A worker of the current epoch is *intact* while its key exists, its announced info equals the
//! epoch's copy, and its key was created before the record was last written (a key created
//! later belongs to a restarted worker that lost its slots and connections). The leader forms a
//! new epoch when a member is no longer intact or a new worker can join (at most `num_experts`
//! ranks), after `settle` without membership changes. Ranks are ordered by worker id.
//!
//! A worker whose EP group failed reports it under `suspects/<id>`, naming the workers it
//! blames. A report for the current epoch makes the leader re-form the group (after
//! `REFORM_SETTLE`, so that the reports of all survivors land in one epoch) without the
//! suspects it can confirm are gone: a suspect whose gRPC health service does not answer
//! within `PROBE_TIMEOUT` (dead or hung), or one that was blamed for the previous re-forming
//! too. A suspect that answers stays. An excluded worker is not taken back until it registers
//! anew (a new incarnation). Every
//! write of the record is a compare-and-swap on the revision this leader last saw, so a stale
//! leader cannot overwrite a newer epoch, and fenced by the leader key's lease, so a coordinator
//! that lost the leadership cannot write at all. A store that cannot be reached does not end the
//! leadership: the leader retries (with a growing pause) and re-reads the record when the store
//! answers again.
//!
//! Placements come from the [`planner`]: a changed group is planned from the load the workers
//! publish under `stats/`, keeping each worker's experts where it can; every
//! `rebalance_interval` the leader rebalances an unchanged group when the measured imbalance
//! passes `rebalance_threshold`. The admin requests ([`crate::admin`]) are answered here, between
//! the other work: the topology, a rebalance (or its dry run), a new count of redundant experts,
//! and drain orders (`drain/<id>`; a draining worker shuts itself down, and the order is deleted
//! when its key is gone).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::sync::{mpsc, MutexGuard};
use tokio::time::Instant;

use super::probe;

use super::metrics::{ADMIN, AUTO};
use super::{leader_value, Ctx};
use crate::admin::{AdminError, AdminRequest, PlanReport, TopologyView};
use crate::error::CoordinatorError;
use crate::placement::{LayerPlan, Placement};
use crate::planner::{self, Experts, Load, Plan, PlanError};
use crate::store::{Fence, KeyValue, LeaseId, Revision, StoreError, WatchEvent};
use crate::topology::{
    ClusterSettings, DrainOrder, EpochRecord, EpochState, LoadStats, SuspectReport, WorkerInfo,
};
use crate::watch::{Change, PrefixWatch};

/// First pause after a failed store call while leading; doubles up to `MAX_RETRY`.
const MIN_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(2);
/// Pause after the first failure report of an epoch before re-forming, for the other
/// survivors' reports to arrive.
const REFORM_SETTLE: Duration = Duration::from_millis(50);
/// How long a suspect's health service has to answer to count as alive.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// A rebalance keeps a layer's slots unless EPLB's plan lowers its imbalance by more than this
/// fraction, so that a rebalance moves few weights.
const MIN_GAIN: f64 = 0.05;

/// The group of the current epoch failed: re-form it.
struct Reform {
    /// When the first report came.
    since: Instant,
    /// The workers blamed, by any reporter.
    suspects: BTreeSet<String>,
}

/// A registered worker as the leader sees it.
struct Live {
    info: WorkerInfo,
    /// When its key was created; tells a restarted worker from the one an epoch was formed with.
    create_revision: Revision,
}

struct Leader<'a> {
    ctx: &'a Ctx,
    /// Every placement write is fenced by the leader key under this coordinator's lease.
    fence: Fence,
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
    suspects_watch: PrefixWatch,
    /// Set by a failure report for the current epoch; cleared by the next epoch.
    reform: Option<Reform>,
    /// The suspects of the last re-forming: blamed twice in a row, a suspect goes.
    blamed_before: BTreeSet<String>,
    /// Workers excluded as gone, by id and incarnation: not taken back until they register
    /// anew.
    excluded: BTreeMap<String, u64>,
    /// The load each worker published.
    stats: BTreeMap<String, LoadStats>,
    stats_watch: PrefixWatch,
    /// Workers an operator asked to drain.
    draining: BTreeSet<String>,
    drains_watch: PrefixWatch,
    settings: ClusterSettings,
    /// When the load is next looked at for a rebalance.
    next_rebalance: Instant,
    /// The admin requests, held while this term leads.
    admin: Option<MutexGuard<'a, mpsc::Receiver<AdminRequest>>>,
}

/// Leads until leadership is lost (or the placement record is corrupt).
pub(super) async fn lead(ctx: &Ctx, lease: LeaseId) -> Result<(), CoordinatorError> {
    let mut workers_watch = PrefixWatch::new(ctx.store.clone(), ctx.keys.workers());
    let mut leader_watch = PrefixWatch::new(ctx.store.clone(), ctx.keys.leader());
    let suspects_watch = PrefixWatch::new(ctx.store.clone(), ctx.keys.suspects());
    let stats_watch = PrefixWatch::new(ctx.store.clone(), ctx.keys.stats_prefix());
    let drains_watch = PrefixWatch::new(ctx.store.clone(), ctx.keys.drains());
    let workers = workers_watch.next().await;
    let leader_now = leader_watch.next().await;
    let settings = match ctx.store.get(&ctx.keys.settings()).await? {
        Some(kv) => serde_json::from_slice(&kv.value).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "the cluster settings are not valid JSON; using the flags");
            ClusterSettings {
                redundant_experts: ctx.config.redundant_experts,
            }
        }),
        None => ClusterSettings {
            redundant_experts: ctx.config.redundant_experts,
        },
    };
    if settings.redundant_experts != ctx.config.redundant_experts {
        tracing::info!(
            stored = settings.redundant_experts,
            flag = ctx.config.redundant_experts,
            "an operator set the redundant experts; the stored count wins"
        );
    }
    let admin = match &ctx.admin {
        Some(requests) => Some(requests.lock().await),
        None => None,
    };
    let mut leader = Leader {
        ctx,
        fence: Fence {
            key: ctx.keys.leader(),
            lease,
        },
        workers: BTreeMap::new(),
        workers_watch,
        leader_watch,
        record: None,
        record_revision: 0,
        ready: BTreeSet::new(),
        ready_watch: None,
        last_change: Instant::now(),
        suspects_watch,
        reform: None,
        blamed_before: BTreeSet::new(),
        excluded: BTreeMap::new(),
        stats: BTreeMap::new(),
        stats_watch,
        draining: BTreeSet::new(),
        drains_watch,
        settings,
        next_rebalance: Instant::now() + ctx.config.rebalance_interval,
        admin,
    };
    leader.check_leader(leader_now)?;
    leader.apply_workers(workers);
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

/// The next admin request; never resolves without an admin channel (or once it closed).
async fn next_request(
    admin: &mut Option<MutexGuard<'_, mpsc::Receiver<AdminRequest>>>,
) -> AdminRequest {
    match admin {
        Some(rx) => match rx.recv().await {
            Some(request) => request,
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// Waits on an optional watch; never resolves when there is none.
async fn next_of(watch: &mut Option<PrefixWatch>) -> Change {
    match watch {
        Some(w) => w.next().await,
        None => std::future::pending().await,
    }
}

fn ids(workers: &[WorkerInfo]) -> Vec<&str> {
    workers.iter().map(|w| w.id.as_str()).collect()
}

impl Leader<'_> {
    /// Leads until leadership is lost; store failures are retried in place.
    async fn run(&mut self) -> Result<(), CoordinatorError> {
        let mut retry = MIN_RETRY;
        let mut stale = false;
        loop {
            let step = async {
                if stale {
                    self.reload_record().await?;
                }
                self.step().await
            };
            let result = step.await;
            self.publish_metrics();
            match result {
                Ok(()) => {
                    retry = MIN_RETRY;
                    stale = false;
                }
                Err(CoordinatorError::Store(e)) if !matches!(e, StoreError::LeaseLost(_)) => {
                    tracing::warn!(error = %e, ?retry, "store call failed while leading; retrying");
                    stale = true;
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(MAX_RETRY);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Activates a fully acknowledged epoch, then handles one change (or forms an epoch).
    async fn step(&mut self) -> Result<(), CoordinatorError> {
        self.maybe_activate().await?;
        self.clear_finished_drains().await?;
        let mut desired = self.desired();
        let due = desired.as_ref().map_or_else(Instant::now, |(_, due)| *due);
        tokio::select! {
            change = self.workers_watch.next() => self.apply_workers(change),
            change = self.leader_watch.next() => self.check_leader(change)?,
            change = next_of(&mut self.ready_watch) => self.apply_ready(change),
            change = self.suspects_watch.next() => self.apply_suspects(change),
            change = self.stats_watch.next() => self.apply_stats(change),
            change = self.drains_watch.next() => self.apply_drains(change),
            request = next_request(&mut self.admin) => self.answer(request).await?,
            () = tokio::time::sleep_until(self.next_rebalance) => {
                self.next_rebalance = Instant::now() + self.ctx.config.rebalance_interval;
                if desired.is_none() {
                    self.auto_rebalance().await?;
                }
            }
            _ = tokio::time::sleep_until(due), if desired.is_some() => {
                if let Some((workers, _)) = desired.take() {
                    let workers = self.without_the_gone(workers).await;
                    if workers.is_empty() {
                        tracing::warn!("every member of the failed group is gone; keeping the last record");
                        self.reform = None;
                    } else {
                        self.write_epoch(workers).await?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Takes failure reports: one for the current epoch asks for a re-forming.
    fn apply_suspects(&mut self, change: Change) {
        let reports: Vec<KeyValue> = match change {
            Change::Snapshot(kvs) => kvs,
            Change::Event(WatchEvent::Put(kv)) => vec![kv],
            Change::Event(WatchEvent::Delete { .. }) => return,
        };
        let Some(record) = &self.record else { return };
        for kv in reports {
            let report: SuspectReport = match serde_json::from_slice(&kv.value) {
                Ok(report) => report,
                Err(e) => {
                    tracing::warn!(key = %kv.key, error = %e, "failure report is not valid JSON; ignored");
                    continue;
                }
            };
            if report.epoch != record.epoch {
                continue; // About an epoch that is over.
            }
            tracing::info!(
                epoch = report.epoch, reporter = %kv.key, suspects = ?report.suspects,
                reason = %report.reason, "a worker reports that its group failed"
            );
            self.reform
                .get_or_insert_with(|| Reform {
                    since: Instant::now(),
                    suspects: BTreeSet::new(),
                })
                .suspects
                .extend(report.suspects);
        }
    }

    /// `workers` without the suspects of a re-forming that are gone: their health service
    /// does not answer, or they were blamed for the previous re-forming as well.
    async fn without_the_gone(&mut self, workers: Vec<WorkerInfo>) -> Vec<WorkerInfo> {
        let Some(reform) = &self.reform else {
            return workers;
        };
        let blamed_before = &self.blamed_before;
        let tls = self.ctx.config.tls.as_ref();
        let probes = workers
            .iter()
            .filter(|w| reform.suspects.contains(&w.id))
            .map(|w| async move {
                let gone = blamed_before.contains(&w.id)
                    || !probe::answers(&w.address, PROBE_TIMEOUT, tls).await;
                (w.id.clone(), gone)
            });
        let gone: BTreeSet<String> = futures::future::join_all(probes)
            .await
            .into_iter()
            .filter_map(|(id, gone)| gone.then_some(id))
            .collect();
        self.blamed_before = reform.suspects.clone();
        let (out, keep): (Vec<_>, Vec<_>) = workers.into_iter().partition(|w| gone.contains(&w.id));
        for w in out {
            tracing::warn!(worker = %w.id, "excluding a worker its peers lost: it does not answer");
            self.excluded.insert(w.id, w.incarnation);
        }
        keep
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
                let workers = &self.workers;
                self.excluded
                    .retain(|id, inc| workers.get(id).is_some_and(|l| l.info.incarnation == *inc));
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
        key.strip_prefix(prefix.as_str()).is_some_and(|id| {
            self.excluded.remove(id);
            self.workers.remove(id).is_some()
        })
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
        change.apply_ids(&mut self.ready, &prefix);
    }

    /// The ranks of the next epoch, when one is due, and when to form it.
    fn desired(&self) -> Option<(Vec<WorkerInfo>, Instant)> {
        let cap = self.ctx.config.num_experts;
        let settled = self.last_change + self.ctx.config.settle;
        let Some(record) = &self.record else {
            if self.workers.len() < self.ctx.config.expected_workers {
                return None;
            }
            let workers = self
                .workers
                .values()
                .take(cap)
                .map(|l| l.info.clone())
                .collect();
            return Some((workers, settled));
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
            if self.excluded.get(id) == Some(&live.info.incarnation) || self.draining.contains(id) {
                continue;
            }
            chosen.entry(id.as_str()).or_insert(&live.info);
        }
        let workers: Vec<WorkerInfo> = chosen.into_values().cloned().collect();
        if survivors != record.workers.len() || workers.len() != survivors {
            return Some((workers, settled));
        }
        // Nobody came or went, but the group failed: re-form it, soon.
        let reform = self.reform.as_ref()?;
        Some((workers, settled.max(reform.since + REFORM_SETTLE)))
    }

    async fn write_epoch(&mut self, workers: Vec<WorkerInfo>) -> Result<(), CoordinatorError> {
        let placement = self.plan_for(&workers)?;
        self.write_record(workers, placement).await.map(drop)
    }

    /// Writes the next epoch with `workers` and `placement`; returns its number when written.
    async fn write_record(
        &mut self,
        workers: Vec<WorkerInfo>,
        placement: Placement,
    ) -> Result<Option<u64>, CoordinatorError> {
        let epoch = self.record.as_ref().map_or(1, |r| r.epoch + 1);
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
        let written = swap_record(self.ctx, &self.fence, expected, &record).await?;
        if written {
            tracing::info!(
                epoch, ranks = record.workers.len(), workers = ?ids(&record.workers),
                per_layer = !record.placement.is_uniform(),
                "epoch formed (pending)"
            );
            self.reform = None;
        } else {
            tracing::warn!(
                epoch,
                "the placement changed under this leader; re-reading it"
            );
        }
        self.reload_record().await?;
        Ok(written.then_some(epoch))
    }

    /// The expert model for a group of `ranks`: the redundant slots asked for, or as many as
    /// fit (a group that shrank may hold fewer).
    fn experts_for(&self, ranks: usize) -> Experts {
        let logical = self.ctx.config.num_experts;
        let asked = self.settings.redundant_experts;
        let fit = ranks.saturating_sub(1) * logical;
        if asked > fit {
            tracing::warn!(
                asked,
                fit,
                ranks,
                "the redundant experts do not fit this group; using fewer"
            );
        }
        Experts {
            logical,
            groups: self.ctx.config.expert_groups,
            redundant: asked.min(fit),
        }
    }

    /// What each of `workers` holds now, per MoE layer: `held[layer][rank]` (empty for a
    /// worker that is not in the current epoch).
    fn held_by(&self, workers: &[WorkerInfo], layers: usize) -> Vec<LayerPlan> {
        let Some(record) = &self.record else {
            return Vec::new();
        };
        (0..layers)
            .map(|l| {
                workers
                    .iter()
                    .map(|w| {
                        record
                            .workers
                            .iter()
                            .position(|m| m == w)
                            .map(|r| record.placement.slots(l, r).to_vec())
                            .unwrap_or_default()
                    })
                    .collect()
            })
            .collect()
    }

    /// The placement of a new group of `workers`, from the load they measured.
    fn plan_for(&self, workers: &[WorkerInfo]) -> Result<Placement, CoordinatorError> {
        let experts = self.experts_for(workers.len());
        let load = Load::of(&self.stats, workers, experts.logical);
        let held = self.held_by(workers, load.as_ref().map_or(1, Load::layers));
        match planner::for_group(experts, workers.len(), load.as_ref(), &held) {
            Ok(placement) => Ok(placement),
            Err(e) => {
                tracing::warn!(error = %e, "cannot plan from the load; placing the experts evenly");
                Ok(Placement::even(experts.logical, workers.len())?)
            }
        }
    }

    /// The current epoch, when it is active and nothing else is under way.
    fn settled_record(&self) -> Result<&EpochRecord, AdminError> {
        match &self.record {
            None => Err(AdminError::FailedPrecondition(
                "no epoch has been formed yet; wait for the workers to register".into(),
            )),
            Some(r) if r.state != EpochState::Active || self.reform.is_some() => {
                Err(AdminError::FailedPrecondition(format!(
                    "epoch {} is still forming; try again when it is active",
                    r.epoch
                )))
            }
            Some(r) => Ok(r),
        }
    }

    /// A rebalance of the current group with `experts` under the measured load.
    fn rebalance_plan(&self, experts: Experts) -> Result<Plan, AdminError> {
        let record = self.settled_record()?;
        let Some(load) = Load::of(&self.stats, &record.workers, experts.logical) else {
            return Err(AdminError::FailedPrecondition(
                "no expert load has been measured yet: workers publish it every few seconds \
                 while they serve requests"
                    .into(),
            ));
        };
        planner::rebalance(experts, &record.placement, &load, MIN_GAIN)
            .map_err(|e| AdminError::FailedPrecondition(e.to_string()))
    }

    /// Applies `plan` to the current group unless `dry_run` or it changes nothing.
    async fn apply(
        &mut self,
        plan: Plan,
        dry_run: bool,
    ) -> Result<Result<PlanReport, AdminError>, CoordinatorError> {
        let slot_bytes = self
            .record
            .as_ref()
            .and_then(|r| Load::of(&self.stats, &r.workers, self.ctx.config.num_experts))
            .map_or(0, |l| l.slot_bytes);
        let mut report = PlanReport {
            bytes_to_load: plan.slots_to_load as u64 * slot_bytes,
            epoch: None,
            note: String::new(),
            plan,
        };
        let unchanged = self
            .record
            .as_ref()
            .is_none_or(|r| r.placement == report.plan.placement);
        if unchanged || report.plan.changed_layers.is_empty() {
            report.note = format!(
                "no layer's imbalance improves by more than {:.0}%; nothing moves",
                MIN_GAIN * 100.0
            );
            return Ok(Ok(report));
        }
        if dry_run {
            return Ok(Ok(report));
        }
        let workers = self.record.as_ref().map(|r| r.workers.clone());
        let Some(workers) = workers else {
            return Ok(Err(AdminError::FailedPrecondition("no epoch yet".into())));
        };
        report.epoch = self
            .write_record(workers, report.plan.placement.clone())
            .await?;
        if report.epoch.is_none() {
            return Ok(Err(AdminError::Unavailable(
                "the placement changed meanwhile; look again and retry".into(),
            )));
        }
        Ok(Ok(report))
    }

    /// Rebalances on its own when the measured imbalance passes the threshold.
    async fn auto_rebalance(&mut self) -> Result<(), CoordinatorError> {
        let threshold = self.ctx.config.rebalance_threshold;
        if threshold == 0.0 {
            return Ok(());
        }
        let Some(ranks) = self.record.as_ref().map(|r| r.workers.len()) else {
            return Ok(());
        };
        let Ok(plan) = self.rebalance_plan(self.experts_for(ranks)) else {
            return Ok(());
        };
        if plan.imbalance_before <= threshold || plan.changed_layers.is_empty() {
            return Ok(());
        }
        tracing::info!(
            before = plan.imbalance_before,
            after = plan.imbalance_after,
            layers = ?plan.changed_layers,
            slots = plan.slots_to_load,
            "the expert load is imbalanced; rebalancing"
        );
        if let Ok(report) = self.apply(plan, false).await? {
            if report.epoch.is_some() {
                self.ctx
                    .config
                    .metrics
                    .rebalances
                    .get_or_create(&AUTO)
                    .inc();
            }
        }
        Ok(())
    }

    /// Answers one admin request.
    async fn answer(&mut self, request: AdminRequest) -> Result<(), CoordinatorError> {
        match request {
            AdminRequest::Topology(reply) => {
                let _ = reply.send(Ok(self.view()));
            }
            AdminRequest::Rebalance { dry_run, reply } => {
                let ranks = self.record.as_ref().map_or(1, |r| r.workers.len());
                let answer = match self.rebalance_plan(self.experts_for(ranks)) {
                    Ok(plan) => self.apply(plan, dry_run).await?,
                    Err(e) => Err(e),
                };
                if answer.as_ref().is_ok_and(|r| r.epoch.is_some()) {
                    self.ctx
                        .config
                        .metrics
                        .rebalances
                        .get_or_create(&ADMIN)
                        .inc();
                }
                let _ = reply.send(answer);
            }
            AdminRequest::SetRedundant {
                count,
                dry_run,
                reply,
            } => {
                let answer = self.set_redundant(count, dry_run).await?;
                if answer.as_ref().is_ok_and(|r| r.epoch.is_some()) {
                    self.ctx
                        .config
                        .metrics
                        .rebalances
                        .get_or_create(&ADMIN)
                        .inc();
                }
                let _ = reply.send(answer);
            }
            AdminRequest::Drain { id, reply } => {
                let answer = self.drain(id).await?;
                let _ = reply.send(answer);
            }
        }
        Ok(())
    }

    async fn set_redundant(
        &mut self,
        count: usize,
        dry_run: bool,
    ) -> Result<Result<PlanReport, AdminError>, CoordinatorError> {
        let record = match self.settled_record() {
            Ok(r) => r,
            Err(e) => return Ok(Err(e)),
        };
        let ranks = record.workers.len();
        let experts = Experts {
            redundant: count,
            ..self.experts_for(ranks)
        };
        if let Err(e) = planner::slots_per_rank(experts, ranks) {
            return Ok(Err(AdminError::InvalidArgument(e.to_string())));
        }
        let plan = match Load::of(&self.stats, &record.workers, experts.logical) {
            Some(load) => planner::rebalance(experts, &record.placement, &load, MIN_GAIN),
            None => {
                let held = self.held_by(&record.workers, 1);
                planner::for_group(experts, ranks, None, &held).map(|placement| Plan {
                    changed_layers: if placement == record.placement {
                        Vec::new()
                    } else {
                        (0..placement.layers.len()).collect()
                    },
                    slots_to_load: placement.new_slots(&record.placement, 1, Some),
                    imbalance_before: 0.0,
                    imbalance_after: 0.0,
                    placement,
                })
            }
        };
        let plan = match plan {
            Ok(plan) => plan,
            Err(e @ PlanError::TooManySlots { .. }) => {
                return Ok(Err(AdminError::InvalidArgument(e.to_string())))
            }
            Err(e) => return Ok(Err(AdminError::FailedPrecondition(e.to_string()))),
        };
        if !dry_run {
            let settings = ClusterSettings {
                redundant_experts: count,
            };
            let value = serde_json::to_vec(&settings)
                .map_err(|e| StoreError::Other(format!("cannot encode the settings: {e}")))?;
            self.ctx
                .store
                .put(&self.ctx.keys.settings(), value, None)
                .await?;
            self.settings = settings;
            tracing::info!(count, "redundant experts set");
        }
        self.apply(plan, dry_run).await
    }

    async fn drain(&mut self, id: String) -> Result<Result<String, AdminError>, CoordinatorError> {
        if !self.workers.contains_key(&id) {
            return Ok(Err(AdminError::InvalidArgument(format!(
                "no worker named {id:?} is registered; `moebius admin topology` lists them"
            ))));
        }
        if self.draining.contains(&id) {
            return Ok(Ok(format!("{id} is draining already")));
        }
        let others = self
            .workers
            .keys()
            .filter(|w| **w != id && !self.draining.contains(*w))
            .count();
        if others == 0 {
            return Ok(Err(AdminError::FailedPrecondition(format!(
                "{id} is the last worker; draining it would leave nothing to serve requests"
            ))));
        }
        let order = serde_json::to_vec(&DrainOrder { id: id.clone() })
            .map_err(|e| StoreError::Other(format!("cannot encode the drain order: {e}")))?;
        self.ctx
            .store
            .put(&self.ctx.keys.drain(&id), order, None)
            .await?;
        self.draining.insert(id.clone());
        tracing::info!(worker = %id, "draining");
        Ok(Ok(format!(
            "{id} stops taking requests, finishes its sequences, leaves the group and exits; \
             the next epoch places its experts on the other workers"
        )))
    }

    /// Sets the gauges from the leader's view: the epoch, the workers alive, the imbalance.
    fn publish_metrics(&self) {
        let metrics = &self.ctx.config.metrics;
        metrics.workers_alive.set(self.workers.len() as i64);
        let Some(record) = &self.record else {
            return;
        };
        metrics.epoch.set(record.epoch as i64);
        let imbalance = Load::of(&self.stats, &record.workers, self.ctx.config.num_experts)
            .map_or(0.0, |load| {
                planner::mean_imbalance(&record.placement, &load.tokens)
            });
        metrics.imbalance.set(imbalance);
    }

    fn view(&self) -> TopologyView {
        let load = self
            .record
            .as_ref()
            .and_then(|r| Load::of(&self.stats, &r.workers, self.ctx.config.num_experts));
        TopologyView {
            leader: self.ctx.config.id.clone(),
            record: self.record.clone(),
            workers: self.workers.values().map(|l| l.info.clone()).collect(),
            draining: self.draining.clone(),
            settings: self.settings,
            num_experts: self.ctx.config.num_experts,
            load,
            routed: self
                .stats
                .iter()
                .map(|(id, s)| (id.clone(), s.tokens.iter().flatten().sum()))
                .collect(),
        }
    }

    fn apply_stats(&mut self, change: Change) {
        let prefix = self.ctx.keys.stats_prefix();
        let put = |kv: KeyValue, stats: &mut BTreeMap<String, LoadStats>| {
            let Some(id) = kv.key.strip_prefix(prefix.as_str()) else {
                return;
            };
            match serde_json::from_slice::<LoadStats>(&kv.value) {
                Ok(s) if s.id == id => {
                    stats.insert(id.to_owned(), s);
                }
                Ok(_) => {
                    tracing::warn!(key = %kv.key, "load statistics under another id's key; ignored")
                }
                Err(e) => {
                    tracing::warn!(key = %kv.key, error = %e, "load statistics are not valid JSON; ignored")
                }
            }
        };
        match change {
            Change::Snapshot(kvs) => {
                self.stats.clear();
                for kv in kvs {
                    put(kv, &mut self.stats);
                }
            }
            Change::Event(WatchEvent::Put(kv)) => put(kv, &mut self.stats),
            Change::Event(WatchEvent::Delete { key, .. }) => {
                if let Some(id) = key.strip_prefix(prefix.as_str()) {
                    self.stats.remove(id);
                }
            }
        }
    }

    /// Deletes the drain orders of workers that are gone.
    async fn clear_finished_drains(&mut self) -> Result<(), CoordinatorError> {
        let gone: Vec<String> = self
            .draining
            .iter()
            .filter(|id| !self.workers.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            self.ctx.store.delete(&self.ctx.keys.drain(&id)).await?;
            self.draining.remove(&id);
            tracing::info!(worker = %id, "drained");
        }
        Ok(())
    }

    fn apply_drains(&mut self, change: Change) {
        change.apply_ids(&mut self.draining, &self.ctx.keys.drains());
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
        if swap_record(self.ctx, &self.fence, self.record_revision, &active).await? {
            tracing::info!(
                epoch = active.epoch, workers = ?ids(&active.workers), "epoch active"
            );
            remove_old_acks(self.ctx, active.epoch).await;
            remove_old_reports(self.ctx, active.epoch).await;
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
                let mut watch = PrefixWatch::new(self.ctx.store.clone(), prefix);
                let acks = watch.next().await;
                self.ready_watch = Some(watch);
                self.record = Some(record);
                self.apply_ready(acks);
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

/// Writes `record` to the placement key if its mod revision is still `expected` and this
/// coordinator still holds the leader key.
async fn swap_record(
    ctx: &Ctx,
    fence: &Fence,
    expected: Revision,
    record: &EpochRecord,
) -> Result<bool, CoordinatorError> {
    let value = serde_json::to_vec(record)
        .map_err(|e| StoreError::Other(format!("cannot encode the epoch record: {e}")))?;
    Ok(ctx
        .store
        .compare_and_swap_fenced(&ctx.keys.placement(), expected, value, fence)
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

/// Deletes failure reports about epochs before `epoch` (best effort).
async fn remove_old_reports(ctx: &Ctx, epoch: u64) {
    let Ok((kvs, _)) = ctx.store.get_prefix(&ctx.keys.suspects()).await else {
        return;
    };
    for kv in kvs {
        let old =
            serde_json::from_slice::<SuspectReport>(&kv.value).map_or(true, |r| r.epoch < epoch);
        if old {
            let _ = ctx.store.delete(&kv.key).await;
        }
    }
}

fn same_workers(a: &BTreeMap<String, Live>, b: &BTreeMap<String, Live>) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|((ia, la), (ib, lb))| {
            ia == ib && la.info == lb.info && la.create_revision == lb.create_revision
        })
}
