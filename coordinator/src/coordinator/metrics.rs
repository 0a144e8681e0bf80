//! The coordinator's Prometheus metrics: its role, the epoch it leads, the workers alive, the
//! rebalances and the imbalance of the current placement under the measured load.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// What started a rebalance.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Trigger {
    pub trigger: &'static str,
}

pub const AUTO: Trigger = Trigger { trigger: "auto" };
pub const ADMIN: Trigger = Trigger { trigger: "admin" };

/// The coordinator's metrics; clones share their values.
#[derive(Debug, Clone, Default)]
pub struct CoordinatorMetrics {
    pub leader: Gauge,
    pub epoch: Gauge,
    pub workers_alive: Gauge,
    pub rebalances: Family<Trigger, Counter>,
    pub imbalance: Gauge<f64, AtomicU64>,
}

impl CoordinatorMetrics {
    /// Metrics registered into `registry` under `coordinator_`, labelled with the
    /// coordinator's `id`.
    pub fn register(registry: &mut Registry, id: &str) -> Self {
        let metrics = Self::default();
        // Both series exist from the start, so that a query of them finds a zero.
        for trigger in [AUTO, ADMIN] {
            metrics.rebalances.get_or_create_owned(&trigger);
        }
        let r = registry.sub_registry_with_label(("coordinator".into(), id.to_string().into()));
        r.register(
            "coordinator_leader",
            "1 while this coordinator leads the cluster, 0 while it stands by",
            metrics.leader.clone(),
        );
        r.register(
            "coordinator_epoch",
            "The epoch of the placement record this coordinator last wrote or read while leading",
            metrics.epoch.clone(),
        );
        r.register(
            "coordinator_workers_alive",
            "Workers holding a registration lease, as the leader sees them",
            metrics.workers_alive.clone(),
        );
        r.register(
            "coordinator_rebalances",
            "Placements changed by a rebalance, by what asked for it (auto: the threshold; admin: an operator)",
            metrics.rebalances.clone(),
        );
        r.register(
            "coordinator_imbalance",
            "Max over mean tokens per rank of the current placement under the measured load, mean over MoE layers (1 = balanced, 0 = no load measured)",
            metrics.imbalance.clone(),
        );
        metrics
    }
}
