//! Live counters of a guard: a snapshot costs a few atomic loads.
//!
//! The counters are bumped once per stream, when it ends (relaxed atomics);
//! nothing is counted per frame. They agree with the end events: after every
//! stream has ended, each count equals the number of events with that reason.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::{
    end::{EndReason, Ending, ROWS, StreamCap},
    json::JsonLine,
};

/// End counters of one guard layer, one per [`Ending`] (finer than
/// [`EndReason`]; a snapshot sums them per reason).
#[derive(Default)]
pub(crate) struct Counters {
    ended: [AtomicU64; Ending::ALL.len()],
}

impl Counters {
    pub(crate) fn count(&self, ending: Ending) {
        self.ended[usize::from(ending.code()) - 1].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self, active: usize) -> GuardStats {
        let mut ended = [0; EndReason::ALL.len()];
        for (row, counter) in ROWS.iter().zip(&self.ended) {
            ended[slot(row.reason)] += counter.load(Ordering::Relaxed);
        }
        GuardStats {
            active: active as u64,
            ended,
        }
    }
}

/// Where `reason` is counted in a snapshot: its place in [`EndReason::ALL`].
fn slot(reason: EndReason) -> usize {
    EndReason::ALL
        .iter()
        .position(|r| *r == reason)
        .unwrap_or_default()
}

/// A snapshot of a guard's counters, from
/// [`StreamGuardLayer::stats`](crate::StreamGuardLayer::stats).
///
/// ```
/// use tower_stream_guard::{EndReason, StreamCap, StreamGuardLayer};
///
/// # fn main() -> Result<(), tower_stream_guard::ConfigError> {
/// let guard = StreamGuardLayer::builder().max_streams_per_connection(8).build()?;
/// let stats = guard.stats();
/// assert_eq!(stats.active(), 0);
/// assert_eq!(stats.ended(EndReason::Rejected(StreamCap::PerConnection)), 0);
/// println!("{}", stats.to_json());
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuardStats {
    active: u64,
    ended: [u64; EndReason::ALL.len()],
}

impl GuardStats {
    /// Streams that have started and not yet ended, less those still
    /// waiting for a cap slot
    /// ([`cap_wait`](crate::StreamGuardBuilder::cap_wait)).
    pub fn active(&self) -> u64 {
        self.active
    }

    /// Streams that ended with exactly `reason` (idle timeouts count per
    /// direction, rejections per cap).
    pub fn ended(&self, reason: EndReason) -> u64 {
        self.ended[slot(reason)]
    }

    /// Streams that ended, for any reason (rejections included).
    pub fn ended_total(&self) -> u64 {
        self.ended.iter().sum()
    }

    /// Idle timeouts, all directions together.
    pub fn idle_timeouts(&self) -> u64 {
        EndReason::ALL
            .iter()
            .filter(|r| matches!(r, EndReason::IdleTimeout(_)))
            .map(|r| self.ended(*r))
            .sum()
    }

    /// Streams refused by `cap`.
    pub fn rejected(&self, cap: StreamCap) -> u64 {
        self.ended(EndReason::Rejected(cap))
    }

    /// The snapshot as one line of JSON: `active`, then one key per reason
    /// (`completed`, `cancelled`, `idle_timeout_request`,
    /// `idle_timeout_response`, `idle_timeout_both`, `lifetime_exceeded`,
    /// `error`, `rejected_per_connection`, `rejected_per_peer`,
    /// `rejected_total`, `drained`, `panicked`, `slow_reader`, `peer_unreachable`).
    pub fn to_json(&self) -> String {
        let mut line = JsonLine::new();
        line.num("active", self.active);
        for reason in EndReason::ALL {
            line.num(reason.key(), self.ended(reason));
        }
        line.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_own_counter() {
        let counters = Counters::default();
        for (n, reason) in EndReason::ALL.iter().enumerate() {
            for _ in 0..=n {
                counters.count(Ending::of(*reason));
            }
        }
        // Finer endings count under their reason.
        counters.count(Ending::CancelledByHandle);
        counters.count(Ending::DrainRefused);
        let stats = counters.snapshot(3);
        for (n, reason) in EndReason::ALL.iter().enumerate() {
            let finer = matches!(reason, EndReason::Cancelled | EndReason::Drained);
            assert_eq!(
                stats.ended(*reason),
                n as u64 + 1 + u64::from(finer),
                "{reason:?}"
            );
        }
        assert_eq!(stats.idle_timeouts(), 3 + 4 + 5);
        assert_eq!(stats.rejected(StreamCap::Total), 10);
        assert_eq!(stats.ended_total(), (1..=14).sum::<u64>() + 2);
        assert_eq!(
            stats.to_json(),
            "{\"active\":3,\"completed\":1,\"cancelled\":3,\"idle_timeout_request\":3,\"idle_timeout_response\":4,\"idle_timeout_both\":5,\"lifetime_exceeded\":6,\"error\":7,\"rejected_per_connection\":8,\"rejected_per_peer\":9,\"rejected_total\":10,\"drained\":12,\"panicked\":12,\"slow_reader\":13,\"peer_unreachable\":14}"
        );
    }
}
