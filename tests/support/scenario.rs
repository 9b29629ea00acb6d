//! What the node suites share: the workloads they run (the test app behind a Service, a
//! client pod), the `kubectl` steps a user would type, and the checks on pods.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::ResourceExt;
use serde_json::{Value, json};

use super::kips_e2e::{eventually, live_pods};
use super::node::{self, Cluster};

pub const KIPS: &str = env!("CARGO_BIN_EXE_kips");
pub const WAIT: Duration = Duration::from_secs(120);

/// A line for the run's output even when libtest captures the test's (it captures the print
/// macros, not writes to the stderr handle): the suite's timings.
pub fn say(line: String) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// True when the suite must skip (outside CI only).
pub fn skip() -> bool {
    let Some(reason) = node::skip_reason() else {
        return false;
    };
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{reason}; CI=true does not allow skipping the node suite"
    );
    say(format!("\n*** SKIPPING the node suite: {reason} ***\n"));
    true
}

/// `kips <args>` to its end; its stdout, or a failure with both streams.
pub async fn kips_cli(args: &[&str]) -> Result<String> {
    let out = tokio::process::Command::new(KIPS)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await?;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    ensure!(
        out.status.success(),
        "kips {args:?} failed ({}):\n{stdout}{stderr}",
        out.status
    );
    Ok(stdout)
}

/// Pod `client`: the test client image, idle, for `kubectl exec client -- testapp get`.
pub fn client_pod(image: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "client"},
        "spec": {
            "terminationGracePeriodSeconds": 0,
            "containers": [{
                "name": "client", "image": image, "imagePullPolicy": "Never",
                "command": ["/usr/bin/sleep", "86400"]
            }]
        }
    })
}

pub fn probe(path: &str) -> Value {
    json!({"httpGet": {"path": path, "port": 8080}, "periodSeconds": 2, "failureThreshold": 3})
}

/// `replicas` pods of `image` (testapp serve on 8080) with readiness and liveness probes.
pub fn deployment(name: &str, replicas: i32, image: &str, annotations: Value) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "annotations": annotations},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{
                        "name": "app", "image": image, "imagePullPolicy": "Never",
                        "ports": [{"name": "http", "containerPort": 8080}],
                        "readinessProbe": probe("/healthz"),
                        "livenessProbe": probe("/healthz"),
                    }]
                }
            }
        }
    })
}

pub fn service(app: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": app},
        "spec": {"selector": {"app": app}, "ports": [{"port": 80, "targetPort": 8080}]}
    })
}

pub async fn apply(cluster: &Cluster, ns: &str, objects: &[Value]) -> Result<()> {
    let list = json!({"apiVersion": "v1", "kind": "List", "items": objects});
    cluster
        .kubectl_with_input(&["-n", ns, "apply", "-f", "-"], &list.to_string())
        .await?;
    Ok(())
}

pub async fn rollout(cluster: &Cluster, ns: &str, name: &str) -> Result<()> {
    let deployment = format!("deployment/{name}");
    if let Err(e) = cluster
        .kubectl(&["-n", ns, "rollout", "status", &deployment, "--timeout=120s"])
        .await
    {
        let pods = cluster
            .kubectl(&["-n", ns, "describe", "pods"])
            .await
            .unwrap_or_default();
        bail!("{e:#}\n{pods}");
    }
    forwarding_settled(cluster, ns, name).await
}

/// Waits until kube-proxy's rules for Service `name` (if there is one) forward to exactly the
/// live pods labelled `app=<name>`: a rollout's end is not the end of kube-proxy's sync, and a
/// request to a just-removed pod's address hangs.
pub async fn forwarding_settled(cluster: &Cluster, ns: &str, name: &str) -> Result<()> {
    use std::collections::BTreeSet;
    let client = cluster.client()?;
    let services = kube::Api::<k8s_openapi::api::core::v1::Service>::namespaced(client.clone(), ns);
    if services.get_opt(name).await?.is_none() {
        return Ok(());
    }
    let comment = format!("--comment \"{ns}/{name}");
    let tag = cluster.footprint().tag.clone();
    eventually(
        &format!("kube-proxy to forward {ns}/{name} to its live pods only"),
        WAIT,
        || {
            let (client, comment, tag) = (client.clone(), comment.clone(), tag.clone());
            async move {
                let pods = live_pods(&client, ns, &format!("app={name}")).await?;
                let want: BTreeSet<String> = pods
                    .iter()
                    .filter_map(|p| p.status.as_ref()?.pod_ip.clone())
                    .collect();
                let mut have = BTreeSet::new();
                for save in ["iptables-nft-save", "iptables-legacy-save"] {
                    let out = tokio::process::Command::new("ip")
                        .args(["netns", "exec", &tag, save, "-t", "nat"])
                        .output()
                        .await?;
                    let rules = String::from_utf8_lossy(&out.stdout);
                    have.extend(
                        rules
                            .lines()
                            .filter(|l| l.contains(&comment))
                            .filter_map(|l| l.split("--to-destination ").nth(1))
                            .filter_map(|d| d.split(':').next())
                            .map(str::to_owned),
                    );
                }
                Ok((!want.is_empty() && have == want).then_some(()))
            }
        },
    )
    .await
}

pub async fn cluster_ip(cluster: &Cluster, ns: &str, service: &str) -> Result<String> {
    let ip = cluster
        .kubectl(&[
            "-n",
            ns,
            "get",
            "service",
            service,
            "-o",
            "jsonpath={.spec.clusterIP}",
        ])
        .await?;
    ensure!(ip.starts_with("10.96."), "ClusterIP of {service}: {ip:?}");
    Ok(ip)
}

/// `testapp get <url>` in the client pod, trimmed.
pub async fn client_get(cluster: &Cluster, ns: &str, url: &str) -> Result<String> {
    Ok(cluster
        .kubectl(&["-n", ns, "exec", "client", "--", "testapp", "get", url])
        .await?
        .trim()
        .to_owned())
}

/// [`client_get`] until it answers (kube-proxy programs a new Service within seconds).
pub async fn get_from_client(cluster: &Cluster, ns: &str, url: &str) -> Result<String> {
    eventually(
        &format!("the client pod to get {url}"),
        WAIT,
        || async move { Ok(client_get(cluster, ns, url).await.ok()) },
    )
    .await
}

pub async fn kips_inject(manifest: &str, bridge_image: &str) -> Result<String> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(KIPS)
        .args([
            "inject",
            "-f",
            "-",
            "--bridge-image",
            bridge_image,
            "--image-pull-policy",
            "Never",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut stdin = child.stdin.take().context("stdin")?;
    stdin.write_all(manifest.as_bytes()).await?;
    drop(stdin);
    let out = child.wait_with_output().await?;
    ensure!(
        out.status.success(),
        "kips inject failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

pub fn find<'s>(statuses: &'s [ContainerStatus], name: &str) -> Result<&'s ContainerStatus> {
    statuses
        .iter()
        .find(|s| s.name == name)
        .with_context(|| format!("no status of container {name}"))
}

pub fn assert_ready_without_restarts(pod: &Pod) -> Result<()> {
    let status = pod.status.as_ref().context("pod without status")?;
    let ready = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    ensure!(
        ready,
        "pod {} is not Ready: {:?}",
        pod.name_any(),
        status.conditions
    );
    for s in status
        .container_statuses
        .iter()
        .flatten()
        .chain(status.init_container_statuses.iter().flatten())
    {
        ensure!(
            s.restart_count == 0,
            "container {} of {} restarted {} times",
            s.name,
            pod.name_any(),
            s.restart_count
        );
    }
    Ok(())
}
