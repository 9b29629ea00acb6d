//! Token checks, per hybrid connection and key. The signed text and the audience are
//! computed with the bridge's own functions (`crate::bridge::sas`), so what the bridge signs
//! and what the relay expects cannot drift apart.

use crate::bridge::connection_string::Endpoint;
use crate::bridge::sas::{self, Audience, ParsedToken};

use super::{KeySpec, Rights};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Right {
    Listen,
    Send,
}

/// A refusal: HTTP status and the description the service would give.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Denied {
    pub status: u16,
    pub description: String,
}

fn unauthorized(description: &str) -> Denied {
    Denied {
        status: 401,
        description: description.to_owned(),
    }
}

/// Checks `token` for `right` on `entity` at `host` (the namespace name the client used),
/// against keys scoped to the entity first, then namespace-wide keys. Returns the token's
/// expiry.
pub(crate) fn check(
    keys: &[KeySpec],
    host: &str,
    entity: &str,
    right: Right,
    token: Option<&str>,
    now: u64,
) -> Result<u64, Denied> {
    let token = token
        .ok_or_else(|| unauthorized("MissingToken: The authorization header was not provided."))?;
    let parsed = ParsedToken::parse(token)
        .map_err(|error| unauthorized(&format!("MalformedToken: {error}.")))?;
    let key = keys
        .iter()
        .filter(|k| k.name == parsed.key_name)
        .find(|k| {
            k.hybrid_connection
                .as_deref()
                .is_none_or(|scope| scope.eq_ignore_ascii_case(entity))
        })
        .ok_or_else(|| unauthorized("InvalidSignature: The token has an invalid signature."))?;
    if !parsed.signed_with(&key.key) {
        return Err(unauthorized(
            "InvalidSignature: The token has an invalid signature.",
        ));
    }
    if parsed.expiry <= now {
        return Err(unauthorized("ExpiredToken: The token is expired."));
    }
    let endpoint = Endpoint {
        host: host.to_ascii_lowercase(),
        port: None,
    };
    let resource = Audience::parse(&sas::resource_uri(&endpoint, entity)).expect("a valid URI");
    if !parsed.audience().is_some_and(|a| a.covers(&resource)) {
        return Err(unauthorized(
            "InvalidAudience: The token's audience (sr) does not cover this hybrid connection.",
        ));
    }
    let Rights { listen, send } = key.rights;
    let granted = match right {
        Right::Listen => listen,
        Right::Send => send,
    };
    if !granted {
        return Err(Denied {
            status: 403,
            description: format!(
                "Unauthorized access. '{}' claim(s) are required to perform this operation.",
                match right {
                    Right::Listen => "Listen",
                    Right::Send => "Send",
                }
            ),
        });
    }
    Ok(parsed.expiry)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bridge::Secret;

    fn keys() -> Vec<KeySpec> {
        vec![
            "root=cm9vdA==".parse().unwrap(),
            "api/sender=c2VuZA==:send".parse().unwrap(),
        ]
    }

    fn token(key_name: &str, key: &str, resource: &str, expiry: u64) -> String {
        sas::sign(resource, key_name, &Secret::new(key), expiry)
    }

    #[test]
    fn good_tokens_pass_and_bad_ones_are_told_apart() {
        let keys = keys();
        let ok = token("root", "cm9vdA==", "http://localhost/api/", 100);
        assert_eq!(
            check(&keys, "localhost", "api", Right::Listen, Some(&ok), 50),
            Ok(100)
        );
        let namespace = token("root", "cm9vdA==", "http://localhost/", 100);
        assert_eq!(
            check(
                &keys,
                "LocalHost",
                "other",
                Right::Send,
                Some(&namespace),
                50
            ),
            Ok(100)
        );

        let status = |token: Option<&str>, entity: &str, right| {
            check(&keys, "localhost", entity, right, token, 50).map_err(|d| {
                (
                    d.status,
                    d.description.split(':').next().unwrap().to_owned(),
                )
            })
        };
        assert_eq!(
            status(None, "api", Right::Send),
            Err((401, "MissingToken".into()))
        );
        assert_eq!(
            status(Some("Bearer x"), "api", Right::Send),
            Err((401, "MalformedToken".into()))
        );
        let wrong_key = token("root", "d3Jvbmc=", "http://localhost/api/", 100);
        assert_eq!(
            status(Some(&wrong_key), "api", Right::Send),
            Err((401, "InvalidSignature".into()))
        );
        let expired = token("root", "cm9vdA==", "http://localhost/api/", 10);
        assert_eq!(
            status(Some(&expired), "api", Right::Send),
            Err((401, "ExpiredToken".into()))
        );
        assert_eq!(
            status(Some(&ok), "db", Right::Send),
            Err((401, "InvalidAudience".into()))
        );
        let sender = token("sender", "c2VuZA==", "http://localhost/api/", 100);
        assert_eq!(status(Some(&sender), "api", Right::Send), Ok(100));
        assert_eq!(
            status(Some(&sender), "api", Right::Listen).unwrap_err().0,
            403
        );
        // An entity's key is unknown on another entity.
        let elsewhere = token("sender", "c2VuZA==", "http://localhost/db/", 100);
        assert_eq!(
            status(Some(&elsewhere), "db", Right::Send),
            Err((401, "InvalidSignature".into()))
        );
    }
}
