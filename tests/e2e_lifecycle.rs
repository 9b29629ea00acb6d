//! Issue 14, scenarios 5–7 on the real node (one cluster for the file, the scenarios in turn),
//! with the real `kubectl` and `kips`, `kips bridge` as the sidecar's engine, the test relay
//! and `kips connect` on the host as the laptop (as in tests/e2e_story.rs):
//!
//! 5. StatefulSet `web` (2 replicas) and DaemonSet `agent` (the node's one pod), each behind
//!    a Service: redirected (`kubectl annotate statefulset web ...`, `kips redirect
//!    daemonset/agent ... --wait`), the webhook's RedirectOn Event is on the workload, the
//!    client pod gets "laptop" through the Service and
//!    `kips status <kind>/<name>` shows the listener connected; reverted (`kips revert
//!    statefulset/web --wait`, `kubectl annotate daemonset agent kips.io/redirect-`), a
//!    RedirectOff Event, the client gets the cluster's app again, the pods are plain and
//!    `kips status <kind>/<name>` exits 1 saying it is not redirected.
//! 6. GitOps: Deployment `gitops` applied with `kips.io/redirect` in its pod template: the pods
//!    are injected, the laptop answers, the stored template keeps the annotation after the
//!    rollout, and `kips revert deployment/gitops` refuses (exit 1) saying to edit the
//!    manifest, changing nothing.
//! 7. The laptop goes away: `kips connect` interrupted, every request of the client pod fails
//!    within 1 s (measured in the pod, `testapp timed-get`) and `kips status
//!    deployment/gitops` says no listener for every pod; `kips connect` again, the laptop
//!    answers within 10 s with nothing done to the cluster. Then the GitOps revert: the
//!    manifest applied without the annotation, plain pods, the cluster's app answers.
//!
//! Needs what the node suite needs (see tests/e2e_node.rs).

mod support;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, ResourceExt};
use serde_json::{Value, json};
use support::kips_e2e::{KipsWebhook, eventually, live_pods};
use support::laptop::{TestRelay, http_app, kips_connect};
use support::node::Cluster;
use support::scenario::{
    KIPS, WAIT, apply, client_get, client_pod, cluster_ip, deployment, find, forwarding_settled,
    get_from_client, kips_cli, rollout, say, service, skip,
};

#[tokio::test]
async fn statefulsets_daemonsets_gitops_and_a_laptop_that_goes_away() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let cluster = Cluster::start().await?;
    let outcome = scenarios(&cluster).await;
    if outcome.is_err() {
        eprintln!("{}", cluster.log_tails(40));
    }
    let report = cluster.stop();
    outcome?;
    report.assert_clean()?;
    Ok(())
}

/// What the scenarios share: the namespace, the laptop, the client pod's view.
struct Env<'a> {
    cluster: &'a Cluster,
    n: String,
    dir: &'a std::path::Path,
    kubeconfig: String,
    port_map: String,
}

impl Env<'_> {
    fn connect(&self, workload: &str) -> Result<support::laptop::Logged> {
        kips_connect(
            self.dir,
            self.cluster.kubeconfig(),
            &self.n,
            workload,
            &["--port-map", &self.port_map],
        )
    }

    /// `kips <args> -n <ns> --kubeconfig <cluster>`: stdout.
    async fn kips(&self, args: &[&str]) -> Result<String> {
        let mut all = args.to_vec();
        all.extend(["-n", &self.n, "--kubeconfig", &self.kubeconfig]);
        kips_cli(&all).await
    }

    async fn kubectl(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-n", self.n.as_str()];
        all.extend(args);
        self.cluster.kubectl(&all).await
    }

    /// The time from `since` to the client pod's first answer starting with `prefix`.
    async fn first_answer(&self, url: &str, prefix: &str, since: Instant) -> Result<Duration> {
        eventually(&format!("the client to get {prefix:?}"), WAIT, || async {
            Ok(client_get(self.cluster, &self.n, url)
                .await
                .ok()
                .filter(|a| a.starts_with(prefix))
                .map(|_| since.elapsed()))
        })
        .await
    }

    /// `count` answers through the Service, each starting with `prefix`.
    async fn all_answers(&self, url: &str, prefix: &str, count: usize) -> Result<()> {
        for _ in 0..count {
            let answer = client_get(self.cluster, &self.n, url).await?;
            ensure!(
                answer.starts_with(prefix),
                "{url} answered {answer:?}, not {prefix:?}"
            );
        }
        Ok(())
    }

    /// `kubectl rollout status <kind>/<name>`, then kube-proxy forwarding to the live pods.
    async fn rollout(&self, workload: &str) -> Result<()> {
        let name = workload.split('/').nth(1).context("kind/name")?;
        if let Err(e) = self
            .kubectl(&["rollout", "status", workload, "--timeout=120s"])
            .await
        {
            let pods = self
                .kubectl(&["describe", "pods"])
                .await
                .unwrap_or_default();
            bail!("{e:#}\n{pods}");
        }
        forwarding_settled(self.cluster, &self.n, name).await
    }

    async fn pods(&self, app: &str) -> Result<Vec<Pod>> {
        live_pods(&self.cluster.client()?, &self.n, &format!("app={app}")).await
    }

    /// Every live pod of `app` (`count` of them) injected: kips-init completed, kips-bridge
    /// running and ready, the pod Ready.
    async fn assert_injected(&self, app: &str, count: usize) -> Result<()> {
        let pods = self.pods(app).await?;
        ensure!(
            pods.len() == count,
            "{} {app} pods, not {count}",
            pods.len()
        );
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
            support::scenario::assert_ready_without_restarts(pod)?;
        }
        Ok(())
    }

    async fn wait_plain(&self, app: &str, count: usize) -> Result<()> {
        eventually(&format!("only plain {app} pods"), WAIT, || async {
            let pods = self.pods(app).await?;
            Ok((pods.len() == count && pods.iter().all(is_plain)).then_some(()))
        })
        .await
    }

    /// The note of the newest Event `reason` on `kind`/`name`, as `kubectl get events` shows
    /// it.
    async fn event(&self, kind: &str, name: &str, reason: &str) -> Result<String> {
        eventually(
            &format!("a {reason} Event on {kind}/{name}"),
            WAIT,
            || async {
                let out = self.kubectl(&["get", "events", "-o", "json"]).await?;
                let list: Value = serde_json::from_str(&out)?;
                Ok(list["items"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .rfind(|e| {
                        e["reason"] == reason
                            && e["involvedObject"]["kind"] == kind
                            && e["involvedObject"]["name"] == name
                    })
                    .map(|e| e["message"].as_str().unwrap_or_default().to_owned()))
            },
        )
        .await
    }

    /// `kips status <workload>`'s listener lines (`<pod> <relay> <listener ...>`), by pod.
    async fn listeners(&self, workload: &str) -> Result<(String, Vec<(String, String)>)> {
        let out = self.kips(&["status", workload]).await?;
        let mut lines = out.lines().skip_while(|l| !l.starts_with("POD "));
        ensure!(lines.next().is_some(), "no listener table:\n{out}");
        let rows = lines
            .filter_map(|l| {
                let mut words = l.split_whitespace();
                let pod = words.next()?.to_owned();
                let _relay = words.next()?;
                Some((pod, words.collect::<Vec<_>>().join(" ")))
            })
            .collect();
        Ok((out, rows))
    }

    /// `testapp timed-get` in the client pod: the milliseconds and the rest of its line.
    async fn timed_get(&self, url: &str) -> Result<(u64, String)> {
        let out = self
            .kubectl(&["exec", "client", "--", "testapp", "timed-get", url])
            .await?;
        let line = out.trim();
        let (ms, rest) = line.split_once(" ms ").context(line.to_owned())?;
        Ok((ms.parse()?, rest.to_owned()))
    }
}

async fn scenarios(cluster: &Cluster) -> Result<()> {
    let cp = cluster.control_plane();
    let client = cluster.client()?;
    let images = cluster.images();
    let dir = tempfile::Builder::new().prefix("kips-life-").tempdir()?;
    // Cluster hooks on: the webhook records RedirectOn/RedirectOff Events on the workloads.
    let kubeconfig = format!("--kubeconfig={}", cluster.kubeconfig().display());
    let _webhook = KipsWebhook::start(
        cp,
        "kips",
        None,
        &[
            "--cluster-hooks=on",
            &kubeconfig,
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
    let relay = TestRelay::start(
        cluster.host_address(),
        dir.path(),
        &["web", "agent", "gitops"],
    )
    .await?;
    let ns = cp.create_namespace("life").await?;
    let n = ns.as_str();
    relay.create_secret(&client, n).await?;

    let client_pod = client_pod(&images.client);
    let mut web = deployment("web", 2, &images.app, json!({}));
    web["kind"] = json!("StatefulSet");
    web["spec"]["serviceName"] = json!("web");
    let mut agent = deployment("agent", 1, &images.app, json!({}));
    agent["kind"] = json!("DaemonSet");
    agent["spec"]
        .as_object_mut()
        .context("spec")?
        .remove("replicas");
    apply(
        cluster,
        n,
        &[web, service("web"), agent, service("agent"), client_pod],
    )
    .await?;
    let env = Env {
        cluster,
        n: n.to_owned(),
        dir: dir.path(),
        kubeconfig: cluster.kubeconfig().display().to_string(),
        port_map: format!("8080={}", http_app("laptop").await?),
    };
    env.kubectl(&[
        "wait",
        "--for=condition=Ready",
        "pod/client",
        "--timeout=120s",
    ])
    .await?;

    // 5. StatefulSet and DaemonSet.
    env.rollout("statefulset/web").await?;
    env.rollout("daemonset/agent").await?;
    let timing = workload_round_trip(&env, "statefulset", "web", 2).await?;
    say(format!(
        "lifecycle: statefulset/web redirect-to-laptop {:.1} s (kubectl annotate), revert-to-cluster {:.1} s (kips revert --wait)",
        timing.0.as_secs_f64(),
        timing.1.as_secs_f64()
    ));
    let timing = workload_round_trip(&env, "daemonset", "agent", 1).await?;
    say(format!(
        "lifecycle: daemonset/agent redirect-to-laptop {:.1} s (kips redirect --wait), revert-to-cluster {:.1} s (kubectl annotate)",
        timing.0.as_secs_f64(),
        timing.1.as_secs_f64()
    ));

    // 6. and 7.
    gitops_and_the_laptop_going_away(&env).await
}

/// Scenario 5 for one workload: redirect, laptop answers, status says connected; revert,
/// cluster answers, plain pods. StatefulSets go by kubectl there and kips back, DaemonSets
/// the other way round.
async fn workload_round_trip(
    env: &Env<'_>,
    kind: &str,
    name: &str,
    count: usize,
) -> Result<(Duration, Duration)> {
    let workload = format!("{kind}/{name}");
    let url = format!("http://{}/", cluster_ip(env.cluster, &env.n, name).await?);
    let cluster_answer = format!("cluster {name}-");
    let first = get_from_client(env.cluster, &env.n, &url).await?;
    ensure!(first.starts_with(&cluster_answer), "before: {first:?}");
    let by_kubectl = kind == "statefulset";
    let redirect = format!("kips.io/redirect={name}:8080");

    let t0 = Instant::now();
    if by_kubectl {
        env.kubectl(&["annotate", kind, name, &redirect]).await?;
    } else {
        let out = env
            .kips(&[
                "redirect",
                &workload,
                &format!("{name}:8080"),
                "--wait",
                "--timeout=180s",
            ])
            .await?;
        ensure!(out.contains("pods injected and ready"), "{out}");
    }
    let kind_name = if by_kubectl {
        "StatefulSet"
    } else {
        "DaemonSet"
    };
    let on = env.event(kind_name, name, "RedirectOn").await?;
    say(format!("lifecycle: Event RedirectOn on {workload}: {on}"));
    ensure!(on.starts_with("kips: redirection on"), "{on}");
    let mut connect = env.connect(&workload)?;
    let to_laptop = env
        .first_answer(&url, "laptop", t0)
        .await
        .with_context(|| format!("kips connect:\n{}", connect.log_text()))?;
    env.rollout(&workload).await?;
    env.assert_injected(name, count).await?;
    env.all_answers(&url, "laptop", 10).await?;
    // The status of the workload: injected and ready, and a listener seen connected.
    let (out, listeners) = env.listeners(&workload).await?;
    say(format!(
        "lifecycle: kips status {workload} (redirected):\n{out}"
    ));
    ensure!(listeners.len() == count, "{out}");
    ensure!(
        listeners.iter().any(|(_, l)| l.starts_with("connected")),
        "{out}"
    );
    ensure!(
        listeners.iter().all(|(_, l)| !l.starts_with("none")),
        "{out}"
    );
    let row = out
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(workload.as_str()))
        .with_context(|| format!("no row for {workload}:\n{out}"))?;
    let full = format!("{count}/{count}");
    ensure!(
        row.split_whitespace().filter(|w| *w == full).count() == 2 && row.ends_with("complete"),
        "{out}"
    );

    let t1 = Instant::now();
    if by_kubectl {
        let out = env
            .kips(&["revert", &workload, "--wait", "--timeout=180s"])
            .await?;
        ensure!(out.contains("pods without kips and ready"), "{out}");
    } else {
        env.kubectl(&["annotate", kind, name, "kips.io/redirect-"])
            .await?;
    }
    let to_cluster = env.first_answer(&url, &cluster_answer, t1).await?;
    let off = env.event(kind_name, name, "RedirectOff").await?;
    say(format!("lifecycle: Event RedirectOff on {workload}: {off}"));
    ensure!(off.starts_with("kips: redirection off"), "{off}");
    ensure!(
        connect.is_running(),
        "kips connect ended:\n{}",
        connect.log_text()
    );
    let code = connect.interrupt(Duration::from_secs(15)).await?;
    ensure!(code == Some(0), "kips connect exited {code:?}");
    env.rollout(&workload).await?;
    env.wait_plain(name, count).await?;
    env.all_answers(&url, &cluster_answer, 10).await?;
    // Nothing of kips is left on the workload, and status says so.
    let out = tokio::process::Command::new(KIPS)
        .args([
            "status",
            &workload,
            "-n",
            &env.n,
            "--kubeconfig",
            &env.kubeconfig,
        ])
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(1)
            && stderr.contains(&format!(
                "{workload} in namespace {} is not redirected",
                env.n
            )),
        "kips status {workload} after the revert: {}: {stderr}",
        out.status
    );
    let stored = env.kubectl(&["get", kind, name, "-o", "json"]).await?;
    let stored: Value = serde_json::from_str(&stored)?;
    for annotations in [
        &stored["metadata"]["annotations"],
        &stored["spec"]["template"]["metadata"]["annotations"],
    ] {
        let keys: Vec<&String> = annotations
            .as_object()
            .into_iter()
            .flat_map(|m| m.keys())
            .filter(|k| k.starts_with("kips.io/"))
            .collect();
        ensure!(keys.is_empty(), "{workload} still has {keys:?}");
    }
    Ok((to_laptop, to_cluster))
}

fn gitops_deployment(image: &str, redirect: bool) -> Value {
    let mut d = deployment("gitops", 2, image, json!({}));
    if redirect {
        d["spec"]["template"]["metadata"]["annotations"] =
            json!({"kips.io/redirect": "gitops:8080"});
    }
    d
}

async fn gitops_and_the_laptop_going_away(env: &Env<'_>) -> Result<()> {
    let images = env.cluster.images();
    let deployments = Api::<Deployment>::namespaced(env.cluster.client()?, &env.n);
    // 6. The manifest carries the annotation in its pod template, applied as GitOps would.
    apply(
        env.cluster,
        &env.n,
        &[gitops_deployment(&images.app, true), service("gitops")],
    )
    .await?;
    rollout(env.cluster, &env.n, "gitops").await?;
    env.assert_injected("gitops", 2).await?;
    let url = format!(
        "http://{}/",
        cluster_ip(env.cluster, &env.n, "gitops").await?
    );
    let mut connect = env.connect("deployment/gitops")?;
    env.first_answer(&url, "laptop", Instant::now())
        .await
        .with_context(|| format!("kips connect:\n{}", connect.log_text()))?;
    env.all_answers(&url, "laptop", 5).await?;
    // Pods rolled and serve the laptop: the stored template still carries the annotation,
    // and kips copied nothing of its own (the workload has no kips metadata annotation).
    let stored = deployments.get("gitops").await?;
    let template = stored
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.annotations.clone())
        .unwrap_or_default();
    ensure!(
        template.get("kips.io/redirect").map(String::as_str) == Some("gitops:8080"),
        "the stored template: {template:?}"
    );
    ensure!(
        !template.contains_key("kips.io/copied"),
        "the stored template: {template:?}"
    );
    ensure!(
        !stored
            .annotations()
            .keys()
            .any(|k| k.starts_with("kips.io/")),
        "the stored metadata: {:?}",
        stored.annotations()
    );
    let generation = stored.metadata.generation;

    // `kips revert` refuses and says to edit the manifest; nothing changes.
    let out = tokio::process::Command::new(KIPS)
        .args([
            "revert",
            "deployment/gitops",
            "--wait",
            "-n",
            &env.n,
            "--kubeconfig",
            &env.kubeconfig,
        ])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    say(format!(
        "lifecycle: kips revert deployment/gitops: {} {}",
        out.status,
        stderr.trim()
    ));
    ensure!(out.status.code() == Some(1), "{}: {stderr}", out.status);
    ensure!(
        stderr.trim()
            == "kips: deployment/gitops: kips.io/redirect is set in the pod template (spec.template.metadata.annotations), the GitOps way, and kips never removes it: delete it from your manifest and apply it; nothing was changed",
        "{stderr}"
    );
    let after = deployments.get("gitops").await?;
    ensure!(
        after.metadata.generation == generation,
        "revert changed the Deployment"
    );
    env.all_answers(&url, "laptop", 3).await?;

    // 7. Before the laptop goes away, every pod's sidecar has seen the listener.
    eventually("kips status to show every pod connected", WAIT, || async {
        client_get(env.cluster, &env.n, &url).await?;
        let (_, listeners) = env.listeners("deployment/gitops").await?;
        Ok(
            (listeners.len() == 2 && listeners.iter().all(|(_, l)| l.starts_with("connected")))
                .then_some(()),
        )
    })
    .await?;
    let (out, _) = env.listeners("deployment/gitops").await?;
    say(format!(
        "lifecycle: kips status deployment/gitops (laptop connected):\n{out}"
    ));

    // The laptop goes away.
    let code = connect.interrupt(Duration::from_secs(15)).await?;
    ensure!(code == Some(0), "kips connect exited {code:?}");
    let mut times = Vec::new();
    let status = eventually(
        "kips status to show no listener for every pod",
        WAIT,
        || async {
            let (ms, what) = env.timed_get(&url).await?;
            ensure!(
                what.starts_with("error") && ms < 1000,
                "without the laptop the client got {ms} ms {what}"
            );
            say(format!("lifecycle: no laptop: {ms} ms {what}"));
            let (out, listeners) = env.listeners("deployment/gitops").await?;
            Ok(
                (listeners.len() == 2 && listeners.iter().all(|(_, l)| l.starts_with("none (")))
                    .then_some(out),
            )
        },
    )
    .await;
    let status = status?;
    // A few more, all fast failures.
    for _ in 0..5 {
        let (ms, what) = env.timed_get(&url).await?;
        ensure!(
            what.starts_with("error") && ms < 1000,
            "without the laptop the client got {ms} ms {what}"
        );
        times.push(ms);
    }
    say(format!(
        "lifecycle: no laptop: the client's requests failed in {times:?} ms; kips status deployment/gitops:\n{status}"
    ));
    ensure!(status.contains("no listener"), "{status}");

    // The laptop comes back: nothing done to the cluster.
    let generation = deployments.get("gitops").await?.metadata.generation;
    let t0 = Instant::now();
    let mut connect = env.connect("deployment/gitops")?;
    let back = env
        .first_answer(&url, "laptop", t0)
        .await
        .with_context(|| format!("kips connect:\n{}", connect.log_text()))?;
    say(format!(
        "lifecycle: laptop back: the client got \"laptop\" {} ms after kips connect started",
        back.as_millis()
    ));
    ensure!(back < Duration::from_secs(10), "took {back:?}");
    env.all_answers(&url, "laptop", 5).await?;
    ensure!(
        deployments.get("gitops").await?.metadata.generation == generation,
        "the Deployment changed"
    );
    env.assert_injected("gitops", 2).await?;

    // The GitOps revert: the manifest without the annotation.
    apply(
        env.cluster,
        &env.n,
        &[gitops_deployment(&images.app, false)],
    )
    .await?;
    env.first_answer(&url, "cluster gitops-", Instant::now())
        .await?;
    let code = connect.interrupt(Duration::from_secs(15)).await?;
    ensure!(code == Some(0), "kips connect exited {code:?}");
    rollout(env.cluster, &env.n, "gitops").await?;
    env.wait_plain("gitops", 2).await?;
    env.all_answers(&url, "cluster gitops-", 10).await?;
    let out = tokio::process::Command::new(KIPS)
        .args(["status", "-n", &env.n, "--kubeconfig", &env.kubeconfig])
        .output()
        .await?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.status.success() && text.contains("No redirected workloads in namespace"),
        "{text}"
    );
    Ok(())
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
