//! The relay Secret: where the connection string lives, and what is wrong with one. Pure;
//! the webhook (at `kubectl annotate` time) and `kips redirect` both warn with these words.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;

/// The Secret key that holds the Azure Relay SAS connection string.
pub const CONNECTION_STRING_KEY: &str = "connectionString";
/// The optional Secret key with a CA certificate (PEM) to trust for the relay's TLS beside
/// the public roots (a private or test relay); `kips bridge` reads it.
pub const RELAY_CA_KEY: &str = "ca.crt";
/// The relay Secret when neither the workload nor the webhook names another.
pub const DEFAULT_RELAY_SECRET: &str = "kips-relay";

/// What a relay Secret holds, as far as the bridge is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretState {
    Missing,
    NoKey,
    /// `trailing_whitespace`: the value ends in a newline or blank (`echo` into a file, then
    /// `--from-file`), which azbridge signs with as it is.
    Present {
        trailing_whitespace: bool,
    },
}

impl SecretState {
    /// Reads the state from a Secret's `data` (`None`: the Secret does not exist).
    pub fn of(data: Option<Option<&BTreeMap<String, ByteString>>>) -> Self {
        match data {
            None => SecretState::Missing,
            Some(data) => match data.and_then(|d| d.get(CONNECTION_STRING_KEY)) {
                None => SecretState::NoKey,
                Some(value) => SecretState::Present {
                    trailing_whitespace: value.0.last().is_some_and(u8::is_ascii_whitespace),
                },
            },
        }
    }

    /// The warning a user gets before pods fail, if any.
    pub fn warning(self, namespace: &str, name: &str) -> Option<String> {
        match self {
            SecretState::Missing => Some(format!(
                "kips: the relay Secret \"{name}\" does not exist in namespace \"{namespace}\": the redirected pods will not start until it does (key {CONNECTION_STRING_KEY})"
            )),
            SecretState::NoKey => Some(format!(
                "kips: the relay Secret \"{name}\" in namespace \"{namespace}\" has no key {CONNECTION_STRING_KEY}: the redirected pods will not start until it does"
            )),
            SecretState::Present {
                trailing_whitespace: true,
            } => Some(format!(
                "kips: the {CONNECTION_STRING_KEY} of Secret \"{name}\" in namespace \"{namespace}\" ends in a newline: azbridge signs with it as it is and the relay refuses it (401); recreate it with --from-literal"
            )),
            SecretState::Present {
                trailing_whitespace: false,
            } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(value: &[u8]) -> BTreeMap<String, ByteString> {
        BTreeMap::from([(CONNECTION_STRING_KEY.to_owned(), ByteString(value.to_vec()))])
    }

    #[test]
    fn a_trailing_newline_is_told_apart_from_a_good_value() {
        let good = data(b"Endpoint=sb://x/;SharedAccessKeyName=k;SharedAccessKey=abc=");
        assert_eq!(
            SecretState::of(Some(Some(&good))),
            SecretState::Present {
                trailing_whitespace: false
            }
        );
        assert_eq!(SecretState::of(Some(Some(&good))).warning("dev", "r"), None);
        let newline = data(b"Endpoint=sb://x/;SharedAccessKey=abc=\n");
        let warning = SecretState::of(Some(Some(&newline)))
            .warning("dev", "kips-relay")
            .unwrap();
        assert!(warning.contains("ends in a newline"), "{warning}");
        assert!(warning.contains("(401)"), "{warning}");
        assert_eq!(SecretState::of(Some(None)), SecretState::NoKey);
        assert_eq!(SecretState::of(None), SecretState::Missing);
        // The API server truncates warnings longer than 256 characters.
        for state in [
            SecretState::Missing,
            SecretState::NoKey,
            SecretState::of(Some(Some(&newline))),
        ] {
            let w = state.warning(&"n".repeat(63), "kips-relay").unwrap();
            assert!(w.len() <= 256, "{} characters: {w}", w.len());
        }
    }
}
