//! The one record every part of a stream shares, and its once-only end.
//!
//! The request-body wrapper, the response future, the response-body wrapper,
//! the handler's [`StreamHandle`](crate::StreamHandle) and the sweeper all reach
//! the same [`StreamState`]. Data-path fields are written by one body each, with
//! relaxed loads and stores (no locked instruction). The end is decided by one
//! compare-and-swap: whoever wins it wakes everybody and emits the event.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use atomic_waker::AtomicWaker;
use http::{Method, Request, uri::PathAndQuery};
use tokio::{sync::Notify, time::Instant};

use crate::{
    connection::ConnectionHandle,
    drain::{DrainShared, Drained},
    end::{EndReason, IdleDirection, StreamCap},
    error::{self, GuardError},
    events::{EndEvent, EventHub, StreamId, Traffic},
    grpc,
    peer::{ConnectionKey, KeyFn},
    stats::Counters,
};

use super::{
    cap::{CapPermit, CapSet, Origin},
    policy::Policy,
    route::Route,
    timer::{LateTicks, NEVER, Sweeper},
};

/// What one guard layer instance shares with all of its streams.
pub(crate) struct Core {
    pub(crate) sweeper: Arc<Sweeper>,
    pub(crate) events: EventHub,
    pub(crate) active: AtomicUsize,
    pub(crate) counters: Counters,
    /// The layer's own caps (and connection counts), if it has any.
    pub(crate) caps: Option<Arc<CapSet>>,
    pub(crate) routes: Vec<Route>,
    pub(crate) connection_key: Option<KeyFn>,
    pub(crate) honor_grpc_timeout: bool,
    pub(crate) cap_wait: Option<Duration>,
    pub(crate) drain: Option<Arc<DrainShared>>,
    /// Put the handle into response extensions too (clients).
    pub(crate) handle_in_response: bool,
    /// When a drain cuts the streams still open, ns on the sweeper's clock.
    pub(crate) drain_deadline: AtomicU64,
    /// Refusals not yet in a `WARN` summary.
    pub(crate) refusals: RefusalLog,
    /// Which keyed caps already warned that a stream had no key (a bit per
    /// cap): the warning is logged once per guard layer.
    pub(crate) warned_unidentified: AtomicU8,
}

impl Core {
    /// A drain began: every stream of this guard ends at `deadline` at the
    /// latest.
    pub(crate) fn begin_drain(&self, deadline: Instant) {
        let deadline = self.sweeper.ns_of(deadline);
        self.drain_deadline.store(deadline, Ordering::Release);
        self.sweeper.refile_after(deadline);
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.drain.as_ref().is_some_and(|drain| drain.is_draining())
    }

    /// Logs, once per guard layer and cap, that `cap` refuses streams that
    /// carry no key for it: a misconfigured server should not stay quiet.
    fn warn_unidentified(&self, cap: StreamCap, message: &str) {
        let bit = 1 << (cap as u8);
        if self.warned_unidentified.fetch_or(bit, Ordering::Relaxed) & bit == 0 {
            tracing::warn!(
                target: "tower_stream_guard",
                cap = cap.as_str(),
                "{message} (logged once per guard layer)"
            );
        }
    }
}

impl Drained for Core {
    fn begin(&self, deadline: Instant) {
        self.begin_drain(deadline);
    }

    fn open(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    fn close_rest(&self) -> u64 {
        // The timer already cut every stream at the deadline.
        0
    }
}

/// The response body's side of a stream, for spotting stalled readers.
const BODY_NONE: u8 = 0;
const BODY_OPEN: u8 = 1;
/// A guard ended the stream while its response body was open: until the
/// body is read or dropped, the peer is a stalled reader.
const BODY_STALLED: u8 = 2;

/// What a stream holds until it ends besides its own record.
#[derive(Default)]
struct Held {
    /// Cap slots, given back when the stream ends.
    permits: Vec<CapPermit>,
}

/// Counters of one direction, written only by that direction's body.
#[derive(Default)]
pub(crate) struct Side {
    frames: AtomicU64,
    bytes: AtomicU64,
    /// Coarse time of the last frame, ns since the sweeper's origin.
    last: AtomicU64,
}

impl Side {
    fn traffic(&self) -> Traffic {
        Traffic {
            frames: self.frames.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
        }
    }
}

const ACTIVE: u8 = 0;
/// The phase of a stream `StreamHandle::cancel` ended: reason `Cancelled`,
/// ended the way a guard ends a stream. Past every `EndReason` code.
const CANCELLED_BY_HANDLE: u8 = 200;
const NO_STATUS: u32 = u32::MAX;

pub(crate) enum Verdict {
    Expired(EndReason),
    Later,
}

/// Laid out by hand (`repr(C)`): the request body and the response body run
/// on different tasks, often on different cores, and each writes its side's
/// counters on every frame. Sharing one cache line, the two sides would
/// take it from each other's core on every frame (false sharing); so the
/// request side comes first, the response side last, and what both read on
/// every frame (`core`, `phase`) sits in between, on a line neither writes
/// per frame. A unit test below keeps them apart.
#[repr(C)]
pub(crate) struct StreamState {
    /// Written by the request body on every frame.
    request: Side,
    // Only `end` takes these wakers out (by waking them): the bodies rely on
    // that to skip registering a waker they already registered.
    pub(crate) request_waker: AtomicWaker,
    idle_both: AtomicU64,
    idle_request: AtomicU64,
    idle_response: AtomicU64,
    lifetime_deadline: AtomicU64,
    /// Start, ns on the sweeper's clock.
    start_ns: u64,
    /// Read by both bodies on every frame (the sweeper's coarse clock).
    core: Arc<Core>,
    pub(crate) id: StreamId,
    /// Where the sweeper filed this stream; written under the sweeper's lock.
    pub(crate) timer_key: AtomicU64,
    /// `ACTIVE` or the code of the end reason. Read by both bodies on every
    /// frame.
    phase: AtomicU8,
    /// The response body's side of the stream, for spotting stalled readers.
    body: AtomicU8,
    request_done: AtomicBool,
    pub(crate) grpc: bool,
    /// The lifetime deadline is the client's `grpc-timeout`, not a setting.
    client_deadline: AtomicBool,
    /// A drain refused this stream (rather than cutting it).
    refused_by_drain: AtomicBool,
    /// The response body decided the end (`Completed`); the rest of the end
    /// (wake-ups, slots, the event) waits until the body is dropped or polled
    /// again. See `complete_deferred`.
    unfinished: AtomicBool,
    grpc_status: AtomicU32,
    /// The limit of the cap that refused this stream.
    cap_limit: AtomicU32,
    method: Method,
    path: Option<PathAndQuery>,
    conn: Option<ConnectionHandle>,
    /// Boxed: most streams hold nothing, and an empty box costs no allocation.
    held: Mutex<Option<Box<Held>>>,
    cancelled: Notify,
    peer: Option<SocketAddr>,
    connection: Option<ConnectionKey>,
    /// The response future's waker, then (once the future has resolved into
    /// the body) the response body's: the two never wait at the same time.
    pub(crate) response_waker: AtomicWaker,
    /// Written by the response body on every frame.
    response: Side,
}

fn ns(d: Option<Duration>) -> u64 {
    d.map_or(NEVER, |d| u64::try_from(d.as_nanos()).unwrap_or(NEVER))
}

impl StreamState {
    pub(crate) fn new<B>(
        core: &Arc<Core>,
        policy: &Policy,
        request: &Request<B>,
        origin: &Origin,
        peer: Option<SocketAddr>,
        conn: Option<ConnectionHandle>,
    ) -> Arc<Self> {
        if let Some(conn) = &conn {
            conn.stream_started();
        }
        let start_ns = core.sweeper.ns_of(Instant::now());
        core.active.fetch_add(1, Ordering::Relaxed);
        let state = StreamState {
            id: StreamId::next(),
            core: Arc::clone(core),
            start_ns,
            phase: AtomicU8::new(ACTIVE),
            idle_both: AtomicU64::new(ns(policy.idle_both)),
            idle_request: AtomicU64::new(ns(policy.idle_request)),
            idle_response: AtomicU64::new(ns(policy.idle_response)),
            lifetime_deadline: AtomicU64::new(NEVER),
            request: Side::default(),
            response: Side::default(),
            request_done: AtomicBool::new(false),
            grpc: grpc::is_grpc(request.headers()),
            grpc_status: AtomicU32::new(NO_STATUS),
            timer_key: AtomicU64::new(NEVER),
            request_waker: AtomicWaker::new(),
            response_waker: AtomicWaker::new(),
            cancelled: Notify::new(),
            held: Mutex::new(None),
            client_deadline: AtomicBool::new(false),
            cap_limit: AtomicU32::new(0),
            refused_by_drain: AtomicBool::new(false),
            unfinished: AtomicBool::new(false),

            body: AtomicU8::new(BODY_NONE),
            conn,
            method: request.method().clone(),
            path: request.uri().path_and_query().cloned(),
            peer,
            connection: origin.connection,
        };
        state.core.sweeper.note_idle(policy);
        state.limit_lifetime(policy.max_lifetime, false);
        Arc::new(state)
    }

    /// Brings the lifetime deadline forward to `lifetime` after the start, if
    /// that is earlier; `client` says whether the client's `grpc-timeout`
    /// asked for it.
    pub(crate) fn limit_lifetime(&self, lifetime: Option<Duration>, client: bool) {
        let lifetime = ns(lifetime);
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

    fn held(&self) -> std::sync::MutexGuard<'_, Option<Box<Held>>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Keeps cap slots until the stream ends; gives them back at once if it
    /// already has.
    pub(crate) fn hold(&self, permits: Vec<CapPermit>) {
        if permits.is_empty() {
            return;
        }
        let mut held = self.held();
        // `end` sets the phase before it empties `held` under the same lock.
        if self.is_ended() {
            drop(held);
            permits.into_iter().for_each(CapPermit::release);
            return;
        }
        held.get_or_insert_default().permits.extend(permits);
    }

    /// Ends the stream as refused by `cap`, whose limit is `limit`.
    pub(crate) fn reject(&self, cap: StreamCap, limit: usize) {
        // A limit past u32::MAX is reported as u32::MAX.
        let limit = u32::try_from(limit).unwrap_or(u32::MAX);
        self.cap_limit.store(limit, Ordering::Relaxed);
        if self.end(EndReason::Rejected(cap)) && self.lacks_key_of(cap) {
            self.core
                .warn_unidentified(cap, &crate::peer::describe_unidentified(cap));
        }
    }

    /// Whether `cap` refused this stream for want of a key: the stream's
    /// connection or peer is unknown (a keyed cap never pools such
    /// streams).
    fn lacks_key_of(&self, cap: StreamCap) -> bool {
        match cap {
            StreamCap::PerConnection => self.connection.is_none(),
            StreamCap::PerPeer => self.peer.is_none(),
            StreamCap::Total => false,
        }
    }

    /// Ends the stream on its handle's request: the bodies end the way a
    /// guard's do, with `CANCELLED`.
    pub(crate) fn cancel_by_handle(&self) -> bool {
        self.end_as(EndReason::Cancelled, CANCELLED_BY_HANDLE)
    }

    /// Whether `StreamHandle::cancel` ended the stream.
    fn by_handle(&self) -> bool {
        self.phase.load(Ordering::Acquire) == CANCELLED_BY_HANDLE
    }

    /// The gRPC status a stream that ended this way carries, when the guard
    /// ends it (a limit, a cap, a drain, or its handle).
    pub(crate) fn end_code(&self, reason: EndReason) -> Option<u32> {
        match reason {
            EndReason::Cancelled if self.by_handle() => Some(grpc::CANCELLED),
            other => other.grpc_code(),
        }
    }

    /// Ends the stream as refused by a drain in progress.
    pub(crate) fn refuse_draining(&self) {
        self.refused_by_drain.store(true, Ordering::Relaxed);
        if self.end(EndReason::Drained)
            && let Some(drain) = &self.core.drain
        {
            drain.count_refused();
        }
    }

    /// The response body exists and hyper may poll it.
    pub(crate) fn response_opened(&self) {
        self.body.store(BODY_OPEN, Ordering::Release);
    }

    /// The response body ended, was read to its guard-made end, or was
    /// dropped.
    pub(crate) fn response_closed(&self) {
        if self.body.swap(BODY_NONE, Ordering::AcqRel) == BODY_STALLED
            && let Some(conn) = &self.conn
        {
            conn.stream_unstalled();
        }
    }

    pub(crate) fn core(&self) -> &Core {
        &self.core
    }

    /// The connection this stream came on, if a connection guard wraps it.
    pub(crate) fn connection(&self) -> Option<&ConnectionHandle> {
        self.conn.as_ref()
    }

    /// Files a stream that just started on the current runtime.
    pub(crate) fn arm_new(self: &Arc<Self>) {
        self.core.sweeper.arm_new(self);
    }

    #[inline]
    pub(crate) fn note_request_frame(&self, bytes: usize) {
        note(&self.request, bytes, self.core.sweeper.stamp());
    }

    #[inline]
    pub(crate) fn note_response_frame(&self, bytes: usize) {
        note(&self.response, bytes, self.core.sweeper.stamp());
    }

    pub(crate) fn mark_request_done(&self) {
        self.request_done.store(true, Ordering::Relaxed);
    }

    pub(crate) fn set_grpc_status(&self, code: u32) {
        self.grpc_status.store(code, Ordering::Relaxed);
    }

    #[inline]
    pub(crate) fn is_ended(&self) -> bool {
        self.phase.load(Ordering::Acquire) != ACTIVE
    }

    pub(crate) fn end_reason(&self) -> Option<EndReason> {
        match self.phase.load(Ordering::Acquire) {
            CANCELLED_BY_HANDLE => Some(EndReason::Cancelled),
            code => EndReason::from_code(code),
        }
    }

    /// The earliest instant at which a limit could fire, and which one.
    /// `late` turns frame stamps published by late timer ticks into the
    /// latest time those frames may have moved.
    pub(crate) fn next_deadline(&self, late: &LateTicks) -> (u64, Option<EndReason>) {
        let mut best = (NEVER, None);
        let mut consider = |deadline: u64, reason: EndReason| {
            if deadline < best.0 {
                best = (deadline, Some(reason));
            }
        };
        consider(
            self.lifetime_deadline.load(Ordering::Relaxed),
            EndReason::LifetimeExceeded,
        );
        consider(
            self.core.drain_deadline.load(Ordering::Acquire),
            EndReason::Drained,
        );
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
            EndReason::IdleTimeout(IdleDirection::Both),
        );
        if !self.request_done.load(Ordering::Relaxed) {
            consider(
                after(last_request, &self.idle_request),
                EndReason::IdleTimeout(IdleDirection::Request),
            );
        }
        consider(
            after(last_response, &self.idle_response),
            EndReason::IdleTimeout(IdleDirection::Response),
        );
        best
    }

    pub(crate) fn check(&self, now_ns: u64, late: &LateTicks) -> Verdict {
        match self.next_deadline(late) {
            (deadline, Some(reason)) if deadline <= now_ns => Verdict::Expired(reason),
            _ => Verdict::Later,
        }
    }

    /// The sentence a guard-made end is explained with, in `grpc-message`,
    /// errors and logs.
    pub(crate) fn describe(&self, reason: EndReason) -> String {
        match reason {
            EndReason::Rejected(cap) if self.lacks_key_of(cap) => {
                crate::peer::describe_unidentified(cap)
            }
            EndReason::Rejected(cap) => {
                error::describe_rejection(cap, self.cap_limit.load(Ordering::Relaxed) as usize)
            }
            EndReason::LifetimeExceeded if self.client_deadline.load(Ordering::Relaxed) => {
                error::describe_client_deadline(self.limit(reason))
            }
            EndReason::Drained if self.refused_by_drain.load(Ordering::Relaxed) => {
                error::describe_drain_refusal()
            }
            EndReason::Cancelled if self.by_handle() => {
                "stream cancelled through its handle (StreamHandle::cancel)".to_owned()
            }
            _ => error::describe(reason, self.limit(reason)),
        }
    }

    /// The error a guard-ended stream's bodies yield.
    pub(crate) fn guard_error(&self) -> Option<GuardError> {
        let reason = self.end_reason()?;
        let code = self.end_code(reason)?;
        Some(GuardError::new(
            reason,
            self.limit(reason),
            self.describe(reason),
            code,
        ))
    }

    /// The limit behind a guard-made end, for messages.
    pub(crate) fn limit(&self, reason: EndReason) -> Duration {
        let nanos = match reason {
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
            EndReason::Drained => {
                return self
                    .core
                    .drain
                    .as_ref()
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
                self.core
                    .sweeper
                    .instant_of(deadline)
                    .saturating_duration_since(Instant::now()),
            ),
        }
    }

    /// Waits until the stream has ended and returns why.
    pub(crate) async fn ended(&self) -> EndReason {
        loop {
            let notified = self.cancelled.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(reason) = self.end_reason() {
                return reason;
            }
            notified.await;
        }
    }

    /// Ends the stream if it has not ended yet. Returns whether this call ended
    /// it. Wakes every part of the stream, releases its timer and emits its one
    /// end event. Never panics: it runs from `Drop`.
    pub(crate) fn end(&self, reason: EndReason) -> bool {
        self.end_as(reason, reason.code())
    }

    /// [`end`](Self::end), recording `phase` (the reason's code, or a finer
    /// one such as `CANCELLED_BY_HANDLE`) in the same step that decides the
    /// end, so that whoever sees the stream ended sees how.
    fn end_as(&self, reason: EndReason, phase: u8) -> bool {
        if !self.decide(phase) {
            return false;
        }
        self.finish(reason);
        true
    }

    /// Decides the end, once: records `phase` unless the stream has ended.
    fn decide(&self, phase: u8) -> bool {
        self.phase
            .compare_exchange(ACTIVE, phase, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Decides that the stream completed, and leaves the rest of its end to
    /// [`finish_deferred`](Self::finish_deferred).
    ///
    /// For the response body's last frame (trailers, or its end): hyper sends
    /// a DATA frame, polls again and sends the trailers. Whatever runs in
    /// between widens the window in which the connection task flushes the
    /// DATA frame alone, and with Nagle's algorithm on, trailers written
    /// apart wait for the peer's delayed ACK (40 ms). So at that point only
    /// the decision is taken (one compare-and-swap: no guard can end the
    /// stream any more, the handle reports it); the event and wake-ups
    /// follow when the body is dropped, right after, or polled again.
    pub(crate) fn complete_deferred(&self) -> bool {
        self.decide_deferred(EndReason::Completed)
    }

    /// Decides the end as `reason` and leaves the rest of it to
    /// [`finish_deferred`](Self::finish_deferred): one compare-and-swap and
    /// one store, nothing that can panic or run user code.
    fn decide_deferred(&self, reason: EndReason) -> bool {
        if !self.decide(reason.code()) {
            return false;
        }
        self.unfinished.store(true, Ordering::Release);
        true
    }

    /// Finishes an end [`decide_deferred`](Self::decide_deferred) decided;
    /// does nothing otherwise, or a second time.
    pub(crate) fn finish_deferred(&self) {
        if self.unfinished.swap(false, Ordering::AcqRel)
            && let Some(reason) = self.end_reason()
        {
            self.finish(reason);
        }
    }

    /// Whether this stream answers a `HEAD` request: its response has no
    /// body to send, whatever the body says.
    pub(crate) fn is_head(&self) -> bool {
        self.method == Method::HEAD
    }

    /// Everything an end does once it is decided: wakes every part of the
    /// stream, releases its timer and slots and emits its one end event.
    fn finish(&self, reason: EndReason) {
        self.core.sweeper.disarm(self);
        if self.grpc
            && let Some(code) = self.end_code(reason)
        {
            self.set_grpc_status(code);
        }
        self.response_waker.wake();
        self.request_waker.wake();
        self.cancelled.notify_waiters();

        // Taken out, so that no lock is held while subscribers hear of the
        // end.
        let permits = match self.held().as_mut() {
            Some(held) => std::mem::take(&mut held.permits),
            None => Vec::new(),
        };
        // Slots first: a stream waiting for one should not wait for
        // subscribers.
        permits.into_iter().for_each(CapPermit::release);
        if let Some(conn) = &self.conn {
            if reason.is_guard()
                && self
                    .body
                    .compare_exchange(BODY_OPEN, BODY_STALLED, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                // Until the body is read or dropped, hyper keeps the stream:
                // the connection guard closes the connection if that lasts.
                conn.stream_stalled();
            }
            conn.stream_ended();
        }
        if reason == EndReason::Drained
            && !self.refused_by_drain.load(Ordering::Relaxed)
            && let Some(drain) = &self.core.drain
        {
            drain.count_cut();
        }
        let event = self.event(reason);
        trace_end(&event);
        if let Some(cap) = reason.cap() {
            self.core.refusals.note(cap);
        }
        // On every end, not only refusals: the tail of a burst is reported
        // by the next stream to end after the second is up.
        self.core.refusals.summarize(&self.core.sweeper);
        let core = &self.core;
        core.counters.count(reason);
        core.active.fetch_sub(1, Ordering::AcqRel);
        core.events.emit(&event);
        if let Some(drain) = &core.drain {
            drain.ended_one();
        }
    }

    fn event(&self, reason: EndReason) -> EndEvent {
        let started = self.core.sweeper.instant_of(self.start_ns);
        let duration = Instant::now().saturating_duration_since(started);
        let status = self.grpc_status.load(Ordering::Relaxed);
        EndEvent {
            id: self.id,
            method: self.method.clone(),
            path: self.path.clone(),
            peer: self.peer,
            connection: self.connection,
            started_at: SystemTime::now()
                .checked_sub(duration)
                .unwrap_or(SystemTime::UNIX_EPOCH),
            duration,
            reason,
            limit: (reason.is_guard() && reason.cap().is_none()).then(|| self.limit(reason)),
            cap_limit: reason
                .cap()
                .map(|_| self.cap_limit.load(Ordering::Relaxed) as usize),
            request: self.request.traffic(),
            response: self.response.traffic(),
            grpc_status: (status != NO_STATUS).then_some(status),
        }
    }
}

impl Drop for StreamState {
    fn drop(&mut self) {
        // Every path that lets go of a stream ends it first; this is the net
        // under them, so that a stream can never vanish without its event.
        self.finish_deferred();
        self.end(EndReason::Cancelled);
    }
}

/// Ends a stream as [`EndReason::Panicked`] if the code it brackets unwinds.
///
/// Armed around every call into code the guard does not own (the service's
/// `call`, its future, the response body); disarmed, at no cost, when that
/// code returns. While a panic unwinds only the decision is taken (one
/// compare-and-swap and a store): the rest of an end runs code that is not
/// ours (subscribers, `tracing` layers), and a panic there that nobody
/// catches, inside someone else's unwinding, would abort the process. The
/// rest follows when the future or body that panicked is dropped, which is
/// what tokio and hyper do right after they catch the panic; the record's
/// own `Drop` is the net under that (and the one case where the end does
/// run during the unwinding: the last reference to the record dropped by
/// it, as when `call` panics on a runtime that is shutting down).
#[must_use = "dropping it at once ends the stream"]
pub(crate) struct EndOnUnwind<'a> {
    state: &'a StreamState,
    /// Set when nothing that would finish the end is left once the panic
    /// is caught (the service's `call`: the request went to the service):
    /// the end is then finished on a task of its own.
    owner: Option<&'a Arc<StreamState>>,
}

impl<'a> EndOnUnwind<'a> {
    #[inline(always)]
    pub(crate) fn arm(state: &'a StreamState) -> Self {
        EndOnUnwind { state, owner: None }
    }

    /// Armed around code after which nothing of the stream is dropped:
    /// the end is finished on a task spawned for it (inline without a
    /// runtime).
    pub(crate) fn arm_finishing(state: &'a Arc<StreamState>) -> Self {
        EndOnUnwind {
            state,
            owner: Some(state),
        }
    }

    /// The bracketed code returned: nothing to do.
    #[inline(always)]
    pub(crate) fn disarm(self) {
        std::mem::forget(self);
    }
}

impl Drop for EndOnUnwind<'_> {
    fn drop(&mut self) {
        // Reached only by unwinding: `disarm` forgets the guard otherwise.
        if !self.state.decide_deferred(EndReason::Panicked) {
            return;
        }
        if let Some(owner) = self.owner {
            let owner = Arc::clone(owner);
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(async move { owner.finish_deferred() });
                }
                Err(_) => owner.finish_deferred(),
            }
        }
    }
}

#[inline]
fn note(side: &Side, bytes: usize, stamp: u64) {
    // One writer per side: plain load and store, no locked instruction.
    let frames = side.frames.load(Ordering::Relaxed);
    side.frames.store(frames.wrapping_add(1), Ordering::Relaxed);
    let total = side.bytes.load(Ordering::Relaxed);
    side.bytes
        .store(total.wrapping_add(bytes as u64), Ordering::Relaxed);
    side.last.store(stamp, Ordering::Relaxed);
}

/// How often, at most, a guard logs a summary of the streams its caps refused.
const SUMMARY_EVERY_NS: u64 = 1_000_000_000;

/// Refusals by cap since the last `WARN` summary, and when that was. A cap
/// flood is one `DEBUG` line per stream and at most one `WARN` line per guard
/// per second, not one `INFO` line per stream.
#[derive(Default)]
pub(crate) struct RefusalLog {
    /// By [`StreamCap::ALL`] index.
    counts: [AtomicU64; 3],
    /// The sum of `counts`: one load tells whether there is anything to say.
    pending: AtomicU64,
    /// One more than the sweeper-clock ns of the last summary; 0: none yet.
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
    fn summarize(&self, sweeper: &Sweeper) {
        if self.pending.load(Ordering::Relaxed) == 0 {
            return;
        }
        let now = sweeper.now_ns();
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
        tracing::warn!(
            target: "tower_stream_guard",
            refused,
            per_connection,
            per_peer,
            total,
            "{refused} streams refused by {by} in the last {:.1}s",
            Duration::from_nanos(now - since).as_secs_f64()
        );
    }
}

fn trace_end(event: &EndEvent) {
    let duration_ms = event.duration.as_millis() as u64;
    if let EndReason::Rejected(_) = event.reason {
        // A cap flood would be a log flood at `INFO`: each refusal is
        // `DEBUG`, and `RefusalLog` sums them up at `WARN`.
        tracing::debug!(
            target: "tower_stream_guard",
            stream_id = event.id.get(),
            route = event.path(),
            reason = event.reason.as_str(),
            duration_ms,
            "stream refused: {}",
            event.reason
        );
    } else if event.reason.is_guard() {
        tracing::info!(
            target: "tower_stream_guard",
            stream_id = event.id.get(),
            route = event.path(),
            reason = event.reason.as_str(),
            duration_ms,
            "stream ended by guard: {}",
            event.reason
        );
    } else {
        tracing::debug!(
            target: "tower_stream_guard",
            stream_id = event.id.get(),
            route = event.path(),
            reason = event.reason.as_str(),
            duration_ms,
            "stream ended"
        );
    }
}

#[cfg(all(test, target_pointer_width = "64"))]
mod size {
    use std::mem::{offset_of, size_of};

    use super::{Side, StreamState};

    /// Every open stream costs one `StreamState`: a field added by accident
    /// shows here first (see BENCHMARKS.md for the memory per stream).
    #[test]
    fn stream_state_stays_small() {
        let size = size_of::<StreamState>();
        assert!(size <= 392, "StreamState grew to {size} bytes");
    }

    /// Bytes `[a, a + len)` and `[b, ..)` with `b` after them share no
    /// 64-byte cache line wherever the record is placed.
    fn apart(a: usize, len: usize, b: usize) -> bool {
        b >= a + len - 1 + 64
    }

    #[test]
    fn the_two_sides_and_what_both_read_sit_on_separate_cache_lines() {
        let request = offset_of!(StreamState, request);
        let response = offset_of!(StreamState, response);
        let core = offset_of!(StreamState, core);
        let phase = offset_of!(StreamState, phase);
        let side = size_of::<Side>();
        assert!(
            apart(request, side, core),
            "request side {request}, core {core}"
        );
        assert!(core < phase, "core {core}, phase {phase}");
        assert!(
            apart(phase, 1, response),
            "phase {phase}, response side {response}"
        );
    }
}
