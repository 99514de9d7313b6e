//! Driving accepted connections with hyper-util, for hand-written accept
//! loops (feature `hyper`).

use std::{
    future::{Future, pending, poll_fn},
    pin::Pin,
};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tower_service::Service;

use super::{ConnectionEnd, ConnectionGuard, ConnectionHandle, PeerOf};
use crate::error::BoxError;

#[cfg_attr(docsrs, doc(cfg(feature = "hyper")))]
impl ConnectionGuard {
    /// Serves one accepted connection with hyper-util (HTTP/1 or HTTP/2,
    /// detected from the client's first bytes), guarded like
    /// [`wrap`](Self::wrap) and more: the connection's
    /// [`ConnectionHandle`] is in every request's
    /// extensions, and when the connection reaches its
    /// [`max_age`](crate::ConnectionGuardBuilder::max_age) or its
    /// [`idle_timeout`](crate::ConnectionGuardBuilder::idle_timeout), or a
    /// [`Drain`](crate::Drain) given to this guard begins, hyper is asked for
    /// a graceful shutdown (HTTP/2 GOAWAY: the client opens no new stream here
    /// and reconnects). If the connection is still open, the guard's timer
    /// closes it hard
    /// [`max_age_grace`](crate::ConnectionGuardBuilder::max_age_grace) after
    /// `max_age`, a resolution after the idle GOAWAY if it is idle still,
    /// and the drain when it is over. A connection that closes gracefully
    /// after the GOAWAY reports why it was asked to
    /// ([`MaxAge`](crate::ConnectionEnd::MaxAge),
    /// [`Idle`](crate::ConnectionEnd::Idle),
    /// [`Drained`](crate::ConnectionEnd::Drained)).
    ///
    /// The future it returns resolves when the connection is done; spawn
    /// one per accepted connection. Dropping it drops the connection (its
    /// close event says [`Closed`](crate::ConnectionEnd::Closed)).
    ///
    /// ```no_run
    /// use std::convert::Infallible;
    /// use tower_stream_guard::{ConnectionGuard, StreamGuardLayer};
    /// use tower::{Layer, service_fn};
    ///
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let connections = ConnectionGuard::builder()
    ///     .max_age(std::time::Duration::from_secs(600))
    ///     .max_age_grace(std::time::Duration::from_secs(30))
    ///     .build()?;
    /// let guard = StreamGuardLayer::builder().build()?;
    /// let service = guard.layer(service_fn(|_request: http::Request<_>| async {
    ///     Ok::<_, Infallible>(http::Response::new(String::from("hello")))
    /// }));
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
    /// loop {
    ///     let (io, _) = listener.accept().await?;
    ///     let (connections, service) = (connections.clone(), service.clone());
    ///     tokio::spawn(async move { connections.serve_connection(io, service).await });
    /// }
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// What hyper reports when the connection fails, including when the
    /// guard closed it.
    pub fn serve_connection<IO, S, B>(
        &self,
        io: IO,
        service: S,
    ) -> Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send + 'static>>
    where
        IO: AsyncRead + AsyncWrite + PeerOf + Unpin + Send + 'static,
        S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: http_body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        if let Some(timeout) = self.connections.policy.dead_peer {
            // A PING after twice the bound of silence, answered within the
            // bound: later than the kernel's own bound (see `socket.rs`), so
            // that where the kernel can tell, it does first and the streams
            // say `peer_unreachable`; the PING catches what it cannot (a
            // stuck peer that still ACKs, platforms without
            // TCP_USER_TIMEOUT).
            builder
                .http2()
                .timer(TokioTimer::new())
                .keep_alive_interval(timeout * 2)
                .keep_alive_timeout(timeout);
        }
        self.serve_connection_with(builder, io, service)
    }

    /// [`serve_connection`](Self::serve_connection) with hyper-util's
    /// builder as the application configured it: HTTP/2 stream limits,
    /// window sizes, keepalive PINGs, timers, HTTP/1 options, or HTTP/2
    /// only. The builder is used as it is: the HTTP/2 PINGs
    /// `serve_connection` adds for a
    /// [`dead_peer_timeout`](crate::ConnectionGuardBuilder::dead_peer_timeout)
    /// are the application's to set here (`http2().keep_alive_interval`,
    /// `keep_alive_timeout`, with a timer); the socket options are set all
    /// the same. Both serve HTTP/1.1 upgrades (hyper-util's
    /// `serve_connection_with_upgrades`; the upgraded IO is still the
    /// guarded connection), except with a builder restricted to one HTTP
    /// version (`http1_only`, `http2_only`), which hyper-util ignores when
    /// it serves upgrades: such a builder serves none.
    ///
    /// ```no_run
    /// use std::{convert::Infallible, time::Duration};
    ///
    /// use hyper_util::{rt::{TokioExecutor, TokioTimer}, server::conn::auto};
    /// use tower::{Layer, service_fn};
    /// use tower_stream_guard::{ConnectionGuard, StreamGuardLayer};
    ///
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let connections = ConnectionGuard::builder().build()?;
    /// let guard = StreamGuardLayer::builder().build()?;
    /// let service = guard.layer(service_fn(|_request: http::Request<_>| async {
    ///     Ok::<_, Infallible>(http::Response::new(String::from("hello")))
    /// }));
    /// let mut builder = auto::Builder::new(TokioExecutor::new());
    /// builder
    ///     .http2()
    ///     .max_concurrent_streams(200)
    ///     .timer(TokioTimer::new())
    ///     .keep_alive_interval(Duration::from_secs(40))
    ///     .keep_alive_timeout(Duration::from_secs(20));
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
    /// loop {
    ///     let (io, _) = listener.accept().await?;
    ///     let served = connections.serve_connection_with(builder.clone(), io, service.clone());
    ///     tokio::spawn(served);
    /// }
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`serve_connection`](Self::serve_connection).
    pub fn serve_connection_with<IO, S, B>(
        &self,
        builder: auto::Builder<TokioExecutor>,
        io: IO,
        service: S,
    ) -> Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send + 'static>>
    where
        IO: AsyncRead + AsyncWrite + PeerOf + Unpin + Send + 'static,
        S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: http_body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let io = self.wrap(io);
        let handle = io.handle().clone();
        let goaway = handle.goaway();
        let state = std::sync::Arc::clone(&handle.state);
        let drain = self.drain_shared();
        let service = WithHandle { service, handle };
        Box::pin(async move {
            let io = TokioIo::new(io);
            // hyper-util ignores a builder's version restriction when it
            // serves upgrades: a restricted builder serves none.
            if builder.is_http1_available() && builder.is_http2_available() {
                let connection = builder.serve_connection_with_upgrades(io, service);
                drive(connection, goaway, drain, state).await
            } else {
                let connection = builder.serve_connection(io, service);
                drive(connection, goaway, drain, state).await
            }
        })
    }
}

/// A hyper-util connection, with or without upgrades.
trait Graceful: Future<Output = Result<(), BoxError>> {
    fn graceful_shutdown(self: Pin<&mut Self>);
}

/// Both hyper-util connection kinds have the same `graceful_shutdown`.
macro_rules! graceful {
    ($connection:ident) => {
        impl<I, S, B> Graceful for auto::$connection<'_, I, S, TokioExecutor>
        where
            Self: Future<Output = Result<(), BoxError>>,
            S: hyper::service::HttpService<Incoming, ResBody = B>,
            S::Error: Into<BoxError>,
            S::Future: Send + 'static,
            I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
            B: http_body::Body + Send + 'static,
            B::Data: Send,
            B::Error: Into<BoxError>,
        {
            fn graceful_shutdown(self: Pin<&mut Self>) {
                auto::$connection::graceful_shutdown(self);
            }
        }
    };
}

graceful!(Connection);
graceful!(UpgradeableConnection);

/// Drives `connection` to its end, asking hyper for a graceful shutdown
/// (GOAWAY) when the guard asks for one or a drain begins.
async fn drive<C: Graceful>(
    connection: C,
    goaway: impl Future<Output = ()>,
    drain: Option<std::sync::Arc<crate::drain::DrainShared>>,
    state: std::sync::Arc<super::registry::ConnState>,
) -> Result<(), BoxError> {
    tokio::pin!(connection);
    let draining = async {
        match drain {
            Some(drain) => drain.began().await,
            None => pending().await,
        }
    };
    tokio::select! {
        result = connection.as_mut() => return result,
        () = goaway => {}
        () = draining => {
            state.ask_goaway(ConnectionEnd::Drained);
        }
    }
    state
        .goaway_sent
        .store(true, std::sync::atomic::Ordering::Release);
    connection.as_mut().graceful_shutdown();
    connection.await
}

/// Hands each request the connection's handle, as a hyper service. A named
/// type with a boxed future, not a closure in an `async fn`: the latter trips
/// rust-lang/rust#102211 when the caller spawns the connection.
struct WithHandle<S> {
    service: S,
    handle: ConnectionHandle,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<T, BoxError>> + Send>>;

impl<S, B> hyper::service::Service<Request<Incoming>> for WithHandle<S>
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    type Response = Response<B>;
    type Error = BoxError;
    type Future = BoxFuture<Response<B>>;

    fn call(&self, mut request: Request<Incoming>) -> Self::Future {
        request.extensions_mut().insert(self.handle.clone());
        let mut service = self.service.clone();
        Box::pin(async move {
            poll_fn(|cx| service.poll_ready(cx))
                .await
                .map_err(Into::into)?;
            service.call(request).await.map_err(Into::into)
        })
    }
}
