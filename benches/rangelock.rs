//! Range lock under many overlapping waiters: N requests queued on one
//! block (the pipelined writes to one offset of issue 11), and N requests
//! over overlapping random ranges with a mix of shared and exclusive. Each
//! holder yields once before it releases, so the queue really builds up.
//!
//! `cargo bench --bench rangelock`. Wake-ups per release, not the clock,
//! are what changed: the first version woke every waiter on every release
//! (quadratic in N), the current one only those a release admits.

use basalt::storage::rangelock::RangeLock;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures::stream::{FuturesUnordered, StreamExt};
use std::ops::Range;

async fn run(lock: &RangeLock, reqs: &[(Range<u64>, bool)]) {
    let mut all: FuturesUnordered<_> = reqs
        .iter()
        .map(|(r, x)| async move {
            let g = lock.lock(r.clone(), *x).await;
            tokio::task::yield_now().await;
            drop(g);
        })
        .collect();
    while all.next().await.is_some() {}
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let mut g = c.benchmark_group("rangelock");
    for n in [100usize, 1000, 4000] {
        g.throughput(Throughput::Elements(n as u64));
        let same: Vec<(Range<u64>, bool)> = (0..n).map(|_| (0..1, true)).collect();
        g.bench_with_input(BenchmarkId::new("one_block_exclusive", n), &same, |b, reqs| {
            b.iter(|| rt.block_on(run(&RangeLock::default(), reqs)))
        });
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mixed: Vec<(Range<u64>, bool)> = (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let start = x % 64;
                (start..start + 1 + (x >> 8) % 16, (x >> 20).is_multiple_of(4))
            })
            .collect();
        g.bench_with_input(BenchmarkId::new("overlapping_mixed", n), &mixed, |b, reqs| {
            b.iter(|| rt.block_on(run(&RangeLock::default(), reqs)))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
