//! The connection guard's builder: its settings, checked when it is built.

use std::{
    hash::RandomState,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{sync::broadcast, time::Instant};

use super::{
    ConnectionGuard,
    registry::{ConnPolicy, Connections, Table},
};
use crate::{
    drain::{Drain, Drained},
    error::{ConfigError, MAX_DURATION, check_duration, check_resolution},
    ticker::Ticker,
};

/// The default spread of connections' maximum ages: ±10%, as gRFC A9 asks.
pub(crate) const DEFAULT_MAX_AGE_JITTER_PERCENT: u8 = 10;

/// The default tick of a connection guard's timer: 100 ms.
pub(crate) const DEFAULT_CONNECTION_RESOLUTION: Duration = Duration::from_millis(100);

/// Configures a [`ConnectionGuard`]; every setting is optional, and checked
/// by [`build`](Self::build).
///
/// ```
/// use std::time::Duration;
/// use tower_stream_guard::{ConfigError, ConnectionGuard, Drain};
///
/// let drain = Drain::new();
/// let connections = ConnectionGuard::builder()
///     .stalled_grace(Duration::from_secs(30))
///     .idle_timeout(Duration::from_secs(10 * 60))
///     .max_age(Duration::from_secs(30 * 60)) // ±10% per connection by default
///     .max_age_grace(Duration::from_secs(60))
///     .resolution(Duration::from_millis(250))
///     .event_capacity(4096)
///     .drain(&drain)
///     .build()?;
///
/// // Mistakes are refused when the guard is built.
/// let error = ConnectionGuard::builder()
///     .max_age_grace(Duration::from_secs(60))
///     .build()
///     .unwrap_err();
/// assert_eq!(error, ConfigError::GraceWithoutMaxAge);
/// let error = ConnectionGuard::builder()
///     .idle_timeout(Duration::from_millis(10)) // below the 100 ms resolution
///     .build()
///     .unwrap_err();
/// assert!(matches!(error, ConfigError::BelowResolution { setting: "idle_timeout", .. }));
/// # Ok::<(), ConfigError>(())
/// ```
#[derive(Clone, Debug)]
pub struct ConnectionGuardBuilder {
    policy: ConnPolicy,
    capacity: usize,
    drain: Option<Drain>,
    metrics: bool,
}

impl ConnectionGuard {
    /// Starts building a connection guard. With nothing set it gives
    /// connections ids, handles and events, sets the
    /// [dead-peer options](ConnectionGuardBuilder::dead_peer_timeout) (20 s)
    /// on TCP sockets, and closes connections at the end of a drain given
    /// with [`drain`](ConnectionGuardBuilder::drain).
    pub fn builder() -> ConnectionGuardBuilder {
        ConnectionGuardBuilder {
            policy: ConnPolicy {
                idle: None,
                stalled_grace: None,
                max_age: None,
                max_age_grace: Duration::ZERO,
                max_age_jitter_percent: DEFAULT_MAX_AGE_JITTER_PERCENT,
                resolution: DEFAULT_CONNECTION_RESOLUTION,
                dead_peer: Some(crate::socket::DEFAULT_DEAD_PEER_TIMEOUT),
            },
            capacity: crate::events::DEFAULT_EVENT_CAPACITY,
            drain: None,
            metrics: false,
        }
    }
}

impl ConnectionGuardBuilder {
    /// Closes a connection that had no guarded stream open for `timeout`:
    /// asks for a graceful close first
    /// ([`ConnectionHandle::goaway`](crate::ConnectionHandle::goaway);
    /// [`serve_connection`](crate::ConnectionGuard::serve_connection)
    /// sends HTTP/2 GOAWAY, as gRFC A9's `MAX_CONNECTION_IDLE` does, so the
    /// client starts no stream on it), then closes it hard one
    /// [`resolution`](Self::resolution) later if it is idle still. A stream
    /// that raced the GOAWAY is served, and the idle time starts over when
    /// it ends. Either way the close says
    /// [`Idle`](crate::ConnectionEnd::Idle).
    ///
    /// Streams the stream guard refused (a cap, a drain) never ran and do
    /// not count: a client whose every request is refused does not keep its
    /// connection open.
    ///
    /// Streams are counted by the [`StreamGuardLayer`](crate::StreamGuardLayer)
    /// in front of the service, when it finds the connection's
    /// [`ConnectionHandle`](crate::ConnectionHandle) in the request extensions: without one, every
    /// connection looks idle. At least the
    /// [`resolution`](Self::resolution).
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.policy.idle = Some(timeout);
        self
    }

    /// Closes a connection `grace` after a guard (or
    /// [`StreamHandle::cancel`](crate::StreamHandle::cancel)) ended one of
    /// its streams while the peer was not reading it (the ending was never
    /// sent): the only way to free what hyper keeps for such a stream. The
    /// stall is reported by the [`StreamGuardLayer`](crate::StreamGuardLayer)
    /// in front of the service. At least the [`resolution`](Self::resolution).
    pub fn stalled_grace(mut self, grace: Duration) -> Self {
        self.policy.stalled_grace = Some(grace);
        self
    }

    /// Asks for a graceful close ([`ConnectionHandle::goaway`](crate::ConnectionHandle::goaway)) of
    /// connections older than `age`, and closes them hard after
    /// [`max_age_grace`](Self::max_age_grace): clients reconnect, so load
    /// spreads over servers added since. At least the
    /// [`resolution`](Self::resolution).
    ///
    /// Each connection's age is jittered by ±10% by default, drawn when it
    /// is wrapped, as
    /// [gRFC A9](https://github.com/grpc/proposal/blob/master/A9-server-side-conn-mgt.md)
    /// asks: with `age` 30 minutes, connections go away between 27 and 33
    /// minutes after they open, so that connections opened together are not
    /// all cycled together again.
    /// [`max_age_jitter_percent`](Self::max_age_jitter_percent) changes the
    /// spread; `0` gives every connection exactly `age`.
    pub fn max_age(mut self, age: Duration) -> Self {
        self.policy.max_age = Some(age);
        self
    }

    /// Time between the graceful-close request at a connection's (jittered)
    /// [`max_age`](Self::max_age) and its hard close (default zero: closed
    /// hard one [`resolution`](Self::resolution) after the age, the least
    /// that lets a GOAWAY asked for at the age reach the peer first). Needs
    /// `max_age`; at most 365 days.
    pub fn max_age_grace(mut self, grace: Duration) -> Self {
        self.policy.max_age_grace = grace;
        self
    }

    /// Moves each connection's maximum age by a random amount of up to
    /// `percent` of [`max_age`](Self::max_age), up or down, drawn when the
    /// connection is wrapped (default 10: ±10%, as
    /// [gRFC A9](https://github.com/grpc/proposal/blob/master/A9-server-side-conn-mgt.md)
    /// asks, so that connections opened together, e.g. a fleet's clients
    /// reconnecting after a deploy, do not all reach their age, go away and
    /// reconnect together again). `0` turns jitter off: every connection
    /// gets exactly `max_age`. Below 100 (checked even without `max_age`,
    /// where it has no effect).
    ///
    /// The ages are spread evenly over `max_age` × (1 ± `percent`/100), and
    /// never below the [`resolution`](Self::resolution). Each connection's
    /// hard close still follows its own graceful-close request by
    /// [`max_age_grace`](Self::max_age_grace). The draw costs a hash of the
    /// connection's id with a per-guard random key, once per connection.
    ///
    /// A percentage rather than a fraction: whole percents are fine enough
    /// for spreading ages, and no value can be NaN or negative.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_stream_guard::{ConfigError, ConnectionGuard};
    ///
    /// // Connections go away between 27 and 33 minutes after they open.
    /// let connections = ConnectionGuard::builder()
    ///     .max_age(Duration::from_secs(30 * 60))
    ///     .max_age_jitter_percent(10)
    ///     .build()?;
    /// # drop(connections);
    /// let error = ConnectionGuard::builder()
    ///     .max_age(Duration::from_secs(30 * 60))
    ///     .max_age_jitter_percent(100)
    ///     .build()
    ///     .unwrap_err();
    /// assert_eq!(error, ConfigError::JitterTooLarge { percent: 100 });
    /// # Ok::<(), ConfigError>(())
    /// ```
    pub fn max_age_jitter_percent(mut self, percent: u8) -> Self {
        self.policy.max_age_jitter_percent = percent;
        self
    }

    /// Bounds how long a peer that vanished (no FIN, no RST: a pulled
    /// cable, a dead NAT entry, a sleeping laptop) goes unnoticed on each
    /// wrapped TCP connection: default **20 s**, `None` to leave the
    /// kernel's defaults (about 15 minutes on Linux for data left
    /// unacknowledged, never for a silent connection). Between 1 s and 1 h.
    ///
    /// The kernel does the watching, nothing is spent per read or write:
    /// the guard sets, once per connection, when it is wrapped,
    ///
    /// - `TCP_USER_TIMEOUT` = `timeout`: data sent and not acknowledged for
    ///   `timeout` aborts the connection. Without it, a server streaming to
    ///   a vanished client keeps writing into the HTTP/2 window and the
    ///   socket's send buffer (megabytes: minutes at 50 KB/s, hours at
    ///   1 KB/s) and sees a healthy reader;
    /// - TCP keepalive, first probe after `timeout / 2` of silence, then one
    ///   a second: a silent connection whose peer does not answer is aborted
    ///   about `timeout` after it was last heard from (Linux ends it at the
    ///   first probe past `timeout` when `TCP_USER_TIMEOUT` is set; the
    ///   probe count gives the same bound elsewhere). A live quiet peer
    ///   answers the first probe: one bare segment per `timeout / 2` of
    ///   silence.
    ///
    /// It replaces keepalive and user-timeout options the application set on
    /// the socket before wrapping it (tonic's `TcpIncoming::with_keepalive`,
    /// hyper-util's `set_keepalive`); `None` leaves them alone. Linux (5.11
    /// and later) also aborts a connection whose peer keeps a zero receive
    /// window for `timeout`: a live client that stops reading its socket
    /// altogether for that long (a paused process, an HTTP/1 download it
    /// does not read) is cut and reported unreachable.
    ///
    /// Choose it above the longest time a live client's link may hold data
    /// unacknowledged: the kernel cannot tell a link that delivers nothing
    /// for `timeout` from a dead one (under the fault suite, a 20 KB/s link
    /// lives with 2 s, a 500 B/s one with a deep queue is cut).
    ///
    /// When the kernel gives up, the connection's IO fails with `ETIMEDOUT`;
    /// the guard's close event says
    /// [`PeerUnreachable`](crate::ConnectionEnd::PeerUnreachable), and every
    /// stream still open on it ends with
    /// [`EndReason::PeerUnreachable`](crate::EndReason::PeerUnreachable)
    /// (not `Cancelled`, which stays for a peer that left), once, with its
    /// handle cancelled and its cap slots back.
    ///
    /// | platform | unacknowledged data | silent connection |
    /// |---|---|---|
    /// | Linux, Android, Fuchsia | `TCP_USER_TIMEOUT` | keepalive |
    /// | macOS, iOS, FreeBSD, NetBSD | platform retransmission limit | keepalive with probe count |
    /// | Windows | platform retransmission limit | keepalive (Windows' own probe count) |
    /// | others | platform retransmission limit | keepalive where socket2 sets it |
    ///
    /// The options go on sockets whose IO says what its TCP socket is
    /// ([`PeerOf::tcp_stream`](crate::connection::PeerOf::tcp_stream)):
    /// tokio's `TcpStream`, and rustls' `TlsStream` over one (set before
    /// the handshake when the guard wraps the TCP stream, after it when it
    /// wraps the TLS stream). Unix sockets need none.
    ///
    /// Where the crate drives the connection,
    /// [`serve_connection`](crate::ConnectionGuard::serve_connection) also
    /// sends HTTP/2 PINGs: one after `2 × timeout` without a frame from the
    /// peer, closing the connection when it is not answered within
    /// `timeout`: a backstop for what the kernel cannot see (a peer whose
    /// kernel answers but whose HTTP/2 stack is stuck, platforms without
    /// `TCP_USER_TIMEOUT`), timed so as not to race the kernel's bound. A
    /// connection PING closes is reported `Closed`, its streams
    /// `Cancelled`. Under tonic's `serve_with_incoming` the server drives
    /// the connection: set its own PING keepalive beside this, e.g.
    /// `Server::builder().http2_keepalive_interval(Some(2 * timeout)).http2_keepalive_timeout(Some(timeout))`
    /// (`examples/server.rs` does). `axum::serve` has no PING setting: the
    /// kernel's bound is all there is, or serve each connection with
    /// `serve_connection` instead.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_stream_guard::{ConfigError, ConnectionGuard};
    ///
    /// // Find a vanished client within about 5 s.
    /// let connections = ConnectionGuard::builder()
    ///     .dead_peer_timeout(Some(Duration::from_secs(5)))
    ///     .build()?;
    /// # drop(connections);
    /// // Keep the kernel's defaults.
    /// let connections = ConnectionGuard::builder().dead_peer_timeout(None).build()?;
    /// # drop(connections);
    /// let error = ConnectionGuard::builder()
    ///     .dead_peer_timeout(Some(Duration::from_millis(500)))
    ///     .build()
    ///     .unwrap_err();
    /// assert!(matches!(error, ConfigError::DeadPeerTimeoutOutOfRange { .. }));
    /// # Ok::<(), ConfigError>(())
    /// ```
    pub fn dead_peer_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.policy.dead_peer = timeout;
        self
    }

    /// How often the timer checks the connections (default 100 ms, between
    /// 1 ms and 1 s): closes happen at most this late.
    pub fn resolution(mut self, resolution: Duration) -> Self {
        self.policy.resolution = resolution;
        self
    }

    /// How many connection events a lagging receiver may fall behind
    /// (default 1,024, at most 65,536: the channel allocates its slots up
    /// front).
    pub fn event_capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity;
        self
    }

    /// Closes the connections still open when `drain` is over (its grace
    /// period plus [its close delay](Drain::with_close_delay)), and closes
    /// connections wrapped after it began at once. The drain's report counts
    /// the former in [`connections_closed`](crate::DrainReport::connections_closed).
    pub fn drain(mut self, drain: &Drain) -> Self {
        self.drain = Some(drain.clone());
        self
    }

    /// Records connection metrics through the
    /// [`metrics`](https://docs.rs/metrics) facade, for whatever exporter
    /// the application installs: when a connection is wrapped and when its
    /// [`GuardedIo`](crate::connection::GuardedIo) is dropped, never per read or write. Off by default.
    ///
    /// | Name | Kind | Labels |
    /// |------|------|--------|
    /// | `stream_guard_connections_active` | gauge | |
    /// | `stream_guard_connections_closed_total` | counter | `reason` |
    ///
    /// `reason` is [`ConnectionEnd::as_str`](crate::ConnectionEnd::as_str):
    /// `closed` when the guard did not close the connection (nor sent a
    /// max-age GOAWAY the connection then closed after), else `idle`,
    /// `stalled`, `max_age`, `drained`, `manual` or `peer_unreachable`. Stream metrics are
    /// [`StreamGuardBuilder::metrics`](crate::StreamGuardBuilder::metrics).
    ///
    /// ```
    /// use tower_stream_guard::ConnectionGuard;
    ///
    /// # fn main() -> Result<(), tower_stream_guard::ConfigError> {
    /// let connections = ConnectionGuard::builder().metrics(true).build()?;
    /// # drop(connections);
    /// # Ok(())
    /// # }
    /// ```
    #[cfg(feature = "metrics")]
    #[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
    pub fn metrics(mut self, enabled: bool) -> Self {
        self.metrics = enabled;
        self
    }

    /// Checks the configuration and builds the guard.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] for a zero duration or one over 365 days, a
    /// resolution outside 1 ms..=1 s, an `idle_timeout`, `stalled_grace` or
    /// `max_age` below the resolution, a `max_age_grace` without `max_age`,
    /// a `max_age_jitter_percent` of 100 or more, a `dead_peer_timeout`
    /// outside 1 s..=1 h, or an event capacity of zero or over 65,536.
    pub fn build(self) -> Result<ConnectionGuard, ConfigError> {
        let policy = self.policy;
        let resolution = policy.resolution;
        check_resolution("resolution", resolution)?;
        for (setting, value) in [
            ("idle_timeout", policy.idle),
            ("stalled_grace", policy.stalled_grace),
            ("max_age", policy.max_age),
        ] {
            if let Some(value) = value {
                check_duration(setting, value, Some(resolution))?;
            }
        }
        if policy.max_age_grace > MAX_DURATION {
            return Err(ConfigError::TooLong {
                setting: "max_age_grace",
                value: policy.max_age_grace,
            });
        }
        if !policy.max_age_grace.is_zero() && policy.max_age.is_none() {
            return Err(ConfigError::GraceWithoutMaxAge);
        }
        crate::socket::check_dead_peer_timeout(policy.dead_peer)?;
        if policy.max_age_jitter_percent >= 100 {
            return Err(ConfigError::JitterTooLarge {
                percent: policy.max_age_jitter_percent,
            });
        }
        crate::error::validate_event_capacity(self.capacity)?;
        let drain = self.drain.map(|drain| Arc::clone(drain.shared()));
        let connections = Arc::new(Connections {
            policy,
            base: Instant::now(),
            table: Mutex::new(Table::default()),
            events: broadcast::channel(self.capacity).0,
            drain: drain.clone(),
            ticker: Ticker::default(),
            metrics: self.metrics,
            age_key: RandomState::new(),
            #[cfg(feature = "test-view")]
            live: crate::view::Alive::default(),
        });
        if let Some(drain) = drain {
            let drained: std::sync::Weak<dyn Drained> = Arc::downgrade(&connections) as _;
            drain.register_connections(drained);
        }
        Ok(ConnectionGuard { connections })
    }
}
