//! `kips connect` with a stand-in azbridge (tests/fixtures/dev/fake-azbridge), which records
//! its arguments and runs until it is signalled or told to exit. No cluster: the workloads
//! come from tests/fixtures/dev/workloads.yaml (`-f`). The hosts file is a temporary file.
//!
//! Every `kips connect` is killed when its handle drops (a failing test leaves nothing
//! running), and its azbridge dies with it (PR_SET_PDEATHSIG).

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

const KIPS: &str = env!("CARGO_BIN_EXE_kips");
const CONNECTION_STRING: &str =
    "Endpoint=sb://kips-test.invalid/;SharedAccessKeyName=dev;SharedAccessKey=s3cr3t-value";
const ORIGINAL_HOSTS: &str = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n# the last line has no newline\n10.9.9.9 intranet";

fn manifest() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dev/workloads.yaml")
}

/// A temporary directory with the stand-in azbridge (executable) and a hosts file.
struct Scene {
    dir: tempfile::TempDir,
}

impl Scene {
    fn new(hosts: &str) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("kips-connect-").tempdir()?;
        let fake = dir.path().join("azbridge");
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dev/fake-azbridge"),
            &fake,
        )?;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755))?;
        std::fs::write(dir.path().join("hosts"), hosts)?;
        Ok(Self { dir })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn hosts(&self) -> String {
        std::fs::read_to_string(self.path("hosts")).unwrap()
    }

    fn command(&self, workload: &str, extra: &[&str]) -> Command {
        self.command_with_hosts(workload, &self.path("hosts"), extra)
    }

    fn command_with_hosts(&self, workload: &str, hosts: &Path, extra: &[&str]) -> Command {
        let mut command = Command::new(KIPS);
        command
            .args(["connect", workload, "-f"])
            .arg(manifest())
            .arg("--hosts-file")
            .arg(hosts)
            .arg("--azbridge")
            .arg(self.path("azbridge"))
            .args(extra)
            .env("KIPS_RELAY_CONNECTION_STRING", CONNECTION_STRING)
            .env("FAKE_AZBRIDGE_DIR", self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    }

    fn connect(&self, workload: &str, extra: &[&str]) -> Result<Connect> {
        Connect::spawn(self.command(workload, extra))
    }

    /// Waits until `count` azbridges have recorded their arguments; returns (pid, args).
    fn azbridges(&self, count: usize) -> Result<Vec<(u32, Vec<String>)>> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut found = Vec::new();
            for entry in std::fs::read_dir(self.dir.path())? {
                let name = entry?.file_name().to_string_lossy().into_owned();
                if let Some(pid) = name.strip_suffix(".args") {
                    let bytes = std::fs::read(self.path(&name))?;
                    let args = bytes
                        .split(|b| *b == 0)
                        .filter(|a| !a.is_empty())
                        .map(|a| String::from_utf8_lossy(a).into_owned())
                        .collect();
                    found.push((pid.parse()?, args));
                }
            }
            if found.len() >= count {
                found.sort();
                return Ok(found);
            }
            if Instant::now() > deadline {
                bail!(
                    "{count} azbridge(s) did not start within 20s (found {})",
                    found.len()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A running `kips connect`, killed on drop.
struct Connect {
    child: Option<Child>,
    output: Arc<Mutex<String>>,
}

impl Connect {
    fn spawn(mut command: Command) -> Result<Self> {
        let mut child = command.spawn().context("starting kips connect")?;
        let output = Arc::new(Mutex::new(String::new()));
        for mut stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let sink = output.clone();
            std::thread::spawn(move || {
                let mut buffer = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buffer) {
                    if n == 0 {
                        break;
                    }
                    sink.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buffer[..n]));
                }
            });
        }
        Ok(Self {
            child: Some(child),
            output,
        })
    }

    fn signal(&self, signal: libc::c_int) {
        let pid = self.child.as_ref().unwrap().id() as libc::pid_t;
        unsafe { libc::kill(pid, signal) };
    }

    fn wait(&mut self, within: Duration) -> Result<ExitStatus> {
        let child = self.child.as_mut().context("already waited")?;
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                // Let the reader threads drain the pipes.
                std::thread::sleep(Duration::from_millis(50));
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!(
                    "kips connect did not exit within {within:?}; output:\n{}",
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }
}

impl Drop for Connect {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn alive(pid: u32) -> bool {
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

fn run_to_end(command: &mut Command) -> Result<(ExitStatus, String, String)> {
    let out = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()?;
    Ok((
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// The design's syntax: per relay one `-T <relay>:<name>/localhost:<port>[;...]` (UDP with a
/// `U` suffix), per reverse entry one `-L <loopback address>:<port>/<name>:<relay>`; the
/// connection string in the `-f` file, never on the command line.
fn api_args() -> Vec<String> {
    [
        "-T",
        "api:8080/localhost:8080;metrics/localhost:9090",
        "-T",
        "dns:dns.udp/localhost:53U",
        "-L",
        "127.77.0.1:5432/5432:db",
        "-L",
        "127.77.0.2:6379/6379:cache",
    ]
    .map(String::from)
    .to_vec()
}

/// Checks that `args` pass the connection string in a `-f` file of the user's alone (which
/// the stand-in copied when it started), and returns the arguments after it.
fn after_config_file<'a>(scene: &Scene, pid: u32, args: &'a [String]) -> Result<&'a [String]> {
    ensure!(args.len() >= 2 && args[0] == "-f", "no -f first: {args:?}");
    ensure!(
        !args.iter().any(|a| a.contains("s3cr3t")),
        "the connection string is on the command line: {args:?}"
    );
    let mode = std::fs::read_to_string(scene.path(&format!("{pid}.config-mode")))?;
    assert_eq!(mode.trim(), "600", "the config file's mode");
    let config = std::fs::read_to_string(scene.path(&format!("{pid}.config")))?;
    assert_eq!(
        config,
        format!("AzureRelayConnectionString: '{CONNECTION_STRING}'\n")
    );
    Ok(&args[2..])
}

#[test]
fn print_shows_the_command_and_hosts_lines_but_never_the_secret() -> Result<()> {
    let scene = Scene::new(ORIGINAL_HOSTS)?;
    let (status, stdout, stderr) = run_to_end(
        scene
            .command("deployment/api", &["--print"])
            .stdin(Stdio::null()),
    )?;
    ensure!(status.success(), "{stdout}{stderr}");
    let azbridge = scene.path("azbridge").display().to_string();
    let expected = format!(
        "{azbridge} -f '<config.yml>' -T 'api:8080/localhost:8080;metrics/localhost:9090' -T dns:dns.udp/localhost:53U -L 127.77.0.1:5432/5432:db -L 127.77.0.2:6379/6379:cache"
    );
    ensure!(
        stdout.lines().any(|l| l == expected),
        "expected line\n{expected}\nin\n{stdout}"
    );
    ensure!(
        stdout.contains("\n127.77.0.1\tpostgres.data.svc\n"),
        "{stdout}"
    );
    ensure!(
        !stdout.contains("s3cr3t") && !stderr.contains("s3cr3t"),
        "the secret leaked"
    );
    ensure!(
        scene.hosts() == ORIGINAL_HOSTS,
        "--print changed the hosts file"
    );
    Ok(())
}

#[test]
fn ctrl_c_stops_azbridge_and_restores_the_hosts_file_byte_for_byte() -> Result<()> {
    let scene = Scene::new(ORIGINAL_HOSTS)?;
    let mut connect = scene.connect("deploy/api", &[])?;
    let azbridges = scene.azbridges(1)?;
    let (pid, args) = &azbridges[0];
    assert_eq!(after_config_file(&scene, *pid, args)?, &api_args()[..]);
    let config_file = std::path::PathBuf::from(&args[1]);
    ensure!(config_file.exists(), "{}", config_file.display());
    let hosts = scene.hosts();
    ensure!(hosts.starts_with(ORIGINAL_HOSTS), "{hosts}");
    ensure!(
        hosts.contains("\n127.77.0.1\tpostgres.data.svc\n"),
        "{hosts}"
    );
    ensure!(
        hosts.contains("# kips connect dev/deployment/api begin id="),
        "{hosts}"
    );

    connect.signal(libc::SIGINT);
    let status = connect.wait(Duration::from_secs(15))?;
    let output = connect.output();
    ensure!(status.success(), "exit {status}; output:\n{output}");
    // Its output was streamed; it was stopped with SIGTERM; it is gone.
    ensure!(
        output.contains(&format!("fake azbridge {pid}: listening")),
        "{output}"
    );
    ensure!(output.contains("log line on stderr"), "{output}");
    ensure!(!output.contains("s3cr3t"), "the secret leaked:\n{output}");
    assert_eq!(
        std::fs::read_to_string(scene.path(&format!("{pid}.stopped")))?.trim(),
        "TERM"
    );
    ensure!(!alive(*pid), "azbridge {pid} outlived kips connect");
    assert_eq!(scene.hosts(), ORIGINAL_HOSTS);
    ensure!(
        !config_file.exists() && !config_file.parent().unwrap().exists(),
        "the config file outlived kips connect: {}",
        config_file.display()
    );
    Ok(())
}

#[test]
fn sigterm_stops_everything_too() -> Result<()> {
    let scene = Scene::new("127.0.0.1 localhost\n")?;
    let mut connect = scene.connect("deploy/web", &[])?;
    let azbridges = scene.azbridges(1)?;
    // The GitOps workload: annotations from the template, a named port, its own relay.
    assert_eq!(
        after_config_file(&scene, azbridges[0].0, &azbridges[0].1)?,
        [
            "-T",
            "web:http/localhost:3000",
            "-L",
            "127.77.0.1:3306/3306:webdb"
        ]
    );
    connect.signal(libc::SIGTERM);
    ensure!(
        connect.wait(Duration::from_secs(15))?.success(),
        "{}",
        connect.output()
    );
    assert_eq!(scene.hosts(), "127.0.0.1 localhost\n");
    ensure!(!alive(azbridges[0].0));
    Ok(())
}

#[test]
fn when_azbridge_dies_connect_exits_with_its_status_and_restores_the_hosts_file() -> Result<()> {
    let scene = Scene::new(ORIGINAL_HOSTS)?;
    let mut connect = scene.connect("deploy/api", &[])?;
    let (pid, _) = scene.azbridges(1)?.remove(0);
    ensure!(scene.hosts() != ORIGINAL_HOSTS);
    std::fs::write(scene.path(&format!("{pid}.exit")), "3")?;
    let status = connect.wait(Duration::from_secs(15))?;
    let output = connect.output();
    assert_eq!(status.code(), Some(3), "output:\n{output}");
    ensure!(output.contains("azbridge exited by itself"), "{output}");
    assert_eq!(scene.hosts(), ORIGINAL_HOSTS);
    Ok(())
}

#[test]
fn an_azbridge_that_exits_0_by_itself_is_a_failure_with_its_last_lines() -> Result<()> {
    // azbridge exits 0 after a refused key, an unknown hybrid connection, a port in use.
    let scene = Scene::new(ORIGINAL_HOSTS)?;
    let mut connect = scene.connect("deploy/api", &[])?;
    let (pid, _) = scene.azbridges(1)?.remove(0);
    std::fs::write(scene.path(&format!("{pid}.exit")), "0")?;
    let status = connect.wait(Duration::from_secs(15))?;
    let output = connect.output();
    assert_eq!(status.code(), Some(1), "output:\n{output}");
    ensure!(
        output.contains("azbridge exited by itself (exit status: 0)"),
        "{output}"
    );
    let tail = output
        .split("its last lines:\n")
        .nth(1)
        .with_context(|| format!("no last lines in:\n{output}"))?;
    ensure!(tail.contains("log line on stderr"), "{tail}");
    ensure!(
        tail.contains(&format!("fake azbridge {pid}: exiting with 0")),
        "{tail}"
    );
    assert_eq!(scene.hosts(), ORIGINAL_HOSTS);
    Ok(())
}

#[test]
fn two_runs_at_once_get_their_own_addresses_and_each_restores_its_part() -> Result<()> {
    // Both orders of ending: first-started first, and last-started first.
    for first_ends_first in [true, false] {
        let scene = Scene::new(ORIGINAL_HOSTS)?;
        let mut api = scene.connect("deploy/api", &[])?;
        let (api_pid, api_args) = scene.azbridges(1)?.remove(0);
        let mut web = scene.connect("deploy/web", &[])?;
        let both = scene.azbridges(2)?;
        let (web_pid, web_args) = both.into_iter().find(|(p, _)| *p != api_pid).unwrap();
        assert_eq!(
            after_config_file(&scene, api_pid, &api_args)?,
            self::api_args()
        );
        // The second run does not reuse the first run's loopback addresses.
        assert_eq!(web_args[4..], ["-L", "127.77.0.3:3306/3306:webdb"]);
        let hosts = scene.hosts();
        ensure!(hosts.contains("127.77.0.1\tpostgres.data.svc\n"), "{hosts}");
        ensure!(hosts.contains("127.77.0.3\tmysql.data.svc\n"), "{hosts}");

        let (first, second) = if first_ends_first {
            (&mut api, &mut web)
        } else {
            (&mut web, &mut api)
        };
        first.signal(libc::SIGINT);
        ensure!(
            first.wait(Duration::from_secs(15))?.success(),
            "{}",
            first.output()
        );
        let hosts = scene.hosts();
        ensure!(hosts.starts_with(ORIGINAL_HOSTS), "{hosts}");
        if first_ends_first {
            ensure!(
                !hosts.contains("postgres.data.svc") && hosts.contains("mysql.data.svc"),
                "{hosts}"
            );
        } else {
            ensure!(
                hosts.contains("postgres.data.svc") && !hosts.contains("mysql.data.svc"),
                "{hosts}"
            );
        }
        second.signal(libc::SIGINT);
        ensure!(
            second.wait(Duration::from_secs(15))?.success(),
            "{}",
            second.output()
        );
        assert_eq!(
            scene.hosts(),
            ORIGINAL_HOSTS,
            "first_ends_first={first_ends_first}"
        );
        ensure!(!alive(api_pid) && !alive(web_pid));
    }
    Ok(())
}

#[test]
fn a_block_left_by_a_killed_run_is_cleaned_up() -> Result<()> {
    // A pid that is certainly gone: a child that has been reaped.
    let mut gone = Command::new("true").spawn()?;
    gone.wait()?;
    let stale = format!(
        "# kips connect dev/deployment/api begin id=stale pid={}\n127.77.0.1\tpostgres.data.svc\n# kips connect dev/deployment/api end id=stale\n",
        gone.id()
    );
    let original = "127.0.0.1 localhost\n";
    let scene = Scene::new(&format!("{original}{stale}"))?;
    let mut connect = scene.connect("deploy/web", &[])?;
    scene.azbridges(1)?;
    ensure!(!scene.hosts().contains("id=stale"), "{}", scene.hosts());
    connect.signal(libc::SIGINT);
    ensure!(connect.wait(Duration::from_secs(15))?.success());
    ensure!(
        connect
            .output()
            .contains("removed a stale hosts-file block"),
        "{}",
        connect.output()
    );
    assert_eq!(scene.hosts(), original);
    Ok(())
}

#[test]
fn without_reverse_entries_the_hosts_file_is_never_opened() -> Result<()> {
    let scene = Scene::new("")?;
    let command = scene.command_with_hosts(
        "sts/cache",
        Path::new("/nonexistent/hosts"),
        &["--port-map", "6379=16379"],
    );
    let mut connect = Connect::spawn(command)?;
    let (pid, args) = scene.azbridges(1)?.remove(0);
    assert_eq!(
        after_config_file(&scene, pid, &args)?,
        ["-T", "cache:6379/localhost:16379"]
    );
    connect.signal(libc::SIGINT);
    ensure!(
        connect.wait(Duration::from_secs(15))?.success(),
        "{}",
        connect.output()
    );
    Ok(())
}

/// Arguments, extra environment, and the message expected on stderr.
type ErrorCase<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);

#[test]
fn clear_errors_and_nothing_touched() -> Result<()> {
    let scene = Scene::new(ORIGINAL_HOSTS)?;
    let cases: Vec<ErrorCase> = vec![
        (
            vec!["connect", "deploy/plain"],
            vec![],
            "deployment/plain in namespace dev has no kips annotations",
        ),
        (
            vec!["connect", "deploy/nope"],
            vec![],
            "holds no deployment/nope (it has deployment/api, deployment/web, statefulset/cache, deployment/plain)",
        ),
        (
            vec!["connect", "deploy/api", "--port-map", "7777=1"],
            vec![],
            "--port-map 7777=1: the workload redirects no port 7777",
        ),
        (
            vec!["connect", "deploy/api"],
            vec![("KIPS_RELAY_CONNECTION_STRING", "")],
            "no relay connection string: set KIPS_RELAY_CONNECTION_STRING",
        ),
        (
            vec!["connect", "deploy/api", "--azbridge", "azbridge-not-here"],
            vec![],
            "azbridge (Azure Relay Bridge) is not installed",
        ),
        (
            vec!["connect", "pod/api"],
            vec![],
            "\"pod\" is not a workload kind",
        ),
    ];
    for (args, env, expected) in cases {
        let mut command = Command::new(KIPS);
        command
            .args(&args)
            .arg("-f")
            .arg(manifest())
            .arg("--hosts-file")
            .arg(scene.path("hosts"))
            .env("KIPS_RELAY_CONNECTION_STRING", CONNECTION_STRING)
            .env("PATH", "/nonexistent")
            .env("FAKE_AZBRIDGE_DIR", scene.dir.path())
            .stdin(Stdio::null());
        for (k, v) in env {
            command.env(k, v);
        }
        let (status, stdout, stderr) = run_to_end(&mut command)?;
        ensure!(!status.success(), "{args:?} succeeded: {stdout}");
        ensure!(
            stderr.contains(expected),
            "{args:?}: expected {expected:?} in:\n{stderr}"
        );
        ensure!(!stderr.contains("panicked"), "{stderr}");
        assert_eq!(
            scene.hosts(),
            ORIGINAL_HOSTS,
            "{args:?} touched the hosts file"
        );
    }
    // azbridge asked for and not installed: how to get it.
    let mut command = Command::new(KIPS);
    command
        .args(["connect", "deploy/api", "--azbridge", "azbridge", "-f"])
        .arg(manifest())
        .env("KIPS_RELAY_CONNECTION_STRING", CONNECTION_STRING)
        .env("PATH", "/nonexistent")
        .env_remove("KIPS_AZBRIDGE");
    let (_, _, stderr) = run_to_end(&mut command)?;
    ensure!(
        stderr.contains("https://github.com/Azure/azure-relay-bridge/releases/download/v"),
        "{stderr}"
    );
    // Without --azbridge there is nothing to install: the built-in bridge runs.
    let mut command = Command::new(KIPS);
    command
        .args(["connect", "deploy/api", "--print", "-f"])
        .arg(manifest())
        .arg("--hosts-file")
        .arg(scene.path("hosts"))
        .env("PATH", "/nonexistent")
        .env_remove("KIPS_AZBRIDGE");
    let (status, stdout, stderr) = run_to_end(&mut command)?;
    ensure!(status.success(), "{stdout}{stderr}");
    ensure!(
        stdout.contains(
            "kips bridge -x <redacted> -T 'api:8080/localhost:8080;metrics/localhost:9090'"
        ),
        "{stdout}"
    );
    Ok(())
}

#[test]
fn a_session_command_gets_the_signal_and_its_exit_ends_the_session() -> Result<()> {
    let scene = Scene::new(ORIGINAL_HOSTS)?;
    let dir = scene.dir.path().display().to_string();
    // The command says when it runs, and exits 3 on SIGINT.
    let script = format!(
        "trap 'echo INT > {dir}/command.int; exit 3' INT; echo up > {dir}/command.up; while :; do sleep 0.05; done"
    );
    let mut connect = scene.connect("deployment/api", &["--", "sh", "-c", &script])?;
    let (pid, _) = scene.azbridges(1)?.remove(0);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !scene.path("command.up").exists() {
        ensure!(
            Instant::now() < deadline,
            "the command did not start:\n{}",
            connect.output()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    ensure!(
        scene.hosts().contains("postgres.data.svc"),
        "{}",
        scene.hosts()
    );
    // Not from a terminal: kips passes the Ctrl-C on to the command and waits for it.
    connect.signal(libc::SIGINT);
    let status = connect.wait(Duration::from_secs(20))?;
    let output = connect.output();
    assert_eq!(status.code(), Some(3), "{output}");
    assert_eq!(
        std::fs::read_to_string(scene.path("command.int"))?.trim(),
        "INT"
    );
    assert_eq!(
        std::fs::read_to_string(scene.path(&format!("{pid}.stopped")))?.trim(),
        "TERM"
    );
    assert_eq!(scene.hosts(), ORIGINAL_HOSTS);
    ensure!(
        output.contains("SIGINT: waiting for sh to end, then stopping azbridge"),
        "{output}"
    );
    Ok(())
}
