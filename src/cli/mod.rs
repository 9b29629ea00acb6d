//! The command line: clap lives here and nowhere else. Each command's flags are turned into
//! the plain config structs of the module that runs it ([`Cli::into_command`]), so the rest
//! of kips never sees a flag.

mod certs;
mod dev;
mod initnet;
mod inject;
mod webhook;

use clap::{Parser, Subcommand};

use crate::Command;

#[derive(Debug, Parser)]
#[command(
    name = "kips",
    version,
    about = "Redirect a Kubernetes workload's traffic over Azure Relay to your machine",
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    command: CliCommand,
}

#[derive(Debug, Subcommand)]
enum CliCommand {
    /// Run the mutating admission webhook (HTTPS).
    Webhook(Box<webhook::WebhookArgs>),
    /// Print manifests as admission would make them (like `istioctl kube-inject`).
    Inject(inject::InjectCommandArgs),
    /// Install the nat rules of iptables port mode (runs as the `kips-init` container).
    InitNet(initnet::InitNetArgs),
    /// Laptop side: run azbridge so a redirected workload's traffic reaches this machine.
    Connect(dev::ConnectArgs),
    /// Annotate a workload with `kips.io/redirect` (and optionally follow the rollout).
    Redirect(dev::RedirectArgs),
    /// Remove a workload's kips annotations (and optionally follow the rollout back).
    Revert(dev::RevertArgs),
    /// Show redirected workloads.
    Status(dev::StatusArgs),
    /// Create or inspect webhook certificates.
    Certs(certs::CertsArgs),
}

/// Flags that parse but do not fit together, or values only kips can check.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(String);

impl UsageError {
    fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

impl Cli {
    /// The command to run, as plain data.
    pub fn into_command(self) -> Result<Command, UsageError> {
        Ok(match self.command {
            CliCommand::Webhook(args) => {
                let log_format = args.log_format.into();
                Command::Webhook(Box::new(args.into_config()?), log_format)
            }
            CliCommand::Inject(args) => Command::Inject(args.into_config()?),
            CliCommand::InitNet(args) => Command::InitNet(args.into_config()),
            CliCommand::Connect(args) => Command::Connect(args.into_config()),
            CliCommand::Redirect(args) => Command::Redirect(args.into_config()),
            CliCommand::Revert(args) => Command::Revert(args.into_config()),
            CliCommand::Status(args) => Command::Status(args.into_config()),
            CliCommand::Certs(args) => Command::Certs(args.into_config()),
        })
    }
}

/// Durations as people write them (`90d`, `12h`, `30s`).
fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{e} (e.g. 90d, 12h, 30s)"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    pub(super) fn parse(argv: &[&str]) -> Result<Command, String> {
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        cli.into_command().map_err(|e| e.to_string())
    }
}
