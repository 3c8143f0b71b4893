//! Interleaved io_uring vs psync comparison: 4 KiB random reads (or writes
//! with `w`) at queue depth 32 on a 64 MiB extent, alternating engines in
//! short rounds so load from other processes hits both alike.
//!
//! `cargo run --release --example storage_compare [w]`

use basalt::storage::{EngineKind, Extent, Store, StoreConfig};
use basalt::types::{Epoch, ExtentIndex, ExtentKey, VolumeId};
use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use std::sync::Arc;
use std::time::Instant;
async fn rig(kind: EngineKind) -> (Arc<Store>, Arc<Extent>) {
    let dir =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("target/tmp/compare-{kind:?}"));
    let _ = std::fs::remove_dir_all(&dir);
    let store = Store::open(StoreConfig { data_dirs: vec![dir.clone()], engine: kind }).await.unwrap();
    let ext = store
        .extent(ExtentKey { volume: VolumeId(1), index: ExtentIndex(0) }, 64 << 20, Epoch(1))
        .await
        .unwrap();
    let chunk = Bytes::from(vec![0xa5u8; 1 << 20]);
    for i in 0..64u64 {
        ext.write(i << 20, chunk.clone(), false).await.unwrap();
    }
    store.close().await.unwrap();
    (store, ext)
}
async fn run(ext: &Arc<Extent>, n: u64, write: bool, seed: &mut u64) -> f64 {
    let data = Bytes::from(vec![1u8; 4096]);
    let mut next = || {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        (*seed % 16384) * 4096
    };
    let t0 = Instant::now();
    let mut fu = FuturesUnordered::new();
    let mut issued = 0;
    let op = |off: u64| {
        let d = data.clone();
        async move {
            if write {
                ext.write(off, d, false).await.unwrap();
            } else {
                ext.read(off, 4096).await.unwrap();
            }
        }
    };
    while issued < 32 {
        fu.push(op(next()));
        issued += 1;
    }
    while fu.next().await.is_some() {
        if issued < n {
            fu.push(op(next()));
            issued += 1;
        }
    }
    t0.elapsed().as_secs_f64()
}
fn main() {
    let write = std::env::args().nth(1).as_deref() == Some("w");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let (_s1, u) = rig(EngineKind::Uring).await;
        let (_s2, p) = rig(EngineKind::Psync).await;
        let (mut tu, mut tp, n) = (0.0, 0.0, 20_000u64);
        let mut seed = 88172645463325252u64;
        for _ in 0..8 {
            tu += run(&u, n, write, &mut seed).await;
            tp += run(&p, n, write, &mut seed).await;
        }
        println!(
            "{}: uring {:.0} iops, psync {:.0} iops, ratio {:.2}",
            if write { "randwrite" } else { "randread" },
            8.0 * n as f64 / tu,
            8.0 * n as f64 / tp,
            tp / tu
        );
    });
}
