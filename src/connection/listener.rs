//! axum's listener for guarded connections (feature `axum`): `axum::serve`
//! accepts through a [`GuardedListener`], so every connection it serves is
//! a [`GuardedIo`] the connection guard can close.

use std::{fmt, io};

use axum::{
    extract::connect_info::Connected,
    serve::{IncomingStream, Listener},
};

use super::{ConnectionGuard, GuardedConnectInfo, GuardedIo, PeerOf};

/// A listener for `axum::serve` whose connections a [`ConnectionGuard`]
/// wraps, from [`ConnectionGuard::wrap_listener`] (feature `axum`). Each
/// connection the inner listener accepts is handed to axum as a
/// [`GuardedIo`], with the address the inner listener reported; accept
/// errors are the inner listener's to handle (axum's own listeners log them
/// and retry), so this one never fails.
///
/// Serve the router with
/// `into_make_service_with_connect_info::<GuardedConnectInfo<SocketAddr>>()`
/// (see [`GuardedConnectInfo`]): that is how the connection's
/// [`ConnectionHandle`](crate::ConnectionHandle) reaches the requests, where
/// a [`StreamGuardLayer`](crate::StreamGuardLayer) unpacks it into the
/// handle and axum's `ConnectInfo<SocketAddr>`. With plain
/// `into_make_service()`, connections still get ids and events and are
/// closed at a drain's end, at their maximum age and by hand, but no request
/// carries the handle: stream guards cannot count the connection's streams,
/// so every connection looks idle to an
/// [`idle_timeout`](crate::ConnectionGuardBuilder::idle_timeout) and a
/// [`stalled_grace`](crate::ConnectionGuardBuilder::stalled_grace) never
/// fires.
///
/// axum drives its connections itself, so nothing answers
/// [`goaway`](crate::ConnectionHandle::goaway): a connection over its
/// [`max_age`](crate::ConnectionGuardBuilder::max_age) is closed hard
/// `max_age_grace` later, without a GOAWAY.
///
/// ```
/// use std::{net::SocketAddr, time::Duration};
///
/// use axum::{Extension, Router, extract::ConnectInfo, routing::get};
/// use tokio::io::{AsyncReadExt, AsyncWriteExt};
/// use tower_stream_guard::{
///     ConnectionGuard, ConnectionHandle, StreamGuardLayer, connection::GuardedConnectInfo,
/// };
///
/// async fn hello(
///     Extension(connection): Extension<ConnectionHandle>,
///     ConnectInfo(peer): ConnectInfo<SocketAddr>,
/// ) -> String {
///     format!("connection {} from {}", connection.id(), peer.ip())
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let connections = ConnectionGuard::builder()
///     .stalled_grace(Duration::from_secs(30))
///     .build()?;
/// let guard = StreamGuardLayer::builder()
///     .response_idle_timeout(Duration::from_secs(30))
///     .build()?;
/// let app = Router::new().route("/", get(hello)).layer(guard);
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// let addr = listener.local_addr()?;
/// let mut events = connections.subscribe();
/// tokio::spawn(async move {
///     axum::serve(
///         connections.wrap_listener(listener),
///         app.into_make_service_with_connect_info::<GuardedConnectInfo<SocketAddr>>(),
///     )
///     .await
/// });
///
/// // An HTTP/1.1 request by hand: the handler saw the handle and the peer.
/// let mut client = tokio::net::TcpStream::connect(addr).await?;
/// client
///     .write_all(b"GET / HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n")
///     .await?;
/// let mut response = String::new();
/// client.read_to_string(&mut response).await?;
/// let opened = events.recv().await?;
/// let expected = format!("connection {} from 127.0.0.1", opened.id());
/// assert!(response.ends_with(&expected), "{response}");
/// # Ok(())
/// # }
/// ```
pub struct GuardedListener<L> {
    listener: L,
    guard: ConnectionGuard,
}

impl<L> GuardedListener<L> {
    /// The inner listener.
    pub fn get_ref(&self) -> &L {
        &self.listener
    }
}

impl<L: fmt::Debug> fmt::Debug for GuardedListener<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuardedListener")
            .field("listener", &self.listener)
            .finish_non_exhaustive()
    }
}

#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
impl ConnectionGuard {
    /// Wraps every connection `listener` accepts (as [`wrap`](Self::wrap)
    /// does), for `axum::serve`. See [`GuardedListener`] for a server and
    /// for the connect info that brings the connection's handle to the
    /// stream guard.
    ///
    /// ```
    /// use axum::serve::Listener;
    /// use tower_stream_guard::ConnectionGuard;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let connections = ConnectionGuard::builder().build()?;
    /// let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// let addr = tcp.local_addr()?;
    /// let mut listener = connections.wrap_listener(tcp);
    /// assert_eq!(listener.local_addr()?, addr);
    ///
    /// let client = tokio::net::TcpStream::connect(addr).await?;
    /// // What `axum::serve` does for each connection:
    /// let (io, peer) = listener.accept().await;
    /// assert_eq!(peer, client.local_addr()?);
    /// assert_eq!(io.handle().peer(), Some(peer));
    /// assert_eq!(connections.open_connections(), 1);
    /// # Ok(())
    /// # }
    /// ```
    pub fn wrap_listener<L>(&self, listener: L) -> GuardedListener<L>
    where
        L: Listener,
        L::Io: PeerOf,
    {
        GuardedListener {
            listener,
            guard: self.clone(),
        }
    }
}

impl<L> Listener for GuardedListener<L>
where
    L: Listener,
    L::Io: PeerOf,
{
    type Io = GuardedIo<L::Io>;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        // Wrapped as soon as it is accepted, before axum asks for the
        // connect info: the open event comes first, and a connection
        // accepted during a drain is closed before it serves anything.
        let (io, addr) = self.listener.accept().await;
        (self.guard.wrap(io), addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

/// The connect info of
/// `into_make_service_with_connect_info::<GuardedConnectInfo<L::Addr>>()`
/// under a [`GuardedListener`]: the address the inner listener reported for
/// the connection, and the connection's handle.
impl<L> Connected<IncomingStream<'_, GuardedListener<L>>> for GuardedConnectInfo<L::Addr>
where
    L: Listener,
    L::Io: PeerOf,
    L::Addr: Clone + Sync + 'static,
{
    fn connect_info(stream: IncomingStream<'_, GuardedListener<L>>) -> Self {
        GuardedConnectInfo {
            inner: stream.remote_addr().clone(),
            handle: stream.io().handle().clone(),
        }
    }
}
