//! `<kind>/<name>`: which workload a command is about. Pure.

use std::fmt;
use std::str::FromStr;

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

impl FromStr for WorkloadKind {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
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
            _ => Err(format!(
                "\"{text}\" is not a workload kind kips redirects (deployment/deploy, statefulset/sts, daemonset/ds)"
            )),
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
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let Some((kind, name)) = text.split_once('/') else {
            return Err(format!(
                "\"{text}\" is not <kind>/<name> (for example deployment/api, sts/db, ds/agent)"
            ));
        };
        let kind: WorkloadKind = kind.parse()?;
        if !crate::annotations::is_dns_subdomain(name) {
            return Err(format!(
                "\"{name}\" in \"{text}\" is not a valid {kind} name (lowercase letters, digits, '-' and '.')"
            ));
        }
        Ok(WorkloadRef {
            kind,
            name: name.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let err = "api".parse::<WorkloadRef>().unwrap_err();
        assert!(err.contains("is not <kind>/<name>"), "{err}");
        let err = "pod/api".parse::<WorkloadRef>().unwrap_err();
        assert!(err.contains("\"pod\" is not a workload kind"), "{err}");
        let err = "deploy/Api_1".parse::<WorkloadRef>().unwrap_err();
        assert!(err.contains("not a valid deployment name"), "{err}");
    }
}
