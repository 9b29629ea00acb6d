//! The app container's environment as its pod sees it, for the developer's machine
//! (`kips connect --env-file`, `kips connect -- <command>`). Pure: the container spec, the
//! ConfigMaps and Secrets it refers to, and the running pod (for downward-API fields) are read
//! elsewhere; this module applies Kubernetes' rules to them.
//!
//! The rules, as the kubelet applies them: `envFrom` sources first, in order (each key of a
//! ConfigMap's `data` or a Secret's `data`, with the source's `prefix`; keys that are not
//! environment variable names are skipped), then `env` in order; a later definition of a name
//! replaces the value of an earlier one. `$(VAR)` in an `env` value is replaced by the value
//! of a variable defined before it (a reference to an unknown variable stays as written), and
//! `$$` is a literal `$`; values from `envFrom`, ConfigMaps, Secrets and fields are never
//! expanded. A reference to a missing ConfigMap, Secret or key fails, as the pod would,
//! unless it is `optional`.
//!
//! Left out, on purpose: the service-link variables the kubelet adds (`<SVC>_SERVICE_HOST`,
//! `KUBERNETES_PORT`, ...): they hold ClusterIPs the laptop cannot reach.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, PodSpec, Secret};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use crate::annotations::is_kips_container;

mod fields;

pub use fields::*;

/// Where a variable's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Value,
    ConfigMap { name: String, key: String },
    Secret { name: String, key: String },
    Field(String),
    Resource(String),
}

/// One variable of the environment.
#[derive(Clone, PartialEq, Eq)]
pub struct Var {
    pub name: String,
    pub value: String,
    pub origin: Origin,
    /// The value holds Secret data (from a Secret, or a `$(VAR)` of one): never printed.
    pub secret: bool,
}

impl fmt::Debug for Var {
    // Values stay out of debug output, which ends up in logs and test failures.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Var")
            .field("name", &self.name)
            .field("origin", &self.origin)
            .field("secret", &self.secret)
            .finish_non_exhaustive()
    }
}

/// The resolved environment, in the order of first definition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Environment {
    pub vars: Vec<Var>,
    /// `envFrom` keys that are not variable names, as the kubelet skips them.
    pub skipped: Vec<String>,
}

impl Environment {
    pub fn get(&self, name: &str) -> Option<&Var> {
        self.vars.iter().find(|v| v.name == name)
    }

    fn define(&mut self, var: Var) {
        match self.vars.iter_mut().find(|v| v.name == var.name) {
            Some(existing) => *existing = var,
            None => self.vars.push(var),
        }
    }

    /// `(name, value)` pairs, for a child process.
    pub fn pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.vars
            .iter()
            .map(|v| (v.name.as_str(), v.value.as_str()))
    }
}

/// What the container's environment refers to, so that the caller reads just that.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct References {
    pub config_maps: BTreeSet<String>,
    pub secrets: BTreeSet<String>,
    /// Variables with a `fieldRef`, and their field: they need a running pod.
    pub fields: Vec<(String, String)>,
}

/// What was read for [`resolve`]. A ConfigMap or Secret absent from its map does not exist.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sources<'a> {
    pub config_maps: Option<&'a BTreeMap<String, ConfigMap>>,
    pub secrets: Option<&'a BTreeMap<String, Secret>>,
    /// The running pod, for `fieldRef`s.
    pub pod: Option<&'a Pod>,
    /// The node's allocatable resources: a `resourceFieldRef` to an unset limit gets them.
    pub node_allocatable: Option<&'a BTreeMap<String, Quantity>>,
}

/// Why the environment cannot be resolved. Never carries a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvError {
    #[error("the pod has no container \"{name}\" (it has {})", .have.join(", "))]
    NoSuchContainer { name: String, have: Vec<String> },
    #[error("the pod has no container of its own (only kips' containers)")]
    NoAppContainer,
    #[error(
        "{var}: {kind} \"{name}\" does not exist in the namespace (the pod cannot start either; mark the reference optional if it may be absent)"
    )]
    Missing {
        var: String,
        kind: &'static str,
        name: String,
    },
    #[error("{var}: {kind} \"{name}\" has no key \"{key}\" (the pod cannot start either)")]
    MissingKey {
        var: String,
        kind: &'static str,
        name: String,
        key: String,
    },
    #[error("{var}: key \"{key}\" of Secret \"{name}\" is not UTF-8 text")]
    NotText {
        var: String,
        name: String,
        key: String,
    },
    #[error(
        "{var}: its value comes from the running pod ({field}), and no pod of the workload is running"
    )]
    NeedsPod { var: String, field: String },
    #[error("{var}: field \"{field}\" is not one an environment variable can refer to")]
    UnsupportedField { var: String, field: String },
    #[error("{var}: resourceFieldRef names container \"{container}\", which the pod does not have")]
    ResourceContainer { var: String, container: String },
    #[error(
        "{var}: resource \"{resource}\" is not one of limits.cpu, limits.memory, limits.ephemeral-storage, requests.* or *.hugepages-<size>"
    )]
    UnsupportedResource { var: String, resource: String },
    #[error("{var}: {what} {text:?} is not a quantity: {error}")]
    Quantity {
        var: String,
        what: &'static str,
        text: String,
        error: QuantityError,
    },
    #[error(
        "{var}: {resource} of container {container} is not set, so Kubernetes gives it the node's allocatable amount, which kips could not read (set the limit, or run where you may read the node)"
    )]
    NoNodeAllocatable {
        var: String,
        resource: String,
        container: String,
    },
    #[error("{var}: valueFrom names no source")]
    EmptyValueFrom { var: String },
}

/// The app container: the one named, else the pod's first container that is not kips'.
pub fn app_container<'s>(spec: &'s PodSpec, name: Option<&str>) -> Result<&'s Container, EnvError> {
    match name {
        Some(name) => spec
            .containers
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| EnvError::NoSuchContainer {
                name: name.to_owned(),
                have: spec.containers.iter().map(|c| c.name.clone()).collect(),
            }),
        None => spec
            .containers
            .iter()
            .find(|c| !is_kips_container(&c.name))
            .ok_or(EnvError::NoAppContainer),
    }
}

/// The ConfigMaps, Secrets and pod fields `container`'s environment refers to.
pub fn references(container: &Container) -> References {
    let mut refs = References::default();
    for source in container.env_from.iter().flatten() {
        if let Some(cm) = &source.config_map_ref {
            refs.config_maps.insert(cm.name.clone());
        }
        if let Some(secret) = &source.secret_ref {
            refs.secrets.insert(secret.name.clone());
        }
    }
    for var in container.env.iter().flatten() {
        let Some(from) = &var.value_from else {
            continue;
        };
        if let Some(cm) = &from.config_map_key_ref {
            refs.config_maps.insert(cm.name.clone());
        }
        if let Some(secret) = &from.secret_key_ref {
            refs.secrets.insert(secret.name.clone());
        }
        if let Some(field) = &from.field_ref {
            refs.fields
                .push((var.name.clone(), field.field_path.clone()));
        }
    }
    refs
}

/// True when `name` can be an environment variable: printable ASCII except `=` (Kubernetes'
/// rule since relaxed environment variable names).
pub fn is_env_var_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| (b' '..=b'~').contains(&b) && b != b'=')
}

/// True when a shell can assign `name` (`[A-Za-z_][A-Za-z0-9_]*`).
pub fn is_shell_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Resolves `container`'s environment. `pod_spec` holds the containers a
/// `resourceFieldRef` may name.
pub fn resolve(
    container: &Container,
    pod_spec: &PodSpec,
    sources: &Sources,
) -> Result<Environment, EnvError> {
    let empty_cm = BTreeMap::new();
    let empty_secrets = BTreeMap::new();
    let config_maps = sources.config_maps.unwrap_or(&empty_cm);
    let secrets = sources.secrets.unwrap_or(&empty_secrets);
    let mut env = Environment::default();

    for source in container.env_from.iter().flatten() {
        let prefix = source.prefix.as_deref().unwrap_or_default();
        if let Some(reference) = &source.config_map_ref {
            let label = "envFrom".to_owned();
            match config_maps.get(&reference.name) {
                Some(cm) => {
                    for (key, value) in cm.data.iter().flatten() {
                        let name = format!("{prefix}{key}");
                        if !is_env_var_name(&name) {
                            env.skipped.push(name);
                            continue;
                        }
                        env.define(Var {
                            name,
                            value: value.clone(),
                            origin: Origin::ConfigMap {
                                name: reference.name.clone(),
                                key: key.clone(),
                            },
                            secret: false,
                        });
                    }
                }
                None if reference.optional == Some(true) => {}
                None => {
                    return Err(EnvError::Missing {
                        var: label,
                        kind: "ConfigMap",
                        name: reference.name.clone(),
                    });
                }
            }
        }
        if let Some(reference) = &source.secret_ref {
            match secrets.get(&reference.name) {
                Some(secret) => {
                    for (key, value) in secret_data(secret) {
                        let name = format!("{prefix}{key}");
                        if !is_env_var_name(&name) {
                            env.skipped.push(name);
                            continue;
                        }
                        let value = String::from_utf8(value).map_err(|_| EnvError::NotText {
                            var: name.clone(),
                            name: reference.name.clone(),
                            key: key.clone(),
                        })?;
                        env.define(Var {
                            name,
                            value,
                            origin: Origin::Secret {
                                name: reference.name.clone(),
                                key,
                            },
                            secret: true,
                        });
                    }
                }
                None if reference.optional == Some(true) => {}
                None => {
                    return Err(EnvError::Missing {
                        var: "envFrom".to_owned(),
                        kind: "Secret",
                        name: reference.name.clone(),
                    });
                }
            }
        }
    }

    for var in container.env.iter().flatten() {
        let name = var.name.clone();
        let Some(from) = &var.value_from else {
            let (value, secret) = expand(var.value.as_deref().unwrap_or_default(), &env);
            env.define(Var {
                name,
                value,
                origin: Origin::Value,
                secret,
            });
            continue;
        };
        let resolved = if let Some(reference) = &from.config_map_key_ref {
            match config_maps.get(&reference.name) {
                Some(cm) => match cm.data.as_ref().and_then(|d| d.get(&reference.key)) {
                    Some(value) => Some(Var {
                        name: name.clone(),
                        value: value.clone(),
                        origin: Origin::ConfigMap {
                            name: reference.name.clone(),
                            key: reference.key.clone(),
                        },
                        secret: false,
                    }),
                    None if reference.optional == Some(true) => None,
                    None => {
                        return Err(EnvError::MissingKey {
                            var: name,
                            kind: "ConfigMap",
                            name: reference.name.clone(),
                            key: reference.key.clone(),
                        });
                    }
                },
                None if reference.optional == Some(true) => None,
                None => {
                    return Err(EnvError::Missing {
                        var: name,
                        kind: "ConfigMap",
                        name: reference.name.clone(),
                    });
                }
            }
        } else if let Some(reference) = &from.secret_key_ref {
            match secrets.get(&reference.name) {
                Some(secret) => match secret_data(secret).remove(&reference.key) {
                    Some(bytes) => Some(Var {
                        name: name.clone(),
                        value: String::from_utf8(bytes).map_err(|_| EnvError::NotText {
                            var: name.clone(),
                            name: reference.name.clone(),
                            key: reference.key.clone(),
                        })?,
                        origin: Origin::Secret {
                            name: reference.name.clone(),
                            key: reference.key.clone(),
                        },
                        secret: true,
                    }),
                    None if reference.optional == Some(true) => None,
                    None => {
                        return Err(EnvError::MissingKey {
                            var: name,
                            kind: "Secret",
                            name: reference.name.clone(),
                            key: reference.key.clone(),
                        });
                    }
                },
                None if reference.optional == Some(true) => None,
                None => {
                    return Err(EnvError::Missing {
                        var: name,
                        kind: "Secret",
                        name: reference.name.clone(),
                    });
                }
            }
        } else if let Some(field) = &from.field_ref {
            let path = &field.field_path;
            let pod = sources.pod.ok_or_else(|| EnvError::NeedsPod {
                var: name.clone(),
                field: path.clone(),
            })?;
            Some(Var {
                name: name.clone(),
                value: field_value(pod, path).ok_or_else(|| EnvError::UnsupportedField {
                    var: name.clone(),
                    field: path.clone(),
                })?,
                origin: Origin::Field(path.clone()),
                secret: false,
            })
        } else if let Some(reference) = &from.resource_field_ref {
            let target = match reference.container_name.as_deref() {
                Some(other) if !other.is_empty() && other != container.name => pod_spec
                    .containers
                    .iter()
                    .chain(pod_spec.init_containers.iter().flatten())
                    .find(|c| c.name == other)
                    .ok_or_else(|| EnvError::ResourceContainer {
                        var: name.clone(),
                        container: other.to_owned(),
                    })?,
                _ => container,
            };
            let value = resource_value(
                &name,
                target,
                &reference.resource,
                reference.divisor.as_ref(),
                sources.node_allocatable,
            )?;
            Some(Var {
                name: name.clone(),
                value,
                origin: Origin::Resource(reference.resource.clone()),
                secret: false,
            })
        } else {
            return Err(EnvError::EmptyValueFrom { var: name });
        };
        if let Some(resolved) = resolved {
            env.define(resolved);
        }
    }
    Ok(env)
}

/// A Secret's `data`, with `stringData` (which only a request carries) as a fallback.
fn secret_data(secret: &Secret) -> BTreeMap<String, Vec<u8>> {
    let mut out: BTreeMap<String, Vec<u8>> = secret
        .string_data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
        .collect();
    for (k, v) in secret.data.iter().flatten() {
        out.insert(k.clone(), v.0.clone());
    }
    out
}

/// Kubernetes' `$(VAR)` expansion against the variables defined so far; `$$` is `$`, and
/// anything else after a `$` stays as written. Also says whether a Secret's value went in.
pub fn expand(input: &str, defined: &Environment) -> (String, bool) {
    let bytes = input.as_bytes();
    let mut out = String::with_capacity(input.len());
    let mut secret = false;
    let mut i = 0;
    let mut copied = 0;
    while i < bytes.len() {
        if bytes[i] != b'$' || i + 1 >= bytes.len() {
            i += 1;
            continue;
        }
        out.push_str(&input[copied..i]);
        match bytes[i + 1] {
            b'$' => {
                out.push('$');
                i += 2;
            }
            b'(' => match input[i + 2..].find(')') {
                Some(end) => {
                    let name = &input[i + 2..i + 2 + end];
                    match defined.get(name) {
                        Some(var) => {
                            out.push_str(&var.value);
                            secret |= var.secret;
                        }
                        None => out.push_str(&input[i..i + 3 + end]),
                    }
                    i += 3 + end;
                }
                // No closing parenthesis: `$(` stays as written.
                None => {
                    out.push_str("$(");
                    i += 2;
                }
            },
            _ => {
                out.push('$');
                i += 1;
            }
        }
        copied = i;
    }
    out.push_str(&input[copied..]);
    (out, secret)
}

/// The environment as a POSIX shell file (`set -a; . ./.env; set +a` reads it): one
/// `NAME=value` per line, values single-quoted unless made of plain characters. Names a
/// shell cannot assign are left out and returned.
pub fn dotenv(env: &Environment, header: &str) -> (String, Vec<String>) {
    let mut out = String::new();
    for line in header.lines() {
        out.push_str("# ");
        out.push_str(line);
        out.push('\n');
    }
    let mut left_out = Vec::new();
    for var in &env.vars {
        if !is_shell_name(&var.name) {
            left_out.push(var.name.clone());
            continue;
        }
        out.push_str(&var.name);
        out.push('=');
        out.push_str(&shell_quote(&var.value));
        out.push('\n');
    }
    (out, left_out)
}

/// A value as the shell reads it back verbatim: bare when every character is plain (no `~`,
/// which assignments expand), else in single quotes with each `'` written as `'\''`.
pub fn shell_quote(value: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_./:@%+,=-".contains(c);
    if value.chars().all(plain) {
        return value.to_owned();
    }
    format!("'{}'", value.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn container(value: serde_json::Value) -> Container {
        serde_json::from_value(value).unwrap()
    }

    fn spec_of(c: &Container) -> PodSpec {
        PodSpec {
            containers: vec![c.clone()],
            ..Default::default()
        }
    }

    fn maps() -> (BTreeMap<String, ConfigMap>, BTreeMap<String, Secret>) {
        let cm: ConfigMap = serde_json::from_value(json!({
            "metadata": {"name": "settings"},
            "data": {"LOG_LEVEL": "debug", "REGION": "west", "bad=key": "x", "dotted.key": "y"}
        }))
        .unwrap();
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": "db"},
            // "hunter2", "admin"
            "data": {"password": "aHVudGVyMg==", "USER": "YWRtaW4="}
        }))
        .unwrap();
        (
            BTreeMap::from([("settings".to_owned(), cm)]),
            BTreeMap::from([("db".to_owned(), secret)]),
        )
    }

    fn pod() -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "api-7d9f-x2", "namespace": "dev", "uid": "u-1",
                         "labels": {"app": "api"}, "annotations": {"team": "shop"}},
            "spec": {"nodeName": "node-1", "serviceAccountName": "api-sa", "containers": []},
            "status": {"podIP": "10.244.0.7", "podIPs": [{"ip": "10.244.0.7"}, {"ip": "fd00::7"}],
                       "hostIP": "10.0.0.2", "hostIPs": [{"ip": "10.0.0.2"}]}
        }))
        .unwrap()
    }

    #[test]
    fn every_kind_of_source_resolves_in_kubernetes_order() {
        let c = container(json!({
            "name": "app",
            "envFrom": [
                {"configMapRef": {"name": "settings"}},
                {"secretRef": {"name": "db"}, "prefix": "DB_"},
                {"configMapRef": {"name": "absent", "optional": true}}
            ],
            "env": [
                {"name": "PLAIN", "value": "hello"},
                {"name": "REGION", "value": "east"},
                {"name": "URL", "value": "postgres://$(DB_USER):$(DB_password)@db/$(REGION)?$(NOPE)&$$(REGION)"},
                {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "LOG_LEVEL"}}},
                {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}},
                {"name": "MAYBE", "valueFrom": {"secretKeyRef": {"name": "db", "key": "nope", "optional": true}}},
                {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "IPS", "valueFrom": {"fieldRef": {"fieldPath": "status.podIPs"}}},
                {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                {"name": "TEAM", "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['team']"}}},
                {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                {"name": "SA", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
                {"name": "HOST", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
                {"name": "LATER", "value": "$(AFTER)"},
                {"name": "AFTER", "value": "x"}
            ]
        }));
        let (cms, secrets) = maps();
        let pod = pod();
        let env = resolve(
            &c,
            &spec_of(&c),
            &Sources {
                config_maps: Some(&cms),
                secrets: Some(&secrets),
                pod: Some(&pod),
                node_allocatable: None,
            },
        )
        .unwrap();
        let got: Vec<(&str, &str)> = env.pairs().collect();
        assert_eq!(
            got,
            [
                ("LOG_LEVEL", "debug"),
                ("REGION", "east"),
                ("dotted.key", "y"),
                ("DB_USER", "admin"),
                ("DB_password", "hunter2"),
                ("PLAIN", "hello"),
                ("URL", "postgres://admin:hunter2@db/east?$(NOPE)&$(REGION)"),
                ("MODE", "debug"),
                ("PASSWORD", "hunter2"),
                ("POD", "api-7d9f-x2"),
                ("IPS", "10.244.0.7,fd00::7"),
                ("APP", "api"),
                ("TEAM", "shop"),
                ("NODE", "node-1"),
                ("SA", "api-sa"),
                ("HOST", "10.0.0.2"),
                ("LATER", "$(AFTER)"),
                ("AFTER", "x"),
            ]
        );
        assert_eq!(env.skipped, ["bad=key"]);
        let secret: Vec<&str> = env
            .vars
            .iter()
            .filter(|v| v.secret)
            .map(|v| v.name.as_str())
            .collect();
        assert_eq!(secret, ["DB_USER", "DB_password", "URL", "PASSWORD"]);
        assert!(!format!("{env:?}").contains("hunter2"));
    }

    #[test]
    fn expansion_follows_kubernetes_edge_cases() {
        let mut env = Environment::default();
        env.define(Var {
            name: "A".into(),
            value: "1".into(),
            origin: Origin::Value,
            secret: false,
        });
        let cases = [
            ("$(A)", "1"),
            ("$$(A)", "$(A)"),
            ("$$$(A)", "$1"),
            ("$A", "$A"),
            ("$", "$"),
            ("a$", "a$"),
            ("$(A", "$(A"),
            ("$(B)", "$(B)"),
            ("x$(A)y$(A)z", "x1y1z"),
            ("é$(A)ü", "é1ü"),
            ("$é", "$é"),
            ("$()", "$()"),
        ];
        for (input, want) in cases {
            assert_eq!(expand(input, &env).0, want, "{input}");
        }
    }

    #[test]
    fn missing_references_fail_like_the_pod_unless_optional() {
        let (cms, secrets) = maps();
        let sources = Sources {
            config_maps: Some(&cms),
            secrets: Some(&secrets),
            ..Default::default()
        };
        let cases = [
            (
                json!({"name": "X", "valueFrom": {"configMapKeyRef": {"name": "gone", "key": "k"}}}),
                "X: ConfigMap \"gone\" does not exist",
            ),
            (
                json!({"name": "X", "valueFrom": {"secretKeyRef": {"name": "db", "key": "nope"}}}),
                "X: Secret \"db\" has no key \"nope\"",
            ),
            (
                json!({"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}),
                "X: its value comes from the running pod (status.podIP)",
            ),
        ];
        for (var, want) in cases {
            let c = container(json!({"name": "app", "env": [var]}));
            let err = resolve(&c, &spec_of(&c), &sources).unwrap_err().to_string();
            assert!(err.starts_with(want), "{err}");
        }
        let c = container(json!({"name": "app", "envFrom": [{"secretRef": {"name": "gone"}}]}));
        let err = resolve(&c, &spec_of(&c), &sources).unwrap_err().to_string();
        assert!(
            err.starts_with("envFrom: Secret \"gone\" does not exist"),
            "{err}"
        );
        let pod = pod();
        let c = container(
            json!({"name": "app", "env": [{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels"}}}]}),
        );
        let with_pod = Sources {
            pod: Some(&pod),
            ..sources
        };
        let err = resolve(&c, &spec_of(&c), &with_pod).unwrap_err();
        assert!(matches!(err, EnvError::UnsupportedField { .. }), "{err}");
    }

    #[test]
    fn resource_fields_divide_and_round_up_like_the_kubelet() {
        let c = container(json!({
            "name": "app",
            "resources": {"limits": {"cpu": "1500m", "memory": "128Mi"}, "requests": {"cpu": "250m", "memory": "100M"}},
            "env": [
                {"name": "CPU", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
                {"name": "CPU_M", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "1m"}}},
                {"name": "REQ_CPU", "valueFrom": {"resourceFieldRef": {"resource": "requests.cpu"}}},
                {"name": "MEM", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory"}}},
                {"name": "MEM_MI", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}},
                {"name": "REQ_MEM_MI", "valueFrom": {"resourceFieldRef": {"resource": "requests.memory", "divisor": "1Mi"}}},
                {"name": "SIDE", "valueFrom": {"resourceFieldRef": {"containerName": "side", "resource": "limits.memory", "divisor": "1k"}}}
            ]
        }));
        let side = container(json!({"name": "side", "resources": {"limits": {"memory": "1.5k"}}}));
        let spec = PodSpec {
            containers: vec![c.clone(), side],
            ..Default::default()
        };
        let env = resolve(&c, &spec, &Sources::default()).unwrap();
        let got: Vec<(&str, &str)> = env.pairs().collect();
        assert_eq!(
            got,
            [
                ("CPU", "2"),
                ("CPU_M", "1500"),
                ("REQ_CPU", "1"),
                ("MEM", "134217728"),
                ("MEM_MI", "128"),
                ("REQ_MEM_MI", "96"),
                ("SIDE", "2"),
            ]
        );
        // An unset limit is the node's allocatable, which must be known.
        let c = container(json!({"name": "app", "env": [
            {"name": "MEM", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Gi"}}}]}));
        let err = resolve(&c, &spec_of(&c), &Sources::default()).unwrap_err();
        assert!(matches!(err, EnvError::NoNodeAllocatable { .. }), "{err}");
        let allocatable = BTreeMap::from([("memory".to_owned(), Quantity("8Gi".into()))]);
        let env = resolve(
            &c,
            &spec_of(&c),
            &Sources {
                node_allocatable: Some(&allocatable),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(env.get("MEM").unwrap().value, "8");
    }

    #[test]
    fn quantities_parse_exactly() {
        let milli = |t: &str| parse_quantity(t).unwrap().ceil_scaled(1000).unwrap();
        assert_eq!(milli("1"), 1000);
        assert_eq!(milli("0.5"), 500);
        assert_eq!(milli("250m"), 250);
        assert_eq!(milli("1u"), 1);
        assert_eq!(milli("1e3"), 1_000_000);
        assert_eq!(milli("+2k"), 2_000_000);
        let one = |t: &str| parse_quantity(t).unwrap().ceil_scaled(1).unwrap();
        assert_eq!(one("1Ki"), 1024);
        assert_eq!(one("1.5Gi"), 1_610_612_736);
        assert_eq!(one("1E"), 1_000_000_000_000_000_000);
        assert_eq!(one("100m"), 1);
        for bad in ["", "abc", "1.2.3", "1Xi", "-1", "1e"] {
            assert!(parse_quantity(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_app_container_is_the_first_that_is_not_kips() {
        let spec: PodSpec = serde_json::from_value(json!({"containers": [
            {"name": "kips-bridge"}, {"name": "app"}, {"name": "other"}]}))
        .unwrap();
        assert_eq!(app_container(&spec, None).unwrap().name, "app");
        assert_eq!(app_container(&spec, Some("other")).unwrap().name, "other");
        assert_eq!(
            app_container(&spec, Some("x")).unwrap_err().to_string(),
            "the pod has no container \"x\" (it has kips-bridge, app, other)"
        );
    }

    #[test]
    fn the_env_file_reads_back_verbatim_in_a_shell() {
        let values = [
            "plain-value_1.2:3@x/y%z+w,v=u",
            "",
            "two words",
            "it's",
            "$(HOME) $HOME `id` \\ \"q\"",
            "line one\nline two",
            "~/not-home",
            "a;b&c|d>e<f*g?h[i]j{k}l!m#n",
        ];
        let mut env = Environment::default();
        for (i, value) in values.iter().enumerate() {
            env.define(Var {
                name: format!("V{i}"),
                value: (*value).to_owned(),
                origin: Origin::Value,
                secret: false,
            });
        }
        env.define(Var {
            name: "not.shell".into(),
            value: "x".into(),
            origin: Origin::Value,
            secret: false,
        });
        let (text, left_out) = dotenv(&env, "kips connect deployment/api\nsecond line");
        assert!(
            text.starts_with("# kips connect deployment/api\n# second line\n"),
            "{text}"
        );
        assert_eq!(left_out, ["not.shell"]);
        // The shell reads every value back byte for byte.
        let mut script = text.clone();
        for i in 0..values.len() {
            script.push_str(&format!("printf '%s\\0' \"$V{i}\"\n"));
        }
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(&script)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let read: Vec<String> = out
            .stdout
            .split(|b| *b == 0)
            .take(values.len())
            .map(|b| String::from_utf8(b.to_vec()).unwrap())
            .collect();
        assert_eq!(read, values);
    }
}
