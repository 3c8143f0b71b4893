//! Import a raw image into a volume and export a volume to a raw image,
//! over NBD, sparse both ways, with several requests in flight.
//!
//! Import walks the file with `SEEK_DATA`/`SEEK_HOLE` and reads only its
//! data; 4 KiB blocks of zeros inside the data count as holes. Data goes
//! out as WRITEs; holes become WRITE_ZEROES (the server deallocates them)
//! except where `BLOCK_STATUS` says the volume already reads as zeros
//! there (a fresh volume costs nothing). The volume past the end of the
//! image is zeroed the same way, so afterwards it reads as the image. A
//! FLUSH ends it.
//!
//! Export asks `BLOCK_STATUS` where the volume holds data, READs only
//! that, and writes only the non-zero blocks at their offsets in a file
//! whose length is set to the volume's: holes in the volume stay holes in
//! the file.
//!
//! Owns: the walk over file and volume, the bounded set of requests in
//! flight (`depth` of at most `chunk` bytes each, so memory is bounded),
//! and the account of how far a transfer got ([`Position`]). Must never:
//! report as done an offset whose request has not been acknowledged, or
//! write anything to the volume before the checks that refuse an import
//! (size, read-only) have passed.

use super::codec::Extent;
use super::nbd::{NbdClient, NbdError};
use super::progress::Progress;
use bytes::Bytes;
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Granularity of zero detection in data: a block of zeros is not sent.
pub const ZERO_BLOCK: u64 = 4096;
/// Bytes asked about per BLOCK_STATUS request (keeps each reply small:
/// at most one descriptor per minimum block).
const STATUS_WINDOW: u64 = 128 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Import,
    Export,
}

impl std::fmt::Display for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Direction::Import => "import",
            Direction::Export => "export",
        })
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    /// Requests in flight at once.
    pub depth: usize,
    /// Largest READ or WRITE, in bytes (capped by the server's maximum).
    pub chunk: u32,
}

impl Default for Options {
    fn default() -> Self {
        Options { depth: 8, chunk: 1 << 20 }
    }
}

/// One transfer to run.
#[derive(Debug, Clone)]
pub struct Job {
    pub direction: Direction,
    /// NBD server, host:port.
    pub addr: String,
    pub volume: String,
    pub file: PathBuf,
    pub options: Options,
    /// Draw a progress bar if the terminal allows it.
    pub progress: bool,
}

/// What a finished transfer did (the CLI's `--json` output).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub direction: Direction,
    pub volume: String,
    pub file: PathBuf,
    /// Bytes of the volume covered (its size).
    pub bytes: u64,
    /// Length of the file (import: the image; export: set to `bytes`).
    pub file_bytes: u64,
    /// Bytes carried as data (import: WRITE; export: written to the file).
    pub data_bytes: u64,
    /// `bytes - data_bytes`: holes, and blocks of zeros found in data.
    pub hole_bytes: u64,
    /// Runs of zeros not carried as data (import: file holes and zero
    /// blocks; export: the volume's zero extents).
    pub holes: u64,
    /// Import: bytes sent as WRITE_ZEROES (holes where the volume did not
    /// already read as zeros). Export: 0.
    pub zeroed_bytes: u64,
    pub seconds: f64,
}

/// One line for people: what moved, how fast.
impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use indicatif::BinaryBytes;
        let rate = BinaryBytes((self.bytes as f64 / self.seconds.max(1e-6)) as u64);
        let (verb, prep) = match self.direction {
            Direction::Import => ("imported", "into"),
            Direction::Export => ("exported", "from"),
        };
        write!(
            f,
            "{verb} {} {prep} volume {:?}: {}, {} data, {} in {} holes ({} zeroed), {:.2} s, {rate}/s",
            self.file.display(),
            self.volume,
            BinaryBytes(self.bytes),
            BinaryBytes(self.data_bytes),
            BinaryBytes(self.hole_bytes),
            self.holes,
            BinaryBytes(self.zeroed_bytes),
            self.seconds,
        )
    }
}

/// How far a transfer got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Position {
    /// Bytes acknowledged (or found already zero).
    pub done: u64,
    pub total: u64,
    /// Every byte below this offset is done; this one may not be.
    pub first_unwritten: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error(transparent)]
    Nbd(#[from] NbdError),
    #[error("cannot open {}", .path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a regular file", .0.display())]
    NotAFile(PathBuf),
    #[error("reading {} at offset {offset}", .path.display())]
    Read {
        path: PathBuf,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {} at offset {offset}", .path.display())]
    Write {
        path: PathBuf,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{} is {file} bytes, larger than volume {volume:?} ({size} bytes); grow the volume or pick a larger one",
        .path.display()
    )]
    TooLarge { path: PathBuf, file: u64, volume: String, size: u64 },
    #[error("volume {0:?} is read-only")]
    ReadOnly(String),
    #[error("the server's block size ({0} bytes) does not divide {ZERO_BLOCK}")]
    BlockSize(u32),
    #[error("interrupted")]
    Interrupted,
}

type Result<T, E = TransferError> = std::result::Result<T, E>;

/// A transfer that did not complete, with how far it got.
#[derive(Debug, thiserror::Error)]
#[error("{direction} of {} {} volume {volume:?} failed", .file.display(), if *.direction == Direction::Import { "into" } else { "from" })]
pub struct Failure {
    pub direction: Direction,
    pub volume: String,
    pub file: PathBuf,
    /// `None` if it failed before anything was written.
    pub position: Option<Position>,
    /// Whether what was written was flushed after the interruption.
    pub flushed: bool,
    #[source]
    pub cause: TransferError,
}

impl Failure {
    /// A sentence saying how far the transfer got, if it started.
    pub fn how_far(&self) -> Option<String> {
        let p = self.position?;
        Some(match self.direction {
            Direction::Import => format!(
                "imported {} of {} bytes; first offset not written: {} ({}); run the import again to complete it",
                p.done,
                p.total,
                p.first_unwritten,
                if self.flushed {
                    "everything before it is on the volume, flushed"
                } else {
                    // The server acknowledged it, but a crash of the server
                    // may take back what was not flushed (read as the old data).
                    "everything before it was acknowledged but not flushed: a crash of the server may have lost it"
                }
            ),
            Direction::Export => format!(
                "exported {} of {} bytes; first offset not written: {}; {} is incomplete",
                p.done,
                p.total,
                p.first_unwritten,
                self.file.display()
            ),
        })
    }
}

/// Counts progress and knows the lowest offset not yet done.
#[derive(Debug)]
struct Tracker {
    inner: Mutex<Track>,
    progress: Progress,
}

#[derive(Debug, Default)]
struct Track {
    total: u64,
    done: u64,
    /// Everything below this has been issued (or skipped).
    planned: u64,
    /// Start -> length of every request issued and not yet acknowledged.
    inflight: BTreeMap<u64, u64>,
}

impl Tracker {
    fn new(total: u64, progress: Progress) -> Tracker {
        Tracker { inner: Mutex::new(Track { total, ..Default::default() }), progress }
    }

    fn begin(&self, offset: u64, len: u64) {
        let mut t = self.inner.lock().unwrap();
        t.inflight.insert(offset, len);
        t.planned = t.planned.max(offset + len);
    }

    fn end(&self, offset: u64) {
        let mut t = self.inner.lock().unwrap();
        if let Some(len) = t.inflight.remove(&offset) {
            t.done += len;
            self.progress.advance(len);
        }
    }

    /// `[offset, offset+len)` needs nothing (already zero).
    fn skip(&self, offset: u64, len: u64) {
        let mut t = self.inner.lock().unwrap();
        t.done += len;
        t.planned = t.planned.max(offset + len);
        self.progress.advance(len);
    }

    fn position(&self) -> Position {
        let t = self.inner.lock().unwrap();
        let first = t.inflight.keys().next().copied().unwrap_or(t.planned).min(t.planned);
        Position { done: t.done, total: t.total, first_unwritten: first }
    }
}

/// Splits `buf` (starting at a multiple of [`ZERO_BLOCK`]) into runs of
/// data and of zero blocks: `(start, end, is_data)`, in order.
pub fn runs(buf: &[u8]) -> Vec<(usize, usize, bool)> {
    let mut out: Vec<(usize, usize, bool)> = Vec::new();
    for (i, block) in buf.chunks(ZERO_BLOCK as usize).enumerate() {
        let data = !is_zero(block);
        let (s, e) = (i * ZERO_BLOCK as usize, i * ZERO_BLOCK as usize + block.len());
        match out.last_mut() {
            Some(last) if last.2 == data => last.1 = e,
            _ => out.push((s, e, data)),
        }
    }
    out
}

fn is_zero(b: &[u8]) -> bool {
    let mut words = b.chunks_exact(16);
    words.all(|c| u128::from_ne_bytes(c.try_into().unwrap()) == 0)
        && words.remainder().iter().all(|&x| x == 0)
}

/// `lseek(2)` with `SEEK_DATA` or `SEEK_HOLE` from `pos`: `None` for
/// ENXIO (no data after `pos`). Where the file system cannot tell, all of
/// the file is data: data at `pos`, a hole only at the end (`u64::MAX`).
fn seek(file: &File, pos: u64, whence: i32) -> std::io::Result<Option<u64>> {
    let off = i64::try_from(pos).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: lseek(2) on a descriptor `file` owns; no memory is passed.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENXIO) => Ok(None),
        // No SEEK_DATA here: all of it counts as data.
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => {
            Ok(Some(if whence == libc::SEEK_DATA { pos } else { u64::MAX }))
        }
        _ => Err(e),
    }
}

fn align_down(x: u64, a: u64) -> u64 {
    x / a * a
}

fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// Reads `len` bytes at `offset`; past the end of the file, zeros.
fn read_full(file: &File, path: &Path, offset: u64, len: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut got = 0;
    while got < len {
        match file.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(TransferError::Read {
                    path: path.to_path_buf(),
                    offset: offset + got as u64,
                    source,
                });
            }
        }
    }
    Ok(buf)
}

type Op<'a> = BoxFuture<'a, Result<u64>>;

/// The requests in flight, at most `depth`.
struct Window<'a> {
    ops: FuturesUnordered<Op<'a>>,
    depth: usize,
    /// Sum of what finished ops returned.
    returned: u64,
}

impl<'a> Window<'a> {
    fn new(depth: usize) -> Self {
        Window { ops: FuturesUnordered::new(), depth: depth.max(1), returned: 0 }
    }

    async fn push(&mut self, op: Op<'a>) -> Result<()> {
        while self.ops.len() >= self.depth {
            self.returned += self.ops.next().await.expect("the window is not empty")?;
        }
        self.ops.push(op);
        Ok(())
    }

    async fn drain(&mut self) -> Result<()> {
        while let Some(r) = self.ops.next().await {
            self.returned += r?;
        }
        Ok(())
    }
}

#[derive(Debug, Default)]
struct Stats {
    data_bytes: u64,
    holes: u64,
    zeroed_bytes: u64,
}

/// Sizes the walk works in, checked against the server's.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    min: u64,
    chunk: u64,
    max_zero: u64,
}

fn sizes(client: &NbdClient, opts: &Options) -> Result<Sizes> {
    let info = client.info();
    let min = info.min_block.max(1) as u64;
    if !ZERO_BLOCK.is_multiple_of(min) {
        return Err(TransferError::BlockSize(info.min_block));
    }
    let max = align_down(info.max_payload as u64, ZERO_BLOCK).max(ZERO_BLOCK);
    let chunk = align_down(opts.chunk as u64, ZERO_BLOCK).clamp(ZERO_BLOCK, max);
    Ok(Sizes { min, chunk, max_zero: max })
}

struct Importer<'a> {
    client: &'a NbdClient,
    tracker: &'a Tracker,
    sizes: Sizes,
    window: Window<'a>,
    /// Zeros to WRITE where the server has no WRITE_ZEROES.
    zeros: Option<Bytes>,
    /// A run of zeros not yet handled, extended while zeros continue.
    zero_run: Option<(u64, u64)>,
    /// The volume's allocation from some offset on, asked one window at a
    /// time ahead of the walk, so a run of zeros costs no round trip of
    /// its own: `(start, end, reads as zeros)`, in order.
    map: std::collections::VecDeque<(u64, u64, bool)>,
    stats: Stats,
}

impl<'a> Importer<'a> {
    async fn data(&mut self, offset: u64, data: Bytes) -> Result<()> {
        self.end_zero_run().await?;
        let len = data.len() as u64;
        self.stats.data_bytes += len;
        self.tracker.begin(offset, len);
        let (client, tracker) = (self.client, self.tracker);
        self.window
            .push(Box::pin(async move {
                client.write(offset, data).await?;
                tracker.end(offset);
                Ok(0)
            }))
            .await
    }

    async fn zero(&mut self, start: u64, end: u64) -> Result<()> {
        match &mut self.zero_run {
            Some((_, e)) if *e == start => *e = end,
            _ => {
                self.end_zero_run().await?;
                self.zero_run = Some((start, end));
            }
        }
        Ok(())
    }

    async fn end_zero_run(&mut self) -> Result<()> {
        let Some((start, end)) = self.zero_run.take() else { return Ok(()) };
        self.stats.holes += 1;
        let mut pos = start;
        while pos < end {
            let (_, e, zero) = self.map_at(pos).await?;
            let stop = e.min(end);
            if zero {
                self.tracker.skip(pos, stop - pos);
            } else {
                self.zero_now(pos, stop).await?;
            }
            pos = stop;
        }
        Ok(())
    }

    /// The allocation extent holding `pos`. The walk only moves forward,
    /// and never writes data where it asks, so the map stays true for it.
    async fn map_at(&mut self, pos: u64) -> Result<(u64, u64, bool)> {
        while self.map.front().is_some_and(|&(_, e, _)| e <= pos) {
            self.map.pop_front();
        }
        if let Some(&x) = self.map.front().filter(|x| x.0 <= pos) {
            return Ok(x);
        }
        self.map.clear();
        let want = (self.client.info().size - pos).min(STATUS_WINDOW);
        let extents = if self.client.info().allocation_context.is_some() {
            self.client.block_status(pos, want as u32).await?
        } else {
            vec![Extent { len: want, flags: 0 }]
        };
        let mut at = pos;
        for x in extents {
            self.map.push_back((at, at + x.len, x.zero()));
            at += x.len;
        }
        Ok(*self.map.front().expect("a block status reply is never empty"))
    }

    /// Makes `[start, end)` read as zeros on the volume.
    async fn zero_now(&mut self, start: u64, end: u64) -> Result<()> {
        let mut pos = start;
        while pos < end {
            let (client, tracker) = (self.client, self.tracker);
            let n = (end - pos).min(self.zeros.as_ref().map_or(self.sizes.max_zero, |z| z.len() as u64));
            tracker.begin(pos, n);
            let op: Op<'a> = match &self.zeros {
                None => Box::pin(async move {
                    client.write_zeroes(pos, n as u32).await?;
                    tracker.end(pos);
                    Ok(0)
                }),
                Some(zeros) => {
                    let data = zeros.slice(..n as usize);
                    Box::pin(async move {
                        client.write(pos, data).await?;
                        tracker.end(pos);
                        Ok(0)
                    })
                }
            };
            self.stats.zeroed_bytes += n;
            self.window.push(op).await?;
            pos += n;
        }
        Ok(())
    }
}

/// Checks the image against the volume; nothing is written yet.
fn open_image(client: &NbdClient, volume: &str, path: &Path) -> Result<(File, u64)> {
    let file = File::open(path).map_err(|source| TransferError::Open { path: path.to_path_buf(), source })?;
    let meta = file.metadata().map_err(|source| TransferError::Open { path: path.to_path_buf(), source })?;
    if !meta.is_file() {
        return Err(TransferError::NotAFile(path.to_path_buf()));
    }
    let info = client.info();
    if meta.len() > info.size {
        return Err(TransferError::TooLarge {
            path: path.to_path_buf(),
            file: meta.len(),
            volume: volume.to_string(),
            size: info.size,
        });
    }
    if info.read_only() {
        return Err(TransferError::ReadOnly(volume.to_string()));
    }
    Ok((file, meta.len()))
}

async fn import(
    client: &NbdClient,
    file: File,
    len: u64,
    path: &Path,
    opts: &Options,
    tracker: &Tracker,
) -> Result<Stats> {
    let sizes = sizes(client, opts)?;
    let info = client.info().clone();
    let file = Arc::new(file);
    let mut imp = Importer {
        client,
        tracker,
        sizes,
        window: Window::new(opts.depth),
        zeros: (!info.can_write_zeroes()).then(|| Bytes::from(vec![0u8; sizes.chunk as usize])),
        zero_run: None,
        map: Default::default(),
        stats: Stats::default(),
    };
    // The image padded to whole blocks of the volume (fits: the volume's
    // size is a multiple of its block size, and the file is no larger).
    let end = align_up(len, sizes.min).min(info.size);
    let mut pos = 0;
    while pos < end {
        let Some(data) = seek(&file, pos, libc::SEEK_DATA).map_err(|source| read_err(path, pos, source))?
        else {
            break;
        };
        let start = align_down(data, ZERO_BLOCK).max(pos).min(end);
        if start > pos {
            imp.zero(pos, start).await?;
        }
        if start >= end {
            pos = end;
            break;
        }
        let hole = seek(&file, data, libc::SEEK_HOLE)
            .map_err(|source| read_err(path, data, source))?
            .unwrap_or(len)
            .min(len);
        let stop = align_up(hole.max(data + 1), ZERO_BLOCK).min(end);
        let mut off = start;
        while off < stop {
            let n = (align_down(off, sizes.chunk) + sizes.chunk).min(stop) - off;
            let (f, p) = (file.clone(), path.to_path_buf());
            let buf = tokio::task::spawn_blocking(move || read_full(&f, &p, off, n as usize))
                .await
                .expect("the read task does not panic")?;
            let buf = Bytes::from(buf);
            for (s, e, is_data) in runs(&buf) {
                let at = off + s as u64;
                if is_data {
                    imp.data(at, buf.slice(s..e)).await?;
                } else {
                    imp.zero(at, off + e as u64).await?;
                }
            }
            off += n;
        }
        pos = stop;
    }
    // The rest of the image, then the volume past it, read as zeros.
    if pos < info.size {
        imp.zero(pos, info.size).await?;
    }
    imp.end_zero_run().await?;
    imp.window.drain().await?;
    if info.can_flush() {
        client.flush().await?;
    }
    Ok(imp.stats)
}

fn read_err(path: &Path, offset: u64, source: std::io::Error) -> TransferError {
    TransferError::Read { path: path.to_path_buf(), offset, source }
}

fn create_image(path: &Path, size: u64) -> Result<File> {
    if let Ok(m) = std::fs::metadata(path)
        && !m.is_file()
    {
        return Err(TransferError::NotAFile(path.to_path_buf()));
    }
    let open = |source| TransferError::Open { path: path.to_path_buf(), source };
    let file =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(path).map_err(open)?;
    file.set_len(size).map_err(open)?;
    Ok(file)
}

async fn export(
    client: &NbdClient,
    file: File,
    path: &Path,
    opts: &Options,
    tracker: &Tracker,
) -> Result<Stats> {
    let sizes = sizes(client, opts)?;
    let size = client.info().size;
    let file = Arc::new(file);
    let mut window = Window::new(opts.depth);
    let mut stats = Stats::default();
    let mut in_hole = false;
    let mut pos = 0;
    while pos < size {
        let want = (size - pos).min(STATUS_WINDOW);
        let extents = if client.info().allocation_context.is_some() {
            client.block_status(pos, want as u32).await?
        } else {
            vec![Extent { len: want, flags: 0 }]
        };
        for x in extents {
            if x.zero() {
                stats.holes += u64::from(!in_hole);
                in_hole = true;
                tracker.skip(pos, x.len);
                pos += x.len;
                continue;
            }
            in_hole = false;
            let end = pos + x.len;
            while pos < end {
                let off = pos;
                let n = (align_down(off, sizes.chunk) + sizes.chunk).min(end) - off;
                let (f, p) = (file.clone(), path.to_path_buf());
                tracker.begin(off, n);
                window
                    .push(Box::pin(async move {
                        let data = client.read(off, n as u32).await?;
                        let written = tokio::task::spawn_blocking(move || write_runs(&f, &p, off, &data))
                            .await
                            .expect("the write task does not panic")?;
                        tracker.end(off);
                        Ok(written)
                    }))
                    .await?;
                pos += n;
            }
        }
    }
    window.drain().await?;
    stats.data_bytes = window.returned;
    let (f, p) = (file.clone(), path.to_path_buf());
    tokio::task::spawn_blocking(move || {
        f.sync_all().map_err(|source| TransferError::Write { path: p, offset: size, source })
    })
    .await
    .expect("the sync task does not panic")?;
    Ok(stats)
}

/// Writes the non-zero blocks of `data` at `offset`; returns their bytes.
/// (`data` starts on a block boundary: reads start on extent boundaries,
/// which BLOCK_STATUS gives in whole blocks of the volume.)
fn write_runs(file: &File, path: &Path, offset: u64, data: &[u8]) -> Result<u64> {
    let mut written = 0;
    for (s, e, is_data) in runs(data) {
        if is_data {
            let at = offset + s as u64;
            file.write_all_at(&data[s..e], at).map_err(|source| TransferError::Write {
                path: path.to_path_buf(),
                offset: at,
                source,
            })?;
            written += (e - s) as u64;
        }
    }
    Ok(written)
}

/// Runs `job` to the end, or until SIGINT or an error.
pub async fn run(job: &Job) -> Result<Summary, Failure> {
    let fail = |cause: TransferError, position: Option<Position>, flushed: bool| Failure {
        direction: job.direction,
        volume: job.volume.clone(),
        file: job.file.clone(),
        position,
        flushed,
        cause,
    };
    let started = Instant::now();
    let client = NbdClient::connect(&job.addr, &job.volume).await.map_err(|e| fail(e.into(), None, false))?;
    let size = client.info().size;
    let progress = |label: &str| {
        if job.progress { Progress::for_terminal(size, label) } else { Progress::hidden() }
    };
    let (tracker, file_bytes);
    let work: BoxFuture<'_, Result<Stats>> = match job.direction {
        Direction::Import => {
            let (file, len) =
                open_image(&client, &job.volume, &job.file).map_err(|e| fail(e, None, false))?;
            file_bytes = len;
            tracker = Tracker::new(size, progress("import"));
            Box::pin(import(&client, file, len, &job.file, &job.options, &tracker))
        }
        Direction::Export => {
            let file = create_image(&job.file, size).map_err(|e| fail(e, None, false))?;
            file_bytes = size;
            tracker = Tracker::new(size, progress("export"));
            Box::pin(export(&client, file, &job.file, &job.options, &tracker))
        }
    };
    let result = tokio::select! {
        r = work => r,
        _ = tokio::signal::ctrl_c() => Err(TransferError::Interrupted),
    };
    match result {
        Ok(stats) => {
            tracker.progress.finish();
            client.disconnect().await;
            Ok(Summary {
                direction: job.direction,
                volume: job.volume.clone(),
                file: job.file.clone(),
                bytes: size,
                file_bytes,
                data_bytes: stats.data_bytes,
                hole_bytes: size - stats.data_bytes,
                holes: stats.holes,
                zeroed_bytes: stats.zeroed_bytes,
                seconds: started.elapsed().as_secs_f64(),
            })
        }
        Err(cause) => {
            tracker.progress.abandon();
            let position = tracker.position();
            // What was acknowledged before an interruption is made durable,
            // so "everything before it is on the volume" holds; a broken
            // connection fails this at once.
            // A second Ctrl-C skips the wait.
            let flushed = job.direction == Direction::Import
                && tokio::select! {
                    r = tokio::time::timeout(Duration::from_secs(10), client.flush()) => matches!(r, Ok(Ok(()))),
                    _ = tokio::signal::ctrl_c() => false,
                };
            Err(fail(cause, Some(position), flushed))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_split_data_and_zero_blocks() {
        let b = ZERO_BLOCK as usize;
        let mut buf = vec![0u8; 5 * b + 100];
        buf[b + 7] = 1; // block 1 data
        buf[2 * b] = 1; // block 2 data
        buf[4 * b + b - 1] = 9; // block 4 data
        buf[5 * b + 99] = 1; // short tail data
        assert_eq!(
            runs(&buf),
            vec![(0, b, false), (b, 3 * b, true), (3 * b, 4 * b, false), (4 * b, 5 * b + 100, true)]
        );
        assert_eq!(runs(&vec![0u8; 3 * b]), vec![(0, 3 * b, false)]);
        assert_eq!(runs(&[]), vec![]);
    }

    #[test]
    fn tracker_reports_the_lowest_unacknowledged_offset() {
        let t = Tracker::new(100, Progress::hidden());
        t.begin(0, 10);
        t.begin(10, 10);
        t.skip(20, 30);
        t.begin(50, 10);
        assert_eq!(t.position(), Position { done: 30, total: 100, first_unwritten: 0 });
        t.end(10);
        assert_eq!(t.position().first_unwritten, 0);
        t.end(0);
        assert_eq!(t.position(), Position { done: 50, total: 100, first_unwritten: 50 });
        t.end(50);
        assert_eq!(t.position(), Position { done: 60, total: 100, first_unwritten: 60 });
    }
}
