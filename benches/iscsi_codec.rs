//! PDU codec throughput: encoding and decoding a 4 KiB Data-Out and a
//! 256 KiB Data-In, without and with CRC32C header and data digests.

use basalt::proto::iscsi::pdu::{self, CodecConfig, Opcode, Pdu};
use bytes::{Bytes, BytesMut};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;

fn bench(c: &mut Criterion) {
    for (name, op, len) in
        [("data_out_4k", Opcode::DataOut, 4096usize), ("data_in_256k", Opcode::DataIn, 256 << 10)]
    {
        for digests in [false, true] {
            let cfg = CodecConfig { max_recv_data: 1 << 20, header_digest: digests, data_digest: digests };
            let mut p = Pdu::new(op);
            p.set_itt(7);
            p.data = Bytes::from(vec![0xa5u8; len]);
            let mut wire = BytesMut::new();
            pdu::encode(&p, &cfg, &mut wire);
            let mut g = c.benchmark_group(format!("{name}{}", if digests { "_crc32c" } else { "" }));
            g.throughput(Throughput::Bytes(len as u64));
            g.bench_function("encode", |b| {
                let mut out = BytesMut::with_capacity(wire.len());
                b.iter(|| {
                    out.clear();
                    pdu::encode(black_box(&p), &cfg, &mut out);
                })
            });
            g.bench_function("decode", |b| {
                b.iter(|| {
                    let mut buf = wire.clone();
                    black_box(pdu::decode(&mut buf, &cfg).unwrap().unwrap())
                })
            });
            g.finish();
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
