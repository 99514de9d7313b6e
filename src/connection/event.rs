//! What a connection guard tells about its connections: opened, closed and why.

use crate::json::JsonLine;

use std::{
    fmt,
    net::SocketAddr,
    time::{Duration, SystemTime},
};

/// Why a guarded connection closed, in its close
/// [`ConnectionEvent`]'s [`end`](ConnectionEvent::end).
///
/// ```
/// use tower_stream_guard::ConnectionEnd;
///
/// assert_eq!(ConnectionEnd::MaxAge.as_str(), "max_age");
/// assert_eq!(ConnectionEnd::Stalled.to_string(), "stalled");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ConnectionEnd {
    /// The IO was dropped without the guard closing it: the peer closed the
    /// connection, an IO error ended it, or the server finished with it.
    Closed,
    /// No stream was open for the idle timeout.
    Idle,
    /// A stream's guard fired (or its handle cancelled it) and its peer did
    /// not read the ending within the stalled grace.
    Stalled,
    /// The connection reached its maximum age: it closed after the GOAWAY
    /// asked for then (gracefully, or hard at the end of the grace).
    MaxAge,
    /// It was still open when a drain's grace period ended.
    Drained,
    /// [`ConnectionHandle::close`](crate::ConnectionHandle::close) was called.
    Manual,
    /// The peer could not be reached: the kernel gave up on it (data left
    /// unacknowledged or keepalive probes unanswered for the
    /// [`dead_peer_timeout`](crate::ConnectionGuardBuilder::dead_peer_timeout),
    /// or its own retransmission limit) or the network said there is no
    /// route to it. The streams still open on it end with
    /// [`EndReason::PeerUnreachable`](crate::EndReason::PeerUnreachable).
    PeerUnreachable,
    /// The connection had been taken over by an upgraded stream (a
    /// WebSocket, any HTTP/1.1 upgrade or `CONNECT` tunnel) whose stream
    /// guard ended it: a limit fired, a drain cut it, or its handle
    /// cancelled it. The stream's end event says which.
    UpgradeEnded,
}

impl ConnectionEnd {
    /// A short snake-case name, as in [`ConnectionEvent::to_json`]:
    /// `closed`, `idle`, `stalled`, `max_age`, `drained`, `manual`,
    /// `peer_unreachable` or `upgrade_ended`.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionEnd::Closed => "closed",
            ConnectionEnd::Idle => "idle",
            ConnectionEnd::Stalled => "stalled",
            ConnectionEnd::MaxAge => "max_age",
            ConnectionEnd::Drained => "drained",
            ConnectionEnd::Manual => "manual",
            ConnectionEnd::PeerUnreachable => "peer_unreachable",
            ConnectionEnd::UpgradeEnded => "upgrade_ended",
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
            ConnectionEnd::PeerUnreachable => 7,
            ConnectionEnd::UpgradeEnded => 8,
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
            7 => ConnectionEnd::PeerUnreachable,
            8 => ConnectionEnd::UpgradeEnded,
            _ => return None,
        })
    }
}

impl fmt::Display for ConnectionEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A connection opened or closed, from
/// [`ConnectionGuard::subscribe`](crate::ConnectionGuard::subscribe): one
/// event when a connection is wrapped ([`end`](Self::end) is `None`), one
/// when its IO is dropped.
///
/// ```
/// use tower_stream_guard::{ConnectionEnd, ConnectionGuard};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let connections = ConnectionGuard::builder().build()?;
/// let mut events = connections.subscribe();
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// let _client = tokio::net::TcpStream::connect(listener.local_addr()?).await?;
/// let (tcp, _) = listener.accept().await?;
/// let io = connections.wrap(tcp);
/// io.handle().close();
/// drop(io);
///
/// let opened = events.recv().await?;
/// assert!(opened.to_json().starts_with(r#"{"event":"connection_opened","connection":"#));
/// let closed = events.recv().await?;
/// assert_eq!(closed.end(), Some(ConnectionEnd::Manual));
/// assert_eq!(closed.streams(), 0);
/// let line = closed.to_json();
/// assert!(line.contains(r#""event":"connection_closed""#));
/// assert!(line.contains(r#""reason":"manual""#));
/// # Ok(())
/// # }
/// ```
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
    /// The connection's id, as [`ConnectionHandle::id`](crate::ConnectionHandle::id)
    /// (and [`ConnectionKey::from_id`](crate::ConnectionKey::from_id) of it
    /// is the key stream caps count the connection under).
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

    /// Streams the connection carried, as counted by the stream guards that
    /// found its handle (zero when it opened).
    pub fn streams(&self) -> u64 {
        self.streams
    }

    /// One line of JSON: `event` (`connection_opened` or
    /// `connection_closed`), `connection`, `peer` (a string, or `null`), and
    /// for closes `reason` ([`ConnectionEnd::as_str`]), `duration_ms` and
    /// `streams`; last `at_ms`, when it happened in Unix milliseconds. See
    /// the example on [`ConnectionEvent`].
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
