//! azbridge command lines, for the in-cluster sidecar and for the laptop: both rendered from
//! the same [routes](super::routes), so the two sides meet on every relay and binding name.

use std::net::Ipv4Addr;

use super::routes::{RedirectRoute, ReverseRoute};
use crate::annotations::{Protocol, RelayName};

/// The env var that carries the relay connection string into the sidecar (`-x $(VAR)`), and
/// that `kips connect` reads on the laptop.
pub const CONNECTION_STRING_ENV: &str = "KIPS_RELAY_CONNECTION_STRING";

/// azbridge's port syntax: UDP ports carry a `U` suffix.
fn port_spec(port: u16, protocol: Protocol) -> String {
    match protocol {
        Protocol::Tcp => port.to_string(),
        Protocol::Udp => format!("{port}U"),
    }
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

/// The sidecar's arguments: `-x $(VAR)`, one `-L 0.0.0.0:<listen>/<name>;...:<relay>` per
/// relay (all bindings of a relay in one expression), one `-T <relay>:<name>/<host>:<port>`
/// per reverse entry.
pub fn sidecar_args<'p>(
    ports: impl IntoIterator<Item = &'p SidecarPort>,
    reverses: &[ReverseRoute],
) -> Vec<String> {
    let mut args = vec!["-x".to_owned(), format!("$({CONNECTION_STRING_ENV})")];
    for (relay, members) in group_by_relay(ports, |p| &p.route.relay) {
        let bindings: Vec<String> = members
            .iter()
            .map(|p| {
                format!(
                    "0.0.0.0:{}/{}",
                    port_spec(p.listen_port, p.route.protocol),
                    p.route.name
                )
            })
            .collect();
        args.push("-L".into());
        args.push(format!("{}:{relay}", bindings.join(";")));
    }
    for route in reverses {
        let reverse = &route.reverse;
        args.push("-T".into());
        args.push(format!(
            "{}:{}/{}:{}",
            reverse.relay, route.name, reverse.host, reverse.port
        ));
    }
    args
}

/// A redirect as the laptop serves it: what arrives for its route goes to
/// `localhost:<local_port>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaptopPort {
    pub route: RedirectRoute,
    pub local_port: u16,
}

/// A reverse entry as the laptop serves it: azbridge listens on `address:<port>` and sends
/// what arrives through the entry's relay to the sidecar's `-T`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaptopReverse {
    pub route: ReverseRoute,
    pub address: Ipv4Addr,
}

/// The laptop's arguments (without `-x`): the mirror image of [`sidecar_args`].
///
/// - per redirect relay, one `-T <relay>:<name>/localhost:<port>[;...]`; the names meet the
///   sidecar's `-L`.
/// - per reverse entry, one `-L <address>:<port>/<name>:<relay>` on its own loopback
///   address; the name meets the sidecar's `-T`.
pub fn laptop_args(ports: &[LaptopPort], reverses: &[LaptopReverse]) -> Vec<String> {
    let mut args = Vec::new();
    for (relay, members) in group_by_relay(ports, |p| &p.route.relay) {
        let bindings: Vec<String> = members
            .iter()
            .map(|p| {
                format!(
                    "{}/localhost:{}",
                    p.route.name,
                    port_spec(p.local_port, p.route.protocol)
                )
            })
            .collect();
        args.push("-T".into());
        args.push(format!("{relay}:{}", bindings.join(";")));
    }
    for local in reverses {
        let reverse = &local.route.reverse;
        args.push("-L".into());
        args.push(format!(
            "{}:{}/{}:{}",
            local.address, reverse.port, local.route.name, reverse.relay
        ));
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
            sidecar_args(&ports, &reverses),
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
}
