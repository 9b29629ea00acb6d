//! AdmissionReviews built from structure (arbitrary): pods and workloads with fuzzed kips
//! annotations, containers, ports, probes, kips' own containers and status, under the
//! configurations the flags allow. Each is admitted with the properties of
//! `kips_fuzz::check_review`; then the patched result is changed the way other webhooks,
//! users and controllers change it (an annotation edited, a container or port added, an
//! init container dropped) and admitted again, with the same properties.
#![no_main]

use arbitrary::Arbitrary;
use kips::fuzzing::{BOOKKEEPING_KEYS, USER_KEYS, inject_config};
use kips_fuzz::check_review;
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value, json};

const TOKENS: &[&str] = &[
    "api",
    "db",
    "web",
    "http",
    "grpc",
    "metrics",
    ":",
    ",",
    "/",
    "=",
    "udp",
    "UDP",
    "tcp",
    " ",
    ".",
    "-",
    "0",
    "80",
    "8080",
    "9090",
    "15100",
    "15101",
    "65535",
    "65536",
    "db.svc",
    "10.0.0.1",
    "fd00::1",
    "iptables",
    "named",
    "auto",
    "kips-relay",
    "{",
    "}",
    "\"",
    "[",
    "]",
    "kips-app-8080",
];

const NAMES: &[&str] = &[
    "http",
    "grpc",
    "metrics",
    "api",
    "web",
    "kips-app-8080",
    "kips-app-http",
    "app",
    "envoy",
    "kips-bridge",
    "kips-init",
];

#[derive(Arbitrary, Debug)]
enum Piece {
    Token(u8),
    Number(u16),
    Text(String),
}

#[derive(Arbitrary, Debug)]
struct Text(Vec<Piece>);

impl Text {
    fn render(&self) -> String {
        self.0
            .iter()
            .map(|piece| match piece {
                Piece::Token(i) => TOKENS[*i as usize % TOKENS.len()].to_owned(),
                Piece::Number(n) => n.to_string(),
                Piece::Text(text) => text.clone(),
            })
            .collect()
    }
}

#[derive(Arbitrary, Debug)]
enum Name {
    Known(u8),
    Other(String),
}

impl Name {
    fn render(&self) -> String {
        match self {
            Name::Known(i) => NAMES[*i as usize % NAMES.len()].to_owned(),
            Name::Other(name) => name.clone(),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Key {
    User(u8),
    Bookkeeping(u8),
    Kips(String),
    Foreign(String),
}

impl Key {
    fn render(&self) -> String {
        match self {
            Key::User(i) => USER_KEYS[*i as usize % USER_KEYS.len()].to_owned(),
            Key::Bookkeeping(i) => {
                BOOKKEEPING_KEYS[*i as usize % BOOKKEEPING_KEYS.len()].to_owned()
            }
            Key::Kips(rest) => format!("kips.io/{rest}"),
            Key::Foreign(key) => key.clone(),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Protocol {
    Absent,
    Tcp,
    Udp,
    Sctp,
    Other(String),
}

#[derive(Arbitrary, Debug)]
struct Port {
    number: u16,
    name: Option<Name>,
    protocol: Protocol,
}

impl Port {
    fn render(&self) -> Value {
        let mut port = json!({"containerPort": self.number});
        if let Some(name) = &self.name {
            port["name"] = json!(name.render());
        }
        match &self.protocol {
            Protocol::Absent => {}
            Protocol::Tcp => port["protocol"] = json!("TCP"),
            Protocol::Udp => port["protocol"] = json!("UDP"),
            Protocol::Sctp => port["protocol"] = json!("SCTP"),
            Protocol::Other(other) => port["protocol"] = json!(other),
        }
        port
    }
}

#[derive(Arbitrary, Debug)]
enum ProbePort {
    Number(u16),
    Name(Name),
}

#[derive(Arbitrary, Debug)]
enum Probe {
    Http(ProbePort),
    Tcp(ProbePort),
    Grpc(u16),
}

#[derive(Arbitrary, Debug)]
struct Container {
    name: Name,
    ports: Option<Vec<Port>>,
    readiness: Option<Probe>,
    liveness: Option<Probe>,
    restart_always: bool,
    env: bool,
}

impl Container {
    fn render(&self, init: bool) -> Value {
        let mut container = json!({"name": self.name.render(), "image": "example/app:1"});
        if let Some(ports) = &self.ports {
            container["ports"] = ports.iter().map(Port::render).collect();
        }
        let probe = |probe: &Probe| {
            let port = |port: &ProbePort| match port {
                ProbePort::Number(n) => json!(n),
                ProbePort::Name(name) => json!(name.render()),
            };
            match probe {
                Probe::Http(p) => json!({"httpGet": {"path": "/healthz", "port": port(p)}}),
                Probe::Tcp(p) => json!({"tcpSocket": {"port": port(p)}}),
                Probe::Grpc(n) => json!({"grpc": {"port": n}}),
            }
        };
        if let Some(p) = &self.readiness {
            container["readinessProbe"] = probe(p);
        }
        if let Some(p) = &self.liveness {
            container["livenessProbe"] = probe(p);
        }
        if init && self.restart_always {
            container["restartPolicy"] = json!("Always");
        }
        if self.env {
            container["env"] = json!([{"name": "FROM_ANOTHER_WEBHOOK", "value": "1"}]);
        }
        container
    }
}

#[derive(Arbitrary, Debug)]
struct Spec {
    containers: Vec<Container>,
    init_containers: Option<Vec<Container>>,
    host_network: Option<bool>,
}

impl Spec {
    fn render(&self) -> Value {
        let mut spec = json!({
            "containers": self.containers.iter().map(|c| c.render(false)).collect::<Vec<_>>(),
        });
        if let Some(init) = &self.init_containers {
            spec["initContainers"] = init.iter().map(|c| c.render(true)).collect();
        }
        if let Some(host) = self.host_network {
            spec["hostNetwork"] = json!(host);
        }
        spec
    }
}

fn annotations(entries: &[(Key, Text)]) -> Option<Value> {
    (!entries.is_empty()).then(|| {
        Value::Object(
            entries
                .iter()
                .map(|(k, v)| (k.render(), Value::String(v.render())))
                .collect::<Map<_, _>>(),
        )
    })
}

#[derive(Arbitrary, Debug)]
enum OwnerKind {
    ReplicaSet,
    StatefulSet,
    DaemonSet,
    Job,
    Other(String),
}

#[derive(Arbitrary, Debug)]
struct Metadata {
    name: Option<Name>,
    generate_name: Option<String>,
    owner: Option<(OwnerKind, String, Option<bool>)>,
    annotations: Vec<(Key, Text)>,
}

impl Metadata {
    fn render(&self) -> Value {
        let mut meta = json!({"namespace": "dev", "labels": {"app": "api"}});
        if let Some(name) = &self.name {
            meta["name"] = json!(name.render());
        }
        if let Some(prefix) = &self.generate_name {
            meta["generateName"] = json!(prefix);
        }
        if let Some((kind, name, controller)) = &self.owner {
            let kind = match kind {
                OwnerKind::ReplicaSet => "ReplicaSet".to_owned(),
                OwnerKind::StatefulSet => "StatefulSet".to_owned(),
                OwnerKind::DaemonSet => "DaemonSet".to_owned(),
                OwnerKind::Job => "Job".to_owned(),
                OwnerKind::Other(other) => other.clone(),
            };
            let mut owner =
                json!({"apiVersion": "apps/v1", "kind": kind, "name": name, "uid": "u"});
            if let Some(controller) = controller {
                owner["controller"] = json!(controller);
            }
            meta["ownerReferences"] = json!([owner]);
        }
        if let Some(annotations) = annotations(&self.annotations) {
            meta["annotations"] = annotations;
        }
        meta
    }
}

#[derive(Arbitrary, Debug)]
enum WorkloadKind {
    Deployment,
    StatefulSet,
    DaemonSet,
}

#[derive(Arbitrary, Debug)]
enum Object {
    Pod {
        metadata: Metadata,
        spec: Spec,
    },
    Workload {
        kind: WorkloadKind,
        update: bool,
        metadata: Metadata,
        template_annotations: Option<Vec<(Key, Text)>>,
        spec: Spec,
    },
}

/// A change made to an admitted object before it is admitted again: a pod's own
/// metadata and spec, a workload's metadata (a user annotating) or its pod template.
#[derive(Arbitrary, Debug)]
enum Change {
    SetAnnotation(Key, Text),
    RemoveAnnotation(Key),
    SetTemplateAnnotation(Key, Text),
    RemoveContainer(u8),
    RemoveInitContainer(u8),
    AddContainer(Container),
    AddEnv(u8),
    AddPort(u8, Port),
    SetImage(u8, String),
}

#[derive(Arbitrary, Debug)]
struct Case {
    object: Object,
    native_sidecar: bool,
    listen_port_base: u16,
    default_port_mode: u8,
    changes: Vec<Vec<Change>>,
}

fn review(kind: &str, group: &str, operation: &str, object: Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "fuzz-uid",
            "kind": {"group": group, "version": "v1", "kind": kind},
            "resource": {"group": group, "version": "v1", "resource": "r"},
            "namespace": "dev",
            "operation": operation,
            "userInfo": {"username": "fuzz"},
            "object": object,
            "dryRun": false,
        }
    })
}

/// The object of a review, and where its pod spec and pod metadata are.
fn pod_parts(object: &mut Value) -> (Option<&mut Value>, Option<&mut Value>) {
    let is_pod = object["kind"] == "Pod";
    let root = if is_pod {
        Some(object)
    } else {
        object.pointer_mut("/spec/template")
    };
    match root.and_then(Value::as_object_mut) {
        Some(root) => {
            let mut spec = None;
            let mut meta = None;
            for (key, value) in root.iter_mut() {
                match key.as_str() {
                    "spec" => spec = Some(value),
                    "metadata" => meta = Some(value),
                    _ => {}
                }
            }
            (meta, spec)
        }
        None => (None, None),
    }
}

fn list<'v>(spec: Option<&'v mut Value>, key: &str) -> Option<&'v mut Vec<Value>> {
    spec?.get_mut(key)?.as_array_mut()
}

fn set_annotation(meta: Option<&mut Value>, key: String, value: Option<String>) {
    let Some(meta) = meta.and_then(Value::as_object_mut) else {
        return;
    };
    let annotations = meta.entry("annotations").or_insert_with(|| json!({}));
    if let Some(annotations) = annotations.as_object_mut() {
        match value {
            Some(value) => {
                annotations.insert(key, Value::String(value));
            }
            None => {
                annotations.remove(&key);
            }
        }
    }
}

fn apply(review: &mut Value, change: &Change) {
    let object = &mut review["request"]["object"];
    let pick = |len: usize, i: u8| (len > 0).then(|| i as usize % len);
    match change {
        Change::SetAnnotation(key, value) => set_annotation(
            object.get_mut("metadata"),
            key.render(),
            Some(value.render()),
        ),
        Change::RemoveAnnotation(key) => {
            set_annotation(object.get_mut("metadata"), key.render(), None)
        }
        Change::SetTemplateAnnotation(key, value) => {
            set_annotation(pod_parts(object).0, key.render(), Some(value.render()))
        }
        Change::RemoveContainer(i) => {
            if let Some(containers) = list(pod_parts(object).1, "containers")
                && let Some(i) = pick(containers.len(), *i)
            {
                containers.remove(i);
            }
        }
        Change::RemoveInitContainer(i) => {
            if let Some(containers) = list(pod_parts(object).1, "initContainers")
                && let Some(i) = pick(containers.len(), *i)
            {
                containers.remove(i);
            }
        }
        Change::AddContainer(container) => {
            if let Some(containers) = list(pod_parts(object).1, "containers") {
                containers.push(container.render(false));
            }
        }
        Change::AddEnv(i) | Change::SetImage(i, _) | Change::AddPort(i, _) => {
            let (_, spec) = pod_parts(object);
            let Some(spec) = spec else { return };
            let mut all: Vec<&mut Value> = Vec::new();
            let Some(spec) = spec.as_object_mut() else {
                return;
            };
            for (key, value) in spec.iter_mut() {
                if key == "containers" || key == "initContainers" {
                    all.extend(value.as_array_mut().into_iter().flatten());
                }
            }
            let Some(index) = pick(all.len(), *i) else {
                return;
            };
            let container = &mut *all[index];
            match change {
                Change::AddEnv(_) => {
                    let env = container
                        .as_object_mut()
                        .map(|c| c.entry("env").or_insert_with(|| json!([])));
                    if let Some(env) = env.and_then(Value::as_array_mut) {
                        env.push(json!({"name": "ADDED_LATER", "value": "x"}));
                    }
                }
                Change::SetImage(_, image) => container["image"] = json!(image),
                Change::AddPort(_, port) => {
                    let ports = container
                        .as_object_mut()
                        .map(|c| c.entry("ports").or_insert_with(|| json!([])));
                    if let Some(ports) = ports.and_then(Value::as_array_mut) {
                        ports.push(port.render());
                    }
                }
                _ => unreachable!(),
            }
        }
    }
}

fuzz_target!(|case: Case| {
    let config = inject_config(
        case.native_sidecar,
        case.listen_port_base,
        case.default_port_mode as usize,
    );
    let review = match &case.object {
        Object::Pod { metadata, spec } => review(
            "Pod",
            "",
            "CREATE",
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata.render(), "spec": spec.render()}),
        ),
        Object::Workload {
            kind,
            update,
            metadata,
            template_annotations,
            spec,
        } => {
            let kind = match kind {
                WorkloadKind::Deployment => "Deployment",
                WorkloadKind::StatefulSet => "StatefulSet",
                WorkloadKind::DaemonSet => "DaemonSet",
            };
            let mut template_meta = json!({"labels": {"app": "api"}});
            if let Some(entries) = template_annotations {
                template_meta["annotations"] = annotations(entries).unwrap_or_else(|| json!({}));
            }
            let object = json!({
                "apiVersion": "apps/v1",
                "kind": kind,
                "metadata": metadata.render(),
                "spec": {
                    "selector": {"matchLabels": {"app": "api"}},
                    "template": {"metadata": template_meta, "spec": spec.render()},
                },
            });
            let operation = if *update { "UPDATE" } else { "CREATE" };
            let mut review = review(kind, "apps", operation, object.clone());
            if *update {
                review["request"]["oldObject"] = object;
            }
            review
        }
    };
    let mut current = review;
    let body = serde_json::to_vec(&current).expect("JSON");
    if let Some(patched) = check_review(&body, &config) {
        current = patched;
    }
    // Changed after admission (by others), then admitted again: the reinvocation path, or
    // a user's later `kubectl annotate` on a workload kips already admitted.
    for changes in case.changes.iter().take(4) {
        for change in changes.iter().take(8) {
            apply(&mut current, change);
        }
        if current["request"]["operation"] == "UPDATE" {
            // The workload as stored before this change: what kips admitted last.
            let old = current["request"]["object"].clone();
            current["request"]["oldObject"] = old;
        }
        let body = serde_json::to_vec(&current).expect("JSON");
        if let Some(patched) = check_review(&body, &config) {
            current = patched;
        }
    }
});
