//! How a guard keys a request that arrived over TLS, seen from outside: the
//! connect info tonic attaches (`TlsConnectInfo<T>`, with or without a
//! `ConnectionGuard` under or around the TLS) must name the connection and
//! the peer in the stream's end event. `tests/connect_info.rs` runs the
//! same nestings over real loopback connections; these cases pin the
//! extraction itself.

use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use http::{Request, Response};
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio_rustls::rustls;
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};
use tower::{Layer, ServiceExt, service_fn};
use tower_stream_guard::{
    ConnectionGuard, ConnectionHandle, ConnectionKey, EndEvent, StreamGuardLayer,
    connection::PeerOf,
};

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("a socket address")
}

fn tcp() -> TcpConnectInfo {
    TcpConnectInfo {
        local_addr: Some(addr("127.0.0.1:443")),
        remote_addr: Some(addr("10.0.0.5:40000")),
    }
}

/// An IO whose connect info is whatever the test says.
struct WithInfo<T>(DuplexStream, T);

impl<T: Clone + Send + Sync + 'static> Connected for WithInfo<T> {
    type ConnectInfo = T;
    fn connect_info(&self) -> T {
        self.1.clone()
    }
}

impl<T> PeerOf for WithInfo<T> {
    fn peer(&self) -> Option<SocketAddr> {
        Some(addr("10.9.9.9:9"))
    }
}

impl<T: Unpin> AsyncRead for WithInfo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl<T: Unpin> AsyncWrite for WithInfo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

/// `TlsConnectInfo<T>` has no public constructor: make it the way tonic
/// does, from a TLS stream over an IO whose connect info is `T`, after a
/// real in-memory handshake.
async fn tls_info<T>(info: T) -> TlsConnectInfo<T>
where
    T: Clone + Send + Sync + Unpin + 'static,
{
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let key = rustls::pki_types::PrivatePkcs8KeyDer::from(made.signing_key.serialize_der());
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![made.cert.der().clone()], key.into())
        .expect("server config");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(made.cert.der().clone()).expect("root");
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let (a, b) = tokio::io::duplex(64 * 1024);
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let (client, server) = tokio::join!(
        connector.connect(name, b),
        acceptor.accept(WithInfo(a, info))
    );
    let _client = client.expect("client handshake");
    server.expect("server handshake").connect_info()
}

/// `GuardedConnectInfo<T>` the way tonic makes it, with its handle.
fn guarded<T: Clone + Send + Sync + Unpin + 'static>(
    guard: &ConnectionGuard,
    info: T,
) -> (
    tower_stream_guard::connection::GuardedConnectInfo<T>,
    ConnectionHandle,
) {
    let io = guard.wrap(WithInfo(tokio::io::duplex(64).0, info));
    (io.connect_info(), io.handle().clone())
}

/// Runs one bodyless request carrying `info` through a guard and returns
/// its end event, and whether the service found a `TcpConnectInfo` in the
/// request (what tonic's `Request::remote_addr` reads).
async fn event_of<T: Clone + Send + Sync + 'static>(info: T) -> (EndEvent, bool) {
    let guard = StreamGuardLayer::builder().build().expect("valid");
    let mut events = guard.subscribe();
    let service = guard.layer(service_fn(|request: Request<_>| async move {
        let tcp = request.extensions().get::<TcpConnectInfo>().is_some()
            || request
                .extensions()
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .is_some();
        Ok::<_, Infallible>(Response::new(String::from(if tcp { "tcp" } else { "" })))
    }));
    let mut request = Request::new(String::new());
    request.extensions_mut().insert(info);
    let response = service.oneshot(request).await.expect("answered");
    let saw_tcp = response.body().get_ref().is_some_and(|body| body == "tcp");
    drop(response);
    (events.recv().await.expect("one end event"), saw_tcp)
}

#[tokio::test]
async fn tls_over_tcp_gives_both_addresses() {
    let (event, _) = event_of(tls_info(tcp()).await).await;
    assert_eq!(
        event.connection(),
        Some(ConnectionKey::from_addrs(
            addr("127.0.0.1:443"),
            addr("10.0.0.5:40000")
        ))
    );
    assert_eq!(event.peer(), Some(addr("10.0.0.5:40000")));
}

#[tokio::test]
async fn guard_under_tls_is_unpacked() {
    let guard = ConnectionGuard::builder().build().expect("valid");
    let (info, handle) = guarded(&guard, tcp());
    let (event, saw_tcp) = event_of(tls_info(info).await).await;
    assert_eq!(event.connection(), Some(handle.key()));
    assert_eq!(event.peer(), Some(addr("10.0.0.5:40000")));
    assert!(saw_tcp, "unpacked for remote_addr");
}

#[tokio::test]
async fn guard_around_tls_is_unpacked() {
    let guard = ConnectionGuard::builder().build().expect("valid");
    let (info, handle) = guarded(&guard, tls_info(tcp()).await);
    let (event, saw_tcp) = event_of(info).await;
    assert_eq!(event.connection(), Some(handle.key()));
    assert_eq!(event.peer(), Some(addr("10.0.0.5:40000")));
    assert!(saw_tcp, "unpacked for remote_addr");
}
