//! `kips webhook`: certificates, state and server put together.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::certs::{self, CertMode};
use crate::cli::WebhookArgs;
use crate::metrics::Metrics;
use crate::server::{AppState, Server, ServerSettings};
use crate::tls::{self, CertFiles, CertStore};

/// Lifetime of the embedded default's certificates: they live as long as the process.
const EMBEDDED_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

pub async fn run(args: WebhookArgs) -> Result<()> {
    let started = Instant::now();
    let config = args.inject.config()?;
    let metrics = Arc::new(Metrics::new());

    let mode = CertMode::resolve(args.cert_mode, args.tls_cert.is_some())?;
    let mut self_managed = None;
    let store = match (mode, &args.tls_cert, &args.tls_key) {
        (CertMode::Files, Some(cert), Some(key)) => {
            let files = CertFiles {
                cert: cert.clone(),
                key: key.clone(),
            };
            let store = CertStore::new(files.read()?, metrics.clone())
                .with_context(|| format!("loading {} and {}", cert.display(), key.display()))?;
            files.watch(store.clone(), args.tls_poll_interval)?;
            tracing::info!(cert = %cert.display(), "serving the given certificate; reloading it when it changes");
            store
        }
        (CertMode::SelfManaged, _, _) => {
            // Serves a placeholder (and stays unready) until the Secret has been read.
            let manager = certs::self_managed(&args).await?;
            let placeholder = certs::placeholder_pair(&manager.names)?;
            self_managed = Some(manager);
            CertStore::new(placeholder, metrics.clone())?
        }
        _ => {
            let pair = embedded_pair(&args)?;
            CertStore::new(pair, metrics.clone())?
        }
    };

    let mut state = AppState::new(config, metrics);
    state.hooks = crate::cluster::hooks(&args.cluster).await?;
    let server = Server::bind(args.listen)?;
    let addr = server.local_addr()?;
    let readiness = certs::Readiness::new(state.ready.clone());
    match self_managed {
        Some(manager) => drop(manager.spawn(store.clone(), readiness.clone())),
        None => drop(readiness.set_trusted(true)),
    }
    tracing::info!(%addr, startup_ms = started.elapsed().as_millis() as u64, "kips webhook serving HTTPS");

    let settings = ServerSettings {
        handshake_timeout: args.handshake_timeout,
        header_read_timeout: args.header_read_timeout,
        request_timeout: args.request_timeout,
        drain_timeout: args.drain_timeout,
    };
    let shutdown = readiness.shutdown_signal(args.shutdown_delay);
    server
        .serve(state, tls::server_config(store)?, settings, shutdown)
        .await
}

/// The embedded default: a fresh CA and serving certificate, the CA written for clients.
fn embedded_pair(args: &WebhookArgs) -> Result<tls::PemPair> {
    let mut names = args.sans.clone();
    if let (Some(service), Some(namespace)) = (&args.service_name, &args.namespace) {
        names.extend(tls::service_names(service, namespace));
    }
    let ca = tls::generate_ca("kips embedded CA", EMBEDDED_VALIDITY)?;
    let pair = tls::issue_serving_cert(&ca, &tls::local_names(&names), EMBEDDED_VALIDITY)?;
    let ca_path = args.certs_dir.join("ca.crt");
    tls::write_atomically(&ca_path, &ca.cert)?;
    tracing::info!(ca = %ca_path.display(), "generated a self-signed CA and serving certificate");
    Ok(pair)
}
