//! The psync engine: a few threads doing pread/pwrite/fdatasync/fallocate on
//! O_DIRECT files, completing through the same channel as io_uring. The
//! fallback where io_uring is unavailable (old kernels, seccomp, containers).

use super::{Engine, Op, Request, real};
use crate::storage::EngineKind;
use std::collections::VecDeque;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// Enough threads to keep a queue depth of a few dozen busy on one disk.
pub const DEFAULT_THREADS: usize = 8;

#[derive(Debug, Default)]
struct Queue {
    items: VecDeque<Request>,
    stop: bool,
}

#[derive(Debug, Default)]
struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
}

#[derive(Debug)]
pub struct PsyncEngine {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl PsyncEngine {
    pub fn new(threads: usize) -> io::Result<PsyncEngine> {
        let shared = Arc::new(Shared::default());
        let threads = (0..threads.max(1))
            .map(|i| {
                let s = shared.clone();
                std::thread::Builder::new().name(format!("basalt-psync-{i}")).spawn(move || worker(&s))
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(PsyncEngine { shared, threads })
    }
}

impl Drop for PsyncEngine {
    fn drop(&mut self) {
        self.shared.queue.lock().unwrap().stop = true;
        self.shared.ready.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn worker(s: &Shared) {
    loop {
        let req = {
            let mut q = s.queue.lock().unwrap();
            loop {
                if let Some(r) = q.items.pop_front() {
                    break r;
                }
                if q.stop {
                    return;
                }
                q = s.ready.wait(q).unwrap();
            }
        };
        let mut req = req;
        let res = execute(&mut req.op);
        req.complete(res);
    }
}

fn execute(op: &mut Op) -> io::Result<usize> {
    match op {
        Op::Read { file, offset, buf } => {
            let f = real::file(file)?;
            let mut done = 0usize;
            while done < buf.len() {
                match f.read_at(&mut buf.as_mut_slice()[done..], *offset + done as u64) {
                    Ok(0) => break,
                    Ok(n) => done += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(done)
        }
        Op::Write { file, offset, buf } => {
            real::file(file)?.write_all_at(buf.as_slice(), *offset)?;
            Ok(buf.len())
        }
        Op::Sync { file } => {
            real::file(file)?.sync_data()?;
            Ok(0)
        }
        Op::Fallocate { file, mode, offset, len } => {
            real::fallocate(real::file(file)?, mode.flags(), *offset, *len)?;
            Ok(0)
        }
    }
}

impl Engine for PsyncEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Psync
    }

    fn submit(&self, req: Request) {
        let mut q = self.shared.queue.lock().unwrap();
        if q.stop {
            drop(q);
            req.complete(Err(io::Error::other("psync engine stopped")));
            return;
        }
        q.items.push_back(req);
        drop(q);
        self.shared.ready.notify_one();
    }
}
