//! kips as the API server sees it (issue 3, and Pod Security of issue 5): a real
//! kube-apiserver, kube-controller-manager and etcd (tests/support/control_plane.rs), the
//! webhook as a local `kips webhook` process, and the MutatingWebhookConfiguration rendered
//! by the chart for a webhook outside the cluster, so the chart's rules, matchConditions,
//! failure policies and timeouts are what is tested. Every assertion is on objects read
//! back from the API server, or on its answers.
//!
//! One control plane for the binary. Each webhook process has its own configuration,
//! scoped to the namespaces labelled for it (`support::kips_e2e::SCOPE_LABEL`), so tests run
//! concurrently: stopping one webhook, or reading another's request counters, cannot
//! disturb a neighbour. There is no scheduler or kubelet: controller-made pods stay Pending,
//! unless a test runs the `FakeKubelet`, which marks them Ready so that rollouts finish.

mod support;

use support::args;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::core::v1::{Container, LimitRange, Pod};
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use support::control_plane::{self, ControlPlane};
use support::kips_e2e::{
    FakeKubelet, KipsWebhook, SCOPE_LABEL, annotate, api_error_message, deployment,
    deployment_json, eventually, live_pods, register_chart_webhook, wait_available,
};

/// Cluster hooks (warnings and Events that read the cluster) are e2e_dev's subject; here the
/// webhook's answers depend on the request alone.
const FLAGS: &[&str] = &["--cluster-hooks=off"];
const BRIDGE_IMAGE: &str = "ghcr.io/kips-dev/azbridge:0.16.1";
const INIT_IMAGE: &str = concat!("ghcr.io/kips-dev/kips-init:", env!("CARGO_PKG_VERSION"));
const REDIRECT_FORM: &str = "(expected <relay>:<port>[/udp][,...] or <port>)";
const WAIT: Duration = Duration::from_secs(60);

/// The control plane and the webhook most tests share (the default injection flags: port
/// mode auto, native sidecar), started once per test binary.
async fn shared_kips() -> Result<(&'static ControlPlane, &'static KipsWebhook)> {
    static KIPS: tokio::sync::OnceCell<Result<KipsWebhook, String>> =
        tokio::sync::OnceCell::const_new();
    let cp = control_plane::shared().await?;
    let kips = KIPS
        .get_or_init(|| async {
            KipsWebhook::start(cp, "kips", Some("shared"), FLAGS)
                .await
                .map_err(|e| format!("{e:#}"))
        })
        .await
        .as_ref()
        .map_err(|e| anyhow::anyhow!("the shared kips webhook did not start: {e}"))?;
    Ok((cp, kips))
}

// ---------------------------------------------------------------------------------------
// Reading pods

fn containers<'p>(pod: &'p Pod) -> (Vec<&'p str>, Vec<&'p str>) {
    let spec = pod.spec.as_ref().expect("a pod has a spec");
    let names = |list: Option<&'p Vec<Container>>| {
        list.into_iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>()
    };
    (
        names(spec.init_containers.as_ref()),
        names(Some(&spec.containers)),
    )
}

fn container<'p>(pod: &'p Pod, name: &str) -> Result<&'p Container> {
    let spec = pod.spec.as_ref().context("a pod without spec")?;
    spec.init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .find(|c| c.name == name)
        .with_context(|| format!("pod {} has no container {name}", pod.name_any()))
}

/// The annotations of `meta` under `kips.io/`.
fn kips_annotations(meta: &ObjectMeta) -> BTreeMap<String, String> {
    meta.annotations
        .iter()
        .flatten()
        .filter(|(k, _)| k.starts_with("kips.io/"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn template_annotations(deployment: &Deployment) -> BTreeMap<String, String> {
    deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.annotations.clone())
        .unwrap_or_default()
}

fn strings(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// `kips.io/status`, parsed.
fn injection_status(pod: &Pod) -> Result<Value> {
    let text = pod
        .annotations()
        .get("kips.io/status")
        .with_context(|| format!("pod {} carries no kips.io/status", pod.name_any()))?;
    Ok(serde_json::from_str(text)?)
}

fn is_injected(pod: &Pod) -> bool {
    pod.annotations().contains_key("kips.io/status")
}

/// Nothing of kips: no kips container and no kips.io/ annotation but the user's `allowed`.
fn ensure_plain(pod: &Pod, allowed: &BTreeMap<String, String>) -> Result<()> {
    let (init, main) = containers(pod);
    ensure!(
        init.iter().chain(&main).all(|c| !c.starts_with("kips-")),
        "pod {} carries kips containers: {init:?} {main:?}",
        pod.name_any()
    );
    let kips = kips_annotations(&pod.metadata);
    ensure!(
        &kips == allowed,
        "pod {} carries kips annotations {kips:?} (expected {allowed:?})",
        pod.name_any()
    );
    Ok(())
}

fn pod(value: Value) -> Pod {
    serde_json::from_value(value).expect("a valid Pod")
}

/// Waits until the live pods matching `selector` are exactly `count` and all satisfy `check`.
async fn wait_for_pods(
    client: &Client,
    ns: &str,
    selector: &str,
    count: usize,
    what: &str,
    check: impl Fn(&Pod) -> bool,
) -> Result<Vec<Pod>> {
    eventually(&format!("{count} pods {selector} {what}"), WAIT, || async {
        let pods = live_pods(client, ns, selector).await?;
        Ok((pods.len() == count && pods.iter().all(&check)).then_some(pods))
    })
    .await
}

// ---------------------------------------------------------------------------------------
// 1 and 2: annotate, then remove the annotation

/// Checks a pod of deployment/api redirected with `api:8080` in iptables mode.
fn ensure_injected_api_pod(pod: &Pod) -> Result<()> {
    let name = pod.name_any();
    assert_eq!(
        containers(pod),
        (vec!["kips-init", "kips-bridge"], vec!["app"]),
        "{name}"
    );
    let bridge = container(pod, "kips-bridge")?;
    assert_eq!(
        args(bridge),
        [
            "-x",
            "$(KIPS_RELAY_CONNECTION_STRING)",
            "-L",
            "0.0.0.0:15100/8080:api"
        ],
        "{name}"
    );
    assert_eq!(bridge.image.as_deref(), Some(BRIDGE_IMAGE));
    assert_eq!(bridge.restart_policy.as_deref(), Some("Always"), "{name}");
    let env = bridge.env.as_ref().context("kips-bridge without env")?;
    let secret = env
        .iter()
        .find(|e| e.name == "KIPS_RELAY_CONNECTION_STRING")
        .and_then(|e| e.value_from.as_ref()?.secret_key_ref.as_ref())
        .context("no connection string from a Secret")?;
    // The user's own kips.io/relay-secret in the template names it.
    assert_eq!(
        (secret.name.as_str(), secret.key.as_str()),
        ("api-relay", "connectionString")
    );
    let ports: Vec<(Option<&str>, i32)> = bridge
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.as_deref(), p.container_port))
        .collect();
    assert_eq!(ports, [(Some("kips-15100"), 15100)], "{name}");

    let init = container(pod, "kips-init")?;
    assert_eq!(
        args(init),
        [
            "init-net",
            "--redirect",
            "8080/tcp=15100",
            "--node-ips=$(KIPS_NODE_IPS)",
            "--ipv6=false"
        ],
        "{name}"
    );
    assert_eq!(init.image.as_deref(), Some(INIT_IMAGE));
    let capabilities = init
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.as_ref())
        .context("kips-init without capabilities")?;
    assert_eq!(
        capabilities.add.as_deref(),
        Some(&["NET_ADMIN".to_owned(), "NET_RAW".to_owned()][..])
    );

    let status = injection_status(pod)?;
    assert_eq!(status["portMode"], "iptables", "{status}");
    assert_eq!(status["sidecar"], "native", "{status}");
    assert_eq!(status["redirects"], json!(["8080/tcp=15100"]), "{status}");
    let mut annotations = kips_annotations(&pod.metadata);
    annotations.remove("kips.io/status");
    assert_eq!(
        annotations,
        strings(&[
            ("kips.io/copied", "redirect"),
            ("kips.io/redirect", "api:8080"),
            ("kips.io/relay-secret", "api-relay"),
        ]),
        "{name}"
    );
    assert_eq!(
        pod.annotations()
            .get("example.com/team")
            .map(String::as_str),
        Some("payments")
    );
    Ok(())
}

fn template_hash(rs: &ReplicaSet) -> String {
    rs.labels()
        .get("pod-template-hash")
        .cloned()
        .unwrap_or_default()
}

#[tokio::test]
async fn annotating_a_deployment_rolls_out_injected_pods_and_removing_it_rolls_back_to_plain_ones()
-> Result<()> {
    let (cp, kips) = shared_kips().await?;
    let client = cp.client()?;
    let ns = kips.namespace(cp, "annotate", &[]).await?;
    let api = Api::<Deployment>::namespaced(client.clone(), &ns);
    let replica_sets = Api::<ReplicaSet>::namespaced(client.clone(), &ns);

    // The user's own template annotations, one of them kips': kips must leave both alone.
    let user_template = strings(&[
        ("example.com/team", "payments"),
        ("kips.io/relay-secret", "api-relay"),
    ]);
    let mut manifest = deployment_json("api", 2, 8080);
    manifest["spec"]["template"]["metadata"]["annotations"] = json!(user_template);
    api.create(&PostParams::default(), &serde_json::from_value(manifest)?)
        .await?;
    let _kubelet = FakeKubelet::start(client.clone(), &ns);
    wait_available(&client, &ns, "api", 2).await?;
    let plain = live_pods(&client, &ns, "app=api").await?;
    for pod in &plain {
        ensure_plain(pod, &strings(&[("kips.io/relay-secret", "api-relay")]))?;
    }
    let first_pods: BTreeSet<String> = plain.iter().map(|p| p.name_any()).collect();
    let first_rs = replica_sets.list(&Default::default()).await?.items;
    ensure!(first_rs.len() == 1, "{} ReplicaSets", first_rs.len());
    let plain_hash = template_hash(&first_rs[0]);

    // 1. kubectl annotate deployment api kips.io/redirect=api:8080
    let annotated = annotate::<Deployment>(
        &client,
        &ns,
        "api",
        &[("kips.io/redirect", Some("api:8080"))],
    )
    .await?
    .object;
    let mut expected_template = user_template.clone();
    expected_template.extend(strings(&[
        ("kips.io/redirect", "api:8080"),
        ("kips.io/copied", "redirect"),
    ]));
    assert_eq!(template_annotations(&annotated), expected_template);
    let stored = api.get("api").await?;
    assert_eq!(template_annotations(&stored), expected_template);
    assert_eq!(
        kips_annotations(&stored.metadata),
        strings(&[("kips.io/redirect", "api:8080")])
    );

    // A new ReplicaSet of that template, whose pods the controller-manager made injected.
    let injected_rs = eventually("a ReplicaSet of the annotated template", WAIT, || async {
        let list = replica_sets.list(&Default::default()).await?;
        Ok(list.items.into_iter().find(|rs| {
            template_hash(rs) != plain_hash
                && rs
                    .spec
                    .as_ref()
                    .and_then(|s| s.template.as_ref()?.metadata.as_ref()?.annotations.clone())
                    .unwrap_or_default()
                    == expected_template
        }))
    })
    .await?;
    let injected_hash = template_hash(&injected_rs);
    wait_available(&client, &ns, "api", 2).await?;
    let pods = live_pods(&client, &ns, "app=api").await?;
    ensure!(pods.len() == 2, "{} pods", pods.len());
    for pod in &pods {
        ensure!(
            pod.labels().get("pod-template-hash") == Some(&injected_hash),
            "pod {} is not of the new ReplicaSet",
            pod.name_any()
        );
        ensure_injected_api_pod(pod)?;
    }

    // 2. kubectl annotate deployment api kips.io/redirect-
    let reverted = annotate::<Deployment>(&client, &ns, "api", &[("kips.io/redirect", None)])
        .await?
        .object;
    assert_eq!(template_annotations(&reverted), user_template);
    ensure!(kips_annotations(&reverted.metadata).is_empty());
    wait_available(&client, &ns, "api", 2).await?;
    let pods = wait_for_pods(&client, &ns, "app=api", 2, "without kips", |p| {
        !is_injected(p)
    })
    .await?;
    for pod in &pods {
        ensure_plain(pod, &strings(&[("kips.io/relay-secret", "api-relay")]))?;
        assert_eq!(
            pod.annotations()
                .get("example.com/team")
                .map(String::as_str),
            Some("payments")
        );
        // New pods of the user's own template again: the same hash as before kips.
        ensure!(!first_pods.contains(&pod.name_any()), "an old pod survived");
        assert_eq!(pod.labels().get("pod-template-hash"), Some(&plain_hash));
    }
    assert_eq!(template_annotations(&api.get("api").await?), user_template);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 3. Bad values

/// The Deployment once its controller has stopped writing to it (the revision annotation
/// and the status follow every change): later reads differ only if someone else wrote.
async fn settled(api: &Api<Deployment>, name: &str) -> Result<Deployment> {
    let deadline = Instant::now() + WAIT;
    let mut previous = api.get(name).await?;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let current = api.get(name).await?;
        let observed = current.status.as_ref().and_then(|s| s.observed_generation)
            == current.metadata.generation;
        if observed && current.metadata.resource_version == previous.metadata.resource_version {
            return Ok(current);
        }
        ensure!(
            Instant::now() < deadline,
            "deployment/{name} kept changing for {WAIT:?}"
        );
        previous = current;
    }
}

#[tokio::test]
async fn bad_values_are_refused_with_kips_message_and_change_nothing() -> Result<()> {
    let (cp, kips) = shared_kips().await?;
    let client = cp.client()?;
    let ns = kips.namespace(cp, "bad-values", &[]).await?;
    let api = Api::<Deployment>::namespaced(client.clone(), &ns);
    api.create(&PostParams::default(), &deployment("api", 1, 8080))
        .await?;
    let before = settled(&api, "api").await?;

    for (value, problem) in [
        (
            "api:80x0",
            r#"port "80x0" is not a number 1-65535 or a port name"#,
        ),
        (":8080", r#"relay name is empty in ":8080""#),
        (
            "api:70000",
            r#"port "70000" is not a number 1-65535 or a port name"#,
        ),
    ] {
        let refused =
            annotate::<Deployment>(&client, &ns, "api", &[("kips.io/redirect", Some(value))]).await;
        let status = match refused {
            Err(kube::Error::Api(status)) => status,
            Err(other) => anyhow::bail!("kips.io/redirect={value}: {other}"),
            Ok(_) => anyhow::bail!("kips.io/redirect={value} was accepted"),
        };
        assert_eq!(
            status.message,
            format!(
                "admission webhook \"workloads.kips.io\" denied the request: kips.io/redirect: \"{value}\": {problem} {REDIRECT_FORM}"
            )
        );
        assert_eq!(status.code, 400, "{status:?}");
        // What the user owns is unchanged (the status is the controllers' to write).
        let after = api.get("api").await?;
        assert_eq!(
            after.metadata.generation, before.metadata.generation,
            "{value}"
        );
        assert_eq!(after.metadata.annotations, before.metadata.annotations);
        assert_eq!(after.metadata.labels, before.metadata.labels);
        assert_eq!(after.spec, before.spec);
    }

    // Created with a bad value: refused, and nothing is stored.
    let mut bad = deployment("bad", 1, 8080);
    bad.annotations_mut()
        .insert("kips.io/redirect".into(), "api:80x0".into());
    let message = api_error_message(api.create(&PostParams::default(), &bad).await)?;
    assert_eq!(
        message,
        format!(
            "admission webhook \"workloads.kips.io\" denied the request: kips.io/redirect: \"api:80x0\": port \"80x0\" is not a number 1-65535 or a port name {REDIRECT_FORM}"
        )
    );
    ensure!(
        api.get_opt("bad").await?.is_none(),
        "a refused Deployment exists"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 4. matchConditions: kips sees kips objects only

/// Requests counted by the webhook for `kind` and `operation`, all outcomes.
fn requests(counts: &BTreeMap<String, u64>, kind: &str, operation: &str) -> u64 {
    let (kind, operation) = (
        format!("kind=\"{kind}\""),
        format!("operation=\"{operation}\""),
    );
    counts
        .iter()
        .filter(|(labels, _)| labels.contains(&kind) && labels.contains(&operation))
        .map(|(_, n)| n)
        .sum()
}

#[tokio::test]
async fn objects_without_kips_annotations_are_never_sent_to_the_webhook() -> Result<()> {
    let cp = control_plane::shared().await?;
    // Its own webhook: no other test's requests reach these counters.
    let kips = KipsWebhook::start(cp, "kips-metrics", Some("metrics"), FLAGS).await?;
    let client = cp.client()?;
    let ns = kips.namespace(cp, "metrics", &[]).await?;
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
    let before = kips.admission_requests().await?;

    // Plain objects, including near misses of the kips.io/ prefix, created and updated, and
    // the pods the controllers make of them.
    let near_misses = json!({
        "example.com/note": "kips.io/redirect=api:8080",
        "kips.io.example.com/owner": "team-a",
    });
    pods.create(
        &PostParams::default(),
        &pod(json!({
            "metadata": {"name": "plain", "annotations": near_misses},
            "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1",
                                     "ports": [{"containerPort": 8080}]}]}
        })),
    )
    .await?;
    let mut plain = deployment_json("plain", 2, 8080);
    plain["metadata"]["annotations"] = near_misses.clone();
    plain["spec"]["template"]["metadata"]["annotations"] = near_misses.clone();
    deployments
        .create(&PostParams::default(), &serde_json::from_value(plain)?)
        .await?;
    wait_for_pods(&client, &ns, "app=plain", 2, "created", |_| true).await?;
    annotate::<Deployment>(
        &client,
        &ns,
        "plain",
        &[("example.com/owner", Some("team-b"))],
    )
    .await?;
    deployments
        .patch(
            "plain",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 3}})),
        )
        .await?;
    wait_for_pods(&client, &ns, "app=plain", 3, "created", |_| true).await?;
    // An image bump: a new ReplicaSet and its first pod.
    deployments
        .patch(
            "plain",
            &PatchParams::default(),
            &Patch::Strategic(json!({"spec": {"template": {"spec": {"containers": [
                {"name": "app", "image": "registry.invalid/app:2"}
            ]}}}})),
        )
        .await?;
    wait_for_pods(&client, &ns, "app=plain", 4, "created", |_| true).await?;
    let sts: StatefulSet = serde_json::from_value(json!({
        "metadata": {"name": "cache"},
        "spec": {
            "replicas": 1, "serviceName": "cache",
            "selector": {"matchLabels": {"app": "cache"}},
            "template": {"metadata": {"labels": {"app": "cache"}},
                         "spec": {"containers": [{"name": "cache", "image": "registry.invalid/cache:1"}]}}
        }
    }))?;
    Api::<StatefulSet>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &sts)
        .await?;
    wait_for_pods(&client, &ns, "app=cache", 1, "created", |_| true).await?;

    let after_plain = kips.admission_requests().await?;
    assert_eq!(
        after_plain,
        before,
        "kips was called for objects without kips annotations\n{}",
        kips.webhook.logs()
    );

    // kips objects do reach it: a Deployment created annotated, the plain one annotated,
    // the pods of both, and a dry run.
    let mut api_deployment = deployment("api", 1, 8080);
    api_deployment
        .annotations_mut()
        .insert("kips.io/redirect".into(), "api:8080".into());
    deployments
        .create(&PostParams::default(), &api_deployment)
        .await?;
    annotate::<Deployment>(
        &client,
        &ns,
        "plain",
        &[("kips.io/redirect", Some("plain:8080"))],
    )
    .await?;
    wait_for_pods(&client, &ns, "app=api", 1, "injected", is_injected).await?;
    eventually("an injected pod of deployment/plain", WAIT, || async {
        let pods = live_pods(&client, &ns, "app=plain").await?;
        Ok(pods.iter().any(is_injected).then_some(()))
    })
    .await?;
    let dry_run = PostParams {
        dry_run: true,
        ..Default::default()
    };
    pods.create(
        &dry_run,
        &pod(json!({
            "metadata": {"name": "dry", "annotations": {"kips.io/redirect": "api:8080"}},
            "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1"}]}
        })),
    )
    .await?;
    let injected_pods = live_pods(&client, &ns, "")
        .await?
        .iter()
        .filter(|p| is_injected(p))
        .count() as u64;

    let after = kips.admission_requests().await?;
    let delta =
        |kind, operation| requests(&after, kind, operation) - requests(&before, kind, operation);
    assert_eq!(delta("Deployment", "CREATE"), 1, "{after:?}");
    ensure!(delta("Deployment", "UPDATE") >= 1, "{after:?}");
    // One review per kips pod (the dry run included), and at most one reinvocation each:
    // the API server's own plugins change kips' containers after it (ServiceAccount mounts
    // its token), and reinvocationPolicy is IfNeeded.
    let reviews = injected_pods + 1;
    ensure!(
        (reviews..=2 * reviews).contains(&delta("Pod", "CREATE")),
        "{} pod reviews for {reviews} kips pods: {after:?}",
        delta("Pod", "CREATE")
    );
    assert_eq!(delta("StatefulSet", "CREATE"), 0, "{after:?}");

    // The API server speaks HTTP/2 to kips (ALPN h2), so its connections stay open between
    // reviews; HTTP/1.1 connections would be closed once idle past the header-read timeout.
    let versions: std::collections::BTreeSet<String> = kips
        .webhook
        .logs()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter_map(|entry| entry["span"]["http"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(
        versions,
        ["HTTP/2.0".to_owned()].into(),
        "{}",
        kips.webhook.logs()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 5. Dry run

#[tokio::test]
async fn a_server_side_dry_run_returns_the_injected_pod_and_creates_nothing() -> Result<()> {
    let (cp, kips) = shared_kips().await?;
    let client = cp.client()?;
    let ns = kips.namespace(cp, "dry-run", &[]).await?;
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let dry_run = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let answer = pods
        .create(
            &dry_run,
            &pod(json!({
                "metadata": {"name": "api", "annotations": {"kips.io/redirect": "api:8080"}},
                "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1",
                                         "ports": [{"name": "http", "containerPort": 8080}]}]}
            })),
        )
        .await?;
    assert_eq!(
        containers(&answer),
        (vec!["kips-init", "kips-bridge"], vec!["app"])
    );
    assert_eq!(
        args(container(&answer, "kips-bridge")?),
        [
            "-x",
            "$(KIPS_RELAY_CONNECTION_STRING)",
            "-L",
            "0.0.0.0:15100/8080:api"
        ]
    );
    assert_eq!(
        args(container(&answer, "kips-init")?),
        [
            "init-net",
            "--redirect",
            "8080/tcp=15100",
            "--node-ips=$(KIPS_NODE_IPS)",
            "--ipv6=false"
        ]
    );
    assert_eq!(injection_status(&answer)?["portMode"], "iptables");
    // The API server's own defaulting ran on the injected containers too.
    assert_eq!(
        container(&answer, "kips-bridge")?
            .termination_message_path
            .as_deref(),
        Some("/dev/termination-log")
    );

    ensure!(
        pods.get_opt("api").await?.is_none(),
        "the dry run created the pod"
    );
    ensure!(pods.list(&Default::default()).await?.items.is_empty());
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 6. kips down

#[tokio::test]
async fn with_kips_stopped_unrelated_pods_are_created_and_kips_objects_are_refused_naming_the_webhook()
-> Result<()> {
    let cp = control_plane::shared().await?;
    // Its own webhook, scoped to this test's namespace: stopping it touches no other test.
    let mut kips = KipsWebhook::start(cp, "kips-outage", Some("outage"), FLAGS).await?;
    let client = cp.client()?;
    let ns = kips.namespace(cp, "outage", &[]).await?;
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);

    let mut redirected = deployment("api", 1, 8080);
    redirected
        .annotations_mut()
        .insert("kips.io/redirect".into(), "api:8080".into());
    deployments
        .create(&PostParams::default(), &redirected)
        .await?;
    wait_for_pods(&client, &ns, "app=api", 1, "injected", is_injected).await?;

    let port = kips.port();
    let status = kips.webhook.terminate(Duration::from_secs(10))?;
    ensure!(status.success(), "kips exited with {status}");
    let unreachable = |webhook: &str| {
        format!(
            "Internal error occurred: failed calling webhook \"{webhook}\": failed to call webhook: Post \"https://127.0.0.1:{port}/mutate?timeout=5s\": dial tcp 127.0.0.1:{port}: connect: connection refused"
        )
    };

    // Unrelated objects: created as ever, including the pods the controllers make.
    pods.create(
        &PostParams::default(),
        &pod(json!({
            "metadata": {"name": "plain"},
            "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1"}]}
        })),
    )
    .await?;
    deployments
        .create(&PostParams::default(), &deployment("web", 2, 8080))
        .await?;
    wait_for_pods(&client, &ns, "app=web", 2, "created", |_| true).await?;

    // failurePolicy Fail (the chart's default) for workloads: a kips Deployment cannot be
    // changed, neither its redirect nor anything else, and stays as it was.
    let before = deployments.get("api").await?;
    let message = api_error_message(
        annotate::<Deployment>(
            &client,
            &ns,
            "api",
            &[("kips.io/redirect", Some("api:9090"))],
        )
        .await,
    )?;
    assert_eq!(message, unreachable("workloads.kips.io"));
    let message = api_error_message(
        deployments
            .patch(
                "api",
                &PatchParams::default(),
                &Patch::Strategic(json!({"spec": {"template": {"spec": {"containers": [
                    {"name": "app", "image": "registry.invalid/app:2"}
                ]}}}})),
            )
            .await,
    )?;
    assert_eq!(message, unreachable("workloads.kips.io"));
    // The controllers may still write its status, so compare what the user owns: the
    // generation (bumped by any spec change), the annotations and the spec itself.
    let after = deployments.get("api").await?;
    assert_eq!(after.metadata.generation, before.metadata.generation);
    assert_eq!(after.metadata.annotations, before.metadata.annotations);
    assert_eq!(after.spec, before.spec);
    // A new kips Deployment is refused too.
    let mut other = deployment("other", 1, 8080);
    other
        .annotations_mut()
        .insert("kips.io/redirect".into(), "other:8080".into());
    let message = api_error_message(deployments.create(&PostParams::default(), &other).await)?;
    assert_eq!(message, unreachable("workloads.kips.io"));

    // failurePolicy Fail for pods: a kips pod is refused ...
    let message = api_error_message(
        pods.create(
            &PostParams::default(),
            &pod(json!({
                "metadata": {"name": "kips-pod", "annotations": {"kips.io/redirect": "api:8080"}},
                "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1"}]}
            })),
        )
        .await,
    )?;
    assert_eq!(message, unreachable("pods.kips.io"));
    ensure!(pods.get_opt("kips-pod").await?.is_none());

    // ... and the pods of a redirected workload wait, the ReplicaSet saying why. (Scaling
    // goes through deployments/scale, which kips does not watch.)
    deployments
        .patch_scale(
            "api",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 2}})),
        )
        .await?;
    let replica_sets = Api::<ReplicaSet>::namespaced(client.clone(), &ns);
    let failure = eventually(
        "the ReplicaSet of api to report FailedCreate",
        WAIT,
        || async {
            let list = replica_sets.list(&Default::default()).await?;
            Ok(list
                .items
                .iter()
                .filter(|rs| rs.labels().get("app").map(String::as_str) == Some("api"))
                .flat_map(|rs| rs.status.iter().flat_map(|s| s.conditions.iter().flatten()))
                .find(|c| c.type_ == "ReplicaFailure")
                .cloned())
        },
    )
    .await?;
    assert_eq!(failure.reason.as_deref(), Some("FailedCreate"));
    let message = failure.message.unwrap_or_default();
    ensure!(
        message.ends_with(&unreachable("pods.kips.io")),
        "FailedCreate says: {message}"
    );
    ensure!(live_pods(&client, &ns, "app=api").await?.len() == 1);
    Ok(())
}

#[tokio::test]
async fn a_black_holed_webhook_fails_kips_requests_at_the_charts_5s_timeout() -> Result<()> {
    let cp = control_plane::shared().await?;
    // Accepts connections (the kernel does, into the backlog) and never answers.
    let black_hole = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = black_hole.local_addr()?.port();
    let dir = tempfile::tempdir()?;
    let ca = dir.path().join("ca.crt");
    std::fs::write(&ca, cp.ca_pem())?;
    register_chart_webhook(
        cp,
        "kips-black-hole",
        &format!("https://127.0.0.1:{port}/mutate"),
        &ca,
        Some("black-hole"),
    )
    .await?;
    let client = cp.client()?;
    let ns = cp
        .create_namespace_with_labels("black-hole", &[(SCOPE_LABEL, "black-hole")])
        .await?;
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
    let mut redirected = deployment("api", 1, 8080);
    redirected
        .annotations_mut()
        .insert("kips.io/redirect".into(), "api:8080".into());
    let dry_run = PostParams {
        dry_run: true,
        ..Default::default()
    };

    // Dry runs until the API server applies the new configuration; then the call waits for
    // the chart's timeoutSeconds (5) and fails.
    let (message, took) = eventually("the black-holed webhook to be called", WAIT, || async {
        let started = Instant::now();
        Ok(match deployments.create(&dry_run, &redirected).await {
            Ok(_) => None,
            Err(kube::Error::Api(status)) => Some((status.message, started.elapsed())),
            Err(other) => anyhow::bail!("{other}"),
        })
    })
    .await?;
    eprintln!("black-holed webhook: refused after {took:?}: {message}");
    assert_eq!(
        message,
        format!(
            "Internal error occurred: failed calling webhook \"workloads.kips.io\": failed to call webhook: Post \"https://127.0.0.1:{port}/mutate?timeout=5s\": context deadline exceeded"
        )
    );
    ensure!(
        took >= Duration::from_secs(5) && took < Duration::from_secs(9),
        "refused after {took:?}"
    );

    // Unrelated pods are never sent to it: created well within the 5 s a call would take.
    let started = Instant::now();
    Api::<Pod>::namespaced(client, &ns)
        .create(
            &PostParams::default(),
            &pod(json!({
                "metadata": {"name": "plain"},
                "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1"}]}
            })),
        )
        .await?;
    ensure!(
        started.elapsed() < Duration::from_secs(5),
        "a plain pod took {:?}",
        started.elapsed()
    );
    drop(black_hole);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 7. StatefulSet; annotations written into the template (GitOps)

#[tokio::test]
async fn a_statefulset_annotated_with_a_bare_port_uses_its_own_name_as_the_relay() -> Result<()> {
    let (cp, kips) = shared_kips().await?;
    let client = cp.client()?;
    let ns = kips.namespace(cp, "statefulset", &[]).await?;
    let api = Api::<StatefulSet>::namespaced(client.clone(), &ns);
    let sts: StatefulSet = serde_json::from_value(json!({
        "metadata": {"name": "db"},
        "spec": {
            "replicas": 2, "serviceName": "db",
            "selector": {"matchLabels": {"app": "db"}},
            "template": {"metadata": {"labels": {"app": "db"}},
                         "spec": {"containers": [{"name": "db", "image": "registry.invalid/db:1",
                                                  "ports": [{"name": "pg", "containerPort": 5432}]}]}}
        }
    }))?;
    api.create(&PostParams::default(), &sts).await?;
    let _kubelet = FakeKubelet::start(client.clone(), &ns);
    wait_for_pods(&client, &ns, "app=db", 2, "created", |p| !is_injected(p)).await?;

    let annotated =
        annotate::<StatefulSet>(&client, &ns, "db", &[("kips.io/redirect", Some("5432"))])
            .await?
            .object;
    let template = annotated
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .map(kips_annotations)
        .unwrap_or_default();
    assert_eq!(
        template,
        strings(&[("kips.io/redirect", "5432"), ("kips.io/copied", "redirect")])
    );
    let pods = wait_for_pods(&client, &ns, "app=db", 2, "injected", is_injected).await?;
    for pod in &pods {
        assert_eq!(
            args(container(pod, "kips-bridge")?),
            [
                "-x",
                "$(KIPS_RELAY_CONNECTION_STRING)",
                "-L",
                "0.0.0.0:15100/5432:db"
            ]
        );
        assert_eq!(
            args(container(pod, "kips-init")?),
            [
                "init-net",
                "--redirect",
                "5432/tcp=15100",
                "--node-ips=$(KIPS_NODE_IPS)",
                "--ipv6=false"
            ]
        );
    }

    annotate::<StatefulSet>(&client, &ns, "db", &[("kips.io/redirect", None)]).await?;
    let pods = wait_for_pods(&client, &ns, "app=db", 2, "without kips", |p| {
        !is_injected(p)
    })
    .await?;
    for pod in &pods {
        ensure_plain(pod, &BTreeMap::new())?;
    }
    Ok(())
}

#[tokio::test]
async fn a_redirect_written_into_the_pod_template_is_injected_and_never_touched_by_kips()
-> Result<()> {
    let (cp, kips) = shared_kips().await?;
    let client = cp.client()?;
    let ns = kips.namespace(cp, "gitops", &[]).await?;
    let api = Api::<Deployment>::namespaced(client.clone(), &ns);
    let written = strings(&[
        ("kips.io/redirect", "web:8080"),
        ("example.com/team", "web"),
    ]);
    let mut manifest = deployment_json("web", 2, 8080);
    manifest["spec"]["template"]["metadata"]["annotations"] = json!(written);
    let created = api
        .create(&PostParams::default(), &serde_json::from_value(manifest)?)
        .await?;
    assert_eq!(template_annotations(&created), written);
    ensure!(kips_annotations(&created.metadata).is_empty());
    let _kubelet = FakeKubelet::start(client.clone(), &ns);
    wait_available(&client, &ns, "web", 2).await?;
    let pods = wait_for_pods(&client, &ns, "app=web", 2, "injected", is_injected).await?;
    for pod in &pods {
        assert_eq!(
            args(container(pod, "kips-bridge")?),
            [
                "-x",
                "$(KIPS_RELAY_CONNECTION_STRING)",
                "-L",
                "0.0.0.0:15100/8080:web"
            ]
        );
        assert_eq!(
            containers(pod),
            (vec!["kips-init", "kips-bridge"], vec!["app"])
        );
    }
    // Still exactly what the user wrote: no kips.io/copied.
    assert_eq!(template_annotations(&api.get("web").await?), written);

    // Removed from the manifest and applied again: plain pods.
    let updated = api
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"template": {"metadata": {"annotations": {
                "kips.io/redirect": null
            }}}}})),
        )
        .await?;
    assert_eq!(
        template_annotations(&updated),
        strings(&[("example.com/team", "web")])
    );
    wait_available(&client, &ns, "web", 2).await?;
    let pods = wait_for_pods(&client, &ns, "app=web", 2, "without kips", |p| {
        !is_injected(p)
    })
    .await?;
    for pod in &pods {
        ensure_plain(pod, &BTreeMap::new())?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 8. Injected pods pass the API server's validation

/// Two relays with two ports on one, a UDP port, a reverse entry; a second container
/// declares 15101, which the listen ports must skip.
fn multi_redirect_pod(name: &str) -> Value {
    json!({
        "metadata": {"name": name, "labels": {"app": name}, "annotations": {
            "kips.io/redirect": "api:8080,api:9090,metrics:9100,dns:5353/udp",
            "kips.io/reverse": "db=postgres.data.svc:5432",
        }},
        "spec": {"containers": [
            {"name": "app", "image": "registry.invalid/app:1", "ports": [
                {"name": "http", "containerPort": 8080},
                {"name": "grpc", "containerPort": 9090},
                {"name": "metrics", "containerPort": 9100},
                {"name": "dns", "containerPort": 5353, "protocol": "UDP"},
            ]},
            {"name": "agent", "image": "registry.invalid/agent:1",
             "ports": [{"name": "agent", "containerPort": 15101}]},
        ]}
    })
}

const MULTI_BRIDGE_ARGS: [&str; 10] = [
    "-x",
    "$(KIPS_RELAY_CONNECTION_STRING)",
    "-L",
    "0.0.0.0:15100/8080;0.0.0.0:15102/9090:api",
    "-L",
    "0.0.0.0:15103/9100:metrics",
    "-L",
    "0.0.0.0:15104U/5353.udp:dns",
    "-T",
    "db:5432/postgres.data.svc:5432",
];
const MULTI_INIT_ARGS: [&str; 11] = [
    "init-net",
    "--redirect",
    "8080/tcp=15100",
    "--redirect",
    "9090/tcp=15102",
    "--redirect",
    "9100/tcp=15103",
    "--redirect",
    "5353/udp=15104",
    "--node-ips=$(KIPS_NODE_IPS)",
    "--ipv6=false",
];

/// A named-mode pod (two named ports, one UDP, probes naming the port) with a reverse entry.
fn named_mode_pod(name: &str) -> Value {
    json!({
        "metadata": {"name": name, "labels": {"app": name}, "annotations": {
            "kips.io/redirect": "api:http,dns:dns/udp",
            "kips.io/port-mode": "named",
            "kips.io/reverse": "db=postgres.data.svc:5432",
        }},
        "spec": {"containers": [{
            "name": "app", "image": "registry.invalid/app:1",
            "ports": [
                {"name": "http", "containerPort": 8080},
                {"name": "dns", "containerPort": 5353, "protocol": "UDP"},
            ],
            "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}},
            "livenessProbe": {"tcpSocket": {"port": "http"}},
        }]}
    })
}

/// Creates `manifest` as a pod (for real, not a dry run) and reads it back; and creates a
/// Deployment of the same template whose pod the ReplicaSet controller must get admitted
/// with the same injection.
async fn create_pod_and_deployment_of(
    client: &Client,
    ns: &str,
    manifest: Value,
) -> Result<(Pod, Pod)> {
    let name = manifest["metadata"]["name"]
        .as_str()
        .context("a name")?
        .to_owned();
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    pods.create(&PostParams::default(), &pod(manifest.clone()))
        .await
        .with_context(|| format!("creating pod {name}"))?;
    let bare = pods.get(&name).await?;

    let deployment_name = format!("{name}-deploy");
    let mut template = manifest;
    template["metadata"]["labels"] = json!({"app": deployment_name});
    let annotations = template["metadata"]
        .as_object_mut()
        .and_then(|m| m.remove("annotations"));
    template["metadata"]
        .as_object_mut()
        .context("metadata")?
        .remove("name");
    let workload: Deployment = serde_json::from_value(json!({
        "metadata": {"name": deployment_name, "annotations": annotations},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": deployment_name}},
            "template": template,
        }
    }))?;
    Api::<Deployment>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &workload)
        .await?;
    let made = wait_for_pods(
        client,
        ns,
        &format!("app={deployment_name}"),
        1,
        "injected",
        is_injected,
    )
    .await?
    .remove(0);
    Ok((bare, made))
}

/// The bare pod and the Deployment's pod got the same containers from kips. (Volume mounts
/// are left out: the API server's ServiceAccount token volume has a random name per pod.)
fn ensure_same_injection(bare: &Pod, made: &Pod) -> Result<()> {
    assert_eq!(containers(bare), containers(made));
    let without_mounts = |c: &Container| Container {
        volume_mounts: None,
        ..c.clone()
    };
    for name in ["kips-bridge", "kips-init"] {
        if let (Ok(a), Ok(b)) = (container(bare, name), container(made, name)) {
            assert_eq!(
                without_mounts(a),
                without_mounts(b),
                "{name} differs between the bare pod and the Deployment's"
            );
        }
    }
    assert_eq!(injection_status(bare)?, injection_status(made)?);
    Ok(())
}

#[tokio::test]
async fn injected_pods_pass_the_api_servers_validation_in_every_mode() -> Result<()> {
    let (cp, kips) = shared_kips().await?;
    let client = cp.client()?;
    let ns = kips.namespace(cp, "validation", &[]).await?;

    // iptables mode, native sidecar (the defaults).
    let (pod, made) =
        create_pod_and_deployment_of(&client, &ns, multi_redirect_pod("multi")).await?;
    assert_eq!(
        containers(&pod),
        (vec!["kips-init", "kips-bridge"], vec!["app", "agent"])
    );
    assert_eq!(args(container(&pod, "kips-bridge")?), MULTI_BRIDGE_ARGS);
    assert_eq!(args(container(&pod, "kips-init")?), MULTI_INIT_ARGS);
    let ports: Vec<(Option<&str>, i32, Option<&str>)> = container(&pod, "kips-bridge")?
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.as_deref(), p.container_port, p.protocol.as_deref()))
        .collect();
    assert_eq!(
        ports,
        [
            (Some("kips-15100"), 15100, Some("TCP")),
            (Some("kips-15102"), 15102, Some("TCP")),
            (Some("kips-15103"), 15103, Some("TCP")),
            (Some("kips-15104"), 15104, Some("UDP")),
        ]
    );
    let status = injection_status(&pod)?;
    assert_eq!(status["reverse"], json!(["db"]));
    ensure_same_injection(&pod, &made)?;

    // named mode: no kips-init; ports renamed, probes re-pointed.
    let (pod, made) = create_pod_and_deployment_of(&client, &ns, named_mode_pod("named")).await?;
    assert_eq!(containers(&pod), (vec!["kips-bridge"], vec!["app"]));
    assert_eq!(
        args(container(&pod, "kips-bridge")?),
        [
            "-x",
            "$(KIPS_RELAY_CONNECTION_STRING)",
            "-L",
            "0.0.0.0:15100/http:api",
            "-L",
            "0.0.0.0:15101U/dns.udp:dns",
            "-T",
            "db:5432/postgres.data.svc:5432",
        ]
    );
    let app = container(&pod, "app")?;
    let app_ports: Vec<(Option<&str>, i32)> = app
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.as_deref(), p.container_port))
        .collect();
    assert_eq!(
        app_ports,
        [
            (Some("kips-app-8080"), 8080),
            (Some("kips-app-5353u"), 5353)
        ]
    );
    let readiness = serde_json::to_value(&app.readiness_probe)?;
    assert_eq!(readiness["httpGet"]["port"], "kips-app-8080");
    let liveness = serde_json::to_value(&app.liveness_probe)?;
    assert_eq!(liveness["tcpSocket"]["port"], "kips-app-8080");
    let bridge_ports: Vec<(Option<&str>, i32, Option<&str>)> = container(&pod, "kips-bridge")?
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.as_deref(), p.container_port, p.protocol.as_deref()))
        .collect();
    assert_eq!(
        bridge_ports,
        [
            (Some("http"), 15100, Some("TCP")),
            (Some("dns"), 15101, Some("UDP"))
        ]
    );
    assert_eq!(injection_status(&pod)?["portMode"], "named");
    ensure_same_injection(&pod, &made)?;

    // A reverse entry alone: the sidecar only.
    let (pod, made) = create_pod_and_deployment_of(
        &client,
        &ns,
        json!({
            "metadata": {"name": "reverse", "annotations": {
                "kips.io/reverse": "db=postgres.data.svc:5432"
            }},
            "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1"}]}
        }),
    )
    .await?;
    assert_eq!(containers(&pod), (vec!["kips-bridge"], vec!["app"]));
    assert_eq!(
        args(container(&pod, "kips-bridge")?),
        [
            "-x",
            "$(KIPS_RELAY_CONNECTION_STRING)",
            "-T",
            "db:5432/postgres.data.svc:5432"
        ]
    );
    ensure_same_injection(&pod, &made)?;
    Ok(())
}

#[tokio::test]
async fn injected_pods_pass_the_api_servers_validation_without_native_sidecars() -> Result<()> {
    let cp = control_plane::shared().await?;
    let mut flags = FLAGS.to_vec();
    flags.push("--native-sidecar=false");
    let kips = KipsWebhook::start(cp, "kips-legacy", Some("legacy"), &flags).await?;
    let client = cp.client()?;
    let ns = kips.namespace(cp, "legacy", &[]).await?;

    let (pod, made) =
        create_pod_and_deployment_of(&client, &ns, multi_redirect_pod("multi")).await?;
    assert_eq!(
        containers(&pod),
        (vec!["kips-init"], vec!["app", "agent", "kips-bridge"])
    );
    let bridge = container(&pod, "kips-bridge")?;
    assert_eq!(args(bridge), MULTI_BRIDGE_ARGS);
    assert_eq!(bridge.restart_policy, None);
    assert_eq!(args(container(&pod, "kips-init")?), MULTI_INIT_ARGS);
    assert_eq!(injection_status(&pod)?["sidecar"], "container");
    ensure_same_injection(&pod, &made)?;

    let (pod, made) = create_pod_and_deployment_of(&client, &ns, named_mode_pod("named")).await?;
    let (init, main) = containers(&pod);
    ensure!(init.is_empty(), "{init:?}");
    assert_eq!(main, ["app", "kips-bridge"]);
    ensure_same_injection(&pod, &made)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Reinvocation (reinvocationPolicy: IfNeeded)

/// After kips adds its containers, the API server runs its own mutating admission plugins
/// again (ServiceAccount mounts its token into every container, LimitRanger applies a
/// LimitRange's defaults), and then, since the pod changed, calls kips again. That second
/// admission must leave those additions alone ("the patch is empty", README): a LimitRange
/// with a maximum requires every container to have a limit, which the API server checks
/// after admission.
#[tokio::test]
async fn reinvocation_keeps_what_the_api_servers_own_admission_added_to_kips_containers()
-> Result<()> {
    let (cp, kips) = shared_kips().await?;
    let client = cp.client()?;
    let ns = kips.namespace(cp, "reinvocation", &[]).await?;
    let limits: LimitRange = serde_json::from_value(json!({
        "metadata": {"name": "defaults"},
        "spec": {"limits": [{
            "type": "Container",
            "default": {"cpu": "500m"},
            "defaultRequest": {"cpu": "100m"},
            "max": {"cpu": "2"},
        }]}
    }))?;
    Api::<LimitRange>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &limits)
        .await?;
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    // Without kips: defaulted and admitted.
    let plain = pods
        .create(
            &PostParams::default(),
            &pod(json!({
                "metadata": {"name": "plain"},
                "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1"}]}
            })),
        )
        .await?;
    let cpu_limit = |c: &Container| {
        c.resources
            .as_ref()
            .and_then(|r| r.limits.as_ref())
            .and_then(|l| l.get("cpu").map(|q| q.0.clone()))
    };
    assert_eq!(
        cpu_limit(container(&plain, "app")?).as_deref(),
        Some("500m")
    );
    let created = pods
        .create(
            &PostParams::default(),
            &pod(json!({
                "metadata": {"name": "api", "annotations": {"kips.io/redirect": "api:8080"}},
                "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1",
                                         "ports": [{"containerPort": 8080}]}]}
            })),
        )
        .await
        .context("a kips pod in a namespace with a LimitRange")?;
    let app = container(&created, "app")?;
    for name in ["kips-init", "kips-bridge"] {
        let injected = container(&created, name)?;
        assert_eq!(
            cpu_limit(injected),
            cpu_limit(app),
            "{name}: LimitRanger's default"
        );
        assert_eq!(
            injected.volume_mounts, app.volume_mounts,
            "{name}: the ServiceAccount plugin's token mount"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 9. Pod Security (issue 5)

/// A pod whose app container passes Pod Security `restricted` on its own.
fn restricted_app_pod(name: &str, annotations: Value) -> Value {
    json!({
        "metadata": {"name": name, "labels": {"app": name}, "annotations": annotations},
        "spec": {
            "securityContext": {"runAsNonRoot": true, "runAsUser": 1000,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "app", "image": "registry.invalid/app:1",
                "ports": [{"name": "http", "containerPort": 8080}],
                "securityContext": {"allowPrivilegeEscalation": false,
                                    "capabilities": {"drop": ["ALL"]}},
            }]
        }
    })
}

#[tokio::test]
async fn named_mode_passes_pod_security_baseline_and_restricted_and_iptables_mode_does_not()
-> Result<()> {
    let (cp, kips) = shared_kips().await?;
    let client = cp.client()?;
    for level in ["baseline", "restricted"] {
        let ns = kips
            .namespace(
                cp,
                &format!("pss-{level}"),
                &[("pod-security.kubernetes.io/enforce", level)],
            )
            .await?;
        let pods = Api::<Pod>::namespaced(client.clone(), &ns);

        // Admitted, injected, by the API server that enforces the level; as a bare pod and
        // as the pod of a Deployment.
        let named = restricted_app_pod(
            "named",
            json!({"kips.io/redirect": "api:http", "kips.io/port-mode": "named"}),
        );
        let (bare, made) = create_pod_and_deployment_of(&client, &ns, named)
            .await
            .with_context(|| format!("named mode in a {level} namespace"))?;
        assert_eq!(containers(&bare), (vec!["kips-bridge"], vec!["app"]));
        assert_eq!(
            args(container(&bare, "kips-bridge")?),
            [
                "-x",
                "$(KIPS_RELAY_CONNECTION_STRING)",
                "-L",
                "0.0.0.0:15100/http:api"
            ]
        );
        ensure_same_injection(&bare, &made)?;

        // iptables mode: kips-init's NET_ADMIN and NET_RAW are refused.
        let message = api_error_message(
            pods.create(
                &PostParams::default(),
                &pod(restricted_app_pod(
                    "iptables",
                    json!({"kips.io/redirect": "api:8080"}),
                )),
            )
            .await,
        )?;
        // kips-init is the one container that breaks either level; kips-bridge passes both.
        let reasons = match level {
            "baseline" => {
                r#"non-default capabilities (container "kips-init" must not include "NET_ADMIN", "NET_RAW" in securityContext.capabilities.add)"#
            }
            _ => {
                r#"unrestricted capabilities (container "kips-init" must not include "NET_ADMIN", "NET_RAW" in securityContext.capabilities.add), runAsNonRoot != true (container "kips-init" must not set securityContext.runAsNonRoot=false), runAsUser=0 (container "kips-init" must not set runAsUser=0)"#
            }
        };
        assert_eq!(
            message,
            format!(
                "pods \"iptables\" is forbidden: violates PodSecurity \"{level}:latest\": {reasons}"
            )
        );
        ensure!(pods.get_opt("iptables").await?.is_none());
    }
    Ok(())
}
