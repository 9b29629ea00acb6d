//! What `kips connect` runs on the developer's machine, decided from the workload alone.
//! Pure: the ports and relays of each redirect, the loopback address and hosts-file line of
//! each reverse entry, and the azbridge command line.

use std::collections::BTreeSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use k8s_openapi::api::core::v1::PodSpec;

use crate::annotations::{KipsAnnotations, PortRef, Protocol, RelayName, Reverse};
use crate::inject::bridge::{LocalPort, LocalReverse, binding_name, laptop_args};
use crate::inject::status::InjectionStatus;
use crate::inject::{BRIDGE_CONTAINER, INIT_CONTAINER};

/// The loopback range reverse entries get their addresses from (`127.77.0.1` upwards):
/// away from `127.0.0.1` and the `127.0.1.1` Debian gives the host name.
pub const REVERSE_NET: [u8; 2] = [127, 77];

/// `--port-map <port>=<local>`: serve the redirect of `<port>` (a number or a port name, as
/// the annotation or the container names it; `/udp` for UDP) on `localhost:<local>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortMapping {
    pub port: PortRef,
    pub protocol: Option<Protocol>,
    pub local: u16,
}

impl FromStr for PortMapping {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let form = "expected <port>[/udp]=<local port>, e.g. 8080=3000 or http=3000";
        let (key, local) = text
            .split_once('=')
            .ok_or_else(|| format!("--port-map \"{text}\" has no '=' ({form})"))?;
        let (port, protocol) = match key.rsplit_once('/') {
            Some((port, "udp" | "UDP")) => (port, Some(Protocol::Udp)),
            Some((port, "tcp" | "TCP")) => (port, Some(Protocol::Tcp)),
            Some((_, other)) => {
                return Err(format!(
                    "--port-map \"{text}\": protocol \"{other}\" is not tcp or udp ({form})"
                ));
            }
            None => (key, None),
        };
        let port =
            PortRef::parse(port.trim()).map_err(|e| format!("--port-map \"{text}\": {e}"))?;
        let local = match PortRef::parse(local.trim()) {
            Ok(PortRef::Number(n)) => n,
            _ => {
                return Err(format!(
                    "--port-map \"{text}\": local port \"{local}\" is not a number 1-65535"
                ));
            }
        };
        Ok(PortMapping {
            port,
            protocol,
            local,
        })
    }
}

/// One reverse entry as the laptop serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReverseEntry {
    pub local: LocalReverse,
    /// True when the host is a DNS name, which gets a hosts-file line; an IP address can only
    /// be reached at the loopback address itself.
    pub named: bool,
}

/// Everything `kips connect` decided, before it touches the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaptopPlan {
    pub ports: Vec<LocalPort>,
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
    /// azbridge's arguments, without `-x`.
    pub fn args(&self) -> Vec<String> {
        let reverses: Vec<LocalReverse> = self.reverses.iter().map(|r| r.local.clone()).collect();
        laptop_args(&self.ports, &reverses)
    }

    pub fn hosts_entries(&self) -> Vec<HostsEntry> {
        self.reverses
            .iter()
            .map(|r| HostsEntry {
                address: r.local.address,
                host: r.local.reverse.host.clone(),
                named: r.named,
            })
            .collect()
    }

    /// Lines that tell the developer where things are.
    pub fn describe(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for port in &self.ports {
            let proto = match port.protocol {
                Protocol::Tcp => "",
                Protocol::Udp => "/udp",
            };
            lines.push(format!(
                "redirect: cluster port {}{proto} -> relay {} -> localhost:{}{proto}",
                port.port, port.relay, port.local_port
            ));
        }
        for entry in &self.reverses {
            let r = &entry.local.reverse;
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
) -> Result<LaptopPlan, String> {
    let mut used_mappings = vec![false; port_map.len()];
    let mut ports = Vec::new();
    for redirect in &annotations.redirects {
        let relay = match &redirect.relay {
            Some(relay) => relay.clone(),
            None => RelayName::parse(workload_name).map_err(|e| {
                format!(
                    "redirect \"{redirect}\" has no relay and the workload name cannot be one: {e}"
                )
            })?,
        };
        let number = match &redirect.port {
            PortRef::Number(n) => Some(*n),
            PortRef::Name(name) => resolve_named_port(spec, status, name, redirect.protocol),
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
                return Err(format!(
                    "redirect \"{redirect}\" names port \"{}\", and no container of the pod template declares it{}; say which local port serves it with --port-map {}=<local port>",
                    redirect.port,
                    match redirect.protocol {
                        Protocol::Tcp => "",
                        Protocol::Udp => " (UDP)",
                    },
                    redirect.port
                ));
            }
        };
        ports.push(LocalPort {
            relay,
            port: redirect.port.clone(),
            protocol: redirect.protocol,
            local_port,
        });
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
        return Err(format!(
            "--port-map {}={}: the workload redirects no port {} (it redirects: {})",
            mapping.port,
            mapping.local,
            mapping.port,
            if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            }
        ));
    }

    let addresses = free_addresses(annotations.reverses.len(), taken)?;
    let reverses = annotations
        .reverses
        .iter()
        .zip(addresses)
        .map(|(reverse, address)| ReverseEntry {
            named: reverse.host.parse::<std::net::IpAddr>().is_err(),
            local: LocalReverse {
                reverse: reverse.clone(),
                address,
            },
        })
        .collect();
    Ok(LaptopPlan { ports, reverses })
}

/// The container port named `name` (kips' own containers excepted); in a template rendered by
/// `kips inject` the app's port was renamed, which `status` records.
fn resolve_named_port(
    spec: Option<&PodSpec>,
    status: Option<&InjectionStatus>,
    name: &str,
    protocol: Protocol,
) -> Option<u16> {
    let find = |wanted: &str| -> Option<u16> {
        spec?
            .containers
            .iter()
            .filter(|c| c.name != BRIDGE_CONTAINER && c.name != INIT_CONTAINER)
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| {
                p.name.as_deref() == Some(wanted)
                    && Protocol::from_kubernetes(p.protocol.as_deref()) == Some(protocol)
            })
            .and_then(|p| u16::try_from(p.container_port).ok())
    };
    find(name).or_else(|| {
        let renamed = status?.renamed_ports.iter().find(|r| r.from == name)?;
        find(&renamed.to)
    })
}

/// `count` loopback addresses in 127.77.0.0/16 that `taken` does not hold.
pub fn free_addresses(count: usize, taken: &BTreeSet<Ipv4Addr>) -> Result<Vec<Ipv4Addr>, String> {
    let [a, b] = REVERSE_NET;
    let free: Vec<Ipv4Addr> = (1u16..=65534)
        .map(|n| Ipv4Addr::new(a, b, (n >> 8) as u8, n as u8))
        .filter(|addr| addr.octets()[3] != 0 && addr.octets()[3] != 255 && !taken.contains(addr))
        .take(count)
        .collect();
    if free.len() < count {
        return Err(format!("no free loopback address left in {a}.{b}.0.0/16"));
    }
    Ok(free)
}

/// The binding names of a plan, for messages: which `-L` of the sidecar each `-T` meets.
pub fn binding_names(plan: &LaptopPlan) -> Vec<String> {
    plan.ports
        .iter()
        .map(|p| binding_name(&p.port, p.protocol))
        .collect()
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

pub fn shell_quote(text: &str) -> String {
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

/// The reverse entries of a plan, for tests and messages.
pub fn reverses(plan: &LaptopPlan) -> Vec<&Reverse> {
    plan.reverses.iter().map(|r| &r.local.reverse).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotations::{PORT_MODE, REDIRECT, REVERSE};
    use crate::inject::status::RenamedPort;
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
                "api:port8080/localhost:8080",
                "-T",
                "metrics:metrics/localhost:9090",
                "-T",
                "dns:dns-udp/localhost:53U",
                "-L",
                "127.77.0.2:5432/port5432:db",
                "-L",
                "127.77.0.3:80/port80:ip",
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
        assert_eq!(binding_names(&plan), ["port8080", "metrics", "dns-udp"]);
        assert_eq!(reverses(&plan).len(), 2);
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
                "dns:dns-udp/localhost:5353U"
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
        .unwrap_err();
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
        .unwrap_err();
        assert!(err.contains("names port \"web\""), "{err}");
        let err = plan(
            "api",
            &annotations("8080", None),
            Some(&spec()),
            None,
            &["9999=1".parse().unwrap()],
            &BTreeSet::new(),
        )
        .unwrap_err();
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
                .contains("has no '='")
        );
        assert!(
            "8080=x"
                .parse::<PortMapping>()
                .unwrap_err()
                .contains("local port \"x\"")
        );
        assert!(
            "8080/sctp=1"
                .parse::<PortMapping>()
                .unwrap_err()
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
            "api:port80/localhost:80;b/localhost:81",
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
            "azbridge -x <redacted> -T 'api:port80/localhost:80;b/localhost:81'"
        );
        assert!(!text.contains("secret"));
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
