//! Azure Relay connection strings:
//! `Endpoint=sb://host[:port]/;SharedAccessKeyName=..;SharedAccessKey=..[;EntityPath=..]`, or
//! with `SharedAccessSignature=` (a token made elsewhere, used as is and never renewed).
//!
//! Unlike azbridge, which uses the `-x` value verbatim, kips trims surrounding whitespace
//! first: a Secret written with `echo` ends in a newline, and azbridge then signs with a key
//! that has a newline in it (the relay answers 401). Keys (names as in
//! `RelayConnectionStringBuilder`) are case-insensitive.

use std::fmt;

/// A value that must never reach a log: `Debug` prints `<redacted>`, there is no `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The relay namespace's address: `sb://host[:port]/`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// Lower case; an IPv6 address without brackets.
    pub host: String,
    /// `None`: 443.
    pub port: Option<u16>,
}

impl Endpoint {
    pub const DEFAULT_PORT: u16 = 443;

    pub fn port(&self) -> u16 {
        self.port.unwrap_or(Self::DEFAULT_PORT)
    }

    /// `host[:port]` as it goes into a URL (IPv6 in brackets), the port only when given.
    pub fn authority(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        match self.port {
            Some(port) => format!("{host}:{port}"),
            None => host,
        }
    }

    /// Parses `sb://host[:port][/]`.
    pub fn parse(text: &str) -> Result<Endpoint, ConnectionStringError> {
        let bad = || ConnectionStringError::BadEndpoint(text.to_owned());
        let (scheme, rest) = text.split_once("://").ok_or_else(bad)?;
        if !scheme.eq_ignore_ascii_case("sb") {
            return Err(bad());
        }
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.is_empty() || authority.contains(['/', '?', '#', '@']) {
            return Err(bad());
        }
        let (host, port) = if let Some(inner) = authority.strip_prefix('[') {
            let (host, after) = inner.split_once(']').ok_or_else(bad)?;
            host.parse::<std::net::Ipv6Addr>().map_err(|_| bad())?;
            let port = match after {
                "" => None,
                _ => Some(after.strip_prefix(':').ok_or_else(bad)?),
            };
            (host, port)
        } else {
            match authority.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        let port = port
            .map(|p| p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(bad))
            .transpose()?;
        if host.is_empty() {
            return Err(bad());
        }
        Ok(Endpoint {
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sb://{}/", self.authority())
    }
}

/// How kips proves its right to listen or send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// A shared access policy: kips signs its own tokens and renews them.
    SharedAccessKey { key_name: String, key: Secret },
    /// A ready-made token.
    SharedAccessSignature(Secret),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionString {
    pub endpoint: Endpoint,
    /// `EntityPath`: the one hybrid connection this string is for, if it names one.
    pub entity_path: Option<String>,
    pub credential: Credential,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectionStringError {
    #[error("the connection string is empty")]
    Empty,
    #[error(
        "connection string part \"{0}\" is not Key=Value; expected Endpoint=sb://<namespace>/;SharedAccessKeyName=<policy>;SharedAccessKey=<key>[;EntityPath=<hybrid connection>]"
    )]
    NotKeyValue(String),
    #[error(
        "connection string key \"{0}\" is not one kips bridge knows (Endpoint, SharedAccessKeyName, SharedAccessKey, SharedAccessSignature, EntityPath)"
    )]
    UnknownKey(String),
    #[error("connection string key \"{0}\" appears twice")]
    Duplicate(String),
    #[error("the connection string has no Endpoint=sb://<namespace>/")]
    MissingEndpoint,
    #[error("Endpoint \"{0}\" is not sb://<host>[:port]/")]
    BadEndpoint(String),
    #[error("the connection string has SharedAccessKeyName but no SharedAccessKey")]
    MissingKey,
    #[error("the connection string has SharedAccessKey but no SharedAccessKeyName")]
    MissingKeyName,
    #[error(
        "the connection string has no SharedAccessKeyName/SharedAccessKey and no SharedAccessSignature: Entra ID (Azure default credentials{authentication}) is not supported by kips bridge yet; use a shared access policy's connection string, or run azbridge",
        authentication = .0.as_ref().map(|a| format!(", Authentication={a}")).unwrap_or_default()
    )]
    EntraNotSupported(Option<String>),
}

impl ConnectionString {
    /// Parses a connection string after trimming surrounding whitespace.
    pub fn parse(text: &str) -> Result<ConnectionString, ConnectionStringError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(ConnectionStringError::Empty);
        }
        let mut endpoint = None;
        let mut key_name = None;
        let mut key = None;
        let mut signature = None;
        let mut entity_path = None;
        let mut authentication = None;
        for part in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((name, value)) = part.split_once('=') else {
                // Never echo a part that may be (a piece of) the key.
                return Err(ConnectionStringError::NotKeyValue(redact_part(part)));
            };
            let (name, value) = (name.trim(), value.trim());
            let slot = match name.to_ascii_lowercase().as_str() {
                "endpoint" => &mut endpoint,
                "sharedaccesskeyname" => &mut key_name,
                "sharedaccesskey" => &mut key,
                "sharedaccesssignature" => &mut signature,
                "entitypath" => &mut entity_path,
                "authentication" => &mut authentication,
                // RelayConnectionStringBuilder knows it; it has no meaning for kips.
                "operationtimeout" => continue,
                _ => return Err(ConnectionStringError::UnknownKey(name.to_owned())),
            };
            if slot.replace(value.to_owned()).is_some() {
                return Err(ConnectionStringError::Duplicate(name.to_owned()));
            }
        }
        let endpoint = Endpoint::parse(&endpoint.ok_or(ConnectionStringError::MissingEndpoint)?)?;
        let credential = match (key_name, key, signature) {
            (_, _, Some(signature)) => Credential::SharedAccessSignature(Secret(signature)),
            (Some(key_name), Some(key), None) => Credential::SharedAccessKey {
                key_name,
                key: Secret(key),
            },
            (Some(_), None, None) => return Err(ConnectionStringError::MissingKey),
            (None, Some(_), None) => return Err(ConnectionStringError::MissingKeyName),
            (None, None, None) => {
                return Err(ConnectionStringError::EntraNotSupported(authentication));
            }
        };
        Ok(ConnectionString {
            endpoint,
            entity_path: entity_path.filter(|p| !p.is_empty()),
            credential,
        })
    }
}

fn redact_part(part: &str) -> String {
    if part.len() > 12 {
        format!(
            "{}…",
            &part[..part.char_indices().nth(8).map_or(part.len(), |(i, _)| i)]
        )
    } else {
        part.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_access_key_string_with_a_port_and_a_trailing_newline() {
        let parsed = ConnectionString::parse(
            "Endpoint=sb://127.0.0.1:9443/;SharedAccessKeyName=Root;SharedAccessKey=abc==;EntityPath=api\n",
        )
        .unwrap();
        assert_eq!(
            parsed.endpoint,
            Endpoint {
                host: "127.0.0.1".into(),
                port: Some(9443)
            }
        );
        assert_eq!(parsed.entity_path.as_deref(), Some("api"));
        assert_eq!(
            parsed.credential,
            Credential::SharedAccessKey {
                key_name: "Root".into(),
                key: Secret("abc==".into())
            }
        );
        assert_eq!(parsed.endpoint.authority(), "127.0.0.1:9443");
    }

    #[test]
    fn keys_are_case_insensitive_and_the_host_is_lower_cased() {
        let parsed = ConnectionString::parse(
            "endpoint=SB://Contoso.ServiceBus.Windows.Net;sharedaccesssignature=SharedAccessSignature sr=x&sig=y&se=1&skn=k",
        )
        .unwrap();
        assert_eq!(parsed.endpoint.host, "contoso.servicebus.windows.net");
        assert_eq!(parsed.endpoint.port(), 443);
        assert!(matches!(
            parsed.credential,
            Credential::SharedAccessSignature(_)
        ));
    }

    #[test]
    fn ipv6_endpoints_take_brackets() {
        let endpoint = Endpoint::parse("sb://[::1]:9443/").unwrap();
        assert_eq!(endpoint.host, "::1");
        assert_eq!(endpoint.authority(), "[::1]:9443");
        assert_eq!(endpoint.to_string(), "sb://[::1]:9443/");
    }

    #[test]
    fn entra_only_strings_are_refused_with_a_reason() {
        let error = ConnectionString::parse(
            "Endpoint=sb://ns.servicebus.windows.net/;Authentication=Managed Identity",
        )
        .unwrap_err();
        assert_eq!(
            error,
            ConnectionStringError::EntraNotSupported(Some("Managed Identity".into()))
        );
        assert!(error.to_string().contains("Entra ID"));
        assert_eq!(
            ConnectionString::parse("Endpoint=sb://ns/").unwrap_err(),
            ConnectionStringError::EntraNotSupported(None)
        );
    }

    #[test]
    fn bad_strings_say_what_is_wrong_and_never_show_the_key() {
        for (text, error) in [
            ("", ConnectionStringError::Empty),
            (
                "SharedAccessKeyName=a;SharedAccessKey=b",
                ConnectionStringError::MissingEndpoint,
            ),
            (
                "Endpoint=https://ns/;SharedAccessKeyName=a;SharedAccessKey=b",
                ConnectionStringError::BadEndpoint("https://ns/".into()),
            ),
            (
                "Endpoint=sb://ns:0/;SharedAccessKeyName=a;SharedAccessKey=b",
                ConnectionStringError::BadEndpoint("sb://ns:0/".into()),
            ),
            (
                "Endpoint=sb://ns/path;SharedAccessKeyName=a;SharedAccessKey=b",
                ConnectionStringError::BadEndpoint("sb://ns/path".into()),
            ),
            (
                "Endpoint=sb://ns/;SharedAccessKeyName=a",
                ConnectionStringError::MissingKey,
            ),
            (
                "Endpoint=sb://ns/;SharedAccessKey=b",
                ConnectionStringError::MissingKeyName,
            ),
            (
                "Endpoint=sb://ns/;Colour=blue;SharedAccessKeyName=a;SharedAccessKey=b",
                ConnectionStringError::UnknownKey("Colour".into()),
            ),
            (
                "Endpoint=sb://ns/;Endpoint=sb://other/",
                ConnectionStringError::Duplicate("Endpoint".into()),
            ),
        ] {
            assert_eq!(ConnectionString::parse(text), Err(error), "{text}");
        }
        let error = ConnectionString::parse("Endpoint=sb://ns/;s3cr3tKeyWithoutName").unwrap_err();
        assert!(
            !error.to_string().contains("s3cr3tKeyWithoutName"),
            "{error}"
        );
        let parsed = ConnectionString::parse(
            "Endpoint=sb://ns/;SharedAccessKeyName=a;SharedAccessKey=TOPSECRET",
        )
        .unwrap();
        assert!(!format!("{parsed:?}").contains("TOPSECRET"));
    }
}
