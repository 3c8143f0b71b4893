//! The same test bodies against every engine (io_uring, psync, mem), plus
//! the ENOSPC test on a small loop-mounted filesystem.

mod common;

use basalt::layout::Layout;
use basalt::node::{Node, Volume, VolumeError, VolumeOptions};
use basalt::storage::{EngineKind, Extent, FlushBarrier, Store, StoreConfig, StoreError, StoreOptions};
use basalt::types::{
    BlockState, Epoch, ExtentIndex, ExtentKey, MapExtent, ReadChunk, VolumeId, flatten_chunks,
};
use bytes::Bytes;
use common::{version_of, versioned};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::task::Poll;

const MIB: u64 = 1 << 20;

fn key(i: u64) -> ExtentKey {
    ExtentKey { volume: VolumeId(1), index: ExtentIndex(i) }
}

/// Data directories for one test: real ones under the target dir (a real
/// disk, so O_DIRECT works) or names for the mem engine.
struct Dirs {
    kind: EngineKind,
    paths: Vec<PathBuf>,
    _tmp: Option<tempfile::TempDir>,
    opts: StoreOptions,
}

impl Dirs {
    fn new(kind: EngineKind, n: usize) -> Dirs {
        if kind == EngineKind::Mem {
            let paths = (0..n).map(|i| PathBuf::from(format!("/mem/d{i}"))).collect();
            let disk = basalt::storage::MemDisk::new();
            return Dirs {
                kind,
                paths,
                _tmp: None,
                opts: StoreOptions { mem_disk: Some(disk), ..Default::default() },
            };
        }
        let tmp =
            tempfile::Builder::new().prefix("storage-").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let paths = (0..n).map(|i| tmp.path().join(format!("d{i}"))).collect();
        Dirs { kind, paths, _tmp: Some(tmp), opts: StoreOptions::default() }
    }

    async fn open(&self) -> Arc<Store> {
        let cfg = StoreConfig { data_dirs: self.paths.clone(), engine: self.kind };
        let s = Store::open_with(cfg, self.opts.clone()).await.unwrap();
        assert_eq!(s.engine_kind(), self.kind);
        s
    }

    /// Flips one byte of an extent file.
    fn corrupt(&self, ext: &Extent, file_offset: u64) {
        if self.kind == EngineKind::Mem {
            self.opts.mem_disk.as_ref().unwrap().corrupt(ext.path(), file_offset, 0x5a).unwrap();
        } else {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().read(true).write(true).open(ext.path()).unwrap();
            let mut b = [0u8; 1];
            f.read_exact_at(&mut b, file_offset).unwrap();
            b[0] ^= 0x5a;
            f.write_all_at(&b, file_offset).unwrap();
            f.sync_all().unwrap();
        }
    }
}

fn pattern(seed: u64, len: usize) -> Bytes {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

async fn read_flat(e: &Extent, off: u64, len: u32) -> Vec<u8> {
    flatten_chunks(&e.read(off, len).await.unwrap()).to_vec()
}

const ZERO: BlockState = BlockState { allocated: true, zero: true };

async fn write_read_unaligned(kind: EngineKind) {
    let d = Dirs::new(kind, 1);
    let s = d.open().await;
    let e = s.extent(key(0), 4 * MIB, Epoch(1)).await.unwrap();
    let mut model = vec![0u8; 4 * MIB as usize];
    let writes: [(u64, usize); 7] = [
        (512, 512),
        (4096 - 512, 1536),
        (8192 + 1024, 64 << 10),
        (0, 4096),
        (3 * MIB - 512, 8192),
        (1536, 512),
        (4 * MIB - 512, 512),
    ];
    for (i, &(off, len)) in writes.iter().enumerate() {
        let data = pattern(i as u64, len);
        e.write(off, data.clone(), false).await.unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&data);
    }
    for &(off, len) in &[
        (0u64, 16384u32),
        (512, 512),
        (1024, 7168),
        (8192, 70 << 10),
        (3 * MIB - 4096, 16384),
        (4 * MIB - 4096, 4096),
    ] {
        assert_eq!(
            read_flat(&e, off, len).await,
            &model[off as usize..off as usize + len as usize],
            "{off}+{len}"
        );
    }
    assert_eq!(read_flat(&e, 0, (4 * MIB) as u32).await, model);
}

async fn rmw_keeps_neighbours(kind: EngineKind) {
    let d = Dirs::new(kind, 1);
    let s = d.open().await;
    let e = s.extent(key(0), MIB, Epoch(1)).await.unwrap();
    let base = pattern(1, 8192);
    e.write(0, base.clone(), false).await.unwrap();
    // Every sector of block 0 in turn, then one sector spanning nothing else.
    let mut model = base.to_vec();
    for sector in 0..8u64 {
        let p = pattern(100 + sector, 512);
        e.write(sector * 512, p.clone(), false).await.unwrap();
        model[(sector * 512) as usize..((sector + 1) * 512) as usize].copy_from_slice(&p);
        assert_eq!(read_flat(&e, 0, 8192).await, model);
    }
    // A partial write into a hole block: the rest of the block reads as zeros.
    e.write(16384 + 1024, pattern(7, 512), false).await.unwrap();
    let mut want = vec![0u8; 4096];
    want[1024..1536].copy_from_slice(&pattern(7, 512));
    assert_eq!(read_flat(&e, 16384, 4096).await, want);
}

async fn holes_are_reported(kind: EngineKind) {
    let d = Dirs::new(kind, 1);
    let s = d.open().await;
    let e = s.extent(key(0), 2 * MIB, Epoch(1)).await.unwrap();
    assert_eq!(e.read(0, MIB as u32).await.unwrap(), vec![ReadChunk::Hole(MIB as u32)]);
    let data = pattern(3, 4096);
    e.write(8192, data.clone(), false).await.unwrap();
    let r = e.read(0, 16384).await.unwrap();
    assert_eq!(r, vec![ReadChunk::Hole(8192), ReadChunk::Data(data.clone()), ReadChunk::Hole(4096)]);
    // Sub-block reads of holes and data.
    let r = e.read(8192 + 512, 4096).await.unwrap();
    assert_eq!(r, vec![ReadChunk::Data(data.slice(512..)), ReadChunk::Hole(512)]);
    assert_eq!(e.read(512, 1024).await.unwrap(), vec![ReadChunk::Hole(1024)]);
}

async fn trim_and_zeroes(kind: EngineKind) {
    let d = Dirs::new(kind, 1);
    let s = d.open().await;
    let e = s.extent(key(0), 2 * MIB, Epoch(1)).await.unwrap();
    let data = pattern(5, 32768);
    e.write(0, data.clone(), false).await.unwrap();
    e.trim(4096, 8192, false).await.unwrap();
    let r = e.read(0, 16384).await.unwrap();
    assert_eq!(
        r,
        vec![
            ReadChunk::Data(data.slice(0..4096)),
            ReadChunk::Hole(8192),
            ReadChunk::Data(data.slice(12288..16384))
        ]
    );
    // Partial-block trim: zero-written, the block stays data.
    e.trim(16384 + 512, 1024, false).await.unwrap();
    let mut want = data.slice(16384..20480).to_vec();
    want[512..1536].fill(0);
    assert_eq!(read_flat(&e, 16384, 4096).await, want);
    // Zeroes without deallocation: allocated zeros, read as zeros without I/O.
    e.write_zeroes(20480, 8192, false, false).await.unwrap();
    assert_eq!(e.read(20480, 8192).await.unwrap(), vec![ReadChunk::Hole(8192)]);
    // Zeroes with deallocation: holes.
    e.write_zeroes(28672, 4096, true, false).await.unwrap();
    assert_eq!(
        e.map(0, 64 << 10).unwrap(),
        vec![
            MapExtent { len: 4096, state: BlockState::DATA },
            MapExtent { len: 8192, state: BlockState::HOLE },
            MapExtent { len: 4096, state: BlockState::DATA },
            MapExtent { len: 4096, state: BlockState::DATA },
            MapExtent { len: 8192, state: ZERO },
            MapExtent { len: (64 << 10) - 28672, state: BlockState::HOLE },
        ]
        .into_iter()
        .fold(Vec::<MapExtent>::new(), |mut v, m| {
            match v.last_mut() {
                Some(l) if l.state == m.state => l.len += m.len,
                _ => v.push(m),
            }
            v
        })
    );
    // A write over zeroed blocks makes them data again.
    e.write(20480, pattern(9, 4096), false).await.unwrap();
    assert_eq!(read_flat(&e, 20480, 4096).await, pattern(9, 4096).to_vec());
    // Unaligned zeroing across blocks: head and tail partial, middle whole.
    e.write(MIB, pattern(11, 16384), false).await.unwrap();
    e.write_zeroes(MIB + 1024, 16384 - 2048, true, false).await.unwrap();
    let mut want = pattern(11, 16384).to_vec();
    want[1024..16384 - 1024].fill(0);
    assert_eq!(read_flat(&e, MIB, 16384).await, want);
    assert_eq!(
        e.map(MIB, 16384).unwrap(),
        vec![
            MapExtent { len: 4096, state: BlockState::DATA },
            MapExtent { len: 8192, state: BlockState::HOLE },
            MapExtent { len: 4096, state: BlockState::DATA },
        ]
    );
}

async fn map_exact(kind: EngineKind) {
    let d = Dirs::new(kind, 1);
    let s = d.open().await;
    let e = s.extent(key(0), MIB, Epoch(1)).await.unwrap();
    assert_eq!(e.map(0, MIB).unwrap(), vec![MapExtent { len: MIB, state: BlockState::HOLE }]);
    e.write(4096, pattern(1, 8192), false).await.unwrap();
    e.write_zeroes(12288, 4096, false, false).await.unwrap();
    assert_eq!(
        e.map(512, 20480 - 512).unwrap(),
        vec![
            MapExtent { len: 4096 - 512, state: BlockState::HOLE },
            MapExtent { len: 8192, state: BlockState::DATA },
            MapExtent { len: 4096, state: ZERO },
            MapExtent { len: 4096, state: BlockState::HOLE },
        ]
    );
    assert_eq!(e.map(4096 + 512, 1024).unwrap(), vec![MapExtent { len: 1024, state: BlockState::DATA }]);
    assert_eq!(e.map(0, 0).unwrap(), vec![]);
}

async fn reopen_keeps_data(kind: EngineKind) {
    let d = Dirs::new(kind, 1);
    let data = pattern(21, 3 * 4096 + 512);
    {
        let s = d.open().await;
        let e = s.extent(key(3), 2 * MIB, Epoch(4)).await.unwrap();
        e.write(MIB - 4096, data.clone(), false).await.unwrap();
        e.trim(MIB - 4096, 4096, false).await.unwrap();
        e.write_zeroes(MIB, 4096, false, false).await.unwrap();
        s.close().await.unwrap();
        assert_eq!(e.flush_counter().await, 1);
    }
    let s = d.open().await;
    assert!(s.contains(key(3)));
    assert!(!s.contains(key(4)));
    let e = s.extent(key(3), 2 * MIB, Epoch(1)).await.unwrap();
    assert_eq!(e.epoch().await, Epoch(4));
    assert_eq!(e.flush_counter().await, 1);
    let r = e.read(MIB - 4096, data.len() as u32).await.unwrap();
    assert_eq!(
        r,
        vec![ReadChunk::Hole(8192), ReadChunk::Data(data.slice(8192..))],
        "trimmed block, zeroed block, then data"
    );
    assert!(matches!(
        s.extent(key(3), MIB, Epoch(1)).await,
        Err(StoreError::SizeMismatch { have, want, .. }) if have == 2 * MIB && want == MIB
    ));
    // Reopen without close (a clean process exit without shutdown) keeps data too.
    e.write(0, data.clone(), false).await.unwrap();
    e.flush().await.unwrap();
    drop(e);
    drop(s);
    let s = d.open().await;
    let e = s.extent(key(3), 2 * MIB, Epoch(1)).await.unwrap();
    assert_eq!(read_flat(&e, 0, data.len() as u32).await, data.to_vec());
    // An unflushed overwrite of flushed blocks, then exit without close: the
    // region is dirty on disk, so reopening re-takes the crc and the new data
    // reads back (no checksum error).
    let newer = pattern(22, 8192);
    e.write(0, newer.clone(), false).await.unwrap();
    drop(e);
    drop(s);
    let s = d.open().await;
    let e = s.extent(key(3), 2 * MIB, Epoch(1)).await.unwrap();
    assert_eq!(read_flat(&e, 0, 8192).await, newer.to_vec());
}

async fn flush_and_fua(kind: EngineKind) {
    let d = Dirs::new(kind, 1);
    let s = d.open().await;
    let e = s.extent(key(0), 2 * MIB, Epoch(1)).await.unwrap();
    let a = pattern(31, 8192);
    let b = pattern(32, 1024);
    e.write(0, a.clone(), false).await.unwrap();
    s.flush_all().await.unwrap();
    assert_eq!(e.flush_counter().await, 1);
    e.write(MIB + 512, b.clone(), true).await.unwrap();
    assert_eq!(e.flush_counter().await, 2, "FUA flushes the extent");
    // Flushes with nothing written since the last one cost no I/O.
    e.flush().await.unwrap();
    e.flush().await.unwrap();
    assert_eq!(e.flush_counter().await, 2);
    e.write(0, a.clone(), false).await.unwrap();
    e.flush().await.unwrap();
    assert_eq!(e.flush_counter().await, 3);
    if kind == EngineKind::Mem {
        // Power loss right after: both the flushed and the FUA write survive.
        e.write(4096, pattern(33, 4096), false).await.unwrap();
        s.crash(7).unwrap();
        assert!(matches!(e.read(0, 4096).await, Err(StoreError::Closed)));
        let s = d.open().await;
        let e = s.extent(key(0), 2 * MIB, Epoch(1)).await.unwrap();
        assert_eq!(read_flat(&e, 0, 4096).await, a[..4096].to_vec());
        let blk1 = read_flat(&e, 4096, 4096).await;
        for (i, sector) in blk1.chunks(512).enumerate() {
            let r = 4096 + i * 512..4096 + (i + 1) * 512;
            assert!(
                sector == &a[r.clone()] || sector == &pattern(33, 4096)[i * 512..(i + 1) * 512],
                "sector {i}"
            );
        }
        assert_eq!(read_flat(&e, MIB + 512, 1024).await, b.to_vec());
    }
}

async fn range_errors(kind: EngineKind) {
    let d = Dirs::new(kind, 1);
    let s = d.open().await;
    let e = s.extent(key(0), MIB, Epoch(1)).await.unwrap();
    let k = key(0);
    assert!(
        matches!(e.read(MIB, 512).await, Err(StoreError::OutOfRange { key, offset, len: 512, size }) if key == k && offset == MIB && size == MIB)
    );
    assert!(matches!(e.read(MIB - 512, 1024).await, Err(StoreError::OutOfRange { .. })));
    assert!(matches!(e.write(MIB - 512, pattern(1, 1024), false).await, Err(StoreError::OutOfRange { .. })));
    assert!(matches!(e.trim(u64::MAX - 511, 512, false).await, Err(StoreError::OutOfRange { .. })));
    assert!(matches!(e.write_zeroes(0, MIB + 512, true, false).await, Err(StoreError::OutOfRange { .. })));
    assert!(matches!(e.map(MIB, 512), Err(StoreError::OutOfRange { .. })));
    assert!(matches!(e.read(100, 512).await, Err(StoreError::Misaligned { offset: 100, len: 512 })));
    assert!(matches!(e.read(0, 100).await, Err(StoreError::Misaligned { offset: 0, len: 100 })));
    assert!(matches!(e.write(512, pattern(1, 700), false).await, Err(StoreError::Misaligned { .. })));
    assert!(matches!(e.trim(1, 512, false).await, Err(StoreError::Misaligned { .. })));
    assert!(matches!(e.write_zeroes(0, 1, false, false).await, Err(StoreError::Misaligned { .. })));
    assert!(matches!(e.map(3, 512), Err(StoreError::Misaligned { .. })));
    assert!(matches!(s.extent(key(9), 1000, Epoch(1)).await, Err(StoreError::BadSize { .. })));
    assert!(!s.contains(key(9)));
    // Nothing above changed the extent.
    assert_eq!(e.map(0, MIB).unwrap(), vec![MapExtent { len: MIB, state: BlockState::HOLE }]);
}

async fn concurrent_overlapping(kind: EngineKind) {
    let d = Dirs::new(kind, 1);
    let s = d.open().await;
    let e = s.extent(key(0), MIB, Epoch(1)).await.unwrap();
    let span = 64u64 << 10; // all tasks hammer the same 64 KiB
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let e = e.clone();
        tasks.push(tokio::spawn(async move {
            let mut x = t + 1;
            for i in 0..60u64 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let sectors = 1 + (x >> 33) % 24;
                let off = ((x >> 17) % (span / 512 - sectors)) * 512;
                if t % 2 == 0 {
                    let v = (t << 32) | (i + 1);
                    match (x >> 7) % 10 {
                        0 => e.trim(off, sectors * 512, false).await.unwrap(),
                        1 => e.write(off, versioned(v, sectors as usize), true).await.unwrap(),
                        _ => e.write(off, versioned(v, sectors as usize), false).await.unwrap(),
                    }
                } else {
                    let data = flatten_chunks(&e.read(off, (sectors * 512) as u32).await.unwrap());
                    for s in data.chunks(512) {
                        assert!(version_of(s).is_some(), "a sector mixes two writes");
                    }
                    if i % 20 == 0 {
                        e.flush().await.unwrap();
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let data = read_flat(&e, 0, span as u32).await;
    for s in data.chunks(512) {
        let v = version_of(s).expect("whole sectors");
        assert!(v == 0 || (v >> 32).is_multiple_of(2), "version {v:#x} was never written");
    }
}

async fn several_data_dirs(kind: EngineKind) {
    let d = Dirs::new(kind, 3);
    {
        let s = d.open().await;
        for i in 0..6 {
            let e = s.extent(key(i), MIB, Epoch(1)).await.unwrap();
            e.write(0, versioned(i + 1, 8), false).await.unwrap();
            assert!(d.paths.iter().any(|p| e.path().parent() == Some(p.as_path())), "{}", e.path().display());
        }
        if kind == EngineKind::Mem {
            // Equal disks: placement by free space spreads the extents.
            for p in &d.paths {
                let n = (0..6).filter(|&i| s.contains(key(i))).count();
                assert_eq!(n, 6);
                let here = futures::future::join_all((0..6).map(|i| s.extent(key(i), MIB, Epoch(1))))
                    .await
                    .into_iter()
                    .filter(|e| e.as_ref().unwrap().path().parent() == Some(p.as_path()))
                    .count();
                assert_eq!(here, 2, "{}", p.display());
            }
        }
        s.close().await.unwrap();
    }
    let s = d.open().await;
    for i in 0..6 {
        assert!(s.contains(key(i)));
        let e = s.extent(key(i), MIB, Epoch(1)).await.unwrap();
        assert_eq!(read_flat(&e, 0, 4096).await, versioned(i + 1, 8).to_vec());
    }
}

async fn bit_rot_is_detected(kind: EngineKind) {
    let d = Dirs::new(kind, 1);
    let data = pattern(41, 3 * 4096);
    let (path, off) = {
        let s = d.open().await;
        let e = s.extent(key(2), 2 * MIB, Epoch(1)).await.unwrap();
        e.write(MIB, data.clone(), false).await.unwrap();
        s.close().await.unwrap();
        d.corrupt(&e, e.file_offset(MIB + 4096 + 100));
        (e.path().to_path_buf(), e.file_offset(0))
    };
    assert!(off > 0);
    let s = d.open().await;
    let e = s.extent(key(2), 2 * MIB, Epoch(1)).await.unwrap();
    assert_eq!(e.path(), path);
    let block = MIB / 4096 + 1;
    let k = key(2);
    assert!(
        matches!(e.read(MIB + 4096, 4096).await, Err(StoreError::Checksum { key, block: b }) if key == k && b == block)
    );
    assert!(matches!(e.read(MIB, 3 * 4096).await, Err(StoreError::Checksum { block: b, .. }) if b == block));
    assert!(matches!(e.read(MIB + 4096 + 512, 512).await, Err(StoreError::Checksum { .. })));
    // A partial write into the bad block cannot read-modify-write it.
    assert!(matches!(e.write(MIB + 4096, pattern(1, 512), false).await, Err(StoreError::Checksum { .. })));
    assert_eq!(read_flat(&e, MIB, 4096).await, data[..4096].to_vec());
    assert_eq!(read_flat(&e, MIB + 8192, 4096).await, data[8192..].to_vec());
    // Overwriting the whole block repairs it.
    e.write(MIB + 4096, pattern(2, 4096), false).await.unwrap();
    assert_eq!(read_flat(&e, MIB + 4096, 4096).await, pattern(2, 4096).to_vec());
}

/// Rot in an extent's metadata costs only what it covers: both header
/// slots bad makes that one extent unavailable (its reads and writes
/// fail, the file is left alone), a bad table sector loses the blocks
/// whose entries it held and the data cannot confirm; the store opens and
/// every other extent and block reads back exactly; a rewrite heals.
async fn corrupt_metadata_costs_only_what_it_covers(kind: EngineKind) {
    for (what, offsets) in [("header", vec![20u64, 4096 + 20]), ("table", vec![8192 + 4])] {
        let d = Dirs::new(kind, 1);
        {
            let s = d.open().await;
            let e = s.extent(key(5), MIB, Epoch(1)).await.unwrap();
            e.write(0, pattern(1, 8192), false).await.unwrap();
            let other = s.extent(key(6), MIB, Epoch(1)).await.unwrap();
            other.write(0, pattern(2, 4096), false).await.unwrap();
            s.close().await.unwrap();
            for &o in &offsets {
                d.corrupt(&e, o);
            }
        }
        let s = d.open().await;
        let other = s.extent(key(6), MIB, Epoch(1)).await.unwrap();
        assert_eq!(read_flat(&other, 0, 4096).await, pattern(2, 4096).to_vec(), "{what}");
        assert!(s.contains(key(5)), "{what}");
        if what == "header" {
            match s.extent(key(5), MIB, Epoch(1)).await {
                Err(StoreError::Unavailable { key: k, path, why }) => {
                    assert_eq!(k, key(5));
                    assert!(path.ends_with("v1-e5.ext"), "{}", path.display());
                    assert!(why.contains("no valid header"), "{why}");
                }
                other => panic!("expected Unavailable, got {other:?}"),
            }
            // Never recreated over: the file keeps its data for a restore.
            assert_eq!(s.extent_keys(), vec![key(5), key(6)]);
            continue;
        }
        let e = s.extent(key(5), MIB, Epoch(1)).await.unwrap();
        let k = key(5);
        assert!(matches!(e.read(0, 4096).await, Err(StoreError::Checksum { key, block: 0 }) if key == k));
        assert!(matches!(e.read(0, 512).await, Err(StoreError::Checksum { block: 0, .. })));
        // A partial write cannot read-modify-write a lost block.
        assert!(matches!(
            e.write(512, pattern(3, 512), false).await,
            Err(StoreError::Checksum { block: 0, .. })
        ));
        // Its sector's other entries were confirmed by their data.
        assert_eq!(read_flat(&e, 4096, 4096).await, pattern(1, 8192)[4096..].to_vec());
        assert_eq!(read_flat(&e, 8192, 4096).await, vec![0; 4096]);
        assert_eq!(e.map(0, 4096).unwrap(), vec![MapExtent { len: 4096, state: BlockState::DATA }]);
        e.write(0, pattern(4, 4096), false).await.unwrap();
        assert_eq!(read_flat(&e, 0, 4096).await, pattern(4, 4096).to_vec());
        s.close().await.unwrap();
        drop(s);
        let s = d.open().await;
        let e = s.extent(key(5), MIB, Epoch(1)).await.unwrap();
        assert_eq!(read_flat(&e, 0, 8192).await, [pattern(4, 4096), pattern(1, 8192).slice(4096..)].concat());
    }
    // One bad header slot is survivable: the other one is used.
    let d = Dirs::new(kind, 1);
    {
        let s = d.open().await;
        let e = s.extent(key(5), MIB, Epoch(1)).await.unwrap();
        e.write(0, pattern(1, 4096), false).await.unwrap();
        s.close().await.unwrap();
        d.corrupt(&e, 4096 + 20);
    }
    let s = d.open().await;
    let e = s.extent(key(5), MIB, Epoch(1)).await.unwrap();
    assert_eq!(read_flat(&e, 0, 4096).await, pattern(1, 4096).to_vec());
}

/// Store-level flushes of random subsets of four extents, many at once and
/// some cancelled mid-way, under each barrier: every one succeeds (none
/// hangs behind a cancelled one), each extent written before a flush has
/// its flush counter advanced when that flush returns, and on the mem
/// engine the flushed data survives a power loss.
async fn grouped_flushes(kind: EngineKind) {
    for barrier in [FlushBarrier::PerFile, FlushBarrier::Filesystem, FlushBarrier::Auto] {
        let mut d = Dirs::new(kind, 1);
        d.opts.flush_barrier = barrier;
        if let Some(disk) = &d.opts.mem_disk {
            disk.defer_completions(true);
        }
        let s = d.open().await;
        let mut exts = Vec::new();
        for i in 0..4 {
            exts.push(s.extent(key(i), 2 * MIB, Epoch(1)).await.unwrap());
        }
        let mut rng = 0x9e37_79b9u64;
        let mut next = move |n: u64| {
            rng = rng.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            (rng >> 33) % n
        };
        for round in 0..20u64 {
            let written: Vec<usize> = (0..4).filter(|_| next(2) == 0).collect();
            for &i in &written {
                exts[i].write(round * 4096, pattern(round * 10 + i as u64, 4096), false).await.unwrap();
            }
            let mut before = Vec::new();
            for e in &exts {
                before.push(e.flush_counter().await);
            }
            let mut tasks = Vec::new();
            for t in 0..8 {
                let subset: Vec<usize> = (0..4).filter(|_| next(2) == 0).collect();
                let (s, exts) = (s.clone(), exts.clone());
                let task = tokio::spawn(async move {
                    s.flush_extents(subset.iter().map(|&i| exts[i].clone())).await.unwrap();
                    subset
                });
                if t == 3 {
                    tokio::task::yield_now().await;
                    task.abort();
                } else {
                    tasks.push(task);
                }
            }
            let all =
                tokio::time::timeout(std::time::Duration::from_secs(30), futures::future::join_all(tasks))
                    .await
                    .unwrap_or_else(|_| panic!("{barrier:?} round {round}: flushes hang"));
            let mut covered = [false; 4];
            for subset in all {
                subset.unwrap().into_iter().for_each(|i| covered[i] = true);
            }
            for &i in &written {
                if covered[i] {
                    let now = exts[i].flush_counter().await;
                    assert!(
                        now > before[i],
                        "{barrier:?} round {round}: extent {i} written, flushed, counter {now}"
                    );
                }
            }
        }
        if kind == EngineKind::Mem {
            s.flush_extents(exts.iter().cloned()).await.unwrap();
            s.crash(3).unwrap();
            let s = d.open().await;
            for i in 0..4u64 {
                let e = s.extent(key(i), 2 * MIB, Epoch(1)).await.unwrap();
                let data = read_flat(&e, 0, 20 * 4096).await;
                for round in 0..20u64 {
                    let got = &data[(round * 4096) as usize..((round + 1) * 4096) as usize];
                    let want = pattern(round * 10 + i, 4096);
                    assert!(
                        got == &want[..] || got.iter().all(|&b| b == 0),
                        "{barrier:?} extent {i} block {round}"
                    );
                }
            }
        }
    }
}

/// Polls `fut` up to `polls` times, letting the runtime (and the disk) run
/// between polls, and drops it if it is not done by then.
async fn poll_then_drop<F: Future>(fut: F, polls: usize) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    for _ in 0..polls {
        if let Poll::Ready(v) = futures::poll!(fut.as_mut()) {
            return Some(v);
        }
        tokio::task::yield_now().await;
    }
    None
}

/// Every 512-byte sector of `got` is that of `old` or of `new`.
fn old_or_new(got: &[u8], old: &[u8], new: &[u8], what: &str) {
    for (i, s) in got.chunks(512).enumerate() {
        let r = i * 512..(i + 1) * 512;
        assert!(s == &old[r.clone()] || s == &new[r], "{what}: sector {i} is neither old nor new");
    }
}

const SPAN: u64 = 64 << 10;

/// Extent operations dropped at every await point (polled 0, 1, 2, ...
/// times, then dropped): afterwards every block reads back (no checksum
/// error) as the old or the new data, and after a flush the extent reopens
/// (and on the mem engine survives a power loss) with exactly that data.
/// Before the store made changes run to their end, a write dropped after
/// its disk write was submitted left new data under the old crc: EIO.
async fn drop_at_every_await(kind: EngineKind) {
    let mut d = Dirs::new(kind, 1);
    // Regions go clean at every flush, so writes keep needing header marks
    // (more header writes to drop in the middle of).
    d.opts.clean_after_flushes = 1;
    if let Some(disk) = &d.opts.mem_disk {
        disk.defer_completions(true);
    }
    let s = d.open().await;
    let e = s.extent(key(0), 2 * MIB, Epoch(1)).await.unwrap();
    e.write(0, pattern(1, SPAN as usize), false).await.unwrap();
    let mut model = pattern(1, SPAN as usize).to_vec();
    let mut dropped = 0;
    for round in 0..(7 * 24u64) {
        let (op, polls) = (round % 7, (round / 7) as usize);
        let at = (round % 8) * 4096;
        let mut new = model.clone();
        let data = pattern(1000 + round, 12 << 10);
        let done = match op {
            0 => {
                new[at as usize..at as usize + data.len()].copy_from_slice(&data);
                poll_then_drop(e.write(at, data.clone(), false), polls).await.map(|r| r.unwrap())
            }
            1 => {
                let (o, n) = (at as usize + 512, 5 << 10);
                new[o..o + n].copy_from_slice(&data[..n]);
                poll_then_drop(e.write(o as u64, data.slice(..n), round % 2 == 0), polls)
                    .await
                    .map(|r| r.unwrap())
            }
            2 => {
                new[at as usize..at as usize + 8192].fill(0);
                poll_then_drop(e.trim(at, 8192, false), polls).await.map(|r| r.unwrap())
            }
            3 => {
                let (o, n) = (at as usize + 1024, 10 << 10);
                new[o..o + n].fill(0);
                poll_then_drop(e.write_zeroes(o as u64, n as u64, round % 2 == 0, false), polls)
                    .await
                    .map(|r| r.unwrap())
            }
            4 => {
                // A matching compare and write: it writes.
                let cmp = Bytes::copy_from_slice(&model[at as usize..at as usize + data.len()]);
                new[at as usize..at as usize + data.len()].copy_from_slice(&data);
                poll_then_drop(e.compare_and_write(at, cmp, data.clone(), round % 2 == 1), polls)
                    .await
                    .map(|r| assert_eq!(r.unwrap(), None))
            }
            5 => {
                // A miscompare at byte 700: nothing changes.
                let mut cmp = model[at as usize..at as usize + data.len()].to_vec();
                cmp[700] ^= 1;
                poll_then_drop(e.compare_and_write(at, cmp.into(), data.clone(), false), polls)
                    .await
                    .map(|r| assert_eq!(r.unwrap(), Some(700)))
            }
            _ => poll_then_drop(e.flush(), polls).await.map(|r| r.unwrap()),
        };
        if done.is_none() {
            dropped += 1;
        }
        // A read waits for a change that still runs, then must succeed.
        let got = match e.read(0, SPAN as u32).await {
            Ok(c) => flatten_chunks(&c).to_vec(),
            Err(err) => panic!("{kind:?} round {round} (op {op}, {polls} polls): {err}"),
        };
        old_or_new(&got, &model, &new, &format!("{kind:?} round {round} (op {op}, {polls} polls)"));
        if done.is_some() {
            assert_eq!(got, new, "{kind:?} round {round}: finished, so new");
        }
        model = got;
    }
    assert!(dropped > 7 * 8, "{kind:?}: only {dropped} operations were dropped before their end");
    e.flush().await.unwrap();
    drop(e);
    drop(s);
    let s = d.open().await;
    let e = s.extent(key(0), 2 * MIB, Epoch(1)).await.unwrap();
    assert_eq!(read_flat(&e, 0, SPAN as u32).await, model, "{kind:?}: after reopening");
    if kind == EngineKind::Mem {
        e.flush().await.unwrap();
        s.crash(5).unwrap();
        let s = d.open().await;
        let e = s.extent(key(0), 2 * MIB, Epoch(1)).await.unwrap();
        assert_eq!(read_flat(&e, 0, SPAN as u32).await, model, "after a power loss");
    }
}

/// A punch (trim) that fails part way over blocks with data: every block
/// reads back as its old data or zeros, never as a checksum error, also
/// after a reopen. Before `zero_blocks` re-took the crcs after a failure,
/// the half that was punched read EIO.
async fn failed_punch_keeps_crcs(kind: EngineKind) {
    let d = Dirs::new(kind, 1);
    let s = d.open().await;
    let e = s.extent(key(0), MIB, Epoch(1)).await.unwrap();
    let old = pattern(3, SPAN as usize);
    e.write(0, old.clone(), false).await.unwrap();
    let disk = d.opts.mem_disk.clone().unwrap();
    for (deallocate, errno) in [(true, libc::EIO), (false, libc::ENOSPC)] {
        disk.fail_next_change(e.path(), errno).unwrap();
        let r = e.write_zeroes(0, SPAN, deallocate, false).await;
        assert!(
            matches!(&r, Err(StoreError::Io { source, .. }) if source.raw_os_error() == Some(errno)),
            "{r:?}"
        );
        let got = read_flat(&e, 0, SPAN as u32).await;
        old_or_new(&got, &old, &vec![0u8; SPAN as usize], "after a failed punch");
        assert!(got[..4096].iter().all(|&b| b == 0), "the first half was punched");
        assert_eq!(got[SPAN as usize - 4096..], old[SPAN as usize - 4096..], "the rest kept");
    }
    // A write that fails half way (re-taking crcs was already there for it).
    disk.fail_next_change(e.path(), libc::ENOSPC).unwrap();
    let new = pattern(4, SPAN as usize);
    assert!(e.write(0, new.clone(), false).await.unwrap_err().is_no_space());
    let got = read_flat(&e, 0, SPAN as u32).await;
    assert_eq!(got[..4096], new[..4096]);
    e.flush().await.unwrap();
    drop(e);
    drop(s);
    let s = d.open().await;
    let e = s.extent(key(0), MIB, Epoch(1)).await.unwrap();
    assert_eq!(read_flat(&e, 0, SPAN as u32).await, got);
}

fn volume_opts(size: u64, extent: u64) -> VolumeOptions {
    VolumeOptions {
        size,
        layout: Layout::contiguous(extent).unwrap(),
        replicas: 1,
        min_replicas: 1,
        read_only: false,
    }
}

async fn read_volume(v: &Volume, off: u64, len: u64) -> Result<Vec<u8>, VolumeError> {
    Ok(flatten_chunks(&v.read(off, len).await?).to_vec())
}

/// A write over two extents whose second piece fails: the first piece is
/// not dropped half way, so every block of both reads back old or new,
/// never EIO, also after a reopen. Two ways to fail: the second extent
/// cannot be created (a full disk), or its disk write fails after the
/// first piece's write went out (the volume used `try_join_all`, which
/// dropped the first piece with its write in flight).
async fn volume_piece_failure(kind: EngineKind) {
    let d = Dirs::new(kind, 1);
    let disk = d.opts.mem_disk.clone().unwrap();
    disk.defer_completions(true);
    let cfg = StoreConfig { data_dirs: d.paths.clone(), engine: kind };
    let node = Node::open_with(cfg, d.opts.clone(), 1 << 30).await.unwrap();
    let v = node.create_volume("v", volume_opts(4 * MIB, MIB)).unwrap();
    let id = v.spec().id;
    let old = pattern(5, 2 * MIB as usize);
    v.write(0, old.slice(..MIB as usize), false).await.unwrap();
    // 1: the second extent cannot be created.
    disk.fail_creates(Some(libc::ENOSPC));
    let new = pattern(6, 2 * MIB as usize);
    let r = v.write(0, new.slice(..(2 * MIB - 512) as usize), false).await;
    assert!(matches!(r, Err(VolumeError::NoSpace(_))), "{r:?}");
    disk.fail_creates(None);
    let got = read_volume(&v, 0, MIB).await.expect("the first extent reads back");
    old_or_new(&got, &old[..MIB as usize], &new[..MIB as usize], "first extent");
    // 2: both extents exist; the second one's write fails while the first
    // one's (a read-modify-write: it reads first) is still in flight.
    v.write(MIB, old.slice(MIB as usize..), false).await.unwrap();
    let before = read_volume(&v, 0, 2 * MIB).await.unwrap();
    let e1 = node
        .store()
        .unwrap()
        .extent(ExtentKey { volume: id, index: ExtentIndex(1) }, MIB, Epoch(1))
        .await
        .unwrap();
    disk.fail_next_change(e1.path(), libc::ENOSPC).unwrap();
    let r = v.write(512, new.slice(..(2 * MIB - 512) as usize), false).await;
    assert!(matches!(r, Err(VolumeError::NoSpace(_))), "{r:?}");
    let mut after = before[..512].to_vec();
    after.extend_from_slice(&new[..(2 * MIB - 512) as usize]);
    let got = read_volume(&v, 0, 2 * MIB).await.expect("both extents read back");
    old_or_new(&got, &before, &after, "two extents");
    assert_eq!(got[..MIB as usize], after[..MIB as usize], "the first piece finished");
    node.flush_all().await.unwrap();
    // Reopen the store (the mem node's catalog lives in memory).
    let mut opts = d.opts.clone();
    opts.mem_disk = Some(node.store().unwrap().mem_disk());
    drop(e1);
    drop(v);
    drop(node);
    let s = Store::open_with(StoreConfig { data_dirs: d.paths.clone(), engine: kind }, opts).await.unwrap();
    for i in 0..2u64 {
        let e = s.extent(ExtentKey { volume: id, index: ExtentIndex(i) }, MIB, Epoch(1)).await.unwrap();
        let r = (i * MIB) as usize..((i + 1) * MIB) as usize;
        assert_eq!(read_flat(&e, 0, MIB as u32).await, got[r], "extent {i} after reopening");
    }
}

/// TRIM and WRITE_ZEROES over a volume never written create no extent
/// files and succeed; reads still return zeros.
async fn discard_fresh_volume(kind: EngineKind) {
    let d = Dirs::new(kind, 1);
    let cfg = StoreConfig { data_dirs: d.paths.clone(), engine: kind };
    let node = Node::open_with(cfg, d.opts.clone(), 1 << 30).await.unwrap();
    let v = node.create_volume("fresh", volume_opts(8 * MIB, MIB)).unwrap();
    let id = v.spec().id;
    v.trim(0, 8 * MIB, false).await.unwrap();
    v.write_zeroes(0, 8 * MIB, true, true).await.unwrap();
    v.write_zeroes(4096, 8 * MIB - 8192, false, false).await.unwrap();
    v.trim(512, 3 * MIB, true).await.unwrap();
    v.flush().await.unwrap();
    for i in 0..8 {
        assert!(
            !node.store().unwrap().contains(ExtentKey { volume: id, index: ExtentIndex(i) }),
            "extent {i} created"
        );
    }
    if kind != EngineKind::Mem {
        let files: Vec<_> = std::fs::read_dir(&d.paths[0]).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(files.iter().all(|f| !f.to_string_lossy().contains(".ext")), "{files:?}");
    }
    assert_eq!(v.read(0, 8 * MIB).await.unwrap(), vec![ReadChunk::Hole(8 * MIB as u32)]);
    // Over a written extent and never-written ones: only the written one changes.
    v.write(MIB, pattern(7, 8192).clone(), false).await.unwrap();
    v.trim(0, 8 * MIB, false).await.unwrap();
    assert!(node.store().unwrap().contains(ExtentKey { volume: id, index: ExtentIndex(1) }));
    assert!(!node.store().unwrap().contains(ExtentKey { volume: id, index: ExtentIndex(2) }));
    assert_eq!(read_volume(&v, 0, 8 * MIB).await.unwrap(), vec![0u8; 8 * MIB as usize]);
}

/// Concurrent COMPARE AND WRITEs and plain writes on one block (and on a
/// range across two extents): every CAW is an increment (compare with the
/// value read, write value + 1) and every plain write a reset to a new
/// base. A CAW that matched wrote over exactly what it compared, so the
/// outcome is a serial history: each value in the block is a base or one
/// more than an earlier value, every sector of the range holds the same
/// value (no torn mix of a CAW and a write), and the number of successful
/// increments since the last reset is exactly the value's distance from
/// that base.
async fn caw_is_atomic(kind: EngineKind) {
    let d = Dirs::new(kind, 1);
    if let Some(disk) = &d.opts.mem_disk {
        disk.defer_completions(true); // so requests really interleave
    }
    let cfg = StoreConfig { data_dirs: d.paths.clone(), engine: kind };
    let node = Node::open_with(cfg, d.opts.clone(), 1 << 30).await.unwrap();
    let v = node.create_volume("caw", volume_opts(4 * MIB, MIB)).unwrap();
    // One block in the first extent, and 8 KiB across the boundary.
    for (at, len) in [(8192u64, 4096usize), (MIB - 4096, 8192)] {
        let sectors = len / 512;
        v.write(at, versioned(1 << 40, sectors), false).await.unwrap();
        let log = Arc::new(std::sync::Mutex::new(Vec::<(u64, u64)>::new()));
        let mut tasks = Vec::new();
        for t in 0..6u64 {
            let (v, log) = (v.clone(), log.clone());
            tasks.push(tokio::spawn(async move {
                for i in 0..200u64 {
                    if t == 0 && i % 2 == 0 {
                        // A plain write: a reset to a fresh base. Once it
                        // is acknowledged, every read sees its base (until
                        // the next reset): a CAW that compared an older
                        // value must not land after it.
                        let base = (i + 2) << 40;
                        v.write(at, versioned(base, sectors), false).await.unwrap();
                        let now = read_volume(&v, at, len as u64).await.unwrap();
                        for s in now.chunks(512) {
                            let got = version_of(s).expect("whole sectors");
                            assert_eq!(got & !((1 << 40) - 1), base, "{got:#x} after the write of {base:#x}");
                        }
                        continue;
                    }
                    let cur = read_volume(&v, at, len as u64).await.unwrap();
                    let Some(val) = version_of(&cur[..512]) else { panic!("torn sector") };
                    if cur.chunks(512).any(|s| version_of(s) != Some(val)) {
                        continue; // a read between a plain write's pieces: try again
                    }
                    let mut buf = cur.clone();
                    buf.extend_from_slice(&versioned(val + 1, sectors));
                    if v.compare_and_write(at, buf.into(), false).await.unwrap().is_none() {
                        log.lock().unwrap().push((val, val + 1));
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let end = read_volume(&v, at, len as u64).await.unwrap();
        let val = version_of(&end[..512]).expect("whole sectors");
        assert!(end.chunks(512).all(|s| version_of(s) == Some(val)), "a CAW and a write mixed");
        // Every successful CAW compared a value and wrote one more: with
        // plain writes only ever resetting to a new base, no two CAWs from
        // one base may have written the same value.
        let log = log.lock().unwrap();
        let mut seen = std::collections::HashSet::new();
        for &(from, to) in log.iter() {
            assert!(seen.insert(to), "value {to:#x} written by two CAWs that compared {from:#x}: not atomic");
        }
        let base = val & !((1 << 40) - 1);
        let since = log.iter().filter(|&&(_, to)| to & !((1 << 40) - 1) == base).count() as u64;
        assert_eq!(val - base, since, "final value {val:#x}: {since} increments since its base");
    }
}

macro_rules! engine_tests {
    ($modname:ident, $kind:expr) => {
        mod $modname {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn write_read_unaligned() {
                super::write_read_unaligned($kind).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn rmw_keeps_neighbours() {
                super::rmw_keeps_neighbours($kind).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn holes_are_reported() {
                super::holes_are_reported($kind).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn trim_and_zeroes() {
                super::trim_and_zeroes($kind).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn map_exact() {
                super::map_exact($kind).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn reopen_keeps_data() {
                super::reopen_keeps_data($kind).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn flush_and_fua() {
                super::flush_and_fua($kind).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn range_errors() {
                super::range_errors($kind).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_overlapping() {
                super::concurrent_overlapping($kind).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn several_data_dirs() {
                super::several_data_dirs($kind).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn bit_rot_is_detected() {
                super::bit_rot_is_detected($kind).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn grouped_flushes() {
                super::grouped_flushes($kind).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn corrupt_metadata_costs_only_what_it_covers() {
                super::corrupt_metadata_costs_only_what_it_covers($kind).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn drop_at_every_await() {
                super::drop_at_every_await($kind).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn discard_fresh_volume() {
                super::discard_fresh_volume($kind).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn caw_is_atomic() {
                super::caw_is_atomic($kind).await
            }
        }
    };
}

engine_tests!(uring, EngineKind::Uring);
engine_tests!(psync, EngineKind::Psync);
engine_tests!(mem, EngineKind::Mem);

/// Writes, FUA writes and flushes dropped at random points on a disk whose
/// ops land out of order, regions going clean at every flush (so headers
/// are written all the time), then a power loss: the extent opens and
/// every block reads back as some version written to it (or zeros),
/// never as a checksum error. Before `meta` waited for the writes a
/// dropped flush left in flight, such a header could land after the newer
/// one written into the same slot, marking clean a region that had
/// unflushed writes.
async fn dropped_flushes_then_crash(seed: u64) {
    let mut d = Dirs::new(EngineKind::Mem, 1);
    d.opts.clean_after_flushes = 1;
    d.opts.region_size = 16 << 10;
    let disk = d.opts.mem_disk.clone().unwrap();
    disk.reorder_ops(Some(seed));
    let s = d.open().await;
    let e = s.extent(key(0), MIB, Epoch(1)).await.unwrap();
    let mut rng = seed | 1;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let blocks = 24u64;
    let mut possible: Vec<Vec<u64>> = vec![vec![0]; blocks as usize];
    for step in 1..=150u64 {
        let polls = next(8) as usize;
        if next(3) == 0 {
            let _ = poll_then_drop(e.flush(), polls).await;
            continue;
        }
        let b = next(blocks);
        let fua = next(4) == 0;
        possible[b as usize].push(step);
        let _ = poll_then_drop(e.write(b * 4096, versioned(step, 8), fua), polls).await;
    }
    // Let whatever still runs land, then lose power.
    for _ in 0..16 {
        tokio::task::yield_now().await;
    }
    s.crash(seed).unwrap();
    disk.reorder_ops(None);
    let s = d.open().await;
    let e = s.extent(key(0), MIB, Epoch(1)).await.unwrap();
    for b in 0..blocks {
        let got = match e.read(b * 4096, 4096).await {
            Ok(c) => flatten_chunks(&c).to_vec(),
            Err(err) => panic!("seed {seed}: block {b}: {err}"),
        };
        for (i, sector) in got.chunks(512).enumerate() {
            let v = version_of(sector).unwrap_or_else(|| panic!("seed {seed}: block {b} sector {i} torn"));
            assert!(
                possible[b as usize].contains(&v),
                "seed {seed}: block {b} holds {v}, never written there"
            );
        }
    }
}

/// Tests that need the mem engine's fault injection.
mod mem_faults {
    use super::*;
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failed_punch_keeps_crcs() {
        super::failed_punch_keeps_crcs(EngineKind::Mem).await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn volume_piece_failure() {
        super::volume_piece_failure(EngineKind::Mem).await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropped_flushes_then_crash() {
        for seed in 1..=2000 {
            super::dropped_flushes_then_crash(seed).await
        }
    }
}

/// A small ext4 image on a loop device, unmounted (and detached) on drop,
/// also when the test fails.
struct LoopFs {
    dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl LoopFs {
    fn mount(size_mib: u64) -> Option<LoopFs> {
        use std::process::Command;
        let tmp = tempfile::Builder::new().prefix("enospc-").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let img = tmp.path().join("fs.img");
        let dir = tmp.path().join("mnt");
        std::fs::create_dir(&dir).unwrap();
        std::fs::File::create(&img).unwrap().set_len(size_mib * MIB).unwrap();
        let ok = |c: &mut Command| c.status().map(|s| s.success()).unwrap_or(false);
        if !ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img)) {
            eprintln!("SKIPPING: mkfs.ext4 failed or is missing");
            return None;
        }
        if !ok(Command::new("mount").args(["-o", "loop"]).arg(&img).arg(&dir)) {
            eprintln!("SKIPPING: cannot loop-mount (needs root and loop devices)");
            return None;
        }
        Some(LoopFs { dir, _tmp: tmp })
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.dir).status();
    }
}

fn ok_or_no_space(r: &Result<(), StoreError>) -> bool {
    r.as_ref().map_or_else(|e| e.is_no_space(), |_| true)
}

async fn no_space(kind: EngineKind) {
    let Some(fs) = LoopFs::mount(16) else {
        assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "CI must be able to loop-mount");
        return;
    };
    let cfg = StoreConfig { data_dirs: vec![fs.dir.join("data")], engine: kind };
    let s = Store::open(cfg.clone()).await.unwrap();
    // Extents are thin: 64 MiB each on a 16 MiB filesystem.
    let mut err = None;
    let mut at = None;
    'fill: for i in 0..4 {
        let e = match s.extent(key(i), 64 * MIB, Epoch(1)).await {
            Ok(e) => e,
            Err(e) => {
                err = Some(e);
                break;
            }
        };
        for j in 0..64 {
            if let Err(x) = e.write(j * MIB, pattern(j, MIB as usize), false).await {
                err = Some(x);
                at = Some((e, j));
                break 'fill;
            }
        }
    }
    let err = err.expect("16 MiB cannot hold 256 MiB of data");
    assert!(err.is_no_space(), "{err:?}");
    // A failed write over allocated blocks and holes: the range may hold old
    // or new data afterwards, but never fails its checksums.
    if let Some((e, j)) = at.filter(|(_, j)| *j > 0) {
        let r = e.write(j * MIB - 65536, pattern(99, MIB as usize), false).await;
        assert!(ok_or_no_space(&r), "{r:?}");
        let got = read_flat(&e, (j - 1) * MIB, (2 * MIB) as u32).await;
        let (old, new) = (pattern(j - 1, MIB as usize), pattern(99, MIB as usize));
        for (k, sector) in got[(MIB - 65536) as usize..MIB as usize].chunks(512).enumerate() {
            let r = (MIB - 65536) as usize + k * 512..(MIB - 65536) as usize + (k + 1) * 512;
            assert!(sector == &old[r.clone()] || sector == &new[k * 512..(k + 1) * 512], "sector {k}");
        }
    }
    // The store still works: reads of what was written, and flush.
    let e = s.extent(key(0), 64 * MIB, Epoch(1)).await.unwrap();
    assert_eq!(read_flat(&e, 0, 4096).await, pattern(0, MIB as usize)[..4096].to_vec());
    s.flush_all().await.unwrap();
    drop(e);
    drop(s);
    drop(fs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enospc_psync() {
    no_space(EngineKind::Psync).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enospc_uring() {
    no_space(EngineKind::Uring).await
}

/// Fills the filesystem holding `dir` with a file of its own.
fn fill_up(dir: &std::path::Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(dir.join("filler")).unwrap();
    for chunk in [MIB as usize, 4096] {
        let buf = vec![0x55u8; chunk];
        while f.write_all(&buf).is_ok() {}
    }
    let _ = f.sync_all();
}

/// The case on a real filesystem: a 24 MiB write over a full
/// extent (allocated, overwritten in place) and one not yet created, on a
/// full ext4. Creating the second extent fails with ENOSPC; the first
/// piece's blocks read back old or new, never EIO, also after a restart.
/// (With `try_join_all` the first piece was dropped with its disk write
/// in flight: new data under old crcs.)
async fn volume_enospc(kind: EngineKind) {
    let Some(fs) = LoopFs::mount(48) else {
        assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "CI must be able to loop-mount");
        return;
    };
    let cfg = StoreConfig { data_dirs: vec![fs.dir.join("data")], engine: kind };
    let node = Node::open(cfg.clone()).await.unwrap();
    let v = node.create_volume("v", volume_opts(64 * MIB, 16 * MIB)).unwrap();
    let old = pattern(8, 16 * MIB as usize);
    v.write(0, old.clone(), false).await.unwrap();
    v.flush().await.unwrap();
    fill_up(&fs.dir);
    let new = pattern(9, 24 * MIB as usize);
    let r = v.write(0, new.clone(), false).await;
    assert!(matches!(r, Err(VolumeError::NoSpace(_))), "{r:?}");
    let got = read_volume(&v, 0, 16 * MIB).await.expect("the first extent reads back");
    old_or_new(&got, &old, &new[..16 * MIB as usize], "first extent");
    v.flush().await.unwrap();
    drop(v);
    node.close().await.unwrap();
    drop(node);
    let node = Node::open(cfg).await.unwrap();
    let v = node.volume("v").unwrap();
    assert_eq!(read_volume(&v, 0, 16 * MIB).await.expect("after a restart"), got);
    drop(v);
    drop(node);
    drop(fs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_enospc_psync() {
    volume_enospc(EngineKind::Psync).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_enospc_uring() {
    volume_enospc(EngineKind::Uring).await
}

/// `mkfs`'s discard of a fresh volume on a full disk: TRIM and
/// WRITE_ZEROES of the whole never-written volume succeed and create no
/// extent file (they used to create one per extent, and fail with ENOSPC).
async fn discard_on_full_disk(kind: EngineKind) {
    let Some(fs) = LoopFs::mount(16) else {
        assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "CI must be able to loop-mount");
        return;
    };
    let data = fs.dir.join("data");
    let node = Node::open(StoreConfig { data_dirs: vec![data.clone()], engine: kind }).await.unwrap();
    let v = node.create_volume("v", volume_opts(256 * MIB, 16 * MIB)).unwrap();
    fill_up(&fs.dir);
    v.trim(0, 256 * MIB, false).await.unwrap();
    v.write_zeroes(0, 32 * MIB, true, true).await.unwrap();
    v.write_zeroes(32 * MIB, 64 * MIB, false, false).await.unwrap();
    v.flush().await.unwrap();
    let files: Vec<_> = std::fs::read_dir(&data).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(files.iter().all(|f| !f.to_string_lossy().contains(".ext")), "{files:?}");
    assert_eq!(v.read(100 * MIB, 4 * MIB).await.unwrap(), vec![ReadChunk::Hole(4 * MIB as u32)]);
    drop(v);
    drop(node);
    drop(fs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discard_on_full_disk_psync() {
    discard_on_full_disk(EngineKind::Psync).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discard_on_full_disk_uring() {
    discard_on_full_disk(EngineKind::Uring).await
}
