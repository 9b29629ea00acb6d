//! The developer's side: `kips redirect`, `revert`, `status`, `connect`, `doctor` and
//! `expose`.
//!
//! The decisions are pure and live in their own modules ([`laptop`], [`hosts`], [`rollout`],
//! [`status`], [`env`], and the judgements of [`doctor`] and the objects of [`expose`]); this
//! module, [`connect`], [`session`] and the runners of `doctor` and `expose` do the I/O.

pub(crate) mod connect;
pub(crate) mod doctor;
pub(crate) mod env;
pub(crate) mod expose;
pub(crate) mod hosts;
pub(crate) mod laptop;
pub(crate) mod relay_bridge;
pub(crate) mod rollout;
pub(crate) mod session;
pub(crate) mod status;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::ListParams;
use serde_json::Value;

use crate::annotations::{
    self, KipsAnnotations, PORT_MODE, PREFIX, REDIRECT, RELAY_SECRET, REVERSE, USER_KEYS,
};
use crate::bridge::DEFAULT_RELAY_SECRET;
use crate::bridge::routes::{RedirectRoute, check_one_way};
use crate::bridge::secret::SecretState;
use crate::k8s::{self, ClientSettings, Kube, KubeTarget};
use crate::workload::{Workload, WorkloadKind, WorkloadRef};
pub use doctor::{DEFAULT_WEBHOOK_CONFIG, DoctorConfig, DoctorFailed};
pub use expose::{DEFAULT_PLACEHOLDER_IMAGE, ExposeConfig};
pub use laptop::PortMapping;

/// `kips connect`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectConfig {
    pub workload: WorkloadRef,
    /// Serve redirected ports on other local ports.
    pub port_map: Vec<PortMapping>,
    /// The hosts file that gets the names of reverse entries (restored on exit).
    pub hosts_file: PathBuf,
    /// Run this azbridge instead of the built-in bridge.
    pub azbridge: Option<PathBuf>,
    /// A CA (PEM file) to trust for the relay's TLS beside the public roots.
    pub relay_ca: Option<PathBuf>,
    /// Read the connection string from this Secret (`Some("")`: the workload's relay Secret)
    /// instead of the environment.
    pub connection_string_from_secret: Option<String>,
    /// Print the command and the hosts-file lines instead of running them.
    pub print: bool,
    /// Read the workload from this manifest instead of the cluster.
    pub file: Option<PathBuf>,
    /// Write the app container's environment here (mode 0600).
    pub env_file: Option<PathBuf>,
    /// The app container (default: the pod's first container that is not kips').
    pub container: Option<String>,
    /// Run this with the pod's environment for the length of the session; its exit ends the
    /// session and becomes kips' exit code.
    pub command: Vec<std::ffi::OsString>,
    pub kube: KubeTarget,
}

/// `kips redirect`: the annotation values as given (checked by [`redirect_annotations`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedirectConfig {
    pub workload: WorkloadRef,
    pub redirects: Option<String>,
    pub reverse: Option<String>,
    pub relay_secret: Option<String>,
    pub port_mode: Option<String>,
    pub wait: bool,
    pub timeout: Duration,
    pub kube: KubeTarget,
}

/// `kips revert`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevertConfig {
    pub workload: WorkloadRef,
    pub wait: bool,
    pub timeout: Duration,
    pub kube: KubeTarget,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    Table,
    Json,
}

/// `kips status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusConfig {
    /// Only this workload, with its pods' listeners.
    pub workload: Option<WorkloadRef>,
    pub all_namespaces: bool,
    pub output: OutputFormat,
    pub kube: KubeTarget,
}

async fn client(target: &KubeTarget) -> Result<Kube> {
    Ok(k8s::connect(&ClientSettings::interactive(target.clone())).await?)
}

pub async fn connect(config: ConnectConfig) -> Result<()> {
    connect::run(config).await
}

pub async fn doctor(config: DoctorConfig) -> Result<()> {
    doctor::run(config).await
}

pub async fn expose(config: ExposeConfig) -> Result<()> {
    expose::run(config).await
}

/// Merge-patches a workload's metadata annotations; prints the API server's warnings and
/// `extra` ones of kips' own that the webhook did not already give.
async fn patch_annotations(
    kube: &Kube,
    target: &WorkloadRef,
    annotations: BTreeMap<&str, Value>,
) -> Result<Workload> {
    let (object, warnings) = kube.patch_annotations(target, &annotations).await?;
    for warning in &warnings {
        eprintln!("Warning: {warning}");
    }
    if let Some(own) = relay_secret_warning(kube, &object).await
        && !warnings.contains(&own)
    {
        eprintln!("Warning: {own}");
    }
    Ok(object)
}

/// What is wrong with the relay Secret a redirected workload's pods will read, if anything
/// (the webhook warns too, when its cluster hooks are on; this works without them).
async fn relay_secret_warning(kube: &Kube, object: &Workload) -> Option<String> {
    let kips = object
        .kips()
        .ok()
        .filter(KipsAnnotations::wants_injection)?;
    let name = kips
        .relay_secret
        .unwrap_or_else(|| DEFAULT_RELAY_SECRET.to_owned());
    // Not allowed to read Secrets, or the API server is busy: say nothing.
    let found = kube.api::<Secret>().get_opt(&name).await.ok()?;
    SecretState::of(found.as_ref().map(|s| s.data.as_ref())).warning(&kube.namespace, &name)
}

/// The annotations `redirect` sets, validated and normalised here with the webhook's own
/// grammar, so a bad value fails before anything is sent.
pub fn redirect_annotations(config: &RedirectConfig) -> Result<BTreeMap<&'static str, String>> {
    let mut out = BTreeMap::new();
    let given = [
        (REDIRECT, &config.redirects),
        (REVERSE, &config.reverse),
        (RELAY_SECRET, &config.relay_secret),
        (PORT_MODE, &config.port_mode),
    ];
    for (key, value) in given {
        if let Some(value) = value {
            out.insert(key, annotations::normalise(key, value)?);
        }
    }
    if !out.contains_key(REDIRECT) && !out.contains_key(REVERSE) {
        bail!(
            "say what to redirect: kips redirect {} <relay>:<port>[,...] (and/or --reverse <relay>=<host>:<port>)",
            config.workload
        );
    }
    // Cross-entry rules (a relay carries one direction) are the grammar's too, and the
    // routes' once a redirect without a relay takes the workload's name.
    let pairs: Vec<(&str, &str)> = out.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let kips = match KipsAnnotations::parse(pairs) {
        Ok(kips) => kips,
        Err(errors) => bail!(
            "{}",
            errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        ),
    };
    let routes = kips
        .redirects
        .iter()
        .map(|r| RedirectRoute::new(r, Some(&config.workload.name)))
        .collect::<Result<Vec<_>, _>>()?;
    check_one_way(&kips, &routes)?;
    Ok(out)
}

pub async fn redirect(config: RedirectConfig) -> Result<()> {
    let wanted = redirect_annotations(&config)?;
    let kube = client(&config.kube).await?;
    let target = &config.workload;
    let patch = wanted
        .iter()
        .map(|(k, v)| (*k, Value::String(v.clone())))
        .collect();
    let object = patch_annotations(&kube, target, patch).await?;
    let set: Vec<String> = wanted.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("{target} annotated: {}", set.join(" "));
    if !config.wait {
        println!(
            "the rollout starts now: follow it with `kips status -n {}`, serve it here with `kips connect {target} -n {}`",
            kube.namespace, kube.namespace
        );
        return Ok(());
    }
    let done = rollout::wait(
        &kube,
        target,
        true,
        object.metadata().generation,
        config.timeout,
    )
    .await?;
    println!("{done}");
    Ok(())
}

pub async fn revert(config: RevertConfig) -> Result<()> {
    let kube = client(&config.kube).await?;
    let target = &config.workload;
    let object = kube.workload(target).await?;
    let present: Vec<&str> = USER_KEYS
        .iter()
        .copied()
        .filter(|k| object.annotations().contains_key(*k))
        .collect();
    let gitops = object.kips_annotations().user_template_keys();
    if present.is_empty() {
        if !gitops.is_empty() {
            bail!("{}", gitops_refusal(target, &gitops, false));
        }
        if !config.wait {
            bail!(
                "{target} in namespace {} has no kips annotations: nothing to revert",
                kube.namespace
            );
        }
        let done = rollout::wait(&kube, target, false, None, config.timeout).await?;
        println!("{done}");
        return Ok(());
    }
    let patch = present.iter().map(|k| (*k, Value::Null)).collect();
    let object = patch_annotations(&kube, target, patch).await?;
    println!("{target}: removed {}", present.join(", "));
    if !gitops.is_empty() {
        bail!("{}", gitops_refusal(target, &gitops, true));
    }
    if config.wait {
        let done = rollout::wait(
            &kube,
            target,
            false,
            object.metadata().generation,
            config.timeout,
        )
        .await?;
        println!("{done}");
    }
    Ok(())
}

/// Why `revert` leaves annotations in the pod template alone, and what to do instead.
/// `removed`: the workload's own annotations were removed before.
pub fn gitops_refusal(target: &WorkloadRef, keys: &[&str], removed: bool) -> String {
    let (keys, them) = match keys {
        [one] => (format!("{one} is"), "it"),
        many => (format!("{} are", many.join(", ")), "them"),
    };
    format!(
        "{target}: {keys} set in the pod template (spec.template.metadata.annotations), the GitOps way, and kips never removes {them}: delete {them} from your manifest and apply it; {}",
        if removed {
            "the workload's own kips annotations were removed, the pods stay redirected"
        } else {
            "nothing was changed"
        }
    )
}

pub async fn status(config: StatusConfig) -> Result<()> {
    let kube = client(&config.kube).await?;
    let mut rows = status_rows(&kube, config.all_namespaces && config.workload.is_none()).await?;
    if let Some(target) = &config.workload {
        rows.retain(|r| {
            r.namespace == kube.namespace && r.kind == target.kind.lower() && r.name == target.name
        });
        let Some(row) = rows.first_mut() else {
            // Says "not found" for a workload that does not exist.
            kube.workload(target).await?;
            bail!(
                "{target} in namespace {} is not redirected (no kips annotations, no injected pods)",
                kube.namespace
            );
        };
        row.listeners = listeners(&kube, target).await?;
    }
    match config.output {
        OutputFormat::Json if config.workload.is_some() => {
            println!("{}", serde_json::to_string_pretty(&rows[0])?)
        }
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
        OutputFormat::Table if rows.is_empty() => {
            if config.all_namespaces {
                eprintln!("No redirected workloads.");
            } else {
                eprintln!("No redirected workloads in namespace {}.", kube.namespace);
            }
        }
        OutputFormat::Table => {
            print!("{}", status::render_table(&rows));
            if let Some(row) = rows.first().filter(|_| config.workload.is_some()) {
                if row.listeners.is_empty() {
                    println!("\nNo injected pods running.");
                } else {
                    print!("\n{}", status::render_listeners(&row.listeners, unix_now()));
                }
            }
        }
    }
    Ok(())
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Whether the laptop's listener is connected, per running injected pod of `target` and
/// redirect relay, as the pod's sidecar last saw it: its `/metrics` on the health port,
/// read through the API server's pod proxy. Reading it opens no relay connection.
async fn listeners(kube: &Kube, target: &WorkloadRef) -> Result<Vec<status::Listener>> {
    let object = kube.workload(target).await?;
    let selector = object
        .selector()
        .map(rollout::selector_string)
        .unwrap_or_default();
    let pods: Vec<Pod> = kube
        .list::<Pod, Pod>(
            false,
            &format!("pods of {target}"),
            &ListParams::default().labels(&selector),
        )
        .await?;
    let mut out = Vec::new();
    for pod in &pods {
        let injected = pod.metadata.deletion_timestamp.is_none()
            && pod
                .metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key(annotations::STATUS));
        let running = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|p| p == "Running");
        if !injected || !running {
            continue;
        }
        let name = pod.metadata.name.clone().unwrap_or_default();
        let metrics = match health_port(pod) {
            None => Err("no kips health port: the azbridge engine cannot tell".to_owned()),
            Some(port) => pod_metrics(kube, &name, port).await,
        };
        out.extend(status::listeners(
            &name,
            metrics.as_deref().map_err(Clone::clone),
        ));
    }
    out.sort_by(|a, b| (&a.pod, &a.relay).cmp(&(&b.pod, &b.relay)));
    Ok(out)
}

/// The sidecar's health port (named [`crate::inject::render::HEALTH_PORT_NAME`]).
fn health_port(pod: &Pod) -> Option<i32> {
    let spec = pod.spec.as_ref()?;
    spec.init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some(crate::inject::render::HEALTH_PORT_NAME))
        .map(|p| p.container_port)
}

/// `GET /api/v1/namespaces/{ns}/pods/{pod}:{port}/proxy/metrics`.
async fn pod_metrics(kube: &Kube, pod: &str, port: i32) -> std::result::Result<String, String> {
    let path = format!(
        "/api/v1/namespaces/{}/pods/{pod}:{port}/proxy/metrics",
        kube.namespace
    );
    let request = axum::http::Request::get(path)
        .body(Vec::new())
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(Duration::from_secs(5), kube.client.request_text(request)).await {
        Ok(Ok(text)) => Ok(text),
        Ok(Err(error)) => Err(format!("its metrics could not be read: {error}")),
        Err(_) => Err("its metrics did not come within 5s".to_owned()),
    }
}

fn has_kips_key(map: Option<&BTreeMap<String, String>>) -> bool {
    map.is_some_and(|m| m.keys().any(|k| k.starts_with(PREFIX)))
}

/// Lists workloads (and ReplicaSets), keeps those with anything of kips, then lists the pods
/// of those only.
pub async fn status_rows(kube: &Kube, all: bool) -> Result<Vec<status::Row>> {
    let mut objects: Vec<Workload> = Vec::new();
    for kind in WorkloadKind::ALL {
        objects.extend(kube.workloads(kind, all).await?);
    }
    let replica_sets: Vec<ReplicaSet> = kube
        .list::<ReplicaSet, ReplicaSet>(all, "ReplicaSets", &ListParams::default())
        .await?;
    // A Deployment whose old ReplicaSets still carry kips annotations is being reverted.
    let reverting = |object: &Workload| {
        let uid = object.metadata().uid.as_deref();
        replica_sets.iter().any(|rs| {
            rs.metadata
                .owner_references
                .iter()
                .flatten()
                .any(|o| Some(o.uid.as_str()) == uid)
                && rs.status.as_ref().is_some_and(|s| s.replicas > 0)
                && has_kips_key(
                    rs.spec
                        .as_ref()
                        .and_then(|s| s.template.as_ref())
                        .and_then(|t| t.metadata.as_ref())
                        .and_then(|m| m.annotations.as_ref()),
                )
        })
    };
    let candidates: Vec<Workload> = objects
        .into_iter()
        .filter(|o| {
            has_kips_key(Some(o.annotations()))
                || has_kips_key(Some(o.template_annotations()))
                || reverting(o)
        })
        .collect();
    let mut pods: Vec<Pod> = Vec::new();
    for object in &candidates {
        let selector = object
            .selector()
            .map(rollout::selector_string)
            .unwrap_or_default();
        let ns = object.namespace().unwrap_or(&kube.namespace);
        let listed: Vec<Pod> = kube
            .in_namespace(ns)
            .list::<Pod, Pod>(
                false,
                &format!("pods of {}", object.reference()),
                &ListParams::default().labels(&selector),
            )
            .await?;
        for pod in listed {
            if !pods.iter().any(|p| p.metadata.uid == pod.metadata.uid) {
                pods.push(pod);
            }
        }
    }
    Ok(status::rows(&candidates, &replica_sets, &pods))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redirect_config(workload: &str, redirects: Option<&str>) -> RedirectConfig {
        RedirectConfig {
            workload: workload.parse().unwrap(),
            redirects: redirects.map(str::to_owned),
            reverse: None,
            relay_secret: None,
            port_mode: None,
            wait: false,
            timeout: Duration::from_secs(300),
            kube: KubeTarget::default(),
        }
    }

    #[test]
    fn revert_names_the_template_keys_it_leaves_alone() {
        let target: WorkloadRef = "deployment/api".parse().unwrap();
        assert_eq!(
            gitops_refusal(&target, &[REDIRECT], false),
            "deployment/api: kips.io/redirect is set in the pod template (spec.template.metadata.annotations), the GitOps way, and kips never removes it: delete it from your manifest and apply it; nothing was changed"
        );
        let both = gitops_refusal(&target, &[REDIRECT, PORT_MODE], true);
        assert!(
            both.starts_with("deployment/api: kips.io/redirect, kips.io/port-mode are set in"),
            "{both}"
        );
        assert!(both.ends_with("kips never removes them: delete them from your manifest and apply it; the workload's own kips annotations were removed, the pods stay redirected"), "{both}");
    }

    #[test]
    fn redirect_values_are_checked_and_normalised_before_sending() {
        let wanted =
            redirect_annotations(&redirect_config("deploy/api", Some(" api:08080 "))).unwrap();
        assert_eq!(wanted[REDIRECT], "api:8080");
        let err =
            redirect_annotations(&redirect_config("deploy/api", Some("api:80x0"))).unwrap_err();
        assert_eq!(
            err.to_string(),
            "kips.io/redirect: \"api:80x0\": port \"80x0\" is not a number 1-65535 or a port name (expected <relay>:<port>[/udp][,...] or <port>)"
        );
        let err = redirect_annotations(&redirect_config("deploy/api", None)).unwrap_err();
        assert!(err.to_string().contains("say what to redirect"));
        let both_ways = RedirectConfig {
            reverse: Some("api=db:5432".into()),
            ..redirect_config("deploy/api", Some("api:8080"))
        };
        let err = redirect_annotations(&both_ways).unwrap_err();
        assert!(
            err.to_string().contains("a relay carries one direction"),
            "{err}"
        );
        // A redirect without a relay takes the workload's name, which the reverse entry uses.
        let defaulted = RedirectConfig {
            reverse: Some("api=db.shop.svc:5432".into()),
            ..redirect_config("deploy/api", Some("8080"))
        };
        let err = redirect_annotations(&defaulted).unwrap_err().to_string();
        assert!(
            err.starts_with("kips.io/reverse: \"api=db.shop.svc:5432\": relay \"api\""),
            "{err}"
        );
        let reverse_only = RedirectConfig {
            reverse: Some("db=db.data.svc:5432".into()),
            port_mode: Some("named".into()),
            ..redirect_config("deploy/api", None)
        };
        assert_eq!(redirect_annotations(&reverse_only).unwrap().len(), 2);
    }
}
