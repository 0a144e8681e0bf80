//! The worker's part of the epoch protocol (DESIGN.md, "The control path"): one task that sees
//! the placement records, the registration and the engine's failures in order and acts on them.
//!
//! A record that lists this worker (its id *and* its current incarnation) at rank `r` and is
//! newer than what is installed starts a *formation*: build the rank's model for
//! `placement.ranks[r]` (shared weights reused, only this rank's experts read), stop stepping
//! the old group, form the data-plane mesh of the new epoch, install model and mesh (the
//! sequences and their caches stay) and write `epochs/<n>/ready/<id>`. The old group is paused
//! by agreement when all its members go on into the new epoch, and abandoned at once when one
//! of them was lost. When the record turns `Active`, the engine steps again. A formation that
//! fails is retried (with a growing pause) while its record is the newest, and a newer record
//! cancels it.
//!
//! When the engine's group fails, the follower reports it under `suspects/<id>` with the ids of
//! the ranks blamed, so that the leader re-forms the group at once. A record that no longer
//! lists a worker that was a member excludes it: its sequences end with UNAVAILABLE (the router
//! resubmits them) and it registers anew, as a new member. A lost lease does the same. So a
//! worker never steps in an epoch it is no longer part of.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use moebius_coordinator::{
    Change, EpochRecord, EpochState, Keys, PrefixWatch, SuspectReport, TopologyStore, WatchEvent,
};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::backend::AnyBackend;
use crate::comm::{Communicator, DataListener, DataPlane, GroupSpec};
use crate::engine::{EngineHandle, GroupFailure, Installation, LoadedModel};
use crate::error::{Error, Result};
use crate::metrics::WorkerMetrics;
use crate::model::{ExpertLoad, ExpertReload, Model, RankExperts, RankSpec};
use crate::service::registration::Registered;

/// First pause before retrying a failed formation, acknowledgement or report; doubles up to
/// `MAX_RETRY`.
const MIN_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(2);

/// Everything the epoch follower needs.
pub struct EpochFollower {
    pub keys: Keys,
    pub store: Arc<dyn TopologyStore>,
    pub model: Arc<LoadedModel>,
    /// The tokens this worker's sequences route to each expert, across epochs.
    pub load: Arc<ExpertLoad>,
    pub metrics: WorkerMetrics,
    /// The data-plane listener, accepting for the life of the worker.
    pub data: Arc<DataListener>,
    pub engine: Arc<EngineHandle>,
    pub connect_timeout: Duration,
    pub data_timeout: Duration,
    /// What the epoch's ranks exchange tokens over, and the GPU this worker's NCCL uses.
    pub data_plane: DataPlane,
    pub gpu: Option<usize>,
    /// Asks the registration task to register anew (after an exclusion or a lost lease).
    pub renew: mpsc::UnboundedSender<()>,
}

/// A formation under way.
struct Formation {
    epoch: u64,
    abort: Arc<AtomicBool>,
    task: AbortOnDropHandle<Result<Formed>>,
}

/// A formed epoch, ready to install.
struct Formed {
    record: EpochRecord,
    rank: usize,
    model: Model<AnyBackend>,
    reload: ExpertReload,
    comm: Box<dyn Communicator>,
}

#[derive(Default)]
struct State {
    reg: Option<Registered>,
    /// The newest record seen.
    latest: Option<EpochRecord>,
    /// The record whose model and data plane are installed; `None` when detached.
    installed: Option<EpochRecord>,
    forming: Option<Formation>,
    /// The experts of the last formed epoch: a new epoch takes over those it keeps.
    held: Option<RankExperts<AnyBackend>>,
    /// The epoch whose formation failed, and when to try it again.
    failed_formation: Option<(u64, Instant)>,
    /// An epoch installed but not yet acknowledged.
    pending_ack: Option<u64>,
    /// The installed epoch the engine was told to step in.
    resumed: Option<u64>,
    /// A failure report not yet written.
    pending_report: Option<SuspectReport>,
    /// The engine failure count last reported.
    reported: u64,
    /// When the pending acknowledgement or report is tried again.
    retry_at: Option<Instant>,
    retry: Duration,
}

/// Waits for the formation under way; never resolves when there is none.
async fn formed(forming: &mut Option<Formation>) -> (u64, Result<Formed>) {
    match forming {
        Some(f) => {
            let result = (&mut f.task)
                .await
                .unwrap_or_else(|e| Err(Error::Serve(format!("a formation task failed: {e}"))));
            (f.epoch, result)
        }
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl EpochFollower {
    /// Follows the records on `records` and the registration on `registration` until `stop`.
    pub async fn run(
        self,
        mut records: watch::Receiver<Option<EpochRecord>>,
        mut registration: watch::Receiver<Option<Registered>>,
        stop: CancellationToken,
    ) -> Result<()> {
        let mut st = State {
            reg: registration.borrow_and_update().clone(),
            retry: MIN_RETRY,
            ..State::default()
        };
        let mut status = self.engine.status();
        loop {
            let next_retry = [st.retry_at, st.failed_formation.map(|(_, at)| at)]
                .into_iter()
                .flatten()
                .min();
            tokio::select! {
                () = stop.cancelled() => {
                    if let Some(f) = st.forming.take() {
                        f.abort.store(true, Ordering::Relaxed);
                    }
                    return Ok(());
                }
                changed = records.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    let record = records.borrow_and_update().clone();
                    if let Some(record) = record {
                        if st.latest.as_ref().is_none_or(|l| record.epoch >= l.epoch) {
                            st.latest = Some(record);
                        }
                    }
                }
                changed = registration.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    let now = registration.borrow_and_update().clone();
                    self.on_registration(&mut st, now).await;
                }
                changed = status.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    let failure = status.borrow_and_update().failure.clone();
                    self.on_failure(&mut st, failure);
                }
                (epoch, result) = formed(&mut st.forming) => {
                    st.forming = None;
                    self.on_formed(&mut st, epoch, result).await;
                }
                () = sleep_until(next_retry) => {
                    st.retry_at = None;
                    if st.failed_formation.is_some_and(|(_, at)| at <= Instant::now()) {
                        st.failed_formation = None;
                    }
                }
            }
            self.act(&mut st).await;
        }
    }

    /// Moves towards the newest record: join it, step in it, or leave the group.
    async fn act(&self, st: &mut State) {
        self.flush(st).await;
        let (Some(reg), Some(record)) = (&st.reg, &st.latest) else {
            return;
        };
        let me = &reg.info;
        let rank = record
            .workers
            .iter()
            .position(|w| w.id == me.id && w.incarnation == me.incarnation);
        let Some(rank) = rank else {
            if let Some(f) = st.forming.take() {
                f.abort.store(true, Ordering::Relaxed);
            }
            if st
                .installed
                .as_ref()
                .is_some_and(|i| i.epoch < record.epoch)
            {
                let reason = format!(
                    "worker {} was excluded from the EP group in epoch {}; the request is \
                     resubmitted elsewhere",
                    me.id, record.epoch
                );
                tracing::warn!(
                    epoch = record.epoch,
                    "excluded from the group; rejoining as a new member"
                );
                self.leave(st, reason).await;
            }
            return;
        };
        let epoch = record.epoch;
        if st.installed.as_ref().is_some_and(|i| i.epoch == epoch) {
            if record.state == EpochState::Active && st.resumed != Some(epoch) {
                st.resumed = Some(epoch);
                if let Err(e) = self.engine.resume(epoch) {
                    tracing::error!(error = %e, "cannot resume the engine");
                }
            }
            return;
        }
        if st.forming.as_ref().is_some_and(|f| f.epoch == epoch)
            || st.failed_formation.is_some_and(|(e, _)| e == epoch)
        {
            return;
        }
        if let Some(f) = st.forming.take() {
            f.abort.store(true, Ordering::Relaxed);
        }
        let record = record.clone();
        // Keep the old group stepping while the new experts load, unless it lost a member:
        // then it cannot step anyway, and its peers should learn it at once.
        let lost_member = st
            .installed
            .as_ref()
            .is_some_and(|old| old.workers.iter().any(|w| !record.workers.contains(w)));
        if lost_member {
            let _ = self.engine.abandon().wait().await;
        }
        let pause_first = st.installed.is_some() && !lost_member;
        tracing::info!(epoch, rank, slots = ?record.placement.slots(0, rank), "joining epoch");
        let abort = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(form(
            Forming {
                model: self.model.clone(),
                load: self.load.clone(),
                metrics: self.metrics.clone(),
                previous: st.held.clone(),
                data: self.data.clone(),
                engine: self.engine.clone(),
                connect_timeout: self.connect_timeout,
                data_timeout: self.data_timeout,
                data_plane: self.data_plane,
                gpu: self.gpu,
                abort: abort.clone(),
            },
            record,
            rank,
            pause_first,
        ));
        st.forming = Some(Formation {
            epoch,
            abort,
            task: AbortOnDropHandle::new(task),
        });
    }

    async fn on_formed(&self, st: &mut State, epoch: u64, result: Result<Formed>) {
        if st.latest.as_ref().is_some_and(|l| l.epoch != epoch) {
            return; // A newer record came meanwhile; the formed mesh closes.
        }
        let formed = match result {
            Ok(formed) => formed,
            Err(e) => {
                let pause = st.retry.min(MAX_RETRY);
                tracing::warn!(epoch, error = %e, retry = ?pause, "cannot join the epoch; retrying");
                if let (Error::PeerFailed { peers, .. }, Some(record)) = (&e, &st.latest) {
                    st.pending_report = Some(report(record, peers, &e.to_string()));
                }
                st.failed_formation = Some((epoch, Instant::now() + pause));
                st.retry = (st.retry * 2).min(MAX_RETRY);
                return;
            }
        };
        let Formed {
            record,
            rank,
            model,
            reload,
            comm,
        } = formed;
        st.held = Some(model.experts.clone());
        let installed = self
            .engine
            .install(Installation {
                epoch,
                rank,
                model,
                comm,
                reload,
            })
            .wait()
            .await
            .and_then(|r| r);
        if let Err(e) = installed {
            tracing::error!(epoch, error = %e, "cannot install the epoch; retrying");
            st.failed_formation = Some((epoch, Instant::now() + st.retry));
            return;
        }
        st.retry = MIN_RETRY;
        st.installed = Some(record);
        st.resumed = None;
        st.pending_ack = Some(epoch);
        tracing::info!(epoch, rank, "installed");
    }

    async fn on_registration(&self, st: &mut State, now: Option<Registered>) {
        match now {
            Some(reg) => st.reg = Some(reg),
            None if st.reg.is_some() => {
                let id = st
                    .reg
                    .as_ref()
                    .map(|r| r.info.id.clone())
                    .unwrap_or_default();
                let reason = format!(
                    "worker {id} lost its registration (its lease expired); the request is \
                     resubmitted elsewhere"
                );
                self.leave(st, reason).await;
            }
            None => {}
        }
    }

    /// Stops serving as the current member (ending its sequences with UNAVAILABLE) and asks
    /// for a registration anew.
    async fn leave(&self, st: &mut State, reason: String) {
        if let Some(f) = st.forming.take() {
            f.abort.store(true, Ordering::Relaxed);
        }
        let _ = self.engine.detach(reason).wait().await;
        st.installed = None;
        st.pending_ack = None;
        st.failed_formation = None;
        st.reg = None;
        let _ = self.renew.send(());
    }

    fn on_failure(&self, st: &mut State, failure: Option<GroupFailure>) {
        let Some(failure) = failure else { return };
        if failure.count <= st.reported {
            return;
        }
        st.reported = failure.count;
        let Some(record) = st.installed.as_ref().filter(|r| r.epoch == failure.epoch) else {
            return;
        };
        st.pending_report = Some(report(record, &failure.ranks, &failure.message));
    }

    /// Writes what is pending: the acknowledgement of an installed epoch, a failure report.
    async fn flush(&self, st: &mut State) {
        if st.retry_at.is_some() {
            return;
        }
        let Some(reg) = &st.reg else { return };
        let mut failed = false;
        if let Some(epoch) = st.pending_ack {
            let ack = serde_json::json!({ "id": reg.info.id, "epoch": epoch });
            let key = self.keys.ready(epoch, &reg.info.id);
            match self
                .store
                .put(&key, ack.to_string().into_bytes(), Some(reg.lease))
                .await
            {
                Ok(_) => {
                    tracing::info!(epoch, "ready");
                    st.pending_ack = None;
                }
                Err(e) => {
                    tracing::warn!(epoch, error = %e, "cannot acknowledge the epoch; retrying");
                    failed = true;
                }
            }
        }
        if let Some(report) = &st.pending_report {
            let value = serde_json::to_vec(report).unwrap_or_default();
            let key = self.keys.suspect(&reg.info.id);
            match self.store.put(&key, value, Some(reg.lease)).await {
                Ok(_) => {
                    tracing::info!(epoch = report.epoch, suspects = ?report.suspects, "reported the group's failure");
                    st.pending_report = None;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot report the group's failure; retrying");
                    failed = true;
                }
            }
        }
        if failed {
            st.retry_at = Some(Instant::now() + st.retry);
            st.retry = (st.retry * 2).min(MAX_RETRY);
        }
    }
}

/// Follows `keys.placement()` (through the shared [`PrefixWatch`], which rides through store
/// outages) and publishes each epoch record on `records`, until `stop`.
pub async fn watch_placement(
    store: Arc<dyn TopologyStore>,
    keys: Keys,
    records: watch::Sender<Option<EpochRecord>>,
    stop: CancellationToken,
) {
    let key = keys.placement();
    let mut watch = PrefixWatch::new(store, key.clone());
    loop {
        let change = tokio::select! {
            () = stop.cancelled() => return,
            change = watch.next() => change,
        };
        let value = match change {
            Change::Snapshot(kvs) => kvs.into_iter().find(|kv| kv.key == key).map(|kv| kv.value),
            Change::Event(WatchEvent::Put(kv)) if kv.key == key => Some(kv.value),
            Change::Event(_) => None,
        };
        if let Some(value) = value {
            match serde_json::from_slice::<EpochRecord>(&value) {
                Ok(record) => {
                    records.send_replace(Some(record));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the placement is not a valid epoch record; ignored")
                }
            }
        }
    }
}

/// A report that the group of `record` failed, blaming `ranks`.
fn report(record: &EpochRecord, ranks: &[usize], reason: &str) -> SuspectReport {
    SuspectReport {
        epoch: record.epoch,
        suspects: ranks
            .iter()
            .filter_map(|&r| record.workers.get(r).map(|w| w.id.clone()))
            .collect(),
        reason: reason.to_string(),
    }
}

/// What a formation task takes along.
struct Forming {
    model: Arc<LoadedModel>,
    load: Arc<ExpertLoad>,
    metrics: WorkerMetrics,
    previous: Option<RankExperts<AnyBackend>>,
    data: Arc<DataListener>,
    engine: Arc<EngineHandle>,
    connect_timeout: Duration,
    data_timeout: Duration,
    data_plane: DataPlane,
    gpu: Option<usize>,
    abort: Arc<AtomicBool>,
}

/// Builds the rank's model, stops the old group (by agreement, when `pause_first`), and forms
/// the new epoch's mesh.
async fn form(f: Forming, record: EpochRecord, rank: usize, pause_first: bool) -> Result<Formed> {
    let (model, reload) = {
        let (loaded, load, previous) = (f.model.clone(), f.load.clone(), f.previous);
        let metrics = f.metrics.clone();
        let placement = record.placement.clone();
        blocking(move || {
            let spec = RankSpec {
                placement: &placement,
                rank,
                previous: previous.as_ref(),
                load: Some(load),
                metrics: Some(metrics),
            };
            Model::build(loaded.shared.clone(), &loaded.checkpoint, spec)
        })
        .await?
    };
    tracing::info!(
        epoch = record.epoch,
        loaded = reload.loaded,
        kept = reload.reused,
        "expert slots ready"
    );
    if pause_first {
        // The whole old group stops after the same step.
        f.engine.pause().wait().await?;
    }
    let spec = GroupSpec {
        epoch: record.epoch,
        rank,
        ids: record.workers.iter().map(|w| w.id.clone()).collect(),
        addrs: resolve(record.workers.iter().map(|w| w.data_address.as_str()))?,
    };
    let (data, abort) = (f.data.clone(), f.abort.clone());
    let (connect_timeout, data_timeout) = (f.connect_timeout, f.data_timeout);
    let (plane, gpu) = (f.data_plane, f.gpu);
    let comm = blocking(move || {
        let mut mesh = data.form(&spec, connect_timeout, &abort)?;
        mesh.set_timeout(Some(data_timeout))?;
        plane.communicator(mesh, gpu, connect_timeout, Some(data_timeout))
    })
    .await?;
    Ok(Formed {
        record,
        rank,
        model,
        reload,
        comm,
    })
}

/// Resolves `host:port` strings, in order.
fn resolve<'a>(addresses: impl Iterator<Item = &'a str>) -> Result<Vec<SocketAddr>> {
    addresses
        .map(|a| {
            a.to_socket_addrs()
                .ok()
                .and_then(|mut it| it.next())
                .ok_or_else(|| Error::Comm(format!("cannot resolve data-plane address {a:?}")))
        })
        .collect()
}

/// Runs blocking work (loading weights, connecting the mesh) off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Serve(format!("a blocking task failed: {e}")))?
}
