//! The crate's error type for the coordinator's control loop.

use crate::placement::PlacementError;
use crate::store::StoreError;

/// Why the coordinator stopped or a term of its leadership ended.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// The configuration cannot work; the message names the field and what to change.
    #[error("invalid coordinator config: {0}")]
    Config(String),
    /// A store call failed (unreachable store, lost lease, compacted watch).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The placement key holds something that is not an epoch record; an operator must fix or
    /// delete it, since the leader cannot know which epoch the workers are in.
    #[error("the placement record at {key} is not a valid epoch record ({message}); fix it or delete the key")]
    CorruptRecord { key: String, message: String },
    /// A placement could not be built for the chosen ranks.
    #[error(transparent)]
    Placement(#[from] PlacementError),
    /// Another coordinator took the leader key while this one believed it led.
    #[error("lost leadership: {0}")]
    NotLeader(String),
}

impl CoordinatorError {
    /// A stable short name of the variant, for metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            CoordinatorError::Config(_) => "config",
            CoordinatorError::Store(e) => e.kind(),
            CoordinatorError::CorruptRecord { .. } => "corrupt_record",
            CoordinatorError::Placement(_) => "placement",
            CoordinatorError::NotLeader(_) => "not_leader",
        }
    }

    /// Whether retrying (a new election term) cannot help: the operator must act.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            CoordinatorError::Config(_)
                | CoordinatorError::CorruptRecord { .. }
                | CoordinatorError::Placement(_)
        )
    }
}
