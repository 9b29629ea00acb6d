//! `kips status`: the redirected workloads of a namespace (or all), as a table or JSON, and
//! for one named workload whether the laptop's listener is connected, as each injected pod's
//! sidecar last saw it. [`row`], [`render_table`], [`parse_metrics`], [`listeners`] and
//! [`render_listeners`] are pure.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::Pod;
use serde::Serialize;

use super::rollout::{self, Verdict, snapshot};
use crate::annotations::{InjectionStatus, STATUS};
use crate::workload::Workload;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Row {
    pub namespace: String,
    pub kind: String,
    pub name: String,
    pub redirects: Vec<String>,
    pub reverse: Vec<String>,
    /// What the annotation asks for (`None`: the webhook's default).
    pub port_mode_requested: Option<String>,
    /// What the injected pods got (`iptables` or `named`), when any pod is injected.
    pub port_mode: Option<String>,
    pub relay_secret: Option<String>,
    pub pods: PodCounts,
    pub rollout: Rollout,
    /// Per injected pod and redirect relay, whether the laptop's listener is connected (read
    /// for a named workload only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub listeners: Vec<Listener>,
}

/// One pod's sidecar on one redirect relay: did its last connect find the laptop listening?
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Listener {
    pub pod: String,
    /// `-` when the sidecar's metrics could not be read.
    pub relay: String,
    /// `connected`, `none` or `unknown`.
    pub listener: &'static str,
    /// Unix time of the sidecar's last connect that told (none before the first one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_connect: Option<i64>,
    /// Why the state is unknown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// What one `-L` binding's metrics say (`kips_bridge_listener_present`,
/// `kips_bridge_listener_checked_timestamp_seconds`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BindingListener {
    pub relay: String,
    pub binding: String,
    pub present: Option<bool>,
    /// Unix seconds; 0 before the first connect that told.
    pub checked: Option<i64>,
}

/// The `-L` bindings' listener series from a sidecar's `/metrics` (Prometheus or OpenMetrics
/// text); other series and the `-T` side are ignored.
pub fn parse_metrics(text: &str) -> Vec<BindingListener> {
    let mut out: Vec<BindingListener> = Vec::new();
    for line in text.lines() {
        let (is_present, rest) =
            if let Some(rest) = line.strip_prefix("kips_bridge_listener_present{") {
                (true, rest)
            } else if let Some(rest) =
                line.strip_prefix("kips_bridge_listener_checked_timestamp_seconds{")
            {
                (false, rest)
            } else {
                continue;
            };
        let Some((labels, value)) = parse_labels(rest) else {
            continue;
        };
        let label = |k: &str| labels.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        if label("side").as_deref() != Some("local") {
            continue;
        }
        let (Some(relay), Some(binding)) = (label("relay"), label("binding")) else {
            continue;
        };
        let Some(value) = value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        else {
            continue;
        };
        let index = match out
            .iter()
            .position(|b| b.relay == relay && b.binding == binding)
        {
            Some(i) => i,
            None => {
                out.push(BindingListener {
                    relay,
                    binding,
                    ..Default::default()
                });
                out.len() - 1
            }
        };
        if is_present {
            out[index].present = Some(value >= 1.0);
        } else {
            out[index].checked = Some(value as i64);
        }
    }
    out
}

/// `k="v",k2="v2"} rest` → the labels and `rest`.
fn parse_labels(text: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    let mut chars = text.char_indices().peekable();
    loop {
        let start = chars.peek()?.0;
        if text[start..].starts_with('}') {
            return Some((labels, &text[start + 1..]));
        }
        let eq = text[start..].find("=\"")? + start;
        let name = text[start..eq].trim_start_matches(',').to_owned();
        while chars.peek()?.0 <= eq + 1 {
            chars.next();
        }
        let mut value = String::new();
        loop {
            let (_, c) = chars.next()?;
            match c {
                '"' => break,
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                other => value.push(other),
            }
        }
        labels.push((name, value));
        if chars.peek().is_some_and(|(_, c)| *c == ',') {
            chars.next();
        }
    }
}

/// One pod's [`Listener`]s from its sidecar's metrics: per relay, the binding whose connect
/// told last (a relay with several ports has one `-L` binding each).
pub fn listeners(pod: &str, metrics: Result<&str, String>) -> Vec<Listener> {
    let unknown = |relay: &str, detail: String| Listener {
        pod: pod.to_owned(),
        relay: relay.to_owned(),
        listener: "unknown",
        last_connect: None,
        detail: Some(detail),
    };
    let text = match metrics {
        Ok(text) => text,
        Err(why) => return vec![unknown("-", why)],
    };
    let bindings = parse_metrics(text);
    let mut relays: Vec<&str> = bindings.iter().map(|b| b.relay.as_str()).collect();
    relays.sort_unstable();
    relays.dedup();
    if relays.is_empty() {
        return vec![unknown(
            "-",
            "the sidecar reports no redirect bindings".to_owned(),
        )];
    }
    relays
        .into_iter()
        .map(|relay| {
            let newest = bindings
                .iter()
                .filter(|b| b.relay == relay)
                .max_by_key(|b| b.checked.unwrap_or(0))
                .expect("a relay comes from a binding");
            match (newest.checked, newest.present) {
                (Some(t), Some(present)) if t > 0 => Listener {
                    pod: pod.to_owned(),
                    relay: relay.to_owned(),
                    listener: if present { "connected" } else { "none" },
                    last_connect: Some(t),
                    detail: None,
                },
                (None, Some(true)) => Listener {
                    pod: pod.to_owned(),
                    relay: relay.to_owned(),
                    listener: "connected",
                    last_connect: None,
                    detail: None,
                },
                _ => unknown(
                    relay,
                    "no connection through this pod since its sidecar started".to_owned(),
                ),
            }
        })
        .collect()
}

/// `3s`, `4m`, `2h`, `5d`.
fn age(seconds: i64) -> String {
    let s = seconds.max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

/// The LISTENER cell: `connected (last connect 3s ago)`, `none (last connect 2s ago: no
/// listener)`, `unknown (why)`.
pub fn listener_cell(listener: &Listener, now: i64) -> String {
    let ago = listener
        .last_connect
        .map(|t| format!("last connect {} ago", age(now - t)));
    match (listener.listener, ago) {
        ("connected", Some(ago)) => format!("connected ({ago})"),
        ("none", Some(ago)) => format!("none ({ago}: no listener)"),
        (state, _) => match &listener.detail {
            Some(detail) => format!("{state} ({detail})"),
            None => state.to_owned(),
        },
    }
}

/// The listeners of a workload's pods as a table (`now`: Unix seconds).
pub fn render_listeners(listeners: &[Listener], now: i64) -> String {
    let mut cells: Vec<[String; 3]> = vec![["POD".into(), "RELAY".into(), "LISTENER".into()]];
    for l in listeners {
        cells.push([l.pod.clone(), l.relay.clone(), listener_cell(l, now)]);
    }
    align(&cells)
}

fn align<const N: usize>(cells: &[[String; N]]) -> String {
    let widths: Vec<usize> = (0..N)
        .map(|i| {
            cells
                .iter()
                .map(|r| r[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in cells {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            line.push_str(cell);
            if i + 1 < N {
                line.push_str(&" ".repeat(widths[i] - cell.chars().count() + 3));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PodCounts {
    pub injected: usize,
    pub ready: usize,
    pub desired: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rollout {
    /// `complete`, `progressing` or `failed`.
    pub state: &'static str,
    pub message: String,
}

/// The row of one workload, or `None` when it has nothing of kips: no kips annotations and
/// no injected pods (a revert that finished).
pub fn row(object: &Workload, replica_sets: &[ReplicaSet], pods: &[Pod]) -> Option<Row> {
    let kips = object.kips();
    let wants = kips.as_ref().is_ok_and(|k| k.wants_injection());
    let snap = snapshot(object, replica_sets, pods, None, None);
    let uid = object.metadata().uid.clone().unwrap_or_default();
    let owned: Vec<&Pod> = pods
        .iter()
        .filter(|p| owned_directly_or_through_rs(p, &uid, replica_sets))
        .collect();
    let any_injected = owned.iter().any(|p| injected(p));
    if !wants && !any_injected && kips.as_ref().is_ok_and(|k| k == &Default::default()) {
        return None;
    }
    let (redirects, reverse, mode, secret) = match &kips {
        Ok(k) => (
            k.redirects.iter().map(ToString::to_string).collect(),
            k.reverses.iter().map(ToString::to_string).collect(),
            k.port_mode.map(|m| m.to_string()),
            k.relay_secret.clone(),
        ),
        Err(_) => (Vec::new(), Vec::new(), None, None),
    };
    let port_mode = owned
        .iter()
        .filter_map(|p| p.metadata.annotations.as_ref()?.get(STATUS))
        .filter_map(|s| InjectionStatus::from_json(s))
        .find_map(|s| s.port_mode);
    let rollout = match (&kips, rollout::assess(&snap, wants)) {
        (Err(problem), _) => Rollout {
            state: "failed",
            message: problem.to_string(),
        },
        (_, Verdict::Done(m)) => Rollout {
            state: "complete",
            message: m,
        },
        (_, Verdict::Waiting(m)) => Rollout {
            state: "progressing",
            message: m,
        },
        (_, Verdict::Failed(m)) => Rollout {
            state: "failed",
            message: m,
        },
    };
    let injected_count = owned.iter().filter(|p| injected(p)).count();
    Some(Row {
        namespace: object.namespace().unwrap_or_default().to_owned(),
        kind: object.kind().lower().to_owned(),
        name: object.name().to_owned(),
        redirects,
        reverse,
        port_mode_requested: mode,
        port_mode,
        relay_secret: secret,
        pods: PodCounts {
            injected: injected_count,
            ready: owned
                .iter()
                .filter(|p| injected(p) && rollout::pod_state(p).ready)
                .count(),
            desired: snap.desired,
        },
        rollout,
        listeners: Vec::new(),
    })
}

fn injected(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(STATUS))
}

fn owned_directly_or_through_rs(pod: &Pod, uid: &str, replica_sets: &[ReplicaSet]) -> bool {
    let Some(owner) = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
    else {
        return false;
    };
    owner.uid == uid
        || replica_sets.iter().any(|rs| {
            rs.metadata.uid.as_ref() == Some(&owner.uid)
                && rs
                    .metadata
                    .owner_references
                    .iter()
                    .flatten()
                    .any(|o| o.controller == Some(true) && o.uid == uid)
        })
}

fn dash(items: &[String]) -> String {
    if items.is_empty() {
        "-".to_owned()
    } else {
        items.join(",")
    }
}

fn mode_cell(row: &Row) -> String {
    match (&row.port_mode_requested, &row.port_mode) {
        (Some(requested), Some(actual)) if requested != actual => format!("{requested}→{actual}"),
        (_, Some(actual)) => actual.clone(),
        (Some(requested), None) => requested.clone(),
        (None, None) => "-".to_owned(),
    }
}

/// The table, columns aligned like kubectl's.
pub fn render_table(rows: &[Row]) -> String {
    let header = [
        "NAMESPACE",
        "WORKLOAD",
        "REDIRECTS",
        "REVERSE",
        "MODE",
        "INJECTED",
        "READY",
        "ROLLOUT",
    ];
    let mut cells: Vec<Vec<String>> = vec![header.iter().map(|h| (*h).to_owned()).collect()];
    for row in rows {
        cells.push(vec![
            row.namespace.clone(),
            format!("{}/{}", row.kind, row.name),
            dash(&row.redirects),
            dash(&row.reverse),
            mode_cell(row),
            format!("{}/{}", row.pods.injected, row.pods.desired),
            format!("{}/{}", row.pods.ready, row.pods.desired),
            row.rollout.state.to_owned(),
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            cells
                .iter()
                .map(|r| r[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in &cells {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(cell);
                line.push_str(&" ".repeat(widths[i] - cell.chars().count() + 3));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    // Failures get their reason below the table.
    for row in rows.iter().filter(|r| r.rollout.state == "failed") {
        out.push_str(&format!(
            "{}/{}/{}: {}\n",
            row.namespace, row.kind, row.name, row.rollout.message
        ));
    }
    out
}

/// Groups what was listed by namespace, for [`row`].
pub fn rows(objects: &[Workload], replica_sets: &[ReplicaSet], pods: &[Pod]) -> Vec<Row> {
    let by_ns = |ns: Option<&str>| ns.unwrap_or_default().to_owned();
    let mut sets: BTreeMap<String, Vec<ReplicaSet>> = BTreeMap::new();
    for rs in replica_sets {
        sets.entry(by_ns(rs.metadata.namespace.as_deref()))
            .or_default()
            .push(rs.clone());
    }
    let mut pods_by_ns: BTreeMap<String, Vec<Pod>> = BTreeMap::new();
    for pod in pods {
        pods_by_ns
            .entry(by_ns(pod.metadata.namespace.as_deref()))
            .or_default()
            .push(pod.clone());
    }
    let mut out: Vec<Row> = objects
        .iter()
        .filter_map(|o| {
            let ns = by_ns(o.namespace());
            row(
                o,
                sets.get(&ns).map_or(&[][..], Vec::as_slice),
                pods_by_ns.get(&ns).map_or(&[][..], Vec::as_slice),
            )
        })
        .collect();
    out.sort_by(|a, b| (&a.namespace, &a.kind, &a.name).cmp(&(&b.namespace, &b.kind, &b.name)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn deployment(annotations: serde_json::Value, template: serde_json::Value) -> Workload {
        Workload::from_value(json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "api", "namespace": "dev", "uid": "d-1", "generation": 2,
                         "annotations": annotations},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "api"}},
                     "template": {"metadata": {"annotations": template}, "spec": {"containers": []}}},
            "status": {"observedGeneration": 2}
        }))
        .unwrap()
    }

    fn rs(revision: &str) -> ReplicaSet {
        serde_json::from_value(json!({
            "metadata": {"name": "api-1", "namespace": "dev", "uid": "rs-1",
                         "annotations": {"deployment.kubernetes.io/revision": revision},
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "api", "uid": "d-1", "controller": true}]}
        }))
        .unwrap()
    }

    fn pod(name: &str, mode: Option<&str>) -> Pod {
        let mut annotations = json!({});
        if let Some(mode) = mode {
            annotations[STATUS] = json!(format!(
                "{{\"version\":\"0\",\"portMode\":\"{mode}\",\"sidecar\":\"native\"}}"
            ));
        }
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "dev", "annotations": annotations,
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "api-1", "uid": "rs-1", "controller": true}]},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .unwrap()
    }

    #[test]
    fn redirected_workloads_get_a_row_and_plain_ones_none() {
        let mut d = deployment(
            json!({"kips.io/redirect": "api:8080", "kips.io/port-mode": "auto", "deployment.kubernetes.io/revision": "1"}),
            json!({"kips.io/redirect": "api:8080", "kips.io/port-mode": "auto", "kips.io/copied": "port-mode,redirect"}),
        );
        let pods = [pod("a", Some("iptables")), pod("b", Some("iptables"))];
        let rows = rows(std::slice::from_ref(&d), &[rs("1")], &pods);
        assert_eq!(rows.len(), 1);
        let row = &rows[0];
        assert_eq!(row.redirects, ["api:8080"]);
        assert_eq!(
            row.pods,
            PodCounts {
                injected: 2,
                ready: 2,
                desired: 2
            }
        );
        assert_eq!(row.rollout.state, "complete");
        let table = render_table(&rows);
        assert_eq!(
            table,
            "NAMESPACE   WORKLOAD         REDIRECTS   REVERSE   MODE            INJECTED   READY   ROLLOUT\n\
             dev         deployment/api   api:8080    -         auto→iptables   2/2        2/2     complete\n"
        );
        let json = serde_json::to_value(row).unwrap();
        assert_eq!(json["pods"]["injected"], 2);
        assert_eq!(json["rollout"]["state"], "complete");
        assert_eq!(json["portModeRequested"], "auto");

        // Reverted, rollout finished: no row.
        if let Workload::Deployment(dep) = &mut d {
            dep.metadata.annotations = Some(
                [(
                    "deployment.kubernetes.io/revision".to_owned(),
                    "1".to_owned(),
                )]
                .into(),
            );
            dep.spec.as_mut().unwrap().template.metadata = None;
        }
        let plain = [pod("a", None), pod("b", None)];
        assert!(super::rows(std::slice::from_ref(&d), &[rs("1")], &plain).is_empty());
        // Reverted, injected pods still there: a row that says so.
        let rows = super::rows(std::slice::from_ref(&d), &[rs("1")], &pods);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].rollout.state, "progressing");
        assert!(rows[0].redirects.is_empty());
    }

    const METRICS: &str = r#"# HELP kips_bridge_listener_present 1 if ...
# TYPE kips_bridge_listener_present gauge
kips_bridge_listener_present{relay="api",binding="8080",side="local"} 0
kips_bridge_listener_present{relay="api",binding="9090",side="local"} 1
kips_bridge_listener_present{relay="db",binding="5432",side="remote"} 1
kips_bridge_listener_present{relay="odd \"name\"",binding="1",side="local"} 1
# TYPE kips_bridge_listener_checked_timestamp_seconds gauge
kips_bridge_listener_checked_timestamp_seconds{relay="api",binding="8080",side="local"} 1800000100
kips_bridge_listener_checked_timestamp_seconds{relay="api",binding="9090",side="local"} 1800000000
kips_bridge_listener_checked_timestamp_seconds{relay="odd \"name\"",binding="1",side="local"} 0
kips_bridge_connections_total{relay="api",binding="8080",side="local"} 3
# EOF
"#;

    #[test]
    fn the_listener_series_of_local_bindings_are_read_from_metrics() {
        let bindings = parse_metrics(METRICS);
        assert_eq!(
            bindings,
            [
                BindingListener {
                    relay: "api".into(),
                    binding: "8080".into(),
                    present: Some(false),
                    checked: Some(1_800_000_100)
                },
                BindingListener {
                    relay: "api".into(),
                    binding: "9090".into(),
                    present: Some(true),
                    checked: Some(1_800_000_000)
                },
                BindingListener {
                    relay: "odd \"name\"".into(),
                    binding: "1".into(),
                    present: Some(true),
                    checked: Some(0)
                },
            ]
        );
        assert!(parse_metrics("kips_bridge_listener_present{relay=\"x\n").is_empty());
        assert!(
            parse_metrics("kips_bridge_listener_present{relay=\"x\",side=\"local\"} 1").is_empty()
        );
    }

    #[test]
    fn each_relay_shows_what_its_newest_connect_found() {
        let found = listeners("api-1", Ok(METRICS));
        assert_eq!(found.len(), 2);
        // 8080's connect (no listener) is newer than 9090's (a listener).
        assert_eq!(found[0].relay, "api");
        assert_eq!(found[0].listener, "none");
        assert_eq!(found[0].last_connect, Some(1_800_000_100));
        // No connect yet: unknown, not "none".
        assert_eq!(found[1].listener, "unknown");
        let unreadable = listeners("api-2", Err("the API server said 503".into()));
        let mut all = found.clone();
        all.extend(unreadable);
        let connected = Listener {
            pod: "api-3".into(),
            relay: "api".into(),
            listener: "connected",
            last_connect: Some(1_800_000_000),
            detail: None,
        };
        all.push(connected);
        assert_eq!(
            render_listeners(&all, 1_800_000_102),
            "POD     RELAY        LISTENER\n\
             api-1   api          none (last connect 2s ago: no listener)\n\
             api-1   odd \"name\"   unknown (no connection through this pod since its sidecar started)\n\
             api-2   -            unknown (the API server said 503)\n\
             api-3   api          connected (last connect 1m ago)\n"
        );
        let json = serde_json::to_value(&all[0]).unwrap();
        assert_eq!(json["listener"], "none");
        assert_eq!(json["lastConnect"], 1_800_000_100);
    }

    #[test]
    fn invalid_annotations_show_as_failed() {
        let d = deployment(json!({"kips.io/redirect": "api:80x0"}), json!({}));
        let rows = rows(&[d], &[], &[]);
        assert_eq!(rows[0].rollout.state, "failed");
        assert!(render_table(&rows).contains("port \"80x0\""));
    }
}
