//! gRPC-Web through tonic-web: where the guard sits relative to
//! `tonic_web::GrpcWebLayer`, checked with a real tonic server over loopback
//! and an HTTP/1.1 grpc-web request sent with hyper's client, as a browser
//! would send it.
//!
//! tonic's `Server::builder().layer(A).layer(B)` makes `A` the outer layer.
//! With `.layer(GrpcWebLayer::new()).layer(guard)`, the guard is
//! inside the translation: it sees plain gRPC, ends streams with gRPC
//! trailers, and tonic-web turns those into the grpc-web trailer frame in the
//! body, which is all a browser can read over HTTP/1.1.

#[path = "../examples/common/mod.rs"]
mod common;

use std::{net::SocketAddr, time::Duration};

use bytes::{Buf, Bytes};
use common::{
    EchoService,
    echo::{StreamRequest, echo_server::EchoServer},
};
use http::{HeaderMap, Request, Response, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use prost::Message;
use tokio::{net::TcpListener, time::timeout};
use tokio_stream::wrappers::TcpListenerStream;
use tonic_web::GrpcWebLayer;
use tower_stream_guard::{EndReason, IdleDirection, StreamCap, StreamGuardLayer};

/// Bounds every wait on the real sockets below.
const PATIENCE: Duration = Duration::from_secs(5);

/// A tonic server with tonic-web outside the guard, the order this crate
/// documents; HTTP/1.1 accepted, as browsers need.
async fn serve(guard: StreamGuardLayer) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let server = tonic::transport::Server::builder()
        .accept_http1(true)
        .layer(GrpcWebLayer::new())
        .layer(guard)
        .add_service(EchoServer::new(EchoService::new()))
        .serve_with_incoming(TcpListenerStream::new(listener));
    tokio::spawn(server);
    addr
}

/// The same server in the wrong order: the guard outside tonic-web.
async fn serve_guard_outside(guard: StreamGuardLayer) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let server = tonic::transport::Server::builder()
        .accept_http1(true)
        .layer(guard)
        .layer(GrpcWebLayer::new())
        .add_service(EchoServer::new(EchoService::new()))
        .serve_with_incoming(TcpListenerStream::new(listener));
    tokio::spawn(server);
    addr
}

/// Sends an endless, slow `ServerStream` call as grpc-web over a new
/// HTTP/1.1 connection and returns the response (headers read).
async fn grpc_web_call(addr: SocketAddr) -> Response<Incoming> {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(connection);
    let message = StreamRequest {
        count: 0,
        interval_ms: 60_000,
        size: 0,
    }
    .encode_to_vec();
    let mut body = vec![0u8];
    body.extend_from_slice(&(message.len() as u32).to_be_bytes());
    body.extend_from_slice(&message);
    let request = Request::post(format!("http://{addr}/echo.Echo/ServerStream"))
        .header(header::HOST, addr.to_string())
        .header(header::CONTENT_TYPE, "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .body(Full::new(Bytes::from(body)))
        .expect("request");
    timeout(PATIENCE, sender.send_request(request))
        .await
        .expect("response headers in time")
        .expect("response")
}

/// The grpc-web trailer frame (flag `0x80`) in a response body, parsed.
fn body_trailers(mut body: Bytes) -> Option<HeaderMap> {
    while body.remaining() >= 5 {
        let flag = body.get_u8();
        let len = body.get_u32() as usize;
        let frame = body.split_to(len.min(body.len()));
        if flag & 0x80 != 0 {
            let mut map = HeaderMap::new();
            for line in String::from_utf8_lossy(&frame).split("\r\n") {
                if let Some((name, value)) = line.split_once(':') {
                    map.insert(
                        http::HeaderName::from_bytes(name.trim().as_bytes()).ok()?,
                        value.trim().parse().ok()?,
                    );
                }
            }
            return Some(map);
        }
    }
    None
}

#[tokio::test]
async fn a_guard_ended_grpc_web_call_carries_deadline_exceeded_in_the_body_trailers() {
    let guard = StreamGuardLayer::builder()
        .response_idle_timeout(Duration::from_millis(300))
        .build()
        .expect("guard");
    let mut events = guard.subscribe();
    let addr = serve(guard).await;
    let response = grpc_web_call(addr).await;
    assert_eq!(response.status(), http::StatusCode::OK);
    assert!(
        response.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("application/grpc-web")
    );
    // The body ends when the guard fires (300 ms without a reply).
    let body = timeout(PATIENCE, response.into_body().collect())
        .await
        .expect("the guard ends the body in time")
        .expect("body")
        .to_bytes();
    let trailers = body_trailers(body).expect("grpc-web trailer frame in the body");
    assert_eq!(
        trailers.get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"4"[..])
    );
    let event = timeout(PATIENCE, events.recv())
        .await
        .expect("event")
        .expect("event");
    assert_eq!(
        event.reason(),
        EndReason::IdleTimeout(IdleDirection::Response)
    );
    assert_eq!(event.grpc_status(), Some(4));
}

#[tokio::test]
async fn a_cap_refused_grpc_web_call_gets_resource_exhausted() {
    let guard = StreamGuardLayer::builder()
        .max_streams(1)
        .build()
        .expect("guard");
    let mut events = guard.subscribe();
    let addr = serve(guard).await;
    // The first call holds the only slot.
    let held = grpc_web_call(addr).await;
    let refused = grpc_web_call(addr).await;
    assert_eq!(refused.status(), http::StatusCode::OK);
    assert!(
        refused.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("application/grpc-web")
    );
    let headers = refused.headers().clone();
    let body = timeout(PATIENCE, refused.into_body().collect())
        .await
        .expect("the refusal ends at once")
        .expect("body")
        .to_bytes();
    // Trailers-only: the status is in the headers (grpc-web clients read
    // it there), or else in the body's trailer frame.
    let status = headers
        .get("grpc-status")
        .cloned()
        .or_else(|| body_trailers(body)?.get("grpc-status").cloned());
    assert_eq!(status.as_ref().map(|v| v.as_bytes()), Some(&b"8"[..]));
    let event = timeout(PATIENCE, events.recv())
        .await
        .expect("event")
        .expect("event");
    assert_eq!(event.reason(), EndReason::Rejected(StreamCap::Total));
    drop(held);
}

/// The wrong order (README "gRPC-Web"): the guard outside tonic-web ends the
/// call with HTTP trailers, which HTTP/1.1 does not carry to this client:
/// the browser-like client reads no status at all, though the guard's event
/// says it ended the call.
#[tokio::test]
async fn with_the_guard_outside_grpc_web_a_guard_ended_call_loses_its_status() {
    let guard = StreamGuardLayer::builder()
        .response_idle_timeout(Duration::from_millis(300))
        .build()
        .expect("guard");
    let mut events = guard.subscribe();
    let addr = serve_guard_outside(guard).await;
    let response = grpc_web_call(addr).await;
    assert_eq!(response.status(), http::StatusCode::OK);
    assert!(!response.headers().contains_key("grpc-status"));
    let collected = timeout(PATIENCE, response.into_body().collect())
        .await
        .expect("the guard ends the body in time")
        .expect("body");
    let http_trailers = collected.trailers().cloned();
    let body = collected.to_bytes();
    assert!(
        http_trailers.is_none_or(|t| !t.contains_key("grpc-status")),
        "HTTP/1.1 trailers reached the client"
    );
    assert!(
        body_trailers(body).is_none_or(|t| !t.contains_key("grpc-status")),
        "a grpc-web trailer frame carried the status"
    );
    let event = timeout(PATIENCE, events.recv())
        .await
        .expect("event")
        .expect("event");
    assert_eq!(
        event.reason(),
        EndReason::IdleTimeout(IdleDirection::Response)
    );
}

/// The wrong order: a refusal is made by the guard before tonic-web, as
/// plain gRPC, with a content type grpc-web clients reject.
#[tokio::test]
async fn with_the_guard_outside_grpc_web_a_refusal_is_not_grpc_web() {
    let guard = StreamGuardLayer::builder()
        .max_streams(1)
        .build()
        .expect("guard");
    let addr = serve_guard_outside(guard).await;
    let held = grpc_web_call(addr).await;
    let refused = grpc_web_call(addr).await;
    let content_type = refused.headers()[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        content_type.starts_with("application/grpc")
            && !content_type.starts_with("application/grpc-web"),
        "{content_type}"
    );
    assert_eq!(refused.headers()["grpc-status"], "8");
    drop(held);
}
