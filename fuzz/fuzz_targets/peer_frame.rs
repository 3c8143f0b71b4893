//! Arbitrary bytes through the peer frame decoder (`proto::peer`): it must
//! never panic, never hand up a frame over its cap, and every frame it
//! accepts must encode back to exactly the bytes it was decoded from.
//!
//! Raw input rarely gets past the header crc, so in the other mode the input
//! is cut into (kind, flags, body) pieces that are framed with correct
//! crcs: the fuzzer then explores the body parsers.
#![no_main]

use basalt::proto::peer::{Decoder, FrameBuf, MAGIC, MAX_DATA};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

/// Frames pieces of `input`: kind (1 byte, an index near the real kinds),
/// flags (1 byte), body length (2 bytes), body.
fn framed(mut input: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while input.len() >= 4 {
        let kind = u16::from(input[0]) % 48;
        let flags = u32::from(input[1] & 3);
        let len = (u16::from_le_bytes([input[2], input[3]]) as usize).min(input.len() - 4);
        let body = &input[4..4 + len];
        input = &input[4 + len..];
        let start = out.len();
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&1u16.to_le_bytes());
        out.extend_from_slice(&kind.to_le_bytes());
        out.extend_from_slice(&flags.to_le_bytes());
        out.extend_from_slice(&(len as u32).to_le_bytes());
        out.extend_from_slice(&(out.len() as u64).to_le_bytes());
        out.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
        let h = crc32c::crc32c(&out[start..start + 28]);
        out.extend_from_slice(&h.to_le_bytes());
        out.extend_from_slice(body);
    }
    out
}

fuzz_target!(|input: &[u8]| {
    let Some((&mode, rest)) = input.split_first() else { return };
    // A small cap most of the time, so oversize paths are reached too.
    let cap = if mode & 1 != 0 { 1 << 16 } else { 4096 };
    let dec = Decoder::new(cap).copy_below(if mode & 2 != 0 { 1024 } else { 0 });
    let bytes = if mode & 4 != 0 { framed(rest) } else { rest.to_vec() };
    let mut buf = BytesMut::from(&bytes[..]);
    let mut at = 0;
    while let Ok(Some(frame)) = dec.decode(&mut buf) {
        if let Some(d) = frame.message.data() {
            assert!(d.len() <= MAX_DATA.min(cap));
        }
        let mut out = FrameBuf::new();
        out.encode(frame.request_id, frame.flags, &frame.message).unwrap();
        let enc = out.to_bytes();
        assert!(enc.len() <= cap);
        assert_eq!(&enc[..], &bytes[at..at + enc.len()]);
        at += enc.len();
    }
});
