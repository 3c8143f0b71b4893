//! Peer codec benchmarks (`proto::peer`): encoding and decoding the frames
//! the replicated data path and Raft send most. Decoding a write includes
//! the payload crc32c, which is most of its cost at 1 MiB.
//! Run: `cargo bench --bench peer_codec`.

use basalt::proto::peer::{Decoder, ExtentTarget, ExtentWrite, FrameBuf, FrameFlags, Message};
use basalt::types::{Epoch, ExtentIndex, Generation, VolumeId};
use bytes::{Bytes, BytesMut};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;

fn write(len: usize) -> Message {
    let target = ExtentTarget {
        volume: VolumeId(1),
        extent: ExtentIndex(2),
        epoch: Epoch(3),
        generation: Generation(4),
    };
    Message::ExtentWrite(ExtentWrite {
        target,
        offset: 0,
        fua: false,
        copy: false,
        data: Bytes::from(vec![0xa5; len]),
    })
}

fn wire(messages: &[Message]) -> BytesMut {
    let mut fb = FrameBuf::new();
    for (i, m) in messages.iter().enumerate() {
        fb.encode(i as u64 + 1, FrameFlags::NONE, m).unwrap();
    }
    BytesMut::from(&fb.to_bytes()[..])
}

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("peer");
    for (name, msgs) in [
        ("write_4k_x32", (0..32).map(|_| write(4096)).collect::<Vec<_>>()),
        ("write_1m", vec![write(1 << 20)]),
        ("raft_200b_x32", (0..32).map(|_| Message::Raft(Bytes::from(vec![7; 200]))).collect()),
    ] {
        let bytes = wire(&msgs);
        g.throughput(Throughput::Bytes(bytes.len() as u64));
        g.bench_function(format!("encode_{name}"), |b| {
            b.iter(|| {
                let mut fb = FrameBuf::new();
                for (i, m) in msgs.iter().enumerate() {
                    fb.encode(i as u64 + 1, FrameFlags::NONE, m).unwrap();
                }
                black_box(fb.segments().len())
            })
        });
        let dec = Decoder::default().copy_below(64 << 10);
        g.bench_function(format!("decode_{name}"), |b| {
            b.iter_batched_ref(
                || bytes.clone(),
                |buf| {
                    while let Some(f) = dec.decode(buf).unwrap() {
                        black_box(f);
                    }
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
