//! azbridge's forwarding expressions, `-L` (local forwarder: the sender side) and `-T`
//! (remote forwarder: the listener side), as plain data that parses and renders.
//!
//! Parsing follows azbridge 0.16.1 (`Configuration/Config.cs`): the relay of `-L` is the text
//! after the **last** `:`, the relay of `-T` the text before the **first** `:`; bindings are
//! separated by `;`; a port ending in `U` is UDP; a binding's name defaults to its port text
//! (`8080`, `5353U`); `-L` binds `localhost` and `-T` connects to `localhost` when no address
//! is given. kips adds IPv6 addresses in brackets (`[::]:8080`, `name/[::1]:80`), which
//! azbridge cannot parse. Rendering ([`std::fmt::Display`]) writes the canonical form, and
//! parsing what was rendered gives the same value back.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// The forms, as `kips bridge --help` and the errors state them.
pub const LOCAL_FORM: &str = "[address:]port[U][/name]{;[address:]port[U][/name]}:relay";
pub const REMOTE_FORM: &str = "relay:[name/][host:]port[U]{;[name/][host:]port[U]}";

/// The address a `-L` binding listens on when it names none (azbridge's default).
pub const DEFAULT_BIND_HOST: &str = "localhost";
/// The host a `-T` binding connects to when it names none (azbridge's default).
pub const DEFAULT_TARGET_HOST: &str = "localhost";

/// A `-L` expression: local sockets whose connections go to hybrid connection `relay`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LocalForward {
    pub bindings: Vec<LocalBinding>,
    pub relay: RelayName,
}

/// One binding of a `-L` expression: `[address:]port[U][/name]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LocalBinding {
    /// `None`: azbridge's default, [`DEFAULT_BIND_HOST`].
    pub bind: Option<Host>,
    pub port: Port,
    /// `None`: the port text ([`LocalBinding::effective_name`]).
    pub name: Option<PortName>,
}

/// A `-T` expression: connections arriving on hybrid connection `relay` go to these targets.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RemoteForward {
    pub relay: RelayName,
    pub bindings: Vec<RemoteBinding>,
}

/// One binding of a `-T` expression: `[name/][host:]port[U]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RemoteBinding {
    /// `None`: the port text ([`RemoteBinding::effective_name`]).
    pub name: Option<PortName>,
    /// `None`: azbridge's default, [`DEFAULT_TARGET_HOST`].
    pub host: Option<Host>,
    pub port: Port,
}

/// An IP address or a host name. IPv6 renders in brackets.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    Ip(IpAddr),
    Name(String),
}

/// A port number and its protocol: `8080` is TCP, `8080U` UDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Port {
    pub number: u16,
    pub udp: bool,
}

/// The logical name that ties an `-L` binding to a `-T` binding; it travels in the preamble
/// of every connection (so at most 255 bytes).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortName(String);

/// A hybrid connection's name (azbridge's rule: letters, digits, `_`, `-`, `.`, `/`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RelayName(String);

/// Which flag an expression came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flag {
    Local,
    Remote,
}

impl fmt::Display for Flag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Flag::Local => "-L",
            Flag::Remote => "-T",
        })
    }
}

/// What is wrong with one part of an expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    MissingRelay,
    EmptyBinding,
    BadRelayName,
    BadPort,
    UnixSocket,
    BadName,
    BadAddress,
    TooManyColons,
    DuplicateName,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Problem::MissingRelay => "no relay name (no ':' in the expression)",
            Problem::EmptyBinding => "an empty binding",
            Problem::BadRelayName => {
                "not a hybrid connection name (letters, digits, '_', '-', '.', '/')"
            }
            Problem::BadPort => "not a port (1-65535, with a U suffix for UDP)",
            Problem::UnixSocket => {
                "not a port; azbridge would take it for a Unix socket, which kips bridge does not support"
            }
            Problem::BadName => {
                "not a port name (1-255 letters, digits, '_', '-', '.')"
            }
            Problem::BadAddress => "not an IP address or host name",
            Problem::TooManyColons => {
                "more than one ':' in a binding; write an IPv6 address in brackets, e.g. [::]:8080"
            }
            Problem::DuplicateName => "a port name used twice in one -T expression",
        })
    }
}

/// An expression that does not parse: names the expression, the part and the expected form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{flag} \"{expression}\": \"{part}\" is {problem}; expected {expected}", expected = self.expected())]
pub struct GrammarError {
    pub flag: Flag,
    pub expression: String,
    pub part: String,
    pub problem: Problem,
}

impl GrammarError {
    pub fn expected(&self) -> &'static str {
        match self.flag {
            Flag::Local => LOCAL_FORM,
            Flag::Remote => REMOTE_FORM,
        }
    }
}

impl LocalBinding {
    /// The name in the preamble: the given name, else the port text (`8080`, `5353U`).
    pub fn effective_name(&self) -> String {
        self.name
            .as_ref()
            .map_or_else(|| self.port.to_string(), |name| name.0.clone())
    }

    /// The host to bind: the given address, else `localhost`.
    pub fn bind_host(&self) -> Host {
        self.bind
            .clone()
            .unwrap_or_else(|| Host::Name(DEFAULT_BIND_HOST.to_owned()))
    }
}

impl RemoteBinding {
    /// The name a sender must send in its preamble to reach this binding.
    pub fn effective_name(&self) -> String {
        self.name
            .as_ref()
            .map_or_else(|| self.port.to_string(), |name| name.0.clone())
    }

    /// The host to connect to: the given one, else `localhost`.
    pub fn target_host(&self) -> Host {
        self.host
            .clone()
            .unwrap_or_else(|| Host::Name(DEFAULT_TARGET_HOST.to_owned()))
    }
}

impl Port {
    pub fn tcp(number: u16) -> Self {
        Port { number, udp: false }
    }

    pub fn udp(number: u16) -> Self {
        Port { number, udp: true }
    }

    /// `8080` or `8080U`; `None` when the text is no port.
    pub fn parse(text: &str) -> Option<Port> {
        let (digits, udp) = match text.strip_suffix('U') {
            Some(digits) => (digits, true),
            None => (text, false),
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        match digits.parse::<u16>() {
            Ok(number) if number > 0 => Some(Port { number, udp }),
            _ => None,
        }
    }
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.number, if self.udp { "U" } else { "" })
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')
}

impl PortName {
    pub fn parse(text: &str) -> Option<PortName> {
        (!text.is_empty() && text.len() <= 255 && text.chars().all(is_name_char))
            .then(|| PortName(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl RelayName {
    pub fn parse(text: &str) -> Option<RelayName> {
        let valid = !text.is_empty()
            && text.chars().all(|c| is_name_char(c) || c == '/')
            && !text.starts_with('/')
            && !text.ends_with('/')
            && !text.contains("//");
        valid.then(|| RelayName(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RelayName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Host {
    /// An address outside brackets: IPv4, or a host name. (IPv6 needs brackets here, since
    /// `:` separates the parts of a binding.)
    pub(crate) fn parse_unbracketed(text: &str) -> Option<Host> {
        if let Ok(ip) = text.parse::<Ipv4Addr>() {
            return Some(Host::Ip(IpAddr::V4(ip)));
        }
        // All digits and dots but no IPv4 address ("10.0.0.300"): a typo, not a host name.
        if text.is_empty() || text.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            return None;
        }
        let valid = text.len() <= 253
            && text.split('.').all(|label| {
                !label.is_empty() && label.len() <= 63 && label.chars().all(is_host_char)
            });
        valid.then(|| Host::Name(text.to_owned()))
    }

    /// The text to resolve or connect to, without brackets.
    pub fn to_plain_string(&self) -> String {
        match self {
            Host::Ip(ip) => ip.to_string(),
            Host::Name(name) => name.clone(),
        }
    }
}

fn is_host_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_')
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            Host::Ip(IpAddr::V4(ip)) => write!(f, "{ip}"),
            Host::Name(name) => f.write_str(name),
        }
    }
}

impl fmt::Display for LocalBinding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(bind) = &self.bind {
            write!(f, "{bind}:")?;
        }
        write!(f, "{}", self.port)?;
        if let Some(name) = &self.name {
            write!(f, "/{name}")?;
        }
        Ok(())
    }
}

impl fmt::Display for LocalForward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, binding) in self.bindings.iter().enumerate() {
            if index > 0 {
                f.write_str(";")?;
            }
            write!(f, "{binding}")?;
        }
        write!(f, ":{}", self.relay)
    }
}

impl fmt::Display for RemoteBinding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(name) = &self.name {
            write!(f, "{name}/")?;
        }
        if let Some(host) = &self.host {
            write!(f, "{host}:")?;
        }
        write!(f, "{}", self.port)
    }
}

impl fmt::Display for RemoteForward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.relay)?;
        for (index, binding) in self.bindings.iter().enumerate() {
            if index > 0 {
                f.write_str(";")?;
            }
            write!(f, "{binding}")?;
        }
        Ok(())
    }
}

/// Builds errors for one expression.
struct Context<'a> {
    flag: Flag,
    expression: &'a str,
}

impl Context<'_> {
    fn error(&self, part: &str, problem: Problem) -> GrammarError {
        GrammarError {
            flag: self.flag,
            expression: self.expression.to_owned(),
            part: part.to_owned(),
            problem,
        }
    }

    fn relay(&self, text: &str) -> Result<RelayName, GrammarError> {
        RelayName::parse(text).ok_or_else(|| self.error(text, Problem::BadRelayName))
    }

    fn port(&self, text: &str) -> Result<Port, GrammarError> {
        Port::parse(text).ok_or_else(|| {
            // azbridge reads a non-numeric port as a Unix socket path.
            let looks_numeric = text
                .trim_end_matches('U')
                .bytes()
                .all(|b| b.is_ascii_digit());
            let problem = if !text.is_empty() && !looks_numeric {
                Problem::UnixSocket
            } else {
                Problem::BadPort
            };
            self.error(text, problem)
        })
    }

    fn name(&self, text: &str) -> Result<PortName, GrammarError> {
        PortName::parse(text).ok_or_else(|| self.error(text, Problem::BadName))
    }

    /// `[host:]port` with an optional `[ipv6]` host.
    fn host_and_port(&self, text: &str) -> Result<(Option<Host>, Port), GrammarError> {
        if let Some(rest) = text.strip_prefix('[') {
            let Some((inside, after)) = rest.split_once(']') else {
                return Err(self.error(text, Problem::BadAddress));
            };
            let ip = inside
                .parse::<Ipv6Addr>()
                .map_err(|_| self.error(&text[..inside.len() + 2], Problem::BadAddress))?;
            let Some(port) = after.strip_prefix(':') else {
                return Err(self.error(text, Problem::BadPort));
            };
            return Ok((Some(Host::Ip(IpAddr::V6(ip))), self.port(port)?));
        }
        let parts: Vec<&str> = text.split(':').collect();
        match parts.as_slice() {
            [port] => Ok((None, self.port(port)?)),
            [host, port] => {
                let host = Host::parse_unbracketed(host)
                    .ok_or_else(|| self.error(host, Problem::BadAddress))?;
                Ok((Some(host), self.port(port)?))
            }
            _ => Err(self.error(text, Problem::TooManyColons)),
        }
    }
}

impl FromStr for LocalForward {
    type Err = GrammarError;

    fn from_str(expression: &str) -> Result<Self, GrammarError> {
        let context = Context {
            flag: Flag::Local,
            expression,
        };
        let Some((bindings_text, relay_text)) = expression.rsplit_once(':') else {
            return Err(context.error(expression, Problem::MissingRelay));
        };
        let relay = context.relay(relay_text)?;
        let mut bindings = Vec::new();
        for text in bindings_text.split(';') {
            if text.is_empty() {
                return Err(context.error(bindings_text, Problem::EmptyBinding));
            }
            let (address_and_port, name) = match text.split_once('/') {
                Some((before, name)) => (before, Some(context.name(name)?)),
                None => (text, None),
            };
            let (bind, port) = context.host_and_port(address_and_port)?;
            bindings.push(LocalBinding { bind, port, name });
        }
        Ok(LocalForward { bindings, relay })
    }
}

impl FromStr for RemoteForward {
    type Err = GrammarError;

    fn from_str(expression: &str) -> Result<Self, GrammarError> {
        let context = Context {
            flag: Flag::Remote,
            expression,
        };
        let Some((relay_text, bindings_text)) = expression.split_once(':') else {
            return Err(context.error(expression, Problem::MissingRelay));
        };
        let relay = context.relay(relay_text)?;
        let mut bindings = Vec::new();
        let mut names = BTreeSet::new();
        for text in bindings_text.split(';') {
            if text.is_empty() {
                return Err(context.error(bindings_text, Problem::EmptyBinding));
            }
            let (name, host_and_port) = match text.split_once('/') {
                Some((name, rest)) => (Some(context.name(name)?), rest),
                None => (None, text),
            };
            let (host, port) = context.host_and_port(host_and_port)?;
            let binding = RemoteBinding { name, host, port };
            // Names are dictionary keys in azbridge's listener: a duplicate stops it.
            if !names.insert(binding.effective_name()) {
                return Err(context.error(&binding.effective_name(), Problem::DuplicateName));
            }
            bindings.push(binding);
        }
        Ok(RemoteForward { relay, bindings })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn local(text: &str) -> LocalForward {
        text.parse().unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn remote(text: &str) -> RemoteForward {
        text.parse().unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    #[test]
    fn every_form_kips_writes_parses_and_renders_unchanged() {
        // The sidecar's and the laptop's command lines (src/inject/bridge.rs).
        for text in [
            "0.0.0.0:15100/port8080;0.0.0.0:15102/grpc:api",
            "0.0.0.0:15101U/dns-udp:dns",
            "127.77.0.1:5432/port5432:db",
            "[::]:15100/http:api",
            "[::1]:8080:api",
        ] {
            assert_eq!(local(text).to_string(), text);
        }
        for text in [
            "db:port5432/postgres.data.svc:5432",
            "web:port80/10.0.0.7:80",
            "api:port8080/localhost:8080;grpc/localhost:9090",
            "dns:dns-udp/localhost:5353U",
            "api:http/[::1]:8080",
        ] {
            assert_eq!(remote(text).to_string(), text);
        }
    }

    #[test]
    fn local_relay_is_after_the_last_colon_and_defaults_follow_azbridge() {
        let forward = local("8080;127.0.0.2:9090U/metrics:ns/relay.one");
        assert_eq!(forward.relay.as_str(), "ns/relay.one");
        assert_eq!(forward.bindings[0].bind, None);
        assert_eq!(
            forward.bindings[0].bind_host(),
            Host::Name("localhost".into())
        );
        assert_eq!(forward.bindings[0].effective_name(), "8080");
        assert_eq!(forward.bindings[1].port, Port::udp(9090));
        assert_eq!(forward.bindings[1].effective_name(), "metrics");
        assert_eq!(local("5353U:dns").bindings[0].effective_name(), "5353U");
    }

    #[test]
    fn remote_relay_is_before_the_first_colon_and_defaults_follow_azbridge() {
        let forward = remote("api:8080;http/3000;grpc/backend:9090;10.1.2.3:53U");
        assert_eq!(forward.relay.as_str(), "api");
        let names: Vec<String> = forward
            .bindings
            .iter()
            .map(|b| b.effective_name())
            .collect();
        assert_eq!(names, ["8080", "http", "grpc", "53U"]);
        assert_eq!(
            forward.bindings[0].target_host(),
            Host::Name("localhost".into())
        );
        assert_eq!(forward.bindings[2].host, Some(Host::Name("backend".into())));
        assert_eq!(
            forward.bindings[3].host,
            Some(Host::Ip("10.1.2.3".parse().unwrap()))
        );
        assert!(forward.bindings[3].port.udp);
    }

    #[test]
    fn errors_name_the_expression_the_part_and_the_form() {
        let error = "0.0.0.0:80x/http:api".parse::<LocalForward>().unwrap_err();
        assert_eq!(error.part, "80x");
        assert_eq!(error.problem, Problem::UnixSocket);
        let message = error.to_string();
        assert!(
            message.starts_with("-L \"0.0.0.0:80x/http:api\": \"80x\" is not a port"),
            "{message}"
        );
        assert!(message.ends_with(LOCAL_FORM), "{message}");

        let cases: [(&str, &str, Problem); 9] = [
            ("8080", "8080", Problem::MissingRelay),
            ("8080:bad relay", "bad relay", Problem::BadRelayName),
            ("::1:8080:api", "::1:8080", Problem::TooManyColons),
            ("fe80::1:8080:api", "fe80::1:8080", Problem::TooManyColons),
            ("0.0.0.0:0:api", "0", Problem::BadPort),
            ("0.0.0.0:70000:api", "70000", Problem::BadPort),
            ("10.0.0.300:80:api", "10.0.0.300", Problem::BadAddress),
            ("80/bad name:api", "bad name", Problem::BadName),
            (":api", "", Problem::EmptyBinding),
        ];
        for (text, part, problem) in cases {
            let error = text.parse::<LocalForward>().unwrap_err();
            assert_eq!(
                (error.part.as_str(), &error.problem),
                (part, &problem),
                "{text}"
            );
        }
        let cases: [(&str, &str, Problem); 5] = [
            ("api", "api", Problem::MissingRelay),
            ("api:http/8080;http/9090", "http", Problem::DuplicateName),
            ("api:8080;8080", "8080", Problem::DuplicateName),
            ("api:h/[::1]8080", "[::1]8080", Problem::BadPort),
            ("api:sock/run/app.sock", "run/app.sock", Problem::UnixSocket),
        ];
        for (text, part, problem) in cases {
            let error = text.parse::<RemoteForward>().unwrap_err();
            assert_eq!(
                (error.part.as_str(), &error.problem),
                (part, &problem),
                "{text}"
            );
            assert!(error.to_string().ends_with(REMOTE_FORM));
        }
    }

    #[test]
    fn tcp_and_udp_bindings_of_one_port_are_distinct_names() {
        let forward = remote("dns:53;53U");
        assert_eq!(forward.bindings.len(), 2);
    }

    fn host() -> impl Strategy<Value = Host> {
        prop_oneof![
            any::<[u8; 4]>().prop_map(|o| Host::Ip(IpAddr::V4(Ipv4Addr::from(o)))),
            any::<[u16; 8]>().prop_map(|s| Host::Ip(IpAddr::V6(Ipv6Addr::from(s)))),
            "[a-z][a-z0-9-]{0,10}(\\.[a-z0-9][a-z0-9_-]{0,8}){0,3}".prop_map(Host::Name),
        ]
    }

    fn port() -> impl Strategy<Value = Port> {
        (1u16.., any::<bool>()).prop_map(|(number, udp)| Port { number, udp })
    }

    fn name() -> impl Strategy<Value = PortName> {
        "[A-Za-z0-9_.-]{1,20}".prop_map(|n| PortName::parse(&n).unwrap())
    }

    fn relay() -> impl Strategy<Value = RelayName> {
        "[A-Za-z0-9_.-]{1,12}(/[A-Za-z0-9_.-]{1,8}){0,2}"
            .prop_map(|n| RelayName::parse(&n).unwrap())
    }

    fn local_forward() -> impl Strategy<Value = LocalForward> {
        let binding = (
            proptest::option::of(host()),
            port(),
            proptest::option::of(name()),
        )
            .prop_map(|(bind, port, name)| LocalBinding { bind, port, name });
        (proptest::collection::vec(binding, 1..5), relay())
            .prop_map(|(bindings, relay)| LocalForward { bindings, relay })
    }

    fn remote_forward() -> impl Strategy<Value = RemoteForward> {
        let binding = (
            proptest::option::of(name()),
            proptest::option::of(host()),
            port(),
        )
            .prop_map(|(name, host, port)| RemoteBinding { name, host, port });
        (relay(), proptest::collection::vec(binding, 1..5)).prop_map(|(relay, bindings)| {
            // Names must be unique within one -T: keep the first binding of each name.
            let mut seen = BTreeSet::new();
            let bindings = bindings
                .into_iter()
                .filter(|b| seen.insert(b.effective_name()))
                .collect();
            RemoteForward { relay, bindings }
        })
    }

    proptest! {
        #[test]
        fn local_forwards_parse_back_from_their_rendering(forward in local_forward()) {
            let rendered = forward.to_string();
            prop_assert_eq!(rendered.parse::<LocalForward>(), Ok(forward), "{}", rendered);
        }

        #[test]
        fn remote_forwards_parse_back_from_their_rendering(forward in remote_forward()) {
            let rendered = forward.to_string();
            prop_assert_eq!(rendered.parse::<RemoteForward>(), Ok(forward), "{}", rendered);
        }

        #[test]
        fn parsing_never_panics(text in ".{0,40}") {
            let _ = text.parse::<LocalForward>();
            let _ = text.parse::<RemoteForward>();
        }
    }
}
