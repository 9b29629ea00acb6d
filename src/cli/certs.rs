//! `kips certs`'s flags.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};

use super::parse_duration;
use crate::certs::{
    CertsCommand, ClusterTarget, CreateConfig, DEFAULT_SECRET, DEFAULT_WEBHOOK_CONFIG, RotateConfig,
};

#[derive(Debug, Clone, Args)]
pub(super) struct CertsArgs {
    #[command(subcommand)]
    command: CertsSubcommand,
}

#[derive(Debug, Clone, Subcommand)]
enum CertsSubcommand {
    /// Write a CA and a serving certificate to files, for a webhook running outside the
    /// cluster (`kips webhook --tls-cert DIR/tls.crt --tls-key DIR/tls.key`). Reuses the
    /// CA already in DIR, so the caBundle registered for it stays valid.
    Create(CreateArgs),
    /// Show certificates: files in a directory (--dir), or the webhook's Secret and
    /// configuration in the cluster.
    Status(StatusArgs),
    /// Renew the certificates in the webhook's Secret now; every replica picks them up at
    /// its next check, and `--ca` starts a full CA rotation.
    Rotate(RotateArgs),
}

#[derive(Debug, Clone, Args)]
struct CreateArgs {
    /// Directory to write ca.crt, ca.key, tls.crt and tls.key into.
    #[arg(long, default_value = "certs")]
    out: PathBuf,
    /// Names of the serving certificate (DNS or IP), comma-separated; localhost, 127.0.0.1
    /// and ::1 are always included.
    #[arg(long = "san", value_delimiter = ',')]
    sans: Vec<String>,
    /// Adds `<service>.<namespace>.svc` and its variants to the names.
    #[arg(long, requires = "namespace")]
    service_name: Option<String>,
    /// Namespace of --service-name.
    #[arg(long)]
    namespace: Option<String>,
    /// Validity of the serving certificate.
    #[arg(long, default_value = "90d", value_parser = parse_duration)]
    validity: Duration,
    /// Validity of a new CA.
    #[arg(long, default_value = "1095d", value_parser = parse_duration)]
    ca_validity: Duration,
    /// Make a new CA even if DIR holds one (clients must then trust the new ca.crt).
    #[arg(long)]
    new_ca: bool,
}

/// Where the in-cluster certificates are (kubeconfig from KUBECONFIG or ~/.kube/config).
#[derive(Debug, Clone, Args)]
struct ClusterTargetArgs {
    /// Namespace of the webhook (and its Secret); default: the kubeconfig's namespace.
    #[arg(long, short = 'n')]
    namespace: Option<String>,
    /// The certificate Secret.
    #[arg(long, default_value = DEFAULT_SECRET)]
    secret: String,
    /// The MutatingWebhookConfiguration.
    #[arg(long, default_value = DEFAULT_WEBHOOK_CONFIG)]
    webhook_config: String,
    /// kubeconfig to use instead of $KUBECONFIG or ~/.kube/config.
    #[arg(long, value_name = "PATH")]
    kubeconfig: Option<PathBuf>,
}

impl From<ClusterTargetArgs> for ClusterTarget {
    fn from(args: ClusterTargetArgs) -> Self {
        ClusterTarget {
            namespace: args.namespace,
            secret: args.secret,
            webhook_config: args.webhook_config,
            kubeconfig: args.kubeconfig,
        }
    }
}

#[derive(Debug, Clone, Args)]
struct StatusArgs {
    /// Show the files of `kips certs create` (ca.crt, tls.crt) instead of the cluster's.
    #[arg(long)]
    dir: Option<PathBuf>,
    #[command(flatten)]
    target: ClusterTargetArgs,
}

#[derive(Debug, Clone, Args)]
struct RotateArgs {
    #[command(flatten)]
    target: ClusterTargetArgs,
    /// Rotate the CA too: a new CA is trusted at once, signs after the webhook's rotation
    /// overlap, and the old one is retired an overlap later.
    #[arg(long)]
    ca: bool,
    /// Validity of the new certificate(s).
    #[arg(long, default_value = "90d", value_parser = parse_duration)]
    cert_validity: Duration,
    /// Validity of the new CA (with --ca).
    #[arg(long, default_value = "1095d", value_parser = parse_duration)]
    ca_validity: Duration,
}

impl CertsArgs {
    pub(super) fn into_config(self) -> CertsCommand {
        match self.command {
            CertsSubcommand::Create(a) => CertsCommand::Create(CreateConfig {
                out: a.out,
                sans: a.sans,
                service_name: a.service_name,
                namespace: a.namespace,
                validity: a.validity,
                ca_validity: a.ca_validity,
                new_ca: a.new_ca,
            }),
            CertsSubcommand::Status(StatusArgs { dir: Some(dir), .. }) => {
                CertsCommand::FilesStatus { dir }
            }
            CertsSubcommand::Status(StatusArgs { target, .. }) => {
                CertsCommand::ClusterStatus(target.into())
            }
            CertsSubcommand::Rotate(a) => CertsCommand::Rotate(RotateConfig {
                target: a.target.into(),
                ca: a.ca,
                cert_validity: a.cert_validity,
                ca_validity: a.ca_validity,
            }),
        }
    }
}
