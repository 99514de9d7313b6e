//! Situations production meets that the guard's own code paths do not
//! suggest, over real hyper servers on loopback: a handler that panics under
//! a stream cap, a response body that panics mid-stream, and HTTP/1 `HEAD`
//! requests (hyper drops their response body unread).

use std::{convert::Infallible, net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
    task::JoinHandle,
    time::timeout,
};
use tower::{Layer, ServiceExt};
use tower_stream_guard::{
    BoxError, EndReason, PeerAddr, StreamGuardLayer, StreamHandle, stream::RequestBody,
};

#[allow(dead_code)]
mod support;
use support::{PATIENCE, next_event, wait_until};

type ResBody = BoxBody<Bytes, BoxError>;

/// The handler: `/panic` spawns a producer on the handle, then panics before
/// answering; `/body-panic` streams one frame and then panics in its body;
/// anything else answers "ok". Producers report what they were told.
async fn handle(
    told: mpsc::UnboundedSender<EndReason>,
    request: Request<RequestBody<Incoming>>,
) -> Result<Response<ResBody>, Infallible> {
    let handle = request.extensions().get::<StreamHandle>().cloned();
    if let Some(handle) = handle.filter(|_| request.uri().path() != "/ok") {
        tokio::spawn(async move {
            let _ = told.send(handle.cancelled().await);
        });
    }
    match request.uri().path() {
        "/panic" => panic!("handler panics before answering"),
        "/body-panic" => {
            let frames = futures_util::stream::iter(0..2).map(|i| {
                if i == 1 {
                    panic!("response body panics mid-stream");
                }
                Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"first")))
            });
            Ok(Response::new(BodyExt::boxed(StreamBody::new(frames))))
        }
        _ => Ok(Response::new(
            Full::new(Bytes::from_static(b"ok"))
                .map_err(|never| match never {})
                .boxed(),
        )),
    }
}

use futures_util::StreamExt as _;

/// A hyper server (HTTP/1 and HTTP/2) on 127.0.0.1:0 behind `guard`.
async fn serve(
    guard: &StreamGuardLayer,
    told: mpsc::UnboundedSender<EndReason>,
) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let guarded = guard.layer(tower::service_fn(move |request| {
        handle(told.clone(), request)
    }));
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, peer)) = listener.accept().await else {
                return;
            };
            let guarded = guarded.clone();
            let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
                request.extensions_mut().insert(PeerAddr(peer));
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

async fn http1(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("HTTP/1 handshake");
    tokio::spawn(connection);
    sender
}

fn get(addr: SocketAddr, method: &str, path: &str) -> Request<Empty<Bytes>> {
    Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .body(Empty::new())
        .unwrap()
}

/// The reported leak: `max_streams(1)`, a handler that spawns a producer on
/// `cancelled()` and panics. The stream must end (one `panicked` event, the
/// producer told) and give its slot back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_under_a_cap_ends_its_stream_and_the_next_one_is_admitted() {
    let guard = StreamGuardLayer::builder().max_streams(1).build().unwrap();
    let mut events = guard.subscribe();
    let (told, mut producers) = mpsc::unbounded_channel();
    let (addr, server) = serve(&guard, told).await;

    for path in ["/panic", "/body-panic"] {
        let mut client = http1(addr).await;
        // The panic resets the stream (HTTP/1: closes the connection); what
        // the client sees is hyper's business, the guard's is the end.
        let response = timeout(PATIENCE, client.send_request(get(addr, "GET", path)))
            .await
            .expect("an answer or a closed connection in time");
        if let Ok(response) = response {
            let _ = timeout(PATIENCE, response.into_body().collect()).await;
        }
        let event = next_event(&mut events).await;
        assert_eq!(event.reason(), EndReason::Panicked, "{path}");
        assert_eq!(
            timeout(PATIENCE, producers.recv()).await.unwrap(),
            Some(EndReason::Panicked),
            "{path}: the producer on cancelled() is told"
        );
        wait_until("no stream active", || guard.stats().active() == 0).await;

        // The only slot is back.
        let mut client = http1(addr).await;
        let response = timeout(PATIENCE, client.send_request(get(addr, "GET", "/ok")))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        let _ = response.into_body().collect().await;
        assert_eq!(next_event(&mut events).await.reason(), EndReason::Completed);
    }
    assert_eq!(guard.stats().ended(EndReason::Panicked), 2);
    server.abort();
}

/// hyper drops the body of a `HEAD` response unpolled: the stream completed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_head_request_completes() {
    let guard = StreamGuardLayer::builder()
        .idle_timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let mut events = guard.subscribe();
    let (told, _producers) = mpsc::unbounded_channel();
    let (addr, server) = serve(&guard, told).await;
    let mut client = http1(addr).await;
    let mut lengths = Vec::new();
    for method in ["GET", "HEAD"] {
        // HTTP/1 carries one request at a time: wait until the last is done.
        timeout(PATIENCE, client.ready()).await.unwrap().unwrap();
        let response = timeout(PATIENCE, client.send_request(get(addr, method, "/ok")))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        lengths.push(
            response
                .headers()
                .get(http::header::CONTENT_LENGTH)
                .cloned(),
        );
        let _ = response.into_body().collect().await;
        let event = next_event(&mut events).await;
        assert_eq!(event.reason(), EndReason::Completed, "{event:?}");
        assert_eq!(event.method().as_str(), method);
    }
    // A HEAD answer carries the length the GET would have.
    assert_eq!(lengths[0].as_ref().map(|v| v.as_bytes()), Some(&b"2"[..]));
    assert_eq!(lengths[0], lengths[1], "content-length of GET and HEAD");
    server.abort();
}
