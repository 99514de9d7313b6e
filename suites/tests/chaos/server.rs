//! The round's servers: the guard in front of the echo service and the
//! [`Ticker`], with [`ChaosLayer`]'s panics, on up to three runtimes.

use std::{
    convert::Infallible,
    future::Future,
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use futures_util::StreamExt as _;
use http_body::{Body, Frame};
use http_body_util::StreamBody;
use tokio::{
    sync::oneshot,
    time::{Instant, timeout},
};
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tonic::server::NamedService;
use tower::{Layer, Service};
use tower_stream_guard::{ConnectionGuard, Drain, StreamGuardLayer, StreamHandle};

use crate::{
    CHAOS_PANIC, FRAMES_BEFORE_BODY_PANIC, TICK, TICKS,
    common::{EchoService, echo::echo_server::EchoServer},
    support::PATIENCE,
    transport::{Listener, tls},
};

/// Test-only layer between the guard and the routes: on `x-chaos: panic`
/// the response future panics (after the handler has answered, so its
/// producer is running and must be told); on `x-chaos: body-panic` the
/// response body panics after [`FRAMES_BEFORE_BODY_PANIC`] data frames.
/// Two ends race an answer: on `x-chaos: answer-after-end` the stream's
/// handle cancels it in the poll that answers (a trailers-only `OK`), on
/// `x-chaos: last-frame-after-end` in the poll that produces the body's
/// last data frame ([`EndsInItsLastFrame`]).
#[derive(Clone, Copy)]
pub(crate) struct ChaosLayer;

impl<S> Layer<S> for ChaosLayer {
    type Service = Chaos<S>;

    fn layer(&self, inner: S) -> Chaos<S> {
        Chaos(inner)
    }
}

#[derive(Clone)]
pub(crate) struct Chaos<S>(pub(crate) S);

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> Service<http::Request<B>> for Chaos<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let chaos = request
            .headers()
            .get("x-chaos")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let handle = request.extensions().get::<StreamHandle>().cloned();
        // The clone that was made ready is the one called.
        let clone = self.0.clone();
        let future = std::mem::replace(&mut self.0, clone).call(request);
        Box::pin(async move {
            let response = future.await?;
            match chaos.as_deref() {
                Some("answer-after-end") => {
                    drop(response);
                    handle.expect("the guard's handle").cancel();
                    Ok(tonic::Status::ok("").into_http())
                }
                Some("last-frame-after-end") => Ok(response.map(|_| {
                    tonic::body::Body::new(EndsInItsLastFrame {
                        handle: handle.expect("the guard's handle"),
                        sent: false,
                    })
                })),
                Some("panic") => {
                    drop(response);
                    panic!("{CHAOS_PANIC} the handler panics before answering");
                }
                Some("body-panic") => Ok(response.map(|body| {
                    tonic::body::Body::new(PanicsAfter {
                        inner: body,
                        frames: FRAMES_BEFORE_BODY_PANIC,
                    })
                })),
                _ => Ok(response),
            }
        })
    }
}

/// A response body that forwards `frames` data frames, then panics.
pub(crate) struct PanicsAfter {
    pub(crate) inner: tonic::body::Body,
    pub(crate) frames: u32,
}

impl Body for PanicsAfter {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        if self.frames == 0 {
            panic!("{CHAOS_PANIC} the response body panics mid-stream");
        }
        let frame = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if let Some(Ok(frame)) = &frame
            && frame.is_data()
        {
            self.frames -= 1;
        }
        Poll::Ready(frame)
    }
}

/// A response body of one message, during whose production the stream's
/// handle cancels the stream: at its end after it, as `Full` is.
pub(crate) struct EndsInItsLastFrame {
    pub(crate) handle: StreamHandle,
    pub(crate) sent: bool,
}

impl Body for EndsInItsLastFrame {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        if self.sent {
            return Poll::Ready(None);
        }
        self.sent = true;
        self.handle.cancel();
        // One gRPC message: EchoReply { message: "last" }.
        let message = Bytes::from_static(&[0, 0, 0, 0, 6, 0x0a, 4, b'l', b'a', b's', b't']);
        Poll::Ready(Some(Ok(Frame::data(message))))
    }

    fn is_end_stream(&self) -> bool {
        self.sent
    }
}

/// A plain tower service under a gRPC-style path: answers any request with
/// [`TICKS`] frames, one every [`TICK`], then ends.
#[derive(Clone, Copy)]
pub(crate) struct Ticker;

impl Ticker {
    pub(crate) const PATH: &'static str = "/chaos.Ticker/Tick";
}

impl NamedService for Ticker {
    const NAME: &'static str = "chaos.Ticker";
}

impl Service<http::Request<tonic::body::Body>> for Ticker {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _request: http::Request<tonic::body::Body>) -> Self::Future {
        let ticks = futures_util::stream::unfold(0, |sent| async move {
            if sent == TICKS {
                return None;
            }
            tokio::time::sleep(TICK).await;
            let frame = Frame::data(Bytes::from_static(b"tick"));
            Some((Ok::<_, Infallible>(frame), sent + 1))
        });
        std::future::ready(Ok(http::Response::new(tonic::body::Body::new(
            StreamBody::new(ticks),
        ))))
    }
}

/// One round's server: the echo service and the [`Ticker`] behind
/// [`ChaosLayer`] behind the guard, until the drain starts.
pub(crate) async fn serve(
    listener: Listener,
    guard: StreamGuardLayer,
    service: EchoService,
    connections: ConnectionGuard,
    drain: Drain,
) -> Result<(), tonic::transport::Error> {
    let router = tonic::transport::Server::builder()
        .layer(guard)
        .layer(ChaosLayer)
        .add_service(EchoServer::new(service))
        .add_service(Ticker);
    match listener {
        Listener::Tcp(listener) => {
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            router
                .serve_with_incoming_shutdown(connections.wrap_incoming(incoming), drain.started())
                .await
        }
        Listener::Tls(listener) => {
            // The application's own acceptor, the connection guard under
            // it; handshakes one at a time (connections are set up one at a
            // time), and no task to outlive the server.
            let acceptor = tls().acceptor.clone();
            let incoming = TcpListenerStream::new(listener).filter_map(move |tcp| {
                let (acceptor, connections) = (acceptor.clone(), connections.clone());
                async move {
                    let tcp = tcp.ok()?;
                    let _ = tcp.set_nodelay(true);
                    let tls = timeout(PATIENCE, acceptor.accept(connections.wrap(tcp))).await;
                    Some(Ok::<_, io::Error>(tls.ok()?.ok()?))
                }
            });
            router
                .serve_with_incoming_shutdown(incoming, drain.started())
                .await
        }
        Listener::Unix(listener, _) => {
            let incoming = connections.wrap_incoming(UnixListenerStream::new(listener));
            router
                .serve_with_incoming_shutdown(incoming, drain.started())
                .await
        }
    }
}

/// A tokio runtime on its own thread, one worker: the second server's, or
/// the doomed one's.
pub(crate) struct SecondRuntime {
    pub(crate) handle: tokio::runtime::Handle,
    pub(crate) stop: oneshot::Sender<()>,
    /// Yields the tasks still alive when the runtime was told to stop.
    pub(crate) thread: std::thread::JoinHandle<usize>,
}

impl SecondRuntime {
    pub(crate) fn start(name: &str) -> SecondRuntime {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(name)
            .enable_all()
            .build()
            .expect("second runtime");
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let _ = runtime.block_on(stopped);
            let left = runtime.metrics().num_alive_tasks();
            // Whatever is left is dropped here; `left` says whether it
            // should have been.
            runtime.shutdown_timeout(PATIENCE);
            left
        });
        SecondRuntime {
            handle,
            stop,
            thread,
        }
    }

    /// Waits until the runtime has no task left, then shuts it down.
    pub(crate) async fn shut_down(self, fail: &impl Fn(&str) -> String) {
        let handle = self.handle.clone();
        let deadline = Instant::now() + PATIENCE;
        while handle.metrics().num_alive_tasks() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let left = self.stop(fail).await;
        assert_eq!(left, 0, "{}", fail("tasks left on the second runtime"));
    }

    /// Shuts the runtime down at once, dropping its tasks; how many there
    /// were.
    pub(crate) async fn stop(self, fail: &impl Fn(&str) -> String) -> usize {
        let _ = self.stop.send(());
        let thread = self.thread;
        tokio::task::spawn_blocking(move || thread.join())
            .await
            .expect("join task")
            .unwrap_or_else(|_| panic!("{}", fail("a runtime's thread panicked")))
    }
}

/// Which server a connection goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Server {
    First,
    Second,
    /// On the doomed runtime, shut down with its streams open.
    Doomed,
}
