//! The Moebius coordinator: who holds which experts.
//!
//! - [`placement`]: the physical expert slots of each rank of an EP group, and the default even
//!   split of the logical experts over N ranks.
//! - [`eplb`]: DeepSeek's expert-parallel load balancer: placements with redundant experts from
//!   measured load, and rebalancing that moves few experts.
//! - [`planner`]: the placement of each new epoch (a changed group, a rebalance, another count
//!   of redundant experts) from the load the workers measured.
//! - [`topology`]: the cluster's keys in the store and the JSON values under them (workers,
//!   epochs, acknowledgements).
//! - [`store`]: the `TopologyStore` trait (leases, compare-and-swap, fenced writes, prefix
//!   watches).
//! - [`watch`]: `PrefixWatch`, the one get-watch-resume loop every part follows the topology
//!   with; it rides through store outages.
//! - [`lease`]: `keep_alive`, the one keep-alive loop of every part that holds a lease.
//! - [`memory`]: `MemoryStore`, the in-process store with etcd's semantics (the single-process
//!   cluster's default).
//! - [`etcd`]: `EtcdStore`, the production store on etcd v3.
//! - [`etcd_server`]: `EtcdServer`, a throwaway etcd process for tests and local development.
//! - [`admin`]: the operator's `moebius.v1.Admin` service, answered by the leader.
//! - [`coordinator`]: the control loop: leader election, then forming and activating epochs as
//!   workers come and go (`run`, `CoordinatorConfig`).
//! - [`error`]: `CoordinatorError`, the control loop's error.
//! - [`health`]: the gRPC health service of every server, with its `liveness` service.
//! - [`telemetry`]: the Prometheus registry every part fills, and its HTTP `/metrics` server.
//! - [`peers`]: the bound on connections per peer address of a public port.
//! - [`tls`]: TLS and mutual TLS of every connection: certificates, CA, the HTTPS listener.
pub mod admin;
pub mod coordinator;
pub mod eplb;
pub mod error;
pub mod etcd;
pub mod etcd_server;
pub mod health;
pub mod lease;
pub mod memory;
pub mod peers;
pub mod placement;
pub mod planner;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod topology;
pub mod watch;

pub use coordinator::{run, run_with_admin, CoordinatorConfig, CoordinatorMetrics};
pub use error::CoordinatorError;
pub use etcd::EtcdStore;
pub use etcd_server::EtcdServer;
pub use memory::MemoryStore;
pub use placement::{LayerPlan, Placement, PlacementError};
pub use store::{
    Fence, KeyValue, LeaseId, Revision, StoreError, TopologyStore, WatchEvent, WatchStream,
};
pub use topology::{
    ClusterSettings, DrainOrder, EpochRecord, EpochState, Keys, LoadStats, SuspectReport,
    WorkerInfo,
};
pub use watch::{Change, PrefixWatch};
