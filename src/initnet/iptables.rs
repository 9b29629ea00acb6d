//! Running `iptables-save` and `iptables-restore` of the right backend, and turning their
//! failures into messages that say what is missing.

use std::fmt;
use std::io::{ErrorKind, Write as _};
use std::process::{Command, Output, Stdio};

use super::rules::Family;
use super::system::Privileges;

/// Which kernel API the iptables tools drive. Rules must go through the one the node uses,
/// or their order against other rules is not what it seems.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Nft,
    Legacy,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        })
    }
}

/// `--backend`: a fixed backend, or `auto` to detect it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChoice {
    Auto,
    Nft,
    Legacy,
}

impl BackendChoice {
    /// Every choice, as written on the command line.
    pub const NAMES: [&str; 3] = ["auto", "nft", "legacy"];
}

/// A `--backend` value that is none of [`BackendChoice::NAMES`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("\"{0}\" is not an iptables backend (auto, nft, legacy)")]
pub struct BackendChoiceError(String);

impl std::str::FromStr for BackendChoice {
    type Err = BackendChoiceError;
    fn from_str(text: &str) -> Result<Self, BackendChoiceError> {
        match text {
            "auto" => Ok(BackendChoice::Auto),
            "nft" => Ok(BackendChoice::Nft),
            "legacy" => Ok(BackendChoice::Legacy),
            other => Err(BackendChoiceError(other.to_owned())),
        }
    }
}

/// An iptables tool that could not do its job, said in terms of what must change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ToolError {
    #[error(
        "{0} is not installed (not found in PATH): the kips-init image must carry iptables with both the nft and legacy backends"
    )]
    NotInstalled(String),
    #[error("cannot run {binary}: {error}")]
    CannotRun { binary: String, error: String },
    /// The tool ran and failed; the message says why (see [`explain_failure`]).
    #[error("{0}")]
    Failed(String),
}

/// The number of rules one backend already holds in this network namespace (both families),
/// or `None` when its tools are not installed.
pub type RuleCount = Option<usize>;

/// Detects the backend as kube-proxy's iptables-wrapper does: whichever already holds rules
/// (another mesh's init container, a CNI), nft when neither does or both hold the same.
pub fn choose_backend(nft: RuleCount, legacy: RuleCount) -> (Backend, String) {
    match (nft, legacy) {
        (None, Some(_)) => (Backend::Legacy, "iptables-nft is not installed".into()),
        (_, Some(l)) if l > nft.unwrap_or(0) => (
            Backend::Legacy,
            format!("{l} legacy rules here, {} nft rules", nft.unwrap_or(0)),
        ),
        (Some(n), _) if n > 0 => (Backend::Nft, format!("{n} nft rules here")),
        _ => (Backend::Nft, "no rules here yet: nft by default".into()),
    }
}

pub fn detect_backend() -> (Backend, String) {
    let count = |backend| {
        let mut total = None;
        for family in Family::ALL {
            // Without `-t`: legacy would create a table it is asked about.
            if let Ok(output) = Tool::new(backend, family).run("save", &[], None) {
                let rules = String::from_utf8_lossy(&output.stdout)
                    .lines()
                    .filter(|line| line.starts_with('-'))
                    .count();
                *total.get_or_insert(0) += rules;
            }
        }
        total
    };
    choose_backend(count(Backend::Nft), count(Backend::Legacy))
}

/// The iptables tools of one backend and family.
#[derive(Debug, Clone, Copy)]
pub struct Tool {
    pub backend: Backend,
    pub family: Family,
}

impl Tool {
    pub fn new(backend: Backend, family: Family) -> Self {
        Tool { backend, family }
    }

    /// e.g. `ip6tables-legacy-restore`.
    pub fn binary(&self, verb: &str) -> String {
        format!("{}-{}-{verb}", self.family.command(), self.backend)
    }

    /// The nat table as `iptables-save` prints it.
    pub fn save_nat(&self) -> Result<String, ToolError> {
        let output = self.checked("save", &["-t", "nat"], None)?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Applies restore input in one transaction, leaving rules it does not name alone.
    pub fn restore(&self, input: &str) -> Result<(), ToolError> {
        self.checked("restore", &["--noflush"], Some(input))
            .map(drop)
    }

    fn checked(&self, verb: &str, args: &[&str], input: Option<&str>) -> Result<Output, ToolError> {
        let binary = self.binary(verb);
        let output = self.run(verb, args, input).map_err(|error| {
            if error.kind() == ErrorKind::NotFound {
                ToolError::NotInstalled(binary.clone())
            } else {
                ToolError::CannotRun {
                    binary: binary.clone(),
                    error: error.to_string(),
                }
            }
        })?;
        if output.status.success() {
            Ok(output)
        } else {
            let stderr = String::from_utf8_lossy(&output.stderr);
            Err(ToolError::Failed(explain_failure(
                self,
                verb,
                stderr.trim(),
                super::system::own_privileges(),
            )))
        }
    }

    fn run(&self, verb: &str, args: &[&str], input: Option<&str>) -> std::io::Result<Output> {
        let mut child = Command::new(self.binary(verb))
            .args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
            // A tool that fails early stops reading: its exit status and stderr tell why.
            match stdin.write_all(input.as_bytes()) {
                Err(error) if error.kind() != ErrorKind::BrokenPipe => return Err(error),
                _ => {}
            }
        }
        child.wait_with_output()
    }
}

/// Says why an iptables tool failed, in terms of what the pod spec or the node must change.
pub fn explain_failure(
    tool: &Tool,
    verb: &str,
    stderr: &str,
    privileges: Option<Privileges>,
) -> String {
    let binary = tool.binary(verb);
    let said = if stderr.is_empty() {
        String::from("it printed nothing")
    } else {
        format!("it said: {stderr}")
    };
    let denied = [
        "Permission denied",
        "Operation not permitted",
        "you must be root",
    ]
    .iter()
    .any(|pattern| stderr.contains(pattern));
    if denied {
        let mut message = format!(
            "{binary} was refused: kips-init needs the capabilities NET_ADMIN and NET_RAW (securityContext.capabilities.add), which Pod Security Admission allows only at the privileged level; where that is not possible, use kips.io/port-mode: named"
        );
        if let Some(privileges) = privileges {
            let missing = privileges.missing_capabilities();
            if !missing.is_empty() {
                message.push_str(&format!("; this process lacks {}", missing.join(" and ")));
            }
            if privileges.effective_uid != 0 {
                message.push_str(&format!(
                    "; it runs as uid {}, and a non-root process gets those capabilities only from file capabilities on the iptables binaries with allowPrivilegeEscalation not false, so kips-init runs as uid 0",
                    privileges.effective_uid
                ));
            }
        }
        return format!("{message} ({said})");
    }
    let unavailable = [
        "Table does not exist",
        "can't initialize",
        "unable to initialize table",
        "not supported",
    ]
    .iter()
    .any(|pattern| stderr.contains(pattern));
    if unavailable {
        return format!(
            "{binary} cannot reach the {family} nat table: the node's kernel lacks it ({family} nat support of the {backend} backend), or NET_RAW is missing (the legacy backend needs it); --backend chooses the other backend ({said})",
            family = tool.family.label(),
            backend = tool.backend,
        );
    }
    format!("{binary} failed ({said})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_detection_follows_existing_rules_and_defaults_to_nft() {
        assert_eq!(choose_backend(Some(0), Some(0)).0, Backend::Nft);
        assert_eq!(choose_backend(Some(0), Some(3)).0, Backend::Legacy);
        assert_eq!(choose_backend(Some(5), Some(3)).0, Backend::Nft);
        assert_eq!(choose_backend(Some(2), Some(2)).0, Backend::Nft);
        assert_eq!(choose_backend(None, Some(0)).0, Backend::Legacy);
        assert_eq!(choose_backend(Some(0), None).0, Backend::Nft);
        assert_eq!(choose_backend(None, None).0, Backend::Nft);
        assert_eq!(
            choose_backend(Some(0), Some(3)).1,
            "3 legacy rules here, 0 nft rules"
        );
    }

    #[test]
    fn tool_names_follow_the_debian_and_alpine_layout() {
        assert_eq!(
            Tool::new(Backend::Nft, Family::V4).binary("restore"),
            "iptables-nft-restore"
        );
        assert_eq!(
            Tool::new(Backend::Legacy, Family::V6).binary("save"),
            "ip6tables-legacy-save"
        );
    }

    #[test]
    fn a_refusal_names_the_missing_capability() {
        let stderr = "iptables-nft-restore v1.8.9 (nf_tables): Could not fetch rule set generation id: Permission denied (you must be root)";
        let nft_v4 = Tool::new(Backend::Nft, Family::V4);
        let root_without_net_admin = Privileges {
            effective_uid: 0,
            effective_capabilities: 1 << 13,
        };
        let message = explain_failure(&nft_v4, "restore", stderr, Some(root_without_net_admin));
        assert!(message.starts_with("iptables-nft-restore was refused: kips-init needs the capabilities NET_ADMIN and NET_RAW"), "{message}");
        assert!(
            message.contains("this process lacks NET_ADMIN;")
                || message.contains("this process lacks NET_ADMIN ("),
            "{message}"
        );
        assert!(
            message.ends_with(&format!("(it said: {stderr})")),
            "{message}"
        );

        let non_root = Privileges {
            effective_uid: 65534,
            effective_capabilities: 0,
        };
        let message = explain_failure(&nft_v4, "restore", stderr, Some(non_root));
        assert!(
            message.contains("lacks NET_ADMIN and NET_RAW; it runs as uid 65534"),
            "{message}"
        );
    }

    #[test]
    fn a_missing_table_is_named() {
        let message = explain_failure(
            &Tool::new(Backend::Legacy, Family::V6),
            "restore",
            "ip6tables-restore v1.8.9 (legacy): ip6tables-restore: unable to initialize table 'nat'",
            None,
        );
        assert!(message.starts_with("ip6tables-legacy-restore cannot reach the IPv6 nat table: the node's kernel lacks it (IPv6 nat support of the legacy backend)"), "{message}");
        assert_eq!(
            explain_failure(&Tool::new(Backend::Nft, Family::V4), "restore", "", None),
            "iptables-nft-restore failed (it printed nothing)"
        );
    }
}
