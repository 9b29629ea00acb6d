//! A workload as the developer's commands see it: one of the three apps/v1 kinds, its kips
//! annotations (from its metadata, or from its pod template the GitOps way), and its pod
//! template. Pure: built from objects read elsewhere (the cluster, or a manifest file).

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{PodSpec, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use serde_json::Value;

use super::target::{WorkloadKind, WorkloadRef};
use crate::annotations::{COPIED, KipsAnnotations, PREFIX, STATUS, USER_KEYS, copied_keys};

/// One workload object, typed.
#[derive(Debug, Clone)]
pub enum Object {
    Deployment(Box<Deployment>),
    StatefulSet(Box<StatefulSet>),
    DaemonSet(Box<DaemonSet>),
}

impl Object {
    pub fn kind(&self) -> WorkloadKind {
        match self {
            Object::Deployment(_) => WorkloadKind::Deployment,
            Object::StatefulSet(_) => WorkloadKind::StatefulSet,
            Object::DaemonSet(_) => WorkloadKind::DaemonSet,
        }
    }

    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Object::Deployment(o) => &o.metadata,
            Object::StatefulSet(o) => &o.metadata,
            Object::DaemonSet(o) => &o.metadata,
        }
    }

    pub fn template(&self) -> Option<&PodTemplateSpec> {
        match self {
            Object::Deployment(o) => o.spec.as_ref().map(|s| &s.template),
            Object::StatefulSet(o) => o.spec.as_ref().map(|s| &s.template),
            Object::DaemonSet(o) => o.spec.as_ref().map(|s| &s.template),
        }
    }

    pub fn selector(&self) -> Option<&LabelSelector> {
        match self {
            Object::Deployment(o) => o.spec.as_ref().map(|s| &s.selector),
            Object::StatefulSet(o) => o.spec.as_ref().map(|s| &s.selector),
            Object::DaemonSet(o) => o.spec.as_ref().map(|s| &s.selector),
        }
    }

    pub fn name(&self) -> &str {
        self.metadata().name.as_deref().unwrap_or_default()
    }

    pub fn namespace(&self) -> Option<&str> {
        self.metadata().namespace.as_deref()
    }

    pub fn reference(&self) -> WorkloadRef {
        WorkloadRef {
            kind: self.kind(),
            name: self.name().to_owned(),
        }
    }

    pub fn annotations(&self) -> &BTreeMap<String, String> {
        static EMPTY: BTreeMap<String, String> = BTreeMap::new();
        self.metadata().annotations.as_ref().unwrap_or(&EMPTY)
    }

    pub fn template_annotations(&self) -> &BTreeMap<String, String> {
        static EMPTY: BTreeMap<String, String> = BTreeMap::new();
        self.template()
            .and_then(|t| t.metadata.as_ref())
            .and_then(|m| m.annotations.as_ref())
            .unwrap_or(&EMPTY)
    }

    pub fn pod_spec(&self) -> Option<&PodSpec> {
        self.template().and_then(|t| t.spec.as_ref())
    }

    /// Reads a workload from a JSON/YAML value of one of the three kinds.
    pub fn from_value(value: Value) -> Result<Self> {
        let kind = value["kind"].as_str().unwrap_or_default().to_owned();
        Ok(match WorkloadKind::from_kind(&kind) {
            Some(WorkloadKind::Deployment) => {
                Object::Deployment(Box::new(serde_json::from_value(value)?))
            }
            Some(WorkloadKind::StatefulSet) => {
                Object::StatefulSet(Box::new(serde_json::from_value(value)?))
            }
            Some(WorkloadKind::DaemonSet) => {
                Object::DaemonSet(Box::new(serde_json::from_value(value)?))
            }
            None => bail!("kind \"{kind}\" is not a Deployment, StatefulSet or DaemonSet"),
        })
    }
}

/// Finds `target` among the documents of a manifest (multi-document YAML).
pub fn from_manifest(text: &str, target: &WorkloadRef, source: &str) -> Result<Object> {
    use serde::Deserialize;
    let mut seen = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = Value::deserialize(document)
            .with_context(|| format!("{source}: document {} is not valid YAML", index + 1))?;
        if value.is_null() {
            continue;
        }
        let kind = value["kind"].as_str().unwrap_or_default();
        let name = value["metadata"]["name"].as_str().unwrap_or_default();
        if kind == target.kind.kind() && name == target.name {
            return Object::from_value(value)
                .with_context(|| format!("{source}: reading {target}"));
        }
        if let Some(kind) = WorkloadKind::from_kind(kind) {
            seen.push(format!("{kind}/{name}"));
        }
    }
    if seen.is_empty() {
        bail!("{source} holds no Deployment, StatefulSet or DaemonSet, so no {target}");
    }
    bail!("{source} holds no {target} (it has {})", seen.join(", "))
}

/// The kips annotations in effect for a workload's pods, computed the way the webhook does:
/// the user's own template annotations win; copies the webhook made (listed in
/// `kips.io/copied`) stand for the workload's metadata, which is read instead.
pub fn effective_annotations(
    metadata: &BTreeMap<String, String>,
    template: &BTreeMap<String, String>,
) -> Result<KipsAnnotations, String> {
    let copied = copied_keys(template.get(COPIED).map(String::as_str));
    let mut pairs: BTreeMap<&str, &str> = metadata
        .iter()
        .filter(|(k, _)| USER_KEYS.contains(&k.as_str()))
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let mut from_template = false;
    for (key, value) in template {
        if key.starts_with(PREFIX) && key != COPIED && key != STATUS && !copied.contains(key) {
            pairs.insert(key, value);
            from_template = true;
        }
    }
    KipsAnnotations::parse(pairs).map_err(|errors| {
        let place = if from_template {
            "the workload's kips annotations (metadata and pod template)"
        } else {
            "the workload's kips annotations"
        };
        format!(
            "{place} are invalid: {}",
            errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        )
    })
}

/// The kips keys a user wrote into the pod template directly (kips never removes them).
pub fn user_template_keys(template: &BTreeMap<String, String>) -> Vec<String> {
    let copied = copied_keys(template.get(COPIED).map(String::as_str));
    template
        .keys()
        .filter(|k| USER_KEYS.contains(&k.as_str()) && !copied.contains(k.as_str()) && *k != COPIED)
        .cloned()
        .collect()
}

impl Object {
    /// The effective kips annotations (see [`effective_annotations`]).
    pub fn kips(&self) -> Result<KipsAnnotations, String> {
        effective_annotations(self.annotations(), self.template_annotations())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotations::{REDIRECT, REVERSE};
    use serde_json::json;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn metadata_annotations_count_and_copies_are_not_read_twice() {
        let kips = effective_annotations(
            &map(&[(REDIRECT, "api:8080"), ("team", "a")]),
            &map(&[(REDIRECT, "api:8080"), (COPIED, "redirect")]),
        )
        .unwrap();
        assert_eq!(kips.redirects.len(), 1);
    }

    #[test]
    fn stale_copies_are_ignored_and_user_template_keys_win() {
        // The user removed the annotation; the template still holds the webhook's copy.
        let kips = effective_annotations(
            &map(&[]),
            &map(&[(REDIRECT, "api:8080"), (COPIED, "redirect")]),
        )
        .unwrap();
        assert!(!kips.wants_injection());
        // GitOps: the template's own annotation is what the pods get.
        let kips = effective_annotations(
            &map(&[(REDIRECT, "api:9090")]),
            &map(&[(REDIRECT, "api:8080"), (REVERSE, "db=pg:5432")]),
        )
        .unwrap();
        assert_eq!(kips.redirects[0].to_string(), "api:8080");
        assert_eq!(kips.reverses.len(), 1);
        assert_eq!(
            user_template_keys(&map(&[
                (REDIRECT, "api:8080"),
                (REVERSE, "db=pg:5432"),
                (COPIED, "redirect")
            ])),
            [REVERSE]
        );
    }

    #[test]
    fn invalid_annotations_are_reported() {
        let err = effective_annotations(&map(&[(REDIRECT, "api:80x0")]), &map(&[])).unwrap_err();
        assert!(err.contains("port \"80x0\""), "{err}");
    }

    #[test]
    fn manifests_are_searched_by_kind_and_name() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: api}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec: {selector: {}, template: {}}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: api, annotations: {kips.io/redirect: \"8080\"}}\nspec: {selector: {}, template: {}}\n";
        let target: WorkloadRef = "deploy/api".parse().unwrap();
        let object = from_manifest(text, &target, "m.yaml").unwrap();
        assert_eq!(object.kind(), WorkloadKind::Deployment);
        assert_eq!(object.annotations()[REDIRECT], "8080");
        let err = from_manifest(text, &"sts/api".parse().unwrap(), "m.yaml").unwrap_err();
        assert_eq!(
            err.to_string(),
            "m.yaml holds no statefulset/api (it has deployment/web, deployment/api)"
        );
        let value = json!({"kind": "Job"});
        assert!(Object::from_value(value).is_err());
    }
}
