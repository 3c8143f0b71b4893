//! NBD codec benchmarks: request framing, reply encoding, and one whole
//! request in process (frame -> validate -> volume on the current store ->
//! encoded reply). Run: `cargo bench --bench nbd_codec`.

use basalt::layout::Layout;
use basalt::node::{Node, VolumeOptions};
use basalt::proto::nbd::transmission::{ReplyBuf, encode_request};
use basalt::proto::nbd::*;
use basalt::storage::{EngineKind, StoreConfig};
use basalt::types::ReadChunk;
use bytes::{Bytes, BytesMut};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;

fn session(size: u64) -> Session {
    Session {
        export: "bench".into(),
        size,
        read_only: false,
        flags: 0,
        structured: true,
        meta_context: Some(META_BASE_ALLOCATION_ID),
        sizes: BlockSizes::default(),
        sizes_agreed: true,
    }
}

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode");
    // 32 pipelined 4 KiB READ headers, as a QD32 client sends them.
    let mut reads = BytesMut::new();
    for i in 0..32u64 {
        encode_request(&mut reads, 0, CMD_READ, i, i * 4096, 4096);
    }
    g.throughput(Throughput::Elements(32));
    g.bench_function("read_4k_x32", |b| {
        b.iter_batched_ref(
            || (reads.clone(), RequestDecoder::new(32 << 20)),
            |(buf, d)| {
                while let Some(r) = d.decode(buf).unwrap() {
                    black_box(validate(r, &session(1 << 30)).unwrap());
                }
            },
            BatchSize::SmallInput,
        )
    });
    let mut writes = BytesMut::new();
    for i in 0..32u64 {
        encode_request(&mut writes, 0, CMD_WRITE, i, i * 4096, 4096);
        writes.extend_from_slice(&[i as u8; 4096]);
    }
    g.bench_function("write_4k_x32", |b| {
        b.iter_batched_ref(
            || (writes.clone(), RequestDecoder::new(32 << 20)),
            |(buf, d)| {
                while let Some(r) = d.decode(buf).unwrap() {
                    black_box(validate(r, &session(1 << 30)).unwrap());
                }
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("encode");
    let data = Bytes::from(vec![7u8; 4096]);
    g.throughput(Throughput::Elements(32));
    g.bench_function("simple_ok_x32", |b| {
        let mut out = ReplyBuf::new();
        b.iter(|| {
            for h in 0..32 {
                encode_reply(Reply::Simple { handle: h, error: 0 }, &mut out);
            }
            black_box(out.segments().len());
            out.clear();
        })
    });
    g.bench_function("structured_read_4k_x32", |b| {
        let mut out = ReplyBuf::new();
        b.iter(|| {
            for h in 0..32 {
                let chunks = vec![ReadChunk::Data(data.clone())];
                encode_reply(
                    Reply::StructuredRead { handle: h, offset: h * 4096, chunks, df: false },
                    &mut out,
                );
            }
            black_box(out.segments().len());
            out.clear();
        })
    });
    g.bench_function("simple_read_4k_x32", |b| {
        let mut out = ReplyBuf::new();
        b.iter(|| {
            for h in 0..32 {
                encode_reply(
                    Reply::SimpleRead { handle: h, chunks: vec![ReadChunk::Data(data.clone())] },
                    &mut out,
                );
            }
            black_box(out.segments().len());
            out.clear();
        })
    });
    g.finish();
}

/// One request end to end in process: bytes in, volume call, bytes out.
fn request_path(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let size = 64u64 << 20;
    let node = rt
        .block_on(Node::open(StoreConfig { data_dirs: vec![dir.path().into()], engine: EngineKind::Auto }))
        .unwrap();
    let vol = node
        .create_volume(
            "bench",
            VolumeOptions {
                size,
                layout: Layout::contiguous(16 << 20).unwrap(),
                replicas: 1,
                min_replicas: 1,
                read_only: false,
            },
        )
        .unwrap();
    rt.block_on(vol.write(0, Bytes::from(vec![1u8; 1 << 20]), false)).unwrap();
    let s = session(size);
    let mut g = c.benchmark_group("request_path");
    g.throughput(Throughput::Bytes(4096));
    for (name, kind) in [("read_4k", CMD_READ), ("write_4k", CMD_WRITE)] {
        let mut frame = BytesMut::new();
        encode_request(&mut frame, 0, kind, 1, 8192, 4096);
        if kind == CMD_WRITE {
            frame.extend_from_slice(&[9u8; 4096]);
        }
        g.bench_function(name, |b| {
            let mut out = ReplyBuf::new();
            let mut d = RequestDecoder::new(32 << 20);
            b.iter(|| {
                let mut buf = frame.clone();
                let req = d.decode(&mut buf).unwrap().unwrap();
                let reply = match validate(req, &s).unwrap() {
                    Command::Read { offset, len, df } => {
                        let chunks = rt.block_on(vol.read(offset, len as u64)).unwrap();
                        Reply::StructuredRead { handle: 1, offset, chunks, df }
                    }
                    Command::Write { offset, data, fua } => {
                        rt.block_on(vol.write(offset, data, fua)).unwrap();
                        Reply::Simple { handle: 1, error: 0 }
                    }
                    other => unreachable!("{other:?}"),
                };
                encode_reply(reply, &mut out);
                black_box(out.segments().len());
                out.clear();
            })
        });
    }
    g.finish();
}

criterion_group!(benches, decode, encode, request_path);
criterion_main!(benches);
