//! The byte pump between a TCP connection and a hybrid connection.
//!
//! Each direction ends on its own: the TCP peer's FIN becomes a WebSocket Close (azbridge's
//! `hybridConnectionStream.Shutdown()`), the relay's Close becomes a TCP FIN
//! (`socket.Shutdown(SocketShutdown.Send)`), and the other direction carries on. Each write
//! completes before the next read, so a slow reader slows the writer down (back-pressure)
//! instead of filling memory. An error in either direction resets the TCP connection.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::reset_on_drop;
use crate::bridge::metrics::BindingMetrics;
use crate::bridge::ws::{Incoming, WsError, WsReceiver, WsSender};

/// Bytes per read from TCP and per WebSocket message (one TLS record holds 16 KiB).
pub(crate) const CHUNK: usize = 32 * 1024;

#[derive(Debug, thiserror::Error)]
pub(crate) enum PumpError {
    #[error("TCP: {0}")]
    Tcp(#[from] std::io::Error),
    #[error("relay: {0}")]
    Relay(#[from] WsError),
}

/// Carries bytes both ways until both directions have ended. `leftover` is payload that
/// arrived with the preamble. `keepalive`: ping the relay when the TCP side is idle this
/// long (a NAT or load balancer must not drop a quiet connection).
pub(crate) async fn pump(
    tcp: TcpStream,
    mut receiver: WsReceiver,
    sender: WsSender,
    leftover: BytesMut,
    metrics: &BindingMetrics,
    keepalive: Duration,
) -> Result<(), PumpError> {
    let (tcp_read, mut tcp_write) = tcp.into_split();
    let upstream = async {
        let mut ticker =
            tokio::time::interval_at(tokio::time::Instant::now() + keepalive, keepalive);
        loop {
            tokio::select! {
                readable = tcp_read.readable() => readable?,
                _ = ticker.tick() => {
                    sender.ping().await?;
                    continue;
                }
            }
            // The buffer lives only while data flows: an idle connection holds none.
            let mut buffer = vec![0u8; CHUNK];
            loop {
                match tcp_read.try_read(&mut buffer) {
                    Ok(0) => {
                        sender.close(1000, "").await?;
                        return Ok::<(), PumpError>(());
                    }
                    Ok(n) => {
                        metrics.to_relay.inc_by(n as u64);
                        sender.send_binary(&mut buffer[..n]).await?;
                        ticker.reset();
                    }
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(error) => return Err(error.into()),
                }
            }
        }
    };
    let downstream = async {
        if !leftover.is_empty() {
            metrics.from_relay.inc_by(leftover.len() as u64);
            tcp_write.write_all(&leftover).await?;
        }
        loop {
            match receiver.next().await? {
                Incoming::Data { payload, .. } => {
                    metrics.from_relay.inc_by(payload.len() as u64);
                    tcp_write.write_all(&payload).await?;
                }
                Incoming::Close { .. } => {
                    tcp_write.shutdown().await?;
                    return Ok::<(), PumpError>(());
                }
                Incoming::Pong => {}
            }
        }
    };
    let result = tokio::try_join!(upstream, downstream);
    if result.is_err()
        && let Ok(tcp) = tcp_read.reunite(tcp_write)
    {
        reset_on_drop(&tcp);
    }
    result.map(|_| ())
}
