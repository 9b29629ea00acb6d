//! The pure core: annotated objects in, minimal JSON patches out. No I/O.

pub mod bridge;
pub mod pod;
pub mod ports;
pub mod status;
pub mod view;
pub mod workload;

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, PatchOperation, RemoveOperation, ReplaceOperation};
use serde::ser::{Serialize, SerializeStruct, Serializer};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::annotations::PortMode;

pub const BRIDGE_CONTAINER: &str = "kips-bridge";
pub const INIT_CONTAINER: &str = "kips-init";
/// The Secret key that holds the Azure Relay SAS connection string.
pub const CONNECTION_STRING_KEY: &str = "connectionString";
pub const DEFAULT_RELAY_SECRET: &str = "kips-relay";
pub const DEFAULT_LISTEN_PORT_BASE: u16 = 15100;
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// What the webhook injects, from its flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectConfig {
    /// The azbridge sidecar image.
    pub bridge_image: String,
    /// The image of `kips-init` (the kips binary plus iptables).
    pub init_image: String,
    pub image_pull_policy: Option<String>,
    /// The Secret read when a workload does not name one with `kips.io/relay-secret`.
    pub relay_secret: String,
    pub listen_port_base: u16,
    /// Inject `kips-bridge` as a native sidecar (an init container with `restartPolicy: Always`).
    pub native_sidecar: bool,
    /// The port mode of workloads that do not set `kips.io/port-mode`.
    pub default_port_mode: PortMode,
}

impl Default for InjectConfig {
    fn default() -> Self {
        Self {
            bridge_image: format!("ghcr.io/kips-dev/azbridge:{}", crate::AZBRIDGE_VERSION),
            init_image: format!("ghcr.io/kips-dev/kips-init:{VERSION}"),
            image_pull_policy: None,
            relay_secret: DEFAULT_RELAY_SECRET.to_owned(),
            listen_port_base: DEFAULT_LISTEN_PORT_BASE,
            native_sidecar: true,
            default_port_mode: PortMode::Auto,
        }
    }
}

/// The result of admitting one object: a patch (possibly empty) and warnings for the user.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Mutation {
    pub patch: Vec<PatchOp>,
    pub warnings: Vec<String>,
    /// What happened, for metrics and events.
    pub effect: Effect,
    /// For a workload that asks for redirection: what its pods will need from the cluster,
    /// so that the edge can warn at `kubectl annotate` time rather than at pod start.
    pub needs: Option<PodNeeds>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNeeds {
    /// The Secret holding the relay connection string.
    pub relay_secret: String,
    /// `kips-init` will run with NET_ADMIN and NET_RAW (iptables mode), which Pod Security
    /// Admission allows only at the `privileged` level.
    pub net_admin: bool,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Not a kips object, or nothing to change.
    #[default]
    Unchanged,
    /// A pod got the sidecar (or was re-rendered).
    Injected,
    /// A kips pod was let through uninjected; the warnings say why.
    Skipped,
    /// A workload's template now asks for redirection (it did not before).
    RedirectOn,
    /// A workload's template no longer asks for redirection.
    RedirectOff,
    /// A workload's kips annotations changed while redirection stays on.
    RedirectChanged,
}

impl Effect {
    pub fn as_str(self) -> &'static str {
        match self {
            Effect::Unchanged => "unchanged",
            Effect::Injected => "injected",
            Effect::Skipped => "skipped",
            Effect::RedirectOn => "redirect_on",
            Effect::RedirectOff => "redirect_off",
            Effect::RedirectChanged => "redirect_changed",
        }
    }
}

/// JSON pointer from tokens; tokens are escaped (`/` → `~1`, `~` → `~0`) by jsonptr.
pub fn pointer<'t>(tokens: impl IntoIterator<Item = &'t str>) -> PointerBuf {
    PointerBuf::from_tokens(tokens)
}

/// One JSON Patch operation of a [`Mutation`].
#[derive(Debug, Clone)]
pub enum PatchOp {
    Json(PatchOperation),
    /// An `add` of JSON that kips rendered itself (its containers): serialised once, hashed
    /// for the status digest, and copied into the response as it is, never held as a tree.
    AddRendered {
        path: PointerBuf,
        value: Box<RawValue>,
    },
}

impl PatchOp {
    /// The operation as json-patch applies it.
    pub fn to_operation(&self) -> PatchOperation {
        match self {
            PatchOp::Json(operation) => operation.clone(),
            PatchOp::AddRendered { path, value } => PatchOperation::Add(AddOperation {
                path: path.clone(),
                value: serde_json::from_str(value.get()).expect("kips renders valid JSON"),
            }),
        }
    }
}

impl PartialEq for PatchOp {
    fn eq(&self, other: &Self) -> bool {
        self.to_operation() == other.to_operation()
    }
}

impl Serialize for PatchOp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            PatchOp::Json(operation) => operation.serialize(serializer),
            PatchOp::AddRendered { path, value } => {
                let mut op = serializer.serialize_struct("PatchOp", 3)?;
                op.serialize_field("op", "add")?;
                op.serialize_field("path", path)?;
                op.serialize_field("value", value)?;
                op.end()
            }
        }
    }
}

/// `ops` as a patch json-patch can apply.
pub fn to_json_patch(ops: &[PatchOp]) -> Vec<PatchOperation> {
    ops.iter().map(PatchOp::to_operation).collect()
}

pub fn add(path: PointerBuf, value: Value) -> PatchOp {
    PatchOp::Json(PatchOperation::Add(AddOperation { path, value }))
}

pub fn replace(path: PointerBuf, value: Value) -> PatchOp {
    PatchOp::Json(PatchOperation::Replace(ReplaceOperation { path, value }))
}

pub fn remove(path: PointerBuf) -> PatchOp {
    PatchOp::Json(PatchOperation::Remove(RemoveOperation { path }))
}

/// Parses `text` as a JSON pointer written in the usual `/a/b/0` form.
pub fn parse_pointer(text: &str) -> PointerBuf {
    PointerBuf::parse(text).expect("kips writes only valid JSON pointers")
}
