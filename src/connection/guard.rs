//! The connection guard: wrapping connections, their events and counts.
//! Its builder is in `builder.rs`.

use std::{
    fmt,
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
    registry::{ConnState, Connections},
    takeover::Takeover,
};
use crate::{sync::NEVER, ticker::Ticker};

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

impl ConnectionGuard {
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
        if let (Some(timeout), Some(tcp)) = (connections.policy.dead_peer, io.tcp_stream())
            && let Err(error) = crate::socket::set_dead_peer_timeout(tcp, timeout)
        {
            // A socket already closed by its peer refuses options: nothing
            // to watch then.
            tracing::debug!(
                target: "tower_stream_guard",
                connection = id,
                %error,
                "dead-peer socket options not set"
            );
        }
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
            goaway_for: AtomicU8::new(0),
            goaway_sent: AtomicBool::new(false),
            goaway: Notify::new(),
            reported: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            takeover: Mutex::new(Takeover::None),
            taken_over: AtomicBool::new(false),
        });
        #[cfg(feature = "test-view")]
        connections.live.born();
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
            taker: None,
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
    /// [`event_capacity`](crate::ConnectionGuardBuilder::event_capacity) behind is
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
