//! The per-stream record: what the data path reads and writes.
//!
//! The request body, the response future, the response body, the handler's
//! [`StreamHandle`](crate::StreamHandle) and the timer all reach the same
//! [`Record`]. Data-path fields are written by one body each, with relaxed
//! loads and stores (no locked instruction). The end is decided by one
//! compare-and-swap of [`phase`](Record::is_ended); what happens then is in
//! `ending.rs`, and the [`Ticket`](super::ticket::Ticket) that owns a stream
//! makes sure it happens.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use tokio::time::Instant;

use super::{
    ending::{After, BODY_NONE, BODY_WAITING},
    late::LateTicks,
    policy::{MinRate, Policy},
    rate::RateWatch,
    shared::Shared,
};
use crate::meter::RouteOf;
use crate::{
    end::{EndReason, Ending, IdleDirection},
    events::{StreamId, Traffic},
    sync::{AtomicBool, AtomicU8, AtomicU64, AtomicWaker, NEVER, fence, nanos},
};

/// `phase` while the stream is open; afterwards the [`Ending`]'s code.
const OPEN: u8 = 0;

/// The bit of `Record::route` set when the service accepted the call (see
/// `RouteOf::accepted`): for metrics, the path may become a label value.
const ACCEPTED: u8 = 0x80;

/// The bit of the response side's `frames` set while the response body has
/// handed a frame to hyper and waits to be polled again: the peer has it
/// to read (see [`Record::note_response_frame`]). Set by the store that
/// counts the frame, so it costs the data path nothing.
const WAITING: u64 = 1 << 63;

/// The timer key of a stream that has a time limit none of which can fire
/// now (a request idle timeout once the request ended, on a stream with no
/// other limit): filed under it, the stream never comes due, but it keeps
/// the timer's coarse clock running, which measures the time the stream
/// waits on its reader ([`Record::blocked_ns`]). Without it, that time
/// would depend on whether some other stream happened to keep the clock
/// running.
const CLOCK_ONLY: u64 = NEVER - 1;

/// Counters of one direction, written only by that direction's body.
#[derive(Default)]
pub(crate) struct Side {
    /// Frames counted; on the response side, [`WAITING`] too.
    frames: AtomicU64,
    bytes: AtomicU64,
    /// Coarse time of the last frame, ns since the guard's origin.
    last: AtomicU64,
}

impl Side {
    pub(crate) fn traffic(&self) -> Traffic {
        Traffic {
            frames: self.frames.load(Ordering::Relaxed) & !WAITING,
            bytes: self.bytes.load(Ordering::Relaxed),
        }
    }

    #[inline]
    pub(super) fn note(&self, bytes: usize, stamp: u64) {
        self.count(bytes);
        self.last.store(stamp, Ordering::Relaxed);
    }

    /// Counts a frame that moved without marking activity.
    #[inline]
    fn count(&self, bytes: usize) {
        // One writer per side: plain load and store, no locked instruction.
        let frames = self.frames.load(Ordering::Relaxed);
        self.frames.store(frames.wrapping_add(1), Ordering::Relaxed);
        self.add_bytes(bytes);
    }

    #[inline]
    fn add_bytes(&self, bytes: usize) {
        let total = self.bytes.load(Ordering::Relaxed);
        self.bytes
            .store(total.wrapping_add(bytes as u64), Ordering::Relaxed);
    }
}

/// What the timer decides for a stream whose filing came due.
pub(crate) enum Verdict {
    Expired(Ending),
    Later,
}

/// Laid out by hand (`repr(C)`): the request body and the response body run
/// on different tasks, often on different cores, and each writes its side's
/// counters on every frame. Sharing one cache line, the two sides would
/// take it from each other's core on every frame (false sharing); so the
/// request side comes first, the response side last, and what both read on
/// every frame (`shared`, `phase`) sits in between, on a line neither writes
/// per frame. A unit test below keeps them apart.
#[repr(C)]
pub(crate) struct Record {
    /// Written by the request body on every frame.
    pub(super) request: Side,
    // Only an end takes these wakers out (by waking them): the bodies rely
    // on that to skip registering a waker they already registered.
    pub(crate) request_waker: AtomicWaker,
    idle_both: AtomicU64,
    idle_request: AtomicU64,
    idle_response: AtomicU64,
    lifetime_deadline: AtomicU64,
    /// Start, ns on the guard's clock.
    start_ns: u64,
    /// Read by both bodies on every frame (the timer's coarse clock).
    pub(crate) shared: Arc<Shared>,
    pub(crate) id: StreamId,
    /// Where the timer filed this stream; written under the lock of the
    /// stream's timer shard.
    pub(crate) timer_key: AtomicU64,
    /// [`OPEN`] or the code of the [`Ending`]. Read by both bodies on every
    /// frame.
    phase: AtomicU8,
    request_done: AtomicBool,
    pub(crate) grpc: bool,
    /// The lifetime deadline is the client's `grpc-timeout`, not a setting.
    client_deadline: AtomicBool,
    /// The response body decided the end (`Completed`); the rest of the end
    /// (wake-ups, slots, the event) waits until the body is dropped or polled
    /// again. See `Record::decide_deferred`.
    pub(crate) unfinished: AtomicBool,
    /// The response body's side of the stream, for stalled readers
    /// (`ending::BODY_*`).
    pub(crate) body: AtomicU8,
    /// The code of the ending a guard further along named in
    /// `stream-guard-reason`, 0 for none: a code, never the peer's string.
    /// Here rather than in `after`: it fills padding.
    pub(crate) server_guard_reason: AtomicU8,
    /// For metrics, in one byte that fits in padding: the named route the
    /// stream matched (`route::Route::tag`, the low bits) and [`ACCEPTED`].
    pub(crate) route: AtomicU8,
    /// What the stream's end does and reports: event metadata, slots, its
    /// connection.
    pub(crate) after: After,
    /// The response future's waker, then (once the future has resolved into
    /// the body) the response body's: the two never wait at the same time.
    pub(crate) response_waker: AtomicWaker,
    /// Written by the response body on every frame.
    pub(super) response: Side,
    /// Time the response body waited on the reader, in ns on the coarse
    /// clock, up to the wait in progress (if `response.frames` has
    /// [`WAITING`], since `response.last`). Written by the response body at
    /// most about once per timer tick, never per frame.
    response_blocked: AtomicU64,
    /// `min_response_rate`, if set.
    rate: Option<Box<RateWatch>>,
}

impl Record {
    /// A stream's record, shared, and whether the layer's drain had begun
    /// when it started (the stream is then to be refused); `route` is the
    /// tag of the named route it matched (`route::Route::tag`, 0 for none);
    /// `waiting`, whether it starts waiting for cap slots. Built inside its
    /// `Arc`: the record is moved once.
    pub(crate) fn new(
        shared: &Arc<Shared>,
        policy: &Policy,
        grpc: bool,
        after: After,
        route: u8,
        waiting: bool,
    ) -> (Arc<Self>, bool) {
        let start_ns = shared.timer.ns_of(Instant::now());
        shared.timer.note_idle(policy);
        let draining = shared.report.started(waiting);
        let record = Arc::new(Record {
            request: Side::default(),
            request_waker: AtomicWaker::new(),
            idle_both: AtomicU64::new(nanos(policy.idle_both)),
            idle_request: AtomicU64::new(nanos(policy.idle_request)),
            idle_response: AtomicU64::new(nanos(policy.idle_response)),
            lifetime_deadline: AtomicU64::new(NEVER),
            start_ns,
            shared: Arc::clone(shared),
            id: StreamId::next(),
            timer_key: AtomicU64::new(NEVER),
            phase: AtomicU8::new(OPEN),
            request_done: AtomicBool::new(false),
            grpc,
            client_deadline: AtomicBool::new(false),
            unfinished: AtomicBool::new(false),
            body: AtomicU8::new(if waiting { BODY_WAITING } else { BODY_NONE }),
            server_guard_reason: AtomicU8::new(0),
            route: AtomicU8::new(route),
            after,
            response_waker: AtomicWaker::new(),
            response: Side::default(),
            response_blocked: AtomicU64::new(0),
            rate: policy
                .min_rate
                .map(|rate| Box::new(RateWatch::new(rate, start_ns))),
        });
        record.limit_lifetime(policy.max_lifetime, false);
        #[cfg(feature = "test-view")]
        shared.records.born();
        (record, draining)
    }

    /// A waiting stream was handed its cap slots: it counts as active, and
    /// its idle clocks start now. Does nothing if it has ended meanwhile
    /// (its end counted it as waiting) or was never waiting.
    pub(crate) fn admitted(self: &Arc<Self>) {
        if !self.stops_waiting() {
            return;
        }
        self.shared.report.admitted();
        // No frame moved while it waited: one clock read per admission.
        let now = self.shared.timer.ns_of(Instant::now());
        self.request.last.store(now, Ordering::Relaxed);
        self.response.last.store(now, Ordering::Relaxed);
        self.shared.timer.arm(self);
    }

    /// Brings the lifetime deadline forward to `lifetime` after the start, if
    /// that is earlier; `client` says whether the client's `grpc-timeout`
    /// asked for it.
    pub(crate) fn limit_lifetime(&self, lifetime: Option<Duration>, client: bool) {
        let lifetime = nanos(lifetime);
        if lifetime == NEVER {
            return;
        }
        let deadline = self.start_ns.saturating_add(lifetime);
        let before = self
            .lifetime_deadline
            .fetch_min(deadline, Ordering::Relaxed);
        if deadline < before {
            self.client_deadline.store(client, Ordering::Relaxed);
        }
    }

    #[inline]
    pub(crate) fn note_request_frame(&self, bytes: usize) {
        self.request.note(bytes, self.shared.timer.stamp());
    }

    /// A response data frame the body hands to hyper: counted, the idle
    /// clock reset, and the body waits on the reader from now until it is
    /// polled again. The same two stores as a request frame: the stamp,
    /// then the frame count carrying [`WAITING`] (released, so that whoever
    /// sees the bit sees the stamp the wait started at).
    #[inline]
    pub(crate) fn note_response_frame(&self, bytes: usize) {
        let side = &self.response;
        side.last
            .store(self.shared.timer.stamp(), Ordering::Relaxed);
        let frames = side.frames.load(Ordering::Relaxed);
        side.frames
            .store(frames.wrapping_add(1) | WAITING, Ordering::Release);
        side.add_bytes(bytes);
    }

    /// A response data frame that is a heartbeat (see
    /// [`Heartbeat`](super::heartbeat::Heartbeat)): counted, but the idle
    /// clock is not reset. It has no stamp to start a wait on the reader
    /// at, so the time it waits is not counted as blocked.
    #[inline]
    pub(crate) fn note_response_heartbeat(&self, bytes: usize) {
        let side = &self.response;
        let frames = side.frames.load(Ordering::Relaxed);
        side.frames
            .store(frames.wrapping_add(1) & !WAITING, Ordering::Relaxed);
        side.add_bytes(bytes);
    }

    /// hyper polls the response body again after it handed over a frame
    /// (the body's own note says it did). Per frame this is one load of the
    /// coarse clock and one compare: the wait is only recorded when a tick
    /// passed meanwhile, i.e. when hyper did not poll within the tick.
    #[inline]
    pub(crate) fn response_polled(&self) -> bool {
        let now = self.shared.timer.stamp();
        let since = self.response.last.load(Ordering::Relaxed);
        if now == since {
            return false;
        }
        self.response_waited(now, since);
        true
    }

    /// Records a wait on the reader that lasted from `since` to `now`.
    /// About once per tick at most.
    #[cold]
    #[inline(never)]
    fn response_waited(&self, now: u64, since: u64) {
        self.response_not_waiting();
        let blocked = self.response_blocked.load(Ordering::Relaxed);
        self.response_blocked.store(
            blocked.saturating_add(now.saturating_sub(since)),
            Ordering::Release,
        );
        // Before the next frame's stamp (a relaxed store): a timer that sees
        // that stamp sees this total too (its acquire fence in `blocked_ns`).
        fence(Ordering::Release);
    }

    /// The response body has nothing waiting for the reader (its inner body
    /// is pending, or hyper polls it now): clears [`WAITING`].
    #[inline]
    pub(crate) fn response_not_waiting(&self) {
        let frames = self.response.frames.load(Ordering::Relaxed);
        self.response
            .frames
            .store(frames & !WAITING, Ordering::Release);
    }

    /// How long the response body has waited on the reader so far, in ns,
    /// with `now` the current time on the guard's clock. A wait in progress
    /// counts from its frame's stamp (`late` turns a late tick's stamp into
    /// the latest time the frame may have moved).
    pub(crate) fn blocked_ns(&self, now: u64, late: &LateTicks) -> u64 {
        // The body writes `response_blocked` after clearing `WAITING`, and
        // the stamp before setting it: a read that saw the total change
        // under it reads again, so a wait is never counted twice.
        loop {
            let before = self.response_blocked.load(Ordering::Acquire);
            let frames = self.response.frames.load(Ordering::Acquire);
            let since = self.response.last.load(Ordering::Relaxed);
            // Pairs with the fence in `response_waited`: a stamp seen here
            // comes with the total written before it.
            fence(Ordering::Acquire);
            let after = self.response_blocked.load(Ordering::Acquire);
            if before != after {
                continue;
            }
            let waiting = if frames & WAITING != 0 {
                now.saturating_sub(late.latest(since))
            } else {
                0
            };
            return before.saturating_add(waiting);
        }
    }

    /// Whether the stream has a time limit of its own (an idle timeout, a
    /// lifetime, a minimum rate): the guard's coarse clock runs for it from
    /// its start to its end (see [`CLOCK_ONLY`]).
    fn timed(&self) -> bool {
        [
            &self.idle_both,
            &self.idle_request,
            &self.idle_response,
            &self.lifetime_deadline,
        ]
        .iter()
        .any(|limit| limit.load(Ordering::Relaxed) != NEVER)
            || self.rate.is_some()
    }

    /// The time the response waited on the reader, for the end event:
    /// `None` when the stream had no time limit, for then the guard's
    /// coarse clock (which measures it) may not have run.
    pub(crate) fn blocked_on_reader(&self) -> Option<Duration> {
        self.timed().then(|| {
            Duration::from_nanos(self.blocked_ns(self.shared.timer.stamp(), &LateTicks::default()))
        })
    }

    pub(crate) fn request_traffic(&self) -> Traffic {
        self.request.traffic()
    }

    pub(crate) fn response_traffic(&self) -> Traffic {
        self.response.traffic()
    }

    pub(crate) fn mark_request_done(&self) {
        self.request_done.store(true, Ordering::Relaxed);
    }

    pub(crate) fn set_grpc_status(&self, code: u32) {
        self.after.set_grpc_status(code);
    }

    /// The service answered with a head (gRPC if `grpc`, with `grpc_status`
    /// if any): a gRPC head without a status or with `OK` accepts the call.
    pub(crate) fn set_answered(&self, grpc: bool, grpc_status: Option<u32>) {
        if grpc && matches!(grpc_status, None | Some(crate::status::OK)) {
            self.route.fetch_or(ACCEPTED, Ordering::Relaxed);
        }
    }

    /// What the stream's end tells of its route, for the metrics.
    pub(crate) fn route_of(&self) -> RouteOf {
        let route = self.route.load(Ordering::Relaxed);
        RouteOf {
            name: self
                .shared
                .admission
                .route_names
                .get(usize::from(route & !ACCEPTED).wrapping_sub(1))
                .copied(),
            accepted: route & ACCEPTED != 0,
        }
    }

    #[inline]
    pub(crate) fn is_ended(&self) -> bool {
        self.phase.load(Ordering::Acquire) != OPEN
    }

    /// How the stream ended, once it has.
    pub(crate) fn ending(&self) -> Option<Ending> {
        Ending::from_code(self.phase.load(Ordering::Acquire))
    }

    pub(crate) fn end_reason(&self) -> Option<EndReason> {
        self.ending().map(Ending::reason)
    }

    /// Decides the end, once: records `ending` unless the stream has ended.
    /// The one compare-and-swap every end goes through.
    pub(crate) fn decide(&self, ending: Ending) -> bool {
        self.phase
            .compare_exchange(OPEN, ending.code(), Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Start, ns on the guard's clock.
    pub(crate) fn start_ns(&self) -> u64 {
        self.start_ns
    }

    /// The earliest instant at which a limit could fire, and which one;
    /// [`CLOCK_ONLY`] when none can but the stream has a time limit. `late`
    /// turns frame stamps published by late timer ticks into the latest
    /// time those frames may have moved.
    pub(crate) fn next_deadline(&self, late: &LateTicks) -> (u64, Option<Ending>) {
        let mut best = (if self.timed() { CLOCK_ONLY } else { NEVER }, None);
        let mut consider = |deadline: u64, ending: Ending| {
            if deadline < best.0 {
                best = (deadline, Some(ending));
            }
        };
        let lifetime = if self.client_deadline.load(Ordering::Relaxed) {
            Ending::ClientDeadline
        } else {
            Ending::Lifetime
        };
        consider(self.lifetime_deadline.load(Ordering::Relaxed), lifetime);
        consider(self.shared.drain_deadline(), Ending::Drained);
        if self.body.load(Ordering::Acquire) == BODY_WAITING {
            // Not admitted yet: the idle clocks and the rate (about the
            // peer's reading and sending) have not started.
            return best;
        }
        let last_request = late
            .latest(self.request.last.load(Ordering::Relaxed))
            .max(self.start_ns);
        let last_response = late
            .latest(self.response.last.load(Ordering::Relaxed))
            .max(self.start_ns);
        let after = |last: u64, idle: &AtomicU64| match idle.load(Ordering::Relaxed) {
            NEVER => NEVER,
            idle => last.saturating_add(idle),
        };
        consider(
            after(last_request.max(last_response), &self.idle_both),
            Ending::IdleBoth,
        );
        if !self.request_done.load(Ordering::Relaxed) || self.is_taken_over() {
            consider(after(last_request, &self.idle_request), Ending::IdleRequest);
        }
        consider(
            after(last_response, &self.idle_response),
            Ending::IdleResponse,
        );
        if let Some(watch) = &self.rate {
            consider(watch.check_at(), Ending::SlowReader);
        }
        best
    }

    pub(crate) fn check(&self, now_ns: u64, late: &LateTicks) -> Verdict {
        loop {
            match self.next_deadline(late) {
                (deadline, Some(Ending::SlowReader)) if deadline <= now_ns => {
                    if self.too_slow(now_ns, late) {
                        return Verdict::Expired(Ending::SlowReader);
                    }
                    // The rate's next check is later now; another limit
                    // may be due as well.
                }
                (deadline, Some(ending)) if deadline <= now_ns => {
                    return Verdict::Expired(ending);
                }
                _ => return Verdict::Later,
            }
        }
    }

    /// The minimum rate's check, by the timer (see [`RateWatch::too_slow`]).
    fn too_slow(&self, now: u64, late: &LateTicks) -> bool {
        self.rate.as_ref().is_some_and(|watch| {
            watch.too_slow(now, self.response.traffic(), self.blocked_ns(now, late))
        })
    }

    /// The minimum response rate, if the stream has one.
    pub(crate) fn min_rate(&self) -> Option<MinRate> {
        self.rate.as_ref().map(|watch| watch.rate())
    }

    /// The configured limit behind `ending`, for messages and the event.
    pub(crate) fn limit(&self, ending: Ending) -> Duration {
        let nanos = match ending.reason() {
            EndReason::IdleTimeout(IdleDirection::Both) => self.idle_both.load(Ordering::Relaxed),
            EndReason::IdleTimeout(IdleDirection::Request) => {
                self.idle_request.load(Ordering::Relaxed)
            }
            EndReason::IdleTimeout(IdleDirection::Response) => {
                self.idle_response.load(Ordering::Relaxed)
            }
            EndReason::LifetimeExceeded => self
                .lifetime_deadline
                .load(Ordering::Relaxed)
                .saturating_sub(self.start_ns),
            EndReason::SlowReader => return self.min_rate().map_or(Duration::ZERO, |r| r.window),
            EndReason::Drained => {
                return self
                    .shared
                    .drain()
                    .map_or(Duration::ZERO, |drain| drain.grace());
            }
            _ => 0,
        };
        Duration::from_nanos(nanos)
    }

    pub(crate) fn remaining_lifetime(&self) -> Option<Duration> {
        match self.lifetime_deadline.load(Ordering::Relaxed) {
            NEVER => None,
            deadline => Some(
                self.shared
                    .timer
                    .instant_of(deadline)
                    .saturating_duration_since(Instant::now()),
            ),
        }
    }
}

#[cfg(all(test, not(stream_guard_loom), target_pointer_width = "64"))]
#[path = "record_tests.rs"]
mod size;
