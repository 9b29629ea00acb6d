//! `kips certs` and the webhook's in-cluster certificate life cycle. (Being built: issue 4.)

use anyhow::{Result, bail};

#[derive(Debug, Clone, clap::Args)]
pub struct CertsArgs {}

pub async fn run(_args: CertsArgs) -> Result<()> {
    bail!("kips certs is not built yet")
}
