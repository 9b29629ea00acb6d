//! The property both sides live by: whatever a workload's annotations and ports, every `-L`
//! binding of the sidecar (rendered by the webhook's own path, `kips inject`) meets exactly
//! one `-T` binding of the laptop (rendered by `kips connect`'s plan) on the same relay and
//! name, every reverse `-T` of the sidecar exactly one laptop `-L`, and no expression holds
//! a name twice (azbridge exits on that). Both command lines are parsed back with the
//! bridge's own grammar, for both engines, from the workload as written and as injected.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use serde_json::{Value, json};

use super::BridgeEngine;
use super::grammar::{LocalForward, RemoteForward};
use crate::annotations::{InjectionStatus, STATUS};
use crate::dev::laptop;
use crate::inject::InjectConfig;
use crate::manifest::inject_manifests;
use crate::workload::Workload;

/// One container port of the generated pod template.
#[derive(Debug, Clone)]
struct GenPort {
    name: Option<String>,
    number: u16,
    udp: bool,
}

/// One redirect entry: which declared port, named by number or by name, on which relay.
#[derive(Debug, Clone)]
struct GenRedirect {
    port: usize,
    by_name: bool,
    relay: Option<&'static str>,
}

/// Declared ports with distinct numbers and names drawn from small pools, so that names
/// collide with numbers' and UDP ports' names as often as they can (`port8080` beside 8080,
/// `dns-udp` beside UDP `dns`).
fn ports() -> impl Strategy<Value = Vec<GenPort>> {
    const NUMBERS: [u16; 6] = [53, 80, 5353, 8080, 9090, 15100];
    const NAMES: [&str; 8] = [
        "http", "dns", "grpc", "port8080", "port53", "dns-udp", "http-udp", "udp",
    ];
    (
        proptest::sample::subsequence(NUMBERS.to_vec(), 1..=6).prop_shuffle(),
        proptest::sample::subsequence(NAMES.to_vec(), 0..=6).prop_shuffle(),
        proptest::collection::vec(any::<(bool, bool)>(), 6),
    )
        .prop_map(|(numbers, names, flags)| {
            numbers
                .into_iter()
                .zip(flags)
                .enumerate()
                .map(|(i, (number, (udp, named)))| GenPort {
                    name: names.get(i).filter(|_| named).map(|n| (*n).to_owned()),
                    number,
                    udp,
                })
                .collect()
        })
}

/// Redirects of distinct declared ports (a port twice is refused), by number or name.
fn redirects() -> impl Strategy<Value = Vec<GenRedirect>> {
    (
        proptest::sample::subsequence((0usize..6).collect::<Vec<_>>(), 0..=6).prop_shuffle(),
        proptest::collection::vec(
            (
                any::<bool>(),
                prop_oneof![Just(None), Just(Some("alpha")), Just(Some("beta"))],
            ),
            6,
        ),
    )
        .prop_map(|(indices, choices)| {
            indices
                .into_iter()
                .zip(choices)
                .map(|(port, (by_name, relay))| GenRedirect {
                    port,
                    by_name,
                    relay,
                })
                .collect()
        })
}

fn reverses() -> impl Strategy<Value = Vec<(&'static str, String, u16)>> {
    proptest::collection::vec(
        (
            prop_oneof![Just("db"), Just("cache"), Just("search")],
            "[a-z]{1,8}\\.[a-z]{2,5}\\.svc",
            1u16..65535,
        ),
        0..3,
    )
}

/// A Deployment `api` with the generated ports and annotations; `None` when the generated
/// annotations say nothing (no redirect and no reverse entry).
fn deployment(
    ports: &[GenPort],
    redirects: &[GenRedirect],
    reverses: &[(&str, String, u16)],
) -> Option<Value> {
    // Kubernetes wants port names unique within a container.
    let container_ports: Vec<Value> = ports
        .iter()
        .map(|p| {
            let mut port = json!({
                "containerPort": p.number,
                "protocol": if p.udp { "UDP" } else { "TCP" },
            });
            if let Some(name) = &p.name {
                port["name"] = json!(name);
            }
            port
        })
        .collect();
    let entries: Vec<String> = redirects
        .iter()
        .filter_map(|r| {
            let port = container_ports.get(r.port)?;
            let text = match (r.by_name, port["name"].as_str()) {
                (true, Some(name)) => name.to_owned(),
                _ => port["containerPort"].to_string(),
            };
            let udp = if port["protocol"] == "UDP" {
                "/udp"
            } else {
                ""
            };
            let relay = r.relay.map(|r| format!("{r}:")).unwrap_or_default();
            Some(format!("{relay}{text}{udp}"))
        })
        .collect();
    let mut annotations = serde_json::Map::new();
    if !entries.is_empty() {
        annotations.insert("kips.io/redirect".into(), json!(entries.join(",")));
    }
    let mut relays = BTreeSet::new();
    let reverse: Vec<String> = reverses
        .iter()
        .filter(|(relay, ..)| relays.insert(*relay))
        .map(|(relay, host, port)| format!("{relay}={host}:{port}"))
        .collect();
    if !reverse.is_empty() {
        annotations.insert("kips.io/reverse".into(), json!(reverse.join(",")));
    }
    if annotations.is_empty() {
        return None;
    }
    Some(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "api", "namespace": "shop", "annotations": annotations},
        "spec": {
            "selector": {"matchLabels": {"app": "api"}},
            "template": {
                "metadata": {"labels": {"app": "api"}},
                "spec": {"containers": [{"name": "app", "image": "app:1", "ports": container_ports}]}
            }
        }
    }))
}

/// The `-L` and `-T` expressions of a command line, parsed with the bridge's grammar.
fn forwards(args: &[String]) -> (Vec<LocalForward>, Vec<RemoteForward>) {
    let mut locals = Vec::new();
    let mut remotes = Vec::new();
    for pair in args.windows(2) {
        match pair[0].as_str() {
            "-L" => locals.push(pair[1].parse().expect("the sidecar's -L parses")),
            "-T" => remotes.push(pair[1].parse().expect("the sidecar's -T parses")),
            _ => {}
        }
    }
    (locals, remotes)
}

type Bindings = BTreeMap<(String, String), usize>;

/// Each `(relay, name)` of the `-L`s and how often it occurs, asserting no expression holds a
/// name twice.
fn local_names(locals: &[LocalForward]) -> Result<Bindings, TestCaseError> {
    let mut all = Bindings::new();
    for forward in locals {
        let mut here = BTreeSet::new();
        for binding in &forward.bindings {
            let name = binding.effective_name();
            prop_assert!(here.insert(name.clone()), "-L {forward} holds {name} twice");
            *all.entry((forward.relay.to_string(), name)).or_default() += 1;
        }
    }
    Ok(all)
}

fn remote_names(remotes: &[RemoteForward]) -> Result<Bindings, TestCaseError> {
    let mut all = Bindings::new();
    for forward in remotes {
        let mut here = BTreeSet::new();
        for binding in &forward.bindings {
            let name = binding.effective_name();
            prop_assert!(here.insert(name.clone()), "-T {forward} holds {name} twice");
            *all.entry((forward.relay.to_string(), name)).or_default() += 1;
        }
    }
    Ok(all)
}

/// The sidecar's arguments in a rendered manifest.
fn sidecar_args(rendered: &Value) -> Vec<String> {
    let spec = &rendered["spec"]["template"]["spec"];
    spec["initContainers"]
        .as_array()
        .into_iter()
        .chain(spec["containers"].as_array())
        .flatten()
        .find(|c| c["name"] == "kips-bridge")
        .and_then(|c| c["args"].as_array())
        .map(|args| {
            args.iter()
                .filter_map(|a| a.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn laptop_args(object: &Workload) -> Result<Vec<String>, TestCaseError> {
    let kips = object
        .kips()
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let status = object
        .template_annotations()
        .get(STATUS)
        .and_then(|s| InjectionStatus::from_json(s));
    let plan = laptop::plan(
        object.name(),
        &kips,
        object.pod_spec(),
        status.as_ref(),
        &[],
        &BTreeSet::new(),
    )
    .map_err(|e| {
        TestCaseError::fail(format!(
            "the laptop cannot plan what the webhook admitted: {e}"
        ))
    })?;
    Ok(plan.args())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_sidecar_binding_meets_exactly_one_laptop_binding(
        ports in ports(),
        redirects in redirects(),
        reverses in reverses(),
        kips_engine in any::<bool>(),
    ) {
        let Some(object) = deployment(&ports, &redirects, &reverses) else {
            return Ok(());
        };
        let engine = if kips_engine { BridgeEngine::Kips } else { BridgeEngine::Azbridge };
        let config = InjectConfig { bridge_engine: engine, ..InjectConfig::default() };
        // What the webhook refuses (a port twice, a relay both ways) never reaches a bridge.
        let Ok(rendered) = inject_manifests(&object.to_string(), &config) else {
            return Ok(());
        };
        let rendered: Value = serde_yaml::from_str(&rendered.text).expect("kips inject writes YAML");
        let args = sidecar_args(&rendered);
        prop_assert!(!args.is_empty(), "no sidecar in {rendered}");
        let (sidecar_l, sidecar_t) = forwards(&args);
        let sidecar_l = local_names(&sidecar_l)?;
        let sidecar_t = remote_names(&sidecar_t)?;

        // The laptop plans from the workload as written, and from the manifest kips inject
        // wrote (its template carries renamed ports and kips.io/status).
        for source in [object.clone(), rendered.clone()] {
            let workload = Workload::from_value(source).expect("a Deployment");
            let (laptop_l, laptop_t) = forwards(&laptop_args(&workload)?);
            let laptop_t = remote_names(&laptop_t)?;
            let laptop_l = local_names(&laptop_l)?;
            for (key, count) in &sidecar_l {
                prop_assert_eq!(*count, 1, "the sidecar's -L holds {:?} twice", key);
                prop_assert_eq!(laptop_t.get(key), Some(&1), "sidecar -L {:?} meets no laptop -T; sidecar {:?}, laptop {:?}", key, args, laptop_t);
            }
            prop_assert_eq!(laptop_t.len(), sidecar_l.len(), "the laptop serves names the sidecar never sends");
            for (key, count) in &sidecar_t {
                prop_assert_eq!(*count, 1);
                prop_assert_eq!(laptop_l.get(key), Some(&1), "sidecar -T {:?} meets no laptop -L", key);
            }
            prop_assert_eq!(laptop_l.len(), sidecar_t.len());
        }
    }
}
