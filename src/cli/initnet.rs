//! `kips init-net`'s flags.

use std::net::IpAddr;

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{ArgAction, Args};

use crate::initnet::{BackendChoice, InitNetConfig, parse_address_list};
use crate::inject::ports::PortRedirect;

#[derive(Debug, Clone, Args)]
pub(super) struct InitNetArgs {
    /// Inbound traffic for an app port goes to the sidecar's listen port, e.g. 8080/tcp=15100.
    /// Repeat for more ports.
    #[arg(long = "redirect", value_name = "APP/PROTO=LISTEN", required = true)]
    redirects: Vec<PortRedirect>,
    /// The node's addresses, comma-separated (the downward API's status.hostIPs): traffic from
    /// them (the kubelet's probes) still reaches the app.
    #[arg(long, value_name = "ADDRESSES", default_value = "", value_parser = node_ips)]
    node_ips: NodeIps,
    /// Let traffic from the pod's default gateway reach the app too (bridge CNIs and Cilium
    /// send the kubelet's probes from there).
    #[arg(
        long,
        value_name = "BOOL",
        default_value_t = true,
        num_args = 0..=1,
        default_missing_value = "true",
        action = ArgAction::Set
    )]
    exclude_gateway: bool,
    /// iptables backend: `auto` uses the one that already holds rules here (nft when none).
    #[arg(
        long,
        env = "KIPS_IPTABLES_BACKEND",
        default_value = "auto",
        value_parser = PossibleValuesParser::new(BackendChoice::NAMES)
            .map(|name| name.parse::<BackendChoice>().expect("a listed backend"))
    )]
    backend: BackendChoice,
    /// Redirect IPv6 too. `false` when the sidecar's bridge listens on IPv4 only (azbridge):
    /// IPv6 clients then keep reaching the app instead of a port nothing listens on.
    #[arg(
        long,
        value_name = "BOOL",
        default_value_t = true,
        num_args = 0..=1,
        default_missing_value = "true",
        action = ArgAction::Set
    )]
    ipv6: bool,
    /// Print the iptables-restore input for both families and change nothing.
    #[arg(long)]
    dry_run: bool,
}

/// The `--node-ips` list (a newtype: clap would take a `Vec` for a repeated flag).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct NodeIps(Vec<IpAddr>);

fn node_ips(text: &str) -> Result<NodeIps, crate::initnet::AddressError> {
    parse_address_list(text).map(NodeIps)
}

impl InitNetArgs {
    pub(super) fn into_config(self) -> InitNetConfig {
        InitNetConfig {
            redirects: self.redirects,
            node_ips: self.node_ips.0,
            exclude_gateway: self.exclude_gateway,
            backend: self.backend,
            ipv6: self.ipv6,
            dry_run: self.dry_run,
        }
    }
}
