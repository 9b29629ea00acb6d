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

pub use iptables::{Backend, BackendChoice};
pub use rules::{AddressError, CHAIN, Family, RulePlan, parse_address_list};

use crate::inject::ports::PortRedirect;
use iptables::{Tool, ToolError};
use rules::RuleError;

/// What `kips init-net` installs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitNetConfig {
    /// Inbound traffic for an app port goes to the sidecar's listen port.
    pub redirects: Vec<PortRedirect>,
    /// The node's addresses (the downward API's status.hostIPs): traffic from them (the
    /// kubelet's probes) still reaches the app.
    pub node_ips: Vec<IpAddr>,
    /// Traffic from the pod's default gateway reaches the app too.
    pub exclude_gateway: bool,
    pub backend: BackendChoice,
    /// Redirect IPv6 too. Off when the sidecar's bridge listens on IPv4 only (azbridge): an
    /// IPv6 client then keeps reaching the app instead of a port nothing listens on.
    pub ipv6: bool,
    /// Print the iptables-restore input and change nothing.
    pub dry_run: bool,
}

/// Why the rules could not be installed; the pod must not start.
#[derive(Debug, thiserror::Error)]
pub enum InitNetError {
    #[error(transparent)]
    Rules(#[from] RuleError),
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error("{error} (the IPv4 rules were taken out again)")]
    Ipv6RolledBack { error: ToolError },
    #[error("{error}; taking the IPv4 rules out again failed too: {rollback}")]
    Ipv6RollbackFailed {
        error: ToolError,
        rollback: ToolError,
    },
}

pub fn run(config: InitNetConfig) -> Result<(), InitNetError> {
    if config.node_ips.is_empty() {
        eprintln!(
            "kips init-net: warning: no --node-ips: the kubelet's probes of redirected ports reach the sidecar unless they come from the gateway"
        );
    }
    let mut exempt = config.node_ips.clone();
    if config.exclude_gateway {
        exempt.extend(system::default_gateways());
    }
    let plan = RulePlan::new(&exempt, &config.redirects)?;
    if config.dry_run {
        let families: &[Family] = if config.ipv6 {
            &Family::ALL
        } else {
            &[Family::V4]
        };
        print!("{}", plan.dry_run(families));
        return Ok(());
    }

    let backend = match config.backend {
        BackendChoice::Nft => Backend::Nft,
        BackendChoice::Legacy => Backend::Legacy,
        BackendChoice::Auto => {
            let (backend, reason) = iptables::detect_backend();
            eprintln!("kips init-net: iptables backend {backend} ({reason})");
            backend
        }
    };
    let v4 = Tool::new(backend, Family::V4);
    apply(&plan, v4)?;

    if !config.ipv6 {
        eprintln!(
            "kips init-net: no IPv6 rules (--ipv6=false: the bridge listens on IPv4 only); IPv6 clients keep reaching the app"
        );
        return Ok(());
    }
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
            return Err(InitNetError::Ipv6RollbackFailed { error, rollback });
        }
        return Err(InitNetError::Ipv6RolledBack { error });
    }
    Ok(())
}

/// Installs one family's rules and logs exactly what was applied.
fn apply(plan: &RulePlan, tool: Tool) -> Result<(), ToolError> {
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
