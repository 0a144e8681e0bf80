//! `moebius worker`: being written.

use anyhow::{bail, Result};
use clap::Args;

/// Flags of `moebius worker`.
#[derive(Args, Debug)]
pub struct WorkerArgs {}

pub fn run(_args: WorkerArgs) -> Result<()> {
    bail!("moebius worker is not built yet")
}
