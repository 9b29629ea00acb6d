//! The developer's side: `kips connect`, `redirect`, `revert`, `status`. (Being built: issue 6.)

use anyhow::{Result, bail};

#[derive(Debug, Clone, clap::Args)]
pub struct ConnectArgs {}
#[derive(Debug, Clone, clap::Args)]
pub struct RedirectArgs {}
#[derive(Debug, Clone, clap::Args)]
pub struct RevertArgs {}
#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {}

pub async fn connect(_args: ConnectArgs) -> Result<()> {
    bail!("kips connect is not built yet")
}
pub async fn redirect(_args: RedirectArgs) -> Result<()> {
    bail!("kips redirect is not built yet")
}
pub async fn revert(_args: RevertArgs) -> Result<()> {
    bail!("kips revert is not built yet")
}
pub async fn status(_args: StatusArgs) -> Result<()> {
    bail!("kips status is not built yet")
}
