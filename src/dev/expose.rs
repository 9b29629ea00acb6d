//! `kips expose <name> --port 8080[,...]`: a Service that exists only on the laptop (the
//! seeds' pseudo-service). kips makes a Service `<name>` and a bridge-only Deployment `<name>`
//! whose one container is a placeholder declaring the named ports `p<port>`; the webhook
//! injects the sidecar in named mode (no privilege), the sidecar takes the names, and the
//! Service's `targetPort`s name them. So in-cluster clients reach `<name>:<port>`, and `kips
//! connect deployment/<name>` and `kips status` work as for any redirected workload.
//!
//! The Service is owned by the Deployment, so `kips expose <name> --delete` (a foreground
//! deletion of the Deployment) removes all of it. Objects kips did not make are never
//! touched. [`objects`] is pure; [`run`] does the I/O.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DeleteParams, Patch, PatchParams};
use serde_json::{Value, json};

use super::rollout;
use crate::annotations::{PORT_MODE, REDIRECT, RELAY_SECRET, is_port_name};
use crate::k8s::{self, ClientSettings, K8sError, Kube, KubeTarget};
use crate::workload::{Workload, WorkloadKind, WorkloadRef};

/// The image kips runs as the Deployment's only container of its own: it does nothing, and
/// the kubelet keeps it on every node as the pods' sandbox image.
pub const DEFAULT_PLACEHOLDER_IMAGE: &str = "registry.k8s.io/pause:3.10";
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// The label that ties the objects of one `kips expose` together (and selects its pod).
pub const EXPOSE_LABEL: &str = "kips.io/expose";
const FIELD_MANAGER: &str = "kips-expose";
const PLACEHOLDER: &str = "placeholder";

/// `kips expose`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExposeConfig {
    pub name: String,
    /// Empty with `delete`.
    pub ports: Vec<u16>,
    pub delete: bool,
    pub relay_secret: Option<String>,
    pub placeholder_image: String,
    pub wait: bool,
    pub timeout: Duration,
    pub kube: KubeTarget,
}

#[derive(Debug, thiserror::Error)]
pub enum ExposeError {
    #[error(
        "\"{0}\" cannot name a Service: lowercase letters, digits and '-', starting with a letter, ending with a letter or digit, at most 63 characters"
    )]
    Name(String),
    #[error("say which ports to expose: kips expose {0} --port 8080[,9090...]")]
    NoPorts(String),
    #[error("port {0} is given twice")]
    DuplicatePort(u16),
    #[error("port 0 is not a port (1-65535)")]
    PortZero,
    #[error(
        "{kind} {name} in namespace {namespace} exists and kips did not make it (it lacks the labels {MANAGED_BY}=kips and {EXPOSE_LABEL}={name}): kips leaves it alone; choose another name"
    )]
    NotOurs {
        kind: &'static str,
        name: String,
        namespace: String,
    },
    #[error("nothing named {name} is exposed in namespace {namespace}")]
    NothingExposed { name: String, namespace: String },
    #[error("{what} in namespace {namespace} was still there after {waited}")]
    StillThere {
        what: String,
        namespace: String,
        waited: String,
    },
    #[error(transparent)]
    Kube(#[from] K8sError),
    #[error("reading the object the API server returned: {0}")]
    Answer(#[from] serde_json::Error),
}

/// The named port a Service and the sidecar agree on for `port`.
pub fn port_name(port: u16) -> String {
    format!("p{port}")
}

/// A DNS-1035 label, which Service names must be.
pub fn is_service_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes[0].is_ascii_lowercase()
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && !name.ends_with('-')
}

fn labels(name: &str) -> Value {
    json!({MANAGED_BY: "kips", EXPOSE_LABEL: name})
}

/// True when kips made this object for `kips expose <name>`.
pub fn ours(meta: &ObjectMeta, name: &str) -> bool {
    meta.labels.as_ref().is_some_and(|l| {
        l.get(MANAGED_BY).map(String::as_str) == Some("kips")
            && l.get(EXPOSE_LABEL).map(String::as_str) == Some(name)
    })
}

/// The Deployment and the Service (without its owner, which is the Deployment once it has a
/// uid), checked.
pub fn objects(
    name: &str,
    ports: &[u16],
    relay_secret: Option<&str>,
    placeholder_image: &str,
) -> Result<(Value, Value), ExposeError> {
    if !is_service_name(name) {
        return Err(ExposeError::Name(name.to_owned()));
    }
    if ports.is_empty() {
        return Err(ExposeError::NoPorts(name.to_owned()));
    }
    let mut seen = BTreeSet::new();
    for &port in ports {
        if port == 0 {
            return Err(ExposeError::PortZero);
        }
        if !seen.insert(port) {
            return Err(ExposeError::DuplicatePort(port));
        }
        debug_assert!(is_port_name(&port_name(port)));
    }
    let redirect: Vec<String> = ports
        .iter()
        .map(|p| format!("{name}:{}", port_name(*p)))
        .collect();
    let mut annotations = json!({
        REDIRECT: redirect.join(","),
        PORT_MODE: "named",
    });
    if let Some(secret) = relay_secret {
        annotations[RELAY_SECRET] = json!(secret);
    }
    let container_ports: Vec<Value> = ports
        .iter()
        .map(|p| json!({"name": port_name(*p), "containerPort": p, "protocol": "TCP"}))
        .collect();
    let deployment = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels(name), "annotations": annotations},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {EXPOSE_LABEL: name}},
            "template": {
                "metadata": {"labels": labels(name)},
                "spec": {
                    "automountServiceAccountToken": false,
                    "enableServiceLinks": false,
                    "terminationGracePeriodSeconds": 5,
                    "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [{
                        "name": PLACEHOLDER,
                        "image": placeholder_image,
                        "ports": container_ports,
                        "resources": {"requests": {"cpu": "1m", "memory": "4Mi"}, "limits": {"memory": "16Mi"}},
                        "securityContext": {
                            "runAsUser": 65535,
                            "allowPrivilegeEscalation": false,
                            "readOnlyRootFilesystem": true,
                            "capabilities": {"drop": ["ALL"]}
                        }
                    }]
                }
            }
        }
    });
    let service_ports: Vec<Value> = ports
        .iter()
        .map(|p| json!({"name": port_name(*p), "port": p, "targetPort": port_name(*p), "protocol": "TCP"}))
        .collect();
    let service = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": labels(name)},
        "spec": {"selector": {EXPOSE_LABEL: name}, "ports": service_ports}
    });
    Ok((deployment, service))
}

/// The Service owned by the Deployment `uid`, so that deleting the Deployment deletes it.
/// Without `blockOwnerDeletion`, which clusters that enforce owner-reference permissions allow
/// only to those who may update the Deployment's finalizers; `--delete` waits for both anyway.
pub fn owned_by(mut service: Value, name: &str, uid: &str) -> Value {
    service["metadata"]["ownerReferences"] = json!([{
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": name,
        "uid": uid,
        "controller": true,
    }]);
    service
}

pub async fn run(config: ExposeConfig) -> anyhow::Result<()> {
    let kube = k8s::connect(&ClientSettings::interactive(config.kube.clone())).await?;
    if config.delete {
        delete(&kube, &config).await?;
    } else {
        create(&kube, &config).await?;
    }
    Ok(())
}

async fn existing(
    kube: &Kube,
    name: &str,
) -> Result<(Option<Deployment>, Option<Service>), ExposeError> {
    let deployment = kube
        .api::<Deployment>()
        .get_opt(name)
        .await
        .map_err(|e| kube.explain(e, &format!("Deployment {name}")))?;
    let service = kube
        .api::<Service>()
        .get_opt(name)
        .await
        .map_err(|e| kube.explain(e, &format!("Service {name}")))?;
    let not_ours = |kind| ExposeError::NotOurs {
        kind,
        name: name.to_owned(),
        namespace: kube.namespace.clone(),
    };
    if deployment
        .as_ref()
        .is_some_and(|d| !ours(&d.metadata, name))
    {
        return Err(not_ours("Deployment"));
    }
    if service.as_ref().is_some_and(|s| !ours(&s.metadata, name)) {
        return Err(not_ours("Service"));
    }
    Ok((deployment, service))
}

async fn create(kube: &Kube, config: &ExposeConfig) -> anyhow::Result<()> {
    let name = &config.name;
    let (deployment, service) = objects(
        name,
        &config.ports,
        config.relay_secret.as_deref(),
        &config.placeholder_image,
    )?;
    let (old_deployment, _) = existing(kube, name).await?;
    let apply = PatchParams::apply(FIELD_MANAGER).force();
    let applied = kube
        .api::<Deployment>()
        .patch(name, &apply, &Patch::Apply(&deployment))
        .await
        .map_err(|e| kube.explain(e, &format!("Deployment {name}")))?;
    let uid = applied.metadata.uid.clone().unwrap_or_default();
    let service = owned_by(service, name, &uid);
    kube.api::<Service>()
        .patch(name, &apply, &Patch::Apply(&service))
        .await
        .map_err(|e| kube.explain(e, &format!("Service {name}")))?;
    let ns = &kube.namespace;
    let ports: Vec<String> = config
        .ports
        .iter()
        .map(|p| format!("{p}→{}", port_name(*p)))
        .collect();
    println!(
        "kips expose {ns}/{name}: {} Deployment {name} (the sidecar alone, redirecting {}) and Service {name} (ports {})",
        if old_deployment.is_some() {
            "updated"
        } else {
            "created"
        },
        config
            .ports
            .iter()
            .map(|p| format!("{name}:{}", port_name(*p)))
            .collect::<Vec<_>>()
            .join(","),
        ports.join(", ")
    );
    let object = Workload::from(applied.clone());
    if let Some(warning) = super::relay_secret_warning(kube, &object).await {
        eprintln!("Warning: {warning}");
    }
    let addresses: Vec<String> = config
        .ports
        .iter()
        .map(|p| format!("{name}.{ns}.svc:{p}"))
        .collect();
    println!(
        "in-cluster clients reach {}; serve it from here with: kips connect deployment/{name} -n {ns}; remove it with: kips expose {name} --delete -n {ns}",
        addresses.join(", ")
    );
    if config.wait {
        let target = WorkloadRef {
            kind: WorkloadKind::Deployment,
            name: name.clone(),
        };
        let done = rollout::wait(
            kube,
            &target,
            true,
            applied.metadata.generation,
            config.timeout,
        )
        .await?;
        println!("{done}");
    }
    Ok(())
}

async fn delete(kube: &Kube, config: &ExposeConfig) -> anyhow::Result<()> {
    let name = &config.name;
    let ns = kube.namespace.clone();
    let (deployment, service) = existing(kube, name).await?;
    if deployment.is_none() && service.is_none() {
        return Err(ExposeError::NothingExposed {
            name: name.clone(),
            namespace: ns,
        }
        .into());
    }
    if deployment.is_some() {
        // Foreground: the Deployment goes only after its ReplicaSets and pods; the garbage
        // collector removes the Service it owns, and the loop below waits for both.
        kube.api::<Deployment>()
            .delete(name, &DeleteParams::foreground())
            .await
            .map_err(|e| kube.explain(e, &format!("Deployment {name}")))?;
    } else {
        // The Deployment went some other way and left its Service (kips' own): remove it.
        kube.api::<Service>()
            .delete(name, &DeleteParams::default())
            .await
            .map_err(|e| kube.explain(e, &format!("Service {name}")))?;
    }
    let started = Instant::now();
    loop {
        let (deployment, service) = existing(kube, name).await?;
        if deployment.is_none() && service.is_none() {
            break;
        }
        if started.elapsed() > config.timeout {
            let what = match (deployment, service) {
                (Some(_), Some(_)) => format!("Deployment {name} and Service {name}"),
                (Some(_), None) => format!("Deployment {name}"),
                _ => format!("Service {name}"),
            };
            return Err(ExposeError::StillThere {
                what,
                namespace: ns,
                waited: humantime::format_duration(config.timeout).to_string(),
            }
            .into());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    println!("kips expose {ns}/{name}: removed Deployment {name} and Service {name}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotations::KipsAnnotations;

    #[test]
    fn the_objects_agree_on_port_names_and_labels() {
        let (deployment, service) = objects(
            "pay",
            &[8080, 9090],
            Some("team-relay"),
            DEFAULT_PLACEHOLDER_IMAGE,
        )
        .unwrap();
        let d: Deployment = serde_json::from_value(deployment).unwrap();
        let object = Workload::from(d.clone());
        let kips = object.kips().unwrap();
        assert_eq!(
            kips,
            KipsAnnotations::parse([
                ("kips.io/redirect", "pay:p8080,pay:p9090"),
                ("kips.io/port-mode", "named"),
                ("kips.io/relay-secret", "team-relay"),
            ])
            .unwrap()
        );
        let spec = object.pod_spec().unwrap();
        let names: Vec<_> = spec.containers[0]
            .ports
            .iter()
            .flatten()
            .map(|p| (p.name.clone().unwrap(), p.container_port))
            .collect();
        assert_eq!(
            names,
            [("p8080".to_owned(), 8080), ("p9090".to_owned(), 9090)]
        );
        assert!(ours(&d.metadata, "pay") && !ours(&d.metadata, "other"));
        let s: Service = serde_json::from_value(owned_by(service, "pay", "u-1")).unwrap();
        let ports: Vec<_> = s
            .spec
            .as_ref()
            .unwrap()
            .ports
            .iter()
            .flatten()
            .map(|p| (p.port, p.target_port.clone()))
            .collect();
        assert_eq!(
            serde_json::to_value(&ports).unwrap(),
            json!([[8080, "p8080"], [9090, "p9090"]])
        );
        assert_eq!(
            s.spec.unwrap().selector.unwrap(),
            d.spec.unwrap().selector.match_labels.unwrap()
        );
        let owner = &s.metadata.owner_references.unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("Deployment", "u-1")
        );
        // The longest port name fits Kubernetes' 15 characters and starts with a letter.
        assert!(is_port_name(&port_name(65535)));
    }

    #[test]
    fn bad_names_and_ports_are_refused() {
        for bad in ["", "Pay", "9pay", "pay-", "pay.svc", &"a".repeat(64)] {
            assert!(
                matches!(objects(bad, &[80], None, "i"), Err(ExposeError::Name(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            objects("pay", &[], None, "i"),
            Err(ExposeError::NoPorts(_))
        ));
        assert!(matches!(
            objects("pay", &[80, 80], None, "i"),
            Err(ExposeError::DuplicatePort(80))
        ));
        assert!(matches!(
            objects("pay", &[0], None, "i"),
            Err(ExposeError::PortZero)
        ));
    }
}
