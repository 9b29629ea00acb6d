//! Following a workload's rollout until every pod of its current revision is injected (or,
//! after a revert, plain) and ready — or saying why that cannot happen.
//!
//! [`Snapshot`] and [`assess`] are pure: the snapshot is built from objects read from the API
//! server (the workload, its ReplicaSets, its pods, events), so `status` and `--wait` share
//! one judgement.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{Event, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::ListParams;

use crate::annotations::{BRIDGE_CONTAINER, STATUS};
use crate::bridge::CONNECTION_STRING_ENV;
use crate::bridge::DEFAULT_RELAY_SECRET;
use crate::k8s::{K8sError, Kube};
use crate::workload::{Workload, WorkloadRef};

const REVISION: &str = "deployment.kubernetes.io/revision";
/// Waiting reasons of a container that do not go away by waiting.
const FATAL_REASONS: [&str; 4] = [
    "CreateContainerConfigError",
    "CreateContainerError",
    "InvalidImageName",
    "ErrImageNeverPull",
];

/// One pod of the workload's current revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodState {
    pub name: String,
    /// Carries `kips.io/status`.
    pub injected: bool,
    pub ready: bool,
    /// Why a container is waiting, e.g. `kips-bridge: ImagePullBackOff: ...`.
    pub problem: Option<String>,
    /// The problem does not go away by waiting.
    pub fatal: bool,
}

/// What a rollout looks like at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// `deployment/api`
    pub workload: String,
    /// The workload controller has seen the latest change.
    pub observed: bool,
    /// The pod template asks for injection (the webhook copied the annotations into it, or
    /// the user wrote them there).
    pub template_wants: bool,
    pub desired: usize,
    /// Active pods of the current revision.
    pub current: Vec<PodState>,
    /// Active pods of older revisions.
    pub old: usize,
    /// The rollout cannot proceed: pods rejected, progress deadline exceeded, paused.
    pub blocked: Option<String>,
    /// The relay Secret the injected pods need does not exist.
    pub secret_missing: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Done(String),
    Waiting(String),
    Failed(String),
}

impl Snapshot {
    /// Pods of the current revision in the wanted state, and those of them that are ready.
    pub fn counts(&self, want_injected: bool) -> (usize, usize) {
        let matching = self
            .current
            .iter()
            .filter(|p| p.injected == want_injected)
            .count();
        let ready = self
            .current
            .iter()
            .filter(|p| p.injected == want_injected && p.ready)
            .count();
        (matching, ready)
    }
}

/// Judges a snapshot: done, still moving, or stuck (with the reason).
pub fn assess(s: &Snapshot, want_injected: bool) -> Verdict {
    let w = &s.workload;
    if want_injected && let Some(missing) = &s.secret_missing {
        return Verdict::Failed(missing.clone());
    }
    // Conditions of a revision the controller has not moved past yet are stale.
    if !s.observed {
        let (_, ready) = s.counts(want_injected);
        return Verdict::Waiting(format!(
            "{w}: waiting for the controller to see the change, {ready}/{} ready",
            s.desired
        ));
    }
    if let Some(blocked) = &s.blocked {
        return Verdict::Failed(format!("{w}: {blocked}"));
    }
    if let Some(pod) = s.current.iter().find(|p| p.fatal) {
        return Verdict::Failed(format!(
            "{w}: pod {} cannot start: {}",
            pod.name,
            pod.problem.as_deref().unwrap_or("unknown reason")
        ));
    }
    if s.template_wants != want_injected {
        return Verdict::Failed(if want_injected {
            format!(
                "{w}: its pod template carries no kips annotations: the kips webhook did not process the change (is it installed and reachable?)"
            )
        } else {
            format!(
                "{w}: its pod template still asks for redirection: kips did not remove its copies, or the template carries kips annotations of its own (remove them from your manifests)"
            )
        });
    }
    if want_injected && let Some(pod) = s.current.iter().find(|p| !p.injected) {
        return Verdict::Failed(format!(
            "{w}: pod {} was created without kips' sidecar: the kips webhook did not inject it (unreachable with failurePolicy Ignore, or its rules do not match pods)",
            pod.name
        ));
    }
    let (matching, ready) = s.counts(want_injected);
    let state = if want_injected {
        "injected"
    } else {
        "without kips"
    };
    if s.current.len() == s.desired && matching == s.desired && ready == s.desired && s.old == 0 {
        return Verdict::Done(format!("{w}: {ready}/{} pods {state} and ready", s.desired));
    }
    let mut text = format!(
        "{w}: {matching}/{} pods {state}, {ready}/{} ready",
        s.desired, s.desired
    );
    if s.old > 0 {
        text.push_str(&format!(
            ", {} old pod{} left",
            s.old,
            if s.old == 1 { "" } else { "s" }
        ));
    }
    if let Some(pod) = s.current.iter().find(|p| p.problem.is_some()) {
        text.push_str(&format!(
            " ({}: {})",
            pod.name,
            pod.problem.as_deref().unwrap_or_default()
        ));
    }
    Verdict::Waiting(text)
}

/// StatefulSets and DaemonSets own their pods directly and mark each pod's revision with
/// `revision_label`; pods of other revisions are old. With `OnDelete`, old pods stay until
/// someone deletes them, so the rollout cannot finish by itself.
fn sort_by_revision(
    snap: &mut Snapshot,
    pods: &[&Pod],
    uid: &str,
    revision_label: &str,
    current_revision: Option<&str>,
    update_strategy: Option<&str>,
) {
    for pod in pods.iter().filter(|p| owned_by(&p.metadata, uid)) {
        let revision = pod
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(revision_label));
        if revision.is_some() && revision.map(String::as_str) == current_revision {
            snap.current.push(pod_state(pod));
        } else {
            snap.old += 1;
        }
    }
    if update_strategy == Some("OnDelete") && snap.old > 0 && snap.blocked.is_none() {
        snap.blocked =
            Some("its updateStrategy is OnDelete: delete its pods to roll the change out".into());
    }
}

fn owned_by(meta: &ObjectMeta, uid: &str) -> bool {
    controller_of(meta).is_some_and(|o| o.uid == uid)
}

fn controller_of(meta: &ObjectMeta) -> Option<&OwnerReference> {
    meta.owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
}

fn active(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && !matches!(
            pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        )
}

pub fn pod_state(pod: &Pod) -> PodState {
    let status = pod.status.as_ref();
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let mut problem = None;
    let mut fatal = false;
    if let Some(status) = status {
        let containers = status
            .init_container_statuses
            .iter()
            .flatten()
            .chain(status.container_statuses.iter().flatten());
        for container in containers {
            let Some(waiting) = container.state.as_ref().and_then(|s| s.waiting.as_ref()) else {
                continue;
            };
            let reason = waiting.reason.as_deref().unwrap_or_default();
            if reason.is_empty() || reason == "ContainerCreating" || reason == "PodInitializing" {
                continue;
            }
            let message = waiting
                .message
                .as_deref()
                .map(|m| format!(": {m}"))
                .unwrap_or_default();
            problem = Some(format!("{}: {reason}{message}", container.name));
            fatal = FATAL_REASONS.contains(&reason);
            if fatal {
                break;
            }
        }
    }
    PodState {
        name: pod.metadata.name.clone().unwrap_or_default(),
        injected: pod
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(STATUS)),
        ready,
        problem,
        fatal,
    }
}

/// Builds the snapshot of one workload from what was read. `rejected` is a pod-creation
/// failure taken from events (StatefulSets and DaemonSets have no condition for it).
pub fn snapshot(
    object: &Workload,
    replica_sets: &[ReplicaSet],
    pods: &[Pod],
    min_generation: Option<i64>,
    rejected: Option<String>,
) -> Snapshot {
    let meta = object.metadata();
    let uid = meta.uid.clone().unwrap_or_default();
    let generation = meta
        .generation
        .unwrap_or(0)
        .max(min_generation.unwrap_or(0));
    let mut snap = Snapshot {
        workload: object.reference().to_string(),
        template_wants: object.kips_annotations().template_wants_injection(),
        blocked: rejected.map(|m| format!("pods rejected: {m}")),
        ..Default::default()
    };
    let pods: Vec<&Pod> = pods.iter().filter(|p| active(p)).collect();
    match object {
        Workload::Deployment(d) => {
            let spec = d.spec.as_ref();
            let status = d.status.as_ref();
            snap.desired = spec.and_then(|s| s.replicas).unwrap_or(1).max(0) as usize;
            snap.observed = status.and_then(|s| s.observed_generation).unwrap_or(0) >= generation;
            let revision = meta.annotations.as_ref().and_then(|a| a.get(REVISION));
            let owned: Vec<&ReplicaSet> = replica_sets
                .iter()
                .filter(|rs| owned_by(&rs.metadata, &uid))
                .collect();
            let new_rs = owned.iter().find(|rs| {
                revision.is_some()
                    && rs
                        .metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(REVISION))
                        == revision
            });
            if new_rs.is_none() {
                snap.observed = false;
            }
            let new_uid = new_rs.and_then(|rs| rs.metadata.uid.clone());
            for pod in &pods {
                let Some(owner) = controller_of(&pod.metadata) else {
                    continue;
                };
                if Some(&owner.uid) == new_uid.as_ref() {
                    snap.current.push(pod_state(pod));
                } else if owned
                    .iter()
                    .any(|rs| rs.metadata.uid.as_ref() == Some(&owner.uid))
                {
                    snap.old += 1;
                }
            }
            let failure = new_rs
                .and_then(|rs| rs.status.as_ref())
                .and_then(|s| s.conditions.as_ref())
                .and_then(|c| {
                    c.iter()
                        .find(|c| c.type_ == "ReplicaFailure" && c.status == "True")
                })
                .map(|c| {
                    c.message
                        .clone()
                        .unwrap_or_else(|| c.reason.clone().unwrap_or_default())
                });
            let conditions = status.and_then(|s| s.conditions.as_ref());
            let deadline = conditions.and_then(|c| {
                c.iter().find(|c| {
                    c.type_ == "Progressing"
                        && c.status == "False"
                        && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
                })
            });
            if let Some(failure) = failure {
                snap.blocked = Some(format!("pods rejected: {failure}"));
            } else if let Some(deadline) = deadline {
                snap.blocked = Some(format!(
                    "the rollout exceeded its progress deadline: {}",
                    deadline.message.as_deref().unwrap_or_default()
                ));
            } else if spec.and_then(|s| s.paused) == Some(true) {
                snap.blocked = Some(format!(
                    "the rollout is paused (kubectl rollout resume deployment/{})",
                    object.name()
                ));
            }
        }
        Workload::StatefulSet(s) => {
            let spec = s.spec.as_ref();
            let status = s.status.as_ref();
            snap.desired = spec.and_then(|s| s.replicas).unwrap_or(1).max(0) as usize;
            let update_revision = status.and_then(|s| s.update_revision.clone());
            snap.observed = status.and_then(|s| s.observed_generation).unwrap_or(0) >= generation
                && update_revision.is_some();
            let strategy = spec
                .and_then(|s| s.update_strategy.as_ref())
                .and_then(|u| u.type_.as_deref());
            sort_by_revision(
                &mut snap,
                &pods,
                &uid,
                "controller-revision-hash",
                update_revision.as_deref(),
                strategy,
            );
        }
        Workload::DaemonSet(d) => {
            let spec = d.spec.as_ref();
            let status = d.status.as_ref();
            snap.desired = status.map_or(0, |s| s.desired_number_scheduled.max(0) as usize);
            snap.observed = status.and_then(|s| s.observed_generation).unwrap_or(0) >= generation;
            let current_generation = meta.generation.map(|g| g.to_string());
            let strategy = spec
                .and_then(|s| s.update_strategy.as_ref())
                .and_then(|u| u.type_.as_deref());
            sort_by_revision(
                &mut snap,
                &pods,
                &uid,
                "pod-template-generation",
                current_generation.as_deref(),
                strategy,
            );
        }
    }
    snap
}

/// `matchLabels` and `matchExpressions` as a label selector string.
pub fn selector_string(selector: &LabelSelector) -> String {
    let mut parts: Vec<String> = selector
        .match_labels
        .iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for expression in selector.match_expressions.iter().flatten() {
        let values = expression.values.clone().unwrap_or_default().join(",");
        let key = &expression.key;
        parts.push(match expression.operator.as_str() {
            "In" => format!("{key} in ({values})"),
            "NotIn" => format!("{key} notin ({values})"),
            "Exists" => key.clone(),
            _ => format!("!{key}"),
        });
    }
    parts.join(",")
}

/// The relay Secret the pods use: from an injected pod's `kips-bridge` (the webhook's
/// configured default included), else the annotation, else kips' default.
pub fn relay_secret_name(object: &Workload, pods: &[Pod]) -> String {
    relay_secret_of_pods(pods)
        .or_else(|| object.kips().ok().and_then(|k| k.relay_secret))
        .unwrap_or_else(|| DEFAULT_RELAY_SECRET.to_owned())
}

/// The Secret an injected pod's `kips-bridge` reads the connection string from.
pub fn relay_secret_of_pods(pods: &[Pod]) -> Option<String> {
    pods.iter().find_map(|pod| {
        let spec = pod.spec.as_ref()?;
        spec.init_containers
            .iter()
            .flatten()
            .chain(&spec.containers)
            .find(|c| c.name == BRIDGE_CONTAINER)?
            .env
            .iter()
            .flatten()
            .find(|e| e.name == CONNECTION_STRING_ENV)?
            .value_from
            .as_ref()?
            .secret_key_ref
            .as_ref()
            .map(|r| r.name.clone())
    })
}

/// Everything read about one workload in one poll.
pub struct Observed {
    pub object: Workload,
    pub replica_sets: Vec<ReplicaSet>,
    pub pods: Vec<Pod>,
}

/// Reads the workload, its ReplicaSets and its pods.
pub async fn observe(kube: &Kube, target: &WorkloadRef) -> Result<Observed, K8sError> {
    let object = kube.workload(target).await?;
    let selector = object.selector().map(selector_string).unwrap_or_default();
    let params = ListParams::default().labels(&selector);
    let pods = kube
        .list::<Pod, Pod>(false, &format!("pods of {target}"), &params)
        .await?;
    let replica_sets = if matches!(object, Workload::Deployment(_)) {
        kube.list::<ReplicaSet, ReplicaSet>(false, &format!("ReplicaSets of {target}"), &params)
            .await?
    } else {
        Vec::new()
    };
    Ok(Observed {
        object,
        replica_sets,
        pods,
    })
}

/// `None` when the Secret exists or cannot be checked (no permission: say nothing).
pub async fn missing_secret(kube: &Kube, name: &str) -> Option<String> {
    match kube.api::<Secret>().get_metadata_opt(name).await {
        Ok(Some(_)) => None,
        Ok(None) => Some(format!(
            "the relay Secret \"{name}\" does not exist in namespace {ns}: the injected pods cannot start. Create it (kubectl create secret generic {name} -n {ns} --from-literal=connectionString='Endpoint=sb://...'), then run the command again, or undo with kips revert",
            ns = kube.namespace
        )),
        Err(_) => None,
    }
}

/// The newest `FailedCreate` event of the workload since `since` (StatefulSets and DaemonSets
/// report rejected pods only through events).
pub async fn rejection_event(kube: &Kube, object: &Workload, since: Timestamp) -> Option<String> {
    if matches!(object, Workload::Deployment(_)) {
        return None;
    }
    let uid = object.metadata().uid.clone()?;
    let api = Api::<Event>::namespaced(kube.client.clone(), &kube.namespace);
    let params =
        ListParams::default().fields(&format!("involvedObject.uid={uid},reason=FailedCreate"));
    let events = api.list(&params).await.ok()?.items;
    events
        .into_iter()
        .filter(|e| {
            let at = e
                .last_timestamp
                .as_ref()
                .map(|t| t.0)
                .or_else(|| e.event_time.as_ref().map(|t| t.0));
            at.is_some_and(|at| at >= since)
        })
        .max_by_key(|e| e.last_timestamp.as_ref().map(|t| t.0))
        .and_then(|e| e.message)
}

/// A progress line with the time elapsed: rewritten in place on a terminal (the clock
/// ticks), and off a terminal printed as a plain line only when the state changes.
pub struct Progress {
    tty: bool,
    out: Box<dyn Write + Send>,
    started: Instant,
    /// The last state shown, and the last line written (on a terminal).
    last_state: String,
    last_line: String,
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress {
    /// On stderr, as a terminal if it is one.
    pub fn new() -> Self {
        Self::to(std::io::stderr().is_terminal(), Box::new(std::io::stderr()))
    }

    pub fn to(tty: bool, out: Box<dyn Write + Send>) -> Self {
        Self {
            tty,
            out,
            started: Instant::now(),
            last_state: String::new(),
            last_line: String::new(),
        }
    }

    pub fn update(&mut self, state: &str) {
        self.update_at(state, self.started.elapsed());
    }

    fn update_at(&mut self, state: &str, elapsed: Duration) {
        let line = progress_line(state, elapsed);
        if self.tty {
            if line != self.last_line {
                let _ = write!(self.out, "\r\x1b[2K{line}");
            }
        } else if state != self.last_state {
            let _ = writeln!(self.out, "{line}");
        }
        let _ = self.out.flush();
        self.last_state = state.to_owned();
        self.last_line = line;
    }

    pub fn finish(&mut self) {
        if self.tty && !self.last_line.is_empty() {
            let _ = writeln!(self.out);
        }
        self.last_state.clear();
        self.last_line.clear();
    }
}

/// `[1m05s] deployment/api: 1/2 pods injected, 0/2 ready`.
pub fn progress_line(state: &str, elapsed: Duration) -> String {
    let seconds = elapsed.as_secs();
    let clock = if seconds < 60 {
        format!("{seconds}s")
    } else {
        format!("{}m{:02}s", seconds / 60, seconds % 60)
    };
    format!("[{clock}] {state}")
}

/// Follows the rollout of `target` until it is done, failed or timed out.
pub async fn wait(
    kube: &Kube,
    target: &WorkloadRef,
    want_injected: bool,
    min_generation: Option<i64>,
    timeout: Duration,
) -> Result<String> {
    let started = Instant::now();
    let since = Timestamp::now() - Duration::from_secs(1);
    let mut progress = Progress::new();
    let mut last = format!("{target}: waiting for the rollout");
    let mut secret_checked: BTreeMap<String, Option<String>> = BTreeMap::new();
    loop {
        match observe(kube, target).await {
            Ok(observed) => {
                let rejected = rejection_event(kube, &observed.object, since).await;
                let mut snap = snapshot(
                    &observed.object,
                    &observed.replica_sets,
                    &observed.pods,
                    min_generation,
                    rejected,
                );
                if want_injected {
                    let name = relay_secret_name(&observed.object, &observed.pods);
                    if !secret_checked.contains_key(&name) {
                        let missing = missing_secret(kube, &name).await;
                        secret_checked.insert(name.clone(), missing);
                    }
                    snap.secret_missing = secret_checked[&name].clone();
                }
                match assess(&snap, want_injected) {
                    Verdict::Done(message) => {
                        progress.finish();
                        return Ok(message);
                    }
                    Verdict::Failed(message) => {
                        progress.finish();
                        bail!("{message}");
                    }
                    Verdict::Waiting(message) => last = message,
                }
            }
            // The workload itself is gone: waiting cannot bring it back.
            Err(error @ K8sError::NotFound { .. }) => {
                progress.finish();
                return Err(error.into());
            }
            Err(error) => last = format!("{target}: {error} (retrying)"),
        }
        progress.update(&last);
        if started.elapsed() >= timeout {
            progress.finish();
            bail!(
                "timed out after {} waiting for {target}; last state: {last}",
                humantime::format_duration(timeout)
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotations::COPIED;
    use serde_json::{Value, json};

    fn deployment(generation: i64, observed: i64, revision: &str, template: Value) -> Workload {
        Workload::from_value(json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "api", "namespace": "dev", "uid": "d-1", "generation": generation,
                         "annotations": {REVISION: revision}},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "api"}},
                     "template": {"metadata": {"annotations": template}, "spec": {"containers": []}}},
            "status": {"observedGeneration": observed}
        }))
        .unwrap()
    }

    fn rs(name: &str, revision: &str, failure: Option<&str>) -> ReplicaSet {
        let mut value = json!({
            "metadata": {"name": name, "uid": format!("{name}-uid"), "annotations": {REVISION: revision},
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "api", "uid": "d-1", "controller": true}]},
        });
        if let Some(message) = failure {
            value["status"] = json!({"replicas": 0, "conditions": [{"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate", "message": message}]});
        }
        serde_json::from_value(value).unwrap()
    }

    fn pod(name: &str, rs: &str, injected: bool, ready: bool) -> Pod {
        let mut annotations = json!({});
        if injected {
            annotations[STATUS] = json!("{}");
        }
        serde_json::from_value(json!({
            "metadata": {"name": name, "annotations": annotations,
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": rs, "uid": format!("{rs}-uid"), "controller": true}]},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}
        }))
        .unwrap()
    }

    fn copied() -> Value {
        json!({"kips.io/redirect": "api:8080", COPIED: "redirect"})
    }

    #[test]
    fn a_redirect_rollout_moves_from_waiting_to_done() {
        let d = deployment(2, 2, "2", copied());
        let sets = [rs("old", "1", None), rs("new", "2", None)];
        let pods = [
            pod("a", "new", true, true),
            pod("b", "new", true, false),
            pod("c", "old", false, true),
        ];
        let snap = snapshot(&d, &sets, &pods, Some(2), None);
        assert_eq!(snap.old, 1);
        assert_eq!(
            assess(&snap, true),
            Verdict::Waiting("deployment/api: 2/2 pods injected, 1/2 ready, 1 old pod left".into())
        );
        let pods = [pod("a", "new", true, true), pod("b", "new", true, true)];
        assert_eq!(
            assess(&snapshot(&d, &sets, &pods, Some(2), None), true),
            Verdict::Done("deployment/api: 2/2 pods injected and ready".into())
        );
    }

    #[test]
    fn an_unobserved_change_waits_even_when_old_pods_look_done() {
        let d = deployment(3, 2, "2", copied());
        let sets = [rs("new", "2", None)];
        let pods = [pod("a", "new", true, true), pod("b", "new", true, true)];
        assert!(matches!(
            assess(&snapshot(&d, &sets, &pods, Some(3), None), true),
            Verdict::Waiting(m) if m.contains("waiting for the controller")
        ));
    }

    #[test]
    fn the_failure_of_a_revision_the_controller_has_left_is_not_reported() {
        // Generation 3 is not observed yet; revision 2's ReplicaSet still says FailedCreate.
        let d = deployment(3, 2, "2", copied());
        let sets = [rs("new", "2", Some("forbidden"))];
        assert!(matches!(
            assess(&snapshot(&d, &sets, &[], Some(3), None), true),
            Verdict::Waiting(_)
        ));
    }

    #[test]
    fn a_revert_is_done_when_pods_are_plain() {
        let d = deployment(3, 3, "3", json!({}));
        let sets = [rs("injected", "2", None), rs("plain", "3", None)];
        let pods = [
            pod("a", "plain", false, true),
            pod("b", "plain", false, true),
        ];
        assert_eq!(
            assess(&snapshot(&d, &sets, &pods, None, None), false),
            Verdict::Done("deployment/api: 2/2 pods without kips and ready".into())
        );
        let pods = [
            pod("a", "plain", false, true),
            pod("b", "injected", true, true),
        ];
        assert!(matches!(
            assess(&snapshot(&d, &sets, &pods, None, None), false),
            Verdict::Waiting(m) if m.contains("1/2 pods without kips") && m.contains("1 old pod left")
        ));
    }

    #[test]
    fn stuck_rollouts_fail_with_the_reason() {
        let d = deployment(2, 2, "2", copied());
        let message = "pods \"api-x\" is forbidden: violates PodSecurity \"baseline:latest\": non-default capabilities";
        let sets = [rs("new", "2", Some(message))];
        assert_eq!(
            assess(&snapshot(&d, &sets, &[], None, None), true),
            Verdict::Failed(format!("deployment/api: pods rejected: {message}"))
        );
        // The relay Secret is missing.
        let sets = [rs("new", "2", None)];
        let mut snap = snapshot(&d, &sets, &[], None, None);
        snap.secret_missing = Some("the relay Secret \"kips-relay\" does not exist".into());
        assert!(matches!(assess(&snap, true), Verdict::Failed(m) if m.contains("kips-relay")));
        // A revert does not need the Secret (here it fails on the template instead).
        assert!(matches!(assess(&snap, false), Verdict::Failed(m) if !m.contains("kips-relay")));
        // The webhook did not copy the annotations.
        let d = deployment(2, 2, "2", json!({}));
        assert!(matches!(
            assess(&snapshot(&d, &sets, &[], None, None), true),
            Verdict::Failed(m) if m.contains("did not process the change")
        ));
        // A pod was created without the sidecar.
        let d = deployment(2, 2, "2", copied());
        let pods = [pod("a", "new", false, true)];
        assert!(matches!(
            assess(&snapshot(&d, &sets, &pods, None, None), true),
            Verdict::Failed(m) if m.contains("created without kips' sidecar")
        ));
    }

    #[test]
    fn fatal_container_states_fail_and_others_are_shown() {
        let d = deployment(2, 2, "2", copied());
        let sets = [rs("new", "2", None)];
        let mut broken = pod("a", "new", true, false);
        broken.status.as_mut().unwrap().init_container_statuses = Some(vec![
            serde_json::from_value(json!({"name": "kips-bridge", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"waiting": {"reason": "CreateContainerConfigError", "message": "secret \"kips-relay\" not found"}}})).unwrap(),
        ]);
        assert!(matches!(
            assess(&snapshot(&d, &sets, &[broken.clone()], None, None), true),
            Verdict::Failed(m) if m.contains("pod a cannot start: kips-bridge: CreateContainerConfigError: secret \"kips-relay\" not found")
        ));
        let state = &mut broken
            .status
            .as_mut()
            .unwrap()
            .init_container_statuses
            .as_mut()
            .unwrap()[0];
        state
            .state
            .as_mut()
            .unwrap()
            .waiting
            .as_mut()
            .unwrap()
            .reason = Some("ImagePullBackOff".into());
        assert!(matches!(
            assess(&snapshot(&d, &sets, &[broken], None, None), true),
            Verdict::Waiting(m) if m.contains("(a: kips-bridge: ImagePullBackOff")
        ));
    }

    /// A writer the test can read back.
    #[derive(Clone, Default)]
    struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Shared {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    #[test]
    fn progress_ticks_on_a_terminal_and_prints_changes_elsewhere() {
        let states = [
            ("a: 0/2 pods injected, 0/2 ready", 1),
            ("a: 0/2 pods injected, 0/2 ready", 2),
            ("a: 1/2 pods injected, 0/2 ready", 3),
            ("a: 1/2 pods injected, 0/2 ready", 3),
            ("a: 2/2 pods injected, 1/2 ready", 65),
        ];
        let plain = Shared::default();
        let mut progress = Progress::to(false, Box::new(plain.clone()));
        for (state, at) in states {
            progress.update_at(state, Duration::from_secs(at));
        }
        progress.finish();
        assert_eq!(
            plain.text(),
            "[1s] a: 0/2 pods injected, 0/2 ready\n[3s] a: 1/2 pods injected, 0/2 ready\n[1m05s] a: 2/2 pods injected, 1/2 ready\n"
        );
        let tty = Shared::default();
        let mut progress = Progress::to(true, Box::new(tty.clone()));
        for (state, at) in states {
            progress.update_at(state, Duration::from_secs(at));
        }
        progress.finish();
        let rewrites = tty.text().matches("\r\x1b[2K").count();
        assert_eq!(rewrites, 4, "{:?}", tty.text());
        assert!(tty.text().contains("\r\x1b[2K[2s] a: 0/2"));
        assert!(tty.text().ends_with("1/2 ready\n"));
    }

    #[test]
    fn selectors_render_like_kubectl() {
        let selector: LabelSelector = serde_json::from_value(json!({
            "matchLabels": {"app": "api", "tier": "web"},
            "matchExpressions": [
                {"key": "env", "operator": "In", "values": ["a", "b"]},
                {"key": "x", "operator": "NotIn", "values": ["c"]},
                {"key": "y", "operator": "Exists"},
                {"key": "z", "operator": "DoesNotExist"}
            ]
        }))
        .unwrap();
        assert_eq!(
            selector_string(&selector),
            "app=api,tier=web,env in (a,b),x notin (c),y,!z"
        );
    }

    #[test]
    fn the_relay_secret_comes_from_the_sidecar_first() {
        let d = deployment(1, 1, "1", copied());
        let injected: Pod = serde_json::from_value(json!({
            "metadata": {"name": "a"},
            "spec": {"containers": [], "initContainers": [{"name": "kips-bridge", "env": [
                {"name": CONNECTION_STRING_ENV, "valueFrom": {"secretKeyRef": {"name": "team-relay", "key": "connectionString"}}}]}]}
        }))
        .unwrap();
        assert_eq!(relay_secret_name(&d, &[injected]), "team-relay");
        assert_eq!(relay_secret_name(&d, &[]), DEFAULT_RELAY_SECRET);
    }
}
