//! Disk I/O engines: one submit/complete interface, three implementations.
//!
//! A caller hands an engine a [`Request`]: an [`Op`] that owns its aligned
//! buffer, a `user_data` tag, and a oneshot channel. The engine performs the
//! op on its own thread(s) and sends back a [`Completion`] with the same tag
//! and the buffer. Owning the buffer is what makes io_uring safe: the kernel
//! writes into memory nobody else can touch or free until the completion.
//!
//! - [`uring`]: one io_uring per disk on its own thread, O_DIRECT.
//! - [`psync`]: a small thread pool doing pread/pwrite/fdatasync/fallocate.
//! - [`mem`]: in memory, with a crash model (unflushed sectors lost or kept).
//!
//! Besides data ops an engine answers the few metadata calls the store makes
//! at open/create time (directories, file open, free space); those are
//! synchronous and rare, so they stay plain calls.

mod buf;
pub mod mem;
pub mod psync;
pub mod uring;

pub use buf::{AlignedBuf, BUF_ALIGN, WriteData};

use super::EngineKind;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::oneshot;

/// An open file of some engine. Ops hold a clone until they complete, so a
/// file cannot be closed (and its fd reused) under an op in flight.
#[derive(Clone, Debug)]
pub enum FileRef {
    Real(Arc<std::fs::File>),
    Mem(Arc<mem::MemFile>),
}

/// `fallocate` modes the store uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FallocMode {
    /// Reserve space (mode 0 with KEEP_SIZE).
    Reserve,
    /// Deallocate (PUNCH_HOLE | KEEP_SIZE): reads back zeros.
    PunchHole,
    /// Zero but keep allocated (ZERO_RANGE | KEEP_SIZE).
    ZeroRange,
}

impl FallocMode {
    pub fn flags(self) -> i32 {
        match self {
            FallocMode::Reserve => libc::FALLOC_FL_KEEP_SIZE,
            FallocMode::PunchHole => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            FallocMode::ZeroRange => libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        }
    }
}

/// One I/O operation. Offsets and lengths of reads and writes are multiples of 4096.
#[derive(Debug)]
pub enum Op {
    /// Fills `buf` from `offset`.
    Read {
        file: FileRef,
        offset: u64,
        buf: AlignedBuf,
    },
    /// Writes all of `buf` at `offset`.
    Write {
        file: FileRef,
        offset: u64,
        buf: WriteData,
    },
    /// fdatasync.
    Sync {
        file: FileRef,
    },
    Fallocate {
        file: FileRef,
        mode: FallocMode,
        offset: u64,
        len: u64,
    },
}

impl Op {
    /// The bytes a read or write must move; anything less is a short transfer.
    pub fn expected_len(&self) -> Option<usize> {
        match self {
            Op::Read { buf, .. } => Some(buf.len()),
            Op::Write { buf, .. } => Some(buf.len()),
            _ => None,
        }
    }

    /// The op's own buffer back: a read's data, or an owned write buffer.
    pub fn into_buf(self) -> Option<AlignedBuf> {
        match self {
            Op::Read { buf, .. } | Op::Write { buf: WriteData::Owned(buf), .. } => Some(buf),
            _ => None,
        }
    }
}

/// What an engine sends back for a [`Request`].
#[derive(Debug)]
pub struct Completion {
    pub user_data: u64,
    /// Bytes moved (reads, writes) or 0.
    pub result: io::Result<usize>,
    /// The op's buffer, handed back whether or not the op succeeded.
    pub buf: Option<AlignedBuf>,
}

#[derive(Debug)]
pub struct Request {
    pub op: Op,
    pub user_data: u64,
    pub reply: oneshot::Sender<Completion>,
}

impl Request {
    /// Completes the request; a caller that went away just drops the buffer.
    pub(crate) fn complete(self, result: io::Result<usize>) {
        let expected = self.op.expected_len();
        let is_write = matches!(self.op, Op::Write { .. });
        let result = match (result, expected) {
            // A write to a regular file only stops short when the disk is full.
            (Ok(n), Some(want)) if n < want && is_write => Err(io::Error::from_raw_os_error(libc::ENOSPC)),
            (Ok(n), Some(want)) if n < want => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("short read: {n} of {want} bytes (file shorter than its header says?)"),
            )),
            (r, _) => r,
        };
        let c = Completion { user_data: self.user_data, result, buf: self.op.into_buf() };
        let _ = self.reply.send(c);
    }
}

/// The interface every engine implements. One engine instance serves one disk
/// (one data directory).
pub trait Engine: Send + Sync + fmt::Debug {
    fn kind(&self) -> EngineKind;

    /// Queues a request. Never blocks on a full queue: a full ring holds the
    /// request back until slots free up (backpressure through the completion).
    fn submit(&self, req: Request);

    /// Ops submitted and not yet completed, for engines that count them
    /// (the io_uring engine; metrics read it at scrape time).
    fn queue_depth(&self) -> Option<u64> {
        None
    }

    // The namespace operations below default to the real filesystem (the
    // io_uring and psync engines share them); the mem engine overrides them.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        real::create_dir_all(dir)
    }
    /// Names of the files directly in `dir`.
    fn list_dir(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        real::list_dir(dir)
    }
    /// `syncfs` of the filesystem holding `file`: every file's metadata and
    /// written-back data on it durable. Blocking; may take as long as the
    /// filesystem's other dirty data needs.
    fn sync_fs(&self, file: &FileRef) -> io::Result<()> {
        real::sync_fs(real::file(file)?)
    }
    /// Makes a created file's directory entry durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        real::sync_dir(dir)
    }
    /// Bytes available to new extents in `dir`.
    fn free_space(&self, dir: &Path) -> io::Result<u64> {
        real::free_space(dir)
    }
    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }
    /// Opens `path` for direct I/O; with `create` it must not exist yet.
    fn open(&self, path: &Path, create: bool) -> io::Result<FileRef> {
        real::open(path, create, true)
    }
    fn file_len(&self, file: &FileRef) -> io::Result<u64> {
        Ok(real::file(file)?.metadata()?.len())
    }
    fn set_len(&self, file: &FileRef, len: u64) -> io::Result<()> {
        real::file(file)?.set_len(len)
    }
}

/// Submits `op` and waits for its completion.
pub async fn run(engine: &dyn Engine, op: Op, user_data: u64) -> Completion {
    let (reply, rx) = oneshot::channel();
    engine.submit(Request { op, user_data, reply });
    match rx.await {
        Ok(c) => c,
        Err(_) => Completion {
            user_data,
            result: Err(io::Error::other("I/O engine stopped before completing the request")),
            buf: None,
        },
    }
}

/// Builds the engine for one data directory. `Auto` tries io_uring and falls
/// back to psync with a log line.
pub fn open_engine(
    kind: EngineKind,
    dir: &Path,
    mem_disk: &Arc<mem::MemDisk>,
) -> io::Result<Arc<dyn Engine>> {
    Ok(match kind {
        EngineKind::Mem => Arc::new(mem::MemEngine::new(mem_disk.clone(), dir)),
        EngineKind::Psync => Arc::new(psync::PsyncEngine::new(psync::DEFAULT_THREADS)?),
        EngineKind::Uring => Arc::new(uring::UringEngine::new(uring::DEFAULT_ENTRIES)?),
        EngineKind::Auto => match uring::UringEngine::new(uring::DEFAULT_ENTRIES) {
            Ok(e) => Arc::new(e),
            Err(err) => {
                tracing::warn!(dir = %dir.display(), error = %err, "io_uring unavailable, using the psync engine");
                Arc::new(psync::PsyncEngine::new(psync::DEFAULT_THREADS)?)
            }
        },
    })
}

/// Filesystem calls shared by the two engines that use real files.
pub(crate) mod real {
    use super::FileRef;
    use std::io;
    use std::os::unix::fs::OpenOptionsExt;
    use std::path::{Path, PathBuf};

    pub fn create_dir_all(dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)
    }

    pub fn list_dir(dir: &Path) -> io::Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            if e.file_type()?.is_file() {
                out.push(e.path());
            }
        }
        out.sort();
        Ok(out)
    }

    pub fn sync_dir(dir: &Path) -> io::Result<()> {
        std::fs::File::open(dir)?.sync_all()
    }

    pub fn sync_fs(f: &std::fs::File) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: plain syscall on an fd kept open by `f`; no memory is passed.
        let rc = unsafe { libc::syncfs(f.as_raw_fd()) };
        if rc != 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }

    pub fn free_space(dir: &Path) -> io::Result<u64> {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
        let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
        // SAFETY: `c` is a NUL-terminated path and `st` points to writable
        // memory of the right type; statvfs writes only into it.
        let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: statvfs returned 0, so it filled the struct (and it was zeroed before).
        let st = unsafe { st.assume_init() };
        Ok(st.f_bavail.saturating_mul(st.f_frsize))
    }

    /// Opens with O_DIRECT; filesystems without it (tmpfs) fall back to
    /// buffered I/O, which is still correct because every flush is an fdatasync.
    pub fn open(path: &Path, create: bool, direct: bool) -> io::Result<FileRef> {
        let mut o = std::fs::OpenOptions::new();
        o.read(true).write(true);
        if create {
            o.create_new(true);
        }
        let attempt = if direct { o.clone().custom_flags(libc::O_DIRECT).open(path) } else { o.open(path) };
        let f = match attempt {
            Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::info!(path = %path.display(), "O_DIRECT unsupported here, using buffered I/O");
                if create {
                    // create_new above may have created it before O_DIRECT failed
                    let _ = std::fs::remove_file(path);
                }
                o.open(path)?
            }
            r => r?,
        };
        Ok(FileRef::Real(std::sync::Arc::new(f)))
    }

    pub fn file(f: &FileRef) -> io::Result<&std::fs::File> {
        match f {
            FileRef::Real(f) => Ok(f),
            FileRef::Mem(_) => Err(io::Error::other("in-memory file handed to a disk engine")),
        }
    }

    pub fn fallocate(f: &std::fs::File, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: plain syscall on an fd kept open by `f`; no memory is passed.
        let rc = unsafe { libc::fallocate(f.as_raw_fd(), mode, offset as libc::off_t, len as libc::off_t) };
        if rc != 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }
}
