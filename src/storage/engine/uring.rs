//! The io_uring engine: one ring per disk, driven from the tokio runtime.
//!
//! There is no thread of its own. Whoever submits pushes SQEs under the
//! ring's mutex and enters the kernel once (no wait), reaping whatever has
//! completed on the way out. Completions nobody reaps that way wake a small
//! reaper task through the ring fd, which is registered with tokio's
//! reactor (the ring fd polls readable when its CQ has entries). A 4 KiB
//! read thus costs no thread hop besides the runtime's own: the previous
//! design (a ring thread woken by an eventfd, answering through a oneshot
//! to a tokio worker) paid two context switches per op, which dominated
//! the profile of small random I/O. The kernel runs a completion's
//! bookkeeping on the submitting thread (task work), which here is the
//! tokio worker that will also consume the result.
//!
//! When every slot is in flight, requests wait in a backlog that each reap
//! drains into the freed slots: a full ring is backpressure, not an error.
//!
//! Every op owns its buffer and a clone of its file (see `Op`), and the
//! in-flight table keeps the op until its completion arrives, so the memory
//! and fd the kernel uses stay valid for exactly as long as it uses them;
//! dropping the ring with ops in flight first waits for them.
//!
//! Not used, on purpose: registered files and buffers. A profile of 4 KiB
//! random reads at QD32 shows context switches and the block layer on top,
//! while fd lookup and page pinning (what registration saves) are around
//! 1-2%; registering would add an unregister protocol on file close and a
//! fixed buffer pool whose buffers outlive `Bytes` handed to callers.
//! SINGLE_ISSUER/DEFER_TASKRUN do not fit: any tokio worker may submit.

use super::{Engine, FileRef, Op, Request, real};
use crate::storage::EngineKind;
use io_uring::{IoUring, opcode, squeue, types};
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

/// Submission queue size; also the most ops in flight per disk.
pub const DEFAULT_ENTRIES: u32 = 256;

/// The ring and the ops the kernel holds.
struct Ring {
    ring: IoUring,
    /// In-flight ops by slot (the SQE's user_data).
    slots: Vec<Option<Request>>,
    free: Vec<usize>,
    /// Requests waiting for a free slot.
    backlog: VecDeque<Request>,
    inflight: usize,
}

impl Ring {
    /// Moves backlog into the SQ, submits, and collects finished ops into
    /// `done` (completed by the caller once the lock is released). Repeats
    /// while reaping frees slots for waiting requests.
    fn pump(&mut self, done: &mut Vec<(Request, io::Result<usize>)>) {
        loop {
            let mut pushed = 0;
            while let Some(slot) = self.free.last().copied() {
                let Some(mut req) = self.backlog.pop_front() else { break };
                match sqe_for(&mut req.op, slot as u64) {
                    Ok(sqe) => {
                        // SAFETY: the SQE points into `req.op`, which we store
                        // in `slots[slot]` and keep until the matching CQE.
                        // At most `cap` (= sq_entries) ops are in flight and
                        // every submit empties the SQ, so there is room.
                        if unsafe { self.ring.submission().push(&sqe) }.is_err() {
                            self.backlog.push_front(req);
                            break;
                        }
                        self.free.pop();
                        self.slots[slot] = Some(req);
                        self.inflight += 1;
                        pushed += 1;
                    }
                    Err(e) => done.push((req, Err(e))),
                }
            }
            if pushed > 0 || !self.ring.submission().is_empty() {
                match self.ring.submit() {
                    Ok(_) => {}
                    // Left in the SQ; the next pump (any submit, or the
                    // reaper on the next completion) retries.
                    Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY | libc::EAGAIN)) => {}
                    Err(e) => tracing::error!(error = %e, "io_uring_enter failed"),
                }
            }
            let mut reaped = 0;
            for cqe in self.ring.completion() {
                let slot = cqe.user_data() as usize;
                let Some(req) = self.slots.get_mut(slot).and_then(Option::take) else {
                    tracing::error!(slot, "io_uring completion for an empty slot");
                    continue;
                };
                self.free.push(slot);
                self.inflight -= 1;
                reaped += 1;
                let res = cqe.result();
                done.push((req, if res < 0 { Err(cqe_error(res)) } else { Ok(res as usize) }));
            }
            if reaped == 0 || self.backlog.is_empty() {
                return;
            }
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // The kernel may still write into buffers of ops in flight: wait
        // for them before the slots (and their buffers) are freed.
        let mut done = Vec::new();
        while self.inflight > 0 {
            if let Err(e) = self.ring.submit_and_wait(1)
                && !matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY | libc::EAGAIN))
            {
                tracing::error!(error = %e, "io_uring wait at shutdown failed");
                // Leak the ops rather than free memory the kernel may use.
                for s in self.slots.drain(..).flatten() {
                    std::mem::forget(s);
                }
                break;
            }
            self.pump(&mut done);
        }
        for (req, res) in done.drain(..) {
            req.complete(res);
        }
        for req in self.backlog.drain(..) {
            req.complete(Err(io::Error::other("io_uring engine stopped")));
        }
    }
}

fn finish(done: &mut Vec<(Request, io::Result<usize>)>) {
    for (req, res) in done.drain(..) {
        req.complete(res);
    }
}

struct Shared {
    ring: Mutex<Ring>,
    stop: AtomicBool,
    /// Wakes the reaper to notice `stop`.
    stopping: Notify,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("stop", &self.stop).finish_non_exhaustive()
    }
}

/// The ring fd as tokio's reactor sees it, holding the ring (which owns
/// the fd) alive for as long as it is registered.
struct RingFd(RawFd, Arc<Shared>);

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

#[derive(Debug)]
pub struct UringEngine {
    shared: Arc<Shared>,
}

impl UringEngine {
    /// Must be called inside a tokio runtime, which then runs the reaper.
    pub fn new(entries: u32) -> io::Result<UringEngine> {
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|_| io::Error::other("the io_uring engine needs a tokio runtime"))?;
        let ring = build_ring(entries)?;
        let cap = ring.params().sq_entries() as usize;
        let raw = ring.as_raw_fd();
        let shared = Arc::new(Shared {
            ring: Mutex::new(Ring {
                ring,
                slots: (0..cap).map(|_| None).collect(),
                free: (0..cap).rev().collect(),
                backlog: VecDeque::new(),
                inflight: 0,
            }),
            stop: AtomicBool::new(false),
            stopping: Notify::new(),
        });
        let afd = {
            let _guard = handle.enter();
            // SAFETY: `raw` is the ring's fd; the ring lives in `shared`,
            // which the `RingFd` keeps alive, so the fd stays open and the
            // same for as long as the registration exists.
            unsafe {
                AsyncFd::register_with_interest(RingFd(raw, shared.clone()), tokio::io::Interest::READABLE)?
            }
        };
        // The task holds its own reference: the ring (and the ops in it)
        // outlives the engine until everything in flight has completed.
        handle.spawn(reaper(afd));
        Ok(UringEngine { shared })
    }
}

async fn reaper(afd: AsyncFd<RingFd>) {
    let shared = afd.get_ref().1.clone();
    let mut done = Vec::new();
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            let r = shared.ring.lock().unwrap();
            if r.inflight == 0 && r.backlog.is_empty() {
                return;
            }
        }
        tokio::select! {
            ready = afd.readable() => {
                let mut guard = match ready {
                    Ok(g) => g,
                    Err(e) => {
                        tracing::error!(error = %e, "io_uring fd poll failed");
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        continue;
                    }
                };
                shared.ring.lock().unwrap().pump(&mut done);
                if done.is_empty() {
                    // Nothing was there: wait for the next edge. (tokio keeps
                    // the readiness if a new event arrived meanwhile.)
                    guard.clear_ready();
                }
                finish(&mut done);
            }
            _ = shared.stopping.notified() => {}
        }
    }
}

/// Builds a ring and probes once for the ops we need, so a kernel or
/// seccomp policy without them makes `Auto` fall back now rather than fail
/// later.
fn build_ring(entries: u32) -> io::Result<IoUring> {
    let ring = IoUring::builder().build(entries)?;
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
        self.shared.stopping.notify_one();
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
            opcode::Write::new(fd_of(file)?, buf.as_ptr(), len).offset(*offset).build()
        }
        Op::Sync { file } => opcode::Fsync::new(fd_of(file)?).flags(types::FsyncFlags::DATASYNC).build(),
        Op::Fallocate { file, mode, offset, len } => {
            opcode::Fallocate::new(fd_of(file)?, *len).offset(*offset).mode(mode.flags()).build()
        }
    };
    Ok(e.user_data(tag))
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
        let mut done = Vec::new();
        {
            let mut r = self.shared.ring.lock().unwrap();
            r.backlog.push_back(req);
            r.pump(&mut done);
        }
        finish(&mut done);
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
        let c =
            crate::storage::engine::run(&e, Op::Write { file: f.clone(), offset: 100, buf: buf.into() }, 7)
                .await;
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
        let c =
            crate::storage::engine::run(&e, Op::Write { file: f.clone(), offset: 4096, buf: buf.into() }, 8)
                .await;
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
