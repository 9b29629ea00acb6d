//! `kips.io/status`: the record of what kips injected into a pod.
//!
//! It makes injection idempotent (a pod that carries it is stripped and re-rendered, never
//! injected twice) and tells users what happened, including which port mode `auto` chose.

use serde::{Deserialize, Serialize};

/// The sidecar kips injects: the relay bridge.
pub const BRIDGE_CONTAINER: &str = "kips-bridge";
/// The init container of iptables port mode: `kips init-net`.
pub const INIT_CONTAINER: &str = "kips-init";

/// True for the containers kips injects.
pub fn is_kips_container(name: &str) -> bool {
    name == BRIDGE_CONTAINER || name == INIT_CONTAINER
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InjectionStatus {
    /// The kips version that rendered the injection.
    pub version: String,
    /// `iptables` or `named`; absent when the pod only has reverse entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_mode: Option<String>,
    /// What the annotations asked for (`auto` shows up here while `port_mode` says what it chose).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_mode_requested: Option<String>,
    /// `container` or `native` (an init container with `restartPolicy: Always`).
    pub sidecar: String,
    /// The relay bridge the sidecar runs: `azbridge` or `kips`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub init_containers: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub containers: Vec<String>,
    /// The redirect table: `<app port>/<proto>=<listen port>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub redirects: Vec<String>,
    /// Relays the sidecar listens on for reverse entries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reverse: Vec<String>,
    /// Container ports renamed in `named` mode, restored when the pod is stripped.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub renamed_ports: Vec<RenamedPort>,
    /// Fingerprint of what kips rendered (containers and the fields above): a pod whose
    /// digest matches a fresh rendering is left as it is on re-admission.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub digest: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RenamedPort {
    pub container: String,
    pub from: String,
    pub to: String,
}

impl InjectionStatus {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("status serialises")
    }

    /// Reads the annotation's value; `None` when it is not kips' JSON.
    pub fn from_json(text: &str) -> Option<Self> {
        serde_json::from_str(text).ok()
    }
}
