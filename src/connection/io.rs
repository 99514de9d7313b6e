//! The IO wrapper through which a connection guard closes connections, and
//! the accept stream that wraps every connection.

use std::{
    fmt, io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, Waker},
};

use atomic_waker::AtomicWaker;
use futures_core::Stream;
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{
    ConnectionGuard, ConnectionHandle,
    registry::ConnState,
    takeover::{self, TakenOver},
};

/// IO objects whose peer address a [`ConnectionGuard`] can read, for its
/// events and for stream guards' per-peer cap.
///
/// Implemented for tokio's `TcpStream` and `UnixStream` (no IP peer), for
/// [`GuardedIo`], and with feature `tls` for
/// `tokio_rustls::server::TlsStream` over any of them, so that the guard can
/// wrap either the TCP stream under an application's TLS acceptor or the TLS
/// stream it yields. Implement it for your own IO type by returning the
/// underlying socket's peer address, or `None`; it is read once, when the
/// connection is wrapped.
///
/// ```
/// use std::net::SocketAddr;
/// use tower_stream_guard::{ConnectionGuard, connection::PeerOf};
///
/// /// A connection accepted behind a PROXY-protocol header.
/// struct Proxied {
///     io: tokio::io::DuplexStream,
///     client: SocketAddr,
/// }
///
/// impl PeerOf for Proxied {
///     fn peer(&self) -> Option<SocketAddr> {
///         Some(self.client)
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let connections = ConnectionGuard::builder().build()?;
/// let (io, _client_side) = tokio::io::duplex(1024);
/// let client: SocketAddr = "203.0.113.9:41000".parse()?;
/// let guarded = connections.wrap(Proxied { io, client });
/// assert_eq!(guarded.handle().peer(), Some(client));
/// assert_eq!(guarded.get_ref().client, client);
/// # let _ = &guarded.get_ref().io;
/// # Ok(())
/// # }
/// ```
///
/// (To serve it, the type also implements tokio's `AsyncRead` and
/// `AsyncWrite`, and tonic's `Connected` for `serve_with_incoming`.)
pub trait PeerOf {
    /// The peer's address, if known.
    fn peer(&self) -> Option<SocketAddr>;

    /// The TCP socket under this IO, if there is one: where the guard sets
    /// its [dead-peer options](crate::ConnectionGuardBuilder::dead_peer_timeout)
    /// (once, when the connection is wrapped). `None` by default: an IO
    /// without a TCP socket, or one that does not say, is wrapped without
    /// them.
    fn tcp_stream(&self) -> Option<&tokio::net::TcpStream> {
        None
    }
}

impl PeerOf for tokio::net::TcpStream {
    fn peer(&self) -> Option<SocketAddr> {
        self.peer_addr().ok()
    }

    fn tcp_stream(&self) -> Option<&tokio::net::TcpStream> {
        Some(self)
    }
}

/// hyper-util's wrapper, as its `HttpConnector` yields connections.
#[cfg(any(feature = "tonic", feature = "hyper"))]
impl<IO: PeerOf> PeerOf for hyper_util::rt::TokioIo<IO> {
    fn peer(&self) -> Option<SocketAddr> {
        self.inner().peer()
    }

    fn tcp_stream(&self) -> Option<&tokio::net::TcpStream> {
        self.inner().tcp_stream()
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

    fn tcp_stream(&self) -> Option<&tokio::net::TcpStream> {
        self.get_ref().0.tcp_stream()
    }
}

/// The peer of the stream under a client's TLS session (for
/// [`GoawayNotice::connector`](crate::connection::GoawayNotice::connector)).
#[cfg(feature = "tls")]
#[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
impl<IO: PeerOf> PeerOf for tokio_rustls::client::TlsStream<IO> {
    fn peer(&self) -> Option<SocketAddr> {
        self.get_ref().0.peer()
    }

    fn tcp_stream(&self) -> Option<&tokio::net::TcpStream> {
        self.get_ref().0.tcp_stream()
    }
}

impl<IO: PeerOf> PeerOf for GuardedIo<IO> {
    fn peer(&self) -> Option<SocketAddr> {
        self.handle.peer()
    }

    fn tcp_stream(&self) -> Option<&tokio::net::TcpStream> {
        self.inner.tcp_stream()
    }
}

pin_project! {
    /// An accepted connection a [`ConnectionGuard`] watches, from
    /// [`ConnectionGuard::wrap`] or [`ConnectionGuard::wrap_incoming`]. Reads
    /// and writes pass through until the guard closes the connection; then
    /// they fail with `ConnectionAborted` (pending ones are woken), and hyper
    /// drops the connection. Flushes fail too; a shutdown passes through.
    ///
    /// Dropping it emits the connection's close event, once, saying why the
    /// guard closed it, or [`ConnectionEnd::Closed`](crate::ConnectionEnd::Closed).
    /// A stream that took the connection over (an HTTP/1.1 upgrade: the
    /// upgraded IO is this one) ends then; until then, what it reads and
    /// writes counts as that stream's activity.
    /// With feature `tonic` it implements tonic's `Connected`, whose connect
    /// info is a [`GuardedConnectInfo`](crate::connection::GuardedConnectInfo).
    ///
    /// ```
    /// use tokio::io::{AsyncReadExt, AsyncWriteExt};
    /// use tower_stream_guard::{ConnectionEnd, ConnectionGuard};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let connections = ConnectionGuard::builder().build()?;
    /// let mut events = connections.subscribe();
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// let mut client = tokio::net::TcpStream::connect(listener.local_addr()?).await?;
    /// let (tcp, _) = listener.accept().await?;
    /// let mut io = connections.wrap(tcp);
    ///
    /// client.write_all(b"ping").await?;
    /// let mut buf = [0; 4];
    /// io.read_exact(&mut buf).await?; // passes through
    /// assert_eq!(&buf, b"ping");
    ///
    /// drop(client); // the peer goes away: the server drops the IO
    /// assert_eq!(io.read(&mut buf).await?, 0);
    /// drop(io);
    /// let _opened = events.recv().await?;
    /// assert_eq!(events.recv().await?.end(), Some(ConnectionEnd::Closed));
    /// # Ok(())
    /// # }
    /// ```
    pub struct GuardedIo<IO> {
        #[pin]
        pub(crate) inner: IO,
        pub(crate) handle: ConnectionHandle,
        pub(crate) read_registered: Option<Waker>,
        pub(crate) write_registered: Option<Waker>,
        // The stream that took the connection over (an upgrade), once one
        // did: what moves counts as its activity.
        pub(crate) taker: Option<Arc<dyn TakenOver>>,
    }

    impl<IO> PinnedDrop for GuardedIo<IO> {
        fn drop(this: Pin<&mut Self>) {
            this.project().handle.state.report_closed();
        }
    }
}

impl<IO> GuardedIo<IO> {
    /// The connection's handle; insert a clone into the request extensions
    /// in a hand-written hyper accept loop, so that stream guards and
    /// handlers find it.
    pub fn handle(&self) -> &ConnectionHandle {
        &self.handle
    }

    /// The wrapped IO (reading it does not go through the guard).
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

/// Runs one IO operation unless the guard closed the connection: fails at
/// once if it did, and when the operation is pending, registers the task's
/// waker in `slot` (unless it is the one registered last), so that a close
/// wakes it, then checks again (a close in between would wake nobody).
fn guarded<T>(
    state: &ConnState,
    slot: &AtomicWaker,
    registered: &mut Option<Waker>,
    cx: &mut Context<'_>,
    operation: impl FnOnce(&mut Context<'_>) -> Poll<io::Result<T>>,
) -> Poll<io::Result<T>> {
    if let Some(err) = state.closed_error() {
        return Poll::Ready(Err(err));
    }
    match operation(cx) {
        Poll::Ready(Err(err)) => {
            state.note_error(&err);
            Poll::Ready(Err(err))
        }
        Poll::Pending => {
            if !registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                slot.register(cx.waker());
                *registered = Some(cx.waker().clone());
            }
            match state.closed_error() {
                Some(err) => Poll::Ready(Err(err)),
                None => Poll::Pending,
            }
        }
        ready => ready,
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
        let inner = this.inner;
        let before = buf.filled().len();
        let read = guarded(state, &state.read_waker, this.read_registered, cx, |cx| {
            inner.poll_read(cx, buf)
        });
        let bytes = buf.filled().len().saturating_sub(before);
        if bytes > 0 {
            takeover::note(this.taker, state, |stream| stream.read(bytes));
        }
        read
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
        let inner = this.inner;
        let written = guarded(state, &state.write_waker, this.write_registered, cx, |cx| {
            inner.poll_write(cx, buf)
        });
        if let Poll::Ready(Ok(bytes @ 1..)) = written {
            takeover::note(this.taker, state, |stream| stream.wrote(bytes));
        }
        written
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let state = &this.handle.state;
        let inner = this.inner;
        let written = guarded(state, &state.write_waker, this.write_registered, cx, |cx| {
            inner.poll_write_vectored(cx, bufs)
        });
        if let Poll::Ready(Ok(bytes @ 1..)) = written {
            takeover::note(this.taker, state, |stream| stream.wrote(bytes));
        }
        written
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let state = &this.handle.state;
        if let Some(err) = state.closed_error() {
            return Poll::Ready(Err(err));
        }
        let flushed = this.inner.poll_flush(cx);
        if let Poll::Ready(Err(err)) = &flushed {
            state.note_error(err);
        }
        flushed
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

pin_project! {
    /// An accept stream whose connections a [`ConnectionGuard`] wraps, from
    /// [`ConnectionGuard::wrap_incoming`]: it yields a [`GuardedIo`] for
    /// every accepted IO and passes accept errors through. Give it to tonic's
    /// `serve_with_incoming` (see the [module docs](crate::connection)), or
    /// poll it yourself:
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
    /// let client = tokio::net::TcpStream::connect(addr).await?;
    /// let io = incoming.next().await.expect("a connection")?;
    /// assert_eq!(io.handle().peer(), Some(client.local_addr()?));
    /// # Ok(())
    /// # }
    /// ```
    pub struct GuardedIncoming<S> {
        #[pin]
        pub(crate) incoming: S,
        pub(crate) guard: ConnectionGuard,
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
