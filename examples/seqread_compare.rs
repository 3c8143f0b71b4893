//! Interleaved io_uring vs psync comparison of 1 MiB sequential reads at
//! queue depth 8 through `Extent` (crc verified), on one runtime worker,
//! without any network: the store's side of the NBD `sr1m_qd8` job.
//!
//! `cargo run --release --example seqread_compare`

use basalt::storage::{EngineKind, Extent, Store, StoreConfig};
use basalt::types::{Epoch, ExtentIndex, ExtentKey, VolumeId};
use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SIZE: u64 = 1 << 30;
const QD: usize = 8;
const LEN: u32 = 1 << 20;

async fn rig(kind: EngineKind) -> (Arc<Store>, Arc<Extent>) {
    let dir =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("target/tmp/seqread-{kind:?}"));
    let _ = std::fs::remove_dir_all(&dir);
    let store = Store::open(StoreConfig { data_dirs: vec![dir.clone()], engine: kind }).await.unwrap();
    let ext =
        store.extent(ExtentKey { volume: VolumeId(1), index: ExtentIndex(0) }, SIZE, Epoch(1)).await.unwrap();
    let chunk = Bytes::from(vec![0xa5u8; LEN as usize]);
    for i in 0..SIZE / LEN as u64 {
        ext.write(i * LEN as u64, chunk.clone(), false).await.unwrap();
    }
    store.close().await.unwrap();
    (store, ext)
}

/// MiB/s of sequential reads for `secs`, `QD` in flight.
async fn run(ext: &Arc<Extent>, secs: u64) -> f64 {
    let t0 = Instant::now();
    let mut fu = FuturesUnordered::new();
    let (mut next, mut done) = (0u64, 0u64);
    loop {
        while fu.len() < QD && t0.elapsed() < Duration::from_secs(secs) {
            let e = ext.clone();
            let off = next;
            next = (next + LEN as u64) % SIZE;
            fu.push(async move { e.read(off, LEN).await.unwrap() });
        }
        match fu.next().await {
            Some(_) => done += 1,
            None => break,
        }
    }
    done as f64 / t0.elapsed().as_secs_f64()
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    rt.block_on(async {
        let (_s1, uring) = rig(EngineKind::Uring).await;
        let (_s2, psync) = rig(EngineKind::Psync).await;
        for round in 0..4 {
            for (name, e) in [("uring", &uring), ("psync", &psync)] {
                std::process::Command::new("sh")
                    .arg("-c")
                    .arg("sync; echo 3 > /proc/sys/vm/drop_caches")
                    .status()
                    .ok();
                println!("round {round} {name}: {:.0} MiB/s", run(e, 4).await);
            }
        }
    });
}
