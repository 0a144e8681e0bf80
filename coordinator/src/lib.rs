//! The Moebius coordinator: who holds which experts.
//!
//! - [`placement`]: the physical expert slots of each rank of an EP group, and the default even
//!   split of the logical experts over N ranks.
//! - [`topology`]: the cluster's keys in the store and the JSON values under them (workers,
//!   epochs, acknowledgements).
//! - [`store`]: the `TopologyStore` trait (leases, compare-and-swap, prefix watches).
pub mod placement;
pub mod store;
pub mod topology;

pub use placement::{Placement, PlacementError};
pub use store::{KeyValue, LeaseId, Revision, StoreError, TopologyStore, WatchEvent, WatchStream};
pub use topology::{EpochRecord, EpochState, Keys, WorkerInfo};
