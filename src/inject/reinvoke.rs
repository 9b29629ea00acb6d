//! Re-admission of a pod kips already injected: strip what kips added, render afresh, and
//! answer with only the difference, keeping what others added to kips' containers.

use json_patch::PatchOperation;
use serde_json::Value;

use super::patch::{PatchOp, pointer, to_json_patch};
use super::view::PodView;
use super::{Effect, InjectConfig, Mutation};
use crate::annotations::{BRIDGE_CONTAINER, INIT_CONTAINER, InjectionStatus, STATUS};

/// Removes what kips injected, using `kips.io/status` to undo port renames.
pub fn strip(pod: &mut Value) {
    let status: Option<InjectionStatus> = pod
        .pointer(&format!(
            "/metadata/annotations/{}",
            STATUS.replace('/', "~1")
        ))
        .and_then(Value::as_str)
        .and_then(InjectionStatus::from_json);
    if let Some(annotations) = pod
        .pointer_mut("/metadata/annotations")
        .and_then(Value::as_object_mut)
    {
        annotations.remove(STATUS);
    }
    let Some(spec) = pod.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    for list in ["containers", "initContainers"] {
        if let Some(containers) = spec.get_mut(list).and_then(Value::as_array_mut) {
            containers
                .retain(|c| !matches!(c["name"].as_str(), Some(BRIDGE_CONTAINER | INIT_CONTAINER)));
        }
    }
    if spec
        .get("initContainers")
        .and_then(Value::as_array)
        .is_some_and(Vec::is_empty)
    {
        spec.remove("initContainers");
    }
    let renames = status.map(|s| s.renamed_ports).unwrap_or_default();
    if renames.is_empty() {
        return;
    }
    for container in spec
        .get_mut("containers")
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
    {
        let name = container["name"].as_str().unwrap_or_default().to_owned();
        for rename in renames.iter().filter(|r| r.container == name) {
            restore_port_name(container, &rename.to, &rename.from);
        }
    }
}

/// Renames `to` back to `from` in a container's ports and in the handlers that name it.
fn restore_port_name(container: &mut Value, to: &str, from: &str) {
    let is_renamed = |v: &Value| v.as_str() == Some(to);
    for port in container
        .get_mut("ports")
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
    {
        if port.get("name").is_some_and(is_renamed) {
            port["name"] = Value::String(from.to_owned());
        }
    }
    for handler in [
        "/livenessProbe",
        "/readinessProbe",
        "/startupProbe",
        "/lifecycle/postStart",
        "/lifecycle/preStop",
    ] {
        for action in ["httpGet", "tcpSocket"] {
            if let Some(port) = container.pointer_mut(&format!("{handler}/{action}/port"))
                && is_renamed(port)
            {
                *port = Value::String(from.to_owned());
            }
        }
    }
}

/// Re-admission of a pod kips already injected: the API server reinvokes kips after its own
/// plugins changed the pod (ServiceAccount mounts its token into every container,
/// LimitRanger fills in resource defaults), and pods made from a template rendered by
/// `kips inject` arrive injected.
///
/// When the injection recorded in `kips.io/status` is what kips would render now, and its
/// containers are in place, nothing changes: what others added to kips' containers stays.
/// Otherwise kips strips, renders afresh and sends the difference, still keeping what others
/// added to its containers (see [`keep_additions`]).
pub fn rerender(current: &Value, config: &InjectConfig, relay_hint: Option<&str>) -> Mutation {
    let mut desired = current.clone();
    strip(&mut desired);
    let stripped = desired.clone();
    let view = PodView::deserialize_from(&stripped);
    let mut fresh = super::inject_fresh(&view, config, relay_hint);
    if fresh.effect == Effect::Injected && injection_intact(current, &fresh.patch) {
        return Mutation {
            warnings: fresh.warnings,
            ..Default::default()
        };
    }
    if let Err(error) = json_patch::patch(&mut desired, &to_json_patch(&fresh.patch)) {
        // Cannot happen (the patch was rendered from this very object); if it ever does,
        // the pod is left as it came rather than half-changed.
        fresh
            .warnings
            .push(format!("kips: pod not re-rendered: {error}"));
        return Mutation {
            warnings: fresh.warnings,
            effect: Effect::Skipped,
            ..Default::default()
        };
    }
    keep_additions(current, &mut desired);
    let patch: Vec<PatchOp> = json_patch::diff(current, &desired)
        .0
        .into_iter()
        .map(PatchOp::Json)
        .collect();
    let effect = match (patch.is_empty(), fresh.effect) {
        (true, Effect::Injected) => Effect::Unchanged,
        (_, effect) => effect,
    };
    Mutation {
        patch,
        warnings: fresh.warnings,
        effect,
        needs: None,
    }
}

/// The pod carries exactly the status a fresh injection would write, and the kips containers
/// that status lists, in the lists it names.
fn injection_intact(current: &Value, fresh_patch: &[PatchOp]) -> bool {
    let status_path = pointer(["metadata", "annotations", STATUS]);
    let Some(rendered) = fresh_patch.iter().find_map(|op| match op {
        PatchOp::Json(PatchOperation::Add(add)) if add.path == status_path => add.value.as_str(),
        _ => None,
    }) else {
        return false;
    };
    let Ok(status) = serde_json::from_str::<InjectionStatus>(rendered) else {
        return false;
    };
    let current_status = current
        .pointer(status_path.as_str())
        .and_then(Value::as_str);
    current_status == Some(rendered)
        && kips_containers(current, "initContainers") == status.init_containers
        && kips_containers(current, "containers") == status.containers
}

fn kips_containers(pod: &Value, list: &str) -> Vec<String> {
    pod["spec"][list]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str())
        .filter(|name| matches!(*name, BRIDGE_CONTAINER | INIT_CONTAINER))
        .map(str::to_owned)
        .collect()
}

/// The container fields kips renders; any other field of a kips container was added by
/// someone else (defaulting, admission plugins, other webhooks) and is kept on re-render.
const RENDERED_FIELDS: [&str; 10] = [
    "name",
    "image",
    "imagePullPolicy",
    "args",
    "env",
    "ports",
    "readinessProbe",
    "resources",
    "restartPolicy",
    "securityContext",
];

/// Lists of named entries that others extend (a token mount, a proxy variable): their
/// entries survive a re-render beside kips' own.
const SHARED_LISTS: [&str; 2] = ["env", "volumeMounts"];

/// Carries what others added to kips' containers in `current` over to `desired`.
fn keep_additions(current: &Value, desired: &mut Value) {
    let before: Vec<&Value> = ["containers", "initContainers"]
        .iter()
        .flat_map(|list| current["spec"][*list].as_array().into_iter().flatten())
        .collect();
    for list in ["containers", "initContainers"] {
        // `get_mut`, not indexing: indexing would insert `null` lists into a pod without them.
        let Some(containers) = desired
            .get_mut("spec")
            .and_then(|spec| spec.get_mut(list))
            .and_then(Value::as_array_mut)
        else {
            continue;
        };
        for container in containers {
            let name = container["name"].as_str().unwrap_or_default();
            if !matches!(name, BRIDGE_CONTAINER | INIT_CONTAINER) {
                continue;
            }
            if let Some(old) = before.iter().find(|c| c["name"] == name) {
                for (field, value) in old.as_object().into_iter().flatten() {
                    if !RENDERED_FIELDS.contains(&field.as_str()) {
                        container[field] = value.clone();
                    } else if let Some(ours) = container.get_mut(field) {
                        merge_additions(field, value, ours);
                    }
                }
            }
        }
    }
}

/// Inside a field kips renders: keys of objects kips does not set, and entries of shared
/// lists kips does not name, are kept from `theirs`.
fn merge_additions(field: &str, theirs: &Value, ours: &mut Value) {
    match (theirs, ours) {
        (Value::Object(theirs), Value::Object(ours)) => {
            for (key, value) in theirs {
                match ours.get_mut(key) {
                    Some(mine) => merge_additions(key, value, mine),
                    None => {
                        ours.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (Value::Array(theirs), Value::Array(ours)) if SHARED_LISTS.contains(&field) => {
            for entry in theirs {
                if !ours.iter().any(|mine| mine["name"] == entry["name"]) {
                    ours.push(entry.clone());
                }
            }
        }
        _ => {}
    }
}
