//! WebSockets for the bridge and the test relay: the HTTP/1.1 upgrade through hyper, frames
//! through fastwebsockets.
//!
//! Each side may keep sending after the other's Close: azbridge's stream pump turns a TCP
//! half-close into a WebSocket Close (`CloseOutputAsync`) and goes on reading, so a Close
//! received means "no more data from the peer", not "stop". Nothing here answers a Close
//! on its own; the owner sends its Close when it has nothing more to send. Pings are
//! answered at once.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::{Bytes, BytesMut};
use fastwebsockets::{Frame, OpCode, Payload, Role, WebSocketError, WebSocketRead, WebSocketWrite};
use http_body_util::Empty;
use hyper::StatusCode;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};
use tokio::sync::Mutex;

pub(crate) type Io = TokioIo<Upgraded>;
type Reader = WebSocketRead<CappedRead<ReadHalf<Io>>>;
type Writer = WebSocketWrite<WriteHalf<Io>>;

/// Frames larger than this are refused (azbridge writes at most 64 KiB; control messages
/// are small).
const MAX_MESSAGE: usize = 16 * 1024 * 1024;

const ACCEPT_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The most one read hands the frame reader: a TLS record's worth.
const READ_CAP: usize = 16 * 1024;

/// Hands at most [`READ_CAP`] bytes per read. fastwebsockets reads into all the spare room
/// of its buffer and grows the buffer when a read fills it; a TLS stream fills whatever room
/// it is given, so with a fast sender the buffer doubled without end (measured: megabytes
/// per connection). Reads of a record's size keep it at a few tens of KiB.
pub(crate) struct CappedRead<R> {
    inner: R,
}

impl<R: AsyncRead + Unpin> AsyncRead for CappedRead<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if buf.remaining() <= READ_CAP {
            return std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let mut small = buf.take(READ_CAP);
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, &mut small);
        let filled = small.filled().len();
        // SAFETY: `small` views `buf`'s unfilled part; the inner reader initialised and
        // filled its first `filled` bytes.
        unsafe { buf.assume_init(filled) };
        buf.advance(filled);
        polled
    }
}

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key` (RFC 6455 §4.2.2): the one computation
/// both the client check and the relay's answer use.
pub(crate) fn accept_key(key: &[u8]) -> String {
    let mut context = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    context.update(key);
    context.update(ACCEPT_GUID.as_bytes());
    BASE64.encode(context.finish().as_ref())
}

#[derive(Debug, thiserror::Error)]
pub enum WsError {
    #[error("WebSocket: {0}")]
    Protocol(#[from] WebSocketError),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("the server answered {status} {description}")]
    Refused { status: u16, description: String },
    #[error("the server's WebSocket handshake is invalid: {0}")]
    BadHandshake(&'static str),
}

/// The sending half, shared by the reader (which answers pings) and the owner.
#[derive(Clone)]
pub(crate) struct WsSender {
    writer: Arc<Mutex<Writer>>,
}

/// The receiving half.
pub(crate) struct WsReceiver {
    reader: Reader,
    sender: WsSender,
}

/// What arrived.
#[derive(Debug)]
pub(crate) enum Incoming {
    /// A data frame's payload; `opcode` is Binary, Text or Continuation, `fin` ends a
    /// message.
    Data {
        payload: BytesMut,
        opcode: OpCode,
        fin: bool,
    },
    /// The peer sends nothing more.
    Close { code: Option<u16>, reason: String },
    /// An answer to our ping.
    Pong,
}

fn split(io: Io, role: Role) -> (WsReceiver, WsSender) {
    let (read, write) = tokio::io::split(io);
    let read = CappedRead { inner: read };
    let (mut reader, writer) = fastwebsockets::after_handshake_split(read, write, role);
    reader.set_auto_close(false);
    reader.set_auto_pong(false);
    reader.set_max_message_size(MAX_MESSAGE);
    let sender = WsSender {
        writer: Arc::new(Mutex::new(writer)),
    };
    (
        WsReceiver {
            reader,
            sender: sender.clone(),
        },
        sender,
    )
}

impl WsReceiver {
    /// The next data frame, Close or Pong. Pings are answered here.
    pub(crate) async fn next(&mut self) -> Result<Incoming, WsError> {
        loop {
            let frame = self
                .reader
                .read_frame(&mut |_: Frame<'_>| {
                    std::future::ready(Ok::<(), std::convert::Infallible>(()))
                })
                .await?;
            let payload = match frame.payload {
                Payload::Bytes(bytes) => bytes,
                other => BytesMut::from(&other[..]),
            };
            match frame.opcode {
                OpCode::Binary | OpCode::Continuation | OpCode::Text => {
                    return Ok(Incoming::Data {
                        opcode: frame.opcode,
                        fin: frame.fin,
                        payload,
                    });
                }
                OpCode::Close => {
                    let code = payload.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]]));
                    let reason = payload
                        .get(2..)
                        .map(|r| String::from_utf8_lossy(r).into_owned())
                        .unwrap_or_default();
                    return Ok(Incoming::Close { code, reason });
                }
                // After our own Close nothing can be sent, a pong included: that is no error.
                OpCode::Ping => {
                    let _ = self.sender.pong(payload).await;
                }
                OpCode::Pong => return Ok(Incoming::Pong),
            }
        }
    }

    /// A whole text message (control channel messages are small).
    pub(crate) async fn next_text(&mut self) -> Result<TextOrControl, WsError> {
        let mut message = BytesMut::new();
        loop {
            match self.next().await? {
                Incoming::Data { payload, fin, .. } => {
                    message.extend_from_slice(&payload);
                    if fin {
                        return Ok(TextOrControl::Text(message.freeze()));
                    }
                }
                Incoming::Close { code, reason } => {
                    return Ok(TextOrControl::Close { code, reason });
                }
                Incoming::Pong => return Ok(TextOrControl::Pong),
            }
        }
    }
}

pub(crate) enum TextOrControl {
    Text(Bytes),
    Close { code: Option<u16>, reason: String },
    Pong,
}

impl WsSender {
    async fn write(&self, frame: Frame<'_>) -> Result<(), WsError> {
        let mut writer = self.writer.lock().await;
        writer.write_frame(frame).await?;
        // rustls may hold the record until the next write; nothing else would flush it.
        writer.flush().await?;
        Ok(())
    }

    /// One binary message. The buffer is masked in place by a client (its contents are
    /// garbage afterwards): no copy per frame.
    pub(crate) async fn send_binary(&self, data: &mut [u8]) -> Result<(), WsError> {
        self.write(Frame::binary(Payload::BorrowedMut(data))).await
    }

    /// Sends a frame as received (the relay passes frames through unchanged).
    pub(crate) async fn send_frame(
        &self,
        opcode: OpCode,
        fin: bool,
        data: &mut [u8],
    ) -> Result<(), WsError> {
        self.write(Frame::new(fin, opcode, None, Payload::BorrowedMut(data)))
            .await
    }

    pub(crate) async fn send_text(&self, text: &str) -> Result<(), WsError> {
        let mut bytes = text.as_bytes().to_vec();
        self.write(Frame::text(Payload::BorrowedMut(&mut bytes)))
            .await
    }

    pub(crate) async fn ping(&self) -> Result<(), WsError> {
        self.write(Frame::new(
            true,
            OpCode::Ping,
            None,
            Payload::Owned(Vec::new()),
        ))
        .await
    }

    async fn pong(&self, payload: BytesMut) -> Result<(), WsError> {
        self.write(Frame::pong(Payload::Bytes(payload))).await
    }

    /// Sends Close (once; later calls do nothing). After it, nothing more can be sent.
    pub(crate) async fn close(&self, code: u16, reason: &str) -> Result<(), WsError> {
        let mut writer = self.writer.lock().await;
        if writer.is_closed() {
            return Ok(());
        }
        writer
            .write_frame(Frame::close(code, reason.as_bytes()))
            .await?;
        writer.flush().await?;
        Ok(())
    }
}

/// A WebSocket client handshake on `io` (already TLS): `GET path_and_query` with `headers`.
/// A refusal keeps the status and the reason phrase (the relay explains itself there).
pub(crate) async fn connect<S>(
    io: S,
    host: &str,
    path_and_query: &str,
    headers: &[(HeaderName, HeaderValue)],
) -> Result<(WsReceiver, WsSender, HeaderMap), WsError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let key = BASE64.encode(rand::random::<[u8; 16]>());
    let mut request = hyper::Request::get(path_and_query)
        .header(header::HOST, host)
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "Upgrade")
        .header(header::SEC_WEBSOCKET_KEY, &key)
        .header(header::SEC_WEBSOCKET_VERSION, "13")
        .body(Empty::<Bytes>::new())
        .map_err(|_| WsError::BadHandshake("the request URL or a header is invalid"))?;
    for (name, value) in headers {
        request.headers_mut().insert(name.clone(), value.clone());
    }
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        // Ends once the upgrade hands the connection over (or the request fails).
        let _ = connection.with_upgrades().await;
    });
    let mut response = sender.send_request(request).await?;
    let status = response.status();
    if status != StatusCode::SWITCHING_PROTOCOLS {
        let description = response
            .extensions()
            .get::<hyper::ext::ReasonPhrase>()
            .map(|r| String::from_utf8_lossy(r.as_bytes()).into_owned())
            .or_else(|| status.canonical_reason().map(str::to_owned))
            .unwrap_or_default();
        return Err(WsError::Refused {
            status: status.as_u16(),
            description,
        });
    }
    let accept = response
        .headers()
        .get(header::SEC_WEBSOCKET_ACCEPT)
        .ok_or(WsError::BadHandshake("no Sec-WebSocket-Accept"))?;
    if accept.as_bytes() != accept_key(key.as_bytes()).as_bytes() {
        return Err(WsError::BadHandshake("wrong Sec-WebSocket-Accept"));
    }
    let headers = response.headers().clone();
    let upgraded = hyper::upgrade::on(&mut response).await?;
    let (receiver, sender) = split(TokioIo::new(upgraded), Role::Client);
    Ok((receiver, sender, headers))
}

/// The server side of an upgrade that hyper completed.
pub(crate) fn server(upgraded: Upgraded) -> (WsReceiver, WsSender) {
    split(TokioIo::new(upgraded), Role::Server)
}

/// The start of a 101 answer to a WebSocket upgrade request (the caller adds the body), or
/// why the request is not one.
pub(crate) fn upgrade_response(
    headers: &HeaderMap,
    protocol: Option<&HeaderValue>,
) -> Result<hyper::http::response::Builder, &'static str> {
    let is_upgrade = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if !is_upgrade {
        return Err("not a WebSocket upgrade");
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        return Err("Sec-WebSocket-Version must be 13");
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or("no Sec-WebSocket-Key")?;
    let mut response = hyper::Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "Upgrade")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept_key(key.as_bytes()));
    if let Some(protocol) = protocol {
        response = response.header(header::SEC_WEBSOCKET_PROTOCOL, protocol);
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_are_capped_at_a_records_size() {
        use tokio::io::AsyncReadExt;
        let data = vec![5u8; 100_000];
        let mut reader = CappedRead { inner: &data[..] };
        let mut buffer = BytesMut::with_capacity(1 << 20);
        let mut sizes = Vec::new();
        loop {
            match reader.read_buf(&mut buffer).await.unwrap() {
                0 => break,
                n => sizes.push(n),
            }
        }
        assert_eq!(buffer.len(), data.len());
        assert!(sizes.iter().all(|n| *n <= READ_CAP), "{sizes:?}");
        assert_eq!(sizes[0], READ_CAP);
    }

    #[test]
    fn the_accept_key_is_rfc_6455s_example() {
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}
