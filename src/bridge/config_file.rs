//! azbridge's configuration file (`-f`, YAML, PascalCase keys as in `Config.cs`), the part
//! kips bridge supports: the relay credentials, `KeepAliveInterval`, and `LocalForward` /
//! `RemoteForward` entries with one binding inline or a `Bindings` list. A negative port is
//! UDP (azbridge's own encoding). Settings azbridge has and kips does not act on are
//! accepted and reported; Unix sockets, per-forward connection strings and
//! `NoAuthentication` are refused.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Deserialize;

use super::grammar::{
    Host, LocalBinding, LocalForward, Port, PortName, RelayName, RemoteBinding, RemoteForward,
};

/// What a configuration file contributes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileSettings {
    /// Assembled from `AzureRelayConnectionString` and the `AzureRelay*` overrides.
    pub connection_string: Option<String>,
    pub keepalive_seconds: Option<u64>,
    pub local: Vec<LocalForward>,
    pub remote: Vec<RemoteForward>,
    /// Keys azbridge knows that kips bridge ignores (for a warning).
    pub ignored: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigFileError {
    #[error("not azbridge configuration YAML: {0}")]
    Yaml(String),
    #[error("{entry}: {problem}")]
    Entry { entry: String, problem: String },
    #[error("{0} is not supported by kips bridge")]
    Unsupported(String),
}

const IGNORED: [&str; 9] = [
    "LogLevel",
    "LogFileName",
    "GatewayPorts",
    "ExitOnForwardFailure",
    "AddressFamily",
    "ConnectionAttempts",
    "ConnectTimeout",
    "ClearAllForwardings",
    "HostName",
];

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct File {
    azure_relay_connection_string: Option<String>,
    azure_relay_endpoint: Option<String>,
    azure_relay_shared_access_key_name: Option<String>,
    azure_relay_shared_access_key: Option<String>,
    azure_relay_shared_access_signature: Option<String>,
    keep_alive_interval: Option<u64>,
    bind_address: Option<String>,
    #[serde(default)]
    local_forward: Vec<LocalEntry>,
    #[serde(default)]
    remote_forward: Vec<RemoteEntry>,
    #[serde(flatten)]
    other: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct LocalEntry {
    relay_name: Option<String>,
    connection_string: Option<String>,
    no_authentication: Option<bool>,
    #[serde(flatten)]
    binding: LocalBindingEntry,
    #[serde(default)]
    bindings: Vec<LocalBindingEntry>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct LocalBindingEntry {
    bind_address: Option<String>,
    bind_port: Option<i32>,
    port_name: Option<String>,
    bind_local_socket: Option<String>,
    host_name: Option<String>,
    remote_host_name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RemoteEntry {
    relay_name: Option<String>,
    connection_string: Option<String>,
    #[serde(flatten)]
    binding: RemoteBindingEntry,
    #[serde(default)]
    bindings: Vec<RemoteBindingEntry>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RemoteBindingEntry {
    host: Option<String>,
    host_port: Option<i32>,
    port_name: Option<String>,
    local_socket: Option<String>,
    http: Option<bool>,
}

fn port(value: i32, entry: &str, key: &str) -> Result<Port, ConfigFileError> {
    let number = u16::try_from(value.unsigned_abs())
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| ConfigFileError::Entry {
            entry: entry.to_owned(),
            problem: format!("{key} {value} is not a port (1-65535; negative for UDP)"),
        })?;
    Ok(Port {
        number,
        udp: value < 0,
    })
}

fn host(text: &str, entry: &str, key: &str) -> Result<Host, ConfigFileError> {
    let inner = text
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or(text);
    if let Ok(ip) = inner.parse::<IpAddr>() {
        return Ok(Host::Ip(ip));
    }
    Host::parse_unbracketed(text).ok_or_else(|| ConfigFileError::Entry {
        entry: entry.to_owned(),
        problem: format!("{key} \"{text}\" is not an IP address or host name"),
    })
}

fn name(text: &str, entry: &str) -> Result<PortName, ConfigFileError> {
    PortName::parse(text).ok_or_else(|| ConfigFileError::Entry {
        entry: entry.to_owned(),
        problem: format!("PortName \"{text}\" is not a port name (letters, digits, '_', '-', '.')"),
    })
}

fn relay(text: Option<&str>, entry: &str) -> Result<RelayName, ConfigFileError> {
    let text = text.ok_or_else(|| ConfigFileError::Entry {
        entry: entry.to_owned(),
        problem: "RelayName is missing".into(),
    })?;
    RelayName::parse(text).ok_or_else(|| ConfigFileError::Entry {
        entry: entry.to_owned(),
        problem: format!("RelayName \"{text}\" is not a hybrid connection name"),
    })
}

impl FileSettings {
    pub fn parse(text: &str) -> Result<FileSettings, ConfigFileError> {
        let file: File = match serde_yaml::from_str::<Option<File>>(text) {
            Ok(Some(file)) => file,
            Ok(None) => return Ok(FileSettings::default()),
            Err(error) => return Err(ConfigFileError::Yaml(error.to_string())),
        };
        let mut ignored = Vec::new();
        for key in file.other.keys() {
            if IGNORED.contains(&key.as_str()) {
                ignored.push(key.clone());
            } else {
                return Err(ConfigFileError::Yaml(format!(
                    "unknown key \"{key}\" (azbridge's keys are PascalCase, e.g. LocalForward)"
                )));
            }
        }
        if file.bind_address.is_some() {
            return Err(ConfigFileError::Unsupported(
                "BindAddress (the source address of forwarded connections)".into(),
            ));
        }
        let mut local = Vec::new();
        for (index, entry) in file.local_forward.iter().enumerate() {
            let label = format!("LocalForward[{index}]");
            if entry.connection_string.is_some() {
                return Err(ConfigFileError::Unsupported(format!(
                    "{label}.ConnectionString"
                )));
            }
            if entry.no_authentication == Some(true) {
                return Err(ConfigFileError::Unsupported(format!(
                    "{label}.NoAuthentication"
                )));
            }
            let relay = relay(entry.relay_name.as_deref(), &label)?;
            let inline = (entry.binding.bind_port.is_some()
                || entry.binding.bind_local_socket.is_some())
            .then_some(&entry.binding);
            let mut bindings = Vec::new();
            for binding in inline.into_iter().chain(&entry.bindings) {
                if binding.bind_local_socket.is_some() {
                    return Err(ConfigFileError::Unsupported(format!(
                        "{label}.BindLocalSocket (Unix sockets)"
                    )));
                }
                let _informational = (&binding.host_name, &binding.remote_host_name);
                let Some(bind_port) = binding.bind_port else {
                    return Err(ConfigFileError::Entry {
                        entry: label,
                        problem: "a binding without BindPort".into(),
                    });
                };
                bindings.push(LocalBinding {
                    bind: binding
                        .bind_address
                        .as_deref()
                        .map(|a| host(a, &label, "BindAddress"))
                        .transpose()?,
                    port: port(bind_port, &label, "BindPort")?,
                    name: binding
                        .port_name
                        .as_deref()
                        .map(|n| name(n, &label))
                        .transpose()?,
                });
            }
            if bindings.is_empty() {
                return Err(ConfigFileError::Entry {
                    entry: label,
                    problem: "no BindPort and no Bindings".into(),
                });
            }
            local.push(LocalForward { bindings, relay });
        }
        let mut remote = Vec::new();
        for (index, entry) in file.remote_forward.iter().enumerate() {
            let label = format!("RemoteForward[{index}]");
            if entry.connection_string.is_some() {
                return Err(ConfigFileError::Unsupported(format!(
                    "{label}.ConnectionString"
                )));
            }
            let relay = relay(entry.relay_name.as_deref(), &label)?;
            let inline = (entry.binding.host_port.is_some()
                || entry.binding.local_socket.is_some())
            .then_some(&entry.binding);
            let mut bindings: Vec<RemoteBinding> = Vec::new();
            for binding in inline.into_iter().chain(&entry.bindings) {
                if binding.local_socket.is_some() {
                    return Err(ConfigFileError::Unsupported(format!(
                        "{label}.LocalSocket (Unix sockets)"
                    )));
                }
                if binding.http == Some(true) {
                    return Err(ConfigFileError::Unsupported(format!(
                        "{label}.Http (relayed HTTP)"
                    )));
                }
                let Some(host_port) = binding.host_port else {
                    return Err(ConfigFileError::Entry {
                        entry: label,
                        problem: "a binding without HostPort".into(),
                    });
                };
                let binding = RemoteBinding {
                    name: binding
                        .port_name
                        .as_deref()
                        .map(|n| name(n, &label))
                        .transpose()?,
                    host: binding
                        .host
                        .as_deref()
                        .map(|h| host(h, &label, "Host"))
                        .transpose()?,
                    port: port(host_port, &label, "HostPort")?,
                };
                if bindings
                    .iter()
                    .any(|b| b.effective_name() == binding.effective_name())
                {
                    return Err(ConfigFileError::Entry {
                        entry: label,
                        problem: format!("port name \"{}\" used twice", binding.effective_name()),
                    });
                }
                bindings.push(binding);
            }
            if bindings.is_empty() {
                return Err(ConfigFileError::Entry {
                    entry: label,
                    problem: "no HostPort and no Bindings".into(),
                });
            }
            remote.push(RemoteForward { relay, bindings });
        }
        Ok(FileSettings {
            connection_string: connection_string(&file),
            keepalive_seconds: file.keep_alive_interval,
            local,
            remote,
            ignored,
        })
    }
}

/// The connection string with azbridge's per-field overrides applied.
fn connection_string(file: &File) -> Option<String> {
    let overrides = [
        ("Endpoint", &file.azure_relay_endpoint),
        (
            "SharedAccessKeyName",
            &file.azure_relay_shared_access_key_name,
        ),
        ("SharedAccessKey", &file.azure_relay_shared_access_key),
        (
            "SharedAccessSignature",
            &file.azure_relay_shared_access_signature,
        ),
    ];
    if overrides.iter().all(|(_, v)| v.is_none()) {
        return file.azure_relay_connection_string.clone();
    }
    let mut parts: Vec<String> = file
        .azure_relay_connection_string
        .iter()
        .flat_map(|s| s.split(';'))
        .filter(|part| {
            let key = part.split('=').next().unwrap_or("").trim();
            !overrides
                .iter()
                .any(|(name, v)| v.is_some() && key.eq_ignore_ascii_case(name))
        })
        .filter(|part| !part.trim().is_empty())
        .map(str::to_owned)
        .collect();
    for (name, value) in overrides {
        if let Some(value) = value {
            parts.push(format!("{name}={value}"));
        }
    }
    Some(parts.join(";"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn azbridge_example_files_read_like_their_command_lines() {
        let client = FileSettings::parse(
            "AzureRelayConnectionString : Endpoint=sb://ns/;SharedAccessKeyName=a;SharedAccessKey=b\n\
             LocalForward :\n   - BindAddress: 127.0.0.2\n     BindPort: 1433\n     PortName: tds\n     RelayName: sql\n\
             LogLevel: INFO\n",
        )
        .unwrap();
        assert_eq!(client.local, ["127.0.0.2:1433/tds:sql".parse().unwrap()]);
        assert_eq!(client.ignored, ["LogLevel"]);
        assert!(
            client
                .connection_string
                .unwrap()
                .contains("SharedAccessKeyName=a")
        );

        let server = FileSettings::parse(
            "RemoteForward:\n  - RelayName: myrelay\n    Bindings:\n    - Host: broker.corp.example.com\n      HostPort: 5671\n      PortName: amqps\n    - Host: '::1'\n      HostPort: -53\n",
        )
        .unwrap();
        assert_eq!(
            server.remote,
            ["myrelay:amqps/broker.corp.example.com:5671;[::1]:53U"
                .parse()
                .unwrap()]
        );
    }

    #[test]
    fn overrides_replace_parts_of_the_connection_string() {
        let settings = FileSettings::parse(
            "AzureRelayConnectionString: Endpoint=sb://ns/;SharedAccessKeyName=a;SharedAccessKey=old\nAzureRelaySharedAccessKey: new\n",
        )
        .unwrap();
        assert_eq!(
            settings.connection_string.as_deref(),
            Some("Endpoint=sb://ns/;SharedAccessKeyName=a;SharedAccessKey=new")
        );
    }

    #[test]
    fn what_kips_cannot_do_is_refused_by_name() {
        for (text, expected) in [
            (
                "LocalForward:\n  - RelayName: r\n    BindLocalSocket: /tmp/s\n",
                "LocalForward[0].BindLocalSocket (Unix sockets) is not supported by kips bridge",
            ),
            (
                "RemoteForward:\n  - RelayName: r\n    HostPort: 0\n",
                "RemoteForward[0]: HostPort 0 is not a port (1-65535; negative for UDP)",
            ),
            (
                "LocalForward:\n  - BindPort: 80\n",
                "LocalForward[0]: RelayName is missing",
            ),
            (
                "Colour: blue\n",
                "not azbridge configuration YAML: unknown key \"Colour\" (azbridge's keys are PascalCase, e.g. LocalForward)",
            ),
        ] {
            assert_eq!(FileSettings::parse(text).unwrap_err().to_string(), expected);
        }
    }
}
