//! The user's story on a real node, with bytes on the wire, typed as a user would: the real
//! `kubectl` and `kips`, `kips bridge` as the sidecar's engine, the test relay (`kips relay`)
//! where Azure Relay would be, and `kips connect` on the host as the laptop.
//!
//! - Deployment `api` (2 replicas, readiness and liveness probes on 8080) behind Service
//!   `api` (80 → 8080): a client pod gets "cluster".
//! - `kubectl annotate deployment api kips.io/redirect=api:8080`: the rollout ends with every
//!   pod Ready, kips-init completed, kips-bridge running; `kips connect deployment/api` with a
//!   local app answering "laptop": the client pod gets "laptop", through the Service, and the
//!   app's probes keep passing (no restarts, pods Ready).
//! - `kubectl annotate deployment api kips.io/redirect-`: plain pods again, "cluster" again.
//! - the same with `kips redirect deployment/api api:8080 --wait` and `kips revert --wait`.
//!
//! It prints `node: redirect-to-laptop <s> s, revert-to-cluster <s> s, node-ready <s> s` for
//! each way. Needs what the node suite needs (see tests/e2e_node.rs).

mod support;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use serde_json::json;
use support::kips_e2e::{KipsWebhook, eventually, live_pods};
use support::laptop::{TestRelay, http_app, kips_connect};
use support::node::Cluster;
use support::scenario::{
    KIPS, WAIT, apply, assert_ready_without_restarts, client_get, client_pod, cluster_ip,
    deployment, find, get_from_client, rollout, say, service, skip,
};

#[tokio::test]
async fn the_users_story_sends_the_services_traffic_to_the_laptop_and_back() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let cluster = Cluster::start().await?;
    let outcome = story(&cluster).await;
    if outcome.is_err() {
        eprintln!("{}", cluster.log_tails(40));
    }
    let report = cluster.stop();
    outcome?;
    report.assert_clean()?;
    Ok(())
}

/// How one way of redirecting went.
struct Timing {
    redirect_to_laptop: Duration,
    revert_to_cluster: Duration,
}

async fn story(cluster: &Cluster) -> Result<()> {
    let cp = cluster.control_plane();
    let client = cluster.client()?;
    let images = cluster.images();
    let dir = tempfile::Builder::new().prefix("kips-story-").tempdir()?;

    // The platform engineer's part: kips' webhook with the kips engine, the images built here.
    let _webhook = KipsWebhook::start(
        cp,
        "kips",
        None,
        &[
            "--bridge-engine",
            "kips",
            "--bridge-image",
            &images.kips,
            "--init-image",
            &images.kips_init,
            "--image-pull-policy",
            "Never",
        ],
    )
    .await?;
    // Azure Relay's part, played by the test relay where the pods reach it.
    let relay = TestRelay::start(cluster.host_address(), dir.path(), &["api"]).await?;
    let ns = cp.create_namespace("story").await?;
    let n = ns.as_str();
    relay.create_secret(&client, n).await?;

    // The application: Deployment api behind Service api, and a client pod.
    let client_pod = client_pod(&images.client);
    apply(
        cluster,
        n,
        &[
            deployment("api", 2, &images.app, json!({})),
            service("api"),
            client_pod,
        ],
    )
    .await?;
    rollout(cluster, n, "api").await?;
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
    let url = format!("http://{}/", cluster_ip(cluster, n, "api").await?);
    let first = get_from_client(cluster, n, &url).await?;
    ensure!(first.starts_with("cluster api-"), "before: {first:?}");

    // The developer's laptop: an app answering "laptop"; kips connect runs once the workload
    // is redirected, as the developer would start it.
    let laptop = Laptop {
        dir: dir.path(),
        kubeconfig: cluster.kubeconfig(),
        port_map: format!("8080={}", http_app("laptop").await?),
    };

    // 1. kubectl annotate, and back. 2. kips redirect --wait and kips revert --wait.
    let by_kubectl = redirect_and_revert(cluster, n, &url, &laptop, Way::Kubectl).await?;
    let by_kips = redirect_and_revert(cluster, n, &url, &laptop, Way::Kips).await?;
    for (way, timing) in [
        ("kubectl annotate", by_kubectl),
        ("kips redirect --wait", by_kips),
    ] {
        say(format!(
            "node: redirect-to-laptop {:.1} s, revert-to-cluster {:.1} s, node-ready {:.1} s ({way})",
            timing.redirect_to_laptop.as_secs_f64(),
            timing.revert_to_cluster.as_secs_f64(),
            cluster.node_ready_after().as_secs_f64(),
        ));
    }
    Ok(())
}

/// Where `kips connect` runs and what it forwards to.
struct Laptop<'a> {
    dir: &'a std::path::Path,
    kubeconfig: &'a std::path::Path,
    port_map: String,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Way {
    /// `kubectl annotate`, then `kubectl rollout status`.
    Kubectl,
    /// `kips redirect --wait` and `kips revert --wait`.
    Kips,
}

async fn redirect_and_revert(
    cluster: &Cluster,
    n: &str,
    url: &str,
    laptop: &Laptop<'_>,
    way: Way,
) -> Result<Timing> {
    let client = cluster.client()?;
    let kubeconfig = cluster.kubeconfig().display().to_string();
    let t0 = Instant::now();
    match way {
        Way::Kubectl => {
            cluster
                .kubectl(&[
                    "-n",
                    n,
                    "annotate",
                    "deployment",
                    "api",
                    "kips.io/redirect=api:8080",
                ])
                .await?;
        }
        Way::Kips => {
            let out = kips(&[
                "redirect",
                "deployment/api",
                "api:8080",
                "--wait",
                "--timeout=180s",
                "-n",
                n,
                "--kubeconfig",
                &kubeconfig,
            ])
            .await?;
            ensure!(out.contains("pods injected and ready"), "{out}");
        }
    }
    let mut connect = kips_connect(
        laptop.dir,
        laptop.kubeconfig,
        n,
        "deployment/api",
        &["--port-map", &laptop.port_map],
    )?;
    let redirected = redirected(cluster, n, url, t0).await;
    let redirect_to_laptop =
        redirected.with_context(|| format!("kips connect:\n{}", connect.log_text()))?;

    let t1 = Instant::now();
    match way {
        Way::Kubectl => {
            cluster
                .kubectl(&[
                    "-n",
                    n,
                    "annotate",
                    "deployment",
                    "api",
                    "kips.io/redirect-",
                ])
                .await?;
        }
        Way::Kips => {
            let out = kips(&[
                "revert",
                "deployment/api",
                "--wait",
                "--timeout=180s",
                "-n",
                n,
                "--kubeconfig",
                &kubeconfig,
            ])
            .await?;
            ensure!(out.contains("pods without kips and ready"), "{out}");
        }
    }
    let revert_to_cluster = first_answer(cluster, n, url, "cluster api-", t1).await?;
    ensure!(
        connect.is_running(),
        "kips connect ended:\n{}",
        connect.log_text()
    );
    let code = connect.interrupt(Duration::from_secs(15)).await?;
    ensure!(
        code == Some(0),
        "kips connect exited {code:?}:\n{}",
        connect.log_text()
    );
    rollout(cluster, n, "api").await?;
    eventually("only plain api pods", WAIT, || async {
        let pods = live_pods(&client, n, "app=api").await?;
        Ok((pods.len() == 2 && pods.iter().all(is_plain)).then_some(()))
    })
    .await?;
    for _ in 0..10 {
        let answer = client_get(cluster, n, url).await?;
        ensure!(
            answer.starts_with("cluster api-"),
            "reverted, the Service answered {answer:?}"
        );
    }
    Ok(Timing {
        redirect_to_laptop,
        revert_to_cluster,
    })
}

/// From `since`, the client's first answer from the laptop; then every pod of the rollout is
/// Ready with kips-init completed and kips-bridge running, every answer through the Service
/// is the laptop's, and the app's probes keep passing.
async fn redirected(cluster: &Cluster, n: &str, url: &str, since: Instant) -> Result<Duration> {
    let client = cluster.client()?;
    let redirect_to_laptop = first_answer(cluster, n, url, "laptop", since).await?;
    rollout(cluster, n, "api").await?;
    // Every pod of the rollout: Ready, kips-init completed, kips-bridge running and ready.
    let pods = live_pods(&client, n, "app=api").await?;
    ensure!(pods.len() == 2, "{} api pods", pods.len());
    for pod in &pods {
        ensure!(
            pod.annotations().contains_key("kips.io/status"),
            "{} is not injected",
            pod.name_any()
        );
        let status = pod.status.as_ref().context("no status")?;
        let inits = status
            .init_container_statuses
            .as_deref()
            .unwrap_or_default();
        let init = find(inits, "kips-init")?;
        ensure!(
            init.state
                .as_ref()
                .and_then(|s| s.terminated.as_ref())
                .is_some_and(|t| t.exit_code == 0),
            "kips-init of {}: {init:?}",
            pod.name_any()
        );
        let bridge = find(inits, "kips-bridge")?;
        ensure!(
            bridge.ready && bridge.state.as_ref().is_some_and(|s| s.running.is_some()),
            "kips-bridge of {}: {bridge:?}",
            pod.name_any()
        );
    }
    // Every answer through the Service is the laptop's now (both pods, by kube-proxy).
    for _ in 0..10 {
        let answer = client_get(cluster, n, url).await?;
        ensure!(
            answer == "laptop",
            "redirected, the Service answered {answer:?}"
        );
    }
    // The app's probes (every 2 s) keep passing: after several periods no restart, Ready.
    tokio::time::sleep(Duration::from_secs(8)).await;
    for pod in live_pods(&client, n, "app=api").await? {
        assert_ready_without_restarts(&pod)?;
    }

    Ok(redirect_to_laptop)
}

/// No kips container and no kips annotation.
fn is_plain(pod: &Pod) -> bool {
    let spec = pod.spec.as_ref();
    let names = spec
        .into_iter()
        .flat_map(|s| {
            s.containers
                .iter()
                .chain(s.init_containers.iter().flatten())
        })
        .map(|c| c.name.as_str());
    !names.into_iter().any(|n| n.starts_with("kips-"))
        && !pod.annotations().keys().any(|k| k.starts_with("kips.io/"))
}

/// The time from `since` to the client pod's first answer starting with `prefix`.
async fn first_answer(
    cluster: &Cluster,
    n: &str,
    url: &str,
    prefix: &'static str,
    since: Instant,
) -> Result<Duration> {
    eventually(
        &format!("the client to get {prefix:?}"),
        WAIT,
        || async move {
            Ok(client_get(cluster, n, url)
                .await
                .ok()
                .filter(|a| a.starts_with(prefix))
                .map(|_| since.elapsed()))
        },
    )
    .await
}

/// `kips <args>` to its end: stdout and stderr, or a failure with both.
async fn kips(args: &[&str]) -> Result<String> {
    let out = tokio::process::Command::new(KIPS)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.status.success(),
        "kips {args:?} failed ({}):\n{text}",
        out.status
    );
    Ok(text)
}
