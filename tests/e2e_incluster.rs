//! kips installed in the cluster by Helm, on a real node (issue 14, scenarios 8 and 9): the
//! chart's defaults (two replicas, self-managed certificates) with the images built here.
//!
//! 8. `helm install kips charts/kips`: both webhook pods Ready, the caBundle patched in; the
//!    user's story works through it (annotated Deployment injected, the client pod gets
//!    "laptop" through `kips connect`). One replica force-deleted while an annotated
//!    Deployment rolls: every pod of the rollout admitted and injected, no FailedCreate.
//!    Both replicas scaled to zero: a plain Deployment in another namespace runs; a kips
//!    workload's new pod is refused (FailedCreate naming pods.kips.io) and `kubectl
//!    annotate` is refused naming workloads.kips.io; back at two replicas, the refused pod
//!    is created and injected.
//! 9. `kips certs rotate -n kips-system` while an annotated Deployment rolls: no admission
//!    fails; both replicas then serve the new certificate from the Secret, trusted by the
//!    caBundle under the Service's name, and a further rollout is admitted.
//!
//! It prints `in-cluster: ...` timings. Needs what the node suite needs (tests/e2e_node.rs).

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Event, Pod, Secret};
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::json;
use support::kips_e2e::{CHART, RELEASE_NAMESPACE, eventually, helm, live_pods};
use support::laptop::{TestRelay, http_app, kips_connect};
use support::node::Cluster;
use support::scenario::{
    WAIT, apply, assert_ready_without_restarts, client_get, client_pod, cluster_ip, deployment,
    get_from_client, kips_cli, rollout, say, service, skip,
};

/// The release: `kips` makes every name `kips` (Deployment, Service, webhook configuration).
const RELEASE: &str = "kips";
const WEBHOOK_PODS: &str = "app.kubernetes.io/name=kips,app.kubernetes.io/component=webhook";
const SECRET: &str = "kips-webhook-tls";
/// The name the API server checks the served certificate against.
const SERVICE_DNS: &str = "kips.kips-system.svc";

#[tokio::test]
async fn the_helm_installed_webhook_survives_a_lost_replica_an_outage_and_a_rotation() -> Result<()>
{
    if skip() {
        return Ok(());
    }
    let cluster = Cluster::start().await?;
    let outcome = scenarios(&cluster).await;
    if outcome.is_err() {
        eprintln!("{}", diagnostics(&cluster).await);
        eprintln!("{}", cluster.log_tails(40));
    }
    let report = cluster.stop();
    outcome?;
    report.assert_clean()?;
    Ok(())
}

async fn scenarios(cluster: &Cluster) -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("kips-incluster-")
        .tempdir()?;
    let relay = TestRelay::start(
        cluster.host_address(),
        dir.path(),
        &["api", "roll", "down", "rot"],
    )
    .await?;

    let t0 = Instant::now();
    install(cluster).await?;
    let bundle = webhook_ready(cluster, 2).await?;
    say(format!(
        "in-cluster: helm install to 2 Ready replicas with the caBundle {:.1} s",
        t0.elapsed().as_secs_f64()
    ));
    for pod in webhook_pods(cluster).await? {
        served_cert(&pod, &bundle).await?;
    }

    story(cluster, &relay, dir.path()).await?;
    lost_replica(cluster, &relay).await?;
    outage(cluster, &relay).await?;
    rotation(cluster, &relay).await?;

    // What the replicas complained about (RBAC, the API server, the Secret), if anything.
    let logs = cluster
        .kubectl(&[
            "-n",
            RELEASE_NAMESPACE,
            "logs",
            "-l",
            WEBHOOK_PODS,
            "--prefix",
            "--tail=-1",
        ])
        .await?;
    let complaints: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect();
    say(format!(
        "in-cluster: webhook log lines {}, warnings and errors {}:\n{}",
        logs.lines().count(),
        complaints.len(),
        complaints.join("\n")
    ));
    ensure!(
        !logs.contains("forbidden"),
        "a replica was refused by RBAC:\n{logs}"
    );
    Ok(())
}

/// `helm install kips charts/kips -n kips-system` with the images built here.
async fn install(cluster: &Cluster) -> Result<()> {
    let images = cluster.images();
    let (repo, tag) = split_image(&images.kips)?;
    let (init_repo, init_tag) = split_image(&images.kips_init)?;
    let sets = [
        format!("image.repository={repo}"),
        format!("image.tag={tag}"),
        "image.pullPolicy=Never".to_owned(),
        "injection.bridge.engine=kips".to_owned(),
        format!("injection.initImage.repository={init_repo}"),
        format!("injection.initImage.tag={init_tag}"),
        "injection.imagePullPolicy=Never".to_owned(),
        "replicaCount=2".to_owned(),
        // Replicas re-read the Secret every 5 s (default 30 s), so that scenario 9's rotation
        // is picked up while its rollout still runs.
        "certs.self.checkInterval=5s".to_owned(),
        // And a CA rotation's steps come 10 s apart (default 10 min; the least for 5 s).
        "certs.self.rotationOverlap=10s".to_owned(),
        "webhook.logFormat=text".to_owned(),
    ];
    let mut args = vec![
        "install",
        RELEASE,
        CHART,
        "-n",
        RELEASE_NAMESPACE,
        "--create-namespace",
    ];
    for set in &sets {
        args.extend(["--set", set.as_str()]);
    }
    helm(cluster.control_plane(), &args).await?;
    Ok(())
}

fn split_image(image: &str) -> Result<(&str, &str)> {
    image
        .rsplit_once(':')
        .with_context(|| format!("image {image} has no tag"))
}

/// Waits until `replicas` webhook pods are Ready (and no other is left) and both webhooks of
/// the configuration carry the same non-empty caBundle; returns it (PEM).
async fn webhook_ready(cluster: &Cluster, replicas: usize) -> Result<String> {
    let client = cluster.client()?;
    eventually(&format!("{replicas} Ready webhook pods"), WAIT, || async {
        let pods = Api::<Pod>::namespaced(client.clone(), RELEASE_NAMESPACE)
            .list(&ListParams::default().labels(WEBHOOK_PODS))
            .await?
            .items;
        Ok((pods.len() == replicas && pods.iter().all(is_ready)).then_some(()))
    })
    .await?;
    eventually("the caBundle in both webhooks", WAIT, || async {
        let config = Api::<MutatingWebhookConfiguration>::all(client.clone())
            .get(RELEASE)
            .await?;
        let bundles: Vec<String> = config
            .webhooks
            .iter()
            .flatten()
            .map(|w| {
                w.client_config
                    .ca_bundle
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                    .unwrap_or_default()
            })
            .collect();
        Ok((bundles.len() == 2
            && bundles.iter().all(|b| b.contains("BEGIN CERTIFICATE"))
            && bundles[0] == bundles[1])
            .then(|| bundles[0].clone()))
    })
    .await
}

fn is_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

async fn webhook_pods(cluster: &Cluster) -> Result<Vec<Pod>> {
    live_pods(&cluster.client()?, RELEASE_NAMESPACE, WEBHOOK_PODS).await
}

/// The leaf certificate `pod` serves on :8443, in a handshake that trusts only `bundle` and
/// checks the Service's name, as the API server does.
async fn served_cert(pod: &Pod, bundle: &str) -> Result<Vec<u8>> {
    let ip = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .with_context(|| format!("{} has no IP", pod.name_any()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(bundle.as_bytes()) {
        roots.add(cert?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect((ip.as_str(), 8443)),
    )
    .await
    .with_context(|| format!("connecting to {ip}:8443"))??;
    let tls = connector
        .connect(ServerName::try_from(SERVICE_DNS)?, tcp)
        .await
        .with_context(|| {
            format!(
                "TLS handshake with {} ({ip}) as {SERVICE_DNS} trusting the caBundle",
                pod.name_any()
            )
        })?;
    Ok(tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .context("no certificate served")?
        .to_vec())
}

/// The served certificate in the Secret (DER).
async fn secret_cert(client: &Client) -> Result<Vec<u8>> {
    let secret = Api::<Secret>::namespaced(client.clone(), RELEASE_NAMESPACE)
        .get(SECRET)
        .await?;
    let pem = secret
        .data
        .as_ref()
        .and_then(|d| d.get("tls.crt"))
        .context("no tls.crt in the Secret")?;
    Ok(CertificateDer::from_pem_slice(&pem.0)?.to_vec())
}

/// Scenario 8's story: the annotated Deployment's pods are injected by the in-cluster kips,
/// and the client pod reaches the laptop through the Service.
async fn story(cluster: &Cluster, relay: &TestRelay, dir: &std::path::Path) -> Result<()> {
    let client = cluster.client()?;
    let images = cluster.images();
    let n = &cluster.control_plane().create_namespace("story").await?;
    relay.create_secret(&client, n).await?;
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

    let t0 = Instant::now();
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
    let port_map = format!("8080={}", http_app("laptop").await?);
    let mut connect = kips_connect(
        dir,
        cluster.kubeconfig(),
        n,
        "deployment/api",
        &["--port-map", &port_map],
    )?;
    let reached = eventually("the client to get \"laptop\"", WAIT, || async {
        Ok(client_get(cluster, n, &url)
            .await
            .ok()
            .filter(|a| a == "laptop")
            .map(|_| t0.elapsed()))
    })
    .await
    .with_context(|| format!("kips connect:\n{}", connect.log_text()))?;
    rollout(cluster, n, "api").await?;
    let pods = live_pods(&client, n, "app=api").await?;
    ensure!(pods.len() == 2, "{} api pods", pods.len());
    assert_injected(&pods)?;
    for _ in 0..10 {
        let answer = client_get(cluster, n, &url).await?;
        ensure!(
            answer == "laptop",
            "redirected, the Service answered {answer:?}"
        );
    }
    let code = connect.interrupt(Duration::from_secs(15)).await?;
    ensure!(
        code == Some(0),
        "kips connect exited {code:?}:\n{}",
        connect.log_text()
    );
    assert_no_failed_creates(&client, n).await?;
    // kips recorded the redirection on the Deployment (its Events RBAC works in-cluster).
    let events = Api::<Event>::namespaced(client.clone(), n);
    eventually("kips' RedirectOn Event on deployment api", WAIT, || async {
        Ok(events
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some("RedirectOn")
                    && e.involved_object.name.as_deref() == Some("api")
            })
            .then_some(()))
    })
    .await?;
    say(format!(
        "in-cluster: redirect-to-laptop {:.1} s through the Helm-installed webhook",
        reached.as_secs_f64()
    ));
    Ok(())
}

/// Every pod carries kips' status annotation and its kips-init and kips-bridge containers.
fn assert_injected(pods: &[Pod]) -> Result<()> {
    for pod in pods {
        ensure!(
            pod.annotations().contains_key("kips.io/status"),
            "{} is not injected",
            pod.name_any()
        );
        let inits: Vec<&str> = pod
            .spec
            .iter()
            .flat_map(|s| s.init_containers.iter().flatten())
            .map(|c| c.name.as_str())
            .collect();
        ensure!(
            inits.contains(&"kips-init") && inits.contains(&"kips-bridge"),
            "{} has init containers {inits:?}",
            pod.name_any()
        );
    }
    Ok(())
}

/// The messages of the FailedCreate Events in `ns`.
async fn failed_creates(client: &Client, ns: &str) -> Result<Vec<String>> {
    Ok(Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("FailedCreate"))
        .map(|e| e.message.unwrap_or_default())
        .collect())
}

async fn assert_no_failed_creates(client: &Client, ns: &str) -> Result<()> {
    let failed = failed_creates(client, ns).await?;
    ensure!(
        failed.is_empty(),
        "FailedCreate in {ns}:\n  {}",
        failed.join("\n  ")
    );
    Ok(())
}

/// An annotated Deployment `name` of `replicas` pods in a new namespace, rolled out and
/// injected; returns the namespace.
async fn annotated(
    cluster: &Cluster,
    relay: &TestRelay,
    name: &str,
    replicas: i32,
) -> Result<String> {
    let client = cluster.client()?;
    let n = cluster.control_plane().create_namespace(name).await?;
    relay.create_secret(&client, &n).await?;
    let redirect = format!("{name}:8080");
    let mut workload = deployment(
        name,
        replicas,
        &cluster.images().app,
        json!({"kips.io/redirect": redirect}),
    );
    // One new pod at a time: a rollout lasts long enough for a webhook replica to go, or a
    // certificate to change, in its middle.
    workload["spec"]["strategy"] =
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}});
    apply(cluster, &n, &[workload]).await?;
    rollout(cluster, &n, name).await?;
    assert_injected(&live_pods(&client, &n, &format!("app={name}")).await?)?;
    Ok(n)
}

/// Waits until the rollout `kubectl rollout restart` began has created a pod.
async fn restart_begun(cluster: &Cluster, n: &str, name: &str, before: &[String]) -> Result<()> {
    let client = cluster.client()?;
    eventually("the rollout's first new pod", WAIT, || async {
        let pods = live_pods(&client, n, &format!("app={name}")).await?;
        Ok(pods
            .iter()
            .any(|p| !before.contains(&p.name_any()))
            .then_some(()))
    })
    .await
}

async fn pod_names(client: &Client, n: &str, name: &str) -> Result<Vec<String>> {
    Ok(live_pods(client, n, &format!("app={name}"))
        .await?
        .iter()
        .map(ResourceExt::name_any)
        .collect())
}

/// After a rollout of `name`: `replicas` pods, none from before, all injected, no
/// FailedCreate in the namespace.
async fn assert_rolled(
    cluster: &Cluster,
    n: &str,
    name: &str,
    replicas: usize,
    before: &[String],
) -> Result<()> {
    let client = cluster.client()?;
    rollout(cluster, n, name).await?;
    let pods = live_pods(&client, n, &format!("app={name}")).await?;
    ensure!(pods.len() == replicas, "{} {name} pods", pods.len());
    for pod in &pods {
        ensure!(
            !before.contains(&pod.name_any()),
            "{} is from before the rollout",
            pod.name_any()
        );
    }
    assert_injected(&pods)?;
    assert_no_failed_creates(&client, n).await
}

/// One webhook replica deleted while 4 annotated pods roll: `--grace-period=0` (which kubectl
/// turns into 1 s: SIGTERM, then SIGKILL a second later, before kips' shutdown delay ends),
/// then `--grace-period=0 --force` (the pod object goes at once, the container is killed).
async fn lost_replica(cluster: &Cluster, relay: &TestRelay) -> Result<()> {
    let client = cluster.client()?;
    let n = &annotated(cluster, relay, "roll", 4).await?;
    for how in [
        &["--grace-period=0"][..],
        &["--grace-period=0", "--force"][..],
    ] {
        let before = pod_names(&client, n, "roll").await?;
        let victim = webhook_pods(cluster)
            .await?
            .first()
            .context("no webhook pod")?
            .name_any();
        let t0 = Instant::now();
        cluster
            .kubectl(&["-n", n, "rollout", "restart", "deployment/roll"])
            .await?;
        restart_begun(cluster, n, "roll", &before).await?;
        let mut delete = vec!["-n", RELEASE_NAMESPACE, "delete", "pod", victim.as_str()];
        delete.extend(how);
        cluster.kubectl(&delete).await?;
        let at_kill = pod_names(&client, n, "roll").await?;
        assert_rolled(cluster, n, "roll", 4, &before).await?;
        let after_kill = pod_names(&client, n, "roll")
            .await?
            .into_iter()
            .filter(|p| !at_kill.contains(p))
            .count();
        ensure!(
            after_kill > 0,
            "every pod of the rollout was created before {victim} was deleted"
        );
        say(format!(
            "in-cluster: rollout of 4 with webhook pod {victim} deleted ({}) {:.1} s, {after_kill} pods admitted after the deletion, no FailedCreate",
            how.join(" "),
            t0.elapsed().as_secs_f64()
        ));
        webhook_ready(cluster, 2).await?;
    }
    Ok(())
}

/// Both replicas scaled to zero: plain pods elsewhere run, kips' pods and annotations are
/// refused naming the webhook; back at two, the refused pod is created.
async fn outage(cluster: &Cluster, relay: &TestRelay) -> Result<()> {
    let client = cluster.client()?;
    let n = &annotated(cluster, relay, "down", 1).await?;
    scale_webhook(cluster, 0).await?;
    let all = Api::<Pod>::namespaced(client.clone(), RELEASE_NAMESPACE);
    eventually("no webhook pod left", WAIT, || async {
        Ok(all
            .list(&ListParams::default().labels(WEBHOOK_PODS))
            .await?
            .items
            .is_empty()
            .then_some(()))
    })
    .await?;

    // Anything without a kips annotation is never sent to kips.
    let plain = &cluster.control_plane().create_namespace("plain").await?;
    apply(
        cluster,
        plain,
        &[deployment("plain", 2, &cluster.images().app, json!({}))],
    )
    .await?;
    rollout(cluster, plain, "plain").await?;
    let pods = live_pods(&client, plain, "app=plain").await?;
    ensure!(pods.len() == 2 && pods.iter().all(is_ready), "{pods:?}");
    assert_no_failed_creates(&client, plain).await?;

    // A kips workload's new pod: FailedCreate naming pods.kips.io.
    cluster
        .kubectl(&["-n", n, "scale", "deployment/down", "--replicas=2"])
        .await?;
    let refused = eventually("a FailedCreate of down's new pod", WAIT, || async {
        Ok(failed_creates(&client, n).await?.into_iter().next())
    })
    .await?;
    ensure!(
        refused.contains("failed calling webhook \"pods.kips.io\""),
        "FailedCreate: {refused}"
    );
    ensure!(live_pods(&client, n, "app=down").await?.len() == 1);
    // kubectl annotate of a kips workload: refused naming workloads.kips.io.
    let annotate = cluster
        .kubectl(&[
            "-n",
            n,
            "annotate",
            "deployment",
            "down",
            "kips.io/redirect-",
        ])
        .await;
    let error = match annotate {
        Ok(out) => bail!("kubectl annotate succeeded with kips down: {out}"),
        Err(e) => format!("{e:#}"),
    };
    ensure!(
        error.contains("failed calling webhook \"workloads.kips.io\""),
        "kubectl annotate: {error}"
    );
    say(format!(
        "in-cluster: with 0 replicas, plain pods run; refused: {refused}"
    ));

    scale_webhook(cluster, 2).await?;
    webhook_ready(cluster, 2).await?;
    eventually("down's refused pod, created", WAIT, || async {
        Ok((live_pods(&client, n, "app=down").await?.len() == 2).then_some(()))
    })
    .await?;
    rollout(cluster, n, "down").await?;
    assert_injected(&live_pods(&client, n, "app=down").await?)?;
    Ok(())
}

async fn scale_webhook(cluster: &Cluster, replicas: u32) -> Result<()> {
    cluster
        .kubectl(&[
            "-n",
            RELEASE_NAMESPACE,
            "scale",
            "deployment/kips",
            &format!("--replicas={replicas}"),
        ])
        .await?;
    Ok(())
}

/// `kips certs rotate` while 4 annotated pods roll.
async fn rotation(cluster: &Cluster, relay: &TestRelay) -> Result<()> {
    let client = cluster.client()?;
    let n = &annotated(cluster, relay, "rot", 4).await?;
    let old = secret_cert(&client).await?;
    let bundle = webhook_ready(cluster, 2).await?;
    for pod in webhook_pods(cluster).await? {
        ensure!(
            served_cert(&pod, &bundle).await? == old,
            "{} serves another certificate than the Secret's",
            pod.name_any()
        );
    }

    let before = pod_names(&client, n, "rot").await?;
    let t0 = Instant::now();
    cluster
        .kubectl(&["-n", n, "rollout", "restart", "deployment/rot"])
        .await?;
    restart_begun(cluster, n, "rot", &before).await?;
    let kubeconfig = cluster.kubeconfig().display().to_string();
    let out = kips_cli(&[
        "certs",
        "rotate",
        "-n",
        RELEASE_NAMESPACE,
        "--kubeconfig",
        &kubeconfig,
    ])
    .await?;
    say(format!(
        "in-cluster: kips certs rotate:\n{}",
        out.trim_end()
    ));
    let new = secret_cert(&client).await?;
    ensure!(new != old, "the Secret's certificate did not change");
    // Each replica swaps at its next check (5 s): both serve the new certificate, trusted
    // under the Service's name by the caBundle the API server uses.
    let swapped = eventually(
        "both replicas to serve the new certificate",
        WAIT,
        || async {
            let bundle = webhook_ready(cluster, 2).await?;
            for pod in webhook_pods(cluster).await? {
                if served_cert(&pod, &bundle).await? != new {
                    return Ok(None);
                }
            }
            Ok(Some(t0.elapsed()))
        },
    )
    .await?;
    let at_swap = pod_names(&client, n, "rot").await?;
    assert_rolled(cluster, n, "rot", 4, &before).await?;
    let after_swap = pod_names(&client, n, "rot")
        .await?
        .into_iter()
        .filter(|p| !at_swap.contains(p))
        .count();
    ensure!(
        after_swap > 0,
        "the rollout ended before both replicas served the new certificate"
    );
    say(format!(
        "in-cluster: rotation mid-rollout, new certificate served after {:.1} s, {after_swap} pods admitted after that, rollout done {:.1} s, no FailedCreate",
        swapped.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    ));

    // The API server calls the webhook with the new certificate: another rollout.
    let before = pod_names(&client, n, "rot").await?;
    cluster
        .kubectl(&["-n", n, "rollout", "restart", "deployment/rot"])
        .await?;
    assert_rolled(cluster, n, "rot", 4, &before).await?;
    let status = kips_cli(&[
        "certs",
        "status",
        "-n",
        RELEASE_NAMESPACE,
        "--kubeconfig",
        &kubeconfig,
    ])
    .await?;
    ensure!(
        status.matches("trusts the served certificate").count() == 2,
        "kips certs status:\n{status}"
    );
    ca_rotation(cluster, n).await?;
    for pod in webhook_pods(cluster).await? {
        assert_ready_without_restarts(&pod)?;
    }
    Ok(())
}

/// `kips certs rotate --ca`: the new CA joins the caBundle, signs after the overlap (10 s),
/// the old CA leaves it an overlap later. Rollouts of `rot` run back to back all along;
/// none has an admission fail.
async fn ca_rotation(cluster: &Cluster, n: &str) -> Result<()> {
    let client = cluster.client()?;
    let old_bundle = webhook_ready(cluster, 2).await?;
    let kubeconfig = cluster.kubeconfig().display().to_string();
    let t0 = Instant::now();
    let out = kips_cli(&[
        "certs",
        "rotate",
        "--ca",
        "-n",
        RELEASE_NAMESPACE,
        "--kubeconfig",
        &kubeconfig,
    ])
    .await?;
    say(format!(
        "in-cluster: kips certs rotate --ca:\n{}",
        out.trim_end()
    ));
    let mut rollouts = 0;
    let mut saw_both_trusted = false;
    loop {
        ensure!(
            t0.elapsed() < Duration::from_secs(180),
            "the CA rotation did not end within 180 s ({rollouts} rollouts)"
        );
        let before = pod_names(&client, n, "rot").await?;
        cluster
            .kubectl(&["-n", n, "rollout", "restart", "deployment/rot"])
            .await?;
        assert_rolled(cluster, n, "rot", 4, &before).await?;
        rollouts += 1;
        let bundle = webhook_ready(cluster, 2).await?;
        let cas = CertificateDer::pem_slice_iter(bundle.as_bytes()).count();
        saw_both_trusted |= cas == 2;
        let served = secret_cert(&client).await?;
        let mut all_new = cas == 1 && bundle != old_bundle;
        for pod in webhook_pods(cluster).await? {
            all_new &= served_cert(&pod, &bundle).await? == served;
        }
        if all_new {
            break;
        }
    }
    ensure!(
        saw_both_trusted,
        "no rollout ran while old and new CA were both trusted"
    );
    say(format!(
        "in-cluster: CA rotation done in {:.1} s across {rollouts} rollouts of 4, no FailedCreate",
        t0.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// The webhook pods, their logs and the Events of the release namespace.
async fn diagnostics(cluster: &Cluster) -> String {
    let mut out = String::new();
    for args in [
        &[
            "-n",
            RELEASE_NAMESPACE,
            "get",
            "pods,endpointslices",
            "-o",
            "wide",
        ][..],
        &["-n", RELEASE_NAMESPACE, "describe", "pods"][..],
        &[
            "-n",
            RELEASE_NAMESPACE,
            "logs",
            "-l",
            WEBHOOK_PODS,
            "--prefix",
            "--tail=60",
        ][..],
        &["get", "events", "-A"][..],
    ] {
        out += &format!("--- kubectl {}\n", args.join(" "));
        out += &match cluster.kubectl(args).await {
            Ok(text) => text,
            Err(e) => format!("{e:#}"),
        };
        out += "\n";
    }
    out
}
