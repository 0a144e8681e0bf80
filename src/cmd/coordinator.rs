//! `moebius coordinator`: being written.

use anyhow::{bail, Result};
use clap::Args;

/// Flags of `moebius coordinator`.
#[derive(Args, Debug)]
pub struct CoordinatorArgs {}

pub fn run(_args: CoordinatorArgs) -> Result<()> {
    bail!("moebius coordinator is not built yet")
}
