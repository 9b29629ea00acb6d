//! `kips relay`: the service side of the Hybrid Connections protocol, for tests and local
//! trials on loopback. **Not a production relay**: one process, state in memory, a test CA
//! it makes itself, no quotas, no HTTP relaying, no Entra ID.
//!
//! It does what the public protocol description says the service does: listeners register
//! on a control channel (token with Listen), senders connect (token with Send), the relay
//! picks one of up to 25 listeners at random and sends it an `accept` message, and joins
//! the sender's WebSocket to the listener's rendezvous WebSocket, passing frames through
//! unchanged (a Close in one direction is passed on and the other direction keeps going).
//! A sender finds 404 "There are no listeners connected for the endpoint." when no
//! listener is online, 404 "Endpoint does not exist." for an unknown hybrid connection, 401
//! for a bad token, 403 for a token that does not grant the action. Listener tokens expire:
//! the relay closes a control channel with 1008 when its token does, unless renewed.

mod auth;
mod server;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::bridge::Secret;

pub use server::run;

/// The rights a shared access key grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rights {
    pub listen: bool,
    pub send: bool,
}

/// A shared access key: `[hybrid-connection/]name=key[:listen|:send|:listen,send]`. Without a
/// hybrid connection it is namespace-wide; without rights it grants both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySpec {
    pub hybrid_connection: Option<String>,
    pub name: String,
    pub key: Secret,
    pub rights: Rights,
}

impl FromStr for KeySpec {
    type Err = RelayError;

    fn from_str(text: &str) -> Result<KeySpec, RelayError> {
        let bad = |why: &str| {
            RelayError::Usage(format!(
                "--key \"{}\": {why}; expected [hybrid-connection/]name=key[:listen|:send|:listen,send]",
                text.split_once('=').map_or(text, |(name, _)| name)
            ))
        };
        let (scope, key) = text.split_once('=').ok_or_else(|| bad("no '='"))?;
        let (hybrid_connection, name) = match scope.rsplit_once('/') {
            Some((hc, name)) => (Some(hc.to_owned()), name),
            None => (None, scope),
        };
        if name.is_empty() {
            return Err(bad("no key name"));
        }
        let (key, rights) = match key.rsplit_once(':') {
            Some((key, rights)) => {
                let mut parsed = Rights {
                    listen: false,
                    send: false,
                };
                for right in rights.split(',') {
                    match right {
                        "listen" => parsed.listen = true,
                        "send" => parsed.send = true,
                        _ => return Err(bad("rights are listen and/or send")),
                    }
                }
                (key, parsed)
            }
            None => (
                key,
                Rights {
                    listen: true,
                    send: true,
                },
            ),
        };
        if key.is_empty() {
            return Err(bad("an empty key"));
        }
        Ok(KeySpec {
            hybrid_connection,
            name: name.to_owned(),
            key: Secret::new(key),
            rights,
        })
    }
}

/// What `kips relay` runs.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    pub listen: SocketAddr,
    /// Where the test CA lives (`ca.crt`, `ca.key`; made when missing, reused when present,
    /// so a restarted relay is trusted by clients that trusted it before).
    pub dir: PathBuf,
    /// Names and addresses in the serving certificate.
    pub names: Vec<String>,
    pub hybrid_connections: Vec<String>,
    pub keys: Vec<KeySpec>,
    /// How long a sender waits for the chosen listener's rendezvous.
    pub accept_timeout: Duration,
    /// Written with the bound address once the relay serves.
    pub ready_file: Option<PathBuf>,
}

/// The most listeners one hybrid connection takes (the service's documented limit).
pub const MAX_LISTENERS: usize = 25;

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("{0}")]
    Usage(String),
    #[error("cannot listen on {address}: {error}")]
    Bind {
        address: SocketAddr,
        error: std::io::Error,
    },
    #[error("test CA in {dir}: {error}")]
    Ca { dir: PathBuf, error: String },
    #[error("writing {path}: {error}")]
    ReadyFile { path: PathBuf, error: String },
}

impl RelayError {
    pub fn exit_code(&self) -> u8 {
        match self {
            RelayError::Usage(_) => crate::bridge::EXIT_USAGE,
            _ => crate::bridge::EXIT_FAILURE,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_have_an_optional_scope_and_rights() {
        let key: KeySpec = "api/sender=c2VjcmV0:send".parse().unwrap();
        assert_eq!(key.hybrid_connection.as_deref(), Some("api"));
        assert_eq!(key.name, "sender");
        assert_eq!(key.key.expose(), "c2VjcmV0");
        assert_eq!(
            key.rights,
            Rights {
                listen: false,
                send: true
            }
        );
        let root: KeySpec = "RootManageSharedAccessKey=abc=".parse().unwrap();
        assert_eq!(root.hybrid_connection, None);
        assert_eq!(root.key.expose(), "abc=");
        assert!(root.rights.listen && root.rights.send);
        let error = "root=secret:manage"
            .parse::<KeySpec>()
            .unwrap_err()
            .to_string();
        assert!(error.contains("rights are listen and/or send"), "{error}");
        assert!(!error.contains("secret"), "{error}");
    }
}
