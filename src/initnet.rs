//! `kips init-net`: the nat rules of iptables port mode. (Being built: issue 5.)

use anyhow::{Result, bail};

#[derive(Debug, Clone, clap::Args)]
pub struct InitNetArgs {}

pub fn run(_args: InitNetArgs) -> Result<()> {
    bail!("kips init-net is not built yet")
}
