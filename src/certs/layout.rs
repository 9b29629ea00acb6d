//! The data layout of the certificate Secret that all replicas share (pure: no I/O).
//!
//! | key             | content                                                         |
//! |-----------------|-----------------------------------------------------------------|
//! | `tls.crt`       | the serving certificate every replica serves                    |
//! | `tls.key`       | its private key                                                 |
//! | `ca.crt`        | the trust bundle: every CA the API server must trust right now  |
//! | `ca-signer.crt` | the CA that signs new serving certificates (also in `ca.crt`)   |
//! | `ca-signer.key` | its private key                                                 |
//!
//! `tls.crt`/`tls.key` make it a valid `kubernetes.io/tls` Secret, and `ca.crt` keeps the
//! usual meaning "what a client should trust": during a CA rotation it holds the old and
//! the new CA.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;

use super::bundle::{CertInfo, parse_pem_certs};
use crate::tls::{self, PemPair};

pub const SERVING_CERT: &str = "tls.crt";
pub const SERVING_KEY: &str = "tls.key";
pub const TRUST_BUNDLE: &str = "ca.crt";
pub const SIGNER_CERT: &str = "ca-signer.crt";
pub const SIGNER_KEY: &str = "ca-signer.key";
/// The Secret's `type`.
pub const SECRET_TYPE: &str = "kubernetes.io/tls";

/// The PEM contents of the certificate Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSecret {
    pub serving: PemPair,
    pub signer: PemPair,
    pub trust_bundle: String,
}

/// Why a Secret's data cannot be used as it is (kips then starts over with a new CA).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("the Secret has no data")]
    Empty,
    #[error("key {0} is missing")]
    Missing(&'static str),
    #[error("key {0} is not UTF-8 PEM text")]
    NotText(&'static str),
    #[error("key {key} is unreadable: {reason}")]
    Unreadable { key: &'static str, reason: String },
    #[error("{key} does not fit {cert}: {reason}")]
    KeyMismatch {
        cert: &'static str,
        key: &'static str,
        reason: String,
    },
    #[error("{0} is not a CA certificate")]
    NotCa(&'static str),
}

/// Who signed the serving certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IssuedBy {
    /// The current signing CA.
    Signer,
    /// Another CA of the trust bundle (the old one, while a CA rotation is under way).
    OtherTrusted,
    /// No CA of the bundle: the API server would reject it.
    Untrusted,
}

/// What the Secret's certificates say, parsed once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    pub serving: CertInfo,
    pub signer: CertInfo,
    pub bundle: Vec<CertInfo>,
    pub serving_issued_by: IssuedBy,
}

impl CertSecret {
    pub fn to_data(&self) -> BTreeMap<String, ByteString> {
        [
            (SERVING_CERT, &self.serving.cert),
            (SERVING_KEY, &self.serving.key),
            (TRUST_BUNDLE, &self.trust_bundle),
            (SIGNER_CERT, &self.signer.cert),
            (SIGNER_KEY, &self.signer.key),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), ByteString(v.as_bytes().to_vec())))
        .collect()
    }

    pub fn from_data(data: Option<&BTreeMap<String, ByteString>>) -> Result<Self, LayoutError> {
        let data = data.filter(|d| !d.is_empty()).ok_or(LayoutError::Empty)?;
        let text = |key: &'static str| -> Result<String, LayoutError> {
            let bytes = data.get(key).ok_or(LayoutError::Missing(key))?;
            String::from_utf8(bytes.0.clone()).map_err(|_| LayoutError::NotText(key))
        };
        Ok(Self {
            serving: PemPair {
                cert: text(SERVING_CERT)?,
                key: text(SERVING_KEY)?,
            },
            signer: PemPair {
                cert: text(SIGNER_CERT)?,
                key: text(SIGNER_KEY)?,
            },
            trust_bundle: text(TRUST_BUNDLE)?,
        })
    }

    /// Parses every certificate, checks that each key fits its certificate, and finds who
    /// signed the serving certificate.
    pub fn inspect(&self) -> Result<View, LayoutError> {
        let first = |key: &'static str, pem: &str| -> Result<CertInfo, LayoutError> {
            parse_pem_certs(pem)
                .map(|mut certs| certs.remove(0))
                .map_err(|e| LayoutError::Unreadable {
                    key,
                    reason: format!("{e:#}"),
                })
        };
        let fits = |pair: &PemPair, cert: &'static str, key: &'static str| {
            tls::certified_key(pair)
                .map(drop)
                .map_err(|e| LayoutError::KeyMismatch {
                    cert,
                    key,
                    reason: format!("{e:#}"),
                })
        };
        let serving = first(SERVING_CERT, &self.serving.cert)?;
        let signer = first(SIGNER_CERT, &self.signer.cert)?;
        let bundle = parse_pem_certs(&self.trust_bundle).map_err(|e| LayoutError::Unreadable {
            key: TRUST_BUNDLE,
            reason: format!("{e:#}"),
        })?;
        fits(&self.serving, SERVING_CERT, SERVING_KEY)?;
        if !signer.is_ca {
            return Err(LayoutError::NotCa(SIGNER_CERT));
        }
        rcgen::KeyPair::from_pem(&self.signer.key)
            .ok()
            .filter(|key| {
                rcgen::PublicKeyData::subject_public_key_info(key) == signer_public_key(&signer)
            })
            .ok_or_else(|| LayoutError::KeyMismatch {
                cert: SIGNER_CERT,
                key: SIGNER_KEY,
                reason: "the key's public half differs from the certificate's".to_owned(),
            })?;
        let serving_issued_by = if serving.signed_by(&signer) {
            IssuedBy::Signer
        } else if bundle.iter().any(|ca| serving.signed_by(ca)) {
            IssuedBy::OtherTrusted
        } else {
            IssuedBy::Untrusted
        };
        Ok(View {
            serving,
            signer,
            bundle,
            serving_issued_by,
        })
    }
}

fn signer_public_key(cert: &CertInfo) -> Vec<u8> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    X509Certificate::from_der(&cert.der)
        .map(|(_, c)| c.public_key().raw.to_vec())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn secret() -> CertSecret {
        let ca = tls::generate_ca("kips test CA", Duration::from_secs(3600)).unwrap();
        let serving =
            tls::issue_serving_cert(&ca, &["kips.ns.svc".into()], Duration::from_secs(600))
                .unwrap();
        CertSecret {
            serving,
            trust_bundle: ca.cert.clone(),
            signer: ca,
        }
    }

    #[test]
    fn the_data_uses_the_documented_keys_and_round_trips() {
        let secret = secret();
        let data = secret.to_data();
        assert_eq!(
            data.keys().map(String::as_str).collect::<Vec<_>>(),
            [
                "ca-signer.crt",
                "ca-signer.key",
                "ca.crt",
                "tls.crt",
                "tls.key"
            ]
        );
        assert_eq!(data["tls.crt"].0, secret.serving.cert.as_bytes());
        assert_eq!(data["ca.crt"].0, secret.signer.cert.as_bytes());
        assert_eq!(CertSecret::from_data(Some(&data)).unwrap(), secret);
        let view = secret.inspect().unwrap();
        assert_eq!(view.serving_issued_by, IssuedBy::Signer);
        assert_eq!(view.bundle, vec![view.signer.clone()]);
    }

    #[test]
    fn broken_data_is_named_precisely() {
        assert_eq!(CertSecret::from_data(None), Err(LayoutError::Empty));
        let mut data = secret().to_data();
        data.remove("ca-signer.key");
        assert_eq!(
            CertSecret::from_data(Some(&data)).unwrap_err().to_string(),
            "key ca-signer.key is missing"
        );
        data.insert("ca-signer.key".into(), ByteString(vec![0xff, 0xfe]));
        assert_eq!(
            CertSecret::from_data(Some(&data)),
            Err(LayoutError::NotText("ca-signer.key"))
        );
    }

    #[test]
    fn swapped_keys_and_foreign_issuers_are_detected() {
        let a = secret();
        let b = secret();
        let mut mixed = a.clone();
        mixed.serving.key = b.serving.key.clone();
        assert!(matches!(
            mixed.inspect(),
            Err(LayoutError::KeyMismatch {
                cert: "tls.crt",
                ..
            })
        ));
        let mut mixed = a.clone();
        mixed.signer.key = b.signer.key.clone();
        assert!(matches!(
            mixed.inspect(),
            Err(LayoutError::KeyMismatch {
                cert: "ca-signer.crt",
                ..
            })
        ));
        let mut foreign = a.clone();
        foreign.serving = b.serving.clone();
        assert_eq!(
            foreign.inspect().unwrap().serving_issued_by,
            IssuedBy::Untrusted
        );
        // The old CA still in the bundle, a new signer: a rotation under way.
        let mut rotating = a.clone();
        rotating.signer = b.signer.clone();
        rotating.trust_bundle = format!("{}{}", a.signer.cert, b.signer.cert);
        assert_eq!(
            rotating.inspect().unwrap().serving_issued_by,
            IssuedBy::OtherTrusted
        );
        let mut not_ca = a.clone();
        not_ca.signer = a.serving.clone();
        assert_eq!(not_ca.inspect(), Err(LayoutError::NotCa("ca-signer.crt")));
    }
}
