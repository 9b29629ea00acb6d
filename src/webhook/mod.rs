//! `kips webhook`: certificates, state and server put together.
//!
//! - [`review`]: AdmissionReview wire types, the one place errors become responses;
//! - [`server`]: the HTTPS stack (axum over rustls), limits, timeouts, drain;
//! - [`lifecycle`]: readiness, the termination signal, the delay before draining;
//! - [`hooks`]: what only the API server can tell (warnings) and Events;
//! - [`metrics`]: Prometheus text on `/metrics`.

pub(crate) mod hooks;
pub(crate) mod lifecycle;
pub(crate) mod metrics;
pub mod review;
pub(crate) mod server;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::certs::{self, SelfManagedConfig, TrustGate};
use crate::inject::InjectConfig;
use crate::tls::{self, CertFiles, CertStore};
pub use hooks::{HooksConfig, HooksMode};
pub use lifecycle::Readiness;
pub use metrics::Metrics;
pub use server::{AppState, MAX_BODY_BYTES, Server, ServerSettings, router};

/// Lifetime of the embedded default's certificates: they live as long as the process.
const EMBEDDED_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

/// Everything `kips webhook` runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookConfig {
    pub listen: SocketAddr,
    pub certificates: CertificateSource,
    pub server: ServerSettings,
    /// On SIGTERM, report not ready for this long before draining.
    pub shutdown_delay: Duration,
    pub inject: InjectConfig,
    pub hooks: HooksConfig,
}

/// Where the serving certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertificateSource {
    /// A CA and serving certificate generated at start, the CA written to `certs_dir`.
    Embedded {
        certs_dir: PathBuf,
        /// Names besides localhost, 127.0.0.1 and ::1.
        names: Vec<String>,
    },
    /// PEM files, reloaded when they change and polled every `poll_interval`.
    Files {
        files: CertFiles,
        poll_interval: Duration,
    },
    /// A CA and pair in a Secret shared by all replicas (`--cert-mode self`).
    SelfManaged(SelfManagedConfig),
}

impl TrustGate for Readiness {
    fn set_trusted(&self, trusted: bool) -> bool {
        Readiness::set_trusted(self, trusted)
    }

    fn trusted(&self) -> bool {
        Readiness::trusted(self)
    }
}

pub async fn run(config: WebhookConfig) -> Result<()> {
    let started = Instant::now();
    let metrics = Arc::new(Metrics::new());
    let readiness = Readiness::new();

    let store = match &config.certificates {
        CertificateSource::Files {
            files,
            poll_interval,
        } => {
            let store = CertStore::new(files.read()?, metrics.clone()).with_context(|| {
                format!(
                    "loading {} and {}",
                    files.cert.display(),
                    files.key.display()
                )
            })?;
            files.clone().watch(store.clone(), *poll_interval)?;
            tracing::info!(cert = %files.cert.display(), "serving the given certificate; reloading it when it changes");
            readiness.set_trusted(true);
            store
        }
        CertificateSource::SelfManaged(settings) => {
            // Serves a placeholder (and stays unready) until the Secret has been read.
            let manager = certs::self_managed(settings).await?;
            let placeholder = certs::placeholder_pair(&manager.names)?;
            let store = CertStore::new(placeholder, metrics.clone())?;
            drop(manager.spawn(store.clone(), readiness.clone()));
            store
        }
        CertificateSource::Embedded { certs_dir, names } => {
            let store = CertStore::new(embedded_pair(certs_dir, names)?, metrics.clone())?;
            readiness.set_trusted(true);
            store
        }
    };

    let hooks = hooks::hooks(&config.hooks).await?;
    let state = AppState::new(config.inject, metrics, readiness.clone(), hooks);
    let server = Server::bind(config.listen)?;
    let addr = server.local_addr()?;
    tracing::info!(%addr, startup_ms = started.elapsed().as_millis() as u64, "kips webhook serving HTTPS");

    let shutdown = lifecycle::shutdown(readiness, config.shutdown_delay);
    server
        .serve(state, tls::server_config(store)?, config.server, shutdown)
        .await
}

/// The embedded default: a fresh CA and serving certificate, the CA written for clients.
fn embedded_pair(certs_dir: &std::path::Path, names: &[String]) -> Result<tls::PemPair> {
    let ca = tls::generate_ca("kips embedded CA", EMBEDDED_VALIDITY)?;
    let pair = tls::issue_serving_cert(&ca, &tls::local_names(names), EMBEDDED_VALIDITY)?;
    let ca_path = certs_dir.join("ca.crt");
    tls::write_atomically(&ca_path, &ca.cert)?;
    tracing::info!(ca = %ca_path.display(), "generated a self-signed CA and serving certificate");
    Ok(pair)
}
