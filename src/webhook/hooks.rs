//! The webhook's cluster hooks ([`ClusterHooks`]): what kips can only know by asking the API
//! server, and what it tells users through it.
//!
//! - Admission warnings at `kubectl annotate` time, for what would go wrong later: the relay
//!   Secret does not exist in the namespace; iptables mode in a namespace whose Pod Security
//!   level (`pod-security.kubernetes.io/enforce`) forbids NET_ADMIN. Lookups are bounded
//!   (300 ms each, in parallel) and cached briefly; a failed lookup gives no warning (logged).
//! - A Kubernetes Event on the workload when redirection goes on, off, or changes; never for
//!   dry-run requests, and published after the response, without delaying it.
//!
//! RBAC these calls need: `get` on secrets (metadata only is read) and namespaces (without
//! them, no warning); `create` and `patch` on events.k8s.io events; `get` on apps
//! deployments/statefulsets/daemonsets (without it, Events name the workload without its uid
//! and with a generic message).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use k8s_openapi::api::core::v1::{Namespace, ObjectReference, Secret};
use kube::Api;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

use super::review::{Decision, RequestInfo, Reviewed};
use super::server::{BoxFuture, ClusterHooks};
use crate::annotations::KipsAnnotations;
use crate::bridge::secret::SecretState;
use crate::inject::{Effect, PodNeeds};
use crate::k8s::{self, ClientSettings, Kube};
use crate::workload::WorkloadKind;

/// The label Pod Security Admission enforces.
pub const ENFORCE_LABEL: &str = "pod-security.kubernetes.io/enforce";
/// How long one lookup may delay an admission response.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_millis(300);
const SECRET_FOUND_TTL: Duration = Duration::from_secs(10);
const SECRET_MISSING_TTL: Duration = Duration::from_secs(2);
const NAMESPACE_TTL: Duration = Duration::from_secs(5);
/// The `reportingController` of kips' Events.
pub const REPORTING_CONTROLLER: &str = "kips.io/webhook";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HooksMode {
    /// On when a cluster is configured (in-cluster service account, $KUBECONFIG, or
    /// --kubeconfig); off otherwise.
    Auto,
    /// On; the webhook refuses to start without a usable cluster configuration.
    On,
    /// Off: no warnings that need the cluster, no Events.
    Off,
}

/// The cluster hooks of `kips webhook`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HooksConfig {
    pub mode: HooksMode,
    /// Default: in-cluster, then $KUBECONFIG.
    pub kubeconfig: Option<PathBuf>,
}

/// Builds the hooks as `config` says. Fast: nothing is sent to the API server here.
pub async fn hooks(config: &HooksConfig) -> Result<Option<Arc<dyn ClusterHooks>>> {
    let configured = config.kubeconfig.is_some()
        || std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
        || std::env::var_os("KUBECONFIG").is_some();
    match config.mode {
        HooksMode::Off => return Ok(None),
        HooksMode::Auto if !configured => {
            tracing::info!(
                "cluster hooks off (no in-cluster service account, $KUBECONFIG or --kubeconfig): no Secret/Pod Security warnings, no Events"
            );
            return Ok(None);
        }
        _ => {}
    }
    let settings = ClientSettings::admission(config.kubeconfig.clone(), LOOKUP_TIMEOUT);
    match k8s::connect(&settings).await {
        Ok(kube) => {
            tracing::info!("cluster hooks on: admission warnings and Events");
            Ok(Some(Arc::new(KubeHooks::new(kube))))
        }
        Err(error) if config.mode == HooksMode::Auto => {
            tracing::warn!(error = %error, "cluster hooks off");
            Ok(None)
        }
        Err(error) => Err(anyhow::Error::new(error).context("--cluster-hooks on")),
    }
}

/// Cached lookups and an event recorder.
pub struct KubeHooks {
    kube: Kube,
    recorder: Recorder,
    secrets: Mutex<HashMap<(String, String), (Instant, SecretState)>>,
    namespaces: Mutex<HashMap<String, (Instant, Option<String>)>>,
}

impl KubeHooks {
    pub fn new(kube: Kube) -> Self {
        let instance = std::env::var("KIPS_POD_NAME")
            .or_else(|_| std::env::var("POD_NAME"))
            .or_else(|_| std::env::var("HOSTNAME"))
            .ok()
            .filter(|s| !s.is_empty());
        let reporter = Reporter {
            controller: REPORTING_CONTROLLER.to_owned(),
            instance: Some(instance.unwrap_or_else(|| "kips-webhook".to_owned())),
        };
        Self {
            recorder: Recorder::new(kube.client.clone(), reporter),
            kube,
            secrets: Mutex::default(),
            namespaces: Mutex::default(),
        }
    }

    /// What the relay Secret holds; `None` when that cannot be told in time. The value is
    /// looked at for a trailing newline only, never kept or logged.
    async fn secret_state(&self, namespace: &str, name: &str) -> Option<SecretState> {
        let key = (namespace.to_owned(), name.to_owned());
        if let Some((at, state)) = self.secrets.lock().unwrap().get(&key).copied() {
            let ttl = if state == SecretState::Missing {
                SECRET_MISSING_TTL
            } else {
                SECRET_FOUND_TTL
            };
            if at.elapsed() < ttl {
                return Some(state);
            }
        }
        let api = Api::<Secret>::namespaced(self.kube.client.clone(), namespace);
        match tokio::time::timeout(LOOKUP_TIMEOUT, api.get_opt(name)).await {
            Ok(Ok(found)) => {
                let state = SecretState::of(found.as_ref().map(|s| s.data.as_ref()));
                self.secrets
                    .lock()
                    .unwrap()
                    .insert(key, (Instant::now(), state));
                Some(state)
            }
            Ok(Err(error)) => {
                tracing::info!(%namespace, secret = %name, error = %error, "relay Secret lookup failed: no warning");
                None
            }
            Err(_) => {
                tracing::info!(%namespace, secret = %name, "relay Secret lookup timed out: no warning");
                None
            }
        }
    }

    /// The namespace's enforced Pod Security level (`None` when unlabelled or unknown).
    async fn enforced_level(&self, namespace: &str) -> Option<String> {
        let cached = self.namespaces.lock().unwrap().get(namespace).cloned();
        if let Some((at, level)) = cached
            && at.elapsed() < NAMESPACE_TTL
        {
            return level;
        }
        let api = Api::<Namespace>::all(self.kube.client.clone());
        match tokio::time::timeout(LOOKUP_TIMEOUT, api.get_metadata_opt(namespace)).await {
            Ok(Ok(found)) => {
                let level = found
                    .and_then(|ns| ns.metadata.labels)
                    .and_then(|labels| labels.get(ENFORCE_LABEL).cloned());
                self.namespaces
                    .lock()
                    .unwrap()
                    .insert(namespace.to_owned(), (Instant::now(), level.clone()));
                level
            }
            Ok(Err(error)) => {
                tracing::info!(%namespace, error = %error, "namespace lookup failed: no warning");
                None
            }
            Err(_) => {
                tracing::info!(%namespace, "namespace lookup timed out: no warning");
                None
            }
        }
    }
}

/// The warnings for one workload, from what the lookups found. Pure.
pub fn warnings_for(
    namespace: &str,
    needs: &PodNeeds,
    secret: Option<SecretState>,
    enforced_level: Option<&str>,
) -> Vec<String> {
    let mut out: Vec<String> = secret
        .and_then(|state| state.warning(namespace, &needs.relay_secret))
        .into_iter()
        .collect();
    if needs.net_admin
        && let Some(level @ ("baseline" | "restricted")) = enforced_level
    {
        out.push(format!(
            "kips: Pod Security \"{level}\" in namespace \"{namespace}\" will reject these pods: kips-init needs NET_ADMIN and NET_RAW (port mode iptables); use kips.io/port-mode: named"
        ));
    }
    out
}

impl ClusterHooks for KubeHooks {
    fn warnings<'a>(
        &'a self,
        request: &'a RequestInfo,
        decision: &'a Decision,
    ) -> BoxFuture<'a, Vec<String>> {
        Box::pin(async move {
            let Ok(mutation) = &decision.result else {
                return Vec::new();
            };
            let Some(needs) = &mutation.needs else {
                return Vec::new();
            };
            let namespace = request.namespace.as_str();
            let level = async {
                if needs.net_admin {
                    self.enforced_level(namespace).await
                } else {
                    None
                }
            };
            let (secret, level) =
                tokio::join!(self.secret_state(namespace, &needs.relay_secret), level);
            warnings_for(namespace, needs, secret, level.as_deref())
        })
    }

    fn reviewed(&self, reviewed: &Reviewed) {
        let Some(request) = &reviewed.request else {
            return;
        };
        let Some(reason) = event_reason(reviewed.effect) else {
            return;
        };
        if request.dry_run || reviewed.denial.is_some() {
            return;
        }
        let kube = self.kube.in_namespace(&request.namespace);
        let recorder = self.recorder.clone();
        let request = request.clone();
        let effect = reviewed.effect;
        tokio::spawn(async move {
            if let Err(error) = publish(kube, recorder, &request, effect, reason).await {
                tracing::warn!(
                    kind = %request.kind, namespace = %request.namespace, name = %request.name,
                    error = format!("{error:#}"), "could not record the Event"
                );
            }
        });
    }
}

/// The Event reason of an effect on a workload.
pub fn event_reason(effect: Effect) -> Option<&'static str> {
    match effect {
        Effect::RedirectOn => Some("RedirectOn"),
        Effect::RedirectOff => Some("RedirectOff"),
        Effect::RedirectChanged => Some("RedirectChanged"),
        _ => None,
    }
}

/// The Event's message, from the workload's annotations as stored. Pure.
pub fn event_note(effect: Effect, kips: Option<&KipsAnnotations>) -> String {
    let describe = |k: &KipsAnnotations| {
        let mut parts = Vec::new();
        if !k.redirects.is_empty() {
            parts.push(format!(
                "redirect {}",
                crate::annotations::render_list(&k.redirects)
            ));
        }
        if !k.reverses.is_empty() {
            parts.push(format!(
                "reverse {}",
                crate::annotations::render_list(&k.reverses)
            ));
        }
        parts.join(", ")
    };
    match (effect, kips.filter(|k| k.wants_injection())) {
        (Effect::RedirectOff, _) => {
            "kips: redirection off; new pods roll out without the kips-bridge sidecar".to_owned()
        }
        (Effect::RedirectOn, Some(k)) => format!(
            "kips: redirection on ({}); new pods roll out with the kips-bridge sidecar",
            describe(k)
        ),
        (Effect::RedirectOn, None) => {
            "kips: redirection on; new pods roll out with the kips-bridge sidecar".to_owned()
        }
        (_, Some(k)) => format!(
            "kips: redirection changed ({}); new pods roll out with the new configuration",
            describe(k)
        ),
        (_, None) => "kips: redirection changed".to_owned(),
    }
}

/// A workload as stored: its reference and the kips annotations in effect for its pods.
async fn stored(
    kube: &Kube,
    request: &RequestInfo,
) -> Result<Option<(ObjectReference, Option<KipsAnnotations>)>> {
    let Some(kind) = WorkloadKind::from_kind(&request.kind) else {
        bail!("kind {} gets no Events", request.kind);
    };
    let object = kube.workload_opt(kind, &request.name).await?;
    Ok(object.map(|object| (object.object_reference(), object.kips().ok())))
}

/// A reference from the admission request alone (workloads are apps/v1).
fn reference_from(request: &RequestInfo) -> ObjectReference {
    ObjectReference {
        api_version: Some("apps/v1".to_owned()),
        kind: Some(request.kind.clone()),
        namespace: Some(request.namespace.clone()),
        name: Some(request.name.clone()),
        ..Default::default()
    }
}

/// Publishes the Event once the API server has stored the change (a created workload has no
/// uid before that; an updated one shows its new annotations).
async fn publish(
    kube: Kube,
    recorder: Recorder,
    request: &RequestInfo,
    effect: Effect,
    reason: &'static str,
) -> Result<()> {
    let mut found = None;
    for attempt in 0..8u32 {
        tokio::time::sleep(Duration::from_millis(150 * u64::from(attempt + 1))).await;
        match stored(&kube, request).await {
            Ok(Some((reference, kips))) => {
                let on = kips.as_ref().is_some_and(|k| k.wants_injection());
                let settled = match effect {
                    Effect::RedirectOff => !on,
                    _ => on,
                };
                found = Some((reference, kips));
                if settled {
                    break;
                }
            }
            Ok(None) => {}
            // Not allowed to read workloads (or the read failed): the Event still goes out,
            // naming the workload without its uid.
            Err(error) => {
                tracing::debug!(
                    error = format!("{error:#}"),
                    "reading the workload for its Event"
                );
                found = Some((reference_from(request), None));
                break;
            }
        }
    }
    let Some((reference, kips)) = found else {
        bail!("the workload was not stored (another admission step refused it?)");
    };
    let event = Event {
        type_: EventType::Normal,
        reason: reason.to_owned(),
        note: Some(event_note(effect, kips.as_ref())),
        action: "Admit".to_owned(),
        secondary: None,
    };
    recorder.publish(&event, &reference).await?;
    tracing::info!(kind = %request.kind, namespace = %request.namespace, name = %request.name, reason, "recorded an Event");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotations::REDIRECT;

    const GOOD: SecretState = SecretState::Present {
        trailing_whitespace: false,
    };

    fn needs(net_admin: bool) -> PodNeeds {
        PodNeeds {
            relay_secret: "kips-relay".into(),
            net_admin,
        }
    }

    #[test]
    fn a_missing_secret_is_a_warning_and_an_unknown_one_is_not() {
        let w = warnings_for("dev", &needs(false), Some(SecretState::Missing), None);
        assert_eq!(
            w,
            [
                "kips: the relay Secret \"kips-relay\" does not exist in namespace \"dev\": the redirected pods will not start until it does (key connectionString)"
            ]
        );
        assert!(warnings_for("dev", &needs(false), None, None).is_empty());
        assert!(warnings_for("dev", &needs(false), Some(GOOD), None).is_empty());
    }

    #[test]
    fn iptables_mode_warns_in_baseline_and_restricted_namespaces() {
        for level in ["baseline", "restricted"] {
            let w = warnings_for("dev", &needs(true), Some(GOOD), Some(level));
            assert_eq!(w.len(), 1);
            assert!(w[0].contains(&format!("Pod Security \"{level}\" in namespace \"dev\"")));
            assert!(w[0].contains("kips.io/port-mode: named"));
        }
        assert!(warnings_for("dev", &needs(true), Some(GOOD), Some("privileged")).is_empty());
        assert!(warnings_for("dev", &needs(false), Some(GOOD), Some("restricted")).is_empty());
        // The API server truncates warnings longer than 256 characters.
        for w in warnings_for(
            &"n".repeat(63),
            &needs(true),
            Some(SecretState::Missing),
            Some("restricted"),
        ) {
            assert!(w.len() <= 256, "{} characters: {w}", w.len());
        }
    }

    #[test]
    fn events_are_for_workload_effects_only() {
        assert_eq!(event_reason(Effect::RedirectOn), Some("RedirectOn"));
        assert_eq!(event_reason(Effect::RedirectOff), Some("RedirectOff"));
        assert_eq!(
            event_reason(Effect::RedirectChanged),
            Some("RedirectChanged")
        );
        assert_eq!(event_reason(Effect::Injected), None);
        assert_eq!(event_reason(Effect::Unchanged), None);
        let kips = KipsAnnotations::parse([(REDIRECT, "api:8080")]).unwrap();
        assert_eq!(
            event_note(Effect::RedirectOn, Some(&kips)),
            "kips: redirection on (redirect api:8080); new pods roll out with the kips-bridge sidecar"
        );
        assert!(event_note(Effect::RedirectOff, None).contains("redirection off"));
    }
}
