//! Webhook certificates: `kips certs`, and the in-cluster life cycle of `--cert-mode self`.
//!
//! - [`bundle`], [`layout`], [`plan`], [`trust`]: pure — certificates, the Secret's data
//!   layout, when to renew what, and whether a bundle trusts a certificate.
//! - [`cluster`]: the API server side (the shared Secret, the `caBundle`, the loop).
//! - [`files`]: certificates as files, for a webhook running outside a cluster.

pub mod bundle;
pub mod cluster;
pub mod files;
pub mod layout;
pub mod plan;
pub mod trust;

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};

use crate::cli::WebhookArgs;
use crate::tls;
pub use plan::{Force, Policy};
pub use trust::Readiness;

/// The Secret `--cert-mode self` keeps its certificates in, unless told otherwise.
pub const DEFAULT_SECRET: &str = "kips-webhook-tls";
/// The MutatingWebhookConfiguration whose `caBundle` `--cert-mode self` keeps current.
pub const DEFAULT_WEBHOOK_CONFIG: &str = "kips";

/// Where the webhook's serving certificate comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CertMode {
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
    pub fn resolve(asked: Option<CertMode>, has_tls_files: bool) -> Result<CertMode> {
        match (asked, has_tls_files) {
            (None, true) => Ok(CertMode::Files),
            (None, false) => Ok(CertMode::Embedded),
            (Some(CertMode::Files), false) => {
                bail!("--cert-mode files needs --tls-cert and --tls-key")
            }
            (Some(mode @ (CertMode::Embedded | CertMode::SelfManaged)), true) => bail!(
                "--tls-cert/--tls-key are only used with --cert-mode files, not {}",
                mode.to_possible_value()
                    .map(|v| v.get_name().to_owned())
                    .unwrap_or_default()
            ),
            (Some(mode), _) => Ok(mode),
        }
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{e} (e.g. 90d, 12h, 30s)"))
}

/// Settings of `--cert-mode self` (part of `kips webhook`).
#[derive(Debug, Clone, Args)]
pub struct SelfCertArgs {
    /// Secret (in --namespace) holding the CA and serving pair of --cert-mode self.
    #[arg(long, env = "KIPS_CERT_SECRET", default_value = DEFAULT_SECRET)]
    pub cert_secret: String,
    /// MutatingWebhookConfiguration whose caBundle --cert-mode self keeps current.
    #[arg(long, env = "KIPS_WEBHOOK_CONFIG", default_value = DEFAULT_WEBHOOK_CONFIG)]
    pub webhook_config: String,
    /// Validity of serving certificates made by --cert-mode self (renewed at 2/3).
    #[arg(long, env = "KIPS_CERT_VALIDITY", default_value = "90d", value_parser = parse_duration)]
    pub cert_validity: Duration,
    /// Validity of CAs made by --cert-mode self (rotated at 2/3, with an overlap).
    #[arg(long, env = "KIPS_CA_VALIDITY", default_value = "1095d", value_parser = parse_duration)]
    pub ca_validity: Duration,
    /// How often each replica re-reads the Secret and the webhook configuration.
    #[arg(long, env = "KIPS_CERT_CHECK_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub cert_check_interval: Duration,
    /// During a CA rotation, how long the new CA is trusted before it signs, and the old one
    /// after it stopped (at least twice the check interval).
    #[arg(long, env = "KIPS_ROTATION_OVERLAP", default_value = "10m", value_parser = parse_duration)]
    pub rotation_overlap: Duration,
}

impl SelfCertArgs {
    pub fn policy(&self) -> Policy {
        Policy {
            serving_validity: self.cert_validity,
            ca_validity: self.ca_validity,
            overlap: self.rotation_overlap,
        }
    }
}

/// Connects to the API server and prepares `--cert-mode self` from the webhook's flags.
pub async fn self_managed(args: &WebhookArgs) -> Result<cluster::SelfManaged> {
    let settings = &args.self_certs;
    let policy = settings.policy();
    policy.validate(settings.cert_check_interval)?;
    let client = kube_client(args.cluster.kubeconfig.as_deref()).await?;
    let namespace = args
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_owned());
    let names = self_names(args.service_name.as_deref(), &namespace, &args.sans)?;
    tracing::info!(
        secret = %format!("{namespace}/{}", settings.cert_secret),
        webhook_config = %settings.webhook_config,
        names = ?names,
        "certificates: self-managed in a Secret"
    );
    Ok(cluster::SelfManaged {
        secret: cluster::CertSecretApi::new(client.clone(), &namespace, &settings.cert_secret),
        config: cluster::WebhookConfigApi::new(client, &settings.webhook_config),
        names,
        policy,
        check_interval: settings.cert_check_interval,
    })
}

/// The serving certificate's names: the Service's (first, since the API server checks
/// `<service>.<namespace>.svc`), then the extra ones.
pub fn self_names(service: Option<&str>, namespace: &str, sans: &[String]) -> Result<Vec<String>> {
    let mut names = service.map_or_else(Vec::new, |s| tls::service_names(s, namespace));
    for name in sans {
        if !names.contains(name) {
            names.push(name.clone());
        }
    }
    if names.is_empty() {
        bail!("--cert-mode self needs --service-name (for <service>.<namespace>.svc) or --san");
    }
    Ok(names)
}

/// What a self-managed replica serves until it has read the Secret: trusted by nobody, so
/// the replica stays unready, but its health endpoint answers.
pub fn placeholder_pair(names: &[String]) -> Result<tls::PemPair> {
    let ca = tls::generate_ca(
        "kips placeholder (not trusted)",
        Duration::from_secs(86_400),
    )?;
    tls::issue_serving_cert(&ca, names, Duration::from_secs(86_400))
}

/// A client from `kubeconfig`, else the in-cluster service account or $KUBECONFIG.
async fn kube_client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client> {
    use kube::config::{Config, KubeConfigOptions, Kubeconfig};
    // kube's TLS needs a process-wide rustls provider; another caller may have set one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut config = match kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path)
                .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(file, &KubeConfigOptions::default()).await?
        }
        None => Config::infer()
            .await
            .context("finding the Kubernetes API (in-cluster service account, or KUBECONFIG)")?,
    };
    // A hung API server must not stall the certificate loop for minutes.
    config.connect_timeout = Some(Duration::from_secs(10));
    config.read_timeout = Some(Duration::from_secs(30));
    Ok(kube::Client::try_from(config)?)
}

#[derive(Debug, Clone, Args)]
pub struct CertsArgs {
    #[command(subcommand)]
    pub command: CertsCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum CertsCommand {
    /// Write a CA and a serving certificate to files, for a webhook running outside the
    /// cluster (`kips webhook --tls-cert DIR/tls.crt --tls-key DIR/tls.key`). Reuses the
    /// CA already in DIR, so the caBundle registered for it stays valid.
    Create(files::CreateArgs),
    /// Show certificates: files in a directory (--dir), or the webhook's Secret and
    /// configuration in the cluster.
    Status(StatusArgs),
    /// Renew the certificates in the webhook's Secret now; every replica picks them up at
    /// its next check, and `--ca` starts a full CA rotation.
    Rotate(RotateArgs),
}

/// Where the in-cluster certificates are (kubeconfig from KUBECONFIG or ~/.kube/config).
#[derive(Debug, Clone, Args)]
pub struct ClusterTarget {
    /// Namespace of the webhook (and its Secret); default: the kubeconfig's namespace.
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
    /// The certificate Secret.
    #[arg(long, default_value = DEFAULT_SECRET)]
    pub secret: String,
    /// The MutatingWebhookConfiguration.
    #[arg(long, default_value = DEFAULT_WEBHOOK_CONFIG)]
    pub webhook_config: String,
    /// kubeconfig to use instead of $KUBECONFIG or ~/.kube/config.
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// Show the files of `kips certs create` (ca.crt, tls.crt) instead of the cluster's.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    #[command(flatten)]
    pub target: ClusterTarget,
}

#[derive(Debug, Clone, Args)]
pub struct RotateArgs {
    #[command(flatten)]
    pub target: ClusterTarget,
    /// Rotate the CA too: a new CA is trusted at once, signs after the webhook's rotation
    /// overlap, and the old one is retired an overlap later.
    #[arg(long)]
    pub ca: bool,
    /// Validity of the new certificate(s).
    #[arg(long, default_value = "90d", value_parser = parse_duration)]
    pub cert_validity: Duration,
    /// Validity of the new CA (with --ca).
    #[arg(long, default_value = "1095d", value_parser = parse_duration)]
    pub ca_validity: Duration,
}

pub async fn run(args: CertsArgs) -> Result<()> {
    match args.command {
        CertsCommand::Create(create) => files::create(&create),
        CertsCommand::Status(StatusArgs { dir: Some(dir), .. }) => {
            print!("{}", files::status(&dir)?);
            Ok(())
        }
        CertsCommand::Status(StatusArgs { target, .. }) => cluster_status(&target).await,
        CertsCommand::Rotate(rotate) => cluster_rotate(&rotate).await,
    }
}

async fn cluster_status(target: &ClusterTarget) -> Result<()> {
    let client = kube_client(target.kubeconfig.as_deref()).await?;
    let namespace = target
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_owned());
    let secret = cluster::CertSecretApi::new(client.clone(), &namespace, &target.secret);
    let Some((pem, view)) = secret.read().await? else {
        bail!(
            "Secret {namespace}/{} does not exist (is the webhook running with --cert-mode self?)",
            target.secret
        );
    };
    let now = SystemTime::now();
    let mut out = format!("Secret {namespace}/{}\n", target.secret);
    out += &describe("serving", &view.serving, now);
    out += &describe("signer", &view.signer, now);
    for ca in &view.bundle {
        out += &describe("trusted", ca, now);
    }
    let config = cluster::WebhookConfigApi::new(client, &target.webhook_config);
    match config.get().await? {
        None => {
            out += &format!(
                "MutatingWebhookConfiguration {} does not exist\n",
                target.webhook_config
            )
        }
        Some(config) => {
            out += &format!("MutatingWebhookConfiguration {}\n", target.webhook_config);
            let name = view.serving.names.first().map_or("", String::as_str);
            for (webhook, bundle) in trust::ca_bundles(&config) {
                let verdict = match trust::check_trusted(&bundle, &pem.serving.cert, name, now) {
                    Ok(()) => "trusts the served certificate".to_owned(),
                    Err(why) => format!("does NOT trust the served certificate: {why}"),
                };
                out += &format!("  {webhook}: {verdict}\n");
            }
        }
    }
    print!("{out}");
    Ok(())
}

async fn cluster_rotate(args: &RotateArgs) -> Result<()> {
    let client = kube_client(args.target.kubeconfig.as_deref()).await?;
    let namespace = args
        .target
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_owned());
    let secret = cluster::CertSecretApi::new(client, &namespace, &args.target.secret);
    let policy = Policy {
        serving_validity: args.cert_validity,
        ca_validity: args.ca_validity,
        // Not used by forced steps: the replicas time the rest of a CA rotation.
        overlap: Duration::ZERO,
    };
    let force = if args.ca { Force::Ca } else { Force::Serving };
    let reconciled = secret.reconcile(&[], &policy, Some(force)).await?;
    let reason = reconciled.applied.map(|p| p.reason).unwrap_or_default();
    println!(
        "Secret {namespace}/{}: {reason}; replicas pick it up at their next check",
        args.target.secret
    );
    print!(
        "{}",
        describe("serving", &reconciled.view.serving, SystemTime::now())
    );
    print!(
        "{}",
        describe("signer", &reconciled.view.signer, SystemTime::now())
    );
    Ok(())
}

/// One line per certificate: role, subject, names, issuer, validity, renewal.
pub fn describe(role: &str, cert: &bundle::CertInfo, now: SystemTime) -> String {
    let at = |t| humantime::format_rfc3339_seconds(t).to_string();
    let state = if cert.expired(now) {
        "EXPIRED".to_owned()
    } else if now >= cert.renew_at() {
        "due for renewal".to_owned()
    } else {
        format!("renew at {}", at(cert.renew_at()))
    };
    let names = if cert.names.is_empty() {
        String::new()
    } else {
        format!(" names={}", cert.names.join(","))
    };
    format!(
        "  {role:<8} {:?}{names} issuer={:?} valid {} .. {} ({state})\n",
        cert.subject,
        cert.issuer,
        at(cert.not_before),
        at(cert.not_after)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn self_names_put_the_service_name_first() {
        let names = self_names(Some("kips"), "kips-system", &["127.0.0.1".to_owned()]).unwrap();
        assert_eq!(names[0], "kips.kips-system.svc");
        assert_eq!(names.last().unwrap(), "127.0.0.1");
        let err = self_names(None, "ns", &[]).unwrap_err();
        assert!(err.to_string().contains("--service-name"), "{err}");
    }
}
