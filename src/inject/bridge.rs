//! azbridge command lines, for the in-cluster sidecar and for the laptop.
//!
//! Both sides derive the binding names from the annotations alone, so that the `-L` bindings
//! of one side meet the `-T` bindings of the other without further coordination.

use crate::annotations::{PortRef, Protocol, RelayName, Reverse};

/// The env var that carries the relay connection string into the sidecar (`-x $(VAR)`).
pub const CONNECTION_STRING_ENV: &str = "KIPS_RELAY_CONNECTION_STRING";

/// A redirect with its relay and ports resolved for one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgedPort {
    pub relay: RelayName,
    /// The port as the annotation names it (the binding name derives from it).
    pub port: PortRef,
    pub protocol: Protocol,
    pub app_port: u16,
    pub listen_port: u16,
}

/// The azbridge port-binding name shared by both sides: `port8080`, `http`, `dns-udp`.
pub fn binding_name(port: &PortRef, protocol: Protocol) -> String {
    let base = match port {
        PortRef::Number(n) => format!("port{n}"),
        PortRef::Name(name) => name.clone(),
    };
    match protocol {
        Protocol::Tcp => base,
        Protocol::Udp => format!("{base}-udp"),
    }
}

/// azbridge's port syntax: UDP ports carry a `U` suffix.
pub fn port_spec(port: u16, protocol: Protocol) -> String {
    match protocol {
        Protocol::Tcp => port.to_string(),
        Protocol::Udp => format!("{port}U"),
    }
}

/// Groups items by relay, keeping the order in which relays first appear.
pub fn group_by_relay<'a, T>(
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

/// The sidecar's arguments: `-x $(VAR)`, one `-L 0.0.0.0:<listen>/<name>;...:<relay>` per relay
/// (azbridge allows one `-L` per relay), one `-T <relay>:<name>/<host>:<port>` per reverse entry.
pub fn cluster_args(ports: &[BridgedPort], reverses: &[Reverse]) -> Vec<String> {
    let mut args = vec!["-x".to_owned(), format!("$({CONNECTION_STRING_ENV})")];
    for (relay, members) in group_by_relay(ports, |p| &p.relay) {
        let bindings: Vec<String> = members
            .iter()
            .map(|p| {
                format!(
                    "0.0.0.0:{}/{}",
                    port_spec(p.listen_port, p.protocol),
                    binding_name(&p.port, p.protocol)
                )
            })
            .collect();
        args.push("-L".into());
        args.push(format!("{}:{relay}", bindings.join(";")));
    }
    for reverse in reverses {
        args.push("-T".into());
        args.push(format!(
            "{}:{}/{}:{}",
            reverse.relay,
            reverse_binding_name(reverse),
            reverse.host,
            reverse.port
        ));
    }
    args
}

/// A redirect as the laptop serves it: traffic arriving on `relay` for the binding of
/// `port`/`protocol` goes to `localhost:<local_port>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalPort {
    pub relay: RelayName,
    /// The port as the annotation names it (the binding name derives from it).
    pub port: PortRef,
    pub protocol: Protocol,
    pub local_port: u16,
}

/// A reverse entry as the laptop serves it: azbridge listens on `address:<reverse.port>`
/// and sends what arrives through `reverse.relay` to the sidecar's `-T`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReverse {
    pub reverse: Reverse,
    pub address: std::net::Ipv4Addr,
}

/// The laptop's arguments (without `-x`): the mirror image of [`cluster_args`].
///
/// - per redirect relay, one `-T <relay>:<name>/localhost:<port>[;...]` (azbridge takes
///   several bindings of one relay in one expression); the names meet the sidecar's `-L`.
/// - per reverse entry, one `-L <address>:<port>/<name>:<relay>` on its own loopback
///   address; the name meets the sidecar's `-T`.
pub fn laptop_args(ports: &[LocalPort], reverses: &[LocalReverse]) -> Vec<String> {
    let mut args = Vec::new();
    for (relay, members) in group_by_relay(ports, |p| &p.relay) {
        let bindings: Vec<String> = members
            .iter()
            .map(|p| {
                format!(
                    "{}/localhost:{}",
                    binding_name(&p.port, p.protocol),
                    port_spec(p.local_port, p.protocol)
                )
            })
            .collect();
        args.push("-T".into());
        args.push(format!("{relay}:{}", bindings.join(";")));
    }
    for local in reverses {
        args.push("-L".into());
        args.push(format!(
            "{}:{}/{}:{}",
            local.address,
            local.reverse.port,
            reverse_binding_name(&local.reverse),
            local.reverse.relay
        ));
    }
    args
}

pub fn reverse_binding_name(reverse: &Reverse) -> String {
    binding_name(&PortRef::Number(reverse.port), Protocol::Tcp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay(name: &str) -> RelayName {
        RelayName::parse(name).unwrap()
    }

    #[test]
    fn laptop_args_mirror_the_sidecar() {
        let ports = [
            LocalPort {
                relay: relay("api"),
                port: PortRef::Number(8080),
                protocol: Protocol::Tcp,
                local_port: 8080,
            },
            LocalPort {
                relay: relay("dns"),
                port: PortRef::Name("dns".into()),
                protocol: Protocol::Udp,
                local_port: 5353,
            },
            LocalPort {
                relay: relay("api"),
                port: PortRef::Name("grpc".into()),
                protocol: Protocol::Tcp,
                local_port: 9090,
            },
        ];
        let reverses = [LocalReverse {
            reverse: Reverse {
                relay: relay("db"),
                host: "postgres.data.svc".into(),
                port: 5432,
            },
            address: "127.77.0.1".parse().unwrap(),
        }];
        assert_eq!(
            laptop_args(&ports, &reverses),
            [
                "-T",
                "api:port8080/localhost:8080;grpc/localhost:9090",
                "-T",
                "dns:dns-udp/localhost:5353U",
                "-L",
                "127.77.0.1:5432/port5432:db",
            ]
        );
    }

    #[test]
    fn every_laptop_binding_meets_a_sidecar_binding() {
        // The sidecar's -L names (and the laptop's -T names) come from the same function.
        let cluster = cluster_args(
            &[BridgedPort {
                relay: relay("api"),
                port: PortRef::Name("http".into()),
                protocol: Protocol::Tcp,
                app_port: 8080,
                listen_port: 15100,
            }],
            &[Reverse {
                relay: relay("db"),
                host: "pg".into(),
                port: 5432,
            }],
        );
        let laptop = laptop_args(
            &[LocalPort {
                relay: relay("api"),
                port: PortRef::Name("http".into()),
                protocol: Protocol::Tcp,
                local_port: 3000,
            }],
            &[LocalReverse {
                reverse: Reverse {
                    relay: relay("db"),
                    host: "pg".into(),
                    port: 5432,
                },
                address: "127.77.0.2".parse().unwrap(),
            }],
        );
        assert_eq!(cluster[3], "0.0.0.0:15100/http:api");
        assert_eq!(laptop[1], "api:http/localhost:3000");
        assert_eq!(cluster[5], "db:port5432/pg:5432");
        assert_eq!(laptop[3], "127.77.0.2:5432/port5432:db");
    }

    #[test]
    fn one_listener_expression_per_relay_and_one_forwarder_per_reverse_entry() {
        let ports = [
            BridgedPort {
                relay: relay("api"),
                port: PortRef::Number(8080),
                protocol: Protocol::Tcp,
                app_port: 8080,
                listen_port: 15100,
            },
            BridgedPort {
                relay: relay("dns"),
                port: PortRef::Name("dns".into()),
                protocol: Protocol::Udp,
                app_port: 53,
                listen_port: 15101,
            },
            BridgedPort {
                relay: relay("api"),
                port: PortRef::Name("grpc".into()),
                protocol: Protocol::Tcp,
                app_port: 9090,
                listen_port: 15102,
            },
        ];
        let reverses = [
            Reverse {
                relay: relay("db"),
                host: "postgres.data.svc".into(),
                port: 5432,
            },
            Reverse {
                relay: relay("web"),
                host: "10.0.0.7".into(),
                port: 80,
            },
        ];
        assert_eq!(
            cluster_args(&ports, &reverses),
            [
                "-x",
                "$(KIPS_RELAY_CONNECTION_STRING)",
                "-L",
                "0.0.0.0:15100/port8080;0.0.0.0:15102/grpc:api",
                "-L",
                "0.0.0.0:15101U/dns-udp:dns",
                "-T",
                "db:port5432/postgres.data.svc:5432",
                "-T",
                "web:port80/10.0.0.7:80",
            ]
        );
    }
}
