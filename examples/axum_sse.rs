//! A guarded server-sent-events endpoint in axum.
//!
//! ```text
//! cargo run --example axum_sse
//! ```
//!
//! The guard goes on the router with a plain `Router::layer` (axum's routes
//! take any request body). The SSE handler takes the [`StreamHandle`] from the
//! request extensions and stops producing the moment its stream ends.
//!
//! Two clients, over plain TCP: one reads its events; one sends its request
//! and never reads, so the socket buffers fill, hyper stops polling the body,
//! and no body timer of the usual kind would ever run. The guard's
//! `response_idle_timeout` releases it anyway: handle cancelled, producer
//! stopped, end event emitted. The example prints the end events as JSON
//! lines and finishes by itself in about a second.
//!
//! [`StreamHandle`]: tower_stream_guard::StreamHandle

use std::{
    convert::Infallible,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use axum::{
    Extension, Router,
    response::sse::{Event, Sse},
    routing::get,
};
use futures_util::Stream;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_stream::wrappers::ReceiverStream;
use tower_stream_guard::{RoutePolicy, StreamGuardLayer, StreamHandle};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Producers still running.
static PRODUCERS: AtomicUsize = AtomicUsize::new(0);

struct Producing;

impl Producing {
    fn start() -> Self {
        PRODUCERS.fetch_add(1, Ordering::SeqCst);
        Producing
    }
}

impl Drop for Producing {
    fn drop(&mut self) {
        PRODUCERS.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An event every millisecond, each 16 KiB, from a producer task that stops
/// when the stream ends: the usual shape of a handler fed by a channel.
async fn events(
    Extension(handle): Extension<StreamHandle>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let _producing = Producing::start();
        let payload = "x".repeat(16 * 1024);
        let mut ticks = tokio::time::interval(Duration::from_millis(1));
        let produce = async move {
            loop {
                ticks.tick().await;
                let event = Event::default().data(payload.as_str());
                if tx.send(Ok(event)).await.is_err() {
                    return;
                }
            }
        };
        // Ends the producer with the stream, stalled reader or not: hyper no
        // longer polls a stalled reader's body, so the channel alone would
        // keep this task blocked on `send`.
        let _ = handle.run_until_cancelled(produce).await;
    });
    Sse::new(ReceiverStream::new(rx))
}

async fn request(addr: std::net::SocketAddr) -> Result<TcpStream, BoxError> {
    let mut stream = TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET /events HTTP/1.1\r\nhost: example\r\naccept: text/event-stream\r\n\r\n")
        .await?;
    Ok(stream)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let guard = StreamGuardLayer::builder()
        .response_idle_timeout(Duration::from_millis(300))
        // A route's cap counts only that route's streams (a layer-wide cap
        // would count every request, health checks too).
        .route("/events", RoutePolicy::new().max_streams(16))
        .build()?;
    let mut end_events = guard.subscribe();
    let app = Router::new()
        .route("/events", get(events))
        .layer(guard.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });

    // A reader: takes what comes for half a second, then hangs up.
    let mut reader = request(addr).await?;
    let mut read = 0;
    let mut buf = vec![0; 64 * 1024];
    let until = tokio::time::Instant::now() + Duration::from_millis(500);
    while let Ok(Ok(n)) = tokio::time::timeout_at(until, reader.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        read += n;
    }
    println!("reader read {} KiB, then hung up", read / 1024);
    drop(reader);
    println!("{}", end_events.recv().await?.to_json());

    // A stalled reader: asks, then never reads.
    let stalled = request(addr).await?;
    println!("stalled reader connected; waiting for the guard");
    println!("{}", end_events.recv().await?.to_json());
    tokio::time::sleep(Duration::from_millis(20)).await;
    println!(
        "producers running: {}, guarded streams open: {}",
        PRODUCERS.load(Ordering::SeqCst),
        guard.active_streams()
    );
    drop(stalled);
    Ok(())
}
