//! Answers whose head says that no body follows, whatever the body says:
//! `204 No Content`, `304 Not Modified`, an interim `1xx` answered as if it
//! were final, and the answer to a `HEAD` request. hyper's HTTP/1 writer
//! sends such a head alone and drops the body unpolled, as it does after the
//! last byte of a declared length; its HTTP/2 server polls the body it is
//! given. Over real hyper servers and clients on loopback, both versions:
//! the stream completes at the head, the peer reads no body, and a body that
//! would never end is let go of.

use std::{convert::Infallible, net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header::CONTENT_LENGTH};
use http_body_util::{BodyExt, Empty, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
    task::JoinHandle,
    time::timeout,
};
use tokio_stream::wrappers::ReceiverStream;
use tower::{Layer, ServiceExt};
use tower_stream_guard::{BoxError, EndReason, StreamGuardLayer, stream::RequestBody};

#[allow(dead_code)]
mod support;
use support::{PATIENCE, assert_no_more_events, next_event, wait_until};

type ResBody = BoxBody<Bytes, BoxError>;

/// The answer's status is the request's path (`/204`), its body `/full`'s
/// five bytes or, for `/endless`, a stream that never ends.
async fn handle(request: Request<RequestBody<Incoming>>) -> Result<Response<ResBody>, Infallible> {
    let mut parts = request.uri().path().trim_start_matches('/').split('/');
    let status = parts
        .next()
        .and_then(|code| code.parse::<u16>().ok())
        .and_then(|code| StatusCode::from_u16(code).ok())
        .unwrap_or(StatusCode::OK);
    let body = match parts.next() {
        Some("endless") => {
            let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
            tx.try_send(Ok(Frame::data(Bytes::from_static(b"first"))))
                .expect("room for one");
            // Never closed: the body would never end on its own.
            std::mem::forget(tx);
            StreamBody::new(ReceiverStream::new(rx)).boxed()
        }
        _ => Full::new(Bytes::from_static(b"hello"))
            .map_err(|never| match never {})
            .boxed(),
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    Ok(response)
}

/// A hyper server (HTTP/1 and HTTP/2) on 127.0.0.1:0 behind `guard`.
async fn serve(guard: &StreamGuardLayer) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let guarded = guard.layer(tower::service_fn(handle));
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
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

/// What a peer read: the status, the `content-length` if any, the body.
#[derive(Debug)]
struct Read {
    status: StatusCode,
    length: Option<String>,
    body: Bytes,
}

/// One request over a connection of its own, HTTP/2 if `h2`.
async fn request(addr: SocketAddr, h2: bool, method: &str, path: &str) -> Read {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let request = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = if h2 {
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .expect("HTTP/2 handshake");
        tokio::spawn(connection);
        timeout(PATIENCE, sender.send_request(request)).await
    } else {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .expect("HTTP/1 handshake");
        tokio::spawn(connection);
        timeout(PATIENCE, sender.send_request(request)).await
    };
    let response = response.expect("an answer in time").expect("an answer");
    let status = response.status();
    let length = response
        .headers()
        .get(CONTENT_LENGTH)
        .map(|v| v.to_str().unwrap().to_owned());
    let body = timeout(PATIENCE, response.into_body().collect())
        .await
        .expect("the body ends in time")
        .expect("the body ends without an error")
        .to_bytes();
    Read {
        status,
        length,
        body,
    }
}

fn guard() -> StreamGuardLayer {
    StreamGuardLayer::builder()
        .idle_timeout(Duration::from_secs(3600))
        .build()
        .unwrap()
}

/// The defect: over HTTP/1.1 a `204` or `304` whose body was not empty up
/// front ended `cancelled` (hyper dropped the body unpolled).
#[tokio::test]
async fn http1_no_content_and_not_modified_with_a_body_complete() {
    let guard = guard();
    let mut events = guard.subscribe();
    let (addr, server) = serve(&guard).await;
    for path in ["/204/full", "/304/full", "/204/endless", "/304/endless"] {
        let read = request(addr, false, "GET", path).await;
        assert_eq!(read.status.as_str(), &path[1..4], "{path}");
        assert!(read.body.is_empty(), "{path}: {read:?}");
        let event = next_event(&mut events).await;
        assert_eq!(event.reason(), EndReason::Completed, "{path}: {event:?}");
        assert_eq!(event.response().bytes, 0, "{path}");
    }
    wait_until("no stream active", || guard.active_streams() == 0).await;
    assert_no_more_events(&mut events).await;
    server.abort();
}

/// The same answers over HTTP/2, where hyper polls the body it is given: the
/// head goes out alone (no `content-length` from the body's size hint, no
/// body) and a body that would never end does not keep the stream open.
#[tokio::test]
async fn http2_no_content_and_not_modified_with_a_body_complete_at_the_head() {
    let guard = guard();
    let mut events = guard.subscribe();
    let (addr, server) = serve(&guard).await;
    for path in ["/204/full", "/304/full", "/204/endless", "/304/endless"] {
        let read = request(addr, true, "GET", path).await;
        assert_eq!(read.status.as_str(), &path[1..4], "{path}");
        assert!(read.body.is_empty(), "{path}: {read:?}");
        assert_eq!(read.length, None, "{path}");
        let event = next_event(&mut events).await;
        assert_eq!(event.reason(), EndReason::Completed, "{path}: {event:?}");
    }
    wait_until("no stream active", || guard.active_streams() == 0).await;
    assert_no_more_events(&mut events).await;
    server.abort();
}

/// An interim status answered as the final one (`103 Early Hints` from a
/// service that meant to send more): no body belongs to it, and hyper
/// refuses it (HTTP/1 sends `500` instead, the HTTP/2 peer resets the
/// stream). The stream ends at the head as an error, not `cancelled`.
#[tokio::test]
async fn an_interim_status_as_the_answer_ends_as_an_error_at_the_head() {
    let guard = guard();
    let mut events = guard.subscribe();
    let (addr, server) = serve(&guard).await;
    for h2 in [false, true] {
        let read = timeout(PATIENCE, try_request(addr, h2, "/103/endless"))
            .await
            .expect("an answer or an error in time");
        if h2 {
            let error = read.expect_err("the peer resets an interim status with END_STREAM");
            assert!(error.contains("PROTOCOL_ERROR"), "{error}");
        } else {
            assert_eq!(read.expect("hyper's answer").status, 500);
        }
        let event = next_event(&mut events).await;
        assert_eq!(event.reason(), EndReason::Error, "h2 {h2}: {event:?}");
    }
    wait_until("no stream active", || guard.active_streams() == 0).await;
    server.abort();
}

/// [`request`], but reporting a failed exchange instead of panicking.
async fn try_request(addr: SocketAddr, h2: bool, path: &str) -> Result<Read, String> {
    let path = path.to_owned();
    tokio::spawn(async move { request(addr, h2, "GET", &path).await })
        .await
        .map_err(|err| err.to_string())
}

/// The controls: a `HEAD` request's answer keeps the length its `GET` would
/// have (hyper sends the body's size hint), and completes; a `200` with a
/// body sends it.
#[tokio::test]
async fn head_answers_and_plain_bodies_are_unchanged() {
    let guard = guard();
    let mut events = guard.subscribe();
    let (addr, server) = serve(&guard).await;
    for h2 in [false, true] {
        let read = request(addr, h2, "HEAD", "/200/full").await;
        assert_eq!(read.status, StatusCode::OK);
        assert_eq!(read.length.as_deref(), Some("5"), "h2 {h2}");
        assert!(read.body.is_empty());
        assert_eq!(next_event(&mut events).await.reason(), EndReason::Completed);

        let read = request(addr, h2, "GET", "/200/full").await;
        assert_eq!(read.body, Bytes::from_static(b"hello"), "h2 {h2}");
        let event = next_event(&mut events).await;
        assert_eq!(event.reason(), EndReason::Completed);
        assert_eq!(event.response().bytes, 5);
    }
    assert_no_more_events(&mut events).await;
    server.abort();
}
