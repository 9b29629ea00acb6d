//! The relay's HTTPS server: listen, connect and accept on `/$hc/{path}`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming as Body;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::upgrade::OnUpgrade;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use percent_encoding::percent_decode_str;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use super::auth::{self, Denied, Right};
use super::{MAX_LISTENERS, RelayConfig, RelayError};
use crate::bridge::grammar::RelayName;
use crate::bridge::hc::messages::{Accept, ControlMessage};
use crate::bridge::hc::{self, Action};
use crate::bridge::sas::unix_now;
use crate::bridge::ws::{self, Incoming, TextOrControl, WsError, WsReceiver, WsSender};
use crate::tls::PemPair;

/// A listener's control channel, as the relay holds it.
struct ListenerHandle {
    id: u64,
    commands: mpsc::UnboundedSender<String>,
}

struct Entity {
    name: String,
    listeners: Mutex<Vec<ListenerHandle>>,
}

/// How a listener answered an accept.
enum Rendezvous {
    Accepted {
        protocol: Option<HeaderValue>,
        upgrade: OnUpgrade,
    },
    Rejected {
        status: u16,
        description: String,
    },
}

struct Pending {
    listener: u64,
    answer: oneshot::Sender<Rendezvous>,
}

struct State {
    keys: Vec<super::KeySpec>,
    entities: HashMap<String, Arc<Entity>>,
    pending: Mutex<HashMap<String, Pending>>,
    accept_timeout: Duration,
    next_id: AtomicU64,
}

/// Runs the relay until SIGTERM or SIGINT.
pub async fn run(config: RelayConfig) -> Result<(), RelayError> {
    use tokio::signal::unix::{SignalKind, signal};
    crate::bridge::raise_open_file_limit();
    let shutdown = async {
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    };
    run_until(config, shutdown).await
}

pub async fn run_until(
    config: RelayConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), RelayError> {
    if config.hybrid_connections.is_empty() {
        return Err(RelayError::Usage(
            "no hybrid connection: give --hybrid-connection NAME at least once".into(),
        ));
    }
    if config.keys.is_empty() {
        return Err(RelayError::Usage(
            "no key: give --key NAME=KEY at least once".into(),
        ));
    }
    let mut entities = HashMap::new();
    for name in &config.hybrid_connections {
        if RelayName::parse(name).is_none() {
            return Err(RelayError::Usage(format!(
                "--hybrid-connection \"{name}\" is not a hybrid connection name"
            )));
        }
        entities.insert(
            name.to_ascii_lowercase(),
            Arc::new(Entity {
                name: name.clone(),
                listeners: Mutex::new(Vec::new()),
            }),
        );
    }
    let tls = tls_config(&config)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|error| RelayError::Bind {
            address: config.listen,
            error,
        })?;
    let address = listener.local_addr().map_err(|error| RelayError::Bind {
        address: config.listen,
        error,
    })?;
    let state = Arc::new(State {
        keys: config.keys.clone(),
        entities,
        pending: Mutex::new(HashMap::new()),
        accept_timeout: config.accept_timeout,
        next_id: AtomicU64::new(1),
    });
    if let Some(path) = &config.ready_file {
        crate::tls::write_atomically(path, &format!("{address}\n")).map_err(|error| {
            RelayError::ReadyFile {
                path: path.clone(),
                error: error.to_string(),
            }
        })?;
    }
    info!(%address, hybrid_connections = ?config.hybrid_connections, "kips relay (test relay, not for production) serving");
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    warn!(%error, "accept failed");
                    continue;
                }
            },
            _ = &mut shutdown => return Ok(()),
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let state = state.clone();
        tokio::spawn(async move {
            let tls = match acceptor.accept(tcp).await {
                Ok(tls) => tls,
                Err(error) => {
                    debug!(%peer, %error, "TLS handshake failed");
                    return;
                }
            };
            let service = hyper::service::service_fn(move |request| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(state, request).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .with_upgrades()
                .await;
        });
    }
}

/// The test CA from `dir` (made there when missing) and a serving certificate for the
/// configured names.
fn tls_config(config: &RelayConfig) -> Result<Arc<rustls::ServerConfig>, RelayError> {
    let fail = |error: String| RelayError::Ca {
        dir: config.dir.clone(),
        error,
    };
    let ca = load_or_make_ca(&config.dir).map_err(|e| fail(e.to_string()))?;
    let names = crate::tls::local_names(&config.names);
    let serving = crate::tls::issue_serving_cert(&ca, &names, Duration::from_secs(30 * 86400))
        .map_err(|e| fail(e.to_string()))?;
    let chain = CertificateDer::pem_slice_iter(serving.cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(e.to_string()))?;
    let key =
        PrivateKeyDer::from_pem_slice(serving.key.as_bytes()).map_err(|e| fail(e.to_string()))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| fail(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| fail(e.to_string()))?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(tls))
}

fn load_or_make_ca(dir: &Path) -> anyhow::Result<PemPair> {
    let (cert, key) = (dir.join("ca.crt"), dir.join("ca.key"));
    if cert.exists() && key.exists() {
        return Ok(PemPair {
            cert: std::fs::read_to_string(&cert)?,
            key: std::fs::read_to_string(&key)?,
        });
    }
    let ca = crate::tls::generate_ca("kips test relay CA", Duration::from_secs(365 * 86400))?;
    crate::tls::write_atomically(&key, &ca.key)?;
    crate::tls::write_atomically(&cert, &ca.cert)?;
    Ok(ca)
}

type Answer = Response<Full<Bytes>>;

/// A refusal: the status with the description as its reason phrase, as the service does.
fn refuse(status: u16, description: &str, tracking: &str) -> Answer {
    let text = format!("{description} TrackingId:{tracking}");
    let mut response = Response::builder()
        .status(status)
        .body(Full::new(Bytes::from(format!("{text}\n"))))
        .expect("a valid status");
    if let Ok(reason) = hyper::ext::ReasonPhrase::try_from(text.into_bytes()) {
        response.extensions_mut().insert(reason);
    }
    response
}

fn denied(denied: Denied, tracking: &str) -> Answer {
    refuse(denied.status, &denied.description, tracking)
}

fn query(request: &Request<Body>) -> Vec<(String, String)> {
    let decode = |s: &str| {
        percent_decode_str(&s.replace('+', " "))
            .decode_utf8_lossy()
            .into_owned()
    };
    request
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(pair), String::new()),
        })
        .collect()
}

fn parameter<'a>(query: &'a [(String, String)], name: &str) -> Option<&'a str> {
    query
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// The hybrid connection a path names: the longest registered prefix of
/// `/$hc/{path}[/suffix]`.
fn entity_of(state: &State, path: &str) -> Option<Arc<Entity>> {
    let path = percent_decode_str(path.strip_prefix(hc::PATH_PREFIX)?)
        .decode_utf8()
        .ok()?
        .to_ascii_lowercase();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    (1..=segments.len())
        .rev()
        .find_map(|n| state.entities.get(&segments[..n].join("/")).cloned())
}

async fn handle(state: Arc<State>, mut request: Request<Body>) -> Answer {
    let query = query(&request);
    let tracking = parameter(&query, hc::ID_PARAMETER)
        .map(str::to_owned)
        .unwrap_or_else(hc::tracking_id);
    let Some(action) = parameter(&query, hc::ACTION_PARAMETER).and_then(Action::parse) else {
        return refuse(
            400,
            "BadRequest: sb-hc-action must be listen, connect or accept.",
            &tracking,
        );
    };
    let Some(entity) = entity_of(&state, request.uri().path()) else {
        return refuse(404, hc::ENDPOINT_NOT_FOUND, &tracking);
    };
    // The namespace name as the client addressed it (the audience's host).
    let authority = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost")
        .to_owned();
    let host = match authority.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(rest).to_owned(),
        None => authority.split(':').next().unwrap_or(&authority).to_owned(),
    };
    let token = request
        .headers()
        .get(hc::AUTHORIZATION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| parameter(&query, hc::TOKEN_PARAMETER).map(str::to_owned));
    match action {
        Action::Listen => {
            let expiry = match auth::check(
                &state.keys,
                &host,
                &entity.name,
                Right::Listen,
                token.as_deref(),
                unix_now(),
            ) {
                Ok(expiry) => expiry,
                Err(d) => return denied(d, &tracking),
            };
            if entity.listeners.lock().expect("lock").len() >= MAX_LISTENERS {
                return refuse(
                    403,
                    "QuotaExceeded: this hybrid connection has 25 listeners.",
                    &tracking,
                );
            }
            let builder = match ws::upgrade_response(request.headers(), None) {
                Ok(builder) => builder,
                Err(why) => return refuse(400, why, &tracking),
            };
            let upgrade = hyper::upgrade::on(&mut request);
            tokio::spawn(control_channel(
                state.clone(),
                entity,
                upgrade,
                expiry,
                host,
            ));
            builder.body(Full::default()).expect("a valid answer")
        }
        Action::Connect => {
            if let Err(d) = auth::check(
                &state.keys,
                &host,
                &entity.name,
                Right::Send,
                token.as_deref(),
                unix_now(),
            ) {
                return denied(d, &tracking);
            }
            if let Err(why) = ws::upgrade_response(request.headers(), None) {
                return refuse(400, why, &tracking);
            }
            connect(&state, &entity, request, &authority, &tracking).await
        }
        Action::Accept => accept(&state, request, &query, &tracking),
    }
}

/// A sender: pick a listener, send it `accept`, wait for its rendezvous.
async fn connect(
    state: &State,
    entity: &Entity,
    mut request: Request<Body>,
    authority: &str,
    tracking: &str,
) -> Answer {
    let connect_headers = forwarded_headers(request.headers());
    loop {
        let chosen = {
            let listeners = entity.listeners.lock().expect("lock");
            if listeners.is_empty() {
                None
            } else {
                let index = rand::random_range(0..listeners.len());
                Some((listeners[index].id, listeners[index].commands.clone()))
            }
        };
        let Some((listener, commands)) = chosen else {
            return refuse(404, hc::NO_LISTENER, tracking);
        };
        let secret = hex(&rand::random::<[u8; 16]>());
        let address = format!(
            "wss://{authority}{}{}?{}=accept&{}={}&sb-hc-rendezvous={secret}",
            hc::PATH_PREFIX,
            entity.name,
            hc::ACTION_PARAMETER,
            hc::ID_PARAMETER,
            crate::bridge::sas::url_encode(tracking)
        );
        let message = ControlMessage::Accept(Accept {
            address,
            id: tracking.to_owned(),
            connect_headers: connect_headers.clone(),
        });
        let (answer, answered) = oneshot::channel();
        state
            .pending
            .lock()
            .expect("lock")
            .insert(secret.clone(), Pending { listener, answer });
        // Removed however this ends, a sender that hangs up while waiting included.
        let _pending = PendingGuard {
            state,
            secret: secret.clone(),
        };
        if commands.send(message.to_json()).is_err() {
            continue;
        }
        let outcome = tokio::time::timeout(state.accept_timeout, answered).await;
        match outcome {
            Ok(Ok(Rendezvous::Accepted { protocol, upgrade })) => {
                let builder = match ws::upgrade_response(request.headers(), protocol.as_ref()) {
                    Ok(builder) => builder,
                    Err(why) => return refuse(400, why, tracking),
                };
                let sender = hyper::upgrade::on(&mut request);
                tokio::spawn(splice(sender, upgrade));
                debug!(entity = %entity.name, %tracking, "connected");
                return builder.body(Full::default()).expect("a valid answer");
            }
            Ok(Ok(Rendezvous::Rejected {
                status,
                description,
            })) => {
                return refuse(status, &description, tracking);
            }
            // The listener went away before answering: try another.
            Ok(Err(_)) => continue,
            Err(_) => {
                return refuse(
                    504,
                    "GatewayTimeout: the listener did not accept the connection in time.",
                    tracking,
                );
            }
        }
    }
}

struct PendingGuard<'a> {
    state: &'a State,
    secret: String,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.state
            .pending
            .lock()
            .expect("lock")
            .remove(&self.secret);
    }
}

/// What the listener learns of the sender's request: its headers, less the token and
/// extensions (the relay negotiates none).
fn forwarded_headers(headers: &HeaderMap) -> std::collections::BTreeMap<String, String> {
    headers
        .iter()
        .filter(|(name, _)| {
            !name.as_str().eq_ignore_ascii_case(hc::AUTHORIZATION_HEADER)
                && *name != header::AUTHORIZATION
                && *name != header::SEC_WEBSOCKET_EXTENSIONS
        })
        .filter_map(|(name, value)| {
            Some((canonical(name.as_str()), value.to_str().ok()?.to_owned()))
        })
        .collect()
}

/// `sec-websocket-key` → `Sec-WebSocket-Key`, as the service writes header names.
fn canonical(name: &str) -> String {
    name.split('-')
        .map(|part| match part {
            "websocket" => "WebSocket".to_owned(),
            _ => {
                let mut chars = part.chars();
                chars
                    .next()
                    .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
                    .unwrap_or_default()
            }
        })
        .collect::<Vec<_>>()
        .join("-")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A listener's rendezvous (or rejection, with `sb-hc-statusCode`).
fn accept(
    state: &State,
    mut request: Request<Body>,
    query: &[(String, String)],
    tracking: &str,
) -> Answer {
    let pending = parameter(query, "sb-hc-rendezvous")
        .and_then(|secret| state.pending.lock().expect("lock").remove(secret));
    let Some(pending) = pending else {
        return refuse(403, "The URL is not valid.", tracking);
    };
    if let Some(status) = parameter(query, hc::STATUS_CODE_PARAMETER) {
        let status = status
            .parse::<u16>()
            .ok()
            .filter(|s| (400..600).contains(s))
            .unwrap_or(502);
        let description = parameter(query, hc::STATUS_DESCRIPTION_PARAMETER)
            .unwrap_or("Rejected by the listener.");
        let _ = pending.answer.send(Rendezvous::Rejected {
            status,
            description: description.to_owned(),
        });
        // The protocol's answer to a completed rejection.
        return refuse(410, "Gone: the connection was rejected.", tracking);
    }
    let protocol = request
        .headers()
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .cloned();
    let builder = match ws::upgrade_response(request.headers(), protocol.as_ref()) {
        Ok(builder) => builder,
        Err(why) => {
            let _ = pending.answer.send(Rendezvous::Rejected {
                status: 502,
                description: "BadGateway: the listener's rendezvous was not a WebSocket upgrade."
                    .into(),
            });
            return refuse(400, why, tracking);
        }
    };
    let upgrade = hyper::upgrade::on(&mut request);
    if pending
        .answer
        .send(Rendezvous::Accepted { protocol, upgrade })
        .is_err()
    {
        return refuse(403, "The URL is not valid.", tracking);
    }
    builder.body(Full::default()).expect("a valid answer")
}

/// Joins a sender's and a listener's WebSockets until both directions have closed.
async fn splice(sender: OnUpgrade, listener: OnUpgrade) {
    let (Ok(sender), Ok(listener)) = tokio::join!(sender, listener) else {
        return;
    };
    let (mut from_sender, to_sender) = ws::server(sender);
    let (mut from_listener, to_listener) = ws::server(listener);
    let _ = tokio::try_join!(
        pass(&mut from_sender, &to_listener),
        pass(&mut from_listener, &to_sender)
    );
}

/// Passes frames on unchanged; a Close ends this direction only.
async fn pass(from: &mut WsReceiver, to: &WsSender) -> Result<(), WsError> {
    loop {
        match from.next().await? {
            Incoming::Data {
                mut payload,
                opcode,
                fin,
            } => to.send_frame(opcode, fin, &mut payload).await?,
            Incoming::Close { code, reason } => {
                to.close(code.unwrap_or(1000), &reason).await?;
                return Ok(());
            }
            Incoming::Pong => {}
        }
    }
}

/// A listener's control channel: accept messages out, renewals in, expiry enforced.
async fn control_channel(
    state: Arc<State>,
    entity: Arc<Entity>,
    upgrade: OnUpgrade,
    mut expiry: u64,
    host: String,
) {
    let Ok(upgraded) = upgrade.await else { return };
    let (mut receiver, sender) = ws::server(upgraded);
    let id = state.next_id.fetch_add(1, Ordering::Relaxed);
    let (commands, mut queue) = mpsc::unbounded_channel();
    entity
        .listeners
        .lock()
        .expect("lock")
        .push(ListenerHandle { id, commands });
    info!(entity = %entity.name, listener = id, "listener online");
    let (events, mut incoming) = mpsc::channel(16);
    let reader = tokio::spawn(async move {
        loop {
            let event = receiver.next_text().await;
            let stop = !matches!(event, Ok(TextOrControl::Text(_) | TextOrControl::Pong));
            if events.send(event).await.is_err() || stop {
                return;
            }
        }
    });
    loop {
        let expires_in = Duration::from_secs(expiry.saturating_sub(unix_now()));
        tokio::select! {
            command = queue.recv() => match command {
                Some(text) => if sender.send_text(&text).await.is_err() { break },
                None => break,
            },
            event = incoming.recv() => match event {
                Some(Ok(TextOrControl::Text(text))) => {
                    if let Ok(ControlMessage::RenewToken(renew)) = ControlMessage::parse(&text) {
                        match auth::check(&state.keys, &host, &entity.name, Right::Listen, Some(&renew.token), unix_now()) {
                            Ok(renewed) => {
                                debug!(entity = %entity.name, listener = id, "token renewed");
                                expiry = renewed;
                            }
                            Err(d) => {
                                let _ = sender.close(1008, &d.description).await;
                                break;
                            }
                        }
                    }
                }
                Some(Ok(TextOrControl::Pong)) => {}
                Some(Ok(TextOrControl::Close { .. })) => {
                    let _ = sender.close(1000, "Normal Closure").await;
                    break;
                }
                Some(Err(_)) | None => break,
            },
            _ = tokio::time::sleep(expires_in) => {
                let _ = sender.close(1008, "ExpiredToken: The token is expired.").await;
                break;
            }
        }
    }
    entity
        .listeners
        .lock()
        .expect("lock")
        .retain(|l| l.id != id);
    // Connections this listener was asked to accept go to another one, or fail.
    state
        .pending
        .lock()
        .expect("lock")
        .retain(|_, p| p.listener != id);
    reader.abort();
    info!(entity = %entity.name, listener = id, "listener offline");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_names_are_written_as_the_service_writes_them() {
        assert_eq!(canonical("sec-websocket-key"), "Sec-WebSocket-Key");
        assert_eq!(canonical("host"), "Host");
        let mut headers = HeaderMap::new();
        headers.insert("servicebusauthorization", "secret".parse().unwrap());
        headers.insert(
            "sec-websocket-extensions",
            "permessage-deflate".parse().unwrap(),
        );
        headers.insert("sec-websocket-key", "abc".parse().unwrap());
        let forwarded = forwarded_headers(&headers);
        assert_eq!(forwarded.len(), 1);
        assert_eq!(forwarded["Sec-WebSocket-Key"], "abc");
    }
}
