//! The client's side of a server's drain: seeing GOAWAY on a client's
//! connections and telling the application.
//!
//! A server that drains sends HTTP/2 GOAWAY, and the client's HTTP/2 stack
//! stops opening streams on that connection; the application does not hear
//! of it, so its long-lived streams run on until the server cuts them. A
//! [`GoawayNotice`] wraps each connection's IO ([`NoticedIo`], or a whole
//! connector with [`GoawayNotice::connector`]) and follows the frame headers
//! the server sends, without buffering or parsing anything else; when a
//! GOAWAY arrives it tells subscribers ([`NoticeEvent`]) and the client
//! guard's [`StreamHandle::draining`](crate::StreamHandle::draining) of every
//! stream that may be on that connection.

use std::{
    fmt,
    future::Future,
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use pin_project_lite::pin_project;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::{Notify, broadcast},
};

#[cfg(any(feature = "tonic", feature = "hyper"))]
use super::notice_connector::NoticeConnector;
use crate::frames::{FrameReader, Goaway};

/// How many connection events a subscriber may fall behind by.
const EVENT_CAPACITY: usize = 256;

/// Sees GOAWAY on a client's HTTP/2 connections and tells the application:
/// through [`subscribe`](Self::subscribe) (every connection's opening,
/// GOAWAY and closing) and through the client guard's
/// [`StreamHandle::draining`](crate::StreamHandle::draining), with
/// [`StreamGuardBuilder::goaway_notice`](crate::StreamGuardBuilder::goaway_notice).
///
/// It sees what it wraps: give a tonic `Endpoint` or a hyper-util client
/// [`connector`](Self::connector) (features `tonic` or `hyper`), or wrap an IO yourself
/// with [`wrap`](Self::wrap). It must see plain HTTP/2: under TLS, do the TLS
/// inside the connector it wraps (tokio-rustls with ALPN `h2` in the
/// connector, and an `http://` endpoint: the wrapper then sees what the TLS
/// decrypted). tonic's own `Endpoint::tls_config` does the TLS *around*
/// the connector, so the notice would read ciphertext. Bytes that are not
/// HTTP/2 (the first frame a server sends is SETTINGS) switch the wrapper
/// off for that connection; it is counted
/// ([`unfollowed`](Self::unfollowed)) and logged at WARN.
///
/// Which streams are told: a stream's `draining()` resolves when a
/// connection of its notice receives its first GOAWAY after the stream
/// started (a graceful drain sends two GOAWAYs; the second tells no one).
/// With one connection at a time (a tonic `Channel` to one endpoint, which
/// opens a new connection once the old one is going away) that is the
/// streams the GOAWAY concerns, but for one gap: the notice sees the frame
/// as it is read, a moment before the HTTP/2 client does, so a stream
/// started in that moment may still go to the old connection without being
/// told. With several connections (a balanced channel, a pool), streams on
/// other connections of the same notice are told too. Use one notice per
/// endpoint to narrow it.
///
/// ```
/// use tokio::io::AsyncWriteExt;
/// use tower_stream_guard::connection::{GoawayNotice, NoticeEvent};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> std::io::Result<()> {
/// let notice = GoawayNotice::new();
/// let mut events = notice.subscribe();
/// let (client, mut server) = tokio::io::duplex(1024);
/// let mut io = notice.wrap(client);
///
/// // The server's SETTINGS, then GOAWAY(last stream 1, NO_ERROR).
/// server.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await?;
/// server.write_all(&[0, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0]).await?;
/// let mut read = [0; 64];
/// tokio::io::AsyncReadExt::read(&mut io, &mut read).await?;
///
/// assert!(matches!(events.recv().await, Ok(NoticeEvent::Opened { .. })));
/// let Ok(NoticeEvent::Goaway { goaway, .. }) = events.recv().await else { panic!() };
/// assert_eq!(goaway.last_stream_id(), 1);
/// assert!(goaway.is_graceful());
/// assert_eq!(notice.goaways(), 1);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct GoawayNotice {
    shared: Arc<NoticeShared>,
    /// Set on the TCP socket of each connection the connector makes.
    pub(super) dead_peer: Option<Duration>,
}

pub(crate) struct NoticeShared {
    events: broadcast::Sender<NoticeEvent>,
    /// Connections that received GOAWAY so far (each counted at its first:
    /// a graceful drain sends two, and the second must not tell streams
    /// that started, elsewhere, after the first).
    goaways: AtomicU64,
    /// Woken when a connection receives its first GOAWAY.
    notify: Notify,
    next_id: AtomicU64,
    open: AtomicUsize,
    /// Connections whose bytes were not plain HTTP/2 (see `unfollowed`).
    unfollowed: AtomicU64,
}

impl NoticeShared {
    /// How many connections have received GOAWAY: a stream records it when
    /// it starts, and is told once the count passes it.
    pub(crate) fn goaways(&self) -> u64 {
        self.goaways.load(Ordering::Acquire)
    }

    /// Resolves once the count of GOAWAY frames passes `seen`.
    pub(crate) async fn goaway_after(&self, seen: u64) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.goaways() > seen {
                return;
            }
            notified.await;
        }
    }
}

impl fmt::Debug for GoawayNotice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GoawayNotice")
            .field("open_connections", &self.open_connections())
            .field("goaways", &self.goaways())
            .field("dead_peer_timeout", &self.dead_peer)
            .finish()
    }
}

impl Default for GoawayNotice {
    fn default() -> Self {
        Self::new()
    }
}

impl GoawayNotice {
    /// A notice with no connection yet.
    pub fn new() -> Self {
        GoawayNotice {
            shared: Arc::new(NoticeShared {
                events: broadcast::channel(EVENT_CAPACITY).0,
                goaways: AtomicU64::new(0),
                notify: Notify::new(),
                next_id: AtomicU64::new(1),
                open: AtomicUsize::new(0),
                unfollowed: AtomicU64::new(0),
            }),
            dead_peer: Some(crate::socket::DEFAULT_DEAD_PEER_TIMEOUT),
        }
    }

    /// Bounds how long a server that vanished goes unnoticed on the
    /// connections [`connector`](Self::connector) makes (default 20 s,
    /// `None` for the kernel's defaults): the same TCP options as a
    /// connection guard's
    /// [`dead_peer_timeout`](crate::ConnectionGuardBuilder::dead_peer_timeout),
    /// set on the TCP socket of each new connection (its IO says where it
    /// is through [`PeerOf::tcp_stream`](super::PeerOf::tcp_stream): tokio's `TcpStream`, hyper-util's
    /// `TokioIo` of one, rustls' client `TlsStream` over one). A client
    /// streaming an upload to a server whose network vanished sees its call
    /// fail within about `timeout` instead of writing into buffers for
    /// minutes. [`wrap`](Self::wrap) sets nothing: the IO is yours.
    ///
    /// Beside it, tonic's `Endpoint` has HTTP/2 PING keepalive for what the
    /// kernel cannot see, e.g.
    /// `.http2_keep_alive_interval(2 * timeout).keep_alive_timeout(timeout).keep_alive_while_idle(true)`.
    ///
    /// # Errors
    ///
    /// [`ConfigError::DeadPeerTimeoutOutOfRange`](crate::ConfigError::DeadPeerTimeoutOutOfRange) outside 1 s..=1 h.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_stream_guard::{ConfigError, connection::GoawayNotice};
    ///
    /// let notice = GoawayNotice::new().with_dead_peer_timeout(Some(Duration::from_secs(5)))?;
    /// # drop(notice);
    /// assert!(GoawayNotice::new().with_dead_peer_timeout(Some(Duration::ZERO)).is_err());
    /// # Ok::<(), ConfigError>(())
    /// ```
    pub fn with_dead_peer_timeout(
        mut self,
        timeout: Option<Duration>,
    ) -> Result<Self, crate::error::ConfigError> {
        crate::socket::check_dead_peer_timeout(timeout)?;
        self.dead_peer = timeout;
        Ok(self)
    }

    /// Wraps a client connection's IO: what it reads must be plain HTTP/2, so
    /// under TLS wrap the decrypted stream (the TLS stream), never the TCP
    /// stream under it (the reader would see ciphertext and switch itself
    /// off). It reports its opening now, every GOAWAY it reads, and its
    /// closing when dropped.
    pub fn wrap<IO>(&self, io: IO) -> NoticedIo<IO> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        self.shared.open.fetch_add(1, Ordering::Relaxed);
        let _ = self
            .shared
            .events
            .send(NoticeEvent::Opened { connection: id });
        NoticedIo {
            inner: io,
            reader: FrameReader::client(),
            life: Life {
                id,
                shared: Arc::clone(&self.shared),
                going_away: false,
            },
        }
    }

    /// Wraps a connector (a `Service<Uri>` whose connections are tokio IO,
    /// such as a `tower::service_fn` that opens a `TcpStream`, or one that
    /// does TLS over it), for
    /// `tonic::transport::Endpoint::connect_with_connector` or a hyper-util
    /// client: every connection it makes is a [`NoticedIo`]. hyper-util's
    /// client also wants the inner connector's future to be `Unpin` (return
    /// `Box::pin(async move { .. })` from a `service_fn`) and its IO to
    /// implement its `Connection` (a `TcpStream` does; `NoticedIo` passes it
    /// on, feature `hyper`).
    ///
    /// ```no_run
    /// use std::time::Duration;
    ///
    /// use http::Uri;
    /// use tokio::net::TcpStream;
    /// use tower_stream_guard::{StreamGuardLayer, StreamHandle, connection::GoawayNotice};
    ///
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let notice = GoawayNotice::new();
    /// let connector = notice.connector(tower::service_fn(|uri: Uri| async move {
    ///     let authority = uri.authority().map(|a| a.to_string()).unwrap_or_default();
    ///     TcpStream::connect(authority).await
    /// }));
    /// let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:50051")
    ///     .connect_with_connector(connector)
    ///     .await?;
    /// let guard = StreamGuardLayer::builder()
    ///     .idle_timeout(Duration::from_secs(30))
    ///     .response_handle(true)
    ///     .goaway_notice(&notice)
    ///     .build()?;
    /// let channel = tower::ServiceBuilder::new()
    ///     .layer(guard.for_tonic_channel())
    ///     .service(channel);
    /// // A call's response extensions hold its StreamHandle; its draining()
    /// // resolves when the server sends GOAWAY: open the replacement then.
    /// # drop(channel);
    /// # Ok(())
    /// # }
    /// ```
    #[cfg(any(feature = "tonic", feature = "hyper"))]
    #[cfg_attr(docsrs, doc(cfg(any(feature = "tonic", feature = "hyper"))))]
    pub fn connector<C>(&self, connector: C) -> NoticeConnector<C> {
        NoticeConnector {
            inner: connector,
            notice: self.clone(),
        }
    }

    /// Every connection's opening, GOAWAY and closing, from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<NoticeEvent> {
        self.shared.events.subscribe()
    }

    /// Connections that have received GOAWAY so far (a connection counts
    /// once, at its first: a graceful drain sends two; every frame is a
    /// [`NoticeEvent::Goaway`]).
    pub fn goaways(&self) -> u64 {
        self.shared.goaways()
    }

    /// Connections this notice could not follow because what they read was
    /// not plain HTTP/2: most often TLS records, when the TLS is done
    /// around the notice instead of inside its connector (tonic's
    /// `Endpoint::tls_config` with [`connector`](Self::connector) is such a
    /// case: do the TLS in the connector the notice wraps). GOAWAY on them
    /// is never seen. Each is also logged once, at WARN.
    pub fn unfollowed(&self) -> u64 {
        self.shared.unfollowed.load(Ordering::Relaxed)
    }

    /// Connections wrapped and not yet dropped.
    pub fn open_connections(&self) -> usize {
        self.shared.open.load(Ordering::Relaxed)
    }

    /// Resolves when another connection of this notice receives its first
    /// GOAWAY.
    pub fn next_goaway(&self) -> impl Future<Output = ()> + Send + 'static {
        let shared = Arc::clone(&self.shared);
        let seen = shared.goaways();
        async move { shared.goaway_after(seen).await }
    }

    pub(crate) fn shared(&self) -> &Arc<NoticeShared> {
        &self.shared
    }
}

/// What happened to one connection of a [`GoawayNotice`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum NoticeEvent {
    /// The connection was wrapped (it is open).
    Opened {
        /// The connection's id within its notice, from 1.
        connection: u64,
    },
    /// The server sent GOAWAY on it: it takes no new streams; streams up to
    /// [`Goaway::last_stream_id`] may finish. A graceful drain usually sends
    /// two (the first with the highest id, then the real last one).
    Goaway {
        /// The connection's id within its notice.
        connection: u64,
        /// The frame.
        goaway: Goaway,
    },
    /// The connection was dropped.
    Closed {
        /// The connection's id within its notice.
        connection: u64,
    },
}

impl NoticeEvent {
    /// The connection's id within its notice.
    pub fn connection(&self) -> u64 {
        match self {
            NoticeEvent::Opened { connection }
            | NoticeEvent::Goaway { connection, .. }
            | NoticeEvent::Closed { connection } => *connection,
        }
    }
}

/// One connection's place in its notice; reports its closing when dropped.
struct Life {
    id: u64,
    shared: Arc<NoticeShared>,
    /// Whether this connection has received a GOAWAY (and was counted).
    going_away: bool,
}

impl Life {
    /// Cold: a connection sees one or two GOAWAYs in its life. Only the
    /// first tells streams; every one is an event.
    #[cold]
    fn goaway(&mut self, goaway: Goaway) {
        if !self.going_away {
            self.going_away = true;
            self.shared.goaways.fetch_add(1, Ordering::AcqRel);
            self.shared.notify.notify_waiters();
        }
        let _ = self.shared.events.send(NoticeEvent::Goaway {
            connection: self.id,
            goaway,
        });
    }
}

impl Life {
    /// The connection's bytes are not plain HTTP/2 (`read` switched the
    /// frame reader off): counted and said once. Cold: once per connection
    /// at most.
    #[cold]
    #[inline(never)]
    fn unfollowed(&self, read: &[u8]) {
        self.shared.unfollowed.fetch_add(1, Ordering::Relaxed);
        // A TLS record from the server: a handshake record, version 3.x.
        let what = if read.starts_with(&[0x16, 0x03]) {
            "TLS records (do the TLS inside the connector the notice wraps, not around it: \
             tonic's `Endpoint::tls_config` does it around)"
        } else {
            "bytes that are not HTTP/2 (the first frame a server sends is SETTINGS)"
        };
        tracing::warn!(
            target: "tower_stream_guard",
            connection = self.id,
            "GoawayNotice cannot follow this connection, which reads {what}: its GOAWAY will not be seen"
        );
    }
}

impl Drop for Life {
    fn drop(&mut self) {
        self.shared.open.fetch_sub(1, Ordering::Relaxed);
        let _ = self.shared.events.send(NoticeEvent::Closed {
            connection: self.id,
        });
    }
}

pin_project! {
    /// A client connection's IO under a [`GoawayNotice`]
    /// ([`GoawayNotice::wrap`]): reads and writes go straight through; what is
    /// read is followed frame header by frame header (no copy, no
    /// allocation, no lock), and a GOAWAY is reported.
    pub struct NoticedIo<IO> {
        #[pin]
        inner: IO,
        reader: FrameReader,
        life: Life,
    }
}

impl<IO> fmt::Debug for NoticedIo<IO> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NoticedIo")
            .field("connection", &self.life.id)
            .field("following", &!self.reader.is_off())
            .finish()
    }
}

impl<IO> NoticedIo<IO> {
    /// The connection's id within its notice (as in [`NoticeEvent`]).
    pub fn connection(&self) -> u64 {
        self.life.id
    }

    /// The wrapped IO.
    pub fn get_ref(&self) -> &IO {
        &self.inner
    }

    /// The wrapped IO, mutably.
    pub fn get_mut(&mut self) -> &mut IO {
        &mut self.inner
    }
}

impl<IO: AsyncRead> AsyncRead for NoticedIo<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        ready!(this.inner.poll_read(cx, buf))?;
        if !this.reader.is_off() {
            let life = this.life;
            let read = &buf.filled()[before..];
            this.reader.feed(read, |goaway| life.goaway(goaway));
            if this.reader.is_off() {
                life.unfollowed(read);
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite> AsyncWrite for NoticedIo<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}
