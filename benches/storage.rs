//! Store benchmarks: crc32c per 4 KiB block, and 4 KiB random reads and
//! writes at queue depth 32 through `Extent` on each engine. The uring and
//! psync runs use a real disk (a temp dir under the target dir, never a
//! tmpfs), O_DIRECT, on a 64 MiB extent filled with data first.
//!
//! `cargo bench --bench storage`; compare with
//! `fio --name=r --filename=F --size=64M --rw=randread --bs=4k --iodepth=32 --ioengine=io_uring --direct=1`.

use basalt::storage::{EngineKind, Extent, Store, StoreConfig};
use basalt::types::{Epoch, ExtentIndex, ExtentKey, VolumeId};
use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures::stream::{FuturesUnordered, StreamExt};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

const EXTENT: u64 = 64 << 20;
const QD: usize = 32;

fn crc(c: &mut Criterion) {
    let block: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    let mut g = c.benchmark_group("crc32c");
    g.throughput(Throughput::Bytes(4096));
    g.bench_function("4k_block", |b| b.iter(|| crc32c::crc32c(black_box(&block))));
    g.finish();
}

struct Rig {
    _tmp: tempfile::TempDir,
    _store: Arc<Store>,
    ext: Arc<Extent>,
}

async fn rig(kind: EngineKind) -> Rig {
    let tmp = tempfile::Builder::new().prefix("bench-").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let cfg = StoreConfig { data_dirs: vec![tmp.path().to_path_buf()], engine: kind };
    let store = Store::open(cfg).await.unwrap();
    let key = ExtentKey { volume: VolumeId(1), index: ExtentIndex(0) };
    let ext = store.extent(key, EXTENT, Epoch(1)).await.unwrap();
    let chunk = Bytes::from(vec![0xa5u8; 1 << 20]);
    for i in 0..EXTENT >> 20 {
        ext.write(i << 20, chunk.clone(), false).await.unwrap();
    }
    store.close().await.unwrap();
    Rig { _tmp: tmp, _store: store, ext }
}

/// Runs `n` 4 KiB ops at random block offsets, `QD` at a time.
async fn run(ext: &Arc<Extent>, n: u64, write: bool, seed: &mut u64) -> Duration {
    let data = Bytes::from(vec![0x5au8; 4096]);
    let mut next = || {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        (*seed % (EXTENT / 4096)) * 4096
    };
    let start = Instant::now();
    let mut inflight = FuturesUnordered::new();
    let mut issued = 0;
    let op = |off: u64| {
        let data = data.clone();
        async move {
            if write {
                ext.write(off, data, false).await.unwrap();
            } else {
                black_box(ext.read(off, 4096).await.unwrap());
            }
        }
    };
    while issued < n && inflight.len() < QD {
        inflight.push(op(next()));
        issued += 1;
    }
    while inflight.next().await.is_some() {
        if issued < n {
            inflight.push(op(next()));
            issued += 1;
        }
    }
    start.elapsed()
}

fn engines(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    for kind in [EngineKind::Uring, EngineKind::Psync, EngineKind::Mem] {
        let rig = rt.block_on(rig(kind));
        let mut g = c.benchmark_group(format!("extent_{kind:?}").to_lowercase());
        g.throughput(Throughput::Elements(1));
        g.measurement_time(Duration::from_secs(5));
        g.sample_size(20);
        let mut seed = 0x1234_5678_9abc_def1u64;
        for (name, write) in [("randread_4k_qd32", false), ("randwrite_4k_qd32", true)] {
            g.bench_function(BenchmarkId::from_parameter(name), |b| {
                b.iter_custom(|iters| rt.block_on(run(&rig.ext, iters, write, &mut seed)))
            });
        }
        g.finish();
    }
}

criterion_group!(benches, crc, engines);
criterion_main!(benches);
