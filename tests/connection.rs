//! The connection guard driving hyper-util connections itself (feature
//! `hyper`): GOAWAY at the maximum age, the hard close after its grace, and
//! GOAWAY when a drain begins. A hyper HTTP/2 client over loopback TCP.

#![cfg(feature = "hyper")]

use std::{convert::Infallible, net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, Empty, StreamBody, combinators::BoxBody};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    net::{TcpListener, TcpStream},
    time::{Instant, timeout},
};
use tokio_stream::{StreamExt, wrappers::IntervalStream};
use tower::Layer;
use tower_stream_guard::{
    BoxError, ConnectionEnd, ConnectionGuard, Drain, EndReason, StreamGuardLayer,
    stream::RequestBody,
};

// Only some of the shared helpers are used here.
#[allow(dead_code)]
mod support;
use support::{PATIENCE, SLACK};

type ResBody = BoxBody<Bytes, BoxError>;

/// An endless body: a chunk every 50 ms.
fn ticking() -> ResBody {
    let ticks = IntervalStream::new(tokio::time::interval(Duration::from_millis(50)))
        .map(|_| Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"tick"))));
    StreamBody::new(ticks).boxed()
}

async fn serve(connections: ConnectionGuard, guard: StreamGuardLayer) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let service = guard.layer(tower::service_fn(
        |_request: Request<RequestBody<hyper::body::Incoming>>| async {
            Ok::<_, Infallible>(Response::new(ticking()))
        },
    ));
    tokio::spawn(async move {
        while let Ok((io, _)) = listener.accept().await {
            let (connections, service) = (connections.clone(), service.clone());
            tokio::spawn(async move { connections.serve_connection(io, service).await });
        }
    });
    addr
}

async fn connect(addr: SocketAddr) -> SendRequest<Empty<Bytes>> {
    let io = TcpStream::connect(addr).await.expect("connect");
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .expect("HTTP/2 handshake");
    tokio::spawn(connection);
    sender
}

async fn open(
    sender: &mut SendRequest<Empty<Bytes>>,
) -> Result<hyper::body::Incoming, hyper::Error> {
    let request = Request::get("http://test/stream")
        .body(Empty::new())
        .unwrap();
    Ok(sender.send_request(request).await?.into_body())
}

/// Sends requests until the server refuses new streams (GOAWAY) or
/// `PATIENCE` runs out; when that happened.
async fn goaway_seen(sender: &mut SendRequest<Empty<Bytes>>) -> Instant {
    timeout(PATIENCE, async {
        loop {
            match open(sender).await {
                Ok(body) => drop(body),
                Err(_) => return Instant::now(),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the server never refused new streams")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_age_sends_goaway_first_and_closes_hard_after_the_grace() {
    let age = Duration::from_millis(300);
    let grace = Duration::from_millis(600);
    let connections = ConnectionGuard::builder()
        .max_age(age)
        .max_age_grace(grace)
        .resolution(Duration::from_millis(10))
        .build()
        .unwrap();
    let mut conn_events = connections.subscribe();
    let guard = StreamGuardLayer::builder().build().unwrap();
    let mut events = guard.subscribe();
    let addr = serve(connections.clone(), guard.clone()).await;

    let opened = Instant::now();
    let mut sender = connect(addr).await;
    let mut in_flight = open(&mut sender).await.expect("first stream");
    in_flight.frame().await.unwrap().unwrap();

    let refused_at = goaway_seen(&mut sender).await;
    let goaway_after = refused_at - opened;
    assert!(
        goaway_after >= age,
        "GOAWAY before the age: {goaway_after:?}"
    );
    assert!(
        goaway_after < age + grace,
        "no GOAWAY before the hard close: {goaway_after:?}"
    );

    // The stream in flight goes on after the GOAWAY, until the hard close.
    in_flight
        .frame()
        .await
        .expect("still streaming after GOAWAY")
        .expect("a frame");
    let failed = timeout(PATIENCE, async {
        loop {
            match in_flight.frame().await {
                Some(Ok(_)) => {}
                _ => return Instant::now(),
            }
        }
    })
    .await
    .expect("the hard close ends the stream");
    let closed_after = failed - opened;
    assert!(
        closed_after >= age + grace,
        "closed early: {closed_after:?}"
    );
    assert!(
        closed_after < age + grace + SLACK,
        "closed late: {closed_after:?}"
    );

    let closed = loop {
        let event = timeout(PATIENCE, conn_events.recv())
            .await
            .unwrap()
            .unwrap();
        if event.end().is_some() {
            break event;
        }
    };
    assert_eq!(closed.end(), Some(ConnectionEnd::MaxAge));
    // Every stream the guard saw ended (the in-flight one cancelled).
    loop {
        let event = support::next_event(&mut events).await;
        if event.reason() == EndReason::Cancelled && event.duration() > grace {
            break;
        }
    }
    assert_eq!(guard.active_streams(), 0);
    assert_eq!(connections.open_connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_sends_goaway_and_cuts_the_stream_at_the_end_of_its_grace() {
    let drain = Drain::with_close_delay(Duration::from_millis(200));
    let connections = ConnectionGuard::builder().drain(&drain).build().unwrap();
    let guard = StreamGuardLayer::builder().drain(&drain).build().unwrap();
    let addr = serve(connections.clone(), guard.clone()).await;

    let mut sender = connect(addr).await;
    let mut in_flight = open(&mut sender).await.expect("stream");
    in_flight.frame().await.unwrap().unwrap();

    let grace = Duration::from_millis(500);
    let started = Instant::now();
    let report = drain.start(grace);
    let refused_at = goaway_seen(&mut sender).await;
    assert!(refused_at - started < grace, "GOAWAY as the drain begins");
    let ended = timeout(PATIENCE, async {
        loop {
            match in_flight.frame().await {
                Some(Ok(frame)) if frame.is_data() => {}
                _ => return Instant::now(),
            }
        }
    })
    .await
    .expect("the drain ends the stream");
    let after = ended - started;
    assert!(
        after >= grace && after < grace + SLACK,
        "cut after {after:?}"
    );
    let report = report.await;
    assert_eq!(report.cut(), 1, "{report:?}");
    assert!(report.elapsed() < grace + Duration::from_millis(200) + SLACK);
}
