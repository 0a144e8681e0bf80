//! One module per cluster subcommand: flags into config structs, then the crate's `run`.
pub mod coordinator;
pub mod router;
pub mod up;
pub mod worker;
