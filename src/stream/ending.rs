//! What a decided end does: wake every part of the stream, give back its
//! timer filing and cap slots, settle its connection's and drain's counts,
//! and report it, once.
//!
//! An end is decided by one compare-and-swap ([`Record::decide`]). Most ends
//! are finished at once by whoever decided them ([`Record::end`]); the
//! response body's last part and a panic only decide, and leave the rest to
//! [`Record::finish_deferred`] (see [`Record::decide_deferred`]).

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use http::{Method, uri::PathAndQuery};
use tokio::sync::Notify;

use super::{cap::CapPermit, origin::Anchor, record::Record};
use crate::{
    connection::ConnectionHandle,
    end::{EndReason, Ending, StreamCap},
    error::GuardError,
    events::EndEvent,
    peer::ConnectionKey,
    sync::{AtomicU32, Mutex, lock},
};

/// The response body's side of a stream, for spotting stalled readers.
pub(super) const BODY_NONE: u8 = 0;
const BODY_OPEN: u8 = 1;
/// A guard ended the stream while its response body was open: until the
/// body is read or dropped, the peer is a stalled reader.
const BODY_STALLED: u8 = 2;
/// The response body handed on its last declared byte (its
/// `content-length`, or its exact size hint). hyper's HTTP/1 stops there and
/// drops the body unpolled, so a drop from then on completes the stream;
/// over HTTP/2 the body is polled on and its end (or trailers) claims the
/// end as usual. Set only by the body itself, from `BODY_OPEN`.
const BODY_SENT: u8 = 3;
/// The stream waits for cap slots (`cap_wait`): it has no response body
/// yet, is not active and its idle clocks have not started. Left once, for
/// `BODY_NONE`, by its admission or its end, whichever comes first.
pub(super) const BODY_WAITING: u8 = 4;
/// The stream took its connection over (an HTTP/1.1 upgrade): it has no
/// response body, and a guard's end closes the connection
/// (`takeover.rs`).
pub(super) const BODY_TAKEN_OVER: u8 = 5;

/// The part of a stream's record that only its end reads: what the event
/// reports, the slots it gives back, the connection it settles.
///
/// Laid out for the common streams: what most of them carry (a path, a
/// standard method, a connection guard's handle or nothing about their
/// connection) sits here in a few words; the rest is boxed in [`Held`] and
/// [`Late`], allocated only for the streams that have it.
pub(crate) struct After {
    path: Option<PathAndQuery>,
    source: Source,
    /// Allocated by the first cap slot held, refusal or waiter for the end;
    /// `finish` takes what it gives back under this lock, once.
    pub(super) late: Mutex<Option<Box<Late>>>,
    /// The gRPC status the stream ended with, [`NO_STATUS`] while unknown.
    grpc_status: AtomicU32,
    /// The request's method: its place in [`METHODS`] plus one, or 0 for
    /// another method, which [`Held`] keeps.
    method: u8,
}

/// Where a stream came from.
enum Source {
    /// Nothing is known of its connection or peer.
    Unknown,
    /// A connection guard wraps the connection, whose key and peer are the
    /// stream's.
    Guarded(ConnectionHandle),
    /// A connection key whose remote address is the peer, without a
    /// connection guard: tonic's or axum's connect info.
    Keyed(Box<ConnectionKey>),
    /// Anything else.
    Held(Box<Held>),
}

/// What [`Source::Held`] holds: a connection key or peer the request named
/// apart from a connection guard's, and a method not in [`METHODS`].
struct Held {
    connection: Option<ConnectionKey>,
    peer: Option<SocketAddr>,
    conn: Option<ConnectionHandle>,
    method: Option<Method>,
}

/// What only some streams need, allocated when first needed.
#[derive(Default)]
pub(super) struct Late {
    /// Cap slots, given back when the stream ends.
    permits: Vec<CapPermit>,
    /// The limit of the cap that refused this stream.
    cap_limit: u32,
    /// Woken when the stream ends: there for as long as someone waits.
    waiters: Option<Arc<Notify>>,
    /// What the stream's connection key is made from, kept while the record
    /// lives (see `origin`).
    anchor: Option<Anchor>,
}

/// The methods [`After`] keeps as a byte.
const METHODS: [Method; 9] = [
    Method::POST,
    Method::GET,
    Method::PUT,
    Method::DELETE,
    Method::PATCH,
    Method::HEAD,
    Method::OPTIONS,
    Method::CONNECT,
    Method::TRACE,
];

/// `After::method` of a `HEAD` request.
const HEAD: u8 = 6;
/// `After::method` of a `CONNECT` request.
const CONNECT: u8 = 8;

/// `grpc_status` before any status is known.
const NO_STATUS: u32 = u32::MAX;

impl After {
    pub(crate) fn new<B>(
        request: &http::Request<B>,
        connection: Option<ConnectionKey>,
        peer: Option<SocketAddr>,
        conn: Option<ConnectionHandle>,
    ) -> Self {
        if let Some(conn) = &conn {
            conn.stream_started();
        }
        let method = METHODS
            .iter()
            .position(|method| method == request.method())
            .map_or(0, |index| index as u8 + 1);
        let source = match conn {
            Some(conn) if method != 0 && connection == Some(conn.key()) && peer == conn.peer() => {
                Source::Guarded(conn)
            }
            None if method != 0 && connection.is_none() && peer.is_none() => Source::Unknown,
            None if method != 0
                && let Some(key) = connection
                && peer.is_some()
                && peer == key.remote_addr() =>
            {
                Source::Keyed(Box::new(key))
            }
            conn => Source::Held(Box::new(Held {
                connection,
                peer,
                conn,
                method: (method == 0).then(|| request.method().clone()),
            })),
        };
        After {
            path: request.uri().path_and_query().cloned(),
            source,
            late: Mutex::new(None),
            grpc_status: AtomicU32::new(NO_STATUS),
            method,
        }
    }

    /// The connection this stream came on, if a connection guard wraps it.
    pub(crate) fn connection(&self) -> Option<&ConnectionHandle> {
        match &self.source {
            Source::Unknown | Source::Keyed(_) => None,
            Source::Guarded(conn) => Some(conn),
            Source::Held(held) => held.conn.as_ref(),
        }
    }

    /// The key stream caps count this stream's connection under, if known.
    fn connection_key(&self) -> Option<ConnectionKey> {
        match &self.source {
            Source::Unknown => None,
            Source::Guarded(conn) => Some(conn.key()),
            Source::Keyed(key) => Some(**key),
            Source::Held(held) => held.connection,
        }
    }

    fn peer(&self) -> Option<SocketAddr> {
        match &self.source {
            Source::Unknown => None,
            Source::Guarded(conn) => conn.peer(),
            Source::Keyed(key) => key.remote_addr(),
            Source::Held(held) => held.peer,
        }
    }

    fn method(&self) -> Method {
        match (self.method, &self.source) {
            (0, Source::Held(held)) => held.method.clone().unwrap_or_default(),
            (code, _) => METHODS[usize::from(code) - 1].clone(),
        }
    }

    /// Whether this stream answers a `HEAD` request: its response has no
    /// body to send, whatever the body says.
    pub(crate) fn is_head(&self) -> bool {
        self.method == HEAD
    }

    /// Whether this stream's request is a `CONNECT`.
    pub(crate) fn is_connect(&self) -> bool {
        self.method == CONNECT
    }

    pub(crate) fn set_grpc_status(&self, code: u32) {
        self.grpc_status.store(code, Ordering::Relaxed);
    }

    /// The gRPC status reported in the end event, if any.
    fn grpc_status(&self) -> Option<u32> {
        let status = self.grpc_status.load(Ordering::Relaxed);
        (status != NO_STATUS).then_some(status)
    }

    /// The limit of the cap that refused this stream, 0 if none did.
    fn cap_limit(&self) -> u32 {
        lock(&self.late).as_ref().map_or(0, |late| late.cap_limit)
    }

    /// Whether the stream carries no key for `cap`.
    fn lacks_key_of(&self, cap: StreamCap) -> bool {
        match cap {
            StreamCap::PerConnection => self.connection_key().is_none(),
            StreamCap::PerPeer => self.peer().is_none(),
            StreamCap::Total => false,
        }
    }
}

impl Record {
    /// Waits until the stream has ended and returns why.
    pub(crate) async fn ended(&self) -> EndReason {
        loop {
            let waiters: Arc<Notify>;
            let notified;
            {
                let mut late = lock(&self.after.late);
                // Under the lock `finish` takes the waiters out under, once
                // the end is decided: either this sees the end, or the end
                // finds the waiters, and then the `Notified`, made before the
                // lock is let go, is woken by `notify_waiters`.
                if let Some(reason) = self.end_reason() {
                    return reason;
                }
                let late = late.get_or_insert_default();
                waiters = Arc::clone(late.waiters.get_or_insert_default());
                notified = waiters.notified();
            }
            notified.await;
        }
    }

    /// Ends the stream as `ending` if it has not ended yet; whether this call
    /// ended it. Wakes every part of the stream, releases its timer and slots
    /// and emits its one end event. Never panics: it runs from `Drop`.
    pub(crate) fn end(&self, ending: Ending) -> bool {
        if !self.decide(ending) {
            return false;
        }
        self.finish(ending);
        true
    }

    /// Decides the end as `ending` and leaves the rest of it to
    /// [`finish_deferred`](Self::finish_deferred): one compare-and-swap and
    /// one store, nothing that can panic or run user code.
    ///
    /// For a panic, and for the response body's last part (see
    /// `last_word`): hyper sends a DATA frame, polls again and sends the
    /// trailers. Whatever runs in between widens the window in which the
    /// connection task flushes the DATA frame alone, and with Nagle's
    /// algorithm on, trailers written apart wait for the peer's delayed ACK
    /// (40 ms). So at that point only the decision is taken (no guard can
    /// end the stream any more, the handle reports it); the event and
    /// wake-ups follow when the body is dropped, right after, or polled
    /// again.
    pub(crate) fn decide_deferred(&self, ending: Ending) -> bool {
        if !self.decide(ending) {
            return false;
        }
        self.unfinished.store(true, Ordering::Release);
        true
    }

    /// Finishes an end [`decide_deferred`](Self::decide_deferred) decided;
    /// does nothing otherwise, or a second time.
    pub(crate) fn finish_deferred(&self) {
        if self.unfinished.swap(false, Ordering::AcqRel)
            && let Some(ending) = self.ending()
        {
            self.finish(ending);
        }
    }

    /// Keeps cap slots until the stream ends; gives them back at once if it
    /// already has.
    pub(crate) fn hold(&self, permits: Vec<CapPermit>) {
        if permits.is_empty() {
            return;
        }
        let mut late = lock(&self.after.late);
        // `finish` records the end before it empties `permits` under the
        // same lock.
        if self.is_ended() {
            drop(late);
            permits.into_iter().for_each(CapPermit::release);
            return;
        }
        late.get_or_insert_default().permits.extend(permits);
    }

    /// Keeps what the stream's connection key is made from until the record
    /// goes: no other connection can have the key meanwhile.
    pub(crate) fn keep_anchor(&self, anchor: Anchor) {
        lock(&self.after.late).get_or_insert_default().anchor = Some(anchor);
    }

    /// Records the reason the response's `stream-guard-reason` named (a
    /// guard further along: a client's guard reads the server's).
    pub(crate) fn set_server_guard_reason(&self, ending: Ending) {
        self.server_guard_reason
            .store(ending.code(), Ordering::Relaxed);
    }

    /// The reason a guard further along named, for the end event.
    fn server_guard_reason(&self) -> Option<&'static str> {
        Ending::from_code(self.server_guard_reason.load(Ordering::Relaxed)).map(Ending::name)
    }

    /// Ends the stream as refused by `cap`, whose limit is `limit`.
    pub(crate) fn reject(&self, cap: StreamCap, limit: usize) {
        // A limit past u32::MAX is reported as u32::MAX.
        let limit = u32::try_from(limit).unwrap_or(u32::MAX);
        lock(&self.after.late).get_or_insert_default().cap_limit = limit;
        self.end(Ending::rejected(cap, self.after.lacks_key_of(cap)));
    }

    /// Ends the stream as refused by a drain in progress.
    pub(crate) fn refuse_draining(&self) {
        if self.end(Ending::DrainRefused)
            && let Some(drain) = self.shared.drain()
        {
            drain.count_refused();
        }
    }

    /// Ends the stream on its handle's request: the bodies end the way a
    /// guard's do, with `CANCELLED`.
    pub(crate) fn cancel_by_handle(&self) -> bool {
        self.end(Ending::CancelledByHandle)
    }

    /// Whether the response body handed on its last declared byte.
    pub(super) fn delivered(&self) -> bool {
        self.body.load(Ordering::Acquire) == BODY_SENT
    }

    /// The response body handed on its last declared byte (`BODY_SENT`).
    pub(crate) fn response_sent_declared(&self) {
        let _ =
            self.body
                .compare_exchange(BODY_OPEN, BODY_SENT, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Whether the stream was waiting for cap slots, which it no longer
    /// does: true for one caller only (`BODY_WAITING`).
    pub(crate) fn stops_waiting(&self) -> bool {
        self.body
            .compare_exchange(BODY_WAITING, BODY_NONE, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// The response body exists and hyper may poll it.
    pub(crate) fn response_opened(&self) {
        self.body.store(BODY_OPEN, Ordering::Release);
    }

    /// The response body ended, was read to its guard-made end, or was
    /// dropped.
    pub(crate) fn response_closed(&self) {
        // Kept for the ticket's drop that follows (see `abandoned`): only
        // this body sets it, so it cannot appear between the two.
        if self.body.load(Ordering::Acquire) == BODY_SENT {
            return;
        }
        if self.body.swap(BODY_NONE, Ordering::AcqRel) == BODY_STALLED
            && let Some(conn) = self.after.connection()
        {
            conn.stream_unstalled();
        }
    }

    /// The sentence a guard-made end is explained with, in `grpc-message`,
    /// errors and logs.
    pub(crate) fn message(&self, ending: Ending) -> String {
        let count = match self.min_rate() {
            Some(rate) if ending == Ending::SlowReader => rate.bytes,
            _ if ending.reason().cap().is_some() => u64::from(self.after.cap_limit()),
            _ => 0,
        };
        ending.message(self.limit(ending), count)
    }

    /// The error a guard-ended stream's bodies yield; `None` while the stream
    /// is open or when it ended by itself.
    pub(crate) fn guard_error(&self) -> Option<GuardError> {
        let ending = self.ending()?;
        let code = ending.status()?;
        Some(GuardError::new(
            ending.reason(),
            self.limit(ending),
            self.message(ending),
            code,
        ))
    }

    /// Everything an end does once it is decided: wakes every part of the
    /// stream, releases its timer and slots and emits its one end event.
    fn finish(&self, ending: Ending) {
        self.shared.timer.disarm(self);
        if self.grpc
            && let Some(code) = ending.status()
        {
            self.set_grpc_status(code);
        }
        self.response_waker.wake();
        self.request_waker.wake();
        // What only some streams have, taken under the lock `hold` and
        // `ended` check the end under: slots held after this are given back
        // by `hold`, and a waiter after this sees the end.
        let (permits, waiters) = lock(&self.after.late)
            .as_deref_mut()
            .map(|late| (std::mem::take(&mut late.permits), late.waiters.take()))
            .unwrap_or_default();
        if let Some(waiters) = waiters {
            waiters.notify_waiters();
        }
        // Slots first, and with no lock held: a stream waiting for one should
        // not wait for subscribers.
        permits.into_iter().for_each(CapPermit::release);
        if let Some(conn) = self.after.connection() {
            // An ending with a status of its own (a guard's, a handle's
            // cancel) goes out in place of the body's next part: a peer
            // that is not reading never gets it.
            if ending.status().is_some() {
                match self.body.compare_exchange(
                    BODY_OPEN,
                    BODY_STALLED,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    // Until the body is read or dropped, hyper keeps the
                    // stream: the connection guard closes the connection if
                    // that lasts.
                    Ok(_) => conn.stream_stalled(),
                    // The stream is its connection (an upgrade): read after
                    // the `late` lock above (see `Record::mark_taken_over`).
                    Err(BODY_TAKEN_OVER) => conn.close_taken_over(),
                    Err(_) => {}
                }
            }
            if ending.is_refusal() {
                conn.stream_refused();
            } else {
                conn.stream_ended();
            }
        }
        if let Some(drain) = self.shared.drain()
            && ending == Ending::Drained
        {
            drain.count_cut();
        }
        // The one clock read of an end.
        let now_ns = self.shared.timer.now_ns();
        let event = self.event(ending, now_ns);
        let waiting = self.stops_waiting();
        self.shared
            .report
            .ended(ending, &event, || self.route_of(), now_ns, waiting);
        // Last: the drain task counts the streams still active.
        if let Some(drain) = self.shared.drain() {
            drain.ended_one();
        }
    }

    /// The end event of a stream that ended as `ending` at `now_ns` on the
    /// guard's clock.
    fn event(&self, ending: Ending, now_ns: u64) -> EndEvent {
        let reason = ending.reason();
        let duration = Duration::from_nanos(now_ns.saturating_sub(self.start_ns()));
        let after = &self.after;
        EndEvent {
            id: self.id,
            method: after.method(),
            path: after.path.clone(),
            peer: after.peer(),
            connection: after.connection_key(),
            started_at: self.shared.timer.wall_of(self.start_ns(), now_ns),
            duration,
            reason,
            limit: (reason.is_guard() && reason.cap().is_none()).then(|| self.limit(ending)),
            cap_limit: reason.cap().map(|_| after.cap_limit() as usize),
            request: self.request_traffic(),
            response: self.response_traffic(),
            // A guard's end carries its own status, whatever the service's
            // head said while the end was being decided.
            grpc_status: match ending.status() {
                Some(code) if self.grpc => Some(code),
                _ => after.grpc_status(),
            },
            server_guard_reason: self.server_guard_reason(),
            blocked_on_reader: self.blocked_on_reader(),
        }
    }
}

#[cfg(all(test, not(stream_guard_loom)))]
#[path = "ending_tests.rs"]
mod tests;
