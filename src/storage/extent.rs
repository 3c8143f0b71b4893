//! One extent replica: the I/O shell around [`super::format`].
//!
//! # How data and checksums stay crash-atomic together
//!
//! Data blocks are written in place; their crc32c lives in the block table,
//! which is held in memory (authoritative at run time) and written back at
//! flush. A crash can therefore leave a block whose on-disk crc belongs to
//! another version of its data. The header's dirty-region bitmap (DRBD's
//! activity log) bounds where that can happen:
//!
//! - Before the first write into a region whose bit is not durably set, the
//!   bit is set and the header written and fdatasync'ed. Concurrent writers
//!   waiting for marks share one header write (group commit under `meta`).
//! - Flush writes the dirty table pages and a new header side by side, then
//!   runs one barrier (its fdatasync, or the store's syncfs over several
//!   extents). The header carries the flush number and clears the
//!   bits of regions with no write in flight and none during the last
//!   [`DEFAULT_CLEAN_AFTER_FLUSHES`] flush intervals, and only of regions
//!   whose table pages an earlier, successful flush already synced: the
//!   order of writes inside one fdatasync is not guaranteed, so a region
//!   is never marked clean by the same sync that makes its table page
//!   durable. (Writing the header after the sync instead, as a first
//!   version did, put a second disk write in series on every flush.)
//!   A table page whose only changes are new crcs of blocks that already
//!   had data is deferred (see `Table::lazy_pages`): recovery recomputes
//!   those crcs anyway, so it is written only before its regions go clean.
//!   The hysteresis is long on purpose: with a short one, random writes with frequent flushes (a
//!   database, `fio --fsync=32`) keep hitting freshly cleaned regions and
//!   pay a header write + fdatasync before almost every write (measured:
//!   a third of qemu-nbd's IOPS with 2 intervals). The price: after a
//!   crash, blocks in regions written within that many flushes are
//!   re-checksummed rather than reported as rot. A clean shutdown clears
//!   every bit.
//! - Open after a crash re-reads every dirty region and, for each block
//!   whose crc does not match its data, recomputes the crc (logged at info):
//!   that block had an unflushed write, which may read back per sector as
//!   old or new. Blocks in clean regions keep their stored crc and are
//!   verified on every read, so rot there surfaces as a checksum error.
//!
//! FUA completes the write and then runs a flush, so the block's table entry
//! (allocation flag and crc) is durable with its data; relying on recovery
//! alone would not do, since recovery cannot tell a FUA write into a hole
//! from the stale content of a block trimmed and flushed earlier.
//!
//! Flushes are group-committed: a flush that queues behind a running one
//! is satisfied by the next execution to start, which any of the waiters
//! runs (so concurrent FUA writes share fdatasyncs).
//!
//! A flush has two halves so that the store can flush many extents with
//! one barrier: [`Extent::lock_for_flush`] and [`FlushLock::prepare`]
//! write the table pages and header, the caller runs the barrier (this
//! extent's fdatasync, or a syncfs covering several files), and
//! [`PreparedFlush::finish`] records the outcome. The store also
//! group-commits its multi-extent flushes per data directory (`store`).
//!
//! Header writes alternate between two slots (see `format`): each goes to
//! the slot not holding the last header known durable.
//!
//! Lock order: region marking (`meta`, briefly `regions`) before the block
//! range lock; flush takes `meta` and never a range lock, so it cannot
//! deadlock with writers.
//!
//! # Cancel safety
//!
//! Any future of this module may be dropped at any await (a client that
//! goes away, a replica's timeout) and the extent stays consistent:
//!
//! - A change of data (write, read-modify-write, zeroing, trim, compare and
//!   write) that holds its range lock runs to its end even if its caller
//!   goes away: from there on it is a [`RunToEnd`] that owns the extent, the
//!   lock and the regions ([`WriteHold`]), and that moves into a task of its
//!   own when dropped. Its disk write and table update therefore happen
//!   together, or a failure re-takes the crcs of what is on disk
//!   (`resync_crcs`), before the range and its regions are released. (Only
//!   repairing the table on drop would not do: the fix-up needs I/O, and a
//!   reader admitted meanwhile would see new data under an old crc.) A drop
//!   before the lock is granted changes nothing.
//! - Writes issued under `meta` (headers, table pages) are recorded in
//!   `Meta::outstanding` until they complete; whoever takes `meta` next
//!   waits for any a dropped holder left behind before it writes, so an
//!   old header can never land after a newer one in the same slot.
//!   (Flushes and header marks need no task of their own: a dropped flush
//!   puts its pages back, and nothing else is left half done.)

use super::engine::{self, AlignedBuf, Completion, Engine, FallocMode, FileRef, Op, Request, WriteData};
use super::format::{self, BLOCK, ENTRIES_PER_PAGE, Entry, FormatError, Geometry, HEADER_SIZE, Header};
use super::rangelock::{RangeLock, Ticket};
use super::{Result, StoreError};
use crate::types::{
    BlockState, Epoch, ExtentIndex, ExtentKey, MapExtent, ReadChunk, VolumeId, flatten_chunks,
};
use bytes::Bytes;
use std::collections::{BTreeSet, VecDeque};
use std::future::Future;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::sync::oneshot;

/// One extent replica. All offsets are relative to the extent and must be
/// 512-byte aligned; the range must lie inside the extent.
#[derive(Debug)]
pub struct Extent {
    key: ExtentKey,
    geo: Geometry,
    path: PathBuf,
    engine: Arc<dyn Engine>,
    file: FileRef,
    table: Mutex<Table>,
    regions: Mutex<Regions>,
    meta: tokio::sync::Mutex<Meta>,
    locks: RangeLock,
    /// Set by the store when it crashed or shut down: every op fails.
    closed: Arc<AtomicBool>,
    next_tag: AtomicU64,
    /// Flush executions started so far (bumped under `meta` before the
    /// snapshot). A flush called when this is `n` is covered by execution `n + 1`.
    flushes_started: AtomicU64,
    /// Flush intervals a region must stay unwritten before its bit clears.
    clean_after: AtomicU64,
    /// Mirrors `Meta::incomplete` for readers that take no lock; cleared
    /// only after a header without the mark is durable, so it never says
    /// complete while the disk may say otherwise.
    incomplete: AtomicBool,
}

/// Default for [`Extent`]'s region hysteresis (`StoreOptions::clean_after_flushes`).
pub const DEFAULT_CLEAN_AFTER_FLUSHES: u64 = 1024;

#[derive(Debug)]
struct Table {
    entries: Vec<Entry>,
    /// Table pages with a change the next flush must write: a block gained
    /// or lost its data, or recovery fixed a crc.
    dirty_pages: BTreeSet<u64>,
    /// Table pages whose only changes are new crcs of blocks that already
    /// had data. Their regions are durably dirty, and recovery recomputes
    /// the crc of every such block whose data does not match, so these pages
    /// need to be on disk only before their regions are marked clean; a
    /// flush writes them once their regions have idled for half the
    /// hysteresis. (Writing every changed page at every flush cost a 4 KiB
    /// write per random write: 32 extra writes per flush at `fio --fsync=32`.)
    lazy_pages: BTreeSet<u64>,
    /// A write or zeroing completed since the last flush took its snapshot.
    unsynced: bool,
}

impl Table {
    /// Records a changed entry; `crc_only` if the block had data before and has now.
    fn touched(&mut self, block: u64, crc_only: bool) {
        let page = block / ENTRIES_PER_PAGE;
        if !crc_only {
            self.dirty_pages.insert(page);
        } else if !self.dirty_pages.contains(&page) {
            self.lazy_pages.insert(page);
        }
        self.unsynced = true;
    }
}

#[derive(Debug)]
struct Regions {
    /// Bit set in every header that could be picked after a crash: writes
    /// into these regions may start without a header write.
    durable: Vec<bool>,
    /// Bits for the next header write (a superset of `durable`).
    want: Vec<bool>,
    inflight: Vec<u32>,
    /// Flush interval of the last write into each region.
    last_touch: Vec<u64>,
    /// Current flush interval, bumped at the start of every flush.
    interval: u64,
}

#[derive(Debug)]
struct Meta {
    generation: u64,
    epoch: Epoch,
    flush_counter: u64,
    /// The header's INCOMPLETE flag, carried by every header written.
    incomplete: bool,
    /// Slot of the last header known to be on stable storage.
    durable_slot: u64,
    /// Slot written since the last fdatasync, if any.
    pending_slot: Option<u64>,
    /// Index of the last flush execution that succeeded.
    flushed_ok: u64,
    /// The flush interval that flush ended: table entries of writes that
    /// completed in it or earlier are on stable storage.
    synced_interval: u64,
    /// Writes submitted under `meta` (headers, table pages) not yet known
    /// complete: a holder dropped while waiting leaves them here, and the
    /// next holder waits for them before it writes (see `Extent::settle`).
    outstanding: VecDeque<(&'static str, oneshot::Receiver<Completion>)>,
}

/// Holds regions as "write in flight"; releases them as touched now.
struct RegionGuard<'a> {
    ext: &'a Extent,
    regions: Range<u64>,
}

impl Drop for RegionGuard<'_> {
    fn drop(&mut self) {
        self.ext.release_regions(self.regions.clone());
    }
}

impl RegionGuard<'_> {
    /// The regions, held until [`Extent::release_regions`] (see [`WriteHold`]).
    fn into_regions(self) -> Range<u64> {
        let r = self.regions.clone();
        std::mem::forget(self);
        r
    }
}

/// An owned hold on blocks about to change: their regions marked dirty
/// and held as written-to, and their range lock taken exclusive. Owned (no
/// borrow of the extent), so the change can finish in a task of its own;
/// dropping it releases the lock, then the regions.
#[derive(Debug)]
pub(crate) struct WriteHold {
    ext: Arc<Extent>,
    blocks: Range<u64>,
    regions: Range<u64>,
    lock: Option<Ticket>,
}

impl Drop for WriteHold {
    fn drop(&mut self) {
        if let Some(t) = self.lock.take() {
            self.ext.locks.release(t);
        }
        self.ext.release_regions(self.regions.clone());
    }
}

impl WriteHold {
    /// True if the hold covers the bytes `[offset, offset+len)`.
    fn covers(&self, offset: u64, len: u64) -> bool {
        self.blocks.start * BLOCK <= offset && offset + len <= self.blocks.end * BLOCK
    }
}

/// A future that runs to its end once started: dropped before it is done,
/// it moves to a task of its own and finishes there (its output dropped).
/// Used for every piece of work that has changed or is changing the disk
/// and must finish its bookkeeping before it releases what it holds.
///
/// Outside a tokio runtime (a future dropped from a plain thread) it
/// finishes on a thread of its own. When the runtime itself shuts down, its
/// tasks are dropped without running: the process is going away, and the
/// regions it wrote are durably dirty, so the next open re-takes their crcs.
pub(crate) struct RunToEnd<T: Send + 'static> {
    fut: Option<Pin<Box<dyn Future<Output = T> + Send + 'static>>>,
}

impl<T: Send + 'static> RunToEnd<T> {
    pub(crate) fn new(fut: impl Future<Output = T> + Send + 'static) -> Self {
        RunToEnd { fut: Some(Box::pin(fut)) }
    }
}

impl<T: Send + 'static> Future for RunToEnd<T> {
    type Output = T;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let fut = self.fut.as_mut().expect("RunToEnd polled after it completed");
        let out = fut.as_mut().poll(cx);
        if out.is_ready() {
            self.fut = None;
        }
        out
    }
}

impl<T: Send + 'static> Drop for RunToEnd<T> {
    fn drop(&mut self) {
        let Some(fut) = self.fut.take() else { return };
        let rest = async move {
            let _ = fut.await;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn(rest)),
            Err(_) => drop(std::thread::spawn(move || futures::executor::block_on(rest))),
        }
    }
}

pub(crate) fn file_name(key: ExtentKey) -> String {
    format!("{}-{}.ext", key.volume, key.index)
}

/// The key a replica file's name says it holds (`v7-e12.ext`), if it is one.
pub(crate) fn key_of_file_name(name: &str) -> Option<ExtentKey> {
    let (v, e) = name.strip_suffix(".ext")?.split_once('-')?;
    let num =
        |s: &str, p: &str| s.strip_prefix(p).filter(|d| !d.starts_with('+')).and_then(|d| d.parse().ok());
    let key = ExtentKey { volume: VolumeId(num(v, "v")?), index: ExtentIndex(num(e, "e")?) };
    (file_name(key) == name).then_some(key)
}

/// Table pages written per I/O when a new extent's table is laid out.
const CREATE_TABLE_PAGES: u64 = 256;

/// A block run within one read: data to fetch or a hole.
struct Run {
    blocks: Range<u64>,
    data: bool,
}

impl Extent {
    #[allow(clippy::too_many_arguments)] // a private constructor fed from two places
    fn new(
        key: ExtentKey,
        geo: Geometry,
        path: PathBuf,
        engine: Arc<dyn Engine>,
        file: FileRef,
        header: &Header,
        durable_slot: u64,
        entries: Vec<Entry>,
        closed: Arc<AtomicBool>,
    ) -> Extent {
        let n = geo.nregions as usize;
        // Regions dirty on disk stay dirty until their (possibly repaired)
        // table pages have been flushed; touching them now starts the hysteresis.
        let interval = 1;
        Extent {
            key,
            geo,
            path,
            engine,
            file,
            table: Mutex::new(Table {
                entries,
                dirty_pages: BTreeSet::new(),
                lazy_pages: BTreeSet::new(),
                unsynced: false,
            }),
            regions: Mutex::new(Regions {
                durable: header.dirty.clone(),
                want: header.dirty.clone(),
                inflight: vec![0; n],
                last_touch: vec![interval; n],
                interval,
            }),
            meta: tokio::sync::Mutex::new(Meta {
                generation: header.generation,
                epoch: header.epoch,
                flush_counter: header.flush_counter,
                incomplete: header.incomplete,
                durable_slot,
                pending_slot: None,
                flushed_ok: 0,
                synced_interval: 0,
                outstanding: VecDeque::new(),
            }),
            locks: RangeLock::default(),
            closed,
            next_tag: AtomicU64::new(0),
            flushes_started: AtomicU64::new(0),
            clean_after: AtomicU64::new(DEFAULT_CLEAN_AFTER_FLUSHES),
            incomplete: AtomicBool::new(header.incomplete),
        }
    }

    /// Creates a new, empty replica file at `path` (via a temporary name, so a
    /// crash never leaves a `.ext` file without a durable header), marked
    /// incomplete if `incomplete` (the first write of a whole-extent copy:
    /// the mark is in the header the rename publishes, so no crash leaves
    /// the file looking like a complete, empty replica).
    #[allow(clippy::too_many_arguments)] // the store's one call site names them all
    pub(crate) async fn create(
        engine: Arc<dyn Engine>,
        dir: &Path,
        key: ExtentKey,
        size: u64,
        epoch: Epoch,
        region_size: u32,
        incomplete: bool,
        closed: Arc<AtomicBool>,
    ) -> Result<Extent> {
        let geo = Geometry::new(size, region_size).map_err(|e| StoreError::BadSize {
            key,
            size,
            why: e.to_string(),
        })?;
        let path = dir.join(file_name(key));
        let tmp = dir.join(format!("{}.tmp", file_name(key)));
        let ioe = |what: &str, e: io::Error| StoreError::io(format!("{what} {}", tmp.display()), e);
        if engine.exists(&tmp) {
            engine.remove(&tmp).map_err(|e| ioe("remove stale", e))?;
        }
        let file = engine.open(&tmp, true).map_err(|e| ioe("create", e))?;
        let header = Header {
            generation: 1,
            key,
            epoch,
            flush_counter: 0,
            geometry: geo,
            dirty: vec![false; geo.nregions as usize],
            incomplete,
        };
        let ext = Extent::new(key, geo, path.clone(), engine.clone(), file, &header, 0, Vec::new(), closed);
        let made = async {
            engine.set_len(&ext.file, geo.file_len()).map_err(|e| ioe("size", e))?;
            // Header and table are preallocated so a full disk fails here or
            // on data writes, never while writing metadata at a flush.
            // (Filesystems without fallocate just don't get the guarantee.)
            let reserve = Op::Fallocate {
                file: ext.file.clone(),
                mode: FallocMode::Reserve,
                offset: 0,
                len: geo.data_offset,
            };
            match ext.io("reserve metadata of", reserve).await {
                Err(StoreError::Io { source, .. }) if source.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
                r => r.map(drop)?,
            }
            // The whole table, all holes: every table sector carries its
            // checksum from the start (an all-zero sector is rot, not a hole).
            let holes = vec![Entry::HOLE; geo.nblocks as usize];
            for first in (0..geo.table_pages()).step_by(CREATE_TABLE_PAGES as usize) {
                let pages = first..(first + CREATE_TABLE_PAGES).min(geo.table_pages());
                let mut buf = AlignedBuf::zeroed(((pages.end - pages.start) * BLOCK) as usize);
                for (i, p) in pages.clone().enumerate() {
                    let at = i * BLOCK as usize;
                    format::encode_table_page(&holes, p, &mut buf.as_mut_slice()[at..at + BLOCK as usize]);
                }
                let op =
                    Op::Write { file: ext.file.clone(), offset: geo.table_page_pos(first), buf: buf.into() };
                ext.io("write table of", op).await?;
            }
            let mut buf = AlignedBuf::zeroed(HEADER_SIZE);
            header.encode(buf.as_mut_slice());
            ext.io("write header of", Op::Write { file: ext.file.clone(), offset: 0, buf: buf.into() })
                .await?;
            ext.sync().await?;
            engine.rename(&tmp, &path).map_err(|e| ioe("rename", e))?;
            engine.sync_dir(dir).map_err(|e| StoreError::io(format!("fsync dir {}", dir.display()), e))?;
            Ok::<_, StoreError>(())
        }
        .await;
        if let Err(e) = made {
            let _ = engine.remove(&tmp);
            return Err(e);
        }
        ext.table.lock().unwrap().entries = vec![Entry::HOLE; geo.nblocks as usize];
        Ok(ext)
    }

    /// Opens an existing replica file and recovers it (see the module docs).
    pub(crate) async fn open(
        engine: Arc<dyn Engine>,
        path: &Path,
        closed: Arc<AtomicBool>,
    ) -> Result<Extent> {
        let corrupt = |why: String| StoreError::Corrupt { path: path.to_path_buf(), why };
        let file =
            engine.open(path, false).map_err(|e| StoreError::io(format!("open {}", path.display()), e))?;
        let len =
            engine.file_len(&file).map_err(|e| StoreError::io(format!("stat {}", path.display()), e))?;
        let hdr = read_raw(&*engine, &file, 0, 2 * HEADER_SIZE)
            .await
            .map_err(|e| StoreError::io(format!("read headers of {}", path.display()), e))?;
        let (slot, header) =
            format::pick_header(&hdr[..HEADER_SIZE], &hdr[HEADER_SIZE..]).map_err(|[a, b]| match (a, b) {
                // A sound header of another format version: not rot, and
                // not something to serve or overwrite.
                (FormatError::BadVersion(version), _) | (_, FormatError::BadVersion(version)) => {
                    StoreError::Version { path: path.to_path_buf(), version }
                }
                (a, b) => corrupt(format!("no valid header (slot A: {a}; slot B: {b})")),
            })?;
        let geo = header.geometry;
        if len < geo.file_len() {
            return Err(corrupt(format!("file is {len} bytes, the header needs {}", geo.file_len())));
        }
        let raw = read_raw(&*engine, &file, format::TABLE_OFFSET, geo.table_len as usize)
            .await
            .map_err(|e| StoreError::io(format!("read table of {}", path.display()), e))?;
        let table = format::decode_table(&raw, geo.nblocks);
        let key = header.key;
        let ext =
            Extent::new(key, geo, path.to_path_buf(), engine, file, &header, slot, table.entries, closed);
        for bad in table.bad {
            ext.salvage(bad).await;
        }
        ext.recover(&header.dirty).await?;
        // The picked header may so far live only in the page cache; the next
        // header write overwrites the other slot, so make this one durable.
        ext.sync().await?;
        Ok(ext)
    }

    /// Rot in the block table (a sector whose checksum fails, or an entry
    /// that does not decode): each entry of it is kept only where the
    /// block's data confirms it (its crc matches, or the block reads as
    /// zeros and the entry says it has no data); the rest stay `LOST` and
    /// read as errors until rewritten. Logged once, with the blocks; the
    /// sector is rewritten, sound again, by the next flush.
    async fn salvage(&self, bad: format::BadEntries) {
        let blocks = bad.blocks.clone();
        let data = self.read_data(blocks.clone()).await;
        let mut lost = Vec::new();
        {
            let mut t = self.table.lock().unwrap();
            for (i, guess) in bad.guesses.iter().enumerate() {
                let b = blocks.start + i as u64;
                let chunk = data.as_ref().ok().map(|d| &d[i * BLOCK as usize..(i + 1) * BLOCK as usize]);
                let confirmed = match (guess, chunk) {
                    (Some(e), Some(d)) if e.has_data() => format::block_crc(d) == e.crc,
                    (Some(e), Some(d)) if !e.is_lost() => d.iter().all(|&x| x == 0),
                    _ => false,
                };
                match guess {
                    Some(e) if confirmed => t.entries[b as usize] = *e,
                    _ => {
                        t.entries[b as usize] = Entry::LOST;
                        lost.push(b);
                    }
                }
                t.dirty_pages.insert(b / ENTRIES_PER_PAGE);
            }
            t.unsynced = true;
        }
        let read_error = data.err().map(|e| e.to_string());
        tracing::error!(extent = %self.key, blocks = ?blocks, lost = lost.len(), first_lost = ?lost.first(),
            last_lost = ?lost.last(), why = %bad.why, read_error, path = %self.path.display(),
            "block table rot: the lost blocks read as errors until they are rewritten");
    }

    /// Repairs the dirty regions after a crash. Those are where unflushed
    /// writes may have left data and table out of step:
    /// - A block with data whose crc does not match: an unflushed (possibly
    ///   torn) write; its crc is recomputed, so it reads as old or new per
    ///   sector.
    /// - A block without data (a hole, or allocated zeros) may still hold
    ///   bytes of a write whose table entry was lost. They are cleared now:
    ///   otherwise a later partial write into the block, torn by another
    ///   crash, would fall back to those bytes rather than to the zeros the
    ///   client saw (found by the crash-point property test).
    async fn recover(&self, dirty: &[bool]) -> Result<()> {
        for region in (0..self.geo.nregions).filter(|&r| dirty[r as usize]) {
            let blocks = self.geo.region_blocks(region);
            let entries: Vec<Entry> =
                self.table.lock().unwrap().entries[blocks.start as usize..blocks.end as usize].to_vec();
            let mut i = 0;
            while i < entries.len() {
                let e = entries[i];
                let run = entries[i..].iter().take_while(|x| **x == e).count();
                if !e.has_data() && !e.is_lost() {
                    let b = blocks.start + i as u64;
                    self.clear_data(b..b + run as u64, !e.is_zeroed()).await?;
                }
                i += run;
            }
            if !entries.iter().any(Entry::has_data) {
                continue;
            }
            let buf = self.read_data(blocks.clone()).await?;
            let mut t = self.table.lock().unwrap();
            for (i, e) in entries.iter().enumerate().filter(|(_, e)| e.has_data()) {
                let b = blocks.start + i as u64;
                let data = &buf[i * BLOCK as usize..(i + 1) * BLOCK as usize];
                let crc = format::block_crc(data);
                if crc != e.crc {
                    tracing::info!(extent = %self.key, block = b, "recovery: block had an unflushed write; crc recomputed");
                    t.entries[b as usize] = Entry::data(crc);
                    t.dirty_pages.insert(b / ENTRIES_PER_PAGE);
                }
            }
        }
        Ok(())
    }

    pub fn key(&self) -> ExtentKey {
        self.key
    }

    pub fn size(&self) -> u64 {
        self.geo.extent_size
    }

    /// The replica's file (for tools and tests).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where extent byte `offset` lives in the file (for tools and tests).
    pub fn file_offset(&self, offset: u64) -> u64 {
        self.geo.data_offset + offset
    }

    /// Number of completed flushes (persisted in the header; reconciliation compares it).
    pub async fn flush_counter(&self) -> u64 {
        self.meta.lock().await.flush_counter
    }

    pub async fn epoch(&self) -> Epoch {
        self.meta.lock().await.epoch
    }

    /// Records a newer replica-set epoch; persisted with the next header write.
    pub(crate) async fn observe_epoch(&self, epoch: Epoch) {
        let mut m = self.meta.lock().await;
        m.epoch = m.epoch.max(epoch);
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        self.check_at(offset, len, format::SECTOR)
    }

    /// Bounds, and alignment to `granule` bytes (the sector, or 1 for
    /// [`Extent::write_unaligned`]).
    fn check_at(&self, offset: u64, len: u64, granule: u64) -> Result<()> {
        if !offset.is_multiple_of(granule) || !len.is_multiple_of(granule) {
            return Err(StoreError::Misaligned { offset, len });
        }
        if offset.checked_add(len).is_none_or(|end| end > self.geo.extent_size) {
            return Err(StoreError::OutOfRange { key: self.key, offset, len, size: self.geo.extent_size });
        }
        if self.closed.load(Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        Ok(())
    }

    async fn io(&self, what: &str, op: Op) -> Result<Option<AlignedBuf>> {
        if self.closed.load(Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        let tag = self.next_tag.fetch_add(1, Ordering::Relaxed);
        let c = engine::run(&*self.engine, op, tag).await;
        match c.result {
            Ok(_) => Ok(c.buf),
            Err(e) => Err(StoreError::io(format!("{what} extent {}", self.key), e)),
        }
    }

    pub(crate) async fn sync(&self) -> Result<()> {
        self.io("fdatasync", Op::Sync { file: self.file.clone() }).await.map(drop)
    }

    /// Submits writes under `meta` and waits for all of them (all, also when
    /// one fails, so none is left in flight); the first error, if any. Each
    /// stays in `meta.outstanding` until it completed, so a caller dropped
    /// meanwhile leaves them for the next holder to wait for.
    async fn meta_io(&self, meta: &mut Meta, ops: Vec<(&'static str, Op)>) -> Result<()> {
        debug_assert!(meta.outstanding.is_empty(), "settled when `meta` was taken");
        if self.closed.load(Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        for (what, op) in ops {
            let (reply, rx) = oneshot::channel();
            let user_data = self.next_tag.fetch_add(1, Ordering::Relaxed);
            self.engine.submit(Request { op, user_data, reply });
            meta.outstanding.push_back((what, rx));
        }
        let mut first = None;
        while let Some((what, rx)) = meta.outstanding.front_mut() {
            let what = *what;
            let result = rx.await.map_or_else(|_| Err(io::Error::other("I/O engine stopped")), |c| c.result);
            meta.outstanding.pop_front();
            if let Err(e) = result {
                first.get_or_insert_with(|| StoreError::io(format!("{what} extent {}", self.key), e));
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Waits for writes a dropped holder of `meta` left in flight. Their
    /// outcome does not matter: a header went to the slot not trusted, and
    /// the table pages of a flush that did not finish went back to the next.
    async fn settle(&self, meta: &mut Meta) {
        while let Some((what, rx)) = meta.outstanding.front_mut() {
            let done = rx.await;
            let ok = matches!(done, Ok(Completion { result: Ok(_), .. }));
            tracing::debug!(extent = %self.key, what = *what, ok, "a write left by a dropped flush completed");
            meta.outstanding.pop_front();
        }
    }

    /// Releases regions held by a [`RegionGuard`] or a [`WriteHold`], as touched now.
    fn release_regions(&self, regions: Range<u64>) {
        let mut r = self.regions.lock().unwrap();
        let now = r.interval;
        for i in regions {
            r.inflight[i as usize] -= 1;
            r.last_touch[i as usize] = now;
        }
    }

    /// Marks the regions of `blocks` dirty and takes their range lock
    /// exclusive, owned. Dropped before it returns, it holds nothing.
    async fn hold(self: &Arc<Self>, blocks: Range<u64>) -> Result<WriteHold> {
        let regions = self.mark_dirty(blocks.clone()).await?;
        let lock = self.locks.lock(blocks.clone(), true).await;
        Ok(WriteHold {
            ext: self.clone(),
            blocks,
            regions: regions.into_regions(),
            lock: Some(lock.into_ticket()),
        })
    }

    /// A [`WriteHold`] over the blocks of `[offset, offset+len)` (`len > 0`),
    /// for a change of several steps (a compare and write over several
    /// extents takes one per extent, in key order).
    pub(crate) async fn hold_range(self: &Arc<Self>, offset: u64, len: u64) -> Result<WriteHold> {
        self.check(offset, len)?;
        assert!(len > 0, "an empty range holds no blocks");
        self.hold(offset / BLOCK..(offset + len).div_ceil(BLOCK)).await
    }

    /// Reads whole blocks without verifying them.
    async fn read_data(&self, blocks: Range<u64>) -> Result<AlignedBuf> {
        let buf = AlignedBuf::for_overwrite(((blocks.end - blocks.start) * BLOCK) as usize);
        let op = Op::Read { file: self.file.clone(), offset: self.geo.data_pos(blocks.start), buf };
        Ok(self.io("read", op).await?.expect("reads hand back their buffer"))
    }

    /// Reads whole blocks and verifies each against its table entry.
    async fn read_verified(&self, blocks: Range<u64>, entries: &[Entry]) -> Result<AlignedBuf> {
        let buf = self.read_data(blocks.clone()).await?;
        for (i, chunk) in buf.as_slice().chunks(BLOCK as usize).enumerate() {
            let e = &entries[i];
            let crc = format::block_crc(chunk);
            if crc != e.crc {
                let block = blocks.start + i as u64;
                tracing::error!(extent = %self.key, block, stored = e.crc, computed = crc, path = %self.path.display(),
                    "checksum mismatch");
                return Err(StoreError::Checksum { key: self.key, block });
            }
        }
        Ok(buf)
    }

    /// Marks the regions of `blocks` dirty on disk (if not already) and
    /// holds them as written-to until the guard drops.
    async fn mark_dirty(&self, blocks: Range<u64>) -> Result<RegionGuard<'_>> {
        let regions = self.geo.region_of_block(blocks.start)..self.geo.region_of_block(blocks.end - 1) + 1;
        let range = || regions.start as usize..regions.end as usize;
        loop {
            {
                let mut r = self.regions.lock().unwrap();
                if r.durable[range()].iter().all(|&d| d) {
                    let now = r.interval;
                    for i in range() {
                        r.inflight[i] += 1;
                        r.last_touch[i] = now;
                    }
                    return Ok(RegionGuard { ext: self, regions: regions.clone() });
                }
                r.want[range()].fill(true);
            }
            let mut meta = self.meta.lock().await;
            self.settle(&mut meta).await;
            let bits = {
                let r = self.regions.lock().unwrap();
                if r.durable[range()].iter().all(|&d| d) {
                    continue; // another writer's header write covered us
                }
                r.want.clone()
            };
            self.write_header(&mut meta, bits.clone()).await?;
            self.sync().await?;
            meta.durable_slot = meta.pending_slot.take().expect("just written");
            let mut r = self.regions.lock().unwrap();
            for (d, b) in r.durable.iter_mut().zip(&bits) {
                *d |= *b;
            }
        }
    }

    /// A whole-extent copy to this replica has begun and not completed
    /// durably (the header's INCOMPLETE flag).
    pub fn is_incomplete(&self) -> bool {
        self.incomplete.load(Ordering::Acquire)
    }

    /// Clears the INCOMPLETE mark, durably before it returns. Call it only
    /// once every write of the copy is durable (after a flush). The mark is
    /// set only by [`Extent::create`]: nothing turns a complete replica
    /// back into an incomplete one. Dropped midway, the header on disk may
    /// carry either value (both are safe, the data being durable); this
    /// replica reports itself incomplete until a call succeeds.
    pub async fn complete(&self) -> Result<()> {
        if !self.is_incomplete() {
            return Ok(());
        }
        let mut meta = self.meta.lock().await;
        self.settle(&mut meta).await;
        meta.incomplete = false;
        let bits = self.regions.lock().unwrap().want.clone();
        self.write_header(&mut meta, bits.clone()).await?;
        self.sync().await?;
        meta.durable_slot = meta.pending_slot.take().expect("just written");
        let mut r = self.regions.lock().unwrap();
        for (d, b) in r.durable.iter_mut().zip(&bits) {
            *d |= *b;
        }
        drop(r);
        self.incomplete.store(false, Ordering::Release);
        tracing::info!(extent = %self.key, "a whole-extent copy to this replica completed");
        Ok(())
    }

    /// Writes a header with `dirty` into the slot not known durable.
    async fn write_header(&self, meta: &mut Meta, dirty: Vec<bool>) -> Result<()> {
        let flush_counter = meta.flush_counter;
        let op = self.header_op(meta, dirty, flush_counter);
        self.meta_io(meta, vec![("write header of", op)]).await
    }

    /// The write of the next header (generation bumped) into the slot not
    /// known durable; until a sync after it, that slot may hold anything.
    fn header_op(&self, meta: &mut Meta, dirty: Vec<bool>, flush_counter: u64) -> Op {
        let slot = 1 - meta.durable_slot;
        meta.generation += 1;
        let h = Header {
            generation: meta.generation,
            key: self.key,
            epoch: meta.epoch,
            flush_counter,
            geometry: self.geo,
            dirty,
            incomplete: meta.incomplete,
        };
        let mut buf = AlignedBuf::zeroed(HEADER_SIZE);
        h.encode(buf.as_mut_slice());
        meta.pending_slot = Some(slot);
        Op::Write { file: self.file.clone(), offset: Geometry::header_pos(slot), buf: buf.into() }
    }

    /// Clears the dirty bits of regions with no write in flight for which
    /// `idle(region, last_touch)` holds; the bits the next header should carry.
    fn clear_idle(&self, idle: impl Fn(usize, u64) -> bool) -> Vec<bool> {
        let mut r = self.regions.lock().unwrap();
        for i in 0..r.want.len() {
            if r.want[i] && r.inflight[i] == 0 && idle(i, r.last_touch[i]) {
                r.want[i] = false;
                r.durable[i] = false;
            }
        }
        r.want.clone()
    }

    /// The table pages holding the entries of `region`.
    fn region_pages(&self, region: usize) -> Range<u64> {
        let b = self.geo.region_blocks(region as u64);
        b.start / ENTRIES_PER_PAGE..(b.end - 1) / ENTRIES_PER_PAGE + 1
    }

    /// What a flush ending interval `ended` writes before its fdatasync: the
    /// table pages (every dirty page, and the lazy pages of regions idle for
    /// half the hysteresis, or all of them at `clear_all`), and the dirty
    /// bits of its header. A region is marked clean only if it has been
    /// idle for the whole hysteresis, an earlier successful flush synced the
    /// table entries of its last write (`synced`), and none of its table
    /// pages is written by this flush or still lazy: the order of writes
    /// inside one fdatasync is not guaranteed, so a region must never be
    /// marked clean by the sync that makes its table page durable.
    fn flush_plan(
        &self,
        ended: u64,
        synced: u64,
        clean_after: u64,
        clear_all: bool,
    ) -> (Vec<u64>, Vec<bool>) {
        let half = (clean_after / 2).max(1);
        let per_region = self.geo.blocks_per_region();
        let regions_of = |page: u64| {
            let first = page * ENTRIES_PER_PAGE;
            let last = ((page + 1) * ENTRIES_PER_PAGE).min(self.geo.nblocks) - 1;
            first / per_region..last / per_region + 1
        };
        let mut t = self.table.lock().unwrap();
        t.unsynced = false;
        let mut pages = std::mem::take(&mut t.dirty_pages);
        {
            let r = self.regions.lock().unwrap();
            let settled = |i: u64| {
                r.inflight[i as usize] == 0 && r.last_touch[i as usize].saturating_add(half) <= ended
            };
            let lazy = std::mem::take(&mut t.lazy_pages);
            for p in lazy {
                if clear_all || regions_of(p).any(settled) {
                    pages.insert(p);
                } else {
                    t.lazy_pages.insert(p);
                }
            }
        }
        let pending = |region: usize| {
            self.region_pages(region).any(|p| pages.contains(&p) || t.lazy_pages.contains(&p))
        };
        let bits = self.clear_idle(|i, touch| {
            touch <= synced && touch.saturating_add(clean_after) <= ended && !pending(i)
        });
        (pages.into_iter().collect(), bits)
    }

    /// Reads `len` bytes at `offset`. Never-written ranges come back as holes.
    pub async fn read(&self, offset: u64, len: u32) -> Result<Vec<ReadChunk>> {
        self.check(offset, len as u64)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let blocks = offset / BLOCK..(offset + len as u64).div_ceil(BLOCK);
        let _lock = self.locks.lock(blocks, false).await;
        self.read_locked(offset, len).await
    }

    /// [`Extent::read`] of a checked, non-empty range whose blocks the
    /// caller holds locked (shared or exclusive).
    async fn read_locked(&self, offset: u64, len: u32) -> Result<Vec<ReadChunk>> {
        let end = offset + len as u64;
        let blocks = offset / BLOCK..end.div_ceil(BLOCK);
        let entries: Vec<Entry> =
            self.table.lock().unwrap().entries[blocks.start as usize..blocks.end as usize].to_vec();
        if let Some(i) = entries.iter().position(Entry::is_lost) {
            // Logged once, when the table rot was found at open.
            return Err(StoreError::Checksum { key: self.key, block: blocks.start + i as u64 });
        }
        let mut runs: Vec<Run> = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            let b = blocks.start + i as u64;
            match runs.last_mut() {
                Some(r) if r.data == e.has_data() => r.blocks.end = b + 1,
                _ => runs.push(Run { blocks: b..b + 1, data: e.has_data() }),
            }
        }
        let rel = |r: &Range<u64>| (r.start - blocks.start) as usize..(r.end - blocks.start) as usize;
        let bufs = if let [r] = &runs[..] {
            // The common small read: no join machinery.
            if r.data { vec![self.read_verified(r.blocks.clone(), &entries).await?] } else { Vec::new() }
        } else {
            futures::future::try_join_all(
                runs.iter()
                    .filter(|r| r.data)
                    .map(|r| self.read_verified(r.blocks.clone(), &entries[rel(&r.blocks)])),
            )
            .await?
        };
        let mut bufs = bufs.into_iter();
        let mut out = Vec::with_capacity(runs.len());
        for r in &runs {
            let start = (r.blocks.start * BLOCK).max(offset);
            let stop = (r.blocks.end * BLOCK).min(end);
            if r.data {
                let buf = bufs.next().expect("one buffer per data run");
                let base = r.blocks.start * BLOCK;
                let bytes = Bytes::from_owner(buf);
                out.push(ReadChunk::Data(bytes.slice((start - base) as usize..(stop - base) as usize)));
            } else {
                out.push(ReadChunk::Hole((stop - start) as u32));
            }
        }
        Ok(out)
    }

    /// Writes `data` at `offset`; with `fua` it is durable before this returns.
    pub async fn write(self: &Arc<Self>, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        self.check(offset, data.len() as u64)?;
        self.write_checked(offset, data, fua).await
    }

    /// [`Extent::write`] at any byte offset and length (for NBD clients
    /// held to no block size). The partial blocks at its ends are read,
    /// patched and written back under the one exclusive range lock that
    /// also covers its whole blocks, so no other write, zeroing, trim or
    /// COMPARE AND WRITE of those blocks, from any connection or frontend,
    /// comes between the read and the write; once its disk write is
    /// submitted it runs to its end, so a dropped caller leaves every block
    /// old or new.
    pub async fn write_unaligned(self: &Arc<Self>, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        self.check_at(offset, data.len() as u64, 1)?;
        self.write_checked(offset, data, fua).await
    }

    async fn write_checked(self: &Arc<Self>, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        if !data.is_empty() {
            self.write_range(offset, data).await?;
        }
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    /// Writes whole or partial blocks; partial ones are read-modify-write.
    /// Block-aligned data that already lies in aligned memory (a frontend's
    /// large payload) goes to disk as it is, without a copy.
    async fn write_range(self: &Arc<Self>, offset: u64, data: Bytes) -> Result<()> {
        let end = offset + data.len() as u64;
        let hold = self.hold(offset / BLOCK..end.div_ceil(BLOCK)).await?;
        let ext = self.clone();
        RunToEnd::new(async move { ext.write_held(&hold, offset, data).await }).await
    }

    /// COMPARE AND WRITE: if `[offset, offset+compare.len())` holds
    /// `compare`, writes `data` (as long) there. The read, the compare and
    /// the write happen under one exclusive lock of the range, so no other
    /// write, trim or zeroing of those blocks comes between them. On a
    /// miscompare nothing is written and the offset (from `offset`) of the
    /// first byte that differs is returned.
    pub async fn compare_and_write(
        self: &Arc<Self>,
        offset: u64,
        compare: Bytes,
        data: Bytes,
        fua: bool,
    ) -> Result<Option<u64>> {
        assert_eq!(compare.len(), data.len(), "the caller checks the two halves");
        self.check(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(None);
        }
        let hold = self.hold_range(offset, data.len() as u64).await?;
        let ext = self.clone();
        let miscompare = RunToEnd::new(async move {
            let current = flatten_chunks(&ext.read_held(&hold, offset, compare.len() as u32).await?);
            if let Some(at) = current.iter().zip(compare.iter()).position(|(a, b)| a != b) {
                return Ok(Some(at as u64));
            }
            ext.write_held(&hold, offset, data).await.map(|()| None)
        })
        .await?;
        if fua && miscompare.is_none() {
            self.flush().await?;
        }
        Ok(miscompare)
    }

    /// Reads `[offset, offset+len)` (`len > 0`) under `hold`.
    pub(crate) async fn read_held(&self, hold: &WriteHold, offset: u64, len: u32) -> Result<Vec<ReadChunk>> {
        assert!(std::ptr::eq(&*hold.ext, self) && hold.covers(offset, len as u64), "read outside its hold");
        self.read_locked(offset, len).await
    }

    /// Writes `data` (non-empty) at `offset` under `hold`: the write and
    /// its table update, or after a failure the crcs of what the disk holds.
    /// Once it has begun it must not be dropped (callers run it in a
    /// [`RunToEnd`] that owns `hold`).
    pub(crate) async fn write_held(&self, hold: &WriteHold, offset: u64, data: Bytes) -> Result<()> {
        assert!(
            std::ptr::eq(&*hold.ext, self) && hold.covers(offset, data.len() as u64),
            "write outside its hold"
        );
        let end = offset + data.len() as u64;
        let blocks = offset / BLOCK..end.div_ceil(BLOCK);
        let buf = if offset.is_multiple_of(BLOCK) && end.is_multiple_of(BLOCK) {
            WriteData::shared(data).unwrap_or_else(|d| AlignedBuf::from_slice(&d).into())
        } else {
            self.read_modify(offset, blocks.clone(), &data).await?.into()
        };
        let crcs: Vec<u32> = buf.as_slice().chunks(BLOCK as usize).map(format::block_crc).collect();
        let op = Op::Write { file: self.file.clone(), offset: self.geo.data_pos(blocks.start), buf };
        if let Err(e) = self.io("write", op).await {
            self.resync_crcs(blocks).await;
            return Err(e);
        }
        let mut t = self.table.lock().unwrap();
        for (i, crc) in crcs.into_iter().enumerate() {
            let b = blocks.start + i as u64;
            let had_data = t.entries[b as usize].has_data();
            t.entries[b as usize] = Entry::data(crc);
            t.touched(b, had_data);
        }
        Ok(())
    }

    /// The whole blocks `blocks` with `data` laid over them at `offset`: the
    /// partial first and last blocks keep their old bytes around it (zeros
    /// for holes). The caller holds the blocks' write lock.
    async fn read_modify(&self, offset: u64, blocks: Range<u64>, data: &[u8]) -> Result<AlignedBuf> {
        let end = offset + data.len() as u64;
        let mut buf = AlignedBuf::for_overwrite(((blocks.end - blocks.start) * BLOCK) as usize);
        let mut partial = Vec::with_capacity(2);
        if !offset.is_multiple_of(BLOCK) {
            partial.push(blocks.start);
        }
        if !end.is_multiple_of(BLOCK) && partial.last() != Some(&(blocks.end - 1)) {
            partial.push(blocks.end - 1);
        }
        for b in partial {
            let at = ((b - blocks.start) * BLOCK) as usize;
            let e = self.table.lock().unwrap().entries[b as usize];
            let old = &mut buf.as_mut_slice()[at..at + BLOCK as usize];
            if e.is_lost() {
                return Err(StoreError::Checksum { key: self.key, block: b });
            } else if e.has_data() {
                old.copy_from_slice(self.read_verified(b..b + 1, &[e]).await?.as_slice());
            } else {
                old.fill(0);
            }
        }
        let at = (offset - blocks.start * BLOCK) as usize;
        buf.as_mut_slice()[at..at + data.len()].copy_from_slice(data);
        Ok(buf)
    }

    /// After a failed (possibly partial, e.g. ENOSPC) write, blocks that held
    /// data may hold old or new bytes: take their crc from what is there, as
    /// recovery would, so they read back instead of failing their checksum.
    /// The caller holds the range lock and the regions are marked dirty.
    async fn resync_crcs(&self, blocks: Range<u64>) {
        for b in blocks {
            let e = self.table.lock().unwrap().entries[b as usize];
            if !e.has_data() {
                continue;
            }
            match self.read_data(b..b + 1).await {
                Ok(buf) => {
                    let crc = format::block_crc(&buf);
                    if crc != e.crc {
                        let mut t = self.table.lock().unwrap();
                        t.entries[b as usize] = Entry::data(crc);
                        t.touched(b, false);
                    }
                }
                Err(err) => {
                    tracing::warn!(extent = %self.key, block = b, error = %err, "cannot re-read block after a failed write")
                }
            }
        }
    }

    /// Makes `[offset, offset+len)` read as zeros. With `deallocate` whole
    /// blocks become holes (punched); without, they stay allocated and are
    /// reported as allocated zeros. Partial blocks are written with zeros.
    pub async fn write_zeroes(
        self: &Arc<Self>,
        offset: u64,
        len: u64,
        deallocate: bool,
        fua: bool,
    ) -> Result<()> {
        self.check(offset, len)?;
        let end = offset + len;
        let whole = offset.div_ceil(BLOCK)..end / BLOCK;
        if whole.start >= whole.end {
            if len > 0 {
                self.write_range(offset, Bytes::from(vec![0u8; len as usize])).await?;
            }
        } else {
            let head = whole.start * BLOCK - offset;
            if head > 0 {
                self.write_range(offset, Bytes::from(vec![0u8; head as usize])).await?;
            }
            let tail = end - whole.end * BLOCK;
            if tail > 0 {
                self.write_range(whole.end * BLOCK, Bytes::from(vec![0u8; tail as usize])).await?;
            }
            self.zero_blocks(whole, deallocate).await?;
        }
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    /// TRIM: the range reads as zeros afterwards (this store deallocates it).
    pub async fn trim(self: &Arc<Self>, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.write_zeroes(offset, len, true, fua).await
    }

    async fn zero_blocks(self: &Arc<Self>, blocks: Range<u64>, deallocate: bool) -> Result<()> {
        let target = if deallocate { Entry::HOLE } else { Entry::ZEROED };
        let span = blocks.start as usize..blocks.end as usize;
        if self.table.lock().unwrap().entries[span.clone()].iter().all(|e| *e == target) {
            return Ok(()); // nothing to change, nothing to mark dirty
        }
        let hold = self.hold(blocks.clone()).await?;
        let ext = self.clone();
        RunToEnd::new(async move {
            let _hold = hold;
            ext.zero_held(blocks, target, deallocate).await
        })
        .await
    }

    /// The body of `zero_blocks` under its hold: like `write_held`, it
    /// must run to its end once begun.
    async fn zero_held(&self, blocks: Range<u64>, target: Entry, deallocate: bool) -> Result<()> {
        if let Err(e) = self.clear_data(blocks.clone(), deallocate).await {
            // Part of the range may be zeros already (a punch or a
            // write of zeros that stopped half way): what each block
            // holds now must match its crc.
            self.resync_crcs(blocks).await;
            return Err(e);
        }
        let mut t = self.table.lock().unwrap();
        for b in blocks {
            if t.entries[b as usize] != target {
                t.entries[b as usize] = target;
                t.touched(b, false);
            }
        }
        Ok(())
    }

    /// Makes the data area of `blocks` read as zeros: punched out with
    /// `deallocate`, else zeroed in place (still allocated).
    async fn clear_data(&self, blocks: Range<u64>, deallocate: bool) -> Result<()> {
        let mode = if deallocate { FallocMode::PunchHole } else { FallocMode::ZeroRange };
        let (pos, len) = (self.geo.data_pos(blocks.start), (blocks.end - blocks.start) * BLOCK);
        let op = Op::Fallocate { file: self.file.clone(), mode, offset: pos, len };
        match self.io("deallocate", op).await {
            Ok(_) => Ok(()),
            // Filesystems without punch/zero-range: write zeros instead.
            Err(StoreError::Io { source, .. }) if source.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                let mut at = 0;
                while at < len {
                    let n = (len - at).min(1 << 20);
                    let op = Op::Write {
                        file: self.file.clone(),
                        offset: pos + at,
                        buf: AlignedBuf::zeroed(n as usize).into(),
                    };
                    self.io("write zeros", op).await?;
                    at += n;
                }
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Durability barrier: every write completed before the call is on
    /// stable storage after it, table entries included.
    pub async fn flush(&self) -> Result<()> {
        self.flush_inner(false).await
    }

    /// A flush that also clears every idle region's dirty bit and makes the
    /// header durable, so the next open verifies nothing. Used at shutdown.
    pub async fn close(&self) -> Result<()> {
        self.flush_inner(true).await
    }

    async fn flush_inner(&self, clear_all: bool) -> Result<()> {
        let Some(prepared) = self.lock_for_flush().await?.prepare(clear_all).await? else {
            return Ok(());
        };
        let synced = self.sync().await;
        let ok = synced.is_ok();
        let mut meta = prepared.complete(ok);
        synced?;
        if clear_all {
            // Shutdown: every idle region, now that its pages are synced.
            // Made durable here, still under `meta`, so that no other
            // header write can come between this one and its sync.
            let ended = meta.synced_interval;
            let bits = {
                let t = self.table.lock().unwrap();
                self.clear_idle(|i, touch| {
                    touch <= ended
                        && !self
                            .region_pages(i)
                            .any(|p| t.dirty_pages.contains(&p) || t.lazy_pages.contains(&p))
                })
            };
            self.write_header(&mut meta, bits).await?;
            self.sync().await?;
            meta.durable_slot = meta.pending_slot.take().expect("just written");
        }
        Ok(())
    }

    /// The first step of a flush: takes the flush lock (`meta`), noting
    /// first which execution would cover a flush called now (group commit).
    /// A caller flushing several extents at once takes their locks in key
    /// order, so two such callers cannot deadlock.
    pub(crate) async fn lock_for_flush(&self) -> Result<FlushLock<'_>> {
        if self.closed.load(Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        // Group commit: callers that queue up behind a running flush share
        // the next one instead of each running their own.
        let need = self.flushes_started.load(Ordering::SeqCst) + 1;
        let mut meta = self.meta.lock().await;
        self.settle(&mut meta).await;
        Ok(FlushLock { ext: self, need, meta })
    }

    /// The file a flush barrier must sync.
    pub(crate) fn file(&self) -> &FileRef {
        &self.file
    }

    /// A flush that did not reach its barrier: its pages go back to the
    /// next flush (their entries are still in memory, and the header slot
    /// it wrote was never trusted).
    fn restore_pages(&self, pages: Vec<u64>) {
        let mut t = self.table.lock().unwrap();
        t.dirty_pages.extend(pages);
        t.unsynced = true;
    }

    /// True if this extent does its I/O through `engine` (lives on its disk).
    pub(crate) fn is_on(&self, engine: &Arc<dyn Engine>) -> bool {
        std::ptr::addr_eq(Arc::as_ptr(&self.engine), Arc::as_ptr(engine))
    }

    /// Sets the region hysteresis (flush intervals without a write before a
    /// region's dirty bit clears); at least 1.
    pub fn set_clean_after(&self, flushes: u64) {
        self.clean_after.store(flushes.max(1), Ordering::Relaxed);
    }

    /// Bytes per dirty region (the activity log's unit; see the module docs).
    pub fn region_size(&self) -> u32 {
        self.geo.region_size
    }

    /// Indexes of the regions whose dirty bit is set in every header a
    /// crash could leave as the current one: every region that may hold a
    /// write no flush covered is among them (a write starts only once its
    /// region's bit is durable, and a bit clears only after a flush synced
    /// the region's last write). Reconciliation copies these regions.
    pub fn dirty_regions(&self) -> Vec<u64> {
        let r = self.regions.lock().unwrap();
        r.durable.iter().enumerate().filter(|(_, d)| **d).map(|(i, _)| i as u64).collect()
    }

    /// Whether any region is dirty (see [`Extent::dirty_regions`]).
    pub fn is_dirty(&self) -> bool {
        self.regions.lock().unwrap().durable.iter().any(|d| *d)
    }

    /// The stored crc32c of every 4 KiB block of `[offset, offset+len)`
    /// (both multiples of 4 KiB), from the block table without reading the
    /// data. A block without data (a hole, zeroed or trimmed) reports the
    /// crc32c of a block of zeros, as a block written with zeros does; a
    /// block whose table entry was lost to rot is a checksum error.
    pub fn block_crcs(&self, offset: u64, len: u64) -> Result<Vec<u32>> {
        self.check(offset, len)?;
        if !offset.is_multiple_of(BLOCK) || !len.is_multiple_of(BLOCK) {
            return Err(StoreError::Misaligned { offset, len });
        }
        let blocks = offset / BLOCK..(offset + len) / BLOCK;
        let t = self.table.lock().unwrap();
        let zero = zero_block_crc();
        let mut out = Vec::with_capacity((blocks.end - blocks.start) as usize);
        for b in blocks {
            let e = t.entries[b as usize];
            if e.is_lost() {
                return Err(StoreError::Checksum { key: self.key, block: b });
            }
            out.push(if e.has_data() { e.crc } else { zero });
        }
        Ok(out)
    }

    /// Allocation map of `[offset, offset+len)`, in order, covering the range.
    pub fn map(&self, offset: u64, len: u64) -> Result<Vec<MapExtent>> {
        self.check(offset, len)?;
        let end = offset + len;
        let t = self.table.lock().unwrap();
        let mut out: Vec<MapExtent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let b = pos / BLOCK;
            let stop = ((b + 1) * BLOCK).min(end);
            let e = t.entries[b as usize];
            // A lost block is data: a copy must read it (and fail), not skip it.
            let state = if e.has_data() || e.is_lost() {
                BlockState::DATA
            } else if e.is_zeroed() {
                BlockState { allocated: true, zero: true }
            } else {
                BlockState::HOLE
            };
            match out.last_mut() {
                Some(m) if m.state == state => m.len += stop - pos,
                _ => out.push(MapExtent { len: stop - pos, state }),
            }
            pos = stop;
        }
        Ok(out)
    }
}

/// An extent's flush lock, taken by [`Extent::lock_for_flush`].
pub(crate) struct FlushLock<'a> {
    ext: &'a Extent,
    need: u64,
    meta: tokio::sync::MutexGuard<'a, Meta>,
}

impl<'a> FlushLock<'a> {
    /// Writes the dirty table pages and a new header side by side: all a
    /// flush writes before its barrier (the fdatasync, or the store's
    /// filesystem-wide sync that covers several extents at once). `None`
    /// when there is nothing to make durable: a flush that started after
    /// the lock was asked for already covered the caller, or no write
    /// completed since the last one.
    pub(crate) async fn prepare(self, clear_all: bool) -> Result<Option<PreparedFlush<'a>>> {
        let FlushLock { ext, need, mut meta } = self;
        if !clear_all && meta.flushed_ok >= need {
            return Ok(None);
        }
        // Nothing completed since the last flush: every completed write
        // updates the table, so an empty set of dirty pages means there is
        // nothing new to make durable. (A flush that wrote its header but
        // failed or was dropped before its barrier sets `unsynced` again
        // when it puts its pages back, so the next one runs.)
        // Volume::flush reaches every open extent, so this keeps a FLUSH
        // from costing one fdatasync per untouched extent.
        if !clear_all && !ext.table.lock().unwrap().unsynced {
            return Ok(None);
        }
        let this = ext.flushes_started.fetch_add(1, Ordering::SeqCst) + 1;
        let ended = {
            let mut r = ext.regions.lock().unwrap();
            r.interval += 1;
            r.interval - 1
        };
        let clean_after = ext.clean_after.load(Ordering::Relaxed).max(1);
        let (pages, bits) = ext.flush_plan(ended, meta.synced_interval, clean_after, clear_all);
        // The header goes out with the table pages and becomes durable at the
        // same barrier, carrying this flush's number (see `flush_plan` for
        // which regions it may mark clean).
        let next = meta.flush_counter + 1;
        let header = ext.header_op(&mut meta, bits, next);
        // From here on, dropping the flush (an error below, or a caller
        // that goes away) puts the pages back for the next one.
        let mut prepared = PreparedFlush { ext, meta: Some(meta), this, ended, pages };
        let pages = prepared.pages.iter().map(|&p| {
            let mut buf = AlignedBuf::zeroed(BLOCK as usize);
            format::encode_table_page(&ext.table.lock().unwrap().entries, p, buf.as_mut_slice());
            let op = Op::Write { file: ext.file.clone(), offset: ext.geo.table_page_pos(p), buf: buf.into() };
            ("write table of", op)
        });
        let ops: Vec<_> = pages.chain([("write header of", header)]).collect();
        ext.meta_io(prepared.meta.as_mut().expect("held until finished"), ops).await?;
        Ok(Some(prepared))
    }
}

/// A flush whose table pages and header are written and which waits for
/// its barrier: the sync that makes them, and every write that completed
/// before the flush began, durable. [`PreparedFlush::finish`] records the
/// barrier's outcome; dropped unfinished, it puts its table pages back.
pub(crate) struct PreparedFlush<'a> {
    ext: &'a Extent,
    /// `None` once finished.
    meta: Option<tokio::sync::MutexGuard<'a, Meta>>,
    this: u64,
    ended: u64,
    pages: Vec<u64>,
}

impl<'a> PreparedFlush<'a> {
    pub(crate) fn extent(&self) -> &'a Extent {
        self.ext
    }

    /// Records the barrier's outcome: `synced` if it succeeded.
    pub(crate) fn finish(self, synced: bool) {
        drop(self.complete(synced));
    }

    fn complete(mut self, synced: bool) -> tokio::sync::MutexGuard<'a, Meta> {
        let mut meta = self.meta.take().expect("finished once");
        let pages = std::mem::take(&mut self.pages);
        if synced {
            meta.durable_slot = meta.pending_slot.take().expect("written by prepare");
            meta.flush_counter += 1;
            meta.flushed_ok = self.this;
            meta.synced_interval = self.ended;
        } else {
            self.ext.restore_pages(pages);
        }
        meta
    }
}

impl Drop for PreparedFlush<'_> {
    fn drop(&mut self) {
        if self.meta.is_some() {
            self.ext.restore_pages(std::mem::take(&mut self.pages));
        }
    }
}

/// The crc32c of a block of zeros (what a block without data reads as).
pub(crate) fn zero_block_crc() -> u32 {
    static ZERO: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *ZERO.get_or_init(|| format::block_crc(&[0; BLOCK as usize]))
}

/// Reads raw bytes at a 4 KiB-aligned position, before an `Extent` exists.
async fn read_raw(engine: &dyn Engine, file: &FileRef, offset: u64, len: usize) -> io::Result<AlignedBuf> {
    let c =
        engine::run(engine, Op::Read { file: file.clone(), offset, buf: AlignedBuf::zeroed(len) }, 0).await;
    c.result?;
    Ok(c.buf.expect("reads hand back their buffer"))
}
