//! UDP through the relay, as azbridge frames it (`UdpLocalForwardBridge.cs`,
//! `UdpRemoteForwarder.cs`): each datagram is one WebSocket message holding a 2-byte
//! big-endian length and the payload; the receiver reads the stream of such frames without
//! relying on message boundaries. One hybrid connection per source address; a route idle for
//! [`Settings::udp_idle`](super::Settings) in both directions is closed.
//!
//! Unlike azbridge, a failed or lost route does not end the binding: its datagrams are
//! dropped for a moment, and the next one opens a new hybrid connection, so UDP works
//! again as soon as a listener is back.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::local::{self, LocalBindingContext};
use super::{Link, remote};
use crate::bridge::grammar::RemoteBinding;
use crate::bridge::metrics::BindingMetrics;
use crate::bridge::preamble::{Mode, Reply};
use crate::bridge::ws::{Incoming, WsReceiver, WsSender};

/// Datagrams waiting while a route connects; more are dropped.
const QUEUE: usize = 256;

/// `[len_hi, len_lo, payload…]`.
pub(crate) fn frame(payload: &[u8]) -> Option<Vec<u8>> {
    let len = u16::try_from(payload.len()).ok()?;
    let mut framed = Vec::with_capacity(payload.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(payload);
    Some(framed)
}

/// Splits the byte stream of a datagram hybrid connection into datagrams.
#[derive(Default)]
pub(crate) struct Decoder {
    buffer: BytesMut,
}

impl Decoder {
    pub(crate) fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// Bytes received that are not yet a whole datagram.
    pub(crate) fn buffered(&self) -> usize {
        self.buffer.len()
    }

    pub(crate) fn next_datagram(&mut self) -> Option<Bytes> {
        let len = usize::from(u16::from_be_bytes([
            *self.buffer.first()?,
            *self.buffer.get(1)?,
        ]));
        if self.buffer.len() < 2 + len {
            return None;
        }
        self.buffer.advance(2);
        Some(self.buffer.split_to(len).freeze())
    }
}

/// Milliseconds since `start`, for idle tracking shared by a route's two directions.
struct Activity {
    start: Instant,
    last: AtomicU64,
}

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Activity {
            start: Instant::now(),
            last: AtomicU64::new(0),
        })
    }

    fn touch(&self) {
        self.last
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn idle(&self) -> std::time::Duration {
        let now = self.start.elapsed().as_millis() as u64;
        std::time::Duration::from_millis(now.saturating_sub(self.last.load(Ordering::Relaxed)))
    }
}

/// Reads datagram frames from the relay and hands each to `deliver`, until the relay's side
/// ends.
async fn relay_to_socket<F, Fut>(
    mut receiver: WsReceiver,
    leftover: BytesMut,
    activity: Arc<Activity>,
    metrics: BindingMetrics,
    mut deliver: F,
) where
    F: FnMut(Bytes) -> Fut,
    Fut: std::future::Future<Output = std::io::Result<usize>>,
{
    let mut decoder = Decoder::default();
    decoder.push(&leftover);
    loop {
        while let Some(datagram) = decoder.next_datagram() {
            activity.touch();
            metrics.datagrams_from_relay.inc();
            metrics.from_relay.inc_by(datagram.len() as u64);
            if let Err(error) = deliver(datagram).await {
                debug!(%error, "delivering a datagram failed");
            }
        }
        match receiver.next().await {
            Ok(Incoming::Data { payload, .. }) => decoder.push(&payload),
            Ok(Incoming::Pong) => {}
            Ok(Incoming::Close { .. }) | Err(_) => return,
        }
    }
}

/// Sends datagrams from `queue` to the relay until the queue closes, the relay's side ends
/// (`reader` finishes) or the route is idle too long.
async fn socket_to_relay(
    sender: &WsSender,
    queue: &mut mpsc::Receiver<Bytes>,
    reader: &mut tokio::task::JoinHandle<()>,
    activity: &Activity,
    metrics: &BindingMetrics,
    idle_limit: std::time::Duration,
) {
    let mut check = tokio::time::interval(idle_limit.min(std::time::Duration::from_secs(5)));
    loop {
        tokio::select! {
            datagram = queue.recv() => {
                let Some(datagram) = datagram else { break };
                let Some(mut framed) = frame(&datagram) else { continue };
                activity.touch();
                metrics.datagrams_to_relay.inc();
                metrics.to_relay.inc_by(datagram.len() as u64);
                if sender.send_binary(&mut framed).await.is_err() {
                    break;
                }
            }
            _ = &mut *reader => return,
            _ = check.tick() => {
                if activity.idle() >= idle_limit {
                    debug!("UDP route idle; closing it");
                    break;
                }
            }
        }
    }
    let _ = sender.close(1000, "").await;
}

/// A `-L` UDP binding: one route (hybrid connection) per source address.
pub(crate) async fn serve_local(socket: UdpSocket, binding: Arc<LocalBindingContext>) {
    let socket = Arc::new(socket);
    let mut routes: HashMap<SocketAddr, mpsc::Sender<Bytes>> = HashMap::new();
    let mut buffer = vec![0u8; 65536];
    loop {
        let (n, source) = match socket.recv_from(&mut buffer).await {
            Ok(received) => received,
            Err(error) => {
                // ICMP errors of earlier sends surface here on some systems: keep going.
                debug!(%error, "UDP receive failed");
                continue;
            }
        };
        let datagram = Bytes::copy_from_slice(&buffer[..n]);
        let route = routes
            .get(&source)
            .filter(|route| !route.is_closed())
            .cloned();
        let route = match route {
            Some(route) => route,
            None => {
                routes.retain(|_, route| !route.is_closed());
                let (queue, receiver) = mpsc::channel(QUEUE);
                tokio::spawn(local_route(
                    source,
                    receiver,
                    socket.clone(),
                    binding.clone(),
                ));
                routes.insert(source, queue.clone());
                queue
            }
        };
        if route.try_send(datagram).is_err() {
            binding.metrics.failure("datagram_dropped");
        }
    }
}

async fn local_route(
    source: SocketAddr,
    mut queue: mpsc::Receiver<Bytes>,
    socket: Arc<UdpSocket>,
    binding: Arc<LocalBindingContext>,
) {
    let (receiver, sender, leftover) = match local::open(&binding, Mode::Datagram).await {
        Ok(opened) => opened,
        Err(error) => {
            binding.metrics.failure(error.label());
            debug!(%source, %error, "UDP route not opened; dropping its datagrams for a moment");
            // Hold the route so that a burst does not open a connection per datagram.
            let _ = tokio::time::timeout(binding.link.settings.udp_retry_after, async {
                while queue.recv().await.is_some() {
                    binding.metrics.failure("datagram_dropped");
                }
            })
            .await;
            return;
        }
    };
    binding.metrics.connections.inc();
    binding.metrics.opened();
    let activity = Activity::new();
    activity.touch();
    let mut reader = tokio::spawn(relay_to_socket(
        receiver,
        leftover,
        activity.clone(),
        binding.metrics.clone(),
        move |datagram| {
            let socket = socket.clone();
            async move { socket.send_to(&datagram, source).await }
        },
    ));
    socket_to_relay(
        &sender,
        &mut queue,
        &mut reader,
        &activity,
        &binding.metrics,
        binding.link.settings.udp_idle,
    )
    .await;
    reader.abort();
    binding.metrics.closed();
}

/// A `-T` UDP binding's side of one route: a UDP socket connected to the target.
pub(crate) async fn serve_remote(
    binding: &RemoteBinding,
    receiver: WsReceiver,
    sender: WsSender,
    leftover: BytesMut,
    metrics: BindingMetrics,
    link: &Link,
) {
    let socket = match connected_socket(binding).await {
        Ok(socket) => Arc::new(socket),
        Err(error) => {
            metrics.failure("target_unreachable");
            warn!(target = %binding, %error, "cannot reach the UDP target");
            let _ = sender.close(1000, "").await;
            return;
        }
    };
    if sender
        .send_binary(&mut Reply::Accepted(Mode::Datagram).bytes())
        .await
        .is_err()
    {
        return;
    }
    metrics.connections.inc();
    metrics.opened();
    let activity = Activity::new();
    activity.touch();
    let to_target = socket.clone();
    let mut reader = tokio::spawn(relay_to_socket(
        receiver,
        leftover,
        activity.clone(),
        metrics.clone(),
        move |datagram| {
            let socket = to_target.clone();
            async move { socket.send(&datagram).await }
        },
    ));
    // Datagrams from the target go into a queue like a -L route's, so both use one loop.
    let (queue_sender, mut queue) = mpsc::channel(QUEUE);
    let from_target = tokio::spawn(async move {
        let mut buffer = vec![0u8; 65536];
        loop {
            match socket.recv(&mut buffer).await {
                Ok(n) => {
                    if queue_sender
                        .send(Bytes::copy_from_slice(&buffer[..n]))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                // ECONNREFUSED from an earlier send: the target is not up (yet).
                Err(error) => debug!(%error, "UDP receive from the target failed"),
            }
        }
    });
    socket_to_relay(
        &sender,
        &mut queue,
        &mut reader,
        &activity,
        &metrics,
        link.settings.udp_idle,
    )
    .await;
    from_target.abort();
    reader.abort();
    metrics.closed();
}

async fn connected_socket(binding: &RemoteBinding) -> std::io::Result<UdpSocket> {
    let mut last = std::io::Error::other("no address");
    for address in remote::target_addresses(binding).await? {
        let local: SocketAddr = if address.is_ipv4() {
            "0.0.0.0:0".parse().expect("literal")
        } else {
            "[::]:0".parse().expect("literal")
        };
        match UdpSocket::bind(local).await {
            Ok(socket) => match socket.connect(address).await {
                Ok(()) => return Ok(socket),
                Err(error) => last = error,
            },
            Err(error) => last = error,
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_length_prefixed_and_decode_across_message_boundaries() {
        let mut stream = Vec::new();
        for payload in [&b"one"[..], b"", b"three!"] {
            stream.extend(frame(payload).unwrap());
        }
        assert_eq!(&stream[..5], b"\x00\x03one");
        let mut decoder = Decoder::default();
        let mut out = Vec::new();
        for byte in stream.chunks(2) {
            decoder.push(byte);
            while let Some(datagram) = decoder.next_datagram() {
                out.push(datagram);
            }
        }
        assert_eq!(out, [&b"one"[..], b"", b"three!"]);
        assert!(frame(&vec![0; 65536]).is_none());
    }
}
