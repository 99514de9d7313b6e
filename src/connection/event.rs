//! What a connection guard tells about its connections: opened, closed and why.

use crate::json::JsonLine;

use std::{
    fmt,
    net::SocketAddr,
    time::{Duration, SystemTime},
};

/// Why a guarded connection closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ConnectionEnd {
    /// The IO was dropped without the guard closing it: the peer closed the
    /// connection, an IO error ended it, or the server finished with it.
    Closed,
    /// No stream was open for the idle timeout.
    Idle,
    /// A stream's guard fired and its peer did not read the ending within
    /// the stalled grace.
    Stalled,
    /// The connection reached its maximum age (plus grace).
    MaxAge,
    /// It was still open when a drain's grace period ended.
    Drained,
    /// [`ConnectionHandle::close`] was called.
    Manual,
}

impl ConnectionEnd {
    /// A short snake-case name: `closed`, `idle`, `stalled`, `max_age`,
    /// `drained` or `manual`.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionEnd::Closed => "closed",
            ConnectionEnd::Idle => "idle",
            ConnectionEnd::Stalled => "stalled",
            ConnectionEnd::MaxAge => "max_age",
            ConnectionEnd::Drained => "drained",
            ConnectionEnd::Manual => "manual",
        }
    }

    pub(crate) fn code(self) -> u8 {
        match self {
            ConnectionEnd::Closed => 1,
            ConnectionEnd::Idle => 2,
            ConnectionEnd::Stalled => 3,
            ConnectionEnd::MaxAge => 4,
            ConnectionEnd::Drained => 5,
            ConnectionEnd::Manual => 6,
        }
    }

    pub(crate) fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => ConnectionEnd::Closed,
            2 => ConnectionEnd::Idle,
            3 => ConnectionEnd::Stalled,
            4 => ConnectionEnd::MaxAge,
            5 => ConnectionEnd::Drained,
            6 => ConnectionEnd::Manual,
            _ => return None,
        })
    }
}

impl fmt::Display for ConnectionEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A connection opened or closed.
#[derive(Clone, Debug)]
pub struct ConnectionEvent {
    pub(crate) id: u64,
    pub(crate) peer: Option<SocketAddr>,
    pub(crate) end: Option<ConnectionEnd>,
    pub(crate) duration: Duration,
    pub(crate) streams: u64,
    pub(crate) at: SystemTime,
}

impl ConnectionEvent {
    /// The connection's id (as in [`ConnectionKey::from_id`]).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The peer's address, when the IO told it.
    pub fn peer(&self) -> Option<SocketAddr> {
        self.peer
    }

    /// `None` when the connection opened; why it closed otherwise.
    pub fn end(&self) -> Option<ConnectionEnd> {
        self.end
    }

    /// How long the connection was open (zero when it opened).
    pub fn duration(&self) -> Duration {
        self.duration
    }

    /// Streams the connection carried (guarded ones).
    pub fn streams(&self) -> u64 {
        self.streams
    }

    /// One line of JSON: `event` (`connection_opened` or
    /// `connection_closed`), `connection`, `peer`, and for closes `reason`,
    /// `duration_ms` and `streams`; `at_ms` is Unix time.
    pub fn to_json(&self) -> String {
        let at = self
            .at
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        let event = match self.end {
            None => "connection_opened",
            Some(_) => "connection_closed",
        };
        let mut line = JsonLine::new();
        line.str("event", event)
            .num("connection", self.id)
            .opt_str("peer", self.peer);
        if let Some(end) = self.end {
            line.str("reason", end.as_str())
                .num("duration_ms", self.duration.as_millis())
                .num("streams", self.streams);
        }
        line.num("at_ms", at).finish()
    }
}
