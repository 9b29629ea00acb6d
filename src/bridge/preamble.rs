//! azbridge's preamble: the first bytes of every hybrid connection it opens.
//!
//! Read from azbridge 0.16.1 (`TcpLocalForwardBridge.cs`, `UdpLocalForwardBridge.cs`,
//! `RemoteForwardBridge.cs`): the sender writes `[1, 0, mode, len]` and `len` bytes of UTF-8
//! port name (mode 0: byte stream, 1: datagrams); the listener answers `[1, 0, mode]` to
//! accept, `[0, 0, 0]` for a version it does not speak, `[0, 0, 1]` when the named port is
//! UDP but the mode is stream, `[0, 0, 255]` for the reverse, and closes without a word when
//! the name is unknown. With exactly one forwarder and a numeric name, that forwarder is
//! used whatever the name.

use super::grammar::RemoteBinding;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    Stream,
    Datagram,
}

impl Mode {
    fn byte(self) -> u8 {
        match self {
            Mode::Stream => 0,
            Mode::Datagram => 1,
        }
    }
}

/// The sender's preamble for `name` (at most 255 bytes: port names are).
pub fn request(mode: Mode, name: &str) -> Vec<u8> {
    let name = name.as_bytes();
    let len = u8::try_from(name.len()).expect("port names are at most 255 bytes");
    let mut bytes = Vec::with_capacity(4 + name.len());
    bytes.extend_from_slice(&[1, 0, mode.byte(), len]);
    bytes.extend_from_slice(name);
    bytes
}

/// What the listener found at the start of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParsedRequest {
    /// Not enough bytes yet.
    Incomplete,
    /// Not version 1.0 (or an unknown mode): answer [`Reply::UnsupportedVersion`].
    UnsupportedVersion,
    /// A request; `consumed` bytes belong to the preamble, the rest is payload.
    Request {
        mode: Mode,
        name: String,
        consumed: usize,
    },
}

pub fn parse_request(bytes: &[u8]) -> ParsedRequest {
    let Some(head) = bytes.get(..3) else {
        return ParsedRequest::Incomplete;
    };
    let mode = match head {
        [1, 0, 0] => Mode::Stream,
        [1, 0, 1] => Mode::Datagram,
        _ => return ParsedRequest::UnsupportedVersion,
    };
    let Some(&len) = bytes.get(3) else {
        return ParsedRequest::Incomplete;
    };
    let consumed = 4 + usize::from(len);
    match bytes.get(4..consumed) {
        Some(name) => ParsedRequest::Request {
            mode,
            // azbridge decodes with Encoding.UTF8.GetString, which replaces bad sequences.
            name: String::from_utf8_lossy(name).into_owned(),
            consumed,
        },
        None => ParsedRequest::Incomplete,
    }
}

/// The listener's 3-byte answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    Accepted(Mode),
    UnsupportedVersion,
    /// The named port is UDP; the sender asked for a stream.
    PortIsDatagram,
    /// The named port is TCP; the sender asked for datagrams.
    PortIsStream,
}

impl Reply {
    pub fn bytes(self) -> [u8; 3] {
        match self {
            Reply::Accepted(mode) => [1, 0, mode.byte()],
            Reply::UnsupportedVersion => [0, 0, 0],
            Reply::PortIsDatagram => [0, 0, 1],
            Reply::PortIsStream => [0, 0, 255],
        }
    }

    pub fn parse(bytes: [u8; 3]) -> Option<Reply> {
        Some(match bytes {
            [1, 0, 0] => Reply::Accepted(Mode::Stream),
            [1, 0, 1] => Reply::Accepted(Mode::Datagram),
            [0, 0, 0] => Reply::UnsupportedVersion,
            [0, 0, 1] => Reply::PortIsDatagram,
            [0, 0, 255] => Reply::PortIsStream,
            _ => return None,
        })
    }
}

/// Where a listener sends a request, by azbridge's rules.
#[derive(Debug, PartialEq, Eq)]
pub enum Route<'a> {
    Accept(&'a RemoteBinding),
    /// Answer this and close.
    Refuse(Reply),
    /// Close without answering (azbridge's answer to an unknown name).
    Unknown,
}

pub fn route<'a>(bindings: &'a [RemoteBinding], mode: Mode, name: &str) -> Route<'a> {
    // .NET's int.TryParse: optional whitespace and sign, then digits.
    let numeric = name.trim().parse::<i32>().is_ok();
    let binding = match bindings {
        [only] if numeric => Some(only),
        _ => bindings.iter().find(|b| b.effective_name() == name),
    };
    match binding {
        None => Route::Unknown,
        Some(binding) if binding.port.udp && mode == Mode::Stream => {
            Route::Refuse(Reply::PortIsDatagram)
        }
        Some(binding) if !binding.port.udp && mode == Mode::Datagram => {
            Route::Refuse(Reply::PortIsStream)
        }
        Some(binding) => Route::Accept(binding),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bridge::grammar::RemoteForward;

    #[test]
    fn requests_are_version_mode_length_name() {
        assert_eq!(request(Mode::Stream, "http"), b"\x01\x00\x00\x04http");
        assert_eq!(request(Mode::Datagram, "53U"), b"\x01\x00\x01\x0353U");
    }

    #[test]
    fn parsing_waits_for_the_whole_name_and_leaves_the_payload() {
        let mut bytes = request(Mode::Stream, "grpc");
        bytes.extend_from_slice(b"payload");
        for cut in 0..8 {
            assert_eq!(
                parse_request(&bytes[..cut]),
                ParsedRequest::Incomplete,
                "{cut}"
            );
        }
        assert_eq!(
            parse_request(&bytes),
            ParsedRequest::Request {
                mode: Mode::Stream,
                name: "grpc".into(),
                consumed: 8
            }
        );
        assert_eq!(
            parse_request(&[2, 0, 0, 0]),
            ParsedRequest::UnsupportedVersion
        );
        assert_eq!(
            parse_request(&[1, 0, 7, 0]),
            ParsedRequest::UnsupportedVersion
        );
    }

    #[test]
    fn replies_round_trip() {
        for reply in [
            Reply::Accepted(Mode::Stream),
            Reply::Accepted(Mode::Datagram),
            Reply::UnsupportedVersion,
            Reply::PortIsDatagram,
            Reply::PortIsStream,
        ] {
            assert_eq!(Reply::parse(reply.bytes()), Some(reply));
        }
        assert_eq!(Reply::parse([1, 1, 0]), None);
    }

    #[test]
    fn routing_follows_azbridge() {
        let forward: RemoteForward = "api:http/8080;53U;grpc/9090".parse().unwrap();
        let b = &forward.bindings;
        assert_eq!(route(b, Mode::Stream, "http"), Route::Accept(&b[0]));
        assert_eq!(route(b, Mode::Datagram, "53U"), Route::Accept(&b[1]));
        assert_eq!(
            route(b, Mode::Stream, "53U"),
            Route::Refuse(Reply::PortIsDatagram)
        );
        assert_eq!(
            route(b, Mode::Datagram, "grpc"),
            Route::Refuse(Reply::PortIsStream)
        );
        assert_eq!(route(b, Mode::Stream, "HTTP"), Route::Unknown);
        assert_eq!(route(b, Mode::Stream, "8080"), Route::Unknown);
        // One forwarder takes every numeric name.
        let single: RemoteForward = "api:http/8080".parse().unwrap();
        let s = &single.bindings;
        assert_eq!(route(s, Mode::Stream, "15100"), Route::Accept(&s[0]));
        assert_eq!(route(s, Mode::Stream, "other"), Route::Unknown);
    }
}
