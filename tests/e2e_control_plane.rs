//! Smoke test of the end-to-end control plane (tests/support/control_plane.rs): workload
//! controllers run, pods are admitted and read back, and no control-plane process outlives
//! the test binary.

mod support;

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::{
    apps::v1::{Deployment, ReplicaSet, StatefulSet},
    core::v1::Pod,
};
use kube::{
    Api, ResourceExt,
    api::{ListParams, PostParams},
};
use serde_json::json;
use support::control_plane;
use support::kips_e2e::eventually;

const WAIT: Duration = Duration::from_secs(30);

fn workload<T: serde::de::DeserializeOwned>(kind: &str, name: &str, replicas: i32) -> Result<T> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": kind,
        "metadata": { "name": name },
        "spec": {
            "replicas": replicas,
            "serviceName": name, // StatefulSet only; ignored by Deployments
            "selector": { "matchLabels": { "app": name } },
            "template": {
                "metadata": { "labels": { "app": name } },
                "spec": { "containers": [{ "name": "app", "image": "registry.invalid/app:1" }] }
            }
        }
    }))?)
}

#[tokio::test]
async fn deployment_gets_a_replicaset_and_pending_pods() -> Result<()> {
    let cp = control_plane::shared().await?;
    let client = cp.client()?;
    let ns = cp.create_namespace("smoke-deploy").await?;

    Api::<Deployment>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &workload("Deployment", "web", 2)?)
        .await?;

    let rs = eventually("a ReplicaSet owned by deployment/web", WAIT, || {
        let api = Api::<ReplicaSet>::namespaced(client.clone(), &ns);
        async move {
            let list = api.list(&ListParams::default()).await?;
            Ok(list.items.into_iter().find(|rs| {
                rs.owner_references()
                    .iter()
                    .any(|o| o.kind == "Deployment" && o.name == "web")
            }))
        }
    })
    .await?;

    let pods = eventually("2 pods owned by the ReplicaSet", WAIT, || {
        let api = Api::<Pod>::namespaced(client.clone(), &ns);
        let rs_name = rs.name_any();
        async move {
            let list = api.list(&ListParams::default().labels("app=web")).await?;
            let owned: Vec<Pod> = list
                .items
                .into_iter()
                .filter(|p| p.owner_references().iter().any(|o| o.name == rs_name))
                .collect();
            Ok((owned.len() == 2).then_some(owned))
        }
    })
    .await?;

    for pod in &pods {
        let spec = pod.spec.as_ref().context("pod without spec")?;
        // No scheduler: never bound to a node, so it stays Pending.
        ensure!(
            spec.node_name.is_none(),
            "pod {} was scheduled",
            pod.name_any()
        );
        // The ServiceAccount admission plugin ran (default SA + projected token volume).
        ensure!(spec.service_account_name.as_deref() == Some("default"));
        ensure!(
            spec.volumes
                .iter()
                .flatten()
                .any(|v| v.name.starts_with("kube-api-access-")),
            "pod {} has no service-account token volume",
            pod.name_any()
        );
    }
    Ok(())
}

#[tokio::test]
async fn statefulset_gets_its_first_pod() -> Result<()> {
    let cp = control_plane::shared().await?;
    let client = cp.client()?;
    let ns = cp.create_namespace("smoke-sts").await?;

    Api::<StatefulSet>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &workload("StatefulSet", "db", 2)?)
        .await?;
    // OrderedReady: db-1 waits for db-0 to be Ready, which never happens without a kubelet.
    let pod = eventually("pod db-0", WAIT, || {
        let api = Api::<Pod>::namespaced(client.clone(), &ns);
        async move { Ok(api.get_opt("db-0").await?) }
    })
    .await?;
    ensure!(
        pod.owner_references()
            .iter()
            .any(|o| o.kind == "StatefulSet" && o.name == "db")
    );
    Ok(())
}

#[tokio::test]
async fn helm_is_built_and_reaches_the_api_server() -> Result<()> {
    let cp = control_plane::shared().await?;
    let out = cp.helm().args(["list", "--all-namespaces"]).output()?;
    ensure!(
        out.status.success(),
        "helm list failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Process cleanup: a child copy of this test binary starts the shared control plane and
// ends (normally, then by SIGKILL); afterwards none of its control-plane processes may
// remain.

const CHILD_MODE: &str = "KIPS_E2E_CHILD_MODE";
const CHILD_REPORT: &str = "KIPS_E2E_CHILD_REPORT";

fn pid_alive(pid: u32) -> bool {
    // A zombie (dead, not yet reaped by whoever inherited it) counts as gone.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !matches!(
            stat.rsplit(')')
                .next()
                .and_then(|s| s.split_whitespace().next()),
            Some("Z" | "X")
        ),
        Err(_) => false,
    }
}

/// Runs this test binary again (this very test, in the child role) once exiting normally and
/// once killed, and checks that the control plane it started died with it.
#[test]
fn no_control_plane_process_outlives_the_test_binary() -> Result<()> {
    if let Ok(mode) = std::env::var(CHILD_MODE) {
        return tokio::runtime::Runtime::new()?.block_on(hold_the_shared_control_plane(&mode));
    }
    for mode in ["exit", "kill"] {
        let report = tempfile::NamedTempFile::new()?;
        let out = Command::new(std::env::current_exe()?)
            .args([
                "--exact",
                "no_control_plane_process_outlives_the_test_binary",
                "--nocapture",
            ])
            .env(CHILD_MODE, mode)
            .env(CHILD_REPORT, report.path())
            .output()?;
        let text = std::fs::read_to_string(report.path())?;
        let mut lines = text.lines();
        let dir = lines.next().with_context(|| {
            format!(
                "child ({mode}) wrote no report; status {}; stderr:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        let pids: Vec<u32> = lines.map(str::parse).collect::<Result<_, _>>()?;
        ensure!(pids.len() == 3, "expected 3 pids, got {pids:?}");
        match mode {
            "exit" => ensure!(
                out.status.success(),
                "child failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
            _ => ensure!(!out.status.success(), "child should have been killed"),
        }

        let t0 = Instant::now();
        while pids.iter().any(|&p| pid_alive(p)) {
            ensure!(
                t0.elapsed() < Duration::from_secs(10),
                "{mode}: control-plane processes still alive after the test binary ended: {:?}",
                pids.iter().filter(|&&p| pid_alive(p)).collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        if mode == "kill" {
            // No atexit after SIGKILL: the directory stays until the next start sweeps it.
            ensure!(Path::new(dir).exists(), "expected {dir} to survive SIGKILL");
            control_plane::sweep_stale_dirs();
        }
        ensure!(!Path::new(dir).exists(), "{mode}: {dir} was not removed");
    }
    Ok(())
}

#[tokio::test]
async fn a_dropped_control_plane_leaves_nothing_behind() -> Result<()> {
    let cp = control_plane::ControlPlane::start().await?;
    let (pids, dir) = (cp.pids(), cp.dir().to_owned());
    ensure!(pids.iter().all(|&p| pid_alive(p)));
    drop(cp);
    let alive: Vec<_> = pids.iter().filter(|&&p| pid_alive(p)).collect();
    ensure!(alive.is_empty(), "still alive after drop: {alive:?}");
    ensure!(!dir.exists(), "{} was not removed", dir.display());
    Ok(())
}

/// The child role: starts the shared control plane, reports its processes, then exits
/// (`exit`) or kills itself (`kill`).
async fn hold_the_shared_control_plane(mode: &str) -> Result<()> {
    // Start it from a thread that ends before we look: the processes must survive their
    // starting thread (PR_SET_PDEATHSIG is per thread) and die only with the process.
    let cp =
        std::thread::spawn(|| tokio::runtime::Runtime::new()?.block_on(control_plane::shared()))
            .join()
            .expect("starter thread panicked")?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pids = cp.pids();
    ensure!(
        pids.iter().all(|&p| pid_alive(p)),
        "a process died with its starting thread"
    );
    // Still serving, from this runtime.
    cp.client()?.apiserver_version().await?;

    let mut report = format!("{}\n", cp.dir().display());
    for p in pids {
        report += &format!("{p}\n");
    }
    std::fs::write(std::env::var(CHILD_REPORT)?, report)?;
    if mode == "kill" {
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
    Ok(())
}
