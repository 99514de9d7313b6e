//! An axum server whose connections a connection guard watches (feature
//! `axum`).
//!
//! ```text
//! cargo run --example axum_guarded --features axum
//! ```
//!
//! `axum::serve` accepts through [`ConnectionGuard::wrap_listener`], and the
//! router is served with
//! `into_make_service_with_connect_info::<GuardedConnectInfo<SocketAddr>>()`,
//! so that the [`StreamGuardLayer`] on the router finds each request's
//! connection: handlers get its [`ConnectionHandle`] and axum's
//! `ConnectInfo<SocketAddr>`, per-connection caps count per connection, and
//! the connection guard learns when a stream guard gave up on a reader.
//!
//! Two HTTP/2 clients: one asks `/hello` and is told its connection's id;
//! one asks `/download` (64 KiB chunks for ever) and never reads. Its stream
//! window fills, hyper stops polling the body, and the stream guard's
//! `response_idle_timeout` ends the stream; hyper would still keep the
//! stream and its connection for as long as the peer stays, so the
//! connection guard closes the connection `stalled_grace` later. Every
//! stream end and connection event is printed as a JSON line; the example
//! finishes by itself in about a second.

use std::{convert::Infallible, net::SocketAddr, time::Duration};

use axum::{Extension, Router, body::Body, extract::ConnectInfo, routing::get};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tower_stream_guard::{
    ConnectionEnd, ConnectionGuard, ConnectionHandle, RoutePolicy, StreamGuardLayer,
    connection::GuardedConnectInfo,
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn hello(
    Extension(connection): Extension<ConnectionHandle>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> String {
    format!("hello {peer}, you are on connection {}", connection.id())
}

/// 64 KiB chunks for ever, as fast as the peer takes them.
async fn download() -> Body {
    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
    Body::from_stream(futures_util::stream::repeat_with(move || {
        Ok::<_, Infallible>(chunk.clone())
    }))
}

/// An HTTP/2 client on a connection of its own; `window` is its stream
/// flow-control window.
async fn client(
    addr: SocketAddr,
    window: u32,
) -> Result<hyper::client::conn::http2::SendRequest<Empty<Bytes>>, BoxError> {
    let tcp = TcpStream::connect(addr).await?;
    let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(window)
        .handshake(TokioIo::new(tcp))
        .await?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            println!("client connection failed: {err}");
        }
    });
    Ok(sender)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let connections = ConnectionGuard::builder()
        .stalled_grace(Duration::from_millis(300))
        .idle_timeout(Duration::from_secs(60))
        .build()?;
    let guard = StreamGuardLayer::builder()
        .response_idle_timeout(Duration::from_millis(300))
        .route(
            "/download",
            RoutePolicy::new().max_streams_per_connection(4),
        )
        .build()?;
    let mut conn_events = connections.subscribe();
    let mut end_events = guard.subscribe();
    let app = Router::new()
        .route("/hello", get(hello))
        .route("/download", get(download))
        .layer(guard);
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let listener = connections.wrap_listener(listener);
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<GuardedConnectInfo<SocketAddr>>(),
        )
        .await
    });

    let mut reader = client(addr, 65_535).await?;
    let request = http::Request::get("http://example/hello").body(Empty::new())?;
    let body = reader
        .send_request(request)
        .await?
        .into_body()
        .collect()
        .await?;
    println!("{}", String::from_utf8_lossy(&body.to_bytes()));
    println!("{}", end_events.recv().await?.to_json());
    drop(reader);

    // A stalled reader: takes the headers, never the body.
    let mut stalled = client(addr, 4096).await?;
    let request = http::Request::get("http://example/download").body(Empty::new())?;
    let _unread = stalled.send_request(request).await?.into_body();
    println!("stalled reader connected; waiting for the guards");
    println!("{}", end_events.recv().await?.to_json());
    loop {
        let event = conn_events.recv().await?;
        println!("{}", event.to_json());
        if event.end() == Some(ConnectionEnd::Stalled) {
            break;
        }
    }
    println!("connections open: {}", connections.open_connections());
    Ok(())
}
