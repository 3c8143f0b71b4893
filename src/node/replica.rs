//! The replica side of the replicated data path: answers the peer
//! protocol's extent messages against this node's [`Store`], after the
//! fencing checks.
//!
//! Owns: admission of every data message (owner generation through
//! [`Fences`], replica-set epoch per extent), the range checks, and the
//! mapping of store errors to the protocol's [`ExtentError`]s. Must never:
//! apply a request of a stale generation or epoch, create an extent for
//! anything but a write, copy a payload, or panic on anything a peer sends.
//! It decides nothing about replica sets or owners: the owner does, and
//! calls [`ReplicaService::handle`] over the peer protocol or, for its own
//! replica, directly.
//!
//! Rules, per message:
//! - Every one carries (volume, extent, epoch, generation). An unknown
//!   volume (deleted, or not yet in this node's metadata) is `NotFound`.
//!   A generation older than the one persisted for the volume is
//!   `StaleGeneration`; a newer one is persisted before the request is
//!   applied (see `fence` for the ordering this gives). An epoch older
//!   than the one the replica knows for the extent is `StaleEpoch`; a
//!   newer one is observed (recorded in the extent's header at its next
//!   write: the generation, not the epoch, is the fence that must survive
//!   a restart). `ExtentCrcs` is read-only and raises neither.
//! - Ranges: non-empty, inside the extent, with checked arithmetic
//!   (`OutOfRange`), 512-byte aligned (4 KiB for `ExtentCrcs`;
//!   `Misaligned`). The extent index is bounded by the largest volume the
//!   metadata allows (`NotFound` past it); the volume's current size is
//!   not checked here, since this node's view of it lags a resize.
//! - `ExtentWrite` creates the extent on first write (thin); nothing else
//!   does. A COPY piece (reconciliation's whole-extent copy) creates it
//!   marked incomplete; such a replica answers `ExtentStatus` as absent and
//!   `ExtentRead` with `Io` until the last piece (COPY with FUA) has made
//!   the copy durable and cleared the mark, and a COPY piece for a complete
//!   extent is refused (`Io`). A read of an extent never written returns
//!   zeros, `ExtentCrcs` the crc of zero blocks, `ExtentMap` one hole,
//!   `ExtentWriteZeroes`/`ExtentTrim`/`ExtentFlush` succeed without
//!   creating it. `ExtentMap` answers the store's block table (data,
//!   zeroed, hole per 4 KiB block; a lost block is data).
//! - `ExtentsDirty` (a new owner's first FLUSH) lists the extents of the
//!   volume this replica holds that may carry a write no flush covered:
//!   any dirty region, or a crash record awaiting reconciliation. It is
//!   admitted as a status is (a newer generation is persisted, after an
//!   older owner's writes still landing), so nothing an older owner
//!   acknowledged can slip in after the list.
//! - `ExtentFlush` makes every write this replica acknowledged for the
//!   extent durable. The owner's flush number is not stored: the status
//!   reports the replica's own count, and reconciliation goes by the dirty
//!   regions, which cover every unflushed write. A flush also ends the
//!   crash record of a replica a status took (`suspect`).
//! - A change of data that has begun runs to its end even if the caller
//!   goes away, holding the volume's fence until then, so a newer owner is
//!   never admitted while an older owner's write is still landing.
//!
//! Refusals are logged with volume and extent: at debug each, and a warn
//! at most once a second with the number of refusals since the last one
//! (an old owner may flood its replicas with stale requests).

use super::fence::{FenceError, FenceGuard, Fences};
use super::suspect::Suspects;
use crate::layout::Layout;
use crate::proto::peer::{
    BlockCrcs, DirtyExtents, ErrorCode, ExtentCrcs, ExtentErr, ExtentError, ExtentMap, ExtentReadReply,
    ExtentState, ExtentTarget, ExtentsDirty, MAX_DATA, MAX_DIRTY_EXTENTS, MAX_MAP_EXTENTS, Message,
};
use crate::storage::extent::{RunToEnd, zero_block_crc};
use crate::storage::format::BLOCK;
use crate::storage::{Extent, Store, StoreError};
use crate::types::{BlockState, Epoch, ExtentKey, MapExtent, NodeId, ReadChunk, VolumeId, flatten_chunks};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Answers a volume's layout from this node's view of the metadata.
pub type LayoutOf = Arc<dyn Fn(VolumeId) -> Option<Layout> + Send + Sync>;

/// Holes are answered from here: zero pages of the binary's bss, never
/// touched by a write, so they cost no memory per read.
static ZEROS: [u8; MAX_DATA] = [0; MAX_DATA];

/// What the service knows of one extent replica.
#[derive(Debug)]
struct Slot {
    /// The open replica, once a request needed it.
    ext: Option<Arc<Extent>>,
    /// The highest epoch seen for the extent (from its header and requests).
    epoch: Epoch,
}

impl Default for Slot {
    fn default() -> Self {
        Slot { ext: None, epoch: Epoch(0) }
    }
}

/// Why a request was refused: the protocol's error and a message for people.
#[derive(Debug)]
struct Refusal {
    error: ExtentError,
    message: String,
}

impl Refusal {
    fn new(error: ExtentError, message: impl Into<String>) -> Refusal {
        Refusal { error, message: message.into() }
    }

    fn store(e: StoreError) -> Refusal {
        let error = match &e {
            StoreError::Checksum { .. } => ExtentError::Checksum,
            StoreError::OutOfRange { .. } => ExtentError::OutOfRange,
            StoreError::Misaligned { .. } => ExtentError::Misaligned,
            e if e.is_no_space() => ExtentError::NoSpace,
            _ => ExtentError::Io,
        };
        Refusal::new(error, crate::units::error_chain(&e))
    }

    fn fence(e: FenceError) -> Refusal {
        let error = match &e {
            FenceError::Stale { current, .. } => ExtentError::StaleGeneration { current: *current },
            _ => ExtentError::Io,
        };
        Refusal::new(error, crate::units::error_chain(&e))
    }
}

type Answer<T> = Result<T, Refusal>;

/// A warn line at most once a second; refusals in between are counted.
#[derive(Debug, Default)]
struct Throttle {
    state: Mutex<(Option<Instant>, u64)>,
}

impl Throttle {
    /// `Some(refusals suppressed since the last line)` if a line may go out now.
    fn allow(&self) -> Option<u64> {
        let mut s = self.state.lock().unwrap();
        let now = Instant::now();
        if s.0.is_some_and(|t| now.duration_since(t) < Duration::from_secs(1)) {
            s.1 += 1;
            return None;
        }
        s.0 = Some(now);
        Some(std::mem::take(&mut s.1))
    }
}

/// The replica service of one node (see the module docs).
pub struct ReplicaService {
    store: Arc<Store>,
    fences: Fences,
    layout_of: LayoutOf,
    extents: Mutex<HashMap<ExtentKey, Slot>>,
    throttle: Throttle,
    refused: AtomicU64,
    /// Replicas that may have lost acknowledged writes in a crash, refused
    /// (but for status and crcs) until an owner's status request begins
    /// reconciling them; a running owner that sends one more sees an error
    /// and takes it out of the set.
    suspects: Suspects,
    /// Service time per request, once the daemon hands its metrics over.
    timing: std::sync::OnceLock<crate::admin::metrics::ReplicaMetrics>,
}

impl std::fmt::Debug for ReplicaService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaService").field("refused", &self.refused).finish_non_exhaustive()
    }
}

/// The `op` label of a replica request's service time.
fn replica_op(m: &Message) -> crate::admin::metrics::ReplicaOp {
    use crate::admin::metrics::ReplicaOp;
    match m {
        Message::ExtentRead(_) => ReplicaOp::read,
        Message::ExtentWrite(_) => ReplicaOp::write,
        Message::ExtentFlush(_) => ReplicaOp::flush,
        Message::ExtentTrim(_) => ReplicaOp::trim,
        Message::ExtentWriteZeroes(_) => ReplicaOp::write_zeroes,
        _ => ReplicaOp::other,
    }
}

/// The target of a data message, if it is one.
pub fn target_of(m: &Message) -> Option<ExtentTarget> {
    Some(match m {
        Message::ExtentWrite(w) => w.target,
        Message::ExtentRead(r) => r.target,
        Message::ExtentWriteZeroes(z) => z.target,
        Message::ExtentTrim(t) => t.target,
        Message::ExtentFlush(f) => f.target,
        Message::ExtentStatus(t) => *t,
        Message::ExtentCrcs(c) => c.target,
        Message::ExtentMap(m) => m.target,
        _ => return None,
    })
}

/// The (volume, owner generation) a replica request carries.
pub fn generation_of(m: &Message) -> Option<(crate::types::VolumeId, crate::types::Generation)> {
    match m {
        Message::ExtentsDirty(q) => Some((q.volume, q.generation)),
        m => target_of(m).map(|t| (t.volume, t.generation)),
    }
}

/// Checks `[offset, offset+len)` against an extent of `size` bytes and the alignment.
fn check_range(size: u64, offset: u64, len: u64, align: u64) -> Answer<()> {
    let out = |why: &str| Refusal::new(ExtentError::OutOfRange, format!("range {offset}+{len}: {why}"));
    if len == 0 {
        return Err(out("empty"));
    }
    match offset.checked_add(len) {
        None => return Err(out("offset + len overflows")),
        Some(end) if end > size => return Err(out(&format!("past the end of the {size}-byte extent"))),
        Some(_) => {}
    }
    if !offset.is_multiple_of(align) || !len.is_multiple_of(align) {
        return Err(Refusal::new(
            ExtentError::Misaligned,
            format!("range {offset}+{len} is not {align}-byte aligned"),
        ));
    }
    Ok(())
}

/// The data of a read as one buffer: a single data run as it is, holes
/// from [`ZEROS`], a mix copied together.
fn read_data(chunks: Vec<ReadChunk>, len: usize) -> Bytes {
    match &chunks[..] {
        [ReadChunk::Data(b)] => b.clone(),
        c if c.iter().all(|c| matches!(c, ReadChunk::Hole(_))) => Bytes::from_static(&ZEROS[..len]),
        c => flatten_chunks(c),
    }
}

impl ReplicaService {
    /// `layout_of` answers a volume's layout from this node's view of the
    /// metadata (None: the volume is unknown here, e.g. deleted or not yet
    /// synced).
    pub fn new(store: Arc<Store>, fences: Fences, layout_of: LayoutOf) -> Arc<ReplicaService> {
        Self::with_suspects(store, fences, layout_of, Suspects::in_memory())
    }

    /// [`ReplicaService::new`] with the node's record of the replicas that
    /// await reconciliation after a crash (see [`Suspects`]).
    pub fn with_suspects(
        store: Arc<Store>,
        fences: Fences,
        layout_of: LayoutOf,
        suspects: Suspects,
    ) -> Arc<ReplicaService> {
        Arc::new(ReplicaService {
            suspects,
            store,
            fences,
            layout_of,
            extents: Mutex::new(HashMap::new()),
            throttle: Throttle::default(),
            refused: AtomicU64::new(0),
            timing: std::sync::OnceLock::new(),
        })
    }

    /// Records each request's service time into `m` from now on (once;
    /// later calls do nothing).
    pub fn record_timing(&self, m: crate::admin::metrics::ReplicaMetrics) {
        let _ = self.timing.set(m);
    }

    /// Requests refused so far (every [`ExtentErr`] answered).
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    pub fn fences(&self) -> &Fences {
        &self.fences
    }

    /// Answers one extent request (any other kind: `Message::Error`
    /// `Unsupported`). Never panics.
    pub async fn handle(&self, from: NodeId, request: Message) -> Message {
        self.handle_from(Requester { node: from, addr: None }, request).await
    }

    /// [`ReplicaService::handle`] for a request that came over the peer
    /// protocol: its log lines name the connection's address too (the peer
    /// server does not enter a span per request: see `net::server`).
    pub async fn handle_from(&self, from: Requester, request: Message) -> Message {
        let kind = request.kind();
        if let Message::ExtentsDirty(q) = request {
            return match self.dirty_extents(q).await {
                Ok(d) => Message::ExtentsDirtyReply(d),
                Err(r) => {
                    self.refused.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(peer = %from, volume = %q.volume, error = ?r.error, message = %r.message,
                        "dirty extent listing refused");
                    Message::ExtentErr(ExtentErr { error: r.error, message: r.message })
                }
            };
        }
        let Some(target) = target_of(&request) else {
            tracing::warn!(peer = %from, ?kind, "not an extent request; refused");
            return Message::error(ErrorCode::Unsupported, format!("{kind:?} is not an extent request"));
        };
        let timed = self.timing.get().map(|m| (m, replica_op(&request), Instant::now()));
        let answer = self.answer(from, target, request).await;
        if let Some((m, op, start)) = timed {
            m.record(op, start);
        }
        answer
    }

    async fn answer(&self, from: Requester, target: ExtentTarget, request: Message) -> Message {
        let kind = request.kind();
        match self.serve(target, request).await {
            Ok(reply) => reply,
            Err(r) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                let (volume, extent) = (target.volume, target.extent);
                tracing::debug!(peer = %from, %volume, %extent, ?kind, error = ?r.error, message = %r.message,
                    "extent request refused");
                if let Some(suppressed) = self.throttle.allow() {
                    tracing::warn!(peer = %from, %volume, %extent, ?kind, error = ?r.error, message = %r.message,
                        suppressed, "extent request refused (at most one line a second; the rest at debug)");
                }
                Message::ExtentErr(ExtentErr { error: r.error, message: r.message })
            }
        }
    }

    async fn serve(&self, t: ExtentTarget, request: Message) -> Answer<Message> {
        let layout = (self.layout_of)(t.volume).ok_or_else(|| {
            Refusal::new(ExtentError::NotFound, format!("volume {} is not known on this node", t.volume))
        })?;
        let size = layout.extent_size;
        let limit = crate::meta::state::MAX_VOLUME_SIZE / size;
        if t.extent.0 >= limit {
            return Err(Refusal::new(
                ExtentError::NotFound,
                format!("extent {} is past the end of any volume of {size}-byte extents", t.extent),
            ));
        }
        let key = ExtentKey { volume: t.volume, index: t.extent };
        let read_only = matches!(request, Message::ExtentCrcs(_));
        let guard = self.fences.admit(t.volume, t.generation, !read_only).await.map_err(Refusal::fence)?;
        if !self.suspects.is_empty() {
            self.check_suspect(key, &request)?;
        }
        match request {
            Message::ExtentWrite(w) => {
                check_range(size, w.offset, w.data.len() as u64, 512)?;
                let create = if w.copy { Create::Incomplete } else { Create::Yes };
                let ext = self
                    .extent(key, size, t.epoch, create, true)
                    .await?
                    .ok_or_else(|| Refusal::new(ExtentError::Io, format!("extent {key} was not created")))?;
                if w.copy && !ext.is_incomplete() {
                    // The owner copies whole only to a replica that reported
                    // it absent: a complete one here is not what it thinks,
                    // and a copy over it would leave no mark if cut short.
                    return Err(Refusal::new(
                        ExtentError::Io,
                        format!("a whole-extent copy to extent {key}, which this replica holds complete"),
                    ));
                }
                // The copy's last piece: its FUA makes every piece durable,
                // then the mark goes.
                let completes = w.copy && w.fua;
                run_held(guard, async move {
                    ext.write(w.offset, w.data, w.fua).await?;
                    if completes {
                        ext.complete().await?;
                    }
                    Ok(())
                })
                .await?;
                Ok(Message::ExtentOk)
            }
            Message::ExtentRead(r) => {
                check_range(size, r.offset, r.len.into(), 512)?;
                let Some(ext) = self.extent(key, size, t.epoch, Create::No, true).await? else {
                    return Ok(Message::ExtentReadReply(ExtentReadReply {
                        crcs: None,
                        data: Bytes::from_static(&ZEROS[..r.len as usize]),
                    }));
                };
                if ext.is_incomplete() {
                    return Err(Refusal::new(
                        ExtentError::Io,
                        format!("extent {key} is an incomplete copy: it waits for reconciliation"),
                    ));
                }
                let chunks = ext.read(r.offset, r.len).await.map_err(Refusal::store)?;
                drop(guard);
                Ok(Message::ExtentReadReply(ExtentReadReply {
                    crcs: None,
                    data: read_data(chunks, r.len as usize),
                }))
            }
            Message::ExtentWriteZeroes(z) => {
                check_range(size, z.offset, z.len, 512)?;
                if let Some(ext) = self.extent(key, size, t.epoch, Create::No, true).await? {
                    run_held(
                        guard,
                        async move { ext.write_zeroes(z.offset, z.len, z.deallocate, z.fua).await },
                    )
                    .await?;
                }
                Ok(Message::ExtentOk)
            }
            Message::ExtentTrim(tr) => {
                check_range(size, tr.offset, tr.len, 512)?;
                if let Some(ext) = self.extent(key, size, t.epoch, Create::No, true).await? {
                    run_held(guard, async move { ext.trim(tr.offset, tr.len, tr.fua).await }).await?;
                }
                Ok(Message::ExtentOk)
            }
            Message::ExtentFlush(_) => {
                if let Some(ext) = self.extent(key, size, t.epoch, Create::No, true).await? {
                    let store = self.store.clone();
                    run_held(guard, async move { store.flush_extents([ext]).await }).await?;
                    if !self.suspects.is_empty() && self.suspects.is_taken(key) {
                        self.suspects.off_runtime(move |s| s.flushed(key)).await;
                    }
                }
                Ok(Message::ExtentOk)
            }
            Message::ExtentStatus(_) => {
                let generation = guard.current();
                // An incomplete copy reports itself absent: the owner copies
                // it whole again and never takes it as the source.
                let found = self.extent(key, size, t.epoch, Create::No, true).await?;
                let Some(ext) = found.filter(|e| !e.is_incomplete()) else {
                    // Absent: the owner copies it whole, so no record is left to keep.
                    if self.suspects.contains(key) {
                        self.suspects.off_runtime(move |s| s.forget(key)).await.map_err(|e| {
                            Refusal::new(
                                ExtentError::Io,
                                format!("cannot record that extent {key} is being reconciled: {e}"),
                            )
                        })?;
                    }
                    let epoch = self.known_epoch(key).max(t.epoch);
                    return Ok(Message::ExtentStatusReply(ExtentState::absent(generation, epoch)));
                };
                let mut dirty_regions: Vec<u32> = ext.dirty_regions().into_iter().map(|r| r as u32).collect();
                let nregions =
                    u32::try_from(ext.size().div_ceil(u64::from(ext.region_size()))).unwrap_or(u32::MAX);
                if self.suspects.contains(key) {
                    let mut dirty = dirty_regions;
                    let taken =
                        self.suspects.off_runtime(move |s| s.take(key, nregions, &mut dirty).map(|_| dirty));
                    dirty_regions = taken.await.map_err(|e| {
                        Refusal::new(
                            ExtentError::Io,
                            format!("cannot record that extent {key} is being reconciled: {e}"),
                        )
                    })?;
                    tracing::info!(%key, regions = dirty_regions.len(),
                        "a replica that crashed with unflushed writes is being reconciled");
                }
                Ok(Message::ExtentStatusReply(ExtentState {
                    exists: true,
                    flush_number: ext.flush_counter().await,
                    generation,
                    epoch: ext.epoch().await,
                    region_size: ext.region_size(),
                    dirty_regions,
                }))
            }
            Message::ExtentCrcs(ExtentCrcs { offset, len, .. }) => {
                check_range(size, offset, len, BLOCK)?;
                let crcs = match self.extent(key, size, t.epoch, Create::No, false).await? {
                    Some(ext) => ext.block_crcs(offset, len).map_err(Refusal::store)?,
                    None => vec![zero_block_crc(); (len / BLOCK) as usize],
                };
                Ok(Message::ExtentCrcsReply(BlockCrcs { block_size: BLOCK as u32, crcs }))
            }
            Message::ExtentMap(ExtentMap { offset, len, .. }) => {
                // Admitted as a read: an owner fenced by a newer generation
                // learns nothing more of the extent, and a suspect replica
                // (above) answers nothing it might have lost.
                check_range(size, offset, len, 512)?;
                let mut map = match self.extent(key, size, t.epoch, Create::No, true).await? {
                    Some(ext) => ext.map(offset, len).map_err(Refusal::store)?,
                    None => vec![MapExtent { len, state: BlockState::HOLE }],
                };
                // A prefix of the range, as the protocol allows.
                map.truncate(MAX_MAP_EXTENTS);
                Ok(Message::ExtentMapReply(map))
            }
            other => Err(Refusal::new(ExtentError::NotFound, format!("{:?} is not served", other.kind()))),
        }
    }

    /// The extents of the volume held here that may carry a write no flush
    /// covered, from `q.from` on (see the module docs).
    async fn dirty_extents(&self, q: ExtentsDirty) -> Answer<DirtyExtents> {
        if (self.layout_of)(q.volume).is_none() {
            return Err(Refusal::new(
                ExtentError::NotFound,
                format!("volume {} is not known on this node", q.volume),
            ));
        }
        let _guard = self.fences.admit(q.volume, q.generation, true).await.map_err(Refusal::fence)?;
        let mut dirty: std::collections::BTreeSet<crate::types::ExtentIndex> = self
            .store
            .opened()
            .iter()
            .filter(|e| e.key().volume == q.volume && e.key().index >= q.from && e.is_dirty())
            .map(|e| e.key().index)
            .collect();
        dirty.extend(self.suspects.of_volume(q.volume).into_iter().filter(|i| *i >= q.from));
        let more = dirty.len() > MAX_DIRTY_EXTENTS;
        Ok(DirtyExtents { extents: dirty.into_iter().take(MAX_DIRTY_EXTENTS).collect(), more })
    }

    /// Refuses data requests for a replica that awaits reconciliation.
    fn check_suspect(&self, key: ExtentKey, request: &Message) -> Answer<()> {
        match request {
            Message::ExtentStatus(_) | Message::ExtentCrcs(_) => Ok(()),
            _ if self.suspects.refuses(key) => Err(Refusal::new(
                ExtentError::Io,
                format!(
                    "extent {key} may have lost unflushed writes in a crash; it waits for reconciliation"
                ),
            )),
            _ => Ok(()),
        }
    }

    /// The highest epoch known for `key` without opening it.
    fn known_epoch(&self, key: ExtentKey) -> Epoch {
        self.extents.lock().unwrap().get(&key).map_or(Epoch(0), |s| s.epoch)
    }

    /// The replica of `key` after the epoch check: opened if it exists,
    /// created if `create`; `None` if it does not exist. With `raise`, a
    /// newer epoch than the one known is recorded.
    async fn extent(
        &self,
        key: ExtentKey,
        size: u64,
        epoch: Epoch,
        create: Create,
        raise: bool,
    ) -> Answer<Option<Arc<Extent>>> {
        let (create, incomplete) = (create != Create::No, create == Create::Incomplete);
        let cached = {
            let mut m = self.extents.lock().unwrap();
            let slot = m.entry(key).or_default();
            // Removed by the store (a deleted volume, or past the end of a
            // shrunk one): never write into an unlinked file.
            if slot.ext.is_some() && !self.store.contains(key) {
                slot.ext = None;
            }
            slot.ext.clone()
        };
        let ext = match cached {
            Some(e) => Some(e),
            None if create || self.store.contains(key) => {
                // A new extent is created with the request's epoch once it
                // passed the check below; an existing one keeps its own.
                let known = self.known_epoch(key);
                if epoch < known {
                    return Err(stale_epoch(key, epoch, known));
                }
                // Epoch 0 for one that exists: the check below decides
                // whether this request's epoch is recorded.
                let first = if create { epoch } else { Epoch(0) };
                let e = if incomplete {
                    self.store.extent_for_copy(key, size, first).await
                } else {
                    self.store.extent(key, size, first).await
                };
                let e = e.map_err(Refusal::store)?;
                let on_disk = e.epoch().await;
                let mut m = self.extents.lock().unwrap();
                let slot = m.entry(key).or_default();
                slot.epoch = slot.epoch.max(on_disk);
                Some(slot.ext.get_or_insert(e).clone())
            }
            None => None,
        };
        let raised = {
            let mut m = self.extents.lock().unwrap();
            let slot = m.entry(key).or_default();
            if epoch < slot.epoch {
                return Err(stale_epoch(key, epoch, slot.epoch));
            }
            let raised = raise && epoch > slot.epoch;
            if raised {
                slot.epoch = epoch;
            }
            raised
        };
        if let (true, Some(e)) = (raised, &ext) {
            e.observe_epoch(epoch).await;
        }
        Ok(ext)
    }
}

/// Who asked: a node, and the address of its connection when it came over
/// the network. Displays as `n7@127.0.0.1:4000` (or `n7`).
#[derive(Debug, Clone, Copy)]
pub struct Requester {
    pub node: NodeId,
    pub addr: Option<std::net::SocketAddr>,
}

impl std::fmt::Display for Requester {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.addr {
            Some(a) => write!(f, "{}@{a}", self.node),
            None => write!(f, "{}", self.node),
        }
    }
}

/// Whether a request may create the extent it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Create {
    No,
    Yes,
    /// Marked incomplete: the first piece of a whole-extent copy.
    Incomplete,
}

fn stale_epoch(key: ExtentKey, asked: Epoch, current: Epoch) -> Refusal {
    Refusal::new(
        ExtentError::StaleEpoch { current },
        format!("{asked} of extent {key} is older than {current}, which this replica has seen"),
    )
}

/// Runs a change of data to its end even if the caller goes away, holding
/// the volume's fence until it is done.
async fn run_held<F>(guard: FenceGuard, change: F) -> Answer<()>
where
    F: std::future::Future<Output = Result<(), StoreError>> + Send + 'static,
{
    RunToEnd::new(async move {
        let r = change.await;
        drop(guard);
        r
    })
    .await
    .map_err(Refusal::store)
}
