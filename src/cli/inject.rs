//! What gets injected (shared by `webhook` and `inject`), and `kips inject`.

use std::path::PathBuf;

use clap::Args;
use clap::builder::{PossibleValuesParser, TypedValueParser};

use super::UsageError;
use crate::annotations::{PortMode, is_dns_subdomain};
use crate::bridge::{BridgeEngine, DEFAULT_RELAY_SECRET};
use crate::inject::{DEFAULT_LISTEN_PORT_BASE, InjectConfig};
use crate::manifest::InjectCommand;

#[derive(Debug, Clone, Args)]
pub(super) struct InjectArgs {
    /// The relay bridge the sidecar runs: azbridge, or kips (`kips bridge` in the kips image:
    /// dual-stack binds, probes on its health port, UDP that survives a lost listener).
    #[arg(
        long,
        env = "KIPS_BRIDGE_ENGINE",
        default_value = "azbridge",
        value_parser = PossibleValuesParser::new(BridgeEngine::NAMES)
            .map(|name| name.parse::<BridgeEngine>().expect("a listed engine"))
    )]
    bridge_engine: BridgeEngine,
    /// Image of the relay-bridge sidecar [default: ghcr.io/kips-dev/azbridge:<azbridge
    /// version> with --bridge-engine azbridge, ghcr.io/kips-dev/kips:<kips version> with kips].
    #[arg(long, env = "KIPS_BRIDGE_IMAGE")]
    bridge_image: Option<String>,
    /// Image of the `kips-init` container (the kips binary plus iptables).
    #[arg(long, env = "KIPS_INIT_IMAGE", default_value_t = InjectConfig::default().init_image)]
    init_image: String,
    /// imagePullPolicy of the injected containers (the cluster's default when unset).
    #[arg(long, env = "KIPS_IMAGE_PULL_POLICY", value_parser = ["Always", "IfNotPresent", "Never"])]
    image_pull_policy: Option<String>,
    /// Secret holding the relay connection string (key `connectionString`) when a workload
    /// does not name one with `kips.io/relay-secret`.
    #[arg(long, env = "KIPS_RELAY_SECRET", default_value = DEFAULT_RELAY_SECRET)]
    relay_secret: String,
    /// First port the sidecar listens on; ports a container of the pod declares are skipped.
    #[arg(long, env = "KIPS_LISTEN_PORT_BASE", default_value_t = DEFAULT_LISTEN_PORT_BASE, value_parser = clap::value_parser!(u16).range(1024..))]
    listen_port_base: u16,
    /// Inject the sidecar as a native sidecar (init container with restartPolicy Always;
    /// Kubernetes 1.29+).
    #[arg(long, env = "KIPS_NATIVE_SIDECAR", default_value_t = true, action = clap::ArgAction::Set)]
    native_sidecar: bool,
    /// Port mode of workloads that do not set `kips.io/port-mode`.
    #[arg(long, env = "KIPS_DEFAULT_PORT_MODE", default_value = "auto", value_parser = clap::value_parser!(PortMode))]
    default_port_mode: PortMode,
}

impl InjectArgs {
    pub(super) fn into_config(self) -> Result<InjectConfig, UsageError> {
        if !is_dns_subdomain(&self.relay_secret) {
            return Err(UsageError::new(format!(
                "--relay-secret \"{}\" is not a valid Secret name",
                self.relay_secret
            )));
        }
        Ok(InjectConfig {
            bridge_image: self
                .bridge_image
                .unwrap_or_else(|| self.bridge_engine.default_image()),
            bridge_engine: self.bridge_engine,
            init_image: self.init_image,
            image_pull_policy: self.image_pull_policy,
            relay_secret: self.relay_secret,
            listen_port_base: self.listen_port_base,
            native_sidecar: self.native_sidecar,
            default_port_mode: self.default_port_mode,
        })
    }
}

#[derive(Debug, Clone, Args)]
pub(super) struct InjectCommandArgs {
    /// Manifest to read (multi-document YAML); `-` reads stdin.
    #[arg(short = 'f', long = "filename")]
    file: PathBuf,
    #[command(flatten)]
    inject: InjectArgs,
}

impl InjectCommandArgs {
    pub(super) fn into_config(self) -> Result<InjectCommand, UsageError> {
        Ok(InjectCommand {
            file: self.file,
            inject: self.inject.into_config()?,
        })
    }
}
