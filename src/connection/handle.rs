//! The handle a guarded connection's streams find in their request
//! extensions.

use std::{
    fmt,
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
};

use super::{ConnectionEnd, registry::ConnState};
use crate::{
    peer::ConnectionKey,
    sync::{NEVER, wait_until},
};

/// A handle on a guarded connection: its id and peer, its open streams, a
/// way to close it, and the notice that it should close gracefully.
///
/// Handlers find it in the request extensions of the connection's streams
/// (tonic's `GuardedConnectInfo` is unpacked into it by the
/// [`StreamGuardLayer`](crate::StreamGuardLayer);
/// [`serve_connection`](crate::ConnectionGuard::serve_connection) inserts it
/// itself); an accept loop has it from
/// [`GuardedIo::handle`](crate::connection::GuardedIo::handle). See the
/// [module docs](crate::connection). Clones are cheap and refer to the same
/// connection.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use tower_stream_guard::ConnectionGuard;
///
/// let connections = ConnectionGuard::builder().build()?;
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// let _client = tokio::net::TcpStream::connect(listener.local_addr()?).await?;
/// let (tcp, _) = listener.accept().await?;
/// let io = connections.wrap(tcp);
///
/// let handle = io.handle().clone();
/// assert_eq!(handle.open_streams(), 0); // streams are counted by a StreamGuardLayer
/// assert!(!handle.is_closed());
/// handle.close();
/// assert!(handle.is_closed());
/// # Ok(())
/// # }
/// ```
///
/// In a tonic handler:
///
/// ```
/// use tower_stream_guard::ConnectionHandle;
///
/// fn log_connection<T>(request: &tonic::Request<T>) {
///     if let Some(connection) = request.extensions().get::<ConnectionHandle>() {
///         println!("connection {} from {:?}", connection.id(), connection.peer());
///     }
/// }
/// # log_connection(&tonic::Request::new(()));
/// ```
#[derive(Clone)]
pub struct ConnectionHandle {
    pub(crate) state: Arc<ConnState>,
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
    /// The connection's id, unique within the process (the same in its
    /// [`ConnectionEvent`](crate::ConnectionEvent)s).
    pub fn id(&self) -> u64 {
        self.state.id
    }

    /// The key stream caps count this connection under:
    /// [`ConnectionKey::from_id`] of its id.
    pub fn key(&self) -> ConnectionKey {
        ConnectionKey::from_id(self.state.id)
    }

    /// The peer's address, if the IO told it (see
    /// [`PeerOf`](crate::connection::PeerOf); `None` on a Unix socket).
    pub fn peer(&self) -> Option<SocketAddr> {
        self.state.peer
    }

    /// Streams open on this connection, as counted by the
    /// [`StreamGuardLayer`](crate::StreamGuardLayer)s that found this handle
    /// (streams no stream guard saw are not counted).
    pub fn open_streams(&self) -> usize {
        self.state.streams_open.load(Ordering::Relaxed)
    }

    /// Closes the connection now: its next read or write fails with
    /// `ConnectionAborted` (a pending one is woken), so hyper drops it and
    /// the peer sees the TCP connection close, without GOAWAY. Streams still
    /// open on it are dropped with it: their stream guards end them as
    /// [`Cancelled`](crate::EndReason::Cancelled). The close event says
    /// [`Manual`](crate::ConnectionEnd::Manual). Does nothing if the
    /// connection was already closed.
    pub fn close(&self) {
        self.state.close(ConnectionEnd::Manual);
    }

    /// Whether the guard closed the connection or found its peer
    /// unreachable (for any [`ConnectionEnd`](crate::ConnectionEnd) but
    /// `Closed`: a connection the peer or server closed is not seen here).
    pub fn is_closed(&self) -> bool {
        self.state.end.load(Ordering::Acquire) != 0
    }

    /// Resolves when the guard asks for a graceful close of this connection
    /// (its [`max_age`](crate::ConnectionGuardBuilder::max_age), jittered
    /// for this connection, was reached, or it was idle for the
    /// [`idle_timeout`](crate::ConnectionGuardBuilder::idle_timeout); at
    /// once if it was asked already): the code driving the connection
    /// should call hyper's `graceful_shutdown` (HTTP/2 GOAWAY).
    /// [`serve_connection`](crate::ConnectionGuard::serve_connection) does.
    /// The guard closes the connection hard
    /// [`max_age_grace`](crate::ConnectionGuardBuilder::max_age_grace)
    /// after the age, and an idle one a
    /// [`resolution`](crate::ConnectionGuardBuilder::resolution) later if
    /// it is idle still. Never resolves without a `max_age` or an
    /// `idle_timeout`.
    ///
    /// The future owns what it needs (`'static`): dropping it cancels
    /// nothing, and any number may wait.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_stream_guard::ConnectionGuard;
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let connections = ConnectionGuard::builder()
    ///     .max_age(Duration::from_secs(60))
    ///     .max_age_grace(Duration::from_secs(10))
    ///     .build()?;
    /// # struct Accepted;
    /// # impl tower_stream_guard::connection::PeerOf for Accepted {
    /// #     fn peer(&self) -> Option<std::net::SocketAddr> { None }
    /// # }
    /// # let accepted = Accepted;
    /// let opened = tokio::time::Instant::now();
    /// let io = connections.wrap(accepted);
    /// let handle = io.handle().clone();
    ///
    /// handle.goaway().await; // 54 to 66 s later: 60 s ± 10% (time is paused here)
    /// let age = opened.elapsed();
    /// assert!(age >= Duration::from_secs(54) && age <= Duration::from_millis(66_100));
    /// assert!(!handle.is_closed(), "graceful first");
    /// tokio::time::sleep(Duration::from_secs(11)).await;
    /// assert!(handle.is_closed(), "then hard");
    /// # Ok(())
    /// # }
    /// ```
    pub fn goaway(&self) -> impl Future<Output = ()> + Send + 'static {
        let state = Arc::clone(&self.state);
        async move {
            wait_until(&state.goaway, || state.goaway_reason().is_some()).await;
        }
    }

    /// Whether the connection was lost because its peer is unreachable:
    /// streams abandoned on it end as `PeerUnreachable`, not `Cancelled`.
    pub(crate) fn is_peer_unreachable(&self) -> bool {
        self.state.end() == Some(ConnectionEnd::PeerUnreachable)
    }

    /// The stream that took this connection over was ended by its guard
    /// (a limit, a drain, its handle's cancel): the connection is that
    /// stream, so it closes.
    pub(crate) fn close_taken_over(&self) {
        self.state.close(ConnectionEnd::UpgradeEnded);
    }

    /// Hands this connection to `stream` (see `takeover.rs`); gives it back
    /// when the connection has closed already or was taken over before.
    pub(crate) fn take_over(
        &self,
        stream: Arc<dyn super::TakenOver>,
    ) -> Result<(), Arc<dyn super::TakenOver>> {
        self.state.take_over(stream)
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

    /// A stream the stream guard refused (a cap, a drain) is over: it never
    /// ran, so the connection's quiet time goes on from where it was. A
    /// client whose every request is refused keeps no connection from
    /// closing idle.
    pub(crate) fn stream_refused(&self) {
        self.state.streams_open.fetch_sub(1, Ordering::Release);
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
        // hyper let the stream go only now: the connection's quiet time
        // starts now, not when the stream's guard fired.
        state
            .quiet_since
            .store(state.connections.now_ns(), Ordering::Relaxed);
        if state.stalled.fetch_sub(1, Ordering::AcqRel) == 1 {
            state.stalled_since.store(NEVER, Ordering::Release);
        }
    }
}
