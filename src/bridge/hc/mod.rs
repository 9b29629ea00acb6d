//! The Hybrid Connections protocol, client side (and the parts the test relay shares).
//!
//! From the public protocol description (MicrosoftDocs/azure-docs,
//! `articles/azure-relay/relay-hybrid-connections-protocol.md`) and Microsoft.Azure.Relay
//! (`HybridConnectionUtility.BuildUri`, `HybridConnectionListener`, `TokenRenewer`,
//! `WebSocketExceptionHelper`):
//!
//! - listen: `wss://{namespace}/$hc/{path}?sb-hc-action=listen&sb-hc-id={id}`, the token in
//!   the `ServiceBusAuthorization` header; the socket stays open as the control channel.
//! - the service sends `{"accept":{"address":..,"id":..,"connectHeaders":{..}}}`; the listener
//!   opens a WebSocket to the address as given, no token, and that socket is the stream.
//! - the listener replaces its token with `{"renewToken":{"token":..}}`.
//! - connect (sender): the same URL with `sb-hc-action=connect`.
//! - refusals are HTTP statuses on the upgrade: 401 (token missing, malformed, invalid),
//!   403 (token not valid for this path or action), 404 (the path is not a hybrid
//!   connection: "Endpoint does not exist."; for a sender also "There are no listeners
//!   connected for the endpoint."), 5xx.

pub(crate) mod listener;
pub(crate) mod messages;

use std::fmt;

use hyper::header::{HeaderName, HeaderValue};

use super::connection_string::Endpoint;
use super::sas::TokenSource;
use super::tls::{RelayConnector, TransportError};
use super::ws::{WsError, WsReceiver, WsSender};

/// The header that carries the token on listen and connect.
pub const AUTHORIZATION_HEADER: &str = "ServiceBusAuthorization";
/// The query parameter that may carry it instead.
pub const TOKEN_PARAMETER: &str = "sb-hc-token";
pub const ACTION_PARAMETER: &str = "sb-hc-action";
pub const ID_PARAMETER: &str = "sb-hc-id";
pub const STATUS_CODE_PARAMETER: &str = "sb-hc-statusCode";
pub const STATUS_DESCRIPTION_PARAMETER: &str = "sb-hc-statusDescription";
/// The path prefix of every hybrid connection WebSocket.
pub const PATH_PREFIX: &str = "/$hc/";

/// The service's reason phrase for a 404 on a path that is no hybrid connection (seen in
/// Azure's answers: "404 Endpoint does not exist. TrackingId:…").
pub const ENDPOINT_NOT_FOUND: &str = "Endpoint does not exist.";
/// The service's reason phrase for a 404 to a sender when no listener is online ("404
/// There are no listeners connected for the endpoint. TrackingId:…").
pub const NO_LISTENER: &str = "There are no listeners connected for the endpoint.";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Listen,
    Connect,
    Accept,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Listen => "listen",
            Action::Connect => "connect",
            Action::Accept => "accept",
        }
    }

    pub fn parse(text: &str) -> Option<Action> {
        match text {
            "listen" => Some(Action::Listen),
            "connect" => Some(Action::Connect),
            "accept" => Some(Action::Accept),
            _ => None,
        }
    }
}

/// `/$hc/{path}?sb-hc-action={action}&sb-hc-id={id}`: the path and query of a listen or
/// connect request (Microsoft.Azure.Relay's `BuildUri`).
pub fn path_and_query(entity: &str, action: Action, id: &str) -> String {
    format!(
        "{PATH_PREFIX}{entity}?{ACTION_PARAMETER}={}&{ID_PARAMETER}={}",
        action.as_str(),
        super::sas::url_encode(id)
    )
}

/// A tracking id in GUID form, as Microsoft's clients send in `sb-hc-id`.
pub fn tracking_id() -> String {
    let b: [u8; 16] = rand::random();
    format!(
        "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        b[0],
        b[1],
        b[2],
        b[3],
        b[4],
        b[5],
        b[6],
        b[7],
        b[8],
        b[9],
        b[10],
        b[11],
        b[12],
        b[13],
        b[14],
        b[15]
    )
}

/// Why the relay refused a listen or connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// 401: the token is missing, malformed or invalid (wrong key, expired).
    Unauthorized(String),
    /// 403: the token does not grant this action on this path.
    Forbidden(String),
    /// 404 "Endpoint does not exist.": no such hybrid connection.
    UnknownHybridConnection(String),
    /// A sender's 404 when no listener is online (any 404 that does not say the endpoint
    /// does not exist: the harmless reading, so only a clear answer is fatal).
    NoListener(String),
    /// Anything else (5xx, 410, …): try again later.
    Other { status: u16, description: String },
}

impl Refusal {
    /// Reads the status and reason phrase of a refused upgrade. The service tells "no such
    /// hybrid connection" from "no listener" only in the phrase (both are 404), so the
    /// phrase is read here, in one place, against the constants the test relay sends.
    pub fn classify(status: u16, description: &str) -> Refusal {
        let description = description.to_owned();
        match status {
            401 => Refusal::Unauthorized(description),
            403 => Refusal::Forbidden(description),
            404 if description.starts_with(ENDPOINT_NOT_FOUND) => {
                Refusal::UnknownHybridConnection(description)
            }
            404 => Refusal::NoListener(description),
            _ => Refusal::Other {
                status,
                description,
            },
        }
    }

    /// Refused credentials or an unknown hybrid connection: retrying cannot help.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            Refusal::Unauthorized(_) | Refusal::Forbidden(_) | Refusal::UnknownHybridConnection(_)
        )
    }

    /// The metrics label.
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::Unauthorized(_) => "unauthorized",
            Refusal::Forbidden(_) => "forbidden",
            Refusal::UnknownHybridConnection(_) => "unknown_hybrid_connection",
            Refusal::NoListener(_) => "no_listener",
            Refusal::Other { .. } => "refused",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Unauthorized(d) => write!(f, "401 Unauthorized: {d}"),
            Refusal::Forbidden(d) => write!(f, "403 Forbidden: {d}"),
            Refusal::UnknownHybridConnection(d) => write!(f, "404 Not Found: {d}"),
            Refusal::NoListener(d) => write!(f, "404 Not Found: {d}"),
            Refusal::Other {
                status,
                description,
            } => write!(f, "{status} {description}"),
        }
    }
}

/// A failed listen, connect or accept.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("the relay refused: {0}")]
    Refused(Refusal),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("{0}")]
    WebSocket(WsError),
    #[error("no WebSocket within {0:?}")]
    Timeout(std::time::Duration),
}

impl ConnectError {
    pub fn refusal(&self) -> Option<&Refusal> {
        match self {
            ConnectError::Refused(refusal) => Some(refusal),
            _ => None,
        }
    }

    pub fn label(&self) -> &'static str {
        match self {
            ConnectError::Refused(refusal) => refusal.label(),
            ConnectError::Transport(_) => "transport",
            ConnectError::WebSocket(_) => "websocket",
            ConnectError::Timeout(_) => "timeout",
        }
    }
}

impl From<WsError> for ConnectError {
    fn from(error: WsError) -> Self {
        match error {
            WsError::Refused {
                status,
                description,
            } => ConnectError::Refused(Refusal::classify(status, &description)),
            other => ConnectError::WebSocket(other),
        }
    }
}

/// What the bridge needs to reach one relay namespace.
#[derive(Clone)]
pub(crate) struct HcClient {
    pub endpoint: Endpoint,
    pub tokens: TokenSource,
    pub connector: RelayConnector,
    /// How long a listen, connect or accept may take (TCP, TLS, upgrade, rendezvous).
    pub handshake_timeout: std::time::Duration,
}

impl HcClient {
    /// A WebSocket to `host:port` `path_and_query`, with the token for `entity` if given.
    async fn open(
        &self,
        host: &str,
        port: u16,
        authority: &str,
        path_and_query: &str,
        token_for: Option<&str>,
    ) -> Result<(WsReceiver, WsSender), ConnectError> {
        let attempt = async {
            let tls = self.connector.connect(host, port).await?;
            let mut headers = Vec::new();
            if let Some(entity) = token_for {
                let token = self.tokens.token(entity);
                let value = HeaderValue::from_str(token.text.expose()).map_err(|_| {
                    ConnectError::WebSocket(WsError::BadHandshake(
                        "the token is not a valid header",
                    ))
                })?;
                headers.push((HeaderName::from_static("servicebusauthorization"), value));
            }
            let (receiver, sender, _) =
                super::ws::connect(tls, authority, path_and_query, &headers).await?;
            Ok((receiver, sender))
        };
        tokio::time::timeout(self.handshake_timeout, attempt)
            .await
            .map_err(|_| ConnectError::Timeout(self.handshake_timeout))?
    }

    /// A sender's connection to `entity` (a listener has accepted it when this returns).
    pub(crate) async fn connect(
        &self,
        entity: &str,
    ) -> Result<(WsReceiver, WsSender), ConnectError> {
        self.open_entity(entity, Action::Connect, &tracking_id())
            .await
    }

    /// The listener's side of an accepted connection: a WebSocket to the rendezvous address
    /// from the accept message, used as given and without a token.
    pub(crate) async fn rendezvous(
        &self,
        address: &str,
    ) -> Result<(WsReceiver, WsSender), ConnectError> {
        let target = Rendezvous::parse(address).ok_or_else(|| {
            ConnectError::WebSocket(WsError::BadHandshake(
                "the accept address is not a wss:// URL",
            ))
        })?;
        self.open(
            &target.host,
            target.port,
            &target.authority,
            &target.path_and_query,
            None,
        )
        .await
    }

    /// Opens listen or connect on `entity`.
    pub(crate) async fn open_entity(
        &self,
        entity: &str,
        action: Action,
        id: &str,
    ) -> Result<(WsReceiver, WsSender), ConnectError> {
        self.open(
            &self.endpoint.host,
            self.endpoint.port(),
            &self.endpoint.authority(),
            &path_and_query(entity, action, id),
            Some(entity),
        )
        .await
    }
}

/// The parts of a `wss://host[:port]/path?query` rendezvous address.
#[derive(Debug, PartialEq, Eq)]
struct Rendezvous {
    host: String,
    port: u16,
    authority: String,
    path_and_query: String,
}

impl Rendezvous {
    fn parse(address: &str) -> Option<Rendezvous> {
        let rest = address
            .get(..6)
            .filter(|scheme| scheme.eq_ignore_ascii_case("wss://"))
            .map(|_| &address[6..])?;
        let (authority, path) = match rest.find(['/', '?']) {
            Some(index) => (&rest[..index], &rest[index..]),
            None => (rest, "/"),
        };
        let (host, port) = if let Some(inner) = authority.strip_prefix('[') {
            let (host, after) = inner.split_once(']')?;
            (host, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        let port = match port {
            Some(port) => port.parse().ok()?,
            None => Endpoint::DEFAULT_PORT,
        };
        let path_and_query = if path.starts_with('?') {
            format!("/{path}")
        } else {
            path.to_owned()
        };
        (!host.is_empty()).then(|| Rendezvous {
            host: host.to_owned(),
            port,
            authority: authority.to_owned(),
            path_and_query,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendezvous_addresses_are_used_as_given() {
        assert_eq!(
            Rendezvous::parse(
                "wss://g63-prod.servicebus.windows.net:443/$hc/api?sb-hc-action=accept&sb-hc-id=X_G1"
            ),
            Some(Rendezvous {
                host: "g63-prod.servicebus.windows.net".into(),
                port: 443,
                authority: "g63-prod.servicebus.windows.net:443".into(),
                path_and_query: "/$hc/api?sb-hc-action=accept&sb-hc-id=X_G1".into(),
            })
        );
        let v6 = Rendezvous::parse("wss://[::1]:9443/$hc/a?x=1").unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 9443));
        assert_eq!(Rendezvous::parse("https://host/x"), None);
        assert_eq!(Rendezvous::parse("wss://host").unwrap().port, 443);
    }

    #[test]
    fn urls_follow_the_dotnet_client() {
        assert_eq!(
            path_and_query("api", Action::Listen, "abc"),
            "/$hc/api?sb-hc-action=listen&sb-hc-id=abc"
        );
        assert_eq!(tracking_id().len(), 36);
    }

    #[test]
    fn refusals_are_told_apart() {
        assert_eq!(
            Refusal::classify(
                404,
                "There are no listeners connected for the endpoint. TrackingId:1"
            ),
            Refusal::NoListener(
                "There are no listeners connected for the endpoint. TrackingId:1".into()
            )
        );
        let unknown = Refusal::classify(404, "Endpoint does not exist. TrackingId:2");
        assert!(matches!(unknown, Refusal::UnknownHybridConnection(_)));
        assert!(unknown.is_fatal());
        assert!(Refusal::classify(401, "InvalidSignature").is_fatal());
        assert!(Refusal::classify(403, "").is_fatal());
        assert!(!Refusal::classify(404, "Not Found").is_fatal());
        assert!(!Refusal::classify(503, "Service Unavailable").is_fatal());
        assert_eq!(
            Refusal::classify(401, "x").to_string(),
            "401 Unauthorized: x"
        );
    }
}
