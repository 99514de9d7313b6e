//! The guard in front of a plain hyper 1.x HTTP/2 server (no gRPC), called
//! by a hyper HTTP/2 client over loopback TCP.
//!
//! Guard durations are short; the tests wait for the *end event* through the
//! guard's subscription with a bounded timeout, never by sleeping.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header::CONTENT_LENGTH};
use http_body::{Body as _, Frame};
use http_body_util::{BodyExt, Empty, Full, StreamBody, combinators::BoxBody};
use hyper::{
    body::Incoming, client::conn::http2::SendRequest, server::conn::http2 as server_http2,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{broadcast, mpsc},
    task::JoinHandle,
    time::timeout,
};
use tokio_stream::wrappers::ReceiverStream;
use tower::{Layer, ServiceExt};
use tower_stream_guard::{
    BoxError, ConnectionKey, EndEvent, EndReason, IdleDirection, PeerAddr, StreamGuardLayer,
    StreamHandle, stream::RequestBody,
};

mod support;
use support::{PATIENCE, SLACK, assert_no_more_events, next_event, wait_for_no_tasks, wait_until};

type ResBody = BoxBody<Bytes, BoxError>;

/// What the handlers share with the test.
#[derive(Clone, Default)]
struct App {
    /// `/stream` producer tasks still running.
    producers: Arc<AtomicUsize>,
    /// `/slow` handler futures not yet dropped.
    slow_handlers: Arc<AtomicUsize>,
    /// Why the last `/stream` producer was told its stream ended.
    producer_saw: Arc<Mutex<Option<EndReason>>>,
}

/// Counts itself in a counter while alive.
struct Live(Arc<AtomicUsize>);

impl Live {
    fn enter(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        Live(Arc::clone(counter))
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn full(data: &'static str) -> ResBody {
    Full::new(Bytes::from_static(data.as_bytes()))
        .map_err(|never| match never {})
        .boxed()
}

/// The application behind the guard: a plain `tower::service_fn`.
async fn handle(
    app: App,
    request: Request<RequestBody<Incoming>>,
) -> Result<Response<ResBody>, Infallible> {
    let handle = request.extensions().get::<StreamHandle>().cloned();
    let response = match request.uri().path() {
        // Three chunks, then silence; the sender stays open until the stream
        // ends (the producer waits on the handle, as a real one would).
        "/stream" => {
            let handle = handle.expect("StreamHandle in the request extensions");
            let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
            let live = Live::enter(&app.producers);
            tokio::spawn(async move {
                let _live = live;
                for i in 0..3 {
                    let chunk = Bytes::from(format!("chunk{i}"));
                    if tx.send(Ok(Frame::data(chunk))).await.is_err() {
                        return;
                    }
                }
                let reason = handle.cancelled().await;
                *app.producer_saw.lock().unwrap() = Some(reason);
                drop(tx);
            });
            Response::new(StreamBody::new(ReceiverStream::new(rx)).boxed())
        }
        // Reads the whole request body, answers with a body of known length.
        "/full" => {
            let hint = request.body().size_hint().exact();
            let body = request
                .into_body()
                .collect()
                .await
                .expect("request body")
                .to_bytes();
            Response::builder()
                .header("x-request-hint", format!("{hint:?}"))
                .header("x-request-body", body.len())
                .body(full("hello world"))
                .unwrap()
        }
        "/empty" => Response::new(Empty::new().map_err(|never| match never {}).boxed()),
        // Never answers; counts itself until its future is dropped.
        "/slow" => {
            let _live = Live::enter(&app.slow_handlers);
            std::future::pending::<()>().await;
            unreachable!()
        }
        // Reports what the handle says.
        "/handle" => match handle {
            Some(handle) => Response::builder()
                .header("x-stream-id", handle.id().get())
                .header("x-cancelled", handle.is_ended().to_string())
                .header(
                    "x-remaining-ms",
                    handle
                        .remaining_lifetime()
                        .map_or(u128::MAX, |d| d.as_millis())
                        .to_string(),
                )
                .body(full("ok"))
                .unwrap(),
            None => Response::builder()
                .status(StatusCode::INTERNAL_SERVER_ERROR)
                .body(full("no StreamHandle in the request extensions"))
                .unwrap(),
        },
        _ => Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(full(""))
            .unwrap(),
    };
    Ok(response)
}

/// An HTTP/2-only hyper server on 127.0.0.1:0: the guard wraps the app; each
/// connection's requests carry the peer's address as [`PeerAddr`].
async fn serve(guard: &StreamGuardLayer, app: &App) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let guard = guard.clone();
    let app = app.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, peer)) = listener.accept().await else {
                return;
            };
            let app = app.clone();
            // Built per connection: say which one (the per-connection cap
            // and end events need it).
            let guarded = guard
                .layer(tower::service_fn(move |request| {
                    handle(app.clone(), request)
                }))
                .for_connection(ConnectionKey::from_addrs(addr, peer));
            let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
                request.extensions_mut().insert(PeerAddr(peer));
                guarded.clone().oneshot(request)
            });
            tokio::spawn(
                server_http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), service),
            );
        }
    });
    (addr, task)
}

/// Stops accepting, then waits until every task is gone: connection tasks
/// (they end once the client's connection closes), producers, and the guard's
/// timer task (it exits when it has no streams). Call it after dropping the
/// client.
async fn stop(server: JoinHandle<()>) {
    server.abort();
    wait_for_no_tasks().await;
}

/// An HTTP/2 client connection; also returns its local address.
async fn connect(addr: SocketAddr) -> (SendRequest<Full<Bytes>>, SocketAddr) {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let local = tcp.local_addr().expect("local addr");
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("HTTP/2 handshake");
    tokio::spawn(connection);
    (sender, local)
}

fn request(addr: SocketAddr, method: &str, path: &str, body: &'static str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

async fn send(
    sender: &mut SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> Response<Incoming> {
    timeout(PATIENCE, sender.send_request(req))
        .await
        .expect("response headers in time")
        .expect("request failed")
}

/// Checks a `/full` exchange end to end and returns its event.
async fn full_exchange(
    sender: &mut SendRequest<Full<Bytes>>,
    addr: SocketAddr,
    events: &mut broadcast::Receiver<EndEvent>,
) -> EndEvent {
    let response = send(sender, request(addr, "POST", "/full", "ping")).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()[CONTENT_LENGTH], "11");
    assert_eq!(response.headers()["x-request-hint"], "Some(4)");
    assert_eq!(response.headers()["x-request-body"], "4");
    let body = response.into_body();
    assert_eq!(body.size_hint().exact(), Some(11));
    let data = timeout(PATIENCE, body.collect())
        .await
        .expect("body in time")
        .expect("body ok")
        .to_bytes();
    assert_eq!(&data[..], b"hello world");
    let event = next_event(events).await;
    assert_eq!(event.reason(), EndReason::Completed);
    assert_eq!(event.path(), "/full");
    assert_eq!(event.request().bytes, 4, "{event:?}");
    assert_eq!(event.response().frames, 1, "{event:?}");
    assert_eq!(event.response().bytes, 11, "{event:?}");
    assert_eq!(event.grpc_status(), None);
    event
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_streaming_response_is_reset_by_response_idle_timeout() {
    let idle = Duration::from_millis(300);
    let guard = StreamGuardLayer::builder()
        .response_idle_timeout(idle)
        .build()
        .unwrap();
    let mut events = guard.subscribe();
    let app = App::default();
    let (addr, server) = serve(&guard, &app).await;
    let (mut sender, _) = connect(addr).await;

    let started = Instant::now();
    let wall_before = std::time::SystemTime::now();
    let response = send(&mut sender, request(addr, "GET", "/stream", "")).await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    for i in 0..3 {
        let frame = timeout(PATIENCE, body.frame())
            .await
            .expect("chunk in time")
            .expect("body open")
            .expect("chunk ok");
        assert_eq!(frame.into_data().unwrap(), format!("chunk{i}"));
    }
    let err = match timeout(PATIENCE, body.frame())
        .await
        .expect("the idle guard did not end the body in time")
    {
        Some(Err(err)) => err,
        other => panic!("a cut body must fail, not end cleanly: {other:?}"),
    };
    let elapsed = started.elapsed();
    assert!(elapsed >= idle, "fired early: {elapsed:?}");
    assert!(elapsed < idle + SLACK, "fired late: {elapsed:?}");
    // hyper surfaces the RST_STREAM as an h2 stream error: CANCEL, the
    // reset a guard's end makes (tests/resets.rs), not INTERNAL_ERROR.
    let text = format!("{err:?}");
    assert!(text.contains("CANCEL"), "not a CANCEL reset: {text}");

    let event = next_event(&mut events).await;
    assert_eq!(
        event.reason(),
        EndReason::IdleTimeout(IdleDirection::Response)
    );
    assert_eq!(event.limit(), Some(idle));
    assert_eq!(event.grpc_status(), None);
    assert_eq!(event.response().frames, 3, "{event:?}");
    assert_eq!(event.response().bytes, 18, "{event:?}");
    assert!(event.duration() >= idle, "{event:?}");
    // The start time comes from the guard's clock pair, not a clock read
    // per stream: still the wall-clock time the stream started (the slack:
    // the pair's two readings are not taken at the same instant).
    let slack = Duration::from_millis(1);
    assert!(
        event.started_at() + slack >= wall_before && event.started_at() <= wall_before + SLACK,
        "started at {:?}, request sent at {wall_before:?}",
        event.started_at()
    );
    wait_until("the producer has stopped", || {
        app.producers.load(Ordering::SeqCst) == 0
    })
    .await;
    assert_eq!(
        *app.producer_saw.lock().unwrap(),
        Some(EndReason::IdleTimeout(IdleDirection::Response)),
        "the handle's cancelled() should resolve with the guard's reason"
    );
    assert_eq!(guard.active_streams(), 0);
    assert_no_more_events(&mut events).await;

    // Only the stream was reset: the connection still serves requests.
    full_exchange(&mut sender, addr, &mut events).await;
    assert_eq!(guard.active_streams(), 0);
    assert_no_more_events(&mut events).await;

    drop(body);
    drop(sender);
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_streaming_response_is_cancelled_and_the_handle_resolves() {
    let guard = StreamGuardLayer::builder()
        .max_lifetime(Duration::from_secs(30))
        .build()
        .unwrap();
    let mut events = guard.subscribe();
    let app = App::default();
    let (addr, server) = serve(&guard, &app).await;
    let (mut sender, _) = connect(addr).await;

    let response = send(&mut sender, request(addr, "GET", "/stream", "")).await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    for i in 0..3 {
        let frame = timeout(PATIENCE, body.frame())
            .await
            .expect("chunk in time")
            .expect("body open")
            .expect("chunk ok");
        assert_eq!(frame.into_data().unwrap(), format!("chunk{i}"));
    }
    assert_eq!(guard.active_streams(), 1);
    // The client walks away: hyper resets the stream (CANCEL).
    drop(body);

    let event = next_event(&mut events).await;
    assert_eq!(event.reason(), EndReason::Cancelled);
    assert_eq!(event.limit(), None);
    assert_eq!(event.response().frames, 3, "{event:?}");
    // The producer waits only on its handle (it still holds its sender), so
    // it stops only if the handle hears of the cancellation.
    wait_until("the producer has stopped", || {
        app.producers.load(Ordering::SeqCst) == 0
    })
    .await;
    assert_eq!(
        *app.producer_saw.lock().unwrap(),
        Some(EndReason::Cancelled)
    );
    assert_eq!(guard.active_streams(), 0);
    assert_no_more_events(&mut events).await;

    drop(sender);
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_and_empty_responses_complete_with_length_and_end_of_stream() {
    let guard = StreamGuardLayer::builder()
        .idle_timeout(Duration::from_secs(10))
        .max_lifetime(Duration::from_secs(30))
        .build()
        .unwrap();
    let mut events = guard.subscribe();
    let app = App::default();
    let (addr, server) = serve(&guard, &app).await;
    let (mut sender, local) = connect(addr).await;

    let event = full_exchange(&mut sender, addr, &mut events).await;
    assert_eq!(event.method(), http::Method::POST);
    assert_eq!(event.peer(), Some(local));
    assert_eq!(event.limit(), None);
    assert_no_more_events(&mut events).await;

    // A body that is empty from the start: headers carry END_STREAM.
    let response = send(&mut sender, request(addr, "GET", "/empty", "")).await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    assert!(
        body.is_end_stream(),
        "an empty response should end with its headers"
    );
    let end = timeout(PATIENCE, body.frame()).await.expect("end in time");
    assert!(end.is_none(), "unexpected frame: {end:?}");
    let event = next_event(&mut events).await;
    assert_eq!(event.reason(), EndReason::Completed);
    assert_eq!(event.path(), "/empty");
    assert_eq!(event.response().frames, 0, "{event:?}");
    assert_eq!(guard.active_streams(), 0);
    assert_no_more_events(&mut events).await;

    drop(body);
    drop(sender);
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_slower_than_max_lifetime_gets_504() {
    let lifetime = Duration::from_millis(300);
    let guard = StreamGuardLayer::builder()
        .max_lifetime(lifetime)
        .build()
        .unwrap();
    let mut events = guard.subscribe();
    let app = App::default();
    let (addr, server) = serve(&guard, &app).await;
    let (mut sender, _) = connect(addr).await;

    let started = Instant::now();
    let response = send(&mut sender, request(addr, "GET", "/slow", "")).await;
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    let elapsed = started.elapsed();
    assert!(elapsed >= lifetime, "fired early: {elapsed:?}");
    assert!(elapsed < lifetime + SLACK, "fired late: {elapsed:?}");
    let body = timeout(PATIENCE, response.into_body().collect())
        .await
        .expect("body in time")
        .expect("body ok")
        .to_bytes();
    assert!(body.is_empty());

    let event = next_event(&mut events).await;
    assert_eq!(event.reason(), EndReason::LifetimeExceeded);
    assert_eq!(event.limit(), Some(lifetime));
    assert_eq!(event.grpc_status(), None);
    assert_eq!(event.response().frames, 0, "{event:?}");
    wait_until("the slow handler's future has been dropped", || {
        app.slow_handlers.load(Ordering::SeqCst) == 0
    })
    .await;
    assert_eq!(guard.active_streams(), 0);
    assert_no_more_events(&mut events).await;

    drop(sender);
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_finds_the_stream_handle_in_request_extensions() {
    let lifetime = Duration::from_secs(30);
    let guard = StreamGuardLayer::builder()
        .max_lifetime(lifetime)
        .build()
        .unwrap();
    let mut events = guard.subscribe();
    let app = App::default();
    let (addr, server) = serve(&guard, &app).await;
    let (mut sender, local) = connect(addr).await;

    let response = send(&mut sender, request(addr, "GET", "/handle", "")).await;
    assert_eq!(response.status(), StatusCode::OK, "{response:?}");
    let id: u64 = response.headers()["x-stream-id"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(response.headers()["x-cancelled"], "false");
    let remaining: u128 = response.headers()["x-remaining-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        remaining <= lifetime.as_millis() && remaining > lifetime.as_millis() - 5_000,
        "remaining lifetime {remaining} ms"
    );
    let body = timeout(PATIENCE, response.into_body().collect())
        .await
        .expect("body in time")
        .expect("body ok")
        .to_bytes();
    assert_eq!(&body[..], b"ok");

    let event = next_event(&mut events).await;
    assert_eq!(
        event.id().get(),
        id,
        "the handle and the event name the same stream"
    );
    assert_eq!(event.reason(), EndReason::Completed);
    assert_eq!(event.path(), "/handle");
    assert_eq!(event.peer(), Some(local));
    assert_eq!(guard.active_streams(), 0);
    assert_no_more_events(&mut events).await;

    drop(sender);
    stop(server).await;
}
