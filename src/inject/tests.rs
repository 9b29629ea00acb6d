//! The pod pipeline end to end: fresh injection, named mode, stripping, reinvocation.

use super::patch::{add, pointer, to_json_patch};
use super::plan::plan;
use super::render::render;
use super::*;
use crate::annotations::{InjectionStatus, RenamedPort};
use json_patch::PatchOperation;
use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{Value, json};

use super::reinvoke::strip;
use crate::annotations::STATUS;

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
    mutate_pod(&pod.to_string(), &config(), None).unwrap()
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

/// Fuzz finding (target `review`): a kips pod without `spec` (or with no containers) was
/// answered with a patch under `/spec`, which cannot apply; it is let through uninjected
/// with a warning, and the API server's validation says what is wrong with it.
#[test]
fn a_pod_without_containers_is_skipped_not_patched() {
    let mut pod = deployment_pod(json!({"kips.io/redirect": "8080"}));
    pod.as_object_mut().unwrap().remove("spec");
    for pod in [
        pod.clone(),
        json!({"metadata": pod["metadata"], "spec": {}}),
    ] {
        let mutation = admit(&pod);
        assert_eq!(mutation.effect, Effect::Skipped);
        assert!(mutation.patch.is_empty(), "{:?}", mutation.patch);
        assert_eq!(
            mutation.warnings,
            ["kips: pod not injected: it has no containers (spec.containers is missing or empty)"]
        );
    }
}

/// Fuzz finding (target `review`): re-admitting a pod that carries `kips.io/status` but no
/// container lists added `"containers": null` and `"initContainers": null` (JSON indexing
/// inserts what it does not find), and kips could not read its own result.
#[test]
fn re_admitting_a_pod_without_container_lists_adds_no_null_lists() {
    let mut pod = deployment_pod(json!({"kips.io/redirect": "8080"}));
    pod["spec"] = json!({"restartPolicy": "Always"});
    pod["metadata"]["annotations"]["kips.io/status"] = json!("{}");
    let mutation = admit(&pod);
    let result = apply(&pod, &mutation);
    assert_eq!(
        result["spec"],
        json!({"restartPolicy": "Always"}),
        "{result}"
    );
    assert!(admit(&result).patch.is_empty());
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
            "--node-ips=$(KIPS_NODE_IPS)",
            "--ipv6=false"
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
            "0.0.0.0:15101/8080;0.0.0.0:15102/9090:api"
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
    // No probe through the relay: azbridge's -L port is open before the relay answers, and
    // each TCP probe would open a relay connection that lands on the laptop.
    assert!(bridge.readiness_probe.is_none() && bridge.liveness_probe.is_none());
    let security = bridge.security_context.as_ref().unwrap();
    assert_eq!(security.run_as_non_root, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));

    let status: InjectionStatus =
        serde_json::from_str(&typed_pod.metadata.annotations.as_ref().unwrap()[STATUS]).unwrap();
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
        ["-L", "0.0.0.0:15101/http;0.0.0.0:15102U/dns.udp:api"]
    );
    // No privilege at all: no init container.
    assert!(!init_names(&typed_pod).contains(&"kips-init"));
    let status: InjectionStatus =
        serde_json::from_str(&typed_pod.metadata.annotations.as_ref().unwrap()[STATUS]).unwrap();
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
    let pod = deployment_pod(json!({"kips.io/redirect": "api:7000", "kips.io/port-mode": "named"}));
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
    let annotations = KipsAnnotations::parse([("kips.io/reverse", "db=pg.data.svc:5432")]).unwrap();
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
        ["-T", "db:5432/postgres.data.svc:5432"]
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
    let mutation = mutate_pod(&pod.to_string(), &config, None).unwrap();
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
        mutate_pod(&injected.to_string(), &config, None)
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
        mutation.warnings[0]
            .starts_with("kips: pod not injected: kips.io/redirect: \"api:80x0\": port \"80x0\"")
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
    assert!(rerendered.to_string().contains("0.0.0.0:15101/8080:web"));
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
        "0.0.0.0:15102/8080:api",
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

#[test]
fn binding_names_stay_distinct_where_the_old_names_collided() {
    // A port named `port8080` (9090) beside port 8080; a TCP port named `dns-udp` beside the
    // UDP port `dns`: before, each pair shared one binding name and azbridge exited.
    let pod = json!({
        "metadata": {"name": "p", "annotations": {"kips.io/redirect": "api:port8080,api:8080,api:dns-udp,api:dns/udp"}},
        "spec": {"containers": [{"name": "app", "image": "app", "ports": [
            {"name": "port8080", "containerPort": 9090},
            {"containerPort": 8080},
            {"name": "dns-udp", "containerPort": 5300},
            {"name": "dns", "containerPort": 5353, "protocol": "UDP"}
        ]}]}
    });
    let typed_pod = typed(&apply(&pod, &admit(&pod)));
    let args = container(&typed_pod, "kips-bridge").args.clone().unwrap();
    assert_eq!(
        args[3],
        "0.0.0.0:15100/port8080;0.0.0.0:15101/8080;0.0.0.0:15102/dns-udp;0.0.0.0:15103U/dns.udp:api"
    );
}

#[test]
fn two_redirects_of_one_container_port_are_refused() {
    // `http` is port 8080: two nat rules for one port can never both apply.
    let pod = deployment_pod(json!({"kips.io/redirect": "api:http,web:8080"}));
    let mutation = admit(&pod);
    assert_eq!(mutation.effect, Effect::Skipped);
    assert!(
        mutation.warnings[0]
            .contains("\"api:http\" and \"web:8080\" both mean container port 8080/tcp"),
        "{:?}",
        mutation.warnings
    );
}

#[test]
fn a_bare_pod_whose_default_relay_carries_a_reverse_entry_is_left_alone() {
    // The Deployment `api`'s pod: `8080` takes the relay `api`, which the reverse entry uses.
    let pod = deployment_pod(
        json!({"kips.io/redirect": "8080", "kips.io/reverse": "api=db.shop.svc:5432"}),
    );
    let mutation = admit(&pod);
    assert!(mutation.patch.is_empty());
    assert_eq!(mutation.effect, Effect::Skipped);
    assert!(
        mutation.warnings[0].starts_with(
            "kips: pod not injected: kips.io/reverse: \"api=db.shop.svc:5432\": relay \"api\""
        ),
        "{:?}",
        mutation.warnings
    );
}

#[test]
fn the_kips_engine_binds_dual_stack_probes_its_health_port_and_redirects_ipv6() {
    let config = InjectConfig {
        bridge_engine: crate::bridge::BridgeEngine::Kips,
        bridge_image: "ghcr.io/kips-dev/kips:test".into(),
        ..config()
    };
    let pod = deployment_pod(json!({"kips.io/redirect": "8080,dns:dns/udp"}));
    let mutation = mutate_pod(&pod.to_string(), &config, None).unwrap();
    assert!(
        mutation.warnings.iter().all(|w| !w.contains("UDP")),
        "{:?}",
        mutation.warnings
    );
    let injected = apply(&pod, &mutation);
    let typed_pod = typed(&injected);
    let bridge = container(&typed_pod, "kips-bridge");
    assert_eq!(bridge.image.as_deref(), Some("ghcr.io/kips-dev/kips:test"));
    // 15100 is the proxy's: listen ports 15101 and 15102, the health port after them.
    assert_eq!(
        bridge.args.as_ref().unwrap(),
        &[
            "bridge",
            "-x",
            "$(KIPS_RELAY_CONNECTION_STRING)",
            "-L",
            "[::]:15101/8080:api",
            "-L",
            "[::]:15102U/dns.udp:dns",
            "--health-listen",
            "[::]:15103"
        ]
    );
    let readiness = bridge
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(readiness.path.as_deref(), Some("/readyz"));
    assert_eq!(readiness.port, IntOrString::String("kips-health".into()));
    let health = bridge
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("kips-health"))
        .unwrap();
    assert_eq!(health.container_port, 15103);
    let ca = bridge
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "KIPS_RELAY_CA")
        .unwrap();
    let key = ca
        .value_from
        .as_ref()
        .unwrap()
        .secret_key_ref
        .as_ref()
        .unwrap();
    assert_eq!((key.key.as_str(), key.optional), ("ca.crt", Some(true)));
    assert!(
        bridge
            .env
            .iter()
            .flatten()
            .all(|e| !e.name.starts_with("DOTNET"))
    );
    // The bridge listens on IPv6 too: kips-init redirects both families.
    assert!(
        !container(&typed_pod, "kips-init")
            .args
            .as_ref()
            .unwrap()
            .contains(&"--ipv6=false".to_owned())
    );
    let again = mutate_pod(&injected.to_string(), &config, None).unwrap();
    assert!(again.patch.is_empty(), "{:?}", again.patch);
}
