//! Where a request came from, beyond tonic over plain TCP: an
//! application-managed rustls acceptor feeding `serve_with_incoming`, tonic's
//! own `tls_config`, and Unix sockets; with and without a `ConnectionGuard`
//! (wrapping the TCP stream under the TLS, or the TLS stream). Real tonic
//! servers and clients over loopback; certificates made here with `rcgen`.

#![cfg(unix)]

#[path = "../../examples/common/mod.rs"]
mod common;

use std::{
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use common::{
    EchoService,
    echo::{EchoReply, StreamRequest, echo_client::EchoClient, echo_server::EchoServer},
};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream, UnixListener, UnixStream},
    sync::{broadcast, mpsc},
    task::JoinHandle,
    time::{Instant, timeout},
};
use tokio_rustls::{TlsAcceptor, rustls, server::TlsStream};
use tokio_stream::{
    Stream,
    wrappers::{ReceiverStream, TcpListenerStream, UnixListenerStream},
};
use tonic::{
    Code, Status, Streaming,
    transport::{
        Certificate, Channel, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig,
        server::Connected,
    },
};
use tower_stream_guard::{
    ConnectionEnd, ConnectionEvent, ConnectionGuard, ConnectionKey, EndReason, StreamCap,
    StreamGuardLayer,
};

// Only some of the shared helpers are used here.
#[allow(dead_code)]
#[path = "../../tests/support/mod.rs"]
mod support;
use support::{PATIENCE, next_event};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A self-signed certificate for `localhost`, PEM: (certificate, key).
struct Cert {
    cert_pem: String,
    key_pem: String,
    acceptor: TlsAcceptor,
}

fn cert() -> Cert {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
        .expect("a self-signed certificate");
    let key = rustls::pki_types::PrivatePkcs8KeyDer::from(made.signing_key.serialize_der());
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_no_client_auth()
    .with_single_cert(vec![made.cert.der().clone()], key.into())
    .expect("server certificate");
    config.alpn_protocols = vec![b"h2".to_vec()];
    Cert {
        cert_pem: made.cert.pem(),
        key_pem: made.signing_key.serialize_pem(),
        acceptor: TlsAcceptor::from(Arc::new(config)),
    }
}

/// Accepts TCP connections and completes the TLS handshake with the
/// application's own acceptor; `wrap` sees each TCP stream first.
fn accept_tls<IO, F>(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    wrap: F,
) -> ReceiverStream<io::Result<TlsStream<IO>>>
where
    F: Fn(TcpStream) -> IO + Send + 'static,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (io, acceptor, tx) = (wrap(tcp), acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                if let Ok(Ok(tls)) = timeout(PATIENCE, acceptor.accept(io)).await {
                    let _ = tx.send(Ok(tls)).await;
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

type Server = JoinHandle<Result<(), tonic::transport::Error>>;

/// The echo service behind `guard`, served on `incoming`.
fn serve<I, IO>(builder: tonic::transport::Server, guard: &StreamGuardLayer, incoming: I) -> Server
where
    I: Stream<Item = io::Result<IO>> + Send + 'static,
    IO: Connected + AsyncRead + AsyncWrite + Unpin + Send + 'static,
    IO::ConnectInfo: Clone + Send + Sync + 'static,
{
    tokio::spawn(
        builder
            .layer(guard.clone())
            .add_service(EchoServer::new(EchoService::new()))
            .serve_with_incoming(incoming),
    )
}

async fn bind() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    (listener, addr)
}

/// A TLS client on a connection of its own.
async fn tls_client(addr: SocketAddr, cert: &Cert) -> EchoClient<Channel> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&cert.cert_pem))
        .domain_name("localhost");
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .expect("endpoint")
        .tls_config(tls)
        .expect("client TLS")
        .connect()
        .await
        .expect("connect over TLS");
    EchoClient::new(channel)
}

/// A client on a Unix socket connection of its own.
async fn uds_client(path: &Path) -> EchoClient<Channel> {
    let path = path.to_path_buf();
    let channel = Endpoint::from_static("http://[::]:50051")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let path = path.clone();
            async move { Ok::<_, io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .expect("connect over the Unix socket");
    EchoClient::new(channel)
}

fn socket_path() -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "tower-stream-guard-{}-{}.sock",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_file(&path);
    path
}

/// An endless server stream: small replies every `interval_ms`, or large
/// ones as fast as possible for a reader that will not read.
async fn open(
    client: &mut EchoClient<Channel>,
    interval_ms: u32,
    size: u32,
) -> Result<Streaming<EchoReply>, Status> {
    let request = StreamRequest {
        count: 0,
        interval_ms,
        size,
    };
    Ok(client.server_stream(request).await?.into_inner())
}

/// An endless stream whose first reply arrived: it is open.
async fn open_stream(client: &mut EchoClient<Channel>) -> Streaming<EchoReply> {
    let mut stream = open(client, 20, 8).await.expect("stream admitted");
    timeout(PATIENCE, stream.message())
        .await
        .expect("a reply in time")
        .expect("a reply, not an error")
        .expect("the stream is open");
    stream
}

fn assert_refused(status: &Status, words: &str) {
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains(words), "{status:?}");
}

async fn closed_event(events: &mut broadcast::Receiver<ConnectionEvent>) -> ConnectionEvent {
    loop {
        let event = timeout(PATIENCE, events.recv())
            .await
            .expect("a connection event within 5 s")
            .expect("no connection event missed");
        if event.end().is_some() {
            return event;
        }
    }
}

/// Two connections each hold one stream under a per-connection cap of one;
/// a second stream on the first is refused, naming the cap.
async fn per_connection_cap_counts_each_connection<F, Fut>(connect: F, guard: &StreamGuardLayer)
where
    F: Fn() -> Fut,
    Fut: Future<Output = EchoClient<Channel>>,
{
    let mut events = guard.subscribe();
    let mut a = connect().await;
    let mut b = connect().await;
    let _on_a = open_stream(&mut a).await;
    let _on_b = open_stream(&mut b).await;
    let refused = open(&mut a, 20, 8).await.expect_err("second stream on A");
    assert_refused(&refused, "per connection");
    let event = next_event(&mut events).await;
    assert_eq!(
        event.reason(),
        EndReason::Rejected(StreamCap::PerConnection)
    );
    assert!(event.connection().is_some(), "{event:?}");
    assert_eq!(guard.connection_streams().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_tls_per_connection_cap_counts_each_connection_and_events_carry_the_peer() {
    let cert = cert();
    let guard = StreamGuardLayer::builder()
        .max_streams_per_connection(1)
        .build()
        .unwrap();
    let mut events = guard.subscribe();
    let (listener, addr) = bind().await;
    let incoming = accept_tls(listener, cert.acceptor.clone(), |tcp| tcp);
    let server = serve(tonic::transport::Server::builder(), &guard, incoming);
    per_connection_cap_counts_each_connection(|| tls_client(addr, &cert), &guard).await;
    let event = next_event(&mut events).await;
    assert_eq!(event.peer().map(|peer| peer.ip()), Some(LOCALHOST));
    assert_eq!(
        event.connection().and_then(|key| key.remote_addr()),
        event.peer()
    );
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_tls_per_peer_cap_sees_the_peer() {
    let cert = cert();
    let guard = StreamGuardLayer::builder()
        .max_streams_per_peer(1)
        .build()
        .unwrap();
    let mut events = guard.subscribe();
    let (listener, addr) = bind().await;
    let incoming = accept_tls(listener, cert.acceptor.clone(), |tcp| tcp);
    let server = serve(tonic::transport::Server::builder(), &guard, incoming);
    let mut a = tls_client(addr, &cert).await;
    let mut b = tls_client(addr, &cert).await;
    let _on_a = open_stream(&mut a).await;
    let refused = open(&mut b, 20, 8).await.expect_err("same peer, over cap");
    assert_refused(&refused, "per peer");
    let event = next_event(&mut events).await;
    assert_eq!(event.reason(), EndReason::Rejected(StreamCap::PerPeer));
    assert_eq!(event.peer().map(|peer| peer.ip()), Some(LOCALHOST));
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tonic_tls_config_per_connection_cap_still_works() {
    let cert = cert();
    let guard = StreamGuardLayer::builder()
        .max_streams_per_connection(1)
        .build()
        .unwrap();
    let mut events = guard.subscribe();
    let (listener, addr) = bind().await;
    let builder = tonic::transport::Server::builder()
        .tls_config(
            ServerTlsConfig::new().identity(Identity::from_pem(&cert.cert_pem, &cert.key_pem)),
        )
        .expect("server TLS");
    let server = serve(builder, &guard, TcpListenerStream::new(listener));
    per_connection_cap_counts_each_connection(|| tls_client(addr, &cert), &guard).await;
    let event = next_event(&mut events).await;
    assert_eq!(event.peer().map(|peer| peer.ip()), Some(LOCALHOST));
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uds_with_a_connection_guard_caps_each_connection() {
    let path = socket_path();
    let listener = UnixListener::bind(&path).expect("bind the Unix socket");
    let connections = ConnectionGuard::builder().build().unwrap();
    let mut conn_events = connections.subscribe();
    let guard = StreamGuardLayer::builder()
        .max_streams_per_connection(1)
        .build()
        .unwrap();
    let mut events = guard.subscribe();
    let incoming = connections.wrap_incoming(UnixListenerStream::new(listener));
    let server = serve(tonic::transport::Server::builder(), &guard, incoming);
    per_connection_cap_counts_each_connection(|| uds_client(&path), &guard).await;
    let event = next_event(&mut events).await;
    let mut opened = Vec::new();
    while let Ok(event) = conn_events.try_recv() {
        opened.push(ConnectionKey::from_id(event.id()));
    }
    let key = event.connection().expect("the connection's key");
    assert!(opened.contains(&key), "{key} not among {opened:?}");
    assert_eq!(event.peer(), None, "a Unix socket has no IP peer");
    server.abort();
    let _ = std::fs::remove_file(&path);
}

/// tonic's own Unix-socket serving, no `ConnectionGuard`: tonic builds one
/// `UdsConnectInfo` per connection, and the guard tells connections apart
/// by it. Two connections each hold a stream under a per-connection cap of
/// one; a second stream on the first is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uds_per_connection_cap_counts_each_connection_without_a_connection_guard() {
    let path = socket_path();
    let listener = UnixListener::bind(&path).expect("bind the Unix socket");
    let guard = StreamGuardLayer::builder()
        .max_streams_per_connection(1)
        .build()
        .unwrap();
    let mut events = guard.subscribe();
    let server = serve(
        tonic::transport::Server::builder(),
        &guard,
        UnixListenerStream::new(listener),
    );
    let mut a = uds_client(&path).await;
    let mut b = uds_client(&path).await;
    let _on_a = open_stream(&mut a).await;
    let _on_b = open_stream(&mut b).await;
    let keys: Vec<ConnectionKey> = guard.connection_streams().iter().map(|(k, _)| *k).collect();
    assert_eq!(keys.len(), 2, "two connections, one stream each: {keys:?}");
    assert_ne!(keys[0], keys[1]);
    assert!(
        keys.iter().all(|key| key.remote_addr().is_none()),
        "{keys:?}"
    );
    let refused = open(&mut a, 20, 8).await.expect_err("second stream on A");
    assert_refused(&refused, "per connection");
    let event = next_event(&mut events).await;
    assert_eq!(
        event.reason(),
        EndReason::Rejected(StreamCap::PerConnection)
    );
    assert!(
        event.connection().is_some_and(|key| keys.contains(&key)),
        "{event:?}"
    );
    assert_eq!(event.peer(), None, "a Unix socket has no IP peer");
    // B's connection has its one stream; a third connection gets its own.
    let mut c = uds_client(&path).await;
    let _on_c = open_stream(&mut c).await;
    assert_eq!(guard.connection_streams().len(), 3);
    server.abort();
    let _ = std::fs::remove_file(&path);
}

/// Log lines written through the global subscriber (set by one test only).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// An IO whose connect info names nothing (tokio's `DuplexStream`: `()`),
/// served by tonic without a connection guard: a per-connection cap refuses
/// its streams, naming what is missing, and warns once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_without_identity_refuses_loudly_under_a_per_connection_cap() {
    let logs = Logs::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();
    let guard = StreamGuardLayer::builder()
        .max_streams_per_connection(4)
        .build()
        .unwrap();
    let mut events = guard.subscribe();
    let (accepted, incoming) = mpsc::channel::<io::Result<tokio::io::DuplexStream>>(4);
    let server = serve(
        tonic::transport::Server::builder(),
        &guard,
        ReceiverStream::new(incoming),
    );
    let channel = Endpoint::from_static("http://[::]:50051")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let accepted = accepted.clone();
            async move {
                let (client, server) = tokio::io::duplex(64 * 1024);
                accepted
                    .send(Ok(server))
                    .await
                    .map_err(|_| io::Error::other("server gone"))?;
                Ok::<_, io::Error>(TokioIo::new(client))
            }
        }))
        .await
        .expect("connect over the in-memory pipe");
    let mut client = EchoClient::new(channel);
    for _ in 0..2 {
        let refused = open(&mut client, 20, 8)
            .await
            .expect_err("no connection identity: refused, not pooled");
        assert_refused(&refused, "no connection identity");
        assert!(refused.message().contains("ConnectionGuard"), "{refused:?}");
        let event = next_event(&mut events).await;
        assert_eq!(
            event.reason(),
            EndReason::Rejected(StreamCap::PerConnection)
        );
        assert_eq!(event.connection(), None);
    }
    // Unary calls are streams too; the server is still up.
    let refused = client
        .unary(common::echo::EchoRequest {
            message: "hi".into(),
        })
        .await
        .expect_err("refused");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(!server.is_finished(), "the server survived");
    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert_eq!(
        logs.matches("no connection identity").count(),
        1,
        "one warning per guard layer: {logs}"
    );
    server.abort();
}

/// Where the connection guard sits under the application's TLS.
#[derive(Clone, Copy, Debug)]
enum Nesting {
    /// `TlsStream<GuardedIo<TcpStream>>`.
    TcpUnderTls,
    /// `GuardedIo<TlsStream<TcpStream>>`.
    TlsInside,
}

async fn serve_guarded_tls(
    nesting: Nesting,
    guard: &StreamGuardLayer,
    connections: &ConnectionGuard,
    cert: &Cert,
) -> (SocketAddr, Server) {
    let (listener, addr) = bind().await;
    let acceptor = cert.acceptor.clone();
    let server = match nesting {
        Nesting::TcpUnderTls => {
            let connections = connections.clone();
            let incoming = accept_tls(listener, acceptor, move |tcp| connections.wrap(tcp));
            serve(tonic::transport::Server::builder(), guard, incoming)
        }
        Nesting::TlsInside => {
            let incoming = connections.wrap_incoming(accept_tls(listener, acceptor, |tcp| tcp));
            serve(tonic::transport::Server::builder(), guard, incoming)
        }
    };
    (addr, server)
}

async fn a_busy_connection_under_app_tls_is_not_closed_as_idle(nesting: Nesting) {
    let idle = Duration::from_millis(300);
    let cert = cert();
    let guard = StreamGuardLayer::builder().build().unwrap();
    let connections = ConnectionGuard::builder()
        .idle_timeout(idle)
        .resolution(Duration::from_millis(20))
        .build()
        .unwrap();
    let (addr, server) = serve_guarded_tls(nesting, &guard, &connections, &cert).await;
    let mut client = tls_client(addr, &cert).await;
    let mut stream = open(&mut client, 50, 8).await.expect("stream admitted");
    let started = Instant::now();
    while started.elapsed() < idle * 3 {
        timeout(PATIENCE, stream.message())
            .await
            .expect("a reply in time")
            .unwrap_or_else(|status| panic!("{nesting:?}: the busy stream failed: {status:?}"))
            .expect("the stream is open");
    }
    assert_eq!(connections.open_connections(), 1, "{nesting:?}");
    server.abort();
}

async fn a_stalled_reader_under_app_tls_is_tracked(nesting: Nesting) {
    let cert = cert();
    let guard = StreamGuardLayer::builder()
        .response_idle_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let connections = ConnectionGuard::builder()
        .stalled_grace(Duration::from_millis(300))
        .resolution(Duration::from_millis(20))
        .build()
        .unwrap();
    let mut conn_events = connections.subscribe();
    let (addr, server) = serve_guarded_tls(nesting, &guard, &connections, &cert).await;
    let mut client = tls_client(addr, &cert).await;
    let _stalled = open(&mut client, 0, 256 * 1024)
        .await
        .expect("stream admitted");
    let closed = closed_event(&mut conn_events).await;
    assert_eq!(closed.end(), Some(ConnectionEnd::Stalled), "{nesting:?}");
    assert_eq!(closed.streams(), 1, "{nesting:?}");
    assert_eq!(closed.peer().map(|peer| peer.ip()), Some(LOCALHOST));
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_guard_under_app_tls_sees_a_busy_stream() {
    a_busy_connection_under_app_tls_is_not_closed_as_idle(Nesting::TcpUnderTls).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_guard_around_app_tls_sees_a_busy_stream() {
    a_busy_connection_under_app_tls_is_not_closed_as_idle(Nesting::TlsInside).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_guard_under_app_tls_tracks_a_stalled_reader() {
    a_stalled_reader_under_app_tls_is_tracked(Nesting::TcpUnderTls).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_guard_around_app_tls_tracks_a_stalled_reader() {
    a_stalled_reader_under_app_tls_is_tracked(Nesting::TlsInside).await;
}
