//! The `kips.io/*` annotations: their keys; their grammar ([`grammar`]); the one rule for which
//! annotations a workload's pods get ([`effective`]), used by the webhook and the laptop
//! alike; and `kips.io/status`, the record of what kips injected into a pod ([`status`]).

mod effective;
mod grammar;
mod status;

/// Named by `crate::fuzzing` (pub there), hence `pub` here, in a private module.
pub use grammar::AnnotationError;

pub(crate) use effective::{InvalidAnnotations, WorkloadAnnotations};
pub(crate) use grammar::{
    KipsAnnotations, PortMode, PortRef, PortRefError, Protocol, Redirect, RelayName,
    RelayNameError, Reverse, copied_marker, has_kips_key, is_dns_subdomain, is_port_name,
    normalise, render_list,
};
pub(crate) use status::{
    BRIDGE_CONTAINER, INIT_CONTAINER, InjectionStatus, RenamedPort, is_kips_container,
};

pub(crate) const PREFIX: &str = "kips.io/";
pub(crate) const REDIRECT: &str = "kips.io/redirect";
pub(crate) const REVERSE: &str = "kips.io/reverse";
pub(crate) const RELAY_SECRET: &str = "kips.io/relay-secret";
pub(crate) const PORT_MODE: &str = "kips.io/port-mode";
/// Written by kips on injected pods (and templates): what was injected, by which version.
pub(crate) const STATUS: &str = "kips.io/status";
/// Written by kips on pod templates: which kips annotations it copied from the workload.
pub(crate) const COPIED: &str = "kips.io/copied";

/// The annotations a user writes, in the order they are documented.
pub(crate) const USER_KEYS: [&str; 4] = [REDIRECT, REVERSE, RELAY_SECRET, PORT_MODE];

/// kips' own bookkeeping keys, never written by users.
pub(crate) fn is_bookkeeping(key: &str) -> bool {
    key == STATUS || key == COPIED
}
