//! Cost of a FLUSH over several extents of one data directory: 32 random
//! 4 KiB writes spread over `EXTENTS` extents, then one flush, by each
//! barrier (`FlushBarrier`) and by flushing the extents one by one, rounds
//! interleaved. The store's side of the NBD `rw4k_qd32_fsync32` job.
//!
//! `cargo run --release --example flush_compare [EXTENTS]` (default 8)

use basalt::storage::{EngineKind, Extent, FlushBarrier, Store, StoreConfig, StoreOptions};
use basalt::types::{Epoch, ExtentIndex, ExtentKey, VolumeId};
use bytes::Bytes;
use std::sync::Arc;
use std::time::{Duration, Instant};

const EXTENT: u64 = 64 << 20;
const CYCLES: usize = 400;

async fn rig(name: &str, barrier: FlushBarrier, extents: u64) -> (Arc<Store>, Vec<Arc<Extent>>) {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("target/tmp/flush-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = StoreConfig { data_dirs: vec![dir], engine: EngineKind::Uring };
    let store = Store::open_with(cfg, StoreOptions { flush_barrier: barrier, ..StoreOptions::default() })
        .await
        .unwrap();
    let chunk = Bytes::from(vec![0x5au8; 1 << 20]);
    let mut exts = Vec::new();
    for i in 0..extents {
        let key = ExtentKey { volume: VolumeId(1), index: ExtentIndex(i) };
        let e = store.extent(key, EXTENT, Epoch(1)).await.unwrap();
        for off in (0..EXTENT).step_by(1 << 20) {
            e.write(off, chunk.clone(), false).await.unwrap();
        }
        exts.push(e);
    }
    store.flush_all().await.unwrap();
    (store, exts)
}

/// Mean flush latency over `CYCLES` cycles of 32 concurrent writes + flush.
async fn run(store: &Arc<Store>, exts: &[Arc<Extent>], one_by_one: bool, seed: &mut u64) -> Duration {
    let block = Bytes::from(vec![0xc3u8; 4096]);
    let mut total = Duration::ZERO;
    for _ in 0..CYCLES {
        let writes = (0..32).map(|_| {
            *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let e = &exts[(*seed >> 33) as usize % exts.len()];
            let off = (*seed >> 7) % (EXTENT / 4096) * 4096;
            e.write(off, block.clone(), false)
        });
        futures::future::try_join_all(writes).await.unwrap();
        let t = Instant::now();
        if one_by_one {
            futures::future::try_join_all(exts.iter().map(|e| e.flush())).await.unwrap();
        } else {
            store.flush_extents(exts.iter().cloned()).await.unwrap();
        }
        total += t.elapsed();
    }
    total / CYCLES as u32
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let n = std::env::args().nth(1).map_or(8, |a| a.parse().expect("EXTENTS is a number"));
    rt.block_on(async {
        let rigs = [
            ("each", rig("each", FlushBarrier::PerFile, n).await, true),
            ("file", rig("file", FlushBarrier::PerFile, n).await, false),
            ("fs", rig("fs", FlushBarrier::Filesystem, n).await, false),
            ("auto", rig("auto", FlushBarrier::Auto, n).await, false),
        ];
        let mut seed = 1u64;
        for round in 0..3 {
            for (name, (store, exts), each) in &rigs {
                let d = run(store, exts, *each, &mut seed).await;
                println!("round {round} {name:>5}: mean flush {:>4} us", d.as_micros());
            }
        }
    });
}
