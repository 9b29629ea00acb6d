//! Serving certificates: generation with rcgen, a resolver that swaps pairs without a restart,
//! and a watcher that reloads certificate files when they change.
//!
//! The resolver is consulted on every handshake, so a new pair applies to new connections at
//! once while connections already open finish on the pair they started with.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use arc_swap::ArcSwap;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// Told about the pairs a [`CertStore`] serves (the webhook's metrics).
pub trait CertObserver: Send + Sync {
    /// A pair is served from now on; `not_after` is its expiry when readable.
    fn serving(&self, not_after: Option<SystemTime>);
    /// A new pair replaced the one served before.
    fn reloaded(&self);
    /// A new pair was refused; the previous one keeps serving.
    fn rejected(&self);
}

/// A PEM certificate (chain) and its PEM private key.
#[derive(Clone, PartialEq, Eq)]
pub struct PemPair {
    pub cert: String,
    pub key: String,
}

impl std::fmt::Debug for PemPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PemPair")
            .field("cert", &self.cert)
            .field("key", &"<redacted>")
            .finish()
    }
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A new certificate authority, valid from now for `validity`.
pub fn generate_ca(common_name: &str, validity: Duration) -> Result<PemPair> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, validity);
    let cert = params.self_signed(&key)?;
    Ok(PemPair {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// A serving certificate for `names` (DNS names or IP addresses), signed by `ca`.
pub fn issue_serving_cert(ca: &PemPair, names: &[String], validity: Duration) -> Result<PemPair> {
    let ca_key = KeyPair::from_pem(&ca.key).context("reading the CA key")?;
    let issuer =
        Issuer::from_ca_cert_pem(&ca.cert, ca_key).context("reading the CA certificate")?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(names.to_vec()).context("certificate names")?;
    params.distinguished_name.push(
        DnType::CommonName,
        names.first().map_or("kips", String::as_str),
    );
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, validity);
    let cert = params.signed_by(&key, &issuer)?;
    Ok(PemPair {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

fn set_validity(params: &mut CertificateParams, validity: Duration) {
    // Backdated a little so that a node whose clock is slightly behind accepts it.
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + validity;
}

/// The names a locally running webhook answers to, plus any configured ones.
pub fn local_names(extra: &[String]) -> Vec<String> {
    let mut names: Vec<String> = ["localhost", "127.0.0.1", "::1"]
        .map(str::to_owned)
        .to_vec();
    for name in extra {
        if !names.contains(name) {
            names.push(name.clone());
        }
    }
    names
}

/// The DNS names a Service's certificate needs: `<svc>.<ns>.svc` is what the API server checks.
pub fn service_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
        format!("{service}.{namespace}"),
        service.to_owned(),
    ]
}

/// Parses a PEM pair into what rustls serves, checking that the key belongs to the certificate.
pub fn certified_key(pair: &PemPair) -> Result<Arc<CertifiedKey>> {
    let chain = CertificateDer::pem_slice_iter(pair.cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("reading the certificate PEM")?;
    if chain.is_empty() {
        bail!("the certificate file holds no certificate");
    }
    let key = PrivateKeyDer::from_pem_slice(pair.key.as_bytes())
        .context("reading the private key PEM")?;
    let certified = CertifiedKey::from_der(chain, key, &provider())
        .map_err(|e| anyhow!("the key does not fit the certificate: {e}"))?;
    Ok(Arc::new(certified))
}

/// The end of a PEM certificate's validity.
pub fn not_after(cert_pem: &str) -> Result<SystemTime> {
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .context("reading the certificate PEM")?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| anyhow!("parsing the certificate: {e}"))?;
    let seconds = cert.validity().not_after.timestamp();
    Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(seconds).unwrap_or(0)))
}

/// The pair being served, swapped atomically on reload.
pub struct CertStore {
    current: ArcSwap<CertifiedKey>,
    pem: ArcSwap<PemPair>,
    observer: Arc<dyn CertObserver>,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore").finish_non_exhaustive()
    }
}

impl CertStore {
    pub fn new(pair: PemPair, observer: Arc<dyn CertObserver>) -> Result<Arc<Self>> {
        let key = certified_key(&pair)?;
        observer.serving(not_after(&pair.cert).ok());
        Ok(Arc::new(Self {
            current: ArcSwap::new(key),
            pem: ArcSwap::from_pointee(pair),
            observer,
        }))
    }

    /// Serves `pair` from the next handshake on, unless it is unusable (then the old pair
    /// stays). Returns whether it changed anything.
    pub fn replace(&self, pair: PemPair) -> Result<bool> {
        if **self.pem.load() == pair {
            return Ok(false);
        }
        match certified_key(&pair) {
            Ok(key) => {
                self.current.store(key);
                self.observer.serving(not_after(&pair.cert).ok());
                self.observer.reloaded();
                self.pem.store(Arc::new(pair));
                Ok(true)
            }
            Err(error) => {
                self.observer.rejected();
                Err(error)
            }
        }
    }

    pub fn pem(&self) -> Arc<PemPair> {
        self.pem.load_full()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// TLS 1.2 and 1.3, ALPN h2 and http/1.1, certificates from `store`.
pub fn server_config(store: Arc<CertStore>) -> Result<Arc<ServerConfig>> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(store);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Writes `contents` so that readers see the old file or the new one, never half of one.
pub fn write_atomically(path: &Path, contents: &str) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("kips")
    ));
    std::fs::write(&tmp, contents).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Certificate files to serve and watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CertFiles {
    pub fn read(&self) -> Result<PemPair> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
        };
        Ok(PemPair {
            cert: read(&self.cert)?,
            key: read(&self.key)?,
        })
    }

    /// Reloads the pair whenever the files change, until the store is dropped elsewhere.
    ///
    /// Watches the files' directories (a Secret volume swaps a `..data` symlink, which sends
    /// no event for the files themselves) and also polls every `poll` as a backstop. A pair
    /// that does not parse, or whose key does not fit (a half-written update), is skipped and
    /// the last good pair keeps serving.
    pub fn watch(
        self,
        store: Arc<CertStore>,
        poll: Duration,
    ) -> Result<tokio::task::JoinHandle<()>> {
        use notify::Watcher;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        let mut watcher = notify::recommended_watcher(move |_event| {
            let _ = tx.try_send(());
        })?;
        let mut dirs: Vec<PathBuf> = [&self.cert, &self.key]
            .iter()
            .map(|p| {
                p.parent()
                    .filter(|d| !d.as_os_str().is_empty())
                    .unwrap_or(Path::new("."))
                    .to_path_buf()
            })
            .collect();
        dirs.dedup();
        for dir in &dirs {
            watcher
                .watch(dir, notify::RecursiveMode::NonRecursive)
                .with_context(|| format!("watching {}", dir.display()))?;
        }
        Ok(tokio::spawn(async move {
            let _watcher = watcher;
            let mut ticker = tokio::time::interval(poll);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    event = rx.recv() => if event.is_none() { return },
                }
                // Let a burst of writes (certificate, then key) settle before reading.
                tokio::time::sleep(Duration::from_millis(50)).await;
                match self.read().and_then(|pair| store.replace(pair)) {
                    Ok(true) => {
                        tracing::info!(cert = %self.cert.display(), "serving certificate reloaded")
                    }
                    Ok(false) => {}
                    Err(error) => {
                        tracing::warn!(cert = %self.cert.display(), error = format!("{error:#}"), "certificate files not usable yet; still serving the previous pair")
                    }
                }
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_fit_their_keys_and_carry_the_names() {
        let ca = generate_ca("kips test CA", Duration::from_secs(3600)).unwrap();
        let names = local_names(&service_names("kips", "kips-system"));
        let pair = issue_serving_cert(&ca, &names, Duration::from_secs(600)).unwrap();
        certified_key(&pair).unwrap();
        let der = CertificateDer::from_pem_slice(pair.cert.as_bytes()).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let names = &cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names;
        use x509_parser::extensions::GeneralName;
        assert!(
            names
                .iter()
                .any(|n| matches!(n, GeneralName::DNSName("kips.kips-system.svc"))),
            "{names:?}"
        );
        assert!(
            names
                .iter()
                .any(|n| matches!(n, GeneralName::IPAddress([127, 0, 0, 1]))),
            "{names:?}"
        );
        let expiry = not_after(&pair.cert).unwrap();
        assert!(expiry > SystemTime::now() + Duration::from_secs(500));
    }

    #[test]
    fn a_mismatched_pair_is_rejected_and_the_old_one_kept() {
        let ca = generate_ca("ca", Duration::from_secs(3600)).unwrap();
        let first =
            issue_serving_cert(&ca, &["localhost".into()], Duration::from_secs(600)).unwrap();
        let second =
            issue_serving_cert(&ca, &["localhost".into()], Duration::from_secs(600)).unwrap();
        struct Quiet;
        impl CertObserver for Quiet {
            fn serving(&self, _: Option<SystemTime>) {}
            fn reloaded(&self) {}
            fn rejected(&self) {}
        }
        let store = CertStore::new(first.clone(), Arc::new(Quiet)).unwrap();
        let mixed = PemPair {
            cert: second.cert.clone(),
            key: first.key.clone(),
        };
        assert!(store.replace(mixed).is_err());
        assert_eq!(*store.pem(), first);
        assert!(store.replace(second.clone()).unwrap());
        assert!(!store.replace(second).unwrap());
    }
}
