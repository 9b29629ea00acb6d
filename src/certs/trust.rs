//! Will the API server trust what we serve? And the readiness gate built on the answer.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

use crate::tls;

/// Checks `served_cert` (PEM chain) the way a TLS client that trusts only `bundle` (PEM)
/// and connects to `server_name` would: chain, validity at `now`, name, serverAuth usage.
pub fn check_trusted(
    bundle: &str,
    served_cert: &str,
    server_name: &str,
    now: SystemTime,
) -> Result<(), String> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(bundle.as_bytes()) {
        let cert = cert.map_err(|e| format!("the CA bundle is not PEM: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("the CA bundle holds an unusable certificate: {e}"))?;
    }
    if roots.is_empty() {
        return Err("the CA bundle is empty".to_owned());
    }
    let chain = CertificateDer::pem_slice_iter(served_cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the served certificate is not PEM: {e}"))?;
    let (leaf, intermediates) = chain.split_first().ok_or("no certificate is served")?;
    let name = ServerName::try_from(server_name.to_owned())
        .map_err(|e| format!("{server_name:?} is not a DNS name or IP address: {e}"))?;
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), tls::provider())
        .build()
        .map_err(|e| format!("building a verifier: {e}"))?;
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
        .map_err(|e| format!("{e}"))
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
) -> Result<(), String> {
    let bundles = ca_bundles(config);
    if bundles.is_empty() {
        return Err("the webhook configuration has no webhooks".to_owned());
    }
    for (webhook, bundle) in bundles {
        check_trusted(&bundle, served_cert, server_name, now)
            .map_err(|e| format!("webhook {webhook} would not trust it: {e}"))?;
    }
    Ok(())
}

/// Base64 of a PEM bundle, as `caBundle` travels in JSON.
pub fn ca_bundle_json(pem: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(pem)
}

/// The `/readyz` answer: ready only while the served certificate is trusted, and never again
/// once shutdown began (a late certificate check must not undo the drain).
#[derive(Clone)]
pub struct Readiness {
    ready: Arc<AtomicBool>,
    gate: Arc<Mutex<Gate>>,
}

#[derive(Default)]
struct Gate {
    trusted: bool,
    stopping: bool,
}

impl Readiness {
    /// Drives `ready` (the flag `/readyz` reads), which starts false.
    pub fn new(ready: Arc<AtomicBool>) -> Self {
        ready.store(false, Ordering::Release);
        Self {
            ready,
            gate: Arc::default(),
        }
    }

    /// Records whether the served certificate is trusted; returns whether that changed.
    pub fn set_trusted(&self, trusted: bool) -> bool {
        let mut gate = self.gate.lock().unwrap_or_else(|p| p.into_inner());
        let changed = gate.trusted != trusted;
        gate.trusted = trusted;
        if !gate.stopping {
            self.ready.store(trusted, Ordering::Release);
        }
        changed
    }

    pub fn trusted(&self) -> bool {
        self.gate.lock().unwrap_or_else(|p| p.into_inner()).trusted
    }

    /// Not ready from now on, whatever certificate checks say.
    pub fn stop(&self) {
        let mut gate = self.gate.lock().unwrap_or_else(|p| p.into_inner());
        gate.stopping = true;
        self.ready.store(false, Ordering::Release);
    }

    /// Resolves on SIGTERM or Ctrl-C: reports not ready at once, then waits `delay` so that
    /// endpoints drop this pod before the server stops accepting connections.
    pub async fn shutdown_signal(self, delay: Duration) {
        crate::server::termination_signal().await;
        self.stop();
        if !delay.is_zero() {
            tracing::info!(delay = ?delay, "shutting down: not ready, waiting before draining");
            tokio::time::sleep(delay).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let err = check_trusted(&other.cert, &pair.cert, "kips.ns.svc", now).unwrap_err();
        assert!(err.contains("UnknownIssuer"), "{err}");
        let err = check_trusted(&ca.cert, &pair.cert, "other.ns.svc", now).unwrap_err();
        assert!(err.contains("not valid for name \"other.ns.svc\""), "{err}");
        let later = now + Duration::from_secs(7200);
        assert!(check_trusted(&ca.cert, &pair.cert, "kips.ns.svc", later).is_err());
        assert_eq!(
            check_trusted("", &pair.cert, "kips.ns.svc", now).unwrap_err(),
            "the CA bundle is empty"
        );
    }

    #[test]
    fn readiness_follows_trust_until_shutdown() {
        let flag = Arc::new(AtomicBool::new(true));
        let readiness = Readiness::new(flag.clone());
        assert!(
            !flag.load(Ordering::Acquire),
            "not ready before the first check"
        );
        assert!(readiness.set_trusted(true));
        assert!(flag.load(Ordering::Acquire));
        assert!(!readiness.set_trusted(true));
        readiness.stop();
        assert!(!flag.load(Ordering::Acquire));
        readiness.set_trusted(true);
        assert!(
            !flag.load(Ordering::Acquire),
            "a check after shutdown began"
        );
    }
}
