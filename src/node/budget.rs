//! The node-wide cap on client payload memory.

use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Payload bytes per budget unit.
const UNIT: u64 = 4096;

/// The node-wide cap on client payload memory: READ and WRITE data held for
/// requests in flight, over every connection of every frontend. Each
/// connection also has a budget of its own (so one client cannot take it
/// all); this one bounds the sum, so a thousand clients cannot add up to
/// more than the node has. A request that does not fit waits, and its
/// connection stops reading: backpressure, never an error.
#[derive(Debug, Clone)]
pub struct PayloadBudget {
    sem: Arc<Semaphore>,
    units: u32,
}

impl PayloadBudget {
    /// A budget of `bytes` (at least one maximum payload, so any single
    /// request can always run).
    pub fn new(bytes: u64) -> PayloadBudget {
        let bytes = bytes.max(super::volume::MAX_PAYLOAD);
        let units = u32::try_from(bytes.div_ceil(UNIT)).unwrap_or(u32::MAX);
        PayloadBudget { sem: Arc::new(Semaphore::new(units as usize)), units }
    }

    /// Units for `bytes`: at least one, at most the whole budget (so a
    /// request can always be admitted eventually).
    fn units(&self, bytes: u64) -> u32 {
        u32::try_from(bytes.div_ceil(UNIT)).unwrap_or(u32::MAX).clamp(1, self.units)
    }

    /// Takes room for `bytes` if it is free now.
    pub fn try_take(&self, bytes: u64) -> Option<OwnedSemaphorePermit> {
        self.sem.clone().try_acquire_many_owned(self.units(bytes)).ok()
    }

    /// Waits for room for `bytes` (cancel-safe: dropping the future holds nothing).
    pub async fn take(&self, bytes: u64) -> OwnedSemaphorePermit {
        self.sem
            .clone()
            .acquire_many_owned(self.units(bytes))
            .await
            .expect("the payload budget is never closed")
    }

    /// Gives back all but the room for `bytes` (at least one unit) of what
    /// `permit` holds: for a request charged for the most it could need
    /// once it knows what it does need. Never grows the permit.
    pub fn shrink(permit: &mut OwnedSemaphorePermit, bytes: u64) {
        let keep = bytes.div_ceil(UNIT).max(1);
        let extra = (permit.num_permits() as u64).saturating_sub(keep);
        if extra > 0 {
            drop(permit.split(extra as usize));
        }
    }

    /// The budget's size in bytes.
    pub fn total(&self) -> u64 {
        self.units as u64 * UNIT
    }

    /// Bytes free right now (for tests and logs).
    pub fn available(&self) -> u64 {
        self.sem.available_permits() as u64 * UNIT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn room_is_taken_and_given_back() {
        let b = PayloadBudget::new(64 << 20);
        assert_eq!(b.available(), 64 << 20);
        let big = b.try_take(40 << 20).expect("fits");
        assert!(b.try_take(32 << 20).is_none(), "only 24 MiB left");
        let small = b.try_take(1).expect("a byte takes one 4 KiB unit");
        assert_eq!(b.available(), (24 << 20) - 4096);
        drop((big, small));
        assert_eq!(b.available(), 64 << 20);
        // Waiting resolves once room comes back.
        let held = b.take(64 << 20).await;
        let waiter = {
            let b = b.clone();
            tokio::spawn(async move { b.take(4096).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(held);
        drop(waiter.await.unwrap());
    }

    #[test]
    fn shrink_gives_back_all_but_what_is_kept() {
        let b = PayloadBudget::new(64 << 20);
        let mut p = b.try_take(1 << 20).unwrap();
        PayloadBudget::shrink(&mut p, 10_000);
        assert_eq!(b.available(), (64 << 20) - 3 * 4096);
        PayloadBudget::shrink(&mut p, 0);
        assert_eq!(b.available(), (64 << 20) - 4096, "one unit stays");
        PayloadBudget::shrink(&mut p, 1 << 20);
        assert_eq!(b.available(), (64 << 20) - 4096, "never grows");
        drop(p);
        assert_eq!(b.available(), 64 << 20);
    }

    #[test]
    fn never_smaller_than_one_request() {
        assert_eq!(PayloadBudget::new(0).available(), crate::node::volume::MAX_PAYLOAD);
    }
}
