//! The node's store: data directories (one engine each), the open extent
//! replicas, and the choice of directory for a new extent.

use super::engine::{self, Engine, mem::MemDisk};
use super::extent::{Extent, file_name};
use super::{EngineKind, Result, StoreConfig, StoreError};
use crate::types::{Epoch, ExtentKey};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Knobs tests and tools may change; the daemon uses the defaults.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Size of a dirty region (a power of two, >= 4 KiB) for new extents.
    pub region_size: u32,
    /// The in-memory disk to use with [`EngineKind::Mem`] (e.g. one that
    /// crashed); a fresh one if `None`.
    pub mem_disk: Option<Arc<MemDisk>>,
    /// A dirty region is marked clean again after this many flushes without
    /// a write into it (see `extent`: the activity log's hysteresis).
    pub clean_after_flushes: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            region_size: super::format::DEFAULT_REGION_SIZE,
            mem_disk: None,
            clean_after_flushes: super::extent::DEFAULT_CLEAN_AFTER_FLUSHES,
        }
    }
}

#[derive(Debug)]
struct Disk {
    dir: PathBuf,
    engine: Arc<dyn Engine>,
}

/// A node's local store.
#[derive(Debug)]
pub struct Store {
    disks: Vec<Disk>,
    opts: StoreOptions,
    mem_disk: Arc<MemDisk>,
    extents: Mutex<HashMap<ExtentKey, Arc<Extent>>>,
    /// Serializes creation, so two callers cannot create one extent twice.
    creating: tokio::sync::Mutex<()>,
    closed: Arc<AtomicBool>,
}

impl Store {
    /// Opens (and recovers) the store in `cfg.data_dirs`, creating them if needed.
    pub async fn open(cfg: StoreConfig) -> Result<Arc<Store>> {
        Store::open_with(cfg, StoreOptions::default()).await
    }

    /// [`Store::open`] with options; reopen a crashed mem store by passing its
    /// [`Store::mem_disk`] here.
    pub async fn open_with(cfg: StoreConfig, opts: StoreOptions) -> Result<Arc<Store>> {
        if cfg.data_dirs.is_empty() {
            return Err(StoreError::Config("no data directories".into()));
        }
        super::format::Geometry::new(super::format::BLOCK, opts.region_size)
            .map_err(|e| StoreError::Config(format!("region_size: {e}")))?;
        let mem_disk = opts.mem_disk.clone().unwrap_or_default();
        let closed = Arc::new(AtomicBool::new(false));
        let mut disks = Vec::new();
        let mut extents = HashMap::new();
        for dir in &cfg.data_dirs {
            let engine = engine::open_engine(cfg.engine, dir, &mem_disk).map_err(|e| {
                StoreError::io(format!("start {:?} engine for {}", cfg.engine, dir.display()), e)
            })?;
            engine.create_dir_all(dir).map_err(|e| StoreError::io(format!("create {}", dir.display()), e))?;
            let names =
                engine.list_dir(dir).map_err(|e| StoreError::io(format!("list {}", dir.display()), e))?;
            for path in names {
                let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                if name.ends_with(".ext.tmp") {
                    // A creation that crashed before its header was durable: never held data.
                    tracing::info!(path = %path.display(), "removing unfinished extent file");
                    engine
                        .remove(&path)
                        .map_err(|e| StoreError::io(format!("remove {}", path.display()), e))?;
                    continue;
                }
                if !name.ends_with(".ext") {
                    continue;
                }
                let ext = Extent::open(engine.clone(), &path, closed.clone()).await?;
                ext.set_clean_after(opts.clean_after_flushes);
                if name != file_name(ext.key()) {
                    return Err(StoreError::Corrupt {
                        path,
                        why: format!("header names extent {}", ext.key()),
                    });
                }
                if let Some(other) = extents.insert(ext.key(), Arc::new(ext)) {
                    return Err(StoreError::Corrupt {
                        path,
                        why: format!("extent {} also in {}", other.key(), other.path().display()),
                    });
                }
            }
            disks.push(Disk { dir: dir.clone(), engine });
        }
        tracing::info!(engine = ?disks[0].engine.kind(), dirs = disks.len(), extents = extents.len(), "store open");
        Ok(Arc::new(Store {
            disks,
            opts,
            mem_disk,
            extents: Mutex::new(extents),
            creating: tokio::sync::Mutex::new(()),
            closed,
        }))
    }

    /// The engine actually in use (after `Auto` made its choice).
    pub fn engine_kind(&self) -> EngineKind {
        self.disks[0].engine.kind()
    }

    /// True if a replica of `key` exists in this store (open or on disk).
    /// Every replica on disk is opened by [`Store::open`].
    pub fn contains(&self, key: ExtentKey) -> bool {
        self.extents.lock().unwrap().contains_key(&key)
    }

    /// The replica of extent `key`, created empty (all holes) with `size`
    /// bytes if it does not exist yet.
    pub async fn extent(&self, key: ExtentKey, size: u64, epoch: Epoch) -> Result<Arc<Extent>> {
        if let Some(e) = self.lookup(key, size)? {
            e.observe_epoch(epoch).await;
            return Ok(e);
        }
        let _creating = self.creating.lock().await;
        if let Some(e) = self.lookup(key, size)? {
            e.observe_epoch(epoch).await;
            return Ok(e);
        }
        if self.closed.load(Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        let disk = self.pick_disk()?;
        let ext = Extent::create(
            disk.engine.clone(),
            &disk.dir,
            key,
            size,
            epoch,
            self.opts.region_size,
            self.closed.clone(),
        )
        .await?;
        ext.set_clean_after(self.opts.clean_after_flushes);
        let ext = Arc::new(ext);
        self.extents.lock().unwrap().insert(key, ext.clone());
        Ok(ext)
    }

    fn lookup(&self, key: ExtentKey, size: u64) -> Result<Option<Arc<Extent>>> {
        match self.extents.lock().unwrap().get(&key) {
            Some(e) if e.size() != size => Err(StoreError::SizeMismatch { key, have: e.size(), want: size }),
            found => Ok(found.cloned()),
        }
    }

    /// The data directory with the most free space.
    fn pick_disk(&self) -> Result<&Disk> {
        let mut best: Option<(&Disk, u64)> = None;
        for d in &self.disks {
            let free = d
                .engine
                .free_space(&d.dir)
                .map_err(|e| StoreError::io(format!("statvfs {}", d.dir.display()), e))?;
            if best.is_none_or(|(_, f)| free > f) {
                best = Some((d, free));
            }
        }
        Ok(best.expect("at least one data dir").0)
    }

    /// Makes every write completed before this call durable on every extent.
    pub async fn flush_all(&self) -> Result<()> {
        let all: Vec<_> = self.extents.lock().unwrap().values().cloned().collect();
        futures::future::try_join_all(all.iter().map(|e| e.flush())).await?;
        Ok(())
    }

    /// Clean shutdown: flushes every extent and clears its dirty regions, so
    /// the next open has nothing to verify. The store stays usable.
    pub async fn close(&self) -> Result<()> {
        let all: Vec<_> = self.extents.lock().unwrap().values().cloned().collect();
        futures::future::try_join_all(all.iter().map(|e| e.close())).await?;
        Ok(())
    }

    /// The in-memory disk behind a mem store (empty and unused for other engines).
    pub fn mem_disk(&self) -> Arc<MemDisk> {
        self.mem_disk.clone()
    }

    /// Test hook for the mem engine: simulates power loss. Unflushed writes
    /// are lost or torn per 512-byte sector as `seed` decides; this store
    /// and its extents fail every later call with `Closed`. Recover by
    /// opening a new store with `StoreOptions { mem_disk: Some(store.mem_disk()), .. }`.
    pub fn crash(&self, seed: u64) -> Result<()> {
        if self.engine_kind() != EngineKind::Mem {
            return Err(StoreError::Config("crash() needs the mem engine".into()));
        }
        self.closed.store(true, Ordering::Release);
        self.mem_disk.crash(seed);
        Ok(())
    }
}
