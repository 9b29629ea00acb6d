//! `kips doctor [<kind>/<name>]`: what stands between the developer and a working redirect,
//! checked in order, each with its verdict and, when it fails, the fix.
//!
//! The judgements (`judge_*`) are pure functions of what was read; [`run_checks`] does the
//! reading, in order, and skips what cannot be checked once something it needs has failed.
//! [`render_table`] and the JSON form show the same [`Check`] list.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Event, Namespace, Node, Pod, Secret};
use kube::Api;
use kube::api::{ListParams, PostParams};
use rustls::pki_types::{CertificateDer, ServerName};
use serde::Serialize;
use serde_json::json;

use super::OutputFormat;
use super::rollout::{self, Snapshot, Verdict};
use crate::annotations::{
    BRIDGE_CONTAINER, INIT_CONTAINER, InjectionStatus, InvalidAnnotations, KipsAnnotations,
    PortMode, STATUS, is_kips_container,
};
use crate::bridge::DEFAULT_RELAY_SECRET;
use crate::bridge::secret::SecretState;
use crate::certs::trust::{check_trusted, check_trusted_chain};
use crate::inject::plan::resolve_port_mode;
use crate::k8s::{self, ClientSettings, K8sError, Kube, KubeTarget};
use crate::webhook::hooks::ENFORCE_LABEL;
use crate::workload::{Workload, WorkloadRef};

/// The webhook configuration the chart installs (its release name).
pub const DEFAULT_WEBHOOK_CONFIG: &str = "kips";
/// The image of the dry-run pod's container: never pulled, since nothing is created.
const PROBE_IMAGE: &str = "registry.k8s.io/pause:3.10";
const TLS_TIMEOUT: Duration = Duration::from_secs(5);

/// `kips doctor`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DoctorConfig {
    pub workload: Option<WorkloadRef>,
    pub webhook_config: String,
    pub output: OutputFormat,
    pub kube: KubeTarget,
}

/// `kips doctor` found something to fix.
#[derive(Debug, thiserror::Error)]
#[error("{failed} of {total} checks failed")]
pub struct DoctorFailed {
    pub failed: usize,
    pub total: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Pass,
    Fail,
    /// Not applicable, or not checkable (a permission, an earlier failure).
    Skip,
}

/// One check's verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub outcome: Outcome,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    fn pass(name: &'static str, detail: impl Into<String>) -> Self {
        Self {
            name,
            outcome: Outcome::Pass,
            detail: detail.into(),
            fix: None,
        }
    }

    fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            name,
            outcome: Outcome::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    fn skip(name: &'static str, detail: impl Into<String>) -> Self {
        Self {
            name,
            outcome: Outcome::Skip,
            detail: detail.into(),
            fix: None,
        }
    }
}

pub const KUBECONFIG: &str = "kubeconfig";
pub const API_SERVER: &str = "api-server";
pub const WEBHOOK_CONFIG: &str = "webhook-config";
pub const CA_BUNDLE: &str = "ca-bundle";
pub const WEBHOOK_ANSWERS: &str = "webhook-answers";
pub const POD_SECURITY: &str = "pod-security";
pub const RELAY_SECRET: &str = "relay-secret";
pub const IMAGES: &str = "images";
pub const ANNOTATIONS: &str = "annotations";
pub const PODS: &str = "pods";
pub const ROLLOUT: &str = "rollout";

/// The checks in the order they run; the last three only for a workload.
const ORDER: [&str; 11] = [
    KUBECONFIG,
    API_SERVER,
    WEBHOOK_CONFIG,
    CA_BUNDLE,
    WEBHOOK_ANSWERS,
    POD_SECURITY,
    RELAY_SECRET,
    IMAGES,
    ANNOTATIONS,
    PODS,
    ROLLOUT,
];
const WORKLOAD_CHECKS: [&str; 3] = [ANNOTATIONS, PODS, ROLLOUT];

/// Every check after `after`, skipped for `reason`.
fn skip_after(after: &str, workload: bool, reason: &str) -> Vec<Check> {
    ORDER
        .iter()
        .skip_while(|n| **n != after)
        .skip(1)
        .filter(|n| workload || !WORKLOAD_CHECKS.contains(n))
        .map(|n| Check::skip(n, reason))
        .collect()
}

// --- judgements (pure) -----------------------------------------------------------------

pub fn judge_kubeconfig(found: Result<&Kube, &K8sError>) -> Check {
    match found {
        Ok(kube) => Check::pass(
            KUBECONFIG,
            format!(
                "{}: server {}, namespace {}",
                kube.source(),
                kube.server,
                kube.namespace
            ),
        ),
        Err(error) => Check::fail(
            KUBECONFIG,
            error.to_string(),
            "point kips at your cluster: set KUBECONFIG or pass --kubeconfig PATH (and --context NAME); `kubectl config current-context` shows what kubectl uses",
        ),
    }
}

pub fn judge_api_server(server: &str, version: Result<&str, &K8sError>) -> Check {
    match version {
        Ok(version) => Check::pass(API_SERVER, format!("Kubernetes {version} at {server}")),
        Err(error) => Check::fail(
            API_SERVER,
            error.to_string(),
            format!(
                "make {server} reachable from here (VPN, the cluster running, the address in the kubeconfig) and the credentials current (`kubectl get --raw /version` must work)"
            ),
        ),
    }
}

pub fn judge_webhook_config(
    name: &str,
    found: Result<Option<&MutatingWebhookConfiguration>, &K8sError>,
) -> Check {
    match found {
        Ok(Some(config)) => {
            let webhooks: Vec<String> = config
                .webhooks
                .iter()
                .flatten()
                .map(|w| format!("{} ({})", w.name, endpoint(&w.client_config)))
                .collect();
            if webhooks.is_empty() {
                return Check::fail(
                    WEBHOOK_CONFIG,
                    format!("MutatingWebhookConfiguration {name} has no webhooks"),
                    "reinstall kips: helm upgrade --install kips charts/kips -n kips-system",
                );
            }
            Check::pass(
                WEBHOOK_CONFIG,
                format!(
                    "MutatingWebhookConfiguration {name}: {}",
                    webhooks.join(", ")
                ),
            )
        }
        Ok(None) => Check::fail(
            WEBHOOK_CONFIG,
            format!("there is no MutatingWebhookConfiguration {name}: kips is not installed"),
            format!(
                "install it once per cluster: helm install kips charts/kips -n kips-system --create-namespace (installed under another release name? kips doctor --webhook-config <name>; `kubectl get mutatingwebhookconfigurations` lists them; the default is {DEFAULT_WEBHOOK_CONFIG})"
            ),
        ),
        Err(error) => Check::fail(
            WEBHOOK_CONFIG,
            error.to_string(),
            "ask for `get` on mutatingwebhookconfigurations (admissionregistration.k8s.io), or have a cluster admin run kips doctor",
        ),
    }
}

fn endpoint(config: &k8s_openapi::api::admissionregistration::v1::WebhookClientConfig) -> String {
    match (&config.url, &config.service) {
        (Some(url), _) => url.clone(),
        (None, Some(service)) => format!(
            "service {}/{}:{}",
            service.namespace,
            service.name,
            service.port.unwrap_or(443)
        ),
        (None, None) => "no clientConfig".to_owned(),
    }
}

/// What one webhook's `caBundle` is checked against.
#[derive(Debug, Clone)]
pub struct WebhookTrust {
    pub webhook: String,
    /// PEM.
    pub bundle: String,
    /// The URL, or `service <ns>/<name>:<port>`.
    pub endpoint: String,
    /// The name the API server checks the certificate for.
    pub server_name: String,
    pub served: Served,
}

/// The certificate that the webhook serves, as far as the laptop can tell.
#[derive(Debug, Clone)]
pub enum Served {
    /// Read from the TLS handshake with the URL.
    Handshake(Vec<CertificateDer<'static>>),
    /// The connection failed: nothing answers at the URL.
    Unreachable(String),
    /// `tls.crt` of the webhook's certificate Secret (a Service the laptop cannot reach).
    Secret { secret: String, cert: String },
    /// The Secret could not be read (no permission, not there).
    SecretUnreadable { secret: String, error: String },
    /// The clientConfig names nothing kips can connect to.
    Unusable(String),
}

pub fn judge_ca_bundle(webhooks: &[WebhookTrust], now: SystemTime) -> Check {
    let mut passed = Vec::new();
    let mut failed = Vec::new();
    let mut fixes = BTreeSet::new();
    let mut unknown = Vec::new();
    for w in webhooks {
        let result = match &w.served {
            Served::Handshake(chain) => check_trusted_chain(&w.bundle, chain, &w.server_name, now),
            Served::Secret { cert, .. } => check_trusted(&w.bundle, cert, &w.server_name, now),
            Served::Unreachable(error) => {
                failed.push(format!(
                    "{}: nothing answers at {}: {error}",
                    w.webhook, w.endpoint
                ));
                fixes.insert(format!(
                    "start the webhook that {} names (the chart's pods: kubectl -n kips-system get pods; a webhook outside the cluster: kips webhook), or correct the URL",
                    w.endpoint
                ));
                continue;
            }
            Served::Unusable(problem) => {
                failed.push(format!("{}: {problem}", w.webhook));
                fixes.insert(
                    "give the webhook a clientConfig with an https:// url or a service (helm upgrade --install kips charts/kips ...)".to_owned(),
                );
                continue;
            }
            Served::SecretUnreadable { secret, error } => {
                unknown.push(format!(
                    "{}: {} is a Service the laptop cannot reach, and its certificate Secret {secret} could not be read ({error}); the dry run below tells whether the API server trusts it",
                    w.webhook, w.endpoint
                ));
                continue;
            }
        };
        let source = match &w.served {
            Served::Secret { secret, .. } => format!("the certificate in Secret {secret}"),
            _ => format!("what {} serves", w.endpoint),
        };
        match result {
            Ok(()) => passed.push(format!(
                "{}: its caBundle trusts {source} for {}",
                w.webhook, w.server_name
            )),
            Err(error) => {
                failed.push(format!(
                    "{}: its caBundle does not trust {source} for {}: {}",
                    w.webhook, w.server_name, error
                ));
                fixes.insert(match &w.served {
                    Served::Secret { .. } => "in certs.mode=self the webhook's replicas keep caBundle current: check that they run and read their logs (kubectl -n kips-system logs deploy/kips); `kips certs status -n kips-system` compares bundle and certificate".to_owned(),
                    _ => format!(
                        "put the CA that signed the certificate served at {} into the caBundle of {} (helm upgrade kips charts/kips --set-file webhook.caBundle=ca.crt ...), or serve a certificate that CA signed",
                        w.endpoint, w.webhook
                    ),
                });
            }
        }
    }
    if webhooks.is_empty() {
        return Check::skip(CA_BUNDLE, "no webhook to check");
    }
    if !failed.is_empty() {
        let mut lines = failed;
        lines.extend(passed);
        return Check::fail(
            CA_BUNDLE,
            lines.join("\n"),
            fixes.into_iter().collect::<Vec<_>>().join("\n"),
        );
    }
    if passed.is_empty() {
        return Check::skip(CA_BUNDLE, unknown.join("\n"));
    }
    passed.extend(unknown);
    Check::pass(CA_BUNDLE, passed.join("\n"))
}

/// What the API server made of the dry-run pod.
#[derive(Debug, Clone)]
pub enum DryRun {
    Admitted(Box<Pod>),
    /// The API server refused the pod: its status message.
    Refused(String),
    Failed(String),
}

pub fn judge_webhook_answers(namespace: &str, dry_run: &DryRun) -> Check {
    match dry_run {
        DryRun::Admitted(pod) => match injected_image(pod, BRIDGE_CONTAINER) {
            Some(image) => Check::pass(
                WEBHOOK_ANSWERS,
                format!(
                    "a dry-run pod annotated kips.io/redirect in namespace {namespace} came back with kips-bridge ({image})"
                ),
            ),
            None => Check::fail(
                WEBHOOK_ANSWERS,
                format!(
                    "a dry-run pod annotated kips.io/redirect in namespace {namespace} was admitted without kips-bridge: kips did not inject it"
                ),
                format!(
                    "either the webhook configuration does not apply to namespace {namespace} (its namespaceSelector leaves out kube-system, kube-node-lease and kips' own namespace; check `kubectl get mutatingwebhookconfiguration kips -o yaml`), or the webhook is unreachable and pods.kips.io has failurePolicy Ignore: check its pods (kubectl -n kips-system get pods)"
                ),
            ),
        },
        DryRun::Refused(message) => {
            // The API server's own words are all there is to tell causes apart; they only
            // choose the advice, the message is shown as it is.
            let lower = message.to_ascii_lowercase();
            let fix = if lower.contains("x509") || lower.contains("certificate") {
                "the API server does not trust the webhook's certificate: the caBundle of the webhook configuration must hold the CA that signed it (certs.mode=self: the webhook's replicas patch it, so check they run; cert-manager: the cainjector and the cert-manager.io/inject-ca-from annotation; provided: --set-file webhook.caBundle=ca.crt)"
            } else if lower.contains("failed calling webhook") {
                "the API server cannot reach the kips webhook: check that its pods are running and ready (kubectl -n kips-system get pods; kubectl -n kips-system logs deploy/kips) and that its Service has endpoints"
            } else if lower.contains("podsecurity") || lower.contains("violates") {
                "Pod Security refused even the no-privilege dry-run pod: see the pod-security check"
            } else {
                "read the API server's message above"
            };
            Check::fail(
                WEBHOOK_ANSWERS,
                format!(
                    "the API server refused a dry-run pod annotated kips.io/redirect in namespace {namespace}: {message}"
                ),
                fix,
            )
        }
        DryRun::Failed(error) => Check::fail(
            WEBHOOK_ANSWERS,
            format!("the dry run did not complete: {error}"),
            "ask for `create` on pods in this namespace (a dry run creates nothing), or run kips doctor where you may",
        ),
    }
}

/// The image of kips' container `name` in `pod`.
fn injected_image(pod: &Pod, name: &str) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    spec.init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .find(|c| c.name == name)
        .map(|c| c.image.clone().unwrap_or_default())
}

/// The port mode a workload's pods get, and how that was learnt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModeOf {
    pub mode: PortMode,
    pub because: String,
}

/// The port mode of a workload: what its injected pods recorded, else what its annotations
/// ask for with the `auto` rule the webhook applies.
pub fn port_mode_of(kips: &KipsAnnotations, pods: &[Pod]) -> Option<ModeOf> {
    let recorded = pods
        .iter()
        .filter_map(|p| p.metadata.annotations.as_ref()?.get(STATUS))
        .filter_map(|s| InjectionStatus::from_json(s))
        .find_map(|s| s.port_mode);
    if let Some(mode) = recorded.as_deref().and_then(|m| m.parse::<PortMode>().ok()) {
        return Some(ModeOf {
            mode,
            because: "recorded in its injected pods' kips.io/status".to_owned(),
        });
    }
    if kips.redirects.is_empty() {
        return None;
    }
    let requested = kips.port_mode.unwrap_or(PortMode::Auto);
    let mode = resolve_port_mode(requested, &kips.redirects);
    let because = match (kips.port_mode, mode) {
        (Some(PortMode::Auto) | None, PortMode::Iptables) => {
            "port mode auto picks iptables because a redirect names its port by number".to_owned()
        }
        (Some(PortMode::Auto) | None, _) => {
            "port mode auto picks named because every redirect names its port".to_owned()
        }
        (Some(explicit), _) => format!("kips.io/port-mode: {explicit}"),
    };
    Some(ModeOf { mode, because })
}

pub fn judge_pod_security(
    namespace: &str,
    level: Result<Option<&str>, &K8sError>,
    mode: Option<&ModeOf>,
    workload: Option<&str>,
) -> Check {
    let level = match level {
        Ok(level) => level,
        Err(error) => {
            return Check::skip(
                POD_SECURITY,
                format!("cannot read namespace {namespace}: {error}"),
            );
        }
    };
    let described = match level {
        Some(level) => format!("namespace {namespace} enforces Pod Security \"{level}\""),
        None => format!(
            "namespace {namespace} has no {ENFORCE_LABEL} label (the cluster's default level applies, privileged unless configured otherwise)"
        ),
    };
    let forbids_net_admin = matches!(level, Some("baseline" | "restricted"));
    match (mode, workload) {
        (Some(ModeOf { mode, because }), Some(workload))
            if *mode == PortMode::Iptables && forbids_net_admin =>
        {
            Check::fail(
                POD_SECURITY,
                format!(
                    "{described}, which rejects kips-init (NET_ADMIN and NET_RAW) of port mode iptables; {workload} gets iptables: {because}"
                ),
                format!(
                    "use port mode named, which needs no privilege: give the container port a name and redirect by name (kips redirect {workload} <relay>:<port name> --port-mode named -n {namespace}); or allow privileged pods: kubectl label namespace {namespace} {ENFORCE_LABEL}=privileged --overwrite"
                ),
            )
        }
        (Some(ModeOf { mode, because }), Some(workload)) => Check::pass(
            POD_SECURITY,
            format!("{described}; {workload} uses port mode {mode} ({because}), which it allows"),
        ),
        _ if forbids_net_admin => Check::pass(
            POD_SECURITY,
            format!(
                "{described}: port mode named only (iptables needs privileged); name a workload to check its mode"
            ),
        ),
        _ => Check::pass(
            POD_SECURITY,
            format!("{described}: both port modes are allowed"),
        ),
    }
}

pub fn judge_relay_secret(
    namespace: &str,
    name: &str,
    state: Result<SecretState, &K8sError>,
) -> Check {
    let create = format!(
        "kubectl create secret generic {name} -n {namespace} --from-literal=connectionString='Endpoint=sb://<relay namespace>.servicebus.windows.net/;SharedAccessKeyName=<rule>;SharedAccessKey=<key>'"
    );
    match state {
        Err(K8sError::Forbidden { message, .. }) => Check::skip(
            RELAY_SECRET,
            format!("not allowed to read Secret {name} in namespace {namespace}: {message}"),
        ),
        Err(error) => Check::skip(RELAY_SECRET, error.to_string()),
        Ok(state) => match state.warning(namespace, name) {
            None => Check::pass(
                RELAY_SECRET,
                format!(
                    "Secret {name} in namespace {namespace} has a connectionString (not shown), without a trailing newline"
                ),
            ),
            Some(warning) => {
                let fix = match state {
                    SecretState::Present { .. } => format!(
                        "recreate it from a literal, which has no newline: kubectl delete secret {name} -n {namespace}; {create}"
                    ),
                    SecretState::NoKey => format!(
                        "the key must be named connectionString: kubectl delete secret {name} -n {namespace}; {create}"
                    ),
                    SecretState::Missing => create,
                };
                Check::fail(
                    RELAY_SECRET,
                    warning
                        .strip_prefix("kips: ")
                        .unwrap_or(&warning)
                        .to_owned(),
                    fix,
                )
            }
        },
    }
}

/// What is known about the images kips injects.
#[derive(Debug, Clone, Default)]
pub struct ImageEvidence {
    /// (container, image) of kips' containers, from the workload's pods or the dry run.
    pub images: Vec<(String, String)>,
    /// Where they came from (`the dry-run pod`, `pod api-1`).
    pub from: String,
    /// Pull failures: (pod, container, image, reason, message).
    pub failures: Vec<PullFailure>,
    /// Images a pod's container started from: image → node.
    pub started: BTreeMap<String, String>,
    /// Image names each node holds (`None`: the nodes could not be listed).
    pub nodes: Option<Vec<(String, BTreeSet<String>)>>,
    /// Something the reader wants said (the kips-init image unknown until a pod exists).
    pub note: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullFailure {
    pub pod: String,
    pub container: String,
    pub image: String,
    pub reason: String,
    pub message: String,
}

/// Waiting reasons of a container whose image cannot be had.
const PULL_FAILURES: [&str; 4] = [
    "ErrImagePull",
    "ImagePullBackOff",
    "ErrImageNeverPull",
    "InvalidImageName",
];

pub fn judge_images(evidence: &ImageEvidence) -> Check {
    if !evidence.failures.is_empty() {
        let lines: Vec<String> = evidence
            .failures
            .iter()
            .map(|f| {
                format!(
                    "pod {}: {} cannot get image {}: {}{}",
                    f.pod,
                    f.container,
                    f.image,
                    f.reason,
                    if f.message.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", f.message)
                    }
                )
            })
            .collect();
        let images: BTreeSet<&str> = evidence.failures.iter().map(|f| f.image.as_str()).collect();
        return Check::fail(
            IMAGES,
            lines.join("\n"),
            format!(
                "publish {} where the nodes pull from, or point kips at images they can pull (chart: injection.bridgeImage / injection.initImage; kips webhook --bridge-image / --init-image); injected containers pull with the pod's imagePullSecrets",
                images.into_iter().collect::<Vec<_>>().join(", ")
            ),
        );
    }
    if evidence.images.is_empty() {
        return Check::skip(IMAGES, "no injected pod to read kips' images from");
    }
    let mut lines = Vec::new();
    for (container, image) in &evidence.images {
        let status = if let Some(node) = evidence.started.get(image) {
            format!("running on node {node}")
        } else {
            match &evidence.nodes {
                None => "the nodes could not be listed; the kubelet pulls it when a pod needs it"
                    .to_owned(),
                Some(nodes) if nodes.is_empty() => {
                    "no nodes yet; the kubelet pulls it when a pod needs it".to_owned()
                }
                Some(nodes) => {
                    let holding: Vec<&str> = nodes
                        .iter()
                        .filter(|(_, images)| images.contains(image))
                        .map(|(node, _)| node.as_str())
                        .collect();
                    if holding.is_empty() {
                        "not on any node yet; the kubelet will pull it".to_owned()
                    } else {
                        format!("present on {}", holding.join(", "))
                    }
                }
            }
        };
        lines.push(format!("{container} {image}: {status}"));
    }
    let mut detail = format!("{} (from {})", lines.join("; "), evidence.from);
    if let Some(note) = &evidence.note {
        detail.push_str("; ");
        detail.push_str(note);
    }
    Check::pass(IMAGES, detail)
}

pub fn judge_annotations(
    target: &WorkloadRef,
    namespace: &str,
    kips: Result<&KipsAnnotations, &InvalidAnnotations>,
) -> Check {
    match kips {
        Ok(kips) if kips.wants_injection() => {
            let rendered: Vec<String> = kips
                .render()
                .into_iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            Check::pass(ANNOTATIONS, rendered.join(" "))
        }
        Ok(_) => Check::fail(
            ANNOTATIONS,
            format!("{target} has no kips.io/redirect or kips.io/reverse: nothing is redirected"),
            format!("kips redirect {target} <relay>:<port> -n {namespace}"),
        ),
        Err(invalid) => Check::fail(
            ANNOTATIONS,
            invalid.to_string(),
            format!(
                "set a valid value, which kips checks before sending: kips redirect {target} <relay>:<port> -n {namespace} (or kubectl annotate {target} <key>=<value> --overwrite; values in the pod template belong to your manifests)"
            ),
        ),
    }
}

pub fn judge_pods(snap: &Snapshot) -> Check {
    let (injected, ready) = snap.counts(true);
    let desired = snap.desired;
    let counts = format!("{injected}/{desired} injected, {ready}/{desired} ready");
    if injected == desired && ready == desired && snap.current.len() == desired {
        return Check::pass(PODS, format!("{}: {counts}", snap.workload));
    }
    let mut detail = format!("{}: {counts}", snap.workload);
    if let Some(pod) = snap.current.iter().find(|p| !p.injected) {
        detail.push_str(&format!("; pod {} has no kips-bridge", pod.name));
    }
    if let Some(pod) = snap.current.iter().find(|p| p.problem.is_some()) {
        detail.push_str(&format!(
            "; pod {}: {}",
            pod.name,
            pod.problem.as_deref().unwrap_or_default()
        ));
    }
    Check::fail(
        PODS,
        detail,
        "see the rollout check; `kubectl describe pod <pod>` shows why a pod waits",
    )
}

pub fn judge_rollout(target: &WorkloadRef, namespace: &str, verdict: &Verdict) -> Check {
    match verdict {
        Verdict::Done(message) => Check::pass(ROLLOUT, format!("complete: {message}")),
        Verdict::Waiting(message) => Check::fail(
            ROLLOUT,
            format!("in progress: {message}"),
            format!(
                "wait for it to finish: kips redirect {target} <redirects> --wait, or watch kips status -n {namespace}"
            ),
        ),
        Verdict::Failed(message) => Check::fail(
            ROLLOUT,
            message.clone(),
            "fix what the message names; the checks above point at the usual causes",
        ),
    }
}

/// `(host, port)` of an `https://` URL (IPv6 in brackets); `None` when it is not one.
pub fn url_host_port(url: &str) -> Option<(String, u16)> {
    let rest = url.strip_prefix("https://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    if let Some(bracketed) = authority.strip_prefix('[') {
        let (host, after) = bracketed.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(port) => port.parse().ok()?,
            None if after.is_empty() => 443,
            None => return None,
        };
        return Some((host.to_owned(), port));
    }
    match authority.rsplit_once(':') {
        Some((host, port)) => Some((host.to_owned(), port.parse().ok()?)),
        None if !authority.is_empty() => Some((authority.to_owned(), 443)),
        None => None,
    }
}

/// The checks as a table: one line each, details and fixes indented under it.
pub fn render_table(title: &str, checks: &[Check]) -> String {
    let mut out = format!("{title}\n");
    let width = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
    for check in checks {
        let mark = match check.outcome {
            Outcome::Pass => "ok  ",
            Outcome::Fail => "FAIL",
            Outcome::Skip => "skip",
        };
        let mut lines = check.detail.lines();
        let first = lines.next().unwrap_or_default();
        let _ = writeln!(out, "  {mark}  {:width$}  {first}", check.name);
        let indent = " ".repeat(width + 10);
        for line in lines {
            let _ = writeln!(out, "{indent}{line}");
        }
        if let Some(fix) = &check.fix {
            for (i, line) in fix.lines().enumerate() {
                let lead = if i == 0 { "fix: " } else { "     " };
                let _ = writeln!(out, "{indent}{lead}{line}");
            }
        }
    }
    out.push_str(&summary(checks));
    out.push('\n');
    out
}

/// `all 8 checks passed` or `2 of 11 checks failed (7 passed, 2 skipped)`.
pub fn summary(checks: &[Check]) -> String {
    let count = |o: Outcome| checks.iter().filter(|c| c.outcome == o).count();
    let (passed, failed, skipped) = (
        count(Outcome::Pass),
        count(Outcome::Fail),
        count(Outcome::Skip),
    );
    let total = checks.len();
    match (failed, skipped) {
        (0, 0) => format!("all {total} checks passed"),
        (0, _) => format!("no check failed ({passed} passed, {skipped} skipped)"),
        _ => format!("{failed} of {total} checks failed ({passed} passed, {skipped} skipped)"),
    }
}

// --- reading (I/O) ----------------------------------------------------------------------

pub async fn run(config: DoctorConfig) -> anyhow::Result<()> {
    let (title, namespace, checks) = run_checks(&config).await;
    match config.output {
        OutputFormat::Table => print!("{}", render_table(&title, &checks)),
        OutputFormat::Json => {
            let value = json!({
                "namespace": namespace,
                "workload": config.workload.as_ref().map(ToString::to_string),
                "webhookConfiguration": config.webhook_config,
                "ok": !checks.iter().any(|c| c.outcome == Outcome::Fail),
                "checks": checks,
            });
            println!("{}", serde_json::to_string_pretty(&value)?);
        }
    }
    let failed = checks.iter().filter(|c| c.outcome == Outcome::Fail).count();
    if failed > 0 {
        return Err(DoctorFailed {
            failed,
            total: checks.len(),
        }
        .into());
    }
    Ok(())
}

/// Reads and judges, in order. Returns the title, the namespace and the checks.
pub async fn run_checks(config: &DoctorConfig) -> (String, Option<String>, Vec<Check>) {
    let workload = config.workload.as_ref();
    let with_workload = workload.is_some();
    let mut checks = Vec::new();
    let title_for = |ns: &str| match workload {
        Some(w) => format!("kips doctor: namespace {ns}, {w}"),
        None => format!("kips doctor: namespace {ns}"),
    };

    let kube = match k8s::connect(&ClientSettings::diagnostic(config.kube.clone())).await {
        Ok(kube) => kube,
        Err(error) => {
            checks.push(judge_kubeconfig(Err(&error)));
            checks.extend(skip_after(
                KUBECONFIG,
                with_workload,
                "needs a Kubernetes configuration",
            ));
            return ("kips doctor".to_owned(), None, checks);
        }
    };
    let ns = kube.namespace.clone();
    let title = title_for(&ns);
    checks.push(judge_kubeconfig(Ok(&kube)));

    let version = kube
        .client
        .apiserver_version()
        .await
        .map(|v| v.git_version)
        .map_err(|e| kube.unreachable(&e));
    checks.push(judge_api_server(&kube.server, version.as_deref()));
    if version.is_err() {
        checks.extend(skip_after(
            API_SERVER,
            with_workload,
            "needs the API server",
        ));
        return (title, Some(ns), checks);
    }

    // The webhook configuration and its caBundle.
    let name = &config.webhook_config;
    let found = Api::<MutatingWebhookConfiguration>::all(kube.client.clone())
        .get_opt(name)
        .await
        .map_err(|e| kube.explain(e, &format!("MutatingWebhookConfiguration {name}")));
    checks.push(judge_webhook_config(
        name,
        found.as_ref().map(Option::as_ref),
    ));
    match &found {
        Ok(Some(webhook_config)) => {
            let trust = read_trust(&kube, webhook_config).await;
            checks.push(judge_ca_bundle(&trust, SystemTime::now()));
        }
        _ => checks.push(Check::skip(CA_BUNDLE, "no webhook configuration to read")),
    }

    // Does something inject? A dry run creates nothing.
    let dry_run = dry_run(&kube).await;
    checks.push(judge_webhook_answers(&ns, &dry_run));
    let probe = match &dry_run {
        DryRun::Admitted(pod) => Some(pod.as_ref().clone()),
        _ => None,
    };

    // The workload, its pods and what its pods get.
    let observed = match workload {
        Some(target) => Some(rollout::observe(&kube, target).await),
        None => None,
    };
    let (object, pods) = match &observed {
        Some(Ok(o)) => (Some(&o.object), o.pods.as_slice()),
        _ => (None, &[][..]),
    };
    let kips = object.map(Workload::kips);
    let mode = match &kips {
        Some(Ok(k)) => port_mode_of(k, pods),
        _ => None,
    };

    let level = Api::<Namespace>::all(kube.client.clone())
        .get_metadata(&ns)
        .await
        .map(|n| {
            n.metadata
                .labels
                .and_then(|l| l.get(ENFORCE_LABEL).cloned())
        })
        .map_err(|e| kube.explain(e, &format!("namespace {ns}")));
    checks.push(judge_pod_security(
        &ns,
        level.as_ref().map(Option::as_deref),
        mode.as_ref(),
        workload.map(ToString::to_string).as_deref(),
    ));

    let secret_name = match object {
        Some(object) => rollout::relay_secret_name(object, pods),
        None => rollout::relay_secret_of_pods(probe.as_slice())
            .unwrap_or_else(|| DEFAULT_RELAY_SECRET.to_owned()),
    };
    let state = kube
        .api::<Secret>()
        .get_opt(&secret_name)
        .await
        .map(|found| SecretState::of(found.as_ref().map(|s| s.data.as_ref())))
        .map_err(|e| kube.explain(e, &format!("Secret {secret_name}")));
    checks.push(judge_relay_secret(
        &ns,
        &secret_name,
        state.as_ref().copied(),
    ));

    let evidence = image_evidence(&kube, pods, probe.as_ref(), mode.as_ref()).await;
    checks.push(judge_images(&evidence));

    if let Some(target) = workload {
        match observed {
            Some(Ok(observed)) => {
                let kips = kips.expect("read with the workload");
                checks.push(judge_annotations(target, &ns, kips.as_ref()));
                let rejected =
                    rollout::rejection_event(&kube, &observed.object, jiff_epoch()).await;
                let mut snap = rollout::snapshot(
                    &observed.object,
                    &observed.replica_sets,
                    &observed.pods,
                    None,
                    rejected,
                );
                if let Ok(SecretState::Missing) = state {
                    snap.secret_missing =
                        Some(format!("the relay Secret \"{secret_name}\" does not exist"));
                }
                match &kips {
                    Ok(k) if k.wants_injection() => {
                        checks.push(judge_pods(&snap));
                        checks.push(judge_rollout(target, &ns, &rollout::assess(&snap, true)));
                    }
                    _ => {
                        checks.push(Check::skip(PODS, "nothing to inject"));
                        checks.push(Check::skip(ROLLOUT, "nothing to roll out"));
                    }
                }
            }
            Some(Err(error)) => {
                checks.push(Check::fail(
                    ANNOTATIONS,
                    error.to_string(),
                    format!("name a workload that exists: kubectl get deployments,statefulsets,daemonsets -n {ns}"),
                ));
                checks.push(Check::skip(PODS, "no workload"));
                checks.push(Check::skip(ROLLOUT, "no workload"));
            }
            None => {}
        }
    }
    (title, Some(ns), checks)
}

/// Events since the epoch: every `FailedCreate` event still kept counts.
fn jiff_epoch() -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::UNIX_EPOCH
}

/// The dry-run pod: annotated for kips in named mode, with a container that passes Pod
/// Security `restricted`, so only the webhook decides what happens to it.
fn probe_pod() -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "kips-doctor-",
            "labels": {"app.kubernetes.io/name": "kips-doctor"},
            "annotations": {"kips.io/redirect": "kips-doctor:http", "kips.io/port-mode": "named"}
        },
        "spec": {
            "automountServiceAccountToken": false,
            "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "app",
                "image": PROBE_IMAGE,
                "ports": [{"name": "http", "containerPort": 8080}],
                "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}
            }]
        }
    }))
    .expect("a valid pod")
}

async fn dry_run(kube: &Kube) -> DryRun {
    let params = PostParams {
        dry_run: true,
        ..Default::default()
    };
    match kube.api::<Pod>().create(&params, &probe_pod()).await {
        Ok(pod) => DryRun::Admitted(Box::new(pod)),
        Err(kube::Error::Api(status)) if status.code != 403 => DryRun::Refused(status.message),
        Err(error) => DryRun::Failed(kube.explain(error, "a dry-run pod").to_string()),
    }
}

/// For each webhook: its bundle and what it serves, read from the URL or from its
/// certificate Secret.
async fn read_trust(kube: &Kube, config: &MutatingWebhookConfiguration) -> Vec<WebhookTrust> {
    let mut out = Vec::new();
    for webhook in config.webhooks.iter().flatten() {
        let client_config = &webhook.client_config;
        let bundle = client_config
            .ca_bundle
            .as_ref()
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            .unwrap_or_default();
        let endpoint = endpoint(client_config);
        let (server_name, served) = match (&client_config.url, &client_config.service) {
            (Some(url), _) => match url_host_port(url) {
                Some((host, port)) => {
                    let served = match fetch_chain(host.clone(), port).await {
                        Ok(chain) => Served::Handshake(chain),
                        Err(error) => Served::Unreachable(error.to_string()),
                    };
                    (host, served)
                }
                None => (
                    url.clone(),
                    Served::Unusable(format!("its url {url} is not an https:// URL")),
                ),
            },
            (None, Some(service)) => {
                let secret = format!("{}-webhook-tls", service.name);
                let server_name = format!("{}.{}.svc", service.name, service.namespace);
                let read = kube
                    .in_namespace(&service.namespace)
                    .api::<Secret>()
                    .get(&secret)
                    .await
                    .map_err(|e| {
                        kube.in_namespace(&service.namespace)
                            .explain(e, &format!("Secret {secret}"))
                            .to_string()
                    });
                let served = match read {
                    Ok(s) => match s.data.as_ref().and_then(|d| d.get("tls.crt")) {
                        Some(cert) => Served::Secret {
                            secret: format!("{}/{secret}", service.namespace),
                            cert: String::from_utf8_lossy(&cert.0).into_owned(),
                        },
                        None => Served::SecretUnreadable {
                            secret: format!("{}/{secret}", service.namespace),
                            error: "it has no tls.crt".to_owned(),
                        },
                    },
                    Err(error) => Served::SecretUnreadable {
                        secret: format!("{}/{secret}", service.namespace),
                        error,
                    },
                };
                (server_name, served)
            }
            (None, None) => (
                String::new(),
                Served::Unusable("its clientConfig has neither url nor service".to_owned()),
            ),
        };
        out.push(WebhookTrust {
            webhook: webhook.name.clone(),
            bundle,
            endpoint,
            server_name,
            served,
        });
    }
    out
}

/// Why the served chain could not be read.
#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("connecting to {address}: {error}")]
    Connect {
        address: String,
        error: std::io::Error,
    },
    #[error("TLS handshake with {address}: {error}")]
    Handshake {
        address: String,
        error: std::io::Error,
    },
    #[error("{0:?} is not a host name or address")]
    Name(String),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("the server sent no certificate")]
    NoCertificate,
    #[error("the handshake did not finish: {0}")]
    Join(String),
}

/// Completes a TLS handshake with `host:port`, accepting any certificate, and returns the
/// chain it was given: the trust decision is made afterwards against the caBundle.
async fn fetch_chain(host: String, port: u16) -> Result<Vec<CertificateDer<'static>>, FetchError> {
    tokio::task::spawn_blocking(move || fetch_chain_blocking(&host, port))
        .await
        .map_err(|e| FetchError::Join(e.to_string()))?
}

fn fetch_chain_blocking(host: &str, port: u16) -> Result<Vec<CertificateDer<'static>>, FetchError> {
    use std::net::ToSocketAddrs;
    let address = format!("{host}:{port}");
    let connect_error = |error| FetchError::Connect {
        address: address.clone(),
        error,
    };
    let target = (host, port)
        .to_socket_addrs()
        .map_err(connect_error)?
        .next()
        .ok_or_else(|| FetchError::Name(host.to_owned()))?;
    let mut tcp =
        std::net::TcpStream::connect_timeout(&target, TLS_TIMEOUT).map_err(connect_error)?;
    tcp.set_read_timeout(Some(TLS_TIMEOUT))
        .map_err(connect_error)?;
    tcp.set_write_timeout(Some(TLS_TIMEOUT))
        .map_err(connect_error)?;
    let provider = crate::tls::provider();
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(RecordOnly(provider)))
        .with_no_client_auth();
    let name =
        ServerName::try_from(host.to_owned()).map_err(|_| FetchError::Name(host.to_owned()))?;
    let mut tls = rustls::ClientConnection::new(Arc::new(config), name)?;
    while tls.is_handshaking() {
        tls.complete_io(&mut tcp)
            .map_err(|error| FetchError::Handshake {
                address: address.clone(),
                error,
            })?;
    }
    let chain = tls
        .peer_certificates()
        .ok_or(FetchError::NoCertificate)?
        .iter()
        .map(|c| c.clone().into_owned())
        .collect();
    tls.send_close_notify();
    let _ = tls.complete_io(&mut tcp);
    Ok(chain)
}

/// Accepts any certificate (with valid signatures on the handshake): `kips doctor` reads the
/// chain to judge it against the caBundle itself, and sends nothing over the connection.
#[derive(Debug)]
struct RecordOnly(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for RecordOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// kips' images and what is known of them: from the workload's injected pods (their specs,
/// container statuses and events), else from the dry-run pod; and the nodes' image lists.
async fn image_evidence(
    kube: &Kube,
    pods: &[Pod],
    probe: Option<&Pod>,
    mode: Option<&ModeOf>,
) -> ImageEvidence {
    let injected: Vec<&Pod> = pods
        .iter()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_none()
                && p.metadata
                    .annotations
                    .as_ref()
                    .is_some_and(|a| a.contains_key(STATUS))
        })
        .collect();
    let mut evidence = ImageEvidence::default();
    let mut seen = BTreeSet::new();
    let mut add_images = |evidence: &mut ImageEvidence, pod: &Pod| {
        for name in [BRIDGE_CONTAINER, INIT_CONTAINER] {
            if let Some(image) = injected_image(pod, name)
                && seen.insert((name, image.clone()))
            {
                evidence.images.push((name.to_owned(), image));
            }
        }
    };
    if injected.is_empty() {
        if let Some(probe) = probe {
            add_images(&mut evidence, probe);
            evidence.from = "the dry-run pod".to_owned();
            if mode.is_some_and(|m| m.mode == PortMode::Iptables) {
                evidence.note = Some(
                    "kips-init's image (iptables mode) shows here once a pod is injected".into(),
                );
            }
        }
    } else {
        for pod in &injected {
            add_images(&mut evidence, pod);
        }
        evidence.from = format!(
            "pod{} {}",
            if injected.len() == 1 { "" } else { "s" },
            injected
                .iter()
                .filter_map(|p| p.metadata.name.as_deref())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    for pod in &injected {
        let pod_name = pod.metadata.name.clone().unwrap_or_default();
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        let Some(status) = &pod.status else { continue };
        for container in status
            .init_container_statuses
            .iter()
            .flatten()
            .chain(status.container_statuses.iter().flatten())
            .filter(|c| is_kips_container(&c.name))
        {
            let image = injected_image(pod, &container.name).unwrap_or(container.image.clone());
            let state = container.state.as_ref();
            if let Some(waiting) = state.and_then(|s| s.waiting.as_ref())
                && let Some(reason) = waiting.reason.as_deref()
                && PULL_FAILURES.contains(&reason)
            {
                evidence.failures.push(PullFailure {
                    pod: pod_name.clone(),
                    container: container.name.clone(),
                    image: image.clone(),
                    reason: reason.to_owned(),
                    message: waiting.message.clone().unwrap_or_default(),
                });
            } else if state.is_some_and(|s| s.running.is_some() || s.terminated.is_some())
                && !node.is_empty()
            {
                evidence.started.insert(image, node.clone());
            }
        }
    }
    // The kubelet's events name the container in fieldPath: `spec.initContainers{kips-bridge}`.
    if !injected.is_empty() {
        let events = kube
            .api::<Event>()
            .list(&ListParams::default().fields("involvedObject.kind=Pod"))
            .await
            .map(|l| l.items)
            .unwrap_or_default();
        for event in events {
            let reason = event.reason.clone().unwrap_or_default();
            if !matches!(reason.as_str(), "Failed" | "ErrImageNeverPull" | "BackOff") {
                continue;
            }
            let object = &event.involved_object;
            let Some(pod) = injected
                .iter()
                .find(|p| p.metadata.name.is_some() && p.metadata.name == object.name)
            else {
                continue;
            };
            let Some(container) = object
                .field_path
                .as_deref()
                .and_then(container_of_field_path)
            else {
                continue;
            };
            let message = event.message.clone().unwrap_or_default();
            let pod_name = pod.metadata.name.clone().unwrap_or_default();
            if !is_kips_container(container)
                || !message.to_ascii_lowercase().contains("image")
                || evidence
                    .failures
                    .iter()
                    .any(|f| f.pod == pod_name && f.container == container)
            {
                continue;
            }
            evidence.failures.push(PullFailure {
                pod: pod_name,
                container: container.to_owned(),
                image: injected_image(pod, container).unwrap_or_default(),
                reason,
                message,
            });
        }
    }
    evidence.nodes = Api::<Node>::all(kube.client.clone())
        .list(&ListParams::default())
        .await
        .ok()
        .map(|nodes| {
            nodes
                .items
                .into_iter()
                .map(|n| {
                    let images = n
                        .status
                        .and_then(|s| s.images)
                        .into_iter()
                        .flatten()
                        .flat_map(|i| i.names.unwrap_or_default())
                        .collect();
                    (n.metadata.name.unwrap_or_default(), images)
                })
                .collect()
        });
    evidence
}

/// `kips-bridge` of `spec.initContainers{kips-bridge}`.
fn container_of_field_path(path: &str) -> Option<&str> {
    let (_, rest) = path.split_once('{')?;
    rest.strip_suffix('}')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls;

    fn pod_with_bridge(image: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "kips-doctor-x"},
            "spec": {"containers": [{"name": "app"}], "initContainers": [{"name": "kips-bridge", "image": image}]}
        }))
        .unwrap()
    }

    #[test]
    fn urls_give_host_and_port() {
        assert_eq!(
            url_host_port("https://127.0.0.1:8443/mutate"),
            Some(("127.0.0.1".into(), 8443))
        );
        assert_eq!(
            url_host_port("https://kips.example.com/mutate?x=1"),
            Some(("kips.example.com".into(), 443))
        );
        assert_eq!(
            url_host_port("https://[::1]:9443/m"),
            Some(("::1".into(), 9443))
        );
        assert_eq!(url_host_port("http://x/"), None);
        assert_eq!(url_host_port("https://x:port/"), None);
    }

    #[test]
    fn the_ca_bundle_must_trust_what_is_served() {
        let ca = tls::generate_ca("ca", Duration::from_secs(3600)).unwrap();
        let other = tls::generate_ca("other", Duration::from_secs(3600)).unwrap();
        let pair =
            tls::issue_serving_cert(&ca, &["127.0.0.1".to_owned()], Duration::from_secs(600))
                .unwrap();
        let trust = |bundle: &str, served: Served| WebhookTrust {
            webhook: "pods.kips.io".into(),
            bundle: bundle.to_owned(),
            endpoint: "https://127.0.0.1:8443/mutate".into(),
            server_name: "127.0.0.1".into(),
            served,
        };
        let served = || Served::Secret {
            secret: "kips-system/kips-webhook-tls".into(),
            cert: pair.cert.clone(),
        };
        let now = SystemTime::now();
        let check = judge_ca_bundle(&[trust(&ca.cert, served())], now);
        assert_eq!(check.outcome, Outcome::Pass, "{check:?}");
        let check = judge_ca_bundle(&[trust(&other.cert, served())], now);
        assert_eq!(check.outcome, Outcome::Fail);
        assert!(check.detail.contains("does not trust"), "{check:?}");
        assert!(check.fix.unwrap().contains("certs.mode=self"));
        let check = judge_ca_bundle(
            &[trust(
                &ca.cert,
                Served::Unreachable("connection refused".into()),
            )],
            now,
        );
        assert_eq!(check.outcome, Outcome::Fail);
        assert!(check.detail.contains("nothing answers"), "{check:?}");
        let check = judge_ca_bundle(
            &[trust(
                &ca.cert,
                Served::SecretUnreadable {
                    secret: "s".into(),
                    error: "forbidden".into(),
                },
            )],
            now,
        );
        assert_eq!(check.outcome, Outcome::Skip);
    }

    #[test]
    fn the_dry_run_tells_injection_refusal_and_silence_apart() {
        let check =
            judge_webhook_answers("dev", &DryRun::Admitted(Box::new(pod_with_bridge("b:1"))));
        assert_eq!(check.outcome, Outcome::Pass);
        assert!(check.detail.contains("(b:1)"));
        let mut plain = pod_with_bridge("b:1");
        plain.spec.as_mut().unwrap().init_containers = None;
        let check = judge_webhook_answers("dev", &DryRun::Admitted(Box::new(plain)));
        assert_eq!(check.outcome, Outcome::Fail);
        let x509 = "Internal error occurred: failed calling webhook \"pods.kips.io\": failed to call webhook: Post \"https://127.0.0.1:1/mutate?timeout=5s\": tls: failed to verify certificate: x509: certificate signed by unknown authority";
        let check = judge_webhook_answers("dev", &DryRun::Refused(x509.into()));
        assert!(
            check
                .fix
                .unwrap()
                .contains("does not trust the webhook's certificate")
        );
        let refused = "Internal error occurred: failed calling webhook \"pods.kips.io\": failed to call webhook: Post \"https://127.0.0.1:1/mutate?timeout=5s\": dial tcp 127.0.0.1:1: connect: connection refused";
        let check = judge_webhook_answers("dev", &DryRun::Refused(refused.into()));
        assert!(check.detail.contains("connection refused"));
        assert!(check.fix.unwrap().contains("cannot reach the kips webhook"));
    }

    #[test]
    fn pod_security_fails_iptables_where_net_admin_is_forbidden() {
        let kips = KipsAnnotations::parse([("kips.io/redirect", "api:8080")]).unwrap();
        let mode = port_mode_of(&kips, &[]).unwrap();
        assert_eq!(mode.mode, PortMode::Iptables);
        assert!(mode.because.contains("auto picks iptables"));
        let check = judge_pod_security(
            "dev",
            Ok(Some("restricted")),
            Some(&mode),
            Some("deployment/api"),
        );
        assert_eq!(check.outcome, Outcome::Fail);
        assert!(check.fix.unwrap().contains("--port-mode named"));
        for level in [Some("privileged"), None] {
            let check = judge_pod_security("dev", Ok(level), Some(&mode), Some("deployment/api"));
            assert_eq!(check.outcome, Outcome::Pass, "{check:?}");
        }
        let named = KipsAnnotations::parse([("kips.io/redirect", "api:http")]).unwrap();
        let mode = port_mode_of(&named, &[]).unwrap();
        assert_eq!(mode.mode, PortMode::Named);
        let check = judge_pod_security(
            "dev",
            Ok(Some("restricted")),
            Some(&mode),
            Some("deployment/api"),
        );
        assert_eq!(check.outcome, Outcome::Pass);
        // What injected pods record wins over the annotation.
        let pod: Pod = serde_json::from_value(json!({"metadata": {"annotations": {
            STATUS: "{\"version\":\"0\",\"portMode\":\"named\",\"sidecar\":\"native\"}"}}}))
        .unwrap();
        assert_eq!(port_mode_of(&kips, &[pod]).unwrap().mode, PortMode::Named);
    }

    #[test]
    fn relay_secret_failures_name_the_fix() {
        let check = judge_relay_secret("dev", "kips-relay", Ok(SecretState::Missing));
        assert_eq!(check.outcome, Outcome::Fail);
        assert!(
            check
                .detail
                .starts_with("the relay Secret \"kips-relay\" does not exist")
        );
        assert!(
            check
                .fix
                .unwrap()
                .starts_with("kubectl create secret generic kips-relay -n dev")
        );
        let check = judge_relay_secret(
            "dev",
            "kips-relay",
            Ok(SecretState::Present {
                trailing_whitespace: true,
            }),
        );
        assert!(check.detail.contains("ends in a newline"));
        let check = judge_relay_secret(
            "dev",
            "kips-relay",
            Ok(SecretState::Present {
                trailing_whitespace: false,
            }),
        );
        assert_eq!(check.outcome, Outcome::Pass);
    }

    #[test]
    fn image_pull_failures_name_the_image() {
        let evidence = ImageEvidence {
            images: vec![("kips-bridge".into(), "b:1".into())],
            from: "pod api-1".into(),
            failures: vec![PullFailure {
                pod: "api-1".into(),
                container: "kips-bridge".into(),
                image: "b:1".into(),
                reason: "ImagePullBackOff".into(),
                message: "Back-off pulling image \"b:1\"".into(),
            }],
            ..Default::default()
        };
        let check = judge_images(&evidence);
        assert_eq!(check.outcome, Outcome::Fail);
        assert!(
            check
                .detail
                .contains("kips-bridge cannot get image b:1: ImagePullBackOff")
        );
        let evidence = ImageEvidence {
            failures: vec![],
            nodes: Some(vec![
                ("n1".into(), BTreeSet::from(["b:1".to_owned()])),
                ("n2".into(), BTreeSet::new()),
            ]),
            ..evidence
        };
        let check = judge_images(&evidence);
        assert_eq!(check.outcome, Outcome::Pass);
        assert!(check.detail.contains("present on n1"), "{check:?}");
        let evidence = ImageEvidence {
            nodes: Some(vec![("n2".into(), BTreeSet::new())]),
            ..evidence
        };
        assert!(
            judge_images(&evidence)
                .detail
                .contains("not on any node yet; the kubelet will pull it")
        );
    }

    #[test]
    fn the_table_indents_details_and_fixes_and_sums_up() {
        let checks = vec![
            Check::pass(KUBECONFIG, "kubeconfig"),
            Check::fail(RELAY_SECRET, "missing\nsecond line", "create it"),
            Check::skip(IMAGES, "no pod"),
        ];
        let table = render_table("kips doctor: namespace dev", &checks);
        assert_eq!(
            table,
            "kips doctor: namespace dev\n  ok    kubeconfig    kubeconfig\n  FAIL  relay-secret  missing\n                      second line\n                      fix: create it\n  skip  images        no pod\n1 of 3 checks failed (1 passed, 1 skipped)\n"
        );
        assert_eq!(
            summary(&[Check::pass(KUBECONFIG, "")]),
            "all 1 checks passed"
        );
        let skipped = skip_after(API_SERVER, false, "needs the API server");
        assert_eq!(skipped.len(), 6);
        assert_eq!(skipped[0].name, WEBHOOK_CONFIG);
        assert_eq!(skip_after(API_SERVER, true, "x").len(), 9);
    }
}
