//! The Moebius coordinator: who holds which experts.
//!
//! - [`placement`]: the physical expert slots of each rank of an EP group, and the default even
//!   split of the logical experts over N ranks.
pub mod placement;

pub use placement::{Placement, PlacementError};
