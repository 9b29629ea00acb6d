//! Command-line interface: one binary, `kips`, with a subcommand per role.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Parser, Subcommand, ValueEnum};

mod bridge;
mod relay;

use crate::annotations::PortMode;
use crate::inject::{DEFAULT_LISTEN_PORT_BASE, DEFAULT_RELAY_SECRET, InjectConfig};

#[derive(Debug, Parser)]
#[command(
    name = "kips",
    version,
    about = "Redirect a Kubernetes workload's traffic over Azure Relay to your machine",
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the mutating admission webhook (HTTPS).
    Webhook(Box<WebhookArgs>),
    /// Print manifests as admission would make them (like `istioctl kube-inject`).
    Inject(InjectCommandArgs),
    /// Install the nat rules of iptables port mode (runs as the `kips-init` container).
    InitNet(crate::initnet::InitNetArgs),
    /// Laptop side: run azbridge so a redirected workload's traffic reaches this machine.
    Connect(crate::dev::ConnectArgs),
    /// Annotate a workload with `kips.io/redirect` (and optionally follow the rollout).
    Redirect(crate::dev::RedirectArgs),
    /// Remove a workload's kips annotations (and optionally follow the rollout back).
    Revert(crate::dev::RevertArgs),
    /// Show redirected workloads.
    Status(crate::dev::StatusArgs),
    /// Create or inspect webhook certificates.
    Certs(crate::certs::CertsArgs),
    /// Run a relay bridge, wire-compatible with azbridge (-x, -L, -T).
    Bridge(Box<bridge::BridgeArgs>),
    /// Test relay, NOT for production: Azure Relay Hybrid Connections on loopback.
    Relay(relay::RelayArgs),
}

/// What gets injected: shared by `webhook` and `inject`.
#[derive(Debug, Clone, Args)]
pub struct InjectArgs {
    /// Image of the azbridge sidecar.
    #[arg(long, env = "KIPS_BRIDGE_IMAGE", default_value_t = InjectConfig::default().bridge_image)]
    pub bridge_image: String,
    /// Image of the `kips-init` container (the kips binary plus iptables).
    #[arg(long, env = "KIPS_INIT_IMAGE", default_value_t = InjectConfig::default().init_image)]
    pub init_image: String,
    /// imagePullPolicy of the injected containers (the cluster's default when unset).
    #[arg(long, env = "KIPS_IMAGE_PULL_POLICY", value_parser = ["Always", "IfNotPresent", "Never"])]
    pub image_pull_policy: Option<String>,
    /// Secret holding the relay connection string (key `connectionString`) when a workload
    /// does not name one with `kips.io/relay-secret`.
    #[arg(long, env = "KIPS_RELAY_SECRET", default_value = DEFAULT_RELAY_SECRET)]
    pub relay_secret: String,
    /// First port the sidecar listens on; ports a container of the pod declares are skipped.
    #[arg(long, env = "KIPS_LISTEN_PORT_BASE", default_value_t = DEFAULT_LISTEN_PORT_BASE, value_parser = clap::value_parser!(u16).range(1024..))]
    pub listen_port_base: u16,
    /// Inject the sidecar as a native sidecar (init container with restartPolicy Always;
    /// Kubernetes 1.29+).
    #[arg(long, env = "KIPS_NATIVE_SIDECAR", default_value_t = true, action = clap::ArgAction::Set)]
    pub native_sidecar: bool,
    /// Port mode of workloads that do not set `kips.io/port-mode`.
    #[arg(long, env = "KIPS_DEFAULT_PORT_MODE", default_value = "auto", value_parser = parse_port_mode)]
    pub default_port_mode: PortMode,
}

fn parse_port_mode(text: &str) -> Result<PortMode, String> {
    text.parse()
}

impl InjectArgs {
    pub fn config(&self) -> Result<InjectConfig> {
        if !crate::annotations::is_dns_subdomain(&self.relay_secret) {
            anyhow::bail!(
                "--relay-secret \"{}\" is not a valid Secret name",
                self.relay_secret
            );
        }
        Ok(InjectConfig {
            bridge_image: self.bridge_image.clone(),
            init_image: self.init_image.clone(),
            image_pull_policy: self.image_pull_policy.clone(),
            relay_secret: self.relay_secret.clone(),
            listen_port_base: self.listen_port_base,
            native_sidecar: self.native_sidecar,
            default_port_mode: self.default_port_mode,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct WebhookArgs {
    /// Address to serve HTTPS on.
    #[arg(long, env = "KIPS_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// Serving certificate (PEM). With --tls-key; reloaded when the file changes. Without
    /// both, kips generates a CA and a certificate at start (the embedded default).
    #[arg(long, env = "KIPS_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key of the serving certificate (PEM).
    #[arg(long, env = "KIPS_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Where the serving certificate comes from: embedded (default without --tls-cert),
    /// files (default with --tls-cert/--tls-key), or self (a CA and pair in a Secret shared
    /// by all replicas, renewed before expiry, caBundle of --webhook-config kept current).
    #[arg(long, env = "KIPS_CERT_MODE", value_enum)]
    pub cert_mode: Option<crate::certs::CertMode>,
    #[command(flatten)]
    pub self_certs: crate::certs::SelfCertArgs,
    /// Where the embedded default writes its CA (`ca.crt`) for clients to trust.
    #[arg(long, env = "KIPS_CERTS_DIR", default_value = "certs")]
    pub certs_dir: PathBuf,
    /// Extra names (DNS or IP) for the generated serving certificate, comma-separated.
    #[arg(long = "san", env = "KIPS_SANS", value_delimiter = ',')]
    pub sans: Vec<String>,
    /// The webhook's Service name; adds `<service>.<namespace>.svc` to generated certificates.
    #[arg(long, env = "KIPS_SERVICE_NAME", requires = "namespace")]
    pub service_name: Option<String>,
    /// The namespace kips runs in.
    #[arg(long, env = "KIPS_NAMESPACE")]
    pub namespace: Option<String>,
    /// How often certificate files are re-read even without a change notification.
    #[arg(long, env = "KIPS_TLS_POLL_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub tls_poll_interval: Duration,
    /// A client must finish the TLS handshake within this.
    #[arg(long, env = "KIPS_HANDSHAKE_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,
    /// An HTTP/1 client must send its request headers within this.
    #[arg(long, env = "KIPS_HEADER_READ_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub header_read_timeout: Duration,
    /// A request must be answered within this (the API server waits at most 30s).
    #[arg(long, env = "KIPS_REQUEST_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,
    /// On SIGTERM, report not ready for this long before draining (lets endpoints update).
    #[arg(long, env = "KIPS_SHUTDOWN_DELAY", default_value = "0s", value_parser = humantime::parse_duration)]
    pub shutdown_delay: Duration,
    /// In-flight requests get this long to finish after draining starts.
    #[arg(long, env = "KIPS_DRAIN_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// Log format.
    #[arg(long, env = "KIPS_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    #[command(flatten)]
    pub inject: InjectArgs,
    #[command(flatten)]
    pub cluster: crate::cluster::ClusterArgs,
}

#[derive(Debug, Clone, Args)]
pub struct InjectCommandArgs {
    /// Manifest to read (multi-document YAML); `-` reads stdin.
    #[arg(short = 'f', long = "filename")]
    pub file: PathBuf,
    #[command(flatten)]
    pub inject: InjectArgs,
}

pub fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("KIPS_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    // Colours only for a person at a terminal: escape codes in a pod's log are noise.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
    };
}

/// Parses the command line and runs the subcommand.
pub fn run() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Webhook(args) => {
            init_tracing(args.log_format);
            runtime()?.block_on(crate::webhook::run(*args))
        }
        Command::Inject(args) => crate::manifest::run(&args),
        Command::InitNet(args) => crate::initnet::run(args),
        Command::Connect(args) => runtime()?.block_on(crate::dev::connect(args)),
        Command::Redirect(args) => runtime()?.block_on(crate::dev::redirect(args)),
        Command::Revert(args) => runtime()?.block_on(crate::dev::revert(args)),
        Command::Status(args) => runtime()?.block_on(crate::dev::status(args)),
        Command::Certs(args) => runtime()?.block_on(crate::certs::run(args)),
        Command::Bridge(args) => args.run(),
        Command::Relay(args) => args.run(),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}
