//! Chaos: rounds of hundreds of streams over many loopback connections, each
//! stream given a random fate, in front of real tonic servers on three tokio
//! runtimes, over TCP, TLS and Unix sockets. After every round: nothing
//! active, exactly one end event per stream with the reason its fate implies
//! (checked per connection), each connection closed once by the connection
//! guard having carried exactly its streams, every cap slot back, no task
//! left on any runtime, and memory not growing from round to round.
//!
//! Every connection goes through a small proxy in this file, which can
//! forward, freeze (a half-open peer: nothing moves, nothing closes) or
//! vanish (both sockets dropped, as when a client process dies). Over TCP
//! and TLS the proxy's outbound address is what the server sees as the
//! peer, which ties each end event to its connection; a Unix socket has no
//! peer address, and its events are tied by the connection guard's id for
//! the connection (the guard layer's connection key), read from the
//! guard's opened event when the proxy dials (connections are set up one
//! at a time).
//!
//! The transports, drawn per connection whatever its fates: TCP; TLS end to
//! end between the client (tonic, or hyper for bodyless requests) and the
//! application's own tokio-rustls acceptor in front of the server, with the
//! connection guard wrapping the TCP stream under the TLS (drawn only with
//! the crate's `tls` feature, without which the guard cannot identify those
//! connections); a Unix socket from the client (tonic through
//! `connect_with_connector`) to the proxy and from the proxy to the
//! server's `UnixListener`, with the connection guard giving the identity.
//! Unix-socket streams stay off the route with a per-peer cap, which
//! refuses streams with no peer address.
//!
//! The fates: completes; client cancels; silent (nobody sends a thing);
//! outlives its lifetime; stalled reader (alone on its connection: unread
//! data blocks the connection's flow-control window; the connection guard
//! must close the connection as stalled); half-open peer; vanished peer;
//! refused by a cap (a per-connection cap, so each connection, TLS or Unix,
//! must be counted apart); cut by a drain started mid-run; the handler
//! panics before answering; the response body panics mid-stream; a bodyless
//! request (an HTTP/2 `GET` with END_STREAM on its headers, from a hyper
//! client) on a route with a request idle timeout, answered by a stream that
//! moves for longer than that timeout and then completes; and dies with its
//! runtime (below).
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
//! A third runtime is doomed: its server gets the round's first connection
//! and first streams (busy ones), so the guard's stream sweeper and the
//! connection guard's ticker start there. Once every stream is open it is
//! shut down with its tasks alive, while streams that only those timers
//! can end (silent, half-open, stalled, past their lifetime) are open on
//! the other runtimes: they must still end on time with their reasons, and
//! the stalled readers' connections must still close as stalled. The doomed
//! streams end as their tasks are dropped: cancelled.
//!
//! Servers listen through [`Listener`] and the proxy reaches them through
//! [`Target`]; an end event is tied to its connection through [`Tie`].
//!
//! ```text
//! cargo test --all-features --test chaos                                   # 3 rounds, seed from the clock
//! CHAOS_SEED=42 cargo test --all-features --test chaos                     # replay a seed
//! CHAOS_SOAK_SECS=600 cargo test --all-features --test chaos -- --ignored  # the 10-minute soak
//! ```
//!
//! The seed is printed when a round fails.

// Some connections are Unix sockets.
#![cfg(unix)]

#[path = "../../examples/common/mod.rs"]
mod common;

use std::{
    collections::BTreeMap,
    convert::Infallible,
    future::Future,
    io,
    net::SocketAddr,
    path::PathBuf,
    pin::Pin,
    sync::{Arc, Mutex, Once, OnceLock},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use common::{
    EchoService,
    echo::{EchoRequest, StreamRequest, echo_client::EchoClient, echo_server::EchoServer},
};
use futures_util::StreamExt as _;
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream, UnixListener, UnixStream},
    sync::{broadcast, mpsc, oneshot, watch},
    task::JoinSet,
    time::{Instant, timeout},
};
use tokio_rustls::{TlsAcceptor, TlsConnector, rustls};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream, UnixListenerStream};
use tonic::{
    Code, Request,
    server::NamedService,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};
use tower::{Layer, Service};
use tower_stream_guard::{
    ConnectionEnd, ConnectionEvent, ConnectionGuard, ConnectionKey, Drain, EndEvent, EndReason,
    IdleDirection, RoutePolicy, StreamCap, StreamGuardLayer,
};

#[allow(dead_code)]
#[path = "../../tests/support/mod.rs"]
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
/// How long the connection guard lets a stalled reader's connection stay
/// after its stream's guard fired. Short: the connection must close as
/// stalled before the drain would close it.
const STALLED_GRACE: Duration = Duration::from_millis(100);

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
    /// A busy stream served on the doomed runtime, which is shut down while
    /// it is open: its task is dropped, which ends it as cancelled.
    RuntimeDies,
}

impl Fate {
    fn reason(self) -> EndReason {
        match self {
            Fate::Completes | Fate::Bodyless => EndReason::Completed,
            Fate::Cancels | Fate::Vanishes | Fate::RuntimeDies => EndReason::Cancelled,
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
            Fate::Panics | Fate::BodyPanics | Fate::RuntimeDies => code != Code::Ok,
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

/// A socket of the proxy's or of a client's.
trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// How a connection reaches its server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Transport {
    Tcp,
    /// TCP with TLS end to end between the tonic (or hyper) client and the
    /// application's own tokio-rustls acceptor in front of the server (the
    /// proxy forwards the encrypted bytes); the connection guard wraps the
    /// TCP stream under the TLS.
    Tls,
    /// A Unix socket from the client to the proxy and from the proxy to the
    /// server's `UnixListener`; the connection guard gives the identity.
    Uds,
}

/// The certificate of `localhost` the TLS listeners present, made once, and
/// the client configurations that trust it.
struct Tls {
    acceptor: TlsAcceptor,
    /// For tonic clients.
    client: ClientTlsConfig,
    /// For the bare hyper clients of bodyless requests.
    connector: TlsConnector,
}

fn tls() -> &'static Tls {
    static TLS: OnceLock<Tls> = OnceLock::new();
    TLS.get_or_init(|| {
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
            .expect("a self-signed certificate");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = rustls::pki_types::PrivatePkcs8KeyDer::from(made.signing_key.serialize_der());
        let mut server = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(vec![made.cert.der().clone()], key.into())
            .expect("server certificate");
        server.alpn_protocols = vec![b"h2".to_vec()];
        let mut roots = rustls::RootCertStore::empty();
        roots.add(made.cert.der().clone()).expect("a root");
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![b"h2".to_vec()];
        Tls {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            client: ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(made.cert.pem()))
                .domain_name("localhost"),
            connector: TlsConnector::from(Arc::new(client)),
        }
    })
}

/// A round's directory of Unix sockets, removed when dropped.
struct SocketDir {
    path: PathBuf,
    next: std::sync::atomic::AtomicU32,
}

impl SocketDir {
    fn new(seed: u64) -> SocketDir {
        let path = std::env::temp_dir().join(format!(
            "tsg-chaos-{}-{}",
            std::process::id(),
            seed % 1_000_000
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("a socket directory");
        SocketDir {
            path,
            next: std::sync::atomic::AtomicU32::new(0),
        }
    }

    /// A fresh socket path in the directory.
    fn socket(&self) -> PathBuf {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.path.join(format!("{n}.sock"))
    }
}

impl Drop for SocketDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A server's listening socket, served in [`serve`] and reached through
/// its [`Target`].
enum Listener {
    Tcp(TcpListener),
    /// TCP, with the application's TLS acceptor in front of the server.
    Tls(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    async fn bind(transport: Transport, dir: &SocketDir) -> Listener {
        match transport {
            Transport::Tcp | Transport::Tls => {
                let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
                if transport == Transport::Tls {
                    Listener::Tls(listener)
                } else {
                    Listener::Tcp(listener)
                }
            }
            Transport::Uds => {
                let path = dir.socket();
                let listener = UnixListener::bind(&path).expect("bind the Unix socket");
                Listener::Unix(listener, path)
            }
        }
    }

    /// Where the proxy reaches this listener.
    fn target(&self) -> Target {
        match self {
            Listener::Tcp(listener) | Listener::Tls(listener) => {
                Target::Tcp(listener.local_addr().expect("addr"))
            }
            Listener::Unix(_, path) => Target::Unix(path.clone()),
        }
    }
}

/// How the proxy reaches a server (TLS is the client's and the server's
/// business: the proxy sees TCP).
#[derive(Clone, Debug)]
enum Target {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl Target {
    /// Connects the proxy to the server: the stream, and the peer address
    /// the server sees, if any.
    async fn dial(&self) -> (Box<dyn Io>, Option<SocketAddr>) {
        match self {
            Target::Tcp(addr) => {
                let outbound = TcpStream::connect(addr).await.expect("proxy connect");
                let _ = outbound.set_nodelay(true);
                let peer = outbound.local_addr().expect("outbound addr");
                (Box::new(outbound), Some(peer))
            }
            Target::Unix(path) => {
                let outbound = UnixStream::connect(path)
                    .await
                    .expect("proxy connect over the Unix socket");
                (Box::new(outbound), None)
            }
        }
    }
}

/// What ties an end event (and a connection event) to the connection its
/// stream came on: the connection guard's id for the connection, which the
/// guard layer uses as its connection key. (Not the peer address the server
/// sees, the proxy's outbound address: Linux gives one local port to two
/// connections at once when their destinations differ, so two servers can
/// see the same peer.)
#[derive(Clone, Copy, Debug)]
struct Tie(u64);

impl Tie {
    fn owns(self, event: &EndEvent) -> bool {
        event.connection() == Some(ConnectionKey::from_id(self.0))
    }

    fn owns_connection(self, event: &ConnectionEvent) -> bool {
        event.id() == self.0
    }
}

/// Where a client reaches its proxy.
#[derive(Clone, Debug)]
enum ProxyAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl ProxyAddr {
    async fn dial(&self) -> Box<dyn Io> {
        match self {
            ProxyAddr::Tcp(addr) => {
                let tcp = TcpStream::connect(addr)
                    .await
                    .expect("connect to the proxy");
                let _ = tcp.set_nodelay(true);
                Box::new(tcp)
            }
            ProxyAddr::Unix(path) => Box::new(
                UnixStream::connect(path)
                    .await
                    .expect("connect to the proxy's Unix socket"),
            ),
        }
    }
}

/// The proxy's listening socket, Unix for the [`Transport::Uds`]
/// connections (so that the client end is a Unix socket too).
enum ProxyListener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl ProxyListener {
    async fn accept(&self) -> io::Result<Box<dyn Io>> {
        Ok(match self {
            ProxyListener::Tcp(listener) => {
                let (inbound, _) = listener.accept().await?;
                let _ = inbound.set_nodelay(true);
                Box::new(inbound)
            }
            ProxyListener::Unix(listener) => Box::new(listener.accept().await?.0),
        })
    }
}

/// A one-connection proxy in front of `server`. Returns the address to
/// connect to, the switch, and (once connected) the peer address the
/// server sees, if any.
async fn proxy(
    server: Target,
    transport: Transport,
    dir: &SocketDir,
    tasks: &mut JoinSet<()>,
) -> (
    ProxyAddr,
    watch::Sender<ProxyMode>,
    oneshot::Receiver<Option<SocketAddr>>,
) {
    let (listener, addr) = if transport == Transport::Uds {
        let path = dir.socket();
        let listener = UnixListener::bind(&path).expect("bind the proxy's Unix socket");
        (ProxyListener::Unix(listener), ProxyAddr::Unix(path))
    } else {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        (ProxyListener::Tcp(listener), ProxyAddr::Tcp(addr))
    };
    let (mode, watch_mode) = watch::channel(ProxyMode::Forward);
    let (peer_tx, peer_rx) = oneshot::channel();
    tasks.spawn(async move {
        let Ok(inbound) = listener.accept().await else {
            return;
        };
        drop(listener);
        let (outbound, peer) = server.dial().await;
        let _ = peer_tx.send(peer);
        let (in_read, in_write) = tokio::io::split(inbound);
        let (out_read, out_write) = tokio::io::split(outbound);
        // Both directions end together: when one side closes or the proxy
        // vanishes, every socket is dropped.
        tokio::select! {
            () = pipe(in_read, out_write, watch_mode.clone()) => {}
            () = pipe(out_read, in_write, watch_mode) => {}
        }
    });
    (addr, mode, peer_rx)
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
struct SecondRuntime {
    handle: tokio::runtime::Handle,
    stop: oneshot::Sender<()>,
    /// Yields the tasks still alive when the runtime was told to stop.
    thread: std::thread::JoinHandle<usize>,
}

impl SecondRuntime {
    fn start(name: &str) -> SecondRuntime {
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
    async fn shut_down(self, fail: &impl Fn(&str) -> String) {
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
    async fn stop(self, fail: &impl Fn(&str) -> String) -> usize {
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
enum Server {
    First,
    Second,
    /// On the doomed runtime, shut down with its streams open.
    Doomed,
}

/// One connection's client: tonic for the gRPC fates, a bare hyper HTTP/2
/// client for the bodyless requests.
#[derive(Clone)]
enum Client {
    Grpc(EchoClient<Channel>),
    Http2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

impl Client {
    /// Connects to the proxy at `addr` (with TLS on [`Transport::Tls`]);
    /// the kind follows the fates.
    async fn connect(
        addr: &ProxyAddr,
        transport: Transport,
        fates: &[Fate],
        tasks: &mut JoinSet<()>,
    ) -> Client {
        if fates.first() == Some(&Fate::Bodyless) {
            let mut io = addr.dial().await;
            if transport == Transport::Tls {
                let name = rustls::pki_types::ServerName::try_from("localhost").expect("a name");
                io = Box::new(
                    tls()
                        .connector
                        .connect(name, io)
                        .await
                        .expect("TLS handshake"),
                );
            }
            let (sender, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
                    .await
                    .expect("HTTP/2 handshake");
            tasks.spawn(async move {
                let _ = connection.await;
            });
            return Client::Http2(sender);
        }
        let channel = match addr {
            ProxyAddr::Tcp(addr) if transport == Transport::Tls => {
                Endpoint::from_shared(format!("https://{addr}"))
                    .expect("endpoint")
                    .tls_config(tls().client.clone())
                    .expect("client TLS")
                    .connect()
                    .await
            }
            ProxyAddr::Tcp(addr) => {
                Endpoint::from_shared(format!("http://{addr}"))
                    .expect("endpoint")
                    .connect()
                    .await
            }
            ProxyAddr::Unix(path) => {
                let path = path.clone();
                Endpoint::from_static("http://[::]:50051")
                    .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                        let path = path.clone();
                        async move {
                            Ok::<_, io::Error>(TokioIo::new(UnixStream::connect(path).await?))
                        }
                    }))
                    .await
            }
        };
        Client::Grpc(EchoClient::new(channel.expect("connect through the proxy")))
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
    transport: Transport,
}

/// Tags a request with its fate's route (`x-fate`) and, for the panics, what
/// [`ChaosLayer`] must do (`x-chaos`).
fn tagged<T>(message: T, fate: Fate, transport: Transport) -> Request<T> {
    let mut request = Request::new(message);
    let tag = match fate {
        Fate::OutlivesLifetime => "lifetime",
        Fate::CapHolder | Fate::Rejected => "capped",
        // A per-peer cap refuses streams with no peer address: the plain
        // route has one, so Unix sockets stay off it.
        _ if transport == Transport::Uds => "plain-unix",
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
async fn open(
    client: &Client,
    transport: Transport,
    fate: Fate,
    streams: &mut JoinSet<(Fate, Option<Code>)>,
) {
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
                .server_stream(tagged(request, fate, transport))
                .await
                .expect("stream opens")
                .into_inner();
            streams.spawn(async move { (fate, Some(read_to_end(stream).await)) });
        }
        Fate::Cancels | Fate::Vanishes => {
            let mut stream = client
                .server_stream(tagged(busy(0), fate, transport))
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
                .bidi(tagged(ReceiverStream::new(rx), fate, transport))
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
        Fate::OutlivesLifetime | Fate::CapHolder | Fate::Drained | Fate::RuntimeDies => {
            let stream = client
                .server_stream(tagged(busy(0), fate, transport))
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
                .server_stream(tagged(request, fate, transport))
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
                .server_stream(tagged(busy(0), fate, transport))
                .await
                .expect("stream opens")
                .into_inner();
            streams.spawn(async move { (fate, Some(read_to_end(stream).await)) });
        }
        Fate::Bodyless => unreachable!("opened above"),
        Fate::Rejected | Fate::Panics => {
            let refused = client.server_stream(tagged(busy(0), fate, transport)).await;
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

/// One planned connection: the fates of its streams, its server and its
/// transport.
struct Planned {
    fates: Vec<Fate>,
    server: Server,
    transport: Transport,
}

/// Plans a round's connections: first one to the doomed runtime's server
/// (its streams are the round's first, so the guard's timers start on that
/// runtime); then shared ones with a mix of fates (some with a capped
/// group), and connections of their own for stalled readers, half-open and
/// vanishing peers and bodyless requests. About a third of them go to the
/// second runtime's server; about a quarter each over TLS and over a Unix
/// socket.
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
    let doomed = Planned {
        fates: vec![Fate::RuntimeDies; 1 + rng.below(4) as usize],
        server: Server::Doomed,
        transport: Transport::Tcp,
    };
    std::iter::once(doomed)
        .chain(connections.into_iter().map(|fates| Planned {
            fates,
            server: if rng.below(3) == 0 {
                Server::Second
            } else {
                Server::First
            },
            transport: match rng.below(4) {
                0 => Transport::Tls,
                1 => Transport::Uds,
                _ => Transport::Tcp,
            },
        }))
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
    /// Streams and connections per transport.
    by_transport: BTreeMap<String, (usize, usize)>,
    /// Tasks alive on the doomed runtime when it was shut down.
    doomed_tasks: usize,
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
    let fail = |what: &str| format!("CHAOS_SEED={seed}: {what}");
    // The connections left after the cut close a second later: enough for a
    // client on a loaded machine (CI beside other builds) to read the cut's
    // UNAVAILABLE trailers before its connection goes (at 200 ms, a drained
    // client once read `Unknown`: the close came first).
    let drain = Drain::with_close_delay(Duration::from_secs(1));
    // Closes the connections of stalled readers soon after their streams'
    // guards fire, and what hyper would keep open past the drain: the
    // connections of frozen peers. Its events name each connection's id
    // (the tie of every stream to its connection) and count its streams.
    let connection_guard = ConnectionGuard::builder()
        .stalled_grace(STALLED_GRACE)
        .event_capacity(1 << 14)
        .drain(&drain)
        .build()
        .expect("valid configuration");
    let mut connection_events = connection_guard.subscribe();
    let mut seen_connection_events = Vec::new();
    let guard = {
        let events = Arc::clone(&events);
        StreamGuardLayer::builder()
            .idle_timeout(IDLE)
            .max_streams(100_000)
            .route_when(
                |r| r.headers().get("x-fate").is_some_and(|v| v == "plain"),
                RoutePolicy::new().max_streams_per_peer(100_000),
            )
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
    let dir = SocketDir::new(seed);
    // Servers behind clones of the one guard, one per transport: on this
    // runtime, on a second runtime, and (TCP only) on the doomed runtime.
    let second_runtime = SecondRuntime::start("chaos-second-runtime");
    let doomed_runtime = SecondRuntime::start("chaos-doomed-runtime");
    let all_transports = [Transport::Tcp, Transport::Tls, Transport::Uds];
    let mut targets = BTreeMap::new();
    let mut servers = Vec::new();
    for (server, runtime, transports) in [
        (
            Server::First,
            tokio::runtime::Handle::current(),
            &all_transports[..],
        ),
        (
            Server::Second,
            second_runtime.handle.clone(),
            &all_transports[..],
        ),
        (
            Server::Doomed,
            doomed_runtime.handle.clone(),
            &[Transport::Tcp][..],
        ),
    ] {
        for &transport in transports {
            let listener = Listener::bind(transport, &dir).await;
            targets.insert((server, transport), listener.target());
            let serving = runtime.spawn(serve(
                listener,
                guard.clone(),
                service.clone(),
                connection_guard.clone(),
                drain.clone(),
            ));
            // The doomed server's task dies with its runtime.
            if server != Server::Doomed {
                servers.push(serving);
            }
        }
    }

    // Connections are set up one after another: the connection guard's
    // next opened event with the proxy's outbound address (none for a Unix
    // socket) is the connection just dialled.
    let mut proxies = JoinSet::new();
    let mut connections = Vec::new();
    for Planned {
        fates,
        server,
        transport,
    } in plan(&mut rng, scale)
    {
        let (addr, mode, peer) = proxy(
            targets[&(server, transport)].clone(),
            transport,
            &dir,
            &mut proxies,
        )
        .await;
        let client = Client::connect(&addr, transport, &fates, &mut proxies).await;
        // Waits for the connection guard to wrap the connection: that
        // names the connection (its id), and makes the doomed
        // runtime's connection the first wrapped.
        let peer = peer.await.expect("the proxy connected");
        let opened = timeout(PATIENCE, async {
            loop {
                let event = connection_events
                    .recv()
                    .await
                    .unwrap_or_else(|e| panic!("{}", fail(&format!("{e}"))));
                seen_connection_events.push(event.clone());
                if event.end().is_none() && event.peer() == peer {
                    return event.id();
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{}", fail("a connection was not wrapped")));
        let tie = Tie(opened);
        connections.push(Connection {
            client,
            mode,
            tie,
            fates,
            server,
            transport,
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
            open(&connection.client, connection.transport, fate, tasks).await;
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
    let doomed = all.iter().filter(|f| **f == Fate::RuntimeDies).count();
    // The doomed runtime files the round's first stream and wraps its first
    // connection, so the stream sweeper and the connection guard's ticker
    // run there. It dies while streams of the other runtimes, which only
    // those timers end (idle, half-open, stalled, past their lifetime), are
    // still open: the timers must move.
    assert!(
        guard.active_streams() > late + doomed,
        "{}",
        fail("nothing for a timer to end when the doomed runtime dies")
    );
    let doomed_tasks = doomed_runtime.stop(&fail).await;
    assert!(
        doomed_tasks > doomed,
        "{}",
        fail("the doomed runtime had no streams when it died")
    );
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
                "reasons on the connection of {:?} ({:?} server, {:?})",
                connection.fates[0], connection.server, connection.transport
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

    // The connection guard's view: each connection closed once, having
    // carried every stream of its own (refused ones too, whatever the
    // transport); stalled readers' connections closed as stalled.
    wait_until("every connection closed", || {
        connection_guard.open_connections() == 0
    })
    .await;
    loop {
        match connection_events.try_recv() {
            Ok(event) => seen_connection_events.push(event),
            Err(broadcast::error::TryRecvError::Empty) => break,
            Err(e) => panic!("{}", fail(&format!("connection events: {e}"))),
        }
    }
    for connection in &connections {
        let closed: Vec<&ConnectionEvent> = seen_connection_events
            .iter()
            .filter(|e| e.end().is_some() && connection.tie.owns_connection(e))
            .collect();
        let what = format!(
            "the connection of {:?} ({:?} server, {:?})",
            connection.fates[0], connection.server, connection.transport
        );
        assert_eq!(
            closed.len(),
            1,
            "{}",
            fail(&format!("closes of {what}: {closed:?}"))
        );
        assert_eq!(
            closed[0].streams(),
            connection.fates.len() as u64,
            "{}",
            fail(&format!("streams of {what}"))
        );
        if connection.fates[0] == Fate::StalledReader {
            assert_eq!(
                closed[0].end(),
                Some(ConnectionEnd::Stalled),
                "{}",
                fail(&format!("end of {what}"))
            );
        }
    }

    let mut report = RoundReport {
        streams: all.len(),
        connections: connection_count,
        doomed_tasks,
        ..RoundReport::default()
    };
    for connection in &connections {
        let entry = report
            .by_transport
            .entry(format!("{:?}", connection.transport))
            .or_default();
        entry.0 += connection.fates.len();
        entry.1 += 1;
    }
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
    drop(dir);
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
        "{label} seed {seed}: {} streams on {} connections ({} streams on {} connections on the second runtime; (streams, connections) per transport {:?}; {} tasks dropped with the doomed runtime); {:?}; rss {} MiB",
        report.streams,
        report.connections,
        report.second_runtime.0,
        report.second_runtime.1,
        report.by_transport,
        report.doomed_tasks,
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
#[ignore = "a long soak: CHAOS_SOAK_SECS=600 cargo test --all-features --test chaos -- --ignored"]
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
