//! The HTTP/2 reset a guard's end makes is `RST_STREAM(CANCEL)`, the form
//! gRPC gives a cancel or a deadline (tonic reads it as `Cancelled`), never
//! hyper's default `INTERNAL_ERROR` (read as `Internal "h2 protocol
//! error"`): a client guard ending its request body, and a server guard
//! ending a plain-HTTP response body. Real hyper peers over loopback.

#![cfg(feature = "hyper")]

use std::{convert::Infallible, error::Error, time::Duration};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, Empty, StreamBody, combinators::BoxBody};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::oneshot,
    time::timeout,
};
use tokio_stream::{StreamExt, wrappers::IntervalStream};
use tower::{Layer, Service};
use tower_stream_guard::{BoxError, EndReason, StreamGuardLayer, stream::RequestBody};

#[allow(dead_code)]
mod support;
use support::{PATIENCE, next_event};

type Body = BoxBody<Bytes, BoxError>;

/// An endless body: a chunk every 20 ms.
fn ticking() -> Body {
    let ticks = IntervalStream::new(tokio::time::interval(Duration::from_millis(20)))
        .map(|_| Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"tick"))));
    StreamBody::new(ticks).boxed()
}

/// The h2 reset reason in an error's source chain.
fn reset_reason(error: &(dyn Error + 'static)) -> Option<h2::Reason> {
    let mut next = Some(error);
    while let Some(error) = next {
        if let Some(h2) = error.downcast_ref::<h2::Error>() {
            return h2.reason();
        }
        next = error.source();
    }
    None
}

/// A client guard whose lifetime ends a bidi call (answered, its upload
/// still being sent): the server reads the reset as CANCEL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_guard_resets_its_upload_with_cancel() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().unwrap();
    let (seen_tx, seen) = oneshot::channel::<Option<h2::Reason>>();
    tokio::spawn(async move {
        let (io, _) = listener.accept().await.unwrap();
        let seen_tx = std::sync::Mutex::new(Some(seen_tx));
        let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
            let seen_tx = seen_tx.lock().unwrap().take();
            // A bidi call: the answer goes out at once, the upload is read
            // on.
            tokio::spawn(async move {
                let mut body = request.into_body();
                let reason = loop {
                    match body.frame().await {
                        Some(Ok(_)) => {}
                        Some(Err(error)) => break reset_reason(&error),
                        None => break None,
                    }
                };
                if let Some(seen_tx) = seen_tx {
                    let _ = seen_tx.send(reason);
                }
            });
            async { Ok::<_, Infallible>(Response::new(ticking())) }
        });
        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(io), service)
            .await;
    });

    let io = TcpStream::connect(addr).await.unwrap();
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .unwrap();
    tokio::spawn(connection);
    let guard = StreamGuardLayer::builder()
        .max_lifetime(Duration::from_millis(300))
        .build()
        .unwrap();
    let mut events = guard.subscribe();
    let mut client = guard.layer(tower::service_fn(
        move |request: Request<RequestBody<Body>>| {
            let mut sender = sender.clone();
            async move { sender.send_request(request).await }
        },
    ));
    tower::ServiceExt::ready(&mut client).await.unwrap();
    let response = client
        .call(Request::post("http://test/bidi").body(ticking()).unwrap())
        .await
        .expect("the answer");
    // Held, not read: the upload is what the guard ends.
    assert_eq!(
        next_event(&mut events).await.reason(),
        EndReason::LifetimeExceeded
    );
    let reason = timeout(PATIENCE, seen)
        .await
        .expect("the server saw the upload end")
        .expect("reported");
    assert_eq!(reason, Some(h2::Reason::CANCEL));
    drop(response);
}

/// A server guard ending a plain-HTTP response body: the client reads the
/// reset as CANCEL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_guard_resets_a_plain_response_with_cancel() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().unwrap();
    let guard = StreamGuardLayer::builder()
        .max_lifetime(Duration::from_millis(300))
        .build()
        .unwrap();
    let mut events = guard.subscribe();
    let service = guard.layer(tower::service_fn(
        |_request: Request<RequestBody<hyper::body::Incoming>>| async {
            Ok::<_, Infallible>(Response::new(ticking()))
        },
    ));
    let connections = tower_stream_guard::ConnectionGuard::builder()
        .build()
        .unwrap();
    tokio::spawn(async move {
        let (io, _) = listener.accept().await.unwrap();
        let _ = connections.serve_connection(io, service).await;
    });

    let io = TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .unwrap();
    tokio::spawn(connection);
    let response = sender
        .send_request(
            Request::get("http://test/feed")
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .expect("response");
    let mut body = response.into_body();
    let error = timeout(PATIENCE, async {
        loop {
            match body.frame().await {
                Some(Ok(_)) => {}
                Some(Err(error)) => return error,
                None => panic!("the body ended without the reset"),
            }
        }
    })
    .await
    .expect("the guard ends the body");
    assert_eq!(reset_reason(&error), Some(h2::Reason::CANCEL), "{error}");
    assert_eq!(
        next_event(&mut events).await.reason(),
        EndReason::LifetimeExceeded
    );
}
