//! Shared access signature tokens, made by the bridge and checked by the test relay.
//!
//! `SharedAccessSignature sr={enc(uri)}&sig={enc(base64(HMAC-SHA256(key, enc(uri) + "\n" + se)))}&se={se}&skn={enc(keyName)}`
//! where `enc` is URL encoding and the key is the UTF-8 bytes of the key string. The signed
//! text is the `sr` value exactly as it appears in the token, so a checker verifies what the
//! signer signed whatever URL encoder the signer used (.NET's `WebUtility.UrlEncode` and
//! Node's `encodeURIComponent` differ).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use ring::hmac;

use super::connection_string::{Credential, Endpoint, Secret};

/// What .NET's `WebUtility.UrlEncode` leaves as is.
const URL_ENCODE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'!')
    .remove(b'*')
    .remove(b'(')
    .remove(b')');

const PREFIX: &str = "SharedAccessSignature";

pub fn url_encode(text: &str) -> String {
    utf8_percent_encode(text, URL_ENCODE).to_string()
}

/// The audience (`sr`) of a token for hybrid connection `entity`: `http://{host}/{entity}/`.
/// This is Microsoft.Azure.Relay's form (`TokenProvider.NormalizeAudience`: scheme `http`, no
/// port, a trailing slash), and the one place kips computes it: the bridge signs it and the
/// test relay expects it.
pub fn resource_uri(endpoint: &Endpoint, entity: &str) -> String {
    let host = if endpoint.host.contains(':') {
        format!("[{}]", endpoint.host)
    } else {
        endpoint.host.clone()
    };
    format!("http://{host}/{entity}/")
}

/// Signs a token for `resource` valid until `expiry` (Unix seconds).
pub fn sign(resource: &str, key_name: &str, key: &Secret, expiry: u64) -> String {
    let encoded_resource = url_encode(resource);
    let signature = signature(key, &encoded_resource, &expiry.to_string());
    format!(
        "{PREFIX} sr={encoded_resource}&sig={}&se={expiry}&skn={}",
        url_encode(&BASE64.encode(signature.as_ref())),
        url_encode(key_name)
    )
}

fn signature(key: &Secret, encoded_resource: &str, expiry: &str) -> hmac::Tag {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key.expose().as_bytes());
    hmac::sign(&key, format!("{encoded_resource}\n{expiry}").as_bytes())
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token does not start with \"SharedAccessSignature \"")]
    NotSharedAccessSignature,
    #[error("the token has no {0} field")]
    MissingField(&'static str),
    #[error("the token's {0} field is malformed")]
    Malformed(&'static str),
}

/// A token's fields, as found in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedToken {
    /// `sr` exactly as written (still URL-encoded): the signed text.
    pub encoded_resource: String,
    pub signature: Vec<u8>,
    /// `se` exactly as written: the signed text.
    pub expiry_text: String,
    pub expiry: u64,
    pub key_name: String,
}

impl ParsedToken {
    pub fn parse(token: &str) -> Result<ParsedToken, TokenError> {
        let fields = match token.trim().split_once(' ') {
            Some((prefix, fields)) if prefix.eq_ignore_ascii_case(PREFIX) => fields.trim(),
            _ => return Err(TokenError::NotSharedAccessSignature),
        };
        let (mut sr, mut sig, mut se, mut skn) = (None, None, None, None);
        for field in fields.split('&') {
            let Some((name, value)) = field.split_once('=') else {
                continue;
            };
            match name.to_ascii_lowercase().as_str() {
                "sr" => sr = Some(value),
                "sig" => sig = Some(value),
                "se" => se = Some(value),
                "skn" => skn = Some(value),
                _ => {}
            }
        }
        let sr = sr.ok_or(TokenError::MissingField("sr"))?;
        let sig = sig.ok_or(TokenError::MissingField("sig"))?;
        let se = se.ok_or(TokenError::MissingField("se"))?;
        let skn = skn.ok_or(TokenError::MissingField("skn"))?;
        let signature = BASE64
            .decode(url_decode(sig).ok_or(TokenError::Malformed("sig"))?)
            .map_err(|_| TokenError::Malformed("sig"))?;
        let expiry = se.parse::<u64>().map_err(|_| TokenError::Malformed("se"))?;
        Ok(ParsedToken {
            encoded_resource: sr.to_owned(),
            signature,
            expiry_text: se.to_owned(),
            expiry,
            key_name: url_decode(skn).ok_or(TokenError::Malformed("skn"))?,
        })
    }

    /// Whether `key` made this token's signature (constant time).
    pub fn signed_with(&self, key: &Secret) -> bool {
        let key = hmac::Key::new(hmac::HMAC_SHA256, key.expose().as_bytes());
        let text = format!("{}\n{}", self.encoded_resource, self.expiry_text);
        hmac::verify(&key, text.as_bytes(), &self.signature).is_ok()
    }

    pub fn audience(&self) -> Option<Audience> {
        Audience::parse(&url_decode(&self.encoded_resource)?)
    }
}

/// URL decoding as .NET's `WebUtility.UrlDecode` does it (`+` is a space).
fn url_decode(text: &str) -> Option<String> {
    percent_decode_str(&text.replace('+', " "))
        .decode_utf8()
        .ok()
        .map(|s| s.into_owned())
}

/// A token audience normalised for comparison: scheme and port ignored, host and path
/// compared case-insensitively, path by segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Audience {
    host: String,
    segments: Vec<String>,
}

impl Audience {
    pub fn parse(uri: &str) -> Option<Audience> {
        let (_scheme, rest) = uri.split_once("://")?;
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let path = path.split(['?', '#']).next().unwrap_or("");
        let host = if let Some(inner) = authority.strip_prefix('[') {
            inner.split_once(']')?.0
        } else {
            authority.split(':').next()?
        };
        if host.is_empty() {
            return None;
        }
        Some(Audience {
            host: host.to_ascii_lowercase(),
            segments: path
                .split('/')
                .filter(|s| !s.is_empty())
                .map(str::to_ascii_lowercase)
                .collect(),
        })
    }

    /// A token for `self` grants access to `resource` when it is the same namespace and
    /// `self`'s path is a prefix of `resource`'s (a namespace-wide token covers every entity).
    pub fn covers(&self, resource: &Audience) -> bool {
        self.host == resource.host && resource.segments.starts_with(&self.segments)
    }
}

/// A token to present, and when it stops being valid.
#[derive(Debug, Clone)]
pub struct Token {
    pub text: Secret,
    /// `None`: unknown (a pre-made token kips cannot read).
    pub expires: Option<SystemTime>,
}

/// Makes tokens from the connection string's credential.
#[derive(Debug, Clone)]
pub struct TokenSource {
    endpoint: Endpoint,
    credential: Credential,
    lifetime: Duration,
}

impl TokenSource {
    pub fn new(endpoint: Endpoint, credential: Credential, lifetime: Duration) -> Self {
        TokenSource {
            endpoint,
            credential,
            lifetime,
        }
    }

    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// Whether tokens can be renewed (a shared access key) or are fixed (a signature).
    pub fn renewable(&self) -> bool {
        matches!(self.credential, Credential::SharedAccessKey { .. })
    }

    pub fn token(&self, entity: &str) -> Token {
        match &self.credential {
            Credential::SharedAccessKey { key_name, key } => {
                let expiry = unix_now() + self.lifetime.as_secs().max(1);
                Token {
                    text: Secret::new(sign(
                        &resource_uri(&self.endpoint, entity),
                        key_name,
                        key,
                        expiry,
                    )),
                    expires: Some(UNIX_EPOCH + Duration::from_secs(expiry)),
                }
            }
            Credential::SharedAccessSignature(signature) => Token {
                expires: ParsedToken::parse(signature.expose())
                    .ok()
                    .map(|t| UNIX_EPOCH + Duration::from_secs(t.expiry)),
                text: signature.clone(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(host: &str, port: Option<u16>) -> Endpoint {
        Endpoint {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn the_audience_is_the_dotnet_form_without_the_port() {
        assert_eq!(
            resource_uri(&endpoint("127.0.0.1", Some(9443)), "api"),
            "http://127.0.0.1/api/"
        );
        assert_eq!(
            resource_uri(&endpoint("ns.servicebus.windows.net", None), "a/b"),
            "http://ns.servicebus.windows.net/a/b/"
        );
        assert_eq!(
            resource_uri(&endpoint("::1", Some(1)), "x"),
            "http://[::1]/x/"
        );
    }

    #[test]
    fn a_token_matches_a_reference_signature() {
        // HMAC-SHA256("key", "http%3A%2F%2Fns%2Fhc%2F\n1700000000"), computed independently
        // with: printf 'http%%3A%%2F%%2Fns%%2Fhc%%2F\n1700000000' | openssl dgst -sha256 -hmac key -binary | base64
        let token = sign(
            "http://ns/hc/",
            "Root Key",
            &Secret::new("key"),
            1_700_000_000,
        );
        assert_eq!(
            token,
            "SharedAccessSignature sr=http%3A%2F%2Fns%2Fhc%2F&sig=Y4tQ0iV923SK05mZH6GhWZpfQVGZdIP5nGwXRtwujFE%3D&se=1700000000&skn=Root%20Key"
        );
    }

    #[test]
    fn tokens_verify_with_their_key_only_and_carry_their_audience() {
        let key = Secret::new("c2VjcmV0");
        let token = sign("http://ns/hc/", "root", &key, 42);
        let parsed = ParsedToken::parse(&token).unwrap();
        assert!(parsed.signed_with(&key));
        assert!(!parsed.signed_with(&Secret::new("c2VjcmV0\n")));
        assert_eq!(parsed.key_name, "root");
        assert_eq!(parsed.expiry, 42);
        let audience = parsed.audience().unwrap();
        assert!(audience.covers(&Audience::parse("http://NS:443/HC/").unwrap()));
        assert!(!audience.covers(&Audience::parse("http://ns/other/").unwrap()));
        let namespace = Audience::parse("sb://ns/").unwrap();
        assert!(namespace.covers(&audience));
        assert!(!audience.covers(&namespace));
    }

    #[test]
    fn tokens_signed_by_other_encoders_verify() {
        // hyco-ws (Node's encodeURIComponent, lower-level fields unencoded, port kept): the
        // signed text is the sr as written, so it verifies, and its audience covers the entity.
        let key = Secret::new("k3y");
        let sr = "http%3A%2F%2F127.0.0.1%3A4443%2Fapi";
        let tag = signature(&key, sr, "99");
        let token = format!(
            "SharedAccessSignature sr={sr}&sig={}&se=99&skn=send",
            url_encode(&BASE64.encode(tag.as_ref()))
        );
        let parsed = ParsedToken::parse(&token).unwrap();
        assert!(parsed.signed_with(&key));
        assert!(
            parsed.audience().unwrap().covers(
                &Audience::parse(&resource_uri(&endpoint("127.0.0.1", None), "api")).unwrap()
            )
        );
    }

    #[test]
    fn malformed_tokens_are_told_apart() {
        assert_eq!(
            ParsedToken::parse("Bearer x"),
            Err(TokenError::NotSharedAccessSignature)
        );
        assert_eq!(
            ParsedToken::parse("SharedAccessSignature sig=a&se=1&skn=k"),
            Err(TokenError::MissingField("sr"))
        );
        assert_eq!(
            ParsedToken::parse("SharedAccessSignature sr=a&sig=YQ%3D%3D&se=soon&skn=k"),
            Err(TokenError::Malformed("se"))
        );
    }

    #[test]
    fn a_key_source_signs_fresh_tokens_for_the_entity() {
        let source = TokenSource::new(
            endpoint("localhost", Some(9443)),
            Credential::SharedAccessKey {
                key_name: "root".into(),
                key: Secret::new("k"),
            },
            Duration::from_secs(3600),
        );
        let token = source.token("api");
        let parsed = ParsedToken::parse(token.text.expose()).unwrap();
        assert_eq!(parsed.encoded_resource, "http%3A%2F%2Flocalhost%2Fapi%2F");
        assert!(parsed.expiry >= unix_now() + 3590);
        assert!(source.renewable());
    }
}
