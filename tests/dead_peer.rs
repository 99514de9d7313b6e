//! A connection lost to a peer the kernel gave up on: when the guarded IO
//! fails with `ETIMEDOUT` (what `TCP_USER_TIMEOUT` and keepalive make the
//! kernel report), the close event and every stream still open on the
//! connection say `peer_unreachable`, once; a peer that reset the
//! connection still reads `cancelled`. The kernel's side (the socket options
//! doing their work under a real blackhole) is the fault suite's
//! (`suites/tests/faults.rs`); here the IO error is injected over a real
//! loopback TCP connection served by hyper (feature `hyper`).

#![cfg(feature = "hyper")]

use std::{
    convert::Infallible,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU8, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, Empty, StreamBody, combinators::BoxBody};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::broadcast,
    time::timeout,
};
use tokio_stream::{StreamExt, wrappers::IntervalStream};
use tower::Layer;
use tower_stream_guard::{
    BoxError, ConnectionEnd, ConnectionEvent, ConnectionGuard, EndReason, StreamGuardLayer,
    connection::PeerOf, stream::RequestBody,
};

#[allow(dead_code)]
mod support;
use support::{PATIENCE, assert_no_more_events, next_event};

/// No fault yet.
const HEALTHY: u8 = 0;
/// The next read or write fails as the kernel reports a peer it gave up on.
const TIMED_OUT: u8 = 1;
/// The next read or write fails as a peer's reset does.
const RESET: u8 = 2;

/// A server's TCP stream whose next read and write can be made to fail
/// with the error the kernel would report.
struct Faulty {
    tcp: TcpStream,
    fault: Arc<AtomicU8>,
}

impl Faulty {
    fn error(&self) -> Option<io::Error> {
        match self.fault.load(Ordering::Acquire) {
            TIMED_OUT => Some(io::Error::from(io::ErrorKind::TimedOut)),
            RESET => Some(io::Error::from(io::ErrorKind::ConnectionReset)),
            _ => None,
        }
    }
}

impl PeerOf for Faulty {
    fn peer(&self) -> Option<SocketAddr> {
        self.tcp.peer_addr().ok()
    }

    fn tcp_stream(&self) -> Option<&TcpStream> {
        Some(&self.tcp)
    }
}

impl AsyncRead for Faulty {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(error) = self.error() {
            return Poll::Ready(Err(error));
        }
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Faulty {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(error) = self.error() {
            return Poll::Ready(Err(error));
        }
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

type ResBody = BoxBody<Bytes, BoxError>;

/// An endless body: a chunk every 20 ms, so the connection task keeps
/// writing (and meets the fault on its next write or read).
fn ticking() -> ResBody {
    let ticks = IntervalStream::new(tokio::time::interval(Duration::from_millis(20)))
        .map(|_| Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"tick"))));
    StreamBody::new(ticks).boxed()
}

struct Setup {
    addr: SocketAddr,
    fault: Arc<AtomicU8>,
    connections: ConnectionGuard,
    connection_events: broadcast::Receiver<ConnectionEvent>,
}

/// A hyper server (through `serve_connection`) over one faulty connection.
async fn serve(guard: &StreamGuardLayer) -> Setup {
    let connections = ConnectionGuard::builder()
        .dead_peer_timeout(Some(Duration::from_secs(2)))
        .build()
        .expect("valid");
    let connection_events = connections.subscribe();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let fault = Arc::new(AtomicU8::new(HEALTHY));
    let service = guard.layer(tower::service_fn(
        |_request: Request<RequestBody<hyper::body::Incoming>>| async {
            Ok::<_, Infallible>(Response::new(ticking()))
        },
    ));
    let (server_connections, server_fault) = (connections.clone(), Arc::clone(&fault));
    tokio::spawn(async move {
        if let Ok((tcp, _)) = listener.accept().await {
            let io = Faulty {
                tcp,
                fault: server_fault,
            };
            let _ = server_connections.serve_connection(io, service).await;
        }
    });
    Setup {
        addr,
        fault,
        connections,
        connection_events,
    }
}

/// Opens `streams` streams on one HTTP/2 connection and reads a first
/// frame of each, so that all are open on the server.
async fn open_streams(addr: SocketAddr, streams: usize) -> Vec<hyper::body::Incoming> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("HTTP/2 handshake");
    tokio::spawn(connection);
    let mut bodies = Vec::new();
    for _ in 0..streams {
        let request = Request::get("http://test/feed")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let mut body = sender
            .send_request(request)
            .await
            .expect("response")
            .into_body();
        timeout(PATIENCE, body.frame())
            .await
            .expect("a first frame in time")
            .expect("a frame")
            .expect("not an error");
        bodies.push(body);
    }
    bodies
}

/// The close event of the one connection, after its open event.
async fn closed(events: &mut broadcast::Receiver<ConnectionEvent>) -> ConnectionEnd {
    loop {
        let event = timeout(PATIENCE, events.recv())
            .await
            .expect("a connection event in time")
            .expect("events");
        if let Some(end) = event.end() {
            return end;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_on_a_connection_the_kernel_gave_up_on_end_peer_unreachable() {
    let guard = StreamGuardLayer::builder()
        .idle_timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let mut events = guard.subscribe();
    let mut setup = serve(&guard).await;
    let bodies = open_streams(setup.addr, 3).await;
    assert_eq!(guard.active_streams(), 3);

    setup.fault.store(TIMED_OUT, Ordering::Release);

    let mut ids = Vec::new();
    for _ in 0..3 {
        let event = next_event(&mut events).await;
        assert_eq!(event.reason(), EndReason::PeerUnreachable, "{event:?}");
        assert!(
            event.to_json().contains(r#""reason":"peer_unreachable""#),
            "{}",
            event.to_json()
        );
        ids.push(event.id());
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "one event per stream");
    assert_no_more_events(&mut events).await;
    assert_eq!(
        closed(&mut setup.connection_events).await,
        ConnectionEnd::PeerUnreachable
    );
    assert_eq!(guard.stats().ended(EndReason::PeerUnreachable), 3);
    assert_eq!(guard.stats().ended(EndReason::Cancelled), 0);
    assert_eq!(guard.active_streams(), 0);
    assert_eq!(setup.connections.open_connections(), 0);
    drop(bodies);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_reset_the_connection_still_cancelled() {
    let guard = StreamGuardLayer::builder()
        .idle_timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let mut events = guard.subscribe();
    let mut setup = serve(&guard).await;
    let bodies = open_streams(setup.addr, 2).await;

    setup.fault.store(RESET, Ordering::Release);

    for _ in 0..2 {
        let event = next_event(&mut events).await;
        assert_eq!(event.reason(), EndReason::Cancelled, "{event:?}");
    }
    assert_no_more_events(&mut events).await;
    assert_eq!(
        closed(&mut setup.connection_events).await,
        ConnectionEnd::Closed
    );
    drop(bodies);
}

#[test]
fn dead_peer_timeouts_out_of_range_are_refused_at_build() {
    for value in [
        Duration::ZERO,
        Duration::from_millis(999),
        Duration::from_secs(3601),
    ] {
        let error = ConnectionGuard::builder()
            .dead_peer_timeout(Some(value))
            .build()
            .unwrap_err();
        assert_eq!(
            error,
            tower_stream_guard::ConfigError::DeadPeerTimeoutOutOfRange { value }
        );
        assert!(error.to_string().contains("dead_peer_timeout"), "{error}");
    }
    for value in [Duration::from_secs(1), Duration::from_secs(3600)] {
        ConnectionGuard::builder()
            .dead_peer_timeout(Some(value))
            .build()
            .expect("in range");
    }
}
