//! A volume as the frontends see it: byte-addressed reads, writes, zeroing,
//! trims and flushes, checked against the volume's size and alignment, split
//! by the layout into extent operations.
//!
//! Owns: the checks every frontend would otherwise repeat (bounds,
//! alignment, read-only), and the fan-out of one request over extents.
//! Today every extent has one local replica; the replication layer (later)
//! sits between this module and `storage::Extent` and keeps the same calls.
//!
//! Ordering: the NBD and SCSI contracts let concurrent requests complete in
//! any order, and the store serializes overlapping block writes, so no
//! request queue is needed here yet. FLUSH covers every write *completed*
//! before it on any connection because all connections share this one
//! `Volume` and the extents' flush is a device-wide barrier. COMPARE AND
//! WRITE is atomic against every other change because it runs under the
//! store's exclusive range locks, not a frontend's mutex.
//!
//! Cancel safety: a change over several extents waits for all its pieces
//! before it reports the first error, and once its pieces have started it
//! runs to its end even if its caller goes away (the store's pieces do so
//! anyway; here it keeps [`Volume::changes`] from counting a change as
//! finished while one of its pieces still writes).

//!
//! Resizing: the size and the extent table form one [`Geometry`], swapped
//! whole by [`Volume::resize`] while requests run. A request takes the
//! current geometry once (a read lock held for an `Arc` clone, never across
//! an await) and runs against it, so it is checked and served by one size.
//! A grow makes the new space read as zeros before it is visible; a shrink
//! makes the new size visible first, waits for the requests that started
//! against the old one, then removes the extents wholly past the end and
//! zeroes the tail of a partial last extent (so a later grow shows zeros
//! there, never old data). Connected NBD clients are counted here: NBD
//! cannot tell a client its export shrank, so a shrink is refused while one
//! is connected ([`Volume::begin_shrink`]).

use super::VolumeSpec;
use super::forward::Forwarder;
use super::replicated::Replicated;
use crate::admin::metrics::{Op, VolumeMetrics};
use crate::layout::Layout;
use crate::poll::LongOp;
use crate::proto::peer::MAX_MAP_EXTENTS;
use crate::replication::Change as ReplChange;
use crate::storage::extent::{RunToEnd, WriteHold};
use crate::storage::{Extent, Store, StoreError};
use crate::types::{Epoch, ExtentIndex, ExtentKey, Generation, MapExtent, ReadChunk};
use bytes::Bytes;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::OnceCell;

/// Logical block size: the smallest alignment a request may have.
pub const MIN_BLOCK: u64 = 512;
/// The block size clients should use for best performance.
pub const PREFERRED_BLOCK: u64 = 4096;
/// The largest READ or WRITE payload a frontend accepts (NBD and iSCSI).
pub const MAX_PAYLOAD: u64 = 32 << 20;

/// Why a volume request failed. Frontends map each to their protocol's
/// error (NBD errno, SCSI sense).
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("range {offset}+{len} is past the end of the volume ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("range {offset}+{len} is not aligned to {MIN_BLOCK} bytes")]
    Misaligned { offset: u64, len: u64 },
    #[error("length {0} is over the maximum payload")]
    TooLarge(u64),
    #[error("volume is read-only")]
    ReadOnly,
    #[error("no space left on the node's disks")]
    NoSpace(#[source] StoreError),
    #[error("checksum mismatch (extent {key}, block {block})")]
    Checksum { key: ExtentKey, block: u64 },
    #[error("I/O error")]
    Io(#[source] StoreError),
    /// A forwarded request reached a node that does not own the volume at
    /// the generation asked (`generation` is the one that node knows): the
    /// forwarder must look up the owner again.
    #[error("this node does not own the volume (it knows owner generation {generation})")]
    NotOwner { generation: Generation },
    /// The volume's owner could not be reached, or did not answer in time.
    /// Also: no replica reachable, a replica set below `min_replicas`, or
    /// this node no longer the owner.
    #[error("volume unavailable: {0}")]
    Unavailable(String),
}

impl VolumeError {
    /// The `kind` label of `basalt_volume_errors_total` (stable: dashboards
    /// and alerts match on it).
    pub fn kind(&self) -> &'static str {
        match self {
            VolumeError::OutOfRange { .. } => "out_of_range",
            VolumeError::Misaligned { .. } => "misaligned",
            VolumeError::TooLarge(_) => "too_large",
            VolumeError::ReadOnly => "read_only",
            VolumeError::NoSpace(_) => "no_space",
            VolumeError::Checksum { .. } => "checksum",
            VolumeError::Io(_) => "io",
            VolumeError::NotOwner { .. } => "not_owner",
            VolumeError::Unavailable(_) => "unavailable",
        }
    }
}

impl From<StoreError> for VolumeError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Checksum { key, block } => VolumeError::Checksum { key, block },
            e if e.is_no_space() => VolumeError::NoSpace(e),
            e => VolumeError::Io(e),
        }
    }
}

pub type Result<T, E = VolumeError> = std::result::Result<T, E>;

/// One extent's replica, opened on first use. Shared by every geometry
/// that covers the extent, so one opened during a resize is not lost.
type Cell = Arc<OnceCell<Arc<Extent>>>;

/// The size and the extents that cover it.
#[derive(Debug)]
struct Geometry {
    size: u64,
    /// `layout.extent_count(size)` cells.
    extents: Vec<Cell>,
}

/// Where one request goes (see [`Volume::via`]).
enum Via {
    Owner(Arc<Replicated>),
    Forward(Arc<Forwarder>),
}

/// What a forwarded attempt came to.
enum Retry<T> {
    Done(T),
    Again,
}

/// Front-end clients of the volume, as far as a resize cares.
#[derive(Debug, Default)]
struct Clients {
    nbd: usize,
    /// A shrink in progress: new NBD clients are told this size already.
    shrink_to: Option<u64>,
}

/// Where a volume's I/O goes from this node.
#[derive(Debug, Clone, Default)]
pub enum Route {
    /// Every extent in this node's store, no peers: the single-node slice,
    /// and a volume with one replica placed on this node that it owns.
    #[default]
    Local,
    /// This node owns the volume and replicates every extent.
    Owner(Arc<Replicated>),
    /// Another node owns it: every request is forwarded there.
    Forward(Arc<Forwarder>),
    /// Not served from here now, and why.
    Unavailable(String),
}

#[derive(Debug)]
pub struct Volume {
    /// `spec.size` is the size the volume was opened with; [`Volume::size`]
    /// is the current one.
    spec: VolumeSpec,
    /// The local store: `None` on a node without data directories, whose
    /// volumes never take [`Route::Local`].
    store: Option<Arc<Store>>,
    geometry: RwLock<Arc<Geometry>>,
    /// Counts finished changes of the data (writes, zeroes, trims, failed
    /// ones included): see [`Volume::changes`].
    changes: Arc<AtomicU64>,
    metrics: VolumeMetrics,
    /// Counts size changes (see [`Volume::resizes`]).
    resizes: AtomicU64,
    clients: Mutex<Clients>,
    /// One resize at a time.
    resizing: Arc<tokio::sync::Mutex<()>>,
    route: RwLock<Route>,
    /// Wakes requests waiting for a route.
    rerouted: tokio::sync::Notify,
    /// When a request last found no route here (the daemon takes over a
    /// volume without a live owner for the nodes its clients reach).
    unserved: Mutex<Option<std::time::Instant>>,
}

/// Why a volume on a node without a store has no route yet: it is served
/// only as its owner or through its owner, once the metadata says which.
const NO_STORE: &str = "this node stores no data: waiting for the volume's owner to be known";

/// How long a request waits for a volume without a route to get one (an
/// owner taking over) before it fails.
pub const ROUTE_WAIT: Duration = Duration::from_secs(15);

/// Why [`Volume::begin_shrink`] refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShrinkBlocked {
    #[error(
        "{0} NBD client(s) are connected, and NBD cannot tell a connected client that its export shrank: \
         disconnect them and retry (iSCSI initiators are told by a UNIT ATTENTION)"
    )]
    NbdClients(usize),
    #[error("another shrink of this volume is in progress")]
    Busy,
}

/// A connected NBD client, counted until dropped.
#[derive(Debug)]
pub struct NbdClient(Arc<Volume>);

impl Drop for NbdClient {
    fn drop(&mut self) {
        self.0.clients.lock().unwrap().nbd -= 1;
    }
}

/// Held from the check that no NBD client is connected until the shrink
/// is served (or abandoned): meanwhile new NBD clients are told the new size.
#[derive(Debug)]
pub struct ShrinkHold<'a>(&'a Volume);

impl Drop for ShrinkHold<'_> {
    fn drop(&mut self) {
        self.0.clients.lock().unwrap().shrink_to = None;
    }
}

/// Makes everything of volume `spec`'s extents at or past volume byte
/// `end` go: extents wholly past it are removed, the part of a partial one
/// past it is trimmed (durably). No request may address past `end`.
async fn clear_past(store: &Store, spec: &VolumeSpec, end: u64) -> Result<()> {
    let l = &spec.layout;
    let keys = store.extent_keys().into_iter().filter(|k| k.volume == spec.id);
    for key in keys {
        let fill = filled(l, end, key.index.0);
        if fill == 0 {
            if !store.remove_extent(key).await? {
                tracing::warn!(%key, "an unavailable replica past the volume's end stays on disk");
            }
        } else if fill < l.extent_size {
            match store.extent(key, l.extent_size, Epoch(1)).await {
                Ok(ext) => ext.trim(fill, l.extent_size - fill, true).await?,
                Err(e @ StoreError::Unavailable { .. }) => {
                    tracing::warn!(%key, error = %e, "cannot clear the tail of an unavailable replica");
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

/// Bytes of extent `index` below volume byte `end`. Always a prefix of the
/// extent: consecutive stripe units of one extent are in address order.
fn filled(l: &Layout, end: u64, index: u64) -> u64 {
    let (su, w) = (l.stripe_unit, l.stripe_width);
    let per_extent = l.extent_size / su;
    // Saturating: `index` may come from a file name.
    let first_unit = (index / w).saturating_mul(per_extent * w).saturating_add(index % w);
    let first = first_unit.saturating_mul(su);
    if end <= first {
        return 0;
    }
    let rel = end - first;
    let row = w * su; // volume bytes from one unit of this extent to its next
    let rows = rel.div_ceil(row).min(per_extent);
    (rows - 1) * su + (rel - (rows - 1) * row).min(su)
}

/// Counts a change as finished when dropped, however its future ends.
struct Change(Arc<AtomicU64>);

impl Drop for Change {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Release);
    }
}

/// Waits for every piece of a change, then reports the first error (in
/// address order). Dropping a piece that has begun (as `try_join_all` did
/// when a sibling failed) left the store to finish it alone; waiting also
/// means the caller's error comes after every piece is settled.
async fn all_pieces<F>(pieces: Vec<F>) -> Result<(), StoreError>
where
    F: std::future::Future<Output = Result<(), StoreError>>,
{
    if pieces.len() == 1 {
        return pieces.into_iter().next().expect("one").await;
    }
    futures::future::join_all(pieces).await.into_iter().collect()
}

impl Volume {
    pub(crate) fn new(spec: VolumeSpec, store: Option<Arc<Store>>, metrics: VolumeMetrics) -> Arc<Volume> {
        let n = spec.layout.extent_count(spec.size) as usize;
        let geometry = Geometry { size: spec.size, extents: (0..n).map(|_| Cell::default()).collect() };
        let route = match store {
            Some(_) => Route::Local,
            None => Route::Unavailable(NO_STORE.into()),
        };
        Arc::new(Volume {
            geometry: RwLock::new(Arc::new(geometry)),
            spec,
            store,
            changes: Arc::default(),
            metrics,
            resizes: AtomicU64::new(0),
            clients: Mutex::new(Clients::default()),
            resizing: Arc::new(tokio::sync::Mutex::new(())),
            route: RwLock::new(route),
            rerouted: tokio::sync::Notify::new(),
            unserved: Mutex::new(None),
        })
    }

    /// Where this volume's I/O goes (the daemon sets it from the metadata).
    pub fn set_route(&self, route: Route) {
        *self.route.write().unwrap() = route;
        self.rerouted.notify_waiters();
    }

    /// When a request last found no route (see [`Volume::set_route`]).
    pub fn last_unserved(&self) -> Option<std::time::Instant> {
        *self.unserved.lock().unwrap()
    }

    pub fn route(&self) -> Route {
        self.route.read().unwrap().clone()
    }

    fn geometry(&self) -> Arc<Geometry> {
        self.geometry.read().unwrap().clone()
    }

    /// How many times the size changed since the volume was opened. Read
    /// before [`Volume::size`], a count that moved means the size may have
    /// (iSCSI's CAPACITY DATA HAS CHANGED relies on it).
    pub fn resizes(&self) -> u64 {
        self.resizes.load(Ordering::Acquire)
    }

    /// The size a new NBD client is told: the current one, or the smaller
    /// one a shrink in progress is about to serve.
    pub fn nbd_size(&self) -> u64 {
        let c = self.clients.lock().unwrap();
        let size = self.size();
        c.shrink_to.map_or(size, |s| s.min(size))
    }

    /// Counts an NBD client that was told `told` bytes, until the guard
    /// drops. `None` if the volume is smaller than that by now (it shrank
    /// during the handshake): the client must reconnect.
    pub fn attach_nbd(self: &Arc<Self>, told: u64) -> Option<NbdClient> {
        let mut c = self.clients.lock().unwrap();
        if told > self.size() || c.shrink_to.is_some_and(|s| told > s) {
            return None;
        }
        c.nbd += 1;
        Some(NbdClient(self.clone()))
    }

    /// NBD clients connected now.
    pub fn nbd_clients(&self) -> usize {
        self.clients.lock().unwrap().nbd
    }

    /// Starts a shrink to `size`: refused while NBD clients are connected
    /// (they could still address the space that goes, and NBD has no way
    /// to warn them). Until the hold drops, new NBD clients are told `size`.
    pub fn begin_shrink(&self, size: u64) -> Result<ShrinkHold<'_>, ShrinkBlocked> {
        let mut c = self.clients.lock().unwrap();
        if c.shrink_to.is_some() {
            return Err(ShrinkBlocked::Busy);
        }
        if c.nbd > 0 {
            return Err(ShrinkBlocked::NbdClients(c.nbd));
        }
        c.shrink_to = Some(size);
        Ok(ShrinkHold(self))
    }

    /// Serves `size` bytes from now on (see the module docs). Data below
    /// both sizes is untouched; a grow reads as zeros past the old end; a
    /// shrink removes the extents wholly past the new end and zeroes the
    /// rest of a partial last one. Idempotent: a shrink interrupted by a
    /// crash is finished by the same call after the restart.
    pub(crate) async fn resize(&self, size: u64) -> Result<()> {
        let one = self.resizing.clone().lock_owned().await;
        let old = self.geometry();
        if size == old.size {
            return Ok(());
        }
        // Read-ahead must not serve data from before a resize.
        let _change = Change(self.changes.clone());
        let keep = self.spec.layout.extent_count(size) as usize;
        let (store, spec) = (self.store.clone(), self.spec.clone());
        // Only this node's own replicas are cleared here; a node without a
        // store has none.
        // The clean-up runs in a task of its own that holds the resize
        // lock: a caller going away (an admin client hanging up) must not
        // cut a trim short, nor let another resize start under it.
        let task = |end, old: Option<Arc<Geometry>>| {
            tokio::spawn(async move {
                if let Some(old) = old {
                    // Requests that took the old geometry may still write
                    // past the new end; they finish (or are dropped) first.
                    let mut waited = 0u32;
                    while Arc::strong_count(&old) > 1 {
                        waited += 1;
                        if waited.is_multiple_of(5000) {
                            tracing::info!(volume = %spec.name, "shrink waits for requests still running against the old size");
                        }
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
                let r = match &store {
                    Some(store) => clear_past(store, &spec, end).await,
                    None => Ok(()),
                };
                (one, r)
            })
        };
        let joined = |j: std::result::Result<_, tokio::task::JoinError>| {
            j.map_err(|e| VolumeError::Io(StoreError::io("resize clean-up task", std::io::Error::other(e))))
        };
        if size > old.size {
            // Anything past the old end (left by an interrupted shrink) goes
            // before a client can address it.
            let (_one, r) = joined(task(old.size, None).await)?;
            r?;
            let mut extents = old.extents.clone();
            extents.resize_with(keep, Cell::default);
            *self.geometry.write().unwrap() = Arc::new(Geometry { size, extents });
            self.resizes.fetch_add(1, Ordering::AcqRel);
        } else {
            let extents = old.extents[..keep.min(old.extents.len())].to_vec();
            *self.geometry.write().unwrap() = Arc::new(Geometry { size, extents });
            self.resizes.fetch_add(1, Ordering::AcqRel);
            let (_one, r) = joined(task(size, Some(old)).await)?;
            r?;
        }
        tracing::info!(volume = %self.spec.name, size, "volume resized");
        Ok(())
    }

    /// How many changes of the data have finished. A read issued after
    /// this returned `n` sees every change acknowledged before that; if it
    /// still returns `n` when the read's data is used, no change finished
    /// in between, so the data is still current (read-ahead relies on it).
    /// Anything that changes extent data behind the volume's own write
    /// paths (resync and repair, when replication comes) must count here.
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Acquire)
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    pub fn spec(&self) -> &VolumeSpec {
        &self.spec
    }

    /// The current size.
    pub fn size(&self) -> u64 {
        self.geometry.read().unwrap().size
    }

    pub fn read_only(&self) -> bool {
        self.spec.read_only
    }

    async fn extent<'g>(&self, g: &'g Geometry, index: ExtentIndex) -> Result<&'g Arc<Extent>> {
        let cell = Self::cell(g, index)?;
        let store = self.local_store()?;
        cell.get_or_try_init(|| async {
            let key = ExtentKey { volume: self.spec.id, index };
            store.extent(key, self.spec.layout.extent_size, Epoch(1)).await
        })
        .await
        .map_err(VolumeError::from)
    }

    /// The extent for a read or a map: `None` if it was never written (so a
    /// read does not create files).
    async fn existing_extent<'g>(
        &self,
        g: &'g Geometry,
        index: ExtentIndex,
    ) -> Result<Option<&'g Arc<Extent>>> {
        if let Some(e) = Self::cell(g, index)?.get() {
            return Ok(Some(e));
        }
        let key = ExtentKey { volume: self.spec.id, index };
        if self.local_store()?.contains(key) { self.extent(g, index).await.map(Some) } else { Ok(None) }
    }

    /// The store the [`Route::Local`] paths use; `via` takes that route
    /// only on a node that has one.
    fn local_store(&self) -> Result<&Arc<Store>> {
        self.store.as_ref().ok_or_else(|| VolumeError::Unavailable(NO_STORE.into()))
    }

    /// The cell of an extent of a range already checked against `g`.
    fn cell(g: &Geometry, index: ExtentIndex) -> Result<&Cell> {
        let i = usize::try_from(index.0).unwrap_or(usize::MAX);
        g.extents.get(i).ok_or(VolumeError::OutOfRange { offset: 0, len: 0, size: g.size })
    }

    /// Bounds and alignment check shared by every operation.
    pub fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        Self::check_in(&self.geometry(), offset, len)
    }

    /// Where a request goes now: `None` for the local store. Without a
    /// route (or with a fenced owner) waits up to [`ROUTE_WAIT`] for one,
    /// then says why there is none.
    async fn via(&self) -> Result<Option<Via>> {
        let deadline = tokio::time::Instant::now() + ROUTE_WAIT;
        loop {
            let changed = self.rerouted.notified();
            let why = match self.route() {
                Route::Local if self.store.is_some() => return Ok(None),
                Route::Local => NO_STORE.to_string(),
                Route::Owner(r) => match r.fenced() {
                    None => return Ok(Some(Via::Owner(r))),
                    Some(g) => format!("this node's ownership was fenced by generation {g}"),
                },
                Route::Forward(f) => return Ok(Some(Via::Forward(f))),
                Route::Unavailable(why) => why,
            };
            *self.unserved.lock().unwrap() = Some(std::time::Instant::now());
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                tracing::warn!(volume = %self.spec.name, reason = %why, "no route to the volume: the request fails");
                return Err(VolumeError::Unavailable(why));
            }
        }
    }

    /// After a forwarded request found its owner gone or moved: waits (up
    /// to [`ROUTE_WAIT`]) until the route no longer forwards to that owner
    /// generation, and says whether to try again.
    async fn rerouted_from(&self, old: &Forwarder) -> bool {
        let deadline = tokio::time::Instant::now() + ROUTE_WAIT;
        loop {
            let changed = self.rerouted.notified();
            match self.route() {
                Route::Forward(f)
                    if f.generation() == old.generation() && f.owner().addr() == old.owner().addr() => {}
                _ => return true,
            }
            *self.unserved.lock().unwrap() = Some(std::time::Instant::now());
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return false;
            }
        }
    }

    /// Runs `op` through `f`, and once more through the new route if the
    /// owner was gone or moved (safe for writes: a fenced old owner can no
    /// longer apply one; not used for COMPARE AND WRITE).
    async fn forwarded<T, Fut>(
        &self,
        f: Arc<Forwarder>,
        op: impl Fn(Arc<Forwarder>) -> Fut,
    ) -> Result<Retry<T>>
    where
        Fut: std::future::Future<Output = Result<T>>,
    {
        match op(f.clone()).await {
            Err(VolumeError::NotOwner { .. } | VolumeError::Unavailable(_))
                if self.rerouted_from(&f).await =>
            {
                Ok(Retry::Again)
            }
            r => r.map(Retry::Done),
        }
    }

    fn check_in(g: &Geometry, offset: u64, len: u64) -> Result<()> {
        Self::check_at(g, offset, len, MIN_BLOCK)
    }

    /// Bounds, and alignment to `granule` bytes ([`MIN_BLOCK`], or 1 for
    /// the `*_unaligned` calls).
    fn check_at(g: &Geometry, offset: u64, len: u64, granule: u64) -> Result<()> {
        if !offset.is_multiple_of(granule) || !len.is_multiple_of(granule) {
            return Err(VolumeError::Misaligned { offset, len });
        }
        match offset.checked_add(len) {
            Some(end) if end <= g.size => Ok(()),
            _ => Err(VolumeError::OutOfRange { offset, len, size: g.size }),
        }
    }

    fn check_write(&self, g: &Geometry, offset: u64, len: u64) -> Result<()> {
        self.check_write_at(g, offset, len, MIN_BLOCK)
    }

    fn check_write_at(&self, g: &Geometry, offset: u64, len: u64, granule: u64) -> Result<()> {
        if self.spec.read_only {
            return Err(VolumeError::ReadOnly);
        }
        Self::check_at(g, offset, len, granule)
    }

    /// Reads `len` bytes at `offset`, as data and holes in address order.
    async fn read_io(&self, offset: u64, len: u64) -> Result<Vec<ReadChunk>> {
        if len > MAX_PAYLOAD {
            return Err(VolumeError::TooLarge(len));
        }
        let g = self.geometry();
        Self::check_in(&g, offset, len)?;
        let _long = LongOp::for_transfer(len, false);
        let pieces = self.spec.layout.split(offset, len);
        match self.via().await? {
            None => {}
            Some(Via::Owner(r)) => {
                let reads = pieces.iter().map(|p| r.read(p.extent, p.offset, p.len));
                return Ok(futures::future::try_join_all(reads).await?.into_iter().flatten().collect());
            }
            Some(Via::Forward(f)) => {
                return match self.forwarded(f, |f| async move { f.read(offset, len).await }).await? {
                    Retry::Done(r) => Ok(r),
                    Retry::Again => Box::pin(self.read_io(offset, len)).await,
                };
            }
        }
        let g = &*g;
        let reads = pieces.iter().map(|p| async move {
            match self.existing_extent(g, p.extent).await? {
                Some(ext) => Ok::<_, VolumeError>(ext.read(p.offset, p.len as u32).await?),
                None => Ok(vec![ReadChunk::Hole(p.len as u32)]),
            }
        });
        let parts = futures::future::try_join_all(reads).await?;
        let mut out: Vec<ReadChunk> = Vec::new();
        for chunk in parts.into_iter().flatten() {
            match (out.last_mut(), &chunk) {
                (Some(ReadChunk::Hole(a)), ReadChunk::Hole(b)) => *a += *b,
                _ => out.push(chunk),
            }
        }
        Ok(out)
    }

    /// Writes `data` at `offset`. With `fua` the data is durable on return.
    /// `granule` is the alignment it is held to: [`MIN_BLOCK`], or 1 for a
    /// write at any byte (see [`Volume::write_unaligned`]).
    async fn write_io(&self, offset: u64, data: Bytes, fua: bool, granule: u64) -> Result<()> {
        let len = data.len() as u64;
        if len > MAX_PAYLOAD {
            return Err(VolumeError::TooLarge(len));
        }
        let g = self.geometry();
        self.check_write_at(&g, offset, len, granule)?;
        let _long = LongOp::for_transfer(len, fua);
        let change = Change(self.changes.clone());
        let unaligned = !offset.is_multiple_of(MIN_BLOCK) || !len.is_multiple_of(MIN_BLOCK);
        match self.via().await? {
            None => {}
            Some(Via::Owner(r)) if unaligned => {
                // Only the first and the last piece can be partial (pieces
                // end at stripe-unit boundaries, which are whole sectors):
                // those are read-modify-written under the owner's
                // exclusive hold, the rest go out as usual.
                let (mut whole, mut partial) = (Vec::new(), Vec::new());
                for p in self.spec.layout.split(offset, len) {
                    let part = data.slice(p.range_offset as usize..(p.range_offset + p.len) as usize);
                    if p.offset.is_multiple_of(MIN_BLOCK) && p.len.is_multiple_of(MIN_BLOCK) {
                        whole.push((p.extent, p.offset, p.len, ReplChange::Write { fua }, Some(part)));
                    } else {
                        partial.push(r.write_unaligned(p.extent, p.offset, part, fua));
                    }
                }
                let whole = async { if whole.is_empty() { Ok(()) } else { r.change(whole).await } };
                let (a, b) = futures::future::join(whole, futures::future::join_all(partial)).await;
                return a.and(b.into_iter().collect());
            }
            Some(Via::Owner(r)) => {
                let pieces = self.spec.layout.split(offset, len).into_iter().map(|p| {
                    let part = data.slice(p.range_offset as usize..(p.range_offset + p.len) as usize);
                    (p.extent, p.offset, p.len, ReplChange::Write { fua }, Some(part))
                });
                return r.change(pieces.collect()).await;
            }
            Some(Via::Forward(f)) => {
                // An unaligned write's read-modify-write runs where the
                // range can be held, on the owner: it gets the bytes as
                // they are (`Forwarder::write_unaligned`).
                let d = data.clone();
                return match self
                    .forwarded(f, |f| {
                        let d = d.clone();
                        async move {
                            if unaligned {
                                f.write_unaligned(offset, d, fua).await
                            } else {
                                f.write(offset, d, fua).await
                            }
                        }
                    })
                    .await?
                {
                    Retry::Done(()) => Ok(()),
                    Retry::Again => Box::pin(self.write_io(offset, data, fua, granule)).await,
                };
            }
        }
        // Every extent first (creating one may fail, e.g. on a full disk),
        // so a failure there leaves nothing half written.
        let mut writes = Vec::new();
        for p in self.spec.layout.split(offset, len) {
            let ext = self.extent(&g, p.extent).await?.clone();
            let part = data.slice(p.range_offset as usize..(p.range_offset + p.len) as usize);
            writes.push(async move {
                if unaligned {
                    ext.write_unaligned(p.offset, part, fua).await
                } else {
                    ext.write(p.offset, part, fua).await
                }
            });
        }
        RunToEnd::new(async move {
            let _change = change;
            all_pieces(writes).await
        })
        .await?;
        Ok(())
    }

    /// COMPARE AND WRITE (SBC-4 5.3). `buf` is laid out as SCSI's Data-Out
    /// buffer: the bytes to compare, then as many to write. If the range at
    /// `offset` holds the first half, writes the second half there, as one
    /// uninterrupted read-compare-write: the range's blocks stay locked
    /// exclusive in the store from the read to the end of the write, so no
    /// write, zeroing or trim from any frontend comes between. On a
    /// miscompare nothing is written and the offset (from `offset`) of the
    /// first byte that differs is returned. A range over several extents
    /// locks each extent's part in extent order, so two such requests
    /// cannot deadlock. Extents never written are created (their zeros may
    /// match).
    pub async fn compare_and_write(&self, offset: u64, buf: Bytes, fua: bool) -> Result<Option<u64>> {
        let len = buf.len() as u64 / 2;
        if len * 2 != buf.len() as u64 {
            return Err(VolumeError::Misaligned { offset, len: buf.len() as u64 });
        }
        let (compare, data) = (buf.slice(..len as usize), buf.slice(len as usize..));
        if len > MAX_PAYLOAD {
            return Err(VolumeError::TooLarge(len));
        }
        let g = self.geometry();
        self.check_write(&g, offset, len)?;
        if len == 0 {
            return Ok(None);
        }
        let _long = LongOp::for_transfer(len, fua);
        let pieces = self.spec.layout.split(offset, len);
        let via = self.via().await?;
        if let Some(Via::Forward(f)) = via {
            // Not retried on another route: a compare may have been applied.
            return f.compare_and_write(offset, buf, fua).await;
        }
        if let Some(Via::Owner(r)) = via {
            let [p] = &pieces[..] else {
                return Err(VolumeError::Unavailable(
                    "COMPARE AND WRITE across an extent boundary of a replicated volume is not supported"
                        .into(),
                ));
            };
            let _change = Change(self.changes.clone());
            return r.compare_and_write(p.extent, p.offset, compare, data, fua).await;
        }
        if let [p] = &pieces[..] {
            let ext = self.extent(&g, p.extent).await?;
            let _change = Change(self.changes.clone());
            return Ok(ext.compare_and_write(p.offset, compare, data, fua).await?);
        }
        // Per extent, the span of its pieces (striping may give one extent
        // two pieces), locked once: two holds of one holder in one extent
        // could deadlock behind a request queued between them.
        let mut spans: Vec<(u64, Arc<Extent>, u64, u64)> = Vec::new();
        for p in &pieces {
            let ext = self.extent(&g, p.extent).await?;
            match spans.iter_mut().find(|s| s.0 == p.extent.0) {
                Some(s) => {
                    let end = (s.2 + s.3).max(p.offset + p.len);
                    s.2 = s.2.min(p.offset);
                    s.3 = end - s.2;
                }
                None => spans.push((p.extent.0, ext.clone(), p.offset, p.len)),
            }
        }
        spans.sort_by_key(|s| s.0);
        let mut holds: Vec<(u64, WriteHold)> = Vec::with_capacity(spans.len());
        for (index, ext, at, n) in &spans {
            holds.push((*index, ext.hold_range(*at, *n).await?));
        }
        let extents: Vec<(u64, Arc<Extent>)> = spans.iter().map(|s| (s.0, s.1.clone())).collect();
        let change = Change(self.changes.clone());
        let found = RunToEnd::new(async move {
            let _change = change;
            let hold = |i: u64| &holds.iter().find(|h| h.0 == i).expect("one hold per extent").1;
            let ext = |i: u64| &extents.iter().find(|e| e.0 == i).expect("one per extent").1;
            for p in &pieces {
                let got = ext(p.extent.0).read_held(hold(p.extent.0), p.offset, p.len as u32).await?;
                let got = crate::types::flatten_chunks(&got);
                let want = &compare[p.range_offset as usize..(p.range_offset + p.len) as usize];
                if let Some(at) = got.iter().zip(want).position(|(a, b)| a != b) {
                    return Ok(Some(p.range_offset + at as u64));
                }
            }
            let writes = pieces.iter().map(|p| {
                let part = data.slice(p.range_offset as usize..(p.range_offset + p.len) as usize);
                ext(p.extent.0).write_held(hold(p.extent.0), p.offset, part)
            });
            all_pieces(writes.collect()).await.map(|()| None)
        })
        .await?;
        if fua && found.is_none() {
            for (_, ext, _, _) in &spans {
                ext.flush().await?;
            }
        }
        Ok(found)
    }

    /// Makes the range read as zeros. `deallocate` lets the store turn it
    /// into holes (NBD WRITE_ZEROES without NO_HOLE; SCSI WRITE SAME with UNMAP).
    async fn write_zeroes_io(&self, offset: u64, len: u64, deallocate: bool, fua: bool) -> Result<()> {
        let g = self.geometry();
        self.check_write(&g, offset, len)?;
        let _long = LongOp::for_transfer(len, fua);
        let change = Change(self.changes.clone());
        match self.via().await? {
            None => {}
            Some(Via::Owner(r)) => {
                let c = ReplChange::WriteZeroes { deallocate, fua };
                let pieces = self
                    .spec
                    .layout
                    .split(offset, len)
                    .into_iter()
                    .map(|p| (p.extent, p.offset, p.len, c, None));
                return r.change(pieces.collect()).await;
            }
            Some(Via::Forward(f)) => {
                let op =
                    |f: Arc<Forwarder>| async move { f.write_zeroes(offset, len, deallocate, fua).await };
                return match self.forwarded(f, op).await? {
                    Retry::Done(()) => Ok(()),
                    Retry::Again => Box::pin(self.write_zeroes_io(offset, len, deallocate, fua)).await,
                };
            }
        }
        let mut ops = Vec::new();
        for p in self.spec.layout.split(offset, len) {
            // An extent never written reads as zeros already: nothing to
            // do, and no file to create (a full disk does not fail it).
            let Some(ext) = self.existing_extent(&g, p.extent).await?.cloned() else { continue };
            ops.push(async move { ext.write_zeroes(p.offset, p.len, deallocate, fua).await });
        }
        RunToEnd::new(async move {
            let _change = change;
            all_pieces(ops).await
        })
        .await?;
        Ok(())
    }

    /// [`Volume::write_zeroes_unaligned`]: the whole store blocks inside the
    /// range are zeroed as usual, the partial ones at its ends get zeros
    /// written by read-modify-write (see `write_io`). Split by the store's
    /// block, not the sector, so each block is changed by one part only and
    /// reads old or new if the caller goes away between parts.
    async fn write_zeroes_unaligned_io(
        &self,
        offset: u64,
        len: u64,
        deallocate: bool,
        fua: bool,
    ) -> Result<()> {
        const BLOCK: u64 = crate::storage::format::BLOCK;
        let g = self.geometry();
        self.check_write_at(&g, offset, len, 1)?;
        if let Some(Via::Forward(f)) = self.via().await? {
            // As one request: the owner splits it and read-modify-writes
            // the partial sectors under its own hold.
            let _long = LongOp::for_transfer(len, fua);
            let _change = Change(self.changes.clone());
            let op = |f: Arc<Forwarder>| async move {
                f.write_zeroes_unaligned(offset, len, deallocate, fua).await
            };
            return match self.forwarded(f, op).await? {
                Retry::Done(()) => Ok(()),
                Retry::Again => Box::pin(self.write_zeroes_unaligned_io(offset, len, deallocate, fua)).await,
            };
        }
        let end = offset + len;
        let inner = offset.div_ceil(BLOCK) * BLOCK..end / BLOCK * BLOCK;
        let zeros = |n: u64| Bytes::from(vec![0u8; n as usize]);
        if inner.start >= inner.end {
            // Within two blocks: one small write of zeros.
            return if len == 0 { Ok(()) } else { self.write_io(offset, zeros(len), fua, 1).await };
        }
        // Each part is a change of its own, atomic per block, as NBD asks
        // of a request; a failed part does not stop the others.
        let mut first = Ok(());
        for (at, n) in [(offset, inner.start - offset), (inner.end, end - inner.end)] {
            if n > 0 {
                let r = self.write_io(at, zeros(n), fua, 1).await;
                first = first.and(r);
            }
        }
        let r = self.write_zeroes_io(inner.start, inner.end - inner.start, deallocate, fua).await;
        first.and(r)
    }

    /// Discards the range; it reads back as zeros afterwards.
    async fn trim_io(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        let g = self.geometry();
        self.check_write(&g, offset, len)?;
        let _long = LongOp::for_transfer(len, fua);
        let change = Change(self.changes.clone());
        match self.via().await? {
            None => {}
            Some(Via::Owner(r)) => {
                let c = ReplChange::Trim { fua };
                let pieces = self
                    .spec
                    .layout
                    .split(offset, len)
                    .into_iter()
                    .map(|p| (p.extent, p.offset, p.len, c, None));
                return r.change(pieces.collect()).await;
            }
            Some(Via::Forward(f)) => {
                return match self.forwarded(f, |f| async move { f.trim(offset, len, fua).await }).await? {
                    Retry::Done(()) => Ok(()),
                    Retry::Again => Box::pin(self.trim_io(offset, len, fua)).await,
                };
            }
        }
        let mut ops = Vec::new();
        for p in self.spec.layout.split(offset, len) {
            // Never written: already reads as zeros (see `write_zeroes`).
            let Some(ext) = self.existing_extent(&g, p.extent).await?.cloned() else { continue };
            ops.push(async move { ext.trim(p.offset, p.len, fua).await });
        }
        RunToEnd::new(async move {
            let _change = change;
            all_pieces(ops).await
        })
        .await?;
        Ok(())
    }

    /// Every write completed before this call, on any connection, is on
    /// stable storage when it returns.
    ///
    /// Every opened extent goes to the store, written to or not: one that
    /// looks clean may be so only because a flush still running took its
    /// pages, and its flush lock is what waits for that flush's barrier.
    /// (Untouched extents cost a lock each, no I/O.)
    async fn flush_io(&self) -> Result<()> {
        let _long = LongOp::begin();
        match self.via().await? {
            None => {}
            Some(Via::Owner(r)) => return r.flush().await,
            // Once more through the new route if the owner went away: a new
            // owner's first FLUSH reconciles and flushes what its
            // predecessor may have left unflushed (`Replicated::flush`), so
            // it covers every write acknowledged before this one.
            Some(Via::Forward(f)) => {
                return match self.forwarded(f, |f| async move { f.flush().await }).await? {
                    Retry::Done(()) => Ok(()),
                    Retry::Again => Box::pin(self.flush_io()).await,
                };
            }
        }
        let opened: Vec<Arc<Extent>> =
            self.geometry().extents.iter().filter_map(|c| c.get()).cloned().collect();
        self.local_store()?.flush_extents(opened).await?;
        Ok(())
    }

    /// Allocation map of the range, in order. Extents never opened are
    /// holes without touching the store. On a replicated volume (and
    /// through a forwarding node) it may cover a prefix of the range only,
    /// never none of a non-empty one: at most [`MAX_MAP_EXTENTS`] runs, and
    /// a replica's map of one extent may stop short (the frontends ask
    /// again from where it ends, as NBD and SCSI let them).
    pub async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<MapExtent>> {
        let g = self.geometry();
        Self::check_in(&g, offset, len)?;
        match self.via().await? {
            None => {}
            Some(Via::Owner(r)) => {
                let mut out: Vec<MapExtent> = Vec::new();
                for p in self.spec.layout.split(offset, len) {
                    let parts = r.block_status(p.extent, p.offset, p.len).await?;
                    let covered: u64 = parts.iter().map(|m| m.len).sum();
                    for m in parts {
                        match out.last_mut() {
                            Some(last) if last.state == m.state => last.len += m.len,
                            _ => out.push(m),
                        }
                    }
                    if covered < p.len || out.len() >= MAX_MAP_EXTENTS {
                        out.truncate(MAX_MAP_EXTENTS);
                        break;
                    }
                }
                return Ok(out);
            }
            // Retried like a read: right after the owner died, a client's
            // first request is often this one (qemu-img maps the image).
            Some(Via::Forward(f)) => {
                return match self.forwarded(f, |f| async move { f.block_status(offset, len).await }).await? {
                    Retry::Done(r) => Ok(r),
                    Retry::Again => Box::pin(self.block_status(offset, len)).await,
                };
            }
        }
        let mut out: Vec<MapExtent> = Vec::new();
        for p in self.spec.layout.split(offset, len) {
            let parts = match self.existing_extent(&g, p.extent).await? {
                Some(ext) => ext.map(p.offset, p.len)?,
                None => vec![MapExtent { len: p.len, state: crate::types::BlockState::HOLE }],
            };
            for m in parts {
                match out.last_mut() {
                    Some(last) if last.state == m.state => last.len += m.len,
                    _ => out.push(m),
                }
            }
        }
        Ok(out)
    }
}

/// The public I/O calls: each is the operation above plus its metrics (an
/// atomic add or two and one histogram observation; nothing when metrics
/// are off). An operation whose future is dropped before it ends is not
/// counted: it never finished.
impl Volume {
    /// Reads `len` bytes at `offset`, as data and holes in address order.
    pub async fn read(&self, offset: u64, len: u64) -> Result<Vec<ReadChunk>> {
        let t = self.metrics.start();
        let r = self.read_io(offset, len).await;
        self.metrics.finish(Op::read, len, t, r.as_ref().err().map(VolumeError::kind));
        r
    }

    /// Writes `data` at `offset`. With `fua` the data is durable on return.
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        let (t, len) = (self.metrics.start(), data.len() as u64);
        let r = self.write_io(offset, data, fua, MIN_BLOCK).await;
        self.metrics.finish(Op::write, len, t, r.as_ref().err().map(VolumeError::kind));
        r
    }

    /// [`Volume::write`] at any byte offset and length, for clients held
    /// to no block size (NBD without block size negotiation). Atomic per
    /// block against every other change, from any connection and any
    /// frontend: the partial blocks are read-modify-written under the
    /// store's exclusive range lock (on a replicated volume, the owner's
    /// exclusive hold), never under a frontend's lock. Through a node that
    /// forwards to the owner, the owner does the read-modify-write.
    pub async fn write_unaligned(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        let (t, len) = (self.metrics.start(), data.len() as u64);
        let r = self.write_io(offset, data, fua, 1).await;
        self.metrics.finish(Op::write, len, t, r.as_ref().err().map(VolumeError::kind));
        r
    }

    /// [`Volume::write_zeroes`] at any byte offset and length (see
    /// [`Volume::write_unaligned`]): the partial sectors at its ends are
    /// written with zeros by read-modify-write.
    pub async fn write_zeroes_unaligned(
        &self,
        offset: u64,
        len: u64,
        deallocate: bool,
        fua: bool,
    ) -> Result<()> {
        let t = self.metrics.start();
        let r = self.write_zeroes_unaligned_io(offset, len, deallocate, fua).await;
        self.metrics.finish(Op::write_zeroes, len, t, r.as_ref().err().map(VolumeError::kind));
        r
    }

    /// Makes the range read as zeros. `deallocate` lets the store turn it
    /// into holes (NBD WRITE_ZEROES without NO_HOLE; SCSI WRITE SAME with UNMAP).
    pub async fn write_zeroes(&self, offset: u64, len: u64, deallocate: bool, fua: bool) -> Result<()> {
        let t = self.metrics.start();
        let r = self.write_zeroes_io(offset, len, deallocate, fua).await;
        self.metrics.finish(Op::write_zeroes, len, t, r.as_ref().err().map(VolumeError::kind));
        r
    }

    /// Discards the range; it reads back as zeros afterwards.
    pub async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        let t = self.metrics.start();
        let r = self.trim_io(offset, len, fua).await;
        self.metrics.finish(Op::trim, len, t, r.as_ref().err().map(VolumeError::kind));
        r
    }

    /// Every write completed before this call, on any connection, is on
    /// stable storage when it returns (see `flush_io`).
    pub async fn flush(&self) -> Result<()> {
        let t = self.metrics.start();
        let r = self.flush_io().await;
        self.metrics.finish(Op::flush, 0, t, r.as_ref().err().map(VolumeError::kind));
        r
    }

    /// Counts a request a front end refused by its own protocol checks
    /// before it reached the volume, under the kind of the volume check it
    /// fails (`invalid` if it passes them all: bad flags, say).
    pub fn count_refused(&self, op: Op, offset: u64, len: u64) {
        let check = match op {
            Op::read if len > MAX_PAYLOAD => Err(VolumeError::TooLarge(len)),
            Op::write if len > MAX_PAYLOAD => Err(VolumeError::TooLarge(len)),
            Op::read => self.check_range(offset, len),
            Op::write | Op::trim | Op::write_zeroes => self.check_write(&self.geometry(), offset, len),
            Op::flush => Ok(()),
        };
        let t = self.metrics.start();
        self.metrics.finish(op, 0, t, Some(check.err().map_or("invalid", |e| e.kind())));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `filled` against the byte-by-unit truth of `Layout::locate`.
    #[test]
    fn filled_matches_locate() {
        for (extent, unit, width) in
            [(1u64 << 20, 1u64 << 20, 1u64), (1 << 20, 64 << 10, 3), (1 << 20, 4096, 4)]
        {
            let l = Layout::new(extent, unit, width).unwrap();
            let total = 3 * extent * width;
            for end in (0..=total).step_by(4096) {
                let n = l.extent_count(total) as usize;
                let mut want = vec![0u64; n];
                for off in (0..end).step_by(4096) {
                    let (e, o, _) = l.locate(off);
                    want[e.0 as usize] = want[e.0 as usize].max(o + 4096);
                }
                for (i, w) in want.iter().enumerate() {
                    assert_eq!(filled(&l, end, i as u64), *w, "layout {l:?} end {end} extent {i}");
                }
            }
            assert_eq!(filled(&l, total, u64::MAX), 0);
        }
    }
}
