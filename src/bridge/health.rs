//! The health port: `/livez`, `/readyz`, `/metrics`. Probes read state the bridge keeps;
//! none of them opens a relay connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use super::metrics::BridgeMetrics;

/// One condition of readiness (a `-T` listener online; a relay's credentials accepted).
pub(crate) struct Check {
    pub name: String,
    pub ready: Arc<AtomicBool>,
}

pub(crate) struct Health {
    pub checks: Vec<Check>,
    pub metrics: Arc<BridgeMetrics>,
}

impl Health {
    /// Ready, or the checks that are not.
    pub(crate) fn unready(&self) -> Vec<&str> {
        self.checks
            .iter()
            .filter(|c| !c.ready.load(Ordering::SeqCst))
            .map(|c| c.name.as_str())
            .collect()
    }
}

pub(crate) fn router(health: Arc<Health>) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(health)
}

async fn readyz(State(health): State<Arc<Health>>) -> impl IntoResponse {
    let unready = health.unready();
    if unready.is_empty() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", unready.join("; ")),
        )
    }
}

async fn metrics(State(health): State<Arc<Health>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        health.metrics.encode(),
    )
}

/// Binds the health port (so that a bad address fails at start) and serves it.
pub(crate) async fn bind(address: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(address).await
}

pub(crate) async fn serve(listener: tokio::net::TcpListener, health: Arc<Health>) {
    if let Err(error) = axum::serve(listener, router(health)).await {
        tracing::error!(%error, "the health port stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_lists_what_is_missing() {
        let online = Arc::new(AtomicBool::new(false));
        let health = Health {
            checks: vec![
                Check {
                    name: "listener api (-T #1)".into(),
                    ready: online.clone(),
                },
                Check {
                    name: "credentials db".into(),
                    ready: Arc::new(AtomicBool::new(true)),
                },
            ],
            metrics: Arc::new(BridgeMetrics::new()),
        };
        assert_eq!(health.unready(), ["listener api (-T #1)"]);
        online.store(true, Ordering::SeqCst);
        assert!(health.unready().is_empty());
    }
}
