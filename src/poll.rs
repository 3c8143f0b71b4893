//! Poll before sleeping: keeps a runtime worker awake for a short while
//! after client activity, so the next request (or the disk completion of
//! the current one) finds it running instead of asleep.
//!
//! Why: on a virtual machine an idle vCPU halts, and waking it (the host
//! has to schedule it again) costs more than the work of a small request.
//! Measured here with the mem engine, 4 KiB random reads at QD1 over NBD:
//! 70 µs per op with the worker sleeping between requests, 18-30 µs when it
//! is kept awake (a busy process on the same CPU showed the same gain).
//! Storage systems that care about latency poll (SPDK, Seastar's reactor,
//! NAPI busy polling); we poll only while clients are active.
//!
//! How: one task per process. Frontends call [`touch`] when a request
//! arrives and when a reply is ready. While the last touch is younger than
//! the poll window the task yields in a loop; each yield makes the tokio
//! worker look at its reactor without blocking (epoll_wait with a zero
//! timeout), so readiness is seen without a wake-up. After a full window
//! without a touch the task sleeps until the next touch.
//!
//! The window adapts, in the manner of the kernel's haltpoll governor:
//! when a sleep turns out shorter than the largest window (a longer poll
//! would have caught the next event) the window doubles; when the client
//! went quiet for longer than that it halves, down to nothing. An idle
//! daemon therefore burns no CPU, a sporadic client costs at most one
//! window per request, and a client in a tight loop keeps one worker busy:
//! at QD1 that worker shows as a whole core in `top`. `--idle-poll-us 0`
//! turns polling off.
//!
//! Polling pays only for short waits. While a long operation is in flight
//! (a FLUSH, a FUA write, or a transfer of [`LONG_BYTES`] or more, each a
//! millisecond or so of disk time; and a replicated volume's change while
//! its owner waits for the replicas, whose processes need the CPU) the poller sleeps: there is nothing to
//! catch soon, and on a small machine the CPU it would burn is the one the
//! kernel needs to finish that operation (the fdatasync worker, the direct
//! I/O completion work). NBD holds the mark from the request until its
//! reply is in the socket (a large payload is a long wait on the socket
//! too); iSCSI for the volume call. Measured before this rule (`scripts/bench`,
//! interleaved A/B against `--idle-poll-us 0`): 4 KiB random writes with a
//! flush every 32 lost 12-17% and 1 MiB writes 5%.
//!
//! One poller keeps one runtime worker awake; with `--workers` above one
//! the others sleep as before.
//!
//! Where the client runs matters as much as polling. On this 2-vCPU VM,
//! fio at QD1 against one node, server and fio pinned to each of the four
//! placements in turn (2026-12-02): 4 KiB random writes took 123, 95, 143
//! and 134 µs with polling and 160, 94, 212 and 189 µs without, qemu-nbd
//! 149, 96, 219 and 188; reads 124, 84, 140, 126 with polling against 150,
//! 114, 242, 185 without and qemu-nbd's 154, 97, 205, 183. Polling wins or
//! ties in every placement. Unpinned, the scheduler picks the placement: a
//! polling worker keeps its CPU busy, so the client always lands on the
//! other one (135-145 µs), while a sleeping server and its client are
//! sometimes put together on the CPU that takes the disk's interrupts (95
//! µs) and sometimes not (160-220 µs), for qemu-nbd as for us. So compare
//! placement by placement (`scripts/bench` with `PLACE=...`).
//!
//! It is process-wide state on purpose: it describes how the process's
//! runtime threads wait, not any one node or volume. Without [`install`]
//! (library use, in-process tests) `touch` is a load and a branch.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// The window the poller starts from when it grows again from nothing.
const GROW_START_NS: u64 = 25_000;

/// Transfers this large or larger count as long operations.
pub const LONG_BYTES: u64 = 256 << 10;

/// Long operations in flight (see the module docs).
static LONG: AtomicUsize = AtomicUsize::new(0);

/// Held for the duration of a long operation; the poller sleeps while any
/// is held.
#[derive(Debug)]
#[must_use = "the operation counts as long only while this is held"]
pub struct LongOp(());

impl LongOp {
    /// Marks a long operation in flight until the guard is dropped.
    pub fn begin() -> LongOp {
        LONG.fetch_add(1, Ordering::Relaxed);
        LongOp(())
    }

    /// A guard for a transfer of `bytes` (FUA: one that is also flushed),
    /// if it counts as long.
    pub fn for_transfer(bytes: u64, fua: bool) -> Option<LongOp> {
        (fua || bytes >= LONG_BYTES).then(LongOp::begin)
    }
}

impl Drop for LongOp {
    fn drop(&mut self) {
        LONG.fetch_sub(1, Ordering::Relaxed);
    }
}

fn long_in_flight() -> bool {
    LONG.load(Ordering::Relaxed) > 0
}

#[derive(Debug)]
struct Poller {
    start: Instant,
    max_ns: u64,
    /// Time of the last touch, in ns since `start`.
    last: AtomicU64,
    sleeping: AtomicBool,
    wake: Notify,
}

static POLLER: OnceLock<Poller> = OnceLock::new();

/// Starts the poller on the current tokio runtime with the given largest
/// window (zero: no polling). Later calls do nothing.
pub fn install(max_window: Duration) {
    if max_window.is_zero() || POLLER.get().is_some() {
        return;
    }
    let max_ns = u64::try_from(max_window.as_nanos()).unwrap_or(u64::MAX);
    let p = POLLER.get_or_init(|| Poller {
        start: Instant::now(),
        max_ns,
        last: AtomicU64::new(0),
        sleeping: AtomicBool::new(true),
        wake: Notify::new(),
    });
    tokio::spawn(p.run());
}

/// Client activity: keep polling (or start again).
#[inline]
pub fn touch() {
    if let Some(p) = POLLER.get() {
        p.last.store(p.now(), Ordering::Relaxed);
        if p.sleeping.load(Ordering::Relaxed) && p.sleeping.swap(false, Ordering::AcqRel) {
            p.wake.notify_one();
        }
    }
}

/// The window after a sleep of `slept` ns that followed a poll of `window`
/// ns, with `max` the largest window.
fn next_window(window: u64, slept: u64, max: u64) -> u64 {
    if slept <= max {
        // A longer poll would have caught it.
        window.saturating_mul(2).max(GROW_START_NS).min(max)
    } else if window / 2 < GROW_START_NS.min(max) {
        0
    } else {
        window / 2
    }
}

impl Poller {
    fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    async fn run(&'static self) {
        let mut window = self.max_ns;
        loop {
            // Poll until no touch for a whole window, or a long operation
            // is in flight.
            loop {
                let quiet = self.now().saturating_sub(self.last.load(Ordering::Relaxed));
                if quiet >= window || long_in_flight() {
                    break;
                }
                tokio::task::yield_now().await;
            }
            self.sleeping.store(true, Ordering::SeqCst);
            let slept_from = self.now();
            // A touch between the last check and `sleeping` finds the flag
            // still false and does not notify: look once more.
            if window > 0
                && !long_in_flight()
                && self.last.load(Ordering::SeqCst) > slept_from.saturating_sub(window)
            {
                self.sleeping.store(false, Ordering::SeqCst);
                continue;
            }
            let gated = long_in_flight();
            self.wake.notified().await;
            if !gated {
                let slept = self.now().saturating_sub(slept_from);
                window = next_window(window, slept, self.max_ns);
            }
        }
    }
}

/// Lets the tasks that are ready now run before the caller goes on: the
/// caller goes to the back of its worker's run queue, once.
///
/// Unlike `tokio::task::yield_now`, which defers the caller until the
/// worker has polled its I/O driver (an `epoll_wait` with a zero timeout
/// each time the run queue drains), this costs no system call. It is for
/// batching: a writer that lets the other tasks queue their frames first,
/// a submitter that lets them queue their disk requests. Those tasks were
/// woken already; what the driver would add is whatever became ready in the
/// meantime, which the next pass takes.
pub async fn yield_to_ready() {
    YieldToReady(false).await
}

struct YieldToReady(bool);

impl std::future::Future for YieldToReady {
    type Output = ();

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        if self.0 {
            return std::task::Poll::Ready(());
        }
        self.0 = true;
        // Woken while running: the scheduler puts the task at the back of
        // the local run queue (tokio treats a self-wake as a yield).
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u64 = 200_000;

    #[test]
    fn a_short_sleep_grows_the_window_up_to_the_max() {
        assert_eq!(next_window(0, 60_000, MAX), GROW_START_NS);
        assert_eq!(next_window(GROW_START_NS, 60_000, MAX), 50_000);
        assert_eq!(next_window(150_000, 10_000, MAX), MAX);
        assert_eq!(next_window(MAX, MAX, MAX), MAX);
    }

    #[test]
    fn a_long_sleep_halves_the_window_down_to_nothing() {
        assert_eq!(next_window(MAX, MAX + 1, MAX), 100_000);
        assert_eq!(next_window(50_000, 1_000_000_000, MAX), GROW_START_NS);
        assert_eq!(next_window(GROW_START_NS, 1_000_000_000, MAX), 0);
        assert_eq!(next_window(0, 1_000_000_000, MAX), 0);
    }

    #[test]
    fn a_max_below_the_start_still_grows_and_shrinks() {
        assert_eq!(next_window(0, 5_000, 10_000), 10_000);
        assert_eq!(next_window(10_000, 20_000, 10_000), 0);
    }
}
