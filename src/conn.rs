//! The connection guard: an id per accepted connection, and closing the
//! connections hyper would otherwise keep forever.
//!
//! A [`ConnectionGuard`] wraps each accepted IO object (a `TcpStream`, a TLS
//! stream) in a [`GuardedIo`]. The guard can then close a connection by
//! failing its reads and writes, which makes hyper drop it at once:
//!
//! - **stalled**: a stream's guard fired but its peer never read the ending
//!   (hyper no longer polls a body without flow-control window, so the
//!   HTTP/2 stream stays open until the peer reads or the connection
//!   closes): the connection is closed after
//!   [`stalled_grace`](ConnectionGuardBuilder::stalled_grace);
//! - **idle**: no stream open for
//!   [`idle_timeout`](ConnectionGuardBuilder::idle_timeout);
//! - **max age**: older than [`max_age`](ConnectionGuardBuilder::max_age),
//!   closed [`max_age_grace`](ConnectionGuardBuilder::max_age_grace) later
//!   (GOAWAY first, where the code that drives the connection asks for it
//!   through [`ConnectionHandle::goaway`]);
//! - **drained**: still open after a [`Drain`]'s grace period.
//!
//! Each connection gets an id, visible to guards and handlers as a
//! [`ConnectionHandle`] in the request extensions (tonic inserts the
//! [`GuardedConnectInfo`] of [`GuardedIo`]'s `Connected` implementation, or
//! `TlsConnectInfo<GuardedConnectInfo<_>>` when the guard wraps the TCP
//! stream under the application's TLS acceptor; the guard layer hands on the
//! inner `TcpConnectInfo`, `TlsConnectInfo` or `UdsConnectInfo`, so
//! `tonic::Request::remote_addr` keeps working). Opening and closing are
//! [`ConnectionEvent`]s.
//!
//! Costs: per read or write of the connection, one atomic load; a waker is
//! registered only when the IO is pending with a different waker than last
//! time. One timer task per connection guard, ticking every
//! [`resolution`](ConnectionGuardBuilder::resolution) (100 ms by default)
//! while it has connections, scans them.

use std::{
    collections::HashMap,
    fmt,
    fmt::Write as _,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError, Weak,
        atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll, Waker},
    time::{Duration, SystemTime},
};

use atomic_waker::AtomicWaker;
use futures_core::Stream;
use pin_project_lite::pin_project;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::{Notify, broadcast},
    time::Instant,
};

use crate::{
    cap::ConnectionKey,
    drain::Drain,
    policy::{ConfigError, MAX_DURATION},
    ticker::{Job, Lease, Ticker},
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

    fn code(self) -> u8 {
        match self {
            ConnectionEnd::Closed => 1,
            ConnectionEnd::Idle => 2,
            ConnectionEnd::Stalled => 3,
            ConnectionEnd::MaxAge => 4,
            ConnectionEnd::Drained => 5,
            ConnectionEnd::Manual => 6,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
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
    id: u64,
    peer: Option<SocketAddr>,
    end: Option<ConnectionEnd>,
    duration: Duration,
    streams: u64,
    at: SystemTime,
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
        let mut out = String::with_capacity(160);
        let at = self
            .at
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        let event = match self.end {
            None => "connection_opened",
            Some(_) => "connection_closed",
        };
        let _ = write!(out, "{{\"event\":\"{event}\",\"connection\":{}", self.id);
        match self.peer {
            // A socket address needs no JSON escaping.
            Some(peer) => {
                let _ = write!(out, ",\"peer\":\"{peer}\"");
            }
            None => out.push_str(",\"peer\":null"),
        }
        if let Some(end) = self.end {
            let _ = write!(
                out,
                ",\"reason\":\"{}\",\"duration_ms\":{},\"streams\":{}",
                end.as_str(),
                self.duration.as_millis(),
                self.streams
            );
        }
        let _ = write!(out, ",\"at_ms\":{at}}}");
        out
    }
}

const NEVER: u64 = u64::MAX;

/// The settings of a connection guard.
#[derive(Clone, Copy, Debug)]
struct ConnPolicy {
    idle: Option<Duration>,
    stalled_grace: Option<Duration>,
    max_age: Option<Duration>,
    max_age_grace: Duration,
    resolution: Duration,
}

/// Every connection of one connection guard.
pub(crate) struct Connections {
    policy: ConnPolicy,
    base: Instant,
    table: Mutex<Table>,
    events: broadcast::Sender<ConnectionEvent>,
    drain: Option<Arc<crate::drain::DrainShared>>,
    /// The runtimes the timer task may run on: it moves when its runtime
    /// shuts down while connections of other runtimes are open.
    ticker: Ticker,
}

#[derive(Default)]
struct Table {
    open: HashMap<u64, Weak<ConnState>>,
    running: bool,
}

/// One connection's shared record.
pub(crate) struct ConnState {
    id: u64,
    peer: Option<SocketAddr>,
    opened: Instant,
    opened_ns: u64,
    connections: Arc<Connections>,
    /// 0 while open, else the `ConnectionEnd` code.
    end: AtomicU8,
    read_waker: AtomicWaker,
    write_waker: AtomicWaker,
    streams_open: AtomicUsize,
    streams_total: AtomicU64,
    /// When the last stream ended (or the connection opened), ns since base.
    quiet_since: AtomicU64,
    stalled: AtomicUsize,
    stalled_since: AtomicU64,
    goaway_asked: AtomicBool,
    goaway: Notify,
    reported: AtomicBool,
}

/// A handle on a guarded connection, in the request extensions of its
/// streams (see the [module docs](crate::conn)). Clones are cheap.
#[derive(Clone)]
pub struct ConnectionHandle {
    state: Arc<ConnState>,
}

impl fmt::Debug for ConnectionHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionHandle")
            .field("id", &self.state.id)
            .field("peer", &self.state.peer)
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl ConnectionHandle {
    /// The connection's id, unique within the process.
    pub fn id(&self) -> u64 {
        self.state.id
    }

    /// The key stream caps count this connection under:
    /// [`ConnectionKey::from_id`] of its id.
    pub fn key(&self) -> ConnectionKey {
        ConnectionKey::from_id(self.state.id)
    }

    /// The peer's address, if the IO told it.
    pub fn peer(&self) -> Option<SocketAddr> {
        self.state.peer
    }

    /// Guarded streams open on this connection.
    pub fn open_streams(&self) -> usize {
        self.state.streams_open.load(Ordering::Relaxed)
    }

    /// Closes the connection now: its next read or write fails and hyper
    /// drops it (the peer sees the TCP connection close). Streams still open
    /// on it are cancelled.
    pub fn close(&self) {
        self.state.close(ConnectionEnd::Manual);
    }

    /// Whether the guard closed the connection.
    pub fn is_closed(&self) -> bool {
        self.state.end.load(Ordering::Acquire) != 0
    }

    /// Resolves when the guard asks for a graceful close of this connection
    /// (its maximum age was reached): the code driving the connection should
    /// call hyper's `graceful_shutdown` (HTTP/2 GOAWAY). The guard closes it
    /// hard [`max_age_grace`](ConnectionGuardBuilder::max_age_grace) later.
    pub fn goaway(&self) -> impl Future<Output = ()> + Send + 'static {
        let state = Arc::clone(&self.state);
        async move {
            loop {
                let asked = state.goaway.notified();
                tokio::pin!(asked);
                asked.as_mut().enable();
                if state.goaway_asked.load(Ordering::Acquire) {
                    return;
                }
                asked.await;
            }
        }
    }

    pub(crate) fn stream_started(&self) {
        self.state.streams_open.fetch_add(1, Ordering::Relaxed);
        self.state.streams_total.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn stream_ended(&self) {
        let state = &self.state;
        // The time first, then the count (released): a timer that sees no
        // stream open also sees when the last one ended, never an older time
        // that would close the connection as idle at once.
        state
            .quiet_since
            .store(state.connections.now_ns(), Ordering::Relaxed);
        state.streams_open.fetch_sub(1, Ordering::Release);
    }

    /// A guard ended a stream whose response body hyper is not reading.
    pub(crate) fn stream_stalled(&self) {
        let state = &self.state;
        // The time first, then the count, as in `stream_ended`: a timer that
        // sees a stalled stream never sees an older stall's time with it.
        if state.stalled.load(Ordering::Acquire) == 0 {
            state
                .stalled_since
                .store(state.connections.now_ns(), Ordering::Release);
        }
        state.stalled.fetch_add(1, Ordering::AcqRel);
    }

    /// That body was read (or dropped) after all.
    pub(crate) fn stream_unstalled(&self) {
        let state = &self.state;
        if state.stalled.fetch_sub(1, Ordering::AcqRel) == 1 {
            state.stalled_since.store(NEVER, Ordering::Release);
        }
    }
}

impl ConnState {
    fn close(&self, end: ConnectionEnd) -> bool {
        if self
            .end
            .compare_exchange(0, end.code(), Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return false;
        }
        tracing::debug!(
            target: "tower_stream_guard",
            connection = self.id,
            reason = end.as_str(),
            "closing connection"
        );
        self.read_waker.wake();
        self.write_waker.wake();
        true
    }

    fn closed_error(&self) -> Option<io::Error> {
        let end = ConnectionEnd::from_code(self.end.load(Ordering::Acquire))?;
        Some(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            format!("connection closed by tower-stream-guard ({end})"),
        ))
    }

    /// Emits the close event once, and forgets the connection.
    fn report_closed(&self) {
        if self.reported.swap(true, Ordering::AcqRel) {
            return;
        }
        let end = ConnectionEnd::from_code(self.end.load(Ordering::Acquire))
            .unwrap_or(ConnectionEnd::Closed);
        let duration = self.opened.elapsed();
        let event = ConnectionEvent {
            id: self.id,
            peer: self.peer,
            end: Some(end),
            duration,
            streams: self.streams_total.load(Ordering::Relaxed),
            at: SystemTime::now(),
        };
        self.connections.lock().open.remove(&self.id);
        if self.connections.events.receiver_count() > 0 {
            let _ = self.connections.events.send(event);
        }
        if let Some(drain) = &self.connections.drain {
            drain.ended_one();
        }
    }

    /// What the timer decides for this connection at `now`.
    fn check(&self, policy: &ConnPolicy, now: u64) {
        let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(NEVER);
        if let Some(grace) = policy.stalled_grace
            // The count decides; `stalled_since` only says since when. The
            // two are updated one after the other, so a stall and an unstall
            // racing can leave a time with no stalled stream (ignored here,
            // and overwritten by the next stall) or a stalled stream with no
            // time (its grace starts now).
            && self.stalled.load(Ordering::Acquire) > 0
        {
            let since = match self.stalled_since.load(Ordering::Acquire) {
                NEVER => {
                    let _ = self.stalled_since.compare_exchange(
                        NEVER,
                        now,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                    now
                }
                since => since,
            };
            if now.saturating_sub(since) >= ns(grace) {
                self.close(ConnectionEnd::Stalled);
                return;
            }
        }
        if let Some(idle) = policy.idle
            && self.streams_open.load(Ordering::Acquire) == 0
            && now.saturating_sub(self.quiet_since.load(Ordering::Relaxed)) >= ns(idle)
        {
            self.close(ConnectionEnd::Idle);
            return;
        }
        if let Some(age) = policy.max_age {
            let lived = now.saturating_sub(self.opened_ns);
            if lived >= ns(age) && !self.goaway_asked.swap(true, Ordering::AcqRel) {
                self.goaway.notify_waiters();
            }
            if lived >= ns(age).saturating_add(ns(policy.max_age_grace)) {
                self.close(ConnectionEnd::MaxAge);
            }
        }
    }
}

impl Connections {
    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        // Nothing under this lock can leave the table half-updated.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(NEVER - 1)
    }

    /// Connections open now.
    pub(crate) fn open(&self) -> usize {
        self.lock().open.len()
    }

    /// Closes every open connection (a drain's end); how many it closed.
    pub(crate) fn close_all(&self) -> u64 {
        let open: Vec<_> = self
            .lock()
            .open
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        open.iter()
            .filter(|state| state.close(ConnectionEnd::Drained))
            .count() as u64
    }

    fn needs_timer(&self) -> bool {
        self.policy.idle.is_some()
            || self.policy.stalled_grace.is_some()
            || self.policy.max_age.is_some()
    }
}

impl Job for Connections {
    const NO_RUNTIME: &'static str = "no tokio runtime when a connection was wrapped: idle timeouts and maximum ages of connections are not enforced";

    fn ticker(&self) -> &Ticker {
        &self.ticker
    }

    fn run(lease: Lease<Self>) -> impl Future<Output = ()> + Send + 'static {
        run_timer(lease)
    }

    fn still_needed(&self) -> bool {
        let mut table = self.lock();
        table.running = !table.open.is_empty();
        table.running
    }

    fn stopped(&self) {
        self.lock().running = false;
    }
}

async fn run_timer(mut lease: Lease<Connections>) {
    let connections = Arc::clone(lease.job());
    let mut ticks = tokio::time::interval(connections.policy.resolution);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let open: Vec<_> = {
            let mut table = connections.lock();
            if table.open.is_empty() {
                // Stopped under the lock: a connection wrapped after this
                // starts a new task.
                table.running = false;
                lease.finish();
                return;
            }
            table.open.values().filter_map(Weak::upgrade).collect()
        };
        let now = connections.now_ns();
        for state in open {
            state.check(&connections.policy, now);
        }
    }
}

/// Wraps accepted connections; see the [module docs](crate::conn).
/// Clones share the connections and the timer.
#[derive(Clone)]
pub struct ConnectionGuard {
    connections: Arc<Connections>,
}

impl fmt::Debug for ConnectionGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionGuard")
            .field("policy", &self.connections.policy)
            .field("open", &self.connections.open())
            .finish()
    }
}

/// The default tick of a connection guard's timer: 100 ms.
pub const DEFAULT_CONNECTION_RESOLUTION: Duration = Duration::from_millis(100);

/// Configures a [`ConnectionGuard`]; every setting is optional.
#[derive(Clone, Debug)]
pub struct ConnectionGuardBuilder {
    policy: ConnPolicy,
    capacity: usize,
    drain: Option<Drain>,
}

impl ConnectionGuard {
    /// Starts building a connection guard. With nothing set it only gives
    /// connections ids and events, and closes them at a drain's end.
    pub fn builder() -> ConnectionGuardBuilder {
        ConnectionGuardBuilder {
            policy: ConnPolicy {
                idle: None,
                stalled_grace: None,
                max_age: None,
                max_age_grace: Duration::ZERO,
                resolution: DEFAULT_CONNECTION_RESOLUTION,
            },
            capacity: crate::DEFAULT_EVENT_CAPACITY,
            drain: None,
        }
    }

    /// Wraps one accepted connection, with an `Opened` event. `peer` is
    /// read from the IO where it can tell (see [`PeerOf`]).
    pub fn wrap<IO: PeerOf>(&self, io: IO) -> GuardedIo<IO> {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let connections = &self.connections;
        let now = connections.now_ns();
        let state = Arc::new(ConnState {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            peer: io.peer(),
            opened: Instant::now(),
            opened_ns: now,
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

    /// Wraps every connection an accept stream yields, e.g. for tonic's
    /// `serve_with_incoming`.
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

    /// A receiver of connection events: one when a connection opens, one
    /// when it closes.
    pub fn subscribe(&self) -> broadcast::Receiver<ConnectionEvent> {
        self.connections.events.subscribe()
    }

    /// Connections wrapped and not yet closed.
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
    /// in front of the service: without one, every connection looks idle.
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.policy.idle = Some(timeout);
        self
    }

    /// Closes a connection `grace` after a guard ended one of its streams
    /// while the peer was not reading it (the ending was never sent): the
    /// only way to free what hyper keeps for such a stream.
    pub fn stalled_grace(mut self, grace: Duration) -> Self {
        self.policy.stalled_grace = Some(grace);
        self
    }

    /// Asks for a graceful close ([`ConnectionHandle::goaway`]) of
    /// connections older than `age`, and closes them hard after
    /// [`max_age_grace`](Self::max_age_grace).
    pub fn max_age(mut self, age: Duration) -> Self {
        self.policy.max_age = Some(age);
        self
    }

    /// Time between the graceful-close request at
    /// [`max_age`](Self::max_age) and the hard close (default zero).
    pub fn max_age_grace(mut self, grace: Duration) -> Self {
        self.policy.max_age_grace = grace;
        self
    }

    /// How often the timer checks the connections (default 100 ms, between
    /// 1 ms and 1 s): closes happen at most this late.
    pub fn resolution(mut self, resolution: Duration) -> Self {
        self.policy.resolution = resolution;
        self
    }

    /// How many connection events a lagging receiver may fall behind.
    pub fn event_capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity;
        self
    }

    /// Closes the connections still open when `drain`'s grace period ends,
    /// and refuses (closes) connections accepted after it began.
    pub fn drain(mut self, drain: &Drain) -> Self {
        self.drain = Some(drain.clone());
        self
    }

    /// Checks the configuration and builds the guard.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] for a zero or absurd duration, a resolution out of
    /// range, a duration below the resolution, a grace without `max_age`, or
    /// a zero event capacity.
    pub fn build(self) -> Result<ConnectionGuard, ConfigError> {
        let policy = self.policy;
        let resolution = policy.resolution;
        if !(crate::MIN_TIMER_RESOLUTION..=crate::MAX_TIMER_RESOLUTION).contains(&resolution) {
            return Err(ConfigError::ResolutionOutOfRange { value: resolution });
        }
        for (setting, value) in [
            ("idle_timeout", policy.idle),
            ("stalled_grace", policy.stalled_grace),
            ("max_age", policy.max_age),
        ] {
            let Some(value) = value else { continue };
            if value.is_zero() {
                return Err(ConfigError::Zero { setting });
            }
            if value > MAX_DURATION {
                return Err(ConfigError::TooLong { setting, value });
            }
            if value < resolution {
                return Err(ConfigError::BelowResolution {
                    setting,
                    value,
                    resolution,
                });
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
        crate::policy::validate_event_capacity(self.capacity)?;
        let drain = self.drain.map(|drain| Arc::clone(drain.shared()));
        let connections = Arc::new(Connections {
            policy,
            base: Instant::now(),
            table: Mutex::new(Table::default()),
            events: broadcast::channel(self.capacity).0,
            drain: drain.clone(),
            ticker: Ticker::default(),
        });
        if let Some(drain) = drain {
            drain.register_connections(&connections);
        }
        Ok(ConnectionGuard { connections })
    }
}

/// IO objects whose peer address a [`ConnectionGuard`] can read, for its
/// events and for stream guards' per-peer cap.
///
/// Implemented for tokio's `TcpStream` and `UnixStream` (no IP peer), for
/// [`GuardedIo`], and with feature `tls` for
/// `tokio_rustls::server::TlsStream` over any of them, so that the guard can
/// wrap either the TCP stream under an application's TLS acceptor or the TLS
/// stream it yields. Implement it for your own IO type by returning the
/// underlying socket's peer address, or `None`.
pub trait PeerOf {
    /// The peer's address, if known.
    fn peer(&self) -> Option<SocketAddr>;
}

impl PeerOf for tokio::net::TcpStream {
    fn peer(&self) -> Option<SocketAddr> {
        self.peer_addr().ok()
    }
}

/// A Unix socket has no IP peer: its connections are known by their
/// [`ConnectionHandle`] alone.
#[cfg(unix)]
impl PeerOf for tokio::net::UnixStream {
    fn peer(&self) -> Option<SocketAddr> {
        None
    }
}

/// The peer of the stream under the TLS session.
#[cfg(feature = "tls")]
#[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
impl<IO: PeerOf> PeerOf for tokio_rustls::server::TlsStream<IO> {
    fn peer(&self) -> Option<SocketAddr> {
        self.get_ref().0.peer()
    }
}

impl<IO: PeerOf> PeerOf for GuardedIo<IO> {
    fn peer(&self) -> Option<SocketAddr> {
        self.handle.peer()
    }
}

pin_project! {
    /// An accepted connection a [`ConnectionGuard`] watches. Reads and
    /// writes pass through until the guard closes the connection; then they
    /// fail with `ConnectionAborted`, and hyper drops the connection.
    /// Dropping it emits the connection's close event.
    pub struct GuardedIo<IO> {
        #[pin]
        inner: IO,
        handle: ConnectionHandle,
        read_registered: Option<Waker>,
        write_registered: Option<Waker>,
    }

    impl<IO> PinnedDrop for GuardedIo<IO> {
        fn drop(this: Pin<&mut Self>) {
            this.project().handle.state.report_closed();
        }
    }
}

impl<IO> GuardedIo<IO> {
    /// The connection's handle; insert it into request extensions in a
    /// hand-written hyper accept loop so that stream guards find it.
    pub fn handle(&self) -> &ConnectionHandle {
        &self.handle
    }

    /// The wrapped IO.
    pub fn get_ref(&self) -> &IO {
        &self.inner
    }
}

impl<IO: fmt::Debug> fmt::Debug for GuardedIo<IO> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuardedIo")
            .field("inner", &self.inner)
            .field("connection", &self.handle.state.id)
            .finish()
    }
}

/// Registers `waker` in `slot` unless it is the one registered last.
fn register(slot: &AtomicWaker, registered: &mut Option<Waker>, waker: &Waker) {
    if !registered.as_ref().is_some_and(|w| w.will_wake(waker)) {
        slot.register(waker);
        *registered = Some(waker.clone());
    }
}

impl<IO: AsyncRead> AsyncRead for GuardedIo<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let state = &this.handle.state;
        if let Some(err) = state.closed_error() {
            return Poll::Ready(Err(err));
        }
        match this.inner.poll_read(cx, buf) {
            Poll::Pending => {
                register(&state.read_waker, this.read_registered, cx.waker());
                match state.closed_error() {
                    Some(err) => Poll::Ready(Err(err)),
                    None => Poll::Pending,
                }
            }
            ready => ready,
        }
    }
}

impl<IO: AsyncWrite> AsyncWrite for GuardedIo<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let state = &this.handle.state;
        if let Some(err) = state.closed_error() {
            return Poll::Ready(Err(err));
        }
        match this.inner.poll_write(cx, buf) {
            Poll::Pending => {
                register(&state.write_waker, this.write_registered, cx.waker());
                match state.closed_error() {
                    Some(err) => Poll::Ready(Err(err)),
                    None => Poll::Pending,
                }
            }
            ready => ready,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        if let Some(err) = this.handle.state.closed_error() {
            return Poll::Ready(Err(err));
        }
        this.inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let state = &this.handle.state;
        if let Some(err) = state.closed_error() {
            return Poll::Ready(Err(err));
        }
        match this.inner.poll_write_vectored(cx, bufs) {
            Poll::Pending => {
                register(&state.write_waker, this.write_registered, cx.waker());
                match state.closed_error() {
                    Some(err) => Poll::Ready(Err(err)),
                    None => Poll::Pending,
                }
            }
            ready => ready,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// What tonic puts in the request extensions for a [`GuardedIo`]: the inner
/// IO's connect info and the connection's handle. The stream guard layer
/// also inserts both separately (the inner info as itself, e.g.
/// `TcpConnectInfo`, so `tonic::Request::remote_addr` keeps working).
#[derive(Clone, Debug)]
pub struct GuardedConnectInfo<T> {
    inner: T,
    handle: ConnectionHandle,
}

impl<T> GuardedConnectInfo<T> {
    /// The inner IO's connect info.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// The connection's handle.
    pub fn handle(&self) -> &ConnectionHandle {
        &self.handle
    }
}

#[cfg(feature = "tonic")]
#[cfg_attr(docsrs, doc(cfg(feature = "tonic")))]
impl<IO: tonic::transport::server::Connected> tonic::transport::server::Connected
    for GuardedIo<IO>
{
    type ConnectInfo = GuardedConnectInfo<IO::ConnectInfo>;

    fn connect_info(&self) -> Self::ConnectInfo {
        GuardedConnectInfo {
            inner: self.inner.connect_info(),
            handle: self.handle.clone(),
        }
    }
}

pin_project! {
    /// An accept stream whose connections a [`ConnectionGuard`] wraps; from
    /// [`ConnectionGuard::wrap_incoming`].
    pub struct GuardedIncoming<S> {
        #[pin]
        incoming: S,
        guard: ConnectionGuard,
    }
}

impl<S: fmt::Debug> fmt::Debug for GuardedIncoming<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuardedIncoming")
            .field("incoming", &self.incoming)
            .finish_non_exhaustive()
    }
}

impl<S, IO, E> Stream for GuardedIncoming<S>
where
    S: Stream<Item = Result<IO, E>>,
    IO: PeerOf,
{
    type Item = Result<GuardedIo<IO>, E>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.project();
        this.incoming
            .poll_next(cx)
            .map(|next| next.map(|io| io.map(|io| this.guard.wrap(io))))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.incoming.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use super::{ConnectionGuard, ConnectionHandle, GuardedIo, PeerOf};

    /// An IO that is never read: the tests drive the connection's state.
    struct NoIo;

    impl PeerOf for NoIo {
        fn peer(&self) -> Option<SocketAddr> {
            None
        }
    }

    const GRACE: Duration = Duration::from_secs(1);

    fn connection(guard: &ConnectionGuard) -> (GuardedIo<NoIo>, ConnectionHandle) {
        let io = guard.wrap(NoIo);
        let handle = io.handle().clone();
        (io, handle)
    }

    fn check(guard: &ConnectionGuard, handle: &ConnectionHandle, now: u64) {
        handle.state.check(&guard.connections.policy, now);
    }

    fn secs(s: u64) -> u64 {
        s * 1_000_000_000
    }

    /// A stall and an unstall racing: the unstall's "no time" lands first,
    /// the stall's time after it, with no stalled stream left.
    #[tokio::test(start_paused = true)]
    async fn a_stall_time_without_a_stalled_stream_never_closes_the_connection() {
        let guard = ConnectionGuard::builder()
            .stalled_grace(GRACE)
            .build()
            .expect("valid configuration");
        let (_io, handle) = connection(&guard);
        let state = &handle.state;
        state.stalled.fetch_add(1, Ordering::AcqRel);
        handle.stream_unstalled();
        state.stalled_since.store(0, Ordering::Release);
        check(&guard, &handle, secs(10));
        assert!(
            !handle.is_closed(),
            "closed as stalled with nothing stalled"
        );
    }

    /// The other order: a stalled stream whose time was wiped by a racing
    /// unstall of another one still gets its connection closed, one grace
    /// after the timer noticed it.
    #[tokio::test(start_paused = true)]
    async fn a_stalled_stream_without_a_stall_time_still_closes_the_connection() {
        let guard = ConnectionGuard::builder()
            .stalled_grace(GRACE)
            .build()
            .expect("valid configuration");
        let (_io, handle) = connection(&guard);
        handle.stream_stalled();
        handle
            .state
            .stalled_since
            .store(super::NEVER, Ordering::Release);
        check(&guard, &handle, secs(10));
        assert!(!handle.is_closed(), "the grace starts when noticed");
        check(&guard, &handle, secs(11));
        assert!(handle.is_closed(), "a stalled reader's connection closes");
    }

    /// The last stream's end is seen with its time: a connection is never
    /// closed as idle the moment its last stream ends.
    #[tokio::test(start_paused = true)]
    async fn the_last_stream_ending_restarts_the_idle_time() {
        let guard = ConnectionGuard::builder()
            .idle_timeout(GRACE)
            .build()
            .expect("valid configuration");
        let (_io, handle) = connection(&guard);
        handle.stream_started();
        tokio::time::advance(Duration::from_secs(10)).await;
        handle.stream_ended();
        let now = guard.connections.now_ns();
        check(&guard, &handle, now);
        assert!(
            !handle.is_closed(),
            "closed as idle as its last stream ended"
        );
        check(&guard, &handle, now + secs(1));
        assert!(handle.is_closed(), "idle for the idle timeout");
    }
}
