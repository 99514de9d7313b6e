//! How a stream can end: [`EndReason`], with the idle direction and the cap
//! a reason may name, and the one table of endings every other fact about an
//! end is read from (its code, counter, gRPC status, message, log level).
//!
//! A stream's phase records an [`Ending`]: an [`EndReason`] made finer where
//! the peer is told something different (a drain that refused a stream rather
//! than cut it, a lifetime that was the client's `grpc-timeout`, a cap that
//! refused a stream it could not place). A new way to end is one variant and
//! one row in [`ROWS`].

use std::{fmt, time::Duration};

use http::StatusCode;

use crate::status;

/// Which side of a stream an idle timeout watches: the one an
/// [`EndReason::IdleTimeout`] names.
///
/// ```
/// use tower_stream_guard::{EndReason, IdleDirection};
///
/// let reason = EndReason::IdleTimeout(IdleDirection::Request);
/// assert_eq!(reason.direction(), Some(IdleDirection::Request));
/// assert_eq!(IdleDirection::Request.as_str(), "request");
/// assert_eq!(reason.to_string(), "idle timeout (request)");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IdleDirection {
    /// Frames the peer sends to the service (the request body).
    ///
    /// The timeout stops applying once the request body has ended, so a
    /// server-streaming call whose single request message has arrived is never
    /// idle on this side.
    Request,
    /// Frames the service sends to the peer (the response body). The clock runs
    /// from the moment the request reached the guard, so a handler that takes
    /// longer than the timeout to answer counts as idle too.
    Response,
    /// The stream is idle only when *neither* side moved a frame: for
    /// bidirectional calls where one side is legitimately quiet for a while.
    Both,
}

impl IdleDirection {
    /// A short lower-case name: `request`, `response` or `both`.
    pub fn as_str(self) -> &'static str {
        match self {
            IdleDirection::Request => "request",
            IdleDirection::Response => "response",
            IdleDirection::Both => "both",
        }
    }
}

impl fmt::Display for IdleDirection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which cap refused a stream: the one an [`EndReason::Rejected`] names.
///
/// ```
/// use std::convert::Infallible;
///
/// use http::{Request, Response, StatusCode};
/// use tower::{Layer, ServiceExt};
/// use tower_stream_guard::{BoxError, EndReason, StreamCap, StreamGuardLayer, stream::RequestBody};
///
/// # fn main() -> Result<(), BoxError> {
/// # tokio::runtime::Runtime::new()?.block_on(async {
/// let guard = StreamGuardLayer::builder().max_streams(1).build()?;
/// let mut events = guard.subscribe();
/// let service = guard.layer(tower::service_fn(|_: Request<RequestBody<String>>| async {
///     Ok::<_, Infallible>(Response::new("hello".to_owned()))
/// }));
/// // Holds the one slot until its body is read or dropped.
/// let first = service.clone().oneshot(Request::new(String::new())).await?;
/// let second = service.oneshot(Request::new(String::new())).await?;
/// assert_eq!(second.status(), StatusCode::SERVICE_UNAVAILABLE);
///
/// let event = events.recv().await?;
/// assert_eq!(event.reason(), EndReason::Rejected(StreamCap::Total));
/// assert_eq!(event.reason().cap().map(StreamCap::setting), Some("max_streams"));
/// assert_eq!(event.cap_limit(), Some(1));
/// assert_eq!(guard.stats().rejected(StreamCap::Total), 1);
/// # drop(first);
/// # Ok::<_, BoxError>(())
/// # })
/// # }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StreamCap {
    /// [`max_streams_per_connection`](crate::StreamGuardBuilder::max_streams_per_connection).
    PerConnection,
    /// [`max_streams_per_peer`](crate::StreamGuardBuilder::max_streams_per_peer).
    PerPeer,
    /// [`max_streams`](crate::StreamGuardBuilder::max_streams).
    Total,
}

impl StreamCap {
    /// A short snake-case name, as used in JSON event lines:
    /// `per_connection`, `per_peer` or `total`.
    pub fn as_str(self) -> &'static str {
        match self {
            StreamCap::PerConnection => "per_connection",
            StreamCap::PerPeer => "per_peer",
            StreamCap::Total => "total",
        }
    }

    /// The builder setting behind this cap, e.g. `max_streams_per_connection`.
    pub fn setting(self) -> &'static str {
        match self {
            StreamCap::PerConnection => "max_streams_per_connection",
            StreamCap::PerPeer => "max_streams_per_peer",
            StreamCap::Total => "max_streams",
        }
    }

    pub(crate) const ALL: [StreamCap; 3] = [
        StreamCap::PerConnection,
        StreamCap::PerPeer,
        StreamCap::Total,
    ];
}

impl fmt::Display for StreamCap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StreamCap::PerConnection => "per connection",
            StreamCap::PerPeer => "per peer",
            StreamCap::Total => "in total",
        })
    }
}

/// Why a stream ended: in every [`EndEvent`](crate::EndEvent), from
/// [`StreamHandle::end_reason`](crate::StreamHandle::end_reason), and counted
/// in [`GuardStats`](crate::GuardStats).
///
/// A peer reads the reason of a guard-made end too: whatever the guard
/// writes itself (gRPC trailers, a trailers-only response, a plain-HTTP
/// answer before headers) carries `stream-guard-reason: ` and
/// [`as_str`](Self::as_str): `idle_timeout`, `lifetime_exceeded`,
/// `rejected`, `drained`, `slow_reader`, or `cancelled` for
/// [`StreamHandle::cancel`](crate::StreamHandle::cancel). A guard around a
/// client reports the server guard's as
/// [`EndEvent::server_guard_reason`](crate::EndEvent::server_guard_reason).
///
/// ```
/// use tower_stream_guard::{EndReason, IdleDirection};
///
/// // One row per reason, for a dashboard.
/// for reason in EndReason::ALL {
///     println!("{:<18} {reason} (guard-made: {})", reason.as_str(), reason.is_guard());
/// }
/// let idle = EndReason::IdleTimeout(IdleDirection::Both);
/// assert_eq!(idle.as_str(), "idle_timeout");
/// assert_eq!(idle.grpc_code(), Some(4)); // DEADLINE_EXCEEDED
/// assert!(idle.is_guard());
/// assert!(!EndReason::Completed.is_guard());
/// assert_eq!(EndReason::Completed.grpc_code(), None);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EndReason {
    /// The response body ended normally (end of stream or trailers).
    ///
    /// This says how the stream ended, not whether the call succeeded: a gRPC
    /// call that failed with a status of its own (`INTERNAL`, `UNIMPLEMENTED`,
    /// …) also completes; look at
    /// [`EndEvent::grpc_status`](crate::EndEvent::grpc_status) for that.
    Completed,
    /// The stream was abandoned before it completed: the server dropped the
    /// response future or body, usually because the peer reset the stream or
    /// the connection went away, or
    /// [`StreamHandle::cancel`](crate::StreamHandle::cancel) ended it.
    Cancelled,
    /// No frame moved in the given direction for the idle timeout.
    IdleTimeout(IdleDirection),
    /// The stream reached its maximum lifetime.
    LifetimeExceeded,
    /// The service or the response body returned an error, or the service
    /// answered with an interim (`1xx`) status, which hyper refuses.
    Error,
    /// The service (its `call` or its future) or the response body panicked
    /// while the guard was polling it. The panic still unwinds to whoever
    /// polled (tokio aborts the task, hyper resets the stream); the guard
    /// only makes sure the stream ends with it: handle cancelled, cap slots
    /// back, one event.
    Panicked,
    /// A stream cap refused the stream: the service never saw it. gRPC
    /// clients get `RESOURCE_EXHAUSTED`, plain HTTP clients `503` with a
    /// `Retry-After` ([`retry_after`](crate::StreamGuardBuilder::retry_after)).
    Rejected(StreamCap),
    /// The server drained: the stream was still open when the drain's grace
    /// period ended, or it arrived after the drain began. gRPC clients get
    /// `UNAVAILABLE`, plain HTTP clients a reset stream (or `503` before
    /// headers, with a `Retry-After` when the drain refused the stream). See
    /// [`Drain`](crate::Drain).
    Drained,
    /// The peer read the response too slowly: it took fewer bytes than
    /// [`min_response_rate`](crate::StreamGuardBuilder::min_response_rate)
    /// asks for over a window during which the response had data waiting
    /// for it. gRPC clients get `RESOURCE_EXHAUSTED` (the server will not
    /// hold the stream's memory for a reader this slow), plain HTTP clients
    /// a reset stream.
    SlowReader,
    /// The stream was abandoned because its connection was lost to a peer
    /// that could not be reached: the kernel gave up on it (its
    /// [`dead_peer_timeout`](crate::ConnectionGuardBuilder::dead_peer_timeout),
    /// or its own retransmission limit) or the network said there is no
    /// route to it: a pulled cable, a dead NAT entry, a sleeping laptop.
    /// Known only on connections a
    /// [`ConnectionGuard`](crate::ConnectionGuard) wraps; elsewhere such a
    /// stream ends [`Cancelled`](Self::Cancelled). The peer is told nothing
    /// (it cannot be reached).
    PeerUnreachable,
}

impl EndReason {
    /// Every reason, in a fixed order (idle timeouts per direction, rejections
    /// per cap): for dashboards that list them all.
    pub const ALL: [EndReason; 14] = [
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
        EndReason::SlowReader,
        EndReason::PeerUnreachable,
    ];

    /// A short snake-case name, as used in JSON event lines: `completed`,
    /// `cancelled`, `idle_timeout`, `lifetime_exceeded`, `error`,
    /// `panicked`, `rejected`, `drained`, `slow_reader` or
    /// `peer_unreachable`.
    pub fn as_str(self) -> &'static str {
        Ending::of(self).row().name
    }

    /// Whether a guard of this crate ended the stream (as opposed to the
    /// stream ending by itself): a limit fired, a cap refused it or a drain
    /// cut it.
    pub fn is_guard(self) -> bool {
        Ending::of(self).row().log != Log::Quiet
    }

    /// The cap, for [`EndReason::Rejected`].
    pub fn cap(self) -> Option<StreamCap> {
        match self {
            EndReason::Rejected(cap) => Some(cap),
            _ => None,
        }
    }

    /// The gRPC status code a guard-made end carries: `4`
    /// (`DEADLINE_EXCEEDED`) for idle timeouts and lifetimes, `8`
    /// (`RESOURCE_EXHAUSTED`) for rejections and slow readers, `14`
    /// (`UNAVAILABLE`) for drains;
    /// `None` for ends the guard did not make.
    pub fn grpc_code(self) -> Option<u32> {
        Ending::of(self).row().status
    }

    /// The idle direction, for [`EndReason::IdleTimeout`].
    pub fn direction(self) -> Option<IdleDirection> {
        match self {
            EndReason::IdleTimeout(direction) => Some(direction),
            _ => None,
        }
    }

    /// A key naming this reason alone, as in [`GuardStats::to_json`](crate::GuardStats::to_json):
    /// `idle_timeout_request`, `rejected_per_peer`, `completed`, ...
    pub(crate) fn key(self) -> &'static str {
        Ending::of(self).row().key
    }
}

impl fmt::Display for EndReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndReason::IdleTimeout(direction) => write!(f, "idle timeout ({direction})"),
            EndReason::LifetimeExceeded => f.write_str("maximum lifetime exceeded"),
            EndReason::Rejected(cap) => write!(f, "rejected (stream cap {cap})"),
            EndReason::SlowReader => f.write_str("slow reader (minimum response rate)"),
            other => f.write_str(other.as_str()),
        }
    }
}

/// How a stream ended, as its phase records it: an [`EndReason`], finer where
/// the peer is told something different. The discriminant is the phase code
/// (0 is "still open") and indexes [`ROWS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Ending {
    Completed = 1,
    Cancelled,
    /// Ended through `StreamHandle::cancel`: the bodies end the way a
    /// guard's do, with `CANCELLED`.
    CancelledByHandle,
    IdleRequest,
    IdleResponse,
    IdleBoth,
    Lifetime,
    /// The lifetime was the client's `grpc-timeout`.
    ClientDeadline,
    Error,
    Panicked,
    RejectedPerConnection,
    RejectedPerPeer,
    RejectedTotal,
    /// `max_streams_per_connection` refused a stream nothing identified the
    /// connection of.
    RejectedNoConnection,
    /// `max_streams_per_peer` refused a stream whose peer is unknown.
    RejectedNoPeer,
    /// Still open when a drain's grace period ended.
    Drained,
    /// Arrived while a drain was in progress.
    DrainRefused,
    /// The reader took too few bytes (`min_response_rate`).
    SlowReader,
    /// Abandoned on a connection whose peer could not be reached.
    PeerUnreachable,
}

/// What an end is logged as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Log {
    /// The stream ended by itself: `DEBUG`.
    Quiet,
    /// A limit or a drain ended it: `INFO`.
    Guard,
    /// A cap refused it: `DEBUG`, summed up at `WARN` once a second.
    Refused,
}

/// Everything about one [`Ending`].
#[derive(Debug)]
pub(crate) struct Row {
    pub(crate) ending: Ending,
    pub(crate) reason: EndReason,
    /// [`EndReason::as_str`].
    pub(crate) name: &'static str,
    /// A name for the reason alone (per direction, per cap).
    pub(crate) key: &'static str,
    /// The gRPC status a guard-made end carries; `None` when the stream
    /// ended by itself (its bodies then end as the inner ones did).
    pub(crate) status: Option<u32>,
    /// The HTTP status of a plain-HTTP response the guard makes itself
    /// (before the service answered).
    pub(crate) http: StatusCode,
    pub(crate) log: Log,
    /// The sentence the peer and the logs read: `{limit}` stands for the
    /// limit that fired (a duration), `{cap_limit}` for a cap's limit.
    pub(crate) message: &'static str,
}

macro_rules! rows {
    ($($ending:ident => $reason:expr, $name:literal, $key:literal, $status:expr, $http:ident, $log:ident, $message:expr;)*) => {
        /// The table of endings, in [`Ending`] order.
        pub(crate) const ROWS: [Row; 19] = [$(Row {
            ending: Ending::$ending,
            reason: $reason,
            name: $name,
            key: $key,
            status: $status,
            http: StatusCode::$http,
            log: Log::$log,
            message: $message,
        }),*];

        impl Ending {
            /// Every ending, in code order.
            pub(crate) const ALL: [Ending; 19] = [$(Ending::$ending),*];
        }
    };
}

const DEADLINE: Option<u32> = Some(status::DEADLINE_EXCEEDED);
const EXHAUSTED: Option<u32> = Some(status::RESOURCE_EXHAUSTED);
const UNAVAILABLE: Option<u32> = Some(status::UNAVAILABLE);

rows! {
    Completed => EndReason::Completed, "completed", "completed", None, GATEWAY_TIMEOUT, Quiet,
        "stream ended: completed";
    Cancelled => EndReason::Cancelled, "cancelled", "cancelled", None, GATEWAY_TIMEOUT, Quiet,
        "stream ended: cancelled";
    CancelledByHandle => EndReason::Cancelled, "cancelled", "cancelled", Some(status::CANCELLED), GATEWAY_TIMEOUT, Quiet,
        "stream cancelled through its handle (StreamHandle::cancel)";
    IdleRequest => EndReason::IdleTimeout(IdleDirection::Request), "idle_timeout", "idle_timeout_request", DEADLINE, REQUEST_TIMEOUT, Guard,
        "stream idle: no request frame for {limit} (request_idle_timeout)";
    IdleResponse => EndReason::IdleTimeout(IdleDirection::Response), "idle_timeout", "idle_timeout_response", DEADLINE, GATEWAY_TIMEOUT, Guard,
        "stream idle: no response frame for {limit} (response_idle_timeout)";
    IdleBoth => EndReason::IdleTimeout(IdleDirection::Both), "idle_timeout", "idle_timeout_both", DEADLINE, GATEWAY_TIMEOUT, Guard,
        "stream idle: no frame moved either way for {limit} (idle_timeout)";
    Lifetime => EndReason::LifetimeExceeded, "lifetime_exceeded", "lifetime_exceeded", DEADLINE, GATEWAY_TIMEOUT, Guard,
        "stream exceeded its maximum lifetime of {limit} (max_lifetime)";
    ClientDeadline => EndReason::LifetimeExceeded, "lifetime_exceeded", "lifetime_exceeded", DEADLINE, GATEWAY_TIMEOUT, Guard,
        "stream passed the deadline of {limit} the client set (grpc-timeout)";
    Error => EndReason::Error, "error", "error", None, GATEWAY_TIMEOUT, Quiet,
        "stream ended: error";
    Panicked => EndReason::Panicked, "panicked", "panicked", None, GATEWAY_TIMEOUT, Quiet,
        "stream ended: panicked";
    RejectedPerConnection => EndReason::Rejected(StreamCap::PerConnection), "rejected", "rejected_per_connection", EXHAUSTED, SERVICE_UNAVAILABLE, Refused,
        "stream refused: at most {cap_limit} concurrent streams per connection (max_streams_per_connection)";
    RejectedPerPeer => EndReason::Rejected(StreamCap::PerPeer), "rejected", "rejected_per_peer", EXHAUSTED, SERVICE_UNAVAILABLE, Refused,
        "stream refused: at most {cap_limit} concurrent streams per peer (max_streams_per_peer)";
    RejectedTotal => EndReason::Rejected(StreamCap::Total), "rejected", "rejected_total", EXHAUSTED, SERVICE_UNAVAILABLE, Refused,
        "stream refused: at most {cap_limit} concurrent streams in total (max_streams)";
    RejectedNoConnection => EndReason::Rejected(StreamCap::PerConnection), "rejected", "rejected_per_connection", EXHAUSTED, SERVICE_UNAVAILABLE, Refused,
        "stream refused: max_streams_per_connection is set but the request carries no connection identity \
         (no connect info names its connection; custom IO with a `()` connect info has none): \
         wrap the accepted IO with ConnectionGuard, or supply a ConnectionKey or ConnectionHandle extension, \
         tonic's TcpConnectInfo, TlsConnectInfo<TcpConnectInfo> or UdsConnectInfo, axum's ConnectInfo<SocketAddr> \
         (feature `axum`), or a connection_key function (per connection)";
    RejectedNoPeer => EndReason::Rejected(StreamCap::PerPeer), "rejected", "rejected_per_peer", EXHAUSTED, SERVICE_UNAVAILABLE, Refused,
        "stream refused: max_streams_per_peer is set but the request carries no peer \
         address; supply a PeerAddr extension, tonic's TcpConnectInfo or \
         TlsConnectInfo<TcpConnectInfo>, axum's ConnectInfo<SocketAddr> (feature `axum`), an \
         address-based ConnectionKey, or a ConnectionGuard over an IO that knows its peer (per peer)";
    Drained => EndReason::Drained, "drained", "drained", UNAVAILABLE, SERVICE_UNAVAILABLE, Guard,
        "stream cut: the server is draining and its {limit} grace period ended (drain)";
    DrainRefused => EndReason::Drained, "drained", "drained", UNAVAILABLE, SERVICE_UNAVAILABLE, Guard,
        "stream refused: the server is draining and accepts no new streams (drain)";
    // RESOURCE_EXHAUSTED, not DEADLINE_EXCEEDED: no deadline passed (the
    // stream may be young, the producer on time); the server stops holding
    // buffers for a peer that does not take them, a quota on its memory.
    // It also keeps the peer from reading it as its own `grpc-timeout`. The
    // HTTP status is only for an answer before the response head, which
    // this ending never has (it needs a response body waiting on the
    // reader); 408 says the client was the slow one.
    SlowReader => EndReason::SlowReader, "slow_reader", "slow_reader", EXHAUSTED, REQUEST_TIMEOUT, Guard,
        "stream too slow: the client read fewer than {bytes} bytes in {limit} while data waited for it (min_response_rate)";
    // Not guard-made: nothing can tell the peer, and the stream was
    // abandoned (hyper dropped it with its connection) like a cancelled one.
    PeerUnreachable => EndReason::PeerUnreachable, "peer_unreachable", "peer_unreachable", None, GATEWAY_TIMEOUT, Quiet,
        "stream ended: its connection was lost, the peer is unreachable";
}

impl Ending {
    /// The plain ending of `reason` (the first of its rows).
    pub(crate) fn of(reason: EndReason) -> Ending {
        // `ROWS` is short and every reason has a row.
        ROWS.iter()
            .find(|row| row.reason == reason)
            .map_or(Ending::Cancelled, |row| row.ending)
    }

    /// The ending a stream refused by `cap` has; `unidentified` when the
    /// stream carries no key for that cap (no connection, no peer).
    pub(crate) fn rejected(cap: StreamCap, unidentified: bool) -> Ending {
        match (cap, unidentified) {
            (StreamCap::PerConnection, true) => Ending::RejectedNoConnection,
            (StreamCap::PerPeer, true) => Ending::RejectedNoPeer,
            (StreamCap::PerConnection, false) => Ending::RejectedPerConnection,
            (StreamCap::PerPeer, false) => Ending::RejectedPerPeer,
            (StreamCap::Total, _) => Ending::RejectedTotal,
        }
    }

    /// The ending a phase code records; `None` for 0 (still open).
    pub(crate) fn from_code(code: u8) -> Option<Ending> {
        Ending::ALL.get(usize::from(code).checked_sub(1)?).copied()
    }

    /// The phase code.
    pub(crate) fn code(self) -> u8 {
        self as u8
    }

    pub(crate) fn row(self) -> &'static Row {
        &ROWS[usize::from(self.code()) - 1]
    }

    pub(crate) fn reason(self) -> EndReason {
        self.row().reason
    }

    /// The gRPC status the peer reads when this ending was guard-made.
    pub(crate) fn status(self) -> Option<u32> {
        self.row().status
    }

    /// The HTTP status of a plain-HTTP answer the guard makes before the
    /// service answered: `408` for a request-side idle timeout (the client
    /// stalled; also a slow reader's, which never answers so early), `503`
    /// for a cap or a drain, `504` otherwise.
    pub(crate) fn http_status(self) -> StatusCode {
        self.row().http
    }

    /// Whether this ending refused a stream the service never saw (a cap, a
    /// drain in progress): its plain-HTTP answer says when to retry.
    pub(crate) fn is_refusal(self) -> bool {
        self.row().log == Log::Refused || self == Ending::DrainRefused
    }

    /// The first guard-made ending whose name ([`EndReason::as_str`]) is
    /// `value`, as a guard writes it in `stream-guard-reason`; `None` for
    /// anything else.
    pub(crate) fn guard_named(value: &[u8]) -> Option<Ending> {
        ROWS.iter()
            .find(|row| row.status.is_some() && row.name.as_bytes() == value)
            .map(|row| row.ending)
    }

    /// [`EndReason::as_str`] of this ending's reason.
    pub(crate) fn name(self) -> &'static str {
        self.row().name
    }

    /// The sentence the peer and the logs read, with the limit that fired
    /// (`limit`) and the count that goes with it (`count`: a cap's limit,
    /// `{cap_limit}`, or a minimum rate's bytes, `{bytes}`) filled in.
    pub(crate) fn message(self, limit: Duration, count: u64) -> String {
        let mut message = self.row().message.to_owned();
        if message.contains("{limit}") {
            message = message.replace("{limit}", &format!("{limit:?}"));
        }
        for placeholder in ["{cap_limit}", "{bytes}"] {
            if message.contains(placeholder) {
                message = message.replace(placeholder, &count.to_string());
            }
        }
        message
    }
}

#[cfg(test)]
#[path = "end_tests.rs"]
mod tests;
