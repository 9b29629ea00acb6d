//! `kips bridge`: flags, turned into [`BridgeOptions`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::LogFormatArg;
use crate::bridge::grammar::GrammarError;
use crate::bridge::{BridgeOptions, LocalForward, RemoteForward};

const AFTER_HELP: &str = "\
Expressions (azbridge's grammar; IPv6 in brackets is a kips extension):
  -L [address:]port[U][/name]{;...}:relay   listen here, send through hybrid connection <relay>
                                            (relay = text after the last ':'; no address: localhost;
                                            U: UDP; name defaults to the port text, e.g. 8080, 53U)
  -T relay:[name/][host:]port[U]{;...}      take <relay>'s connections, connect to host:port
                                            (relay = text before the first ':'; no host: localhost)
  Examples:
    -L 0.0.0.0:15100/http;[::]:15101U/dns:api
    -T api:http/localhost:8080;dns/localhost:53U

The connection string (-x, or AzureRelayConnectionString in -f) is trimmed of surrounding
whitespace: a Secret value ending in a newline works (azbridge would sign with the newline
and get 401). Only shared access keys and signatures are supported, not Entra ID.

Health port (--health-listen): /livez; /readyz (200 once every -T listener is online and the
relay has accepted the credentials; for -L: once the credentials and the hybrid connection
were accepted); /metrics (Prometheus). No probe opens a relay connection.

TLS trust for the relay: the public roots, plus --relay-ca FILE and/or the PEM text in the
environment variable KIPS_RELAY_CA.

Exit status:
  0  stopped by SIGTERM or SIGINT
  1  another failure (e.g. a port that cannot be bound)
  2  bad command line, configuration file, connection string or CA
  3  the relay refused the credentials (401 or 403)
  4  a hybrid connection does not exist on the relay (404)
Transient failures (relay unreachable, no listener, 5xx) are retried, never fatal.";

/// Run a relay bridge, wire-compatible with azbridge (Azure Relay Hybrid Connections).
#[derive(Debug, Clone, Args)]
#[command(after_long_help = AFTER_HELP)]
pub(super) struct BridgeArgs {
    /// Azure Relay connection string (Endpoint=sb://…;SharedAccessKeyName=…;SharedAccessKey=…).
    #[arg(
        short = 'x',
        long = "connection-string",
        value_name = "CONNECTION_STRING"
    )]
    connection_string: Option<String>,
    /// azbridge configuration file (YAML: AzureRelayConnectionString, LocalForward,
    /// RemoteForward, KeepAliveInterval); -x and -L/-T add to it.
    #[arg(short = 'f', long = "config-file", value_name = "FILE")]
    config_file: Option<PathBuf>,
    /// Local forwarder: [address:]port[U][/name]{;...}:relay (repeatable).
    #[arg(short = 'L', value_name = "EXPR", value_parser = parse_local)]
    local: Vec<LocalForward>,
    /// Remote forwarder: relay:[name/][host:]port[U]{;...} (repeatable; several for one relay
    /// are several listeners the relay balances between).
    #[arg(short = 'T', value_name = "EXPR", value_parser = parse_remote)]
    remote: Vec<RemoteForward>,
    /// Address of the health port (/livez, /readyz, /metrics), e.g. 0.0.0.0:15021.
    #[arg(long, value_name = "ADDRESS")]
    health_listen: Option<SocketAddr>,
    /// Extra CA certificate (PEM) to trust for the relay's TLS, beside the public roots.
    #[arg(long, value_name = "FILE")]
    relay_ca: Option<PathBuf>,
    /// Keepalive interval in seconds: pings on control channels and idle connections
    /// (azbridge's -a).
    #[arg(short = 'a', long = "keepalive", value_name = "SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    keepalive: u64,
    /// Lifetime of the tokens kips signs; they are renewed at 80 % of it.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    token_lifetime: Duration,
    /// How long a listen, connect or rendezvous (with the preamble's answer) may take.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    handshake_timeout: Duration,
    /// A UDP route with no datagram for this long is closed (azbridge: 4 minutes).
    #[arg(long, default_value = "4m", value_parser = humantime::parse_duration)]
    udp_idle: Duration,
    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    pub(super) log_format: LogFormatArg,
}

fn parse_local(text: &str) -> Result<LocalForward, GrammarError> {
    text.parse()
}

fn parse_remote(text: &str) -> Result<RemoteForward, GrammarError> {
    text.parse()
}

impl BridgeArgs {
    pub(super) fn into_options(self) -> BridgeOptions {
        BridgeOptions {
            connection_string: self.connection_string,
            config_file: self.config_file,
            local: self.local,
            remote: self.remote,
            health_listen: self.health_listen,
            relay_ca: self.relay_ca,
            keepalive: Duration::from_secs(self.keepalive),
            token_lifetime: self.token_lifetime,
            handshake_timeout: self.handshake_timeout,
            udp_idle: self.udp_idle,
        }
    }
}
