//! The Helm chart `charts/kips`: `helm lint`, and `helm template` for the default values and
//! the other certificate and deployment modes, asserting on the rendered objects; the
//! values schema and the chart's own checks refuse wrong values with a clear message.
//!
//! helm comes from the control-plane bin dir (tests/controlplane/build.sh, cached).

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, Result, bail, ensure};
use base64::Engine;
use serde_yaml::Value;

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/kips");
const NAMESPACE: &str = "kips-system";
const MWC: &str = "templates/mutatingwebhookconfiguration.yaml";

/// helm with its caches and config in a throwaway directory (nothing lands in $HOME).
fn helm(args: &[&str]) -> Result<Output> {
    let bin = support::control_plane::bin_dir()?.join("helm");
    let home = tempfile::tempdir()?;
    let output = Command::new(&bin)
        .args(args)
        .env("HELM_CACHE_HOME", home.path().join("cache"))
        .env("HELM_CONFIG_HOME", home.path().join("config"))
        .env("HELM_DATA_HOME", home.path().join("data"))
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    Ok(output)
}

/// `helm template kips charts/kips -n kips-system <args>`, parsed into its documents.
fn template(args: &[&str]) -> Result<Vec<Value>> {
    let mut all = vec!["template", "kips", CHART, "--namespace", NAMESPACE];
    all.extend_from_slice(args);
    let out = helm(&all)?;
    ensure!(
        out.status.success(),
        "helm template {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout)?;
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value = serde::Deserialize::deserialize(doc).context("rendered YAML")?;
        if value != Value::Null {
            docs.push(value);
        }
    }
    Ok(docs)
}

/// The error helm prints for `args` (which must make it fail).
fn template_error(args: &[&str]) -> Result<String> {
    let mut all = vec!["template", "kips", CHART, "--namespace", NAMESPACE];
    all.extend_from_slice(args);
    let out = helm(&all)?;
    if out.status.success() {
        bail!("helm template {args:?} succeeded but should have failed");
    }
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

fn kinds(docs: &[Value]) -> Vec<String> {
    let mut kinds: Vec<String> = docs.iter().map(|d| s(&d["kind"]).to_owned()).collect();
    kinds.sort();
    kinds
}

fn one<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = docs.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "expected one {kind}, got {}", found.len());
    found[0]
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|seq| seq.iter().map(|x| s(x).to_owned()).collect())
        .unwrap_or_default()
}

fn container(docs: &[Value]) -> &Value {
    &one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
}

fn args_of(docs: &[Value]) -> Vec<String> {
    strings(&container(docs)["args"])
}

fn rules<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter()
        .filter(|d| d["kind"] == kind)
        .flat_map(|d| d["rules"].as_sequence().into_iter().flatten())
        .collect()
}

fn write_ca_pem(dir: &Path) -> Result<PathBuf> {
    let ca = kips::tls::generate_ca("chart test CA", std::time::Duration::from_secs(3600))?;
    let path = dir.join("ca.crt");
    std::fs::write(&path, &ca.cert)?;
    Ok(path)
}

#[test]
fn helm_lint_is_clean_for_every_mode() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = write_ca_pem(dir.path())?;
    let ca_arg = format!("webhook.caBundle={}", ca.display());
    let sets: [&[&str]; 4] = [
        &[],
        &["--set", "certs.mode=cert-manager"],
        &[
            "--set",
            "certs.mode=provided,certs.provided.secretName=my-tls",
            "--set-file",
            &ca_arg,
        ],
        &[
            "--set",
            "webhook.url=https://127.0.0.1:8443/mutate",
            "--set-file",
            &ca_arg,
        ],
    ];
    for set in sets {
        let mut args = vec!["lint", "--strict", CHART];
        args.extend_from_slice(set);
        let out = helm(&args)?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "helm lint {set:?}:\n{text}");
        assert!(text.contains("0 chart(s) failed"), "{text}");
        assert!(
            !text.contains("[WARNING]") && !text.contains("[ERROR]"),
            "{text}"
        );
    }
    Ok(())
}

#[test]
fn default_values_render_a_hardened_self_managed_webhook() -> Result<()> {
    let docs = template(&[])?;
    assert_eq!(
        kinds(&docs),
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "Deployment",
            "MutatingWebhookConfiguration",
            "PodDisruptionBudget",
            "Role",
            "RoleBinding",
            "Service",
            "ServiceAccount"
        ]
    );
    for doc in &docs {
        if doc["kind"] != "ClusterRole"
            && doc["kind"] != "ClusterRoleBinding"
            && doc["kind"] != "MutatingWebhookConfiguration"
        {
            assert_eq!(doc["metadata"]["namespace"], NAMESPACE, "{doc:?}");
        }
    }

    // Deployment: two replicas spread across nodes, hardened, probes over HTTPS.
    let deployment = one(&docs, "Deployment");
    assert_eq!(deployment["spec"]["replicas"], 2);
    let pod = &deployment["spec"]["template"]["spec"];
    let selector = &deployment["spec"]["selector"]["matchLabels"];
    let pod_labels = &deployment["spec"]["template"]["metadata"]["labels"];
    for (k, v) in selector.as_mapping().unwrap() {
        assert_eq!(&pod_labels[k], v);
    }
    let spread = pod["topologySpreadConstraints"].as_sequence().unwrap();
    assert_eq!(spread[0]["topologyKey"], "kubernetes.io/hostname");
    assert_eq!(&spread[0]["labelSelector"]["matchLabels"], selector);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    assert_eq!(pod["serviceAccountName"], "kips");
    let c = container(&docs);
    let sc = &c["securityContext"];
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(c["image"], "ghcr.io/kips-dev/kips:0.1.0");
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        assert_eq!(c[probe]["httpGet"]["path"], path);
        assert_eq!(c[probe]["httpGet"]["scheme"], "HTTPS");
        assert_eq!(c[probe]["httpGet"]["port"], "https");
    }
    assert_eq!(c["ports"][0]["containerPort"], 8443);
    assert_eq!(c["env"][0]["name"], "KIPS_NAMESPACE");
    assert_eq!(
        c["env"][0]["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.namespace"
    );
    let args = args_of(&docs);
    for expected in [
        "webhook",
        "--listen=0.0.0.0:8443",
        "--service-name=kips",
        "--cert-mode=self",
        "--cert-secret=kips-webhook-tls",
        "--webhook-config=kips",
        "--shutdown-delay=5s",
        "--drain-timeout=15s",
        "--bridge-engine=azbridge",
        "--bridge-image=ghcr.io/kips-dev/azbridge:0.16.1",
        "--init-image=ghcr.io/kips-dev/kips-init:0.1.0",
        "--relay-secret=kips-relay",
        "--listen-port-base=15100",
        "--native-sidecar=true",
        "--default-port-mode=auto",
    ] {
        assert!(
            args.iter().any(|a| a == expected),
            "{expected} not in {args:?}"
        );
    }
    assert!(pod["terminationGracePeriodSeconds"].as_i64().unwrap() > 5 + 15);
    assert!(c["volumeMounts"].is_null(), "self mode mounts no Secret");
    // The flags the chart passes are flags kips knows.
    let kips = std::process::Command::new(env!("CARGO_BIN_EXE_kips"))
        .args(["webhook", "--help"])
        .output()?;
    let help = String::from_utf8(kips.stdout)?;
    for arg in &args[1..] {
        let flag = arg.split('=').next().unwrap();
        assert!(help.contains(flag), "kips webhook has no {flag}");
    }

    // PodDisruptionBudget over the same pods.
    let pdb = one(&docs, "PodDisruptionBudget");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    assert_eq!(&pdb["spec"]["selector"]["matchLabels"], selector);

    // Service 443 -> the named webhook port.
    let service = one(&docs, "Service");
    assert_eq!(service["spec"]["ports"][0]["port"], 443);
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "https");
    assert_eq!(&service["spec"]["selector"], selector);

    // RBAC: exactly the calls kips makes.
    let role = rules(&docs, "Role");
    assert_eq!(role.len(), 2);
    assert_eq!(strings(&role[0]["resources"]), ["secrets"]);
    assert_eq!(strings(&role[0]["resourceNames"]), ["kips-webhook-tls"]);
    assert_eq!(strings(&role[0]["verbs"]), ["get", "update"]);
    assert_eq!(strings(&role[1]["verbs"]), ["create"]);
    let cluster = rules(&docs, "ClusterRole");
    let mwc_rule = cluster
        .iter()
        .find(|r| strings(&r["resources"]) == ["mutatingwebhookconfigurations"])
        .expect("a rule for the webhook configuration");
    assert_eq!(strings(&mwc_rule["resourceNames"]), ["kips"]);
    assert_eq!(strings(&mwc_rule["verbs"]), ["get", "patch"]);
    for rule in role.iter().chain(&cluster) {
        let verbs = strings(&rule["verbs"]);
        assert!(
            !verbs
                .iter()
                .any(|v| v == "*" || v == "list" || v == "watch" || v == "delete"),
            "{rule:?}"
        );
        assert!(
            !strings(&rule["resources"]).contains(&"*".to_owned()),
            "{rule:?}"
        );
    }
    // Cluster-wide Secrets only by name (the relay Secrets).
    for rule in &cluster {
        if strings(&rule["resources"]).contains(&"secrets".to_owned()) {
            assert_eq!(strings(&rule["resourceNames"]), ["kips-relay"]);
            assert_eq!(strings(&rule["verbs"]), ["get"]);
        }
    }
    for binding in ["RoleBinding", "ClusterRoleBinding"] {
        let b = one(&docs, binding);
        assert_eq!(b["subjects"][0]["name"], "kips");
        assert_eq!(b["subjects"][0]["namespace"], NAMESPACE);
    }

    // The webhook configuration.
    let mwc = one(&docs, "MutatingWebhookConfiguration");
    assert_eq!(mwc["metadata"]["name"], "kips");
    assert!(mwc["metadata"]["annotations"].is_null());
    let webhooks = mwc["webhooks"].as_sequence().unwrap();
    assert_eq!(webhooks.len(), 2);
    let (workloads, pods) = (&webhooks[0], &webhooks[1]);
    assert_eq!(workloads["name"], "workloads.kips.io");
    assert_eq!(pods["name"], "pods.kips.io");
    assert_eq!(strings(&workloads["rules"][0]["apiGroups"]), ["apps"]);
    assert_eq!(
        strings(&workloads["rules"][0]["resources"]),
        ["deployments", "statefulsets", "daemonsets"]
    );
    assert_eq!(
        strings(&workloads["rules"][0]["operations"]),
        ["CREATE", "UPDATE"]
    );
    assert_eq!(strings(&pods["rules"][0]["apiGroups"]), [""]);
    assert_eq!(strings(&pods["rules"][0]["resources"]), ["pods"]);
    assert_eq!(strings(&pods["rules"][0]["operations"]), ["CREATE"]);
    assert_eq!(pods["reinvocationPolicy"], "IfNeeded");
    assert!(workloads["reinvocationPolicy"].is_null());
    for webhook in webhooks {
        assert_eq!(webhook["sideEffects"], "None");
        assert_eq!(strings(&webhook["admissionReviewVersions"]), ["v1"]);
        assert_eq!(webhook["failurePolicy"], "Fail");
        assert_eq!(webhook["timeoutSeconds"], 5);
        let client = &webhook["clientConfig"];
        assert_eq!(client["service"]["name"], "kips");
        assert_eq!(client["service"]["namespace"], NAMESPACE);
        assert_eq!(client["service"]["path"], "/mutate");
        assert_eq!(client["service"]["port"], 443);
        assert!(client["caBundle"].is_null(), "self mode: kips patches it");
        assert!(client["url"].is_null());
        let selector = &webhook["namespaceSelector"]["matchExpressions"][0];
        assert_eq!(selector["key"], "kubernetes.io/metadata.name");
        assert_eq!(selector["operator"], "NotIn");
        assert_eq!(
            strings(&selector["values"]),
            ["kube-system", "kube-node-lease", NAMESPACE]
        );
        let condition = s(&webhook["matchConditions"][0]["expression"]);
        assert!(
            condition.contains("has(object.metadata.annotations)"),
            "{condition}"
        );
        assert!(
            condition.contains("k.startsWith('kips.io/')"),
            "{condition}"
        );
    }
    let workload_condition = s(&workloads["matchConditions"][0]["expression"]);
    assert!(
        workload_condition.contains("oldObject != null && has(oldObject.metadata.annotations)")
    );
    assert!(workload_condition.contains("object.spec.template.metadata.annotations.exists("));
    assert!(!s(&pods["matchConditions"][0]["expression"]).contains("oldObject"));
    Ok(())
}

#[test]
fn cert_manager_mode_renders_a_certificate_and_ca_injection() -> Result<()> {
    let docs = template(&["--set", "certs.mode=cert-manager"])?;
    let issuers: Vec<&Value> = docs.iter().filter(|d| d["kind"] == "Issuer").collect();
    assert_eq!(
        issuers.len(),
        2,
        "self-signed bootstrap Issuer and the CA Issuer"
    );
    let certificates: Vec<&Value> = docs.iter().filter(|d| d["kind"] == "Certificate").collect();
    assert_eq!(certificates.len(), 2, "the CA and the serving certificate");
    let serving = certificates
        .iter()
        .find(|c| c["metadata"]["name"] == "kips-webhook")
        .unwrap();
    assert_eq!(serving["spec"]["secretName"], "kips-webhook-tls");
    assert_eq!(serving["apiVersion"], "cert-manager.io/v1");
    assert!(strings(&serving["spec"]["dnsNames"]).contains(&"kips.kips-system.svc".to_owned()));
    assert_eq!(serving["spec"]["issuerRef"]["name"], "kips-ca");

    let mwc = one(&docs, "MutatingWebhookConfiguration");
    assert_eq!(
        mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
        "kips-system/kips-webhook"
    );
    for webhook in mwc["webhooks"].as_sequence().unwrap() {
        assert!(webhook["clientConfig"]["caBundle"].is_null());
    }
    let args = args_of(&docs);
    assert!(args.contains(&"--cert-mode=files".to_owned()), "{args:?}");
    assert!(args.contains(&"--tls-cert=/etc/kips/tls/tls.crt".to_owned()));
    assert!(!args.iter().any(|a| a.starts_with("--cert-secret")));
    let pod = &one(&docs, "Deployment")["spec"]["template"]["spec"];
    assert_eq!(
        pod["volumes"][0]["secret"]["secretName"],
        "kips-webhook-tls"
    );
    assert_eq!(container(&docs)["volumeMounts"][0]["readOnly"], true);
    // Nothing to create or patch: no Role, no rule for the webhook configuration.
    assert!(!kinds(&docs).contains(&"Role".to_owned()));
    assert!(
        rules(&docs, "ClusterRole")
            .iter()
            .all(|r| strings(&r["resources"]) != ["mutatingwebhookconfigurations"])
    );

    // An existing issuer instead of the chart's own CA.
    let docs = template(&[
        "--set",
        "certs.mode=cert-manager,certs.certManager.issuerRef.name=corp-ca,certs.certManager.issuerRef.kind=ClusterIssuer",
    ])?;
    assert!(!kinds(&docs).contains(&"Issuer".to_owned()));
    let serving = one(&docs, "Certificate");
    assert_eq!(serving["spec"]["issuerRef"]["name"], "corp-ca");
    assert_eq!(serving["spec"]["issuerRef"]["kind"], "ClusterIssuer");
    Ok(())
}

#[test]
fn provided_mode_serves_an_existing_secret_with_the_given_ca() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = write_ca_pem(dir.path())?;
    let docs = template(&[
        "--set",
        "certs.mode=provided,certs.provided.secretName=corp-webhook-tls",
        "--set-file",
        &format!("webhook.caBundle={}", ca.display()),
    ])?;
    let pem = std::fs::read_to_string(&ca)?;
    let mwc = one(&docs, "MutatingWebhookConfiguration");
    for webhook in mwc["webhooks"].as_sequence().unwrap() {
        let bundle = base64::engine::general_purpose::STANDARD
            .decode(s(&webhook["clientConfig"]["caBundle"]))?;
        assert_eq!(String::from_utf8(bundle)?, pem);
        assert_eq!(webhook["clientConfig"]["service"]["name"], "kips");
    }
    let pod = &one(&docs, "Deployment")["spec"]["template"]["spec"];
    assert_eq!(
        pod["volumes"][0]["secret"]["secretName"],
        "corp-webhook-tls"
    );
    assert!(args_of(&docs).contains(&"--tls-key=/etc/kips/tls/tls.key".to_owned()));
    assert!(!kinds(&docs).contains(&"Role".to_owned()));
    assert!(!kinds(&docs).contains(&"Certificate".to_owned()));
    Ok(())
}

#[test]
fn url_mode_renders_only_a_webhook_configuration_for_an_outside_webhook() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = write_ca_pem(dir.path())?;
    let url = "https://127.0.0.1:8443/mutate";
    let set_url = format!("webhook.url={url}");
    let set_ca = format!("webhook.caBundle={}", ca.display());
    let full = template(&["--set", &set_url, "--set-file", &set_ca])?;
    assert_eq!(kinds(&full), ["MutatingWebhookConfiguration"]);

    let docs = template(&[
        "--show-only",
        MWC,
        "--set",
        &set_url,
        "--set-file",
        &set_ca,
        "--set",
        "webhook.failurePolicy.pods=Ignore,webhook.timeoutSeconds=3,webhook.excludeNamespaces={team-a,team-b}",
    ])?;
    let mwc = one(&docs, "MutatingWebhookConfiguration");
    let pem = std::fs::read_to_string(&ca)?;
    let webhooks = mwc["webhooks"].as_sequence().unwrap();
    for webhook in webhooks {
        let client = &webhook["clientConfig"];
        assert_eq!(client["url"], url);
        assert!(client["service"].is_null());
        let bundle = base64::engine::general_purpose::STANDARD.decode(s(&client["caBundle"]))?;
        assert_eq!(String::from_utf8(bundle)?, pem);
        assert_eq!(webhook["timeoutSeconds"], 3);
        assert_eq!(
            strings(&webhook["namespaceSelector"]["matchExpressions"][0]["values"]),
            [
                "kube-system",
                "kube-node-lease",
                NAMESPACE,
                "team-a",
                "team-b"
            ]
        );
    }
    assert_eq!(webhooks[0]["failurePolicy"], "Fail");
    assert_eq!(webhooks[1]["failurePolicy"], "Ignore");

    // Without a caBundle (a local `--cert-mode self` webhook patches it in).
    let docs = template(&["--show-only", MWC, "--set", &set_url])?;
    let mwc = one(&docs, "MutatingWebhookConfiguration");
    assert!(mwc["webhooks"][0]["clientConfig"]["caBundle"].is_null());
    Ok(())
}

#[test]
fn images_and_injection_settings_reach_the_webhook_flags() -> Result<()> {
    let digest = format!("sha256:{}", "a".repeat(64));
    let docs = template(&[
        "--set",
        &format!(
            "image.repository=registry.example.com/kips,image.tag=1.2.3,image.digest={digest}"
        ),
        "--set",
        "image.pullPolicy=Always,imagePullSecrets[0].name=corp-pull",
        "--set",
        "injection.bridgeImage.repository=registry.example.com/azbridge,injection.bridgeImage.tag=0.16.2",
        "--set",
        "injection.initImage.repository=registry.example.com/kips-init,injection.initImage.tag=1.2.3",
        "--set",
        "injection.relaySecret=team-relay,injection.listenPortBase=20000,injection.nativeSidecar=false",
        "--set",
        "injection.defaultPortMode=named,injection.imagePullPolicy=IfNotPresent",
        "--set",
        "rbac.extraRelaySecretNames={other-relay},replicaCount=3",
    ])?;
    let c = container(&docs);
    assert_eq!(
        c["image"],
        format!("registry.example.com/kips:1.2.3@{digest}").as_str()
    );
    assert_eq!(c["imagePullPolicy"], "Always");
    let deployment = one(&docs, "Deployment");
    assert_eq!(deployment["spec"]["replicas"], 3);
    assert_eq!(
        deployment["spec"]["template"]["spec"]["imagePullSecrets"][0]["name"],
        "corp-pull"
    );
    let args = args_of(&docs);
    for expected in [
        "--bridge-image=registry.example.com/azbridge:0.16.2",
        "--init-image=registry.example.com/kips-init:1.2.3",
        "--relay-secret=team-relay",
        "--listen-port-base=20000",
        "--native-sidecar=false",
        "--default-port-mode=named",
        "--image-pull-policy=IfNotPresent",
    ] {
        assert!(
            args.iter().any(|a| a == expected),
            "{expected} not in {args:?}"
        );
    }
    let secrets_rule = rules(&docs, "ClusterRole")
        .into_iter()
        .find(|r| strings(&r["resources"]) == ["secrets"])
        .unwrap();
    assert_eq!(
        strings(&secrets_rule["resourceNames"]),
        ["team-relay", "other-relay"]
    );

    // The kips engine: the sidecar runs the webhook's own image.
    let docs = template(&[
        "--set",
        "injection.bridge.engine=kips,image.repository=registry.example.com/kips,image.tag=1.2.3",
    ])?;
    let args = args_of(&docs);
    for expected in [
        "--bridge-engine=kips",
        "--bridge-image=registry.example.com/kips:1.2.3",
    ] {
        assert!(
            args.iter().any(|a| a == expected),
            "{expected} not in {args:?}"
        );
    }
    let error = template_error(&["--set", "injection.bridge.engine=socat"])?;
    assert!(error.contains("engine"), "{error}");

    // Without the relay Secret check, kips cannot read any Secret outside its own.
    let docs = template(&["--set", "rbac.readRelaySecrets=false"])?;
    assert!(
        rules(&docs, "ClusterRole")
            .iter()
            .all(|r| !strings(&r["resources"]).contains(&"secrets".to_owned()))
    );
    Ok(())
}

#[test]
fn wrong_values_fail_with_a_message_naming_the_value() -> Result<()> {
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["--set", "certs.mode=vault"],
            &["/certs/mode", "'self', 'cert-manager', 'provided'"],
        ),
        (
            &["--set", "webhook.timeoutSeconds=31"],
            &["/webhook/timeoutSeconds", "maximum"],
        ),
        (
            &["--set", "webhook.failurePolicy.pods=Sometimes"],
            &["/webhook/failurePolicy/pods", "'Fail', 'Ignore'"],
        ),
        (&["--set", "replicas=3"], &["'replicas' not allowed"]),
        (
            &["--set", "injection.defaultPortMode=ebpf"],
            &["/injection/defaultPortMode", "'auto', 'iptables', 'named'"],
        ),
        (
            &["--set", "webhook.url=http://10.0.0.5:8443/mutate"],
            &["/webhook/url", "does not match pattern"],
        ),
        (
            &["--set", "certs.self.certValidity=90 days"],
            &["/certs/self/certValidity"],
        ),
        (&["--set", "webhook.caBundle=Zm9v"], &["/webhook/caBundle"]),
        (
            &["--set", "certs.mode=provided"],
            &["certs.mode=provided needs certs.provided.secretName"],
        ),
        (
            &[
                "--set",
                "certs.mode=provided,certs.provided.secretName=corp-tls",
            ],
            &["certs.mode=provided needs webhook.caBundle"],
        ),
        (
            &["--set", "terminationGracePeriodSeconds=10"],
            &["terminationGracePeriodSeconds (10) must exceed", "(20)"],
        ),
    ];
    for (args, expected) in cases {
        let error = template_error(args)?;
        for text in *expected {
            assert!(
                error.contains(text),
                "helm template {args:?}: {text:?} not in:\n{error}"
            );
        }
    }
    Ok(())
}

/// Every value is documented: each key line of values.yaml has a comment right above it,
/// or sits inside a block documented as a whole (a `# --` comment on its parent).
#[test]
fn values_yaml_is_commented_line_by_line() -> Result<()> {
    let text = std::fs::read_to_string(Path::new(CHART).join("values.yaml"))?;
    let mut previous_is_comment = false;
    // (indent, documented as a whole) of the enclosing keys.
    let mut parents: Vec<(usize, bool)> = Vec::new();
    let mut undocumented = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        if trimmed.is_empty() {
            previous_is_comment = false;
            continue;
        }
        if trimmed.starts_with('#') {
            previous_is_comment = true;
            continue;
        }
        let indent = line.len() - trimmed.len();
        while parents.last().is_some_and(|(i, _)| *i >= indent) {
            parents.pop();
        }
        let is_key = !trimmed.starts_with('-') && trimmed.contains(':');
        if is_key {
            let covered = parents.iter().any(|(_, whole)| *whole);
            if !previous_is_comment && !covered {
                undocumented.push(format!("{}: {line}", number + 1));
            }
            let whole = previous_is_comment && {
                // The comment block above this key starts with "# --".
                let above: Vec<&str> = text.lines().take(number).collect();
                above
                    .iter()
                    .rev()
                    .take_while(|l| l.trim_start().starts_with('#'))
                    .last()
                    .is_some_and(|l| l.trim_start().starts_with("# --"))
            };
            parents.push((indent, whole));
        }
        previous_is_comment = false;
    }
    assert!(
        undocumented.is_empty(),
        "values without a comment:\n{}",
        undocumented.join("\n")
    );
    Ok(())
}
