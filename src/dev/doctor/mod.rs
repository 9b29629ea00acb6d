//! `kips doctor [<kind>/<name>]`: what stands between the developer and a working redirect,
//! checked in order, each with its verdict and, when it fails, the fix.
//!
//! The judgements (`judge_*`) are pure functions of what was read; [`run_checks`] does the
//! reading, in order, and skips what cannot be checked once something it needs has failed.
//! [`render_table`] and the JSON form show the same [`Check`] list.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Event, Namespace, Node, Pod, Secret};
use kube::Api;
use kube::api::{ListParams, PostParams};
use rustls::pki_types::{CertificateDer, ServerName};
use serde::Serialize;
use serde_json::json;

use super::OutputFormat;
use super::rollout::{self, Snapshot, Verdict};
use crate::annotations::{
    BRIDGE_CONTAINER, INIT_CONTAINER, InjectionStatus, InvalidAnnotations, KipsAnnotations,
    PortMode, STATUS, is_kips_container,
};
use crate::bridge::DEFAULT_RELAY_SECRET;
use crate::bridge::secret::SecretState;
use crate::certs::trust::{check_trusted, check_trusted_chain};
use crate::inject::plan::resolve_port_mode;
use crate::k8s::{self, ClientSettings, K8sError, Kube, KubeTarget};
use crate::webhook::hooks::ENFORCE_LABEL;
use crate::workload::{Workload, WorkloadRef};

/// The webhook configuration the chart installs (its release name).
pub const DEFAULT_WEBHOOK_CONFIG: &str = "kips";
/// The image of the dry-run pod's container: never pulled, since nothing is created.
const PROBE_IMAGE: &str = "registry.k8s.io/pause:3.10";
const TLS_TIMEOUT: Duration = Duration::from_secs(5);

/// `kips doctor`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DoctorConfig {
    pub workload: Option<WorkloadRef>,
    pub webhook_config: String,
    pub output: OutputFormat,
    pub kube: KubeTarget,
}

/// `kips doctor` found something to fix.
#[derive(Debug, thiserror::Error)]
#[error("{failed} of {total} checks failed")]
pub struct DoctorFailed {
    pub failed: usize,
    pub total: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Pass,
    Fail,
    /// Not applicable, or not checkable (a permission, an earlier failure).
    Skip,
}

/// One check's verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub outcome: Outcome,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    fn pass(name: &'static str, detail: impl Into<String>) -> Self {
        Self {
            name,
            outcome: Outcome::Pass,
            detail: detail.into(),
            fix: None,
        }
    }

    fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            name,
            outcome: Outcome::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    fn skip(name: &'static str, detail: impl Into<String>) -> Self {
        Self {
            name,
            outcome: Outcome::Skip,
            detail: detail.into(),
            fix: None,
        }
    }
}

pub const KUBECONFIG: &str = "kubeconfig";
pub const API_SERVER: &str = "api-server";
pub const WEBHOOK_CONFIG: &str = "webhook-config";
pub const CA_BUNDLE: &str = "ca-bundle";
pub const WEBHOOK_ANSWERS: &str = "webhook-answers";
pub const POD_SECURITY: &str = "pod-security";
pub const RELAY_SECRET: &str = "relay-secret";
pub const IMAGES: &str = "images";
pub const ANNOTATIONS: &str = "annotations";
pub const PODS: &str = "pods";
pub const ROLLOUT: &str = "rollout";

/// The checks in the order they run; the last three only for a workload.
const ORDER: [&str; 11] = [
    KUBECONFIG,
    API_SERVER,
    WEBHOOK_CONFIG,
    CA_BUNDLE,
    WEBHOOK_ANSWERS,
    POD_SECURITY,
    RELAY_SECRET,
    IMAGES,
    ANNOTATIONS,
    PODS,
    ROLLOUT,
];
const WORKLOAD_CHECKS: [&str; 3] = [ANNOTATIONS, PODS, ROLLOUT];

/// Every check after `after`, skipped for `reason`.
fn skip_after(after: &str, workload: bool, reason: &str) -> Vec<Check> {
    ORDER
        .iter()
        .skip_while(|n| **n != after)
        .skip(1)
        .filter(|n| workload || !WORKLOAD_CHECKS.contains(n))
        .map(|n| Check::skip(n, reason))
        .collect()
}

mod judge;
mod read;

pub use judge::*;
use read::*;

/// The checks as a table: one line each, details and fixes indented under it.
pub fn render_table(title: &str, checks: &[Check]) -> String {
    let mut out = format!("{title}\n");
    let width = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
    for check in checks {
        let mark = match check.outcome {
            Outcome::Pass => "ok  ",
            Outcome::Fail => "FAIL",
            Outcome::Skip => "skip",
        };
        let mut lines = check.detail.lines();
        let first = lines.next().unwrap_or_default();
        let _ = writeln!(out, "  {mark}  {:width$}  {first}", check.name);
        let indent = " ".repeat(width + 10);
        for line in lines {
            let _ = writeln!(out, "{indent}{line}");
        }
        if let Some(fix) = &check.fix {
            for (i, line) in fix.lines().enumerate() {
                let lead = if i == 0 { "fix: " } else { "     " };
                let _ = writeln!(out, "{indent}{lead}{line}");
            }
        }
    }
    out.push_str(&summary(checks));
    out.push('\n');
    out
}

/// `all 8 checks passed` or `2 of 11 checks failed (7 passed, 2 skipped)`.
pub fn summary(checks: &[Check]) -> String {
    let count = |o: Outcome| checks.iter().filter(|c| c.outcome == o).count();
    let (passed, failed, skipped) = (
        count(Outcome::Pass),
        count(Outcome::Fail),
        count(Outcome::Skip),
    );
    let total = checks.len();
    match (failed, skipped) {
        (0, 0) => format!("all {total} checks passed"),
        (0, _) => format!("no check failed ({passed} passed, {skipped} skipped)"),
        _ => format!("{failed} of {total} checks failed ({passed} passed, {skipped} skipped)"),
    }
}

pub async fn run(config: DoctorConfig) -> anyhow::Result<()> {
    let (title, namespace, checks) = run_checks(&config).await;
    match config.output {
        OutputFormat::Table => print!("{}", render_table(&title, &checks)),
        OutputFormat::Json => {
            let value = json!({
                "namespace": namespace,
                "workload": config.workload.as_ref().map(ToString::to_string),
                "webhookConfiguration": config.webhook_config,
                "ok": !checks.iter().any(|c| c.outcome == Outcome::Fail),
                "checks": checks,
            });
            println!("{}", serde_json::to_string_pretty(&value)?);
        }
    }
    let failed = checks.iter().filter(|c| c.outcome == Outcome::Fail).count();
    if failed > 0 {
        return Err(DoctorFailed {
            failed,
            total: checks.len(),
        }
        .into());
    }
    Ok(())
}

/// Reads and judges, in order. Returns the title, the namespace and the checks.
pub async fn run_checks(config: &DoctorConfig) -> (String, Option<String>, Vec<Check>) {
    let workload = config.workload.as_ref();
    let with_workload = workload.is_some();
    let mut checks = Vec::new();
    let title_for = |ns: &str| match workload {
        Some(w) => format!("kips doctor: namespace {ns}, {w}"),
        None => format!("kips doctor: namespace {ns}"),
    };

    let kube = match k8s::connect(&ClientSettings::diagnostic(config.kube.clone())).await {
        Ok(kube) => kube,
        Err(error) => {
            checks.push(judge_kubeconfig(Err(&error)));
            checks.extend(skip_after(
                KUBECONFIG,
                with_workload,
                "needs a Kubernetes configuration",
            ));
            return ("kips doctor".to_owned(), None, checks);
        }
    };
    let ns = kube.namespace.clone();
    let title = title_for(&ns);
    checks.push(judge_kubeconfig(Ok(&kube)));

    let version = kube
        .client
        .apiserver_version()
        .await
        .map(|v| v.git_version)
        .map_err(|e| kube.unreachable(&e));
    checks.push(judge_api_server(&kube.server, version.as_deref()));
    if version.is_err() {
        checks.extend(skip_after(
            API_SERVER,
            with_workload,
            "needs the API server",
        ));
        return (title, Some(ns), checks);
    }

    // The webhook configuration and its caBundle.
    let name = &config.webhook_config;
    let found = Api::<MutatingWebhookConfiguration>::all(kube.client.clone())
        .get_opt(name)
        .await
        .map_err(|e| kube.explain(e, &format!("MutatingWebhookConfiguration {name}")));
    checks.push(judge_webhook_config(
        name,
        found.as_ref().map(Option::as_ref),
    ));
    match &found {
        Ok(Some(webhook_config)) => {
            let trust = read_trust(&kube, webhook_config).await;
            checks.push(judge_ca_bundle(&trust, SystemTime::now()));
        }
        _ => checks.push(Check::skip(CA_BUNDLE, "no webhook configuration to read")),
    }

    // Does something inject? A dry run creates nothing.
    let dry_run = dry_run(&kube).await;
    checks.push(judge_webhook_answers(&ns, &dry_run));
    let probe = match &dry_run {
        DryRun::Admitted(pod) => Some(pod.as_ref().clone()),
        _ => None,
    };

    // The workload, its pods and what its pods get.
    let observed = match workload {
        Some(target) => Some(rollout::observe(&kube, target).await),
        None => None,
    };
    let (object, pods) = match &observed {
        Some(Ok(o)) => (Some(&o.object), o.pods.as_slice()),
        _ => (None, &[][..]),
    };
    let kips = object.map(Workload::kips);
    let mode = match &kips {
        Some(Ok(k)) => port_mode_of(k, pods),
        _ => None,
    };

    let level = Api::<Namespace>::all(kube.client.clone())
        .get_metadata(&ns)
        .await
        .map(|n| {
            n.metadata
                .labels
                .and_then(|l| l.get(ENFORCE_LABEL).cloned())
        })
        .map_err(|e| kube.explain(e, &format!("namespace {ns}")));
    checks.push(judge_pod_security(
        &ns,
        level.as_ref().map(Option::as_deref),
        mode.as_ref(),
        workload.map(ToString::to_string).as_deref(),
    ));

    let secret_name = match object {
        Some(object) => rollout::relay_secret_name(object, pods),
        None => rollout::relay_secret_of_pods(probe.as_slice())
            .unwrap_or_else(|| DEFAULT_RELAY_SECRET.to_owned()),
    };
    let state = kube
        .api::<Secret>()
        .get_opt(&secret_name)
        .await
        .map(|found| SecretState::of(found.as_ref().map(|s| s.data.as_ref())))
        .map_err(|e| kube.explain(e, &format!("Secret {secret_name}")));
    checks.push(judge_relay_secret(
        &ns,
        &secret_name,
        state.as_ref().copied(),
    ));

    let evidence = image_evidence(&kube, pods, probe.as_ref(), mode.as_ref()).await;
    checks.push(judge_images(&evidence));

    if let Some(target) = workload {
        match observed {
            Some(Ok(observed)) => {
                let kips = kips.expect("read with the workload");
                checks.push(judge_annotations(target, &ns, kips.as_ref()));
                let rejected =
                    rollout::rejection_event(&kube, &observed.object, jiff_epoch()).await;
                let mut snap = rollout::snapshot(
                    &observed.object,
                    &observed.replica_sets,
                    &observed.pods,
                    None,
                    rejected,
                );
                if let Ok(SecretState::Missing) = state {
                    snap.secret_missing =
                        Some(format!("the relay Secret \"{secret_name}\" does not exist"));
                }
                match &kips {
                    Ok(k) if k.wants_injection() => {
                        checks.push(judge_pods(&snap));
                        checks.push(judge_rollout(target, &ns, &rollout::assess(&snap, true)));
                    }
                    _ => {
                        checks.push(Check::skip(PODS, "nothing to inject"));
                        checks.push(Check::skip(ROLLOUT, "nothing to roll out"));
                    }
                }
            }
            Some(Err(error)) => {
                checks.push(Check::fail(
                    ANNOTATIONS,
                    error.to_string(),
                    format!("name a workload that exists: kubectl get deployments,statefulsets,daemonsets -n {ns}"),
                ));
                checks.push(Check::skip(PODS, "no workload"));
                checks.push(Check::skip(ROLLOUT, "no workload"));
            }
            None => {}
        }
    }
    (title, Some(ns), checks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls;

    fn pod_with_bridge(image: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "kips-doctor-x"},
            "spec": {"containers": [{"name": "app"}], "initContainers": [{"name": "kips-bridge", "image": image}]}
        }))
        .unwrap()
    }

    #[test]
    fn urls_give_host_and_port() {
        assert_eq!(
            url_host_port("https://127.0.0.1:8443/mutate"),
            Some(("127.0.0.1".into(), 8443))
        );
        assert_eq!(
            url_host_port("https://kips.example.com/mutate?x=1"),
            Some(("kips.example.com".into(), 443))
        );
        assert_eq!(
            url_host_port("https://[::1]:9443/m"),
            Some(("::1".into(), 9443))
        );
        assert_eq!(url_host_port("http://x/"), None);
        assert_eq!(url_host_port("https://x:port/"), None);
    }

    #[test]
    fn the_ca_bundle_must_trust_what_is_served() {
        let ca = tls::generate_ca("ca", Duration::from_secs(3600)).unwrap();
        let other = tls::generate_ca("other", Duration::from_secs(3600)).unwrap();
        let pair =
            tls::issue_serving_cert(&ca, &["127.0.0.1".to_owned()], Duration::from_secs(600))
                .unwrap();
        let trust = |bundle: &str, served: Served| WebhookTrust {
            webhook: "pods.kips.io".into(),
            bundle: bundle.to_owned(),
            endpoint: "https://127.0.0.1:8443/mutate".into(),
            server_name: "127.0.0.1".into(),
            served,
        };
        let served = || Served::Secret {
            secret: "kips-system/kips-webhook-tls".into(),
            cert: pair.cert.clone(),
        };
        let now = SystemTime::now();
        let check = judge_ca_bundle(&[trust(&ca.cert, served())], now);
        assert_eq!(check.outcome, Outcome::Pass, "{check:?}");
        let check = judge_ca_bundle(&[trust(&other.cert, served())], now);
        assert_eq!(check.outcome, Outcome::Fail);
        assert!(check.detail.contains("does not trust"), "{check:?}");
        assert!(check.fix.unwrap().contains("certs.mode=self"));
        let check = judge_ca_bundle(
            &[trust(
                &ca.cert,
                Served::Unreachable("connection refused".into()),
            )],
            now,
        );
        assert_eq!(check.outcome, Outcome::Fail);
        assert!(check.detail.contains("nothing answers"), "{check:?}");
        let check = judge_ca_bundle(
            &[trust(
                &ca.cert,
                Served::SecretUnreadable {
                    secret: "s".into(),
                    error: "forbidden".into(),
                },
            )],
            now,
        );
        assert_eq!(check.outcome, Outcome::Skip);
    }

    #[test]
    fn the_dry_run_tells_injection_refusal_and_silence_apart() {
        let check =
            judge_webhook_answers("dev", &DryRun::Admitted(Box::new(pod_with_bridge("b:1"))));
        assert_eq!(check.outcome, Outcome::Pass);
        assert!(check.detail.contains("(b:1)"));
        let mut plain = pod_with_bridge("b:1");
        plain.spec.as_mut().unwrap().init_containers = None;
        let check = judge_webhook_answers("dev", &DryRun::Admitted(Box::new(plain)));
        assert_eq!(check.outcome, Outcome::Fail);
        let x509 = "Internal error occurred: failed calling webhook \"pods.kips.io\": failed to call webhook: Post \"https://127.0.0.1:1/mutate?timeout=5s\": tls: failed to verify certificate: x509: certificate signed by unknown authority";
        let check = judge_webhook_answers("dev", &DryRun::Refused(x509.into()));
        assert!(
            check
                .fix
                .unwrap()
                .contains("does not trust the webhook's certificate")
        );
        let refused = "Internal error occurred: failed calling webhook \"pods.kips.io\": failed to call webhook: Post \"https://127.0.0.1:1/mutate?timeout=5s\": dial tcp 127.0.0.1:1: connect: connection refused";
        let check = judge_webhook_answers("dev", &DryRun::Refused(refused.into()));
        assert!(check.detail.contains("connection refused"));
        assert!(check.fix.unwrap().contains("cannot reach the kips webhook"));
    }

    #[test]
    fn pod_security_fails_iptables_where_net_admin_is_forbidden() {
        let kips = KipsAnnotations::parse([("kips.io/redirect", "api:8080")]).unwrap();
        let mode = port_mode_of(&kips, &[]).unwrap();
        assert_eq!(mode.mode, PortMode::Iptables);
        assert!(mode.because.contains("auto picks iptables"));
        let check = judge_pod_security(
            "dev",
            Ok(Some("restricted")),
            Some(&mode),
            Some("deployment/api"),
        );
        assert_eq!(check.outcome, Outcome::Fail);
        assert!(check.fix.unwrap().contains("--port-mode named"));
        for level in [Some("privileged"), None] {
            let check = judge_pod_security("dev", Ok(level), Some(&mode), Some("deployment/api"));
            assert_eq!(check.outcome, Outcome::Pass, "{check:?}");
        }
        let named = KipsAnnotations::parse([("kips.io/redirect", "api:http")]).unwrap();
        let mode = port_mode_of(&named, &[]).unwrap();
        assert_eq!(mode.mode, PortMode::Named);
        let check = judge_pod_security(
            "dev",
            Ok(Some("restricted")),
            Some(&mode),
            Some("deployment/api"),
        );
        assert_eq!(check.outcome, Outcome::Pass);
        // What injected pods record wins over the annotation.
        let pod: Pod = serde_json::from_value(json!({"metadata": {"annotations": {
            STATUS: "{\"version\":\"0\",\"portMode\":\"named\",\"sidecar\":\"native\"}"}}}))
        .unwrap();
        assert_eq!(port_mode_of(&kips, &[pod]).unwrap().mode, PortMode::Named);
    }

    #[test]
    fn relay_secret_failures_name_the_fix() {
        let check = judge_relay_secret("dev", "kips-relay", Ok(SecretState::Missing));
        assert_eq!(check.outcome, Outcome::Fail);
        assert!(
            check
                .detail
                .starts_with("the relay Secret \"kips-relay\" does not exist")
        );
        assert!(
            check
                .fix
                .unwrap()
                .starts_with("kubectl create secret generic kips-relay -n dev")
        );
        let check = judge_relay_secret(
            "dev",
            "kips-relay",
            Ok(SecretState::Present {
                trailing_whitespace: true,
            }),
        );
        assert!(check.detail.contains("ends in a newline"));
        let check = judge_relay_secret(
            "dev",
            "kips-relay",
            Ok(SecretState::Present {
                trailing_whitespace: false,
            }),
        );
        assert_eq!(check.outcome, Outcome::Pass);
    }

    #[test]
    fn image_pull_failures_name_the_image() {
        let evidence = ImageEvidence {
            images: vec![("kips-bridge".into(), "b:1".into())],
            from: "pod api-1".into(),
            failures: vec![PullFailure {
                pod: "api-1".into(),
                container: "kips-bridge".into(),
                image: "b:1".into(),
                reason: "ImagePullBackOff".into(),
                message: "Back-off pulling image \"b:1\"".into(),
            }],
            ..Default::default()
        };
        let check = judge_images(&evidence);
        assert_eq!(check.outcome, Outcome::Fail);
        assert!(
            check
                .detail
                .contains("kips-bridge cannot get image b:1: ImagePullBackOff")
        );
        let evidence = ImageEvidence {
            failures: vec![],
            nodes: Some(vec![
                ("n1".into(), BTreeSet::from(["b:1".to_owned()])),
                ("n2".into(), BTreeSet::new()),
            ]),
            ..evidence
        };
        let check = judge_images(&evidence);
        assert_eq!(check.outcome, Outcome::Pass);
        assert!(check.detail.contains("present on n1"), "{check:?}");
        let evidence = ImageEvidence {
            nodes: Some(vec![("n2".into(), BTreeSet::new())]),
            ..evidence
        };
        assert!(
            judge_images(&evidence)
                .detail
                .contains("not on any node yet; the kubelet will pull it")
        );
    }

    #[test]
    fn the_table_indents_details_and_fixes_and_sums_up() {
        let checks = vec![
            Check::pass(KUBECONFIG, "kubeconfig"),
            Check::fail(RELAY_SECRET, "missing\nsecond line", "create it"),
            Check::skip(IMAGES, "no pod"),
        ];
        let table = render_table("kips doctor: namespace dev", &checks);
        assert_eq!(
            table,
            "kips doctor: namespace dev\n  ok    kubeconfig    kubeconfig\n  FAIL  relay-secret  missing\n                      second line\n                      fix: create it\n  skip  images        no pod\n1 of 3 checks failed (1 passed, 1 skipped)\n"
        );
        assert_eq!(
            summary(&[Check::pass(KUBECONFIG, "")]),
            "all 1 checks passed"
        );
        let skipped = skip_after(API_SERVER, false, "needs the API server");
        assert_eq!(skipped.len(), 6);
        assert_eq!(skipped[0].name, WEBHOOK_CONFIG);
        assert_eq!(skip_after(API_SERVER, true, "x").len(), 9);
    }
}
