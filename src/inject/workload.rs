//! Workload mutation (Deployment, StatefulSet, DaemonSet): validate the kips annotations,
//! copy them into the pod template so the controller rolls out injected pods, and remove the
//! copies when the user removes the annotations.
//!
//! Annotations a user wrote into the template directly (the GitOps way) belong to the user:
//! kips validates them but never changes or removes them. `kips.io/copied` on the template
//! lists the keys kips owns there. Which annotations the pods get is
//! [`WorkloadAnnotations`]' rule, shared with the laptop.

use std::collections::BTreeSet;

use serde_json::Value;

use super::patch::{PatchOp, add, pointer, remove, replace};
use super::view::{PodView, TemplateView, WorkloadView};
use super::{Effect, InjectConfig, Mutation, PodNeeds, plan, reinvoke};
use crate::annotations::{
    COPIED, KipsAnnotations, PortMode, REDIRECT, WorkloadAnnotations, copied_marker, has_kips_key,
    is_bookkeeping,
};

/// A refused admission, with the message the user sees.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Denial(pub String);

const TEMPLATE_PREFIX: &str = "spec.template.metadata.annotations";

pub fn mutate(object_json: &str, config: &InjectConfig) -> Result<Mutation, WorkloadError> {
    let workload: WorkloadView = serde_json::from_str(object_json)?;
    let template = || {
        serde_json::from_str::<Value>(object_json)
            .ok()
            .and_then(|mut object| object.pointer_mut("/spec/template").map(Value::take))
    };
    Ok(mutate_view(workload, template, config)?)
}

/// Why `kips inject` could not admit a workload.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("not a workload: {0}")]
    Unreadable(#[from] serde_json::Error),
    #[error(transparent)]
    Denied(#[from] Denial),
}

fn joined<T: ToString>(errors: impl IntoIterator<Item = T>) -> String {
    errors
        .into_iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Admits a workload already read into a view. `template` gives its pod template as a JSON
/// value, which only a template kips injected before needs (`kips inject` output applied to
/// the cluster): its ports are checked as they were before kips renamed them.
pub fn mutate_view(
    workload: WorkloadView,
    template: impl FnOnce() -> Option<Value>,
    config: &InjectConfig,
) -> Result<Mutation, Denial> {
    let WorkloadView { metadata, spec } = workload;
    let Some(TemplateView {
        metadata: template_meta,
        spec: template_spec,
    }) = spec.template
    else {
        if has_kips_key(metadata.annotation_pairs().map(|(k, _)| k)) {
            return Err(Denial(
                "spec.template is missing; kips copies the workload's kips.io/* annotations into its pod template".into(),
            ));
        }
        return Ok(Mutation::default());
    };
    let template_meta_exists = template_meta.is_some();
    let template_annotations_exist = template_meta
        .as_ref()
        .is_some_and(|m| m.annotations.is_some());
    let template_pod = PodView {
        metadata: template_meta.unwrap_or_default(),
        spec: template_spec,
    };
    let kips = WorkloadAnnotations::new(
        metadata.annotation_pairs(),
        template_pod.metadata.annotation_pairs(),
    );
    if kips.is_empty() {
        return Ok(Mutation::default());
    }

    let mut errors = Vec::new();
    for (key, _) in kips.metadata() {
        if is_bookkeeping(key) {
            errors.push(format!("{key}: kips writes this annotation on pods and pod templates; remove it from the workload's metadata"));
        }
    }
    if let Err(found) = KipsAnnotations::parse(kips.metadata().iter().copied()) {
        errors.extend(found.iter().map(ToString::to_string));
    }
    if let Err(found) = KipsAnnotations::parse(kips.user_template()) {
        errors.extend(found.iter().map(|e| format!("{TEMPLATE_PREFIX}: {e}")));
    }
    if !errors.is_empty() {
        return Err(Denial(errors.join("; ")));
    }

    let copies = kips.copies().map_err(|e| Denial(e.to_string()))?;
    let mut warnings = copies.conflicts.clone();
    let effective = kips
        .effective_with(&copies)
        .map_err(|invalid| Denial(joined(&invalid.errors)))?;

    let name = metadata.name.as_deref().unwrap_or_default();
    let mut needs = None;
    if effective.wants_injection() {
        if template_pod.spec.host_network == Some(true) {
            return Err(Denial(
                "kips cannot redirect a workload whose pods use hostNetwork: it never rewrites the node's network or ports".into(),
            ));
        }
        let workload_name = (!name.is_empty()).then_some(name);
        // A template kips injected is planned as it was before: its own containers and
        // renamed ports would otherwise hide the ports the annotations name.
        let stripped = super::carries_injection(&template_pod)
            .then(template)
            .flatten()
            .map(|mut template| {
                reinvoke::strip(&mut template);
                template
            });
        let planned_pod = stripped.as_ref().map(PodView::deserialize_from);
        let plan = plan::plan(
            planned_pod.as_ref().unwrap_or(&template_pod),
            &effective,
            config,
            workload_name,
        )
        .map_err(|reason| {
            // This one names its own annotation, `kips.io/reverse`.
            if let plan::PlanError::RelayBothWays(both) = reason {
                return Denial(both.to_string());
            }
            let redirect = kips
                .user_template()
                .find(|(k, _)| *k == REDIRECT)
                .map(|(_, v)| v)
                .or_else(|| copies.values.get(REDIRECT).map(String::as_str))
                .unwrap_or_default();
            Denial(format!("{REDIRECT}: \"{redirect}\": {reason}"))
        })?;
        needs = Some(PodNeeds {
            relay_secret: plan.secret.clone(),
            net_admin: plan.mode == Some(PortMode::Iptables),
        });
        warnings.extend(plan.warnings);
    }

    let template_current = kips.template();
    let mut patch: Vec<PatchOp> = Vec::new();
    let path = |key: &str| pointer(["spec", "template", "metadata", "annotations", key]);
    let keys: BTreeSet<&str> = kips
        .copied()
        .iter()
        .map(String::as_str)
        .chain(copies.values.keys().copied())
        .collect();
    for key in keys {
        match (copies.values.get(key), template_current.get(key)) {
            (Some(want), Some(have)) if want == have => {}
            (Some(want), Some(_)) => patch.push(replace(path(key), Value::String(want.clone()))),
            (Some(want), None) => patch.push(add(path(key), Value::String(want.clone()))),
            (None, Some(_)) => patch.push(remove(path(key))),
            (None, None) => {}
        }
    }
    let marker = copied_marker(copies.values.keys().copied());
    match (marker.is_empty(), template_current.get(COPIED)) {
        (true, Some(_)) => patch.push(remove(path(COPIED))),
        (false, Some(have)) if *have == marker => {}
        (false, Some(_)) => patch.push(replace(path(COPIED), Value::String(marker))),
        (false, None) => patch.push(add(path(COPIED), Value::String(marker))),
        (true, None) => {}
    }
    // JSON Patch `add` needs the parent object; when the template has none, add it first.
    if !template_annotations_exist && !patch.is_empty() {
        let mut parents = Vec::new();
        if !template_meta_exists {
            parents.push(add(
                pointer(["spec", "template", "metadata"]),
                Value::Object(Default::default()),
            ));
        }
        parents.push(add(
            pointer(["spec", "template", "metadata", "annotations"]),
            Value::Object(Default::default()),
        ));
        patch.splice(0..0, parents);
    }

    let effect = match (kips.template_wants_injection(), effective.wants_injection()) {
        (false, true) => Effect::RedirectOn,
        (true, false) => Effect::RedirectOff,
        (true, true) if !patch.is_empty() => Effect::RedirectChanged,
        _ => Effect::Unchanged,
    };
    Ok(Mutation {
        patch,
        warnings,
        effect,
        needs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::Deployment;
    use serde_json::json;

    fn deployment(annotations: Value, template_annotations: Option<Value>) -> Value {
        let mut template_meta = json!({"labels": {"app": "api"}});
        if let Some(t) = template_annotations {
            template_meta["annotations"] = t;
        }
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "api", "namespace": "shop", "annotations": annotations},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "api"}},
                "template": {
                    "metadata": template_meta,
                    "spec": {"containers": [{"name": "app", "image": "api:1",
                        "ports": [{"name": "http", "containerPort": 8080}]}]}
                }
            }
        })
    }

    fn admit(object: &Value) -> Result<Mutation, Denial> {
        let text = object.to_string();
        mutate_view(
            serde_json::from_str(&text).unwrap(),
            || object.pointer("/spec/template").cloned(),
            &InjectConfig::default(),
        )
    }

    fn apply(object: &Value, mutation: &Mutation) -> Value {
        let mut patched = object.clone();
        json_patch::patch(
            &mut patched,
            &crate::inject::patch::to_json_patch(&mutation.patch),
        )
        .unwrap();
        serde_json::from_value::<Deployment>(patched.clone()).expect("a valid Deployment");
        patched
    }

    fn template_annotations(object: &Value) -> &Value {
        &object["spec"]["template"]["metadata"]["annotations"]
    }

    /// Fuzz finding (target `review`, fuzz/README.md): a Deployment without
    /// `spec.template` was answered with a patch adding `/spec/template/metadata`, which
    /// cannot apply (its parent is missing), so the API server failed the request on kips'
    /// patch instead of saying what was wrong.
    #[test]
    fn a_workload_without_a_template_is_denied_not_patched() {
        let mut object = deployment(json!({"kips.io/redirect": "api:8080"}), None);
        object["spec"].as_object_mut().unwrap().remove("template");
        let denial = admit(&object).unwrap_err();
        assert_eq!(
            denial.0,
            "spec.template is missing; kips copies the workload's kips.io/* annotations into its pod template"
        );
        object["spec"]["template"] = Value::Null;
        assert!(admit(&object).is_err());
        // Without kips annotations it is none of kips' business.
        object["metadata"]["annotations"] = json!({"team": "a"});
        assert_eq!(admit(&object).unwrap(), Mutation::default());
    }

    /// Fuzz finding (target `inject_yaml`): a template kips had injected in named mode (the
    /// output of `kips inject` applied to the cluster, the GitOps way) was denied when the
    /// workload was admitted again: the app's port "http" had been renamed `kips-app-8080`
    /// and the sidecar, which took the name, is kips' own, so no container declared it.
    #[test]
    fn a_template_injected_in_named_mode_is_admitted_again_unchanged() {
        let object = deployment(json!({}), Some(json!({"kips.io/redirect": "http"})));
        let config = InjectConfig::default();
        let mut injected = object.clone();
        let template = injected["spec"]["template"].to_string();
        let pod = crate::inject::mutate_pod(&template, &config, Some("api")).unwrap();
        json_patch::patch(
            &mut injected["spec"]["template"],
            &crate::inject::patch::to_json_patch(&pod.patch),
        )
        .unwrap();
        let ports = &injected["spec"]["template"]["spec"]["containers"][0]["ports"];
        assert_eq!(ports[0]["name"], "kips-app-8080", "named mode renamed it");
        let again = admit(&injected).expect("admitted, not denied");
        assert!(again.patch.is_empty(), "{:?}", again.patch);
        assert_eq!(
            again.needs,
            Some(PodNeeds {
                relay_secret: "kips-relay".into(),
                net_admin: false
            })
        );
    }

    #[test]
    fn valid_annotations_are_copied_normalised_and_marked() {
        let object = deployment(
            json!({"kips.io/redirect": " api:8080 ", "kips.io/port-mode": "iptables", "team": "a"}),
            None,
        );
        let mutation = admit(&object).unwrap();
        assert_eq!(mutation.effect, Effect::RedirectOn);
        assert_eq!(
            mutation.needs,
            Some(PodNeeds {
                relay_secret: "kips-relay".into(),
                net_admin: true
            })
        );
        let patched = apply(&object, &mutation);
        assert_eq!(
            template_annotations(&patched),
            &json!({"kips.io/port-mode": "iptables", "kips.io/redirect": "api:8080", "kips.io/copied": "port-mode,redirect"})
        );
        let again = admit(&patched).unwrap();
        assert!(again.patch.is_empty(), "{:?}", again.patch);
        assert_eq!(again.effect, Effect::Unchanged);
    }

    #[test]
    fn removing_the_annotation_removes_only_the_copies() {
        let object = deployment(
            json!({"kips.io/redirect": "api:8080"}),
            Some(json!({"kips.io/relay-secret": "mine", "sidecar.example/x": "1"})),
        );
        let copied = apply(&object, &admit(&object).unwrap());
        assert_eq!(template_annotations(&copied)["kips.io/copied"], "redirect");

        let mut removed = copied.clone();
        removed["metadata"]["annotations"] = json!({});
        let mutation = admit(&removed).unwrap();
        assert_eq!(mutation.effect, Effect::RedirectOff);
        assert!(
            mutation
                .patch
                .iter()
                .all(|op| matches!(op.to_operation(), json_patch::PatchOperation::Remove(_)))
        );
        let reverted = apply(&removed, &mutation);
        assert_eq!(
            template_annotations(&reverted),
            &json!({"kips.io/relay-secret": "mine", "sidecar.example/x": "1"})
        );
        assert!(admit(&reverted).unwrap().patch.is_empty());
    }

    #[test]
    fn changing_the_annotation_replaces_the_copy() {
        let object = deployment(json!({"kips.io/redirect": "api:8080"}), None);
        let mut copied = apply(&object, &admit(&object).unwrap());
        copied["metadata"]["annotations"]["kips.io/redirect"] = json!("web:8080");
        let mutation = admit(&copied).unwrap();
        assert_eq!(mutation.effect, Effect::RedirectChanged);
        assert_eq!(
            mutation.patch,
            vec![replace(
                pointer([
                    "spec",
                    "template",
                    "metadata",
                    "annotations",
                    "kips.io/redirect"
                ]),
                json!("web:8080")
            )]
        );
    }

    #[test]
    fn template_annotations_belong_to_the_user() {
        // The GitOps way: written directly into the template, never touched by kips.
        let object = deployment(json!({}), Some(json!({"kips.io/redirect": "api:http"})));
        let mutation = admit(&object).unwrap();
        assert!(mutation.patch.is_empty());
        assert_eq!(mutation.effect, Effect::Unchanged);
        assert!(mutation.needs.is_some());

        let both = deployment(
            json!({"kips.io/redirect": "api:8080"}),
            Some(json!({"kips.io/redirect": "api:http"})),
        );
        let mutation = admit(&both).unwrap();
        assert!(mutation.patch.is_empty());
        assert!(mutation.warnings[0].contains("the template's value is used"));
    }

    #[test]
    fn invalid_annotations_are_denied_with_a_precise_message() {
        for (value, part) in [
            (
                "api:80x0",
                "port \"80x0\" is not a number 1-65535 or a port name",
            ),
            (":8080", "relay name is empty"),
            ("api:70000", "port \"70000\""),
        ] {
            let denial = admit(&deployment(json!({"kips.io/redirect": value}), None)).unwrap_err();
            assert!(
                denial
                    .0
                    .starts_with(&format!("kips.io/redirect: \"{value}\": ")),
                "{}",
                denial.0
            );
            assert!(denial.0.contains(part), "{}", denial.0);
            assert!(
                denial
                    .0
                    .contains("(expected <relay>:<port>[/udp][,...] or <port>)"),
                "{}",
                denial.0
            );
        }
        let denial = admit(&deployment(
            json!({}),
            Some(json!({"kips.io/port-mode": "nat"})),
        ))
        .unwrap_err();
        assert!(
            denial
                .0
                .starts_with("spec.template.metadata.annotations: kips.io/port-mode: \"nat\""),
            "{}",
            denial.0
        );
        let denial = admit(&deployment(json!({"kips.io/redirect": "api:grpc"}), None)).unwrap_err();
        assert_eq!(
            denial.0,
            "kips.io/redirect: \"api:grpc\": no container declares a port named \"grpc\" (declared names: http)"
        );
        let denial = admit(&deployment(json!({"kips.io/status": "{}"}), None)).unwrap_err();
        assert!(denial.0.contains("remove it from the workload's metadata"));
        let denial = admit(&deployment(json!({"kips.io/redirct": "api:8080"}), None)).unwrap_err();
        assert!(denial.0.contains("did you mean kips.io/redirect?"));
    }

    #[test]
    fn a_relay_in_both_directions_is_denied_naming_both_annotations() {
        // The redirect's relay defaults to the workload's name, `api`.
        let object = deployment(
            json!({"kips.io/redirect": "8080", "kips.io/reverse": "api=db.shop.svc:5432"}),
            None,
        );
        let denial = admit(&object).unwrap_err();
        assert_eq!(
            denial.0,
            "kips.io/reverse: \"api=db.shop.svc:5432\": relay \"api\" is also used by kips.io/redirect (\"8080\" takes the workload's name, api, as its relay); a relay carries one direction (expected a relay name not used in kips.io/redirect)"
        );
    }

    #[test]
    fn udp_redirects_warn_that_azbridge_stops_after_a_failed_send() {
        let mut object = deployment(json!({"kips.io/redirect": "dns:53/udp"}), None);
        object["spec"]["template"]["spec"]["containers"][0]["ports"] =
            json!([{"containerPort": 53, "protocol": "UDP"}]);
        let mutation = admit(&object).unwrap();
        assert!(
            mutation
                .warnings
                .iter()
                .any(|w| w.contains("azbridge stops forwarding UDP") && w.len() <= 256),
            "{:?}",
            mutation.warnings
        );
        let tcp = admit(&deployment(json!({"kips.io/redirect": "8080"}), None)).unwrap();
        assert!(tcp.warnings.is_empty(), "{:?}", tcp.warnings);
    }

    #[test]
    fn host_network_workloads_are_denied() {
        let mut object = deployment(json!({"kips.io/redirect": "8080"}), None);
        object["spec"]["template"]["spec"]["hostNetwork"] = json!(true);
        assert!(admit(&object).unwrap_err().0.contains("hostNetwork"));
    }

    #[test]
    fn workloads_without_kips_annotations_are_untouched() {
        let object = deployment(json!({"team": "a"}), Some(json!({"b": "c"})));
        assert_eq!(admit(&object).unwrap(), Mutation::default());
        let mut bare = deployment(json!({}), None);
        bare["metadata"]
            .as_object_mut()
            .unwrap()
            .remove("annotations");
        bare["spec"]["template"]
            .as_object_mut()
            .unwrap()
            .remove("metadata");
        assert_eq!(admit(&bare).unwrap(), Mutation::default());
    }

    #[test]
    fn missing_template_metadata_is_created_before_the_copy() {
        let mut object = deployment(json!({"kips.io/redirect": "8080"}), None);
        object["spec"]["template"]
            .as_object_mut()
            .unwrap()
            .remove("metadata");
        let mutation = admit(&object).unwrap();
        assert_eq!(
            mutation.patch[0],
            add(pointer(["spec", "template", "metadata"]), json!({}))
        );
        assert_eq!(
            mutation.patch[1],
            add(
                pointer(["spec", "template", "metadata", "annotations"]),
                json!({})
            )
        );
        apply(&object, &mutation);
    }
}
