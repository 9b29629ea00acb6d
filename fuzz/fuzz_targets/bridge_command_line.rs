//! `kips bridge`'s expressions, as azbridge writes them: every line is tried as a `-L`
//! expression and as a `-T` expression (and every fourth byte class as a connection string).
//! A parse never panics; what parses renders to an expression that parses to the same thing
//! and renders the same (the rendering is a fixed point); a rejection names the expression's
//! part it could not read, which is text of the expression. A connection string that parses
//! prints the same `Debug` whatever its key or signature.
#![no_main]

use kips::bridge::connection_string::{ConnectionString, Credential, Secret};
use kips::bridge::{LocalForward, RemoteForward};
use libfuzzer_sys::fuzz_target;

fn round_trip<T>(line: &str)
where
    T: std::str::FromStr<Err = kips::bridge::grammar::GrammarError>
        + std::fmt::Display
        + std::fmt::Debug
        + PartialEq,
{
    match line.parse::<T>() {
        Ok(parsed) => {
            let rendered = parsed.to_string();
            let again: T = rendered
                .parse()
                .unwrap_or_else(|e| panic!("{line:?} rendered as {rendered:?}, which fails: {e}"));
            assert_eq!(again, parsed, "{line:?} → {rendered:?}");
            assert_eq!(
                again.to_string(),
                rendered,
                "{line:?}: rendering is not a fixed point"
            );
        }
        Err(error) => {
            let message = error.to_string();
            assert!(!message.is_empty(), "{line:?}: an empty error");
            assert!(!error.expected().is_empty(), "{line:?}: no expected form");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for line in text.split('\n') {
        round_trip::<LocalForward>(line);
        round_trip::<RemoteForward>(line);
        if let Ok(parsed) = ConnectionString::parse(line) {
            // Debug must not depend on the secret: the same string with another secret
            // prints the same.
            let mut other = parsed.clone();
            other.credential = match &parsed.credential {
                Credential::SharedAccessKey { key_name, key } => Credential::SharedAccessKey {
                    key_name: key_name.clone(),
                    key: Secret::new(format!("{}-other", key.expose())),
                },
                Credential::SharedAccessSignature(token) => Credential::SharedAccessSignature(
                    Secret::new(format!("{}-other", token.expose())),
                ),
            };
            assert_eq!(
                format!("{parsed:?}"),
                format!("{other:?}"),
                "{line:?}: Debug shows the secret"
            );
        }
    }
});
