//! Pod mutation: inject `kips-bridge` (and `kips-init` in iptables mode), or strip and
//! re-render a pod that kips already injected.

use std::collections::{BTreeMap, BTreeSet};

use json_patch::PatchOperation;
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, ObjectFieldSelector, Probe,
    ResourceRequirements, SeccompProfile, SecretKeySelector, SecurityContext, TCPSocketAction,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::Value;
use serde_json::value::RawValue;

use super::bridge::{BridgedPort, CONNECTION_STRING_ENV, cluster_args};
use super::ports::{PortRedirect, allocate_listen_ports};
use super::status::{InjectionStatus, RenamedPort};
use super::view::{MetaView, PodView, PortValue};
use super::{
    BRIDGE_CONTAINER, CONNECTION_STRING_KEY, Effect, INIT_CONTAINER, InjectConfig, Mutation,
    PatchOp, VERSION, add, parse_pointer, pointer, replace, to_json_patch,
};
use crate::annotations::{KipsAnnotations, PortMode, PortRef, Protocol, RelayName, STATUS};

/// The env var through which `kips-init` learns the node's addresses (the kubelet's probes
/// come from there and must still reach the app).
pub const NODE_IPS_ENV: &str = "KIPS_NODE_IPS";

/// Admits a pod given as JSON. `relay_hint` names the workload when the pod has no owner to
/// tell it (a pod template rendered by `kips inject`).
pub fn mutate(
    pod_json: &str,
    config: &InjectConfig,
    relay_hint: Option<&str>,
) -> Result<Mutation, serde_json::Error> {
    let pod: PodView = serde_json::from_str(pod_json)?;
    mutate_parsed(&pod, || serde_json::from_str(pod_json), config, relay_hint)
}

/// Admits a pod already read into a view. `whole_pod` gives the complete object, which only
/// a pod kips injected before needs (it is stripped and re-rendered as a JSON value).
pub fn mutate_parsed(
    pod: &PodView,
    whole_pod: impl FnOnce() -> Result<Value, serde_json::Error>,
    config: &InjectConfig,
    relay_hint: Option<&str>,
) -> Result<Mutation, serde_json::Error> {
    if carries_injection(pod) {
        // Already injected (reinvocation, or a template rendered by `kips inject`): strip
        // what kips added, render afresh, and send only the difference.
        return Ok(rerender(&whole_pod()?, config, relay_hint));
    }
    if !crate::annotations::has_kips_key(pod.metadata.annotation_pairs().map(|(k, _)| k)) {
        return Ok(Mutation::default());
    }
    Ok(mutate_view(pod, config, relay_hint))
}

fn carries_injection(pod: &PodView) -> bool {
    pod.metadata.annotation(STATUS).is_some()
        || pod
            .spec
            .all_containers()
            .any(|c| &*c.name == BRIDGE_CONTAINER || &*c.name == INIT_CONTAINER)
}

/// Injects into a pod that carries nothing of kips yet.
fn mutate_view(pod: &PodView, config: &InjectConfig, relay_hint: Option<&str>) -> Mutation {
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
    match plan(pod, &annotations, config, relay_hint) {
        Ok(plan) => Mutation {
            patch: render(pod, &plan, config),
            warnings: plan.warnings,
            effect: Effect::Injected,
            needs: None,
        },
        Err(reason) => skipped(reason),
    }
}

/// Everything decided about one pod before rendering.
#[derive(Debug)]
pub struct Plan {
    pub ports: Vec<BridgedPort>,
    pub annotations: KipsAnnotations,
    /// `None` when there is nothing to redirect (reverse entries only).
    pub mode: Option<PortMode>,
    pub renames: Vec<Rename>,
    pub secret: String,
    pub warnings: Vec<String>,
}

#[derive(Debug)]
pub struct Rename {
    pub container: usize,
    pub container_name: String,
    pub port: usize,
    pub from: String,
    pub to: String,
}

/// A container port a redirect refers to.
struct DeclaredPort<'v> {
    container: usize,
    port: usize,
    number: u16,
    name: Option<&'v str>,
}

pub fn plan(
    pod: &PodView,
    annotations: &KipsAnnotations,
    config: &InjectConfig,
    relay_hint: Option<&str>,
) -> Result<Plan, String> {
    let mut warnings = Vec::new();
    let default_relay = || -> Result<RelayName, String> {
        let name = relay_hint
            .map(str::to_owned)
            .or_else(|| workload_name(&pod.metadata))
            .ok_or("a redirect without a relay needs the workload's name, and this pod has none; write <relay>:<port>")?;
        RelayName::parse(&name).map_err(|e| format!("the workload name cannot be the relay: {e}"))
    };

    let mut resolved = Vec::new();
    for redirect in &annotations.redirects {
        let relay = match &redirect.relay {
            Some(relay) => relay.clone(),
            None => default_relay()?,
        };
        let declared = find_declared_port(pod, &redirect.port, redirect.protocol)?;
        let app_port = match (&redirect.port, &declared) {
            (_, Some(d)) => d.number,
            (PortRef::Number(n), None) => {
                warnings.push(format!(
                    "kips: port {n}/{} is not declared by any container; redirecting it anyway",
                    redirect.protocol
                ));
                *n
            }
            (PortRef::Name(_), None) => unreachable!("a port name always resolves or errs"),
        };
        resolved.push((redirect, relay, app_port, declared));
    }

    let requested = annotations.port_mode.unwrap_or(config.default_port_mode);
    let mode = (!resolved.is_empty()).then(|| match requested {
        PortMode::Auto
            if annotations
                .redirects
                .iter()
                .all(|r| matches!(r.port, PortRef::Name(_))) =>
        {
            PortMode::Named
        }
        PortMode::Auto => PortMode::Iptables,
        explicit => explicit,
    });

    let taken: BTreeSet<u16> = pod
        .spec
        .all_containers()
        .flat_map(|c| c.ports())
        .filter_map(|p| u16::try_from(p.container_port).ok())
        .collect();
    let listen_ports = allocate_listen_ports(config.listen_port_base, &taken, resolved.len())?;

    let mut renames = Vec::new();
    let mut ports = Vec::new();
    for ((redirect, relay, app_port, declared), listen_port) in
        resolved.into_iter().zip(listen_ports)
    {
        if mode == Some(PortMode::Named) {
            let Some(DeclaredPort {
                container,
                port,
                name: Some(name),
                ..
            }) = declared
            else {
                return Err(format!(
                    "port mode named needs a named container port, and port {redirect} has no name; name the port or use kips.io/port-mode: iptables"
                ));
            };
            let to = renamed_port_name(app_port, redirect.protocol);
            if pod.spec.containers[container]
                .ports()
                .iter()
                .any(|p| p.name.as_deref() == Some(&to))
            {
                return Err(format!(
                    "container port name \"{to}\" is taken; kips needs it for the renamed port \"{name}\""
                ));
            }
            renames.push(Rename {
                container,
                container_name: pod.spec.containers[container].name.to_string(),
                port,
                from: name.to_owned(),
                to,
            });
        }
        ports.push(BridgedPort {
            relay,
            port: redirect.port.clone(),
            protocol: redirect.protocol,
            app_port,
            listen_port,
        });
    }

    Ok(Plan {
        ports,
        annotations: annotations.clone(),
        mode,
        renames,
        secret: annotations
            .relay_secret
            .clone()
            .unwrap_or_else(|| config.relay_secret.clone()),
        warnings,
    })
}

/// The port a redirect names: by name it must exist (with the redirect's protocol); by number
/// it may be undeclared (iptables still redirects it).
fn find_declared_port<'v>(
    pod: &'v PodView,
    port: &PortRef,
    protocol: Protocol,
) -> Result<Option<DeclaredPort<'v>>, String> {
    let declared = pod
        .spec
        .containers
        .iter()
        .enumerate()
        .flat_map(|(ci, c)| c.ports().iter().enumerate().map(move |(pi, p)| (ci, pi, p)));
    let mut by_name_other_protocol = None;
    for (container, index, p) in declared {
        let matches = match port {
            PortRef::Number(n) => p.container_port == i32::from(*n),
            PortRef::Name(name) => p.name.as_deref() == Some(name.as_str()),
        };
        if !matches {
            continue;
        }
        if p.protocol() != Some(protocol) {
            by_name_other_protocol =
                Some((container, p.protocol.as_deref().unwrap_or("TCP").to_owned()));
            continue;
        }
        return Ok(Some(DeclaredPort {
            container,
            port: index,
            number: u16::try_from(p.container_port)
                .map_err(|_| format!("container port {} is out of range", p.container_port))?,
            name: p.name.as_deref(),
        }));
    }
    match (port, by_name_other_protocol) {
        (PortRef::Name(name), Some((container, declared))) => Err(format!(
            "port \"{name}\" of container \"{}\" is {declared}, not {}; write \"{name}{}\"",
            &*pod.spec.containers[container].name,
            protocol.kubernetes_name(),
            if declared == "UDP" { "/udp" } else { "" }
        )),
        (PortRef::Name(name), None) => {
            let names: Vec<&str> = pod
                .spec
                .containers
                .iter()
                .flat_map(|c| c.ports())
                .filter_map(|p| p.name.as_deref())
                .collect();
            Err(format!(
                "no container declares a port named \"{name}\" (declared names: {})",
                if names.is_empty() {
                    "none".to_owned()
                } else {
                    names.join(", ")
                }
            ))
        }
        (PortRef::Number(_), _) => Ok(None),
    }
}

/// The name the app's port gets in named mode, freeing its old name for the sidecar.
/// At most 15 characters (`kips-app-65535u`), as Kubernetes requires.
pub fn renamed_port_name(app_port: u16, protocol: Protocol) -> String {
    match protocol {
        Protocol::Tcp => format!("kips-app-{app_port}"),
        Protocol::Udp => format!("kips-app-{app_port}u"),
    }
}

/// The workload a pod belongs to, which is the default relay name: a Deployment's pods are
/// owned by `<deployment>-<pod-template-hash>`; other controllers own their pods directly.
pub fn workload_name(meta: &MetaView) -> Option<String> {
    let owner = meta
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true));
    if let Some(owner) = owner {
        // A Deployment's ReplicaSet is named `<deployment>-<pod-template-hash>`.
        if &*owner.kind == "ReplicaSet"
            && let Some(hash) = meta.label("pod-template-hash")
            && let Some(deployment) = owner
                .name
                .strip_suffix(hash)
                .and_then(|n| n.strip_suffix('-'))
        {
            return Some(deployment.to_owned());
        }
        return Some(owner.name.to_string());
    }
    meta.name
        .as_deref()
        .map(str::to_owned)
        .or_else(|| {
            meta.generate_name
                .as_deref()
                .map(|g| g.trim_end_matches('-').to_owned())
        })
        .filter(|n| !n.is_empty())
}

/// The patch for a fresh injection: parents before children, appends with `/-`.
fn render(pod: &PodView, plan: &Plan, config: &InjectConfig) -> Vec<PatchOp> {
    let init =
        (plan.mode == Some(PortMode::Iptables)).then(|| rendered(&init_container(plan, config)));
    let bridge = rendered(&bridge_container(plan, config));
    let mut status = status(plan, config);
    status.digest = digest(init.iter().chain([&bridge]), &status);

    let mut ops = Vec::with_capacity(8);
    if pod.metadata.annotations.is_none() {
        ops.push(add(
            pointer(["metadata", "annotations"]),
            Value::Object(Default::default()),
        ));
    }
    ops.push(add(
        pointer(["metadata", "annotations", STATUS]),
        Value::String(status.to_json()),
    ));

    for rename in &plan.renames {
        let container = rename.container.to_string();
        let port = rename.port.to_string();
        ops.push(replace(
            pointer(["spec", "containers", &container, "ports", &port, "name"]),
            Value::String(rename.to.clone()),
        ));
        // The kubelet resolves a probe's port name within the probe's own container.
        for (handler_path, handler) in plan_handlers(pod, rename.container) {
            for (port_path, value) in handler.ports() {
                if *value == PortValue::Name(rename.from.as_str().into()) {
                    ops.push(replace(
                        parse_pointer(&format!(
                            "/spec/containers/{container}/{handler_path}/{port_path}"
                        )),
                        Value::String(rename.to.clone()),
                    ));
                }
            }
        }
    }

    if init.is_some() || config.native_sidecar {
        if pod.spec.init_containers.is_none() {
            ops.push(add(
                pointer(["spec", "initContainers"]),
                Value::Array(Vec::new()),
            ));
        }
        if let Some(init) = init {
            ops.push(PatchOp::AddRendered {
                path: pointer(["spec", "initContainers", "-"]),
                value: init,
            });
        }
    }
    let list = if config.native_sidecar {
        "initContainers"
    } else {
        "containers"
    };
    ops.push(PatchOp::AddRendered {
        path: pointer(["spec", list, "-"]),
        value: bridge,
    });
    ops
}

/// A fingerprint of everything kips renders into a pod (its containers and the status
/// fields), so that a reinvocation can tell an intact injection from one that must change.
/// Not a security boundary (whoever can write the pod can write its status), so a fast
/// stable hash (xxh3, fixed by its specification) over the JSON, streamed without buffers.
fn digest<'c>(
    containers: impl Iterator<Item = &'c Box<RawValue>>,
    status: &InjectionStatus,
) -> String {
    struct Hashing(xxhash_rust::xxh3::Xxh3);
    impl std::io::Write for Hashing {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.update(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut hashing = Hashing(xxhash_rust::xxh3::Xxh3::new());
    for container in containers {
        hashing.0.update(container.get().as_bytes());
    }
    serde_json::to_writer(&mut hashing, status).expect("the status serialises");
    format!("{:016x}", hashing.0.digest())
}

fn plan_handlers<'p, 'v>(
    pod: &'p PodView<'v>,
    container: usize,
) -> impl Iterator<Item = (&'static str, &'p super::view::HandlerView<'v>)> {
    pod.spec.containers[container].handlers()
}

fn rendered(container: &Container) -> Box<RawValue> {
    serde_json::value::to_raw_value(container).expect("containers serialise")
}

pub fn port_redirects(plan: &Plan) -> Vec<PortRedirect> {
    plan.ports
        .iter()
        .map(|p| PortRedirect {
            protocol: p.protocol,
            app_port: p.app_port,
            listen_port: p.listen_port,
        })
        .collect()
}

fn status(plan: &Plan, config: &InjectConfig) -> InjectionStatus {
    let iptables = plan.mode == Some(PortMode::Iptables);
    let (mut init_containers, mut containers) = (Vec::new(), Vec::new());
    if iptables {
        init_containers.push(INIT_CONTAINER.to_owned());
    }
    if config.native_sidecar {
        init_containers.push(BRIDGE_CONTAINER.to_owned());
    } else {
        containers.push(BRIDGE_CONTAINER.to_owned());
    }
    InjectionStatus {
        version: VERSION.to_owned(),
        port_mode: plan.mode.map(|m| m.to_string()),
        port_mode_requested: plan.mode.map(|_| {
            plan.annotations
                .port_mode
                .unwrap_or(config.default_port_mode)
                .to_string()
        }),
        sidecar: if config.native_sidecar {
            "native"
        } else {
            "container"
        }
        .to_owned(),
        init_containers,
        containers,
        redirects: port_redirects(plan)
            .iter()
            .map(ToString::to_string)
            .collect(),
        reverse: plan
            .annotations
            .reverses
            .iter()
            .map(|r| r.relay.to_string())
            .collect(),
        renamed_ports: plan
            .renames
            .iter()
            .map(|r| RenamedPort {
                container: r.container_name.clone(),
                from: r.from.clone(),
                to: r.to.clone(),
            })
            .collect(),
        digest: String::new(),
    }
}

fn quantities(pairs: &[(&str, &str)]) -> Option<BTreeMap<String, Quantity>> {
    Some(
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Quantity((*v).to_owned())))
            .collect(),
    )
}

fn bridge_container(plan: &Plan, config: &InjectConfig) -> Container {
    let named = plan.mode == Some(PortMode::Named);
    let ports: Vec<ContainerPort> = plan
        .ports
        .iter()
        .zip(0..)
        .map(|(p, index)| ContainerPort {
            // In named mode the sidecar takes over the app port's name, so that a Service
            // whose targetPort is that name reaches the sidecar.
            name: Some(if named {
                plan.renames[index].from.clone()
            } else {
                format!("kips-{}", p.listen_port)
            }),
            container_port: i32::from(p.listen_port),
            protocol: Some(p.protocol.kubernetes_name().to_owned()),
            ..Default::default()
        })
        .collect();
    // azbridge binds its listeners only once the relay answers: until then the pod is not
    // ready, so a rollout never replaces working pods with ones that cannot carry traffic.
    let readiness_probe = plan
        .ports
        .iter()
        .find(|p| p.protocol == Protocol::Tcp)
        .map(|p| Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::Int(i32::from(p.listen_port)),
                ..Default::default()
            }),
            period_seconds: Some(5),
            failure_threshold: Some(3),
            ..Default::default()
        });
    Container {
        name: BRIDGE_CONTAINER.to_owned(),
        image: Some(config.bridge_image.clone()),
        image_pull_policy: config.image_pull_policy.clone(),
        args: Some(cluster_args(&plan.ports, &plan.annotations.reverses)),
        env: Some(vec![
            EnvVar {
                name: CONNECTION_STRING_ENV.to_owned(),
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: plan.secret.clone(),
                        key: CONNECTION_STRING_KEY.to_owned(),
                        optional: Some(false),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            },
            // .NET writes diagnostics pipes to /tmp, which is read-only here.
            EnvVar {
                name: "DOTNET_EnableDiagnostics".to_owned(),
                value: Some("0".to_owned()),
                ..Default::default()
            },
        ]),
        ports: (!ports.is_empty()).then_some(ports),
        readiness_probe,
        resources: Some(ResourceRequirements {
            requests: quantities(&[("cpu", "10m"), ("memory", "64Mi")]),
            limits: quantities(&[("memory", "256Mi")]),
            ..Default::default()
        }),
        restart_policy: config.native_sidecar.then(|| "Always".to_owned()),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                ..Default::default()
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_owned(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn init_container(plan: &Plan, config: &InjectConfig) -> Container {
    let mut args = vec!["init-net".to_owned()];
    for redirect in port_redirects(plan) {
        args.push("--redirect".to_owned());
        args.push(redirect.to_string());
    }
    args.push(format!("--node-ips=$({NODE_IPS_ENV})"));
    Container {
        name: INIT_CONTAINER.to_owned(),
        image: Some(config.init_image.clone()),
        image_pull_policy: config.image_pull_policy.clone(),
        args: Some(args),
        env: Some(vec![EnvVar {
            name: NODE_IPS_ENV.to_owned(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "status.hostIPs".to_owned(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }]),
        resources: Some(ResourceRequirements {
            requests: quantities(&[("cpu", "10m"), ("memory", "16Mi")]),
            limits: quantities(&[("memory", "64Mi")]),
            ..Default::default()
        }),
        // Root with exactly the two capabilities nat rules need; iptables takes a lock file
        // under /run, so the root filesystem stays writable for this short-lived container.
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".to_owned(), "NET_RAW".to_owned()]),
                drop: Some(vec!["ALL".to_owned()]),
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_owned(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Removes what kips injected, using `kips.io/status` to undo port renames.
pub fn strip(pod: &mut Value) {
    let status: Option<InjectionStatus> = pod
        .pointer(&format!(
            "/metadata/annotations/{}",
            STATUS.replace('/', "~1")
        ))
        .and_then(Value::as_str)
        .and_then(|s| serde_json::from_str(s).ok());
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
fn rerender(current: &Value, config: &InjectConfig, relay_hint: Option<&str>) -> Mutation {
    let mut desired = current.clone();
    strip(&mut desired);
    let stripped = desired.clone();
    let view = PodView::deserialize_from(&stripped);
    let mut fresh = mutate_view(&view, config, relay_hint);
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
        let Some(containers) = desired["spec"][list].as_array_mut() else {
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

impl<'a> PodView<'a> {
    /// A view borrowing from an in-memory JSON value. The value is a pod kips has just
    /// stripped, so it deserialises whenever the request did.
    fn deserialize_from(value: &'a Value) -> Self {
        use serde::Deserialize;
        PodView::deserialize(value).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Pod;
    use serde_json::json;

    fn config() -> InjectConfig {
        InjectConfig::default()
    }

    /// A pod as a Deployment's ReplicaSet creates it: generateName, owner, template hash,
    /// several containers, an existing init container, named ports and probes.
    fn deployment_pod(annotations: Value) -> Value {
        json!({
            "metadata": {
                "generateName": "api-7c9d8f6b5-",
                "namespace": "shop",
                "labels": {"app": "api", "pod-template-hash": "7c9d8f6b5"},
                "annotations": annotations,
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "api-7c9d8f6b5",
                                     "uid": "0b6f", "controller": true, "blockOwnerDeletion": true}]
            },
            "spec": {
                "initContainers": [{"name": "migrate", "image": "api:1", "args": ["migrate"]}],
                "containers": [
                    {"name": "app", "image": "api:1",
                     "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"},
                               {"name": "metrics", "containerPort": 9090, "protocol": "TCP"},
                               {"name": "dns", "containerPort": 5353, "protocol": "UDP"}],
                     "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}},
                     "livenessProbe": {"tcpSocket": {"port": 8080}},
                     "startupProbe": {"httpGet": {"path": "/", "port": "metrics"}}},
                    {"name": "proxy", "image": "envoy", "ports": [{"containerPort": 15100}]}
                ]
            }
        })
    }

    fn admit(pod: &Value) -> Mutation {
        mutate(&pod.to_string(), &config(), None).unwrap()
    }

    fn apply(pod: &Value, mutation: &Mutation) -> Value {
        let mut patched = pod.clone();
        json_patch::patch(&mut patched, &to_json_patch(&mutation.patch)).unwrap();
        patched
    }

    fn typed(pod: &Value) -> Pod {
        serde_json::from_value(pod.clone()).expect("the patched object is a valid Pod")
    }

    fn container<'p>(pod: &'p Pod, name: &str) -> &'p Container {
        let spec = pod.spec.as_ref().unwrap();
        spec.containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .find(|c| c.name == name)
            .unwrap()
    }

    fn init_names(pod: &Pod) -> Vec<&str> {
        pod.spec
            .as_ref()
            .unwrap()
            .init_containers
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect()
    }

    fn assert_idempotent(injected: &Value) {
        let again = admit(injected);
        assert!(
            again.patch.is_empty(),
            "second admission changed something: {:?}",
            again.patch
        );
        assert_eq!(again.effect, Effect::Unchanged);
    }

    #[test]
    fn iptables_mode_injects_init_container_and_native_sidecar() {
        let pod =
            deployment_pod(json!({"kips.io/redirect": "8080,9090", "kips.io/copied": "redirect"}));
        let mutation = admit(&pod);
        assert_eq!(mutation.effect, Effect::Injected);
        assert!(
            mutation
                .patch
                .iter()
                .all(|op| matches!(op.to_operation(), PatchOperation::Add(_))),
            "a fresh injection only adds"
        );
        let injected = apply(&pod, &mutation);
        let typed_pod = typed(&injected);
        let spec = typed_pod.spec.as_ref().unwrap();
        let init_names: Vec<&str> = spec
            .init_containers
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(init_names, ["migrate", "kips-init", "kips-bridge"]);
        assert_eq!(spec.containers.len(), 2, "app containers untouched");

        let init = container(&typed_pod, "kips-init");
        // 15100 is declared by the proxy container, so listen ports start at 15101.
        assert_eq!(
            init.args.as_ref().unwrap(),
            &[
                "init-net",
                "--redirect",
                "8080/tcp=15101",
                "--redirect",
                "9090/tcp=15102",
                "--node-ips=$(KIPS_NODE_IPS)"
            ]
        );
        let caps = init
            .security_context
            .as_ref()
            .unwrap()
            .capabilities
            .as_ref()
            .unwrap();
        assert_eq!(caps.add.as_ref().unwrap(), &["NET_ADMIN", "NET_RAW"]);
        assert_eq!(caps.drop.as_ref().unwrap(), &["ALL"]);

        let bridge = container(&typed_pod, "kips-bridge");
        assert_eq!(bridge.restart_policy.as_deref(), Some("Always"));
        // The relay defaults to the Deployment's name, recovered from the ReplicaSet owner.
        assert_eq!(
            bridge.args.as_ref().unwrap(),
            &[
                "-x",
                "$(KIPS_RELAY_CONNECTION_STRING)",
                "-L",
                "0.0.0.0:15101/port8080;0.0.0.0:15102/port9090:api"
            ]
        );
        let secret = bridge.env.as_ref().unwrap()[0]
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap();
        assert_eq!(
            (secret.name.as_str(), secret.key.as_str()),
            ("kips-relay", "connectionString")
        );
        let security = bridge.security_context.as_ref().unwrap();
        assert_eq!(security.run_as_non_root, Some(true));
        assert_eq!(security.allow_privilege_escalation, Some(false));

        let status: InjectionStatus =
            serde_json::from_str(&typed_pod.metadata.annotations.as_ref().unwrap()[STATUS])
                .unwrap();
        assert_eq!(status.port_mode.as_deref(), Some("iptables"));
        assert_eq!(status.port_mode_requested.as_deref(), Some("auto"));
        assert_eq!(status.redirects, ["8080/tcp=15101", "9090/tcp=15102"]);
        assert_idempotent(&injected);
    }

    #[test]
    fn named_mode_renames_the_port_and_repoints_its_probes() {
        let pod = deployment_pod(json!({"kips.io/redirect": "api:http,api:dns/udp"}));
        let mutation = admit(&pod);
        let injected = apply(&pod, &mutation);
        let typed_pod = typed(&injected);
        let app = container(&typed_pod, "app");
        let names: Vec<&str> = app
            .ports
            .iter()
            .flatten()
            .filter_map(|p| p.name.as_deref())
            .collect();
        assert_eq!(names, ["kips-app-8080", "metrics", "kips-app-5353u"]);
        let readiness = app
            .readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(
            readiness.port,
            IntOrString::String("kips-app-8080".into()),
            "the kubelet still reaches the app"
        );
        let startup = app
            .startup_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(
            startup.port,
            IntOrString::String("metrics".into()),
            "unrelated probes untouched"
        );

        let bridge = container(&typed_pod, "kips-bridge");
        let ports: Vec<(Option<&str>, i32, Option<&str>)> = bridge
            .ports
            .iter()
            .flatten()
            .map(|p| (p.name.as_deref(), p.container_port, p.protocol.as_deref()))
            .collect();
        assert_eq!(
            ports,
            [
                (Some("http"), 15101, Some("TCP")),
                (Some("dns"), 15102, Some("UDP"))
            ]
        );
        assert_eq!(
            bridge.args.as_ref().unwrap()[2..],
            ["-L", "0.0.0.0:15101/http;0.0.0.0:15102U/dns-udp:api"]
        );
        // No privilege at all: no init container.
        assert!(!init_names(&typed_pod).contains(&"kips-init"));
        let status: InjectionStatus =
            serde_json::from_str(&typed_pod.metadata.annotations.as_ref().unwrap()[STATUS])
                .unwrap();
        assert_eq!(status.port_mode.as_deref(), Some("named"));
        assert_eq!(
            status.renamed_ports[0],
            RenamedPort {
                container: "app".into(),
                from: "http".into(),
                to: "kips-app-8080".into()
            }
        );
        assert_idempotent(&injected);
    }

    #[test]
    fn stripping_an_injected_pod_gives_back_the_original() {
        for annotations in [
            json!({"kips.io/redirect": "api:http", "kips.io/port-mode": "named"}),
            json!({"kips.io/redirect": "8080"}),
        ] {
            let pod = deployment_pod(annotations);
            let mut injected = apply(&pod, &admit(&pod));
            strip(&mut injected);
            assert_eq!(injected, pod);
        }
    }

    #[test]
    fn explicit_named_mode_needs_a_named_port() {
        let pod =
            deployment_pod(json!({"kips.io/redirect": "api:7000", "kips.io/port-mode": "named"}));
        let mutation = admit(&pod);
        assert_eq!(mutation.effect, Effect::Skipped);
        assert!(
            mutation.warnings[0].contains("port mode named needs a named container port"),
            "{:?}",
            mutation.warnings
        );
    }

    #[test]
    fn a_pod_without_an_annotations_map_gets_the_parent_added_first() {
        let mut pod = deployment_pod(json!({}));
        pod["metadata"]
            .as_object_mut()
            .unwrap()
            .remove("annotations");
        assert!(admit(&pod).patch.is_empty(), "no annotations, no patch");

        // A pod template rendered by `kips inject` may carry the status in a fresh map; a bare
        // pod without any map and without kips keys is left alone, so the parent case arises
        // only for kips' own bookkeeping: check the renderer directly.
        let view = <PodView as serde::Deserialize>::deserialize(&pod).unwrap();
        let annotations =
            KipsAnnotations::parse([("kips.io/reverse", "db=pg.data.svc:5432")]).unwrap();
        let plan = plan(&view, &annotations, &config(), None).unwrap();
        let ops = render(&view, &plan, &config());
        assert_eq!(ops[0], add(pointer(["metadata", "annotations"]), json!({})));
        let mut patched = pod.clone();
        json_patch::patch(&mut patched, &to_json_patch(&ops)).unwrap();
        typed(&patched);
    }

    #[test]
    fn reverse_only_pods_get_a_sidecar_without_port_rewriting() {
        let pod = deployment_pod(json!({"kips.io/reverse": "db=postgres.data.svc:5432"}));
        let injected = apply(&pod, &admit(&pod));
        let typed_pod = typed(&injected);
        let bridge = container(&typed_pod, "kips-bridge");
        assert_eq!(
            bridge.args.as_ref().unwrap()[2..],
            ["-T", "db:port5432/postgres.data.svc:5432"]
        );
        assert!(bridge.ports.is_none() && bridge.readiness_probe.is_none());
        assert!(!init_names(&typed_pod).contains(&"kips-init"));
        assert_idempotent(&injected);
    }

    #[test]
    fn classic_sidecar_mode_appends_to_containers() {
        let config = InjectConfig {
            native_sidecar: false,
            ..config()
        };
        let mut pod = deployment_pod(json!({"kips.io/redirect": "api:8080"}));
        pod["spec"]
            .as_object_mut()
            .unwrap()
            .remove("initContainers");
        let mutation = mutate(&pod.to_string(), &config, None).unwrap();
        let injected = apply(&pod, &mutation);
        let typed_pod = typed(&injected);
        let spec = typed_pod.spec.as_ref().unwrap();
        assert_eq!(spec.containers.last().unwrap().name, "kips-bridge");
        assert_eq!(spec.containers.last().unwrap().restart_policy, None);
        assert_eq!(
            spec.init_containers
                .as_ref()
                .unwrap()
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>(),
            ["kips-init"]
        );
        assert!(
            mutate(&injected.to_string(), &config, None)
                .unwrap()
                .patch
                .is_empty()
        );
    }

    #[test]
    fn statefulset_pods_take_the_owner_name_as_relay() {
        let pod = json!({
            "metadata": {"name": "db-0", "annotations": {"kips.io/redirect": "5432"},
                         "ownerReferences": [{"kind": "StatefulSet", "name": "db", "controller": true, "apiVersion": "apps/v1", "uid": "1"}]},
            "spec": {"containers": [{"name": "pg", "image": "postgres", "ports": [{"containerPort": 5432}]}]}
        });
        let typed_pod = typed(&apply(&pod, &admit(&pod)));
        assert!(container(&typed_pod, "kips-bridge").args.as_ref().unwrap()[3].ends_with(":db"));
    }

    #[test]
    fn pods_that_cannot_be_injected_are_let_through_with_a_warning() {
        let host_network = json!({"metadata": {"name": "n", "annotations": {"kips.io/redirect": "x:80"}},
                                  "spec": {"hostNetwork": true, "containers": [{"name": "c"}]}});
        let mutation = admit(&host_network);
        assert!(mutation.patch.is_empty());
        assert!(mutation.warnings[0].contains("hostNetwork"));

        let bad = deployment_pod(json!({"kips.io/redirect": "api:80x0"}));
        let mutation = admit(&bad);
        assert!(mutation.patch.is_empty());
        assert_eq!(mutation.effect, Effect::Skipped);
        assert!(
            mutation.warnings[0].starts_with(
                "kips: pod not injected: kips.io/redirect: \"api:80x0\": port \"80x0\""
            )
        );

        let missing_name = deployment_pod(json!({"kips.io/redirect": "api:grpc"}));
        assert!(admit(&missing_name).warnings[0].contains(
            "no container declares a port named \"grpc\" (declared names: http, metrics, dns)"
        ));

        let wrong_protocol = deployment_pod(json!({"kips.io/redirect": "api:dns"}));
        assert!(admit(&wrong_protocol).warnings[0].contains("is UDP, not TCP; write \"dns/udp\""));
    }

    #[test]
    fn removing_the_annotations_from_an_injected_pod_uninjects_it() {
        let pod = deployment_pod(json!({"kips.io/redirect": "api:http"}));
        let mut injected = apply(&pod, &admit(&pod));
        injected["metadata"]["annotations"]
            .as_object_mut()
            .unwrap()
            .remove("kips.io/redirect");
        let mutation = admit(&injected);
        let reverted = apply(&injected, &mutation);
        let mut expected = pod.clone();
        expected["metadata"]["annotations"] = json!({});
        assert_eq!(reverted, expected);
    }

    #[test]
    fn a_changed_redirect_is_rerendered_minimally() {
        let pod = deployment_pod(json!({"kips.io/redirect": "api:8080"}));
        let mut injected = apply(&pod, &admit(&pod));
        injected["metadata"]["annotations"]["kips.io/redirect"] = json!("web:8080");
        let mutation = admit(&injected);
        assert!(
            mutation
                .patch
                .iter()
                .all(|op| matches!(op.to_operation(), PatchOperation::Replace(_))),
            "{:?}",
            mutation.patch
        );
        let rerendered = apply(&injected, &mutation);
        assert!(
            rerendered
                .to_string()
                .contains("0.0.0.0:15101/port8080:web")
        );
        assert_idempotent(&rerendered);
    }

    /// What the API server does to kips' containers between kips' first call and its
    /// reinvocation: defaulting, the ServiceAccount token mount, LimitRange defaults, and
    /// another webhook's environment variable.
    fn as_the_api_server_leaves_it(mut pod: Value) -> Value {
        for list in ["containers", "initContainers"] {
            for container in pod["spec"][list].as_array_mut().into_iter().flatten() {
                container["terminationMessagePath"] = json!("/dev/termination-log");
                container["imagePullPolicy"] = json!("IfNotPresent");
                container["volumeMounts"] = json!([{"name": "kube-api-access-x1", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}]);
                if container["resources"].is_object() {
                    container["resources"]["limits"]["cpu"] = json!("500m");
                }
                if let Some(env) = container["env"].as_array_mut() {
                    env.push(json!({"name": "HTTPS_PROXY", "value": "http://proxy:3128"}));
                }
            }
        }
        pod
    }

    #[test]
    fn reinvocation_keeps_what_the_api_server_added_to_kips_containers() {
        let pod = deployment_pod(json!({"kips.io/redirect": "8080"}));
        let reinvoked = as_the_api_server_leaves_it(apply(&pod, &admit(&pod)));
        let mutation = admit(&reinvoked);
        assert!(mutation.patch.is_empty(), "{:?}", mutation.patch);
        assert_eq!(mutation.effect, Effect::Unchanged);
    }

    #[test]
    fn a_needed_rerender_still_keeps_what_others_added() {
        let pod = deployment_pod(json!({"kips.io/redirect": "8080"}));
        let mut reinvoked = as_the_api_server_leaves_it(apply(&pod, &admit(&pod)));
        // Another webhook added a container that declares kips' listen port 15101.
        reinvoked["spec"]["containers"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": "late", "image": "x", "ports": [{"containerPort": 15101}]}));
        let mutation = admit(&reinvoked);
        assert_eq!(mutation.effect, Effect::Injected);
        let rerendered = apply(&reinvoked, &mutation);
        let typed_pod = typed(&rerendered);
        for name in ["kips-init", "kips-bridge"] {
            let c = container(&typed_pod, name);
            assert_eq!(
                c.volume_mounts.as_ref().unwrap()[0].name,
                "kube-api-access-x1",
                "{name}"
            );
            assert_eq!(
                c.termination_message_path.as_deref(),
                Some("/dev/termination-log")
            );
            assert_eq!(
                c.resources.as_ref().unwrap().limits.as_ref().unwrap()["cpu"].0,
                "500m",
                "{name}"
            );
            assert!(
                c.env
                    .as_ref()
                    .unwrap()
                    .iter()
                    .any(|e| e.name == "HTTPS_PROXY"),
                "{name}"
            );
        }
        let bridge = container(&typed_pod, "kips-bridge");
        assert_eq!(
            bridge.args.as_ref().unwrap()[3],
            "0.0.0.0:15102/port8080:api",
            "the listen port moved past 15101"
        );
        let ports: Vec<i32> = bridge
            .ports
            .iter()
            .flatten()
            .map(|p| p.container_port)
            .collect();
        assert_eq!(
            ports,
            [15102],
            "no stale port entry of the earlier rendering"
        );
        assert!(admit(&rerendered).patch.is_empty());
    }

    #[test]
    fn undeclared_numeric_ports_are_redirected_with_a_warning() {
        let pod = deployment_pod(json!({"kips.io/redirect": "api:7000"}));
        let mutation = admit(&pod);
        assert_eq!(mutation.effect, Effect::Injected);
        assert!(mutation.warnings[0].contains("port 7000/tcp is not declared"));
    }
}
