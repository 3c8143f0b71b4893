//! Arbitrary bytes through the peer frame decoder (`proto::peer`): it must
//! never panic, never hand up a frame over its cap, and every frame it
//! accepts must encode back to exactly the bytes it was decoded from.
#![no_main]

use basalt::proto::peer::{Decoder, FrameBuf, MAX_DATA};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Some((&mode, rest)) = input.split_first() else { return };
    // A small cap most of the time, so oversize paths are reached too.
    let cap = if mode & 1 != 0 { 1 << 16 } else { 4096 };
    let dec = Decoder::new(cap).copy_below(if mode & 2 != 0 { 1024 } else { 0 });
    let mut buf = BytesMut::from(rest);
    let mut at = 0;
    while let Ok(Some(frame)) = dec.decode(&mut buf) {
        if let Some(d) = frame.message.data() {
            assert!(d.len() <= MAX_DATA.min(cap));
        }
        let mut out = FrameBuf::new();
        out.encode(frame.request_id, frame.flags, &frame.message).unwrap();
        let bytes = out.to_bytes();
        assert!(bytes.len() <= cap);
        assert_eq!(&bytes[..], &rest[at..at + bytes.len()]);
        at += bytes.len();
    }
});
