//! Byte budgets: how much memory a connection (server side) or a peer
//! (client side) may hold in frames in flight.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// Bytes held now and at most, over every budget sharing it (for stats and
/// tests).
#[derive(Debug, Default)]
pub struct Gauge {
    now: AtomicU64,
    peak: AtomicU64,
}

impl Gauge {
    fn add(&self, n: u64) {
        let now = self.now.fetch_add(n, Ordering::Relaxed) + n;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }

    fn sub(&self, n: u64) {
        self.now.fetch_sub(n, Ordering::Relaxed);
    }

    pub fn now(&self) -> u64 {
        self.now.load(Ordering::Relaxed)
    }

    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

/// A budget of bytes. A taker that does not fit waits (backpressure); a
/// taking larger than the whole budget is clamped to it, so it can always
/// run once everything else is given back. Waiters are not queued in
/// order: a small taking may pass a large one that does not fit yet (a
/// strict queue deadlocks when a holder needs a little more to finish while
/// a large taker waits at the head).
#[derive(Debug, Clone)]
pub struct ByteBudget {
    inner: Arc<Inner>,
    gauge: Arc<Gauge>,
}

#[derive(Debug)]
struct Inner {
    used: Mutex<usize>,
    freed: Notify,
    total: usize,
}

impl ByteBudget {
    /// A budget of `bytes` (at least 1), reporting into `gauge`.
    pub fn new(bytes: usize, gauge: Arc<Gauge>) -> ByteBudget {
        let inner = Inner { used: Mutex::new(0), freed: Notify::new(), total: bytes.max(1) };
        ByteBudget { inner: Arc::new(inner), gauge }
    }

    /// Waits for room for `bytes` (cancel-safe: a dropped wait holds nothing).
    pub async fn take(&self, bytes: usize) -> Held {
        let n = bytes.clamp(1, self.inner.total);
        loop {
            let freed = self.inner.freed.notified();
            tokio::pin!(freed);
            // Registered before the check, so a release in between wakes us.
            freed.as_mut().enable();
            if let Some(h) = self.try_take(n) {
                return h;
            }
            freed.await;
        }
    }

    /// Room for `bytes` (clamped to the budget) if it is free now.
    pub fn try_take(&self, bytes: usize) -> Option<Held> {
        let n = bytes.clamp(1, self.inner.total);
        let mut used = self.inner.used.lock().unwrap();
        if *used + n > self.inner.total {
            return None;
        }
        *used += n;
        drop(used);
        Some(self.held(n))
    }

    /// Takes `bytes` without waiting, even past the budget: for a reply
    /// that turned out larger than what its request reserved, which must
    /// not wait behind new requests. Takers wait until usage is back under
    /// the budget, so the overshoot is bounded by the replies in flight.
    pub fn force(&self, bytes: usize) -> Held {
        *self.inner.used.lock().unwrap() += bytes;
        self.held(bytes)
    }

    fn held(&self, bytes: usize) -> Held {
        self.gauge.add(bytes as u64);
        Held { inner: self.inner.clone(), gauge: self.gauge.clone(), bytes }
    }

    /// Bytes free now.
    pub fn available(&self) -> usize {
        self.inner.total.saturating_sub(*self.inner.used.lock().unwrap())
    }
}

/// Bytes taken from a budget, given back on drop.
#[derive(Debug)]
pub struct Held {
    inner: Arc<Inner>,
    gauge: Arc<Gauge>,
    bytes: usize,
}

impl Held {
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Adds `other` to this holding (both from the same budget).
    pub fn merge(&mut self, mut other: Held) {
        debug_assert!(Arc::ptr_eq(&self.inner, &other.inner));
        self.bytes += std::mem::take(&mut other.bytes);
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.bytes == 0 {
            return;
        }
        *self.inner.used.lock().unwrap() -= self.bytes;
        self.gauge.sub(self.bytes as u64);
        self.inner.freed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn taken_bytes_come_back_and_the_gauge_follows() {
        let g = Arc::new(Gauge::default());
        let b = ByteBudget::new(1000, g.clone());
        let mut a = b.take(400).await;
        let part = b.take(200).await;
        assert!(b.try_take(500).is_none());
        assert_eq!((a.bytes(), part.bytes(), g.now()), (400, 200, 600));
        drop(part);
        assert_eq!((b.available(), g.now()), (600, 400));
        let more = b.take(100).await;
        a.merge(more);
        assert_eq!((a.bytes(), b.available(), g.now()), (500, 500, 500));
        drop(a);
        // One taking larger than the budget is clamped to all of it.
        let c = b.take(5000).await;
        assert_eq!((c.bytes(), g.now()), (1000, 1000));
        drop(c);
        assert_eq!(g.now(), 0);
        assert_eq!(g.peak(), 1000);
        // Forced past the budget: takers wait until usage is back under it.
        let over = b.force(1500);
        assert_eq!((b.available(), g.now()), (0, 1500));
        let waiter = {
            let b = b.clone();
            tokio::spawn(async move { b.take(10).await.bytes() })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(over);
        assert_eq!(waiter.await.unwrap(), 10);
        assert_eq!((b.available(), g.now()), (1000, 0));
    }

    /// A holder topping up while a large taker waits is not stuck behind it.
    #[tokio::test]
    async fn a_small_taking_passes_a_large_waiter() {
        let b = ByteBudget::new(1000, Arc::new(Gauge::default()));
        let held = b.take(700).await;
        let big = {
            let b = b.clone();
            tokio::spawn(async move { b.take(900).await.bytes() })
        };
        tokio::task::yield_now().await;
        let small = b.take(200).await;
        assert!(!big.is_finished());
        drop((held, small));
        assert_eq!(big.await.unwrap(), 900);
    }
}
