//! `kips connect`: run azbridge on the developer's machine, the mirror image of the sidecar,
//! and put the machine back as it was when it ends (Ctrl-C, SIGTERM, SIGHUP, or azbridge's
//! own exit). With `--env-file` or `-- <command>`, the app container's environment is read
//! first, and the command runs beside the bridge: its exit ends the session
//! ([`super::session`] holds both).

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::io::IsTerminal;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::core::v1::Secret;
use tokio::process::{Child, Command};
use tokio::signal::unix::{SignalKind, signal};

use super::ConnectConfig;
use super::hosts::{self, HostsFile};
use super::laptop::{self, LaptopPlan, Printable};
use super::session::{self, SessionCommand};
use crate::annotations::{InjectionStatus, STATUS};
use crate::bridge::CONNECTION_STRING_ENV;
use crate::bridge::{CONNECTION_STRING_KEY, DEFAULT_RELAY_SECRET};
use crate::inject::AZBRIDGE_VERSION;
use crate::k8s::Kube;
use crate::workload::Workload;

/// How long azbridge gets to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long the session command gets to end by itself after a signal reached it.
const COMMAND_GRACE: Duration = Duration::from_secs(10);

pub async fn run(args: ConnectConfig) -> Result<()> {
    let (object, namespace, kube) = load(&args).await?;
    let target = object.reference();
    let kips = object.kips().map_err(|e| anyhow!("{target}: {e}"))?;
    if !kips.wants_injection() {
        bail!(
            "{target} in namespace {namespace} has no kips annotations (kips.io/redirect or kips.io/reverse): there is nothing to connect. Redirect it first: kips redirect {target} <relay>:<port> -n {namespace}"
        );
    }
    let template_status: Option<InjectionStatus> = object
        .template_annotations()
        .get(STATUS)
        .and_then(|s| InjectionStatus::from_json(s));
    let hosts_file = HostsFile::new(&args.hosts_file);
    let needs_hosts = !kips.reverses.is_empty();
    let plan_with = |taken: &BTreeSet<Ipv4Addr>| -> Result<LaptopPlan> {
        laptop::plan(
            object.name(),
            &kips,
            object.pod_spec(),
            template_status.as_ref(),
            &args.port_map,
            taken,
        )
        .map_err(|e| anyhow!("{target}: {e}"))
    };
    // Fail on a bad --port-map or an unresolvable port before touching anything.
    plan_with(&BTreeSet::new())?;
    let label = format!("{namespace}/{target}");
    let environment = if args.env_file.is_some() || !args.command.is_empty() {
        Some(session_environment(&args, &object, kube.as_ref(), &label).await?)
    } else {
        None
    };

    if args.print {
        let taken = if needs_hosts {
            hosts_file
                .read()
                .map(|c| hosts::taken_addresses(&c))
                .unwrap_or_default()
        } else {
            BTreeSet::new()
        };
        let plan = plan_with(&taken)?;
        print_plan(&args, &label, &plan);
        return Ok(());
    }

    let connection_string = connection_string(&args, &object, kube.as_ref(), &namespace).await?;
    let program = find_azbridge(args.azbridge.as_deref())?;

    // Signals are caught from here on, so that nothing below can be interrupted half-done.
    let mut interrupt = signal(SignalKind::interrupt()).context("catching SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("catching SIGTERM")?;
    let mut hangup = signal(SignalKind::hangup()).context("catching SIGHUP")?;

    let run_id = format!("{:x}{:x}", std::process::id(), nanos());
    let mut guard = HostsGuard::default();
    let plan = if needs_hosts {
        let (plan, removed) = hosts_file.edit(|content| {
            // Blocks of runs that died without cleaning up (SIGKILL, power loss) go first.
            let mut content = content.to_owned();
            let mut removed = Vec::new();
            for block in hosts::blocks(&content) {
                if !hosts::process_alive(block.pid)
                    && let Some(cleaned) = hosts::remove_block(&content, &block.id)
                {
                    content = cleaned;
                    removed.push(block.label.clone());
                }
            }
            let plan = plan_with(&hosts::taken_addresses(&content))?;
            let updated = hosts::add_block(
                &content,
                &label,
                &run_id,
                std::process::id(),
                &plan.hosts_entries(),
            );
            Ok((updated, (plan, removed)))
        })?;
        for stale in removed {
            eprintln!(
                "kips connect: removed a stale hosts-file block of {stale} (its process is gone)"
            );
        }
        guard = HostsGuard {
            file: Some(hosts_file.clone()),
            id: run_id.clone(),
        };
        plan
    } else {
        plan_with(&BTreeSet::new())?
    };

    // The connection string goes through a file only this user can read, never argv (which
    // every user of the machine sees in `ps`); it is removed when kips connect ends.
    let config = ConfigFile::write(&connection_string)?;
    let mut azbridge_args = vec!["-f".to_owned(), config.path.display().to_string()];
    azbridge_args.extend(plan.args());
    println!(
        "kips connect {label}: starting {}",
        Printable {
            program: &program.to_string_lossy(),
            args: &azbridge_args
        }
    );
    for line in plan.describe() {
        println!("  {line}");
    }
    if needs_hosts {
        println!(
            "  hosts file: {} (restored when kips connect ends)",
            args.hosts_file.display()
        );
        #[cfg(target_os = "macos")]
        for entry in plan.hosts_entries() {
            println!(
                "  macOS: the loopback alias must exist: sudo ifconfig lo0 alias {} up",
                entry.address
            );
        }
    }

    let mut child = match spawn(&program, &azbridge_args) {
        Ok(child) => child,
        Err(error) => {
            guard.restore();
            return Err(error);
        }
    };
    let tail = OutputTail::follow(&mut child);
    let mut command = match environment.filter(|_| !args.command.is_empty()) {
        None => None,
        Some(env) => match SessionCommand::spawn(&args.command, &env) {
            Ok(command) => Some(command),
            Err(error) => {
                stop(&mut child).await;
                guard.restore();
                return Err(error);
            }
        },
    };
    let outcome = tokio::select! {
        status = child.wait() => Outcome::Exited(status),
        status = wait_for(&mut command) => Outcome::CommandExited(status),
        _ = interrupt.recv() => Outcome::Signal("SIGINT", libc::SIGINT),
        _ = terminate.recv() => Outcome::Signal("SIGTERM", libc::SIGTERM),
        _ = hangup.recv() => Outcome::Signal("SIGHUP", libc::SIGHUP),
    };
    let code = match outcome {
        Outcome::Signal(name, number) => {
            let code = match command.as_mut() {
                Some(command) => {
                    // A Ctrl-C typed at the terminal reached the command already (it is in
                    // kips' process group); anything else is passed on.
                    if number != libc::SIGINT || !std::io::stdin().is_terminal() {
                        command.signal(number);
                    }
                    eprintln!(
                        "kips connect: {name}: waiting for {} to end, then stopping azbridge",
                        command.program
                    );
                    command.finish(COMMAND_GRACE).await.map_or(1, exit_code)
                }
                None => {
                    eprintln!("kips connect: {name}: stopping azbridge");
                    0
                }
            };
            stop(&mut child).await;
            // What azbridge printed until it stopped is shown in full.
            tail.finish().await;
            code
        }
        Outcome::CommandExited(status) => {
            let status = status.context("waiting for the command")?;
            let program = command.as_ref().map_or("", |c| c.program.as_str());
            eprintln!("kips connect: {program} exited ({status}): stopping azbridge");
            stop(&mut child).await;
            tail.finish().await;
            exit_code(status)
        }
        Outcome::Exited(status) => {
            if let Some(command) = command.as_mut() {
                eprintln!(
                    "kips connect: azbridge ended, so the session is over: stopping {}",
                    command.program
                );
                command.signal(libc::SIGTERM);
                command.finish(STOP_GRACE).await;
            }
            let status = status.context("waiting for azbridge")?;
            // azbridge exits 0 whatever went wrong (a refused key, an unknown hybrid
            // connection, a port in use): any exit kips did not ask for is a failure.
            let code = match exit_code(status) {
                0 => 1,
                code => code,
            };
            let lines = tail.finish().await;
            eprintln!(
                "kips connect: azbridge exited by itself ({status}), so the connection is gone; {}",
                if lines.is_empty() {
                    "it printed nothing".to_owned()
                } else {
                    format!("its last lines:\n{}", lines.join("\n"))
                }
            );
            code
        }
    };
    guard.restore();
    drop(config);
    if code != 0 {
        // Everything is cleaned up by now (the exit skips destructors).
        std::process::exit(code);
    }
    Ok(())
}

/// A file holding azbridge's configuration (`AzureRelayConnectionString`), readable by this
/// user alone, in a directory of its own; both removed on drop.
struct ConfigFile {
    dir: PathBuf,
    path: PathBuf,
}

impl ConfigFile {
    fn write(connection_string: &str) -> Result<Self> {
        use std::io::Write;
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|d| d.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!("kips-connect-{}-{:x}", std::process::id(), nanos()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        let file = Self {
            path: dir.join("azbridge_config.yml"),
            dir,
        };
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&file.path)
            .with_context(|| format!("creating {}", file.path.display()))?;
        out.write_all(azbridge_config(connection_string).as_bytes())
            .with_context(|| format!("writing {}", file.path.display()))?;
        Ok(file)
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// azbridge's YAML configuration with the connection string, single-quoted (a `'` is written
/// twice), so that `;`, `=` and `:` stay part of the value.
fn azbridge_config(connection_string: &str) -> String {
    format!(
        "AzureRelayConnectionString: '{}'\n",
        connection_string.replace('\'', "''")
    )
}

/// Copies the child's output to ours line by line, keeping the last lines for the message
/// when it dies.
struct OutputTail {
    lines: std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<String>>>,
    readers: Vec<tokio::task::JoinHandle<()>>,
}

impl OutputTail {
    const KEEP: usize = 20;

    fn follow(child: &mut Child) -> Self {
        use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
        let lines = std::sync::Arc::new(std::sync::Mutex::new(std::collections::VecDeque::new()));
        let mut readers = Vec::new();
        let streams: [(Option<Box<dyn AsyncRead + Send + Unpin>>, bool); 2] = [
            (child.stdout.take().map(|s| Box::new(s) as _), false),
            (child.stderr.take().map(|s| Box::new(s) as _), true),
        ];
        for (stream, to_stderr) in streams {
            let Some(stream) = stream else { continue };
            let keep = lines.clone();
            readers.push(tokio::spawn(async move {
                let mut reader = BufReader::new(stream).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    if to_stderr {
                        eprintln!("{line}");
                    } else {
                        println!("{line}");
                    }
                    let mut keep = keep.lock().unwrap_or_else(|p| p.into_inner());
                    if keep.len() == Self::KEEP {
                        keep.pop_front();
                    }
                    keep.push_back(line);
                }
            }));
        }
        Self { lines, readers }
    }

    /// The last lines, once the child's output has ended (or a second has passed).
    async fn finish(self) -> Vec<String> {
        for reader in self.readers {
            let _ = tokio::time::timeout(Duration::from_secs(1), reader).await;
        }
        let lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        lines.iter().cloned().collect()
    }
}

enum Outcome {
    Exited(std::io::Result<ExitStatus>),
    CommandExited(std::io::Result<ExitStatus>),
    Signal(&'static str, libc::c_int),
}

/// The session command's exit; never, when there is none.
async fn wait_for(command: &mut Option<SessionCommand>) -> std::io::Result<ExitStatus> {
    match command {
        Some(command) => command.wait().await,
        None => std::future::pending().await,
    }
}

/// Reads the app container's environment and writes `--env-file`; names, never values, are
/// printed.
async fn session_environment(
    args: &ConnectConfig,
    object: &Workload,
    kube: Option<&Kube>,
    label: &str,
) -> Result<super::env::Environment> {
    let found = session::load_environment(kube, object, args.container.as_deref()).await?;
    if !found.env.skipped.is_empty() {
        eprintln!(
            "kips connect: envFrom keys that are not variable names are left out, as in the pod: {}",
            found.env.skipped.join(", ")
        );
    }
    if let Some(path) = &args.env_file {
        let secrets = if found.env.vars.iter().any(|v| v.secret) {
            "Holds Secret values: keep it to yourself (mode 0600). "
        } else {
            ""
        };
        let header = format!(
            "kips connect {label}: the environment of {}.\n{secrets}Read it with: set -a; . {}; set +a",
            found.describe(),
            path.display()
        );
        let (text, left_out) = super::env::dotenv(&found.env, &header);
        session::write_env_file(path, &text)?;
        println!(
            "kips connect {label}: wrote {} to {} (mode 0600){}",
            found.describe(),
            path.display(),
            found.secrets_note()
        );
        if !left_out.is_empty() {
            eprintln!(
                "kips connect: not in {} (a shell cannot assign these names; the command after -- gets them): {}",
                path.display(),
                left_out.join(", ")
            );
        }
    } else {
        println!(
            "kips connect {label}: the command gets {}{}",
            found.describe(),
            found.secrets_note()
        );
    }
    Ok(found.env)
}

fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default()
}

fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

/// Loads the workload from a manifest or the cluster; the client is kept for the Secret.
async fn load(args: &ConnectConfig) -> Result<(Workload, String, Option<Kube>)> {
    if let Some(file) = &args.file {
        let text = if file.as_os_str() == "-" {
            std::io::read_to_string(std::io::stdin()).context("reading the manifest from stdin")?
        } else {
            std::fs::read_to_string(file)
                .with_context(|| format!("reading the manifest {}", file.display()))?
        };
        let object = Workload::from_manifest(&text, &args.workload, &file.display().to_string())?;
        let namespace = args
            .kube
            .namespace
            .clone()
            .or_else(|| object.namespace().map(str::to_owned))
            .unwrap_or_else(|| "default".to_owned());
        let kube = if args.connection_string_from_secret.is_some() && !args.print {
            Some(super::client(&args.kube).await?)
        } else {
            None
        };
        return Ok((object, namespace, kube));
    }
    let kube = super::client(&args.kube).await?;
    let object = kube.workload(&args.workload).await?;
    Ok((object, kube.namespace.clone(), Some(kube)))
}

/// `$KIPS_RELAY_CONNECTION_STRING`, or the Secret with `--connection-string-from-secret`.
async fn connection_string(
    args: &ConnectConfig,
    object: &Workload,
    kube: Option<&Kube>,
    namespace: &str,
) -> Result<String> {
    if let Some(name) = &args.connection_string_from_secret {
        let name = if name.is_empty() {
            object
                .kips()
                .ok()
                .and_then(|k| k.relay_secret)
                .unwrap_or_else(|| DEFAULT_RELAY_SECRET.to_owned())
        } else {
            name.clone()
        };
        let kube =
            kube.ok_or_else(|| anyhow!("--connection-string-from-secret needs the cluster"))?;
        let secret = kube
            .in_namespace(namespace)
            .api::<Secret>()
            .get(&name)
            .await
            .map_err(|e| kube.explain(e, &format!("Secret {name}")))?;
        let value = secret
            .data
            .as_ref()
            .and_then(|d| d.get(CONNECTION_STRING_KEY))
            .map(|b| String::from_utf8_lossy(&b.0).trim().to_owned())
            .or_else(|| {
                secret
                    .string_data
                    .as_ref()
                    .and_then(|d| d.get(CONNECTION_STRING_KEY))
                    .cloned()
            })
            .filter(|v| !v.is_empty())
            .ok_or_else(|| {
                anyhow!("Secret {name} in namespace {namespace} has no key {CONNECTION_STRING_KEY}")
            })?;
        return Ok(value);
    }
    match std::env::var(CONNECTION_STRING_ENV) {
        Ok(value) if !value.trim().is_empty() => Ok(value.trim().to_owned()),
        _ => bail!(
            "no relay connection string: set {CONNECTION_STRING_ENV}, or pass --connection-string-from-secret (reads key {CONNECTION_STRING_KEY} of the workload's relay Secret, default {DEFAULT_RELAY_SECRET}) or --connection-string-from-secret=NAME"
        ),
    }
}

fn install_hint() -> String {
    let version = AZBRIDGE_VERSION;
    let rid = match (std::env::consts::OS, std::env::consts::ARCH) {
        ("macos", "aarch64") => "osx-arm64",
        ("macos", _) => "osx-x64",
        (_, "aarch64") => "linux-arm64",
        _ => "linux-x64",
    };
    format!(
        "azbridge (Azure Relay Bridge) is not installed: it was not found on PATH. Download a release from https://github.com/Azure/azure-relay-bridge/releases, e.g. https://github.com/Azure/azure-relay-bridge/releases/download/v{version}/{}, unpack it, and put azbridge on PATH or pass --azbridge PATH",
        release_asset(version, rid)
    )
}

/// The name of azbridge's release tarball for a runtime id (`linux-x64`, `osx-arm64`, ...).
fn release_asset(version: &str, rid: &str) -> String {
    format!("azbridge.{version}.{rid}.tar.gz")
}

/// `--azbridge PATH`, else `azbridge` on PATH.
fn find_azbridge(given: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = given {
        if is_executable(path) {
            return Ok(path.to_owned());
        }
        if path.components().count() == 1
            && let Some(found) = search_path(path.as_os_str())
        {
            return Ok(found);
        }
        bail!(
            "--azbridge {}: no such executable. {}",
            path.display(),
            install_hint()
        );
    }
    search_path(&OsString::from("azbridge")).ok_or_else(|| anyhow!("{}", install_hint()))
}

fn search_path(name: &std::ffi::OsStr) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn spawn(program: &Path, args: &[String]) -> Result<Child> {
    let mut command = Command::new(program);
    command
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    #[cfg(target_os = "linux")]
    unsafe {
        // If kips itself is killed (SIGKILL), azbridge goes too.
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    command
        .spawn()
        .with_context(|| format!("starting {}", program.display()))
}

/// SIGTERM, then SIGKILL after the grace period.
async fn stop(child: &mut Child) {
    if let Some(pid) = child.id() {
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
        if tokio::time::timeout(STOP_GRACE, child.wait()).await.is_ok() {
            return;
        }
        eprintln!("kips connect: azbridge did not stop within {STOP_GRACE:?}; killing it");
    }
    let _ = child.kill().await;
}

/// Removes this run's hosts-file block exactly once: on the normal path, and from `Drop`
/// on every other (an error, a panic).
#[derive(Default)]
struct HostsGuard {
    file: Option<HostsFile>,
    id: String,
}

impl HostsGuard {
    fn restore(&mut self) {
        let Some(file) = self.file.take() else {
            return;
        };
        let id = self.id.clone();
        let result = file.edit(|content| match hosts::remove_block(content, &id) {
            Some(updated) => Ok((updated, true)),
            None => Ok((content.to_owned(), false)),
        });
        match result {
            Ok(true) => {}
            Ok(false) => eprintln!(
                "kips connect: the hosts file {} no longer holds this run's block (edited by someone else?)",
                file.path.display()
            ),
            Err(error) => eprintln!(
                "kips connect: could not restore the hosts file {}: {error:#}",
                file.path.display()
            ),
        }
    }
}

impl Drop for HostsGuard {
    fn drop(&mut self) {
        self.restore();
    }
}

fn print_plan(args: &ConnectConfig, label: &str, plan: &LaptopPlan) {
    let program = args
        .azbridge
        .as_ref()
        .map_or_else(|| "azbridge".to_owned(), |p| p.display().to_string());
    let mut azbridge_args = vec!["-f".to_owned(), "<config.yml>".to_owned()];
    azbridge_args.extend(plan.args());
    println!("# kips connect {label}");
    println!(
        "{}",
        Printable {
            program: &program,
            args: &azbridge_args
        }
    );
    println!(
        "#   <config.yml>: AzureRelayConnectionString: '<connection string>' (a file only you can read; kips connect removes it when it ends)"
    );
    for line in plan.describe() {
        println!("#   {line}");
    }
    let entries = plan.hosts_entries();
    if !entries.is_empty() {
        println!(
            "# hosts file {} gets (and loses again when kips connect ends):",
            args.hosts_file.display()
        );
        let block = hosts::add_block("", label, "<run>", 0, &entries);
        for line in block.lines().filter(|l| !l.starts_with("# kips connect ")) {
            println!("{line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_install_hint_names_the_release_asset() {
        assert_eq!(
            release_asset("0.16.1", "linux-x64"),
            "azbridge.0.16.1.linux-x64.tar.gz"
        );
        let hint = install_hint();
        assert!(
            hint.contains(&format!(
                "/releases/download/v{AZBRIDGE_VERSION}/azbridge.{AZBRIDGE_VERSION}."
            )),
            "{hint}"
        );
        assert!(!hint.contains("-rel."), "{hint}");
    }

    #[test]
    fn the_config_file_quotes_the_connection_string() {
        assert_eq!(
            azbridge_config("Endpoint=sb://x/;SharedAccessKeyName=a'b;SharedAccessKey=k="),
            "AzureRelayConnectionString: 'Endpoint=sb://x/;SharedAccessKeyName=a''b;SharedAccessKey=k='\n"
        );
    }

    #[test]
    fn the_config_file_is_the_users_alone_and_goes_away() {
        use std::os::unix::fs::PermissionsExt;
        let file = ConfigFile::write("Endpoint=sb://x/").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&file.path), 0o600);
        assert_eq!(mode(&file.dir), 0o700);
        let (path, dir) = (file.path.clone(), file.dir.clone());
        drop(file);
        assert!(!path.exists() && !dir.exists());
    }
}
