//! The relay bridge's command lines, for the in-cluster sidecar and for the laptop: both
//! built from the same [routes](super::routes) as [`grammar`](super::grammar) expressions, so
//! the two sides meet on every relay and binding name, whichever engine runs on either side.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::BridgeEngine;
use super::grammar::{
    self, Host, LocalBinding, LocalForward, Port, PortName, RemoteBinding, RemoteForward,
};
use super::routes::{BindingName, RedirectRoute, ReverseRoute};
use crate::annotations::{Protocol, RelayName};

/// The env var that carries the relay connection string into the sidecar (`-x $(VAR)`), and
/// that `kips connect` reads on the laptop.
pub const CONNECTION_STRING_ENV: &str = "KIPS_RELAY_CONNECTION_STRING";

fn port(number: u16, protocol: Protocol) -> Port {
    match protocol {
        Protocol::Tcp => Port::tcp(number),
        Protocol::Udp => Port::udp(number),
    }
}

fn relay(name: &RelayName) -> grammar::RelayName {
    // Annotation relay names are a subset of azbridge's.
    grammar::RelayName::parse(name.as_str()).expect("a kips relay name is an azbridge relay name")
}

fn name(binding: &BindingName) -> PortName {
    PortName::parse(&binding.to_string()).expect("binding names are azbridge port names")
}

/// Groups items by relay, keeping the order in which relays first appear.
fn group_by_relay<'a, T>(
    items: impl IntoIterator<Item = &'a T>,
    relay: impl Fn(&T) -> &RelayName,
) -> Vec<(&'a RelayName, Vec<&'a T>)>
where
    T: 'a,
{
    let mut groups: Vec<(&RelayName, Vec<&T>)> = Vec::new();
    for item in items {
        let name = relay(item);
        match groups.iter_mut().find(|(r, _)| *r == name) {
            Some((_, members)) => members.push(item),
            None => groups.push((name, vec![item])),
        }
    }
    groups
}

/// A redirect as the sidecar serves it: its route and the port the sidecar listens on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SidecarPort {
    pub route: RedirectRoute,
    pub listen_port: u16,
}

/// The sidecar's expressions: one `-L <any>:<listen>/<name>;...:<relay>` per relay (all
/// bindings of a relay in one expression), one `-T <relay>:<name>/<host>:<port>` per reverse
/// entry. `<any>` is what the engine can bind: `0.0.0.0` for azbridge, `[::]` (dual-stack)
/// for `kips bridge`.
pub fn sidecar_forwards<'p>(
    ports: impl IntoIterator<Item = &'p SidecarPort>,
    reverses: &[ReverseRoute],
    engine: BridgeEngine,
) -> (Vec<LocalForward>, Vec<RemoteForward>) {
    let any = Host::Ip(if engine.binds_ipv6() {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    });
    let ports: Vec<&SidecarPort> = ports.into_iter().collect();
    let locals = group_by_relay(ports.iter().copied(), |p| &p.route.relay)
        .into_iter()
        .map(|(relay_name, members)| LocalForward {
            bindings: members
                .iter()
                .map(|p| LocalBinding {
                    bind: Some(any.clone()),
                    port: port(p.listen_port, p.route.protocol),
                    name: Some(name(&p.route.name)),
                })
                .collect(),
            relay: relay(relay_name),
        })
        .collect();
    let remotes = reverses
        .iter()
        .map(|route| RemoteForward {
            relay: relay(&route.reverse.relay),
            bindings: vec![RemoteBinding {
                name: Some(name(&route.name)),
                host: Some(
                    Host::parse_unbracketed(&route.reverse.host)
                        .expect("reverse hosts are DNS names or IPv4 addresses"),
                ),
                port: Port::tcp(route.reverse.port),
            }],
        })
        .collect();
    (locals, remotes)
}

/// The sidecar's arguments: `-x $(VAR)` and [`sidecar_forwards`]; for `kips bridge` the
/// subcommand first (the image's entrypoint is `kips`) and the health port last.
pub fn sidecar_args<'p>(
    ports: impl IntoIterator<Item = &'p SidecarPort>,
    reverses: &[ReverseRoute],
    engine: BridgeEngine,
    health_port: Option<u16>,
) -> Vec<String> {
    let (locals, remotes) = sidecar_forwards(ports, reverses, engine);
    let mut args = Vec::new();
    if engine == BridgeEngine::Kips {
        args.push("bridge".to_owned());
    }
    args.push("-x".to_owned());
    args.push(format!("$({CONNECTION_STRING_ENV})"));
    push_forwards(&mut args, &locals, &remotes);
    if let (BridgeEngine::Kips, Some(health)) = (engine, health_port) {
        args.push("--health-listen".to_owned());
        args.push(SocketAddr::from((Ipv6Addr::UNSPECIFIED, health)).to_string());
    }
    args
}

fn push_forwards(args: &mut Vec<String>, locals: &[LocalForward], remotes: &[RemoteForward]) {
    for local in locals {
        args.push("-L".into());
        args.push(local.to_string());
    }
    for remote in remotes {
        args.push("-T".into());
        args.push(remote.to_string());
    }
}

/// A redirect as the laptop serves it: what arrives for its route goes to
/// `localhost:<local_port>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaptopPort {
    pub route: RedirectRoute,
    pub local_port: u16,
}

/// A reverse entry as the laptop serves it: the bridge listens on `address:<port>` and sends
/// what arrives through the entry's relay to the sidecar's `-T`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaptopReverse {
    pub route: ReverseRoute,
    pub address: Ipv4Addr,
}

/// The laptop's expressions, the mirror image of [`sidecar_forwards`]:
///
/// - per redirect relay, one `-T <relay>:<name>/localhost:<port>[;...]`; the names meet the
///   sidecar's `-L`.
/// - per reverse entry, one `-L <address>:<port>/<name>:<relay>` on its own loopback
///   address; the name meets the sidecar's `-T`.
pub fn laptop_forwards(
    ports: &[LaptopPort],
    reverses: &[LaptopReverse],
) -> (Vec<LocalForward>, Vec<RemoteForward>) {
    let remotes = group_by_relay(ports, |p| &p.route.relay)
        .into_iter()
        .map(|(relay_name, members)| RemoteForward {
            relay: relay(relay_name),
            bindings: members
                .iter()
                .map(|p| RemoteBinding {
                    name: Some(name(&p.route.name)),
                    host: Some(Host::Name("localhost".to_owned())),
                    port: port(p.local_port, p.route.protocol),
                })
                .collect(),
        })
        .collect();
    let locals = reverses
        .iter()
        .map(|local| LocalForward {
            bindings: vec![LocalBinding {
                bind: Some(Host::Ip(IpAddr::V4(local.address))),
                port: Port::tcp(local.route.reverse.port),
                name: Some(name(&local.route.name)),
            }],
            relay: relay(&local.route.reverse.relay),
        })
        .collect();
    (locals, remotes)
}

/// The laptop's arguments (without the connection string): [`laptop_forwards`] as `-T`s,
/// then `-L`s.
pub fn laptop_args(ports: &[LaptopPort], reverses: &[LaptopReverse]) -> Vec<String> {
    let (locals, remotes) = laptop_forwards(ports, reverses);
    let mut args = Vec::new();
    for remote in &remotes {
        args.push("-T".into());
        args.push(remote.to_string());
    }
    for local in &locals {
        args.push("-L".into());
        args.push(local.to_string());
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotations::{PortRef, Reverse};
    use crate::bridge::routes::BindingName;

    fn relay(name: &str) -> RelayName {
        RelayName::parse(name).unwrap()
    }

    fn route(relay_name: &str, port: PortRef, protocol: Protocol) -> RedirectRoute {
        RedirectRoute {
            relay: relay(relay_name),
            name: BindingName::of(&port, protocol),
            port,
            protocol,
        }
    }

    fn reverse(relay_name: &str, host: &str, port: u16) -> ReverseRoute {
        ReverseRoute::new(&Reverse {
            relay: relay(relay_name),
            host: host.into(),
            port,
        })
    }

    #[test]
    fn laptop_args_mirror_the_sidecar() {
        let ports = [
            LaptopPort {
                route: route("api", PortRef::Number(8080), Protocol::Tcp),
                local_port: 8080,
            },
            LaptopPort {
                route: route("dns", PortRef::Name("dns".into()), Protocol::Udp),
                local_port: 5353,
            },
            LaptopPort {
                route: route("api", PortRef::Name("grpc".into()), Protocol::Tcp),
                local_port: 9090,
            },
        ];
        let reverses = [LaptopReverse {
            route: reverse("db", "postgres.data.svc", 5432),
            address: "127.77.0.1".parse().unwrap(),
        }];
        assert_eq!(
            laptop_args(&ports, &reverses),
            [
                "-T",
                "api:8080/localhost:8080;grpc/localhost:9090",
                "-T",
                "dns:dns.udp/localhost:5353U",
                "-L",
                "127.77.0.1:5432/5432:db",
            ]
        );
    }

    #[test]
    fn every_laptop_binding_meets_a_sidecar_binding() {
        let http = route("api", PortRef::Name("http".into()), Protocol::Tcp);
        let db = reverse("db", "pg", 5432);
        let cluster = sidecar_args(
            &[SidecarPort {
                route: http.clone(),
                listen_port: 15100,
            }],
            std::slice::from_ref(&db),
            BridgeEngine::Azbridge,
            None,
        );
        let laptop = laptop_args(
            &[LaptopPort {
                route: http,
                local_port: 3000,
            }],
            &[LaptopReverse {
                route: db,
                address: "127.77.0.2".parse().unwrap(),
            }],
        );
        assert_eq!(cluster[3], "0.0.0.0:15100/http:api");
        assert_eq!(laptop[1], "api:http/localhost:3000");
        assert_eq!(cluster[5], "db:5432/pg:5432");
        assert_eq!(laptop[3], "127.77.0.2:5432/5432:db");
    }

    #[test]
    fn one_listener_expression_per_relay_and_one_forwarder_per_reverse_entry() {
        let ports = [
            SidecarPort {
                route: route("api", PortRef::Number(8080), Protocol::Tcp),
                listen_port: 15100,
            },
            SidecarPort {
                route: route("dns", PortRef::Name("dns".into()), Protocol::Udp),
                listen_port: 15101,
            },
            SidecarPort {
                route: route("api", PortRef::Name("grpc".into()), Protocol::Tcp),
                listen_port: 15102,
            },
        ];
        let reverses = [
            reverse("db", "postgres.data.svc", 5432),
            reverse("web", "10.0.0.7", 80),
        ];
        assert_eq!(
            sidecar_args(&ports, &reverses, BridgeEngine::Azbridge, None),
            [
                "-x",
                "$(KIPS_RELAY_CONNECTION_STRING)",
                "-L",
                "0.0.0.0:15100/8080;0.0.0.0:15102/grpc:api",
                "-L",
                "0.0.0.0:15101U/dns.udp:dns",
                "-T",
                "db:5432/postgres.data.svc:5432",
                "-T",
                "web:80/10.0.0.7:80",
            ]
        );
    }

    #[test]
    fn the_kips_engine_binds_dual_stack_and_serves_its_health_port() {
        let ports = [SidecarPort {
            route: route("api", PortRef::Number(8080), Protocol::Tcp),
            listen_port: 15100,
        }];
        assert_eq!(
            sidecar_args(&ports, &[], BridgeEngine::Kips, Some(15101)),
            [
                "bridge",
                "-x",
                "$(KIPS_RELAY_CONNECTION_STRING)",
                "-L",
                "[::]:15100/8080:api",
                "--health-listen",
                "[::]:15101",
            ]
        );
    }
}
