//! The developer's commands: `connect`, `redirect`, `revert`, `status`, `doctor`, `expose`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

use super::UsageError;
use crate::dev::{
    ConnectConfig, DEFAULT_PLACEHOLDER_IMAGE, DEFAULT_WEBHOOK_CONFIG, DoctorConfig, ExposeConfig,
    OutputFormat, PortMapping, RedirectConfig, RevertConfig, StatusConfig,
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
    /// Run this azbridge (a path, or a name on PATH) instead of the bridge built into kips.
    #[arg(long, value_name = "PATH", env = "KIPS_AZBRIDGE")]
    azbridge: Option<PathBuf>,
    /// A CA certificate (PEM) to trust for the relay's TLS beside the public roots (a
    /// private or test relay; also $KIPS_RELAY_CA, and the relay Secret's key ca.crt with
    /// --connection-string-from-secret). The built-in bridge only.
    #[arg(long, value_name = "FILE")]
    relay_ca: Option<PathBuf>,
    /// Read the relay connection string from this Secret's key `connectionString` (default:
    /// the workload's relay Secret) instead of $KIPS_RELAY_CONNECTION_STRING.
    #[arg(long, value_name = "NAME", num_args = 0..=1, require_equals = true, default_missing_value = "")]
    connection_string_from_secret: Option<String>,
    /// Print the bridge's command and the hosts-file lines instead of running them.
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
            relay_ca: self.relay_ca,
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
    /// Only this workload (<kind>/<name>), with whether the laptop's listener is connected
    /// as each injected pod's sidecar last saw it.
    workload: Option<WorkloadRef>,
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
            workload: self.workload,
            all_namespaces: self.all_namespaces,
            output: self.output.into(),
            kube: self.kube.into(),
        }
    }
}

#[derive(Debug, Clone, Args)]
#[command(
    after_help = "Checks, in order: the kubeconfig and the API server; the webhook configuration, whether its caBundle trusts what the webhook serves, whether the webhook answers (a server-side dry run of a kips-annotated pod); the namespace's Pod Security level against the port mode; the relay Secret; kips' images; and for a workload its annotations, pods and rollout. Exit code 0 only when no check fails.\n\nExamples:\n  kips doctor\n  kips doctor deployment/api -n shop\n  kips doctor -o json"
)]
pub(super) struct DoctorArgs {
    /// Also check this workload: <kind>/<name> (deployment/deploy, statefulset/sts,
    /// daemonset/ds).
    workload: Option<WorkloadRef>,
    /// The MutatingWebhookConfiguration of kips (the Helm release name).
    #[arg(long, value_name = "NAME", default_value = DEFAULT_WEBHOOK_CONFIG)]
    webhook_config: String,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: OutputFormatArg,
    #[command(flatten)]
    kube: KubeArgs,
}

impl DoctorArgs {
    pub(super) fn into_config(self) -> DoctorConfig {
        DoctorConfig {
            workload: self.workload,
            webhook_config: self.webhook_config,
            output: self.output.into(),
            kube: self.kube.into(),
        }
    }
}

#[derive(Debug, Clone, Args)]
#[command(
    after_help = "Makes a Service <name> and a Deployment <name> that runs kips' sidecar alone (a placeholder container declares the ports, named p<port>; the webhook injects the sidecar in named mode, which needs no privilege). In-cluster clients reach <name>:<port>, and kips connect deployment/<name> serves it from this machine. --delete removes both. Objects that kips did not make are never changed.\n\nExamples:\n  kips expose payments --port 8080 -n shop --wait\n  kips connect deployment/payments -n shop\n  kips expose payments --delete -n shop"
)]
pub(super) struct ExposeArgs {
    /// The Service's name (and the Deployment's, and the relay's).
    name: String,
    /// The Service's ports, each served from the laptop's same port. Repeatable.
    #[arg(long = "port", short = 'p', value_name = "PORT", value_delimiter = ',', required_unless_present = "delete", value_parser = clap::value_parser!(u16).range(1..))]
    ports: Vec<u16>,
    /// Remove what `kips expose <name>` made.
    #[arg(long, conflicts_with_all = ["ports", "relay_secret", "placeholder_image", "wait"])]
    delete: bool,
    /// The Secret with the relay connection string; sets kips.io/relay-secret.
    #[arg(long, value_name = "NAME")]
    relay_secret: Option<String>,
    /// The image of the container that only declares the ports.
    #[arg(long, value_name = "IMAGE", default_value = DEFAULT_PLACEHOLDER_IMAGE)]
    placeholder_image: String,
    /// Follow the rollout until the bridge pod is injected and ready.
    #[arg(long)]
    wait: bool,
    /// How long --wait (or --delete) waits.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    timeout: Duration,
    #[command(flatten)]
    kube: KubeArgs,
}

impl ExposeArgs {
    pub(super) fn into_config(self) -> Result<ExposeConfig, UsageError> {
        if !self.delete && self.ports.is_empty() {
            return Err(UsageError::new(format!(
                "say which ports to expose: kips expose {} --port 8080[,9090...]",
                self.name
            )));
        }
        Ok(ExposeConfig {
            name: self.name,
            ports: self.ports,
            delete: self.delete,
            relay_secret: self.relay_secret,
            placeholder_image: self.placeholder_image,
            wait: self.wait,
            timeout: self.timeout,
            kube: self.kube.into(),
        })
    }
}

impl From<OutputFormatArg> for OutputFormat {
    fn from(arg: OutputFormatArg) -> Self {
        match arg {
            OutputFormatArg::Table => OutputFormat::Table,
            OutputFormatArg::Json => OutputFormat::Json,
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
    fn connect_takes_an_env_file_and_a_command() {
        let Ok(Command::Connect(config)) = parse(&[
            "kips",
            "connect",
            "deploy/api",
            "--env-file",
            ".env",
            "-c",
            "web",
            "--",
            "./run.sh",
            "--port",
            "3000",
        ]) else {
            panic!("connect flags")
        };
        assert_eq!(
            config.env_file.as_deref(),
            Some(std::path::Path::new(".env"))
        );
        assert_eq!(config.container.as_deref(), Some("web"));
        assert_eq!(config.command, ["./run.sh", "--port", "3000"]);
        assert!(parse(&["kips", "connect", "deploy/api", "--print", "--", "x"]).is_err());
    }

    #[test]
    fn doctor_and_expose_flags_parse() {
        let Ok(Command::Doctor(config)) = parse(&[
            "kips",
            "doctor",
            "sts/db",
            "-o",
            "json",
            "--webhook-config",
            "other",
        ]) else {
            panic!("doctor flags")
        };
        assert_eq!(config.workload.unwrap().to_string(), "statefulset/db");
        assert_eq!(config.webhook_config, "other");
        let Ok(Command::Doctor(config)) = parse(&["kips", "doctor"]) else {
            panic!("doctor flags")
        };
        assert_eq!(config.webhook_config, "kips");
        let Ok(Command::Expose(config)) =
            parse(&["kips", "expose", "pay", "--port", "8080,9090", "-n", "shop"])
        else {
            panic!("expose flags")
        };
        assert_eq!(config.ports, [8080, 9090]);
        assert_eq!(config.placeholder_image, "registry.k8s.io/pause:3.10");
        let Ok(Command::Expose(config)) = parse(&["kips", "expose", "pay", "--delete"]) else {
            panic!("expose --delete")
        };
        assert!(config.delete && config.ports.is_empty());
        assert!(parse(&["kips", "expose", "pay"]).is_err());
        assert!(parse(&["kips", "expose", "pay", "--port", "0"]).is_err());
        assert!(parse(&["kips", "expose", "pay", "--delete", "--port", "80"]).is_err());
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

    #[test]
    fn status_takes_an_optional_workload() {
        let Ok(Command::Status(config)) = parse(&["kips", "status", "sts/web", "-n", "dev"]) else {
            panic!("status with a workload")
        };
        assert_eq!(config.workload, Some("statefulset/web".parse().unwrap()));
        let Ok(Command::Status(config)) = parse(&["kips", "status", "-A"]) else {
            panic!("status")
        };
        assert_eq!(config.workload, None);
        assert!(config.all_namespaces);
    }
}
