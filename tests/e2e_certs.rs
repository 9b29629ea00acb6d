//! The chart and the webhook's own certificates on a real control plane
//! (tests/support/control_plane.rs: kube-apiserver, kube-controller-manager, etcd; helm).
//!
//! - `helm install` of the chart: the API server accepts every rendered object, and the
//!   webhook pods the ReplicaSet controller makes pass Pod Security `restricted`.
//! - `--cert-mode self` with two concurrent `kips webhook` processes that run with the
//!   chart's ServiceAccount (so the chart's RBAC is what is tested) and are registered
//!   through the chart's MutatingWebhookConfiguration, pointed at them by URL: one Secret,
//!   one caBundle, both serving that pair, readiness only once trusted; then a forced
//!   renewal and a full CA rotation while the real API server keeps calling both, with
//!   zero failed requests.

mod support;

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{Pod, Secret, ServiceAccount};
use kube::api::{DeleteParams, DynamicObject, GroupVersionKind, ListParams, PostParams};
use kube::{Api, Client, ResourceExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::json;

use kips::certs::bundle::{CertInfo, parse_pem_certs};
use kips::certs::layout::CertSecret;
use kips::certs::trust::ca_bundles;
use support::control_plane::{self, ControlPlane};
use support::kips_e2e::{CHART, eventually, helm};
use support::webhook::Webhook;

/// Both tests install webhook configurations that fail closed for kips objects; one at a
/// time, so that one test's unreachable webhook never answers the other's requests.
static WEBHOOK_CONFIGS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_install_is_accepted_and_the_pods_pass_restricted_pod_security() -> Result<()> {
    let _one_at_a_time = WEBHOOK_CONFIGS.lock().await;
    let cp = control_plane::shared().await?;
    let client = cp.client()?;
    let ns = cp
        .create_namespace_with_labels(
            "kips-system",
            &[("pod-security.kubernetes.io/enforce", "restricted")],
        )
        .await?;

    // A wrong value is refused at install time, with the schema's message.
    let out = cp
        .helm()
        .args([
            "install",
            "kips-bad",
            CHART,
            "-n",
            &ns,
            "--set",
            "certs.mode=vault",
        ])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "a bad value was installed");
    ensure!(
        stderr.contains("/certs/mode") && stderr.contains("'self', 'cert-manager', 'provided'"),
        "{stderr}"
    );

    let started = Instant::now();
    let notes = helm(cp, &["install", "kips", CHART, "-n", &ns]).await?;
    ensure!(
        notes.contains("kubectl -n <app-namespace> create secret generic kips-relay")
            && notes.contains("--from-literal=connectionString=")
            && notes.contains("annotate deployment <name> kips.io/redirect=api:8080"),
        "NOTES do not give the next two commands:\n{notes}"
    );
    eprintln!("helm install took {:?}", started.elapsed());

    // The same chart in provided mode, next to it (its own cluster-scoped names).
    let dir = tempfile::tempdir()?;
    let ca = kips::tls::generate_ca("e2e provided CA", Duration::from_secs(3600))?;
    let ca_file = dir.path().join("ca.crt");
    std::fs::write(&ca_file, &ca.cert)?;
    helm(
        cp,
        &[
            "install",
            "kips-provided",
            CHART,
            "-n",
            &ns,
            "--set",
            "certs.mode=provided,certs.provided.secretName=corp-webhook-tls",
            "--set-file",
            &format!("webhook.caBundle={}", ca_file.display()),
        ],
    )
    .await?;

    let mut checked = Vec::new();
    for release in ["kips", "kips-provided"] {
        let manifest = helm(cp, &["get", "manifest", release, "-n", &ns]).await?;
        for doc in serde_yaml::Deserializer::from_str(&manifest) {
            let value: serde_json::Value = serde::Deserialize::deserialize(doc)?;
            if value.is_null() {
                continue;
            }
            let object: DynamicObject = serde_json::from_value(value)?;
            let stored = read_back(&client, &object).await?;
            ensure!(
                stored
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("app.kubernetes.io/instance"))
                    == Some(&release.to_owned()),
                "{} {} lacks the release label",
                kind_of(&object),
                object.name_any()
            );
            checked.push(format!("{}/{}", kind_of(&object), object.name_any()));
        }
    }
    for expected in [
        "ServiceAccount/kips",
        "Role/kips",
        "RoleBinding/kips",
        "ClusterRole/kips",
        "ClusterRoleBinding/kips",
        "Service/kips",
        "Deployment/kips",
        "PodDisruptionBudget/kips",
        "MutatingWebhookConfiguration/kips",
        "MutatingWebhookConfiguration/kips-provided",
        "Deployment/kips-provided",
    ] {
        ensure!(
            checked.iter().any(|c| c == expected),
            "{expected} not in {checked:?}"
        );
    }

    // The ReplicaSet controller made both webhook pods in a namespace that enforces
    // Pod Security "restricted": the pod spec passed it (they stay Pending: no kubelet).
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let selector = "app.kubernetes.io/instance=kips,app.kubernetes.io/component=webhook";
    eventually("two kips webhook pods", Duration::from_secs(30), || {
        let pods = pods.clone();
        async move {
            let list = pods.list(&ListParams::default().labels(selector)).await?;
            Ok((list.items.len() == 2).then_some(()))
        }
    })
    .await?;

    helm(cp, &["uninstall", "kips", "-n", &ns, "--wait"]).await?;
    helm(cp, &["uninstall", "kips-provided", "-n", &ns, "--wait"]).await?;
    let configs = Api::<MutatingWebhookConfiguration>::all(client);
    ensure!(
        configs.get_opt("kips").await?.is_none(),
        "uninstall left the webhook configuration"
    );
    Ok(())
}

fn kind_of(object: &DynamicObject) -> String {
    object
        .types
        .as_ref()
        .map(|t| t.kind.clone())
        .unwrap_or_default()
}

/// The object as the API server stores it (it must exist).
async fn read_back(client: &Client, object: &DynamicObject) -> Result<DynamicObject> {
    let types = object
        .types
        .as_ref()
        .context("a rendered object without apiVersion/kind")?;
    let gvk = GroupVersionKind::try_from(types)?;
    let (resource, caps) = kube::discovery::pinned_kind(client, &gvk).await?;
    let api: Api<DynamicObject> = match (caps.scope, object.namespace()) {
        (kube::discovery::Scope::Namespaced, Some(ns)) => {
            Api::namespaced_with(client.clone(), &ns, &resource)
        }
        (kube::discovery::Scope::Namespaced, None) => {
            bail!("{} {} has no namespace", types.kind, object.name_any())
        }
        (kube::discovery::Scope::Cluster, _) => Api::all_with(client.clone(), &resource),
    };
    api.get(&object.name_any())
        .await
        .with_context(|| format!("{} {} is not in the cluster", types.kind, object.name_any()))
}

// ---------------------------------------------------------------------------------------
// --cert-mode self with two replicas

const RELEASE: &str = "kips-certs";
const SECRET: &str = "kips-certs-webhook-tls";
const CHECK_INTERVAL: &str = "200ms";
const OVERLAP: &str = "3s";

/// A local `kips webhook --cert-mode self` on a free loopback port, with the chart's
/// ServiceAccount (`kubeconfig`); killed when dropped (and when the test binary dies).
async fn self_managed_webhook(ns: &str, kubeconfig: &Path) -> Result<Webhook> {
    let dir = tempfile::Builder::new().prefix("kips-webhook-").tempdir()?;
    let args: Vec<String> = [
        "webhook",
        "--listen=127.0.0.1:0",
        "--cert-mode=self",
        &format!("--namespace={ns}"),
        &format!("--service-name={RELEASE}"),
        "--san=127.0.0.1",
        &format!("--cert-secret={SECRET}"),
        &format!("--webhook-config={RELEASE}"),
        &format!("--cert-check-interval={CHECK_INTERVAL}"),
        &format!("--rotation-overlap={OVERLAP}"),
        &format!("--kubeconfig={}", kubeconfig.display()),
        "--log-format=json",
    ]
    .iter()
    .map(|a| (*a).to_owned())
    .collect();
    tokio::task::spawn_blocking(move || Webhook::spawn(dir, &args)).await?
}

/// Accepts any server certificate: for /readyz, which says nothing about trust itself.
#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn health_client() -> Result<reqwest::Client> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
        .with_no_client_auth();
    Ok(reqwest::Client::builder()
        .use_preconfigured_tls(config)
        .timeout(Duration::from_secs(5))
        .build()?)
}

async fn readyz(client: &reqwest::Client, port: u16) -> Result<u16> {
    let response = client
        .get(format!("https://127.0.0.1:{port}/readyz"))
        .send()
        .await?;
    Ok(response.status().as_u16())
}

/// The certificate `127.0.0.1:port` serves, in a handshake that trusts only `bundle`.
async fn served_cert(port: u16, bundle: &str) -> Result<Vec<u8>> {
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
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let name = ServerName::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST).into());
    let tls = connector
        .connect(name, tcp)
        .await
        .with_context(|| format!("TLS handshake with 127.0.0.1:{port} trusting the caBundle"))?;
    let (_, connection) = tls.get_ref();
    Ok(connection
        .peer_certificates()
        .and_then(|c| c.first())
        .context("no certificate served")?
        .to_vec())
}

async fn read_secret(client: &Client, ns: &str) -> Result<CertSecret> {
    let secret = Api::<Secret>::namespaced(client.clone(), ns)
        .get(SECRET)
        .await?;
    Ok(CertSecret::from_data(secret.data.as_ref())?)
}

fn first_der(pem: &str) -> Result<Vec<u8>> {
    Ok(parse_pem_certs(pem)?.remove(0).der)
}

/// The caBundle of each webhook of the configuration, parsed.
async fn config_bundles(client: &Client) -> Result<Vec<(String, Vec<CertInfo>)>> {
    let config = Api::<MutatingWebhookConfiguration>::all(client.clone())
        .get(RELEASE)
        .await?;
    ca_bundles(&config)
        .into_iter()
        .map(|(name, pem)| {
            Ok((
                name,
                if pem.is_empty() {
                    vec![]
                } else {
                    parse_pem_certs(&pem)?
                },
            ))
        })
        .collect()
}

/// A kubeconfig for the chart's ServiceAccount: the webhooks get exactly the chart's RBAC.
async fn service_account_kubeconfig(cp: &ControlPlane, ns: &str, dir: &Path) -> Result<PathBuf> {
    let request: TokenRequest = serde_json::from_value(json!({
        "spec": { "audiences": [], "expirationSeconds": 3600 }
    }))?;
    let token = Api::<ServiceAccount>::namespaced(cp.client()?, ns)
        .create_token_request(RELEASE, &PostParams::default(), &request)
        .await?
        .status
        .and_then(|status| status.token)
        .context("TokenRequest answered without a token")?;
    let ca = dir.join("cluster-ca.crt");
    std::fs::write(&ca, cp.ca_pem())?;
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1
kind: Config
clusters:
- name: e2e
  cluster: {{server: '{server}', certificate-authority: '{ca}'}}
users:
- name: kips
  user: {{token: '{token}'}}
contexts:
- name: kips
  context: {{cluster: e2e, user: kips, namespace: {ns}}}
current-context: kips
",
            server = cp.server(),
            ca = ca.display(),
        ),
    )?;
    Ok(path)
}

/// The chart's webhook configuration, its two webhooks pointed at local ports by URL.
fn pointed_at(
    config: &MutatingWebhookConfiguration,
    ports: [u16; 2],
) -> Result<MutatingWebhookConfiguration> {
    let mut value = serde_json::to_value(config)?;
    value["metadata"] = json!({
        "name": config.name_any(),
        "labels": config.metadata.labels,
    });
    let webhooks = value["webhooks"].as_array_mut().context("no webhooks")?;
    ensure!(webhooks.len() == 2, "the chart renders two webhooks");
    for (webhook, port) in webhooks.iter_mut().zip(ports) {
        webhook["clientConfig"] = json!({ "url": format!("https://127.0.0.1:{port}/mutate") });
    }
    Ok(serde_json::from_value(value)?)
}

#[derive(Default, Debug)]
struct Traffic {
    pods_ok: usize,
    deployments_ok: usize,
    failures: Vec<String>,
}

/// Server-side dry-run creates of an annotated Pod (webhook pods.kips.io, process B) and
/// Deployment (workloads.kips.io, process A) through the API server, until `stop`.
async fn drive_requests(client: Client, ns: String, stop: Arc<AtomicBool>) -> Traffic {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "generateName": "api-", "annotations": { "kips.io/redirect": "api:8080" } },
        "spec": { "containers": [{ "name": "app", "image": "registry.invalid/app:1",
                                   "ports": [{ "containerPort": 8080 }] }] }
    }))
    .unwrap();
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": { "generateName": "api-", "annotations": { "kips.io/redirect": "api:8080" } },
        "spec": {
            "selector": { "matchLabels": { "app": "api" } },
            "template": {
                "metadata": { "labels": { "app": "api" } },
                "spec": { "containers": [{ "name": "app", "image": "registry.invalid/app:1" }] }
            }
        }
    }))
    .unwrap();
    let dry_run = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let deployments = Api::<Deployment>::namespaced(client, &ns);
    let mut traffic = Traffic::default();
    while !stop.load(Ordering::Acquire) {
        match pods.create(&dry_run, &pod).await {
            Ok(injected) => {
                let spec = injected.spec.unwrap_or_default();
                let bridged = spec
                    .containers
                    .iter()
                    .chain(spec.init_containers.iter().flatten())
                    .any(|c| c.name == "kips-bridge");
                if bridged {
                    traffic.pods_ok += 1;
                } else {
                    traffic
                        .failures
                        .push("a pod was admitted without kips-bridge".into());
                }
            }
            Err(error) => traffic.failures.push(format!("pod: {error}")),
        }
        match deployments.create(&dry_run, &deployment).await {
            Ok(mutated) => {
                let copied = mutated
                    .spec
                    .and_then(|s| s.template.metadata)
                    .and_then(|m| m.annotations)
                    .is_some_and(|a| a.contains_key("kips.io/redirect"));
                if copied {
                    traffic.deployments_ok += 1;
                } else {
                    traffic
                        .failures
                        .push("a Deployment was admitted without the copies".into());
                }
            }
            Err(error) => traffic.failures.push(format!("deployment: {error}")),
        }
    }
    traffic
}

/// `kips certs <args>` as an administrator would run it; its stdout.
async fn kips_certs(cp: &ControlPlane, args: &[&str]) -> Result<String> {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_kips"))
        .arg("certs")
        .args(args)
        .env("KUBECONFIG", cp.kubeconfig())
        .kill_on_drop(true)
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "kips certs {args:?} failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}

/// `kips certs rotate` (with `--ca`: a CA rotation).
async fn rotate(cp: &ControlPlane, ns: &str, ca: bool) -> Result<String> {
    let mut args = vec![
        "rotate",
        "-n",
        ns,
        "--secret",
        SECRET,
        "--webhook-config",
        RELEASE,
    ];
    if ca {
        args.push("--ca");
    }
    kips_certs(cp, &args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_self_managed_certificate_through_rotations() -> Result<()> {
    let _one_at_a_time = WEBHOOK_CONFIGS.lock().await;
    let started = Instant::now();
    let cp = control_plane::shared().await?;
    let client = cp.client()?;
    let ns = cp.create_namespace("kips-certs").await?;
    let apps = cp.create_namespace("apps").await?;
    let dir = tempfile::tempdir()?;

    // The chart's ServiceAccount, RBAC and webhook configuration; its own pods never run
    // (no kubelet), two local processes play them.
    helm(cp, &["install", RELEASE, CHART, "-n", &ns]).await?;
    let configs = Api::<MutatingWebhookConfiguration>::all(client.clone());
    let rendered = configs.get(RELEASE).await?;
    configs.delete(RELEASE, &DeleteParams::default()).await?;
    let kubeconfig = service_account_kubeconfig(cp, &ns, dir.path()).await?;

    // Started at once: both race to create the Secret.
    let (mut a, mut b) = tokio::try_join!(
        self_managed_webhook(&ns, &kubeconfig),
        self_managed_webhook(&ns, &kubeconfig)
    )?;
    let ports = [a.addr.port(), b.addr.port()];
    let local = pointed_at(&rendered, ports)?;
    let logs = |a: &Webhook, b: &Webhook| {
        format!("----- A -----\n{}\n----- B -----\n{}", a.logs(), b.logs())
    };
    let health = health_client()?;

    // Serving, and the Secret made, but not ready: no configuration trusts them yet.
    let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
    eventually("the certificate Secret", Duration::from_secs(20), || {
        let secrets = secrets.clone();
        async move { Ok(secrets.get_opt(SECRET).await?) }
    })
    .await
    .with_context(|| logs(&a, &b))?;
    for port in ports {
        eventually("the webhook to serve", Duration::from_secs(20), || {
            let health = health.clone();
            async move { Ok(readyz(&health, port).await.ok()) }
        })
        .await
        .with_context(|| logs(&a, &b))?;
    }
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        for port in ports {
            ensure!(
                readyz(&health, port).await? == 503,
                "ready without a webhook configuration to trust it\n{}",
                logs(&a, &b)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // With the configuration back (without a caBundle), both patch it and become ready.
    configs.create(&PostParams::default(), &local).await?;
    for port in ports {
        eventually("both webhooks ready", Duration::from_secs(20), || {
            let health = health.clone();
            async move { Ok((readyz(&health, port).await? == 200).then_some(())) }
        })
        .await
        .with_context(|| logs(&a, &b))?;
    }
    eprintln!("bootstrap: both ready after {:?}", started.elapsed());

    // One Secret, one caBundle, one pair served by both.
    let list = secrets
        .list(&ListParams::default().labels("app.kubernetes.io/component=webhook-certificate"))
        .await?;
    ensure!(
        list.items.len() == 1,
        "{} certificate Secrets",
        list.items.len()
    );
    let secret = read_secret(&client, &ns).await?;
    let bundles = config_bundles(&client).await?;
    let ca = parse_pem_certs(&secret.trust_bundle)?;
    ensure!(ca.len() == 1, "a fresh Secret trusts one CA");
    for (webhook, bundle) in &bundles {
        ensure!(
            bundle == &ca,
            "{webhook} has another caBundle than the Secret"
        );
    }
    for port in ports {
        let served = served_cert(port, &secret.trust_bundle).await?;
        ensure!(
            served == first_der(&secret.serving.cert)?,
            "127.0.0.1:{port} serves another pair"
        );
    }
    let status = kips_certs(
        cp,
        &[
            "status",
            "-n",
            &ns,
            "--secret",
            SECRET,
            "--webhook-config",
            RELEASE,
        ],
    )
    .await?;
    ensure!(
        status.matches("trusts the served certificate").count() == 2
            && status.contains("workloads.kips.io")
            && status.contains("pods.kips.io"),
        "kips certs status:\n{status}"
    );
    let version = secrets.get(SECRET).await?.resource_version();
    tokio::time::sleep(Duration::from_secs(1)).await;
    ensure!(
        secrets.get(SECRET).await?.resource_version() == version,
        "the replicas keep rewriting the Secret\n{}",
        logs(&a, &b)
    );

    // Requests through the API server to both, while the certificates change under them.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = tokio::spawn(drive_requests(client.clone(), apps.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;

    // 1. A forced renewal of the serving certificate (same CA).
    let before = first_der(&secret.serving.cert)?;
    rotate(cp, &ns, false).await?;
    let renewed = read_secret(&client, &ns).await?;
    let renewed_der = first_der(&renewed.serving.cert)?;
    ensure!(renewed_der != before && renewed.trust_bundle == secret.trust_bundle);
    for port in ports {
        let (want, bundle) = (renewed_der.clone(), renewed.trust_bundle.clone());
        eventually(
            "the renewed certificate served",
            Duration::from_secs(10),
            || {
                let (want, bundle) = (want.clone(), bundle.clone());
                async move { Ok((served_cert(port, &bundle).await? == want).then_some(())) }
            },
        )
        .await
        .with_context(|| logs(&a, &b))?;
    }
    eprintln!(
        "serving renewal picked up by both after {:?}",
        started.elapsed()
    );

    // 2. A CA rotation: new CA trusted first, then signing, then the old one retired.
    let out = rotate(cp, &ns, true).await?;
    ensure!(out.contains("CA rotation requested"), "{out}");
    let rotating = read_secret(&client, &ns).await?;
    let new_ca = parse_pem_certs(&rotating.signer.cert)?.remove(0);
    let old_ca = ca[0].clone();
    ensure!(new_ca != old_ca);
    eventually(
        "both CAs in every caBundle",
        Duration::from_secs(10),
        || {
            let (client, want) = (client.clone(), vec![old_ca.clone(), new_ca.clone()]);
            async move {
                let bundles = config_bundles(&client).await?;
                Ok(bundles.iter().all(|(_, b)| b == &want).then_some(()))
            }
        },
    )
    .await
    .with_context(|| logs(&a, &b))?;
    for port in ports {
        let new_ca = new_ca.clone();
        eventually(
            "a certificate of the new CA served",
            Duration::from_secs(15),
            || {
                let new_ca = new_ca.clone();
                async move {
                    // A handshake trusting only the new CA succeeds once it is served.
                    let bundle = kips::certs::bundle::bundle_pem(std::slice::from_ref(&new_ca));
                    let Ok(served) = served_cert(port, &bundle).await else {
                        return Ok(None);
                    };
                    Ok(CertInfo::from_der(&served)?
                        .signed_by(&new_ca)
                        .then_some(()))
                }
            },
        )
        .await
        .with_context(|| logs(&a, &b))?;
    }
    eventually(
        "the old CA retired from every caBundle",
        Duration::from_secs(15),
        || {
            let (client, want) = (client.clone(), vec![new_ca.clone()]);
            async move {
                let bundles = config_bundles(&client).await?;
                Ok(bundles.iter().all(|(_, b)| b == &want).then_some(()))
            }
        },
    )
    .await
    .with_context(|| logs(&a, &b))?;
    eprintln!("CA rotation complete after {:?}", started.elapsed());
    tokio::time::sleep(Duration::from_millis(500)).await;

    stop.store(true, Ordering::Release);
    let traffic = traffic.await?;
    eprintln!("requests during the rotations: {traffic:?}");
    ensure!(
        traffic.failures.is_empty(),
        "{} of {} requests failed: {:?}\n{}",
        traffic.failures.len(),
        traffic.failures.len() + traffic.pods_ok + traffic.deployments_ok,
        traffic.failures,
        logs(&a, &b)
    );
    ensure!(
        traffic.pods_ok >= 10 && traffic.deployments_ok >= 10,
        "too few requests to mean anything: {traffic:?}"
    );

    // Both still ready, serving the final pair; then a clean shutdown.
    let last = read_secret(&client, &ns).await?;
    for port in ports {
        ensure!(readyz(&health, port).await? == 200);
        ensure!(served_cert(port, &last.trust_bundle).await? == first_der(&last.serving.cert)?);
    }
    for (name, webhook) in [("A", &mut a), ("B", &mut b)] {
        let status = webhook.terminate(Duration::from_secs(15))?;
        ensure!(
            status.success(),
            "{name} exited with {status}\n{}",
            webhook.logs()
        );
    }
    helm(cp, &["uninstall", RELEASE, "-n", &ns, "--wait"]).await?;
    eprintln!("self-managed certificate test took {:?}", started.elapsed());
    Ok(())
}
