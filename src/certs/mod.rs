//! Webhook certificates: `kips certs`, and the in-cluster life cycle of `--cert-mode self`.
//!
//! - [`bundle`], [`layout`], [`plan`], [`trust`]: pure — certificates, the Secret's data
//!   layout, when to renew what, and whether a bundle trusts a certificate.
//! - [`cluster`]: the API server side (the shared Secret, the `caBundle`, the loop).
//! - [`files`]: certificates as files, for a webhook running outside a cluster.

pub mod bundle;
pub(crate) mod cluster;
pub(crate) mod files;
pub mod layout;
pub(crate) mod plan;
pub mod trust;

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::{Result, bail};

use crate::k8s::{self, ClientSettings};
use crate::tls;
pub use cluster::TrustGate;
pub use files::CreateConfig;
pub use plan::{Force, Policy};

/// The Secret `--cert-mode self` keeps its certificates in, unless told otherwise.
pub const DEFAULT_SECRET: &str = "kips-webhook-tls";
/// The MutatingWebhookConfiguration whose `caBundle` `--cert-mode self` keeps current.
pub const DEFAULT_WEBHOOK_CONFIG: &str = "kips";

/// Settings of `--cert-mode self` (part of `kips webhook`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelfManagedConfig {
    /// The Secret (in `namespace`) holding the CA and serving pair.
    pub secret: String,
    /// The MutatingWebhookConfiguration whose caBundle is kept current.
    pub webhook_config: String,
    pub policy: Policy,
    /// How often each replica re-reads the Secret and the webhook configuration.
    pub check_interval: Duration,
    pub kubeconfig: Option<PathBuf>,
    /// Default: the kubeconfig's namespace.
    pub namespace: Option<String>,
    /// The webhook's Service, for `<service>.<namespace>.svc`.
    pub service_name: Option<String>,
    /// Extra names of the serving certificate.
    pub sans: Vec<String>,
}

/// Connects to the API server and prepares `--cert-mode self`.
pub async fn self_managed(config: &SelfManagedConfig) -> Result<cluster::SelfManaged> {
    config.policy.validate(config.check_interval)?;
    let kube = k8s::connect(&ClientSettings::background(config.kubeconfig.clone())).await?;
    let namespace = config
        .namespace
        .clone()
        .unwrap_or_else(|| kube.client.default_namespace().to_owned());
    let names = self_names(config.service_name.as_deref(), &namespace, &config.sans)?;
    tracing::info!(
        secret = %format!("{namespace}/{}", config.secret),
        webhook_config = %config.webhook_config,
        names = ?names,
        "certificates: self-managed in a Secret"
    );
    Ok(cluster::SelfManaged {
        secret: cluster::CertSecretApi::new(kube.client.clone(), &namespace, &config.secret),
        config: cluster::WebhookConfigApi::new(kube.client, &config.webhook_config),
        names,
        policy: config.policy,
        check_interval: config.check_interval,
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

/// What `kips certs` does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertsCommand {
    /// Write a CA and a serving certificate to files.
    Create(CreateConfig),
    /// Describe the files of `kips certs create`.
    FilesStatus { dir: PathBuf },
    /// Describe the webhook's Secret and configuration in the cluster.
    ClusterStatus(ClusterTarget),
    /// Renew the certificates in the webhook's Secret now.
    Rotate(RotateConfig),
}

/// Where the in-cluster certificates are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterTarget {
    /// Default: the kubeconfig's namespace.
    pub namespace: Option<String>,
    pub secret: String,
    pub webhook_config: String,
    pub kubeconfig: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotateConfig {
    pub target: ClusterTarget,
    /// Rotate the CA too.
    pub ca: bool,
    pub cert_validity: Duration,
    pub ca_validity: Duration,
}

/// A client for `target` and the namespace it works in.
async fn cluster_client(target: &ClusterTarget) -> Result<(kube::Client, String)> {
    let kube = k8s::connect(&ClientSettings::background(target.kubeconfig.clone())).await?;
    let namespace = target
        .namespace
        .clone()
        .unwrap_or_else(|| kube.client.default_namespace().to_owned());
    Ok((kube.client, namespace))
}

pub async fn run(command: CertsCommand) -> Result<()> {
    match command {
        CertsCommand::Create(create) => files::create(&create),
        CertsCommand::FilesStatus { dir } => {
            print!("{}", files::status(&dir)?);
            Ok(())
        }
        CertsCommand::ClusterStatus(target) => cluster_status(&target).await,
        CertsCommand::Rotate(rotate) => cluster_rotate(&rotate).await,
    }
}

async fn cluster_status(target: &ClusterTarget) -> Result<()> {
    let (client, namespace) = cluster_client(target).await?;
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

async fn cluster_rotate(args: &RotateConfig) -> Result<()> {
    let (client, namespace) = cluster_client(&args.target).await?;
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
    fn self_names_put_the_service_name_first() {
        let names = self_names(Some("kips"), "kips-system", &["127.0.0.1".to_owned()]).unwrap();
        assert_eq!(names[0], "kips.kips-system.svc");
        assert_eq!(names.last().unwrap(), "127.0.0.1");
        let err = self_names(None, "ns", &[]).unwrap_err();
        assert!(err.to_string().contains("--service-name"), "{err}");
    }
}
