//! The developer's day against a real control plane (tests/support/control_plane.rs):
//! `kips doctor` on a healthy setup and on each broken one, the pod's environment on the
//! laptop (`kips connect --env-file`, `kips connect -- <command>`), `kips expose`, and the
//! shell habits (kubectl plugin, completions, progress while `--wait`ing).
//!
//! The webhook runs as a local process registered by URL through the chart's configuration
//! (tests/support/kips_e2e.rs). Each scenario that breaks a webhook (its caBundle, its
//! process) gets a webhook of its own, scoped to its namespaces, so the others never see it.
//! There is no kubelet: a stand-in marks pods Running and Ready (`FakeKubelet`), and tests
//! write the pod fields a kubelet would (IPs, container states) through `pods/status`.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use support::control_plane::{self, ControlPlane};
use support::kips_e2e::{
    FakeKubelet, KipsWebhook, create_relay_secret, eventually, live_pods, wait_available,
};

const KIPS: &str = env!("CARGO_BIN_EXE_kips");
const WAIT: Duration = Duration::from_secs(60);
const CONNECTION_STRING: &str =
    "Endpoint=sb://kips-e2e.invalid/;SharedAccessKeyName=dev;SharedAccessKey=e2e-s3cr3t";
/// The value of the Secret the app's environment refers to; it must never be printed.
const DB_PASSWORD: &str = "pa$$ word'\"with `quotes`";

/// The control plane and one healthy webhook, scoped to the namespaces tests make with
/// [`Env::namespace`]: set up once per test binary.
struct Env {
    cp: &'static ControlPlane,
    kips: KipsWebhook,
}

const HEALTHY: &str = "devday";

async fn env() -> Result<&'static Env> {
    static ENV: tokio::sync::OnceCell<Result<Env, String>> = tokio::sync::OnceCell::const_new();
    ENV.get_or_init(|| async { setup().await.map_err(|e| format!("{e:#}")) })
        .await
        .as_ref()
        .map_err(|e| anyhow::anyhow!("the end-to-end environment did not start: {e}"))
}

async fn setup() -> Result<Env> {
    let cp = control_plane::shared().await?;
    let kips = start_webhook(cp, HEALTHY).await?;
    Ok(Env { cp, kips })
}

async fn start_webhook(cp: &ControlPlane, release: &str) -> Result<KipsWebhook> {
    let kubeconfig = format!("--kubeconfig={}", cp.kubeconfig().display());
    KipsWebhook::start(
        cp,
        release,
        Some(release),
        &["--cluster-hooks=on", &kubeconfig],
    )
    .await
}

/// The name the chart gave the webhook configuration of `webhook`.
fn config_name(webhook: &KipsWebhook) -> String {
    webhook.config.name_any()
}

impl Env {
    fn config(&self) -> String {
        config_name(&self.kips)
    }

    async fn namespace(&self, prefix: &str, labels: &[(&str, &str)]) -> Result<String> {
        self.kips.namespace(self.cp, prefix, labels).await
    }
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

/// `kips doctor <args> -o json`: the exit code and the checks by name.
async fn doctor(cp: &ControlPlane, args: &[&str]) -> Result<(i32, Value, String)> {
    let mut all = vec!["doctor", "-o", "json"];
    all.extend_from_slice(args);
    let output = kips(cp, &all).await?;
    let (stdout, stderr) = text(&output);
    let report: Value = serde_json::from_str(&stdout)
        .with_context(|| format!("doctor printed no JSON:\n{stdout}{stderr}"))?;
    Ok((output.status.code().unwrap_or(-1), report, stderr))
}

fn check<'r>(report: &'r Value, name: &str) -> Result<&'r Value> {
    report["checks"]
        .as_array()
        .and_then(|checks| checks.iter().find(|c| c["name"] == name))
        .with_context(|| format!("no check {name} in {report:#}"))
}

fn outcomes(report: &Value) -> Vec<(String, String)> {
    report["checks"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            (
                c["name"].as_str().unwrap_or_default().to_owned(),
                c["outcome"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// Every check passed, except those named in `failing`, which failed, and in `skipped`.
fn ensure_outcomes(report: &Value, failing: &[&str], skipped: &[&str]) -> Result<()> {
    for (name, outcome) in outcomes(report) {
        let want = if failing.contains(&name.as_str()) {
            "fail"
        } else if skipped.contains(&name.as_str()) {
            "skip"
        } else {
            "pass"
        };
        ensure!(
            outcome == want,
            "check {name}: {outcome}, expected {want}:\n{report:#}"
        );
    }
    for name in failing.iter().chain(skipped) {
        check(report, name)?;
    }
    Ok(())
}

/// A Deployment of one pod, container `app` with port `http`=8080 and the given env.
fn app(name: &str, annotations: Value, env: Value, env_from: Value) -> Result<Deployment> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "annotations": annotations},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "strategy": {"rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": {"app": name, "tier": "backend"}},
                // Pod Security "restricted" allows the app itself: what it refuses is kips'.
                "spec": {
                  "securityContext": {"runAsNonRoot": true, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
                  "containers": [{
                    "name": "app",
                    "image": "registry.invalid/app:1",
                    "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}},
                    "ports": [{"name": "http", "containerPort": 8080}],
                    "resources": {"limits": {"cpu": "500m", "memory": "256Mi"}},
                    "env": env,
                    "envFrom": env_from
                }]}
            }
        }
    }))?)
}

async fn create<K>(client: &Client, ns: &str, object: &K) -> Result<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    Ok(Api::<K>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), object)
        .await?)
}

// --- kips doctor --------------------------------------------------------------------------

#[tokio::test]
async fn doctor_passes_every_check_on_a_healthy_setup() -> Result<()> {
    let env = env().await?;
    let cp = env.cp;
    let client = cp.client()?;
    let ns = env.namespace("doc-ok", &[]).await?;
    create_relay_secret(&client, &ns, CONNECTION_STRING).await?;
    create(&client, &ns, &app("api", json!({}), json!([]), json!([]))?).await?;
    let _kubelet = FakeKubelet::start(client.clone(), &ns);
    wait_available(&client, &ns, "api", 1).await?;
    let redirect = kips(
        cp,
        &[
            "redirect",
            "deployment/api",
            "api:8080",
            "--wait",
            "-n",
            &ns,
        ],
    )
    .await?;
    let (stdout, stderr) = text(&redirect);
    ensure!(redirect.status.success(), "{stdout}{stderr}");
    // Off a terminal, --wait's progress is plain lines, each with the time and the counts.
    ensure!(!stderr.contains('\r'), "{stderr:?}");
    ensure!(
        stderr.lines().any(|l| l.starts_with('[')
            && l.contains("s] deployment/api: ")
            && l.contains("/1 ready")),
        "no progress line in {stderr:?}"
    );

    let (code, report, stderr) = doctor(
        cp,
        &[
            "deployment/api",
            "-n",
            &ns,
            "--webhook-config",
            &env.config(),
        ],
    )
    .await?;
    eprintln!("kips doctor deployment/api (healthy):\n{report:#}");
    ensure_outcomes(&report, &[], &[])?;
    ensure!(code == 0, "exit code {code}: {stderr}");
    assert_eq!(report["ok"], true);
    assert_eq!(
        outcomes(&report)
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>(),
        [
            "kubeconfig",
            "api-server",
            "webhook-config",
            "ca-bundle",
            "webhook-answers",
            "pod-security",
            "relay-secret",
            "images",
            "annotations",
            "pods",
            "rollout"
        ]
    );
    let ca = check(&report, "ca-bundle")?["detail"]
        .as_str()
        .unwrap_or_default();
    ensure!(
        ca.contains("its caBundle trusts what https://127.0.0.1:"),
        "{ca}"
    );
    let answers = check(&report, "webhook-answers")?["detail"]
        .as_str()
        .unwrap_or_default();
    ensure!(
        answers.contains("came back with kips-bridge (ghcr.io/kips-dev/azbridge:0.16.1)"),
        "{answers}"
    );
    let images = check(&report, "images")?["detail"]
        .as_str()
        .unwrap_or_default();
    ensure!(
        images.contains("kips-bridge ghcr.io/kips-dev/azbridge:0.16.1"),
        "{images}"
    );
    let psa = check(&report, "pod-security")?["detail"]
        .as_str()
        .unwrap_or_default();
    ensure!(psa.contains("port mode iptables"), "{psa}");

    // Without a workload, as a table: the same checks up to the images, all passing.
    let table = kips(
        cp,
        &["doctor", "-n", &ns, "--webhook-config", &env.config()],
    )
    .await?;
    let (stdout, stderr) = text(&table);
    eprintln!("kips doctor (table):\n{stdout}{stderr}");
    ensure!(table.status.success(), "{stdout}{stderr}");
    ensure!(
        stdout.starts_with(&format!("kips doctor: namespace {ns}\n")),
        "{stdout}"
    );
    ensure!(
        stdout.lines().filter(|l| l.starts_with("  ok  ")).count() == 8,
        "{stdout}"
    );
    ensure!(
        stdout.trim_end().ends_with("all 8 checks passed"),
        "{stdout}"
    );
    ensure!(
        !stdout.contains("e2e-s3cr3t"),
        "the connection string leaked"
    );
    Ok(())
}

#[tokio::test]
async fn doctor_names_a_missing_relay_secret_and_its_fix() -> Result<()> {
    let env = env().await?;
    let cp = env.cp;
    let ns = env.namespace("doc-nosecret", &[]).await?;
    let (code, report, _) = doctor(cp, &["-n", &ns, "--webhook-config", &env.config()]).await?;
    ensure_outcomes(&report, &["relay-secret"], &[])?;
    ensure!(code == 1, "exit code {code}");
    let secret = check(&report, "relay-secret")?;
    assert_eq!(
        secret["detail"],
        format!(
            "the relay Secret \"kips-relay\" does not exist in namespace \"{ns}\": the redirected pods will not start until it does (key connectionString)"
        )
        .as_str()
    );
    let fix = secret["fix"].as_str().unwrap_or_default();
    ensure!(
        fix.starts_with(&format!(
            "kubectl create secret generic kips-relay -n {ns} --from-literal=connectionString='Endpoint=sb://"
        )),
        "{fix}"
    );

    // A value ending in a newline is named too.
    create_relay_secret(&cp.client()?, &ns, &format!("{CONNECTION_STRING}\n")).await?;
    let (code, report, _) = doctor(cp, &["-n", &ns, "--webhook-config", &env.config()]).await?;
    ensure!(code == 1);
    let secret = check(&report, "relay-secret")?;
    ensure!(
        secret["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("ends in a newline"),
        "{secret}"
    );
    ensure!(
        !report.to_string().contains("e2e-s3cr3t"),
        "the value leaked"
    );
    Ok(())
}

#[tokio::test]
async fn doctor_names_a_ca_bundle_that_does_not_trust_the_webhook() -> Result<()> {
    let env = env().await?;
    let cp = env.cp;
    let own = start_webhook(cp, "untrusted").await?;
    let ns = own.namespace(cp, "doc-ca", &[]).await?;
    create_relay_secret(&cp.client()?, &ns, CONNECTION_STRING).await?;
    // Another CA's certificate in every caBundle: the served certificate is no longer trusted.
    let other = kips::tls::generate_ca("not the webhook's CA", Duration::from_secs(3600))?;
    let api = Api::<MutatingWebhookConfiguration>::all(cp.client()?);
    let config = config_name(&own);
    let mut stored = api.get(&config).await?;
    for webhook in stored.webhooks.iter_mut().flatten() {
        webhook.client_config.ca_bundle =
            Some(k8s_openapi::ByteString(other.cert.clone().into_bytes()));
    }
    api.replace(&config, &PostParams::default(), &stored)
        .await?;
    // The API server picks the new bundle up asynchronously.
    let (code, report) = eventually(
        "the API server to refuse the webhook's certificate",
        WAIT,
        || {
            let (ns, config) = (ns.clone(), config.clone());
            async move {
                let (code, report, _) =
                    doctor(cp, &["-n", &ns, "--webhook-config", &config]).await?;
                let detail = check(&report, "webhook-answers")?["detail"].to_string();
                Ok(detail.contains("x509").then_some((code, report)))
            }
        },
    )
    .await?;
    eprintln!("kips doctor (untrusted caBundle):\n{report:#}");
    // Without an injected pod there is no image to look at.
    ensure_outcomes(&report, &["ca-bundle", "webhook-answers"], &["images"])?;
    ensure!(code == 1);
    let ca = check(&report, "ca-bundle")?;
    let detail = ca["detail"].as_str().unwrap_or_default();
    ensure!(
        detail.contains("its caBundle does not trust what https://127.0.0.1:")
            && detail.contains("UnknownIssuer"),
        "{detail}"
    );
    ensure!(
        ca["fix"]
            .as_str()
            .unwrap_or_default()
            .contains("put the CA that signed the certificate served at https://127.0.0.1:"),
        "{ca}"
    );
    let answers = check(&report, "webhook-answers")?;
    ensure!(
        answers["fix"]
            .as_str()
            .unwrap_or_default()
            .starts_with("the API server does not trust the webhook's certificate"),
        "{answers}"
    );
    Ok(())
}

#[tokio::test]
async fn doctor_names_a_webhook_that_is_down() -> Result<()> {
    let env = env().await?;
    let cp = env.cp;
    let mut own = start_webhook(cp, "down").await?;
    let ns = own.namespace(cp, "doc-down", &[]).await?;
    create_relay_secret(&cp.client()?, &ns, CONNECTION_STRING).await?;
    let port = own.port();
    own.webhook.terminate(Duration::from_secs(20))?;
    let (code, report, _) =
        doctor(cp, &["-n", &ns, "--webhook-config", &config_name(&own)]).await?;
    eprintln!("kips doctor (webhook down):\n{report:#}");
    // Without an injected pod there is no image to look at.
    ensure_outcomes(&report, &["ca-bundle", "webhook-answers"], &["images"])?;
    ensure!(code == 1);
    let ca = check(&report, "ca-bundle")?["detail"].to_string();
    ensure!(
        ca.contains(&format!(
            "nothing answers at https://127.0.0.1:{port}/mutate"
        )) && ca.contains("onnection refused"),
        "{ca}"
    );
    let answers = check(&report, "webhook-answers")?;
    ensure!(
        answers["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("failed calling webhook"),
        "{answers}"
    );
    ensure!(
        answers["fix"]
            .as_str()
            .unwrap_or_default()
            .starts_with("the API server cannot reach the kips webhook"),
        "{answers}"
    );
    Ok(())
}

#[tokio::test]
async fn doctor_names_iptables_mode_in_a_restricted_namespace() -> Result<()> {
    let env = env().await?;
    let cp = env.cp;
    let client = cp.client()?;
    let ns = env
        .namespace(
            "doc-restricted",
            &[("pod-security.kubernetes.io/enforce", "restricted")],
        )
        .await?;
    create_relay_secret(&client, &ns, CONNECTION_STRING).await?;
    // A numeric port: auto picks iptables, whose kips-init "restricted" rejects.
    create(
        &client,
        &ns,
        &app(
            "api",
            json!({"kips.io/redirect": "api:8080"}),
            json!([]),
            json!([]),
        )?,
    )
    .await?;
    let (code, report) = eventually("the rejected pods to show", WAIT, || {
        let ns = ns.clone();
        async move {
            let (code, report, _) = doctor(
                cp,
                &[
                    "deployment/api",
                    "-n",
                    &ns,
                    "--webhook-config",
                    &env.config(),
                ],
            )
            .await?;
            let rollout = check(&report, "rollout")?["detail"].to_string();
            Ok(rollout.contains("pods rejected").then_some((code, report)))
        }
    })
    .await?;
    eprintln!("kips doctor deployment/api (restricted, iptables):\n{report:#}");
    ensure_outcomes(&report, &["pod-security", "pods", "rollout"], &[])?;
    ensure!(code == 1);
    let psa = check(&report, "pod-security")?;
    let detail = psa["detail"].as_str().unwrap_or_default();
    ensure!(
        detail.contains(&format!(
            "namespace {ns} enforces Pod Security \"restricted\""
        )) && detail.contains("deployment/api gets iptables: port mode auto picks iptables"),
        "{detail}"
    );
    let fix = psa["fix"].as_str().unwrap_or_default();
    ensure!(
        fix.contains(&format!(
            "kips redirect deployment/api <relay>:<port name> --port-mode named -n {ns}"
        )) && fix.contains("pod-security.kubernetes.io/enforce=privileged"),
        "{fix}"
    );
    // The same namespace without a workload: named mode is what it allows, which passes.
    let (code, report, _) = doctor(cp, &["-n", &ns, "--webhook-config", &env.config()]).await?;
    ensure_outcomes(&report, &[], &[])?;
    ensure!(code == 0);
    Ok(())
}

#[tokio::test]
async fn doctor_stops_at_an_unreachable_api_server() -> Result<()> {
    // A kubeconfig pointing at a closed loopback port.
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
    let output = tokio::process::Command::new(KIPS)
        .args(["doctor", "deployment/api", "--kubeconfig"])
        .arg(&kubeconfig)
        .kill_on_drop(true)
        .output()
        .await?;
    let (stdout, stderr) = text(&output);
    ensure!(output.status.code() == Some(1), "{stdout}{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    ensure!(lines[1].starts_with("  ok    kubeconfig"), "{stdout}");
    ensure!(
        lines[2].starts_with("  FAIL  api-server")
            && lines[2].contains(&format!(
                "cannot reach the Kubernetes API server at https://127.0.0.1:{closed}"
            )),
        "{stdout}"
    );
    ensure!(
        lines[3].contains("fix: make https://127.0.0.1:"),
        "{stdout}"
    );
    ensure!(
        lines[4..lines.len() - 1]
            .iter()
            .all(|l| l.starts_with("  skip  ") && l.ends_with("needs the API server")),
        "{stdout}"
    );
    ensure!(
        stdout
            .trim_end()
            .ends_with("1 of 11 checks failed (1 passed, 9 skipped)"),
        "{stdout}"
    );
    ensure!(stderr.contains("kips: 1 of 11 checks failed"), "{stderr}");
    Ok(())
}

// --- the pod's environment on the laptop --------------------------------------------------

/// A namespace with a ConfigMap, a Secret and a redirected Deployment whose container
/// uses every kind of variable, one Ready pod with the fields a kubelet writes.
async fn environment_scene(env: &Env, prefix: &str) -> Result<(String, String)> {
    let cp = env.cp;
    let client = cp.client()?;
    let ns = env.namespace(prefix, &[]).await?;
    create_relay_secret(&client, &ns, CONNECTION_STRING).await?;
    let settings: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "settings"},
        "data": {"LOG_LEVEL": "debug", "REGION": "west", "dotted.key": "no shell name"}
    }))?;
    create(&client, &ns, &settings).await?;
    let db: Secret = serde_json::from_value(json!({
        "metadata": {"name": "db"},
        "stringData": {"password": DB_PASSWORD, "user": "admin"}
    }))?;
    create(&client, &ns, &db).await?;
    let deployment = app(
        "api",
        json!({"kips.io/redirect": "api:http"}),
        json!([
            {"name": "GREETING", "value": "hello world"},
            {"name": "REGION", "value": "east"},
            {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "LOG_LEVEL"}}},
            {"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "DATABASE_URL", "value": "postgres://$(CFG_user)@db.$(POD_NAMESPACE):5432/$(REGION)?$(UNDEFINED)&$$(REGION)"},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "TIER", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['tier']"}}},
            {"name": "MEMORY_MI", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}}
        ]),
        json!([
            {"configMapRef": {"name": "settings"}},
            {"secretRef": {"name": "db"}, "prefix": "CFG_"},
            {"configMapRef": {"name": "optional-and-absent", "optional": true}}
        ]),
    )?;
    create(&client, &ns, &deployment).await?;
    let _kubelet = FakeKubelet::start(client.clone(), &ns);
    wait_available(&client, &ns, "api", 1).await?;
    // What a kubelet would write: the pod's IP.
    let pod = eventually("an injected, ready api pod", WAIT, || {
        let (client, ns) = (client.clone(), ns.clone());
        async move {
            let pods = live_pods(&client, &ns, "app=api").await?;
            Ok(pods
                .into_iter()
                .find(|p| p.annotations().contains_key("kips.io/status")))
        }
    })
    .await?;
    let name = pod.name_any();
    Api::<Pod>::namespaced(client.clone(), &ns)
        .patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"podIP": "10.244.0.7", "podIPs": [{"ip": "10.244.0.7"}]}}),
            ),
        )
        .await?;
    wait_available(&client, &ns, "api", 1).await?;
    Ok((ns, name))
}

#[tokio::test]
async fn env_file_holds_the_pods_environment_and_never_prints_a_secret() -> Result<()> {
    let env = env().await?;
    let cp = env.cp;
    let (ns, pod) = environment_scene(env, "env-file").await?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join(".env");
    // An older, wider file is replaced, not reused.
    std::fs::write(&file, "OLD=1\n")?;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644))?;
    let file_arg = file.display().to_string();
    let output = kips(
        cp,
        &[
            "connect",
            "deployment/api",
            "-n",
            &ns,
            "--env-file",
            &file_arg,
            "--print",
        ],
    )
    .await?;
    let (stdout, stderr) = text(&output);
    ensure!(output.status.success(), "{stdout}{stderr}");
    eprintln!("kips connect --env-file:\n{stdout}{stderr}");
    ensure!(
        !stdout.contains("pa$$") && !stderr.contains("pa$$"),
        "a Secret's value was printed"
    );
    ensure!(
        stdout.contains(&format!(
            "wrote 14 variables of container app of pod {pod} to {} (mode 0600); from Secrets: CFG_password, CFG_user, DB_PASSWORD, DATABASE_URL",
            file.display()
        )),
        "{stdout}"
    );
    // A name the pod has but a shell cannot assign stays out of the file, with a word.
    ensure!(
        stderr.contains(
            "(a shell cannot assign these names; the command after -- gets them): dotted.key"
        ),
        "{stderr}"
    );
    let mode = std::fs::metadata(&file)?.permissions().mode() & 0o777;
    ensure!(mode == 0o600, "mode {mode:o}");
    let content = std::fs::read_to_string(&file)?;
    let variables: Vec<&str> = content.lines().filter(|l| !l.starts_with('#')).collect();
    let expected = [
        "LOG_LEVEL=debug".to_owned(),
        "REGION=east".to_owned(),
        "CFG_password='pa$$ word'\\''\"with `quotes`'".to_owned(),
        "CFG_user=admin".to_owned(),
        "GREETING='hello world'".to_owned(),
        "MODE=debug".to_owned(),
        "DB_PASSWORD='pa$$ word'\\''\"with `quotes`'".to_owned(),
        format!("POD_NAME={pod}"),
        format!("POD_NAMESPACE={ns}"),
        format!("DATABASE_URL='postgres://admin@db.{ns}:5432/east?$(UNDEFINED)&$(REGION)'"),
        "POD_IP=10.244.0.7".to_owned(),
        "TIER=backend".to_owned(),
        "MEMORY_MI=256".to_owned(),
    ];
    assert_eq!(variables, expected);
    // A shell reads the values back as the pod has them.
    let read = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "set -a; . '{}'; set +a; printf '%s|%s' \"$DB_PASSWORD\" \"$GREETING\"",
            file.display()
        ))
        .output()?;
    assert_eq!(
        String::from_utf8_lossy(&read.stdout),
        format!("{DB_PASSWORD}|hello world")
    );
    Ok(())
}

#[tokio::test]
async fn a_session_command_gets_the_environment_and_its_exit_code_becomes_kips() -> Result<()> {
    let env = env().await?;
    let cp = env.cp;
    let (ns, pod) = environment_scene(env, "env-cmd").await?;
    let dir = tempfile::tempdir()?;
    let fake = dir.path().join("azbridge");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dev/fake-azbridge"),
        &fake,
    )?;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755))?;
    let seen = dir.path().join("seen");
    let script = format!(
        // It runs while the bridge does: it waits for the stand-in to be up.
        "until ls '{dir}'/*.args >/dev/null 2>&1; do sleep 0.05; done; printf '%s|%s|%s' \"$DB_PASSWORD\" \"$POD_NAME\" \"$HOME\" > '{seen}'; exit 7",
        dir = dir.path().display(),
        seen = seen.display()
    );
    let output = tokio::process::Command::new(KIPS)
        .args([
            "connect",
            "deployment/api",
            "-n",
            &ns,
            "--connection-string-from-secret",
        ])
        .arg("--azbridge")
        .arg(&fake)
        .arg("--kubeconfig")
        .arg(cp.kubeconfig())
        .args(["--", "sh", "-c", &script])
        .env("FAKE_AZBRIDGE_DIR", dir.path())
        .env("HOME", "/home/dev")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await?;
    let (stdout, stderr) = text(&output);
    eprintln!("kips connect -- sh -c ...:\n{stdout}{stderr}");
    ensure!(
        output.status.code() == Some(7),
        "kips exited {:?}, expected the command's 7:\n{stdout}{stderr}",
        output.status
    );
    ensure!(
        !stdout.contains("pa$$") && !stderr.contains("pa$$"),
        "a Secret's value was printed"
    );
    // The command saw the pod's variables over kips' own environment.
    assert_eq!(
        std::fs::read_to_string(&seen)?,
        format!("{DB_PASSWORD}|{pod}|/home/dev")
    );
    // The bridge ran for the session and was stopped when the command ended.
    let stopped: Vec<PathBuf> = std::fs::read_dir(dir.path())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "stopped"))
        .collect();
    ensure!(
        stopped.len() == 1,
        "azbridge was not stopped: {stdout}{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&stopped[0])?.trim(), "TERM");
    ensure!(
        stderr.contains("sh exited (exit status: 7): stopping azbridge"),
        "{stderr}"
    );

    // A command that succeeds makes kips succeed.
    let output = tokio::process::Command::new(KIPS)
        .args([
            "connect",
            "deployment/api",
            "-n",
            &ns,
            "--connection-string-from-secret",
        ])
        .arg("--azbridge")
        .arg(&fake)
        .arg("--kubeconfig")
        .arg(cp.kubeconfig())
        .args(["--", "true"])
        .env("FAKE_AZBRIDGE_DIR", dir.path())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await?;
    ensure!(output.status.success(), "{:?}", text(&output));
    Ok(())
}

#[tokio::test]
async fn an_env_that_needs_a_pod_fails_clearly_without_one() -> Result<()> {
    let env = env().await?;
    let cp = env.cp;
    let client = cp.client()?;
    let ns = env.namespace("env-nopod", &[]).await?;
    create_relay_secret(&client, &ns, CONNECTION_STRING).await?;
    let deployment = app(
        "api",
        json!({"kips.io/redirect": "api:http"}),
        json!([{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]),
        json!([]),
    )?;
    create(&client, &ns, &deployment).await?;
    // No kubelet stand-in: the pod stays Pending.
    let output = kips(
        cp,
        &[
            "connect",
            "deployment/api",
            "-n",
            &ns,
            "--env-file",
            "/dev/null/x",
            "--print",
        ],
    )
    .await?;
    let (_, stderr) = text(&output);
    ensure!(!output.status.success());
    ensure!(
        stderr.contains(&format!(
            "deployment/api in namespace {ns} has no running pod, and its environment needs one: POD_IP comes from the pod's status.podIP"
        )),
        "{stderr}"
    );
    Ok(())
}

// --- kips expose --------------------------------------------------------------------------

#[tokio::test]
async fn expose_makes_a_bridge_only_service_and_deletes_all_of_it() -> Result<()> {
    let env = env().await?;
    let cp = env.cp;
    let client = cp.client()?;
    // Named mode needs no privilege: even a restricted namespace admits the bridge pod.
    let ns = env
        .namespace(
            "expose",
            &[("pod-security.kubernetes.io/enforce", "restricted")],
        )
        .await?;
    create_relay_secret(&client, &ns, CONNECTION_STRING).await?;
    let _kubelet = FakeKubelet::start(client.clone(), &ns);
    let output = kips(
        cp,
        &["expose", "pay", "--port", "8080,9090", "-n", &ns, "--wait"],
    )
    .await?;
    let (stdout, stderr) = text(&output);
    eprintln!("kips expose:\n{stdout}{stderr}");
    ensure!(output.status.success(), "{stdout}{stderr}");
    ensure!(
        stdout.contains(&format!(
            "in-cluster clients reach pay.{ns}.svc:8080, pay.{ns}.svc:9090"
        )),
        "{stdout}"
    );
    ensure!(
        stdout.contains("deployment/pay: 1/1 pods injected and ready"),
        "{stdout}"
    );

    // The objects.
    let deployment = Api::<Deployment>::namespaced(client.clone(), &ns)
        .get("pay")
        .await?;
    let labels = deployment.labels();
    assert_eq!(labels["app.kubernetes.io/managed-by"], "kips");
    assert_eq!(labels["kips.io/expose"], "pay");
    assert_eq!(
        deployment.annotations()["kips.io/redirect"],
        "pay:p8080,pay:p9090"
    );
    assert_eq!(deployment.annotations()["kips.io/port-mode"], "named");
    let service = Api::<Service>::namespaced(client.clone(), &ns)
        .get("pay")
        .await?;
    let owner = &service.owner_references()[0];
    assert_eq!(
        (
            owner.kind.as_str(),
            owner.name.as_str(),
            Some(owner.uid.as_str())
        ),
        ("Deployment", "pay", deployment.metadata.uid.as_deref())
    );
    let ports = serde_json::to_value(&service.spec.as_ref().unwrap().ports)?;
    assert_eq!(
        ports
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p["port"].clone(), p["targetPort"].clone()))
            .collect::<Vec<_>>(),
        [(json!(8080), json!("p8080")), (json!(9090), json!("p9090"))]
    );

    // The pod: the sidecar alone in named mode, holding the names the Service targets.
    let pods = live_pods(&client, &ns, "kips.io/expose=pay").await?;
    ensure!(pods.len() == 1, "{} pods", pods.len());
    let pod = &pods[0];
    let status: Value = serde_json::from_str(&pod.annotations()["kips.io/status"])?;
    assert_eq!(status["portMode"], "named");
    let spec = pod.spec.as_ref().unwrap();
    ensure!(
        spec.init_containers
            .iter()
            .flatten()
            .all(|c| c.name != "kips-init"),
        "no kips-init in named mode"
    );
    let bridge = spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .find(|c| c.name == "kips-bridge")
        .context("no kips-bridge")?;
    let bridge_ports: Vec<(String, i32)> = bridge
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.clone().unwrap_or_default(), p.container_port))
        .collect();
    assert_eq!(
        bridge_ports,
        [("p8080".to_owned(), 15100), ("p9090".to_owned(), 15101)]
    );
    let placeholder = &spec.containers[0];
    assert_eq!(placeholder.name, "placeholder");
    let renamed: Vec<String> = placeholder
        .ports
        .iter()
        .flatten()
        .filter_map(|p| p.name.clone())
        .collect();
    assert_eq!(renamed, ["kips-app-8080", "kips-app-9090"]);

    // kips status and kips connect treat it as any redirected workload.
    let (stdout, _) = text(&kips(cp, &["status", "-n", &ns]).await?);
    ensure!(
        stdout.contains("deployment/pay")
            && stdout.contains("named")
            && stdout.contains("complete"),
        "{stdout}"
    );
    let (stdout, stderr) =
        text(&kips(cp, &["connect", "deployment/pay", "-n", &ns, "--print"]).await?);
    ensure!(
        stdout.contains("-T 'pay:p8080/localhost:8080;p9090/localhost:9090'")
            || stdout.contains("-T pay:p8080/localhost:8080"),
        "{stdout}{stderr}"
    );

    // Running it again updates what kips made; others' objects are never touched.
    let again = kips(cp, &["expose", "pay", "--port", "8080", "-n", &ns]).await?;
    ensure!(again.status.success(), "{:?}", text(&again));
    ensure!(
        text(&again).0.contains("updated Deployment pay"),
        "{:?}",
        text(&again)
    );
    let theirs: Service = serde_json::from_value(json!({
        "metadata": {"name": "theirs"},
        "spec": {"ports": [{"port": 80}]}
    }))?;
    create(&client, &ns, &theirs).await?;
    for args in [
        vec!["expose", "theirs", "--port", "80", "-n", &ns],
        vec!["expose", "theirs", "--delete", "-n", &ns],
    ] {
        let refused = kips(cp, &args).await?;
        let (_, stderr) = text(&refused);
        ensure!(!refused.status.success());
        ensure!(
            stderr.contains(&format!(
                "Service theirs in namespace {ns} exists and kips did not make it"
            )),
            "{stderr}"
        );
    }
    ensure!(
        Api::<Deployment>::namespaced(client.clone(), &ns)
            .get_opt("theirs")
            .await?
            .is_none(),
        "a Deployment was made beside someone else's Service"
    );

    // --delete removes the Deployment, its pod and the Service it owns.
    let deleted = kips(cp, &["expose", "pay", "--delete", "-n", &ns]).await?;
    let (stdout, stderr) = text(&deleted);
    ensure!(deleted.status.success(), "{stdout}{stderr}");
    ensure!(
        stdout.contains("removed Deployment pay and Service pay"),
        "{stdout}"
    );
    ensure!(
        Api::<Service>::namespaced(client.clone(), &ns)
            .get_opt("pay")
            .await?
            .is_none()
    );
    ensure!(
        Api::<Deployment>::namespaced(client.clone(), &ns)
            .get_opt("pay")
            .await?
            .is_none()
    );
    let gone = kips(cp, &["expose", "pay", "--delete", "-n", &ns]).await?;
    ensure!(
        text(&gone)
            .1
            .contains(&format!("nothing named pay is exposed in namespace {ns}")),
        "{:?}",
        text(&gone)
    );
    Ok(())
}

// --- shell habits ---------------------------------------------------------------------------

#[tokio::test]
async fn kips_works_as_a_kubectl_plugin() -> Result<()> {
    let env = env().await?;
    let cp = env.cp;
    let kubectl = support::node::bin_dir()?.join("kubectl");
    ensure!(kubectl.exists(), "no kubectl in the node's bin dir");
    let dir = tempfile::tempdir()?;
    let plugin = dir.path().join("kubectl-kips");
    std::os::unix::fs::symlink(KIPS, &plugin)?;
    let path = format!(
        "{}:{}",
        dir.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let run = |args: &[&str]| {
        std::process::Command::new(&kubectl)
            .args(args)
            .env("PATH", &path)
            .env("KUBECONFIG", cp.kubeconfig())
            .stdin(std::process::Stdio::null())
            .output()
    };
    let list = run(&["plugin", "list"])?;
    ensure!(
        String::from_utf8_lossy(&list.stdout).contains("kubectl-kips"),
        "{:?}",
        list
    );
    let help = run(&["kips", "--help"])?;
    let (stdout, stderr) = text(&help);
    ensure!(help.status.success(), "{stdout}{stderr}");
    ensure!(stdout.contains("Usage: kubectl kips <COMMAND>"), "{stdout}");
    let sub = run(&["kips", "status", "--help"])?;
    ensure!(
        text(&sub)
            .0
            .contains("Usage: kubectl kips status [OPTIONS]"),
        "{:?}",
        text(&sub)
    );
    // Through kubectl, against the cluster (the kubeconfig comes from $KUBECONFIG).
    let ns = env.namespace("plugin", &[]).await?;
    let status = run(&["kips", "status", "-n", &ns])?;
    let (stdout, stderr) = text(&status);
    ensure!(status.status.success(), "{stdout}{stderr}");
    ensure!(
        stderr.contains(&format!("No redirected workloads in namespace {ns}.")),
        "{stderr}"
    );
    // Run directly, kips keeps its own name.
    let plain = std::process::Command::new(KIPS).arg("--help").output()?;
    ensure!(text(&plain).0.contains("Usage: kips <COMMAND>"));
    Ok(())
}

#[test]
fn completion_scripts_load_in_their_shells() -> Result<()> {
    let script = |shell: &str| -> Result<String> {
        let out = std::process::Command::new(KIPS)
            .args(["completion", shell])
            .output()?;
        ensure!(out.status.success(), "{:?}", out);
        Ok(String::from_utf8(out.stdout)?)
    };
    // bash loads it and completes kips' subcommands.
    let bash = script("bash")?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("kips.bash");
    std::fs::write(&file, &bash)?;
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            ". '{}'; complete -p kips; COMP_WORDS=(kips do); COMP_CWORD=1; _kips kips do kips; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            file.display()
        ))
        .output()?;
    let (stdout, stderr) = text(&out);
    ensure!(out.status.success(), "{stdout}{stderr}");
    ensure!(stdout.contains("-F _kips kips"), "{stdout}");
    ensure!(stdout.lines().any(|l| l == "doctor"), "{stdout}");
    let zsh = script("zsh")?;
    ensure!(zsh.starts_with("#compdef kips"), "{zsh}");
    ensure!(
        zsh.contains("'doctor:") && zsh.contains("'expose:"),
        "zsh lacks commands"
    );
    let fish = script("fish")?;
    ensure!(
        fish.contains("complete -c kips") && fish.contains("-a \"expose\""),
        "{fish}"
    );
    let bad = std::process::Command::new(KIPS)
        .args(["completion", "tcsh"])
        .output()?;
    ensure!(!bad.status.success());
    if bash.is_empty() {
        bail!("empty bash completion");
    }
    Ok(())
}
