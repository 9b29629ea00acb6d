//! Rendering a plan: the patch of a fresh injection, the containers kips adds, and the
//! `kips.io/status` record with its digest.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction,
    ObjectFieldSelector, Probe, ResourceRequirements, SeccompProfile, SecretKeySelector,
    SecurityContext,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::Value;
use serde_json::value::RawValue;

use super::patch::{PatchOp, add, parse_pointer, pointer, replace};
use super::plan::Plan;
use super::view::{PodView, PortValue};
use super::{InjectConfig, VERSION};
use crate::annotations::{
    BRIDGE_CONTAINER, INIT_CONTAINER, InjectionStatus, PortMode, RenamedPort, STATUS,
};
use crate::bridge::command_line::sidecar_args;
use crate::bridge::secret::RELAY_CA_KEY;
use crate::bridge::{BridgeEngine, CONNECTION_STRING_ENV, CONNECTION_STRING_KEY, RELAY_CA_ENV};

/// The sidecar's health port (`kips bridge` only): `/readyz`, `/livez`, `/metrics`.
pub const HEALTH_PORT_NAME: &str = "kips-health";

/// The env var through which `kips-init` learns the node's addresses (the kubelet's probes
/// come from there and must still reach the app).
pub const NODE_IPS_ENV: &str = "KIPS_NODE_IPS";

/// The patch for a fresh injection: parents before children, appends with `/-`.
pub fn render(pod: &PodView, plan: &Plan, config: &InjectConfig) -> Vec<PatchOp> {
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
        for (handler_path, handler) in pod.spec.containers[rename.container].handlers() {
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

fn rendered(container: &Container) -> Box<RawValue> {
    serde_json::value::to_raw_value(container).expect("containers serialise")
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
        engine: Some(config.bridge_engine.as_str().to_owned()),
        init_containers,
        containers,
        redirects: plan
            .port_redirects()
            .iter()
            .map(ToString::to_string)
            .collect(),
        reverse: plan
            .reverses
            .iter()
            .map(|r| r.reverse.relay.to_string())
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
    let engine = config.bridge_engine;
    let named = plan.mode == Some(PortMode::Named);
    let mut ports: Vec<ContainerPort> = plan
        .ports
        .iter()
        .zip(0..)
        .map(|(p, index)| ContainerPort {
            // In named mode the sidecar takes over the app port's name, so that a Service
            // whose targetPort is that name reaches the sidecar.
            name: Some(if named {
                plan.renames[index].from.clone()
            } else {
                format!("kips-{}", p.bridge.listen_port)
            }),
            container_port: i32::from(p.bridge.listen_port),
            protocol: Some(p.bridge.route.protocol.kubernetes_name().to_owned()),
            ..Default::default()
        })
        .collect();
    let secret_key = |key: &str, optional: bool| EnvVarSource {
        secret_key_ref: Some(SecretKeySelector {
            name: plan.secret.clone(),
            key: key.to_owned(),
            optional: Some(optional),
        }),
        ..Default::default()
    };
    let mut env = vec![EnvVar {
        name: CONNECTION_STRING_ENV.to_owned(),
        value_from: Some(secret_key(CONNECTION_STRING_KEY, false)),
        ..Default::default()
    }];
    let (readiness_probe, liveness_probe, resources) = match (engine, plan.health_port) {
        (BridgeEngine::Kips, Some(health)) => {
            ports.push(ContainerPort {
                name: Some(HEALTH_PORT_NAME.to_owned()),
                container_port: i32::from(health),
                protocol: Some("TCP".to_owned()),
                ..Default::default()
            });
            // A relay that is not ours (a test or private relay) may need its CA: an optional
            // key of the relay Secret.
            env.push(EnvVar {
                name: RELAY_CA_ENV.to_owned(),
                value_from: Some(secret_key(RELAY_CA_KEY, true)),
                ..Default::default()
            });
            // The health port answers from the bridge's own state: no probe opens a relay
            // connection. Ready once the relay took the credentials (and every -T listener
            // is online).
            let probe = |path: &str, period: i32, failures: i32| Probe {
                http_get: Some(HTTPGetAction {
                    path: Some(path.to_owned()),
                    port: IntOrString::String(HEALTH_PORT_NAME.to_owned()),
                    ..Default::default()
                }),
                period_seconds: Some(period),
                failure_threshold: Some(failures),
                ..Default::default()
            };
            (
                Some(probe("/readyz", 5, 3)),
                Some(probe("/livez", 10, 6)),
                ResourceRequirements {
                    requests: quantities(&[("cpu", "10m"), ("memory", "32Mi")]),
                    limits: quantities(&[("memory", "128Mi")]),
                    ..Default::default()
                },
            )
        }
        _ => {
            // .NET writes diagnostics pipes to /tmp, which is read-only here.
            env.push(EnvVar {
                name: "DOTNET_EnableDiagnostics".to_owned(),
                value: Some("0".to_owned()),
                ..Default::default()
            });
            // No probe on azbridge: its `-L` port is open before the relay answers, and every
            // TCP probe of it would open a relay connection that reaches the laptop.
            (
                None,
                None,
                ResourceRequirements {
                    requests: quantities(&[("cpu", "10m"), ("memory", "64Mi")]),
                    limits: quantities(&[("memory", "256Mi")]),
                    ..Default::default()
                },
            )
        }
    };
    Container {
        name: BRIDGE_CONTAINER.to_owned(),
        image: Some(config.bridge_image.clone()),
        image_pull_policy: config.image_pull_policy.clone(),
        args: Some(sidecar_args(
            plan.ports.iter().map(|p| &p.bridge),
            &plan.reverses,
            engine,
            plan.health_port,
        )),
        env: Some(env),
        ports: (!ports.is_empty()).then_some(ports),
        readiness_probe,
        liveness_probe,
        resources: Some(resources),
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
    for redirect in plan.port_redirects() {
        args.push("--redirect".to_owned());
        args.push(redirect.to_string());
    }
    args.push(format!("--node-ips=$({NODE_IPS_ENV})"));
    if !config.bridge_engine.binds_ipv6() {
        // An ip6tables redirect to a port the bridge does not listen on resets IPv6 clients.
        args.push("--ipv6=false".to_owned());
    }
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
