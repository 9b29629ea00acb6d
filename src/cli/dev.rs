//! The developer's commands: `connect`, `redirect`, `revert`, `status`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::dev::{
    ConnectConfig, OutputFormat, PortMapping, RedirectConfig, RevertConfig, StatusConfig,
};
use crate::k8s::KubeTarget;
use crate::workload::WorkloadRef;

/// The usual kubeconfig flags.
#[derive(Debug, Clone, Default, Args)]
pub(super) struct KubeArgs {
    /// Path to the kubeconfig file (default: $KUBECONFIG, then ~/.kube/config, then the
    /// in-cluster service account).
    #[arg(long, value_name = "PATH")]
    kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use.
    #[arg(long, value_name = "NAME")]
    context: Option<String>,
    /// Namespace (default: the context's namespace, else `default`).
    #[arg(short = 'n', long, value_name = "NAME")]
    namespace: Option<String>,
}

impl From<KubeArgs> for KubeTarget {
    fn from(args: KubeArgs) -> Self {
        KubeTarget {
            kubeconfig: args.kubeconfig,
            context: args.context,
            namespace: args.namespace,
        }
    }
}

#[derive(Debug, Clone, Args)]
#[command(
    after_help = "Examples:\n  kips connect deployment/api\n  kips connect deployment/api --port-map 8080=3000\n  kips connect deployment/api --connection-string-from-secret --print\n  kips connect deployment/api --env-file .env\n  kips connect deployment/api --connection-string-from-secret -- npm start\n  KIPS_RELAY_CONNECTION_STRING='Endpoint=sb://...' sudo -E kips connect sts/db"
)]
pub(super) struct ConnectArgs {
    /// The workload: <kind>/<name> (deployment/deploy, statefulset/sts, daemonset/ds).
    workload: WorkloadRef,
    /// Serve a redirected port on another local port: <port>[/udp]=<local port>, where
    /// <port> is the port as the annotation or the container names it. Repeatable.
    #[arg(long = "port-map", value_name = "PORT=LOCAL", value_delimiter = ',')]
    port_map: Vec<PortMapping>,
    /// The hosts file that gets the names of reverse entries (restored on exit).
    #[arg(long, value_name = "PATH", default_value = "/etc/hosts")]
    hosts_file: PathBuf,
    /// The azbridge program (default: `azbridge` on PATH).
    #[arg(long, value_name = "PATH", env = "KIPS_AZBRIDGE")]
    azbridge: Option<PathBuf>,
    /// Read the relay connection string from this Secret's key `connectionString` (default:
    /// the workload's relay Secret) instead of $KIPS_RELAY_CONNECTION_STRING.
    #[arg(long, value_name = "NAME", num_args = 0..=1, require_equals = true, default_missing_value = "")]
    connection_string_from_secret: Option<String>,
    /// Print the azbridge command and the hosts-file lines instead of running them.
    #[arg(long)]
    print: bool,
    /// Read the workload from this manifest instead of the cluster.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    file: Option<PathBuf>,
    /// Write the app container's environment as its pod sees it (values, ConfigMap and
    /// Secret references, envFrom, the running pod's fields) to this file, mode 0600, in
    /// shell syntax (`set -a; . ./.env; set +a`).
    #[arg(long, value_name = "PATH")]
    env_file: Option<PathBuf>,
    /// The app container whose environment is read (default: the pod's first container that
    /// is not kips').
    #[arg(short = 'c', long, value_name = "NAME")]
    container: Option<String>,
    /// Run this command with the pod's environment while the bridge runs; when it exits,
    /// kips stops the bridge, restores the hosts file and exits with its exit code.
    #[arg(last = true, value_name = "COMMAND", conflicts_with = "print")]
    command: Vec<std::ffi::OsString>,
    #[command(flatten)]
    kube: KubeArgs,
}

impl ConnectArgs {
    pub(super) fn into_config(self) -> ConnectConfig {
        ConnectConfig {
            workload: self.workload,
            port_map: self.port_map,
            hosts_file: self.hosts_file,
            azbridge: self.azbridge,
            connection_string_from_secret: self.connection_string_from_secret,
            print: self.print,
            file: self.file,
            env_file: self.env_file,
            container: self.container,
            command: self.command,
            kube: self.kube.into(),
        }
    }
}

#[derive(Debug, Clone, Args)]
#[command(
    after_help = "Examples:\n  kips redirect deployment/api api:8080 --wait\n  kips redirect deploy/web 8080,dns:53/udp --reverse db=postgres.data.svc:5432\n  kips redirect sts/db http --port-mode named"
)]
pub(super) struct RedirectArgs {
    /// The workload: <kind>/<name> (deployment/deploy, statefulset/sts, daemonset/ds).
    workload: WorkloadRef,
    /// What to redirect: <relay>:<port>[/udp][,...] or <port> (the relay defaults to the
    /// workload's name); sets kips.io/redirect.
    #[arg(value_name = "REDIRECTS")]
    redirects: Option<String>,
    /// Two-way: <relay>=<host>:<port>[,...] lets your machine reach in-cluster hosts; sets
    /// kips.io/reverse.
    #[arg(long, value_name = "ENTRIES")]
    reverse: Option<String>,
    /// The Secret with the relay connection string; sets kips.io/relay-secret.
    #[arg(long, value_name = "NAME")]
    relay_secret: Option<String>,
    /// iptables, named or auto; sets kips.io/port-mode.
    #[arg(long, value_name = "MODE")]
    port_mode: Option<String>,
    /// Follow the rollout until every pod is injected and ready.
    #[arg(long)]
    wait: bool,
    /// How long --wait waits.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    timeout: Duration,
    #[command(flatten)]
    kube: KubeArgs,
}

impl RedirectArgs {
    pub(super) fn into_config(self) -> RedirectConfig {
        RedirectConfig {
            workload: self.workload,
            redirects: self.redirects,
            reverse: self.reverse,
            relay_secret: self.relay_secret,
            port_mode: self.port_mode,
            wait: self.wait,
            timeout: self.timeout,
            kube: self.kube.into(),
        }
    }
}

#[derive(Debug, Clone, Args)]
pub(super) struct RevertArgs {
    /// The workload: <kind>/<name> (deployment/deploy, statefulset/sts, daemonset/ds).
    workload: WorkloadRef,
    /// Follow the rollout back until every pod is plain and ready.
    #[arg(long)]
    wait: bool,
    /// How long --wait waits.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    timeout: Duration,
    #[command(flatten)]
    kube: KubeArgs,
}

impl RevertArgs {
    pub(super) fn into_config(self) -> RevertConfig {
        RevertConfig {
            workload: self.workload,
            wait: self.wait,
            timeout: self.timeout,
            kube: self.kube.into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OutputFormatArg {
    Table,
    Json,
}

#[derive(Debug, Clone, Args)]
pub(super) struct StatusArgs {
    /// Every namespace.
    #[arg(short = 'A', long)]
    all_namespaces: bool,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: OutputFormatArg,
    #[command(flatten)]
    kube: KubeArgs,
}

impl StatusArgs {
    pub(super) fn into_config(self) -> StatusConfig {
        StatusConfig {
            all_namespaces: self.all_namespaces,
            output: match self.output {
                OutputFormatArg::Table => OutputFormat::Table,
                OutputFormatArg::Json => OutputFormat::Json,
            },
            kube: self.kube.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::parse;
    use crate::Command;

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
        let Ok(Command::Connect(config)) = parse(&argv) else {
            panic!("connect flags")
        };
        assert_eq!(config.port_map.len(), 2);
        assert_eq!(config.connection_string_from_secret.as_deref(), Some(""));
        assert_eq!(config.kube.namespace.as_deref(), Some("dev"));
        let argv = [
            "kips",
            "connect",
            "deploy/api",
            "--connection-string-from-secret=team",
        ];
        let Ok(Command::Connect(config)) = parse(&argv) else {
            panic!("connect flags")
        };
        assert_eq!(
            config.connection_string_from_secret.as_deref(),
            Some("team")
        );
        assert!(parse(&["kips", "connect", "pod/x"]).is_err());
    }

    #[test]
    fn redirect_flags_parse() {
        let Ok(Command::Redirect(config)) = parse(&[
            "kips",
            "redirect",
            "deploy/api",
            " api:08080 ",
            "--wait",
            "--timeout",
            "2m",
        ]) else {
            panic!("redirect flags")
        };
        assert_eq!(config.redirects.as_deref(), Some(" api:08080 "));
        assert!(config.wait);
        assert_eq!(config.timeout, std::time::Duration::from_secs(120));
    }
}
