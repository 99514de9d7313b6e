//! Chaos: rounds of hundreds of streams over many loopback connections, each
//! stream given a random fate, in front of real tonic servers on two tokio
//! runtimes. After every round: nothing active, exactly one end event per
//! stream with the reason its fate implies (checked per connection), every
//! cap slot back, no task left on either runtime, and memory not growing
//! from round to round.
//!
//! Every connection goes through a small TCP proxy in this file, which can
//! forward, freeze (a half-open peer: nothing moves, nothing closes) or
//! vanish (both sockets dropped, as when a client process dies). The proxy's
//! outbound address is what the server sees as the peer, which ties each end
//! event to its connection.
//!
//! The fates: completes; client cancels; silent (nobody sends a thing);
//! outlives its lifetime; stalled reader (alone on its connection: unread
//! data blocks the connection's flow-control window); half-open peer; vanished
//! peer; refused by a cap; cut by a drain started mid-run; the handler panics
//! before answering; the response body panics mid-stream; a bodyless request
//! (an HTTP/2 `GET` with END_STREAM on its headers, from a hyper client) on a
//! route with a request idle timeout, answered by a stream that moves for
//! longer than that timeout and then completes.
//!
//! The panics come from [`ChaosLayer`], a test-only layer between the guard
//! and the tonic routes, on requests tagged `x-chaos`; the bodyless requests
//! go to [`Ticker`], a plain tower service served under a gRPC-style path.
//!
//! About a third of the connections, whatever their fates, go to a second
//! tonic server on a second runtime (its own thread, one worker) behind a
//! clone of the same guard layer; that runtime is shut down at the end of
//! each round once it has no task left.
//!
//! Servers listen through [`Listener`] and the proxy reaches them through
//! [`Target`]; an end event is tied to its connection through [`Tie`]. A
//! TLS or Unix-socket transport is a variant of each.
//!
//! ```text
//! cargo test --test chaos                                   # 3 rounds, seed from the clock
//! CHAOS_SEED=42 cargo test --test chaos                     # replay a seed
//! CHAOS_SOAK_SECS=600 cargo test --test chaos -- --ignored  # the 10-minute soak
//! ```
//!
//! The seed is printed when a round fails.

#[path = "../examples/common/mod.rs"]
mod common;

use std::{
    collections::BTreeMap,
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex, Once},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use common::{
    EchoService,
    echo::{EchoRequest, StreamRequest, echo_client::EchoClient, echo_server::EchoServer},
};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot, watch},
    task::JoinSet,
    time::{Instant, timeout},
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, server::NamedService, transport::Channel};
use tower::{Layer, Service};
use tower_stream_guard::{
    ConnectionGuard, Drain, EndEvent, EndReason, IdleDirection, RoutePolicy, StreamCap,
    StreamGuardLayer,
};

#[allow(dead_code)]
mod support;
use support::{PATIENCE, wait_for_no_tasks, wait_until};

const IDLE: Duration = Duration::from_millis(500);
const LIFETIME: Duration = Duration::from_secs(1);
const GRACE: Duration = Duration::from_millis(300);
/// Replies of the streams that must look busy to the idle timeout.
const BUSY_INTERVAL_MS: u32 = 100;
/// The per-connection cap of streams marked `capped`.
const CAP: usize = 4;
/// The request idle timeout of the [`Ticker`] route: its bodyless requests
/// must outlive it several times over.
const REQUEST_IDLE: Duration = Duration::from_millis(200);
/// The [`Ticker`]'s response: `TICKS` frames, one every `TICK`: 700 ms of
/// moving response, 3.5 request idle timeouts.
const TICKS: u32 = 7;
const TICK: Duration = Duration::from_millis(100);
/// Data frames a `body-panic` response forwards before its body panics.
const FRAMES_BEFORE_BODY_PANIC: u32 = 2;
/// Every panic this file causes starts with this, and only these are kept
/// quiet.
const CHAOS_PANIC: &str = "chaos:";

/// What happens to one stream, and so why it must end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fate {
    Completes,
    Cancels,
    Silent,
    OutlivesLifetime,
    StalledReader,
    HalfOpen,
    Vanishes,
    /// Holds a slot of the capped route until the drain cuts it.
    CapHolder,
    Rejected,
    Drained,
    /// The handler panics before answering (in [`ChaosLayer`]).
    Panics,
    /// The response body panics after a few frames (in [`ChaosLayer`]).
    BodyPanics,
    /// A `GET` with no body to the [`Ticker`], whose route has a request
    /// idle timeout shorter than the response.
    Bodyless,
}

impl Fate {
    fn reason(self) -> EndReason {
        match self {
            Fate::Completes | Fate::Bodyless => EndReason::Completed,
            Fate::Cancels | Fate::Vanishes => EndReason::Cancelled,
            Fate::Silent | Fate::StalledReader | Fate::HalfOpen => {
                EndReason::IdleTimeout(IdleDirection::Both)
            }
            Fate::OutlivesLifetime => EndReason::LifetimeExceeded,
            Fate::CapHolder | Fate::Drained => EndReason::Drained,
            Fate::Rejected => EndReason::Rejected(StreamCap::PerConnection),
            Fate::Panics | Fate::BodyPanics => EndReason::Panicked,
        }
    }

    /// Whether `code` is what the client must see, where it reads to the
    /// end.
    fn client_sees(self, code: Code) -> bool {
        match self {
            Fate::Completes | Fate::Bodyless => code == Code::Ok,
            Fate::Silent | Fate::OutlivesLifetime => code == Code::DeadlineExceeded,
            Fate::CapHolder | Fate::Drained => code == Code::Unavailable,
            Fate::Rejected => code == Code::ResourceExhausted,
            // A reset stream: whatever tonic makes of it, but not a success.
            Fate::Panics | Fate::BodyPanics => code != Code::Ok,
            Fate::Cancels | Fate::StalledReader | Fate::HalfOpen | Fate::Vanishes => true,
        }
    }

    /// Ends before the drain starts.
    fn ends_early(self) -> bool {
        !matches!(self, Fate::CapHolder | Fate::Drained)
    }
}

/// splitmix64: seeded, good enough to pick fates.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ProxyMode {
    Forward,
    Freeze,
    Vanish,
}

/// What a proxy's outbound stream to a server is.
trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A server's listening socket. A new transport (TLS, a Unix socket) is a
/// variant here, served in [`serve`] and reached through its [`Target`].
enum Listener {
    Tcp(TcpListener),
}

impl Listener {
    async fn tcp() -> Listener {
        Listener::Tcp(TcpListener::bind("127.0.0.1:0").await.expect("bind"))
    }

    /// Where the proxy reaches this listener.
    fn target(&self) -> Target {
        match self {
            Listener::Tcp(listener) => Target::Tcp(listener.local_addr().expect("addr")),
        }
    }
}

/// How the proxy reaches a server.
#[derive(Clone, Copy, Debug)]
enum Target {
    Tcp(SocketAddr),
}

impl Target {
    /// Connects the proxy to the server: the stream, and how the end events
    /// of the streams on it name it.
    async fn dial(self) -> (Box<dyn Io>, Tie) {
        match self {
            Target::Tcp(addr) => {
                let outbound = TcpStream::connect(addr).await.expect("proxy connect");
                let _ = outbound.set_nodelay(true);
                let peer = outbound.local_addr().expect("outbound addr");
                (Box::new(outbound), Tie::Peer(peer))
            }
        }
    }
}

/// What ties an end event to the connection its stream came on.
#[derive(Clone, Copy, Debug)]
enum Tie {
    /// The peer address the server sees: the proxy's outbound address.
    Peer(SocketAddr),
}

impl Tie {
    fn owns(self, event: &EndEvent) -> bool {
        match self {
            Tie::Peer(peer) => event.peer() == Some(peer),
        }
    }
}

/// A one-connection TCP proxy in front of `server`. Returns the address to
/// connect to, the switch, and (once connected) what ties the server's end
/// events to this connection.
async fn proxy(
    server: Target,
    tasks: &mut JoinSet<()>,
) -> (SocketAddr, watch::Sender<ProxyMode>, oneshot::Receiver<Tie>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    let addr = listener.local_addr().expect("proxy addr");
    let (mode, watch_mode) = watch::channel(ProxyMode::Forward);
    let (tie_tx, tie_rx) = oneshot::channel();
    tasks.spawn(async move {
        let Ok((inbound, _)) = listener.accept().await else {
            return;
        };
        drop(listener);
        let _ = inbound.set_nodelay(true);
        let (outbound, tie) = server.dial().await;
        let _ = tie_tx.send(tie);
        let (in_read, in_write) = tokio::io::split(inbound);
        let (out_read, out_write) = tokio::io::split(outbound);
        // Both directions end together: when one side closes or the proxy
        // vanishes, every socket is dropped.
        tokio::select! {
            () = pipe(in_read, out_write, watch_mode.clone()) => {}
            () = pipe(out_read, in_write, watch_mode) => {}
        }
    });
    (addr, mode, tie_rx)
}

/// Copies `from` into `to` while the mode is `Forward`; stops moving bytes
/// (without closing) on `Freeze`; returns on `Vanish` or a closed socket.
async fn pipe(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    mut mode: watch::Receiver<ProxyMode>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let current = *mode.borrow_and_update();
        match current {
            ProxyMode::Vanish => return,
            ProxyMode::Freeze => {
                if mode.changed().await.is_err() {
                    return;
                }
            }
            ProxyMode::Forward => {
                let n = tokio::select! {
                    changed = mode.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        continue;
                    }
                    read = from.read(&mut buf) => match read {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    },
                };
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Test-only layer between the guard and the routes: on `x-chaos: panic`
/// the response future panics (after the handler has answered, so its
/// producer is running and must be told); on `x-chaos: body-panic` the
/// response body panics after [`FRAMES_BEFORE_BODY_PANIC`] data frames.
#[derive(Clone, Copy)]
struct ChaosLayer;

impl<S> Layer<S> for ChaosLayer {
    type Service = Chaos<S>;

    fn layer(&self, inner: S) -> Chaos<S> {
        Chaos(inner)
    }
}

#[derive(Clone)]
struct Chaos<S>(S);

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

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
        // The clone that was made ready is the one called.
        let clone = self.0.clone();
        let future = std::mem::replace(&mut self.0, clone).call(request);
        Box::pin(async move {
            let response = future.await?;
            match chaos.as_deref() {
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
struct PanicsAfter {
    inner: tonic::body::Body,
    frames: u32,
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

/// A plain tower service under a gRPC-style path: answers any request with
/// [`TICKS`] frames, one every [`TICK`], then ends.
#[derive(Clone, Copy)]
struct Ticker;

impl Ticker {
    const PATH: &'static str = "/chaos.Ticker/Tick";
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
async fn serve(
    listener: Listener,
    guard: StreamGuardLayer,
    service: EchoService,
    connections: ConnectionGuard,
    drain: Drain,
) -> Result<(), tonic::transport::Error> {
    let router = tonic::transport::Server::builder()
        .layer(guard.for_tonic())
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
    }
}

/// A second tokio runtime on its own thread, one worker.
struct SecondRuntime {
    handle: tokio::runtime::Handle,
    stop: oneshot::Sender<()>,
    /// Yields the tasks still alive when the runtime was told to stop.
    thread: std::thread::JoinHandle<usize>,
}

impl SecondRuntime {
    fn start() -> SecondRuntime {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("chaos-second-runtime")
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
    async fn shut_down(self, fail: &impl Fn(&str) -> String) {
        let handle = self.handle.clone();
        let deadline = Instant::now() + PATIENCE;
        while handle.metrics().num_alive_tasks() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = self.stop.send(());
        let thread = self.thread;
        let left = tokio::task::spawn_blocking(move || thread.join())
            .await
            .expect("join task")
            .unwrap_or_else(|_| panic!("{}", fail("the second runtime's thread panicked")));
        assert_eq!(left, 0, "{}", fail("tasks left on the second runtime"));
    }
}

/// Which server a connection goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Server {
    First,
    Second,
}

/// One connection's client: tonic for the gRPC fates, a bare hyper HTTP/2
/// client for the bodyless requests.
#[derive(Clone)]
enum Client {
    Grpc(EchoClient<Channel>),
    Http2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

impl Client {
    /// Connects to the proxy at `addr`; the kind follows the fates.
    async fn connect(addr: SocketAddr, fates: &[Fate], tasks: &mut JoinSet<()>) -> Client {
        if fates.first() == Some(&Fate::Bodyless) {
            let tcp = TcpStream::connect(addr)
                .await
                .expect("connect to the proxy");
            let _ = tcp.set_nodelay(true);
            let (sender, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                    .await
                    .expect("HTTP/2 handshake");
            tasks.spawn(async move {
                let _ = connection.await;
            });
            return Client::Http2(sender);
        }
        Client::Grpc(
            EchoClient::connect(format!("http://{addr}"))
                .await
                .expect("connect through the proxy"),
        )
    }

    fn grpc(&self) -> EchoClient<Channel> {
        match self {
            Client::Grpc(client) => client.clone(),
            Client::Http2(_) => panic!("a gRPC fate on an HTTP/2 connection"),
        }
    }
}

/// One connection of a round: its proxy and the fates of its streams.
struct Connection {
    client: Client,
    mode: watch::Sender<ProxyMode>,
    /// Ties the server's end events to this connection.
    tie: Tie,
    fates: Vec<Fate>,
    server: Server,
}

fn tagged<T>(message: T, fate: Fate) -> Request<T> {
    let mut request = Request::new(message);
    let tag = match fate {
        Fate::OutlivesLifetime => "lifetime",
        Fate::CapHolder | Fate::Rejected => "capped",
        _ => "plain",
    };
    request
        .metadata_mut()
        .insert("x-fate", tag.parse().expect("ascii"));
    let chaos = match fate {
        Fate::Panics => Some("panic"),
        Fate::BodyPanics => Some("body-panic"),
        _ => None,
    };
    if let Some(chaos) = chaos {
        request
            .metadata_mut()
            .insert("x-chaos", chaos.parse().expect("ascii"));
    }
    request
}
fn busy(count: u32) -> StreamRequest {
    StreamRequest {
        count,
        interval_ms: BUSY_INTERVAL_MS,
        size: 8,
    }
}

/// Reads a stream to its end; the status code it ended with.
async fn read_to_end(mut stream: tonic::Streaming<common::echo::EchoReply>) -> Code {
    loop {
        match stream.message().await {
            Ok(Some(_)) => {}
            Ok(None) => return Code::Ok,
            Err(status) => return status.code(),
        }
    }
}

/// Opens one stream with its fate. Returns once the server has the stream
/// (response headers, or a refusal, are back) with a task that plays the
/// rest of the fate and yields the code the client saw, if it reads to the
/// end.
async fn open(client: &Client, fate: Fate, streams: &mut JoinSet<(Fate, Option<Code>)>) {
    if fate == Fate::Bodyless {
        return open_bodyless(client, streams).await;
    }
    let mut client = client.grpc();
    match fate {
        Fate::Completes => {
            let request = StreamRequest {
                count: 3,
                interval_ms: 0,
                size: 8,
            };
            let stream = client
                .server_stream(tagged(request, fate))
                .await
                .expect("stream opens")
                .into_inner();
            streams.spawn(async move { (fate, Some(read_to_end(stream).await)) });
        }
        Fate::Cancels | Fate::Vanishes => {
            let mut stream = client
                .server_stream(tagged(busy(0), fate))
                .await
                .expect("stream opens")
                .into_inner();
            stream.message().await.expect("first reply").expect("reply");
            if fate == Fate::Cancels {
                drop(stream);
                streams.spawn(async move { (fate, None) });
            } else {
                streams.spawn(async move {
                    // The proxy vanishes: whatever the client sees, it ends.
                    let _ = read_to_end(stream).await;
                    (fate, None)
                });
            }
        }
        Fate::Silent | Fate::HalfOpen => {
            let (tx, rx) = mpsc::channel::<EchoRequest>(4);
            let stream = client
                .bidi(tagged(ReceiverStream::new(rx), fate))
                .await
                .expect("stream opens")
                .into_inner();
            streams.spawn(async move {
                if fate == Fate::Silent {
                    let code = read_to_end(stream).await;
                    drop(tx);
                    return (fate, Some(code));
                }
                // Half-open: talks every interval until the proxy freezes;
                // then nothing moves and this task waits until aborted.
                let talk = async {
                    loop {
                        let message = EchoRequest {
                            message: "ping".into(),
                        };
                        if tx.send(message).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(BUSY_INTERVAL_MS.into())).await;
                    }
                };
                tokio::join!(talk, read_to_end(stream));
                (fate, None)
            });
        }
        Fate::OutlivesLifetime | Fate::CapHolder | Fate::Drained => {
            let stream = client
                .server_stream(tagged(busy(0), fate))
                .await
                .expect("stream opens")
                .into_inner();
            streams.spawn(async move { (fate, Some(read_to_end(stream).await)) });
        }
        Fate::StalledReader => {
            let request = StreamRequest {
                count: 0,
                interval_ms: 0,
                size: 16 * 1024,
            };
            let stream = client
                .server_stream(tagged(request, fate))
                .await
                .expect("stream opens")
                .into_inner();
            // Never read: kept until the round ends.
            streams.spawn(async move {
                std::future::pending::<()>().await;
                drop(stream);
                (fate, None)
            });
        }
        Fate::BodyPanics => {
            let stream = client
                .server_stream(tagged(busy(0), fate))
                .await
                .expect("stream opens")
                .into_inner();
            streams.spawn(async move { (fate, Some(read_to_end(stream).await)) });
        }
        Fate::Bodyless => unreachable!("opened above"),
        Fate::Rejected | Fate::Panics => {
            let refused = client.server_stream(tagged(busy(0), fate)).await;
            let code = match refused {
                Ok(_) => Code::Ok,
                Err(status) => status.code(),
            };
            streams.spawn(async move { (fate, Some(code)) });
        }
    }
}

/// Opens a bodyless `GET` to the [`Ticker`]: returns once its response
/// headers are back, with a task that reads every tick and yields `Ok` if
/// all came and the body ended cleanly.
async fn open_bodyless(client: &Client, streams: &mut JoinSet<(Fate, Option<Code>)>) {
    let Client::Http2(sender) = client else {
        panic!("a bodyless fate on a gRPC connection");
    };
    let request = http::Request::get(format!("http://chaos{}", Ticker::PATH))
        .body(Empty::<Bytes>::new())
        .expect("request");
    let response = sender
        .clone()
        .send_request(request)
        .await
        .expect("response headers");
    assert_eq!(response.status(), http::StatusCode::OK);
    streams.spawn(async move {
        let mut body = response.into_body();
        let mut ticks = 0;
        let code = loop {
            match body.frame().await {
                None if ticks == TICKS => break Code::Ok,
                // Cut short (an early end or a reset): not what the
                // Ticker sent.
                None | Some(Err(_)) => break Code::Aborted,
                // The body's end comes as an empty DATA frame with
                // END_STREAM.
                Some(Ok(frame)) => {
                    ticks += u32::from(frame.data_ref().is_some_and(|d| !d.is_empty()));
                }
            }
        };
        (Fate::Bodyless, Some(code))
    });
}

/// One planned connection: the fates of its streams and its server.
struct Planned {
    fates: Vec<Fate>,
    server: Server,
}

/// Plans a round's connections: shared ones with a mix of fates (some with
/// a capped group), and connections of their own for stalled readers,
/// half-open and vanishing peers and bodyless requests. About a third of
/// them go to the second runtime's server.
fn plan(rng: &mut Rng, scale: usize) -> Vec<Planned> {
    let mixed = [
        Fate::Completes,
        Fate::Cancels,
        Fate::Silent,
        Fate::OutlivesLifetime,
        Fate::Drained,
        Fate::Panics,
        Fate::BodyPanics,
    ];
    let mut connections = Vec::new();
    for _ in 0..12 * scale {
        let n = 20 + rng.below(40) as usize;
        let mut fates: Vec<Fate> = (0..n)
            .map(|_| mixed[rng.below(mixed.len() as u64) as usize])
            .collect();
        if rng.below(3) == 0 {
            fates.extend([Fate::CapHolder; CAP]);
            fates.extend(std::iter::repeat_n(
                Fate::Rejected,
                1 + rng.below(3) as usize,
            ));
        }
        connections.push(fates);
    }
    for _ in 0..3 * scale {
        connections.push(vec![Fate::StalledReader]);
        connections.push(vec![Fate::HalfOpen; 2 + rng.below(5) as usize]);
        connections.push(vec![Fate::Vanishes; 2 + rng.below(5) as usize]);
        connections.push(vec![Fate::Bodyless; 2 + rng.below(5) as usize]);
    }
    connections
        .into_iter()
        .map(|fates| Planned {
            fates,
            server: if rng.below(3) == 0 {
                Server::Second
            } else {
                Server::First
            },
        })
        .collect()
}

/// What one round measured.
#[derive(Debug, Default)]
struct RoundReport {
    streams: usize,
    connections: usize,
    by_fate: BTreeMap<String, usize>,
    /// Streams and connections served by the second runtime.
    second_runtime: (usize, usize),
}

/// Keeps the panics this file causes out of the test output (hundreds a
/// round); every other panic still reports.
fn quiet_chaos_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let report = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let payload = info.payload();
            let message = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied());
            if !message.is_some_and(|m| m.starts_with(CHAOS_PANIC)) {
                report(info);
            }
        }));
    });
}

/// Runs one round; panics (naming the seed) on any broken invariant.
async fn round(seed: u64, scale: usize) -> RoundReport {
    quiet_chaos_panics();
    let mut rng = Rng(seed);
    let events: Arc<Mutex<Vec<EndEvent>>> = Arc::default();
    let drain = Drain::new().close_connections_after(Duration::from_millis(200));
    // Closes what hyper would keep open past the drain: connections of
    // frozen peers and of stalled readers.
    let connection_guard = ConnectionGuard::builder()
        .drain(&drain)
        .build()
        .expect("valid configuration");
    let guard = {
        let events = Arc::clone(&events);
        StreamGuardLayer::builder()
            .idle_timeout(IDLE)
            .max_streams(100_000)
            .max_streams_per_peer(100_000)
            .route_when(
                |r| r.headers().get("x-fate").is_some_and(|v| v == "lifetime"),
                RoutePolicy::new().max_lifetime(LIFETIME),
            )
            .route_when(
                |r| r.headers().get("x-fate").is_some_and(|v| v == "capped"),
                RoutePolicy::new().max_streams_per_connection(CAP),
            )
            .route_prefix(
                "/chaos.Ticker/",
                RoutePolicy::new().request_idle_timeout(REQUEST_IDLE),
            )
            .drain(&drain)
            .on_end(move |event| events.lock().unwrap().push(event.clone()))
            .build()
            .expect("valid configuration")
    };
    let service = EchoService::new();
    // Two servers behind clones of the one guard: one on this runtime, one
    // on a runtime of its own.
    let second_runtime = SecondRuntime::start();
    let mut targets = BTreeMap::new();
    let mut servers = Vec::new();
    for (server, runtime) in [
        (Server::First, tokio::runtime::Handle::current()),
        (Server::Second, second_runtime.handle.clone()),
    ] {
        let listener = Listener::tcp().await;
        targets.insert(format!("{server:?}"), listener.target());
        servers.push(runtime.spawn(serve(
            listener,
            guard.clone(),
            service.clone(),
            connection_guard.clone(),
            drain.clone(),
        )));
    }

    let mut proxies = JoinSet::new();
    let mut connections = Vec::new();
    for Planned { fates, server } in plan(&mut rng, scale) {
        let (addr, mode, tie) = proxy(targets[&format!("{server:?}")], &mut proxies).await;
        let client = Client::connect(addr, &fates, &mut proxies).await;
        let tie = tie.await.expect("the proxy connected");
        connections.push(Connection {
            client,
            mode,
            tie,
            fates,
            server,
        });
    }

    // Open every stream (holders of a capped group before their rejected
    // followers), then play the fates that need the test's hand.
    // Client tasks: those that end before the drain, those the drain ends,
    // and those that never end by themselves (half-open, stalled).
    let (mut early, mut late_clients, mut hanging) =
        (JoinSet::new(), JoinSet::new(), JoinSet::new());
    for connection in &connections {
        for &fate in &connection.fates {
            let tasks = match fate {
                Fate::HalfOpen | Fate::StalledReader => &mut hanging,
                fate if fate.ends_early() => &mut early,
                _ => &mut late_clients,
            };
            open(&connection.client, fate, tasks).await;
        }
    }
    for connection in &connections {
        match connection.fates.first() {
            Some(Fate::HalfOpen) => connection.mode.send_replace(ProxyMode::Freeze),
            Some(Fate::Vanishes) => connection.mode.send_replace(ProxyMode::Vanish),
            _ => ProxyMode::Forward,
        };
    }

    let connection_count = connections.len();
    let all: Vec<Fate> = connections.iter().flat_map(|c| c.fates.clone()).collect();
    let late = all.iter().filter(|f| !f.ends_early()).count();
    let fail = |what: &str| format!("CHAOS_SEED={seed}: {what}");
    // Every fate but the drain's plays out by itself within the lifetime
    // plus the timer's slack.
    let deadline = Instant::now() + LIFETIME + PATIENCE;
    while guard.active_streams() > late {
        assert!(
            Instant::now() < deadline,
            "{}",
            fail(&format!(
                "{} streams still open before the drain, {late} expected",
                guard.active_streams()
            ))
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Every client whose stream ended before the drain saw its code (read
    // now: the drain closes connections soon after its grace).
    check_clients(&mut early, &fail).await;
    let report = timeout(GRACE + PATIENCE, drain.start(GRACE))
        .await
        .unwrap_or_else(|_| panic!("{}", fail("the drain did not finish")));
    for server in servers {
        timeout(PATIENCE, server)
            .await
            .unwrap_or_else(|_| panic!("{}", fail("a server did not stop after the drain")))
            .expect("server task")
            .expect("server");
    }
    assert_eq!(report.cut() as usize, late, "{}", fail("drain cut count"));

    check_clients(&mut late_clients, &fail).await;
    hanging.shutdown().await;
    for connection in &connections {
        connection.mode.send_replace(ProxyMode::Vanish);
    }

    // The server's view: one event per stream, with its fate's reason, per
    // connection.
    assert_eq!(
        guard.active_streams(),
        0,
        "{}",
        fail("active after the round")
    );
    let events = std::mem::take(&mut *events.lock().unwrap());
    assert_eq!(events.len(), all.len(), "{}", fail("one event per stream"));
    let mut ids: Vec<u64> = events.iter().map(|e| e.id().get()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), events.len(), "{}", fail("an event twice"));
    for connection in &connections {
        let mut expected: Vec<String> = connection
            .fates
            .iter()
            .map(|f| f.reason().to_string())
            .collect();
        let mut got: Vec<String> = events
            .iter()
            .filter(|e| connection.tie.owns(e))
            .map(|e| e.reason().to_string())
            .collect();
        expected.sort();
        got.sort();
        assert_eq!(
            got,
            expected,
            "{}",
            fail(&format!(
                "reasons on the connection of {:?} ({:?} server)",
                connection.fates[0], connection.server
            ))
        );
    }
    let stats = guard.stats();
    assert_eq!(stats.active(), 0, "{}", fail("stats active"));
    assert_eq!(
        stats.ended_total(),
        all.len() as u64,
        "{}",
        fail("stats total")
    );
    assert!(
        guard.connection_streams().is_empty(),
        "{}",
        fail("cap slots")
    );
    assert!(guard.peer_streams().is_empty(), "{}", fail("peer slots"));

    let mut report = RoundReport {
        streams: all.len(),
        connections: connection_count,
        ..RoundReport::default()
    };
    for fate in &all {
        *report.by_fate.entry(format!("{fate:?}")).or_default() += 1;
    }
    for connection in connections.iter().filter(|c| c.server == Server::Second) {
        report.second_runtime.0 += connection.fates.len();
        report.second_runtime.1 += 1;
    }

    drop(connections);
    proxies.shutdown().await;
    wait_until("every handler and producer has stopped", || {
        service.live_producers() == 0 && service.live_handlers() == 0
    })
    .await;
    second_runtime.shut_down(&fail).await;
    wait_for_no_tasks().await;
    report
}

/// Waits for every client task of `tasks`; each that read its stream to the
/// end must have seen what its fate implies.
async fn check_clients(tasks: &mut JoinSet<(Fate, Option<Code>)>, fail: &impl Fn(&str) -> String) {
    let outcomes = timeout(PATIENCE, async {
        let mut outcomes = Vec::new();
        while let Some(done) = tasks.join_next().await {
            outcomes.push(done.expect("client task"));
        }
        outcomes
    })
    .await
    .unwrap_or_else(|_| panic!("{}", fail("client tasks did not finish")));
    for (fate, code) in outcomes {
        if let Some(code) = code {
            assert!(
                fate.client_sees(code),
                "{}",
                fail(&format!("client code of {fate:?}: {code:?}"))
            );
        }
    }
}

fn seed() -> u64 {
    std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        })
}

/// Resident memory of this process, Linux only (0 elsewhere).
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

fn print(label: &str, report: &RoundReport, seed: u64) {
    eprintln!(
        "{label} seed {seed}: {} streams on {} connections ({} streams on {} connections on the second runtime); {:?}; rss {} MiB",
        report.streams,
        report.connections,
        report.second_runtime.0,
        report.second_runtime.1,
        report.by_fate,
        rss_bytes() >> 20
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stream_is_accounted_for_exactly_once() {
    let seed = seed();
    eprintln!("chaos: CHAOS_SEED={seed}");
    let mut rss = Vec::new();
    for i in 0..3 {
        let report = round(seed.wrapping_add(i), 2).await;
        print(&format!("round {i}"), &report, seed.wrapping_add(i));
        rss.push(rss_bytes());
    }
    // After the first round has warmed up the allocator, later rounds reuse
    // its memory.
    let growth = rss[2].saturating_sub(rss[1]);
    assert!(
        growth < 16 << 20,
        "CHAOS_SEED={seed}: memory grew by {} KiB between rounds 2 and 3",
        growth >> 10
    );
}

/// The soak: rounds back to back for `CHAOS_SOAK_SECS` seconds (default
/// 600), with half as many streams again per round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a long soak: CHAOS_SOAK_SECS=600 cargo test --test chaos -- --ignored"]
async fn soak() {
    let seconds: u64 = std::env::var("CHAOS_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let seed = seed();
    eprintln!("soak: CHAOS_SEED={seed}, {seconds} s");
    let started = Instant::now();
    let end = started + Duration::from_secs(seconds);
    let mut rounds = 0u64;
    let mut streams = 0;
    // Resident memory once the allocator has warmed up (after the first
    // quarter of the soak; in the 10-minute soak it climbs for about 30
    // rounds, then stays flat), and at the end.
    let mut warm_rss = None;
    while Instant::now() < end {
        let report = round(seed.wrapping_add(rounds), 3).await;
        streams += report.streams;
        if warm_rss.is_none() && started.elapsed() * 4 >= Duration::from_secs(seconds) {
            warm_rss = Some(rss_bytes());
        }
        if rounds.is_multiple_of(10) {
            print(
                &format!("soak round {rounds}"),
                &report,
                seed.wrapping_add(rounds),
            );
        }
        rounds += 1;
    }
    let warm = warm_rss.unwrap_or_else(rss_bytes);
    let growth = rss_bytes().saturating_sub(warm);
    eprintln!(
        "soak: {rounds} rounds, {streams} streams; rss {} MiB after warm-up, grew {} KiB since",
        warm >> 20,
        growth >> 10
    );
    // A short soak ends before the warm-up does: nothing to judge.
    assert!(
        rounds < 120 || growth < 8 << 20,
        "CHAOS_SEED={seed}: memory grew by {} KiB after warm-up",
        growth >> 10
    );
}
