//! The guard on the client side: a tonic `Channel` (and a hyper client)
//! wrapped in the same layer, against a real server over loopback TCP.

#[path = "../examples/common/mod.rs"]
mod common;

use std::{
    convert::Infallible,
    net::SocketAddr,
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::{
    EchoService,
    echo::{
        EchoReply, EchoRequest, StreamRequest, echo_client::EchoClient, echo_server::EchoServer,
    },
};
use http::{Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, Empty, StreamBody, combinators::BoxBody};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
    time::timeout,
};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Code, transport::Channel};
use tower::{Layer, Service, ServiceBuilder};
use tower_stream_guard::{
    BoxError, EndReason, GuardError, IdleDirection, StreamGuardLayer, StreamHandle,
};

#[allow(dead_code)]
mod support;
use support::{PATIENCE, SLACK, next_event, wait_until};

#[path = "support/echo_pair.rs"]
mod echo_pair;
use echo_pair::{GuardedChannel, guarded_client, serve, status_at_end};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guarded_client_gets_deadline_exceeded_when_the_server_goes_silent() {
    let (addr, server_guard) = serve().await;
    let mut server_events = server_guard.subscribe();
    let idle = Duration::from_millis(300);
    let guard = StreamGuardLayer::builder()
        .response_idle_timeout(idle)
        .build()
        .unwrap();
    let mut events = guard.subscribe();
    let mut client = guarded_client(addr, &guard).await;

    // Two messages echoed, then the client keeps its side open and the
    // server has nothing more to say.
    let (tx, rx) = mpsc::channel(4);
    for text in ["one", "two"] {
        tx.send(EchoRequest {
            message: text.into(),
        })
        .await
        .unwrap();
    }
    let mut replies = client
        .bidi(ReceiverStream::new(rx))
        .await
        .expect("bidi call")
        .into_inner();
    for expected in ["one", "two"] {
        let reply = timeout(PATIENCE, replies.message())
            .await
            .expect("reply in time")
            .expect("reply ok")
            .expect("open");
        assert_eq!(reply.message, expected);
    }
    let last_reply = Instant::now();
    let status = timeout(PATIENCE, replies.message())
        .await
        .expect("the guard ends the wait")
        .expect_err("a silent server must not block message() forever");
    let waited = last_reply.elapsed();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().contains("response_idle_timeout"),
        "the message names the guard: {status:?}"
    );
    assert!(waited < idle + SLACK, "fired late: {waited:?}");

    let event = next_event(&mut events).await;
    assert_eq!(
        event.reason(),
        EndReason::IdleTimeout(IdleDirection::Response)
    );
    assert!(event.response().bytes > 0, "{event:?}");
    // The server sees the client go: its side of the stream is cancelled.
    let server_event = next_event(&mut server_events).await;
    assert_eq!(server_event.reason(), EndReason::Cancelled);
    assert_eq!(server_event.path(), "/echo.Echo/Bidi");
    drop(tx);
    assert_eq!(guard.stats().active(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_lifetime_bounds_the_whole_call() {
    let (addr, _server_guard) = serve().await;
    let lifetime = Duration::from_millis(400);
    let guard = StreamGuardLayer::builder()
        .max_lifetime(lifetime)
        .build()
        .unwrap();
    let mut client = guarded_client(addr, &guard).await;

    let started = Instant::now();
    let mut stream = client
        .server_stream(StreamRequest {
            count: 0,
            interval_ms: 20,
            size: 8,
        })
        .await
        .expect("call")
        .into_inner();
    let status = status_at_end(&mut stream, "the lifetime ends a busy stream too").await;
    let elapsed = started.elapsed();
    assert_eq!(status.code(), Code::DeadlineExceeded);
    assert!(status.message().contains("max_lifetime"), "{status:?}");
    assert!(
        elapsed >= lifetime && elapsed < lifetime + SLACK,
        "{elapsed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_handle_observes_and_cancels_the_call() {
    let (addr, server_guard) = serve().await;
    let mut server_events = server_guard.subscribe();
    let guard = StreamGuardLayer::builder()
        .response_handle(true)
        .build()
        .unwrap();
    let mut events = guard.subscribe();
    let mut client = guarded_client(addr, &guard).await;

    let response = client
        .server_stream(StreamRequest {
            count: 0,
            interval_ms: 20,
            size: 8,
        })
        .await
        .expect("call");
    let handle = response
        .extensions()
        .get::<StreamHandle>()
        .cloned()
        .expect("the handle is in the response extensions");
    let mut stream = response.into_inner();
    stream.message().await.unwrap().unwrap();
    let observer = tokio::spawn(handle.cancelled());

    assert!(handle.cancel());
    assert!(!handle.cancel(), "only the first cancel ends the stream");
    let status = status_at_end(&mut stream, "cancel ends the pending read").await;
    assert_eq!(status.code(), Code::Cancelled, "{status:?}");
    assert!(
        status.message().contains("StreamHandle::cancel"),
        "{status:?}"
    );
    assert_eq!(
        timeout(PATIENCE, observer).await.unwrap().unwrap(),
        EndReason::Cancelled
    );
    let event = next_event(&mut events).await;
    assert_eq!(event.reason(), EndReason::Cancelled);
    assert_eq!(event.grpc_status(), Some(1));
    assert_eq!(
        next_event(&mut server_events).await.reason(),
        EndReason::Cancelled,
        "the server sees the client go"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_builder_layers_the_guard_around_a_channel() {
    let (addr, _server_guard) = serve().await;
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let guard = StreamGuardLayer::builder()
        .max_lifetime(Duration::from_millis(300))
        .build()
        .unwrap();
    let service = ServiceBuilder::new()
        .layer(guard.clone().for_tonic_channel())
        .service(channel);
    let mut client = EchoClient::new(service);
    let reply = client
        .unary(EchoRequest {
            message: "hi".into(),
        })
        .await
        .expect("unary through the guard");
    assert_eq!(reply.into_inner().message, "hi");
    wait_until("the unary stream ended", || guard.active_streams() == 0).await;
    assert_eq!(guard.stats().ended(EndReason::Completed), 1);
}

type ResBody = BoxBody<Bytes, BoxError>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hyper_client_guard_ends_a_silent_plain_body_with_an_error() {
    // A hyper HTTP/2 server whose body sends two chunks, then nothing.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().unwrap();
    let (keep, _kept) = mpsc::channel::<()>(1);
    tokio::spawn(async move {
        let (io, _) = listener.accept().await.unwrap();
        let service = hyper::service::service_fn(move |_request| {
            let keep = keep.clone();
            async move {
                let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
                for chunk in ["a", "b"] {
                    tx.send(Ok(Frame::data(Bytes::from_static(chunk.as_bytes()))))
                        .await
                        .unwrap();
                }
                // Keep the body open for as long as the test runs.
                tokio::spawn(async move {
                    keep.closed().await;
                    drop(tx);
                });
                let body: ResBody = StreamBody::new(ReceiverStream::new(rx)).boxed();
                Ok::<_, Infallible>(Response::new(body))
            }
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
    let idle = Duration::from_millis(300);
    let guard = StreamGuardLayer::builder()
        .response_idle_timeout(idle)
        .build()
        .unwrap();
    let mut events = guard.subscribe();
    let mut client = guard.layer(tower::service_fn(
        move |request: Request<tower_stream_guard::stream::RequestBody<Empty<Bytes>>>| {
            let mut sender = sender.clone();
            async move { sender.send_request(request).await }
        },
    ));
    let response = tower::ServiceExt::ready(&mut client)
        .await
        .unwrap()
        .call(Request::get("http://test/").body(Empty::new()).unwrap())
        .await
        .expect("response");
    let mut body = response.into_body();
    for _ in 0..2 {
        body.frame().await.unwrap().expect("a chunk");
    }
    let started = Instant::now();
    let err = timeout(PATIENCE, body.frame())
        .await
        .expect("the guard ends the silent body")
        .expect("an error, not the end")
        .expect_err("an error");
    let guard_error = err.downcast_ref::<GuardError>().expect("a GuardError");
    assert_eq!(
        guard_error.reason(),
        EndReason::IdleTimeout(IdleDirection::Response)
    );
    assert!(started.elapsed() < idle + SLACK);
    assert_eq!(
        next_event(&mut events).await.reason(),
        EndReason::IdleTimeout(IdleDirection::Response)
    );
}

/// A tonic server behind a guard built from `builder`.
async fn serve_with(builder: tower_stream_guard::StreamGuardBuilder) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let guard = builder.build().unwrap();
    let router = tonic::transport::Server::builder()
        .layer(guard)
        .add_service(EchoServer::new(EchoService::new()));
    tokio::spawn(router.serve_with_incoming(TcpListenerStream::new(listener)));
    addr
}

/// Opens a bidi call, sends `message` and waits for its echo: the call is
/// open on both sides. The sender keeps the request side open.
async fn open_bidi(
    client: &mut EchoClient<GuardedChannel>,
    message: &str,
) -> (mpsc::Sender<EchoRequest>, tonic::Streaming<EchoReply>) {
    let (tx, rx) = mpsc::channel(4);
    tx.send(EchoRequest {
        message: message.into(),
    })
    .await
    .unwrap();
    let mut replies = client
        .bidi(ReceiverStream::new(rx))
        .await
        .expect("bidi call")
        .into_inner();
    timeout(PATIENCE, replies.message())
        .await
        .expect("reply in time")
        .expect("reply ok")
        .expect("open");
    (tx, replies)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_guard_names_its_reason_in_a_trailer_the_client_guard_reports() {
    let addr =
        serve_with(StreamGuardLayer::builder().response_idle_timeout(Duration::from_millis(300)))
            .await;
    let guard = StreamGuardLayer::builder().build().unwrap();
    let mut events = guard.subscribe();
    let mut client = guarded_client(addr, &guard).await;

    // One message echoed, then the server has nothing more to say.
    let (tx, mut replies) = open_bidi(&mut client, "one").await;
    let status = timeout(PATIENCE, replies.message())
        .await
        .expect("the server's guard ends the call")
        .expect_err("a guard-made status");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(
        status
            .metadata()
            .get("stream-guard-reason")
            .map(|v| v.to_str().unwrap()),
        Some("idle_timeout"),
        "{status:?}"
    );
    drop(replies);
    let event = next_event(&mut events).await;
    assert_eq!(event.grpc_status(), Some(4));
    assert_eq!(
        event.server_guard_reason(),
        Some("idle_timeout"),
        "{event:?}"
    );
    assert!(
        event
            .to_json()
            .contains(r#""server_guard_reason":"idle_timeout""#),
        "{}",
        event.to_json()
    );
    drop(tx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_by_the_servers_cap_says_rejected_in_its_trailers_only_response() {
    let addr = serve_with(StreamGuardLayer::builder().max_streams(1)).await;
    let guard = StreamGuardLayer::builder().build().unwrap();
    let mut events = guard.subscribe();
    let mut client = guarded_client(addr, &guard).await;

    // Holds the server's one slot.
    let (tx, held) = open_bidi(&mut client, "hold").await;

    let status = client
        .unary(EchoRequest {
            message: "refused".into(),
        })
        .await
        .expect_err("the cap refuses");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(
        status
            .metadata()
            .get("stream-guard-reason")
            .map(|v| v.to_str().unwrap()),
        Some("rejected"),
        "{status:?}"
    );
    let event = next_event(&mut events).await;
    assert_eq!(event.path(), "/echo.Echo/Unary");
    assert_eq!(event.grpc_status(), Some(8));
    assert_eq!(event.server_guard_reason(), Some("rejected"), "{event:?}");
    drop((tx, held));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_servers_own_deadline_exceeded_carries_no_guard_reason() {
    // A server (no guard) that answers every call with its own
    // DEADLINE_EXCEEDED, trailers-only.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (io, _) = listener.accept().await.unwrap();
        let service = hyper::service::service_fn(|_request| async {
            let mut response = Response::new(Empty::<Bytes>::new());
            let headers = response.headers_mut();
            headers.insert("content-type", "application/grpc".parse().unwrap());
            headers.insert("grpc-status", "4".parse().unwrap());
            headers.insert(
                "grpc-message",
                "the database took too long".parse().unwrap(),
            );
            Ok::<_, Infallible>(response)
        });
        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(io), service)
            .await;
    });
    let guard = StreamGuardLayer::builder().build().unwrap();
    let mut events = guard.subscribe();
    let mut client = guarded_client(addr, &guard).await;

    let status = client
        .unary(EchoRequest {
            message: "slow".into(),
        })
        .await
        .expect_err("the server's own status");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.metadata().get("stream-guard-reason").is_none());
    let event = next_event(&mut events).await;
    assert_eq!(event.grpc_status(), Some(4));
    assert_eq!(event.server_guard_reason(), None);
    assert!(!event.to_json().contains("server_guard_reason"));
}
