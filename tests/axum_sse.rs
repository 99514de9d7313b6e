//! The guard as an axum `Router::layer`, in front of a server-sent-events
//! endpoint, with clients over loopback TCP that read or stop reading.

use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Extension, Router,
    response::sse::{Event, KeepAlive, Sse},
    routing::get,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_stream::wrappers::ReceiverStream;
use tower_stream_guard::{EndReason, Heartbeat, IdleDirection, StreamGuardLayer, StreamHandle};

#[allow(dead_code)]
mod support;
use support::{SLACK, next_event, wait_until};

/// Producer tasks still running.
#[derive(Clone, Default)]
struct Producers(Arc<AtomicUsize>);

/// Large events as fast as the client takes them, from a task that stops
/// when the stream ends.
async fn events(
    Extension(handle): Extension<StreamHandle>,
    Extension(producers): Extension<Producers>,
) -> Sse<ReceiverStream<Result<Event, Infallible>>> {
    let (tx, rx) = mpsc::channel(8);
    producers.0.fetch_add(1, Ordering::SeqCst);
    tokio::spawn(async move {
        let payload = "x".repeat(16 * 1024);
        loop {
            tokio::select! {
                _ = handle.cancelled() => break,
                sent = tx.send(Ok(Event::default().data(payload.as_str()))) => {
                    if sent.is_err() {
                        break;
                    }
                }
            }
        }
        producers.0.fetch_sub(1, Ordering::SeqCst);
    });
    Sse::new(ReceiverStream::new(rx))
}

async fn serve(guard: &StreamGuardLayer, producers: &Producers) -> std::net::SocketAddr {
    let app = Router::new()
        .route("/events", get(events))
        .layer(Extension(producers.clone()))
        .layer(guard.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

async fn subscribe(addr: std::net::SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"GET /events HTTP/1.1\r\nhost: test\r\naccept: text/event-stream\r\n\r\n")
        .await
        .unwrap();
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_sse_is_released_by_the_guard() {
    let idle = Duration::from_millis(300);
    let guard = StreamGuardLayer::builder()
        .response_idle_timeout(idle)
        .build()
        .unwrap();
    let mut end_events = guard.subscribe();
    let producers = Producers::default();
    let addr = serve(&guard, &producers).await;

    let started = Instant::now();
    let stalled = subscribe(addr).await;
    let event = next_event(&mut end_events).await;
    assert_eq!(
        event.reason(),
        EndReason::IdleTimeout(IdleDirection::Response)
    );
    assert_eq!(event.path(), "/events");
    assert!(event.response().bytes > 0, "{event:?}");
    assert!(
        started.elapsed() < idle + SLACK * 2,
        "{:?}",
        started.elapsed()
    );
    wait_until("the producer stopped", || {
        producers.0.load(Ordering::SeqCst) == 0
    })
    .await;
    assert_eq!(guard.active_streams(), 0);
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reading_sse_client_is_left_alone_and_its_hang_up_is_seen() {
    let guard = StreamGuardLayer::builder()
        .response_idle_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let mut end_events = guard.subscribe();
    let producers = Producers::default();
    let addr = serve(&guard, &producers).await;

    let mut reader = subscribe(addr).await;
    let mut buf = vec![0; 64 * 1024];
    let mut read = 0;
    // Reads for longer than the idle timeout: the guard must not fire.
    let until = tokio::time::Instant::now() + Duration::from_millis(600);
    while let Ok(Ok(n)) = tokio::time::timeout_at(until, reader.read(&mut buf)).await {
        assert!(n > 0, "the server closed a busy stream");
        read += n;
    }
    assert!(read > 64 * 1024, "read only {read} bytes");
    assert!(
        end_events.try_recv().is_err(),
        "no end while the client reads"
    );
    drop(reader);
    let event = next_event(&mut end_events).await;
    assert_eq!(event.reason(), EndReason::Cancelled);
    wait_until("the producer stopped", || {
        producers.0.load(Ordering::SeqCst) == 0
    })
    .await;
}

/// An event stream whose producer died: no event ever comes, but axum's
/// keep-alive sends a comment every second.
async fn dead_events() -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    Sse::new(futures_util::stream::pending()).keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
}

const KEEP_ALIVE: Duration = Duration::from_secs(1);

/// Serves [`dead_events`] on `/events` behind `guard` over loopback; returns
/// a client's end-event receiver and its reader task, which reads until the
/// server closes the connection and returns what it read.
async fn subscribe_to_dead_events(
    guard: &StreamGuardLayer,
) -> (
    tokio::sync::broadcast::Receiver<tower_stream_guard::EndEvent>,
    tokio::task::JoinHandle<Vec<u8>>,
) {
    let events = guard.subscribe();
    let app = Router::new()
        .route("/events", get(dead_events))
        .layer(guard.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let mut stream = subscribe(addr).await;
    let reader = tokio::spawn(async move {
        let mut read = Vec::new();
        let mut buf = [0; 1024];
        while let Ok(n @ 1..) = stream.read(&mut buf).await {
            read.extend_from_slice(&buf[..n]);
        }
        read
    });
    (events, reader)
}

fn keep_alives_in(read: &[u8]) -> usize {
    read.windows(3).filter(|w| w == b":\n\n").count()
}

#[tokio::test(start_paused = true)]
async fn sse_keep_alives_of_a_dead_producer_end_at_the_idle_limit_with_a_heartbeat() {
    let idle = Duration::from_millis(5500);
    let guard = StreamGuardLayer::builder()
        .response_idle_timeout(idle)
        .heartbeat(Heartbeat::sse_comment())
        .build()
        .unwrap();
    let (mut events, reader) = subscribe_to_dead_events(&guard).await;
    let event = tokio::time::timeout(Duration::from_secs(3600), events.recv())
        .await
        .expect("an end event")
        .unwrap();
    assert_eq!(
        event.reason(),
        EndReason::IdleTimeout(IdleDirection::Response),
        "{event:?}"
    );
    assert_eq!(event.path(), "/events");
    let tick = Duration::from_millis(10);
    assert!(
        event.duration() >= idle && event.duration() <= idle + tick,
        "{:?}",
        event.duration()
    );
    // The keep-alives went to the client (at 1..=5 s) and are counted.
    assert_eq!(event.response().frames, 5, "{event:?}");
    let read = reader.await.unwrap();
    assert_eq!(
        keep_alives_in(&read),
        5,
        "{}",
        String::from_utf8_lossy(&read)
    );
    // Exactly one end event.
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(events.try_recv().is_err(), "a second end event");
    assert_eq!(guard.active_streams(), 0);
}

#[tokio::test(start_paused = true)]
async fn sse_keep_alives_of_a_dead_producer_keep_it_open_without_a_heartbeat() {
    let guard = StreamGuardLayer::builder()
        .response_idle_timeout(Duration::from_millis(5500))
        .build()
        .unwrap();
    let (mut events, reader) = subscribe_to_dead_events(&guard).await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(events.try_recv().is_err(), "no end within 60 s");
    assert_eq!(guard.active_streams(), 1);
    assert!(!reader.is_finished());
}

// === a request body the handler drops unread ===

/// An event every 100 ms for 1.5 s, then the end. With `body`, the stream
/// holds the request body unread until it ends.
fn ticking_events(
    body: Option<axum::body::Body>,
) -> Sse<ReceiverStream<Result<Event, Infallible>>> {
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        let _body = body;
        let mut ticks = tokio::time::interval(Duration::from_millis(100));
        for _ in 0..15 {
            ticks.tick().await;
            if tx.send(Ok(Event::default().data("tick"))).await.is_err() {
                return;
            }
        }
    });
    Sse::new(ReceiverStream::new(rx))
}

/// Serves on `/ignores` a handler that never extracts the request body (axum
/// drops it before the handler runs), on `/holds` one that keeps it unread;
/// POSTs a 5-byte body that comes with the head to `path`, and reads the
/// answer to its end.
async fn post_beside_events(guard: &StreamGuardLayer, path: &str) {
    let app = Router::new()
        .route(
            "/ignores",
            axum::routing::post(|| async { ticking_events(None) }),
        )
        .route(
            "/holds",
            axum::routing::post(|body: axum::body::Body| async { ticking_events(Some(body)) }),
        )
        .layer(guard.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let request = format!("POST {path} HTTP/1.1\r\nhost: test\r\ncontent-length: 5\r\n\r\nhello");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut read = Vec::new();
    let mut buf = [0; 1024];
    // To the last chunk, or to the server's close.
    while !read.ends_with(b"0\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(n @ 1..) => read.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
}

/// The defect: a request body the handler dropped unread is no open request
/// side, so `request_idle_timeout` no longer applies to the stream.
#[tokio::test(start_paused = true)]
async fn a_request_body_dropped_unread_is_not_cut_by_the_request_idle_timeout() {
    let guard = StreamGuardLayer::builder()
        .request_idle_timeout(Duration::from_millis(400))
        .build()
        .unwrap();
    let mut events = guard.subscribe();
    post_beside_events(&guard, "/ignores").await;
    let event = next_event(&mut events).await;
    assert_eq!(event.reason(), EndReason::Completed, "{event:?}");
    assert_eq!(event.request().frames, 0);
    assert_eq!(event.response().frames, 15);
    assert!(event.duration() >= Duration::from_millis(1400), "{event:?}");
}

/// The control: a body the handler holds unread is still open, and its
/// silence cuts the stream at the request idle timeout.
#[tokio::test(start_paused = true)]
async fn a_request_body_held_unread_is_cut_by_the_request_idle_timeout() {
    let idle = Duration::from_millis(400);
    let guard = StreamGuardLayer::builder()
        .request_idle_timeout(idle)
        .build()
        .unwrap();
    let mut events = guard.subscribe();
    post_beside_events(&guard, "/holds").await;
    let event = next_event(&mut events).await;
    assert_eq!(
        event.reason(),
        EndReason::IdleTimeout(IdleDirection::Request),
        "{event:?}"
    );
    let tick = Duration::from_millis(20);
    assert!(
        event.duration() >= idle && event.duration() <= idle + tick,
        "{event:?}"
    );
}

/// With the request side closed by the drop, the response side's idle
/// timeout still applies: events that stop cut the stream there.
#[tokio::test(start_paused = true)]
async fn a_request_body_dropped_unread_leaves_the_response_idle_timeout() {
    let guard = StreamGuardLayer::builder()
        .request_idle_timeout(Duration::from_millis(400))
        .response_idle_timeout(Duration::from_millis(50))
        .build()
        .unwrap();
    let mut events = guard.subscribe();
    post_beside_events(&guard, "/ignores").await;
    let event = next_event(&mut events).await;
    assert_eq!(
        event.reason(),
        EndReason::IdleTimeout(IdleDirection::Response),
        "{event:?}"
    );
}
