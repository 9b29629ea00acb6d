//! What `kips connect` runs on the developer's machine, decided from the workload alone.
//! Pure: the local port of each redirect, the loopback address and hosts-file line of each
//! reverse entry, and the bridge's command line — the mirror image of the sidecar, from the
//! same [routes](crate::bridge::routes).

use std::collections::BTreeSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use k8s_openapi::api::core::v1::PodSpec;

use crate::annotations::{
    InjectionStatus, KipsAnnotations, PortRef, PortRefError, Protocol, Redirect,
};
use crate::bridge::command_line::{LaptopPort, LaptopReverse, laptop_args};
use crate::bridge::routes::{DeclaredPort, RedirectRoute, RelayError, ReverseRoute, resolve_port};

/// The loopback range reverse entries get their addresses from (`127.77.0.1` upwards):
/// away from `127.0.0.1` and the `127.0.1.1` Debian gives the host name.
const REVERSE_NET: [u8; 2] = [127, 77];

const PORT_MAP_FORM: &str = "expected <port>[/udp]=<local port>, e.g. 8080=3000 or http=3000";

/// `--port-map <port>=<local>`: serve the redirect of `<port>` (a number or a port name, as
/// the annotation or the container names it; `/udp` for UDP) on `localhost:<local>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortMapping {
    pub port: PortRef,
    pub protocol: Option<Protocol>,
    pub local: u16,
}

/// A `--port-map` value that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortMappingError {
    #[error("--port-map \"{0}\" has no '=' ({PORT_MAP_FORM})")]
    NoEquals(String),
    #[error("--port-map \"{text}\": protocol \"{protocol}\" is not tcp or udp ({PORT_MAP_FORM})")]
    Protocol { text: String, protocol: String },
    #[error("--port-map \"{text}\": {error}")]
    Port { text: String, error: PortRefError },
    #[error("--port-map \"{text}\": local port \"{local}\" is not a number 1-65535")]
    Local { text: String, local: String },
}

impl FromStr for PortMapping {
    type Err = PortMappingError;
    fn from_str(text: &str) -> Result<Self, PortMappingError> {
        let (key, local) = text
            .split_once('=')
            .ok_or_else(|| PortMappingError::NoEquals(text.to_owned()))?;
        let (port, protocol) = match key.rsplit_once('/') {
            Some((port, "udp" | "UDP")) => (port, Some(Protocol::Udp)),
            Some((port, "tcp" | "TCP")) => (port, Some(Protocol::Tcp)),
            Some((_, other)) => {
                return Err(PortMappingError::Protocol {
                    text: text.to_owned(),
                    protocol: other.to_owned(),
                });
            }
            None => (key, None),
        };
        let port = PortRef::parse(port.trim()).map_err(|error| PortMappingError::Port {
            text: text.to_owned(),
            error,
        })?;
        let local = match PortRef::parse(local.trim()) {
            Ok(PortRef::Number(n)) => n,
            _ => {
                return Err(PortMappingError::Local {
                    text: text.to_owned(),
                    local: local.to_owned(),
                });
            }
        };
        Ok(PortMapping {
            port,
            protocol,
            local,
        })
    }
}

/// Why the laptop side cannot be planned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LaptopError {
    #[error("redirect \"{redirect}\" has no relay and the workload name cannot be one: {error}")]
    Relay {
        redirect: Redirect,
        error: RelayError,
    },
    #[error(
        "redirect \"{redirect}\" names port \"{}\", and no container of the pod template declares it{}; say which local port serves it with --port-map {}=<local port>",
        .redirect.port,
        if .redirect.protocol == Protocol::Udp { " (UDP)" } else { "" },
        .redirect.port
    )]
    UnresolvedPort { redirect: Redirect },
    #[error(
        "--port-map {}={}: the workload redirects no port {} (it redirects: {})",
        .mapping.port, .mapping.local, .mapping.port, .known
    )]
    UnusedMapping { mapping: PortMapping, known: String },
    #[error("no free loopback address left in {}.{}.0.0/16", REVERSE_NET[0], REVERSE_NET[1])]
    NoAddress,
}

/// One reverse entry as the laptop serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReverseEntry {
    pub local: LaptopReverse,
    /// True when the host is a DNS name, which gets a hosts-file line; an IP address can only
    /// be reached at the loopback address itself.
    pub named: bool,
}

/// Everything `kips connect` decided, before it touches the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaptopPlan {
    pub ports: Vec<LaptopPort>,
    pub reverses: Vec<ReverseEntry>,
}

/// A hosts-file line of a reverse entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostsEntry {
    pub address: Ipv4Addr,
    pub host: String,
    /// A DNS name (an active line) or an IP address (written as a comment that reserves the
    /// loopback address for this run).
    pub named: bool,
}

impl LaptopPlan {
    /// The bridge's arguments, without the connection string.
    pub fn args(&self) -> Vec<String> {
        laptop_args(&self.ports, &self.local_reverses())
    }

    /// The reverse entries as the bridge serves them.
    pub fn local_reverses(&self) -> Vec<LaptopReverse> {
        self.reverses.iter().map(|r| r.local.clone()).collect()
    }

    pub fn hosts_entries(&self) -> Vec<HostsEntry> {
        self.reverses
            .iter()
            .map(|r| HostsEntry {
                address: r.local.address,
                host: r.local.route.reverse.host.clone(),
                named: r.named,
            })
            .collect()
    }

    /// Lines that tell the developer where things are.
    pub fn describe(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for port in &self.ports {
            let proto = match port.route.protocol {
                Protocol::Tcp => "",
                Protocol::Udp => "/udp",
            };
            lines.push(format!(
                "redirect: cluster port {}{proto} -> relay {} -> localhost:{}{proto}",
                port.route.port, port.route.relay, port.local_port
            ));
        }
        for entry in &self.reverses {
            let r = &entry.local.route.reverse;
            let reach = if entry.named {
                format!(
                    "{}:{} (hosts file: {} -> {})",
                    r.host, r.port, r.host, entry.local.address
                )
            } else {
                format!("{}:{}", entry.local.address, r.port)
            };
            lines.push(format!(
                "reverse: {reach} -> relay {} -> in-cluster {}:{}",
                r.relay, r.host, r.port
            ));
        }
        lines
    }
}

/// Decides the laptop side of `annotations` on workload `workload_name` (the default relay).
/// `spec` is the pod template (named ports are resolved there), `status` the template's
/// `kips.io/status` when a manifest was rendered by `kips inject` (its renamed ports).
/// `taken` are loopback addresses other `kips connect` runs hold.
pub fn plan(
    workload_name: &str,
    annotations: &KipsAnnotations,
    spec: Option<&PodSpec>,
    status: Option<&InjectionStatus>,
    port_map: &[PortMapping],
    taken: &BTreeSet<Ipv4Addr>,
) -> Result<LaptopPlan, LaptopError> {
    let declared = spec.map(DeclaredPort::of_spec).unwrap_or_default();
    let renamed = status
        .map(|s| s.renamed_ports.as_slice())
        .unwrap_or_default();
    let mut used_mappings = vec![false; port_map.len()];
    let mut ports = Vec::new();
    for redirect in &annotations.redirects {
        let route = RedirectRoute::new(redirect, Some(workload_name)).map_err(|error| {
            LaptopError::Relay {
                redirect: redirect.clone(),
                error,
            }
        })?;
        let number = match resolve_port(&declared, renamed, &redirect.port, redirect.protocol) {
            Ok(Some((_, number))) => Some(number),
            Ok(None) | Err(_) => match redirect.port {
                PortRef::Number(n) => Some(n),
                PortRef::Name(_) => None,
            },
        };
        let mapped = port_map.iter().enumerate().find(|(_, m)| {
            m.protocol.is_none_or(|p| p == redirect.protocol)
                && (m.port == redirect.port
                    || Some(&m.port) == number.map(PortRef::Number).as_ref())
        });
        let local_port = match (mapped, number) {
            (Some((index, mapping)), _) => {
                used_mappings[index] = true;
                mapping.local
            }
            (None, Some(n)) => n,
            (None, None) => {
                return Err(LaptopError::UnresolvedPort {
                    redirect: redirect.clone(),
                });
            }
        };
        ports.push(LaptopPort { route, local_port });
    }
    if let Some((mapping, _)) = port_map
        .iter()
        .zip(&used_mappings)
        .find(|(_, used)| !**used)
    {
        let known: Vec<String> = annotations
            .redirects
            .iter()
            .map(|r| r.port.to_string())
            .collect();
        return Err(LaptopError::UnusedMapping {
            mapping: mapping.clone(),
            known: if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            },
        });
    }

    let addresses = free_addresses(annotations.reverses.len(), taken)?;
    let reverses = annotations
        .reverses
        .iter()
        .zip(addresses)
        .map(|(reverse, address)| ReverseEntry {
            named: reverse.host.parse::<std::net::IpAddr>().is_err(),
            local: LaptopReverse {
                route: ReverseRoute::new(reverse),
                address,
            },
        })
        .collect();
    Ok(LaptopPlan { ports, reverses })
}

/// `count` loopback addresses in 127.77.0.0/16 that `taken` does not hold.
fn free_addresses(count: usize, taken: &BTreeSet<Ipv4Addr>) -> Result<Vec<Ipv4Addr>, LaptopError> {
    let [a, b] = REVERSE_NET;
    let free: Vec<Ipv4Addr> = (1u16..=65534)
        .map(|n| Ipv4Addr::new(a, b, (n >> 8) as u8, n as u8))
        .filter(|addr| addr.octets()[3] != 0 && addr.octets()[3] != 255 && !taken.contains(addr))
        .take(count)
        .collect();
    if free.len() < count {
        return Err(LaptopError::NoAddress);
    }
    Ok(free)
}

/// A command line as a shell would need it, with the connection string redacted.
pub struct Printable<'a> {
    pub program: &'a str,
    pub args: &'a [String],
}

impl fmt::Display for Printable<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&shell_quote(self.program))?;
        let mut redact_next = false;
        for arg in self.args {
            if redact_next {
                f.write_str(" <redacted>")?;
                redact_next = false;
                continue;
            }
            write!(f, " {}", shell_quote(arg))?;
            redact_next = arg == "-x";
        }
        Ok(())
    }
}

fn shell_quote(text: &str) -> String {
    let safe = !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-./:=,@%+".contains(&b));
    if safe {
        text.to_owned()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotations::RenamedPort;
    use crate::annotations::{PORT_MODE, REDIRECT, REVERSE};
    use serde_json::json;

    fn spec() -> PodSpec {
        serde_json::from_value(json!({
            "containers": [
                {"name": "app", "image": "app", "ports": [
                    {"name": "http", "containerPort": 8080},
                    {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                    {"name": "metrics", "containerPort": 9090}
                ]},
                {"name": "kips-bridge", "image": "azbridge", "ports": [{"name": "web", "containerPort": 15100}]}
            ]
        }))
        .unwrap()
    }

    fn annotations(redirect: &str, reverse: Option<&str>) -> KipsAnnotations {
        let mut pairs = vec![(REDIRECT, redirect), (PORT_MODE, "auto")];
        if let Some(reverse) = reverse {
            pairs.push((REVERSE, reverse));
        }
        KipsAnnotations::parse(pairs).unwrap()
    }

    #[test]
    fn redirects_udp_and_reverse_entries_become_the_mirror_image() {
        let plan = plan(
            "api",
            &annotations(
                "8080,metrics:metrics,dns:dns/udp",
                Some("db=postgres.data.svc:5432,ip=10.0.0.5:80"),
            ),
            Some(&spec()),
            None,
            &[],
            &BTreeSet::from(["127.77.0.1".parse().unwrap()]),
        )
        .unwrap();
        assert_eq!(
            plan.args(),
            [
                "-T",
                "api:8080/localhost:8080",
                "-T",
                "metrics:metrics/localhost:9090",
                "-T",
                "dns:dns.udp/localhost:53U",
                "-L",
                "127.77.0.2:5432/5432:db",
                "-L",
                "127.77.0.3:80/80:ip",
            ]
        );
        assert_eq!(
            plan.hosts_entries(),
            [
                HostsEntry {
                    address: "127.77.0.2".parse().unwrap(),
                    host: "postgres.data.svc".into(),
                    named: true
                },
                HostsEntry {
                    address: "127.77.0.3".parse().unwrap(),
                    host: "10.0.0.5".into(),
                    named: false
                },
            ]
        );
        let names: Vec<String> = plan
            .ports
            .iter()
            .map(|p| p.route.name.to_string())
            .collect();
        assert_eq!(names, ["8080", "metrics", "dns.udp"]);
        assert_eq!(plan.reverses.len(), 2);
        let text = plan.describe().join("\n");
        assert!(
            text.contains("reverse: postgres.data.svc:5432 (hosts file"),
            "{text}"
        );
        assert!(
            text.contains("reverse: 127.77.0.3:80 -> relay ip"),
            "{text}"
        );
    }

    #[test]
    fn port_map_moves_local_ports_by_number_or_name() {
        let map: Vec<PortMapping> = ["8080=3000", "dns/udp=5353"]
            .iter()
            .map(|m| m.parse().unwrap())
            .collect();
        let plan = plan(
            "api",
            &annotations("http,dns:dns/udp", None),
            Some(&spec()),
            None,
            &map,
            &BTreeSet::new(),
        )
        .unwrap();
        assert_eq!(
            plan.args(),
            [
                "-T",
                "api:http/localhost:3000",
                "-T",
                "dns:dns.udp/localhost:5353U"
            ]
        );
    }

    #[test]
    fn unresolvable_named_ports_and_unused_mappings_are_errors() {
        let err = plan(
            "api",
            &annotations("grpc", None),
            Some(&spec()),
            None,
            &[],
            &BTreeSet::new(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("--port-map grpc=<local port>"), "{err}");
        // kips' own sidecar port names never count.
        let err = plan(
            "api",
            &annotations("web", None),
            Some(&spec()),
            None,
            &[],
            &BTreeSet::new(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("names port \"web\""), "{err}");
        let err = plan(
            "api",
            &annotations("8080", None),
            Some(&spec()),
            None,
            &["9999=1".parse().unwrap()],
            &BTreeSet::new(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("redirects no port 9999 (it redirects: 8080)"),
            "{err}"
        );
    }

    #[test]
    fn renamed_ports_of_rendered_templates_resolve() {
        let mut spec = spec();
        spec.containers[0].ports.as_mut().unwrap()[0].name = Some("kips-app-8080".into());
        let status = InjectionStatus {
            version: "0".into(),
            port_mode: Some("named".into()),
            port_mode_requested: None,
            sidecar: "native".into(),
            engine: None,
            init_containers: vec![],
            containers: vec![],
            redirects: vec![],
            reverse: vec![],
            renamed_ports: vec![RenamedPort {
                container: "app".into(),
                from: "http".into(),
                to: "kips-app-8080".into(),
            }],
            digest: String::new(),
        };
        let plan = plan(
            "api",
            &annotations("http", None),
            Some(&spec),
            Some(&status),
            &[],
            &BTreeSet::new(),
        )
        .unwrap();
        assert_eq!(plan.args(), ["-T", "api:http/localhost:8080"]);
    }

    #[test]
    fn port_mappings_parse_with_clear_errors() {
        assert_eq!(
            "http=3000".parse::<PortMapping>().unwrap(),
            PortMapping {
                port: PortRef::Name("http".into()),
                protocol: None,
                local: 3000
            }
        );
        assert!(
            "8080"
                .parse::<PortMapping>()
                .unwrap_err()
                .to_string()
                .contains("has no '='")
        );
        assert!(
            "8080=x"
                .parse::<PortMapping>()
                .unwrap_err()
                .to_string()
                .contains("local port \"x\"")
        );
        assert!(
            "8080/sctp=1"
                .parse::<PortMapping>()
                .unwrap_err()
                .to_string()
                .contains("\"sctp\"")
        );
    }

    #[test]
    fn addresses_skip_taken_ones_and_network_and_broadcast() {
        let taken = BTreeSet::from(["127.77.0.1".parse().unwrap()]);
        assert_eq!(
            free_addresses(2, &taken).unwrap(),
            [
                "127.77.0.2".parse::<Ipv4Addr>().unwrap(),
                "127.77.0.3".parse().unwrap()
            ]
        );
        let taken: BTreeSet<Ipv4Addr> = (1..=254).map(|n| Ipv4Addr::new(127, 77, 0, n)).collect();
        assert_eq!(
            free_addresses(1, &taken).unwrap(),
            ["127.77.1.1".parse::<Ipv4Addr>().unwrap()]
        );
    }

    #[test]
    fn printed_commands_redact_the_connection_string_and_quote() {
        let args: Vec<String> = [
            "-x",
            "Endpoint=sb://x/;SharedAccessKey=secret",
            "-T",
            "api:80/localhost:80;b/localhost:81",
        ]
        .map(String::from)
        .to_vec();
        let text = Printable {
            program: "azbridge",
            args: &args,
        }
        .to_string();
        assert_eq!(
            text,
            "azbridge -x <redacted> -T 'api:80/localhost:80;b/localhost:81'"
        );
        assert!(!text.contains("secret"));
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
