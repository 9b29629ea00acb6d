//! Listen-port allocation and the redirect table handed to `kips init-net`.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use crate::annotations::Protocol;

/// One nat rule: inbound `protocol` traffic for `app_port` goes to the sidecar's `listen_port`.
/// Written on the `kips init-net` command line as `<app>/<proto>=<listen>`, e.g. `8080/tcp=15100`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRedirect {
    pub protocol: Protocol,
    pub app_port: u16,
    pub listen_port: u16,
}

impl fmt::Display for PortRedirect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}={}",
            self.app_port, self.protocol, self.listen_port
        )
    }
}

const REDIRECT_FORM: &str = "expected <app port>/<tcp|udp>=<listen port>, e.g. 8080/tcp=15100";

/// A `--redirect` value of `kips init-net` that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortRedirectError {
    #[error("\"{0}\" has no '=' ({REDIRECT_FORM})")]
    NoEquals(String),
    #[error("\"{0}\" has no protocol ({REDIRECT_FORM})")]
    NoProtocol(String),
    #[error("protocol \"{protocol}\" in \"{text}\" is not tcp or udp")]
    Protocol { protocol: String, text: String },
    #[error("port \"{port}\" in \"{text}\" is not a number 1-65535 ({REDIRECT_FORM})")]
    Port { port: String, text: String },
}

impl FromStr for PortRedirect {
    type Err = PortRedirectError;

    fn from_str(text: &str) -> Result<Self, PortRedirectError> {
        let (app, listen) = text
            .split_once('=')
            .ok_or_else(|| PortRedirectError::NoEquals(text.to_owned()))?;
        let (app, protocol) = app
            .split_once('/')
            .ok_or_else(|| PortRedirectError::NoProtocol(text.to_owned()))?;
        let protocol = match protocol {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            other => {
                return Err(PortRedirectError::Protocol {
                    protocol: other.to_owned(),
                    text: text.to_owned(),
                });
            }
        };
        let port = |p: &str| match p.parse::<u16>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(PortRedirectError::Port {
                port: p.to_owned(),
                text: text.to_owned(),
            }),
        };
        Ok(PortRedirect {
            protocol,
            app_port: port(app)?,
            listen_port: port(listen)?,
        })
    }
}

/// Not enough free ports above the listen-port base.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no {count} free listen ports at or above {base}; lower the listen-port base")]
pub struct ListenPortsError {
    count: usize,
    base: u16,
}

/// Picks `count` listen ports from `base` upwards, skipping every port in `taken`.
pub fn allocate_listen_ports(
    base: u16,
    taken: &BTreeSet<u16>,
    count: usize,
) -> Result<Vec<u16>, ListenPortsError> {
    let ports: Vec<u16> = (base..=u16::MAX)
        .filter(|port| !taken.contains(port))
        .take(count)
        .collect();
    if ports.len() == count {
        Ok(ports)
    } else {
        Err(ListenPortsError { count, base })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_table_round_trips() {
        for text in ["8080/tcp=15100", "53/udp=15101"] {
            assert_eq!(text.parse::<PortRedirect>().unwrap().to_string(), text);
        }
        assert!(
            "8080=1"
                .parse::<PortRedirect>()
                .unwrap_err()
                .to_string()
                .contains("no protocol")
        );
        assert!(
            "8080/sctp=1"
                .parse::<PortRedirect>()
                .unwrap_err()
                .to_string()
                .contains("sctp")
        );
        assert!(
            "0/tcp=1"
                .parse::<PortRedirect>()
                .unwrap_err()
                .to_string()
                .contains("\"0\"")
        );
    }

    #[test]
    fn allocation_skips_declared_ports() {
        let taken = BTreeSet::from([15100, 15102]);
        assert_eq!(
            allocate_listen_ports(15100, &taken, 3).unwrap(),
            vec![15101, 15103, 15104]
        );
        assert!(allocate_listen_ports(65535, &BTreeSet::new(), 2).is_err());
    }
}
