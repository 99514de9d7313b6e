//! `StreamHandle::run_until_cancelled`: paused-time units, and over loopback
//! the producer behind a stalled HTTP/2 reader that the README pattern must
//! stop (an axum SSE route fed by a bounded channel, a hyper client that
//! reads the response headers and never polls the body).
//!
//! `pins_hyper_*` tests pin hyper's (and axum's) behaviour: a failure after a
//! hyper or axum upgrade means they changed, read the test before touching
//! the guard.

#[path = "../examples/common/mod.rs"]
mod common;

use std::{
    convert::Infallible,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use axum::{
    Extension, Router,
    response::sse::{Event, Sse},
    routing::get,
};
use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot},
    time::timeout,
};
use tokio_stream::wrappers::ReceiverStream;
use tower_stream_guard::{EndReason, IdleDirection, StreamGuardLayer, StreamHandle};

#[allow(dead_code)]
mod support;
use support::{PATIENCE, QUIET, SLACK, next_event};

/// The guard's timer resolution in the loopback tests (the default).
const RESOLUTION: Duration = Duration::from_millis(10);
/// The client's HTTP/2 stream window: a few events fill it.
const CLIENT_WINDOW: u32 = 4096;

/// How the producer task is written.
#[derive(Clone, Copy, Debug)]
enum Pattern {
    /// The README's pattern before `run_until_cancelled`: `select!` on
    /// `cancelled()` against the next item only, then `tx.send(..).await`
    /// alone.
    SelectAroundNextItem,
    /// The whole loop (next item and send) under `run_until_cancelled`.
    RunUntilCancelled,
}

/// What the test learns from the server side.
struct Server {
    addr: std::net::SocketAddr,
    guard: StreamGuardLayer,
    /// When the guard ended the stream, taken in the `on_end` callback.
    ended_at: Arc<Mutex<Option<Instant>>>,
    /// The producer's exit time.
    exited: oneshot::Receiver<Instant>,
    /// A clone of the producer's sender, to see that its channel is full.
    probe: oneshot::Receiver<mpsc::Sender<Result<Event, Infallible>>>,
}

/// An SSE route whose producer ticks every millisecond into a channel of 4,
/// written with `pattern`, behind a 300 ms response idle timeout.
async fn serve(pattern: Pattern) -> Server {
    let ended_at = Arc::new(Mutex::new(None));
    let guard = StreamGuardLayer::builder()
        .response_idle_timeout(Duration::from_millis(300))
        .timer_resolution(RESOLUTION)
        .on_end({
            let ended_at = Arc::clone(&ended_at);
            move |_| {
                *ended_at.lock().unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
            }
        })
        .build()
        .expect("valid configuration");
    let (exited_tx, exited) = oneshot::channel();
    let (probe_tx, probe) = oneshot::channel();
    let slots = Arc::new(Mutex::new(Some((exited_tx, probe_tx))));
    let events = move |Extension(handle): Extension<StreamHandle>| {
        let slots = Arc::clone(&slots);
        async move {
            let (tx, rx) = mpsc::channel(4);
            if let Some((exited, probe)) = slots.lock().unwrap().take() {
                let _ = probe.send(tx.clone());
                tokio::spawn(async move {
                    produce(pattern, handle, tx).await;
                    let _ = exited.send(Instant::now());
                });
            }
            Sse::new(ReceiverStream::new(rx))
        }
    };
    let app = Router::new()
        .route("/events", get(events))
        .layer(guard.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local address");
    tokio::spawn(async move { axum::serve(listener, app).await });
    Server {
        addr,
        guard,
        ended_at,
        exited,
        probe,
    }
}

async fn produce(
    pattern: Pattern,
    handle: StreamHandle,
    tx: mpsc::Sender<Result<Event, Infallible>>,
) {
    let payload = "x".repeat(1024);
    let mut ticks = tokio::time::interval(Duration::from_millis(1));
    match pattern {
        Pattern::SelectAroundNextItem => loop {
            tokio::select! {
                _ = handle.cancelled() => return,
                _ = ticks.tick() => {
                    if tx.send(Ok(Event::default().data(payload.as_str()))).await.is_err() {
                        return;
                    }
                }
            }
        },
        Pattern::RunUntilCancelled => {
            let produce = async {
                loop {
                    ticks.tick().await;
                    if tx
                        .send(Ok(Event::default().data(payload.as_str())))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            };
            let _ = handle.run_until_cancelled(produce).await;
        }
    }
}

/// An HTTP/2 client with a small stream window: it reads the response
/// headers and then never polls the body, keeping the connection open.
/// Returns the body (held, not read) and the connection task.
async fn stalled_client(
    addr: std::net::SocketAddr,
) -> (hyper::body::Incoming, tokio::task::JoinHandle<()>) {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(CLIENT_WINDOW)
        .handshake(TokioIo::new(tcp))
        .await
        .expect("HTTP/2 handshake");
    let connection = tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = http::Request::get(format!("http://{addr}/events"))
        .header("accept", "text/event-stream")
        .body(Empty::<Bytes>::new())
        .expect("request");
    let response = timeout(PATIENCE, sender.send_request(request))
        .await
        .expect("response headers in time")
        .expect("response headers");
    assert_eq!(response.status(), http::StatusCode::OK);
    (response.into_body(), connection)
}

/// Waits for the guard to end the stalled stream; returns when it did.
async fn guard_fires(server: &mut Server) -> Instant {
    let mut events = server.guard.subscribe();
    let event = next_event(&mut events).await;
    assert_eq!(
        event.reason(),
        EndReason::IdleTimeout(IdleDirection::Response)
    );
    assert_eq!(server.guard.active_streams(), 0);
    server
        .ended_at
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .expect("on_end ran before the event was broadcast")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_behind_a_stalled_reader_stops_when_the_guard_fires() {
    let mut server = serve(Pattern::RunUntilCancelled).await;
    let (body, connection) = stalled_client(server.addr).await;
    let probe = (&mut server.probe).await.expect("the handler ran");

    let ended = guard_fires(&mut server).await;
    // The reader's window is full, hyper polls the body no more, so the
    // channel is full and the producer is in (or entering) `send`.
    assert_eq!(probe.capacity(), 0, "the channel is full");
    let exited = timeout(PATIENCE, &mut server.exited)
        .await
        .expect("the producer stopped while the client still held the stream")
        .expect("the producer reported its exit");
    // What proves the handle: nothing else frees the producer while the
    // client holds the stream, which it does until after this check (the
    // `pins_hyper_` test below shows a producer left in `send`), so an exit
    // within `PATIENCE` is the handle's.
    // The wake itself is immediate; how soon a loaded 2-core machine runs
    // the woken task is not, hence the loopback tests' `SLACK` as the bound
    // (exact instants are checked under paused time below).
    let late = exited.saturating_duration_since(ended);
    eprintln!("producer exited {late:?} after the guard fired");
    assert!(
        late < SLACK,
        "the producer exited {late:?} after the guard fired"
    );
    drop(body);
    connection.abort();
}

/// The motivation: the README's former pattern, `select!` around the next item
/// only, leaves the producer waiting in `send` after the guard fired, until
/// the client closes its connection. Pins hyper's behaviour: it neither polls
/// nor drops a stalled stream's body until the client leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pins_hyper_the_select_around_next_item_pattern_stays_in_send_until_the_client_leaves() {
    let mut server = serve(Pattern::SelectAroundNextItem).await;
    let (body, connection) = stalled_client(server.addr).await;
    let probe = (&mut server.probe).await.expect("the handler ran");

    guard_fires(&mut server).await;
    assert_eq!(probe.capacity(), 0, "the channel is full");
    // Nothing can free the channel while the client holds the stream: the
    // producer waits in `send` however long we look.
    assert!(
        timeout(QUIET, &mut server.exited).await.is_err(),
        "the producer stopped although its send could not complete"
    );
    drop(probe);

    // The client leaves: hyper drops the body, the send fails.
    drop(body);
    connection.abort();
    timeout(PATIENCE, &mut server.exited)
        .await
        .expect("the producer stopped once the client left")
        .expect("the producer reported its exit");
}

// Paused-time units: a stream opened on the guard directly, its response
// body held and never polled (as hyper holds a stalled reader's).

#[path = "support/paused.rs"]
mod paused;

/// Opens a stream behind a one-second response idle timeout; returns its
/// handle and what keeps it open.
async fn open_paused() -> (
    StreamGuardLayer,
    StreamHandle,
    impl Sized,
    tokio::sync::broadcast::Receiver<tower_stream_guard::EndEvent>,
) {
    use tower::Layer;
    let guard = paused::guard(
        StreamGuardLayer::builder()
            .response_idle_timeout(paused::SECOND)
            .timer_resolution(paused::TICK),
    );
    let events = guard.subscribe();
    let (app, feeders) = paused::App::new();
    let mut service = guard.layer(app.service());
    let response = paused::call(&mut service, paused::request("/watch", 1, false)).await;
    let handle = app.last_handle().expect("the guard inserted a handle");
    (guard, handle, (response, feeders, service), events)
}

/// Sets a flag when dropped, to see when `run_until_cancelled` drops the
/// future it ran.
struct DropFlag(Arc<std::sync::atomic::AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

fn assert_send_static<T: Send + 'static>(value: T) -> T {
    value
}

#[tokio::test(start_paused = true)]
async fn run_until_cancelled_returns_none_when_the_guard_fires() {
    let (guard, handle, _open, mut events) = open_paused().await;
    let started = tokio::time::Instant::now();
    let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = DropFlag(Arc::clone(&dropped));
    // Stands for a producer waiting in `send` on a full channel.
    let stuck = async move {
        let _flag = flag;
        std::future::pending::<()>().await
    };
    let run = assert_send_static(handle.run_until_cancelled(stuck));
    // The future owns what it needs: the handle may go first.
    drop(handle);
    let task = tokio::spawn(async move {
        let output = run.await;
        (output, tokio::time::Instant::now())
    });
    let (output, at) = task.await.expect("the task ran");
    assert_eq!(output, None);
    assert!(
        dropped.load(std::sync::atomic::Ordering::SeqCst),
        "the future was dropped by the time `None` came"
    );
    let event = paused::next_event(&mut events).await;
    assert_eq!(
        event.reason(),
        EndReason::IdleTimeout(IdleDirection::Response)
    );
    // The guard fires at the deadline on the timer's tick; the producer
    // stops on that same instant.
    assert_eq!(at - started, paused::SECOND);
    assert_eq!(guard.active_streams(), 0);
}

#[tokio::test(start_paused = true)]
async fn run_until_cancelled_returns_the_output_when_the_future_finishes_first() {
    let (guard, handle, _open, _events) = open_paused().await;
    let output = handle
        .run_until_cancelled(async {
            tokio::time::sleep(paused::SECOND / 2).await;
            7
        })
        .await;
    assert_eq!(output, Some(7));
    assert!(!handle.is_ended());
    assert_eq!(guard.active_streams(), 1);
    // Many short runs on one stream, each registered and released.
    for n in 0..100 {
        assert_eq!(handle.run_until_cancelled(async { n }).await, Some(n));
    }
    // And one that is still running when the stream ends later.
    let output = handle
        .run_until_cancelled(tokio::time::sleep(paused::SECOND * 10))
        .await;
    assert_eq!(output, None);
    assert_eq!(
        handle.end_reason(),
        Some(EndReason::IdleTimeout(IdleDirection::Response))
    );
}

#[tokio::test(start_paused = true)]
async fn run_until_cancelled_after_the_end_returns_none_without_polling() {
    let (_guard, handle, _open, _events) = open_paused().await;
    assert!(handle.cancel());
    let polled = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let output = handle
        .run_until_cancelled({
            let polled = Arc::clone(&polled);
            async move {
                polled.store(true, std::sync::atomic::Ordering::SeqCst);
                1
            }
        })
        .await;
    assert_eq!(output, None, "the end is checked before the future");
    assert!(!polled.load(std::sync::atomic::Ordering::SeqCst));
    assert_eq!(handle.end_reason(), Some(EndReason::Cancelled));
}

#[tokio::test(start_paused = true)]
async fn run_until_cancelled_stops_at_a_cancel_from_another_task() {
    let (_guard, handle, _open, _events) = open_paused().await;
    let run = tokio::spawn(handle.run_until_cancelled(std::future::pending::<()>()));
    tokio::time::sleep(paused::TICK).await;
    assert!(!run.is_finished());
    let started = tokio::time::Instant::now();
    assert!(handle.cancel());
    assert_eq!(run.await.expect("the task ran"), None);
    assert_eq!(started.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn run_until_cancelled_stops_a_future_woken_many_times() {
    let (_guard, handle, _open, _events) = open_paused().await;
    let started = tokio::time::Instant::now();
    let wakes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let busy = {
        let wakes = Arc::clone(&wakes);
        async move {
            loop {
                tokio::time::sleep(Duration::from_millis(3)).await;
                wakes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    };
    // Polled again at every wake with the same waker: the end must still be
    // seen at once, not at the next wake.
    let output: Option<()> = tokio::spawn(handle.run_until_cancelled(busy))
        .await
        .expect("the task ran");
    assert_eq!(output, None);
    assert_eq!(started.elapsed(), paused::SECOND);
    assert!(wakes.load(std::sync::atomic::Ordering::Relaxed) > 300);
}
