//! The HTTPS admission server: axum over rustls, with limits, timeouts and graceful drain.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum_server::accept::NoDelayAcceptor;
use axum_server::tls_rustls::{RustlsAcceptor, RustlsConfig};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use rustls::ServerConfig;
use tracing::Instrument;
use tracing::field::Empty;

use super::lifecycle::Readiness;
use super::metrics::Metrics;
use super::review::{self, AdmissionError, Decision, RequestInfo, Reviewed};
use crate::inject::{Effect, InjectConfig};

/// The API server sends at most 3 MiB; anything larger is not from it.
pub const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Cluster lookups around a review (the I/O that the pure core does not do).
pub trait ClusterHooks: Send + Sync + 'static {
    /// Warnings that need the cluster (a missing relay Secret, a namespace whose Pod
    /// Security level forbids iptables mode). Must answer quickly: it delays the response.
    fn warnings<'a>(
        &'a self,
        request: &'a RequestInfo,
        decision: &'a Decision,
    ) -> BoxFuture<'a, Vec<String>>;
    /// Called after the response was written (Events). Must not block.
    fn reviewed(&self, reviewed: &Reviewed);
}

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    config: Arc<InjectConfig>,
    metrics: Arc<Metrics>,
    /// Not ready until a trusted certificate is served, and again while draining.
    readiness: Readiness,
    hooks: Option<Arc<dyn ClusterHooks>>,
}

impl AppState {
    pub fn new(
        config: InjectConfig,
        metrics: Arc<Metrics>,
        readiness: Readiness,
        hooks: Option<Arc<dyn ClusterHooks>>,
    ) -> Self {
        Self {
            config: Arc::new(config),
            metrics,
            readiness,
            hooks,
        }
    }
}

/// Timeouts and limits of the HTTP layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSettings {
    /// A TLS handshake must finish within this.
    pub handshake_timeout: Duration,
    /// An HTTP/1 request's headers must arrive within this.
    pub header_read_timeout: Duration,
    /// A whole request (body included) must be answered within this.
    pub request_timeout: Duration,
    /// How long in-flight requests may take to finish once draining starts.
    pub drain_timeout: Duration,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(5),
            header_read_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(20),
        }
    }
}

pub fn router(state: AppState, settings: &ServerSettings) -> Router {
    Router::new()
        .route("/mutate", post(mutate))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            settings.request_timeout,
        ))
        .with_state(state)
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.readiness.is_ready() {
        "ok".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response()
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

async fn mutate(State(state): State<AppState>, request: Request) -> Response {
    let span = tracing::info_span!(
        "admission",
        http = ?request.version(),
        uid = Empty,
        kind = Empty,
        namespace = Empty,
        name = Empty,
        operation = Empty,
        dry_run = Empty,
    );
    async move {
        // A declared length over the limit is refused before a byte of the body is read.
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        let body = match declared {
            Some(length) if length > MAX_BODY_BYTES => Err(AdmissionError::TooLarge {
                limit: MAX_BODY_BYTES,
            }),
            _ => read_body(request.into_body()).await,
        };
        let reviewed = match body {
            Ok(body) => review(&state, &body).await,
            Err(error) => {
                tracing::warn!(error = %error, "unreadable admission request");
                review::error_review(error)
            }
        };
        if let Some(hooks) = &state.hooks {
            hooks.reviewed(&reviewed);
        }
        (
            reviewed.http_status,
            [(header::CONTENT_TYPE, "application/json")],
            reviewed.body,
        )
            .into_response()
    }
    .instrument(span)
    .await
}

async fn read_body(body: Body) -> Result<Bytes, AdmissionError> {
    match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<LengthLimitError>() => Err(AdmissionError::TooLarge {
            limit: MAX_BODY_BYTES,
        }),
        Err(error) => Err(AdmissionError::Unreadable(format!(
            "reading the body failed: {error}"
        ))),
    }
}

async fn review(state: &AppState, body: &[u8]) -> Reviewed {
    let started = Instant::now();
    let mut decision = review::decide(body, &state.config);
    let span = tracing::Span::current();
    if let Some(request) = &decision.request {
        span.record("uid", request.uid.as_str());
        span.record("kind", request.kind.as_str());
        span.record("namespace", request.namespace.as_str());
        span.record("name", request.name.as_str());
        span.record("operation", request.operation.as_str());
        span.record("dry_run", request.dry_run);
    }
    if let (Some(hooks), Some(request)) = (&state.hooks, decision.request.clone()) {
        let extra = hooks.warnings(&request, &decision).await;
        if let Ok(mutation) = &mut decision.result {
            mutation.warnings.extend(extra);
        }
    }
    let reviewed = decision.respond();
    let (kind, operation) = reviewed
        .request
        .as_ref()
        .map_or(("", ""), |r| (r.kind.as_str(), r.operation.as_str()));
    state.metrics.observe_review(
        kind,
        operation,
        reviewed.outcome.as_str(),
        reviewed.effect.as_str(),
        started.elapsed(),
    );
    match (&reviewed.denial, reviewed.effect) {
        (Some(denial), _) => tracing::info!(denial = %denial, "denied"),
        (None, Effect::Unchanged) => {
            tracing::debug!(outcome = reviewed.outcome.as_str(), "reviewed")
        }
        (None, effect) => tracing::info!(
            outcome = reviewed.outcome.as_str(),
            effect = effect.as_str(),
            warnings = ?reviewed.warnings,
            "reviewed"
        ),
    }
    reviewed
}

/// A bound listener, serving until `shutdown` resolves, then draining.
pub struct Server {
    listener: std::net::TcpListener,
    handle: axum_server::Handle<SocketAddr>,
}

impl Server {
    pub fn bind(addr: SocketAddr) -> Result<Self> {
        let listener =
            std::net::TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
        listener.set_nonblocking(true)?;
        Ok(Self {
            listener,
            handle: axum_server::Handle::new(),
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// Serves kips' admission router over HTTPS until `shutdown` resolves; then stops
    /// accepting, marks the server not ready, and lets in-flight requests finish within the
    /// drain timeout.
    ///
    /// Once the readiness is stopped (SIGTERM, before the shutdown delay), the connections
    /// already open are told to go away (hyper's graceful shutdown: an HTTP/2 GOAWAY)
    /// while new ones are still accepted: the API server keeps one connection to a Service
    /// for as long as it can, and kube-proxy's choice of pod holds only for new ones, so a
    /// connection kept open to a stopping replica would carry admissions until the process
    /// dies (a short grace period, a kill), failing the one in flight. Its next request
    /// opens a new connection, which goes to a live replica once endpoints drop this pod.
    pub async fn serve(
        self,
        state: AppState,
        tls: Arc<ServerConfig>,
        settings: ServerSettings,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        let app = router(state.clone(), &settings);
        let readiness = state.readiness.clone();
        let stopping = {
            let readiness = readiness.clone();
            async move { readiness.stopping().await }
        };
        self.serve_phased(app, tls, settings, stopping, async move {
            shutdown.await;
            readiness.stop();
        })
        .await
    }

    /// Serves any router on kips' HTTPS stack (TLS, HTTP/1 and HTTP/2 settings, timeouts,
    /// drain). The benchmarks' ceiling server uses it to differ from kips only in the handler.
    pub async fn serve_router(
        self,
        app: Router,
        tls: Arc<ServerConfig>,
        settings: ServerSettings,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        self.serve_phased(app, tls, settings, std::future::pending::<()>(), shutdown)
            .await
    }

    /// Serves until `shutdown`, then drains. When `stopping` resolves first, the open
    /// connections are shut down gracefully and a second accept loop on the same socket
    /// (a duplicate of the listener, so no connection waiting in the backlog is lost)
    /// serves new connections until `shutdown`.
    async fn serve_phased(
        self,
        app: Router,
        tls: Arc<ServerConfig>,
        settings: ServerSettings,
        stopping: impl Future<Output = ()> + Send + 'static,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        let spare = self
            .listener
            .try_clone()
            .context("duplicating the listener")?;
        let first = self.handle.clone();
        let (started, second) = tokio::sync::oneshot::channel();
        let drain = settings.drain_timeout;
        {
            let (app, tls, settings) = (app.clone(), tls.clone(), settings.clone());
            tokio::spawn(async move {
                tokio::pin!(shutdown);
                tokio::select! {
                    biased;
                    () = &mut shutdown => {
                        tracing::info!(connections = first.connection_count(), "draining");
                        first.graceful_shutdown(Some(drain));
                        return;
                    }
                    () = stopping => {}
                }
                tracing::info!(
                    connections = first.connection_count(),
                    "stopping: asking open connections to go away, still accepting new ones"
                );
                first.graceful_shutdown(Some(drain));
                let later = axum_server::Handle::new();
                let _ = started.send(tokio::spawn(accept_loop(
                    spare,
                    app,
                    tls,
                    settings,
                    later.clone(),
                )));
                shutdown.await;
                tracing::info!(connections = later.connection_count(), "draining");
                later.graceful_shutdown(Some(drain));
            });
        }
        accept_loop(self.listener, app, tls, settings, self.handle).await?;
        if let Ok(task) = second.await {
            task.await.context("the second accept loop")??;
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// Accepts and serves connections on kips' HTTPS stack until `handle` shuts it down and
/// its connections are done.
async fn accept_loop(
    listener: std::net::TcpListener,
    app: Router,
    tls: Arc<ServerConfig>,
    settings: ServerSettings,
    handle: axum_server::Handle<SocketAddr>,
) -> Result<()> {
    // Without TCP_NODELAY, a response written in two segments (HTTP/2 HEADERS, then
    // DATA) waits for the client's delayed ACK: 40 ms added to an admission.
    let acceptor = RustlsAcceptor::new(RustlsConfig::from_config(tls))
        .handshake_timeout(settings.handshake_timeout)
        .acceptor(NoDelayAcceptor::new());
    let mut server = axum_server::from_tcp(listener)?
        .acceptor(acceptor)
        .handle(handle);
    server
        .http_builder()
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout);
    // HTTP/2 abuse limits, written out rather than left to hyper's defaults (they are
    // hyper's, held by tests/webhook_faults.rs): at most 200 streams at once per
    // connection; a client that resets streams before they are served (rapid reset) or
    // makes the server reset many gets a GOAWAY; a header block, CONTINUATION frames
    // included, stops at 16 KiB (the API server sends well under 1 KiB).
    server
        .http_builder()
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(30))
        .max_concurrent_streams(200)
        .max_pending_accept_reset_streams(20)
        .max_local_error_reset_streams(1024)
        .max_header_list_size(16 * 1024);
    server
        .serve(app.into_make_service())
        .await
        .context("serving HTTPS")
}
