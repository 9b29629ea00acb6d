//! The judgements of `kips doctor`: pure functions from what was read to a [`Check`].

use super::*;

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

pub(super) fn endpoint(
    config: &k8s_openapi::api::admissionregistration::v1::WebhookClientConfig,
) -> String {
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
pub(super) fn injected_image(pod: &Pod, name: &str) -> Option<String> {
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
pub(super) const PULL_FAILURES: [&str; 4] = [
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
