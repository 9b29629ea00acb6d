//! kips: redirect a Kubernetes workload's traffic over Azure Relay to a developer's machine.
//!
//! The pure core ([`annotations`](crate::annotations), [`inject`], the bridge's routes and
//! command lines) turns annotated objects into JSON patches and command lines; the edges
//! ([`webhook`], the developer's commands, `kips init-net`, certificates) do the I/O. The
//! command line ([`cli`]) turns flags into a plain [`Command`], which the binary dispatches.
//! `docs/architecture.md` maps the modules and follows one admission and one `kips connect`
//! through them.

mod annotations;
pub mod bridge;
pub mod certs;
pub mod cli;
pub mod dev;
#[doc(hidden)]
pub mod fuzzing;
pub mod initnet;
pub mod inject;
mod k8s;
pub mod logging;
mod manifest;
pub mod relay;
pub mod tls;
pub mod webhook;
mod workload;

pub use k8s::parse_warning;
pub use manifest::InjectCommand;

/// One run of the binary, as plain data: what the command line asked for.
#[derive(Debug)]
pub enum Command {
    Webhook(Box<webhook::WebhookConfig>, logging::LogFormat),
    Inject(manifest::InjectCommand),
    InitNet(initnet::InitNetConfig),
    Connect(dev::ConnectConfig),
    Redirect(dev::RedirectConfig),
    Revert(dev::RevertConfig),
    Status(dev::StatusConfig),
    Certs(certs::CertsCommand),
    Doctor(dev::DoctorConfig),
    Expose(dev::ExposeConfig),
    Completion(cli::CompletionRequest),
    Bridge(Box<bridge::BridgeOptions>, logging::LogFormat),
    Relay(relay::RelayConfig, logging::LogFormat),
}

/// Runs `kips inject`.
pub fn inject_manifests(command: &InjectCommand) -> anyhow::Result<()> {
    manifest::run(command)
}
