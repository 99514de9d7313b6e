//! When a client's stream ends: at the server's trailers (or error), not
//! when the application lets go of tonic's `Streaming`; and when a client
//! guard that fired resets the HTTP/2 stream. A real tonic server over
//! loopback TCP, a guarded tonic `Channel`.

#[path = "../examples/common/mod.rs"]
mod common;

use std::time::Duration;

use common::{
    EchoService,
    echo::{EchoRequest, StreamRequest, echo_server::EchoServer},
};
use tokio::{net::TcpListener, sync::mpsc, time::timeout};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::Code;
use tower_stream_guard::{EndReason, StreamGuardLayer, StreamHandle};

#[allow(dead_code)]
mod support;
use support::{PATIENCE, QUIET, next_event};

#[path = "support/echo_pair.rs"]
mod echo_pair;
use echo_pair::{guarded_client, serve, status_at_end};

fn handle_of<T>(response: &tonic::Response<T>) -> StreamHandle {
    response
        .extensions()
        .get::<StreamHandle>()
        .cloned()
        .expect("response_handle(true) puts the handle in the response")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_stream_ends_at_the_servers_trailers_while_the_application_holds_it() {
    let (addr, _server) = serve().await;
    let guard = StreamGuardLayer::builder()
        .response_handle(true)
        .build()
        .unwrap();
    let mut events = guard.subscribe();
    let mut client = guarded_client(addr, &guard).await;

    let response = client
        .server_stream(StreamRequest {
            count: 3,
            interval_ms: 0,
            size: 4,
        })
        .await
        .expect("call");
    let handle = handle_of(&response);
    // A producer waiting on the handle before the call is over (the
    // `run_until_cancelled` pattern on a request stream).
    let waiting = tokio::spawn({
        let handle = handle.clone();
        async move { handle.cancelled().await }
    });
    let mut replies = response.into_inner();
    let mut read = 0;
    while let Some(_reply) = timeout(PATIENCE, replies.message())
        .await
        .expect("replies in time")
        .expect("no error")
    {
        read += 1;
    }
    assert_eq!(read, 3);
    // `replies` is still held: tonic will not poll its body again.
    assert_eq!(
        timeout(PATIENCE, waiting)
            .await
            .expect("a cancelled() that was waiting resolves at the trailers")
            .unwrap(),
        EndReason::Completed
    );
    let event = next_event(&mut events).await;
    assert_eq!(event.reason(), EndReason::Completed);
    assert_eq!(event.grpc_status(), Some(0));
    assert_eq!(guard.active_streams(), 0, "the stream is no longer active");
    // The duration ends at the trailers, not at the drop below.
    tokio::time::sleep(QUIET).await;
    drop(replies);
    assert!(event.duration() < QUIET, "{:?}", event.duration());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_stream_ending_with_an_error_status_ends_at_its_trailers() {
    let server_side = StreamGuardLayer::builder()
        .max_lifetime(Duration::from_millis(100))
        .build()
        .unwrap();
    // A second server whose own guard ends the call: its trailers say 4.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let guarded_addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .layer(server_side)
            .add_service(EchoServer::new(EchoService::new()))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let guard = StreamGuardLayer::builder().build().unwrap();
    let mut events = guard.subscribe();
    let mut client = guarded_client(guarded_addr, &guard).await;
    let mut replies = client
        .server_stream(StreamRequest {
            count: 0,
            interval_ms: 20,
            size: 4,
        })
        .await
        .expect("call")
        .into_inner();
    let status = status_at_end(&mut replies, "the server's guard ends the call").await;
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    let event = next_event(&mut events).await;
    assert_eq!(event.grpc_status(), Some(4));
    assert_eq!(guard.active_streams(), 0);
    drop(replies);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bidi_producer_under_the_handle_stops_when_the_call_is_over() {
    let (addr, _server) = serve().await;
    let guard = StreamGuardLayer::builder()
        .response_handle(true)
        .build()
        .unwrap();
    let mut client = guarded_client(addr, &guard).await;
    let (tx, rx) = mpsc::channel(4);
    tx.send(EchoRequest {
        message: "one".into(),
    })
    .await
    .unwrap();
    let response = client
        .bidi(ReceiverStream::new(rx))
        .await
        .expect("bidi call");
    let handle = handle_of(&response);
    // A producer of the application's that runs until the call is over.
    let producer = tokio::spawn({
        let handle = handle.clone();
        async move {
            handle
                .run_until_cancelled(std::future::pending::<()>())
                .await
        }
    });
    let mut replies = response.into_inner();
    assert_eq!(replies.message().await.unwrap().unwrap().message, "one");
    // The server ends the call: dropping the last sender half-closes the
    // request, the echo task returns, the server sends its trailers.
    drop(tx);
    assert!(
        timeout(PATIENCE, replies.message())
            .await
            .unwrap()
            .unwrap()
            .is_none()
    );
    let stopped = timeout(PATIENCE, producer)
        .await
        .expect("the producer stops when the call is over, not when `replies` is dropped")
        .unwrap();
    assert_eq!(stopped, None, "the handle stopped it");
    drop(replies);
}

/// What the README says of a client guard that fires while the application
/// is not reading: the event and the handle at once, the HTTP/2 reset (the
/// server seeing the client go) at the application's next read or drop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_guard_firing_while_unread_resets_the_stream_at_the_next_read() {
    let (addr, server) = serve().await;
    let mut server_events = server.subscribe();
    let lifetime = Duration::from_millis(300);
    let guard = StreamGuardLayer::builder()
        .max_lifetime(lifetime)
        .response_handle(true)
        .build()
        .unwrap();
    let mut events = guard.subscribe();
    let mut client = guarded_client(addr, &guard).await;
    let response = client
        .server_stream(StreamRequest {
            count: 0,
            interval_ms: 20,
            size: 4,
        })
        .await
        .expect("call");
    let handle = handle_of(&response);
    let mut replies = response.into_inner();
    replies.message().await.unwrap().unwrap();

    // Not reading: the guard fires all the same, and says so at once.
    assert_eq!(
        timeout(PATIENCE, handle.cancelled()).await.unwrap(),
        EndReason::LifetimeExceeded
    );
    assert_eq!(
        next_event(&mut events).await.reason(),
        EndReason::LifetimeExceeded
    );
    assert_eq!(guard.active_streams(), 0);
    // The server's stream is still open: nothing has dropped the HTTP/2
    // response the application holds.
    assert!(
        timeout(QUIET, server_events.recv()).await.is_err(),
        "the server saw the client go before its next read"
    );
    assert_eq!(server.active_streams(), 1);

    // The next read gets the guard's status and resets the stream.
    let status = status_at_end(&mut replies, "the next read ends").await;
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(
        next_event(&mut server_events).await.reason(),
        EndReason::Cancelled,
        "the server sees the client go at its next read"
    );
    drop(replies);
}

/// The control: an application waiting on the response when the guard
/// fires resets the stream at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_guard_firing_while_read_resets_the_stream_at_once() {
    let (addr, server) = serve().await;
    let mut server_events = server.subscribe();
    let guard = StreamGuardLayer::builder()
        .max_lifetime(Duration::from_millis(300))
        .build()
        .unwrap();
    let mut client = guarded_client(addr, &guard).await;
    let mut replies = client
        .server_stream(StreamRequest {
            count: 0,
            interval_ms: 1_000,
            size: 4,
        })
        .await
        .expect("call")
        .into_inner();
    replies.message().await.unwrap().unwrap();
    // Waits for the next reply (a second away) when the lifetime ends.
    let status = timeout(PATIENCE, replies.message())
        .await
        .expect("the guard ends the read")
        .expect_err("the guard's status");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    let server_end = timeout(PATIENCE, server_events.recv())
        .await
        .expect("the server sees the client go while it still holds `replies`")
        .unwrap();
    assert_eq!(server_end.reason(), EndReason::Cancelled);
    drop(replies);
}
