//! Forwarders: what happens to one connection once the relay has carried it.
//!
//! - [`local`]: `-L` bindings, TCP and UDP sockets on this machine whose traffic goes to the
//!   relay (the relay's sender side);
//! - [`remote`]: `-T` bindings, connections the relay hands to a listener, sent on to
//!   targets;
//! - [`stream`]: the byte pump both use for TCP; [`datagram`]: the framing both use for UDP.

pub(crate) mod datagram;
pub(crate) mod local;
pub(crate) mod remote;
pub(crate) mod stream;

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::sync::mpsc;

use super::grammar::RelayName;
use super::hc::{ConnectError, HcClient, Refusal};
use super::ws::{Incoming, WsError, WsReceiver};

/// Timings every forwarder uses.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// Ping interval on control channels and idle data connections.
    pub keepalive: Duration,
    /// Connecting to a local target (`-T`).
    pub target_connect_timeout: Duration,
    /// A UDP route with no datagram either way for this long is closed (azbridge: 4 min).
    pub udp_idle: Duration,
    /// How long a failed UDP route drops its source's datagrams before trying again.
    pub udp_retry_after: Duration,
}

/// A refusal that retrying cannot cure: the bridge stops with it.
#[derive(Debug, Clone)]
pub(crate) struct Fatal {
    pub relay: String,
    pub refusal: Refusal,
}

/// One hybrid connection as a forwarder uses it.
#[derive(Clone)]
pub(crate) struct Link {
    pub client: HcClient,
    pub relay: RelayName,
    pub settings: Arc<Settings>,
    pub fatal: mpsc::UnboundedSender<Fatal>,
}

impl Link {
    /// Reports a fatal refusal (once per error; the engine stops at the first).
    pub(crate) fn report(&self, error: &ConnectError) {
        if let Some(refusal) = error.refusal().filter(|r| r.is_fatal()) {
            let _ = self.fatal.send(Fatal {
                relay: self.relay.to_string(),
                refusal: refusal.clone(),
            });
        }
    }
}

/// How the start of a hybrid connection ended without the bytes expected.
#[derive(Debug, thiserror::Error)]
pub(crate) enum EarlyEnd {
    #[error("the other side closed the connection")]
    Closed,
    #[error("{0}")]
    WebSocket(#[from] WsError),
}

/// Reads until at least `wanted` bytes arrived (or `done` says the bytes are complete);
/// returns everything read, which may be more.
pub(crate) async fn read_at_least(
    receiver: &mut WsReceiver,
    mut buffer: BytesMut,
    done: impl Fn(&[u8]) -> bool,
) -> Result<BytesMut, EarlyEnd> {
    while !done(&buffer) {
        match receiver.next().await? {
            Incoming::Data { payload, .. } => buffer.extend_from_slice(&payload),
            Incoming::Close { .. } => return Err(EarlyEnd::Closed),
            Incoming::Pong => {}
        }
    }
    Ok(buffer)
}

/// Makes a socket answer RST instead of FIN when it is dropped: a client whose connection
/// could not be carried must learn it at once, not see an orderly end.
pub(crate) fn reset_on_drop(socket: &tokio::net::TcpStream) {
    let _ = socket2::SockRef::from(socket).set_linger(Some(std::time::Duration::ZERO));
}
