//! `kips init-net`: the nat rules of iptables port mode, installed by the `kips-init`
//! container in the pod's network namespace before any other container starts.
//!
//! - Rules live in kips' own nat chain `KIPS_INBOUND`, jumped to from PREROUTING (inserted
//!   first, so another mesh's catch-all capture cannot hide kips' ports). Only PREROUTING:
//!   the pod's own traffic, even to its own address, goes through OUTPUT and lo and keeps
//!   reaching the app. Other chains and rules are never flushed or touched.
//! - The chain first RETURNs traffic from exempt sources: the node's addresses (`--node-ips`,
//!   the downward API's `status.hostIPs`), where the kubelet's probes come from, and the
//!   pod's default gateway (`--exclude-gateway`, on by default), where they come from on
//!   bridge CNIs (bridge plugin, flannel, k3s, kubenet) and Cilium. On CNIs whose gateway is a
//!   placeholder (Calico, AWS and Azure CNI: 169.254.1.1) that exemption is inert. Its cost:
//!   on bridge CNIs, NodePort traffic masqueraded to the bridge address reaches the app.
//! - Each family is applied with one `iptables-restore --noflush` transaction (atomic);
//!   declaring the chain flushes it, and the jump is added only when `iptables-save` does not
//!   show it, so a rerun leaves one set of rules. If IPv6 fails where the pod has an IPv6
//!   address, the IPv4 rules are taken out again and the container fails: the pod never
//!   starts half-redirected.
//! - Backend: whichever of nft and legacy already holds rules in the pod (as kube-proxy's
//!   iptables-wrapper decides), nft when neither does; `--backend` overrides.
//! - Privilege: uid 0 with only NET_ADMIN and NET_RAW (legacy needs NET_RAW for its raw
//!   socket; nft needs only NET_ADMIN), no privilege escalation. Kubernetes sets no ambient
//!   capabilities, so a non-root container keeps added capabilities in its bounding set only
//!   and loses them at exec; iptables would then need file capabilities *and*
//!   allowPrivilegeEscalation (no_new_privs disables file capabilities) — trading a uid for
//!   a weaker sandbox, at the same Pod Security level (privileged). Where that level is not
//!   allowed, `kips.io/port-mode: named` needs no privilege at all.

mod iptables;
mod rules;
mod system;

use std::net::IpAddr;

use anyhow::{Result, anyhow, bail};
use clap::ArgAction;

pub use iptables::{Backend, BackendChoice};
pub use rules::{CHAIN, Family, RulePlan};

use crate::inject::ports::PortRedirect;
use iptables::Tool;

#[derive(Debug, Clone, clap::Args)]
pub struct InitNetArgs {
    /// Inbound traffic for an app port goes to the sidecar's listen port, e.g. 8080/tcp=15100.
    /// Repeat for more ports.
    #[arg(long = "redirect", value_name = "APP/PROTO=LISTEN", required = true)]
    pub redirects: Vec<PortRedirect>,
    /// The node's addresses, comma-separated (the downward API's status.hostIPs): traffic from
    /// them (the kubelet's probes) still reaches the app.
    #[arg(long, value_name = "ADDRESSES", default_value = "", value_parser = parse_node_ips)]
    pub node_ips: NodeIps,
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
    pub exclude_gateway: bool,
    /// iptables backend: `auto` uses the one that already holds rules here (nft when none).
    #[arg(
        long,
        value_enum,
        env = "KIPS_IPTABLES_BACKEND",
        default_value = "auto"
    )]
    pub backend: BackendChoice,
    /// Print the iptables-restore input for both families and change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// The `--node-ips` list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeIps(pub Vec<IpAddr>);

fn parse_node_ips(text: &str) -> Result<NodeIps, String> {
    rules::parse_address_list(text).map(NodeIps)
}

pub fn run(args: InitNetArgs) -> Result<()> {
    if args.node_ips.0.is_empty() {
        eprintln!(
            "kips init-net: warning: no --node-ips: the kubelet's probes of redirected ports reach the sidecar unless they come from the gateway"
        );
    }
    let mut exempt = args.node_ips.0.clone();
    if args.exclude_gateway {
        exempt.extend(system::default_gateways());
    }
    let plan = RulePlan::new(&exempt, &args.redirects).map_err(|e| anyhow!(e))?;
    if args.dry_run {
        print!("{}", plan.dry_run());
        return Ok(());
    }

    let backend = match args.backend {
        BackendChoice::Nft => Backend::Nft,
        BackendChoice::Legacy => Backend::Legacy,
        BackendChoice::Auto => {
            let (backend, reason) = iptables::detect_backend();
            eprintln!("kips init-net: iptables backend {backend} ({reason})");
            backend
        }
    };
    let v4 = Tool::new(backend, Family::V4);
    apply(&plan, v4).map_err(|e| anyhow!(e))?;

    if !system::ipv6_enabled() {
        eprintln!("kips init-net: IPv6 is off in this pod; IPv4 rules only");
        return Ok(());
    }
    if let Err(error) = apply(&plan, Tool::new(backend, Family::V6)) {
        if !system::has_global_ipv6_address() {
            eprintln!(
                "kips init-net: no IPv6 rules (the pod has no IPv6 address beyond link-local): {error}"
            );
            return Ok(());
        }
        if let Err(rollback) = v4.restore(&rules::removal_input()) {
            bail!("{error}; taking the IPv4 rules out again failed too: {rollback}");
        }
        bail!("{error} (the IPv4 rules were taken out again)");
    }
    Ok(())
}

/// Installs one family's rules and logs exactly what was applied.
fn apply(plan: &RulePlan, tool: Tool) -> Result<(), String> {
    let jump_present = rules::has_jump(&tool.save_nat()?);
    let input = plan.restore_input(tool.family, !jump_present);
    tool.restore(&input)?;
    println!(
        "# {}: applied with {} --noflush",
        tool.family.label(),
        tool.binary("restore")
    );
    print!("{input}");
    Ok(())
}
