//! What the sidecar and the laptop must agree on, computed once: for each redirect, the relay
//! it travels on, its binding name and the container port it means; for each reverse entry,
//! its relay and binding name. The webhook renders the sidecar from these routes and `kips
//! connect` renders the laptop's mirror image from the same routes, so the `-L` bindings of
//! one side always meet the `-T` bindings of the other.

use std::fmt;

use k8s_openapi::api::core::v1::PodSpec;

use crate::annotations::{
    KipsAnnotations, PortRef, Protocol, Redirect, RelayName, RelayNameError, RenamedPort, Reverse,
    is_kips_container,
};

/// The name that ties an `-L` binding of one side to a `-T` binding of the other; azbridge
/// sends it in the preamble of every connection.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BindingName(String);

impl BindingName {
    /// The binding name of a redirected port: `port8080`, `http`, `dns-udp`.
    pub fn of(port: &PortRef, protocol: Protocol) -> Self {
        let base = match port {
            PortRef::Number(n) => format!("port{n}"),
            PortRef::Name(name) => name.clone(),
        };
        Self(match protocol {
            Protocol::Tcp => base,
            Protocol::Udp => format!("{base}-udp"),
        })
    }

    /// The binding name of a reverse entry.
    pub fn of_reverse(reverse: &Reverse) -> Self {
        Self::of(&PortRef::Number(reverse.port), Protocol::Tcp)
    }
}

impl fmt::Display for BindingName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A container port of an app container, as a pod template declares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeclaredPort<'a> {
    /// Index of the container in `spec.containers`.
    pub container: usize,
    pub container_name: &'a str,
    /// Index of the port in the container's `ports`.
    pub index: usize,
    pub name: Option<&'a str>,
    pub number: i32,
    /// `None` for a protocol kips does not carry (SCTP).
    pub protocol: Option<Protocol>,
}

impl<'a> DeclaredPort<'a> {
    /// The ports of a typed pod spec's app containers (kips' own containers excepted: a
    /// template rendered by `kips inject` carries them).
    pub fn of_spec(spec: &'a PodSpec) -> Vec<Self> {
        spec.containers
            .iter()
            .enumerate()
            .filter(|(_, c)| !is_kips_container(&c.name))
            .flat_map(|(container, c)| {
                c.ports
                    .iter()
                    .flatten()
                    .enumerate()
                    .map(move |(index, p)| DeclaredPort {
                        container,
                        container_name: &c.name,
                        index,
                        name: p.name.as_deref(),
                        number: p.container_port,
                        protocol: Protocol::from_kubernetes(p.protocol.as_deref()),
                    })
            })
            .collect()
    }
}

/// Why a redirect's port cannot be resolved in a pod template.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    #[error(
        "port \"{name}\" of container \"{container}\" is {declared}, not {wanted}; write \"{name}{suffix}\"",
        suffix = if *.declared == "UDP" { "/udp" } else { "" }
    )]
    WrongProtocol {
        name: String,
        container: String,
        declared: String,
        wanted: &'static str,
    },
    #[error("no container declares a port named \"{name}\" (declared names: {})", names_or_none(.declared))]
    NoSuchName { name: String, declared: Vec<String> },
    #[error("container port {0} is out of range")]
    OutOfRange(i32),
}

fn names_or_none(names: &[String]) -> String {
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join(", ")
    }
}

/// The declared port a redirect names. By name it must exist with the redirect's protocol
/// (in a template rendered by `kips inject`, under the name `renamed` records); by number it
/// may be undeclared (`Ok(None)`: iptables still redirects it).
pub fn resolve_port<'p, 'a>(
    ports: &'p [DeclaredPort<'a>],
    renamed: &[RenamedPort],
    port: &PortRef,
    protocol: Protocol,
) -> Result<Option<(&'p DeclaredPort<'a>, u16)>, PortError> {
    let wanted: Vec<&str> = match port {
        PortRef::Number(_) => Vec::new(),
        PortRef::Name(name) => std::iter::once(name.as_str())
            .chain(
                renamed
                    .iter()
                    .filter(|r| r.from == *name)
                    .map(|r| r.to.as_str()),
            )
            .collect(),
    };
    let mut other_protocol = None;
    for declared in ports {
        let matches = match port {
            PortRef::Number(n) => declared.number == i32::from(*n),
            PortRef::Name(_) => declared.name.is_some_and(|n| wanted.contains(&n)),
        };
        if !matches {
            continue;
        }
        if declared.protocol != Some(protocol) {
            other_protocol = Some(declared);
            continue;
        }
        let number =
            u16::try_from(declared.number).map_err(|_| PortError::OutOfRange(declared.number))?;
        return Ok(Some((declared, number)));
    }
    match (port, other_protocol) {
        (PortRef::Name(name), Some(declared)) => Err(PortError::WrongProtocol {
            name: name.clone(),
            container: declared.container_name.to_owned(),
            declared: match declared.protocol {
                Some(p) => p.kubernetes_name().to_owned(),
                None => "SCTP".to_owned(),
            },
            wanted: protocol.kubernetes_name(),
        }),
        (PortRef::Name(name), None) => Err(PortError::NoSuchName {
            name: name.clone(),
            declared: ports
                .iter()
                .filter_map(|p| p.name)
                .map(str::to_owned)
                .collect(),
        }),
        (PortRef::Number(_), _) => Ok(None),
    }
}

/// Why a redirect has no relay.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RelayError {
    #[error(
        "a redirect without a relay needs the workload's name, and this pod has none; write <relay>:<port>"
    )]
    NoWorkloadName,
    #[error("the workload name cannot be the relay: {0}")]
    NotARelayName(#[from] RelayNameError),
}

/// The relay a redirect travels on: its own, else the workload's name.
pub fn redirect_relay(
    redirect: &Redirect,
    workload_name: Option<&str>,
) -> Result<RelayName, RelayError> {
    match &redirect.relay {
        Some(relay) => Ok(relay.clone()),
        None => {
            let name = workload_name.ok_or(RelayError::NoWorkloadName)?;
            Ok(RelayName::parse(name)?)
        }
    }
}

/// A redirect's route between the sidecar's `-L` and the laptop's `-T`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedirectRoute {
    pub relay: RelayName,
    pub name: BindingName,
    /// The port as the annotation names it.
    pub port: PortRef,
    pub protocol: Protocol,
}

impl RedirectRoute {
    pub fn new(redirect: &Redirect, workload_name: Option<&str>) -> Result<Self, RelayError> {
        Ok(Self {
            relay: redirect_relay(redirect, workload_name)?,
            name: BindingName::of(&redirect.port, redirect.protocol),
            port: redirect.port.clone(),
            protocol: redirect.protocol,
        })
    }
}

/// A reverse entry's route between the sidecar's `-T` and the laptop's `-L`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReverseRoute {
    pub reverse: Reverse,
    pub name: BindingName,
}

impl ReverseRoute {
    pub fn new(reverse: &Reverse) -> Self {
        Self {
            name: BindingName::of_reverse(reverse),
            reverse: reverse.clone(),
        }
    }
}

/// Every route of a workload's annotations.
pub fn reverse_routes(annotations: &KipsAnnotations) -> Vec<ReverseRoute> {
    annotations.reverses.iter().map(ReverseRoute::new).collect()
}
