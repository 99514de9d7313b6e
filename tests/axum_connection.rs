//! The connection guard under `axum::serve` (feature `axum`), through
//! `ConnectionGuard::wrap_listener` and
//! `into_make_service_with_connect_info::<GuardedConnectInfo<SocketAddr>>()`:
//! real axum servers and hyper HTTP/2 clients over loopback TCP. Handlers
//! find the connection's handle and axum's `ConnectInfo<SocketAddr>`,
//! connections open and close with one event each, and a stalled reader's
//! connection, which hyper would keep after the stream guard ended its
//! stream, is closed after the stalled grace.

#![cfg(feature = "axum")]

use std::{convert::Infallible, net::SocketAddr, time::Duration};

use axum::{Extension, Router, body::Body, extract::ConnectInfo, routing::get};
use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::broadcast,
    task::JoinHandle,
    time::timeout,
};
use tower_stream_guard::{
    ConnectionEnd, ConnectionEvent, ConnectionGuard, ConnectionHandle, ConnectionKey, EndReason,
    IdleDirection, StreamGuardLayer, connection::GuardedConnectInfo,
};

// Only some of the shared helpers are used here.
#[allow(dead_code)]
mod support;
use support::{PATIENCE, SLACK, next_event};

/// The stalled client's HTTP/2 stream window: one chunk of the endless
/// response more than fills it.
const CLIENT_WINDOW: u32 = 4096;

/// Says which connection and peer the handler saw, through the extractors
/// a handler would use; either missing fails the request (500).
async fn who(
    Extension(connection): Extension<ConnectionHandle>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> String {
    format!("{} {peer}", connection.id())
}

/// 64 KiB chunks for ever, as fast as hyper takes them.
async fn endless() -> Body {
    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
    Body::from_stream(futures_util::stream::repeat_with(move || {
        Ok::<_, Infallible>(chunk.clone())
    }))
}

fn app(guard: &StreamGuardLayer) -> Router {
    Router::new()
        .route("/who", get(who))
        .route("/endless", get(endless))
        .layer(guard.clone())
}

/// Serves [`app`] with `axum::serve` on connections `connections` wraps.
async fn serve(connections: &ConnectionGuard, guard: &StreamGuardLayer) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local address");
    let listener = connections.wrap_listener(listener);
    let app = app(guard).into_make_service_with_connect_info::<GuardedConnectInfo<SocketAddr>>();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// An HTTP/2 client on a connection of its own, with the given stream
/// window; its address (the peer the server sees) and its connection task.
async fn connect(
    addr: SocketAddr,
    window: Option<u32>,
) -> (
    SendRequest<Empty<Bytes>>,
    SocketAddr,
    JoinHandle<hyper::Result<()>>,
) {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let local = tcp.local_addr().expect("client address");
    let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    if let Some(window) = window {
        builder.initial_stream_window_size(window);
    }
    let (sender, connection) = builder
        .handshake(TokioIo::new(tcp))
        .await
        .expect("HTTP/2 handshake");
    (sender, local, tokio::spawn(connection))
}

async fn get_body(sender: &mut SendRequest<Empty<Bytes>>, path: &str) -> (StatusCode, String) {
    let request = http::Request::get(format!("http://test{path}"))
        .body(Empty::new())
        .expect("request");
    let response = timeout(PATIENCE, sender.send_request(request))
        .await
        .expect("a response in time")
        .expect("a response");
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("the whole body")
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The next connection event, or a failure after `PATIENCE`.
async fn next_connection_event(
    events: &mut broadcast::Receiver<ConnectionEvent>,
) -> ConnectionEvent {
    timeout(PATIENCE, events.recv())
        .await
        .expect("a connection event within 5 s")
        .expect("no connection event missed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_sees_the_connection_handle_and_axums_connect_info() {
    let connections = ConnectionGuard::builder().build().expect("valid");
    let mut conn_events = connections.subscribe();
    let guard = StreamGuardLayer::builder().build().expect("valid");
    let mut events = guard.subscribe();
    let addr = serve(&connections, &guard).await;

    let (mut sender, client, _connection) = connect(addr, None).await;
    let (status, body) = get_body(&mut sender, "/who").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let opened = next_connection_event(&mut conn_events).await;
    assert_eq!(opened.end(), None);
    assert_eq!(body, format!("{} {client}", opened.id()));
    assert_eq!(opened.peer(), Some(client));

    // The stream guard knew the connection: its key is the handle's, so
    // per-connection caps count this connection's streams.
    let ended = next_event(&mut events).await;
    assert_eq!(
        ended.connection(),
        Some(ConnectionKey::from_id(opened.id()))
    );
    assert_eq!(ended.peer(), Some(client));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_connection_opens_and_closes_with_one_event() {
    let connections = ConnectionGuard::builder().build().expect("valid");
    let mut conn_events = connections.subscribe();
    let guard = StreamGuardLayer::builder().build().expect("valid");
    let addr = serve(&connections, &guard).await;

    let (mut first, first_addr, first_task) = connect(addr, None).await;
    let (mut second, second_addr, second_task) = connect(addr, None).await;
    for sender in [&mut first, &mut second] {
        for _ in 0..2 {
            let (status, body) = get_body(sender, "/who").await;
            assert_eq!(status, StatusCode::OK, "{body}");
        }
    }
    let mut opened = [
        next_connection_event(&mut conn_events).await,
        next_connection_event(&mut conn_events).await,
    ];
    opened.sort_by_key(|event| event.peer());
    let mut peers = [first_addr, second_addr];
    peers.sort();
    assert_eq!(opened.each_ref().map(|event| event.peer()), peers.map(Some));
    assert!(opened.iter().all(|event| event.end().is_none()));
    assert_ne!(opened[0].id(), opened[1].id());
    assert_eq!(connections.open_connections(), 2);

    // The clients hang up: each connection closes once, its two streams
    // counted (the stream guard found the handle).
    drop((first, second));
    for task in [first_task, second_task] {
        let _ = timeout(PATIENCE, task).await.expect("the client hangs up");
    }
    let mut closed = [
        next_connection_event(&mut conn_events).await,
        next_connection_event(&mut conn_events).await,
    ];
    closed.sort_by_key(|event| event.peer());
    for (closed, opened) in closed.iter().zip(&opened) {
        assert_eq!(closed.id(), opened.id());
        assert_eq!(closed.end(), Some(ConnectionEnd::Closed));
        assert_eq!(closed.streams(), 2);
    }
    assert_eq!(connections.open_connections(), 0);
    assert!(
        timeout(support::QUIET, conn_events.recv()).await.is_err(),
        "one close event per connection"
    );
}

/// The reason for the guarded listener: an HTTP/2 peer stops reading a
/// large response, hyper stops polling its body (no window), the stream
/// guard ends the stream, and hyper would keep the connection for ever;
/// the connection guard closes it `stalled_grace` later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_readers_connection_is_closed_after_the_stalled_grace() {
    let idle = Duration::from_millis(300);
    let grace = Duration::from_millis(300);
    let connections = ConnectionGuard::builder()
        .stalled_grace(grace)
        .resolution(Duration::from_millis(20))
        .build()
        .expect("valid");
    let mut conn_events = connections.subscribe();
    let guard = StreamGuardLayer::builder()
        .response_idle_timeout(idle)
        .build()
        .expect("valid");
    let mut events = guard.subscribe();
    let addr = serve(&connections, &guard).await;

    let (mut sender, _, connection) = connect(addr, Some(CLIENT_WINDOW)).await;
    let started = tokio::time::Instant::now();
    let request = http::Request::get("http://test/endless")
        .body(Empty::new())
        .expect("request");
    let response = timeout(PATIENCE, sender.send_request(request))
        .await
        .expect("response headers in time")
        .expect("response headers");
    assert_eq!(response.status(), StatusCode::OK);
    // Held, never read: the stream's window stays full.
    let mut body = response.into_body();

    let ended = next_event(&mut events).await;
    assert_eq!(
        ended.reason(),
        EndReason::IdleTimeout(IdleDirection::Response)
    );
    let opened = next_connection_event(&mut conn_events).await;
    assert_eq!(opened.end(), None);
    let closed = next_connection_event(&mut conn_events).await;
    let took = started.elapsed();
    assert_eq!(closed.id(), opened.id());
    assert_eq!(closed.end(), Some(ConnectionEnd::Stalled));
    assert_eq!(closed.streams(), 1);
    assert!(took >= idle + grace, "closed early: {took:?}");
    assert!(took < idle + grace + SLACK, "closed late: {took:?}");
    assert_eq!(connections.open_connections(), 0);

    // The client sees its connection go: the body fails after what was
    // buffered, and the connection task ends.
    let failed = timeout(PATIENCE, async {
        loop {
            match body.frame().await {
                Some(Ok(_)) => {}
                Some(Err(err)) => return Some(err),
                None => return None,
            }
        }
    })
    .await
    .expect("the body ends once the connection is closed");
    assert!(failed.is_some(), "the endless body ended cleanly");
    let closed_under_it = timeout(PATIENCE, connection)
        .await
        .expect("the client's connection ends")
        .expect("the connection task ran");
    // Closed without GOAWAY: hyper's client reports a lost connection.
    closed_under_it.expect_err("the connection ended with an error");
}

/// Without connect info the listener still guards connections (ids,
/// events, closes), but no request carries the handle: stream guards do not
/// count the connection's streams. The listener's docs say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_into_make_service_guards_connections_without_handing_requests_the_handle() {
    let connections = ConnectionGuard::builder().build().expect("valid");
    let mut conn_events = connections.subscribe();
    let guard = StreamGuardLayer::builder().build().expect("valid");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local address");
    let listener = connections.wrap_listener(listener);
    let app = Router::new()
        .route(
            "/handle",
            get(|request: axum::extract::Request| async move {
                request
                    .extensions()
                    .get::<ConnectionHandle>()
                    .is_some()
                    .to_string()
            }),
        )
        .layer(guard.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let (mut sender, client, task) = connect(addr, None).await;
    let (status, body) = get_body(&mut sender, "/handle").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "false"));
    let opened = next_connection_event(&mut conn_events).await;
    assert_eq!(opened.peer(), Some(client));
    drop(sender);
    let _ = timeout(PATIENCE, task).await.expect("the client hangs up");
    let closed = next_connection_event(&mut conn_events).await;
    assert_eq!(closed.end(), Some(ConnectionEnd::Closed));
    assert_eq!(closed.streams(), 0, "no stream guard saw the handle");
}
