//! What the peer reads is what the end event says, over real hyper servers on
//! loopback: a handler whose answer races the stream's end (it cancels, or
//! computes past `max_lifetime`, and then answers with nothing to follow),
//! a response body whose last frame races it, and HTTP/1.1 downloads of a
//! declared length, which hyper stops polling after the last declared byte.
//!
//! The races are made deterministic: the end happens *during* the poll that
//! produces the answer or the last frame, either because that poll cancels
//! the stream itself, or because it computes (on a multi-thread runtime)
//! until the guard's timer has fired: no test guesses a duration.

use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, Request, Response, StatusCode, header::CONTENT_LENGTH};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Empty, StreamBody, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{broadcast, mpsc},
    task::JoinHandle,
    time::timeout,
};
use tokio_stream::wrappers::ReceiverStream;
use tower::{Layer, ServiceExt};
use tower_stream_guard::{
    BoxError, EndEvent, EndReason, StreamGuardLayer, StreamHandle, stream::RequestBody,
};

#[allow(dead_code)]
mod support;
use support::{PATIENCE, assert_no_more_events, next_event, wait_until};

type ResBody = BoxBody<Bytes, BoxError>;

/// Makes the handler's answer, synchronously, in the poll that returns it.
type Answer = Arc<dyn Fn(StreamHandle) -> Response<ResBody> + Send + Sync>;

async fn handle(
    answer: Answer,
    request: Request<RequestBody<Incoming>>,
) -> Result<Response<ResBody>, Infallible> {
    let handle = request
        .extensions()
        .get::<StreamHandle>()
        .cloned()
        .expect("the handle in the request extensions");
    // Lets the guard's timer task, just spawned into this worker's LIFO
    // slot (which no other worker steals from), start before `answer` may
    // keep the worker busy.
    tokio::task::yield_now().await;
    Ok(answer(handle))
}

/// A hyper server (HTTP/1 and HTTP/2) on 127.0.0.1:0: the guard wraps a
/// handler that answers with `answer` in its first poll.
async fn serve(guard: &StreamGuardLayer, answer: Answer) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let guarded = guard.layer(tower::service_fn(move |request| {
        handle(Arc::clone(&answer), request)
    }));
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let guarded = guarded.clone();
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                guarded.clone().oneshot(request)
            });
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    (addr, task)
}

/// One HTTP/2 request; the response head.
async fn h2_request(addr: SocketAddr, grpc: bool) -> Response<Incoming> {
    h2_try(addr, grpc).await.expect("request failed")
}

/// One HTTP/2 request; the response head, or the error that came instead
/// (a reset that overtook the queued head).
async fn h2_try(addr: SocketAddr, grpc: bool) -> Result<Response<Incoming>, hyper::Error> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("HTTP/2 handshake");
    tokio::spawn(connection);
    let mut request = Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/call"));
    if grpc {
        request = request.header("content-type", "application/grpc");
    }
    let request = request.body(Empty::<Bytes>::new()).unwrap();
    timeout(PATIENCE, sender.send_request(request))
        .await
        .expect("response headers in time")
}

/// What a gRPC peer reads: the `grpc-status` of a trailers-only head, or of
/// the body's trailers (`None` when the body ended without any).
async fn grpc_status_read(response: Response<Incoming>) -> Option<String> {
    let text = |headers: &HeaderMap| {
        headers
            .get("grpc-status")
            .map(|v| v.to_str().unwrap().to_owned())
    };
    if let Some(status) = text(response.headers()) {
        return Some(status);
    }
    let collected = timeout(PATIENCE, response.into_body().collect())
        .await
        .expect("body in time")
        .expect("a gRPC body ends with trailers, not an error");
    collected.trailers().and_then(text)
}

fn empty() -> ResBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// A trailers-only gRPC answer with `grpc-status: 0`.
fn grpc_ok() -> Response<ResBody> {
    Response::builder()
        .header("content-type", "application/grpc")
        .header("grpc-status", "0")
        .body(empty())
        .unwrap()
}

/// Spins, as a handler doing CPU work would, until the guard has ended the
/// stream (bounded by [`PATIENCE`]).
fn compute_until_ended(handle: &StreamHandle) {
    let start = Instant::now();
    while !handle.is_ended() {
        assert!(start.elapsed() < PATIENCE, "the guard never fired");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn quiet_guard(max_lifetime: Duration) -> (StreamGuardLayer, broadcast::Receiver<EndEvent>) {
    let guard = StreamGuardLayer::builder()
        .max_lifetime(max_lifetime)
        .build()
        .unwrap();
    let events = guard.subscribe();
    (guard, events)
}

// === the handler's answer against an end ===

#[tokio::test]
async fn a_handler_that_cancels_then_answers_an_empty_200_is_answered_with_the_guards_504() {
    let (guard, mut events) = quiet_guard(Duration::from_secs(3600));
    let answer: Answer = Arc::new(|handle| {
        assert!(handle.cancel());
        Response::new(empty())
    });
    let (addr, server) = serve(&guard, answer).await;

    let response = h2_request(addr, false).await;
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(response.headers()["stream-guard-reason"], "cancelled");
    let event = next_event(&mut events).await;
    assert_eq!(event.reason(), EndReason::Cancelled);
    assert_no_more_events(&mut events).await;
    server.abort();
}

#[tokio::test]
async fn a_handler_that_cancels_then_answers_grpc_ok_is_answered_with_cancelled() {
    let (guard, mut events) = quiet_guard(Duration::from_secs(3600));
    let answer: Answer = Arc::new(|handle| {
        assert!(handle.cancel());
        grpc_ok()
    });
    let (addr, server) = serve(&guard, answer).await;

    let response = h2_request(addr, true).await;
    assert_eq!(grpc_status_read(response).await.as_deref(), Some("1"));
    let event = next_event(&mut events).await;
    assert_eq!(event.reason(), EndReason::Cancelled);
    assert_eq!(event.grpc_status(), Some(1));
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_computing_past_max_lifetime_is_answered_with_the_guards_status() {
    let (guard, mut events) = quiet_guard(Duration::from_millis(30));
    for grpc in [false, true] {
        let answer: Answer = Arc::new(move |handle| {
            compute_until_ended(&handle);
            if grpc {
                grpc_ok()
            } else {
                Response::new(empty())
            }
        });
        let (addr, server) = serve(&guard, answer).await;
        let response = h2_request(addr, grpc).await;
        if grpc {
            assert_eq!(grpc_status_read(response).await.as_deref(), Some("4"));
        } else {
            assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
            assert_eq!(
                response.headers()["stream-guard-reason"],
                "lifetime_exceeded"
            );
        }
        let event = next_event(&mut events).await;
        assert_eq!(event.reason(), EndReason::LifetimeExceeded, "grpc: {grpc}");
        assert_eq!(event.grpc_status(), grpc.then_some(4));
        server.abort();
    }
}

// === the body's last frame against an end ===

/// A body of known chunks that reports its end after the last one (as
/// `Full` does); `before_last` runs in the poll that produces the last.
struct LastFrame {
    chunks: Vec<Bytes>,
    before_last: Box<dyn FnMut() + Send + Sync>,
}

impl Body for LastFrame {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.chunks.len() == 1 {
            (this.before_last)();
        }
        if this.chunks.is_empty() {
            return Poll::Ready(None);
        }
        Poll::Ready(Some(Ok(Frame::data(this.chunks.remove(0)))))
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty()
    }
}

/// A gRPC message frame around `payload`.
fn grpc_message(payload: &[u8]) -> Bytes {
    let mut frame = BytesMut::new();
    frame.put_u8(0);
    frame.put_u32(payload.len() as u32);
    frame.put_slice(payload);
    frame.freeze()
}

fn last_frame_answer(grpc: bool, before_last: fn(&StreamHandle)) -> Answer {
    Arc::new(move |handle| {
        let body = LastFrame {
            chunks: vec![grpc_message(b"first"), grpc_message(b"last")],
            before_last: Box::new(move || before_last(&handle)),
        };
        let mut response = Response::new(body.map_err(|never| match never {}).boxed());
        if grpc {
            response
                .headers_mut()
                .insert("content-type", "application/grpc".parse().unwrap());
        }
        response
    })
}

/// Reads a plain-HTTP answer: `Ok` with the body it held if it ended
/// normally. A reset can overtake the head hyper had queued: the peer then
/// reads no head at all.
async fn read_plain(addr: SocketAddr) -> Result<Bytes, hyper::Error> {
    let response = h2_try(addr, false).await?;
    assert_eq!(response.status(), StatusCode::OK);
    timeout(PATIENCE, response.into_body().collect())
        .await
        .expect("body in time")
        .map(|collected| collected.to_bytes())
}

#[tokio::test]
async fn a_last_frame_whose_production_cancels_the_stream_gives_way_to_the_guards_ending() {
    let (guard, mut events) = quiet_guard(Duration::from_secs(3600));
    let cancel = |handle: &StreamHandle| assert!(handle.cancel());

    let (addr, server) = serve(&guard, last_frame_answer(false, cancel)).await;
    let read = read_plain(addr).await;
    assert!(read.is_err(), "the peer read a complete body: {read:?}");
    assert_eq!(next_event(&mut events).await.reason(), EndReason::Cancelled);
    server.abort();

    let (addr, server) = serve(&guard, last_frame_answer(true, cancel)).await;
    let response = h2_request(addr, true).await;
    assert_eq!(grpc_status_read(response).await.as_deref(), Some("1"));
    let event = next_event(&mut events).await;
    assert_eq!(event.reason(), EndReason::Cancelled);
    assert_eq!(event.grpc_status(), Some(1));
    assert_no_more_events(&mut events).await;
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_last_frame_produced_past_max_lifetime_gives_way_to_deadline_exceeded() {
    let (guard, mut events) = quiet_guard(Duration::from_millis(30));
    for grpc in [false, true] {
        let (addr, server) = serve(&guard, last_frame_answer(grpc, compute_until_ended)).await;
        if grpc {
            let response = h2_request(addr, grpc).await;
            assert_eq!(grpc_status_read(response).await.as_deref(), Some("4"));
        } else {
            let read = read_plain(addr).await;
            assert!(read.is_err(), "the peer read a complete body: {read:?}");
        }
        let event = next_event(&mut events).await;
        assert_eq!(event.reason(), EndReason::LifetimeExceeded, "grpc: {grpc}");
        server.abort();
    }
}

/// The control: the last frame produced in time completes the stream.
#[tokio::test]
async fn a_last_frame_produced_in_time_completes() {
    let (guard, mut events) = quiet_guard(Duration::from_secs(3600));
    let (addr, server) = serve(&guard, last_frame_answer(false, |_| {})).await;
    let read = read_plain(addr).await.expect("a complete body");
    assert_eq!(read.len(), 2 * (5 + 4) + 1);
    assert_eq!(next_event(&mut events).await.reason(), EndReason::Completed);
    server.abort();
}

// === HTTP/1.1 downloads of a declared length ===

const CHUNK: usize = 16 * 1024;
const CHUNKS: usize = 8;

/// A streaming body of `CHUNKS` chunks behind a channel the handler feeds;
/// `feed` sends them (all, or the first only and then holds the sender).
fn download(length: Option<u64>, all: bool) -> Answer {
    Arc::new(move |_| {
        let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, BoxError>>(CHUNKS);
        let count = if all { CHUNKS } else { 1 };
        for _ in 0..count {
            tx.try_send(Ok(Frame::data(Bytes::from(vec![b'x'; CHUNK]))))
                .expect("room for every chunk");
        }
        if !all {
            // The rest never comes: the sender lives as long as the body.
            std::mem::forget(tx);
        }
        let body = StreamBody::new(ReceiverStream::new(rx)).boxed();
        let mut response = Response::new(body);
        if let Some(length) = length {
            response.headers_mut().insert(CONTENT_LENGTH, length.into());
        }
        response
    })
}

/// A plain HTTP/1.1 GET over a raw socket, read to the declared length;
/// returns the body's length as read, and keeps the socket open.
async fn http1_download(addr: SocketAddr, stop_after: Option<usize>) -> (usize, TcpStream) {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(b"GET /download HTTP/1.1\r\nhost: test\r\n\r\n")
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = vec![0; 64 * 1024];
    let (head_end, length) = loop {
        let n = timeout(PATIENCE, tcp.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "the server closed before the head");
        seen.extend_from_slice(&buf[..n]);
        if let Some(at) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&seen[..at]).to_lowercase();
            assert!(head.starts_with("http/1.1 200"), "{head}");
            let length = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length: "))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .expect("a content-length");
            break (at + 4, length);
        }
    };
    let want = stop_after.unwrap_or(length);
    let mut read = seen.len() - head_end;
    while read < want {
        let n = timeout(PATIENCE, tcp.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "the server closed after {read} of {length} bytes");
        read += n;
    }
    (read, tcp)
}

#[tokio::test]
async fn an_http1_download_with_a_content_length_completes() {
    let (guard, mut events) = quiet_guard(Duration::from_secs(3600));
    let total = (CHUNK * CHUNKS) as u64;
    let (addr, server) = serve(&guard, download(Some(total), true)).await;
    let (read, tcp) = http1_download(addr, None).await;
    assert_eq!(read as u64, total);
    let event = next_event(&mut events).await;
    assert_eq!(event.reason(), EndReason::Completed, "{event:?}");
    assert_eq!(event.response().bytes, total);
    drop(tcp);
    assert_no_more_events(&mut events).await;
    server.abort();
}

/// The body's exact size hint declares the length (hyper writes it as the
/// `content-length`), as tower-http's `ServeFile` does.
#[tokio::test]
async fn an_http1_download_of_an_exact_size_hint_completes() {
    struct Sized(ResBody, u64);
    impl Body for Sized {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Pin::new(&mut self.0).poll_frame(cx)
        }
        fn size_hint(&self) -> SizeHint {
            SizeHint::with_exact(self.1)
        }
    }
    let (guard, mut events) = quiet_guard(Duration::from_secs(3600));
    let total = (CHUNK * CHUNKS) as u64;
    let inner = download(None, true);
    let answer: Answer =
        Arc::new(move |handle| inner(handle).map(|body| Sized(body, total).boxed()));
    let (addr, server) = serve(&guard, answer).await;
    let (read, tcp) = http1_download(addr, None).await;
    assert_eq!(read as u64, total);
    assert_eq!(next_event(&mut events).await.reason(), EndReason::Completed);
    drop(tcp);
    server.abort();
}

/// The control: a client that leaves mid-download cancelled its stream.
#[tokio::test]
async fn an_http1_download_left_midway_is_cancelled() {
    let (guard, mut events) = quiet_guard(Duration::from_secs(3600));
    let total = (CHUNK * CHUNKS) as u64;
    let (addr, server) = serve(&guard, download(Some(total), false)).await;
    let (read, tcp) = http1_download(addr, Some(CHUNK)).await;
    assert!((read as u64) < total);
    drop(tcp);
    let event = next_event(&mut events).await;
    assert_eq!(event.reason(), EndReason::Cancelled, "{event:?}");
    server.abort();
}

/// The common axum shape: `Body::from_stream` with a `CONTENT_LENGTH`.
#[tokio::test]
async fn an_axum_download_with_a_content_length_completes() {
    let (guard, mut events) = quiet_guard(Duration::from_secs(3600));
    let total = CHUNK * CHUNKS;
    let app = axum::Router::new()
        .route(
            "/download",
            axum::routing::get(move || async move {
                let chunks =
                    (0..CHUNKS).map(|_| Ok::<_, Infallible>(Bytes::from(vec![b'x'; CHUNK])));
                (
                    [(CONTENT_LENGTH, total.to_string())],
                    axum::body::Body::from_stream(futures_util::stream::iter(chunks)),
                )
            }),
        )
        .layer(guard.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let (read, tcp) = http1_download(addr, None).await;
    assert_eq!(read, total);
    let event = next_event(&mut events).await;
    assert_eq!(event.reason(), EndReason::Completed, "{event:?}");
    drop(tcp);
    wait_until("no stream active", || guard.stats().active() == 0).await;
    server.abort();
}

/// A body whose length is declared (here its exact size hint) and that ends
/// with trailers: over HTTP/2 the trailers follow the last declared byte,
/// so that byte must not close the body. The peer reads the data and the
/// trailers; the event says `completed`.
#[tokio::test]
async fn trailers_after_the_last_declared_byte_still_go_out() {
    let guard = StreamGuardLayer::builder()
        .idle_timeout(Duration::from_secs(3600))
        .build()
        .unwrap();
    let mut events = guard.subscribe();
    let service = guard.layer(tower::service_fn(
        |_request: Request<tower_stream_guard::stream::RequestBody<Empty<Bytes>>>| async {
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", "0".parse().unwrap());
            let body = http_body_util::Full::new(Bytes::from_static(b"abc"))
                .with_trailers(async move { Some(Ok::<_, std::convert::Infallible>(trailers)) });
            Ok::<_, std::convert::Infallible>(Response::new(body))
        },
    ));
    let response = service
        .oneshot(Request::new(Empty::<Bytes>::new()))
        .await
        .unwrap();
    assert_eq!(response.body().size_hint().exact(), Some(3));
    let collected = timeout(PATIENCE, response.into_body().collect())
        .await
        .expect("the body ends")
        .expect("no error");
    let trailers = collected
        .trailers()
        .cloned()
        .expect("the trailers went out");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(collected.to_bytes(), Bytes::from_static(b"abc"));
    assert_eq!(next_event(&mut events).await.reason(), EndReason::Completed);
}
