//! The node's store: data directories (one engine each, each recognised
//! by its identity file, see `identity`), the open extent replicas (and the
//! ones whose files did not open), and the choice of directory for a new extent.

use super::engine::{self, Engine, mem::MemDisk};
use super::extent::{Extent, PreparedFlush, file_name, key_of_file_name};
use super::identity::{self, DirId, DirIdentity};
use super::{EngineKind, Result, StoreConfig, StoreError};
use crate::types::{Epoch, ExtentKey, NodeId, VolumeId};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// How a flush that covers several extent files in one data directory
/// makes them durable.
///
/// A FLUSH must cover every extent written since the last one. One
/// fdatasync per file costs one disk cache flush each, and on the disk
/// here concurrent ones barely overlap: 8 files took 330-490 us against
/// 45 us for one, so a database doing random writes with frequent fsyncs
/// over a large volume would pay per extent touched. `syncfs` commits the
/// whole filesystem (journal included) once, whatever the number of files.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
pub enum FlushBarrier {
    /// One fdatasync per file.
    #[value(name = "file")]
    #[serde(rename = "file")]
    PerFile,
    /// `syncfs` of the directory's filesystem, then one fdatasync. The
    /// syncfs commits every file's metadata (unwritten extents converted by
    /// our direct writes included); the fdatasync guarantees a disk cache
    /// flush after it, which a filesystem with nothing to commit (XFS with
    /// an idle log) may not issue for syncfs alone. A writeback error of
    /// any file on that filesystem fails the flush (the safe side).
    #[value(name = "fs")]
    #[serde(rename = "fs")]
    Filesystem,
    /// Whichever costs less, by recent measurements of both: syncfs also
    /// writes back whatever else is dirty on that filesystem, so on a
    /// filesystem shared with busy writers the per-file syncs can win.
    #[default]
    #[serde(rename = "auto")]
    Auto,
}

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
    /// How a flush covering several files of one data directory syncs them.
    pub flush_barrier: FlushBarrier,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            region_size: super::format::DEFAULT_REGION_SIZE,
            mem_disk: None,
            clean_after_flushes: super::extent::DEFAULT_CLEAN_AFTER_FLUSHES,
            flush_barrier: FlushBarrier::default(),
        }
    }
}

#[derive(Debug)]
struct Disk {
    dir: PathBuf,
    engine: Arc<dyn Engine>,
    costs: Mutex<BarrierCosts>,
    queue: Mutex<FlushQueue>,
}

/// Store-level flushes of one directory: whether a flush task is running,
/// and the flushes waiting for its next execution.
#[derive(Debug, Default)]
struct FlushQueue {
    running: bool,
    waiting: Vec<Waiter>,
}

#[derive(Debug)]
struct Waiter {
    extents: Vec<Arc<Extent>>,
    reply: oneshot::Sender<Result<()>>,
}

/// Held by a directory's flush task. If the task ends abnormally (a panic,
/// or the runtime shutting down), the directory is left without a runner
/// and every waiter still queued gets an error instead of waiting forever;
/// the next flush starts a new task.
struct Runner<'a> {
    disk: &'a Disk,
    /// False once the task has marked the queue idle itself.
    armed: bool,
}

impl Drop for Runner<'_> {
    fn drop(&mut self) {
        if self.armed {
            let mut q = self.disk.queue.lock().unwrap();
            q.running = false;
            q.waiting.clear();
        }
    }
}

/// The error of a shared flush execution, for each flush it covered.
fn shared_error(e: &StoreError) -> StoreError {
    match e {
        StoreError::Closed => StoreError::Closed,
        StoreError::Io { what, source } => {
            let source = match source.raw_os_error() {
                Some(code) => std::io::Error::from_raw_os_error(code),
                None => std::io::Error::new(source.kind(), source.to_string()),
            };
            StoreError::io(what.clone(), source)
        }
        e => StoreError::io("flush", std::io::Error::other(e.to_string())),
    }
}

/// Under [`FlushBarrier::Auto`], every this many barriers over several
/// files take the option that currently looks more expensive, so its cost
/// estimate follows the filesystem's load.
const BARRIER_PROBE_EVERY: u32 = 64;

/// Recent costs of the two barriers of one data directory (moving averages).
#[derive(Debug, Default)]
struct BarrierCosts {
    /// One fdatasync.
    per_file: Option<Duration>,
    /// syncfs and its fdatasync.
    filesystem: Option<Duration>,
    /// Multi-file barriers since the last probe.
    since_probe: u32,
}

impl BarrierCosts {
    /// Whether a barrier over `files` files should use syncfs. An option
    /// never measured is tried first.
    fn use_filesystem(&mut self, files: usize) -> bool {
        let per_file = self.per_file.map(|d| d * files as u32);
        let cheaper = match (self.filesystem, per_file) {
            (None, _) => true,
            (_, None) => false,
            (Some(fs), Some(pf)) => fs <= pf,
        };
        self.since_probe += 1;
        if self.since_probe >= BARRIER_PROBE_EVERY {
            self.since_probe = 0;
            return !cheaper;
        }
        cheaper
    }

    fn record(&mut self, filesystem: bool, files: usize, took: Duration) {
        let (slot, sample) = if filesystem {
            (&mut self.filesystem, took)
        } else {
            (&mut self.per_file, took / files.max(1) as u32)
        };
        *slot = Some(match *slot {
            None => sample,
            Some(old) => (old * 7 + sample) / 8,
        });
    }
}

impl Disk {
    /// Runs flush executions while flushes wait: each covers every flush
    /// queued when it starts, syncing the union of their extents. Runs as a
    /// task of its own (see [`Store::flush_extents`]), so no caller going
    /// away can stop an execution half way (with a header write in flight).
    async fn run_flushes(&self, policy: FlushBarrier) {
        let mut runner = Runner { disk: self, armed: true };
        loop {
            let waiters = {
                let mut q = self.queue.lock().unwrap();
                if q.waiting.is_empty() {
                    // Idle, under the lock a new flush checks before it
                    // decides to start a task.
                    q.running = false;
                    runner.armed = false;
                    return;
                }
                std::mem::take(&mut q.waiting)
            };
            let mut all: Vec<&Extent> = waiters.iter().flat_map(|w| w.extents.iter().map(|e| &**e)).collect();
            all.sort_by_key(|e| e.key());
            all.dedup_by_key(|e| e.key());
            let r = self.execute(all, policy).await;
            for w in waiters {
                let _ = w.reply.send(r.as_ref().map(drop).map_err(shared_error));
            }
        }
    }

    /// One flush execution over `extents` (sorted by key, no duplicates):
    /// takes their flush locks in key order, writes their table pages and
    /// headers side by side, then runs one barrier for all of them.
    async fn execute(&self, extents: Vec<&Extent>, policy: FlushBarrier) -> Result<()> {
        let mut locks = Vec::with_capacity(extents.len());
        for e in extents {
            locks.push(e.lock_for_flush().await?);
        }
        let prepared: Vec<PreparedFlush<'_>> =
            futures::future::try_join_all(locks.into_iter().map(|l| l.prepare(false)))
                .await?
                .into_iter()
                .flatten()
                .collect();
        let synced = self.barrier(&prepared, policy).await;
        let ok = synced.is_ok();
        for p in prepared {
            p.finish(ok);
        }
        synced
    }

    async fn barrier(&self, prepared: &[PreparedFlush<'_>], policy: FlushBarrier) -> Result<()> {
        let files = prepared.len();
        let filesystem = match (files, policy) {
            (0, _) => return Ok(()),
            (1, _) | (_, FlushBarrier::PerFile) => false,
            (_, FlushBarrier::Filesystem) => true,
            (_, FlushBarrier::Auto) => self.costs.lock().unwrap().use_filesystem(files),
        };
        let start = Instant::now();
        if filesystem {
            let first = prepared[0].extent();
            self.sync_fs(first).await?;
            first.sync().await?;
        } else {
            futures::future::try_join_all(prepared.iter().map(|p| p.extent().sync())).await?;
        }
        self.costs.lock().unwrap().record(filesystem, files, start.elapsed());
        Ok(())
    }

    /// syncfs on the filesystem holding `ext`, off the async threads (it
    /// can take as long as the filesystem's other dirty data needs).
    async fn sync_fs(&self, ext: &Extent) -> Result<()> {
        let what = || format!("syncfs {}", self.dir.display());
        if self.engine.kind() == EngineKind::Mem {
            return self.engine.sync_fs(ext.file()).map_err(|e| StoreError::io(what(), e));
        }
        let (engine, file) = (self.engine.clone(), ext.file().clone());
        match tokio::task::spawn_blocking(move || engine.sync_fs(&file)).await {
            Ok(r) => r.map_err(|e| StoreError::io(what(), e)),
            Err(e) => Err(StoreError::io(what(), std::io::Error::other(e))),
        }
    }
}

/// A node's local store.
#[derive(Debug)]
pub struct Store {
    disks: Vec<Disk>,
    opts: StoreOptions,
    mem_disk: Arc<MemDisk>,
    extents: Mutex<HashMap<ExtentKey, Arc<Extent>>>,
    /// Replicas whose file did not open (rot in both headers, a short
    /// file, an I/O error): file and why. Never recreated over, so their
    /// data stays for whoever can restore it.
    unavailable: HashMap<ExtentKey, (PathBuf, String)>,
    /// Each data directory's identity, in `disks` order.
    identities: Vec<DirIdentity>,
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
        Store::open_as(cfg, opts, None).await
    }

    /// [`Store::open_with`] for a node whose other records (the control
    /// plane's identity, or its catalog) name it `known`: the node id
    /// stamped into new directories and used if no identity file is sound
    /// (directories that name another node keep theirs: compare
    /// [`Store::node_id`]).
    pub async fn open_as(cfg: StoreConfig, opts: StoreOptions, known: Option<NodeId>) -> Result<Arc<Store>> {
        if cfg.data_dirs.is_empty() {
            return Err(StoreError::Config("no data directories".into()));
        }
        super::format::Geometry::new(super::format::BLOCK, opts.region_size)
            .map_err(|e| StoreError::Config(format!("region_size: {e}")))?;
        let mem_disk = opts.mem_disk.clone().unwrap_or_default();
        // Whose directories these are, before any extent in them is opened
        // (opening recovers, which writes). The mem engine's live in memory.
        let identities = if cfg.engine == EngineKind::Mem {
            let node_id = match known {
                Some(n) => n,
                None => NodeId(identity::random_u64()?),
            };
            let ids = cfg.data_dirs.iter().map(|_| {
                let dir_id = DirId(identity::random_u64()?);
                Ok(DirIdentity { format: identity::IDENTITY_FORMAT, node_id, dir_id, cluster_id: None })
            });
            ids.collect::<Result<Vec<_>>>()?
        } else {
            for dir in &cfg.data_dirs {
                identity::create_dir_durably(dir)
                    .map_err(|e| StoreError::io(format!("create {}", dir.display()), e))?;
            }
            identity::recognise(&cfg.data_dirs, known)?
        };
        let closed = Arc::new(AtomicBool::new(false));
        let mut disks = Vec::new();
        let mut extents = HashMap::new();
        let mut unavailable: HashMap<ExtentKey, (PathBuf, String)> = HashMap::new();
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
                let ext = match Extent::open(engine.clone(), &path, closed.clone()).await {
                    Ok(ext) => ext,
                    // Another format version is not rot: refuse the whole store.
                    Err(e @ StoreError::Version { .. }) => return Err(e),
                    // Anything else costs this extent only: the node starts,
                    // and this extent's reads and writes fail.
                    Err(e) => {
                        let Some(key) = key_of_file_name(&name) else {
                            tracing::warn!(path = %path.display(), error = %e, "ignoring a file that is not an extent replica");
                            continue;
                        };
                        let why = format!("{e}");
                        tracing::error!(extent = %key, path = %path.display(), error = %why,
                            "extent unavailable: every read and write of it fails until the file is restored or removed");
                        if let Some(other) = unavailable.insert(key, (path.clone(), why)) {
                            return Err(StoreError::Corrupt {
                                path,
                                why: format!("extent {key} also in {}", other.0.display()),
                            });
                        }
                        continue;
                    }
                };
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
            disks.push(Disk { dir: dir.clone(), engine, costs: Mutex::default(), queue: Mutex::default() });
        }
        if let Some((key, (path, _))) = unavailable.iter().find(|(k, _)| extents.contains_key(k)) {
            return Err(StoreError::Corrupt {
                path: path.clone(),
                why: format!("extent {key} is in two files"),
            });
        }
        tracing::info!(engine = ?disks[0].engine.kind(), dirs = disks.len(), extents = extents.len(),
            unavailable = unavailable.len(), "store open");
        Ok(Arc::new(Store {
            disks,
            opts,
            mem_disk,
            extents: Mutex::new(extents),
            unavailable,
            identities,
            creating: tokio::sync::Mutex::new(()),
            closed,
        }))
    }

    /// This node's id, from its data directories' identity files (drawn
    /// once, when the first directory was stamped; on the mem engine, at open).
    pub fn node_id(&self) -> NodeId {
        self.identities[0].node_id
    }

    /// The data directories with their identities, in the order configured.
    pub fn data_dirs(&self) -> impl Iterator<Item = (&Path, &DirIdentity)> {
        self.disks.iter().map(|d| d.dir.as_path()).zip(&self.identities)
    }

    /// Per data directory, the engine's ops submitted and not yet
    /// completed (only directories whose engine counts them).
    pub fn queue_depths(&self) -> impl Iterator<Item = (&Path, u64)> {
        self.disks.iter().filter_map(|d| d.engine.queue_depth().map(|n| (d.dir.as_path(), n)))
    }

    /// The engine actually in use (after `Auto` made its choice).
    pub fn engine_kind(&self) -> EngineKind {
        self.disks[0].engine.kind()
    }

    /// True if a replica of `key` exists in this store (open or on disk).
    /// Every replica on disk is opened by [`Store::open`].
    pub fn contains(&self, key: ExtentKey) -> bool {
        self.unavailable.contains_key(&key) || self.extents.lock().unwrap().contains_key(&key)
    }

    /// Every open replica (every one on disk but the unavailable ones).
    pub fn opened(&self) -> Vec<Arc<Extent>> {
        self.extents.lock().unwrap().values().cloned().collect()
    }

    /// Every replica on disk, the unavailable ones included.
    pub fn extent_keys(&self) -> Vec<ExtentKey> {
        let mut keys: Vec<ExtentKey> = self.extents.lock().unwrap().keys().copied().collect();
        keys.extend(self.unavailable.keys());
        keys.sort();
        keys
    }

    /// Where the replica of `key` lives, if it is on disk (unavailable or not).
    pub fn extent_path(&self, key: ExtentKey) -> Option<PathBuf> {
        match self.unavailable.get(&key) {
            Some((path, _)) => Some(path.clone()),
            None => self.extents.lock().unwrap().get(&key).map(|e| e.path().to_path_buf()),
        }
    }

    /// Deletes every open replica of `volume` (a deleted volume) from disk.
    /// The caller has stopped serving the volume. Returns how many replicas
    /// are left: the unavailable ones, whose files stay for whoever may
    /// restore them.
    pub async fn remove_volume(&self, volume: VolumeId) -> Result<usize> {
        let _creating = self.creating.lock().await;
        let gone: Vec<Arc<Extent>> = {
            let mut m = self.extents.lock().unwrap();
            let keys: Vec<ExtentKey> = m.keys().filter(|k| k.volume == volume).copied().collect();
            keys.iter().filter_map(|k| m.remove(k)).collect()
        };
        if self.engine_kind() != EngineKind::Mem {
            for e in &gone {
                let path = e.path().to_path_buf();
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                    Err(err) => return Err(StoreError::io(format!("remove {}", path.display()), err)),
                }
                identity::sync_parent(&path)
                    .map_err(|err| StoreError::io(format!("sync {}", path.display()), err))?;
            }
        }
        tracing::info!(%volume, removed = gone.len(), "deleted the replicas of a deleted volume");
        Ok(self.unavailable.keys().filter(|k| k.volume == volume).count())
    }

    /// Deletes the open replica of one extent (past the end of a volume
    /// that shrank). The caller guarantees no request uses it any more.
    /// `false` if there is none open: absent, or unavailable (its file
    /// stays for whoever may restore it).
    pub async fn remove_extent(&self, key: ExtentKey) -> Result<bool> {
        let _creating = self.creating.lock().await;
        let Some(e) = self.extents.lock().unwrap().remove(&key) else {
            return Ok(false);
        };
        if self.engine_kind() != EngineKind::Mem {
            let path = e.path().to_path_buf();
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => return Err(StoreError::io(format!("remove {}", path.display()), err)),
            }
            identity::sync_parent(&path)
                .map_err(|err| StoreError::io(format!("sync {}", path.display()), err))?;
        }
        tracing::info!(%key, "removed a replica past the end of its volume");
        Ok(true)
    }

    /// The replica of extent `key`, created empty (all holes) with `size`
    /// bytes if it does not exist yet.
    pub async fn extent(&self, key: ExtentKey, size: u64, epoch: Epoch) -> Result<Arc<Extent>> {
        self.extent_or_create(key, size, epoch, false).await
    }

    /// [`Store::extent`], but one it creates is marked incomplete (the
    /// target of a whole-extent copy; see [`Extent::complete`]).
    pub async fn extent_for_copy(&self, key: ExtentKey, size: u64, epoch: Epoch) -> Result<Arc<Extent>> {
        self.extent_or_create(key, size, epoch, true).await
    }

    async fn extent_or_create(
        &self,
        key: ExtentKey,
        size: u64,
        epoch: Epoch,
        incomplete: bool,
    ) -> Result<Arc<Extent>> {
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
            incomplete,
            self.closed.clone(),
        )
        .await?;
        ext.set_clean_after(self.opts.clean_after_flushes);
        let ext = Arc::new(ext);
        self.extents.lock().unwrap().insert(key, ext.clone());
        Ok(ext)
    }

    fn lookup(&self, key: ExtentKey, size: u64) -> Result<Option<Arc<Extent>>> {
        if let Some((path, why)) = self.unavailable.get(&key) {
            return Err(StoreError::Unavailable { key, path: path.clone(), why: why.clone() });
        }
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
    pub async fn flush_all(self: &Arc<Self>) -> Result<()> {
        let all: Vec<_> = self.extents.lock().unwrap().values().cloned().collect();
        self.flush_extents(all).await
    }

    /// Makes every write completed on `extents` before this call durable.
    ///
    /// Group commit per data directory: one execution runs at a time, in a
    /// task of its own, and the flushes that arrive meanwhile queue up and
    /// are all covered by the next one, which syncs the union of their
    /// extents with one barrier (see [`FlushBarrier`]). (Per-extent group
    /// commit alone let every queued FLUSH sync whichever extents had been
    /// written since the one before: with fio keeping two dozen FLUSHes in
    /// flight, they ran one after another.)
    pub async fn flush_extents(
        self: &Arc<Self>,
        extents: impl IntoIterator<Item = Arc<Extent>>,
    ) -> Result<()> {
        let mut by_disk: Vec<Vec<Arc<Extent>>> = self.disks.iter().map(|_| Vec::new()).collect();
        for e in extents {
            let disk = self.disks.iter().position(|d| e.is_on(&d.engine));
            by_disk[disk.expect("every extent lives in one of the store's directories")].push(e);
        }
        let mut replies = Vec::new();
        for (i, extents) in by_disk.into_iter().enumerate().filter(|(_, e)| !e.is_empty()) {
            let (reply, rx) = oneshot::channel();
            let start = {
                let mut q = self.disks[i].queue.lock().unwrap();
                q.waiting.push(Waiter { extents, reply });
                !std::mem::replace(&mut q.running, true)
            };
            if start {
                let (store, policy) = (self.clone(), self.opts.flush_barrier);
                tokio::spawn(async move { store.disks[i].run_flushes(policy).await });
            }
            replies.push(rx);
        }
        for rx in replies {
            rx.await.unwrap_or_else(|_| {
                Err(StoreError::io("flush", std::io::Error::other("the flush task ended without an answer")))
            })?;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    /// Auto tries each barrier once, then takes the cheaper one for the
    /// number of files, follows a filesystem that turns slow (a busy
    /// neighbour's dirty data), and keeps probing the loser.
    #[test]
    fn auto_barrier_follows_measured_costs() {
        let mut c = BarrierCosts::default();
        assert!(c.use_filesystem(4), "syncfs is tried first");
        c.record(true, 4, 100 * US);
        assert!(!c.use_filesystem(4), "then one fdatasync per file");
        c.record(false, 4, 400 * US); // 100 us per file
        assert!(c.use_filesystem(4), "100 us for all beats 4 x 100 us");
        // The filesystem turns slow: the average follows within a few samples.
        for _ in 0..12 {
            c.record(true, 4, 20_000 * US);
        }
        let picks: Vec<bool> = (0..BARRIER_PROBE_EVERY * 2).map(|_| c.use_filesystem(4)).collect();
        let probes = picks.iter().filter(|&&fs| fs).count();
        assert_eq!(probes, 2, "per-file from now on, with one syncfs probe every {BARRIER_PROBE_EVERY}");
        // A probe that finds it cheap again wins it back.
        for _ in 0..40 {
            c.record(true, 4, 80 * US);
        }
        assert!(c.use_filesystem(4));
    }
}
