//! `kips relay`: flags, turned into a [`RelayConfig`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::LogFormatArg;
use crate::relay::{KeySpec, RelayConfig, RelayError};

const AFTER_HELP: &str = "\
NOT A PRODUCTION RELAY. kips relay serves the service side of the public Azure Relay Hybrid
Connections protocol on one machine, for tests and local trials of kips bridge and azbridge:
listen, accept rendezvous, connect, token check per hybrid connection and key, up to 25
listeners per hybrid connection balanced at random, 404 \"There are no listeners connected for
the endpoint.\" when none is online. State is in memory; HTTP relaying, Entra ID and quotas
are not there.

TLS: a test CA in --dir (ca.crt, ca.key; made once, reused after), and a certificate for
localhost, 127.0.0.1 and ::1 (plus --name). Clients trust ca.crt: kips bridge --relay-ca or
KIPS_RELAY_CA, Node NODE_EXTRA_CA_CERTS.

A bridge reaches it with Endpoint=sb://localhost:<port>/ (or sb://127.0.0.1:<port>/) and one
of the --key names and keys.";

/// Test relay (not for production): the Hybrid Connections service on loopback.
#[derive(Debug, Clone, Args)]
#[command(after_long_help = AFTER_HELP)]
pub(super) struct RelayArgs {
    /// Address to serve TLS on (port 0: any free port; see --ready-file).
    #[arg(long, default_value = "127.0.0.1:9443")]
    listen: SocketAddr,
    /// Directory of the test CA (ca.crt, ca.key).
    #[arg(long, default_value = "kips-relay")]
    dir: PathBuf,
    /// A hybrid connection the relay knows (repeatable); others get 404.
    #[arg(long = "hybrid-connection", value_name = "NAME", required = true)]
    hybrid_connections: Vec<String>,
    /// A shared access key: [hybrid-connection/]name=key[:listen|:send|:listen,send]
    /// (repeatable; without a hybrid connection it is namespace-wide; default rights: both).
    #[arg(long = "key", value_name = "SPEC", required = true, value_parser = parse_key)]
    keys: Vec<KeySpec>,
    /// Extra DNS name or IP address for the serving certificate (repeatable).
    #[arg(long = "name", value_name = "NAME")]
    names: Vec<String>,
    /// How long a sender waits for the chosen listener's rendezvous.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    accept_timeout: Duration,
    /// File to write the bound address to once serving.
    #[arg(long, value_name = "FILE")]
    ready_file: Option<PathBuf>,
    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    pub(super) log_format: LogFormatArg,
}

fn parse_key(text: &str) -> Result<KeySpec, RelayError> {
    text.parse()
}

impl RelayArgs {
    pub(super) fn into_config(self) -> RelayConfig {
        RelayConfig {
            listen: self.listen,
            dir: self.dir,
            names: self.names,
            hybrid_connections: self.hybrid_connections,
            keys: self.keys,
            accept_timeout: self.accept_timeout,
            ready_file: self.ready_file,
        }
    }
}
