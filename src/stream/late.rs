//! Ticks that ran late, and how recent the frames they stamped may be
//! (see the timer's module docs): a bounded map of late stamps.

use std::collections::BTreeMap;

/// How many late ticks a guard remembers at most (see the module docs): the
/// oldest is forgotten first. A runtime whose timer runs late on every tick
/// for longer than this many ticks gets the plain stamps for older frames,
/// which may end a stream up to that tick's delay early.
pub(crate) const LATE_TICKS_KEPT: usize = 4096;

/// Stamps published by ticks that ran late, with when they were replaced.
#[derive(Default)]
pub(crate) struct LateTicks(BTreeMap<u64, u64>);

impl LateTicks {
    /// No late tick.
    pub(crate) const NONE: LateTicks = LateTicks(BTreeMap::new());

    /// The latest time a frame stamped `stamp` may have moved.
    #[inline]
    pub(crate) fn latest(&self, stamp: u64) -> u64 {
        if self.0.is_empty() {
            return stamp;
        }
        self.0.get(&stamp).copied().unwrap_or(stamp)
    }

    /// The tick that published `stamp` was due then but ran at `now`.
    pub(super) fn record(&mut self, stamp: u64, now: u64, keep_for: u64) {
        self.0.insert(stamp, now);
        // A frame older than the longest idle timeout ends its stream
        // whatever its exact time: no need to remember it.
        let horizon = now.saturating_sub(keep_for);
        while self.0.len() > LATE_TICKS_KEPT
            || self
                .0
                .first_key_value()
                .is_some_and(|(_, &ran)| ran < horizon)
        {
            self.0.pop_first();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{LATE_TICKS_KEPT, LateTicks};

    #[test]
    fn late_ticks_say_how_recent_their_frames_may_be_and_are_forgotten_in_time() {
        let mut late = LateTicks::default();
        assert_eq!(late.latest(10), 10, "nothing late: the stamp stands");
        late.record(10, 800, 1_000);
        assert_eq!(late.latest(10), 800);
        assert_eq!(late.latest(20), 20, "other stamps stand");
        // Past the longest idle timeout, the entry is of no use any more.
        late.record(3_000, 3_500, 1_000);
        assert_eq!(late.latest(10), 10);
        assert_eq!(late.latest(3_000), 3_500);
        for stamp in 0..2 * LATE_TICKS_KEPT as u64 {
            late.record(10_000 + stamp, 20_000 + stamp, u64::MAX);
        }
        assert_eq!(late.0.len(), LATE_TICKS_KEPT, "bounded");
        assert_eq!(late.latest(10_000), 10_000, "the oldest went first");
    }
}
