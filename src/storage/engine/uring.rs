//! The io_uring engine: one ring per disk, driven by its own thread.
//!
//! Callers push requests on a queue and, only if the ring thread may be
//! asleep, bump an eventfd. The ring always has a read posted on that
//! eventfd, so the thread sleeps in `io_uring_enter` waiting for *either* a
//! disk completion or new work: no busy polling, and one syscall per batch.
//! Each loop turn moves as many queued requests into the submission queue as
//! there are free slots and submits them together. When every slot is in
//! flight, requests wait in the queue: a full ring is backpressure.
//!
//! Every op owns its buffer and a clone of its file (see `Op`), and the
//! in-flight table keeps the op until its completion arrives, so the memory
//! and fd the kernel uses stay valid for exactly as long as it uses them.
//!
//! Not used, on purpose: registered files and buffers. A profile of 4 KiB
//! random reads at QD32 shows context switches and the block layer on top,
//! while fd lookup and page pinning (what registration saves) are around
//! 1-2%; registering would add an unregister protocol on file close and a
//! fixed buffer pool whose buffers outlive `Bytes` handed to callers.
//! (Tried and dropped: submitting from the callers' threads under a lock
//! instead of waking the ring thread; no measurable gain on this machine.)

use super::{Engine, FileRef, Op, Request, real};
use crate::storage::EngineKind;
use io_uring::{IoUring, opcode, squeue, types};
use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Submission queue size; also the most ops in flight per disk.
pub const DEFAULT_ENTRIES: u32 = 256;
/// user_data of the eventfd read; op slots use their index.
const WAKE_TAG: u64 = u64::MAX;

#[derive(Debug)]
struct Shared {
    queue: Mutex<VecDeque<Request>>,
    /// True while a wakeup is pending: submitters skip the eventfd write.
    notified: AtomicBool,
    stop: AtomicBool,
    wake: std::fs::File,
}

impl Shared {
    fn wake(&self) {
        if !self.notified.swap(true, Ordering::SeqCst) {
            // An eventfd write only fails if the counter would overflow,
            // which cannot happen with one pending increment.
            let _ = (&self.wake).write(&1u64.to_ne_bytes());
        }
    }
}

#[derive(Debug)]
pub struct UringEngine {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl UringEngine {
    pub fn new(entries: u32) -> io::Result<UringEngine> {
        // SAFETY: eventfd has no memory arguments; we check the result below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a freshly created descriptor nobody else owns.
        let wake = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let shared = Arc::new(Shared {
            queue: Mutex::new(VecDeque::new()),
            notified: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            wake,
        });
        let s = shared.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        // The ring is built on its own thread: with SINGLE_ISSUER only the
        // creating thread may submit.
        let thread =
            std::thread::Builder::new().name("basalt-uring".into()).spawn(move || {
                match build_ring(entries) {
                    Ok(ring) => {
                        let _ = ready_tx.send(Ok(()));
                        ring_thread(ring, &s)
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(UringEngine { shared, thread: Some(thread) }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(io::Error::other("io_uring thread died during setup"))
            }
        }
    }
}

/// Builds a ring, preferring DEFER_TASKRUN (completion work runs only when
/// the ring thread asks for events: fewer interrupts of the thread), and
/// probes once for the ops we need, so a kernel or seccomp policy without
/// them makes `Auto` fall back now rather than fail later.
fn build_ring(entries: u32) -> io::Result<IoUring> {
    let ring = match IoUring::builder().setup_single_issuer().setup_defer_taskrun().build(entries) {
        Ok(r) => r,
        Err(_) => IoUring::builder().build(entries)?,
    };
    let mut probe = io_uring::Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    for code in [opcode::Read::CODE, opcode::Write::CODE, opcode::Fsync::CODE, opcode::Fallocate::CODE] {
        if !probe.is_supported(code) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("io_uring op {code} unsupported"),
            ));
        }
    }
    Ok(ring)
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.notified.store(false, Ordering::SeqCst);
        self.shared.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Maps a negative CQE result to an error. Kernel-internal codes (e.g.
/// -512 ERESTARTSYS, seen for a misaligned O_DIRECT write) are not valid
/// errnos for userspace and get a message of their own.
pub fn cqe_error(res: i32) -> io::Error {
    let errno = -res;
    if (1..512).contains(&errno) {
        io::Error::from_raw_os_error(errno)
    } else {
        io::Error::other(format!(
            "io_uring completed with unexpected result {res} (kernel-internal code; misaligned O_DIRECT I/O?)"
        ))
    }
}

fn fd_of(file: &FileRef) -> io::Result<types::Fd> {
    Ok(types::Fd(real::file(file)?.as_raw_fd()))
}

/// Builds the SQE for `op`. The pointers in it stay valid because the op
/// (owning buffer and file) is stored in the in-flight table until its CQE.
fn sqe_for(op: &mut Op, tag: u64) -> io::Result<squeue::Entry> {
    let e = match op {
        Op::Read { file, offset, buf } => {
            let len = u32::try_from(buf.len()).map_err(|_| io::Error::other("read over 4 GiB"))?;
            opcode::Read::new(fd_of(file)?, buf.as_mut_ptr(), len).offset(*offset).build()
        }
        Op::Write { file, offset, buf } => {
            let len = u32::try_from(buf.len()).map_err(|_| io::Error::other("write over 4 GiB"))?;
            opcode::Write::new(fd_of(file)?, buf.as_mut_ptr(), len).offset(*offset).build()
        }
        Op::Sync { file } => opcode::Fsync::new(fd_of(file)?).flags(types::FsyncFlags::DATASYNC).build(),
        Op::Fallocate { file, mode, offset, len } => {
            opcode::Fallocate::new(fd_of(file)?, *len).offset(*offset).mode(mode.flags()).build()
        }
    };
    Ok(e.user_data(tag))
}

fn ring_thread(mut ring: IoUring, s: &Shared) {
    let cap = ring.params().sq_entries() as usize - 1; // one slot for the eventfd read
    let mut slots: Vec<Option<Request>> = (0..cap).map(|_| None).collect();
    let mut free: Vec<usize> = (0..cap).rev().collect();
    // Leaked on purpose: the kernel may still hold the posted read when the
    // ring is torn down, so this 8-byte buffer must never be freed.
    let wake_buf: &'static mut [u8; 8] = Box::leak(Box::new([0u8; 8]));
    let wake_ptr = wake_buf.as_mut_ptr();
    let wake_read = opcode::Read::new(types::Fd(s.wake.as_raw_fd()), wake_ptr, 8).build().user_data(WAKE_TAG);
    // SAFETY: the buffer is 'static and the eventfd lives in `s` for the
    // whole thread; the SQ is empty so the push cannot fail.
    let _ = unsafe { ring.submission().push(&wake_read) };
    let mut inflight = 0usize;
    // While the thread is awake `notified` stays true, so submitters skip
    // the eventfd write; it is cleared just before the last look at the
    // queue ahead of sleeping.
    s.notified.store(true, Ordering::SeqCst);
    loop {
        // Move queued work into the SQ while there are slots.
        {
            let mut q = s.queue.lock().unwrap();
            while let Some(slot) = free.last().copied() {
                let Some(mut req) = q.pop_front() else { break };
                match sqe_for(&mut req.op, slot as u64) {
                    Ok(sqe) => {
                        // SAFETY: the SQE points into `req.op`, which we store
                        // in `slots[slot]` and keep until the matching CQE.
                        // There are at most `cap` ops plus the wake read in
                        // flight, so the SQ (sq_entries) has room.
                        if unsafe { ring.submission().push(&sqe) }.is_err() {
                            q.push_front(req);
                            break;
                        }
                        free.pop();
                        slots[slot] = Some(req);
                        inflight += 1;
                    }
                    Err(e) => req.complete(Err(e)),
                }
            }
        }
        s.notified.store(false, Ordering::SeqCst);
        if !free.is_empty() && !s.queue.lock().unwrap().is_empty() {
            s.notified.store(true, Ordering::SeqCst);
            continue;
        }
        if s.stop.load(Ordering::SeqCst) && inflight == 0 && s.queue.lock().unwrap().is_empty() {
            return;
        }
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) || e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => {
                tracing::error!(error = %e, "io_uring_enter failed; failing queued requests");
                for req in s.queue.lock().unwrap().drain(..) {
                    req.complete(Err(io::Error::other("io_uring submission failed")));
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        s.notified.store(true, Ordering::SeqCst);
        let mut repost = false;
        for cqe in ring.completion() {
            if cqe.user_data() == WAKE_TAG {
                repost = true;
                continue;
            }
            let slot = cqe.user_data() as usize;
            let Some(req) = slots.get_mut(slot).and_then(Option::take) else {
                tracing::error!(slot, "io_uring completion for an empty slot");
                continue;
            };
            free.push(slot);
            inflight -= 1;
            let res = cqe.result();
            req.complete(if res < 0 { Err(cqe_error(res)) } else { Ok(res as usize) });
        }
        if repost {
            // SAFETY: as for the first push; the previous wake read has
            // completed, so exactly one is ever in flight.
            let _ = unsafe { ring.submission().push(&wake_read) };
        }
    }
}

impl Engine for UringEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Uring
    }

    fn submit(&self, req: Request) {
        if self.shared.stop.load(Ordering::SeqCst) {
            req.complete(Err(io::Error::other("io_uring engine stopped")));
            return;
        }
        self.shared.queue.lock().unwrap().push_back(req);
        self.shared.wake();
    }

    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        real::create_dir_all(dir)
    }

    fn list_dir(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        real::list_dir(dir)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        real::sync_dir(dir)
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn misaligned_direct_write_is_a_clear_error() {
        let dir = tempfile::tempdir_in(concat!(env!("CARGO_MANIFEST_DIR"), "/target")).unwrap();
        let e = UringEngine::new(8).unwrap();
        let f = e.open(&dir.path().join("f"), true).unwrap();
        e.set_len(&f, 1 << 20).unwrap();
        let buf = crate::storage::engine::AlignedBuf::zeroed(4096);
        let c = crate::storage::engine::run(&e, Op::Write { file: f.clone(), offset: 100, buf }, 7).await;
        assert_eq!(c.user_data, 7);
        assert!(c.buf.is_some(), "the buffer comes back on error too");
        let err = c.result.unwrap_err();
        // EINVAL where the kernel says so, our own message for internal codes.
        assert!(
            err.raw_os_error() == Some(libc::EINVAL) || err.to_string().contains("unexpected result"),
            "{err}"
        );
        // The ring still works afterwards.
        let buf = crate::storage::engine::AlignedBuf::from_slice(&[9u8; 4096]);
        let c = crate::storage::engine::run(&e, Op::Write { file: f.clone(), offset: 4096, buf }, 8).await;
        assert_eq!(c.result.unwrap(), 4096);
    }

    #[test]
    fn kernel_internal_codes_are_named() {
        assert_eq!(cqe_error(-libc::ENOSPC).raw_os_error(), Some(libc::ENOSPC));
        let e = cqe_error(-512);
        assert_eq!(e.raw_os_error(), None);
        assert!(e.to_string().contains("-512"), "{e}");
    }
}
