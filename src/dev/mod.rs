//! The developer's side: `kips redirect`, `revert`, `status` and `connect`.
//!
//! The decisions are pure and live in their own modules ([`target`], [`workload`],
//! [`laptop`], [`hosts`], [`rollout`], [`status`]); this module and [`connect`] do the I/O.

pub mod connect;
pub mod hosts;
pub mod kube;
pub mod laptop;
pub mod rollout;
pub mod status;
pub mod target;
pub mod workload;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use ::kube::Api;
use ::kube::api::ListParams;
use anyhow::{Result, bail};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};

use self::kube::{Kube, KubeArgs};
use self::laptop::PortMapping;
use self::target::{WorkloadKind, WorkloadRef};
use self::workload::Object;
use crate::annotations::{self, PORT_MODE, PREFIX, REDIRECT, RELAY_SECRET, REVERSE, USER_KEYS};

#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Examples:\n  kips connect deployment/api\n  kips connect deployment/api --port-map 8080=3000\n  kips connect deployment/api --connection-string-from-secret --print\n  KIPS_RELAY_CONNECTION_STRING='Endpoint=sb://...' sudo -E kips connect sts/db"
)]
pub struct ConnectArgs {
    /// The workload: <kind>/<name> (deployment/deploy, statefulset/sts, daemonset/ds).
    pub workload: WorkloadRef,
    /// Serve a redirected port on another local port: <port>[/udp]=<local port>, where
    /// <port> is the port as the annotation or the container names it. Repeatable.
    #[arg(long = "port-map", value_name = "PORT=LOCAL", value_delimiter = ',')]
    pub port_map: Vec<PortMapping>,
    /// The hosts file that gets the names of reverse entries (restored on exit).
    #[arg(long, value_name = "PATH", default_value = "/etc/hosts")]
    pub hosts_file: PathBuf,
    /// The azbridge program (default: `azbridge` on PATH).
    #[arg(long, value_name = "PATH", env = "KIPS_AZBRIDGE")]
    pub azbridge: Option<PathBuf>,
    /// Read the relay connection string from this Secret's key `connectionString` (default:
    /// the workload's relay Secret) instead of $KIPS_RELAY_CONNECTION_STRING.
    #[arg(long, value_name = "NAME", num_args = 0..=1, require_equals = true, default_missing_value = "")]
    pub connection_string_from_secret: Option<String>,
    /// Print the azbridge command and the hosts-file lines instead of running them.
    #[arg(long)]
    pub print: bool,
    /// Read the workload from this manifest instead of the cluster.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    pub file: Option<PathBuf>,
    #[command(flatten)]
    pub kube: KubeArgs,
}

#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Examples:\n  kips redirect deployment/api api:8080 --wait\n  kips redirect deploy/web 8080,dns:53/udp --reverse db=postgres.data.svc:5432\n  kips redirect sts/db http --port-mode named"
)]
pub struct RedirectArgs {
    /// The workload: <kind>/<name> (deployment/deploy, statefulset/sts, daemonset/ds).
    pub workload: WorkloadRef,
    /// What to redirect: <relay>:<port>[/udp][,...] or <port> (the relay defaults to the
    /// workload's name); sets kips.io/redirect.
    #[arg(value_name = "REDIRECTS")]
    pub redirects: Option<String>,
    /// Two-way: <relay>=<host>:<port>[,...] lets your machine reach in-cluster hosts; sets
    /// kips.io/reverse.
    #[arg(long, value_name = "ENTRIES")]
    pub reverse: Option<String>,
    /// The Secret with the relay connection string; sets kips.io/relay-secret.
    #[arg(long, value_name = "NAME")]
    pub relay_secret: Option<String>,
    /// iptables, named or auto; sets kips.io/port-mode.
    #[arg(long, value_name = "MODE")]
    pub port_mode: Option<String>,
    /// Follow the rollout until every pod is injected and ready.
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    #[command(flatten)]
    pub kube: KubeArgs,
}

#[derive(Debug, Clone, clap::Args)]
pub struct RevertArgs {
    /// The workload: <kind>/<name> (deployment/deploy, statefulset/sts, daemonset/ds).
    pub workload: WorkloadRef,
    /// Follow the rollout back until every pod is plain and ready.
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    #[command(flatten)]
    pub kube: KubeArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    /// Every namespace.
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: OutputFormat,
    #[command(flatten)]
    pub kube: KubeArgs,
}

pub async fn connect(args: ConnectArgs) -> Result<()> {
    connect::run(args).await
}

/// Reads one workload from the cluster.
pub async fn fetch(kube: &Kube, target: &WorkloadRef) -> Result<Object> {
    let explain = |e| kube.explain(e, &target.to_string());
    let (client, ns) = (kube.client.clone(), kube.namespace.as_str());
    Ok(match target.kind {
        WorkloadKind::Deployment => Object::Deployment(Box::new(
            Api::<Deployment>::namespaced(client, ns)
                .get(&target.name)
                .await
                .map_err(explain)?,
        )),
        WorkloadKind::StatefulSet => Object::StatefulSet(Box::new(
            Api::<StatefulSet>::namespaced(client, ns)
                .get(&target.name)
                .await
                .map_err(explain)?,
        )),
        WorkloadKind::DaemonSet => Object::DaemonSet(Box::new(
            Api::<DaemonSet>::namespaced(client, ns)
                .get(&target.name)
                .await
                .map_err(explain)?,
        )),
    })
}

/// Merge-patches a workload's metadata annotations; prints the API server's warnings.
async fn patch_annotations(
    kube: &Kube,
    target: &WorkloadRef,
    annotations: BTreeMap<&str, Value>,
) -> Result<Object> {
    let patch = json!({"metadata": {"annotations": annotations}});
    let what = target.to_string();
    let (object, warnings): (Object, Vec<String>) = match target.kind {
        WorkloadKind::Deployment => {
            let (o, w) = kube
                .merge_patch_with_warnings::<Deployment>(&target.name, &patch, &what)
                .await?;
            (Object::Deployment(Box::new(o)), w)
        }
        WorkloadKind::StatefulSet => {
            let (o, w) = kube
                .merge_patch_with_warnings::<StatefulSet>(&target.name, &patch, &what)
                .await?;
            (Object::StatefulSet(Box::new(o)), w)
        }
        WorkloadKind::DaemonSet => {
            let (o, w) = kube
                .merge_patch_with_warnings::<DaemonSet>(&target.name, &patch, &what)
                .await?;
            (Object::DaemonSet(Box::new(o)), w)
        }
    };
    for warning in warnings {
        eprintln!("Warning: {warning}");
    }
    Ok(object)
}

/// The annotations `redirect` sets, validated and normalised here with the webhook's own
/// grammar, so a bad value fails before anything is sent.
pub fn redirect_annotations(args: &RedirectArgs) -> Result<BTreeMap<&'static str, String>> {
    let mut out = BTreeMap::new();
    let given = [
        (REDIRECT, &args.redirects),
        (REVERSE, &args.reverse),
        (RELAY_SECRET, &args.relay_secret),
        (PORT_MODE, &args.port_mode),
    ];
    for (key, value) in given {
        if let Some(value) = value {
            out.insert(key, annotations::normalise(key, value)?);
        }
    }
    if !out.contains_key(REDIRECT) && !out.contains_key(REVERSE) {
        bail!(
            "say what to redirect: kips redirect {} <relay>:<port>[,...] (and/or --reverse <relay>=<host>:<port>)",
            args.workload
        );
    }
    // Cross-entry rules (a relay carries one direction) are the grammar's too.
    let pairs: Vec<(&str, &str)> = out.iter().map(|(k, v)| (*k, v.as_str())).collect();
    if let Err(errors) = annotations::KipsAnnotations::parse(pairs) {
        bail!(
            "{}",
            errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    Ok(out)
}

pub async fn redirect(args: RedirectArgs) -> Result<()> {
    let wanted = redirect_annotations(&args)?;
    let kube = args.kube.connect().await?;
    let target = &args.workload;
    let patch = wanted
        .iter()
        .map(|(k, v)| (*k, Value::String(v.clone())))
        .collect();
    let object = patch_annotations(&kube, target, patch).await?;
    let set: Vec<String> = wanted.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("{target} annotated: {}", set.join(" "));
    if !args.wait {
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
        args.timeout,
    )
    .await?;
    println!("{done}");
    Ok(())
}

pub async fn revert(args: RevertArgs) -> Result<()> {
    let kube = args.kube.connect().await?;
    let target = &args.workload;
    let object = fetch(&kube, target).await?;
    let present: Vec<&str> = USER_KEYS
        .iter()
        .copied()
        .filter(|k| object.annotations().contains_key(*k))
        .collect();
    let gitops = workload::user_template_keys(object.template_annotations());
    let gitops_message = || {
        format!(
            "{target}'s pod template carries {} itself (the GitOps way); kips never removes those: remove them from your manifests",
            gitops.join(", ")
        )
    };
    if present.is_empty() {
        if !gitops.is_empty() {
            bail!("{}", gitops_message());
        }
        if !args.wait {
            bail!(
                "{target} in namespace {} has no kips annotations: nothing to revert",
                kube.namespace
            );
        }
        let done = rollout::wait(&kube, target, false, None, args.timeout).await?;
        println!("{done}");
        return Ok(());
    }
    let patch = present.iter().map(|k| (*k, Value::Null)).collect();
    let object = patch_annotations(&kube, target, patch).await?;
    println!("{target}: removed {}", present.join(", "));
    if !gitops.is_empty() {
        bail!("{}", gitops_message());
    }
    if args.wait {
        let done = rollout::wait(
            &kube,
            target,
            false,
            object.metadata().generation,
            args.timeout,
        )
        .await?;
        println!("{done}");
    }
    Ok(())
}

pub async fn status(args: StatusArgs) -> Result<()> {
    let kube = args.kube.connect().await?;
    let rows = status_rows(&kube, args.all_namespaces).await?;
    match args.output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
        OutputFormat::Table if rows.is_empty() => {
            if args.all_namespaces {
                eprintln!("No redirected workloads.");
            } else {
                eprintln!("No redirected workloads in namespace {}.", kube.namespace);
            }
        }
        OutputFormat::Table => print!("{}", status::render_table(&rows)),
    }
    Ok(())
}

fn has_kips_key(map: Option<&BTreeMap<String, String>>) -> bool {
    map.is_some_and(|m| m.keys().any(|k| k.starts_with(PREFIX)))
}

/// Lists workloads (and ReplicaSets), keeps those with anything of kips, then lists the pods
/// of those only.
pub async fn status_rows(kube: &Kube, all: bool) -> Result<Vec<status::Row>> {
    async fn list<K>(kube: &Kube, all: bool, what: &str) -> Result<Vec<K>>
    where
        K: ::kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        let api = if all {
            Api::<K>::all(kube.client.clone())
        } else {
            Api::<K>::namespaced(kube.client.clone(), &kube.namespace)
        };
        Ok(api
            .list(&ListParams::default())
            .await
            .map_err(|e| kube.explain(e, what))?
            .items)
    }
    let mut objects: Vec<Object> = Vec::new();
    objects.extend(
        list::<Deployment>(kube, all, "Deployments")
            .await?
            .into_iter()
            .map(|o| Object::Deployment(Box::new(o))),
    );
    objects.extend(
        list::<StatefulSet>(kube, all, "StatefulSets")
            .await?
            .into_iter()
            .map(|o| Object::StatefulSet(Box::new(o))),
    );
    objects.extend(
        list::<DaemonSet>(kube, all, "DaemonSets")
            .await?
            .into_iter()
            .map(|o| Object::DaemonSet(Box::new(o))),
    );
    let replica_sets: Vec<ReplicaSet> = list(kube, all, "ReplicaSets").await?;
    // A Deployment whose old ReplicaSets still carry kips annotations is being reverted.
    let reverting = |object: &Object| {
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
    let candidates: Vec<Object> = objects
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
        let listed = Api::<Pod>::namespaced(kube.client.clone(), ns)
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(|e| kube.explain(e, &format!("pods of {}", object.reference())))?;
        for pod in listed.items {
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
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        command: Sub,
    }

    #[derive(clap::Subcommand)]
    enum Sub {
        Redirect(RedirectArgs),
        Connect(ConnectArgs),
    }

    fn redirect_args(args: &[&str]) -> RedirectArgs {
        let mut argv = vec!["kips", "redirect"];
        argv.extend(args);
        match Cli::try_parse_from(argv).unwrap().command {
            Sub::Redirect(args) => args,
            Sub::Connect(_) => unreachable!(),
        }
    }

    #[test]
    fn redirect_values_are_checked_and_normalised_before_sending() {
        let wanted = redirect_annotations(&redirect_args(&["deploy/api", " api:08080 "])).unwrap();
        assert_eq!(wanted[REDIRECT], "api:8080");
        let err = redirect_annotations(&redirect_args(&["deploy/api", "api:80x0"])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "kips.io/redirect: \"api:80x0\": port \"80x0\" is not a number 1-65535 or a port name (expected <relay>:<port>[/udp][,...] or <port>)"
        );
        let err = redirect_annotations(&redirect_args(&["deploy/api"])).unwrap_err();
        assert!(err.to_string().contains("say what to redirect"));
        let err = redirect_annotations(&redirect_args(&[
            "deploy/api",
            "api:8080",
            "--reverse",
            "api=db:5432",
        ]))
        .unwrap_err();
        assert!(
            err.to_string().contains("a relay carries one direction"),
            "{err}"
        );
        let wanted = redirect_annotations(&redirect_args(&[
            "deploy/api",
            "--reverse",
            "db=db.data.svc:5432",
            "--port-mode",
            "named",
        ]))
        .unwrap();
        assert_eq!(wanted.len(), 2);
    }

    #[test]
    fn connect_flags_parse() {
        let argv = [
            "kips",
            "connect",
            "deploy/api",
            "--port-map",
            "8080=3000,http=3001",
            "--connection-string-from-secret",
            "-n",
            "dev",
        ];
        let Sub::Connect(args) = Cli::try_parse_from(argv).unwrap().command else {
            unreachable!()
        };
        assert_eq!(args.port_map.len(), 2);
        assert_eq!(args.connection_string_from_secret.as_deref(), Some(""));
        assert_eq!(args.kube.namespace.as_deref(), Some("dev"));
        let argv = [
            "kips",
            "connect",
            "deploy/api",
            "--connection-string-from-secret=team",
        ];
        let Sub::Connect(args) = Cli::try_parse_from(argv).unwrap().command else {
            unreachable!()
        };
        assert_eq!(args.connection_string_from_secret.as_deref(), Some("team"));
        assert!(Cli::try_parse_from(["kips", "connect", "pod/x"]).is_err());
    }
}
