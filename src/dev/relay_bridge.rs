//! The laptop's relay bridge for `kips connect`: `kips bridge` run in this process (the
//! default: nothing to install), or an azbridge child (`--azbridge PATH`). Both get the same
//! expressions, the mirror image of the sidecar's; this module starts either, tells when it
//! ended by itself, and stops it.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::process::{Child, Command};

use super::laptop::{LaptopPlan, Printable};
use crate::bridge::command_line::laptop_forwards;
use crate::bridge::{BridgeConfig, BridgeError, ExtraCa, Secret};
use crate::inject::AZBRIDGE_VERSION;

/// How long azbridge gets to exit after SIGTERM before it is killed.
pub(super) const STOP_GRACE: Duration = Duration::from_secs(5);

/// Which bridge `kips connect` runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Engine {
    BuiltIn,
    /// azbridge: `--azbridge PATH` or a name to look up on PATH.
    Azbridge(PathBuf),
}

impl Engine {
    pub(super) fn of(azbridge: Option<&Path>) -> Self {
        azbridge.map_or(Engine::BuiltIn, |p| Engine::Azbridge(p.to_owned()))
    }
}

/// What the bridge signs in with.
pub(super) struct Credentials {
    pub connection_string: String,
    /// CAs to trust beside the public roots (a private or test relay).
    pub relay_ca: Vec<ExtraCa>,
}

/// A bridge that is running.
pub(super) enum Running {
    BuiltIn {
        task: tokio::task::JoinHandle<Result<(), BridgeError>>,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
    },
    Azbridge(Box<AzbridgeChild>),
}

/// azbridge, its output, and the file that gave it the connection string.
pub(super) struct AzbridgeChild {
    child: Child,
    tail: OutputTail,
    /// Removed (with the connection string) when the bridge goes.
    _config: ConfigFile,
}

/// How a bridge ended by itself.
pub(super) enum Ended {
    BuiltIn(Result<Result<(), BridgeError>, tokio::task::JoinError>),
    Azbridge(std::io::Result<ExitStatus>),
}

/// The command `--print` shows and `kips connect` reports: the bridge's program and its
/// arguments, the connection string left out.
pub(super) fn command_line(engine: &Engine, plan: &LaptopPlan, config_path: &str) -> String {
    match engine {
        Engine::BuiltIn => {
            let mut args = vec![
                "bridge".to_owned(),
                "-x".to_owned(),
                "<redacted>".to_owned(),
            ];
            args.extend(plan.args());
            Printable {
                program: "kips",
                args: &args,
            }
            .to_string()
        }
        Engine::Azbridge(program) => {
            let mut args = vec!["-f".to_owned(), config_path.to_owned()];
            args.extend(plan.args());
            Printable {
                program: &program.to_string_lossy(),
                args: &args,
            }
            .to_string()
        }
    }
}

impl Running {
    /// Starts the bridge of `plan`; prints what it runs.
    pub(super) fn start(
        engine: &Engine,
        plan: &LaptopPlan,
        credentials: Credentials,
        label: &str,
    ) -> Result<Running> {
        match engine {
            Engine::BuiltIn => {
                let (local, remote) = laptop_forwards(&plan.ports, &plan.local_reverses());
                let config = BridgeConfig {
                    connection_string: Some(Secret::new(credentials.connection_string)),
                    local,
                    remote,
                    extra_ca: credentials.relay_ca,
                    ..BridgeConfig::default()
                };
                println!(
                    "kips connect {label}: running the built-in bridge, as {}",
                    command_line(engine, plan, "")
                );
                let (stop, stopped) = tokio::sync::oneshot::channel();
                let task = tokio::spawn(crate::bridge::run_until(config, async {
                    let _ = stopped.await;
                }));
                Ok(Running::BuiltIn {
                    task,
                    stop: Some(stop),
                })
            }
            Engine::Azbridge(given) => {
                let program = find_azbridge(given)?;
                // The connection string goes through a file only this user can read, never
                // argv (which every user of the machine sees in `ps`); it is removed when kips
                // connect ends.
                if !credentials.relay_ca.is_empty() {
                    eprintln!(
                        "kips connect: azbridge cannot be given a relay CA; it trusts the system's roots only"
                    );
                }
                let config = ConfigFile::write(&credentials.connection_string)?;
                let mut args = vec!["-f".to_owned(), config.path.display().to_string()];
                args.extend(plan.args());
                println!(
                    "kips connect {label}: starting {}",
                    command_line(
                        &Engine::Azbridge(program.clone()),
                        plan,
                        &config.path.display().to_string()
                    )
                );
                let mut child = spawn(&program, &args)?;
                let tail = OutputTail::follow(&mut child);
                Ok(Running::Azbridge(Box::new(AzbridgeChild {
                    child,
                    tail,
                    _config: config,
                })))
            }
        }
    }

    pub(super) fn name(&self) -> &'static str {
        match self {
            Running::BuiltIn { .. } => "the bridge",
            Running::Azbridge(_) => "azbridge",
        }
    }

    /// Resolves when the bridge ends without being asked to.
    pub(super) async fn ended(&mut self) -> Ended {
        match self {
            Running::BuiltIn { task, .. } => Ended::BuiltIn(task.await),
            Running::Azbridge(azbridge) => Ended::Azbridge(azbridge.child.wait().await),
        }
    }

    /// Stops the bridge (SIGTERM, then SIGKILL after a grace period, for azbridge), showing
    /// what azbridge printed until it stopped.
    pub(super) async fn stop(self) {
        match self {
            Running::BuiltIn { task, stop } => {
                if let Some(stop) = stop {
                    let _ = stop.send(());
                }
                match tokio::time::timeout(STOP_GRACE, task).await {
                    Ok(Ok(Err(error))) => eprintln!("kips connect: the bridge: {error}"),
                    Err(_) => eprintln!(
                        "kips connect: the bridge did not stop within {STOP_GRACE:?}; leaving it"
                    ),
                    _ => {}
                }
            }
            Running::Azbridge(mut azbridge) => {
                stop(&mut azbridge.child).await;
                azbridge.tail.finish().await;
            }
        }
    }

    /// Says why the bridge ended by itself; returns kips' exit code.
    pub(super) async fn report(self, ended: Ended) -> i32 {
        match (self, ended) {
            (_, Ended::BuiltIn(Ok(Err(error)))) => {
                eprintln!("kips connect: the bridge stopped: {error}");
                i32::from(error.exit_code())
            }
            (_, Ended::BuiltIn(Ok(Ok(())))) => {
                eprintln!("kips connect: the bridge stopped by itself");
                1
            }
            (_, Ended::BuiltIn(Err(error))) => {
                eprintln!("kips connect: the bridge failed: {error}");
                1
            }
            (Running::Azbridge(azbridge), Ended::Azbridge(status)) => {
                let Ok(status) = status else {
                    eprintln!("kips connect: waiting for azbridge failed");
                    return 1;
                };
                // azbridge exits 0 whatever went wrong (a refused key, an unknown hybrid
                // connection, a port in use): any exit kips did not ask for is a failure.
                let code = match exit_code(status) {
                    0 => 1,
                    code => code,
                };
                let lines = azbridge.tail.finish().await;
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
            (Running::BuiltIn { .. }, Ended::Azbridge(_)) => 1,
        }
    }
}

pub(super) fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

pub(super) fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default()
}

/// A file holding azbridge's configuration (`AzureRelayConnectionString`), readable by this
/// user alone, in a directory of its own; both removed on drop.
pub(super) struct ConfigFile {
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
pub(super) struct OutputTail {
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

/// `--azbridge PATH`: the file, or a bare name looked up on PATH.
fn find_azbridge(given: &Path) -> Result<PathBuf> {
    if is_executable(given) {
        return Ok(given.to_owned());
    }
    if given.components().count() == 1
        && let Some(found) = search_path(given.as_os_str())
    {
        return Ok(found);
    }
    bail!(
        "--azbridge {}: no such executable. {}",
        given.display(),
        install_hint()
    )
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
