//! kips on the real control plane ([`super::control_plane`]): what the end-to-end suites
//! share.
//!
//! - [`KipsWebhook`]: a local `kips webhook` registered with the MutatingWebhookConfiguration
//!   that the chart renders for a webhook outside the cluster (`webhook.url` +
//!   `webhook.caBundle`), so the chart's rules, `matchConditions`, failure policies and
//!   timeouts are what the API server applies. Optionally *scoped*: its configuration also
//!   requires the namespace label [`SCOPE_LABEL`]`=<scope>`, so several webhooks (one
//!   stopped, one with other flags) share one control plane without answering each other's
//!   requests.
//! - [`FakeKubelet`]: marks pods Running and Ready through `pods/status`, as a kubelet
//!   would, so rollouts finish without nodes.
//! - [`annotate`]: what `kubectl annotate` sends (a merge patch), with the API server's
//!   warnings and its error as [`kube::Error::Api`].
//! - [`eventually`], [`helm`], builders and small readers.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::control_plane::ControlPlane;
use super::webhook::Webhook;

pub const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/kips");
/// The namespace the chart is rendered for (which its webhooks never see).
pub const RELEASE_NAMESPACE: &str = "kips-system";
/// Namespace label that ties a namespace to one scoped [`KipsWebhook`].
pub const SCOPE_LABEL: &str = "e2e.kips.io/webhook";

/// Polls `check` every 100 ms until it returns `Some`, for at most `limit`.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        if started.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `helm <args>` against `cp` (killed if the test is dropped); its stdout.
pub async fn helm(cp: &ControlPlane, args: &[&str]) -> Result<String> {
    let mut command = tokio::process::Command::from(cp.helm());
    command.args(args).kill_on_drop(true);
    let out = command.output().await.context("running helm")?;
    ensure!(
        out.status.success(),
        "helm {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// The chart's MutatingWebhookConfiguration for a webhook outside the cluster, as
/// `helm template <release> charts/kips --set webhook.url=<url> --set-file
/// webhook.caBundle=<ca> --show-only templates/mutatingwebhookconfiguration.yaml` renders it.
pub async fn render_webhook_configuration(
    cp: &ControlPlane,
    release: &str,
    url: &str,
    ca_path: &Path,
) -> Result<MutatingWebhookConfiguration> {
    let url = format!("webhook.url={url}");
    let ca = format!("webhook.caBundle={}", ca_path.display());
    let text = helm(
        cp,
        &[
            "template",
            release,
            CHART,
            "--namespace",
            RELEASE_NAMESPACE,
            "--set",
            &url,
            "--set-file",
            &ca,
            "--show-only",
            "templates/mutatingwebhookconfiguration.yaml",
        ],
    )
    .await?;
    let mut found = None;
    for document in serde_yaml::Deserializer::from_str(&text) {
        let value = Value::deserialize(document)?;
        if value["kind"] == "MutatingWebhookConfiguration" {
            ensure!(
                found.is_none(),
                "two MutatingWebhookConfigurations:\n{text}"
            );
            found = Some(serde_json::from_value(value)?);
        }
    }
    found.with_context(|| format!("the chart rendered no MutatingWebhookConfiguration:\n{text}"))
}

/// Limits every webhook of `config` to namespaces labelled [`SCOPE_LABEL`]`=<scope>`, on
/// top of the chart's own namespaceSelector (which stays as rendered).
pub fn scoped(
    mut config: MutatingWebhookConfiguration,
    scope: &str,
) -> MutatingWebhookConfiguration {
    for webhook in config.webhooks.iter_mut().flatten() {
        let selector = webhook.namespace_selector.get_or_insert_default();
        selector.match_expressions.get_or_insert_default().push(
            serde_json::from_value(json!({
                "key": SCOPE_LABEL, "operator": "In", "values": [scope]
            }))
            .expect("a label selector requirement"),
        );
    }
    config
}

/// Renders the chart's configuration for `url` (trusting `ca_path`), scopes it when asked,
/// and creates it.
pub async fn register_chart_webhook(
    cp: &ControlPlane,
    release: &str,
    url: &str,
    ca_path: &Path,
    scope: Option<&str>,
) -> Result<MutatingWebhookConfiguration> {
    let rendered = render_webhook_configuration(cp, release, url, ca_path).await?;
    let config = match scope {
        Some(scope) => scoped(rendered, scope),
        None => rendered,
    };
    Api::<MutatingWebhookConfiguration>::all(cp.client()?)
        .create(&PostParams::default(), &config)
        .await
        .with_context(|| format!("creating the MutatingWebhookConfiguration {release}"))
}

/// The API server picks webhook configurations up asynchronously: waits until a bad value
/// in `ns` is refused with kips' message (a server-side dry run: nothing is created).
pub async fn wait_until_the_api_server_calls_kips(client: &Client, ns: &str) -> Result<()> {
    let api = Api::<Deployment>::namespaced(client.clone(), ns);
    let mut probe = deployment("probe", 1, 8080);
    probe
        .annotations_mut()
        .insert("kips.io/redirect".into(), "api:80x0".into());
    let params = PostParams {
        dry_run: true,
        ..Default::default()
    };
    eventually(
        &format!("the API server to call kips for namespace {ns}"),
        Duration::from_secs(30),
        || {
            let (api, probe, params) = (api.clone(), probe.clone(), params.clone());
            async move {
                Ok(match api.create(&params, &probe).await {
                    Err(e) if e.to_string().contains("port \"80x0\"") => Some(()),
                    _ => None,
                })
            }
        },
    )
    .await
}

/// A local `kips webhook` (embedded certificates, loopback) that the API server calls
/// through the chart's configuration; the process is killed when this is dropped.
pub struct KipsWebhook {
    pub webhook: Webhook,
    pub config: MutatingWebhookConfiguration,
    pub scope: Option<String>,
}

impl KipsWebhook {
    /// Starts `kips webhook <flags>`, registers the chart's configuration named after
    /// `release` (scoped to `scope` if given), and waits until the API server calls it.
    pub async fn start(
        cp: &ControlPlane,
        release: &str,
        scope: Option<&str>,
        flags: &[&str],
    ) -> Result<Self> {
        let flags: Vec<String> = flags.iter().map(|f| (*f).to_owned()).collect();
        let webhook = tokio::task::spawn_blocking(move || {
            let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
            Webhook::start(&flags)
        })
        .await??;
        let url = format!("https://127.0.0.1:{}/mutate", webhook.addr.port());
        let config = register_chart_webhook(cp, release, &url, &webhook.ca_path(), scope).await?;
        let kips = Self {
            webhook,
            config,
            scope: scope.map(str::to_owned),
        };
        let probe = kips.namespace(cp, &format!("{release}-ready"), &[]).await?;
        wait_until_the_api_server_calls_kips(&cp.client()?, &probe)
            .await
            .with_context(|| format!("kips log:\n{}", kips.webhook.logs()))?;
        Ok(kips)
    }

    /// A fresh namespace this webhook is called for (scope label included), with `labels`.
    pub async fn namespace(
        &self,
        cp: &ControlPlane,
        prefix: &str,
        labels: &[(&str, &str)],
    ) -> Result<String> {
        let mut all = labels.to_vec();
        if let Some(scope) = &self.scope {
            all.push((SCOPE_LABEL, scope));
        }
        cp.create_namespace_with_labels(prefix, &all).await
    }

    /// The port the API server calls.
    pub fn port(&self) -> u16 {
        self.webhook.addr.port()
    }

    /// `kips_admission_requests_total`, by label set (`kind="Pod",operation="CREATE",...`).
    pub async fn admission_requests(&self) -> Result<BTreeMap<String, u64>> {
        let text = self
            .webhook
            .client(false)?
            .get(self.webhook.url("/metrics"))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        parse_counter(&text, "kips_admission_requests_total")
    }
}

/// The samples of one counter family in Prometheus text: label set -> value.
pub fn parse_counter(text: &str, name: &str) -> Result<BTreeMap<String, u64>> {
    let prefix = format!("{name}{{");
    let mut samples = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(&prefix) else {
            continue;
        };
        let (labels, value) = rest
            .rsplit_once("} ")
            .with_context(|| format!("unreadable sample {line:?}"))?;
        let value: f64 = value
            .trim()
            .parse()
            .with_context(|| format!("unreadable value in {line:?}"))?;
        samples.insert(labels.to_owned(), value as u64);
    }
    Ok(samples)
}

/// A kubelet stand-in: marks every pod of `ns` Running and Ready (pods/status), until dropped.
pub struct FakeKubelet(tokio::task::JoinHandle<()>);

impl FakeKubelet {
    /// Runs on the caller's tokio runtime.
    pub fn start(client: Client, ns: &str) -> Self {
        let api = Api::<Pod>::namespaced(client, ns);
        Self(tokio::spawn(async move {
            loop {
                if let Ok(pods) = api.list(&ListParams::default()).await {
                    for pod in pods {
                        if is_ready(&pod) || pod.metadata.deletion_timestamp.is_some() {
                            continue;
                        }
                        let now = k8s_openapi::jiff::Timestamp::now()
                            .strftime("%Y-%m-%dT%H:%M:%SZ")
                            .to_string();
                        let condition = |t: &str| json!({"type": t, "status": "True", "lastTransitionTime": now});
                        let status = json!({"status": {
                            "phase": "Running",
                            "conditions": [condition("Initialized"), condition("ContainersReady"), condition("Ready")]
                        }});
                        let _ = api
                            .patch_status(
                                &pod.name_any(),
                                &PatchParams::default(),
                                &Patch::Merge(&status),
                            )
                            .await;
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }))
    }
}

impl Drop for FakeKubelet {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// An object as a merge patch left it, and the API server's warnings (what `kubectl`
/// prints as `Warning: ...`; kips' own prefix is kept).
pub struct Annotated<K> {
    pub object: K,
    pub warnings: Vec<String>,
}

/// What `kubectl annotate <kind>/<name> k=v k2-` sends: a merge patch of
/// `metadata.annotations` (`None` removes the key). A refusal comes back as
/// [`kube::Error::Api`] with the API server's status, as from any kube call.
pub async fn annotate<K>(
    client: &Client,
    ns: &str,
    name: &str,
    changes: &[(&str, Option<&str>)],
) -> kube::Result<Annotated<K>>
where
    K: Resource<DynamicType = ()> + DeserializeOwned,
{
    let annotations: serde_json::Map<String, Value> = changes
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.map_or(Value::Null, Value::from)))
        .collect();
    let request = kube::core::Request::new(K::url_path(&(), Some(ns)))
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": annotations}})),
        )
        .map_err(kube::Error::BuildRequest)?;
    let response = client.send(request.map(kube::client::Body::from)).await?;
    let status = response.status();
    let warnings = response
        .headers()
        .get_all("warning")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(kips::parse_warning)
        .collect();
    let body = response.into_body().collect_bytes().await?;
    if !status.is_success() {
        let status: kube::core::Status =
            serde_json::from_slice(&body).map_err(kube::Error::SerdeError)?;
        return Err(kube::Error::Api(Box::new(status)));
    }
    Ok(Annotated {
        object: serde_json::from_slice(&body).map_err(kube::Error::SerdeError)?,
        warnings,
    })
}

/// A Deployment `name` of `replicas` pods labelled `app=<name>`, one container `app` with
/// port `http`=`port`, rolling one surge pod at a time (no pod goes before its successor
/// is ready).
pub fn deployment_json(name: &str, replicas: i32, port: i32) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "strategy": {"rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{
                    "name": "app",
                    "image": "registry.invalid/app:1",
                    "ports": [{"name": "http", "containerPort": port}]
                }]}
            }
        }
    })
}

/// [`deployment_json`] as a Deployment.
pub fn deployment(name: &str, replicas: i32, port: i32) -> Deployment {
    serde_json::from_value(deployment_json(name, replicas, port)).expect("a valid Deployment")
}

/// The relay Secret `kips-relay` (key `connectionString`) in `ns`.
pub async fn create_relay_secret(client: &Client, ns: &str, connection_string: &str) -> Result<()> {
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "kips-relay"},
        "stringData": {"connectionString": connection_string}
    }))?;
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &secret)
        .await?;
    Ok(())
}

/// Waits (60 s) until `deployment/name` has rolled out: `replicas` pods, all of the
/// current template, all available.
pub async fn wait_available(client: &Client, ns: &str, name: &str, replicas: i32) -> Result<()> {
    let api = Api::<Deployment>::namespaced(client.clone(), ns);
    eventually(
        &format!("deployment/{name} to have {replicas} available pods"),
        Duration::from_secs(60),
        || {
            let api = api.clone();
            async move {
                let d = api.get(name).await?;
                let observed =
                    d.status.as_ref().and_then(|s| s.observed_generation) == d.metadata.generation;
                let status = d.status.unwrap_or_default();
                Ok((observed
                    && status.available_replicas == Some(replicas)
                    && status.updated_replicas == Some(replicas)
                    && status.replicas == Some(replicas))
                .then_some(()))
            }
        },
    )
    .await
}

/// Pods of `ns` matching `selector` that are not being deleted.
pub async fn live_pods(client: &Client, ns: &str, selector: &str) -> Result<Vec<Pod>> {
    Ok(Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(selector))
        .await?
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect())
}

/// The API server's message of a refused request (fails on any other outcome).
pub fn api_error_message<T>(result: kube::Result<T>) -> Result<String> {
    match result {
        Err(kube::Error::Api(status)) => Ok(status.message),
        Err(other) => bail!("expected an API error, got {other:?}"),
        Ok(_) => bail!("expected the API server to refuse the request; it was accepted"),
    }
}
