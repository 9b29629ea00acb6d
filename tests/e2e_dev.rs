//! The developer's commands against a real control plane (tests/support/control_plane.rs):
//! `kips redirect --wait`, `kips revert --wait`, `kips status`, `kips connect --print`, the
//! webhook's admission warnings and Events, and the errors users see.
//!
//! The webhook runs as a local process (`kips webhook --cluster-hooks=on`); the
//! MutatingWebhookConfiguration comes from the Helm chart rendered for a webhook outside the
//! cluster (`webhook.url` + `webhook.caBundle`). There is no kubelet: a stand-in marks pods
//! Running and Ready through the `pods/status` subresource, as a kubelet would, so rollouts
//! can finish.

mod support;

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use support::control_plane::{self, ControlPlane};
use support::kips_e2e::{
    FakeKubelet, KipsWebhook, annotate, create_relay_secret, deployment, eventually, wait_available,
};

const KIPS: &str = env!("CARGO_BIN_EXE_kips");
/// How long the polls of this suite wait.
const WAIT: Duration = Duration::from_secs(60);
const CONNECTION_STRING: &str =
    "Endpoint=sb://kips-e2e.invalid/;SharedAccessKeyName=dev;SharedAccessKey=e2e-s3cr3t";

/// The control plane, one `kips webhook` with cluster hooks, and the chart's webhook
/// configuration pointing at it: set up once per test binary.
struct Env {
    cp: &'static ControlPlane,
    kips: KipsWebhook,
}

async fn env() -> Result<&'static Env> {
    static ENV: tokio::sync::OnceCell<Result<Env, String>> = tokio::sync::OnceCell::const_new();
    ENV.get_or_init(|| async { setup().await.map_err(|e| format!("{e:#}")) })
        .await
        .as_ref()
        .map_err(|e| anyhow::anyhow!("the end-to-end environment did not start: {e}"))
}

async fn setup() -> Result<Env> {
    let cp = control_plane::shared().await?;
    let kubeconfig = format!("--kubeconfig={}", cp.kubeconfig().display());
    // The only webhook of this control plane: unscoped, every namespace is its.
    let kips = KipsWebhook::start(cp, "kips", None, &["--cluster-hooks=on", &kubeconfig]).await?;
    Ok(Env { cp, kips })
}

async fn create_secret(client: &Client, ns: &str) -> Result<()> {
    create_relay_secret(client, ns, CONNECTION_STRING).await
}

/// Runs `kips <args> --kubeconfig <admin>` to its end (killed if the test is dropped).
async fn kips(cp: &ControlPlane, args: &[&str]) -> Result<Output> {
    let mut command = tokio::process::Command::new(KIPS);
    command
        .args(args)
        .arg("--kubeconfig")
        .arg(cp.kubeconfig())
        .env_remove("KIPS_RELAY_CONNECTION_STRING")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(180), command.output())
        .await
        .with_context(|| format!("kips {args:?} did not finish within 180s"))??;
    Ok(output)
}

fn text(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The Event of `reason` on `deployment/name`, recorded by kips.
async fn kips_event(client: &Client, ns: &str, name: &str, reason: &str) -> Result<Event> {
    let api = Api::<Event>::namespaced(client.clone(), ns);
    eventually(
        &format!("a {reason} Event on deployment/{name}"),
        WAIT,
        || {
            let api = api.clone();
            async move {
                let events = api.list(&ListParams::default()).await?;
                Ok(events.items.into_iter().find(|e| {
                    e.reason.as_deref() == Some(reason)
                        && e.regarding.as_ref().is_some_and(|r| {
                            r.name.as_deref() == Some(name)
                                && r.kind.as_deref() == Some("Deployment")
                        })
                }))
            }
        },
    )
    .await
}

/// `kips connect deployment/api --connection-string-from-secret` with the stand-in azbridge
/// (tests/fixtures/dev/fake-azbridge): returns the arguments it got, after Ctrl-C.
/// Runs `kips connect` with the stand-in azbridge; returns the stand-in's arguments and the
/// configuration file it was given (`-f`).
async fn connect_with_fake_azbridge(cp: &ControlPlane, ns: &str) -> Result<(Vec<String>, String)> {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir()?;
    let fake = dir.path().join("azbridge");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dev/fake-azbridge"),
        &fake,
    )?;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755))?;
    let mut child = tokio::process::Command::new(KIPS)
        .args([
            "connect",
            "deployment/api",
            "-n",
            ns,
            "--connection-string-from-secret",
        ])
        .arg("--azbridge")
        .arg(&fake)
        .arg("--kubeconfig")
        .arg(cp.kubeconfig())
        .env("FAKE_AZBRIDGE_DIR", dir.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let args = eventually("the stand-in azbridge to start", WAIT, || {
        let dir = dir.path().to_owned();
        async move {
            for entry in std::fs::read_dir(&dir)? {
                let path = entry?.path();
                if path.extension().is_some_and(|e| e == "args") {
                    let bytes = std::fs::read(&path)?;
                    return Ok(Some(
                        bytes
                            .split(|b| *b == 0)
                            .filter(|a| !a.is_empty())
                            .map(|a| String::from_utf8_lossy(a).into_owned())
                            .collect::<Vec<_>>(),
                    ));
                }
            }
            Ok(None)
        }
    })
    .await?;
    unsafe {
        libc::kill(
            child.id().context("kips connect exited early")? as libc::pid_t,
            libc::SIGINT,
        )
    };
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait()).await??;
    ensure!(status.success(), "kips connect exited with {status}");
    let mut config = String::new();
    for entry in std::fs::read_dir(dir.path())? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "config") {
            config = std::fs::read_to_string(&path)?;
        }
    }
    Ok((args, config))
}

#[tokio::test]
async fn redirect_and_revert_follow_the_rollout_and_status_shows_it() -> Result<()> {
    let env = env().await?;
    let cp = env.cp;
    let client = cp.client()?;
    let ns = cp.create_namespace("dev-rollout").await?;
    create_secret(&client, &ns).await?;
    Api::<Deployment>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &deployment("api", 2, 8080))
        .await?;
    let _kubelet = FakeKubelet::start(client.clone(), &ns);
    wait_available(&client, &ns, "api", 2).await?;

    // Before: nothing redirected.
    let before = kips(cp, &["status", "-n", &ns]).await?;
    let (stdout, stderr) = text(&before);
    ensure!(before.status.success(), "{stdout}{stderr}");
    ensure!(stdout.is_empty(), "{stdout}");
    ensure!(
        stderr.contains(&format!("No redirected workloads in namespace {ns}.")),
        "{stderr}"
    );

    // Redirect and follow the rollout to its end.
    let started = Instant::now();
    let redirect = kips(
        cp,
        &[
            "redirect",
            "deployment/api",
            "api:8080",
            "--wait",
            "--timeout",
            "120s",
            "-n",
            &ns,
        ],
    )
    .await?;
    let (stdout, stderr) = text(&redirect);
    ensure!(
        redirect.status.success(),
        "redirect --wait failed:\n{stdout}{stderr}\n{}",
        env.kips.webhook.logs()
    );
    ensure!(
        stdout.contains("deployment/api annotated: kips.io/redirect=api:8080"),
        "{stdout}"
    );
    ensure!(
        stdout.contains("deployment/api: 2/2 pods injected and ready"),
        "{stdout}"
    );
    eprintln!(
        "redirect --wait took {:?}:\n{stdout}{stderr}",
        started.elapsed()
    );

    // Every pod that is left is injected.
    let pods = Api::<Pod>::namespaced(client.clone(), &ns)
        .list(&ListParams::default().labels("app=api"))
        .await?;
    let live: Vec<&Pod> = pods
        .items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect();
    ensure!(live.len() == 2, "{} pods", live.len());
    for pod in &live {
        ensure!(
            pod.annotations().contains_key("kips.io/status"),
            "{} is not injected",
            pod.name_any()
        );
        let spec = pod.spec.as_ref().unwrap();
        ensure!(
            spec.init_containers
                .iter()
                .flatten()
                .chain(&spec.containers)
                .any(|c| c.name == "kips-bridge"),
            "{} has no kips-bridge",
            pod.name_any()
        );
    }

    // status shows it, as a table and as JSON.
    let (stdout, stderr) = text(&kips(cp, &["status", "-n", &ns]).await?);
    eprintln!("kips status:\n{stdout}{stderr}");
    let line = stdout
        .lines()
        .find(|l| l.contains("deployment/api"))
        .with_context(|| format!("no row for deployment/api:\n{stdout}{stderr}"))?;
    let cells: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        cells,
        [
            ns.as_str(),
            "deployment/api",
            "api:8080",
            "-",
            "iptables",
            "2/2",
            "2/2",
            "complete"
        ]
    );
    let json: Value =
        serde_json::from_slice(&kips(cp, &["status", "-A", "-o", "json"]).await?.stdout)?;
    let row = json
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["namespace"] == ns.as_str())
        .context("no JSON row")?;
    assert_eq!(row["redirects"], json!(["api:8080"]));
    assert_eq!(
        row["pods"],
        json!({"injected": 2, "ready": 2, "desired": 2})
    );
    assert_eq!(row["rollout"]["state"], "complete");

    // connect reads the same workload from the cluster (and the Secret, which is never shown).
    let connect = kips(
        cp,
        &[
            "connect",
            "deployment/api",
            "-n",
            &ns,
            "--connection-string-from-secret",
            "--print",
        ],
    )
    .await?;
    let (stdout, stderr) = text(&connect);
    ensure!(connect.status.success(), "{stdout}{stderr}");
    // The built-in bridge by default; azbridge's file form with --azbridge.
    ensure!(
        stdout.contains("kips bridge -x <redacted> -T api:8080/localhost:8080"),
        "{stdout}"
    );
    ensure!(!stdout.contains("e2e-s3cr3t"), "the secret leaked");
    let with_azbridge = kips(
        cp,
        &[
            "connect",
            "deployment/api",
            "-n",
            &ns,
            "--connection-string-from-secret",
            "--azbridge",
            "/usr/local/bin/azbridge",
            "--print",
        ],
    )
    .await?;
    let (stdout, stderr) = text(&with_azbridge);
    ensure!(with_azbridge.status.success(), "{stdout}{stderr}");
    ensure!(
        stdout.contains("azbridge -f '<config.yml>' -T api:8080/localhost:8080"),
        "{stdout}"
    );
    ensure!(!stdout.contains("e2e-s3cr3t"), "the secret leaked");

    // ... and runs azbridge (the stand-in) with the connection string read from the Secret.
    let (args, config) = connect_with_fake_azbridge(cp, &ns).await?;
    assert_eq!(args[0], "-f");
    assert_eq!(args[2..], ["-T", "api:8080/localhost:8080"]);
    assert_eq!(
        config,
        format!("AzureRelayConnectionString: '{CONNECTION_STRING}'\n")
    );

    let on = kips_event(&client, &ns, "api", "RedirectOn").await?;
    assert_eq!(on.reporting_controller.as_deref(), Some("kips.io/webhook"));
    ensure!(
        on.note
            .as_deref()
            .unwrap_or_default()
            .contains("redirect api:8080"),
        "{on:?}"
    );
    ensure!(
        on.regarding.as_ref().and_then(|r| r.uid.clone()).is_some(),
        "no uid in {on:?}"
    );

    // Revert and follow the rollout back.
    let revert = kips(
        cp,
        &[
            "revert",
            "deployment/api",
            "--wait",
            "--timeout",
            "120s",
            "-n",
            &ns,
        ],
    )
    .await?;
    let (stdout, stderr) = text(&revert);
    ensure!(
        revert.status.success(),
        "revert --wait failed:\n{stdout}{stderr}"
    );
    ensure!(
        stdout.contains("deployment/api: removed kips.io/redirect"),
        "{stdout}"
    );
    ensure!(
        stdout.contains("deployment/api: 2/2 pods without kips and ready"),
        "{stdout}"
    );
    eprintln!("revert --wait:\n{stdout}{stderr}");
    let pods = Api::<Pod>::namespaced(client.clone(), &ns)
        .list(&ListParams::default().labels("app=api"))
        .await?;
    for pod in pods
        .items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
    {
        ensure!(
            !pod.annotations().contains_key("kips.io/status"),
            "{} is still injected",
            pod.name_any()
        );
    }
    kips_event(&client, &ns, "api", "RedirectOff").await?;

    // After: nothing redirected again.
    let (stdout, stderr) = text(&kips(cp, &["status", "-n", &ns]).await?);
    ensure!(
        stdout.is_empty() && stderr.contains("No redirected workloads"),
        "{stdout}{stderr}"
    );
    Ok(())
}

#[tokio::test]
async fn a_statefulset_rolls_forward_and_back_too() -> Result<()> {
    use k8s_openapi::api::apps::v1::StatefulSet;
    let env = env().await?;
    let cp = env.cp;
    let client = cp.client()?;
    let ns = cp.create_namespace("dev-sts").await?;
    create_secret(&client, &ns).await?;
    let sts: StatefulSet = serde_json::from_value(json!({
        "metadata": {"name": "db"},
        "spec": {
            "replicas": 2,
            "serviceName": "db",
            "selector": {"matchLabels": {"app": "db"}},
            "template": {
                "metadata": {"labels": {"app": "db"}},
                "spec": {"containers": [{
                    "name": "db", "image": "registry.invalid/db:1",
                    "ports": [{"name": "pg", "containerPort": 5432}]
                }]}
            }
        }
    }))?;
    Api::<StatefulSet>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &sts)
        .await?;
    let _kubelet = FakeKubelet::start(client.clone(), &ns);

    let redirect = kips(
        cp,
        &[
            "redirect",
            "sts/db",
            "pg",
            "--wait",
            "--timeout",
            "120s",
            "-n",
            &ns,
        ],
    )
    .await?;
    let (stdout, stderr) = text(&redirect);
    ensure!(redirect.status.success(), "{stdout}{stderr}");
    ensure!(
        stdout.contains("statefulset/db: 2/2 pods injected and ready"),
        "{stdout}"
    );
    let (stdout, _) = text(&kips(cp, &["status", "-n", &ns]).await?);
    ensure!(
        stdout.contains("statefulset/db")
            && stdout.contains("named")
            && stdout.contains("complete"),
        "{stdout}"
    );

    let revert = kips(
        cp,
        &["revert", "sts/db", "--wait", "--timeout", "120s", "-n", &ns],
    )
    .await?;
    let (stdout, stderr) = text(&revert);
    ensure!(revert.status.success(), "{stdout}{stderr}");
    ensure!(
        stdout.contains("statefulset/db: 2/2 pods without kips and ready"),
        "{stdout}"
    );
    Ok(())
}

#[tokio::test]
async fn a_missing_relay_secret_is_warned_about_and_stops_the_wait() -> Result<()> {
    let env = env().await?;
    let cp = env.cp;
    let client = cp.client()?;
    let ns = cp.create_namespace("dev-nosecret").await?;
    let api = Api::<Deployment>::namespaced(client.clone(), &ns);
    api.create(&PostParams::default(), &deployment("api", 1, 8080))
        .await?;
    api.create(&PostParams::default(), &deployment("web", 1, 8080))
        .await?;

    // kubectl annotate: the API server returns kips' warning.
    let warnings = annotate::<Deployment>(
        &client,
        &ns,
        "api",
        &[("kips.io/redirect", Some("api:8080"))],
    )
    .await?
    .warnings;
    let expected = format!(
        "kips: the relay Secret \"kips-relay\" does not exist in namespace \"{ns}\": the redirected pods will not start until it does (key connectionString)"
    );
    ensure!(warnings.contains(&expected), "warnings: {warnings:?}");

    // kips redirect prints it, and --wait stops with the reason instead of timing out.
    let started = Instant::now();
    let redirect = kips(
        cp,
        &[
            "redirect",
            "deploy/web",
            "8080",
            "--wait",
            "--timeout",
            "60s",
            "-n",
            &ns,
        ],
    )
    .await?;
    let (stdout, stderr) = text(&redirect);
    ensure!(!redirect.status.success(), "{stdout}{stderr}");
    ensure!(stderr.contains(&format!("Warning: {expected}")), "{stderr}");
    ensure!(
        stderr.contains(&format!(
            "the relay Secret \"kips-relay\" does not exist in namespace {ns}"
        )),
        "{stderr}"
    );
    ensure!(
        started.elapsed() < Duration::from_secs(30),
        "it waited for the timeout"
    );
    Ok(())
}

#[tokio::test]
async fn a_relay_secret_ending_in_a_newline_is_warned_about_once() -> Result<()> {
    let env = env().await?;
    let cp = env.cp;
    let client = cp.client()?;
    let ns = cp.create_namespace("dev-newline").await?;
    // `echo ... > file; kubectl create secret --from-file`: the value ends in a newline,
    // which azbridge signs with (401 in the sidecar while the laptop trims it).
    create_relay_secret(&client, &ns, &format!("{CONNECTION_STRING}\n")).await?;
    let api = Api::<Deployment>::namespaced(client.clone(), &ns);
    api.create(&PostParams::default(), &deployment("api", 1, 8080))
        .await?;
    api.create(&PostParams::default(), &deployment("web", 1, 8080))
        .await?;
    let expected = format!(
        "kips: the connectionString of Secret \"kips-relay\" in namespace \"{ns}\" ends in a newline: azbridge signs with it as it is and the relay refuses it (401); recreate it with --from-literal"
    );

    // kubectl annotate: the webhook says so at once.
    let warnings = annotate::<Deployment>(
        &client,
        &ns,
        "api",
        &[("kips.io/redirect", Some("api:8080"))],
    )
    .await?
    .warnings;
    ensure!(warnings.contains(&expected), "warnings: {warnings:?}");

    // kips redirect prints it once (its own check and the webhook's agree word for word).
    let redirect = kips(cp, &["redirect", "deploy/web", "8080", "-n", &ns]).await?;
    let (stdout, stderr) = text(&redirect);
    ensure!(redirect.status.success(), "{stdout}{stderr}");
    ensure!(
        stderr.matches(&format!("Warning: {expected}")).count() == 1,
        "{stderr}"
    );
    Ok(())
}

#[tokio::test]
async fn iptables_mode_in_a_baseline_namespace_is_warned_about_and_the_rejection_reported()
-> Result<()> {
    let env = env().await?;
    let cp = env.cp;
    let client = cp.client()?;
    let ns = cp
        .create_namespace_with_labels(
            "dev-baseline",
            &[("pod-security.kubernetes.io/enforce", "baseline")],
        )
        .await?;
    create_secret(&client, &ns).await?;
    let api = Api::<Deployment>::namespaced(client.clone(), &ns);
    api.create(&PostParams::default(), &deployment("api", 1, 8080))
        .await?;
    let _kubelet = FakeKubelet::start(client.clone(), &ns);
    wait_available(&client, &ns, "api", 1).await?;

    // A numeric port: auto picks iptables, whose kips-init Pod Security baseline forbids.
    let redirect = kips(
        cp,
        &[
            "redirect",
            "deployment/api",
            "api:8080",
            "--wait",
            "--timeout",
            "60s",
            "-n",
            &ns,
        ],
    )
    .await?;
    let (stdout, stderr) = text(&redirect);
    ensure!(!redirect.status.success(), "{stdout}{stderr}");
    ensure!(
        stderr.contains(&format!(
            "Warning: kips: Pod Security \"baseline\" in namespace \"{ns}\" will reject these pods: kips-init needs NET_ADMIN and NET_RAW (port mode iptables); use kips.io/port-mode: named"
        )),
        "{stderr}"
    );
    // The ReplicaSet's FailedCreate, as the API server worded it.
    ensure!(
        stderr.contains("deployment/api: pods rejected:"),
        "{stderr}"
    );
    ensure!(stderr.contains("PodSecurity \"baseline"), "{stderr}");

    // Named mode passes baseline: redirect by port name, and the rollout completes.
    let redirect = kips(
        cp,
        &[
            "redirect",
            "deployment/api",
            "api:http",
            "--port-mode",
            "named",
            "--wait",
            "--timeout",
            "120s",
            "-n",
            &ns,
        ],
    )
    .await?;
    let (stdout, stderr) = text(&redirect);
    ensure!(redirect.status.success(), "{stdout}{stderr}");
    ensure!(!stderr.contains("Pod Security"), "{stderr}");
    ensure!(stdout.contains("1/1 pods injected and ready"), "{stdout}");
    kips_event(&client, &ns, "api", "RedirectChanged").await?;
    Ok(())
}

#[tokio::test]
async fn errors_name_what_is_wrong() -> Result<()> {
    let env = env().await?;
    let cp = env.cp;
    let client = cp.client()?;
    let ns = cp.create_namespace("dev-errors").await?;
    Api::<Deployment>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &deployment("plain", 1, 8080))
        .await?;

    let cases: Vec<(Vec<&str>, String)> = vec![
        (
            vec!["redirect", "deployment/nope", "api:8080", "-n", &ns],
            format!("deployment/nope not found in namespace {ns}"),
        ),
        (
            vec!["connect", "deployment/nope", "--print", "-n", &ns],
            format!("deployment/nope not found in namespace {ns}"),
        ),
        (
            vec!["connect", "deployment/plain", "--print", "-n", &ns],
            format!("deployment/plain in namespace {ns} has no kips annotations"),
        ),
        (
            vec!["revert", "deployment/plain", "-n", &ns],
            format!(
                "deployment/plain in namespace {ns} has no kips annotations: nothing to revert"
            ),
        ),
        (
            // The webhook's own denial, passed through.
            vec![
                "redirect",
                "deployment/plain",
                "api:9999",
                "--port-mode",
                "named",
                "-n",
                &ns,
            ],
            "port mode named needs a named container port".to_owned(),
        ),
    ];
    for (args, expected) in cases {
        let output = kips(cp, &args).await?;
        let (stdout, stderr) = text(&output);
        ensure!(!output.status.success(), "{args:?} succeeded: {stdout}");
        ensure!(
            stderr.contains(&expected),
            "{args:?}: expected {expected:?} in:\n{stderr}"
        );
        ensure!(!stderr.contains("panicked"), "{stderr}");
    }

    // An unreachable cluster: a kubeconfig pointing at a closed loopback port.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: gone\n  cluster:\n    server: https://127.0.0.1:{closed}\n    insecure-skip-tls-verify: true\nusers:\n- name: u\n  user:\n    token: t\ncontexts:\n- name: gone\n  context: {{cluster: gone, user: u, namespace: dev}}\ncurrent-context: gone\n"
        ),
    )?;
    for args in [
        vec!["status"],
        vec!["redirect", "deploy/api", "api:8080"],
        vec!["revert", "deploy/api"],
        vec!["connect", "deploy/api", "--print"],
    ] {
        let output = tokio::process::Command::new(KIPS)
            .args(&args)
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .kill_on_drop(true)
            .output()
            .await?;
        let (_, stderr) = text(&output);
        ensure!(!output.status.success());
        ensure!(
            stderr.contains(&format!(
                "cannot reach the Kubernetes API server at https://127.0.0.1:{closed}"
            )),
            "{args:?}: {stderr}"
        );
    }
    // A bad value is refused before anything is sent (the cluster is unreachable here).
    let output = tokio::process::Command::new(KIPS)
        .args(["redirect", "deploy/api", "api:80x0", "--kubeconfig"])
        .arg(&kubeconfig)
        .output()
        .await?;
    let (_, stderr) = text(&output);
    assert_eq!(
        stderr.trim(),
        "kips: kips.io/redirect: \"api:80x0\": port \"80x0\" is not a number 1-65535 or a port name (expected <relay>:<port>[/udp][,...] or <port>)"
    );
    Ok(())
}
