//! What a guard layer tells about its streams: the end events, the counters
//! behind [`GuardStats`], and the `tracing` lines (refusals summed up).

use std::{
    sync::atomic::{AtomicU8, AtomicU64, Ordering},
    time::Duration,
};

use tokio::sync::broadcast;

use crate::{
    end::{Ending, Log, StreamCap},
    events::{EndCallback, EndEvent, EventHub},
    meter::{PathLabels, RouteOf},
    stats::{Counters, GuardStats},
    sync::AtomicU64 as Word,
};

/// How often, at most, a guard logs a summary of the streams its caps refused.
const SUMMARY_EVERY_NS: u64 = 1_000_000_000;

/// The bit of [`Report`]'s `streams` word that the layer's drain sets as it
/// begins.
const DRAINING: u64 = 1 << 63;

/// One stream waiting for cap slots (`cap_wait`), in the `streams` word:
/// bits 32 to 62 count them.
const WAITING: u64 = 1 << 32;

/// The bits of the `streams` word that count the open streams.
const OPEN: u64 = WAITING - 1;

/// One guard layer's reporting: events, counters, logs.
pub(crate) struct Report {
    events: EventHub,
    /// The streams started and not yet ended (the low 32 bits), those of
    /// them still waiting for cap slots (the next 31), and (the top bit)
    /// whether the layer's drain has begun. One word, so that a stream
    /// starting and a drain beginning are ordered by a single
    /// read-modify-write each: the stream either saw the bit (and is
    /// refused) or was counted by the drain (and is admitted); never both,
    /// never neither. And so that a snapshot never counts a waiter as
    /// active.
    streams: Word,
    counters: Counters,
    refusals: RefusalLog,
    /// Which keyed caps already warned that a stream had no key (a bit per
    /// cap): the warning is logged once per guard layer.
    warned_unidentified: AtomicU8,
    /// Records metrics (`StreamGuardBuilder::metrics`), with the gRPC
    /// paths the `route` label may take (`max_path_labels`).
    metrics: Option<PathLabels>,
}

impl Report {
    /// `path_labels`: `None` records no metrics; else how many gRPC paths
    /// the `route` label may take.
    pub(crate) fn new(
        capacity: usize,
        callbacks: Vec<EndCallback>,
        path_labels: Option<usize>,
    ) -> Self {
        Report {
            metrics: path_labels.map(PathLabels::new),
            events: EventHub::new(capacity, callbacks),
            streams: Word::new(0),
            counters: Counters::default(),
            refusals: RefusalLog::default(),
            warned_unidentified: AtomicU8::new(0),
        }
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<EndEvent> {
        self.events.subscribe()
    }

    /// Streams admitted and not yet ended: started, less those still
    /// waiting for cap slots.
    pub(crate) fn active(&self) -> usize {
        let streams = self.streams.load(Ordering::Acquire);
        let waiting = (streams & !DRAINING) / WAITING;
        ((streams & OPEN) - waiting) as usize
    }

    /// Streams started and not yet ended, waiting ones included: what a
    /// drain waits for.
    pub(crate) fn open(&self) -> usize {
        (self.streams.load(Ordering::Acquire) & OPEN) as usize
    }

    pub(crate) fn stats(&self) -> GuardStats {
        self.counters.snapshot(self.active())
    }

    /// A stream started, `waiting` for cap slots or not: counts it, and says
    /// whether the layer's drain had begun (the stream is then refused; the
    /// drain did not count it open).
    pub(crate) fn started(&self, waiting: bool) -> bool {
        let one = if waiting { 1 + WAITING } else { 1 };
        let before = self.streams.fetch_add(one, Ordering::Relaxed);
        if self.metrics.is_some() {
            crate::meter::stream_started();
        }
        before & DRAINING != 0
    }

    /// The layer's drain begins: every stream that starts from now on is
    /// refused. Says how many are open (each of them was admitted).
    pub(crate) fn begin_drain(&self) -> usize {
        (self.streams.fetch_or(DRAINING, Ordering::AcqRel) & OPEN) as usize
    }

    /// A waiting stream was admitted: it counts as active from now on.
    pub(crate) fn admitted(&self) {
        self.streams.fetch_sub(WAITING, Ordering::AcqRel);
    }

    /// A stream ended as `ending`, `now_ns` on the guard's clock, while
    /// `waiting` for cap slots or not: counts it (and records its metrics),
    /// hands its event to every subscriber and logs it.
    /// `route` is asked only when metrics are on.
    pub(crate) fn ended(
        &self,
        ending: Ending,
        event: &EndEvent,
        route: impl FnOnce() -> RouteOf,
        now_ns: u64,
        waiting: bool,
    ) {
        if let Some(paths) = &self.metrics {
            crate::meter::stream_ended(event, route(), paths);
        }
        if let Some(cap) = event.reason().cap() {
            self.refusals.note(cap);
            if matches!(
                ending,
                Ending::RejectedNoConnection | Ending::RejectedNoPeer
            ) {
                self.warn_unidentified(cap, ending);
            }
        }
        // On every end, not only refusals: the tail of a burst is reported
        // by the next stream to end after the second is up.
        self.refusals.summarize(now_ns);
        self.counters.count(ending);
        let one = if waiting { 1 + WAITING } else { 1 };
        self.streams.fetch_sub(one, Ordering::AcqRel);
        self.events.emit(event);
        // Last: a tracing layer that panics here (the timer catches it)
        // must not leave the stream uncounted, active and without its event.
        trace_end(ending, event);
    }

    /// Logs, once per guard layer and cap, that `cap` refuses streams that
    /// carry no key for it: a misconfigured server should not stay quiet.
    fn warn_unidentified(&self, cap: StreamCap, ending: Ending) {
        let bit = 1 << (cap as u8);
        if self.warned_unidentified.fetch_or(bit, Ordering::Relaxed) & bit == 0 {
            tracing::warn!(
                target: "tower_stream_guard",
                cap = cap.as_str(),
                "{} (logged once per guard layer)",
                ending.message(Duration::ZERO, 0)
            );
        }
    }
}

/// Logs one end: `INFO` for a limit or a drain, `DEBUG` otherwise (a cap
/// flood is one `DEBUG` line per stream; [`RefusalLog`] sums them at `WARN`).
fn trace_end(ending: Ending, event: &EndEvent) {
    macro_rules! end_line {
        ($level:expr, $($message:tt)+) => {
            tracing::event!(
                target: "tower_stream_guard",
                $level,
                stream_id = event.id().get(),
                route = event.path(),
                reason = event.reason().as_str(),
                duration_ms = event.duration().as_millis() as u64,
                $($message)+
            )
        };
    }
    match ending.row().log {
        Log::Refused => end_line!(tracing::Level::DEBUG, "stream refused: {}", event.reason()),
        Log::Guard => end_line!(
            tracing::Level::INFO,
            "stream ended by guard: {}",
            event.reason()
        ),
        Log::Quiet => end_line!(tracing::Level::DEBUG, "stream ended"),
    }
}

/// Refusals by cap since the last `WARN` summary, and when that was. A cap
/// flood is one `DEBUG` line per stream and at most one `WARN` line per guard
/// per second, not one `INFO` line per stream.
#[derive(Default)]
struct RefusalLog {
    /// By [`StreamCap::ALL`] index.
    counts: [AtomicU64; 3],
    /// The sum of `counts`: one load tells whether there is anything to say.
    pending: AtomicU64,
    /// One more than the guard-clock ns of the last summary; 0: none yet.
    last: AtomicU64,
}

impl RefusalLog {
    fn note(&self, cap: StreamCap) {
        let index = StreamCap::ALL.iter().position(|c| *c == cap).unwrap_or(0);
        self.counts[index].fetch_add(1, Ordering::Relaxed);
        self.pending.fetch_add(1, Ordering::Relaxed);
    }

    /// Logs one `WARN` line for the refusals counted since the last one, if
    /// there are some and that was a second ago or more (the first refusal
    /// of a guard is reported at once).
    fn summarize(&self, now: u64) {
        if self.pending.load(Ordering::Relaxed) == 0 {
            return;
        }
        let last = self.last.load(Ordering::Relaxed);
        let since = last.saturating_sub(1);
        if last != 0 && now.saturating_sub(since) < SUMMARY_EVERY_NS {
            return;
        }
        // One summary per window, whoever gets here first.
        if self
            .last
            .compare_exchange(
                last,
                now.saturating_add(1),
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_err()
        {
            return;
        }
        let counts = self
            .counts
            .each_ref()
            .map(|count| count.swap(0, Ordering::Relaxed));
        let refused: u64 = counts.iter().sum();
        self.pending.fetch_sub(refused, Ordering::Relaxed);
        if refused == 0 {
            return;
        }
        let mut caps = StreamCap::ALL
            .iter()
            .zip(counts)
            .filter(|(_, n)| *n > 0)
            .map(|(cap, n)| (cap.setting(), n));
        let by = match (caps.next(), caps.next()) {
            (Some((setting, _)), None) => setting.to_owned(),
            (first, second) => first
                .into_iter()
                .chain(second)
                .chain(caps)
                .map(|(setting, n)| format!("{setting}: {n}"))
                .collect::<Vec<_>>()
                .join(", "),
        };
        let [per_connection, per_peer, total] = counts;
        // The first summary covers the refusals so far, not a window.
        let window = if last == 0 {
            "so far".to_owned()
        } else {
            format!(
                "in the last {:.1}s",
                Duration::from_nanos(now - since).as_secs_f64()
            )
        };
        tracing::warn!(
            target: "tower_stream_guard",
            refused,
            per_connection,
            per_peer,
            total,
            "{refused} streams refused by {by} {window}"
        );
    }
}
