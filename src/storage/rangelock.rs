//! A small async reader/writer lock over block ranges of one extent.
//!
//! Reads take it shared, writes, RMW, trims and zeroing take it exclusive,
//! so a read never sees a block between its data write and its table update
//! (which would look like a checksum mismatch) and read-modify-writes of one
//! block never interleave. Waiters re-check on every release; the number of
//! holders is bounded by the queue depth, so a linear scan is cheapest.

use std::ops::Range;
use std::sync::Mutex;
use tokio::sync::Notify;

#[derive(Debug, Default)]
pub struct RangeLock {
    held: Mutex<Vec<Held>>,
    released: Notify,
}

#[derive(Debug)]
struct Held {
    id: u64,
    range: Range<u64>,
    exclusive: bool,
}

#[derive(Debug)]
pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    id: u64,
}

static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl RangeLock {
    pub async fn lock(&self, range: Range<u64>, exclusive: bool) -> RangeGuard<'_> {
        let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        loop {
            // Register interest before checking, so a release between the
            // check and the await is not missed.
            let notified = self.released.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut held = self.held.lock().unwrap();
                let conflict = held.iter().any(|h| {
                    (h.exclusive || exclusive) && h.range.start < range.end && range.start < h.range.end
                });
                if !conflict {
                    held.push(Held { id, range: range.clone(), exclusive });
                    return RangeGuard { lock: self, id };
                }
            }
            notified.await;
        }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.lock.held.lock().unwrap();
        if let Some(i) = held.iter().position(|h| h.id == self.id) {
            held.swap_remove(i);
        }
        drop(held);
        self.lock.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn shared_readers_exclusive_writers() {
        let l = Arc::new(RangeLock::default());
        let r1 = l.lock(0..4, false).await;
        let _r2 = l.lock(2..6, false).await;
        let _w_disjoint = l.lock(10..12, true).await;
        let l2 = l.clone();
        let w = tokio::spawn(async move {
            let _g = l2.lock(3..5, true).await;
        });
        tokio::task::yield_now().await;
        assert!(!w.is_finished());
        drop(r1);
        drop(_r2);
        w.await.unwrap();
    }
}
