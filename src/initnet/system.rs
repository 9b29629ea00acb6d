//! What `kips init-net` reads about the pod's network namespace and its own privileges, from
//! /proc. Parsers are pure; the readers around them are one line each.

use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The pod's default gateways (IPv4 and IPv6). On bridge CNIs (bridge plugin, flannel, k3s,
/// kubenet) and Cilium the kubelet's probes come from this address, not from the node's.
pub fn default_gateways() -> Vec<IpAddr> {
    let v4 = fs::read_to_string("/proc/net/route").unwrap_or_default();
    let v6 = fs::read_to_string("/proc/net/ipv6_route").unwrap_or_default();
    let mut gateways = parse_ipv4_default_gateways(&v4);
    gateways.extend(parse_ipv6_default_gateways(&v6));
    gateways
}

/// IPv6 is usable in this network namespace (the kernel has it and it is not disabled).
pub fn ipv6_enabled() -> bool {
    fs::metadata("/proc/net/if_inet6").is_ok()
        && fs::read_to_string("/proc/sys/net/ipv6/conf/all/disable_ipv6")
            .map(|v| v.trim() != "1")
            .unwrap_or(true)
}

/// The pod has an IPv6 address beyond loopback and link-local, so IPv6 traffic can reach it
/// and must be redirected too.
pub fn has_global_ipv6_address() -> bool {
    let addresses = fs::read_to_string("/proc/net/if_inet6").unwrap_or_default();
    parse_has_global_ipv6(&addresses)
}

/// This process's effective uid and capabilities, for error messages.
pub fn own_privileges() -> Option<Privileges> {
    parse_privileges(&fs::read_to_string("/proc/self/status").ok()?)
}

fn parse_ipv4_default_gateways(route: &str) -> Vec<IpAddr> {
    // Columns: Iface Destination Gateway Flags RefCnt Use Metric Mask ...; addresses are the
    // kernel's in-memory (network order) words printed as hex.
    route
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (destination, gateway, mask) = (fields.get(1)?, fields.get(2)?, fields.get(7)?);
            if *destination != "00000000" || *mask != "00000000" || *gateway == "00000000" {
                return None;
            }
            let word = u32::from_str_radix(gateway, 16).ok()?;
            Some(IpAddr::V4(Ipv4Addr::from(word.to_ne_bytes())))
        })
        .collect()
}

fn parse_ipv6_default_gateways(route: &str) -> Vec<IpAddr> {
    // Columns: destination, prefix length, source, source prefix length, next hop, metric,
    // refcnt, use, flags, iface; addresses are 32 hex digits in network order.
    route
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (destination, prefix, next_hop) = (fields.first()?, fields.get(1)?, fields.get(4)?);
            if destination.bytes().any(|b| b != b'0') || *prefix != "00" {
                return None;
            }
            let address = parse_ipv6_hex(next_hop)?;
            (!address.is_unspecified()).then_some(IpAddr::V6(address))
        })
        .collect()
}

fn parse_ipv6_hex(hex: &str) -> Option<Ipv6Addr> {
    let word = u128::from_str_radix(hex, 16)
        .ok()
        .filter(|_| hex.len() == 32)?;
    Some(Ipv6Addr::from(word))
}

fn parse_has_global_ipv6(if_inet6: &str) -> bool {
    // Columns: address, ifindex, prefix length, scope, flags, iface; scope 00 is global.
    if_inet6.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.get(3) == Some(&"00") && fields.get(5).is_some_and(|iface| *iface != "lo")
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Privileges {
    pub effective_uid: u32,
    /// The effective capability set, one bit per capability number.
    pub effective_capabilities: u64,
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_NET_RAW: u32 = 13;

impl Privileges {
    /// Which of the two capabilities iptables needs this process lacks.
    pub fn missing_capabilities(&self) -> Vec<&'static str> {
        [(CAP_NET_ADMIN, "NET_ADMIN"), (CAP_NET_RAW, "NET_RAW")]
            .into_iter()
            .filter(|(bit, _)| self.effective_capabilities & (1 << bit) == 0)
            .map(|(_, name)| name)
            .collect()
    }
}

fn parse_privileges(status: &str) -> Option<Privileges> {
    let field = |key: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(key))
            .map(str::trim)
    };
    // `Uid:` lists real, effective, saved and filesystem uids.
    let effective_uid = field("Uid:")?.split_whitespace().nth(1)?.parse().ok()?;
    let effective_capabilities = u64::from_str_radix(field("CapEff:")?, 16).ok()?;
    Some(Privileges {
        effective_uid,
        effective_capabilities,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_endian = "little")]
    fn ipv4_default_gateways_come_from_proc_net_route() {
        let route = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                     eth0\t00000000\t0101F40A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                     eth0\t0001F40A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                     eth1\t00000000\t00000000\t0001\t0\t0\t0\t00000000\t0\t0\t0\n";
        assert_eq!(
            parse_ipv4_default_gateways(route),
            vec!["10.244.1.1".parse::<IpAddr>().unwrap()]
        );
        assert!(parse_ipv4_default_gateways("").is_empty());
    }

    #[test]
    fn ipv6_default_gateways_come_from_proc_net_ipv6_route() {
        let route = "\
fd000010000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003     eth0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo
";
        assert_eq!(
            parse_ipv6_default_gateways(route),
            vec!["fe80::1".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn only_global_ipv6_addresses_on_real_interfaces_count() {
        let link_local_only = "00000000000000000000000000000001 01 80 10 80       lo\n\
                               fe800000000000000000000000000002 02 40 20 80     eth0\n";
        assert!(!parse_has_global_ipv6(link_local_only));
        let dual_stack =
            format!("{link_local_only}fd000010000000000000000000000002 02 40 00 80     eth0\n");
        assert!(parse_has_global_ipv6(&dual_stack));
    }

    #[test]
    fn privileges_are_read_from_proc_self_status() {
        let status = "Name:\tkips\nUid:\t1000\t0\t0\t0\nGid:\t0\t0\t0\t0\nCapInh:\t0000000000000000\nCapEff:\t0000000000002000\n";
        let privileges = parse_privileges(status).unwrap();
        assert_eq!(privileges.effective_uid, 0);
        assert_eq!(privileges.missing_capabilities(), ["NET_ADMIN"]);
        assert!(parse_privileges("Name:\tkips\n").is_none());
    }
}
