//! Live counters of a guard: a snapshot costs a few atomic loads.
//!
//! The counters are bumped once per stream, when it ends (relaxed atomics);
//! nothing is counted per frame. They agree with the end events: after every
//! stream has ended, each count equals the number of events with that reason.

use std::{
    fmt::Write as _,
    sync::atomic::{AtomicU64, Ordering},
};

use crate::end::{EndReason, IdleDirection, StreamCap};

/// Every reason a stream can end with, in the order of its code.
pub(crate) const REASONS: [EndReason; 12] = [
    EndReason::Completed,
    EndReason::Cancelled,
    EndReason::IdleTimeout(IdleDirection::Request),
    EndReason::IdleTimeout(IdleDirection::Response),
    EndReason::IdleTimeout(IdleDirection::Both),
    EndReason::LifetimeExceeded,
    EndReason::Error,
    EndReason::Rejected(StreamCap::PerConnection),
    EndReason::Rejected(StreamCap::PerPeer),
    EndReason::Rejected(StreamCap::Total),
    EndReason::Drained,
    EndReason::Panicked,
];

/// Per-reason end counters of one guard layer.
#[derive(Default)]
pub(crate) struct Counters {
    ended: [AtomicU64; REASONS.len()],
}

impl Counters {
    fn slot(reason: EndReason) -> usize {
        // Codes start at 1 and follow `REASONS`.
        usize::from(reason.code()) - 1
    }

    pub(crate) fn count(&self, reason: EndReason) {
        self.ended[Self::slot(reason)].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self, active: usize) -> GuardStats {
        let mut ended = [0; REASONS.len()];
        for (slot, counter) in ended.iter_mut().zip(&self.ended) {
            *slot = counter.load(Ordering::Relaxed);
        }
        GuardStats {
            active: active as u64,
            ended,
        }
    }
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
    ended: [u64; REASONS.len()],
}

impl GuardStats {
    /// Streams that have started and not yet ended.
    pub fn active(&self) -> u64 {
        self.active
    }

    /// Streams that ended with exactly `reason` (idle timeouts count per
    /// direction, rejections per cap).
    pub fn ended(&self, reason: EndReason) -> u64 {
        self.ended[Counters::slot(reason)]
    }

    /// Streams that ended, for any reason (rejections included).
    pub fn ended_total(&self) -> u64 {
        self.ended.iter().sum()
    }

    /// Idle timeouts, all directions together.
    pub fn idle_timeouts(&self) -> u64 {
        REASONS
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
    /// `rejected_total`, `drained`, `panicked`).
    pub fn to_json(&self) -> String {
        let mut out = format!("{{\"active\":{}", self.active);
        for reason in REASONS {
            let name = match reason {
                EndReason::IdleTimeout(direction) => format!("idle_timeout_{direction}"),
                EndReason::Rejected(cap) => format!("rejected_{}", cap.as_str()),
                other => other.as_str().to_owned(),
            };
            let _ = write!(out, ",\"{name}\":{}", self.ended(reason));
        }
        out.push('}');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_own_counter() {
        let counters = Counters::default();
        for (n, reason) in REASONS.iter().enumerate() {
            for _ in 0..=n {
                counters.count(*reason);
            }
        }
        let stats = counters.snapshot(3);
        for (n, reason) in REASONS.iter().enumerate() {
            assert_eq!(stats.ended(*reason), n as u64 + 1, "{reason:?}");
        }
        assert_eq!(stats.idle_timeouts(), 3 + 4 + 5);
        assert_eq!(stats.rejected(StreamCap::Total), 10);
        assert_eq!(stats.ended_total(), (1..=12).sum::<u64>());
        assert_eq!(
            stats.to_json(),
            "{\"active\":3,\"completed\":1,\"cancelled\":2,\"idle_timeout_request\":3,\"idle_timeout_response\":4,\"idle_timeout_both\":5,\"lifetime_exceeded\":6,\"error\":7,\"rejected_per_connection\":8,\"rejected_per_peer\":9,\"rejected_total\":10,\"drained\":11,\"panicked\":12}"
        );
    }
}
