//! The azbridge wire codecs of `kips bridge`. The first byte picks one:
//!
//! - even: the preamble. Any bytes parse as incomplete, unsupported or a request whose
//!   preamble length is within the input and exactly 4 + the name's length byte; growing an
//!   incomplete input never turns an earlier verdict into another one; a request's name
//!   encoded again gives a preamble that parses to the same request. Every 3-byte reply that
//!   parses encodes back to itself.
//! - odd: datagram framing. The rest is split into chunks (the second byte picks the size) as
//!   WebSocket messages might arrive; the decoder returns datagrams no longer than 65,535
//!   bytes, keeps the rest buffered, and returns the same datagrams whatever the chunking;
//!   framing each datagram again gives back the bytes it consumed.
#![no_main]

use kips::fuzzing::{
    decode_datagrams, frame_datagram, parse_preamble, preamble_reply_round_trip, preamble_request,
};
use libfuzzer_sys::fuzz_target;

fn preamble(bytes: &[u8]) {
    let verdict = parse_preamble(bytes);
    match &verdict {
        None => {}
        Some(Err(())) => assert!(bytes.len() >= 3, "unsupported after {} bytes", bytes.len()),
        Some(Ok((datagram, name, consumed))) => {
            assert!(
                *consumed <= bytes.len(),
                "consumed {consumed} of {}",
                bytes.len()
            );
            assert_eq!(*consumed, 4 + usize::from(bytes[3]));
            // A lossy name may grow (U+FFFD is 3 bytes); only names within 255 re-encode.
            if name.len() <= 255 && std::str::from_utf8(&bytes[4..*consumed]).is_ok() {
                let encoded = preamble_request(*datagram, name);
                assert_eq!(&encoded[..], &bytes[..*consumed]);
                assert_eq!(
                    parse_preamble(&encoded),
                    verdict
                        .clone()
                        .map(|v| v.map(|(d, n, _)| (d, n, encoded.len())))
                );
            }
        }
    }
    // Every prefix is incomplete or already the same verdict.
    for cut in 0..bytes.len().min(300) {
        let earlier = parse_preamble(&bytes[..cut]);
        assert!(
            earlier.is_none() || earlier == verdict,
            "{:?} at {cut} bytes, {verdict:?} at {}",
            earlier,
            bytes.len()
        );
    }
    if let Some(reply) = bytes.get(..3) {
        let reply = [reply[0], reply[1], reply[2]];
        if let Some(encoded) = preamble_reply_round_trip(reply) {
            assert_eq!(encoded, reply);
        }
    }
}

fn datagrams(chunk_size: usize, stream: &[u8]) {
    let chunked: Vec<&[u8]> = stream.chunks(chunk_size.max(1)).collect();
    let (datagrams, left) = decode_datagrams(chunked.iter().copied());
    let (whole, left_whole) = decode_datagrams([stream]);
    assert_eq!(datagrams, whole, "the chunking changed the datagrams");
    assert_eq!(left, left_whole);
    let mut framed = Vec::new();
    for datagram in &datagrams {
        assert!(datagram.len() <= 65_535);
        framed.extend(frame_datagram(datagram).expect("a decoded datagram frames again"));
    }
    assert_eq!(framed.len() + left, stream.len());
    assert_eq!(&framed[..], &stream[..framed.len()]);
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    if selector % 2 == 0 {
        preamble(rest);
    } else if let Some((&size, stream)) = rest.split_first() {
        datagrams(usize::from(size), stream);
    }
});
