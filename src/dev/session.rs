//! What `kips connect` does for the developer's own process: read the app container's
//! environment from the cluster ([`load_environment`]), write it to a file only the user can
//! read ([`write_env_file`]), and run a command with it for the length of the session
//! ([`SessionCommand`]). Kept apart from how `connect` runs its bridge, which may change.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::Path;
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, PodSpec, Secret};
use kube::Api;
use kube::api::ListParams;
use tokio::process::{Child, Command};

use super::env::{self, EnvError, Environment, Sources};
use super::rollout::selector_string;
use crate::k8s::Kube;
use crate::workload::Workload;

/// The environment of one container, and where it was read.
pub struct PodEnvironment {
    pub env: Environment,
    pub container: String,
    /// The running pod whose fields were read (`None`: the pod template, no pod running).
    pub pod: Option<String>,
}

impl PodEnvironment {
    /// `14 variables of container app of pod api-1`.
    pub fn describe(&self) -> String {
        let from = match &self.pod {
            Some(pod) => format!("container {} of pod {pod}", self.container),
            None => format!("container {} of the pod template", self.container),
        };
        format!(
            "{} variable{} of {from}",
            self.env.vars.len(),
            if self.env.vars.len() == 1 { "" } else { "s" }
        )
    }

    /// `; from Secrets: A, B` (names, never values), or nothing.
    pub fn secrets_note(&self) -> String {
        let secrets: Vec<&str> = self
            .env
            .vars
            .iter()
            .filter(|v| v.secret)
            .map(|v| v.name.as_str())
            .collect();
        if secrets.is_empty() {
            String::new()
        } else {
            format!("; from Secrets: {}", secrets.join(", "))
        }
    }
}

/// Reads what the app container's environment refers to and resolves it. `kube` is `None`
/// for a workload read from a manifest, whose environment may then hold plain values and
/// resource fields only.
pub async fn load_environment(
    kube: Option<&Kube>,
    object: &Workload,
    container: Option<&str>,
) -> Result<PodEnvironment> {
    let target = object.reference();
    let template = object
        .pod_spec()
        .ok_or_else(|| anyhow!("{target} has no pod template"))?;
    let pod = match kube {
        Some(kube) => running_pod(kube, object).await?,
        None => None,
    };
    let spec: &PodSpec = pod
        .as_ref()
        .and_then(|p| p.spec.as_ref())
        .unwrap_or(template);
    let app = env::app_container(spec, container).map_err(|e| anyhow!("{target}: {e}"))?;
    let refs = env::references(app);
    let Some(kube) = kube else {
        if !refs.config_maps.is_empty() || !refs.secrets.is_empty() || !refs.fields.is_empty() {
            bail!(
                "{target} from a manifest: its environment refers to ConfigMaps, Secrets or pod fields, which only the cluster has; run without -f"
            );
        }
        let env = env::resolve(app, spec, &Sources::default())
            .map_err(|e| anyhow!("{target}: container {}: {e}", app.name))?;
        return Ok(PodEnvironment {
            env,
            container: app.name.clone(),
            pod: None,
        });
    };
    if pod.is_none()
        && let Some((var, field)) = refs.fields.first()
    {
        bail!(
            "{target} in namespace {ns} has no running pod, and its environment needs one: {var} comes from the pod's {field}; wait for the rollout (kips status -n {ns}) and run this again",
            ns = kube.namespace
        );
    }
    let mut config_maps = BTreeMap::new();
    for name in &refs.config_maps {
        let found = kube
            .api::<ConfigMap>()
            .get_opt(name)
            .await
            .map_err(|e| kube.explain(e, &format!("ConfigMap {name}")))?;
        if let Some(cm) = found {
            config_maps.insert(name.clone(), cm);
        }
    }
    let mut secrets = BTreeMap::new();
    for name in &refs.secrets {
        let found = kube
            .api::<Secret>()
            .get_opt(name)
            .await
            .map_err(|e| kube.explain(e, &format!("Secret {name}")))?;
        if let Some(secret) = found {
            secrets.insert(name.clone(), secret);
        }
    }
    let sources = Sources {
        config_maps: Some(&config_maps),
        secrets: Some(&secrets),
        pod: pod.as_ref(),
        node_allocatable: None,
    };
    let context = |e: EnvError| anyhow!("{target}: container {}: {e}", app.name);
    let node = pod
        .as_ref()
        .and_then(|p| p.spec.as_ref())
        .and_then(|s| s.node_name.clone());
    let env = match (env::resolve(app, spec, &sources), node) {
        (Ok(env), _) => env,
        // An unset limit is the node's allocatable: read the node only when it matters.
        (Err(EnvError::NoNodeAllocatable { .. }), Some(node)) => {
            let allocatable = Api::<Node>::all(kube.client.clone())
                .get(&node)
                .await
                .ok()
                .and_then(|n| n.status)
                .and_then(|s| s.allocatable);
            let with_node = Sources {
                node_allocatable: allocatable.as_ref(),
                ..sources
            };
            env::resolve(app, spec, &with_node).map_err(context)?
        }
        (Err(e), _) => return Err(context(e)),
    };
    Ok(PodEnvironment {
        env,
        container: app.name.clone(),
        pod: pod.and_then(|p| p.metadata.name),
    })
}

/// A running pod of the workload: ready ones first, then the newest.
async fn running_pod(kube: &Kube, object: &Workload) -> Result<Option<Pod>> {
    let selector = object.selector().map(selector_string).unwrap_or_default();
    let mut pods: Vec<Pod> = kube
        .list::<Pod, Pod>(
            false,
            &format!("pods of {}", object.reference()),
            &ListParams::default().labels(&selector),
        )
        .await?
        .into_iter()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_none()
                && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        })
        .collect();
    let ready = |p: &Pod| {
        p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
    };
    pods.sort_by_key(|p| {
        (
            !ready(p),
            std::cmp::Reverse(p.metadata.creation_timestamp.clone().map(|t| t.0)),
        )
    });
    Ok(pods.into_iter().next())
}

/// Writes `text` to `path` with mode 0600 from its creation: a new file is written beside it
/// and renamed over it, so an existing file's wider mode is never reused.
pub fn write_env_file(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| anyhow!("--env-file {}: not a file name", path.display()))?;
    let temporary = dir.join(format!(
        ".{}.kips-{}.tmp",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&temporary);
    let result = (|| -> Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temporary)
            .with_context(|| format!("creating {}", temporary.display()))?;
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_all())
            .with_context(|| format!("writing {}", temporary.display()))?;
        std::fs::rename(&temporary, path).with_context(|| format!("replacing {}", path.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    result
}

/// The developer's command, run with the pod's environment over kips' own for the length of
/// the session. It shares kips' terminal and process group, so a Ctrl-C typed there reaches
/// it directly.
pub struct SessionCommand {
    child: Child,
    pub program: String,
}

impl SessionCommand {
    pub fn spawn(argv: &[OsString], env: &Environment) -> Result<Self> {
        let (program, args) = argv
            .split_first()
            .ok_or_else(|| anyhow!("no command to run after --"))?;
        let mut command = Command::new(program);
        command.args(args).kill_on_drop(true);
        for (name, value) in env.pairs() {
            command.env(name, value);
        }
        #[cfg(target_os = "linux")]
        unsafe {
            // The session is over when kips is: if kips is killed, the command goes too.
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let name = program.to_string_lossy().into_owned();
        let child = command
            .spawn()
            .with_context(|| format!("starting the command {name}"))?;
        Ok(Self {
            child,
            program: name,
        })
    }

    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        self.child.wait().await
    }

    /// Sends `signal` to the command, if it still runs.
    pub fn signal(&self, signal: libc::c_int) {
        if let Some(pid) = self.child.id() {
            unsafe {
                libc::kill(pid as libc::pid_t, signal);
            }
        }
    }

    /// Waits up to `grace` for the command to end by itself, then SIGTERM, then SIGKILL.
    pub async fn finish(&mut self, grace: Duration) -> Option<ExitStatus> {
        if let Ok(status) = tokio::time::timeout(grace, self.child.wait()).await {
            return status.ok();
        }
        self.signal(libc::SIGTERM);
        if let Ok(status) = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await {
            return status.ok();
        }
        eprintln!(
            "kips connect: {} did not stop within 5s of SIGTERM; killing it",
            self.program
        );
        let _ = self.child.kill().await;
        self.child.wait().await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_env_file_is_the_users_alone_even_over_a_wider_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".env");
        std::fs::write(&path, "OLD=1\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_env_file(&path, "A=1\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "A=1\n");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "a temporary file was left behind");
    }
}
