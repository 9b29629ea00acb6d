//! Everything decided about one pod before rendering: each redirect's route, app port and
//! listen port, the port mode, the renames of named mode, the relay Secret.

use std::collections::BTreeSet;

use super::InjectConfig;
use super::ports::{ListenPortsError, PortRedirect, allocate_listen_ports};
use super::view::{MetaView, PodView};
use crate::annotations::{KipsAnnotations, PortMode, PortRef, Protocol, Redirect};
use crate::bridge::command_line::SidecarPort;
use crate::bridge::routes::{
    DeclaredPort, PortError, RedirectRoute, RelayBothWays, RelayError, ReverseRoute, check_one_way,
    resolve_port, reverse_routes,
};

/// Everything decided about one pod before rendering.
#[derive(Debug)]
pub struct Plan {
    pub ports: Vec<PlannedPort>,
    pub reverses: Vec<ReverseRoute>,
    pub annotations: KipsAnnotations,
    /// `None` when there is nothing to redirect (reverse entries only).
    pub mode: Option<PortMode>,
    pub renames: Vec<Rename>,
    pub secret: String,
    /// The sidecar's health port, for engines that serve one.
    pub health_port: Option<u16>,
    pub warnings: Vec<String>,
}

/// A redirect resolved for one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedPort {
    /// The route and the sidecar's listen port.
    pub bridge: SidecarPort,
    /// The container port whose inbound traffic goes to the sidecar.
    pub app_port: u16,
}

/// A container port renamed in named mode, so the sidecar can take its name.
#[derive(Debug)]
pub struct Rename {
    pub container: usize,
    pub container_name: String,
    pub port: usize,
    pub from: String,
    pub to: String,
}

/// Why a pod cannot be injected as its annotations ask.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Relay(#[from] RelayError),
    #[error(transparent)]
    Port(#[from] PortError),
    #[error(
        "port mode named needs a named container port, and port {0} has no name; name the port or use kips.io/port-mode: iptables"
    )]
    NamedModeNeedsName(String),
    #[error("container port name \"{to}\" is taken; kips needs it for the renamed port \"{from}\"")]
    RenameTaken { to: String, from: String },
    #[error(transparent)]
    ListenPorts(#[from] ListenPortsError),
    /// Names its own annotation (`kips.io/reverse`), unlike the others.
    #[error(transparent)]
    RelayBothWays(#[from] RelayBothWays),
    #[error(
        "\"{first}\" and \"{second}\" both mean container port {port}/{protocol}; redirect it once"
    )]
    SamePort {
        first: String,
        second: String,
        port: u16,
        protocol: Protocol,
    },
}

/// Plans the injection of `annotations` into `pod`. `workload_name` is the default relay
/// (the pod's workload; see [`workload_name`]).
pub fn plan(
    pod: &PodView,
    annotations: &KipsAnnotations,
    config: &InjectConfig,
    workload_name: Option<&str>,
) -> Result<Plan, PlanError> {
    let mut warnings = Vec::new();
    let declared = pod.spec.declared_ports();
    let mut resolved = Vec::with_capacity(annotations.redirects.len());
    for redirect in &annotations.redirects {
        let route = RedirectRoute::new(redirect, workload_name)?;
        let found = resolve_port(&declared, &[], &redirect.port, redirect.protocol)?;
        let app_port = match (&redirect.port, found) {
            (_, Some((_, number))) => number,
            (PortRef::Number(n), None) => {
                warnings.push(format!(
                    "kips: port {n}/{} is not declared by any container; redirecting it anyway",
                    redirect.protocol
                ));
                *n
            }
            (PortRef::Name(_), None) => unreachable!("a port name always resolves or errs"),
        };
        if let Some((earlier, ..)) =
            resolved
                .iter()
                .find(|(r, _, port, _): &&(&Redirect, _, u16, _)| {
                    *port == app_port && r.protocol == redirect.protocol
                })
        {
            return Err(PlanError::SamePort {
                first: earlier.to_string(),
                second: redirect.to_string(),
                port: app_port,
                protocol: redirect.protocol,
            });
        }
        resolved.push((redirect, route, app_port, found.map(|(d, _)| d)));
    }
    let routes: Vec<RedirectRoute> = resolved
        .iter()
        .map(|(_, route, ..)| route.clone())
        .collect();
    check_one_way(annotations, &routes)?;
    if !config.bridge_engine.udp_survives_failures()
        && let Some(udp) = annotations
            .redirects
            .iter()
            .find(|r| r.protocol == Protocol::Udp)
    {
        warnings.push(format!(
            "kips: azbridge stops forwarding UDP (\"{udp}\") after its first failed send (no laptop listening, a route idle for 4 minutes) until the pod restarts"
        ));
    }

    let requested = annotations.port_mode.unwrap_or(config.default_port_mode);
    let mode = (!resolved.is_empty()).then(|| resolve_port_mode(requested, &annotations.redirects));

    let taken: BTreeSet<u16> = pod
        .spec
        .all_containers()
        .flat_map(|c| c.ports())
        .filter_map(|p| u16::try_from(p.container_port).ok())
        .collect();
    // The health port, when the engine has one, comes after the listen ports.
    let health = usize::from(config.bridge_engine.has_health_port());
    let mut listen_ports =
        allocate_listen_ports(config.listen_port_base, &taken, resolved.len() + health)?;
    let health_port = (health == 1).then(|| listen_ports.pop()).flatten();

    let mut renames = Vec::new();
    let mut ports = Vec::with_capacity(resolved.len());
    for ((redirect, route, app_port, found), listen_port) in resolved.into_iter().zip(listen_ports)
    {
        if mode == Some(PortMode::Named) {
            let Some(DeclaredPort {
                container,
                index,
                name: Some(name),
                ..
            }) = found
            else {
                return Err(PlanError::NamedModeNeedsName(redirect.to_string()));
            };
            let to = renamed_port_name(app_port, route.protocol);
            if pod.spec.containers[*container]
                .ports()
                .iter()
                .any(|p| p.name.as_deref() == Some(&to))
            {
                return Err(PlanError::RenameTaken {
                    to,
                    from: (*name).to_owned(),
                });
            }
            renames.push(Rename {
                container: *container,
                container_name: pod.spec.containers[*container].name.to_string(),
                port: *index,
                from: (*name).to_owned(),
                to,
            });
        }
        ports.push(PlannedPort {
            bridge: SidecarPort { route, listen_port },
            app_port,
        });
    }

    Ok(Plan {
        ports,
        reverses: reverse_routes(annotations),
        annotations: annotations.clone(),
        mode,
        renames,
        secret: annotations
            .relay_secret
            .clone()
            .unwrap_or_else(|| config.relay_secret.clone()),
        health_port,
        warnings,
    })
}

impl Plan {
    /// The nat rules `kips init-net` installs: app port to listen port.
    pub fn port_redirects(&self) -> Vec<PortRedirect> {
        self.ports
            .iter()
            .map(|p| PortRedirect {
                protocol: p.bridge.route.protocol,
                app_port: p.app_port,
                listen_port: p.bridge.listen_port,
            })
            .collect()
    }
}

/// The port mode `requested` means for `redirects`: `auto` is `named` when every redirect
/// names its port, `iptables` otherwise. The one rule, used by the webhook and `kips doctor`.
pub fn resolve_port_mode(requested: PortMode, redirects: &[Redirect]) -> PortMode {
    match requested {
        PortMode::Auto if redirects.iter().all(|r| matches!(r.port, PortRef::Name(_))) => {
            PortMode::Named
        }
        PortMode::Auto => PortMode::Iptables,
        explicit => explicit,
    }
}

/// The name the app's port gets in named mode, freeing its old name for the sidecar.
/// At most 15 characters (`kips-app-65535u`), as Kubernetes requires.
pub fn renamed_port_name(app_port: u16, protocol: Protocol) -> String {
    match protocol {
        Protocol::Tcp => format!("kips-app-{app_port}"),
        Protocol::Udp => format!("kips-app-{app_port}u"),
    }
}

/// The workload a pod belongs to, which is the default relay name: a Deployment's pods are
/// owned by `<deployment>-<pod-template-hash>`; other controllers own their pods directly.
pub fn workload_name(meta: &MetaView) -> Option<String> {
    let owner = meta
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true));
    if let Some(owner) = owner {
        // A Deployment's ReplicaSet is named `<deployment>-<pod-template-hash>`.
        if &*owner.kind == "ReplicaSet"
            && let Some(hash) = meta.label("pod-template-hash")
            && let Some(deployment) = owner
                .name
                .strip_suffix(hash)
                .and_then(|n| n.strip_suffix('-'))
        {
            return Some(deployment.to_owned());
        }
        return Some(owner.name.to_string());
    }
    meta.name
        .as_deref()
        .map(str::to_owned)
        .or_else(|| {
            meta.generate_name
                .as_deref()
                .map(|g| g.trim_end_matches('-').to_owned())
        })
        .filter(|n| !n.is_empty())
}
