//! The worker's load statistics: every `interval`, a snapshot of the expert-load counters goes
//! into the sliding window (which the `Status` RPC reads), and the window's counts are written
//! under `stats/<id>`, under the worker's lease, for the leader's balancer. An unchanged window
//! (an idle worker) is not written again.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use moebius_coordinator::{Keys, LoadStats, TopologyStore};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::engine::EngineHandle;
use crate::model::{ExpertLoad, LoadWindow};
use crate::service::registration::Registered;

/// What the statistics task needs.
pub struct StatsPublisher {
    pub store: Arc<dyn TopologyStore>,
    pub keys: Keys,
    pub load: Arc<ExpertLoad>,
    pub window: Arc<Mutex<LoadWindow>>,
    pub engine: Arc<EngineHandle>,
    pub interval: Duration,
}

impl StatsPublisher {
    /// Samples and publishes until `stop`.
    pub async fn run(
        self,
        registration: watch::Receiver<Option<Registered>>,
        stop: CancellationToken,
    ) {
        let mut ticks = tokio::time::interval(self.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // What was last written, and under which lease.
        let mut written: Option<(i64, Vec<Vec<u64>>)> = None;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let (tokens, span) = {
                let mut window = self.window.lock().unwrap_or_else(PoisonError::into_inner);
                window.push(Instant::now(), self.load.snapshot());
                window.counts()
            };
            let Some(reg) = registration.borrow().clone() else {
                continue;
            };
            if written
                .as_ref()
                .is_some_and(|(lease, t)| *lease == reg.lease && *t == tokens)
            {
                continue;
            }
            let (epoch, slot_bytes) = {
                let status = self.engine.status();
                let s = status.borrow();
                let slots: usize = s.expert_slots.iter().map(Vec::len).sum();
                (s.epoch, s.expert_bytes / slots.max(1) as u64)
            };
            let stats = LoadStats {
                id: reg.info.id.clone(),
                epoch,
                window_s: span.as_secs_f64(),
                tokens,
                slot_bytes,
            };
            let Ok(value) = serde_json::to_vec(&stats) else {
                continue;
            };
            match self
                .store
                .put(&self.keys.stats(&reg.info.id), value, Some(reg.lease))
                .await
            {
                Ok(_) => written = Some((reg.lease, stats.tokens)),
                Err(e) => tracing::debug!(error = %e, "cannot publish the load statistics"),
            }
        }
    }
}
