//! The workloads kips redirects (apps/v1 Deployments, StatefulSets, DaemonSets): their kinds,
//! `<kind>/<name>` references as users type them, and one typed enum over the three objects.
//! Pure: objects are read elsewhere (from the API server, or from a manifest file).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ObjectReference, PodSpec, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use serde_json::Value;

use crate::annotations::{InvalidAnnotations, KipsAnnotations, WorkloadAnnotations};

/// The workload kinds kips redirects (apps/v1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WorkloadKind {
    Deployment,
    StatefulSet,
    DaemonSet,
}

impl WorkloadKind {
    pub const ALL: [WorkloadKind; 3] = [
        WorkloadKind::Deployment,
        WorkloadKind::StatefulSet,
        WorkloadKind::DaemonSet,
    ];

    /// The `kind` field of the object.
    pub fn kind(self) -> &'static str {
        match self {
            WorkloadKind::Deployment => "Deployment",
            WorkloadKind::StatefulSet => "StatefulSet",
            WorkloadKind::DaemonSet => "DaemonSet",
        }
    }

    /// The lowercase name kubectl prints (`deployment/api`).
    pub fn lower(self) -> &'static str {
        match self {
            WorkloadKind::Deployment => "deployment",
            WorkloadKind::StatefulSet => "statefulset",
            WorkloadKind::DaemonSet => "daemonset",
        }
    }

    pub fn from_kind(kind: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.kind() == kind)
    }
}

impl fmt::Display for WorkloadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.lower())
    }
}

/// A text that does not name a workload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error(
        "\"{0}\" is not a workload kind kips redirects (deployment/deploy, statefulset/sts, daemonset/ds)"
    )]
    Kind(String),
    #[error("\"{0}\" is not <kind>/<name> (for example deployment/api, sts/db, ds/agent)")]
    Form(String),
    #[error(
        "\"{name}\" in \"{text}\" is not a valid {kind} name (lowercase letters, digits, '-' and '.')"
    )]
    Name {
        name: String,
        text: String,
        kind: WorkloadKind,
    },
}

impl FromStr for WorkloadKind {
    type Err = ReferenceError;
    fn from_str(text: &str) -> Result<Self, ReferenceError> {
        let lower = text.to_ascii_lowercase();
        // kubectl's spellings: singular, plural, short name, and `kind.group`.
        let bare = lower
            .strip_suffix(".apps")
            .or_else(|| lower.strip_suffix(".v1.apps"))
            .unwrap_or(&lower);
        match bare {
            "deployment" | "deployments" | "deploy" => Ok(WorkloadKind::Deployment),
            "statefulset" | "statefulsets" | "sts" => Ok(WorkloadKind::StatefulSet),
            "daemonset" | "daemonsets" | "ds" => Ok(WorkloadKind::DaemonSet),
            _ => Err(ReferenceError::Kind(text.to_owned())),
        }
    }
}

/// `<kind>/<name>`, e.g. `deployment/api` or `sts/db`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkloadRef {
    pub kind: WorkloadKind,
    pub name: String,
}

impl fmt::Display for WorkloadRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind, self.name)
    }
}

impl FromStr for WorkloadRef {
    type Err = ReferenceError;
    fn from_str(text: &str) -> Result<Self, ReferenceError> {
        let Some((kind, name)) = text.split_once('/') else {
            return Err(ReferenceError::Form(text.to_owned()));
        };
        let kind: WorkloadKind = kind.parse()?;
        if !crate::annotations::is_dns_subdomain(name) {
            return Err(ReferenceError::Name {
                name: name.to_owned(),
                text: text.to_owned(),
                kind,
            });
        }
        Ok(WorkloadRef {
            kind,
            name: name.to_owned(),
        })
    }
}

/// One workload object, typed.
#[derive(Debug, Clone)]
pub enum Workload {
    Deployment(Box<Deployment>),
    StatefulSet(Box<StatefulSet>),
    DaemonSet(Box<DaemonSet>),
}

impl From<Deployment> for Workload {
    fn from(object: Deployment) -> Self {
        Workload::Deployment(Box::new(object))
    }
}

impl From<StatefulSet> for Workload {
    fn from(object: StatefulSet) -> Self {
        Workload::StatefulSet(Box::new(object))
    }
}

impl From<DaemonSet> for Workload {
    fn from(object: DaemonSet) -> Self {
        Workload::DaemonSet(Box::new(object))
    }
}

/// A document that is not one of the workloads kips redirects, or not the one asked for.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("kind \"{0}\" is not a Deployment, StatefulSet or DaemonSet")]
    Kind(String),
    #[error("{source_name}: document {index} is not valid YAML: {error}")]
    Yaml {
        source_name: String,
        index: usize,
        error: serde_yaml::Error,
    },
    #[error("{source_name}: reading {target}: {error}")]
    Object {
        source_name: String,
        target: WorkloadRef,
        error: Box<ManifestError>,
    },
    #[error("not a valid {kind}: {error}")]
    Invalid {
        kind: &'static str,
        error: serde_json::Error,
    },
    #[error("{source_name} holds no Deployment, StatefulSet or DaemonSet, so no {target}")]
    NoWorkloads {
        source_name: String,
        target: WorkloadRef,
    },
    #[error("{source_name} holds no {target} (it has {})", .seen.join(", "))]
    NotFound {
        source_name: String,
        target: WorkloadRef,
        seen: Vec<String>,
    },
}

impl Workload {
    pub fn kind(&self) -> WorkloadKind {
        match self {
            Workload::Deployment(_) => WorkloadKind::Deployment,
            Workload::StatefulSet(_) => WorkloadKind::StatefulSet,
            Workload::DaemonSet(_) => WorkloadKind::DaemonSet,
        }
    }

    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Workload::Deployment(o) => &o.metadata,
            Workload::StatefulSet(o) => &o.metadata,
            Workload::DaemonSet(o) => &o.metadata,
        }
    }

    pub fn template(&self) -> Option<&PodTemplateSpec> {
        match self {
            Workload::Deployment(o) => o.spec.as_ref().map(|s| &s.template),
            Workload::StatefulSet(o) => o.spec.as_ref().map(|s| &s.template),
            Workload::DaemonSet(o) => o.spec.as_ref().map(|s| &s.template),
        }
    }

    pub fn selector(&self) -> Option<&LabelSelector> {
        match self {
            Workload::Deployment(o) => o.spec.as_ref().map(|s| &s.selector),
            Workload::StatefulSet(o) => o.spec.as_ref().map(|s| &s.selector),
            Workload::DaemonSet(o) => o.spec.as_ref().map(|s| &s.selector),
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

    /// The reference an Event names the workload by.
    pub fn object_reference(&self) -> ObjectReference {
        use kube::Resource;
        match self {
            Workload::Deployment(o) => o.object_ref(&()),
            Workload::StatefulSet(o) => o.object_ref(&()),
            Workload::DaemonSet(o) => o.object_ref(&()),
        }
    }

    pub fn pod_spec(&self) -> Option<&PodSpec> {
        self.template().and_then(|t| t.spec.as_ref())
    }

    /// The workload's kips annotations, sorted by where they come from.
    pub fn kips_annotations(&self) -> WorkloadAnnotations<'_> {
        fn pairs(map: &BTreeMap<String, String>) -> impl Iterator<Item = (&str, &str)> {
            map.iter().map(|(k, v)| (k.as_str(), v.as_str()))
        }
        WorkloadAnnotations::new(
            pairs(self.annotations()),
            pairs(self.template_annotations()),
        )
    }

    /// The kips annotations the workload's pods get (the rule the webhook applies).
    pub fn kips(&self) -> Result<KipsAnnotations, InvalidAnnotations> {
        self.kips_annotations().effective()
    }

    /// Reads a workload from a JSON/YAML value of one of the three kinds.
    pub fn from_value(value: Value) -> Result<Self, ManifestError> {
        let kind = value["kind"].as_str().unwrap_or_default().to_owned();
        let invalid = |kind: WorkloadKind| {
            move |error| ManifestError::Invalid {
                kind: kind.kind(),
                error,
            }
        };
        Ok(match WorkloadKind::from_kind(&kind) {
            Some(k @ WorkloadKind::Deployment) => {
                Workload::Deployment(Box::new(serde_json::from_value(value).map_err(invalid(k))?))
            }
            Some(k @ WorkloadKind::StatefulSet) => {
                Workload::StatefulSet(Box::new(serde_json::from_value(value).map_err(invalid(k))?))
            }
            Some(k @ WorkloadKind::DaemonSet) => {
                Workload::DaemonSet(Box::new(serde_json::from_value(value).map_err(invalid(k))?))
            }
            None => return Err(ManifestError::Kind(kind)),
        })
    }

    /// Finds `target` among the documents of a manifest (multi-document YAML).
    pub fn from_manifest(
        text: &str,
        target: &WorkloadRef,
        source_name: &str,
    ) -> Result<Self, ManifestError> {
        use serde::Deserialize;
        let mut seen = Vec::new();
        for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let value = Value::deserialize(document).map_err(|error| ManifestError::Yaml {
                source_name: source_name.to_owned(),
                index: index + 1,
                error,
            })?;
            if value.is_null() {
                continue;
            }
            let kind = value["kind"].as_str().unwrap_or_default();
            let name = value["metadata"]["name"].as_str().unwrap_or_default();
            if kind == target.kind.kind() && name == target.name {
                return Workload::from_value(value).map_err(|error| ManifestError::Object {
                    source_name: source_name.to_owned(),
                    target: target.clone(),
                    error: Box::new(error),
                });
            }
            if let Some(kind) = WorkloadKind::from_kind(kind) {
                seen.push(format!("{kind}/{name}"));
            }
        }
        let (source_name, target) = (source_name.to_owned(), target.clone());
        Err(if seen.is_empty() {
            ManifestError::NoWorkloads {
                source_name,
                target,
            }
        } else {
            ManifestError::NotFound {
                source_name,
                target,
                seen,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotations::REDIRECT;
    use serde_json::json;

    #[test]
    fn kubectl_spellings_are_accepted() {
        for (text, kind) in [
            ("deployment/api", WorkloadKind::Deployment),
            ("deploy/api", WorkloadKind::Deployment),
            ("Deployments/api", WorkloadKind::Deployment),
            ("deployment.apps/api", WorkloadKind::Deployment),
            ("sts/api", WorkloadKind::StatefulSet),
            ("statefulset/api", WorkloadKind::StatefulSet),
            ("ds/api", WorkloadKind::DaemonSet),
            ("daemonset/api", WorkloadKind::DaemonSet),
        ] {
            let parsed: WorkloadRef = text.parse().unwrap();
            assert_eq!(parsed.kind, kind, "{text}");
            assert_eq!(parsed.name, "api");
        }
        assert_eq!(
            "deploy/api".parse::<WorkloadRef>().unwrap().to_string(),
            "deployment/api"
        );
    }

    #[test]
    fn bad_references_say_what_is_wrong() {
        let err = "api".parse::<WorkloadRef>().unwrap_err().to_string();
        assert!(err.contains("is not <kind>/<name>"), "{err}");
        let err = "pod/api".parse::<WorkloadRef>().unwrap_err().to_string();
        assert!(err.contains("\"pod\" is not a workload kind"), "{err}");
        let err = "deploy/Api_1"
            .parse::<WorkloadRef>()
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a valid deployment name"), "{err}");
    }

    #[test]
    fn manifests_are_searched_by_kind_and_name() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: api}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec: {selector: {}, template: {}}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: api, annotations: {kips.io/redirect: \"8080\"}}\nspec: {selector: {}, template: {}}\n";
        let target: WorkloadRef = "deploy/api".parse().unwrap();
        let object = Workload::from_manifest(text, &target, "m.yaml").unwrap();
        assert_eq!(object.kind(), WorkloadKind::Deployment);
        assert_eq!(object.annotations()[REDIRECT], "8080");
        let err = Workload::from_manifest(text, &"sts/api".parse().unwrap(), "m.yaml").unwrap_err();
        assert_eq!(
            err.to_string(),
            "m.yaml holds no statefulset/api (it has deployment/web, deployment/api)"
        );
        let value = json!({"kind": "Job"});
        assert!(Workload::from_value(value).is_err());
    }
}
