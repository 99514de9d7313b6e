//! The minimum response rate's window (`min_response_rate`), as the timer
//! keeps it for one stream.
//!
//! Nothing here runs on the data path: the timer compares the stream's byte
//! counter and the time it waited on its reader with the marks taken when
//! the window began, about once per window.

use std::sync::atomic::Ordering;

use crate::sync::{AtomicU64, nanos};

use super::policy::MinRate;

/// A stream's minimum response rate and where its current window began.
/// Only the timer reads and writes the marks, under the lock of the
/// stream's shard; boxed in the record, so that a stream without the
/// setting pays one word.
pub(crate) struct RateWatch {
    rate: MinRate,
    /// When the timer checks next, ns on the guard's clock.
    check_at: AtomicU64,
    /// The response bytes and the time blocked on the reader (ns) when the
    /// window began.
    mark_bytes: AtomicU64,
    mark_blocked: AtomicU64,
}

impl RateWatch {
    /// The watch of a stream that started at `start_ns`: its first window
    /// begins then, with nothing sent and nothing waited.
    pub(crate) fn new(rate: MinRate, start_ns: u64) -> Self {
        RateWatch {
            rate,
            check_at: AtomicU64::new(start_ns.saturating_add(nanos(Some(rate.window)))),
            mark_bytes: AtomicU64::new(0),
            mark_blocked: AtomicU64::new(0),
        }
    }

    pub(crate) fn rate(&self) -> MinRate {
        self.rate
    }

    /// When the timer checks next, ns on the guard's clock.
    pub(crate) fn check_at(&self) -> u64 {
        self.check_at.load(Ordering::Relaxed)
    }

    /// The check, at `now`, with the stream's response `bytes` so far and
    /// the time it has waited on its reader (`blocked`, ns): whether the
    /// reader took fewer bytes than the rate asks for over a window's worth
    /// of waiting. Otherwise moves the next check past `now` (a new window
    /// once enough moved; else the earliest the wait could fill the window).
    pub(crate) fn too_slow(&self, now: u64, bytes: u64, blocked: u64) -> bool {
        let window = nanos(Some(self.rate.window));
        let moved = bytes.wrapping_sub(self.mark_bytes.load(Ordering::Relaxed));
        let waited = blocked.saturating_sub(self.mark_blocked.load(Ordering::Relaxed));
        let next = if moved >= self.rate.bytes {
            self.mark_bytes.store(bytes, Ordering::Relaxed);
            self.mark_blocked.store(blocked, Ordering::Relaxed);
            now.saturating_add(window)
        } else if waited >= window {
            return true;
        } else {
            now.saturating_add(window - waited)
        };
        self.check_at.store(next, Ordering::Relaxed);
        false
    }
}
