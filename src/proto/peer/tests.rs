//! Codec tests on byte arrays: every message round trips, and every way a
//! frame can be wrong has its own error.

use super::*;
use crate::types::{ClusterId, Epoch, ExtentIndex, Generation, NodeId, VolumeId};
use bytes::{Bytes, BytesMut};

fn target() -> ExtentTarget {
    ExtentTarget { volume: VolumeId(7), extent: ExtentIndex(3), epoch: Epoch(12), generation: Generation(5) }
}

fn pattern(len: usize) -> Bytes {
    (0..len).map(|i| (i * 31 % 251) as u8).collect::<Vec<_>>().into()
}

/// One of every message, with non-trivial field values.
fn every_message() -> Vec<Message> {
    let hello = Hello {
        version: ProtocolVersion::V1,
        cluster: ClusterId(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210),
        node: NodeId(42),
    };
    vec![
        Message::Hello(hello),
        Message::HelloAck(Hello { node: NodeId(43), ..hello }),
        Message::Refused(Refused { code: RefuseCode::WrongCluster, message: "wrong cluster é".into() }),
        Message::Refused(Refused { code: RefuseCode::VersionMismatch, message: String::new() }),
        Message::Refused(Refused { code: RefuseCode::ExpectedHello, message: "x".into() }),
        Message::Refused(Refused { code: RefuseCode::Malformed, message: "y".into() }),
        Message::Ping,
        Message::Pong,
        Message::error(ErrorCode::Malformed, "bad"),
        Message::error(ErrorCode::Unexpected, "u"),
        Message::error(ErrorCode::Unsupported, "s"),
        Message::error(ErrorCode::Internal, "i"),
        Message::error(ErrorCode::ShuttingDown, "d"),
        Message::Raft(pattern(300)),
        Message::Raft(Bytes::new()),
        Message::MetaRequest(pattern(5000)),
        Message::MetaResponse(pattern(17)),
        Message::ExtentWrite(ExtentWrite {
            target: target(),
            offset: 1 << 20,
            fua: true,
            copy: true,
            data: pattern(64 << 10),
        }),
        Message::ExtentWrite(ExtentWrite {
            target: target(),
            offset: 0,
            fua: false,
            copy: false,
            data: pattern(512),
        }),
        Message::ExtentRead(ExtentRead { target: target(), offset: 4096, len: 1 << 20 }),
        Message::ExtentReadReply(ExtentReadReply {
            crcs: Some(BlockCrcs { block_size: 4096, crcs: vec![1, 2, 3] }),
            data: pattern(3 * 4096 - 100),
        }),
        Message::ExtentReadReply(ExtentReadReply { crcs: None, data: pattern(8192) }),
        Message::ExtentWriteZeroes(ExtentWriteZeroes {
            target: target(),
            offset: 8192,
            len: 1 << 30,
            deallocate: true,
            fua: false,
        }),
        Message::ExtentWriteZeroes(ExtentWriteZeroes {
            target: target(),
            offset: 0,
            len: 512,
            deallocate: false,
            fua: true,
        }),
        Message::ExtentTrim(ExtentTrim { target: target(), offset: 4096, len: 4096, fua: true }),
        Message::ExtentFlush(ExtentFlush { target: target(), flush_number: 99 }),
        Message::ExtentStatus(target()),
        Message::ExtentStatusReply(ExtentState {
            exists: true,
            flush_number: 98,
            generation: Generation(4),
            epoch: Epoch(3),
            region_size: 1 << 20,
            dirty_regions: vec![0, 7, 255],
        }),
        Message::ExtentStatusReply(ExtentState::absent(Generation(9), Epoch(1))),
        Message::ExtentOk,
        Message::ExtentErr(ExtentErr {
            error: ExtentError::StaleEpoch { current: Epoch(13) },
            message: "old".into(),
        }),
        Message::ExtentErr(ExtentErr {
            error: ExtentError::StaleGeneration { current: Generation(6) },
            message: String::new(),
        }),
        Message::ExtentErr(ExtentErr { error: ExtentError::NotFound, message: "n".into() }),
        Message::ExtentErr(ExtentErr { error: ExtentError::OutOfRange, message: "r".into() }),
        Message::ExtentErr(ExtentErr { error: ExtentError::Io, message: "io".into() }),
        Message::ExtentErr(ExtentErr { error: ExtentError::Checksum, message: "crc".into() }),
        Message::ExtentErr(ExtentErr { error: ExtentError::Misaligned, message: "m".into() }),
        Message::ExtentErr(ExtentErr { error: ExtentError::NoSpace, message: "full".into() }),
        Message::ExtentCrcs(ExtentCrcs { target: target(), offset: 1 << 20, len: 256 << 20 }),
        Message::ExtentCrcsReply(BlockCrcs { block_size: 4096, crcs: vec![0xdead_beef, 1, 2, 3] }),
        Message::ExtentCrcsReply(BlockCrcs { block_size: 4096, crcs: Vec::new() }),
        // Appended, so the indexes other tests use stay put.
        Message::error(ErrorCode::Forbidden, "e"),
        Message::ExtentMap(ExtentMap { target: target(), offset: 4096, len: 64 << 20 }),
        Message::ExtentMapReply(vec![
            crate::types::MapExtent { len: 8192, state: crate::types::BlockState::DATA },
            crate::types::MapExtent { len: 1 << 20, state: crate::types::BlockState::HOLE },
            crate::types::MapExtent {
                len: 4096,
                state: crate::types::BlockState { allocated: true, zero: true },
            },
        ]),
        Message::ExtentMapReply(Vec::new()),
        Message::ExtentsDirty(ExtentsDirty {
            volume: crate::types::VolumeId(7),
            generation: crate::types::Generation(3),
            from: crate::types::ExtentIndex(0),
        }),
        Message::ExtentsDirtyReply(DirtyExtents {
            extents: vec![
                crate::types::ExtentIndex(0),
                crate::types::ExtentIndex(9),
                crate::types::ExtentIndex(1 << 40),
            ],
            more: false,
        }),
        Message::ExtentsDirtyReply(DirtyExtents { extents: Vec::new(), more: true }),
    ]
    .into_iter()
    .chain(every_volume_message())
    .collect()
}

/// A frame with correct crcs around an arbitrary header and payload.
fn raw(version: u16, kind: u16, flags: u32, id: u64, payload: &[u8]) -> BytesMut {
    let mut b = BytesMut::new();
    b.extend_from_slice(&MAGIC);
    b.extend_from_slice(&version.to_le_bytes());
    b.extend_from_slice(&kind.to_le_bytes());
    b.extend_from_slice(&flags.to_le_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    b.extend_from_slice(&id.to_le_bytes());
    b.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    let h = crc32c::crc32c(&b[..28]);
    b.extend_from_slice(&h.to_le_bytes());
    b.extend_from_slice(payload);
    b
}

fn body(kind: Kind, payload: &[u8]) -> BytesMut {
    raw(1, kind as u16, 0, 9, payload)
}

/// The body bytes of an encoded message.
fn body_of(m: &Message) -> Vec<u8> {
    encode_to_bytes(1, FrameFlags::NONE, m).unwrap()[HEADER_LEN..].to_vec()
}

fn decode_one(mut b: BytesMut) -> Result<Option<Frame>, DecodeError> {
    Decoder::default().decode(&mut b)
}

fn body_error(b: BytesMut) -> BodyError {
    match decode_one(b) {
        Err(DecodeError::Body { error, request_id: 9, .. }) => error,
        other => panic!("expected a body error, got {other:?}"),
    }
}

#[test]
fn every_message_round_trips_with_its_id_and_flags() {
    let dec = Decoder::default();
    for (i, m) in every_message().into_iter().enumerate() {
        let id = 1000 + i as u64;
        let flags = if i % 2 == 0 { FrameFlags::ONE_WAY } else { FrameFlags::NONE };
        let bytes = encode_to_bytes(id, flags, &m).unwrap();
        assert_eq!(bytes.len(), frame_len(&m), "{m:?}");
        let mut buf = BytesMut::from(&bytes[..]);
        let f = dec.decode(&mut buf).unwrap().unwrap();
        assert_eq!(f, Frame { request_id: id, flags, message: m.clone() });
        assert!(buf.is_empty());
    }
}

#[test]
fn a_batch_of_frames_decodes_in_order_and_segments_match_the_whole() {
    let mut fb = FrameBuf::new();
    let all = every_message();
    for (i, m) in all.iter().enumerate() {
        fb.encode(i as u64 + 1, FrameFlags::NONE, m).unwrap();
    }
    let total = fb.len();
    let segs = fb.segments().to_vec();
    assert_eq!(segs.iter().map(Bytes::len).sum::<usize>(), total);
    // Large data payloads are referenced, not copied into the batch.
    assert!(segs.iter().any(|s| s.len() == 64 << 10));
    let mut buf = BytesMut::new();
    for s in &segs {
        buf.extend_from_slice(s);
    }
    let dec = Decoder::default();
    for (i, m) in all.iter().enumerate() {
        let f = dec.decode(&mut buf).unwrap().unwrap();
        assert_eq!(f.request_id, i as u64 + 1);
        assert_eq!(&f.message, m);
    }
    assert_eq!(dec.decode(&mut buf), Ok(None));
}

#[test]
fn every_prefix_of_a_frame_is_not_yet_a_frame() {
    let m = Message::ExtentWrite(ExtentWrite {
        target: target(),
        offset: 0,
        fua: false,
        copy: false,
        data: pattern(100),
    });
    let bytes = encode_to_bytes(5, FrameFlags::NONE, &m).unwrap();
    let dec = Decoder::default();
    for n in 0..bytes.len() {
        let mut buf = BytesMut::from(&bytes[..n]);
        assert_eq!(dec.decode(&mut buf), Ok(None), "prefix of {n} bytes");
        assert_eq!(buf.len(), n, "nothing consumed");
    }
}

#[test]
fn the_header_layout_is_what_the_docs_say() {
    let b = encode_to_bytes(0x0102_0304_0506_0708, FrameFlags::ONE_WAY, &Message::Ping).unwrap();
    assert_eq!(&b[0..4], b"BASP");
    assert_eq!(&b[4..6], &[1, 0]);
    assert_eq!(&b[6..8], &[4, 0]);
    assert_eq!(&b[8..12], &[1, 0, 0, 0]);
    assert_eq!(&b[12..16], &[0, 0, 0, 0]);
    assert_eq!(&b[16..24], &[8, 7, 6, 5, 4, 3, 2, 1]);
    assert_eq!(&b[24..28], &crc32c::crc32c(&[]).to_le_bytes());
    assert_eq!(&b[28..32], &crc32c::crc32c(&b[..28]).to_le_bytes());
    assert_eq!(b.len(), HEADER_LEN);
}

#[test]
fn large_payloads_share_the_receive_buffer() {
    let m = Message::ExtentWrite(ExtentWrite {
        target: target(),
        offset: 0,
        fua: false,
        copy: false,
        data: pattern(1 << 20),
    });
    let bytes = encode_to_bytes(5, FrameFlags::NONE, &m).unwrap();
    let mut buf = BytesMut::from(&bytes[..]);
    let range = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.len();
    let f = Decoder::default().copy_below(64 << 10).decode(&mut buf).unwrap().unwrap();
    let Message::ExtentWrite(w) = f.message else { panic!() };
    assert!(range.contains(&(w.data.as_ptr() as usize)), "the data is a slice of the buffer");
    assert_eq!(w.data, pattern(1 << 20));
}

#[test]
fn small_payloads_are_copied_out_when_asked() {
    let m = Message::Raft(pattern(200));
    let bytes = encode_to_bytes(5, FrameFlags::ONE_WAY, &m).unwrap();
    let mut buf = BytesMut::from(&bytes[..]);
    let range = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.len();
    let f = Decoder::default().copy_below(64 << 10).decode(&mut buf).unwrap().unwrap();
    let Message::Raft(b) = f.message else { panic!() };
    assert!(!range.contains(&(b.as_ptr() as usize)), "a small payload must not pin the buffer");
    assert_eq!(b, pattern(200));
    assert!(buf.is_empty());
}

// --- one test per malformation of the frame

#[test]
fn bad_magic() {
    let mut b = body(Kind::Ping, &[]);
    b[0] = b'X';
    assert_eq!(decode_one(b), Err(DecodeError::BadMagic { found: *b"XASP" }));
}

#[test]
fn unknown_version_is_a_mismatch_naming_both_versions() {
    let b = raw(7, Kind::Hello as u16, 0, 1, &[]);
    let e = decode_one(b).unwrap_err();
    assert_eq!(e, DecodeError::VersionMismatch { ours: ProtocolVersion::V1, theirs: 7 });
    assert_eq!(e.to_string(), "peer speaks peer protocol version 7, this node speaks version 1");
    assert_eq!(e.request_id(), None);
    // Recognized from the first six bytes alone, whatever follows.
    let mut b = BytesMut::from(&b"BASP\x00\x00"[..]);
    b.resize(HEADER_LEN, 0xff);
    assert!(matches!(decode_one(b), Err(DecodeError::VersionMismatch { theirs: 0, .. })));
}

#[test]
fn header_checksum() {
    let mut b = body(Kind::Ping, &[]);
    b[16] ^= 1; // the request id, under the header crc
    assert!(matches!(decode_one(b), Err(DecodeError::HeaderChecksum { .. })));
}

#[test]
fn unknown_frame_flags() {
    let b = raw(1, Kind::Ping as u16, 6, 77, &[]);
    assert_eq!(decode_one(b), Err(DecodeError::UnknownFlags { flags: 6, request_id: 77 }));
}

#[test]
fn unknown_kind() {
    let b = raw(1, 999, 0, 78, &[]);
    let e = decode_one(b).unwrap_err();
    assert_eq!(e, DecodeError::UnknownKind { kind: 999, request_id: 78 });
    assert_eq!(e.request_id(), Some(78));
}

#[test]
fn oversize_is_refused_from_the_header_alone() {
    // A header claiming 4 GiB of payload, and none of it sent.
    let mut b = raw(1, Kind::ExtentWrite as u16, 0, 79, &[]);
    b[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    let h = crc32c::crc32c(&b[..28]);
    b[28..32].copy_from_slice(&h.to_le_bytes());
    assert_eq!(
        decode_one(b),
        Err(DecodeError::Oversize {
            len: HEADER_LEN as u64 + u32::MAX as u64,
            max: MAX_FRAME,
            request_id: 79
        })
    );
    // A decoder's own smaller cap, one byte over it.
    let dec = Decoder::new(4096);
    let mut b = raw(1, Kind::Raft as u16, 0, 80, &[]);
    b[12..16].copy_from_slice(&((4096 - HEADER_LEN + 1) as u32).to_le_bytes());
    let h = crc32c::crc32c(&b[..28]);
    b[28..32].copy_from_slice(&h.to_le_bytes());
    assert_eq!(dec.decode(&mut b), Err(DecodeError::Oversize { len: 4097, max: 4096, request_id: 80 }));
    // Exactly at the cap is fine.
    let mut b = raw(1, Kind::Raft as u16, 0, 81, &vec![0; 4096 - HEADER_LEN]);
    assert!(dec.decode(&mut b).unwrap().is_some());
}

#[test]
fn payload_checksum() {
    let mut b = body(Kind::Raft, b"raft message");
    let last = b.len() - 1;
    b[last] ^= 0x40;
    assert!(matches!(decode_one(b), Err(DecodeError::PayloadChecksum { request_id: 9, .. })));
}

#[test]
fn encoding_over_the_cap_is_refused_and_appends_nothing() {
    let m = Message::ExtentWrite(ExtentWrite {
        target: target(),
        offset: 0,
        fua: false,
        copy: false,
        data: Bytes::from(vec![0; MAX_FRAME]),
    });
    let mut fb = FrameBuf::new();
    assert!(matches!(
        fb.encode(1, FrameFlags::NONE, &m),
        Err(EncodeError::TooLarge { kind: Kind::ExtentWrite, .. })
    ));
    assert!(fb.is_empty());
    assert!(fb.segments().is_empty());
}

// --- one test per malformation of a body

#[test]
fn every_kind_with_fields_refuses_a_truncated_body() {
    for m in every_message() {
        let full = body_of(&m);
        let fields = m.fields_len();
        if fields == 0 {
            continue;
        }
        // Every cut inside the fixed fields.
        for cut in 0..fields {
            match body_error(body(m.kind(), &full[..cut])) {
                BodyError::Truncated { .. } => {}
                other => panic!("{m:?} cut at {cut}: {other:?}"),
            }
        }
    }
}

#[test]
fn trailing_bytes_after_the_fields() {
    // A read reply's data ends the body too (its extra byte is refused as
    // data the runs do not account for: `volume_read_reply_data_disagrees`).
    for m in every_message().into_iter().filter(|m| m.data().is_none() && m.kind() != Kind::VolumeReadReply) {
        let mut b = body_of(&m);
        b.push(0);
        assert_eq!(body_error(body(m.kind(), &b)), BodyError::TrailingBytes { extra: 1 }, "{m:?}");
    }
}

fn invalid_field(b: BytesMut) -> &'static str {
    match body_error(b) {
        BodyError::InvalidField { field, .. } => field,
        other => panic!("expected an invalid field, got {other:?}"),
    }
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

#[test]
fn unknown_write_flags() {
    let mut b = body_of(&every_message()[17]);
    // Bits 0 (FUA) and 1 (COPY) are defined; the next is not.
    put_u32(&mut b, 40, 4);
    assert_eq!(invalid_field(body(Kind::ExtentWrite, &b)), "flags");
    put_u32(&mut b, 40, 3);
    let Ok(Some(f)) = decode_one(body(Kind::ExtentWrite, &b)) else { panic!("FUA | COPY decodes") };
    let Message::ExtentWrite(w) = f.message else { panic!("a write") };
    assert!(w.fua && w.copy);
}

#[test]
fn write_data_over_the_largest_payload() {
    let m = Message::ExtentWrite(ExtentWrite {
        target: target(),
        offset: 0,
        fua: false,
        copy: false,
        data: Bytes::from(vec![0; MAX_DATA + 1]),
    });
    assert_eq!(invalid_field(body(Kind::ExtentWrite, &body_of(&m))), "data");
}

#[test]
fn write_offset_plus_len_overflows() {
    let m = Message::ExtentWrite(ExtentWrite {
        target: target(),
        offset: u64::MAX - 10,
        fua: false,
        copy: false,
        data: pattern(11),
    });
    assert_eq!(invalid_field(body(Kind::ExtentWrite, &body_of(&m))), "len");
}

#[test]
fn read_len_over_the_largest_payload() {
    let m = Message::ExtentRead(ExtentRead { target: target(), offset: 0, len: MAX_DATA as u32 + 1 });
    assert_eq!(invalid_field(body(Kind::ExtentRead, &body_of(&m))), "len");
}

#[test]
fn read_offset_plus_len_overflows() {
    let m = Message::ExtentRead(ExtentRead { target: target(), offset: u64::MAX, len: 1 });
    assert_eq!(invalid_field(body(Kind::ExtentRead, &body_of(&m))), "len");
}

#[test]
fn zeroes_and_trim_ranges_that_overflow() {
    let z = ExtentWriteZeroes { target: target(), offset: u64::MAX, len: 2, deallocate: false, fua: false };
    assert_eq!(invalid_field(body(Kind::ExtentWriteZeroes, &body_of(&Message::ExtentWriteZeroes(z)))), "len");
    let t = ExtentTrim { target: target(), offset: 2, len: u64::MAX, fua: false };
    assert_eq!(invalid_field(body(Kind::ExtentTrim, &body_of(&Message::ExtentTrim(t)))), "len");
}

#[test]
fn zeroes_trim_and_status_flags_unknown_bits() {
    let z = Message::ExtentWriteZeroes(ExtentWriteZeroes {
        target: target(),
        offset: 0,
        len: 1,
        deallocate: false,
        fua: false,
    });
    let mut b = body_of(&z);
    put_u32(&mut b, 48, 4);
    assert_eq!(invalid_field(body(Kind::ExtentWriteZeroes, &b)), "flags");
    let t = Message::ExtentTrim(ExtentTrim { target: target(), offset: 0, len: 1, fua: false });
    let mut b = body_of(&t);
    put_u32(&mut b, 48, 2);
    assert_eq!(invalid_field(body(Kind::ExtentTrim, &b)), "flags");
    let s = Message::ExtentStatusReply(ExtentState::absent(Generation(0), Epoch(0)));
    let mut b = body_of(&s);
    put_u32(&mut b, 24, 0x8000_0000);
    assert_eq!(invalid_field(body(Kind::ExtentStatusReply, &b)), "flags");
    let r = Message::ExtentReadReply(ExtentReadReply { crcs: None, data: pattern(10) });
    let mut b = body_of(&r);
    put_u32(&mut b, 0, 2);
    assert_eq!(invalid_field(body(Kind::ExtentReadReply, &b)), "flags");
}

#[test]
fn read_reply_block_size_not_a_power_of_two() {
    for bad in [0, 100, 4095, 256, 1 << 30] {
        let r =
            ExtentReadReply { crcs: Some(BlockCrcs { block_size: bad, crcs: vec![0] }), data: pattern(10) };
        assert_eq!(
            invalid_field(body(Kind::ExtentReadReply, &body_of(&Message::ExtentReadReply(r)))),
            "block size"
        );
    }
}

#[test]
fn read_reply_crc_count_not_one_per_block() {
    let r =
        ExtentReadReply { crcs: Some(BlockCrcs { block_size: 4096, crcs: vec![0, 0] }), data: pattern(4096) };
    assert_eq!(
        invalid_field(body(Kind::ExtentReadReply, &body_of(&Message::ExtentReadReply(r)))),
        "crc count"
    );
}

#[test]
fn read_reply_crc_count_larger_than_the_body_allocates_nothing() {
    // flags CRCS, block size 4096, a count of 2^30 crcs, and no crcs.
    let mut b = Vec::new();
    b.extend_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&4096u32.to_le_bytes());
    b.extend_from_slice(&(1u32 << 30).to_le_bytes());
    assert_eq!(
        body_error(body(Kind::ExtentReadReply, &b)),
        BodyError::Truncated { field: "crcs", need: 1 << 32, have: 0 }
    );
}

#[test]
fn hello_with_an_unknown_version_field() {
    let mut b = body_of(&every_message()[0]);
    b[0] = 9;
    assert_eq!(invalid_field(body(Kind::Hello, &b)), "version");
}

#[test]
fn unknown_refusal_error_and_extent_error_codes() {
    let mut b = body_of(&every_message()[2]);
    b[0] = 200;
    assert_eq!(invalid_field(body(Kind::Refused, &b)), "code");
    let mut b = body_of(&Message::error(ErrorCode::Internal, "x"));
    b[0] = 0;
    assert_eq!(invalid_field(body(Kind::Error, &b)), "code");
    let mut b = body_of(&Message::ExtentErr(ExtentErr { error: ExtentError::Io, message: String::new() }));
    b[0] = 77;
    assert_eq!(invalid_field(body(Kind::ExtentErr, &b)), "code");
}

#[test]
fn text_longer_than_the_cap() {
    let mut b = vec![1, 0];
    b.extend_from_slice(&((MAX_TEXT + 1) as u16).to_le_bytes());
    b.resize(b.len() + MAX_TEXT + 1, b'a');
    assert_eq!(invalid_field(body(Kind::Error, &b)), "message");
}

#[test]
fn text_that_is_not_utf8() {
    let b = [1, 0, 2, 0, 0xff, 0xfe];
    assert_eq!(body_error(body(Kind::Error, &b)), BodyError::BadUtf8 { field: "message" });
}

#[test]
fn long_text_is_cut_at_a_character_boundary_when_encoded() {
    let long = "é".repeat(MAX_TEXT); // 2 bytes each
    let m = Message::error(ErrorCode::Internal, long);
    let f =
        decode_one(BytesMut::from(&encode_to_bytes(1, FrameFlags::NONE, &m).unwrap()[..])).unwrap().unwrap();
    let Message::Error(e) = f.message else { panic!() };
    assert_eq!(e.message, "é".repeat(MAX_TEXT / 2));
}

#[test]
fn reply_kinds_are_marked_as_replies() {
    let requests: Vec<Kind> = Kind::ALL.into_iter().filter(|k| !k.is_reply()).collect();
    assert_eq!(
        requests,
        [
            Kind::Hello,
            Kind::Ping,
            Kind::Raft,
            Kind::MetaRequest,
            Kind::ExtentWrite,
            Kind::ExtentRead,
            Kind::ExtentWriteZeroes,
            Kind::ExtentTrim,
            Kind::ExtentFlush,
            Kind::ExtentStatus,
            Kind::ExtentCrcs,
            Kind::ExtentMap,
            Kind::ExtentsDirty,
            Kind::VolumeRead,
            Kind::VolumeWrite,
            Kind::VolumeWriteZeroes,
            Kind::VolumeTrim,
            Kind::VolumeFlush,
            Kind::VolumeBlockStatus,
            Kind::VolumeCompareAndWrite,
        ]
    );
    for k in Kind::ALL {
        assert_eq!(Kind::from_u16(k as u16), Some(k));
    }
}

/// Found by `cargo fuzz` (peer_frame): a `current` value on an error code
/// that has none was accepted and then lost, so two different frames
/// decoded to one message.
#[test]
fn extent_error_current_must_be_zero_when_the_code_has_none() {
    for code in [3u16, 4, 5, 6, 7, 8] {
        let mut b = code.to_le_bytes().to_vec();
        b.extend_from_slice(&4096u64.to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes());
        assert_eq!(invalid_field(body(Kind::ExtentErr, &b)), "current", "code {code}");
    }
}

// --- the status and crc messages

/// A status reply body: flags, region size, then the region indexes.
fn status_body(flags: u32, region_size: u32, regions: &[u32]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&5u64.to_le_bytes());
    b.extend_from_slice(&6u64.to_le_bytes());
    b.extend_from_slice(&7u64.to_le_bytes());
    b.extend_from_slice(&flags.to_le_bytes());
    b.extend_from_slice(&region_size.to_le_bytes());
    b.extend_from_slice(&(regions.len() as u32).to_le_bytes());
    for r in regions {
        b.extend_from_slice(&r.to_le_bytes());
    }
    b
}

#[test]
fn status_reply_with_a_bad_region_size() {
    // Exists with size 0, 4095 or 2048; absent with a size.
    for (flags, size) in [(1, 0), (1, 4095), (1, 2048), (0, 4096)] {
        assert_eq!(
            invalid_field(body(Kind::ExtentStatusReply, &status_body(flags, size, &[]))),
            "region size"
        );
    }
    let ok = status_body(1, 4096, &[1, 2]);
    let f = decode_one(body(Kind::ExtentStatusReply, &ok)).unwrap().unwrap();
    let Message::ExtentStatusReply(s) = f.message else { panic!() };
    assert_eq!(s.dirty_ranges(), vec![(4096, 4096), (8192, 4096)]);
    assert!(s.dirty());
}

#[test]
fn status_reply_regions_out_of_order_or_of_an_absent_extent() {
    for regions in [&[3u32, 3][..], &[4, 2]] {
        assert_eq!(
            invalid_field(body(Kind::ExtentStatusReply, &status_body(1, 4096, regions))),
            "dirty regions"
        );
    }
    let mut b = status_body(0, 0, &[]);
    put_u32(&mut b, 32, 1); // a count on an extent that does not exist
    assert_eq!(invalid_field(body(Kind::ExtentStatusReply, &b)), "region count");
}

#[test]
fn status_reply_region_count_over_the_cap_allocates_nothing() {
    let mut b = status_body(1, 4096, &[]);
    put_u32(&mut b, 32, u32::MAX);
    assert_eq!(invalid_field(body(Kind::ExtentStatusReply, &b)), "region count");
    put_u32(&mut b, 32, MAX_DIRTY_REGIONS as u32);
    assert_eq!(
        body_error(body(Kind::ExtentStatusReply, &b)),
        BodyError::Truncated { field: "dirty regions", need: 4 * MAX_DIRTY_REGIONS, have: 0 }
    );
}

#[test]
fn crcs_request_range_overflows_or_is_too_long() {
    let c = ExtentCrcs { target: target(), offset: u64::MAX - 4095, len: 8192 };
    assert_eq!(invalid_field(body(Kind::ExtentCrcs, &body_of(&Message::ExtentCrcs(c)))), "len");
    let c = ExtentCrcs { target: target(), offset: 0, len: MAX_CRCS_RANGE + 1 };
    assert_eq!(invalid_field(body(Kind::ExtentCrcs, &body_of(&Message::ExtentCrcs(c)))), "len");
    // The reply room a sender reserves covers the largest reply.
    let c = Message::ExtentCrcs(ExtentCrcs { target: target(), offset: 0, len: MAX_CRCS_RANGE });
    assert_eq!(c.reply_hint(), 4 * MAX_CRC_COUNT);
}

#[test]
fn crcs_reply_count_over_the_cap_or_past_the_body() {
    let mut b = Vec::new();
    b.extend_from_slice(&4096u32.to_le_bytes());
    b.extend_from_slice(&(MAX_CRC_COUNT as u32 + 1).to_le_bytes());
    assert_eq!(invalid_field(body(Kind::ExtentCrcsReply, &b)), "crc count");
    b[4..8].copy_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&[0; 8]);
    assert_eq!(
        body_error(body(Kind::ExtentCrcsReply, &b)),
        BodyError::Truncated { field: "crcs", need: 12, have: 8 }
    );
    for bad in [0u32, 100, 256, 1 << 30] {
        let r = Message::ExtentCrcsReply(BlockCrcs { block_size: bad, crcs: vec![1] });
        assert_eq!(invalid_field(body(Kind::ExtentCrcsReply, &body_of(&r))), "block size");
    }
}

// --- volume-level forwarding ------------------------------------------------

fn vtarget() -> VolumeTarget {
    VolumeTarget { volume: VolumeId(7), generation: Generation(5) }
}

fn every_volume_message() -> Vec<Message> {
    use crate::types::{BlockState, MapExtent, ReadChunk};
    let t = vtarget();
    vec![
        Message::VolumeRead(VolumeRead { target: t, offset: 4096, len: 1 << 20 }),
        Message::VolumeWrite(VolumeWrite {
            target: t,
            offset: 1 << 30,
            fua: true,
            any_byte: false,
            data: pattern(64 << 10),
        }),
        Message::VolumeWrite(VolumeWrite {
            target: t,
            offset: 0,
            fua: false,
            any_byte: false,
            data: pattern(512),
        }),
        Message::VolumeWrite(VolumeWrite {
            target: t,
            offset: 7,
            fua: true,
            any_byte: true,
            data: pattern(3),
        }),
        Message::VolumeWrite(VolumeWrite {
            target: t,
            offset: 511,
            fua: false,
            any_byte: true,
            data: pattern(2),
        }),
        Message::VolumeWriteZeroes(VolumeWriteZeroes {
            target: t,
            offset: 8192,
            len: 1 << 40,
            deallocate: true,
            fua: false,
            any_byte: false,
        }),
        Message::VolumeWriteZeroes(VolumeWriteZeroes {
            target: t,
            offset: 0,
            len: 512,
            deallocate: false,
            fua: true,
            any_byte: false,
        }),
        Message::VolumeWriteZeroes(VolumeWriteZeroes {
            target: t,
            offset: 4095,
            len: 4099,
            deallocate: true,
            fua: true,
            any_byte: true,
        }),
        Message::VolumeTrim(VolumeTrim { target: t, offset: 4096, len: 4096, fua: true }),
        Message::VolumeFlush(t),
        Message::VolumeBlockStatus(VolumeBlockStatus { target: t, offset: 512, len: 1 << 30 }),
        Message::VolumeCompareAndWrite(VolumeCompareAndWrite {
            target: t,
            offset: 4096,
            fua: true,
            buf: pattern(8192),
        }),
        Message::VolumeReadReply(VolumeReadReply {
            chunks: vec![
                ReadChunk::Hole(4096),
                ReadChunk::Data(pattern(8192)),
                ReadChunk::Data(pattern(512)),
                ReadChunk::Hole(1 << 20),
                ReadChunk::Data(pattern(100)),
            ],
        }),
        Message::VolumeReadReply(VolumeReadReply { chunks: vec![] }),
        Message::VolumeReadReply(VolumeReadReply { chunks: vec![ReadChunk::Hole(512)] }),
        Message::VolumeMapReply(VolumeMapReply {
            extents: vec![
                MapExtent { len: 4096, state: BlockState::DATA },
                MapExtent { len: 1 << 40, state: BlockState::HOLE },
                MapExtent { len: 512, state: BlockState { allocated: true, zero: true } },
                MapExtent { len: 512, state: BlockState { allocated: false, zero: false } },
            ],
        }),
        Message::VolumeMapReply(VolumeMapReply { extents: vec![] }),
        Message::VolumeCawReply(VolumeCawReply { miscompare: None }),
        Message::VolumeCawReply(VolumeCawReply { miscompare: Some(0) }),
        Message::VolumeCawReply(VolumeCawReply { miscompare: Some(4097) }),
        Message::VolumeOk,
        Message::VolumeErr(VolumeErr {
            fault: VolumeFault::OutOfRange { offset: 1, len: 2, size: 3 },
            message: "past the end".into(),
        }),
        Message::VolumeErr(VolumeErr {
            fault: VolumeFault::Misaligned { offset: 7, len: 9 },
            message: "m".into(),
        }),
        Message::VolumeErr(VolumeErr { fault: VolumeFault::TooLarge { len: 1 << 40 }, message: "t".into() }),
        Message::VolumeErr(VolumeErr { fault: VolumeFault::ReadOnly, message: String::new() }),
        Message::VolumeErr(VolumeErr { fault: VolumeFault::NoSpace, message: "full".into() }),
        Message::VolumeErr(VolumeErr {
            fault: VolumeFault::Checksum { volume: VolumeId(3), extent: ExtentIndex(4), block: 5 },
            message: "crc".into(),
        }),
        Message::VolumeErr(VolumeErr { fault: VolumeFault::Io, message: "io".into() }),
        Message::VolumeErr(VolumeErr {
            fault: VolumeFault::NotOwner { generation: Generation(9) },
            message: "moved".into(),
        }),
        Message::VolumeErr(VolumeErr { fault: VolumeFault::Unavailable, message: "gone".into() }),
    ]
}

/// A read reply body: `runs` as raw u32s, then `data` bytes.
fn read_reply_body(runs: &[u32], data: usize) -> Vec<u8> {
    let mut b = (runs.len() as u32).to_le_bytes().to_vec();
    for r in runs {
        b.extend_from_slice(&r.to_le_bytes());
    }
    b.resize(b.len() + data, 0xab);
    b
}

#[test]
fn every_volume_error_code_is_in_the_round_trip_set() {
    let codes: std::collections::BTreeSet<u16> = every_volume_message()
        .iter()
        .filter_map(|m| match m {
            Message::VolumeErr(_) => {
                let b = body_of(m);
                Some(u16::from_le_bytes([b[0], b[1]]))
            }
            _ => None,
        })
        .collect();
    assert_eq!(codes, (1..=9).collect());
}

#[test]
fn volume_read_reply_data_is_not_copied() {
    use crate::types::ReadChunk;
    let (a, b) = (pattern(8192), pattern(64 << 10));
    let m = Message::VolumeReadReply(VolumeReadReply {
        chunks: vec![ReadChunk::Data(a.clone()), ReadChunk::Hole(4096), ReadChunk::Data(b.clone())],
    });
    let mut fb = FrameBuf::new();
    fb.encode(1, FrameFlags::NONE, &m).unwrap();
    let segs = fb.segments().to_vec();
    // Both data runs are referenced as they are, in order.
    assert!(segs.iter().any(|s| s.as_ptr() == a.as_ptr() && s.len() == a.len()));
    assert!(segs.iter().any(|s| s.as_ptr() == b.as_ptr() && s.len() == b.len()));
    // Decoded, the data runs are slices of the received payload.
    let mut buf = BytesMut::new();
    for s in &segs {
        buf.extend_from_slice(s);
    }
    let received = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.len();
    let f = Decoder::default().decode(&mut buf).unwrap().unwrap();
    let Message::VolumeReadReply(r) = f.message else { panic!("{:?}", f.message) };
    assert_eq!(r.chunks.len(), 3);
    assert_eq!(r.chunks[1], ReadChunk::Hole(4096));
    for (i, want) in [(0, &a), (2, &b)] {
        let ReadChunk::Data(got) = &r.chunks[i] else { panic!("{:?}", r.chunks[i]) };
        assert_eq!(got, want);
        assert!(received.contains(&(got.as_ptr() as usize)), "run {i} was copied out of the receive buffer");
    }
}

#[test]
fn volume_read_reply_run_count_larger_than_the_body_allocates_nothing() {
    let b = (MAX_READ_RUNS as u32).to_le_bytes();
    assert_eq!(
        body_error(body(Kind::VolumeReadReply, &b)),
        BodyError::Truncated { field: "runs", need: MAX_READ_RUNS * 4, have: 0 }
    );
}

#[test]
fn volume_read_reply_run_count_over_the_cap() {
    let b = (MAX_READ_RUNS as u32 + 1).to_le_bytes();
    assert_eq!(invalid_field(body(Kind::VolumeReadReply, &b)), "run count");
    let b = u32::MAX.to_le_bytes();
    assert_eq!(invalid_field(body(Kind::VolumeReadReply, &b)), "run count");
}

#[test]
fn volume_read_reply_run_of_length_zero() {
    assert_eq!(invalid_field(body(Kind::VolumeReadReply, &read_reply_body(&[0], 0))), "runs");
    assert_eq!(invalid_field(body(Kind::VolumeReadReply, &read_reply_body(&[1 << 31], 0))), "runs");
}

#[test]
fn volume_read_reply_runs_over_the_largest_payload() {
    // Two holes that together pass MAX_DATA (no data bytes needed to say so).
    let h = (1u32 << 31) | (MAX_DATA as u32 / 2 + 512);
    assert_eq!(invalid_field(body(Kind::VolumeReadReply, &read_reply_body(&[h, h], 0))), "runs");
    // Holes of the largest length the field holds, many times: refused at
    // the first sum past the cap, never an overflow.
    let big = (1u32 << 31) | 0x7fff_ffff;
    assert_eq!(invalid_field(body(Kind::VolumeReadReply, &read_reply_body(&[big; 4], 0))), "runs");
}

#[test]
fn volume_read_reply_data_disagrees_with_the_runs() {
    let hole = (1u32 << 31) | 512;
    for (runs, data) in
        [(vec![512u32], 511usize), (vec![512], 513), (vec![hole], 1), (vec![hole, 1024], 512), (vec![], 1)]
    {
        assert_eq!(
            invalid_field(body(Kind::VolumeReadReply, &read_reply_body(&runs, data))),
            "data",
            "{runs:?} with {data} bytes"
        );
    }
    assert!(decode_one(body(Kind::VolumeReadReply, &read_reply_body(&[hole, 1024], 1024))).is_ok());
}

#[test]
fn volume_map_reply_hostile_counts_and_flags() {
    let b = (MAX_MAP_EXTENTS as u32 + 1).to_le_bytes();
    assert_eq!(invalid_field(body(Kind::VolumeMapReply, &b)), "extent count");
    let b = (MAX_MAP_EXTENTS as u32).to_le_bytes();
    assert_eq!(
        body_error(body(Kind::VolumeMapReply, &b)),
        BodyError::Truncated { field: "extents", need: MAX_MAP_EXTENTS * 12, have: 0 }
    );
    let mut b = 1u32.to_le_bytes().to_vec();
    b.extend_from_slice(&512u64.to_le_bytes());
    b.extend_from_slice(&4u32.to_le_bytes());
    assert_eq!(invalid_field(body(Kind::VolumeMapReply, &b)), "extent flags");
}

#[test]
fn volume_caw_reply_offset_without_a_miscompare() {
    let mut b = 0u32.to_le_bytes().to_vec();
    b.extend_from_slice(&7u64.to_le_bytes());
    assert_eq!(invalid_field(body(Kind::VolumeCawReply, &b)), "offset");
    let mut b = 2u32.to_le_bytes().to_vec();
    b.extend_from_slice(&0u64.to_le_bytes());
    assert_eq!(invalid_field(body(Kind::VolumeCawReply, &b)), "flags");
}

#[test]
fn volume_error_unknown_code_and_unused_fields() {
    let err = |code: u16, f: [u64; 3]| {
        let mut b = code.to_le_bytes().to_vec();
        for v in f {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&0u16.to_le_bytes());
        body(Kind::VolumeErr, &b)
    };
    for code in [0u16, 10, u16::MAX] {
        assert_eq!(invalid_field(err(code, [0; 3])), "code", "code {code}");
    }
    // ReadOnly, NoSpace, Io, Unavailable use none; Misaligned not c;
    // TooLarge and NotOwner not b or c.
    for code in [4u16, 5, 7, 9] {
        assert_eq!(invalid_field(err(code, [1, 0, 0])), "a", "code {code}");
        assert_eq!(invalid_field(err(code, [0, 0, 1])), "c", "code {code}");
    }
    assert_eq!(invalid_field(err(2, [1, 1, 1])), "c");
    assert_eq!(invalid_field(err(3, [1, 1, 0])), "b");
    assert_eq!(invalid_field(err(8, [1, 0, 1])), "c");
}

#[test]
fn volume_requests_with_hostile_lengths_and_flags() {
    let t = vtarget();
    let r = Message::VolumeRead(VolumeRead { target: t, offset: 0, len: MAX_DATA as u32 + 1 });
    assert_eq!(invalid_field(body(Kind::VolumeRead, &body_of(&r))), "len");
    let w = Message::VolumeWrite(VolumeWrite {
        target: t,
        offset: 0,
        fua: false,
        any_byte: false,
        data: pattern(2),
    });
    let mut b = body_of(&w);
    put_u32(&mut b, 24, 4);
    assert_eq!(invalid_field(body(Kind::VolumeWrite, &b)), "flags");
    // ANY_BYTE is a VolumeWrite's only: COMPARE AND WRITE is whole blocks.
    let c = Message::VolumeCompareAndWrite(VolumeCompareAndWrite {
        target: t,
        offset: 0,
        fua: false,
        buf: pattern(1024),
    });
    let mut b = body_of(&c);
    put_u32(&mut b, 24, 2);
    assert_eq!(invalid_field(body(Kind::VolumeCompareAndWrite, &b)), "flags");
    let c = Message::VolumeCompareAndWrite(VolumeCompareAndWrite {
        target: t,
        offset: 0,
        fua: false,
        buf: Bytes::from(vec![0; MAX_DATA + 1]),
    });
    assert_eq!(invalid_field(body(Kind::VolumeCompareAndWrite, &body_of(&c))), "data");
    let z = VolumeWriteZeroes { target: t, offset: 0, len: 2, deallocate: false, fua: false, any_byte: true };
    let mut b = body_of(&Message::VolumeWriteZeroes(z));
    put_u32(&mut b, 32, 8);
    assert_eq!(invalid_field(body(Kind::VolumeWriteZeroes, &b)), "flags");
    let tr = VolumeTrim { target: t, offset: 0, len: 2, fua: false };
    let mut b = body_of(&Message::VolumeTrim(tr));
    put_u32(&mut b, 32, 2);
    assert_eq!(invalid_field(body(Kind::VolumeTrim, &b)), "flags");
}

/// A range whose end overflows decodes: the owner's volume refuses it as
/// out of range, as it would for a client of its own (a decode error would
/// close the connection and fail every request on it).
#[test]
fn volume_ranges_that_overflow_are_the_volumes_to_refuse() {
    let t = vtarget();
    for m in [
        Message::VolumeRead(VolumeRead { target: t, offset: u64::MAX, len: 1 }),
        Message::VolumeWrite(VolumeWrite {
            target: t,
            offset: u64::MAX - 1,
            fua: false,
            any_byte: true,
            data: pattern(3),
        }),
        Message::VolumeTrim(VolumeTrim { target: t, offset: 2, len: u64::MAX, fua: false }),
        Message::VolumeWriteZeroes(VolumeWriteZeroes {
            target: t,
            offset: u64::MAX,
            len: 2,
            deallocate: true,
            fua: false,
            any_byte: false,
        }),
        Message::VolumeWriteZeroes(VolumeWriteZeroes {
            target: t,
            offset: 3,
            len: u64::MAX,
            deallocate: false,
            fua: true,
            any_byte: true,
        }),
        Message::VolumeBlockStatus(VolumeBlockStatus { target: t, offset: u64::MAX, len: 1 }),
    ] {
        let f = decode_one(body(m.kind(), &body_of(&m))).unwrap().unwrap();
        assert_eq!(f.message, m);
    }
}

#[test]
fn a_volume_read_hints_its_reply_and_a_block_status_its_map() {
    let r = Message::VolumeRead(VolumeRead { target: vtarget(), offset: 0, len: 1 << 20 });
    assert_eq!(r.reply_hint(), 1 << 20);
    let s = Message::VolumeBlockStatus(VolumeBlockStatus { target: vtarget(), offset: 0, len: 1 << 40 });
    assert_eq!(s.reply_hint(), 4 + MAX_MAP_EXTENTS * 12);
}
// --- end of volume-level forwarding ------------------------------------------

// --- extent allocation maps --------------------------------------------------

#[test]
fn extent_map_request_range_that_overflows() {
    let m = Message::ExtentMap(ExtentMap { target: target(), offset: u64::MAX - 511, len: 1024 });
    assert_eq!(invalid_field(body(Kind::ExtentMap, &body_of(&m))), "len");
}

/// A hostile replica's map reply: a count over the cap, or larger than the
/// body, is refused before anything is allocated for it; unknown flags too.
#[test]
fn extent_map_reply_hostile_counts_and_flags() {
    let b = (MAX_MAP_EXTENTS as u32 + 1).to_le_bytes();
    assert_eq!(invalid_field(body(Kind::ExtentMapReply, &b)), "extent count");
    let b = u32::MAX.to_le_bytes();
    assert_eq!(invalid_field(body(Kind::ExtentMapReply, &b)), "extent count");
    let b = (MAX_MAP_EXTENTS as u32).to_le_bytes();
    assert_eq!(
        body_error(body(Kind::ExtentMapReply, &b)),
        BodyError::Truncated { field: "extents", need: MAX_MAP_EXTENTS * 12, have: 0 }
    );
    let mut b = 1u32.to_le_bytes().to_vec();
    b.extend_from_slice(&4096u64.to_le_bytes());
    b.extend_from_slice(&8u32.to_le_bytes());
    assert_eq!(invalid_field(body(Kind::ExtentMapReply, &b)), "extent flags");
}

#[test]
fn an_extent_map_hints_its_reply() {
    let m = Message::ExtentMap(ExtentMap { target: target(), offset: 0, len: 64 << 10 });
    assert_eq!(m.reply_hint(), 4 + 128 * 12);
    let m = Message::ExtentMap(ExtentMap { target: target(), offset: 0, len: 1 << 40 });
    assert_eq!(m.reply_hint(), 4 + MAX_MAP_EXTENTS * 12);
}

// --- dirty extent listings ---------------------------------------------------

/// A hostile replica's dirty-extent listing: a count over the cap or past
/// the body is refused before anything is allocated for it; indexes out
/// of order, and unknown flags, too.
#[test]
fn dirty_extents_reply_hostile_counts_order_and_flags() {
    let with = |flags: u32, count: u32, extents: &[u64]| {
        let mut b = flags.to_le_bytes().to_vec();
        b.extend_from_slice(&count.to_le_bytes());
        for e in extents {
            b.extend_from_slice(&e.to_le_bytes());
        }
        b
    };
    let over = MAX_DIRTY_EXTENTS as u32 + 1;
    assert_eq!(invalid_field(body(Kind::ExtentsDirtyReply, &with(0, over, &[]))), "extent count");
    assert_eq!(invalid_field(body(Kind::ExtentsDirtyReply, &with(0, u32::MAX, &[]))), "extent count");
    assert_eq!(
        body_error(body(Kind::ExtentsDirtyReply, &with(0, MAX_DIRTY_EXTENTS as u32, &[]))),
        BodyError::Truncated { field: "extents", need: MAX_DIRTY_EXTENTS * 8, have: 0 }
    );
    assert_eq!(invalid_field(body(Kind::ExtentsDirtyReply, &with(0, 2, &[5, 5]))), "extents");
    assert_eq!(invalid_field(body(Kind::ExtentsDirtyReply, &with(0, 2, &[6, 5]))), "extents");
    assert_eq!(invalid_field(body(Kind::ExtentsDirtyReply, &with(2, 0, &[]))), "flags");
    let ok = Message::decode(Kind::ExtentsDirtyReply, Bytes::from(with(1, 2, &[5, 6]))).unwrap();
    let want = DirtyExtents {
        extents: vec![crate::types::ExtentIndex(5), crate::types::ExtentIndex(6)],
        more: true,
    };
    assert_eq!(ok, Message::ExtentsDirtyReply(want));
}

#[test]
fn a_dirty_extents_request_reserves_room_for_its_longest_reply() {
    let q = Message::ExtentsDirty(ExtentsDirty {
        volume: crate::types::VolumeId(1),
        generation: crate::types::Generation(1),
        from: crate::types::ExtentIndex(0),
    });
    let longest = Message::ExtentsDirtyReply(DirtyExtents {
        extents: (0..MAX_DIRTY_EXTENTS as u64).map(crate::types::ExtentIndex).collect(),
        more: true,
    });
    assert!(q.reply_hint() + 8 >= longest.body_len(), "{} {}", q.reply_hint(), longest.body_len());
}
