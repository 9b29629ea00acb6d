//! `--cert-mode self` against the API server: the one certificate Secret all replicas share,
//! the `caBundle` of the webhook's own MutatingWebhookConfiguration, and the loop that keeps
//! both current and gates readiness.
//!
//! The Secret's bytes are the source of truth. Every write is race-safe: creation relies on
//! the name being unique (a replica that gets AlreadyExists reads what won), and updates
//! carry the `resourceVersion` they were computed from (a replica that gets Conflict reads
//! again and re-plans). So when several replicas start at once exactly one pair wins, and
//! every replica ends up serving it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};

use super::bundle::same_certificates;
use super::layout::{CertSecret, SECRET_TYPE, View};
use super::plan::{self, Force, Plan, Policy, Step};
use super::trust::{ca_bundle_json, ca_bundles, trusted_by_every_webhook};
use crate::tls::CertStore;

/// Reads and writes after which a replica gives up one round (others kept winning).
const MAX_ATTEMPTS: usize = 8;

/// Labels of the Secret kips creates.
pub fn secret_labels() -> BTreeMap<String, String> {
    [
        ("app.kubernetes.io/name", "kips"),
        ("app.kubernetes.io/component", "webhook-certificate"),
        ("app.kubernetes.io/managed-by", "kips"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// The certificate Secret `namespace/name`.
pub struct CertSecretApi {
    api: Api<Secret>,
    namespace: String,
    name: String,
}

/// The Secret after a reconciliation.
#[derive(Debug, Clone)]
pub struct Reconciled {
    pub secret: CertSecret,
    pub view: View,
    /// The step this call wrote, if it wrote one.
    pub applied: Option<Plan>,
}

impl CertSecretApi {
    pub fn new(client: Client, namespace: &str, name: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }

    fn describe(&self) -> String {
        format!("Secret {}/{}", self.namespace, self.name)
    }

    /// Reads the Secret as it is.
    pub async fn read(&self) -> Result<Option<(CertSecret, View)>> {
        let Some(secret) = self
            .api
            .get_opt(&self.name)
            .await
            .with_context(|| format!("reading {}", self.describe()))?
        else {
            return Ok(None);
        };
        let pem = CertSecret::from_data(secret.data.as_ref())
            .with_context(|| format!("{} is unusable", self.describe()))?;
        let view = pem
            .inspect()
            .with_context(|| format!("{} is unusable", self.describe()))?;
        Ok(Some((pem, view)))
    }

    /// Brings the Secret up to date for a replica that serves `names` (creating it if need
    /// be), or, with `force`, carries out a renewal a person asked for.
    pub async fn reconcile(
        &self,
        names: &[String],
        policy: &Policy,
        force: Option<Force>,
    ) -> Result<Reconciled> {
        for _ in 0..MAX_ATTEMPTS {
            let now = SystemTime::now();
            let existing = self
                .api
                .get_opt(&self.name)
                .await
                .with_context(|| format!("reading {}", self.describe()))?;
            let Some(existing) = existing else {
                if force.is_some() {
                    bail!(
                        "{} does not exist: the webhook creates it when it starts with --cert-mode self",
                        self.describe()
                    );
                }
                let secret = plan::create(names, policy, now)?;
                match self
                    .api
                    .create(&PostParams::default(), &self.object(&secret))
                    .await
                {
                    Ok(_) => {
                        let view = secret.inspect()?;
                        let applied = Plan {
                            step: Step::Create,
                            reason: "no certificate Secret yet".to_owned(),
                        };
                        return Ok(Reconciled {
                            secret,
                            view,
                            applied: Some(applied),
                        });
                    }
                    Err(kube::Error::Api(status)) if status.is_already_exists() => {
                        tracing::debug!(secret = %self.describe(), "another replica created the Secret first; reading it");
                        continue;
                    }
                    Err(error) => {
                        return Err(error).with_context(|| format!("creating {}", self.describe()));
                    }
                }
            };

            let parsed = CertSecret::from_data(existing.data.as_ref())
                .and_then(|pem| pem.inspect().map(|view| (pem, view)));
            let (plan, next) = match parsed {
                Err(layout) => {
                    if force.is_some() {
                        bail!(
                            "{} is unusable ({layout}); the webhook replaces it on its own",
                            self.describe()
                        );
                    }
                    let plan = Plan {
                        step: Step::Create,
                        reason: format!("the Secret is unusable: {layout}"),
                    };
                    (plan, plan::create(names, policy, now)?)
                }
                Ok((current, view)) => {
                    let plan = match force {
                        Some(force) => plan::forced(&view, force, now)?,
                        None => plan::plan(&view, names, policy, now),
                    };
                    if let Step::Keep { .. } = plan.step {
                        return Ok(Reconciled {
                            secret: current,
                            view,
                            applied: None,
                        });
                    }
                    let next = plan::apply(&plan.step, &current, &view, policy, now)?;
                    (plan, next)
                }
            };
            // The object keeps the resourceVersion it was read with: if anyone wrote in
            // between, the API server answers Conflict and we plan again on what they wrote.
            let mut updated = existing;
            updated.data = Some(next.to_data());
            updated.string_data = None;
            match self
                .api
                .replace(&self.name, &PostParams::default(), &updated)
                .await
            {
                Ok(_) => {
                    let view = next.inspect()?;
                    return Ok(Reconciled {
                        secret: next,
                        view,
                        applied: Some(plan),
                    });
                }
                Err(kube::Error::Api(status)) if status.is_conflict() => {
                    tracing::debug!(secret = %self.describe(), "the Secret changed meanwhile; reading it again");
                }
                Err(error) => {
                    return Err(error).with_context(|| format!("updating {}", self.describe()));
                }
            }
        }
        bail!(
            "{} kept changing while kips tried to update it ({MAX_ATTEMPTS} attempts)",
            self.describe()
        )
    }

    fn object(&self, secret: &CertSecret) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                labels: Some(secret_labels()),
                ..Default::default()
            },
            type_: Some(SECRET_TYPE.to_owned()),
            data: Some(secret.to_data()),
            ..Default::default()
        }
    }
}

/// The webhook's own MutatingWebhookConfiguration.
pub struct WebhookConfigApi {
    api: Api<MutatingWebhookConfiguration>,
    name: String,
}

impl WebhookConfigApi {
    pub fn new(client: Client, name: &str) -> Self {
        Self {
            api: Api::all(client),
            name: name.to_owned(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub async fn get(&self) -> Result<Option<MutatingWebhookConfiguration>> {
        self.api
            .get_opt(&self.name)
            .await
            .with_context(|| format!("reading MutatingWebhookConfiguration {}", self.name))
    }

    /// Makes the `caBundle` of every webhook of the configuration carry exactly `bundle`;
    /// returns the configuration as the API server now has it (None: it does not exist).
    pub async fn sync_ca_bundle(
        &self,
        bundle: &str,
    ) -> Result<Option<MutatingWebhookConfiguration>> {
        let Some(config) = self.get().await? else {
            return Ok(None);
        };
        let stale: Vec<String> = ca_bundles(&config)
            .into_iter()
            .filter(|(_, pem)| !same_certificates(pem, bundle))
            .map(|(name, _)| name)
            .collect();
        if stale.is_empty() {
            return Ok(Some(config));
        }
        let patched = self
            .api
            .patch(
                &self.name,
                &PatchParams::default(),
                &Patch::Strategic(ca_bundle_patch(&stale, bundle)),
            )
            .await
            .with_context(|| {
                format!(
                    "patching the caBundle of MutatingWebhookConfiguration {}",
                    self.name
                )
            })?;
        tracing::info!(configuration = %self.name, webhooks = ?stale, "caBundle updated");
        Ok(Some(patched))
    }
}

/// A strategic merge patch setting the `caBundle` of the named webhooks (the list merges by
/// `name`, so other webhooks and fields are left alone, and concurrent replicas writing the
/// same bundle cannot undo each other).
pub fn ca_bundle_patch(webhooks: &[String], bundle: &str) -> serde_json::Value {
    let encoded = ca_bundle_json(bundle);
    serde_json::json!({
        "webhooks": webhooks
            .iter()
            .map(|name| serde_json::json!({"name": name, "clientConfig": {"caBundle": encoded}}))
            .collect::<Vec<_>>()
    })
}

/// Where the loop reports whether the API server trusts what is served: the webhook's
/// readiness.
pub trait TrustGate: Send + Sync + 'static {
    /// Records the answer; returns whether it changed.
    fn set_trusted(&self, trusted: bool) -> bool;
    fn trusted(&self) -> bool;
}

/// The outcome of one round: whether the API server trusts the served certificate.
enum Trust {
    Trusted,
    Untrusted(String),
}

/// Everything `--cert-mode self` needs.
pub struct SelfManaged {
    pub secret: CertSecretApi,
    pub config: WebhookConfigApi,
    /// Names the serving certificate must carry; the first is the one trust is checked for.
    pub names: Vec<String>,
    pub policy: Policy,
    pub check_interval: Duration,
}

impl SelfManaged {
    /// Runs forever: keeps the Secret, the served pair and the `caBundle` current, and the
    /// readiness gate on whether the API server trusts what is served.
    pub fn spawn(
        self,
        store: Arc<CertStore>,
        readiness: impl TrustGate,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut last_complaint = String::new();
            loop {
                match self.check(&store).await {
                    Ok(Trust::Trusted) => {
                        last_complaint.clear();
                        if readiness.set_trusted(true) {
                            tracing::info!("the API server trusts the served certificate: ready");
                        }
                    }
                    Ok(Trust::Untrusted(why)) => {
                        readiness.set_trusted(false);
                        if why != last_complaint {
                            tracing::warn!(reason = %why, "not ready: the API server would not trust the served certificate");
                            last_complaint = why;
                        }
                    }
                    // Readiness stays as it was: an API server outage does not make the
                    // certificate we serve any less trusted.
                    Err(error) => {
                        let error = format!("{error:#}");
                        if error != last_complaint {
                            tracing::warn!(error = %error, "certificate check failed; retrying");
                            last_complaint = error;
                        }
                    }
                }
                let wait = if readiness.trusted() {
                    self.check_interval
                } else {
                    self.check_interval.min(Duration::from_secs(1))
                };
                tokio::time::sleep(wait).await;
            }
        })
    }

    /// One round: the Secret, the served pair and the `caBundle` reconciled, and whether the
    /// API server now trusts what is served.
    async fn check(&self, store: &CertStore) -> Result<Trust> {
        let reconciled = self
            .secret
            .reconcile(&self.names, &self.policy, None)
            .await?;
        if let Some(plan) = &reconciled.applied {
            tracing::info!(secret = %self.secret.describe(), reason = %plan.reason, "certificate Secret updated");
        }
        let serving = &reconciled.view.serving;
        if store
            .replace(reconciled.secret.serving.clone())
            .context("the Secret's serving pair is unusable")?
        {
            tracing::info!(
                issuer = %serving.issuer,
                not_after = %humantime::format_rfc3339_seconds(serving.not_after),
                "serving the certificate from the Secret"
            );
        }
        let Some(config) = self
            .config
            .sync_ca_bundle(&reconciled.secret.trust_bundle)
            .await?
        else {
            return Ok(Trust::Untrusted(format!(
                "MutatingWebhookConfiguration {} does not exist",
                self.config.name()
            )));
        };
        Ok(
            match trusted_by_every_webhook(
                &config,
                &store.pem().cert,
                &self.names[0],
                SystemTime::now(),
            ) {
                Ok(()) => Trust::Trusted,
                Err(why) => Trust::Untrusted(why.to_string()),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_bundle_patch_names_each_webhook_and_carries_base64_pem() {
        let patch = ca_bundle_patch(&["pods.kips.io".to_owned()], "PEM");
        assert_eq!(
            patch,
            serde_json::json!({"webhooks": [{"name": "pods.kips.io", "clientConfig": {"caBundle": "UEVN"}}]})
        );
    }
}
