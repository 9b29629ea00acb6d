//! `-T` bindings: connections a listener accepted, sent on to their targets.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::{EarlyEnd, Link, datagram, read_at_least, stream};
use crate::bridge::grammar::{RemoteBinding, RemoteForward};
use crate::bridge::hc::messages::Accept;
use crate::bridge::metrics::{BindingMetrics, BridgeMetrics, Side};
use crate::bridge::preamble::{self, Mode, ParsedRequest, Reply, Route};
use crate::bridge::ws::{WsReceiver, WsSender};

/// One `-T` expression: its bindings and their metrics.
pub(crate) struct RemoteContext {
    pub link: Link,
    pub forward: RemoteForward,
    metrics: Vec<BindingMetrics>,
    unknown: BindingMetrics,
}

impl RemoteContext {
    pub(crate) fn new(link: Link, forward: RemoteForward, metrics: &BridgeMetrics) -> Self {
        let relay = forward.relay.to_string();
        let bindings = forward
            .bindings
            .iter()
            .map(|b| metrics.binding(&relay, &b.effective_name(), Side::Remote))
            .collect();
        RemoteContext {
            unknown: metrics.binding(&relay, "", Side::Remote),
            link,
            forward,
            metrics: bindings,
        }
    }

    fn metrics_of(&self, binding: &RemoteBinding) -> &BindingMetrics {
        self.forward
            .bindings
            .iter()
            .position(|b| b == binding)
            .map_or(&self.unknown, |index| &self.metrics[index])
    }
}

/// Completes the rendezvous of an accept message and serves the connection.
pub(crate) async fn serve(accept: Accept, context: Arc<RemoteContext>) {
    let (mut receiver, sender) = match context.link.client.rendezvous(&accept.address).await {
        Ok(pair) => pair,
        Err(error) => {
            context.unknown.failure("rendezvous");
            warn!(id = %accept.id, %error, "accepting a connection failed");
            return;
        }
    };
    let timeout = context.link.client.handshake_timeout;
    let request = tokio::time::timeout(
        timeout,
        read_at_least(&mut receiver, BytesMut::new(), |b| {
            !matches!(preamble::parse_request(b), ParsedRequest::Incomplete)
        }),
    )
    .await;
    let mut buffer = match request {
        Ok(Ok(buffer)) => buffer,
        Ok(Err(EarlyEnd::Closed)) => {
            // A connection that ends before its preamble (e.g. a sender's credential check).
            debug!(id = %accept.id, "connection closed before its preamble");
            let _ = sender.close(1000, "").await;
            return;
        }
        Ok(Err(EarlyEnd::WebSocket(error))) => {
            debug!(id = %accept.id, %error, "connection lost before its preamble");
            return;
        }
        Err(_) => {
            context.unknown.failure("preamble_timeout");
            let _ = sender.close(1000, "").await;
            return;
        }
    };
    let (mode, name, consumed) = match preamble::parse_request(&buffer) {
        ParsedRequest::Request {
            mode,
            name,
            consumed,
        } => (mode, name, consumed),
        ParsedRequest::UnsupportedVersion => {
            context.unknown.failure("unsupported_preamble");
            refuse(&sender, Reply::UnsupportedVersion).await;
            return;
        }
        ParsedRequest::Incomplete => unreachable!("read_at_least reads until complete"),
    };
    let leftover = buffer.split_off(consumed);
    let binding = match preamble::route(&context.forward.bindings, mode, &name) {
        Route::Accept(binding) => binding,
        Route::Refuse(reply) => {
            context.unknown.failure("mode_mismatch");
            refuse(&sender, reply).await;
            return;
        }
        Route::Unknown => {
            // azbridge's answer: no reply, just the close.
            context.unknown.failure("unknown_port_name");
            debug!(relay = %context.forward.relay, %name, "no binding by that name");
            let _ = sender.close(1000, "").await;
            return;
        }
    };
    let metrics = context.metrics_of(binding).clone();
    match mode {
        Mode::Stream => serve_stream(binding, receiver, sender, leftover, metrics, &context).await,
        Mode::Datagram => {
            datagram::serve_remote(binding, receiver, sender, leftover, metrics, &context.link)
                .await
        }
    }
}

async fn refuse(sender: &WsSender, reply: Reply) {
    let _ = sender.send_binary(&mut reply.bytes()).await;
    let _ = sender.close(1000, "").await;
}

/// Resolves a binding's target (first address that accepts wins).
pub(crate) async fn target_addresses(binding: &RemoteBinding) -> std::io::Result<Vec<SocketAddr>> {
    let host = binding.target_host().to_plain_string();
    Ok(
        tokio::net::lookup_host((host.as_str(), binding.port.number))
            .await?
            .collect(),
    )
}

async fn serve_stream(
    binding: &RemoteBinding,
    receiver: WsReceiver,
    sender: WsSender,
    leftover: BytesMut,
    metrics: BindingMetrics,
    context: &RemoteContext,
) {
    let settings = &context.link.settings;
    let target = tokio::time::timeout(settings.target_connect_timeout, async {
        let mut last = std::io::Error::other("no address");
        for address in target_addresses(binding).await? {
            match TcpStream::connect(address).await {
                Ok(stream) => return Ok(stream),
                Err(error) => last = error,
            }
        }
        Err(last)
    })
    .await;
    let tcp = match target {
        Ok(Ok(tcp)) => tcp,
        failed => {
            // Closing without the preamble's answer makes the sender reset its client.
            metrics.failure("target_unreachable");
            let error = match failed {
                Ok(Err(error)) => error.to_string(),
                _ => "timed out".to_owned(),
            };
            warn!(target = %binding, %error, "cannot connect to the target");
            let _ = sender.close(1000, "").await;
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    if sender
        .send_binary(&mut Reply::Accepted(Mode::Stream).bytes())
        .await
        .is_err()
    {
        return;
    }
    metrics.connections.inc();
    metrics.opened();
    let result = stream::pump(
        tcp,
        receiver,
        sender,
        leftover,
        &metrics,
        settings.keepalive,
    )
    .await;
    metrics.closed();
    if let Err(error) = result {
        metrics.failure("aborted");
        debug!(%error, "connection aborted");
    }
}
