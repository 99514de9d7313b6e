//! WebSockets under the guards (feature `axum`): an upgraded connection is
//! a guarded stream like any other.
//!
//! ```text
//! cargo run --example axum_websocket --features axum
//! ```
//!
//! `axum::serve` accepts through [`ConnectionGuard::wrap_listener`] and the
//! router is served with
//! `into_make_service_with_connect_info::<GuardedConnectInfo<SocketAddr>>()`:
//! that is how the [`StreamGuardLayer`] learns when an upgraded connection
//! closes. The WebSocket's stream then lasts until the socket closes: its
//! [`StreamHandle`] stays alive in the upgrade task (the echo runs under
//! `run_until_cancelled`), its cap slot is held, messages either way count
//! as activity, and `idle_timeout` and `max_lifetime` end it by closing the
//! connection. One end event per socket says how it ended.
//!
//! Three clients from one address: the first echoes three messages; a second
//! one is refused (`max_streams_per_peer(1)`) while the first is open; the
//! first closes (`completed`); a third stays silent and is cut by the idle
//! timeout. Every stream end and connection close is printed as a JSON
//! line; the example finishes by itself in about a second.

use std::{net::SocketAddr, time::Duration};

use axum::{
    Extension, Router,
    extract::ws::{Message, WebSocket, WebSocketUpgrade},
    response::Response,
    routing::get,
};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio_tungstenite::{connect_async, tungstenite};
use tower_stream_guard::{
    ConnectionEnd, ConnectionGuard, StreamGuardLayer, StreamHandle, connection::GuardedConnectInfo,
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Upgrades to a WebSocket that echoes for as long as its stream lives.
async fn echo(upgrade: WebSocketUpgrade, Extension(handle): Extension<StreamHandle>) -> Response {
    upgrade.on_upgrade(move |socket| async move {
        // Ends when the client closes, or when a guard ends the stream (its
        // connection is closed then too).
        if handle
            .run_until_cancelled(echo_messages(socket))
            .await
            .is_none()
        {
            println!("stream {} cut: {:?}", handle.id(), handle.end_reason());
        }
    })
}

async fn echo_messages(mut socket: WebSocket) {
    while let Some(Ok(message)) = socket.recv().await {
        if let Message::Text(_) | Message::Binary(_) = message
            && socket.send(message).await.is_err()
        {
            return;
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let connections = ConnectionGuard::builder().build()?;
    let guard = StreamGuardLayer::builder()
        .idle_timeout(Duration::from_millis(300))
        .max_lifetime(Duration::from_secs(3600))
        .max_streams_per_peer(1)
        .build()?;
    let mut end_events = guard.subscribe();
    let mut conn_events = connections.subscribe();
    let app = Router::new().route("/echo", get(echo)).layer(guard.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("ws://{}/echo", listener.local_addr()?);
    tokio::spawn(async move {
        axum::serve(
            connections.wrap_listener(listener),
            app.into_make_service_with_connect_info::<GuardedConnectInfo<SocketAddr>>(),
        )
        .await
    });

    let (mut first, _) = connect_async(&url).await?;
    for text in ["one", "two", "three"] {
        first.send(tungstenite::Message::text(text)).await?;
        println!("echoed: {:?}", first.next().await.transpose()?);
    }
    match connect_async(&url).await {
        Err(tungstenite::Error::Http(refused)) => {
            println!("second socket from the same peer: {}", refused.status());
        }
        other => println!("second socket: {:?}", other.map(|_| ())),
    }
    println!("{}", end_events.recv().await?.to_json()); // the refusal
    println!("active streams: {}", guard.active_streams());
    first.close(None).await?;
    while first.next().await.is_some() {}
    println!("{}", end_events.recv().await?.to_json()); // completed

    let (mut silent, _) = connect_async(&url).await?;
    println!("a silent socket; waiting for the idle timeout");
    println!("{}", end_events.recv().await?.to_json()); // idle_timeout
    println!("the client reads: {:?}", silent.next().await);
    loop {
        let event = conn_events.recv().await?;
        if event.end().is_some() {
            println!("{}", event.to_json());
        }
        if event.end() == Some(ConnectionEnd::UpgradeEnded) {
            break;
        }
    }
    println!("active streams: {}", guard.active_streams());
    Ok(())
}
