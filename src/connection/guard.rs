//! The connection guard and its builder.

use std::{
    fmt,
    hash::RandomState,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use atomic_waker::AtomicWaker;
use futures_core::Stream;
use tokio::{
    sync::{Notify, broadcast},
    time::Instant,
};

use super::{
    ConnectionEnd, ConnectionEvent, ConnectionHandle, GuardedIncoming, GuardedIo, PeerOf,
    registry::{ConnPolicy, ConnState, Connections, Table},
};
use crate::{
    drain::{Drain, Drained},
    error::{ConfigError, MAX_DURATION, check_duration, check_resolution},
    sync::NEVER,
    ticker::Ticker,
};

/// Wraps accepted connections: gives each an id, a [`ConnectionHandle`] and
/// open and close events, and closes the stalled, idle, over-age and drained
/// ones by failing their IO. See the [module docs](crate::connection) for
/// tonic, hyper-util, TLS and Unix sockets, costs and cancel safety.
///
/// Clones share the connections, the events and the timer.
///
/// ```
/// use std::time::Duration;
/// use tower_stream_guard::ConnectionGuard;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let connections = ConnectionGuard::builder()
///     .idle_timeout(Duration::from_secs(300))
///     .build()?;
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// let client = tokio::net::TcpStream::connect(listener.local_addr()?).await?;
/// let (tcp, _) = listener.accept().await?;
/// let io = connections.wrap(tcp);
/// assert_eq!(io.handle().peer(), Some(client.local_addr()?));
/// assert_eq!(connections.open_connections(), 1);
/// drop(io);
/// assert_eq!(connections.open_connections(), 0);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct ConnectionGuard {
    pub(crate) connections: Arc<Connections>,
}

impl fmt::Debug for ConnectionGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionGuard")
            .field("policy", &self.connections.policy)
            .field("open", &self.connections.open())
            .finish()
    }
}

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
    /// Starts building a connection guard. With nothing set it only gives
    /// connections ids, handles and events (and closes them at the end of a
    /// drain given with [`drain`](ConnectionGuardBuilder::drain)).
    pub fn builder() -> ConnectionGuardBuilder {
        ConnectionGuardBuilder {
            policy: ConnPolicy {
                idle: None,
                stalled_grace: None,
                max_age: None,
                max_age_grace: Duration::ZERO,
                max_age_jitter_percent: DEFAULT_MAX_AGE_JITTER_PERCENT,
                resolution: DEFAULT_CONNECTION_RESOLUTION,
            },
            capacity: crate::events::DEFAULT_EVENT_CAPACITY,
            drain: None,
            metrics: false,
        }
    }

    /// Wraps one accepted connection and emits its open event (a
    /// [`ConnectionEvent`] whose [`end`](ConnectionEvent::end) is `None`).
    /// The peer address is read from the IO where it can tell (see
    /// [`PeerOf`]). A connection wrapped after a drain given to this guard
    /// began is closed at once: its first read fails.
    ///
    /// Starts the guard's timer task if it needs one and none runs; without
    /// a tokio runtime, the timer cannot run and idle, stalled and over-age
    /// connections are not closed (a warning is logged once).
    ///
    /// ```
    /// use tower_stream_guard::ConnectionGuard;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let connections = ConnectionGuard::builder().build()?;
    /// let mut events = connections.subscribe();
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// let _client = tokio::net::TcpStream::connect(listener.local_addr()?).await?;
    /// let (tcp, _) = listener.accept().await?;
    /// let io = connections.wrap(tcp);
    /// let opened = events.recv().await?;
    /// assert_eq!((opened.id(), opened.end()), (io.handle().id(), None));
    /// # Ok(())
    /// # }
    /// ```
    pub fn wrap<IO: PeerOf>(&self, io: IO) -> GuardedIo<IO> {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let connections = &self.connections;
        let now = connections.now_ns();
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(ConnState {
            id,
            peer: io.peer(),
            opened: Instant::now(),
            opened_ns: now,
            max_age_ns: connections.draw_max_age(id),
            connections: Arc::clone(connections),
            end: AtomicU8::new(0),
            read_waker: AtomicWaker::new(),
            write_waker: AtomicWaker::new(),
            streams_open: AtomicUsize::new(0),
            streams_total: AtomicU64::new(0),
            quiet_since: AtomicU64::new(now),
            stalled: AtomicUsize::new(0),
            stalled_since: AtomicU64::new(NEVER),
            goaway_asked: AtomicBool::new(false),
            goaway: Notify::new(),
            reported: AtomicBool::new(false),
        });
        if connections.metrics {
            crate::meter::connection_opened();
        }
        if connections.needs_timer() {
            connections.ticker.note_current();
        }
        let start_timer = {
            let mut table = connections.lock();
            table.open.insert(state.id, Arc::downgrade(&state));
            let start = connections.needs_timer() && !table.running;
            table.running |= start;
            start
        };
        if start_timer {
            // Without the lock: a runtime that is shutting down drops the
            // task on the spot.
            Ticker::start(connections);
        }
        if connections.events.receiver_count() > 0 {
            let _ = connections.events.send(ConnectionEvent {
                id: state.id,
                peer: state.peer,
                end: None,
                duration: Duration::ZERO,
                streams: 0,
                at: SystemTime::now(),
            });
        }
        if let Some(drain) = &connections.drain
            && drain.is_draining()
        {
            // Accepted after the drain began: nothing should start on it.
            state.close(ConnectionEnd::Drained);
        }
        GuardedIo {
            inner: io,
            handle: ConnectionHandle { state },
            read_registered: None,
            write_registered: None,
        }
    }

    /// Wraps every connection an accept stream yields (as
    /// [`wrap`](Self::wrap) does), e.g. for tonic's `serve_with_incoming`;
    /// accept errors pass through.
    ///
    /// ```
    /// use tokio_stream::{StreamExt, wrappers::TcpListenerStream};
    /// use tower_stream_guard::ConnectionGuard;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let connections = ConnectionGuard::builder().build()?;
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// let addr = listener.local_addr()?;
    /// let mut incoming = connections.wrap_incoming(TcpListenerStream::new(listener));
    /// let _client = tokio::net::TcpStream::connect(addr).await?;
    /// let io = incoming.next().await.expect("a connection")?;
    /// assert!(!io.handle().is_closed());
    /// # Ok(())
    /// # }
    /// ```
    pub fn wrap_incoming<S, IO, E>(&self, incoming: S) -> GuardedIncoming<S>
    where
        S: Stream<Item = Result<IO, E>>,
        IO: PeerOf,
    {
        GuardedIncoming {
            incoming,
            guard: self.clone(),
        }
    }

    /// A receiver of connection events: one when a connection is wrapped,
    /// one when its [`GuardedIo`] is dropped (see [`ConnectionEvent`] for an
    /// example). Events are sent only while a receiver exists; a receiver
    /// that falls more than the
    /// [`event_capacity`](ConnectionGuardBuilder::event_capacity) behind is
    /// told how many it missed.
    pub fn subscribe(&self) -> broadcast::Receiver<ConnectionEvent> {
        self.connections.events.subscribe()
    }

    /// Connections wrapped whose [`GuardedIo`] has not been dropped yet (one
    /// the guard closed counts until hyper drops it).
    pub fn open_connections(&self) -> usize {
        self.connections.open()
    }

    #[cfg(feature = "hyper")]
    pub(crate) fn drain_shared(&self) -> Option<Arc<crate::drain::DrainShared>> {
        self.connections.drain.clone()
    }
}

impl ConnectionGuardBuilder {
    /// Closes a connection that had no guarded stream open for `timeout`.
    ///
    /// Streams are counted by the [`StreamGuardLayer`](crate::StreamGuardLayer)
    /// in front of the service, when it finds the connection's
    /// [`ConnectionHandle`] in the request extensions: without one, every
    /// connection looks idle. At least the
    /// [`resolution`](Self::resolution).
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.policy.idle = Some(timeout);
        self
    }

    /// Closes a connection `grace` after a guard ended one of its streams
    /// while the peer was not reading it (the ending was never sent): the
    /// only way to free what hyper keeps for such a stream. The stall is
    /// reported by the [`StreamGuardLayer`](crate::StreamGuardLayer) in
    /// front of the service. At least the [`resolution`](Self::resolution).
    pub fn stalled_grace(mut self, grace: Duration) -> Self {
        self.policy.stalled_grace = Some(grace);
        self
    }

    /// Asks for a graceful close ([`ConnectionHandle::goaway`]) of
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
    /// hard at the age). Needs `max_age`; at most 365 days.
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
    /// [`GuardedIo`] is dropped, never per read or write. Off by default.
    ///
    /// | Name | Kind | Labels |
    /// |------|------|--------|
    /// | `stream_guard_connections_active` | gauge | |
    /// | `stream_guard_connections_closed_total` | counter | `reason` |
    ///
    /// `reason` is [`ConnectionEnd::as_str`](crate::ConnectionEnd::as_str):
    /// `closed` when the guard did not close the connection, else `idle`,
    /// `stalled`, `max_age`, `drained` or `manual`. Stream metrics are
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
    /// a `max_age_jitter_percent` of 100 or more, or an event capacity of
    /// zero or over 65,536.
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
        });
        if let Some(drain) = drain {
            let drained: std::sync::Weak<dyn Drained> = Arc::downgrade(&connections) as _;
            drain.register_connections(drained);
        }
        Ok(ConnectionGuard { connections })
    }
}
