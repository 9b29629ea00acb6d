//! The nat rules of iptables port mode, rendered as `iptables-restore --noflush` input.
//! Pure: no I/O here, so the exact bytes kips applies are checked by golden files.

use std::fmt::Write as _;
use std::net::IpAddr;

use crate::inject::ports::PortRedirect;

/// kips' own chain in the nat table, jumped to from PREROUTING.
pub const CHAIN: &str = "KIPS_INBOUND";

/// The PREROUTING jump as `iptables-save` prints it (how kips recognises it on a rerun).
const SAVED_JUMP: &str = "-A PREROUTING -j KIPS_INBOUND";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    pub fn of(address: &IpAddr) -> Family {
        match address {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }

    /// The command prefix: `iptables` or `ip6tables`.
    pub fn command(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    fn host_prefix(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }
}

/// What one run of `kips init-net` installs, in both families.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RulePlan {
    /// Sources whose traffic always reaches the app (the node, for the kubelet's probes; the
    /// pod's gateway), in order of first mention, without duplicates.
    pub exempt_sources: Vec<IpAddr>,
    pub redirects: Vec<PortRedirect>,
}

/// A redirect table that cannot be installed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("nothing to redirect: give at least one --redirect <app port>/<tcp|udp>=<listen port>")]
    Nothing,
    #[error(
        "--redirect {redirect} conflicts with --redirect {earlier}: port {}/{} can go to one listen port only",
        .redirect.app_port, .redirect.protocol
    )]
    Conflict {
        redirect: PortRedirect,
        earlier: PortRedirect,
    },
}

/// A `--node-ips` value that is not a list of addresses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error(
        "\"{0}\" is an unexpanded variable: the container's env must define it (the downward API's status.hostIPs)"
    )]
    Unexpanded(String),
    #[error("\"{0}\" is not an IPv4 or IPv6 address (expected e.g. 10.0.0.5,fd00::5)")]
    Invalid(String),
}

impl RulePlan {
    /// Checks the redirect table: at least one entry, and each app port once per protocol
    /// (a second rule for the same port could never match).
    pub fn new(exempt_sources: &[IpAddr], redirects: &[PortRedirect]) -> Result<Self, RuleError> {
        if redirects.is_empty() {
            return Err(RuleError::Nothing);
        }
        for (index, redirect) in redirects.iter().enumerate() {
            if let Some(earlier) = redirects[..index]
                .iter()
                .find(|r| r.app_port == redirect.app_port && r.protocol == redirect.protocol)
            {
                return Err(RuleError::Conflict {
                    redirect: *redirect,
                    earlier: *earlier,
                });
            }
        }
        let mut unique = Vec::with_capacity(exempt_sources.len());
        for source in exempt_sources {
            if !unique.contains(source) {
                unique.push(*source);
            }
        }
        Ok(RulePlan {
            exempt_sources: unique,
            redirects: redirects.to_vec(),
        })
    }

    /// The `iptables-restore --noflush` input for one family. Declaring the chain flushes it,
    /// so a rerun replaces kips' rules instead of doubling them; the PREROUTING jump goes in
    /// first (ahead of other meshes' rules) and only when it is not there yet.
    pub fn restore_input(&self, family: Family, add_jump: bool) -> String {
        let mut input = format!("*nat\n:{CHAIN} - [0:0]\n");
        for source in self
            .exempt_sources
            .iter()
            .filter(|s| Family::of(s) == family)
        {
            let _ = writeln!(
                input,
                "-A {CHAIN} -s {source}/{} -j RETURN",
                family.host_prefix()
            );
        }
        for redirect in &self.redirects {
            let protocol = redirect.protocol;
            let _ = writeln!(
                input,
                "-A {CHAIN} -p {protocol} -m {protocol} --dport {} -j REDIRECT --to-ports {}",
                redirect.app_port, redirect.listen_port
            );
        }
        if add_jump {
            let _ = writeln!(input, "-I PREROUTING 1 -j {CHAIN}");
        }
        input.push_str("COMMIT\n");
        input
    }

    /// What `--dry-run` prints: each family's input as a fresh pod network namespace gets it.
    pub fn dry_run(&self, families: &[Family]) -> String {
        let mut out = String::new();
        for &family in families {
            let _ = writeln!(
                out,
                "# {}: {}-restore --noflush (the PREROUTING jump is left out when it is already there)",
                family.label(),
                family.command()
            );
            out.push_str(&self.restore_input(family, true));
        }
        out
    }
}

/// Whether `iptables-save -t nat` output already has kips' PREROUTING jump.
pub fn has_jump(saved_nat: &str) -> bool {
    saved_nat.lines().any(|line| line.trim_end() == SAVED_JUMP)
}

/// Restore input that takes kips' rules out again (when the other family could not be set up,
/// so that no half-redirected pod is left behind).
pub fn removal_input() -> String {
    format!("*nat\n:{CHAIN} - [0:0]\n-D PREROUTING -j {CHAIN}\n-X {CHAIN}\nCOMMIT\n")
}

/// Parses the `--node-ips` value: comma-separated addresses, as the downward API renders
/// `status.hostIPs`; empty means none.
pub fn parse_address_list(text: &str) -> Result<Vec<IpAddr>, AddressError> {
    if text.contains("$(") {
        return Err(AddressError::Unexpanded(text.to_owned()));
    }
    text.split(',')
        .map(str::trim)
        .filter(|piece| !piece.is_empty())
        .map(|piece| {
            piece
                .parse::<IpAddr>()
                .map_err(|_| AddressError::Invalid(piece.to_owned()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn redirects(table: &[&str]) -> Vec<PortRedirect> {
        table.iter().map(|r| r.parse().unwrap()).collect()
    }

    fn addresses(list: &str) -> Vec<IpAddr> {
        parse_address_list(list).unwrap()
    }

    /// Compares with `src/initnet/testdata/<name>`; `KIPS_UPDATE_GOLDEN=1` rewrites the file.
    fn assert_golden(name: &str, actual: &str) {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("src/initnet/testdata")
            .join(name);
        if std::env::var_os("KIPS_UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, actual).unwrap();
        }
        let expected = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (KIPS_UPDATE_GOLDEN=1 writes it)", path.display()));
        assert_eq!(actual, expected, "golden file {} differs", path.display());
    }

    #[test]
    fn dry_run_golden_files() {
        let cases = [
            ("tcp-only.rules", "10.0.0.5", vec!["8080/tcp=15100"]),
            (
                "tcp-and-udp.rules",
                "10.0.0.5",
                vec!["8080/tcp=15100", "53/udp=15101", "9090/tcp=15102"],
            ),
            (
                "dual-stack-node.rules",
                "10.0.0.5,fd00:10::5",
                vec!["8080/tcp=15100", "8080/udp=15101"],
            ),
            ("no-node-ips.rules", "", vec!["8080/tcp=15100"]),
            (
                "node-and-gateways.rules",
                "10.0.0.5,10.244.1.1,10.0.0.5,fe80::1",
                vec!["443/tcp=15100"],
            ),
        ];
        for (golden, node_ips, table) in cases {
            let plan = RulePlan::new(&addresses(node_ips), &redirects(&table)).unwrap();
            assert_golden(golden, &plan.dry_run(&Family::ALL));
        }
    }

    #[test]
    fn a_rerun_leaves_the_jump_out() {
        let plan = RulePlan::new(&[], &redirects(&["8080/tcp=15100"])).unwrap();
        let input = plan.restore_input(Family::V4, false);
        assert!(!input.contains("PREROUTING"), "{input}");
        assert!(input.starts_with("*nat\n:KIPS_INBOUND - [0:0]\n") && input.ends_with("COMMIT\n"));
    }

    #[test]
    fn the_jump_is_recognised_in_save_output() {
        let saved = "# Generated by iptables-save v1.8.9\n*nat\n:PREROUTING ACCEPT [0:0]\n:KIPS_INBOUND - [0:0]\n-A PREROUTING -p tcp -j MESH_INBOUND\n-A PREROUTING -j KIPS_INBOUND\nCOMMIT\n";
        assert!(has_jump(saved));
        assert!(!has_jump(
            "*nat\n:KIPS_INBOUND - [0:0]\n-A PREROUTING -j KIPS_INBOUND_OLD\nCOMMIT\n"
        ));
    }

    #[test]
    fn redirect_tables_are_checked() {
        assert!(
            RulePlan::new(&[], &[])
                .unwrap_err()
                .to_string()
                .contains("nothing to redirect")
        );
        let error = RulePlan::new(&[], &redirects(&["8080/tcp=15100", "8080/tcp=15101"]))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("8080/tcp=15101 conflicts with --redirect 8080/tcp=15100"),
            "{error}"
        );
        // The same port number in both protocols is two redirects.
        assert!(RulePlan::new(&[], &redirects(&["8080/tcp=15100", "8080/udp=15101"])).is_ok());
    }

    #[test]
    fn node_address_lists_are_parsed_as_the_downward_api_renders_them() {
        assert_eq!(addresses(""), Vec::<IpAddr>::new());
        assert_eq!(
            addresses("10.0.0.5, fd00::5,"),
            vec![
                "10.0.0.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
        let error = parse_address_list("10.0.0.5,node-1")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("\"node-1\" is not an IPv4 or IPv6 address"),
            "{error}"
        );
        let error = parse_address_list("$(KIPS_NODE_IPS)")
            .unwrap_err()
            .to_string();
        assert!(error.contains("unexpanded variable"), "{error}");
    }
}
