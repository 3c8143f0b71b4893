//! The flood guard on the log lines of client-visible errors.
//!
//! Every error a frontend answers a client with is logged once, where it is
//! handled. A client can make those errors as fast as it can send (a
//! compliance suite such as libiscsi's iscsi-test-cu sends thousands of
//! invalid CDBs on purpose), so one connection gets a token bucket of
//! [`BURST`] lines that refills by one a second. An error over the budget
//! is logged at debug only and counted; the next line that goes out says
//! how many were held back (`suppressed`), and the connection's last line
//! says how many were held back since. No error goes uncounted: every one
//! is a full line or part of a `suppressed` count.
//!
//! Owns: the counting. Must never: block, or grow with the number of errors.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Full lines one connection may log at once before the guard holds them back.
pub const BURST: u32 = 20;

/// One connection's budget of error lines.
#[derive(Debug)]
pub struct LineBudget {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    tokens: u32,
    /// When the bucket last earned a token (or was created).
    since: Instant,
    /// Lines held back since the last one that went out.
    suppressed: u64,
}

impl Default for LineBudget {
    fn default() -> Self {
        LineBudget::new(Instant::now())
    }
}

impl LineBudget {
    pub fn new(now: Instant) -> LineBudget {
        LineBudget { state: Mutex::new(State { tokens: BURST, since: now, suppressed: 0 }) }
    }

    /// `Some(lines held back since the last one)` if a full line may go out now.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    pub fn admit_at(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let earned = now.saturating_duration_since(s.since).as_secs();
        if earned > 0 {
            s.tokens = u64::from(s.tokens).saturating_add(earned).min(u64::from(BURST)) as u32;
            s.since += Duration::from_secs(earned);
        }
        if s.tokens == 0 {
            s.suppressed += 1;
            return None;
        }
        s.tokens -= 1;
        Some(std::mem::take(&mut s.suppressed))
    }

    /// Lines held back and not yet reported; the connection's last line says so.
    pub fn take_suppressed(&self) -> u64 {
        std::mem::take(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()).suppressed)
    }
}

/// `Some(n)` only when lines were held back, so a log line carries the
/// field only then.
pub fn held_back(suppressed: u64) -> Option<u64> {
    (suppressed > 0).then_some(suppressed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first BURST lines go out; the rest of a burst is counted; one
    /// line a second after that, each saying how many it follows.
    #[test]
    fn a_burst_then_one_line_a_second_with_every_error_counted() {
        let t0 = Instant::now();
        let b = LineBudget::new(t0);
        for _ in 0..BURST {
            assert_eq!(b.admit_at(t0), Some(0));
        }
        for _ in 0..100 {
            assert_eq!(b.admit_at(t0 + Duration::from_millis(999)), None);
        }
        assert_eq!(b.admit_at(t0 + Duration::from_secs(1)), Some(100));
        assert_eq!(b.admit_at(t0 + Duration::from_millis(1500)), None);
        assert_eq!(b.take_suppressed(), 1);
        assert_eq!(b.take_suppressed(), 0);
        // A long quiet spell refills the bucket, never past BURST.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..BURST {
            assert_eq!(b.admit_at(later), Some(0));
        }
        assert_eq!(b.admit_at(later), None);
        // A clock read out of order earns nothing and breaks nothing.
        assert_eq!(b.admit_at(t0), None);
        assert_eq!(b.take_suppressed(), 2);
    }

    /// Accounting is exact: lines out plus their `suppressed` counts plus
    /// what is left at the end is every error, at any pace.
    #[test]
    fn every_error_is_a_line_or_counted() {
        let t0 = Instant::now();
        let b = LineBudget::new(t0);
        let (mut lines, mut counted) = (0u64, 0u64);
        for i in 0..10_000u64 {
            if let Some(s) = b.admit_at(t0 + Duration::from_millis(i * 37)) {
                lines += 1;
                counted += s;
            }
        }
        counted += b.take_suppressed();
        assert_eq!(lines + counted, 10_000);
        // 370 s of errors: the burst plus at most one a second.
        assert!(lines <= u64::from(BURST) + 370, "{lines}");
    }
}
