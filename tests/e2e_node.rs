//! The node suite: a real kubelet node (tests/support/node.rs) runs pods from the images
//! scripts/images.sh builds; Services work through kube-proxy; a pod rendered by `kips
//! inject` (iptables port mode, native sidecar, the default kips-init image) behaves on it:
//! kips-init completes, the sidecar runs, Service traffic for the app port reaches the
//! sidecar, while the kubelet's probes and the pod's own loopback still reach the app.
//! `kips expose` on a node: the webhook (a local `kips webhook`, as in the control-plane
//! suites) injects the bridge-only pod in named mode, and a client pod's request to the
//! Service lands on the sidecar (a stand-in until the relay bridge lands); `kips doctor` passes
//! there. And a test that fails leaves nothing behind.
//!
//! Needs root and Debian's runc, CNI plugins, conntrack and iptables (scripts/test.sh installs
//! them). Without CI=true the suite skips, loudly, when they are missing; with it, it fails.

mod support;

use std::{
    collections::BTreeSet,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, ResourceExt};
use serde_json::{Value, json};
use support::kips_e2e::{KipsWebhook, create_relay_secret, eventually, live_pods};
use support::node::{self, Cluster};
use support::scenario::{
    KIPS, WAIT, apply, assert_ready_without_restarts, client_get, client_pod, cluster_ip,
    deployment, find, get_from_client, kips_cli, kips_inject, rollout, say, service, skip,
};

/// One cluster at a time: two nodes at once would only compete for the two cores.
static ONE_CLUSTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const CHILD: &str = "KIPS_NODE_CHILD_FOOTPRINT";
const CHILD_MODE: &str = "KIPS_NODE_CHILD_MODE";

#[tokio::test]
async fn a_node_runs_services_and_a_kips_injected_pod() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let _one = ONE_CLUSTER.lock().await;
    let cluster = Cluster::start().await?;
    say(format!(
        "node: node-ready {:.1} s (cluster up in {:.1} s)",
        cluster.node_ready_after().as_secs_f64(),
        cluster.started_after().as_secs_f64()
    ));
    let outcome = scenario(&cluster).await;
    if outcome.is_err() {
        eprintln!("{}", cluster.log_tails(30));
    }
    let report = cluster.stop();
    if outcome.is_err() && !report.leftovers.is_empty() {
        eprintln!(
            "node: teardown after the failure left: {:?}",
            report.leftovers
        );
    }
    outcome?;
    report.assert_clean()?;
    say("node: teardown left nothing behind".into());
    Ok(())
}

async fn scenario(cluster: &Cluster) -> Result<()> {
    let cp = cluster.control_plane();
    let client = cluster.client()?;
    let images = cluster.images();
    let ns = cp.create_namespace("node").await?;
    let n = ns.as_str();

    // --- a plain Deployment behind a Service, reached from a client pod -----------------
    let t0 = Instant::now();
    let app = [
        deployment("app", 2, &images.app, json!({})),
        service("app"),
        client_pod(&images.client),
    ];
    apply(cluster, n, &app).await?;
    rollout(cluster, n, "app").await?;
    cluster
        .kubectl(&[
            "-n",
            n,
            "wait",
            "--for=condition=Ready",
            "pod/client",
            "--timeout=120s",
        ])
        .await?;
    say(format!(
        "node: deployment-available {:.1} s",
        t0.elapsed().as_secs_f64()
    ));

    let app_ip = cluster_ip(cluster, n, "app").await?;
    let first = get_from_client(cluster, n, &format!("http://{app_ip}/")).await?;
    ensure!(
        first.starts_with("cluster app-"),
        "Service app answered {first:?}"
    );
    // The host reaches a ClusterIP as the API server reaches a webhook's Service.
    let from_host = http_get_from_host(&app_ip).await?;
    ensure!(
        from_host.contains("cluster app-"),
        "from the host, Service app answered {from_host:?}"
    );
    // kube-proxy balances across both replicas (all 20 on one: p = 2^-19).
    let mut answered = BTreeSet::new();
    for _ in 0..20 {
        answered.insert(client_get(cluster, n, &format!("http://{app_ip}/")).await?);
    }
    ensure!(
        answered.len() == 2 && answered.iter().all(|a| a.starts_with("cluster app-")),
        "expected both replicas behind the Service, got {answered:?}"
    );
    for pod in live_pods(&client, n, "app=app").await? {
        assert_ready_without_restarts(&pod)?;
    }
    // Pods run under the node's own cgroup root (3 pods: 3 pauses and 3 containers), which
    // is what lets the teardown find them all.
    let in_cgroups = cluster.pod_cgroup_processes();
    ensure!(
        in_cgroups >= 6,
        "{in_cgroups} processes in the node's cgroups, expected 6 or more"
    );

    // --- a Deployment rendered by `kips inject` -----------------------------------------
    create_relay_secret(
        &client,
        n,
        "Endpoint=sb://relay.invalid/;SharedAccessKeyName=k;SharedAccessKey=k",
    )
    .await?;
    let annotations = json!({"kips.io/redirect": "api:8080", "kips.io/port-mode": "iptables"});
    let manifest = serde_json::to_string(&deployment("api", 1, &images.app, annotations))?;
    let injected = kips_inject(&manifest, &images.bridge_standin).await?;
    let rendered: Value = serde_yaml::from_str(&injected)?;
    let template = &rendered["spec"]["template"]["spec"];
    let init_image = template["initContainers"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "kips-init"))
        .map(|c| c["image"].clone())
        .context("kips inject rendered no kips-init")?;
    // kips' default --init-image is the image images.sh builds: the name the chart uses.
    ensure!(
        init_image == images.kips_init.as_str(),
        "kips-init image {init_image} is not {}",
        images.kips_init
    );
    let t0 = Instant::now();
    cluster
        .kubectl_with_input(&["-n", n, "apply", "-f", "-"], &injected)
        .await?;
    apply(cluster, n, &[service("api")]).await?;
    rollout(cluster, n, "api").await?;
    say(format!(
        "node: injected-deployment-available {:.1} s",
        t0.elapsed().as_secs_f64()
    ));

    let pods = live_pods(&client, n, "app=api").await?;
    ensure!(pods.len() == 1, "expected one api pod, got {}", pods.len());
    let pod = &pods[0];
    let pod_name = pod.name_any();
    let status = pod.status.as_ref().context("pod without status")?;
    let inits = status
        .init_container_statuses
        .as_deref()
        .unwrap_or_default();
    let init = find(inits, "kips-init")?;
    let done = init
        .state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .context("kips-init has not terminated")?;
    ensure!(
        done.exit_code == 0,
        "kips-init exited {}: {:?}",
        done.exit_code,
        done.message
    );
    let bridge = find(inits, "kips-bridge")?;
    ensure!(
        bridge.ready
            && bridge.started == Some(true)
            && bridge.state.as_ref().is_some_and(|s| s.running.is_some()),
        "the native sidecar kips-bridge is not running and ready: {bridge:?}"
    );
    // What kips-init installed, from its own log (rules for 8080 -> 15100).
    let init_log = cluster
        .kubectl(&["-n", n, "logs", &pod_name, "-c", "kips-init"])
        .await?;
    say(format!("node: kips-init log:\n{init_log}"));

    let api_ip = cluster_ip(cluster, n, "api").await?;
    let via_service = get_from_client(cluster, n, &format!("http://{api_ip}/")).await?;
    ensure!(
        via_service == format!("sidecar {pod_name}"),
        "Service traffic for 8080 should reach the sidecar, got {via_service:?}"
    );
    let pod_ip = status.pod_ip.clone().context("pod without IP")?;
    let direct = client_get(cluster, n, &format!("http://{pod_ip}:8080/")).await?;
    ensure!(
        direct == format!("sidecar {pod_name}"),
        "pod:8080 from another pod answered {direct:?}"
    );
    // The sidecar got the azbridge arguments kips renders.
    let args = client_get(cluster, n, &format!("http://{pod_ip}:15100/args")).await?;
    ensure!(
        args.contains("-L\n0.0.0.0:15100/"),
        "sidecar arguments: {args:?}"
    );
    // The pod's own loopback reaches the app.
    let local = cluster
        .kubectl(&[
            "-n",
            n,
            "exec",
            &pod_name,
            "-c",
            "app",
            "--",
            "testapp",
            "get",
            "http://127.0.0.1:8080/",
        ])
        .await?;
    ensure!(
        local.trim() == format!("cluster {pod_name}"),
        "loopback answered {local:?}"
    );

    // Probes every 2 s; after several periods the pod is still Ready with no restarts, and
    // the probes reached the app (from the pods' gateway, where the kubelet sends them).
    tokio::time::sleep(Duration::from_secs(10)).await;
    let pod = Api::<Pod>::namespaced(client.clone(), n)
        .get(&pod_name)
        .await?;
    assert_ready_without_restarts(&pod)?;
    let app_log = cluster
        .kubectl(&["-n", n, "logs", &pod_name, "-c", "app"])
        .await?;
    let gateway = cluster.pod_gateway();
    let pods_prefix = format!("GET / from {}.", {
        let [a, b, c, _] = gateway.octets();
        format!("{a}.{b}.{c}")
    });
    let probes = app_log
        .lines()
        .filter(|l| l.contains(&format!("GET /healthz from {gateway}:")))
        .count();
    ensure!(
        probes >= 5,
        "the app saw {probes} probes from {gateway}:\n{app_log}"
    );
    ensure!(
        !app_log.contains(&pods_prefix),
        "Service traffic reached the app instead of the sidecar:\n{app_log}"
    );
    let bridge_log = cluster
        .kubectl(&["-n", n, "logs", &pod_name, "-c", "kips-bridge"])
        .await?;
    ensure!(
        bridge_log.contains(&pods_prefix),
        "the sidecar saw no Service traffic:\n{bridge_log}"
    );
    ensure!(
        !bridge_log.contains("GET /healthz"),
        "the kubelet's probes reached the sidecar:\n{bridge_log}"
    );
    Ok(())
}

#[tokio::test]
async fn an_exposed_service_reaches_the_bridge_sidecar_on_a_node() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let _one = ONE_CLUSTER.lock().await;
    let cluster = Cluster::start().await?;
    let outcome = expose_scenario(&cluster).await;
    if outcome.is_err() {
        eprintln!("{}", cluster.log_tails(30));
    }
    let report = cluster.stop();
    outcome?;
    report.assert_clean()?;
    Ok(())
}

async fn expose_scenario(cluster: &Cluster) -> Result<()> {
    let cp = cluster.control_plane();
    let client = cluster.client()?;
    let images = cluster.images();
    // The webhook as the control-plane suites run it, injecting the sidecar stand-in (it
    // answers `sidecar <pod>` on the first listen port, 15100) that the node has imported.
    let webhook = KipsWebhook::start(
        cp,
        "kips",
        None,
        &[
            "--bridge-image",
            &images.bridge_standin,
            "--image-pull-policy",
            "Never",
        ],
    )
    .await?;
    let config = webhook.config.name_any();
    let ns = cp.create_namespace("expose").await?;
    let n = ns.as_str();
    create_relay_secret(
        &client,
        n,
        "Endpoint=sb://relay.invalid/;SharedAccessKeyName=k;SharedAccessKey=k",
    )
    .await?;
    let t0 = Instant::now();
    let kubeconfig = cluster.kubeconfig().display().to_string();
    let expose = kips_cli(&[
        "expose",
        "pay",
        "--port",
        "8080",
        "-n",
        n,
        "--placeholder-image",
        &images.pause,
        "--wait",
        "--kubeconfig",
        &kubeconfig,
    ])
    .await?;
    say(format!(
        "node: exposed-service-ready {:.1} s\n{expose}",
        t0.elapsed().as_secs_f64()
    ));
    let pods = live_pods(&client, n, "kips.io/expose=pay").await?;
    ensure!(pods.len() == 1, "expected one pay pod, got {}", pods.len());
    let pod_name = pods[0].name_any();
    ensure!(
        pods[0].annotations()["kips.io/status"].contains("\"portMode\":\"named\""),
        "not injected in named mode: {:?}",
        pods[0].annotations()
    );

    // A client pod reaches pay:8080 through the Service, and lands on the sidecar.
    let client_pod = client_pod(&images.client);
    apply(cluster, n, &[client_pod]).await?;
    cluster
        .kubectl(&[
            "-n",
            n,
            "wait",
            "--for=condition=Ready",
            "pod/client",
            "--timeout=120s",
        ])
        .await?;
    let ip = cluster_ip(cluster, n, "pay").await?;
    let answer = get_from_client(cluster, n, &format!("http://{ip}:8080/")).await?;
    ensure!(
        answer == format!("sidecar {pod_name}"),
        "pay:8080 should reach the bridge sidecar, got {answer:?}"
    );

    // kips doctor on the real node: every check passes, the image is seen running there.
    let doctor = kips_cli(&[
        "doctor",
        "deployment/pay",
        "-n",
        n,
        "--webhook-config",
        &config,
        "--kubeconfig",
        &kubeconfig,
    ])
    .await?;
    say(format!("node: kips doctor deployment/pay:\n{doctor}"));
    ensure!(doctor.contains("all 11 checks passed"), "{doctor}");
    ensure!(
        doctor.contains(&format!("{}: running on node", images.bridge_standin)),
        "{doctor}"
    );

    let deleted = kips_cli(&[
        "expose",
        "pay",
        "--delete",
        "-n",
        n,
        "--kubeconfig",
        &kubeconfig,
    ])
    .await?;
    ensure!(
        deleted.contains("removed Deployment pay and Service pay"),
        "{deleted}"
    );
    eventually("the pay pod to go", WAIT, || async {
        Ok(live_pods(&client, n, "kips.io/expose=pay")
            .await?
            .is_empty()
            .then_some(()))
    })
    .await?;

    // An injected image the node does not have (and may not pull): doctor names it.
    drop(webhook);
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .delete(&config, &Default::default())
        .await?;
    let missing_image = "kips.test/missing:v1";
    let webhook = KipsWebhook::start(
        cp,
        "missing",
        None,
        &[
            "--bridge-image",
            missing_image,
            "--image-pull-policy",
            "Never",
        ],
    )
    .await?;
    let config = webhook.config.name_any();
    kips_cli(&[
        "expose",
        "gone",
        "--port",
        "8080",
        "-n",
        n,
        "--placeholder-image",
        &images.pause,
        "--kubeconfig",
        &kubeconfig,
    ])
    .await?;
    let images_check = eventually("kips doctor to name the missing image", WAIT, || {
        let (kubeconfig, config) = (kubeconfig.clone(), config.clone());
        async move {
            let out = tokio::process::Command::new(KIPS)
                .args(["doctor", "deployment/gone", "-n", n, "-o", "json"])
                .args(["--webhook-config", &config, "--kubeconfig", &kubeconfig])
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output()
                .await?;
            let report: Value = serde_json::from_slice(&out.stdout)?;
            let check = report["checks"]
                .as_array()
                .and_then(|c| c.iter().find(|c| c["name"] == "images"))
                .cloned()
                .context("no images check")?;
            Ok((check["outcome"] == "fail").then_some((out.status.code(), check)))
        }
    })
    .await?;
    say(format!(
        "node: kips doctor, image missing: {:#}",
        images_check.1
    ));
    ensure!(
        images_check.0 == Some(1),
        "doctor exited {:?}",
        images_check.0
    );
    let detail = images_check.1["detail"].as_str().unwrap_or_default();
    ensure!(
        detail.contains(&format!(
            "kips-bridge cannot get image {missing_image}: ErrImageNeverPull"
        )),
        "{detail}"
    );
    ensure!(
        images_check.1["fix"]
            .as_str()
            .unwrap_or_default()
            .starts_with(&format!(
                "publish {missing_image} where the nodes pull from"
            )),
        "{}",
        images_check.1
    );
    drop(webhook);
    Ok(())
}

/// The child role (a copy of this binary): starts a node with a running pod, then fails
/// with the cluster never dropped — only the exit-time teardown can clean up. The parent
/// checks that nothing is left.
#[tokio::test]
async fn a_failing_test_leaves_nothing_behind() -> Result<()> {
    if let Ok(path) = std::env::var(CHILD) {
        let cluster = Cluster::start().await?;
        let ns = cluster.control_plane().create_namespace("doomed").await?;
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "doomed"},
            "spec": {"containers": [{"name": "app", "image": cluster.images().app, "imagePullPolicy": "Never"}]}
        });
        apply(&cluster, &ns, &[pod]).await?;
        cluster
            .kubectl(&[
                "-n",
                &ns,
                "wait",
                "--for=condition=Ready",
                "pod/doomed",
                "--timeout=120s",
            ])
            .await?;
        std::fs::write(&path, serde_json::to_string(cluster.footprint())?)?;
        std::mem::forget(cluster); // as if it lived in a static
        if std::env::var(CHILD_MODE).as_deref() == Ok("hang") {
            // Waits to be killed (SIGKILL: no unwinding, no atexit).
            tokio::time::sleep(Duration::from_secs(600)).await;
        }
        panic!("failing on purpose, with a node and a pod running");
    }
    if skip() {
        return Ok(());
    }
    let _one = ONE_CLUSTER.lock().await;
    let footprint_file = tempfile::NamedTempFile::new()?;
    let out = tokio::process::Command::new(std::env::current_exe()?)
        .args([
            "--exact",
            "a_failing_test_leaves_nothing_behind",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, footprint_file.path())
        .stdin(Stdio::null())
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let text = std::fs::read_to_string(footprint_file.path())?;
    if text.is_empty() {
        bail!(
            "the child never got a pod running ({}):\n{stderr}",
            out.status
        );
    }
    ensure!(
        !out.status.success(),
        "the child should have failed:\n{stderr}"
    );
    ensure!(
        stderr.contains("failing on purpose"),
        "the child failed otherwise:\n{stderr}"
    );
    let footprint: node::Footprint = serde_json::from_str(&text)?;
    let leftovers = node::leftovers(&footprint);
    ensure!(
        leftovers.is_empty(),
        "the failed child left behind:\n  {}\nits stderr:\n{stderr}",
        leftovers.join("\n  ")
    );
    ensure!(
        stderr.contains(&format!(
            "node: torn down {} at exit: nothing left behind",
            footprint.tag
        )),
        "the child's exit-time teardown did not report:\n{stderr}"
    );
    say("node: a failed test's node was torn down at exit, nothing left behind".into());
    Ok(())
}

/// A test binary killed outright (no atexit) leaves its pods and shims running; the next
/// start's sweep removes them.
#[tokio::test]
async fn a_killed_test_binary_is_swept_by_the_next_start() -> Result<()> {
    if std::env::var(CHILD).is_ok() || skip() {
        return Ok(());
    }
    let _one = ONE_CLUSTER.lock().await;
    let footprint_file = tempfile::NamedTempFile::new()?;
    let child_log = footprint_file.path().with_extension("log");
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .args([
            "--exact",
            "a_failing_test_leaves_nothing_behind",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, footprint_file.path())
        .env(CHILD_MODE, "hang")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&child_log)?)
        .kill_on_drop(true)
        .spawn()?;
    let started = Instant::now();
    let text = loop {
        let log = || std::fs::read_to_string(&child_log).unwrap_or_default();
        if let Some(status) = child.try_wait()? {
            bail!("the child exited early ({status}):\n{}", log());
        }
        let text = std::fs::read_to_string(footprint_file.path())?;
        if !text.is_empty() {
            break text;
        }
        ensure!(
            started.elapsed() < WAIT,
            "the child got no pod running in {WAIT:?}:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    child.kill().await?; // SIGKILL
    let _ = std::fs::remove_file(&child_log);
    let footprint: node::Footprint = serde_json::from_str(&text)?;
    let left = node::leftovers(&footprint);
    ensure!(
        left.iter().any(|l| l.starts_with("process")),
        "a killed run should leave its pods running until the sweep; found {left:?}"
    );
    tokio::task::spawn_blocking(node::sweep_stale).await?;
    support::control_plane::sweep_stale_dirs();
    let left = node::leftovers(&footprint);
    ensure!(left.is_empty(), "the sweep left:\n  {}", left.join("\n  "));
    say("node: a killed test binary's node was swept, nothing left behind".into());
    Ok(())
}

// ---------------------------------------------------------------------------------------

/// `GET /` on `<ip>:80` from the test process (the host netns), the whole response.
async fn http_get_from_host(ip: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect((ip, 80)),
    )
    .await??;
    stream
        .write_all(format!("GET / HTTP/1.1\r\nHost: {ip}\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response)).await??;
    Ok(response)
}
