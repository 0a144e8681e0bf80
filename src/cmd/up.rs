//! `moebius up`: being written.

use anyhow::{bail, Result};
use clap::Args;

/// Flags of `moebius up`.
#[derive(Args, Debug)]
pub struct UpArgs {}

pub fn run(_args: UpArgs) -> Result<()> {
    bail!("moebius up is not built yet")
}
