//! `kips webhook`'s flags (all readable from `KIPS_*` env vars).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

use super::LogFormatArg;
use super::inject::InjectArgs;
use super::{UsageError, parse_duration};
use crate::certs::{self, Policy, SelfManagedConfig};
use crate::tls::{self, CertFiles};
use crate::webhook::{CertificateSource, HooksConfig, HooksMode, ServerSettings, WebhookConfig};

/// Where the webhook's serving certificate comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum CertMode {
    /// Generated at start, CA written to --certs-dir (default without --tls-cert).
    Embedded,
    /// --tls-cert/--tls-key, reloaded when they change (default with them).
    Files,
    /// A CA and serving pair in a Secret shared by all replicas, renewed before expiry, with
    /// the caBundle of --webhook-config kept in step; ready only once the API server
    /// trusts the served certificate.
    #[value(name = "self")]
    SelfManaged,
}

impl CertMode {
    /// The mode asked for, or the one the other flags imply.
    fn resolve(asked: Option<CertMode>, has_tls_files: bool) -> Result<CertMode, UsageError> {
        match (asked, has_tls_files) {
            (None, true) => Ok(CertMode::Files),
            (None, false) => Ok(CertMode::Embedded),
            (Some(CertMode::Files), false) => Err(UsageError::new(
                "--cert-mode files needs --tls-cert and --tls-key",
            )),
            (Some(mode @ (CertMode::Embedded | CertMode::SelfManaged)), true) => {
                Err(UsageError::new(format!(
                    "--tls-cert/--tls-key are only used with --cert-mode files, not {}",
                    mode.to_possible_value()
                        .map(|v| v.get_name().to_owned())
                        .unwrap_or_default()
                )))
            }
            (Some(mode), _) => Ok(mode),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum HooksModeArg {
    /// On when a cluster is configured (in-cluster service account, $KUBECONFIG, or
    /// --kubeconfig); off otherwise.
    Auto,
    /// On; the webhook refuses to start without a usable cluster configuration.
    On,
    /// Off: no warnings that need the cluster, no Events.
    Off,
}

/// Settings of `--cert-mode self`.
#[derive(Debug, Clone, Args)]
struct SelfCertArgs {
    /// Secret (in --namespace) holding the CA and serving pair of --cert-mode self.
    #[arg(long, env = "KIPS_CERT_SECRET", default_value = certs::DEFAULT_SECRET)]
    cert_secret: String,
    /// MutatingWebhookConfiguration whose caBundle --cert-mode self keeps current.
    #[arg(long, env = "KIPS_WEBHOOK_CONFIG", default_value = certs::DEFAULT_WEBHOOK_CONFIG)]
    webhook_config: String,
    /// Validity of serving certificates made by --cert-mode self (renewed at 2/3).
    #[arg(long, env = "KIPS_CERT_VALIDITY", default_value = "90d", value_parser = parse_duration)]
    cert_validity: Duration,
    /// Validity of CAs made by --cert-mode self (rotated at 2/3, with an overlap).
    #[arg(long, env = "KIPS_CA_VALIDITY", default_value = "1095d", value_parser = parse_duration)]
    ca_validity: Duration,
    /// How often each replica re-reads the Secret and the webhook configuration.
    #[arg(long, env = "KIPS_CERT_CHECK_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    cert_check_interval: Duration,
    /// During a CA rotation, how long the new CA is trusted before it signs, and the old one
    /// after it stopped (at least twice the check interval).
    #[arg(long, env = "KIPS_ROTATION_OVERLAP", default_value = "10m", value_parser = parse_duration)]
    rotation_overlap: Duration,
}

/// Flags of `kips webhook` for its cluster hooks.
#[derive(Debug, Clone, Args)]
struct ClusterArgs {
    /// Admission warnings that need the cluster (missing relay Secret, Pod Security level)
    /// and Events on workloads.
    #[arg(long, env = "KIPS_CLUSTER_HOOKS", value_enum, default_value = "auto")]
    cluster_hooks: HooksModeArg,
    /// kubeconfig for the cluster hooks (default: in-cluster, then $KUBECONFIG).
    #[arg(long = "kubeconfig", env = "KIPS_KUBECONFIG", value_name = "PATH")]
    kubeconfig: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub(super) struct WebhookArgs {
    /// Address to serve HTTPS on.
    #[arg(long, env = "KIPS_LISTEN", default_value = "0.0.0.0:8443")]
    listen: SocketAddr,
    /// Serving certificate (PEM). With --tls-key; reloaded when the file changes. Without
    /// both, kips generates a CA and a certificate at start (the embedded default).
    #[arg(long, env = "KIPS_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key of the serving certificate (PEM).
    #[arg(long, env = "KIPS_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Where the serving certificate comes from: embedded (default without --tls-cert),
    /// files (default with --tls-cert/--tls-key), or self (a CA and pair in a Secret shared
    /// by all replicas, renewed before expiry, caBundle of --webhook-config kept current).
    #[arg(long, env = "KIPS_CERT_MODE", value_enum)]
    cert_mode: Option<CertMode>,
    #[command(flatten)]
    self_certs: SelfCertArgs,
    /// Where the embedded default writes its CA (`ca.crt`) for clients to trust.
    #[arg(long, env = "KIPS_CERTS_DIR", default_value = "certs")]
    certs_dir: PathBuf,
    /// Extra names (DNS or IP) for the generated serving certificate, comma-separated.
    #[arg(long = "san", env = "KIPS_SANS", value_delimiter = ',')]
    sans: Vec<String>,
    /// The webhook's Service name; adds `<service>.<namespace>.svc` to generated certificates.
    #[arg(long, env = "KIPS_SERVICE_NAME", requires = "namespace")]
    service_name: Option<String>,
    /// The namespace kips runs in.
    #[arg(long, env = "KIPS_NAMESPACE")]
    namespace: Option<String>,
    /// How often certificate files are re-read even without a change notification.
    #[arg(long, env = "KIPS_TLS_POLL_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    tls_poll_interval: Duration,
    /// A client must finish the TLS handshake within this.
    #[arg(long, env = "KIPS_HANDSHAKE_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    handshake_timeout: Duration,
    /// An HTTP/1 client must send its request headers within this.
    #[arg(long, env = "KIPS_HEADER_READ_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    header_read_timeout: Duration,
    /// A request must be answered within this (the API server waits at most 30s).
    #[arg(long, env = "KIPS_REQUEST_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    request_timeout: Duration,
    /// On SIGTERM, report not ready for this long before draining (lets endpoints update).
    #[arg(long, env = "KIPS_SHUTDOWN_DELAY", default_value = "0s", value_parser = humantime::parse_duration)]
    shutdown_delay: Duration,
    /// In-flight requests get this long to finish after draining starts.
    #[arg(long, env = "KIPS_DRAIN_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// Log format.
    #[arg(long, env = "KIPS_LOG_FORMAT", value_enum, default_value = "text")]
    pub(super) log_format: LogFormatArg,
    #[command(flatten)]
    inject: InjectArgs,
    #[command(flatten)]
    cluster: ClusterArgs,
}

impl WebhookArgs {
    pub(super) fn into_config(self) -> Result<WebhookConfig, UsageError> {
        let mode = CertMode::resolve(self.cert_mode, self.tls_cert.is_some())?;
        let certificates = match (mode, self.tls_cert, self.tls_key) {
            (CertMode::Files, Some(cert), Some(key)) => CertificateSource::Files {
                files: CertFiles { cert, key },
                poll_interval: self.tls_poll_interval,
            },
            (CertMode::SelfManaged, _, _) => {
                let s = self.self_certs;
                CertificateSource::SelfManaged(SelfManagedConfig {
                    secret: s.cert_secret,
                    webhook_config: s.webhook_config,
                    policy: Policy {
                        serving_validity: s.cert_validity,
                        ca_validity: s.ca_validity,
                        overlap: s.rotation_overlap,
                    },
                    check_interval: s.cert_check_interval,
                    kubeconfig: self.cluster.kubeconfig.clone(),
                    namespace: self.namespace,
                    service_name: self.service_name,
                    sans: self.sans,
                })
            }
            _ => {
                let mut names = self.sans;
                if let (Some(service), Some(namespace)) = (&self.service_name, &self.namespace) {
                    names.extend(tls::service_names(service, namespace));
                }
                CertificateSource::Embedded {
                    certs_dir: self.certs_dir,
                    names,
                }
            }
        };
        Ok(WebhookConfig {
            listen: self.listen,
            certificates,
            server: ServerSettings {
                handshake_timeout: self.handshake_timeout,
                header_read_timeout: self.header_read_timeout,
                request_timeout: self.request_timeout,
                drain_timeout: self.drain_timeout,
            },
            shutdown_delay: self.shutdown_delay,
            inject: self.inject.into_config()?,
            hooks: HooksConfig {
                mode: match self.cluster.cluster_hooks {
                    HooksModeArg::Auto => HooksMode::Auto,
                    HooksModeArg::On => HooksMode::On,
                    HooksModeArg::Off => HooksMode::Off,
                },
                kubeconfig: self.cluster.kubeconfig,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::parse;
    use super::*;
    use crate::Command;

    #[test]
    fn the_mode_follows_the_tls_flags_unless_told() {
        assert_eq!(CertMode::resolve(None, false).unwrap(), CertMode::Embedded);
        assert_eq!(CertMode::resolve(None, true).unwrap(), CertMode::Files);
        assert_eq!(
            CertMode::resolve(Some(CertMode::SelfManaged), false).unwrap(),
            CertMode::SelfManaged
        );
        let err = CertMode::resolve(Some(CertMode::SelfManaged), true).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--tls-cert/--tls-key are only used with --cert-mode files, not self"
        );
        assert!(CertMode::resolve(Some(CertMode::Files), false).is_err());
    }

    #[test]
    fn flags_become_the_webhook_config() {
        let Ok(Command::Webhook(config, _)) = parse(&[
            "kips",
            "webhook",
            "--listen",
            "127.0.0.1:9443",
            "--san",
            "a.test,10.0.0.1",
            "--service-name",
            "kips",
            "--namespace",
            "kips-system",
        ]) else {
            panic!("webhook flags")
        };
        assert_eq!(config.listen, "127.0.0.1:9443".parse().unwrap());
        let CertificateSource::Embedded { names, .. } = &config.certificates else {
            panic!("the embedded default")
        };
        assert_eq!(names[..2], ["a.test", "10.0.0.1"]);
        assert!(names.contains(&"kips.kips-system.svc".to_owned()));
        let err = parse(&["kips", "webhook", "--relay-secret", "Bad_Name"]).unwrap_err();
        assert!(err.contains("is not a valid Secret name"), "{err}");
    }
}
