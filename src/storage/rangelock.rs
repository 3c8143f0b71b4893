//! A small async reader/writer lock over block ranges of one extent.
//!
//! Reads take it shared, writes, RMW, trims and zeroing take it exclusive,
//! so a read never sees a block between its data write and its table update
//! (which would look like a checksum mismatch) and read-modify-writes of one
//! block never interleave. Waiters re-check on every release; the number of
//! holders is bounded by the queue depth, so a linear scan is cheapest.
//!
//! Writers are not starved: an exclusive request that has to wait is
//! recorded, and any later request (shared or exclusive) over an
//! overlapping range waits behind it. Without that, a steady stream of
//! overlapping reads could keep a write waiting forever, since some read
//! always held the range.

use std::ops::Range;
use std::sync::Mutex;
use tokio::sync::Notify;

#[derive(Debug, Default)]
pub struct RangeLock {
    state: Mutex<State>,
    released: Notify,
}

#[derive(Debug, Default)]
struct State {
    held: Vec<Held>,
    /// Exclusive requests that found their range busy, by id (arrival order).
    waiting: Vec<Held>,
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
        let overlaps = |h: &Held| h.range.start < range.end && range.start < h.range.end;
        // Takes this request out of `waiting` however the wait ends
        // (acquired, or the future dropped).
        let mut queued = Queued { lock: self, id, registered: false };
        loop {
            // Register interest before checking, so a release between the
            // check and the await is not missed.
            let notified = self.released.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = self.state.lock().unwrap();
                let busy = st.held.iter().any(|h| (h.exclusive || exclusive) && overlaps(h));
                let queued_before = st.waiting.iter().any(|w| w.id < id && overlaps(w));
                if !busy && !queued_before {
                    if queued.registered {
                        st.waiting.retain(|w| w.id != id);
                        queued.registered = false;
                    }
                    st.held.push(Held { id, range: range.clone(), exclusive });
                    return RangeGuard { lock: self, id };
                }
                if exclusive && !queued.registered {
                    st.waiting.push(Held { id, range: range.clone(), exclusive });
                    queued.registered = true;
                }
            }
            notified.await;
        }
    }
}

/// Removes a request from the waiting list if its `lock` call ends without
/// the lock (the future dropped); the fast path never touches it.
struct Queued<'a> {
    lock: &'a RangeLock,
    id: u64,
    registered: bool,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        if !self.registered {
            return;
        }
        let mut st = self.lock.state.lock().unwrap_or_else(|e| e.into_inner());
        let before = st.waiting.len();
        st.waiting.retain(|w| w.id != self.id);
        let removed = st.waiting.len() != before;
        drop(st);
        if removed {
            // Requests queued behind this one may go now.
            self.lock.released.notify_waiters();
        }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut st = self.lock.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = st.held.iter().position(|h| h.id == self.id) {
            st.held.swap_remove(i);
        }
        drop(st);
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

    /// A writer waiting behind a reader goes before readers that arrive
    /// after it, so a stream of overlapping reads cannot starve it; reads of
    /// other ranges are not held up.
    #[tokio::test]
    async fn waiting_writer_is_not_overtaken_by_later_readers() {
        let l = Arc::new(RangeLock::default());
        let order = Arc::new(Mutex::new(Vec::new()));
        let r1 = l.lock(0..8, false).await;
        let (l2, o2) = (l.clone(), order.clone());
        let w = tokio::spawn(async move {
            let _g = l2.lock(4..6, true).await;
            o2.lock().unwrap().push("writer");
        });
        tokio::task::yield_now().await;
        assert!(!w.is_finished(), "the writer waits for the reader");
        let (l3, o3) = (l.clone(), order.clone());
        let r2 = tokio::spawn(async move {
            let _g = l3.lock(5..7, false).await;
            o3.lock().unwrap().push("later reader");
        });
        tokio::task::yield_now().await;
        assert!(!r2.is_finished(), "a later overlapping reader queues behind the writer");
        // A reader of a range the writer does not touch is not held up.
        drop(l.lock(6..8, false).await);
        drop(r1);
        w.await.unwrap();
        r2.await.unwrap();
        assert_eq!(*order.lock().unwrap(), vec!["writer", "later reader"]);
    }

    /// A writer whose wait is abandoned (its future dropped) leaves no trace
    /// that would block the requests behind it.
    #[tokio::test]
    async fn abandoned_writer_does_not_block_others() {
        let l = Arc::new(RangeLock::default());
        let r1 = l.lock(0..4, false).await;
        let l2 = l.clone();
        let w = tokio::spawn(async move {
            let _g = l2.lock(0..4, true).await;
        });
        tokio::task::yield_now().await;
        w.abort();
        let _ = w.await;
        // A new reader is not queued behind the abandoned writer.
        let r2 = tokio::time::timeout(std::time::Duration::from_secs(5), l.lock(1..3, false)).await;
        assert!(r2.is_ok(), "reader blocked by an abandoned writer");
        drop(r1);
    }
}
