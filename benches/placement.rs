//! Placement benchmarks on the scale cluster of `tests/placement_scale.rs`
//! (1,000 nodes in 10 zones, 4 to 16 TiB, R = 3): one extent, preparing a
//! map, and every extent of 100,000 volumes of 16 extents (1.6 million, what
//! a map change makes a rebalancer recompute).
//! Run: `cargo bench --bench placement`.

use basalt::placement::{Candidate, ClusterMap, Placer};
use basalt::types::{ExtentIndex, NodeId, VolumeId};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use std::time::Duration;

fn cluster() -> ClusterMap {
    ClusterMap {
        nodes: (0..1000u64)
            .map(|i| Candidate {
                id: NodeId(i + 1),
                zone: format!("zone-{}", i % 10),
                weight: [4u64, 8, 12, 16][(i * 7 % 4) as usize] << 40,
                eligible: true,
            })
            .collect(),
    }
}

fn place(c: &mut Criterion) {
    let map = cluster();
    let p = Placer::new(&map).unwrap();
    let mut g = c.benchmark_group("place");
    g.throughput(Throughput::Elements(1));
    g.bench_function("1000_nodes_r3_one_extent", |b| {
        let mut e = 0u64;
        b.iter(|| {
            e += 1;
            black_box(p.place(VolumeId(e >> 4), ExtentIndex(e & 15), 3).unwrap())
        })
    });
    g.bench_function("prepare_1000_nodes", |b| b.iter(|| black_box(Placer::new(black_box(&map)).unwrap())));
    g.throughput(Throughput::Elements(1_600_000));
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(30));
    g.bench_function("1000_nodes_r3_1.6M_extents", |b| {
        b.iter(|| {
            let mut primaries = 0u64;
            for v in 0..100_000u64 {
                for e in 0..16 {
                    primaries ^= p.place(VolumeId(v), ExtentIndex(e), 3).unwrap().primary().0;
                }
            }
            black_box(primaries)
        })
    });
    g.finish();
}

criterion_group!(benches, place);
criterion_main!(benches);
