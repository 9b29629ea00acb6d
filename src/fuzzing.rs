//! Entry points for the fuzz targets in `fuzz/` (cargo-fuzz), which can reach only `pub`
//! items. Not an API: thin wrappers over private modules, kept as small as the targets need.
//! `fuzz/README.md` says which target uses what and how to add one.

use std::collections::BTreeMap;

pub use crate::annotations::AnnotationError;
use crate::annotations::{self, KipsAnnotations, PortMode};
use crate::inject::InjectConfig;

/// The keys a user may write, in their documented order.
pub const USER_KEYS: [&str; 4] = annotations::USER_KEYS;
/// kips' own bookkeeping keys (`kips.io/status`, `kips.io/copied`).
pub const BOOKKEEPING_KEYS: [&str; 2] = [annotations::STATUS, annotations::COPIED];

/// The validated `kips.io/*` annotations of one object, comparable as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedAnnotations(KipsAnnotations);

impl ParsedAnnotations {
    /// The normalised rendering, keyed like the input (what the webhook copies into a
    /// workload's pod template).
    pub fn render(&self) -> BTreeMap<&'static str, String> {
        self.0.render()
    }

    pub fn wants_injection(&self) -> bool {
        self.0.wants_injection()
    }
}

/// The grammar's parser: every `kips.io/*` key of `pairs`, all errors at once.
pub fn parse_annotations<'a>(
    pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<ParsedAnnotations, Vec<AnnotationError>> {
    KipsAnnotations::parse(pairs).map(ParsedAnnotations)
}

/// The normalised value of one user annotation (`key` one of [`USER_KEYS`]).
pub fn normalise_annotation(key: &str, value: &str) -> Result<String, AnnotationError> {
    annotations::normalise(key, value)
}

/// `kips inject` on a YAML stream: the text it prints and its warnings.
pub fn inject_manifests(
    yaml: &str,
    config: &InjectConfig,
) -> anyhow::Result<(String, Vec<String>)> {
    crate::manifest::inject_manifests(yaml, config)
        .map(|rendered| (rendered.text, rendered.warnings))
}

/// A webhook configuration varied the ways its flags can vary it (`--native-sidecar`,
/// `--listen-port-base`, which the flag keeps at 1024 or above, `--default-port-mode`).
pub fn inject_config(
    native_sidecar: bool,
    listen_port_base: u16,
    default_port_mode: usize,
) -> InjectConfig {
    InjectConfig {
        native_sidecar,
        listen_port_base: listen_port_base.max(1024),
        default_port_mode: match default_port_mode % 3 {
            0 => PortMode::Auto,
            1 => PortMode::Iptables,
            _ => PortMode::Named,
        },
        ..InjectConfig::default()
    }
}
