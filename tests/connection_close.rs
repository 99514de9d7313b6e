//! When a connection guard closes a connection at once, and when it must or
//! must not close it later: a connection accepted after a drain began (real
//! TCP); a stalled reader that reads its guard-ended body after all, a
//! stream cancelled through its handle while unread, a client whose
//! requests are all refused (paused time, the connection known to the
//! stream guard through its handle).

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::{HeaderValue, Request};
use http_body_util::{BodyExt, Empty};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::broadcast,
    time::timeout,
};
use tower::Layer;
use tower_stream_guard::{
    ConnectionEnd, ConnectionEvent, ConnectionGuard, Drain, EndReason, IdleDirection,
    StreamGuardLayer, connection::PeerOf,
};

#[path = "support/paused.rs"]
mod paused;
use paused::{App, SECOND, call, guard, next_event};

/// Bounds every wait on the real sockets below.
const PATIENCE: Duration = Duration::from_secs(5);

async fn next_connection_event(
    events: &mut broadcast::Receiver<ConnectionEvent>,
) -> ConnectionEvent {
    timeout(PATIENCE, events.recv())
        .await
        .expect("a connection event in time")
        .expect("no connection event missed")
}

#[tokio::test]
async fn a_connection_wrapped_after_the_drain_began_is_closed_at_once_as_drained() {
    let drain = Drain::new();
    let connections = ConnectionGuard::builder()
        .drain(&drain)
        .build()
        .expect("valid configuration");
    let mut events = connections.subscribe();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");

    // Accepted before the drain: it stays open through the grace.
    let _early_client = TcpStream::connect(addr).await.expect("connect");
    let (tcp, _) = listener.accept().await.expect("accept");
    let early = connections.wrap(tcp);
    let _report = drain.start(Duration::from_secs(60));

    let mut late_client = TcpStream::connect(addr).await.expect("connect");
    let (tcp, _) = listener.accept().await.expect("accept");
    let mut late = connections.wrap(tcp);
    assert!(late.handle().is_closed(), "closed as it is wrapped");
    assert!(!early.handle().is_closed(), "the drain's grace is not over");
    // Even with bytes waiting, the first read fails.
    late_client
        .write_all(b"PRI * HTTP/2.0")
        .await
        .expect("write");
    let mut read = [0u8; 64];
    let failed = timeout(PATIENCE, late.read(&mut read))
        .await
        .expect("the read returns at once");
    assert!(failed.is_err(), "the read succeeded: {failed:?}");

    let late_id = late.handle().id();
    drop(late);
    let mut closed = None;
    for _ in 0..3 {
        let event = next_connection_event(&mut events).await;
        if event.end().is_some() {
            closed = Some(event);
            break;
        }
    }
    let closed = closed.expect("a close event");
    assert_eq!(closed.id(), late_id);
    assert_eq!(closed.end(), Some(ConnectionEnd::Drained));
    assert_eq!(closed.end().map(|end| end.as_str()), Some("drained"));
    assert_eq!(closed.streams(), 0);
    assert_eq!(connections.open_connections(), 1, "the early one is open");
    drop(early);
}

/// An IO with nothing under it: only its handle is used, to tell the stream
/// guard which connection its streams run on.
struct NoSocket;

impl PeerOf for NoSocket {
    fn peer(&self) -> Option<SocketAddr> {
        None
    }
}

/// A guard ends a stream whose body nobody reads (the connection counts it
/// stalled); the reader comes back later and reads the guard's trailers. The
/// stall is over then: the connection is not closed at the stalled grace,
/// and the stream has its one event.
#[tokio::test(start_paused = true)]
async fn a_guard_ended_body_read_later_is_no_longer_stalled() {
    let grace = 2 * SECOND;
    let connections = ConnectionGuard::builder()
        .stalled_grace(grace)
        .resolution(Duration::from_millis(10))
        .build()
        .expect("valid configuration");
    let mut connection_events = connections.subscribe();
    let io = connections.wrap(NoSocket);
    assert_eq!(
        next_connection_event(&mut connection_events).await.end(),
        None
    );
    let guard = guard(StreamGuardLayer::builder().response_idle_timeout(SECOND));
    let mut events = guard.subscribe();
    let (app, mut feeders) = App::new();
    let mut svc = guard.layer(app.service());

    let mut request = Request::post("/echo.Echo/ServerStream")
        .extension(io.handle().clone())
        .body(Empty::<Bytes>::new())
        .expect("request");
    request
        .headers_mut()
        .insert("content-type", HeaderValue::from_static("application/grpc"));
    let mut response = call(&mut svc, request).await;
    let _feed = feeders.recv().await.expect("the handler's feeder");

    // Nobody reads: the guard ends the stream at its idle timeout.
    let ended = next_event(&mut events).await;
    assert_eq!(
        ended.reason(),
        EndReason::IdleTimeout(IdleDirection::Response)
    );
    tokio::time::sleep(SECOND / 2).await;
    assert!(!io.handle().is_closed(), "within the stalled grace");

    // The reader is back: it reads the guard's ending, and holds the body.
    let frame = response
        .body_mut()
        .frame()
        .await
        .expect("the guard's trailers")
        .expect("trailers, not an error");
    let trailers = frame.into_trailers().expect("a trailers frame");
    assert_eq!(trailers["grpc-status"], "4");
    assert!(response.body_mut().frame().await.is_none(), "then the end");

    // Well past the grace counted from the stall: the connection stays.
    tokio::time::sleep(2 * grace).await;
    assert!(
        !io.handle().is_closed(),
        "closed as stalled after its reader read the end"
    );
    assert_eq!(
        connection_events.try_recv().map(|event| event.end()),
        Err(broadcast::error::TryRecvError::Empty)
    );
    assert_eq!(connections.open_connections(), 1);
    assert!(events.try_recv().is_err(), "one end event");
    assert_eq!(guard.stats().ended(ended.reason()), 1);
    drop(response);
    drop(io);
    let closed = next_connection_event(&mut connection_events).await;
    assert_eq!(closed.end(), Some(ConnectionEnd::Closed));
}

/// `StreamHandle::cancel` ends a stream the way a guard does (trailers
/// saying `CANCELLED`): when nobody reads the body, hyper keeps the stream
/// for them just as after a guard's end, and the connection is closed as
/// stalled at the grace.
#[tokio::test(start_paused = true)]
async fn a_stream_cancelled_through_its_handle_while_unread_closes_its_connection_as_stalled() {
    let grace = 2 * SECOND;
    let connections = ConnectionGuard::builder()
        .stalled_grace(grace)
        .resolution(Duration::from_millis(10))
        .build()
        .expect("valid configuration");
    let mut connection_events = connections.subscribe();
    let io = connections.wrap(NoSocket);
    assert_eq!(
        next_connection_event(&mut connection_events).await.end(),
        None
    );
    let guard = guard(StreamGuardLayer::builder());
    let mut events = guard.subscribe();
    let (app, mut feeders) = App::new();
    let mut svc = guard.layer(app.service());
    let mut request = Request::post("/echo.Echo/ServerStream")
        .extension(io.handle().clone())
        .body(Empty::<Bytes>::new())
        .expect("request");
    request
        .headers_mut()
        .insert("content-type", HeaderValue::from_static("application/grpc"));
    // The body is held and never polled: a reader that stopped reading.
    let response = call(&mut svc, request).await;
    let _feed = feeders.recv().await.expect("the handler's feeder");

    assert!(app.last_handle().expect("the stream's handle").cancel());
    assert_eq!(next_event(&mut events).await.reason(), EndReason::Cancelled);
    tokio::time::sleep(grace - SECOND / 10).await;
    assert!(!io.handle().is_closed(), "within the stalled grace");
    tokio::time::sleep(SECOND / 5).await;
    assert!(io.handle().is_closed(), "still open past the stalled grace");
    drop(io);
    let closed = next_connection_event(&mut connection_events).await;
    assert_eq!(closed.end(), Some(ConnectionEnd::Stalled));
    drop(response);
}

/// A client whose every request is refused (here the guard's one slot is
/// held by a stream on another connection) does nothing on its connection:
/// the refusals do not restart the idle time, and the connection is closed
/// as idle when its idle timeout has passed since it was opened.
#[tokio::test(start_paused = true)]
async fn refused_streams_do_not_keep_an_idle_connection_open() {
    let idle = 2 * SECOND;
    let connections = ConnectionGuard::builder()
        .idle_timeout(idle)
        .resolution(Duration::from_millis(10))
        .build()
        .expect("valid configuration");
    let mut connection_events = connections.subscribe();
    let io = connections.wrap(NoSocket);
    assert_eq!(
        next_connection_event(&mut connection_events).await.end(),
        None
    );
    let opened = tokio::time::Instant::now();
    let guard = guard(StreamGuardLayer::builder().max_streams(1));
    let (app, mut feeders) = App::new();
    let mut svc = guard.layer(app.service());
    // The one slot, held by a stream of another connection.
    let _held = call(&mut svc, paused::request("/hold", 9, false)).await;
    let _feed = feeders.recv().await.expect("the handler's feeder");

    while !io.handle().is_closed() {
        assert!(
            opened.elapsed() < idle + SECOND,
            "refusals kept the connection open"
        );
        let request = Request::get("/page")
            .extension(io.handle().clone())
            .body(Empty::<Bytes>::new())
            .expect("request");
        let refused = call(&mut svc, request).await;
        assert_eq!(refused.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        tokio::time::sleep(SECOND / 4).await;
    }
    assert!(opened.elapsed() >= idle, "closed before its idle timeout");
    drop(io);
    let closed = next_connection_event(&mut connection_events).await;
    assert_eq!(closed.end(), Some(ConnectionEnd::Idle));
}
