//! The pure core: annotated objects in, minimal JSON patches out. No I/O.
//!
//! - pods: [`plan`] decides (routes, ports, mode, renames), [`render`] writes the patch and
//!   `kips.io/status`, [`reinvoke`] strips and re-renders a pod kips injected before;
//! - workloads: [`workload`] validates and copies the annotations into the pod template;
//! - [`view`] reads the request without deserialising whole objects; [`patch`] is the
//!   JSON Patch kips answers with; [`ports`] the redirect table `kips init-net` takes.

pub(crate) mod patch;
pub(crate) mod plan;
pub(crate) mod ports;
pub(crate) mod reinvoke;
pub(crate) mod render;
pub(crate) mod view;
pub(crate) mod workload;

#[cfg(test)]
mod tests;

use crate::annotations::{KipsAnnotations, PortMode, STATUS, has_kips_key, is_kips_container};
use crate::bridge::{BridgeEngine, DEFAULT_RELAY_SECRET};
use patch::PatchOp;
use view::PodView;

pub const DEFAULT_LISTEN_PORT_BASE: u16 = 15100;
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The azbridge release the default sidecar image carries.
pub const AZBRIDGE_VERSION: &str = "0.16.1";

/// What the webhook injects, from its flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectConfig {
    /// The relay-bridge sidecar's image.
    pub bridge_image: String,
    /// The image of `kips-init` (the kips binary plus iptables).
    pub init_image: String,
    pub image_pull_policy: Option<String>,
    /// The Secret read when a workload does not name one with `kips.io/relay-secret`.
    pub relay_secret: String,
    pub listen_port_base: u16,
    /// Inject `kips-bridge` as a native sidecar (an init container with `restartPolicy: Always`).
    pub native_sidecar: bool,
    /// The port mode of workloads that do not set `kips.io/port-mode`.
    pub default_port_mode: PortMode,
    /// The relay bridge the sidecar runs.
    pub bridge_engine: BridgeEngine,
}

impl Default for InjectConfig {
    fn default() -> Self {
        Self {
            bridge_image: BridgeEngine::default().default_image(),
            init_image: format!("ghcr.io/kips-dev/kips-init:{VERSION}"),
            image_pull_policy: None,
            relay_secret: DEFAULT_RELAY_SECRET.to_owned(),
            listen_port_base: DEFAULT_LISTEN_PORT_BASE,
            native_sidecar: true,
            default_port_mode: PortMode::Auto,
            bridge_engine: BridgeEngine::default(),
        }
    }
}

/// The result of admitting one object: a patch (possibly empty) and warnings for the user.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Mutation {
    pub patch: Vec<PatchOp>,
    pub warnings: Vec<String>,
    /// What happened, for metrics and events.
    pub effect: Effect,
    /// For a workload that asks for redirection: what its pods will need from the cluster,
    /// so that the edge can warn at `kubectl annotate` time rather than at pod start.
    pub needs: Option<PodNeeds>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNeeds {
    /// The Secret holding the relay connection string.
    pub relay_secret: String,
    /// `kips-init` will run with NET_ADMIN and NET_RAW (iptables mode), which Pod Security
    /// Admission allows only at the `privileged` level.
    pub net_admin: bool,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Not a kips object, or nothing to change.
    #[default]
    Unchanged,
    /// A pod got the sidecar (or was re-rendered).
    Injected,
    /// A kips pod was let through uninjected; the warnings say why.
    Skipped,
    /// A workload's template now asks for redirection (it did not before).
    RedirectOn,
    /// A workload's template no longer asks for redirection.
    RedirectOff,
    /// A workload's kips annotations changed while redirection stays on.
    RedirectChanged,
}

impl Effect {
    pub fn as_str(self) -> &'static str {
        match self {
            Effect::Unchanged => "unchanged",
            Effect::Injected => "injected",
            Effect::Skipped => "skipped",
            Effect::RedirectOn => "redirect_on",
            Effect::RedirectOff => "redirect_off",
            Effect::RedirectChanged => "redirect_changed",
        }
    }
}

/// Admits a pod given as JSON. `relay_hint` names the workload when the pod has no owner to
/// tell it (a pod template rendered by `kips inject`).
pub fn mutate_pod(
    pod_json: &str,
    config: &InjectConfig,
    relay_hint: Option<&str>,
) -> Result<Mutation, serde_json::Error> {
    let pod: PodView = serde_json::from_str(pod_json)?;
    mutate_pod_view(&pod, || serde_json::from_str(pod_json), config, relay_hint)
}

/// Admits a pod already read into a view. `whole_pod` gives the complete object, which only
/// a pod kips injected before needs (it is stripped and re-rendered as a JSON value).
pub fn mutate_pod_view(
    pod: &PodView,
    whole_pod: impl FnOnce() -> Result<serde_json::Value, serde_json::Error>,
    config: &InjectConfig,
    relay_hint: Option<&str>,
) -> Result<Mutation, serde_json::Error> {
    if carries_injection(pod) {
        // Already injected (reinvocation, or a template rendered by `kips inject`): strip
        // what kips added, render afresh, and send only the difference.
        return Ok(reinvoke::rerender(&whole_pod()?, config, relay_hint));
    }
    if !has_kips_key(pod.metadata.annotation_pairs().map(|(k, _)| k)) {
        return Ok(Mutation::default());
    }
    Ok(inject_fresh(pod, config, relay_hint))
}

/// Whether kips injected `pod` before (its status annotation, or one of its containers).
pub(crate) fn carries_injection(pod: &PodView) -> bool {
    pod.metadata.annotation(STATUS).is_some()
        || pod
            .spec
            .all_containers()
            .any(|c| is_kips_container(&c.name))
}

/// Injects into a pod that carries nothing of kips yet.
fn inject_fresh(pod: &PodView, config: &InjectConfig, relay_hint: Option<&str>) -> Mutation {
    let skipped = |reason: String| Mutation {
        warnings: vec![format!("kips: pod not injected: {reason}")],
        effect: Effect::Skipped,
        ..Default::default()
    };
    let annotations = match KipsAnnotations::parse(pod.metadata.annotation_pairs()) {
        Ok(parsed) => parsed,
        Err(errors) => {
            let reasons: Vec<String> = errors.iter().map(ToString::to_string).collect();
            return skipped(reasons.join("; "));
        }
    };
    if !annotations.wants_injection() {
        return Mutation::default();
    }
    if pod.spec.host_network == Some(true) {
        return skipped(
            "it uses hostNetwork; kips never rewrites the node's network or ports".into(),
        );
    }
    // No spec at all (the API server's validation refuses the pod anyway): a patch under
    // `/spec` could not apply, and would hide that message behind a failed webhook.
    if pod.spec.containers.is_empty() {
        return skipped("it has no containers (spec.containers is missing or empty)".into());
    }
    // The default relay is the workload's name, worked out only when a redirect needs it.
    let derived = (relay_hint.is_none() && annotations.redirects.iter().any(|r| r.relay.is_none()))
        .then(|| plan::workload_name(&pod.metadata))
        .flatten();
    match plan::plan(pod, &annotations, config, relay_hint.or(derived.as_deref())) {
        Ok(plan) => Mutation {
            patch: render::render(pod, &plan, config),
            warnings: plan.warnings,
            effect: Effect::Injected,
            needs: None,
        },
        Err(reason) => skipped(reason.to_string()),
    }
}
