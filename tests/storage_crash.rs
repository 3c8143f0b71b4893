//! Crash property test on the mem engine against an oracle.
//!
//! Each seed runs a random workload (writes of random 512-aligned sizes,
//! FUA writes, trims, zeroing, flushes, batches of concurrent writes), then
//! crashes the in-memory disk, sometimes with ops still in flight, reopens
//! the store and checks every sector: a write flushed (or FUA-completed)
//! before the crash reads back exactly; any other sector reads as its last
//! durable value or one of the values written since; never a checksum
//! error or a sector mixing two writes. Three crash rounds per seed, so
//! recovery of a recovered extent is covered too.
//!
//! `BASALT_CRASH_SEEDS=n` sets the number of seeds, `BASALT_CRASH_SEED=s`
//! reruns one.

mod common;

use basalt::storage::{EngineKind, Extent, FlushBarrier, MemDisk, Store, StoreConfig, StoreOptions};
use basalt::types::{Epoch, ExtentIndex, ExtentKey, VolumeId, flatten_chunks};
use common::{version_of, versioned};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::PathBuf;
use std::sync::Arc;

/// The workload's window of the extent: 256 KiB.
const SECTORS: usize = 512;
const WINDOW: u64 = SECTORS as u64 * 512;

/// Extent geometry of a run; the workload touches only the last `WINDOW` bytes.
#[derive(Clone, Copy)]
struct Shape {
    extent: u64,
    region: u32,
    /// The region hysteresis in flushes. Short, so regions go clean and
    /// dirty again within one workload and both paths are exercised; 1 makes
    /// a flush write a region's deferred table pages and mark it clean at
    /// once, which only the "not in this sync" rule keeps safe.
    clean_after: u64,
    /// Extents the workload spreads over; with more than one, store-level
    /// flushes run one barrier over all of them, of this kind.
    extents: usize,
    barrier: FlushBarrier,
    /// The mem disk delivers completions a scheduler round late, so
    /// concurrent flushes really overlap (see `MemDisk::defer_completions`).
    deferred: bool,
}

/// Small regions so one extent has many (16), and dirty marking matters.
const SMALL: Shape = Shape {
    extent: WINDOW,
    region: 16 << 10,
    clean_after: 2,
    extents: 1,
    barrier: FlushBarrier::PerFile,
    deferred: false,
};
/// 4096 regions of 4 KiB: the dirty bitmap spills past the header's first
/// 512-byte sector, so a torn header write is possible and the two header
/// slots must save the day.
const LARGE: Shape = Shape { extent: 16 << 20, region: 4 << 10, ..SMALL };
const KEY: ExtentKey = ExtentKey { volume: VolumeId(9), index: ExtentIndex(0) };

/// What each sector may read back as after a crash. Sectors are numbered
/// across the extents: extent `e`'s window is `e * SECTORS..(e + 1) * SECTORS`.
struct Oracle {
    stable: Vec<u64>,
    pending: Vec<Vec<u64>>,
}

impl Oracle {
    fn new(extents: usize) -> Oracle {
        Oracle { stable: vec![0; SECTORS * extents], pending: vec![Vec::new(); SECTORS * extents] }
    }

    fn wrote(&mut self, first: usize, n: usize, v: u64) {
        for s in first..first + n {
            self.pending[s].push(v);
        }
    }

    fn durable(&mut self, first: usize, n: usize, v: u64) {
        for s in first..first + n {
            self.stable[s] = v;
            self.pending[s].clear();
        }
    }

    /// Extent `e`'s writes are durable (all extents' if `None`).
    fn flushed(&mut self, e: Option<usize>) {
        let sectors = e.map_or(0..self.stable.len(), |e| e * SECTORS..(e + 1) * SECTORS);
        for s in sectors {
            if let Some(&v) = self.pending[s].last() {
                self.stable[s] = v;
            }
            self.pending[s].clear();
        }
    }
}

/// A random 512-aligned range inside one extent's window: (first sector
/// in the oracle's numbering, sector count).
fn range(rng: &mut StdRng, extents: usize) -> (usize, usize) {
    let n = match rng.gen_range(0..10) {
        0..=4 => rng.gen_range(1..=8),
        5..=7 => rng.gen_range(8..=40),
        _ => rng.gen_range(40..=200),
    };
    (rng.gen_range(0..extents) * SECTORS + rng.gen_range(0..=SECTORS - n), n)
}

fn key(e: usize) -> ExtentKey {
    ExtentKey { index: ExtentIndex(e as u64), ..KEY }
}

async fn open(disk: &Arc<MemDisk>, shape: Shape) -> Arc<Store> {
    let cfg = StoreConfig { data_dirs: vec![PathBuf::from("/mem/crash")], engine: EngineKind::Mem };
    Store::open_with(
        cfg,
        StoreOptions {
            region_size: shape.region,
            mem_disk: Some(disk.clone()),
            clean_after_flushes: shape.clean_after,
            flush_barrier: shape.barrier,
        },
    )
    .await
    .unwrap()
}

async fn run_seed(seed: u64, shape: Shape) {
    let base = shape.extent - WINDOW;
    let mut rng = StdRng::seed_from_u64(seed);
    let disk = MemDisk::new();
    disk.defer_completions(shape.deferred);
    let mut oracle = Oracle::new(shape.extents);
    let mut version = 0u64;
    // Oracle sector -> (extent, byte offset in it).
    let at = |s: usize| (s / SECTORS, base + (s % SECTORS) as u64 * 512);
    for round in 0..3 {
        let store = open(&disk, shape).await;
        let mut exts: Vec<Arc<Extent>> = Vec::new();
        for e in 0..shape.extents {
            exts.push(store.extent(key(e), shape.extent, Epoch(1)).await.unwrap());
        }
        // Verify what the previous crash left, then take it as the new baseline.
        if round > 0 {
            for (e, ext) in exts.iter().enumerate() {
                let data = match ext.read(base, WINDOW as u32).await {
                    Ok(chunks) => flatten_chunks(&chunks),
                    Err(err) => panic!("round {round}: read of extent {e} after recovery failed: {err}"),
                };
                for (i, bytes) in data.chunks(512).enumerate() {
                    let s = e * SECTORS + i;
                    let v = version_of(bytes)
                        .unwrap_or_else(|| panic!("round {round}: sector {s} is torn inside"));
                    assert!(
                        v == oracle.stable[s] || oracle.pending[s].contains(&v),
                        "round {round}: sector {s} reads version {v}, allowed {} or {:?}",
                        oracle.stable[s],
                        oracle.pending[s]
                    );
                    oracle.stable[s] = v;
                    oracle.pending[s].clear();
                }
            }
        }
        // Half the rounds lose power at a random disk op: inside a flush,
        // between a dirty mark and its write, anywhere. Every op counts as
        // possibly applied before it runs (the oracle's pending set) and as
        // durable only once it has succeeded; the first failure is the crash.
        let crash_point = rng.gen_bool(0.5);
        if crash_point {
            disk.crash_after(rng.gen_range(1..120 * shape.extents as u64), rng.r#gen());
        }
        for _ in 0..rng.gen_range(5..40 * shape.extents) {
            let (first, n) = range(&mut rng, shape.extents);
            let (e, off) = at(first);
            let (ext, len) = (&exts[e], n as u64 * 512);
            version += 1;
            let ok = match rng.gen_range(0..100) {
                0..=44 => {
                    oracle.wrote(first, n, version);
                    ext.write(off, versioned(version, n), false).await.is_ok()
                }
                45..=54 => {
                    oracle.wrote(first, n, version);
                    let ok = ext.write(off, versioned(version, n), true).await.is_ok();
                    if ok {
                        oracle.durable(first, n, version);
                    }
                    ok
                }
                55..=64 => {
                    let fua = rng.gen_bool(0.2);
                    oracle.wrote(first, n, 0);
                    let ok = ext.trim(off, len, fua).await.is_ok();
                    if ok && fua {
                        oracle.durable(first, n, 0);
                    }
                    ok
                }
                65..=71 => {
                    oracle.wrote(first, n, 0);
                    ext.write_zeroes(off, len, rng.gen_bool(0.5), false).await.is_ok()
                }
                72..=83 if shape.extents > 1 && rng.gen_bool(0.4) => {
                    // Concurrent flushes, each of a random subset of the
                    // extents (or one extent on its own): the ones that
                    // queue behind a running execution must be covered by
                    // the next, which syncs the union of their extents.
                    let mut flushes = Vec::new();
                    for _ in 0..rng.gen_range(2..6) {
                        let subset: Vec<usize> = (0..shape.extents).filter(|_| rng.gen_bool(0.5)).collect();
                        let (store, exts, one) = (store.clone(), exts.clone(), rng.gen_bool(0.2));
                        flushes.push(async move {
                            let r = match (one, subset.first()) {
                                (true, Some(&e)) => exts[e].flush().await,
                                _ => store.flush_extents(subset.iter().map(|&e| exts[e].clone())).await,
                            };
                            (r, if one { subset.into_iter().take(1).collect() } else { subset })
                        });
                    }
                    let mut all_ok = true;
                    for (r, subset) in futures::future::join_all(flushes).await {
                        if r.is_err() {
                            all_ok = false;
                        } else {
                            subset.into_iter().for_each(|e| oracle.flushed(Some(e)));
                        }
                    }
                    all_ok
                }
                72..=83 if shape.extents > 1 && rng.gen_bool(0.5) => {
                    // One barrier over every extent (a volume's FLUSH).
                    let ok = store.flush_extents(exts.iter().cloned()).await.is_ok();
                    if ok {
                        oracle.flushed(None);
                    }
                    ok
                }
                72..=83 => {
                    let ok = ext.flush().await.is_ok();
                    if ok {
                        oracle.flushed(Some(e));
                    }
                    ok
                }
                _ => {
                    // Concurrent writes to disjoint ranges, some FUA (they
                    // share dirty marking and flushes: group commit).
                    let mut taken = vec![false; SECTORS * shape.extents];
                    let mut ops = Vec::new();
                    let mut fua_ops = Vec::new();
                    for _ in 0..rng.gen_range(2..6) {
                        let (first, n) = range(&mut rng, shape.extents);
                        if taken[first..first + n].iter().any(|&t| t) {
                            continue;
                        }
                        taken[first..first + n].fill(true);
                        version += 1;
                        let fua = rng.gen_bool(0.3);
                        oracle.wrote(first, n, version);
                        fua_ops.push(fua.then_some((first, n, version)));
                        let (e, off) = at(first);
                        ops.push(exts[e].write(off, versioned(version, n), fua));
                    }
                    let mut all_ok = true;
                    for (r, fua) in futures::future::join_all(ops).await.into_iter().zip(fua_ops) {
                        match (r, fua) {
                            (Ok(()), Some((first, n, v))) => oracle.durable(first, n, v),
                            (Ok(()), None) => {}
                            (Err(_), _) => all_ok = false,
                        }
                    }
                    all_ok
                }
            };
            if !ok {
                assert!(crash_point && !disk.crash_pending(), "round {round}: an op failed without a crash");
                break;
            }
        }
        if crash_point {
            if disk.crash_pending() {
                disk.crash_after(0, rng.r#gen());
            }
            continue;
        }
        // Sometimes crash with ops in flight: they count as unflushed writes.
        let mut tasks = Vec::new();
        if rng.gen_bool(0.5) {
            for _ in 0..rng.gen_range(1..4) {
                let (first, n) = range(&mut rng, shape.extents);
                version += 1;
                let (e, off) = at(first);
                let (ext, v, kind) = (exts[e].clone(), version, rng.gen_range(0..5));
                match kind {
                    2 => oracle.wrote(first, n, 0),
                    3 | 4 => {}
                    _ => oracle.wrote(first, n, v),
                }
                let (store, all) = (store.clone(), exts.clone());
                tasks.push(tokio::spawn(async move {
                    let len = n as u64 * 512;
                    let _ = match kind {
                        0 => ext.write(off, versioned(v, n), false).await,
                        1 => ext.write(off, versioned(v, n), true).await,
                        2 => ext.trim(off, len, false).await,
                        3 => ext.flush().await,
                        _ => store.flush_extents(all).await,
                    };
                }));
            }
            for _ in 0..rng.gen_range(0..12) {
                tokio::task::yield_now().await;
            }
        }
        store.crash(rng.r#gen()).unwrap();
        for t in tasks {
            t.await.unwrap();
        }
    }
}

fn run_seeds(shape: Shape, default_count: u64) {
    let seeds: Vec<u64> = match std::env::var("BASALT_CRASH_SEED") {
        Ok(s) => vec![s.parse().expect("BASALT_CRASH_SEED is a number")],
        Err(_) => {
            let n = std::env::var("BASALT_CRASH_SEEDS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(default_count);
            (0..n).collect()
        }
    };
    for seed in seeds {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rt.block_on(run_seed(seed, shape))));
        if result.is_err() {
            panic!("crash test failed for seed {seed}; rerun with BASALT_CRASH_SEED={seed}");
        }
    }
}

#[test]
fn crash_recovery_matches_oracle() {
    run_seeds(SMALL, 3000);
}

#[test]
fn crash_recovery_shortest_hysteresis() {
    run_seeds(Shape { clean_after: 1, ..SMALL }, 2000);
}

#[test]
fn crash_recovery_large_bitmap() {
    run_seeds(LARGE, 1000);
}

/// Four extents flushed together with one syncfs-style barrier (the mem
/// engine's `sync_fs` makes every file durable, as a filesystem sync does).
#[test]
fn crash_recovery_several_extents_filesystem_barrier() {
    run_seeds(Shape { extents: 4, barrier: FlushBarrier::Filesystem, deferred: true, ..SMALL }, 800);
}

/// Four extents flushed together with one fdatasync each.
#[test]
fn crash_recovery_several_extents_per_file_barrier() {
    run_seeds(Shape { extents: 4, barrier: FlushBarrier::PerFile, deferred: true, ..SMALL }, 800);
}

/// Every crash point inside a flush, exhaustively, in the two states where
/// marking a region clean is delicate:
/// - `deferred`: every region has a block rewritten (version 2: only its crc
///   changes, so its table page is deferred) and one flush makes the data
///   durable while no region has idled yet; then a write elsewhere, and the
///   next flush both writes the deferred page and could mark block 0's
///   region clean;
/// - otherwise: block 0 is rewritten and the next flush is the one that crashes.
///
/// The disk loses power right after the `n`th disk op of that flush, with
/// each seed's choice of which unsynced sectors survive. Block 0 must then
/// read as version 2 if a flush completed after it was written, else as 1 or
/// 2, and never fail its checksum: a header that marks a region clean in the
/// same fdatasync that makes the region's table page durable can survive
/// without the page.
#[test]
fn crash_at_every_step_of_a_flush() {
    let shape = Shape { clean_after: 1, ..SMALL };
    let regions = WINDOW / shape.region as u64;
    let first_block = |r: u64| r * shape.region as u64;
    // A torn header falls back to the other slot, so the whole new header
    // (8 sectors) must survive for such a bug to show: 1 crash in 256.
    for deferred in [false, true] {
        for n in 1..=5 {
            for seed in 0..768u64 {
                let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
                rt.block_on(async {
                    let disk = MemDisk::new();
                    let store = open(&disk, shape).await;
                    let ext = store.extent(KEY, shape.extent, Epoch(1)).await.unwrap();
                    for r in 0..regions {
                        ext.write(first_block(r), versioned(1, 8), false).await.unwrap();
                    }
                    ext.flush().await.unwrap();
                    ext.write(0, versioned(2, 8), false).await.unwrap();
                    if deferred {
                        for r in 1..regions {
                            ext.write(first_block(r), versioned(2, 8), false).await.unwrap();
                        }
                        ext.flush().await.unwrap();
                        ext.write(first_block(1), versioned(3, 8), false).await.unwrap();
                    }
                    disk.crash_after(n, seed);
                    let flushed = ext.flush().await.is_ok() || deferred;
                    if disk.crash_pending() {
                        disk.crash_after(0, seed);
                    }
                    drop((ext, store));
                    let store = open(&disk, shape).await;
                    let ext = store.extent(KEY, shape.extent, Epoch(1)).await.unwrap();
                    let at = format!("deferred={deferred} n={n} seed={seed}");
                    let data = match ext.read(0, WINDOW as u32).await {
                        Ok(chunks) => flatten_chunks(&chunks),
                        Err(e) => panic!("{at}: read after recovery failed: {e}"),
                    };
                    for (s, bytes) in data[..4096].chunks(512).enumerate() {
                        let v = version_of(bytes).unwrap_or_else(|| panic!("{at}: sector {s} torn"));
                        let ok = if flushed { v == 2 } else { v == 1 || v == 2 };
                        assert!(ok, "{at}: sector {s} reads version {v} (flushed: {flushed})");
                    }
                });
            }
        }
    }
}

/// A whole-extent copy (reconciliation's, to a replica without the extent)
/// with power lost at every step of it: creating the file marked
/// incomplete, writing its pieces, the last piece's FUA and the clearing of
/// the mark. After the crash the replica is absent or still marked
/// incomplete, except once `complete` returned: then it is complete and
/// reads back the whole copy exactly. Never complete and partial, which a
/// reconciliation would take for a replica holding the extent.
#[test]
fn a_whole_copy_cut_by_a_crash_stays_marked_incomplete() {
    let shape = SMALL;
    let pieces = 4u64;
    let piece = WINDOW / pieces;
    let mut crashed_marked = 0;
    for n in 1..=40u64 {
        for seed in 0..16u64 {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async {
                let at = format!("n={n} seed={seed}");
                let disk = MemDisk::new();
                let store = open(&disk, shape).await;
                disk.crash_after(n, seed);
                let copied = async {
                    let ext = store.extent_for_copy(KEY, shape.extent, Epoch(1)).await?;
                    assert!(ext.is_incomplete(), "{at}: a copy's extent starts incomplete");
                    for p in 0..pieces {
                        let last = p + 1 == pieces;
                        ext.write(p * piece, versioned(p + 1, (piece / 512) as usize), last).await?;
                    }
                    ext.complete().await?;
                    assert!(!ext.is_incomplete(), "{at}");
                    Ok::<_, basalt::storage::StoreError>(())
                }
                .await;
                if disk.crash_pending() {
                    disk.crash_after(0, seed);
                }
                drop(store);
                let store = open(&disk, shape).await;
                if !store.contains(KEY) {
                    assert!(copied.is_err(), "{at}: a completed copy's file is gone");
                    return;
                }
                let ext = store.extent(KEY, shape.extent, Epoch(1)).await.unwrap();
                if ext.is_incomplete() {
                    assert!(copied.is_err(), "{at}: a completed copy is still marked incomplete");
                    crashed_marked += 1;
                    return;
                }
                let data = flatten_chunks(&ext.read(0, WINDOW as u32).await.unwrap());
                for (s, bytes) in data.chunks(512).enumerate() {
                    let want = s as u64 / (piece / 512) + 1;
                    assert_eq!(version_of(bytes), Some(want), "{at}: sector {s} of a complete copy");
                }
            });
        }
    }
    // The crash points really fell inside the copy.
    assert!(crashed_marked > 0, "no crash left a marked, incomplete copy");
}
