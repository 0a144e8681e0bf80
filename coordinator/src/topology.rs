//! The topology model: the keys of a cluster in the store and the JSON values under them.
//!
//! ```text
//! /moebius/<cluster>/workers/<id>            WorkerInfo, under the worker's lease
//! /moebius/<cluster>/coordinator/leader      the acting coordinator's id, under its lease
//! /moebius/<cluster>/placement               EpochRecord, written by the leader only (CAS)
//! /moebius/<cluster>/epochs/<n>/ready/<id>   a worker's acknowledgement of epoch n
//! /moebius/<cluster>/stats/<id>              per-expert token counts
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
