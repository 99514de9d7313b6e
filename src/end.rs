//! How a stream can end: [`EndReason`], with the idle direction and the cap
//! a reason may name.

use std::fmt;

/// Which side of a stream an idle timeout watches.
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

/// Which cap refused a stream.
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

/// Why a stream ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EndReason {
    /// The response body ended normally (end of stream or trailers).
    ///
    /// This says how the stream ended, not whether the call succeeded: a gRPC
    /// call that failed with a status of its own (`INTERNAL`, `UNIMPLEMENTED`,
    /// …) also completes; look at [`EndEvent::grpc_status`] for that.
    Completed,
    /// The stream was abandoned before it completed: the server dropped the
    /// response future or body, usually because the peer reset the stream or
    /// the connection went away.
    Cancelled,
    /// No frame moved in the given direction for the idle timeout.
    IdleTimeout(IdleDirection),
    /// The stream reached its maximum lifetime.
    LifetimeExceeded,
    /// The service or the response body returned an error.
    Error,
    /// The service (its `call` or its future) or the response body panicked
    /// while the guard was polling it. The panic still unwinds to whoever
    /// polled (tokio aborts the task, hyper resets the stream); the guard
    /// only makes sure the stream ends with it: handle cancelled, cap slots
    /// back, one event.
    Panicked,
    /// A stream cap refused the stream: the service never saw it. gRPC
    /// clients get `RESOURCE_EXHAUSTED`, plain HTTP clients `503`.
    Rejected(StreamCap),
    /// The server drained: the stream was still open when the drain's grace
    /// period ended, or it arrived after the drain began. gRPC clients get
    /// `UNAVAILABLE`, plain HTTP clients a reset stream (or `503` before
    /// headers). See [`Drain`](crate::Drain).
    Drained,
}

impl EndReason {
    /// A short snake-case name, as used in JSON event lines: `completed`,
    /// `cancelled`, `idle_timeout`, `lifetime_exceeded`, `error`,
    /// `panicked`, `rejected` or `drained`.
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Completed => "completed",
            EndReason::Cancelled => "cancelled",
            EndReason::IdleTimeout(_) => "idle_timeout",
            EndReason::LifetimeExceeded => "lifetime_exceeded",
            EndReason::Error => "error",
            EndReason::Panicked => "panicked",
            EndReason::Rejected(_) => "rejected",
            EndReason::Drained => "drained",
        }
    }

    /// Whether a guard of this crate ended the stream (as opposed to the
    /// stream ending by itself): a limit fired, a cap refused it or a drain
    /// cut it.
    pub fn is_guard(self) -> bool {
        matches!(
            self,
            EndReason::IdleTimeout(_)
                | EndReason::LifetimeExceeded
                | EndReason::Rejected(_)
                | EndReason::Drained
        )
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
    /// (`RESOURCE_EXHAUSTED`) for rejections, `14` (`UNAVAILABLE`) for drains;
    /// `None` for ends the guard did not make.
    pub fn grpc_code(self) -> Option<u32> {
        match self {
            EndReason::IdleTimeout(_) | EndReason::LifetimeExceeded => {
                Some(crate::grpc::DEADLINE_EXCEEDED)
            }
            EndReason::Rejected(_) => Some(crate::grpc::RESOURCE_EXHAUSTED),
            EndReason::Drained => Some(crate::grpc::UNAVAILABLE),
            _ => None,
        }
    }

    /// The idle direction, for [`EndReason::IdleTimeout`].
    pub fn direction(self) -> Option<IdleDirection> {
        match self {
            EndReason::IdleTimeout(direction) => Some(direction),
            _ => None,
        }
    }

    pub(crate) fn code(self) -> u8 {
        match self {
            EndReason::Completed => 1,
            EndReason::Cancelled => 2,
            EndReason::IdleTimeout(IdleDirection::Request) => 3,
            EndReason::IdleTimeout(IdleDirection::Response) => 4,
            EndReason::IdleTimeout(IdleDirection::Both) => 5,
            EndReason::LifetimeExceeded => 6,
            EndReason::Error => 7,
            EndReason::Rejected(StreamCap::PerConnection) => 8,
            EndReason::Rejected(StreamCap::PerPeer) => 9,
            EndReason::Rejected(StreamCap::Total) => 10,
            EndReason::Drained => 11,
            EndReason::Panicked => 12,
        }
    }

    pub(crate) fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => EndReason::Completed,
            2 => EndReason::Cancelled,
            3 => EndReason::IdleTimeout(IdleDirection::Request),
            4 => EndReason::IdleTimeout(IdleDirection::Response),
            5 => EndReason::IdleTimeout(IdleDirection::Both),
            6 => EndReason::LifetimeExceeded,
            7 => EndReason::Error,
            8 => EndReason::Rejected(StreamCap::PerConnection),
            9 => EndReason::Rejected(StreamCap::PerPeer),
            10 => EndReason::Rejected(StreamCap::Total),
            11 => EndReason::Drained,
            12 => EndReason::Panicked,
            _ => return None,
        })
    }
}

impl fmt::Display for EndReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndReason::IdleTimeout(direction) => write!(f, "idle timeout ({direction})"),
            EndReason::LifetimeExceeded => f.write_str("maximum lifetime exceeded"),
            EndReason::Rejected(cap) => write!(f, "rejected (stream cap {cap})"),
            other => f.write_str(other.as_str()),
        }
    }
}
