//! The relay bridge. What kips writes for it — which relay and binding each redirect and
//! reverse entry travels on ([`routes`], the one place both sides agree on), the command lines
//! of the sidecar and of the laptop ([`command_line`]), the relay Secret ([`secret`]) — and
//! `kips bridge`, a relay bridge built into kips, speaking azbridge's command line (for the
//! forms kips writes) and azbridge's protocols on the wire, so either side of a hybrid
//! connection may run either engine:
//!
//! - [`grammar`]: the `-L` and `-T` expressions as plain data (parse and render);
//! - [`connection_string`], [`sas`]: credentials and the tokens made from them;
//! - `hc`: the Hybrid Connections client (listener control channel, rendezvous, sender);
//! - `preamble`, `forward`: azbridge's preamble and the stream and datagram forwarders;
//! - `health`, `metrics`: the health port;
//! - `run`: the engine that puts them together; [`BridgeConfig`] is its input.
//!
//! Facts about azbridge and the service are from Azure/azure-relay-bridge v0.16.1,
//! Azure/azure-relay-dotnet (Microsoft.Azure.Relay), Azure/azure-relay-node (hyco-ws) and the
//! public protocol description; each module says which part it follows.

#[cfg(test)]
mod agreement;
pub(crate) mod backoff;
pub(crate) mod command_line;
pub mod config_file;
pub mod connection_string;
pub(crate) mod forward;
pub mod grammar;
pub(crate) mod hc;
pub(crate) mod health;
pub(crate) mod metrics;
pub(crate) mod preamble;
pub(crate) mod routes;
mod run;
pub mod sas;
pub(crate) mod secret;
pub mod tls;
pub(crate) mod ws;

use std::net::SocketAddr;
use std::time::Duration;

pub(crate) use command_line::CONNECTION_STRING_ENV;
pub use connection_string::Secret;
pub use grammar::{LocalBinding, LocalForward, RemoteBinding, RemoteForward};
pub(crate) use run::raise_open_file_limit;
pub use run::{run, run_until};
pub use secret::{CONNECTION_STRING_KEY, DEFAULT_RELAY_SECRET};
pub use tls::ExtraCa;

/// Exit status for a bad command line, configuration file or connection string.
pub const EXIT_USAGE: u8 = 2;
/// Exit status when the relay refuses the credentials (401, 403).
pub const EXIT_CREDENTIALS_REFUSED: u8 = 3;
/// Exit status when a hybrid connection does not exist on the relay (404).
pub const EXIT_UNKNOWN_HYBRID_CONNECTION: u8 = 4;
/// Exit status of any other failure (e.g. a port that cannot be bound).
pub const EXIT_FAILURE: u8 = 1;

/// The environment variable that may hold an extra CA certificate (PEM text) to trust for
/// the relay's TLS, beside the public roots.
pub const RELAY_CA_ENV: &str = "KIPS_RELAY_CA";

/// What `kips bridge` runs: the CLI (or a test) fills it in.
#[derive(Debug, Clone)]
pub struct BridgeConfig {
    /// The relay connection string (`-x`); trimmed before use.
    pub connection_string: Option<Secret>,
    pub local: Vec<LocalForward>,
    pub remote: Vec<RemoteForward>,
    /// Where `/livez`, `/readyz` and `/metrics` are served.
    pub health_listen: Option<SocketAddr>,
    /// CA certificates to trust beside the public roots.
    pub extra_ca: Vec<ExtraCa>,
    /// Ping interval on control channels and idle connections (azbridge `-a`, 30 s).
    pub keepalive: Duration,
    /// Lifetime of the tokens kips signs (renewed at 80 %).
    pub token_lifetime: Duration,
    /// TCP and TLS connect to the relay.
    pub relay_connect_timeout: Duration,
    /// A whole listen, connect or rendezvous, the preamble's answer included.
    pub handshake_timeout: Duration,
    /// TCP connect to a `-T` target.
    pub target_connect_timeout: Duration,
    /// A UDP route idle this long in both directions is closed.
    pub udp_idle: Duration,
    /// Reconnect backoff: first delay and cap (with jitter).
    pub reconnect_base: Duration,
    pub reconnect_cap: Duration,
}

impl Default for BridgeConfig {
    fn default() -> Self {
        BridgeConfig {
            connection_string: None,
            local: Vec::new(),
            remote: Vec::new(),
            health_listen: None,
            extra_ca: Vec::new(),
            keepalive: Duration::from_secs(30),
            token_lifetime: Duration::from_secs(3600),
            relay_connect_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(30),
            target_connect_timeout: Duration::from_secs(10),
            udp_idle: Duration::from_secs(240),
            reconnect_base: Duration::from_millis(500),
            reconnect_cap: Duration::from_secs(10),
        }
    }
}

/// What the command line gives `kips bridge`: [`BridgeOptions::load`] reads the files it
/// names (the azbridge configuration file, the relay CA) and `KIPS_RELAY_CA`.
#[derive(Debug, Clone)]
pub struct BridgeOptions {
    pub connection_string: Option<String>,
    pub config_file: Option<std::path::PathBuf>,
    pub local: Vec<LocalForward>,
    pub remote: Vec<RemoteForward>,
    pub health_listen: Option<SocketAddr>,
    pub relay_ca: Option<std::path::PathBuf>,
    pub keepalive: Duration,
    pub token_lifetime: Duration,
    pub handshake_timeout: Duration,
    pub udp_idle: Duration,
}

impl BridgeOptions {
    /// The configuration, with the file, the CA file and `KIPS_RELAY_CA` read.
    pub fn load(self) -> Result<BridgeConfig, BridgeError> {
        let mut config = BridgeConfig {
            health_listen: self.health_listen,
            keepalive: self.keepalive,
            token_lifetime: self.token_lifetime,
            handshake_timeout: self.handshake_timeout,
            udp_idle: self.udp_idle,
            ..BridgeConfig::default()
        };
        if let Some(path) = &self.config_file {
            let text = std::fs::read_to_string(path)
                .map_err(|error| BridgeError::Usage(format!("-f {}: {error}", path.display())))?;
            let file = config_file::FileSettings::parse(&text)
                .map_err(|error| BridgeError::Usage(format!("-f {}: {error}", path.display())))?;
            for key in &file.ignored {
                tracing::warn!(file = %path.display(), key, "azbridge setting ignored by kips bridge");
            }
            config.connection_string = file.connection_string.map(Secret::new);
            if let Some(seconds) = file.keepalive_seconds.filter(|s| *s > 0) {
                config.keepalive = Duration::from_secs(seconds);
            }
            config.local = file.local;
            config.remote = file.remote;
        }
        // -x replaces the file's connection string, as in azbridge.
        if let Some(text) = self.connection_string {
            config.connection_string = Some(Secret::new(text));
        }
        config.local.extend(self.local);
        config.remote.extend(self.remote);
        if let Some(path) = &self.relay_ca {
            let pem = std::fs::read_to_string(path).map_err(|error| {
                BridgeError::Usage(format!("--relay-ca {}: {error}", path.display()))
            })?;
            config.extra_ca.push(ExtraCa {
                origin: path.display().to_string(),
                pem,
            });
        }
        if let Some(pem) = std::env::var(RELAY_CA_ENV)
            .ok()
            .filter(|p| !p.trim().is_empty())
        {
            config.extra_ca.push(ExtraCa {
                origin: RELAY_CA_ENV.to_owned(),
                pem,
            });
        }
        Ok(config)
    }
}

/// Why `kips bridge` stopped; [`BridgeError::exit_code`] is its exit status.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("connection string: {0}")]
    ConnectionString(#[from] connection_string::ConnectionStringError),
    #[error("no connection string: give -x (or AzureRelayConnectionString in the -f file)")]
    NoConnectionString,
    #[error("nothing to forward: give at least one -L or -T")]
    NothingToForward,
    #[error(
        "the connection string is for hybrid connection \"{entity}\" (EntityPath), but {flag} names \"{relay}\""
    )]
    EntityMismatch {
        entity: String,
        flag: &'static str,
        relay: String,
    },
    #[error("relay CA: {0}")]
    Trust(#[from] tls::TrustError),
    #[error("{0}")]
    Usage(String),
    #[error("the relay refused the credentials for hybrid connection \"{relay}\": {refusal}")]
    CredentialsRefused { relay: String, refusal: hc::Refusal },
    #[error("hybrid connection \"{relay}\" does not exist on the relay: {refusal}")]
    UnknownHybridConnection { relay: String, refusal: hc::Refusal },
    #[error("cannot listen on {address}: {error}")]
    Bind {
        address: String,
        error: std::io::Error,
    },
    #[error("cannot resolve bind address {host}: {error}")]
    Resolve { host: String, error: std::io::Error },
}

impl BridgeError {
    pub fn exit_code(&self) -> u8 {
        match self {
            BridgeError::ConnectionString(_)
            | BridgeError::NoConnectionString
            | BridgeError::NothingToForward
            | BridgeError::EntityMismatch { .. }
            | BridgeError::Trust(_)
            | BridgeError::Usage(_) => EXIT_USAGE,
            BridgeError::CredentialsRefused { .. } => EXIT_CREDENTIALS_REFUSED,
            BridgeError::UnknownHybridConnection { .. } => EXIT_UNKNOWN_HYBRID_CONNECTION,
            BridgeError::Bind { .. } | BridgeError::Resolve { .. } => EXIT_FAILURE,
        }
    }
}

/// The exit status for an error that ended the program: a bridge's or relay's own, else 1.
pub fn exit_code(error: &anyhow::Error) -> u8 {
    if let Some(error) = error.downcast_ref::<BridgeError>() {
        return error.exit_code();
    }
    if let Some(error) = error.downcast_ref::<crate::relay::RelayError>() {
        return error.exit_code();
    }
    EXIT_FAILURE
}

/// The relay bridge the sidecar runs, and what it can and cannot do: the webhook renders the
/// sidecar, `kips-init`'s rules and its warnings from these facts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BridgeEngine {
    /// Azure/azure-relay-bridge: binds IPv4 only (`0.0.0.0`; `[::]` cannot be written), its
    /// UDP forwarding stops after one failed send, and its open ports prove nothing about the
    /// relay (so it gets no probe that would send traffic through it).
    #[default]
    Azbridge,
    /// `kips bridge`, in the kips image: binds `[::]` (dual-stack), keeps UDP across a lost
    /// listener, and answers probes on a health port of its own.
    Kips,
}

impl BridgeEngine {
    /// Every engine, as `--bridge-engine` takes it.
    pub const NAMES: [&str; 2] = ["azbridge", "kips"];

    pub fn as_str(self) -> &'static str {
        match self {
            BridgeEngine::Azbridge => "azbridge",
            BridgeEngine::Kips => "kips",
        }
    }

    /// The sidecar image kips injects unless told otherwise.
    pub fn default_image(self) -> String {
        match self {
            BridgeEngine::Azbridge => {
                format!(
                    "ghcr.io/kips-dev/azbridge:{}",
                    crate::inject::AZBRIDGE_VERSION
                )
            }
            BridgeEngine::Kips => format!("ghcr.io/kips-dev/kips:{}", crate::inject::VERSION),
        }
    }

    /// Whether its listeners take IPv6 connections (so ip6tables may redirect to them).
    pub fn binds_ipv6(self) -> bool {
        self == BridgeEngine::Kips
    }

    /// Whether UDP forwarding survives a failed send (no listener, a stale route).
    pub fn udp_survives_failures(self) -> bool {
        self == BridgeEngine::Kips
    }

    /// Whether it serves a health port (`/readyz`, `/livez`) that probes may use without
    /// opening relay connections.
    pub fn has_health_port(self) -> bool {
        self == BridgeEngine::Kips
    }

    /// Whether it reads the relay CA from `KIPS_RELAY_CA`.
    pub fn reads_relay_ca(self) -> bool {
        self == BridgeEngine::Kips
    }
}

/// A text that names no engine.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("\"{0}\" is not a bridge engine (azbridge, kips)")]
pub struct BridgeEngineError(String);

impl std::str::FromStr for BridgeEngine {
    type Err = BridgeEngineError;
    fn from_str(text: &str) -> Result<Self, BridgeEngineError> {
        match text {
            "azbridge" => Ok(BridgeEngine::Azbridge),
            "kips" => Ok(BridgeEngine::Kips),
            other => Err(BridgeEngineError(other.to_owned())),
        }
    }
}
