//! `-L` bindings: sockets on this machine whose connections the relay carries to a listener.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::net::{TcpListener, TcpStream};
use tracing::{Instrument, debug, info_span, warn};

use super::{Link, read_at_least, reset_on_drop, stream};
use crate::bridge::hc::{ConnectError, Refusal};
use crate::bridge::metrics::BindingMetrics;
use crate::bridge::preamble::{self, Mode, Reply};
use crate::bridge::ws::{WsReceiver, WsSender};

/// One `-L` binding.
#[derive(Clone)]
pub(crate) struct LocalBindingContext {
    pub link: Link,
    /// The name in the preamble.
    pub name: String,
    pub metrics: BindingMetrics,
}

/// Why a connection could not be carried.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OpenError {
    #[error("{0}")]
    Connect(#[from] ConnectError),
    #[error(
        "the listener closed the connection without answering the preamble (no port named \"{0}\" there?)"
    )]
    UnknownName(String),
    #[error("the listener answered the preamble with {0:?}")]
    Refused(Reply),
    #[error("the listener's answer to the preamble is not azbridge's: {0:?}")]
    BadReply([u8; 3]),
    #[error("the listener did not answer the preamble within {0:?}")]
    Timeout(std::time::Duration),
    #[error("relay: {0}")]
    Relay(#[from] crate::bridge::ws::WsError),
}

impl OpenError {
    pub(crate) fn label(&self) -> &'static str {
        match self {
            OpenError::Connect(error) => error.label(),
            OpenError::UnknownName(_) => "unknown_port_name",
            OpenError::Refused(_) => "preamble_refused",
            OpenError::BadReply(_) => "bad_preamble",
            OpenError::Timeout(_) => "preamble_timeout",
            OpenError::Relay(_) => "transport",
        }
    }
}

/// Opens a hybrid connection for `name` in `mode`: connect, preamble, the listener's yes.
/// Returns the connection and any payload that came with the answer.
pub(crate) async fn open(
    binding: &LocalBindingContext,
    mode: Mode,
) -> Result<(WsReceiver, WsSender, BytesMut), OpenError> {
    let connected = binding
        .link
        .client
        .connect(binding.link.relay.as_str())
        .await;
    let (mut receiver, sender) = match connected {
        Ok(pair) => {
            binding.metrics.listener_found(true);
            pair
        }
        Err(error) => {
            if matches!(error.refusal(), Some(Refusal::NoListener(_))) {
                binding.metrics.listener_found(false);
            }
            binding.link.report(&error);
            return Err(error.into());
        }
    };
    sender
        .send_binary(&mut preamble::request(mode, &binding.name))
        .await?;
    let timeout = binding.link.client.handshake_timeout;
    let answer = tokio::time::timeout(
        timeout,
        read_at_least(&mut receiver, BytesMut::new(), |b| b.len() >= 3),
    )
    .await
    .map_err(|_| OpenError::Timeout(timeout))?;
    let mut answer = match answer {
        Ok(answer) => answer,
        Err(super::EarlyEnd::Closed) => return Err(OpenError::UnknownName(binding.name.clone())),
        Err(super::EarlyEnd::WebSocket(error)) => return Err(error.into()),
    };
    let reply = [answer[0], answer[1], answer[2]];
    let leftover = answer.split_off(3);
    match Reply::parse(reply) {
        Some(Reply::Accepted(accepted)) if accepted == mode => Ok((receiver, sender, leftover)),
        Some(other) => {
            let _ = sender.close(1000, "").await;
            Err(OpenError::Refused(other))
        }
        None => {
            let _ = sender.close(1000, "").await;
            Err(OpenError::BadReply(reply))
        }
    }
}

/// Accepts TCP connections on `listener` and carries each through the relay.
pub(crate) async fn serve_tcp(listener: TcpListener, binding: Arc<LocalBindingContext>) {
    let local = listener.local_addr().ok();
    loop {
        let (client, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                warn!(?local, %error, "accepting a connection failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let binding = binding.clone();
        let span = info_span!("local", relay = %binding.link.relay, binding = %binding.name, %peer);
        tokio::spawn(carry(client, peer, binding).instrument(span));
    }
}

async fn carry(client: TcpStream, peer: SocketAddr, binding: Arc<LocalBindingContext>) {
    let _ = client.set_nodelay(true);
    let (receiver, sender, leftover) = match open(&binding, Mode::Stream).await {
        Ok(opened) => opened,
        Err(error) => {
            binding.metrics.failure(error.label());
            debug!(%error, "connection not carried; resetting the client");
            reset_on_drop(&client);
            return;
        }
    };
    binding.metrics.connections.inc();
    binding.metrics.opened();
    let result = stream::pump(
        client,
        receiver,
        sender,
        leftover,
        &binding.metrics,
        binding.link.settings.keepalive,
    )
    .await;
    binding.metrics.closed();
    match result {
        Ok(()) => debug!(%peer, "connection ended"),
        Err(error) => {
            binding.metrics.failure("aborted");
            debug!(%error, "connection aborted");
        }
    }
}
