//! Will the API server trust what we serve?

use std::sync::Arc;
use std::time::SystemTime;

use base64::Engine;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

use crate::tls;

/// Why a client that trusts a bundle would refuse the served certificate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrustError {
    #[error("the CA bundle is not PEM: {0}")]
    BundleNotPem(String),
    #[error("the CA bundle holds an unusable certificate: {0}")]
    BundleUnusable(String),
    #[error("the CA bundle is empty")]
    EmptyBundle,
    #[error("the served certificate is not PEM: {0}")]
    ServedNotPem(String),
    #[error("no certificate is served")]
    NothingServed,
    #[error("{name:?} is not a DNS name or IP address: {error}")]
    BadName { name: String, error: String },
    #[error("building a verifier: {0}")]
    Verifier(String),
    #[error("{0}")]
    Refused(String),
    #[error("the webhook configuration has no webhooks")]
    NoWebhooks,
    #[error("webhook {webhook} would not trust it: {error}")]
    Webhook {
        webhook: String,
        error: Box<TrustError>,
    },
}

/// Checks `served_cert` (PEM chain) the way a TLS client that trusts only `bundle` (PEM)
/// and connects to `server_name` would: chain, validity at `now`, name, serverAuth usage.
pub fn check_trusted(
    bundle: &str,
    served_cert: &str,
    server_name: &str,
    now: SystemTime,
) -> Result<(), TrustError> {
    let chain = CertificateDer::pem_slice_iter(served_cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TrustError::ServedNotPem(e.to_string()))?;
    check_trusted_chain(bundle, &chain, server_name, now)
}

/// [`check_trusted`] for a chain as a TLS handshake delivers it (DER, leaf first).
pub fn check_trusted_chain(
    bundle: &str,
    chain: &[CertificateDer<'_>],
    server_name: &str,
    now: SystemTime,
) -> Result<(), TrustError> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(bundle.as_bytes()) {
        let cert = cert.map_err(|e| TrustError::BundleNotPem(e.to_string()))?;
        roots
            .add(cert)
            .map_err(|e| TrustError::BundleUnusable(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(TrustError::EmptyBundle);
    }
    let (leaf, intermediates) = chain.split_first().ok_or(TrustError::NothingServed)?;
    let name = ServerName::try_from(server_name.to_owned()).map_err(|e| TrustError::BadName {
        name: server_name.to_owned(),
        error: e.to_string(),
    })?;
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), tls::provider())
        .build()
        .map_err(|e| TrustError::Verifier(e.to_string()))?;
    let since_epoch = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    verifier
        .verify_server_cert(
            leaf,
            intermediates,
            &name,
            &[],
            UnixTime::since_unix_epoch(since_epoch),
        )
        .map(drop)
        .map_err(|e| TrustError::Refused(e.to_string()))
}

/// The PEM `caBundle` of each webhook of `config` (empty when it has none).
pub fn ca_bundles(config: &MutatingWebhookConfiguration) -> Vec<(String, String)> {
    config
        .webhooks
        .iter()
        .flatten()
        .map(|w| {
            let pem = w
                .client_config
                .ca_bundle
                .as_ref()
                .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                .unwrap_or_default();
            (w.name.clone(), pem)
        })
        .collect()
}

/// Whether every webhook of `config` trusts `served_cert` for `server_name`.
pub fn trusted_by_every_webhook(
    config: &MutatingWebhookConfiguration,
    served_cert: &str,
    server_name: &str,
    now: SystemTime,
) -> Result<(), TrustError> {
    let bundles = ca_bundles(config);
    if bundles.is_empty() {
        return Err(TrustError::NoWebhooks);
    }
    for (webhook, bundle) in bundles {
        check_trusted(&bundle, served_cert, server_name, now).map_err(|e| TrustError::Webhook {
            webhook,
            error: Box::new(e),
        })?;
    }
    Ok(())
}

/// Base64 of a PEM bundle, as `caBundle` travels in JSON.
pub fn ca_bundle_json(pem: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(pem)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_certificate_is_trusted_only_by_a_bundle_with_its_ca_and_for_its_names() {
        let ca = tls::generate_ca("ca", Duration::from_secs(3600)).unwrap();
        let other = tls::generate_ca("other", Duration::from_secs(3600)).unwrap();
        let names = vec!["kips.ns.svc".to_owned(), "127.0.0.1".to_owned()];
        let pair = tls::issue_serving_cert(&ca, &names, Duration::from_secs(600)).unwrap();
        let now = SystemTime::now();
        check_trusted(&ca.cert, &pair.cert, "kips.ns.svc", now).unwrap();
        check_trusted(&ca.cert, &pair.cert, "127.0.0.1", now).unwrap();
        let both = format!("{}{}", other.cert, ca.cert);
        check_trusted(&both, &pair.cert, "kips.ns.svc", now).unwrap();
        let err = check_trusted(&other.cert, &pair.cert, "kips.ns.svc", now)
            .unwrap_err()
            .to_string();
        assert!(err.contains("UnknownIssuer"), "{err}");
        let err = check_trusted(&ca.cert, &pair.cert, "other.ns.svc", now)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not valid for name \"other.ns.svc\""), "{err}");
        let later = now + Duration::from_secs(7200);
        assert!(check_trusted(&ca.cert, &pair.cert, "kips.ns.svc", later).is_err());
        assert_eq!(
            check_trusted("", &pair.cert, "kips.ns.svc", now).unwrap_err(),
            TrustError::EmptyBundle
        );
    }
}
