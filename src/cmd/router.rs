//! `moebius router`: being written.

use anyhow::{bail, Result};
use clap::Args;

/// Flags of `moebius router`.
#[derive(Args, Debug)]
pub struct RouterArgs {}

pub fn run(_args: RouterArgs) -> Result<()> {
    bail!("moebius router is not built yet")
}
