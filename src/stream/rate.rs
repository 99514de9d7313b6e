//! The minimum response rate's window (`min_response_rate`), as the timer
//! keeps it for one stream.
//!
//! Nothing here runs on the data path: the timer compares the stream's byte
//! and frame counters and the time it waited on its reader with the marks
//! taken when the window began, about once per window.
//!
//! Bytes count when the body hands them to hyper, and hyper's HTTP/2 sender
//! takes a frame whole: it holds it until the stream has send capacity,
//! hands it to h2 (which buffers all of it) and only then polls the body
//! for the next, which it holds in turn. A body of large frames is thus
//! credited a frame at a time and then waits while the reader drains it,
//! with nothing more credited: judged window by window, a reader twenty
//! times faster than the rate would be cut at the second window. So the
//! bytes a window did not need are carried into the next windows as credit
//! (spent at the rate's `bytes` per window), but no more than what may still
//! be waiting unread at hyper and h2: two frames' worth, taking a frame as
//! large as the window's average. A reader that falls behind is cut once its
//! credit is spent, at most two frames' time at the minimum rate later than
//! without it. Nothing per frame: the counters are the ones the body keeps.

use std::sync::atomic::Ordering;

use crate::{
    events::Traffic,
    sync::{AtomicU64, nanos},
};

use super::policy::MinRate;

/// How many frames of credit a stream may carry (see the module docs): the
/// one hyper holds waiting for capacity, and the one h2 buffers before it.
const FRAMES_UNREAD: u64 = 2;

/// A stream's minimum response rate and where its current window began.
/// Only the timer reads and writes the marks, under the lock of the
/// stream's shard; boxed in the record, so that a stream without the
/// setting pays one word.
pub(crate) struct RateWatch {
    rate: MinRate,
    /// When the timer checks next, ns on the guard's clock.
    check_at: AtomicU64,
    /// The response bytes and frames and the time blocked on the reader (ns)
    /// when the window began.
    mark_bytes: AtomicU64,
    mark_frames: AtomicU64,
    mark_blocked: AtomicU64,
    /// Bytes handed on before the window began that earlier windows did not
    /// need, and which count towards this one.
    credit: AtomicU64,
}

impl RateWatch {
    /// The watch of a stream that started at `start_ns`: its first window
    /// begins then, with nothing sent, nothing waited and no credit.
    pub(crate) fn new(rate: MinRate, start_ns: u64) -> Self {
        RateWatch {
            rate,
            check_at: AtomicU64::new(start_ns.saturating_add(nanos(Some(rate.window)))),
            mark_bytes: AtomicU64::new(0),
            mark_frames: AtomicU64::new(0),
            mark_blocked: AtomicU64::new(0),
            credit: AtomicU64::new(0),
        }
    }

    pub(crate) fn rate(&self) -> MinRate {
        self.rate
    }

    /// When the timer checks next, ns on the guard's clock.
    pub(crate) fn check_at(&self) -> u64 {
        self.check_at.load(Ordering::Relaxed)
    }

    /// The check, at `now`, with the stream's response traffic so far
    /// (`sent`) and the time it has waited on its reader (`blocked`, ns):
    /// whether the reader took fewer bytes than the rate asks for (counting
    /// the credit carried in) over a window's worth of waiting. Otherwise
    /// moves the next check past `now`: a new window once enough moved,
    /// with what it did not need carried on; else the earliest the wait
    /// could fill the window.
    pub(crate) fn too_slow(&self, now: u64, sent: Traffic, blocked: u64) -> bool {
        let window = nanos(Some(self.rate.window));
        let moved = sent
            .bytes
            .wrapping_sub(self.mark_bytes.load(Ordering::Relaxed));
        let credit = self.credit.load(Ordering::Relaxed);
        let waited = blocked.saturating_sub(self.mark_blocked.load(Ordering::Relaxed));
        let have = moved.saturating_add(credit);
        let next = if have >= self.rate.bytes {
            let frames = sent
                .frames
                .wrapping_sub(self.mark_frames.load(Ordering::Relaxed));
            // What may still wait unread at hyper and h2, for the frames of
            // this window; a window without frames earns nothing new.
            let unread = moved
                .checked_div(frames)
                .map_or(0, |frame| frame.saturating_mul(FRAMES_UNREAD));
            let kept = (have - self.rate.bytes).min(unread.max(credit));
            self.credit.store(kept, Ordering::Relaxed);
            self.mark_bytes.store(sent.bytes, Ordering::Relaxed);
            self.mark_frames.store(sent.frames, Ordering::Relaxed);
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

#[cfg(all(test, not(stream_guard_loom)))]
mod tests {
    use std::time::Duration;

    use super::*;

    const MS: u64 = 1_000_000;
    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * KIB;

    /// A stream's response as the timer sees it: frames handed to hyper,
    /// and the time spent waiting on the reader.
    #[derive(Default)]
    struct Stream {
        sent: Traffic,
        blocked: u64,
    }

    impl Stream {
        fn hand(&mut self, bytes: u64) {
            self.sent.frames += 1;
            self.sent.bytes += bytes;
        }
    }

    /// The review's setting (issue 30): 32 KiB per 250 ms, 128 KiB/s.
    fn watch(bytes: u64) -> RateWatch {
        let rate = MinRate {
            bytes,
            window: Duration::from_millis(250),
        };
        RateWatch::new(rate, 0)
    }

    /// Runs the timer's checks on `watch` as the timer would, while a
    /// response of `frames` frames of `frame` bytes goes to a reader that
    /// drains `per_ms` bytes a millisecond, the body blocked all the while,
    /// as hyper's HTTP/2 sender handles it: it holds one frame and h2
    /// buffers the one before, and the body is polled for the next frame
    /// once h2's has drained. Returns when the check said too slow (ms), or
    /// `None` once the last frame was handed on (the stream's end).
    fn drained(watch: &RateWatch, frames: u64, frame: u64, per_ms: u64) -> Option<u64> {
        let mut stream = Stream::default();
        // Two frames at once: one to h2, the next held by hyper.
        stream.hand(frame);
        stream.hand(frame);
        let mut handed = 2;
        let mut read = 0;
        for now in (1..).map(|ms| ms * MS) {
            stream.blocked = now;
            read += per_ms;
            // h2's frame drained: hyper passes on its own and polls again.
            if read >= (handed - 1) * frame {
                stream.hand(frame);
                handed += 1;
                if handed == frames {
                    return None;
                }
            }
            if now >= watch.check_at() && watch.too_slow(now, stream.sent, stream.blocked) {
                return Some(now / MS);
            }
        }
        unreachable!()
    }

    #[test]
    fn a_fast_reader_of_large_frames_is_never_too_slow() {
        // 2.6 MB/s, twenty times the rate, of 2 MiB frames.
        assert_eq!(drained(&watch(32 * KIB), 64, 2 * MIB, 2600), None);
    }

    #[test]
    fn a_reader_just_above_the_rate_is_never_too_slow() {
        // 160 KB/s against 128 KiB/s: a 2 MiB frame every 13 s.
        assert_eq!(drained(&watch(32 * KIB), 8, 2 * MIB, 160), None);
    }

    #[test]
    fn a_slow_reader_of_large_frames_is_cut_once_its_credit_is_spent() {
        // 16 KB/s, an eighth of the rate: the two frames hyper took at first
        // (4 MiB) cover 32 s at 128 KiB/s, then one window of waiting.
        let cut = drained(&watch(32 * KIB), 8, 2 * MIB, 16).expect("cut");
        assert!((32_000..=32_500).contains(&cut), "cut at {cut} ms");
    }

    #[test]
    fn a_reader_just_below_the_rate_is_cut_in_the_end() {
        // 115 KB/s against 128 KiB/s: each frame takes longer to drain
        // than its credit lasts.
        let cut = drained(&watch(32 * KIB), 1000, 2 * MIB, 115).expect("cut");
        assert!(cut > 32_000, "cut at {cut} ms");
    }

    #[test]
    fn credit_is_capped_at_two_of_the_windows_frames() {
        let watch = watch(32 * KIB);
        let mut stream = Stream::default();
        // A fast reader of 16 KiB frames: 50 MiB in the first window.
        for _ in 0..3200 {
            stream.hand(16 * KIB);
        }
        stream.blocked = 250 * MS;
        assert!(!watch.too_slow(250 * MS, stream.sent, stream.blocked));
        assert_eq!(watch.credit.load(Ordering::Relaxed), 32 * KIB);
        // It stops reading: one window the credit covers, then the cut.
        stream.blocked = 500 * MS;
        assert!(!watch.too_slow(500 * MS, stream.sent, stream.blocked));
        stream.blocked = 750 * MS;
        assert!(watch.too_slow(750 * MS, stream.sent, stream.blocked));
    }

    #[test]
    fn small_frames_below_the_rate_are_cut_after_one_window() {
        let watch = watch(32 * KIB);
        let mut stream = Stream::default();
        // 16 KiB per window of waiting, half the rate.
        stream.hand(16 * KIB);
        stream.blocked = 250 * MS;
        assert!(watch.too_slow(250 * MS, stream.sent, stream.blocked));
    }
}
