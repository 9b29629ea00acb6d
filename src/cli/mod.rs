//! The command line: clap lives here and nowhere else. Each command's flags are turned into
//! the plain config structs of the module that runs it ([`Cli::into_command`]), so the rest
//! of kips never sees a flag.

mod bridge;
mod certs;
mod dev;
mod initnet;
mod inject;
mod relay;
mod webhook;

use std::ffi::OsString;
use std::path::Path;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

use crate::Command;

/// The file name kubectl runs kips by as a plugin (`kubectl kips ...`).
pub const PLUGIN_NAME: &str = "kubectl-kips";

#[derive(Debug, Parser)]
#[command(
    name = "kips",
    version,
    about = "Redirect a Kubernetes workload's traffic over Azure Relay to your machine",
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    command: CliCommand,
}

#[derive(Debug, Subcommand)]
enum CliCommand {
    /// Run the mutating admission webhook (HTTPS).
    Webhook(Box<webhook::WebhookArgs>),
    /// Print manifests as admission would make them (like `istioctl kube-inject`).
    Inject(inject::InjectCommandArgs),
    /// Install the nat rules of iptables port mode (runs as the `kips-init` container).
    InitNet(initnet::InitNetArgs),
    /// Laptop side: run the relay bridge so a redirected workload's traffic reaches this machine.
    Connect(dev::ConnectArgs),
    /// Annotate a workload with `kips.io/redirect` (and optionally follow the rollout).
    Redirect(dev::RedirectArgs),
    /// Remove a workload's kips annotations (and optionally follow the rollout back).
    Revert(dev::RevertArgs),
    /// Show redirected workloads.
    Status(dev::StatusArgs),
    /// Create or inspect webhook certificates.
    Certs(certs::CertsArgs),
    /// Check what a redirect needs: cluster, webhook, certificates, Pod Security, relay
    /// Secret, images, and a workload's pods.
    Doctor(dev::DoctorArgs),
    /// A Service that exists only on this machine: a bridge-only Deployment and a Service.
    Expose(dev::ExposeArgs),
    /// Run a relay bridge, wire-compatible with azbridge (-x, -L, -T).
    Bridge(Box<bridge::BridgeArgs>),
    /// Test relay, NOT for production: Azure Relay Hybrid Connections on loopback.
    Relay(relay::RelayArgs),
    /// Print a shell completion script (bash, zsh, fish).
    #[command(
        after_help = "Examples:\n  source <(kips completion bash)\n  kips completion zsh > \"${fpath[1]}/_kips\"\n  kips completion fish > ~/.config/fish/completions/kips.fish"
    )]
    Completion {
        #[arg(value_enum)]
        shell: CompletionShell,
    },
}

/// `--log-format` of the long-running commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

impl From<LogFormatArg> for crate::logging::LogFormat {
    fn from(arg: LogFormatArg) -> Self {
        match arg {
            LogFormatArg::Text => crate::logging::LogFormat::Text,
            LogFormatArg::Json => crate::logging::LogFormat::Json,
        }
    }
}

/// The shells `kips completion` writes for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

/// `kips completion <shell>`: which shell, and the name the script completes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompletionRequest {
    pub shell: CompletionShell,
    pub bin_name: String,
}

/// Flags that parse but do not fit together, or values only kips can check.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(String);

impl UsageError {
    fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

/// How help and usage name the program: `kubectl kips` when kubectl runs it as a plugin
/// (its file is named `kubectl-kips`), else `kips`.
pub fn display_name(argv0: Option<&OsString>) -> &'static str {
    let file = argv0.and_then(|a| Path::new(a).file_name().map(|f| f.to_os_string()));
    if file.as_deref() == Some(std::ffi::OsStr::new(PLUGIN_NAME)) {
        "kubectl kips"
    } else {
        "kips"
    }
}

/// Parses the process's arguments (exits with clap's message and code on bad ones, or
/// after printing help), naming the program as it was started.
pub fn parse_args() -> Result<Command, UsageError> {
    parse_from(std::env::args_os().collect())
}

fn parse_from(argv: Vec<OsString>) -> Result<Command, UsageError> {
    let name = display_name(argv.first());
    let matches = Cli::command().bin_name(name).get_matches_from(argv.clone());
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let script_name = match name {
        "kips" => "kips".to_owned(),
        _ => PLUGIN_NAME.to_owned(),
    };
    cli.into_command_named(&script_name)
}

/// Writes the completion script `request` asks for.
pub fn write_completion(request: &CompletionRequest, out: &mut dyn std::io::Write) {
    use clap_complete::Shell;
    let shell = match request.shell {
        CompletionShell::Bash => Shell::Bash,
        CompletionShell::Zsh => Shell::Zsh,
        CompletionShell::Fish => Shell::Fish,
    };
    let mut command = Cli::command();
    clap_complete::generate(shell, &mut command, request.bin_name.clone(), out);
}

impl Cli {
    /// The command to run, as plain data.
    pub fn into_command(self) -> Result<Command, UsageError> {
        self.into_command_named("kips")
    }

    fn into_command_named(self, bin_name: &str) -> Result<Command, UsageError> {
        Ok(match self.command {
            CliCommand::Webhook(args) => {
                let log_format = args.log_format.into();
                Command::Webhook(Box::new(args.into_config()?), log_format)
            }
            CliCommand::Inject(args) => Command::Inject(args.into_config()?),
            CliCommand::InitNet(args) => Command::InitNet(args.into_config()),
            CliCommand::Connect(args) => Command::Connect(args.into_config()),
            CliCommand::Redirect(args) => Command::Redirect(args.into_config()),
            CliCommand::Revert(args) => Command::Revert(args.into_config()),
            CliCommand::Status(args) => Command::Status(args.into_config()),
            CliCommand::Certs(args) => Command::Certs(args.into_config()),
            CliCommand::Doctor(args) => Command::Doctor(args.into_config()),
            CliCommand::Expose(args) => Command::Expose(args.into_config()?),
            CliCommand::Bridge(args) => {
                let log_format = args.log_format.into();
                Command::Bridge(Box::new(args.into_options()), log_format)
            }
            CliCommand::Relay(args) => {
                let log_format = args.log_format.into();
                Command::Relay(args.into_config(), log_format)
            }
            CliCommand::Completion { shell } => Command::Completion(CompletionRequest {
                shell,
                bin_name: bin_name.to_owned(),
            }),
        })
    }
}

/// Durations as people write them (`90d`, `12h`, `30s`).
fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{e} (e.g. 90d, 12h, 30s)"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn as_a_kubectl_plugin_it_is_named_kubectl_kips() {
        let argv0 = |s: &str| Some(OsString::from(s));
        assert_eq!(
            display_name(argv0("/usr/local/bin/kubectl-kips").as_ref()),
            "kubectl kips"
        );
        assert_eq!(display_name(argv0("kubectl-kips").as_ref()), "kubectl kips");
        assert_eq!(display_name(argv0("/usr/bin/kips").as_ref()), "kips");
        assert_eq!(display_name(None), "kips");
        let help = Cli::command()
            .bin_name("kubectl kips")
            .render_usage()
            .to_string();
        assert!(help.starts_with("Usage: kubectl kips"), "{help}");
        let Ok(Command::Completion(request)) = parse_from(
            ["/x/kubectl-kips", "completion", "bash"]
                .iter()
                .map(OsString::from)
                .collect(),
        ) else {
            panic!("completion")
        };
        assert_eq!(request.bin_name, "kubectl-kips");
    }

    #[test]
    fn completions_cover_the_subcommands() {
        for shell in [
            CompletionShell::Bash,
            CompletionShell::Zsh,
            CompletionShell::Fish,
        ] {
            let mut out = Vec::new();
            write_completion(
                &CompletionRequest {
                    shell,
                    bin_name: "kips".into(),
                },
                &mut out,
            );
            let text = String::from_utf8(out).unwrap();
            for word in ["doctor", "expose", "connect", "completion", "env-file"] {
                assert!(text.contains(word), "{shell:?} lacks {word}");
            }
        }
    }

    pub(super) fn parse(argv: &[&str]) -> Result<Command, String> {
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        cli.into_command().map_err(|e| e.to_string())
    }
}
