//! `kips connect`: run the relay bridge on the developer's machine (built in, or azbridge:
//! [`super::relay_bridge`]), the mirror image of the sidecar, and put the machine back as it
//! was when it ends (Ctrl-C, SIGTERM, SIGHUP, or the bridge's own end). With `--env-file` or `-- <command>`, the app container's environment is read
//! first, and the command runs beside the bridge: its exit ends the session
//! ([`super::session`] holds both).

use std::collections::BTreeSet;
use std::io::IsTerminal;
use std::net::Ipv4Addr;
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::core::v1::Secret;
use tokio::signal::unix::{SignalKind, signal};

use super::ConnectConfig;
use super::hosts::{self, HostsFile};
use super::laptop::{self, LaptopPlan};
use super::relay_bridge::{
    self, Credentials, Ended, Engine, Running, STOP_GRACE, exit_code, nanos,
};
use super::session::{self, SessionCommand};
use crate::annotations::{InjectionStatus, STATUS};
use crate::bridge::secret::RELAY_CA_KEY;
use crate::bridge::{
    CONNECTION_STRING_ENV, CONNECTION_STRING_KEY, DEFAULT_RELAY_SECRET, ExtraCa, RELAY_CA_ENV,
};
use crate::k8s::Kube;
use crate::workload::Workload;
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

    let credentials = credentials(&args, &object, kube.as_ref(), &namespace).await?;
    let engine = Engine::of(args.azbridge.as_deref());

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

    let mut bridge = match Running::start(&engine, &plan, credentials, &label) {
        Ok(bridge) => bridge,
        Err(error) => {
            guard.restore();
            return Err(error);
        }
    };
    let mut command = match environment.filter(|_| !args.command.is_empty()) {
        None => None,
        Some(env) => match SessionCommand::spawn(&args.command, &env) {
            Ok(command) => Some(command),
            Err(error) => {
                bridge.stop().await;
                guard.restore();
                return Err(error);
            }
        },
    };
    let outcome = tokio::select! {
        ended = bridge.ended() => Outcome::BridgeEnded(ended),
        status = wait_for(&mut command) => Outcome::CommandExited(status),
        _ = interrupt.recv() => Outcome::Signal("SIGINT", libc::SIGINT),
        _ = terminate.recv() => Outcome::Signal("SIGTERM", libc::SIGTERM),
        _ = hangup.recv() => Outcome::Signal("SIGHUP", libc::SIGHUP),
    };
    let name = bridge.name();
    let code = match outcome {
        Outcome::Signal(signal, number) => {
            let code = match command.as_mut() {
                Some(command) => {
                    // A Ctrl-C typed at the terminal reached the command already (it is in
                    // kips' process group); anything else is passed on.
                    if number != libc::SIGINT || !std::io::stdin().is_terminal() {
                        command.signal(number);
                    }
                    eprintln!(
                        "kips connect: {signal}: waiting for {} to end, then stopping {name}",
                        command.program
                    );
                    command.finish(COMMAND_GRACE).await.map_or(1, exit_code)
                }
                None => {
                    eprintln!("kips connect: {signal}: stopping {name}");
                    0
                }
            };
            bridge.stop().await;
            code
        }
        Outcome::CommandExited(status) => {
            let status = status.context("waiting for the command")?;
            let program = command.as_ref().map_or("", |c| c.program.as_str());
            eprintln!("kips connect: {program} exited ({status}): stopping {name}");
            bridge.stop().await;
            exit_code(status)
        }
        Outcome::BridgeEnded(ended) => {
            if let Some(command) = command.as_mut() {
                eprintln!(
                    "kips connect: {name} ended, so the session is over: stopping {}",
                    command.program
                );
                command.signal(libc::SIGTERM);
                command.finish(STOP_GRACE).await;
            }
            bridge.report(ended).await
        }
    };
    guard.restore();
    if code != 0 {
        // Everything is cleaned up by now (the exit skips destructors).
        std::process::exit(code);
    }
    Ok(())
}

enum Outcome {
    BridgeEnded(Ended),
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

/// The connection string (`$KIPS_RELAY_CONNECTION_STRING`, or the Secret with
/// `--connection-string-from-secret`) and the relay CAs to trust (`--relay-ca`,
/// `$KIPS_RELAY_CA`, the Secret's `ca.crt`).
async fn credentials(
    args: &ConnectConfig,
    object: &Workload,
    kube: Option<&Kube>,
    namespace: &str,
) -> Result<Credentials> {
    let mut relay_ca = Vec::new();
    if let Some(path) = &args.relay_ca {
        let pem = std::fs::read_to_string(path)
            .with_context(|| format!("reading --relay-ca {}", path.display()))?;
        relay_ca.push(ExtraCa {
            origin: path.display().to_string(),
            pem,
        });
    }
    if let Some(pem) = std::env::var(RELAY_CA_ENV)
        .ok()
        .filter(|p| !p.trim().is_empty())
    {
        relay_ca.push(ExtraCa {
            origin: RELAY_CA_ENV.to_owned(),
            pem,
        });
    }
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
        if let Some(pem) = secret.data.as_ref().and_then(|d| d.get(RELAY_CA_KEY)) {
            relay_ca.push(ExtraCa {
                origin: format!("Secret {name}, key {RELAY_CA_KEY}"),
                pem: String::from_utf8_lossy(&pem.0).into_owned(),
            });
        }
        return Ok(Credentials {
            connection_string: value,
            relay_ca,
        });
    }
    match std::env::var(CONNECTION_STRING_ENV) {
        Ok(value) if !value.trim().is_empty() => Ok(Credentials {
            connection_string: value.trim().to_owned(),
            relay_ca,
        }),
        _ => bail!(
            "no relay connection string: set {CONNECTION_STRING_ENV}, or pass --connection-string-from-secret (reads key {CONNECTION_STRING_KEY} of the workload's relay Secret, default {DEFAULT_RELAY_SECRET}) or --connection-string-from-secret=NAME"
        ),
    }
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
    let engine = Engine::of(args.azbridge.as_deref());
    println!("# kips connect {label}");
    println!(
        "{}",
        relay_bridge::command_line(&engine, plan, "<config.yml>")
    );
    match engine {
        Engine::BuiltIn => {
            println!("#   run in kips connect itself; the connection string stays in its memory")
        }
        Engine::Azbridge(_) => println!(
            "#   <config.yml>: AzureRelayConnectionString: '<connection string>' (a file only you can read; kips connect removes it when it ends)"
        ),
    }
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
