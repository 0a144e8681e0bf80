//! The topology model: the keys of a cluster in the store and the JSON values under them.
//!
//! ```text
//! /moebius/<cluster>/workers/<id>            WorkerInfo, under the worker's lease
//! /moebius/<cluster>/coordinator/leader      the acting coordinator's id, under its lease
//! /moebius/<cluster>/placement               EpochRecord, written by the leader only (CAS)
//! /moebius/<cluster>/epochs/<n>/ready/<id>   a worker's acknowledgement of epoch n
//! /moebius/<cluster>/stats/<id>              LoadStats: tokens per (MoE layer, expert), under
//!                                            the worker's lease
//! /moebius/<cluster>/suspects/<id>           SuspectReport: worker <id>'s EP group failed
//! /moebius/<cluster>/settings                ClusterSettings, written by the leader (admin)
//! /moebius/<cluster>/drain/<id>              DrainOrder: worker <id> is to leave and exit
//! /moebius/<cluster>/coordinator/admin/<id>  a coordinator's admin gRPC address, under its lease
//! ```

use serde::{Deserialize, Serialize};

use crate::placement::Placement;

/// The key layout of one cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    root: String,
}

impl Keys {
    /// Keys of cluster `cluster` under `/moebius/<cluster>/`.
    pub fn new(cluster: &str) -> Self {
        Self {
            root: format!("/moebius/{cluster}/"),
        }
    }

    pub fn root(&self) -> &str {
        &self.root
    }

    pub fn workers(&self) -> String {
        format!("{}workers/", self.root)
    }

    pub fn worker(&self, id: &str) -> String {
        format!("{}workers/{id}", self.root)
    }

    pub fn leader(&self) -> String {
        format!("{}coordinator/leader", self.root)
    }

    pub fn placement(&self) -> String {
        format!("{}placement", self.root)
    }

    pub fn ready_prefix(&self, epoch: u64) -> String {
        format!("{}epochs/{epoch}/ready/", self.root)
    }

    pub fn ready(&self, epoch: u64, id: &str) -> String {
        format!("{}epochs/{epoch}/ready/{id}", self.root)
    }

    pub fn stats(&self, id: &str) -> String {
        format!("{}stats/{id}", self.root)
    }

    pub fn stats_prefix(&self) -> String {
        format!("{}stats/", self.root)
    }

    pub fn settings(&self) -> String {
        format!("{}settings", self.root)
    }

    pub fn drains(&self) -> String {
        format!("{}drain/", self.root)
    }

    pub fn drain(&self, id: &str) -> String {
        format!("{}drain/{id}", self.root)
    }

    /// Where coordinator `id` announces the address of its admin service.
    pub fn admin(&self, id: &str) -> String {
        format!("{}coordinator/admin/{id}", self.root)
    }

    pub fn suspects(&self) -> String {
        format!("{}suspects/", self.root)
    }

    /// Where worker `reporter` reports the failure of its EP group.
    pub fn suspect(&self, reporter: &str) -> String {
        format!("{}suspects/{reporter}", self.root)
    }
}

/// A worker's report that its EP group failed in `epoch`, under the worker's lease: the leader
/// re-forms the group at once instead of waiting for a lease to expire, without the workers it
/// can confirm are gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SuspectReport {
    pub epoch: u64,
    /// The worker ids the failure is blamed on (empty when no culprit could be told).
    pub suspects: Vec<String>,
    /// What the reporter saw, for people reading the key.
    pub reason: String,
}

/// What a worker announces about itself, under its lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub id: String,
    /// `host:port` of the worker's internal gRPC service.
    pub address: String,
    /// `host:port` of the worker's TCP data plane listener.
    pub data_address: String,
    /// Where it computes, e.g. "cpu".
    pub device: String,
    /// Most concurrent sequences it takes (its queue bound).
    pub capacity: u32,
    /// Random for every registration of the worker, so that a record naming an earlier
    /// incarnation of the same id (a restarted process, or one that re-registered after it
    /// was excluded) is never mistaken for the current one.
    #[serde(default)]
    pub incarnation: u64,
}

/// Whether the workers of an epoch may step yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EpochState {
    /// Written by the leader; workers load their slots, connect and acknowledge.
    Pending,
    /// Every worker acknowledged; the group steps.
    Active,
}

/// The value of `placement`: one epoch of the EP group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochRecord {
    pub epoch: u64,
    pub state: EpochState,
    /// The group's ranks in order: rank `r` is `workers[r]`.
    pub workers: Vec<WorkerInfo>,
    /// Expert slots of each rank, in the same order.
    pub placement: Placement,
}

impl EpochRecord {
    /// The rank of worker `id` in this epoch.
    pub fn rank_of(&self, id: &str) -> Option<usize> {
        self.workers.iter().position(|w| w.id == id)
    }
}

/// The tokens a worker's own sequences routed to each expert over a recent window: what the
/// balancer plans from. Published every few seconds under `stats/<id>`, under the worker's lease.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadStats {
    pub id: String,
    /// The epoch the worker was in when it published.
    pub epoch: u64,
    /// Seconds the counts cover.
    pub window_s: f64,
    /// `tokens[layer][expert]`: tokens routed to logical expert `expert` in the `layer`-th MoE
    /// layer.
    pub tokens: Vec<Vec<u64>>,
    /// Bytes of one expert of one layer in the worker's memory (what moving a slot costs).
    #[serde(default)]
    pub slot_bytes: u64,
}

/// Settings of the cluster an operator changes at run time (through the admin API); they
/// outlive any coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ClusterSettings {
    /// Physical expert slots beyond one per logical expert, over the whole EP group.
    pub redundant_experts: usize,
}

/// An operator's order that a worker leave the cluster: it stops taking requests, finishes
/// its sequences, leaves its group and exits. The worker deletes the order when it is gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainOrder {
    pub id: String,
}
