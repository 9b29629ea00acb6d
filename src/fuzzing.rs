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

/// The azbridge preamble a sender writes for `name` (at most 255 bytes), `datagram` or not.
pub fn preamble_request(datagram: bool, name: &str) -> Vec<u8> {
    crate::bridge::preamble::request(preamble_mode(datagram), name)
}

/// What a listener reads at the start of a connection: `None` while incomplete, `Some(Err(()))`
/// for a version or mode it does not speak, else the mode (`true`: datagrams), the port name
/// and how many bytes were the preamble.
#[allow(clippy::result_unit_err)]
pub fn parse_preamble(bytes: &[u8]) -> Option<Result<(bool, String, usize), ()>> {
    use crate::bridge::preamble::{Mode, ParsedRequest};
    match crate::bridge::preamble::parse_request(bytes) {
        ParsedRequest::Incomplete => None,
        ParsedRequest::UnsupportedVersion => Some(Err(())),
        ParsedRequest::Request {
            mode,
            name,
            consumed,
        } => Some(Ok((mode == Mode::Datagram, name, consumed))),
    }
}

/// The listener's 3-byte answers: every byte triple it parses encodes back to itself.
pub fn preamble_reply_round_trip(bytes: [u8; 3]) -> Option<[u8; 3]> {
    crate::bridge::preamble::Reply::parse(bytes).map(|reply| reply.bytes())
}

fn preamble_mode(datagram: bool) -> crate::bridge::preamble::Mode {
    use crate::bridge::preamble::Mode;
    if datagram {
        Mode::Datagram
    } else {
        Mode::Stream
    }
}

/// azbridge's datagram framing (2-byte big-endian length, then the payload): `None` for a
/// payload over 65,535 bytes.
pub fn frame_datagram(payload: &[u8]) -> Option<Vec<u8>> {
    crate::bridge::forward::datagram::frame(payload)
}

/// Feeds `chunks` to the datagram decoder as a WebSocket would deliver them, taking every
/// datagram as soon as it is complete; returns the datagrams and the bytes left buffered.
pub fn decode_datagrams<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> (Vec<Vec<u8>>, usize) {
    let mut decoder = crate::bridge::forward::datagram::Decoder::default();
    let mut datagrams = Vec::new();
    for chunk in chunks {
        decoder.push(chunk);
        while let Some(datagram) = decoder.next_datagram() {
            datagrams.push(datagram.to_vec());
        }
    }
    (datagrams, decoder.buffered())
}
