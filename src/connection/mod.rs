//! The connection guard: an id per accepted connection, events when
//! connections open and close, and closing the connections hyper would
//! otherwise keep forever.
//!
//! A [`ConnectionGuard`] wraps each accepted IO object (a `TcpStream`, a
//! TLS stream, a `UnixStream`) in a [`GuardedIo`].
//! Reads and writes pass through unchanged until the guard closes the
//! connection; from then on they fail with `ConnectionAborted` (a pending
//! read or write is woken to see it), so hyper drops the connection at once
//! and the peer sees its TCP connection close. The guard closes a
//! connection when it is
//!
//! - **stalled**: a stream guard (or a stream's handle,
//!   [`StreamHandle::cancel`](crate::StreamHandle::cancel)) ended one of its
//!   streams while the peer was not reading (hyper no longer polls a body
//!   without flow-control window, so the HTTP/2 stream stays open until the
//!   peer reads or the connection closes), and the peer still has not read
//!   [`stalled_grace`](crate::ConnectionGuardBuilder::stalled_grace) later;
//! - **idle**: no guarded stream open for
//!   [`idle_timeout`](crate::ConnectionGuardBuilder::idle_timeout);
//! - **over age**: older than
//!   [`max_age`](crate::ConnectionGuardBuilder::max_age), jittered by ±10%
//!   per connection by default as
//!   [gRFC A9](https://github.com/grpc/proposal/blob/master/A9-server-side-conn-mgt.md)
//!   asks, so that connections opened together do not all go away together
//!   ([`max_age_jitter_percent`](crate::ConnectionGuardBuilder::max_age_jitter_percent)):
//!   a graceful close is asked for first ([`ConnectionHandle::goaway`],
//!   which [`serve_connection`](crate::ConnectionGuard::serve_connection)
//!   turns into an HTTP/2 GOAWAY), the hard close follows
//!   [`max_age_grace`](crate::ConnectionGuardBuilder::max_age_grace) later;
//! - **drained**: still open when a [`Drain`](crate::Drain) given to the
//!   guard is over (its grace period plus its close delay), or accepted
//!   after the drain began;
//! - closed by hand, with [`ConnectionHandle::close`];
//! - and, by the kernel, when its **peer is unreachable**: on every TCP
//!   connection it wraps, the guard sets `TCP_USER_TIMEOUT` and keepalive
//!   ([`dead_peer_timeout`](crate::ConnectionGuardBuilder::dead_peer_timeout),
//!   20 s by default), so that a peer whose network vanished while data
//!   flows to it, or while the connection is silent, is given up on within
//!   that bound; its streams end
//!   [`PeerUnreachable`](crate::EndReason::PeerUnreachable).
//!
//! With no setting, a guard gives connections ids and events, finds
//! unreachable peers within 20 s, and closes connections at a drain's end.
//!
//! Each connection gets an id, unique within the process, and a
//! [`ConnectionHandle`] that stream guards and handlers find in the request
//! extensions: the
//! [`StreamGuardLayer`](crate::StreamGuardLayer) counts the connection's
//! streams through it (for the idle timeout and the stalled grace) and uses
//! its id as the [`ConnectionKey`](crate::ConnectionKey) of per-connection
//! caps. Every connection yields two [`ConnectionEvent`]s from
//! [`subscribe`](crate::ConnectionGuard::subscribe): one when it is wrapped
//! and one when its `GuardedIo` is dropped, saying why it closed
//! ([`ConnectionEnd`]).
//!
//! ```
//! use tokio::io::AsyncReadExt;
//! use tower_stream_guard::{ConnectionEnd, ConnectionGuard};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let connections = ConnectionGuard::builder().build()?;
//! let mut events = connections.subscribe();
//!
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let _client = tokio::net::TcpStream::connect(listener.local_addr()?).await?;
//! let (tcp, _) = listener.accept().await?;
//! let mut io = connections.wrap(tcp);
//! let opened = events.recv().await?;
//! assert_eq!(opened.id(), io.handle().id());
//! assert_eq!(opened.end(), None);
//! assert_eq!(connections.open_connections(), 1);
//!
//! // Closing fails the next read (or write): hyper would drop the connection.
//! io.handle().close();
//! let err = io.read(&mut [0; 64]).await.unwrap_err();
//! assert_eq!(err.kind(), std::io::ErrorKind::ConnectionAborted);
//!
//! // Dropping the IO emits the close event, with the reason.
//! drop(io);
//! let closed = events.recv().await?;
//! assert_eq!(closed.end(), Some(ConnectionEnd::Manual));
//! assert_eq!(connections.open_connections(), 0);
//! # Ok(())
//! # }
//! ```
//!
//! # With tonic
//!
//! Hand tonic the guarded accept stream with `serve_with_incoming`, and put a
//! [`StreamGuardLayer`](crate::StreamGuardLayer) in front of the services
//! with a plain `.layer(guard)`. tonic inserts the [`GuardedConnectInfo`] of
//! [`GuardedIo`]'s `Connected` implementation into every request; the
//! stream guard unpacks it into the [`ConnectionHandle`]
//! and the inner `TcpConnectInfo` (so `tonic::Request::remote_addr` keeps
//! working).
//!
//! ```no_run
//! use std::time::Duration;
//! use tonic::transport::server::TcpIncoming;
//! use tower_stream_guard::{ConnectionGuard, StreamGuardLayer};
//!
//! # async fn run(routes: tonic::service::Routes) -> Result<(), Box<dyn std::error::Error>> {
//! let connections = ConnectionGuard::builder()
//!     .stalled_grace(Duration::from_secs(30))
//!     .idle_timeout(Duration::from_secs(10 * 60))
//!     .build()?;
//! let guard = StreamGuardLayer::builder()
//!     .idle_timeout(Duration::from_secs(30))
//!     .build()?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:50051").await?;
//! tonic::transport::Server::builder()
//!     .layer(guard)
//!     .add_routes(routes)
//!     .serve_with_incoming(
//!         // TCP_NODELAY, as tonic's `serve(addr)` sets it.
//!         connections.wrap_incoming(TcpIncoming::from(listener).with_nodelay(Some(true))),
//!     )
//!     .await?;
//! # Ok(())
//! # }
//! ```
//!
//! tonic drives its connections itself, so nothing answers
//! [`goaway`](crate::ConnectionHandle::goaway) there: a connection over
//! [`max_age`](crate::ConnectionGuardBuilder::max_age) is closed hard
//! `max_age_grace` later, without a GOAWAY.
//!
//! # With axum
//!
//! With feature `axum`, hand `axum::serve` the guarded listener of
//! [`ConnectionGuard::wrap_listener`](crate::ConnectionGuard::wrap_listener)
//! and serve the router with
//! `into_make_service_with_connect_info::<GuardedConnectInfo<SocketAddr>>()`:
//! axum inserts that [`GuardedConnectInfo`] into every request, and a
//! [`StreamGuardLayer`](crate::StreamGuardLayer) on the router unpacks it
//! into the [`ConnectionHandle`] and axum's `ConnectInfo<SocketAddr>` (so
//! handlers' `ConnectInfo<SocketAddr>` keeps working). Without the connect
//! info, no request carries the handle, and stream guards cannot tell the
//! connection that they serve a stream on it (see [`GuardedListener`]).
//!
//! ```no_run
//! # #[cfg(feature = "axum")]
//! # async fn run(app: axum::Router) -> Result<(), Box<dyn std::error::Error>> {
//! use std::{net::SocketAddr, time::Duration};
//! use tower_stream_guard::{ConnectionGuard, StreamGuardLayer, connection::GuardedConnectInfo};
//!
//! let connections = ConnectionGuard::builder()
//!     .stalled_grace(Duration::from_secs(30))
//!     .idle_timeout(Duration::from_secs(10 * 60))
//!     .build()?;
//! let guard = StreamGuardLayer::builder()
//!     .response_idle_timeout(Duration::from_secs(30))
//!     .build()?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! axum::serve(
//!     connections.wrap_listener(listener),
//!     app.layer(guard)
//!         .into_make_service_with_connect_info::<GuardedConnectInfo<SocketAddr>>(),
//! )
//! .await?;
//! # Ok(())
//! # }
//! ```
//!
//! As under tonic, axum drives its connections itself, so a connection over
//! [`max_age`](crate::ConnectionGuardBuilder::max_age) is closed hard
//! `max_age_grace` later, without a GOAWAY.
//!
//! # With hyper-util
//!
//! With feature `hyper`,
//! [`ConnectionGuard::serve_connection`]
//! serves one accepted connection with hyper-util's auto builder (HTTP/1 and
//! HTTP/2): it wraps the IO, puts the [`ConnectionHandle`]
//! into every request's extensions, and asks hyper for a graceful shutdown
//! (GOAWAY) when the connection reaches its maximum age or a drain begins.
//! Its documentation has an accept loop. A hand-written hyper loop can do
//! the same with [`ConnectionGuard::wrap`]:
//! insert [`GuardedIo::handle`] into the request extensions, and call
//! hyper's `graceful_shutdown` when
//! [`goaway`](crate::ConnectionHandle::goaway) resolves.
//!
//! # Upgraded connections
//!
//! An HTTP/1.1 upgrade (a WebSocket through axum's `WebSocketUpgrade`,
//! hyper's `upgrade::on`, a `CONNECT` tunnel) hands the connection's IO, a
//! [`GuardedIo`], to the application. When a
//! [`StreamGuardLayer`](crate::StreamGuardLayer) found the connection's
//! handle in the request, its stream takes the connection over at the
//! `101`: the stream lives until the [`GuardedIo`] is dropped (the
//! connection closed) and ends then, what the IO reads and writes counts
//! as its activity, and a guard that ends it closes the connection
//! ([`ConnectionEnd::UpgradeEnded`]). See the crate README's section on
//! WebSockets.
//!
//! # Under TLS
//!
//! With feature `tls`, the guard works on either side of an
//! application-managed rustls acceptor: it wraps the TCP stream before the
//! handshake (`TlsStream<GuardedIo<TcpStream>>`: connections are counted
//! and closed from the first byte, a stalled handshake included), or the TLS
//! stream the handshake yields (`GuardedIo<TlsStream<TcpStream>>`). Stream
//! guards find the handle in either nesting, through tonic's
//! `TlsConnectInfo`. [`PeerOf`] reads the peer under the TLS session.
//!
//! ```no_run
//! # #[cfg(feature = "tls")]
//! # async fn run(
//! #     listener: tokio::net::TcpListener,
//! #     acceptor: tokio_rustls::TlsAcceptor,
//! # ) -> std::io::Result<()> {
//! use tower_stream_guard::ConnectionGuard;
//!
//! let connections = ConnectionGuard::builder().build().expect("valid");
//! let (tcp, _) = listener.accept().await?;
//! // The guard under TLS: the handshake runs on the guarded stream.
//! let tls = acceptor.accept(connections.wrap(tcp)).await?;
//! # drop(tls);
//! let (tcp, _) = listener.accept().await?;
//! // The guard around TLS: it wraps the finished session.
//! let guarded = connections.wrap(acceptor.accept(tcp).await?);
//! // Either one goes to tonic's `serve_with_incoming` through a stream of
//! // accepted connections, or to `serve_connection`.
//! # drop(guarded);
//! # Ok(())
//! # }
//! ```
//!
//! # Unix sockets
//!
//! A `UnixStream` has no IP peer: under a connection guard its connection is
//! known by its handle alone. (tonic's own Unix-socket serving needs no
//! guard for per-connection caps: the stream guard keys each connection on
//! the `UdsConnectInfo` tonic builds once per connection; a connection guard
//! adds the closing of stalled, idle, over-age and drained connections.) Wrap the accept
//! stream as for TCP, e.g.
//! `connections.wrap_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))`.
//!
//! ```
//! # #[cfg(unix)]
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use tower_stream_guard::ConnectionGuard;
//!
//! let connections = ConnectionGuard::builder().build()?;
//! let (server_side, _client_side) = tokio::net::UnixStream::pair()?;
//! let io = connections.wrap(server_side);
//! assert_eq!(io.handle().peer(), None);
//! assert_eq!(io.handle().key(), tower_stream_guard::ConnectionKey::from_id(io.handle().id()));
//! # Ok(())
//! # }
//! # #[cfg(not(unix))]
//! # fn main() {}
//! ```
//!
//! # Costs
//!
//! Per read or write of a connection: one atomic load (has the guard closed
//! it?), a second one when the IO is pending, and one when it moved bytes
//! (has a stream taken the connection over?). On a connection an upgraded
//! stream took over, each read or write that moved bytes also stamps the
//! stream's activity (a few relaxed loads and stores, through a pointer the
//! IO fetches once, under a lock). The task's waker is
//! registered only when the IO is pending with a different waker than the
//! one registered last time (hyper polls a connection from one task, so
//! usually once per connection). Per connection: one allocation for its
//! shared record, a hash of its id to draw its jittered maximum age, a short lock of the guard's table when it is wrapped and
//! when it is dropped, and with a timer, a look-up of the current runtime
//! when it is wrapped. Per guard:
//! one timer task, ticking every
//! [`resolution`](crate::ConnectionGuardBuilder::resolution) (100 ms by
//! default) while the guard has connections and one of `idle_timeout`,
//! `stalled_grace` or `max_age` is set; it scans the open connections on
//! each tick and exits when none is left. Closes therefore happen up to
//! one resolution late. Nothing more is spent per frame, nor per stream
//! beyond the stream guard's counting of the connection's streams (a few atomic
//! updates as each stream starts and ends).
//!
//! # Cancel safety
//!
//! - Dropping a [`GuardedIo`] emits its close event exactly once (with the
//!   reason the guard closed it for, or [`ConnectionEnd::Closed`] when the
//!   guard did not) and forgets the connection: it no longer counts in
//!   [`open_connections`](crate::ConnectionGuard::open_connections) nor
//!   keeps a drain waiting.
//! - The future of [`ConnectionHandle::goaway`] owns what it needs (it is
//!   `'static`): dropping it cancels nothing, and a new one resolves at once
//!   if the graceful close was already asked for.
//! - Dropping the future of
//!   [`serve_connection`](crate::ConnectionGuard::serve_connection) drops
//!   the connection at once, without GOAWAY (its close event says `closed`
//!   unless the guard had closed it).
//! - When the guard closes a connection, hyper drops it with every stream
//!   on it: stream guards see those streams abandoned, so each stream's
//!   [`StreamHandle`](crate::StreamHandle) is cancelled, its cap slots are
//!   freed and it ends with one [`EndEvent`](crate::EndEvent) saying
//!   [`Cancelled`](crate::EndReason::Cancelled) (unless a guard had already
//!   ended it, e.g. a drain's cut or a stalled reader's timeout). The peer
//!   gets no trailers: its calls fail as on any lost connection.

pub(crate) mod builder;
pub(crate) mod event;
pub(crate) mod guard;
pub(crate) mod handle;
mod io;
#[cfg(feature = "axum")]
mod listener;
mod notice;
#[cfg(any(feature = "tonic", feature = "hyper"))]
mod notice_connector;
mod registry;
#[cfg(feature = "hyper")]
mod serve;
mod takeover;
mod tonic;
#[cfg(feature = "test-view")]
mod view;

pub use crate::frames::Goaway;
pub use io::{GuardedIncoming, GuardedIo, PeerOf};
#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
pub use listener::GuardedListener;
pub(crate) use notice::NoticeShared;
pub use notice::{GoawayNotice, NoticeEvent, NoticedIo};
#[cfg(any(feature = "tonic", feature = "hyper"))]
pub use notice_connector::{NoticeConnecting, NoticeConnector};
pub(crate) use takeover::TakenOver;
pub use tonic::GuardedConnectInfo;

pub(crate) use event::{ConnectionEnd, ConnectionEvent};
pub(crate) use guard::ConnectionGuard;
pub(crate) use handle::ConnectionHandle;
