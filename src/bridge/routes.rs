//! What the sidecar and the laptop must agree on, computed once: for each redirect, the relay
//! it travels on, its binding name and the container port it means; for each reverse entry,
//! its relay and binding name. The webhook renders the sidecar from these routes and `kips
//! connect` renders the laptop's mirror image from the same routes, so the `-L` bindings of
//! one side always meet the `-T` bindings of the other.

use std::fmt;

use k8s_openapi::api::core::v1::PodSpec;

use crate::annotations::{
    KipsAnnotations, PortRef, Protocol, REDIRECT, REVERSE, Redirect, RelayName, RelayNameError,
    RenamedPort, Reverse, is_kips_container, render_list,
};

/// The name that ties an `-L` binding of one side to a `-T` binding of the other; azbridge
/// sends it in the preamble of every connection, and a `-T` holding one name twice makes
/// azbridge exit.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BindingName(String);

impl BindingName {
    /// The binding name of a redirected port: the port as the annotation names it, with
    /// `.udp` for UDP (`8080`, `http`, `53.udp`, `dns.udp`). Distinct redirects get distinct
    /// names by construction: a number is digits only, a port name begins with a letter, and
    /// neither holds a `.` (the grammar refuses the same port twice per protocol).
    pub fn of(port: &PortRef, protocol: Protocol) -> Self {
        let base = port.to_string();
        Self(match protocol {
            Protocol::Tcp => base,
            Protocol::Udp => format!("{base}.udp"),
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

/// The reverse routes of a workload's annotations.
pub fn reverse_routes(annotations: &KipsAnnotations) -> Vec<ReverseRoute> {
    annotations.reverses.iter().map(ReverseRoute::new).collect()
}

/// A relay asked to carry both directions. The relay balances every connection across all
/// its listeners, so the sidecar's own `-L` connections would land on its own `-T` about half
/// of the time, and the laptop's on the laptop: traffic fails both ways.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{REVERSE}: \"{reverses}\": relay \"{relay}\" is also used by {REDIRECT} (\"{redirect}\"{}); a relay carries one direction (expected a relay name not used in {REDIRECT})",
    if *.defaulted { format!(" takes the workload's name, {}, as its relay", .relay) } else { String::new() }
)]
pub struct RelayBothWays {
    /// The whole `kips.io/reverse` value.
    pub reverses: String,
    pub relay: RelayName,
    /// The redirect entry that uses the relay.
    pub redirect: Redirect,
    /// The redirect names no relay: it took the workload's name.
    pub defaulted: bool,
}

/// Checks that no relay carries both a redirect and a reverse entry, with every redirect's
/// relay resolved (a redirect without one takes the workload's name).
pub fn check_one_way(
    annotations: &KipsAnnotations,
    routes: &[RedirectRoute],
) -> Result<(), RelayBothWays> {
    for reverse in &annotations.reverses {
        let shared = annotations
            .redirects
            .iter()
            .zip(routes)
            .find(|(_, route)| route.relay == reverse.relay);
        if let Some((redirect, route)) = shared {
            return Err(RelayBothWays {
                reverses: render_list(&annotations.reverses),
                relay: route.relay.clone(),
                redirect: redirect.clone(),
                defaulted: redirect.relay.is_none(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotations::REDIRECT;
    use proptest::prelude::*;

    fn annotations(pairs: &[(&str, &str)]) -> KipsAnnotations {
        KipsAnnotations::parse(pairs.iter().copied()).unwrap()
    }

    fn routes(kips: &KipsAnnotations, workload: &str) -> Vec<RedirectRoute> {
        kips.redirects
            .iter()
            .map(|r| RedirectRoute::new(r, Some(workload)).unwrap())
            .collect()
    }

    #[test]
    fn a_defaulted_relay_may_not_also_carry_a_reverse_entry() {
        let kips = annotations(&[(REDIRECT, "8080"), (REVERSE, "api=db.shop.svc:5432")]);
        let err = check_one_way(&kips, &routes(&kips, "api")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "kips.io/reverse: \"api=db.shop.svc:5432\": relay \"api\" is also used by kips.io/redirect (\"8080\" takes the workload's name, api, as its relay); a relay carries one direction (expected a relay name not used in kips.io/redirect)"
        );
        check_one_way(&kips, &routes(&kips, "web")).unwrap();
    }

    #[test]
    fn the_names_of_the_issue_are_distinct() {
        // A port named like a number's old binding name, and a TCP port named like a UDP one.
        let names: Vec<BindingName> = [
            (PortRef::Name("port8080".into()), Protocol::Tcp),
            (PortRef::Number(8080), Protocol::Tcp),
            (PortRef::Name("dns-udp".into()), Protocol::Tcp),
            (PortRef::Name("dns".into()), Protocol::Udp),
            (PortRef::Number(53), Protocol::Udp),
            (PortRef::Number(53), Protocol::Tcp),
        ]
        .iter()
        .map(|(p, proto)| BindingName::of(p, *proto))
        .collect();
        let texts: Vec<String> = names.iter().map(ToString::to_string).collect();
        assert_eq!(
            texts,
            ["port8080", "8080", "dns-udp", "dns.udp", "53.udp", "53"]
        );
    }

    fn port_ref() -> impl Strategy<Value = PortRef> {
        prop_oneof![
            (1u16..=65535).prop_map(PortRef::Number),
            "[a-z]([a-z0-9]{0,5}-?[a-z0-9]{1,6})?".prop_map(PortRef::Name),
            // Names that look like numbers' or UDP ports' names in other schemes.
            (1u16..=65535).prop_map(|n| PortRef::Name(format!("port{n}"))),
            "[a-z]{1,6}".prop_map(|n| PortRef::Name(format!("{n}-udp"))),
        ]
    }

    proptest! {
        /// Whatever the annotations, the binding names of one relay are unique: a `-T` with a
        /// name twice makes azbridge exit.
        #[test]
        fn binding_names_are_unique_per_relay(
            entries in proptest::collection::vec(
                (prop_oneof![Just(None), Just(Some("a")), Just(Some("b"))], port_ref(), any::<bool>()),
                1..12,
            )
        ) {
            let value = entries
                .iter()
                .map(|(relay, port, udp)| {
                    let relay = relay.map(|r| format!("{r}:")).unwrap_or_default();
                    format!("{relay}{port}{}", if *udp { "/udp" } else { "" })
                })
                .collect::<Vec<_>>()
                .join(",");
            // Values the grammar refuses (the same port twice) never reach the bridge.
            let Ok(kips) = KipsAnnotations::parse([(REDIRECT, value.as_str())]) else {
                return Ok(());
            };
            let routes = routes(&kips, "workload");
            for (i, a) in routes.iter().enumerate() {
                for b in &routes[i + 1..] {
                    prop_assert!(
                        a.relay != b.relay || a.name != b.name,
                        "{value}: {} and {} share {} on {}", a.port, b.port, a.name, a.relay
                    );
                }
            }
        }
    }
}
