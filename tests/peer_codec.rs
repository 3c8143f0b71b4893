//! Property tests of the peer codec (`proto::peer`): arbitrary bytes never
//! panic and never make the decoder allocate past its frame cap, and every
//! body a decoder accepts encodes back to exactly the same bytes.
//!
//! A counting global allocator (per thread, so parallel tests do not mix)
//! measures what decoding allocates.

use basalt::proto::peer::{Decoder, FrameBuf, Kind, MAGIC, Message};
use bytes::BytesMut;
use proptest::prelude::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

struct Counting;

thread_local! {
    static TRACK: Cell<bool> = const { Cell::new(false) };
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
    static BIGGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(delta: isize, size: usize) {
    let _ = TRACK.try_with(|t| {
        if t.get() {
            let live = LIVE.get() + delta;
            LIVE.set(live);
            PEAK.set(PEAK.get().max(live));
            BIGGEST.set(BIGGEST.get().max(size));
        }
    });
}

// SAFETY: every call is forwarded unchanged to the system allocator; the
// bookkeeping touches only const-initialized thread locals, which never
// allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size() as isize, layout.size());
        // SAFETY: same layout contract as our caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note(-(layout.size() as isize), 0);
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size as isize - layout.size() as isize, new_size);
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The cap the tests decode with, and the copy threshold the server uses.
const CAP: usize = 8192;
const COPY_BELOW: usize = 4096;

/// Decodes `input` frame by frame until it runs out or fails, dropping each
/// frame; returns (frames, the largest single allocation, peak live bytes).
fn decode_all(input: &[u8]) -> (usize, usize, isize) {
    let mut buf = BytesMut::from(input);
    let dec = Decoder::new(CAP).copy_below(COPY_BELOW);
    LIVE.set(0);
    PEAK.set(0);
    BIGGEST.set(0);
    TRACK.set(true);
    let mut frames = 0;
    while let Ok(Some(f)) = dec.decode(&mut buf) {
        frames += 1;
        drop(f);
    }
    TRACK.set(false);
    (frames, BIGGEST.get(), PEAK.get())
}

/// A well-framed frame (right magic, version and crcs) of `kind` around an
/// arbitrary body, so decoding reaches the body parsers.
fn framed(kind: u16, flags: u32, id: u64, body: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&MAGIC);
    b.extend_from_slice(&1u16.to_le_bytes());
    b.extend_from_slice(&kind.to_le_bytes());
    b.extend_from_slice(&flags.to_le_bytes());
    b.extend_from_slice(&(body.len() as u32).to_le_bytes());
    b.extend_from_slice(&id.to_le_bytes());
    b.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
    let h = crc32c::crc32c(&b[..28]);
    b.extend_from_slice(&h.to_le_bytes());
    b.extend_from_slice(body);
    b
}

fn any_kind() -> impl Strategy<Value = u16> {
    prop_oneof![
        4 => proptest::sample::select(Kind::ALL.to_vec()).prop_map(|k| k as u16),
        1 => any::<u16>(),
    ]
}

/// Bodies that often look like real ones: small ints, real flag values.
fn body_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..300),
        proptest::collection::vec(prop_oneof![Just(0u8), Just(1u8), Just(2u8), any::<u8>()], 0..120),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_or_allocate_past_the_cap(
        input in proptest::collection::vec(any::<u8>(), 0..20_000),
        magic_first in any::<bool>(),
    ) {
        let mut input = input;
        if magic_first && input.len() >= 6 {
            input[..4].copy_from_slice(&MAGIC);
            input[4..6].copy_from_slice(&1u16.to_le_bytes());
        }
        let (_, biggest, peak) = decode_all(&input);
        prop_assert!(biggest <= CAP, "one allocation of {biggest} bytes");
        prop_assert!(peak <= CAP as isize, "{peak} bytes live at once");
    }

    #[test]
    fn well_framed_arbitrary_bodies_never_panic_and_decode_canonically(
        frames in proptest::collection::vec((any_kind(), prop_oneof![Just(0u32), Just(1u32), any::<u32>()], any::<u64>(), body_bytes()), 1..8),
    ) {
        let mut input = Vec::new();
        for (kind, flags, id, body) in &frames {
            input.extend_from_slice(&framed(*kind, *flags, *id, body));
        }
        let (_, biggest, peak) = decode_all(&input);
        prop_assert!(biggest <= CAP);
        prop_assert!(peak <= CAP as isize);
        // Whatever decodes re-encodes to exactly the bytes it came from.
        let mut buf = BytesMut::from(&input[..]);
        let dec = Decoder::new(CAP);
        let mut at = 0;
        while let Ok(Some(f)) = dec.decode(&mut buf) {
            let mut out = FrameBuf::new();
            out.encode(f.request_id, f.flags, &f.message).unwrap();
            let bytes = out.to_bytes();
            prop_assert_eq!(&bytes[..], &input[at..at + bytes.len()]);
            at += bytes.len();
        }
    }

    #[test]
    fn corrupting_a_valid_frame_never_panics(
        pick in 0usize..7,
        at in any::<prop::sample::Index>(),
        xor in 1u8..=255,
        cut in any::<prop::sample::Index>(),
    ) {
        let messages = [
            Message::Ping,
            Message::Raft(vec![7; 100].into()),
            Message::error(basalt::proto::peer::ErrorCode::Internal, "boom"),
            Message::ExtentStatusReply(basalt::proto::peer::ExtentState {
                exists: true,
                flush_number: 1,
                generation: basalt::types::Generation(2),
                epoch: basalt::types::Epoch(3),
                region_size: 1 << 20,
                dirty_regions: vec![0, 4, 9],
            }),
            Message::ExtentCrcsReply(basalt::proto::peer::BlockCrcs { block_size: 4096, crcs: vec![7; 300] }),
            Message::ExtentReadReply(basalt::proto::peer::ExtentReadReply {
                crcs: Some(basalt::proto::peer::BlockCrcs { block_size: 512, crcs: vec![1, 2] }),
                data: vec![3; 1000].into(),
            }),
            Message::MetaRequest(vec![1; 5000].into()),
        ];
        let mut fb = FrameBuf::new();
        fb.encode(3, Default::default(), &messages[pick]).unwrap();
        let fb_bytes = fb.to_bytes().to_vec();
        let mut bytes = fb_bytes.clone();
        let i = at.index(bytes.len());
        bytes[i] ^= xor;
        // A flipped bit anywhere is caught (magic, version, or a crc).
        let mut buf = BytesMut::from(&bytes[..]);
        prop_assert!(Decoder::new(CAP).decode(&mut buf).is_err(), "flip at {} of {}", i, bytes.len());
        let n = cut.index(bytes.len());
        let (_, biggest, _) = decode_all(&bytes[..n]);
        prop_assert!(n < bytes.len());
        prop_assert!(biggest <= CAP);
        // A cut frame is never a frame.
        prop_assert_eq!(decode_all(&fb_bytes[..n]).0, 0);
    }
}

/// The counter itself works: an allocation past the cap under tracking is seen.
#[test]
fn the_allocation_counter_sees_a_big_allocation() {
    TRACK.set(true);
    BIGGEST.set(0);
    let v: Vec<u8> = Vec::with_capacity(CAP + 1);
    TRACK.set(false);
    drop(v);
    assert_eq!(BIGGEST.get(), CAP + 1);
}

/// The counted bodies (crc replies, status replies): a count far past the
/// body, every cut of a valid body, and a range that overflows are errors,
/// and none allocates for what it claims.
#[test]
fn counted_bodies_with_hostile_counts_are_errors_without_allocating() {
    use basalt::proto::peer::{BlockCrcs, ExtentCrcs, ExtentState, ExtentTarget};
    use basalt::types::{Epoch, ExtentIndex, Generation, VolumeId};
    let mut crcs = Vec::new();
    crcs.extend_from_slice(&4096u32.to_le_bytes());
    crcs.extend_from_slice(&u32::MAX.to_le_bytes());
    let mut status = Vec::new();
    for v in [1u64, 2, 3] {
        status.extend_from_slice(&v.to_le_bytes());
    }
    status.extend_from_slice(&1u32.to_le_bytes());
    status.extend_from_slice(&4096u32.to_le_bytes());
    status.extend_from_slice(&((1u32 << 16) - 1).to_le_bytes());
    for (kind, body) in [(Kind::ExtentCrcsReply, &crcs), (Kind::ExtentStatusReply, &status)] {
        let input = framed(kind as u16, 0, 5, body);
        let mut buf = BytesMut::from(&input[..]);
        assert!(Decoder::new(CAP).decode(&mut buf).is_err(), "{kind:?}");
        let (frames, biggest, _) = decode_all(&input);
        assert_eq!(frames, 0);
        assert!(biggest <= CAP, "{kind:?}: one allocation of {biggest} bytes");
    }
    let target = ExtentTarget {
        volume: VolumeId(1),
        extent: ExtentIndex(2),
        epoch: Epoch(3),
        generation: Generation(4),
    };
    let valid = [
        Message::ExtentCrcsReply(BlockCrcs { block_size: 4096, crcs: (0..50).collect() }),
        Message::ExtentStatusReply(ExtentState {
            exists: true,
            flush_number: 9,
            generation: Generation(4),
            epoch: Epoch(3),
            region_size: 1 << 20,
            dirty_regions: vec![1, 5, 80],
        }),
        Message::ExtentCrcs(ExtentCrcs { target, offset: 4096, len: 1 << 20 }),
    ];
    for m in &valid {
        let mut fb = FrameBuf::new();
        fb.encode(3, Default::default(), m).unwrap();
        let bytes = fb.to_bytes();
        let body = &bytes[32..];
        for cut in 0..body.len() {
            let input = framed(m.kind() as u16, 0, 5, &body[..cut]);
            let mut buf = BytesMut::from(&input[..]);
            assert!(Decoder::new(CAP).decode(&mut buf).is_err(), "{:?} cut at {cut}", m.kind());
        }
    }
    let overflow = Message::ExtentCrcs(ExtentCrcs { target, offset: u64::MAX - 10, len: 4096 });
    let mut fb = FrameBuf::new();
    fb.encode(3, Default::default(), &overflow).unwrap();
    let mut buf = BytesMut::from(&fb.to_bytes()[..]);
    assert!(Decoder::new(CAP).decode(&mut buf).is_err());
}
